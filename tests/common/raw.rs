//! Clients for talking to the gateway (or an [`Upstream`](super::Upstream)).
//!
//! - RAW1: [`raw_exchange`] and friends write literal bytes and capture the
//!   literal reply, for smuggling/framing/limit tests hyper would refuse to emit;
//!   [`RawOutcome::responses`] parses 0..n pipelined HTTP/1.1 responses.
//! - [`KeepAlive`]: one persistent hyper HTTP/1.1 connection, to prove that
//!   every request on an already open connection is re-authenticated.
//! - [`get`]/[`post`]/[`request`]: one-connection-per-call conveniences.
//! - [`h2_get`]: HTTP/2 with prior knowledge over plain TCP.
//!
//! Every operation is bounded by a timeout; failures panic with context.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::upstream::find;
use super::NET_TIMEOUT;

/// Upper bound on responses parsed from one capture (keeps parsing bounded).
const MAX_RESPONSES: usize = 10_000;

/// Options for [`raw_exchange_with`].
#[derive(Clone, Debug)]
pub struct RawOpts {
    /// Bind the client socket to this local IP first (e.g. 127.0.0.2).
    pub src_ip: Option<IpAddr>,
    /// Half-close (FIN) our write side after sending the bytes.
    pub shutdown_write: bool,
    /// Stop reading once this many complete responses have been parsed,
    /// instead of waiting for EOF (useful on keep-alive connections).
    pub stop_after: Option<usize>,
    /// Bound for the whole exchange (connect + write + read).
    pub timeout: Duration,
}

impl Default for RawOpts {
    fn default() -> Self {
        RawOpts {
            src_ip: None,
            shutdown_write: false,
            stop_after: None,
            timeout: NET_TIMEOUT,
        }
    }
}

/// What came back on a raw connection.
#[derive(Clone, Debug, Default)]
pub struct RawOutcome {
    /// Every byte received, verbatim.
    pub bytes: Vec<u8>,
    /// The server closed the connection (read returned EOF).
    pub eof: bool,
    /// The connection was reset (ECONNRESET) by the server.
    pub reset: bool,
    /// The deadline hit before EOF / `stop_after` responses.
    pub timed_out: bool,
    /// Writing our bytes failed (e.g. server closed early); reading continued.
    pub write_error: Option<String>,
    /// A read error other than reset.
    pub read_error: Option<String>,
    /// Our side's socket address (what the server sees as the peer).
    pub local_addr: Option<SocketAddr>,
}

impl RawOutcome {
    /// Parses 0..n pipelined HTTP/1.x responses (see [`parse_responses`]).
    pub fn responses(&self) -> Vec<RawResponse> {
        parse_responses(&self.bytes, self.eof || self.reset)
    }

    /// Status codes of the parsed responses, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.responses().iter().map(|r| r.status).collect()
    }

    /// The received bytes as a lossy string (for assertions and messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// True if the server ended the connection (EOF or reset).
    pub fn closed(&self) -> bool {
        self.eof || self.reset
    }
}

/// One parsed HTTP/1.x response.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// e.g. `HTTP/1.1`.
    pub version: String,
    /// Status code.
    pub status: u16,
    /// Reason phrase (may be empty).
    pub reason: String,
    /// Header names lowercased, values trimmed, in wire order.
    pub headers: Vec<(String, String)>,
    /// Decoded body (de-chunked when `Transfer-Encoding: chunked`).
    pub body: Vec<u8>,
    /// False if the body was cut short by the end of the capture.
    pub complete: bool,
}

impl RawResponse {
    /// All values of `name` (case-insensitive) joined with `", "`.
    pub fn header(&self, name: &str) -> Option<String> {
        let all = self.header_all(name);
        if all.is_empty() {
            None
        } else {
            Some(all.join(", "))
        }
    }

    /// Every value of `name` (case-insensitive), in wire order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Body as a lossy string.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses pipelined HTTP/1.x responses from `bytes`. Bodies honour (in RFC
/// 9112 precedence) 1xx/204/304 = none, `Transfer-Encoding: chunked`, then
/// `Content-Length`, else read-to-close (complete only if `closed`).
/// Parsing stops after a `101` (the rest is another protocol), at the first
/// incomplete response, or at bytes that are not a status line. Responses to
/// HEAD requests cannot be recognised here; avoid pipelining after a HEAD.
pub fn parse_responses(bytes: &[u8], closed: bool) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() && out.len() < MAX_RESPONSES {
        let rest = &bytes[pos..];
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut sl = status_line.splitn(3, ' ');
        let version = sl.next().unwrap_or_default().to_string();
        if !version.starts_with("HTTP/") {
            break;
        }
        let Some(status) = sl.next().and_then(|s| s.parse::<u16>().ok()) else {
            break;
        };
        let reason = sl.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                let (n, v) = l.split_once(':')?;
                Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        let body_bytes = &rest[head_end + 4..];
        let hdr = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let chunked = hdr("transfer-encoding")
            .last()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        let content_length = hdr("content-length")
            .first()
            .and_then(|v| v.trim().parse::<usize>().ok());

        let (body, consumed, complete) =
            if (100..200).contains(&status) || status == 204 || status == 304 {
                (Vec::new(), 0, true)
            } else if chunked {
                decode_chunked(body_bytes)
            } else if let Some(n) = content_length {
                let take = n.min(body_bytes.len());
                (body_bytes[..take].to_vec(), take, take == n)
            } else {
                (body_bytes.to_vec(), body_bytes.len(), closed)
            };
        out.push(RawResponse {
            version,
            status,
            reason,
            headers,
            body,
            complete,
        });
        if !complete || status == 101 {
            break;
        }
        pos += head_end + 4 + consumed;
    }
    out
}

