//! The shared Redis client: a small pool of connections to the primary, each command bounded
//! by `command_timeout_ms`, guarded by the circuit breaker, timed into
//! `keygate_redis_command_seconds`, with `keygate_redis_up` and one log line per transition.
//!
//! With `sentinels` set the primary's address comes from `SENTINEL get-master-addr-by-name`;
//! any failure (connection error, timeout, `READONLY` from a demoted primary, `NOREPLICAS`
//! from one cut off from its replicas) forgets it and bumps a generation so every pooled
//! connection to the old primary is dropped on next use: a failover is followed without a
//! restart.

use super::breaker::{Breaker, Permit, Transition};
use super::conn::Conn;
use super::resp::Value;
use super::{RedisError, Settings, Target};
use prometheus::{Histogram, IntGauge};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

/// Connections per gateway: enough for lease refills of many hot keys at once.
const POOL: usize = 8;
/// Consecutive failures that open the circuit.
pub const BREAKER_FAILURES: u32 = 3;
/// How long the circuit stays open before a half-open probe.
pub const BREAKER_COOLDOWN: Duration = Duration::from_millis(1000);

/// The collectors the client updates (registered only when `[redis]` is configured).
#[derive(Clone, Debug)]
pub struct RedisMetrics {
    pub up: IntGauge,
    pub command_seconds: Histogram,
}

struct Slot {
    conn: Option<Conn>,
    generation: u64,
}

