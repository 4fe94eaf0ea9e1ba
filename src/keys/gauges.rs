//! The key gauges (`keygate_keys{state,env}`, `keygate_keys_expiring{within}`,
//! `keygate_keys_without_expiry`, `keygate_keys_ttl_over_policy`, `keygate_keys_stale`),
//! maintained as counts on every change instead of a scan of the table per scrape: a scrape
//! costs the same at 10 keys and 10M.
//!
//! How: each key contributes to some counters at the instant `at` the counts stand for (one
//! state slot, plus flags while active). A change of a key (`replace`) takes the old version's
//! contribution out and puts the new one's in. What time alone changes (a key expires, enters
//! the 7-day window, becomes pending→active, goes stale) is known in advance from the record, so
//! each key also files its future changes as aggregated deltas in a time-ordered map; `tick`
//! applies the deltas that fell due. The map holds counts per instant, never keys, and its
//! instants are rounded: state and expiry changes to their minute ([`STEP`]), last use to
//! its UTC day (`keys.stale_after` is days to months), so the map is bounded by the calendar,
//! not by the number of keys.
//!
//! The price of the rounding: a gauge counts a change from the start of the minute it falls in
//! (up to 59 s early for a change ahead in time; a revocation, stamped when written, shows at
//! once; the state a request sees stays exact: `KeyTable::authenticate`), and a key counts as
//! stale once `stale_after` has passed since the end of the UTC day of its last use.
//!
//! The one rule for what a key contributes is [`contribution`]; a full recount
//! ([`KeyGauges::build`]) and the incremental counts agree by construction, and a property test
//! checks it over random changes and ticks.

use crate::keys::compact::{Entry, Validity, CANARY};
use crate::keys::policy::Policy;
use crate::keys::record::{KeyRecord, KeyState};
use std::collections::BTreeMap;

/// Rounding of state and expiry instants (seconds).
pub const STEP: i64 = 60;
const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;
const MONTH: i64 = 30 * DAY;

const STATES: [KeyState; 5] = [
    KeyState::Active,
    KeyState::Expired,
    KeyState::Revoked,
    KeyState::Canary,
    KeyState::Pending,
];

/// One counter: a (state, env) pair or one of the flags counted over active keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Slot {
    State(u8, u16),
    Flag(Flag),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Flag {
    Expiring7d,
    Expiring30d,
    NoExpiry,
    OverPolicy,
    Stale,
}

/// What the gauges depend on besides the records: `policy.max_ttl` and `keys.stale_after`.
/// When a reload changes them, the counts are rebuilt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub max_ttl_secs: Option<i64>,
    pub stale_after_secs: i64,
}

impl Rules {
    pub fn new(policy: &Policy, stale_after_secs: i64) -> Rules {
        Rules {
            max_ttl_secs: policy.max_ttl_secs,
            stale_after_secs,
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            max_ttl_secs: self.max_ttl_secs,
            ..Policy::default()
        }
    }

    fn over_policy(&self, r: &KeyRecord) -> bool {
        self.policy().ttl_exceeded(r)
    }

    /// What of a key the counts depend on, from its compact entry and its last use (see
    /// [`Alike`]).
    pub fn alike(&self, e: &Entry, last: i64) -> Alike {
        Alike {
            times: [e.revoked_at(), e.expires_at(), e.not_before()],
            canary: e.has(CANARY),
            profile: e.profile,
            over_policy: self.policy().lifetime_exceeded(
                e.expires_at(),
                e.created_at(),
                e.has(CANARY),
            ),
            last_day: last.div_euclid(DAY),
        }
    }
}

/// Everything [`contribution`] and [`breakpoints`] read of a key: its times, canary flag,
/// env (by the profile that holds it), policy verdict and the UTC day of its last use. Keys
/// equal in it count alike, so a whole-table count adds each such group once
/// ([`KeyGauges::add_many`]): a load counts a million keys with a hash each, not a million
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Alike {
    times: [Option<i64>; 3],
    canary: bool,
    profile: u32,
    over_policy: bool,
    last_day: i64,
}

/// The counts a scrape exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// (state, env) → keys; every pair ever counted is present, zeros included.
    pub states: BTreeMap<(KeyState, String), i64>,
    pub expiring_7d: i64,
    pub expiring_30d: i64,
    pub without_expiry: i64,
    pub over_policy: i64,
    pub stale: i64,
}