/// Decodes a chunked body; returns (body, bytes consumed, complete).
fn decode_chunked(bytes: &[u8]) -> (Vec<u8>, usize, bool) {
    let mut body = Vec::new();
    let mut pos = 0;
    // Each iteration consumes at least one line, so this is bounded by len.
    while pos < bytes.len() {
        let Some(eol) = find(&bytes[pos..], b"\r\n") else {
            break;
        };
        let line = String::from_utf8_lossy(&bytes[pos..pos + eol]).into_owned();
        let size_str = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_str, 16) else {
            break;
        };
        pos += eol + 2;
        if size == 0 {
            // Trailer section: lines until an empty one.
            while pos <= bytes.len() {
                let Some(eol) = find(&bytes[pos..], b"\r\n") else {
                    return (body, pos, false);
                };
                pos += eol + 2;
                if eol == 0 {
                    return (body, pos, true);
                }
            }
            break;
        }
        if bytes.len() < pos + size + 2 {
            body.extend_from_slice(&bytes[pos..bytes.len().min(pos + size)]);
            return (body, bytes.len(), false);
        }
        body.extend_from_slice(&bytes[pos..pos + size]);
        pos += size + 2;
    }
    (body, pos, false)
}

/// Connects to `addr` (optionally from `src_ip`) within `timeout`; panics on failure.
pub async fn connect(src_ip: Option<IpAddr>, addr: SocketAddr, timeout: Duration) -> TcpStream {
    let fut = async {
        match src_ip {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(addr).await
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {addr} (from {src_ip:?}) failed: {e}"),
        Err(_) => panic!("connect {addr} timed out after {timeout:?}"),
    }
}

/// Writes `bytes` on `stream` and reads until EOF, reset, `opts.stop_after`
/// responses, or `opts.timeout`. Use with [`connect`] for multi-step scripts.
pub async fn exchange_on(stream: &mut TcpStream, bytes: &[u8], opts: &RawOpts) -> RawOutcome {
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut out = RawOutcome {
        local_addr: stream.local_addr().ok(),
        ..RawOutcome::default()
    };
    if !bytes.is_empty() {
        match tokio::time::timeout_at(deadline, stream.write_all(bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => out.write_error = Some(e.to_string()),
            Err(_) => {
                // The server stopped reading our bytes; report what we have.
                out.timed_out = true;
                out.write_error = Some("write timed out".into());
                return out;
            }
        }
    }
    if opts.shutdown_write && out.write_error.is_none() {
        let _ = stream.shutdown().await;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    // Bounded by the deadline: every read is under timeout_at.
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => {
                out.timed_out = true;
                break;
            }
            Ok(Ok(0)) => {
                out.eof = true;
                break;
            }
            Ok(Ok(n)) => {
                out.bytes.extend_from_slice(&chunk[..n]);
                if let Some(want) = opts.stop_after {
                    let done = parse_responses(&out.bytes, false)
                        .iter()
                        .filter(|r| r.complete)
                        .count();
                    if done >= want {
                        break;
                    }
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                out.reset = true;
                break;
            }
            Ok(Err(e)) => {
                out.read_error = Some(e.to_string());
                break;
            }
        }
    }
    out
}

/// Connects, writes `bytes` verbatim (no half-close), reads until EOF or `timeout`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> RawOutcome {
    raw_exchange_opts(addr, bytes, timeout, false).await
}

/// [`raw_exchange`] with an optional half-close of our write side after sending.
pub async fn raw_exchange_opts(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
    shutdown_write: bool,
) -> RawOutcome {
    let opts = RawOpts {
        shutdown_write,
        timeout,
        ..RawOpts::default()
    };
    raw_exchange_with(addr, bytes, &opts).await
}

/// [`raw_exchange`] from a client socket bound to `src_ip` (e.g. 127.0.0.2).
pub async fn raw_exchange_from(
    src_ip: IpAddr,
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> RawOutcome {
    let opts = RawOpts {
        src_ip: Some(src_ip),
        timeout,
        ..RawOpts::default()
    };
    raw_exchange_with(addr, bytes, &opts).await
}

/// [`raw_exchange`] that returns as soon as `n` complete responses arrived
/// (no need for `Connection: close` or waiting out the timeout).
pub async fn raw_exchange_n(
    addr: SocketAddr,
    bytes: &[u8],
    n: usize,
    timeout: Duration,
) -> RawOutcome {
    let opts = RawOpts {
        stop_after: Some(n),
        timeout,
        ..RawOpts::default()
    };
    raw_exchange_with(addr, bytes, &opts).await
}

/// Fully general raw exchange; `opts.timeout` bounds connect + write + read.
pub async fn raw_exchange_with(addr: SocketAddr, bytes: &[u8], opts: &RawOpts) -> RawOutcome {
    let start = tokio::time::Instant::now();
    let mut stream = connect(opts.src_ip, addr, opts.timeout).await;
    let rest = RawOpts {
        timeout: opts.timeout.saturating_sub(start.elapsed()),
        ..opts.clone()
    };
    exchange_on(&mut stream, bytes, &rest).await
}

/// Response triple returned by the hyper-based helpers.
pub type Resp = (u16, HeaderMap, Bytes);

/// Builds a request with `Host` set to `addr` unless `headers` provide one.
pub fn build_request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(Full::new(body)).expect("valid request");
    if !req.headers().contains_key(http::header::HOST) {
        let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
        req.headers_mut().insert(http::header::HOST, host);
    }
    req
}

/// One persistent HTTP/1.1 client connection (hyper `client::conn::http1`).
/// Every request goes over the same TCP connection, or fails if it closed.
pub struct KeepAlive {
    sender: SendRequest<Full<Bytes>>,
    conn: JoinHandle<()>,
    addr: SocketAddr,
    local: SocketAddr,
    /// Bound for each request (send + full body). Defaults to [`NET_TIMEOUT`].
    pub timeout: Duration,
}

impl KeepAlive {
    /// Opens a connection to `addr` and completes the HTTP/1 handshake.
    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        Self::open(None, addr).await
    }

    /// Like [`KeepAlive::connect`] with the socket bound to `src_ip` first.
    pub async fn connect_from(src_ip: IpAddr, addr: SocketAddr) -> KeepAlive {
        Self::open(Some(src_ip), addr).await
    }

    async fn open(src_ip: Option<IpAddr>, addr: SocketAddr) -> KeepAlive {
        let stream = connect(src_ip, addr, NET_TIMEOUT).await;
        let local = stream.local_addr().expect("local_addr");
        let (sender, conn) = super::within(
            "http1 handshake",
            NET_TIMEOUT,
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .expect("http1 handshake");
        // The connection future drives the socket; it ends when either side closes.
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        KeepAlive {
            sender,
            conn,
            addr,
            local,
            timeout: NET_TIMEOUT,
        }
    }

    /// Our local socket address (identifies this connection in server logs).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// True once the connection is closed (by either side) and unusable.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.conn.is_finished()
    }

    /// GET `path` with `headers` on this connection.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let req = build_request(Method::GET, self.addr, path, headers, Bytes::new());
        self.send(req).await
    }

    /// POST `body` to `path` with `headers` on this connection.
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let req = build_request(Method::POST, self.addr, path, headers, body.into());
        self.send(req).await
    }

    /// Sends `req` (adding `Host` if missing); panics on error or timeout.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Resp {
        match self.try_send(req).await {
            Ok(r) => r,
            Err(e) => panic!("keep-alive request failed: {e}"),
        }
    }

    /// Sends `req`; returns an error string if the connection failed/closed
    /// (for tests where the gateway is expected to close the connection).
    pub async fn try_send(&mut self, mut req: Request<Full<Bytes>>) -> Result<Resp, String> {
        if !req.headers().contains_key(http::header::HOST) {
            let host = HeaderValue::from_str(&self.addr.to_string()).expect("host header");
            req.headers_mut().insert(http::header::HOST, host);
        }
        let fut = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e}"))?;
            collect(resp).await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> Result<Resp, String> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((parts.status.as_u16(), parts.headers, body))
}

