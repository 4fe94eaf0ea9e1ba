//! Every Prometheus collector keygate exports, registered on one owned `Registry`.
//!
//! Label values come only from config (route, upstream, plan) or closed enums (outcome,
//! reason, state, kind): never a key, digest, client IP, raw path or Host, so cardinality is
//! bounded by configuration. Per-key series are opt-in and capped. Hot-path series are
//! resolved once per config snapshot (`RouteSeries`) so a request pays an atomic add, not a
//! label hash lookup.

use crate::error::Outcome;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Idle windows are minutes to days: 1 s (tests) up to a week.
const ROTATION_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0, 86400.0, 259200.0, 604800.0,
];
const PROPAGATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub in_flight: IntGauge,
    pub connections_open: IntGaugeVec,
    pub connections_rejected: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    pub send_timeouts: IntCounter,
    pub connections_released: IntCounter,
    pub connections_retired: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub auth_budget_rejections: IntCounter,
    pub rate_limited: IntCounterVec,
    pub keys: IntGaugeVec,
    pub table_revision: IntGauge,
    pub table_sync_age: Gauge,
    /// When the table last synced, Unix seconds (0: never). Unlike the age, comparable
    /// across nodes and usable with `time()` even when scrapes stop.
    pub table_last_sync: Gauge,
    /// This node's wall clock minus its control plane's, from the feed's last heartbeat:
    /// expiry and not-before are judged by the node's clock (THREATS I14).
    pub clock_skew: Gauge,
    pub source_errors: IntCounterVec,
    /// A feed gateway's usage report batches, by result (accepted, refused, failed).
    pub usage_reports: IntCounterVec,
    /// Events a feed gateway relayed to its control plane, by result (accepted, dropped).
    pub relayed_events: IntCounterVec,
    pub propagation: Histogram,
    /// Rotation events this node applied (started, completed, aborted).
    pub rotations: IntCounterVec,
    /// Seconds from a rotation's start to its completion by itself.
    pub rotation_completion: Histogram,
    pub keys_expiring: IntGaugeVec,
    pub keys_without_expiry: IntGauge,
    pub keys_ttl_over_policy: IntGauge,
    pub keys_stale: IntGauge,
    pub canary_hits: IntCounter,
    pub config_reloads: IntCounterVec,
    pub cert_expiry: GaugeVec,
    pub buckets: IntGauge,
    pub auth_failure_clients: IntGauge,
    pub audit_dropped: IntCounter,
    /// Requests a limit would have refused in shadow mode (`enforce = false`), by plan.
    pub limit_shadowed: IntCounterVec,
    /// Registered by `register_redis` only when `[redis]` is configured, so a single node
    /// exports no Redis series (and no alert fires for a Redis it does not use).
    pub redis_up: IntGauge,
    pub redis_command_seconds: Histogram,
    pub limiter_fallback: IntCounterVec,
    /// Keys seen under an old secret version, by what became of their re-digest.
    pub keys_redigested: IntCounterVec,
    key_requests: IntCounterVec,
    key_series: crate::fastmap::FastMap<crate::keys::compact::KeyId, IntCounter>,
    key_series_cap: usize,
    /// `key_id="other"`, resolved once: past the cap most requests land here.
    key_other: std::sync::OnceLock<IntCounter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Counters for one route, resolved once per snapshot: the outcomes the route can produce
/// are created (at 0) when the snapshot is built; any other is created the first time it
/// happens. Either way a request pays one atomic load to find its counter, never a label
/// hash (the slow path runs once per series and snapshot).
#[derive(Clone)]
pub struct RouteSeries {
    requests: Vec<std::sync::OnceLock<IntCounter>>,
    family: IntCounterVec,
    route: std::sync::Arc<str>,
    pub duration: Histogram,
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSeries")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteSeries {
    pub fn count(&self, outcome: Outcome) {
        if let Some(slot) = self.requests.get(outcome.index()) {
            slot.get_or_init(|| {
                self.family
                    .with_label_values(&[&self.route, outcome.as_str()])
            })
            .inc();
        }
    }
}

