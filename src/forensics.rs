//! Leak forensics: per key, requests by status class and route, the top source IPs and user
//! agents, first/last seen and attempts after revocation. Answers the runbook's "check recent
//! usage and suspicious IP addresses" for one key (`keys usage ID`, `GET /v1/api-keys/{id}/usage`).
//!
//! Memory is bounded twice: each list is a Space-Saving top-k sketch (`TOP_K` slots; a new
//! item replaces the smallest one, so heavy hitters stay and counts are upper bounds with a
//! known error), and sketches are kept for at most `MAX_KEYS` recently active keys, outside
//! the key table (the least recently seen tenth is dropped when full). User agents and route
//! names are copied into a fixed 64-byte label, so recording into an existing key's sketch
//! allocates nothing. A request that counts exactly as the key's previous one did (same
//! route, client, agent, status class and hour: a service calling with its key) only adds
//! to a run kept beside the key (`Run`), folded into the sketches before anything reads
//! them: with many keys in use, the sketches' lists are cache misses that a repeat no longer
//! pays. Status classes and attempts after revocation are also kept in time
//! buckets (`Buckets`: hours for two days, days for five weeks), so a report "since" a time
//! counts that window, not the whole tracked period.
//!
//! Persistence: single node, `<usage file>.forensics.json` beside the usage file, with one
//! section per node (several gateways may share the directory; each replaces only its own
//! keys in its own section, under the same kind of lock as the usage file). Fleet: gateways
//! send the keys that changed since the last report with their usage reports
//! (`sync::report`); the control plane writes them into the same file, per node, and each
//! gateway keeps what the control plane took in its own file (`write_own`) to resume from.

use crate::keys::compact::KeyId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Slots per sketch: enough to show the handful of sources a leak investigation looks at.
pub const TOP_K: usize = 16;
/// Keys with a sketch (about 4 KiB each at most, so ~40 MiB worst case).
pub const MAX_KEYS: usize = 10_000;
/// User agents and route names are cut to this many bytes.
pub const LABEL_LEN: usize = 64;

/// A bounded, copyable text: printable ASCII kept, anything else `?`, cut at `LABEL_LEN`.
/// Client-controlled header bytes never reach the output as control characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Label {
    len: u8,
    bytes: [u8; LABEL_LEN],
}

impl Label {
    pub fn new(raw: &[u8]) -> Label {
        let mut bytes = [0u8; LABEL_LEN];
        let n = raw.len().min(LABEL_LEN);
        for (d, s) in bytes.iter_mut().zip(&raw[..n]) {
            *d = if s.is_ascii_graphic() || *s == b' ' {
                *s
            } else {
                b'?'
            };
        }
        Label {
            len: n as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (see `new`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl std::fmt::Debug for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Label, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Label::new(s.as_bytes()))
    }
}

/// One slot of a sketch: `count` overestimates the item's true count by at most `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot<T> {
    pub value: T,
    pub count: u64,
    #[serde(default)]
    pub error: u64,
    /// Unix seconds of the last time this item was counted (for `--since`).
    #[serde(default)]
    pub last_seen: i64,
}

/// Space-Saving (Metwally et al. 2005) with `TOP_K` slots: any item with a true count above
/// total/TOP_K is guaranteed to be in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TopK<T> {
    slots: Vec<Slot<T>>,
}

impl<T> Default for TopK<T> {
    fn default() -> Self {
        TopK { slots: Vec::new() }
    }
}

impl<T: Copy + Eq> TopK<T> {
    pub fn add(&mut self, value: T, n: u64, now: i64) {
        self.add_slot(Slot {
            value,
            count: n,
            error: 0,
            last_seen: now,
        });
    }

    fn add_slot(&mut self, s: Slot<T>) {
        if let Some(slot) = self.slots.iter_mut().find(|x| x.value == s.value) {
            slot.count += s.count;
            slot.error += s.error;
            slot.last_seen = slot.last_seen.max(s.last_seen);
            return;
        }
        if self.slots.len() < TOP_K {
            self.slots.push(s);
            return;
        }
        // Full: the smallest slot gives way; its count becomes the newcomer's error bound.
        if let Some(min) = self.slots.iter_mut().min_by_key(|x| x.count) {
            let floor = min.count;
            *min = Slot {
                value: s.value,
                count: floor + s.count,
                error: floor + s.error,
                last_seen: s.last_seen,
            };
        }
    }

    /// Add another sketch (another node's): the union stays within `TOP_K` slots.
    pub fn merge(&mut self, other: &TopK<T>) {
        for s in &other.slots {
            self.add_slot(*s);
        }
    }

    /// Slots last seen at or after `since`, largest count first.
    pub fn top(&self, since: i64) -> Vec<Slot<T>> {
        let mut v: Vec<Slot<T>> = self
            .slots
            .iter()
            .filter(|s| s.last_seen >= since)
            .copied()
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.count));
        v
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;
/// Hour buckets for this long back from the newest request; older hours are summed by day.
const HOURLY: i64 = 48 * HOUR;
/// Day buckets for this long; older ones are dropped (their counts stay in the totals).
const KEPT: i64 = 35 * DAY;

/// `[start, start + span)` in Unix seconds, and the 2xx, 3xx, 4xx, 5xx and after-revocation
/// counts in it. A tuple, so the file and the usage reports stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket(i64, u32, [u32; 5]);

impl Bucket {
    fn end(&self) -> i64 {
        self.0 + i64::from(self.1)
    }
}

