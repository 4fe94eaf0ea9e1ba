//! `POST /v1/usage` (role feed): a feed gateway's report batch (`sync::report`). Its counts
//! are what the gateway's keys did since its previous batch, added where this control plane
//! keeps its own (Redis, else the usage file, as every node adds its counts there); its
//! sketches replace that node's in the forensics file.
//!
//! Each batch is applied once. A gateway sends a batch again, as it was, when no answer or a
//! 5xx reached it (it may have been applied, or half of it); `boot` is random per gateway
//! process and `seq` increases with each new batch. How far each process's batches got is
//! kept with the counts, so it holds across control plane restarts and between control planes
//! on one Redis: in Redis, a mark per process beside the usage hashes, advanced with each part
//! of a batch in the same script (`redis::usage::add_report`); with the usage file, a ledger
//! beside it (`<usage file>.reports.json`), committed with the counts under the file's lock
//! (`usage::merge_report_locked`: a crash between the two files cannot count a batch twice).
//! The sketches are written first: writing a node's sketches twice is harmless where adding
//! its counts twice is not.
//!
//! The body may be up to `sync::report::MAX_BYTES` whatever `[control] max_body_bytes` says
//! for the API: only a holder of a feed token gets to send one.

use super::api::{err, json_response, read_limited, ApiError, Body};
use super::{Control, UsageError};
use crate::sync::report::{Received, MAX_BYTES};
use crate::usage::{Delta, Process};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a gateway process's progress is kept after its last batch: a batch sent again
/// later than that (its gateway cut off from every control plane for a week) could count
/// twice.
pub const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Gateway processes the file ledger keeps at most, the least recently heard from dropped
/// first: it is rewritten with every batch.
const MAX_PROCESSES: usize = 10_000;

