//! The serde model of `keygate.toml`, and loading it with errors that name the file and field.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently ignored setting.
//! Units are in names (`_ms`, `_bytes`) or in the value (`"90d"`, `"100/s"`). Paths resolve
//! relative to the config file. This module only parses; `snapshot` validates and indexes.

use crate::locate::{self, LineCol};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or a value of the wrong type: where it is, and in which field when the
    /// error falls inside one.
    #[error("config {}{}: {}{message}", path.display(), at_line(at), field_prefix(field))]
    Parse {
        path: PathBuf,
        at: Option<LineCol>,
        field: Option<String>,
        message: String,
    },
    /// A value that parsed but is not acceptable, named by field and by where it came from.
    #[error("config {}{}: `{field}`{}: {message}", path.display(), origin_line(origin), origin_env(origin))]
    Invalid {
        path: PathBuf,
        field: String,
        origin: Origin,
        message: String,
    },
    #[error("{0}")]
    Secret(String),
}

/// Where a config value came from, so an error can point at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Written in the file at this line (None: not written there, a default).
    File(Option<LineCol>),
    /// Set by this environment variable, which wins over the file.
    Env(&'static str),
}

fn at_line(at: &Option<LineCol>) -> String {
    at.map(|lc| format!(":{lc}")).unwrap_or_default()
}

fn field_prefix(field: &Option<String>) -> String {
    field
        .as_ref()
        .map(|f| format!("`{f}`: "))
        .unwrap_or_default()
}

fn origin_line(origin: &Origin) -> String {
    match origin {
        Origin::File(at) => at_line(at),
        Origin::Env(_) => String::new(),
    }
}

fn origin_env(origin: &Origin) -> String {
    match origin {
        Origin::File(_) => String::new(),
        Origin::Env(var) => format!(" (from {var})"),
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cors: CorsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub tokens: TokensConfig,
    /// Shared Redis for fleet-wide limits, quotas and usage. None: everything stays per node.
    pub redis: Option<RedisConfig>,
    /// `[access_log]`: one JSON line per request into a file, reopened on SIGUSR1.
    pub access_log: Option<AccessLogConfig>,
    /// `[otlp]`: one span per request over OTLP/HTTP (needs the `otlp` cargo feature).
    pub otlp: Option<OtlpConfig>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Signed notifications of key events (`webhooks`).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// The directory the config file lives in; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub path: PathBuf,
    /// The file's text, kept so a validation error can name the line of the field.
    #[serde(skip)]
    pub source: Arc<str>,
    /// Fields set by an environment variable (`ENV_OVERRIDES`), so their errors name it.
    #[serde(skip)]
    pub overrides: Vec<&'static EnvOverride>,
}

/// A setting a container sets from its environment rather than by templating the file.
#[derive(Debug)]
pub struct EnvOverride {
    pub var: &'static str,
    pub field: &'static str,
    slot: fn(&mut Config) -> &mut String,
}

/// Applied after the file is parsed, so the variable wins over the file. The config path
/// (`KEYGATE_CONFIG`) and log format (`KEYGATE_LOG_FORMAT`) are arguments and live in `cli`.
pub static ENV_OVERRIDES: [EnvOverride; 3] = [
    EnvOverride {
        var: "KEYGATE_LISTEN",
        field: "server.listen",
        slot: |c| &mut c.server.listen,
    },
    EnvOverride {
        var: "KEYGATE_ADMIN_LISTEN",
        field: "admin.listen",
        slot: |c| &mut c.admin.listen,
    },
    EnvOverride {
        var: "KEYGATE_CONTROL_LISTEN",
        field: "control.listen",
        slot: |c| &mut c.control.listen,
    },
];

/// One `[[webhooks]]` receiver (validated by `webhooks::Endpoint::from_config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://` URL (`http://` only to a loopback address).
    pub url: String,
    /// Event types delivered, e.g. `["key.revoked", "key.expiring"]`.
    pub events: Vec<String>,
    /// Env var holding the signing secret (≥ 32 bytes).
    pub secret_env: String,
    /// When `key.expiring` fires before expiry, e.g. `["14d", "7d", "1d"]` (the default).
    #[serde(default = "default_lead_times")]
    pub lead_times: Vec<String>,
    /// How long a delivery is retried before it is given up, e.g. "24h" (the default).
    #[serde(default = "default_retry_for")]
    pub retry_for: String,
    /// First retry delay, ms; doubles per attempt (with jitter), capped at 10 minutes.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Per attempt: connect, TLS and response within this, ms.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts to this receiver open at once, at most (the rest wait their turn): a mass
    /// revocation queues one delivery per key, and a receiver that accepts connections but
    /// never answers would otherwise hold a socket for each until its timeout.
    #[serde(default = "default_webhook_max_in_flight")]
    pub max_in_flight: usize,
    /// PEM CA bundle that signs the receiver's certificate (needed for `https://`: keygate
    /// ships no public root store).
    pub ca_file: Option<PathBuf>,
}

