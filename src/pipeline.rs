//! The request path. Read this first.
//!
//! `handle` is the one entry point: it runs `pipeline` (the steps, in order, each returning
//! `Result<_, GatewayError>`), turns an error into its problem+json response, and records
//! metrics, the failed-auth budget, usage and audit exactly once. `pipeline` reads top to
//! bottom: admit → table ready → validate head → canonical path → route → (CORS preflight) →
//! extract credential → failure budget → authenticate (key or token) → authorize → rate limit → forward.

use crate::access::{self, AccessBody};
use crate::audit::Event;
use crate::authz;
use crate::error::{GatewayError, Outcome};
use crate::extract;
use crate::forensics::Label;
use crate::forward::{GuardedBody, UpstreamBody};
use crate::gateway::Gateway;
use crate::hygiene;
use crate::hygiene::{X_FORWARDED_FOR, X_REQUEST_ID};
use crate::keys::compact::KeyView;
use crate::keys::format::MAX_KEY_LEN;
use crate::keys::table::AuthError;
use crate::limit::{Refused, Verdict};
use crate::path;
use crate::route::{canonical_host, port_or};
use crate::snapshot::{Route, Snapshot};
use crate::trace::TraceContext;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// What the accept loop knows about a connection. Aligned to 8: as an argument of an `async
/// fn` whose future is boxed per request (`handle`), a 4-aligned value is laid out past the
/// future's largest state, and the copy into the box would span the gap (~3.7 KiB per
/// request through hyper; `crate::boxed`).
#[derive(Debug, Clone, Copy)]
#[repr(align(8))]
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Per-request facts gathered along the way, for recording after the response is decided.
struct Ctx {
    route: Option<usize>,
    key: Option<KeyView>,
    /// The presented key's hint (`format::hint`), kept only for a canary's alarm: the table
    /// holds no hints.
    canary_hint: Option<String>,
    client_ip: IpAddr,
    verdict: Option<Verdict>,
    cors_origin: Option<HeaderValue>,
    trace: TraceContext,
    /// The canonical request host, once the head is validated.
    host: Option<String>,
    /// Time to the upstream's response head.
    upstream: Option<std::time::Duration>,
    /// Counts the request body only when an access line will be written.
    bytes_in: Option<access::BytesIn>,
    /// The User-Agent, cut to a fixed-size label (no allocation) for the key's forensics.
    user_agent: Option<crate::forensics::Label>,
    /// The request's wall-clock second (key validity, usage, forensics, quota alarms): the
    /// clock is read once per request, not per use.
    now: i64,
}

