//! Recording upstream server with fault modes, standing in for the internal
//! service behind the gateway.
//!
//! Well-behaved modes (`Echo`, `Status`, `Slow`) are served by a real hyper
//! HTTP/1.1 server with keep-alive. Fault modes speak raw bytes on the socket
//! so they can misbehave in ways hyper would never allow. Every mode records
//! what it received (raw modes record the request head only).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Largest request head a raw-mode connection will buffer.
const MAX_HEAD: usize = 1024 * 1024;

/// How long a raw-mode connection keeps a socket open waiting for the peer
/// before giving up on its own (keeps stray tasks from living forever).
const RAW_HOLD: Duration = Duration::from_secs(60);

/// Behaviour of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200, `application/json` body `{"method","path","headers":{..},"body_len"}`.
    Echo,
    /// Like `Echo` but with this status.
    Status(u16),
    /// Records the request, waits this long, then answers like `Echo`.
    Slow(Duration),
    /// Accepts and reads but never answers (holds the socket until peer EOF).
    Blackhole,
    /// Writes `HTTP/1.1 200 OK\r\n` and then nothing more.
    SlowHeaders,
    /// Full head with `Content-Length: 100`, 10 body bytes, then stalls.
    StallBody,
    /// Head with `Content-Length: 100`, 10 body bytes, then a TCP RST.
    RstMidBody,
    /// 200 response carrying one 200 KiB header (`x-huge`), then closes.
    HugeHeaders,
    /// Response with both `Content-Length: 5` and `Transfer-Encoding: chunked`, then closes.
    BadFraming,
    /// Unsolicited `101 Switching Protocols` to any request, then holds the socket.
    Unasked101,
}

impl Mode {
    fn is_http(&self) -> bool {
        matches!(self, Mode::Echo | Mode::Status(_) | Mode::Slow(_))
    }
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Request target as sent (origin-form path and query).
    pub path_and_query: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Header names lowercased, values as raw bytes. Hyper-served modes give
    /// names in first-appearance order with repeated names' values grouped in
    /// wire order; raw modes give exact wire order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Full request body (always empty in raw fault modes).
    pub body: Vec<u8>,
    /// Address of the connecting peer (the gateway, or a test client).
    pub peer: SocketAddr,
    /// 1-based index of the accepted connection this request arrived on.
    pub conn: usize,
}

impl Recorded {
    /// All values of `name` (case-insensitive) joined with `", "`, or `None`.
    pub fn header(&self, name: &str) -> Option<String> {
        let all = self.header_all(name);
        if all.is_empty() {
            None
        } else {
            Some(all.join(", "))
        }
    }

