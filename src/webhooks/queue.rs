//! The durable webhook queue: one JSON-lines file beside the store (`<store>.webhooks`),
//! appended and fsynced before anything is sent, rewritten whole (atomically) on open and
//! when mostly spent.
//!
//! It holds deliveries not yet settled (with their attempt count and next attempt time), the
//! ids of recent settled ones (so an event derived twice is not queued twice), the marks that
//! make `key.expiring`/`key.stale` fire once, and the audit-log offset read up to. A restart
//! replays the file and resumes each delivery with its id: at least once, never lost. One
//! process owns the file at a time (`<queue>.lock`, taken without waiting).
//!
//! An attempt's outcome (`retry_at`, `settle`) holds in memory even when the file cannot take
//! it (disk full, read-only, I/O error): otherwise the sender, which goes by memory, would
//! find the delivery due again at once and send it on every tick, accepted ones included. The
//! file is then `behind` and is rewritten whole from memory by the next write that works; a
//! restart before that goes by the file and may repeat an attempt (at least once, as ever).
//! New deliveries (`add`) are applied only once written: they are re-derived from the audit
//! log until they are.

use super::Delivery;
use crate::store::file::{complete_prefix, lock_beside_nowait, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Settled ids are remembered this long for dedupe, ms.
const DONE_RETENTION_MS: i64 = 7 * 86_400_000;
/// Rewrite once the file has this many lines and most of them are spent.
const COMPACT_LINES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("webhook queue {0} is owned by another running keygate")]
    Busy(PathBuf),
    #[error("webhook queue {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One delivery to one endpoint, not yet settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The endpoint's configured URL.
    pub endpoint: String,
    pub delivery: Delivery,
    /// When it was queued, ms: the retry budget counts from here.
    pub queued_ms: i64,
    pub attempts: u32,
    pub next_ms: i64,
}

type Slot = (String, String);

fn slot(id: &str, endpoint: &str) -> Slot {
    (id.to_owned(), endpoint.to_owned())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Add(Pending),
    Try {
        id: String,
        endpoint: String,
        attempts: u32,
        next_ms: i64,
    },
    Done {
        id: String,
        endpoint: String,
        outcome: String,
        at_ms: i64,
    },
    Mark(String),
    Cursor(u64),
}

pub struct Queue {
    path: PathBuf,
    file: File,
    _lock: File,
    pending: BTreeMap<Slot, Pending>,
    done: BTreeMap<Slot, i64>,
    marks: BTreeSet<String>,
    cursor: Option<u64>,
    lines: usize,
    /// The file lacks writes that failed (and may end in a torn line): the next write
    /// rewrites it whole from memory rather than appending to it.
    behind: bool,
}

