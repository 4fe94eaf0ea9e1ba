//! The two bodies that cross the gateway: the client's request body on its way up (size limit,
//! total deadline, trailers dropped) and the upstream's response body on its way down (idle
//! deadline between frames, and the connection handed back to the pool once the body has been
//! read to its end).

use super::pool::Lease;
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
}

/// The upstream's response body, relayed with an idle deadline between frames (THREATS H3).
/// hyper's client has no body timeout: an upstream that sends its head and then stalls would
/// otherwise hold the client connection (and the upstream one) forever. After
/// `response_timeout` without a frame the body fails, so hyper aborts the client response
/// (HTTP/1: close with a Content-Length shortfall or no terminal chunk; HTTP/2: RST_STREAM).
///
/// It also holds the upstream connection it came on: the connection goes back to the idle
/// pool when the body has been read to its end (never earlier: HTTP/1.1 has one response at a
/// time), and is closed when the body is dropped unfinished or fails.
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    deadline: Deadline,
    timeouts: IntCounter,
    lease: Option<Lease>,
}

impl UpstreamBody {
    pub(super) fn new(
        inner: Incoming,
        idle: Duration,
        timeouts: IntCounter,
        lease: Lease,
    ) -> UpstreamBody {
        UpstreamBody {
            inner,
            idle,
            deadline: Deadline::after(idle),
            timeouts,
            lease: Some(lease),
        }
    }

    /// The response is complete: the connection is free for the next request.
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says so (Content-Length reached): that is
        // a finished body too. Anything else unfinished closes the connection (dropping the
        // lease drops the sender; hyper closes a connection whose body was abandoned).
        if self.inner.is_end_stream() {
            self.release();
        }
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
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if self.inner.is_end_stream() {
                    self.release();
                } else {
                    let next = std::time::Instant::now() + self.idle;
                    self.deadline.reset(next);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.lease = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if Pin::new(&mut self.deadline).poll(cx).is_ready() {
                    self.timeouts.inc();
                    self.lease = None;
                    return Poll::Ready(Some(Err(BodyStalled.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's body, streamed to the upstream with a size limit and a total deadline.
pub struct GuardedBody {
    /// The body and its deadline; `None`: no body, so nothing to wait for (a request sent
    /// once more, `GuardedBody::empty`).
    inner: Option<(Incoming, Deadline)>,
    remaining: u64,
    /// Shared with the access line when one will be written.
    counted: Option<crate::access::BytesIn>,
}

impl GuardedBody {
    pub fn new(
        inner: Incoming,
        limit: u64,
        timeout: Duration,
        counted: Option<crate::access::BytesIn>,
    ) -> GuardedBody {
        GuardedBody {
            inner: Some((inner, Deadline::after(timeout))),
            remaining: limit,
            counted,
        }
    }

    /// No body: what a bodiless request goes out with when it is sent once more
    /// (`forward::replayable`).
    pub fn empty() -> GuardedBody {
        GuardedBody {
            inner: None,
            remaining: 0,
            counted: None,
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
        let Some((inner, deadline)) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if Pin::new(deadline).poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyError::Timeout)));
        }
        match Pin::new(inner).poll_frame(cx) {
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
        self.inner.as_ref().is_none_or(|(b, _)| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |(b, _)| b.size_hint())
    }
}