/// A key's contribution at one instant: its state slot and, while active, its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Contribution {
    state: Slot,
    flags: [Option<Flag>; 3],
}

impl Contribution {
    fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        std::iter::once(self.state).chain(self.flags.iter().flatten().map(|f| Slot::Flag(*f)))
    }
}

/// `t` rounded down to a multiple of `step`: a change counts from the start of its minute, so
/// a change stamped with the time it is written (an expiry set to now) shows at once.
fn floor_to(t: i64, step: i64) -> i64 {
    t.div_euclid(step).saturating_mul(step)
}

/// When a key last used at `last` (or created then) counts as stale.
fn stale_at(last: i64, rules: &Rules) -> i64 {
    (last.div_euclid(DAY) + 1)
        .saturating_mul(DAY)
        .saturating_add(rules.stale_after_secs)
}

fn state_index(s: KeyState) -> u8 {
    STATES.iter().position(|x| *x == s).unwrap_or(0) as u8
}

/// The state of `r` at `at` with its instants rounded down to [`STEP`] (as `KeyRecord::state`
/// otherwise: revoked beats canary beats expired beats pending; a revocation counts at once,
/// whatever its stamp).
fn rounded_state(r: &KeyRecord, at: i64) -> KeyState {
    let due = |t: Option<i64>| t.is_some_and(|t| floor_to(t, STEP) <= at);
    if crate::keys::record::is_revoked(r.revoked_at) {
        KeyState::Revoked
    } else if r.canary {
        KeyState::Canary
    } else if due(r.expires_at) {
        KeyState::Expired
    } else if r.not_before.is_some() && !due(r.not_before) {
        KeyState::Pending
    } else {
        KeyState::Active
    }
}

/// The one rule: what key `r` (env slot `env`, last used or created at `last`) adds to the
/// counts at instant `at`.
fn contribution(r: &KeyRecord, env: u16, last: i64, at: i64, rules: &Rules) -> Contribution {
    let state = rounded_state(r, at);
    let mut flags = [None; 3];
    if state == KeyState::Active {
        flags[0] = match r.expires_at {
            None => Some(Flag::NoExpiry),
            Some(e) if floor_to(e - WEEK, STEP) <= at => Some(Flag::Expiring7d),
            Some(e) if floor_to(e - MONTH, STEP) <= at => Some(Flag::Expiring30d),
            Some(_) => None,
        };
        flags[1] = rules.over_policy(r).then_some(Flag::OverPolicy);
        flags[2] = (stale_at(last, rules) <= at).then_some(Flag::Stale);
    }
    Contribution {
        state: Slot::State(state_index(state), env),
        flags,
    }
}