/// Where the counts of one key's requests fall in time: at most `HOURLY/HOUR` hour buckets
/// and `KEPT/DAY + 1` day buckets (about 2.7 KiB at most, only for keys used every hour).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    /// Every request of these stats at or after this time is in `list`: 0 from the start,
    /// else from the first request bucketed (stats written before buckets existed) or the
    /// end of the last bucket dropped as too old.
    from: i64,
    /// By `(start, span)`.
    list: Vec<Bucket>,
}

/// A counter index in `Bucket`: the status class of `status`. A 1xx never reaches a client
/// (an upstream's 101 is refused as a desync), so it has no class.
fn class(status: u16) -> Option<usize> {
    match status {
        200..=299 => Some(0),
        300..=399 => Some(1),
        400..=499 => Some(2),
        500..=599 => Some(3),
        _ => None,
    }
}
const REVOKED: usize = 4;

impl Buckets {
    /// Stats read from a file written before buckets existed: nothing bucketed yet.
    fn none_yet() -> Buckets {
        Buckets {
            from: i64::MAX,
            list: Vec::new(),
        }
    }

    /// Count `n` requests at `now`: their status class, and attempts after revocation.
    /// Requests arrive nearly in time order, so the bucket is searched from the newest back;
    /// a new hour rolls the old ones.
    fn add(&mut self, now: i64, class: Option<usize>, revoked: bool, n: u32) {
        if class.is_none() && !revoked {
            return;
        }
        if self.from == i64::MAX {
            self.from = now.div_euclid(HOUR) * HOUR;
        }
        let (i, new) = match self.list.iter().rposition(|b| b.0 <= now) {
            Some(i) if now < self.list[i].end() => (i, false),
            newest_before => {
                let i = newest_before.map_or(0, |i| i + 1);
                let hour = Bucket(now.div_euclid(HOUR) * HOUR, HOUR as u32, [0; 5]);
                self.list.insert(i, hour);
                (i, true)
            }
        };
        let counts = &mut self.list[i].2;
        for c in class.into_iter().chain(revoked.then_some(REVOKED)) {
            counts[c] = counts[c].saturating_add(n);
        }
        if new {
            self.roll(now);
        }
    }

    /// Hours older than `HOURLY` before `now` into their day, days older than `KEPT` out;
    /// equal buckets (after a merge) summed.
    fn roll(&mut self, now: i64) {
        let hourly_from = now.div_euclid(HOUR) * HOUR - HOURLY;
        let kept_from = now.div_euclid(DAY) * DAY - KEPT;
        let mut out: Vec<Bucket> = Vec::with_capacity(self.list.len());
        for mut b in self.list.drain(..) {
            if i64::from(b.1) == HOUR && b.0 < hourly_from {
                b = Bucket(b.0.div_euclid(DAY) * DAY, DAY as u32, b.2);
            }
            if b.end() <= kept_from {
                self.from = self.from.max(b.end());
                continue;
            }
            match out.iter_mut().find(|o| (o.0, o.1) == (b.0, b.1)) {
                Some(o) => {
                    for (x, y) in o.2.iter_mut().zip(b.2) {
                        *x = x.saturating_add(y);
                    }
                }
                None => out.push(b),
            }
        }
        out.sort_by_key(|b| (b.0, b.1));
        self.list = out;
    }

    /// Another node's buckets for the same key, rolled at `now` (the newer last request).
    fn merge(&mut self, other: &Buckets, now: i64) {
        self.from = self.from.max(other.from);
        self.list.extend_from_slice(&other.list);
        self.roll(now);
    }

    /// The counts of every bucket reaching past `since`, and the start of the earliest of
    /// them (before `since` when `since` falls inside a bucket).
    fn since(&self, since: i64) -> (Option<i64>, [u64; 5]) {
        let mut counts = [0u64; 5];
        let mut from: Option<i64> = None;
        for b in self.list.iter().filter(|b| b.end() > since) {
            from = Some(from.map_or(b.0, |f| f.min(b.0)));
            for (t, n) in counts.iter_mut().zip(b.2) {
                *t += u64::from(n);
            }
        }
        (from, counts)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i(n: &i64) -> bool {
    *n == 0
}

/// Everything kept for one key (cumulative since it was first tracked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    pub first_seen: i64,
    pub last_seen: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s2xx: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s3xx: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s4xx: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s5xx: u64,
    #[serde(default)]
    pub routes: TopK<Label>,
    #[serde(default)]
    pub ips: TopK<IpAddr>,
    #[serde(default)]
    pub user_agents: TopK<Label>,
    /// Presentations of the key after it was revoked (refused, 401).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoked_attempts: u64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub first_revoked_attempt: i64,
    #[serde(default, skip_serializing_if = "is_zero_i")]
    pub last_revoked_attempt: i64,
    #[serde(default)]
    pub revoked_ips: TopK<IpAddr>,
    /// The status classes and after-revocation attempts above, in time (for `since`).
    #[serde(default = "Buckets::none_yet")]
    pub recent: Buckets,
}

impl KeyStats {
    /// Count `n` requests like `h` (more than one only for a run's repeats, `Run`).
    fn add(&mut self, h: &Hit, n: u32) {
        if self.first_seen == 0 || h.now < self.first_seen {
            self.first_seen = h.now;
        }
        self.last_seen = self.last_seen.max(h.now);
        let class = class(h.status);
        let n64 = u64::from(n);
        match class {
            Some(0) => self.s2xx += n64,
            Some(1) => self.s3xx += n64,
            Some(2) => self.s4xx += n64,
            Some(3) => self.s5xx += n64,
            _ => {}
        }
        self.recent.add(h.now, class, h.revoked, n);
        if let Some(r) = h.route {
            self.routes.add(r, n64, h.now);
        }
        self.ips.add(h.ip, n64, h.now);
        self.user_agents
            .add(h.user_agent.unwrap_or(Label::new(b"-")), n64, h.now);
        if h.revoked {
            self.revoked_attempts += n64;
            if self.first_revoked_attempt == 0 {
                self.first_revoked_attempt = h.now;
            }
            self.last_revoked_attempt = self.last_revoked_attempt.max(h.now);
            self.revoked_ips.add(h.ip, n64, h.now);
        }
    }

