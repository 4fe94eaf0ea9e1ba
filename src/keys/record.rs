//! A key record: one version of one key's metadata, as stored in the record log.
//!
//! The log holds versions; the latest `rev` of an `id` wins. A record never holds the key
//! itself, only its digest, and nothing that prints records (CLI, API, logs) prints the digest.

use crate::keys::digest::Digest;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lifecycle state at a given instant, derived from the record and the clock.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Active,
    Expired,
    Revoked,
    Canary,
    /// Created with a `not_before` in the future.
    Pending,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
            KeyState::Canary => "canary",
            KeyState::Pending => "pending",
        }
    }
}

/// One version of a key. Times are Unix seconds (UTC) unless the name says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Store revision at which this version was written (assigned by the store on append).
    pub rev: u64,
    /// Public identifier, `key_` + base32; safe to log and to show.
    pub id: String,
    pub digest: Digest,
    pub secret_version: u32,
    pub name: String,
    #[serde(default)]
    pub owner: String,
    pub env: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Own rate, e.g. `"50/s"`, overriding the plan's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Own calendar quota, e.g. `"100000/month"`, overriding the plan's (needs `[redis]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `<prefix>_<env>_…last4` (`…last4` for an imported key), for humans matching a key they
    /// hold to a record. Shown through [`KeyRecord::shown_hint`] only.
    pub hint: String,
    pub created_at: i64,
    /// Wall-clock milliseconds when this version was written; feeds the propagation histogram.
    pub written_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_reason: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// Browser-safe key (`<prefix>_pub_<env>_…`): accepted only with an `Origin` it lists,
    /// on routes that declare `publishable = true` (`authz::authorize`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publishable: bool,
    /// Migrated from another gateway: not in our format, accepted by digest alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
    /// On the old key of a rotation: when it started, what an abort restores, and the
    /// self-completion rule (`keys::rotation`). Cleared by an abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// The id of the first key in this rotation chain: rate-limit buckets belong to it, so a
    /// rotation does not double a caller's budget during the grace window.
    pub lineage: String,
    /// HMAC over this version, its revision and its log (`store::seal`). Absent only in a
    /// legacy store written before records were signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<crate::store::seal::Tag>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A rotation, recorded on the key being replaced (the one with `rotated_to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// Unix seconds when the successor was minted.
    pub started_at: i64,
    /// The old key's expiry before the grace shortened it (`None`: it had none); an abort
    /// restores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_expires_at: Option<i64>,
    /// Revoke the old key once the successor has been used and the old key has been quiet
    /// this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_when_idle_secs: Option<i64>,
    /// The old key's request count (usage data) when the rotation started, so that "requests
    /// since rotation" can be told apart from its lifetime total.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests_at_start: u64,
    /// When the rotation completed by itself (the old key was revoked then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
}

impl KeyRecord {
    /// State at `now`. Revoked beats canary beats time-based states: a revoked canary is
    /// reported as revoked, which is what an operator who revoked it expects to see.
    pub fn state(&self, now: i64) -> KeyState {
        state_at(
            self.revoked_at,
            self.canary,
            self.expires_at,
            self.not_before,
            now,
        )
    }

    /// The hint as it may be shown (listings, the API, audit events): an imported key's is cut
    /// to its last four characters, whatever an older version stored (review 134: the stored
    /// hint of an imported key could hold a secret head, or the whole key). Keys we minted
    /// have hints of our format, public head and last four, shown as stored.
    pub fn shown_hint(&self) -> String {
        if self.imported {
            crate::keys::format::imported_hint_of_stored(&self.hint)
        } else {
            self.hint.clone()
        }
    }

    /// The JSON a human or API client may see: everything except the digest and MAC, with the
    /// hint as [`KeyRecord::shown_hint`] shows it.
    pub fn public_json(&self, now: i64) -> serde_json::Value {
        let mut v = public_json(self, &["digest", "mac"], self.state(now).as_str());
        if let Some(obj) = v.as_object_mut() {
            obj.insert("hint".into(), self.shown_hint().into());
        }
        v
    }
}

/// Whether a key with this revocation stamp is revoked: from the moment the revocation is
/// held, whatever the stamp says. The stamp is the writer's clock; read as "revoked from
/// then", a gateway whose clock is behind the writer's served a revoked key until its own
/// clock caught up (a control plane 10 minutes ahead: 10 minutes). Nothing writes a
/// revocation meant for later (a rotation's old key ends by `expires_at`). The one place
/// this rule lives: the state, the gateway's decision and a token's parent all ask it.
pub fn is_revoked(revoked_at: Option<i64>) -> bool {
    revoked_at.is_some()
}

/// The state rule, shared by records and the gateway's compact entries (`keys::compact`).
pub fn state_at(
    revoked_at: Option<i64>,
    canary: bool,
    expires_at: Option<i64>,
    not_before: Option<i64>,
    now: i64,
) -> KeyState {
    if is_revoked(revoked_at) {
        KeyState::Revoked
    } else if canary {
        KeyState::Canary
    } else if expires_at.is_some_and(|t| t <= now) {
        KeyState::Expired
    } else if not_before.is_some_and(|t| t > now) {
        KeyState::Pending
    } else {
        KeyState::Active
    }
}

