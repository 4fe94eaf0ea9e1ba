//! The gateway side of the feed: connect to the control plane, apply a snapshot atomically or
//! resume from the last applied revision, apply records as they arrive, and keep a local copy
//! so a restart while the control plane is down still serves the last good table.
//!
//! Fail static: a broken connection, a bad line or a refused rollback never touches the table.
//! Reconnects use jittered exponential backoff (100 ms to 5 s) so a fleet does not stampede a
//! recovering control plane.

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::keys::table::KeyTable;
use crate::snapshot::FeedSource;
use crate::store::feed::FeedLine;
use crate::store::file::{encode, write_atomic, LogFile};
use bytes::BytesMut;
use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A feed longer than this without a line (heartbeats come every few seconds) is dead.
const IDLE_LIMIT: Duration = Duration::from_secs(15);
/// One feed line may not exceed this (a record is well under 4 KiB).
const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("feed URL {0:?} is not http://host:port/path")]
    Url(String),
    #[error("cannot reach the control plane: {0}")]
    Connect(String),
    #[error("control plane answered {0}")]
    Status(u16),
    #[error("feed stream: {0}")]
    Stream(String),
    #[error("feed idle for {0:?}")]
    Idle(Duration),
    #[error("feed line too long or not JSON: {0}")]
    BadLine(String),
    #[error("feed offered revision {offered}, older than revision {applied} already applied: refusing a rollback")]
    Rollback { offered: u64, applied: u64 },
}

/// Start following the feed; loads the local copy first.
pub fn spawn(gw: Arc<Gateway>, source: FeedSource) {
    tokio::spawn(run(gw, source));
}

async fn run(gw: Arc<Gateway>, source: FeedSource) {
    let cache = &source.cache;
    let mut applied = load_cache(&gw, cache).await;
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        let before = applied;
        let result = session(&gw, &source, &mut applied).await;
        if let Err(e) = result {
            gw.metrics.source_errors.with_label_values(&["feed"]).inc();
            let text = e.to_string();
            if text != last_error {
                tracing::warn!(error = %e, revision = applied, "feed disconnected; serving the last good table");
                gw.audit(
                    Event::new("source.error", "gateway")
                        .with("kind", "feed")
                        .with("error", text.clone()),
                );
                last_error = text;
            }
        }
        if applied > before {
            backoff = Duration::from_millis(100);
        }
        let jitter = {
            let mut b = [0u8; 2];
            let _ = getrandom::fill(&mut b);
            u64::from(u16::from_le_bytes(b)) % (backoff.as_millis() as u64 / 2 + 1)
        };
        tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Serve from the local copy until the feed answers. Not marked as synced: its age is unknown.
async fn load_cache(gw: &Arc<Gateway>, cache: &Path) -> u64 {
    let file = LogFile::new(cache);
    let loaded = tokio::task::spawn_blocking(move || file.load()).await;
    match loaded {
        Ok(Ok(parsed)) if cache.exists() => {
            let table = KeyTable::from_records(parsed.records, parsed.rev);
            let rev = table.revision();
            gw.install_table(table, false);
            gw.metrics.table_revision.set(rev as i64);
            tracing::info!(revision = rev, path = %cache.display(), "serving the local copy of the last feed table");
            rev
        }
        _ => 0,
    }
}

fn append_cache(cache: &Path, records: &[KeyRecord]) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cache)?
        .write_all(&encode(records)?)
}

fn write_cache(cache: &Path, records: &[KeyRecord]) -> std::io::Result<()> {
    write_atomic(cache, &encode(records)?)
}

/// Connect with a bearer token and return the response (used for the feed and usage reports).
pub async fn request(
    url: &Uri,
    token: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: http::Method,
    body: bytes::Bytes,
) -> Result<http::Response<hyper::body::Incoming>, FeedError> {
    let https = match (url.scheme_str(), tls) {
        (Some("http"), _) => false,
        (Some("https"), Some(_)) => true,
        _ => return Err(FeedError::Url(url.to_string())),
    };
    let authority = url
        .authority()
        .ok_or_else(|| FeedError::Url(url.to_string()))?
        .clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(if https { 443 } else { 80 })
    );
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| FeedError::Connect(format!("{addr}: connect timed out")))?
    .map_err(|e| FeedError::Connect(format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let req = Request::builder()
        .method(method)
        .uri(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(http::header::HOST, authority.as_str())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(body))
        .map_err(|e| FeedError::Url(e.to_string()))?;
    match tls.filter(|_| https) {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(authority.host().to_owned())
                .map_err(|_| FeedError::Url(url.to_string()))?;
            let stream = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream),
            )
            .await
            .map_err(|_| FeedError::Connect(format!("{addr}: TLS handshake timed out")))?
            .map_err(|e| FeedError::Connect(format!("{addr}: TLS: {e}")))?;
            send(TokioIo::new(stream), req).await
        }
        None => send(TokioIo::new(stream), req).await,
    }
}

async fn send<I>(
    io: I,
    req: Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, FeedError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| FeedError::Connect(e.to_string()))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map_err(|e| FeedError::Connect(e.to_string()))
}

