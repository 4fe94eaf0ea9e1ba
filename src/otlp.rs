//! OpenTelemetry spans over OTLP/HTTP (cargo feature `otlp`, off by default): one SERVER span
//! per request, with the W3C ids of `trace` (keygate's span is the parent the upstream sees;
//! the client's span, when its trace was continued, is the span's parent).
//!
//! No OpenTelemetry SDK: OTLP/HTTP accepts JSON (`Content-Type: application/json`, the JSON
//! mapping of `ExportTraceServiceRequest`: hex ids, 64-bit integers as strings), so spans are
//! encoded with serde_json and POSTed with hyper-util's client, which is already in the tree.
//!
//! Never on the request path's clock: a finished request hands its span to a bounded queue
//! with `try_send`; a full queue (collector slow or down) drops the span and counts it
//! (`keygate_otlp_spans_total{result="dropped"}`). One task drains the queue in batches of
//! `batch_spans`, or after `flush_interval_ms`, one export at a time (`timeout_ms` each).
//! Attributes are an allow-list: method, the route's name (never the raw path), status,
//! outcome, key id (never a key) and upstream latency.

use crate::config::{Config, ConfigError, OtlpConfig};
use crate::metrics::Metrics;
use crate::trace::{to_hex, TraceContext};
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounter;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// One finished request, as exported.
#[derive(Debug)]
pub struct Span {
    pub trace: TraceContext,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: Method,
    pub route: Option<String>,
    pub status: u16,
    pub outcome: &'static str,
    pub key_id: Option<String>,
    pub upstream: Option<Duration>,
}

/// The request path's handle: a bounded queue to the export task.
#[derive(Debug)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    counts: Counts,
}

/// `keygate_otlp_spans_total{result}`.
#[derive(Debug, Clone)]
struct Counts {
    exported: IntCounter,
    dropped: IntCounter,
    failed: IntCounter,
}

/// `[otlp]` as the export task uses it.
#[derive(Debug)]
struct Settings {
    endpoint: Uri,
    service_name: String,
    batch: usize,
    flush_every: Duration,
    timeout: Duration,
}

/// The endpoint must be a plain `http://` URL with a host (TLS: a local collector or agent).
pub fn validate(c: &Config, o: &OtlpConfig) -> Result<(), ConfigError> {
    endpoint(o).map_err(|m| c.invalid("otlp.endpoint", m))?;
    for (field, value) in [
        ("otlp.queue_spans", o.queue_spans as u64),
        ("otlp.batch_spans", o.batch_spans as u64),
        ("otlp.flush_interval_ms", o.flush_interval_ms),
        ("otlp.timeout_ms", o.timeout_ms),
    ] {
        if value == 0 {
            return Err(c.invalid(field, "must be at least 1"));
        }
    }
    Ok(())
}

fn endpoint(o: &OtlpConfig) -> Result<Uri, String> {
    let uri: Uri = o
        .endpoint
        .parse()
        .map_err(|e| format!("{:?} is not a URL: {e}", o.endpoint))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "{:?}: an http://host:port/v1/traces URL is needed (https: export through a local collector)",
            o.endpoint
        ));
    }
    Ok(uri)
}

impl Exporter {
    /// Start the export task (the config was validated by `Snapshot::build`).
    pub fn start(o: &OtlpConfig, metrics: &Metrics) -> Exporter {
        let spans = metrics.register_counter_vec(
            "keygate_otlp_spans_total",
            "Request spans by export result (exported, dropped: queue full, failed: the collector refused or timed out).",
            "result",
            &["exported", "dropped", "failed"],
        );
        let counts = Counts {
            exported: spans.with_label_values(&["exported"]),
            dropped: spans.with_label_values(&["dropped"]),
            failed: spans.with_label_values(&["failed"]),
        };
        let settings = Settings {
            endpoint: endpoint(o)
                .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1:4318/v1/traces")),
            service_name: o.service_name.clone(),
            batch: o.batch_spans.max(1),
            flush_every: Duration::from_millis(o.flush_interval_ms.max(1)),
            timeout: Duration::from_millis(o.timeout_ms.max(1)),
        };
        let (tx, rx) = mpsc::channel(o.queue_spans.max(1));
        let (flush, flush_rx) = mpsc::channel(1);
        tokio::spawn(run(settings, rx, flush_rx, counts.clone()));
        Exporter { tx, flush, counts }
    }

    /// Queue a span; never waits.
    pub fn export(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.counts.dropped.inc();
        }
    }

    /// Export what is queued (shutdown), waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, answered) = oneshot::channel();
        if self.flush.try_send(done).is_ok() {
            let _ = tokio::time::timeout(limit, answered).await;
        }
    }
}

