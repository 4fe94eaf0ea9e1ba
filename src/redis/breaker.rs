//! Circuit breaker: requests never queue behind a dead or slow Redis.
//!
//! Closed → (after `threshold` consecutive failures or timeouts) Open for `cooldown` → one
//! caller gets a half-open probe while the rest keep failing fast → success closes, failure
//! re-opens for another cooldown. Transitions are returned to the caller (who logs and sets
//! `keygate_redis_up`), so each transition is logged exactly once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Just opened: Redis is considered down.
    Opened,
    /// Just closed after being open: Redis is back.
    Closed,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which the circuit is open; 0 when closed.
    open_until: AtomicU64,
    open: AtomicBool,
    probing: AtomicBool,
}

/// Permission to try a command; `probe` says it is the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    pub probe: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// May a command be sent now? `None`: fail fast.
    pub fn permit(&self) -> Option<Permit> {
        if !self.open.load(Ordering::Acquire) {
            return Some(Permit { probe: false });
        }
        if self.now_ns() < self.open_until.load(Ordering::Acquire) {
            return None;
        }
        // Half-open: exactly one probe at a time.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Permit { probe: true })
    }

    pub fn success(&self, permit: Permit) -> Option<Transition> {
        self.failures.store(0, Ordering::Release);
        if permit.probe {
            self.probing.store(false, Ordering::Release);
        }
        self.open
            .swap(false, Ordering::AcqRel)
            .then_some(Transition::Closed)
    }

    pub fn failure(&self, permit: Permit) -> Option<Transition> {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if permit.probe || n >= self.threshold {
            self.open_until.store(
                self.now_ns() + self.cooldown.as_nanos() as u64,
                Ordering::Release,
            );
            let was_open = self.open.swap(true, Ordering::AcqRel);
            if permit.probe {
                self.probing.store(false, Ordering::Release);
            }
            return (!was_open).then_some(Transition::Opened);
        }
        None
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls (bounded) until the cooldown is over and a permit is handed out.
    fn wait_for_probe(b: &Breaker) -> Permit {
        let t = Instant::now();
        loop {
            if let Some(p) = b.permit() {
                return p;
            }
            assert!(t.elapsed() < Duration::from_secs(2));
            std::thread::yield_now();
        }
    }

    #[test]
    fn opens_after_threshold_probes_once_and_recovers() {
        let b = Breaker::new(3, Duration::from_millis(30));
        let p = b.permit().unwrap();
        assert_eq!(b.failure(p), None);
        assert_eq!(b.failure(p), None);
        assert_eq!(b.failure(p), Some(Transition::Opened));
        assert!(b.permit().is_none(), "fails fast while open");
        let probe = wait_for_probe(&b);
        assert!(probe.probe);
        assert!(b.permit().is_none(), "only one probe at a time");
        assert_eq!(b.failure(probe), None, "already open: no second transition");
        assert!(b.permit().is_none());
        let probe = wait_for_probe(&b);
        assert_eq!(b.success(probe), Some(Transition::Closed));
        assert_eq!(b.permit(), Some(Permit { probe: false }));
        assert_eq!(b.success(Permit { probe: false }), None);
    }
}
