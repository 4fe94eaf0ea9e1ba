//! Hash-secret migration end to end (issue 14): keys created under secret version 1, the
//! config rotated to version 2, traffic re-digests each key under version 2 once, and then
//! version 1 can be retired. Real binaries: `keygate serve` on a file store writing its own
//! store, and a fleet (`keygate control` + a feed gateway with a `redigest`-role token)
//! writing through `POST /v1/api-keys/{id}/redigest`, whose refusals are driven directly.
//!
//! No sleeps for synchronisation: every wait polls with a deadline. The tests run one at a
//! time (they start several processes each).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keygate::keys::digest::{Digest, Hasher};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
/// The version-2 secret (version 1 is [`SECRET`], read from [`SECRET_VAR`]).
const SECRET_V2: &str = "version-two-secret-0123456789abcdefghijklmnopqrstuv";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ROUTE: &str = r#"
[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
"#;

/// `[keys]` with version 2 current (from a file next to the config) and version 1 still
/// accepted (from [`SECRET_VAR`], which every harness helper sets).
fn rotated(config: &str, retire_v1: bool) -> String {
    // (`touch_interval_seconds`: `keygate check` asks for it.)
    let mut keys = "[keys]\nhash_secret_version = 2\nhash_secret_file = \"secret.v2\"\ntouch_interval_seconds = 60\n".to_owned();
    if !retire_v1 {
        keys.push_str("previous_secrets = [{ version = 1, env = \"API_KEY_HASH_SECRET\" }]\n");
    }
    config.replacen("[keys]\n", &keys, 1)
}

/// Every record version of `id` in a store file, oldest first.
fn versions(store: &Path, id: &str) -> Vec<Value> {
    read_lossy(store)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["id"] == id)
        .collect()
}

fn latest(store: &Path, id: &str) -> Value {
    versions(store, id).pop().expect("key in the store")
}

/// The `key.redigested` events in an audit log.
fn redigested(audit: &Path) -> Vec<Value> {
    read_lossy(audit)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "key.redigested")
        .collect()
}

async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (status, _, body) = get(admin, "/metrics", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

async fn wait_on_v2(store: &Path, id: &str) -> Value {
    let store = store.to_path_buf();
    eventually_named(&format!("{id} on secret version 2"), WAIT, || {
        let store = store.clone();
        async move {
            let v = versions(&store, id).pop()?;
            (v["secret_version"] == 2).then_some(v)
        }
    })
    .await
}

async fn status_of(gw: &Gateway, key: &str) -> u16 {
    get(gw.http, "/x", &[("x-api-key", key)]).await.0
}

/// Files under `dir` (recursively) and extra texts must not contain any of `secrets`.
fn assert_nowhere(dir: &Path, extra: &[String], secrets: &[&str]) {
    let mut files = vec![dir.to_path_buf()];
    let mut texts: Vec<(String, String)> = Vec::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if !p.ends_with("secret.v2") {
            texts.push((p.display().to_string(), read_lossy(&p)));
        }
    }
    texts.extend(extra.iter().map(|t| ("output".to_owned(), t.clone())));
    assert!(texts.len() > 3, "nothing to search");
    for (name, text) in &texts {
        for s in secrets {
            assert!(!text.contains(s), "a key or secret leaked into {name}");
        }
    }
}

/// `keygate check` on `config` with both secrets in the environment.
fn check(config: &Path) -> std::process::Output {
    cli(config, &["check"], SECRET_ENV)
}

