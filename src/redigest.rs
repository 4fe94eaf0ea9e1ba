//! Hash-secret migration in traffic: a key that authenticates under an old secret version is
//! re-digested under the current one and written back, once, through a narrow path.
//!
//! On the request path (`offer`): one HMAC under the current secret, and the job (key id,
//! versions, the digest it matched, the new digest; never the plaintext) goes into a bounded
//! queue with `try_send`, deduplicated per key id. A request never waits on it: a full queue
//! or a full dedup map drops the job (counted) and the key is offered again the next time it
//! is seen. One worker drains the queue in batches:
//!
//! - **store** (`keygate serve` on a file or Redis store): `Keys::redigest` under the store's
//!   lock, one transaction per batch, audited as `key.redigested` (actor `gateway`);
//! - **control** (a gateway on the feed, or `keys.redigest_url`): `POST
//!   /v1/api-keys/{id}/redigest` with a `redigest`-role token that can do nothing else, and a
//!   proof keyed with the current secret (`keys::redigest::proof`).
//!
//! Either way the change is a normal record version: it reaches every gateway through the
//! store or the feed and the one apply rule (`sync::apply`), so a key authenticates under its
//! old digest until the new version is applied, and under the new one after; the old digest
//! leaves the table with that version.
//!
//! What a compromised gateway (with a `redigest` token) can do with this: replace the digest
//! of a live, non-canary key that is still on an old version, once, with a digest no key holds,
//! visibly (`key.redigested` names the token, the key's real holder starts getting 401). If it
//! picks the digest of a plaintext of its own, that plaintext authenticates as the key on
//! other gateways. That is no more than it can already do: it holds every hash secret, sees
//! every plaintext key sent through it, and writes the identity headers its upstreams trust
//! (`x-keygate-key-id`, scopes) for any key it likes. It cannot touch another field (the
//! endpoint writes digest and version only), un-revoke (revoked keys are refused, and the store
//! refuses an un-revoke), move a key to an old or unknown version, take a digest another key
//! holds (that would let one key's plaintext authenticate as another), or replay a request
//! once the stored digest changed (the proof covers it). A stolen `redigest` token without the
//! secret can do nothing: every request needs a proof keyed with the current secret.

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::keys::compact::KeyView;
use crate::keys::digest::Hasher;
use crate::keys::ops::Keys;
use crate::keys::record::KeyRecord;
use crate::keys::redigest::{Evidence, Redigest, Refused};
use crate::snapshot::FeedSource;
use dashmap::DashMap;
use http_body_util::BodyExt;
use prometheus::IntCounterVec;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Jobs waiting for the worker; beyond it, jobs are dropped (the key is offered again later).
pub const QUEUE: usize = 1024;
/// Key ids tracked for deduplication (queued, or handled recently).
pub const MAX_TRACKED: usize = 65_536;
/// Jobs written in one store transaction.
const BATCH: usize = 256;
/// A key whose write failed (store or control plane unreachable) is offered again after this.
const RETRY_SECS: i64 = 30;
/// A handled key is not offered again for this long, unless the table shows it re-digested
/// first (then it is never offered again: it is on the current version).
const SETTLED_SECS: i64 = 600;
/// How often the worker forgets settled keys when idle.
const SWEEP: Duration = Duration::from_secs(5);
/// Bound on one request to the control plane.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where re-digests go; built with the snapshot (a reload may change it).
#[derive(Clone)]
pub enum Target {
    /// Not re-digesting, and why (for the startup log).
    Off(String),
    /// Through the store (`Keys::redigest`).
    Store,
    /// To a control plane: `base` is `scheme://authority`.
    Control {
        base: String,
        token: String,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        match self {
            Target::Off(why) => write!(f, "Off({why})"),
            Target::Store => f.write_str("Store"),
            Target::Control { base, .. } => write!(f, "Control({base})"),
        }
    }
}

