//! The gateway side of the feed: connect to the control plane presenting the log id and
//! revision held, apply a snapshot atomically or resume, apply records as they arrive (every
//! record's MAC verified for the session's log, every change through `sync::apply`), and keep a
//! sealed local copy (`sync::cache`) so a restart while the control plane is down still serves
//! the last good table, with its sync age.
//!
//! Fail static: a broken connection, a bad line, a bad MAC or a refused rollback never touches
//! the table. The stream is sealed (`store::seal`) under a nonce chosen per connection, and
//! each line is checked before it is acted on: a line only counts when it proves that every
//! line before it arrived as sent, so a path that drops a revocation and passes heartbeats is
//! found at the next line (a heartbeat at the latest) and the session starts again from the
//! revision held.
//! Reconnects use jittered exponential backoff (100 ms to 5 s) so a fleet does not stampede a
//! recovering control plane.

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::keys::table::KeyTable;
use crate::snapshot::FeedSource;
use crate::store::feed::{FeedLine, MAX_LINE};
use crate::store::seal::{LogId, Signer};
use crate::sync::cache::{self, CacheWriter};
use crate::sync::{apply, file as follow};
use bytes::BytesMut;
use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// A feed longer than this without a whole line (heartbeats come every few seconds) is dead,
/// also when bytes still trickle in (a slow drip would otherwise hold the session for ever).
const IDLE_LIMIT: Duration = Duration::from_secs(15);

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
    #[error("feed line refused: {0}")]
    BadRecord(#[from] crate::store::seal::SealError),
    #[error(transparent)]
    Refused(#[from] apply::Refusal),
}

impl FeedError {
    /// Closed label for `keygate_source_errors_total{kind}`.
    fn kind(&self) -> &'static str {
        match self {
            FeedError::BadRecord(_) => "bad_mac",
            FeedError::Refused(r) => r.kind(),
            FeedError::Rollback { .. } => "rollback",
            FeedError::Url(_)
            | FeedError::Connect(_)
            | FeedError::Status(_)
            | FeedError::Stream(_)
            | FeedError::Idle(_)
            | FeedError::BadLine(_) => "feed",
        }
    }
}

/// How often heartbeats alone refresh the cache's sync time (each costs an fsync).
const CACHE_TOUCH_EVERY_MS: i64 = 10_000;

/// One connection's progress: the log it serves, a snapshot being received, the cache.
struct Session<'a> {
    gw: &'a Arc<Gateway>,
    signer: &'a Signer,
    log: Option<LogId>,
    /// The snapshot being received: its log, the count its (sealed) begin line announced, and
    /// the records so far (never more than announced).
    snapshot: Option<(LogId, usize, Vec<KeyRecord>)>,
    /// This connection's nonce and the stream's seal, from its first line on.
    nonce: String,
    chain: Option<crate::store::seal::Chain>,
    cache: &'a mut Option<CacheWriter>,
    cache_path: &'a std::path::Path,
    touched_ms: i64,
}

/// Start following the feed; loads the local copy first.
pub fn spawn(gw: Arc<Gateway>, source: FeedSource) {
    tokio::spawn(run(gw, source));
}

