//! The state one running gateway owns and every request reads: the config snapshot and key
//! table (each swapped whole through `ArcSwap`), rate-limit buckets and the failed-auth budget
//! (kept across reloads), metrics, the audit sink, and the sync status behind `/readyz`.

use crate::audit::{AuditLog, Event};
use crate::clock::unix_ms;
use crate::keys::compact::Validity as _;
use crate::keys::gauges::{KeyGauges, Rules};
use crate::keys::record::KeyRecord;
use crate::keys::table::KeyTable;
use crate::limit::{AuthFailures, Limiter};
use crate::metrics::Metrics;
use crate::snapshot::{OnStale, Snapshot};
use crate::usage::Usage;
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    table: ArcSwap<KeyTable>,
    /// The key gauges' counts, changed with the table under this lock (`counting`,
    /// `install_table`, `touch`), read by a scrape.
    key_gauges: std::sync::Mutex<KeyGauges>,
    loaded: AtomicBool,
    /// Set on SIGTERM: `/readyz` fails while requests are still served (lame duck).
    stopping: AtomicBool,
    last_sync_ms: AtomicI64,
    /// Rate limits and quotas: node-local buckets and, with `[redis]`, fleet-wide leases.
    pub limiter: Limiter,
    pub failures: AuthFailures,
    pub metrics: Arc<Metrics>,
    pub usage: Usage,
    /// Leak forensics sketches (bounded; see `forensics`).
    pub forensics: crate::forensics::Forensics,
    /// Keys seen under an old secret version, queued for re-digesting (`redigest`).
    pub redigests: crate::redigest::Redigests,
    audit: SyncSender<Event>,
    in_flight: AtomicUsize,
    request_seq: AtomicU64,
    boot_id: u32,
    /// New W3C trace and span ids (no syscall per request).
    pub trace_ids: crate::trace::IdSource,
    /// Public keys of short-lived tokens (built once, from the first config, like Redis).
    pub tokens: Arc<crate::tokens::verifier::Verifier>,
    /// Signing keys when this gateway mints tokens (`[tokens] issue = true`), from the first
    /// config like `tokens`.
    pub broker: Option<Arc<crate::tokens::broker::Broker>>,
    /// Access-log file and span export (built once, at start).
    pub sinks: Arc<crate::access::Sinks>,
    /// Refused attempts per known key id since the last `auth.denied` summary (bounded).
    denied_keys: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Per key lineage, until when its `key.quota_exceeded` has been announced (the quota
    /// window's end): one event per key and window, not one per refused request.
    quota_alarms: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// Most key ids one `auth.denied` summary names; beyond it attempts still count by reason.
pub const MAX_DENIED_KEYS: usize = 1000;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("revision", &self.table().revision())
            .finish()
    }
}

/// The key gauges' lock held through an incremental apply (`Gateway::counting`).
pub struct Counting<'a> {
    gauges: std::sync::MutexGuard<'a, KeyGauges>,
    gw: &'a Gateway,
}

impl crate::sync::apply::Observer for Counting<'_> {
    fn changed(&mut self, old: Option<&KeyRecord>, new: Option<&KeyRecord>) {
        let gw = self.gw;
        self.gauges.replace(
            old.map(|r| (r, gw.last_use(r))),
            new.map(|r| (r, gw.last_use(r))),
        );
    }
}

/// Decrements the in-flight count when a request ends, however it ends.
pub struct InFlight<'a>(&'a Gateway);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.dec();
    }
}

