//! Last use of each key: tracked in memory on the request path (one map read and two atomic
//! stores, no lock held across requests) and flushed every touch interval to a usage file
//! beside the store (temp file + rename), which survives restarts and feeds `keys stale`.

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
struct Entry {
    last_used: AtomicI64,
    count: AtomicU64,
    dirty: AtomicBool,
}

/// One key's usage as written to the usage file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Used {
    /// Unix seconds.
    pub last_used: i64,
    pub requests: u64,
}

#[derive(Debug)]
pub struct Usage {
    path: PathBuf,
    entries: DashMap<String, Entry>,
}

/// Read a usage file; a missing or unreadable one is empty (usage is advisory).
pub fn read(path: &Path) -> BTreeMap<String, Used> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

impl Usage {
    pub fn new(path: PathBuf) -> Usage {
        let entries = DashMap::new();
        for (id, u) in read(&path) {
            entries.insert(
                id,
                Entry {
                    last_used: AtomicI64::new(u.last_used),
                    count: AtomicU64::new(u.requests),
                    dirty: AtomicBool::new(false),
                },
            );
        }
        Usage { path, entries }
    }

    /// Record one authenticated request by `id` at `now` (Unix seconds).
    pub fn touch(&self, id: &str, now: i64) {
        if let Some(e) = self.entries.get(id) {
            e.last_used.fetch_max(now, Ordering::Relaxed);
            e.count.fetch_add(1, Ordering::Relaxed);
            e.dirty.store(true, Ordering::Relaxed);
            return;
        }
        let e = self.entries.entry(id.to_owned()).or_default();
        e.last_used.fetch_max(now, Ordering::Relaxed);
        e.count.fetch_add(1, Ordering::Relaxed);
        e.dirty.store(true, Ordering::Relaxed);
    }

    pub fn get(&self, id: &str) -> Option<Used> {
        self.entries.get(id).map(|e| Used {
            last_used: e.last_used.load(Ordering::Relaxed),
            requests: e.count.load(Ordering::Relaxed),
        })
    }

    pub fn snapshot(&self) -> BTreeMap<String, Used> {
        self.entries
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    Used {
                        last_used: e.last_used.load(Ordering::Relaxed),
                        requests: e.count.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Write the usage file if anything changed since the last flush. Returns whether it wrote.
    pub fn flush(&self) -> std::io::Result<bool> {
        let mut changed = false;
        for e in self.entries.iter() {
            changed |= e.dirty.swap(false, Ordering::Relaxed);
        }
        if !changed {
            return Ok(false);
        }
        let bytes = serde_json::to_vec(&self.snapshot())?;
        let result = crate::store::file::write_atomic(&self.path, &bytes);
        if result.is_err() {
            // Keep the entries dirty so the next flush retries.
            for e in self.entries.iter() {
                e.dirty.store(true, Ordering::Relaxed);
            }
        }
        result.map(|()| true)
    }
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
        u.touch("key_a", 100);
        u.touch("key_a", 90);
        u.touch("key_b", 50);
        assert!(u.flush().unwrap());
        assert!(!u.flush().unwrap());
        let again = Usage::new(path.clone());
        assert_eq!(
            again.get("key_a"),
            Some(Used {
                last_used: 100,
                requests: 2
            })
        );
        assert_eq!(read(&path).len(), 2);
    }
}
