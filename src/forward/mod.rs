//! Forwarding: an upstream's targets (round robin, ejection of failed ones), the exchange of
//! one request with a target over a pooled HTTP/1.1 connection (plain or TLS) with connect and
//! response timeouts, the one resend a request gets when its pooled connection proves closed,
//! and the classification of what can go wrong.
//!
//! Upstream addresses come only from static config, never from the request (no SSRF through
//! Host or an absolute URI); requests go out in origin-form with the client's Host. Errors
//! are classified once here: connect failures including TLS (502, target ejected),
//! response-head timeout (504), protocol errors including an unrequested 101 (502), and the
//! client's own body being too large (413) or too slow (408).
//!
//! The HTTP/1.1 client is keygate's own (`wire`, `exchange`, `conn`): the request's task
//! writes the head and body and reads the response itself, with no task per connection and
//! no channel between the two (hyper's client connection cost ~20 % of the instructions of a
//! forwarded request, most of it handing each request to the connection's task and back).
//!
//! Sub-modules: `wire` (the HTTP/1.1 format: heads, framing, chunks), `exchange` (one request
//! and its response on a connection), `body` (the request and response bodies), `conn` (an
//! open connection and its buffer), `pool` (idle connections), `connect` (target addresses
//! and dialing), `tls` (the https client config).

mod body;
mod conn;
mod connect;
mod exchange;
mod pool;
mod tls;
mod wire;

pub use body::{BodyError, BodyStalled, ClientBody, GuardedBody, UpstreamBody};
pub use connect::ConnectError;
pub use wire::WireError;

use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use connect::{Address, Target, TargetTls};
use exchange::{Exchange, ExchangeError};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body::Body as _;
use prometheus::{Histogram, IntCounter};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
        Ok(Upstream {
            name: u.name.clone(),
            targets,
            next: AtomicUsize::new(0),
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
        // The clock only for a target that was ever ejected (0: never).
        let now = std::cell::OnceCell::new();
        (0..n)
            .map(|i| &self.targets[(start + i) % n])
            .find(|t| match t.ejected_until.load(Ordering::Relaxed) {
                0 => true,
                until => until <= *now.get_or_init(|| self.now_ms()),
            })
            .or_else(|| self.targets.get(start % n.max(1)))
    }

    /// Send `req` with the gateway's own `fields` after its headers to a target, with
    /// `path_and_query` as its origin-form target (`None`: the request's URI already is),
    /// and wait for the response head. Returns it with the time the upstream took to it.
    pub async fn send(
        &self,
        req: Request<GuardedBody>,
        path_and_query: Option<&str>,
        fields: &crate::hygiene::Fields,
    ) -> Result<(Response<UpstreamBody>, Duration), GatewayError> {
        // `ok_or_else`: the error boxes a string, two allocations a request if made eagerly.
        let target = self
            .pick()
            .ok_or_else(|| GatewayError::UpstreamUnavailable("upstream has no targets".into()))?;
        let (parts, body) = req.into_parts();
        // The target is written to the wire as it is: only what parses as one goes.
        let path = match path_and_query {
            Some(p) => PathAndQuery::try_from(p)
                .map_err(|_| GatewayError::BadRequest("path cannot be forwarded"))?,
            None => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        let framing = wire::RequestFraming::of(body.is_end_stream(), body.size_hint().exact());
        let head = wire::request_head(
            &parts.method,
            path.as_str(),
            &parts.headers,
            fields.as_bytes(),
            framing,
        );
        // The clock is read twice per exchange: its deadline, the pool's idle check and its
        // duration all come from these two readings.
        let started = Instant::now();
        let result = crate::deadline::timeout_at(
            started + self.response_timeout,
            self.exchange(target, &parts.method, head, body, framing, started),
        )
        .await;
        let took = started.elapsed();
        self.series.duration.observe(took.as_secs_f64());
        match result {
            Err(_) => {
                self.series.timeouts.inc();
                Err(GatewayError::UpstreamTimeout)
            }
            Ok(Err(e)) => Err(self.classify(e, target)),
            Ok(Ok((head, exchange))) => {
                let body = UpstreamBody::new(
                    exchange,
                    head.framing,
                    head.keep_alive,
                    self.response_timeout,
                    self.series.timeouts.clone(),
                );
                Ok((Response::from_parts(head.parts, body), took))
            }
        }
    }

    /// One request on an idle pooled connection, or a new one, sent once more on a new
    /// connection when a pooled one turns out to have been closed by the upstream
    /// (`ExchangeError::Closed`: an end of stream or reset before any byte of a response):
    /// - a request nothing of which was written, always;
    /// - one that was written, only if it is safe to repeat and has no body (RFC 9110
    ///   §9.2.1: GET, HEAD, OPTIONS, TRACE). An upstream that closes idle connections (a
    ///   short keep-alive timeout) races every reuse: the close can be on the wire while the
    ///   request goes out. Any other request that was written is not sent again (it may not
    ///   be idempotent): the client gets the 502.
    async fn exchange(
        &self,
        target: &Target,
        method: &Method,
        head: bytes::Bytes,
        body: GuardedBody,
        framing: wire::RequestFraming,
        started: Instant,
    ) -> Result<(wire::Head, Exchange), ExchangeError> {
        let Some(lease) = target.pool.take(started) else {
            let lease = self.connect(target).await?;
            return Exchange::new(lease, head, body, framing).head(method).await;
        };
        let mut pooled = Exchange::new(lease, head.clone(), body, framing);
        let e = match std::future::poll_fn(|cx| pooled.poll_head(cx, method)).await {
            Ok(h) => return Ok((h, pooled)),
            Err(e) => e,
        };
        let repeatable = framing == wire::RequestFraming::Empty
            && matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            );
        if !matches!(e, ExchangeError::Closed) || (pooled.wrote() && !repeatable) {
            return Err(e);
        }
        let Some(body) = pooled.into_unsent() else {
            return Err(e);
        };
        let lease = self.connect(target).await?;
        Exchange::new(lease, head, body, framing).head(method).await
    }

    /// Boxed: a new connection's state (TLS included) would otherwise be part of, and copied
    /// with, every exchange's future, pooled or not.
    async fn connect(&self, target: &Target) -> Result<pool::Lease, ExchangeError> {
        crate::boxed::boxed(|| target.connect(self.connect_timeout))
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
            // The client's own body failing is not the upstream's fault.
            ExchangeError::Body(b) => match b {
                BodyError::TooLarge => GatewayError::BodyTooLarge,
                BodyError::Timeout => GatewayError::BodyTimeout,
                BodyError::Client(_) => GatewayError::BadRequest("client body aborted"),
                BodyError::Length => {
                    GatewayError::BadRequest("body length differs from Content-Length")
                }
            },
            e @ (ExchangeError::Wire(_) | ExchangeError::Io(_) | ExchangeError::Closed) => {
                self.series.protocol_errors.inc();
                GatewayError::UpstreamError(Box::new(e))
            }
        }
    }
}
