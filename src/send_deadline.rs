//! A client that stops reading (THREATS E3, slow read): a write to it that waits longer than
//! `[server] send_timeout_ms` fails, and the connection is closed.
//!
//! Why: the gateway relays an upstream's response as it reads it, so a client that asks for
//! a large response and then never reads it stalls the relay once the sockets' buffers are
//! full. Nothing else would end that: the upstream body's idle deadline (`forward::body`)
//! runs only while the body is polled, and a stalled write never polls it. The connection,
//! its upstream connection and its in-flight slot were held for as long as the client
//! liked; a few hundred such clients hold `max_in_flight`.
//!
//! The deadline is armed when a write first has to wait and dropped as soon as one makes
//! progress (nginx's `send_timeout`: the time between two successive writes), so a slow but
//! reading client is never cut, and a write that does not wait (nearly all) reads no clock
//! and allocates nothing. It wraps the TCP stream itself, below TLS and below both HTTP
//! versions, so it covers every way a response reaches a client: `direct`, hyper's HTTP/1
//! and HTTP/2, and the TLS records under them.

use crate::deadline::Deadline;
use prometheus::IntCounter;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What every connection of a listener shares: the limit and the counter of connections cut.
#[derive(Clone, Debug)]
pub struct SendLimit {
    pub after: Duration,
    /// `keygate_send_timeouts_total`.
    pub cut: IntCounter,
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit.after`.
#[derive(Debug)]
pub struct SendDeadline<T> {
    inner: T,
    limit: SendLimit,
    /// Armed while a write waits; boxed, so an idle connection keeps one word for it.
    waiting: Option<Box<Deadline>>,
}

impl<T> SendDeadline<T> {
    pub fn new(inner: T, limit: SendLimit) -> SendDeadline<T> {
        SendDeadline {
            inner,
            limit,
            waiting: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The rule, for every kind of write: progress drops the deadline; a wait arms it (once)
    /// and fails the write when it passes.
    fn judge<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let after = self.limit.after;
        let deadline = self
            .waiting
            .get_or_insert_with(|| Box::new(Deadline::after(after)));
        if Pin::new(&mut **deadline).poll(cx).is_ready() {
            self.waiting = None;
            self.limit.cut.inc();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within the send timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.judge(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.judge(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.judge(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.judge(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limit(ms: u64) -> SendLimit {
        SendLimit {
            after: Duration::from_millis(ms),
            cut: IntCounter::new("t", "t").unwrap(),
        }
    }

    #[tokio::test]
    async fn a_write_that_waits_too_long_fails_and_progress_rearms_it() {
        // A 64-byte pipe: the peer's reads are the client's.
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut s = SendDeadline::new(ours, limit(200));
        // A reader that takes a little at a time, slower than the pipe fills, yet each wait
        // is shorter than the limit: never cut.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await; // the slow client's pace
                got += peer.read(&mut buf).await.unwrap();
            }
            peer
        });
        s.write_all(&[7u8; 1024]).await.unwrap();
        let _peer = reader.await.unwrap();
        assert_eq!(s.limit.cut.get(), 0);
        // The peer stops reading: the write that fills the pipe fails after the limit.
        let started = std::time::Instant::now();
        let err = s.write_all(&[7u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(s.limit.cut.get(), 1);
    }
}
