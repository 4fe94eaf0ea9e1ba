//! Observability end to end: the `/metrics` series and label sets after a mixed run, the
//! cardinality bound under random keys/paths/hosts, usage flush across a restart feeding
//! `keys stale`, and a trace-level run over the auth matrix whose every artefact is grepped
//! for key material.
// Test-only crate: helpers outside #[test] fns unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a started gateway may take to report ready.
const READY: Duration = Duration::from_secs(20);

fn config(dir: &Path, upstream: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"
poll_interval_ms = 50
touch_interval_seconds = 1

[policy]
max_ttl = "365d"

[plans.default]
rate = "1000/s"
burst = 1000

[plans.tiny]
rate = "1/h"
burst = 1

[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[metrics]
per_key_series = 3

[[upstreams]]
name = "up"
targets = ["{upstream}"]
connect_timeout_ms = 300

[[upstreams]]
name = "dead"
targets = ["{dead}"]
connect_timeout_ms = 300

[[routes]]
name = "read"
path_prefix = "/invoices"
scopes = ["invoices:read"]
upstream = "up"

[[routes]]
name = "broken"
path_prefix = "/broken"
upstream = "dead"
{extra}
"#,
        dead = Upstream::refused_addr()
    );
    write_file(dir, "keygate.toml", &text)
}

