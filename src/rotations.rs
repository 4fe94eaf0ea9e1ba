//! Rotations that finish themselves (`keys rotate --complete-when-idle`), run where usage from
//! every node is known: `keygate serve` with a file store (one node, or nodes sharing the
//! usage file or Redis) and `keygate control` in a fleet (gateways report usage to it; a
//! gateway following a feed never runs this, it has only its own traffic).
//!
//! Each tick scans the in-memory records for open rotations (cheap, no I/O); only when one
//! exists is usage read, and only when one is ready is the store locked.
//! `Keys::complete_rotations` re-checks under the lock, so two nodes racing complete a
//! rotation once. The change reaches every gateway like any other record, and each counts it
//! in `keygate_key_rotations_total` as it applies it (`sync::file::observe`).

use crate::control::Control;
use crate::gateway::Gateway;
use crate::keys::ops::{Keys, OpsError};
use crate::keys::record::KeyRecord;
use crate::keys::rotation::{open_idle_rotations, ready_to_complete};
use crate::keys::KeySettings;
use crate::usage::Used;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

type Pairs = Vec<(Arc<KeyRecord>, Arc<KeyRecord>)>;

/// Complete the ready rotations among `pairs`; takes the store's lock only if one is ready.
fn complete_ready(
    settings: &KeySettings,
    actor: &str,
    pairs: &Pairs,
    usage: &BTreeMap<String, Used>,
    now: i64,
) -> Result<Vec<KeyRecord>, OpsError> {
    let ready: Vec<String> = pairs
        .iter()
        .filter(|(old, new)| ready_to_complete(old, new, usage, now))
        .map(|(old, _)| old.id.clone())
        .collect();
    tracing::debug!(open = pairs.len(), ready = ready.len(), "rotation check");
    if ready.is_empty() {
        return Ok(vec![]);
    }
    Keys::new(settings, actor).complete_rotations(&ready, usage, now)
}

/// Run one completion off the async threads and log what happened.
async fn complete(
    settings: KeySettings,
    actor: &'static str,
    pairs: Pairs,
    usage: BTreeMap<String, Used>,
) {
    let now = crate::clock::unix_secs();
    let done =
        tokio::task::spawn_blocking(move || complete_ready(&settings, actor, &pairs, &usage, now))
            .await;
    match done {
        Ok(Ok(revoked)) => {
            for r in revoked {
                tracing::info!(key_id = %r.id, successor = ?r.rotated_to, "rotation completed: the old key was idle and is revoked");
            }
        }
        // A read-only store (a hardened unit) cannot complete rotations: say so each tick.
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot complete rotations"),
        Err(e) => tracing::error!(error = %e, "rotation completion task failed"),
    }
}

fn ids(pairs: &Pairs) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(old, new)| [old.id.clone(), new.id.clone()])
        .collect()
}

/// Usage as `keygate serve` knows it: Redis (fleet-wide) or the usage file, plus this
/// node's uses not flushed yet (latest use, larger count). `None` when Redis cannot be read:
/// completing on this node's view alone could revoke a key other nodes still see in use.
async fn gateway_usage(gw: &Arc<Gateway>, pairs: &Pairs) -> Option<BTreeMap<String, Used>> {
    let ids = ids(pairs);
    let mut usage = match gw.limiter.fleet() {
        Some(f) => {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            match crate::redis::usage::read(f.client(), &refs).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %e, "rotation completion skipped: cannot read usage from redis");
                    return None;
                }
            }
        }
        None => {
            let path = gw.snapshot().keys.usage_file.clone();
            tokio::task::spawn_blocking(move || crate::usage::read(&path))
                .await
                .ok()?
        }
    };
    for id in &ids {
        if let Some(local) = gw.usage.get(id) {
            let e = usage.entry(id.clone()).or_default();
            e.last_used = e.last_used.max(local.last_used);
            e.requests = e.requests.max(local.requests);
        }
    }
    Some(usage)
}

/// The keys with an open rotation and their successors: what `open_idle_rotations` needs, read
/// from the table without rebuilding every record.
fn rotation_candidates(table: &crate::keys::table::KeyTable) -> Vec<Arc<KeyRecord>> {
    let open = table.open_rotations();
    let successors: Vec<Arc<KeyRecord>> = open
        .iter()
        .filter_map(|old| table.get_by_id(old.rotated_to.as_deref()?))
        .collect();
    open.into_iter().chain(successors).collect()
}

/// The periodic task of `keygate serve` with a file store.
pub async fn run_on_gateway(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let every = gw.snapshot().config.keys.rotation_check_seconds.max(1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = stop.changed() => return,
        }
        let pairs = open_idle_rotations(&rotation_candidates(&gw.table()));
        if pairs.is_empty() {
            continue;
        }
        if let Some(usage) = gateway_usage(&gw, &pairs).await {
            complete(gw.snapshot().keys.clone(), "gateway", pairs, usage).await;
        }
    }
}

/// The periodic task of `keygate control`: the fleet's usage is where gateways' reports and
/// verify's counts are added (`Control::add_usage`).
pub async fn run_on_control(c: Arc<Control>) {
    let every = Duration::from_secs(c.config.keys.rotation_check_seconds.max(1));
    loop {
        tokio::time::sleep(every).await;
        let pairs = open_idle_rotations(&c.feed.latest());
        if pairs.is_empty() {
            continue;
        }
        let ids = ids(&pairs);
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        // No fallback: a view without the fleet's uses could revoke a key still in use.
        match c.read_usage(&refs).await {
            Ok(usage) => complete(c.settings.clone(), "control-plane", pairs, usage).await,
            Err(e) => {
                tracing::warn!(error = %e, "rotation completion skipped: cannot read usage")
            }
        }
    }
}
