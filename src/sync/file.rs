//! Keeps a gateway's key table in step with the store file.
//!
//! A dedicated thread (the work is blocking file I/O) polls the file whenever the directory
//! reports a change (inotify via `notify`; the directory, so renames by compaction are seen)
//! and at least every `poll_interval` as a fallback. Appended lines are applied one record at
//! a time to the live table; a replaced file is loaded into a new table that is swapped in
//! whole. Both go through `sync::apply` (revocation is final, never backwards). Errors never
//! touch the table (fail static): they are counted, logged and audited.
//!
//! A running gateway refuses a file that goes back in its log; a restarted one has no table
//! to compare with. So its first table (from the checkpoint or the file) is also held up to
//! what the store's writers keep beside the log (`store::ledger`, MAC'd with the hash secret
//! this gateway holds too): a file behind the high-water mark is reported as the restore it
//! is, and every revocation the writers recorded is obeyed in it, so a backup restored while
//! the gateway was down cannot bring a revoked key back before the next write does it anyway
//! (a writer continues such a file as a new log with every recorded revocation).

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::store::file::{Follower, LogFile, Missing, Parsed, StoreError, Update};
use crate::store::ledger::Ledger;
use crate::store::seal::{LogId, Signer};
use crate::sync::apply;
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// Start following `path` for a gateway. Returns once the thread is started; the first load
/// happens on it.
pub fn spawn(
    gw: Arc<Gateway>,
    path: PathBuf,
    signer: Signer,
    poll_interval: Duration,
) -> std::io::Result<()> {
    let file = LogFile::new(&path, signer.clone());
    create_if_missing(&gw, &file);
    let writers = Writers {
        ledger: Ledger::for_store(&path),
        signer,
    };
    let mut follower = Follower::new(file);
    resume(&gw, &mut follower, &writers);
    let mut last_error: Option<String> = None;
    // The drop limit in force when this node refused the file's table (a shrink): the file
    // is judged again when it changes or when a reload changes the limit.
    let mut refused_at: Option<u8> = None;
    watch_file(
        "keygate-store",
        follower,
        poll_interval,
        move |follower, result| {
            if let Some(limit) = refused_at {
                if limit != max_drop(&gw) {
                    follower.judge_again();
                    refused_at = None;
                } else if matches!(result, Ok(Update::Unchanged)) {
                    // Still refused: the node is not in step with its store.
                    return;
                }
            }
            match result {
                Ok(update) => {
                    last_error = None;
                    refused_at = None;
                    let recorded = match &update {
                        Update::Replaced(p) => writers.first_table(&gw, p.log, p.rev),
                        _ => Vec::new(),
                    };
                    if apply_recorded(&gw, update, &recorded).is_err() {
                        follower.refuse_last_whole();
                        refused_at = Some(max_drop(&gw));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    // Report a persisting error once, not on every poll.
                    if last_error.as_deref() != Some(text.as_str()) {
                        report(&gw, &e);
                        last_error = Some(text);
                    }
                }
            }
        },
    )
}

/// The first table from the store's checkpoint and the log lines after it, when there is a
/// checkpoint for the log in place (`store::checkpoint`). A refused checkpoint is reported
/// loudly (error log, `keygate_source_errors_total{kind="checkpoint"}`, audit), set aside, and
/// the first poll reads the log whole.
fn resume(gw: &Gateway, follower: &mut Follower, writers: &Writers) {
    let started = std::time::Instant::now();
    let path = crate::store::checkpoint::path_for(follower.path());
    let loaded = follower.resume_from_checkpoint();
    let recorded = match &loaded {
        Ok(Some((table, tail))) => {
            writers.first_table(gw, table.log(), tail.rev.max(table.revision()))
        }
        _ => Vec::new(),
    };
    apply_checkpoint(gw, loaded, started, &recorded, |why| {
        let aside = crate::sync::cache::set_aside(&path);
        tracing::error!(error = %why, path = %path.display(), set_aside = ?aside.as_ref().ok(), "key table checkpoint refused; loading the log instead");
    });
}

/// What the store's writers keep beside the log (`store::ledger`) and the secret it is MAC'd
/// with (the gateway's own).
struct Writers {
    ledger: Ledger,
    signer: Signer,
}

impl Writers {
    /// For the gateway's first table (none loaded yet: after a later one, the table it
    /// replaces carries every revocation, `sync::apply::snapshot`), of `log` at `rev`: report
    /// a log behind the highest revision the writers issued, or another one (restored from a
    /// backup while this gateway was down, or replaced), and return every revocation the
    /// writers recorded, for the table to obey. A ledger that cannot be read or does not
    /// verify is reported and read as far as it verifies: the log still holds every
    /// revocation written to it, and a gateway that may read the log but not its ledger
    /// (another user, a read-only mount) must still come up.
    fn first_table(&self, gw: &Gateway, log: LogId, rev: u64) -> Vec<KeyRecord> {
        if gw.table_loaded() {
            return Vec::new();
        }
        match self.ledger.hwm(&self.signer) {
            Ok(Some(h)) if h.log != log || rev < h.rev => {
                let error = format!(
                    "key store is log {log} at revision {rev}, behind revision {} its writers issued in log {} (a backup restored, or the file replaced): serving it with every revocation the writers recorded; the next write continues it as a new log",
                    h.rev, h.log
                );
                report_source(gw, "rollback", error);
            }
            Ok(_) => {}
            Err(e) => report_ledger(gw, &e),
        }
        match self.ledger.revoked(&self.signer) {
            Ok((records, bad)) => {
                for (line, why) in bad {
                    report_source(
                        gw,
                        "bad_mac",
                        format!("revocation ledger line {line} skipped: {why}"),
                    );
                }
                records
            }
            Err(e) => {
                report_ledger(gw, &e);
                Vec::new()
            }
        }
    }
}

/// A ledger file that could not be read (`io`) or verified (`bad_mac`).
fn report_ledger(gw: &Gateway, e: &std::io::Error) {
    let kind = match e.kind() {
        std::io::ErrorKind::InvalidData => "bad_mac",
        _ => "io",
    };
    report_source(gw, kind, format!("key store ledger: {e}"));
}

/// Count, log and audit a source problem the table is served through.
fn report_source(gw: &Gateway, kind: &'static str, error: String) {
    gw.metrics.source_errors.with_label_values(&[kind]).inc();
    tracing::error!(kind, error = %error, "key store problem; serving the table with the revocations recorded");
    gw.audit(
        Event::new("source.error", "gateway")
            .with("kind", kind)
            .with("error", error),
    );
}

/// Put a checkpoint's table, with the records after it applied on top (`sync::apply`: the
/// same rules as any append) and the revocations in `recorded` obeyed (the store's ledger,
/// `Writers::first_table`; none for Redis), in as the gateway's table; or count
/// (`source_errors{kind="checkpoint"}`) and audit a refused checkpoint, which `say_refused`
/// logs with what its source knows. Shared by the file store and the Redis store
/// (`sync::redis`). Returns whether a table was put in.
pub fn apply_checkpoint(
    gw: &Gateway,
    loaded: Result<Option<(crate::keys::table::KeyTable, Parsed)>, String>,
    started: std::time::Instant,
    recorded: &[KeyRecord],
    say_refused: impl FnOnce(&str),
) -> bool {
    match loaded {
        Ok(None) => false,
        Ok(Some((table, tail))) => {
            report_corrupt(gw, &tail);
            let after = tail.records.len();
            if let Err(refusal) = apply::records(&table, tail.log, tail.records, tail.rev, &mut ())
            {
                report_refusal(gw, &refusal);
                return false;
            }
            report_kept_revoked(gw, &apply::obey_revocations(&table, recorded, &mut ()));
            let (rev, keys, log) = (table.revision(), table.len(), table.log());
            gw.replace_table(table);
            gw.metrics.table_revision.set(rev as i64);
            tracing::info!(keys, revision = rev, %log, records_after = after, took_ms = started.elapsed().as_millis() as u64, "key table loaded from the checkpoint");
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "checkpoint")
                    .with("log", log.to_string())
                    .with("revision", rev)
                    .with("keys", keys),
            );
            true
        }
        Err(why) => {
            gw.metrics
                .source_errors
                .with_label_values(&["checkpoint"])
                .inc();
            say_refused(&why);
            gw.audit(
                Event::new("source.error", "gateway")
                    .with("kind", "checkpoint")
                    .with("error", why),
            );
            false
        }
    }
}

