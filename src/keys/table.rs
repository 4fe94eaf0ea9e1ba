//! The in-memory key table: every record, by digest, plus an index by id.
//!
//! Requests never wait on disk or network: authentication is one HMAC per configured secret
//! version and one concurrent-map lookup. Applying one record version is O(1) and holds one
//! shard lock for the duration of an insert. A whole new table (first load, compaction) is
//! built aside and swapped in by the owner (`ArcSwap`), so readers see the old table or the
//! new one, never a half.

use crate::keys::digest::{Digest, Hasher};
use crate::keys::format::{FormatError, KeyFormat, MAX_KEY_LEN};
use crate::keys::record::{KeyRecord, KeyState};
use crate::store::seal::LogId;
use dashmap::DashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Why a presented key was refused. The caller shows all of these as the same 401; the
/// variant only reaches metrics, logs and the audit log.
#[derive(Debug, Clone, Error)]
pub enum AuthError {
    #[error("key is malformed: {0}")]
    Malformed(FormatError),
    #[error("key is unknown")]
    Unknown,
    #[error("key {} is revoked", .0.id)]
    Revoked(Arc<KeyRecord>),
    #[error("key {} is expired", .0.id)]
    Expired(Arc<KeyRecord>),
    #[error("key {} is not yet valid", .0.id)]
    NotYetValid(Arc<KeyRecord>),
    #[error("canary key {} was used", .0.id)]
    Canary(Arc<KeyRecord>),
    /// A short-lived token refused before its parent key decided (`tokens::verifier`).
    #[error("token refused: {0}")]
    Token(TokenRefusal),
}

/// Why a short-lived token was refused on its own account (a refused parent key uses the
/// key's variants). Closed, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenRefusal {
    /// Malformed, bad signature, unknown signing key, wrong algorithm, wrong lineage.
    #[error("invalid")]
    Invalid,
    #[error("expired")]
    Expired,
    /// The route does not accept tokens, or not for this audience.
    #[error("not accepted on this route")]
    NotAccepted,
}

impl AuthError {
    /// Closed label for metrics and audit (`keygate_auth_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "key_malformed",
            AuthError::Unknown => "key_unknown",
            AuthError::Revoked(_) => "key_revoked",
            AuthError::Expired(_) => "key_expired",
            AuthError::NotYetValid(_) => "key_not_yet_valid",
            AuthError::Canary(_) => "key_canary",
            AuthError::Token(TokenRefusal::Invalid) => "token_invalid",
            AuthError::Token(TokenRefusal::Expired) => "token_expired",
            AuthError::Token(TokenRefusal::NotAccepted) => "token_not_accepted",
        }
    }

    /// The record behind the failure, when the key was found.
    pub fn record(&self) -> Option<&Arc<KeyRecord>> {
        match self {
            AuthError::Malformed(_) | AuthError::Unknown | AuthError::Token(_) => None,
            AuthError::Revoked(r)
            | AuthError::Expired(r)
            | AuthError::NotYetValid(r)
            | AuthError::Canary(r) => Some(r),
        }
    }
}

/// Digests are HMAC outputs the caller cannot steer, so their first 8 bytes are already a
/// uniform hash: skipping SipHash saves ~20 ns per lookup with no flooding risk.
#[derive(Clone, Default)]
pub struct DigestHash;

#[derive(Default)]
pub struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Digest's derived Hash writes the 32-byte array once; fold anything else in too.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
            if bytes.len() >= 8 {
                break;
            }
        }
    }
    fn write_usize(&mut self, _: usize) {
        // The array length prefix carries no entropy.
    }
}

impl BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct KeyTable {
    by_digest: DashMap<Digest, Arc<KeyRecord>, DigestHash>,
    by_id: DashMap<String, Digest>,
    /// The log whose revisions `rev` counts; fixed for the table's life (a new log means a new
    /// table, built aside by `sync::apply`).
    log: LogId,
    rev: AtomicU64,
    /// Imported keys are not in our format; while there are none, a key that does not claim
    /// our prefix is rejected without an HMAC.
    imported: AtomicUsize,
}

impl std::fmt::Debug for DigestHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestHash")
    }
}

impl KeyTable {
    pub fn new() -> KeyTable {
        KeyTable::default()
    }

    /// An empty table positioned in `log`.
    pub fn for_log(log: LogId) -> KeyTable {
        KeyTable {
            log,
            ..KeyTable::default()
        }
    }

