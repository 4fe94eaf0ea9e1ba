//! Redis: the fleet's shared engine for rate limits, quotas and usage (and later the key store).
//!
//! A lean hand-written async RESP2 client (`resp`, `conn`, `client`) rather than the `redis`
//! crate: we need six commands, per-command timeouts, a circuit breaker and Sentinel discovery
//! under our control, and it adds no dependency (TLS reuses tokio-rustls). On top of it:
//! `breaker` (fail fast while Redis is down), `script` (EVALSHA with NOSCRIPT → EVAL),
//! `lease` (fleet-wide GCRA buckets served from token leases), `quota` (calendar quotas) and
//! `usage` (batched fleet-wide usage counters).
//!
//! Key names are built only from the configured prefix, fixed words and ids the gateway
//! generated and validated (lineages, key ids, shape numbers): no client-supplied string
//! reaches a key name or script code (THREATS L6). The password lives in [`Secret`], whose
//! `Debug` and `Display` print `***`: it never reaches logs, metrics, panics or `keygate check`.

pub mod breaker;
pub mod client;
pub mod conn;
#[cfg(test)]
mod fake;
pub mod lease;
pub mod quota;
pub mod resp;
pub mod script;
pub mod usage;

use crate::config::{Config, ConfigError};
use std::sync::Arc;
use std::time::Duration;

pub use client::Client;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis closed the connection")]
    Closed,
    #[error("redis protocol error: {0}")]
    Protocol(&'static str),
    #[error("redis connect to {0} timed out")]
    ConnectTimeout(String),
    #[error("redis command timed out")]
    Timeout,
    #[error("redis TLS: {0}")]
    Tls(String),
    #[error("redis refused authentication")]
    Auth,
    #[error("redis replied: {0}")]
    Reply(String),
    #[error("redis unexpected reply to {0}")]
    Unexpected(&'static str),
    #[error("redis circuit open (recent failures); not trying")]
    CircuitOpen,
    #[error("no sentinel knows master {0:?}")]
    NoMaster(String),
}

impl RedisError {
    /// The `reason` label of `keygate_limiter_fallback_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            RedisError::CircuitOpen => "circuit_open",
            RedisError::Timeout | RedisError::ConnectTimeout(_) => "timeout",
            _ => "error",
        }
    }
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Where the primary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Direct {
        host: String,
        port: u16,
    },
    /// Ask these sentinels (`host:port`) for the primary named `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// Validated `[redis]` settings.
#[derive(Clone)]
pub struct Settings {
    pub target: Target,
    pub db: u32,
    /// `rediss://`: TLS with this client config; the server name is the URL host.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub tls_name: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Key store: replicas a revocation waits for (`WAIT`), and for how long.
    pub revoke_wait_replicas: u32,
    pub revoke_wait_timeout: Duration,
    /// Key store: stream entries a compaction keeps.
    pub stream_keep_entries: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("target", &self.target)
            .field("db", &self.db)
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Settings {
    /// `None` without a `[redis]` section. Reads the password from `password_env` now, so a
    /// missing variable is a startup error naming the variable (never its value).
    pub fn from_config(c: &Config) -> Result<Option<Settings>, ConfigError> {
        let Some(r) = &c.redis else { return Ok(None) };
        let (tls, rest) = if let Some(rest) = r.url.strip_prefix("rediss://") {
            (true, rest)
        } else if let Some(rest) = r.url.strip_prefix("redis://") {
            (false, rest)
        } else {
            return Err(c.invalid(
                "redis.url",
                "use redis://host:port/db or rediss://host:port/db",
            ));
        };
        if rest.contains('@') {
            return Err(c.invalid(
                "redis.url",
                "credentials do not belong in the URL: set redis.username and redis.password_env",
            ));
        }
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse::<u32>()
                    .map_err(|_| c.invalid("redis.url", "the path must be a database number"))?,
            ),
            None => (rest, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| c.invalid("redis.url", "bad port"))?,
            ),
            None => (hostport, 6379),
        };
        if host.is_empty() {
            return Err(c.invalid("redis.url", "missing host"));
        }
        let target = if r.sentinels.is_empty() {
            Target::Direct {
                host: host.to_owned(),
                port,
            }
        } else {
            for s in &r.sentinels {
                if s.rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    return Err(c.invalid("redis.sentinels", format!("{s:?} is not host:port")));
                }
            }
            Target::Sentinel {
                sentinels: r.sentinels.clone(),
                master: r.sentinel_master.clone().ok_or_else(|| {
                    c.invalid(
                        "redis.sentinel_master",
                        "required when redis.sentinels is set",
                    )
                })?,
            }
        };
        let tls = if tls {
            let ca = r.ca.as_ref().ok_or_else(|| {
                c.invalid(
                    "redis.ca",
                    "required for rediss://: the CA that signs Redis' certificate",
                )
            })?;
            Some(
                crate::tls::client_config(&c.resolve(ca))
                    .map_err(|e| c.invalid("redis.ca", e.to_string()))?,
            )
        } else {
            None
        };
        let password = match &r.password_env {
            Some(var) => Some(Secret(
                std::env::var(var)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        ConfigError::Secret(format!("{var} (redis.password_env) is not set"))
                    })?,
            )),
            None => None,
        };
        if !r
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b))
            || r.key_prefix.is_empty()
        {
            return Err(c.invalid(
                "redis.key_prefix",
                "letters, digits and _-:. only (it starts every key name)",
            ));
        }
        for (field, v) in [
            ("redis.connect_timeout_ms", r.connect_timeout_ms),
            ("redis.command_timeout_ms", r.command_timeout_ms),
        ] {
            if v == 0 {
                return Err(c.invalid(field, "must be at least 1"));
            }
        }
        Ok(Some(Settings {
            target,
            db,
            tls,
            tls_name: host.to_owned(),
            username: r.username.clone(),
            password,
            prefix: r.key_prefix.clone(),
            connect_timeout: Duration::from_millis(r.connect_timeout_ms),
            command_timeout: Duration::from_millis(r.command_timeout_ms),
            revoke_wait_replicas: r.revoke_wait_replicas,
            revoke_wait_timeout: Duration::from_millis(r.revoke_wait_timeout_ms),
            stream_keep_entries: r.stream_keep_entries.max(1),
        }))
    }
}

