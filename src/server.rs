//! Listeners and lifecycle: bind the data (HTTP, optional HTTPS) and admin listeners, accept
//! with connection caps (global and per client IP), TLS with a handshake timeout, HTTP/1.1
//! and HTTP/2 on one listener with edge-safe limits (HTTP/1, plain or chosen by ALPN over TLS,
//! served in keep-alive cycles that give hyper's buffers back while idle: `keepalive`; plain
//! requests served between them without hyper: `direct`),
//! background upkeep (store follower, usage flush, bucket cleanup, denial summaries), reload on
//! SIGHUP and on a config file change (`reload`), and on SIGTERM/SIGINT a lame-duck delay
//! (`/readyz` 503, still accepting) followed by the drain.

use crate::admin;
use crate::audit::Event;
use crate::boxed::boxed;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::keys::compact::Validity as _;
use crate::metrics::Metrics;
use crate::pipeline::Conn;
use crate::reload::ConfigFile;
use crate::send_deadline::{SendDeadline, SendLimit};
use crate::snapshot::Snapshot;
use dashmap::DashMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("refusing to start: {}", .0.join("; "))]
    MissingSecretVersion(Vec<String>),
}

/// Where a running gateway listens (port 0 in config resolves to the real port here).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// Open connections, globally and per client IP, enforced at accept.
struct ConnCaps {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    max_total: usize,
    max_per_ip: usize,
}

struct ConnGuard {
    caps: Arc<ConnCaps>,
    ip: IpAddr,
}

impl ConnCaps {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, &'static str> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("global");
        }
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(n);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err("per_ip");
        }
        *n += 1;
        Ok(ConnGuard {
            caps: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
        let gone = match self.caps.per_ip.get_mut(&self.ip) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            self.caps.per_ip.remove_if(&self.ip, |_, n| *n == 0);
        }
    }
}

/// One connection in `keygate_connections_open`, counted down when its task ends however it
/// ends: a panic in a request served on the task (THREATS K3) unwinds past any decrement
/// written after the serving code.
struct Open(prometheus::IntGauge);

impl Open {
    fn new(gauge: prometheus::IntGauge) -> Open {
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// hyper's HTTP/1 limits, the same for the `auto` builder (TLS without ALPN `http/1.1`, and
/// plain connections that start like HTTP/2) and the HTTP/1 builder (`keepalive`): one list,
/// two builder types with the same methods and no shared trait.
macro_rules! http1_limits {
    ($b:expr, $s:expr) => {
        $b.timer(crate::deadline::HyperTimer)
            // Without a timer hyper's header timeout is off; this is what stops slowloris (E1).
            .header_read_timeout(Duration::from_millis($s.header_read_timeout_ms))
            .max_buf_size($s.max_header_bytes)
            .max_headers($s.max_headers)
            .keep_alive(true)
    };
}

fn http_builder(s: &crate::config::ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_limits!(b.http1(), s);
    b.http2()
        .timer(crate::deadline::HyperTimer)
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        .max_header_list_size(s.h2_max_header_list_bytes)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .keep_alive_interval(Duration::from_millis(s.keepalive_idle_ms))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// The builder of HTTP/1 connections served in cycles (`keepalive`).
fn http1_builder(s: &crate::config::ServerConfig) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    http1_limits!(b, s);
    b
}

/// `n` listening sockets on one address (`SO_REUSEPORT` when `n` > 1: the kernel spreads new
/// connections over them), returned as std listeners for the workers' runtimes to adopt. Port
/// 0 resolves once: the others bind the port the first one got.
async fn bind_shared(addr: &str, n: usize) -> Result<Vec<std::net::TcpListener>, ServeError> {
    let err = |source| ServeError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let mut at = tokio::net::lookup_host(addr)
        .await
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("resolves to no address")))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let socket = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        if n > 1 {
            socket.set_reuseport(true).map_err(err)?;
        }
        socket.bind(at).map_err(err)?;
        let listener = socket.listen(1024).map_err(err)?;
        at = listener.local_addr().map_err(err)?;
        out.push(listener.into_std().map_err(err)?);
    }
    Ok(out)
}

