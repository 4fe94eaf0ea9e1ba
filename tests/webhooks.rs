//! Webhooks end to end: the real gateway binary sends to a real receiving HTTP server in the
//! test (127.0.0.1:0) that verifies every signature. Retries after 500s and a dropped
//! connection, a restart mid-retry (same delivery id), `key.expiring` once per lead time
//! under a controlled clock (`KEYGATE_TEST_CLOCK_FILE`), `key.canary_used` within a second,
//! `keygate webhooks test`, config validation, and no key plaintext anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOOK_VAR: &str = "KEYGATE_WEBHOOK_SECRET";
const HOOK_SECRET: &str = "whsec-0123456789abcdefghijklmnopqrstuvwxyz";
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Close the connection without answering.
    Drop,
}

/// One request the receiver saw.
#[derive(Clone, Debug)]
struct Got {
    id: String,
    event: String,
    body: Value,
    raw: String,
    /// The signature matched HMAC-SHA256(secret, t + "." + body).
    verified: bool,
    answered: Option<u16>,
    at: Instant,
}

/// A webhook receiver: answers from a script, then with `default`.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    default: Arc<Mutex<Answer>>,
}

fn verify(header: &str, body: &[u8]) -> bool {
    let (Some(t), Some(v1)) = (
        header.split(',').find_map(|p| p.strip_prefix("t=")),
        header.split(',').find_map(|p| p.strip_prefix("v1=")),
    ) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
}

impl Receiver {
    async fn start(script: Vec<Answer>, default: Answer) -> Receiver {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: l.local_addr().unwrap(),
            got: Arc::default(),
            script: Arc::new(Mutex::new(script.into())),
            default: Arc::new(Mutex::new(default)),
        };
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(me.clone().serve(s));
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    fn set_default(&self, a: Answer) {
        *self.default.lock().unwrap() = a;
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn of(&self, event: &str) -> Vec<Got> {
        self.got()
            .into_iter()
            .filter(|g| g.event == event)
            .collect()
    }

    async fn serve(self, mut s: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(|v| v.trim().to_owned())
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        // The header's value is case-sensitive hex; take it from the raw head.
        let raw_head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let sig = raw_head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("keygate-signature")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(*self.default.lock().unwrap());
        let answered = match answer {
            Answer::Status(code) => Some(code),
            Answer::Drop => None,
        };
        self.got.lock().unwrap().push(Got {
            id: header("keygate-delivery").unwrap_or_default(),
            event: header("keygate-event").unwrap_or_default(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            raw: String::from_utf8_lossy(&body).into_owned(),
            verified: verify(&sig, &body),
            answered,
            at: Instant::now(),
        });
        if let Some(code) = answered {
            let resp =
                format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    }
}

fn config(dir: &Path, up: SocketAddr, hook: &str) -> PathBuf {
    let routes =
        format!("[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\n\n{hook}");
    write_file(
        dir,
        "keygate.toml",
        &gateway_config(up, 1000, "", "", &routes),
    )
}

fn hook(url: &str, events: &[&str], extra: &str) -> String {
    let events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[[webhooks]]\nurl = \"{url}\"\nevents = [{}]\nsecret_env = \"{HOOK_VAR}\"\nretry_base_ms = 100\n{extra}\n",
        events.join(", ")
    )
}

async fn serve(cfg: &Path, extra_env: &[(&str, &str)]) -> Gateway {
    let mut env = vec![(HOOK_VAR, HOOK_SECRET)];
    env.extend_from_slice(extra_env);
    spawn_ready(cfg, &env, DEADLINE).await
}

async fn metrics(gw: &Gateway) -> String {
    let r = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&r.2).into_owned()
}

fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(-1.0, |v| v.trim().parse().unwrap())
}

