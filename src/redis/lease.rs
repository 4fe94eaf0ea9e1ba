//! Fleet-wide budgets served from token leases: GCRA token buckets and calendar quotas.
//!
//! The hot path never waits on Redis per request. Each node leases a *batch* of tokens for a
//! lineage from an atomic Lua script (the tokens are debited in Redis at lease time; times
//! come from Redis `TIME` inside the script, never a node's clock) and serves requests from
//! the lease. When the lease runs low (half a batch left) a background refill fetches the next
//! batch ahead of need. Only when a node holds no tokens does a request wait for Redis,
//! bounded by `command_timeout_ms` and the circuit breaker.
//!
//! Batch size: `min(limits.lease_max, burst, rate × limits.lease_window_ms)`, at least 1. A
//! `1/m` key (or a `2/s` key with the default 100 ms window) leases one token per request, so
//! low-rate keys are exact fleet-wide; a `10000/s` key leases 100 at a time (at the default
//! cap). A lease may be spent for `max(granted × period, HOLD_WINDOWS × lease window)` (10 s by
//! default): long enough that a key seen once every few hundred milliseconds on a node
//! (10,000 keys rotating at full load) is still served from its lease instead of costing a
//! Redis round trip per request. Holding does not loosen either bound below: tokens are
//! debited when leased, whenever they are spent, and what a node withholds is at most one
//! batch however long it holds it. A refused lease is remembered until Redis' `Retry-After`
//! so a limited key costs no Redis call per refused request. Unused tokens are given back on
//! shutdown (SIGTERM drain).
//!
//! **Accuracy bound.** Every admitted request was debited in Redis, so over any window the
//! fleet admits at most what one GCRA bucket allows plus the tokens leased before the window
//! and spent inside it: over-admission ≤ nodes × batch. Under-admission happens only while
//! tokens sit unused in a lease: at most nodes × batch, until that lease expires (a dead
//! node's lease is lost, never double-spent: THREATS L8).
//!
//! **`RateLimit-Remaining` on a node holding a lease** is what Redis reported remaining in the
//! fleet bucket at the last lease plus the tokens this node still holds: a fleet-wide
//! estimate that is exact when batches are 1, and never counts another node's lease.
//!
//! Quotas use the same machinery with a counter per UTC calendar period (`quota`): a lease
//! is valid until the period ends, and the batch is `limit / 1000` (at least 1, at most
//! `lease_max`), so a `5/day` quota is exact.

use super::quota::{self, Period};
use super::script::Script;
use super::{Client, RedisError};
use crate::limit::{Shape, Verdict};
use dashmap::DashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

/// Takes up to ARGV[3] tokens from a GCRA bucket (ARGV[1] = emission interval in µs, with a
/// fraction to the nanosecond: `interval_arg`; ARGV[2] = burst), or gives ARGV[3] back when
/// ARGV[4] == "give". Returns {granted, remaining after, retry µs (when none granted), µs until
/// the bucket is full}. The state is one number, the theoretical arrival time (TAT) in
/// Redis-clock whole µs, expiring when the bucket is full again. Rounding the TAT to whole µs
/// can only refuse, never admit, a token: it costs at most 1 µs a take, against a batch.
static GCRA: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
-- now and tat are whole µs near 2^51, where a double holds no fraction finer than 1/4 µs: a
-- fractional interval is only ever added to their exact difference, and the TAT moves by
-- whole µs, rounded up on a take and down on a give (a token refused, never one too many).
if ARGV[4] == 'give' then
  local back = tat - math.floor(n * period)
  if back <= now then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', math.ceil((back - now) / 1000) + 1)
  end
  return {0, 0, 0, 0}
end
local room = (now - tat) + burst * period
local avail = math.floor(room / period)
if avail < 0 then avail = 0 end
local k = n
if k > avail then k = avail end
if k <= 0 then
  return {0, 0, math.ceil(period - room), tat - now}
end
tat = tat + math.ceil(k * period)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
local left = math.floor(((now - tat) + burst * period) / period)
if left < 0 then left = 0 end
return {k, left, 0, tat - now}
"#,
);

