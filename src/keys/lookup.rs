//! What a presented key is, in public terms: the one mapping from an authentication result to
//! a state (`live`, `revoked`, `expired`, `not_yet_valid`, `canary`, `unknown`) and the record's
//! public identity. Shared by `keygate scan --check` (local store) and the control plane's
//! `POST /v1/api-keys/lookup`, so both answer the same for the same key. Never the key, never
//! its digest, never why a malformed string failed (it is simply `unknown`).

use crate::keys::compact::{KeyView, Validity as _};
use crate::keys::record::KeyRecord;
use crate::keys::table::{AuthError, KeyTable};
use crate::keys::KeySettings;
use serde_json::{json, Value};

/// The public state of a presented key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LookupState {
    /// Accepted by a gateway now (rotation grace included).
    Live,
    Revoked,
    Expired,
    /// Created with a `not_before` still ahead: it will become live by itself.
    NotYetValid,
    /// A honeytoken: never accepted, and using it raises the alarm.
    Canary,
    /// Not in the store (or not a key of ours at all).
    Unknown,
}

impl LookupState {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupState::Live => "live",
            LookupState::Revoked => "revoked",
            LookupState::Expired => "expired",
            LookupState::NotYetValid => "not_yet_valid",
            LookupState::Canary => "canary",
            LookupState::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<LookupState> {
        [
            LookupState::Live,
            LookupState::Revoked,
            LookupState::Expired,
            LookupState::NotYetValid,
            LookupState::Canary,
            LookupState::Unknown,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// A leaked key in this state can still be used (now or later): it must be revoked.
    pub fn is_exposed(self) -> bool {
        matches!(self, LookupState::Live | LookupState::NotYetValid)
    }
}

/// A key's state and, when the store knows it, its record.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub state: LookupState,
    pub record: Option<KeyView>,
}

impl Lookup {
    /// Map an authentication result. A revoked canary reads as revoked here (the table
    /// reports it as a canary so that it still alarms; someone asking what a found key is
    /// wants to know it no longer works).
    pub fn from_auth(result: Result<KeyView, AuthError>) -> Lookup {
        let (state, record) = match result {
            Ok(r) => (LookupState::Live, Some(r)),
            Err(AuthError::Malformed(_) | AuthError::Unknown | AuthError::Token(_)) => {
                (LookupState::Unknown, None)
            }
            Err(AuthError::Revoked(r)) => (LookupState::Revoked, Some(r)),
            Err(AuthError::Expired(r)) => (LookupState::Expired, Some(r)),
            Err(AuthError::NotYetValid(r)) => (LookupState::NotYetValid, Some(r)),
            Err(AuthError::Canary(r)) if r.revoked_at().is_some() => {
                (LookupState::Revoked, Some(r))
            }
            Err(AuthError::Canary(r)) => (LookupState::Canary, Some(r)),
        };
        Lookup { state, record }
    }

    /// Look `key` up in `table` at `now`, with exact expiry (no leeway: a scan reports what
    /// the record says).
    pub fn find(table: &KeyTable, settings: &KeySettings, key: &str, now: i64) -> Lookup {
        Lookup::from_auth(table.authenticate(key, &settings.format, &settings.hasher, now, 0))
    }

    /// The answer of `POST /v1/api-keys/lookup`: state, plus id, owner, name, env and hint
    /// when the key is known. The table keeps no names or hints: `full` is the key's whole
    /// record where the caller holds one (the control plane's log).
    pub fn to_json(&self, full: Option<&KeyRecord>) -> Value {
        let mut v = json!({ "state": self.state.as_str() });
        if let Some(r) = &self.record {
            v["id"] = r.id.to_string().into();
            v["owner"] = r.owner.to_string().into();
            v["name"] = full.map_or("", |f| f.name.as_str()).into();
            v["env"] = r.env.clone().into();
            v["hint"] = full.map(KeyRecord::shown_hint).unwrap_or_default().into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    #[test]
    fn every_auth_outcome_maps_to_one_state() {
        let r = KeyView::of(&sample("key_a", Digest([1; 32])));
        let mut canary = sample("key_c", Digest([2; 32]));
        canary.canary = true;
        let mut revoked_canary = canary.clone();
        revoked_canary.revoked_at = Some(5);
        let cases = [
            (Ok(r.clone()), LookupState::Live),
            (Err(AuthError::Unknown), LookupState::Unknown),
            (
                Err(AuthError::Malformed(
                    crate::keys::format::FormatError::TooLong,
                )),
                LookupState::Unknown,
            ),
            (Err(AuthError::Revoked(r.clone())), LookupState::Revoked),
            (Err(AuthError::Expired(r.clone())), LookupState::Expired),
            (
                Err(AuthError::NotYetValid(r.clone())),
                LookupState::NotYetValid,
            ),
            (
                Err(AuthError::Canary(KeyView::of(&canary))),
                LookupState::Canary,
            ),
            (
                Err(AuthError::Canary(KeyView::of(&revoked_canary))),
                LookupState::Revoked,
            ),
        ];
        for (result, want) in cases {
            let l = Lookup::from_auth(result);
            assert_eq!(l.state, want);
            assert_eq!(LookupState::parse(want.as_str()), Some(want));
            let v = l.to_json(None);
            assert_eq!(v["state"], want.as_str());
            assert!(v.get("digest").is_none());
        }
        assert!(LookupState::NotYetValid.is_exposed() && !LookupState::Canary.is_exposed());
    }
}
