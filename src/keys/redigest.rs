//! Re-digesting a key under the current hash-secret version: the rule that decides whether a
//! new digest may replace a key's stored one, and the proof a fleet gateway sends with it.
//!
//! After a secret rotation, a key hashed under an old version keeps working (lookup tries every
//! configured version) but pins that version's secret in the config. A gateway that
//! authenticates such a key holds its plaintext for that request, so it can compute the digest
//! under the current version; only the digest, the key id and the versions go on (`redigest`,
//! the gateway's queue). The store then writes a new version of the record whose only changes
//! are `digest` and `secret_version` (`Keys::redigest`), once per key.
//!
//! What the writer can check, having no plaintext: the key exists, is not revoked, is not a
//! canary (a canary never authenticates, so a re-digest of one cannot come from real traffic),
//! is still on the version the caller claims and that version is older than the current one,
//! the target is the current version, the caller knew the digest stored now (in process: the
//! digest the gateway matched; over HTTP: a [`proof`] keyed with the current secret), and the
//! new digest is held by no key (a digest already held would make one key's plaintext
//! authenticate as another key, or collide with a revoked key's digest). It cannot check that
//! the new digest is `HMAC(current secret, plaintext)`: see the module docs of `redigest` for
//! what a compromised gateway can do with that.

use crate::keys::digest::{Digest, Hasher};
use crate::keys::record::KeyRecord;
use hmac::Mac;
use thiserror::Error;

/// The label of the key that signs re-digest proofs (one derived key per secret version, as
/// for record MACs: `Hasher::derive`).
const PROOF_LABEL: &[u8] = b"keygate/v1/redigest-proof";

/// One re-digest request: key `id`, matched under `from_version`, gets `new` made under
/// `to_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redigest {
    pub id: String,
    pub from_version: u32,
    pub to_version: u32,
    pub new: Digest,
    /// How the caller shows it knew the digest stored now.
    pub evidence: Evidence,
}

/// What ties a request to the record version it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// In process (`keygate serve` writing its own store): the digest the key matched.
    Matched(Digest),
    /// Over HTTP (a fleet gateway): [`proof`] over the request and the stored digest.
    Proof([u8; 32]),
}

/// Why a re-digest is not written. Closed: the control plane maps each to a status and code,
/// the gateway each to a metric outcome.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refused {
    #[error("no key with id {0}")]
    NotFound(String),
    #[error("key {0} is revoked; a revoked key is never re-digested (revocation is final)")]
    Revoked(String),
    #[error("key {0} is a canary: it never authenticates, so it is never re-digested")]
    Canary(String),
    #[error("key {id} is already on the current secret version {current}")]
    AlreadyCurrent { id: String, current: u32 },
    #[error("key {id} is on secret version {held}, not {claimed}")]
    VersionMismatch { id: String, held: u32, claimed: u32 },
    #[error("to_version {to} is not the current secret version {current}")]
    NotCurrent { to: u32, current: u32 },
    #[error("the request does not match key {0}'s stored digest (stale, or not made with the current secret)")]
    Stale(String),
    #[error("the new digest of key {0} is already held by a key")]
    DigestInUse(String),
}

/// The proof a fleet gateway sends: HMAC-SHA256, keyed with the `to_version` secret's derived
/// proof key, over the key id, both versions, the digest it matched and the new digest.
/// `None` when no secret of `to_version` is configured.
pub fn proof(
    hasher: &Hasher,
    id: &str,
    from: u32,
    to: u32,
    old: &Digest,
    new: &Digest,
) -> Option<[u8; 32]> {
    let (_, mut mac) = hasher
        .derive(PROOF_LABEL)
        .into_iter()
        .find(|(v, _)| *v == to)?;
    feed(&mut mac, id, from, to, old, new);
    Some(mac.finalize().into_bytes().into())
}