    /// Every value of `name` (case-insensitive), in order, as lossy strings.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Set of (lowercase) header names present.
    pub fn header_names(&self) -> BTreeSet<String> {
        self.headers.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Body as a lossy string.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Decrements the open-connection gauge however the connection task ends
/// (including abort), so `open_connections()` never drifts.
struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Shared {
    records: Arc<Mutex<Vec<Recorded>>>,
    conns: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    mode: Arc<Mutex<Mode>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    /// Every byte the HTTP modes read from their peers (`Upstream::wire`).
    wire: Arc<Mutex<Vec<u8>>>,
}

/// A recording upstream on 127.0.0.1:0. Dropping it stops the listener and
/// aborts every connection it is serving.
pub struct Upstream {
    addr: SocketAddr,
    shared: Shared,
    accept_task: AbortHandle,
}

impl Upstream {
    /// Binds 127.0.0.1:0 and starts serving in `mode`.
    pub async fn start(mode: Mode) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream local_addr");
        let shared = Shared {
            records: Arc::default(),
            conns: Arc::default(),
            accepted: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            tasks: Arc::default(),
            wire: Arc::default(),
        };
        let s = shared.clone();
        // Runs until the Upstream is dropped (aborted) or the runtime ends.
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    // Transient accept errors (e.g. EMFILE) must not spin a core.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let conn = s.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                s.conns.fetch_add(1, Ordering::SeqCst);
                let guard = ConnGuard(Arc::clone(&s.conns));
                // Mode is sampled per connection for raw modes.
                let mode = s.mode.lock().expect("mode lock").clone();
                let s2 = s.clone();
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    if mode.is_http() {
                        serve_http(stream, peer, conn, mode, s2).await;
                    } else {
                        serve_raw(stream, peer, conn, mode, s2).await;
                    }
                });
                let mut tasks = s.tasks.lock().expect("tasks lock");
                // Forget finished tasks so the list stays bounded by open conns.
                tasks.retain(|t| !t.is_finished());
                tasks.push(task.abort_handle());
            }
        })
        .abort_handle();
        Upstream {
            addr,
            shared,
            accept_task,
        }
    }

    /// An address on which nothing listens (connections are refused): binds
    /// port 0, takes the address, and closes the listener.
    pub fn refused_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        l.local_addr().expect("local_addr")
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash), for gateway configs.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches mode. Raw fault modes apply to connections accepted after
    /// the call (note: a client's connect can complete before the upstream
    /// accepts, so sample points are accept time, not connect time); the HTTP
    /// modes (`Echo`/`Status`/`Slow`) are also re-read on every request of an
    /// already open keep-alive connection. Use [`Upstream::drop_connections`]
    /// to force the gateway onto fresh connections.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().expect("mode lock") = mode;
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode.lock().expect("mode lock").clone()
    }

    /// Snapshot of everything recorded so far.
    pub fn records(&self) -> Vec<Recorded> {
        self.shared.records.lock().expect("records lock").clone()
    }

    /// Most recent record, if any.
    pub fn last(&self) -> Option<Recorded> {
        self.shared
            .records
            .lock()
            .expect("records lock")
            .last()
            .cloned()
    }

    /// Number of requests recorded.
    pub fn count(&self) -> usize {
        self.shared.records.lock().expect("records lock").len()
    }

    /// Every byte the HTTP modes (`Echo`/`Status`/`Slow`) read from their peers, on every
    /// connection, as it came off the socket: heads, bodies and chunked framing with any
    /// trailer section, including what the parsed [`Recorded`] requests leave out (the first
    /// 4 MiB).
    pub fn wire(&self) -> Vec<u8> {
        self.shared.wire.lock().expect("wire lock").clone()
    }

    /// Forgets recorded requests (counters are kept).
    pub fn clear(&self) {
        self.shared.records.lock().expect("records lock").clear();
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.load(Ordering::SeqCst)
    }

    /// Connections accepted in total.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Abruptly closes every currently open connection (the listener stays up).
    pub fn drop_connections(&self) {
        for t in self.shared.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    /// Stops listening and closes all connections; the address then refuses.
    pub fn stop(&self) {
        self.accept_task.abort();
        self.drop_connections();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `Upstream::wire` keeps: the first 4 MiB read.
const WIRE_MAX: usize = 4 << 20;

/// A connection whose reads are also appended to the upstream's `wire` log.
struct Tap {
    stream: TcpStream,
    wire: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let mut wire = self.wire.lock().expect("wire lock");
            // Bounded: the load tests send far more than any test searches.
            let room = WIRE_MAX.saturating_sub(wire.len());
            wire.extend_from_slice(&read[..read.len().min(room)]);
        }
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn serve_http(stream: TcpStream, peer: SocketAddr, conn: usize, initial: Mode, s: Shared) {
    let stream = Tap {
        stream,
        wire: Arc::clone(&s.wire),
    };
    let svc = service_fn(move |req: Request<Incoming>| {
        let s = s.clone();
        let initial = initial.clone();
        async move {
            // Re-read per request so set_mode between HTTP modes also affects
            // pooled keep-alive connections; raw modes cannot take over a
            // hyper connection, so those keep the connection's initial mode.
            let current = s.mode.lock().expect("mode lock").clone();
            let mode = if current.is_http() { current } else { initial };

            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            let headers: Vec<(String, Vec<u8>)> = parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect();
            let rec = Recorded {
                method: parts.method.to_string(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| parts.uri.to_string()),
                version: format!("{:?}", parts.version),
                headers,
                body,
                peer,
                conn,
            };
            let echo = echo_json(&rec);
            s.records.lock().expect("records lock").push(rec);

            let status = match mode {
                Mode::Status(code) => code,
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    200
                }
                _ => 200,
            };
            let resp = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(echo)))
                .expect("build response");
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    // Errors (peer reset, malformed request) just end this connection.
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

fn echo_json(rec: &Recorded) -> String {
    let mut headers = serde_json::Map::new();
    for name in rec.header_names() {
        let value = rec.header(&name).unwrap_or_default();
        headers.insert(name, serde_json::Value::String(value));
    }
    serde_json::json!({
        "method": rec.method,
        "path": rec.path_and_query,
        "headers": headers,
        "body_len": rec.body.len(),
    })
    .to_string()
}

/// Reads up to and including `\r\n\r\n` (≤ 1 MiB). Returns the head bytes and whatever
/// came after them in the same reads (a body's start), or `None` on EOF/error/oversize.
pub async fn read_head(stream: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(RAW_HOLD, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_request_head(head: &[u8], peer: SocketAddr, conn: usize) -> Recorded {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path_and_query = parts.next().unwrap_or_default().to_string();
    let version = parts.next().unwrap_or_default().to_string();
    // Re-split the raw bytes so header values keep non-UTF-8 bytes intact.
    let mut headers = Vec::new();
    for raw in head.split(|&b| b == b'\n').skip(1) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            break;
        }
        if let Some(colon) = raw.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&raw[..colon]).to_ascii_lowercase();
            let value = raw[colon + 1..].trim_ascii().to_vec();
            headers.push((name, value));
        }
    }
    Recorded {
        method,
        path_and_query,
        version,
        headers,
        body: Vec::new(),
        peer,
        conn,
    }
}

/// Reads and discards until the peer closes (or RAW_HOLD passes), keeping
/// the socket open without ever answering.
async fn hold_until_eof(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(RAW_HOLD, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Writes `bytes`, half-closes, then waits for the peer's EOF so the close
/// is graceful (FIN, not RST) even if the peer sent more than we read.
async fn write_and_close(stream: &mut TcpStream, bytes: &[u8]) {
    if stream.write_all(bytes).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    hold_until_eof(stream).await;
}

async fn serve_raw(mut stream: TcpStream, peer: SocketAddr, conn: usize, mode: Mode, s: Shared) {
    // Bytes past the head (a body) are ignored in raw modes.
    let Some((head, _)) = read_head(&mut stream).await else {
        return;
    };
    let rec = parse_request_head(&head, peer, conn);
    s.records.lock().expect("records lock").push(rec);

    match mode {
        Mode::Blackhole => hold_until_eof(&mut stream).await,
        Mode::SlowHeaders => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
            hold_until_eof(&mut stream).await;
        }
        Mode::StallBody => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
            hold_until_eof(&mut stream).await;
        }
        Mode::RstMidBody => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
            // Zero linger turns the close into an RST instead of a FIN.
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Mode::HugeHeaders => {
            let mut resp = Vec::with_capacity(210 * 1024);
            resp.extend_from_slice(b"HTTP/1.1 200 OK\r\nx-huge: ");
            resp.resize(resp.len() + 200 * 1024, b'a');
            resp.extend_from_slice(b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            write_and_close(&mut stream, &resp).await;
        }
        Mode::BadFraming => {
            write_and_close(
                &mut stream,
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )
            .await;
        }
        Mode::Unasked101 => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                )
                .await;
            hold_until_eof(&mut stream).await;
        }
        Mode::Echo | Mode::Status(_) | Mode::Slow(_) => unreachable!("http modes use hyper"),
    }
}

/// An upstream that answers each request with a 64 MiB body and writes it until its peer goes
/// away (at most 4 connections). Returns its address, the count of connections it saw end,
/// and how many bytes it wrote.
pub async fn endless_upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    const CHUNK: usize = 64 * 1024;
    const LEN: usize = 64 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, written) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (e, w) = (ended.clone(), written.clone());
    tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (e, w) = (e.clone(), w.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|x| x == b"\r\n\r\n") && head.len() < 65_536 {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n");
                let chunk = vec![b'x'; CHUNK];
                if sock.write_all(reply.as_bytes()).await.is_ok() {
                    for _ in 0..LEN / CHUNK {
                        if sock.write_all(&chunk).await.is_err() {
                            break;
                        }
                        w.fetch_add(CHUNK, Ordering::SeqCst);
                    }
                }
                e.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, ended, written)
}