fn default_lead_times() -> Vec<String> {
    vec!["14d".into(), "7d".into(), "1d".into()]
}

fn default_retry_for() -> String {
    "24h".into()
}

fn default_retry_base_ms() -> u64 {
    1000
}

fn default_webhook_timeout_ms() -> u64 {
    5000
}

fn default_webhook_max_in_flight() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// The record log (JSON lines), relative to the config file.
    pub store: PathBuf,
    /// Env var holding the current hash secret (≥ 32 bytes).
    pub hash_secret_env: String,
    /// Alternatively, a file holding it (trailing newline ignored). Wins over the env var.
    pub hash_secret_file: Option<PathBuf>,
    /// Version number of the current secret; records remember the version they were hashed with.
    pub hash_secret_version: u32,
    /// Older secrets still accepted during a secret rotation.
    pub previous_secrets: Vec<PreviousSecret>,
    /// Key prefix: lowercase letters and digits, 1–16 chars.
    pub prefix: String,
    /// Environments a key may name.
    pub envs: Vec<String>,
    /// Audit log (JSON lines), relative to the config file.
    pub audit_log: PathBuf,
    /// Last-use file written by the gateway (atomic replace), relative to the config file.
    pub usage_file: PathBuf,
    /// How often last-use data is flushed, seconds. Env `API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS` wins.
    pub touch_interval_seconds: Option<u64>,
    /// Default grace for `keys rotate`, e.g. "48h".
    pub rotate_grace: String,
    /// How often rotations started with `--complete-when-idle` are checked for completion,
    /// seconds (by `keygate serve` with a file store, and by `keygate control`).
    pub rotation_check_seconds: u64,
    /// Revoked records older than this are dropped by `keys compact`, e.g. "90d".
    pub revoked_retention: String,
    /// Clock-skew allowance for expiry and not-before, e.g. "0s" (exact).
    pub expiry_leeway: String,
    /// Fallback polling interval of the store file, ms (file notifications are the fast path).
    pub poll_interval_ms: u64,
    /// "file" (default), "feed" or "redis" (the store in Redis: needs `[redis]`).
    pub source: String,
    /// `http://` or `https://` URL of the control plane's `/v1/feed`.
    pub feed_url: Option<String>,
    /// PEM file of the CA(s) that sign the control plane's certificate (for `https://`).
    pub feed_ca: Option<PathBuf>,
    pub feed_token_env: String,
    /// Local copy of the last table applied from the feed.
    pub feed_cache: PathBuf,
    /// How stale the table may get (no sync) before `on_stale` applies, e.g. "5m".
    pub max_staleness: String,
    /// "serve" (keep serving, alarm) or "fail_closed" (503).
    pub on_stale: String,
    /// A whole table from the feed, the store file or the Redis store that leaves out more
    /// than this share (%) of the live keys held (at least 10 of them) is refused and the last
    /// good table kept; 100 turns it off.
    pub max_snapshot_drop_percent: u8,
    /// Keys unused for this long count as stale, e.g. "90d".
    pub stale_after: String,
    /// What `serve` (at start and on a reload) and `check` do when live keys use a secret
    /// version with no configured secret (they would all fail with 401): "refuse" (default:
    /// no start, the reload refused whole) or "warn".
    pub on_missing_secret_version: String,
    /// Re-digest keys seen in traffic under an old secret version under the current one
    /// (hash-secret migration, `redigest`): true (default) or false.
    pub redigest: bool,
    /// Send re-digests to this control plane (`http(s)://host:port`) instead of writing the
    /// store; default: the feed's control plane in feed mode, the store otherwise.
    pub redigest_url: Option<String>,
    /// Env var holding a `redigest`-role admin token, for re-digests sent to a control plane.
    pub redigest_token_env: String,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            store: "keys.jsonl".into(),
            hash_secret_env: "API_KEY_HASH_SECRET".into(),
            hash_secret_file: None,
            hash_secret_version: 1,
            previous_secrets: vec![],
            prefix: "kg".into(),
            envs: vec!["live".into(), "test".into()],
            audit_log: "audit.jsonl".into(),
            usage_file: "usage.json".into(),
            touch_interval_seconds: None,
            rotate_grace: "48h".into(),
            rotation_check_seconds: 30,
            revoked_retention: "90d".into(),
            expiry_leeway: "0s".into(),
            poll_interval_ms: 250,
            source: "file".into(),
            feed_url: None,
            feed_ca: None,
            feed_token_env: "KEYGATE_FEED_TOKEN".into(),
            feed_cache: "feed-cache.jsonl".into(),
            max_staleness: "5m".into(),
            on_stale: "serve".into(),
            max_snapshot_drop_percent: 50,
            stale_after: "90d".into(),
            on_missing_secret_version: "refuse".into(),
            redigest: true,
            redigest_url: None,
            redigest_token_env: "KEYGATE_REDIGEST_TOKEN".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousSecret {
    pub version: u32,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Longest allowed key lifetime, e.g. "365d" (the default).
    pub max_ttl: Option<String>,
    /// Every key names an owner (default true): mass revocation and audit work by owner.
    pub require_owner: bool,
    pub require_expiry: bool,
    /// Scopes allowed per env; an env not listed allows any scope.
    pub allowed_scopes: BTreeMap<String, Vec<String>>,
}