/// This gateway's section in the forensics file: the fleet node name when it reports to a
/// control plane, else the host name (gateways sharing a usage directory run on different
/// hosts or pods).
fn node_name(s: &Snapshot) -> String {
    if let Some(f) = &s.feed {
        return f.node.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match host.trim() {
        "" => "local".to_owned(),
        h => h.to_owned(),
    }
}

impl Gateway {
    pub fn new(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        sinks: crate::access::Sinks,
    ) -> Arc<Gateway> {
        let limits = &snapshot.config.limits;
        let failures = AuthFailures::from_config(limits);
        let audit = spawn_audit_writer(AuditLog::new(&snapshot.keys.audit_log), metrics.clone());
        let usage = Usage::new(snapshot.keys.usage_file.clone());
        let forensics =
            crate::forensics::Forensics::new(&snapshot.keys.usage_file, &node_name(&snapshot));
        // The Redis client is built once, from the first config: a reload may switch
        // `limits.backend`, but changing `[redis]` itself needs a restart.
        let fleet = snapshot.redis.clone().map(|settings| {
            metrics.register_redis();
            let client = crate::redis::Client::new(settings, metrics.redis_metrics());
            crate::redis::lease::Fleet::new(
                client,
                crate::redis::lease::LeaseTuning::from_config(limits),
            )
        });
        let limiter = Limiter::new(fleet, metrics.limiter_fallback.clone());
        let redigests = crate::redigest::Redigests::new(metrics.keys_redigested.clone());
        let mut boot = [0u8; 4];
        let _ = getrandom::fill(&mut boot);
        let tokens = Arc::new(crate::tokens::verifier::Verifier::new(
            snapshot.tokens.jwks.clone(),
        ));
        let broker = snapshot
            .tokens
            .issue
            .then(|| Arc::new(crate::tokens::broker::Broker::new(snapshot.tokens.clone())));
        let rules = Rules::new(&snapshot.keys.policy, snapshot.keys.stale_after_secs);
        Arc::new(Gateway {
            tokens,
            broker,
            key_gauges: std::sync::Mutex::new(KeyGauges::new(rules, crate::clock::unix_secs())),
            snapshot: ArcSwap::from_pointee(snapshot),
            table: ArcSwap::from_pointee(KeyTable::new()),
            loaded: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            last_sync_ms: AtomicI64::new(0),
            limiter,
            failures,
            metrics,
            usage,
            forensics,
            redigests,
            audit,
            in_flight: AtomicUsize::new(0),
            request_seq: AtomicU64::new(0),
            boot_id: u32::from_le_bytes(boot),
            trace_ids: crate::trace::IdSource::new().sampling_new_traces(sinks.records_spans()),
            sinks: Arc::new(sinks),
            denied_keys: Default::default(),
            quota_alarms: Default::default(),
        })
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn swap_snapshot(&self, s: Snapshot) {
        self.snapshot.store(Arc::new(s));
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<KeyTable>> {
        self.table.load()
    }

    /// Install a whole new table (first load, compaction, feed snapshot).
    pub fn replace_table(&self, table: KeyTable) {
        self.install_table(table, true);
    }

    /// Install a table; `synced` is false for a local copy of unknown age. The key gauges
    /// are counted afresh with it (one pass, as the load itself), under their lock.
    pub fn install_table(&self, table: KeyTable, synced: bool) {
        let mut gauges = self.gauges();
        *gauges = self.count_all(&table, self.gauge_rules());
        self.table.store(Arc::new(table));
        drop(gauges);
        self.loaded.store(true, Ordering::Release);
        if synced {
            self.mark_synced();
        }
    }

    fn gauges(&self) -> std::sync::MutexGuard<'_, KeyGauges> {
        // The counts stay consistent across a panic elsewhere (every change is one call).
        self.key_gauges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the key gauges depend on in the running config.
    fn gauge_rules(&self) -> Rules {
        let snap = self.snapshot();
        Rules::new(&snap.keys.policy, snap.keys.stale_after_secs)
    }

    /// When `r` was last used on this node's view, or created.
    fn last_use(&self, r: &KeyRecord) -> i64 {
        self.usage
            .last_used(&r.id)
            .map_or(r.created_at, |u| u.max(r.created_at))
    }

    fn count_all(&self, table: &KeyTable, rules: Rules) -> KeyGauges {
        // Keys that count alike are counted once, times their number (`gauges::Alike`): no
        // million rebuilt records, one hash per key.
        let mut gauges = KeyGauges::new(rules.clone(), crate::clock::unix_secs());
        table.each_group(
            |e, id| {
                let created = e.created_at();
                let last = self.usage.last_used(id).map_or(created, |u| u.max(created));
                rules.alike(e, last)
            },
            |r, n| gauges.add_many(r, self.last_use(r), n),
        );
        gauges
    }

    /// The observer an incremental apply tells of its changes (`sync::apply::records`): it
    /// holds the gauges' lock for the apply, so counts and table change together.
    pub fn counting(&self) -> Counting<'_> {
        Counting {
            gauges: self.gauges(),
            gw: self,
        }
    }

    /// The key gauges now: due changes applied, and counted afresh when a reload changed
    /// what they depend on. Costs the changes due since the last call, not the table.
    pub fn key_counts(&self) -> crate::keys::gauges::Counts {
        let rules = self.gauge_rules();
        let mut gauges = self.gauges();
        if *gauges.rules() != rules {
            *gauges = self.count_all(&self.table(), rules);
        }
        gauges.tick(crate::clock::unix_secs());
        gauges.counts(self.snapshot().keys.format.envs())
    }

    /// A forwarded request by key `id` at `now` with its final `status` (usage). The first
    /// use of a key on a UTC day moves its stale-gauge contribution, so that one update is
    /// made under the gauges' lock; every other use is one lock-free map lookup.
    pub fn forwarded(&self, id: &crate::keys::compact::KeyId, now: i64, status: u16) {
        if self.usage.same_day_use(id, now, status) {
            return;
        }
        self.usage.status(id, status);
        let mut gauges = self.gauges();
        let table = self.table();
        let held = table.get_by_id(id);
        let before = held.as_deref().map(|r| self.last_use(r));
        self.usage.touch(id, now);
        if let (Some(r), Some(before)) = (held.as_deref(), before) {
            gauges.replace(Some((r, before)), Some((r, self.last_use(r))));
        }
    }

    pub fn mark_synced(&self) {
        self.mark_synced_at(unix_ms());
    }

    /// A table from a local copy was last synced at `ms` (its age counts from then).
    pub fn mark_synced_at(&self, ms: i64) {
        self.last_sync_ms.store(ms, Ordering::Relaxed);
    }

    /// Unix ms of the last successful sync; 0 before the first.
    pub fn last_sync_ms(&self) -> i64 {
        self.last_sync_ms.load(Ordering::Relaxed).max(0)
    }

    pub fn sync_age(&self) -> Option<Duration> {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        (last > 0).then(|| Duration::from_millis((unix_ms() - last).max(0) as u64))
    }

    pub fn table_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Enter the lame-duck phase: readiness fails from now on, serving goes on.
    pub fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Ready to serve keyed traffic: a table is loaded and, when configured to fail closed,
    /// it is not older than `max_staleness`. (Stopping is not part of it: a lame duck still
    /// serves; only `/readyz` reports it.)
    pub fn ready(&self, snap: &Snapshot) -> bool {
        self.table_loaded()
            && (snap.on_stale == OnStale::Serve
                || self.sync_age().is_some_and(|a| a <= snap.max_staleness))
    }

    /// Count a request in; `None` when the in-flight cap is reached (load shedding).
    pub fn enter(&self, cap: usize) -> Option<InFlight<'_>> {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.in_flight.inc();
        Some(InFlight(self))
    }

    /// A request id unique to this process run: boot id + sequence, no syscall per request.
    /// A new request id: this process's boot id, then a sequence number (20 hex digits).
    pub fn request_id(&self) -> http::HeaderValue {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        // 32 + 48 bits, written into a stack buffer: no allocation but the header's own.
        let wide = (u128::from(self.boot_id) << 48) | u128::from(n & 0xffff_ffff_ffff);
        let mut id = [0u8; 20];
        for (i, b) in id.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((wide >> (4 * (19 - i))) & 0xf) as usize];
        }
        http::HeaderValue::from_bytes(&id).unwrap_or(http::HeaderValue::from_static("0"))
    }

    /// Count a refused attempt with a known key (revoked, expired, …) for the next
    /// `auth.denied` summary, so attempts after a leak are attributable to the key. The map
    /// holds at most [`MAX_DENIED_KEYS`] ids: an attacker cycling through refused keys cannot
    /// grow it (each id needs a real, stored key).
    pub fn denied_key(&self, id: &str) {
        let Ok(mut m) = self.denied_keys.lock() else {
            return;
        };
        if let Some(n) = m.get_mut(id) {
            *n += 1;
        } else if m.len() < MAX_DENIED_KEYS {
            m.insert(id.to_owned(), 1);
        }
    }

    /// The per-key counts since the last call, emptied.
    pub fn take_denied_keys(&self) -> std::collections::BTreeMap<String, u64> {
        self.denied_keys
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// True the first time `lineage` exceeds its quota in the window ending `reset_secs` from
    /// `now` (then `key.quota_exceeded` is audited). Bounded: past `MAX_DENIED_KEYS` lineages
    /// the map starts over, which at worst repeats an event.
    pub fn quota_alarm(&self, lineage: &str, now: i64, reset_secs: u64) -> bool {
        let Ok(mut m) = self.quota_alarms.lock() else {
            return false;
        };
        if m.get(lineage).is_some_and(|until| now < *until) {
            return false;
        }
        if m.len() >= MAX_DENIED_KEYS {
            m.clear();
        }
        m.insert(lineage.to_owned(), now + reset_secs.max(1) as i64);
        true
    }

    /// A canary key was presented, here on `route` (a route's name, or the endpoint's beside
    /// the request path): the alarm, raised the same way wherever a gateway meets one. The
    /// metric feeds the KeygateCanaryKeyUsed alert; the audit record is what the webhook
    /// sender (or, on a feed gateway, the relay) announces. `hint` is the presented key's
    /// (`format::hint`), never the key.
    pub fn canary_alarm(
        &self,
        key: &crate::keys::compact::KeyView,
        hint: Option<String>,
        client_ip: std::net::IpAddr,
        route: &str,
    ) {
        self.metrics.canary_hits.inc();
        tracing::warn!(key_id = %key.id, %client_ip, route, "canary key used");
        self.audit(
            Event::new("key.canary_used", "gateway")
                .key_view(key, hint)
                .with("client_ip", client_ip.to_string())
                .with("route", route),
        );
    }

    /// Queue an audit event; never blocks the caller. A full queue drops and counts.
    pub fn audit(&self, event: Event) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.audit.try_send(event)
        {
            self.metrics.audit_dropped.inc();
        }
    }
}

/// The audit writer thread: file appends and fsyncs stay off the async runtime.
fn spawn_audit_writer(log: AuditLog, metrics: Arc<Metrics>) -> SyncSender<Event> {
    let (tx, rx) = sync_channel::<Event>(4096);
    let spawned = std::thread::Builder::new()
        .name("keygate-audit".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter().take(255));
                if let Err(e) = log.append(&batch) {
                    metrics.audit_dropped.inc_by(batch.len() as u64);
                    tracing::error!(path = %log.path().display(), error = %e, "audit write failed");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the audit writer");
    }
    tx
}