/// What a budget is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    Rate(Shape),
    Quota { limit: u64, period: Period },
}

/// One lease from Redis.
#[derive(Debug, Clone, Copy)]
struct Grant {
    granted: u32,
    remaining: u64,
    /// When nothing was granted: how long until something can be.
    retry: Duration,
    /// How long the granted tokens may be spent.
    valid_for: Duration,
    /// Seconds until the budget is whole again (bucket full / quota period reset).
    reset: Duration,
    /// Quota period start (to give tokens back to the right counter); 0 for buckets.
    tag: i64,
}

#[derive(Debug)]
struct Lease {
    tokens: u32,
    expires: Instant,
    fleet_remaining: u64,
    reset_at: Instant,
    denied_until: Option<Instant>,
    refilling: bool,
    tag: i64,
}

impl Lease {
    fn empty(now: Instant) -> Lease {
        Lease {
            tokens: 0,
            expires: now,
            fleet_remaining: 0,
            reset_at: now,
            denied_until: None,
            refilling: false,
            tag: 0,
        }
    }
}

/// Lease tuning (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTuning {
    pub window: Duration,
    pub max: u32,
}

impl LeaseTuning {
    /// `[limits] lease_window_ms` and `lease_max`.
    pub fn from_config(l: &crate::config::LimitsConfig) -> LeaseTuning {
        LeaseTuning {
            window: Duration::from_millis(l.lease_window_ms),
            max: l.lease_max,
        }
    }
}

type Entry = Arc<AsyncMutex<Lease>>;

/// How many lease windows a lease may be held at least (see the module docs).
const HOLD_WINDOWS: u32 = 100;

/// The leases this node holds: per budget, per lineage. Two maps so a lookup borrows the
/// lineage (`&str`) instead of building an owned key on every request.
pub struct Fleet {
    client: Arc<Client>,
    tuning: LeaseTuning,
    leases: DashMap<Budget, DashMap<String, Entry>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("leases", &self.len())
            .finish()
    }
}

/// The emission interval, as the local buckets have it (rounded up to the nanosecond).
fn period_of(shape: &Shape) -> Duration {
    Duration::from_nanos(shape.gcra().t)
}

