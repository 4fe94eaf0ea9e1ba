//! The table checkpoint of the Redis store (`store::redis`, `s:checkpoint`) on a real
//! `redis-server`: `keys compact` writes it (sealed like the file store's checkpoint, digests
//! only), a starting gateway loads it plus the stream entries after it (a revocation and a key
//! added after it honoured, following continues); an edited, cut, forged (another secret) or
//! stale (another log) checkpoint is refused loudly (error log, `source_errors{kind=
//! "checkpoint"}`) and every key is read instead; an old genuine checkpoint put back never
//! un-revokes; the secret-version check at start judges the table the checkpoint loaded.
//! Real binary, real CLI, real Redis (tests/common/redis.rs); one test at a time (`SERIAL`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::RedisServer;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(10);
const CKPT: &str = "keygate:s:checkpoint";
const FROM_CHECKPOINT: &str = "key table loaded from the checkpoint";
const REFUSED: &str = "redis store checkpoint refused; reading every key instead";

/// One node directory per gateway start (so no local copy of an earlier start is used), all
/// on one Redis store.
struct Setup {
    dir: tempfile::TempDir,
    redis: RedisServer,
    _up: Upstream,
    up_addr: std::net::SocketAddr,
    nodes: usize,
}

impl Setup {
    async fn new() -> Setup {
        let up = Upstream::start(Mode::Echo).await;
        Setup {
            dir: tempdir(),
            redis: RedisServer::start(),
            up_addr: up.addr(),
            _up: up,
            nodes: 0,
        }
    }

    /// A fresh node's config on the store under `prefix`; `keys` goes into `[keys]`.
    fn node_with(&mut self, prefix: &str, keys: &str) -> PathBuf {
        self.nodes += 1;
        let node = self.dir.path().join(format!("n{}", self.nodes));
        std::fs::create_dir_all(&node).unwrap();
        write_file(
            &node,
            "keygate.toml",
            &format!(
                r#"[keys]
source = "redis"
store = "unused-keys.jsonl"
audit_log = "audit.jsonl"
{keys}
[redis]
url = "{url}"
key_prefix = "{prefix}"

{rest}"#,
                url = self.redis.url(),
                rest = one_route(self.up_addr),
            ),
        )
    }

    fn node(&mut self) -> PathBuf {
        self.node_with("keygate:", "")
    }

    /// A gateway on a fresh node, ready, whose log says `logged`.
    async fn serve(&mut self, logged: &str) -> Gateway {
        let config = self.node();
        let gw = spawn_ready(&config, &[("KEYGATE_LOG", "info")], WAIT).await;
        eventually_named(logged, WAIT, || async {
            gw.stderr_contents().contains(logged).then_some(())
        })
        .await;
        gw
    }

    fn cmd(&self, args: &[&str]) -> String {
        self.redis.cmd(args)
    }

