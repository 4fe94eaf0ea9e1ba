//! Rotation that finishes itself: the rules that decide when a rotation is complete, what
//! `keys show` and the API report about one in progress, and which rotation events a record
//! version carries (for metrics). Pure functions over records and usage data; the writes
//! (complete, abort) live in `keys::ops`, the periodic runners in `keygate serve` (single
//! node) and `keygate control` (fleet), where usage from every node is known.
//!
//! Usage data is cumulative per key (`usage::Used`: every node adds its counts every touch
//! interval, feed gateways through their reports to the control plane), so it can lag by
//! one flush: a use of the old key
//! in the last touch interval may not be seen yet. Idle windows are meant to be hours, far
//! longer than that interval; the README says so.

use crate::keys::record::{KeyRecord, KeyState};
use crate::usage::Used;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A rotation change that one record version makes, compared with the version it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationEvent {
    Started,
    /// Completed by itself; seconds from start to completion.
    Completed(i64),
    Aborted,
}

impl RotationEvent {
    /// The metric label (`keygate_key_rotations_total{event}`).
    pub fn as_str(self) -> &'static str {
        match self {
            RotationEvent::Started => "started",
            RotationEvent::Completed(_) => "completed",
            RotationEvent::Aborted => "aborted",
        }
    }
}

/// What `next` does to the rotation that `held` (the version it replaces) carried.
pub fn event(held: Option<&KeyRecord>, next: &KeyRecord) -> Option<RotationEvent> {
    let before = held.and_then(|h| h.rotation.as_ref());
    match (before, next.rotation.as_ref()) {
        (None, Some(_)) => Some(RotationEvent::Started),
        (Some(b), Some(n)) if b.completed_at.is_none() => n
            .completed_at
            .map(|done| RotationEvent::Completed((done - n.started_at).max(0))),
        (Some(b), None) if b.completed_at.is_none() => Some(RotationEvent::Aborted),
        _ => None,
    }
}

/// Whether the rotation from `old` to `successor` may complete at `now`: it asked to
/// (`--complete-when-idle`), is still open, the successor is active and has forwarded
/// requests (health gate: clients moved to it and it works), and the old key has been quiet
/// for the idle window (since its last use or the rotation's start, whichever is later).
pub fn ready_to_complete(
    old: &KeyRecord,
    successor: &KeyRecord,
    usage: &BTreeMap<String, Used>,
    now: i64,
) -> bool {
    let Some(rot) = &old.rotation else {
        return false;
    };
    let Some(idle) = rot.complete_when_idle_secs else {
        return false;
    };
    let open = rot.completed_at.is_none()
        && old.revoked_at.is_none()
        && old.rotated_to.as_deref() == Some(successor.id.as_str());
    let successor_used = successor.state(now) == KeyState::Active
        && usage.get(&successor.id).is_some_and(|u| u.requests > 0);
    let old_last = usage.get(&old.id).map_or(0, |u| u.last_used);
    let quiet_since = old_last.max(rot.started_at);
    open && successor_used && now - quiet_since >= idle
}

/// Rotations that may complete by themselves one day, as (old key, successor), from an
/// in-memory view of the records (the gateway's table, the control plane's feed state):
/// the cheap scan that decides whether usage must be read and the store locked at all.
pub fn open_idle_rotations(records: &[Arc<KeyRecord>]) -> Vec<(Arc<KeyRecord>, Arc<KeyRecord>)> {
    let open: Vec<&Arc<KeyRecord>> = records
        .iter()
        .filter(|r| {
            r.revoked_at.is_none()
                && r.rotated_to.is_some()
                && r.rotation.as_ref().is_some_and(|x| {
                    x.complete_when_idle_secs.is_some() && x.completed_at.is_none()
                })
        })
        .collect();
    if open.is_empty() {
        return vec![];
    }
    let wanted: HashMap<&str, &Arc<KeyRecord>> = open
        .iter()
        .filter_map(|old| Some((old.rotated_to.as_deref()?, *old)))
        .collect();
    records
        .iter()
        .filter_map(|r| Some(((*wanted.get(r.id.as_str())?).clone(), r.clone())))
        .collect()
}

/// The rotation `r` takes part in, as (old key, successor), from the latest versions: `r` is
/// the old key of a recorded rotation or the successor named by one.
pub fn of<'a>(
    latest: &'a HashMap<String, KeyRecord>,
    r: &'a KeyRecord,
) -> Option<(&'a KeyRecord, &'a KeyRecord)> {
    if r.rotation.is_some() {
        let successor = latest.get(r.rotated_to.as_deref()?)?;
        return Some((r, successor));
    }
    let old = latest.get(r.rotated_from.as_deref()?)?;
    (old.rotation.is_some() && old.rotated_to.as_deref() == Some(r.id.as_str())).then_some((old, r))
}

