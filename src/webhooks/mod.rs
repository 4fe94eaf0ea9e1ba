//! Webhooks: signed, at-least-once notifications of key events to configured receivers.
//!
//! This module owns the `[[webhooks]]` settings (validated into `Endpoint`s), the delivery
//! document and its signature. The durable queue is `queue`, one HTTP attempt is `send`, and
//! the sender task (audit tail, expiry and staleness ticks, retries) is `run`; `relay` passes
//! a fleet gateway's events to the control plane.
//!
//! One sender per topology: `keygate serve` with a file store on a single node, the control
//! plane in a fleet (feed gateways relay `key.canary_used` and `key.quota_exceeded` to it).
//! Lifecycle events come from the audit log the sender's node writes (every writer audits
//! before it changes the store), so the CLI, the API and the gateway need no second path.

pub mod queue;
pub mod relay;
pub mod run;
pub mod sample;
pub mod send;

use crate::config::{parse_duration, Config, ConfigError, WebhookConfig};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Every event type a receiver may subscribe to.
pub const EVENTS: [&str; 7] = [
    "key.expiring",
    "key.revoked",
    "key.canary_used",
    "key.rotation_completed",
    "key.stale",
    "key.created",
    "key.quota_exceeded",
];

/// The header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + body)>`.
pub const SIGNATURE_HEADER: &str = "keygate-signature";

/// Most attempts to one receiver at once that `max_in_flight` may ask for: each is a socket.
const MAX_IN_FLIGHT: usize = 1024;

/// Shortest signing secret accepted, bytes (as for the hash secret).
const MIN_SECRET_BYTES: usize = 32;

/// The signing secret; never printed.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::new(bytes))
    }
}

/// One validated `[[webhooks]]` entry.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: http::Uri,
    /// The URL as configured: names the endpoint in the queue and in logs.
    pub name: String,
    pub events: BTreeSet<String>,
    pub secret: Secret,
    /// Lead times of `key.expiring`, seconds, longest first.
    pub lead_times: Vec<i64>,
    pub retry_for: Duration,
    pub retry_base: Duration,
    pub timeout: Duration,
    /// Attempts to this receiver running at once, at most (`max_in_flight`, ≥ 1).
    pub max_in_flight: usize,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    pub fn wants(&self, event: &str) -> bool {
        self.events.contains(event)
    }
}

/// Validate every `[[webhooks]]` entry; errors name the field (`webhooks[0].events`).
pub fn endpoints(c: &Config) -> Result<Vec<Endpoint>, ConfigError> {
    c.webhooks
        .iter()
        .enumerate()
        .map(|(i, w)| endpoint(c, i, w))
        .collect()
}

fn endpoint(c: &Config, i: usize, w: &WebhookConfig) -> Result<Endpoint, ConfigError> {
    let field = |name: &str| format!("webhooks[{i}].{name}");
    let url = check_url(&w.url).map_err(|m| c.invalid(field("url"), m))?;
    let events = check_events(&w.events).map_err(|m| c.invalid(field("events"), m))?;
    let secret = read_secret(&w.secret_env).map_err(|m| c.invalid(field("secret_env"), m))?;
    let lead_times =
        check_lead_times(&w.lead_times).map_err(|m| c.invalid(field("lead_times"), m))?;
    let retry_for = parse_duration(&w.retry_for).map_err(|m| c.invalid(field("retry_for"), m))?;
    if w.retry_base_ms == 0 || w.timeout_ms == 0 {
        let which = if w.retry_base_ms == 0 {
            "retry_base_ms"
        } else {
            "timeout_ms"
        };
        return Err(c.invalid(field(which), "must be at least 1"));
    }
    if !(1..=MAX_IN_FLIGHT).contains(&w.max_in_flight) {
        return Err(c.invalid(
            field("max_in_flight"),
            format!("must be 1 to {MAX_IN_FLIGHT}"),
        ));
    }
    let tls = match (url.scheme_str(), &w.ca_file) {
        (Some("https"), Some(ca)) => Some(
            crate::tls::client_config(&c.resolve(ca))
                .map_err(|e| c.invalid(field("ca_file"), e.to_string()))?,
        ),
        (Some("https"), None) => {
            return Err(c.invalid(
                field("ca_file"),
                "an https:// receiver needs the PEM CA bundle that signs its certificate (keygate ships no public root store)",
            ))
        }
        _ => None,
    };
    Ok(Endpoint {
        url,
        name: w.url.clone(),
        events,
        secret,
        lead_times,
        retry_for,
        retry_base: Duration::from_millis(w.retry_base_ms),
        timeout: Duration::from_millis(w.timeout_ms),
        max_in_flight: w.max_in_flight,
        tls,
    })
}