/// Secure defaults, and the values config/keygate.toml documents: a key has an owner and
/// lives at most a year unless the operator loosens `[policy]` on purpose.
impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_ttl: Some("365d".into()),
            require_owner: true,
            require_expiry: false,
            allowed_scopes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// "N/s", "N/m" or "N/h".
    pub rate: String,
    /// Bucket size (requests allowed at once); defaults to one second's worth, at least 1.
    pub burst: Option<u32>,
    /// Calendar quota, "N/month", "N/day" or "N/hour" (UTC); needs `[redis]`.
    pub quota: Option<String>,
    /// `false`: shadow mode for this plan (count would-be refusals, refuse nothing).
    /// Default: `limits.enforce`.
    pub enforce: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Plain HTTP listener (or HTTPS when `tls` is set without its own `listen`).
    pub listen: String,
    pub tls: Option<TlsConfig>,
    /// Peers whose X-Forwarded-For / X-Forwarded-Proto we believe (CIDRs). Default: none.
    pub trusted_proxies: Vec<String>,
    /// Header carrying the key besides `Authorization: Bearer`.
    pub key_header: String,
    pub header_read_timeout_ms: u64,
    pub tls_handshake_timeout_ms: u64,
    pub keepalive_idle_ms: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_in_flight: usize,
    /// Lame duck after SIGTERM: `/readyz` answers 503 at once while the listeners keep
    /// accepting for this long, so load balancers stop routing here before anything is refused.
    pub shutdown_delay_ms: u64,
    pub drain_timeout_ms: u64,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_bytes: u32,
    /// Default request body limit; a route may lower or raise it.
    pub max_body_bytes: u64,
    /// Request body must arrive within this long in total.
    pub body_timeout_ms: u64,
    /// A write to a client that waits this long (the client stopped reading) closes the
    /// connection; an HTTP/2 stream whose window stays shut this long is given up and its
    /// connection retired (`send_deadline`, `lifetime`). The connections' limit is read at
    /// start.
    pub send_timeout_ms: u64,
    /// An HTTP/2 connection with no request in flight this long is sent GOAWAY and closed
    /// (`lifetime`).
    pub h2_idle_timeout_ms: u64,
    /// An HTTP/2 connection open this long is sent GOAWAY; its requests in flight get
    /// `drain_timeout_ms`. 0 (the default): no limit.
    pub h2_max_connection_age_ms: u64,
    /// Data-plane threads, each with its own listener (`SO_REUSEPORT`) and runtime. 0 (the
    /// default): one per CPU this process may run on.
    pub workers: usize,
}

