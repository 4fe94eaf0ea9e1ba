//! The access line: one per request (target `keygate::access`, opt-in), written when the
//! response body is done, so it can carry the bytes actually sent and the whole latency.
//!
//! Cheap when off: `handle` asks `enabled()` once (a cached callsite check) and, when it is
//! false, builds no line, counts no bytes and wraps the body in a `None`. Fields are an
//! allow-list: the route's name (never the raw path), the canonical host, ids, sizes and
//! times; never a key or a client-sent header value.
//!
//! Where a line goes: the `keygate::access` tracing target (stderr, when the filter enables
//! it), the `[access_log]` file (`FileSink`: a bounded channel to a writer thread, so a slow
//! disk never holds a request; a full queue drops and counts the line; `SIGUSR1` reopens the
//! file for `mv`-then-signal rotation), and with the `otlp` feature one span per request.

use crate::pipeline::RespBody;
use bytes::Bytes;
use http::{HeaderValue, Method};
use hyper::body::{Body, Frame, SizeHint};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Whether access lines are wanted at all (`KEYGATE_LOG=…,keygate::access=info`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "keygate::access", tracing::Level::INFO)
}

/// Request body bytes read from the client, shared with the body streamed upstream.
#[derive(Debug, Clone, Default)]
pub struct BytesIn(Arc<AtomicU64>);

impl BytesIn {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `[access_log]` and `[otlp]` beyond what serde checks (called by `Snapshot::build`).
pub fn validate(c: &crate::config::Config) -> Result<(), crate::config::ConfigError> {
    if c.access_log.as_ref().is_some_and(|a| a.queue_lines == 0) {
        return Err(c.invalid("access_log.queue_lines", "must be at least 1"));
    }
    if let Some(o) = &c.otlp {
        #[cfg(feature = "otlp")]
        crate::otlp::validate(c, o)?;
        #[cfg(not(feature = "otlp"))]
        {
            let _ = o;
            return Err(c.invalid(
                "otlp",
                "this keygate was built without the `otlp` cargo feature (cargo build --features otlp)",
            ));
        }
    }
    Ok(())
}

/// Where finished lines go besides the tracing target: built once per gateway (a change needs
/// a restart, like `[redis]`).
#[derive(Debug, Default)]
pub struct Sinks {
    pub file: Option<FileSink>,
    #[cfg(feature = "otlp")]
    pub otlp: Option<crate::otlp::Exporter>,
}

impl Sinks {
    /// Start what `[access_log]` and `[otlp]` configure (paths resolved against the config).
    pub fn start(
        config: &crate::config::Config,
        metrics: &crate::metrics::Metrics,
    ) -> std::io::Result<Sinks> {
        let file = match &config.access_log {
            Some(a) => {
                let path = config.resolve(&a.path);
                let dropped = metrics.register_counter(
                    "keygate_access_log_lines_dropped_total",
                    "Access lines dropped because the access-log writer fell behind.",
                );
                let sink = FileSink::start(&path, a.queue_lines, dropped).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
                })?;
                Some(sink)
            }
            None => None,
        };
        Ok(Sinks {
            file,
            #[cfg(feature = "otlp")]
            otlp: config
                .otlp
                .as_ref()
                .map(|o| crate::otlp::Exporter::start(o, metrics)),
        })
    }

    /// Whether keygate records spans itself (then the traces it starts are sampled).
    pub fn records_spans(&self) -> bool {
        #[cfg(feature = "otlp")]
        if self.otlp.is_some() {
            return true;
        }
        false
    }

    /// Whether a line must be built even when the tracing target is off.
    pub fn wanted(&self) -> bool {
        #[cfg(feature = "otlp")]
        if self.otlp.is_some() {
            return true;
        }
        self.file.is_some()
    }

    /// At shutdown, after the drain: write what is queued (bounded by `limit`).
    pub async fn finish(&self, limit: Duration) {
        if let Some(f) = &self.file {
            f.flush(limit).await;
        }
        #[cfg(feature = "otlp")]
        if let Some(x) = &self.otlp {
            x.flush(limit).await;
        }
    }
}

/// Everything the line says, gathered by `handle`; written on drop of the response body.
#[derive(Debug)]
pub struct Line {
    pub request_id: HeaderValue,
    pub method: Method,
    pub host: Option<String>,
    pub route: Option<String>,
    pub status: u16,
    pub outcome: &'static str,
    pub key_id: Option<String>,
    pub client_ip: IpAddr,
    pub trace_id: String,
    pub started: Instant,
    pub upstream: Option<Duration>,
    pub bytes_in: BytesIn,
    pub bytes_out: u64,
    /// The request's place in its trace (ids for the span).
    pub trace: crate::trace::TraceContext,
    pub sinks: Arc<Sinks>,
}

impl Line {
    fn write(&self) {
        let latency = self.started.elapsed();
        if enabled() {
            self.trace_line(latency);
        }
        if let Some(file) = &self.sinks.file {
            file.send(self.json(latency));
        }
        #[cfg(feature = "otlp")]
        if let Some(x) = &self.sinks.otlp {
            if self.trace.sampled() {
                x.export(self.span(latency));
            }
        }
    }

    /// The file sink's line: the tracing line's fields with a `timestamp`, one JSON object.
    fn json(&self, latency: Duration) -> Vec<u8> {
        let line = serde_json::json!({
            "timestamp": crate::audit::now_rfc3339(),
            "request_id": self.request_id.to_str().unwrap_or("-"),
            "method": self.method.as_str(),
            "host": self.host.as_deref().unwrap_or("-"),
            "route": self.route.as_deref().unwrap_or("none"),
            "status": self.status,
            "outcome": self.outcome,
            "key_id": self.key_id.as_deref().unwrap_or("-"),
            "client_ip": self.client_ip.to_string(),
            "trace_id": self.trace_id,
            "bytes_in": self.bytes_in.get(),
            "bytes_out": self.bytes_out,
            "upstream_us": self.upstream.map(|d| d.as_micros() as u64),
            "latency_us": latency.as_micros() as u64,
        });
        let mut buf = Vec::with_capacity(384);
        // Serialising a `Value` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut buf, &line);
        buf.push(b'\n');
        buf
    }