pub async fn handle(
    gw: Arc<Gateway>,
    conn: Conn,
    mut req: Request<crate::forward::ClientBody>,
) -> Result<Response<AccessBody>, Infallible> {
    let started = Instant::now();
    let logged = access::enabled() || gw.sinks.wanted();
    let snap = gw.snapshot();
    let request_id = hygiene::client_request_id(req.headers())
        .and_then(|id| HeaderValue::from_str(id).ok())
        .unwrap_or_else(|| gw.request_id());
    let mut ctx = Ctx {
        route: None,
        key: None,
        canary_hint: None,
        client_ip: conn.peer.ip(),
        verdict: None,
        cors_origin: None,
        trace: gw.trace_ids.context(req.headers()),
        host: None,
        upstream: None,
        bytes_in: logged.then(access::BytesIn::default),
        user_agent: None,
        now: crate::clock::unix_secs(),
    };
    let method = req.method().clone();
    let version = req.version();
    // An HTTP/2 stream's connection (`lifetime::Tracked`), for its response relay.
    let retire = if version == http::Version::HTTP_2 {
        req.extensions_mut().remove::<crate::lifetime::Retire>()
    } else {
        None
    };

    let result = match gw.enter(snap.server.max_in_flight) {
        Some(_in_flight) => {
            // Polled in place: a panic on the path is this request's 500 (`unwind`).
            let mut path = std::pin::pin!(pipeline(
                &gw,
                &snap,
                conn,
                req,
                &request_id,
                &mut ctx,
                started
            ));
            std::future::poll_fn(|cx| crate::unwind::poll_caught(path.as_mut(), cx))
                .await
                .unwrap_or(Err(GatewayError::Internal))
        }
        None => Err(GatewayError::Overloaded),
    };

    let (outcome, mut resp) = match result {
        Ok(resp) => (Outcome::Ok, resp),
        Err(e) => {
            log_error(&e, &ctx, &request_id, &method);
            (
                e.outcome(),
                e.to_response(&ctx.trace.trace_id).map(Either::Right),
            )
        }
    };
    let h = resp.headers_mut();
    h.insert(X_REQUEST_ID.clone(), request_id);
    if let Some(v) = &ctx.verdict {
        v.headers(h);
    }
    if let Some(origin) = ctx.cors_origin.take() {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    record(&gw, &snap, &ctx, outcome, resp.status(), started);
    let line = logged.then(|| access_line(&gw, &snap, ctx, &resp, outcome, method, started));
    let body = |body| AccessBody::new(body, line);
    if version == http::Version::HTTP_2 {
        let after = std::time::Duration::from_millis(snap.server.send_timeout_ms);
        return Ok(resp.map(|b| body(b).pumped(after, &gw.metrics.send_timeouts, retire)));
    }
    Ok(resp.map(body))
}

/// The access line's fields (see `access`): only built when access lines are on.
fn access_line(
    gw: &Gateway,
    snap: &Snapshot,
    ctx: Ctx,
    resp: &Response<RespBody>,
    outcome: Outcome,
    method: Method,
    started: Instant,
) -> Box<access::Line> {
    Box::new(access::Line {
        request_id: resp
            .headers()
            .get(&X_REQUEST_ID)
            .cloned()
            .unwrap_or(HeaderValue::from_static("-")),
        method,
        host: ctx.host,
        route: ctx
            .route
            .and_then(|i| snap.routes.get(i))
            .map(|r| r.name.clone()),
        status: resp.status().as_u16(),
        outcome: outcome.as_str(),
        key_id: ctx.key.as_ref().map(|k| k.id.clone()),
        client_ip: ctx.client_ip,
        trace: ctx.trace,
        started,
        upstream: ctx.upstream,
        bytes_in: ctx.bytes_in.unwrap_or_default(),
        bytes_out: 0,
        sinks: gw.sinks.clone(),
    })
}

async fn pipeline(
    gw: &Gateway,
    snap: &Snapshot,
    conn: Conn,
    req: Request<crate::forward::ClientBody>,
    request_id: &HeaderValue,
    ctx: &mut Ctx,
    started: Instant,
) -> Result<Response<RespBody>, GatewayError> {
    // Fail closed: without a table (or past max_staleness in fail_closed mode) nothing passes.
    if !gw.ready(snap) {
        return Err(GatewayError::TableUnavailable);
    }
    let (mut parts, body) = req.into_parts();
    ctx.host = validate_head(&parts, snap)?;
    // Canonicalise once; routing, scopes and the forwarded path all use this one string.
    let path = path::canonicalize(parts.uri.path())?;
    let preflight = preflight_method(&parts);
    let route_method = preflight.as_ref().unwrap_or(&parts.method);
    let route_idx = snap.router.find(ctx.host.as_deref(), &path, route_method)?;
    ctx.route = Some(route_idx);
    let route = &snap.routes[route_idx];
    if preflight.is_some() {
        return preflight_response(snap, route, &parts.headers, ctx);
    }
    ctx.client_ip = client_ip(conn.peer.ip(), &parts.headers, &snap.trusted_proxies);
    // Read before forwarding consumes the headers; a refused known key is recorded too.
    ctx.user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .map(|v| Label::new(v.as_bytes()));
    let key_param = route.query_key_param.as_deref();
    let presented = extract::extract(
        &parts.headers,
        parts.uri.query(),
        &snap.key_header,
        key_param,
        MAX_PRESENTED,
    )?;
    // A client over its failure budget is refused before we spend an HMAC on it (C7).
    if let Some(wait) = gw.failures.blocked(ctx.client_ip, started) {
        return Err(GatewayError::AuthBudgetExceeded {
            retry_after_secs: wait.as_secs().max(1),
        });
    }
    let key = authenticate(gw, snap, route, presented, ctx).await?;
    // THREATS K3's test: a panic with the request's guards held (`fault`; test builds only).
    #[cfg(feature = "test-panic")]
    crate::fault::panic_if_asked(&parts.headers);
    let origin = parts.headers.get(header::ORIGIN);
    authz::authorize(
        &key,
        &route.requirements,
        ctx.client_ip,
        origin.map(HeaderValue::as_bytes),
        &snap.allowed_origins,
    )?;
    ctx.cors_origin = origin.cloned();
    limits(gw, snap, &key, &mut ctx.verdict).await?;
    // Forward: a declared body over the limit is refused before any byte is read.
    if declared_length(&parts.headers).is_some_and(|n| n > route.max_body_bytes) {
        return Err(GatewayError::BodyTooLarge);
    }
    let target = forwarded_target(&parts.uri, &path, key_param);
    let upstream = hygiene::Forwarding {
        key: &key,
        request_id,
        host: ctx.host.as_deref(),
        tls: conn.tls,
        client: ctx.client_ip,
        trace: &ctx.trace,
    };
    let fields = hygiene::to_upstream(&mut parts.headers, &snap.key_header, &upstream)?;
    let timeout = std::time::Duration::from_millis(snap.server.body_timeout_ms);
    let body = GuardedBody::new(body, route.max_body_bytes, timeout, ctx.bytes_in.clone());
    let (mut resp, took) = route
        .upstream
        .send(Request::from_parts(parts, body), target.as_deref(), &fields)
        .await?;
    ctx.upstream = Some(took);
    hygiene::sanitize_response(resp.headers_mut());
    Ok(resp.map(Either::Left))
}

/// Longest credential `extract` hands on: an API key or a short-lived token.
const MAX_PRESENTED: usize = if MAX_KEY_LEN > crate::tokens::jwt::MAX_TOKEN_LEN {
    MAX_KEY_LEN
} else {
    crate::tokens::jwt::MAX_TOKEN_LEN
};

/// The request head's rules: one host (`request_host`), no CONNECT, a method in uppercase and
/// none named in the query (THREATS D7), only `chunked` as a transfer coding, the header
/// count cap. Returns the canonical host.
fn validate_head(parts: &Parts, snap: &Snapshot) -> Result<Option<String>, GatewayError> {
    let host = request_host(parts)?;
    if parts.method == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed { allow: vec![] });
    }
    // Routes name methods in uppercase; any other spelling would skip a method-specific route
    // and reach upstreams that fold case (`route::method_is_canonical`).
    if !crate::route::method_is_canonical(&parts.method) {
        return Err(GatewayError::BadRequest("method not in uppercase"));
    }
    // A method override the upstream would honour instead of the method authorised here.
    if parts
        .uri
        .query()
        .is_some_and(hygiene::query_overrides_method)
    {
        return Err(GatewayError::BadRequest("method override in the query"));
    }
    // hyper frames any request whose last transfer coding is `chunked`; the other codings
    // would be dropped with the hop-by-hop headers and the still-encoded body forwarded as
    // plain. Only a single `chunked` is accepted (THREATS A5).
    if !transfer_coding_is_chunked_only(&parts.headers) {
        return Err(GatewayError::BadRequest("unsupported transfer coding"));
    }
    // HTTP/1 header count is capped by hyper; HTTP/2 decodes lists first, so count here (F3/F4).
    if parts.headers.len() > snap.server.max_headers {
        return Err(GatewayError::HeadersTooLarge);
    }
    Ok(host)
}

