//! Fleet-wide limits, quotas and usage on a real `redis-server` (issue 10, THREATS §L).
//!
//! Every test starts its own Redis (tests/common/redis.rs) and real `keygate serve`
//! processes that share one key store; the tests run one at a time (`SERIAL`) so the 2-core CI
//! is not oversubscribed. Traffic goes only to 127.0.0.1; every wait is a poll with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{Ha, RedisOpts, RedisServer};
use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One Redis test at a time: they start several gateways and push load.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PLANS: &str = r#"
[plans.default]
rate = "1000/s"
burst = 1000

[plans.p50]
rate = "50/s"
burst = 50

[plans.low]
rate = "2/s"
burst = 2

[plans.shadow]
rate = "2/s"
burst = 2
enforce = false
"#;

/// A directory holding the shared store and one subdirectory per gateway node.
struct Fleet {
    dir: tempfile::TempDir,
    up: Upstream,
    nodes: Vec<PathBuf>,
}

impl Fleet {
    /// `limits` and `redis` are the `[limits]` and `[redis]` bodies (`redis` empty: none).
    async fn new(nodes: usize, limits: &str, redis: &str) -> Fleet {
        let dir = tempdir();
        let up = Upstream::start(Mode::Echo).await;
        // A quota needs [redis]: the quota plan exists only where Redis does.
        let redis_section = if redis.is_empty() {
            String::new()
        } else {
            format!("[redis]\n{redis}\n\n[plans.q5]\nrate = \"1000/s\"\nburst = 1000\nquota = \"5/day\"\n")
        };
        let mut paths = Vec::new();
        for i in 0..nodes.max(1) {
            let node = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node).unwrap();
            let config = format!(
                r#"[keys]
store = "../keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "../usage.json"
poll_interval_ms = 50
touch_interval_seconds = 1

{PLANS}

[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[limits]
{limits}

{redis_section}

[[upstreams]]
name = "up"
targets = ["{}"]

[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
"#,
                up.addr()
            );
            paths.push(write_file(&node, "keygate.toml", &config));
        }
        Fleet {
            dir,
            up,
            nodes: paths,
        }
    }

    fn config(&self) -> &Path {
        &self.nodes[0]
    }

    async fn start(&self, envs: &[(&str, &str)]) -> Vec<Gateway> {
        let mut gws = Vec::new();
        for n in &self.nodes {
            gws.push(spawn_ready(n, envs, Duration::from_secs(20)).await);
        }
        gws
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ok: usize,
    limited: usize,
    quota: usize,
    server_error: usize,
    other: usize,
    failed: usize,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.ok += o.ok;
        self.limited += o.limited;
        self.quota += o.quota;
        self.server_error += o.server_error;
        self.other += o.other;
        self.failed += o.failed;
    }
}

/// Offer `rps` requests/s per node for `dur`, over `conns` keep-alive connections per node.
async fn offer(nodes: &[SocketAddr], key: &str, rps: u32, conns: usize, dur: Duration) -> Counts {
    let every = Duration::from_secs_f64(conns as f64 / f64::from(rps));
    let deadline = tokio::time::Instant::now() + dur;
    let mut tasks = Vec::new();
    for addr in nodes {
        for c in 0..conns {
            let (addr, auth) = (*addr, bearer(key));
            tasks.push(tokio::spawn(async move {
                let mut ka = KeepAlive::connect(addr).await;
                ka.timeout = Duration::from_secs(5);
                let mut counts = Counts::default();
                // Spread the connections' phases over one interval.
                let start = tokio::time::Instant::now() + every * c as u32 / conns as u32;
                let mut tick = tokio::time::interval_at(start, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let req = [("authorization", auth.as_str())];
                    match ka.try_send(build_get(addr, &req)).await {
                        Ok((200, _, _)) => counts.ok += 1,
                        Ok((429, _, body)) => {
                            if json(&body)["code"] == "quota_exceeded" {
                                counts.quota += 1
                            } else {
                                counts.limited += 1
                            }
                        }
                        Ok((s, _, _)) if s >= 500 => counts.server_error += 1,
                        Ok(_) => counts.other += 1,
                        Err(_) => {
                            counts.failed += 1;
                            ka = KeepAlive::connect(addr).await;
                        }
                    }
                }
                counts
            }));
        }
    }
    let mut total = Counts::default();
    for t in tasks {
        total.add(t.await.unwrap());
    }
    total
}

fn build_get(
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    build_request(http::Method::GET, addr, "/x", headers, bytes::Bytes::new())
}

async fn status(addr: SocketAddr, key: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let (s, h, b) = get(addr, "/x", &[("authorization", &bearer(key))]).await;
    let body = if s == 200 {
        serde_json::Value::Null
    } else {
        json(&b)
    };
    (s, h, body)
}

async fn metrics(gw: &Gateway) -> String {
    let (_, _, b) = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&b).into_owned()
}

/// The value of one series line (`name{labels} value`), 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

