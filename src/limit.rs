//! Rate limits: plans, per-lineage token buckets (GCRA, one `gcra::Table` per bucket shape),
//! the choice between node-local and fleet-wide (Redis) buckets, and the per-client
//! failed-authentication budget.
//!
//! `Limiter` is what the request path calls. With `[limits] backend = "local"` (the default)
//! it is the node's own `Buckets`. With `backend = "redis"` it asks `redis::lease::Fleet`
//! (fleet-wide GCRA served from token leases: see that module for the accuracy bound), and
//! while Redis is unreachable (circuit open, timeout, error) it applies `on_redis_down`:
//! `local` (these per-node buckets), `fail_open` (admit, no `RateLimit-*` headers) or
//! `fail_closed` (429), counting each such decision in `keygate_limiter_fallback_total`.
//! Quotas (`redis::quota`) always live in Redis; while it is down `fail_closed` refuses and
//! the other modes admit (a quota cannot be counted per node).
//!
//! Buckets are keyed by the key's *lineage* (the first id of its rotation chain), so a rotated
//! key and its successor share one budget during the grace window. Limiters live outside the
//! config snapshot and are reused across reloads while a quota is unchanged, so a reload never
//! refills anyone's bucket. Buckets are created only after successful authentication, so random
//! keys cannot grow the map. All timing uses a monotonic clock: a wall-clock jump changes
//! nothing.

use crate::boxed::boxed;
use crate::gcra::{Gcra, Table, Take};
use crate::keys::compact::KeyId;
use crate::redis::lease::{Budget, Fleet};
use crate::redis::quota::Quota as CalendarQuota;
use dashmap::DashMap;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A parsed rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// "100/s", "6000/m", "10/h" (also "100/sec", "100/min", "100/hour").
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("bad rate {s:?}: use N/s, N/m or N/h, e.g. \"100/s\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("bad rate {s:?}: must allow at least 1 request"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

/// A bucket shape: refill rate and burst size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub rate: Rate,
    pub burst: u32,
}

impl Shape {
    pub fn new(rate: Rate, burst: Option<u32>) -> Shape {
        Shape {
            rate,
            burst: burst.unwrap_or(rate.count).max(1),
        }
    }

    /// Seconds to refill the whole burst (the `w` of `RateLimit-Policy`), at least 1.
    pub fn window_secs(&self) -> u64 {
        (self.rate.per.as_secs_f64() * f64::from(self.burst) / f64::from(self.rate.count))
            .ceil()
            .max(1.0) as u64
    }

    /// The GCRA parameters: nanoseconds per token (at least 1) and the burst's tolerance.
    /// The interval is rounded up, never down: a truncated one admits more than configured
    /// (`3000000/s` → 333 ns → 3,003,003/s). The Redis buckets send this same interval
    /// (`redis::lease`), so both backends admit the same.
    pub fn gcra(&self) -> Gcra {
        let t = self
            .rate
            .per
            .as_nanos()
            .div_ceil(u128::from(self.rate.count));
        let t = u64::try_from(t).unwrap_or(u64::MAX).max(1);
        Gcra {
            t,
            tau: t.saturating_mul(u64::from(self.burst.max(1) - 1)),
        }
    }
}

/// What the bucket said, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (allowed) or a request may pass (denied).
    pub reset_secs: u64,
    /// The policy window for `RateLimit-Policy: <limit>;w=<window>`: seconds to refill the
    /// whole burst, or the quota period.
    pub window_secs: u64,
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

impl Verdict {
    /// `RateLimit-*` (draft-ietf-httpapi-ratelimit-headers) from the bucket's (or, when it
    /// refused, the quota's) verdict; `RateLimit-Policy: <limit>;w=<seconds>` names the window.
    pub fn headers(&self, h: &mut HeaderMap) {
        h.insert(
            RATELIMIT_LIMIT.clone(),
            crate::ascii::number_value(self.limit.into()),
        );
        h.insert(
            RATELIMIT_REMAINING.clone(),
            crate::ascii::number_value(self.remaining.into()),
        );
        h.insert(
            RATELIMIT_RESET.clone(),
            crate::ascii::number_value(self.reset_secs),
        );
        if let Some(p) = policy_value(self.limit, self.window_secs) {
            h.insert(RATELIMIT_POLICY.clone(), p);
        }
    }

