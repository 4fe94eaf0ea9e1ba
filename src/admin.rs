//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz` (a key
//! table is loaded and, in fail-closed mode, fresh; 503 from SIGTERM on). Separate from the data port and on
//! loopback by default, so metrics never leak to API clients (THREATS J2).

use crate::gateway::Gateway;
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
            // Off the async workers: the gauges' lock may be held by a table load.
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

/// Gauges derived from the table and the node's state, set at scrape time.
pub fn refresh_gauges(gw: &Gateway) {
    let m = &gw.metrics;
    let table = gw.table();
    m.table_revision.set(table.revision() as i64);
    m.table_sync_age
        .set(gw.sync_age().map_or(-1.0, |a| a.as_secs_f64()));
    m.table_last_sync.set(gw.last_sync_ms() as f64 / 1000.0);
    m.buckets
        .set((gw.limiter.buckets.len() + gw.limiter.fleet().map_or(0, |f| f.len())) as i64);
    m.auth_failure_clients.set(gw.failures.tracked() as i64);
    // Counts kept on every change (`keys::gauges`): no pass over the table here.
    let counts = gw.key_counts();
    m.keys.reset();
    for ((state, env), n) in &counts.states {
        m.keys.with_label_values(&[state.as_str(), env]).set(*n);
    }
    m.keys_expiring
        .with_label_values(&["7d"])
        .set(counts.expiring_7d);
    m.keys_expiring
        .with_label_values(&["30d"])
        .set(counts.expiring_30d);
    m.keys_without_expiry.set(counts.without_expiry);
    m.keys_ttl_over_policy.set(counts.over_policy);
    m.keys_stale.set(counts.stale);
}
