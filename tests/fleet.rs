//! Fleet mode end to end: one `keygate control`, several `keygate serve` in feed mode, a shared
//! echo upstream, all real processes on loopback.
//!
//! - revocations through the REST API reach every gateway's already-open connections
//!   (p50/p99/max printed; only a generous bound asserted);
//! - the control plane going away: gateways keep serving, report the sync age, restart from
//!   their local copy, and resume without a snapshot when it comes back on its port;
//! - a gateway that missed 1,000 changes and a compaction catches up through a snapshot;
//! - many feed readers at once, and one that never reads stalls nobody;
//! - a publishable key made through the REST API works through a feed gateway only from its
//!   origin, on a publishable route.
//!
//! No fixed ports (except re-binding the control plane's own previous port), no sleeps for
//! synchronisation (polling with deadlines), bounded loops. The tests run one at a time (a
//! shared lock) so the timings of one are not skewed by the processes of another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on any one revocation reaching every gateway.
const ENFORCE_BOUND: Duration = Duration::from_secs(5);
/// Bound on gateways reconnecting (their backoff tops out at 5 s plus jitter).
const RECONNECT_BOUND: Duration = Duration::from_secs(30);
const SNAPSHOT_LINE: &str = "feed snapshot applied";

/// One fleet test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cp_config(listen: &str) -> String {
    format!(
        r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"
poll_interval_ms = 50
rotation_check_seconds = 1

[policy]
max_ttl = "365d"
require_owner = true

[plans.default]
rate = "100000/s"
burst = 100000

[control]
listen = "{listen}"
tokens = "admin-tokens.jsonl"
heartbeat_ms = 200
"#
    )
}

fn gw_config(cp: SocketAddr, up: SocketAddr) -> String {
    format!(
        r#"[keys]
source = "feed"
feed_url = "http://{cp}/v1/feed"
feed_token_env = "KEYGATE_FEED_TOKEN"
feed_cache = "feed-cache.jsonl"
usage_file = "usage.json"
audit_log = "audit.jsonl"
store = "keys.jsonl"

[plans.default]
rate = "100000/s"
burst = 100000

[limits]
auth_failures_per_minute = 1000000

[server]
listen = "127.0.0.1:0"
drain_timeout_ms = 1000

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["{up}"]
connect_timeout_ms = 500
response_timeout_ms = 3000

[[routes]]
name = "invoices-read"
path_prefix = "/invoices"
methods = ["GET", "HEAD"]
scopes = ["invoices:read"]
upstream = "up"
"#
    )
}

