//! Keeps a gateway's key table in step with the store file.
//!
//! A dedicated thread (the work is blocking file I/O) polls the file whenever the directory
//! reports a change (inotify via `notify`; the directory, so renames by compaction are seen)
//! and at least every `poll_interval` as a fallback. Appended lines are applied one record at
//! a time to the live table; a replaced file is loaded into a new table that is swapped in
//! whole. Errors never touch the table (fail static): they are counted, logged and audited.

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::keys::table::KeyTable;
use crate::store::file::{Follower, LogFile, Parsed, StoreError, Update};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// Start following `path` for a gateway. Returns once the thread is started; the first load
/// happens on it.
pub fn spawn(gw: Arc<Gateway>, path: PathBuf, poll_interval: Duration) -> std::io::Result<()> {
    let mut last_error: Option<String> = None;
    watch_file(
        "keygate-store",
        Follower::new(LogFile::new(&path)),
        poll_interval,
        move |result| match result {
            Ok(update) => {
                last_error = None;
                apply(&gw, update);
            }
            Err(e) => {
                let text = e.to_string();
                // Report a persisting error once, not on every poll.
                if last_error.as_deref() != Some(text.as_str()) {
                    report(&gw, &e);
                    last_error = Some(text);
                }
            }
        },
    )
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
    mut on_poll: impl FnMut(Result<Update, StoreError>) + Send + 'static,
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
                on_poll(follower.poll());
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

fn apply(gw: &Gateway, update: Update) {
    match update {
        Update::Unchanged => gw.mark_synced(),
        Update::Appended(parsed) => {
            report_corrupt(gw, &parsed);
            let table = gw.table();
            let now = unix_ms();
            let n = parsed.records.len();
            let mut kept = Vec::new();
            for r in parsed.records {
                if unrevokes(&table, &r) {
                    kept.push(r.id);
                    continue;
                }
                let age = (now - r.written_at_ms).max(0) as f64 / 1000.0;
                if table.apply(r) {
                    gw.metrics.propagation.observe(age);
                }
            }
            table.advance(parsed.rev);
            report_unrevoke(gw, &kept);
            gw.mark_synced();
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
            // A replacement may be an old backup that later appends brought back up to the
            // applied revision: revocations already enforced are carried over, never undone.
            let current = gw.table();
            let mut kept = Vec::new();
            let records: Vec<_> = parsed
                .records
                .into_iter()
                .map(|r| match current.get_by_id(&r.id) {
                    Some(old) if unrevokes(&current, &r) => {
                        kept.push(r.id.clone());
                        let mut keep = (*old).clone();
                        keep.rev = r.rev;
                        keep
                    }
                    _ => r,
                })
                .collect();
            drop(current);
            report_unrevoke(gw, &kept);
            let table = KeyTable::from_records(records, parsed.rev);
            let (rev, keys) = (table.revision(), table.len());
            gw.replace_table(table);
            gw.metrics.table_revision.set(rev as i64);
            tracing::info!(records = n, keys, revision = rev, "key table loaded");
            gw.audit(
                Event::new("table.applied", "gateway")
                    .with("mode", "full")
                    .with("revision", rev)
                    .with("keys", keys),
            );
        }
    }
}

/// Revocation is terminal (no operation un-revokes a key): a record version without a
/// revocation for a key this table holds as revoked comes from a rolled-back or edited store.
fn unrevokes(table: &KeyTable, r: &KeyRecord) -> bool {
    r.revoked_at.is_none()
        && table
            .get_by_id(&r.id)
            .is_some_and(|old| old.revoked_at.is_some())
}

/// Count, log and audit revocations kept against the store (a rollback symptom).
fn report_unrevoke(gw: &Gateway, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    gw.metrics
        .source_errors
        .with_label_values(&["rollback"])
        .inc();
    tracing::error!(keys = ?ids, "store would un-revoke keys (rolled back or edited?); keeping them revoked");
    gw.audit(
        Event::new("source.error", "gateway")
            .with("kind", "rollback")
            .with("error", "store would un-revoke keys; kept revoked")
            .with("key_ids", ids.to_vec()),
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