async fn session(
    gw: &Arc<Gateway>,
    source: &FeedSource,
    applied: &mut u64,
) -> Result<(), FeedError> {
    let (url, cache) = (source.url.as_str(), source.cache.as_path());
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = if *applied > 0 {
        format!("{url}{sep}after={applied}")
    } else {
        url.to_owned()
    };
    let uri: Uri = full.parse().map_err(|_| FeedError::Url(url.to_owned()))?;
    let resp = request(
        &uri,
        &source.token,
        source.tls.as_ref(),
        http::Method::GET,
        bytes::Bytes::new(),
    )
    .await?;
    if !resp.status().is_success() {
        return Err(FeedError::Status(resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut snapshot: Option<(KeyTable, Vec<KeyRecord>)> = None;
    loop {
        let frame = match tokio::time::timeout(IDLE_LIMIT, body.frame()).await {
            Err(_) => return Err(FeedError::Idle(IDLE_LIMIT)),
            Ok(None) => return Err(FeedError::Stream("closed by the control plane".into())),
            Ok(Some(Err(e))) => return Err(FeedError::Stream(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(nl + 1);
            let line: FeedLine = serde_json::from_slice(&line[..nl])
                .map_err(|e| FeedError::BadLine(e.to_string()))?;
            handle(gw, line, cache, applied, &mut snapshot).await?;
        }
        if buf.len() > MAX_LINE {
            return Err(FeedError::BadLine(format!(
                "{} bytes without a newline",
                buf.len()
            )));
        }
    }
}

async fn handle(
    gw: &Arc<Gateway>,
    line: FeedLine,
    cache: &Path,
    applied: &mut u64,
    snapshot: &mut Option<(KeyTable, Vec<KeyRecord>)>,
) -> Result<(), FeedError> {
    match line {
        FeedLine::SnapshotBegin { rev, count } => {
            if rev < *applied {
                return Err(FeedError::Rollback {
                    offered: rev,
                    applied: *applied,
                });
            }
            *snapshot = Some((KeyTable::new(), Vec::with_capacity(count.min(1 << 20))));
        }
        FeedLine::Record { record } => match snapshot {
            Some((table, records)) => {
                records.push((*record).clone());
                table.apply(*record);
            }
            None => {
                if record.rev <= *applied {
                    return Ok(()); // a replay of something we have
                }
                let age = (unix_ms() - record.written_at_ms).max(0) as f64 / 1000.0;
                let rev = record.rev;
                let persisted = (*record).clone();
                if gw.table().apply(*record) {
                    gw.metrics.propagation.observe(age);
                }
                *applied = rev;
                gw.mark_synced();
                gw.metrics.table_revision.set(rev as i64);
                let cache = cache.to_owned();
                let _ =
                    tokio::task::spawn_blocking(move || append_cache(&cache, &[persisted])).await;
            }
        },
        FeedLine::SnapshotEnd { rev } => {
            let Some((table, records)) = snapshot.take() else {
                return Err(FeedError::BadLine(
                    "snapshot_end without snapshot_begin".into(),
                ));
            };
            if rev < *applied {
                return Err(FeedError::Rollback {
                    offered: rev,
                    applied: *applied,
                });
            }
            table.advance(rev);
            let keys = table.len();
            gw.install_table(table, true);
            gw.metrics.table_revision.set(rev as i64);
            *applied = rev;
            tracing::info!(revision = rev, keys, "feed snapshot applied");
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "snapshot")
                    .with("revision", rev)
                    .with("keys", keys),
            );
            let cache = cache.to_owned();
            let written = tokio::task::spawn_blocking(move || write_cache(&cache, &records)).await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::warn!("could not write the local feed copy");
            }
        }
        FeedLine::Heartbeat { rev, time_ms } => {
            if rev < *applied {
                return Err(FeedError::Rollback {
                    offered: rev,
                    applied: *applied,
                });
            }
            gw.mark_synced();
            let skew_ms = unix_ms() - time_ms;
            if skew_ms.abs() > 60_000 {
                tracing::warn!(
                    skew_ms,
                    "clock differs from the control plane's by over a minute"
                );
            }
        }
    }
    Ok(())
}

/// Report usage (last use, request counts per key) to the control plane every interval.
pub fn spawn_usage_reports(gw: Arc<Gateway>, source: FeedSource) {
    tokio::spawn(async move {
        let node = &source.node;
        loop {
            tokio::time::sleep(gw.snapshot().touch_interval).await;
            let report = serde_json::json!({"node": node, "usage": gw.usage.snapshot()});
            let Ok(body) = serde_json::to_vec(&report) else {
                continue;
            };
            match request(
                &source.usage_url,
                &source.token,
                source.tls.as_ref(),
                http::Method::POST,
                body.into(),
            )
            .await
            {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::debug!(status = r.status().as_u16(), "usage report refused"),
                Err(e) => tracing::debug!(error = %e, "usage report failed"),
            }
        }
    });
}