fn mint(cfg: &Path, role: &str) -> String {
    let out = cli(cfg, &["admin-token", "create", "--role", role], SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    stdout_str(&out).trim().to_owned()
}

/// A control plane in its own directory, with write and feed tokens.
struct Fleet {
    _root: tempfile::TempDir,
    root: PathBuf,
    cp_cfg: PathBuf,
    cp: Option<ControlPlane>,
    /// Where the control plane listens (or last listened).
    cp_at: SocketAddr,
    write: String,
    feed: String,
    up: Upstream,
}

impl Fleet {
    async fn start() -> Fleet {
        let root = tempdir();
        let path = root.path().to_path_buf();
        std::fs::create_dir(path.join("cp")).unwrap();
        let cp_cfg = write_file(&path.join("cp"), "keygate.toml", &cp_config("127.0.0.1:0"));
        let write = mint(&cp_cfg, "write");
        let feed = mint(&cp_cfg, "feed");
        let cp = ControlPlane::spawn(&cp_cfg).await;
        let up = Upstream::start(Mode::Echo).await;
        Fleet {
            _root: root,
            root: path,
            cp_cfg,
            cp_at: cp.addr,
            cp: Some(cp),
            write,
            feed,
            up,
        }
    }

    /// Start the control plane again on its old `port` (same store, same tokens).
    async fn restart_cp(&mut self, port: u16) {
        std::fs::write(&self.cp_cfg, cp_config(&format!("127.0.0.1:{port}"))).unwrap();
        let start = Instant::now();
        let cp = loop {
            match ControlPlane::try_spawn(&self.cp_cfg).await {
                Ok(cp) => break cp,
                Err(e) => {
                    assert!(
                        start.elapsed() < RECONNECT_BOUND,
                        "could not re-bind port {port}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await; // retry pacing, not sync
                }
            }
        };
        assert_eq!(cp.addr.port(), port);
        self.cp_at = cp.addr;
        self.cp = Some(cp);
    }

    /// Remove the control plane's store (stopped first): a volume not mounted, the wrong
    /// directory.
    fn empty_cp_store(&self) {
        for entry in std::fs::read_dir(self.root.join("cp")).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("keys.jsonl")
            {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    fn cp_addr(&self) -> SocketAddr {
        self.cp_at
    }

    /// Writes gateway `n`'s config (its own directory) and returns the path.
    fn gw_config(&self, n: usize) -> PathBuf {
        let dir = self.root.join(format!("gw{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_file(
            &dir,
            "keygate.toml",
            &gw_config(self.cp_addr(), self.up.addr()),
        )
    }

    async fn gateway(&self, n: usize) -> Gateway {
        self.gateway_edited(n, |text| text).await
    }

    /// Gateway `n` with its config text changed by `edit` first.
    async fn gateway_edited(&self, n: usize, edit: impl FnOnce(String) -> String) -> Gateway {
        let cfg = self.gw_config(n);
        std::fs::write(&cfg, edit(std::fs::read_to_string(&cfg).unwrap())).unwrap();
        Gateway::spawn(
            &cfg,
            &[
                (SECRET_VAR, SECRET),
                ("KEYGATE_FEED_TOKEN", self.feed.as_str()),
            ],
        )
        .await
    }

    /// A gateway in its own directory `name` whose feed is at `feed_at` (a path in front of
    /// the control plane, or a stand-in for one), with the fleet's feed token and `env`.
    async fn gateway_via(&self, name: &str, feed_at: SocketAddr, env: &[(&str, &str)]) -> Gateway {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write_file(&dir, "keygate.toml", &gw_config(feed_at, self.up.addr()));
        let mut all = vec![
            (SECRET_VAR, SECRET),
            ("KEYGATE_FEED_TOKEN", self.feed.as_str()),
        ];
        all.extend_from_slice(env);
        Gateway::spawn(&cfg, &all).await
    }

    async fn api(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let auth = format!("Bearer {}", self.write);
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (s, _, b) = request(
            self.cp_addr(),
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// Creates a key through the API; returns (id, plaintext).
    async fn create(&self, name: &str) -> (String, String) {
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/api-keys",
                json!({"name": name, "owner": "fleet", "scopes": ["invoices:read"]}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Imports `n` plaintext keys named after `batch` into the control plane's store with
    /// the CLI (`keys import`); returns them.
    fn import(&self, batch: &str, n: usize) -> Vec<String> {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("legacy-fleet-{batch}-{i:05}-zyxwvut"))
            .collect();
        let file = self.root.join(format!("cp/import-{batch}.txt"));
        std::fs::write(&file, keys.join("\n")).unwrap();
        let out = cli(
            &self.cp_cfg,
            &[
                "keys",
                "import",
                "--file",
                file.to_str().unwrap(),
                "--owner",
                "fleet",
                "--scope",
                "invoices:read",
                "--json",
            ],
            SECRET_ENV,
        );
        assert!(out.status.success(), "{}", stderr_str(&out));
        let v: Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
        assert_eq!(v["imported"], n, "{v}");
        keys
    }

    /// `GET /v1/api-keys/{id}/usage` (the fleet's forensics of a key), answered 200.
    async fn key_usage(&self, id: &str) -> Value {
        let (s, v) = self
            .api(
                Method::GET,
                &format!("/v1/api-keys/{id}/usage"),
                Value::Null,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    async fn revoke(&self, id: &str) {
        let (s, v) = self
            .api(Method::DELETE, &format!("/v1/api-keys/{id}"), Value::Null)
            .await;
        assert_eq!(s, 200, "{v}");
    }
}

/// Status of a keyed request on an open connection.
async fn status(conn: &mut KeepAlive, key: &str) -> u16 {
    conn.get("/invoices/1", &[("x-api-key", key)]).await.0
}

/// Polls `conn` until `key` gets `want`; panics after `deadline`.
async fn until_status(conn: &mut KeepAlive, key: &str, want: u16, deadline: Duration) {
    let start = Instant::now();
    loop {
        let got = status(conn, key).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "expected {want} within {deadline:?}, still {got}"
        );
        tokio::task::yield_now().await;
    }
}

/// Polls a fresh connection to `gw` until `key` gets `want`.
async fn until_status_fresh(gw: &Gateway, key: &str, want: u16, deadline: Duration) {
    let addr = gw.http;
    let key = key.to_owned();
    eventually_named(&format!("{want} on {addr}"), deadline, || {
        let key = key.clone();
        async move {
            let (s, _, _) = get(addr, "/invoices/1", &[("x-api-key", &key)]).await;
            (s == want).then_some(())
        }
    })
    .await;
}

fn snapshot_lines(gw: &Gateway) -> usize {
    gw.stderr_contents().matches(SNAPSHOT_LINE).count()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len()..].trim().parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_every_gateway_on_open_connections() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    const N: usize = 100;
    let mut keys = Vec::with_capacity(N);
    for i in 0..N {
        keys.push(fleet.create(&format!("k{i}")).await);
    }
    let mut gws = Vec::new();
    let mut conns = Vec::new();
    for n in 0..3 {
        let gw = fleet.gateway(n).await;
        conns.push(KeepAlive::connect(gw.http).await);
        gws.push(gw);
    }
    // Every gateway has the whole table (records arrive in order: the last implies all).
    for c in conns.iter_mut() {
        until_status(c, &keys[N - 1].1, 200, RECONNECT_BOUND).await;
        assert_eq!(status(c, &keys[0].1).await, 200);
    }

    let mut times = Vec::with_capacity(N);
    for (id, key) in &keys {
        fleet.revoke(id).await;
        let t0 = Instant::now();
        for c in conns.iter_mut() {
            until_status(c, key, 401, ENFORCE_BOUND).await;
        }
        times.push(t0.elapsed());
    }
    for c in &conns {
        assert!(!c.is_closed(), "the keep-alive connections stayed open");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "revocation -> 401 on all 3 gateways over {} revocations: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        times.len(),
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.99)),
        ms(times[times.len() - 1]),
    );
    // Keys not revoked are unaffected; a revoked one stays revoked on a new connection too.
    let (_, live) = fleet.create("still-live").await;
    for (gw, c) in gws.iter().zip(conns.iter_mut()) {
        until_status(c, &live, 200, ENFORCE_BOUND).await;
        until_status_fresh(gw, &keys[0].1, 401, ENFORCE_BOUND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_survive_the_control_plane_and_resume_without_a_snapshot() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let (_, valid) = fleet.create("valid").await;
    let (rev_id, revoked) = fleet.create("to-revoke").await;
    let mut gws = Vec::new();
    for n in 0..3 {
        gws.push(fleet.gateway(n).await);
    }
    let mut conns = Vec::new();
    for gw in &gws {
        let mut c = KeepAlive::connect(gw.http).await;
        until_status(&mut c, &valid, 200, RECONNECT_BOUND).await;
        conns.push(c);
    }
    fleet.revoke(&rev_id).await;
    for c in conns.iter_mut() {
        until_status(c, &revoked, 401, ENFORCE_BOUND).await;
    }

    // The control plane goes away.
    let port = fleet.cp_addr().port();
    drop(fleet.cp.take());
    for (gw, c) in gws.iter().zip(conns.iter_mut()) {
        assert_eq!(status(c, &valid).await, 200);
        assert_eq!(status(c, &revoked).await, 401);
        let (s, _, body) = get(gw.admin, "/readyz", &[]).await;
        assert_eq!(s, 200, "{body:?}");
    }
    for gw in &gws {
        let admin = gw.admin;
        let age = eventually_named(
            "sync age above 1 s",
            Duration::from_secs(15),
            || async move {
                let (_, _, body) = get(admin, "/metrics", &[]).await;
                let text = String::from_utf8_lossy(&body).into_owned();
                metric(&text, "keygate_table_sync_age_seconds").filter(|a| *a > 1.0)
            },
        )
        .await;
        eprintln!("{}: keygate_table_sync_age_seconds {age:.2}", gw.admin);
    }

    // A gateway restarted while the control plane is down serves its local copy.
    drop(gws.pop());
    conns.pop();
    let gw2 = fleet.gateway(2).await;
    until_status_fresh(&gw2, &valid, 200, Duration::from_secs(10)).await;
    let mut c2 = KeepAlive::connect(gw2.http).await;
    assert_eq!(status(&mut c2, &valid).await, 200);
    assert_eq!(status(&mut c2, &revoked).await, 401);
    gws.push(gw2);
    conns.push(c2);
    let snapshots_before: Vec<usize> = gws.iter().map(snapshot_lines).collect();
    assert!(
        snapshots_before[0] >= 1 && snapshots_before[1] >= 1,
        "{snapshots_before:?}"
    );
    assert_eq!(
        snapshots_before[2], 0,
        "the restarted gateway used its copy"
    );

    // The control plane comes back on its old port (same store, same tokens).
    fleet.restart_cp(port).await;

    let (_, fresh) = fleet.create("after-restart").await;
    for c in conns.iter_mut() {
        until_status(c, &fresh, 200, RECONNECT_BOUND).await;
        assert_eq!(status(c, &valid).await, 200);
        assert_eq!(status(c, &revoked).await, 401);
    }
    let snapshots_after: Vec<usize> = gws.iter().map(snapshot_lines).collect();
    assert_eq!(
        snapshots_after, snapshots_before,
        "gateways resumed from their revision, without a snapshot"
    );
    for gw in &gws {
        let (s, _, _) = get(gw.admin, "/readyz", &[]).await;
        assert_eq!(s, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_down_for_1000_changes_and_a_compaction_catches_up() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let mut early = Vec::new();
    for i in 0..6 {
        early.push(fleet.create(&format!("early{i}")).await);
    }
    let online = fleet.gateway(0).await;
    let offline = fleet.gateway(1).await;
    for gw in [&online, &offline] {
        until_status_fresh(gw, &early[5].1, 200, RECONNECT_BOUND).await;
    }
    drop(offline);

    // 1,000 new keys in two imports, 3 revocations and a compaction in between.
    let first = fleet.import("1", 500);
    for (id, _) in &early[..3] {
        fleet.revoke(id).await;
    }
    let out = cli(&fleet.cp_cfg, &["keys", "compact"], SECRET_ENV);
    assert!(out.status.success(), "{}", stderr_str(&out));
    let second = fleet.import("2", 500);
    let (_, newest) = fleet.create("newest").await;

    // The gateway that stayed up followed along.
    until_status_fresh(&online, &newest, 200, RECONNECT_BOUND).await;
    until_status_fresh(&online, &early[0].1, 401, ENFORCE_BOUND).await;

    // The one that was down catches up, through a snapshot (its revision predates the
    // compaction).
    let back = fleet.gateway(1).await;
    until_status_fresh(&back, &newest, 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(back.http).await;
    for (_, key) in &early[..3] {
        assert_eq!(status(&mut c, key).await, 401, "revoked while it was down");
    }
    for (_, key) in &early[3..] {
        assert_eq!(status(&mut c, key).await, 200);
    }
    for key in [&first[0], &first[499], &second[0], &second[499]] {
        assert_eq!(status(&mut c, key).await, 200, "imported while it was down");
    }
    assert_eq!(
        status(&mut c, "legacy-fleet-9-00000-zyxwvut").await,
        401,
        "never imported"
    );
    assert!(
        snapshot_lines(&back) >= 1,
        "caught up through a snapshot:\n{}",
        back.stderr_contents()
    );
}

/// A raw feed reader: everything it has read so far, filled by a task.
struct Reader {
    got: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    async fn open(cp: SocketAddr, token: &str) -> Reader {
        let mut s = within("connect", NET_TIMEOUT, tokio::net::TcpStream::connect(cp))
            .await
            .unwrap();
        let req =
            format!("GET /v1/feed HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            // Bounded by the total it will take; the test aborts it when done.
            while sink.lock().unwrap().len() < 64 << 20 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Reader { got, task }
    }

    fn contains(&self, needle: &str) -> bool {
        let got = self.got.lock().unwrap();
        got.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_feed_readers_and_a_stalled_one() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    // A table big enough (~2 MB) that a reader who never reads fills every buffer on the way.
    drop(fleet.cp.take());
    let padding = "p".repeat(200);
    let lines: Vec<String> = (0..2000)
        .map(|i| {
            json!({"key": format!("legacy-bulk-{i:06}-abcdefg"),
                   "labels": {"a": padding, "b": padding, "c": padding, "d": padding}})
            .to_string()
        })
        .collect();
    let file = fleet.root.join("bulk.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = cli(
        &fleet.cp_cfg,
        &[
            "keys",
            "import",
            "--file",
            file.to_str().unwrap(),
            "--owner",
            "bulk",
        ],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let cp = ControlPlane::spawn(&fleet.cp_cfg).await;
    fleet.cp_at = cp.addr;
    fleet.cp = Some(cp);
    let cp = fleet.cp_addr();

    // The stalled reader: a small receive buffer, sends its GET, never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = within("connect", NET_TIMEOUT, socket.connect(cp))
        .await
        .unwrap();
    let req = format!(
        "GET /v1/feed HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {}\r\n\r\n",
        fleet.feed
    );
    stalled.write_all(req.as_bytes()).await.unwrap();

    let mut readers = Vec::new();
    for _ in 0..10 {
        readers.push(Reader::open(cp, &fleet.feed).await);
    }
    for (i, r) in readers.iter().enumerate() {
        eventually_named(
            &format!("reader {i} got the snapshot"),
            Duration::from_secs(60),
            || async { r.contains("\"type\":\"snapshot_end\"").then_some(()) },
        )
        .await;
    }

    let mut ids = Vec::new();
    for i in 0..5 {
        let t0 = Instant::now();
        let (id, _) = fleet.create(&format!("while-stalled-{i}")).await;
        let took = t0.elapsed();
        eprintln!(
            "create while a reader is stalled: {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
        // Well under the 10 s after which the server gives up on the stalled reader.
        assert!(took < Duration::from_secs(5), "a create took {took:?}");
        ids.push(id);
    }
    for (i, r) in readers.iter().enumerate() {
        for id in &ids {
            eventually_named(
                &format!("reader {i} got {id}"),
                Duration::from_secs(10),
                || async { r.contains(id).then_some(()) },
            )
            .await;
        }
    }
    let _ = std::io::stderr().flush();
    drop(stalled);
}

// ---------------------------------------------------------------------------------------------
// Revocation is final on the feed path (restores, replays, a tampered cache)
// ---------------------------------------------------------------------------------------------

/// Replace `path` with `bytes` by rename, as an operator restoring a backup would.
fn restore(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("restore-tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Status of a keyed request on a fresh connection.
async fn key_status(gw: &Gateway, key: &str) -> u16 {
    get(gw.http, "/invoices/1", &[("x-api-key", key)]).await.0
}

async fn scrape(gw: &Gateway) -> String {
    let (_, _, body) = get(gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&body).into_owned()
}

async fn source_errors(gw: &Gateway, kind: &str) -> f64 {
    let name = format!("keygate_source_errors_total{{kind=\"{kind}\"}}");
    metric(&scrape(gw).await, &name).unwrap_or(0.0)
}

/// Issue 17, defects 1 and 3: a restored backup (with REST writes after it, and with CLI
/// appends already in it) never brings a revoked key back on any gateway, revisions are never
/// reused, and keys created after the restore reach every gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_backups_never_unrevoke_and_later_keys_reach_every_gateway() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let store = fleet.root.join("cp").join("keys.jsonl");
    let (k1_id, k1) = fleet.create("k1").await;
    let (_, k2) = fleet.create("k2").await;
    let gws = [fleet.gateway(0).await, fleet.gateway(1).await];
    for gw in &gws {
        until_status_fresh(gw, &k2, 200, RECONNECT_BOUND).await;
    }
    let backup = std::fs::read(&store).unwrap();
    fleet.revoke(&k1_id).await;
    for gw in &gws {
        until_status_fresh(gw, &k1, 401, ENFORCE_BOUND).await;
    }

    // 1. Restore, then REST writes: a new key, and an attempt to edit k1.
    restore(&store, &backup);
    let (_, k3) = fleet.create("k3-after-restore").await;
    let (s, v) = fleet
        .api(
            Method::PATCH,
            &format!("/v1/api-keys/{k1_id}"),
            json!({"labels": {"team": "x"}}),
        )
        .await;
    assert_ne!(s, 200, "a revoked key was edited back to life: {v}");
    let (s, v) = fleet
        .api(Method::GET, &format!("/v1/api-keys/{k1_id}"), Value::Null)
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("revoked")), "{v}");
    for gw in &gws {
        until_status_fresh(gw, &k3, 200, RECONNECT_BOUND).await;
        assert_eq!(key_status(gw, &k1).await, 401);
        assert_eq!(key_status(gw, &k2).await, 200);
    }

    // 2. Restore again, with a CLI append already in the restored file before anyone looks,
    // while gateway 1 is down; it comes back from its local copy.
    let mut gws = Vec::from(gws);
    drop(gws.pop());
    restore(&store, &backup);
    let out = cli(
        &fleet.cp_cfg,
        &[
            "keys",
            "create",
            "--name",
            "k4",
            "--owner",
            "o",
            "--scope",
            "invoices:read",
        ],
        SECRET_ENV,
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    let k4 = stdout_str(&out).trim().to_owned();
    gws.push(fleet.gateway(1).await);
    for gw in &gws {
        until_status_fresh(gw, &k4, 200, RECONNECT_BOUND).await;
        // k3 was created after the backup: restoring the backup loses it (as any restore
        // loses what came after it); what a restore never loses is a revocation.
        for (key, want) in [(&k1, 401), (&k2, 200), (&k3, 401)] {
            assert_eq!(key_status(gw, key).await, want);
        }
    }
    // Revisions in the store are unique, and the store itself holds k1 revoked.
    let text = std::fs::read_to_string(&store).unwrap();
    let mut revs: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("id").is_some())
        .map(|v| v["rev"].as_u64().unwrap())
        .collect();
    let n = revs.len();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), n, "{text}");
    let cp_log = read_lossy(&fleet.cp_cfg.with_file_name("control.stderr.log"));
    assert!(cp_log.contains("new log"), "{cp_log}");
}

/// Serves up to `max` connections on a fresh loopback port, each on its own task with its
/// index (the stand-ins for a control plane and the paths in front of one).
async fn serve_each<F, Fut>(max: usize, serve: F) -> SocketAddr
where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for i in 0..max {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(i, sock));
        }
    });
    addr
}

/// The head of a feed answer whose body runs to the close (no chunked framing).
const FEED_TO_THE_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n";

/// The nonce a gateway sent in its feed request (the `nonce=` query parameter).
fn nonce_of(request: &[u8]) -> String {
    let head = String::from_utf8_lossy(request);
    let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
    target
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("nonce="))
        .unwrap_or_default()
        .to_owned()
}

/// A scripted feed: connection `i` gets `scripts[i]` (NDJSON lines, sealed with `signer` for
/// the nonce the gateway sent, as a control plane with the fleet's secret would) and is
/// closed; later connections get 503. Counts connections served.
async fn fake_feed(
    scripts: Vec<String>,
    signer: keygate::store::seal::Signer,
) -> (SocketAddr, Arc<Mutex<usize>>) {
    use keygate::store::feed::FeedLine;
    let served = Arc::new(Mutex::new(0usize));
    let count = served.clone();
    let scripts = Arc::new(scripts);
    let addr = serve_each(64, move |i, mut sock| {
        let (scripts, signer, count) = (scripts.clone(), signer.clone(), count.clone());
        async move {
            let mut req = vec![0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut req)).await;
            let resp = match scripts.get(i) {
                Some(script) => {
                    let mut chain = signer.feed_chain(nonce_of(&req).as_bytes());
                    let body: Vec<u8> = script
                        .lines()
                        .flat_map(|l| {
                            serde_json::from_str::<FeedLine>(l)
                                .unwrap()
                                .sealed(&mut chain)
                                .to_vec()
                        })
                        .collect();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        body.len(),
                        String::from_utf8(body).unwrap()
                    )
                }
                None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
            };
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
            *count.lock().unwrap() += 1;
        }
    })
    .await;
    (addr, served)
}

/// Issue 17, defect 2: from any feed source, a newer record or snapshot without `revoked_at`
/// (validly signed: a confused or compromised control plane), a snapshot of another log, or a
/// forged record never brings a revoked key back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_unrevokes_or_forges_is_never_obeyed() {
    use keygate::keys::record::KeyRecord;
    use keygate::store::seal::{LogId, Signer};
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    // Two real keys, minted by the CLI into the control plane's store; the fake feed serves
    // their records re-signed for its own logs with the fleet's hash secret.
    let (_, k1) = fleet.create("k1").await;
    let (_, k2) = fleet.create("k2").await;
    let records: Vec<KeyRecord> = std::fs::read_to_string(fleet.root.join("cp/keys.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(records.len(), 2);
    let signer = Signer::new(&keygate::keys::digest::Hasher::new(vec![(
        1,
        SECRET.as_bytes().to_vec(),
    )]));
    let (l1, l2) = (LogId(0x1111), LogId(0x2222));
    let signed = |log: LogId, r: &KeyRecord, rev: u64, revoked: bool| {
        let mut r = r.clone();
        r.rev = rev;
        r.revoked_at = revoked.then_some(1);
        signer.sign(log, &mut r);
        json!({"type": "record", "record": r}).to_string()
    };
    let lines = |ls: Vec<String>| ls.join("\n") + "\n";
    let begin = |log: LogId, rev: u64, count: usize| {
        json!({"type": "snapshot_begin", "log": log.to_string(), "rev": rev, "count": count})
            .to_string()
    };
    let end = |rev: u64| json!({"type": "snapshot_end", "rev": rev}).to_string();
    let (a, b) = (&records[0], &records[1]);
    let mut forged_for_l1 = b.clone();
    forged_for_l1.id = "key_forged".into();
    forged_for_l1.rev = 9;
    signer.sign(l1, &mut forged_for_l1);
    let scripts = vec![
        // A snapshot, then k1's revocation, then a newer k1 version without it.
        lines(vec![
            begin(l1, 2, 2),
            signed(l1, a, 1, false),
            signed(l1, b, 2, false),
            end(2),
            signed(l1, a, 3, true),
            signed(l1, a, 4, false),
        ]),
        // A newer snapshot of the same log without the revocation.
        lines(vec![
            begin(l1, 5, 2),
            signed(l1, b, 2, false),
            signed(l1, a, 5, false),
            end(5),
        ]),
        // An older snapshot of the same log: a rollback.
        lines(vec![begin(l1, 1, 1), signed(l1, a, 1, false), end(1)]),
        // Another log (a "restore") that never revoked k1.
        lines(vec![
            begin(l2, 2, 2),
            signed(l2, a, 1, false),
            signed(l2, b, 2, false),
            end(2),
        ]),
        // A record with a MAC for another log.
        lines(vec![
            json!({"type": "resume", "log": l2.to_string(), "rev": 2}).to_string(),
            json!({"type": "record", "record": forged_for_l1}).to_string(),
        ]),
    ];
    let n_scripts = scripts.len();
    let (feed_at, served) = fake_feed(scripts, signer.clone()).await;
    let gw = fleet.gateway_via("gw-fake", feed_at, &[]).await;
    eventually_named("every script served", RECONNECT_BOUND, || {
        let served = served.clone();
        async move { (*served.lock().unwrap() > n_scripts).then_some(()) }
    })
    .await;
    let admin = gw.admin;
    eventually_named("forged record refused", ENFORCE_BOUND, || async move {
        let (_, _, body) = get(admin, "/metrics", &[]).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        metric(&text, "keygate_source_errors_total{kind=\"bad_mac\"}").filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(key_status(&gw, &k1).await, 401);
    assert_eq!(key_status(&gw, &k2).await, 200);
    // Kept against script 1's un-revoke, script 2's snapshot and script 4's other log; script
    // 3 refused whole as a rollback.
    assert!(
        source_errors(&gw, "rollback").await >= 4.0,
        "{}",
        scrape(&gw).await
    );
    let log = gw.stderr_contents();
    assert!(log.contains("keeping them revoked"), "{log}");
    // The table it serves is script 4's log, with k1 carried over as revoked.
    assert!(log.contains(&l2.to_string()), "{log}");
}

/// Issue 17, defects 4 and 5: the local feed copy is sealed. A gateway restarted from an
/// intact copy reports its real sync age; one whose copy was edited, cut (mid-line or on a
/// line boundary) or given a foreign record discards it loudly and fails closed until the feed
/// answers, then syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_feed_cache_is_discarded_and_sync_age_survives_restarts() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let (k1_id, k1) = fleet.create("k1").await;
    let (_, k2) = fleet.create("k2").await;
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &k2, 200, RECONNECT_BOUND).await;
    fleet.revoke(&k1_id).await;
    until_status_fresh(&gw, &k1, 401, ENFORCE_BOUND).await;
    let cache = fleet.root.join("gw0").join("feed-cache.jsonl");
    eventually_named("revocation cached", ENFORCE_BOUND, || {
        let cache = cache.clone();
        async move {
            read_lossy(&cache)
                .lines()
                .any(|l| l.contains("revoked_at"))
                .then_some(())
        }
    })
    .await;
    drop(gw);
    let intact = std::fs::read(&cache).unwrap();
    let text = String::from_utf8(intact.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let revoked_line = lines.iter().position(|l| l.contains("revoked_at")).unwrap();

    // The control plane goes away.
    let port = fleet.cp_addr().port();
    drop(fleet.cp.take());

    // Intact copy: served, and the sync age counts from the copy's last sync (never -1).
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &k2, 200, Duration::from_secs(10)).await;
    assert_eq!(key_status(&gw, &k1).await, 401);
    let age = metric(&scrape(&gw).await, "keygate_table_sync_age_seconds").unwrap();
    assert!(age >= 0.0, "sync age {age} after a restart from the copy");
    drop(gw);

    let edited = text.replacen(",\"revoked_at\":", ",\"x_revoked_at\":", 1);
    let cut_on_boundary = lines[..revoked_line].join("\n") + "\n";
    let cut_mid_line = &text[..text.len() - 20];
    let foreign = {
        let mut l = lines.clone();
        let mut rec: Value = serde_json::from_str(lines[1]).unwrap();
        rec["id"] = "key_foreign".into();
        rec["rev"] = 999.into();
        let rec = rec.to_string();
        l.insert(l.len() - 1, &rec);
        l.join("\n") + "\n"
    };
    let removed_revocation = {
        let mut l = lines.clone();
        l.remove(revoked_line);
        l.join("\n") + "\n"
    };
    let cases: [(&str, &[u8]); 5] = [
        ("edited", edited.as_bytes()),
        ("cut on a line boundary", cut_on_boundary.as_bytes()),
        ("cut mid-line", cut_mid_line.as_bytes()),
        ("foreign record", foreign.as_bytes()),
        ("revocation line removed", removed_revocation.as_bytes()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&cache, bytes).unwrap();
        let gw = fleet.gateway(0).await;
        let admin = gw.admin;
        eventually_named(
            &format!("{what}: cache refused"),
            ENFORCE_BOUND,
            || async move {
                let (_, _, body) = get(admin, "/metrics", &[]).await;
                let text = String::from_utf8_lossy(&body).into_owned();
                metric(&text, "keygate_source_errors_total{kind=\"cache\"}").filter(|v| *v >= 1.0)
            },
        )
        .await;
        assert_eq!(get(gw.admin, "/readyz", &[]).await.0, 503, "{what}");
        for key in [&k1, &k2] {
            assert_eq!(key_status(&gw, key).await, 503, "{what}: fails closed");
        }
        assert!(
            cache.with_file_name("feed-cache.jsonl.rejected").exists(),
            "{what}"
        );
        drop(gw);
    }

    // With the control plane back, a tampered copy is discarded and the feed resyncs.
    std::fs::write(&cache, edited.as_bytes()).unwrap();
    fleet.restart_cp(port).await;
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &k2, 200, RECONNECT_BOUND).await;
    assert_eq!(key_status(&gw, &k1).await, 401);
    assert_eq!(get(gw.admin, "/readyz", &[]).await.0, 200);
    assert!(source_errors(&gw, "cache").await >= 1.0);
}

/// Issue 14 feature "rotation that finishes itself", in a real fleet: a feed-mode gateway
/// reports its usage to the control plane, which completes the rotation once the successor
/// has served requests and the old key has been quiet for `complete_when_idle`; the gateway
/// applies the revocation from the feed and counts the completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_completes_a_rotation_from_gateway_reports() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (old_id, old_key) = fleet.create("rot").await;
    let cfg = fleet.gw_config(0);
    let gw = Gateway::spawn(
        &cfg,
        &[
            (SECRET_VAR, SECRET),
            ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
            ("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    until_status_fresh(&gw, &old_key, 200, RECONNECT_BOUND).await;
    let (s, v) = fleet
        .api(
            Method::POST,
            &format!("/v1/api-keys/{old_id}/rotate"),
            json!({"grace": "1h", "complete_when_idle": "2s"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let new_key = v["key"].as_str().unwrap().to_owned();
    let new_id = v["id"].as_str().unwrap().to_owned();
    // Only the successor is used from now on; its use reaches the control plane in the
    // gateway's next usage report (every second here).
    until_status_fresh(&gw, &new_key, 200, ENFORCE_BOUND).await;
    // Watched through the API: a request with the old key would be a use.
    let done = eventually_named(
        "completed by the control plane",
        Duration::from_secs(20),
        || async {
            let (_, v) = fleet
                .api(Method::GET, &format!("/v1/api-keys/{old_id}"), Value::Null)
                .await;
            (v["state"] == "revoked").then_some(v)
        },
    )
    .await;
    let started = done["rotation"]["started_at"].as_i64().unwrap();
    assert!(
        done["revoked_at"].as_i64().unwrap() >= started + 2,
        "{done}"
    );
    assert_eq!(done["rotation_status"]["state"], "completed");
    assert!(
        done["rotation_status"]["new"]["requests_since_rotation"]
            .as_u64()
            .unwrap()
            >= 1
    );
    until_status_fresh(&gw, &old_key, 401, ENFORCE_BOUND).await;
    assert_eq!(key_status(&gw, &new_key).await, 200);
    let audit = std::fs::read_to_string(fleet.root.join("cp/audit.jsonl")).unwrap();
    let completed: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "key.rotation_completed")
        .collect();
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0]["actor"], "control-plane");
    assert_eq!(completed[0]["successor_id"], new_id.as_str());
    // The gateway applied it from the feed and counted it.
    let text = scrape(&gw).await;
    let completions = r#"keygate_key_rotations_total{event="completed"}"#;
    assert_eq!(metric(&text, completions), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "keygate_key_rotation_completion_seconds_count"),
        Some(1.0)
    );
}

/// One GET from `src` with `user_agent` over a fresh connection; the status.
async fn status_from(gw: &Gateway, src: std::net::IpAddr, key: &str, user_agent: &str) -> u16 {
    let req = format!(
        "GET /invoices/1 HTTP/1.1\r\nHost: api.example.com\r\nx-api-key: {key}\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n"
    );
    let out = raw_exchange_from(src, gw.http, req.as_bytes(), NET_TIMEOUT).await;
    match out.statuses().as_slice() {
        [s] => *s,
        other => panic!("from {src}: {other:?}"),
    }
}

/// Issue 14 feature "leak forensics" in a fleet: two feed-mode gateways send their sketches
/// with their usage reports; `GET /v1/api-keys/{id}/usage` on the control plane merges both
/// nodes (sources, user agents, attempts after revocation on the second one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_merges_forensics_from_every_gateway() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (id, key) = fleet.create("leaky").await;
    let mut gws = Vec::new();
    for n in 0..2 {
        let cfg = fleet.gw_config(n);
        gws.push(
            Gateway::spawn(
                &cfg,
                &[
                    (SECRET_VAR, SECRET),
                    ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
                    ("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1"),
                ],
            )
            .await,
        );
    }
    let home = std::net::IpAddr::from([127, 0, 0, 1]);
    let thief = std::net::IpAddr::from([127, 0, 0, 2]);
    for gw in &gws {
        until_status_fresh(gw, &key, 200, RECONNECT_BOUND).await;
    }
    // The readiness probes above count too: compare with what came after them.
    for _ in 0..3 {
        assert_eq!(
            status_from(&gws[0], home, &key, "billing-app/2.1").await,
            200
        );
    }
    for _ in 0..4 {
        assert_eq!(
            status_from(&gws[1], thief, &key, "evil-scraper/0.1").await,
            200
        );
    }
    fleet.revoke(&id).await;
    let deadline = Instant::now() + ENFORCE_BOUND;
    let mut refused = 0u64;
    while refused < 2 {
        assert!(Instant::now() < deadline, "revocation not applied");
        if status_from(&gws[1], thief, &key, "evil-scraper/0.1").await == 401 {
            refused += 1;
        }
    }
    let v = eventually_named("forensics reported", Duration::from_secs(20), || async {
        let v = fleet.key_usage(&id).await;
        (v["attempts_after_revocation"]["count"].as_u64()? == refused).then_some(v)
    })
    .await;
    let count_of = |list: &Value, value: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["value"] == value)
            .and_then(|x| x["count"].as_u64())
    };
    assert!(count_of(&v["top_ips"], "127.0.0.1").unwrap() >= 3, "{v}");
    assert!(
        count_of(&v["top_ips"], "127.0.0.2").unwrap() >= 4 + refused,
        "{v}"
    );
    assert_eq!(
        count_of(&v["top_user_agents"], "billing-app/2.1"),
        Some(3),
        "{v}"
    );
    assert!(count_of(&v["top_user_agents"], "evil-scraper/0.1").unwrap() >= 4 + refused);
    let after = &v["attempts_after_revocation"]["top_ips"];
    assert_eq!(count_of(after, "127.0.0.2"), Some(refused), "{v}");
    assert!(v["by_status"]["2xx"].as_u64().unwrap() >= 7, "{v}");
    assert!(v["by_status"]["4xx"].as_u64().unwrap() >= refused, "{v}");
    // `since` counts its window over both gateways: from just after the first request, all
    // of them (the hour holding it; unless that second starts the next hour); from after the
    // last, none.
    let first = v["first_seen"].as_i64().unwrap();
    let after_first = if (first + 1) % 3600 == 0 {
        first
    } else {
        first + 1
    };
    let last = v["last_seen"].as_i64().unwrap();
    let usage = |since: i64| {
        let (fleet, id) = (&fleet, &id);
        async move {
            let (s, w) = fleet
                .api(
                    Method::GET,
                    &format!("/v1/api-keys/{id}/usage?since={since}"),
                    Value::Null,
                )
                .await;
            assert_eq!(s, 200, "{w}");
            w
        }
    };
    // Reports keep arriving: compare two reads that agree with each other.
    eventually_named(
        "a window holding every request",
        Duration::from_secs(20),
        || async {
            let (all, window) = (usage(0).await, usage(after_first).await);
            let count = |v: &Value| v["attempts_after_revocation"]["count"].clone();
            (all["requests"] == window["requests"]
                && all["by_status"] == window["by_status"]
                && count(&all) == count(&window)
                && window["counted_from"].as_i64()? > first - 3600)
                .then_some(())
        },
    )
    .await;
    let w = usage(last + 3600).await;
    assert_eq!(w["requests"], 0, "{w}");
    assert_eq!(w["attempts_after_revocation"]["count"], 0, "{w}");
    // Both gateways' sections are in the control plane's file.
    let file: Value = serde_json::from_slice(
        &std::fs::read(fleet.root.join("cp/usage.json.forensics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(file["nodes"].as_object().unwrap().len(), 2, "{file}");
    // Unknown keys and bad times are refused.
    let (s, _) = fleet
        .api(Method::GET, "/v1/api-keys/key_nope/usage", Value::Null)
        .await;
    assert_eq!(s, 404);
    let (s, v) = fleet
        .api(
            Method::GET,
            &format!("/v1/api-keys/{id}/usage?since=soonish"),
            Value::Null,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    for gw in &gws {
        gw.assert_not_logged(&key);
    }
}

/// Issue 14 "key types" through the REST API: `POST /v1/api-keys` with `publishable: true` is
/// a 400 without `allow_origins`; with one it makes a `kg_pub_live_…` key, which a gateway on
/// the feed accepts only with that `Origin` and only on a route with `publishable = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_keys_made_through_the_api_work_only_from_their_origin() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let app = "https://shop.example";
    let mut body = json!({"name": "widget", "owner": "fleet", "scopes": ["invoices:read"], "publishable": true});
    let (s, v) = fleet.api(Method::POST, "/v1/api-keys", body.clone()).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("allowed origin"),
        "{v}"
    );
    body["allow_origins"] = json!([app]);
    let (s, v) = fleet.api(Method::POST, "/v1/api-keys", body).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["publishable"], true, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("kg_pub_live_"), "{v}");
    let (_, secret_key) = fleet.create("secret").await;

    let gw = fleet
        .gateway_edited(0, |text| {
            text + "\n[[routes]]\nname = \"widget\"\npath_prefix = \"/widget\"\npublishable = true\nupstream = \"up\"\n"
        })
        .await;
    let call = |path: &'static str, key: String, origin: Option<&'static str>| {
        let addr = gw.http;
        async move {
            let mut h = vec![("x-api-key", key.as_str())];
            h.extend(origin.map(|o| ("origin", o)));
            let (s, _, b) = get(addr, path, &h).await;
            (
                s,
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            )
        }
    };
    // Once the feed delivered the key: from its origin, on the publishable route.
    until_status_fresh(&gw, &secret_key, 200, RECONNECT_BOUND).await;
    eventually_named("publishable key from its origin", ENFORCE_BOUND, || async {
        (call("/widget/1", key.clone(), Some(app)).await.0 == 200).then_some(())
    })
    .await;
    for (path, origin, code) in [
        ("/widget/1", None, "origin_denied"),
        ("/widget/1", Some("https://evil.example"), "origin_denied"),
        ("/invoices/1", Some(app), "publishable_key_denied"),
    ] {
        let (s, v) = call(path, key.clone(), origin).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (403, Some(code)),
            "{path} {origin:?}: {v}"
        );
    }
    gw.assert_not_logged(&key);
}

/// A gateway that has served a few thousand keys still reports them: its usage and sketches
/// reach the control plane's files, however large the report would be as one body (the
/// control plane takes at most `[control] max_body_bytes`, 64 KiB by default, per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_thousands_of_keys_reaches_the_control_plane() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    const N: usize = 2_000;
    let keys = fleet.import("many", N);
    let cfg = fleet.gw_config(0);
    let gw = Gateway::spawn(
        &cfg,
        &[
            (SECRET_VAR, SECRET),
            ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
            ("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    until_status_fresh(&gw, &keys[N - 1], 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(gw.http).await;
    for key in &keys {
        assert_eq!(status(&mut c, key).await, 200);
    }
    let read = |name: &str| -> Value {
        std::fs::read(fleet.root.join("cp").join(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let usage = eventually_named(
        "every key's use in the control plane's usage file",
        Duration::from_secs(30),
        || async {
            let usage = read("usage.json");
            let used = usage
                .as_object()?
                .values()
                .filter(|u| u["requests"].as_u64().unwrap_or(0) >= 1)
                .count();
            (used >= N).then_some(usage)
        },
    )
    .await;
    // Counted once each (the readiness probe's key more often): nothing added twice.
    let once = usage
        .as_object()
        .unwrap()
        .values()
        .filter(|u| u["requests"] == 1 && u["s2xx"] == 1)
        .count();
    assert!(once >= N - 1, "{once} of {N} keys counted exactly once");
    eventually_named(
        "every key's sketch in the control plane's forensics file",
        Duration::from_secs(30),
        || async {
            let f = read("usage.json.forensics.json");
            let keys = f["nodes"].as_object()?.values().next()?.as_object()?.len();
            (keys >= N).then_some(())
        },
    )
    .await;
    gw.assert_not_logged(&keys[0]);
}

/// What a load balancer answers when it gave up waiting.
const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// What `lossy_proxy` does with an answer it loses.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Lose {
    /// The connection closes without an answer.
    Silently,
    /// The gateway is answered 502, as by a load balancer that gave up waiting.
    As502,
}

/// A proxy in front of the control plane that passes everything through, except that the
/// answers to the first `lose` usage reports holding `marker` are lost (`how`) once the
/// control plane has answered (applied, and the gateway never hears so). Returns its address
/// and the bodies of the reports holding `marker`, in order.
async fn lossy_proxy(
    cp: SocketAddr,
    marker: String,
    lose: usize,
    how: Lose,
) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let bodies = seen.clone();
    let addr = serve_each(10_000, move |_, mut client| {
        let (seen, marker) = (seen.clone(), marker.clone());
        async move {
            // The request head, then (for a report) its body, whole.
            let mut buf = vec![0u8; 65536];
            let Some((head, mut body)) = read_head(&mut client).await else {
                return;
            };
            let lower = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let Ok(mut server) = tokio::net::TcpStream::connect(cp).await else {
                return;
            };
            if lower.starts_with("post /v1/usage") {
                let len: usize = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while body.len() < len {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&buf[..n]),
                    }
                }
                let report = body[..len].to_vec();
                let lost = String::from_utf8_lossy(&report).contains(marker.as_str()) && {
                    let mut seen = seen.lock().unwrap();
                    seen.push(report);
                    seen.len() <= lose
                };
                if lost {
                    // Applied once the answer starts; then nobody hears it.
                    let _ = server.write_all(&[head, body].concat()).await;
                    let _ = server.read(&mut buf).await;
                    if how == Lose::As502 {
                        let _ = client.write_all(BAD_GATEWAY).await;
                    }
                    return;
                }
            }
            let _ = server.write_all(&[head, body].concat()).await;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    })
    .await;
    (addr, bodies)
}

/// A report batch whose answer was lost is sent again as it was (same boot, same sequence
/// number), and the control plane, which applied it the first time, does not count it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_whose_answer_is_lost_counts_once() {
    lost_answers_count_once(Lose::Silently).await;
}

/// A 5xx answer may come after the control plane applied the batch (a proxy before it gave
/// up): the gateway sends the batch again as it was, never its counts in a new batch, which
/// would count them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_answered_502_after_it_was_applied_counts_once() {
    lost_answers_count_once(Lose::As502).await;
}

/// Two answers to a batch lost (`how`), then the batch a third time, answered: counted once
/// in the control plane and in the gateway's own usage file.
async fn lost_answers_count_once(how: Lose) {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (_, probe) = fleet.create("probe").await;
    let (id, key) = fleet.create("counted").await;
    let (proxy, bodies) = lossy_proxy(fleet.cp_addr(), id.clone(), 2, how).await;
    let gw = fleet
        .gateway_via(
            "gw-lossy",
            proxy,
            &[("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1")],
        )
        .await;
    until_status_fresh(&gw, &probe, 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(gw.http).await;
    for _ in 0..5 {
        assert_eq!(status(&mut c, &key).await, 200);
    }
    let requests = || async {
        let (s, v) = fleet
            .api(Method::GET, &format!("/v1/api-keys/{id}"), Value::Null)
            .await;
        assert_eq!(s, 200, "{v}");
        v["requests"].as_u64()
    };
    // Two answers lost, then the same batch a third time, answered.
    eventually_named(
        "the batch sent three times",
        Duration::from_secs(30),
        || async { (bodies.lock().unwrap().len() >= 3).then_some(()) },
    )
    .await;
    eventually_named("the counts in", Duration::from_secs(30), || async {
        (requests().await? >= 5).then_some(())
    })
    .await;
    let sent: Vec<Value> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    assert_eq!(sent[0], sent[1]);
    assert_eq!(sent[1], sent[2]);
    assert_eq!(sent[0]["added"][&id]["requests"], 5, "{}", sent[0]);
    // Later reports have come and gone: still 5.
    let failed = r#"keygate_usage_reports_total{result="failed"}"#;
    assert_eq!(metric(&scrape(&gw).await, failed), Some(2.0));
    let accepted = r#"keygate_usage_reports_total{result="accepted"}"#;
    let before = metric(&scrape(&gw).await, accepted).unwrap();
    // (A report is sent when something changed: the probe key's requests.)
    let mut c = KeepAlive::connect(gw.http).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(status(&mut c, &probe).await, 200);
        if metric(&scrape(&gw).await, accepted).unwrap_or(0.0) >= before + 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "two more reports not sent");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling pace, not sync
    }
    assert_eq!(requests().await, Some(5));
    // The gateway's own usage file has them once too.
    let local: Value =
        serde_json::from_slice(&std::fs::read(fleet.root.join("gw-lossy/usage.json")).unwrap())
            .unwrap();
    assert_eq!(local[&id]["requests"], 5, "{local}");
}

/// Gateway 0 of `fleet` with the default touch interval (60 s: no report comes before a
/// stop), a key created and used three times through it; (its id, the key, the gateway).
async fn three_uses_before_a_report(fleet: &Fleet) -> (String, String, Gateway) {
    let (_, probe) = fleet.create("probe").await;
    let (id, key) = fleet.create("counted").await;
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &probe, 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(gw.http).await;
    for _ in 0..3 {
        assert_eq!(status(&mut c, &key).await, 200);
    }
    (id, key, gw)
}

/// A feed gateway stopped between two reports sends what it counted since the last one on
/// its way out: nothing counted is lost to a rolling restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_reports_what_it_counted_since_its_last_report() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (id, _, mut gw) = three_uses_before_a_report(&fleet).await;
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(15)).await.success());
    let (s, v) = fleet
        .api(Method::GET, &format!("/v1/api-keys/{id}"), Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["requests"], 3, "{v}");
    let text = gw.stderr_contents();
    assert!(!text.contains("usage report"), "{text}");
}

