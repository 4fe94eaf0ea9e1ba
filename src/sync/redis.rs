//! A gateway following the Redis store (`[keys] source = "redis"`): load the table (built
//! aside, swapped whole), then follow the log stream with a blocking `XREAD` from the revision
//! held, so a revocation is applied within milliseconds with no polling loop.
//!
//! Every record is verified (`store::seal`) and goes through `sync::apply`, like the file and
//! the feed: revocation is final, never backwards. When Redis is down the gateway keeps its
//! last table (fail static; `max_staleness`/`on_stale` decide readiness) and resumes from its
//! revision when Redis is back, without a reload, as long as the log is the same. A different
//! log id (a new store, a restore) is a whole new table.
//!
//! The snapshot is read with `HSCAN` in small steps (Redis is never blocked for long): the
//! revision R is read first, versions newer than R seen during the scan are dropped, and the
//! stream from R delivers them, so the table is consistent at R and then caught up.

use crate::audit::Event;
use crate::gateway::Gateway;
use crate::keys::record::KeyRecord;
use crate::redis::resp::Value;
use crate::redis::{Client, Settings};
use crate::store::file::{Parsed, StoreError};
use crate::store::redis::{head, verified, Names};
use crate::store::seal::{LogId, Signer};
use crate::sync::{apply, file as follow};
use std::sync::Arc;
use std::time::Duration;

/// How long one `XREAD` blocks: also how often an idle follower checks the log's head.
const BLOCK: Duration = Duration::from_millis(1000);
/// Records per `XREAD` and per `HSCAN` step.
const COUNT: &[u8] = b"1000";

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Refused(#[from] apply::Refusal),
    #[error("store log changed to {0}: reloading whole")]
    NewLog(LogId),
    #[error("unexpected reply to {0}")]
    Reply(&'static str),
}

impl FollowError {
    fn kind(&self) -> &'static str {
        match self {
            FollowError::Refused(r) => r.kind(),
            FollowError::NewLog(_) => "reload",
            FollowError::Store(_) | FollowError::Reply(_) => "redis",
        }
    }
}

pub fn spawn(gw: Arc<Gateway>, settings: Settings) {
    tokio::spawn(run(gw, settings));
}