/// The credential step (`credential::authenticate`), with what a refusal leaves for the
/// record: a refused key that exists (revoked, expired, not yet valid, canary) is named in
/// the access log, the denial audit and the canary alarm (`record`), so attempts after a leak
/// are attributable; the response stays the uniform 401. A token refused for its parent's
/// state names the parent. An accepted key under an old hash secret is offered for
/// re-digest: the plaintext is here now, and only now (`redigest`).
async fn authenticate(
    gw: &Gateway,
    snap: &Snapshot,
    route: &Route,
    presented: &str,
    ctx: &mut Ctx,
) -> Result<KeyView, GatewayError> {
    let now = ctx.now;
    match crate::credential::authenticate(gw, snap, route, presented, now).await {
        Ok(key) => {
            if snap.redigest.enabled() {
                gw.redigests.offer(&key, presented, &snap.keys.hasher, now);
            }
            ctx.key = Some(key.clone());
            Ok(key)
        }
        Err(e) => {
            ctx.key = e.record().cloned();
            if matches!(e, AuthError::Canary(_)) {
                ctx.canary_hint = Some(crate::keys::format::hint(presented));
            }
            Err(GatewayError::KeyInvalid(e))
        }
    }
}

/// The key's rate limit and quota (`limit::charge`), refusals as the gateway answers them.
async fn limits(
    gw: &Gateway,
    snap: &Snapshot,
    key: &KeyView,
    verdict: &mut Option<Verdict>,
) -> Result<(), GatewayError> {
    let shadow = || shadowed(gw, snap, key);
    match crate::limit::charge(&gw.limiter, &snap.policy, key, verdict, shadow).await {
        Ok(()) => Ok(()),
        Err(Refused::Rate(v)) => Err(GatewayError::RateLimited(v)),
        Err(Refused::Quota(v)) => Err(GatewayError::QuotaExceeded(v)),
    }
}

