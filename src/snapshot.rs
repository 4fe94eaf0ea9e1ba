//! The validated, indexed, immutable view of the config that the request path reads.
//!
//! Built whole from a `Config` (at start and on every reload) and swapped in one `ArcSwap`
//! store; a config that fails validation never replaces a working one. Everything the hot
//! path needs is precomputed here: the router, per-route requirements and metric series,
//! plan bucket shapes, the key header name.

use crate::authz::Requirements;
use crate::config::{parse_duration, Config, ConfigError, ServerConfig};
use crate::error::RouteTraits;
use crate::forward::{Upstream, UpstreamSeries};
use crate::keys::KeySettings;
use crate::limit::{Backend, OnRedisDown, Rate, Shape};
use crate::metrics::{Metrics, RouteSeries};
use crate::redis::quota::Quota;
use crate::route::{RouteSpec, Router};
use http::header::HeaderName;
use http::Method;
use ipnet::IpNet;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Longest route name, bytes. A route's name is a metrics label, a field of access lines and
/// audit records, and a field of the events a feed gateway relays, which the control plane
/// refuses over `relay::MAX_FIELD_BYTES`: a canary alarm on a longer name could not be relayed.
pub const MAX_ROUTE_NAME_BYTES: usize = 64;
const _: () = assert!(MAX_ROUTE_NAME_BYTES <= crate::webhooks::relay::MAX_FIELD_BYTES);

/// A route's name: 1 to `MAX_ROUTE_NAME_BYTES` of `A-Z a-z 0-9 . _ -`. It is shown bare in
/// metrics labels, logs, dashboards and webhook deliveries, so nothing there needs quoting or
/// escaping (no spaces, quotes or control characters), and an empty name would label nothing.
/// The message does not echo the name (it may be long, or hold a newline).
fn check_route_name(name: &str) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_ROUTE_NAME_BYTES || !plain {
        return Err(format!(
            "must be 1 to {MAX_ROUTE_NAME_BYTES} characters of A-Z, a-z, 0-9, '.', '_' and '-' (this one: {} bytes)",
            name.len()
        ));
    }
    Ok(())
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub requirements: Requirements,
    pub upstream: Arc<Upstream>,
    pub query_key_param: Option<String>,
    pub max_body_bytes: u64,
    pub methods: Vec<Method>,
    pub series: RouteSeries,
    /// The token audience this route accepts (`accept_tokens`); None: tokens are refused.
    pub accept_tokens: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    Serve,
    FailClosed,
}

/// Where a gateway in fleet mode gets its keys.
#[derive(Debug, Clone)]
pub struct FeedSource {
    pub url: String,
    /// Client TLS for an `https://` feed, trusting only `keys.feed_ca`.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub usage_url: http::Uri,
    pub token: String,
    pub cache: std::path::PathBuf,
    /// Stable name of this gateway in usage reports (host + usage file).
    pub node: String,
}

/// `[limits]` as the request path needs it.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    pub backend: Backend,
    pub on_redis_down: OnRedisDown,
    /// Global default of shadow mode (`false`: count, never refuse); a plan may override.
    pub enforce: bool,
}

/// How often usage is flushed: `API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS`, else
/// `[keys] touch_interval_seconds` (60 s), at least a second.
pub fn touch_interval(c: &Config) -> Result<Duration, ConfigError> {
    let secs = match std::env::var("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS") {
        Ok(v) => v.trim().parse::<u64>().map_err(|_| {
            c.invalid(
                "API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS (env)",
                "must be whole seconds",
            )
        })?,
        Err(_) => c.keys.touch_interval_seconds.unwrap_or(60),
    };
    Ok(Duration::from_secs(secs.max(1)))
}

/// Plans, quotas and shadow mode: what one key's request is charged against, for the
/// gateway's request path and the control plane's verify endpoint alike (`limit::charge`).
#[derive(Debug, Clone)]
pub struct LimitPolicy {
    pub plans: HashMap<String, Shape>,
    /// Shape for keys naming no plan and no rate (plan "default" / API_KEY_DEFAULT_RATE_LIMIT).
    pub default_shape: Option<Shape>,
    /// Plans' calendar quotas.
    pub plan_quotas: HashMap<String, Quota>,
    /// Plans' `enforce` overrides.
    pub plan_enforce: HashMap<String, bool>,
    pub limits: LimitSettings,
}