/// The instants at which `r`'s contribution may change.
fn breakpoints(r: &KeyRecord, last: i64, rules: &Rules) -> Vec<i64> {
    let mut out: Vec<i64> = [r.expires_at, r.not_before]
        .into_iter()
        .flatten()
        .chain(r.expires_at.map(|e| e - WEEK))
        .chain(r.expires_at.map(|e| e - MONTH))
        .map(|t| floor_to(t, STEP))
        .chain([stale_at(last, rules)])
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The counts at instant `at` and the deltas time will bring.
#[derive(Debug, Clone, Default)]
pub struct KeyGauges {
    rules: Rules,
    at: i64,
    envs: Vec<String>,
    counts: BTreeMap<Slot, i64>,
    /// (instant, counter) → change due then.
    due: BTreeMap<(i64, Slot), i64>,
}

impl KeyGauges {
    /// Empty counts at `now`.
    pub fn new(rules: Rules, now: i64) -> KeyGauges {
        KeyGauges {
            rules,
            at: now,
            ..KeyGauges::default()
        }
    }

    /// A full count of `records` at `now` (a whole-table load, a reload that changed the
    /// rules); `last_use(r)` is when `r` was last used or created.
    pub fn build<'a>(
        rules: Rules,
        now: i64,
        records: impl IntoIterator<Item = &'a KeyRecord>,
        last_use: impl Fn(&KeyRecord) -> i64,
    ) -> KeyGauges {
        let mut g = KeyGauges::new(rules, now);
        for r in records {
            g.add(r, last_use(r), 1);
        }
        g
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The instant the counts stand for.
    pub fn at(&self) -> i64 {
        self.at
    }

    /// Counters and pending changes held (the structure's size, for tests and docs).
    pub fn footprint(&self) -> usize {
        self.counts.len() + self.due.len()
    }

    fn env(&mut self, env: &str) -> u16 {
        if let Some(i) = self.envs.iter().position(|e| e == env) {
            return i as u16;
        }
        self.envs.push(env.to_owned());
        (self.envs.len() - 1) as u16
    }

    fn schedule(&mut self, t: i64, slot: Slot, delta: i64) {
        let e = self.due.entry((t, slot)).or_insert(0);
        *e += delta;
        if *e == 0 {
            self.due.remove(&(t, slot));
        }
    }

    /// Add (`sign` 1) or take out (`sign` -1) what `r` contributes now and later.
    fn add(&mut self, r: &KeyRecord, last: i64, sign: i64) {
        let env = self.env(&r.env);
        let mut prev = contribution(r, env, last, self.at, &self.rules);
        for s in prev.slots() {
            *self.counts.entry(s).or_insert(0) += sign;
        }
        for t in breakpoints(r, last, &self.rules) {
            if t <= self.at {
                continue;
            }
            let next = contribution(r, env, last, t, &self.rules);
            if next != prev {
                for s in prev.slots() {
                    self.schedule(t, s, -sign);
                }
                for s in next.slots() {
                    self.schedule(t, s, sign);
                }
                prev = next;
            }
        }
    }

    /// Add `n` keys that count alike (see [`Alike`]) as `r`, last used or created at `last`.
    pub fn add_many(&mut self, r: &KeyRecord, last: i64, n: u64) {
        self.add(r, last, i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A key changed: `old` (the version replaced, if any) out, `new` (if any) in. `last` is
    /// when the key was last used or created, as `build` takes it.
    pub fn replace(&mut self, old: Option<(&KeyRecord, i64)>, new: Option<(&KeyRecord, i64)>) {
        if let Some((r, last)) = old {
            self.add(r, last, -1);
        }
        if let Some((r, last)) = new {
            self.add(r, last, 1);
        }
    }

    /// Apply the changes due up to `now` (a clock that went back changes nothing).
    pub fn tick(&mut self, now: i64) {
        if now <= self.at {
            return;
        }
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, slot), delta) = entry.remove_entry();
            *self.counts.entry(slot).or_insert(0) += delta;
        }
        self.at = now;
    }

    /// The counts at `at`, with every configured env's states present (zeros included).
    pub fn counts(&self, envs: &[String]) -> Counts {
        let mut out = Counts::default();
        for env in envs {
            for s in STATES {
                out.states.insert((s, env.clone()), 0);
            }
        }
        for (slot, n) in &self.counts {
            match slot {
                Slot::State(s, env) => {
                    let (Some(state), Some(env)) = (
                        STATES.get(usize::from(*s)),
                        self.envs.get(usize::from(*env)),
                    ) else {
                        continue;
                    };
                    *out.states.entry((*state, env.clone())).or_insert(0) += n;
                }
                Slot::Flag(Flag::Expiring7d) => {
                    out.expiring_7d += n;
                    out.expiring_30d += n;
                }
                Slot::Flag(Flag::Expiring30d) => out.expiring_30d += n,
                Slot::Flag(Flag::NoExpiry) => out.without_expiry += n,
                Slot::Flag(Flag::OverPolicy) => out.over_policy += n,
                Slot::Flag(Flag::Stale) => out.stale += n,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;
    use std::collections::HashMap;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    const T0: i64 = 1_800_000_000;

    fn rules() -> Rules {
        Rules {
            max_ttl_secs: Some(60 * DAY),
            stale_after_secs: 10 * DAY,
        }
    }

    fn random_record(rng: &mut Rng, id: &str, n: u32, now: i64) -> KeyRecord {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&n.to_le_bytes());
        let mut r = sample(id, Digest(d));
        r.env = if rng.chance(30) { "test" } else { "live" }.into();
        r.created_at = now - rng.below(40 * DAY as u64) as i64;
        r.expires_at = rng
            .chance(70)
            .then(|| now + rng.below(90 * DAY as u64) as i64 - 5 * DAY);
        r.not_before = rng
            .chance(15)
            .then(|| now + rng.below(3 * DAY as u64) as i64);
        r.canary = rng.chance(5);
        r
    }

    /// The counts of a full recount of `table` at `now`.
    fn recount(
        table: &HashMap<String, KeyRecord>,
        last: &HashMap<String, i64>,
        now: i64,
    ) -> Counts {
        let envs = ["live".to_owned(), "test".to_owned()];
        KeyGauges::build(rules(), now, table.values(), |r| {
            last.get(&r.id)
                .copied()
                .unwrap_or(r.created_at)
                .max(r.created_at)
        })
        .counts(&envs)
    }

    #[test]
    fn a_grouped_count_of_a_table_equals_a_full_recount() {
        let envs = ["live".to_owned(), "test".to_owned()];
        for seed in 1..=10u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut records: HashMap<String, KeyRecord> = HashMap::new();
            let mut last: HashMap<String, i64> = HashMap::new();
            for n in 0..2_000u32 {
                let id = crate::keys::record::format_id("key", &u128::from(n).to_be_bytes());
                let mut r = random_record(&mut rng, &id, n, T0);
                // Few distinct instants, so keys fall into groups (as imports do), some
                // apart by seconds inside one minute or one day.
                r.created_at = T0 - 86_400 * rng.below(3) as i64 - rng.below(2) as i64;
                if rng.chance(60) {
                    r.expires_at = r.expires_at.map(|e| e - e % 3_600);
                }
                r.rev = u64::from(n) + 1;
                if rng.chance(20) {
                    last.insert(id.clone(), T0 - rng.below(20 * DAY as u64) as i64);
                }
                records.insert(id, r);
            }
            let mut sorted: Vec<KeyRecord> = records.values().cloned().collect();
            sorted.sort_by_key(|r| r.rev);
            let table =
                crate::keys::table::KeyTable::from_records(sorted, crate::store::seal::LogId(1), 0);
            let lu = |id: &str, created: i64| last.get(id).copied().unwrap_or(created).max(created);
            let mut g = KeyGauges::new(rules(), T0);
            let mut groups = 0;
            table.each_group(
                |e, id| rules().alike(e, lu(id, e.created_at())),
                |r, n| {
                    groups += 1;
                    g.add_many(r, lu(&r.id, r.created_at), n);
                },
            );
            assert!(
                groups < records.len(),
                "keys that count alike share a group"
            );
            for now in [T0, T0 + 3 * DAY, T0 + 20 * DAY, T0 + 80 * DAY] {
                g.tick(now);
                assert_eq!(
                    g.counts(&envs),
                    recount(&records, &last, now),
                    "seed {seed} at {now}"
                );
            }
        }
    }

    #[test]
    fn counts_equal_a_full_recount_after_random_changes_and_ticks() {
        let envs = ["live".to_owned(), "test".to_owned()];
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut now = T0;
            let mut g = KeyGauges::new(rules(), now);
            let mut table: HashMap<String, KeyRecord> = HashMap::new();
            let mut last: HashMap<String, i64> = HashMap::new();
            let lu = |last: &HashMap<String, i64>, r: &KeyRecord| {
                last.get(&r.id)
                    .copied()
                    .unwrap_or(r.created_at)
                    .max(r.created_at)
            };
            for step in 0..600u32 {
                let ids: Vec<String> = table.keys().cloned().collect();
                let pick = |rng: &mut Rng| ids[rng.below(ids.len() as u64) as usize].clone();
                match rng.below(10) {
                    // create
                    0..=2 => {
                        let id = format!("key_{seed}_{step}");
                        let r = random_record(&mut rng, &id, step, now);
                        g.replace(None, Some((&r, lu(&last, &r))));
                        table.insert(id, r);
                    }
                    // update: new expiry, env, canary flag
                    3 | 4 if !ids.is_empty() => {
                        let id = pick(&mut rng);
                        let old = table[&id].clone();
                        let mut new = old.clone();
                        new.expires_at = rng
                            .chance(80)
                            .then(|| now + rng.below(60 * DAY as u64) as i64 - DAY);
                        if rng.chance(20) {
                            new.env = "test".into();
                        }
                        let l = lu(&last, &old);
                        g.replace(Some((&old, l)), Some((&new, l)));
                        table.insert(id, new);
                    }
                    // revoke (now or, clock skew, a little ahead)
                    5 if !ids.is_empty() => {
                        let id = pick(&mut rng);
                        let old = table[&id].clone();
                        let mut new = old.clone();
                        new.revoked_at = Some(now + rng.below(120) as i64);
                        let l = lu(&last, &old);
                        g.replace(Some((&old, l)), Some((&new, l)));
                        table.insert(id, new);
                    }
                    // use: last use moves (what `Gateway::touched` reports)
                    6 if !ids.is_empty() => {
                        let id = pick(&mut rng);
                        let r = table[&id].clone();
                        let before = lu(&last, &r);
                        last.insert(id, now);
                        g.replace(Some((&r, before)), Some((&r, lu(&last, &r))));
                    }
                    // delete (a key dropped from a new table)
                    7 if !ids.is_empty() && rng.chance(20) => {
                        let id = pick(&mut rng);
                        let r = table.remove(&id).unwrap();
                        g.replace(Some((&r, lu(&last, &r))), None);
                    }
                    // time passes: seconds to days; the counts tick
                    _ => {
                        now += match rng.below(4) {
                            0 => rng.below(90) as i64,
                            1 => rng.below(3_600) as i64,
                            2 => rng.below(DAY as u64) as i64,
                            _ => rng.below(8 * DAY as u64) as i64,
                        };
                        g.tick(now);
                        assert_eq!(
                            g.counts(&envs),
                            recount(&table, &last, now),
                            "seed {seed} step {step}"
                        );
                    }
                }
            }
            g.tick(now + 400 * DAY);
            assert_eq!(g.counts(&envs), recount(&table, &last, now + 400 * DAY));
            assert!(g.due.is_empty(), "every change fell due");
        }
    }

    #[test]
    fn matches_the_exact_states_on_step_boundaries() {
        // At instants that are multiples of STEP and on the minute of each record's times,
        // the rounded rule and `KeyRecord::state` agree.
        let mut r = sample("key_a", Digest([1; 32]));
        r.created_at = T0;
        r.expires_at = Some(T0 + 600);
        r.not_before = Some(T0 + 120);
        for at in (T0..T0 + 900).step_by(STEP as usize) {
            assert_eq!(rounded_state(&r, at), r.state(at), "{at}");
        }
        r.revoked_at = Some(T0 + 300);
        for at in (T0..T0 + 900).step_by(STEP as usize) {
            assert_eq!(rounded_state(&r, at), r.state(at), "{at}");
        }
    }

    #[test]
    fn held_changes_are_bounded_by_the_calendar_not_the_keys() {
        // Keys expiring at distinct seconds over the same ~22 hours: twice the keys, the
        // same number of held changes (a minute's instants per counter, not one per key).
        let fill = |n: u32, spacing: i64| {
            let mut g = KeyGauges::new(rules(), T0);
            for i in 0..n {
                let mut r = sample(&format!("key_{i}"), Digest([0; 32]));
                r.created_at = T0;
                r.expires_at = Some(T0 + 40 * DAY + i64::from(i) * spacing);
                g.replace(None, Some((&r, T0)));
            }
            g
        };
        let small = fill(20_000, 4).footprint();
        let mut g = fill(40_000, 2);
        assert!(g.footprint() <= small + 8, "{} vs {small}", g.footprint());
        assert!(small < 20_000 / 2, "{small}");
        let c = g.counts(&["live".into()]);
        assert_eq!(c.states[&(KeyState::Active, "live".into())], 40_000);
        assert_eq!(c.expiring_30d, 0);
        g.tick(T0 + 11 * DAY);
        let c = g.counts(&["live".into()]);
        assert_eq!(c.expiring_30d, 40_000);
        assert_eq!(
            c.stale, 40_000,
            "unused for 10 days after the day of creation"
        );
    }

    #[test]
    fn floor_rounds_down_to_the_minute() {
        assert_eq!(floor_to(120, 60), 120);
        assert_eq!(floor_to(179, 60), 120);
        assert_eq!(floor_to(-59, 60), -60);
        assert_eq!(floor_to(-60, 60), -60);
    }
}