    /// A refusal's headers (a 429 from a gateway or from verify): the `RateLimit-*` above
    /// and `Retry-After`, at least a second.
    pub fn refusal_headers(&self, h: &mut HeaderMap) {
        self.headers(h);
        h.insert(
            RETRY_AFTER,
            crate::ascii::number_value(self.reset_secs.max(1)),
        );
    }
}

/// `RateLimit-Policy: <limit>;w=<window>`. The last one made on this thread is kept: a
/// worker answers mostly for one or a few plans, and a clone of it shares its bytes where a
/// new one formats and allocates per response.
fn policy_value(limit: u32, window_secs: u64) -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(u32, u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((l, w, v)) = last.as_ref() {
            if (*l, *w) == (limit, window_secs) {
                return Some(v.clone());
            }
        }
        // Two integers and `;w=` always fit in 48 bytes.
        let mut policy = crate::ascii::Text::<48>::default();
        policy
            .decimal(limit.into())
            .push(b";w=")
            .decimal(window_secs);
        let v = HeaderValue::from_bytes(policy.as_bytes()).ok()?;
        *last = Some((limit, window_secs, v.clone()));
        Some(v)
    })
}

/// Every bucket shape in use, each a keyed limiter over lineages. Shared across reloads.
pub struct Buckets {
    /// Tells this instance's limiters from another's in a thread's `NEAR` cache.
    instance: u64,
    /// Keyed by shapes from the config, never by anything a client sends: a fast hash, not
    /// SipHash, per request.
    limiters: DashMap<Shape, Arc<Table>, foldhash::fast::RandomState>,
}

impl Default for Buckets {
    fn default() -> Buckets {
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        Buckets {
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            limiters: DashMap::default(),
        }
    }
}

/// Limiters a thread keeps at hand (`Buckets::with_limiter`): a handful of shapes covers the
/// plans in use, and a miss only costs the shared map's lookup.
const NEAR_MAX: usize = 8;

thread_local! {
    /// The limiters this thread used last, by `Buckets` instance and shape. Taking one from
    /// the shared map costs a shard lock and a reference count, four atomic writes to lines
    /// every worker writes on every request; a worker's own copy of the `Arc` costs none.
    static NEAR: RefCell<Vec<(u64, Shape, Arc<Table>)>> = const { RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for Buckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets")
            .field("shapes", &self.limiters.len())
            .finish()
    }
}

impl Buckets {
    pub fn new() -> Buckets {
        Buckets::default()
    }

    fn limiter(&self, shape: Shape) -> Arc<Table> {
        if let Some(l) = self.limiters.get(&shape) {
            return l.clone();
        }
        self.limiters.entry(shape).or_default().clone()
    }

    /// `f` on the limiter of `shape`, from this thread's `NEAR` cache when it holds it.
    fn with_limiter<T>(&self, shape: Shape, f: impl Fn(&Table) -> T) -> T {
        NEAR.try_with(|near| {
            let mut near = near.borrow_mut();
            let at = near
                .iter()
                .position(|(instance, s, _)| *instance == self.instance && *s == shape);
            let at = at.unwrap_or_else(|| {
                if near.len() == NEAR_MAX {
                    near.remove(0);
                }
                near.push((self.instance, shape, self.limiter(shape)));
                near.len() - 1
            });
            f(&near[at].2)
        })
        // The thread is exiting (its cache is gone): the shared map.
        .unwrap_or_else(|_| f(&self.limiter(shape)))
    }

    /// Take one token from `lineage`'s bucket of `shape`.
    pub fn check(&self, shape: Shape, lineage: &KeyId) -> Verdict {
        let g = shape.gcra();
        let take = self.with_limiter(shape, |l| l.take(lineage, g, || l.now()));
        let (allowed, remaining, wait) = match take {
            Take::Allowed { now, tat } => {
                let remaining = g.remaining(now, tat);
                let missing = shape.burst.saturating_sub(remaining);
                (true, remaining, g.t.saturating_mul(u64::from(missing)))
            }
            Take::Denied { now, earliest } => (false, 0, earliest - now),
        };
        let reset_secs = wait.div_ceil(1_000_000_000);
        Verdict {
            allowed,
            limit: shape.burst,
            remaining,
            // A refusal always waits a second or more.
            reset_secs: if allowed {
                reset_secs
            } else {
                reset_secs.max(1)
            },
            window_secs: shape.window_secs(),
        }
    }

    /// Drop buckets that are full again (idle lineages); called periodically, off the request path.
    pub fn shrink(&self) {
        for l in self.limiters.iter() {
            l.shrink(l.now());
        }
    }

