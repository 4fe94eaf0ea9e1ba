//! Key digests: `HMAC-SHA256(hash_secret, key)`, with versioned secrets.
//!
//! Only digests are stored, so a leaked store file cannot even confirm a guessed key without
//! the server secret (a pepper held outside the store). Secrets carry a version; a record
//! remembers the version its digest was made with and lookup tries every configured version,
//! so the secret can be rotated without invalidating every key at once.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use std::fmt;

/// Shorter secrets are refused at startup: HMAC keys should carry at least the hash's
/// security level (RFC 2104 §3).
pub const MIN_SECRET_LEN: usize = 32;

/// An HMAC-SHA256 digest of a key. Debug prints nothing secret-adjacent.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest(..)")
    }
}

impl Digest {
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Digest(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("digest must be 64 lowercase hex chars"))
    }
}

/// The configured secrets, newest first. New digests use the newest version.
#[derive(Clone)]
pub struct Hasher {
    // Pre-keyed MAC states: cloning one is cheaper than re-deriving the HMAC pads per request.
    versions: Vec<(u32, Hmac<Sha256>)>,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<u32> = self.versions.iter().map(|(v, _)| *v).collect();
        f.debug_struct("Hasher")
            .field("versions", &versions)
            .finish()
    }
}

impl Hasher {
    /// `secrets` are (version, bytes); the caller has checked lengths and uniqueness.
    pub fn new(mut secrets: Vec<(u32, Vec<u8>)>) -> Hasher {
        secrets.sort_by_key(|s| std::cmp::Reverse(s.0));
        let versions = secrets
            .into_iter()
            .filter_map(|(v, bytes)| Hmac::<Sha256>::new_from_slice(&bytes).ok().map(|m| (v, m)))
            .collect();
        Hasher { versions }
    }

    /// The version new digests are made with.
    pub fn current_version(&self) -> u32 {
        self.versions.first().map(|(v, _)| *v).unwrap_or(0)
    }

    /// The configured versions, newest first.
    pub fn versions(&self) -> Vec<u32> {
        self.versions.iter().map(|(v, _)| *v).collect()
    }

    /// Whether a secret of this version is configured (keys hashed under any other version
    /// can never authenticate).
    pub fn has_version(&self, version: u32) -> bool {
        self.versions.iter().any(|(v, _)| *v == version)
    }

    /// Digest with the current secret.
    pub fn digest(&self, key: &str) -> (u32, Digest) {
        match self.versions.first() {
            Some((v, mac)) => (*v, run(mac, key)),
            None => (0, Digest([0; 32])),
        }
    }

    /// Every configured version's digest of `key`, newest first (lookup tries each).
    pub fn all_digests<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (u32, Digest)> + 'a {
        self.versions
            .iter()
            .map(move |(v, mac)| (*v, run(mac, key)))
    }
}

impl Hasher {
    /// Keys for other uses, one per secret version: `HMAC(secret_v, label)`. Keeps every use
    /// of the secret under its own key (see `store::seal`).
    pub fn derive(&self, label: &[u8]) -> Vec<(u32, Hmac<Sha256>)> {
        self.versions
            .iter()
            .filter_map(|(v, mac)| {
                let mut m = mac.clone();
                m.update(label);
                let key: [u8; 32] = m.finalize().into_bytes().into();
                Hmac::<Sha256>::new_from_slice(&key).ok().map(|k| (*v, k))
            })
            .collect()
    }
}

fn run(mac: &Hmac<Sha256>, key: &str) -> Digest {
    let mut mac = mac.clone();
    mac.update(key.as_bytes());
    Digest(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc4231_test_case_2_shape_and_versions_differ() {
        // RFC 4231 test case 2 uses a short key; we only check HMAC plumbing here.
        let h = Hasher::new(vec![(1, b"Jefe".to_vec())]);
        let (v, d) = h.digest("what do ya want for nothing?");
        assert_eq!(v, 1);
        assert_eq!(
            d.to_hex(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );

        let h2 = Hasher::new(vec![(1, vec![1; 32]), (2, vec![2; 32])]);
        assert_eq!(h2.current_version(), 2);
        let all: Vec<_> = h2.all_digests("k").collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, 2);
        assert_ne!(all[0].1, all[1].1);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let d = Digest([0xab; 32]);
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
        assert_eq!(Digest::from_hex(&"AB".repeat(32)), None);
        assert_eq!(format!("{d:?}"), "Digest(..)");
    }
}