/// A fresh install has no store yet: create it empty so the gateway comes up Ready with zero
/// keys (every key answers 401, which is the truth). A missing directory or a failed create
/// is only logged here: the follower then reports the store as unavailable and `/readyz`
/// stays 503 (fail closed).
fn create_if_missing(gw: &Gateway, file: &LogFile) {
    let path = file.path().display();
    match file.create_if_missing() {
        Ok(Missing::Existed) => {}
        Ok(Missing::Created(log)) => {
            tracing::info!(path = %path, %log, "key store did not exist: created it empty");
            gw.audit(
                Event::new("store.created", "gateway")
                    .with("path", path.to_string())
                    .with("log", log.to_string()),
            );
        }
        Ok(Missing::NoDirectory(dir)) => tracing::error!(
            path = %path,
            dir = %dir.display(),
            "key store directory does not exist (volume not mounted?): failing closed (503)"
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot create the missing key store: failing closed (503)")
        }
    }
}

/// Poll `follower` on a named thread whenever its file changes, and at least every
/// `poll_interval`, handing each result to `on_poll`. Shared by gateways and the control plane.
///
/// The directory is watched (so a compaction's rename is seen), but only events that change
/// the store file wake the thread: our own reads raise inotify open/close events, and without
/// this filter the follower and the watcher would wake each other forever.
pub fn watch_file(
    name: &str,
    mut follower: Follower,
    poll_interval: Duration,
    mut on_poll: impl FnMut(&mut Follower, Result<Update, StoreError>) + Send + 'static,
) -> std::io::Result<()> {
    let path = follower.path().to_owned();
    let (tx, rx) = channel::<()>();
    let dir = path
        .parent()
        .map(PathBuf::from)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = path.file_name().map(|n| n.to_owned());
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(ev) => {
                !matches!(ev.kind, EventKind::Access(_))
                    && (ev.paths.is_empty()
                        || ev
                            .paths
                            .iter()
                            .any(|p| p.file_name() == file_name.as_deref()))
            }
            // A watcher error (e.g. queue overflow) may have hidden a change: look.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    if let Err(e) = &watcher {
        tracing::warn!(dir = %dir.display(), error = %e, "file notifications unavailable; polling only");
    }
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // The watcher lives as long as the loop.
            let _watcher = watcher;
            loop {
                let result = follower.poll();
                on_poll(&mut follower, result);
                match rx.recv_timeout(poll_interval) {
                    Ok(()) => while rx.try_recv().is_ok() {},
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(poll_interval),
                }
            }
        })?;
    Ok(())
}

