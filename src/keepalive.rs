//! HTTP/1 keep-alive connections, plain or TLS, give their memory back between requests, as
//! nginx's do.
//!
//! hyper keeps an 8 KiB read buffer, an 8 KiB write buffer and its connection state for as long as
//! a connection lives. Measured here: an idle keep-alive connection cost 19.3 KiB, a connection
//! that had not sent a byte yet 1.2 KiB. So an HTTP/1 connection (plain, or TLS with `http/1.1`
//! chosen by ALPN: `Socket`) is served in cycles (`serve`): one hyper connection serves requests
//! until the socket has been idle between requests for `RELEASE_AFTER`; then `Cycled` reports end
//! of input to hyper, which finishes as if the client had closed, without shutting the socket down
//! (`without_shutdown`); hyper's state is dropped, and the socket waits for readiness alone, within
//! the idle limit (the header read timeout, which hyper applies to idle connections too). The next
//! request's first bytes start the next cycle, and a connection's first bytes its first.
//!
//! When the end of input is safe to report (`Cycle::releasable`): hyper must be between
//! messages with nothing of a next one buffered, or it would answer a half-read request with
//! an error. Two facts make it so:
//! - every response of the cycle has ended (its body returned its end, `Tracked`): hyper
//!   reads for the next head only after that, never mid-message with no body to read;
//! - the bytes hyper was given end exactly where the last request called ends, and nothing
//!   of another request follows it (`Framing`): each head ends at an empty line, and its body
//!   (`Content-Length`, as the call's request reports it) follows, stepped over by length,
//!   so an empty line or a whole request inside a body is not taken for a head end.
//!
//! A body whose end only its chunked coding tells, a burst of more pipelined requests or
//! empty lines than `Framing` holds before their calls are known, or an empty line after a
//! head (a line ending this count does not see) make the cycle simply not released. HTTP/2
//! connections are not cycled (they multiplex), nor TLS ones without ALPN `http/1.1`; a TLS
//! connection keeps rustls' session state and buffers through the idle wait.
//!
//! Between cycles the connection's bytes are read here, and a plain request at their start
//! (HTTP/1.1 with no body and nothing asking for more: `direct`) is served without hyper; the
//! first other request starts a cycle with the bytes as its prefix. A connection of plain
//! requests never holds hyper's state at all; it waits for its next bytes as a released one
//! does, holding no buffer (`next_bytes`).
//!
//! Two more things this file owns, both found while building the cycles: hyper checks its
//! header limit only while a head is incomplete, so `Cycled` cuts reads to keep a head within
//! `max_header_bytes` (`Framing::room`; after a body of known length too); and `release`
//! keeps nothing of hyper's connection (its `read_buf` is a view that would pin hyper's read
//! buffer), nor its box (`unbox`). What an idle connection keeps is then the socket's
//! registration (256 bytes), its task (256: `server::accept_loop`), the cycle's counters (160)
//! and `serve`'s future (576; the wait polls the socket's readiness rather than holding
//! `readable()`'s future). Measured with the allocator returning freed pages at once (the
//! harness's own figure moves by ±1 KiB with the allocator's state): 1.3–1.4 KiB per idle
//! connection, from 20.5 (docs/performance.md, "The emptied box"; `tests/protocol.rs` holds it
//! under 2).

use crate::deadline::Deadline;
use crate::send_deadline::SendDeadline;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// How long a connection idles between requests before hyper's state is dropped: long
/// enough that a busy connection (the next request within milliseconds) keeps its hyper
/// connection and pays nothing, short against keep-alive idle times (and the shorter, the
/// fewer hyper states are alive at once when many connections go idle together).
pub const RELEASE_AFTER: Duration = Duration::from_millis(50);

/// Calls whose body lengths a cycle keeps until the framing (`Framing`) has matched them to
/// their heads: more pipelined requests than this in one read, and the cycle is not released.
const RING: usize = 16;
/// Head ends the framing holds unmatched (a pipelined burst, or body bytes that look like an
/// empty line before their head's call is known); more, and the cycle is not released.
const PENDING: usize = 8;
/// Bytes of a connection's first read, before its first cycle (`serve`).
const FIRST_READ: usize = 1024;
/// The length of a body whose end only its own coding tells (chunked): the framing cannot
/// follow it, and the cycle is not released.
const UNFRAMED: u64 = u64::MAX;