impl Target {
    /// `keys.redigest`, `keys.redigest_url`, `keys.redigest_token_env`: off; to the control
    /// plane named (or the feed's, in feed mode) with the token; else through the store.
    /// A missing token is an error when `redigest_url` asks for a control plane, and turns
    /// re-digesting off (said at startup) for the feed's default.
    pub fn from_config(c: &Config, feed: Option<&FeedSource>) -> Result<Target, ConfigError> {
        let k = &c.keys;
        if !k.redigest {
            return Ok(Target::Off("keys.redigest = false".into()));
        }
        let (url, explicit) = match (&k.redigest_url, feed) {
            (Some(u), _) => (u.clone(), true),
            (None, Some(f)) => (f.url.clone(), false),
            (None, None) => return Ok(Target::Store),
        };
        let field = if explicit {
            "keys.redigest_url"
        } else {
            "keys.feed_url"
        };
        let uri: http::Uri = url.parse().map_err(|_| c.invalid(field, "not a URL"))?;
        let scheme = uri.scheme_str().unwrap_or_default();
        let authority = uri
            .authority()
            .filter(|_| matches!(scheme, "http" | "https"))
            .ok_or_else(|| c.invalid(field, "use http(s)://host:port"))?;
        let tls = match (scheme, feed.and_then(|f| f.tls.clone()), &k.feed_ca) {
            ("https", Some(tls), _) => Some(tls),
            ("https", None, Some(ca)) => Some(
                crate::tls::client_config(&c.resolve(ca))
                    .map_err(|e| c.invalid("keys.feed_ca", e.to_string()))?,
            ),
            ("https", None, None) => {
                return Err(c.invalid(
                    "keys.feed_ca",
                    "required for an https:// redigest_url: the CA that signs the control plane's certificate",
                ))
            }
            _ => None,
        };
        let token = std::env::var(&k.redigest_token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            let why = format!(
                "{} is not set (mint one with `keygate admin-token create --role redigest`)",
                k.redigest_token_env
            );
            return if explicit {
                Err(ConfigError::Secret(format!(
                    "{why}: keys.redigest_url sends re-digests to a control plane"
                )))
            } else {
                Ok(Target::Off(why))
            };
        };
        Ok(Target::Control {
            base: format!("{scheme}://{authority}"),
            token,
            tls,
        })
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, Target::Off(_))
    }
}

/// What became of one offered re-digest: the label of `keygate_keys_redigested_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The new digest is stored.
    Written,
    /// Nothing to write: the key is already on the current version (another node did it).
    Current,
    /// The store or control plane refused (revoked, unknown, versions or proof do not match).
    Refused,
    /// Not queued: the queue or the dedup map was full.
    Dropped,
    /// The store or control plane could not be reached; offered again after a pause.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Written,
        Outcome::Current,
        Outcome::Refused,
        Outcome::Dropped,
        Outcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Current => "current",
            Outcome::Refused => "refused",
            Outcome::Dropped => "dropped",
            Outcome::Failed => "failed",
        }
    }

    fn of(verdict: &Result<KeyRecord, Refused>) -> Outcome {
        match verdict {
            Ok(_) => Outcome::Written,
            Err(Refused::AlreadyCurrent { .. }) => Outcome::Current,
            Err(_) => Outcome::Refused,
        }
    }
}

/// The queue and the dedup map, owned by the gateway.
pub struct Redigests {
    tx: mpsc::Sender<Redigest>,
    rx: Mutex<Option<mpsc::Receiver<Redigest>>>,
    /// Key id → until when it is not offered again (Unix seconds; `i64::MAX` while queued).
    tracked: DashMap<String, i64>,
    outcomes: IntCounterVec,
}

impl std::fmt::Debug for Redigests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redigests")
            .field("tracked", &self.tracked.len())
            .finish()
    }
}

impl Redigests {
    pub fn new(outcomes: IntCounterVec) -> Redigests {
        let (tx, rx) = mpsc::channel(QUEUE);
        Redigests {
            tx,
            rx: Mutex::new(Some(rx)),
            tracked: DashMap::new(),
            outcomes,
        }
    }

    fn count(&self, o: Outcome) {
        self.outcomes.with_label_values(&[o.as_str()]).inc();
    }