async fn wait_redis_up(gws: &[Gateway], up: bool) {
    let want = if up { 1.0 } else { 0.0 };
    for gw in gws {
        eventually_named("keygate_redis_up", Duration::from_secs(15), || async {
            (metric(&metrics(gw).await, "keygate_redis_up") == want).then_some(())
        })
        .await;
    }
}

/// A fresh Redis and two nodes on it (`on_redis_down = "local"`).
async fn two_nodes_on_redis() -> (RedisServer, Fleet) {
    let redis = RedisServer::start();
    let fleet = Fleet::new(2, &redis_limits("local"), &redis_section(&redis)).await;
    (redis, fleet)
}

fn redis_limits(on_down: &str) -> String {
    format!("backend = \"redis\"\non_redis_down = \"{on_down}\"")
}

fn redis_section(r: &RedisServer) -> String {
    format!("url = \"{}\"\ncommand_timeout_ms = 200", r.url())
}

const RATE: f64 = 50.0;
const BURST: f64 = 50.0;
const SECS: f64 = 5.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_one_redis_admit_one_budget() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let fleet = Fleet::new(3, &redis_limits("local"), &redis_section(&redis)).await;
    let k = create_key(fleet.config(), &["--plan", "p50"]);
    let gws = fleet.start(&[]).await;
    let addrs: Vec<_> = gws.iter().map(|g| g.http).collect();
    let c = offer(&addrs, &k.key, 200, 10, Duration::from_secs_f64(SECS)).await;
    let bound = RATE * SECS + BURST;
    eprintln!(
        "redis backend, 3 nodes, 50/s burst 50, ~600 req/s for 5 s: {c:?}; GCRA bound {bound}"
    );
    assert_eq!(c.server_error + c.other + c.failed, 0, "{c:?}");
    assert_eq!(fleet.up.count(), c.ok, "admitted == forwarded");
    assert!(
        c.ok as f64 >= 0.8 * bound,
        "under-admitted: {} < 80% of {bound}",
        c.ok
    );
    assert!(
        c.ok as f64 <= 1.1 * bound,
        "over-admitted: {} > 110% of {bound}",
        c.ok
    );
    assert!(
        c.limited > 1000,
        "most of the offered load is refused: {c:?}"
    );
    // The node served from leases: far fewer Redis commands than requests.
    let m = metrics(&gws[0]).await;
    let commands = metric(&m, "keygate_redis_command_seconds_count");
    eprintln!("node 0: {commands} redis commands");
    assert!(metric(&m, "keygate_redis_up") == 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_with_local_buckets_over_admit() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::new(3, "backend = \"local\"", "").await;
    let k = create_key(fleet.config(), &["--plan", "p50"]);
    let gws = fleet.start(&[]).await;
    let addrs: Vec<_> = gws.iter().map(|g| g.http).collect();
    let c = offer(&addrs, &k.key, 200, 10, Duration::from_secs_f64(SECS)).await;
    let bound = RATE * SECS + BURST;
    eprintln!("local backend, 3 nodes: {c:?}; one-bucket bound {bound}");
    assert_eq!(c.server_error + c.other + c.failed, 0, "{c:?}");
    assert!(
        c.ok as f64 > 1.5 * bound,
        "per-node buckets should over-admit ~3x: {} <= 1.5 x {bound}",
        c.ok
    );
}

