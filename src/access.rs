//! The access line: one per request (target `keygate::access`, opt-in), written when the
//! response body is done, so it can carry the bytes actually sent and the whole latency.
//!
//! Cheap when off: `handle` asks `enabled()` once (a cached callsite check) and, when it is
//! false, builds no line, counts no bytes and wraps the body in a `None`. Fields are an
//! allow-list: the route's name (never the raw path), the canonical host, ids, sizes and
//! times; never a key or a client-sent header value.
//!
//! Where a line goes: the `keygate::access` tracing target (stderr, when the filter enables
//! it), the `[access_log]` file, and with the `otlp` feature one span per request. Cheap when
//! on, too: the file (`FileSink`) and stderr (`StderrWriter`, the subscriber's writer) each
//! have a bounded queue (`LineQueue`) to a writer thread that writes the lines in batches
//! gathered for `GATHER`, so no request waits for a disk or a pipe, or wakes a thread, for
//! its line. A full file queue drops and counts the line, a full stderr queue writes at once;
//! `SIGUSR1` reopens the file for `mv`-then-signal rotation; shutdown writes what is queued.
//! The stderr line is written in the subscriber's format (`subscriber` builds it) without
//! going through it, except with a terminal's colours: the same bytes, at less than half the
//! cost (`Line::stderr_line`).

