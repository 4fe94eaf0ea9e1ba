//! The feed: the record log served over HTTP as newline-delimited JSON, and the state the
//! control plane keeps to serve it.
//!
//! Protocol (one JSON object per line). A client asks `GET /v1/feed?nonce=N&log=ID&after=REV`
//! with a fresh nonce (up to 64 hex digits) and the log id and revision it holds (from memory
//! or its sealed cache):
//! - `{"type":"resume","log":ID,"rev":N}` then the records after REV — when ID is the log the
//!   control plane serves and REV is within what it still holds;
//! - otherwise `{"type":"snapshot_begin","log":ID,"rev":N,"count":C}`, C ×
//!   `{"type":"record","record":{…}}`, `{"type":"snapshot_end","rev":N}` — a whole table,
//!   applied atomically at the end (a new log id: the client reloads whole);
//! - `{"type":"record","record":{…}}` — one new record version, in revision order, signed for
//!   the log named at the start (clients verify every MAC, `store::seal`).
//! - `{"type":"heartbeat","rev":N,"time_ms":T}` — every few seconds when idle; carries the
//!   current revision and the control plane's clock (for staleness and skew).
//!
//! Every line also carries `"seal":"<version>:<64 hex>"`: HMAC-SHA256, under a key derived
//! from the hash secret, over the nonce, every byte sent before the line on this connection
//! and the line's JSON without its seal (`store::seal`). The reader checks it before acting
//! on the line, so a line forged, dropped, added, reordered or replayed from another
//! connection ends the session, and the reader resumes from what it holds.
//!
//! The control plane follows the same store file as a gateway does, so records written by the
//! CLI and by the API reach the feed the same way. New records fan out through a bounded
//! broadcast: a slow reader lags, is disconnected and resumes; it never stalls writers or
//! other readers.

use crate::keys::record::{unrevokes, KeyRecord};
use crate::keys::table::KeyTable;
use crate::store::file::{Follower, LogFile, StoreError, Update};
use crate::store::seal::{Chain, LogId, SealError, Signer, Tag};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, watch};

/// The longest feed line a reader takes (`sync::feed`): what it may buffer before a newline.
/// One record is one line, and records written now are at most `keys::ops::MAX_RECORD_BYTES`
/// (64 KiB). This was 1 MiB, and before review 134 nothing bounded a record: a record of a
/// megabyte or more, written by such a version, stopped every gateway at the revision before
/// it and kept new ones from ever loading. The larger limit lets those records through (16
/// MiB, the bound the Redis store's client puts on one value, `redis::resp`); a reader holds
/// at most this much of one line, once. A line still longer is reported by the control plane
/// when it sends it ([`FeedLine::sealed`]).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// A line of the feed. Every line carries `seal`, the stream's MAC (`FeedLine::sealed`,
/// `store::seal`); a record also carries its own MAC inside.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeedLine {
    Resume {
        log: LogId,
        rev: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Tag>,
    },
    SnapshotBegin {
        log: LogId,
        rev: u64,
        count: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Tag>,
    },
    Record {
        record: Box<KeyRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Tag>,
    },
    SnapshotEnd {
        rev: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Tag>,
    },
    Heartbeat {
        rev: u64,
        time_ms: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Tag>,
    },
}

impl FeedLine {
    pub fn record(record: KeyRecord) -> FeedLine {
        FeedLine::Record {
            record: Box::new(record),
            seal: None,
        }
    }

    /// The line's name (for errors) and its seal.
    fn seal_slot(&mut self) -> (&'static str, &mut Option<Tag>) {
        match self {
            FeedLine::Resume { seal, .. } => ("resume", seal),
            FeedLine::SnapshotBegin { seal, .. } => ("snapshot_begin", seal),
            FeedLine::Record { seal, .. } => ("record", seal),
            FeedLine::SnapshotEnd { seal, .. } => ("snapshot_end", seal),
            FeedLine::Heartbeat { seal, .. } => ("heartbeat", seal),
        }
    }