    /// On the request path, after `key` authenticated with `presented`: if its digest is
    /// under an old secret version, queue its digest under the current one. Never blocks;
    /// the plaintext stays here.
    pub fn offer(&self, key: &KeyView, presented: &str, hasher: &Hasher, now: i64) {
        if key.secret_version == hasher.current_version() {
            return;
        }
        if self.tracked.get(&*key.id).is_some_and(|until| *until > now) {
            return;
        }
        if self.tracked.len() >= MAX_TRACKED && !self.tracked.contains_key(&*key.id) {
            self.count(Outcome::Dropped);
            return;
        }
        // Claim the id first, so two requests with one key queue one job.
        let mut claimed = false;
        self.tracked
            .entry(key.id.to_string())
            .and_modify(|until| {
                if *until <= now {
                    *until = i64::MAX;
                    claimed = true;
                }
            })
            .or_insert_with(|| {
                claimed = true;
                i64::MAX
            });
        if !claimed {
            return;
        }
        let (to_version, new) = hasher.digest(presented);
        // The table keeps no digest in a view: the stored one is the presented key's digest
        // under the key's own version (it just matched). One more HMAC, once per key.
        let Some((_, old)) = hasher
            .all_digests(presented)
            .find(|(v, _)| *v == key.secret_version)
        else {
            self.tracked.remove(&*key.id);
            return;
        };
        let job = Redigest {
            id: key.id.to_string(),
            from_version: key.secret_version,
            to_version,
            new,
            evidence: Evidence::Matched(old),
        };
        if self.tx.try_send(job).is_err() {
            self.tracked.remove(&*key.id);
            self.count(Outcome::Dropped);
        }
    }

    /// Record what became of a job and when its key may be offered again.
    fn settle(&self, id: &str, outcome: Outcome, now: i64) {
        self.count(outcome);
        let pause = match outcome {
            Outcome::Failed => RETRY_SECS,
            _ => SETTLED_SECS,
        };
        self.tracked.insert(id.to_owned(), now + pause);
    }

    /// Forget keys whose pause is over, and settled keys the table shows on the current
    /// version (they are never offered again), so the map holds what is in flight.
    fn sweep(&self, gw: &Gateway, now: i64) {
        let current = gw.snapshot().keys.hasher.current_version();
        let table = gw.table();
        self.tracked.retain(|id, until| {
            *until == i64::MAX
                || (*until > now
                    && table
                        .get_by_id(id)
                        .is_some_and(|r| r.secret_version != current))
        });
    }
}

/// The worker: drains the queue in batches and sends each to the snapshot's target.
pub async fn run(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let Some(mut rx) = gw.redigests.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    if let Target::Off(why) = &gw.snapshot().redigest {
        if gw.snapshot().keys.hasher.versions().len() > 1 {
            tracing::warn!(why = %why, "keys seen under an old hash-secret version are not re-digested: the old version stays in use until they are rotated");
        }
    }
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => if n == 0 { return },
            _ = tokio::time::sleep(SWEEP) => {}
            _ = stop.changed() => return,
        }
        if !batch.is_empty() {
            let target = gw.snapshot().redigest.clone();
            match target {
                Target::Off(_) => {
                    // Turned off by a reload after these were queued.
                    for job in &batch {
                        gw.redigests.tracked.remove(&job.id);
                    }
                }
                Target::Store => to_store(&gw, std::mem::take(&mut batch)).await,
                Target::Control { base, token, tls } => {
                    for job in &batch {
                        let outcome = to_control(&gw, job, &base, &token, tls.as_ref()).await;
                        gw.redigests
                            .settle(&job.id, outcome, crate::clock::unix_secs());
                    }
                }
            }
        }
        gw.redigests.sweep(&gw, crate::clock::unix_secs());
    }
}

/// One store transaction for the batch, off the async threads.
async fn to_store(gw: &Arc<Gateway>, batch: Vec<Redigest>) {
    let settings = gw.snapshot().keys.clone();
    let jobs = batch.clone();
    let done =
        tokio::task::spawn_blocking(move || Keys::new(&settings, "gateway").redigest(&jobs)).await;
    let now = crate::clock::unix_secs();
    match done {
        Ok(Ok(verdicts)) => {
            for (job, verdict) in batch.iter().zip(verdicts) {
                let outcome = Outcome::of(&verdict);
                report(job, outcome, verdict.err().as_ref());
                gw.redigests.settle(&job.id, outcome, now);
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, keys = batch.len(), "cannot write re-digested keys to the store; they are offered again when next seen");
            for job in &batch {
                gw.redigests.settle(&job.id, Outcome::Failed, now);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "re-digest task failed");
            for job in &batch {
                gw.redigests.settle(&job.id, Outcome::Failed, now);
            }
        }
    }
}

