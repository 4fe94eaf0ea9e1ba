//! Last use and request counts of each key: tracked in memory on the request path (one map
//! read and a few atomic adds, no lock held across requests) and flushed every touch interval,
//! never per request.
//!
//! Where it goes: with `[redis]`, to Redis (`redis::usage`: counters summed over the fleet,
//! latest use wins), which `keys list/show/stale` then read. Without Redis, to the usage file
//! beside the store; several gateways may share that directory (the shipped Kubernetes
//! manifests do), so a flush takes an exclusive lock on `<usage file>.lock`, re-reads the file
//! and adds only this node's counts since its last flush: nodes never overwrite each other.
//! A gateway that follows a control plane's feed sends its counts since its last report to
//! the control plane instead (`sync::report`), which adds them the same way (to Redis or to
//! its usage file).
//!
//! `requests` counts forwarded requests; `s2xx`/`s4xx`/`s5xx` count every authenticated
//! request by its final status (gateway refusals such as 429 included).

use crate::fastmap::FastMap;
use crate::keys::compact::KeyId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
struct Entry {
    last_used: AtomicI64,
    count: AtomicU64,
    classes: [AtomicU64; 3],
    /// Counted here since the last successful flush (requests, then the three classes).
    pending: [AtomicU64; 4],
    dirty: AtomicBool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A gateway process that reports its usage to a control plane (`sync::report`): its node
/// name and its boot number, random per process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub node: String,
    pub boot: u64,
}

/// One key's usage as written to the usage file (and read back from Redis).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Used {
    /// Unix seconds.
    pub last_used: i64,
    pub requests: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s2xx: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s4xx: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub s5xx: u64,
}

impl Used {
    /// Add another node's (or another flush's) counts: sums, and the latest use.
    pub fn merge(&mut self, o: &Used) {
        // Saturating: the counts come from reports over the network too.
        self.last_used = self.last_used.max(o.last_used);
        self.requests = self.requests.saturating_add(o.requests);
        self.s2xx = self.s2xx.saturating_add(o.s2xx);
        self.s4xx = self.s4xx.saturating_add(o.s4xx);
        self.s5xx = self.s5xx.saturating_add(o.s5xx);
    }
}

/// What one flush carries for one key: the counts since the last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub id: String,
    pub used: Used,
}

#[derive(Debug)]
pub struct Usage {
    path: PathBuf,
    /// Keyed by `KeyId`: a generated id is inline, so a lookup compares bytes in the map's
    /// slot rather than following a `String`'s pointer (a cache miss per request across many
    /// keys).
    entries: FastMap<KeyId, Entry>,
}

/// Read a usage file; a missing or unreadable one is empty (usage is advisory).
pub fn read(path: &Path) -> BTreeMap<String, Used> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The status class index (2xx, 4xx, 5xx) of a response; others are not counted.
fn class(status: u16) -> Option<usize> {
    match status {
        200..=299 => Some(0),
        400..=499 => Some(1),
        500..=599 => Some(2),
        _ => None,
    }
}

impl Usage {
    pub fn new(path: PathBuf) -> Usage {
        let entries = crate::fastmap::new();
        for (id, u) in read(&path) {
            let e = Entry::default();
            e.last_used.store(u.last_used, Ordering::Relaxed);
            e.count.store(u.requests, Ordering::Relaxed);
            for (c, n) in e.classes.iter().zip([u.s2xx, u.s4xx, u.s5xx]) {
                c.store(n, Ordering::Relaxed);
            }
            entries.insert(KeyId::of(&id), e);
        }
        Usage { path, entries }
    }

    fn with(&self, id: &KeyId, f: impl Fn(&Entry)) {
        if let Some(e) = self.entries.get(id) {
            return f(&e);
        }
        f(&self.entries.entry(id.clone()).or_default());
    }

    /// Record one forwarded request by `id` at `now` (Unix seconds).
    pub fn touch(&self, id: &KeyId, now: i64) {
        self.with(id, |e| Self::count_use(e, now));
    }

    fn count_use(e: &Entry, now: i64) {
        e.last_used.fetch_max(now, Ordering::Relaxed);
        e.count.fetch_add(1, Ordering::Relaxed);
        e.pending[0].fetch_add(1, Ordering::Relaxed);
        e.dirty.store(true, Ordering::Relaxed);
    }

    /// Record the final status of an authenticated request by `id`.
    pub fn status(&self, id: &KeyId, status: u16) {
        self.with(id, |e| Self::count_status(e, status));
    }

