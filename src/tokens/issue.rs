//! `POST /v1/tokens` on a gateway configured to mint (`[tokens] issue = true`): a single node
//! without a control plane. The same exchange as the control plane's (`control::exchange`):
//! the key extracted and authenticated as the request path does, the same request parser,
//! rules, response and audit event (`broker`), problem+json errors. Refused keys count
//! against the client's failed-auth budget like refused requests, and a client over it is
//! refused before its key is hashed. A canary key raises the gateway's alarm
//! (`Gateway::canary_alarm`, route `token_exchange`) and gets the same 401. This endpoint sits beside the request path (the
//! listener sends `/v1/tokens` here and everything else to `pipeline::handle`); the path
//! itself is unchanged.

use super::broker::{self, MintError};
use crate::access::AccessBody;
use crate::gateway::Gateway;
use crate::keys::table::AuthError;
use crate::pipeline::Conn;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The exchange's request body limit (a body is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
pub const PATH: &str = "/v1/tokens";

/// Whether this request is for the exchange (only on a gateway that issues).
pub fn is_exchange<B>(gw: &Gateway, req: &Request<B>) -> bool {
    gw.broker.is_some() && req.uri().path() == PATH
}

struct Refusal {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

fn refusal(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        detail: detail.into(),
    }
}

impl From<MintError> for Refusal {
    fn from(e: MintError) -> Refusal {
        let (status, code) = e.status_code();
        refusal(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            e.to_string(),
        )
    }
}

fn unauthorized() -> Refusal {
    refusal(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "a valid API key is required",
    )
}

fn respond(status: StatusCode, ctype: &'static str, body: String) -> Response<AccessBody> {
    let mut r = Response::new(AccessBody::new(
        Either::Right(Full::new(Bytes::from(body))),
        None,
    ));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn handle(
    gw: Arc<Gateway>,
    conn: Conn,
    req: Request<Incoming>,
) -> Result<Response<AccessBody>, Infallible> {
    // Polled in place, as the request path is: a panic is this exchange's 500 (`unwind`).
    let mut exchanged = std::pin::pin!(exchange(&gw, conn, req));
    let exchanged = std::future::poll_fn(|cx| crate::unwind::poll_caught(exchanged.as_mut(), cx))
        .await
        .unwrap_or_else(|crate::unwind::Panicked| {
            let e = crate::error::GatewayError::Internal;
            gw.snapshot().unrouted.count(e.outcome());
            tracing::warn!(outcome = e.outcome().as_str(), error = %e, "token exchange failed");
            Err(refusal(e.status(), e.code(), e.to_string()))
        });
    Ok(match exchanged {
        Ok(v) => respond(StatusCode::CREATED, "application/json", v.to_string()),
        Err(e) => {
            let body = serde_json::json!({"type": "about:blank", "title": e.status.canonical_reason().unwrap_or("Error"), "status": e.status.as_u16(), "code": e.code, "detail": e.detail});
            let mut r = respond(e.status, "application/problem+json", body.to_string());
            if e.status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if e.status == StatusCode::METHOD_NOT_ALLOWED {
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            r
        }
    })
}

async fn exchange(
    gw: &Gateway,
    conn: Conn,
    req: Request<Incoming>,
) -> Result<serde_json::Value, Refusal> {
    let Some(broker) = gw.broker.as_deref() else {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such endpoint",
        ));
    };
    if req.method() != Method::POST {
        return Err(refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ));
    }
    let snap = gw.snapshot();
    let ip = conn.peer.ip();
    if let Some(wait) = gw.failures.blocked(ip, Instant::now()) {
        return Err(refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_auth_failures",
            format!("retry in {}s", wait.as_secs().max(1)),
        ));
    }
    let now = crate::clock::unix_secs();
    let parent = {
        let presented = crate::extract::extract(
            req.headers(),
            None,
            &snap.key_header,
            None,
            crate::keys::format::MAX_KEY_LEN,
        )
        .map_err(|_| unauthorized())?;
        let authenticated = match super::jwt::strip_prefix(presented) {
            // No token from a token.
            Some(_) => None,
            None => match gw.table().authenticate(
                presented,
                &snap.keys.format,
                &snap.keys.hasher,
                now,
                snap.keys.leeway_secs,
            ) {
                Ok(key) => Some(key),
                // A canary alarms wherever it is presented; the caller still gets the 401
                // every refused key gets.
                Err(AuthError::Canary(key)) => {
                    let hint = crate::keys::format::hint(presented);
                    gw.canary_alarm(&key, Some(hint), ip, broker::ROUTE);
                    None
                }
                Err(_) => None,
            },
        };
        authenticated.ok_or_else(|| {
            gw.failures.record(ip, Instant::now());
            unauthorized()
        })?
    };
    #[cfg(feature = "test-panic")]
    crate::fault::panic_if_asked(req.headers());
    let body = tokio::time::timeout(
        Duration::from_millis(snap.server.body_timeout_ms),
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| {
        refusal(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "request body not received in time",
        )
    })?
    .map_err(|_| {
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body over {MAX_BODY} bytes"),
        )
    })?
    .to_bytes();
    let request = broker::parse_request(&body)?;
    let keys = broker.signing_keys()?;
    let minted = broker::mint(&keys, &parent, &request, &broker.settings, now)?;
    gw.audit(broker::issued_event(&parent, &minted));
    Ok(broker::response_body(&minted, now))
}
