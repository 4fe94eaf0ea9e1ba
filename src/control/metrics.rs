//! The control plane's own Prometheus series, served at its `/metrics` with `/healthz` and
//! `/readyz` (in every mode): without them a control plane outage is invisible.
//!
//! Labels are closed: `operation` is the endpoint (never a key id or a path), `status` the
//! HTTP status code, `kind` a store problem class.

use crate::metrics::{counter_vec, gauge};
use prometheus::{Encoder, IntCounterVec, IntGauge, Registry, TextEncoder};

pub struct ControlMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub store_errors: IntCounterVec,
    /// `POST /v1/api-keys/verify` outcomes: `valid`, `rate_limited`, or the refusal reason.
    pub verify: IntCounterVec,
    pub store_revision: IntGauge,
    pub feed_subscribers: IntGauge,
    pub tokens_issued: prometheus::IntCounter,
    /// Canary keys presented to this control plane (verify, token exchange): the gateway's
    /// series name, so the KeygateCanaryKeyUsed alert covers control planes too.
    pub canary_hits: prometheus::IntCounter,
    /// Re-digests handed in by gateways, by outcome (written, current, refused).
    pub redigested: IntCounterVec,
    pub redis_up: Option<IntGauge>,
    /// Verify's limit decisions taken without Redis (registered with `[redis]`).
    pub limiter_fallback: IntCounterVec,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMetrics")
    }
}

impl ControlMetrics {
    pub fn new() -> ControlMetrics {
        let r = Registry::new();
        let m = ControlMetrics {
            requests: counter_vec(
                &r,
                "keygate_control_requests_total",
                "Control plane requests by operation and HTTP status.",
                &["operation", "status"],
            ),
            store_errors: counter_vec(
                &r,
                "keygate_control_store_errors_total",
                "Store problems the control plane met, by kind (rollback, unsigned, io, unrevoke).",
                &["kind"],
            ),
            verify: counter_vec(
                &r,
                "keygate_control_verify_total",
                "Keys checked through POST /v1/api-keys/verify, by outcome (valid; shadowed: over a limit in shadow mode, answered valid; rate_limited; quota_exceeded; key_malformed, key_unknown, key_revoked, key_expired, key_not_yet_valid, key_canary).",
                &["outcome"],
            ),
            store_revision: gauge(
                &r,
                "keygate_control_store_revision",
                "Revision of the log the control plane serves.",
            ),
            feed_subscribers: gauge(
                &r,
                "keygate_control_feed_subscribers",
                "Gateways (feed readers) connected now.",
            ),
            tokens_issued: crate::metrics::counter(
                &r,
                "keygate_control_tokens_issued_total",
                "Short-lived tokens minted (POST /v1/tokens).",
            ),
            canary_hits: crate::metrics::counter(
                &r,
                "keygate_canary_hits_total",
                "Canary keys presented to this control plane (POST /v1/api-keys/verify, POST /v1/tokens).",
            ),
            redigested: counter_vec(
                &r,
                "keygate_keys_redigested_total",
                "Keys re-digested under the current secret version through this control plane, by outcome (written; current: already on it; refused).",
                &["outcome"],
            ),
            redis_up: None,
            limiter_fallback: IntCounterVec::new(
                prometheus::Opts::new(
                    "keygate_limiter_fallback_total",
                    "Verify's limit decisions taken without Redis (limits.on_redis_down applied), by reason (circuit_open, timeout, error).",
                ),
                &["reason"],
            )
            .unwrap_or_else(|_| crate::metrics::unreachable_collector("limiter_fallback")),
            registry: r,
        };
        for kind in ["rollback", "unsigned", "io", "unrevoke"] {
            m.store_errors.with_label_values(&[kind]);
        }
        for outcome in VERIFY_OUTCOMES {
            m.verify.with_label_values(&[outcome]);
        }
        for outcome in ["written", "current", "refused"] {
            m.redigested.with_label_values(&[outcome]);
        }
        m
    }

    /// Export Redis health (when `[redis]` is configured).
    pub fn with_redis(mut self, up: IntGauge) -> ControlMetrics {
        crate::metrics::reg(&self.registry, up.clone());
        self.redis_up = Some(up);
        crate::metrics::reg(&self.registry, self.limiter_fallback.clone());
        for reason in ["circuit_open", "timeout", "error"] {
            self.limiter_fallback.with_label_values(&[reason]);
        }
        self
    }

    /// For series registered by other modules (webhooks, governance).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics::new()
    }
}

/// Every `outcome` of `keygate_control_verify_total` (the refusals are `AuthError::reason`s).
pub const VERIFY_OUTCOMES: [&str; 10] = [
    "valid",
    "shadowed",
    "rate_limited",
    "quota_exceeded",
    "key_malformed",
    "key_unknown",
    "key_revoked",
    "key_expired",
    "key_not_yet_valid",
    "key_canary",
];

/// The closed operation label for a request (method + path segments).
pub fn operation(method: &http::Method, segments: &[&str]) -> &'static str {
    use http::Method;
    match (method, segments) {
        (_, ["healthz"] | ["readyz"] | ["metrics"]) => "probe",
        (_, ["v1", "openapi.yaml"]) => "openapi",
        (_, ["v1", "feed"]) => "feed",
        (_, ["v1", "usage"]) => "usage",
        (_, ["v1", "events"]) => "events",
        (_, ["v1", "tokens"]) => "token_exchange",
        (_, ["v1", "jwks"]) => "jwks",
        (&Method::GET, ["v1", "api-keys"]) => "list",
        (&Method::POST, ["v1", "api-keys"]) => "create",
        (_, ["v1", "api-keys", "revoke"]) => "mass_revoke",
        (_, ["v1", "api-keys", "lookup"]) => "lookup",
        (_, ["v1", "api-keys", "verify"]) => "verify",
        (&Method::GET, ["v1", "api-keys", _]) => "get",
        (&Method::PATCH, ["v1", "api-keys", _]) => "update",
        (&Method::DELETE, ["v1", "api-keys", _]) => "revoke",
        (_, ["v1", "api-keys", _, "rotate"]) => "rotate",
        (_, ["v1", "api-keys", _, "usage"]) => "key_usage",
        (_, ["v1", "api-keys", _, "redigest"]) => "redigest",
        _ => "other",
    }
}