async fn run(gw: Arc<Gateway>, source: FeedSource) {
    let signer = Signer::new(&gw.snapshot().keys.hasher);
    let mut cache = load_cache(&gw, &source.cache, &signer).await;
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        let before = gw.table().revision();
        let result = session(&gw, &source, &signer, &mut cache).await;
        let refused = matches!(
            &result,
            Err(FeedError::Refused(apply::Refusal::Shrink { .. }))
        );
        if let Err(e) = result {
            gw.metrics
                .source_errors
                .with_label_values(&[e.kind()])
                .inc();
            let text = e.to_string();
            if text != last_error {
                tracing::warn!(error = %e, revision = gw.table().revision(), "feed disconnected; serving the last good table");
                gw.audit(
                    Event::new("source.error", "gateway")
                        .with("kind", e.kind())
                        .with("error", text.clone()),
                );
                last_error = text;
            }
        }
        if refused {
            // Not a whole snapshot every few seconds while the table stays refused.
            follow::after_refusal(&gw).await;
            continue;
        }
        if gw.table().revision() > before {
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

/// Serve from the sealed local copy until the feed answers; its sync age continues from when
/// it was last synced. A copy that fails its seal is set aside loudly and the gateway fails
/// closed (no table) until the feed answers.
pub(crate) async fn load_cache(
    gw: &Arc<Gateway>,
    path: &std::path::Path,
    signer: &Signer,
) -> Option<CacheWriter> {
    let (p, s) = (path.to_owned(), signer.clone());
    let loaded = tokio::task::spawn_blocking(move || cache::load(&p, &s))
        .await
        .unwrap_or_else(|e| {
            Err(cache::CacheError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    match loaded {
        Ok(None) => None,
        Ok(Some((c, writer))) => {
            let built = apply::snapshot(&KeyTable::new(), c.log, c.rev, c.records);
            let Ok((table, _)) = built else { return None };
            let rev = table.revision();
            gw.install_table(table, false);
            gw.mark_synced_at(c.synced_ms);
            gw.metrics.table_revision.set(rev as i64);
            tracing::info!(revision = rev, log = %c.log, path = %path.display(), "serving the sealed local copy of the last feed table");
            Some(writer)
        }
        Err(e) => {
            gw.metrics.source_errors.with_label_values(&["cache"]).inc();
            let aside = cache::set_aside(path);
            tracing::error!(error = %e, set_aside = ?aside.as_ref().ok(), "local feed copy discarded; failing closed until the feed answers");
            gw.audit(
                Event::new("source.error", "gateway")
                    .with("kind", "cache")
                    .with("error", e.to_string()),
            );
            None
        }
    }
}

/// Connect with a bearer token (none when empty) and return the response (used for the feed,
/// usage reports and the JWKS of short-lived tokens).
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
    let mut req = Request::builder()
        .method(method)
        .uri(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(http::header::HOST, authority.as_str());
    // An empty token sends no credential (public resources such as the JWKS).
    if !token.is_empty() {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
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
    signer: &Signer,
    cache: &mut Option<CacheWriter>,
) -> Result<(), FeedError> {
    let url = source.url.as_str();
    let sep = if url.contains('?') { '&' } else { '?' };
    // Present the log and revision held (from memory or the sealed cache): the control plane
    // resumes when they match its log, and sends a whole snapshot when they do not.
    let nonce = fresh_nonce();
    let full = {
        let table = gw.table();
        if table.log().is_none() {
            format!("{url}{sep}nonce={nonce}")
        } else {
            format!(
                "{url}{sep}nonce={nonce}&log={}&after={}",
                table.log(),
                table.revision()
            )
        }
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
    let mut s = Session {
        gw,
        signer,
        log: None,
        snapshot: None,
        nonce,
        chain: None,
        cache,
        cache_path: &source.cache,
        touched_ms: unix_ms(),
    };
    let mut line_by = tokio::time::Instant::now() + IDLE_LIMIT;
    loop {
        let frame = match tokio::time::timeout_at(line_by, body.frame()).await {
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
            let raw = buf.split_to(nl + 1);
            let mut line: FeedLine = serde_json::from_slice(&raw[..nl])
                .map_err(|e| FeedError::BadLine(e.to_string()))?;
            line.check(&raw, &mut s.chain, s.signer, s.nonce.as_bytes())?;
            s.handle(line).await?;
            line_by = tokio::time::Instant::now() + IDLE_LIMIT;
        }
        if buf.len() > MAX_LINE {
            return Err(FeedError::BadLine(format!(
                "{} bytes without a newline",
                buf.len()
            )));
        }
    }
}

/// 16 random bytes as 32 hex digits: a recorded stream cannot be replayed to a new session.
fn fresh_nonce() -> String {
    let mut raw = [0u8; 16];
    let _ = getrandom::fill(&mut raw);
    crate::trace::to_hex(&raw)
}

impl Session<'_> {
    async fn handle(&mut self, line: FeedLine) -> Result<(), FeedError> {
        let gw = self.gw;
        match line {
            FeedLine::Resume { log, rev, .. } => {
                let table = gw.table();
                if log != table.log() {
                    return Err(FeedError::BadLine(format!(
                        "resume of log {log}, but this gateway holds log {}",
                        table.log()
                    )));
                }
                if rev < table.revision() {
                    return Err(FeedError::Rollback {
                        offered: rev,
                        applied: table.revision(),
                    });
                }
                self.log = Some(log);
            }
            FeedLine::SnapshotBegin { log, count, .. } => {
                self.log = Some(log);
                self.snapshot = Some((log, count, Vec::with_capacity(count.min(1 << 16))));
            }
            FeedLine::Record { record, .. } => {
                let log = self
                    .log
                    .ok_or_else(|| FeedError::BadLine("record before resume or snapshot".into()))?;
                self.signer.verify(log, &record)?;
                match &mut self.snapshot {
                    Some((_, count, records)) if records.len() >= *count => {
                        return Err(FeedError::BadLine(format!(
                            "snapshot holds more than the {count} records it announced"
                        )))
                    }
                    Some((_, _, records)) => records.push(*record),
                    None => self.live(log, *record).await?,
                }
            }
            FeedLine::SnapshotEnd { rev, .. } => {
                let Some((log, count, records)) = self.snapshot.take() else {
                    return Err(FeedError::BadLine(
                        "snapshot_end without snapshot_begin".into(),
                    ));
                };
                if records.len() != count {
                    return Err(FeedError::BadLine(format!(
                        "snapshot of {} records announced {count}",
                        records.len()
                    )));
                }
                let (table, out) = apply::snapshot(&gw.table(), log, rev, records)?;
                if let Err(refusal) = follow::shrink(gw, &table) {
                    if let apply::Refusal::Shrink { revoked_here, .. } = &refusal {
                        let obeyed = gw.table().versions_of(revoked_here);
                        self.persist(obeyed, None).await;
                    }
                    return Err(refusal.into());
                }
                follow::report_kept_revoked(gw, &out.kept_revoked);
                let keys = table.len();
                // The cache holds the table as enforced (revocations kept included).
                let mut enforced: Vec<KeyRecord> =
                    table.records().iter().map(|r| (**r).clone()).collect();
                enforced.sort_by_key(|r| r.rev);
                gw.install_table(table, true);
                gw.metrics.table_revision.set(rev as i64);
                tracing::info!(revision = rev, %log, keys, "feed snapshot applied");
                gw.audit(
                    Event::new("table.applied", "gateway")
                        .with("mode", "snapshot")
                        .with("log", log.to_string())
                        .with("revision", rev)
                        .with("keys", keys),
                );
                let (path, signer) = (self.cache_path.to_owned(), self.signer.clone());
                let now = unix_ms();
                let written = tokio::task::spawn_blocking(move || {
                    CacheWriter::create(&path, &signer, log, rev, &enforced, now)
                })
                .await;
                *self.cache = match written {
                    Ok(Ok(w)) => Some(w),
                    _ => {
                        tracing::warn!("could not write the local feed copy");
                        None
                    }
                };
                self.touched_ms = now;
            }
            FeedLine::Heartbeat { rev, time_ms, .. } => {
                let applied = gw.table().revision();
                if rev < applied {
                    return Err(FeedError::Rollback {
                        offered: rev,
                        applied,
                    });
                }
                gw.mark_synced();
                let now = unix_ms();
                if now - self.touched_ms >= CACHE_TOUCH_EVERY_MS {
                    self.touched_ms = now;
                    self.persist(vec![], Some((applied, now))).await;
                }
                let skew = (now - time_ms) as f64 / 1000.0;
                crate::sync::skew::observe(gw, skew, crate::sync::skew::Against::ControlPlane);
            }
        }
        Ok(())
    }

    /// A live record after the catch-up.
    async fn live(&mut self, log: LogId, record: KeyRecord) -> Result<(), FeedError> {
        let gw = self.gw;
        let table = gw.table();
        if record.rev <= table.revision() {
            return Ok(()); // a replay of something we have
        }
        let (rev, id) = (record.rev, record.id.clone());
        let out = apply::records(&table, log, vec![record], rev, &mut gw.counting())?;
        follow::observe(gw, &out);
        gw.mark_synced();
        gw.metrics.table_revision.set(rev as i64);
        let enforced = table.versions_of(std::slice::from_ref(&id));
        drop(table);
        let now = unix_ms();
        self.touched_ms = now;
        self.persist(enforced, Some((rev, now))).await;
        Ok(())
    }

    /// Append to (or touch) the sealed cache off the async workers. `heard`: the revision and
    /// time the feed was last heard in step at, or `None` for records obeyed without that (a
    /// refused snapshot's revocations). A cache that cannot be written is dropped (the next
    /// snapshot writes a new one): a stale cache is worse than none only if it is trusted, and
    /// a failed seal is never trusted.
    async fn persist(&mut self, records: Vec<KeyRecord>, heard: Option<(u64, i64)>) {
        let Some(mut writer) = self.cache.take() else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || {
            let r = match heard {
                Some((rev, now)) if records.is_empty() => writer.touch(rev, now),
                Some((rev, now)) => writer.append(&records, rev, now),
                None if records.is_empty() => Ok(()),
                None => writer.append_unsynced(&records),
            };
            r.map(|()| writer)
        })
        .await;
        match done {
            Ok(Ok(w)) => *self.cache = Some(w),
            _ => tracing::warn!("could not append to the local feed copy; it will be rewritten at the next snapshot"),
        }
    }
}