use crate::keys::compact::KeyId;
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
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Whether access lines are wanted at all (`KEYGATE_LOG=…,keygate::access=info`).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
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
        finish_stderr(limit).await;
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
    pub key_id: Option<KeyId>,
    pub client_ip: IpAddr,
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
        let fields = self.fields(latency);
        if enabled() {
            match STDERR_STYLE.get() {
                Some(&style) => to_stderr(self.stderr_line(&fields, style)),
                None => self.trace_line(&fields),
            }
        }
        if let Some(file) = &self.sinks.file {
            file.send(self.json(&fields));
        }
        #[cfg(feature = "otlp")]
        if let Some(x) = &self.sinks.otlp {
            if self.trace.sampled() {
                x.export(self.span(latency));
            }
        }
    }

    /// What every format writes of the optional and derived values, in one place so that the
    /// formats cannot disagree: a missing value reads `-` (`none` for the route), times are
    /// whole microseconds.
    fn fields(&self, latency: Duration) -> Fields<'_> {
        Fields {
            request_id: self.request_id.to_str().unwrap_or("-"),
            host: self.host.as_deref().unwrap_or("-"),
            route: self.route.as_deref().unwrap_or("none"),
            key_id: self.key_id.as_deref().unwrap_or("-"),
            bytes_in: self.bytes_in.get(),
            upstream_us: self.upstream.map(|d| d.as_micros() as u64),
            latency_us: latency.as_micros() as u64,
        }
    }

    /// The file sink's line: the tracing line's fields with a `timestamp`, one JSON object.
    fn json(&self, f: &Fields<'_>) -> Vec<u8> {
        let line = JsonLine {
            bytes_in: f.bytes_in,
            bytes_out: self.bytes_out,
            client_ip: self.client_ip,
            host: f.host,
            key_id: f.key_id,
            latency_us: f.latency_us,
            method: self.method.as_str(),
            outcome: self.outcome,
            request_id: f.request_id,
            route: f.route,
            status: self.status,
            timestamp: crate::audit::timestamp_now(),
            trace_id: self.trace.trace_id,
            upstream_us: f.upstream_us,
        };
        let mut buf = Vec::with_capacity(384);
        // Serialising plain fields into a Vec cannot fail.
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
            key_id: self.key_id.as_deref().map(str::to_owned),
            upstream: self.upstream,
        }
    }

    fn trace_line(&self, f: &Fields<'_>) {
        tracing::info!(
            target: TARGET,
            request_id = f.request_id,
            method = %self.method,
            host = f.host,
            route = f.route,
            status = self.status,
            outcome = self.outcome,
            key_id = f.key_id,
            client_ip = %self.client_ip,
            trace_id = %self.trace.trace_id,
            bytes_in = f.bytes_in,
            bytes_out = self.bytes_out,
            upstream_us = f.upstream_us,
            latency_us = f.latency_us,
            "request",
        );
    }

    /// The line `trace_line` has the subscriber write, written here in the same bytes (a test
    /// holds the two to each other), without the subscriber's field visitor and `fmt`
    /// machinery: through them a line cost more than the file's line and its queue together.
    fn stderr_line(&self, f: &Fields<'_>, style: StderrStyle) -> Vec<u8> {
        let timestamp = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let mut buf = Vec::with_capacity(384);
        match style {
            StderrStyle::Plain => {
                use std::fmt::Write as _;
                let mut out = PlainLine(&mut buf);
                // `write!` into a Vec cannot fail.
                let _ = write!(out, "{timestamp}  INFO {TARGET}: request request_id=");
                out.debug_str(f.request_id);
                let _ = write!(out, " method={} host=", self.method);
                out.debug_str(f.host);
                out.0.extend_from_slice(b" route=");
                out.debug_str(f.route);
                out.0.extend_from_slice(b" status=");
                out.number(u64::from(self.status));
                out.0.extend_from_slice(b" outcome=");
                out.debug_str(self.outcome);
                out.0.extend_from_slice(b" key_id=");
                out.debug_str(f.key_id);
                out.0.extend_from_slice(b" client_ip=");
                out.0.extend_from_slice(
                    crate::ascii::IpText::default()
                        .ip(self.client_ip)
                        .as_bytes(),
                );
                let _ = write!(out, " trace_id={} bytes_in=", self.trace.trace_id);
                out.number(f.bytes_in);
                out.0.extend_from_slice(b" bytes_out=");
                out.number(self.bytes_out);
                if let Some(us) = f.upstream_us {
                    out.0.extend_from_slice(b" upstream_us=");
                    out.number(us);
                }
                out.0.extend_from_slice(b" latency_us=");
                out.number(f.latency_us);
            }
            StderrStyle::Json => {
                let line = TracingJsonLine {
                    timestamp,
                    level: "INFO",
                    message: "request",
                    request_id: f.request_id,
                    method: self.method.as_str(),
                    host: f.host,
                    route: f.route,
                    status: self.status,
                    outcome: self.outcome,
                    key_id: f.key_id,
                    client_ip: self.client_ip,
                    trace_id: self.trace.trace_id,
                    bytes_in: f.bytes_in,
                    bytes_out: self.bytes_out,
                    upstream_us: f.upstream_us,
                    latency_us: f.latency_us,
                    target: TARGET,
                };
                // Serialising plain fields into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut buf, &line);
            }
        }
        buf.push(b'\n');
        buf
    }
}

/// A line's values as every format writes them (`Line::fields`).
struct Fields<'a> {
    request_id: &'a str,
    host: &'a str,
    route: &'a str,
    key_id: &'a str,
    bytes_in: u64,
    upstream_us: Option<u64>,
    latency_us: u64,
}

/// The text of a plain (`--log-format human`, no colours) access line being written.
struct PlainLine<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for PlainLine<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl PlainLine<'_> {
    /// `s` as `{:?}` writes it (the subscriber's text for a `&str` field): quoted, and for
    /// the common case with nothing to escape, without the `fmt` machinery.
    fn debug_str(&mut self, s: &str) {
        use std::fmt::Write as _;
        if s.bytes()
            .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
        {
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            let _ = write!(self, "{s:?}");
        }
    }

    /// `n` in decimal, as `{}` writes it.
    fn number(&mut self, n: u64) {
        self.0
            .extend_from_slice(crate::ascii::Text::<20>::default().decimal(n).as_bytes());
    }
}