/// A feed gateway stopped while its control plane is down keeps what it could not report in
/// the outbox beside its usage file; the next process on the node sends it, as it was, once
/// the control plane answers: a rolling restart during an outage loses no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_while_the_control_plane_is_down_reports_after_its_restart() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let (id, key, mut gw) = three_uses_before_a_report(&fleet).await;
    let port = fleet.cp_addr().port();
    fleet.cp = None; // killed
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
    let outbox = fleet.root.join("gw0").join("usage.json.outbox.json");
    let kept = std::fs::read_to_string(&outbox).unwrap();
    assert!(kept.contains(&id), "{kept}");
    assert!(
        gw.stderr_contents()
            .contains("usage the control plane has not taken is kept for the next start"),
        "{}",
        gw.stderr_contents()
    );

    fleet.restart_cp(port).await;
    let gw = Gateway::spawn(
        &fleet.gw_config(0),
        &[
            (SECRET_VAR, SECRET),
            ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
            ("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    eventually_named("the kept counts in", Duration::from_secs(30), || async {
        let (s, v) = fleet
            .api(Method::GET, &format!("/v1/api-keys/{id}"), Value::Null)
            .await;
        (s == 200 && v["requests"] == 3).then_some(())
    })
    .await;
    eventually_named("the outbox removed", Duration::from_secs(30), || async {
        (!outbox.exists()).then_some(())
    })
    .await;
    for text in [kept, gw.stderr_contents()] {
        assert!(!text.contains(&key));
    }
}