fn secret_status(config: &Path) -> Vec<Value> {
    let out = cli_ok(config, &["secret", "status", "--json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn live_on(rows: &[Value], version: u64) -> u64 {
    rows.iter()
        .find(|r| r["version"] == version)
        .map_or(0, |r| r["live_keys"].as_u64().unwrap())
}

/// Single node: `keygate serve` on a file store re-digests keys it sees and writes them
/// through its store, once each, audited; then version 1 can be retired and the keys still
/// work under version 2 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_redigests_keys_seen_in_traffic_once_then_v1_retires() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let v1 = gateway_config(up.addr(), 1000, "", "", ROUTE);
    let config = write_file(dir.path(), "keygate.toml", &v1);
    let a = create_key(&config, &[]);
    let b = create_key(&config, &[]);
    let revoked = create_key(&config, &[]);
    cli_ok(&config, &["keys", "revoke", &revoked.id]);
    let store = dir.path().join("keys.jsonl");
    let audit = dir.path().join("audit.jsonl");
    assert_eq!(latest(&store, &a.id)["secret_version"], 1);

    // Rotate the secret: v2 current, v1 previous.
    write_file(dir.path(), "secret.v2", SECRET_V2);
    std::fs::write(&config, rotated(&v1, false)).unwrap();
    // Retiring v1 now is refused: two live keys still use it.
    let retired = dir.path().join("retired.toml");
    std::fs::write(&retired, rotated(&v1, true)).unwrap();
    let refused = check(&retired);
    assert!(!refused.status.success(), "{}", stdout_str(&refused));
    assert!(
        format!("{}{}", stdout_str(&refused), stderr_str(&refused)).contains("secret version 1"),
        "{refused:?}"
    );

    let gw = spawn_ready(&config, &[], WAIT).await;
    assert_eq!(status_of(&gw, &a.key).await, 200);
    let after = wait_on_v2(&store, &a.id).await;
    let before = &versions(&store, &a.id)[0];
    assert_ne!(after["digest"], before["digest"], "a new digest");
    for field in [
        "name",
        "owner",
        "env",
        "lineage",
        "created_at",
        "hint",
        "scopes",
    ] {
        assert_eq!(after[field], before[field], "{field} unchanged");
    }
    assert!(after.get("revoked_at").is_none());
    let events = redigested(&audit);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (
            &e["key_id"],
            &e["actor"],
            &e["from_version"],
            &e["to_version"]
        ),
        (&json!(a.id), &json!("gateway"), &json!(1), &json!(2))
    );
    assert!(
        !e.to_string().contains(after["digest"].as_str().unwrap()),
        "no digest in audit"
    );
    assert!(!e.to_string().contains(before["digest"].as_str().unwrap()));

    // The gateway applies the new version (its table revision reaches the store's), and the
    // key authenticates under v2 from then on.
    let rev = after["rev"].as_f64().unwrap();
    eventually_named("gateway applied the re-digested record", WAIT, || async {
        (metric(gw.admin, "keygate_table_revision").await >= rev).then_some(())
    })
    .await;
    assert_eq!(status_of(&gw, &a.key).await, 200);
    // The revoked key is refused and never re-digested.
    assert_eq!(status_of(&gw, &revoked.key).await, 401);
    // Key b next: the worker handles jobs in order, so once b is written anything the second
    // request of a (or the revoked key) could have queued has been handled too.
    assert_eq!(status_of(&gw, &b.key).await, 200);
    wait_on_v2(&store, &b.id).await;
    assert_eq!(versions(&store, &a.id).len(), 2, "a was written once");
    assert_eq!(latest(&store, &revoked.id)["secret_version"], 1);
    let events = redigested(&audit);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[1]["key_id"], b.id);
    let series = |o: &str| format!("keygate_keys_redigested_total{{outcome=\"{o}\"}}");
    // (Counted after the store write returns: poll.)
    eventually_named("written = 2", WAIT, || async {
        (metric(gw.admin, &series("written")).await == 2.0).then_some(())
    })
    .await;
    for o in ["current", "refused", "dropped", "failed"] {
        assert_eq!(metric(gw.admin, &series(o)).await, 0.0, "{o}");
    }

    // No live key on v1: `secret status` says so and retiring v1 passes `check`.
    let rows = secret_status(&config);
    assert_eq!(live_on(&rows, 1), 0, "{rows:?}");
    assert_eq!(live_on(&rows, 2), 2, "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r["version"] == 1 && r["retirable"] == true),
        "{rows:?}"
    );
    let ok = check(&retired);
    assert!(
        ok.status.success(),
        "{}\n{}",
        stdout_str(&ok),
        stderr_str(&ok)
    );
    // And the keys work with v1 gone.
    let mut logs = vec![gw.stderr_contents(), gw.stdout_lines().join("\n")];
    drop(gw);
    std::fs::copy(&retired, &config).unwrap();
    let gw = spawn_ready(&config, &[], WAIT).await;
    assert_eq!(status_of(&gw, &a.key).await, 200);
    assert_eq!(status_of(&gw, &b.key).await, 200);
    assert_eq!(status_of(&gw, &revoked.key).await, 401);
    logs.extend([gw.stderr_contents(), gw.stdout_lines().join("\n")]);
    assert_nowhere(
        dir.path(),
        &logs,
        &[&a.key, &b.key, &revoked.key, SECRET, SECRET_V2],
    );
}