/// The JSON subscriber's access line (`--log-format json`: flattened, timestamp and level
/// first, target last), written from the `Line`'s borrowed fields in the subscriber's order.
#[derive(serde::Serialize)]
struct TracingJsonLine<'a> {
    #[serde(serialize_with = "as_text")]
    timestamp: humantime::Rfc3339Timestamp,
    level: &'static str,
    message: &'static str,
    request_id: &'a str,
    method: &'a str,
    host: &'a str,
    route: &'a str,
    status: u16,
    outcome: &'a str,
    key_id: &'a str,
    client_ip: IpAddr,
    #[serde(serialize_with = "as_text")]
    trace_id: crate::trace::TraceId,
    bytes_in: u64,
    bytes_out: u64,
    /// The subscriber leaves out a field whose value is `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_us: Option<u64>,
    latency_us: u64,
    target: &'static str,
}

/// The file sink's line as it is written: borrowed from the `Line`, serialised without a map
/// or a copy of any field. The fields are in alphabetical order, the order the lines have had
/// since they were a `serde_json` map (a test holds them to it): tools that read the file by
/// position, or diff it, see the same bytes.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    bytes_in: u64,
    bytes_out: u64,
    client_ip: IpAddr,
    host: &'a str,
    key_id: &'a str,
    latency_us: u64,
    method: &'a str,
    outcome: &'a str,
    request_id: &'a str,
    route: &'a str,
    status: u16,
    #[serde(serialize_with = "as_text")]
    timestamp: humantime::Rfc3339Timestamp,
    #[serde(serialize_with = "as_text")]
    trace_id: crate::trace::TraceId,
    upstream_us: Option<u64>,
}

/// A value as its `Display` text, written straight into the line (no `String` between).
fn as_text<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// How long the writer lets lines gather before writing them (`Writer::run`). Waking it for
/// every line, and writing each line alone, cost more than the rest of a request: at ~40,000
/// requests a second on one core, access lines added 12 µs a request to a file and 15 µs to
/// standard error (docs/performance.md, "Access lines off the request path"). A line reaches
/// its file at most this much later.
const GATHER: Duration = Duration::from_millis(10);

/// How often an idle writer looks at the reopen flag without a message.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// What the writer thread is asked to do.
enum Msg {
    Line(Vec<u8>),
    /// Look at the reopen flag (sent on SIGUSR1, after the lines queued before the signal;
    /// losing it to a full queue only delays the reopen: the writer also checks the flag after
    /// every batch and when idle).
    Wake,
    /// Write everything queued before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
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

/// A bounded queue of whole lines to one writer thread (`Writer`), which writes them in
/// batches: what both places access lines go to, the `[access_log]` file and standard error,
/// share. Sending never waits.
#[derive(Debug, Clone)]
struct LineQueue {
    tx: SyncSender<Msg>,
}

impl LineQueue {
    fn start(queue: usize, name: &str, writer: Writer) -> std::io::Result<LineQueue> {
        let (tx, rx) = sync_channel(queue.max(1));
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer.run(rx))?;
        Ok(LineQueue { tx })
    }

