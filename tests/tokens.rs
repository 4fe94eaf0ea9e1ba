//! Short-lived tokens end to end, real processes on loopback: `keygate control` mints
//! (`POST /v1/tokens`) and publishes its public keys (`/v1/jwks`), `keygate serve` verifies.
//!
//! - exchange, use on an opted-in route (the upstream sees the parent key's id, never the
//!   token), refusal on other routes and audiences, scope subset, ttl bound, forgeries
//!   (tampered claims, alg=none, a wrong key under the real kid, an unknown kid);
//! - expiry (a short ttl, polled until refused);
//! - revoking the parent key refuses its tokens as fast as the key itself (both measured on
//!   open connections);
//! - signing-key rotation: in-flight tokens stay valid, new ones carry the new kid, the
//!   gateway picks it up, a JWKS file works for a gateway without a control plane URL;
//! - fleet: a feed gateway verifies with the JWKS of the control plane it follows;
//! - no token and no key in logs, audit or upstream requests (grep).
//!
//! Debug logging is on for every process so the grep covers what an operator could enable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(30);
/// Bound on a revocation reaching the gateway (file poll 50 ms; generous under load).
const ENFORCE_BOUND: Duration = Duration::from_secs(5);
const DEBUG_LOG: (&str, &str) = ("KEYGATE_LOG", "debug");

fn cp_config() -> String {
    r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
poll_interval_ms = 50

[control]
listen = "127.0.0.1:0"
heartbeat_ms = 200

[tokens]
max_ttl = "15m"
default_ttl = "5m"

# Tests poll the exchange with keys the control plane may not have read yet: each such try is
# a failed authentication (`the_exchange_has_a_failed_auth_budget` tests the budget itself).
[limits]
auth_failures_per_minute = 100000
"#
    .to_owned()
}

/// Routes: `/invoices` (scope invoices:read) and `/payments` (invoices:write) accept tokens
/// for audience "billing"; `/reports` accepts "reports"; `/plain` accepts no tokens.
fn routes() -> &'static str {
    r#"
[[routes]]
name = "invoices"
path_prefix = "/invoices"
scopes = ["invoices:read"]
upstream = "up"
accept_tokens = { audience = "billing" }

[[routes]]
name = "payments"
path_prefix = "/payments"
scopes = ["invoices:write"]
upstream = "up"
accept_tokens = { audience = "billing" }

[[routes]]
name = "reports"
path_prefix = "/reports"
upstream = "up"
accept_tokens = { audience = "reports" }

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "up"
"#
}

/// A control plane and a gateway sharing one store directory (the gateway follows the store
/// file and fetches the JWKS from the control plane's URL).
struct Node {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    cp_cfg: PathBuf,
    cp: ControlPlane,
    gw: Gateway,
    up: Upstream,
}

impl Node {
    async fn start() -> Node {
        let dir = tempdir();
        let path = dir.path().to_path_buf();
        let cp_cfg = write_file(&path, "control.toml", &cp_config());
        let kid = cli_ok(&cp_cfg, &["tokens", "keygen"]);
        assert!(!kid.trim().is_empty());
        let cp = ControlPlane::spawn(&cp_cfg).await;
        let up = Upstream::start(Mode::Echo).await;
        let tail = format!(
            "[tokens]\njwks_url = \"http://{}/v1/jwks\"\njwks_refresh = \"60s\"\n\n[limits]\nauth_failures_per_minute = 100000\n{}",
            cp.addr,
            routes()
        );
        let gw_cfg = write_file(
            &path,
            "gateway.toml",
            &gateway_config(up.addr(), 100_000, "", "", &tail),
        );
        let gw = spawn_ready(&gw_cfg, &[DEBUG_LOG], READY).await;
        Node {
            _dir: dir,
            dir: path,
            cp_cfg,
            cp,
            gw,
            up,
        }
    }

    fn key(&self, scopes: &[&str]) -> Key {
        let mut args = Vec::new();
        for s in scopes {
            args.extend(["--scope", s]);
        }
        create_key(&self.cp_cfg, &args)
    }

    async fn exchange(&self, key: &str, body: Value) -> (u16, Value) {
        exchange(self.cp.addr, key, body).await
    }

