//! The control plane's token endpoints: `POST /v1/tokens` (an API key in, a short-lived token
//! out) and `GET /v1/jwks` (the public keys gateways verify with).
//!
//! The exchange authenticates the API key exactly as a gateway does (`extract` for where the
//! key may be, the key table's `authenticate` for whether it is live), against the log this
//! control plane serves; a token is never accepted as the credential (no token from a token).
//! Every mint is audited (`token.issued`, naming the parent key, never the token) before the
//! token is returned; a mint that cannot be audited is refused. A refused key counts against
//! the client's failed-auth budget (`[limits] auth_failures_per_minute`), as on a gateway, and
//! a client over it is answered 429 `too_many_auth_failures` before any key is hashed. A
//! canary key raises the alarm it raises everywhere (`Control::canary_alarm`, route
//! `token_exchange`) and gets the same 401.

use super::api::{self, ApiError, Body};
use super::Control;
use crate::keys::table::AuthError;
use crate::tokens::broker::{self, MintError};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

impl From<MintError> for ApiError {
    fn from(e: MintError) -> ApiError {
        let (status, code) = e.status_code();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        api::err(status, code, e.to_string())
    }
}

fn unauthorized() -> ApiError {
    // One answer for every refused key, as on a gateway: the caller learns nothing of why.
    api::err(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "a valid API key is required",
    )
}

/// `GET /v1/jwks`: unauthenticated (public keys only); 503 while the key file is unreadable,
/// so a gateway keeps the keys it holds rather than adopting an empty set.
pub fn jwks(c: &Control) -> Result<Response<Body>, ApiError> {
    let keys = c.broker.signing_keys()?;
    let mut r = api::json_response(StatusCode::OK, &keys.jwks());
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("public, max-age=60"),
    );
    Ok(r)
}

/// `POST /v1/tokens`.
pub async fn exchange(
    c: &Arc<Control>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let now = crate::clock::unix_secs();
    let ip = req.extensions().get::<api::Peer>().map(|p| p.0);
    if let Some(wait) = ip.and_then(|ip| c.failures.blocked(ip, Instant::now())) {
        let secs = wait.as_secs().max(1);
        let e = api::err(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_auth_failures",
            format!("retry in {secs}s"),
        );
        return Err(e.retry_after(secs));
    }
    let parent = {
        let key_header = http::HeaderName::from_bytes(
            c.config.server.key_header.to_ascii_lowercase().as_bytes(),
        )
        .unwrap_or(http::HeaderName::from_static("x-api-key"));
        let presented = crate::extract::extract(
            req.headers(),
            None,
            &key_header,
            None,
            crate::keys::format::MAX_KEY_LEN,
        )
        .map_err(|_| unauthorized())?;
        if crate::tokens::jwt::strip_prefix(presented).is_some() {
            return Err(unauthorized());
        }
        let authenticated = c.broker.table(&c.feed).authenticate(
            presented,
            &c.settings.format,
            &c.settings.hasher,
            now,
            c.settings.leeway_secs,
        );
        match authenticated {
            Ok(key) => key,
            Err(e) => {
                tracing::debug!(
                    reason = e.reason(),
                    key_id = e.record().map(|r| &*r.id).unwrap_or("-"),
                    "token exchange refused"
                );
                if let Some(ip) = ip {
                    c.failures.record(ip, Instant::now());
                }
                // A canary alarms wherever it is presented; the caller still gets the 401
                // every refused key gets.
                if let AuthError::Canary(key) = &e {
                    let hint = Some(crate::keys::format::hint(presented));
                    c.canary_alarm(key, hint, ip, broker::ROUTE).await;
                }
                return Err(unauthorized());
            }
        }
    };
    let request = broker::parse_request(&api::read_body(c, req).await?)?;
    let keys = c.broker.signing_keys()?;
    let minted = broker::mint(&keys, &parent, &request, &c.broker.settings, now)?;
    let event = broker::issued_event(&parent, &minted);
    let audit = crate::audit::AuditLog::new(&c.settings.audit_log);
    tokio::task::spawn_blocking(move || audit.append(&[event]))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| {
            tracing::error!(error = %e, "token not issued: audit failed");
            api::err(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit log cannot be written",
            )
        })?;
    c.metrics.tokens_issued.inc();
    let v = broker::response_body(&minted, now);
    Ok(api::json_response(StatusCode::CREATED, &v))
}