    /// Queue one line; the line comes back when the queue is full (the output is slower than
    /// the traffic) or the writer is gone.
    fn send(&self, line: Vec<u8>) -> Result<(), Vec<u8>> {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Line(l)) | TrySendError::Disconnected(Msg::Line(l))) => {
                Err(l)
            }
            Err(_) => Ok(()),
        }
    }

    /// Wait (up to `limit`) until every line queued so far is written.
    async fn flush(&self, limit: Duration) {
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

/// The `[access_log]` file: lines go through a `LineQueue`, appended through a buffer in
/// batches gathered for `GATHER`.
#[derive(Debug, Clone)]
pub struct FileSink {
    queue: LineQueue,
    reopen: Arc<AtomicBool>,
    dropped: prometheus::IntCounter,
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
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            out: BufWriter::with_capacity(BUFFER, Box::new(file)),
            file: Some(Reopen {
                path: path.to_owned(),
                asked: reopen.clone(),
            }),
        };
        Ok(FileSink {
            queue: LineQueue::start(queue, "keygate-access", writer)?,
            reopen,
            dropped,
        })
    }

    /// Queue one line; never waits. A full queue (the disk is slower than the traffic) drops it.
    fn send(&self, line: Vec<u8>) {
        if self.queue.send(line).is_err() {
            self.dropped.inc();
        }
    }

    /// Reopen the file by its path before the next line (SIGUSR1): after `mv access.log
    /// access.log.1`, lines written so far stay in the moved file, later ones go to a new one.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
        let _ = self.queue.tx.try_send(Msg::Wake);
    }

    /// Wait (up to `limit`) until every line queued so far is written.
    pub async fn flush(&self, limit: Duration) {
        self.queue.flush(limit).await;
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Bytes a writer gathers before it writes without waiting for the batch to end.
const BUFFER: usize = 64 * 1024;

/// The target of the tracing subscriber's access lines (`KEYGATE_LOG=…,keygate::access=info`).
pub const TARGET: &str = "keygate::access";

/// Standard error for the tracing subscriber (`main`): an event is written at once, as
/// before, except access lines (target `keygate::access`, one per request), which go through
/// a `LineQueue` to a writer thread, so a request does not pay a `write` to standard error
/// (and a wake-up of whatever reads it) for its line. A line still reaches standard error
/// whole, in one write with others; when the queue is full it is written at once instead, so
/// none is lost. `finish_stderr` writes what is queued at shutdown.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrWriter {
    type Writer = tracing_subscriber::fmt::writer::EitherWriter<std::io::Stderr, QueuedLine>;

    fn make_writer(&'a self) -> Self::Writer {
        tracing_subscriber::fmt::writer::EitherWriter::A(std::io::stderr())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        if meta.target() == TARGET {
            tracing_subscriber::fmt::writer::EitherWriter::B(QueuedLine(Vec::new()))
        } else {
            self.make_writer()
        }
    }
}

/// One access line as the subscriber formats it, queued whole when the subscriber is done.
#[derive(Debug)]
pub struct QueuedLine(Vec<u8>);

impl Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.0);
        if !line.is_empty() {
            to_stderr(line);
        }
    }
}

/// Queue a whole access line for standard error; write it at once when the queue is full or
/// its thread could not start, so that no line is lost.
fn to_stderr(line: Vec<u8>) {
    let refused = match stderr_queue() {
        Some(q) => q.send(line),
        None => Err(line),
    };
    if let Err(line) = refused {
        let _ = std::io::stderr().write_all(&line);
    }
}

/// The format of the process's stderr subscriber, for access lines written without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StderrStyle {
    /// `--log-format human` without colours (not a terminal, or `NO_COLOR`).
    Plain,
    /// `--log-format json`.
    Json,
}

/// Set by `subscriber` when access lines can be written without the subscriber (`Line::write`);
/// unset (a terminal's colours, or no subscriber of ours), they go through it.
static STDERR_STYLE: OnceLock<StderrStyle> = OnceLock::new();

/// The process's stderr subscriber (`main`), in the format the operator chose: events are
/// written at once, access lines through the stderr queue (`StderrWriter`), and unless the
/// text has colours, access lines are written in the subscriber's format without it
/// (`Line::stderr_line`).
pub fn subscriber(
    format: crate::cli::LogFormat,
    ansi: bool,
    filter: tracing_subscriber::EnvFilter,
) -> Box<dyn tracing::Subscriber + Send + Sync> {
    if let Some(style) = StderrStyle::of(format, ansi) {
        let _ = STDERR_STYLE.set(style);
    }
    fmt_subscriber(format, ansi, filter, StderrWriter)
}

impl StderrStyle {
    /// How access lines are written for a subscriber of `format`: `None` with a terminal's
    /// colours, which only the subscriber writes.
    fn of(format: crate::cli::LogFormat, ansi: bool) -> Option<StderrStyle> {
        match format {
            crate::cli::LogFormat::Json => Some(StderrStyle::Json),
            crate::cli::LogFormat::Human => (!ansi).then_some(StderrStyle::Plain),
        }
    }
}