fn audit_events(dir: &Path, event: &str) -> Vec<Value> {
    read_lossy(&dir.join("audit.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

/// Every artefact a key could leak into: deliveries, audit, queue, logs.
fn assert_no_plaintext(dir: &Path, rx: &Receiver, gw: &Gateway, key: &str) {
    for g in rx.got() {
        assert!(!g.raw.contains(key), "key in a delivery: {}", g.raw);
        assert!(!g.raw.contains("digest"), "digest in a delivery: {}", g.raw);
    }
    for f in ["audit.jsonl", "keys.jsonl.webhooks", "gateway.stderr.log"] {
        assert!(!read_lossy(&dir.join(f)).contains(key), "key in {f}");
    }
    gw.assert_not_logged(key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_and_retried_after_500s_and_a_dropped_connection() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(
        vec![Answer::Status(500), Answer::Drop, Answer::Status(503)],
        Answer::Status(200),
    )
    .await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.created", "key.revoked"], ""),
    );
    let gw = serve(&cfg, &[]).await;
    let key = create_key(&cfg, &[]);

    let delivered = eventually_named("key.created answered 200", DEADLINE, || async {
        rx.of("key.created")
            .into_iter()
            .find(|g| g.answered == Some(200))
    })
    .await;
    let attempts = rx.of("key.created");
    assert_eq!(
        attempts.len(),
        4,
        "500, dropped, 503, then 200: {attempts:?}"
    );
    for a in &attempts {
        assert!(a.verified, "every attempt is signed: {a:?}");
        assert_eq!(a.id, delivered.id, "one delivery id across retries");
        assert_eq!(a.body, delivered.body, "the same body on every attempt");
    }
    let b = &delivered.body;
    assert_eq!(b["id"], delivered.id.as_str());
    assert_eq!(b["type"], "key.created");
    assert!(b["time"].as_str().unwrap().ends_with('Z'), "{b}");
    assert_eq!(b["key"]["id"], key.id.as_str());
    assert_eq!(b["key"]["state"], "active");
    assert_eq!(b["key"]["owner"], "o");
    assert!(
        b["key"].get("digest").is_none() && b["key"].get("mac").is_none(),
        "{b}"
    );

    cli_ok(&cfg, &["keys", "revoke", &key.id, "--reason", "leaked"]);
    let revoked = eventually_named("key.revoked delivered", DEADLINE, || async {
        rx.of("key.revoked")
            .into_iter()
            .find(|g| g.answered == Some(200))
    })
    .await;
    assert!(revoked.verified);
    assert_eq!(revoked.body["key"]["state"], "revoked", "{}", revoked.body);
    assert_eq!(revoked.body["data"]["reason"], "leaked");

    // Every attempt and its outcome are in the metrics and the audit log.
    let m = eventually_named("delivery metrics", DEADLINE, || async {
        let m = metrics(&gw).await;
        (series(
            &m,
            "keygate_webhook_deliveries_total{event=\"key.revoked\",outcome=\"delivered\"}",
        ) == 1.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        series(
            &m,
            "keygate_webhook_deliveries_total{event=\"key.created\",outcome=\"retried\"}"
        ),
        3.0
    );
    assert_eq!(
        series(
            &m,
            "keygate_webhook_deliveries_total{event=\"key.created\",outcome=\"delivered\"}"
        ),
        1.0
    );
    assert_eq!(
        series(
            &m,
            "keygate_webhook_deliveries_total{event=\"key.created\",outcome=\"failed\"}"
        ),
        0.0
    );
    assert!(
        series(&m, "keygate_webhook_attempt_duration_seconds_count") >= 5.0,
        "{m}"
    );
    let failed = audit_events(dir.path(), "webhook.attempt_failed");
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed
        .iter()
        .all(|e| e["delivery_id"] == delivered.id.as_str()));
    assert!(
        failed
            .iter()
            .any(|e| e["error"].as_str().unwrap().contains("HTTP 500")),
        "{failed:?}"
    );
    assert_eq!(audit_events(dir.path(), "webhook.delivered").len(), 2);
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_retry_budget_runs_out_fails_loudly() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(500)).await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.created"], "retry_for = \"1s\""),
    );
    let gw = serve(&cfg, &[]).await;
    let key = create_key(&cfg, &[]);
    let gave_up = eventually_named("webhook.failed in the audit log", DEADLINE, || async {
        audit_events(dir.path(), "webhook.failed").pop()
    })
    .await;
    assert_eq!(gave_up["type"], "key.created");
    assert!(gave_up["attempts"].as_u64().unwrap() >= 2, "{gave_up}");
    let m = metrics(&gw).await;
    assert_eq!(
        series(
            &m,
            "keygate_webhook_deliveries_total{event=\"key.created\",outcome=\"failed\"}"
        ),
        1.0
    );
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_retry_still_delivers_with_the_same_id() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(500)).await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.created"], ""),
    );
    let gw = serve(&cfg, &[]).await;
    let key = create_key(&cfg, &[]);
    let first = eventually_named("two failed attempts", DEADLINE, || async {
        let g = rx.of("key.created");
        (g.len() >= 2).then(|| g[0].clone())
    })
    .await;
    drop(gw); // SIGKILL mid-retry
    rx.set_default(Answer::Status(200));
    let gw = serve(&cfg, &[]).await;
    let delivered = eventually_named("delivered after the restart", DEADLINE, || async {
        rx.of("key.created")
            .into_iter()
            .find(|g| g.answered == Some(200))
    })
    .await;
    assert!(delivered.verified);
    assert_eq!(delivered.id, first.id, "the restart kept the delivery id");
    assert_eq!(delivered.body, first.body);
    assert!(
        rx.got().iter().all(|g| g.id == first.id),
        "no second delivery was made up"
    );
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

