//! Admin tokens for the control plane: minted once by the CLI, stored only as HMAC digests
//! (same server secret as keys) in a JSON-lines file, each with a role.
//!
//! Roles: `read` (GET the API, key lookup), `write` (read + every mutation), `feed` (the
//! gateway feed and usage reports), `redigest` (only `POST /v1/api-keys/{id}/redigest`: a
//! fleet gateway handing in a key's digest under the current secret version,
//! `keys::redigest`), `verify` (only `POST /v1/api-keys/verify`: for services that check keys
//! themselves and must not list or look up anyone's keys; read and write tokens may verify
//! too). Lookup is by digest, which a caller cannot steer, so a map lookup leaks
//! nothing about stored tokens through timing (the same argument as for API keys).
//!
//! Lifecycle: a token may carry an expiry (checked on every request) and is revoked by
//! appending a new version of its line with `revoked_at` (the file stays append-only, like
//! the key store). The latest line of a token wins, except that a revocation is final: a
//! later unrevoked line for a revoked token (an edit, a restored backup) is ignored. The
//! control plane re-reads the file whenever it changes, so a revocation works at once.
//!
//! With the key store on Redis (`[keys] source = "redis"`) the same lines live in a Redis list
//! (`<prefix>s:tokens`, appended with `RPUSH`), so every control-plane replica and the CLI
//! share them: a token minted or revoked anywhere works or stops working on the next request
//! to any replica (each checks the list's length, which every append changes).

use crate::audit::{AuditLog, Event};
use crate::keys::digest::{Digest, Hasher};
use crate::keys::record::new_id;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Read,
    Write,
    Feed,
    Verify,
    /// Re-digests from gateways, nothing else (not even reads).
    Redigest,
}

impl Role {
    /// Whether a token of this role may do what `needed` requires.
    pub fn allows(self, needed: Role) -> bool {
        self == needed
            || (self == Role::Write && needed == Role::Read)
            || (matches!(self, Role::Read | Role::Write) && needed == Role::Verify)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Feed => "feed",
            Role::Verify => "verify",
            Role::Redigest => "redigest",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub digest: Digest,
    pub secret_version: u32,
    pub role: Role,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unix seconds from which the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A token's state at an instant; only `Active` tokens authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Active,
    Expired,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

impl TokenRecord {
    /// Revoked beats expired: an operator who revoked a token sees it as revoked.
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }

    /// What a listing shows: everything but the digest, plus the state.
    pub fn public_json(&self, now: i64) -> serde_json::Value {
        crate::keys::record::public_json(self, &["digest"], self.state(now).as_str())
    }
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("admin tokens file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path}: {source}; the token was not revoked")]
    Audit {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no admin token with id {0}")]
    NotFound(String),
}

/// A token as shown once.
#[derive(Debug)]
pub struct MintedToken {
    pub record: TokenRecord,
    pub token: String,
}

const TOKEN_PREFIX: &str = "kgadm_";

/// Mint a token and append its record to `path` (fsynced).
pub fn create(
    store: &TokenStore,
    hasher: &Hasher,
    role: Role,
    name: Option<String>,
    expires_at: Option<i64>,
    now: i64,
) -> std::io::Result<MintedToken> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let body: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("{TOKEN_PREFIX}{body}");
    let (secret_version, digest) = hasher.digest(&token);
    let record = TokenRecord {
        id: new_id("adm").map_err(|e| std::io::Error::other(e.to_string()))?,
        digest,
        secret_version,
        role,
        created_at: now,
        name,
        expires_at,
        revoked_at: None,
    };
    store.append(&record)?;
    Ok(MintedToken { record, token })
}

/// Where the token lines live: the control plane's file, or the Redis store's list.
#[derive(Debug, Clone)]
pub enum TokenStore {
    File(PathBuf),
    Redis(crate::redis::Settings),
}

/// A version of the token lines: changes with every append.
pub type Version = (std::time::SystemTime, u64, u64);