/// `value` as JSON without its `hidden` fields (digests, MACs: never shown) and with its
/// `state`: what listings of keys and admin tokens print.
pub fn public_json(value: &impl Serialize, hidden: &[&str], state: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = v.as_object_mut() {
        for field in hidden {
            obj.remove(*field);
        }
        obj.insert("state".into(), state.into());
    }
    v
}

/// Revocation is final: `next` would be a version of a key whose version `held` is revoked,
/// without the revocation. No operation un-revokes a key, so such a version comes from an old
/// backup, an edited file or a confused source. Writers refuse to write it (`store::file`);
/// every reader keeps the revocation instead (`sync::apply`). The one place this rule lives.
pub fn unrevokes(held: Option<&KeyRecord>, next: &KeyRecord) -> bool {
    !is_revoked(next.revoked_at) && held.is_some_and(|h| is_revoked(h.revoked_at))
}

/// A fresh public id: `key_` + 26 chars of Crockford-free lowercase base32 (130 bits).
pub fn new_id(prefix: &str) -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(format_id(prefix, &bytes))
}

/// `prefix` + `_` + the 26-character base32 form of 16 bytes (the binary form the gateway's
/// table keeps, `keys::compact::id_bytes`, is its inverse).
pub fn format_id(prefix: &str, bytes: &[u8; 16]) -> String {
    const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(prefix.len() + 27);
    out.push_str(prefix);
    out.push('_');
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(B32[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(B32[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

#[cfg(test)]
pub(crate) fn sample(id: &str, digest: Digest) -> KeyRecord {
    KeyRecord {
        rev: 0,
        id: id.to_owned(),
        digest,
        secret_version: 1,
        name: "sample".into(),
        owner: "team".into(),
        env: "live".into(),
        scopes: vec!["invoices:read".into()],
        plan: None,
        rate: None,
        quota: None,
        allow_ips: vec![],
        allow_origins: vec![],
        labels: BTreeMap::new(),
        hint: "kg_live_…abcd".into(),
        created_at: 1_000,
        written_at_ms: 1_000_000,
        not_before: None,
        expires_at: None,
        revoked_at: None,
        revoked_reason: None,
        canary: false,
        publishable: false,
        imported: false,
        rotated_from: None,
        rotated_to: None,
        rotation: None,
        lineage: id.to_owned(),
        mac: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_precedence() {
        let mut r = sample("key_a", Digest([1; 32]));
        assert_eq!(r.state(2_000), KeyState::Active);
        r.not_before = Some(3_000);
        assert_eq!(r.state(2_000), KeyState::Pending);
        r.expires_at = Some(1_500);
        assert_eq!(r.state(2_000), KeyState::Expired);
        r.canary = true;
        assert_eq!(r.state(2_000), KeyState::Canary);
        r.revoked_at = Some(1_900);
        assert_eq!(r.state(2_000), KeyState::Revoked);
        assert_eq!(
            r.state(1_800),
            KeyState::Revoked,
            "revoked once held, whatever the stamp's clock said"
        );
    }

    #[test]
    fn public_json_never_has_digest_and_round_trip_is_exact() {
        let r = sample("key_a", Digest([7; 32]));
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<KeyRecord>(&line).unwrap(), r);
        let public = r.public_json(2_000).to_string();
        assert!(!public.contains(&Digest([7; 32]).to_hex()));
        assert!(public.contains("\"state\":\"active\""));
    }

    /// Review 134 defect 2, records already stored: an imported key's hint written by an older
    /// version could hold the key's head (`hint("abcdefghij_kl_mn")` stored
    /// `abcdefghij_kl_…l_mn`). Every place that shows a record shows its last four only; the
    /// hints of keys we minted are shown as stored.
    #[test]
    fn a_stored_hint_of_an_imported_key_is_shown_as_its_last_four() {
        let mut r = sample("key_a", Digest([7; 32]));
        r.imported = true;
        for (stored, shown) in [
            ("abcdefghij_kl_…l_mn", "…l_mn"),
            ("sk_live_…p7dc", "…p7dc"),
            ("…7890", "…7890"),
            ("no-ellipsis-at-all", "…-all"),
            ("", "…"),
        ] {
            r.hint = stored.into();
            assert_eq!(r.shown_hint(), shown, "{stored}");
            assert_eq!(r.public_json(2_000)["hint"], shown, "{stored}");
            let event = crate::audit::Event::new("key.updated", "t").key(&r);
            assert_eq!(event.hint.as_deref(), Some(shown), "{stored}");
            let text = serde_json::to_string(&event).unwrap();
            assert!(
                stored.is_empty() || stored == shown || !text.contains(stored),
                "{text}"
            );
        }
        let ours = sample("key_b", Digest([8; 32]));
        assert_eq!(ours.public_json(2_000)["hint"], "kg_live_…abcd");
        assert_eq!(
            crate::audit::Event::new("e", "t")
                .key(&ours)
                .hint
                .as_deref(),
            Some("kg_live_…abcd")
        );
    }

    #[test]
    fn ids_are_unique_and_shaped() {
        let a = new_id("key").unwrap();
        let b = new_id("key").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 26);
        assert!(a[4..]
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
    }
}
