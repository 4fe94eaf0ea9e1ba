//! A feed gateway's usage reports to its control plane (`POST /v1/usage`), every touch
//! interval and once more at shutdown: the counts its keys added since the last report (not
//! totals, so a report costs what the interval's traffic did, not every key ever seen) and the
//! forensics sketches of the keys that changed.
//!
//! A report is cut into batches of at most `BATCH_BYTES`, each its own request: one minute of
//! a few thousand keys is megabytes of sketches, and the control plane reads a body whole.
//! Each batch carries this process's `boot` number and a sequence number; the control plane
//! applies each (node, boot, seq) once. So a batch whose answer never came, or came as a 5xx
//! (it may have been applied, or part of it), is sent again as it was, before anything newer,
//! and never counts twice; a batch the control plane refused (4xx) was not applied, and its
//! counts go back to be reported with the next ones. Until the control plane takes them, the counts wait in
//! memory; one batch at most is held as sent.
//!
//! After a batch is accepted its counts are also added to the gateway's own usage file, so a
//! restarted gateway still knows when its keys were last used (the key gauges' `stale`), and
//! its sketches to the gateway's own forensics file, so the next process goes on from them.
//!
//! What the control plane has not taken when the gateway stops (a batch without an answer,
//! counts not sent) is kept in the outbox beside the usage file (`<usage file>.outbox.json`,
//! the batches' bodies as they were or would have been sent) and sent first, as it is, by the
//! next process started there, which takes the outbox whole: a rolling restart during a
//! control plane outage loses no count, and a kept batch the control plane had applied is
//! still recognised by its (node, boot, seq). Processes sharing the directory add to the
//! outbox under its lock. A process killed outright loses what it had not handed over.

use crate::forensics::KeyStats;
use crate::gateway::Gateway;
use crate::snapshot::FeedSource;
use crate::usage::{Delta, Used};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The largest batch a gateway sends; the control plane takes up to `MAX_BYTES` on
/// `/v1/usage`, whatever `[control] max_body_bytes` says for the API.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// What the control plane reads of one report at most: a batch, and room for one key's
/// entry that alone would not fit (a sketch is a few KiB at most).
pub const MAX_BYTES: usize = BATCH_BYTES + 256 * 1024;
/// One batch's send and answer.
const SEND_LIMIT: Duration = Duration::from_secs(10);

/// One batch as the control plane reads it. `added` is what each key did since the
/// previous batch: requests and status classes to add, and its latest use.
#[derive(Debug, Deserialize)]
pub struct Received {
    pub node: String,
    pub boot: u64,
    pub seq: u64,
    #[serde(default)]
    pub added: BTreeMap<String, Used>,
    #[serde(default)]
    pub forensics: BTreeMap<String, KeyStats>,
}

/// One batch as a gateway writes it (`Received`'s fields, borrowed).
#[derive(Serialize)]
struct Outgoing<'a> {
    node: &'a str,
    boot: u64,
    seq: u64,
    added: BTreeMap<&'a str, &'a Used>,
    forensics: BTreeMap<&'a str, &'a RawValue>,
}

/// What a batch's body carries, read back from it (a batch the outbox kept; an accepted
/// batch's sketches, kept locally): `Outgoing`'s counts and sketches.
#[derive(Deserialize)]
struct Carried {
    #[serde(default)]
    added: BTreeMap<String, Used>,
    #[serde(default)]
    forensics: BTreeMap<String, Sketch>,
}

/// A batch as built: its body, and what it carries, to give back or to write locally.
struct Batch {
    body: bytes::Bytes,
    deltas: Vec<Delta>,
    sketched: Vec<String>,
}

/// How a send ended.
enum Sent {
    Accepted,
    /// The control plane refused it (4xx): it applied nothing.
    Refused(u16),
    /// No answer, or a 5xx (from the control plane or a proxy before it): it may have been
    /// applied, or part of it.
    NoAnswer(String),
}