fn bad(detail: String) -> ApiError {
    err(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

/// A body this version cannot take, said plainly: a report of totals comes from a gateway
/// older than this control plane.
fn refusal(bytes: &[u8], e: serde_json::Error) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Older {
        usage: Option<serde::de::IgnoredAny>,
        seq: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Older>(bytes) {
        Ok(Older {
            usage: Some(_),
            seq: None,
        }) => bad(
            "a usage report of totals, from a gateway older than this control plane: upgrade \
             the gateway (its usage is not counted until then)"
                .to_owned(),
        ),
        _ => bad(format!("usage report: {e}")),
    }
}

pub async fn receive(c: &Arc<Control>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let limit = MAX_BYTES.max(c.config.control.max_body_bytes);
    let bytes = read_limited(req, limit).await?;
    let report: Received = serde_json::from_slice(&bytes).map_err(|e| refusal(&bytes, e))?;
    let from = Process {
        node: report.node.chars().take(128).collect(),
        boot: report.boot,
    };
    let unavailable = |what: &str, e: String| {
        tracing::warn!(error = %e, node = %from.node, "cannot apply a usage report's {what}; the gateway will send it again");
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("usage report not applied ({what}); send it again"),
        )
    };
    let mut forensics = report.forensics;
    // A gateway never tracks more; a report claiming more is cut, not trusted.
    while forensics.len() > crate::forensics::MAX_KEYS {
        forensics.pop_last();
    }
    if !forensics.is_empty() {
        let path = crate::forensics::path_for(&c.settings.usage_file);
        let node = from.node.clone();
        tokio::task::spawn_blocking(move || {
            crate::forensics::upsert_file(&path, &node, forensics, crate::forensics::MAX_KEYS)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(|e| unavailable("forensics", e.to_string()))?;
    }
    let counts = !report.added.is_empty();
    let deltas: Vec<Delta> = report
        .added
        .into_iter()
        .map(|(id, used)| Delta { id, used })
        .collect();
    let fresh = add_report(c, from.clone(), report.seq, deltas)
        .await
        .map_err(|e| unavailable("usage", e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &if fresh || !counts {
            json!({"accepted": true})
        } else {
            json!({"accepted": true, "duplicate": true})
        },
    ))
}

/// Add a batch's counts where this control plane keeps usage, once per (process, seq);
/// whether any were added now (false: the batch was applied before).
async fn add_report(
    c: &Control,
    from: Process,
    seq: u64,
    deltas: Vec<Delta>,
) -> Result<bool, UsageError> {
    if deltas.is_empty() {
        return Ok(false);
    }
    if let Some(client) = &c.redis {
        return Ok(crate::redis::usage::add_report(client, &from, seq, &deltas, KEEP).await?);
    }
    let path = c.settings.usage_file.clone();
    tokio::task::spawn_blocking(move || add_to_file(&path, &from, seq, &deltas))
        .await
        .map_err(std::io::Error::other)
        .and_then(|added| added)
        .map_err(UsageError::File)
}

/// One gateway process's last batch applied to the usage file, and when (unix seconds).
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    #[serde(flatten)]
    process: Process,
    seq: u64,
    at: i64,
}

/// `add_report` for the usage file: the ledger checked, the counts added and the ledger
/// advanced in one step (`usage::merge_report_locked`), all under the usage file's lock.
fn add_to_file(
    usage_file: &Path,
    from: &Process,
    seq: u64,
    deltas: &[Delta],
) -> std::io::Result<bool> {
    let _lock = crate::store::file::lock_beside(usage_file)?;
    let Some(ledger) = advanced_ledger(usage_file, from, seq)? else {
        return Ok(false);
    };
    crate::usage::merge_report_locked(usage_file, deltas, &ledger)?;
    Ok(true)
}

/// The ledger with `from`'s batch `seq` recorded, or `None` when that batch was applied
/// before. The caller holds the usage file's lock.
fn advanced_ledger(
    usage_file: &Path,
    from: &Process,
    seq: u64,
) -> std::io::Result<Option<Vec<Progress>>> {
    crate::usage::settle_report(usage_file)?;
    let mut ledger = read_ledger(&crate::usage::ledger_path(usage_file));
    if ledger.iter().any(|a| a.process == *from && seq <= a.seq) {
        return Ok(None);
    }
    let now = crate::clock::unix_secs();
    let keep = KEEP.as_secs() as i64;
    ledger.retain(|a| a.process != *from && now - a.at < keep);
    ledger.push(Progress {
        process: from.clone(),
        seq,
        at: now,
    });
    if ledger.len() > MAX_PROCESSES {
        ledger.sort_by_key(|a| std::cmp::Reverse(a.at));
        ledger.truncate(MAX_PROCESSES);
    }
    Ok(Some(ledger))
}

/// The ledger as written; a missing one is empty, an unreadable one too, said (it only guards
/// against batches sent twice, and is rewritten whole with the next batch).
fn read_ledger(path: &Path) -> Vec<Progress> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the usage report ledger; starting a new one");
            return Vec::new();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(error = %e, path = %path.display(), "the usage report ledger is not valid; starting a new one");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{self, Used};

    fn batch(requests: u64) -> Vec<Delta> {
        vec![Delta {
            id: "key_a".into(),
            used: Used {
                last_used: 100,
                requests,
                ..Used::default()
            },
        }]
    }

    fn requests(usage_file: &Path) -> u64 {
        usage::read(usage_file)
            .get("key_a")
            .map_or(0, |u| u.requests)
    }

    /// A control plane that stops between a batch's two files (the usage file, its ledger), as
    /// a crash does, then gets the batch again: it counts once, whichever file was written.
    #[test]
    fn a_batch_interrupted_between_counts_and_ledger_counts_once_when_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let gw = Process {
            node: "gw1".into(),
            boot: 7,
        };
        assert!(add_to_file(&path, &gw, 1, &batch(4)).unwrap());
        assert_eq!(requests(&path), 4);

        // Stopped before the usage file's rename: the batch is not in, and sent again it is
        // added.
        let ledger = advanced_ledger(&path, &gw, 2).unwrap().unwrap();
        std::mem::forget(usage::stage_report(&path, &batch(10), &ledger).unwrap());
        assert_eq!(requests(&path), 4, "nothing landed");
        assert!(add_to_file(&path, &gw, 2, &batch(10)).unwrap());
        assert_eq!(requests(&path), 14);
        assert!(!add_to_file(&path, &gw, 2, &batch(10)).unwrap());

        // Stopped after the rename, before the ledger: the batch is in, and sent again it is a
        // duplicate. (Before, the ledger still said seq 2 and the batch counted twice.)
        let ledger = advanced_ledger(&path, &gw, 3).unwrap().unwrap();
        usage::stage_report(&path, &batch(100), &ledger)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(requests(&path), 114);
        assert!(!add_to_file(&path, &gw, 3, &batch(100)).unwrap());
        assert_eq!(requests(&path), 114);

        // The same, with a gateway's flush to the shared usage file coming first: the flush
        // settles the batch before it replaces the file, so the batch still reads as applied.
        let ledger = advanced_ledger(&path, &gw, 4).unwrap().unwrap();
        usage::stage_report(&path, &batch(1000), &ledger)
            .unwrap()
            .commit()
            .unwrap();
        usage::merge_into_file(&path, &batch(1)).unwrap();
        assert_eq!(requests(&path), 1115);
        assert!(!add_to_file(&path, &gw, 4, &batch(1000)).unwrap());
        assert_eq!(requests(&path), 1115);

        // No intent or temp file is left behind.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["usage.json", "usage.json.lock", "usage.json.reports.json"]
        );
    }
}
