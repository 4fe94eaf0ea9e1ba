//! Forwarding: an upstream's targets (round robin, ejection of failed ones), the exchange of
//! one request with a target over a pooled HTTP/1.1 connection (plain or TLS) with connect and
//! response timeouts, and the classification of what can go wrong.
//!
//! Upstream addresses come only from static config, never from the request (no SSRF through
//! Host or an absolute URI); requests go out in origin-form with the client's Host. Errors
//! are classified once here: connect failures including TLS (502, target ejected),
//! response-head timeout (504), protocol errors including an unrequested 101 (502), and the
//! client's own body being too large (413) or too slow (408).
//!
//! Sub-modules: `body` (the request and response bodies), `pool` (idle connections and their
//! driver tasks), `connect` (target addresses and dialing), `tls` (the https client config).

mod body;
mod connect;
mod pool;
mod tls;

pub use body::{BodyError, BodyStalled, GuardedBody, UpstreamBody};
pub use connect::ConnectError;

use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use connect::{Address, Target, TargetTls};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use pool::Lease;
use prometheus::{Histogram, IntCounter};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest upstream response head we relay; bigger is a broken or hostile upstream (502).
const MAX_UPSTREAM_HEAD_BYTES: usize = 64 * 1024;

/// Response headers accepted from an upstream (hyper's default, kept explicit).
const MAX_UPSTREAM_HEADERS: usize = 100;

/// Why an exchange with a target failed, before classification.
#[derive(Debug)]
enum ExchangeError {
    Connect(ConnectError),
    Send(hyper::Error),
}

/// Series for one upstream, resolved once.
#[derive(Clone)]
pub struct UpstreamSeries {
    pub duration: Histogram,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub protocol_errors: IntCounter,
}