fn set_clock(path: &Path, t: i64) {
    std::fs::write(path, t.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_expiring_fires_once_per_lead_time_with_a_controlled_clock() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.expiring", "key.created"], ""),
    );
    let clock = dir.path().join("clock");
    let clock_env = clock.to_str().unwrap().to_owned();
    let env = [("KEYGATE_TEST_CLOCK_FILE", clock_env.as_str())];
    let key = create_key(&cfg, &["--expires-in", "30d"]);
    let shown = json(
        cli_ok(&cfg, &["keys", "show", &key.id, "--json"])
            .trim()
            .as_bytes(),
    );
    let exp = shown["expires_at"].as_i64().unwrap();
    let day = 86_400;
    set_clock(&clock, exp - 20 * day);
    let mut gw = serve(&cfg, &env).await;
    // A marker: once a key created now is delivered, the sender has run its expiry check
    // (the first loop does both) at the current clock.
    let mut markers = 0;
    let mut marker = || {
        markers += 1;
        let m = create_key(&cfg, &["--label", &format!("marker={markers}")]);
        m.id
    };
    // Deliveries are at least once (a restart between a receipt and its settling resends it
    // with the same id): count notices by delivery id, as a receiver dedupes them.
    let leads = |rx: &Receiver| -> Vec<i64> {
        let mut seen = std::collections::BTreeSet::new();
        rx.of("key.expiring")
            .iter()
            .filter(|g| seen.insert(g.body["id"].to_string()))
            .map(|g| g.body["data"]["lead_seconds"].as_i64().unwrap())
            .collect()
    };
    let await_marker = |id: String| {
        let rx = rx.clone();
        async move {
            eventually_named("marker delivered", DEADLINE, || async {
                rx.of("key.created")
                    .iter()
                    .any(|g| g.body["key"]["id"] == id.as_str())
                    .then_some(())
            })
            .await
        }
    };
    await_marker(marker()).await;
    assert!(leads(&rx).is_empty(), "20 days before expiry nothing fires");

    set_clock(&clock, exp - 14 * day + 60);
    eventually_named("14d notice", DEADLINE, || async {
        (leads(&rx) == [14 * day]).then_some(())
    })
    .await;
    // Restart inside the same window: the notice is not repeated.
    set_clock(&clock, exp - 13 * day);
    drop(gw);
    gw = serve(&cfg, &env).await;
    await_marker(marker()).await;
    assert_eq!(leads(&rx), [14 * day]);

    set_clock(&clock, exp - 7 * day + 60);
    eventually_named("7d notice", DEADLINE, || async {
        (leads(&rx).len() == 2).then_some(())
    })
    .await;
    set_clock(&clock, exp - 3600);
    eventually_named("1d notice", DEADLINE, || async {
        (leads(&rx).len() == 3).then_some(())
    })
    .await;
    await_marker(marker()).await;
    assert_eq!(leads(&rx), [14 * day, 7 * day, day], "once per lead time");
    let got = rx.of("key.expiring");
    for g in &got {
        assert!(g.verified);
        assert_eq!(g.body["key"]["id"], key.id.as_str());
        assert_eq!(g.body["data"]["expires_at"], exp);
    }
    let mut ids: Vec<&str> = got.iter().map(|g| g.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_use_is_delivered_within_a_second() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.canary_used"], ""),
    );
    let canary = create_key(&cfg, &["--canary"]);
    let gw = serve(&cfg, &[]).await;
    let sent = Instant::now();
    let auth = format!("Bearer {}", canary.key);
    let r = get(gw.http, "/x", &[("authorization", auth.as_str())]).await;
    assert_eq!(r.0, 401);
    let g = eventually_named("canary delivery", DEADLINE, || async {
        rx.of("key.canary_used").into_iter().next()
    })
    .await;
    let took = g.at - sent;
    eprintln!("canary request to delivery: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(g.verified);
    assert_eq!(g.body["key"]["id"], canary.id.as_str());
    assert_eq!(g.body["key"]["state"], "canary");
    assert_eq!(g.body["data"]["client_ip"], "127.0.0.1");
    assert_eq!(g.body["data"]["route"], "r");
    assert_no_plaintext(dir.path(), &rx, &gw, &canary.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_test_sends_a_signed_sample() {
    let dir = tempdir();
    let rx = Receiver::start(vec![Answer::Status(500)], Answer::Status(204)).await;
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        "[keys]\nstore = \"keys.jsonl\"\n",
    );
    let env = [SECRET_ENV[0], (HOOK_VAR, HOOK_SECRET)];
    let url = rx.url();
    let args = [
        "webhooks",
        "test",
        url.as_str(),
        "--secret-env",
        HOOK_VAR,
        "--event",
        "key.expiring",
    ];
    let (cfg2, args2) = (cfg.clone(), args.map(str::to_owned));
    let run = move || {
        let a: Vec<&str> = args2.iter().map(String::as_str).collect();
        cli(&cfg2, &a, &env)
    };
    let failed = tokio::task::spawn_blocking(run.clone()).await.unwrap();
    assert!(!failed.status.success(), "a 500 is a failure");
    assert!(
        stderr_str(&failed).contains("HTTP 500"),
        "{}",
        stderr_str(&failed)
    );
    let ok = tokio::task::spawn_blocking(run).await.unwrap();
    assert!(ok.status.success(), "{}", stderr_str(&ok));
    assert!(stdout_str(&ok).contains("HTTP 204"), "{}", stdout_str(&ok));
    let got = rx.got();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|g| g.verified && g.event == "key.expiring"));
    assert_eq!(got[1].body["data"]["sample"], true);
    assert!(!stderr_str(&ok).contains(HOOK_SECRET) && !stdout_str(&ok).contains(HOOK_SECRET));
}

