//! Integration tests of `keygate control`: the admin REST API through HTTP against the real
//! binary (spawned with stdout piped; it prints `{"event":"listening","control":"…"}`), side
//! by side with the CLI on the same store.
//!
//! No fixed ports (the control plane binds 127.0.0.1:0), no sleeps for synchronisation, every
//! wait bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(audit_log: &str, max_body: usize) -> String {
    format!(
        r#"[keys]
store = "keys.jsonl"
audit_log = "{audit_log}"
usage_file = "usage.json"
poll_interval_ms = 50
rotation_check_seconds = 1

[policy]
max_ttl = "30d"
require_owner = true

[plans.default]
rate = "100/s"

[plans.bulk]
rate = "1000/s"

[control]
listen = "127.0.0.1:0"
tokens = "admin-tokens.jsonl"
max_body_bytes = {max_body}
heartbeat_ms = 200
"#
    )
}

/// Tokens of each role, plus the write token's id.
struct Tokens {
    read: String,
    write: String,
    write_id: String,
    feed: String,
}

fn mint(cfg: &Path, role: &str) -> (String, String) {
    mint_args(cfg, &["--role", role])
}

fn tokens(cfg: &Path) -> Tokens {
    let (write, write_id) = mint(cfg, "write");
    Tokens {
        read: mint(cfg, "read").0,
        write,
        write_id,
        feed: mint(cfg, "feed").0,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    cfg: PathBuf,
    cp: ControlPlane,
    t: Tokens,
}

async fn setup(max_body: usize) -> Env {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    let cfg = write_file(&path, "keygate.toml", &config("audit.jsonl", max_body));
    let t = tokens(&cfg);
    let cp = ControlPlane::spawn(&cfg).await;
    Env {
        _dir: dir,
        dir: path,
        cfg,
        cp,
        t,
    }
}

/// Asserts a response body carries no digest: no `"digest"` key, no 64-char lowercase hex run.
fn assert_no_digest(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert!(!text.contains("\"digest\""), "digest field in {text}");
    let mut run = 0;
    for c in text.chars() {
        if c.is_ascii_digit() || ('a'..='f').contains(&c) {
            run += 1;
            assert!(run < 64, "64-hex run (a digest?) in {text}");
        } else {
            run = 0;
        }
    }
}

/// One request with an optional bearer token; checks every body for digests.
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let (status, h, b) = request(addr, method, path, &headers, body).await;
    assert_no_digest(&b);
    let v = if b.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&b).unwrap_or(Value::String(String::from_utf8_lossy(&b).into()))
    };
    (status, h, v)
}