/// The body length a request declares, if it declares a valid one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The request's host: `:authority` / absolute-form authority, or the single Host header.
/// Disagreement between them, in the host or the port (the scheme's default port when one
/// names none), is refused (RFC 9112 §3.2, RFC 9113 §8.3.1), as are duplicates.
fn request_host(parts: &Parts) -> Result<Option<String>, GatewayError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let header_host = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest("duplicate Host header"));
    }
    let header_host = header_host
        .map(|v| {
            let raw = v.to_str().ok();
            raw.and_then(canonical_host)
                .zip(raw)
                .ok_or(GatewayError::BadRequest("invalid Host header"))
        })
        .transpose()?;
    let authority = parts
        .uri
        .authority()
        .map(|a| canonical_host(a.as_str()).ok_or(GatewayError::BadRequest("invalid authority")))
        .transpose()?;
    match (authority, header_host) {
        (Some(a), Some((h, raw_h))) => {
            let default = if parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                443
            } else {
                80
            };
            let raw_a = parts.uri.authority().map_or("", |a| a.as_str());
            if a == h && port_or(raw_a, default).is_some_and(|p| port_or(raw_h, default) == Some(p))
            {
                Ok(Some(a))
            } else {
                Err(GatewayError::BadRequest("authority and Host disagree"))
            }
        }
        (Some(a), None) => Ok(Some(a)),
        (None, h) => Ok(h.map(|(h, _)| h)),
    }
}