    /// Number of live buckets across all shapes (a gauge; proves random keys add none).
    pub fn len(&self) -> usize {
        self.limiters.iter().map(|l| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `[limits] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    Redis,
}

/// `[limits] on_redis_down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisDown {
    Local,
    FailOpen,
    FailClosed,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend, String> {
        match s {
            "local" => Ok(Backend::Local),
            "redis" => Ok(Backend::Redis),
            other => Err(format!("{other:?}: use \"local\" or \"redis\"")),
        }
    }
}

impl OnRedisDown {
    pub fn parse(s: &str) -> Result<OnRedisDown, String> {
        match s {
            "local" => Ok(OnRedisDown::Local),
            "fail_open" => Ok(OnRedisDown::FailOpen),
            "fail_closed" => Ok(OnRedisDown::FailClosed),
            other => Err(format!(
                "{other:?}: use \"local\", \"fail_open\" or \"fail_closed\""
            )),
        }
    }
}

/// Node-local buckets plus, when `[redis]` is configured, the fleet-wide leases.
pub struct Limiter {
    pub buckets: Buckets,
    fleet: Option<Arc<Fleet>>,
    fallback: prometheus::IntCounterVec,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("buckets", &self.buckets)
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl Limiter {
    pub fn new(fleet: Option<Arc<Fleet>>, fallback: prometheus::IntCounterVec) -> Limiter {
        Limiter {
            buckets: Buckets::new(),
            fleet,
            fallback,
        }
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// One token of `shape` for `lineage`. `None`: admitted without a verdict (fail_open).
    pub async fn rate(
        &self,
        backend: Backend,
        on_down: OnRedisDown,
        shape: Shape,
        lineage: &KeyId,
    ) -> Option<Verdict> {
        let fleet = match (backend, &self.fleet) {
            (Backend::Redis, Some(f)) if crate::redis::safe_id(lineage) => f,
            _ => return Some(self.buckets.check(shape, lineage)),
        };
        // Boxed here and below: the Redis round trip's state (~2.5 KiB) would otherwise be
        // part of, and copied with, every request's future, Redis or not.
        match boxed(|| fleet.check(Budget::Rate(shape), lineage)).await {
            Ok(v) => Some(v),
            Err(e) => {
                self.fallback.with_label_values(&[e.reason()]).inc();
                match on_down {
                    OnRedisDown::Local => Some(self.buckets.check(shape, lineage)),
                    OnRedisDown::FailOpen => None,
                    OnRedisDown::FailClosed => Some(closed(shape.burst, shape.window_secs())),
                }
            }
        }
    }

    /// One unit of `quota` for `lineage` (always in Redis). `None`: not counted (no Redis, or
    /// Redis down in `local` / `fail_open` mode).
    pub async fn quota(
        &self,
        on_down: OnRedisDown,
        quota: CalendarQuota,
        lineage: &str,
    ) -> Option<Verdict> {
        let fleet = self
            .fleet
            .as_ref()
            .filter(|_| crate::redis::safe_id(lineage))?;
        let budget = Budget::Quota {
            limit: quota.limit,
            period: quota.period,
        };
        match boxed(|| fleet.check(budget, lineage)).await {
            Ok(v) => Some(v),
            Err(e) => {
                self.fallback.with_label_values(&[e.reason()]).inc();
                (on_down == OnRedisDown::FailClosed).then(|| {
                    closed(
                        u32::try_from(quota.limit).unwrap_or(u32::MAX),
                        quota.period.secs(),
                    )
                })
            }
        }
    }

    /// Idle cleanup, off the request path.
    pub fn shrink(&self) {
        self.buckets.shrink();
        if let Some(f) = &self.fleet {
            f.shrink();
        }
    }
}

/// The verdict of `fail_closed` while Redis is down: refused, retry in a second.
fn closed(limit: u32, window_secs: u64) -> Verdict {
    Verdict {
        allowed: false,
        limit,
        remaining: 0,
        reset_secs: 1,
        window_secs,
    }
}

/// Per-client budget of failed authentications. A client is an IPv4 address or an IPv6 /64
/// (one host typically owns a whole /64, so per-address budgets would be free to evade).
#[derive(Debug)]
pub struct AuthFailures {
    per_minute: u32,
    block: Duration,
    max_tracked: usize,
    clients: DashMap<u64, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// The budget key of a client address; IPv4-mapped IPv6 counts as the IPv4 address.
pub fn client_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4)),
            // The /64 prefix, tagged in the top bit so it cannot collide with an IPv4 key.
            None => (u128::from(v6) >> 64) as u64 | (1 << 63),
        },
    }
}

impl AuthFailures {
    /// The budget `[limits]` sets: every place a client presents a key counts against it.
    pub fn from_config(l: &crate::config::LimitsConfig) -> AuthFailures {
        AuthFailures::new(
            l.auth_failures_per_minute,
            Duration::from_secs(l.auth_failure_block_seconds),
            l.auth_failure_max_tracked,
        )
    }

