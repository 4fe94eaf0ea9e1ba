//! Forwarding: the upstream pool (round robin, ejection of failed targets), the pooled
//! keep-alive HTTP/1.1 client with connect and response timeouts, and the request body guard
//! (size limit and total deadline).
//!
//! Upstream addresses come only from static config, never from the request (no SSRF through
//! Host or an absolute URI). Errors are classified once here: connect failures (502, target
//! ejected), response-head timeout (504), protocol errors including an unrequested 101 (502),
//! and the client's own body being too large (413) or too slow (408).

use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::{Histogram, IntCounter};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::time::Sleep;

/// Largest upstream response head we relay; bigger is a broken or hostile upstream (502).
const MAX_UPSTREAM_HEAD_BYTES: usize = 64 * 1024;

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
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    timeouts: IntCounter,
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
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.timeouts.inc();
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
    inner: Incoming,
    remaining: u64,
    deadline: Pin<Box<Sleep>>,
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
            inner,
            remaining: limit,
            deadline: Box::pin(tokio::time::sleep(timeout)),
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
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyError::Timeout)));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    self.remaining -= len;
                    if let Some(c) = &self.counted {
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

struct Target {
    authority: String,
    /// Monotonic ms (since `Pool::epoch`) until which this target is skipped.
    ejected_until: AtomicI64,
}

/// Series for one upstream, resolved once.
#[derive(Clone)]
pub struct UpstreamSeries {
    pub duration: Histogram,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub protocol_errors: IntCounter,
}

/// One configured upstream: its targets and its client pool.
pub struct Upstream {
    pub name: String,
    targets: Vec<Target>,
    next: AtomicUsize,
    client: Client<HttpConnector, GuardedBody>,
    response_timeout: Duration,
    eject: Duration,
    epoch: Instant,
    series: UpstreamSeries,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish()
    }
}

impl Upstream {
    pub fn new(c: &UpstreamConfig, series: UpstreamSeries) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(c.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(c.pool_idle_timeout_ms))
            .pool_max_idle_per_host(1024)
            .http1_max_buf_size(MAX_UPSTREAM_HEAD_BYTES.max(8192))
            .http1_max_headers(100)
            // The Host header we set is the client's; the URI carries the target.
            .set_host(false)
            .build(connector);
        Upstream {
            name: c.name.clone(),
            targets: c
                .targets
                .iter()
                .map(|t| Target {
                    authority: t.clone(),
                    ejected_until: AtomicI64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
            response_timeout: Duration::from_millis(c.response_timeout_ms),
            eject: Duration::from_millis(c.eject_ms),
            epoch: Instant::now(),
            series,
        }
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Round robin over targets not currently ejected; if all are ejected, try one anyway
    /// (better a probe than a guaranteed 502).
    fn pick(&self) -> Option<&Target> {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..n)
            .map(|i| &self.targets[(start + i) % n])
            .find(|t| t.ejected_until.load(Ordering::Relaxed) <= now)
            .or_else(|| self.targets.get(start % n.max(1)))
    }

    /// Send `req` (origin-form path already set) to a target and wait for the response head.
    pub async fn send(
        &self,
        mut req: Request<GuardedBody>,
        path_and_query: &str,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let target = self.pick().ok_or(GatewayError::UpstreamUnavailable(
            "upstream has no targets".into(),
        ))?;
        let uri: Uri = format!("http://{}{}", target.authority, path_and_query)
            .parse()
            .map_err(|_| GatewayError::BadRequest("path cannot be forwarded"))?;
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        let started = Instant::now();
        let result = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        self.series
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(_) => {
                self.series.timeouts.inc();
                Err(GatewayError::UpstreamTimeout)
            }
            Ok(Err(e)) => Err(self.classify(e, target)),
            Ok(Ok(resp)) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                // We never ask for an upgrade, so a 101 is a desync or an attack (THREATS H9).
                self.series.protocol_errors.inc();
                Err(GatewayError::UpstreamError(
                    "unrequested 101 from upstream".into(),
                ))
            }
            Ok(Ok(resp))
                if resp.headers().contains_key(http::header::TRANSFER_ENCODING)
                    && resp.headers().contains_key(http::header::CONTENT_LENGTH) =>
            {
                // Two framings on one response: a desync attempt or a broken upstream
                // (THREATS A15/H5). Dropping the unread body discards the connection.
                self.series.protocol_errors.inc();
                Err(GatewayError::UpstreamError(
                    "upstream response has both Content-Length and Transfer-Encoding".into(),
                ))
            }
            Ok(Ok(resp)) => Ok(resp.map(|inner| UpstreamBody {
                inner,
                idle: self.response_timeout,
                deadline: Box::pin(tokio::time::sleep(self.response_timeout)),
                timeouts: self.series.timeouts.clone(),
            })),
        }
    }

    fn classify(&self, e: hyper_util::client::legacy::Error, target: &Target) -> GatewayError {
        // The client's own body failing is not the upstream's fault.
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(b) = s.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::TooLarge => GatewayError::BodyTooLarge,
                    BodyError::Timeout => GatewayError::BodyTimeout,
                    BodyError::Client(_) => GatewayError::BadRequest("client body aborted"),
                };
            }
            source = s.source();
        }
        if e.is_connect() {
            self.series.connect_errors.inc();
            target.ejected_until.store(
                self.now_ms() + self.eject.as_millis() as i64,
                Ordering::Relaxed,
            );
            GatewayError::UpstreamUnavailable(Box::new(e))
        } else {
            self.series.protocol_errors.inc();
            GatewayError::UpstreamError(Box::new(e))
        }
    }
}
