//! Leak forensics: per key, requests by status class and route, the top source IPs and user
//! agents, first/last seen and attempts after revocation. Answers the runbook's "check recent
//! usage and suspicious IP addresses" for one key (`keys usage ID`, `GET /v1/api-keys/{id}/usage`).
//!
//! Memory is bounded twice: each list is a Space-Saving top-k sketch (`TOP_K` slots; a new
//! item replaces the smallest one, so heavy hitters stay and counts are upper bounds with a
//! known error), and sketches are kept for at most `MAX_KEYS` recently active keys, outside
//! the key table (the least recently seen tenth is dropped when full). User agents and route
//! names are copied into a fixed 64-byte label, so recording into an existing key's sketch
//! allocates nothing.
//!
//! Persistence: single node, `<usage file>.forensics.json` beside the usage file, with one
//! section per node (several gateways may share the directory; each replaces only its own
//! keys in its own section, under the same kind of lock as the usage file). Fleet: gateways
//! send the keys that changed since the last report with their usage reports; the control
//! plane keeps them per node and writes the same file.

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
}

impl KeyStats {
    fn add(&mut self, h: &Hit) {
        if self.first_seen == 0 || h.now < self.first_seen {
            self.first_seen = h.now;
        }
        self.last_seen = self.last_seen.max(h.now);
        match h.status {
            200..=299 => self.s2xx += 1,
            400..=499 => self.s4xx += 1,
            500..=599 => self.s5xx += 1,
            _ => {}
        }
        if let Some(r) = h.route {
            self.routes.add(r, 1, h.now);
        }
        self.ips.add(h.ip, 1, h.now);
        self.user_agents
            .add(h.user_agent.unwrap_or(Label::new(b"-")), 1, h.now);
        if h.revoked {
            self.revoked_attempts += 1;
            if self.first_revoked_attempt == 0 {
                self.first_revoked_attempt = h.now;
            }
            self.last_revoked_attempt = self.last_revoked_attempt.max(h.now);
            self.revoked_ips.add(h.ip, 1, h.now);
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
        serde_json::json!({
            "id": id,
            "since": since,
            "tracked_since": self.first_seen,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "seen_since": self.last_seen >= since,
            "requests": self.s2xx + self.s4xx + self.s5xx,
            "by_status": {"2xx": self.s2xx, "4xx": self.s4xx, "5xx": self.s5xx},
            "by_route": slots(self.routes.top(since)),
            "top_ips": ips(self.ips.top(since)),
            "top_user_agents": slots(self.user_agents.top(since)),
            "attempts_after_revocation": {
                "count": self.revoked_attempts,
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
        "requests:    {} (2xx {}, 4xx {}, 5xx {})",
        v["requests"], b["2xx"], b["4xx"], b["5xx"]
    );
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

#[derive(Debug, Default)]
struct Tracked {
    stats: KeyStats,
    /// Changed since the last flush or report.
    dirty: bool,
}

/// The in-memory sketches of one gateway.
#[derive(Debug)]
pub struct Forensics {
    path: PathBuf,
    node: String,
    keys: crate::fastmap::FastMap<String, Mutex<Tracked>>,
    cap: usize,
    any_dirty: AtomicBool,
}

/// The file: node → key id → stats.
pub type Nodes = BTreeMap<String, BTreeMap<String, KeyStats>>;

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileBody {
    #[serde(default)]
    nodes: Nodes,
}

/// Where the sketches of the usage file `usage_file` are kept.
pub fn path_for(usage_file: &Path) -> PathBuf {
    let mut p = usage_file.as_os_str().to_owned();
    p.push(".forensics.json");
    PathBuf::from(p)
}

/// Read the forensics file; missing or unreadable is empty (forensics is advisory).
pub fn read(path: &Path) -> Nodes {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<FileBody>(&b).ok())
        .map(|f| f.nodes)
        .unwrap_or_default()
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
fn trim(keys: &mut BTreeMap<String, KeyStats>, cap: usize) {
    if keys.len() <= cap {
        return;
    }
    let mut seen: Vec<(i64, String)> = keys.iter().map(|(k, s)| (s.last_seen, k.clone())).collect();
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
        trim(&mut mine, cap);
        for (id, stats) in mine {
            keys.insert(
                id,
                Mutex::new(Tracked {
                    stats,
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
    pub fn record(&self, id: &str, hit: Hit) {
        if let Some(t) = self.keys.get(id) {
            let mut t = lock(&t);
            t.stats.add(&hit);
            t.dirty = true;
        } else {
            if self.keys.len() >= self.cap {
                self.evict();
            }
            let t = self.keys.entry(id.to_owned()).or_default();
            let mut t = lock(&t);
            t.stats.add(&hit);
            t.dirty = true;
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
        let mut seen: Vec<(i64, String)> = self
            .keys
            .iter()
            .map(|e| (lock(e.value()).stats.last_seen, e.key().clone()))
            .collect();
        seen.sort();
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
        self.keys.get(id).map(|t| lock(&t).stats.clone())
    }

    /// The keys changed since the last call (cumulative stats each), marked clean.
    pub fn take_dirty(&self) -> BTreeMap<String, KeyStats> {
        if !self.any_dirty.swap(false, Ordering::SeqCst) {
            return BTreeMap::new();
        }
        let mut out = BTreeMap::new();
        for e in self.keys.iter() {
            let mut t = lock(e.value());
            if std::mem::take(&mut t.dirty) {
                out.insert(e.key().clone(), t.stats.clone());
            }
        }
        out
    }

    /// A failed flush or report: mark those keys changed again.
    pub fn restore(&self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if let Some(t) = self.keys.get(&id) {
                lock(&t).dirty = true;
                self.mark_dirty();
            }
        }
    }

    /// Write the changed keys into this node's section of the file, under its lock.
    pub fn flush(&self) -> std::io::Result<bool> {
        let changed = self.take_dirty();
        if changed.is_empty() {
            return Ok(false);
        }
        let ids: Vec<String> = changed.keys().cloned().collect();
        let result = upsert_file(&self.path, &self.node, changed, self.cap);
        if result.is_err() {
            self.restore(ids);
        }
        result.map(|()| true)
    }
}

/// Replace `node`'s stats of the given keys in the file at `path` (other nodes untouched).
pub fn upsert_file(
    path: &Path,
    node: &str,
    changed: BTreeMap<String, KeyStats>,
    cap: usize,
) -> std::io::Result<()> {
    let _lock = crate::store::file::lock_beside(path)?;
    let mut body = FileBody { nodes: read(path) };
    let mine = body.nodes.entry(node.to_owned()).or_default();
    mine.extend(changed);
    trim(mine, cap);
    crate::store::file::write_atomic(path, &serde_json::to_vec(&body)?)
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
            f.record(&format!("key_{i}"), hit([10, 0, 0, 1], "ua", 1000 + i));
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
        a.record("key_x", hit([10, 0, 0, 1], "curl/8", 100));
        a.record("key_x", hit([10, 0, 0, 1], "curl/8", 101));
        let mut revoked = hit([10, 0, 0, 2], "python", 200);
        revoked.revoked = true;
        revoked.status = 401;
        b.record("key_x", revoked);
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
}
