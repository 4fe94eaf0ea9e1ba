//! `POST /v1/api-keys/verify`: would a gateway accept this key now? For services that are not
//! behind the proxy. A check here is charged and counted like a proxied request: the key's
//! rate limit and quota through the same `limit::charge` a gateway uses (fleet-wide when
//! `[limits] backend = "redis"`), and its use, status and source recorded in usage and leak
//! forensics, so a key used only through verify is never "stale", never looks idle to a
//! rotation that completes when the old key is quiet, and shows in `keys usage`.
//!
//! Usage goes where gateways' does, every touch interval, never per check
//! (`Control::add_usage`): Redis when configured, else the usage file, added under its lock as
//! a file-following gateway adds its counts and as the reports of feed gateways are. Forensics
//! go into `<usage file>.forensics.json`, section `verify`.

use super::api::{err, json_response, ApiError, Body};
use super::Control;
use crate::forensics::{Forensics, Hit, Label};
use crate::keys::compact::{KeyView, Validity as _};
use crate::keys::table::AuthError;
use crate::limit::{Limiter, Refused};
use crate::snapshot::LimitPolicy;
use crate::usage::Usage;
use http::{Response, StatusCode};
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The section verify's forensics are kept under in the forensics file.
pub const NODE: &str = "verify";

/// What verify charges keys against and records their checks in.
pub struct Verifier {
    pub policy: LimitPolicy,
    pub limiter: Limiter,
    /// Verify's own counts (flushed every touch interval by `Control::add_usage`).
    pub usage: Usage,
    forensics: Forensics,
    touch_interval: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish()
    }
}

impl Verifier {
    pub fn new(
        policy: LimitPolicy,
        limiter: Limiter,
        usage_file: &std::path::Path,
        touch_interval: Duration,
    ) -> Verifier {
        Verifier {
            policy,
            limiter,
            usage: Usage::new(usage_file.to_path_buf()),
            forensics: Forensics::new(usage_file, NODE),
            touch_interval,
        }
    }
}

/// The caller's address and user agent, for forensics.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub ip: IpAddr,
    pub user_agent: Option<Label>,
}

/// `POST /v1/api-keys/verify` (verify role, or read/write). `{"valid": false}` never says why
/// (the reason goes to metrics only). A valid key pays one request of its rate limit and
/// quota; a key over either gets the gateway's 429. A canary raises the same alarm as at a
/// gateway (`Control::canary_alarm`).
pub async fn verify(
    c: &Arc<Control>,
    caller: Caller,
    body: &Map<String, Value>,
) -> Result<Response<Body>, ApiError> {
    let presented = super::api::key_field(body)?;
    let table = c.feed.table();
    let now = crate::clock::unix_secs();
    let key = match table.authenticate(
        &presented,
        &c.settings.format,
        &c.settings.hasher,
        now,
        c.settings.leeway_secs,
    ) {
        Ok(r) => r,
        Err(e) => {
            c.metrics.verify.with_label_values(&[e.reason()]).inc();
            if let Some(r) = e.record() {
                let revoked = matches!(e, AuthError::Revoked(_));
                record(c, r, caller, StatusCode::UNAUTHORIZED, revoked, now);
            }
            if let AuthError::Canary(r) = &e {
                let hint = Some(crate::keys::format::hint(&presented));
                c.canary_alarm(r, hint, Some(caller.ip), "verify").await;
            }
            return Ok(json_response(StatusCode::OK, &json!({"valid": false})));
        }
    };
    let v = &c.verifier;
    let mut verdict = None;
    let mut shadowed = false;
    let charged = crate::limit::charge(&v.limiter, &v.policy, &key, &mut verdict, || {
        shadowed = true
    })
    .await;
    let (refused, code, detail) = match charged {
        Ok(()) => {
            let outcome = if shadowed { "shadowed" } else { "valid" };
            c.metrics.verify.with_label_values(&[outcome]).inc();
            record(c, &key, caller, StatusCode::OK, false, now);
            return Ok(valid(c, &key, verdict));
        }
        Err(Refused::Rate(v)) => (v, "rate_limited", "this key is over its rate limit"),
        Err(Refused::Quota(v)) => (v, "quota_exceeded", "this key has used up its quota"),
    };
    c.metrics.verify.with_label_values(&[code]).inc();
    record(c, &key, caller, StatusCode::TOO_MANY_REQUESTS, false, now);
    let mut r = super::api::problem(&err(StatusCode::TOO_MANY_REQUESTS, code, detail));
    refused.refusal_headers(r.headers_mut());
    Ok(r)
}

fn valid(c: &Control, record: &KeyView, verdict: Option<crate::limit::Verdict>) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({
            "valid": true,
            "id": &*record.id,
            "name": c.feed.get(&record.id).map(|f| f.name.clone()).unwrap_or_default(),
            "owner": record.owner,
            "env": record.env,
            "scopes": record.scopes,
            "plan": record.plan,
            "expires_at": record.expires_at(),
            "limit": verdict.map(|v| v.limit),
            "remaining": verdict.map(|v| v.remaining),
            "reset": verdict.map(|v| v.reset_secs),
        }),
    )
}

/// One check by a known key, as a gateway records a request: a use with its status when the
/// key was accepted, the status alone when a limit refused it, and forensics either way
/// (refused and revoked keys included).
fn record(c: &Control, key: &KeyView, caller: Caller, status: StatusCode, revoked: bool, now: i64) {
    let v = &c.verifier;
    match status {
        StatusCode::OK => {
            v.usage.touch(&key.id, now);
            v.usage.status(&key.id, status.as_u16());
        }
        StatusCode::TOO_MANY_REQUESTS => v.usage.status(&key.id, status.as_u16()),
        _ => {}
    }
    v.forensics.record(
        &key.id,
        Hit {
            now,
            status: status.as_u16(),
            route: Some(Label::new(b"verify")),
            ip: caller.ip,
            user_agent: caller.user_agent,
            revoked,
        },
    );
}

/// Every touch interval: verify's usage where gateways put theirs (see the module docs), its
/// forensics into the forensics file. A failed flush keeps its counts for the next one.
pub async fn flush_every_touch(c: Arc<Control>) {
    let mut tick = tokio::time::interval(c.verifier.touch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush(&c).await;
    }
}

async fn flush(c: &Arc<Control>) {
    let v = &c.verifier;
    let mut deltas = v.usage.take_pending();
    if let Err(e) = c.add_usage(&mut deltas).await {
        tracing::warn!(error = %e, "verify usage flush failed; will retry");
        v.usage.restore(deltas);
    }
    let c = c.clone();
    let flushed = tokio::task::spawn_blocking(move || c.verifier.forensics.flush()).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "verify forensics flush failed; will retry");
    }
}