#[test]
fn webhook_config_errors_name_the_field() {
    let dir = tempdir();
    let base = "[keys]\nstore = \"keys.jsonl\"\n\n";
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        (
            "unknown event",
            "https://h.example/x",
            HOOK_SECRET,
            &["`webhooks[0].events`", "key.exploded", "key.expiring"],
        ),
        (
            "plain http off loopback",
            "http://h.example/x",
            HOOK_SECRET,
            &["`webhooks[0].url`", "https://", "loopback"],
        ),
        (
            "short secret",
            "http://127.0.0.1:9/x",
            "too-short",
            &["`webhooks[0].secret_env`", "at least 32"],
        ),
        (
            "https without a CA",
            "https://h.example/x",
            HOOK_SECRET,
            &["`webhooks[0].ca_file`"],
        ),
    ];
    for (what, url, secret, wanted) in cases {
        let events = if what == "unknown event" {
            "\"key.revoked\", \"key.exploded\""
        } else {
            "\"key.revoked\""
        };
        let text = format!("{base}[[webhooks]]\nurl = \"{url}\"\nevents = [{events}]\nsecret_env = \"{HOOK_VAR}\"\n");
        let cfg = write_file(dir.path(), "keygate.toml", &text);
        let out = cli(&cfg, &["check"], &[SECRET_ENV[0], (HOOK_VAR, secret)]);
        let err = stderr_str(&out);
        assert!(!out.status.success(), "{what}: accepted");
        for w in wanted {
            assert!(err.contains(w), "{what}: {w:?} not in {err}");
        }
        assert!(!err.contains(secret), "{what}: secret echoed");
    }
    // A cap of no attempt at all would never deliver; one past the bound is refused too.
    for cap in ["0", "1025"] {
        let text = format!("{base}[[webhooks]]\nurl = \"http://127.0.0.1:9/x\"\nevents = [\"key.revoked\"]\nsecret_env = \"{HOOK_VAR}\"\nmax_in_flight = {cap}\n");
        let cfg = write_file(dir.path(), "keygate.toml", &text);
        let out = cli(&cfg, &["check"], &[SECRET_ENV[0], (HOOK_VAR, HOOK_SECRET)]);
        let err = stderr_str(&out);
        assert!(!out.status.success(), "max_in_flight = {cap}: accepted");
        assert!(err.contains("`webhooks[0].max_in_flight`"), "{err}");
    }
    // A field keygate does not know is refused, named.
    let text = format!("{base}[[webhooks]]\nurl = \"https://h.example/x\"\nevents = [\"key.revoked\"]\nsecret_env = \"{HOOK_VAR}\"\nsecrte = 1\n");
    let cfg = write_file(dir.path(), "keygate.toml", &text);
    let out = cli(&cfg, &["check"], &[SECRET_ENV[0], (HOOK_VAR, HOOK_SECRET)]);
    assert!(stderr_str(&out).contains("secrte"), "{}", stderr_str(&out));
}