    /// The control plane's side: the line's bytes as sent on the stream `chain` seals. The
    /// line gets the tag over everything sent before it and its own JSON, written as its last
    /// field (the JSON is `{…}` → `{…,"seal":"<tag>"}`, serialised once); then its bytes go
    /// into the chain.
    pub fn sealed(mut self, chain: &mut Chain) -> Bytes {
        *self.seal_slot().1 = None;
        let mut v = serde_json::to_vec(&self).unwrap_or_default();
        let tag = chain.tag(&v);
        v.pop();
        v.extend_from_slice(sealed_end(&tag).as_bytes());
        if v.len() > MAX_LINE {
            // Sent anyway (dropping a version could drop a revocation), but readers will refuse
            // it and stop at the revision before it: name the key and the way out.
            if let FeedLine::Record { record, .. } = &self {
                tracing::error!(
                    key_id = %record.id,
                    rev = record.rev,
                    bytes = v.len(),
                    limit = MAX_LINE,
                    "feed: a record longer than a feed line may be; gateways stop before it. \
                     Remove its labels (PATCH with empty values, or keygate keys update --label k=)"
                );
            }
        }
        chain.update(&v);
        Bytes::from(v)
    }

    /// The reader's side of [`FeedLine::sealed`], for a line parsed from `raw` (its bytes with
    /// the newline), before anything acts on it. The tag is checked against the bytes that
    /// came (the line without its seal field), not a re-serialisation of what was parsed. The
    /// chain starts at the stream's first line, keyed with the secret version its tag names.
    pub fn check(
        &mut self,
        raw: &[u8],
        chain: &mut Option<Chain>,
        signer: &Signer,
        nonce: &[u8],
    ) -> Result<(), SealError> {
        let (what, slot) = self.seal_slot();
        let tag = slot.take().ok_or(SealError::UnsignedLine(what))?;
        let unsigned = raw
            .strip_suffix(sealed_end(&tag).as_bytes())
            .ok_or(SealError::BadLine(what))?;
        let c = match chain {
            Some(c) => c,
            None => chain.insert(signer.feed_chain_for(tag.version, nonce)?),
        };
        if !c.verify(&[unsigned, b"}"].concat(), &tag) {
            return Err(SealError::BadLine(what));
        }
        c.update(raw);
        Ok(())
    }
}

/// How a sealed line ends: its seal as the last field, the closing brace, the newline. The
/// line without it (and with `}`) is the JSON the seal covers.
fn sealed_end(tag: &Tag) -> String {
    format!(",\"seal\":\"{tag}\"}}\n")
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
    /// The latest versions indexed by digest, for `POST /v1/api-keys/lookup` and `/verify`:
    /// the same table and lookup a gateway authenticates with. Replaced whole on a new log.
    table: Arc<KeyTable>,
    /// Every record with `rev > base` is in `entries`, in order; older history is gone
    /// (compacted), so a client behind `base` needs a snapshot.
    base: u64,
    entries: Vec<Arc<KeyRecord>>,
    /// The latest version of every key, in id order: the control plane's listings page
    /// through it by id (`FeedState::page`), so a page costs its own size, not the log's.
    latest: BTreeMap<String, Arc<KeyRecord>>,
    log: LogId,
    rev: u64,
    loaded: bool,
}

/// What a new subscriber gets first.
pub enum Catchup {
    Snapshot {
        log: LogId,
        rev: u64,
        records: Vec<Arc<KeyRecord>>,
    },
    Since {
        log: LogId,
        records: Vec<Arc<KeyRecord>>,
    },
}

/// Most keys one listing page looks at (`FeedState::page`): ~5-15 ms at 1M keys, so a page
/// stays within 50 ms even on a busy machine.
pub const PAGE_SCAN: usize = 50_000;

#[derive(Debug)]
pub struct FeedState {
    log: RwLock<Log>,
    tx: broadcast::Sender<Event>,
    /// The revision applied, for readers waiting to see a write (`caught_up`).
    applied: watch::Sender<u64>,
}

