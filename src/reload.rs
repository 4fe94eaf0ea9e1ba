//! Config reload: one whole-or-nothing `reload` for SIGHUP and for a changed config file.
//! A new config is judged as at start where keys are concerned: one that drops a hash-secret
//! version keys in the table still use is refused whole (or applied with a warning, with
//! `keys.on_missing_secret_version = "warn"`), through the same rule (`server::missing_in_table`).
//!
//! Why a file watch: on Kubernetes a ConfigMap update reaches the pod as a symlink swap
//! (`keygate.toml -> ..data/keygate.toml`, `..data` renamed to a new directory), and nobody
//! sends a signal. The watch stats the path (following symlinks) every [`WATCH_EVERY`] and
//! compares a fingerprint (device, inode, size, mtime): an atomic replace, a symlink swap and an
//! in-place edit all change it. Statting instead of inotify keeps it independent of how the
//! directory is swapped and of the filesystem, for one `stat` a tick.
//!
//! A change is applied only once the fingerprint has held for a whole tick, so an editor's
//! in-place write is not read half-written (which would count a spurious failed reload). Each
//! reload, whatever triggered it, records the fingerprint it read, so a SIGHUP after an edit and
//! the watch do not both reload the same file; reloads run one at a time.

use crate::audit::Event;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::snapshot::Snapshot;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the watch looks at the config file.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// What identifies one version of the file: `None` when it cannot be statted (missing during
/// a swap, or unreadable; the reload would fail the same way).
type Fingerprint = Option<(u64, u64, u64, i64, i64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The config file a gateway runs from and the version of it last applied (or refused).
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    applied: Mutex<Fingerprint>,
}

impl ConfigFile {
    /// Take the fingerprint before the first load, so a change racing the start is seen.
    pub fn new(path: &Path) -> Arc<ConfigFile> {
        Arc::new(ConfigFile {
            path: path.to_owned(),
            applied: Mutex::new(fingerprint(path)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Build a whole new snapshot from the file and swap it in, or keep the running one and
    /// report why (metrics, log, audit). Never a partial config.
    ///
    /// Reloads are serialised on `applied` (held throughout; no await inside): the signal task
    /// and the watch may both reload, and the version read last must be the one swapped in
    /// last.
    pub fn reload(&self, gw: &Gateway, trigger: &'static str) {
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *applied = fingerprint(&self.path);
        let built = Config::load(&self.path)
            .and_then(|c| Snapshot::build(c, &gw.metrics))
            .map_err(|e| e.to_string())
            .and_then(|s| secret_versions(gw, &s).map(|warnings| (s, warnings)));
        match built {
            Ok((s, warnings)) => {
                for w in warnings {
                    tracing::warn!(trigger, "config reloaded anyway: {w}");
                }
                let routes = s.routes.len();
                gw.swap_snapshot(s);
                gw.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(routes, trigger, "config reloaded");
                gw.audit(
                    Event::new("config.reloaded", "gateway")
                        .with("result", "ok")
                        .with("trigger", trigger)
                        .with("routes", routes),
                );
            }
            Err(e) => {
                gw.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, trigger, "config reload failed; keeping the running config");
                gw.audit(
                    Event::new("config.reloaded", "gateway")
                        .with("result", "error")
                        .with("trigger", trigger)
                        .with("error", e),
                );
            }
        }
    }

    /// The version on disk differs from the one applied and is the same as `previous` (it
    /// held for a tick).
    fn settled_change(&self, now: Fingerprint, previous: Fingerprint) -> bool {
        let applied = self.applied.lock().map(|a| *a).unwrap_or(now);
        now != applied && now == previous && now.is_some()
    }
}

/// The rule `keygate serve` applies at start (`server::missing_in_table`), under the
/// candidate's secrets and setting: a reload must not drop a secret version that keys in the
/// table still use (they would all get 401 behind a "config reloaded"). `Err` refuses the
/// whole reload. Only versions the running config has a secret for count: keys on a version
/// it already lacks are refused today too (said when that config was applied), and refusing
/// every later reload for them would block unrelated changes, the fix among them.
fn secret_versions(gw: &Gateway, candidate: &Snapshot) -> Result<Vec<String>, String> {
    let running = gw.snapshot();
    let now = crate::clock::unix_secs();
    let dropped = crate::server::missing_in_table(&candidate.keys, gw, Vec::new(), now)
        .dropped_from(&running.keys);
    candidate
        .keys
        .judge_missing(dropped.lines())
        .map_err(|found| format!("refusing the reload: {}", found.join("; ")))
}

/// Reload whenever the config file changes (see the module docs); runs until the runtime ends.
pub async fn watch(gw: Arc<Gateway>, file: Arc<ConfigFile>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = fingerprint(&file.path);
    loop {
        tick.tick().await;
        let now = fingerprint(&file.path);
        if file.settled_change(now, previous) {
            file.reload(&gw, "file");
        }
        previous = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_settled_only_when_it_held_for_a_tick_and_was_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, "a").unwrap();
        let file = ConfigFile::new(&path);
        let v1 = fingerprint(&path);
        assert!(!file.settled_change(v1, v1), "unchanged since start");
        // Atomic replace: a new inode.
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "bb").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let v2 = fingerprint(&path);
        assert_ne!(v1, v2);
        assert!(!file.settled_change(v2, v1), "first sight: wait a tick");
        assert!(file.settled_change(v2, v2), "held for a tick");
        *file.applied.lock().unwrap() = v2;
        assert!(!file.settled_change(v2, v2), "already applied");
        // Missing in the middle of a swap: nothing to apply.
        std::fs::remove_file(&path).unwrap();
        assert!(!file.settled_change(None, None));
    }
}