/// Constant-time check of a [`proof`] against the digest stored now.
fn proof_holds(hasher: &Hasher, r: &Redigest, stored: &Digest, tag: &[u8; 32]) -> bool {
    let Some((_, mut mac)) = hasher
        .derive(PROOF_LABEL)
        .into_iter()
        .find(|(v, _)| *v == r.to_version)
    else {
        return false;
    };
    feed(
        &mut mac,
        &r.id,
        r.from_version,
        r.to_version,
        stored,
        &r.new,
    );
    mac.verify_slice(tag).is_ok()
}

fn feed(
    mac: &mut hmac::Hmac<sha2::Sha256>,
    id: &str,
    from: u32,
    to: u32,
    old: &Digest,
    new: &Digest,
) {
    // Length-prefixed id: no two (id, rest) pairs share an encoding.
    mac.update(&(id.len() as u64).to_be_bytes());
    mac.update(id.as_bytes());
    mac.update(&from.to_be_bytes());
    mac.update(&to.to_be_bytes());
    mac.update(&old.0);
    mac.update(&new.0);
}

/// The one rule: may `r` replace the digest of `held` (the key's latest version)? `in_use`
/// says whether a digest is held by any key (any id, revoked ones included). Checks run in
/// this order so a gateway racing another one learns `AlreadyCurrent`, not a refusal.
pub fn check<'a>(
    held: Option<&'a KeyRecord>,
    r: &Redigest,
    hasher: &Hasher,
    in_use: impl Fn(&Digest) -> bool,
) -> Result<&'a KeyRecord, Refused> {
    let held = held.ok_or_else(|| Refused::NotFound(r.id.clone()))?;
    let current = hasher.current_version();
    if held.revoked_at.is_some() {
        return Err(Refused::Revoked(r.id.clone()));
    }
    if held.canary {
        return Err(Refused::Canary(r.id.clone()));
    }
    if held.secret_version == current {
        return Err(Refused::AlreadyCurrent {
            id: r.id.clone(),
            current,
        });
    }
    if held.secret_version != r.from_version {
        return Err(Refused::VersionMismatch {
            id: r.id.clone(),
            held: held.secret_version,
            claimed: r.from_version,
        });
    }
    // Only forwards, and only to the version new keys get.
    if r.to_version != current || r.from_version >= r.to_version {
        return Err(Refused::NotCurrent {
            to: r.to_version,
            current,
        });
    }
    let knows_stored = match &r.evidence {
        Evidence::Matched(d) => *d == held.digest,
        Evidence::Proof(tag) => proof_holds(hasher, r, &held.digest, tag),
    };
    if !knows_stored {
        return Err(Refused::Stale(r.id.clone()));
    }
    if r.new == held.digest || in_use(&r.new) {
        return Err(Refused::DigestInUse(r.id.clone()));
    }
    Ok(held)
}