impl TokenStore {
    pub fn for_config(config: &crate::config::Config, settings: &crate::keys::KeySettings) -> Self {
        match &settings.redis_store {
            Some(r) => TokenStore::Redis(r.clone()),
            None => TokenStore::File(config.resolve(&config.control.tokens)),
        }
    }

    fn list_key(r: &crate::redis::Settings) -> String {
        format!("{}s:tokens", r.prefix)
    }

    pub fn describe(&self) -> String {
        match self {
            TokenStore::File(p) => p.display().to_string(),
            TokenStore::Redis(r) => format!("redis list {}", Self::list_key(r)),
        }
    }

    /// The file's (mtime, length, inode), or the list's length: `None` when unreadable.
    pub fn version(&self) -> Option<Version> {
        match self {
            TokenStore::File(path) => std::fs::metadata(path)
                .and_then(|m| {
                    Ok((
                        m.modified()?,
                        m.len(),
                        std::os::unix::fs::MetadataExt::ino(&m),
                    ))
                })
                .ok(),
            TokenStore::Redis(r) => {
                let key = Self::list_key(r);
                let v = crate::store::redis::blocking_call(r, &[b"LLEN", key.as_bytes()]).ok()?;
                Some((std::time::UNIX_EPOCH, v.as_int()? as u64, 0))
            }
        }
    }

    /// Every line (missing file or list: none).
    fn lines(&self) -> Vec<String> {
        match self {
            TokenStore::File(path) => std::fs::read_to_string(path)
                .map(|t| t.lines().map(str::to_owned).collect())
                .unwrap_or_default(),
            TokenStore::Redis(r) => {
                let key = Self::list_key(r);
                match crate::store::redis::blocking_call(
                    r,
                    &[b"LRANGE", key.as_bytes(), b"0", b"-1"],
                ) {
                    Ok(crate::redis::resp::Value::Array(items)) => {
                        items.iter().filter_map(|v| v.as_text()).collect()
                    }
                    Ok(_) => vec![],
                    Err(e) => {
                        tracing::error!(error = %e, "admin tokens unreadable from redis");
                        vec![]
                    }
                }
            }
        }
    }

    /// Append one line: in a single write on an `O_APPEND` file (so concurrent writers never
    /// interleave within a line), fsynced; or one `RPUSH`.
    fn append(&self, record: &TokenRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        match self {
            TokenStore::File(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                line.push(b'\n');
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                f.write_all(&line)?;
                f.sync_data()
            }
            TokenStore::Redis(r) => {
                let key = Self::list_key(r);
                crate::store::redis::blocking_call(r, &[b"RPUSH", key.as_bytes(), &line])
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
        }
    }
}

/// Every token's current version, in the order they were minted (missing file: none).
pub fn list(store: &TokenStore) -> Vec<TokenRecord> {
    let mut tokens = Tokens::load(store)
        .by_digest
        .into_values()
        .collect::<Vec<_>>();
    tokens.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    tokens
}

/// Revoke token `id`, audited as `admin_token.revoked` by `actor` before the file changes (a
/// revocation that cannot be audited is refused, as for keys). Revoking a revoked token
/// writes nothing and returns it as it is. The one implementation behind the CLI and REST.
pub fn revoke(
    store: &TokenStore,
    audit: &AuditLog,
    actor: &str,
    id: &str,
    now: i64,
) -> Result<TokenRecord, TokenError> {
    let current = list(store)
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| TokenError::NotFound(id.to_owned()))?;
    if current.revoked_at.is_some() {
        return Ok(current);
    }
    let revoked = TokenRecord {
        revoked_at: Some(now),
        ..current
    };
    audit
        .append(&[Event::new("admin_token.revoked", actor)
            .with("token_id", revoked.id.clone())
            .with("role", revoked.role.as_str())])
        .map_err(|source| TokenError::Audit {
            path: audit.path().display().to_string(),
            source,
        })?;
    store.append(&revoked).map_err(|source| TokenError::Io {
        path: store.describe(),
        source,
    })?;
    Ok(revoked)
}

/// The loaded token table.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<Digest, TokenRecord>,
}