    /// Every value the store holds in Redis, as text: strings (the checkpoint), hashes and
    /// the stream, under every key.
    fn everything(&self) -> String {
        let mut all = String::new();
        for key in self.cmd(&["KEYS", "*"]).split_whitespace() {
            let value = match self.cmd(&["TYPE", key]).trim() {
                "string" => self.cmd(&["GET", key]),
                "hash" => self.cmd(&["HGETALL", key]),
                "stream" => self.cmd(&["XRANGE", key, "-", "+"]),
                "set" => self.cmd(&["SMEMBERS", key]),
                "zset" => self.cmd(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
                "list" => self.cmd(&["LRANGE", key, "0", "-1"]),
                other => panic!("unexpected type {other} of {key}"),
            };
            all.push_str(key);
            all.push_str(&value);
        }
        all
    }
}

fn create(config: &Path) -> Key {
    create_key(config, &["--scope", "invoices:read"])
}

async fn status(gw: &Gateway, key: &str) -> u16 {
    get(gw.http, "/invoices/1", &[("x-api-key", key)]).await.0
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let (_, _, body) = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// How many times the gateway loaded a table by reading every key (not the checkpoint).
fn whole_reads(gw: &Gateway) -> usize {
    let log = gw.stderr_contents();
    log.matches("key table loaded").count() - log.matches(FROM_CHECKPOINT).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_writes_a_checkpoint_in_redis_and_a_gateway_starts_from_it() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::new().await;
    let cli_cfg = s.node();
    let kept = create(&cli_cfg);
    let revoked_before = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "revoke", &revoked_before.id]);
    let revoked_after = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "compact"]);
    let at: u64 = s
        .cmd(&["HGET", "keygate:s:meta", "ckpt"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        s.cmd(&["HGET", "keygate:s:meta", "rev"]).trim(),
        at.to_string(),
        "the checkpoint stands for the head revision"
    );
    assert!(
        s.cmd(&["GET", CKPT]).starts_with("KGCKPT2"),
        "the sealed format"
    );
    // After the checkpoint: a revocation and a new key, in the stream only.
    cli_ok(&cli_cfg, &["keys", "revoke", &revoked_after.id]);
    let created_after = create(&cli_cfg);

    let gw = s.serve(FROM_CHECKPOINT).await;
    assert_eq!(status(&gw, &kept.key).await, 200);
    assert_eq!(status(&gw, &revoked_before.key).await, 401);
    assert_eq!(
        status(&gw, &revoked_after.key).await,
        401,
        "a revocation after the checkpoint is honoured"
    );
    assert_eq!(status(&gw, &created_after.key).await, 200);
    assert!(
        gw.stderr_contents().contains("records_after=2"),
        "the two records after it came from the stream:\n{}",
        gw.stderr_contents()
    );
    assert_eq!(whole_reads(&gw), 0, "{}", gw.stderr_contents());
    assert_eq!(
        metric(&gw, r#"keygate_source_errors_total{kind="checkpoint"}"#).await,
        0.0
    );
    assert_eq!(metric(&gw, "keygate_table_revision").await, (at + 2) as f64);

    // It follows the stream from where the checkpoint left it.
    let later = create(&cli_cfg);
    eventually_named("key created while serving", WAIT, || async {
        (status(&gw, &later.key).await == 200).then_some(())
    })
    .await;
    cli_ok(&cli_cfg, &["keys", "revoke", &kept.id]);
    eventually_named("revocation while serving", WAIT, || async {
        (status(&gw, &kept.key).await == 401).then_some(())
    })
    .await;

    // Digests only: no key's plaintext in the checkpoint or anywhere else in Redis.
    let all = s.everything();
    assert!(
        all.contains(CKPT) && all.contains(&kept.id),
        "read the store: {all}"
    );
    for k in [
        &kept,
        &revoked_before,
        &revoked_after,
        &created_after,
        &later,
    ] {
        assert!(!all.contains(&k.key), "a plaintext key in Redis");
    }
    assert!(!gw.stderr_contents().contains(&kept.key));
}

/// Copy a Redis value byte for byte (`COPY`: the test's text commands would not keep binary).
fn copy(s: &Setup, from: &str, to: &str) {
    assert_eq!(
        s.cmd(&["COPY", from, to, "REPLACE"]).trim(),
        "1",
        "COPY {from}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_cut_forged_or_stale_checkpoint_is_refused_and_every_key_read() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::new().await;
    let cli_cfg = s.node();
    let a = create(&cli_cfg);
    let gone = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "revoke", &gone.id]);
    cli_ok(&cli_cfg, &["keys", "compact"]);
    copy(&s, CKPT, "saved:good");

    // Sealed with another secret (a forger without ours), on another store in the same Redis.
    let forger = s.node_with("forged:", "");
    let theirs = &[(SECRET_VAR, "another-secret-another-secret-another-secret-0")];
    for args in [
        &["keys", "create", "--name", "n", "--owner", "o"][..],
        &["keys", "compact"],
    ] {
        let out = cli(&forger, args, theirs);
        assert!(out.status.success(), "{}", stderr_str(&out));
    }
    // Genuine (our secret), but for another log: what a store that became a new log has left.
    let other = s.node_with("stale:", "");
    create(&other);
    cli_ok(&other, &["keys", "compact"]);

    let len: usize = s.cmd(&["STRLEN", CKPT]).trim().parse().unwrap();
    let mid = (len / 2).to_string();
    let byte = s.cmd(&["GETRANGE", CKPT, &mid, &mid]);
    let flipped = if byte == "A" { "B" } else { "A" };
    let cases: Vec<(&str, Vec<Vec<String>>)> = vec![
        ("edited", vec![vec!["SETRANGE".into(), CKPT.into(), mid.clone(), flipped.into()]]),
        (
            "cut",
            vec![vec![
                "EVAL".into(),
                "return redis.call('SET', KEYS[1], string.sub(redis.call('GET', KEYS[1]), 1, tonumber(ARGV[1])))".into(),
                "1".into(),
                CKPT.into(),
                mid.clone(),
            ]],
        ),
        ("forged", vec![vec!["COPY".into(), "forged:s:checkpoint".into(), CKPT.into(), "REPLACE".into()]]),
        ("stale", vec![vec!["COPY".into(), "stale:s:checkpoint".into(), CKPT.into(), "REPLACE".into()]]),
    ];
    for (what, spoil) in cases {
        copy(&s, "saved:good", CKPT);
        for c in spoil {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            let reply = s.cmd(&args);
            assert!(!reply.starts_with("ERR"), "{what}: {reply}");
        }
        let gw = s.serve(REFUSED).await;
        assert_eq!(status(&gw, &a.key).await, 200, "{what}: every key read");
        assert_eq!(status(&gw, &gone.key).await, 401, "{what}");
        assert_eq!(
            metric(&gw, r#"keygate_source_errors_total{kind="checkpoint"}"#).await,
            1.0,
            "{what}"
        );
        assert_eq!(whole_reads(&gw), 1, "{what}: {}", gw.stderr_contents());
        assert!(!gw.stderr_contents().contains(FROM_CHECKPOINT), "{what}");
        if what == "stale" {
            assert!(
                gw.stderr_contents().contains("stale"),
                "{}",
                gw.stderr_contents()
            );
        }
        drop(gw);
    }
    // And the genuine one, back in place, is used.
    copy(&s, "saved:good", CKPT);
    let gw = s.serve(FROM_CHECKPOINT).await;
    assert_eq!(status(&gw, &a.key).await, 200);
    assert_eq!(status(&gw, &gone.key).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_checkpoint_put_back_never_brings_a_revoked_key_back() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::new().await;
    let cli_cfg = s.node();
    let a = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "compact"]);
    // A genuine checkpoint in which `a` is active, kept aside...
    copy(&s, CKPT, "saved:old");
    cli_ok(&cli_cfg, &["keys", "revoke", &a.id]);
    let b = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "compact"]);
    // ...and put back after a newer compaction: the stream after its revision revokes `a`.
    copy(&s, "saved:old", CKPT);
    let gw = s.serve(FROM_CHECKPOINT).await;
    assert_eq!(status(&gw, &a.key).await, 401);
    assert_eq!(status(&gw, &b.key).await, 200);
}