/// One-shot request on a fresh HTTP/1.1 connection; panics on error/timeout.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut ka = KeepAlive::connect(addr).await;
    let req = build_request(method, addr, path, headers, body.into());
    ka.send(req).await
}

/// One-shot GET on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(addr, Method::GET, path, headers, Bytes::new()).await
}

/// One-shot GET from a socket bound to `src_ip`.
pub async fn get_from(
    src_ip: IpAddr,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut ka = KeepAlive::connect_from(src_ip, addr).await;
    ka.get(path, headers).await
}

/// One-shot POST on a fresh HTTP/1.1 connection.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    request(addr, Method::POST, path, headers, body).await
}

/// HTTP/2 (prior knowledge, cleartext) GET on a fresh connection.
pub async fn h2_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    h2_request(addr, Method::GET, path, headers, Bytes::new()).await
}

/// HTTP/2 (prior knowledge, cleartext) request on a fresh connection.
pub async fn h2_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let stream = connect(None, addr, NET_TIMEOUT).await;
    let fut = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        // h2 needs :scheme and :authority, so use the absolute form.
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body.into())).expect("valid h2 request");
        sender.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("h2 send: {e}"))?;
        let r = collect(resp).await;
        conn.abort();
        r
    };
    match tokio::time::timeout(NET_TIMEOUT, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("h2 request to {addr}{path} failed: {e}"),
        Err(_) => panic!("h2 request to {addr}{path} timed out after {NET_TIMEOUT:?}"),
    }
}

/// Parses a response body as JSON; panics with the body text if it is not.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}
