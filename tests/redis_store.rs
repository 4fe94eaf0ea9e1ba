//! The key store on a real `redis-server` (issue 11): the CLI writes into Redis, gateways with
//! `[keys] source = "redis"` load the table and follow the log with a blocking read, and
//! "revocation is final" holds against whoever can write Redis.
//!
//! Every test starts its own Redis (tests/common/redis.rs, free port, temp dir) and real
//! `keygate serve` processes; one test at a time (`SERIAL`). Waits are polls with deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::{Ha, RedisOpts, RedisServer};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ENFORCE: Duration = Duration::from_secs(10);

struct Nodes {
    dir: tempfile::TempDir,
    up: Upstream,
    configs: Vec<PathBuf>,
}

impl Nodes {
    async fn new(n: usize, redis: &RedisServer) -> Nodes {
        Nodes::with_redis(n, &format!("url = \"{}\"", redis.url())).await
    }

    /// `redis`: the `[redis]` body.
    async fn with_redis(n: usize, redis: &str) -> Nodes {
        let dir = tempdir();
        let up = Upstream::start(Mode::Echo).await;
        let configs = (0..n)
            .map(|i| {
                let node = dir.path().join(format!("n{i}"));
                std::fs::create_dir_all(&node).unwrap();
                write_file(
                    &node,
                    "keygate.toml",
                    &format!(
                        r#"[keys]
source = "redis"
store = "unused-keys.jsonl"
audit_log = "audit.jsonl"

[redis]
{redis}

[plans.default]
rate = "100000/s"
burst = 100000

[limits]
auth_failures_per_minute = 1000000

{rest}"#,
                        rest = one_route(up.addr())
                    ),
                )
            })
            .collect();
        Nodes { dir, up, configs }
    }

    fn cli_config(&self) -> &Path {
        &self.configs[0]
    }

    /// A control plane's config beside node 0's: its config with `[control]` (and `extra`).
    fn control_config(&self, extra: &str) -> PathBuf {
        let base = std::fs::read_to_string(&self.configs[0]).unwrap();
        write_file(
            self.configs[0].parent().unwrap(),
            "control.toml",
            &format!("{base}\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\n{extra}"),
        )
    }
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    get(gw.http, "/invoices/1", &[("x-api-key", key)]).await.0
}

async fn until(gw: &Gateway, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    let key = key.to_owned();
    let addr = gw.http;
    eventually_named(&format!("{want} on {addr}"), ENFORCE, || {
        let key = key.clone();
        async move { (get(addr, "/invoices/1", &[("x-api-key", &key)]).await.0 == want).then_some(()) }
    })
    .await;
    started.elapsed()
}

async fn metric(gw: &Gateway, name: &str) -> f64 {
    let (_, _, body) = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
        .unwrap_or(0.0)
}

/// The CLI writes into Redis (no store file), two gateways load and follow it: creations and
/// revocations reach both within milliseconds; `keys list` reads Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_and_gateways_follow_the_redis_store() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let k2 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let gws = [
        spawn_ready(&nodes.configs[0], &[], ENFORCE).await,
        spawn_ready(&nodes.configs[1], &[], ENFORCE).await,
    ];
    for gw in &gws {
        until(gw, &k1.key, 200).await;
        assert_eq!(status(gw, &k2.key).await, 200);
    }
    assert!(
        !nodes.dir.path().join("n0/unused-keys.jsonl").exists(),
        "the store is in Redis"
    );
    assert!(redis.cmd(&["HLEN", "keygate:s:keys"]).contains('2'));

    // Revocations: CLI returned → 401 on both gateways.
    let mut delays = Vec::new();
    for _ in 0..10 {
        let k = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
        for gw in &gws {
            until(gw, &k.key, 200).await;
        }
        cli_ok(nodes.cli_config(), &["keys", "revoke", &k.id]);
        let started = Instant::now();
        for gw in &gws {
            until(gw, &k.key, 401).await;
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    eprintln!(
        "redis store: revoke → 401 on 2 gateways: p50 {:?}, max {:?} (n = {})",
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        delays.len()
    );
    let listed = cli_ok(nodes.cli_config(), &["keys", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 12);
    assert!(metric(&gws[0], "keygate_table_revision").await >= 22.0);
    drop(nodes.up);
}

/// Write access to Redis alone cannot bring a revoked key back: an edited record (MAC no
/// longer verifies), an old record written back (valid MAC, old revision) into the latest
/// hash and the stream; running gateways keep the revocation, a gateway started afterwards
/// loads it revoked (the revoked hash is never rewritten), and the CLI refuses to edit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_final_against_whoever_writes_redis() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let k2 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let active = redis.cmd(&["HGET", "keygate:s:keys", &k1.id]);
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &k1.key, 200).await;
    cli_ok(nodes.cli_config(), &["keys", "revoke", &k1.id]);
    until(&gw, &k1.key, 401).await;
    let revoked = redis.cmd(&["HGET", "keygate:s:keys", &k1.id]);
    assert!(revoked.contains("revoked_at"), "{revoked}");

    // An old version written back, as a raw Redis client could.
    let rev: u64 = redis
        .cmd(&["HGET", "keygate:s:meta", "rev"])
        .trim()
        .parse()
        .unwrap();
    redis.cmd(&["HSET", "keygate:s:keys", &k1.id, &active]);
    redis.cmd(&[
        "XADD",
        "keygate:s:log",
        &format!("{}-1", rev + 1),
        "r",
        &active,
    ]);
    // An edited revoked record (revocation removed, MAC kept).
    let edited = revoked.replacen("\"revoked_at\":", "\"x\":", 1);
    redis.cmd(&[
        "XADD",
        "keygate:s:log",
        &format!("{}-1", rev + 2),
        "r",
        &edited,
    ]);
    let admin = gw.admin;
    // Edited records are skipped like any corrupt line (the file store does the same).
    eventually_named("edited record refused", ENFORCE, || async move {
        let (_, _, body) = get(admin, "/metrics", &[]).await;
        String::from_utf8_lossy(&body)
            .contains("keygate_source_errors_total{kind=\"corrupt_line\"} 1\n")
            .then_some(())
    })
    .await;
    assert_eq!(status(&gw, &k1.key).await, 401);
    assert_eq!(status(&gw, &k2.key).await, 200);
    // Each tampered entry is judged once, not re-read forever; the writers go on after it.
    let k3 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&gw, &k3.key, 200).await;
    assert_eq!(
        metric(&gw, "keygate_source_errors_total{kind=\"corrupt_line\"}").await,
        1.0
    );

    // A gateway started now loads k1 revoked, though `s:keys` holds the old active version.
    let fresh = spawn_ready(&nodes.configs[1], &[], ENFORCE).await;
    until(&fresh, &k2.key, 200).await;
    assert_eq!(status(&fresh, &k1.key).await, 401);

    // Writers refuse too: the CLI will not edit a revoked key, and a new version without the
    // revocation is refused by the write script itself (the revoked hash).
    let out = cli(
        nodes.cli_config(),
        &["keys", "update", &k1.id, "--label", "x=y"],
        SECRET_ENV,
    );
    assert!(!out.status.success(), "{}", stdout_str(&out));
}

