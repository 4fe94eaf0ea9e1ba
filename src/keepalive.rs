//! Plain HTTP/1 keep-alive connections give their memory back between requests, as nginx's
//! do.
//!
//! hyper keeps an 8 KiB read buffer, an 8 KiB write buffer and its connection state for as
//! long as a connection lives. Measured here: an idle keep-alive connection cost 19.3 KiB, a
//! connection that had not sent a byte yet 1.2 KiB. So a plain HTTP/1 connection is served
//! in cycles (`serve`): one hyper connection serves requests until the socket has been idle
//! between requests for `RELEASE_AFTER`; then `Cycled` reports end of input to hyper, which
//! finishes as if the client had closed, without shutting the socket down
//! (`without_shutdown`); hyper's state is dropped, and the socket waits for readiness alone,
//! within the idle limit (the header read timeout, which hyper applies to idle connections
//! too). The next request's first bytes start the next cycle.
//!
//! When the end of input is safe to report (`Cycle::releasable`): hyper must be between
//! messages with nothing of a next one buffered, or it would answer a half-read request with
//! an error. Three facts make it so:
//! - every request of the cycle came without a body (hyper reads a body while its request is
//!   in flight; a cycle that had one is never released and runs as before);
//! - every response of the cycle has ended (its body returned its end, `Tracked`): hyper
//!   reads for the next head only after that, never mid-message with no body to read;
//! - the bytes hyper was given end exactly at the end of a request head (an empty line), and
//!   they held as many head ends as requests were called: no pipelined request, whole or in
//!   part, sits in hyper's buffer.
//!
//! Leading empty lines or line endings this count does not see make the counts differ, and
//! such a cycle is simply not released. TLS and HTTP/2 connections are not cycled (rustls
//! keeps its own buffers; HTTP/2 multiplexes).
//!
//! Two more things this file owns, both found while building the cycles: hyper checks its
//! header limit only while a head is incomplete, so `Cycled` cuts reads to keep a head within
//! `max_header_bytes` (`poll_read`); and `release` keeps nothing of hyper's connection (its
//! `read_buf` is a view that would pin hyper's read buffer). Measured with the peer harness: an
//! idle keep-alive connection 1.1–1.2 KiB (3.2–3.4 after throughput runs), from 20.5.

use crate::deadline::Deadline;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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

/// What one cycle has seen, shared by the socket wrapper and the service wrapper.
#[derive(Debug, Default)]
pub struct Cycle {
    /// Requests the service was called with.
    calls: AtomicU32,
    /// Responses whose body has ended.
    ended: AtomicU32,
    /// A request of this cycle had a body.
    bodied: AtomicBool,
}

impl Cycle {
    /// A request of this cycle had a body (sticky for the cycle).
    fn bodied(&self) -> bool {
        self.bodied.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.ended.store(0, Ordering::Relaxed);
        self.bodied.store(false, Ordering::Relaxed);
    }

    /// The rule of this file: hyper may be told the input ended (module header).
    fn releasable(&self, heads: u32, at_head_end: bool) -> bool {
        let calls = self.calls.load(Ordering::Relaxed);
        calls > 0
            && at_head_end
            && heads == calls
            && self.ended.load(Ordering::Relaxed) == calls
            && !self.bodied()
    }
}

/// Counts the ends of request heads (an empty line: LF, optional CR, LF) in the bytes given
/// to hyper.
#[derive(Debug, Default)]
struct Heads {
    count: u32,
    /// The last two bytes seen.
    last: [u8; 2],
    /// The last byte seen ended a head.
    at_end: bool,
    /// Bytes seen since the last head end.
    since_end: usize,
}

impl Heads {
    /// Count the head ends in `bytes`, which follow everything seen before. Only line feeds
    /// can end a head, so the scan jumps from one to the next (memchr) instead of looking at
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
            let ends = back(1) == b'\n' || (back(1) == b'\r' && back(2) == b'\n');
            if ends {
                self.count = self.count.wrapping_add(1);
                after = Some(i + 1);
            }
        }
        self.since_end = match after {
            Some(a) => bytes.len() - a,
            None => self.since_end + bytes.len(),
        };
        self.at_end = after == Some(bytes.len());
        self.last = match bytes.len() {
            1 => [self.last[1], lastb],
            _ => [bytes[bytes.len() - 2], lastb],
        };
    }
}

/// The socket as one cycle's hyper connection sees it: bytes left over from the last cycle
/// first, then the stream; end of input once the cycle is releasable and idle.
pub struct Cycled {
    stream: TcpStream,
    /// `[server] max_header_bytes`: see `poll_read`.
    max_head: usize,
    prefix: Bytes,
    cycle: Arc<Cycle>,
    heads: Heads,
    /// When the socket was first found idle with the cycle releasable.
    idle_since: Option<Instant>,
    wake: Option<Deadline>,
    released: bool,
}