/// The GCRA script's ARGV[1]: the emission interval in µs with three decimals, i.e. to the
/// nanosecond and rounded up like the local buckets'. Whole µs truncated it: `300000/s` sent
/// 3 µs and the fleet admitted 333,333/s (11 % over), every rate above 500,000/s sent 1 µs.
fn interval_arg(shape: &Shape) -> String {
    let ns = shape.gcra().t;
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

fn secs_ceil(d: Duration) -> u64 {
    d.as_secs_f64().ceil() as u64
}

impl Fleet {
    pub fn new(client: Arc<Client>, tuning: LeaseTuning) -> Arc<Fleet> {
        Arc::new(Fleet {
            client,
            tuning,
            leases: DashMap::new(),
        })
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Tokens to lease at once for `budget`.
    pub fn batch(&self, budget: &Budget) -> u32 {
        let n = match budget {
            Budget::Rate(s) => {
                let per_window = f64::from(s.rate.count) * self.tuning.window.as_secs_f64()
                    / s.rate.per.as_secs_f64();
                (per_window.floor() as u64).min(u64::from(s.burst))
            }
            Budget::Quota { limit, .. } => limit / 1000,
        };
        n.clamp(1, u64::from(self.tuning.max.max(1))) as u32
    }

    fn key(&self, budget: &Budget, lineage: &str) -> String {
        let p = self.client.prefix();
        match budget {
            Budget::Rate(s) => format!(
                "{p}rl:{lineage}:{}:{}:{}",
                s.rate.count,
                s.rate.per.as_millis(),
                s.burst
            ),
            Budget::Quota { limit, period } => quota::key(
                p,
                lineage,
                quota::Quota {
                    limit: *limit,
                    period: *period,
                },
            ),
        }
    }

    /// Take one token of `budget` for `lineage` (an id the gateway generated: see
    /// `super::safe_id`). `Err` only when Redis had to be asked and could not answer.
    pub async fn check(
        self: &Arc<Self>,
        budget: Budget,
        lineage: &str,
    ) -> Result<Verdict, RedisError> {
        let found = self
            .leases
            .get(&budget)
            .and_then(|m| m.get(lineage).map(|e| e.clone()));
        let entry = match found {
            Some(e) => e,
            None => self
                .leases
                .entry(budget)
                .or_default()
                .entry(lineage.to_owned())
                .or_insert_with(|| Arc::new(AsyncMutex::new(Lease::empty(Instant::now()))))
                .clone(),
        };
        let batch = self.batch(&budget);
        // Held across the Redis call below: concurrent requests of one lineage wait for one
        // lease instead of each asking Redis (single flight).
        let mut l = entry.lock().await;
        let now = Instant::now();
        if l.expires <= now {
            l.tokens = 0;
        }
        if l.tokens > 0 {
            l.tokens -= 1;
            if batch > 1 && l.tokens <= batch / 2 && !l.refilling {
                l.refilling = true;
                self.spawn_refill(budget, lineage.to_owned(), entry.clone(), batch);
            }
            return Ok(self.allowed(&budget, &l, now));
        }
        if let Some(until) = l.denied_until.filter(|t| *t > now) {
            return Ok(denied(&budget, until - now));
        }
        let g = self.take(&budget, lineage, batch).await?;
        let now = Instant::now();
        apply(&mut l, &g, now);
        if l.tokens == 0 {
            return Ok(denied(&budget, g.retry));
        }
        l.tokens -= 1;
        Ok(self.allowed(&budget, &l, now))
    }

    fn allowed(&self, budget: &Budget, l: &Lease, now: Instant) -> Verdict {
        let reset = l.reset_at.saturating_duration_since(now);
        match budget {
            Budget::Rate(s) => {
                let remaining = (l.fleet_remaining + u64::from(l.tokens)).min(u64::from(s.burst));
                let missing = u64::from(s.burst) - remaining;
                Verdict {
                    allowed: true,
                    limit: s.burst,
                    remaining: remaining as u32,
                    reset_secs: secs_ceil(period_of(s) * missing as u32),
                    window_secs: s.window_secs(),
                }
            }
            Budget::Quota { limit, .. } => Verdict {
                allowed: true,
                limit: u32::try_from(*limit).unwrap_or(u32::MAX),
                remaining: u32::try_from((l.fleet_remaining + u64::from(l.tokens)).min(*limit))
                    .unwrap_or(u32::MAX),
                reset_secs: secs_ceil(reset),
                window_secs: budget_window(budget),
            },
        }
    }

    fn spawn_refill(self: &Arc<Self>, budget: Budget, lineage: String, entry: Entry, batch: u32) {
        let me = self.clone();
        tokio::spawn(async move {
            let got = me.take(&budget, &lineage, batch).await;
            let mut l = entry.lock().await;
            l.refilling = false;
            if let Ok(g) = got {
                let now = Instant::now();
                if l.expires <= now {
                    l.tokens = 0;
                }
                apply(&mut l, &g, now);
            }
        });
    }

    async fn take(&self, budget: &Budget, lineage: &str, n: u32) -> Result<Grant, RedisError> {
        let key = self.key(budget, lineage);
        let n_s = n.to_string();
        match budget {
            Budget::Rate(s) => {
                let period = interval_arg(s);
                let burst = s.burst.to_string();
                let v = self
                    .client
                    .eval(
                        &GCRA,
                        &[key.as_bytes()],
                        &[period.as_bytes(), burst.as_bytes(), n_s.as_bytes(), b"take"],
                    )
                    .await?;
                let r = v.ints().ok_or(RedisError::Unexpected("GCRA script"))?;
                let [granted, remaining, retry_us, full_us] = r[..] else {
                    return Err(RedisError::Unexpected("GCRA script"));
                };
                let granted = u32::try_from(granted.max(0)).unwrap_or(0).min(n);
                Ok(Grant {
                    granted,
                    remaining: remaining.max(0) as u64,
                    retry: Duration::from_micros(retry_us.max(0) as u64),
                    valid_for: (period_of(s) * granted).max(self.tuning.window * HOLD_WINDOWS),
                    reset: Duration::from_micros(full_us.max(0) as u64),
                    tag: 0,
                })
            }
            Budget::Quota { limit, period } => {
                let q = quota::take(&self.client, &key, *limit, *period, n).await?;
                Ok(Grant {
                    granted: q.granted.min(n),
                    remaining: q.remaining,
                    retry: q.reset,
                    valid_for: q.reset,
                    reset: q.reset,
                    tag: q.period_start,
                })
            }
        }
    }

    /// Give every unexpired unused token back (shutdown). Best effort, bounded by the
    /// client's timeouts; returns how many tokens were returned.
    pub async fn release_all(&self) -> u64 {
        let entries: Vec<((Budget, String), Entry)> = self
            .leases
            .iter()
            .flat_map(|m| {
                let budget = *m.key();
                m.value()
                    .iter()
                    .map(|e| ((budget, e.key().clone()), e.value().clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut returned = 0u64;
        for ((budget, lineage), entry) in entries {
            let mut l = entry.lock().await;
            if l.tokens == 0 || l.expires <= Instant::now() {
                continue;
            }
            let n = std::mem::take(&mut l.tokens);
            let key = self.key(&budget, &lineage);
            let ok = match budget {
                Budget::Rate(s) => {
                    let period = interval_arg(&s);
                    let burst = s.burst.to_string();
                    let n_s = n.to_string();
                    self.client
                        .eval(
                            &GCRA,
                            &[key.as_bytes()],
                            &[period.as_bytes(), burst.as_bytes(), n_s.as_bytes(), b"give"],
                        )
                        .await
                        .is_ok()
                }
                Budget::Quota { .. } => quota::give(&self.client, &key, l.tag, n).await.is_ok(),
            };
            if ok {
                returned += u64::from(n);
            }
        }
        returned
    }

    /// Forget leases that expired long ago (idle lineages); off the request path.
    pub fn shrink(&self) {
        let now = Instant::now();
        for m in self.leases.iter() {
            m.value().retain(|_, e| match e.try_lock() {
                Ok(l) => l.expires > now || l.refilling || l.denied_until.is_some_and(|t| t > now),
                Err(_) => true,
            });
        }
    }

    /// Leases held (all budgets).
    pub fn len(&self) -> usize {
        self.leases.iter().map(|m| m.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn apply(l: &mut Lease, g: &Grant, now: Instant) {
    if !same_period(l, g) {
        return;
    }
    l.fleet_remaining = g.remaining;
    l.reset_at = now + g.reset;
    if g.granted == 0 {
        l.denied_until = Some(now + g.retry);
        return;
    }
    l.denied_until = None;
    l.tokens += g.granted;
    l.expires = l.expires.max(now + g.valid_for);
}

/// Puts the lease in the quota period of `g` and says whether `g` may be applied. A lease's
/// tokens were debited from one period's counter (`tag`, its start; 0 for buckets): a grant
/// of a later period drops the tokens left from the ended one, or they would be spent in the
/// new period uncounted and given back to its counter on release. A grant of an earlier
/// period (a refill Redis answered before the boundary, applied after a newer grant) is
/// dropped whole: its tokens belong to a period that is over.
fn same_period(l: &mut Lease, g: &Grant) -> bool {
    if g.tag < l.tag {
        return false;
    }
    if g.tag > l.tag {
        l.tokens = 0;
        l.tag = g.tag;
    }
    true
}

fn budget_window(budget: &Budget) -> u64 {
    match budget {
        Budget::Rate(s) => s.window_secs(),
        Budget::Quota { period, .. } => period.secs(),
    }
}

fn denied(budget: &Budget, retry: Duration) -> Verdict {
    let limit = match budget {
        Budget::Rate(s) => s.burst,
        Budget::Quota { limit, .. } => u32::try_from(*limit).unwrap_or(u32::MAX),
    };
    Verdict {
        allowed: false,
        limit,
        remaining: 0,
        reset_secs: secs_ceil(retry).max(1),
        window_secs: budget_window(budget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::Rate;

    #[test]
    fn batches_follow_rate_window_and_cap() {
        let settings = crate::redis::Settings {
            target: crate::redis::Target::Direct {
                host: "127.0.0.1".into(),
                port: 1,
            },
            db: 0,
            tls: None,
            tls_name: String::new(),
            username: None,
            password: None,
            prefix: "t:".into(),
            connect_timeout: Duration::from_millis(10),
            command_timeout: Duration::from_millis(10),
            revoke_wait_replicas: 0,
            revoke_wait_timeout: Duration::from_millis(10),
            stream_keep_entries: 1,
        };
        let m = crate::metrics::Metrics::new(0);
        let client = Client::new(settings, m.redis_metrics());
        let f = Fleet::new(
            client,
            LeaseTuning {
                window: Duration::from_millis(100),
                max: 100,
            },
        );
        let rate = |r: &str, b: u32| Budget::Rate(Shape::new(Rate::parse(r).unwrap(), Some(b)));
        assert_eq!(f.batch(&rate("1/m", 1)), 1);
        assert_eq!(f.batch(&rate("2/s", 2)), 1);
        assert_eq!(f.batch(&rate("50/s", 50)), 5);
        assert_eq!(f.batch(&rate("10000/s", 10000)), 100);
        assert_eq!(f.batch(&rate("10000/s", 3)), 3, "never more than the burst");
        let q = |limit| Budget::Quota {
            limit,
            period: Period::Day,
        };
        assert_eq!(f.batch(&q(5)), 1);
        assert_eq!(f.batch(&q(100_000)), 100);
        assert_eq!(
            f.key(&rate("50/s", 60), "key_abc"),
            "t:rl:key_abc:50:1000:60"
        );
    }

    /// The emission interval sent to the script: never shorter than the configured rate's
    /// (that would admit more than configured), and longer by at most a nanosecond a token.
    #[test]
    fn the_interval_sent_never_admits_more_than_the_rate() {
        let mut wrong = Vec::new();
        for r in [
            "1/h",
            "7/m",
            "3/s",
            "50/s",
            "1000/s",
            "300000/s",
            "600000/s",
            "999999/s",
            "1000000/s",
            "3000000/s",
        ] {
            let s = Shape::new(Rate::parse(r).unwrap(), None);
            let sent_us: f64 = interval_arg(&s).parse().unwrap();
            let exact_us = s.rate.per.as_secs_f64() * 1e6 / f64::from(s.rate.count);
            if sent_us < exact_us || sent_us - exact_us >= 0.001 + 1e-9 {
                let admitted = s.rate.per.as_secs_f64() * 1e6 / sent_us;
                wrong.push(format!(
                    "{r}: {sent_us} µs a token (exact {exact_us:.4}) admits {admitted:.1} per {:?}",
                    s.rate.per
                ));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    fn grant(granted: u32, tag: i64) -> Grant {
        Grant {
            granted,
            remaining: 100,
            retry: Duration::from_secs(1),
            valid_for: Duration::from_secs(60),
            reset: Duration::from_secs(60),
            tag,
        }
    }

    /// Tokens are debited from one quota period's counter: a grant for the next period must
    /// not carry the ended period's leftovers into it (spent there uncounted, and given back
    /// to the wrong counter on release), and a late grant of an ended period adds nothing.
    #[test]
    fn a_grant_for_a_new_quota_period_drops_the_ended_periods_tokens() {
        let now = Instant::now();
        let day = 1_767_225_600;
        let next = day + 86_400;
        let mut l = Lease::empty(now);
        apply(&mut l, &grant(10, day), now);
        l.tokens -= 4;
        apply(&mut l, &grant(10, next), now);
        assert_eq!(
            (l.tokens, l.tag),
            (10, next),
            "the ended day's 6 tokens were kept"
        );
        apply(&mut l, &grant(10, day), now);
        assert_eq!(
            (l.tokens, l.tag),
            (10, next),
            "a grant of the ended day was added"
        );
        // Buckets have no periods (tag 0): their grants add up.
        let mut b = Lease::empty(now);
        apply(&mut b, &grant(5, 0), now);
        apply(&mut b, &grant(5, 0), now);
        assert_eq!(b.tokens, 10);
    }
}