    /// Build a table from records in revision order (the latest version of an id wins).
    /// Mechanism only: sources go through `sync::apply`, which holds the rules.
    pub fn from_records(
        records: impl IntoIterator<Item = KeyRecord>,
        log: LogId,
        rev: u64,
    ) -> KeyTable {
        let table = KeyTable::for_log(log);
        for r in records {
            table.apply(r);
        }
        table.rev.fetch_max(rev, Ordering::Relaxed);
        table
    }

    /// Apply one record version. Older or equal revisions of an id already applied are
    /// ignored, so replays are harmless. Returns whether it changed the table.
    pub fn apply(&self, record: KeyRecord) -> bool {
        let rev = record.rev;
        if let Some(old) = self
            .by_id
            .get(&record.id)
            .and_then(|d| self.by_digest.get(&*d).map(|r| r.clone()))
        {
            if old.rev >= rev {
                return false;
            }
            if old.digest != record.digest {
                self.by_digest.remove(&old.digest);
            }
            if old.imported {
                self.imported.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if record.imported {
            self.imported.fetch_add(1, Ordering::Relaxed);
        }
        self.by_id.insert(record.id.clone(), record.digest);
        self.by_digest.insert(record.digest, Arc::new(record));
        self.rev.fetch_max(rev, Ordering::Release);
        true
    }

    /// Raise the table's revision without a record (e.g. a compaction meta line).
    pub fn advance(&self, rev: u64) {
        self.rev.fetch_max(rev, Ordering::Release);
    }

    pub fn revision(&self) -> u64 {
        self.rev.load(Ordering::Acquire)
    }

    pub fn log(&self) -> LogId {
        self.log
    }

    pub fn get_by_digest(&self, digest: &Digest) -> Option<Arc<KeyRecord>> {
        self.by_digest.get(digest).map(|r| r.clone())
    }

    /// Every revoked record (carried into a new table so revocations survive a new log).
    pub fn revoked(&self) -> Vec<Arc<KeyRecord>> {
        self.by_digest
            .iter()
            .filter(|e| e.revoked_at.is_some())
            .map(|e| e.value().clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn get_by_id(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let digest = *self.by_id.get(id)?;
        self.by_digest.get(&digest).map(|r| r.clone())
    }

    /// Every record (for gauges and reports; not for the request path).
    pub fn records(&self) -> Vec<Arc<KeyRecord>> {
        self.by_digest.iter().map(|e| e.value().clone()).collect()
    }

    /// Count by (state, env) at `now`.
    pub fn count_states(&self, now: i64) -> std::collections::BTreeMap<(KeyState, String), u64> {
        let mut out = std::collections::BTreeMap::new();
        for e in self.by_digest.iter() {
            *out.entry((e.state(now), e.env.clone())).or_insert(0) += 1;
        }
        out
    }

    /// Authenticate a presented key at `now` (Unix seconds). `leeway` loosens expiry and
    /// not-before for clock skew; zero means exact.
    pub fn authenticate(
        &self,
        key: &str,
        format: &KeyFormat,
        hasher: &Hasher,
        now: i64,
        leeway: i64,
    ) -> Result<Arc<KeyRecord>, AuthError> {
        if key.len() > MAX_KEY_LEN {
            return Err(AuthError::Malformed(FormatError::TooLong));
        }
        if format.claims(key) {
            format.parse(key).map_err(AuthError::Malformed)?;
        } else if self.imported.load(Ordering::Relaxed) == 0 {
            return Err(AuthError::Malformed(FormatError::WrongPrefix));
        }
        let record = hasher
            .all_digests(key)
            .find_map(|(version, d)| {
                self.by_digest
                    .get(&d)
                    .filter(|r| r.secret_version == version)
                    .map(|r| r.clone())
            })
            .ok_or(AuthError::Unknown)?;
        // Canary before revoked: a revoked canary must still alarm (revoking one, e.g. by a
        // mass revoke, would otherwise disarm it silently). Both answer the same 401.
        if record.canary {
            Err(AuthError::Canary(record))
        } else if record.revoked_at.is_some_and(|t| t <= now) {
            Err(AuthError::Revoked(record))
        } else if record.expires_at.is_some_and(|t| t + leeway <= now) {
            Err(AuthError::Expired(record))
        } else if record.not_before.is_some_and(|t| t - leeway > now) {
            Err(AuthError::NotYetValid(record))
        } else {
            Ok(record)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::sample;

    struct Fixture {
        table: KeyTable,
        format: KeyFormat,
        hasher: Hasher,
    }

    fn fixture() -> Fixture {
        Fixture {
            table: KeyTable::new(),
            format: KeyFormat::new("kg", &["live".into(), "test".into()]),
            hasher: Hasher::new(vec![(1, vec![7; 32])]),
        }
    }

    impl Fixture {
        fn add(&self, id: &str, rev: u64, edit: impl FnOnce(&mut KeyRecord)) -> String {
            let key = self.format.generate("live").unwrap();
            let (v, d) = self.hasher.digest(&key);
            let mut r = sample(id, d);
            r.secret_version = v;
            r.rev = rev;
            edit(&mut r);
            self.table.apply(r);
            key
        }
        fn auth(&self, key: &str, now: i64) -> Result<Arc<KeyRecord>, AuthError> {
            self.table
                .authenticate(key, &self.format, &self.hasher, now, 0)
        }
    }

    #[test]
    fn authenticate_covers_every_state() {
        let f = fixture();
        let ok = f.add("key_ok", 1, |_| {});
        let revoked = f.add("key_rev", 2, |r| r.revoked_at = Some(100));
        let expired = f.add("key_exp", 3, |r| r.expires_at = Some(100));
        let pending = f.add("key_nb", 4, |r| r.not_before = Some(300));
        let canary = f.add("key_can", 5, |r| r.canary = true);
        let unknown = f.format.generate("live").unwrap();
        let reason = |k: &str, now| f.auth(k, now).err().map(|e| e.reason());
        assert_eq!(f.auth(&ok, 200).unwrap().id, "key_ok");
        assert_eq!(reason(&revoked, 200), Some("key_revoked"));
        assert_eq!(
            reason(&revoked, 50),
            None,
            "revocation takes effect at revoked_at"
        );
        assert_eq!(
            reason(&expired, 100),
            Some("key_expired"),
            "expiry is exact"
        );
        assert_eq!(reason(&expired, 99), None);
        assert_eq!(reason(&pending, 299), Some("key_not_yet_valid"));
        assert_eq!(reason(&pending, 300), None);
        assert_eq!(reason(&canary, 200), Some("key_canary"));
        let revoked_canary = f.add("key_rcan", 6, |r| {
            r.canary = true;
            r.revoked_at = Some(100);
        });
        assert_eq!(
            reason(&revoked_canary, 200),
            Some("key_canary"),
            "a revoked canary still alarms"
        );
        assert_eq!(reason(&unknown, 200), Some("key_unknown"));
        assert_eq!(reason("kg_live_short", 200), Some("key_malformed"));
        assert_eq!(
            reason("legacy-imported-key", 200),
            Some("key_malformed"),
            "no imports: no HMAC"
        );
        assert_eq!(reason(&"x".repeat(10_000), 200), Some("key_malformed"));
        assert_eq!(
            f.table
                .authenticate(&expired, &f.format, &f.hasher, 105, 10)
                .unwrap()
                .id,
            "key_exp"
        );
    }

    #[test]
    fn imported_keys_authenticate_by_digest() {
        let f = fixture();
        let legacy = "sk-legacy-0123456789";
        let (v, d) = f.hasher.digest(legacy);
        let mut r = sample("key_imp", d);
        r.secret_version = v;
        r.rev = 1;
        r.imported = true;
        f.table.apply(r);
        assert_eq!(f.auth(legacy, 10).unwrap().id, "key_imp");
        assert_eq!(f.auth("sk-other", 10).unwrap_err().reason(), "key_unknown");
    }

    #[test]
    fn apply_is_versioned_and_indexes_by_id() {
        let f = fixture();
        let key = f.add("key_a", 5, |_| {});
        assert_eq!(f.table.revision(), 5);
        let mut older = (*f.table.get_by_id("key_a").unwrap()).clone();
        older.rev = 4;
        older.revoked_at = Some(1);
        assert!(!f.table.apply(older.clone()), "older revision ignored");
        assert!(f.auth(&key, 10).is_ok());
        older.rev = 6;
        assert!(f.table.apply(older));
        assert_eq!(f.auth(&key, 10).unwrap_err().reason(), "key_revoked");
        assert_eq!(f.table.len(), 1);
        assert_eq!(f.table.revision(), 6);
    }

    #[test]
    fn secret_rotation_keeps_old_digests_valid() {
        let f = fixture();
        let key = f.add("key_a", 1, |_| {});
        let rotated = Hasher::new(vec![(1, vec![7; 32]), (2, vec![9; 32])]);
        assert_eq!(
            f.table
                .authenticate(&key, &f.format, &rotated, 10, 0)
                .unwrap()
                .id,
            "key_a"
        );
        let only_new = Hasher::new(vec![(2, vec![9; 32])]);
        assert!(f
            .table
            .authenticate(&key, &f.format, &only_new, 10, 0)
            .is_err());
    }
}
