//! A gateway following the Redis store (`[keys] source = "redis"`) through
//! `store::redis::Follower`: the table is loaded (built aside, swapped whole), then new
//! revisions arrive by blocking read, so a revocation is applied within milliseconds with no
//! polling loop. The follower yields the same `Update`s as the file follower, and they are
//! applied by the same code (`sync::file::apply` → `sync::apply`): revocation is final, never
//! backwards, corrupt or forged records reported and skipped.
//!
//! Fail static: while Redis is down the gateway keeps its last table (`max_staleness` and
//! `on_stale` decide readiness) and, when Redis is back with the same log, resumes from its
//! revision without a reload.

use crate::audit::Event;
use crate::gateway::Gateway;
use crate::redis::Settings;
use crate::store::redis::Follower;
use crate::store::seal::Signer;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn(gw: Arc<Gateway>, settings: Settings) {
    tokio::spawn(run(gw, settings));
}

async fn run(gw: Arc<Gateway>, settings: Settings) {
    let signer = Signer::new(&gw.snapshot().keys.hasher);
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
                    crate::sync::file::apply(&gw, update);
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
