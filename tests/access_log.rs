//! The `[access_log]` file sink on the real binary: one JSON line per request, written off the
//! request path, and rotation by `mv` then `SIGUSR1` (what logrotate does without
//! `copytruncate`): the moved file keeps every line written before the signal, the new file
//! gets every line after it, and no line is lost, duplicated or split. Access lines on standard
//! error (`KEYGATE_LOG=…,keygate::access=info`) are written off the request path as well:
//! whole, and every one of them by the end of a graceful shutdown. Hostile request values (CR,
//! LF, quotes, backslashes, obs-text) leave every line in both one JSON object (THREATS J3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const POLL: Duration = Duration::from_secs(20);

/// Every line of the file, each parsed as one JSON object (a split line fails here).
fn lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a partial last line in {}",
        path.display()
    );
    text.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l:?}"))
        })
        .collect()
}

fn request_ids(lines: &[serde_json::Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `n` requests with request ids `{tag}-0..n`, half with the key (200) and half without (401).
async fn burst(gw: &Gateway, key: &str, tag: &str, n: usize) -> BTreeSet<String> {
    let auth = format!("Bearer {key}");
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let mut headers = vec![("x-request-id", id.as_str())];
        if i % 2 == 0 {
            headers.push(("authorization", auth.as_str()));
        }
        let (status, _, _) = get(gw.http, "/orders/42?secret=no", &headers).await;
        assert_eq!(status, if i % 2 == 0 { 200 } else { 401 });
        ids.insert(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_file_is_reopened_on_sigusr1_without_losing_or_splitting_a_line() {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            1000,
            "",
            "",
            "[access_log]\npath = \"access.log\"\n\n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"up\"\n",
        ),
    );
    let key = create_key(&config, &[]);
    let mut gw = spawn_ready(&config, &[], POLL).await;

    let before = burst(&gw, &key.key, "a", 40).await;
    eventually_named("40 lines in access.log", POLL, || async {
        (lines(&log).len() == 40).then_some(())
    })
    .await;
    let first = lines(&log);
    assert_eq!(request_ids(&first), before);
    let l = first.iter().find(|l| l["status"] == 200).unwrap();
    assert_eq!(l["route"], "orders", "the route's name, never the raw path");
    assert_eq!(l["key_id"], key.id.as_str());
    assert!(l["upstream_us"].is_u64() && l["latency_us"].is_u64() && l["timestamp"].is_string());
    assert_eq!(l["trace_id"].as_str().unwrap().len(), 32);

    // Rotate: lines written between the mv and the reopen still land in the moved file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let between = burst(&gw, &key.key, "b", 10).await;
    gw.sigusr1();
    eventually_named("access.log reopened", POLL, || async {
        log.exists().then_some(())
    })
    .await;
    let after = burst(&gw, &key.key, "c", 30).await;
    eventually_named("30 lines in the new access.log", POLL, || async {
        (lines(&log).len() == 30).then_some(())
    })
    .await;

    // The reopen happened after the last "b" line was queued or before: either way each line
    // is in exactly one file, whole.
    let old = request_ids(&lines(&rotated));
    let new = request_ids(&lines(&log));
    assert!(old.is_disjoint(&new));
    assert!(
        before.is_subset(&old),
        "pre-rotation lines stay in the moved file"
    );
    assert_eq!(new.len() + old.len(), 80, "no line lost or duplicated");
    assert!(
        after.is_subset(&new),
        "post-reopen lines go to the new file"
    );
    let all: BTreeSet<String> = old.union(&new).cloned().collect();
    let sent: BTreeSet<String> = before
        .iter()
        .chain(&between)
        .chain(&after)
        .cloned()
        .collect();
    assert_eq!(all, sent);

    // A second rotation works the same way; SIGTERM flushes what is queued.
    std::fs::rename(&log, dir.path().join("access.log.2")).unwrap();
    gw.sigusr1();
    eventually_named("access.log reopened again", POLL, || async {
        log.exists().then_some(())
    })
    .await;
    let last = burst(&gw, &key.key, "d", 5).await;
    gw.sigterm();
    assert!(gw.wait_exit(POLL).await.success());
    assert_eq!(request_ids(&lines(&log)), last);

    // Never a key, never the query string.
    for f in ["access.log", "access.log.1", "access.log.2"] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(!text.contains(&key.key), "key in {f}");
        assert!(!text.contains("secret=no"), "raw path in {f}");
    }
    gw.assert_not_logged(&key.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_in_a_missing_directory_stops_serve_naming_the_file() {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            10,
            "",
            "",
            "[access_log]\npath = \"no/such/dir/access.log\"\n",
        ),
    );
    let Err(err) = Gateway::try_spawn(&config, SECRET_ENV).await else {
        panic!("serve started with an access log it cannot open");
    };
    assert!(
        err.contains("access log") && err.contains("no/such/dir/access.log"),
        "{err}"
    );
}

/// Requests from several connections at once, then SIGTERM straight away: the lines still
/// gathering in the standard-error writer are written before the process exits, each whole,
/// one per request, none with the key; in JSON (one object per line) and in the plain text
/// format (both are written without the subscriber; `access::Line::stderr_line`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_on_stderr_are_whole_and_all_written_by_shutdown() {
    let json = stderr_after_burst("json").await;
    let mut ids = BTreeSet::new();
    for line in json.lines().filter(|l| l.contains("\"keygate::access\"")) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON line ({e}): {line:?}"));
        if v["message"] == "request" {
            assert_eq!(v["route"], "orders");
            assert!(ids.insert(v["request_id"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(
        ids.len(),
        BURST,
        "one line per request, none lost at shutdown"
    );

    let plain = stderr_after_burst("human").await;
    let mut ids = BTreeSet::new();
    for line in plain
        .lines()
        .filter(|l| l.contains(" keygate::access: request "))
    {
        assert!(
            line.contains(" route=\"orders\" status=200 ") && line.contains(" latency_us="),
            "not one whole line: {line:?}"
        );
        let id = line
            .split_once(" request_id=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .unwrap_or_else(|| panic!("no request id: {line:?}"))
            .0;
        assert!(ids.insert(id.to_owned()), "{id} twice");
    }
    assert_eq!(
        ids.len(),
        BURST,
        "one plain line per request, none lost at shutdown"
    );
}

/// Concurrent clients in `stderr_after_burst`.
const CLIENTS: usize = 6;
/// Requests `stderr_after_burst` makes: 50 from each client.
const BURST: usize = CLIENTS * 50;

/// The gateway's standard error in `format`, with access lines on, after `BURST` requests
/// from `CLIENTS` concurrent clients and a SIGTERM at once; checked for the key.
async fn stderr_after_burst(format: &str) -> String {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            1000,
            "",
            "",
            "[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"up\"\n",
        ),
    );
    let key = create_key(&config, &[]);
    let mut gw = spawn_ready_args(
        &config,
        &["--log-format", format],
        &[
            ("KEYGATE_LOG", "info,keygate::access=info"),
            ("NO_COLOR", "1"),
        ],
        POLL,
    )
    .await;
    let addr = gw.http;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let auth = format!("Bearer {}", key.key);
            tokio::spawn(async move {
                for i in 0..BURST / CLIENTS {
                    let id = format!("s{c}-{i}");
                    let status = get(
                        addr,
                        "/orders/1",
                        &[("x-request-id", &id), ("authorization", &auth)],
                    )
                    .await
                    .0;
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    gw.sigterm();
    assert!(gw.wait_exit(POLL).await.success());
    gw.assert_not_logged(&key.key);
    gw.stderr_contents()
}

/// Every string a JSON value holds (object values and array items, nested).
fn strings(v: &serde_json::Value) -> Vec<&str> {
    match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().flat_map(strings).collect(),
        serde_json::Value::Object(o) => o.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// J3, log injection: requests whose path (percent-encoded CR/LF and quotes, raw quote,
/// backslash, braces and non-ASCII bytes), query, User-Agent (`"`, `\`, tab, obs-text),
/// X-Request-Id (`"`, `\`), key header and forged key-id header, Host, traceparent and method
/// carry what would break a line or forge a field. Both the `[access_log]` file and standard
/// error (`--log-format json`) are read whole after a graceful stop: every line parses as one
/// JSON object, no value holds a control character (CR, LF, tab...), the file has exactly one
/// line per request the gateway answered (by the request id each response carried, a hostile
/// one replaced), with the allow-listed fields only, and nothing the client sent as a hostile
/// value (nor the key) appears in either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_values_leave_every_access_line_one_json_object() {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            1000,
            "",
            "",
            "[limits]\nauth_failures_per_minute = 100000\n\n[access_log]\npath = \"access.log\"\n\n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"up\"\n",
        ),
    );
    let key = create_key(&config, &[]);
    let mut gw = spawn_ready_args(
        &config,
        &["--log-format", "json"],
        &[
            ("KEYGATE_LOG", "info,keygate::access=info"),
            ("NO_COLOR", "1"),
        ],
        POLL,
    )
    .await;

    // Request lines and header lines by the status they get. Each request also carries
    // `Host: a`, a clean `X-Request-Id: j3-<n>` unless it brings its own, and the valid key
    // unless it is refused 401.
    let cases: [(u16, &[&[u8]]); 3] = [
        (
            200,
            &[
                b"GET /orders/%22forged%22 HTTP/1.1\r\n",
                b"GET /orders/1?q=%0d%0a%22forged%22%5c&r={} HTTP/1.1\r\n",
                b"GET /orders/ua HTTP/1.1\r\nUser-Agent: forged\"ua\\\t\x80\xfe\xff\r\n",
                b"GET /orders/rid HTTP/1.1\r\nX-Request-Id: forged\"rid\\\r\n",
                b"GET /orders/rid HTTP/1.1\r\nX-Request-Id: forged\trid\r\n",
                b"GET /orders/rid HTTP/1.1\r\nX-Request-Id: forged\x80\xff\r\n",
                b"GET /orders/id HTTP/1.1\r\nX-Keygate-Key-Id: forged\"\\\r\n",
                b"GET /orders/tp HTTP/1.1\r\ntraceparent: 00-forged\"\\-x\r\n",
            ],
        ),
        (
            400,
            &[
                b"GET /orders/x%0d%0a%22forged%22:1 HTTP/1.1\r\n",
                b"GET /orders/%0aforged HTTP/1.1\r\n",
                b"GET /orders/\"forged\\{} HTTP/1.1\r\n",
                b"GET /orders/\xc3\xa9 HTTP/1.1\r\n",
                b"GET /orders/host HTTP/1.1\r\nHost: forged\"\\\r\n",
                // A valid token but not a method in uppercase (THREATS D7): refused, and
                // still written as one JSON object.
                b"M|^~'*! /orders/m HTTP/1.1\r\n",
            ],
        ),
        (
            401,
            &[
                b"GET /orders/key HTTP/1.1\r\nX-API-Key: key_forged\"\\\t\xff\r\n",
                b"GET /orders/key HTTP/1.1\r\nAuthorization: Bearer forged\"\\{}\r\n",
            ],
        ),
    ];
    let mut answered = BTreeSet::new();
    let all = cases
        .iter()
        .flat_map(|(want, heads)| heads.iter().map(move |h| (*want, *h)));
    for (i, (want, head)) in all.enumerate() {
        let name = String::from_utf8_lossy(head);
        let mut req = head.to_vec();
        if find(head, b"\nHost:").is_none() {
            req.extend_from_slice(b"Host: a\r\n");
        }
        if find(head, b"\nX-Request-Id:").is_none() {
            req.extend_from_slice(format!("X-Request-Id: j3-{i}\r\n").as_bytes());
        }
        if want != 401 {
            req.extend_from_slice(format!("X-API-Key: {}\r\n", key.key).as_bytes());
        }
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        let out = raw_exchange(gw.http, &req, Duration::from_secs(5)).await;
        assert_eq!(out.statuses(), [want], "{name:?}: {}", out.text());
        let id = out.responses()[0]
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{name:?}: not answered by the gateway: {}", out.text()));
        assert!(!id.contains("forged"), "{name:?}: {id}");
        assert!(answered.insert(id), "{name:?}: a request id twice");
    }

    eventually_named("one file line per request", POLL, || async {
        (std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            >= answered.len())
        .then_some(())
    })
    .await;
    gw.sigterm();
    assert!(gw.wait_exit(POLL).await.success());

    let file = std::fs::read_to_string(&log).unwrap();
    let stderr = gw.stderr_contents();
    let fields = "bytes_in bytes_out client_ip host key_id latency_us method outcome request_id \
                  route status timestamp trace_id upstream_us";
    let fields: Vec<&str> = fields.split_whitespace().collect();
    for (what, text) in [("access.log", &file), ("stderr", &stderr)] {
        assert!(!text.contains('\r'), "a raw CR in {what}");
        let mut ids = BTreeSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: not one JSON line ({e}): {line:?}"));
            assert!(v.is_object(), "{what}: {line}");
            for s in strings(&v) {
                assert!(
                    !s.chars().any(char::is_control),
                    "{what}: control character in {s:?}"
                );
            }
            let access = if what == "access.log" {
                let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
                assert_eq!(keys, fields, "{line}");
                true
            } else {
                v["target"] == "keygate::access"
            };
            if access {
                // Refused before routing (400), the line names no route; only a forwarded
                // request names the key.
                let route = if v["status"] == 400 { "none" } else { "orders" };
                let key_id = if v["status"] == 200 { &key.id } else { "-" };
                assert_eq!(
                    (&v["route"], &v["key_id"]),
                    (&route.into(), &key_id.into()),
                    "{line}"
                );
                let id = v["request_id"].as_str().unwrap().to_owned();
                assert!(ids.insert(id), "{what}: two lines for one request: {line}");
            }
        }
        assert_eq!(ids, answered, "{what}: exactly one access line per request");
        for needle in ["forged", key.key.as_str()] {
            assert!(!text.contains(needle), "{needle:?} in {what}:\n{text}");
        }
    }
    gw.assert_not_logged(&key.key);
}
