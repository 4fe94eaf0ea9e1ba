//! Key lifecycle operations against the store, with policy and audit: the one implementation
//! behind `keygate keys …` and the control plane's REST API.
//!
//! Every change is read-modify-write through the store (`Store::transact`): under the file
//! store's exclusive lock, or by the Redis store's checked write, so concurrent rotate and
//! revoke on one key serialise and the last writer sees the first writer's result. A change
//! is built without effects (the Redis store may build it more than once) and its audit
//! events are written exactly once, for the version written, at the store's commit point:
//! the file store's is inside the lock before the append, so a failed audit write refuses the
//! change and leaves the store untouched; the Redis store's is after its write (only then is
//! it known which build was written), so a failed audit write is reported as a change made
//! without its record (`OpsError::Unaudited`). Creation and import append new keys (no
//! rebuild) and audit before the append, as the file store's transactions do.

use crate::audit::{AuditLog, Event};
use crate::keys::format::{hint, imported_hint, MAX_KEY_LEN, MIN_IMPORTED_KEY_LEN};
use crate::keys::policy::PolicyError;
use crate::keys::record::{format_id, new_id, KeyRecord, KeyState, Rotation};
use crate::keys::KeySettings;
use crate::limit::Rate;
use crate::store::file::{Compacted, StoreError};
use crate::store::{CommitPoint, Store};
use ipnet::IpNet;
use std::collections::BTreeMap;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit log {path}: {source}; the change was not made")]
    Audit {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The Redis store commits before it audits (`CommitPoint::AfterWrite`): the change stands.
    #[error("audit log {path}: {source}; the change WAS made and is in force (the Redis store writes before it audits), but has no audit record: record it by hand")]
    Unaudited {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("no key with id {0}")]
    NotFound(String),
    #[error("unknown plan {0:?} (configured: {1})")]
    UnknownPlan(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("{field} cannot be changed: {why}")]
    Immutable {
        field: &'static str,
        why: &'static str,
    },
    #[error("key {id} was already rotated to {successor}; rotate {successor} instead (a key is rotated once, so its lineage has one current key)")]
    AlreadyRotated { id: String, successor: String },
    #[error("the rotation of {old} to {successor} is final: {old} was revoked (completed or revoked by hand), and a revoked key is never un-revoked; keep {successor}, or rotate it")]
    RotationFinal { old: String, successor: String },
    #[error("the OS random source failed: {0}")]
    Random(String),
}

/// How to rotate: the grace window, and optionally the self-completion rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct RotateOptions {
    pub grace_secs: i64,
    /// Revoke the old key once the successor has been used and the old key quiet this long.
    pub complete_when_idle_secs: Option<i64>,
    /// The old key's request count now (usage data), for "requests since rotation".
    pub old_requests: u64,
}

/// Everything a new key can carry; shared by `create` and `import`.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub name: String,
    pub owner: String,
    pub env: String,
    pub scopes: Vec<String>,
    pub plan: Option<String>,
    pub rate: Option<String>,
    /// Calendar quota, e.g. "100000/month" (needs `[redis]`).
    pub quota: Option<String>,
    pub expires_in_secs: Option<i64>,
    /// Unix seconds before which the key is refused (`pending`); see [`parse_not_before`].
    pub not_before: Option<i64>,
    pub allow_ips: Vec<IpNet>,
    pub allow_origins: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub canary: bool,
    /// Browser-safe key: needs at least one allowed origin, never a canary.
    pub publishable: bool,
}

/// A partial update: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub name: Option<String>,
    pub owner: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// `Some(None)` clears the plan.
    pub plan: Option<Option<String>>,
    pub rate: Option<Option<String>>,
    /// `Some(None)` removes the quota.
    pub quota: Option<Option<String>>,
    /// `Some(None)` removes the expiry.
    pub expires_in_secs: Option<Option<i64>>,
    pub allow_ips: Option<Vec<IpNet>>,
    pub allow_origins: Option<Vec<String>>,
    /// Labels to set; an empty value removes the label.
    pub labels: BTreeMap<String, String>,
}

/// Selects keys for a break-glass mass revoke. At least one field must be set.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub owner: Option<String>,
    pub env: Option<String>,
    pub label: Option<(String, String)>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.owner.is_none() && self.env.is_none() && self.label.is_none()
    }
    pub fn matches(&self, r: &KeyRecord) -> bool {
        self.owner.as_ref().is_none_or(|o| &r.owner == o)
            && self.env.as_ref().is_none_or(|e| &r.env == e)
            && self
                .label
                .as_ref()
                .is_none_or(|(k, v)| r.labels.get(k) == Some(v))
    }
}

/// A key as shown once: the record and the plaintext.
#[derive(Debug)]
pub struct Minted {
    pub record: KeyRecord,
    pub key: String,
    /// For a rotation: the old key as stored afterwards (its grace expiry).
    pub replaced: Option<KeyRecord>,
}

/// Result of a mass revoke.
#[derive(Debug, Default)]
pub struct MassRevoke {
    pub revoked: Vec<KeyRecord>,
    /// Canary keys the selector matched and left armed: revoking a canary disarms its alarm,
    /// so a canary is revoked only when named by id.
    pub canaries_spared: usize,
}

/// What a change writes: the record versions (in order) and the one audit event describing it.
struct Written {
    records: Vec<KeyRecord>,
    event: Event,
}