async fn scrape(gw: &Gateway) -> String {
    let (status, _, body) = get(gw.admin, "/metrics", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// Series lines (`name{labels} value`), without comments.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("series {series} missing"))
        .trim()
        .parse()
        .unwrap()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_mixed_run_have_the_documented_series_and_labels() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let cfg = config(dir.path(), &up.addr().to_string(), "");
    let ok_key = create_key(&cfg, &["--scope", "invoices:read", "--expires-in", "3d"]).key;
    let Key {
        id: revoked_id,
        key: revoked_key,
    } = create_key(&cfg, &["--scope", "invoices:read"]);
    let canary_key = create_key(&cfg, &["--canary"]).key;
    let noscope_key = create_key(&cfg, &[]).key;
    let tiny_key = create_key(&cfg, &["--scope", "invoices:read", "--plan", "tiny"]).key;
    let gw = spawn_ready(&cfg, &[], READY).await;
    cli_ok(&cfg, &["keys", "revoke", &revoked_id]);
    let addr = gw.http;
    // Created after start: exercises the propagation histogram.
    let late_key = create_key(&cfg, &["--scope", "invoices:read"]).key;
    eventually(Duration::from_secs(10), || {
        let h = bearer(&late_key);
        async move { (get(addr, "/invoices/1", &[("authorization", &h)]).await.0 == 200).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(10), || {
        let h = bearer(&revoked_key);
        async move { (get(addr, "/invoices/1", &[("authorization", &h)]).await.0 == 401).then_some(()) }
    })
    .await;

    type Case<'a> = (Vec<(&'a str, String)>, &'a str, u16);
    let cases: Vec<Case> = vec![
        (vec![("authorization", bearer(&ok_key))], "/invoices/1", 200),
        (vec![], "/invoices/1", 401),
        (
            vec![("x-api-key", "kg_live_garbage".into())],
            "/invoices/1",
            401,
        ),
        (
            vec![("authorization", bearer(&canary_key))],
            "/invoices/1",
            401,
        ),
        (
            vec![("authorization", bearer(&noscope_key))],
            "/invoices/1",
            403,
        ),
        (vec![("authorization", bearer(&ok_key))], "/nowhere", 404),
        (
            vec![("authorization", bearer(&tiny_key))],
            "/invoices/1",
            200,
        ),
        (
            vec![("authorization", bearer(&tiny_key))],
            "/invoices/1",
            429,
        ),
        (vec![("authorization", bearer(&ok_key))], "/broken/1", 502),
    ];
    for (headers, path, want) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(get(addr, path, &h).await.0, *want, "{path} {headers:?}");
    }
    let text = scrape(&gw).await;
    for s in [
        r#"keygate_requests_total{outcome="ok",route="read"}"#,
        r#"keygate_requests_total{outcome="key_missing",route="read"}"#,
        r#"keygate_requests_total{outcome="key_malformed",route="read"}"#,
        r#"keygate_requests_total{outcome="key_revoked",route="read"}"#,
        r#"keygate_requests_total{outcome="key_canary",route="read"}"#,
        r#"keygate_requests_total{outcome="scope_denied",route="read"}"#,
        r#"keygate_requests_total{outcome="route_not_found",route="none"}"#,
        r#"keygate_requests_total{outcome="rate_limited",route="read"}"#,
        r#"keygate_requests_total{outcome="upstream_unavailable",route="broken"}"#,
        r#"keygate_auth_failures_total{reason="key_revoked"}"#,
        r#"keygate_auth_failures_total{reason="key_canary"}"#,
        r#"keygate_rate_limited_total{plan="tiny"}"#,
        r#"keygate_upstream_errors_total{kind="connect",upstream="dead"}"#,
        r#"keygate_keys{env="live",state="active"}"#,
        r#"keygate_keys{env="live",state="revoked"}"#,
        r#"keygate_keys{env="live",state="canary"}"#,
        r#"keygate_keys_expiring{within="7d"}"#,
        r#"keygate_keys_expiring{within="30d"}"#,
        "keygate_keys_without_expiry",
        "keygate_keys_ttl_over_policy",
        "keygate_keys_stale",
        "keygate_canary_hits_total",
        "keygate_table_revision",
        "keygate_table_sync_age_seconds",
        "keygate_propagation_seconds_count",
        "keygate_requests_in_flight",
        r#"keygate_connections_open{listener="http"}"#,
        r#"keygate_config_reloads_total{result="ok"}"#,
        r#"keygate_source_errors_total{kind="corrupt_line"}"#,
        r#"keygate_usage_reports_total{result="failed"}"#,
        r#"keygate_request_duration_seconds_count{route="read"}"#,
        r#"keygate_upstream_duration_seconds_count{upstream="up"}"#,
        "keygate_tls_handshake_failures_total",
        "keygate_auth_budget_rejections_total",
        "keygate_audit_events_dropped_total",
        r#"keygate_connections_rejected_total{reason="global"}"#,
        r#"keygate_connections_rejected_total{reason="per_ip"}"#,
        "keygate_table_last_sync_timestamp_seconds",
        "keygate_clock_skew_seconds",
        // Governance figures of a single node (src/governance.rs).
        "keygate_governance_keys_ttl_within_policy_ratio",
        "keygate_governance_rotation_success_ratio",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(s)),
            "missing series {s}\n{text}"
        );
    }
    // late key (at least once), ok key, tiny key
    assert!(
        value(
            &text,
            r#"keygate_requests_total{outcome="ok",route="read"}"#
        ) >= 3.0
    );
    assert_eq!(value(&text, "keygate_canary_hits_total"), 1.0);
    assert_eq!(
        value(
            &text,
            &format!(
                r#"keygate_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // The last sync is "now" (the follower marks every poll), the process started before it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last_sync = value(&text, "keygate_table_last_sync_timestamp_seconds");
    assert!(
        (now - 60.0..=now + 1.0).contains(&last_sync),
        "{last_sync} vs {now}"
    );
    let started = value(&text, "process_start_time_seconds");
    assert!(
        started <= last_sync + 1.0 && started > now - 600.0,
        "{started}"
    );
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    assert_eq!(
        value(&text, r#"keygate_keys{env="live",state="revoked"}"#),
        1.0
    );
    assert_eq!(value(&text, r#"keygate_keys_expiring{within="7d"}"#), 1.0);
    assert!(value(&text, "keygate_table_revision") >= 7.0);
    assert!(value(&text, "keygate_propagation_seconds_count") >= 2.0);
    // Per-key series: capped at 3 distinct key ids.
    let per_key = text
        .lines()
        .filter(|l| l.starts_with("keygate_key_requests_total{"))
        .count();
    assert!((1..=4).contains(&per_key), "{per_key}");
    // Label values only from config and closed enums.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        for secret in [
            &ok_key,
            &revoked_key,
            &canary_key,
            &noscope_key,
            &tiny_key,
            &late_key,
        ] {
            assert!(!l.contains(secret.as_str()), "key in metrics: {l}");
        }
        assert!(!l.contains("127.0.0.1"), "client address in metrics: {l}");
        assert!(!l.contains("/invoices/1"), "raw path in metrics: {l}");
    }
    let promtool = require_tool("promtool", "prometheus");
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        stdout_str(&out),
        stderr_str(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_keys_paths_and_hosts_do_not_grow_the_series_count() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let cfg = config(
        dir.path(),
        &up.addr().to_string(),
        "[limits]\nauth_failures_per_minute = 1000000\n",
    );
    let key = create_key(&cfg, &["--scope", "invoices:read"]).key;
    let gw = spawn_ready(&cfg, &[], READY).await;
    let addr = gw.http;
    // Deterministic pseudo-random junk; a mix of well-formed-looking and garbage keys.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut batch = |n: usize| {
        (0..n)
            .map(|_| {
                let a = next();
                let b = next();
                let path = if a % 3 == 0 {
                    format!("/invoices/{b:x}")
                } else {
                    format!("/x{a:x}/{b:x}")
                };
                let host = format!("h{:x}.example", b % 100_000);
                let k = if a % 2 == 0 {
                    format!("kg_live_{a:x}{b:x}")
                } else {
                    format!("junk-{b:x}")
                };
                (path, host, k)
            })
            .collect::<Vec<_>>()
    };
    let send = |reqs: Vec<(String, String, String)>| async move {
        // 8 keep-alive connections in parallel, each sending its share in order.
        let chunks: Vec<Vec<_>> = reqs
            .chunks(reqs.len().div_ceil(8))
            .map(|c| c.to_vec())
            .collect();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                tokio::spawn(async move {
                    let mut conn = KeepAlive::connect(addr).await;
                    for (path, host, k) in chunk {
                        let (status, _, _) =
                            conn.get(&path, &[("host", &host), ("x-api-key", &k)]).await;
                        assert!(status == 401 || status == 404, "{status}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    };
    send(batch(1_000)).await;
    let (status, _, _) = get(addr, "/invoices/1", &[("x-api-key", &key)]).await;
    assert_eq!(status, 200);
    let before = series(&scrape(&gw).await);
    let started = std::time::Instant::now();
    send(batch(100_000)).await;
    eprintln!("100k random requests in {:?}", started.elapsed());
    let text = scrape(&gw).await;
    let after = series(&text);
    let grown: Vec<_> = after.difference(&before).collect();
    assert!(
        grown.is_empty(),
        "new series after 100k random requests: {grown:?}"
    );
    assert!(!text.contains(".example"), "host leaked into metrics");
    assert!(!text.contains("junk-"), "key leaked into metrics");
    assert!(
        value(&text, "keygate_rate_limit_buckets") <= 1.0,
        "buckets for unauthenticated keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_flushed_survives_restart_and_feeds_keys_stale() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let cfg = config(dir.path(), &up.addr().to_string(), "");
    let Key {
        id: used_id,
        key: used_key,
    } = create_key(&cfg, &["--scope", "invoices:read"]);
    let idle_id = create_key(&cfg, &["--scope", "invoices:read"]).id;
    let usage_file = dir.path().join("usage.json");
    let requests_in_file = |path: PathBuf, id: String| {
        move || {
            let (path, id) = (path.clone(), id.clone());
            async move {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                v.get(&id)?.get("requests")?.as_u64()
            }
        }
    };
    let first_total;
    {
        let gw = spawn_ready(&cfg, &[], READY).await;
        for _ in 0..5 {
            assert_eq!(
                get(gw.http, "/invoices/1", &[("x-api-key", &used_key)])
                    .await
                    .0,
                200
            );
        }
        first_total = eventually_named("usage flushed", Duration::from_secs(10), {
            let f = requests_in_file(usage_file.clone(), used_id.clone());
            move || {
                let fut = f();
                async move { fut.await.filter(|n| *n >= 5) }
            }
        })
        .await;
        gw.sigterm();
    }
    // Restart: counts continue from the file.
    let gw = spawn_ready(&cfg, &[], READY).await;
    assert_eq!(
        get(gw.http, "/invoices/1", &[("x-api-key", &used_key)])
            .await
            .0,
        200
    );
    eventually_named("usage continues after restart", Duration::from_secs(10), {
        let f = requests_in_file(usage_file.clone(), used_id.clone());
        move || {
            let fut = f();
            async move { fut.await.filter(|n| *n > first_total) }
        }
    })
    .await;
    let listed: serde_json::Value =
        serde_json::from_str(&cli_ok(&cfg, &["keys", "list", "--json"])).unwrap();
    let used = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == used_id.as_str())
        .unwrap();
    assert!(used["last_used"].as_i64().unwrap() > 0);
    assert!(used["requests"].as_u64().unwrap() > first_total);
    // Stale: the idle key (never used) ages past a 2 s window while the used key keeps being used.
    let addr = gw.http;
    let stale = eventually_named("idle key reported stale", Duration::from_secs(20), || {
        let (cfg, used_key, idle_id) = (cfg.clone(), used_key.clone(), idle_id.clone());
        async move {
            assert_eq!(
                get(addr, "/invoices/1", &[("x-api-key", &used_key)])
                    .await
                    .0,
                200
            );
            let out: serde_json::Value = serde_json::from_str(&cli_ok(
                &cfg,
                &["keys", "stale", "--unused", "2s", "--json"],
            ))
            .unwrap();
            let ids: Vec<String> = out
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned())
                .collect();
            ids.contains(&idle_id).then_some(ids)
        }
    })
    .await;
    assert!(
        !stale.contains(&used_id),
        "a key in use is not stale: {stale:?}"
    );
    let human = cli_ok(&cfg, &["keys", "stale", "--unused", "2s"]);
    assert!(human.contains(&idle_id) && human.contains("LAST USED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_audit_metrics_and_usage_never_contain_key_material() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    // The poll below sends a revoked key until a 1 s key has expired: on a loaded machine that
    // can be more failures than the default budget of 20 a minute, and 429 would never turn
    // into the awaited 401.
    let cfg = config(
        dir.path(),
        &up.addr().to_string(),
        "[limits]\nauth_failures_per_minute = 1000000\n",
    );
    let ok_key = create_key(&cfg, &["--scope", "invoices:read"]).key;
    let Key {
        id: revoked_id,
        key: revoked_key,
    } = create_key(&cfg, &["--scope", "invoices:read"]);
    let canary_key = create_key(&cfg, &["--canary"]).key;
    let expired_key = create_key(&cfg, &["--scope", "invoices:read", "--expires-in", "1s"]).key;
    let noscope_key = create_key(&cfg, &[]).key;
    let Key {
        id: rotated_id,
        key: rotated_old,
    } = create_key(&cfg, &["--scope", "invoices:read"]);
    let gw = spawn_ready(
        &cfg,
        &[("KEYGATE_LOG", "trace"), ("RUST_BACKTRACE", "1")],
        READY,
    )
    .await;
    cli_ok(&cfg, &["keys", "revoke", &revoked_id, "--reason", "test"]);
    let rotated: serde_json::Value =
        serde_json::from_str(&cli_ok(&cfg, &["keys", "rotate", &rotated_id, "--json"])).unwrap();
    let rotated_new = rotated["key"].as_str().unwrap().to_owned();
    let addr = gw.http;
    eventually(Duration::from_secs(10), || {
        let (k1, k2) = (revoked_key.clone(), expired_key.clone());
        async move {
            let a = get(addr, "/invoices/1", &[("x-api-key", &k1)]).await.0;
            let b = get(addr, "/invoices/1", &[("x-api-key", &k2)]).await.0;
            (a == 401 && b == 401).then_some(())
        }
    })
    .await;
    let unknown = "kg_live_0000000000000000000000000000000000000000000000000";
    let all_keys = [
        ok_key.as_str(),
        revoked_key.as_str(),
        canary_key.as_str(),
        expired_key.as_str(),
        noscope_key.as_str(),
        rotated_old.as_str(),
        rotated_new.as_str(),
    ];
    for k in all_keys.iter().chain([&unknown]) {
        for (name, value) in [
            ("x-api-key", k.to_string()),
            ("authorization", format!("Bearer {k}")),
        ] {
            for path in ["/invoices/1", "/invoices/../x", "/nowhere?api_key=x"] {
                let _ = get(addr, path, &[(name, &value)]).await;
            }
        }
        let _ = get(
            addr,
            "/invoices/1",
            &[("x-api-key", k), ("authorization", "Bearer other")],
        )
        .await;
        let _ = h2_get(addr, "/invoices/1", &[("x-api-key", k)]).await;
    }
    let metrics = scrape(&gw).await;
    // Let the usage flush and audit writer catch up, then stop the gateway so logs are complete.
    eventually(Duration::from_secs(10), || {
        let p = dir.path().join("usage.json");
        async move { p.exists().then_some(()) }
    })
    .await;
    gw.sigterm();
    let mut gw = gw;
    gw.wait_exit(Duration::from_secs(20)).await;
    let hasher = keygate::keys::digest::Hasher::new(vec![(1, SECRET.as_bytes().to_vec())]);
    let mut artefacts: Vec<(String, String)> = vec![
        ("stderr".into(), read_lossy(&gw.stderr_log)),
        ("stdout".into(), gw.stdout_lines().join("\n")),
        ("metrics".into(), metrics),
        ("audit".into(), read_lossy(&dir.path().join("audit.jsonl"))),
        ("usage".into(), read_lossy(&dir.path().join("usage.json"))),
    ];
    assert!(
        artefacts[0].1.len() > 10_000,
        "trace logging produced output"
    );
    artefacts.push((
        "upstream".into(),
        format!(
            "{:?}",
            up.records()
                .iter()
                .map(|r| (&r.path_and_query, &r.headers, &r.body))
                .collect::<Vec<_>>()
        ),
    ));
    for (name, text) in &artefacts {
        for k in all_keys {
            assert!(!text.contains(k), "plaintext key in {name}");
            assert!(!text.contains(&k[k.len() - 16..]), "key fragment in {name}");
            let digest = hasher.digest(k).1.to_hex();
            assert!(!text.contains(&digest), "key digest in {name}");
        }
    }
}

/// A fresh scrape, before any request: `keygate_requests_total` holds exactly the outcome ×
/// route pairs the config can produce (a plain route cannot see a token's signature fail or
/// a scope refused, a route with scopes can; `route="none"` only what is decided before
/// routing; a panic, `internal_error`, anywhere), and the limit counters are there at 0 for every configured plan (the shadow
/// counter for the plan in shadow mode only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_scrape_has_only_reachable_series_and_every_plan_at_zero() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    // The file's config (routes `read`, with a scope, and `broken`, plain; plans `default`
    // and `tiny`) plus a token route and a plan in shadow mode. No signing key is held: every
    // token is refused as `token_invalid`, which is all the token route needs here.
    let extra = r#"
[[routes]]
name = "tok"
path_prefix = "/tok"
upstream = "up"
accept_tokens = { audience = "billing" }

[tokens]
jwks_file = "jwks.json"

[plans.trial]
rate = "1/h"
enforce = false
"#;
    write_file(dir.path(), "jwks.json", r#"{"keys":[]}"#);
    let cfg = config(dir.path(), &up.addr().to_string(), extra);
    let gw = spawn_ready(&cfg, &[], READY).await;
    let fresh = scrape(&gw).await;

    let every_route = [
        "ok",
        "key_missing",
        "key_malformed",
        "key_unknown",
        "key_revoked",
        "key_expired",
        "key_not_yet_valid",
        "key_canary",
        "token_not_accepted",
        "key_ambiguous",
        "network_denied",
        "origin_denied",
        "publishable_key_denied",
        "rate_limited",
        "auth_budget_exceeded",
        "bad_request",
        "body_too_large",
        "body_timeout",
        "upstream_unavailable",
        "upstream_timeout",
        "upstream_error",
        "internal_error",
    ];
    let before_routing = [
        "overloaded",
        "table_unavailable",
        "internal_error",
        "bad_request",
        "method_not_allowed",
        "headers_too_large",
        "route_not_found",
    ];
    let mut want = BTreeSet::new();
    for route in ["read", "broken", "tok"] {
        for o in every_route {
            want.insert(format!(
                r#"keygate_requests_total{{outcome="{o}",route="{route}"}}"#
            ));
        }
    }
    want.insert(r#"keygate_requests_total{outcome="scope_denied",route="read"}"#.to_owned());
    for o in ["token_invalid", "token_expired"] {
        want.insert(format!(
            r#"keygate_requests_total{{outcome="{o}",route="tok"}}"#
        ));
    }
    for o in before_routing {
        want.insert(format!(
            r#"keygate_requests_total{{outcome="{o}",route="none"}}"#
        ));
    }
    let got: BTreeSet<String> = series(&fresh)
        .into_iter()
        .filter(|s| s.starts_with("keygate_requests_total{"))
        .collect();
    assert_eq!(
        got,
        want,
        "missing: {:?}\nunexpected: {:?}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>()
    );
    for s in &want {
        assert_eq!(value(&fresh, s), 0.0, "{s}");
    }

    // Every configured plan at 0 before the first refusal; shadow counts only for `trial`.
    let limited: BTreeSet<String> = series(&fresh)
        .into_iter()
        .filter(|s| {
            s.starts_with("keygate_rate_limited_total{")
                || s.starts_with("keygate_rate_limit_shadowed_total{")
        })
        .collect();
    let want_limited: BTreeSet<String> = [
        r#"keygate_rate_limited_total{plan="default"}"#,
        r#"keygate_rate_limited_total{plan="tiny"}"#,
        r#"keygate_rate_limited_total{plan="trial"}"#,
        r#"keygate_rate_limit_shadowed_total{plan="trial"}"#,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(limited, want_limited);
    for s in &want_limited {
        assert_eq!(value(&fresh, s), 0.0, "{s}");
    }

    // The pre-created series are the ones requests land on (the fallback that creates a
    // series on first use is covered by metrics::tests).
    let addr = gw.http;
    assert_eq!(get(addr, "/broken/x", &[]).await.0, 401);
    assert_eq!(
        get(addr, "/tok/x", &[("authorization", "Bearer kgt_a.b.c")])
            .await
            .0,
        401
    );
    let after = scrape(&gw).await;
    assert_eq!(
        value(
            &after,
            r#"keygate_requests_total{outcome="key_missing",route="broken"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            r#"keygate_requests_total{outcome="token_invalid",route="tok"}"#
        ),
        1.0
    );
}