    fn count_status(e: &Entry, status: u16) {
        let Some(c) = class(status) else { return };
        e.classes[c].fetch_add(1, Ordering::Relaxed);
        e.pending[1 + c].fetch_add(1, Ordering::Relaxed);
        e.dirty.store(true, Ordering::Relaxed);
    }

    /// A forwarded request by `id` at `now` with its final `status`, in one map lookup, when
    /// it is not the key's first use on a later UTC day than its last: then nothing is
    /// recorded and false returned, for the caller to record it with the gauges it moves
    /// (`Gateway::forwarded`).
    pub fn same_day_use(&self, id: &KeyId, now: i64, status: u16) -> bool {
        let day = |t: i64| t.div_euclid(86_400);
        self.entries.get(id).is_some_and(|e| {
            if day(e.last_used.load(Ordering::Relaxed)) < day(now) {
                return false;
            }
            Self::count_use(&e, now);
            Self::count_status(&e, status);
            true
        })
    }

    fn used(e: &Entry) -> Used {
        let [s2xx, s4xx, s5xx] = [0, 1, 2].map(|i| e.classes[i].load(Ordering::Relaxed));
        Used {
            last_used: e.last_used.load(Ordering::Relaxed),
            requests: e.count.load(Ordering::Relaxed),
            s2xx,
            s4xx,
            s5xx,
        }
    }

    /// When `id` was last used (Unix seconds), if ever on this node's view.
    pub fn last_used(&self, id: &str) -> Option<i64> {
        self.entries
            .get(id)
            .map(|e| e.last_used.load(Ordering::Relaxed))
    }

    pub fn get(&self, id: &str) -> Option<Used> {
        self.entries.get(id).map(|e| Self::used(&e))
    }

    /// This node's view: what it loaded at start plus what it counted since.
    pub fn snapshot(&self) -> BTreeMap<String, Used> {
        self.entries
            .iter()
            .map(|e| (e.key().to_string(), Self::used(e.value())))
            .collect()
    }

    /// Take the counts since the last flush (the caller flushes them or gives them back).
    pub fn take_pending(&self) -> Vec<Delta> {
        let mut out = Vec::new();
        for e in self.entries.iter() {
            if !e.dirty.swap(false, Ordering::Relaxed) {
                continue;
            }
            let [requests, s2xx, s4xx, s5xx] =
                [0, 1, 2, 3].map(|i| e.pending[i].swap(0, Ordering::Relaxed));
            out.push(Delta {
                id: e.key().to_string(),
                used: Used {
                    last_used: e.last_used.load(Ordering::Relaxed),
                    requests,
                    s2xx,
                    s4xx,
                    s5xx,
                },
            });
        }
        out
    }

    /// A failed flush: keep the counts for the next one.
    pub fn restore(&self, deltas: Vec<Delta>) {
        for d in deltas {
            self.with(&KeyId::of(&d.id), |e| {
                let u = d.used;
                for (p, n) in e.pending.iter().zip([u.requests, u.s2xx, u.s4xx, u.s5xx]) {
                    p.fetch_add(n, Ordering::Relaxed);
                }
                e.dirty.store(true, Ordering::Relaxed);
            });
        }
    }

    /// Add this node's counts since the last flush to the usage file, under the file's lock.
    /// Returns whether it wrote.
    pub fn flush(&self) -> std::io::Result<bool> {
        let deltas = self.take_pending();
        if deltas.is_empty() {
            return Ok(false);
        }
        let result = merge_into_file(&self.path, &deltas);
        if result.is_err() {
            self.restore(deltas);
        }
        result.map(|()| true)
    }
}

/// Add `deltas` to the usage file at `path`, under its lock (every writer of the file does).
pub fn merge_into_file(path: &Path, deltas: &[Delta]) -> std::io::Result<()> {
    let _lock = crate::store::file::lock_beside(path)?;
    merge_locked(path, deltas)
}

/// `merge_into_file` for a caller that holds the file's lock (`lock_beside(path)`).
pub fn merge_locked(path: &Path, deltas: &[Delta]) -> std::io::Result<()> {
    settle_report(path)?;
    crate::store::file::write_json_atomic(path, &merged(path, deltas))
}

fn merged(path: &Path, deltas: &[Delta]) -> BTreeMap<String, Used> {
    let mut all = read(path);
    for d in deltas {
        all.entry(d.id.clone()).or_default().merge(&d.used);
    }
    all
}