async fn run(gw: Arc<Gateway>, settings: Settings) {
    let signer = Signer::new(&gw.snapshot().keys.hasher);
    let names = Names::new(&settings.prefix);
    // Its own client: a blocking read must not hold a connection the store writers or the
    // limiter need, and needs a timeout longer than the block.
    let mut s = crate::store::redis::store_settings(settings);
    s.command_timeout = s.command_timeout.max(BLOCK * 2);
    let client = Client::new(s, crate::metrics::Metrics::new(0).redis_metrics());
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    loop {
        let before = gw.table().revision();
        if let Err(e) = follow_once(&gw, &client, &names, &signer).await {
            if !matches!(e, FollowError::NewLog(_)) {
                gw.metrics
                    .source_errors
                    .with_label_values(&[e.kind()])
                    .inc();
            }
            let text = e.to_string();
            if text != last_error {
                tracing::warn!(error = %e, revision = gw.table().revision(), "redis store follower: serving the last good table");
                gw.audit(
                    Event::new("source.error", "gateway")
                        .with("kind", e.kind())
                        .with("error", text.clone()),
                );
                last_error = text;
            }
        }
        if gw.table().revision() != before {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await; // reconnect pacing, not synchronisation
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Load (unless the table already holds this log) and follow until something fails.
async fn follow_once(
    gw: &Arc<Gateway>,
    c: &Client,
    n: &Names,
    signer: &Signer,
) -> Result<(), FollowError> {
    let (log, rev) = head(c, n).await?;
    let table = gw.table();
    if log.is_none() && !table.log().is_none() {
        // A wiped or new server: an empty store after a real one is never trusted (it would
        // empty the table); keep serving the last table until a writer starts a log.
        return Err(StoreError::Redis(
            "the store is gone from Redis (wiped, or a new server without its data); keeping the last table".into(),
        )
        .into());
    }
    let held = table.log() == log && !log.is_none() && table.revision() <= rev;
    if log == table.log() && table.revision() > rev {
        return Err(apply::Refusal::Backwards {
            log,
            offered: rev,
            applied: table.revision(),
        }
        .into());
    }
    drop(table);
    if !held {
        load(gw, c, n, signer, log, rev).await?;
    }
    // The stream position: entry ids are `<rev>-1`. Tracked apart from the table's revision so
    // an entry that is refused (bad MAC, a replayed old record) is passed over once, not read
    // again forever.
    let mut pos = gw.table().revision();
    loop {
        let from = format!("{pos}-1");
        let block = BLOCK.as_millis().to_string();
        let v = c
            .call(&[
                b"XREAD",
                b"COUNT",
                COUNT,
                b"BLOCK",
                block.as_bytes(),
                b"STREAMS",
                n.log.as_bytes(),
                from.as_bytes(),
            ])
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let entries = match v {
            Value::Nil => {
                // Idle: make sure the log is still the one we follow.
                let (now_log, now_rev) = head(c, n).await?;
                if now_log != log {
                    return Err(FollowError::NewLog(now_log));
                }
                if now_rev < pos {
                    return Err(apply::Refusal::Backwards {
                        log,
                        offered: now_rev,
                        applied: pos,
                    }
                    .into());
                }
                gw.mark_synced();
                continue;
            }
            Value::Array(streams) => stream_entries(streams)?,
            Value::Error(e) => return Err(StoreError::Redis(e).into()),
            _ => return Err(FollowError::Reply("XREAD")),
        };
        let mut parsed = Parsed {
            log,
            ..Parsed::default()
        };
        let before = pos;
        for (id, raw) in entries {
            pos = pos.max(id);
            if let Some(r) = verified(signer, log, &raw, &mut parsed) {
                parsed.records.push(r);
            }
        }
        report_corrupt(gw, &parsed);
        let table = gw.table();
        // Records must carry the revision of their entry: an old record under a new entry id
        // is a replay (apply ignores what is at or below the table's revision).
        parsed.records.retain(|r| r.rev > before);
        let out = apply::records(&table, log, parsed.records, table.revision())?;
        follow::observe(gw, &out);
        gw.mark_synced();
        gw.metrics.table_revision.set(table.revision() as i64);
    }
}

/// (revision from the entry id, record JSON) of each entry of an `XREAD` reply.
fn stream_entries(streams: Vec<Value>) -> Result<Vec<(u64, Vec<u8>)>, FollowError> {
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(parts) = s else {
            return Err(FollowError::Reply("XREAD"));
        };
        let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
            return Err(FollowError::Reply("XREAD"));
        };
        for e in entries {
            let Value::Array(mut id_fields) = e else {
                return Err(FollowError::Reply("XREAD"));
            };
            let Some(Value::Array(fields)) = id_fields.pop() else {
                return Err(FollowError::Reply("XREAD"));
            };
            let rev = id_fields
                .pop()
                .and_then(|v| v.as_text())
                .and_then(|id| id.split_once('-').and_then(|(r, _)| r.parse::<u64>().ok()))
                .ok_or(FollowError::Reply("XREAD entry id"))?;
            // fields = ["r", json]
            if let Some(Value::Bulk(json)) = fields.into_iter().nth(1) {
                out.push((rev, json));
            }
        }
    }
    Ok(out)
}

/// Every verified record of the hash `key` at or below `rev` (HSCAN in small steps).
async fn scan(
    c: &Client,
    key: &str,
    signer: &Signer,
    log: LogId,
    rev: u64,
    parsed: &mut Parsed,
) -> Result<Vec<KeyRecord>, FollowError> {
    let mut out = Vec::new();
    let mut cursor = b"0".to_vec();
    // Bounded: HSCAN returns cursor 0 after one full pass; cap the steps anyway.
    for _ in 0..10_000_000u64 {
        let v = c
            .call(&[b"HSCAN", key.as_bytes(), &cursor, b"COUNT", COUNT])
            .await
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        let Value::Array(mut parts) = v else {
            return Err(FollowError::Reply("HSCAN"));
        };
        let (Some(Value::Array(pairs)), Some(Value::Bulk(next))) = (parts.pop(), parts.pop())
        else {
            return Err(FollowError::Reply("HSCAN"));
        };
        for (i, item) in pairs.into_iter().enumerate() {
            if let (1, Value::Bulk(raw)) = (i % 2, item) {
                if let Some(r) = verified(signer, log, &raw, parsed) {
                    // Newer than `rev`: the stream from `rev` brings it.
                    if r.rev <= rev {
                        out.push(r);
                    }
                }
            }
        }
        if next == b"0" {
            break;
        }
        cursor = next;
    }
    Ok(out)
}

/// Read the whole table consistent at `rev` and install it (through `apply::snapshot`).
async fn load(
    gw: &Arc<Gateway>,
    c: &Client,
    n: &Names,
    signer: &Signer,
    log: LogId,
    rev: u64,
) -> Result<(), FollowError> {
    let mut parsed = Parsed {
        log,
        rev,
        ..Parsed::default()
    };
    let latest = scan(c, &n.keys, signer, log, rev, &mut parsed).await?;
    // Tombstones forever: the revoked hash is never rewritten, so a version in `s:keys`
    // that lacks a revocation recorded there (an old record written back) stays revoked.
    let revoked = scan(c, &n.revoked, signer, log, rev, &mut parsed).await?;
    let mut by_id: std::collections::HashMap<String, KeyRecord> =
        latest.into_iter().map(|r| (r.id.clone(), r)).collect();
    for r in revoked {
        let keep = by_id
            .get(&r.id)
            .is_none_or(|cur| crate::keys::record::unrevokes(Some(&r), cur));
        if keep {
            by_id.insert(r.id.clone(), r);
        }
    }
    parsed.records = by_id.into_values().collect();
    report_corrupt(gw, &parsed);
    let mut records: Vec<KeyRecord> = parsed.records;
    records.sort_by_key(|r| r.rev);
    let n_records = records.len();
    let (table, out) = apply::snapshot(&gw.table(), log, rev, records)?;
    follow::report_kept_revoked(gw, &out.kept_revoked);
    let keys = table.len();
    gw.replace_table(table);
    gw.metrics.table_revision.set(rev as i64);
    tracing::info!(records = n_records, keys, revision = rev, %log, "key table loaded from redis");
    gw.audit(
        Event::new("table.applied", "gateway")
            .with("mode", "full")
            .with("source", "redis")
            .with("log", log.to_string())
            .with("revision", rev)
            .with("keys", keys),
    );
    Ok(())
}

fn report_corrupt(gw: &Gateway, parsed: &Parsed) {
    for c in &parsed.corrupt {
        gw.metrics
            .source_errors
            .with_label_values(&["bad_mac"])
            .inc();
        tracing::error!(reason = %c.reason, "redis store record refused");
    }
}
