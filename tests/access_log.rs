//! The `[access_log]` file sink on the real binary: one JSON line per request, written off the
//! request path, and rotation by `mv` then `SIGUSR1` (what logrotate does without
//! `copytruncate`): the moved file keeps every line written before the signal, the new file
//! gets every line after it, and no line is lost, duplicated or split. Access lines on standard
//! error (`KEYGATE_LOG=…,keygate::access=info`) are written off the request path as well:
//! whole, and every one of them by the end of a graceful shutdown.

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