/// One rule for every scope, wherever it comes from (CLI, REST create/update, import):
/// segments of ASCII letters, digits, `_` and `-`, joined by single `:` or `.`. This refuses
/// `*` (there are no wildcard semantics: a `*` scope would match nothing), `..`, `a..b`,
/// percent-encodings such as `%2f`, slashes, and empty segments (THREATS J7).
pub fn check_scope(s: &str) -> Result<(), OpsError> {
    let segments_ok = s.split([':', '.']).all(|seg| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    if s.len() > 128 || !segments_ok {
        return Err(OpsError::Invalid(format!(
            "bad scope {s:?}: use segments of letters, digits, _ and - joined by single : or . \
             (at most 128 characters; no *, no .., no %-escapes)"
        )));
    }
    Ok(())
}

/// Bounds on what one key record carries (review 134). Nothing bounded labels, names or
/// owners, and a PATCH merges labels, so repeated updates grew one record past the feed's
/// line limit: every feed gateway stopped at the revision before it, for good. The limits
/// follow Kubernetes where it has one (a label name is at most 63 characters, a name 253),
/// with values longer than its 63 because ours carry ticket references and URLs; counts are
/// a few times what any key plausibly needs. Labels at every bound make about 21 KB; the
/// whole record is held to [`MAX_RECORD_BYTES`] besides. Strings are bounded in characters,
/// as JSON Schema's `maxLength` counts them (docs/openapi.yaml states these limits).
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_CHARS: usize = 63;
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
/// For `name` and `owner`.
pub const MAX_NAME_CHARS: usize = 256;
pub const MAX_SCOPES: usize = 256;
pub const MAX_ORIGINS: usize = 64;
/// `scheme://host:port`: a DNS name is at most 253 characters.
pub const MAX_ORIGIN_CHARS: usize = 512;
pub const MAX_ALLOW_IPS: usize = 256;
/// A revocation's reason (it is stored in the record, and in the audit event).
pub const MAX_REASON_CHARS: usize = 1024;
/// A whole record as stored, JSON. The fields' bounds alone allow more (scopes and origins at
/// their counts and lengths), and a feed line is one record: this keeps every record written
/// now at 1/256 of a feed line's limit (`store::feed::MAX_LINE`), with room for what the
/// store adds (revision, MAC) and the line around it.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
const _: () = assert!(MAX_RECORD_BYTES * 16 <= crate::store::feed::MAX_LINE);

/// `field: <n> <unit>, at most <max>` when `n` is over `max`. Lengths are counted, never echoed: a
/// refused value can be megabytes, and the error goes to a log and a response.
fn bound(field: &str, n: usize, unit: &str, max: usize) -> Result<(), OpsError> {
    if n > max {
        return Err(OpsError::Invalid(format!(
            "{field}: {n} {unit}, at most {max}"
        )));
    }
    Ok(())
}

/// The one place a record's size is bounded: every write that makes or changes a record's
/// content (create, update, import, a rotation's successor; CLI and API; file and Redis
/// store) goes through [`Keys::validate`], which checks this first, before any rule that
/// would quote a value. A revocation only stamps a record and is never refused for its size
/// (a record written by an older version may be over): its reason is checked by
/// [`check_reason`].
fn check_bounds(r: &KeyRecord) -> Result<(), OpsError> {
    bound("name", r.name.chars().count(), "characters", MAX_NAME_CHARS)?;
    bound(
        "owner",
        r.owner.chars().count(),
        "characters",
        MAX_NAME_CHARS,
    )?;
    bound("labels", r.labels.len(), "labels", MAX_LABELS)?;
    for (k, v) in &r.labels {
        if k.is_empty() {
            return Err(OpsError::Invalid(
                "labels: a label key is empty; label keys are 1 to 63 characters".into(),
            ));
        }
        bound(
            "labels",
            k.chars().count(),
            "characters in a label key",
            MAX_LABEL_KEY_CHARS,
        )?;
        // The key is at most 63 characters here: quoting it names the label.
        bound(
            "labels",
            v.chars().count(),
            &format!("characters in the value of {k:?}"),
            MAX_LABEL_VALUE_CHARS,
        )?;
    }
    bound("scopes", r.scopes.len(), "scopes", MAX_SCOPES)?;
    bound(
        "allow_origins",
        r.allow_origins.len(),
        "origins",
        MAX_ORIGINS,
    )?;
    for o in &r.allow_origins {
        bound(
            "allow_origins",
            o.chars().count(),
            "characters in an origin",
            MAX_ORIGIN_CHARS,
        )?;
    }
    bound("allow_ips", r.allow_ips.len(), "networks", MAX_ALLOW_IPS)?;
    let mut size = Counted(0);
    serde_json::to_writer(&mut size, r)
        .map_err(|e| OpsError::Invalid(format!("record: cannot be serialised: {e}")))?;
    if size.0 > MAX_RECORD_BYTES {
        return Err(OpsError::Invalid(format!(
            "record: the key's record would be {} bytes, at most {MAX_RECORD_BYTES} (every \
             field is within its own bound, together they are not): use fewer or shorter \
             labels, scopes or allow_origins",
            size.0
        )));
    }
    Ok(())
}

/// A revocation's reason, wherever it comes from (one key, a mass revoke; CLI and API).
pub fn check_reason(reason: Option<&str>) -> Result<(), OpsError> {
    bound(
        "reason",
        reason.map_or(0, |r| r.chars().count()),
        "characters",
        MAX_REASON_CHARS,
    )
}

/// Counts the bytes written to it: a record's serialised size without building the string.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A publishable key is accepted only from browsers on the origins it lists, so it needs at
/// least one (the global `[cors]` list would make it usable from any site that list names),
/// and it cannot be a canary (a canary must look like a secret key that leaked).
fn check_publishable(r: &KeyRecord) -> Result<(), OpsError> {
    if r.publishable && r.allow_origins.is_empty() {
        return Err(OpsError::Invalid(
            "a publishable key needs at least one allowed origin (--allow-origin https://app.example.com)".into(),
        ));
    }
    if r.publishable && r.canary {
        return Err(OpsError::Invalid("a canary cannot be publishable".into()));
    }
    Ok(())
}

/// A new expiry must lie in the future: a zero lifetime (`--expires-in 0s`) or an imported
/// `expires_at` in the past would mint a key that is already expired.
fn check_expiry(expires_at: Option<i64>, now: i64) -> Result<(), OpsError> {
    match expires_at {
        Some(e) if e <= now => Err(OpsError::Invalid(
            "expires_in must be positive (expires_at in the future): the key would be born expired"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// `--not-before` / `not_before`: an RFC 3339 time (`2026-12-24T09:00:00Z`, or with a
/// `+01:00` offset) or a duration from `now` (`10m`). One parser for the CLI, the REST API
/// and import, so every front end accepts the same spellings.
pub fn parse_not_before(s: &str, now: i64) -> Result<i64, OpsError> {
    let s = s.trim();
    if let Ok(d) = crate::config::parse_duration(s) {
        return i64::try_from(d.as_secs())
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or_else(|| OpsError::Invalid(format!("not_before {s:?} is too far ahead")));
    }
    let bad = || {
        OpsError::Invalid(format!(
            "bad not_before {s:?}: give an RFC 3339 time (2026-12-24T09:00:00Z) or a duration from now (10m)"
        ))
    };
    // Both spellings are ASCII; slicing below is by byte.
    if !s.is_ascii() {
        return Err(bad());
    }
    // humantime reads UTC (`Z`) only; a numeric offset is applied here. `±HH:MM` ends the text.
    let (utc, offset_secs) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((head, tail))
            if head.len() >= 19
                && matches!(tail.as_bytes(), [b'+' | b'-', h1, h2, b':', m1, m2]
                    if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit())) =>
        {
            let h =
                i64::from(tail.as_bytes()[1] - b'0') * 10 + i64::from(tail.as_bytes()[2] - b'0');
            let m =
                i64::from(tail.as_bytes()[4] - b'0') * 10 + i64::from(tail.as_bytes()[5] - b'0');
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (format!("{head}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (s.to_owned(), 0),
    };
    let t = humantime::parse_rfc3339(&utc).map_err(|_| bad())?;
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_secs();
    i64::try_from(secs)
        .map(|t| t - offset_secs)
        .map_err(|_| bad())
}

/// A not-before must lie in the future (else it says nothing: leave it out) and before the
/// expiry (else the key would never be valid).
fn check_not_before(
    not_before: Option<i64>,
    expires_at: Option<i64>,
    now: i64,
) -> Result<(), OpsError> {
    match (not_before, expires_at) {
        (Some(nb), _) if nb <= now => Err(OpsError::Invalid(
            "not_before must be in the future; leave it out for a key valid at once".into(),
        )),
        (Some(nb), Some(exp)) if exp <= nb => Err(OpsError::Invalid(
            "the key would expire before (or when) it becomes valid: expires_in counts from now, make it longer than the wait for not_before".into(),
        )),
        _ => Ok(()),
    }
}

/// Names of the fields that differ between two versions of a key (for `key.updated`).
fn changed_fields(old: &KeyRecord, new: &KeyRecord) -> Vec<String> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    ) else {
        return vec![];
    };
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .filter(|k| !matches!(k.as_str(), "rev" | "written_at_ms"))
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Records an import writes per store append (and audits per append): large enough that
/// the per-append costs (lock, tail read, fsync) vanish, small enough to bound memory.
pub const IMPORT_BATCH: usize = 20_000;

/// Refused lines an import reports by number; beyond it they are only counted (bounded
/// memory even when every line of a huge file is refused).
pub const IMPORT_REPORTED: usize = 1_000;

/// Result of an import.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: usize,
    pub duplicates: usize,
    /// The first [`IMPORT_REPORTED`] refused lines: (line number from 1, why).
    pub invalid: Vec<(usize, String)>,
    /// Every refused line, reported or not.
    pub refused: usize,
}

impl ImportReport {
    fn refuse(&mut self, line: usize, why: String) {
        self.refused += 1;
        if self.invalid.len() < IMPORT_REPORTED {
            self.invalid.push((line, why));
        }
    }
}

/// How far an import has read (for a progress display).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportProgress {
    pub lines: usize,
    pub bytes: u64,
}

/// Hashes a digest by its first 8 bytes: digests are HMAC outputs nobody can steer, so those
/// are as uniform as SipHash's output, at a fraction of its cost (an import hashes every line).
#[derive(Default)]
struct DigestPrefix(u64);

impl std::hash::Hasher for DigestPrefix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }
    fn write_usize(&mut self, _: usize) {
        // The array's length prefix carries nothing.
    }
}

/// Random ids for an import, drawn from the OS 1,024 at a time: one `getrandom` call per id
/// was the largest system cost of importing a million keys. The bytes are the same OS random
/// bytes [`new_id`] takes, only fetched in bulk; ids are not secrets.
struct IdPool {
    bytes: Vec<u8>,
    at: usize,
}

impl Default for IdPool {
    fn default() -> IdPool {
        let bytes = vec![0; 16 * 1024];
        IdPool {
            at: bytes.len(),
            bytes,
        }
    }
}

impl IdPool {
    fn next(&mut self, prefix: &str) -> Result<String, getrandom::Error> {
        if self.at + 16 > self.bytes.len() {
            getrandom::fill(&mut self.bytes)?;
            self.at = 0;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.bytes[self.at..self.at + 16]);
        self.at += 16;
        Ok(format_id(prefix, &id))
    }
}

/// Why one import line is not imported: the line is bad (reported, the import goes on), or
/// something is wrong beyond the line (the import stops).
enum ImportRefusal {
    Line(String),
    Fatal(OpsError),
}

/// One line of an import file: a bare key, or JSON with metadata.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportLine {
    pub key: String,
    pub name: Option<String>,
    pub owner: Option<String>,
    pub env: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub plan: Option<String>,
    pub rate: Option<String>,
    pub expires_at: Option<i64>,
    /// Unix seconds; overrides `--not-before`.
    pub not_before: Option<i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub struct Keys<'a> {
    settings: &'a KeySettings,
    log: Store,
    audit: AuditLog,
    actor: String,
}