/// What every data-plane accept loop shares.
#[derive(Clone)]
struct Plane {
    gw: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    cycles: Arc<crate::keepalive::Cycles>,
    caps: Arc<ConnCaps>,
    stop: watch::Receiver<bool>,
    handshake_ms: u64,
    send: SendLimit,
    life: Arc<crate::lifetime::Lifetime>,
}

/// One data-plane worker: a thread running a current-thread runtime that accepts on its own
/// listeners and serves their connections to the end. A connection, its requests and what
/// they spawn stay on one thread: no work stealing, no cross-core wake-ups per request
/// (measured: docs/performance.md, "The first steps"). The runtime is built here so that a
/// failure stops the start; the thread outlives its accept loops, because draining
/// connections are tasks of its runtime (the process exits once `Shutdown` has drained).
fn spawn_worker(
    i: usize,
    listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    plane: Plane,
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("keygate-worker-{i}"))
        .spawn(move || {
            rt.block_on(async move {
                // The worker's deadlines (header reads, upstream responses, bodies) on one timer.
                tokio::spawn(crate::deadline::install());
                let mut loops = tokio::task::JoinSet::new();
                for (l, tls) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            loops.spawn(accept_loop(l, tls, plane.clone()));
                        }
                        Err(e) => tracing::error!(error = %e, worker = i, "listener not adopted"),
                    }
                }
                // Its stop receiver would keep `Shutdown` waiting for the drain deadline.
                drop(plane);
                while loops.join_next().await.is_some() {}
                std::future::pending::<()>().await
            })
        })?;
    Ok(())
}

async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Run the gateway until SIGTERM/SIGINT. Prints one JSON line on stdout once listening.
pub async fn serve(config_path: &Path) -> Result<(), ServeError> {
    let config_file = ConfigFile::new(config_path);
    let (gw, bound, shutdown) = start(config_path).await?;
    tokio::spawn(crate::reload::watch(gw.clone(), config_file.clone()));
    // Installed before "listening" is announced: a SIGUSR1 never meets the default action
    // (terminate), with or without an access log.
    reopen_on_sigusr1(gw.sinks.file.clone());
    // Likewise SIGTERM/SIGINT/SIGHUP: a test or supervisor may signal the moment it reads the
    // line; before the handlers exist, that signal would kill the process outright.
    let mut signals = Signals::install();
    println!(
        "{}",
        serde_json::json!({"event": "listening", "http": bound.http.to_string(), "https": bound.https.map(|a| a.to_string()), "admin": bound.admin.to_string()})
    );
    tracing::info!(http = %bound.http, https = ?bound.https, admin = %bound.admin, "keygate listening");
    crate::systemd::tell("READY=1");
    if let Some(every) = crate::systemd::watchdog_interval() {
        tokio::spawn(crate::systemd::watchdog(every));
    }
    signals.until_stop(&gw, &config_file).await;
    lame_duck(&gw, &mut signals).await;
    shutdown.shutdown().await;
    // Every request is over: write the access lines and spans still queued.
    gw.sinks.finish(Duration::from_secs(5)).await;
    // After the drain no request can spend a leased token: hand the rest back to the fleet.
    if let Some(f) = gw.limiter.fleet() {
        let returned = f.release_all().await;
        tracing::info!(
            tokens = returned,
            "returned unused rate-limit leases to redis"
        );
    }
    Ok(())
}

/// Handle to stop a started gateway gracefully.
pub struct Shutdown {
    /// Every listener, task and connection holds a receiver; `closed()` means all are done.
    tx: watch::Sender<bool>,
    drain: Duration,
}

impl Shutdown {
    /// Stop accepting, let in-flight requests finish (HTTP/2 gets GOAWAY), give up at the deadline.
    pub async fn shutdown(self) {
        let _ = self.tx.send(true);
        tracing::info!(tasks = self.tx.receiver_count(), "draining");
        if tokio::time::timeout(self.drain, self.tx.closed())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline reached; closing remaining connections");
        }
    }
}