/// In a fleet the control plane sends: a feed gateway relays its canary event to it
/// (`POST /v1/events` with the feed token), and the delivery comes from the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_the_control_plane_delivers_what_gateways_relay() {
    let root = tempdir();
    let (cp_dir, gw_dir) = (root.path().join("cp"), root.path().join("gw"));
    std::fs::create_dir_all(&cp_dir).unwrap();
    std::fs::create_dir_all(&gw_dir).unwrap();
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cp_cfg = write_file(
        &cp_dir,
        "keygate.toml",
        &format!(
            "[keys]\nstore = \"keys.jsonl\"\naudit_log = \"audit.jsonl\"\npoll_interval_ms = 50\n\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\nheartbeat_ms = 200\n\n{}",
            hook(&rx.url(), &["key.canary_used", "key.created"], "")
        ),
    );
    let feed = cli_ok(&cp_cfg, &["admin-token", "create", "--role", "feed"])
        .trim()
        .to_owned();
    let cp = ControlPlane::try_spawn_env(&cp_cfg, &[(HOOK_VAR, HOOK_SECRET)])
        .await
        .unwrap();
    let canary = create_key(&cp_cfg, &["--canary"]);
    let created = eventually_named("key.created from the control plane", DEADLINE, || async {
        rx.of("key.created").into_iter().next()
    })
    .await;
    assert_eq!(created.body["key"]["id"], canary.id.as_str());

    let up = Upstream::start(Mode::Echo).await;
    let gw_cfg = write_file(
        &gw_dir,
        "keygate.toml",
        &format!(
            "[keys]\nsource = \"feed\"\nfeed_url = \"http://{}/v1/feed\"\nfeed_token_env = \"KEYGATE_FEED_TOKEN\"\nfeed_cache = \"feed-cache.jsonl\"\naudit_log = \"audit.jsonl\"\nstore = \"keys.jsonl\"\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"up\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\n",
            cp.addr,
            up.addr()
        ),
    );
    let gw = spawn_ready(&gw_cfg, &[("KEYGATE_FEED_TOKEN", feed.as_str())], DEADLINE).await;
    let auth = format!("Bearer {}", canary.key);
    let sent = Instant::now();
    assert_eq!(
        get(gw.http, "/x", &[("authorization", auth.as_str())])
            .await
            .0,
        401
    );
    let g = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(g) = rx.of("key.canary_used").into_iter().next() {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no relayed canary delivery; gateway log:\n{}\ncontrol log:\n{}\ngateway audit:\n{}",
            gw.stderr_contents(),
            read_lossy(&cp_dir.join("control.stderr.log")),
            read_lossy(&gw_dir.join("audit.jsonl"))
        )
    });
    let took = g.at - sent;
    eprintln!("fleet canary request to delivery: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(g.verified);
    assert_eq!(g.body["key"]["id"], canary.id.as_str());
    assert_eq!(g.body["data"]["route"], "r");
    assert!(
        g.body["data"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("gateway:"),
        "{}",
        g.body
    );
    // Relayed once, delivered once; nothing in any artefact carries the key.
    assert_eq!(rx.of("key.canary_used").len(), 1);
    for f in [
        cp_dir.join("audit.jsonl"),
        gw_dir.join("audit.jsonl"),
        cp_dir.join("keys.jsonl.webhooks"),
    ] {
        assert!(
            !read_lossy(&f).contains(&canary.key),
            "key in {}",
            f.display()
        );
    }
    for g in rx.got() {
        assert!(!g.raw.contains(&canary.key));
    }
    gw.assert_not_logged(&canary.key);
}

/// A relayed event the control plane refuses as invalid does not wedge the relay: a canary
/// line an older gateway wrote with a route name over the control plane's 256-byte field limit
/// (before route names had a limit) sits after the relay's cursor; the control plane answers
/// 400 for it. The relay narrows the refused batch down to that event, skips it (counted in
/// `keygate_relayed_events_total{result="dropped"}` and logged), and the canary use that
/// follows is relayed and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_event_the_control_plane_refuses_is_skipped_not_retried_forever() {
    let root = tempdir();
    let (cp_dir, gw_dir) = (root.path().join("cp"), root.path().join("gw"));
    std::fs::create_dir_all(&cp_dir).unwrap();
    std::fs::create_dir_all(&gw_dir).unwrap();
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cp_cfg = write_file(
        &cp_dir,
        "keygate.toml",
        &format!(
            "[keys]\nstore = \"keys.jsonl\"\naudit_log = \"audit.jsonl\"\npoll_interval_ms = 50\n\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\nheartbeat_ms = 200\n\n{}",
            hook(&rx.url(), &["key.canary_used"], "")
        ),
    );
    let feed = cli_ok(&cp_cfg, &["admin-token", "create", "--role", "feed"])
        .trim()
        .to_owned();
    let canary = create_key(&cp_cfg, &["--canary"]);
    let cp = ControlPlane::try_spawn_env(&cp_cfg, &[(HOOK_VAR, HOOK_SECRET)])
        .await
        .unwrap();
    let up = Upstream::start(Mode::Echo).await;
    let gw_cfg = write_file(
        &gw_dir,
        "keygate.toml",
        &format!(
            "[keys]\nsource = \"feed\"\nfeed_url = \"http://{}/v1/feed\"\nfeed_token_env = \"KEYGATE_FEED_TOKEN\"\nfeed_cache = \"feed-cache.jsonl\"\naudit_log = \"audit.jsonl\"\nstore = \"keys.jsonl\"\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"up\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\n",
            cp.addr,
            up.addr()
        ),
    );
    let gw = spawn_ready(&gw_cfg, &[("KEYGATE_FEED_TOKEN", feed.as_str())], DEADLINE).await;
    // The relay's cursor is at the log's end once the gateway serves: the old line goes after.
    let old = serde_json::json!({
        "timestamp": "2026-12-01T00:00:00.000Z",
        "event": "key.canary_used",
        "actor": "gateway",
        "key_id": canary.id,
        "client_ip": "192.0.2.7",
        "route": "r".repeat(300),
    });
    let mut audit = std::fs::OpenOptions::new()
        .append(true)
        .open(gw_dir.join("audit.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut audit, format!("{old}\n").as_bytes()).unwrap();
    drop(audit);
    let auth = format!("Bearer {}", canary.key);
    assert_eq!(
        get(gw.http, "/x", &[("authorization", auth.as_str())])
            .await
            .0,
        401
    );
    let g = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(g) = rx.of("key.canary_used").into_iter().next() {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the canary use after the refused line was never delivered; gateway log:\n{}\ncontrol log:\n{}",
            gw.stderr_contents(),
            read_lossy(&cp_dir.join("control.stderr.log")),
        )
    });
    assert_eq!(g.body["key"]["id"], canary.id.as_str());
    assert_eq!(g.body["data"]["route"], "r");
    assert_eq!(g.body["data"]["client_ip"], "127.0.0.1");
    assert_eq!(
        rx.of("key.canary_used").len(),
        1,
        "the refused event is not delivered"
    );
    let text = metrics(&gw).await;
    assert_eq!(
        series(&text, r#"keygate_relayed_events_total{result="dropped"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        series(&text, r#"keygate_relayed_events_total{result="accepted"}"#),
        1.0,
        "{text}"
    );
    assert!(
        gw.stderr_contents()
            .contains("control plane refused a relayed event as invalid; skipped"),
        "{}",
        gw.stderr_contents()
    );
}

/// `keygate report --json` on a history made with the real CLI: one rotation whose grace ran
/// out, one aborted, one key with a TTL within policy, one without an expiry.
#[test]
fn report_counts_a_constructed_history() {
    let dir = tempdir();
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        "[keys]\nstore = \"keys.jsonl\"\naudit_log = \"audit.jsonl\"\n\n[policy]\nmax_ttl = \"365d\"\n",
    );
    let a = create_key(&cfg, &["--expires-in", "30d"]);
    let b = create_key(&cfg, &["--expires-in", "30d"]);
    let _no_expiry = create_key(&cfg, &[]);
    // a: rotated with no grace, so its old key ends at once (a completed rotation).
    let a2 = json(
        cli_ok(&cfg, &["keys", "rotate", &a.id, "--grace", "0s", "--json"])
            .trim()
            .as_bytes(),
    );
    // b: rotated, then aborted.
    let b2 = json(
        cli_ok(&cfg, &["keys", "rotate", &b.id, "--grace", "1d", "--json"])
            .trim()
            .as_bytes(),
    );
    cli_ok(
        &cfg,
        &["keys", "rotate", "--abort", b2["id"].as_str().unwrap()],
    );

    let rep = json(cli_ok(&cfg, &["report", "--json"]).trim().as_bytes());
    assert_eq!(rep["rotations"]["completed"], 1, "{rep}");
    assert_eq!(rep["rotations"]["aborted"], 1, "{rep}");
    assert_eq!(rep["rotations"]["open"], 0, "{rep}");
    assert_eq!(rep["rotations"]["success_rate"], 0.5, "{rep}");
    assert!(
        rep["rotations"]["median_seconds_to_rotate"]
            .as_f64()
            .unwrap()
            < 5.0,
        "{rep}"
    );
    // Active: a's successor, b and the key without expiry; the first two expire in policy.
    assert!(a2["id"].is_string());
    assert_eq!(rep["ttl"]["active"], 3, "{rep}");
    assert_eq!(rep["ttl"]["within_policy"], 2, "{rep}");
    assert_eq!(rep["stale"]["found"], 0);
    assert_eq!(rep["canary"]["alarmed"], 0);
    let text = cli_ok(&cfg, &["report"]);
    assert!(text.contains("success 50.0%"), "{text}");
    assert!(
        text.contains("2 of 3 active keys within policy (66.7%)"),
        "{text}"
    );
}