impl Cycled {
    fn new(stream: TcpStream, max_head: usize, prefix: Bytes, cycle: Arc<Cycle>) -> Cycled {
        cycle.reset();
        Cycled {
            stream,
            max_head,
            prefix,
            cycle,
            heads: Heads::default(),
            idle_since: None,
            wake: None,
            released: false,
        }
    }
}

impl AsyncRead for Cycled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let chunk = this.prefix.split_to(n);
            this.heads.see(&chunk);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        // hyper checks its header limit (`max_buf_size`) only while a head is incomplete, so
        // a head that arrives whole in one large read passes it. While no request body can
        // be in the bytes (none in this cycle), a read is cut so that the head being read
        // never exceeds `max_head`: hyper then sees an incomplete head at the limit and
        // answers 431.
        let room = this.max_head.saturating_sub(this.heads.since_end).max(1);
        let before = buf.filled().len();
        let read = if !this.cycle.bodied() && room < buf.remaining() {
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
                this.heads.see(&buf.filled()[before..]);
                this.idle_since = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.cycle.releasable(this.heads.count, this.heads.at_end) => {
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

forward_write!([] Cycled, stream);

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
        self.cycle.calls.fetch_add(1, Ordering::Relaxed);
        if !req.body().is_end_stream() {
            self.cycle.bodied.store(true, Ordering::Relaxed);
        }
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

/// Serve one plain HTTP/1 connection in cycles (module header) until it closes, fails, idles
/// past `idle` or `stop` asks (then: close after the in-flight response, as `server::drive`
/// does).
pub async fn serve<S, B>(
    mut stream: TcpStream,
    service: S,
    h1: &hyper::server::conn::http1::Builder,
    max_head: usize,
    idle: Duration,
    released: prometheus::IntCounter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Unpin,
    S::Future: Unpin + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cycle = Arc::new(Cycle::default());
    let mut service = Counted {
        inner: service,
        cycle: cycle.clone(),
    };
    let mut prefix = Bytes::new();
    loop {
        let io = Cycled::new(stream, max_head, prefix, cycle.clone());
        // Boxed: this future lives as long as the connection, idle or not, and hyper's
        // connection (~1 KiB inline) would otherwise keep its place in it while idle.
        let mut conn = Box::new(h1.serve_connection(hyper_util::rt::TokioIo::new(io), service));
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
            Some(Err(_)) => return,
            None => {
                Pin::new(&mut *conn).graceful_shutdown();
                let _ = conn.await;
                return;
            }
        }
        match release(conn.into_parts()) {
            Some(kept) => (stream, prefix, service) = kept,
            // The client closed its side: dropping the socket closes ours.
            None => return,
        }
        released.inc();
        let next = tokio::select! {
            r = crate::deadline::timeout(idle.saturating_sub(RELEASE_AFTER), stream.readable()) => {
                matches!(r, Ok(Ok(())))
            }
            _ = stop.changed() => false,
        };
        if !next {
            return;
        }
    }
}

/// What an idle connection keeps of a finished cycle: the socket, a copy of any bytes hyper
/// had read past the last request (normally none) and the service; `None` when the cycle
/// ended because the client closed. Everything else of hyper's connection is dropped on
/// return, its read buffer too: `read_buf` is a view of it, so keeping that view (or any
/// part of `parts`) through the idle wait would keep the buffer's touched pages (measured:
/// 4.2 KiB per idle connection).
fn release<S>(
    parts: hyper::server::conn::http1::Parts<hyper_util::rt::TokioIo<Cycled>, S>,
) -> Option<(TcpStream, Bytes, S)> {
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

    fn seen(chunks: &[&[u8]]) -> (u32, bool, usize) {
        let mut h = Heads::default();
        for c in chunks {
            h.see(c);
        }
        (h.count, h.at_end, h.since_end)
    }

    #[test]
    fn head_ends_are_counted_however_the_bytes_are_split() {
        let two: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\nHost: a\n\nGET /c";
        let whole = seen(&[two]);
        assert_eq!(whole, (2, false, 6));
        for i in 0..=two.len() {
            for j in i..=two.len() {
                assert_eq!(seen(&[&two[..i], &two[i..j], &two[j..]]), whole, "{i} {j}");
            }
        }
        assert_eq!(seen(&[b"GET / HTTP/1.1\r\n\r\n"]), (1, true, 0));
        assert_eq!(seen(&[b"GET / HTTP/1.1\r\n\r", b"\n"]), (1, true, 0));
        // A leading empty line after a head counts as one more end: such a cycle is never
        // released (the counts differ).
        assert_eq!(seen(&[b"GET / HTTP/1.1\r\n\r\n\r\n"]).0, 2);
    }
}