/// What one cycle has seen, shared by the socket wrapper and the service wrapper.
#[derive(Debug, Default)]
pub struct Cycle {
    /// Requests the service was called with.
    calls: AtomicU32,
    /// Body length of call `n` at `n % RING` (0: none; `UNFRAMED`).
    lengths: [AtomicU64; RING],
    /// Responses whose body has ended.
    ended: AtomicU32,
    /// A request of this cycle had a body (sticky for the cycle).
    bodied: AtomicBool,
}

impl Cycle {
    fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.ended.store(0, Ordering::Relaxed);
        self.bodied.store(false, Ordering::Relaxed);
    }

    /// The service was called with a request whose body is `len` bytes (`UNFRAMED`).
    fn called(&self, len: u64) {
        // One caller at a time (hyper's HTTP/1 dispatcher): a load and a store suffice.
        let n = self.calls.load(Ordering::Relaxed);
        if len != 0 {
            self.bodied.store(true, Ordering::Relaxed);
        }
        self.lengths[n as usize % RING].store(len, Ordering::Relaxed);
        self.calls.store(n.wrapping_add(1), Ordering::Release);
    }

    /// The rule of this file: hyper may be told the input ended (module header). `framing`
    /// has matched every call made so far (`Cycled::poll_read` does that before it reads).
    fn releasable(&self, framing: &Framing) -> bool {
        let calls = self.calls.load(Ordering::Acquire);
        calls > 0 && framing.between_messages(calls) && self.ended.load(Ordering::Relaxed) == calls
    }
}

/// Where the messages in the bytes given to hyper end. A head ends at an empty line (LF,
/// optional CR, LF); its body, of the length the service's call reported, follows. Empty
/// lines are found as the bytes pass (`see`), before hyper has parsed anything, so they are
/// held (`ends`) until the call of their head tells how many body bytes to step over
/// (`match_calls`); an empty line inside a body is then dropped.
#[derive(Debug, Default)]
struct Framing {
    /// Bytes given to hyper in this cycle.
    delivered: u64,
    /// The last two bytes seen.
    last: [u8; 2],
    /// Unmatched empty lines: (offset of the line feed that opens it, offset just past it).
    ends: [(u64, u64); PENDING],
    pending: usize,
    /// Calls matched to their head ends.
    matched: u32,
    /// Where the last matched message ends: its head end plus its body length.
    boundary: u64,
    /// Bytes seen since the last empty line (`room`).
    since_end: usize,
    /// Seen what the framing cannot follow (module header): this cycle is not released.
    lost: bool,
}

impl Framing {
    /// Note the empty lines in `bytes`, which follow everything seen before. Only line feeds
    /// can end one, so the scan jumps from one to the next (memchr) instead of looking at
    /// every byte.
    fn see(&mut self, bytes: &[u8]) {
        let Some(&lastb) = bytes.last() else {
            return;
        };
        let mut after = None;
        for i in memchr::memchr_iter(b'\n', bytes) {
            // The byte `k` (1 or 2) before this one, reaching back into what came before.
            let back = |k: usize| {
                if i >= k {
                    bytes[i - k]
                } else {
                    self.last[2 + i - k]
                }
            };
            let opens = if back(1) == b'\n' {
                1
            } else if back(1) == b'\r' && back(2) == b'\n' {
                2
            } else {
                continue;
            };
            after = Some(i + 1);
            let end = self.delivered + i as u64 + 1;
            self.note(end - 1 - opens, end);
        }
        self.since_end = match after {
            Some(a) => bytes.len() - a,
            None => self.since_end.saturating_add(bytes.len()),
        };
        self.delivered += bytes.len() as u64;
        self.last = match bytes.len() {
            1 => [self.last[1], lastb],
            _ => [bytes[bytes.len() - 2], lastb],
        };
    }