/// The traffic report shown during (and after) a rotation: last use and requests since the
/// rotation started, for the old key and the successor separately.
pub fn report(
    old: &KeyRecord,
    successor: &KeyRecord,
    usage: &BTreeMap<String, Used>,
) -> serde_json::Value {
    let Some(rot) = &old.rotation else {
        return serde_json::Value::Null;
    };
    let side = |r: &KeyRecord, baseline: u64| {
        let u = usage.get(&r.id).copied().unwrap_or_default();
        serde_json::json!({
            "id": r.id,
            // A use before the rotation is not "seen during the rotation".
            "last_used": (u.last_used >= rot.started_at).then_some(u.last_used),
            // Saturating: a usage file replaced or a Redis emptied since the rotation
            // started can make the baseline the larger.
            "requests_since_rotation": u.requests.saturating_sub(baseline),
        })
    };
    let state = match (rot.completed_at, old.revoked_at) {
        (Some(_), _) => "completed",
        (None, Some(_)) => "old_key_revoked",
        (None, None) => "in_progress",
    };
    serde_json::json!({
        "state": state,
        "started_at": rot.started_at,
        "complete_when_idle_secs": rot.complete_when_idle_secs,
        "completed_at": rot.completed_at,
        "old": side(old, rot.requests_at_start),
        "new": side(successor, 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::{sample, Rotation};

    fn pair() -> (KeyRecord, KeyRecord) {
        let mut old = sample("key_old", Digest([1; 32]));
        let mut new = sample("key_new", Digest([2; 32]));
        old.rotated_to = Some("key_new".into());
        old.rotation = Some(Rotation {
            started_at: 1_000,
            prior_expires_at: None,
            complete_when_idle_secs: Some(60),
            requests_at_start: 5,
            completed_at: None,
        });
        new.rotated_from = Some("key_old".into());
        (old, new)
    }

    fn used(entries: &[(&str, i64, u64)]) -> BTreeMap<String, Used> {
        entries
            .iter()
            .map(|(id, last_used, requests)| {
                (
                    (*id).to_owned(),
                    Used {
                        last_used: *last_used,
                        requests: *requests,
                        ..Used::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn completes_only_when_the_successor_was_used_and_the_old_key_is_quiet() {
        let (old, new) = pair();
        let both = used(&[("key_old", 1_030, 9), ("key_new", 1_040, 3)]);
        // Quiet since 1_030: 60 s later, not before.
        assert!(!ready_to_complete(&old, &new, &both, 1_089));
        assert!(ready_to_complete(&old, &new, &both, 1_090));
        // Never used since the start: quiet since the start.
        let only_new = used(&[("key_new", 1_040, 3)]);
        assert!(ready_to_complete(&old, &new, &only_new, 1_060));
        // The successor never used: never (the health gate).
        assert!(!ready_to_complete(&old, &new, &used(&[]), 9_999));
        // A revoked successor, a completed or revoked old key, no idle rule: never.
        let mut bad_new = new.clone();
        bad_new.revoked_at = Some(1_050);
        assert!(!ready_to_complete(&old, &bad_new, &both, 9_999));
        let mut done = old.clone();
        done.revoked_at = Some(1_100);
        assert!(!ready_to_complete(&done, &new, &both, 9_999));
        let mut manual = old.clone();
        manual.rotation.as_mut().unwrap().complete_when_idle_secs = None;
        assert!(!ready_to_complete(&manual, &new, &both, 9_999));
        let records = [Arc::new(old.clone()), Arc::new(new.clone())];
        let open = open_idle_rotations(&records);
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].0.id.as_str(), open[0].1.id.as_str()),
            ("key_old", "key_new")
        );
        assert!(open_idle_rotations(&[Arc::new(done), Arc::new(new.clone())]).is_empty());
        assert!(open_idle_rotations(&[Arc::new(manual), Arc::new(new)]).is_empty());
    }

    #[test]
    fn events_and_report() {
        let (old, new) = pair();
        let mut before = old.clone();
        before.rotation = None;
        assert_eq!(event(Some(&before), &old), Some(RotationEvent::Started));
        assert_eq!(event(None, &new), None);
        let mut done = old.clone();
        done.rotation.as_mut().unwrap().completed_at = Some(1_300);
        assert_eq!(
            event(Some(&old), &done),
            Some(RotationEvent::Completed(300))
        );
        assert_eq!(event(Some(&done), &done), None);
        assert_eq!(event(Some(&old), &before), Some(RotationEvent::Aborted));
        let latest: HashMap<String, KeyRecord> =
            [(old.id.clone(), old.clone()), (new.id.clone(), new.clone())].into();
        assert_eq!(
            of(&latest, &new).map(|(o, _)| o.id.as_str()),
            Some("key_old")
        );
        assert_eq!(
            of(&latest, &old).map(|(_, n)| n.id.as_str()),
            Some("key_new")
        );
        let r = report(
            &old,
            &new,
            &used(&[("key_old", 900, 9), ("key_new", 1_040, 3)]),
        );
        assert_eq!(r["state"], "in_progress");
        assert_eq!(r["old"]["requests_since_rotation"], 4);
        assert_eq!(r["old"]["last_used"], serde_json::Value::Null);
        assert_eq!(r["new"]["last_used"], 1_040);
        assert_eq!(r["new"]["requests_since_rotation"], 3);
    }
}