    /// Add another node's stats for the same key.
    pub fn merge(&mut self, o: &KeyStats) {
        let min_nonzero = |a: i64, b: i64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        self.first_seen = min_nonzero(self.first_seen, o.first_seen);
        self.last_seen = self.last_seen.max(o.last_seen);
        self.s2xx += o.s2xx;
        self.s3xx += o.s3xx;
        self.s4xx += o.s4xx;
        self.s5xx += o.s5xx;
        self.routes.merge(&o.routes);
        self.ips.merge(&o.ips);
        self.user_agents.merge(&o.user_agents);
        self.revoked_attempts += o.revoked_attempts;
        self.first_revoked_attempt =
            min_nonzero(self.first_revoked_attempt, o.first_revoked_attempt);
        self.last_revoked_attempt = self.last_revoked_attempt.max(o.last_revoked_attempt);
        self.revoked_ips.merge(&o.revoked_ips);
        self.recent.merge(&o.recent, self.last_seen);
    }

    /// The 2xx, 3xx, 4xx, 5xx and after-revocation counts from `since` on, and the time they are
    /// counted from. A window inside what the buckets hold is counted from them, from the
    /// start of the hour (or day, past two days) that holds `since`; one reaching before them
    /// (past five weeks, or before the stats had buckets) gets every count since tracking
    /// began, from `first_seen`: more than asked, never less.
    pub fn counts_since(&self, since: i64) -> (i64, [u64; 5]) {
        if since > self.first_seen && since >= self.recent.from {
            let (from, counts) = self.recent.since(since);
            (from.unwrap_or(since).max(self.first_seen), counts)
        } else {
            let all = [
                self.s2xx,
                self.s3xx,
                self.s4xx,
                self.s5xx,
                self.revoked_attempts,
            ];
            (self.first_seen, all)
        }
    }

    /// The report of `keys usage` and the API (`since`: Unix seconds, 0 for everything).
    pub fn report(&self, id: &str, since: i64) -> serde_json::Value {
        let slots = |v: Vec<Slot<Label>>| -> Vec<serde_json::Value> {
            v.iter()
                .map(|s| serde_json::json!({"value": s.value.as_str(), "count": s.count, "error": s.error, "last_seen": s.last_seen}))
                .collect()
        };
        let ips = |v: Vec<Slot<IpAddr>>| -> Vec<serde_json::Value> {
            v.iter()
                .map(|s| serde_json::json!({"value": s.value.to_string(), "count": s.count, "error": s.error, "last_seen": s.last_seen}))
                .collect()
        };
        let (counted_from, [s2xx, s3xx, s4xx, s5xx, revoked]) = self.counts_since(since);
        serde_json::json!({
            "id": id,
            "since": since,
            "counted_from": counted_from,
            "tracked_since": self.first_seen,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "seen_since": self.last_seen >= since,
            "requests": s2xx + s3xx + s4xx + s5xx,
            "by_status": {"2xx": s2xx, "3xx": s3xx, "4xx": s4xx, "5xx": s5xx},
            "by_route": slots(self.routes.top(since)),
            "top_ips": ips(self.ips.top(since)),
            "top_user_agents": slots(self.user_agents.top(since)),
            "attempts_after_revocation": {
                "count": revoked,
                "first": (self.first_revoked_attempt != 0).then_some(self.first_revoked_attempt),
                "last": (self.last_revoked_attempt != 0).then_some(self.last_revoked_attempt),
                "top_ips": ips(self.revoked_ips.top(since)),
            },
        })
    }
}

/// The report for a key never seen (or not tracked): zeros, same shape.
pub fn empty_report(id: &str, since: i64) -> serde_json::Value {
    let mut v = KeyStats::default().report(id, since);
    v["first_seen"] = serde_json::Value::Null;
    v["last_seen"] = serde_json::Value::Null;
    v["tracked_since"] = serde_json::Value::Null;
    v["counted_from"] = serde_json::Value::Null;
    v["seen_since"] = false.into();
    v
}

/// `--since` / `?since=`: an RFC 3339 time, Unix seconds, or a duration ago (`24h`).
pub fn parse_since(s: &str, now: i64) -> Result<i64, crate::keys::ops::OpsError> {
    let s = s.trim();
    if let Ok(t) = s.parse::<i64>() {
        return Ok(t.max(0));
    }
    if let Ok(d) = crate::config::parse_duration(s) {
        let d = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        return Ok(now.saturating_sub(d).max(0));
    }
    // RFC 3339 (offsets included) is what `--not-before` reads; reuse it, with our own words.
    crate::keys::ops::parse_not_before(s, now).map_err(|_| {
        crate::keys::ops::OpsError::Invalid(format!(
            "bad since {s:?}: give an RFC 3339 time (2026-12-24T09:00:00Z), Unix seconds or a duration ago (24h)"
        ))
    })
}

fn when(v: &serde_json::Value) -> String {
    match v.as_i64() {
        Some(t) if t > 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
        .to_string(),
        _ => "never".into(),
    }
}

/// The text form of a report (`keys usage` without `--json`).
pub fn render_text(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(t, "key:         {}", v["id"].as_str().unwrap_or("-"));
    let _ = writeln!(t, "first seen:  {}", when(&v["first_seen"]));
    let _ = writeln!(t, "last seen:   {}", when(&v["last_seen"]));
    let b = &v["by_status"];
    let _ = writeln!(
        t,
        "requests:    {} (2xx {}, 3xx {}, 4xx {}, 5xx {})",
        v["requests"], b["2xx"], b["3xx"], b["4xx"], b["5xx"]
    );
    if v["since"].as_i64().is_some_and(|t| t > 0) {
        let _ = writeln!(t, "counted from: {}", when(&v["counted_from"]));
    }
    let a = &v["attempts_after_revocation"];
    let _ = writeln!(
        t,
        "after revocation: {} attempts (first {}, last {})",
        a["count"],
        when(&a["first"]),
        when(&a["last"])
    );
    let list = |t: &mut String, title: &str, items: &serde_json::Value| {
        let _ = writeln!(t, "{title}:");
        let empty = Vec::new();
        let items = items.as_array().unwrap_or(&empty);
        if items.is_empty() {
            let _ = writeln!(t, "  (none)");
        }
        for i in items {
            let _ = writeln!(
                t,
                "  {:>8}  {}",
                i["count"].as_u64().unwrap_or(0),
                i["value"].as_str().unwrap_or("-")
            );
        }
    };
    list(&mut t, "routes", &v["by_route"]);
    list(&mut t, "top source IPs", &v["top_ips"]);
    list(&mut t, "top user agents", &v["top_user_agents"]);
    list(&mut t, "source IPs after revocation", &a["top_ips"]);
    t
}

/// One request by a known key (accepted or refused), as the pipeline records it.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub now: i64,
    pub status: u16,
    pub route: Option<Label>,
    pub ip: IpAddr,
    pub user_agent: Option<Label>,
    /// The key was presented after its revocation.
    pub revoked: bool,
}