impl LimitPolicy {
    /// `[plans.*]` and `[limits]` of `c`, validated; quotas and the Redis backend need
    /// `[redis]` (`has_redis`).
    pub fn from_config(c: &Config, has_redis: bool) -> Result<LimitPolicy, ConfigError> {
        let plans = plan_shapes(c)?;
        let default_shape = plans.get("default").copied();
        let mut plan_quotas = HashMap::new();
        let mut plan_enforce = HashMap::new();
        for (name, p) in &c.plans {
            if let Some(q) = &p.quota {
                let field = format!("plans.{name}.quota");
                let q = Quota::parse(q).map_err(|m| c.invalid(&field, m))?;
                if !has_redis {
                    return Err(c.invalid(
                        field,
                        "a quota is counted fleet-wide in Redis: add a [redis] section",
                    ));
                }
                plan_quotas.insert(name.clone(), q);
            }
            if let Some(e) = p.enforce {
                plan_enforce.insert(name.clone(), e);
            }
        }
        let limits = LimitSettings {
            backend: Backend::parse(&c.limits.backend)
                .map_err(|m| c.invalid("limits.backend", m))?,
            on_redis_down: OnRedisDown::parse(&c.limits.on_redis_down)
                .map_err(|m| c.invalid("limits.on_redis_down", m))?,
            enforce: c.limits.enforce,
        };
        if limits.backend == Backend::Redis && !has_redis {
            return Err(c.invalid("limits.backend", "\"redis\" needs a [redis] section"));
        }
        Ok(LimitPolicy {
            plans,
            default_shape,
            plan_quotas,
            plan_enforce,
            limits,
        })
    }

    /// The bucket shape for a key: its own rate, else its plan, else the default plan.
    pub fn shape_for(&self, rate: Option<&str>, plan: Option<&str>) -> Option<Shape> {
        // Most keys have neither: no map lookup then.
        if rate.is_none() && plan.is_none() {
            return self.default_shape;
        }
        shape_in(&self.plans, rate, plan).or(self.default_shape)
    }

    /// The quota for a key: its own, else its plan's (or the default plan's).
    pub fn quota_for(&self, own: Option<&str>, plan: Option<&str>) -> Option<Quota> {
        if let Some(q) = own.and_then(|q| Quota::parse(q).ok()) {
            return Some(q);
        }
        if self.plan_quotas.is_empty() {
            return None;
        }
        let plan = plan
            .filter(|p| self.plans.contains_key(*p))
            .unwrap_or("default");
        self.plan_quotas.get(plan).copied()
    }

    /// Whether refusals are enforced for a key of `plan` (false: shadow mode).
    pub fn enforce_for(&self, plan: Option<&str>) -> bool {
        let plan = plan
            .filter(|p| self.plans.contains_key(*p))
            .unwrap_or("default");
        self.plan_enforce
            .get(plan)
            .copied()
            .unwrap_or(self.limits.enforce)
    }
}

#[derive(Debug)]
pub struct Snapshot {
    /// `None`: follow the store file (the default).
    pub feed: Option<FeedSource>,
    pub keys: KeySettings,
    pub router: Router,
    pub routes: Vec<Route>,
    /// Series for requests that matched no route.
    pub unrouted: RouteSeries,
    /// Plans, quotas and shadow mode: what a key's requests are charged against.
    pub policy: LimitPolicy,
    /// `[redis]`, validated (the client itself is built once, at start).
    pub redis: Option<crate::redis::Settings>,
    pub trusted_proxies: Vec<IpNet>,
    pub key_header: HeaderName,
    pub allowed_origins: Vec<String>,
    pub server: ServerConfig,
    pub max_staleness: Duration,
    pub on_stale: OnStale,
    pub touch_interval: Duration,
    /// `[tokens]`: how this gateway gets the public keys of short-lived tokens.
    pub tokens: crate::tokens::TokenSettings,
    /// Where keys seen under an old secret version are re-digested (`redigest`).
    pub redigest: crate::redigest::Target,
    pub config: Config,
}

fn shape(c: &Config, field: &str, rate: &str, burst: Option<u32>) -> Result<Shape, ConfigError> {
    Ok(Shape::new(
        Rate::parse(rate).map_err(|m| c.invalid(field, m))?,
        burst,
    ))
}

