//! `keygate control`: the control plane. An admin REST API over the same record log the CLI
//! writes (same lock, same policy, same audit events, the admin token's id as actor), and the
//! feed that keeps a fleet of gateways in sync.
//!
//! Authentication: `Authorization: Bearer <admin token>`; a missing or unknown token is 401,
//! a token of the wrong role 403. Tokens are looked up by HMAC digest (see `tokens`).

pub mod api;
pub mod exchange;
pub mod metrics;
pub mod reports;
pub mod tokens;
pub mod verify;

use crate::audit::{AuditLog, Event};
use crate::config::Config;
use crate::keys::record::KeyRecord;
use crate::keys::KeySettings;
use crate::store::feed::FeedState;
use crate::store::file::StoreError;
use crate::store::seal::Signer;
use crate::store::Store;
use crate::usage::{Delta, Used};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokens::Tokens;

/// What identifies one content of the token file without reading it: mtime, length, inode.
type FileVersion = tokens::Version;

/// Everything the control plane's handlers share.
pub struct Control {
    pub settings: KeySettings,
    pub config: Config,
    pub feed: Arc<FeedState>,
    pub tokens_path: tokens::TokenStore,
    tokens: ArcSwap<(Option<FileVersion>, Tokens)>,
    /// Fleet-wide usage lives here when `[redis]` is configured (gateways add to it).
    redis: Option<Arc<crate::redis::Client>>,
    pub metrics: metrics::ControlMetrics,
    /// `POST /v1/api-keys/verify`: limits charged as at a gateway, checks counted as uses.
    pub verifier: verify::Verifier,
    /// The failed-auth budget of clients exchanging keys for tokens (`POST /v1/tokens`), as a
    /// gateway keeps for its requests.
    pub failures: crate::limit::AuthFailures,
    /// Short-lived tokens: signing keys and the table the exchange authenticates against.
    pub broker: crate::tokens::broker::Broker,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish()
    }
}

impl Control {
    /// A canary key was presented to this control plane's `route` (`verify`,
    /// `token_exchange`): the alarm a gateway raises (`Gateway::canary_alarm`), named as ours.
    /// Audited before the caller is answered (the webhook sender announces it from the
    /// audit log); `hint` is the presented key's (`format::hint`), never the key.
    pub async fn canary_alarm(
        &self,
        key: &crate::keys::compact::KeyView,
        hint: Option<String>,
        client_ip: Option<std::net::IpAddr>,
        route: &'static str,
    ) {
        self.metrics.canary_hits.inc();
        let ip = client_ip.map(|ip| ip.to_string());
        tracing::warn!(key_id = %key.id, client_ip = ip.as_deref().unwrap_or("-"), route, "canary key used");
        let mut event = Event::new("key.canary_used", "control-plane")
            .key_view(key, hint)
            .with("route", route);
        if let Some(ip) = ip {
            event = event.with("client_ip", ip);
        }
        let audit = AuditLog::new(&self.settings.audit_log);
        let written = tokio::task::spawn_blocking(move || audit.append(&[event])).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(key_id = %key.id, "canary alarm could not be audited");
        }
    }

    /// The token table, re-read when its file changes (minting needs no restart, and a
    /// revocation works on the next request). The file is append-only, so its length changes
    /// with every write even when two writes fall within one mtime tick; the inode catches a
    /// file replaced by another of the same size.
    pub fn tokens(&self) -> Arc<(Option<FileVersion>, Tokens)> {
        let version = self.tokens_path.version();
        let current = self.tokens.load_full();
        if current.0 == version {
            return current;
        }
        let fresh = Arc::new((version, Tokens::load(&self.tokens_path)));
        self.tokens.store(fresh.clone());
        fresh
    }

    /// Add verify's own counts to the fleet's usage where this control plane keeps it: Redis
    /// when configured, else the usage file (under its lock, beside any gateways that follow
    /// the store file and add theirs). On failure `deltas` holds what was not added. The
    /// gateways' reports go to the same place, each batch once (`reports`).
    pub async fn add_usage(&self, deltas: &mut Vec<Delta>) -> Result<(), UsageError> {
        if deltas.is_empty() {
            return Ok(());
        }
        if let Some(client) = &self.redis {
            return Ok(crate::redis::usage::add(client, deltas).await?);
        }
        let (path, all) = (self.settings.usage_file.clone(), deltas.clone());
        // The file is replaced whole or not at all.
        tokio::task::spawn_blocking(move || crate::usage::merge_into_file(&path, &all))
            .await
            .map_err(|e| UsageError::File(std::io::Error::other(e)))?
            .map_err(UsageError::File)?;
        deltas.clear();
        Ok(())
    }

    /// The fleet's usage of `ids`, where `add_usage` puts it: Redis when configured (an
    /// error when it does not answer), else the usage file (all of it).
    pub async fn read_usage(&self, ids: &[&str]) -> Result<BTreeMap<String, Used>, UsageError> {
        match &self.redis {
            Some(client) => Ok(crate::redis::usage::read(client, ids).await?),
            None => Ok(self.usage_file()),
        }
    }

    /// `read_usage` for API responses: a Redis that does not answer falls back to the usage
    /// file, logged: a listing without last use beats no listing.
    pub async fn usage_of(&self, ids: &[&str]) -> BTreeMap<String, Used> {
        match self.read_usage(ids).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "usage from redis unavailable; using the usage file");
                self.usage_file()
            }
        }
    }

    /// Every key's usage (`read_usage` over the table): the governance gauges' and webhooks'
    /// view. `None` while Redis does not answer: without it every key would look unused.
    pub async fn fleet_usage(&self) -> Option<BTreeMap<String, Used>> {
        // The file is read whole; Redis is asked for the table's keys.
        let latest = match self.redis {
            Some(_) => self.feed.latest(),
            None => Vec::new(),
        };
        let ids: Vec<&str> = latest.iter().map(|r| r.id.as_str()).collect();
        match self.read_usage(&ids).await {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "key usage unavailable; governance figures and stale-key events wait for it");
                None
            }
        }
    }

    fn usage_file(&self) -> BTreeMap<String, Used> {
        crate::usage::read(&self.settings.usage_file)
    }
}

