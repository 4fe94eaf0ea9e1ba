//! The control plane's HTTP surface: `/v1/api-keys…` (REST, JSON; `lookup` and `verify` take
//! a key in the body and never echo or log it), `/v1/admin-tokens…` (list and revoke, write
//! role), `/v1/feed` (ndjson stream), `/v1/usage` (gateway reports),
//! `/v1/api-keys/{id}/redigest` (gateways, redigest role: `keys::redigest`), `/v1/tokens` and
//! `/v1/jwks` (short-lived tokens, `exchange`) and `/v1/openapi.yaml`. Every error is
//! problem+json with a stable `code`. No response ever carries a digest; a plaintext key only
//! in the responses to create and rotate.

use super::tokens::Role;
use super::Control;
use crate::keys::ops::{Changes, Grants, Keys, OpsError, Selector};
use crate::keys::record::{KeyRecord, KeyState};
use crate::store::feed::{Catchup, Event, FeedLine};
use crate::usage::Used;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

pub type Body = Either<Full<Bytes>, FeedBody>;

/// The connection's peer address, put on each request by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

pub const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

/// A streaming body fed by a channel: the feed task writes lines, hyper sends them.
pub struct FeedBody(mpsc::Receiver<Bytes>);

impl http_body::Body for FeedBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// An API failure: status, stable code, and a human detail (never secret).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    /// The `Allow` header of a 405 (RFC 9110 §15.5.6).
    allow: Option<&'static str>,
    /// The `Retry-After` header of a 429, in seconds.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

pub(super) fn err(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        detail: detail.into(),
        allow: None,
        retry_after: None,
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> ApiError {
        let (status, code) = match &e {
            OpsError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            OpsError::Policy(_) => (StatusCode::UNPROCESSABLE_ENTITY, "policy_violation"),
            OpsError::UnknownPlan(..) | OpsError::Invalid(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            OpsError::Immutable { .. } => (StatusCode::BAD_REQUEST, "immutable_field"),
            OpsError::AlreadyRotated { .. } => (StatusCode::CONFLICT, "already_rotated"),
            OpsError::RotationFinal { .. } => (StatusCode::CONFLICT, "rotation_final"),
            // Fail closed: a change that cannot be audited is not made (THREATS J6).
            OpsError::Audit { .. } => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            // Made and in force, without its audit record (the Redis store audits after its
            // write): a code of its own, so a client never takes it for a refused change.
            OpsError::Unaudited { .. } => (StatusCode::SERVICE_UNAVAILABLE, "change_unaudited"),
            OpsError::Store(crate::store::StoreError::Unrevoke { .. }) => {
                (StatusCode::CONFLICT, "key_revoked")
            }
            // Written and enforced, but a failover now could lose it: the client must know.
            OpsError::Store(crate::store::StoreError::NotReplicated { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "revocation_not_replicated")
            }
            OpsError::Store(_) | OpsError::Random(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "control plane change failed");
        }
        err(status, code, e.to_string())
    }
}

impl From<super::tokens::TokenError> for ApiError {
    fn from(e: super::tokens::TokenError) -> ApiError {
        use super::tokens::TokenError;
        let (status, code) = match &e {
            TokenError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            // Fail closed, as for keys: a revocation that cannot be audited is not made.
            TokenError::Audit { .. } => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            TokenError::Io { .. } => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "admin token change failed");
        }
        err(status, code, e.to_string())
    }
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(v.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) fn problem(e: &ApiError) -> Response<Body> {
    let body = json!({"type": "about:blank", "title": e.status.canonical_reason().unwrap_or("Error"), "status": e.status.as_u16(), "code": e.code, "detail": e.detail});
    let mut r = json_response(e.status, &body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Some(allow) = e.allow {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is matched
/// case-insensitively (RFC 9110 §11.1): `Bearer`, `bearer` and `BEARER` are one scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The methods a known endpoint supports (its `Allow`), or `None` for an unknown path (404).
/// `revoke`, `lookup` and `verify` are endpoints, never key ids (ids start with `key_`).
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["v1", "openapi.yaml"] | ["v1", "feed"] => Some("GET"),
        ["v1", "usage"] | ["v1", "events"] | ["v1", "api-keys", "revoke" | "lookup" | "verify"] => {
            Some("POST")
        }
        ["v1", "api-keys"] => Some("GET, POST"),
        ["v1", "api-keys", _] => Some("GET, PATCH, DELETE"),
        ["v1", "api-keys", _, "rotate"]
        | ["v1", "api-keys", _, "rotate", "abort"]
        | ["v1", "api-keys", _, "redigest"] => Some("POST"),
        ["v1", "api-keys", _, "usage"] => Some("GET"),
        ["v1", "admin-tokens"] => Some("GET"),
        ["v1", "admin-tokens", _] => Some("DELETE"),
        ["v1", "tokens"] => Some("POST"),
        ["v1", "jwks"] => Some("GET"),
        _ => None,
    }
}

pub async fn handle(c: Arc<Control>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let operation = {
        let segments: Vec<&str> = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .collect();
        super::metrics::operation(req.method(), &segments)
    };
    let response = match route(&c, req).await {
        Ok(r) => r,
        Err(e) => problem(&e),
    };
    c.metrics
        .requests
        .with_label_values(&[operation, response.status().as_str()])
        .inc();
    Ok(response)
}

/// `/healthz`, `/readyz` (the log is loaded) and `/metrics`:
/// unauthenticated like a gateway's admin port (nothing in them is secret), so probes and
/// Prometheus need no admin token.
fn probe(c: &Control, what: &str) -> Response<Body> {
    let text = |status: StatusCode, body: Vec<u8>, ctype: &'static str| {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    };
    match what {
        "healthz" => text(StatusCode::OK, b"ok\n".to_vec(), "text/plain"),
        "readyz" => {
            // The store is the file: Redis (usage only) being down degrades listings, it does
            // not make the control plane unable to serve; it shows in keygate_redis_up.
            if !c.feed.loaded() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    b"not ready: store not loaded\n".to_vec(),
                    "text/plain",
                )
            } else {
                let body = format!("ready revision={}\n", c.feed.revision());
                text(StatusCode::OK, body.into_bytes(), "text/plain")
            }
        }
        _ => {
            c.metrics.store_revision.set(c.feed.revision() as i64);
            c.metrics.feed_subscribers.set(c.feed.subscribers() as i64);
            text(
                StatusCode::OK,
                c.metrics.render(),
                "text/plain; version=0.0.4",
            )
        }
    }
}