impl Queue {
    /// Open (creating) the queue at `path`, replay it, and rewrite it compactly.
    pub fn open(path: &Path, now_ms: i64) -> Result<Queue, QueueError> {
        let io = |source| QueueError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = lock_beside_nowait(path)
            .map_err(io)?
            .ok_or_else(|| QueueError::Busy(path.to_owned()))?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let mut q = Queue {
            path: path.to_owned(),
            file: append_handle(path).map_err(io)?,
            _lock: lock,
            pending: BTreeMap::new(),
            done: BTreeMap::new(),
            marks: BTreeSet::new(),
            cursor: None,
            lines: 0,
            behind: false,
        };
        // A torn last line (crash mid-append) is dropped by the rewrite below.
        for raw in complete_prefix(&bytes).split(|b| *b == b'\n') {
            if raw.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(raw) {
                Ok(line) => q.apply(line),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable webhook queue line")
                }
            }
        }
        q.compact(now_ms).map_err(io)?;
        Ok(q)
    }

    fn apply(&mut self, line: Line) {
        match line {
            Line::Add(p) => {
                let s = slot(&p.delivery.id, &p.endpoint);
                if !self.done.contains_key(&s) {
                    self.pending.entry(s).or_insert(p);
                }
            }
            Line::Try {
                id,
                endpoint,
                attempts,
                next_ms,
            } => {
                if let Some(p) = self.pending.get_mut(&slot(&id, &endpoint)) {
                    p.attempts = attempts;
                    p.next_ms = next_ms;
                }
            }
            Line::Done {
                id,
                endpoint,
                at_ms,
                ..
            } => {
                let s = slot(&id, &endpoint);
                self.pending.remove(&s);
                self.done.insert(s, at_ms);
            }
            Line::Mark(m) => {
                self.marks.insert(m);
            }
            Line::Cursor(c) => self.cursor = Some(c),
        }
    }

    /// Append lines as one write and fsync, then apply them: nothing is applied unless written.
    fn write(&mut self, lines: Vec<Line>) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let buf = encode(&lines)?;
        self.catch_up()?;
        self.append(&buf, lines.len())?;
        for l in lines {
            self.apply(l);
        }
        Ok(())
    }

    /// Apply lines, then make them durable: an attempt's outcome holds in memory whether or
    /// not the file takes it (see the module docs). Returns the write's error, for the log.
    fn record(&mut self, lines: Vec<Line>) -> io::Result<()> {
        let buf = encode(&lines)?;
        let n = lines.len();
        for l in lines {
            self.apply(l);
        }
        if self.behind {
            // The rewrite holds what was just applied.
            return self.catch_up();
        }
        self.append(&buf, n)
    }

    /// One append and fsync; a failure leaves the file `behind` (it may hold part of `buf`).
    fn append(&mut self, buf: &[u8], lines: usize) -> io::Result<()> {
        let written = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => self.lines += lines,
            Err(_) => self.behind = true,
        }
        written
    }

    /// A file `behind` memory is rewritten whole before anything is appended to it.
    fn catch_up(&mut self) -> io::Result<()> {
        if self.behind {
            self.compact(crate::clock::unix_ms())?;
        }
        Ok(())
    }

    /// Queue deliveries (those already queued or settled are skipped), set marks and move
    /// the audit cursor, all in one fsynced write. Returns how many were new.
    pub fn add(
        &mut self,
        items: Vec<Pending>,
        marks: Vec<String>,
        cursor: Option<u64>,
    ) -> io::Result<usize> {
        let mut seen = BTreeSet::new();
        let fresh: Vec<Line> = items
            .into_iter()
            .filter(|p| {
                let s = slot(&p.delivery.id, &p.endpoint);
                !self.pending.contains_key(&s) && !self.done.contains_key(&s) && seen.insert(s)
            })
            .map(Line::Add)
            .collect();
        let n = fresh.len();
        let mut lines = fresh;
        lines.extend(
            marks
                .into_iter()
                .filter(|m| !self.marks.contains(m))
                .map(Line::Mark),
        );
        if let Some(c) = cursor.filter(|c| Some(*c) != self.cursor) {
            lines.push(Line::Cursor(c));
        }
        self.write(lines)?;
        Ok(n)
    }

    /// A failed attempt: the next one is due at `next_ms` (in memory even if the write fails).
    pub fn retry_at(
        &mut self,
        id: &str,
        endpoint: &str,
        attempts: u32,
        next_ms: i64,
    ) -> io::Result<()> {
        self.record(vec![Line::Try {
            id: id.to_owned(),
            endpoint: endpoint.to_owned(),
            attempts,
            next_ms,
        }])
    }

    /// Settled: `delivered`, or `failed` (retry budget spent, or the endpoint is gone); in
    /// memory even if the write fails.
    pub fn settle(
        &mut self,
        id: &str,
        endpoint: &str,
        outcome: &str,
        now_ms: i64,
    ) -> io::Result<()> {
        self.record(vec![Line::Done {
            id: id.to_owned(),
            endpoint: endpoint.to_owned(),
            outcome: outcome.to_owned(),
            at_ms: now_ms,
        }])?;
        if self.lines > COMPACT_LINES
            && self.lines > 4 * (self.pending.len() + self.marks.len() + 1)
        {
            self.compact(now_ms)?;
        }
        Ok(())
    }

    /// Deliveries due at `now_ms`, oldest first (borrowed: the sender clones only those it
    /// starts, a few of what a mass revocation may queue).
    pub fn due(&self, now_ms: i64) -> Vec<&Pending> {
        let mut due: Vec<&Pending> = self
            .pending
            .values()
            .filter(|p| p.next_ms <= now_ms)
            .collect();
        due.sort_by_key(|p| p.queued_ms);
        due
    }

    pub fn marked(&self, mark: &str) -> bool {
        self.marks.contains(mark)
    }

    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the queue in the state of a disk that refuses writes, for the sender's tests: its
    /// append handle is swapped for a read-only one (every append then fails with a real I/O
    /// error, whoever runs the test: root included).
    #[cfg(test)]
    pub(super) fn refuse_appends(&mut self) -> io::Result<()> {
        self.file = File::open(&self.path)?;
        Ok(())
    }

    /// Rewrite the file with only what is still needed, atomically. Until one succeeds the
    /// file is `behind` (a failure may come after the rename, with the append handle still
    /// on the replaced file).
    fn compact(&mut self, now_ms: i64) -> io::Result<()> {
        let rewritten = self.rewrite(now_ms);
        self.behind = rewritten.is_err();
        rewritten
    }

    fn rewrite(&mut self, now_ms: i64) -> io::Result<()> {
        self.done.retain(|_, at| now_ms - *at < DONE_RETENTION_MS);
        let mut lines: Vec<Line> = self.pending.values().cloned().map(Line::Add).collect();
        lines.extend(self.done.iter().map(|((id, endpoint), at)| Line::Done {
            id: id.clone(),
            endpoint: endpoint.clone(),
            outcome: "settled".into(),
            at_ms: *at,
        }));
        lines.extend(self.marks.iter().cloned().map(Line::Mark));
        lines.extend(self.cursor.map(Line::Cursor));
        let buf = encode(&lines)?;
        write_atomic(&self.path, &buf)?;
        self.file = append_handle(&self.path)?;
        self.lines = lines.len();
        Ok(())
    }
}