/// The webhook sender and governance gauges of a single node (file store). Gateways of a fleet (feed or Redis
/// store) leave sending to the control plane, which sees every change once.
fn start_webhooks(gw: &Arc<Gateway>, single_node: bool) -> Result<(), ServeError> {
    let snap = gw.snapshot();
    let endpoints = crate::webhooks::endpoints(&snap.config)?;
    if !single_node {
        if !endpoints.is_empty() {
            tracing::warn!("[[webhooks]] ignored: in a fleet the control plane sends webhooks");
        }
        return Ok(());
    }
    let (table, local) = (gw.clone(), gw.clone());
    let usage_file = snap.keys.usage_file.clone();
    let records: crate::webhooks::run::Records = Arc::new(move |f| table.table().each_record(f));
    let usage: crate::webhooks::run::UsageFn = Arc::new(move || {
        let mut u = crate::usage::read(&usage_file);
        for (id, mine) in local.usage.snapshot() {
            u.entry(id).or_default().merge(&mine);
        }
        Some(u)
    });
    // The governance figures come from the same place as the events: the node's audit log.
    let each = gw.clone();
    crate::governance::spawn(
        gw.metrics.registry(),
        Arc::new(move |f| each.table().each_record(f)),
        usage.clone(),
        snap.keys.audit_log.clone(),
        snap.keys.policy.clone(),
        snap.keys.stale_after_secs,
    );
    if endpoints.is_empty() {
        return Ok(());
    }
    let metrics = crate::webhooks::run::WebhookMetrics::register(gw.metrics.registry());
    let host = crate::webhooks::run::Host {
        records,
        usage,
        audit: crate::audit::AuditLog::new(snap.keys.audit_log.clone()),
        stale_after_secs: snap.keys.stale_after_secs,
        actor: "gateway",
    };
    let queue = crate::webhooks::run::queue_path(&snap.keys.store);
    crate::webhooks::run::spawn(endpoints, queue, host, metrics, None);
    Ok(())
}

/// The missing-secret-version check for a file store: over the table when the store's
/// checkpoint already put one in (`sync::file::spawn` loads it before returning), else over
/// the store read whole, as before.
fn secret_versions_of_table(gw: &Gateway) -> Result<(), ServeError> {
    let snap = gw.snapshot();
    let now = crate::clock::unix_secs();
    let found = if gw.table_loaded() {
        judge_table(&snap.keys, gw, Vec::new(), now)
    } else {
        snap.keys.check_secret_versions(now)
    };
    for w in found.map_err(ServeError::MissingSecretVersion)? {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Missing secret versions under `keys` among the table's keys and `more` (id, secret
/// version, state): `Err` when `keys.on_missing_secret_version = "refuse"`, else `Ok` with
/// the warnings.
fn judge_table(
    keys: &crate::keys::KeySettings,
    gw: &Gateway,
    more: Vec<(String, u32, crate::keys::record::KeyState)>,
    now: i64,
) -> Result<Vec<String>, Vec<String>> {
    keys.judge_missing(missing_in_table(keys, gw, more, now).lines())
}

/// The secret versions `keys` has no secret for that keys in the table (and `more`) still
/// use: at start under the running settings, on a reload under the candidate's.
pub(crate) fn missing_in_table<'a>(
    keys: &'a crate::keys::KeySettings,
    gw: &Gateway,
    more: Vec<(String, u32, crate::keys::record::KeyState)>,
    now: i64,
) -> crate::keys::MissingVersions<'a> {
    let mut missing = keys.missing_versions();
    gw.table()
        .each_entry(|e, id| missing.add(e.secret_version, e.state(now), id));
    for (id, version, state) in more {
        missing.add(version, state, || Some(id));
    }
    missing
}

/// The missing-secret-version check for a Redis store, over the first table (the local copy,
/// or what the checkpoint or a whole read put in) plus the records that read could not verify
/// for want of their secret version. With Redis down and no local copy there is nothing to
/// judge: the gateway fails closed until Redis answers, and says the check was not made.
fn redis_secret_versions(
    gw: &Gateway,
    first: crate::sync::redis::FirstLoad,
) -> Result<(), ServeError> {
    if !gw.table_loaded() {
        let why = first.unreachable.unwrap_or_default();
        tracing::warn!(error = %why, "secret versions not checked at start: the Redis store is unreachable");
        return Ok(());
    }
    let table = gw.table();
    // A record the table holds a newer version of is not the key's latest.
    let unverifiable: Vec<_> = first
        .unverifiable
        .into_iter()
        .filter(|(id, rev, _, _)| table.get_by_id(id).is_none_or(|r| r.rev < *rev))
        .map(|(id, _, version, state)| (id, version, state))
        .collect();
    drop(table);
    let found = judge_table(
        &gw.snapshot().keys,
        gw,
        unverifiable,
        crate::clock::unix_secs(),
    );
    for w in found.map_err(ServeError::MissingSecretVersion)? {
        tracing::warn!("{w}");
    }
    Ok(())
}