/// Which role an endpoint needs; the token is checked before anything else is read.
fn authorize(c: &Control, req: &Request<Incoming>, needed: Role) -> Result<String, ApiError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or_else(|| {
            err(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer admin token",
            )
        })?;
    let tokens = c.tokens();
    let record = tokens
        .1
        .authenticate(token, &c.settings.hasher, crate::clock::unix_secs())
        .ok_or_else(|| {
            err(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid admin token",
            )
        })?;
    if !record.role.allows(needed) {
        return Err(err(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token's role is {}; {} is required",
                record.role.as_str(),
                needed.as_str()
            ),
        ));
    }
    Ok(format!("admin:{}", record.id))
}

async fn route(c: &Arc<Control>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method.clone(), segments.as_slice()) {
        (Method::GET | Method::HEAD, [what @ ("healthz" | "readyz" | "metrics")]) => {
            Ok(probe(c, what))
        }
        (Method::GET, ["v1", "openapi.yaml"]) => {
            let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(
                OPENAPI.as_bytes(),
            ))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/yaml"),
            );
            Ok(r)
        }
        (Method::POST, ["v1", "tokens"]) => super::exchange::exchange(c, req).await,
        (Method::GET | Method::HEAD, ["v1", "jwks"]) => super::exchange::jwks(c),
        (Method::GET, ["v1", "feed"]) => {
            authorize(c, &req, Role::Feed)?;
            feed(c, req.uri().query())
        }
        (Method::POST, ["v1", "usage"]) => {
            authorize(c, &req, Role::Feed)?;
            super::reports::receive(c, req).await
        }
        (Method::POST, ["v1", "events"]) => {
            authorize(c, &req, Role::Feed)?;
            relayed_events(c, req).await
        }
        (Method::GET, ["v1", "api-keys"]) => {
            authorize(c, &req, Role::Read)?;
            list(c, req.uri().query()).await
        }
        (Method::POST, ["v1", "api-keys"]) => {
            let actor = authorize(c, &req, Role::Write)?;
            let body = read_json(c, req).await?;
            create(c, actor, body).await
        }
        (Method::POST, ["v1", "api-keys", "lookup"]) => {
            authorize(c, &req, Role::Read)?;
            let body = read_json(c, req).await?;
            lookup(c, &body)
        }
        (Method::POST, ["v1", "api-keys", "verify"]) => {
            authorize(c, &req, Role::Verify)?;
            let caller = super::verify::Caller {
                ip: req
                    .extensions()
                    .get::<Peer>()
                    .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0),
                user_agent: req
                    .headers()
                    .get(header::USER_AGENT)
                    .map(|v| crate::forensics::Label::new(v.as_bytes())),
            };
            let body = read_json(c, req).await?;
            super::verify::verify(c, caller, &body).await
        }
        (Method::POST, ["v1", "api-keys", "revoke"]) => {
            let actor = authorize(c, &req, Role::Write)?;
            let body = read_json(c, req).await?;
            mass_revoke(c, actor, body).await
        }
        (Method::GET, ["v1", "api-keys", id]) if !is_endpoint(id) => {
            authorize(c, &req, Role::Read)?;
            let id = id.to_string();
            caught_up(c).await?;
            let held = c
                .feed
                .get(&id)
                .ok_or_else(|| ApiError::from(OpsError::NotFound(id.clone())))?;
            // The key and its rotation partner, if any (`rotation::of` reads them by id).
            let partner = [held.rotated_to.as_deref(), held.rotated_from.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(|p| c.feed.get(p));
            let latest: std::collections::HashMap<String, KeyRecord> =
                std::iter::once(held.clone())
                    .chain(partner)
                    .map(|r| (r.id.clone(), (*r).clone()))
                    .collect();
            let record = latest
                .get(&id)
                .ok_or_else(|| ApiError::from(OpsError::NotFound(id.clone())))?;
            let pair = crate::keys::rotation::of(&latest, record);
            let mut ids = vec![record.id.as_str()];
            if let Some((old, new)) = pair {
                ids.extend([old.id.as_str(), new.id.as_str()]);
            }
            let usage = c.usage_of(&ids).await;
            let mut v = public(record, &usage);
            if let Some((old, new)) = pair {
                v["rotation_status"] = crate::keys::rotation::report(old, new, &usage);
            }
            Ok(json_response(StatusCode::OK, &v))
        }
        (Method::GET, ["v1", "api-keys", id, "usage"]) => {
            authorize(c, &req, Role::Read)?;
            key_usage(c, id.to_string(), req.uri().query()).await
        }
        (Method::PATCH, ["v1", "api-keys", id]) if !is_endpoint(id) => {
            let actor = authorize(c, &req, Role::Write)?;
            let id = id.to_string();
            let body = read_json(c, req).await?;
            update(c, actor, id, body).await
        }
        (Method::DELETE, ["v1", "api-keys", id]) if !is_endpoint(id) => {
            let actor = authorize(c, &req, Role::Write)?;
            let id = id.to_string();
            let body = read_json_optional(c, req).await?;
            reject_unknown(&body, &["reason", "found_in"])?;
            let reason = optional_string(&body, "reason")?;
            let found_in = found_in(&body)?;
            let c2 = c.clone();
            let record = blocking(move || {
                Keys::new(&c2.settings, actor).revoke_found(
                    &id,
                    reason.as_deref(),
                    &found_in,
                    crate::clock::unix_secs(),
                )
            })
            .await?;
            Ok(json_response(StatusCode::OK, &shown(c, &record).await))
        }
        (Method::POST, ["v1", "api-keys", id, "rotate"]) => {
            let actor = authorize(c, &req, Role::Write)?;
            let id = id.to_string();
            let body = read_json_optional(c, req).await?;
            reject_unknown(&body, &["grace", "complete_when_idle"])?;
            let opts = crate::keys::ops::RotateOptions {
                grace_secs: match optional_string(&body, "grace")? {
                    Some(g) => secs(&g, "grace")?,
                    None => c.settings.rotate_grace_secs,
                },
                complete_when_idle_secs: optional_string(&body, "complete_when_idle")?
                    .map(|s| secs(&s, "complete_when_idle"))
                    .transpose()?,
                old_requests: c
                    .usage_of(&[id.as_str()])
                    .await
                    .get(&id)
                    .map_or(0, |u| u.requests),
            };
            let c2 = c.clone();
            let minted = blocking(move || {
                Keys::new(&c2.settings, actor).rotate(&id, opts, crate::clock::unix_secs())
            })
            .await?;
            let mut v = shown(c, &minted.record).await;
            v["key"] = Value::String(minted.key);
            Ok(json_response(StatusCode::CREATED, &v))
        }
        (Method::POST, ["v1", "api-keys", id, "rotate", "abort"]) => {
            let actor = authorize(c, &req, Role::Write)?;
            let id = id.to_string();
            let body = read_json_optional(c, req).await?;
            reject_unknown(&body, &[])?;
            let c2 = c.clone();
            let old = blocking(move || {
                Keys::new(&c2.settings, actor).abort_rotation(&id, crate::clock::unix_secs())
            })
            .await?;
            Ok(json_response(StatusCode::OK, &shown(c, &old).await))
        }
        (Method::POST, ["v1", "api-keys", id, "redigest"]) => {
            let actor = authorize(c, &req, Role::Redigest)?;
            let id = id.to_string();
            let body = read_json(c, req).await?;
            redigest(c, actor, id, body).await
        }
        (Method::GET, ["v1", "admin-tokens"]) => {
            authorize(c, &req, Role::Write)?;
            let now = crate::clock::unix_secs();
            let items: Vec<Value> = super::tokens::list(&c.tokens_path)
                .iter()
                .map(|t| t.public_json(now))
                .collect();
            Ok(json_response(StatusCode::OK, &json!({ "items": items })))
        }
        (Method::DELETE, ["v1", "admin-tokens", id]) => {
            let actor = authorize(c, &req, Role::Write)?;
            let id = id.to_string();
            let c2 = c.clone();
            let now = crate::clock::unix_secs();
            let revoked = blocking(move || {
                let audit = crate::audit::AuditLog::new(&c2.settings.audit_log);
                super::tokens::revoke(&c2.tokens_path, &audit, &actor, &id, now)
            })
            .await?;
            Ok(json_response(StatusCode::OK, &revoked.public_json(now)))
        }
        _ => match allowed_methods(&segments) {
            Some(allow) => Err(ApiError {
                allow: Some(allow),
                ..err(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not supported here (allowed: {allow})"),
                )
            }),
            None => Err(err(StatusCode::NOT_FOUND, "not_found", "no such endpoint")),
        },
    }
}