impl ServerConfig {
    /// `workers`, with 0 resolved to the CPUs available (affinity and cgroup quota counted).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            tls: None,
            trusted_proxies: vec![],
            key_header: "x-api-key".into(),
            header_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            keepalive_idle_ms: 60_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_in_flight: 5_000,
            shutdown_delay_ms: 5_000,
            drain_timeout_ms: 30_000,
            h2_max_concurrent_streams: 100,
            h2_max_header_list_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            body_timeout_ms: 60_000,
            send_timeout_ms: 30_000,
            h2_idle_timeout_ms: 60_000,
            h2_max_connection_age_ms: 0,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, HTTPS listens here in addition to the plain `listen`.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// /metrics /healthz /readyz. Loopback by default: never expose it on the data port.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Failed authentications allowed per client (IPv4 address or IPv6 /64) per minute.
    pub auth_failures_per_minute: u32,
    /// How long a client over its failure budget gets 429 without its key being looked at.
    pub auth_failure_block_seconds: u64,
    /// Most clients tracked by the failure budget (memory bound).
    pub auth_failure_max_tracked: usize,
    /// "local" (per-node buckets, the default) or "redis" (fleet-wide; needs `[redis]`).
    pub backend: String,
    /// With backend "redis", while Redis is unreachable: "local" (per-node buckets),
    /// "fail_open" (admit, no rate headers) or "fail_closed" (429).
    pub on_redis_down: String,
    /// `false`: shadow mode (count and announce would-be refusals, refuse nothing).
    pub enforce: bool,
    /// Backend "redis": a node leases at most `rate × lease_window_ms` tokens at once...
    pub lease_window_ms: u64,
    /// ...and never more than this many (the over-admission bound is nodes × this).
    pub lease_max: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            auth_failures_per_minute: 20,
            auth_failure_block_seconds: 60,
            auth_failure_max_tracked: 100_000,
            backend: "local".into(),
            on_redis_down: "local".into(),
            enforce: true,
            lease_window_ms: 100,
            lease_max: 100,
        }
    }
}

/// `[redis]`: shared by limits, quotas and usage (and the Redis key store).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://host:port/db` (no credentials in the URL).
    pub url: String,
    /// Sentinels (`host:port`) for HA; the primary named `sentinel_master` is asked of them.
    pub sentinels: Vec<String>,
    pub sentinel_master: Option<String>,
    /// Env var holding the password (never the password itself in this file).
    pub password_env: Option<String>,
    /// Redis ACL user (see README "Least privilege").
    pub username: Option<String>,
    /// PEM CA(s) that sign the server certificate, for `rediss://`.
    pub ca: Option<PathBuf>,
    /// Every key name starts with this.
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    /// Request-path commands; a slower Redis counts as down.
    pub command_timeout_ms: u64,
    /// Key store on Redis: a revocation is acknowledged only once this many replicas have it
    /// (`WAIT`); 0 acknowledges once the primary has it.
    pub revoke_wait_replicas: u32,
    /// How long a revocation waits for those replicas; then the API answers 503 saying the
    /// revocation is written but not yet replicated.
    pub revoke_wait_timeout_ms: u64,
    /// Key store on Redis: stream entries `keys compact` keeps; a follower further behind
    /// than this reloads the whole table instead of resuming.
    pub stream_keep_entries: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            sentinels: vec![],
            sentinel_master: None,
            password_env: None,
            username: None,
            ca: None,
            key_prefix: "keygate:".into(),
            connect_timeout_ms: 200,
            command_timeout_ms: 50,
            revoke_wait_replicas: 0,
            revoke_wait_timeout_ms: 1000,
            stream_keep_entries: 100_000,
        }
    }
}