/// Every plan's bucket shape (plus `API_KEY_DEFAULT_RATE_LIMIT` as plan "default"): what the
/// gateway limits with, and the control plane's verify endpoint too.
pub fn plan_shapes(c: &Config) -> Result<HashMap<String, Shape>, ConfigError> {
    let mut plans = HashMap::new();
    for (name, p) in &c.plans {
        plans.insert(
            name.clone(),
            shape(c, &format!("plans.{name}.rate"), &p.rate, p.burst)?,
        );
    }
    if let Ok(rate) = std::env::var("API_KEY_DEFAULT_RATE_LIMIT") {
        let burst = c.plans.get("default").and_then(|p| p.burst);
        plans.insert(
            "default".into(),
            shape(c, "API_KEY_DEFAULT_RATE_LIMIT (env)", &rate, burst)?,
        );
    }
    Ok(plans)
}

/// The bucket shape for a key: its own rate, else its plan, else the default plan.
pub fn shape_in(
    plans: &HashMap<String, Shape>,
    rate: Option<&str>,
    plan: Option<&str>,
) -> Option<Shape> {
    if let Some(r) = rate.and_then(|r| Rate::parse(r).ok()) {
        return Some(Shape::new(r, None));
    }
    plan.and_then(|p| plans.get(p).copied())
        .or_else(|| plans.get("default").copied())
}