fn ctype(h: &http::HeaderMap) -> String {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Asserts a problem+json answer with this status and code.
fn assert_problem(r: &(u16, http::HeaderMap, Value), status: u16, code: &str) {
    assert_eq!(r.0, status, "{:?}", r.2);
    assert_eq!(ctype(&r.1), "application/problem+json");
    assert_eq!(r.2["code"], code, "{:?}", r.2);
    assert_eq!(r.2["status"], status);
}

async fn create(e: &Env, body: Value) -> Value {
    let r = call(
        e.cp.addr,
        Method::POST,
        "/v1/api-keys",
        Some(&e.t.write),
        body.to_string(),
    )
    .await;
    assert_eq!(r.0, 201, "{:?}", r.2);
    assert_eq!(ctype(&r.1), "application/json");
    r.2
}

/// A key named `name` (owner "o") made through the API; its id.
async fn create_id(e: &Env, name: &str) -> String {
    create(e, json!({"name": name, "owner": "o"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn every_endpoint_happy_path() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());

    // The spec, unauthenticated, byte for byte the file.
    let (s, h, body) = request(a, Method::GET, "/v1/openapi.yaml", &[], Bytes::new()).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/yaml");
    assert_eq!(
        body,
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap()
    );

    // Create: the key once, with the grants asked for.
    let k1 = create(
        &e,
        json!({"name": "billing", "owner": "payments", "env": "live", "scopes": ["invoices:read"],
               "plan": "bulk", "expires_in": "7d", "allow_ips": ["127.0.0.0/8"],
               "allow_origins": ["https://app.example"], "labels": {"team": "a"}}),
    )
    .await;
    let id1 = k1["id"].as_str().unwrap().to_owned();
    assert!(k1["key"].as_str().unwrap().starts_with("kg_live_"));
    assert_eq!(k1["state"], "active");
    assert_eq!(k1["plan"], "bulk");
    assert_eq!(k1["labels"]["team"], "a");
    let k2 = create(&e, json!({"name": "other", "owner": "ops", "env": "test"})).await;
    let id2 = k2["id"].as_str().unwrap().to_owned();
    let k3 = create(
        &e,
        json!({"name": "third", "owner": "ops", "labels": {"team": "b"}}),
    )
    .await;
    let id3 = k3["id"].as_str().unwrap().to_owned();

    // Get: never the key.
    let r = call(a, Method::GET, &format!("/v1/api-keys/{id1}"), w, "").await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["id"], id1.as_str());
    assert!(r.2.get("key").is_none());

    // List: filters and pagination.
    let r = call(a, Method::GET, "/v1/api-keys", Some(&e.t.read), "").await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["items"].as_array().unwrap().len(), 3);
    assert!(r.2["next_cursor"].is_null());
    assert!(r.2["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i.get("key").is_none()));
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = call(a, Method::GET, "/v1/api-keys?owner=ops", w, "").await;
    assert_eq!(ids(&r.2).len(), 2);
    let r = call(a, Method::GET, "/v1/api-keys?env=test", w, "").await;
    assert_eq!(ids(&r.2), vec![id2.clone()]);
    let r = call(a, Method::GET, "/v1/api-keys?label=team%3Db", w, "").await;
    assert_eq!(ids(&r.2), vec![id3.clone()]);
    let r = call(
        a,
        Method::GET,
        "/v1/api-keys?state=active&owner=payments",
        w,
        "",
    )
    .await;
    assert_eq!(ids(&r.2), vec![id1.clone()]);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/api-keys?limit=2&cursor={c}"),
            None => "/v1/api-keys?limit=2".into(),
        };
        let r = call(a, Method::GET, &path, w, "").await;
        assert_eq!(r.0, 200);
        assert!(ids(&r.2).len() <= 2);
        seen.extend(ids(&r.2));
        match r.2["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut all = vec![id1.clone(), id2.clone(), id3.clone()];
    all.sort();
    assert_eq!(seen, all, "pagination visits every key once, in id order");

    // Patch: scopes, rate, expiry, labels, CIDRs, origins.
    let r = call(
        a,
        Method::PATCH,
        &format!("/v1/api-keys/{id1}"),
        w,
        json!({"scopes": ["invoices:read", "invoices:write"], "rate": "5/s", "expires_in": "1d",
               "labels": {"team": "", "tier": "gold"}, "allow_ips": ["10.0.0.0/8"],
               "allow_origins": []})
        .to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["scopes"], json!(["invoices:read", "invoices:write"]));
    assert_eq!(r.2["rate"], "5/s");
    assert!(r.2.get("plan").is_none(), "a rate replaces the plan");
    assert_eq!(r.2["labels"], json!({"tier": "gold"}));
    assert_eq!(r.2["allow_ips"], json!(["10.0.0.0/8"]));
    assert!(r.2.get("allow_origins").is_none());
    assert!(r.2.get("key").is_none());
    let r = call(
        a,
        Method::PATCH,
        &format!("/v1/api-keys/{id1}"),
        w,
        json!({"plan": "default", "expires_in": null}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["plan"], "default");
    assert!(r.2.get("expires_at").is_none());

    // Rotate: a new key once, the old one gets a grace expiry.
    let r = call(
        a,
        Method::POST,
        &format!("/v1/api-keys/{id1}/rotate"),
        w,
        json!({"grace": "1h"}).to_string(),
    )
    .await;
    assert_eq!(r.0, 201, "{:?}", r.2);
    let new_id = r.2["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id1);
    assert!(r.2["key"].as_str().unwrap().starts_with("kg_live_"));
    assert_ne!(r.2["key"], k1["key"]);
    assert_eq!(r.2["rotated_from"], id1.as_str());
    let old = call(a, Method::GET, &format!("/v1/api-keys/{id1}"), w, "").await;
    assert_eq!(old.2["rotated_to"], new_id.as_str());
    assert!(old.2["expires_at"].as_i64().is_some());
    // Rotate with no body: the configured grace.
    let r = call(
        a,
        Method::POST,
        &format!("/v1/api-keys/{id2}/rotate"),
        w,
        "",
    )
    .await;
    assert_eq!(r.0, 201, "{:?}", r.2);

    // Delete: with a reason, idempotent.
    let path = format!("/v1/api-keys/{id3}");
    let r = call(
        a,
        Method::DELETE,
        &path,
        w,
        json!({"reason": "leaked"}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["state"], "revoked");
    assert_eq!(r.2["revoked_reason"], "leaked");
    let r2 = call(a, Method::DELETE, &path, w, "").await;
    assert_eq!(r2.0, 200, "{:?}", r2.2);
    assert_eq!(r2.2["revoked_at"], r.2["revoked_at"]);
    assert_eq!(r2.2["rev"], r.2["rev"], "revoking twice writes nothing");

    // Mass revoke by owner / env / label.
    create(
        &e,
        json!({"name": "m1", "owner": "mass", "labels": {"x": "1"}}),
    )
    .await;
    create(&e, json!({"name": "m2", "owner": "mass"})).await;
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"label": "x=1", "confirm": true, "reason": "incident"}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["revoked"].as_array().unwrap().len(), 1);
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "mass", "env": "live", "confirm": true}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["revoked"].as_array().unwrap().len(), 1);
    let r = call(
        a,
        Method::GET,
        "/v1/api-keys?owner=mass&state=revoked",
        w,
        "",
    )
    .await;
    assert_eq!(ids(&r.2).len(), 2);

    // Usage reports (feed role) show up in the API: each batch's counts added once, however
    // often it is sent; a report of totals from an older gateway refused, saying why.
    let report = |seq: u64, requests: u64, last_used: i64| {
        json!({"node": "gw1", "boot": 7, "seq": seq,
               "added": {new_id.clone(): {"last_used": last_used, "requests": requests}}})
        .to_string()
    };
    for (body, accepted, duplicate) in [
        (report(1, 7, 1_700_000_000), 7, false),
        (report(1, 7, 1_700_000_000), 7, true),
        (report(2, 3, 1_600_000_000), 10, false),
    ] {
        let r = call(a, Method::POST, "/v1/usage", Some(&e.t.feed), body).await;
        assert_eq!(r.0, 200, "{:?}", r.2);
        assert_eq!(r.2["accepted"], true);
        assert_eq!(r.2["duplicate"].as_bool().unwrap_or(false), duplicate);
        let r = call(a, Method::GET, &format!("/v1/api-keys/{new_id}"), w, "").await;
        assert_eq!(r.2["requests"], accepted);
        assert_eq!(r.2["last_used"], 1_700_000_000);
    }
    let r = call(
        a,
        Method::POST,
        "/v1/usage",
        Some(&e.t.feed),
        json!({"node": "gw1", "usage": {new_id.clone(): {"last_used": 1_700_000_000, "requests": 70}}})
            .to_string(),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.2["detail"]
            .as_str()
            .unwrap()
            .contains("older than this control plane"),
        "{:?}",
        r.2
    );
    let r = call(a, Method::GET, &format!("/v1/api-keys/{new_id}"), w, "").await;
    assert_eq!(r.2["requests"], 10);

    // The feed (feed role): ndjson, a snapshot first.
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    let req = format!(
        "GET /v1/feed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        e.t.feed
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let text = within("the feed's snapshot", NET_TIMEOUT, async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "feed closed early");
            got.extend_from_slice(&buf[..n]);
            let t = String::from_utf8_lossy(&got).into_owned();
            if t.contains("\"type\":\"snapshot_end\"") {
                break t;
            }
        }
    })
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text
        .to_ascii_lowercase()
        .contains("content-type: application/x-ndjson"));
    assert!(text.contains("\"type\":\"snapshot_begin\""));
    assert!(text.contains(&id1));
    // Every line sealed (for the empty nonce: this reader sent none).
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("{\"type\""))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in lines {
        assert!(l.ends_with("\"}") && l.contains(",\"seal\":\"1:"), "{l}");
    }
}

/// A usage report batch applied just before the control plane stopped, and sent again after
/// its restart (its answer was lost), counts once: the ledger beside the usage file keeps how
/// far each gateway process got. An unreadable ledger is said in the log and written anew.
#[tokio::test]
async fn a_usage_report_sent_again_after_a_restart_counts_once() {
    let Env {
        _dir,
        dir,
        cfg,
        cp,
        t,
        ..
    } = setup(64 * 1024).await;
    let read = Some(t.read.as_str());
    let id = {
        let r = call(
            cp.addr,
            Method::POST,
            "/v1/api-keys",
            Some(&t.write),
            json!({"name": "reported", "owner": "o"}).to_string(),
        )
        .await;
        assert_eq!(r.0, 201, "{:?}", r.2);
        r.2["id"].as_str().unwrap().to_owned()
    };
    let batch = |seq: u64| {
        json!({"node": "gw1", "boot": 7, "seq": seq,
               "added": {id.clone(): {"last_used": 1_700_000_000, "requests": 4}}})
        .to_string()
    };
    let send = |cp: SocketAddr, seq: u64| {
        let (body, feed) = (batch(seq), t.feed.clone());
        async move {
            let r = call(cp, Method::POST, "/v1/usage", Some(&feed), body).await;
            assert_eq!(r.0, 200, "{:?}", r.2);
            r.2["duplicate"].as_bool().unwrap_or(false)
        }
    };
    let requests = |cp: SocketAddr| {
        let path = format!("/v1/api-keys/{id}");
        async move { call(cp, Method::GET, &path, read, "").await.2["requests"].clone() }
    };
    assert!(!send(cp.addr, 1).await);
    drop(cp); // killed: nothing is written on the way out
    let cp = ControlPlane::spawn(&cfg).await;
    assert!(
        send(cp.addr, 1).await,
        "the batch sent again is a duplicate"
    );
    assert_eq!(requests(cp.addr).await, 4);
    assert!(dir.join("usage.json.reports.json").exists());
    assert!(!send(cp.addr, 2).await);
    assert_eq!(requests(cp.addr).await, 8);

    write_file(&dir, "usage.json.reports.json", "{not json");
    assert!(!send(cp.addr, 3).await);
    assert!(send(cp.addr, 3).await, "the ledger written anew");
    assert_eq!(requests(cp.addr).await, 12);
    let log = std::fs::read_to_string(dir.join("control.stderr.log")).unwrap();
    assert!(
        log.contains("the usage report ledger is not valid; starting a new one"),
        "{log}"
    );
}