/// The report state of one gateway process.
pub struct Reporter {
    source: FeedSource,
    boot: u64,
    next_seq: u64,
    /// Sent again, as they are, before anything newer: a batch sent without an answer, and
    /// those taken from the outbox at the start.
    backlog: VecDeque<Batch>,
    /// `<usage file>.outbox.json`.
    outbox: PathBuf,
}

impl Reporter {
    /// The report state of a new process, with the batches the outbox beside `usage_file`
    /// kept (taken: the file is removed).
    pub fn new(source: FeedSource, usage_file: &Path) -> Reporter {
        let mut b = [0u8; 8];
        // A fixed boot number would only lose the control plane's protection against a batch
        // counted twice across a restart, never a count.
        let _ = getrandom::fill(&mut b);
        let outbox = crate::store::file::sibling(usage_file, ".outbox.json");
        let backlog = take_outbox(&outbox);
        if !backlog.is_empty() {
            tracing::info!(batches = backlog.len(), path = %outbox.display(), "usage report batches kept at the last stop are sent first");
        }
        Reporter {
            source,
            // 53 bits: exact as a JSON number anywhere.
            boot: u64::from_le_bytes(b) >> 11,
            next_seq: 1,
            backlog,
            outbox,
        }
    }

    /// Send what changed since the last report; what is not taken waits for the next one.
    pub async fn report(&mut self, gw: &Arc<Gateway>) {
        while let Some(b) = self.backlog.pop_front() {
            if !self.send(gw, b).await {
                return;
            }
        }
        let batches = match self.batches(gw) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "usage report not built; will retry");
                return;
            }
        };
        let mut rest = batches.into_iter();
        while let Some(b) = rest.next() {
            if !self.send(gw, b).await {
                // Not sent: reported with the next ones.
                rest.for_each(|b| give_back(gw, b));
                return;
            }
        }
    }

    /// Send one batch; whether it was accepted. On a refusal its counts go back to be reported
    /// later; with no answer (or a 5xx) it is kept as sent.
    async fn send(&mut self, gw: &Arc<Gateway>, b: Batch) -> bool {
        let sent = self.post(b.body.clone()).await;
        let metric = |result: &str| gw.metrics.usage_reports.with_label_values(&[result]).inc();
        match sent {
            Sent::Accepted => {
                metric("accepted");
                record_locally(gw, b).await;
                return true;
            }
            Sent::Refused(status) => {
                metric("refused");
                tracing::warn!(
                    status,
                    "the control plane refused a usage report; its counts wait for the next one"
                );
                give_back(gw, b);
            }
            Sent::NoAnswer(e) => {
                metric("failed");
                tracing::warn!(error = %e, "usage report without an answer that it was applied; it will be sent again as it was");
                self.backlog.push_front(b);
            }
        }
        false
    }

    /// At a stop, after the last report: what the control plane has not taken (the backlog,
    /// then counts and sketches not sent) is added to the outbox for the next process.
    pub async fn park(&mut self, gw: &Arc<Gateway>) {
        let mut kept: Vec<Batch> = self.backlog.drain(..).collect();
        match self.batches(gw) {
            Ok(b) => kept.extend(b),
            Err(e) => {
                tracing::error!(error = %e, "usage not reported at the stop cannot be written; it is lost")
            }
        }
        if kept.is_empty() {
            return;
        }
        let path = self.outbox.clone();
        let n = kept.len();
        let g = gw.clone();
        let written = tokio::task::spawn_blocking(move || {
            // The next process resumes the latest sketches, sent or not.
            kept.iter().for_each(|b| keep_sketches(&g, b));
            let _lock = crate::store::file::lock_beside(&path)?;
            let mut bodies = read_outbox(&path)?;
            for b in &kept {
                bodies.push(serde_json::from_slice(&b.body).map_err(std::io::Error::other)?);
            }
            crate::store::file::write_json_atomic(&path, &bodies)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|w| w);
        match written {
            Ok(()) => {
                tracing::warn!(batches = n, path = %self.outbox.display(), "usage the control plane has not taken is kept for the next start")
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.outbox.display(), "cannot keep the usage the control plane has not taken; it is lost")
            }
        }
    }

    async fn post(&self, body: bytes::Bytes) -> Sent {
        let s = &self.source;
        let sent = tokio::time::timeout(
            SEND_LIMIT,
            super::feed::request(
                &s.usage_url,
                &s.token,
                s.tls.as_ref(),
                http::Method::POST,
                body,
            ),
        )
        .await;
        match sent {
            Ok(Ok(r)) if r.status().is_success() => Sent::Accepted,
            Ok(Ok(r)) if r.status().is_server_error() => {
                Sent::NoAnswer(format!("answered {}", r.status().as_u16()))
            }
            Ok(Ok(r)) => Sent::Refused(r.status().as_u16()),
            Ok(Err(e)) => Sent::NoAnswer(e.to_string()),
            Err(_) => Sent::NoAnswer(format!("no answer within {SEND_LIMIT:?}")),
        }
    }

    /// The changed keys' counts and sketches, taken (marked reported), cut into batches. If
    /// one cannot be written, everything taken goes back.
    fn batches(&mut self, gw: &Gateway) -> Result<Vec<Batch>, serde_json::Error> {
        let deltas = gw.usage.take_pending();
        let sketches = match gw.forensics.take_dirty_text() {
            Ok(s) => s,
            Err(e) => {
                gw.usage.restore(deltas);
                return Err(e);
            }
        };
        let mut keys: BTreeMap<String, (Option<Used>, Option<Sketch>)> = BTreeMap::new();
        for d in deltas {
            keys.entry(d.id).or_default().0 = Some(d.used);
        }
        for (id, s) in sketches {
            keys.entry(id).or_default().1 = Some(s);
        }
        let items = keys
            .into_iter()
            .map(|(id, (used, sketch))| (id, used, sketch));
        let mut out = Vec::new();
        let mut failed = None;
        for run in cut(items, BATCH_BYTES) {
            let (batch, written) = self.seal(run);
            failed = failed.or(written.err());
            out.push(batch);
        }
        match failed {
            None => Ok(out),
            Some(e) => {
                out.into_iter().for_each(|b| give_back(gw, b));
                Err(e)
            }
        }
    }

    /// One run of keys as a batch with the next sequence number, and whether its body could
    /// be written.
    fn seal(&mut self, run: Vec<Item>) -> (Batch, Result<(), serde_json::Error>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let body = serde_json::to_vec(&Outgoing {
            node: &self.source.node,
            boot: self.boot,
            seq,
            added: run
                .iter()
                .filter_map(|(id, u, _)| Some((id.as_str(), u.as_ref()?)))
                .collect(),
            forensics: run
                .iter()
                .filter_map(|(id, _, s)| Some((id.as_str(), &**s.as_ref()?)))
                .collect(),
        });
        let (mut deltas, mut sketched) = (Vec::new(), Vec::new());
        for (id, used, sketch) in run {
            if sketch.is_some() {
                sketched.push(id.clone());
            }
            if let Some(used) = used {
                deltas.push(Delta { id, used });
            }
        }
        let (body, written) = match body {
            Ok(b) => (b.into(), Ok(())),
            Err(e) => (bytes::Bytes::new(), Err(e)),
        };
        let batch = Batch {
            body,
            deltas,
            sketched,
        };
        (batch, written)
    }
}