fn is_endpoint(segment: &str) -> bool {
    matches!(segment, "revoke" | "lookup" | "verify")
}

/// At most this many places, each at most `MAX_PLACE` bytes, in a revocation's `found_in`.
const MAX_PLACES: usize = 100;
const MAX_PLACE: usize = 1024;

/// `found_in` of a revocation (`keygate scan --revoke`): where the key was found, for the
/// audit event. Bounded, so a client cannot grow the audit log without limit.
fn found_in(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let places = string_list(body, "found_in")?.unwrap_or_default();
    if places.len() > MAX_PLACES || places.iter().any(|p| p.len() > MAX_PLACE) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("found_in: at most {MAX_PLACES} places of at most {MAX_PLACE} bytes"),
        ));
    }
    Ok(places)
}

/// The `key` of a lookup or verify body. Errors never quote the body: it holds a key.
pub(super) fn key_field(body: &Map<String, Value>) -> Result<String, ApiError> {
    reject_unknown(body, &["key"])?;
    match body.get("key") {
        Some(Value::String(k)) => Ok(k.clone()),
        _ => Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "key is required and must be a string",
        )),
    }
}

/// `POST /v1/api-keys/lookup` (read role): what a found key is (`keys::lookup`), with its
/// id and owner. For `keygate scan --check` on machines without the hash secret.
fn lookup(c: &Control, body: &Map<String, Value>) -> Result<Response<Body>, ApiError> {
    let key = key_field(body)?;
    let table = c.feed.table();
    let found =
        crate::keys::lookup::Lookup::find(&table, &c.settings, &key, crate::clock::unix_secs());
    let full = found.record.as_ref().and_then(|r| c.feed.get(&r.id));
    Ok(json_response(
        StatusCode::OK,
        &found.to_json(full.as_deref()),
    ))
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| {
            err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "worker failed",
            )
        })?
        .map_err(ApiError::from)
}