/// `POST {base}/v1/api-keys/{id}/redigest` with the proof; the answer's status and code give
/// the outcome.
async fn to_control(
    gw: &Gateway,
    job: &Redigest,
    base: &str,
    token: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Outcome {
    let Evidence::Matched(old) = job.evidence else {
        return Outcome::Refused;
    };
    let Some(proof) = crate::keys::redigest::proof(
        &gw.snapshot().keys.hasher,
        &job.id,
        job.from_version,
        job.to_version,
        &old,
        &job.new,
    ) else {
        return Outcome::Refused;
    };
    let body = serde_json::json!({
        "from_version": job.from_version,
        "to_version": job.to_version,
        "digest": job.new.to_hex(),
        "proof": crate::keys::digest::Digest(proof).to_hex(),
    });
    let Ok(url) = format!("{base}/v1/api-keys/{}/redigest", job.id).parse::<http::Uri>() else {
        return Outcome::Refused;
    };
    let sent = async {
        let resp = crate::sync::feed::request(
            &url,
            token,
            tls,
            http::Method::POST,
            body.to_string().into(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        Ok::<_, String>((status, code))
    };
    let outcome = match tokio::time::timeout(CONTROL_TIMEOUT, sent).await {
        Ok(Ok((status, _))) if status.is_success() => Outcome::Written,
        Ok(Ok((_, code))) if code == "already_current" => Outcome::Current,
        Ok(Ok((status, code))) if status.is_client_error() => {
            tracing::warn!(key_id = %job.id, status = status.as_u16(), code = %code, "the control plane refused a re-digest");
            return Outcome::Refused;
        }
        Ok(Ok((status, code))) => {
            tracing::warn!(key_id = %job.id, status = status.as_u16(), code = %code, "the control plane could not take a re-digest; offered again when next seen");
            return Outcome::Failed;
        }
        Ok(Err(e)) => {
            tracing::warn!(key_id = %job.id, error = %e, "cannot reach the control plane for a re-digest; offered again when next seen");
            return Outcome::Failed;
        }
        Err(_) => {
            tracing::warn!(key_id = %job.id, "re-digest request timed out; offered again when next seen");
            return Outcome::Failed;
        }
    };
    report(job, outcome, None);
    outcome
}

fn report(job: &Redigest, outcome: Outcome, refused: Option<&Refused>) {
    match outcome {
        Outcome::Written => {
            tracing::info!(key_id = %job.id, from_version = job.from_version, to_version = job.to_version, "key re-digested under the current hash-secret version")
        }
        Outcome::Refused => {
            tracing::warn!(key_id = %job.id, error = ?refused.map(ToString::to_string), "re-digest refused")
        }
        _ => tracing::debug!(key_id = %job.id, outcome = outcome.as_str(), "re-digest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["outcome"]).unwrap()
    }

    #[test]
    fn offers_are_deduplicated_bounded_and_only_for_old_versions() {
        let old = Hasher::new(vec![(1, vec![1; 32])]);
        let h = Hasher::new(vec![(1, vec![1; 32]), (2, vec![2; 32])]);
        let r = Redigests::new(counter());
        let key = "kg_live_example";
        let mut rec = crate::keys::record::sample("key_a", old.digest(key).1);
        rec.secret_version = 1;
        let view = crate::keys::compact::KeyView::of(&rec);
        r.offer(&view, key, &h, 100);
        r.offer(&view, key, &h, 100);
        let mut rx = r.rx.lock().unwrap().take().unwrap();
        let job = rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err(), "one job per key");
        assert_eq!((job.from_version, job.to_version), (1, 2));
        assert_eq!(job.new, h.digest(key).1);
        assert_eq!(job.evidence, Evidence::Matched(rec.digest));
        // Settled: not offered again until the pause is over.
        r.settle("key_a", Outcome::Failed, 100);
        r.offer(&view, key, &h, 100 + RETRY_SECS - 1);
        assert!(rx.try_recv().is_err());
        r.offer(&view, key, &h, 100 + RETRY_SECS);
        assert!(
            rx.try_recv().is_ok(),
            "offered again after a failure's pause"
        );
        // A key on the current version is never offered.
        let mut cur = crate::keys::record::sample("key_b", h.digest("kg_live_other").1);
        cur.secret_version = 2;
        r.offer(&KeyView::of(&cur), "kg_live_other", &h, 100);
        assert!(rx.try_recv().is_err());
        // A full queue drops and forgets the id (offered again next time).
        for i in 0..QUEUE + 1 {
            let mut k = rec.clone();
            k.id = format!("key_{i}");
            r.offer(&KeyView::of(&k), key, &h, 100);
        }
        assert_eq!(r.outcomes.with_label_values(&["dropped"]).get(), 1);
        assert_eq!(
            r.tracked.len(),
            QUEUE + 1,
            "key_a settled and every queued id"
        );
    }
}
