//! A gateway following the Redis store (`[keys] source = "redis"`) through
//! `store::redis::Follower`: the table is loaded (built aside, swapped whole), then new
//! revisions arrive by blocking read, so a revocation is applied within milliseconds with no
//! polling loop. The follower yields the same `Update`s as the file follower, and they are
//! applied by the same code (`sync::file::apply` → `sync::apply`): revocation is final, never
//! backwards, corrupt or forged records reported and skipped.
//!
//! Fail static: while Redis is down the gateway keeps its last table (`max_staleness` and
//! `on_stale` decide readiness) and, when Redis is back with the same log, resumes from its
//! revision without a reload. Like a feed gateway it keeps a sealed local copy
//! (`keys.feed_cache`, `sync::cache`), so a restart while Redis is down serves the last table
//! with its real sync age. It reads Redis' `TIME` every few seconds: this node's clock against
//! the store's, `keygate_clock_skew_seconds` (`sync::skew`), as a feed gateway's heartbeats give
//! it against the control plane's.
//!
//! Start ([`start`], awaited by `server.rs`): the local copy when there is one; else the
//! store's checkpoint (`s:checkpoint`, one sealed binary read, `store::checkpoint`) plus the
//! stream entries after it; else, or when the checkpoint is refused (loudly: error log,
//! `keygate_source_errors_total{kind="checkpoint"}`, audit), every record. That first read is
//! the only one: the start-up secret-version check judges the table it loaded.

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::redis::Settings;
use crate::store::file::Update;
use crate::store::redis::{Follower, Unverifiable};
use crate::store::seal::Signer;
use crate::sync::apply::Refusal;
use crate::sync::cache::CacheWriter;
use crate::sync::skew::Against;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often an idle follower refreshes the copy's sync time (each costs an fsync).
const CACHE_TOUCH_EVERY_MS: i64 = 10_000;
/// How often the follower reads Redis' clock for `keygate_clock_skew_seconds` (a feed gateway
/// measures it at each heartbeat).
const SKEW_EVERY: Duration = Duration::from_secs(5);

/// What a Redis-store gateway's start loaded, for the secret-version check (`server.rs`).
#[derive(Debug, Default)]
pub struct FirstLoad {
    /// Records read from Redis that could not be verified because their MAC names a secret
    /// version not configured (never in the table; the check counts them).
    pub unverifiable: Unverifiable,
    /// Redis did not answer and there was no local copy: no table to judge yet.
    pub unreachable: Option<String>,
}

/// Load the first table (local copy, else checkpoint, else every record), then follow the
/// store on a task of its own. Returns once the first table is in, or Redis did not answer.
pub async fn start(gw: Arc<Gateway>, settings: Settings, cache_path: PathBuf) -> FirstLoad {
    let signer = Signer::new(&gw.snapshot().keys.hasher);
    let cache = crate::sync::feed::load_cache(&gw, &cache_path, &signer).await;
    let mut first = FirstLoad::default();
    let mut follower = Follower::new(&settings, signer.clone(), held(&gw));
    let mut pending = None;
    if !gw.table_loaded() {
        let started = std::time::Instant::now();
        match follower.resume_from_checkpoint().await {
            Ok(resumed) => {
                let loaded = crate::sync::file::apply_checkpoint(
                    &gw,
                    resumed,
                    started,
                    &[],
                    |why| {
                        tracing::error!(error = %why, "redis store checkpoint refused; reading every key instead");
                    },
                );
                if loaded {
                    pending = Some(Change::Whole);
                } else {
                    // Not used: read every key from the start, not from its position.
                    follower = Follower::new(&settings, signer.clone(), None);
                }
            }
            Err(e) => first.unreachable = Some(e.to_string()),
        }
    }
    if !gw.table_loaded() && first.unreachable.is_none() {
        match follower.next().await {
            Ok(update) => {
                let change = change_of(&update);
                // The first table: nothing held that it could leave out.
                let _ = crate::sync::file::apply(&gw, update);
                pending = Some(change);
            }
            Err(e) => first.unreachable = Some(e.to_string()),
        }
    }
    first.unverifiable = follower.take_unverifiable();
    let copy = LocalCopy {
        signer,
        cache,
        cache_path,
        touched_ms: unix_ms(),
    };
    tokio::spawn(run(gw, settings, follower, copy, pending));
    first
}

/// The log and revision a gateway holds, to resume from without a reload.
fn held(gw: &Gateway) -> Option<(crate::store::seal::LogId, u64)> {
    gw.table_loaded().then(|| {
        let t = gw.table();
        (t.log(), t.revision())
    })
}

fn change_of(update: &Update) -> Change {
    match update {
        Update::Replaced(_) => Change::Whole,
        Update::Appended(p) => {
            Change::Records(p.records.iter().map(|r| r.id.clone()).collect(), p.rev)
        }
        Update::Unchanged => Change::Idle,
    }
}

/// The sealed local copy the follower task keeps in step with the table.
struct LocalCopy {
    signer: Signer,
    cache: Option<CacheWriter>,
    cache_path: PathBuf,
    touched_ms: i64,
}

impl LocalCopy {
    async fn save(&mut self, gw: &Arc<Gateway>, change: Change) {
        persist(
            gw,
            &mut self.cache,
            &self.cache_path,
            &self.signer,
            change,
            &mut self.touched_ms,
        )
        .await;
    }
}