/// A feed gateway's leak forensics go on across its restarts: the control plane's view of a
/// key keeps what that node saw before the restart (the gateway keeps the sketches the control
/// plane took in its own forensics file and resumes from them; begun afresh, its next report
/// would replace the node's history of the key at the control plane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_feed_gateway_goes_on_from_its_forensics() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (id, key) = fleet.create("traced").await;
    let cfg = fleet.gw_config(0);
    let spawn = || {
        let (cfg, feed) = (cfg.clone(), fleet.feed.clone());
        async move {
            let envs = [
                (SECRET_VAR, SECRET),
                ("KEYGATE_FEED_TOKEN", feed.as_str()),
                ("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS", "1"),
            ];
            Gateway::spawn(&cfg, &envs).await
        }
    };
    let thief = std::net::IpAddr::from([127, 0, 0, 2]);
    let scraped = |n: u64| {
        let (fleet, id) = (&fleet, &id);
        async move {
            eventually_named(
                "the scraper's requests at the control plane",
                Duration::from_secs(20),
                || async {
                    let v = fleet.key_usage(id).await;
                    let agents = v["top_user_agents"].as_array()?.clone();
                    let scraper = agents.iter().find(|a| a["value"] == "evil-scraper/0.1")?;
                    (scraper["count"].as_u64()? == n).then_some(())
                },
            )
            .await
        }
    };
    let mut gw = spawn().await;
    until_status_fresh(&gw, &key, 200, RECONNECT_BOUND).await;
    for _ in 0..3 {
        assert_eq!(status_from(&gw, thief, &key, "evil-scraper/0.1").await, 200);
    }
    scraped(3).await;
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
    let gw = spawn().await;
    until_status_fresh(&gw, &key, 200, RECONNECT_BOUND).await;
    assert_eq!(status_from(&gw, thief, &key, "evil-scraper/0.1").await, 200);
    scraped(4).await;
}