fn report_corrupt(gw: &Gateway, parsed: &Parsed) {
    for c in &parsed.corrupt {
        gw.metrics
            .source_errors
            .with_label_values(&["corrupt_line"])
            .inc();
        tracing::warn!(line = c.line, reason = %c.reason, "store line skipped; keeping the rest");
        gw.audit(
            Event::new("source.error", "gateway")
                .with("kind", "corrupt_line")
                .with("line", c.line)
                .with("reason", c.reason.clone()),
        );
    }
}

/// Apply one `Update` of a store follower (the file here, Redis in `sync::redis`). A whole
/// table must keep most of the live keys held (`sync::apply::shrink`): a store emptied or
/// mistaken for another (a volume not mounted, an old backup restored, a flushed or switched
/// database) would otherwise reach the node at once. Returns the refusal of such a table
/// (reported already), so the follower can look again later with the configuration then in
/// force.
pub fn apply(gw: &Gateway, update: Update) -> Result<(), apply::Refusal> {
    apply_recorded(gw, update, &[])
}

/// [`apply`], a whole table also obeying the revocations in `recorded` (the store's ledger,
/// `Writers::first_table`) before it is judged and put in.
fn apply_recorded(
    gw: &Gateway,
    update: Update,
    recorded: &[KeyRecord],
) -> Result<(), apply::Refusal> {
    match update {
        Update::Unchanged => gw.mark_synced(),
        Update::Appended(parsed) => {
            report_corrupt(gw, &parsed);
            let table = gw.table();
            let n = parsed.records.len();
            let applied = apply::records(
                &table,
                parsed.log,
                parsed.records,
                parsed.rev,
                &mut gw.counting(),
            );
            match applied {
                Ok(out) => {
                    observe(gw, &out);
                    gw.mark_synced();
                }
                Err(refusal) => report_refusal(gw, &refusal),
            }
            gw.metrics.table_revision.set(table.revision() as i64);
            tracing::debug!(
                records = n,
                revision = table.revision(),
                "store appends applied"
            );
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "incremental")
                    .with("revision", table.revision())
                    .with("records", n),
            );
        }
        Update::Replaced(parsed) => {
            report_corrupt(gw, &parsed);
            let n = parsed.records.len();
            let log = parsed.log;
            let built = apply::snapshot(&gw.table(), log, parsed.rev, parsed.records);
            let (table, mut out) = match built {
                Ok(b) => b,
                Err(refusal) => {
                    report_refusal(gw, &refusal);
                    return Ok(());
                }
            };
            out.kept_revoked
                .extend(apply::obey_revocations(&table, recorded, &mut ()));
            if let Err(refusal) = shrink(gw, &table) {
                report_refusal(gw, &refusal);
                return Err(refusal);
            }
            report_kept_revoked(gw, &out.kept_revoked);
            let (rev, keys) = (table.revision(), table.len());
            gw.replace_table(table);
            gw.metrics.table_revision.set(rev as i64);
            tracing::info!(records = n, keys, revision = rev, %log, "key table loaded");
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "full")
                    .with("log", log.to_string())
                    .with("revision", rev)
                    .with("keys", keys),
            );
        }
    }
    Ok(())
}

