//! The idle-connection pool of one upstream target.
//!
//! A request takes an idle connection (`take`) or brings a new one (`lease`), and its
//! response body gives the connection back (`Lease::release`) once the exchange is complete,
//! so a connection is never shared mid-response. The idle lists are sharded by thread: a
//! connection goes back to the shard of the thread that opened it (its socket is registered
//! with that thread's runtime), and a thread takes from its own shard first, so with one
//! runtime per core each worker mostly takes its own lock, uncontended, and its own sockets'
//! wake-ups; it takes from another shard only before it would open a connection.
//!
//! An idle connection is checked before reuse (the upstream may have closed it meanwhile:
//! `Conn::idle_and_open`), and one idle longer than `pool_idle_timeout_ms` is closed: on the
//! way when a request looks for one, and by a sweeper task per shard, which runs only while
//! the shard holds idle connections and wakes when the oldest of them is due.

use super::conn::Conn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Idle connections kept per target (all shards together); more are closed when released.
const MAX_IDLE_PER_TARGET: usize = 1024;

struct Idle {
    conn: Conn,
    /// When it went idle, in ms since the pool's epoch.
    since: u64,
    home: usize,
}

#[derive(Default)]
struct Shard {
    /// Oldest first: connections are pushed as they go idle and taken from the end.
    idle: Vec<Idle>,
    /// A sweeper task is running for this shard.
    sweeping: bool,
}

/// A connection held by one request; `release` returns it to the pool, dropping it closes it.
pub(super) struct Lease {
    pub conn: Conn,
    home: usize,
    pool: Arc<IdlePool>,
}

impl Lease {
    /// The exchange on this connection is over and it can carry another.
    pub(super) fn release(self) {
        self.pool.put(self.conn, self.home);
    }
}

/// Thread-to-shard assignment: each thread takes the next index on first use.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

pub(super) struct IdlePool {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    epoch: Instant,
    idle_timeout: Duration,
}

impl IdlePool {
    pub(super) fn new(idle_timeout: Duration) -> IdlePool {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        IdlePool {
            shards: (0..n).map(|_| Mutex::default()).collect(),
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
        self.ms_at(Instant::now())
    }

    /// The pool's millisecond of `at`.
    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, idle: &Idle, now: u64) -> bool {
        now.saturating_sub(idle.since) >= self.idle_timeout.as_millis() as u64
    }

    /// The most recently used idle connection that is still open: from this thread's shard,
    /// else from another (a new connection costs far more than another thread's socket).
    /// `now`: the caller's reading of the clock (the exchange's start), not one more.
    pub(super) fn take(self: &Arc<Self>, now: Instant) -> Option<Lease> {
        let local = self.local();
        let n = self.shards.len();
        let now = self.ms_at(now);
        (0..n).find_map(|i| {
            let shard = (local + i) % n;
            let mut s = self.shard(shard);
            while let Some(mut idle) = s.idle.pop() {
                if self.expired(&idle, now) {
                    // Everything below it went idle earlier still.
                    s.idle.clear();
                    return None;
                }
                if idle.conn.idle_and_open() {
                    return Some(Lease {
                        conn: idle.conn,
                        home: idle.home,
                        pool: Arc::clone(self),
                    });
                }
            }
            None
        })
    }

    /// A new connection, opened by this thread, leased to the request that opened it.
    pub(super) fn lease(self: &Arc<Self>, conn: Conn) -> Lease {
        Lease {
            conn,
            home: self.local(),
            pool: Arc::clone(self),
        }
    }

    fn put(self: &Arc<Self>, conn: Conn, home: usize) {
        let since = self.now_ms();
        let mut s = self.shard(home);
        if s.idle.len() >= self.per_shard {
            return;
        }
        s.idle.push(Idle { conn, since, home });
        if !s.sweeping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                s.sweeping = true;
                runtime.spawn(sweep(Arc::downgrade(self), home));
            }
        }
    }
}

/// Close a shard's connections as they pass the idle timeout; ends when the shard is empty
/// (the next `put` starts another) or the pool is gone (a reload replaced the upstream).
async fn sweep(pool: Weak<IdlePool>, shard: usize) {
    loop {
        let wait = {
            let Some(pool) = pool.upgrade() else { return };
            let now = pool.now_ms();
            let mut s = pool.shard(shard);
            let keep = s.idle.iter().position(|i| !pool.expired(i, now));
            let expired = keep.unwrap_or(s.idle.len());
            s.idle.drain(..expired);
            match s.idle.first() {
                None => {
                    s.sweeping = false;
                    return;
                }
                Some(oldest) => {
                    let due = oldest.since + pool.idle_timeout.as_millis() as u64;
                    // At least 1 ms: a zero timeout must not spin.
                    Duration::from_millis(due.saturating_sub(now).max(1))
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}
