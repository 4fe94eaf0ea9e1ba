//! The signing keys of short-lived tokens: a JSON file of Ed25519 private keys (PKCS#8),
//! written only by `keygate tokens keygen` / `keygate tokens rotate` and read by whoever mints
//! (the control plane; a gateway only with `[tokens] issue = true`).
//!
//! One key is current (it signs); keys it replaced stay in the file, and in the published
//! JWKS, until every token they signed has expired (`retired_at + max_ttl`), so a rotation
//! never cuts an in-flight token short. Key ids are RFC 7638 JWK thumbprints, so a kid names
//! exactly one public key. The file holds secrets: it is created mode 0600 and never logged.

use super::jwt::{b64url_decode, b64url_encode};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("token signing keys {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token signing keys {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("token signing keys {} already exist: use `keygate tokens rotate`", .0.display())]
    Exists(PathBuf),
    #[error("cannot generate an Ed25519 key")]
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    kid: String,
    created_at: i64,
    /// When it stopped signing; None for the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired_at: Option<i64>,
    /// PKCS#8 v2 document, base64url.
    pkcs8: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

/// The loaded keys: the current one signs, all are published.
pub struct SigningKeys {
    current: String,
    pairs: HashMap<String, Ed25519KeyPair>,
    /// kid → created/retired, for listings.
    meta: Vec<(String, i64, Option<i64>)>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key (members in lexicographic order).
pub fn thumbprint(public: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        b64url_encode(public)
    );
    b64url_encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

/// One public key as a JWK (RFC 8037 §2).
pub fn jwk(kid: &str, public: &[u8]) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(public), "kid": kid, "alg": "EdDSA", "use": "sig"})
}

impl SigningKeys {
    pub fn load(path: &Path) -> Result<SigningKeys, SigningError> {
        let file = read(path)?;
        Self::from_file(path, &file)
    }

    fn from_file(path: &Path, file: &KeyFile) -> Result<SigningKeys, SigningError> {
        let invalid = |message: String| SigningError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut pairs = HashMap::new();
        let mut current = None;
        for k in &file.keys {
            let doc = b64url_decode(&k.pkcs8)
                .map_err(|_| invalid(format!("key {}: pkcs8 is not base64url", k.kid)))?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&doc)
                .map_err(|_| invalid(format!("key {}: not an Ed25519 PKCS#8 key", k.kid)))?;
            if thumbprint(pair.public_key().as_ref()) != k.kid {
                return Err(invalid(format!(
                    "key {}: kid is not its key's thumbprint",
                    k.kid
                )));
            }
            if k.retired_at.is_none() && current.replace(k.kid.clone()).is_some() {
                return Err(invalid("more than one current key".into()));
            }
            pairs.insert(k.kid.clone(), pair);
        }
        let current = current.ok_or_else(|| invalid("no current key".into()))?;
        Ok(SigningKeys {
            current,
            pairs,
            meta: file
                .keys
                .iter()
                .map(|k| (k.kid.clone(), k.created_at, k.retired_at))
                .collect(),
        })
    }

    /// The kid and key that sign new tokens.
    pub fn current(&self) -> Option<(&str, &Ed25519KeyPair)> {
        self.pairs
            .get(&self.current)
            .map(|p| (self.current.as_str(), p))
    }

    /// Every key's public half, by kid (what a gateway holding only public keys gets).
    pub fn public_keys(&self) -> HashMap<String, [u8; 32]> {
        self.pairs
            .iter()
            .filter_map(|(kid, p)| Some((kid.clone(), p.public_key().as_ref().try_into().ok()?)))
            .collect()
    }

    /// The JWKS (RFC 7517 §5) of every key in the file, current first.
    pub fn jwks(&self) -> Value {
        let mut keys: Vec<Value> = Vec::new();
        for (kid, _, _) in std::iter::once(&(self.current.clone(), 0, None))
            .chain(self.meta.iter().filter(|m| m.0 != self.current))
        {
            if let Some(p) = self.pairs.get(kid) {
                keys.push(jwk(kid, p.public_key().as_ref()));
            }
        }
        json!({ "keys": keys })
    }

    /// (kid, created_at, retired_at) of every key, oldest first.
    pub fn list(&self) -> &[(String, i64, Option<i64>)] {
        &self.meta
    }
}

