//! OpenTelemetry export (cargo feature `otlp`; `ci/test` runs the suite with every feature):
//! the real gateway binary sends one span per request over OTLP/HTTP JSON to a receiving HTTP
//! server started by the test. Ids come from the W3C trace context (a sampled client trace is
//! continued with the client's span as parent, a new trace is started sampled, an unsampled
//! one is not exported); attributes are the route's name, status, key id and upstream latency,
//! never the raw path or the key. A collector that never answers costs requests nothing:
//! spans beyond the bounded queue are dropped and counted.
//!
//! Not `#![cfg(feature = "otlp")]`: without the feature the binary refuses `[otlp]`, and these
//! tests fail saying how to run them, instead of disappearing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const POLL: Duration = Duration::from_secs(20);
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn config(up: std::net::SocketAddr, collector: std::net::SocketAddr, otlp: &str) -> String {
    gateway_config(
        up,
        1000,
        "",
        "",
        &format!(
            "[otlp]\nendpoint = \"http://{collector}/v1/traces\"\nservice_name = \"keygate-test\"\n{otlp}\n\n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"up\"\n"
        ),
    )
}

async fn spawn(config: &std::path::Path) -> Gateway {
    match Gateway::try_spawn(config, SECRET_ENV).await {
        Ok(gw) => {
            wait_ready(&gw, POLL).await;
            gw
        }
        Err(e) => panic!(
            "the gateway refused [otlp]; build with the feature (ci/test, or cargo test --features otlp): {e}"
        ),
    }
}

/// Every span the collector received, with the requests' content types.
fn received(collector: &Upstream) -> Vec<Value> {
    let mut spans = vec![];
    for r in collector.records() {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path_and_query, "/v1/traces");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        let doc: Value = serde_json::from_slice(&r.body).unwrap();
        let rs = &doc["resourceSpans"][0];
        assert_eq!(rs["resource"]["attributes"][0]["key"], "service.name");
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "keygate-test"
        );
        spans.extend(
            rs["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
                .iter()
                .cloned(),
        );
    }
    spans
}

