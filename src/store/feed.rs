//! The feed: the record log served over HTTP as newline-delimited JSON, and the state the
//! control plane keeps to serve it.
//!
//! Protocol (one JSON object per line):
//! - `{"type":"snapshot_begin","rev":N,"count":C}`, C × `{"type":"record","record":{…}}`,
//!   `{"type":"snapshot_end","rev":N}` — a whole table, applied atomically at the end;
//!   sent when the client's `after` is absent or older than what the log still holds.
//! - `{"type":"record","record":{…}}` — one new record version, in revision order.
//! - `{"type":"heartbeat","rev":N,"time_ms":T}` — every few seconds when idle; carries the
//!   current revision and the control plane's clock (for staleness and skew).
//!
//! The control plane follows the same store file as a gateway does, so records written by the
//! CLI and by the API reach the feed the same way. New records fan out through a bounded
//! broadcast: a slow reader lags, is disconnected and resumes; it never stalls writers or
//! other readers.

use crate::keys::record::KeyRecord;
use crate::store::file::{Follower, LogFile, Update};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

/// A line of the feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeedLine {
    SnapshotBegin { rev: u64, count: usize },
    Record { record: Box<KeyRecord> },
    SnapshotEnd { rev: u64 },
    Heartbeat { rev: u64, time_ms: i64 },
}

impl FeedLine {
    pub fn to_bytes(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }
}

/// Something subscribers must react to.
#[derive(Debug, Clone)]
pub enum Event {
    Record(Arc<KeyRecord>),
    /// The log was replaced (compaction): subscribers reconnect and resume.
    Reset,
}

#[derive(Debug, Default)]
struct Log {
    /// Every record with `rev > base` is in `entries`, in order; older history is gone
    /// (compacted), so a client behind `base` needs a snapshot.
    base: u64,
    entries: Vec<Arc<KeyRecord>>,
    latest: HashMap<String, Arc<KeyRecord>>,
    rev: u64,
    loaded: bool,
}

/// What a new subscriber gets first.
pub enum Catchup {
    Snapshot {
        rev: u64,
        records: Vec<Arc<KeyRecord>>,
    },
    Since(Vec<Arc<KeyRecord>>),
}

#[derive(Debug)]
pub struct FeedState {
    log: RwLock<Log>,
    tx: broadcast::Sender<Event>,
}

impl FeedState {
    pub fn new(buffer: usize) -> Arc<FeedState> {
        let (tx, _) = broadcast::channel(buffer.max(16));
        Arc::new(FeedState {
            log: RwLock::new(Log::default()),
            tx,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn revision(&self) -> u64 {
        self.log.read().map(|l| l.rev).unwrap_or(0)
    }

    pub fn loaded(&self) -> bool {
        self.log.read().map(|l| l.loaded).unwrap_or(false)
    }

    /// Everything a client at `after` is missing (subscribe first, then call this, and skip
    /// broadcast records at or below the returned revision).
    pub fn catchup(&self, after: Option<u64>) -> (u64, Catchup) {
        let Ok(log) = self.log.read() else {
            return (0, Catchup::Since(vec![]));
        };
        match after {
            Some(a) if a >= log.base && a <= log.rev => {
                let start = log.entries.partition_point(|r| r.rev <= a);
                (log.rev, Catchup::Since(log.entries[start..].to_vec()))
            }
            _ => {
                let mut records: Vec<Arc<KeyRecord>> = log.latest.values().cloned().collect();
                records.sort_by_key(|r| r.rev);
                (
                    log.rev,
                    Catchup::Snapshot {
                        rev: log.rev,
                        records,
                    },
                )
            }
        }
    }

    /// Apply what the store follower found.
    pub fn apply(&self, update: Update) {
        let Ok(mut log) = self.log.write() else {
            return;
        };
        match update {
            Update::Unchanged => {}
            Update::Appended(parsed) => {
                for r in parsed.records {
                    let r = Arc::new(r);
                    log.rev = log.rev.max(r.rev);
                    log.latest.insert(r.id.clone(), r.clone());
                    log.entries.push(r.clone());
                    let _ = self.tx.send(Event::Record(r));
                }
                log.rev = log.rev.max(parsed.rev);
            }
            Update::Replaced(parsed) => {
                let first_load = !log.loaded;
                let base = if first_load {
                    parsed.compacted_at.unwrap_or(0)
                } else {
                    parsed.rev
                };
                let mut entries = Vec::new();
                let mut latest = HashMap::new();
                for r in parsed.records {
                    let r = Arc::new(r);
                    latest.insert(r.id.clone(), r.clone());
                    if r.rev > base {
                        entries.push(r);
                    }
                }
                *log = Log {
                    base,
                    entries,
                    latest,
                    rev: parsed.rev,
                    loaded: true,
                };
                if !first_load {
                    let _ = self.tx.send(Event::Reset);
                }
            }
        }
    }

    /// Follow the store file on a thread (same follower as the gateway's). The first load
    /// happens before this returns, so a control plane that reports listening can serve the
    /// feed at once (rather than answering 503 until the thread's first poll).
    pub fn follow(
        self: &Arc<Self>,
        store: std::path::PathBuf,
        poll: std::time::Duration,
    ) -> std::io::Result<()> {
        let state = self.clone();
        let mut follower = Follower::new(LogFile::new(&store));
        let mut last_error = String::new();
        match follower.poll() {
            Ok(u) => state.apply(u),
            Err(e) => {
                tracing::error!(error = %e, "control plane: store problem; retrying");
                last_error = e.to_string();
            }
        }
        crate::store::follow::watch_file("keygate-feed-store", follower, poll, move |result| {
            match result {
                Ok(u) => state.apply(u),
                Err(e) => {
                    if e.to_string() != last_error {
                        tracing::error!(error = %e, "control plane: store problem; serving the last good log");
                        last_error = e.to_string();
                    }
                }
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;
    use crate::store::file::Parsed;

    fn rec(id: &str, rev: u64) -> KeyRecord {
        KeyRecord {
            rev,
            ..sample(id, Digest([rev as u8; 32]))
        }
    }

    #[test]
    fn catchup_resumes_or_snapshots() {
        let s = FeedState::new(16);
        s.apply(Update::Replaced(Parsed {
            records: vec![rec("a", 1), rec("b", 2)],
            rev: 2,
            ..Parsed::default()
        }));
        let mut rx = s.subscribe();
        s.apply(Update::Appended(Parsed {
            records: vec![rec("a", 3)],
            rev: 3,
            ..Parsed::default()
        }));
        assert!(matches!(rx.try_recv(), Ok(Event::Record(r)) if r.rev == 3));
        match s.catchup(Some(1)).1 {
            Catchup::Since(v) => {
                assert_eq!(v.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![2, 3])
            }
            Catchup::Snapshot { .. } => panic!("should resume"),
        }
        assert!(
            matches!(s.catchup(None).1, Catchup::Snapshot { rev: 3, ref records } if records.len() == 2)
        );
        // Compaction: clients behind it need a snapshot, clients at its revision do not.
        s.apply(Update::Replaced(Parsed {
            records: vec![rec("a", 3), rec("b", 2)],
            rev: 3,
            compacted_at: Some(3),
            ..Parsed::default()
        }));
        assert!(matches!(rx.try_recv(), Ok(Event::Reset)));
        assert!(matches!(s.catchup(Some(2)).1, Catchup::Snapshot { .. }));
        assert!(matches!(s.catchup(Some(3)).1, Catchup::Since(ref v) if v.is_empty()));
    }
}