fn read(path: &Path) -> Result<KeyFile, SigningError> {
    let bytes = std::fs::read(path).map_err(|source| SigningError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| SigningError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn generate(now: i64) -> Result<StoredKey, SigningError> {
    let doc =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| SigningError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| SigningError::Random)?;
    Ok(StoredKey {
        kid: thumbprint(pair.public_key().as_ref()),
        created_at: now,
        retired_at: None,
        pkcs8: b64url_encode(doc.as_ref()),
    })
}

/// Write the file whole (atomic replace), owner-only: it holds private keys.
fn write(path: &Path, file: &KeyFile) -> Result<(), SigningError> {
    let io = |source| SigningError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(file).map_err(|e| io(std::io::Error::other(e)))?;
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
    }
    crate::store::file::write_atomic(path, &bytes).map_err(io)
}

/// `keygate tokens keygen`: a new file with one current key; refuses to replace a file.
pub fn keygen(path: &Path, now: i64) -> Result<String, SigningError> {
    if path.exists() {
        return Err(SigningError::Exists(path.to_owned()));
    }
    let key = generate(now)?;
    let kid = key.kid.clone();
    write(path, &KeyFile { keys: vec![key] })?;
    Ok(kid)
}

/// `keygate tokens rotate`: a new current key; the old one retires now and stays published
/// for `max_ttl_secs` (its tokens live at most that long); keys retired longer ago than that
/// are dropped. Returns (new kid, dropped kids).
pub fn rotate(
    path: &Path,
    max_ttl_secs: i64,
    now: i64,
) -> Result<(String, Vec<String>), SigningError> {
    let mut file = read(path)?;
    SigningKeys::from_file(path, &file)?;
    for k in file.keys.iter_mut().filter(|k| k.retired_at.is_none()) {
        k.retired_at = Some(now);
    }
    let (kept, dropped): (Vec<StoredKey>, Vec<StoredKey>) = file.keys.into_iter().partition(|k| {
        k.retired_at
            .is_some_and(|t| still_published(t, max_ttl_secs, now))
    });
    let key = generate(now)?;
    let kid = key.kid.clone();
    file.keys = kept;
    file.keys.push(key);
    write(path, &file)?;
    Ok((kid, dropped.into_iter().map(|k| k.kid).collect()))
}

/// A key retired at `retired_at` may still have live tokens (plus a minute of clock skew).
fn still_published(retired_at: i64, max_ttl_secs: i64, now: i64) -> bool {
    retired_at + max_ttl_secs + 60 > now
}

/// Parse a JWKS document into kid → Ed25519 public key. Entries of other key types are
/// skipped (a shared JWKS may publish them); a malformed Ed25519 entry fails the whole set,
/// so a broken publication never half-replaces the keys a gateway holds.
pub fn parse_jwks(bytes: &[u8]) -> Result<HashMap<String, [u8; 32]>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let mut out = HashMap::new();
    for k in keys {
        if k.get("kty").and_then(Value::as_str) != Some("OKP")
            || k.get("crv").and_then(Value::as_str) != Some("Ed25519")
        {
            continue;
        }
        let kid = k
            .get("kid")
            .and_then(Value::as_str)
            .ok_or("an Ed25519 JWK without kid")?;
        let x = k
            .get("x")
            .and_then(Value::as_str)
            .and_then(|x| b64url_decode(x).ok())
            .and_then(|x| <[u8; 32]>::try_from(x).ok())
            .ok_or_else(|| format!("JWK {kid}: x is not a 32-byte base64url key"))?;
        out.insert(kid.to_owned(), x);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keygen_rotate_and_retirement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        let k1 = keygen(&path, 1000).unwrap();
        assert!(matches!(keygen(&path, 1000), Err(SigningError::Exists(_))));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (k2, dropped) = rotate(&path, 900, 2000).unwrap();
        assert!(dropped.is_empty());
        let keys = SigningKeys::load(&path).unwrap();
        assert_eq!(keys.current().unwrap().0, k2);
        let published = parse_jwks(keys.jwks().to_string().as_bytes()).unwrap();
        assert!(published.contains_key(&k1) && published.contains_key(&k2));
        assert_eq!(published, keys.public_keys());
        // k1 retired at 2000: its tokens are gone after 2000 + 900 (+ 60 s of skew).
        let (k3, dropped) = rotate(&path, 900, 2961).unwrap();
        assert_eq!(dropped, vec![k1.clone()]);
        let keys = SigningKeys::load(&path).unwrap();
        assert_eq!(keys.current().unwrap().0, k3);
        assert!(keys.public_keys().contains_key(&k2));
        assert!(!keys.public_keys().contains_key(&k1));
    }

    #[test]
    fn jwks_parsing_is_strict_about_ed25519_entries() {
        assert!(parse_jwks(br#"{"keys":[{"kty":"RSA","n":"x"}]}"#)
            .unwrap()
            .is_empty());
        assert!(
            parse_jwks(br#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"a","x":"AA"}]}"#).is_err()
        );
        assert!(parse_jwks(b"[]").is_err());
    }
}