impl Hit {
    /// Whether this hit counts exactly as `last` did, at the same time or later in the same
    /// hour: the same status class (all the stats keep of a status), revocation, route,
    /// address and agent. Counting it then changes only counts and last-seen times.
    fn repeats(&self, last: &Hit) -> bool {
        self.now >= last.now
            && self.now.div_euclid(HOUR) == last.now.div_euclid(HOUR)
            && class(self.status) == class(last.status)
            && self.revoked == last.revoked
            && self.ip == last.ip
            && self.route == last.route
            && self.user_agent == last.user_agent
    }
}

/// The key's latest hit, counted in the stats, and how many repeats of it (`Hit::repeats`)
/// followed that are not yet, `hit.now` the latest one's time. Folding them in as one
/// `KeyStats::add` of `more` is the same as adding each: every item of `hit` is in its
/// sketch (it was added last, nothing since), so each list adds to a slot it already has,
/// and the bucket that holds the first holds the others (same hour, no bucket made since).
#[derive(Debug)]
struct Run {
    hit: Hit,
    more: u32,
}

#[derive(Debug, Default)]
struct Tracked {
    stats: KeyStats,
    run: Option<Run>,
    /// Changed since the last flush or report.
    dirty: bool,
}

impl Tracked {
    fn add(&mut self, hit: Hit) {
        self.dirty = true;
        if let Some(run) = self.run.as_mut().filter(|r| r.more < u32::MAX) {
            if hit.repeats(&run.hit) {
                run.more += 1;
                run.hit.now = hit.now;
                return;
            }
        }
        self.settle();
        self.stats.add(&hit, 1);
        self.run = Some(Run { hit, more: 0 });
    }

    /// The stats with the run's repeats folded in: what every reader of them sees.
    fn settle(&mut self) -> &KeyStats {
        if let Some(run) = self.run.as_mut().filter(|r| r.more > 0) {
            self.stats.add(&run.hit, run.more);
            run.more = 0;
        }
        &self.stats
    }
}

/// The in-memory sketches of one gateway.
#[derive(Debug)]
pub struct Forensics {
    path: PathBuf,
    node: String,
    /// Keyed by `KeyId` (inline for a generated id): a lookup compares bytes in the map's slot
    /// rather than following a `String`'s pointer.
    keys: crate::fastmap::FastMap<KeyId, Mutex<Tracked>>,
    cap: usize,
    any_dirty: AtomicBool,
}

/// The file: node → key id → stats.
pub type Nodes = BTreeMap<String, BTreeMap<String, KeyStats>>;

/// One key's stats as the file holds them, JSON text: what a rewrite of the file handles. A
/// flush (once a minute) held the whole file parsed and every changed key cloned, then built
/// the new file in memory, and the gateway's RSS kept the peak for the 10 s its allocator
/// holds freed pages (docs/performance.md: "The memory figure and the once-a-minute flush").
/// As text, and with the file written as it is serialised, the peak is about halved.
pub type Entry = Box<serde_json::value::RawValue>;

/// The file's shape, with each key's stats as `V`: `KeyStats` to read it, `Entry` to rewrite it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FileBody<V> {
    #[serde(default = "BTreeMap::new")]
    nodes: BTreeMap<String, BTreeMap<String, V>>,
}

/// Where the sketches of the usage file `usage_file` are kept.
pub fn path_for(usage_file: &Path) -> PathBuf {
    let mut p = usage_file.as_os_str().to_owned();
    p.push(".forensics.json");
    PathBuf::from(p)
}

/// Read the forensics file; missing or unreadable is empty (forensics is advisory).
pub fn read(path: &Path) -> Nodes {
    parse(path)
}