/// `POST /v1/events`: events a gateway relays (`webhooks::relay`), written to the control
/// plane's audit log, from which its webhook sender delivers them.
async fn relayed_events(
    c: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let limit = crate::webhooks::relay::MAX_BODY_BYTES.max(c.config.control.max_body_bytes);
    let body = parse_object(&read_limited(req, limit).await?)?;
    reject_unknown(&body, &["node", "events"])?;
    let node: String = optional_string(&body, "node")?
        .unwrap_or_else(|| "unknown".into())
        .chars()
        .take(128)
        .collect();
    let (events, ignored) = crate::webhooks::relay::audit_events(&body, &node, |id| c.feed.get(id))
        .map_err(|m| err(StatusCode::BAD_REQUEST, "invalid_request", m))?;
    let accepted = events.len();
    let audit = crate::audit::AuditLog::new(&c.settings.audit_log);
    match tokio::task::spawn_blocking(move || audit.append(&events)).await {
        Ok(Ok(())) => {}
        _ => {
            return Err(err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot write the audit log",
            ))
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"accepted": accepted, "ignored": ignored}),
    ))
}

/// A record as the API shows it, with its fleet-wide usage (`Control::usage_of`).
fn public(r: &KeyRecord, usage: &BTreeMap<String, Used>) -> Value {
    let mut v = r.public_json(crate::clock::unix_secs());
    if let Some(u) = usage.get(&r.id) {
        v["last_used"] = u.last_used.into();
        v["requests"] = u.requests.into();
        v["status_classes"] = json!({"2xx": u.s2xx, "4xx": u.s4xx, "5xx": u.s5xx});
    }
    v
}