    pub fn new(per_minute: u32, block: Duration, max_tracked: usize) -> AuthFailures {
        AuthFailures {
            per_minute,
            block,
            max_tracked: max_tracked.max(1),
            clients: DashMap::new(),
        }
    }

    /// Is this client over its budget right now? Checked before any hashing.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let w = self.clients.get(&client_key(ip))?;
        w.blocked_until.filter(|t| *t > now).map(|t| t - now)
    }

    /// Count one failed authentication; returns true if this failure exhausted the budget.
    pub fn record(&self, ip: IpAddr, now: Instant) -> bool {
        if self.clients.len() >= self.max_tracked {
            self.evict(now);
        }
        let mut w = self.clients.entry(client_key(ip)).or_insert(Window {
            start: now,
            count: 0,
            blocked_until: None,
        });
        if now.duration_since(w.start) >= Duration::from_secs(60) {
            *w = Window {
                start: now,
                count: 0,
                blocked_until: w.blocked_until.filter(|t| *t > now),
            };
        }
        w.count = w.count.saturating_add(1);
        // `per_minute` failures are allowed; the one that uses up the budget blocks, so the
        // next attempt is refused (not the one after it).
        if w.count >= self.per_minute && w.blocked_until.is_none_or(|t| t <= now) {
            w.blocked_until = Some(now + self.block);
            return true;
        }
        false
    }