/// Run `f` with a fresh client on a throwaway single-thread runtime: the synchronous CLI's
/// way to read fleet state (usage, quota used).
pub fn blocking<T, F, Fut>(settings: Settings, f: F) -> Result<T, RedisError>
where
    F: FnOnce(Arc<Client>) -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let metrics = crate::metrics::Metrics::new(0);
    rt.block_on(f(Client::new(settings, metrics.redis_metrics())))
}

/// True for ids the gateway generated (`key_…` and similar): safe inside a key name.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(toml: &str) -> Result<Option<Settings>, String> {
        let c = Config::parse(toml, Path::new("k.toml")).map_err(|e| e.to_string())?;
        Settings::from_config(&c).map_err(|e| e.to_string())
    }

    #[test]
    fn urls_parse_and_errors_name_the_field() {
        assert!(settings("").unwrap().is_none());
        let s = settings("[redis]\nurl = \"redis://10.0.0.1:6380/3\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            s.target,
            Target::Direct {
                host: "10.0.0.1".into(),
                port: 6380
            }
        );
        assert_eq!(s.db, 3);
        for (bad, field) in [
            ("url = \"http://x\"", "redis.url"),
            ("url = \"redis://u:pw@x:1\"", "redis.url"),
            ("url = \"redis://x:99999\"", "redis.url"),
            ("url = \"rediss://x:1\"", "redis.ca"),
            (
                "url = \"redis://x:1\"\nsentinels = [\"a:1\"]",
                "redis.sentinel_master",
            ),
            (
                "url = \"redis://x:1\"\nkey_prefix = \"a b\"",
                "redis.key_prefix",
            ),
            (
                "url = \"redis://x:1\"\ncommand_timeout_ms = 0",
                "redis.command_timeout_ms",
            ),
        ] {
            let e = settings(&format!("[redis]\n{bad}\n")).unwrap_err();
            assert!(e.contains(field), "{bad}: {e}");
        }
        let e = settings("[redis]\nurl = \"redis://x:1\"\npassword_env = \"KG_TEST_UNSET_PW\"\n")
            .unwrap_err();
        assert!(e.contains("KG_TEST_UNSET_PW"), "{e}");
    }

    #[test]
    fn the_password_never_prints() {
        let s = Secret("hunter2-very-secret".into());
        let shown = format!("{s} {s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn only_generated_ids_are_key_safe() {
        assert!(safe_id("key_abc123"));
        for bad in ["", "a:b", "a*", "a b", "a\nb", &"x".repeat(65)] {
            assert!(!safe_id(bad), "{bad:?}");
        }
    }
}
