//! Keys: the wire format, digests, records, the in-memory table, governance policy, and the
//! lifecycle operations (create, update, revoke, rotate, import) shared by the CLI and the
//! control plane.

pub mod compact;
pub mod digest;
pub mod format;
pub mod gauges;
pub mod lookup;
pub mod ops;
pub mod pages;
pub mod policy;
pub mod record;
pub mod redigest;
pub mod rotation;
pub mod table;

use crate::config::{parse_duration, Config, ConfigError};
use digest::{Hasher, MIN_SECRET_LEN};
use format::KeyFormat;
use policy::Policy;
use std::path::PathBuf;

/// The `[keys]` and `[policy]` sections, validated and resolved: what every key operation and
/// the gateway's authenticator need.
#[derive(Debug, Clone)]
pub struct KeySettings {
    pub format: KeyFormat,
    pub hasher: Hasher,
    pub store: PathBuf,
    pub audit_log: PathBuf,
    pub usage_file: PathBuf,
    /// `[keys] source = "redis"`: the store lives in Redis (these settings), not the file.
    pub redis_store: Option<crate::redis::Settings>,
    pub policy: Policy,
    pub plans: Vec<String>,
    pub rotate_grace_secs: i64,
    pub revoked_retention_secs: i64,
    pub leeway_secs: i64,
    pub stale_after_secs: i64,
    /// `keys.on_missing_secret_version = "refuse"` (true, the default) or `"warn"`.
    pub refuse_missing_secret_version: bool,
    /// `[redis]` is configured, so keys may carry a quota.
    pub quotas_enabled: bool,
}

fn secs(c: &Config, field: &str, value: &str) -> Result<i64, ConfigError> {
    parse_duration(value)
        .map(|d| d.as_secs() as i64)
        .map_err(|m| c.invalid(field, m))
}