impl<'a> Keys<'a> {
    pub fn new(settings: &'a KeySettings, actor: impl Into<String>) -> Keys<'a> {
        Keys {
            settings,
            log: settings.store_backend(),
            audit: AuditLog::new(&settings.audit_log),
            actor: actor.into(),
        }
    }

    /// Audit a change before it is written (creation, import): a failure refuses it.
    fn audit(&self, events: &[Event]) -> Result<(), OpsError> {
        self.audit_at(events, CommitPoint::BeforeWrite)
    }

    /// Audit a change at its store's commit point (`Store::transact`'s `commit`): once, for
    /// the version written. The error says whether the change was made.
    fn audit_at(&self, events: &[Event], point: CommitPoint) -> Result<(), OpsError> {
        self.audit.append(events).map_err(|source| {
            let path = self.audit.path().display().to_string();
            match point {
                CommitPoint::BeforeWrite => OpsError::Audit { path, source },
                CommitPoint::AfterWrite => OpsError::Unaudited { path, source },
            }
        })
    }

    /// Reject values that are not well-formed before they reach the store.
    fn validate(&self, r: &KeyRecord, now: i64) -> Result<(), OpsError> {
        check_bounds(r)?;
        if !self.settings.format.envs().contains(&r.env) {
            return Err(OpsError::Invalid(format!(
                "unknown env {:?} (configured: {})",
                r.env,
                self.settings.format.envs().join(", ")
            )));
        }
        if let Some(p) = &r.plan {
            if !self.settings.plans.contains(p) {
                return Err(OpsError::UnknownPlan(
                    p.clone(),
                    self.settings.plans.join(", "),
                ));
            }
        }
        if let Some(rate) = &r.rate {
            Rate::parse(rate).map_err(OpsError::Invalid)?;
        }
        if r.plan.is_some() && r.rate.is_some() {
            return Err(OpsError::Invalid("give a plan or a rate, not both".into()));
        }
        if let Some(q) = &r.quota {
            crate::redis::quota::Quota::parse(q).map_err(OpsError::Invalid)?;
            if !self.settings.quotas_enabled {
                return Err(OpsError::Invalid(
                    "a quota is counted fleet-wide in Redis: add a [redis] section to the config"
                        .into(),
                ));
            }
        }
        for s in &r.scopes {
            check_scope(s)?;
        }
        for o in &r.allow_origins {
            if o == "*"
                || !(o.starts_with("https://") || o.starts_with("http://"))
                || o.ends_with('/')
            {
                return Err(OpsError::Invalid(format!(
                    "bad origin {o:?}: give scheme://host[:port] without a trailing slash; `*` is not allowed"
                )));
            }
        }
        if r.name.trim().is_empty() {
            return Err(OpsError::Invalid("a key needs a name".into()));
        }
        check_publishable(r)?;
        self.settings.policy.check(r, now)?;
        Ok(())
    }

    fn mint(
        &self,
        g: &Grants,
        now: i64,
        rotated_from: Option<&KeyRecord>,
    ) -> Result<Minted, OpsError> {
        let key = if g.publishable {
            self.settings.format.generate_publishable(&g.env)
        } else {
            self.settings.format.generate(&g.env)
        }
        .map_err(|e| OpsError::Random(e.to_string()))?;
        let (secret_version, digest) = self.settings.hasher.digest(&key);
        let id = new_id("key").map_err(|e| OpsError::Random(e.to_string()))?;
        let record = KeyRecord {
            rev: 0,
            lineage: rotated_from.map_or_else(|| id.clone(), |r| r.lineage.clone()),
            id,
            digest,
            secret_version,
            name: g.name.clone(),
            owner: g.owner.clone(),
            env: g.env.clone(),
            scopes: g.scopes.clone(),
            plan: g.plan.clone(),
            rate: g.rate.clone(),
            quota: g.quota.clone(),
            allow_ips: g.allow_ips.clone(),
            allow_origins: g.allow_origins.clone(),
            labels: g.labels.clone(),
            hint: hint(&key),
            created_at: now,
            written_at_ms: crate::clock::unix_ms(),
            not_before: g.not_before,
            expires_at: g.expires_in_secs.map(|s| now + s),
            revoked_at: None,
            revoked_reason: None,
            canary: g.canary,
            publishable: g.publishable,
            imported: false,
            rotated_from: rotated_from.map(|r| r.id.clone()),
            rotated_to: None,
            rotation: None,
            mac: None,
        };
        check_expiry(record.expires_at, now)?;
        check_not_before(record.not_before, record.expires_at, now)?;
        self.validate(&record, now)?;
        Ok(Minted {
            record,
            key,
            replaced: None,
        })
    }

    pub fn create(&self, g: &Grants, now: i64) -> Result<Minted, OpsError> {
        let mut minted = self.mint(g, now, None)?;
        self.audit(&[Event::new("key.created", &self.actor)
            .key(&minted.record)
            .with("canary", g.canary)])?;
        minted.record = self.log.append(vec![minted.record])?.remove(0);
        Ok(minted)
    }

    /// Latest state of every key (no lock: a consistent prefix of the log).
    pub fn state(&self) -> Result<crate::store::file::Parsed, OpsError> {
        Ok(self.log.load()?)
    }

    pub fn show(&self, id: &str) -> Result<KeyRecord, OpsError> {
        let mut found = None;
        for r in self.log.load()?.records {
            if r.id == id {
                found = Some(r);
            }
        }
        found.ok_or_else(|| OpsError::NotFound(id.to_owned()))
    }

    /// Run `change` on the current version of `id`, write its records and audit its event
    /// once they are (`Store::transact_key`). Returns the first record written, or the
    /// current version when there was nothing to write (e.g. revoking a revoked key).
    fn change(
        &self,
        id: &str,
        // `FnMut`, and without effects: a store that lost a race to another writer (Redis)
        // runs it again on the new state. What it captures, the last run sets.
        mut change: impl FnMut(&KeyRecord) -> Result<Option<Written>, OpsError> + Send,
    ) -> Result<KeyRecord, OpsError> {
        let mut unchanged = None;
        // Only this key's state is read (not every key's): a revoke at a million keys costs
        // a scan of the log, not a parse of it.
        let written = self.log.transact_key(
            id,
            |current| {
                let current = current.ok_or_else(|| OpsError::NotFound(id.to_owned()))?;
                unchanged = None;
                let Some(w) = change(current)? else {
                    unchanged = Some(current.clone());
                    return Ok((vec![], None));
                };
                Ok::<_, OpsError>((w.records, Some(w.event)))
            },
            |event, point| match event {
                Some(e) => self.audit_at(&[e], point),
                None => Ok(()),
            },
        )??;
        written
            .into_iter()
            .next()
            .or(unchanged)
            .ok_or_else(|| OpsError::NotFound(id.to_owned()))
    }

    pub fn update(&self, id: &str, c: &Changes, now: i64) -> Result<KeyRecord, OpsError> {
        // One rule for the CLI and the REST API: the owner is fixed at creation.
        if c.owner.is_some() {
            return Err(OpsError::Immutable {
                field: "owner",
                why: "it names who answers for the key and which mass revocations reach it; \
                      create a key for the new owner and revoke this one",
            });
        }
        self.change(id, |cur| {
            // Any revocation counts, even one stamped later than our `now`: that was read
            // before we waited for the lock, and a concurrent revoke may have won it.
            if cur.revoked_at.is_some() {
                return Err(OpsError::Invalid(format!(
                    "key {id} is revoked; revoked keys cannot be changed"
                )));
            }
            let mut r = cur.clone();
            if let Some(v) = &c.name {
                r.name = v.clone();
            }
            if let Some(v) = &c.scopes {
                r.scopes = v.clone();
            }
            if let Some(v) = &c.plan {
                r.plan = v.clone();
                if v.is_some() {
                    r.rate = None;
                }
            }
            if let Some(v) = &c.rate {
                r.rate = v.clone();
                if v.is_some() {
                    r.plan = None;
                }
            }
            if let Some(v) = &c.quota {
                r.quota = v.clone();
            }
            if let Some(v) = c.expires_in_secs {
                r.expires_at = v.map(|s| now + s);
                check_expiry(r.expires_at, now)?;
            }
            if let Some(v) = &c.allow_ips {
                r.allow_ips = v.clone();
            }
            if let Some(v) = &c.allow_origins {
                r.allow_origins = v.clone();
            }
            for (k, v) in &c.labels {
                if v.is_empty() {
                    r.labels.remove(k);
                } else {
                    r.labels.insert(k.clone(), v.clone());
                }
            }
            r.written_at_ms = crate::clock::unix_ms();
            self.validate(&r, now)?;
            let event = Event::new("key.updated", &self.actor)
                .key(&r)
                .with("changed", changed_fields(cur, &r));
            Ok(Some(Written {
                records: vec![r],
                event,
            }))
        })
    }

    /// Revoke one key. Revoking a revoked key is not an error and writes nothing.
    pub fn revoke(&self, id: &str, reason: Option<&str>, now: i64) -> Result<KeyRecord, OpsError> {
        self.revoke_found(id, reason, &[], now)
    }

    /// [`Keys::revoke`] of a key found leaked (`keygate scan --revoke`): the audit event
    /// carries `found_in`, the places it was found (file paths, `archive!entry`), never the key.
    pub fn revoke_found(
        &self,
        id: &str,
        reason: Option<&str>,
        found_in: &[String],
        now: i64,
    ) -> Result<KeyRecord, OpsError> {
        check_reason(reason)?;
        self.change(id, |cur| {
            if cur.revoked_at.is_some() {
                return Ok(None);
            }
            let r = revoked(cur, reason, now);
            let mut event = self.revoked_event(&r);
            if !found_in.is_empty() {
                event = event.with("found_in", found_in.to_vec());
            }
            Ok(Some(Written {
                event,
                records: vec![r],
            }))
        })
    }

    /// `key.revoked`, with the reason when one was given.
    fn revoked_event(&self, r: &KeyRecord) -> Event {
        let e = Event::new("key.revoked", &self.actor).key(r);
        match &r.revoked_reason {
            Some(reason) => e.with("reason", reason.as_str()),
            None => e,
        }
    }

    /// Break-glass: revoke every live key the selector matches, in one locked append.
    /// Canaries are spared (see [`MassRevoke::canaries_spared`]).
    pub fn revoke_matching(
        &self,
        sel: &Selector,
        reason: Option<&str>,
        now: i64,
    ) -> Result<MassRevoke, OpsError> {
        check_reason(reason)?;
        if sel.is_empty() {
            return Err(OpsError::Invalid(
                "a mass revoke needs an owner, an env or a label to select keys by (CLI: --owner, --env, --label)"
                    .into(),
            ));
        }
        let mut canaries_spared = 0;
        let revoked = self.log.transact(
            |state| {
                let (canaries, mut hits): (Vec<&KeyRecord>, Vec<&KeyRecord>) = state
                    .keys
                    .values()
                    .filter(|r| sel.matches(r) && r.revoked_at.is_none())
                    .partition(|r| r.canary);
                canaries_spared = canaries.len();
                hits.sort_by_key(|r| r.rev);
                let records: Vec<KeyRecord> =
                    hits.into_iter().map(|r| revoked(r, reason, now)).collect();
                let events: Vec<Event> = records
                    .iter()
                    .map(|r| self.revoked_event(r).with("mass", true))
                    .collect();
                Ok::<_, OpsError>((records, events))
            },
            |events, point| self.audit_at(&events, point),
        )??;
        Ok(MassRevoke {
            revoked,
            canaries_spared,
        })
    }

    /// New key with the same grants and lineage; the old one expires at `now + grace` (or
    /// earlier, if it already expired sooner). A key is rotated once: rotating it again is
    /// refused naming its successor, so a lineage has one current key and the old key's
    /// `rotated_to` is never overwritten. The successor gets a fresh lifetime as long as the
    /// old key's own (`expires_at - created_at`, capped at `policy.max_ttl`; none if the old
    /// key had none), never the grace window.
    pub fn rotate(&self, id: &str, opts: RotateOptions, now: i64) -> Result<Minted, OpsError> {
        if opts.complete_when_idle_secs.is_some_and(|s| s <= 0) {
            return Err(OpsError::Invalid(
                "complete_when_idle must be more than zero".into(),
            ));
        }
        let mut minted = None;
        let mut replaced = None;
        let record = self.change(id, |cur| {
            // A revocation stamped after our `now` (a revoke that won the lock while we
            // waited) still counts: never mint a successor for a revoked key.
            let state = if cur.revoked_at.is_some() {
                KeyState::Revoked
            } else {
                cur.state(now)
            };
            match state {
                KeyState::Revoked | KeyState::Expired | KeyState::Canary => {
                    return Err(OpsError::Invalid(format!(
                        "key {id} is {}; only active keys can be rotated",
                        state.as_str()
                    )))
                }
                KeyState::Active | KeyState::Pending => {}
            }
            if let Some(successor) = &cur.rotated_to {
                return Err(OpsError::AlreadyRotated {
                    id: id.to_owned(),
                    successor: successor.clone(),
                });
            }
            let grants = Grants {
                name: cur.name.clone(),
                owner: cur.owner.clone(),
                env: cur.env.clone(),
                scopes: cur.scopes.clone(),
                plan: cur.plan.clone(),
                rate: cur.rate.clone(),
                quota: cur.quota.clone(),
                expires_in_secs: self.successor_lifetime(cur),
                // The successor is valid when the old key is: at once for a key in use, at the
                // same time for a pending one (rotating must not bring a not-before forward).
                not_before: cur.not_before.filter(|nb| *nb > now),
                allow_ips: cur.allow_ips.clone(),
                allow_origins: cur.allow_origins.clone(),
                labels: cur.labels.clone(),
                canary: false,
                publishable: cur.publishable,
            };
            let m = self.mint(&grants, now, Some(cur))?;
            let mut old = cur.clone();
            let grace_end = now + opts.grace_secs.max(0);
            old.rotation = Some(Rotation {
                started_at: now,
                prior_expires_at: old.expires_at,
                complete_when_idle_secs: opts.complete_when_idle_secs,
                requests_at_start: opts.old_requests,
                completed_at: None,
            });
            old.expires_at = Some(old.expires_at.map_or(grace_end, |e| e.min(grace_end)));
            old.rotated_to = Some(m.record.id.clone());
            old.written_at_ms = crate::clock::unix_ms();
            let new = m.record.clone();
            // One event links old -> new; it names the old key (the one that was rotated).
            let event = Event::new("key.rotated", &self.actor)
                .key(&old)
                .with("successor_id", new.id.clone())
                .with("successor_hint", new.hint.clone())
                .with("old_expires_at", old.expires_at)
                .with("complete_when_idle_secs", opts.complete_when_idle_secs);
            minted = Some(m.key);
            replaced = Some(old.clone());
            // Successor first: a writer killed between the two lines leaves an orphan key
            // nobody holds (harmless) rather than a shortened old key with no successor.
            Ok(Some(Written {
                records: vec![new, old],
                event,
            }))
        })?;
        let key = minted.unwrap_or_default();
        Ok(Minted {
            record,
            key,
            replaced,
        })
    }

    /// Roll a rotation back, named by its successor: the successor is revoked and the old key
    /// gets its expiry from before the rotation back, and can be rotated again. Refused once
    /// the old key is revoked (the rotation completed, or someone revoked it): revocation is
    /// final. Audited as `key.rotation_aborted` on the old key.
    pub fn abort_rotation(&self, successor_id: &str, now: i64) -> Result<KeyRecord, OpsError> {
        let written = self.log.transact(
            |state| {
                let successor = state
                    .keys
                    .get(successor_id)
                    .ok_or_else(|| OpsError::NotFound(successor_id.to_owned()))?;
                let not_current = || {
                    OpsError::Invalid(format!(
                        "{successor_id} is not the successor of a rotation in progress"
                    ))
                };
                let old = successor
                    .rotated_from
                    .as_deref()
                    .and_then(|o| state.keys.get(o))
                    .filter(|o| o.rotated_to.as_deref() == Some(successor_id))
                    .ok_or_else(not_current)?;
                let rotation = old.rotation.as_ref().ok_or_else(not_current)?;
                if old.revoked_at.is_some() {
                    return Err(OpsError::RotationFinal {
                        old: old.id.clone(),
                        successor: successor_id.to_owned(),
                    });
                }
                if let Some(next) = &successor.rotated_to {
                    return Err(OpsError::Invalid(format!(
                        "{successor_id} was itself rotated to {next}; abort that rotation first"
                    )));
                }
                let mut restored = old.clone();
                restored.expires_at = rotation.prior_expires_at;
                restored.rotated_to = None;
                restored.rotation = None;
                restored.written_at_ms = crate::clock::unix_ms();
                let event = Event::new("key.rotation_aborted", &self.actor)
                    .key(&restored)
                    .with("successor_id", successor_id)
                    .with("restored_expires_at", restored.expires_at);
                // The old key first: a writer killed between the two lines leaves both keys
                // working (as during the rotation), never neither.
                let mut records = vec![restored];
                if successor.revoked_at.is_none() {
                    records.push(revoked(successor, Some("rotation aborted"), now));
                }
                Ok::<_, OpsError>((records, event))
            },
            |event, point| self.audit_at(&[event], point),
        )??;
        written
            .into_iter()
            .next()
            .ok_or_else(|| OpsError::NotFound(successor_id.to_owned()))
    }

    /// Complete the rotations of `old_ids` that are still ready under the lock (re-checked
    /// against the latest records and `usage`): each old key is revoked and its rotation
    /// marked completed, audited as `key.rotation_completed`. Returns the revoked versions.
    pub fn complete_rotations(
        &self,
        old_ids: &[String],
        usage: &BTreeMap<String, crate::usage::Used>,
        now: i64,
    ) -> Result<Vec<KeyRecord>, OpsError> {
        self.log.transact(
            |state| {
                let mut records = Vec::new();
                let mut events = Vec::new();
                for id in old_ids {
                    let Some(old) = state.keys.get(id) else {
                        continue;
                    };
                    let Some(successor) = old.rotated_to.as_deref().and_then(|s| state.keys.get(s))
                    else {
                        continue;
                    };
                    if !crate::keys::rotation::ready_to_complete(old, successor, usage, now) {
                        continue;
                    }
                    let mut r = revoked(old, Some("rotation completed: old key idle"), now);
                    let Some(rot) = r.rotation.as_mut() else {
                        continue;
                    };
                    rot.completed_at = Some(now);
                    let (started_at, idle) = (rot.started_at, rot.complete_when_idle_secs);
                    events.push(
                        Event::new("key.rotation_completed", &self.actor)
                            .key(&r)
                            .with("successor_id", successor.id.clone())
                            .with("started_at", started_at)
                            .with("complete_when_idle_secs", idle)
                            .with("seconds_to_complete", now - started_at),
                    );
                    records.push(r);
                }
                Ok::<_, OpsError>((records, events))
            },
            |events, point| self.audit_at(&events, point),
        )?
    }

    /// Re-digest keys under the current secret version (`keys::redigest`): under the store's
    /// lock, each request that passes the rule writes one new version of its key with only
    /// `digest` and `secret_version` changed, audited as `key.redigested` (id, versions; never
    /// a digest). One transaction for the batch (one fsync). Returns, per request in order,
    /// the version written or why none was.
    pub fn redigest(
        &self,
        batch: &[crate::keys::redigest::Redigest],
    ) -> Result<Vec<Result<KeyRecord, crate::keys::redigest::Refused>>, OpsError> {
        use crate::keys::redigest::{apply, check, Refused};
        let hasher = &self.settings.hasher;
        let mut verdicts: Vec<Result<(), Refused>> = Vec::new();
        let written = self.log.transact(
            |state| {
                // `transact` may run this again on a newer state (Redis): start over each time.
                verdicts.clear();
                let held: std::collections::HashSet<_> =
                    state.keys.values().map(|r| r.digest).collect();
                let mut taken = std::collections::HashSet::new();
                let mut records = Vec::new();
                let mut events = Vec::new();
                for r in batch {
                    // A second request for a key in this batch sees the key as re-digested.
                    let done = records.iter().any(|w: &KeyRecord| w.id == r.id);
                    let verdict = if done {
                        Err(Refused::AlreadyCurrent {
                            id: r.id.clone(),
                            current: hasher.current_version(),
                        })
                    } else {
                        check(state.keys.get(&r.id), r, hasher, |d| {
                            held.contains(d) || taken.contains(d)
                        })
                        .map(|cur| apply(cur, r))
                    };
                    match verdict {
                        Ok(next) => {
                            taken.insert(next.digest);
                            events.push(
                                Event::new("key.redigested", &self.actor)
                                    .key(&next)
                                    .with("from_version", r.from_version)
                                    .with("to_version", r.to_version),
                            );
                            records.push(next);
                            verdicts.push(Ok(()));
                        }
                        Err(e) => verdicts.push(Err(e)),
                    }
                }
                Ok::<_, OpsError>((records, events))
            },
            |events, point| self.audit_at(&events, point),
        )??;
        let mut written = written.into_iter();
        Ok(verdicts
            .into_iter()
            .map(|v| {
                v.and_then(|()| {
                    written
                        .next()
                        .ok_or_else(|| Refused::NotFound(String::new()))
                })
            })
            .collect())
    }

    /// The successor's lifetime in seconds: the old key's own, capped by policy.
    fn successor_lifetime(&self, old: &KeyRecord) -> Option<i64> {
        let own = old.expires_at.map(|e| (e - old.created_at).max(1));
        match (own, self.settings.policy.max_ttl_secs) {
            (Some(own), Some(max)) => Some(own.min(max)),
            (None, Some(max)) if self.settings.policy.require_expiry => Some(max),
            (own, _) => own,
        }
    }

    /// Store digests of keys minted elsewhere, without re-issuing them. `lines` are bare keys
    /// or JSON objects; `defaults` fill what a line does not say. (In-memory input; the CLI
    /// streams with [`Keys::import_from`].)
    pub fn import(
        &self,
        lines: &[String],
        defaults: &Grants,
        now: i64,
        mut progress: impl FnMut(usize),
    ) -> Result<ImportReport, OpsError> {
        let text = lines.join("\n");
        self.import_from(text.as_bytes(), defaults, now, |p| progress(p.lines))
    }

    /// Import from a stream, in bounded memory: the input is read line by line, the store's
    /// digests are read once (to skip keys it holds), and new records are written in batches
    /// of [`IMPORT_BATCH`] with the store's append (header and tail only, never the whole log),
    /// each batch audited before it is written. Refused lines are reported and skipped; the
    /// good lines are imported. A failed or killed import leaves whole batches behind, and
    /// running it again imports the rest (what is stored counts as a duplicate).
    ///
    /// A pipeline of three threads, batches passed hand to hand in order: this one reads,
    /// checks and hashes lines; an auditor writes each batch's events; an appender writes the
    /// batch to the store after its events. A batch's fsyncs and serialisation overlap the
    /// next batch's hashing instead of adding to it. Hand-offs wait for the receiver, so at
    /// most four batches are alive (filling, auditing, appending, one waiting). An error in a
    /// later stage stops the earlier ones at their next hand-off.
    pub fn import_from(
        &self,
        input: impl std::io::BufRead,
        defaults: &Grants,
        now: i64,
        progress: impl FnMut(ImportProgress),
    ) -> Result<ImportReport, OpsError> {
        let mut report = ImportReport::default();
        // One read of the store: every digest it holds (32 bytes a key, not whole records).
        let mut taken: std::collections::HashSet<
            crate::keys::digest::Digest,
            std::hash::BuildHasherDefault<DigestPrefix>,
        > = std::collections::HashSet::default();
        taken.extend(self.log.digests()?);
        let (to_audit, audit_in) = std::sync::mpsc::sync_channel::<Vec<KeyRecord>>(0);
        let (to_append, append_in) = std::sync::mpsc::sync_channel::<Vec<KeyRecord>>(0);
        let (read, audited, appended) = std::thread::scope(|s| {
            let auditor = s.spawn(move || {
                // Returning drops `audit_in`: the reader's next hand-off fails and it stops.
                for batch in audit_in {
                    self.audit_import(&batch)?;
                    if to_append.send(batch).is_err() {
                        break;
                    }
                }
                Ok::<_, OpsError>(())
            });
            let appender = s.spawn(move || {
                let mut imported = 0;
                for batch in append_in {
                    imported += self.log.append(batch)?.len();
                }
                Ok::<_, OpsError>(imported)
            });
            let read = self.import_lines(
                input,
                defaults,
                now,
                &mut taken,
                &mut report,
                progress,
                |batch| to_audit.send(batch).is_ok(),
            );
            drop(to_audit);
            (read, joined(auditor.join()), joined(appender.join()))
        });
        // Later stages first: their error is why the earlier ones stopped, if they did.
        report.imported = appended?;
        audited?;
        read?;
        Ok(report)
    }

    /// The reading half of [`Keys::import_from`]: lines into records, refused lines into
    /// `report`, full batches to `send` (false: the writer has stopped, so stop reading).
    #[allow(clippy::too_many_arguments)]
    fn import_lines<S: std::hash::BuildHasher>(
        &self,
        mut input: impl std::io::BufRead,
        defaults: &Grants,
        now: i64,
        taken: &mut std::collections::HashSet<crate::keys::digest::Digest, S>,
        report: &mut ImportReport,
        mut progress: impl FnMut(ImportProgress),
        mut send: impl FnMut(Vec<KeyRecord>) -> bool,
    ) -> Result<(), OpsError> {
        let mut ids = IdPool::default();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut buf = Vec::with_capacity(512);
        let mut at = ImportProgress::default();
        loop {
            buf.clear();
            let n = input.read_until(b'\n', &mut buf).map_err(|e| {
                OpsError::Invalid(format!("reading the input at line {}: {e}", at.lines + 1))
            })?;
            if n == 0 {
                break;
            }
            at.lines += 1;
            at.bytes += n as u64;
            if at.lines % 10_000 == 0 {
                progress(at);
            }
            let line = match std::str::from_utf8(&buf) {
                Ok(l) => l.trim(),
                Err(_) => {
                    report.refuse(at.lines, "not UTF-8".into());
                    continue;
                }
            };
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let record = match self.import_line(line, defaults, now, &mut ids) {
                Ok(r) => r,
                Err(ImportRefusal::Line(why)) => {
                    report.refuse(at.lines, why);
                    continue;
                }
                Err(ImportRefusal::Fatal(e)) => return Err(e),
            };
            if !taken.insert(record.digest) {
                report.duplicates += 1;
                continue;
            }
            batch.push(record);
            if batch.len() >= IMPORT_BATCH
                && !send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(IMPORT_BATCH),
                ))
            {
                return Ok(());
            }
        }
        if !batch.is_empty() {
            send(batch);
        }
        progress(at);
        Ok(())
    }

    /// Audit one batch of new keys, before it is written (a failed audit write refuses the
    /// batch, as for every change). The events share one timestamp (the batch is one write),
    /// taken once rather than formatted a million times.
    fn audit_import(&self, batch: &[KeyRecord]) -> Result<(), OpsError> {
        if batch.is_empty() {
            return Ok(());
        }
        let event = Event::new("key.imported", &self.actor);
        let events: Vec<Event> = batch.iter().map(|r| event.clone().key(r)).collect();
        self.audit(&events)
    }

    /// One non-empty, non-comment line as a record, or why it is refused.
    fn import_line(
        &self,
        line: &str,
        defaults: &Grants,
        now: i64,
        ids: &mut IdPool,
    ) -> Result<KeyRecord, ImportRefusal> {
        let parsed = if line.starts_with('{') {
            serde_json::from_str::<ImportLine>(line)
                .map_err(|e| ImportRefusal::Line(format!("bad JSON: {e}")))?
        } else {
            ImportLine {
                key: line.to_owned(),
                name: None,
                owner: None,
                env: None,
                scopes: vec![],
                plan: None,
                rate: None,
                expires_at: None,
                not_before: None,
                labels: BTreeMap::new(),
            }
        };
        // The same bound the gateway applies before hashing, so every imported key can be presented.
        if parsed.key.len() > MAX_KEY_LEN
            || parsed.key.len() < MIN_IMPORTED_KEY_LEN
            || !parsed.key.bytes().all(|b| (0x21..=0x7e).contains(&b))
            || parsed.key.contains(',')
        {
            return Err(ImportRefusal::Line(
                "key must be 16-256 visible ASCII characters without commas".into(),
            ));
        }
        let (secret_version, digest) = self.settings.hasher.digest(&parsed.key);
        let id = ids
            .next("key")
            .map_err(|e| ImportRefusal::Fatal(OpsError::Random(e.to_string())))?;
        let record = KeyRecord {
            rev: 0,
            lineage: id.clone(),
            id,
            digest,
            secret_version,
            name: parsed.name.unwrap_or_else(|| {
                if defaults.name.is_empty() {
                    "imported".into()
                } else {
                    defaults.name.clone()
                }
            }),
            owner: parsed.owner.unwrap_or_else(|| defaults.owner.clone()),
            env: parsed.env.unwrap_or_else(|| defaults.env.clone()),
            scopes: if parsed.scopes.is_empty() {
                defaults.scopes.clone()
            } else {
                parsed.scopes
            },
            plan: parsed.plan.or_else(|| defaults.plan.clone()),
            rate: parsed.rate.or_else(|| defaults.rate.clone()),
            quota: defaults.quota.clone(),
            allow_ips: defaults.allow_ips.clone(),
            allow_origins: defaults.allow_origins.clone(),
            labels: if parsed.labels.is_empty() {
                defaults.labels.clone()
            } else {
                parsed.labels
            },
            // Not our format, so no public head: the last four characters at most.
            hint: imported_hint(&parsed.key),
            created_at: now,
            written_at_ms: crate::clock::unix_ms(),
            not_before: parsed.not_before.or(defaults.not_before),
            expires_at: parsed
                .expires_at
                .or(defaults.expires_in_secs.map(|s| now + s)),
            revoked_at: None,
            revoked_reason: None,
            canary: false,
            publishable: false,
            imported: true,
            rotated_from: None,
            rotated_to: None,
            rotation: None,
            mac: None,
        };
        check_expiry(record.expires_at, now)
            .and_then(|()| check_not_before(record.not_before, record.expires_at, now))
            .and_then(|()| self.validate(&record, now))
            .map_err(|e| ImportRefusal::Line(e.to_string()))?;
        Ok(record)
    }

    pub fn compact(&self, now: i64) -> Result<Compacted, OpsError> {
        Ok(self
            .log
            .compact(now, now - self.settings.revoked_retention_secs)?)
    }
}