/// One record with its usage.
async fn shown(c: &Control, r: &KeyRecord) -> Value {
    public(r, &c.usage_of(&[r.id.as_str()]).await)
}

async fn read_json_optional(
    c: &Control,
    req: Request<Incoming>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(c, req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    parse_object(&bytes)
}

async fn read_json(c: &Control, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(c, req).await?;
    parse_object(&bytes)
}

pub(super) async fn read_body(c: &Control, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    read_limited(req, c.config.control.max_body_bytes).await
}

/// The body, if it is at most `limit` bytes (413 otherwise).
pub(super) async fn read_limited(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| {
            err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body over {limit} bytes"),
            )
        })
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    // serde_json bounds nesting depth (128), so deeply nested input is a clean 400 (J7).
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "body must be a JSON object",
        )),
        Err(e) => Err(err(StatusCode::BAD_REQUEST, "invalid_json", e.to_string())),
    }
}

fn reject_unknown(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!("unknown field {k:?}"),
        )),
        None => Ok(()),
    }
}

fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field} must be a string"),
        )),
    }
}

fn string_list(body: &Map<String, Value>, field: &str) -> Result<Option<Vec<String>>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} must be a list of strings"),
            )
        }),
    }
}

fn ip_list(body: &Map<String, Value>) -> Result<Option<Vec<IpNet>>, ApiError> {
    string_list(body, "allow_ips")?
        .map(|l| {
            l.iter()
                .map(|s| {
                    s.parse::<IpNet>().map_err(|_| {
                        err(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            format!("allow_ips: {s:?} is not a CIDR"),
                        )
                    })
                })
                .collect()
        })
        .transpose()
}

fn labels(body: &Map<String, Value>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    match body.get("labels") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "labels must be an object of strings",
            )
        }),
    }
}

/// Longest duration the API accepts (1000 years): beyond it `now + secs` could overflow.
const MAX_DURATION_SECS: u64 = 1000 * 366 * 86_400;

fn secs(s: &str, field: &str) -> Result<i64, ApiError> {
    let d = crate::config::parse_duration(s).map_err(|m| {
        err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: {m}"),
        )
    })?;
    if d.as_secs() > MAX_DURATION_SECS {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field}: longer than 1000 years"),
        ));
    }
    Ok(d.as_secs() as i64)
}

async fn create(
    c: &Arc<Control>,
    actor: String,
    body: Map<String, Value>,
) -> Result<Response<Body>, ApiError> {
    reject_unknown(
        &body,
        &[
            "name",
            "owner",
            "env",
            "scopes",
            "plan",
            "rate",
            "quota",
            "expires_in",
            "not_before",
            "allow_ips",
            "allow_origins",
            "labels",
            "canary",
            "publishable",
        ],
    )?;
    let now = crate::clock::unix_secs();
    let flag = |field: &str| match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{field} must be a boolean"),
        )),
    };
    let name = optional_string(&body, "name")?.ok_or_else(|| {
        err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "name is required",
        )
    })?;
    let grants = Grants {
        name,
        owner: optional_string(&body, "owner")?.unwrap_or_default(),
        env: optional_string(&body, "env")?.unwrap_or_else(|| "live".into()),
        scopes: string_list(&body, "scopes")?.unwrap_or_default(),
        plan: optional_string(&body, "plan")?,
        rate: optional_string(&body, "rate")?,
        quota: optional_string(&body, "quota")?,
        expires_in_secs: optional_string(&body, "expires_in")?
            .map(|s| secs(&s, "expires_in"))
            .transpose()?,
        not_before: optional_string(&body, "not_before")?
            .map(|s| crate::keys::ops::parse_not_before(&s, now))
            .transpose()?,
        allow_ips: ip_list(&body)?.unwrap_or_default(),
        allow_origins: string_list(&body, "allow_origins")?.unwrap_or_default(),
        labels: labels(&body)?.unwrap_or_default(),
        canary: flag("canary")?,
        publishable: flag("publishable")?,
    };
    let c2 = c.clone();
    let minted = blocking(move || Keys::new(&c2.settings, actor).create(&grants, now)).await?;
    let mut v = shown(c, &minted.record).await;
    v["key"] = Value::String(minted.key);
    Ok(json_response(StatusCode::CREATED, &v))
}