/// The control plane's ledger of the report batches the usage file holds (`control::reports`:
/// a batch sent again must not count twice).
pub fn ledger_path(usage_file: &Path) -> PathBuf {
    crate::store::file::sibling(usage_file, ".reports.json")
}

/// A report batch's commit under way: the ledger that holds once the usage file with the
/// batch's counts (inode `usage_ino`) is in place.
#[derive(Serialize, Deserialize)]
struct Intent {
    usage_ino: u64,
    ledger: serde_json::Value,
}

fn intent_path(usage_file: &Path) -> PathBuf {
    crate::store::file::sibling(usage_file, ".reports.next.json")
}

/// Add a report batch's `deltas` to the usage file and make `ledger` its ledger, as one step.
/// Two renames cannot be one, so the new ledger is written first as an intent naming the new
/// usage file's inode, and the usage file's rename is the commit: a crash before it leaves
/// the old counts and the old ledger (the batch, sent again, is added then), a crash after it
/// leaves the new counts and an intent that `settle_report` turns into the ledger. Before,
/// a crash between the two renames left the counts without the ledger, and the batch sent
/// again counted twice. The caller holds the usage file's lock.
pub fn merge_report_locked<T: Serialize>(
    path: &Path,
    deltas: &[Delta],
    ledger: &T,
) -> std::io::Result<()> {
    stage_report(path, deltas, ledger)?.commit()?;
    settle_report(path)
}

/// `merge_report_locked` up to its commit: the new usage file staged, the intent written
/// (apart for the tests of a crash between the steps).
pub(crate) fn stage_report<T: Serialize>(
    path: &Path,
    deltas: &[Delta],
    ledger: &T,
) -> std::io::Result<crate::store::file::Staged> {
    settle_report(path)?;
    let staged = crate::store::file::stage_json(path, &merged(path, deltas))?;
    let intent = Intent {
        usage_ino: staged.ino(),
        ledger: serde_json::to_value(ledger)?,
    };
    crate::store::file::write_json_atomic(&intent_path(path), &intent)?;
    Ok(staged)
}

/// Finish a report batch's commit that a crash (or a failed ledger write) left half done:
/// its ledger written if its usage file is the one in place, dropped if not. Every writer of
/// the usage file calls this under the lock before it reads, so no other replacement can come
/// between a commit and its ledger.
pub fn settle_report(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let intent_path = intent_path(path);
    let bytes = match std::fs::read(&intent_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let in_place = std::fs::metadata(path).ok().map(|m| m.ino());
    match serde_json::from_slice::<Intent>(&bytes) {
        Ok(intent) if in_place == Some(intent.usage_ino) => {
            crate::store::file::write_json_atomic(&ledger_path(path), &intent.ledger)?;
        }
        Ok(_) => {}
        // Written atomically by this module: only an outside hand makes it unreadable. Its
        // batch is then taken as not applied (sent again, it may count twice).
        Err(e) => {
            tracing::warn!(error = %e, path = %intent_path.display(), "dropping an unreadable usage report intent")
        }
    }
    std::fs::remove_file(&intent_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_flush_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let u = Usage::new(path.clone());
        assert!(!u.flush().unwrap(), "nothing to write");
        u.touch(&KeyId::of("key_a"), 100);
        u.touch(&KeyId::of("key_a"), 90);
        u.status(&KeyId::of("key_a"), 200);
        u.status(&KeyId::of("key_a"), 429);
        u.touch(&KeyId::of("key_b"), 50);
        assert!(u.flush().unwrap());
        assert!(!u.flush().unwrap());
        let again = Usage::new(path.clone());
        assert_eq!(
            again.get("key_a"),
            Some(Used {
                last_used: 100,
                requests: 2,
                s2xx: 1,
                s4xx: 1,
                s5xx: 0,
            })
        );
        assert_eq!(read(&path).len(), 2);
    }

    #[test]
    fn nodes_sharing_a_file_add_up_instead_of_overwriting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let nodes: Vec<Usage> = (0..3).map(|_| Usage::new(path.clone())).collect();
        for (i, n) in nodes.iter().enumerate() {
            for _ in 0..=i {
                n.touch(&KeyId::of("key_a"), 100 + i as i64);
            }
        }
        std::thread::scope(|s| {
            for n in &nodes {
                s.spawn(|| n.flush().unwrap());
            }
        });
        nodes[0].touch(&KeyId::of("key_a"), 99);
        nodes[0].flush().unwrap();
        let u = read(&path)["key_a"];
        assert_eq!(u.requests, 1 + 2 + 3 + 1);
        assert_eq!(u.last_used, 102);
    }
}