/// True without a Transfer-Encoding header, or when all its values together list exactly one
/// coding, `chunked` (case-insensitive, OWS-trimmed).
fn transfer_coding_is_chunked_only(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => !headers.contains_key(header::TRANSFER_ENCODING),
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// For a CORS preflight (`OPTIONS` + `Origin` + `Access-Control-Request-Method`), the method
/// the browser intends to use; routing uses it so the preflight sees the real route.
fn preflight_method(parts: &Parts) -> Option<Method> {
    if parts.method != Method::OPTIONS || !parts.headers.contains_key(header::ORIGIN) {
        return None;
    }
    let m = parts.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(m.as_bytes()).ok()
}

/// Preflights carry no credentials (Fetch spec), so they cannot know which key the real
/// request will carry, and a key may allow its own origins. The preflight therefore admits
/// any well-formed origin (`scheme://host[:port]`), and the real request, which carries the
/// key, is checked against the key's origins (or the global list) and gets
/// `Access-Control-Allow-Origin` only when allowed; so a page on a refused origin can send a
/// request but never read the answer. This reveals nothing about keys: the answer depends
/// only on the route and the origin's syntax, never on the key table (answering only for
/// origins some key lists would let anyone probe which origins have keys).
fn preflight_response(
    snap: &Snapshot,
    route: &Route,
    headers: &HeaderMap,
    ctx: &mut Ctx,
) -> Result<Response<RespBody>, GatewayError> {
    let origin = headers
        .get(header::ORIGIN)
        .filter(|o| is_serialized_origin(o.as_bytes()))
        .ok_or(GatewayError::OriginDenied)?;
    ctx.cors_origin = Some(origin.clone());
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    let methods: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
    let methods = if methods.is_empty() {
        "GET, HEAD, POST, PUT, PATCH, DELETE".to_owned()
    } else {
        methods.join(", ")
    };
    if let Ok(v) = HeaderValue::from_str(&methods) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    let allow_headers = format!("authorization, content-type, {}", snap.key_header.as_str());
    if let Ok(v) = HeaderValue::from_str(&allow_headers) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Ok(resp)
}

/// A serialized origin (RFC 6454 §6.2): `http(s)://host[:port]`, no path, no userinfo. `null`
/// (sandboxed or opaque origins) and anything else is refused.
fn is_serialized_origin(o: &[u8]) -> bool {
    let rest = o
        .strip_prefix(b"https://")
        .or_else(|| o.strip_prefix(b"http://"));
    rest.is_some_and(|hp| {
        !hp.is_empty()
            && hp
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(b))
    })
}

/// The client address: the socket peer, unless the peer is a trusted proxy, in which case the
/// right-most X-Forwarded-For entry that is not itself a trusted proxy.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| {
        trusted
            .iter()
            .any(|n| n.contains(&authz::canonical_ip(*ip)))
    };
    let peer = authz::canonical_ip(peer);
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        let Ok(s) = v.to_str() else { return peer };
        for part in s.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => chain.push(authz::canonical_ip(ip)),
                Err(_) => return peer,
            }
        }
    }
    chain
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// The origin-form target sent upstream, when it is not the request's own: the canonical
/// path, plus the query without the key parameter when the route takes keys from the query.
/// `None` when `uri` is already that target (origin-form, its path canonical, nothing
/// stripped from its query), as it nearly always is: then it goes upstream as it came, with
/// no target built and parsed again.
fn forwarded_target(uri: &Uri, path: &str, key_param: Option<&str>) -> Option<String> {
    let as_is = uri.scheme().is_none()
        && uri.authority().is_none()
        && uri.path() == path
        && uri.query().is_none_or(|q| {
            !q.is_empty() && key_param.is_none_or(|p| !q.split('&').any(|kv| named(kv, p)))
        });
    (!as_is).then(|| forwarded_path(path, uri.query(), key_param))
}

/// A query pair (`name=value`, or a bare name) whose name is `param`, as `extract` matches
/// names (escapes decoded).
fn named(pair: &str, param: &str) -> bool {
    let name = pair.split('=').next().unwrap_or("");
    crate::extract::name_matches(name.as_bytes(), param.as_bytes())
}

/// The canonical path, plus the query without the key parameter when the route takes keys
/// from the query.
fn forwarded_path(path: &str, query: Option<&str>, key_param: Option<&str>) -> String {
    let query = match (query, key_param) {
        (Some(q), Some(param)) => {
            let kept: Vec<&str> = q.split('&').filter(|pair| !named(pair, param)).collect();
            (!kept.is_empty()).then(|| kept.join("&"))
        }
        (q, _) => q.map(str::to_owned),
    };
    match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    }
}