/// The export task: batch by size or age, one POST at a time.
async fn run(
    s: Settings,
    mut rx: mpsc::Receiver<Span>,
    mut flush: mpsc::Receiver<oneshot::Sender<()>>,
    counts: Counts,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut failing = false;
    let mut batch: Vec<Span> = Vec::with_capacity(s.batch);
    let mut due = tokio::time::Instant::now() + s.flush_every;
    loop {
        tokio::select! {
            span = rx.recv() => match span {
                Some(span) => {
                    if batch.is_empty() {
                        due = tokio::time::Instant::now() + s.flush_every;
                    }
                    batch.push(span);
                    if batch.len() >= s.batch {
                        send(&client, &s, &mut batch, &counts, &mut failing).await;
                    }
                }
                None => {
                    send(&client, &s, &mut batch, &counts, &mut failing).await;
                    return;
                }
            },
            _ = tokio::time::sleep_until(due), if !batch.is_empty() => {
                send(&client, &s, &mut batch, &counts, &mut failing).await;
            }
            Some(done) = flush.recv() => {
                while let Ok(span) = rx.try_recv() {
                    batch.push(span);
                    if batch.len() >= s.batch {
                        send(&client, &s, &mut batch, &counts, &mut failing).await;
                    }
                }
                send(&client, &s, &mut batch, &counts, &mut failing).await;
                let _ = done.send(());
            }
        }
    }
}

/// POST the batch and empty it. Failures are counted per span and logged once per change
/// between working and failing (a dead collector must not flood the log).
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    s: &Settings,
    batch: &mut Vec<Span>,
    counts: &Counts,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let body = encode(&s.service_name, batch);
    batch.clear();
    let result = tokio::time::timeout(s.timeout, post(client, &s.endpoint, body)).await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("no answer within {} ms", s.timeout.as_millis())),
    };
    match error {
        None => {
            counts.exported.inc_by(n);
            if std::mem::take(failing) {
                tracing::info!(endpoint = %s.endpoint, "otlp export working again");
            }
        }
        Some(e) => {
            counts.failed.inc_by(n);
            if !std::mem::replace(failing, true) {
                tracing::warn!(endpoint = %s.endpoint, error = %e, "otlp export failed; spans are counted as failed until it works");
            }
        }
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    endpoint: &Uri,
    body: Vec<u8>,
) -> Result<(), String> {
    let req = Request::post(endpoint.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read the (small) answer so the connection goes back to the pool.
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
    }
}

/// `ExportTraceServiceRequest` in OTLP's JSON mapping.
pub fn encode(service_name: &str, spans: &[Span]) -> Vec<u8> {
    let version = env!("CARGO_PKG_VERSION");
    let doc = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attr_str("service.name", service_name),
                attr_str("service.version", version),
            ]},
            "scopeSpans": [{
                "scope": {"name": "keygate", "version": version},
                "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
            }],
        }],
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

fn span_json(s: &Span) -> Value {
    let route = s.route.as_deref().unwrap_or("none");
    let mut attributes = vec![
        attr_str("http.request.method", s.method.as_str()),
        attr_str("http.route", route),
        attr_int("http.response.status_code", u64::from(s.status)),
        attr_str("keygate.outcome", s.outcome),
    ];
    if let Some(id) = &s.key_id {
        attributes.push(attr_str("keygate.key_id", id));
    }
    if let Some(u) = s.upstream {
        attributes.push(attr_int(
            "keygate.upstream_latency_us",
            u.as_micros() as u64,
        ));
    }
    let mut span = json!({
        "traceId": s.trace.trace_id.to_string(),
        "spanId": to_hex(&s.trace.span_id),
        "name": format!("{} {route}", s.method),
        // SPAN_KIND_SERVER
        "kind": 2,
        "startTimeUnixNano": unix_nanos(s.start).to_string(),
        "endTimeUnixNano": unix_nanos(s.end).to_string(),
        "attributes": attributes,
        // Server spans: only 5xx is an error (OTel HTTP semantic conventions).
        "status": {"code": if s.status >= 500 { 2 } else { 0 }},
    });
    if let (Some(parent), Some(obj)) = (s.trace.parent, span.as_object_mut()) {
        obj.insert("parentSpanId".into(), Value::String(to_hex(&parent)));
    }
    span
}

fn attr_str(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

/// 64-bit integers are strings in OTLP JSON.
fn attr_int(key: &str, value: u64) -> Value {
    json!({"key": key, "value": {"intValue": value.to_string()}})
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_json_mapping_with_hex_ids_and_string_integers() {
        let ids = crate::trace::IdSource::new().sampling_new_traces(true);
        let mut h = http::HeaderMap::new();
        h.insert(
            crate::trace::TRACEPARENT.clone(),
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let trace = ids.context(&h);
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let span = Span {
            trace,
            start,
            end: start + Duration::from_millis(3),
            method: Method::GET,
            route: Some("orders".into()),
            status: 200,
            outcome: "ok",
            key_id: Some("key_1".into()),
            upstream: Some(Duration::from_micros(1500)),
        };
        let v: Value = serde_json::from_slice(&encode("kg", &[span])).unwrap();
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["spanId"], to_hex(&trace.span_id));
        assert_eq!(s["startTimeUnixNano"], "1700000000123456789");
        assert_eq!(s["endTimeUnixNano"], "1700000000126456789");
        assert_eq!(s["name"], "GET orders");
        let attrs = s["attributes"].as_array().unwrap();
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        assert_eq!(get("http.response.status_code").unwrap()["intValue"], "200");
        assert_eq!(
            get("keygate.upstream_latency_us").unwrap()["intValue"],
            "1500"
        );
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "kg"
        );
    }
}
