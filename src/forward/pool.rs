//! The idle-connection pool of one upstream target, and the task that drives each connection.
//!
//! Lean on purpose (it replaced hyper-util's legacy pool, whose checkout, waiter and per-request
//! spawn machinery showed in the gateway's profile): a request takes an idle HTTP/1.1 sender
//! (`take`) or gets a new connection (`adopt`), and its response body gives the sender back
//! (`Lease::release`) once read to its end, so a connection is never shared mid-response.
//! The idle lists are sharded by thread: a connection goes back to the shard of the thread
//! that opened it (where its driver task runs), and a thread takes from its own shard first, so
//! with one runtime per core each worker mostly takes its own lock, uncontended, and drives
//! its own connections; it takes from another shard only before it would open a connection.
//! A connection idle longer than `pool_idle_timeout_ms` is closed by its own driver task, so a
//! quiet pool shrinks without a sweeper.

use super::body::GuardedBody;
use hyper::client::conn::http1::SendRequest;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Idle connections kept per target (all shards together); more are closed when released.
const MAX_IDLE_PER_TARGET: usize = 1024;

/// `IdleClock` value while a request holds the connection.
const BUSY: u64 = u64::MAX;

/// When the connection last went idle, in ms since the pool's epoch, or `BUSY`. Shared by the
/// pool entry and the connection's driver task, which closes the connection once it has been
/// idle for the timeout.
struct IdleClock(AtomicU64);

struct Conn {
    sender: SendRequest<GuardedBody>,
    clock: Arc<IdleClock>,
    /// The shard of the thread that opened it (where its driver task was spawned): it goes
    /// back there, so with one runtime per core a connection stays with its core.
    home: usize,
}

/// A connection held by one request; `release` returns it to the pool, dropping it closes it.
pub(super) struct Lease {
    conn: Conn,
    pool: Arc<IdlePool>,
}

impl Lease {
    pub(super) fn sender(&mut self) -> &mut SendRequest<GuardedBody> {
        &mut self.conn.sender
    }

    /// The exchange on this connection is over (response body read to its end).
    pub(super) fn release(self) {
        self.pool.put(self.conn);
    }
}

/// Thread-to-shard assignment: each thread takes the next index on first use.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

pub(super) struct IdlePool {
    shards: Box<[Mutex<Vec<Conn>>]>,
    per_shard: usize,
    epoch: Instant,
    idle_timeout: Duration,
}

impl IdlePool {
    pub(super) fn new(idle_timeout: Duration) -> IdlePool {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        IdlePool {
            shards: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            per_shard: MAX_IDLE_PER_TARGET.div_ceil(n),
            epoch: Instant::now(),
            idle_timeout,
        }
    }

    /// This thread's shard.
    fn local(&self) -> usize {
        SHARD.with(|s| *s) % self.shards.len()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The most recently used idle connection that can take a request now: from this
    /// thread's shard, else from another (a new connection costs far more than a connection
    /// driven from another thread).
    pub(super) fn take(self: &Arc<Self>) -> Option<Lease> {
        let local = self.local();
        let n = self.shards.len();
        let conn = (0..n).find_map(|i| self.take_from((local + i) % n))?;
        conn.clock.0.store(BUSY, Ordering::Relaxed);
        Some(Lease {
            conn,
            pool: Arc::clone(self),
        })
    }

    /// Closed connections (the upstream or the idle timer ended them) are dropped on the way;
    /// so is one that is open but not ready, which only happens when the upstream answered
    /// before our request body was all sent (it stays busy until it is): rare, and waiting
    /// for it could stall this request behind another client's upload.
    fn take_from(&self, shard: usize) -> Option<Conn> {
        let mut idle = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        conn.clock.0.store(self.now_ms(), Ordering::Relaxed);
        let mut idle = self.shards[conn.home]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.per_shard {
            idle.push(conn);
        }
    }

    /// A new connection: its driver runs as its own task on the current runtime (until the
    /// upstream closes it, an error, the idle timeout, or every sender is gone), and the
    /// sender is leased to the request that opened it.
    pub(super) fn adopt<C>(
        self: &Arc<Self>,
        sender: SendRequest<GuardedBody>,
        connection: C,
    ) -> Lease
    where
        C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let clock = Arc::new(IdleClock(AtomicU64::new(BUSY)));
        tokio::spawn(drive(
            connection,
            Arc::clone(&clock),
            self.epoch,
            self.idle_timeout,
        ));
        Lease {
            conn: Conn {
                sender,
                clock,
                home: self.local(),
            },
            pool: Arc::clone(self),
        }
    }
}

/// Drive the connection; close it (by returning, which drops it) once idle for `timeout`.
/// The timer fires at most once per `timeout` per connection, whatever the request rate.
async fn drive<C>(connection: C, clock: Arc<IdleClock>, epoch: Instant, timeout: Duration)
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let mut connection = std::pin::pin!(connection);
    let timer = tokio::time::sleep(timeout);
    let mut timer = std::pin::pin!(timer);
    let timeout_ms = timeout.as_millis() as u64;
    loop {
        tokio::select! {
            biased;
            // Upstream closed, protocol error or no sender left: the connection is over.
            _ = &mut connection => return,
            () = &mut timer => {
                let since = clock.0.load(Ordering::Relaxed);
                let idle_for = if since == BUSY {
                    0
                } else {
                    (epoch.elapsed().as_millis() as u64).saturating_sub(since)
                };
                if since != BUSY && idle_for >= timeout_ms {
                    // A request that leased it in this instant gets its request back unsent
                    // (hyper returns queued requests when the connection drops) and retries.
                    return;
                }
                // At least 1 ms: a zero timeout must not spin while a request holds the connection.
                let wait = Duration::from_millis((timeout_ms - idle_for).max(1));
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
        }
    }
}