/// `[access_log]`: the access-log file sink (see `access`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file (JSON lines), relative to the config file. Appended to; `SIGUSR1` reopens it,
    /// so rotation is `mv` then `SIGUSR1` (no copytruncate).
    pub path: PathBuf,
    /// Lines waiting for the writer; beyond this lines are dropped and counted
    /// (`keygate_access_log_lines_dropped_total`), never waited for.
    #[serde(default = "default_access_log_queue")]
    pub queue_lines: usize,
}

fn default_access_log_queue() -> usize {
    16_384
}

/// `[otlp]`: spans exported over OTLP/HTTP with the JSON encoding (see `otlp`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's traces URL, `http://host:port/v1/traces` (plain HTTP: run a local
    /// collector or agent for TLS).
    pub endpoint: String,
    /// `service.name` of the exported resource.
    #[serde(default = "default_otlp_service")]
    pub service_name: String,
    /// Spans waiting for export; beyond this spans are dropped and counted, never waited for.
    #[serde(default = "default_otlp_queue")]
    pub queue_spans: usize,
    /// Most spans in one export request.
    #[serde(default = "default_otlp_batch")]
    pub batch_spans: usize,
    /// A partial batch is sent after this long.
    #[serde(default = "default_otlp_flush")]
    pub flush_interval_ms: u64,
    /// One export request may take this long (then its spans count as failed).
    #[serde(default = "default_otlp_timeout")]
    pub timeout_ms: u64,
}

fn default_otlp_service() -> String {
    "keygate".into()
}
fn default_otlp_queue() -> usize {
    4096
}
fn default_otlp_batch() -> usize {
    512
}
fn default_otlp_flush() -> u64 {
    1000
}
fn default_otlp_timeout() -> u64 {
    5000
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Browser origins allowed for keys that list none of their own. Env `ALLOWED_ORIGINS`
    /// (comma-separated) wins. Empty: browser requests (with `Origin`) are refused.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Opt-in per-key request counters (`key_id` label), capped at this many series. 0: off.
    pub per_key_series: usize,
}

/// A certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `keygate control`: the admin REST API and the feed for a fleet of gateways.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub listen: String,
    /// Serve the API and the feed over HTTPS (`listen` is then TLS only).
    pub tls: Option<TlsPair>,
    /// Admin tokens (HMAC digests and roles), minted by `keygate admin-token create`.
    pub tokens: PathBuf,
    /// Request body limit of the REST API.
    pub max_body_bytes: usize,
    /// Feed heartbeat interval when idle, ms.
    pub heartbeat_ms: u64,
    /// Records a feed reader may fall behind before it is disconnected (it then resumes).
    pub feed_buffer: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: "127.0.0.1:7070".into(),
            tls: None,
            tokens: "admin-tokens.jsonl".into(),
            max_body_bytes: 64 * 1024,
            heartbeat_ms: 2_000,
            feed_buffer: 4096,
        }
    }
}

/// `[tokens]`: short-lived tokens exchanged for an API key (`POST /v1/tokens`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// Longest lifetime a client may ask for, e.g. "15m" (the default).
    pub max_ttl: String,
    /// Lifetime when the request names none, e.g. "5m".
    pub default_ttl: String,
    /// Ed25519 signing keys (private), written by `keygate tokens keygen` / `rotate`; read
    /// by whoever mints: the control plane, or a gateway with `issue = true`.
    pub signing_keys: PathBuf,
    /// This gateway mints tokens itself (`POST /v1/tokens` on its own listener) and verifies
    /// them with its own signing keys: for a single node without a control plane. Off by
    /// default: gateways hold public keys only.
    pub issue: bool,
    /// JWKS a gateway verifies with; default: `/v1/jwks` of the control plane in `keys.feed_url`.
    pub jwks_url: Option<String>,
    /// Or a JWKS file (`keygate tokens jwks > FILE`), re-read on every refresh.
    pub jwks_file: Option<PathBuf>,
    /// How often a gateway refreshes the JWKS, e.g. "60s" (an unknown kid also refreshes it,
    /// at most once a second).
    pub jwks_refresh: String,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            max_ttl: "15m".into(),
            default_ttl: "5m".into(),
            signing_keys: "token-signing-keys.json".into(),
            issue: false,
            jwks_url: None,
            jwks_file: None,
            jwks_refresh: "60s".into(),
        }
    }
}