/// Load config, start every listener and background task. Used by `serve` and `demo`.
pub async fn start(config_path: &Path) -> Result<(Arc<Gateway>, Bound, Shutdown), ServeError> {
    let config = Config::load(config_path)?;
    let metrics = Arc::new(Metrics::new(config.metrics.per_key_series));
    let snapshot = Snapshot::build(config, &metrics)?;
    let server_cfg = snapshot.server.clone();
    let poll = Duration::from_millis(snapshot.config.keys.poll_interval_ms.max(10));
    let store = snapshot.keys.store.clone();
    let feed = snapshot.feed.clone();
    // Keys under a secret version we have no secret for would all answer 401: refuse to
    // start (or warn loudly, if configured) rather than serve a silent outage. With a file
    // store this is judged once the first table is in (`secret_versions_of_table`): from a
    // checkpoint that costs no log parse.
    // With the Redis store it is judged on the first table too (`redis_secret_versions`):
    // Redis is read once at start.
    let file_source = feed.is_none();
    let sinks = crate::access::Sinks::start(&snapshot.config, &metrics)?;
    let gw = Gateway::new(snapshot, metrics.clone(), sinks);
    if let Some(f) = gw.limiter.fleet() {
        f.client().spawn_health();
    }
    let redis_store = gw.snapshot().keys.redis_store.clone();
    let single_node = file_source && redis_store.is_none();
    match feed {
        None if redis_store.is_some() => {
            if let Some(settings) = redis_store {
                let cache = gw
                    .snapshot()
                    .config
                    .resolve(&gw.snapshot().config.keys.feed_cache);
                let first = crate::sync::redis::start(gw.clone(), settings, cache).await;
                redis_secret_versions(&gw, first)?;
            }
        }
        None => {
            crate::sync::file::spawn(
                gw.clone(),
                store,
                crate::store::seal::Signer::new(&gw.snapshot().keys.hasher),
                poll,
            )?;
            secret_versions_of_table(&gw)?;
        }
        Some(f) => {
            crate::sync::feed::spawn(gw.clone(), f.clone());
            crate::webhooks::relay::spawn(
                gw.snapshot().keys.audit_log.clone(),
                f,
                gw.metrics.relayed_events.clone(),
            );
        }
    }

    crate::tokens::verifier::spawn_refresh(gw.clone());

    let (tx, rx) = watch::channel(false);
    let builder = Arc::new(http_builder(&server_cfg));
    let cycles = Arc::new(crate::keepalive::Cycles {
        h1: http1_builder(&server_cfg),
        max_head: server_cfg.max_header_bytes,
        max_headers: server_cfg.max_headers,
        idle: Duration::from_millis(server_cfg.header_read_timeout_ms),
        released: gw.metrics.connections_released.clone(),
        errors: crate::protocol_errors::ProtocolErrors::new(&gw.metrics.protocol_errors),
    });
    let caps = Arc::new(ConnCaps {
        total: AtomicUsize::new(0),
        per_ip: DashMap::new(),
        max_total: server_cfg.max_connections,
        max_per_ip: server_cfg.max_connections_per_ip,
    });

    let tls = match &server_cfg.tls {
        Some(t) => {
            let base = gw.snapshot().config.base_dir.clone();
            let resolve = |p: &PathBuf| {
                if p.is_absolute() {
                    p.clone()
                } else {
                    base.join(p)
                }
            };
            let (cfg, resolver, not_after) =
                crate::tls::server_config(resolve(&t.cert), resolve(&t.key))?;
            let gauge = metrics.cert_expiry.with_label_values(&["https"]);
            if let Some(t) = not_after {
                gauge.set(t as f64);
            }
            tokio::spawn(crate::tls::watch(
                resolver,
                Duration::from_secs(1),
                move |na| {
                    if let Some(t) = na {
                        gauge.set(t as f64);
                    }
                },
            ));
            Some((tokio_rustls::TlsAcceptor::from(cfg), t.listen.clone()))
        }
        None => None,
    };

    // The plain listener serves HTTPS instead when TLS is configured without its own address.
    let (plain_tls, extra_tls) = match tls {
        Some((acc, None)) => (Some(acc), None),
        Some((acc, Some(addr))) => (None, Some((acc, addr))),
        None => (None, None),
    };
    // The data plane: `workers` threads, each accepting on its own listeners for the same
    // addresses (`bind_shared`) and serving what it accepts on its own runtime.
    let workers = server_cfg.worker_count();
    let main = bind_shared(&server_cfg.listen, workers).await?;
    let http_addr = main[0].local_addr()?;
    let (https_addr, extra) = match extra_tls {
        Some((acc, addr)) => {
            let ls = bind_shared(&addr, workers).await?;
            (Some(ls[0].local_addr()?), Some((acc, ls)))
        }
        None => (None, None),
    };
    let main_is_tls = plain_tls.is_some();
    let plane = Plane {
        gw: gw.clone(),
        builder,
        cycles,
        caps,
        stop: rx.clone(),
        handshake_ms: server_cfg.tls_handshake_timeout_ms,
        send: SendLimit {
            after: Duration::from_millis(server_cfg.send_timeout_ms),
            cut: gw.metrics.send_timeouts.clone(),
        },
        life: Arc::new(crate::lifetime::Lifetime {
            idle: Duration::from_millis(server_cfg.h2_idle_timeout_ms),
            max_age: (server_cfg.h2_max_connection_age_ms > 0)
                .then(|| Duration::from_millis(server_cfg.h2_max_connection_age_ms)),
            drain: Duration::from_millis(server_cfg.drain_timeout_ms),
            retired_idle: gw.metrics.connections_retired.with_label_values(&["idle"]),
            retired_age: gw
                .metrics
                .connections_retired
                .with_label_values(&["max_age"]),
            retired_send_timeout: gw
                .metrics
                .connections_retired
                .with_label_values(&["send_timeout"]),
            errors: crate::protocol_errors::ProtocolErrors::new(&gw.metrics.protocol_errors),
        }),
    };
    let mut extra = extra.map(|(acc, ls)| ls.into_iter().map(move |l| (l, Some(acc.clone()))));
    for (i, l) in main.into_iter().enumerate() {
        let mut listeners = vec![(l, plain_tls.clone())];
        listeners.extend(extra.as_mut().and_then(Iterator::next));
        spawn_worker(i, listeners, plane.clone())?;
    }

    let admin_l = bind(&gw.snapshot().config.admin.listen).await?;
    let admin_addr = admin_l.local_addr()?;
    tokio::spawn(admin_loop(admin_l, gw.clone(), rx.clone()));
    start_webhooks(&gw, single_node)?;
    if file_source {
        // A gateway following a feed knows only its own traffic: the control plane completes
        // rotations in a fleet (`rotations`).
        tokio::spawn(crate::rotations::run_on_gateway(gw.clone(), rx.clone()));
    }
    tokio::spawn(crate::redigest::run(gw.clone(), rx.clone()));
    tokio::spawn(upkeep(gw.clone(), rx));

    let bound = if main_is_tls {
        Bound {
            http: http_addr,
            https: Some(http_addr),
            admin: admin_addr,
        }
    } else {
        Bound {
            http: http_addr,
            https: https_addr,
            admin: admin_addr,
        }
    };
    Ok((
        gw,
        bound,
        Shutdown {
            tx,
            drain: Duration::from_millis(server_cfg.drain_timeout_ms),
        },
    ))
}