impl FeedState {
    pub fn new(buffer: usize) -> Arc<FeedState> {
        let (tx, _) = broadcast::channel(buffer.max(16));
        Arc::new(FeedState {
            log: RwLock::new(Log::default()),
            tx,
            applied: watch::Sender::new(0),
        })
    }

    /// Feed readers connected now.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn revision(&self) -> u64 {
        self.log.read().map(|l| l.rev).unwrap_or(0)
    }

    /// The log served.
    pub fn log_id(&self) -> LogId {
        self.log.read().map(|l| l.log).unwrap_or(LogId::NONE)
    }

    pub fn loaded(&self) -> bool {
        self.log.read().map(|l| l.loaded).unwrap_or(false)
    }

    /// The latest version of every key (for the control plane's periodic rotation check).
    pub fn latest(&self) -> Vec<Arc<KeyRecord>> {
        self.log
            .read()
            .map(|l| l.latest.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The served keys as a gateway's table (for key lookup and verification).
    pub fn table(&self) -> Arc<KeyTable> {
        self.log.read().map(|l| l.table.clone()).unwrap_or_default()
    }

    /// The latest version of one key.
    pub fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.log.read().ok()?.latest.get(id).cloned()
    }

    /// One page of the latest versions in id order: up to `limit` records with an id after
    /// `after` that `keep` accepts, and the cursor to continue from (`None`: nothing follows).
    /// Ids are fixed at creation, so a cursor (an id) stays valid while keys are added: a new
    /// key lands on a later page or before the cursor, never shifting a page already served.
    /// A page looks at no more than [`PAGE_SCAN`] keys, so a filter that matches few keys
    /// costs bounded time per page: such a page may be short, even empty, with a cursor.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&KeyRecord) -> bool,
    ) -> (Vec<Arc<KeyRecord>>, Option<String>) {
        let Ok(log) = self.log.read() else {
            return (vec![], None);
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rows: Vec<Arc<KeyRecord>> = Vec::with_capacity(limit.min(1024));
        let mut looked: Option<&String> = None;
        for (n, (id, r)) in log
            .latest
            .range::<str, _>((from, Bound::Unbounded))
            .enumerate()
        {
            if n == PAGE_SCAN {
                // Out of budget: continue after the last key looked at.
                return (rows, looked.cloned());
            }
            looked = Some(id);
            if !keep(r) {
                continue;
            }
            if rows.len() == limit {
                let next = rows.last().map(|r| r.id.clone());
                return (rows, next);
            }
            rows.push(r.clone());
        }
        (rows, None)
    }

    /// Wait (at most `within`) until revision `rev` is applied; false on timeout.
    pub async fn caught_up(&self, rev: u64, within: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|r| *r >= rev))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// Every revoked key this control plane has served (kept across a replaced log).
    pub fn revoked(&self) -> Vec<KeyRecord> {
        self.log
            .read()
            .map(|l| {
                l.latest
                    .values()
                    .filter(|r| r.revoked_at.is_some())
                    .map(|r| (**r).clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything a client at (`log`, `after`) is missing (subscribe first, then call this,
    /// and skip broadcast records at or below the returned revision). A client of another log
    /// (or none) gets a snapshot: resuming by revision across logs would mix two histories.
    pub fn catchup(&self, client_log: Option<LogId>, after: Option<u64>) -> (u64, Catchup) {
        let Ok(log) = self.log.read() else {
            return (
                0,
                Catchup::Since {
                    log: LogId::NONE,
                    records: vec![],
                },
            );
        };
        match after {
            Some(a) if client_log == Some(log.log) && a >= log.base && a <= log.rev => {
                let start = log.entries.partition_point(|r| r.rev <= a);
                (
                    log.rev,
                    Catchup::Since {
                        log: log.log,
                        records: log.entries[start..].to_vec(),
                    },
                )
            }
            _ => {
                let mut records: Vec<Arc<KeyRecord>> = log.latest.values().cloned().collect();
                records.sort_by_key(|r| r.rev);
                (
                    log.rev,
                    Catchup::Snapshot {
                        log: log.log,
                        rev: log.rev,
                        records,
                    },
                )
            }
        }
    }

    /// Apply what the store follower found. Returns the revoked records that the file would
    /// un-revoke (a forged or replaced store): they are not served, and the caller writes
    /// their revocation again so the log itself agrees.
    pub fn apply(&self, update: Update) -> Vec<KeyRecord> {
        let Ok(mut log) = self.log.write() else {
            return vec![];
        };
        let mut unrevoked = Vec::new();
        match update {
            Update::Unchanged => {}
            Update::Appended(parsed) => {
                for r in parsed.records {
                    if let Some(held) = log.latest.get(&r.id).filter(|h| unrevokes(Some(h), &r)) {
                        unrevoked.push((**held).clone());
                        continue;
                    }
                    log.table.apply(r.clone());
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
                let mut latest = BTreeMap::new();
                for r in parsed.records {
                    if let Some(held) = log.latest.get(&r.id).filter(|h| unrevokes(Some(h), &r)) {
                        unrevoked.push((**held).clone());
                        continue;
                    }
                    let r = Arc::new(r);
                    latest.insert(r.id.clone(), r.clone());
                    if r.rev > base {
                        entries.push(r);
                    }
                }
                let table = KeyTable::from_records(
                    latest.values().map(|r| (**r).clone()),
                    parsed.log,
                    parsed.rev,
                );
                *log = Log {
                    table: Arc::new(table),
                    base,
                    entries,
                    latest,
                    log: parsed.log,
                    rev: parsed.rev,
                    loaded: true,
                };
                if !first_load {
                    let _ = self.tx.send(Event::Reset);
                }
            }
        }
        self.applied.send_replace(log.rev);
        unrevoked
    }

    /// Follow the store file on a thread (same follower as the gateway's). The first load
    /// happens before this returns, so a control plane that reports listening can serve the
    /// feed at once (rather than answering 503 until the thread's first poll).
    ///
    /// The control plane is a writer too, so it repairs what it finds: a store replaced under
    /// it by an older copy of its log (a restore) is continued as a new log after the highest
    /// revision it served, with every revocation it served re-applied (`LogFile::continue_after`);
    /// a file that would un-revoke keys gets their revocations written again (`on_unrevoke`).
    pub fn follow(
        self: &Arc<Self>,
        store: LogFile,
        poll: std::time::Duration,
        errors: prometheus::IntCounterVec,
        on_unrevoke: impl Fn(&LogFile, Vec<KeyRecord>) + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.clone();
        let mut follower = Follower::new(store.clone());
        let mut last_error = String::new();
        let mut handle = move |_: &mut Follower, result: Result<Update, StoreError>| match result {
            Ok(u) => {
                last_error.clear();
                let unrevoked = state.apply(u);
                if !unrevoked.is_empty() {
                    errors.with_label_values(&["unrevoke"]).inc();
                    on_unrevoke(&store, unrevoked);
                }
            }
            Err(e @ (StoreError::Rollback { .. } | StoreError::Downgrade { .. })) => {
                errors.with_label_values(&[e.kind()]).inc();
                tracing::error!(error = %e, "control plane: the store was replaced by an older or unsigned copy; continuing it as a new log");
                match store.continue_after(state.revision(), &state.revoked()) {
                    Ok(log) => {
                        tracing::warn!(%log, "control plane: store continues as a new log; gateways reload whole")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "control plane: could not continue the restored store; serving the last good log")
                    }
                }
            }
            Err(e) => {
                errors.with_label_values(&[e.kind()]).inc();
                if e.to_string() != last_error {
                    tracing::error!(error = %e, "control plane: store problem; serving the last good log");
                    last_error = e.to_string();
                }
            }
        };
        let first = follower.poll();
        handle(&mut follower, first);
        crate::sync::file::watch_file("keygate-feed-store", follower, poll, handle)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;
    use crate::store::file::Parsed;

    const L: LogId = LogId(7);

    fn rec(id: &str, rev: u64) -> KeyRecord {
        KeyRecord {
            rev,
            ..sample(id, Digest([rev as u8; 32]))
        }
    }

    /// Lines a control plane sealed for `nonce`: begin, two records, end, heartbeat.
    fn stream(signer: &Signer, nonce: &[u8]) -> Vec<Bytes> {
        let mut chain = signer.feed_chain(nonce);
        let mut a = rec("a", 1);
        let mut b = rec("b", 2);
        signer.sign(L, &mut a);
        signer.sign(L, &mut b);
        [
            FeedLine::SnapshotBegin {
                log: L,
                rev: 2,
                count: 2,
                seal: None,
            },
            FeedLine::record(a),
            FeedLine::record(b),
            FeedLine::SnapshotEnd { rev: 2, seal: None },
            FeedLine::Heartbeat {
                rev: 2,
                time_ms: 5,
                seal: None,
            },
        ]
        .into_iter()
        .map(|l| l.sealed(&mut chain))
        .collect()
    }

    /// How far a reader with `nonce` gets through `lines`: the index of the first line refused.
    fn read(signer: &Signer, nonce: &[u8], lines: &[Bytes]) -> Result<(), (usize, SealError)> {
        let mut chain = None;
        for (i, raw) in lines.iter().enumerate() {
            let mut line: FeedLine =
                serde_json::from_slice(raw).map_err(|_| (i, SealError::BadLine("json")))?;
            line.check(raw, &mut chain, signer, nonce)
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    #[test]
    fn a_sealed_stream_is_read_only_whole_in_order_and_for_its_nonce() {
        let signer = Signer::new(&crate::keys::digest::Hasher::new(vec![(1, vec![1; 32])]));
        let lines = stream(&signer, b"n1");
        assert_eq!(read(&signer, b"n1", &lines), Ok(()));
        let refused_at = |lines: &[Bytes], nonce: &[u8]| read(&signer, nonce, lines).unwrap_err();
        // Replayed to another connection: its first line already fails.
        assert_eq!(
            refused_at(&lines, b"n2"),
            (0, SealError::BadLine("snapshot_begin"))
        );
        // A record dropped: the next line fails (here the second record).
        let dropped = [&lines[..1], &lines[2..]].concat();
        assert_eq!(
            refused_at(&dropped, b"n1"),
            (1, SealError::BadLine("record"))
        );
        // Two records swapped.
        let swapped = [
            lines[0].clone(),
            lines[2].clone(),
            lines[1].clone(),
            lines[3].clone(),
        ];
        assert_eq!(
            refused_at(&swapped, b"n1"),
            (1, SealError::BadLine("record"))
        );
        // The snapshot ended early: its end line was made for a stream that held both records.
        let early_end = [lines[0].clone(), lines[1].clone(), lines[3].clone()];
        assert_eq!(
            refused_at(&early_end, b"n1"),
            (2, SealError::BadLine("snapshot_end"))
        );
        // A heartbeat repeated (a path holding back what came after it).
        let again = [&lines[..], &lines[4..]].concat();
        assert_eq!(
            refused_at(&again, b"n1"),
            (5, SealError::BadLine("heartbeat"))
        );
        // A forged heartbeat: unsigned, or its fields edited.
        let unsigned = FeedLine::Heartbeat {
            rev: 9,
            time_ms: 6,
            seal: None,
        };
        let unsigned = Bytes::from(serde_json::to_string(&unsigned).unwrap() + "\n");
        let forged = [&lines[..4], &[unsigned][..]].concat();
        assert_eq!(
            refused_at(&forged, b"n1"),
            (4, SealError::UnsignedLine("heartbeat"))
        );
        let edited =
            Bytes::from(String::from_utf8_lossy(&lines[4]).replace("\"rev\":2", "\"rev\":3"));
        let forged = [&lines[..4], &[edited][..]].concat();
        assert_eq!(
            refused_at(&forged, b"n1"),
            (4, SealError::BadLine("heartbeat"))
        );
        // Another secret.
        let other = Signer::new(&crate::keys::digest::Hasher::new(vec![(1, vec![2; 32])]));
        assert_eq!(refused_at(&stream(&other, b"n1"), b"n1").0, 0);
    }

    #[test]
    fn catchup_resumes_or_snapshots() {
        let s = FeedState::new(16);
        s.apply(Update::Replaced(Parsed {
            records: vec![rec("a", 1), rec("b", 2)],
            rev: 2,
            log: L,
            ..Parsed::default()
        }));
        let mut rx = s.subscribe();
        s.apply(Update::Appended(Parsed {
            records: vec![rec("a", 3)],
            rev: 3,
            log: L,
            ..Parsed::default()
        }));
        assert!(matches!(rx.try_recv(), Ok(Event::Record(r)) if r.rev == 3));
        match s.catchup(Some(L), Some(1)).1 {
            Catchup::Since { records: v, .. } => {
                assert_eq!(v.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![2, 3])
            }
            Catchup::Snapshot { .. } => panic!("should resume"),
        }
        assert!(
            matches!(s.catchup(None, None).1, Catchup::Snapshot { rev: 3, ref records, .. } if records.len() == 2)
        );
        assert!(
            matches!(
                s.catchup(Some(LogId(99)), Some(1)).1,
                Catchup::Snapshot { .. }
            ),
            "a client of another log never resumes by revision"
        );
        // Compaction: clients behind it need a snapshot, clients at its revision do not.
        s.apply(Update::Replaced(Parsed {
            records: vec![rec("a", 3), rec("b", 2)],
            rev: 3,
            compacted_at: Some(3),
            log: L,
            ..Parsed::default()
        }));
        assert!(matches!(rx.try_recv(), Ok(Event::Reset)));
        assert!(matches!(
            s.catchup(Some(L), Some(2)).1,
            Catchup::Snapshot { .. }
        ));
        assert!(
            matches!(s.catchup(Some(L), Some(3)).1, Catchup::Since { ref records, .. } if records.is_empty())
        );
        // A replaced file that un-revokes a key: not served, handed back.
        let mut revoked = rec("b", 4);
        revoked.revoked_at = Some(1);
        s.apply(Update::Appended(Parsed {
            records: vec![revoked],
            rev: 4,
            log: L,
            ..Parsed::default()
        }));
        let back = s.apply(Update::Replaced(Parsed {
            records: vec![rec("a", 3), rec("b", 5)],
            rev: 5,
            log: LogId(8),
            ..Parsed::default()
        }));
        assert_eq!(back.len(), 1);
        assert!(back[0].revoked_at.is_some());
    }

    #[test]
    fn pages_walk_every_match_once_in_bounded_steps() {
        let s = FeedState::new(16);
        let n = PAGE_SCAN as u64 * 2 + 10;
        // Two keys of owner "few" among many, far apart in id order.
        let every = PAGE_SCAN as u64 * 9 / 10 + 1;
        let records: Vec<KeyRecord> = (1..=n)
            .map(|i| KeyRecord {
                owner: if i % every == 0 { "few" } else { "many" }.into(),
                ..rec(&format!("key_{i:08}"), i)
            })
            .collect();
        s.apply(Update::Replaced(Parsed {
            records,
            rev: n,
            log: L,
            ..Parsed::default()
        }));
        let (mut seen, mut cursor, mut pages, mut empty) = (vec![], None::<String>, 0, 0);
        loop {
            let (rows, next) = s.page(cursor.as_deref(), 2, |r| r.owner == "few");
            assert!(rows.len() <= 2);
            empty += usize::from(rows.is_empty());
            seen.extend(rows.iter().map(|r| r.id.clone()));
            pages += 1;
            assert!(pages < 10, "the walk ends");
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(
            seen,
            [format!("key_{every:08}"), format!("key_{:08}", every * 2)]
        );
        assert!(
            empty >= 1,
            "a page that found nothing within its budget still moves on"
        );
        // Without a filter: full pages, the cursor is the page's last id.
        let (rows, next) = s.page(Some("key_00000010"), 3, |_| true);
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["key_00000011", "key_00000012", "key_00000013"]);
        assert_eq!(next.as_deref(), Some("key_00000013"));
        let last = format!("key_{n:08}");
        assert_eq!(s.page(Some(&last), 3, |_| true), (vec![], None));
    }
}