/// THREATS I14: a feed gateway whose wall clock runs ten minutes ahead (`faketime`) shows it:
/// `keygate_clock_skew_seconds` near 600 from the feed's heartbeats (a gateway on time near
/// 0), said once in its log, not at every heartbeat. Expiry is judged by the node's clock
/// (`expiry_leeway` 0s): it refuses a key that expires in five minutes, which the gateway on
/// time accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_gateway_ahead_of_its_control_plane_shows_the_skew() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (_, probe) = fleet.create("probe").await;
    let (s, v) = fleet
        .api(
            Method::POST,
            "/v1/api-keys",
            json!({"name": "soon", "owner": "fleet", "scopes": ["invoices:read"], "expires_in": "5m"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let soon = v["key"].as_str().unwrap().to_owned();
    let straight = fleet.gateway(0).await;
    let envs = [
        (SECRET_VAR, SECRET),
        ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
    ];
    let skewed = spawn_with_clock(&fleet.gw_config(1), "+10m", &envs).await;
    until_status_fresh(&straight, &soon, 200, RECONNECT_BOUND).await;
    until_status_fresh(&skewed, &probe, 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(skewed.http).await;
    assert_eq!(
        status(&mut c, &soon).await,
        401,
        "expired by the node's clock"
    );
    let skew = |gw: &Gateway| {
        let addr = gw.admin;
        async move {
            let (_, _, b) = get(addr, "/metrics", &[]).await;
            metric(&String::from_utf8_lossy(&b), "keygate_clock_skew_seconds")
        }
    };
    eventually_named("the skew measured", Duration::from_secs(10), || async {
        skew(&skewed).await.filter(|s| (590.0..610.0).contains(s))
    })
    .await;
    let on_time = skew(&straight).await.unwrap();
    assert!(on_time.abs() < 5.0, "{on_time}");
    skewed.assert_logged_once("clock differs from the control plane's by over a minute");
    skewed.assert_not_logged(&soon);
}

/// THREATS I14 the other way round: a feed gateway whose wall clock runs ten minutes behind its
/// control plane's refuses a key revoked there as soon as the revocation arrives. A
/// revocation is stamped with the writer's clock; read as "revoked from then", it left the
/// key working on this node for the ten minutes until the node's clock reached the stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_at_once_on_a_gateway_whose_clock_is_behind() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (id, key) = fleet.create("revoked-ahead").await;
    let envs = [
        (SECRET_VAR, SECRET),
        ("KEYGATE_FEED_TOKEN", fleet.feed.as_str()),
    ];
    let behind = spawn_with_clock(&fleet.gw_config(0), "-10m", &envs).await;
    until_status_fresh(&behind, &key, 200, RECONNECT_BOUND).await;
    let mut c = KeepAlive::connect(behind.http).await;
    assert_eq!(status(&mut c, &key).await, 200);
    fleet.revoke(&id).await;
    until_status(&mut c, &key, 401, ENFORCE_BOUND).await;
    behind.assert_not_logged(&key);
}

/// A proxy in front of the control plane that passes everything through, except that on feed
/// streams it drops the first line holding `marker` (once, over all connections). It re-frames
/// a feed answer as a body read to the close, line by line, as a path that edits streams
/// would. Returns its address and the number of lines dropped.
async fn line_dropping_proxy(
    cp: SocketAddr,
    marker: &'static str,
) -> (SocketAddr, Arc<Mutex<usize>>) {
    let dropped = Arc::new(Mutex::new(0usize));
    let count = dropped.clone();
    let addr = serve_each(1_000, move |_, mut client| {
        let dropped = dropped.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            let Some((head, rest)) = read_head(&mut client).await else {
                return;
            };
            let Ok(mut server) = tokio::net::TcpStream::connect(cp).await else {
                return;
            };
            let _ = server.write_all(&[head.clone(), rest].concat()).await;
            if !String::from_utf8_lossy(&head).starts_with("GET /v1/feed") {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                return;
            }
            let Some((answer, mut body)) = read_head(&mut server).await else {
                return;
            };
            if !answer.starts_with(b"HTTP/1.1 200") {
                let _ = client.write_all(&[answer, body].concat()).await;
                return;
            }
            let _ = client.write_all(FEED_TO_THE_CLOSE).await;
            // Undo the chunked framing, then pass on whole lines.
            let mut lines = Vec::new();
            for _ in 0..1_000_000 {
                while let Some(i) = body.windows(2).position(|w| w == b"\r\n") {
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&body[..i])
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim(),
                        16,
                    )
                    .unwrap_or(0);
                    if body.len() < i + 2 + size + 2 {
                        break;
                    }
                    if size == 0 {
                        return;
                    }
                    lines.extend_from_slice(&body[i + 2..i + 2 + size]);
                    body.drain(..i + 2 + size + 2);
                }
                while let Some(nl) = lines.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = lines.drain(..=nl).collect();
                    let drop_it = String::from_utf8_lossy(&line).contains(marker) && {
                        let mut d = dropped.lock().unwrap();
                        *d += 1;
                        *d == 1
                    };
                    if !drop_it && client.write_all(&line).await.is_err() {
                        return;
                    }
                }
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
        }
    })
    .await;
    (addr, count)
}