/// Send one request to each address in order; the statuses.
async fn round(addrs: &[SocketAddr], key: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(status(*a, key).await.0);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_rate_key_alternating_nodes_is_exact_and_refill_is_shared() {
    let _serial = SERIAL.lock().await;
    let (_redis, fleet) = two_nodes_on_redis().await;
    let alone = create_key(fleet.config(), &["--plan", "low"]);
    let shared = create_key(fleet.config(), &["--plan", "low"]);
    let gws = fleet.start(&[]).await;
    let (a, b) = (gws[0].http, gws[1].http);

    // One node alone: the burst of 2, then 429s.
    let t = Instant::now();
    let single = round(&[a, a, a, a, a, a], &alone.key).await;
    let single_ok = single.iter().filter(|s| **s == 200).count();
    // Alternating over two nodes: the same count, fleet-wide.
    let alternating = round(&[a, b, a, b, a, b], &shared.key).await;
    let fleet_ok = alternating.iter().filter(|s| **s == 200).count();
    let took = t.elapsed();
    eprintln!("alone {single:?}, alternating {alternating:?} in {took:?}");
    assert!(
        took < Duration::from_millis(450),
        "rounds too slow to be exact: {took:?}"
    );
    assert_eq!(single_ok, 2, "{single:?}");
    assert_eq!(fleet_ok, single_ok, "{alternating:?}");
    let (s, h, body) = status(b, &shared.key).await;
    assert_eq!(s, 429);
    assert_eq!(body["code"], "rate_limited");
    assert!(h.contains_key("retry-after"));
    assert_eq!(h["ratelimit-policy"], "2;w=1");

    // Refill is shared too: one second later, two tokens fleet-wide, not two per node.
    // (A sleep to let time pass, not to synchronise anything.)
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let t = Instant::now();
    let after = round(&[b, a, b, a], &shared.key).await;
    assert!(t.elapsed() < Duration::from_millis(450));
    assert_eq!(after, vec![200, 200, 429, 429], "refill after 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_five_per_day_then_quota_exceeded_on_any_node() {
    let _serial = SERIAL.lock().await;
    let (redis, fleet) = two_nodes_on_redis().await;
    let k = create_key(fleet.config(), &["--plan", "q5"]);
    let own = create_key(fleet.config(), &["--quota", "3/hour"]);
    let gws = fleet.start(&[]).await;
    let (a, b) = (gws[0].http, gws[1].http);
    let statuses = round(&[a, b, a, b, a], &k.key).await;
    assert_eq!(statuses, vec![200; 5]);
    for addr in [a, b] {
        let (s, h, body) = status(addr, &k.key).await;
        assert_eq!(s, 429);
        assert_eq!(body["code"], "quota_exceeded");
        let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(
            retry > 0 && retry <= 86_400,
            "until the UTC day ends: {retry}"
        );
        assert_eq!(h["ratelimit-limit"], "5");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-policy"], "5;w=86400");
    }
    // A key's own quota overrides the plan's.
    assert_eq!(
        round(&[b, a, b, a], &own.key).await,
        vec![200, 200, 200, 429]
    );
    // Usage of the period is in Redis, where every node sees it.
    let used = redis.cmd(&["KEYS", "keygate:q:*"]);
    assert!(used.contains(&k.id), "{used}");
    // A quota without [redis] is a config error naming the field, and a CLI error.
    let plain = Fleet::new(1, "", "").await;
    let out = cli(
        plain.config(),
        &["keys", "create", "--name", "n", "--quota", "5/day"],
        SECRET_ENV,
    );
    assert!(!out.status.success());
    assert!(stderr_str(&out).contains("[redis]"), "{}", stderr_str(&out));
    let bad = plain.dir.path().join("bad.toml");
    std::fs::write(&bad, "[plans.x]\nrate = \"1/s\"\nquota = \"5/day\"\n").unwrap();
    let out = cli(&bad, &["check"], SECRET_ENV);
    assert!(!out.status.success());
    let err = stderr_str(&out) + &stdout_str(&out);
    assert!(err.contains("plans.x.quota"), "{err}");
}

/// THREATS L2 end to end: Redis stalls (`CLIENT PAUSE`: every command held for 4 s) under
/// traffic. Requests keep being answered, none 5xx, none held for the pause: a command waits at
/// most `command_timeout_ms` (200 ms), then the limiter falls back to per-node buckets
/// (`on_redis_down = "local"`), counted as timeouts, and the breaker opens (`keygate_redis_up`
/// 0) so later requests stop waiting at all. When the pause ends, the bucket is fleet-wide
/// again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_a_request_at_most_the_command_timeout() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let fleet = Fleet::new(2, &redis_limits("local"), &redis_section(&redis)).await;
    let k = create_key(fleet.config(), &["--plan", "p50"]);
    let low = create_key(fleet.config(), &["--plan", "low"]);
    let gws = fleet.start(&[]).await;
    let addrs = [gws[0].http, gws[1].http];
    wait_redis_up(&gws, true).await;
    assert_eq!(redis.cmd(&["CLIENT", "PAUSE", "4000", "ALL"]), "OK");
    let paused = Instant::now();
    let (mut slowest, mut n) = (Duration::ZERO, 0);
    // Sequential requests through the pause's first half, alternating nodes.
    while paused.elapsed() < Duration::from_secs(2) {
        let started = Instant::now();
        let (s, _, v) = status(addrs[n % 2], &k.key).await;
        slowest = slowest.max(started.elapsed());
        assert!(s == 200 || s == 429, "{s} {v}");
        n += 1;
    }
    eprintln!("{n} requests while Redis was paused; slowest {slowest:?}");
    assert!(n >= 4, "{n}");
    // A request that waited for Redis would have taken the rest of the pause (2 s or more).
    assert!(slowest < Duration::from_millis(1500), "{slowest:?}");
    for gw in &gws {
        let m = metrics(gw).await;
        let timeouts = metric(&m, r#"keygate_limiter_fallback_total{reason="timeout"}"#);
        assert!(timeouts > 0.0, "timeouts counted:\n{m}");
    }
    wait_redis_up(&gws, false).await;
    // The pause ends: fleet-wide again, by the health probe alone.
    wait_redis_up(&gws, true).await;
    let st = round(&[addrs[0], addrs[1], addrs[0], addrs[1]], &low.key).await;
    assert_eq!(st, vec![200, 200, 429, 429], "fleet-wide after the stall");
}

/// THREATS L8: a node killed (SIGKILL) while it holds a lease. Its unspent tokens were debited
/// in Redis when leased and die with it, never spent again: over the whole run the fleet
/// admits at most one bucket's worth (burst + rate × time) plus one batch per node
/// (`redis::lease`), and the surviving node goes on admitting at the plan's rate, short of it
/// by no more than the lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_holding_a_lease_never_lets_the_fleet_overspend() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let fleet = Fleet::new(2, &redis_limits("local"), &redis_section(&redis)).await;
    // p50: 50/s, burst 50; a batch is min(lease_max 100, burst, 50/s × 100 ms) = 5 tokens.
    let (rate, burst, batch) = (50.0, 50.0, 5.0);
    let k = create_key(fleet.config(), &["--plan", "p50"]);
    let mut gws = fleet.start(&[]).await;
    let addrs: Vec<_> = gws.iter().map(|g| g.http).collect();
    let started = Instant::now();
    let both = offer(&addrs, &k.key, 100, 4, Duration::from_secs(1)).await;
    drop(gws.remove(0)); // SIGKILL: its lease is neither spent nor given back
    let survivor = offer(&addrs[1..], &k.key, 100, 4, Duration::from_secs(2)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = (both.ok + survivor.ok) as f64;
    let bound = burst + rate * elapsed + 2.0 * batch;
    eprintln!(
        "admitted {admitted} in {elapsed:.2} s (bound {bound:.0}): both nodes {both:?}, survivor {survivor:?}"
    );
    for c in [both, survivor] {
        assert_eq!(c.server_error + c.other + c.failed, 0, "{c:?}");
    }
    // Should the bound fail, say whether the survivor decided without Redis meanwhile
    // (`on_redis_down = "local"`: a fresh local bucket, one burst more) or with it (then the
    // lease's accounting, or Redis' clock, let it through).
    let m = metrics(&gws[0]).await;
    let without_redis: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("keygate_limiter_fallback_total") || l.starts_with("keygate_redis_up")
        })
        .collect();
    assert!(
        admitted <= bound,
        "over-admitted: {admitted} > {bound:.0}; the survivor's {without_redis:?}"
    );
    // The survivor's 2 s at 50/s, less at most the dead node's batch and the
    // scheduling of a debug build on a shared machine.
    assert!(
        survivor.ok as f64 >= 0.75 * rate * 2.0 - batch,
        "the survivor starved: {survivor:?}"
    );
}