pub(crate) fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique; a duplicate is a programming error caught by the tests.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

pub(crate) fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|_| unreachable_collector(name)),
    )
}

pub(crate) fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|_| unreachable_collector(name)),
    )
}

pub(crate) fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(
        r,
        IntCounter::new(name, help).unwrap_or_else(|_| unreachable_collector(name)),
    )
}

pub(crate) fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(
        r,
        IntGauge::new(name, help).unwrap_or_else(|_| unreachable_collector(name)),
    )
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .unwrap_or_else(|_| unreachable_collector(name)),
    )
}

/// The standard `process_*` series (CPU seconds, resident and virtual memory, open and max
/// file descriptors, threads, start time) from the prometheus crate's collector: the same
/// names and semantics as every other exporter, and it reads `/proc` with the kernel's tick
/// rate, which this crate (`unsafe_code = "forbid"`) cannot ask for itself.
fn register_process(r: &Registry) {
    #[cfg(target_os = "linux")]
    if let Err(e) = r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    )) {
        tracing::error!(error = %e, "process metrics registration failed");
    }
}

/// Collector constructors only fail on invalid names/labels, which are literals here and
/// exercised by every test; this keeps construction panic-free without `expect`.
pub(crate) fn unreachable_collector<T>(name: &str) -> T {
    tracing::error!(metric = name, "invalid metric definition");
    std::process::abort()
}

