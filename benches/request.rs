//! The request path's per-request pieces other than the auth decision (`benches/auth.rs`)
//! and the token bucket (`benches/limit.rs`), each on a realistic request:
//!
//! - `request/extract`: the credential from `Authorization: Bearer` (`extract::extract`);
//! - `request/canonicalize`: the path (`path::canonicalize`), plain and percent-encoded;
//! - `request/route`: host + longest prefix + method over 20 routes (`Router::find`);
//! - `request/trace_context`: the request's trace context (`trace::IdSource::context`);
//! - `request/header_rewrite`: the client's headers stripped and the gateway's set
//!   (`hygiene::to_upstream`), then the upstream response's hop-by-hop check
//!   (`hygiene::sanitize_response`) and the `RateLimit-*` headers (`Verdict::headers`).
//!
//! Each iteration works on a fresh clone of the request's headers, as a request would; the
//! clone is measured alone (`request/header_clone`) so it can be subtracted.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keygate::extract::extract;
use keygate::hygiene::{sanitize_response, to_upstream, Forwarding};
use keygate::keys::format::MAX_KEY_LEN;
use keygate::limit::Verdict;
use keygate::path::canonicalize;
use keygate::route::{RouteSpec, Router};
use keygate::trace::IdSource;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;

fn client_headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "api.example.com"),
        ("user-agent", "wrk/4.1.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip"),
    ] {
        h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    let bearer =
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap_or(HeaderValue::from_static("-"));
    h.insert(http::header::AUTHORIZATION, bearer);
    h
}

fn upstream_response_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json"),
        ("content-length", "17"),
        ("date", "Tue, 01 Dec 2026 23:00:00 GMT"),
        ("server", "nginx"),
    ] {
        h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    h
}

fn router() -> Router {
    let mut routes: Vec<RouteSpec> = (0..19)
        .map(|i| RouteSpec {
            host: (i % 3 == 0).then(|| format!("svc{i}.example.com")),
            path_prefix: format!("/svc{i}/v1"),
            methods: vec![Method::GET, Method::POST],
        })
        .collect();
    routes.push(RouteSpec {
        host: None,
        path_prefix: "/api".into(),
        methods: vec![],
    });
    Router::new(routes)
}

fn bench(c: &mut Criterion) {
    let (table, keys) = support::table(1_000, 1_000);
    let key = &keys[0];
    let view =
        match table.authenticate(key, &support::format(), &support::hasher(), support::NOW, 0) {
            Ok(v) => v,
            Err(e) => panic!("bench key refused: {e:?}"),
        };
    let headers = client_headers(key);
    let key_header = HeaderName::from_static("x-api-key");
    let router = router();
    let ids = IdSource::new();
    let request_id = HeaderValue::from_static("0a1b2c3d000000000001");
    let verdict = Verdict {
        allowed: true,
        limit: 1000,
        remaining: 999,
        reset_secs: 1,
        window_secs: 1,
    };

    let mut g = c.benchmark_group("request");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    g.bench_function("extract", |b| {
        b.iter(|| extract(black_box(&headers), None, &key_header, None, MAX_KEY_LEN).is_ok())
    });
    g.bench_function("canonicalize/plain", |b| {
        b.iter(|| canonicalize(black_box("/api/v1/items/42")))
    });
    g.bench_function("canonicalize/encoded", |b| {
        b.iter(|| canonicalize(black_box("/api/v1/items/%7Eab%2Dc/./x")))
    });
    g.bench_function("route", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("api.example.com")),
                black_box("/api/v1/items"),
                &Method::GET,
            )
        })
    });
    g.bench_function("trace_context", |b| {
        b.iter(|| ids.context(black_box(&headers)))
    });
    g.bench_function("header_clone", |b| {
        b.iter(|| (black_box(&headers).clone(), upstream_response_headers()))
    });
    let trace = ids.context(&headers);
    g.bench_function("header_rewrite", |b| {
        b.iter(|| {
            let mut up = black_box(&headers).clone();
            let f = Forwarding {
                key: &view,
                request_id: &request_id,
                host: Some("api.example.com"),
                tls: false,
                client: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
                trace: &trace,
            };
            let ok = to_upstream(&mut up, &key_header, &f).map(|f| f.as_bytes().len());
            let mut down = upstream_response_headers();
            sanitize_response(&mut down);
            verdict.headers(&mut down);
            (ok, up, down)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