/// Whoever can write Redis deletes the revocation from the stream after the checkpoint: the
/// checkpoint alone would miss it, so it is refused (the stream after it has a gap) and the
/// whole read, which has the revocation in `s:revoked`, keeps the key revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_deleted_from_the_stream_after_the_checkpoint_stays_final() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::new().await;
    let cli_cfg = s.node();
    let a = create(&cli_cfg);
    let b = create(&cli_cfg);
    cli_ok(&cli_cfg, &["keys", "compact"]);
    cli_ok(&cli_cfg, &["keys", "revoke", &a.id]);
    let c = create(&cli_cfg);
    let revoked_at: u64 = s
        .cmd(&["HGET", "keygate:s:meta", "rev"])
        .trim()
        .parse()
        .unwrap();
    let entry = format!("{}-1", revoked_at - 1);
    assert!(s
        .cmd(&["XRANGE", "keygate:s:log", &entry, &entry])
        .contains(&a.id));
    assert_eq!(s.cmd(&["XDEL", "keygate:s:log", &entry]).trim(), "1");
    let gw = s.serve(REFUSED).await;
    assert!(
        gw.stderr_contents().contains("has a gap"),
        "{}",
        gw.stderr_contents()
    );
    assert_eq!(status(&gw, &a.key).await, 401, "the revocation is final");
    assert_eq!(status(&gw, &b.key).await, 200);
    assert_eq!(status(&gw, &c.key).await, 200);
}

/// Keys under a secret version with no configured secret are refused at start on the Redis
/// store, whether the table comes from the checkpoint (judged on its entries) or from every
/// key (records that cannot be verified for want of their secret count too), with one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_version_in_use_without_a_secret_is_refused_with_or_without_a_checkpoint() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::new().await;
    let cli_cfg = s.node();
    create(&cli_cfg);
    let new_secret = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUTSRQP";
    // A gateway configured with version 2 only: its start must be refused, naming version 1.
    let refused_start = |s: &mut Setup| {
        let node = s.node_with("keygate:", "hash_secret_version = 2\n");
        async move {
            let env = [(SECRET_VAR, new_secret), ("KEYGATE_LOG", "info")];
            let Err(err) = Gateway::try_spawn(&node, &env).await else {
                panic!("gateway started with keys it cannot verify");
            };
            assert!(
                err.contains("secret version 1") && err.contains("1 key"),
                "{err}"
            );
            err
        }
    };

    // No checkpoint: the record is signed under version 1, which is gone.
    let err = refused_start(&mut s).await;
    assert!(!err.contains(FROM_CHECKPOINT), "{err}");

    // A checkpoint written while both versions were configured (sealed under version 2).
    let both = s.node_with(
        "keygate:",
        "hash_secret_version = 2\n[[keys.previous_secrets]]\nversion = 1\nenv = \"OLD_SECRET\"\n",
    );
    let out = cli(
        &both,
        &["keys", "compact"],
        &[(SECRET_VAR, new_secret), ("OLD_SECRET", SECRET)],
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let err = refused_start(&mut s).await;
    assert!(err.contains(FROM_CHECKPOINT), "{err}");
}