impl From<crate::keys::redigest::Refused> for ApiError {
    fn from(e: crate::keys::redigest::Refused) -> ApiError {
        use crate::keys::redigest::Refused;
        let (status, code) = match &e {
            Refused::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Refused::Revoked(_) => (StatusCode::CONFLICT, "key_revoked"),
            Refused::Canary(_) => (StatusCode::CONFLICT, "not_redigestable"),
            Refused::AlreadyCurrent { .. } => (StatusCode::CONFLICT, "already_current"),
            Refused::VersionMismatch { .. } => (StatusCode::CONFLICT, "version_mismatch"),
            Refused::NotCurrent { .. } => (StatusCode::CONFLICT, "version_not_current"),
            Refused::Stale(_) => (StatusCode::CONFLICT, "proof_mismatch"),
            Refused::DigestInUse(_) => (StatusCode::CONFLICT, "digest_in_use"),
        };
        err(status, code, e.to_string())
    }
}

/// A 64-hex-digit field (a digest or a proof).
fn hex32(body: &Map<String, Value>, field: &str) -> Result<[u8; 32], ApiError> {
    optional_string(body, field)?
        .and_then(|s| crate::keys::digest::Digest::from_hex(&s))
        .map(|d| d.0)
        .ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} is required: 64 lowercase hex digits"),
            )
        })
}

fn version(body: &Map<String, Value>, field: &str) -> Result<u32, ApiError> {
    body.get(field)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} is required: a secret version (0..=4294967295)"),
            )
        })
}

/// `POST /v1/api-keys/{id}/redigest` (role redigest): a gateway hands in a key's digest under
/// the current secret version, with a proof keyed by that secret over the request and the
/// digest stored now. Only `digest` and `secret_version` change (`keys::redigest` holds the
/// rule); audited as `key.redigested` with the token as actor.
async fn redigest(
    c: &Arc<Control>,
    actor: String,
    id: String,
    body: Map<String, Value>,
) -> Result<Response<Body>, ApiError> {
    use crate::keys::redigest::{Evidence, Redigest, Refused};
    reject_unknown(&body, &["from_version", "to_version", "digest", "proof"])?;
    let r = Redigest {
        id,
        from_version: version(&body, "from_version")?,
        to_version: version(&body, "to_version")?,
        new: crate::keys::digest::Digest(hex32(&body, "digest")?),
        evidence: Evidence::Proof(hex32(&body, "proof")?),
    };
    let c2 = c.clone();
    let verdict = blocking(move || {
        Keys::new(&c2.settings, actor)
            .redigest(std::slice::from_ref(&r))
            .map(|mut v| v.pop())
    })
    .await?
    .unwrap_or_else(|| Err(Refused::NotFound(String::new())));
    let outcome = match &verdict {
        Ok(_) => "written",
        Err(Refused::AlreadyCurrent { .. }) => "current",
        Err(_) => "refused",
    };
    c.metrics.redigested.with_label_values(&[outcome]).inc();
    let record = verdict?;
    Ok(json_response(StatusCode::OK, &shown(c, &record).await))
}

/// Fields a PATCH may never set (mass assignment, OWASP API3): identity, secrets, lineage
/// and lifecycle fields change only through their own endpoints.
const IMMUTABLE: &[&str] = &[
    "id",
    "digest",
    "secret_version",
    "created_at",
    "env",
    "rev",
    "hint",
    "lineage",
    "imported",
    "canary",
    "rotated_from",
    "rotated_to",
    "revoked_at",
    "revoked_reason",
    "written_at_ms",
    "state",
    "key",
    "not_before",
    "publishable",
];