/// Write access to Redis needs no hash secret: a stream entry with a huge id moves the head
/// writers continue from (the write script adopts a stream top above its revision). Versions
/// numbered past the highest revision a key table holds (2^40 - 1) would be ignored by every
/// gateway once a key has one, so writers refuse to number them, loudly, and write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_stream_head_past_what_a_table_holds_is_refused_not_written() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    redis.cmd(&["XADD", "keygate:s:log", "1099511627776-1", "r", "{}"]);
    let out = cli(nodes.cli_config(), &["keys", "revoke", &k1.id], SECRET_ENV);
    assert!(!out.status.success(), "{}", stdout_str(&out));
    assert!(
        stderr_str(&out).contains("the highest a key table holds"),
        "{}",
        stderr_str(&out)
    );
    let top = redis.cmd(&["XREVRANGE", "keygate:s:log", "+", "-", "COUNT", "1"]);
    assert!(
        top.contains("1099511627776-1"),
        "nothing written after it: {top}"
    );
    let held = redis.cmd(&["HGET", "keygate:s:keys", &k1.id]);
    assert!(!held.contains("revoked_at"), "{held}");
}

/// Redis down: gateways keep serving their last table (and say so); Redis back with its data:
/// they resume from their revision without a full reload, and new changes reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_keeps_the_last_table_and_resumes_without_reload() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(RedisOpts {
        persist: true,
        ..RedisOpts::default()
    });
    let nodes = Nodes::new(1, &redis).await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &k1.key, 200).await;
    let loads = |gw: &Gateway| gw.stderr_contents().matches("key table loaded").count();
    assert_eq!(loads(&gw), 1);

    redis.kill();
    let admin = gw.admin;
    eventually_named("redis outage counted", ENFORCE, || async move {
        let (_, _, body) = get(admin, "/metrics", &[]).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .any(|l| {
                l.starts_with("keygate_source_errors_total{kind=\"redis\"}") && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;
    assert_eq!(status(&gw, &k1.key).await, 200, "fail static");
    assert_eq!(
        get(gw.admin, "/readyz", &[]).await.0,
        200,
        "on_stale = serve"
    );

    redis.restart();
    let k2 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&gw, &k2.key, 200).await;
    cli_ok(nodes.cli_config(), &["keys", "revoke", &k1.id]);
    until(&gw, &k1.key, 401).await;
    assert_eq!(loads(&gw), 1, "resumed from its revision, no reload");

    // A restart while Redis is down serves the sealed local copy, with its real sync age.
    let cache = nodes.configs[0].with_file_name("feed-cache.jsonl");
    eventually_named("revocation in the local copy", ENFORCE, || {
        let cache = cache.clone();
        async move { read_lossy(&cache).contains("revoked_at").then_some(()) }
    })
    .await;
    drop(gw);
    redis.kill();
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &k2.key, 200).await;
    assert_eq!(status(&gw, &k1.key).await, 401);
    assert!(metric(&gw, "keygate_table_sync_age_seconds").await >= 0.0);
    redis.restart();
    let k3 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&gw, &k3.key, 200).await;
}