/// Two control planes on one Redis store both see a key cross a lead time; the `SET NX` mark
/// in Redis lets one of them announce it: one `key.expiring` fleet-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_sharing_redis_announce_a_lead_time_once() {
    let redis = common::redis::RedisServer::start();
    let root = tempdir();
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let clock = root.path().join("clock");
    let clock_env = clock.to_str().unwrap().to_owned();
    let dirs: Vec<PathBuf> = (0..2).map(|i| root.path().join(format!("cp{i}"))).collect();
    let cfgs: Vec<PathBuf> = dirs
        .iter()
        .map(|d| {
            std::fs::create_dir_all(d).unwrap();
            write_file(
                d,
                "keygate.toml",
                &format!(
                    "[keys]\nsource = \"redis\"\nstore = \"unused-keys.jsonl\"\naudit_log = \"audit.jsonl\"\n\n[redis]\nurl = \"{}\"\n\n[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"admin-tokens.jsonl\"\nheartbeat_ms = 200\n\n{}",
                    redis.url(),
                    hook(&rx.url(), &["key.expiring"], "")
                ),
            )
        })
        .collect();
    let key = create_key(&cfgs[0], &["--expires-in", "30d"]);
    let shown = json(
        cli_ok(&cfgs[0], &["keys", "show", &key.id, "--json"])
            .trim()
            .as_bytes(),
    );
    let exp = shown["expires_at"].as_i64().unwrap();
    set_clock(&clock, exp - 20 * 86_400);
    let env = [
        (HOOK_VAR, HOOK_SECRET),
        ("KEYGATE_TEST_CLOCK_FILE", clock_env.as_str()),
    ];
    let _cp0 = ControlPlane::try_spawn_env(&cfgs[0], &env).await.unwrap();
    let _cp1 = ControlPlane::try_spawn_env(&cfgs[1], &env).await.unwrap();
    set_clock(&clock, exp - 14 * 86_400 + 60);
    // Both have decided once the mark is in both queues (the loser records it too).
    let mark = format!("expiring:{}:{exp}:{}", key.id, 14 * 86_400);
    eventually_named("both control planes decided", DEADLINE, || async {
        dirs.iter()
            .all(|d| read_lossy(&d.join("unused-keys.jsonl.webhooks")).contains(&mark))
            .then_some(())
    })
    .await;
    // The mark and any delivery are written together: exactly one queue holds the notice.
    let queued: Vec<bool> = dirs
        .iter()
        .map(|d| {
            read_lossy(&d.join("unused-keys.jsonl.webhooks")).contains("\"type\":\"key.expiring\"")
        })
        .collect();
    assert_eq!(queued.iter().filter(|q| **q).count(), 1, "{queued:?}");
    eventually_named("the notice", DEADLINE, || async {
        (!rx.of("key.expiring").is_empty()).then_some(())
    })
    .await;
    let got = rx.of("key.expiring");
    assert_eq!(got.len(), 1, "one notice fleet-wide: {got:?}");
    assert!(got[0].verified);
    assert_eq!(got[0].body["key"]["id"], key.id.as_str());
}