fn cp_config() -> String {
    r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"
poll_interval_ms = 50

[plans.default]
rate = "1000/s"

[control]
listen = "127.0.0.1:0"
tokens = "admin-tokens.jsonl"
heartbeat_ms = 200
"#
    .to_owned()
}

fn gw_config(cp: std::net::SocketAddr, up: std::net::SocketAddr) -> String {
    format!(
        r#"[keys]
source = "feed"
feed_url = "http://{cp}/v1/feed"
feed_cache = "feed-cache.jsonl"
usage_file = "usage.json"
audit_log = "audit.jsonl"

[plans.default]
rate = "1000/s"

[server]
listen = "127.0.0.1:0"
shutdown_delay_ms = 0

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["{up}"]
{ROUTE}"#
    )
}

fn mint(config: &Path, role: &str) -> String {
    cli_ok(config, &["admin-token", "create", "--role", role])
        .trim()
        .to_owned()
}

/// What a fleet gateway sends for `key` (its plaintext), made with the test's own copy of
/// the secrets through the library (the same code a gateway runs).
fn body_for(store: &Path, id: &str, key: &str, from: u32, to: u32) -> Value {
    let h = Hasher::new(vec![
        (1, SECRET.as_bytes().to_vec()),
        (2, SECRET_V2.as_bytes().to_vec()),
    ]);
    let stored = Digest::from_hex(latest(store, id)["digest"].as_str().unwrap()).unwrap();
    let new = h.all_digests(key).find(|(v, _)| *v == 2).unwrap().1;
    body_with(&h, id, from, to, &stored, &new)
}

fn body_with(h: &Hasher, id: &str, from: u32, to: u32, stored: &Digest, new: &Digest) -> Value {
    let proof = keygate::keys::redigest::proof(h, id, from, to, stored, new).unwrap();
    json!({"from_version": from, "to_version": to, "digest": new.to_hex(), "proof": Digest(proof).to_hex()})
}

fn with(body: &Value, field: &str, value: Value) -> Value {
    let mut v = body.clone();
    v[field] = value;
    v
}