/// A path between the control plane and a gateway that drops a revocation from the feed and
/// passes the heartbeats: the stream's seal no longer holds at the next line, so the gateway
/// ends the session, resumes from the revision it holds and gets the revocation. Before the
/// feed was sealed the gateway took the heartbeats as "in sync" and served the revoked key
/// for as long as the connection lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_dropped_on_the_way_is_noticed_and_fetched_again() {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start().await;
    let (k1_id, k1) = fleet.create("k1").await;
    let (_, k2) = fleet.create("k2").await;
    let (proxy, dropped) = line_dropping_proxy(fleet.cp_addr(), "\"revoked_at\"").await;
    let gw = fleet.gateway_via("gw-path", proxy, &[]).await;
    until_status_fresh(&gw, &k1, 200, RECONNECT_BOUND).await;
    fleet.revoke(&k1_id).await;
    eventually_named("the revocation line dropped", ENFORCE_BOUND, || {
        let dropped = dropped.clone();
        async move { (*dropped.lock().unwrap() >= 1).then_some(()) }
    })
    .await;
    until_status_fresh(&gw, &k1, 401, ENFORCE_BOUND).await;
    assert_eq!(key_status(&gw, &k2).await, 200);
    assert!(
        source_errors(&gw, "bad_mac").await >= 1.0,
        "{}",
        scrape(&gw).await
    );
    let log = gw.stderr_contents();
    assert!(log.contains("does not verify"), "{log}");
    // Found by the seal, not by a snapshot: the gateway resumed.
    assert_eq!(snapshot_lines(&gw), 1, "{log}");
}