/// A scoped thread's result; its panic, if it panicked, goes on in the caller.
fn joined<T>(r: std::thread::Result<T>) -> T {
    r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn revoked(cur: &KeyRecord, reason: Option<&str>, now: i64) -> KeyRecord {
    let mut r = cur.clone();
    r.revoked_at = Some(now);
    r.revoked_reason = reason.map(str::to_owned);
    r.written_at_ms = crate::clock::unix_ms();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    #[test]
    fn scope_rule_table() {
        for ok in ["invoices:read", "a", "a.b-c_d:E9", "x:y:z"] {
            assert!(check_scope(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            "*",
            "invoices:*",
            "..",
            "a..b",
            ".a",
            "a.",
            "a::b",
            ":a",
            "a%2fb",
            "%2F",
            "a/b",
            "a b",
            "é",
            &long,
        ] {
            assert!(check_scope(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn changed_fields_names_what_differs_and_skips_bookkeeping() {
        let old = sample("key_a", Digest([1; 32]));
        let mut new = old.clone();
        new.rev += 1;
        new.written_at_ms += 5;
        assert!(changed_fields(&old, &new).is_empty());
        new.scopes = vec![];
        new.expires_at = Some(9);
        assert_eq!(changed_fields(&old, &new), ["expires_at", "scopes"]);
    }

    #[test]
    fn not_before_parses_durations_and_rfc3339_with_offsets() {
        let now = 1_800_000_000;
        assert_eq!(parse_not_before("10m", now).unwrap(), now + 600);
        for same in [
            "2027-01-15T08:00:00Z",
            "2027-01-15T09:00:00+01:00",
            "2027-01-15T03:00:00-05:00",
        ] {
            assert_eq!(parse_not_before(same, 0).unwrap(), 1_800_000_000, "{same}");
        }
        for bad in ["", "soon", "2027-01-15", "2027-01-15T08:00:00+1:00", "-5m"] {
            assert!(parse_not_before(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn not_before_must_be_future_and_before_expiry() {
        assert!(check_not_before(None, Some(5), 100).is_ok());
        assert!(check_not_before(Some(101), None, 100).is_ok());
        assert!(check_not_before(Some(101), Some(102), 100).is_ok());
        assert!(check_not_before(Some(100), None, 100).is_err());
        assert!(check_not_before(Some(150), Some(150), 100).is_err());
    }

    #[test]
    fn expiry_must_be_in_the_future() {
        assert!(check_expiry(None, 100).is_ok());
        assert!(check_expiry(Some(101), 100).is_ok());
        assert!(check_expiry(Some(100), 100).is_err());
        assert!(check_expiry(Some(5), 100).is_err());
    }
}
