//! Governance figures ("metrics that matter"): rotation success rate and median time to
//! rotate, the share of active keys whose lifetime is within policy, stale keys found and
//! removed, and the time from a canary alarm to the key's revocation.
//!
//! One computation (`compute`) over the key records, usage and the audit log feeds both
//! `keygate report [--json]` and the `keygate_governance_*` gauges, which the node that sends
//! webhooks (single-node `serve`, or `control`) refreshes every minute. Labels are closed.
//!
//! Definitions (what an operator can check by hand):
//! - a rotation is *completed* when it completed by itself (`completed_at`) or its old key's
//!   grace ran out (expired or revoked); *aborted* from `key.rotation_aborted` audit events
//!   (an abort clears the rotation from the record); success = completed / (completed +
//!   aborted); time to rotate = completion − start.
//! - TTL within policy: active keys with an expiry no further than `policy.max_ttl` from
//!   creation, over all active keys (canaries excluded).
//! - stale *found*: active keys unused for `keys.stale_after` now; *removed*: revoked keys
//!   that had been unused that long when they were revoked.
//! - canary: first `key.canary_used` per key to the key's revocation.

use crate::config::Config;
use crate::keys::policy::Policy;
use crate::keys::record::{KeyRecord, KeyState};
use crate::usage::Used;
use prometheus::{Gauge, GaugeVec, Opts, Registry};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How often the gauges are recomputed.
const REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub generated_at: i64,
    pub rotations: Rotations,
    pub ttl: Ttl,
    pub stale: Stale,
    pub canary: Canary,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rotations {
    pub completed: u64,
    pub aborted: u64,
    pub open: u64,
    /// completed / (completed + aborted); None before any rotation finished.
    pub success_rate: Option<f64>,
    pub median_seconds_to_rotate: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ttl {
    pub active: u64,
    pub within_policy: u64,
    pub share_within_policy: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stale {
    pub found: u64,
    pub removed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Canary {
    pub alarmed: u64,
    pub revoked_after_alarm: u64,
    /// Alarmed canaries not revoked yet.
    pub open: u64,
    pub median_seconds_to_revocation: Option<f64>,
    pub max_seconds_to_revocation: Option<f64>,
}

/// What `compute` needs from the audit log, read in one pass.
#[derive(Debug, Default)]
pub struct AuditFacts {
    pub rotations_aborted: u64,
    /// First `key.canary_used` per key, Unix seconds.
    pub first_canary: BTreeMap<String, i64>,
}

/// Scan the audit log line by line (it can be large; nothing is kept but the facts).
pub fn audit_facts(path: &Path) -> AuditFacts {
    let mut f = AuditFacts::default();
    let Ok(file) = std::fs::File::open(path) else {
        return f;
    };
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        // Cheap pre-filter: most lines are neither event.
        if !line.contains("key.rotation_aborted") && !line.contains("key.canary_used") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match v.get("event").and_then(|e| e.as_str()) {
            Some("key.rotation_aborted") => f.rotations_aborted += 1,
            Some("key.canary_used") => {
                let (Some(id), Some(t)) = (
                    v.get("key_id").and_then(|k| k.as_str()),
                    v.get("timestamp")
                        .and_then(|t| t.as_str())
                        .and_then(|t| humantime::parse_rfc3339(t).ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()),
                ) else {
                    continue;
                };
                let t = t.as_secs() as i64;
                f.first_canary
                    .entry(id.to_owned())
                    .and_modify(|e| *e = (*e).min(t))
                    .or_insert(t);
            }
            _ => {}
        }
    }
    f
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// When a rotation on old key `r` completed, if it did.
fn rotation_done(r: &KeyRecord, now: i64) -> Option<i64> {
    let rot = r.rotation.as_ref()?;
    if let Some(t) = rot.completed_at {
        return Some(t);
    }
    match r.state(now) {
        KeyState::Expired | KeyState::Revoked => {
            [r.expires_at, r.revoked_at].into_iter().flatten().min()
        }
        _ => None,
    }
}

/// The figures accumulated over the records one at a time (`compute_each`): a gateway with
/// a million keys streams them from its table instead of holding a million records.
struct Tally<'a> {
    usage: &'a BTreeMap<String, Used>,
    facts: &'a AuditFacts,
    policy: &'a Policy,
    stale_after: i64,
    now: i64,
    rotations: Rotations,
    rotation_times: Vec<f64>,
    ttl: Ttl,
    stale: Stale,
    /// Revocation time of each key with a canary alarm (the few the audit log names).
    alarmed_revoked: BTreeMap<String, Option<i64>>,
}

impl<'a> Tally<'a> {
    fn add(&mut self, r: &KeyRecord) {
        self.rotation(r);
        self.ttl(r);
        self.stale(r);
        if self.facts.first_canary.contains_key(&r.id) {
            self.alarmed_revoked.insert(r.id.clone(), r.revoked_at);
        }
    }

    fn rotation(&mut self, r: &KeyRecord) {
        let Some(rot) = &r.rotation else { return };
        match rotation_done(r, self.now) {
            Some(t) => {
                self.rotations.completed += 1;
                self.rotation_times.push((t - rot.started_at).max(0) as f64);
            }
            None => self.rotations.open += 1,
        }
    }

    fn ttl(&mut self, r: &KeyRecord) {
        if r.state(self.now) != KeyState::Active {
            return;
        }
        self.ttl.active += 1;
        if r.expires_at.is_some() && !self.policy.ttl_exceeded(r) {
            self.ttl.within_policy += 1;
        }
    }

    fn stale(&mut self, r: &KeyRecord) {
        let last = self
            .usage
            .get(&r.id)
            .map_or(r.created_at, |u| u.last_used.max(r.created_at));
        match (r.state(self.now), r.revoked_at) {
            (KeyState::Active, _) if self.now - last >= self.stale_after => self.stale.found += 1,
            (KeyState::Revoked, Some(at)) if at - last >= self.stale_after => {
                self.stale.removed += 1
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Report {
        self.rotations.aborted = self.facts.rotations_aborted;
        self.rotations.success_rate = ratio(
            self.rotations.completed,
            self.rotations.completed + self.rotations.aborted,
        );
        self.rotations.median_seconds_to_rotate = median(self.rotation_times);
        self.ttl.share_within_policy = ratio(self.ttl.within_policy, self.ttl.active);
        let mut canary = Canary::default();
        let mut times = Vec::new();
        for (id, alarm) in &self.facts.first_canary {
            canary.alarmed += 1;
            match self.alarmed_revoked.get(id).copied().flatten() {
                Some(at) => {
                    canary.revoked_after_alarm += 1;
                    times.push((at - alarm).max(0) as f64);
                }
                None => canary.open += 1,
            }
        }
        canary.max_seconds_to_revocation = times.iter().copied().reduce(f64::max);
        canary.median_seconds_to_revocation = median(times);
        Report {
            generated_at: self.now,
            rotations: self.rotations,
            ttl: self.ttl,
            stale: self.stale,
            canary,
        }
    }
}

/// Every figure at `now`.
pub fn compute(
    records: &[Arc<KeyRecord>],
    usage: &BTreeMap<String, Used>,
    facts: &AuditFacts,
    policy: &Policy,
    stale_after_secs: i64,
    now: i64,
) -> Report {
    compute_each(
        |f| records.iter().for_each(|r| f(r)),
        usage,
        facts,
        policy,
        stale_after_secs,
        now,
    )
}

/// Every figure at `now`, over the records `each` hands out one at a time.
pub fn compute_each(
    each: impl FnOnce(&mut dyn FnMut(&KeyRecord)),
    usage: &BTreeMap<String, Used>,
    facts: &AuditFacts,
    policy: &Policy,
    stale_after_secs: i64,
    now: i64,
) -> Report {
    let mut tally = Tally {
        usage,
        facts,
        policy,
        stale_after: stale_after_secs,
        now,
        rotations: Rotations::default(),
        rotation_times: Vec::new(),
        ttl: Ttl::default(),
        stale: Stale::default(),
        alarmed_revoked: BTreeMap::new(),
    };
    each(&mut |r| tally.add(r));
    tally.finish()
}

/// The `keygate_governance_*` gauges (NaN where a figure is undefined, e.g. no rotation yet).
#[derive(Clone)]
pub struct Gauges {
    rotations: GaugeVec,
    rotation_success: Gauge,
    rotation_median: Gauge,
    ttl_within: Gauge,
    stale: GaugeVec,
    canary: GaugeVec,
    canary_median: Gauge,
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    crate::metrics::reg(
        r,
        Gauge::new(name, help).unwrap_or_else(|_| std::process::abort()),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> GaugeVec {
    crate::metrics::reg(
        r,
        GaugeVec::new(Opts::new(name, help), &[label]).unwrap_or_else(|_| std::process::abort()),
    )
}

impl Gauges {
    pub fn register(r: &Registry) -> Gauges {
        Gauges {
            rotations: gauge_vec(r, "keygate_governance_rotations", "Key rotations by status (completed, aborted, open).", "status"),
            rotation_success: gauge(r, "keygate_governance_rotation_success_ratio", "Completed rotations over finished ones (completed + aborted)."),
            rotation_median: gauge(r, "keygate_governance_rotation_median_seconds", "Median seconds from a rotation's start to its completion."),
            ttl_within: gauge(r, "keygate_governance_keys_ttl_within_policy_ratio", "Share of active keys with an expiry within policy.max_ttl."),
            stale: gauge_vec(r, "keygate_governance_stale_keys", "Stale keys: found (active, unused for keys.stale_after) and removed (revoked while stale).", "status"),
            canary: gauge_vec(r, "keygate_governance_canary_alarms", "Canary keys that raised an alarm, by status (revoked, open).", "status"),
            canary_median: gauge(r, "keygate_governance_canary_to_revocation_median_seconds", "Median seconds from a canary key's first use to its revocation."),
        }
    }

    pub fn set(&self, rep: &Report) {
        let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        let r = &rep.rotations;
        self.rotations
            .with_label_values(&["completed"])
            .set(r.completed as f64);
        self.rotations
            .with_label_values(&["aborted"])
            .set(r.aborted as f64);
        self.rotations
            .with_label_values(&["open"])
            .set(r.open as f64);
        self.rotation_success.set(nan(r.success_rate));
        self.rotation_median.set(nan(r.median_seconds_to_rotate));
        self.ttl_within.set(nan(rep.ttl.share_within_policy));
        self.stale
            .with_label_values(&["found"])
            .set(rep.stale.found as f64);
        self.stale
            .with_label_values(&["removed"])
            .set(rep.stale.removed as f64);
        self.canary
            .with_label_values(&["revoked"])
            .set(rep.canary.revoked_after_alarm as f64);
        self.canary
            .with_label_values(&["open"])
            .set(rep.canary.open as f64);
        self.canary_median
            .set(nan(rep.canary.median_seconds_to_revocation));
    }
}

use crate::webhooks::run::UsageFn;

/// Hands every key record to the callback, one at a time (the gateway rebuilds them from its
/// compact table as it goes; the control plane has them in memory).
pub type EachRecord = Arc<dyn Fn(&mut dyn FnMut(&KeyRecord)) + Send + Sync>;

/// Register the gauges and refresh them every minute, off the async workers.
pub fn spawn(
    registry: &Registry,
    records: EachRecord,
    usage: UsageFn,
    audit_log: std::path::PathBuf,
    policy: Policy,
    stale_after_secs: i64,
) {
    let gauges = Gauges::register(registry);
    tokio::spawn(async move {
        loop {
            let (records, usage, audit, policy, g) = (
                records.clone(),
                usage.clone(),
                audit_log.clone(),
                policy.clone(),
                gauges.clone(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                // Without usage every key would look unused: the gauges keep their figures.
                let Some(usage) = usage() else { return };
                let rep = compute_each(
                    |f| records(f),
                    &usage,
                    &audit_facts(&audit),
                    &policy,
                    stale_after_secs,
                    crate::clock::unix_secs(),
                );
                g.set(&rep);
            })
            .await;
            tokio::time::sleep(REFRESH).await;
        }
    });
}

/// `keygate report [--json]`: the figures from the store, usage and audit log.
pub fn run_report(config: &Config, json: bool) -> Result<(), crate::cli::Failure> {
    let settings = crate::keys::KeySettings::from_config(config)?;
    let now = crate::clock::unix_secs();
    let keys = crate::keys::ops::Keys::new(&settings, "report");
    let records: Vec<Arc<KeyRecord>> = crate::store::file::latest(keys.state()?.records)
        .into_values()
        .map(Arc::new)
        .collect();
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let usage = crate::cli::load_usage(config, &settings, &ids);
    let facts = audit_facts(&settings.audit_log);
    let rep = compute(
        &records,
        &usage,
        &facts,
        &settings.policy,
        settings.stale_after_secs,
        now,
    );
    if json {
        return crate::cli::out(&serde_json::to_string_pretty(&rep)?);
    }
    crate::cli::out(&text(&rep))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

fn dur(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |s| {
        humantime::format_duration(Duration::from_secs(s.max(0.0) as u64)).to_string()
    })
}

/// The human report.
pub fn text(r: &Report) -> String {
    format!(
        "rotations        completed {} · aborted {} · open {} · success {} · median time to rotate {}\n\
         ttl              {} of {} active keys within policy ({})\n\
         stale keys       found {} · removed {}\n\
         canary alarms    {} · revoked {} · open {} · median alarm→revocation {} · max {}",
        r.rotations.completed,
        r.rotations.aborted,
        r.rotations.open,
        pct(r.rotations.success_rate),
        dur(r.rotations.median_seconds_to_rotate),
        r.ttl.within_policy,
        r.ttl.active,
        pct(r.ttl.share_within_policy),
        r.stale.found,
        r.stale.removed,
        r.canary.alarmed,
        r.canary.revoked_after_alarm,
        r.canary.open,
        dur(r.canary.median_seconds_to_revocation),
        dur(r.canary.max_seconds_to_revocation),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::{sample, Rotation};

    #[test]
    fn figures_on_a_constructed_history() {
        let now = 1_000_000;
        let day = 86_400;
        let rot = |started_at, completed_at| Rotation {
            started_at,
            prior_expires_at: None,
            complete_when_idle_secs: None,
            requests_at_start: 0,
            completed_at,
        };
        let mut a = sample("key_a", Digest([1; 32])); // rotation completed by itself after 100 s
        a.rotation = Some(rot(now - 1000, Some(now - 900)));
        a.revoked_at = Some(now - 900);
        let mut b = sample("key_b", Digest([2; 32])); // grace ran out after 300 s
        b.rotation = Some(rot(now - 1000, None));
        b.expires_at = Some(now - 700);
        let mut c = sample("key_c", Digest([3; 32])); // open rotation
        c.rotation = Some(rot(now - 10, None));
        let mut canary = sample("key_d", Digest([4; 32])); // alarmed, revoked 60 s later
        canary.canary = true;
        canary.revoked_at = Some(now - 40);
        let mut old = sample("key_e", Digest([5; 32])); // revoked while stale
        old.created_at = now - 200 * day;
        old.revoked_at = Some(now - 5);
        let mut unused = sample("key_f", Digest([6; 32])); // active, stale, no expiry
        unused.created_at = now - 100 * day;
        let mut ok = sample("key_g", Digest([7; 32])); // active, within policy, used
        ok.created_at = now - day;
        ok.expires_at = Some(now + 30 * day);
        for r in [&mut a, &mut b, &mut c, &mut canary] {
            r.created_at = now - 2 * day;
        }
        let records: Vec<Arc<KeyRecord>> = [a, b, c, canary, old, unused, ok]
            .into_iter()
            .map(Arc::new)
            .collect();
        let usage = BTreeMap::from([(
            "key_g".to_owned(),
            Used {
                last_used: now - 5,
                ..Used::default()
            },
        )]);
        let facts = AuditFacts {
            rotations_aborted: 1,
            first_canary: BTreeMap::from([
                ("key_d".to_owned(), now - 100),
                ("key_x".to_owned(), now - 5),
            ]),
        };
        let policy = Policy {
            max_ttl_secs: Some(365 * day),
            ..Policy::default()
        };
        let rep = compute(&records, &usage, &facts, &policy, 90 * day, now);
        assert_eq!(
            (
                rep.rotations.completed,
                rep.rotations.aborted,
                rep.rotations.open
            ),
            (2, 1, 1)
        );
        assert_eq!(rep.rotations.success_rate, Some(2.0 / 3.0));
        assert_eq!(
            rep.rotations.median_seconds_to_rotate,
            Some(200.0),
            "median of 100 and 300"
        );
        // Active: c (no expiry), unused (no expiry), ok (within) → 1 of 3.
        assert_eq!((rep.ttl.within_policy, rep.ttl.active), (1, 3));
        assert_eq!((rep.stale.found, rep.stale.removed), (1, 1));
        assert_eq!(
            (
                rep.canary.alarmed,
                rep.canary.revoked_after_alarm,
                rep.canary.open
            ),
            (2, 1, 1)
        );
        assert_eq!(rep.canary.median_seconds_to_revocation, Some(60.0));
        let t = text(&rep);
        assert!(
            t.contains("success 66.7%") && t.contains("median time to rotate 3m 20s"),
            "{t}"
        );
        assert!(
            t.contains("1 of 3 active keys within policy (33.3%)"),
            "{t}"
        );

        let reg = Registry::new();
        let g = Gauges::register(&reg);
        g.set(&rep);
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &reg.gather(), &mut out)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("keygate_governance_stale_keys{status=\"removed\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("keygate_governance_canary_to_revocation_median_seconds 60"),
            "{out}"
        );
    }
}