async fn accept_loop(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, plane: Plane) {
    let Plane {
        gw,
        builder,
        cycles,
        caps,
        mut stop,
        handshake_ms,
        send,
        life,
    } = plane;
    let listener_name = if tls.is_some() { "https" } else { "http" };
    let open = gw
        .metrics
        .connections_open
        .with_label_values(&[listener_name]);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning (THREATS E7).
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let guard = match caps.admit(crate::authz::canonical_ip(peer.ip())) {
            Ok(g) => g,
            Err(reason) => {
                gw.metrics
                    .connections_rejected
                    .with_label_values(&[reason])
                    .inc();
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted = Box::new(Accepted {
            stream: SendDeadline::new(stream, send.clone()),
            conn: Conn {
                peer,
                tls: tls.is_some(),
            },
            gw: gw.clone(),
            builder: builder.clone(),
            cycles: cycles.clone(),
            tls: tls.clone(),
            stop: stop.clone(),
            handshake: Duration::from_millis(handshake_ms),
            at: std::time::Instant::now(),
            life: life.clone(),
        });
        let open = open.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _open = Open::new(open);
            // This task lives as long as the connection, at the size of its largest state.
            // Settling the connection (the TLS handshake, the protocol of its first bytes, an
            // HTTP/2 connection served to its end) holds far more than HTTP/1 cycles need while
            // they idle, so it runs in a box of its own, freed before the cycles start: an
            // idle connection keeps this task's few words and the cycles' own state.
            if let Some(cycles) = boxed(|| accepted.settle()).await {
                cycles.await;
            }
        });
    }
}