/// Two control planes on one Redis store: each serves the REST API and the feed; writes through
/// either (and the CLI) reach three `source = "redis"` gateways and a feed-mode gateway behind
/// one of them (50 revocations timed, p50/p99 printed); one control plane killed, the other
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_redis_serve_the_api_and_the_feed() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(4, &redis).await;
    let base = std::fs::read_to_string(&nodes.configs[0]).unwrap();
    let cp_cfg = nodes.control_config("heartbeat_ms = 200\n");
    let mint = |role: &str| {
        let out = cli(
            &cp_cfg,
            &["admin-token", "create", "--role", role],
            SECRET_ENV,
        );
        assert!(out.status.success(), "{}", stderr_str(&out));
        stdout_str(&out).trim().to_owned()
    };
    let (write, feed) = (mint("write"), mint("feed"));
    let mut cp1 = Some(ControlPlane::spawn(&cp_cfg).await);
    let cp2 = ControlPlane::spawn(&cp_cfg).await;
    // Gateways A (three) follow Redis; gateway B follows cp2's feed.
    let gw_a = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    let gw_a1 = spawn_ready(&nodes.configs[1], &[], ENFORCE).await;
    let gw_a2 = spawn_ready(&nodes.configs[2], &[], ENFORCE).await;
    let feed_cfg = base
        .replace(
            "source = \"redis\"",
            &format!(
                "source = \"feed\"\nfeed_url = \"http://{}/v1/feed\"\nfeed_token_env = \"KEYGATE_FEED_TOKEN\"\nfeed_cache = \"feed-cache.jsonl\"",
                cp2.addr
            ),
        );
    let node1 = nodes.configs[3].parent().unwrap().to_path_buf();
    let feed_cfg = write_file(&node1, "feed.toml", &feed_cfg);
    let gw_b = spawn_ready(&feed_cfg, &[("KEYGATE_FEED_TOKEN", &feed)], ENFORCE).await;

    let api = |addr: std::net::SocketAddr, method: http::Method, path: String, body: String| {
        let auth = format!("Bearer {write}");
        async move {
            let (s, _, b) = request(
                addr,
                method,
                &path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
            (
                s,
                serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default(),
            )
        }
    };
    let body = r#"{"name":"via-cp1","owner":"o","scopes":["invoices:read"]}"#.to_owned();
    let (s, v) = api(
        cp1.as_ref().unwrap().addr,
        http::Method::POST,
        "/v1/api-keys".into(),
        body,
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (id, key) = (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    );
    for gw in [&gw_a, &gw_b] {
        until(gw, &key, 200).await;
    }
    let (s, v) = api(
        cp2.addr,
        http::Method::DELETE,
        format!("/v1/api-keys/{id}"),
        String::new(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let all = [&gw_a, &gw_a1, &gw_a2, &gw_b];
    for gw in all {
        until(gw, &key, 401).await;
    }
    // 50 revocations through alternating control planes: API response → 401 on all four.
    let mut keys = Vec::new();
    for i in 0..50 {
        let body = format!(r#"{{"name":"k{i}","owner":"o","scopes":["invoices:read"]}}"#);
        let (s, v) = api(cp2.addr, http::Method::POST, "/v1/api-keys".into(), body).await;
        assert_eq!(s, 201, "{v}");
        keys.push((
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        ));
    }
    for (_, key) in &keys {
        for gw in all {
            until(gw, key, 200).await;
        }
    }
    let mut delays = Vec::new();
    for (i, (id, key)) in keys.iter().enumerate() {
        let cp = if i % 2 == 0 {
            cp1.as_ref().unwrap().addr
        } else {
            cp2.addr
        };
        let (s, v) = api(
            cp,
            http::Method::DELETE,
            format!("/v1/api-keys/{id}"),
            String::new(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let started = Instant::now();
        for gw in all {
            let deadline = Instant::now() + ENFORCE;
            while status(gw, key).await != 401 {
                if Instant::now() >= deadline {
                    let mut others = Vec::new();
                    for g in all {
                        others.push(status(g, key).await);
                    }
                    panic!(
                        "revocation {i} never reached {} (all: {others:?}); store: {} meta {} xlen {}\n{}",
                        gw.http,
                        redis.cmd(&["HGET", "keygate:s:keys", id]),
                        redis.cmd(&["HGETALL", "keygate:s:meta"]),
                        redis.cmd(&["XLEN", "keygate:s:log"]),
                        gw.stderr_contents()
                    );
                }
                tokio::task::yield_now().await;
            }
        }
        delays.push(started.elapsed());
    }
    delays.sort();
    eprintln!(
        "redis store: REST revoke → 401 on 3 redis + 1 feed gateways: p50 {:?}, p99 {:?}, max {:?} (n = {})",
        delays[delays.len() / 2],
        delays[(delays.len() * 99).div_ceil(100) - 1],
        delays[delays.len() - 1],
        delays.len()
    );
    let k = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&gw_b, &k.key, 200).await;
    // cp1 killed while writes go on through cp1 and cp2: every write acknowledged by either
    // is in the store and enforced; cp2 keeps serving.
    let mut written = Vec::new();
    for i in 0..20 {
        if i == 10 {
            drop(cp1.take());
        }
        let cp = match (&cp1, i % 2) {
            (Some(c), 0) => c.addr,
            _ => cp2.addr,
        };
        let body = format!(r#"{{"name":"w{i}","owner":"o","scopes":["invoices:read"]}}"#);
        let (s, v) = api(cp, http::Method::POST, "/v1/api-keys".into(), body).await;
        assert_eq!(s, 201, "{v}");
        written.push(v["key"].as_str().unwrap().to_owned());
    }
    for key in &written {
        until(&gw_a, key, 200).await;
        until(&gw_b, key, 200).await;
    }
    let (s, v) = api(
        cp2.addr,
        http::Method::GET,
        "/v1/api-keys?limit=1000".into(),
        String::new(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 72, "{v}");
    let (s, _, _) = get(cp2.addr, "/readyz", &[]).await;
    assert_eq!(s, 200);
}

/// Record lines of a store file (header and meta lines left out), as written.
fn record_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("{\"rev\""))
        .map(str::to_owned)
        .collect()
}

/// `keygate store migrate`: file → Redis → file keeps the log id, every version and every
/// signature (record lines byte-for-byte equal); gateways on the migrated store enforce the
/// same keys; running it again changes nothing; Redis holding another log is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_round_trips_byte_for_byte() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let redis_cfg = nodes.configs[0].clone();
    let dir = redis_cfg.parent().unwrap().to_path_buf();
    let text = std::fs::read_to_string(&redis_cfg).unwrap();
    let file_cfg = write_file(
        &dir,
        "file.toml",
        &text
            .replace("source = \"redis\"\n", "")
            .replace("unused-keys.jsonl", "keys.jsonl"),
    );
    let back_cfg = write_file(
        &dir,
        "back.toml",
        &text
            .replace("source = \"redis\"\n", "")
            .replace("unused-keys.jsonl", "back.jsonl"),
    );
    let k1 = create_key(&file_cfg, &["--scope", "invoices:read"]);
    let k2 = create_key(&file_cfg, &["--scope", "invoices:read"]);
    cli_ok(&file_cfg, &["keys", "update", &k2.id, "--label", "team=a"]);
    cli_ok(&file_cfg, &["keys", "revoke", &k1.id]);
    let original = record_lines(&dir.join("keys.jsonl"));
    assert_eq!(original.len(), 4);

    cli_ok(&file_cfg, &["store", "migrate", "--to", "redis"]);
    cli_ok(&file_cfg, &["store", "migrate", "--to", "redis"]); // idempotent
    assert_eq!(redis.cmd(&["XLEN", "keygate:s:log"]).trim(), "4");
    let listed = |cfg: &Path| -> serde_json::Value {
        serde_json::from_str(&cli_ok(cfg, &["keys", "list", "--json"])).unwrap()
    };
    assert_eq!(
        listed(&file_cfg),
        listed(&redis_cfg),
        "the same keys, the same state"
    );
    let gw = spawn_ready(&redis_cfg, &[], ENFORCE).await;
    until(&gw, &k2.key, 200).await;
    assert_eq!(status(&gw, &k1.key).await, 401);

    cli_ok(&redis_cfg, &["store", "migrate", "--to", "file"]);
    // `back.toml` points the file side elsewhere: migrate from Redis into a fresh file.
    cli_ok(&back_cfg, &["store", "migrate", "--to", "file"]);
    assert_eq!(
        record_lines(&dir.join("back.jsonl")),
        original,
        "byte-for-byte"
    );
    let header = |p: &str| {
        std::fs::read_to_string(dir.join(p))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(header("back.jsonl"), header("keys.jsonl"), "same log id");

    // Another store's file into this Redis: refused.
    let other_cfg = write_file(
        &dir,
        "other.toml",
        &text
            .replace("source = \"redis\"\n", "")
            .replace("unused-keys.jsonl", "other.jsonl"),
    );
    create_key(&other_cfg, &["--scope", "invoices:read"]);
    let out = cli(
        &other_cfg,
        &["store", "migrate", "--to", "redis"],
        SECRET_ENV,
    );
    assert!(!out.status.success());
    assert!(
        stderr_str(&out).contains("another store"),
        "{}",
        stderr_str(&out)
    );
}

/// Sentinel failover under the store (THREATS L3): with `revoke_wait_replicas = 1` a revocation
/// is acknowledged only once the replica has it, so the failover loses no acknowledged
/// revocation; writers and gateways follow the new primary without a restart; with no replica
/// left, a revocation is still written and enforced but the CLI says it is not replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_no_acknowledged_revocation() {
    let _serial = SERIAL.lock().await;
    let mut ha = Ha::start("store").await;
    let section = format!(
        "{}\nrevoke_wait_replicas = 1\nrevoke_wait_timeout_ms = 1000",
        ha.section("store")
    );
    let nodes = Nodes::with_redis(2, &section).await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let k2 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let gws = [
        spawn_ready(&nodes.configs[0], &[], ENFORCE).await,
        spawn_ready(&nodes.configs[1], &[], ENFORCE).await,
    ];
    for gw in &gws {
        until(gw, &k1.key, 200).await;
    }
    // Acknowledged: the replica has it.
    cli_ok(nodes.cli_config(), &["keys", "revoke", &k1.id]);
    assert!(ha
        .replica
        .cmd(&["HGET", "keygate:s:keys", &k1.id])
        .contains("revoked_at"));

    ha.fail_over("store").await;
    // The CLI finds the new primary through the sentinels (a first try may still hit the dead
    // one); with no replica left, the revocation is written but reported as not replicated.
    let out = eventually_named("revoke on the new primary", Duration::from_secs(30), || {
        let cfg = nodes.cli_config().to_path_buf();
        let id = k2.id.clone();
        async move {
            let out = cli(&cfg, &["keys", "revoke", &id], SECRET_ENV);
            (out.status.success() || stderr_str(&out).contains("replicas")).then_some(out)
        }
    })
    .await;
    assert!(!out.status.success(), "no replica is left to confirm it");
    assert!(stderr_str(&out).contains("written"), "{}", stderr_str(&out));
    let k3 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    for gw in &gws {
        until(gw, &k3.key, 200).await;
        until(gw, &k2.key, 401).await;
        assert_eq!(
            status(gw, &k1.key).await,
            401,
            "acknowledged revocation survived"
        );
    }
}

/// THREATS L4: a control plane refuses a Redis whose `maxmemory-policy` could evict the
/// store's keys, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_the_store_is_refused() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let nodes = Nodes::new(1, &redis).await;
    let cp_cfg = nodes.control_config("");
    let err = match ControlPlane::try_spawn(&cp_cfg).await {
        Ok(_) => panic!("a control plane started on an evicting Redis"),
        Err(e) => e,
    };
    assert!(err.contains("maxmemory-policy"), "{err}");
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    ControlPlane::spawn(&cp_cfg).await;
}

/// `keys compact` on the Redis store trims the stream (`[redis] stream_keep_entries`); a
/// gateway that was behind the trimmed history (stopped with SIGSTOP meanwhile) sees the gap
/// and reloads the whole table instead of missing what was trimmed: the revocation made while
/// it was stopped is enforced, and the keys created meanwhile work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_trimmed_stream_reloads_whole() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::with_redis(
        1,
        &format!("url = \"{}\"\nstream_keep_entries = 1", redis.url()),
    )
    .await;
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &k1.key, 200).await;
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &gw.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let later: Vec<_> = (0..3)
        .map(|_| create_key(nodes.cli_config(), &["--scope", "invoices:read"]))
        .collect();
    cli_ok(nodes.cli_config(), &["keys", "revoke", &k1.id]);
    cli_ok(nodes.cli_config(), &["keys", "compact"]);
    assert_eq!(redis.cmd(&["XLEN", "keygate:s:log"]).trim(), "1");
    signal("-CONT");
    until(&gw, &k1.key, 401).await;
    for k in &later {
        until(&gw, &k.key, 200).await;
    }
    assert!(
        gw.stderr_contents().matches("key table loaded").count() >= 2,
        "reloaded whole:\n{}",
        gw.stderr_contents()
    );
}

