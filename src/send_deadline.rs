//! A client that stops reading (THREATS E3, slow read): a write to it that waits longer than
//! `[server] send_timeout_ms` fails, and the connection is closed; an HTTP/2 stream whose
//! window the client keeps shut is given up after as long.
//!
//! Why: the gateway relays an upstream's response as it reads it, so a client that asks for
//! a large response and then never reads it stalls the relay once the sockets' buffers are
//! full. Nothing else would end that: the upstream body's idle deadline (`forward::body`)
//! runs only while the body is polled, and a stalled write never polls it. The connection
//! and its upstream connection were held for as long as the client liked.
//!
//! The deadline is armed when a write first has to wait and dropped as soon as one makes
//! progress (nginx's `send_timeout`: the time between two successive writes), so a slow but
//! reading client is never cut, and a write that does not wait (nearly all) reads no clock
//! and allocates nothing. It wraps the TCP stream itself, below TLS and below both HTTP
//! versions, so it covers every way a response reaches a client: `direct`, hyper's HTTP/1
//! and HTTP/2, and the TLS records under them.
//!
//! HTTP/2 has a second way to stop reading: flow control. A client that grants a stream no
//! window leaves the socket idle (nothing to write), and hyper does not poll a response body
//! until the stream has room, so the body cannot time itself. An HTTP/2 response body is
//! therefore relayed by a task of its own (`pump`), one frame ahead of hyper: when hyper
//! takes no frame for the send timeout, the task drops the upstream body (its connection is
//! closed) and the stream fails (hyper resets it) when hyper next asks. The client connection
//! is retired as well (`lifetime`: GOAWAY, then closed after the drain timeout), because that
//! "next" may never come.

use crate::deadline::Deadline;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// The hyper side of a response body that `pump` relays.
pub struct Pumped {
    frames: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    /// Set by the task when the body ended whole; a channel closed without it was given up.
    whole: Arc<AtomicBool>,
    hint: SizeHint,
}

/// Why a pumped body failed: the client took nothing for the send timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client granted the stream no room within the send timeout")]
pub struct WindowShut;

/// Relay `body` through a task that holds at most one frame ahead of hyper and gives the
/// body up (counted in `cut`, and said to the stream's connection through `retire`) when
/// hyper takes no frame for `after`. The task ends with the body, or as soon as hyper drops
/// its side (the stream was reset or the connection closed).
pub fn pump<B>(
    body: B,
    after: Duration,
    cut: IntCounter,
    retire: Option<crate::lifetime::Retire>,
) -> Pumped
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (tx, frames) = mpsc::channel(1);
    let whole = Arc::new(AtomicBool::new(false));
    let hint = body.size_hint();
    let ended = whole.clone();
    tokio::spawn(async move {
        let mut body = body;
        loop {
            let frame = match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => {
                    ended.store(true, Ordering::Release);
                    return;
                }
                Some(frame) => frame.map_err(Into::into),
            };
            let failed = frame.is_err();
            match crate::deadline::timeout(after, tx.reserve()).await {
                Ok(Ok(room)) => room.send(frame),
                // hyper let go of the stream.
                Ok(Err(_)) => return,
                Err(_) => {
                    cut.inc();
                    if let Some(conn) = &retire {
                        conn.stream_given_up();
                    }
                    return;
                }
            }
            if failed {
                return;
            }
        }
    });
    Pumped {
        frames,
        whole,
        hint,
    }
}

impl Body for Pumped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match std::task::ready!(self.frames.poll_recv(cx)) {
            Some(frame) => Poll::Ready(Some(frame)),
            None if self.whole.load(Ordering::Acquire) => Poll::Ready(None),
            None => Poll::Ready(Some(Err(WindowShut.into()))),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
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

    /// `n` frames of one byte (`None`: endless), noting when it is dropped.
    struct Frames(Option<usize>, Arc<AtomicBool>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match &mut self.0 {
                Some(0) => Poll::Ready(None),
                left => {
                    if let Some(n) = left {
                        *n -= 1;
                    }
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
                }
            }
        }
    }

    impl Drop for Frames {
        fn drop(&mut self) {
            self.1.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_pumped_body_is_relayed_whole_or_given_up_when_nothing_is_taken() {
        use http_body_util::BodyExt;
        let dropped = Arc::new(AtomicBool::new(false));
        let whole = pump(
            Frames(Some(3), dropped.clone()),
            Duration::from_millis(200),
            limit(1).cut,
            None,
        );
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "xxx");
        assert!(dropped.load(Ordering::SeqCst));

        let cut = limit(200).cut;
        let dropped = Arc::new(AtomicBool::new(false));
        let mut shut = pump(
            Frames(None, dropped.clone()),
            Duration::from_millis(200),
            cut.clone(),
            None,
        );
        // One frame taken, then none: the task gives the body up after the limit.
        assert!(shut.frame().await.unwrap().is_ok());
        let started = std::time::Instant::now();
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never given up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await; // polling for the task's end
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(cut.get(), 1);
        // The frame already relayed is still handed over, then the stream fails.
        assert!(shut.frame().await.unwrap().is_ok());
        let err = shut.frame().await.unwrap().unwrap_err();
        assert!(err.is::<WindowShut>(), "{err}");
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
