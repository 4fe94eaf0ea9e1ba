//! One request and its response on a leased connection: the request head and body going out
//! (the body streamed frame by frame in its framing), and the response coming in, both
//! driven by the request's own task.
//!
//! The two directions are polled together: an upstream may answer before it has read the
//! whole body (an early 413, or a streaming echo), so the head is looked for while the body
//! is still being sent, and a body still being sent when the head arrives goes on being sent
//! while the response body is read (`UpstreamBody` keeps polling `poll_send`). The connection
//! is reusable only when both directions ended cleanly (`reusable`).

use super::body::{BodyError, GuardedBody};
use super::conn::Conn;
use super::pool::Lease;
use super::wire::{self, Head, RequestFraming, WireError};
use bytes::Bytes;
use http::Method;
use http_body::Body;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use thiserror::Error;

/// Why an exchange ended without a response head.
#[derive(Debug, Error)]
pub(super) enum ExchangeError {
    #[error(transparent)]
    Connect(#[from] super::ConnectError),
    /// The client's body failed (too large, too slow, aborted): not the upstream's fault.
    #[error(transparent)]
    Body(BodyError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("upstream connection: {0}")]
    Io(io::Error),
    /// The upstream closed (or reset) the connection before sending a byte of a response:
    /// what a pooled connection it had already let go of looks like.
    #[error("upstream closed the connection before responding")]
    Closed,
}

/// Why the request could not be sent in full.
enum SendError {
    Body(BodyError),
    Io(io::Error),
}

pub(super) struct Exchange {
    pub lease: Lease,
    /// Bytes to write before anything else: the head, then an encoded body frame.
    out: Bytes,
    /// The request body (`None` once read to its end).
    body: Option<GuardedBody>,
    /// A frame of the body has been asked for: it can no longer go elsewhere whole.
    body_polled: bool,
    framing: RequestFraming,
    /// Body bytes still owed under `Content-Length`.
    owed: u64,
    /// Bytes went out on this connection: the request may have reached the upstream.
    wrote: bool,
    /// The request was not sent in full (the write side failed or was abandoned).
    broken: bool,
    /// `out` holds the last bytes of the request: once written and flushed, it is sent.
    last: bool,
    /// The whole request is written and flushed.
    sent: bool,
}

impl Exchange {
    pub(super) fn new(
        lease: Lease,
        head: Bytes,
        body: GuardedBody,
        framing: RequestFraming,
    ) -> Exchange {
        Exchange {
            lease,
            out: head,
            body: Some(body),
            body_polled: false,
            framing,
            owed: match framing {
                RequestFraming::Length(n) => n,
                _ => 0,
            },
            wrote: false,
            broken: false,
            last: framing == RequestFraming::Empty,
            sent: false,
        }
    }

    fn conn(&mut self) -> &mut Conn {
        &mut self.lease.conn
    }

    /// The request's body, when none of it has been read yet: the request can go again.
    pub(super) fn into_unsent(self) -> Option<GuardedBody> {
        (!self.body_polled).then_some(self.body).flatten()
    }

    pub(super) fn wrote(&self) -> bool {
        self.wrote
    }

    /// The request is still going out.
    pub(super) fn sending(&self) -> bool {
        !self.broken && !self.sent
    }

    /// Both directions ended cleanly: the connection can carry the next request.
    pub(super) fn reusable(&self) -> bool {
        self.sent
    }

    /// Stop sending (the response is over, or the body failed): the connection cannot be
    /// reused, since the request on it is incomplete.
    pub(super) fn abandon_send(&mut self) {
        if self.sending() {
            self.broken = true;
        }
    }

    /// Send what there is to send; `Ready(Ok)` once the whole request is out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(self.lease.conn.poll_write(cx, &self.out)).map_err(SendError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.wrote = true;
                bytes::Buf::advance(&mut self.out, n);
            }
            if self.last {
                ready!(self.conn().poll_flush(cx)).map_err(SendError::Io)?;
                self.sent = true;
                return Poll::Ready(Ok(()));
            }
            let Some(body) = self.body.as_mut() else {
                self.last = true;
                continue;
            };
            self.body_polled = true;
            let frame = ready!(Pin::new(body).poll_frame(cx));
            self.out = match frame {
                Some(Err(e)) => return Poll::Ready(Err(SendError::Body(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => self.encode(data)?,
                    // Trailers: `GuardedBody` ends the body at them.
                    Err(_) => continue,
                },
                None => {
                    self.last = true;
                    self.body = None;
                    match self.framing {
                        RequestFraming::Length(_) if self.owed != 0 => {
                            return Poll::Ready(Err(SendError::Body(BodyError::Length)))
                        }
                        RequestFraming::Chunked => Bytes::from_static(wire::LAST_CHUNK),
                        _ => Bytes::new(),
                    }
                }
            };
        }
    }

    fn encode(&mut self, data: Bytes) -> Result<Bytes, SendError> {
        match self.framing {
            RequestFraming::Length(_) => {
                let n = data.len() as u64;
                if n > self.owed {
                    return Err(SendError::Body(BodyError::Length));
                }
                self.owed -= n;
                Ok(data)
            }
            _ => Ok(wire::chunk(&data)),
        }
    }

    /// Go on sending, as far as the socket and the client's body allow, without waiting; a
    /// failure stops the sending (the connection is then not reused). For the response body,
    /// which must be relayed whatever became of the request's.
    pub(super) fn progress_send(&mut self, cx: &mut Context<'_>) {
        if self.sending() {
            if let Poll::Ready(Err(_)) = self.poll_send(cx) {
                self.abandon_send();
            }
        }
    }

    /// Send the request and wait for the response's final head.
    pub(super) async fn head(mut self, method: &Method) -> Result<(Head, Exchange), ExchangeError> {
        let head = std::future::poll_fn(|cx| self.poll_head(cx, method)).await?;
        Ok((head, self))
    }

    /// `head`, one poll at a time.
    pub(super) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
    ) -> Poll<Result<Head, ExchangeError>> {
        let mut write_error = None;
        if self.sending() {
            match self.poll_send(cx) {
                Poll::Ready(Err(SendError::Body(e))) => {
                    self.abandon_send();
                    return Poll::Ready(Err(ExchangeError::Body(e)));
                }
                // The upstream may have answered and closed: read what it sent first.
                Poll::Ready(Err(SendError::Io(e))) => {
                    self.abandon_send();
                    write_error = Some(e);
                }
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        loop {
            let conn = self.conn();
            if let Some(head) = wire::parse_head(&mut conn.buf, method)? {
                return Poll::Ready(Ok(head));
            }
            let nothing_yet = conn.buf.is_empty();
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) if nothing_yet => {
                    return Poll::Ready(Err(ExchangeError::Closed))
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(WireError::Truncated.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) if nothing_yet && closed(&e) => {
                    return Poll::Ready(Err(ExchangeError::Closed))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ExchangeError::Io(e))),
                Poll::Pending => {
                    return match write_error {
                        Some(e) if closed(&e) => Poll::Ready(Err(ExchangeError::Closed)),
                        Some(e) => Poll::Ready(Err(ExchangeError::Io(e))),
                        None => Poll::Pending,
                    }
                }
            }
        }
    }
}

/// The peer closed or reset the connection.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}