/// THREATS L3 without `WAIT`: the store goes back under a running control plane (a failover
/// lost the newest writes, simulated by removing the last revision from Redis). The control
/// plane continues the store as a new log after the revision it served, with the lost
/// revocation re-applied from its memory; gateways reload whole and keep the key revoked, a
/// gateway started afterwards loads it revoked, and new keys work (no revision reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_back_continues_as_a_new_log() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let cp_cfg = nodes.control_config("heartbeat_ms = 200\n");
    let k1 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let k2 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let active = redis.cmd(&["HGET", "keygate:s:keys", &k1.id]);
    let _cp = ControlPlane::spawn(&cp_cfg).await;
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &k1.key, 200).await;
    cli_ok(nodes.cli_config(), &["keys", "revoke", &k1.id]);
    until(&gw, &k1.key, 401).await;
    let old_log = redis.cmd(&["HGET", "keygate:s:meta", "log"]);

    // The revocation (revision 3) is lost, as an asynchronous failover would lose it.
    redis.cmd(&["XDEL", "keygate:s:log", "3-1"]);
    redis.cmd(&["HSET", "keygate:s:keys", &k1.id, &active]);
    redis.cmd(&["HDEL", "keygate:s:revoked", &k1.id]);
    redis.cmd(&["HSET", "keygate:s:meta", "rev", "2"]);

    eventually_named("a new log", Duration::from_secs(20), || {
        let log = redis.cmd(&["HGET", "keygate:s:meta", "log"]);
        let old = old_log.clone();
        async move { (log != old).then_some(()) }
    })
    .await;
    assert!(redis
        .cmd(&["HGET", "keygate:s:keys", &k1.id])
        .contains("revoked_at"));
    let rev: u64 = redis
        .cmd(&["HGET", "keygate:s:meta", "rev"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        rev > 3,
        "revisions continue after the highest served: {rev}"
    );
    let k3 = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&gw, &k3.key, 200).await;
    assert_eq!(status(&gw, &k1.key).await, 401);
    assert_eq!(status(&gw, &k2.key).await, 200);
    let fresh = spawn_ready(&nodes.configs[1], &[], ENFORCE).await;
    until(&fresh, &k3.key, 200).await;
    assert_eq!(status(&fresh, &k1.key).await, 401);
}