/// The plan label of a key for metrics: a configured plan, "own" (own rate) or "default".
fn plan_label<'a>(snap: &'a Snapshot, key: Option<&'a KeyView>) -> &'a str {
    key.and_then(|k| k.plan.as_deref())
        .filter(|p| snap.policy.plans.contains_key(*p))
        .unwrap_or(if key.is_some_and(|k| k.rate.is_some()) {
            "own"
        } else {
            "default"
        })
}

/// Count a refusal that shadow mode turned into an admission.
fn shadowed(gw: &Gateway, snap: &Snapshot, key: &KeyView) {
    gw.metrics
        .limit_shadowed
        .with_label_values(&[plan_label(snap, Some(key))])
        .inc();
}

fn log_error(e: &GatewayError, ctx: &Ctx, request_id: &HeaderValue, method: &Method) {
    let key_id = ctx.key.as_ref().map_or("-", |k| &*k.id);
    let rid = request_id.to_str().unwrap_or("-");
    let trace_id = &ctx.trace.trace_id;
    match e.status().as_u16() {
        500.. => {
            tracing::warn!(request_id = rid, %trace_id, %method, key_id, outcome = e.outcome().as_str(), error = %e, "request failed")
        }
        _ => {
            tracing::debug!(request_id = rid, %trace_id, %method, key_id, outcome = e.outcome().as_str(), "request refused")
        }
    }
}

/// Metrics, failure budget, usage and audit: once per request.
fn record(
    gw: &Gateway,
    snap: &Snapshot,
    ctx: &Ctx,
    outcome: Outcome,
    status: StatusCode,
    started: Instant,
) {
    let series = ctx
        .route
        .and_then(|i| snap.routes.get(i))
        .map_or(&snap.unrouted, |r| &r.series);
    series.count(outcome);
    series.duration.observe(started.elapsed().as_secs_f64());
    // The key's id as the per-key maps hold it (compared as bytes, never re-checked as
    // text).
    let key_id = ctx.key.as_ref().map(|k| &k.id);
    let now = ctx.now;
    // Forwarded requests count their status with their use (`Gateway::forwarded`).
    if let Some(id) = key_id.filter(|_| outcome != Outcome::Ok && !outcome.is_auth_failure()) {
        gw.usage.status(id, status.as_u16());
    }
    // Every request naming a known key, refused ones included: a leaked key tried after its
    // revocation is exactly what an investigation looks for.
    if let Some(id) = key_id {
        gw.forensics.record(
            id,
            crate::forensics::Hit {
                now,
                status: status.as_u16(),
                route: ctx
                    .route
                    .and_then(|i| snap.routes.get(i))
                    .map(|r| crate::forensics::Label::new(r.name.as_bytes())),
                ip: ctx.client_ip,
                user_agent: ctx.user_agent,
                revoked: outcome == Outcome::KeyRevoked,
            },
        );
    }
    match outcome {
        Outcome::Ok => {
            if let Some(id) = key_id {
                gw.forwarded(id, now, status.as_u16());
                gw.metrics.count_key(id);
            }
        }
        o if o.is_auth_failure() => {
            gw.metrics
                .auth_failures
                .with_label_values(&[o.as_str()])
                .inc();
            gw.failures.record(ctx.client_ip, Instant::now());
            if let Some(id) = key_id {
                gw.denied_key(id);
            }
            if o == Outcome::KeyCanary {
                let route = ctx
                    .route
                    .and_then(|i| snap.routes.get(i))
                    .map_or("none", |r| r.name.as_str());
                match &ctx.key {
                    Some(k) => gw.canary_alarm(k, ctx.canary_hint.clone(), ctx.client_ip, route),
                    // A canary outcome always carries its record; counted all the same.
                    None => gw.metrics.canary_hits.inc(),
                }
            }
        }
        Outcome::AuthBudgetExceeded => gw.metrics.auth_budget_rejections.inc(),
        Outcome::RateLimited | Outcome::QuotaExceeded => {
            let plan = plan_label(snap, ctx.key.as_ref());
            gw.metrics.rate_limited.with_label_values(&[plan]).inc();
            if outcome == Outcome::QuotaExceeded {
                quota_exceeded(gw, ctx);
            }
        }
        _ => {}
    }
}