/// A connection just accepted, with what settling it needs (`Accepted::settle`).
struct Accepted {
    stream: SendDeadline<tokio::net::TcpStream>,
    conn: Conn,
    gw: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    cycles: Arc<crate::keepalive::Cycles>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
    handshake: Duration,
    at: std::time::Instant,
    life: Arc<crate::lifetime::Lifetime>,
}

/// An HTTP/1 connection's cycles (`keepalive::serve`), boxed: the one state a connection keeps
/// for its life.
type CyclesFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Accepted {
    /// The TLS handshake and the protocol: an HTTP/1 connection (plain, or TLS with
    /// `http/1.1` chosen by ALPN) comes back as its cycles, to be served from the connection's
    /// task; any other is served here to its end (`None`).
    async fn settle(self: Box<Self>) -> Option<CyclesFuture> {
        let Accepted {
            stream,
            conn,
            gw,
            builder,
            cycles,
            tls,
            stop,
            handshake,
            at,
            life,
        } = crate::keepalive::unbox(self);
        let service = crate::direct::ConnService { gw, conn };
        // The header read timeout, which also bounds protocol sniffing (`SniffDeadline`).
        let sniff = cycles.idle;
        match tls {
            Some(acceptor) => {
                // hyper's timeouts do not cover the TLS handshake (THREATS E4).
                let Ok(Ok(tls_stream)) =
                    tokio::time::timeout(handshake, acceptor.accept(stream)).await
                else {
                    service.gw.metrics.tls_handshake_failures.inc();
                    return None;
                };
                if tls_stream.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
                    // HTTP/1.1 chosen by ALPN: served in cycles, as plain HTTP/1 is (hyper's
                    // buffers given back while it idles; rustls keeps its own state).
                    return Some(boxed(|| {
                        crate::keepalive::serve(tls_stream, service, cycles, stop)
                    }));
                }
                let io = SniffDeadline::new(tls_stream, sniff);
                served(&builder, io, service, &life, stop).await;
                None
            }
            None => match crate::keepalive::is_http1(stream.get_ref(), sniff).await {
                // Plain HTTP/1: served in cycles that give hyper's buffers back while the
                // connection idles (`keepalive`).
                Some(true) => Some(boxed(|| {
                    crate::keepalive::serve(stream, service, cycles, stop)
                })),
                Some(false) => {
                    // What is left of the sniffing time the peek used.
                    let left = sniff.saturating_sub(at.elapsed());
                    let io = SniffDeadline::new(stream, left);
                    served(&builder, io, service, &life, stop).await;
                    None
                }
                None => None,
            },
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bounds the protocol-sniffing phase of a connection (THREATS E1). hyper-util's `auto`
/// builder reads the first bytes to choose HTTP/1 or HTTP/2 with no timeout of its own, and
/// hyper's header read timeout is only armed after that choice; a client that sends nothing,
/// or a prefix of the HTTP/2 preface, would otherwise hold the connection (and its cap slot)
/// forever. Until the bytes read so far decide the protocol (a byte that is not the preface's,
/// the whole preface, or EOF), a read still pending at the deadline fails with `TimedOut`;
/// after that this is a plain pass-through.
struct SniffDeadline<T> {
    inner: T,
    matched: usize,
    deadline: Option<crate::deadline::Deadline>,
}

impl<T> SniffDeadline<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        SniffDeadline {
            inner,
            matched: 0,
            deadline: Some(crate::deadline::Deadline::after(timeout)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SniffDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.deadline.is_none() {
            return res;
        }
        match &res {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                let mut decided = read.is_empty();
                for b in read {
                    if H2_PREFACE.get(this.matched) != Some(b) {
                        decided = true;
                        break;
                    }
                    this.matched += 1;
                    if this.matched == H2_PREFACE.len() {
                        decided = true;
                        break;
                    }
                }
                if decided {
                    this.deadline = None;
                }
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if std::future::Future::poll(Pin::new(d), cx).is_ready() {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no request within the header read timeout",
                        )));
                    }
                }
            }
        }
        res
    }
}