/// Admin tokens live in the Redis store too: minted by the CLI next to one control plane, they
/// work on another control plane in another directory; revoked through one, the token stops
/// working on the other at the next request; no token file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_are_shared_through_redis() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let cp_cfg = |i: usize| {
        let base = std::fs::read_to_string(&nodes.configs[i]).unwrap();
        write_file(
            nodes.configs[i].parent().unwrap(),
            "control.toml",
            &format!(
                "{base}\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\n"
            ),
        )
    };
    let (cfg1, cfg2) = (cp_cfg(0), cp_cfg(1));
    let out = cli(
        &cfg1,
        &["admin-token", "create", "--role", "write", "--json"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let minted: serde_json::Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    let (token, token_id) = (
        minted["token"].as_str().unwrap().to_owned(),
        minted["id"].as_str().unwrap().to_owned(),
    );
    let (cp1, cp2) = (
        ControlPlane::spawn(&cfg1).await,
        ControlPlane::spawn(&cfg2).await,
    );
    let auth = format!("Bearer {token}");
    let list = |addr| {
        let auth = auth.clone();
        async move {
            get(addr, "/v1/api-keys", &[("authorization", &auth)])
                .await
                .0
        }
    };
    assert_eq!(list(cp1.addr).await, 200);
    assert_eq!(
        list(cp2.addr).await,
        200,
        "a token minted beside cp1 works on cp2"
    );
    let (s, _, body) = request(
        cp2.addr,
        http::Method::DELETE,
        &format!("/v1/admin-tokens/{token_id}"),
        &[("authorization", &auth)],
        String::new(),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        list(cp1.addr).await,
        401,
        "revoked through cp2, refused by cp1 at once"
    );
    for cfg in [&cfg1, &cfg2] {
        assert!(!cfg.with_file_name("admin-tokens.jsonl").exists());
    }
}

/// A feed gateway's usage report batch counts once on control planes that keep usage in
/// Redis, however it arrives: stopped halfway by a failure (a foreign value under one usage
/// key: the parts before it applied, the control plane answers 503), then sent again whole to
/// another control plane, every key counts once; sent again after that, to either, it is a
/// duplicate. How far the process got is one expiring mark in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_batch_counts_once_across_control_planes_and_failures() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let cp_cfg = nodes.control_config("");
    let out = cli(
        &cp_cfg,
        &["admin-token", "create", "--role", "feed"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let auth = format!("Bearer {}", stdout_str(&out).trim());
    let (cp1, cp2) = (
        ControlPlane::spawn(&cp_cfg).await,
        ControlPlane::spawn(&cp_cfg).await,
    );
    const N: usize = 1000;
    let ids: Vec<String> = (0..N).map(|i| format!("reported_{i:04}")).collect();
    let added: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| {
            let used = serde_json::json!({"last_used": 1_700_000_000, "requests": 3, "s2xx": 3});
            (id.clone(), used)
        })
        .collect();
    let body = serde_json::json!({"node": "gw-1", "boot": 9, "seq": 1, "added": added}).to_string();
    let post = |addr: std::net::SocketAddr| {
        let (auth, body) = (auth.clone(), body.clone());
        async move {
            let headers = [
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            let (s, _, b) = request(addr, http::Method::POST, "/v1/usage", &headers, body).await;
            (
                s,
                serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default(),
            )
        }
    };
    let counts = || -> Vec<String> {
        let cmds: Vec<Vec<String>> = ids
            .iter()
            .map(|id| ["HGET".into(), format!("keygate:u:{id}"), "requests".into()].to_vec())
            .collect();
        let cmds: Vec<Vec<&str>> = cmds
            .iter()
            .map(|c| c.iter().map(String::as_str).collect())
            .collect();
        let cmds: Vec<&[&str]> = cmds.iter().map(Vec::as_slice).collect();
        common::redis::raw_session(redis.addr(), &cmds).unwrap()
    };
    let foreign = format!("keygate:u:{}", ids[N - 1]);
    redis.cmd(&["SET", &foreign, "not usage"]);
    let (s, v) = post(cp1.addr).await;
    assert_eq!(s, 503, "{v}");
    let halfway = counts();
    assert_eq!(halfway[0], "3", "the first part applied");
    assert!(halfway.iter().any(|c| c == "(nil)"), "{halfway:?}");
    assert_eq!(redis.cmd(&["GET", &foreign]), "not usage");
    redis.cmd(&["DEL", &foreign]);

    let (s, v) = post(cp2.addr).await;
    assert_eq!((s, v["duplicate"].as_bool()), (200, None), "{v}");
    assert!(counts().iter().all(|c| c == "3"), "{:?}", counts());
    for cp in [&cp1, &cp2] {
        let (s, v) = post(cp.addr).await;
        assert_eq!((s, v["duplicate"].as_bool()), (200, Some(true)), "{v}");
    }
    assert!(counts().iter().all(|c| c == "3"), "{:?}", counts());
    let marks = redis.cmd(&["KEYS", "keygate:ur:*"]);
    assert_eq!(marks.split_whitespace().count(), 1, "{marks}");
    let ttl: u64 = redis.cmd(&["TTL", &marks]).parse().unwrap();
    assert!((1..=7 * 24 * 3600).contains(&ttl), "{ttl}");
}

/// THREATS I6 on the Redis store: a database emptied (`FLUSHALL`, or gateways pointed at the
/// wrong one) and written again holds none of the fleet's keys. A gateway holding them refuses
/// the whole new table (`source_errors{kind="shrink"}`) and serves on from its last good one
/// until a reload allows it; one with `max_snapshot_drop_percent = 100` takes it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_store_does_not_empty_the_fleet() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let held: Vec<_> = (0..12)
        .map(|_| create_key(nodes.cli_config(), &["--scope", "invoices:read"]))
        .collect();
    let open_cfg = &nodes.configs[1];
    let text = std::fs::read_to_string(open_cfg).unwrap().replacen(
        "[keys]\n",
        "[keys]\nmax_snapshot_drop_percent = 100\n",
        1,
    );
    std::fs::write(open_cfg, text).unwrap();
    let guarded = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    let open = spawn_ready(open_cfg, &[], ENFORCE).await;
    for gw in [&guarded, &open] {
        until(gw, &held[11].key, 200).await;
    }

    redis.cmd(&["FLUSHALL"]);
    let after = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    until(&open, &after.key, 200).await;
    until(&open, &held[0].key, 401).await;
    eventually_named("the emptied store refused", ENFORCE, || async {
        (metric(&guarded, "keygate_source_errors_total{kind=\"shrink\"}").await >= 1.0)
            .then_some(())
    })
    .await;
    for k in &held {
        assert_eq!(status(&guarded, &k.key).await, 200, "the last good table");
    }
    assert_eq!(
        status(&guarded, &after.key).await,
        401,
        "nothing of the new table"
    );
    let log = guarded.stderr_contents();
    assert!(
        log.contains("leaves out 12 of the 12 live keys held"),
        "{log}"
    );
    // Not read whole again at every step of a backoff from 100 ms (each read is every key in
    // Redis): over two more seconds out of step, no second refusal.
    let age = "keygate_table_sync_age_seconds";
    let since = metric(&guarded, age).await;
    eventually_named("two more seconds out of step", ENFORCE, || async {
        (metric(&guarded, age).await >= since + 2.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&guarded, "keygate_source_errors_total{kind=\"shrink\"}").await,
        1.0,
        "refused again within two seconds"
    );
    // It looks again as soon as a reload allows the table, and takes it.
    let text = std::fs::read_to_string(&nodes.configs[0])
        .unwrap()
        .replacen("[keys]\n", "[keys]\nmax_snapshot_drop_percent = 100\n", 1);
    std::fs::write(&nodes.configs[0], text).unwrap();
    guarded.sighup();
    until(&guarded, &after.key, 200).await;
    until(&guarded, &held[0].key, 401).await;
}

/// A key revoked in a Redis store the node refuses (emptied, then the leaked key imported and
/// revoked there: the incident's own act) is revoked on the node, and in its sealed local copy
/// too: a restart while Redis is down serves the copy with the key still revoked, and with
/// the sync age of the last time the store was in step, not of the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_obeyed_from_a_refused_redis_store_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let held: Vec<_> = (0..12)
        .map(|_| create_key(nodes.cli_config(), &["--scope", "invoices:read"]))
        .collect();
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    until(&gw, &held[11].key, 200).await;
    let shrinks = "keygate_source_errors_total{kind=\"shrink\"}";

    let flushed = Instant::now();
    redis.cmd(&["FLUSHALL"]);
    // Out of step for a while (an empty database is no table), so that a copy whose sync
    // time moved to the revocation's would show it.
    let age = "keygate_table_sync_age_seconds";
    eventually_named("1.5 s out of step", ENFORCE, || async {
        (metric(&gw, age).await >= 1.5).then_some(())
    })
    .await;
    let leaked = nodes.configs[0].with_file_name("leaked.txt");
    std::fs::write(&leaked, format!("{}\n", held[0].key)).unwrap();
    let file = leaked.to_str().unwrap();
    cli_ok(
        nodes.cli_config(),
        &["keys", "import", "--file", file, "--owner", "o"],
    );
    let listed = json(cli_ok(nodes.cli_config(), &["keys", "list", "--json"]).as_bytes());
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    cli_ok(nodes.cli_config(), &["keys", "revoke", &id]);
    // Obeyed at the node's next look at the whole (still refused) table.
    until(&gw, &held[0].key, 401).await;
    assert!(metric(&gw, shrinks).await >= 1.0);
    assert_eq!(status(&gw, &held[1].key).await, 200, "the last good table");
    let cache = nodes.configs[0].with_file_name("feed-cache.jsonl");
    eventually_named("the revocation in the local copy", ENFORCE, || {
        let cache = cache.clone();
        async move { read_lossy(&cache).contains("revoked_at").then_some(()) }
    })
    .await;

    drop(gw);
    redis.kill();
    let gw = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    assert_eq!(status(&gw, &held[0].key).await, 401, "revoked in the copy");
    for k in &held[1..] {
        assert_eq!(status(&gw, &k.key).await, 200, "the copy's last good table");
    }
    let floor = flushed.elapsed().as_secs_f64();
    let age = metric(&gw, age).await;
    assert!(
        age >= floor - 0.05,
        "sync age {age} s counts from the refusal, not from {floor} s ago (the last sync)"
    );
}

/// THREATS I14 on a Redis-store node: a gateway whose wall clock runs ten minutes ahead
/// (`faketime`) shows it in `keygate_clock_skew_seconds`, near 600 from Redis' `TIME` (a
/// gateway on time near 0), and says it once in its log. Expiry is judged by the node's clock
/// (`expiry_leeway` 0 s): it refuses a key that expires in five minutes, which the gateway on
/// time accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_gateway_ahead_of_redis_shows_the_skew() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(2, &redis).await;
    let probe = create_key(nodes.cli_config(), &["--scope", "invoices:read"]);
    let soon = create_key(
        nodes.cli_config(),
        &["--scope", "invoices:read", "--expires-in", "5m"],
    );
    let straight = spawn_ready(&nodes.configs[0], &[], ENFORCE).await;
    let skewed = spawn_with_clock(&nodes.configs[1], "+10m", SECRET_ENV).await;
    wait_ready(&skewed, ENFORCE).await;
    until(&straight, &soon.key, 200).await;
    until(&skewed, &probe.key, 200).await;
    assert_eq!(
        status(&skewed, &soon.key).await,
        401,
        "expired by the node's clock"
    );
    let skewed_ref = &skewed;
    eventually_named("the skew measured", ENFORCE, || async move {
        let s = metric(skewed_ref, "keygate_clock_skew_seconds").await;
        (590.0..610.0).contains(&s).then_some(())
    })
    .await;
    let on_time = metric(&straight, "keygate_clock_skew_seconds").await;
    assert!(on_time.abs() < 5.0, "{on_time}");
    skewed.assert_logged_once("clock differs from Redis' by over a minute");
    assert!(
        !straight.stderr_contents().contains("clock differs"),
        "the gateway on time said it was off"
    );
    for gw in [&straight, &skewed] {
        gw.assert_not_logged(&soon.key);
        gw.assert_not_logged(&probe.key);
    }
}