#[tokio::test]
async fn auth_failures_on_every_endpoint() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let k = create(&e, json!({"name": "x", "owner": "o"})).await;
    let id = k["id"].as_str().unwrap();
    let key_path = format!("/v1/api-keys/{id}");
    let rotate_path = format!("/v1/api-keys/{id}/rotate");
    // (method, path, body, role needed)
    let endpoints: Vec<(Method, &str, String, &str)> = vec![
        (Method::GET, "/v1/api-keys", String::new(), "read"),
        (
            Method::POST,
            "/v1/api-keys",
            json!({"name": "n", "owner": "o"}).to_string(),
            "write",
        ),
        (Method::GET, &key_path, String::new(), "read"),
        (
            Method::PATCH,
            &key_path,
            json!({"name": "n2"}).to_string(),
            "write",
        ),
        (Method::POST, &rotate_path, String::new(), "write"),
        (
            Method::POST,
            "/v1/api-keys/revoke",
            json!({"owner": "o", "confirm": true}).to_string(),
            "write",
        ),
        (Method::DELETE, &key_path, String::new(), "write"),
        (Method::GET, "/v1/feed", String::new(), "feed"),
        (
            Method::POST,
            "/v1/usage",
            json!({"node": "n", "boot": 1, "seq": 1}).to_string(),
            "feed",
        ),
    ];
    for (m, p, body, role) in &endpoints {
        let what = format!("{m} {p}");
        let r = call(a, m.clone(), p, None, body.clone()).await;
        assert_problem(&r, 401, "unauthorized");
        assert_eq!(r.1["www-authenticate"], "Bearer", "{what}");
        let r = call(a, m.clone(), p, Some("kgadm_not-a-token"), body.clone()).await;
        assert_problem(&r, 401, "unauthorized");
        let r = call(a, m.clone(), p, Some("garbage"), body.clone()).await;
        assert_problem(&r, 401, "unauthorized");
        let wrong: Vec<&str> = match *role {
            "read" => vec![&e.t.feed],
            "write" => vec![&e.t.read, &e.t.feed],
            _ => vec![&e.t.read, &e.t.write],
        };
        for t in wrong {
            let r = call(a, m.clone(), p, Some(t), body.clone()).await;
            assert_problem(&r, 403, "forbidden");
        }
    }
    // Nothing above changed the store: the key is still active, alone.
    let r = call(a, Method::GET, "/v1/api-keys", Some(&e.t.read), "").await;
    assert_eq!(r.2["items"].as_array().unwrap().len(), 1);
    assert_eq!(r.2["items"][0]["state"], "active");
    assert_eq!(r.2["items"][0]["name"], "x");
}