/// A key's sketch as JSON text.
type Sketch = crate::forensics::Entry;
/// One key in a report: its counts since the last one, its sketch if it changed.
type Item = (String, Option<Used>, Option<Sketch>);

/// What one item adds to a batch's body at most: the id twice, quoted, with separators; a
/// `Used` with every field at its widest; the sketch's own text.
fn size((id, _, sketch): &Item) -> usize {
    2 * (id.len() + 4) + 160 + sketch.as_ref().map_or(0, |s| s.get().len())
}

/// `items` in runs of at most `budget` bytes as sent (an item larger than that alone),
/// in their order.
fn cut(items: impl IntoIterator<Item = Item>, budget: usize) -> Vec<Vec<Item>> {
    let mut out: Vec<Vec<Item>> = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && used + n > budget {
            out.push(std::mem::take(&mut current));
            used = 0;
        }
        used += n;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The bodies an outbox holds (none when there is none); one that is not an outbox is
/// `InvalidData`.
fn read_outbox(path: &Path) -> std::io::Result<Vec<Box<RawValue>>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The batches the outbox kept, each as it was to be sent, the file removed under its lock:
/// one process takes them. One that is not an outbox is said and moved aside
/// (`<outbox>.unreadable`), so the next stop can keep its own; one that cannot be read now is
/// left for the next start.
fn take_outbox(path: &Path) -> VecDeque<Batch> {
    let taken = crate::store::file::lock_beside(path).and_then(|_lock| {
        let bodies = read_outbox(path)?;
        if !bodies.is_empty() {
            std::fs::remove_file(path)?;
        }
        Ok(bodies)
    });
    let bodies = match taken {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            let aside = crate::store::file::sibling(path, ".unreadable");
            let moved = std::fs::rename(path, &aside).is_ok();
            tracing::error!(error = %e, path = %path.display(), moved_to = %if moved { aside.display().to_string() } else { "-".into() }, "the usage report outbox is not valid; the usage it keeps is not reported");
            return VecDeque::new();
        }
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "the usage report outbox cannot be taken now; it is left for the next start");
            return VecDeque::new();
        }
    };
    bodies
        .into_iter()
        .filter_map(|body| {
            let kept: Carried = serde_json::from_str(body.get())
                .map_err(|e| tracing::error!(error = %e, "a usage report batch in the outbox cannot be read; it is not reported"))
                .ok()?;
            Some(Batch {
                body: bytes::Bytes::from(String::from(Box::<str>::from(body))),
                deltas: kept
                    .added
                    .into_iter()
                    .map(|(id, used)| Delta { id, used })
                    .collect(),
                sketched: kept.forensics.into_keys().collect(),
            })
        })
        .collect()
}

