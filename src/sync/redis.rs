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
//! with its real sync age.

use crate::audit::Event;
use crate::clock::unix_ms;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::redis::Settings;
use crate::store::file::Update;
use crate::store::redis::Follower;
use crate::store::seal::Signer;
use crate::sync::cache::CacheWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often an idle follower refreshes the copy's sync time (each costs an fsync).
const CACHE_TOUCH_EVERY_MS: i64 = 10_000;

pub fn spawn(gw: Arc<Gateway>, settings: Settings, cache: PathBuf) {
    tokio::spawn(run(gw, settings, cache));
}

/// What an update did to the table, for the local copy.
enum Change {
    Whole,
    Records(Vec<String>, u64),
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
                let mut records: Vec<KeyRecord> =
                    table.records().iter().map(|r| (**r).clone()).collect();
                records.sort_by_key(|r| r.rev);
                let (path, signer, log, rev) = (
                    path.to_path_buf(),
                    signer.clone(),
                    table.log(),
                    table.revision(),
                );
                Box::new(move |_| CacheWriter::create(&path, &signer, log, rev, &records, now))
            }
            Change::Records(ids, rev) => {
                let records: Vec<KeyRecord> = ids
                    .iter()
                    .filter_map(|id| table.get_by_id(id).map(|r| (*r).clone()))
                    .collect();
                Box::new(move |w| {
                    let mut w = w.ok_or_else(|| std::io::Error::other("no local copy yet"))?;
                    w.append(&records, rev, now)?;
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

async fn run(gw: Arc<Gateway>, settings: Settings, cache_path: PathBuf) {
    let signer = Signer::new(&gw.snapshot().keys.hasher);
    let mut cache = crate::sync::feed::load_cache(&gw, &cache_path, &signer).await;
    let mut touched_ms = unix_ms();
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        let held = gw.table_loaded().then(|| {
            let t = gw.table();
            (t.log(), t.revision())
        });
        let mut follower = Follower::new(&settings, signer.clone(), held);
        let error = loop {
            match follower.next().await {
                Ok(update) => {
                    last_error.clear();
                    backoff = Duration::from_millis(100);
                    let change = match &update {
                        Update::Replaced(_) => Change::Whole,
                        Update::Appended(p) => {
                            Change::Records(p.records.iter().map(|r| r.id.clone()).collect(), p.rev)
                        }
                        Update::Unchanged => Change::Idle,
                    };
                    crate::sync::file::apply(&gw, update);
                    persist(
                        &gw,
                        &mut cache,
                        &cache_path,
                        &signer,
                        change,
                        &mut touched_ms,
                    )
                    .await;
                }
                Err(e) => break e,
            }
        };
        let kind = match error.kind() {
            "io" => "redis",
            other => other,
        };
        gw.metrics.source_errors.with_label_values(&[kind]).inc();
        let text = error.to_string();
        if text != last_error {
            tracing::warn!(error = %error, revision = gw.table().revision(), "redis store follower: serving the last good table");
            gw.audit(
                Event::new("source.error", "gateway")
                    .with("kind", kind)
                    .with("error", text.clone()),
            );
            last_error = text;
        }
        tokio::time::sleep(backoff).await; // reconnect pacing, not synchronisation
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