/// `accept_tokens = { audience = "…" }` on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptTokens {
    /// A token is accepted only when its `aud` is exactly this.
    pub audience: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` (or `http://host:port`) and `https://host:port` targets; several are used
    /// round robin, a failed one is ejected for a while.
    pub targets: Vec<String>,
    /// TCP connect timeout; a failure is a 502 and ejects the target.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Wait for the response head, and the longest gap between response body chunks (504).
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Pooled keep-alive connections idle longer than this are closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// How long a target that refused a connection is skipped.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// PEM CA bundle that signs the `https://` targets' certificates (required for them:
    /// keygate ships no public root store).
    pub ca: Option<PathBuf>,
    /// Name the `https://` targets' certificates must carry, sent as SNI; default: each
    /// target's host.
    pub server_name: Option<String>,
    /// Client certificate chain (PEM) presented to `https://` targets that require mTLS.
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of `client_cert`.
    pub client_key: Option<PathBuf>,
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_response_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_eject_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Used in metrics labels, logs, audit records and relayed events: 1 to 64 of
    /// `A-Z a-z 0-9 . _ -` (`snapshot::check_route_name`).
    pub name: String,
    /// Match this Host (case-insensitive, port and trailing dot ignored); none: any host.
    pub host: Option<String>,
    /// Matches this path and everything below it at a segment boundary; longest wins.
    pub path_prefix: String,
    /// Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The key must hold all of them.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Only keys of this env.
    pub env: Option<String>,
    /// Name of an `[[upstreams]]` entry.
    pub upstream: String,
    /// Accept the key from this query parameter too (off by default: URLs end up in logs).
    pub query_key_param: Option<String>,
    /// Request body limit for this route (413); default `server.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// Accept publishable keys (`kg_pub_…`, browser-safe) here, from the origins they list;
    /// off by default: every other route refuses them (403 `publishable_key_denied`).
    #[serde(default)]
    pub publishable: bool,
    /// Accept short-lived tokens (`kgt_…`) minted for this audience; every other route
    /// refuses tokens with the same 401 as a bad key.
    pub accept_tokens: Option<AcceptTokens>,
}

