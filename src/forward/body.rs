//! The two bodies that cross the gateway: the client's request body on its way up (size limit,
//! total deadline, trailers dropped) and the upstream's response body on its way down (decoded
//! from its framing, an idle deadline between reads, and the connection handed back to the
//! pool once the exchange is complete).

use super::exchange::Exchange;
use super::wire::{BodyFraming, Chunked, Decoded, WireError};
use crate::deadline::Deadline;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;

/// Why the client's request body could not be sent.
#[derive(Debug, Error)]
pub enum BodyError {
    #[error("request body exceeds the limit")]
    TooLarge,
    #[error("request body not received in time")]
    Timeout,
    #[error("client body: {0}")]
    Client(#[from] hyper::Error),
    #[error("request body length differs from its Content-Length")]
    Length,
}

/// The upstream's response body, decoded from its framing and relayed with an idle deadline
/// between reads (THREATS H3): an upstream that sends its head and then stalls would
/// otherwise hold the client connection (and the upstream one) forever. After
/// `response_timeout` without a byte the body fails, so hyper aborts the client response
/// (HTTP/1: close with a Content-Length shortfall or no terminal chunk; HTTP/2: RST_STREAM).
///
/// It holds the exchange it came on: the rest of a request body still going out is sent as
/// the response is read, and the connection goes back to the idle pool when both are
/// complete (never earlier: HTTP/1.1 has one response at a time); it is closed when the body
/// is dropped unfinished, fails, or the exchange cannot be reused.
pub struct UpstreamBody {
    /// `None` once the body has ended (and the connection was released or closed).
    exchange: Option<Exchange>,
    decoder: Decoder,
    keep_alive: bool,
    idle: Duration,
    /// Armed when the body waits on the upstream, dropped when a frame comes: silence is
    /// timed while it is waited out, and a body already read with its head (most small
    /// responses) never reads the clock.
    deadline: Option<Deadline>,
    timeouts: IntCounter,
}

enum Decoder {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl UpstreamBody {
    pub(super) fn new(
        exchange: Exchange,
        framing: BodyFraming,
        keep_alive: bool,
        idle: Duration,
        timeouts: IntCounter,
    ) -> UpstreamBody {
        let mut body = UpstreamBody {
            exchange: Some(exchange),
            decoder: match framing {
                BodyFraming::Empty => Decoder::Length(0),
                BodyFraming::Length(n) => Decoder::Length(n),
                BodyFraming::Chunked => Decoder::Chunked(Chunked::default()),
                BodyFraming::Close => Decoder::Close,
            },
            keep_alive,
            idle,
            deadline: None,
            timeouts,
        };
        if framing == BodyFraming::Empty {
            body.end();
        }
        body
    }

    /// The response is complete: the connection is free for the next request if the
    /// request went out whole and nothing more came after the response.
    fn end(&mut self) {
        if let Some(mut exchange) = self.exchange.take() {
            exchange.abandon_send();
            let clean = matches!(self.decoder, Decoder::Length(_) | Decoder::Chunked(_))
                && exchange.lease.conn.buf.is_empty();
            if self.keep_alive && clean && exchange.reusable() {
                exchange.lease.release();
            }
        }
    }

    /// The next frame from what is buffered; `None`: read more (or the body has ended).
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, WireError> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Ok(None);
        };
        let buf = &mut exchange.lease.conn.buf;
        let (data, ended) = match &mut self.decoder {
            Decoder::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                ((n > 0).then(|| buf.split_to(n).freeze()), *left == 0)
            }
            Decoder::Chunked(chunked) => match chunked.decode(buf)? {
                Decoded::Data(data) => (Some(data), false),
                Decoded::More => (None, false),
                Decoded::End => (None, true),
            },
            Decoder::Close => ((!buf.is_empty()).then(|| buf.split().freeze()), false),
        };
        if ended {
            self.end();
        }
        Ok(data.map(Frame::data))
    }
}

/// The upstream went silent mid-body.
#[derive(Debug, Error)]
#[error("upstream response body stalled")]
pub struct BodyStalled;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            match this.decode() {
                Ok(Some(frame)) => {
                    this.deadline = None;
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) => {}
                Err(e) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            let Some(exchange) = this.exchange.as_mut() else {
                return Poll::Ready(None);
            };
            exchange.progress_send(cx);
            match exchange.lease.conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    if matches!(this.decoder, Decoder::Close) {
                        this.end();
                        return Poll::Ready(None);
                    }
                    this.exchange = None;
                    return Poll::Ready(Some(Err(WireError::Truncated.into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Pending => {
                    let idle = this.idle;
                    let deadline = this.deadline.get_or_insert_with(|| Deadline::after(idle));
                    if Pin::new(deadline).poll(cx).is_ready() {
                        this.timeouts.inc();
                        this.exchange = None;
                        return Poll::Ready(Some(Err(BodyStalled.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.exchange, &self.decoder) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Decoder::Length(left)) => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}

/// The client's body as it came: hyper's, or none (a plain request served by `direct`).
pub enum ClientBody {
    Hyper(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The client's body, streamed to the upstream with a size limit and a total deadline.
pub struct GuardedBody {
    inner: ClientBody,
    timeout: Duration,
    /// Set when the body is first read (right after the head went out): a request without
    /// a body never reads the clock for it.
    deadline: Option<Deadline>,
    remaining: u64,
    /// Shared with the access line when one will be written.
    counted: Option<crate::access::BytesIn>,
}

impl GuardedBody {
    pub fn new(
        inner: ClientBody,
        limit: u64,
        timeout: Duration,
        counted: Option<crate::access::BytesIn>,
    ) -> GuardedBody {
        GuardedBody {
            inner,
            timeout,
            deadline: None,
            remaining: limit,
            counted,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Deadline::after(timeout));
        if Pin::new(deadline).poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyError::Timeout)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    this.remaining -= len;
                    if let Some(c) = &this.counted {
                        c.add(len);
                    }
                }
                // Trailers are dropped: a key must never ride in a trailer to the upstream (B7).
                if frame.is_trailers() {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