/// THREATS I9: a feed that answers 200 and then drips a byte at a time, never a whole line, is
/// given up after the idle limit (15 s) like a silent one, and the gateway connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_drips_bytes_without_a_line_is_given_up() {
    let _serial = SERIAL.lock().await;
    let connections = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = connections.clone();
    let feed_at = serve_each(4, move |_, mut sock| {
        seen.lock().unwrap().push(Instant::now());
        async move {
            let mut req = vec![0u8; 4096];
            let _ = sock.read(&mut req).await;
            let _ = sock.write_all(FEED_TO_THE_CLOSE).await;
            // A byte every 200 ms, far inside the idle limit, for at most a minute.
            for _ in 0..300 {
                if sock.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await; // the drip's pace
            }
        }
    })
    .await;
    let root = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let cfg = write_file(root.path(), "keygate.toml", &gw_config(feed_at, up.addr()));
    let gw = Gateway::spawn(&cfg, &[(SECRET_VAR, SECRET), ("KEYGATE_FEED_TOKEN", "t")]).await;
    eventually_named("a second connection", Duration::from_secs(40), || {
        let seen = connections.clone();
        async move { (seen.lock().unwrap().len() >= 2).then_some(()) }
    })
    .await;
    let times = connections.lock().unwrap().clone();
    let held = times[1] - times[0];
    assert!(
        held >= Duration::from_secs(14) && held < Duration::from_secs(30),
        "the dripping session was held {held:?}"
    );
    assert!(source_errors(&gw, "feed").await >= 1.0);
    let log = gw.stderr_contents();
    assert!(log.contains("feed idle for 15s"), "{log}");
}