crate::keepalive::forward_write!([T: AsyncWrite + Unpin] SniffDeadline<T>, inner);

/// A connection served by hyper's `auto` builder, to its end or the end of its lifetime
/// (`lifetime`).
async fn served<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: crate::direct::ConnService,
    life: &crate::lifetime::Lifetime,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let live = Arc::new(crate::lifetime::Live::default());
    let service = crate::lifetime::Tracked {
        inner: service,
        live: live.clone(),
    };
    let conn = boxed(|| builder.serve_connection(TokioIo::new(io), service));
    crate::lifetime::drive(conn, live, life, stop).await;
}

async fn admin_loop(listener: TcpListener, gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin::handle(gw.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Periodic work off the request path: usage flush, bucket and budget cleanup, and one
/// aggregated `auth.denied` audit line per interval (never one line per request), also written
/// at shutdown so the last interval's attempts are not lost.
async fn upkeep(gw: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut last_flush = tokio::time::Instant::now();
    let mut reporter = {
        let snap = gw.snapshot();
        let usage_file = snap.keys.usage_file.clone();
        snap.feed
            .clone()
            .map(|feed| crate::sync::report::Reporter::new(feed, &usage_file))
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_denials: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut seconds = 0u64;
    let mut interval_start = seconds;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {
                // Written directly, not queued: the process may exit before the audit
                // writer thread drains its queue.
                if let Some(e) = denials(&gw, &mut last_denials, seconds - interval_start) {
                    let log = crate::audit::AuditLog::new(&gw.snapshot().keys.audit_log);
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(err) = log.append(&[e]) {
                            tracing::error!(error = %err, "audit write failed at shutdown");
                        }
                    })
                    .await;
                }
                flush_usage(&gw, reporter.as_mut()).await;
                if let Some(r) = reporter.as_mut() {
                    r.park(&gw).await;
                }
                return;
            }
        }
        seconds += 1;
        if last_flush.elapsed() >= gw.snapshot().touch_interval {
            last_flush = tokio::time::Instant::now();
            flush_usage(&gw, reporter.as_mut()).await;
        }
        if seconds.is_multiple_of(60) {
            gw.limiter.shrink();
            gw.failures.sweep(std::time::Instant::now());
            if let Some(e) = denials(&gw, &mut last_denials, seconds - interval_start) {
                gw.audit(e);
            }
            interval_start = seconds;
        }
    }
}