impl Tokens {
    /// Load the token lines (none: no tokens). Bad lines are skipped with a warning. The
    /// latest line of a token wins unless it would un-revoke it.
    pub fn load(store: &TokenStore) -> Tokens {
        let mut by_digest: HashMap<Digest, TokenRecord> = HashMap::new();
        {
            let lines = store.lines();
            for (i, line) in lines
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                match serde_json::from_str::<TokenRecord>(line) {
                    Ok(r) => match by_digest.entry(r.digest) {
                        std::collections::hash_map::Entry::Occupied(held)
                            if held.get().revoked_at.is_some() => {}
                        std::collections::hash_map::Entry::Occupied(mut held) => {
                            held.insert(r);
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(r);
                        }
                    },
                    Err(e) => tracing::warn!(line = i + 1, error = %e, "admin token line skipped"),
                }
            }
        }
        Tokens { by_digest }
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The record of a presented bearer token that is active at `now`, if any. A revoked or
    /// expired token is refused like an unknown one.
    pub fn authenticate(&self, token: &str, hasher: &Hasher, now: i64) -> Option<&TokenRecord> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return None;
        }
        hasher
            .all_digests(token)
            .find_map(|(v, d)| self.by_digest.get(&d).filter(|r| r.secret_version == v))
            .filter(|r| r.state(now) == TokenState::Active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_load_authenticate_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        let path = TokenStore::File(dir.path().join("tokens.jsonl"));
        let h = Hasher::new(vec![(1, vec![3; 32])]);
        let w = create(&path, &h, Role::Write, None, None, 1).unwrap();
        let f = create(&path, &h, Role::Feed, Some("gw".into()), Some(10), 1).unwrap();
        let text = std::fs::read_to_string(dir.path().join("tokens.jsonl")).unwrap();
        assert!(!text.contains(&w.token) && !text.contains(&f.token));
        let t = Tokens::load(&path);
        assert_eq!(t.authenticate(&w.token, &h, 1).unwrap().role, Role::Write);
        assert_eq!(t.authenticate(&f.token, &h, 9).unwrap().role, Role::Feed);
        assert!(t.authenticate(&f.token, &h, 10).is_none(), "expired");
        assert!(t.authenticate("kgadm_nope", &h, 1).is_none());
        assert!(Role::Write.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Write));
        assert!(!Role::Feed.allows(Role::Read));
        assert!(!Role::Write.allows(Role::Feed));
        assert!(Role::Read.allows(Role::Verify) && Role::Write.allows(Role::Verify));
        assert!(!Role::Verify.allows(Role::Read) && !Role::Feed.allows(Role::Verify));
        assert!(!Role::Write.allows(Role::Redigest));
        for needed in [Role::Read, Role::Write, Role::Feed] {
            assert!(
                !Role::Redigest.allows(needed),
                "redigest can do nothing else"
            );
        }
        assert!(Role::Redigest.allows(Role::Redigest));
    }

    #[test]
    fn revocation_is_final_and_audited_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = TokenStore::File(dir.path().join("tokens.jsonl"));
        let audit = AuditLog::new(dir.path().join("audit.jsonl"));
        let h = Hasher::new(vec![(1, vec![3; 32])]);
        let w = create(&path, &h, Role::Write, None, None, 1).unwrap();
        let r = revoke(&path, &audit, "me", &w.record.id, 5).unwrap();
        assert_eq!(r.state(6), TokenState::Revoked);
        assert!(Tokens::load(&path).authenticate(&w.token, &h, 6).is_none());
        // Idempotent: a second revoke writes nothing, audits nothing.
        revoke(&path, &audit, "me", &w.record.id, 7).unwrap();
        let audit_text = std::fs::read_to_string(audit.path()).unwrap();
        assert_eq!(audit_text.matches("admin_token.revoked").count(), 1);
        // A later line without the revocation (an edit, a restore) does not bring it back.
        path.append(&w.record).unwrap();
        assert!(Tokens::load(&path).authenticate(&w.token, &h, 8).is_none());
        assert_eq!(list(&path).len(), 1);
        assert!(matches!(
            revoke(&path, &audit, "me", "adm_nope", 9),
            Err(TokenError::NotFound(_))
        ));
    }
}