async fn redigest_call(
    cp: std::net::SocketAddr,
    token: &str,
    id: &str,
    body: &Value,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (status, headers, bytes) = post(
        cp,
        &format!("/v1/api-keys/{id}/redigest"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await;
    if status != 200 {
        assert_eq!(
            headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/problem+json")
        );
    }
    (status, json(&bytes))
}

/// Fleet: a feed gateway holding a `redigest`-role token re-digests through the control
/// plane's endpoint; the endpoint refuses every other role and every request that does not
/// fit the key's stored state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_redigests_through_the_control_plane_and_the_endpoint_is_narrow() {
    let _serial = SERIAL.lock().await;
    let root = tempdir();
    let cp_dir = root.path().join("cp");
    let gw_dir = root.path().join("gw");
    std::fs::create_dir_all(&cp_dir).unwrap();
    std::fs::create_dir_all(&gw_dir).unwrap();
    let cp_v1 = cp_config();
    let cp_cfg = write_file(&cp_dir, "keygate.toml", &cp_v1);
    let a = create_key(&cp_cfg, &[]);
    let b = create_key(&cp_cfg, &[]);
    let c = create_key(&cp_cfg, &[]);
    let revoked = create_key(&cp_cfg, &[]);
    cli_ok(&cp_cfg, &["keys", "revoke", &revoked.id]);

    write_file(&cp_dir, "secret.v2", SECRET_V2);
    std::fs::write(&cp_cfg, rotated(&cp_v1, false)).unwrap();
    let tokens: Vec<(&str, String)> = ["feed", "redigest", "write", "read"]
        .into_iter()
        .map(|r| (r, mint(&cp_cfg, r)))
        .collect();
    let token = |role: &str| tokens.iter().find(|(r, _)| *r == role).unwrap().1.clone();
    let cp = ControlPlane::spawn(&cp_cfg).await;
    let store = cp_dir.join("keys.jsonl");
    let cp_audit = cp_dir.join("audit.jsonl");

    let up = Upstream::start(Mode::Echo).await;
    write_file(&gw_dir, "secret.v2", SECRET_V2);
    let gw_cfg = write_file(
        &gw_dir,
        "keygate.toml",
        &rotated(&gw_config(cp.addr, up.addr()), false),
    );
    let (feed, redigest) = (token("feed"), token("redigest"));
    let gw = spawn_ready(
        &gw_cfg,
        &[
            ("KEYGATE_FEED_TOKEN", &feed),
            ("KEYGATE_REDIGEST_TOKEN", &redigest),
        ],
        WAIT,
    )
    .await;

    // Traffic with a: the gateway hands the new digest to the control plane.
    assert_eq!(status_of(&gw, &a.key).await, 200);
    let after = wait_on_v2(&store, &a.id).await;
    let events = redigested(&cp_audit);
    assert_eq!(events.len(), 1, "{events:?}");
    let redigest_id = read_lossy(&cp_dir.join("admin-tokens.jsonl"))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|t| t["role"] == "redigest")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(events[0]["actor"], format!("admin:{redigest_id}"));
    assert_eq!(
        (&events[0]["from_version"], &events[0]["to_version"]),
        (&json!(1), &json!(2))
    );
    eventually_named("gateway metric written=1", WAIT, || async {
        (metric(
            gw.admin,
            "keygate_keys_redigested_total{outcome=\"written\"}",
        )
        .await
            == 1.0)
            .then_some(())
    })
    .await;
    // The gateway applies it from the feed; a keeps working, and is not sent again.
    let rev = after["rev"].as_f64().unwrap();
    eventually_named("gateway applied the re-digested record", WAIT, || async {
        (metric(gw.admin, "keygate_table_revision").await >= rev).then_some(())
    })
    .await;
    assert_eq!(status_of(&gw, &a.key).await, 200);

    // The endpoint: every other role is refused, and no token is 401.
    let good_c = body_for(&store, &c.id, &c.key, 1, 2);
    for role in ["write", "read", "feed"] {
        let (s, v) = redigest_call(cp.addr, &token(role), &c.id, &good_c).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (403, Some("forbidden")),
            "{role}: {v}"
        );
    }
    let (s, _) = redigest_call(cp.addr, "kgadm_nope", &c.id, &good_c).await;
    assert_eq!(s, 401);
    // ...and a redigest token can do nothing else.
    let auth = format!("Bearer {redigest}");
    assert_eq!(
        get(cp.addr, "/v1/api-keys", &[("authorization", &auth)])
            .await
            .0,
        403
    );
    assert_eq!(
        get(cp.addr, "/v1/feed", &[("authorization", &auth)])
            .await
            .0,
        403
    );

    let refusals: Vec<(&str, String, Value, &str)> = vec![
        (
            "unknown key",
            "key_unknownunknownunknownunkn".into(),
            good_c.clone(),
            "not_found",
        ),
        (
            "revoked key",
            revoked.id.clone(),
            body_for(&store, &revoked.id, &revoked.key, 1, 2),
            "key_revoked",
        ),
        (
            "already current",
            a.id.clone(),
            body_for(&store, &a.id, &a.key, 1, 2),
            "already_current",
        ),
        (
            "from_version not held",
            c.id.clone(),
            body_for(&store, &c.id, &c.key, 3, 2),
            "version_mismatch",
        ),
        (
            "to_version not current",
            c.id.clone(),
            with(&good_c, "to_version", json!(3)),
            "version_not_current",
        ),
        (
            "to_version old",
            c.id.clone(),
            with(&good_c, "to_version", json!(1)),
            "version_not_current",
        ),
        (
            "proof for another key",
            c.id.clone(),
            body_for(&store, &b.id, &b.key, 1, 2),
            "proof_mismatch",
        ),
        (
            "proof over another digest",
            c.id.clone(),
            with(&good_c, "digest", json!("ab".repeat(32))),
            "proof_mismatch",
        ),
    ];
    for (what, id, body, code) in refusals {
        let (s, v) = redigest_call(cp.addr, &redigest, &id, &body).await;
        assert_eq!(v["code"].as_str(), Some(code), "{what}: {v}");
        assert!(s == 404 || s == 409, "{what}: {s}");
    }
    // A valid proof, but for a digest another key holds: taking it would make that key's
    // plaintext authenticate as this one.
    let h = Hasher::new(vec![
        (1, SECRET.as_bytes().to_vec()),
        (2, SECRET_V2.as_bytes().to_vec()),
    ]);
    let c_stored = Digest::from_hex(latest(&store, &c.id)["digest"].as_str().unwrap()).unwrap();
    let a_now = Digest::from_hex(latest(&store, &a.id)["digest"].as_str().unwrap()).unwrap();
    let hijack = body_with(&h, &c.id, 1, 2, &c_stored, &a_now);
    let (s, v) = redigest_call(cp.addr, &redigest, &c.id, &hijack).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("digest_in_use")), "{v}");
    // Malformed bodies and unknown fields: 400.
    for bad in [
        json!({}),
        with(&good_c, "digest", json!("zz")),
        with(&good_c, "from_version", json!(-1)),
        with(&good_c, "scopes", json!(["admin"])),
    ] {
        let (s, v) = redigest_call(cp.addr, &redigest, &c.id, &bad).await;
        assert_eq!(s, 400, "{v}");
    }
    assert_eq!(
        versions(&store, &c.id).len(),
        1,
        "no refusal wrote anything"
    );
    assert_eq!(latest(&store, &revoked.id)["secret_version"], 1);
    assert!(latest(&store, &revoked.id)["revoked_at"].is_number());

    // The valid request for c works directly: only digest and version change.
    let (s, v) = redigest_call(cp.addr, &redigest, &c.id, &good_c).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["secret_version"], 2);
    assert!(v.get("digest").is_none() && v.get("mac").is_none(), "{v}");
    let (c0, c1) = (versions(&store, &c.id)[0].clone(), latest(&store, &c.id));
    let strip = |mut v: Value| {
        for f in ["digest", "secret_version", "rev", "written_at_ms", "mac"] {
            v.as_object_mut().unwrap().remove(f);
        }
        v
    };
    assert_eq!(
        strip(c0),
        strip(c1),
        "nothing but digest and version changed"
    );
    // Replaying the same request: the key is current now.
    let (s, v) = redigest_call(cp.addr, &redigest, &c.id, &good_c).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("already_current")));

    // b through traffic; then nothing live is on v1 and v1 retires.
    assert_eq!(status_of(&gw, &b.key).await, 200);
    wait_on_v2(&store, &b.id).await;
    assert_eq!(status_of(&gw, &c.key).await, 200);
    assert_eq!(status_of(&gw, &revoked.key).await, 401);
    assert_eq!(redigested(&cp_audit).len(), 3, "a, c, b once each");
    let rows = secret_status(&cp_cfg);
    assert_eq!(live_on(&rows, 1), 0, "{rows:?}");
    let retired = cp_dir.join("retired.toml");
    std::fs::write(&retired, rotated(&cp_v1, true)).unwrap();
    let ok = check(&retired);
    assert!(
        ok.status.success(),
        "{}\n{}",
        stdout_str(&ok),
        stderr_str(&ok)
    );
    let (_, _, cp_metrics) = get(cp.addr, "/metrics", &[]).await;
    let cp_metrics = String::from_utf8_lossy(&cp_metrics).into_owned();
    assert!(
        cp_metrics.contains("keygate_keys_redigested_total{outcome=\"written\"} 3"),
        "{cp_metrics}"
    );

    let logs = vec![
        gw.stderr_contents(),
        gw.stdout_lines().join("\n"),
        cp_metrics,
    ];
    drop(gw);
    drop(cp);
    let mut secrets: Vec<&str> = vec![&a.key, &b.key, &c.key, &revoked.key, SECRET, SECRET_V2];
    secrets.extend(tokens.iter().map(|(_, t)| t.as_str()));
    assert_nowhere(root.path(), &logs, &secrets);
}