async fn update(
    c: &Arc<Control>,
    actor: String,
    id: String,
    body: Map<String, Value>,
) -> Result<Response<Body>, ApiError> {
    if let Some(f) = body.keys().find(|k| IMMUTABLE.contains(&k.as_str())) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "immutable_field",
            format!("{f} cannot be changed"),
        ));
    }
    reject_unknown(
        &body,
        &[
            "name",
            "owner",
            "scopes",
            "plan",
            "rate",
            "quota",
            "expires_in",
            "allow_ips",
            "allow_origins",
            "labels",
        ],
    )?;
    let nullable = |field: &str| -> Result<Option<Option<String>>, ApiError> {
        match body.get(field) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
            Some(_) => Err(err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} must be a string or null"),
            )),
        }
    };
    let changes = Changes {
        name: optional_string(&body, "name")?,
        // Passed on so that `Keys::update` applies the one owner rule (it refuses changes).
        owner: body.contains_key("owner").then(String::new),
        scopes: string_list(&body, "scopes")?,
        plan: nullable("plan")?,
        rate: nullable("rate")?,
        quota: nullable("quota")?,
        expires_in_secs: nullable("expires_in")?
            .map(|o| o.map(|s| secs(&s, "expires_in")).transpose())
            .transpose()?,
        allow_ips: ip_list(&body)?,
        allow_origins: string_list(&body, "allow_origins")?,
        labels: labels(&body)?.unwrap_or_default(),
    };
    let c2 = c.clone();
    let record = blocking(move || {
        Keys::new(&c2.settings, actor).update(&id, &changes, crate::clock::unix_secs())
    })
    .await?;
    Ok(json_response(StatusCode::OK, &shown(c, &record).await))
}

async fn mass_revoke(
    c: &Arc<Control>,
    actor: String,
    body: Map<String, Value>,
) -> Result<Response<Body>, ApiError> {
    reject_unknown(&body, &["owner", "env", "label", "reason", "confirm"])?;
    if body.get("confirm") != Some(&Value::Bool(true)) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "confirmation_required",
            "mass revoke needs \"confirm\": true",
        ));
    }
    let label = optional_string(&body, "label")?
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "label must be key=value",
                    )
                })
        })
        .transpose()?;
    let selector = Selector {
        owner: optional_string(&body, "owner")?,
        env: optional_string(&body, "env")?,
        label,
    };
    let reason = optional_string(&body, "reason")?;
    let c2 = c.clone();
    let done = blocking(move || {
        Keys::new(&c2.settings, actor).revoke_matching(
            &selector,
            reason.as_deref(),
            crate::clock::unix_secs(),
        )
    })
    .await?;
    let ids: Vec<&str> = done.revoked.iter().map(|r| r.id.as_str()).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"revoked": ids, "canaries_spared": done.canaries_spared}),
    ))
}

fn query_params(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect()
}

/// `GET /v1/api-keys/{id}/usage`: leak forensics of one key over every node that reported
/// (or flushed) it. `since`: RFC 3339, Unix seconds or a duration ago.
async fn key_usage(
    c: &Arc<Control>,
    id: String,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let now = crate::clock::unix_secs();
    let q = query_params(query);
    if let Some(k) = q.keys().find(|k| k.as_str() != "since") {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("unknown query parameter {k:?}"),
        ));
    }
    let since = match q.get("since") {
        Some(s) => crate::forensics::parse_since(s, now)?,
        None => 0,
    };
    let c2 = c.clone();
    let (id, nodes) = blocking(move || {
        let latest = Keys::new(&c2.settings, "")
            .state()
            .map(|p| crate::store::file::latest(p.records))?;
        if !latest.contains_key(&id) {
            return Err(OpsError::NotFound(id));
        }
        let path = crate::forensics::path_for(&c2.settings.usage_file);
        Ok((id, crate::forensics::read(&path)))
    })
    .await?;
    let v = match crate::forensics::merged(&nodes, &id) {
        Some(stats) => stats.report(&id, since),
        None => crate::forensics::empty_report(&id, since),
    };
    Ok(json_response(StatusCode::OK, &v))
}

/// Reads are served from the log the control plane holds in memory (`FeedState`, which
/// follows the store). So that a read sees every write made before it (by this API, another
/// control plane or the CLI), it first waits for that log to reach the store's last revision,
/// read cheaply (the file's tail, one Redis `HMGET`). A follower that does not get there in
/// time (a store problem it is reporting) leaves the read served from what it holds.
async fn caught_up(c: &Arc<Control>) -> Result<(), ApiError> {
    let store = c.settings.store_backend();
    let head = blocking(move || store.head_revision().map_err(OpsError::from)).await?;
    if !c.feed.caught_up(head, READ_CATCH_UP).await {
        tracing::warn!(
            store_revision = head,
            held = c.feed.revision(),
            "control plane: serving a read from a log behind the store"
        );
    }
    Ok(())
}

/// How long a read waits for the in-memory log to reach the store.
const READ_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