/// The shrink rule (`sync::apply::shrink`) for a whole table that would replace this
/// gateway's, with its `[keys] max_snapshot_drop_percent` and clock now (shared with the
/// feed). A refused table's revocations are applied all the same
/// (`apply::revocations_of_refused`), reported, and named in the refusal for the caller's
/// local copy.
pub fn shrink(gw: &Gateway, next: &crate::keys::table::KeyTable) -> Result<(), apply::Refusal> {
    let table = gw.table();
    let mut judged = apply::shrink(&table, next, max_drop(gw), crate::clock::unix_secs());
    if let Err(apply::Refusal::Shrink { revoked_here, .. }) = &mut judged {
        *revoked_here = apply::revocations_of_refused(&table, next, &mut gw.counting());
        if !revoked_here.is_empty() {
            tracing::warn!(keys = ?revoked_here, "a refused whole table revokes keys: revoked here all the same");
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "revocations_of_refused")
                    .with("key_ids", revoked_here.clone()),
            );
        }
    }
    judged
}

/// `[keys] max_snapshot_drop_percent` now (a reload may change it).
pub fn max_drop(gw: &Gateway) -> u8 {
    gw.snapshot().config.keys.max_snapshot_drop_percent
}

/// How long a node that refused a whole table (the feed's or the Redis store's) waits before
/// fetching it whole again, unless a reload changes the limit first: the backoff's ceiling
/// from the first refusal on (it doubled from 100 ms, five whole reads in the first two
/// seconds), and no longer, because a refusing node gets the store's revocations only when it
/// looks again (`shrink`).
const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// Wait until a reload changes `[keys] max_snapshot_drop_percent` (the operator accepting the
/// table: seen within a quarter second) or `REFUSED_RETRY` has passed.
pub async fn after_refusal(gw: &Gateway) {
    let limit = max_drop(gw);
    let until = tokio::time::Instant::now() + REFUSED_RETRY;
    while tokio::time::Instant::now() < until && max_drop(gw) == limit {
        tokio::time::sleep(Duration::from_millis(250)).await; // polling the config, bounded
    }
}

/// Propagation ages, rotation events and kept revocations of an incremental apply (shared
/// with the feed).
pub fn observe(gw: &Gateway, out: &apply::Applied) {
    let now = unix_ms();
    for written in &out.written_at_ms {
        gw.metrics
            .propagation
            .observe((now - written).max(0) as f64 / 1000.0);
    }
    for event in &out.rotations {
        gw.metrics
            .rotations
            .with_label_values(&[event.as_str()])
            .inc();
        if let crate::keys::rotation::RotationEvent::Completed(secs) = event {
            gw.metrics.rotation_completion.observe(*secs as f64);
        }
    }
    report_kept_revoked(gw, &out.kept_revoked);
}

/// Count, log and audit revocations kept against the source (a rollback or tampering
/// symptom).
pub fn report_kept_revoked(gw: &Gateway, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    gw.metrics
        .source_errors
        .with_label_values(&["rollback"])
        .inc();
    tracing::error!(keys = ?ids, "source would un-revoke keys (rolled back, replayed or edited?); keeping them revoked");
    gw.audit(
        Event::new("source.error", "gateway")
            .with("kind", "rollback")
            .with("error", "source would un-revoke keys; kept revoked")
            .with("key_ids", ids.to_vec()),
    );
}

fn report_refusal(gw: &Gateway, refusal: &apply::Refusal) {
    gw.metrics
        .source_errors
        .with_label_values(&[refusal.kind()])
        .inc();
    tracing::error!(error = %refusal, "key source refused; keeping the last good table");
    gw.audit(
        Event::new("source.error", "gateway")
            .with("kind", refusal.kind())
            .with("error", refusal.to_string()),
    );
}

fn report(gw: &Gateway, e: &StoreError) {
    gw.metrics
        .source_errors
        .with_label_values(&[e.kind()])
        .inc();
    if gw.table_loaded() {
        tracing::error!(error = %e, revision = gw.table().revision(), "key store problem; keeping the last good table");
    } else {
        tracing::error!(error = %e, "key store unavailable and no table loaded; failing closed (503)");
    }
    gw.audit(
        Event::new("source.error", "gateway")
            .with("kind", e.kind())
            .with("error", e.to_string()),
    );
}