    /// Mint a token the test expects to be issued.
    async fn token(&self, key: &str, body: Value) -> String {
        let (s, v) = self.exchange(key, body).await;
        assert_eq!(s, 201, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    /// Waits until the key (created after both started) authenticates at the gateway and at
    /// the control plane (each follows the store on its own; an empty audience is refused
    /// with 400 after the key is authenticated, and mints nothing).
    async fn until_known(&self, key: &str) {
        until_status(self.gw.http, "/plain/x", key, 200).await;
        until_mintable(self.cp.addr, key).await;
    }
}

async fn exchange(cp: SocketAddr, key: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let (s, h, b) = post(
        cp,
        "/v1/tokens",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await;
    if s >= 400 {
        assert_eq!(
            h.get("content-type").unwrap(),
            "application/problem+json",
            "every error is problem+json"
        );
    }
    (s, json(&b))
}

async fn until_mintable(cp: SocketAddr, key: &str) {
    eventually_named("key known to the control plane", READY, || async move {
        (exchange(cp, key, json!({"audience": ""})).await.0 == 400).then_some(())
    })
    .await;
}

async fn call(addr: SocketAddr, path: &str, credential: &str) -> (u16, Value) {
    let auth = format!("Bearer {credential}");
    let (s, _, b) = get(addr, path, &[("authorization", &auth)]).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

async fn until_status(addr: SocketAddr, path: &str, credential: &str, want: u16) {
    let credential = credential.to_owned();
    let path = path.to_owned();
    eventually_named(&format!("{want} on {path}"), READY, || {
        let (c, p) = (credential.clone(), path.clone());
        async move { (call(addr, &p, &c).await.0 == want).then_some(()) }
    })
    .await;
}

async fn metrics(gw: &Gateway) -> String {
    let (s, _, b) = get(gw.admin, "/metrics", &[]).await;
    assert_eq!(s, 200);
    String::from_utf8_lossy(&b).into_owned()
}

fn outcome_count(text: &str, outcome: &str, route: &str) -> f64 {
    let series = format!(r#"keygate_requests_total{{outcome="{outcome}",route="{route}"}}"#);
    text.lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l[series.len()..].trim().parse().ok())
        .unwrap_or(0.0)
}

/// The JWS header of a token, decoded.
fn header_of(token: &str) -> Value {
    let jws = token.strip_prefix("kgt_").unwrap();
    let h = jws.split('.').next().unwrap();
    serde_json::from_slice(&keygate::tokens::jwt::b64url_decode(h).unwrap()).unwrap()
}

fn claims_of(token: &str) -> Value {
    let c = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&keygate::tokens::jwt::b64url_decode(c).unwrap()).unwrap()
}

/// Every file a process wrote next to `dir` (logs, audit, caches): none may contain `secret`.
fn assert_in_no_file(dir: &Path, secret: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            let text = read_lossy(&p);
            assert!(!text.contains(secret), "secret found in {}", p.display());
        }
    }
}

/// Every file a process wrote next to `dir` (logs, audit, caches), and the upstream's
/// records: none may contain `secret`.
fn assert_nowhere(dir: &Path, up: &Upstream, secret: &str) {
    assert_in_no_file(dir, secret);
    for r in up.records() {
        let all = format!("{} {:?} {}", r.path_and_query, r.headers, r.body_str());
        assert!(!all.contains(secret), "secret reached the upstream: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_use_refusals_and_forgeries() {
    let n = Node::start().await;
    let key = n.key(&["invoices:read", "invoices:write"]);
    n.until_known(&key.key).await;

    // Exchange: a token for "billing" with only invoices:read.
    let t0 = crate::now();
    let (s, v) = n
        .exchange(
            &key.key,
            json!({"audience": "billing", "scopes": ["invoices:read"], "ttl": "5m"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kgt_"), "{token}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["key_id"], key.id.as_str());
    assert_eq!(v["scopes"], json!(["invoices:read"]));
    let exp = v["expires_at"].as_i64().unwrap();
    assert!(
        (t0 + 299..=t0 + 302).contains(&exp),
        "exp {exp} vs now {t0}"
    );
    assert_eq!(header_of(&token)["alg"], "EdDSA");
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], key.id.as_str());
    assert_eq!(claims["aud"], "billing");
    assert!(claims["jti"].as_str().unwrap().starts_with("tok_"));
    assert!(claims["lineage"].is_string());

    // Used on an opted-in route: the upstream sees the parent key's identity and the token's
    // scopes, never the token.
    let (s, echo) = call(n.gw.http, "/invoices/1", &token).await;
    assert_eq!(s, 200, "{echo}");
    let seen = n.up.last().unwrap();
    assert_eq!(
        seen.header("x-keygate-key-id").as_deref(),
        Some(key.id.as_str())
    );
    assert_eq!(
        seen.header("x-keygate-scopes").as_deref(),
        Some("invoices:read")
    );
    assert!(seen.header("authorization").is_none());
    // Also from the key header, like a key.
    let (s, _, _) = get(n.gw.http, "/invoices/2", &[("x-api-key", &token)]).await;
    assert_eq!(s, 200);

    // The token holds only invoices:read: the parent's invoices:write does not carry over.
    assert_eq!(call(n.gw.http, "/payments/1", &token).await.0, 403);
    // Routes that do not accept tokens, or not for this audience: the same 401 as a bad key.
    let (s_plain, plain) = call(n.gw.http, "/plain/1", &token).await;
    let (s_aud, aud) = call(n.gw.http, "/reports/1", &token).await;
    let (s_bad, bad) = call(n.gw.http, "/plain/1", "kg_live_notakey").await;
    assert_eq!((s_plain, s_aud, s_bad), (401, 401, 401));
    for v in [&plain, &aud] {
        assert_eq!(v["code"], bad["code"], "{v} vs {bad}");
        assert_eq!(v["title"], bad["title"]);
    }
    // The key itself still works where tokens are not accepted.
    assert_eq!(call(n.gw.http, "/plain/1", &key.key).await.0, 200);

    // Exchange rules: scopes ⊆ the key's, ttl ≤ max_ttl, an audience, a key (not a token).
    let (s, v) = n
        .exchange(
            &key.key,
            json!({"audience": "billing", "scopes": ["admin"]}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("scope_denied")), "{v}");
    let (s, v) = n
        .exchange(&key.key, json!({"audience": "billing", "ttl": "16m"}))
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    let (s, v) = n.exchange(&key.key, json!({"ttl": "1m"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = n
        .exchange(&key.key, json!({"audience": "billing", "extra": 1}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = n.exchange(&token, json!({"audience": "billing"})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    let (s, _) = n
        .exchange("kg_live_notakey", json!({"audience": "billing"}))
        .await;
    assert_eq!(s, 401);
    // No scopes asked: all of the key's; that token passes /payments.
    let all = n.token(&key.key, json!({"audience": "billing"})).await;
    assert_eq!(
        claims_of(&all)["scopes"],
        json!(["invoices:read", "invoices:write"])
    );
    assert_eq!(call(n.gw.http, "/payments/1", &all).await.0, 200);

    // Forgeries.
    use keygate::tokens::jwt::{b64url_encode, sign, Claims};
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let jws = token.strip_prefix("kgt_").unwrap();
    let parts: Vec<&str> = jws.split('.').collect();
    let mut wider: Value = claims_of(&token);
    wider["scopes"] = json!(["invoices:read", "invoices:write"]);
    let tampered = format!(
        "kgt_{}.{}.{}",
        parts[0],
        b64url_encode(wider.to_string().as_bytes()),
        parts[2]
    );
    let none_header = b64url_encode(br#"{"alg":"none","typ":"JWT","kid":"x"}"#);
    let alg_none = format!("kgt_{none_header}.{}.", parts[1]);
    let real_kid = header_of(&token)["kid"].as_str().unwrap().to_owned();
    let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let rogue = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let forged_claims: Claims = serde_json::from_value(claims_of(&token)).unwrap();
    let wrong_key = sign(&forged_claims, &real_kid, &rogue);
    let rogue_kid = keygate::tokens::signing::thumbprint(rogue.public_key().as_ref());
    let unknown_kid = sign(&forged_claims, &rogue_kid, &rogue);
    let truncated = token[..token.len() - 4].to_owned();
    for (what, t) in [
        ("tampered claims", &tampered),
        ("alg=none", &alg_none),
        ("wrong key under the real kid", &wrong_key),
        ("unknown kid", &unknown_kid),
        ("truncated signature", &truncated),
    ] {
        let (s, v) = call(n.gw.http, "/invoices/1", t).await;
        assert_eq!(s, 401, "{what}: {v}");
        assert_eq!(v["code"], "invalid_api_key", "{what}");
    }
    let text = metrics(&n.gw).await;
    assert!(
        outcome_count(&text, "token_invalid", "invoices") >= 5.0,
        "{text}"
    );
    assert!(outcome_count(&text, "token_not_accepted", "plain") >= 1.0);
    assert!(outcome_count(&text, "token_not_accepted", "reports") >= 1.0);
    assert!(outcome_count(&text, "ok", "invoices") >= 2.0);

    // Audit names the parent key for each mint; nothing anywhere holds a token or the key.
    let audit = read_lossy(&n.dir.join("audit.jsonl"));
    let issued: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "token.issued")
        .collect();
    assert_eq!(issued.len(), 2, "{audit}");
    assert!(issued.iter().all(|e| e["key_id"] == key.id.as_str()));
    // The access log names the parent key for a request made with its token.
    let log = n.gw.stderr_contents();
    assert!(
        log.lines().any(|l| l.contains("keygate::access")
            && l.contains(key.id.as_str())
            && l.contains("invoices")
            && l.contains("200")),
        "no access line naming the parent key:\n{log}"
    );
    for secret in [&key.key, &token, &all] {
        assert_nowhere(&n.dir, &n.up, secret);
        n.gw.assert_not_logged(secret);
    }
    // Signatures alone would also betray a token: grep the signature part too.
    assert_nowhere(&n.dir, &n.up, parts[2]);
}

/// Revokes `key` (via `revoke`), then polls the key and `token` alternately, each on its own
/// open connection to `gw`, until both are refused; returns when each first got 401.
async fn revocation_race(
    gw: SocketAddr,
    key: &str,
    token: &str,
    revoke: impl FnOnce(),
) -> (Duration, Duration) {
    let mut key_conn = KeepAlive::connect(gw).await;
    let mut tok_conn = KeepAlive::connect(gw).await;
    let (key_auth, tok_auth) = (format!("Bearer {key}"), format!("Bearer {token}"));
    assert_eq!(
        key_conn
            .get("/invoices/1", &[("authorization", &key_auth)])
            .await
            .0,
        200
    );
    assert_eq!(
        tok_conn
            .get("/invoices/1", &[("authorization", &tok_auth)])
            .await
            .0,
        200
    );
    revoke();
    let t0 = Instant::now();
    let (mut key_at, mut tok_at) = (None, None);
    while key_at.is_none() || tok_at.is_none() {
        assert!(
            t0.elapsed() < ENFORCE_BOUND,
            "revocation not enforced: key {key_at:?}, token {tok_at:?}"
        );
        if key_at.is_none()
            && key_conn
                .get("/invoices/1", &[("authorization", &key_auth)])
                .await
                .0
                == 401
        {
            key_at = Some(t0.elapsed());
        }
        if tok_at.is_none()
            && tok_conn
                .get("/invoices/1", &[("authorization", &tok_auth)])
                .await
                .0
                == 401
        {
            tok_at = Some(t0.elapsed());
        }
    }
    (key_at.unwrap(), tok_at.unwrap())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_die_with_their_parent_key() {
    let n = Node::start().await;
    let key = n.key(&["invoices:read"]);
    n.until_known(&key.key).await;

    // Expiry: a 2 s token works, then is refused (polled, not slept).
    let short = n
        .token(&key.key, json!({"audience": "billing", "ttl": "2s"}))
        .await;
    assert_eq!(call(n.gw.http, "/invoices/1", &short).await.0, 200);
    let started = Instant::now();
    until_status(n.gw.http, "/invoices/1", &short, 401).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = metrics(&n.gw).await;
    assert!(
        outcome_count(&text, "token_expired", "invoices") >= 1.0,
        "{text}"
    );

    // Revocation: the key and its token, each on an open connection, polled alternately.
    let token = n.token(&key.key, json!({"audience": "billing"})).await;
    let (key_at, tok_at) = revocation_race(n.gw.http, &key.key, &token, || {
        cli_ok(
            &n.cp_cfg,
            &["keys", "revoke", &key.id, "--reason", "leaked"],
        );
    })
    .await;
    eprintln!(
        "revocation -> 401: key {:.1} ms, its token {:.1} ms",
        key_at.as_secs_f64() * 1000.0,
        tok_at.as_secs_f64() * 1000.0
    );
    // Same table, same swap: the token is refused no later than one poll round after the key.
    assert!(
        tok_at <= key_at + Duration::from_millis(500),
        "token refused {tok_at:?} after revocation, key {key_at:?}"
    );
    let text = metrics(&n.gw).await;
    assert!(
        outcome_count(&text, "key_revoked", "invoices") >= 2.0,
        "{text}"
    );
    // A revoked key cannot mint either.
    let (s, _) = n.exchange(&key.key, json!({"audience": "billing"})).await;
    assert_eq!(s, 401);
    for secret in [&key.key, &token, &short] {
        assert_nowhere(&n.dir, &n.up, secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_key_rotation_keeps_in_flight_tokens_and_publishes_the_new_kid() {
    let n = Node::start().await;
    let key = n.key(&["invoices:read"]);
    n.until_known(&key.key).await;
    let old = n.token(&key.key, json!({"audience": "billing"})).await;
    let old_kid = header_of(&old)["kid"].as_str().unwrap().to_owned();
    assert_eq!(call(n.gw.http, "/invoices/1", &old).await.0, 200);

    let new_kid = cli_ok(&n.cp_cfg, &["tokens", "rotate"]).trim().to_owned();
    assert_ne!(new_kid, old_kid);
    let new = n.token(&key.key, json!({"audience": "billing"})).await;
    assert_eq!(header_of(&new)["kid"], new_kid.as_str());
    // The gateway has never seen new_kid: an unknown kid refreshes its keys on the spot.
    let (s, v) = call(n.gw.http, "/invoices/1", &new).await;
    assert_eq!(s, 200, "new kid picked up on first use: {v}");
    assert_eq!(
        call(n.gw.http, "/invoices/1", &old).await.0,
        200,
        "in-flight token"
    );

    // Both kids are published, current first, public halves only.
    let (s, _, b) = get(n.cp.addr, "/v1/jwks", &[]).await;
    assert_eq!(s, 200);
    let jwks = json(&b);
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec![new_kid.as_str(), old_kid.as_str()]);
    for k in jwks["keys"].as_array().unwrap() {
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
        assert!(k.get("d").is_none(), "no private key in the JWKS");
    }
    let listed = json(cli_ok(&n.cp_cfg, &["tokens", "list", "--json"]).as_bytes());
    assert_eq!(listed.as_array().unwrap().len(), 2);

    // A gateway without a control plane URL verifies with a JWKS file (`tokens jwks`).
    let gw2_dir = n.dir.join("gw2");
    std::fs::create_dir(&gw2_dir).unwrap();
    std::fs::copy(n.dir.join("keys.jsonl"), gw2_dir.join("keys.jsonl")).unwrap();
    write_file(
        &gw2_dir,
        "jwks.json",
        &cli_ok(&n.cp_cfg, &["tokens", "jwks"]),
    );
    let tail = format!("[tokens]\njwks_file = \"jwks.json\"\n{}", routes());
    let gw2_cfg = write_file(
        &gw2_dir,
        "keygate.toml",
        &gateway_config(n.up.addr(), 100_000, "", "", &tail),
    );
    let gw2 = spawn_ready(&gw2_cfg, &[DEBUG_LOG], READY).await;
    until_status(gw2.http, "/invoices/1", &new, 200).await;
    assert_eq!(call(gw2.http, "/invoices/1", &old).await.0, 200);
    for secret in [&key.key, &old, &new] {
        assert_nowhere(&n.dir, &n.up, secret);
        assert_nowhere(&gw2_dir, &n.up, secret);
    }
    // The private keys never leave their file.
    let private = read_lossy(&n.dir.join("token-signing-keys.json"));
    let pkcs8: Value = serde_json::from_str(&private).unwrap();
    for k in pkcs8["keys"].as_array().unwrap() {
        let d = k["pkcs8"].as_str().unwrap();
        assert!(!read_lossy(&n.dir.join("control.stderr.log")).contains(d));
        assert!(!read_lossy(&n.dir.join("audit.jsonl")).contains(d));
        assert!(!n.gw.stderr_contents().contains(d));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_gateway_verifies_with_its_control_planes_jwks() {
    let dir = tempdir();
    let root = dir.path().to_path_buf();
    let cp_dir = root.join("cp");
    let gw_dir = root.join("gw");
    std::fs::create_dir_all(&cp_dir).unwrap();
    std::fs::create_dir_all(&gw_dir).unwrap();
    let cp_cfg = write_file(&cp_dir, "keygate.toml", &cp_config());
    cli_ok(&cp_cfg, &["tokens", "keygen"]);
    let feed = cli_ok(&cp_cfg, &["admin-token", "create", "--role", "feed"])
        .trim()
        .to_owned();
    let cp = ControlPlane::spawn(&cp_cfg).await;
    let up = Upstream::start(Mode::Echo).await;
    let gw_text = format!(
        r#"[keys]
source = "feed"
feed_url = "http://{cp}/v1/feed"
feed_cache = "feed-cache.jsonl"
usage_file = "usage.json"
audit_log = "audit.jsonl"

[limits]
auth_failures_per_minute = 100000

[server]
listen = "127.0.0.1:0"
shutdown_delay_ms = 0

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["{up}"]
{routes}"#,
        cp = cp.addr,
        up = up.addr(),
        routes = routes()
    );
    let gw_cfg = write_file(&gw_dir, "keygate.toml", &gw_text);
    let gw = spawn_ready(&gw_cfg, &[("KEYGATE_FEED_TOKEN", &feed), DEBUG_LOG], READY).await;

    let key = create_key(&cp_cfg, &["--scope", "invoices:read"]);
    until_status(gw.http, "/plain/1", &key.key, 200).await;
    until_mintable(cp.addr, &key.key).await;
    let (s, v) = exchange(cp.addr, &key.key, json!({"audience": "billing"})).await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert_eq!(call(gw.http, "/invoices/1", &token).await.0, 200);
    assert_eq!(
        up.last().unwrap().header("x-keygate-key-id").as_deref(),
        Some(key.id.as_str())
    );

    // Revoked at the control plane: the feed brings it, the gateway refuses the key and its
    // token from its table.
    let (key_at, tok_at) = revocation_race(gw.http, &key.key, &token, || {
        cli_ok(&cp_cfg, &["keys", "revoke", &key.id, "--reason", "leaked"]);
    })
    .await;
    eprintln!(
        "fleet: revocation -> 401 at the feed gateway: key {:.1} ms, its token {:.1} ms",
        key_at.as_secs_f64() * 1000.0,
        tok_at.as_secs_f64() * 1000.0
    );
    assert!(tok_at <= key_at + Duration::from_millis(500));
    for secret in [&key.key, &token] {
        assert_nowhere(&cp_dir, &up, secret);
        assert_nowhere(&gw_dir, &up, secret);
        gw.assert_not_logged(secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_share_their_keys_rate_limit() {
    let n = Node::start().await;
    // One request an hour (a bucket of one): whoever spends it, key or token, the other waits.
    let key = create_key(&n.cp_cfg, &["--scope", "invoices:read", "--rate", "1/h"]);
    until_mintable(n.cp.addr, &key.key).await;
    let token = n.token(&key.key, json!({"audience": "billing"})).await;
    let second = n.token(&key.key, json!({"audience": "billing"})).await;
    // The first answer that is not 401 (the gateway has the key) spends the bucket.
    let first = eventually_named("gateway knows the key", READY, || {
        let t = token.clone();
        let addr = n.gw.http;
        async move {
            let s = call(addr, "/invoices/1", &t).await.0;
            (s != 401).then_some(s)
        }
    })
    .await;
    assert_eq!(first, 200);
    let (s, h, _) = get(
        n.gw.http,
        "/invoices/1",
        &[("authorization", &format!("Bearer {}", key.key))],
    )
    .await;
    assert_eq!(s, 429, "the key pays for its token's request");
    assert_eq!(h.get("ratelimit-remaining").unwrap(), "0");
    assert_eq!(call(n.gw.http, "/invoices/1", &second).await.0, 429);
    // Another key's tokens are not affected.
    let other = n.key(&["invoices:read"]);
    n.until_known(&other.key).await;
    let t = n.token(&other.key, json!({"audience": "billing"})).await;
    assert_eq!(call(n.gw.http, "/invoices/1", &t).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_configured_to_issue_mints_and_verifies_alone() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let tail = format!(
        "[tokens]\nissue = true\nmax_ttl = \"10m\"\n\n[limits]\nauth_failures_per_minute = 100000\n{}",
        routes()
    );
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(up.addr(), 100_000, "", "", &tail),
    );
    // Without its signing keys a gateway configured to issue does not start.
    let err = Gateway::try_spawn(&cfg, SECRET_ENV).await.err().unwrap();
    assert!(err.contains("tokens.signing_keys"), "{err}");
    cli_ok(&cfg, &["tokens", "keygen"]);
    let key = create_key(&cfg, &["--scope", "invoices:read"]);
    let gw = spawn_ready(&cfg, &[DEBUG_LOG], READY).await;
    until_status(gw.http, "/plain/1", &key.key, 200).await;

    let (s, v) = exchange(
        gw.http,
        &key.key,
        json!({"audience": "billing", "ttl": "5m"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert_eq!(call(gw.http, "/invoices/1", &token).await.0, 200);
    assert_eq!(call(gw.http, "/plain/1", &token).await.0, 401);
    let (s, v) = exchange(
        gw.http,
        &key.key,
        json!({"audience": "billing", "ttl": "11m"}),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    let (s, v) = exchange(
        gw.http,
        &key.key,
        json!({"audience": "billing", "scopes": ["x:y"]}),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("scope_denied")), "{v}");
    let (s, v) = exchange(gw.http, &token, json!({"audience": "billing"})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    let (s, h, _) = get(gw.http, "/v1/tokens", &[]).await;
    assert_eq!(
        (s, h.get("allow").unwrap().to_str().unwrap()),
        (405, "POST")
    );

    // Rotation on the node itself: the new kid is read from its own key file on first use.
    let new_kid = cli_ok(&cfg, &["tokens", "rotate"]).trim().to_owned();
    let (s, v) = exchange(gw.http, &key.key, json!({"audience": "billing"})).await;
    assert_eq!(s, 201, "{v}");
    let newer = v["token"].as_str().unwrap().to_owned();
    assert_eq!(header_of(&newer)["kid"], new_kid.as_str());
    assert_eq!(call(gw.http, "/invoices/1", &newer).await.0, 200);
    assert_eq!(call(gw.http, "/invoices/1", &token).await.0, 200);

    cli_ok(&cfg, &["keys", "revoke", &key.id, "--reason", "leaked"]);
    until_status(gw.http, "/invoices/1", &token, 401).await;
    assert_eq!(call(gw.http, "/invoices/1", &newer).await.0, 401);
    let (s, _) = exchange(gw.http, &key.key, json!({"audience": "billing"})).await;
    assert_eq!(s, 401);

    // The audit writer is asynchronous on a gateway: poll for both mints.
    let audit_path = dir.path().join("audit.jsonl");
    eventually_named("two token.issued lines", READY, || {
        let p = audit_path.clone();
        async move { (read_lossy(&p).matches("\"token.issued\"").count() == 2).then_some(()) }
    })
    .await;
    for secret in [&key.key, &token, &newer] {
        assert_nowhere(dir.path(), &up, secret);
        gw.assert_not_logged(secret);
    }
}

/// THREATS K3 beside the request path: an exchange on a gateway that issues panics once its
/// key is authenticated (feature `test-panic`, `src/fault.rs`). It is answered 500
/// problem+json `internal_error` (before, hyper closed the connection unanswered) and counted
/// in `keygate_requests_total{route="none"}`, which the KeygateInternalError alert watches;
/// the gateway goes on minting, and neither the panic's report nor any artefact holds the key.
#[cfg(feature = "test-panic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_exchange_that_panics_is_answered_500_and_counted() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let tail = format!("[tokens]\nissue = true\n\n{}", routes());
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(up.addr(), 100_000, "", "", &tail),
    );
    cli_ok(&cfg, &["tokens", "keygen"]);
    let key = create_key(&cfg, &["--scope", "invoices:read"]);
    let gw = spawn_ready(&cfg, &[DEBUG_LOG], READY).await;
    until_status(gw.http, "/plain/1", &key.key, 200).await;
    assert_eq!(
        outcome_count(&metrics(&gw).await, "internal_error", "none"),
        0.0
    );

    let auth = format!("Bearer {}", key.key);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("x-keygate-test-panic", "1"),
    ];
    let body = json!({"audience": "billing"}).to_string();
    let (s, h, b) = post(gw.http, "/v1/tokens", &headers, body).await;
    let v = json(&b);
    assert_eq!(
        (s, v["code"].as_str()),
        (500, Some("internal_error")),
        "{v}"
    );
    assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
    assert_eq!(
        outcome_count(&metrics(&gw).await, "internal_error", "none"),
        1.0
    );

    let (s, v) = exchange(gw.http, &key.key, json!({"audience": "billing"})).await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert_eq!(call(gw.http, "/invoices/1", &token).await.0, 200);
    eventually_named("the panic's report on stderr", READY, || async {
        gw.stderr_contents()
            .contains("test-panic: a request asked for a panic")
            .then_some(())
    })
    .await;
    for secret in [&key.key, &token] {
        assert_nowhere(dir.path(), &up, secret);
        gw.assert_not_logged(secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_does_not_issue_has_no_exchange() {
    let n = Node::start().await;
    let key = n.key(&["invoices:read"]);
    n.until_known(&key.key).await;
    // /v1/tokens is not special on a gateway without `issue`: no route matches it.
    let (s, v) = exchange(n.gw.http, &key.key, json!({"audience": "billing"})).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("route_not_found")),
        "{v}"
    );
}

/// `POST /v1/tokens` on the control plane keeps a failed-auth budget per client, as a gateway
/// does: after `auth_failures_per_minute` refused keys, the client is answered 429
/// `too_many_auth_failures` with `Retry-After` before any key is checked, a good key included.
#[tokio::test]
async fn the_exchange_has_a_failed_auth_budget() {
    let dir = tempdir();
    let cfg = cp_config().replace(
        "auth_failures_per_minute = 100000",
        "auth_failures_per_minute = 3\nauth_failure_block_seconds = 60",
    );
    let cp_cfg = write_file(dir.path(), "control.toml", &cfg);
    cli_ok(&cp_cfg, &["tokens", "keygen"]);
    // Created before the control plane starts, so it is known from the first request.
    let key = create_key(&cp_cfg, &["--scope", "invoices:read"]);
    let cp = ControlPlane::spawn(&cp_cfg).await;
    let body = json!({"audience": "billing"});
    assert_eq!(exchange(cp.addr, &key.key, body.clone()).await.0, 201);
    let wrong = format!("{}x", key.key);
    for _ in 0..3 {
        let (s, v) = exchange(cp.addr, &wrong, body.clone()).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("invalid_api_key")),
            "{v}"
        );
    }
    let auth = format!("Bearer {}", key.key);
    let (s, h, b) = post(
        cp.addr,
        "/v1/tokens",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["code"], "too_many_auth_failures");
    let wait: u64 = h
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
}

/// The `key.canary_used` audit records naming `id` in `dir/audit.jsonl`, polled until there is
/// one (a gateway's audit writer is asynchronous).
async fn canary_alarms(dir: &Path, id: &str) -> Vec<Value> {
    let path = dir.join("audit.jsonl");
    eventually_named("a key.canary_used audit record", READY, || {
        let p = path.clone();
        async move {
            let alarms: Vec<Value> = read_lossy(&p)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| e["event"] == "key.canary_used" && e["key_id"] == id)
                .collect();
            (!alarms.is_empty()).then_some(alarms)
        }
    })
    .await
}

/// `keygate_canary_hits_total` as scraped from `addr` (a gateway's admin listener or a control
/// plane's API listener).
async fn canary_hits(addr: SocketAddr) -> f64 {
    let (s, _, b) = get(addr, "/metrics", &[]).await;
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&b).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("keygate_canary_hits_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no keygate_canary_hits_total in:\n{text}"))
}

/// A canary key presented to the control plane's `POST /v1/tokens` is refused with the same
/// 401 as an unknown key and raises the alarm a canary raises everywhere: a `key.canary_used`
/// audit record (the webhook sender's source) naming the route and the caller, and
/// `keygate_canary_hits_total` (which the KeygateCanaryKeyUsed alert watches). The key itself
/// is in no file.
#[tokio::test]
async fn a_canary_presented_to_the_control_planes_exchange_raises_the_alarm() {
    let dir = tempdir();
    let cp_cfg = write_file(dir.path(), "control.toml", &cp_config());
    cli_ok(&cp_cfg, &["tokens", "keygen"]);
    // Created before the control plane starts, so it is known from the first request.
    let canary = create_key(&cp_cfg, &["--canary"]);
    let cp = match ControlPlane::try_spawn_env(&cp_cfg, &[DEBUG_LOG]).await {
        Ok(cp) => cp,
        Err(e) => panic!("control plane did not start:\n{e}"),
    };
    let (_, _, before) = get(cp.addr, "/metrics", &[]).await;
    let body = json!({"audience": "billing"});
    let (s, v) = exchange(cp.addr, &canary.key, body.clone()).await;
    let (_, unknown) = exchange(cp.addr, "kg_live_notakey", body).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v, unknown, "a canary is refused as an unknown key is");

    let alarms = canary_alarms(dir.path(), &canary.id).await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let a = &alarms[0];
    assert_eq!(a["actor"], "control-plane", "{a}");
    assert_eq!(a["route"], "token_exchange", "{a}");
    assert_eq!(a["client_ip"], "127.0.0.1", "{a}");
    // Exported from the start, so the alert's `increase()` sees the first use.
    let before = String::from_utf8_lossy(&before).into_owned();
    assert!(
        before.lines().any(|l| l == "keygate_canary_hits_total 0"),
        "{before}"
    );
    assert_eq!(canary_hits(cp.addr).await, 1.0);
    assert_in_no_file(dir.path(), &canary.key);
}

/// The same on a gateway that issues tokens itself (`[tokens] issue = true`): 401, a
/// `key.canary_used` audit record with the route and the caller, `keygate_canary_hits_total`,
/// and the key in no file and no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_presented_to_an_issuing_gateways_exchange_raises_the_alarm() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let tail = format!("[tokens]\nissue = true\n\n{}", routes());
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(up.addr(), 100_000, "", "", &tail),
    );
    cli_ok(&cfg, &["tokens", "keygen"]);
    let canary = create_key(&cfg, &["--canary"]);
    let gw = spawn_ready(&cfg, &[DEBUG_LOG], READY).await;
    assert_eq!(canary_hits(gw.admin).await, 0.0);
    let body = json!({"audience": "billing"});
    let (s, v) = exchange(gw.http, &canary.key, body.clone()).await;
    let (_, unknown) = exchange(gw.http, "kg_live_notakey", body).await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v, unknown, "a canary is refused as an unknown key is");

    let alarms = canary_alarms(dir.path(), &canary.id).await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let a = &alarms[0];
    assert_eq!(a["actor"], "gateway", "{a}");
    assert_eq!(a["route"], "token_exchange", "{a}");
    assert_eq!(a["client_ip"], "127.0.0.1", "{a}");
    assert_eq!(canary_hits(gw.admin).await, 1.0);
    assert_nowhere(dir.path(), &up, &canary.key);
    gw.assert_not_logged(&canary.key);
}