impl KeySettings {
    /// Validate `[keys]`/`[policy]` and load the hash secrets. Refuses to go on without a
    /// secret: an unkeyed hash of a key would let anyone holding the store confirm guesses.
    pub fn from_config(c: &Config) -> Result<KeySettings, ConfigError> {
        let k = &c.keys;
        let prefix_ok = !k.prefix.is_empty()
            && k.prefix.len() <= 16
            && k.prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(c.invalid("keys.prefix", "must be 1-16 lowercase letters or digits"));
        }
        if k.envs.is_empty()
            || k.envs
                .iter()
                .any(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(c.invalid(
                "keys.envs",
                "must list at least one env of lowercase letters",
            ));
        }
        if k.envs.iter().any(|e| e == format::PUBLISHABLE_MARKER) {
            return Err(c.invalid(
                "keys.envs",
                "\"pub\" marks publishable keys (kg_pub_live_…) and cannot be an env",
            ));
        }
        let mut secrets = vec![(
            k.hash_secret_version,
            load_secret(
                c,
                "keys",
                k.hash_secret_file.as_ref(),
                Some(&k.hash_secret_env),
            )?,
        )];
        for (i, p) in k.previous_secrets.iter().enumerate() {
            if secrets.iter().any(|(v, _)| *v == p.version) {
                return Err(c.invalid(
                    format!("keys.previous_secrets[{i}].version"),
                    "duplicates another secret version",
                ));
            }
            secrets.push((
                p.version,
                load_secret(
                    c,
                    &format!("keys.previous_secrets[{i}]"),
                    p.file.as_ref(),
                    p.env.as_ref(),
                )?,
            ));
        }
        let refuse_missing_secret_version = match k.on_missing_secret_version.as_str() {
            "refuse" => true,
            "warn" => false,
            _ => {
                return Err(c.invalid(
                    "keys.on_missing_secret_version",
                    "must be \"refuse\" or \"warn\"",
                ))
            }
        };
        let mut plans: Vec<String> = c.plans.keys().cloned().collect();
        plans.sort();
        Ok(KeySettings {
            format: KeyFormat::new(&k.prefix, &k.envs),
            hasher: Hasher::new(secrets),
            store: c.resolve(&k.store),
            audit_log: c.resolve(&k.audit_log),
            usage_file: c.resolve(&k.usage_file),
            policy: Policy::from_config(c)?,
            plans,
            rotate_grace_secs: secs(c, "keys.rotate_grace", &k.rotate_grace)?,
            revoked_retention_secs: secs(c, "keys.revoked_retention", &k.revoked_retention)?,
            leeway_secs: secs(c, "keys.expiry_leeway", &k.expiry_leeway)?,
            stale_after_secs: secs(c, "keys.stale_after", &k.stale_after)?,
            refuse_missing_secret_version,
            quotas_enabled: c.redis.is_some(),
            redis_store: match c.keys.source.as_str() {
                "redis" => Some(crate::redis::Settings::from_config(c)?.ok_or_else(|| {
                    c.invalid("keys.source", "\"redis\" needs a [redis] section")
                })?),
                _ => None,
            },
        })
    }

    /// `keygate secret status`: every secret version that is configured or that a live key
    /// uses, with the live keys under it (counted, and the first [`IdSample::MAX`] ids) and
    /// when one of them was last seen (from `usage`). "Live" is the rule of
    /// [`MissingVersions::add`]. A version is retirable when it is not the current one and no
    /// live key uses it.
    pub fn secret_versions<'a>(
        &self,
        records: impl IntoIterator<Item = &'a record::KeyRecord>,
        usage: &std::collections::BTreeMap<String, crate::usage::Used>,
        now: i64,
    ) -> Vec<SecretVersionUse> {
        let current = self.hasher.current_version();
        let mut by_version: std::collections::BTreeMap<u32, SecretVersionUse> = self
            .hasher
            .versions()
            .into_iter()
            .map(|v| (v, SecretVersionUse::new(v, true, v == current)))
            .collect();
        for r in records {
            if !live(r.state(now)) {
                continue;
            }
            let entry = by_version
                .entry(r.secret_version)
                .or_insert_with(|| SecretVersionUse::new(r.secret_version, false, false));
            entry.keys.add(&r.id);
            let seen = usage.get(&r.id).map(|u| u.last_used).filter(|t| *t > 0);
            entry.last_seen = entry.last_seen.max(seen);
        }
        by_version
            .into_values()
            .map(|mut u| {
                u.retirable = !u.current && u.keys.count == 0;
                u
            })
            .collect()
    }

    /// One line per secret version that live keys in `records` (the latest version of each
    /// key) use but no configured secret has: those keys would all fail with 401. Revoked and
    /// expired keys do not count; canaries do (an unverifiable canary never alarms).
    pub fn missing_secret_versions<'a>(
        &self,
        records: impl IntoIterator<Item = &'a record::KeyRecord>,
        now: i64,
    ) -> Vec<String> {
        let mut missing = self.missing_versions();
        for r in records {
            missing.add(r.secret_version, r.state(now), || Some(r.id.clone()));
        }
        missing.lines()
    }

    /// An empty [`MissingVersions`] against these settings' secrets: fed key by key from
    /// records, the gateway's compact table (`KeyTable::each_entry`) or both.
    pub fn missing_versions(&self) -> MissingVersions<'_> {
        MissingVersions {
            settings: self,
            found: Default::default(),
        }
    }

    /// The store writers use: Redis when `source = "redis"`, else the file.
    pub fn store_backend(&self) -> crate::store::Store {
        let signer = crate::store::seal::Signer::new(&self.hasher);
        match &self.redis_store {
            Some(r) => crate::store::Store::Redis(Box::new(crate::store::redis::RedisLog::new(
                r.clone(),
                signer,
            ))),
            None => {
                crate::store::Store::File(crate::store::file::LogFile::new(&self.store, signer))
            }
        }
    }

    /// The latest version of every key in the store (file or Redis), read without verifying
    /// MACs: a record signed under a secret version that is no longer configured cannot be
    /// verified, and that is exactly the case secret-version reports are about. A missing
    /// store is empty.
    pub fn latest_unverified(
        &self,
    ) -> Result<std::collections::HashMap<String, record::KeyRecord>, String> {
        if let crate::store::Store::Redis(r) = self.store_backend() {
            let records = r
                .latest_unverified()
                .map_err(|e| format!("redis store: {e}"))?;
            return Ok(records.into_iter().map(|r| (r.id.clone(), r)).collect());
        }
        let parsed = match std::fs::read(&self.store) {
            Ok(bytes) => crate::store::file::parse_log(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(format!("{}: {e}", self.store.display())),
        };
        Ok(crate::store::file::latest(parsed.records))
    }

    /// [`KeySettings::missing_secret_versions`] for the file store: `Err` lists them when
    /// configured to refuse, `Ok` carries them as warnings otherwise. A missing store is fine.
    pub fn check_secret_versions(&self, now: i64) -> Result<Vec<String>, Vec<String>> {
        let latest = self.latest_unverified().map_err(|e| vec![e])?;
        self.judge_missing(self.missing_secret_versions(latest.values(), now))
    }

    /// `Err` with the missing versions when configured to refuse, `Ok` (warnings) otherwise.
    pub fn judge_missing(&self, found: Vec<String>) -> Result<Vec<String>, Vec<String>> {
        if found.is_empty() || !self.refuse_missing_secret_version {
            Ok(found)
        } else {
            Err(found)
        }
    }
}

/// Neither revoked nor expired: a key that can still be presented, so its secret version
/// must have a secret.
fn live(state: record::KeyState) -> bool {
    !matches!(state, record::KeyState::Revoked | record::KeyState::Expired)
}

/// Secret versions that live keys use but no configured secret has, counted, with the ids of
/// some of those keys: the rule behind `keygate check`, the start of `keygate serve` and a
/// config reload (`KeySettings::missing_versions`).
#[derive(Debug)]
pub struct MissingVersions<'a> {
    settings: &'a KeySettings,
    found: std::collections::BTreeMap<u32, IdSample>,
}