/// Why counts could not be added to, or read from, the fleet's usage.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("redis: {0}")]
    Redis(#[from] crate::redis::RedisError),
    #[error("usage file: {0}")]
    File(std::io::Error),
}

/// The governance gauges and the fleet's one webhook sender: the control plane sees every change (its API, the CLI on
/// its store, rotation completions) and the events gateways relay (`webhooks::relay`).
fn start_webhooks(control: &Arc<Control>, endpoints: Vec<crate::webhooks::Endpoint>) {
    let (table, merged) = (control.clone(), control.clone());
    let records: crate::webhooks::run::Records =
        Arc::new(move |f| table.feed.latest().iter().for_each(|r| f(r)));
    // Called off the async threads (governance, webhooks), so it may wait on Redis.
    let runtime = tokio::runtime::Handle::current();
    let usage: crate::webhooks::run::UsageFn =
        Arc::new(move || runtime.block_on(merged.fleet_usage()));
    crate::governance::spawn(
        control.metrics.registry(),
        records.clone(),
        usage.clone(),
        control.settings.audit_log.clone(),
        control.settings.policy.clone(),
        control.settings.stale_after_secs,
    );
    if endpoints.is_empty() {
        return;
    }
    let metrics = crate::webhooks::run::WebhookMetrics::register(control.metrics.registry());
    let host = crate::webhooks::run::Host {
        records,
        usage,
        audit: AuditLog::new(&control.settings.audit_log),
        stale_after_secs: control.settings.stale_after_secs,
        actor: "control-plane",
    };
    let queue = crate::webhooks::run::queue_path(&control.settings.store);
    // Control planes sharing Redis announce `key.expiring`/`key.stale` once between them.
    let fleet_marks = control.redis.as_ref().map(|c| c.settings().clone());
    crate::webhooks::run::spawn(endpoints, queue, host, metrics, fleet_marks);
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Load state and bind; returns the bound address and the serving future.
pub async fn start(
    config_path: &Path,
) -> Result<(SocketAddr, Arc<Control>, tokio::task::JoinHandle<()>), ControlError> {
    let config = Config::load(config_path)?;
    config.check_listen()?;
    let settings = KeySettings::from_config(&config)?;
    let webhooks = crate::webhooks::endpoints(&config)?;
    // The control plane owns the log: a fresh deployment starts from an empty one (gateways,
    // by contrast, fail closed on a missing store). A legacy unsigned file is signed in place,
    // an empty store gets its log id, and a file restored while the control plane was down
    // continues as a new log (`store::file`).
    let store = settings.store_backend();
    if let Store::File(_) = &store {
        if let Some(dir) = settings
            .store
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&settings.store)?;
    }
    // Blocking (file lock or Redis on a private runtime): off the async workers.
    let init = store.clone();
    tokio::task::spawn_blocking(move || init.ensure_signed())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let feed = FeedState::new(config.control.feed_buffer);
    let audit = AuditLog::new(&settings.audit_log);
    let redis_metrics = crate::metrics::Metrics::new(0).redis_metrics();
    let redis = crate::redis::Settings::from_config(&config)?
        .map(|settings| crate::redis::Client::new(settings, redis_metrics.clone()));
    let metrics = match &redis {
        Some(client) => {
            client.spawn_health();
            metrics::ControlMetrics::new().with_redis(redis_metrics.up.clone())
        }
        None => metrics::ControlMetrics::new(),
    };
    match (&store, &settings.redis_store) {
        (Store::File(log), _) => feed.follow(
            log.clone(),
            Duration::from_millis(config.keys.poll_interval_ms.max(10)),
            metrics.store_errors.clone(),
            move |log, held| revoke_again(&Store::File(log.clone()), &audit, held),
        )?,
        (Store::Redis(_), Some(redis_settings)) => {
            follow_redis(
                feed.clone(),
                store.clone(),
                redis_settings.clone(),
                Signer::new(&settings.hasher),
                metrics.store_errors.clone(),
                audit,
            )
            .await
        }
        (Store::Redis(_), None) => {
            return Err(std::io::Error::other("redis store without [redis] settings").into())
        }
    }
    let tokens_path = tokens::TokenStore::for_config(&config, &settings);
    // Verify charges keys as a gateway does: node-local buckets, or fleet-wide leases in
    // Redis with `[limits] backend = "redis"` (the client built above, shared).
    let policy = crate::snapshot::LimitPolicy::from_config(&config, redis.is_some())?;
    let fleet = redis.clone().map(|client| {
        let tuning = crate::redis::lease::LeaseTuning::from_config(&config.limits);
        crate::redis::lease::Fleet::new(client, tuning)
    });
    let verifier = verify::Verifier::new(
        policy,
        crate::limit::Limiter::new(fleet, metrics.limiter_fallback.clone()),
        &settings.usage_file,
        crate::snapshot::touch_interval(&config)?,
    );
    let broker = crate::tokens::broker::Broker::new(crate::tokens::TokenSettings::from_config(
        &config, None,
    )?);
    let control = Arc::new(Control {
        broker,
        tokens: ArcSwap::from_pointee((None, Tokens::default())),
        tokens_path,
        settings,
        feed,
        redis,
        metrics,
        verifier,
        failures: crate::limit::AuthFailures::from_config(&config.limits),
        config,
    });
    let listener = tokio::net::TcpListener::bind(&control.config.control.listen)
        .await
        .map_err(|source| ControlError::Bind {
            addr: control.config.control.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    let tls = match &control.config.control.tls {
        Some(pair) => {
            let (cfg, resolver, _) = crate::tls::server_config(
                control.config.resolve(&pair.cert),
                control.config.resolve(&pair.key),
            )?;
            tokio::spawn(crate::tls::watch(resolver, Duration::from_secs(1), |_| {}));
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        }
        None => None,
    };
    tokio::spawn(crate::rotations::run_on_control(control.clone()));
    tokio::spawn(verify::flush_every_touch(control.clone()));
    tokio::spawn(sweep_every_minute(control.clone()));
    start_webhooks(&control, webhooks);
    let c = control.clone();
    let task = tokio::spawn(async move {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let builder = Arc::new(builder);
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (c, builder, tls) = (c.clone(), builder.clone(), tls.clone());
            tokio::spawn(async move {
                let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(api::Peer(peer.ip()));
                    api::handle(c.clone(), req)
                });
                match tls {
                    Some(acceptor) => {
                        if let Ok(Ok(s)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                                .await
                        {
                            let _ = builder.serve_connection(TokioIo::new(s), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Ok((addr, control, task))
}

/// Idle rate-limit buckets (verify) and failed-auth windows (token exchange) are dropped once
/// a minute, as a gateway does, so neither map grows with clients long gone.
async fn sweep_every_minute(c: Arc<Control>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        c.verifier.limiter.shrink();
        c.failures.sweep(std::time::Instant::now());
    }
}

/// Revocation is final: the store would un-revoke `held` (replaced or forged behind our back),
/// so write their revocations again, audited, and the log agrees with what gateways enforce.
/// The control plane on the Redis store: its feed follows Redis (the same `Update`s as the
/// file follower), so any number of control planes can serve the REST API and the feed side by
/// side; none keeps state of its own beyond the admin token file. The first load happens before
/// this returns (a control plane that says it is listening can serve the feed).
async fn follow_redis(
    feed: Arc<FeedState>,
    store: Store,
    settings: crate::redis::Settings,
    signer: Signer,
    errors: prometheus::IntCounterVec,
    audit: AuditLog,
) {
    let mut follower = crate::store::redis::Follower::new(&settings, signer.clone(), None);
    match follower.next().await {
        Ok(u) => {
            feed.apply(u);
        }
        Err(e) => {
            errors.with_label_values(&[e.kind()]).inc();
            tracing::error!(error = %e, "control plane: redis store not loaded yet; retrying");
        }
    }
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match follower.next().await {
                Ok(u) => {
                    backoff = Duration::from_millis(100);
                    let held = feed.apply(u);
                    if !held.is_empty() {
                        errors.with_label_values(&["unrevoke"]).inc();
                        let (store, audit) = (store.clone(), audit.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || revoke_again(&store, &audit, held))
                                .await;
                    }
                }
                Err(e) => {
                    errors.with_label_values(&[e.kind()]).inc();
                    tracing::warn!(error = %e, "control plane: redis store follower; serving the last good log");
                    // The log went back under us (a failover lost writes acknowledged without
                    // WAIT, an old dump): revisions we served would be issued again. Continue
                    // as a new log after them, with every revocation we served.
                    if let (StoreError::Rollback { .. }, Store::Redis(r)) = (&e, &store) {
                        let (r, rev, revoked) = ((**r).clone(), feed.revision(), feed.revoked());
                        let done =
                            tokio::task::spawn_blocking(move || r.continue_after(rev, &revoked))
                                .await;
                        match done {
                            Ok(Ok(log)) => {
                                tracing::warn!(%log, "control plane: redis store continues as a new log")
                            }
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "control plane: could not continue the redis store as a new log")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "control plane: new-log task failed")
                            }
                        }
                    }
                    tokio::time::sleep(backoff).await; // reconnect pacing, not synchronisation
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    let held = feed.loaded().then(|| (feed.log_id(), feed.revision()));
                    follower = crate::store::redis::Follower::new(&settings, signer.clone(), held);
                }
            }
        }
    });
}

fn revoke_again(log: &Store, audit: &AuditLog, held: Vec<KeyRecord>) {
    let ids: Vec<String> = held.iter().map(|r| r.id.clone()).collect();
    tracing::error!(keys = ?ids, "control plane: the store would un-revoke keys; writing their revocations again");
    let written = log.transact(
        |state| {
            let records: Vec<KeyRecord> = held
                .iter()
                .filter_map(|h| {
                    let mut r = state.keys.get(&h.id)?.clone();
                    r.revoked_at = h.revoked_at;
                    r.revoked_reason = h.revoked_reason.clone();
                    r.written_at_ms = crate::clock::unix_ms();
                    Some(r)
                })
                .collect();
            let events: Vec<Event> = records
                .iter()
                .map(|r| {
                    Event::new("key.revoked", "control-plane").key(r).with(
                        "reason",
                        "revocation is final: re-applied over a replaced store",
                    )
                })
                .collect();
            Ok::<_, (std::io::Error, crate::store::CommitPoint)>((records, events))
        },
        // Once, for the versions written (`Store::transact`).
        |events, point| audit.append(&events).map_err(|e| (e, point)),
    );
    match written {
        Ok(Ok(_)) => {}
        Ok(Err((e, crate::store::CommitPoint::BeforeWrite))) => {
            tracing::error!(error = %e, "control plane: audit failed; revocations not re-written")
        }
        Ok(Err((e, crate::store::CommitPoint::AfterWrite))) => {
            tracing::error!(error = %e, "control plane: revocations re-written, but their audit failed")
        }
        Err(e) => tracing::error!(error = %e, "control plane: could not re-write revocations"),
    }
}

/// `keygate control`: serve until SIGTERM/SIGINT.
pub async fn run(config_path: &Path) -> Result<(), ControlError> {
    let (addr, control, task) = start(config_path).await?;
    let stop = crate::server::stop_signal();
    println!(
        "{}",
        serde_json::json!({"event": "listening", "control": addr.to_string()})
    );
    tracing::info!(%addr, tokens = control.tokens().1.len(), "control plane listening");
    stop.await;
    task.abort();
    Ok(())
}
