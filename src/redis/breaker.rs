//! Circuit breaker: requests never queue behind a dead or slow Redis.
//!
//! Closed → (after `threshold` consecutive failures or timeouts) Open for `cooldown` → one
//! caller gets a half-open probe while the rest keep failing fast → success closes, failure
//! re-opens for another cooldown. Transitions are returned to the caller (who logs and sets
//! `keygate_redis_up`), so each transition is logged exactly once.
//!
//! A probe whose outcome is never reported (its caller's future dropped: a client that went
//! away during an outage) hands the half-open trial back when its `Permit` is dropped, so the
//! next caller (or the health task) probes: a lost probe never keeps the circuit open
//! (THREATS L1, recovery without restart).

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

/// Permission to try a command, reported with `Breaker::success` or `Breaker::failure`. The
/// half-open trial's permit holds the breaker's probe flag and clears it when dropped
/// unreported.
#[derive(Debug)]
#[must_use]
pub struct Permit<'a> {
    probe: Option<&'a AtomicBool>,
}

impl Permit<'_> {
    /// Is this the half-open trial?
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // Unreported (the caller's future was dropped): the circuit stays open, but the next
        // caller may probe at once instead of nobody ever again.
        if let Some(probing) = self.probe.take() {
            probing.store(false, Ordering::Release);
        }
    }
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
    pub fn permit(&self) -> Option<Permit<'_>> {
        if !self.open.load(Ordering::Acquire) {
            return Some(Permit { probe: None });
        }
        if self.now_ns() < self.open_until.load(Ordering::Acquire) {
            return None;
        }
        // Half-open: exactly one probe at a time.
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Permit {
                probe: Some(&self.probing),
            })
    }

    pub fn success(&self, mut permit: Permit<'_>) -> Option<Transition> {
        // Reported: the drop below must not clear the flag; it is cleared once the state is.
        let probe = permit.probe.take().is_some();
        self.failures.store(0, Ordering::Release);
        if probe {
            self.probing.store(false, Ordering::Release);
        }
        self.open
            .swap(false, Ordering::AcqRel)
            .then_some(Transition::Closed)
    }

    pub fn failure(&self, mut permit: Permit<'_>) -> Option<Transition> {
        let probe = permit.probe.take().is_some();
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if probe || n >= self.threshold {
            self.open_until.store(
                self.now_ns() + self.cooldown.as_nanos() as u64,
                Ordering::Release,
            );
            let was_open = self.open.swap(true, Ordering::AcqRel);
            // Only after the new cooldown is set: no second probe before it has passed.
            if probe {
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
    fn wait_for_probe(b: &Breaker) -> Permit<'_> {
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
        assert_eq!(b.failure(b.permit().unwrap()), None);
        assert_eq!(b.failure(b.permit().unwrap()), None);
        assert_eq!(b.failure(b.permit().unwrap()), Some(Transition::Opened));
        assert!(b.permit().is_none(), "fails fast while open");
        let probe = wait_for_probe(&b);
        assert!(probe.is_probe());
        assert!(b.permit().is_none(), "only one probe at a time");
        assert_eq!(b.failure(probe), None, "already open: no second transition");
        assert!(b.permit().is_none());
        let probe = wait_for_probe(&b);
        assert_eq!(b.success(probe), Some(Transition::Closed));
        let p = b.permit().unwrap();
        assert!(!p.is_probe());
        assert_eq!(b.success(p), None);
    }

    /// THREATS L1: the probe's caller went away (its future dropped: no `success` nor
    /// `failure` is ever reported). Another caller must be able to probe, or the circuit
    /// never closes again, not even for the health task.
    #[test]
    fn a_probe_whose_caller_went_away_lets_another_caller_probe() {
        let b = Breaker::new(1, Duration::from_millis(30));
        assert_eq!(b.failure(b.permit().unwrap()), Some(Transition::Opened));
        {
            let lost = wait_for_probe(&b);
            assert!(lost.is_probe());
        }
        let next = b.permit();
        assert!(
            next.as_ref().is_some_and(Permit::is_probe),
            "no probe after the first was lost: {next:?}"
        );
        assert_eq!(b.success(next.unwrap()), Some(Transition::Closed));
    }
}