    /// Hold an empty line from `lf` to `end`, unless it lies in a body already stepped over.
    fn note(&mut self, lf: u64, end: u64) {
        if lf < self.boundary {
            return;
        }
        match self.ends.get_mut(self.pending) {
            Some(slot) => {
                *slot = (lf, end);
                self.pending += 1;
            }
            None => self.lost = true,
        }
    }

    /// Match the calls made since last time to the empty lines that end their heads, in
    /// order, and step over their bodies.
    fn match_calls(&mut self, cycle: &Cycle) {
        let calls = cycle.calls.load(Ordering::Acquire);
        while !self.lost && self.matched != calls {
            let len = cycle.lengths[self.matched as usize % RING].load(Ordering::Relaxed);
            let unmatched = calls.wrapping_sub(self.matched) as usize;
            // Not seen yet cannot happen (hyper parses only bytes it was given): lost too.
            if unmatched > RING || len == UNFRAMED || self.pending == 0 {
                self.lost = true;
                return;
            }
            let (_, end) = self.ends[0];
            self.boundary = end.saturating_add(len);
            self.matched = self.matched.wrapping_add(1);
            // Drop the matched end and every one inside the body just stepped over.
            let keep = self.ends[..self.pending]
                .iter()
                .position(|&(lf, _)| lf >= self.boundary)
                .unwrap_or(self.pending);
            self.ends.copy_within(keep..self.pending, 0);
            self.pending -= keep;
        }
    }

    /// The most the next read may give hyper so that the head being read stays within
    /// `max_head` (at least 1), or `None` for no limit. Inside a body of known length: the
    /// rest of the body and `max_head` more; otherwise the head began at the last empty line
    /// or the last message's end, whichever came later. Once the framing is lost, the head
    /// is taken to begin at the last empty line while no request of the cycle had a body
    /// (`bodied`), and reads are not cut after one had (inside a body of unknown place, a
    /// cut would read it a byte at a time).
    fn room(&self, max_head: usize, bodied: bool) -> Option<usize> {
        let head = if self.lost {
            if bodied {
                return None;
            }
            self.since_end
        } else {
            match self.boundary.checked_sub(self.delivered) {
                Some(body) if body > 0 => {
                    let body = usize::try_from(body).unwrap_or(usize::MAX);
                    return Some(body.saturating_add(max_head));
                }
                _ => (self.delivered - self.boundary).min(self.since_end as u64) as usize,
            }
        };
        Some(max_head.saturating_sub(head).max(1))
    }

    /// Every one of `calls` messages has been given to hyper whole, and nothing after them:
    /// hyper is between messages with nothing of a next one in its buffer.
    fn between_messages(&self, calls: u32) -> bool {
        !self.lost && self.matched == calls && self.pending == 0 && self.delivered == self.boundary
    }
}

/// A connection served in cycles: a plain TCP stream or a TLS stream over one. Between cycles
/// it waits for the client's next bytes with nothing of hyper's held.
pub trait Socket: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// Ready once the client has sent more (or closed). Called only after a read has found
    /// nothing buffered above the TCP socket (hyper was given all it had), so the socket's
    /// readiness is the stream's. A poll, not a future: the wait for it is the state every
    /// idle connection keeps, and `TcpStream::readable`'s future is 152 bytes of it where
    /// this keeps the waker in the socket's own registration.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Socket for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl Socket for SendDeadline<TcpStream> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
    }
}

impl Socket for tokio_rustls::server::TlsStream<SendDeadline<TcpStream>> {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_ref().0.get_ref().poll_read_ready(cx)
    }
}

/// The socket as one cycle's hyper connection sees it: bytes left over from the last cycle
/// first, then the stream; end of input once the cycle is releasable and idle.
pub struct Cycled<T> {
    stream: T,
    /// `[server] max_header_bytes`: see `poll_read`.
    max_head: usize,
    prefix: Bytes,
    cycle: Arc<Cycle>,
    framing: Framing,
    /// When the socket was first found idle with the cycle releasable.
    idle_since: Option<Instant>,
    wake: Option<Deadline>,
    released: bool,
}