/// `https://` anywhere; `http://` only to a loopback address, where nothing crosses a wire.
fn check_url(text: &str) -> Result<http::Uri, String> {
    let url: http::Uri = text.parse().map_err(|_| format!("{text:?} is not a URL"))?;
    let host = url
        .host()
        .ok_or_else(|| format!("{text:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    match url.scheme_str() {
        Some("https") => Ok(url),
        Some("http") if is_loopback(host) => Ok(url),
        Some("http") => Err(format!(
            "{text:?}: deliveries carry key metadata, so https:// is required (http:// is allowed only to a loopback address)"
        )),
        _ => Err(format!("{text:?}: use an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check_events(events: &[String]) -> Result<BTreeSet<String>, String> {
    if events.is_empty() {
        return Err(format!("name at least one event: {}", EVENTS.join(", ")));
    }
    events
        .iter()
        .map(|e| match EVENTS.contains(&e.as_str()) {
            true => Ok(e.clone()),
            false => Err(format!("unknown event {e:?}; known: {}", EVENTS.join(", "))),
        })
        .collect()
}

/// The secret from its env var: present and at least 32 bytes. The value is never echoed.
fn read_secret(var: &str) -> Result<Secret, String> {
    match std::env::var_os(var) {
        None => Err(format!("environment variable {var} is not set")),
        Some(v) if v.len() < MIN_SECRET_BYTES => Err(format!(
            "the secret in {var} is {} bytes; at least {MIN_SECRET_BYTES} are required",
            v.len()
        )),
        Some(v) => Ok(Secret::new(v.into_encoded_bytes())),
    }
}

fn check_lead_times(leads: &[String]) -> Result<Vec<i64>, String> {
    let mut out = leads
        .iter()
        .map(|l| match parse_duration(l) {
            Ok(d) if d.as_secs() > 0 => Ok(d.as_secs() as i64),
            Ok(_) => Err(format!("{l:?}: a lead time must be positive")),
            Err(m) => Err(m),
        })
        .collect::<Result<Vec<i64>, String>>()?;
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.dedup();
    Ok(out)
}

/// What a receiver gets: the body is this document, byte for byte the same on every attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Stable across retries and restarts: receivers dedupe by it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened, RFC 3339 UTC.
    pub time: String,
    /// The key's public record, as the REST API shows it (no key, digest or MAC).
    pub key: serde_json::Value,
    /// Event details (reason, lead time, route…), never secrets.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Delivery {
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A delivery id derived from what identifies the event, so re-deriving it (after a crash,
/// on another control plane) gives the same id.
pub fn delivery_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    format!("whd_{}", hex(&h.finalize()[..12]))
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &Secret, t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length, so this cannot fail; were it to, an empty `v1` fails
    // every verification rather than sending something unsigned-looking as signed.
    let v1 = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0)
        .map(|mut mac| {
            mac.update(t.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            hex(&mac.finalize().into_bytes())
        })
        .unwrap_or_default();
    format!("t={t},v1={v1}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Wall-clock seconds for the expiry and staleness ticks. Debug builds (the tests' binary)
/// read it from the file named by `KEYGATE_TEST_CLOCK_FILE` when set, so a test can move
/// time forward by days; release builds always use the real clock.
pub fn now_secs() -> i64 {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("KEYGATE_TEST_CLOCK_FILE") {
        if let Some(t) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            return t;
        }
    }
    crate::clock::unix_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_https_unless_loopback() {
        assert!(check_url("https://hooks.example/x").is_ok());
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_url("http://[::1]:9/x").is_ok());
        assert!(check_url("http://localhost/x").is_ok());
        let e = check_url("http://hooks.example/x").unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_url("ftp://x/").is_err());
    }

    #[test]
    fn unknown_events_are_refused_by_name() {
        let e = check_events(&["key.revoked".into(), "key.exploded".into()]).unwrap_err();
        assert!(
            e.contains("key.exploded") && e.contains("key.expiring"),
            "{e}"
        );
        assert!(check_events(&[]).is_err());
    }

    #[test]
    fn lead_times_sort_longest_first() {
        let l = check_lead_times(&["1d".into(), "14d".into(), "7d".into()]).unwrap();
        assert_eq!(l, vec![14 * 86400, 7 * 86400, 86400]);
        assert!(check_lead_times(&["0s".into()]).is_err());
    }

    #[test]
    fn signature_is_hmac_over_timestamp_dot_body() {
        // Computed independently: python3 -c "import hmac,hashlib;print(hmac.new(
        // b'0123456789abcdef0123456789abcdef',b'1700000000.{}',hashlib.sha256).hexdigest())"
        let s = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let sig = signature(&s, 1700000000, b"{}");
        assert_eq!(
            sig,
            "t=1700000000,v1=417adf36b901772f658597a76d329694e335e65fc0849d7715c3ca33406309b5"
        );
        assert_ne!(sig, signature(&s, 1700000001, b"{}"));
        assert_eq!(delivery_id(&["a", "b"]), delivery_id(&["a", "b"]));
        assert_ne!(delivery_id(&["ab"]), delivery_id(&["a", "b"]));
    }
}