impl Snapshot {
    /// Validate `c` and build a snapshot. `metrics` resolves the hot-path series.
    pub fn build(c: Config, metrics: &Metrics) -> Result<Snapshot, ConfigError> {
        let keys = KeySettings::from_config(&c)?;
        c.check_listen()?;
        crate::access::validate(&c)?;
        // Webhook settings are used by the sender (`webhooks::run`); checked here so `check`,
        // `serve` and a reload refuse a bad entry the same way.
        crate::webhooks::endpoints(&c)?;
        let redis = crate::redis::Settings::from_config(&c)?;
        let policy = LimitPolicy::from_config(&c, redis.is_some())?;
        if c.limits.lease_window_ms == 0 || c.limits.lease_max == 0 {
            return Err(c.invalid(
                "limits.lease_window_ms",
                "lease_window_ms and lease_max must be at least 1",
            ));
        }

        let mut upstreams = HashMap::new();
        for (i, u) in c.upstreams.iter().enumerate() {
            let series = UpstreamSeries {
                duration: metrics.upstream_duration.with_label_values(&[&u.name]),
                connect_errors: metrics
                    .upstream_errors
                    .with_label_values(&[&u.name, "connect"]),
                timeouts: metrics
                    .upstream_errors
                    .with_label_values(&[&u.name, "timeout"]),
                protocol_errors: metrics
                    .upstream_errors
                    .with_label_values(&[&u.name, "protocol"]),
            };
            if upstreams
                .insert(
                    u.name.clone(),
                    Arc::new(Upstream::from_config(&c, i, series)?),
                )
                .is_some()
            {
                return Err(c.invalid(
                    format!("upstreams[{i}].name"),
                    format!("duplicate upstream {:?}", u.name),
                ));
            }
        }

        let mut specs = Vec::new();
        let mut routes = Vec::new();
        for (i, r) in c.routes.iter().enumerate() {
            let field = |f: &str| format!("routes[{i}].{f}");
            check_route_name(&r.name).map_err(|m| c.invalid(field("name"), m))?;
            if !r.path_prefix.starts_with('/') {
                return Err(c.invalid(field("path_prefix"), "must start with /"));
            }
            if crate::path::canonicalize(&r.path_prefix).ok().as_deref()
                != Some(r.path_prefix.as_str())
            {
                return Err(c.invalid(
                    field("path_prefix"),
                    "must be a canonical path (no dot segments, // or %-escapes of / or \\)",
                ));
            }
            // The router reads a request's path with and without its `;params` and needs a
            // prefix that reads the same both ways (`route::Router::find`).
            if crate::path::has_params(r.path_prefix.as_bytes()) {
                return Err(c.invalid(
                    field("path_prefix"),
                    "must not carry path parameters (; or %3B)",
                ));
            }
            let upstream = upstreams.get(&r.upstream).cloned().ok_or_else(|| {
                c.invalid(
                    field("upstream"),
                    format!("no upstream named {:?}", r.upstream),
                )
            })?;
            let methods = r
                .methods
                .iter()
                .map(|m| {
                    // Requests with any other spelling are refused: such a method could never
                    // be matched (`route::method_is_canonical`).
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .ok()
                        .filter(crate::route::method_is_canonical)
                        .ok_or_else(|| c.invalid(field("methods"), format!("bad method {m:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if methods.contains(&Method::CONNECT) {
                return Err(c.invalid(field("methods"), "CONNECT is not proxied"));
            }
            if let Some(env) = &r.env {
                if !c.keys.envs.contains(env) {
                    return Err(c.invalid(field("env"), format!("{env:?} is not in keys.envs")));
                }
            }
            let host = match &r.host {
                Some(h) => Some(
                    crate::route::canonical_host(h)
                        .ok_or_else(|| c.invalid(field("host"), format!("bad host {h:?}")))?,
                ),
                None => None,
            };
            // The same scope rule as for keys: a route demanding `invoices:*` would refuse
            // every key (there are no wildcards).
            for scope in &r.scopes {
                crate::keys::ops::check_scope(scope)
                    .map_err(|e| c.invalid(field("scopes"), e.to_string()))?;
            }
            if routes.iter().any(|x: &Route| x.name == r.name) {
                return Err(c.invalid(field("name"), format!("duplicate route {:?}", r.name)));
            }
            specs.push(RouteSpec {
                host,
                path_prefix: r.path_prefix.clone(),
                methods: methods.clone(),
            });
            routes.push(Route {
                name: r.name.clone(),
                requirements: Requirements {
                    scopes: r.scopes.clone(),
                    env: r.env.clone(),
                    publishable: r.publishable,
                },
                upstream,
                query_key_param: r.query_key_param.clone(),
                max_body_bytes: r.max_body_bytes.unwrap_or(c.server.max_body_bytes),
                methods,
                series: metrics.route_series(&r.name, |o| {
                    o.reachable(Some(&RouteTraits {
                        tokens: r.accept_tokens.is_some(),
                        scopes: !r.scopes.is_empty(),
                        env: r.env.is_some(),
                        publishable: r.publishable,
                        quota: redis.is_some(),
                    }))
                }),
                accept_tokens: r.accept_tokens.as_ref().map(|a| a.audience.clone()),
            });
        }

        let trusted_proxies = c
            .server
            .trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        c.invalid(
                            "server.trusted_proxies",
                            format!("{p:?} is not a CIDR or address"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key_header =
            HeaderName::from_bytes(c.server.key_header.to_ascii_lowercase().as_bytes())
                .map_err(|_| c.invalid("server.key_header", "not a valid header name"))?;
        let allowed_origins = allowed_origins(&c);
        let max_staleness = parse_duration(&c.keys.max_staleness)
            .map_err(|m| c.invalid("keys.max_staleness", m))?;
        if c.server.send_timeout_ms == 0 {
            return Err(c.invalid(
                "server.send_timeout_ms",
                "must be at least 1 (a write that may not wait at all would cut every client)",
            ));
        }
        if c.server.h2_idle_timeout_ms == 0 {
            return Err(c.invalid(
                "server.h2_idle_timeout_ms",
                "must be at least 1 (an HTTP/2 connection would be closed between its requests)",
            ));
        }
        if c.keys.max_snapshot_drop_percent > 100 {
            return Err(c.invalid(
                "keys.max_snapshot_drop_percent",
                "a share of the live keys: 0 to 100 (100 turns the guard off)",
            ));
        }
        let on_stale = match c.keys.on_stale.as_str() {
            "serve" => OnStale::Serve,
            "fail_closed" => OnStale::FailClosed,
            other => {
                return Err(c.invalid(
                    "keys.on_stale",
                    format!("{other:?}: use \"serve\" or \"fail_closed\""),
                ))
            }
        };
        let touch_interval = touch_interval(&c)?;
        for (field, v) in [
            ("server.max_headers", c.server.max_headers),
            ("server.max_connections", c.server.max_connections),
            ("server.max_in_flight", c.server.max_in_flight),
        ] {
            if v == 0 {
                return Err(c.invalid(field, "must be at least 1"));
            }
        }
        if c.server.max_header_bytes < 8192 {
            return Err(c.invalid("server.max_header_bytes", "must be at least 8192"));
        }
        let feed = match c.keys.source.as_str() {
            // "redis" needs [redis]: KeySettings (built above) already said so if missing.
            "file" | "redis" => None,
            "feed" => {
                let url = c.keys.feed_url.clone().ok_or_else(|| {
                    c.invalid("keys.feed_url", "required when keys.source = \"feed\"")
                })?;
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| c.invalid("keys.feed_url", "not a URL"))?;
                let scheme = uri.scheme_str().unwrap_or_default();
                if !matches!(scheme, "http" | "https") || uri.authority().is_none() {
                    return Err(c.invalid("keys.feed_url", "use http(s)://host:port/v1/feed"));
                }
                let tls = match (scheme, &c.keys.feed_ca) {
                    ("https", Some(ca)) => Some(crate::tls::client_config(&c.resolve(ca)).map_err(|e| c.invalid("keys.feed_ca", e.to_string()))?),
                    ("https", None) => return Err(c.invalid("keys.feed_ca", "required for an https:// feed_url: the CA that signs the control plane's certificate")),
                    _ => None,
                };
                let usage_url: http::Uri = format!(
                    "{scheme}://{}/v1/usage",
                    uri.authority().map(|a| a.as_str()).unwrap_or_default()
                )
                .parse()
                .map_err(|_| c.invalid("keys.feed_url", "not a URL"))?;
                let token = std::env::var(&c.keys.feed_token_env).ok().filter(|t| !t.is_empty()).ok_or_else(|| {
                    ConfigError::Secret(format!("{} is not set: a gateway in feed mode needs a feed admin token (keygate admin-token create --role feed)", c.keys.feed_token_env))
                })?;
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                Some(FeedSource {
                    url,
                    tls,
                    usage_url,
                    token,
                    cache: c.resolve(&c.keys.feed_cache),
                    node: format!(
                        "{}:{}",
                        host.trim(),
                        c.resolve(&c.keys.usage_file).display()
                    ),
                })
            }
            other => {
                return Err(c.invalid(
                    "keys.source",
                    format!("{other:?}: use \"file\", \"feed\" or \"redis\""),
                ))
            }
        };
        let tokens = crate::tokens::TokenSettings::from_config(&c, feed.as_ref())?;
        tokens.check_issuer(&c)?;
        let redigest = crate::redigest::Target::from_config(&c, feed.as_ref())?;
        // Last, so a config refused above exports nothing for its plans.
        metrics.plan_series(
            policy
                .plans
                .keys()
                .map(|p| (p.as_str(), policy.enforce_for(Some(p)))),
        );
        Ok(Snapshot {
            tokens,
            redigest,
            feed,
            keys,
            router: Router::new(specs),
            routes,
            unrouted: metrics.route_series("none", |o| o.reachable(None)),
            policy,
            redis,
            trusted_proxies,
            key_header,
            allowed_origins,
            server: c.server.clone(),
            max_staleness,
            on_stale,
            touch_interval,
            config: c,
        })
    }
}

/// The browser origins allowed for keys without their own: env `ALLOWED_ORIGINS` (comma
/// separated) wins over `[cors] allowed_origins`. One reading for `serve` and `check`.
pub fn allowed_origins(c: &Config) -> Vec<String> {
    match std::env::var("ALLOWED_ORIGINS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => c.cors.allowed_origins.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn route_names_are_short_and_plain() {
        let longest = "r".repeat(MAX_ROUTE_NAME_BYTES);
        for ok in [
            "invoices-read",
            "a",
            "v1.read_all",
            "R2-D2",
            longest.as_str(),
        ] {
            assert_eq!(check_route_name(ok), Ok(()), "{ok:?}");
        }
        let over = "r".repeat(MAX_ROUTE_NAME_BYTES + 1);
        for bad in [
            over.as_str(),
            "",
            "a b",
            "a\nb",
            "a\"b",
            "caf\u{e9}",
            "a/b",
            "a\0",
        ] {
            let e = check_route_name(bad).unwrap_err();
            assert!(e.contains("1 to 64"), "{bad:?}: {e}");
        }
    }
}
