//! The sender: one task per node that sends (see `webhooks`), on its own thread so queue
//! fsyncs never stall request workers. Every 200 ms it reads new audit lines into the queue,
//! every second it looks for keys crossing a `key.expiring` lead time, every 30 s for stale
//! keys, and it starts due attempts, at most `max_in_flight` at once to each receiver;
//! attempt results come back to it, so the queue has one writer.
//!
//! The audit cursor moves in the same fsynced write as the deliveries derived from the lines
//! before it; delivery ids are derived from the event (`delivery_id`), so a crash between
//! reading and recording re-derives the same ids and the queue drops the duplicates.

use super::queue::{Pending, Queue};
use super::send::{attempt, backoff, random_u32};
use super::{delivery_id, now_secs, Delivery, Endpoint, EVENTS};
use crate::audit::{AuditLog, Event};
use crate::keys::record::{KeyRecord, KeyState};
use crate::metrics::{counter_vec, gauge, reg};
use crate::store::file::complete_prefix;
use crate::usage::Used;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Registry};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const TICK: Duration = Duration::from_millis(200);
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
const STALE_EVERY: Duration = Duration::from_secs(30);
/// Most audit bytes read per tick (the rest next tick).
const READ_CHUNK: u64 = 1 << 20;
/// How long an audit event may wait for its record to reach this node's table (writers audit
/// before they write the store) before it is sent with what the audit line says.
const SETTLE_WAIT_SECS: i64 = 10;
/// How long a fleet-wide mark lives in Redis (marks name the expiry or last use, so a later
/// episode has a different mark).
const MARK_TTL_SECS: i64 = 400 * 86_400;
const ATTEMPT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Audit events that become webhook events of the same name.
const FROM_AUDIT: [&str; 5] = [
    "key.created",
    "key.revoked",
    "key.rotation_completed",
    "key.canary_used",
    "key.quota_exceeded",
];

/// The sender's series; labels are closed (`event` from `EVENTS`, `outcome` fixed).
#[derive(Clone)]
pub struct WebhookMetrics {
    pub deliveries: IntCounterVec,
    pub attempt_seconds: Histogram,
    pub queue_depth: IntGauge,
}

impl WebhookMetrics {
    pub fn register(r: &Registry) -> WebhookMetrics {
        let m = WebhookMetrics {
            deliveries: counter_vec(r, "keygate_webhook_deliveries_total", "Webhook delivery attempts by event and outcome (delivered, retried, failed: retry budget spent).", &["event", "outcome"]),
            attempt_seconds: reg(r, Histogram::with_opts(HistogramOpts::new("keygate_webhook_attempt_duration_seconds", "Webhook delivery attempt latency, connect to response.").buckets(ATTEMPT_BUCKETS.to_vec())).unwrap_or_else(|_| std::process::abort())),
            queue_depth: gauge(r, "keygate_webhook_queue_depth", "Webhook deliveries queued and not yet settled."),
        };
        for e in EVENTS {
            for o in ["delivered", "retried", "failed"] {
                m.deliveries.with_label_values(&[e, o]);
            }
        }
        m
    }
}

/// Every key record, handed to a callback one at a time (`governance::EachRecord`): a pass
/// keeps only the few records it acts on, never the whole table at once (a million keys
/// rebuilt as full records would be a memory spike on every pass).
pub type Records = crate::governance::EachRecord;
pub type UsageFn = Arc<dyn Fn() -> Option<BTreeMap<String, Used>> + Send + Sync>;

/// What the sender reads from the node it runs on.
pub struct Host {
    /// The key table as this node holds it.
    pub records: Records,
    /// Fleet-wide (or node) usage, for staleness.
    pub usage: UsageFn,
    pub audit: AuditLog,
    pub stale_after_secs: i64,
    /// Actor of the sender's own audit events (`gateway`, `control-plane`).
    pub actor: &'static str,
}

/// Where the queue of a node whose store is `store` lives.
pub fn queue_path(store: &Path) -> PathBuf {
    crate::store::file::sibling(store, ".webhooks")
}