/// `keys show --json` of `id` (the public record: versions, never a digest).
fn show(config: &Path, id: &str) -> Value {
    serde_json::from_str(&cli_ok(config, &["keys", "show", id, "--json"])).unwrap()
}

/// Single node on the Redis store: the same migration, written through the Redis store's
/// atomic script (the same `Keys::redigest` as the file store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_node_redigests_through_the_store() {
    let _serial = SERIAL.lock().await;
    let redis = common::redis::RedisServer::start();
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let v1 = gateway_config(
        up.addr(),
        1000,
        "",
        "",
        &format!("{ROUTE}\n[redis]\nurl = \"{}\"\n", redis.url()),
    )
    .replacen("[keys]\n", "[keys]\nsource = \"redis\"\n", 1);
    let config = write_file(dir.path(), "keygate.toml", &v1);
    let a = create_key(&config, &[]);
    let revoked = create_key(&config, &[]);
    cli_ok(&config, &["keys", "revoke", &revoked.id]);
    write_file(dir.path(), "secret.v2", SECRET_V2);
    std::fs::write(&config, rotated(&v1, false)).unwrap();
    // `secret status` reads the Redis store (it used to read the absent file: no keys).
    let before = secret_status(&config);
    assert_eq!(
        (live_on(&before, 1), live_on(&before, 2)),
        (1, 0),
        "{before:?}"
    );

    let gw = spawn_ready(&config, &[], WAIT).await;
    assert_eq!(status_of(&gw, &a.key).await, 200);
    assert_eq!(status_of(&gw, &revoked.key).await, 401);
    let cfg = config.clone();
    let id = a.id.clone();
    eventually_named("a on version 2 in redis", WAIT, || {
        let (cfg, id) = (cfg.clone(), id.clone());
        async move { (show(&cfg, &id)["secret_version"] == 2).then_some(()) }
    })
    .await;
    let events = redigested(&dir.path().join("audit.jsonl"));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&events[0]["key_id"], &events[0]["actor"]),
        (&json!(a.id), &json!("gateway"))
    );
    assert_eq!(show(&config, &revoked.id)["secret_version"], 1);
    assert_eq!(show(&config, &revoked.id)["state"], "revoked");
    let after = secret_status(&config);
    assert_eq!(
        (live_on(&after, 1), live_on(&after, 2)),
        (0, 1),
        "{after:?}"
    );
    // The gateway follows the new version and the key keeps working.
    eventually_named("a answers 200 after the table follows", WAIT, || async {
        (status_of(&gw, &a.key).await == 200).then_some(())
    })
    .await;
    assert_eq!(
        metric(
            gw.admin,
            "keygate_keys_redigested_total{outcome=\"written\"}"
        )
        .await,
        1.0
    );
    // Everything in Redis: the store's hashes and stream, usage.
    let mut all = redis.cmd(&["KEYS", "*"]);
    for k in ["keygate:s:keys", "keygate:s:meta"] {
        all.push_str(&redis.cmd(&["HGETALL", k]));
    }
    all.push_str(&redis.cmd(&["XRANGE", "keygate:s:log", "-", "+"]));
    assert!(all.contains(&a.id), "the store was read: {all}");
    assert_nowhere(
        dir.path(),
        &[gw.stderr_contents(), all],
        &[&a.key, &revoked.key, SECRET, SECRET_V2],
    );
}