/// What an update did to the table, for the local copy.
enum Change {
    Whole,
    Records(Vec<String>, u64),
    /// Keys revoked from a whole table this node refused (`sync::file::shrink`): in the copy
    /// without the store counting as in step.
    Obeyed(Vec<String>),
    Idle,
}

/// Keep the sealed local copy in step with the table (off the async workers). A copy that
/// cannot be written is dropped and rewritten at the next whole table.
async fn persist(
    gw: &Arc<Gateway>,
    cache: &mut Option<CacheWriter>,
    path: &std::path::Path,
    signer: &Signer,
    change: Change,
    touched_ms: &mut i64,
) {
    let now = unix_ms();
    let table = gw.table();
    let job: Box<dyn FnOnce(Option<CacheWriter>) -> std::io::Result<CacheWriter> + Send> =
        match change {
            Change::Whole => {
                // Every record rebuilt on the blocking pool: at a million keys that takes
                // seconds an async worker (serving `/readyz`, say) must not spend.
                let whole: Arc<crate::keys::table::KeyTable> = Arc::clone(&table);
                let (path, signer) = (path.to_path_buf(), signer.clone());
                Box::new(move |_| {
                    let mut records: Vec<KeyRecord> =
                        whole.records().iter().map(|r| (**r).clone()).collect();
                    records.sort_by_key(|r| r.rev);
                    let (log, rev) = (whole.log(), whole.revision());
                    CacheWriter::create(&path, &signer, log, rev, &records, now)
                })
            }
            Change::Records(ids, rev) => {
                let records = table.versions_of(&ids);
                Box::new(move |w| {
                    let mut w = w.ok_or_else(|| std::io::Error::other("no local copy yet"))?;
                    w.append(&records, rev, now)?;
                    Ok(w)
                })
            }
            Change::Obeyed(ids) if ids.is_empty() => return,
            Change::Obeyed(ids) => {
                let records = table.versions_of(&ids);
                Box::new(move |w| {
                    let mut w = w.ok_or_else(|| std::io::Error::other("no local copy yet"))?;
                    w.append_unsynced(&records)?;
                    Ok(w)
                })
            }
            Change::Idle if now - *touched_ms >= CACHE_TOUCH_EVERY_MS => {
                let rev = table.revision();
                Box::new(move |w| {
                    let mut w = w.ok_or_else(|| std::io::Error::other("no local copy yet"))?;
                    w.touch(rev, now)?;
                    Ok(w)
                })
            }
            Change::Idle => return,
        };
    drop(table);
    *touched_ms = now;
    let writer = cache.take();
    match tokio::task::spawn_blocking(move || job(writer)).await {
        Ok(Ok(w)) => *cache = Some(w),
        _ => tracing::debug!(
            "local copy of the redis table not written; rewritten at the next whole table"
        ),
    }
}

/// Follow the store from `first` (the follower `start` loaded the first table with; `pending`:
/// that table, still to be written to the local copy), with a new follower after each error.
async fn run(
    gw: Arc<Gateway>,
    settings: Settings,
    first: Follower,
    mut copy: LocalCopy,
    pending: Option<Change>,
) {
    if let Some(change) = pending {
        copy.save(&gw, change).await;
    }
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    let mut first = Some(first);
    let mut measured: Option<Instant> = None;
    loop {
        let mut follower = first
            .take()
            .unwrap_or_else(|| Follower::new(&settings, copy.signer.clone(), held(&gw)));
        let error = loop {
            if measured.is_none_or(|t| t.elapsed() >= SKEW_EVERY) {
                // A Redis that does not answer is reported by the read below.
                if let Ok(skew) = follower.clock_skew().await {
                    crate::sync::skew::observe(&gw, skew, Against::Redis);
                }
                measured = Some(Instant::now());
            }
            match follower.next().await {
                Ok(update) => {
                    let change = change_of(&update);
                    if let Err(refusal) = crate::sync::file::apply(&gw, update) {
                        if let Refusal::Shrink { revoked_here, .. } = refusal {
                            copy.save(&gw, Change::Obeyed(revoked_here)).await;
                        }
                        break None;
                    }
                    last_error.clear();
                    backoff = Duration::from_millis(100);
                    copy.save(&gw, change).await;
                }
                Err(e) => break Some(e),
            }
        };
        match error {
            Some(error) => {
                report_error(&gw, &error, &mut last_error);
                tokio::time::sleep(backoff).await; // reconnect pacing, not synchronisation
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            // A whole table refused (reported): the new follower loads the store whole again
            // and it is judged afresh, once the limit changes or a while has passed.
            None => crate::sync::file::after_refusal(&gw).await,
        }
    }
}

/// Count, log (once while it lasts) and audit a follower error.
fn report_error(gw: &Gateway, error: &crate::store::file::StoreError, last_error: &mut String) {
    let kind = match error.kind() {
        "io" => "redis",
        other => other,
    };
    gw.metrics.source_errors.with_label_values(&[kind]).inc();
    let text = error.to_string();
    if text != *last_error {
        tracing::warn!(error = %error, revision = gw.table().revision(), "redis store follower: serving the last good table");
        gw.audit(
            Event::new("source.error", "gateway")
                .with("kind", kind)
                .with("error", text.clone()),
        );
        *last_error = text;
    }
}