/// THREATS I6: a control plane restarted on an empty store (a volume not mounted, the wrong
/// directory) serves a whole new table without any of the fleet's keys. A gateway holding
/// them refuses it (`source_errors{kind="shrink"}`, the reason in its log) and keeps serving
/// its last good table; one configured with `max_snapshot_drop_percent = 100` takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_an_empty_store_does_not_empty_the_fleet() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let keys = fleet.import("held", 12);
    let guarded = fleet.gateway(0).await;
    let open = fleet
        .gateway_edited(1, |text| {
            text.replacen("[keys]\n", "[keys]\nmax_snapshot_drop_percent = 100\n", 1)
        })
        .await;
    for gw in [&guarded, &open] {
        until_status_fresh(gw, &keys[11], 200, RECONNECT_BOUND).await;
    }

    // The control plane comes back on its port with none of its store.
    let port = fleet.cp_addr().port();
    drop(fleet.cp.take());
    fleet.empty_cp_store();
    fleet.restart_cp(port).await;

    until_status_fresh(&open, &keys[0], 401, RECONNECT_BOUND).await;
    eventually_named("the empty table refused", RECONNECT_BOUND, || async {
        (source_errors(&guarded, "shrink").await >= 1.0).then_some(())
    })
    .await;
    let mut c = KeepAlive::connect(guarded.http).await;
    for key in &keys {
        assert_eq!(
            status(&mut c, key).await,
            200,
            "the last good table still served"
        );
    }
    let log = guarded.stderr_contents();
    assert!(
        log.contains("leaves out 12 of the 12 live keys held"),
        "{log}"
    );
    assert_eq!(source_errors(&open, "shrink").await, 0.0);
    // Not fetched whole again at every step of a backoff from 100 ms: over two more seconds
    // out of step, no second refusal...
    let age = "keygate_table_sync_age_seconds";
    let since = metric(&scrape(&guarded).await, age).unwrap_or(0.0);
    eventually_named("two more seconds out of step", RECONNECT_BOUND, || async {
        (metric(&scrape(&guarded).await, age).unwrap_or(0.0) >= since + 2.0).then_some(())
    })
    .await;
    assert_eq!(source_errors(&guarded, "shrink").await, 1.0);
    // ...and fetched again as soon as a reload allows it.
    let cfg = fleet.gw_config(0);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen("[keys]\n", "[keys]\nmax_snapshot_drop_percent = 100\n", 1),
    )
    .unwrap();
    guarded.sighup();
    until_status_fresh(&guarded, &keys[0], 401, RECONNECT_BOUND).await;
}

/// A key revoked in the store of a control plane the gateway refuses (restarted on an empty
/// store, where the operator imports the leaked key and revokes it: the incident's own act) is
/// revoked on the gateway, and in its sealed feed copy too: a restart while the control plane
/// is away serves the copy with the key still revoked, and with the sync age of the last
/// time the feed was in step, not of the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_obeyed_from_a_refused_snapshot_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    let mut fleet = Fleet::start().await;
    let mut keys = fleet.import("held", 11);
    // The leaked key is the newest: its version held is the table's revision, which obeying
    // its revocation must not move (the log's next record would be skipped after a restart).
    keys.insert(0, fleet.import("newest", 1).remove(0));
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &keys[0], 200, RECONNECT_BOUND).await;
    let revision = metric(&scrape(&gw).await, "keygate_table_revision");
    assert!(revision.is_some_and(|r| r >= 12.0), "{revision:?}");

    let port = fleet.cp_addr().port();
    let stopped = Instant::now();
    drop(fleet.cp.take());
    fleet.empty_cp_store();
    let leaked = fleet.root.join("cp/leaked.txt");
    std::fs::write(&leaked, format!("{}\n", keys[0])).unwrap();
    let cp_cli = |args: &[&str]| {
        let out = cli(&fleet.cp_cfg, args, SECRET_ENV);
        assert!(out.status.success(), "{args:?}: {}", stderr_str(&out));
        stdout_str(&out)
    };
    let file = leaked.to_str().unwrap();
    cp_cli(&["keys", "import", "--file", file, "--owner", "fleet"]);
    let listed: Value = serde_json::from_str(cp_cli(&["keys", "list", "--json"]).trim()).unwrap();
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    cp_cli(&["keys", "revoke", listed[0]["id"].as_str().unwrap()]);
    // Out of step for a while first, so that a copy whose sync time moved to the refusal
    // would show it.
    let age = "keygate_table_sync_age_seconds";
    eventually_named("1.5 s out of step", RECONNECT_BOUND, || async {
        (metric(&scrape(&gw).await, age).unwrap_or(0.0) >= 1.5).then_some(())
    })
    .await;
    fleet.restart_cp(port).await;

    until_status_fresh(&gw, &keys[0], 401, RECONNECT_BOUND).await;
    // The refusal is counted when its session ends, after the obeyed revocation is enforced
    // and written to the local copy (an fsync): a scrape at the first 401 can come before it.
    eventually_named("the refusal counted", ENFORCE_BOUND, || async {
        (source_errors(&gw, "shrink").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(key_status(&gw, &keys[1]).await, 200, "the last good table");
    let cache = fleet.root.join("gw0").join("feed-cache.jsonl");
    eventually_named("the revocation in the local copy", ENFORCE_BOUND, || {
        let cache = cache.clone();
        async move { read_lossy(&cache).contains("revoked_at").then_some(()) }
    })
    .await;

    drop(gw);
    drop(fleet.cp.take());
    let gw = fleet.gateway(0).await;
    until_status_fresh(&gw, &keys[1], 200, RECONNECT_BOUND).await;
    assert_eq!(key_status(&gw, &keys[0]).await, 401, "revoked in the copy");
    let mut c = KeepAlive::connect(gw.http).await;
    for key in &keys[1..] {
        assert_eq!(status(&mut c, key).await, 200, "the copy's last good table");
    }
    let floor = stopped.elapsed().as_secs_f64();
    let scraped = scrape(&gw).await;
    let age = metric(&scraped, age).unwrap();
    assert!(
        age >= floor - 0.05,
        "sync age {age} s counts from the refusal, not from {floor} s ago (the last sync)"
    );
    assert_eq!(
        metric(&scraped, "keygate_table_revision"),
        revision,
        "the copy stands where the last good table stood in its log"
    );
}