async fn list(c: &Arc<Control>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q = query_params(query);
    if let Some(k) = q
        .keys()
        .find(|k| !["owner", "env", "state", "label", "limit", "cursor"].contains(&k.as_str()))
    {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("unknown query parameter {k:?}"),
        ));
    }
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "limit must be 1..=1000",
                )
            })?,
        None => 100,
    };
    let state = match q.get("state").map(String::as_str) {
        None => None,
        Some("active") => Some(KeyState::Active),
        Some("expired") => Some(KeyState::Expired),
        Some("revoked") => Some(KeyState::Revoked),
        Some("canary") => Some(KeyState::Canary),
        Some("pending") => Some(KeyState::Pending),
        Some(other) => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown state {other:?}"),
            ))
        }
    };
    let label = match q.get("label") {
        Some(l) => Some(
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "label must be key=value",
                    )
                })?,
        ),
        None => None,
    };
    let selector = Selector {
        owner: q.get("owner").cloned(),
        env: q.get("env").cloned(),
        label,
    };
    let cursor = q.get("cursor").cloned();
    caught_up(c).await?;
    let now = crate::clock::unix_secs();
    let (rows, next) = c.feed.page(cursor.as_deref(), limit, |r| {
        selector.matches(r) && state.is_none_or(|s| r.state(now) == s)
    });
    let next = next.map(Value::String);
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let usage = c.usage_of(&ids).await;
    let items: Vec<Value> = rows.iter().map(|r| public(r, &usage)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": next.unwrap_or(Value::Null)}),
    ))
}

/// Stream the feed: catch-up (snapshot or records since `after`), then live records and
/// heartbeats. A reader that falls `feed_buffer` records behind is disconnected.
fn feed(c: &Arc<Control>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let q = query_params(query);
    let after = match q.get("after") {
        Some(a) => Some(a.parse::<u64>().map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "after must be a revision number",
            )
        })?),
        None => None,
    };
    let log = match q.get("log") {
        Some(l) => Some(l.parse::<crate::store::seal::LogId>().map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "log must be a log id (16 hex digits)",
            )
        })?),
        None => None,
    };
    // The reader's nonce for this stream's seal (`store::seal`); a reader older than sealed
    // streams sends none and ignores the tags.
    let nonce = q.get("nonce").map_or("", String::as_str);
    if nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "nonce must be at most 64 hex digits",
        ));
    }
    let mut chain =
        crate::store::seal::Signer::new(&c.settings.hasher).feed_chain(nonce.as_bytes());
    if !c.feed.loaded() {
        return Err(err(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store has not been loaded yet",
        ));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let state = c.feed.clone();
    let heartbeat = Duration::from_millis(c.config.control.heartbeat_ms.max(100));
    tokio::spawn(async move {
        // Subscribe before reading the catch-up so nothing written in between is missed.
        let mut live = state.subscribe();
        let (mut last, catchup) = state.catchup(log, after);
        let send = |line: Bytes| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout(Duration::from_secs(10), tx.send(line)).await,
                    Ok(Ok(()))
                )
            }
        };
        // Catch-up: a snapshot framed by begin/end, or just the records since `after`.
        let (head, records, tail) = match catchup {
            Catchup::Snapshot { log, rev, records } => (
                Some(FeedLine::SnapshotBegin {
                    log,
                    rev,
                    count: records.len(),
                    seal: None,
                }),
                records,
                Some(FeedLine::SnapshotEnd { rev, seal: None }),
            ),
            Catchup::Since { log, records } => (
                Some(FeedLine::Resume {
                    log,
                    rev: last,
                    seal: None,
                }),
                records,
                None,
            ),
        };
        let lines = head
            .into_iter()
            .chain(records.into_iter().map(|r| FeedLine::record((*r).clone())))
            .chain(tail);
        let mut sent_all = true;
        for line in lines {
            if !send(line.sealed(&mut chain)).await {
                sent_all = false;
                break;
            }
        }
        if !sent_all {
            return;
        }
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            let ok = tokio::select! {
                ev = live.recv() => match ev {
                    Ok(Event::Record(r)) if r.rev > last => {
                        last = r.rev;
                        send(FeedLine::record((*r).clone()).sealed(&mut chain)).await
                    }
                    Ok(Event::Record(_)) => true,
                    // Compaction, or this reader fell behind: end the stream; it resumes.
                    Ok(Event::Reset) | Err(_) => false,
                },
                _ = tick.tick() => {
                    let beat = FeedLine::Heartbeat { rev: state.revision().max(last), time_ms: crate::clock::unix_ms(), seal: None };
                    send(beat.sealed(&mut chain)).await
                }
            };
            if !ok {
                return;
            }
        }
    });
    let mut r = Response::new(Either::Right(FeedBody(rx)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}