/// The subscriber `subscriber` builds, writing to `writer` (a test's buffer, to hold
/// `Line::stderr_line` to the bytes the subscriber writes).
fn fmt_subscriber<W>(
    format: crate::cli::LogFormat,
    ansi: bool,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        crate::cli::LogFormat::Human => Box::new(builder.with_ansi(ansi).finish()),
        crate::cli::LogFormat::Json => {
            Box::new(builder.json().flatten_event(true).with_ansi(false).finish())
        }
    }
}

/// The standard-error queue, started with the first access line (a CLI command never
/// starts it); `None` when its thread cannot be started (lines are then written at once).
static STDERR: OnceLock<Option<LineQueue>> = OnceLock::new();

fn stderr_queue() -> Option<&'static LineQueue> {
    STDERR
        .get_or_init(|| {
            let writer = Writer {
                out: BufWriter::with_capacity(BUFFER, Box::new(WholeStderr)),
                file: None,
            };
            LineQueue::start(STDERR_QUEUE, "keygate-stderr", writer).ok()
        })
        .as_ref()
}

/// Standard error taken whole for each write: `BufWriter` hands over its gathered lines in
/// one `write`, and `Stderr::write_all` holds the lock until all of it is written, so an
/// event written at once by another thread never lands inside a line.
struct WholeStderr;

impl Write for WholeStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Access lines waiting for standard error.
const STDERR_QUEUE: usize = 16_384;

/// At shutdown: write the access lines queued for standard error, if any ever were (bounded
/// by `limit`).
async fn finish_stderr(limit: Duration) {
    if let Some(Some(q)) = STDERR.get() {
        q.flush(limit).await;
    }
}

/// A file writer's path and SIGUSR1 flag.
struct Reopen {
    path: PathBuf,
    asked: Arc<AtomicBool>,
}

/// The writer thread's state: its output behind a buffer, and for a file how to reopen it.
struct Writer {
    out: BufWriter<Box<dyn Write + Send>>,
    file: Option<Reopen>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Idle, wait for the first message (a timeout keeps a reopen flag from waiting
            // for the next line if its wake-up was lost).
            let first = match rx.recv_timeout(IDLE_CHECK) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.reopen_if_asked();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return self.flush(),
            };
            // Then let the burst gather: while this thread sleeps no sender has a receiver to
            // wake, so a busy gateway pays one wake-up and one `write` per `GATHER`, not one
            // of each per request.
            std::thread::sleep(GATHER);
            for msg in std::iter::once(first).chain(rx.try_iter()) {
                match msg {
                    Msg::Line(line) => self.write(&line),
                    // In queue order: a line queued before the signal goes to the moved file,
                    // one queued after it to the new one.
                    Msg::Wake => self.reopen_if_asked(),
                    Msg::Flush(done) => {
                        self.flush();
                        let _ = done.send(());
                    }
                }
            }
            self.flush();
            // A wake-up lost to a full queue: the flag is still set.
            self.reopen_if_asked();
        }
    }

    /// One whole line per `write_all` into the buffer: the buffer goes out only in whole
    /// lines, so a line is never split between two files or two writes.
    fn write(&mut self, line: &[u8]) {
        if let Err(e) = self.out.write_all(line) {
            self.failed(&e);
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.failed(&e);
        }
    }

    /// A file's write error is logged; standard error's cannot be (it is where the log goes).
    fn failed(&self, e: &std::io::Error) {
        if let Some(f) = &self.file {
            tracing::error!(path = %f.path.display(), error = %e, "access log write failed");
        }
    }

    /// Flush into the old file, then switch to a file newly opened at the configured path. If
    /// that fails the old file stays in use (nothing is lost) and the error is logged.
    fn reopen_if_asked(&mut self) {
        let Some(path) = self
            .file
            .as_ref()
            .filter(|f| f.asked.swap(false, Ordering::SeqCst))
            .map(|f| f.path.clone())
        else {
            return;
        };
        self.flush();
        match open_append(&path) {
            Ok(f) => {
                self.out = BufWriter::with_capacity(BUFFER, Box::new(f));
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "access log reopen failed; still writing the old file")
            }
        }
    }
}