#[tokio::test]
async fn validation_and_policy_failures() {
    let e = setup(4096).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let post = |body: String| call(a, Method::POST, "/v1/api-keys", w, body);

    // Policy: lifetime over max_ttl, no owner under require_owner.
    let r = post(json!({"name": "n", "owner": "o", "expires_in": "31d"}).to_string()).await;
    assert_problem(&r, 422, "policy_violation");
    let r = post(json!({"name": "n"}).to_string()).await;
    assert_problem(&r, 422, "policy_violation");
    let r = post(json!({"name": "n", "owner": "  "}).to_string()).await;
    assert_problem(&r, 422, "policy_violation");
    // Malformed input.
    let r = post("{\"name\": ".into()).await;
    assert_problem(&r, 400, "invalid_json");
    let r = post("[1, 2]".into()).await;
    assert_problem(&r, 400, "invalid_json");
    let r = post("".into()).await;
    assert_problem(&r, 400, "invalid_json");
    let deep = format!("{}{}", "[".repeat(1500), "]".repeat(1500));
    let r = post(deep).await;
    assert_problem(&r, 400, "invalid_json");
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(600), "}".repeat(600));
    let r = post(deep_obj).await;
    assert_problem(&r, 400, "invalid_json");
    let r = post(json!({"name": "n", "owner": "o", "digest": "00"}).to_string()).await;
    assert_problem(&r, 400, "unknown_field");
    let r = post(json!({"name": "n", "owner": "o", "scopes": "x"}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    let r = post(json!({"name": "n", "owner": "o", "expires_in": "soon"}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    let r =
        post(json!({"name": "n", "owner": "o", "expires_in": "100000000000y"}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    let r = post(json!({"name": "n", "owner": "o", "plan": "nope"}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    let r = post(json!({"name": "n", "owner": "o", "allow_ips": ["nope"]}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    // Body over the limit (4096 here).
    let big = json!({"name": "x".repeat(8000), "owner": "o"}).to_string();
    let r = post(big.clone()).await;
    assert_problem(&r, 413, "body_too_large");

    let k = create(&e, json!({"name": "n", "owner": "o"})).await;
    let id = k["id"].as_str().unwrap();
    let path = format!("/v1/api-keys/{id}");
    // Immutable fields.
    for (f, v) in [
        ("digest", json!("ab".repeat(32))),
        ("id", json!("key_other")),
        ("created_at", json!(1)),
        ("owner", json!("someone-else")),
        ("env", json!("test")),
        ("revoked_at", json!(1)),
        ("key", json!("kg_live_x")),
    ] {
        let r = call(
            a,
            Method::PATCH,
            &path,
            w,
            json!({ f: v, "name": "renamed" }).to_string(),
        )
        .await;
        assert_problem(&r, 400, "immutable_field");
    }
    let r = call(a, Method::PATCH, &path, w, json!({"bogus": 1}).to_string()).await;
    assert_problem(&r, 400, "unknown_field");
    let r = call(
        a,
        Method::PATCH,
        &path,
        w,
        json!({"expires_in": "60d"}).to_string(),
    )
    .await;
    assert_problem(&r, 422, "policy_violation");
    let r = call(a, Method::PATCH, &path, w, big.clone()).await;
    assert_problem(&r, 413, "body_too_large");
    let r = call(a, Method::GET, &path, w, "").await;
    assert_eq!(r.2["name"], "n", "refused patches changed nothing");
    assert_eq!(r.2["owner"], "o");
    // Rotate / delete input checks.
    let rot = format!("{path}/rotate");
    let r = call(a, Method::POST, &rot, w, json!({"grace": "x"}).to_string()).await;
    assert_problem(&r, 400, "invalid_request");
    let r = call(a, Method::POST, &rot, w, json!({"other": 1}).to_string()).await;
    assert_problem(&r, 400, "unknown_field");
    let r = call(a, Method::DELETE, &path, w, json!({"other": 1}).to_string()).await;
    assert_problem(&r, 400, "unknown_field");
    let r = call(a, Method::DELETE, &path, w, "{".to_string()).await;
    assert_problem(&r, 400, "invalid_json");

    // Mass revoke needs confirm: true, and a selector.
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "o"}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "confirmation_required");
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "o", "confirm": "yes"}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "confirmation_required");
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"confirm": true, "owner": null}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    // The API's answer names the body's fields, not the CLI's flags alone.
    let detail = r.2["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("an owner, an env or a label"), "{detail}");
    let r = call(a, Method::GET, &path, w, "").await;
    assert_eq!(
        r.2["state"], "active",
        "refused mass revokes changed nothing"
    );

    // Unknown ids.
    let missing = "/v1/api-keys/key_doesnotexist";
    assert_problem(
        &call(a, Method::GET, missing, w, "").await,
        404,
        "not_found",
    );
    assert_problem(
        &call(
            a,
            Method::PATCH,
            missing,
            w,
            json!({"name": "z"}).to_string(),
        )
        .await,
        404,
        "not_found",
    );
    assert_problem(
        &call(a, Method::DELETE, missing, w, "").await,
        404,
        "not_found",
    );
    assert_problem(
        &call(a, Method::POST, &format!("{missing}/rotate"), w, "").await,
        404,
        "not_found",
    );
    // Unknown endpoints, unsupported methods, bad list queries, bad feed cursor.
    assert_problem(
        &call(a, Method::GET, "/v1/nope", w, "").await,
        404,
        "not_found",
    );
    assert_problem(
        &call(a, Method::PUT, "/v1/api-keys", w, "").await,
        405,
        "method_not_allowed",
    );
    assert_problem(
        &call(a, Method::GET, "/v1/api-keys?limit=0", w, "").await,
        400,
        "invalid_request",
    );
    assert_problem(
        &call(a, Method::GET, "/v1/api-keys?state=weird", w, "").await,
        400,
        "invalid_request",
    );
    assert_problem(
        &call(a, Method::GET, "/v1/api-keys?colour=red", w, "").await,
        400,
        "invalid_request",
    );
    assert_problem(
        &call(a, Method::GET, "/v1/feed?after=x", Some(&e.t.feed), "").await,
        400,
        "invalid_request",
    );
    // The stream's nonce is at most 64 hex digits.
    for nonce in ["not-hex", &"a".repeat(65)] {
        assert_problem(
            &call(
                a,
                Method::GET,
                &format!("/v1/feed?nonce={nonce}"),
                Some(&e.t.feed),
                "",
            )
            .await,
            400,
            "invalid_request",
        );
    }
}

#[tokio::test]
async fn cli_and_api_side_by_side() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());

    // Created by the CLI: visible and revocable through the API.
    let out = cli(
        &e.cfg,
        &[
            "keys", "create", "--name", "from-cli", "--owner", "cli", "--json",
        ],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let v: Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    let cli_id = v["id"].as_str().unwrap().to_owned();
    let r = call(a, Method::GET, &format!("/v1/api-keys/{cli_id}"), w, "").await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["name"], "from-cli");
    let r = call(a, Method::GET, "/v1/api-keys?owner=cli", w, "").await;
    assert_eq!(r.2["items"][0]["id"], cli_id.as_str());
    let r = call(a, Method::DELETE, &format!("/v1/api-keys/{cli_id}"), w, "").await;
    assert_eq!(r.0, 200);
    let out = cli(&e.cfg, &["keys", "show", &cli_id, "--json"], SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    let v: Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    assert_eq!(v["state"], "revoked");

    // Created by the API: visible and revocable through the CLI.
    let k = create(&e, json!({"name": "from-api", "owner": "api"})).await;
    let api_id = k["id"].as_str().unwrap().to_owned();
    let out = cli(
        &e.cfg,
        &["keys", "list", "--owner", "api", "--json"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    assert!(stdout_str(&out).contains(&api_id));
    let out = cli(
        &e.cfg,
        &["keys", "revoke", &api_id, "--reason", "cli-side"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let r = call(a, Method::GET, &format!("/v1/api-keys/{api_id}"), w, "").await;
    assert_eq!(r.2["state"], "revoked");
    assert_eq!(r.2["revoked_reason"], "cli-side");
    // And the API revoking it again is still a 200.
    let r = call(a, Method::DELETE, &format!("/v1/api-keys/{api_id}"), w, "").await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["revoked_reason"], "cli-side");
}

fn audit_lines(dir: &Path) -> Vec<Value> {
    read_lossy(&dir.join("audit.jsonl"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn audit_has_one_line_per_mutation_with_the_token_as_actor() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let actor = format!("admin:{}", e.t.write_id);
    let before = audit_lines(&e.dir).len();

    let k = create(&e, json!({"name": "a", "owner": "o", "labels": {"g": "1"}})).await;
    let id = k["id"].as_str().unwrap().to_owned();
    let mut expected = vec![("key.created", id.clone())];
    let r = call(
        a,
        Method::PATCH,
        &format!("/v1/api-keys/{id}"),
        w,
        json!({"name": "b"}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200);
    expected.push(("key.updated", id.clone()));
    let r = call(a, Method::POST, &format!("/v1/api-keys/{id}/rotate"), w, "").await;
    assert_eq!(r.0, 201);
    let new_id = r.2["id"].as_str().unwrap().to_owned();
    // A rotation writes two versions (new key, old with grace) and one event linking them.
    expected.push(("key.rotated", id.clone()));
    let r = call(a, Method::DELETE, &format!("/v1/api-keys/{id}"), w, "").await;
    assert_eq!(r.0, 200);
    expected.push(("key.revoked", id.clone()));
    // Revoking again writes nothing, and neither do reads nor refused requests.
    call(a, Method::DELETE, &format!("/v1/api-keys/{id}"), w, "").await;
    call(a, Method::GET, "/v1/api-keys", w, "").await;
    call(a, Method::PATCH, &format!("/v1/api-keys/{id}"), w, "{}").await;
    call(a, Method::POST, "/v1/api-keys", Some(&e.t.read), "{}").await;
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"label": "g=1", "confirm": true}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["revoked"], json!([new_id.clone()]));
    expected.push(("key.revoked", new_id.clone()));

    let lines = audit_lines(&e.dir);
    let new: Vec<&Value> = lines[before..].iter().collect();
    let text = serde_json::to_string(&new).unwrap();
    assert_eq!(new.len(), expected.len(), "{text}");
    for (line, (event, key)) in new.iter().zip(&expected) {
        let line_text = line.to_string();
        assert!(line_text.contains(event), "{event} in {line_text}");
        assert!(line_text.contains(key.as_str()), "{key} in {line_text}");
        assert!(line_text.contains(&actor), "{actor} in {line_text}");
    }
    assert_no_digest(text.as_bytes());
}

#[tokio::test]
async fn unwritable_audit_log_fails_closed() {
    let dir = tempdir();
    let good = write_file(dir.path(), "good.toml", &config("audit.jsonl", 65536));
    let t = tokens(&good);
    let out = cli(
        &good,
        &["keys", "create", "--name", "k", "--owner", "o", "--json"],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let v: Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    // Same store and tokens, audit log on a full device.
    let full = write_file(dir.path(), "full.toml", &config("/dev/full", 65536));
    let cp = ControlPlane::spawn(&full).await;
    let a = cp.addr;
    let w = Some(t.write.as_str());
    let store = dir.path().join("keys.jsonl");
    let before = std::fs::read(&store).unwrap();

    let r = call(
        a,
        Method::POST,
        "/v1/api-keys",
        w,
        json!({"name": "n", "owner": "o"}).to_string(),
    )
    .await;
    assert_problem(&r, 503, "audit_unavailable");
    let path = format!("/v1/api-keys/{id}");
    let r = call(a, Method::PATCH, &path, w, json!({"name": "z"}).to_string()).await;
    assert_problem(&r, 503, "audit_unavailable");
    let r = call(a, Method::POST, &format!("{path}/rotate"), w, "").await;
    assert_problem(&r, 503, "audit_unavailable");
    let r = call(a, Method::DELETE, &path, w, "").await;
    assert_problem(&r, 503, "audit_unavailable");
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "o", "confirm": true}).to_string(),
    )
    .await;
    assert_problem(&r, 503, "audit_unavailable");

    assert_eq!(
        std::fs::read(&store).unwrap(),
        before,
        "the store is unchanged"
    );
    // Reads still work and show the key as it was.
    let r = call(a, Method::GET, &path, w, "").await;
    assert_eq!(r.0, 200);
    assert_eq!(r.2["state"], "active");
    assert_eq!(r.2["name"], "k");
    let r = call(a, Method::GET, "/v1/api-keys", w, "").await;
    assert_eq!(r.2["items"].as_array().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Issue 17 item 6 and issue 14 defect 3: each test failed before its fix
// ---------------------------------------------------------------------------------------------

/// Unknown paths under `/v1/api-keys/…` are 404 (as docs/openapi.yaml says); a known path
/// with a method it does not support is 405 with `Allow`.
#[tokio::test]
async fn unknown_api_paths_are_404_and_wrong_methods_405_with_allow() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let id = create_id(&e, "x").await;
    for path in [
        format!("/v1/api-keys/{id}/nope"),
        format!("/v1/api-keys/{id}/rotate/more"),
        "/v1/api-keys/a/b/c".to_owned(),
        "/v1/api-keys/revoke/x".to_owned(),
    ] {
        for m in [Method::GET, Method::POST, Method::DELETE] {
            assert_problem(&call(a, m.clone(), &path, w, "").await, 404, "not_found");
        }
    }
    let allow = |r: &(u16, http::HeaderMap, Value)| {
        r.1.get("allow")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let cases = [
        (Method::PUT, "/v1/api-keys".to_owned(), "GET, POST"),
        (Method::GET, format!("/v1/api-keys/{id}/rotate"), "POST"),
        (
            Method::PUT,
            format!("/v1/api-keys/{id}"),
            "GET, PATCH, DELETE",
        ),
        (Method::GET, "/v1/api-keys/revoke".to_owned(), "POST"),
        (Method::POST, "/v1/feed".to_owned(), "GET"),
    ];
    for (m, path, want) in cases {
        let r = call(a, m.clone(), &path, w, "").await;
        assert_problem(&r, 405, "method_not_allowed");
        assert_eq!(allow(&r), want, "{m} {path}");
    }
}

/// RFC 9110 §11.1: the auth scheme is case-insensitive.
#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let e = setup(64 * 1024).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {}", e.t.read);
        let (status, _, body) = request(
            e.cp.addr,
            Method::GET,
            "/v1/api-keys",
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {}", String::from_utf8_lossy(&body));
    }
    let auth = format!("Basic {}", e.t.read);
    let (status, _, _) = request(
        e.cp.addr,
        Method::GET,
        "/v1/api-keys",
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 401);
}

/// THREATS J7: scopes such as `..`, `a..b`, `%2f` and `*` are a 400 on create and update.
#[tokio::test]
async fn bad_scopes_are_400_on_create_and_update() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let id = create(&e, json!({"name": "x", "owner": "o", "scopes": ["a:read"]})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for s in [
        "..",
        "a..b",
        "a%2fb",
        "%2F",
        "a/b",
        "*",
        "invoices:*",
        "",
        ".a",
        "a:",
    ] {
        let r = call(
            a,
            Method::POST,
            "/v1/api-keys",
            w,
            json!({"name": "n", "owner": "o", "scopes": [s]}).to_string(),
        )
        .await;
        assert_problem(&r, 400, "invalid_request");
        let r = call(
            a,
            Method::PATCH,
            &format!("/v1/api-keys/{id}"),
            w,
            json!({ "scopes": [s] }).to_string(),
        )
        .await;
        assert_problem(&r, 400, "invalid_request");
    }
    let r = call(a, Method::GET, "/v1/api-keys", w, "").await;
    assert_eq!(r.2["items"].as_array().unwrap().len(), 1);
}

/// Issue 14 defect 3: REST mass revoke spares canaries; DELETE by id still revokes one.
#[tokio::test]
async fn mass_revoke_spares_canaries() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let live = create(&e, json!({"name": "l", "owner": "mass"})).await["id"].clone();
    let canary = create(&e, json!({"name": "c", "owner": "mass", "canary": true})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "mass", "confirm": true}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["revoked"], json!([live]));
    let path = format!("/v1/api-keys/{canary}");
    assert_eq!(
        call(a, Method::GET, &path, w, "").await.2["state"],
        "canary"
    );
    let r = call(a, Method::DELETE, &path, w, "").await;
    assert_eq!(r.2["state"], "revoked");
}

/// Issue 11 (control plane observability): `/healthz`, `/readyz` and `/metrics` answer without
/// a token in file mode; requests are counted by operation and status, feed readers and the
/// store revision are visible, and the scrape passes `promtool check metrics`.
#[tokio::test]
async fn probes_and_metrics_make_the_control_plane_visible() {
    let e = setup(1 << 20).await;
    let a = e.cp.addr;
    let (s, _, body) = get(a, "/healthz", &[]).await;
    assert_eq!(s, 200, "{body:?}");
    create(
        &e,
        json!({"name": "n", "owner": "o", "scopes": ["invoices:read"]}),
    )
    .await;
    // `/readyz` reports the revision the in-memory log holds, which follows the store
    // (it does not wait for it as reads do), so the create shows there within a deadline.
    eventually_named(
        "readyz at revision 1",
        std::time::Duration::from_secs(5),
        || async {
            let (s, _, body) = get(a, "/readyz", &[]).await;
            let text = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(s, 200, "{text}");
            text.contains("revision=1").then_some(())
        },
    )
    .await;
    let r = call(
        a,
        Method::GET,
        "/v1/api-keys/key_missing",
        Some(&e.t.read),
        "",
    )
    .await;
    assert_eq!(r.0, 404);
    // One feed reader connected while we scrape.
    let mut feed = tokio::net::TcpStream::connect(a).await.unwrap();
    let req = format!(
        "GET /v1/feed HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
        e.t.feed
    );
    feed.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = feed.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    let scrape = eventually_named(
        "feed reader counted",
        std::time::Duration::from_secs(5),
        || async {
            let (_, _, body) = get(a, "/metrics", &[]).await;
            let text = String::from_utf8_lossy(&body).into_owned();
            text.contains("keygate_control_feed_subscribers 1")
                .then_some(text)
        },
    )
    .await;
    for series in [
        r#"keygate_control_requests_total{operation="create",status="201"} 1"#,
        r#"keygate_control_requests_total{operation="get",status="404"} 1"#,
        "keygate_control_store_revision 1",
        r#"keygate_control_store_errors_total{kind="rollback"} 0"#,
    ] {
        assert!(scrape.contains(series), "{series} missing in\n{scrape}");
    }
    let promtool = require_tool("promtool", "prometheus");
    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 14 feature "not-before": `not_before` on POST (duration or RFC 3339) makes a
/// pending key; past, unparsable and after-expiry values are 400; PATCH cannot set it.
#[tokio::test]
async fn not_before_on_create_makes_a_pending_key() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let v = create(&e, json!({"name": "n", "owner": "o", "not_before": "1h"})).await;
    assert_eq!(v["state"], "pending", "{v}");
    assert!(v["not_before"].as_i64().unwrap() > v["created_at"].as_i64().unwrap() + 3500);
    let v = create(
        &e,
        json!({"name": "n", "owner": "o", "not_before": "2099-01-01T02:00:00+02:00"}),
    )
    .await;
    assert_eq!(v["not_before"], 4_070_908_800i64, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let listed = call(a, Method::GET, "/v1/api-keys?state=pending", w, "").await;
    assert_eq!(
        listed.2["items"].as_array().unwrap().len(),
        2,
        "{:?}",
        listed.2
    );
    for bad in [
        json!({"name": "n", "owner": "o", "not_before": "yesterday"}),
        json!({"name": "n", "owner": "o", "not_before": "2001-01-01T00:00:00Z"}),
        json!({"name": "n", "owner": "o", "not_before": 5}),
        json!({"name": "n", "owner": "o", "not_before": "2h", "expires_in": "1h"}),
    ] {
        let r = call(a, Method::POST, "/v1/api-keys", w, bad.to_string()).await;
        assert_problem(&r, 400, "invalid_request");
    }
    let r = call(
        a,
        Method::PATCH,
        &format!("/v1/api-keys/{id}"),
        w,
        json!({"not_before": "1h"}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "immutable_field");
}

/// `admin-token create --json <args…>`: (token, id).
fn mint_args(cfg: &Path, args: &[&str]) -> (String, String) {
    let mut all = vec!["admin-token", "create", "--json"];
    all.extend_from_slice(args);
    let out = cli(cfg, &all, SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    let v: Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    (
        v["token"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

/// Issue 14 feature "admin tokens": list and revoke through the CLI and REST (write role),
/// expiry; a revoked token is refused on the very next request, an expired one once its time
/// has come; revocation is audited with the actor and final.
#[tokio::test]
async fn admin_tokens_list_revoke_and_expire() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let keys = "/v1/api-keys";
    // Listing needs the write role and shows no digest (`call` checks every body).
    let r = call(a, Method::GET, "/v1/admin-tokens", w, "").await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    let items = r.2["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3, "{items:?}");
    assert!(items
        .iter()
        .all(|t| t["state"] == "active" && t.get("digest").is_none()));
    let r = call(a, Method::GET, "/v1/admin-tokens", Some(&e.t.read), "").await;
    assert_problem(&r, 403, "forbidden");
    assert_problem(
        &call(
            a,
            Method::DELETE,
            "/v1/admin-tokens/adm_x",
            Some(&e.t.read),
            "",
        )
        .await,
        403,
        "forbidden",
    );
    assert_problem(
        &call(a, Method::DELETE, "/v1/admin-tokens/adm_nope", w, "").await,
        404,
        "not_found",
    );

    // REST revoke: the revoked token is refused on the next request, no waiting.
    let (victim, victim_id) = mint_args(&e.cfg, &["--role", "write", "--name", "ci"]);
    assert_eq!(call(a, Method::GET, keys, Some(&victim), "").await.0, 200);
    let r = call(
        a,
        Method::DELETE,
        &format!("/v1/admin-tokens/{victim_id}"),
        w,
        "",
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["state"], "revoked");
    assert_problem(
        &call(a, Method::GET, keys, Some(&victim), "").await,
        401,
        "unauthorized",
    );
    // Idempotent.
    let r = call(
        a,
        Method::DELETE,
        &format!("/v1/admin-tokens/{victim_id}"),
        w,
        "",
    )
    .await;
    assert_eq!((r.0, r.2["state"].as_str()), (200, Some("revoked")));

    // CLI revoke of the read token: refused on the next request too.
    assert_eq!(call(a, Method::GET, keys, Some(&e.t.read), "").await.0, 200);
    let read_id = items.iter().find(|t| t["role"] == "read").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = cli(&e.cfg, &["admin-token", "revoke", &read_id], SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    assert_problem(
        &call(a, Method::GET, keys, Some(&e.t.read), "").await,
        401,
        "unauthorized",
    );
    let out = cli(&e.cfg, &["admin-token", "revoke", "adm_nope"], SECRET_ENV);
    assert!(!out.status.success());
    assert!(stderr_str(&out).contains("no admin token with id adm_nope"));

    // Expiry: works now, 401 once expired (polled with a deadline, no sleep).
    let (short, short_id) = mint_args(&e.cfg, &["--role", "read", "--expires-in", "2s"]);
    assert_eq!(call(a, Method::GET, keys, Some(&short), "").await.0, 200);
    eventually_named(
        "expired admin token refused",
        std::time::Duration::from_secs(10),
        || async { (call(a, Method::GET, keys, Some(&short), "").await.0 == 401).then_some(()) },
    )
    .await;
    let out = cli(
        &e.cfg,
        &[
            "admin-token",
            "create",
            "--role",
            "read",
            "--expires-in",
            "0s",
        ],
        SECRET_ENV,
    );
    assert!(!out.status.success());

    // The CLI list agrees, and never prints a token or digest.
    let out = cli(&e.cfg, &["admin-token", "list", "--json"], SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    assert_no_digest(&out.stdout);
    let listed: Vec<Value> = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    let state = |id: &str| {
        listed.iter().find(|t| t["id"] == id).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(state(&victim_id), "revoked");
    assert_eq!(state(&read_id), "revoked");
    assert_eq!(state(&short_id), "expired");
    assert_eq!(state(&e.t.write_id), "active");
    let human = stdout_str(&cli(&e.cfg, &["admin-token", "list"], SECRET_ENV));
    assert!(
        human.contains(&victim_id) && human.contains("revoked"),
        "{human}"
    );
    assert!(!human.contains("kgadm_"), "{human}");

    // Audited once each, with who did it.
    let revocations: Vec<Value> = audit_lines(&e.dir)
        .into_iter()
        .filter(|l| l["event"] == "admin_token.revoked")
        .collect();
    assert_eq!(revocations.len(), 2, "{revocations:?}");
    assert_eq!(revocations[0]["token_id"], victim_id.as_str());
    assert_eq!(revocations[0]["actor"], format!("admin:{}", e.t.write_id));
    assert_eq!(revocations[1]["token_id"], read_id.as_str());

    // A token can revoke itself; it is refused from its next request.
    let path = format!("/v1/admin-tokens/{}", e.t.write_id);
    assert_eq!(call(a, Method::DELETE, &path, w, "").await.0, 200);
    assert_problem(
        &call(a, Method::GET, keys, w, "").await,
        401,
        "unauthorized",
    );
}

/// Issue 14 feature "rotation that finishes itself", in a fleet: the control plane completes a
/// rotation from the usage the gateways report (POST /v1/usage, as `keygate serve` in feed
/// mode does), once the successor was used and the old key quiet for `complete_when_idle`;
/// GET reports traffic on both; aborting is 409 once completed, and rolls an open rotation
/// back.
#[tokio::test]
async fn rest_rotation_completes_on_the_control_plane_and_aborts() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let old = create_id(&e, "r").await;
    let r = call(
        a,
        Method::POST,
        &format!("/v1/api-keys/{old}/rotate"),
        w,
        json!({"grace": "1h", "complete_when_idle": "0s"}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    let r = call(
        a,
        Method::POST,
        &format!("/v1/api-keys/{old}/rotate"),
        w,
        json!({"grace": "1h", "complete_when_idle": "2s"}).to_string(),
    )
    .await;
    assert_eq!(r.0, 201, "{:?}", r.2);
    let new = r.2["id"].as_str().unwrap().to_owned();
    // Not used yet: the health gate holds the rotation open.
    let status = get_json(a, &e.t.read, &new).await["rotation_status"].clone();
    assert_eq!(status["state"], "in_progress", "{status}");
    assert_eq!(status["old"]["id"], old.as_str());
    // A gateway reports: the successor served 5 requests, the old key none since the start.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let report = json!({"node": "gw1", "boot": 1, "seq": 1,
                        "added": {new.clone(): {"last_used": now, "requests": 5}}});
    let r = call(
        a,
        Method::POST,
        "/v1/usage",
        Some(&e.t.feed),
        report.to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    let done = eventually_named(
        "rotation completed by the control plane",
        std::time::Duration::from_secs(15),
        || async {
            let v = get_json(a, &e.t.read, &old).await;
            (v["state"] == "revoked").then_some(v)
        },
    )
    .await;
    assert_eq!(done["rotation_status"]["state"], "completed");
    assert_eq!(done["rotation_status"]["new"]["requests_since_rotation"], 5);
    assert!(
        done["revoked_at"].as_i64().unwrap()
            >= done["rotation"]["started_at"].as_i64().unwrap() + 2
    );
    let completed: Vec<Value> = audit_lines(&e.dir)
        .into_iter()
        .filter(|l| l["event"] == "key.rotation_completed")
        .collect();
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0]["successor_id"], new.as_str());
    assert_eq!(completed[0]["actor"], "control-plane");
    assert_problem(&abort(a, &e.t.write, &new).await, 409, "rotation_final");

    // An open rotation rolls back: successor revoked, the old key's expiry restored.
    let k = create(&e, json!({"name": "k", "owner": "o", "expires_in": "10d"})).await;
    let (k_id, exp0) = (
        k["id"].as_str().unwrap().to_owned(),
        k["expires_at"].clone(),
    );
    let r = call(
        a,
        Method::POST,
        &format!("/v1/api-keys/{k_id}/rotate"),
        w,
        "",
    )
    .await;
    let succ = r.2["id"].as_str().unwrap().to_owned();
    let r = abort(a, &e.t.write, &succ).await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    assert_eq!(r.2["id"], k_id.as_str());
    assert_eq!(r.2["expires_at"], exp0);
    assert!(r.2.get("rotated_to").is_none(), "{:?}", r.2);
    assert_eq!(get_json(a, &e.t.read, &succ).await["state"], "revoked");
    assert_problem(&abort(a, &e.t.write, &succ).await, 400, "invalid_request");
    assert_problem(&abort(a, &e.t.write, "key_nope").await, 404, "not_found");
    let r = call(
        a,
        Method::GET,
        &format!("/v1/api-keys/{k_id}/rotate/abort"),
        w,
        "",
    )
    .await;
    assert_problem(&r, 405, "method_not_allowed");
}

/// Defect 1 through the API: rotating a key that was already rotated is a 409
/// `already_rotated` naming the successor to rotate instead, and changes nothing.
#[tokio::test]
async fn rotating_an_already_rotated_key_is_409_already_rotated() {
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let old = create_id(&e, "r").await;
    let rotate = format!("/v1/api-keys/{old}/rotate");
    let rotate_old = || call(a, Method::POST, &rotate, w, r#"{"grace": "1h"}"#);
    let r = rotate_old().await;
    assert_eq!(r.0, 201, "{:?}", r.2);
    let successor = r.2["id"].as_str().unwrap().to_owned();
    let before = get_json(a, &e.t.read, &old).await;
    let r = rotate_old().await;
    assert_problem(&r, 409, "already_rotated");
    assert!(
        r.2["detail"].as_str().unwrap_or("").contains(&successor),
        "names the successor: {:?}",
        r.2
    );
    let after = get_json(a, &e.t.read, &old).await;
    for field in ["rev", "state", "expires_at", "rotated_to"] {
        assert_eq!(after[field], before[field], "{field} changed: {after}");
    }
    assert_eq!(get_json(a, &e.t.read, &successor).await["state"], "active");
    let rotated: Vec<Value> = audit_lines(&e.dir)
        .into_iter()
        .filter(|l| l["event"] == "key.rotated")
        .collect();
    assert_eq!(rotated.len(), 1, "{rotated:?}");
}

async fn get_json(a: SocketAddr, token: &str, id: &str) -> Value {
    call(
        a,
        Method::GET,
        &format!("/v1/api-keys/{id}"),
        Some(token),
        "",
    )
    .await
    .2
}

async fn abort(a: SocketAddr, token: &str, id: &str) -> (u16, http::HeaderMap, Value) {
    let path = format!("/v1/api-keys/{id}/rotate/abort");
    call(a, Method::POST, &path, Some(token), "").await
}

/// Issue 13 "listings from memory": a walk through every page while another task creates keys
/// (and revokes some) through the API sees every key that existed when it started exactly
/// once, in id order, with no duplicates: cursors stay valid while keys are added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_consistent_under_concurrent_writes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let e = setup(64 * 1024).await;
    let a = e.cp.addr;
    // 300 keys to start with, through the real import path.
    let seed = e.dir.join("seed.txt");
    let text: String = (0..300)
        .map(|i| format!("legacy-page-seed-{i:06}-abcdefgh\n"))
        .collect();
    std::fs::write(&seed, text).unwrap();
    let out = cli(
        &e.cfg,
        &[
            "keys",
            "import",
            "--file",
            seed.to_str().unwrap(),
            "--owner",
            "seed",
        ],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = call(
        a,
        Method::GET,
        "/v1/api-keys?limit=1000",
        Some(&e.t.read),
        "",
    )
    .await;
    assert_eq!(r.0, 200);
    let before = ids(&r.2);
    assert_eq!(before.len(), 300, "the import is visible at once");

    // The writer: creates keys, and revokes every third seed key it passes, until told to stop.
    let created = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (created, stop, token, victims) = (
            created.clone(),
            stop.clone(),
            e.t.write.clone(),
            before.clone(),
        );
        async move {
            let mut new_ids = Vec::new();
            for i in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = json!({"name": format!("during-{i}"), "owner": "writer"}).to_string();
                let r = call(a, Method::POST, "/v1/api-keys", Some(&token), body).await;
                assert_eq!(r.0, 201, "{:?}", r.2);
                new_ids.push(r.2["id"].as_str().unwrap().to_owned());
                if i % 3 == 0 {
                    let path = format!("/v1/api-keys/{}", victims[i * 7 % victims.len()]);
                    let r = call(a, Method::DELETE, &path, Some(&token), "").await;
                    assert_eq!(r.0, 200, "{:?}", r.2);
                }
                created.fetch_add(1, Ordering::Relaxed);
            }
            new_ids
        }
    });

    // The walk: before each page, wait until the writer has made one more key, so writes
    // land between every two pages.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0..500 {
        eventually_named(
            "the writer made another key",
            std::time::Duration::from_secs(60),
            || {
                let created = created.clone();
                async move { (created.load(Ordering::Relaxed) >= page.min(199)).then_some(()) }
            },
        )
        .await;
        let path = match &cursor {
            Some(c) => format!("/v1/api-keys?limit=7&cursor={c}"),
            None => "/v1/api-keys?limit=7".into(),
        };
        let r = call(a, Method::GET, &path, Some(&e.t.read), "").await;
        assert_eq!(r.0, 200, "{:?}", r.2);
        seen.extend(ids(&r.2));
        match r.2["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let new_ids = writer.await.unwrap();
    assert!(
        created.load(Ordering::Relaxed) >= 40,
        "writes happened during the walk"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages come in id order, without duplicates");
    for id in &before {
        assert_eq!(
            seen.iter().filter(|s| *s == id).count(),
            1,
            "{id} existed at the start: listed exactly once"
        );
    }
    // Keys made during the walk are listed at most once (those after the cursor), and each
    // one is listed by a walk that starts after the writer stopped.
    let r = call(
        a,
        Method::GET,
        "/v1/api-keys?limit=1000",
        Some(&e.t.read),
        "",
    )
    .await;
    let after = ids(&r.2);
    for id in &new_ids {
        assert!(after.contains(id), "{id} created during the walk is listed");
    }
    assert_eq!(after.len(), before.len() + new_ids.len());
}

/// `n` labels with keys of exactly `key_len` bytes (numbered from `from`, zero-padded) and
/// values of `value_len` bytes.
fn label_map(from: usize, n: usize, key_len: usize, value_len: usize) -> Value {
    Value::Object(
        (from..from + n)
            .map(|i| (format!("{i:0key_len$}"), Value::from("v".repeat(value_len))))
            .collect(),
    )
}

/// Review 134 defect 1: nothing bounded labels, names or owners, so ~20 PATCHes of 60 KB
/// labels grew one record past the feed's (then 1 MiB) line limit and every feed gateway stopped at
/// the revision before it. Each bound is a 400 naming its field, on create and on PATCH; a
/// PATCH loop stops at the label count; the record stays far below a feed line's limit.
#[tokio::test]
async fn record_fields_are_bounded_and_patches_cannot_grow_a_record() {
    let e = setup(1024 * 1024).await;
    let a = e.cp.addr;
    let w = Some(e.t.write.as_str());
    let scopes: Vec<String> = (0..256).map(|i| format!("{i:0128}")).collect();
    let origins: Vec<String> = (0..64)
        .map(|i| format!("https://{i:0>480}.example.com"))
        .collect();
    let cases: Vec<(&str, Value)> = vec![
        ("labels", json!({"labels": label_map(0, 65, 2, 1)})),
        ("labels", json!({"labels": label_map(0, 1, 64, 1)})),
        ("labels", json!({"labels": label_map(0, 1, 2, 257)})),
        ("labels", json!({"labels": {"": "v"}})),
        ("name", json!({"name": "n".repeat(257)})),
        ("owner", json!({"owner": "o".repeat(257)})),
        (
            "scopes",
            json!({"scopes": (0..257).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
        ),
        (
            "allow_origins",
            json!({"allow_origins": (0..65).map(|i| format!("https://h{i}.example.com")).collect::<Vec<_>>()}),
        ),
        (
            "allow_origins",
            json!({"allow_origins": [format!("https://{}.example.com", "h".repeat(600))]}),
        ),
        (
            "allow_ips",
            json!({"allow_ips": (0..257).map(|i| format!("10.0.{}.{}/32", i / 256, i % 256)).collect::<Vec<_>>()}),
        ),
        // Each field within its own bound, the whole record over its bound.
        (
            "record",
            json!({"labels": label_map(0, 64, 63, 256), "scopes": scopes, "allow_origins": origins}),
        ),
    ];
    let id = create_id(&e, "bounded").await;
    let path = format!("/v1/api-keys/{id}");
    for (field, extra) in &cases {
        let mut body = json!({"name": "n", "owner": "o"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = call(a, Method::POST, "/v1/api-keys", w, body.to_string()).await;
        assert_problem(&r, 400, "invalid_request");
        let detail = r.2["detail"].as_str().unwrap();
        assert!(detail.starts_with(field), "create {field}: {detail}");
        assert!(
            detail.len() < 400,
            "the detail does not echo the value: {detail}"
        );
        if *field == "owner" {
            continue; // immutable on PATCH (immutable_field)
        }
        let r = call(a, Method::PATCH, &path, w, extra.to_string()).await;
        assert_problem(&r, 400, "invalid_request");
        let detail = r.2["detail"].as_str().unwrap();
        assert!(detail.starts_with(field), "PATCH {field}: {detail}");
    }
    let long_reason = json!({"reason": "r".repeat(1025)}).to_string();
    let r = call(a, Method::DELETE, &path, w, long_reason.clone()).await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.2["detail"].as_str().unwrap().starts_with("reason"),
        "{:?}",
        r.2
    );
    let r = call(
        a,
        Method::POST,
        "/v1/api-keys/revoke",
        w,
        json!({"owner": "o", "reason": "r".repeat(1025), "confirm": true}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.2["detail"].as_str().unwrap().starts_with("reason"),
        "{:?}",
        r.2
    );

    // At the bounds: accepted.
    let full = create(
        &e,
        json!({"name": "n".repeat(256), "owner": "o".repeat(256), "labels": label_map(0, 64, 63, 256)}),
    )
    .await;
    assert_eq!(full["labels"].as_object().unwrap().len(), 64);

    // The defect's loop: twenty PATCHes of a 60 KB label, every one refused.
    for i in 0..20 {
        let body = json!({"labels": {format!("big{i}"): "x".repeat(60_000)}});
        let r = call(a, Method::PATCH, &path, w, body.to_string()).await;
        assert_problem(&r, 400, "invalid_request");
    }
    // Labels at the value bound, eight per PATCH: the ninth would make 65.
    for round in 0..8 {
        let body = json!({ "labels": label_map(round * 8, 8, 63, 256) });
        let r = call(a, Method::PATCH, &path, w, body.to_string()).await;
        assert_eq!(r.0, 200, "{:?}", r.2);
    }
    let r = call(
        a,
        Method::PATCH,
        &path,
        w,
        json!({"labels": label_map(64, 1, 63, 256)}).to_string(),
    )
    .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.2["detail"].as_str().unwrap().starts_with("labels"),
        "{:?}",
        r.2
    );
    // Removing one makes room for another.
    let r = call(
        a,
        Method::PATCH,
        &path,
        w,
        json!({"labels": {format!("{:063}", 0): "", format!("{:063}", 64): "v"}}).to_string(),
    )
    .await;
    assert_eq!(r.0, 200, "{:?}", r.2);
    let got = get_json(a, &e.t.read, &id).await;
    assert_eq!(got["labels"].as_object().unwrap().len(), 64);
    let line = std::fs::read_to_string(e.dir.join("keys.jsonl"))
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    assert!(line <= 64 * 1024, "longest store line {line} bytes");
}