/// Start the sender on its own thread. The queue is opened (and, on a first start, the
/// audit cursor set to the log's end) before this returns, so whatever is audited after
/// start-up is announced. Errors opening the queue (another process owns it) are logged and
/// the sender does not run: one sender per queue.
pub fn spawn(
    endpoints: Vec<Endpoint>,
    queue: PathBuf,
    host: Host,
    metrics: WebhookMetrics,
    fleet_marks: Option<crate::redis::Settings>,
) {
    if endpoints.is_empty() {
        return;
    }
    let mut q = match Queue::open(&queue, crate::clock::unix_ms()) {
        Ok(q) => q,
        Err(e) => return tracing::error!(error = %e, "webhook sender not started"),
    };
    if q.cursor().is_none() {
        // First start: history before the sender existed is not announced.
        let len = std::fs::metadata(host.audit.path()).map_or(0, |m| m.len());
        if let Err(e) = q.add(vec![], vec![], Some(len)) {
            return tracing::error!(error = %e, "webhook sender not started");
        }
    }
    tracing::info!(queue = %queue.display(), endpoints = endpoints.len(), pending = q.depth(), "webhook sender started");
    let spawned = std::thread::Builder::new()
        .name("keygate-webhooks".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the webhook sender"),
            };
            // Its own client: connections belong to the runtime that opens them.
            let fleet = fleet_marks.map(|settings| {
                crate::redis::Client::new(settings, crate::metrics::Metrics::new(0).redis_metrics())
            });
            let mut s = Sender {
                fleet,
                endpoints: endpoints.into_iter().map(Arc::new).collect(),
                queue: q,
                host,
                metrics,
                in_flight: BTreeSet::new(),
            };
            rt.block_on(s.run());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the webhook sender");
    }
}

struct Sender {
    /// Marks shared by the fleet's control planes (`claim`), when they share Redis.
    fleet: Option<Arc<crate::redis::Client>>,
    endpoints: Vec<Arc<Endpoint>>,
    queue: Queue,
    host: Host,
    metrics: WebhookMetrics,
    in_flight: BTreeSet<(String, String)>,
}

/// One finished attempt, reported back to the loop.
struct Done {
    pending: Pending,
    result: Result<u16, super::send::AttemptError>,
    elapsed: Duration,
}

