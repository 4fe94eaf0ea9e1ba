//! How long a connection that hyper's `auto` builder serves may stay open: HTTP/2, and TLS
//! connections whose client chose no ALPN protocol (plain HTTP/1 and TLS with ALPN
//! `http/1.1` are served in cycles, `keepalive`, whose idle limit is the header read
//! timeout). Such a connection is served until it ends, or asked to finish gracefully
//! (HTTP/2: GOAWAY; HTTP/1: close after the response in flight) when
//! - the gateway stops (then `server`'s drain deadline bounds the wait);
//! - no request has been in flight on it for `[server] h2_idle_timeout_ms` (THREATS E5: an
//!   HTTP/2 connection with no streams holds its slot under the connection caps, its HPACK
//!   tables and its buffers for as long as the client likes; hyper's keep-alive PINGs run
//!   only while streams are open, and a client that answers them would keep it for ever);
//! - it has been open for `[server] h2_max_connection_age_ms`, when set (long-lived clients
//!   then reconnect, and a load balancer in front spreads them again after a scale-out);
//! - one of its HTTP/2 streams was given up because the client kept its window shut for
//!   `[server] send_timeout_ms` (`send_deadline::pump`, THREATS E3). Giving the stream up
//!   frees its upstream, but hyper resets the stream only when the client next grants room,
//!   so a client that never does would keep every such stream (its state and the frame
//!   relayed ahead) for the connection's life; closing the connection frees them all, as
//!   nginx's `send_timeout` closes an HTTP/2 connection.
//!
//! In the last three cases the requests in flight get `[server] drain_timeout_ms` to finish.
//! Each is counted in `keygate_connections_retired_total{reason}`.

use crate::deadline::Deadline;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// The limits, read at start, and their counters.
pub struct Lifetime {
    pub idle: Duration,
    /// `None`: no limit (`h2_max_connection_age_ms = 0`, the default).
    pub max_age: Option<Duration>,
    pub drain: Duration,
    pub retired_idle: IntCounter,
    pub retired_age: IntCounter,
    pub retired_send_timeout: IntCounter,
    /// `keygate_protocol_errors_total`.
    pub errors: crate::protocol_errors::ProtocolErrors,
}

/// Serve `conn` (its service wrapped in `Tracked` over `live`) to its end, or until one of the
/// module header's reasons asks it to finish.
pub async fn drive<I, S, B>(
    // Boxed by the caller: pinning an argument inside an `async fn` moves it into a second
    // slot of the future, and this one (~1.6 KiB, sized for HTTP/2) lives as long as the
    // connection.
    mut conn: Pin<Box<auto::Connection<'_, I, Tracked<S>, TokioExecutor>>>,
    live: Arc<Live>,
    life: &Lifetime,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Future: Unpin + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    // Why the connection is asked to finish: its counter when it idled or aged out, `None`
    // when the gateway stops.
    let retired = if *stop.borrow() {
        None
    } else {
        let age = async {
            match life.max_age {
                Some(age) => Deadline::after(age).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => return life.count(r),
            _ = stop.changed() => None,
            _ = live.idle_for(life.idle) => Some(&life.retired_idle),
            _ = age => Some(&life.retired_age),
            _ = live.given_up.notified() => Some(&life.retired_send_timeout),
        }
    };
    conn.as_mut().graceful_shutdown();
    match retired {
        None => life.count(conn.await),
        Some(counter) => {
            counter.inc();
            // A stop meanwhile does not shorten this: the drain it starts is no longer.
            if let Ok(r) = tokio::time::timeout(life.drain, conn).await {
                life.count(r);
            }
        }
    }
}

impl Lifetime {
    fn count(&self, ended: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
        if let Err(e) = ended {
            self.errors.count(&*e);
        }
    }
}

/// A connection's requests in flight: counted from the service's call to the end of the
/// response body (an HTTP/2 stream lives that long), and a wake-up when the count moves
/// between zero and one.
#[derive(Default)]
pub struct Live {
    n: AtomicUsize,
    moved: Notify,
    /// A stream of the connection was given up (`Retire`).
    given_up: Notify,
}

/// What an HTTP/2 request's response relay holds of its connection (a request extension put
/// there by `Tracked`): a stream whose window the client kept shut for the send timeout
/// retires the connection (module header).
#[derive(Clone)]
pub struct Retire(Arc<Live>);

impl Retire {
    pub fn stream_given_up(&self) {
        // `notify_one` keeps a permit when `drive` is not waiting at this moment.
        self.0.given_up.notify_one();
    }
}

impl Live {
    /// Completes once no request has been in flight for `idle` in a row.
    async fn idle_for(&self, idle: Duration) {
        loop {
            // Registered before the count is read, so a move between the two still wakes it
            // (`Notify::notify_one` keeps a permit for a waiter not polled yet).
            let moved = self.moved.notified();
            if self.n.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = Deadline::after(idle) => return,
                    _ = moved => {}
                }
            } else {
                moved.await;
            }
        }
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        if self.n.fetch_add(1, Ordering::AcqRel) == 0 {
            self.moved.notify_one();
        }
        InFlight(self.clone())
    }
}

/// One request in flight on the connection; dropped with its response body (or with its
/// future, when the stream ends before a response).
struct InFlight(Arc<Live>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.moved.notify_one();
        }
    }
}

/// A connection's service, counting its requests in `live`.
pub struct Tracked<S> {
    pub inner: S,
    pub live: Arc<Live>,
}

impl<S, T, B> hyper::service::Service<http::Request<T>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<T>, Response = http::Response<B>>,
    S::Future: Unpin,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: http::Request<T>) -> Self::Future {
        if req.version() == http::Version::HTTP_2 {
            req.extensions_mut().insert(Retire(self.live.clone()));
        }
        TrackedFuture {
            inner: self.inner.call(req),
            held: Some(self.live.enter()),
        }
    }
}

pub struct TrackedFuture<F> {
    inner: F,
    held: Option<InFlight>,
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>> + Unpin,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let res = std::task::ready!(Pin::new(&mut this.inner).poll(cx));
        let held = this.held.take();
        Poll::Ready(res.map(|resp| resp.map(|inner| TrackedBody { inner, _held: held })))
    }
}

/// A response body that keeps its request counted until hyper drops it.
pub struct TrackedBody<B> {
    inner: B,
    _held: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The idle wait does not end while a request is in flight, however long, and ends only a
    /// whole quiet `idle` after the last request is out. (Lower bounds only: a deadline never
    /// fires early, so nothing here depends on the machine's speed.)
    #[tokio::test]
    async fn idle_counts_from_the_last_request_out() {
        let live = Arc::new(Live::default());
        let idle = Duration::from_millis(200);
        let waiting = tokio::spawn({
            let live = live.clone();
            async move { live.idle_for(idle).await }
        });
        let req = live.enter();
        let second = live.enter();
        tokio::time::sleep(idle * 3).await;
        assert!(!waiting.is_finished(), "idle with two requests in flight");
        drop(req);
        tokio::time::sleep(idle * 2).await;
        assert!(!waiting.is_finished(), "idle with one request in flight");
        let out = Instant::now();
        drop(second);
        waiting.await.unwrap();
        assert!(out.elapsed() >= idle, "{:?}", out.elapsed());
    }
}