/// THREATS L9: two nodes whose wall clocks disagree by two days (one runs under `faketime`)
/// share one bucket and one daily quota, because GCRA and quota periods take Redis' `TIME`
/// inside the scripts, never a node's clock: had the skewed node counted its quota in its own
/// day, it would admit five more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_clocks_disagree_share_one_bucket_and_one_quota_period() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let fleet = Fleet::new(2, &redis_limits("local"), &redis_section(&redis)).await;
    let low = create_key(fleet.config(), &["--plan", "low"]);
    let quota = create_key(fleet.config(), &["--plan", "q5"]);
    let straight = spawn_ready(&fleet.nodes[0], &[], Duration::from_secs(20)).await;
    let skewed = spawn_with_clock(&fleet.nodes[1], "+2d", SECRET_ENV).await;
    wait_ready(&skewed, Duration::from_secs(20)).await;
    // The skew is real: the `Date` of a refusal the node writes itself is two days ahead.
    let date = |gw: &Gateway| {
        let addr = gw.http;
        async move {
            let (s, h, _) = get(addr, "/x", &[]).await;
            assert_eq!(s, 401);
            let text = h.get("date").unwrap().to_str().unwrap().to_owned();
            httpdate::parse_http_date(&text).unwrap()
        }
    };
    let ahead = date(&skewed).await.duration_since(date(&straight).await);
    assert!(
        ahead
            .as_ref()
            .is_ok_and(|d| *d >= Duration::from_secs(47 * 3600)),
        "{ahead:?}"
    );

    let st = round(
        &[straight.http, skewed.http, straight.http, skewed.http],
        &low.key,
    )
    .await;
    assert_eq!(st, vec![200, 200, 429, 429], "one bucket");
    // q5: two on each node, one more, then the period is spent on both nodes.
    let st = round(
        &[
            straight.http,
            skewed.http,
            straight.http,
            skewed.http,
            skewed.http,
        ],
        &quota.key,
    )
    .await;
    assert_eq!(st, vec![200, 200, 200, 200, 200]);
    for gw in [&skewed, &straight] {
        let (s, _, v) = status(gw.http, &quota.key).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (429, Some("quota_exceeded")),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_follows_on_redis_down_and_recovers() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    for mode in ["local", "fail_open", "fail_closed"] {
        let fleet = Fleet::new(2, &redis_limits(mode), &redis_section(&redis)).await;
        let k = create_key(fleet.config(), &["--plan", "p50"]);
        let low = create_key(fleet.config(), &["--plan", "low"]);
        let gws = fleet.start(&[]).await;
        let addrs: Vec<_> = gws.iter().map(|g| g.http).collect();
        // 200 req/s offered in total against 50/s: healthy, then Redis dies under load.
        let healthy = offer(&addrs, &k.key, 100, 4, Duration::from_secs(1)).await;
        redis.kill();
        let down = offer(&addrs, &k.key, 100, 4, Duration::from_secs(2)).await;
        eprintln!("{mode}: healthy {healthy:?}; redis down {down:?}");
        for c in [healthy, down] {
            assert_eq!(
                c.server_error + c.other + c.failed,
                0,
                "{mode}: no 5xx: {c:?}"
            );
        }
        let offered = (down.ok + down.limited) as f64;
        match mode {
            // Per-node buckets: each node admits at most its own burst + rate x 2 s.
            "local" => {
                assert!(down.ok > 50, "{mode}: local buckets admit: {down:?}");
                assert!(
                    down.ok <= 2 * (50 + 100) + 10,
                    "{mode}: still limited: {down:?}"
                );
                assert!(down.limited > 0, "{mode}: {down:?}");
            }
            "fail_open" => assert!(
                down.ok as f64 >= 0.9 * offered,
                "{mode}: admits while down: {down:?}"
            ),
            // Only tokens leased before the kill can still be spent.
            "fail_closed" => assert!(down.ok <= 2 * 5 + 2, "{mode}: refuses while down: {down:?}"),
            _ => unreachable!(),
        }
        wait_redis_up(&gws, false).await;
        for gw in &gws {
            let m = metrics(gw).await;
            let fallbacks: f64 = ["circuit_open", "timeout", "error"]
                .iter()
                .map(|r| {
                    metric(
                        &m,
                        &format!("keygate_limiter_fallback_total{{reason=\"{r}\"}}"),
                    )
                })
                .sum();
            assert!(fallbacks > 0.0, "{mode}: fallbacks counted:\n{m}");
            let log = gw.stderr_contents();
            assert!(
                log.contains("redis unreachable"),
                "{mode}: transition logged:\n{log}"
            );
            // /readyz stays ready in local / fail_open (and fail_closed: it answers 429, not 503).
            assert_eq!(get(gw.admin, "/readyz", &[]).await.0, 200);
        }
        // Redis comes back (empty: persistence is off): fleet limiting resumes by itself.
        redis.restart();
        wait_redis_up(&gws, true).await;
        let statuses = round(
            &[addrs[0], addrs[1], addrs[0], addrs[1], addrs[0], addrs[1]],
            &low.key,
        )
        .await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            2,
            "{mode}: fleet-wide again after recovery: {statuses:?}"
        );
        for gw in &gws {
            assert!(gw.stderr_contents().contains("redis reachable again"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_acl_user_never_leak_and_limits_work() {
    let _serial = SERIAL.lock().await;
    const PW: &str = "Redis-Pw-9f3b7c1e5a";
    let redis = RedisServer::start_with(RedisOpts {
        password: Some("Default-Pw-0d1e2f3a".into()),
        acl_users: vec![format!("keygate-gw on >{PW} {}", GATEWAY_ACL)],
        ..RedisOpts::default()
    });
    let section = format!(
        "{}\nusername = \"keygate-gw\"\npassword_env = \"KEYGATE_REDIS_PASSWORD\"",
        redis_section(&redis)
    );
    let fleet = Fleet::new(2, &redis_limits("fail_closed"), &section).await;
    let low = create_key(fleet.config(), &["--plan", "low"]);
    let q = create_key(fleet.config(), &["--plan", "q5"]);
    let env = [("KEYGATE_REDIS_PASSWORD", PW)];
    let gws = fleet.start(&env).await;
    let (a, b) = (gws[0].http, gws[1].http);
    // Limits and quotas work under the least-privilege user (fail_closed would refuse otherwise).
    let st = round(&[a, b, a, b], &low.key).await;
    assert_eq!(st.iter().filter(|s| **s == 200).count(), 2, "{st:?}");
    assert_eq!(round(&[a, b], &q.key).await, vec![200, 200]);
    // That user cannot touch anything outside its prefixes, nor run admin commands.
    let replies = common::redis::raw_session(
        redis.addr(),
        &[
            &["AUTH", "keygate-gw", PW],
            &["GET", "keygate:store:x"],
            &["GET", "keygate:rl:x"],
            &["FLUSHALL"],
            &["CONFIG", "GET", "requirepass"],
        ],
    )
    .unwrap();
    assert_eq!(replies[0], "OK");
    assert!(replies[1].starts_with("ERR:NOPERM"), "{replies:?}");
    assert_eq!(replies[2], "(nil)");
    assert!(replies[3].starts_with("ERR:NOPERM"), "{replies:?}");
    assert!(replies[4].starts_with("ERR:NOPERM"), "{replies:?}");
    // A gateway given a wrong password: no leak of that either, and limits follow the mode.
    let wrong = "Wrong-Pw-77aa88bb";
    let node = &fleet.nodes[1];
    let mut bad = Gateway::spawn(
        node,
        &[(SECRET_VAR, SECRET), ("KEYGATE_REDIS_PASSWORD", wrong)],
    )
    .await;
    wait_ready(&bad, Duration::from_secs(20)).await;
    assert_eq!(
        status(bad.http, &q.key).await.0,
        429,
        "fail_closed without a usable Redis"
    );
    wait_redis_up(std::slice::from_ref(&bad), false).await;
    let check = cli(
        fleet.config(),
        &["check"],
        &[(SECRET_VAR, SECRET), ("KEYGATE_REDIS_PASSWORD", PW)],
    );
    let show = cli(
        fleet.config(),
        &["keys", "show", &q.id, "--json"],
        &[(SECRET_VAR, SECRET), ("KEYGATE_REDIS_PASSWORD", PW)],
    );
    let mut artefacts = vec![
        ("check", stdout_str(&check) + &stderr_str(&check)),
        ("keys show", stdout_str(&show) + &stderr_str(&show)),
        ("bad stderr", bad.stderr_contents()),
        ("bad metrics", metrics(&bad).await),
    ];
    for (i, gw) in gws.iter().enumerate() {
        artefacts.push(("stderr", gw.stderr_contents()));
        artefacts.push(("metrics", metrics(gw).await));
        artefacts.push((
            "audit",
            read_lossy(&fleet.nodes[i].with_file_name("audit.jsonl")),
        ));
        artefacts.push((
            "usage",
            read_lossy(&fleet.nodes[i].with_file_name("usage.json")),
        ));
    }
    for (what, text) in &artefacts {
        for secret in [PW, wrong, "Default-Pw-0d1e2f3a"] {
            assert!(!text.contains(secret), "password in {what}:\n{text}");
        }
    }
    bad.sigterm();
    bad.wait_exit(Duration::from_secs(10)).await;
    assert!(!bad.stderr_contents().contains(wrong));
}

/// The gateway's least-privilege ACL (README "Least privilege"): limiter, quota and usage
/// keys only, and only the commands its scripts and health check use.
const GATEWAY_ACL: &str = "resetkeys ~keygate:rl:* ~keygate:q:* ~keygate:u:* resetchannels -@all \
    +ping +select +evalsha +eval +script|load +time +get +set +del +incrby +decrby +expireat \
    +pexpire +hincrby +hget +hgetall +hset +expire +sadd +smembers";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_counts_would_be_refusals_without_refusing() {
    let _serial = SERIAL.lock().await;
    let (_redis, fleet) = two_nodes_on_redis().await;
    let k = create_key(fleet.config(), &["--plan", "shadow"]);
    let gws = fleet.start(&[]).await;
    let (a, b) = (gws[0].http, gws[1].http);
    let mut remaining = Vec::new();
    for addr in [a, b, a, b, a] {
        let (s, h, _) = status(addr, &k.key).await;
        assert_eq!(s, 200, "shadow mode never refuses");
        remaining.push(h["ratelimit-remaining"].to_str().unwrap().to_owned());
    }
    // The headers announce what enforcement would do: the fleet bucket of 2 is empty.
    assert_eq!(&remaining[2..], ["0", "0", "0"], "{remaining:?}");
    let shadowed: f64 = {
        let mut n = 0.0;
        for gw in &gws {
            n += metric(
                &metrics(gw).await,
                "keygate_rate_limit_shadowed_total{plan=\"shadow\"}",
            );
        }
        n
    };
    assert_eq!(shadowed, 3.0);
}

/// Waits until `redis` holds a lease key of `lineage` (a node has written to it).
async fn wait_lease_on(redis: &RedisServer, lineage: &str) {
    eventually_named(
        "lease key on the new primary",
        Duration::from_secs(30),
        || async {
            let keys = redis.cmd(&["KEYS", "keygate:rl:*"]);
            keys.contains(lineage).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_without_restart() {
    let _serial = SERIAL.lock().await;
    let mut ha = Ha::start("keygate").await;
    let section = ha.section("keygate");
    let fleet = Fleet::new(2, &redis_limits("local"), &section).await;
    let before = create_key(fleet.config(), &["--plan", "low"]);
    let after = create_key(fleet.config(), &["--plan", "low"]);
    let probes = [
        create_key(fleet.config(), &[]),
        create_key(fleet.config(), &[]),
    ];
    let gws = fleet.start(&[]).await;
    let addrs = [gws[0].http, gws[1].http];
    let ok = |v: &[u16]| v.iter().filter(|s| **s == 200).count();
    let st = round(&[addrs[0], addrs[1], addrs[0], addrs[1]], &before.key).await;
    assert_eq!(
        ok(&st),
        2,
        "fleet-wide through the sentinel-discovered primary: {st:?}"
    );

    ha.fail_over("keygate").await;
    let replica = &ha.replica;
    // Traffic makes each node notice the dead primary, ask the sentinels, and move on.
    eventually_named(
        "both nodes write to the new primary",
        Duration::from_secs(30),
        || async {
            for (i, addr) in addrs.iter().enumerate() {
                assert_ne!(status(*addr, &probes[i].key).await.0 / 100, 5);
            }
            let keys = replica.cmd(&["KEYS", "keygate:rl:*"]);
            probes.iter().all(|p| keys.contains(&p.id)).then_some(())
        },
    )
    .await;
    wait_lease_on(replica, &probes[1].id).await;
    let st = round(&[addrs[1], addrs[0], addrs[1], addrs[0]], &after.key).await;
    assert_eq!(ok(&st), 2, "fleet-wide on the new primary: {st:?}");
    for gw in &gws {
        let log = gw.stderr_contents();
        assert!(
            log.contains(&format!("127.0.0.1:{}", replica.port)),
            "discovery logged:\n{log}"
        );
    }
}

/// 3, 5 and 7 requests on the three nodes; then `keys show` must report 15 and the latest use.
/// Requests on three nodes add up in `keys show` and `keys list`; returns the key id.
async fn usage_is_summed_over_three_nodes(fleet: &Fleet, envs: &[(&str, &str)]) -> String {
    let k = create_key(fleet.config(), &[]);
    let gws = fleet.start(envs).await;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (i, gw) in gws.iter().enumerate() {
        for _ in 0..(3 + 2 * i) {
            assert_eq!(status(gw.http, &k.key).await.0, 200);
        }
    }
    let mut env = SECRET_ENV.to_vec();
    env.extend_from_slice(envs);
    let shown = eventually_named(
        "keys show sums the fleet",
        Duration::from_secs(15),
        || async {
            let out = cli(fleet.config(), &["keys", "show", &k.id, "--json"], &env);
            let v = json(&out.stdout);
            (v["requests"] == 15).then_some(v)
        },
    )
    .await;
    assert!(shown["last_used"].as_i64().unwrap() >= t0, "{shown}");
    assert_eq!(shown["status_classes"]["2xx"], 15, "{shown}");
    let listed = json(&cli(fleet.config(), &["keys", "list", "--json"], &env).stdout);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == k.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["requests"], 15);
    k.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_on_three_nodes_is_summed_in_redis() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let fleet = Fleet::new(3, &redis_limits("local"), &redis_section(&redis)).await;
    let id = usage_is_summed_over_three_nodes(&fleet, &[]).await;
    assert!(redis.cmd(&["KEYS", "keygate:u:*"]).contains("key_"));
    // The control plane's REST API reads the same fleet-wide sums from Redis.
    let cp_cfg = fleet.config().with_file_name("control.toml");
    let text = std::fs::read_to_string(fleet.config()).unwrap()
        + "\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\n";
    std::fs::write(&cp_cfg, text).unwrap();
    let out = cli(
        &cp_cfg,
        &["admin-token", "create", "--role", "read"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let token = stdout_str(&out).trim().to_owned();
    let cp = ControlPlane::spawn(&cp_cfg).await;
    let auth = format!("Bearer {token}");
    let (st, _, body) = get(
        cp.addr,
        &format!("/v1/api-keys/{id}"),
        &[("authorization", &auth)],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["requests"], 15, "{v}");
    assert_eq!(v["status_classes"]["2xx"], 15, "{v}");
    assert!(
        !fleet.dir.path().join("usage.json").exists(),
        "usage goes to redis, not the file"
    );
}

/// A usage flush to Redis that fails partway (a foreign value under one key's usage hash)
/// keeps only what it did not add: the parts before the failure are not added again by the
/// next flush, and the part that failed added nothing, so every key counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_flush_that_fails_partway_keeps_only_what_it_did_not_add() {
    use keygate::usage::{Delta, Used};
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let text = format!("[redis]\n{}\n", redis_section(&redis));
    let config = keygate::config::Config::parse(&text, Path::new("keygate.toml")).unwrap();
    let settings = keygate::redis::Settings::from_config(&config)
        .unwrap()
        .unwrap();
    let metrics = keygate::metrics::Metrics::new(0);
    let client = keygate::redis::Client::new(settings, metrics.redis_metrics());
    let used = Used {
        last_used: 1_700_000_000,
        requests: 1,
        s2xx: 1,
        ..Used::default()
    };
    let ids: Vec<String> = (0..1000).map(|i| format!("key_{i:04}")).collect();
    let mut deltas: Vec<Delta> = ids
        .iter()
        .map(|id| Delta {
            id: id.clone(),
            used,
        })
        .collect();
    let counts = || -> Vec<String> {
        let cmds: Vec<[String; 3]> = ids
            .iter()
            .map(|id| ["HGET".into(), format!("keygate:u:{id}"), "requests".into()])
            .collect();
        let cmds: Vec<[&str; 3]> = cmds
            .iter()
            .map(|c| c.each_ref().map(String::as_str))
            .collect();
        let cmds: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
        common::redis::raw_session(redis.addr(), &cmds).unwrap()
    };
    let foreign = "keygate:u:key_0650";
    redis.cmd(&["SET", foreign, "not usage"]);
    let e = keygate::redis::usage::add(&client, &mut deltas)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("key_0650"), "{e}");
    // What is left is the part that failed and everything after it, none of it counted.
    let left = ids.len() - deltas.len();
    assert!(left > 0 && left <= 650, "{left} added");
    assert_eq!(deltas[0].id, ids[left]);
    let halfway = counts();
    assert!(halfway[..left].iter().all(|c| c == "1"), "{halfway:?}");
    let rest = halfway[left..].iter().zip(&ids[left..]);
    assert!(
        rest.filter(|(_, id)| *id != "key_0650")
            .all(|(c, _)| c == "(nil)"),
        "{halfway:?}"
    );
    redis.cmd(&["DEL", foreign]);
    keygate::redis::usage::add(&client, &mut deltas)
        .await
        .unwrap();
    assert!(deltas.is_empty());
    assert!(counts().iter().all(|c| c == "1"), "{:?}", counts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_file_shared_by_three_nodes_adds_up() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::new(3, "", "").await;
    usage_is_summed_over_three_nodes(&fleet, &[]).await;
}

/// A self-signed certificate for `localhost`, written as `<prefix>.pem` and `<prefix>-key.pem`.
fn self_signed(dir: &Path, prefix: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{prefix}.pem")),
        dir.join(format!("{prefix}-key.pem")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// THREATS L5 end to end over TLS: gateways and the CLI reach Redis at `rediss://`, trusting
/// only the certificate the test generated: the bucket is fleet-wide and usage is summed
/// through it. A node that trusts another certificate never gets through: Redis stays down
/// for it (`keygate_redis_up` 0, per-node buckets, as `on_redis_down = "local"` says) and
/// its log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_test_ca_is_fleet_wide_and_another_ca_is_refused() {
    let _serial = SERIAL.lock().await;
    let certs = tempdir();
    let (cert, key) = self_signed(certs.path(), "redis");
    let (other, _) = self_signed(certs.path(), "other");
    let redis = RedisServer::start_with(RedisOpts {
        tls: Some((cert.clone(), key)),
        ..RedisOpts::default()
    });
    let section = |ca: &Path| {
        format!(
            "url = \"{}\"\nca = \"{}\"\ncommand_timeout_ms = 500",
            redis.tls_url(),
            ca.display()
        )
    };
    let fleet = Fleet::new(2, &redis_limits("local"), &section(&cert)).await;
    let k = create_key(fleet.config(), &["--plan", "low"]);
    let gws = fleet.start(&[]).await;
    wait_redis_up(&gws, true).await;
    let st = round(
        &[gws[0].http, gws[1].http, gws[0].http, gws[1].http],
        &k.key,
    )
    .await;
    assert_eq!(st, vec![200, 200, 429, 429], "fleet-wide over TLS");
    eventually_named("usage summed over TLS", Duration::from_secs(15), || async {
        let out = cli(
            fleet.config(),
            &["keys", "show", &k.id, "--json"],
            SECRET_ENV,
        );
        (json(&out.stdout)["status_classes"]["2xx"] == 2).then_some(())
    })
    .await;
    assert!(redis.cmd(&["KEYS", "keygate:u:*"]).contains(&k.id));

    let wrong = Fleet::new(1, &redis_limits("local"), &section(&other)).await;
    let w = create_key(wrong.config(), &["--plan", "low"]);
    let gw = wrong.start(&[]).await;
    wait_redis_up(&gw, false).await;
    let st = round(&[gw[0].http, gw[0].http, gw[0].http], &w.key).await;
    assert_eq!(st, vec![200, 200, 429], "the node's own bucket");
    let log = gw[0].stderr_contents();
    assert!(log.contains("redis TLS"), "{log}");
    assert!(
        !redis.cmd(&["KEYS", "keygate:*"]).contains(&w.id),
        "nothing of the refused node's key in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_then_up_without_traffic() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    redis.kill();
    let fleet = Fleet::new(2, &redis_limits("local"), &redis_section(&redis)).await;
    let low = create_key(fleet.config(), &["--plan", "low"]);
    let other = create_key(fleet.config(), &["--plan", "low"]);
    let gws = fleet.start(&[]).await;
    let addrs = [gws[0].http, gws[1].http];
    // Serving from per-node buckets meanwhile: ready, never 5xx.
    assert_eq!(status(addrs[0], &low.key).await.0, 200);
    wait_redis_up(&gws, false).await;
    redis.restart();
    // No request needed: the health probe notices.
    wait_redis_up(&gws, true).await;
    let st = round(&[addrs[0], addrs[1], addrs[0], addrs[1]], &other.key).await;
    assert_eq!(st, vec![200, 200, 429, 429], "fleet-wide once Redis is up");
}