/// The response body, counting what it hands to hyper when there is a line to write.
pub struct AccessBody {
    inner: Relay,
    line: Option<Box<Line>>,
}

/// Where the body's frames come from: the body itself, or the task relaying it to an HTTP/2
/// stream (`send_deadline::pump`). The large variant is every response's: boxing it would
/// allocate on every request to save bytes only an HTTP/2 response could use.
#[allow(clippy::large_enum_variant)]
enum Relay {
    Here(RespBody),
    Pumped(crate::send_deadline::Pumped),
}

impl AccessBody {
    pub fn new(inner: RespBody, line: Option<Box<Line>>) -> AccessBody {
        AccessBody {
            inner: Relay::Here(inner),
            line,
        }
    }

    /// The body of an HTTP/2 response, relayed so that a stream whose window the client keeps
    /// shut gives its upstream up and retires its connection (`send_deadline`). A body
    /// already whole stays as it is.
    pub fn pumped(
        mut self,
        after: std::time::Duration,
        cut: &prometheus::IntCounter,
        retire: Option<crate::lifetime::Retire>,
    ) -> AccessBody {
        use http_body_util::{Either, Full};
        if !matches!(&self.inner, Relay::Here(Either::Left(up)) if !up.is_end_stream()) {
            return self;
        }
        let taken = Relay::Here(Either::Right(Full::new(bytes::Bytes::new())));
        if let Relay::Here(Either::Left(upstream)) = std::mem::replace(&mut self.inner, taken) {
            self.inner = Relay::Pumped(crate::send_deadline::pump(
                upstream,
                after,
                cut.clone(),
                retire,
            ));
        }
        self
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
        let polled = match &mut self.inner {
            Relay::Here(body) => Pin::new(body).poll_frame(cx),
            Relay::Pumped(body) => Pin::new(body).poll_frame(cx),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(line)) = (&polled, self.line.as_mut()) {
            line.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Relay::Here(body) => body.is_end_stream(),
            Relay::Pumped(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Relay::Here(body) => body.size_hint(),
            Relay::Pumped(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::trace::{TraceContext, TraceId};

    fn line() -> Line {
        Line {
            request_id: HeaderValue::from_static("req-\"7\""),
            method: Method::POST,
            host: Some("api.example.com".into()),
            route: Some("orders".into()),
            status: 201,
            outcome: "ok",
            key_id: Some(KeyId::of("key_aaaaaaaaaaaaaaaaaaaaaaaaaa")),
            client_ip: "2001:db8::7".parse().unwrap(),
            started: Instant::now(),
            upstream: Some(Duration::from_micros(850)),
            bytes_in: BytesIn::default(),
            bytes_out: 512,
            trace: TraceContext {
                trace_id: TraceId([0xab; 16]),
                span_id: [1; 8],
                flags: 0,
                continued: false,
                parent: None,
            },
            sinks: Arc::new(Sinks::default()),
        }
    }

    /// A buffer the subscriber under test writes its events into.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// `line`'s access line as the subscriber of `format` (no colours) writes it, and as
    /// `stderr_line` writes it for that subscriber, each with its timestamp (`at` bytes in) cut
    /// out and checked.
    fn both_ways(line: &Line, format: crate::cli::LogFormat) -> [String; 2] {
        let style = StderrStyle::of(format, false).expect("no colours: written without it");
        let latency = Duration::from_micros(4321);
        let out = Captured::default();
        let filter = tracing_subscriber::EnvFilter::new("keygate::access=info");
        let subscriber = fmt_subscriber(format, false, filter, out.clone());
        let fields = line.fields(latency);
        tracing::subscriber::with_default(subscriber, || line.trace_line(&fields));
        let theirs = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let ours = String::from_utf8(line.stderr_line(&fields, style)).unwrap();
        let at = match style {
            StderrStyle::Plain => 0,
            StderrStyle::Json => r#"{"timestamp":""#.len(),
        };
        [theirs, ours].map(|text| {
            let ts = text.get(at..at + 27).unwrap_or_default();
            assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts:?} in {text}");
            format!("{}<ts>{}", &text[..at], &text[at + 27..])
        })
    }

    /// Access lines on standard error are written without the subscriber, in its format: the
    /// bytes must be the ones the subscriber writes, field for field, with and without the
    /// optional ones, and with values that need escaping.
    #[test]
    fn a_stderr_line_is_the_subscribers_own_bytes() {
        let mut bare = line();
        bare.key_id = None;
        bare.route = None;
        bare.host = None;
        bare.upstream = None;
        let mut odd = line();
        odd.host = Some("h\"o\\st\u{7}\u{1b}[31mé\u{301}\u{85}".into());
        odd.route = Some("back\\slash".into());
        odd.request_id = HeaderValue::from_static("");
        odd.status = 0;
        odd.bytes_out = u64::MAX;
        odd.client_ip = "10.0.0.1".parse().unwrap();
        for l in [line(), bare, odd] {
            for format in [crate::cli::LogFormat::Human, crate::cli::LogFormat::Json] {
                let [theirs, ours] = both_ways(&l, format);
                assert!(
                    theirs.contains("request"),
                    "the subscriber wrote it: {theirs:?}"
                );
                assert_eq!(ours, theirs, "{format:?}");
            }
        }
    }

    /// The line is written from borrowed fields, not a map: it must still be the bytes the map
    /// wrote (keys sorted, compact), so a reader of the file sees no change.
    #[test]
    fn a_file_line_has_the_fields_and_the_order_the_map_gave_it() {
        let full = line();
        let bytes = full.json(&full.fields(Duration::from_micros(1234)));
        let text = std::str::from_utf8(&bytes).unwrap();
        let body = text
            .strip_suffix('\n')
            .expect("one line, newline-terminated");
        assert!(!body.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        // Through a `serde_json` map (a BTreeMap: sorted keys) and back: the same bytes.
        assert_eq!(serde_json::to_string(&value).unwrap(), body);
        assert_eq!(value["request_id"], "req-\"7\"", "escaped, not cut");
        assert_eq!(value["method"], "POST");
        assert_eq!(value["client_ip"], "2001:db8::7");
        assert_eq!(value["key_id"], "key_aaaaaaaaaaaaaaaaaaaaaaaaaa");
        assert_eq!(value["trace_id"], "ab".repeat(16));
        assert_eq!(value["upstream_us"], 850);
        assert_eq!(value["latency_us"], 1234);
        assert_eq!(value["status"], 201);
        assert_eq!(value["bytes_out"], 512);
        let ts = value["timestamp"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");

        let mut bare = line();
        bare.key_id = None;
        bare.route = None;
        bare.host = None;
        bare.upstream = None;
        let value: serde_json::Value =
            serde_json::from_slice(&bare.json(&bare.fields(Duration::ZERO))).unwrap();
        assert_eq!(value["key_id"], "-");
        assert_eq!(value["route"], "none");
        assert_eq!(value["host"], "-");
        assert!(value["upstream_us"].is_null());
    }

    /// Lines from several threads, faster than the writer's gathering window: each reaches the
    /// file once and whole, without a flush being asked for, and none is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lines_sent_in_bursts_from_several_threads_all_reach_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let sink = Arc::new(FileSink::start(&path, 16_384, dropped.clone()).unwrap());
        let senders: Vec<_> = (0..3)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..3000 {
                        sink.send(format!("{{\"t\":{t},\"i\":{i}}}\n").into_bytes());
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 9000 || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(dropped.get(), 0);
        assert!(text.ends_with('\n'));
        let mut seen = std::collections::BTreeSet::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(seen.insert((v["t"].as_u64().unwrap(), v["i"].as_u64().unwrap())));
        }
        assert_eq!(seen.len(), 9000, "every line once");

        // A flush answers once what was queued before it is in the file.
        sink.send(b"{\"last\":true}\n".to_vec());
        sink.flush(Duration::from_secs(20)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("{\"last\":true}\n"));
    }
}