/// A key out of its calendar quota is announced once per quota window, not per refusal
/// (needs `redis-server`: quotas live in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_announced_once_per_window() {
    let redis = common::redis::RedisServer::start();
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let tail = format!(
        "{}\n[redis]\nurl = \"{}\"\n",
        hook(&rx.url(), &["key.quota_exceeded", "key.canary_used"], ""),
        redis.url()
    );
    let cfg = config(dir.path(), up.addr(), &tail);
    let key = create_key(&cfg, &["--quota", "2/hour"]);
    let canary = create_key(&cfg, &["--canary"]);
    let gw = serve(&cfg, &[]).await;
    let auth = format!("Bearer {}", key.key);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            get(gw.http, "/x", &[("authorization", auth.as_str())])
                .await
                .0,
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    // The canary's event is audited after any the refusals caused: once it is delivered,
    // everything before it has been read.
    let c = format!("Bearer {}", canary.key);
    assert_eq!(
        get(gw.http, "/x", &[("authorization", c.as_str())]).await.0,
        401
    );
    eventually_named("canary marker", DEADLINE, || async {
        (!rx.of("key.canary_used").is_empty()).then_some(())
    })
    .await;
    let got = rx.of("key.quota_exceeded");
    assert_eq!(got.len(), 1, "one per window: {got:?}");
    assert!(got[0].verified);
    assert_eq!(got[0].body["key"]["id"], key.id.as_str());
    assert_eq!(got[0].body["data"]["limit"], 2);
    assert_eq!(got[0].body["data"]["window_secs"], 3600);
    assert_eq!(audit_events(dir.path(), "key.quota_exceeded").len(), 1);
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

