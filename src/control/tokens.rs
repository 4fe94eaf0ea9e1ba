//! Admin tokens for the control plane: minted once by the CLI, stored only as HMAC digests
//! (same server secret as keys) in a JSON-lines file, each with a role.
//!
//! Roles: `read` (GET the API), `write` (read + every mutation), `feed` (the gateway feed and
//! usage reports). Lookup is by digest, which a caller cannot steer, so a map lookup leaks
//! nothing about stored tokens through timing (the same argument as for API keys).

use crate::keys::digest::{Digest, Hasher};
use crate::keys::record::new_id;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Read,
    Write,
    Feed,
}

impl Role {
    /// Whether a token of this role may do what `needed` requires.
    pub fn allows(self, needed: Role) -> bool {
        self == needed || (self == Role::Write && needed == Role::Read)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Feed => "feed",
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
    path: &Path,
    hasher: &Hasher,
    role: Role,
    name: Option<String>,
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
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut line = serde_json::to_vec(&record)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()?;
    Ok(MintedToken { record, token })
}

/// The loaded token table.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<Digest, TokenRecord>,
}

impl Tokens {
    /// Load `path` (missing file: no tokens). Bad lines are skipped with a warning.
    pub fn load(path: &PathBuf) -> Tokens {
        let mut by_digest = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                match serde_json::from_str::<TokenRecord>(line) {
                    Ok(r) => {
                        by_digest.insert(r.digest, r);
                    }
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

    /// The token record for a presented bearer token, if any.
    pub fn authenticate(&self, token: &str, hasher: &Hasher) -> Option<&TokenRecord> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return None;
        }
        hasher
            .all_digests(token)
            .find_map(|(v, d)| self.by_digest.get(&d).filter(|r| r.secret_version == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_load_authenticate_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.jsonl");
        let h = Hasher::new(vec![(1, vec![3; 32])]);
        let w = create(&path, &h, Role::Write, None, 1).unwrap();
        let f = create(&path, &h, Role::Feed, Some("gw".into()), 1).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&w.token) && !text.contains(&f.token));
        let t = Tokens::load(&path);
        assert_eq!(t.authenticate(&w.token, &h).unwrap().role, Role::Write);
        assert_eq!(t.authenticate(&f.token, &h).unwrap().role, Role::Feed);
        assert!(t.authenticate("kgadm_nope", &h).is_none());
        assert!(Role::Write.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Write));
        assert!(!Role::Feed.allows(Role::Read));
        assert!(!Role::Write.allows(Role::Feed));
    }
}
