//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz` (a key
//! table is loaded and, in fail-closed mode, fresh; 503 from SIGTERM on). Separate from the data port and on
//! loopback by default, so metrics never leak to API clients (THREATS J2).

use crate::gateway::Gateway;
use crate::keys::record::KeyState;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;

pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, ctype: &'static str, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        ));
    }
    Ok(match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            let snap = gw.snapshot();
            if gw.stopping() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready: shutting down\n"),
                )
            } else if gw.ready(&snap) {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    Bytes::from(format!("ready revision={}\n", gw.table().revision())),
                )
            } else if gw.table_loaded() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready: key table older than max_staleness\n"),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready: no key table loaded\n"),
                )
            }
        }
        "/metrics" => {
            let gw2 = gw.clone();
            // Gauges over the whole table are O(keys): compute them off the async workers.
            let body = tokio::task::spawn_blocking(move || {
                refresh_gauges(&gw2);
                gw2.metrics.render()
            })
            .await
            .unwrap_or_default();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(body),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    })
}

/// Gauges derived from the table, computed at scrape time.
pub fn refresh_gauges(gw: &Gateway) {
    let m = &gw.metrics;
    let snap = gw.snapshot();
    let table = gw.table();
    let now = crate::clock::unix_secs();
    m.table_revision.set(table.revision() as i64);
    m.table_sync_age
        .set(gw.sync_age().map_or(-1.0, |a| a.as_secs_f64()));
    m.table_last_sync.set(gw.last_sync_ms() as f64 / 1000.0);
    m.buckets
        .set((gw.limiter.buckets.len() + gw.limiter.fleet().map_or(0, |f| f.len())) as i64);
    m.auth_failure_clients.set(gw.failures.tracked() as i64);
    m.keys.reset();
    for env in snap.keys.format.envs() {
        for state in [
            KeyState::Active,
            KeyState::Expired,
            KeyState::Revoked,
            KeyState::Canary,
            KeyState::Pending,
        ] {
            m.keys.with_label_values(&[state.as_str(), env]).set(0);
        }
    }
    let (mut exp7, mut exp30, mut no_expiry, mut over, mut stale) = (0, 0, 0, 0, 0);
    let stale_before = now - snap.keys.stale_after_secs;
    table.for_each_view(|r| {
        let state = r.state(now);
        m.keys.with_label_values(&[state.as_str(), &r.env]).inc();
        if state != KeyState::Active {
            return;
        }
        match r.expires_at {
            Some(e) if e - now <= 7 * 86_400 => {
                exp7 += 1;
                exp30 += 1;
            }
            Some(e) if e - now <= 30 * 86_400 => exp30 += 1,
            Some(_) => {}
            None => no_expiry += 1,
        }
        if snap
            .keys
            .policy
            .lifetime_exceeded(r.expires_at, r.created_at, r.canary)
        {
            over += 1;
        }
        let last = gw
            .usage
            .get(&r.id)
            .map_or(r.created_at, |u| u.last_used.max(r.created_at));
        if last < stale_before {
            stale += 1;
        }
    });
    m.keys_expiring.with_label_values(&["7d"]).set(exp7);
    m.keys_expiring.with_label_values(&["30d"]).set(exp30);
    m.keys_without_expiry.set(no_expiry);
    m.keys_ttl_over_policy.set(over);
    m.keys_stale.set(stale);
}