/// Node 0's config with the hash secret in a file beside it (the in-process writers of the
/// audit tests below read it; the CLI keeps its variable), and its audit log's path.
fn in_process_config(nodes: &Nodes) -> (PathBuf, PathBuf) {
    let dir = nodes.configs[0].parent().unwrap();
    write_file(dir, "hash.secret", SECRET);
    let base = std::fs::read_to_string(&nodes.configs[0]).unwrap();
    let text = base.replacen(
        "[keys]\n",
        "[keys]\nhash_secret_file = \"hash.secret\"\n",
        1,
    );
    assert_ne!(text, base);
    (
        write_file(dir, "inproc.toml", &text),
        dir.join("audit.jsonl"),
    )
}

fn audit_events(path: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == event)
        .collect()
}

/// Review 134 defect 3 (THREATS J6): on the Redis store a change is built, then written by a
/// script that refuses it when another writer got in first, and built again. The audit event
/// was written while building, so a change that lost one race left two `key.updated` lines,
/// the first describing a version never written. Here a second writer changes another key
/// between the first build and its write, deterministically: the change is built twice,
/// written once, and committed (audited) once, after the write, with what the written run
/// built. (Before the fix `Store::transact_key` had no commit step and the test built the
/// event and appended it inside the build, as `keys::ops` did: two lines, `run 1` and
/// `run 2`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_lost_a_race_is_audited_once_with_what_was_written() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let k = create_key(nodes.cli_config(), &[]);
    let rival_key = create_key(nodes.cli_config(), &[]);
    let (cfg, audit_path) = in_process_config(&nodes);
    let before = audit_events(&audit_path, "key.updated").len();
    let (runs, written) = tokio::task::spawn_blocking(move || {
        let config = keygate::config::Config::load(&cfg).unwrap();
        let settings = keygate::keys::KeySettings::from_config(&config).unwrap();
        let (store, rival) = (settings.store_backend(), settings.store_backend());
        let audit = keygate::audit::AuditLog::new(&audit_path);
        let mut runs = 0;
        let mut commits = vec![];
        let written = store
            .transact_key(
                &k.id,
                |cur| {
                    runs += 1;
                    if runs == 1 {
                        // Another writer, between this run's read and its write.
                        rival
                            .transact_key(
                                &rival_key.id,
                                |o| {
                                    let mut r = o.unwrap().clone();
                                    r.name = "rival".into();
                                    Ok::<_, std::io::Error>((vec![r], ()))
                                },
                                |(), _| Ok(()),
                            )
                            .unwrap()
                            .unwrap();
                    }
                    let mut r = cur.unwrap().clone();
                    r.name = format!("run {runs}");
                    let event = keygate::audit::Event::new("key.updated", "test")
                        .key(&r)
                        .with("name", r.name.clone());
                    Ok::<_, std::io::Error>((vec![r], event))
                },
                // What `keys::ops` does with a change's events.
                |event, point| {
                    commits.push(point);
                    audit.append(&[event])
                },
            )
            .unwrap()
            .unwrap();
        assert_eq!(commits, [keygate::store::CommitPoint::AfterWrite]);
        (runs, written)
    })
    .await
    .unwrap();
    assert_eq!(runs, 2, "the rival's write made the first run lose");
    assert_eq!(written[0].name, "run 2");
    let audited = audit_events(
        &nodes.configs[0].parent().unwrap().join("audit.jsonl"),
        "key.updated",
    );
    assert_eq!(audited.len() - before, 1, "{audited:?}");
    assert_eq!(audited[before]["name"], "run 2");
}