    #[cfg(feature = "otlp")]
    fn span(&self, latency: Duration) -> crate::otlp::Span {
        let end = std::time::SystemTime::now();
        crate::otlp::Span {
            trace: self.trace,
            start: end.checked_sub(latency).unwrap_or(end),
            end,
            method: self.method.clone(),
            route: self.route.clone(),
            status: self.status,
            outcome: self.outcome,
            key_id: self.key_id.clone(),
            upstream: self.upstream,
        }
    }

    fn trace_line(&self, latency: Duration) {
        tracing::info!(
            target: "keygate::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            method = %self.method,
            host = self.host.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("none"),
            status = self.status,
            outcome = self.outcome,
            key_id = self.key_id.as_deref().unwrap_or("-"),
            client_ip = %self.client_ip,
            trace_id = %self.trace_id,
            bytes_in = self.bytes_in.get(),
            bytes_out = self.bytes_out,
            upstream_us = self.upstream.map(|d| d.as_micros() as u64),
            latency_us = latency.as_micros() as u64,
            "request",
        );
    }
}

/// What the writer thread is asked to do.
enum Msg {
    Line(Vec<u8>),
    /// Look at the reopen flag (sent on SIGUSR1; losing it to a full queue is harmless: the
    /// writer checks the flag before every line).
    Wake,
    /// Write everything queued before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The `[access_log]` file: lines go through a bounded channel to one writer thread that
/// appends them through a buffer, flushed whenever the queue runs empty.
#[derive(Debug, Clone)]
pub struct FileSink {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: prometheus::IntCounter,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Line(_) => "Line",
            Msg::Wake => "Wake",
            Msg::Flush(_) => "Flush",
        })
    }
}

impl FileSink {
    /// Open (create) the file and start the writer. An error here stops `serve`: a configured
    /// access log that cannot be written is a deployment mistake, not a runtime condition.
    pub fn start(
        path: &Path,
        queue: usize,
        dropped: prometheus::IntCounter,
    ) -> std::io::Result<FileSink> {
        let file = open_append(path)?;
        let (tx, rx) = sync_channel(queue.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.to_owned(),
            out: BufWriter::with_capacity(64 * 1024, file),
            reopen: reopen.clone(),
        };
        std::thread::Builder::new()
            .name("keygate-access".into())
            .spawn(move || writer.run(rx))?;
        Ok(FileSink {
            tx,
            reopen,
            dropped,
        })
    }

    /// Queue one line; never waits. A full queue (the disk is slower than the traffic) drops it.
    fn send(&self, line: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.inc();
        }
    }

    /// Reopen the file by its path before the next line (SIGUSR1): after `mv access.log
    /// access.log.1`, lines written so far stay in the moved file, later ones go to a new one.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// Wait (up to `limit`) until every line queued so far is written.
    pub async fn flush(&self, limit: Duration) {
        let tx = self.tx.clone();
        let waited = tokio::task::spawn_blocking(move || {
            let (done, answered) = std::sync::mpsc::channel();
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = answered.recv_timeout(limit);
            }
        });
        let _ = tokio::time::timeout(limit, waited).await;
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread's state: the open file behind its buffer.
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Drain without waiting; when the queue is empty, flush and then wait (a timeout
            // keeps a reopen flag from waiting for the next line if its wake-up was lost).
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(_) => {
                    self.flush();
                    self.reopen_if_asked();
                    match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return self.flush(),
                    }
                }
            };
            self.reopen_if_asked();
            match msg {
                Msg::Line(line) => self.write(&line),
                Msg::Wake => {}
                Msg::Flush(done) => {
                    self.flush();
                    let _ = done.send(());
                }
            }
        }
    }

    /// One whole line per `write_all` into the buffer: the buffer goes to the file only in
    /// whole lines, so a line is never split between two files.
    fn write(&mut self, line: &[u8]) {
        if let Err(e) = self.out.write_all(line) {
            tracing::error!(path = %self.path.display(), error = %e, "access log write failed");
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::error!(path = %self.path.display(), error = %e, "access log write failed");
        }
    }

    /// Flush into the old file, then switch to a file newly opened at the configured path. If
    /// that fails the old file stays in use (nothing is lost) and the error is logged.
    fn reopen_if_asked(&mut self) {
        if !self.reopen.swap(false, Ordering::SeqCst) {
            return;
        }
        self.flush();
        match open_append(&self.path) {
            Ok(f) => {
                self.out = BufWriter::with_capacity(64 * 1024, f);
                tracing::info!(path = %self.path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "access log reopen failed; still writing the old file")
            }
        }
    }
}

/// The response body, counting what it hands to hyper when there is a line to write.
pub struct AccessBody {
    inner: RespBody,
    line: Option<Box<Line>>,
}

impl AccessBody {
    pub fn new(inner: RespBody, line: Option<Box<Line>>) -> AccessBody {
        AccessBody { inner, line }
    }
}

/// hyper drops the body once it is sent, or when the client goes away mid-body: either way
/// the request is over and the line is due.
impl Drop for AccessBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.write();
        }
    }
}

impl Body for AccessBody {
    type Data = Bytes;
    type Error = <RespBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(line)) = (&polled, self.line.as_mut()) {
            line.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