impl Config {
    /// Read and parse a config file, then apply the `KEYGATE_*` overrides from the process
    /// environment. A missing file is an error (we never guess a config).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        config.apply_env(|var| std::env::var_os(var))?;
        Ok(config)
    }

    /// Set each `ENV_OVERRIDES` field whose variable `get` returns. A listen address must be
    /// `host:port`: checked here, because a bind error later could not name the variable.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        for o in &ENV_OVERRIDES {
            let Some(raw) = get(o.var) else { continue };
            self.overrides.push(o);
            let value = raw
                .into_string()
                .map_err(|_| self.invalid(o.field, "not UTF-8"))?;
            if !is_host_port(&value) {
                return Err(self.invalid(
                    o.field,
                    format!("{value:?} is not host:port (e.g. 0.0.0.0:8080 or [::]:8080)"),
                ));
            }
            *(o.slot)(self) = value;
        }
        Ok(())
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
        config.path = path.to_owned();
        config.source = text.into();
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(config)
    }

    /// A path from the config, resolved relative to the config file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Every listen address (`server.listen`, `server.tls.listen`, `admin.listen`,
    /// `control.listen`) is `host:port`. Checked with the rest of the config so `check` refuses
    /// a bad one naming its file, line and field; at bind time it could only be "cannot listen
    /// on nohost" with no idea where that came from. Names are resolved at bind time.
    pub fn check_listen(&self) -> Result<(), ConfigError> {
        let tls = self.server.tls.as_ref().and_then(|t| t.listen.as_deref());
        for (field, value) in [
            ("server.listen", Some(self.server.listen.as_str())),
            ("server.tls.listen", tls),
            ("admin.listen", Some(self.admin.listen.as_str())),
            ("control.listen", Some(self.control.listen.as_str())),
        ] {
            match value {
                Some(v) if !is_host_port(v) => {
                    return Err(self.invalid(
                        field,
                        format!("{v:?} is not host:port (e.g. 0.0.0.0:8080 or [::]:8080)"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A validation error naming the file, the field and the line it is written on.
    pub fn invalid(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let field = field.into();
        let origin = match self.overrides.iter().find(|o| o.field == field) {
            Some(o) => Origin::Env(o.var),
            None => Origin::File(locate::field_line(&self.source, &field)),
        };
        ConfigError::Invalid {
            path: self.path.clone(),
            origin,
            field,
            message: message.into(),
        }
    }

    /// The shipped example, embedded so `keygate demo` and tests can use it anywhere.
    pub const EXAMPLE: &'static str = include_str!("../config/keygate.toml");
}

/// `host:port` with a non-empty host and a numeric port (names are resolved at bind time).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// toml's own rendering is several lines with a caret drawing; a log line wants one: file,
/// line:column, the field the span falls in, and the message.
fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let start = e.span().map(|s| s.start);
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Parse {
        path: path.to_owned(),
        at: start.map(|o| locate::line_col(text, o)),
        field: start.and_then(|o| locate::field_at(text, o)),
        message,
    }
}

/// Parse a duration like "90d", "48h", "250ms", "0s".
///
/// humantime's messages count byte offsets into the value ("expected number at 9"), which read
/// like a position in the file; ours say what is wrong with the value itself.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use humantime::DurationError as E;
    // Durations are ASCII; humantime slices its input by byte offsets and panics inside a
    // multi-byte character (found by schemathesis through `not_before` in the REST API).
    if !s.is_ascii() {
        return Err(format!(
            "bad duration {s:?}: not a number and a unit (examples: 90d, 48h, 30m, 0s)"
        ));
    }
    humantime::parse_duration(s.trim()).map_err(|e| {
        let why = match e {
            E::InvalidCharacter(_) | E::NumberExpected(_) => "not a number and a unit".to_owned(),
            E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
            E::NumberOverflow => "too large".to_owned(),
            E::Empty => "empty".to_owned(),
        };
        format!("bad duration {s:?}: {why} (examples: 90d, 48h, 30m, 0s)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_durations_are_errors_not_panics() {
        // What schemathesis sent as `not_before`: humantime panicked slicing inside a char.
        for s in ["\u{106434}\u{19}\u{f4}", "\u{f4}1d", "1\u{f4}", "é"] {
            assert!(parse_duration(s).is_err(), "{s:?}");
            assert!(crate::keys::ops::parse_not_before(s, 0).is_err(), "{s:?}");
        }
    }

    #[test]
    fn example_parses() {
        let c = Config::parse(Config::EXAMPLE, Path::new("config/keygate.toml")).unwrap();
        assert_eq!(c.keys.prefix, "kg");
        assert!(!c.routes.is_empty());
    }

    #[test]
    fn typo_names_the_field() {
        let err = Config::parse("[keys]\nstroe = \"x\"\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stroe"), "{err}");
        assert!(err.contains("k.toml"), "{err}");
        let err = Config::parse("[server]\nmax_headers = \"ten\"\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_headers"), "{err}");
    }

    #[test]
    fn env_overrides_win_and_their_errors_name_the_variable() {
        let mut c =
            Config::parse("[admin]\nlisten = \"127.0.0.1:1\"\n", Path::new("k.toml")).unwrap();
        c.apply_env(|v| (v == "KEYGATE_ADMIN_LISTEN").then(|| "0.0.0.0:9090".into()))
            .unwrap();
        assert_eq!(c.admin.listen, "0.0.0.0:9090");
        assert_eq!(
            c.server.listen, "127.0.0.1:8080",
            "unset variables change nothing"
        );
        let err = c.invalid("admin.listen", "x").to_string();
        assert!(err.contains("(from KEYGATE_ADMIN_LISTEN)"), "{err}");
        for bad in ["", "8080", ":8080", "host:http", "[::]"] {
            let mut c = Config::default();
            let err = c
                .apply_env(|v| (v == "KEYGATE_LISTEN").then(|| bad.into()))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("KEYGATE_LISTEN") && err.contains("server.listen"),
                "{err}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap().as_secs(), 90 * 86_400);
        assert_eq!(parse_duration("48h").unwrap().as_secs(), 48 * 3600);
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }
}
