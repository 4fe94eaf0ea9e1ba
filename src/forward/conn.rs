//! One open upstream connection: its byte stream (TCP, or TLS over TCP) and its read buffer,
//! with the IO steps an exchange takes on it (read more into the buffer, write, flush) and
//! the check that an idle connection is still open before it is reused.
//!
//! The request's own task does this IO (there is no task per connection), so a forwarded
//! request costs no wake-up of another task, and a connection's state lives in the request
//! while it is leased and in the pool while it is idle.

use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Read buffer room kept for the next read (a response head, or a body's next stretch).
const READ_ROOM: usize = 8 * 1024;

pub(super) enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls' state is ~1 KiB and most upstreams are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

pub(super) struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed: the rest of a head or a body. Empty when idle.
    pub buf: BytesMut,
}

impl Conn {
    pub(super) fn new(io: Stream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Read what the upstream has sent into `buf`; `Ok(0)` is its end of stream.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 4 {
            self.buf.reserve(READ_ROOM);
        }
        match &mut self.io {
            Stream::Plain(tcp) => tokio_util::io::poll_read_buf(Pin::new(tcp), cx, &mut self.buf),
            Stream::Tls(tls) => {
                tokio_util::io::poll_read_buf(Pin::new(&mut **tls), cx, &mut self.buf)
            }
        }
    }

    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, data),
        }
    }

    /// TCP writes go straight to the socket; TLS records are buffered by rustls until flushed.
    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    /// Whether an idle connection can take a request: nothing to read on it. An end of stream
    /// (the upstream closed it), an error, or bytes nobody asked for (a desync) all mean it
    /// must be dropped. Polled once, with a waker that does nothing: it never waits.
    pub(super) fn idle_and_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.buf.is_empty() && self.poll_fill(&mut cx).is_pending()
    }
}