pub struct Client {
    settings: Settings,
    slots: Vec<AsyncMutex<Slot>>,
    next: AtomicUsize,
    /// The primary's `host:port` (fixed, or as the sentinels last said).
    primary: Mutex<Option<String>>,
    generation: AtomicU64,
    breaker: Breaker,
    metrics: RedisMetrics,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Client {
    pub fn new(settings: Settings, metrics: RedisMetrics) -> Arc<Client> {
        Client::with_pool(settings, metrics, POOL)
    }

    /// A client of `pool` connections. One connection keeps a sequence of commands on one
    /// connection (the store's write then `WAIT`, which waits only for that connection's
    /// writes).
    pub fn with_pool(settings: Settings, metrics: RedisMetrics, pool: usize) -> Arc<Client> {
        let pool = pool.max(1);
        let primary = match &settings.target {
            Target::Direct { host, port } => Some(format!("{host}:{port}")),
            Target::Sentinel { .. } => None,
        };
        Arc::new(Client {
            slots: (0..pool)
                .map(|_| {
                    AsyncMutex::new(Slot {
                        conn: None,
                        generation: 0,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            primary: Mutex::new(primary),
            generation: AtomicU64::new(0),
            breaker: Breaker::new(BREAKER_FAILURES, BREAKER_COOLDOWN),
            settings,
            metrics,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    /// True while the circuit is closed (Redis believed reachable).
    pub fn is_up(&self) -> bool {
        !self.breaker.is_open()
    }

    /// One command. `Ok(Value::Error)` is a command-level error from a live server; errors
    /// that mean "this is not a usable primary" (`READONLY`, `LOADING`, `MASTERDOWN`,
    /// `NOAUTH`, `WRONGPASS`, `NOREPLICAS`: `not_a_primary`) count as failures like timeouts
    /// and closed connections do.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Value, RedisError> {
        // Held across the call: if this future is dropped first, the permit is dropped
        // unreported, which hands a half-open probe back to the next caller (`breaker`).
        let Some(permit) = self.breaker.permit() else {
            return Err(RedisError::CircuitOpen);
        };
        let started = Instant::now();
        let result = self.call_once(args).await;
        self.metrics
            .command_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                self.on_success(permit);
                Ok(v)
            }
            Err(e) => {
                self.on_failure(permit, &e);
                Err(e)
            }
        }
    }

    fn on_success(&self, permit: Permit<'_>) {
        if self.breaker.success(permit) == Some(Transition::Closed) {
            tracing::info!("redis reachable again: fleet-wide limits resume");
        }
        self.metrics.up.set(1);
    }

    fn on_failure(&self, permit: Permit<'_>, e: &RedisError) {
        if matches!(self.settings.target, Target::Sentinel { .. }) {
            // Ask the sentinels again next time, and retire every pooled connection.
            if let Ok(mut p) = self.primary.lock() {
                *p = None;
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        if self.breaker.failure(permit) == Some(Transition::Opened) {
            self.metrics.up.set(0);
            tracing::warn!(error = %e, "redis unreachable: circuit open, limits follow limits.on_redis_down");
        }
    }

    async fn call_once(&self, args: &[&[u8]]) -> Result<Value, RedisError> {
        let timeout = self.settings.command_timeout;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut guard = None;
        let pool = self.slots.len();
        for i in 0..pool {
            if let Ok(g) = self.slots[(start + i) % pool].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut slot = match guard {
            Some(g) => g,
            // All busy: wait for one, but never longer than a command may take.
            None => tokio::time::timeout(timeout, self.slots[start % pool].lock())
                .await
                .map_err(|_| RedisError::Timeout)?,
        };
        let generation = self.generation.load(Ordering::Acquire);
        if slot.generation != generation {
            slot.conn = None;
        }
        // The connection is out of the slot while its command is in flight and goes back only
        // once the reply has been read: a call whose future is dropped half-way (the HTTP
        // client went away, a caller's timeout) drops the connection with it, so its reply is
        // never read by the next caller. Moving it costs no allocation.
        let mut conn = match slot.conn.take() {
            Some(c) => c,
            None => {
                let addr = self.primary_addr().await?;
                let c = Conn::open(&addr, &self.settings).await?;
                slot.generation = generation;
                c
            }
        };
        match conn.call_within(timeout, args).await {
            // Not a usable primary: the connection is dropped here, not put back.
            Ok(Value::Error(e)) if not_a_primary(&e) => {
                Err(RedisError::Reply(first_word(&e).to_owned()))
            }
            Ok(v) => {
                slot.conn = Some(conn);
                Ok(v)
            }
            // A timed-out or broken connection may hold an unread reply: dropped, never reused.
            Err(e) => Err(e),
        }
    }

    /// The primary's address: fixed, cached, or asked of the sentinels in order.
    async fn primary_addr(&self) -> Result<String, RedisError> {
        if let Some(a) = self.primary.lock().ok().and_then(|p| p.clone()) {
            return Ok(a);
        }
        let Target::Sentinel { sentinels, master } = &self.settings.target else {
            return Err(RedisError::NoMaster(String::new()));
        };
        for s in sentinels {
            let asked = async {
                let mut c = Conn::open_raw(s, &self.settings, false).await?;
                c.call_within(
                    self.settings.command_timeout,
                    &[b"SENTINEL", b"get-master-addr-by-name", master.as_bytes()],
                )
                .await
            };
            if let Ok(Value::Array(parts)) = asked.await {
                if let [host, port] = parts.as_slice() {
                    if let (Some(h), Some(p)) = (host.as_text(), port.as_int()) {
                        let addr = format!("{h}:{p}");
                        if let Ok(mut cached) = self.primary.lock() {
                            if cached.as_deref() != Some(addr.as_str()) {
                                tracing::info!(primary = %addr, "redis primary discovered via sentinel");
                            }
                            *cached = Some(addr.clone());
                        }
                        return Ok(addr);
                    }
                }
            }
        }
        Err(RedisError::NoMaster(master.clone()))
    }

    /// Keep `keygate_redis_up` honest and recover without traffic: until Redis has answered
    /// once, and while the circuit is open, PING every half cooldown (when open, that is the
    /// half-open probe). Runs until the process ends.
    pub fn spawn_health(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BREAKER_COOLDOWN / 2);
            loop {
                tick.tick().await;
                if me.breaker.is_open() || me.metrics.up.get() == 0 {
                    let _ = me.call(&[b"PING"]).await;
                }
            }
        });
    }
}

fn first_word(e: &str) -> &str {
    e.split_whitespace().next().unwrap_or("ERR")
}

/// Replies that mean "do not use this node as the primary now": the connection is dropped,
/// the call counts as a failure, and with sentinels the primary is asked for again.
/// `NOREPLICAS` is a primary with `min-replicas-to-write` cut off from its replicas, such as
/// an old primary on the wrong side of a partition after a failover: its writes are refused
/// (Redis 7 keeps the code first in a script's error too), and only the sentinels know the
/// new primary.
fn not_a_primary(e: &str) -> bool {
    matches!(
        first_word(e),
        "READONLY" | "LOADING" | "MASTERDOWN" | "NOAUTH" | "WRONGPASS" | "NOREPLICAS"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::fake::{self, FakeServer};
    use std::sync::atomic::AtomicBool;
    use tokio::sync::Notify;

    fn client(settings: Settings, pool: usize) -> Arc<Client> {
        let m = crate::metrics::Metrics::new(0);
        Client::with_pool(settings, m.redis_metrics(), pool)
    }

    /// Polls `f` (every 2 ms) until it returns `Some`, failing with `what` after 3 s.
    async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// A call given up mid-way (its future dropped: the HTTP client went away, a caller's
    /// timeout) leaves its reply unread: the next caller of that connection must not read it.
    #[tokio::test]
    async fn a_cancelled_call_never_leaves_its_reply_to_the_next_caller() {
        // Every reply echoes the command's second argument, so a reply read by the wrong call
        // shows; the first is held until the first call has been given up.
        let release = Arc::new(Notify::new());
        let first = Arc::new(AtomicBool::new(true));
        let server = FakeServer::start({
            let release = release.clone();
            move |args| {
                let hold = first.swap(false, Ordering::AcqRel);
                let release = release.clone();
                Box::pin(async move {
                    if hold {
                        release.notified().await;
                    }
                    Some(fake::bulk(args.get(1).map_or(&[][..], Vec::as_slice)))
                })
            }
        })
        .await;
        let c = client(fake::direct(&server, Duration::from_secs(5)), 1);
        let given_up =
            tokio::time::timeout(Duration::from_millis(10), c.call(&[b"GET", b"a"])).await;
        assert!(given_up.is_err(), "the held reply arrived: {given_up:?}");
        release.notify_one();
        let b = c.call(&[b"GET", b"b"]).await.unwrap();
        assert_eq!(
            b,
            Value::Bulk(b"b".to_vec()),
            "the second call read the first call's reply"
        );
        assert_eq!(
            c.call(&[b"GET", b"c"]).await.unwrap(),
            Value::Bulk(b"c".to_vec())
        );
    }

    /// THREATS L1: the half-open probe's caller goes away mid-call while Redis is silent;
    /// once Redis answers again the circuit must close without a restart.
    #[tokio::test]
    async fn a_probe_given_up_mid_call_does_not_keep_the_circuit_open() {
        let answering = Arc::new(AtomicBool::new(false));
        let server = FakeServer::start({
            let answering = answering.clone();
            move |_| {
                let answering = answering.load(Ordering::Acquire);
                Box::pin(async move {
                    if !answering {
                        std::future::pending::<()>().await;
                    }
                    Some(b"+PONG\r\n".to_vec())
                })
            }
        })
        .await;
        let mut c = client(fake::direct(&server, Duration::from_millis(50)), 1);
        // A short cooldown so the test does not wait for the production one.
        if let Some(c) = Arc::get_mut(&mut c) {
            c.breaker = Breaker::new(BREAKER_FAILURES, Duration::from_millis(20));
        }
        for _ in 0..BREAKER_FAILURES {
            let r = c.call(&[b"PING"]).await;
            assert!(matches!(r, Err(RedisError::Timeout)), "{r:?}");
        }
        assert!(!c.is_up());
        let c = &c;
        eventually("no half-open probe was handed out", || async move {
            match tokio::time::timeout(Duration::from_millis(10), c.call(&[b"PING"])).await {
                // The probe, given up by its caller.
                Err(_) => Some(()),
                Ok(Err(RedisError::CircuitOpen)) => None,
                other => panic!("{other:?}"),
            }
        })
        .await;
        answering.store(true, Ordering::Release);
        let v = eventually(
            "the circuit stayed open after its probe was dropped",
            || async move {
                match c.call(&[b"PING"]).await {
                    Err(RedisError::CircuitOpen) => None,
                    other => Some(other),
                }
            },
        )
        .await;
        assert_eq!(v.unwrap(), Value::Simple("PONG".into()));
        assert!(c.is_up());
    }

    /// A primary cut off from its replicas (`min-replicas-to-write`: an old primary on the
    /// wrong side of a partition after a failover) refuses writes with `-NOREPLICAS`: the
    /// client must ask the sentinels again instead of writing to it forever.
    #[tokio::test]
    async fn noreplicas_makes_the_client_ask_the_sentinels_again() {
        let primary = FakeServer::start(|_| {
            Box::pin(async { Some(b"-NOREPLICAS Not enough good replicas to write.\r\n".to_vec()) })
        })
        .await;
        let asked = Arc::new(AtomicUsize::new(0));
        let (host, port) = (
            primary.addr.ip().to_string(),
            primary.addr.port().to_string(),
        );
        let sentinel = FakeServer::start({
            let asked = asked.clone();
            move |args| {
                let reply = if args.len() == 3
                    && args[0].eq_ignore_ascii_case(b"SENTINEL")
                    && args[1].eq_ignore_ascii_case(b"get-master-addr-by-name")
                    && args[2] == b"mymaster"
                {
                    asked.fetch_add(1, Ordering::AcqRel);
                    let mut r = b"*2\r\n".to_vec();
                    r.extend(fake::bulk(host.as_bytes()));
                    r.extend(fake::bulk(port.as_bytes()));
                    r
                } else {
                    b"-ERR unknown command\r\n".to_vec()
                };
                Box::pin(async move { Some(reply) })
            }
        })
        .await;
        let c = client(
            fake::settings(
                Target::Sentinel {
                    sentinels: vec![sentinel.host_port()],
                    master: "mymaster".into(),
                },
                Duration::from_secs(5),
            ),
            1,
        );
        let first = c.call(&[b"SET", b"k", b"v"]).await;
        assert!(
            matches!(&first, Err(RedisError::Reply(w)) if w == "NOREPLICAS"),
            "{first:?}"
        );
        assert_eq!(asked.load(Ordering::Acquire), 1);
        let _ = c.call(&[b"SET", b"k", b"v"]).await;
        assert_eq!(
            asked.load(Ordering::Acquire),
            2,
            "the refused write did not send the client back to the sentinels"
        );
    }
}