impl Metrics {
    pub fn new(per_key_series: usize) -> Metrics {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "keygate_requests_total",
            "Requests by route and outcome.",
            &["route", "outcome"],
        );
        let m = Metrics {
            request_duration: histogram_vec(&r, "keygate_request_duration_seconds", "Time from request head to response head, by route.", &["route"], LATENCY_BUCKETS),
            upstream_duration: histogram_vec(&r, "keygate_upstream_duration_seconds", "Upstream response-head latency, by upstream.", &["upstream"], LATENCY_BUCKETS),
            upstream_errors: counter_vec(&r, "keygate_upstream_errors_total", "Upstream failures by upstream and kind (connect, timeout, protocol).", &["upstream", "kind"]),
            in_flight: gauge(&r, "keygate_requests_in_flight", "Requests being processed."),
            connections_open: gauge_vec(&r, "keygate_connections_open", "Open client connections by listener.", &["listener"]),
            connections_rejected: counter_vec(&r, "keygate_connections_rejected_total", "Connections closed at accept by a cap (global, per_ip).", &["reason"]),
            tls_handshake_failures: counter(&r, "keygate_tls_handshake_failures_total", "TLS handshakes that failed or timed out."),
            send_timeouts: counter(&r, "keygate_send_timeouts_total", "Client connections closed, and HTTP/2 streams given up, because the client took nothing for server.send_timeout_ms (it stopped reading, or kept its window shut)."),
            connections_retired: counter_vec(&r, "keygate_connections_retired_total", "HTTP/2 connections the gateway sent GOAWAY because no request was in flight for server.h2_idle_timeout_ms (idle), they were open for server.h2_max_connection_age_ms (max_age), or a stream's window stayed shut for server.send_timeout_ms (send_timeout).", &["reason"]),
            protocol_errors: counter_vec(&r, "keygate_protocol_errors_total", "Requests and connections refused by the HTTP layer before the request path: malformed (a head hyper answered 400 or 414), too_large (431), header_timeout (a head not whole within server.header_read_timeout_ms; closed), h2_calm (HTTP/2 GOAWAY ENHANCE_YOUR_CALM: floods, rapid reset), h2_protocol (HTTP/2 GOAWAY for another protocol error).", &["kind"]),
            connections_released: counter(&r, "keygate_connections_released_total", "Idle HTTP/1 keep-alive connections whose parser state and buffers were given back until their next request."),
            auth_failures: counter_vec(&r, "keygate_auth_failures_total", "Failed authentications of a presented key, by reason.", &["reason"]),
            auth_budget_rejections: counter(&r, "keygate_auth_budget_rejections_total", "Requests refused because the client exhausted its failed-auth budget."),
            rate_limited: counter_vec(&r, "keygate_rate_limited_total", "Requests refused by a key's rate limit, by plan.", &["plan"]),
            keys: gauge_vec(&r, "keygate_keys", "Keys in the table by state and env.", &["state", "env"]),
            table_revision: gauge(&r, "keygate_table_revision", "Store revision this node enforces."),
            table_sync_age: reg(&r, Gauge::new("keygate_table_sync_age_seconds", "Seconds since the key table last synced successfully.").unwrap_or_else(|_| unreachable_collector("sync_age"))),
            table_last_sync: reg(&r, Gauge::new("keygate_table_last_sync_timestamp_seconds", "When the key table last synced successfully, Unix seconds (0: never).").unwrap_or_else(|_| unreachable_collector("last_sync"))),
            clock_skew: reg(&r, Gauge::new("keygate_clock_skew_seconds", "This node's wall clock minus its key source's, seconds: the control plane's from the feed's last heartbeat, or Redis' TIME on a Redis-store node (0 until measured, and on file-store nodes). Expiry and not-before are judged by the node's clock.").unwrap_or_else(|_| unreachable_collector("clock_skew"))),
            source_errors: counter_vec(&r, "keygate_source_errors_total", "Key source problems by kind (corrupt_line, rollback, unsigned, bad_mac, cache, checkpoint, shrink, redis, io, feed).", &["kind"]),
            relayed_events: counter_vec(&r, "keygate_relayed_events_total", "Events (key.canary_used, key.quota_exceeded) a feed gateway relayed to its control plane, by result (accepted; dropped: the control plane refused the event itself as invalid, so it was skipped rather than sent again forever; the gateway's audit log keeps it).", &["result"]),
            usage_reports: counter_vec(&r, "keygate_usage_reports_total", "Usage report batches a feed gateway sent its control plane, by result (accepted; refused: answered 4xx, counts kept for the next report; failed: no answer or a 5xx, sent again as it was).", &["result"]),
            propagation: reg(
                &r,
                Histogram::with_opts(HistogramOpts::new("keygate_propagation_seconds", "Seconds from a record being written to it being enforced on this node.").buckets(PROPAGATION_BUCKETS.to_vec()))
                    .unwrap_or_else(|_| unreachable_collector("propagation")),
            ),
            rotations: counter_vec(&r, "keygate_key_rotations_total", "Key rotation events applied on this node, by event (started, completed, aborted).", &["event"]),
            rotation_completion: reg(
                &r,
                Histogram::with_opts(HistogramOpts::new("keygate_key_rotation_completion_seconds", "Seconds from a rotation's start to its completion by itself (--complete-when-idle).").buckets(ROTATION_BUCKETS.to_vec()))
                    .unwrap_or_else(|_| unreachable_collector("rotation_completion")),
            ),
            keys_expiring: gauge_vec(&r, "keygate_keys_expiring", "Active keys expiring within a window (7d, 30d).", &["within"]),
            keys_without_expiry: gauge(&r, "keygate_keys_without_expiry", "Active keys with no expiry."),
            keys_ttl_over_policy: gauge(&r, "keygate_keys_ttl_over_policy", "Active keys whose lifetime exceeds policy.max_ttl."),
            keys_stale: gauge(&r, "keygate_keys_stale", "Active keys unused for keys.stale_after."),
            canary_hits: counter(&r, "keygate_canary_hits_total", "Requests that presented a canary key."),
            config_reloads: counter_vec(&r, "keygate_config_reloads_total", "Config reloads by result (ok, error).", &["result"]),
            cert_expiry: reg(
                &r,
                GaugeVec::new(Opts::new("keygate_tls_certificate_expiry_timestamp_seconds", "notAfter of the served certificate, Unix seconds."), &["listener"])
                    .unwrap_or_else(|_| unreachable_collector("cert_expiry")),
            ),
            buckets: gauge(&r, "keygate_rate_limit_buckets", "Live rate-limit buckets (one per active key lineage)."),
            auth_failure_clients: gauge(&r, "keygate_auth_failure_clients", "Clients tracked by the failed-auth budget."),
            audit_dropped: counter(&r, "keygate_audit_events_dropped_total", "Audit events dropped because the writer fell behind."),
            limit_shadowed: counter_vec(&r, "keygate_rate_limit_shadowed_total", "Requests a rate limit or quota would have refused, admitted because the limit is in shadow mode (enforce = false), by plan.", &["plan"]),
            redis_up: IntGauge::new("keygate_redis_up", "1 while Redis answers (circuit closed), 0 while the limiter treats it as down.").unwrap_or_else(|_| unreachable_collector("redis_up")),
            redis_command_seconds: Histogram::with_opts(HistogramOpts::new("keygate_redis_command_seconds", "Redis command round trips (connect included when one was needed).").buckets(REDIS_BUCKETS.to_vec())).unwrap_or_else(|_| unreachable_collector("redis_command_seconds")),
            limiter_fallback: IntCounterVec::new(Opts::new("keygate_limiter_fallback_total", "Limit decisions taken without Redis (limits.on_redis_down applied), by reason (circuit_open, timeout, error)."), &["reason"]).unwrap_or_else(|_| unreachable_collector("limiter_fallback")),
            keys_redigested: counter_vec(&r, "keygate_keys_redigested_total", "Keys seen under an old hash-secret version, by what became of their re-digest under the current one (written, current: already on it, refused, dropped: queue full, failed: store or control plane unreachable).", &["outcome"]),
            key_requests: counter_vec(&r, "keygate_key_requests_total", "Authenticated requests per key (opt-in, capped; overflow counts as key_id=\"other\").", &["key_id"]),
            key_series: crate::fastmap::new(),
            key_other: std::sync::OnceLock::new(),
            key_series_cap: per_key_series,
            requests,
            registry: r,
        };
        // Which build is running, for dashboards and rollouts (value always 1).
        gauge_vec(
            &m.registry,
            "keygate_build_info",
            "The running keygate build (value 1).",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        register_process(&m.registry);
        // Export alarm counters from the start so `increase()` sees the first hit.
        m.canary_hits.inc_by(0);
        for reason in ["global", "per_ip"] {
            m.connections_rejected.with_label_values(&[reason]);
        }
        for reason in ["idle", "max_age", "send_timeout"] {
            m.connections_retired.with_label_values(&[reason]);
        }
        for kind in crate::protocol_errors::KINDS {
            m.protocol_errors.with_label_values(&[kind]);
        }
        for kind in [
            "corrupt_line",
            "rollback",
            "io",
            "feed",
            "unsigned",
            "bad_mac",
            "cache",
            "redis",
            "checkpoint",
            "shrink",
        ] {
            m.source_errors.with_label_values(&[kind]);
        }
        for result in ["accepted", "refused", "failed"] {
            m.usage_reports.with_label_values(&[result]);
        }
        for result in ["accepted", "dropped"] {
            m.relayed_events.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for o in crate::redigest::Outcome::ALL {
            m.keys_redigested.with_label_values(&[o.as_str()]);
        }
        m
    }

    /// Export the Redis series (called once, when `[redis]` is configured).
    pub fn register_redis(&self) {
        reg(&self.registry, self.redis_up.clone());
        reg(&self.registry, self.redis_command_seconds.clone());
        reg(&self.registry, self.limiter_fallback.clone());
        for reason in ["circuit_open", "timeout", "error"] {
            self.limiter_fallback.with_label_values(&[reason]);
        }
    }

    /// Register a counter that exists only with an optional feature configured (the access
    /// log file, OTLP export), exported at 0 from then on.
    pub fn register_counter(&self, name: &str, help: &str) -> IntCounter {
        counter(&self.registry, name, help)
    }

    /// The same for a labelled counter; `values` are created at 0.
    pub fn register_counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> IntCounterVec {
        let c = counter_vec(&self.registry, name, help, &[label]);
        for v in values {
            c.with_label_values(&[v]);
        }
        c
    }

    /// The collectors the Redis client updates.
    pub fn redis_metrics(&self) -> crate::redis::client::RedisMetrics {
        crate::redis::client::RedisMetrics {
            up: self.redis_up.clone(),
            command_seconds: self.redis_command_seconds.clone(),
        }
    }

    /// Resolve the duration histogram and the per-outcome counters for a route name,
    /// creating (exporting at 0) only the outcomes `reachable` says the route can produce.
    pub fn route_series(&self, route: &str, reachable: impl Fn(Outcome) -> bool) -> RouteSeries {
        RouteSeries {
            requests: Outcome::ALL
                .iter()
                .map(|&o| {
                    let slot = std::sync::OnceLock::new();
                    if reachable(o) {
                        let _ = slot.set(self.requests.with_label_values(&[route, o.as_str()]));
                    }
                    slot
                })
                .collect(),
            family: self.requests.clone(),
            route: route.into(),
            duration: self.request_duration.with_label_values(&[route]),
        }
    }

    /// Export the limit counters at 0 for every configured plan, and the shadow counter for
    /// each plan in shadow mode (`enforced` false), so dashboards list every plan and
    /// `increase()` sees the first refusal. Called on every snapshot build (reloads add plans).
    pub fn plan_series<'a>(&self, plans: impl IntoIterator<Item = (&'a str, bool)>) {
        for (plan, enforced) in plans {
            self.rate_limited.with_label_values(&[plan]);
            if !enforced {
                self.limit_shadowed.with_label_values(&[plan]);
            }
        }
    }

    /// Count an authenticated request for `key_id` if per-key series are enabled.
    pub fn count_key(&self, key_id: &crate::keys::compact::KeyId) {
        if self.key_series_cap == 0 {
            return;
        }
        if let Some(c) = self.key_series.get(key_id) {
            c.inc();
            return;
        }
        if self.key_series.len() < self.key_series_cap {
            let c = self.key_requests.with_label_values(&[key_id.as_str()]);
            c.inc();
            self.key_series.insert(key_id.clone(), c);
        } else {
            self.key_other
                .get_or_init(|| self.key_requests.with_label_values(&["other"]))
                .inc();
        }
    }

    /// The text exposition of every collector.
    /// For series registered by other modules (webhooks, governance).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_caps_per_key_series() {
        let m = Metrics::new(2);
        let s = m.route_series("r1", |_| true);
        s.count(Outcome::Ok);
        for id in ["key_a", "key_b", "key_c", "key_d"] {
            m.count_key(&crate::keys::compact::KeyId::of(id));
        }
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"keygate_requests_total{outcome="ok",route="r1"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"keygate_key_requests_total{key_id="other"} 2"#));
        assert!(text.contains("keygate_canary_hits_total 0"));
    }

    /// Only the reachable outcomes exist before traffic; one that was not pre-created is
    /// still counted when it happens, and counted again on the same series.
    #[test]
    fn unreachable_outcomes_are_created_on_first_use() {
        let m = Metrics::new(0);
        let s = m.route_series("r1", |o| o == Outcome::Ok);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(r#"keygate_requests_total{outcome="ok",route="r1"} 0"#));
        assert!(!text.contains(r#"outcome="token_invalid""#), "{text}");
        s.count(Outcome::TokenInvalid);
        s.count(Outcome::TokenInvalid);
        s.count(Outcome::Ok);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(r#"keygate_requests_total{outcome="token_invalid",route="r1"} 2"#));
        assert!(text.contains(r#"keygate_requests_total{outcome="ok",route="r1"} 1"#));
        // A reload's new snapshot finds the series the old one created.
        m.route_series("r1", |_| false).count(Outcome::TokenInvalid);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(r#"keygate_requests_total{outcome="token_invalid",route="r1"} 3"#));
    }
}