/// The same through `Keys` (what the CLI and the control plane run), racing: four writers
/// update and rotate their own keys on one Redis store at once, so their writes keep losing
/// to each other (each write checks the whole log's head). Every change has exactly one
/// audit line, and every successor a `key.rotated` line names exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_audit_each_change_once() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let ids: Vec<String> = (0..4)
        .map(|_| create_key(nodes.cli_config(), &[]).id)
        .collect();
    let (cfg, audit_path) = in_process_config(&nodes);
    const UPDATES: usize = 8;
    let ids2 = ids.clone();
    let store_ids = tokio::task::spawn_blocking(move || {
        let config = keygate::config::Config::load(&cfg).unwrap();
        let settings = keygate::keys::KeySettings::from_config(&config).unwrap();
        std::thread::scope(|s| {
            for id in &ids2 {
                let settings = &settings;
                s.spawn(move || {
                    let keys = keygate::keys::ops::Keys::new(settings, "racer");
                    let now = keygate::clock::unix_secs();
                    for i in 0..UPDATES {
                        let changes = keygate::keys::ops::Changes {
                            name: Some(format!("{id}-{i}")),
                            ..Default::default()
                        };
                        keys.update(id, &changes, now).unwrap();
                    }
                    keys.rotate(id, keygate::keys::ops::RotateOptions::default(), now)
                        .unwrap();
                });
            }
        });
        let keys = keygate::keys::ops::Keys::new(&settings, "reader");
        keys.state()
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.id)
            .collect::<std::collections::BTreeSet<String>>()
    })
    .await
    .unwrap();
    let updated = audit_events(&audit_path, "key.updated");
    assert_eq!(updated.len(), ids.len() * UPDATES, "{updated:#?}");
    for id in &ids {
        let names: Vec<&str> = updated
            .iter()
            .filter(|v| v["key_id"] == id.as_str())
            .map(|v| v["changed"][0].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["name"; UPDATES], "{id}");
    }
    let rotated = audit_events(&audit_path, "key.rotated");
    assert_eq!(rotated.len(), ids.len(), "{rotated:#?}");
    for v in &rotated {
        let successor = v["successor_id"].as_str().unwrap();
        assert!(
            store_ids.contains(successor),
            "{successor} was never written: {v}"
        );
    }
}