    /// Memory bound: forget clients with nothing to remember, then (under a flood of distinct
    /// sources) the oldest windows, so the map never exceeds `max_tracked`.
    fn evict(&self, now: Instant) {
        self.clients.retain(|_, w| {
            w.blocked_until.is_some_and(|t| t > now)
                || now.duration_since(w.start) < Duration::from_secs(60)
        });
        let over = (self.clients.len() + 1).saturating_sub(self.max_tracked);
        if over > 0 {
            let mut starts: Vec<(Instant, u64)> =
                self.clients.iter().map(|e| (e.start, *e.key())).collect();
            starts.sort_unstable();
            for (_, k) in starts.into_iter().take(over.max(self.max_tracked / 10)) {
                self.clients.remove(&k);
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    /// Periodic cleanup off the request path.
    pub fn sweep(&self, now: Instant) {
        self.clients.retain(|_, w| {
            w.blocked_until.is_some_and(|t| t > now)
                || now.duration_since(w.start) < Duration::from_secs(60)
        });
    }
}

/// Why `charge` refused a request.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    Rate(Verdict),
    Quota(Verdict),
}

/// Charge one request of `key`: rate first, then quota, so a request the bucket refuses
/// never spends quota. In shadow mode (`enforce = false`) a refusal is counted (`shadowed`)
/// and announced, not made. `verdict` is what the `RateLimit-*` headers announce (the
/// quota's when it refused). The gateway's request path and the control plane's verify
/// endpoint both charge through here, so a key pays the same wherever it is checked.
pub async fn charge(
    limiter: &Limiter,
    policy: &crate::snapshot::LimitPolicy,
    key: &crate::keys::compact::KeyView,
    verdict: &mut Option<Verdict>,
    mut shadowed: impl FnMut(),
) -> Result<(), Refused> {
    let enforce = policy.enforce_for(key.plan.as_deref());
    let limits = policy.limits;
    if let Some(shape) = policy.shape_for(key.rate.as_deref(), key.plan.as_deref()) {
        let v = limiter.rate(
            limits.backend,
            limits.on_redis_down,
            shape,
            key.lineage_id(),
        );
        if let Some(v) = v.await {
            if !v.allowed {
                if enforce {
                    return Err(Refused::Rate(v));
                }
                shadowed();
            }
            *verdict = Some(v);
        }
    }
    if let Some(q) = policy.quota_for(key.quota.as_deref(), key.plan.as_deref()) {
        let v = limiter.quota(limits.on_redis_down, q, key.lineage()).await;
        if let Some(v) = v.filter(|v| !v.allowed) {
            // The quota's window, not the bucket's, is what the caller must wait for.
            *verdict = Some(v);
            if enforce {
                return Err(Refused::Quota(v));
            }
            shadowed();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local buckets' emission interval: never shorter than the configured rate's, so
    /// a bucket never admits more than configured (the Redis buckets round the same way:
    /// `redis::lease::interval_arg`), and longer by under a nanosecond.
    #[test]
    fn the_emission_interval_never_admits_more_than_the_rate() {
        let mut wrong = Vec::new();
        for r in [
            "1/h",
            "7/m",
            "3/s",
            "50/s",
            "300000/s",
            "999999/s",
            "3000000/s",
        ] {
            let s = Shape::new(Rate::parse(r).unwrap(), None);
            let per = s.rate.per.as_nanos();
            let t = u128::from(s.gcra().t);
            let count = u128::from(s.rate.count);
            if t * count < per || t * count >= per + count {
                wrong.push(format!(
                    "{r}: {t} ns a token, {} ns per {per} ns",
                    t * count
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate {
                count: 100,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(
            Rate::parse(" 6000 / m ").unwrap().per,
            Duration::from_secs(60)
        );
        for bad in ["", "100", "0/s", "x/s", "100/d", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_allows_burst_then_denies_and_is_per_lineage() {
        let b = Buckets::new();
        let shape = Shape::new(Rate::parse("1/h").unwrap(), Some(3));
        let a = KeyId::of("key_a");
        let v: Vec<Verdict> = (0..4).map(|_| b.check(shape, &a)).collect();
        assert_eq!(v.iter().filter(|v| v.allowed).count(), 3);
        assert_eq!(v[0].remaining, 2);
        assert_eq!(v[2].remaining, 0);
        assert!(!v[3].allowed);
        assert!(v[3].reset_secs > 0 && v[3].reset_secs <= 3600);
        assert!(b.check(shape, &KeyId::of("key_b")).allowed);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn a_threads_cached_limiters_belong_to_their_own_buckets_and_shape() {
        let one = |per: &str| Shape::new(Rate::parse(per).unwrap(), Some(1));
        let a = KeyId::of("key_a");
        let first = Buckets::new();
        assert!(first.check(one("1/h"), &a).allowed);
        assert!(!first.check(one("1/h"), &a).allowed);
        // Another instance on the same thread, same shape and lineage: its own, full bucket.
        let second = Buckets::new();
        assert!(second.check(one("1/h"), &a).allowed);
        assert!(
            !first.check(one("1/h"), &a).allowed,
            "the first keeps its state"
        );
        // More shapes than a thread keeps at hand: each still its own bucket, held or not.
        let shapes: Vec<Shape> = (2..2 + 2 * NEAR_MAX)
            .map(|n| one(&format!("{n}/h")))
            .collect();
        for s in &shapes {
            assert!(first.check(*s, &a).allowed);
        }
        for s in &shapes {
            assert!(!first.check(*s, &a).allowed);
        }
        assert_eq!(first.len(), 1 + shapes.len());
    }

    #[test]
    fn contention_from_threads_never_over_admits() {
        let b = Arc::new(Buckets::new());
        let shape = Shape::new(Rate::parse("1/h").unwrap(), Some(100));
        let lineage = KeyId::of("key_hot");
        let allowed: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| b.check(shape, &lineage).allowed)
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 100);
    }

    #[test]
    fn failure_budget_blocks_per_client_and_aggregates_ipv6_per_64() {
        let f = AuthFailures::new(3, Duration::from_secs(60), 1000);
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        // Exactly 3 failures allowed: the 3rd exhausts the budget, the 4th attempt is refused.
        for _ in 0..2 {
            assert!(!f.record(a, t0));
            assert!(f.blocked(a, t0).is_none());
        }
        assert!(f.record(a, t0));
        assert!(f.blocked(a, t0).is_some());
        assert!(f.blocked(b, t0).is_none());
        assert!(
            f.blocked(a, t0 + Duration::from_secs(61)).is_none(),
            "block expires"
        );
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(v6a), client_key(v6b));
        assert_ne!(client_key(v6a), client_key(v6c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(client_key(mapped), client_key(a));
    }

    #[test]
    fn failure_budget_memory_is_bounded() {
        let f = AuthFailures::new(3, Duration::from_secs(60), 500);
        let t0 = Instant::now();
        for i in 0..50_000u32 {
            f.record(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(f.tracked() <= 500, "{}", f.tracked());
    }
}