/// The file with each key's stats as `V`; missing or not of the file's shape is empty.
fn parse<V: serde::de::DeserializeOwned>(path: &Path) -> BTreeMap<String, BTreeMap<String, V>> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<FileBody<V>>(&b).ok())
        .map(|f| f.nodes)
        .unwrap_or_default()
}

/// The file as text per key, for a rewrite. A file `read` would take as empty (an entry that
/// is not a `KeyStats`) is empty here too: each entry is parsed once, then dropped, so a
/// rewrite keeps exactly what readers can read, as when it parsed the whole file.
fn read_entries(path: &Path) -> BTreeMap<String, BTreeMap<String, Entry>> {
    let nodes = parse::<Entry>(path);
    let readable = nodes
        .values()
        .flat_map(BTreeMap::values)
        .all(|e| serde_json::from_str::<KeyStats>(e.get()).is_ok());
    if readable {
        nodes
    } else {
        BTreeMap::new()
    }
}

/// One key over every node.
pub fn merged(nodes: &Nodes, id: &str) -> Option<KeyStats> {
    let mut out: Option<KeyStats> = None;
    for keys in nodes.values() {
        if let Some(s) = keys.get(id) {
            match &mut out {
                Some(o) => o.merge(s),
                None => out = Some(s.clone()),
            }
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves plain counters behind: still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keep the `cap` most recently seen keys of `keys`.
fn trim<V>(keys: &mut BTreeMap<String, V>, cap: usize, last_seen: impl Fn(&V) -> i64) {
    if keys.len() <= cap {
        return;
    }
    let mut seen: Vec<(i64, String)> = keys
        .iter()
        .map(|(k, v)| (last_seen(v), k.clone()))
        .collect();
    seen.sort();
    for (_, k) in seen.iter().take(keys.len() - cap) {
        keys.remove(k);
    }
}

impl Forensics {
    /// Sketches for the gateway whose usage file is `usage_file`; `node` names its section.
    /// This node's section is loaded so counts go on across restarts.
    pub fn new(usage_file: &Path, node: &str) -> Forensics {
        Self::with_cap(usage_file, node, MAX_KEYS)
    }

    pub fn with_cap(usage_file: &Path, node: &str, cap: usize) -> Forensics {
        let path = path_for(usage_file);
        let keys = crate::fastmap::new();
        let mut mine = read(&path).remove(node).unwrap_or_default();
        trim(&mut mine, cap, |s| s.last_seen);
        for (id, stats) in mine {
            keys.insert(
                KeyId::of(&id),
                Mutex::new(Tracked {
                    stats,
                    run: None,
                    dirty: false,
                }),
            );
        }
        Forensics {
            path,
            node: node.to_owned(),
            keys,
            cap: cap.max(1),
            any_dirty: AtomicBool::new(false),
        }
    }

    /// Record one request by key `id`: a map read and a short lock for a tracked key.
    pub fn record(&self, id: &KeyId, hit: Hit) {
        if let Some(t) = self.keys.get(id) {
            lock(&t).add(hit);
        } else {
            if self.keys.len() >= self.cap {
                self.evict();
            }
            let t = self.keys.entry(id.clone()).or_default();
            lock(&t).add(hit);
        }
        self.mark_dirty();
    }

    /// After the entry is marked, so a `take_dirty` that cleared the flag before seeing the
    /// entry is followed by a set flag (the next flush takes it). Read first: a store on every
    /// request would bounce the cache line between cores.
    fn mark_dirty(&self) {
        if !self.any_dirty.load(Ordering::SeqCst) {
            self.any_dirty.store(true, Ordering::SeqCst);
        }
    }

    /// Drop the least recently seen tenth, so eviction runs once per `cap/10` new keys rather
    /// than on every one. No map reference is held while removing (DashMap shards would
    /// deadlock).
    fn evict(&self) {
        let mut seen: Vec<(i64, KeyId)> = self
            .keys
            .iter()
            .map(|e| (lock(e.value()).settle().last_seen, e.key().clone()))
            .collect();
        seen.sort_by(|a, b| (a.0, a.1.as_str()).cmp(&(b.0, b.1.as_str())));
        let n = (self.cap / 10).max(1).min(seen.len());
        for (_, id) in seen.into_iter().take(n) {
            self.keys.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<KeyStats> {
        self.keys.get(id).map(|t| lock(&t).settle().clone())
    }

    /// The keys changed since the last call (cumulative stats each), marked clean.
    pub fn take_dirty(&self) -> BTreeMap<String, KeyStats> {
        self.take_dirty_as(KeyStats::clone)
    }

    /// `take_dirty`, each key's stats given as what `copy` makes of them.
    fn take_dirty_as<V>(&self, copy: impl Fn(&KeyStats) -> V) -> BTreeMap<String, V> {
        if !self.any_dirty.swap(false, Ordering::SeqCst) {
            return BTreeMap::new();
        }
        let mut out = BTreeMap::new();
        for e in self.keys.iter() {
            let mut t = lock(e.value());
            if std::mem::take(&mut t.dirty) {
                out.insert(e.key().to_string(), copy(t.settle()));
            }
        }
        out
    }

    /// A failed flush or report: mark those keys changed again.
    pub fn restore(&self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if let Some(t) = self.keys.get(id.as_str()) {
                lock(&t).dirty = true;
                self.mark_dirty();
            }
        }
    }

    /// `take_dirty`, each key's stats as its JSON text (not cloned: see `Entry`). If one
    /// cannot be written as text, none is taken.
    pub fn take_dirty_text(&self) -> Result<BTreeMap<String, Entry>, serde_json::Error> {
        let mut out = BTreeMap::new();
        let mut failed = (None, Vec::new());
        for (id, text) in self.take_dirty_as(serde_json::value::to_raw_value) {
            match text {
                Ok(t) => {
                    out.insert(id, t);
                }
                Err(e) => {
                    failed.0.get_or_insert(e);
                    failed.1.push(id);
                }
            }
        }
        match failed {
            (None, _) => Ok(out),
            (Some(e), ids) => {
                self.restore(out.into_keys().chain(ids));
                Err(e)
            }
        }
    }

    /// Write the changed keys into this node's section of the file, under its lock.
    pub fn flush(&self) -> std::io::Result<bool> {
        let changed = self.take_dirty_text().map_err(std::io::Error::other)?;
        if changed.is_empty() {
            return Ok(false);
        }
        let ids: Vec<String> = changed.keys().cloned().collect();
        let result = upsert_entries(&self.path, &self.node, changed, self.cap);
        if result.is_err() {
            self.restore(ids);
        }
        result.map(|()| true)
    }

    /// Write sketches of this node's keys as taken by `take_dirty_text` into its section of
    /// the file (a feed gateway's, once its control plane took them), for the next process.
    pub fn write_own(&self, sketches: BTreeMap<String, Entry>) -> std::io::Result<()> {
        upsert_entries(&self.path, &self.node, sketches, self.cap)
    }
}

/// Replace `node`'s stats of the given keys in the file at `path` (other nodes untouched): a
/// node's report, as the control plane receives it.
pub fn upsert_file(
    path: &Path,
    node: &str,
    changed: BTreeMap<String, KeyStats>,
    cap: usize,
) -> std::io::Result<()> {
    let changed = changed
        .into_iter()
        .map(|(id, stats)| serde_json::value::to_raw_value(&stats).map(|e| (id, e)))
        .collect::<Result<_, _>>()?;
    upsert_entries(path, node, changed, cap)
}

/// `upsert_file` with the stats already as their text (`Forensics::flush` takes them so: moved
/// in, not serialised a second time). The file's other entries are copied through as text.
fn upsert_entries(
    path: &Path,
    node: &str,
    changed: BTreeMap<String, Entry>,
    cap: usize,
) -> std::io::Result<()> {
    let _lock = crate::store::file::lock_beside(path)?;
    let mut body = FileBody {
        nodes: read_entries(path),
    };
    let mine = body.nodes.entry(node.to_owned()).or_default();
    mine.extend(changed);
    trim(mine, cap, |e| {
        // `read_entries` kept only entries that parse.
        serde_json::from_str::<LastSeen>(e.get()).map_or(0, |s| s.last_seen)
    });
    crate::store::file::write_json_atomic(path, &body)
}

/// The one field of an entry that trimming the file orders by.
#[derive(Deserialize)]
struct LastSeen {
    last_seen: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(ip: [u8; 4], ua: &str, now: i64) -> Hit {
        Hit {
            now,
            status: 200,
            route: Some(Label::new(b"invoices")),
            ip: IpAddr::from(ip),
            user_agent: Some(Label::new(ua.as_bytes())),
            revoked: false,
        }
    }

    #[test]
    fn sketch_stays_bounded_and_finds_heavy_hitters() {
        let mut s: TopK<u32> = TopK::default();
        // Two heavy hitters (2,000 and 1,000) among 10,000 one-off items: both are above
        // total/TOP_K (13,000/16 = 812), so Space-Saving must keep them.
        for i in 0..10_000u32 {
            s.add(1_000_000 + i, 1, 1);
            if i % 5 == 0 {
                s.add(7, 1, 2);
            }
            if i % 10 == 0 {
                s.add(9, 1, 2);
            }
        }
        assert_eq!(s.len(), TOP_K);
        let top = s.top(0);
        assert_eq!(top[0].value, 7, "{top:?}");
        assert_eq!(top[1].value, 9, "{top:?}");
        // Counts are upper bounds; count - error is a lower bound.
        assert!(top[0].count >= 2000 && top[0].count - top[0].error <= 2000);
        // `since` keeps only items seen from then on.
        assert!(s.top(2).iter().all(|x| x.value == 7 || x.value == 9));
    }

    #[test]
    fn merging_sketches_stays_bounded() {
        let mut a: TopK<u32> = TopK::default();
        let mut b: TopK<u32> = TopK::default();
        for i in 0..100 {
            a.add(i, 1, 1);
            b.add(i + 50, 1, 1);
            b.add(5, 3, 1);
        }
        a.merge(&b);
        assert_eq!(a.len(), TOP_K);
        assert_eq!(a.top(0)[0].value, 5);
    }

    /// A day boundary, so the test knows where hours and days start.
    const T0: i64 = 1_796_083_200;

    fn stats_of(hits: &[(i64, u16, bool)]) -> KeyStats {
        let mut s = KeyStats::default();
        for &(now, status, revoked) in hits {
            let mut h = hit([10, 0, 0, 1], "ua", now);
            h.status = status;
            h.revoked = revoked;
            s.add(&h, 1);
        }
        s
    }

    #[test]
    fn since_counts_the_window_by_hour_then_by_day() {
        let mut s = stats_of(&[
            (T0 + 600, 200, false),
            (T0 + 700, 404, false),
            (T0 + 3 * HOUR + 5, 200, false),
            (T0 + 3 * HOUR + 9, 401, true),
        ]);
        // The whole period, and from before it: every count, from the first request.
        assert_eq!(s.counts_since(0), (T0 + 600, [2, 0, 2, 0, 1]));
        assert_eq!(s.counts_since(T0 - DAY), (T0 + 600, [2, 0, 2, 0, 1]));
        // From inside hour 3: that hour only, counted from its start.
        assert_eq!(
            s.counts_since(T0 + 3 * HOUR + 7),
            (T0 + 3 * HOUR, [1, 0, 1, 0, 1])
        );
        assert_eq!(s.counts_since(T0 + HOUR), (T0 + 3 * HOUR, [1, 0, 1, 0, 1]));
        // After the last request: nothing, counted from the time asked.
        assert_eq!(s.counts_since(T0 + 5 * HOUR), (T0 + 5 * HOUR, [0; 5]));
        // Three days on: the first day's hours are one day bucket now.
        s.add(&hit([10, 0, 0, 1], "ua", T0 + 3 * DAY), 1);
        assert_eq!(s.counts_since(T0 + HOUR), (T0 + 600, [3, 0, 2, 0, 1]));
        assert_eq!(s.counts_since(T0 + DAY), (T0 + 3 * DAY, [1, 0, 0, 0, 0]));
        // Forty days on: the first day is dropped, so a window reaching into it gets every
        // count since tracking began (more than asked, never less).
        s.add(&hit([10, 0, 0, 1], "ua", T0 + 40 * DAY), 1);
        assert_eq!(s.counts_since(T0 + HOUR), (T0 + 600, [4, 0, 2, 0, 1]));
        assert_eq!(
            s.counts_since(T0 + 39 * DAY),
            (T0 + 40 * DAY, [1, 0, 0, 0, 0])
        );
    }

    #[test]
    fn redirects_count_as_requests() {
        let s = stats_of(&[(T0, 302, false), (T0 + 1, 200, false)]);
        assert_eq!(s.counts_since(0), (T0, [1, 1, 0, 0, 0]));
        let v = s.report("key_x", T0 + 1);
        assert_eq!(
            (v["requests"].as_u64(), v["by_status"]["3xx"].as_u64()),
            (Some(2), Some(1))
        );
    }

    #[test]
    fn buckets_stay_bounded_and_merge_across_nodes() {
        // A request every hour for 60 days: 48 hours and at most 36 days kept.
        let hourly: Vec<(i64, u16, bool)> =
            (0..60 * 24).map(|h| (T0 + h * HOUR, 200, false)).collect();
        let a = stats_of(&hourly);
        assert!(a.recent.list.len() <= 48 + 36, "{}", a.recent.list.len());
        let last = T0 + (60 * 24 - 1) * HOUR;
        // Ten days back falls in day 49's bucket: counted from its start (hours 1176..=1439).
        assert_eq!(
            a.counts_since(last - 10 * DAY),
            (T0 + 49 * DAY, [264, 0, 0, 0, 0])
        );
        // Another node's requests in the same hours add up; the window still holds.
        let b = stats_of(&[(last - 5, 500, false), (last - 2 * HOUR, 200, false)]);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.counts_since(last - HOUR), (last - HOUR, [2, 0, 0, 1, 0]));
        assert_eq!(m.counts_since(last - 10 * DAY).1, [265, 0, 0, 1, 0]);
        assert_eq!(m.s2xx, 60 * 24 + 1);
    }

    #[test]
    fn stats_from_before_buckets_count_the_whole_period_until_they_have_them() {
        // A file written before buckets existed: totals and no `recent`.
        let old = r#"{"first_seen":100,"last_seen":200,"s2xx":7,"s4xx":1}"#;
        let mut s: KeyStats = serde_json::from_str(old).expect("old stats");
        assert_eq!(s.counts_since(150), (100, [7, 0, 1, 0, 0]));
        s.add(&hit([10, 0, 0, 1], "ua", T0 + 30), 1);
        assert_eq!(s.counts_since(T0), (T0, [1, 0, 0, 0, 0]));
        assert_eq!(s.counts_since(T0 - 1), (100, [8, 0, 1, 0, 0]));
        // And a merge with such stats stays conservative.
        let mut fresh = stats_of(&[(T0 - DAY, 200, false)]);
        fresh.merge(&serde_json::from_str::<KeyStats>(old).expect("old stats"));
        assert_eq!(fresh.counts_since(T0 - DAY), (100, [8, 0, 1, 0, 0]));
    }

    /// Recording through runs (`Run`) keeps exactly the stats adding every hit one by one
    /// would: read mid-run and after, across hours, statuses, revocations, clocks that step
    /// back, and more distinct items than a sketch has slots.
    #[test]
    fn runs_count_exactly_as_each_hit_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Forensics::new(&dir.path().join("usage.json"), "n1");
        let ids = ["key_a", "key_b", "key_c"];
        let mut naive: Vec<KeyStats> = vec![KeyStats::default(); ids.len()];
        let mut last: Vec<Option<Hit>> = vec![None; ids.len()];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut now, mut repeats, mut reads) = (T0 + 3_000, 0, 0);
        for _ in 0..20_000 {
            now += match next(100) {
                0 => 1_800,
                1 => -3,
                n => (n % 3) as i64,
            };
            let k = next(ids.len() as u64) as usize;
            let mut h = match last[k] {
                Some(prev) if next(10) < 7 => prev,
                _ => Hit {
                    now,
                    status: [200, 204, 301, 404, 401, 503, 101][next(7) as usize],
                    route: [Some(Label::new(b"r1")), Some(Label::new(b"r2")), None]
                        [next(3) as usize],
                    ip: IpAddr::from([10, 0, (next(2)) as u8, next(40) as u8]),
                    user_agent: [Some(Label::new(b"a")), Some(Label::new(b"b")), None]
                        [next(3) as usize],
                    revoked: next(4) == 0,
                },
            };
            h.now = now;
            repeats += usize::from(last[k].is_some_and(|p| h.repeats(&p)));
            last[k] = Some(h);
            naive[k].add(&h, 1);
            f.record(&KeyId::of(ids[k]), h);
            if next(50) == 0 {
                reads += 1;
                assert_eq!(
                    f.get(ids[k]).as_ref(),
                    Some(&naive[k]),
                    "mid-run, {}",
                    ids[k]
                );
            }
        }
        assert!(
            repeats > 5_000 && reads > 100,
            "{repeats} repeats, {reads} reads"
        );
        let dirty = f.take_dirty();
        for (k, id) in ids.iter().enumerate() {
            assert_eq!(dirty.get(*id), Some(&naive[k]), "{id}");
            assert!(naive[k].ips.len() == TOP_K, "the address sketch overflowed");
        }
    }

    #[test]
    fn labels_are_cut_and_cleaned() {
        let long = "x".repeat(500);
        assert_eq!(Label::new(long.as_bytes()).as_str().len(), LABEL_LEN);
        assert_eq!(Label::new(b"a\nb\xff").as_str(), "a?b?");
    }

    #[test]
    fn key_count_is_capped_least_recent_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Forensics::with_cap(&dir.path().join("usage.json"), "n1", 100);
        for i in 0..1000i64 {
            f.record(
                &KeyId::of(&format!("key_{i}")),
                hit([10, 0, 0, 1], "ua", 1000 + i),
            );
        }
        assert!(f.len() <= 100, "{}", f.len());
        assert!(f.get("key_999").is_some(), "the most recent key is kept");
        assert!(f.get("key_0").is_none(), "the oldest is gone");
    }

    #[test]
    fn flush_keeps_nodes_apart_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let usage = dir.path().join("usage.json");
        let a = Forensics::new(&usage, "a");
        let b = Forensics::new(&usage, "b");
        a.record(&KeyId::of("key_x"), hit([10, 0, 0, 1], "curl/8", 100));
        a.record(&KeyId::of("key_x"), hit([10, 0, 0, 1], "curl/8", 101));
        let mut revoked = hit([10, 0, 0, 2], "python", 200);
        revoked.revoked = true;
        revoked.status = 401;
        b.record(&KeyId::of("key_x"), revoked);
        assert!(a.flush().expect("flush a"));
        assert!(b.flush().expect("flush b"));
        assert!(!a.flush().expect("nothing new"));
        let nodes = read(&path_for(&usage));
        let m = merged(&nodes, "key_x").expect("merged");
        assert_eq!((m.s2xx, m.s4xx, m.revoked_attempts), (2, 1, 1));
        assert_eq!((m.first_seen, m.last_seen), (100, 200));
        assert_eq!(m.ips.top(0)[0].value, IpAddr::from([10, 0, 0, 1]));
        // A restarted node resumes its own counts.
        let a2 = Forensics::new(&usage, "a");
        assert_eq!(a2.get("key_x").map(|s| s.s2xx), Some(2));
    }

    #[test]
    fn a_flush_rewrites_the_file_as_the_stats_parsed_would_and_trims_by_last_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let usage = dir.path().join("usage.json");
        let path = path_for(&usage);
        // Another node's section, written from a report (typed stats).
        let mut theirs = KeyStats::default();
        theirs.add(&hit([10, 0, 0, 9], "go-http", 50), 3);
        upsert_file(
            &path,
            "b",
            BTreeMap::from([("key_b".to_owned(), theirs.clone())]),
            10,
        )
        .expect("report");
        let a = Forensics::with_cap(&usage, "a", 3);
        for (i, id) in ["key_1", "key_2", "key_3"].iter().enumerate() {
            a.record(&KeyId::of(id), hit([10, 0, 0, 1], "curl/8", 100 + i as i64));
        }
        assert!(a.flush().expect("flush"));
        // Only key_1 is older than the key the next flush adds: the cap of 3 drops it.
        a.record(&KeyId::of("key_4"), hit([10, 0, 0, 1], "curl/8", 200));
        assert!(a.flush().expect("flush"));
        let nodes = read(&path);
        assert_eq!(
            nodes["b"]["key_b"], theirs,
            "another node's section is kept as it was"
        );
        let mine: Vec<&str> = nodes["a"].keys().map(String::as_str).collect();
        assert_eq!(mine, ["key_2", "key_3", "key_4"]);
        assert_eq!(Some(&nodes["a"]["key_4"]), a.get("key_4").as_ref());
        // Exactly the bytes a typed rewrite of the same stats gives.
        let text = std::fs::read(&path).expect("file");
        let typed = serde_json::to_vec(&FileBody {
            nodes: nodes.clone(),
        })
        .expect("json");
        assert_eq!(
            String::from_utf8_lossy(&text),
            String::from_utf8_lossy(&typed)
        );
    }

    #[test]
    fn a_file_readers_cannot_parse_is_not_carried_into_a_rewrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let usage = dir.path().join("usage.json");
        let path = path_for(&usage);
        std::fs::write(
            &path,
            br#"{"nodes":{"b":{"key_b":{"first_seen":"not a number"}}}}"#,
        )
        .expect("write");
        assert!(read(&path).is_empty(), "readers take it as empty");
        let a = Forensics::new(&usage, "a");
        a.record(&KeyId::of("key_1"), hit([10, 0, 0, 1], "curl/8", 100));
        assert!(a.flush().expect("flush"));
        let nodes = read(&path);
        assert_eq!(
            nodes.keys().collect::<Vec<_>>(),
            ["a"],
            "as a typed rewrite would"
        );
        assert!(nodes["a"].contains_key("key_1"));
    }
}