/// The other side of auditing after the write on Redis (`CommitPoint::AfterWrite`): an audit
/// log that cannot be written can no longer refuse a change it comes after, so the change is
/// made and the writer says so (`OpsError::Unaudited`; the API's 503 `change_unaudited`)
/// instead of claiming it was not. A creation is still audited first, and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_on_redis_reports_the_change_as_made() {
    let _serial = SERIAL.lock().await;
    if !Path::new("/dev/full").exists() {
        panic!("/dev/full is needed: it is the audit log that cannot be written");
    }
    let redis = RedisServer::start();
    let nodes = Nodes::new(1, &redis).await;
    let k = create_key(nodes.cli_config(), &[]);
    let base = std::fs::read_to_string(nodes.cli_config()).unwrap();
    let text = base.replace("audit_log = \"audit.jsonl\"", "audit_log = \"/dev/full\"");
    assert_ne!(text, base);
    let full = write_file(nodes.cli_config().parent().unwrap(), "full.toml", &text);

    let out = cli(&full, &["keys", "revoke", &k.id], SECRET_ENV);
    assert!(!out.status.success(), "{}", stderr_str(&out));
    assert!(
        stderr_str(&out).contains("WAS made"),
        "{}",
        stderr_str(&out)
    );
    let shown = cli_ok(nodes.cli_config(), &["keys", "show", &k.id, "--json"]);
    assert_eq!(json(shown.trim().as_bytes())["state"], "revoked");

    let out = cli(
        &full,
        &["keys", "create", "--name", "n", "--owner", "o"],
        SECRET_ENV,
    );
    assert!(!out.status.success());
    assert!(
        stderr_str(&out).contains("not made"),
        "{}",
        stderr_str(&out)
    );
    assert!(
        stdout_str(&out).is_empty(),
        "no key printed for a refused creation"
    );
    let listed = cli_ok(nodes.cli_config(), &["keys", "list", "--json"]);
    assert_eq!(json(listed.trim().as_bytes()).as_array().unwrap().len(), 1);
}