/// One configured upstream: its targets, each with its own idle-connection pool.
pub struct Upstream {
    pub name: String,
    targets: Vec<Target>,
    next: AtomicUsize,
    http: hyper::client::conn::http1::Builder,
    connect_timeout: Duration,
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
    /// `upstreams[i]` of the config, validated: targets parsed, and for https targets the CA,
    /// the optional client certificate and the server names loaded. Errors name the field.
    pub fn from_config(
        c: &Config,
        i: usize,
        series: UpstreamSeries,
    ) -> Result<Upstream, ConfigError> {
        let u = &c.upstreams[i];
        let field = |f: &str| format!("upstreams[{i}].{f}");
        if u.targets.is_empty() {
            return Err(c.invalid(
                field("targets"),
                "needs at least one host:port or https://host:port",
            ));
        }
        let addresses = u
            .targets
            .iter()
            .map(|t| {
                Address::parse(t).ok_or_else(|| {
                    c.invalid(
                        field("targets"),
                        format!("{t:?} is not host:port, http://host:port or https://host:port"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = Self::tls_config(c, i, addresses.iter().any(|a| a.https))?;
        let idle_timeout = Duration::from_millis(u.pool_idle_timeout_ms);
        let mut targets = Vec::with_capacity(addresses.len());
        for address in addresses {
            let target_tls = match (&tls, address.https) {
                (Some(config), true) => {
                    let (name, name_field) = match &u.server_name {
                        Some(n) => (n.as_str(), "server_name"),
                        None => (&*address.host, "targets"),
                    };
                    let name = tls::server_name(name).ok_or_else(|| {
                        c.invalid(
                            field(name_field),
                            format!(
                                "{name:?} is not a DNS name or IP address a certificate can name"
                            ),
                        )
                    })?;
                    Some(TargetTls {
                        connector: tokio_rustls::TlsConnector::from(config.clone()),
                        name,
                    })
                }
                _ => None,
            };
            targets.push(Target::new(address, target_tls, idle_timeout));
        }
        let mut http = hyper::client::conn::http1::Builder::new();
        http.max_buf_size(MAX_UPSTREAM_HEAD_BYTES.max(8192))
            .max_headers(MAX_UPSTREAM_HEADERS);
        Ok(Upstream {
            name: u.name.clone(),
            targets,
            next: AtomicUsize::new(0),
            http,
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            response_timeout: Duration::from_millis(u.response_timeout_ms),
            eject: Duration::from_millis(u.eject_ms),
            epoch: Instant::now(),
            series,
        })
    }

    /// The client config for this upstream's https targets; `ca`, `server_name` and the
    /// client certificate are refused when no target is https (they would silently do nothing).
    fn tls_config(
        c: &Config,
        i: usize,
        any_https: bool,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, ConfigError> {
        let u = &c.upstreams[i];
        let field = |f: &str| format!("upstreams[{i}].{f}");
        if !any_https {
            let set = [
                ("ca", u.ca.is_some()),
                ("server_name", u.server_name.is_some()),
                ("client_cert", u.client_cert.is_some()),
                ("client_key", u.client_key.is_some()),
            ];
            return match set.iter().find(|(_, is_set)| *is_set) {
                Some((f, _)) => Err(c.invalid(
                    field(f),
                    "only used for https:// targets, and no target is https://",
                )),
                None => Ok(None),
            };
        }
        let ca = u.ca.as_ref().ok_or_else(|| {
            c.invalid(
                field("ca"),
                "required for https:// targets: the PEM CA bundle that signs the upstream's certificate (keygate ships no public root store)",
            )
        })?;
        let client = match (&u.client_cert, &u.client_key) {
            (Some(cert), Some(key)) => Some((c.resolve(cert), c.resolve(key))),
            (None, None) => None,
            (Some(_), None) => {
                return Err(c.invalid(field("client_key"), "client_cert needs client_key"))
            }
            (None, Some(_)) => {
                return Err(c.invalid(field("client_cert"), "client_key needs client_cert"))
            }
        };
        tls::client_config(
            &c.resolve(ca),
            client
                .as_ref()
                .map(|(cert, key)| (cert.as_path(), key.as_path())),
        )
        .map(Some)
        .map_err(|e| c.invalid(field(e.field), e.message))
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

    /// Send `req` to a target, with `path_and_query` as its origin-form target (`None`: the
    /// request's URI already is), and wait for the response head.
    pub async fn send(
        &self,
        mut req: Request<GuardedBody>,
        path_and_query: Option<&str>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let target = self.pick().ok_or(GatewayError::UpstreamUnavailable(
            "upstream has no targets".into(),
        ))?;
        if let Some(path_and_query) = path_and_query {
            let path = PathAndQuery::try_from(path_and_query)
                .map_err(|_| GatewayError::BadRequest("path cannot be forwarded"))?;
            *req.uri_mut() = Uri::from(path);
        }
        *req.version_mut() = http::Version::HTTP_11;
        let started = Instant::now();
        let result =
            crate::deadline::timeout(self.response_timeout, self.exchange(target, req)).await;
        self.series
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Err(_) => {
                self.series.timeouts.inc();
                Err(GatewayError::UpstreamTimeout)
            }
            Ok(Err(e)) => Err(self.classify(e, target)),
            Ok(Ok((resp, _))) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                // We never ask for an upgrade, so a 101 is a desync or an attack (THREATS H9).
                // Dropping the lease closes the connection.
                self.series.protocol_errors.inc();
                Err(GatewayError::UpstreamError(
                    "unrequested 101 from upstream".into(),
                ))
            }
            Ok(Ok((resp, _)))
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
            Ok(Ok((resp, lease))) => {
                let (parts, body) = resp.into_parts();
                let body = UpstreamBody::new(
                    body,
                    self.response_timeout,
                    self.series.timeouts.clone(),
                    lease,
                );
                Ok(Response::from_parts(parts, body))
            }
        }
    }

    /// One request on an idle pooled connection, or a new one, sent once more on a new
    /// connection when a pooled one turns out to have been closed by the upstream:
    /// - a request that never left (hyper hands it back) always;
    /// - one that was written, only if it is safe to repeat and has no body
    ///   (`replayable`), and only when its connection came from the pool and ended before a
    ///   response (`closed_under_us`). An upstream that closes idle connections (a short
    ///   keep-alive timeout) races every reuse: the close can be on the wire while the
    ///   request goes out. Any other request that was written is not retried (it may not be
    ///   idempotent): the client gets the 502.
    async fn exchange(
        &self,
        target: &Target,
        req: Request<GuardedBody>,
    ) -> Result<(Response<Incoming>, Lease), ExchangeError> {
        let (mut lease, replay) = match target.pool.take() {
            Some(lease) => (lease, replayable(&req)),
            None => (self.connect(target).await?, None),
        };
        let again = match lease.sender().try_send_request(req).await {
            Ok(resp) => return Ok((resp, lease)),
            Err(mut e) => match (e.take_message(), replay) {
                (Some(req), _) => req,
                (None, Some(req)) => {
                    let e = e.into_error();
                    if !closed_under_us(&e) {
                        return Err(ExchangeError::Send(e));
                    }
                    req
                }
                (None, None) => return Err(ExchangeError::Send(e.into_error())),
            },
        };
        drop(lease);
        let mut fresh = self.connect(target).await?;
        match fresh.sender().send_request(again).await {
            Ok(resp) => Ok((resp, fresh)),
            Err(e) => Err(ExchangeError::Send(e)),
        }
    }

    /// Boxed: a new connection's state (~2.5 KiB, TLS included) would otherwise be part of,
    /// and copied with, every exchange's future, pooled or not.
    async fn connect(&self, target: &Target) -> Result<Lease, ExchangeError> {
        Box::pin(target.connect(&self.http, self.connect_timeout))
            .await
            .map_err(ExchangeError::Connect)
    }

    fn classify(&self, e: ExchangeError, target: &Target) -> GatewayError {
        match e {
            ExchangeError::Connect(e) => {
                self.series.connect_errors.inc();
                target.ejected_until.store(
                    self.now_ms() + self.eject.as_millis() as i64,
                    Ordering::Relaxed,
                );
                GatewayError::UpstreamUnavailable(Box::new(e))
            }
            ExchangeError::Send(e) => {
                // The client's own body failing is not the upstream's fault.
                let mut source: Option<&(dyn std::error::Error + 'static)> =
                    std::error::Error::source(&e);
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
                self.series.protocol_errors.inc();
                GatewayError::UpstreamError(Box::new(e))
            }
        }
    }
}

/// A copy of `req` to send again should its pooled connection prove closed: only for a method
/// that is safe to repeat (RFC 9110 §9.2.1: GET, HEAD, OPTIONS, TRACE) with no body, which
/// is all a copy needs (method, target, headers). `None` for anything else.
fn replayable(req: &Request<GuardedBody>) -> Option<Request<GuardedBody>> {
    use http::Method;
    let safe = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !safe || !hyper::body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(GuardedBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The upstream closed (or reset) the connection before any response came: what a pooled
/// connection the upstream had already let go of looks like once the request is written.
fn closed_under_us(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = s.source();
    }
    false
}