/// A batch the control plane did not apply: its counts and sketches are reported later.
fn give_back(gw: &Gateway, b: Batch) {
    gw.usage.restore(b.deltas);
    gw.forensics.restore(b.sketched);
}

/// An accepted batch, added to the gateway's own files: its counts to the usage file, its
/// sketches to the forensics file.
async fn record_locally(gw: &Arc<Gateway>, b: Batch) {
    let path = gw.snapshot().keys.usage_file.clone();
    let g = gw.clone();
    let added = tokio::task::spawn_blocking(move || {
        keep_sketches(&g, &b);
        crate::usage::merge_into_file(&path, &b.deltas)
    })
    .await;
    if let Ok(Err(e)) = added {
        tracing::warn!(error = %e, "cannot add reported usage to the local usage file");
    }
}

/// A batch's sketches, written to this node's section of the gateway's own forensics file,
/// where the next process on the node resumes them (`Forensics::new`). The control plane
/// replaces a node's sketch of a key with each report: a restarted gateway that began its
/// sketches afresh would wipe the key's history there.
fn keep_sketches(gw: &Gateway, b: &Batch) {
    if b.sketched.is_empty() {
        return;
    }
    let kept = serde_json::from_slice::<Carried>(&b.body)
        .map_err(std::io::Error::other)
        .and_then(|s| gw.forensics.write_own(s.forensics));
    if let Err(e) = kept {
        tracing::warn!(error = %e, "cannot keep reported sketches in the local forensics file; a restart would begin them afresh");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter::new(
            FeedSource {
                url: "http://127.0.0.1:1/v1/feed".into(),
                tls: None,
                usage_url: http::Uri::from_static("http://127.0.0.1:1/v1/usage"),
                token: String::new(),
                cache: "feed-cache.jsonl".into(),
                node: "node-1".into(),
            },
            Path::new("/nonexistent/usage.json"),
        )
    }

    /// 400 keys, most with counts, some with sketches of 10 B to 6 KiB of text.
    fn items() -> Vec<Item> {
        (0..400u64)
            .map(|i| {
                let used = (i % 7 != 0).then_some(Used {
                    last_used: 1_700_000_000 + i as i64,
                    requests: i,
                    s2xx: i / 2,
                    s4xx: u64::MAX,
                    s5xx: 1,
                });
                let sketch = (i % 3 != 0 || used.is_none()).then(|| {
                    let text = format!("{{\"pad\":\"{}\"}}", "x".repeat((i as usize * 997) % 6000));
                    RawValue::from_string(text).unwrap()
                });
                (format!("key_{i:04}"), used, sketch)
            })
            .collect()
    }

    /// `Received`, with the sketches as text (these are not real ones).
    #[derive(Deserialize)]
    struct Got {
        node: String,
        boot: u64,
        seq: u64,
        added: BTreeMap<String, Used>,
        forensics: BTreeMap<String, Sketch>,
    }

    #[test]
    fn the_outbox_is_taken_whole_once_and_an_unreadable_one_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json.outbox.json");
        let mut r = reporter();
        let bodies: Vec<String> = cut(items(), 64 * 1024)
            .into_iter()
            .take(2)
            .map(|run| String::from_utf8(r.seal(run).0.body.to_vec()).unwrap())
            .collect();
        std::fs::write(&path, format!("[{}]", bodies.join(","))).unwrap();
        let taken = take_outbox(&path);
        assert!(!path.exists());
        assert_eq!(taken.len(), 2);
        for (b, sent) in taken.iter().zip(&bodies) {
            assert_eq!(b.body, sent.as_bytes(), "kept as it was");
            let got: Got = serde_json::from_slice(&b.body).unwrap();
            let ids: Vec<&String> = b.deltas.iter().map(|d| &d.id).collect();
            assert_eq!(ids, got.added.keys().collect::<Vec<_>>());
            assert_eq!(b.sketched, got.forensics.into_keys().collect::<Vec<_>>());
        }
        assert!(take_outbox(&path).is_empty(), "taken once");

        std::fs::write(&path, "[{\"node\":").unwrap();
        assert!(take_outbox(&path).is_empty());
        assert!(!path.exists());
        let aside = dir.path().join("usage.json.outbox.json.unreadable");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "[{\"node\":");
    }

    #[test]
    fn a_report_is_cut_into_batches_under_the_budget_each_key_once() {
        for budget in [1, 8 * 1024, 64 * 1024, BATCH_BYTES] {
            let mut r = reporter();
            let runs = cut(items(), budget);
            let batches: Vec<Batch> = runs
                .into_iter()
                .map(|run| {
                    let (b, written) = r.seal(run);
                    written.unwrap();
                    b
                })
                .collect();
            let (mut added, mut sketched) = (Vec::new(), Vec::new());
            for (i, b) in batches.iter().enumerate() {
                let got: Got = serde_json::from_slice(&b.body).unwrap();
                let keys = got.added.len().max(got.forensics.len());
                assert!(
                    b.body.len() <= budget || keys == 1,
                    "budget {budget}: batch {i} is {} bytes with {keys} keys",
                    b.body.len()
                );
                assert_eq!((got.node.as_str(), got.boot), ("node-1", r.boot));
                assert_eq!(got.seq, i as u64 + 1, "sequence numbers in order");
                assert_eq!(
                    got.added.keys().collect::<Vec<_>>(),
                    b.deltas.iter().map(|d| &d.id).collect::<Vec<_>>()
                );
                for d in &b.deltas {
                    assert_eq!(got.added[&d.id], d.used);
                }
                assert_eq!(
                    got.forensics.keys().collect::<Vec<_>>(),
                    b.sketched.iter().collect::<Vec<_>>()
                );
                added.extend(got.added.into_keys());
                sketched.extend(b.sketched.iter().cloned());
            }
            let want = items();
            let with = |f: fn(&Item) -> bool| -> Vec<String> {
                want.iter().filter(|i| f(i)).map(|i| i.0.clone()).collect()
            };
            assert_eq!(added, with(|i| i.1.is_some()), "budget {budget}");
            assert_eq!(sketched, with(|i| i.2.is_some()), "budget {budget}");
            if budget == BATCH_BYTES {
                assert_eq!(batches.len(), 1);
            }
            if budget == 64 * 1024 {
                assert!(batches.len() > 10, "{}", batches.len());
            }
        }
    }
}