/// An unused key past `keys.stale_after` (controlled clock) is announced once, also across
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_stale_is_announced_once() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cfg = config(
        dir.path(),
        up.addr(),
        &hook(&rx.url(), &["key.stale", "key.created"], ""),
    );
    let clock = dir.path().join("clock");
    let clock_env = clock.to_str().unwrap().to_owned();
    let env = [("KEYGATE_TEST_CLOCK_FILE", clock_env.as_str())];
    let key = create_key(&cfg, &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    set_clock(&clock, now + 91 * 86_400);
    let stale_of = |rx: &Receiver| -> Vec<Got> {
        rx.of("key.stale")
            .into_iter()
            .filter(|g| g.body["key"]["id"] == key.id.as_str())
            .collect()
    };
    let gw = serve(&cfg, &env).await;
    let g = eventually_named("key.stale", DEADLINE, || async {
        stale_of(&rx).into_iter().next()
    })
    .await;
    assert!(g.verified);
    assert_eq!(g.body["data"]["stale_after_seconds"], 90 * 86_400);
    assert_eq!(g.body["data"]["last_used"], Value::Null);
    drop(gw);
    let gw = serve(&cfg, &env).await;
    // Delivered after the restart: the first loop, stale scan included, has run.
    let marker = create_key(&cfg, &["--label", "marker=1"]);
    eventually_named("marker", DEADLINE, || async {
        rx.of("key.created")
            .iter()
            .any(|g| g.body["key"]["id"] == marker.id.as_str())
            .then_some(())
    })
    .await;
    assert_eq!(stale_of(&rx).len(), 1, "not repeated after the restart");
    assert_no_plaintext(dir.path(), &rx, &gw, &key.key);
}

/// A rotation that completes by itself (`--complete-when-idle`) is announced with the old
/// key's record, revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_completing_by_itself_is_announced() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let rx = Receiver::start(vec![], Answer::Status(200)).await;
    let cfg = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            1000,
            "",
            "",
            &format!(
                "[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"up\"\n\n{}",
                hook(&rx.url(), &["key.rotation_completed"], "")
            ),
        )
        .replace(
            "poll_interval_ms = 50",
            "poll_interval_ms = 50\nrotation_check_seconds = 1",
        ),
    );
    let old = create_key(&cfg, &[]);
    let gw = serve(&cfg, &[]).await;
    let new = json(
        cli_ok(
            &cfg,
            &[
                "keys",
                "rotate",
                &old.id,
                "--grace",
                "1d",
                "--complete-when-idle",
                "1s",
                "--json",
            ],
        )
        .trim()
        .as_bytes(),
    );
    let new_key = new["key"].as_str().unwrap().to_owned();
    let auth = format!("Bearer {new_key}");
    eventually_named("successor served", DEADLINE, || async {
        (get(gw.http, "/x", &[("authorization", auth.as_str())])
            .await
            .0
            == 200)
            .then_some(())
    })
    .await;
    let g = eventually_named("key.rotation_completed", DEADLINE, || async {
        rx.of("key.rotation_completed").into_iter().next()
    })
    .await;
    assert!(g.verified);
    assert_eq!(g.body["key"]["id"], old.id.as_str());
    assert_eq!(g.body["key"]["state"], "revoked", "{}", g.body);
    assert_eq!(g.body["data"]["successor_id"], new["id"]);
    assert_no_plaintext(dir.path(), &rx, &gw, &old.key);
    assert_no_plaintext(dir.path(), &rx, &gw, &new_key);
}