fn attr(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

fn span_of<'a>(spans: &'a [Value], trace: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["traceId"] == trace).collect();
    assert_eq!(found.len(), 1, "one span for trace {trace}: {spans:?}");
    found[0]
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http_json_with_w3c_ids_and_allow_listed_attributes() {
    let up = Upstream::start(Mode::Echo).await;
    let collector = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &config(up.addr(), collector.addr(), "flush_interval_ms = 50"),
    );
    let key = create_key(&cfg, &[]);
    let gw = spawn(&cfg).await;
    let auth = format!("Bearer {}", key.key);

    // Unsampled client trace first: it must not show up even once the others have.
    let unsampled = format!("00-{UNSAMPLED_TRACE}-{CLIENT_SPAN}-00");
    let r = get(
        gw.http,
        "/orders/1",
        &[("authorization", &auth), ("traceparent", &unsampled)],
    )
    .await;
    assert_eq!(r.0, 200);
    // A sampled client trace, continued.
    let sampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let r = get(
        gw.http,
        "/orders/42?q=raw",
        &[
            ("authorization", &auth),
            ("traceparent", &sampled),
            ("x-request-id", "continued"),
        ],
    )
    .await;
    assert_eq!(r.0, 200);
    // No trace context: keygate starts a sampled one.
    let r = get(
        gw.http,
        "/orders/43",
        &[("authorization", &auth), ("x-request-id", "fresh")],
    )
    .await;
    assert_eq!(r.0, 200);
    // Refused: no key id, no upstream latency; the trace id is the one in the problem body.
    let (status, _, body) = get(gw.http, "/orders/44", &[]).await;
    assert_eq!(status, 401);
    let refused_trace = json(&body)["trace_id"].as_str().unwrap().to_owned();

    let spans = eventually_named("three spans at the collector", POLL, || async {
        let s = received(&collector);
        (s.len() >= 3).then_some(s)
    })
    .await;
    assert_eq!(spans.len(), 3, "{spans:?}");
    assert!(
        spans.iter().all(|s| s["traceId"] != UNSAMPLED_TRACE),
        "unsampled trace exported"
    );

    let by_request = |id: &str| {
        up.records()
            .into_iter()
            .find(|r| r.header("x-request-id").as_deref() == Some(id))
            .unwrap()
            .header("traceparent")
            .unwrap()
    };
    // Continued: the client's trace, the client's span as parent, and keygate's span is the
    // parent the upstream saw.
    let s = span_of(&spans, CLIENT_TRACE);
    assert_eq!(s["parentSpanId"], CLIENT_SPAN);
    let forwarded = by_request("continued");
    assert_eq!(
        forwarded,
        format!("00-{CLIENT_TRACE}-{}-01", s["spanId"].as_str().unwrap())
    );
    assert_eq!(s["kind"], 2);
    assert_eq!(s["name"], "GET orders");
    assert_eq!(attr(s, "http.route").unwrap()["stringValue"], "orders");
    assert_eq!(
        attr(s, "http.request.method").unwrap()["stringValue"],
        "GET"
    );
    assert_eq!(
        attr(s, "http.response.status_code").unwrap()["intValue"],
        "200"
    );
    assert_eq!(
        attr(s, "keygate.key_id").unwrap()["stringValue"],
        key.id.as_str()
    );
    let upstream_us: u64 = attr(s, "keygate.upstream_latency_us").unwrap()["intValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(upstream_us > 0);
    let start: u128 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 1_600_000_000_000_000_000 && end >= start);

    // Started by keygate: sampled towards the upstream, no parent.
    let forwarded = by_request("fresh");
    let fresh_trace = &forwarded[3..35];
    assert!(forwarded.ends_with("-01"), "{forwarded}");
    let s = span_of(&spans, fresh_trace);
    assert!(s.get("parentSpanId").is_none());
    assert_eq!(&forwarded[36..52], s["spanId"].as_str().unwrap());

    let s = span_of(&spans, &refused_trace);
    assert_eq!(
        attr(s, "http.response.status_code").unwrap()["intValue"],
        "401"
    );
    assert!(attr(s, "keygate.key_id").is_none());
    assert!(attr(s, "keygate.upstream_latency_us").is_none());

    // Never the key, never the raw path.
    for r in collector.records() {
        let body = r.body_str();
        assert!(
            !body.contains(&key.key) && !body.contains("/orders/42") && !body.contains("q=raw")
        );
    }
    let metrics = String::from_utf8_lossy(&get(gw.admin, "/metrics", &[]).await.2).into_owned();
    assert_eq!(
        metric(&metrics, "keygate_otlp_spans_total{result=\"exported\"}"),
        3
    );
    assert_eq!(
        metric(&metrics, "keygate_otlp_spans_total{result=\"dropped\"}"),
        0
    );
    gw.assert_not_logged(&key.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_drops_and_counts_spans_without_slowing_requests() {
    let up = Upstream::start(Mode::Echo).await;
    let collector = Upstream::start(Mode::Blackhole).await;
    let dir = tempdir();
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &config(
            up.addr(),
            collector.addr(),
            "queue_spans = 4\nbatch_spans = 2\ntimeout_ms = 600000",
        ),
    );
    let key = create_key(&cfg, &[]);
    let gw = spawn(&cfg).await;
    let auth = format!("Bearer {}", key.key);
    // Each request is bounded: a blocked export must never hold one.
    for i in 0..30 {
        let r = within(
            &format!("request {i}"),
            Duration::from_secs(10),
            get(gw.http, "/orders/1", &[("authorization", &auth)]),
        )
        .await;
        assert_eq!(r.0, 200);
    }
    // At most one batch (2) is stuck at the collector and 4 wait in the queue: the rest are
    // dropped and counted.
    let dropped = eventually_named("dropped spans counted", POLL, || async {
        let text = String::from_utf8_lossy(&get(gw.admin, "/metrics", &[]).await.2).into_owned();
        let d = metric(&text, "keygate_otlp_spans_total{result=\"dropped\"}");
        (d >= 24).then_some(d)
    })
    .await;
    assert!(dropped <= 29, "{dropped}");
    assert!(collector.accepted() >= 1, "the export was attempted");
}