impl Sender {
    async fn run(&mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        let (mut last_expiry, mut last_stale) = (None::<Instant>, None::<Instant>);
        // A steady tick, not a sleep after each wake-up: a stream of finished attempts must
        // not hold off the dispatch that refills the slots they free.
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = rx.recv() => {
                    self.settle(done);
                    continue;
                }
            }
            self.tail();
            if last_expiry.is_none_or(|t| t.elapsed() >= EXPIRY_EVERY) {
                last_expiry = Some(Instant::now());
                self.expiring().await;
            }
            if last_stale.is_none_or(|t| t.elapsed() >= STALE_EVERY) {
                last_stale = Some(Instant::now());
                self.stale().await;
            }
            self.dispatch(&tx);
            self.metrics.queue_depth.set(self.queue.depth() as i64);
        }
    }

    fn wanting(&self, event: &str) -> Vec<&Arc<Endpoint>> {
        self.endpoints.iter().filter(|e| e.wants(event)).collect()
    }

    fn enqueue(&mut self, deliveries: Vec<Delivery>, marks: Vec<String>, cursor: Option<u64>) {
        let now = crate::clock::unix_ms();
        let items = deliveries
            .into_iter()
            .flat_map(|d| {
                self.wanting(&d.kind)
                    .into_iter()
                    .map(|ep| Pending {
                        endpoint: ep.name.clone(),
                        delivery: d.clone(),
                        queued_ms: now,
                        attempts: 0,
                        next_ms: now,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Err(e) = self.queue.add(items, marks, cursor) {
            tracing::error!(queue = %self.queue.path().display(), error = %e, "cannot write the webhook queue; will retry");
        }
    }

    /// New audit lines since the cursor become deliveries.
    fn tail(&mut self) {
        let path = self.host.audit.path().to_owned();
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let Some(mut cursor) = self.queue.cursor() else {
            return self.enqueue(vec![], vec![], Some(len));
        };
        if len < cursor {
            tracing::warn!(path = %path.display(), "audit log shrank (rotated?); reading it from the start, settled deliveries are not repeated");
            cursor = 0;
        }
        if len == cursor {
            return;
        }
        let Ok(chunk) = read_from(&path, cursor, READ_CHUNK) else {
            return;
        };
        // Only the keys this chunk's events name are kept (one pass over the table).
        let named: BTreeSet<String> = complete_prefix(&chunk)
            .split(|b| *b == b'\n')
            .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
            .filter_map(|v| v.get("key_id")?.as_str().map(str::to_owned))
            .collect();
        let mut records: Vec<KeyRecord> = Vec::new();
        if !named.is_empty() {
            (self.host.records)(&mut |r| {
                if named.contains(&r.id) {
                    records.push(r.clone());
                }
            });
        }
        let by_id: BTreeMap<&str, &KeyRecord> =
            records.iter().map(|r| (r.id.as_str(), r)).collect();
        let now = crate::clock::unix_secs();
        let mut deliveries = Vec::new();
        let mut at = cursor;
        for raw in complete_prefix(&chunk).split_inclusive(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(raw);
            match from_audit(line.trim_end(), &by_id, now) {
                Derived::Skip => {}
                Derived::Wait => break,
                Derived::Send(d) => deliveries.push(d),
            }
            at += raw.len() as u64;
        }
        if at != cursor || !deliveries.is_empty() {
            self.enqueue(deliveries, vec![], Some(at));
        }
    }

    /// Keys that crossed a lead time: one `key.expiring` per key and lead time. When several
    /// lead times are crossed at once (a key created 3 days before its expiry), only the
    /// nearest fires and the longer ones are marked spent.
    async fn expiring(&mut self) {
        let eps = self.wanting("key.expiring");
        let leads: BTreeSet<i64> = eps
            .iter()
            .flat_map(|e| e.lead_times.iter().copied())
            .collect();
        if leads.is_empty() {
            return;
        }
        let now = now_secs();
        let mut deliveries = Vec::new();
        let mut marks = Vec::new();
        // The keys inside the longest lead time, collected first (the sends below await).
        let longest = leads.iter().next_back().copied().unwrap_or(0);
        let mut near: Vec<(KeyRecord, i64)> = Vec::new();
        (self.host.records)(&mut |r| {
            if let Some(exp) = r.expires_at.filter(|exp| {
                now >= exp - longest && now < *exp && r.state(now) == KeyState::Active
            }) {
                near.push((r.clone(), exp));
            }
        });
        for (r, exp) in near {
            let crossed: Vec<i64> = leads
                .iter()
                .copied()
                .filter(|l| now >= exp - l && now < exp)
                .collect();
            let Some(&nearest) = crossed.first() else {
                continue;
            };
            let mark = |l: i64| format!("expiring:{}:{exp}:{l}", r.id);
            if self.queue.marked(&mark(nearest)) {
                continue;
            }
            marks.extend(crossed.iter().map(|l| mark(*l)));
            if !self.claim(&mark(nearest)).await {
                continue;
            }
            let mut data = Map::new();
            data.insert(
                "lead".into(),
                humantime::format_duration(Duration::from_secs(nearest as u64))
                    .to_string()
                    .into(),
            );
            data.insert("lead_seconds".into(), nearest.into());
            data.insert("expires_at".into(), exp.into());
            deliveries.push(Delivery {
                id: delivery_id(&[
                    "key.expiring",
                    &r.id,
                    &exp.to_string(),
                    &nearest.to_string(),
                ]),
                kind: "key.expiring".into(),
                time: rfc3339(now),
                key: r.public_json(now),
                data,
            });
        }
        // Only endpoints that list this lead time receive it.
        let per_lead: Vec<Delivery> = deliveries;
        if per_lead.is_empty() && marks.is_empty() {
            return;
        }
        let now_ms = crate::clock::unix_ms();
        let items = per_lead
            .into_iter()
            .flat_map(|d| {
                let lead = d
                    .data
                    .get("lead_seconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                eps.iter()
                    .filter(|e| e.lead_times.contains(&lead))
                    .map(|ep| Pending {
                        endpoint: ep.name.clone(),
                        delivery: d.clone(),
                        queued_ms: now_ms,
                        attempts: 0,
                        next_ms: now_ms,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        if let Err(e) = self.queue.add(items, marks, None) {
            tracing::error!(error = %e, "cannot write the webhook queue");
        }
    }

    /// Active keys unused for `keys.stale_after`: one `key.stale` per key and last use.
    async fn stale(&mut self) {
        if self.wanting("key.stale").is_empty() {
            return;
        }
        let now = now_secs();
        // Off the async threads: it reads a file, or waits on Redis. Without it every key
        // would look unused: no check this time.
        let read = self.host.usage.clone();
        let Ok(Some(usage)) = tokio::task::spawn_blocking(move || read()).await else {
            return;
        };
        let mut deliveries = Vec::new();
        let mut marks = Vec::new();
        // The stale keys, collected first (the sends below await).
        let mut stale: Vec<(KeyRecord, i64, String)> = Vec::new();
        (self.host.records)(&mut |r| {
            if r.state(now) != KeyState::Active {
                return;
            }
            // Never used counts from creation, as `keys stale` does.
            let last = usage
                .get(&r.id)
                .map_or(r.created_at, |u| u.last_used.max(r.created_at));
            let mark = format!("stale:{}:{last}", r.id);
            if now - last >= self.host.stale_after_secs && !self.queue.marked(&mark) {
                stale.push((r.clone(), last, mark));
            }
        });
        for (r, last, mark) in stale {
            let claimed = self.claim(&mark).await;
            marks.push(mark);
            if !claimed {
                continue;
            }
            let mut data = Map::new();
            data.insert(
                "last_used".into(),
                usage.get(&r.id).map(|u| u.last_used).into(),
            );
            data.insert(
                "stale_after_seconds".into(),
                self.host.stale_after_secs.into(),
            );
            deliveries.push(Delivery {
                id: delivery_id(&["key.stale", &r.id, &last.to_string()]),
                kind: "key.stale".into(),
                time: rfc3339(now),
                key: r.public_json(now),
                data,
            });
        }
        if !marks.is_empty() {
            self.enqueue(deliveries, marks, None);
        }
    }

    /// Whether this node announces the event behind `mark`: always on its own; with fleet
    /// marks (control planes sharing Redis), only the one whose `SET NX` wins. Redis down:
    /// announce anyway (the derived id lets receivers drop a second copy) and say so.
    async fn claim(&self, mark: &str) -> bool {
        let Some(client) = &self.fleet else {
            return true;
        };
        let key = format!("{}whm:{mark}", client.prefix());
        let ttl = MARK_TTL_SECS.to_string();
        let args: [&[u8]; 6] = [b"SET", key.as_bytes(), b"1", b"NX", b"EX", ttl.as_bytes()];
        match client.call(&args).await {
            Ok(crate::redis::resp::Value::Simple(ok)) if ok == "OK" => true,
            Ok(crate::redis::resp::Value::Nil) => false,
            Ok(other) => {
                tracing::warn!(reply = ?other, "unexpected reply claiming a webhook mark; announcing");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim a webhook mark in redis; announcing without fleet-wide dedupe");
                true
            }
        }
    }

    /// Start due attempts not already running, oldest first, at most `max_in_flight` to each
    /// receiver at once: a mass revocation queues one delivery per key, and a receiver that
    /// takes connections and never answers would otherwise hold a socket for every one of
    /// them until its timeout. The rest stay due for a later tick.
    fn dispatch(&mut self, tx: &mpsc::UnboundedSender<Done>) {
        let now_ms = crate::clock::unix_ms();
        let mut running: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, endpoint) in &self.in_flight {
            *running.entry(endpoint.as_str()).or_default() += 1;
        }
        let (mut start, mut orphaned) = (Vec::new(), Vec::new());
        for p in self.queue.due(now_ms) {
            let Some(ep) = self.endpoints.iter().find(|e| e.name == p.endpoint) else {
                orphaned.push(p.clone());
                continue;
            };
            let busy = running.entry(ep.name.as_str()).or_default();
            if *busy >= ep.max_in_flight
                || self
                    .in_flight
                    .contains(&(p.delivery.id.clone(), p.endpoint.clone()))
            {
                continue;
            }
            *busy += 1;
            start.push((p.clone(), ep.clone()));
        }
        for p in orphaned {
            // The endpoint left the config: nothing to send it to.
            self.give_up(&p, "endpoint no longer configured");
        }
        for (p, ep) in start {
            self.in_flight
                .insert((p.delivery.id.clone(), p.endpoint.clone()));
            let tx = tx.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let body = bytes::Bytes::from(p.delivery.body());
                let result = attempt(
                    &ep,
                    &p.delivery.id,
                    &p.delivery.kind,
                    body,
                    crate::clock::unix_secs(),
                )
                .await;
                let _ = tx.send(Done {
                    pending: p,
                    result,
                    elapsed: started.elapsed(),
                });
            });
        }
    }

    fn settle(&mut self, done: Done) {
        let p = done.pending;
        self.in_flight
            .remove(&(p.delivery.id.clone(), p.endpoint.clone()));
        self.metrics
            .attempt_seconds
            .observe(done.elapsed.as_secs_f64());
        let attempts = p.attempts + 1;
        let now_ms = crate::clock::unix_ms();
        let event = |name: &'static str| {
            Event::new(name, self.host.actor)
                .with("delivery_id", p.delivery.id.as_str())
                .with("type", p.delivery.kind.as_str())
                .with("endpoint", p.endpoint.as_str())
                .with(
                    "key_id",
                    p.delivery.key.get("id").cloned().unwrap_or(Value::Null),
                )
                .with("attempt", attempts)
        };
        match done.result {
            Ok(status) => {
                if let Err(e) = self
                    .queue
                    .settle(&p.delivery.id, &p.endpoint, "delivered", now_ms)
                {
                    tracing::error!(queue = %self.queue.path().display(), delivery_id = %p.delivery.id, error = %e, "cannot write a delivered webhook to the queue file; it is settled in memory and not sent again unless keygate restarts before the file can be written");
                }
                self.count(&p.delivery.kind, "delivered");
                tracing::info!(delivery_id = %p.delivery.id, event = %p.delivery.kind, endpoint = %p.endpoint, attempt = attempts, status, "webhook delivered");
                self.audit(event("webhook.delivered").with("status", status));
            }
            Err(err) => {
                let Some(ep) = self
                    .endpoints
                    .iter()
                    .find(|e| e.name == p.endpoint)
                    .cloned()
                else {
                    return self.give_up(&p, "endpoint no longer configured");
                };
                let wait = backoff(ep.retry_base, attempts, random_u32());
                let next_ms = now_ms + wait.as_millis() as i64;
                let budget_end = p.queued_ms + ep.retry_for.as_millis() as i64;
                tracing::warn!(delivery_id = %p.delivery.id, event = %p.delivery.kind, endpoint = %p.endpoint, attempt = attempts, error = %err, "webhook attempt failed");
                if next_ms > budget_end {
                    self.audit(event("webhook.attempt_failed").with("error", err.to_string()));
                    return self.give_up(&Pending { attempts, ..p }, &err.to_string());
                }
                if let Err(e) = self
                    .queue
                    .retry_at(&p.delivery.id, &p.endpoint, attempts, next_ms)
                {
                    tracing::error!(queue = %self.queue.path().display(), delivery_id = %p.delivery.id, error = %e, "cannot write a webhook retry to the queue file; the retry keeps its backoff in memory");
                }
                self.count(&p.delivery.kind, "retried");
                self.audit(
                    event("webhook.attempt_failed")
                        .with("error", err.to_string())
                        .with("kind", err.kind())
                        .with("retry_in_ms", wait.as_millis() as u64),
                );
            }
        }
    }

    /// The retry budget is spent (or the endpoint is gone): settle as failed, loudly.
    fn give_up(&mut self, p: &Pending, why: &str) {
        if let Err(e) = self.queue.settle(
            &p.delivery.id,
            &p.endpoint,
            "failed",
            crate::clock::unix_ms(),
        ) {
            tracing::error!(queue = %self.queue.path().display(), delivery_id = %p.delivery.id, error = %e, "cannot write a failed webhook to the queue file; it is settled in memory and not sent again unless keygate restarts before the file can be written");
        }
        self.count(&p.delivery.kind, "failed");
        tracing::error!(delivery_id = %p.delivery.id, event = %p.delivery.kind, endpoint = %p.endpoint, attempts = p.attempts, reason = why, "webhook delivery given up");
        self.audit(
            Event::new("webhook.failed", self.host.actor)
                .with("delivery_id", p.delivery.id.as_str())
                .with("type", p.delivery.kind.as_str())
                .with("endpoint", p.endpoint.as_str())
                .with("attempts", p.attempts)
                .with("reason", why),
        );
    }

    fn count(&self, event: &str, outcome: &str) {
        if EVENTS.contains(&event) {
            self.metrics
                .deliveries
                .with_label_values(&[event, outcome])
                .inc();
        }
    }

    fn audit(&self, e: Event) {
        if let Err(err) = self.host.audit.append(&[e]) {
            tracing::error!(error = %err, "cannot write a webhook audit event");
        }
    }
}

enum Derived {
    /// Not an event receivers are told about (or unreadable): move on.
    Skip,
    /// The record has not reached this node's table yet: stop here, retry next tick.
    Wait,
    Send(Delivery),
}

/// The delivery an audit line announces, with the key's public record as the table has it.
fn from_audit(line: &str, by_id: &BTreeMap<&str, &KeyRecord>, now: i64) -> Derived {
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
        return Derived::Skip;
    };
    let Some(kind) = obj
        .get("event")
        .and_then(Value::as_str)
        .filter(|e| FROM_AUDIT.contains(e))
        .map(str::to_owned)
    else {
        return Derived::Skip;
    };
    let Some(key_id) = obj.get("key_id").and_then(Value::as_str).map(str::to_owned) else {
        return Derived::Skip;
    };
    let time = obj
        .get("timestamp")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let record = by_id.get(key_id.as_str()).copied();
    let settled = record.is_some_and(|r| match kind.as_str() {
        "key.revoked" | "key.rotation_completed" => r.revoked_at.is_some(),
        _ => true,
    });
    let age = humantime::parse_rfc3339(&time)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(i64::MAX, |d| now - d.as_secs() as i64);
    if !settled && age < SETTLE_WAIT_SECS {
        return Derived::Wait;
    }
    let key = match record {
        Some(r) => r.public_json(now),
        // Gone from the table (or never reached it): what the audit line says.
        None => {
            serde_json::json!({"id": key_id, "owner": obj.get("owner"), "hint": obj.get("hint")})
        }
    };
    for f in ["timestamp", "event", "key_id", "owner", "hint"] {
        obj.remove(f);
    }
    // A relayed event keeps the id its gateway derived: relayed twice, delivered as one.
    let id = match obj.get("relay_id").and_then(Value::as_str) {
        Some(relay) => delivery_id(&["relay", relay]),
        None => delivery_id(&["audit", line]),
    };
    Derived::Send(Delivery {
        id,
        kind,
        time,
        key,
        data: obj,
    })
}

fn read_from(path: &Path, offset: u64, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;

    #[test]
    fn audit_lines_become_deliveries_once_the_record_is_there() {
        let mut r = crate::keys::record::sample("key_a", Digest([1; 32]));
        let now = crate::clock::unix_secs();
        let line = serde_json::to_string(
            &Event::new("key.revoked", "me")
                .key(&r)
                .with("reason", "leaked"),
        )
        .unwrap();
        let by_id = BTreeMap::from([("key_a", &r)]);
        assert!(
            matches!(from_audit(&line, &by_id, now), Derived::Wait),
            "not revoked in the table yet"
        );
        r.revoked_at = Some(now);
        let by_id = BTreeMap::from([("key_a", &r)]);
        let Derived::Send(d) = from_audit(&line, &by_id, now) else {
            panic!("expected a delivery")
        };
        assert_eq!(d.kind, "key.revoked");
        assert_eq!(d.key["id"], "key_a");
        assert_eq!(d.key["state"], "revoked");
        assert!(d.key.get("digest").is_none() && d.key.get("mac").is_none());
        assert_eq!(d.data["reason"], "leaked");
        let Derived::Send(again) = from_audit(&line, &by_id, now) else {
            panic!()
        };
        assert_eq!(d.id, again.id, "ids are derived, not random");
        let other = serde_json::to_string(&Event::new("table.applied", "gw")).unwrap();
        assert!(matches!(from_audit(&other, &by_id, now), Derived::Skip));
    }

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::watch;

    /// A webhook receiver on 127.0.0.1:0. It answers each POST with `status(delivery id)`,
    /// or, while held, keeps every request open unanswered (a receiver that accepts and never
    /// answers); it records when each delivery id arrived and how many connections it took.
    #[derive(Clone)]
    struct Receiver {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<(String, Instant)>>>,
        accepted: Arc<AtomicUsize>,
        released: Arc<watch::Sender<bool>>,
    }

    impl Receiver {
        async fn start(status: fn(&str) -> u16, held: bool) -> Receiver {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let r = Receiver {
                addr: l.local_addr().unwrap(),
                seen: Arc::default(),
                accepted: Arc::default(),
                released: Arc::new(watch::channel(!held).0),
            };
            let me = r.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    me.accepted.fetch_add(1, Ordering::SeqCst);
                    let (seen, released) = (me.seen.clone(), me.released.subscribe());
                    tokio::spawn(serve(s, status, seen, released));
                }
            });
            r
        }

        fn release(&self) {
            self.released.send_replace(true);
        }

        fn times(&self, id: &str) -> Vec<Instant> {
            let seen = self.seen.lock().unwrap();
            seen.iter()
                .filter(|(i, _)| i == id)
                .map(|(_, t)| *t)
                .collect()
        }

        fn ids(&self) -> Vec<String> {
            let seen = self.seen.lock().unwrap();
            seen.iter().map(|(i, _)| i.clone()).collect()
        }
    }

    async fn serve(
        mut s: tokio::net::TcpStream,
        status: fn(&str) -> u16,
        seen: Arc<Mutex<Vec<(String, Instant)>>>,
        mut released: watch::Receiver<bool>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        };
        let len: usize = field("content-length").map_or(0, |v| v.parse().unwrap());
        while buf.len() < head_end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let id = field("keygate-delivery").unwrap_or_default();
        seen.lock().unwrap().push((id.clone(), Instant::now()));
        if released.wait_for(|r| *r).await.is_err() {
            return;
        }
        let answer = format!(
            "HTTP/1.1 {} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            status(&id)
        );
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.shutdown().await;
    }

    fn endpoint(rx: &Receiver, max_in_flight: usize) -> Endpoint {
        let url = format!("http://{}/hooks", rx.addr);
        Endpoint {
            url: url.parse().unwrap(),
            name: url,
            events: BTreeSet::from(["key.revoked".to_owned()]),
            secret: super::super::Secret::new(vec![7; 32]),
            lead_times: vec![],
            retry_for: Duration::from_secs(3600),
            retry_base: Duration::from_millis(200),
            timeout: Duration::from_secs(30),
            max_in_flight,
            tls: None,
        }
    }

    fn pending(ep: &Endpoint, id: &str, next_ms: i64) -> Pending {
        Pending {
            endpoint: ep.name.clone(),
            delivery: Delivery {
                id: id.to_owned(),
                kind: "key.revoked".into(),
                time: "2026-01-01T00:00:00Z".into(),
                key: serde_json::json!({"id": "key_a"}),
                data: Map::new(),
            },
            queued_ms: next_ms,
            attempts: 0,
            next_ms,
        }
    }

    /// The sender as `spawn` makes it, over `queue`, on the test's runtime.
    fn start(dir: &Path, queue: Queue, endpoints: Vec<Endpoint>) -> tokio::task::JoinHandle<()> {
        let mut s = Sender {
            fleet: None,
            endpoints: endpoints.into_iter().map(Arc::new).collect(),
            queue,
            host: Host {
                records: Arc::new(|_: &mut dyn FnMut(&KeyRecord)| {}),
                usage: Arc::new(|| None),
                audit: AuditLog::new(dir.join("audit.jsonl")),
                stale_after_secs: 90 * 86_400,
                actor: "test",
            },
            metrics: WebhookMetrics::register(&Registry::new()),
            in_flight: BTreeSet::new(),
        };
        tokio::spawn(async move { s.run().await })
    }

    /// Polls `f` until it gives a value, failing after 30 s.
    async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The queue file cannot be written (disk full, read-only, I/O error): a delivery its
    /// receiver accepted is not sent again, and a refused one is retried on its backoff, not
    /// on every 200 ms tick.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_that_cannot_be_written_keeps_each_delivery_on_its_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start(|id| if id == "whd_accepted" { 200 } else { 500 }, false).await;
        let ep = endpoint(&rx, 32);
        let path = dir.path().join("keys.jsonl.webhooks");
        let mut q = Queue::open(&path, crate::clock::unix_ms()).unwrap();
        let now = crate::clock::unix_ms();
        let items = vec![
            pending(&ep, "whd_accepted", now),
            pending(&ep, "whd_refused", now),
        ];
        q.add(items, vec![], Some(0)).unwrap();
        // From here every append fails, and so would a rewrite of the whole file (a
        // directory stands where the file was).
        q.refuse_appends().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let base = ep.retry_base;
        let task = start(dir.path(), q, vec![ep]);

        let tries = eventually("five attempts of the refused delivery", || {
            let t = rx.times("whd_refused");
            (t.len() >= 5).then_some(t)
        })
        .await;
        task.abort();
        assert_eq!(
            rx.times("whd_accepted").len(),
            1,
            "a delivery its receiver accepted was sent again"
        );
        for (k, pair) in tries.windows(2).enumerate() {
            let attempts = k as u32 + 1;
            let least = backoff(base, attempts, 0);
            let gap = pair[1] - pair[0];
            assert!(
                gap + Duration::from_millis(5) >= least,
                "attempt {} came {gap:?} after attempt {attempts}, before its backoff (at least {least:?})",
                attempts + 1
            );
        }
    }

    /// Forty deliveries due at once to a receiver that takes connections and never answers:
    /// at most `max_in_flight` attempts are open to it, another receiver is still served, and
    /// once the first answers the rest go out, each once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_to_one_receiver_are_capped_however_many_are_due() {
        let dir = tempfile::tempdir().unwrap();
        let silent = Receiver::start(|_| 200, true).await;
        let other = Receiver::start(|_| 200, false).await;
        let capped = endpoint(&silent, 3);
        let free = endpoint(&other, 32);
        let path = dir.path().join("keys.jsonl.webhooks");
        let mut q = Queue::open(&path, crate::clock::unix_ms()).unwrap();
        let now = crate::clock::unix_ms();
        let mut items: Vec<Pending> = (0..40)
            .map(|i| pending(&capped, &format!("whd_{i:02}"), now))
            .collect();
        // Due two ticks after the others: once it has arrived, the sender has dispatched
        // after every delivery to the silent receiver was due.
        items.push(pending(&free, "whd_later", now + 400));
        q.add(items, vec![], Some(0)).unwrap();
        let task = start(dir.path(), q, vec![capped, free]);

        eventually("the later delivery to the other receiver", || {
            (!other.times("whd_later").is_empty()).then_some(())
        })
        .await;
        eventually("three connections to the silent receiver", || {
            (silent.accepted.load(Ordering::SeqCst) >= 3).then_some(())
        })
        .await;
        assert_eq!(
            silent.accepted.load(Ordering::SeqCst),
            3,
            "connections open at once to a receiver that never answers"
        );
        silent.release();
        let mut ids = eventually("all forty delivered", || {
            let ids = silent.ids();
            (ids.len() >= 40).then_some(ids)
        })
        .await;
        task.abort();
        ids.sort();
        let want: Vec<String> = (0..40).map(|i| format!("whd_{i:02}")).collect();
        assert_eq!(ids, want, "each sent once");
    }
}