/// One `auth.denied` line: refused attempts by reason since `last` (the counters' previous
/// values), and by key id for keys that exist (revoked, expired, …). `None` when idle.
fn denials(
    gw: &Gateway,
    last: &mut std::collections::BTreeMap<&'static str, u64>,
    interval_seconds: u64,
) -> Option<Event> {
    let mut delta = serde_json::Map::new();
    for o in crate::error::Outcome::ALL
        .iter()
        .filter(|o| o.is_auth_failure())
    {
        let now = gw
            .metrics
            .auth_failures
            .with_label_values(&[o.as_str()])
            .get();
        let before = last.insert(o.as_str(), now).unwrap_or(0);
        if now > before {
            delta.insert(o.as_str().into(), (now - before).into());
        }
    }
    let keys: serde_json::Map<String, serde_json::Value> = gw
        .take_denied_keys()
        .into_iter()
        .map(|(id, n)| (id, n.into()))
        .collect();
    if delta.is_empty() && keys.is_empty() {
        return None;
    }
    let event = Event::new("auth.denied", "gateway")
        .with("interval_seconds", interval_seconds)
        .with("counts", delta);
    Some(if keys.is_empty() {
        event
    } else {
        event.with("key_ids", keys)
    })
}

/// Usage goes to Redis when `[redis]` is configured (fleet-wide sums), else to the shared file,
/// forensics sketches to the file beside the usage file; a gateway that follows a control
/// plane's feed reports both to it instead (`sync::report`), which adds them where it keeps its
/// own.
async fn flush_usage(gw: &Arc<Gateway>, reporter: Option<&mut crate::sync::report::Reporter>) {
    if let Some(r) = reporter {
        r.report(gw).await;
        return;
    }
    let g = gw.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = g.forensics.flush() {
            tracing::warn!(error = %e, "forensics flush failed; will retry");
        }
    })
    .await;
    if let Some(f) = gw.limiter.fleet() {
        if let Err(e) = crate::redis::usage::flush(f.client(), &gw.usage).await {
            tracing::warn!(error = %e, "usage flush to redis failed; will retry");
        }
        return;
    }
    let gw = gw.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = gw.usage.flush() {
            tracing::warn!(error = %e, "usage flush failed; will retry");
        }
    })
    .await;
}

/// `SIGUSR1` reopens the access-log file (rotation: `mv` the file, then signal).
fn reopen_on_sigusr1(file: Option<crate::access::FileSink>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGUSR1 handler; the access log will not reopen");
            return;
        }
    };
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match &file {
                Some(f) => f.reopen(),
                None => tracing::info!("SIGUSR1: no [access_log] file to reopen"),
            }
        }
    });
}

/// Install the SIGTERM/SIGINT handlers now and return a future that resolves on either (no
/// reload handling; the demo and the control plane). Installed before the caller announces
/// itself, so a signal sent the moment "listening" is read never meets the default action.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            },
            (Ok(mut only), Err(_)) | (Err(_), Ok(mut only)) => {
                only.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot install signal handlers; runs until killed");
                std::future::pending::<()>().await
            }
        }
    }
}

/// The signals `serve` reacts to. `None` when they cannot be installed: the process then
/// runs until killed, which is logged.
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Signals(Some((term, int, hup))),
            _ => {
                tracing::error!("cannot install signal handlers");
                Signals(None)
            }
        }
    }

    /// Wait for SIGTERM/SIGINT; reload on SIGHUP meanwhile.
    async fn until_stop(&mut self, gw: &Gateway, config: &ConfigFile) {
        let Some((term, int, hup)) = &mut self.0 else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => config.reload(gw, "sighup"),
            }
        }
    }

    /// Wait for a second SIGTERM/SIGINT (an operator who wants it over now); forever when
    /// there are no handlers.
    async fn again(&mut self) {
        match &mut self.0 {
            Some((term, int, _)) => tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            },
            None => std::future::pending().await,
        }
    }
}

/// The lame-duck phase between SIGTERM and the drain: `/readyz` turns 503 at once, so load
/// balancers and Kubernetes endpoints stop sending new connections, while the listeners keep
/// accepting and serving for `[server] shutdown_delay_ms` (traffic already on its way, and
/// balancers that notice late, get answers instead of refused connections). A second signal
/// ends the delay early.
async fn lame_duck(gw: &Gateway, signals: &mut Signals) {
    gw.begin_stopping();
    crate::systemd::tell("STOPPING=1");
    let delay = Duration::from_millis(gw.snapshot().server.shutdown_delay_ms);
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        delay_ms = delay.as_millis() as u64,
        "shutting down: readyz now 503, still accepting until the delay ends"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = signals.again() => tracing::info!("second stop signal: ending the shutdown delay"),
    }
}