/// A key ran out of quota: audited once per key and quota window (webhook
/// `key.quota_exceeded`), not once per refused request.
fn quota_exceeded(gw: &Gateway, ctx: &Ctx) {
    let (Some(k), Some(v)) = (&ctx.key, &ctx.verdict) else {
        return;
    };
    if gw.quota_alarm(k.lineage(), ctx.now, v.reset_secs) {
        gw.audit(
            Event::new("key.quota_exceeded", "gateway")
                .key_view(k, None)
                .with("limit", v.limit)
                .with("window_secs", v.window_secs)
                .with("reset_secs", v.reset_secs),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_target_goes_upstream_as_is_unless_something_changed() {
        let target = |uri: &str, path: &str, param: Option<&str>| {
            forwarded_target(&uri.parse::<Uri>().unwrap(), path, param)
        };
        assert_eq!(target("/a?x=1", "/a", None), None);
        assert_eq!(target("/a?x=1&y=2", "/a", Some("api_key")), None);
        assert_eq!(target("/a", "/a", Some("api_key")), None);
        assert_eq!(target("/a?", "/a", None).as_deref(), Some("/a"));
        assert_eq!(target("/a/./b?x", "/a/b", None).as_deref(), Some("/a/b?x"));
        assert_eq!(
            target("/a?x=1&api_key=k", "/a", Some("api_key")).as_deref(),
            Some("/a?x=1")
        );
        assert_eq!(
            target("https://h/a?x=1", "/a", None).as_deref(),
            Some("/a?x=1")
        );
    }

    #[test]
    fn forwarded_path_strips_only_the_key_param() {
        assert_eq!(
            forwarded_path("/a", Some("x=1&api_key=k&y=2"), Some("api_key")),
            "/a?x=1&y=2"
        );
        assert_eq!(
            forwarded_path("/a", Some("api_key=k"), Some("api_key")),
            "/a"
        );
        assert_eq!(
            forwarded_path("/a", Some("%61pi_key=k&z=1"), Some("api_key")),
            "/a?z=1"
        );
        assert_eq!(
            forwarded_path("/a", Some("api_key=k"), None),
            "/a?api_key=k"
        );
        assert_eq!(forwarded_path("/a", None, None), "/a");
    }

    #[test]
    fn transfer_coding_table() {
        let cases: &[(&[&str], bool)] = &[
            (&[], true),
            (&["chunked"], true),
            (&["Chunked "], true),
            (&["gzip", "chunked"], false),
            (&["gzip, chunked"], false),
            (&["chunked, chunked"], false),
            (&["chunked", "chunked"], false),
            (&[""], false),
            (&["identity"], false),
        ];
        for (values, want) in cases {
            let mut h = HeaderMap::new();
            for v in *values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(transfer_coding_is_chunked_only(&h), *want, "{values:?}");
        }
    }

    #[test]
    fn serialized_origins_only() {
        for ok in [
            "https://app.example",
            "http://localhost:3000",
            "https://[::1]:8443",
        ] {
            assert!(is_serialized_origin(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "null",
            "",
            "https://",
            "ftp://x",
            "https://a/b",
            "https://u@h",
            "*",
        ] {
            assert!(!is_serialized_origin(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_ip(proxy, &h, &[]),
            proxy,
            "untrusted peer: XFF ignored"
        );
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("garbage"));
        assert_eq!(client_ip(proxy, &h, &trusted), proxy);
    }
}