/// The new version of `held`: the digest and its version, nothing else (the store assigns the
/// revision and signs it).
pub fn apply(held: &KeyRecord, r: &Redigest) -> KeyRecord {
    let mut next = held.clone();
    next.digest = r.new;
    next.secret_version = r.to_version;
    next.written_at_ms = crate::clock::unix_ms();
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::sample;

    fn hashers() -> (Hasher, Hasher) {
        let old = Hasher::new(vec![(1, vec![1; 32])]);
        let both = Hasher::new(vec![(1, vec![1; 32]), (2, vec![2; 32])]);
        (old, both)
    }

    fn request(held: &KeyRecord, h: &Hasher, key: &str) -> Redigest {
        Redigest {
            id: held.id.clone(),
            from_version: 1,
            to_version: 2,
            new: h.digest(key).1,
            evidence: Evidence::Matched(held.digest),
        }
    }

    #[test]
    fn rule_table() {
        let (old, h) = hashers();
        let key = "kg_live_example";
        let mut held = sample("key_a", old.digest(key).1);
        held.secret_version = 1;
        let ok = request(&held, &h, key);
        let none = |_: &Digest| false;
        assert!(check(Some(&held), &ok, &h, none).is_ok());
        let next = apply(&held, &ok);
        assert_eq!((next.secret_version, next.digest), (2, ok.new));
        assert_eq!(
            next.scopes, held.scopes,
            "nothing but digest and version changes"
        );

        let refused =
            |held: Option<&KeyRecord>, r: &Redigest| check(held, r, &h, none).unwrap_err();
        assert!(matches!(refused(None, &ok), Refused::NotFound(_)));
        let mut revoked = held.clone();
        revoked.revoked_at = Some(1);
        assert!(matches!(refused(Some(&revoked), &ok), Refused::Revoked(_)));
        let mut canary = held.clone();
        canary.canary = true;
        assert!(matches!(refused(Some(&canary), &ok), Refused::Canary(_)));
        assert!(matches!(
            refused(Some(&next), &ok),
            Refused::AlreadyCurrent { .. }
        ));
        let wrong_from = Redigest {
            from_version: 3,
            ..ok.clone()
        };
        assert!(matches!(
            refused(Some(&held), &wrong_from),
            Refused::VersionMismatch { .. }
        ));
        let wrong_to = Redigest {
            to_version: 1,
            ..ok.clone()
        };
        assert!(matches!(
            refused(Some(&held), &wrong_to),
            Refused::NotCurrent { .. }
        ));
        let stale = Redigest {
            evidence: Evidence::Matched(Digest([9; 32])),
            ..ok.clone()
        };
        assert!(matches!(refused(Some(&held), &stale), Refused::Stale(_)));
        let same = Redigest {
            new: held.digest,
            ..ok.clone()
        };
        assert!(matches!(
            refused(Some(&held), &same),
            Refused::DigestInUse(_)
        ));
        let taken = check(Some(&held), &ok, &h, |d| *d == ok.new).unwrap_err();
        assert!(matches!(taken, Refused::DigestInUse(_)));
    }

    #[test]
    fn proofs_bind_the_request_and_need_the_current_secret() {
        let (old, h) = hashers();
        let key = "kg_live_example";
        let mut held = sample("key_a", old.digest(key).1);
        held.secret_version = 1;
        let new = h.digest(key).1;
        let tag = proof(&h, "key_a", 1, 2, &held.digest, &new).unwrap();
        let r = Redigest {
            id: "key_a".into(),
            from_version: 1,
            to_version: 2,
            new,
            evidence: Evidence::Proof(tag),
        };
        assert!(check(Some(&held), &r, &h, |_| false).is_ok());
        // Another key's id, another new digest, or a proof made without the v2 secret: refused.
        let other = Redigest {
            id: "key_b".into(),
            ..r.clone()
        };
        let mut held_b = held.clone();
        held_b.id = "key_b".into();
        assert!(matches!(
            check(Some(&held_b), &other, &h, |_| false),
            Err(Refused::Stale(_))
        ));
        let swapped = Redigest {
            new: Digest([5; 32]),
            ..r.clone()
        };
        assert!(matches!(
            check(Some(&held), &swapped, &h, |_| false),
            Err(Refused::Stale(_))
        ));
        let forged = Hasher::new(vec![(1, vec![1; 32]), (2, vec![3; 32])]);
        let bad = proof(&forged, "key_a", 1, 2, &held.digest, &new).unwrap();
        let r_bad = Redigest {
            evidence: Evidence::Proof(bad),
            ..r.clone()
        };
        assert!(matches!(
            check(Some(&held), &r_bad, &h, |_| false),
            Err(Refused::Stale(_))
        ));
        // Once the stored digest changed, an old proof no longer holds.
        let mut moved = held.clone();
        moved.digest = Digest([8; 32]);
        assert!(matches!(
            check(Some(&moved), &r, &h, |_| false),
            Err(Refused::Stale(_))
        ));
        assert!(proof(&old, "key_a", 1, 2, &held.digest, &new).is_none());
    }
}