impl MissingVersions<'_> {
    /// Count one key (its secret version and state); `id` is called only for a key that
    /// counts, so a table walk formats no id for the keys that are fine.
    pub fn add(
        &mut self,
        version: u32,
        state: record::KeyState,
        id: impl FnOnce() -> Option<String>,
    ) {
        if live(state) && !self.settings.hasher.has_version(version) {
            let sample = self.found.entry(version).or_default();
            match id() {
                Some(id) => sample.add(&id),
                None => sample.count += 1,
            }
        }
    }

    /// Only the versions `running` has a secret for: what a change from `running` to these
    /// settings takes away (a version already missing under `running` is refused there too).
    pub fn dropped_from(mut self, running: &KeySettings) -> Self {
        self.found.retain(|v, _| running.hasher.has_version(*v));
        self
    }

    /// One line per version found, naming it, how many keys use it and which (bounded).
    pub fn lines(self) -> Vec<String> {
        self.found
            .into_iter()
            .map(|(v, keys)| {
                format!(
                    "secret version {v} has no configured secret, but {} key(s) still use it and would all be refused with 401 ({}): \
                     list it in keys.previous_secrets (or set keys.on_missing_secret_version = \"warn\")",
                    keys.count,
                    keys.listed()
                )
            })
            .collect()
    }
}

/// How many keys, and the ids of the first [`IdSample::MAX`] of them in id order: enough to
/// act on, bounded however many keys there are. Ids only, never a key or a digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IdSample {
    /// Named for `keygate secret status --json`, the one place it is printed as JSON.
    #[serde(rename = "live_keys")]
    pub count: u64,
    /// Sorted, at most [`IdSample::MAX`].
    pub ids: Vec<String>,
}

impl IdSample {
    pub const MAX: usize = 20;

    /// Count `id`, keeping it if it is among the first [`IdSample::MAX`] ids seen so far.
    pub fn add(&mut self, id: &str) {
        self.count += 1;
        if self.ids.len() == IdSample::MAX && self.ids.last().is_some_and(|l| l.as_str() <= id) {
            return;
        }
        let at = self.ids.partition_point(|x| x.as_str() < id);
        self.ids.insert(at, id.to_owned());
        self.ids.truncate(IdSample::MAX);
    }

    /// `keys: a, b, c` or `keys: a, …, t and 5 more`.
    pub fn listed(&self) -> String {
        let more = self.count.saturating_sub(self.ids.len() as u64);
        let mut s = format!("keys: {}", self.ids.join(", "));
        if more > 0 {
            if self.ids.is_empty() {
                s = format!("{more} key(s) without an id");
            } else {
                s.push_str(&format!(" and {more} more"));
            }
        }
        s
    }
}

/// One secret version's use (`keygate secret status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretVersionUse {
    pub version: u32,
    /// A secret for it is configured (else its keys all get 401).
    pub configured: bool,
    /// New keys are digested under it.
    pub current: bool,
    /// Keys that are neither revoked nor expired: `live_keys` (how many) and `ids` (the first
    /// [`IdSample::MAX`], in id order).
    #[serde(flatten)]
    pub keys: IdSample,
    /// Latest use of any of those keys, Unix seconds (usage data).
    pub last_seen: Option<i64>,
    /// Not current and no live key uses it: its secret can be removed from the config.
    pub retirable: bool,
}

impl SecretVersionUse {
    fn new(version: u32, configured: bool, current: bool) -> SecretVersionUse {
        SecretVersionUse {
            version,
            configured,
            current,
            keys: IdSample::default(),
            last_seen: None,
            retirable: false,
        }
    }
}

fn load_secret(
    c: &Config,
    field: &str,
    file: Option<&PathBuf>,
    env: Option<&String>,
) -> Result<Vec<u8>, ConfigError> {
    let (bytes, source) = match (file, env) {
        (Some(f), _) => {
            let path = c.resolve(f);
            let mut bytes = std::fs::read(&path)
                .map_err(|e| ConfigError::Secret(format!("cannot read hash secret file {} ({field}): {e}", path.display())))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            (bytes, format!("file {}", path.display()))
        }
        (None, Some(var)) => match std::env::var_os(var) {
            Some(v) if !v.is_empty() => (v.into_encoded_bytes(), format!("env var {var}")),
            _ => {
                return Err(ConfigError::Secret(format!(
                    "{var} is not set. keygate stores only HMAC-SHA256 digests of keys and needs a server secret \
                     of at least {MIN_SECRET_LEN} bytes: generate one with `openssl rand -base64 48` and export {var}=<it> \
                     (or set keys.hash_secret_file)"
                )))
            }
        },
        (None, None) => return Err(c.invalid(field, "needs `env` or `file`")),
    };
    if bytes.len() < MIN_SECRET_LEN {
        return Err(ConfigError::Secret(format!(
            "the hash secret from {source} is {} bytes; at least {MIN_SECRET_LEN} are required \
             (generate one with `openssl rand -base64 48`)",
            bytes.len()
        )));
    }
    Ok(bytes)
}