/// Lines as the file holds them: one JSON object each, newline-terminated.
fn encode(lines: &[Line]) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for l in lines {
        serde_json::to_writer(&mut buf, l)?;
        buf.push(b'\n');
    }
    Ok(buf)
}

fn append_handle(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pending(id: &str, next_ms: i64) -> Pending {
        Pending {
            endpoint: "http://127.0.0.1:1/h".into(),
            delivery: Delivery {
                id: id.into(),
                kind: "key.revoked".into(),
                time: "2026-01-01T00:00:00Z".into(),
                key: serde_json::json!({"id": "key_a"}),
                data: Default::default(),
            },
            queued_ms: 1,
            attempts: 0,
            next_ms,
        }
    }

    #[test]
    fn survives_reopen_and_a_torn_line_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl.webhooks");
        {
            let mut q = Queue::open(&path, 0).unwrap();
            assert!(matches!(Queue::open(&path, 0), Err(QueueError::Busy(_))));
            assert_eq!(
                q.add(
                    vec![pending("a", 0), pending("b", 0)],
                    vec!["m1".into()],
                    Some(42)
                )
                .unwrap(),
                2
            );
            q.retry_at("a", "http://127.0.0.1:1/h", 1, 500).unwrap();
            q.settle("b", "http://127.0.0.1:1/h", "delivered", 10)
                .unwrap();
            assert_eq!(
                q.add(vec![pending("b", 0)], vec![], None).unwrap(),
                0,
                "settled ids stay out"
            );
        }
        // A crash mid-append leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"add\":{\"endpo").unwrap();
        drop(f);
        let q = Queue::open(&path, 20).unwrap();
        assert_eq!(q.cursor(), Some(42));
        assert!(q.marked("m1"));
        assert_eq!(q.depth(), 1);
        assert!(q.due(499).is_empty(), "the retry time survives");
        let due = q.due(500);
        assert_eq!((due[0].delivery.id.as_str(), due[0].attempts), ("a", 1));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && !text.contains("endpo\""), "{text}");
    }

    /// Outcomes the file cannot take hold in memory (a retry keeps its time, a settled
    /// delivery is not due again); a new delivery is not queued until it is written; the next
    /// write that works rewrites the file whole, and a reopen finds every outcome.
    #[test]
    fn outcomes_hold_in_memory_while_the_file_refuses_them_and_reach_it_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl.webhooks");
        let ep = "http://127.0.0.1:1/h";
        {
            let mut q = Queue::open(&path, 0).unwrap();
            q.add(vec![pending("a", 0), pending("b", 0)], vec![], Some(7))
                .unwrap();
            // Appends fail, and so does a rewrite (a directory stands where the file was).
            q.refuse_appends().unwrap();
            std::fs::remove_file(&path).unwrap();
            std::fs::create_dir(&path).unwrap();
            assert!(q.retry_at("a", ep, 1, 500).is_err());
            assert!(q.settle("b", ep, "delivered", 10).is_err());
            assert!(q.due(499).is_empty(), "a waits for 500, b is settled");
            assert_eq!(q.depth(), 1);
            assert!(q.add(vec![pending("c", 0)], vec![], None).is_err());
            assert_eq!(q.depth(), 1, "c is not queued unwritten");
            // The file can be written again (a new handle comes with the rewrite).
            std::fs::remove_dir(&path).unwrap();
            assert_eq!(q.add(vec![pending("c", 0)], vec![], None).unwrap(), 1);
        }
        let q = Queue::open(&path, 20).unwrap();
        let due: Vec<(&str, u32)> = q
            .due(500)
            .iter()
            .map(|p| (p.delivery.id.as_str(), p.attempts))
            .collect();
        assert_eq!(due, [("a", 1), ("c", 0)]);
        assert!(q.due(499).iter().all(|p| p.delivery.id != "a"));
        assert_eq!(q.cursor(), Some(7));
    }
}