impl<T> Cycled<T> {
    fn new(stream: T, max_head: usize, prefix: Bytes, cycle: Arc<Cycle>) -> Cycled<T> {
        cycle.reset();
        Cycled {
            stream,
            max_head,
            prefix,
            cycle,
            framing: Framing::default(),
            idle_since: None,
            wake: None,
            released: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cycled<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let chunk = this.prefix.split_to(n);
            this.framing.see(&chunk);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        // hyper checks its header limit (`max_buf_size`) only while a head is incomplete, so
        // a head that arrives whole in one large read passes it. A read is cut so that the
        // head being read never exceeds `max_head` (`Framing::room`): hyper then sees an
        // incomplete head at the limit and answers 431.
        this.framing.match_calls(&this.cycle);
        let room = this
            .framing
            .room(this.max_head, this.cycle.bodied.load(Ordering::Relaxed));
        let before = buf.filled().len();
        let read = if let Some(room) = room.filter(|r| *r < buf.remaining()) {
            let mut cut = ReadBuf::new(buf.initialize_unfilled_to(room));
            match Pin::new(&mut this.stream).poll_read(cx, &mut cut) {
                Poll::Ready(Ok(())) => {
                    let n = cut.filled().len();
                    buf.advance(n);
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        } else {
            Pin::new(&mut this.stream).poll_read(cx, buf)
        };
        match read {
            Poll::Ready(Ok(())) => {
                this.framing.see(&buf.filled()[before..]);
                this.idle_since = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.cycle.releasable(&this.framing) => {
                let now = Instant::now();
                let since = *this.idle_since.get_or_insert(now);
                let at = since + RELEASE_AFTER;
                let wake = this.wake.get_or_insert_with(|| Deadline::at(at));
                wake.reset(at);
                if Pin::new(wake).poll(cx).is_ready() {
                    this.released = true;
                    // Zero bytes: end of input, between messages.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

/// `AsyncWrite` for a read-watching wrapper (`Cycled` here, `server::SniffDeadline`): every
/// write goes straight to the wrapped stream, the field `$field`.
macro_rules! forward_write {
    ([$($gen:tt)*] $ty:ty, $field:ident) => {
        impl<$($gen)*> tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use forward_write;

forward_write!([T: tokio::io::AsyncWrite + Unpin] Cycled<T>, stream);

/// The request path's service, counting for the cycle: calls, bodies, ended responses.
pub struct Counted<S> {
    inner: S,
    cycle: Arc<Cycle>,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Unpin,
{
    type Response = http::Response<Tracked<B>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let body = req.body();
        let len = if body.is_end_stream() {
            0
        } else {
            body.size_hint().exact().unwrap_or(UNFRAMED)
        };
        self.cycle.called(len);
        CountedFuture {
            inner: self.inner.call(req),
            cycle: Some(self.cycle.clone()),
        }
    }
}

/// The request path's future; its response's body reports its end to the cycle.
pub struct CountedFuture<F> {
    inner: F,
    cycle: Option<Arc<Cycle>>,
}

impl<F, B, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>> + Unpin,
{
    type Output = Result<http::Response<Tracked<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        let cycle = self.cycle.take().unwrap_or_default();
        Poll::Ready(res.map(|r| {
            r.map(|body| Tracked {
                inner: body,
                cycle,
                counted: AtomicBool::new(false),
            })
        }))
    }
}

/// A response body that tells the cycle when it has ended, once (hyper learns the end either
/// from `poll_frame` or, for a body it never polls, from `is_end_stream`). A body dropped
/// before its end never counts: hyper is then closing the connection anyway.
pub struct Tracked<B> {
    inner: B,
    cycle: Arc<Cycle>,
    counted: AtomicBool,
}

impl<B> Tracked<B> {
    fn end(&self) {
        if !self.counted.swap(true, Ordering::Relaxed) {
            self.cycle.ended.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.end();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/1 for certain from the first bytes of a plain connection (peeked: they stay in the
/// socket), within `limit`. `Some(false)`: the bytes begin like the HTTP/2 preface (or are
/// too few to tell), so the connection goes the way it always went (hyper-util's `auto`
/// builder, with its sniffing deadline); `None`: closed, failed or silent past `limit`.
pub async fn is_http1(stream: &TcpStream, limit: Duration) -> Option<bool> {
    let mut first = [0u8; 24];
    let peeked = crate::deadline::timeout(limit, stream.peek(&mut first)).await;
    match peeked {
        Ok(Ok(n)) if n > 0 => Some(!crate::server::H2_PREFACE.starts_with(&first[..n])),
        _ => None,
    }
}

/// What every connection served in cycles shares.
#[derive(Debug)]
pub struct Cycles {
    /// hyper's HTTP/1 builder, with the listener's limits (`server::http1_builder`).
    pub h1: hyper::server::conn::http1::Builder,
    /// `[server] max_header_bytes` (`Framing::room`; `direct`).
    pub max_head: usize,
    /// `[server] max_headers` (`direct`).
    pub max_headers: usize,
    /// How long a connection may idle before its next request (`[server]
    /// header_read_timeout_ms`, which hyper applies to idle connections too; the server's
    /// protocol sniffing is bounded by it as well).
    pub idle: Duration,
    /// `keygate_connections_released_total`.
    pub released: prometheus::IntCounter,
    /// `keygate_protocol_errors_total`.
    pub errors: crate::protocol_errors::ProtocolErrors,
}

/// What `serve` serves a connection with: the service hyper calls, and that may serve plain
/// requests itself, without hyper (`direct`). One value for both ways, so a connection keeps
/// the gateway and its facts once.
pub trait Service: hyper::service::Service<http::Request<Incoming>> {
    /// How plain requests are served without hyper; `None`: every request is hyper's.
    fn direct(&self) -> Option<&crate::direct::ConnService>;
}

impl Service for crate::direct::ConnService {
    fn direct(&self) -> Option<&crate::direct::ConnService> {
        Some(self)
    }
}

/// Serve one HTTP/1 connection (plain, or TLS with HTTP/1.1 chosen by ALPN) in cycles (module
/// header) until it closes, fails, idles past `idle` or `stop` asks (then: close after the
/// in-flight response, as `server::drive` does). Between cycles, plain requests are served
/// without hyper when the service can (`Service::direct`); the first other one starts a cycle.
pub async fn serve<T, S, B>(
    mut stream: T,
    service: S,
    cycles: Arc<Cycles>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: Service<Response = http::Response<B>> + Unpin,
    S::Future: Unpin + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: Socket,
{
    let cycle = Arc::new(Cycle::default());
    let mut service = Counted {
        inner: service,
        cycle: cycle.clone(),
    };
    // The first cycle, like every later one, starts on the client's first bytes: a connection
    // that has sent nothing yet holds no hyper state (a TLS one comes here right after its
    // handshake). Waited for within the idle limit, as hyper's header timeout would.
    let Some((mut prefix, mut full)) = next_bytes(&mut stream, &mut stop, cycles.idle, false).await
    else {
        return;
    };
    loop {
        if let Some(direct) = service.inner.direct() {
            loop {
                // The request is moved into its boxed exchange in this block, so nothing of it
                // has a place in this (idle connection's) future.
                let exchange = match direct.take(&prefix, cycles.max_head, cycles.max_headers) {
                    Some(plain) => {
                        prefix.advance(plain.len);
                        direct.exchange(plain, &stop, &mut stream)
                    }
                    None => break,
                };
                match exchange.await {
                    crate::direct::After::Close => return,
                    crate::direct::After::Keep => {}
                    crate::direct::After::Read(ahead) => {
                        full = filled(&ahead);
                        prefix = ahead;
                    }
                }
                if prefix.is_empty() {
                    // Nothing of the connection's bytes is kept while it waits for more.
                    drop(std::mem::take(&mut prefix));
                    match next_bytes(&mut stream, &mut stop, cycles.idle, !full).await {
                        Some(next) => (prefix, full) = next,
                        None => return,
                    }
                }
            }
        }
        let io = Cycled::new(stream, cycles.max_head, prefix, cycle.clone());
        // Boxed: this future lives as long as the connection, idle or not, and hyper's
        // connection (~1 KiB inline) would otherwise keep its place in it while idle.
        let mut conn = Box::new(
            cycles
                .h1
                .serve_connection(hyper_util::rt::TokioIo::new(io), service),
        );
        let done = if *stop.borrow() {
            None
        } else {
            tokio::select! {
                r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => Some(r),
                _ = stop.changed() => None,
            }
        };
        match done {
            Some(Ok(())) => {}
            Some(Err(e)) => return cycles.errors.count(&e),
            None => {
                Pin::new(&mut *conn).graceful_shutdown();
                if let Err(e) = conn.await {
                    cycles.errors.count(&e);
                }
                return;
            }
        }
        match release(unbox(conn).into_parts()) {
            Some(kept) => (stream, prefix, service) = kept,
            // The client closed its side: dropping the socket closes ours.
            None => return,
        }
        cycles.released.inc();
        if prefix.is_empty() {
            // hyper was given all the stream had: the socket's readiness is the stream's.
            let idle = cycles.idle.saturating_sub(RELEASE_AFTER);
            match next_bytes(&mut stream, &mut stop, idle, true).await {
                Some(next) => (prefix, full) = next,
                None => return,
            }
        }
    }
}

/// The client's next bytes, within `limit`, and whether they filled the buffer (then more may
/// be buffered above the socket, in TLS: the next call must read at once, `wait` false). With
/// `wait`, the socket's readiness comes first: the buffer is taken only once the socket is
/// ready and dropped again if the read must wait after all, so a connection waiting here
/// holds none (this is the state every idle connection keeps). `None`: closed, failed, silent
/// past `limit`, or `stop` asked.
async fn next_bytes<T: Socket>(
    stream: &mut T,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    limit: Duration,
    mut wait: bool,
) -> Option<(Bytes, bool)> {
    let read = std::future::poll_fn(|cx| poll_next_bytes(stream, cx, &mut wait));
    match unless_stopped(stop, limit, read).await {
        Some(Ok(bytes)) if !bytes.is_empty() => {
            let full = filled(&bytes);
            Some((bytes, full))
        }
        _ => None,
    }
}

/// Whether a read filled its buffer: then TLS may hold more above the socket, and the next
/// read must not wait for the socket's readiness (`next_bytes`).
fn filled(read: &Bytes) -> bool {
    read.len() == FIRST_READ
}

/// One poll for the client's next bytes (empty: the client closed), the readiness first when
/// `wait` (`next_bytes`); also how a plain request in flight notices its client leave
/// (`direct`).
pub(crate) fn poll_next_bytes<T: Socket>(
    stream: &mut T,
    cx: &mut Context<'_>,
    wait: &mut bool,
) -> Poll<std::io::Result<Bytes>> {
    if *wait {
        std::task::ready!(stream.poll_readable(cx))?;
    }
    let mut buf = bytes::BytesMut::with_capacity(FIRST_READ);
    match tokio_util::io::poll_read_buf(Pin::new(stream), cx, &mut buf) {
        Poll::Ready(read) => Poll::Ready(read.map(|_| buf.freeze())),
        Poll::Pending => {
            *wait = true;
            Poll::Pending
        }
    }
}

/// What `fut` gives within `limit`; `None` when the limit passes or `stop` asks first (the
/// waits for a client's next bytes, before the first cycle and between cycles).
async fn unless_stopped<F: Future>(
    stop: &mut tokio::sync::watch::Receiver<bool>,
    limit: Duration,
    fut: F,
) -> Option<F::Output> {
    tokio::select! {
        r = crate::deadline::timeout(limit, fut) => r.ok(),
        _ = stop.changed() => None,
    }
}

/// The box's contents, the box freed now. Moved out in place (`conn.into_parts()` on the
/// box), the contents leave an empty box that is freed only where its variable goes out of
/// scope: in `serve`, after the idle wait, so every idle connection kept hyper's connection's
/// 976 bytes (measured, `perf probe` on the allocator). `server::Accepted::settle` takes its
/// own box the same way: an HTTP/2 connection is served inside it to the end, and kept the
/// emptied box that long. Taking the box is the point, hence the lint's allowance.
#[allow(clippy::boxed_local)]
pub(crate) fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// What an idle connection keeps of a finished cycle: the socket, a copy of any bytes hyper
/// had read past the last request (normally none) and the service; `None` when the cycle
/// ended because the client closed. Everything else of hyper's connection is dropped on
/// return, its read buffer too: `read_buf` is a view of it, so keeping that view (or any
/// part of `parts`) through the idle wait would keep the buffer's touched pages (measured:
/// 4.2 KiB per idle connection).
fn release<T, S>(
    parts: hyper::server::conn::http1::Parts<hyper_util::rt::TokioIo<Cycled<T>>, S>,
) -> Option<(T, Bytes, S)> {
    let io = parts.io.into_inner();
    io.released.then(|| {
        (
            io.stream,
            Bytes::copy_from_slice(&parts.read_buf),
            parts.service,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Give `chunks` to a framing, then report calls with body lengths `lens`: whether the
    /// cycle is between messages, and the bytes since the last empty line.
    fn framed(chunks: &[&[u8]], lens: &[u64]) -> (bool, usize) {
        let (mut f, cycle) = (Framing::default(), Cycle::default());
        for c in chunks {
            f.see(c);
        }
        for &len in lens {
            cycle.called(len);
        }
        f.match_calls(&cycle);
        (f.between_messages(lens.len() as u32), f.since_end)
    }

    /// `framed` for every split of `bytes` into three chunks, which must all agree.
    fn split_anyhow(bytes: &[u8], lens: &[u64]) -> (bool, usize) {
        let whole = framed(&[bytes], lens);
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let parts: [&[u8]; 3] = [&bytes[..i], &bytes[i..j], &bytes[j..]];
                assert_eq!(framed(&parts, lens), whole, "{i} {j}");
            }
        }
        whole
    }

    #[test]
    fn messages_are_framed_however_the_bytes_are_split() {
        let two: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\nHost: a\n\n";
        assert_eq!(split_anyhow(two, &[0, 0]), (true, 0));
        // Only one of the two called yet: the second head is still in hyper's buffer.
        assert!(!framed(&[two], &[0]).0);
        let partial = [two, b"GET /c".as_slice()].concat();
        assert_eq!(split_anyhow(&partial, &[0, 0]), (false, 6));
        // A body, with empty lines in it, is stepped over by its length; so is a head after.
        let post: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 8\r\n\r\nab\r\n\r\ncd";
        assert!(split_anyhow(post, &[8]).0);
        let post_get = [post, b"GET / HTTP/1.1\r\n\r\n".as_slice()].concat();
        assert!(split_anyhow(&post_get, &[8, 0]).0);
        assert!(
            !framed(&[&post[..post.len() - 1]], &[8]).0,
            "body not all given"
        );
        assert!(!framed(&[post], &[6]).0, "bytes past the body");
        // A body as long as hyper's read, all of it empty lines: more than `PENDING` held
        // before the call is known, so the cycle is not released.
        let blank = [b"POST / HTTP/1.1\r\n\r\n".as_slice(), &[b'\n'; 40]].concat();
        assert!(!framed(&[&blank], &[40]).0);
        // Once the call is known, later body bytes are stepped over as they come.
        let (mut f, cycle) = (Framing::default(), Cycle::default());
        f.see(b"POST / HTTP/1.1\r\n\r\n");
        cycle.called(40);
        f.match_calls(&cycle);
        f.see(&[b'\n'; 40]);
        assert!(f.between_messages(1));
        // A chunked body (no length) is never followed.
        assert!(
            !framed(
                &[b"POST / HTTP/1.1\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
                &[UNFRAMED]
            )
            .0
        );
        // An empty line after a head is a byte hyper holds: not between messages. One before
        // the first head is none (it opens no empty line of its own).
        assert!(!framed(&[b"GET / HTTP/1.1\r\n\r\n\r\n"], &[0]).0);
        assert!(framed(&[b"\r\nGET / HTTP/1.1\r\n\r\n"], &[0]).0);
        // Too many empty lines held, or calls past the ring, before a match: lost.
        let many: Vec<u8> = b"GET / HTTP/1.1\r\n\r\n".repeat(RING + 1);
        assert!(!framed(&[&many], &[0; RING + 1]).0);
    }

    #[test]
    fn reads_are_cut_to_keep_the_head_being_read_within_the_limit() {
        let mut f = Framing::default();
        f.see(b"GET / HTTP/1.1\r\nX-A: 1234");
        assert_eq!(f.room(100, false), Some(100 - 25));
        f.see(&[b'a'; 200]);
        assert_eq!(
            f.room(100, false),
            Some(1),
            "past the limit: hyper sees it incomplete"
        );
        // A body of known length: its rest and a whole head more, however long the body's
        // last stretch without an empty line.
        let (mut f, cycle) = (Framing::default(), Cycle::default());
        f.see(b"POST / HTTP/1.1\r\n\r\nab");
        cycle.called(1000);
        f.match_calls(&cycle);
        assert_eq!(f.room(100, false), Some(998 + 100));
        f.see(&[b'b'; 998]);
        assert_eq!(
            f.room(100, false),
            Some(100),
            "the next head starts at the body's end"
        );
        f.see(b"GET /x");
        assert_eq!(f.room(100, false), Some(94));
        // A chunked body: its end unknown, reads are not cut.
        let (mut g, cycle) = (Framing::default(), Cycle::default());
        g.see(b"GET / HTTP/1.1\r\n\r\n");
        cycle.called(0);
        g.match_calls(&cycle);
        assert_eq!(g.room(100, false), Some(100));
        cycle.called(UNFRAMED);
        g.see(b"POST / HTTP/1.1\r\n\r\n");
        g.match_calls(&cycle);
        assert_eq!(g.room(100, cycle.bodied.load(Ordering::Relaxed)), None);
        // Lost without a body (here: more empty lines than held), the cut goes on from the
        // last empty line.
        let mut h = Framing::default();
        h.see(&b"GET / HTTP/1.1\r\n\r\n".repeat(PENDING + 1));
        h.see(b"GET / HTTP/1.1\r\nX-A: 1");
        assert!(h.lost);
        assert_eq!(h.room(100, false), Some(100 - 22));
    }

    type Answer = http::Response<http_body_util::Empty<Bytes>>;

    /// A service that answers every request empty, holding as much as the gateway's service
    /// (`ConnService`), so that the size measured is the real one.
    struct Answering(#[allow(dead_code)] [u8; std::mem::size_of::<crate::direct::ConnService>()]);

    impl hyper::service::Service<http::Request<Incoming>> for Answering {
        type Response = Answer;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Answer, std::convert::Infallible>>;

        fn call(&self, _: http::Request<Incoming>) -> Self::Future {
            std::future::ready(Ok(Answer::new(http_body_util::Empty::new())))
        }
    }

    impl super::Service for Answering {
        fn direct(&self) -> Option<&crate::direct::ConnService> {
            None
        }
    }

    /// What an idle HTTP/1 connection keeps is this future (the connection's task holds only
    /// a pointer to it besides a few words: `server::accept_loop`), so its size is memory per
    /// idle connection: the harness's `memconn` figure moves with it. This one is 600 bytes
    /// with a service of the gateway's size (release and debug alike; 768 before the idle
    /// wait polled the socket's readiness in place of holding `readable()`'s future, ~650
    /// while the plain requests' service was held beside hyper's): the bound leaves some
    /// room, and past it, something new is held across the waits.
    #[tokio::test]
    async fn an_idle_connection_keeps_a_small_state() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_tx, stop) = tokio::sync::watch::channel(false);
        let service = Answering([0; std::mem::size_of::<crate::direct::ConnService>()]);
        let cycles = Arc::new(Cycles {
            h1: hyper::server::conn::http1::Builder::new(),
            max_head: 1024,
            max_headers: 100,
            idle: Duration::from_secs(1),
            released: prometheus::IntCounter::new("released", "released").unwrap(),
            errors: crate::protocol_errors::ProtocolErrors::new(
                &prometheus::IntCounterVec::new(prometheus::Opts::new("e", "e"), &["kind"])
                    .unwrap(),
            ),
        });
        let idle = serve(stream, service, cycles, stop);
        let size = std::mem::size_of_val(&idle);
        eprintln!("an idle connection's state: {size} bytes");
        assert!(size <= 640, "{size} bytes");
    }
}
