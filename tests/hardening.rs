//! Hardening tests for the rows of `THREATS.md` not covered elsewhere (see `tests/README.md`
//! for the full row → test map): upstream faults (H1–H6, H8–H10), rate-limit budgets under
//! concurrency and across sources (G1–G4), brute force (C7/C8), the IP allowlist behind
//! proxies (D6), method scopes and overrides (D7), slow clients and connection floods
//! (E1/E2/E6), fd exhaustion (E7), reloads under load (I12), SIGTERM under load (K2), and a
//! panic inside a request (K3, with the `test-panic` feature).
//!
//! The real binary runs as a child process against recording upstreams on loopback. No fixed
//! ports, no sleeps for synchronisation (pacing a load loop is not synchronisation), every loop
//! bounded in count and time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Method;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const HOST: &str = "api.example.com";
const POLL: Duration = Duration::from_secs(10);
/// The scope of the keys the tests create.
const READ_SCOPE: &[&str] = &["--scope", "invoices:read"];

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// `[server]` lines, `[limits]` auth failures per minute, and a tail (upstreams, routes, plans).
/// The upstream `up` (targets `up`) and route `/invoices` (GET, HEAD; scope invoices:read) are
/// always present.
fn config_text(up: SocketAddr, server: &str, auth_failures: u32, tail: &str) -> String {
    gateway_config(
        up,
        100_000,
        &format!("drain_timeout_ms = 5000\n{server}"),
        "connect_timeout_ms = 500\nresponse_timeout_ms = 5000",
        &format!(
            r#"[limits]
auth_failures_per_minute = {auth_failures}

[[routes]]
name = "invoices-read"
path_prefix = "/invoices"
methods = ["GET", "HEAD"]
scopes = ["invoices:read"]
upstream = "up"

{tail}"#
        ),
    )
}

struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
    up: Upstream,
}

impl Env {
    async fn new(mode: Mode, server: &str, auth_failures: u32, tail: &str) -> Env {
        let up = Upstream::start(mode).await;
        let dir = tempdir();
        let config = write_file(
            dir.path(),
            "keygate.toml",
            &config_text(up.addr(), server, auth_failures, tail),
        );
        Env { dir, config, up }
    }

    /// A key scoped `invoices:read`, plus `extra` arguments.
    fn create(&self, extra: &[&str]) -> Key {
        create_key(&self.config, &[READ_SCOPE, extra].concat())
    }

    async fn serve(&self) -> Gateway {
        spawn_ready(&self.config, &[], POLL).await
    }
}

async fn metrics_text(gw: &Gateway) -> String {
    let (status, _, body) = get(gw.admin, "/metrics", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body).into_owned()
}

/// Sum of every sample line of `name` whose labels contain all of `labels` (`k="v"` pieces).
async fn metric(gw: &Gateway, name: &str, labels: &[&str]) -> f64 {
    metric_in(&metrics_text(gw).await, name, labels)
}

fn metric_in(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name && labels.iter().all(|p| series.contains(p)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn localhost(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn raw_get(path: &str, headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at the state (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// A raw upstream that answers every request head with fixed bytes, then closes (or holds the
/// connection until the peer closes). Counts requests and open connections.
struct RawStub {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    accept: tokio::task::AbortHandle,
}

impl RawStub {
    async fn start(reply: Vec<u8>, close: bool) -> RawStub {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let reply = Arc::new(reply);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let (h, reply) = (h.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request head (bounded in size and time).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(&reply).await;
                    if close {
                        let _ = s.shutdown().await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(30), async {
                        while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                    })
                    .await;
                });
            }
        })
        .abort_handle();
        RawStub { addr, hits, accept }
    }
}

impl Drop for RawStub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// H. Upstream faults
// ---------------------------------------------------------------------------------------------

/// What the client must see for one upstream fault.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// A gateway error response with this status (and close within `max`).
    Status(u16, &'static str),
    /// The 200 head was relayed, but the response is visibly incomplete and the connection
    /// ends (H1: Content-Length shortfall + close).
    Aborted,
}

/// The response framings an upstream may use, each relayed with exactly its body: interim
/// 1xx heads skipped, chunks (with extensions and a trailer section) decoded, a body delimited
/// by the upstream's close read to the end, no body after a 204 or for a HEAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_upstream_framings_are_relayed_with_exactly_their_bodies() {
    let raws: Vec<(&str, &[u8], u16, &str)> = vec![
        (
            "interim",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
            "ok",
        ),
        (
            "chunks",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
            201,
            "hello, world",
        ),
        (
            "untilclose",
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the upstream closes",
            200,
            "read until the upstream closes",
        ),
        (
            "nocontent",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            204,
            "",
        ),
    ];
    let mut stubs = Vec::new();
    let mut tail = String::new();
    for (name, reply, _, _) in &raws {
        let stub = RawStub::start(reply.to_vec(), true).await;
        tail.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{name}\"\n\n",
            stub.addr
        ));
        stubs.push(stub);
    }
    let env = Env::new(Mode::Echo, "", 100_000, &tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    for (name, _, status, body) in &raws {
        let out = raw_exchange(
            gw.http,
            &raw_get(&format!("/{name}/x"), &[("Authorization", &auth)], true),
            Duration::from_secs(8),
        )
        .await;
        let resps = out.responses();
        let r = resps
            .first()
            .unwrap_or_else(|| panic!("{name}: {}", out.text()));
        assert_eq!(
            (r.status, r.complete),
            (*status, true),
            "{name}: {}",
            out.text()
        );
        assert_eq!(r.body_str(), *body, "{name}");
        assert!(
            !r.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("x-trailer")),
            "{name}: trailer fields are not relayed"
        );
    }
    // HEAD: the upstream's Content-Length describes a body that is not there.
    let head_stub = &stubs[0];
    let before = head_stub.hits.load(Ordering::SeqCst);
    let mut head = raw_get("/interim/x", &[("Authorization", &auth)], true);
    head.splice(0..3, b"HEAD".iter().copied());
    let out = raw_exchange(gw.http, &head, Duration::from_secs(8)).await;
    assert!(out.text().starts_with("HTTP/1.1 200"), "{}", out.text());
    assert!(
        out.text().ends_with("\r\n\r\n"),
        "no body after a HEAD: {}",
        out.text()
    );
    assert_eq!(head_stub.hits.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_h5_h9_upstream_faults_are_502_504_or_aborted() {
    // One upstream (and route) per fault. Harness modes first, then raw replies.
    let modes: Vec<(&str, Mode)> = vec![
        ("hole", Mode::Blackhole),
        ("slowhead", Mode::SlowHeaders),
        ("stall", Mode::StallBody),
        ("rst", Mode::RstMidBody),
        ("huge", Mode::HugeHeaders),
        ("clte", Mode::BadFraming),
        ("u101", Mode::Unasked101),
    ];
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let raws: Vec<(&str, Vec<u8>)> = vec![
        (
            "twocl",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        ("http09", b"hello from the nineties\n".to_vec()),
        (
            "badstatus",
            b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ),
        (
            "negcl",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok".to_vec(),
        ),
        (
            "manyheaders",
            format!("HTTP/1.1 200 OK\r\n{many_headers}Content-Length: 2\r\n\r\nok").into_bytes(),
        ),
        (
            "badchunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        // Codings other than a lone `chunked`: the gateway strips `Transfer-Encoding`, so
        // relaying the decoded chunks would hand the client gzip bytes with nothing saying so.
        (
            "tegzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "tetwo",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "techunkedgzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello".to_vec(),
        ),
    ];
    let mut ups = Vec::new();
    for (name, mode) in &modes {
        ups.push((*name, Upstream::start(mode.clone()).await));
    }
    let mut stubs = Vec::new();
    for (name, reply) in &raws {
        stubs.push((*name, RawStub::start(reply.clone(), true).await));
    }
    let refused = Upstream::refused_addr();
    let mut tail = String::new();
    let targets: Vec<(String, SocketAddr)> = std::iter::once(("refuse".to_owned(), refused))
        .chain(ups.iter().map(|(n, u)| (n.to_string(), u.addr())))
        .chain(stubs.iter().map(|(n, s)| (n.to_string(), s.addr)))
        .collect();
    for (name, addr) in &targets {
        tail.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\ntargets = [\"{addr}\"]\nconnect_timeout_ms = 500\nresponse_timeout_ms = 1000\n\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{name}\"\n\n"
        ));
    }
    let env = Env::new(Mode::Echo, "", 100_000, &tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);

    // (route, expected, upper bound on the time to the answer / close)
    let cases: Vec<(&str, Want, Duration)> = vec![
        (
            "refuse",
            Want::Status(502, "upstream_unavailable"),
            Duration::from_millis(1500),
        ),
        (
            "hole",
            Want::Status(504, "upstream_timeout"),
            Duration::from_secs(3),
        ),
        (
            "slowhead",
            Want::Status(504, "upstream_timeout"),
            Duration::from_secs(3),
        ),
        ("stall", Want::Aborted, Duration::from_secs(4)),
        ("rst", Want::Aborted, Duration::from_secs(3)),
        (
            "huge",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "clte",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "u101",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "twocl",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "http09",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "badstatus",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "negcl",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "manyheaders",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        ("badchunk", Want::Aborted, Duration::from_secs(3)),
        (
            "tegzip",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "tetwo",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
        (
            "techunkedgzip",
            Want::Status(502, "upstream_error"),
            Duration::from_secs(3),
        ),
    ];
    let mut failures = Vec::new();
    for (route, want, max) in &cases {
        let started = Instant::now();
        // No `Connection: close`: for the aborted cases the gateway itself must end it. An
        // error response is complete on its own (keep-alive): stop reading after it.
        let out = raw_exchange_with(
            gw.http,
            &raw_get(&format!("/{route}/x"), &[("Authorization", &auth)], false),
            &RawOpts {
                stop_after: Some(1),
                timeout: Duration::from_secs(8),
                ..RawOpts::default()
            },
        )
        .await;
        let took = started.elapsed();
        let resps = out.responses();
        let first = resps.first();
        let summary = format!(
            "{route}: statuses {:?} complete {:?} closed {} after {took:?}",
            out.statuses(),
            first.map(|r| r.complete),
            out.closed()
        );
        eprintln!("H {summary}");
        match want {
            Want::Status(status, code) => {
                let ok = first.is_some_and(|r| {
                    r.status == *status && r.complete && r.body_str().contains(code)
                });
                if !ok || took > *max {
                    failures.push(format!("want {status} {code} within {max:?}; {summary}"));
                }
            }
            Want::Aborted => {
                // The client must never be able to take this for a complete response.
                let looks_complete = first.is_some_and(|r| r.complete);
                if looks_complete || !out.closed() || took > *max {
                    failures.push(format!(
                        "want an aborted response closed within {max:?}; {summary}: {}",
                        out.text()
                    ));
                }
            }
        }
    }
    // H2: the timed-out upstream connection is closed, not left to hang.
    let hole = &ups.iter().find(|(n, _)| *n == "hole").unwrap().1;
    eventually_named("blackholed upstream connection closed", POLL, || async {
        (hole.open_connections() == 0).then_some(())
    })
    .await;
    // H4: the reset connection is not reused: the next request opens a new one.
    let rst = &ups.iter().find(|(n, _)| *n == "rst").unwrap().1;
    let _ = raw_exchange(
        gw.http,
        &raw_get("/rst/again", &[("Authorization", &auth)], true),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        rst.accepted(),
        2,
        "a fresh upstream connection after the RST"
    );
    // H1: counted as a connect error of that upstream.
    let text = metrics_text(&gw).await;
    assert!(
        metric_in(
            &text,
            "keygate_upstream_errors_total",
            &["upstream=\"refuse\"", "kind=\"connect\""]
        ) >= 1.0,
        "connect error counted"
    );
    for name in ["tegzip", "tetwo", "techunkedgzip"] {
        assert_eq!(
            metric_in(
                &text,
                "keygate_upstream_errors_total",
                &[&format!("upstream=\"{name}\""), "kind=\"protocol\""]
            ),
            1.0,
            "{name}: counted as an upstream protocol error"
        );
    }
    assert!(
        failures.is_empty(),
        "upstream fault mismatches:\n{}",
        failures.join("\n")
    );
    // The gateway survived all of it.
    assert_eq!(
        get(
            gw.http,
            "/invoices/1",
            &[("host", HOST), ("authorization", &auth)]
        )
        .await
        .0,
        200
    );
    gw.assert_not_logged(&k.key);
}

/// An upstream that answers every request head (bodiless requests only) with `reply` and
/// keeps the connection for the next; counts the connections it accepted and the requests.
struct KeepAliveStub {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    accept: tokio::task::AbortHandle,
}

impl KeepAliveStub {
    async fn start(reply: &'static [u8]) -> KeepAliveStub {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, r) = (accepted.clone(), requests.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Heads, one after another, each bounded in size and time.
                    while buf.len() < 65536 {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            r.fetch_add(1, Ordering::SeqCst);
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                });
            }
        })
        .abort_handle();
        KeepAliveStub {
            addr,
            accepted,
            requests,
            accept,
        }
    }
}

impl Drop for KeepAliveStub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// H5, RFC 9112 §6.1: an HTTP/1.0 message carrying `Transfer-Encoding` has faulty framing
/// (an HTTP/1.0 recipient knows no transfer codings), and the connection must be closed after
/// it, whatever `Connection: keep-alive` says. Its body is relayed as its chunks say, but its
/// connection never goes back to the pool: the second request comes on a new connection. The
/// same reply as HTTP/1.1 keeps its connection (the control: one connection for both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_an_http10_response_with_transfer_encoding_never_keeps_its_connection() {
    let http10 = KeepAliveStub::start(
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let http11 = KeepAliveStub::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let mut tail = String::new();
    for (name, stub) in [("http10", &http10), ("http11", &http11)] {
        tail.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{name}\"\n\n",
            stub.addr
        ));
    }
    let env = Env::new(Mode::Echo, "", 100_000, &tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    for (name, stub, connections) in [("http10", &http10, 2), ("http11", &http11, 1)] {
        for i in 0..2 {
            let out = raw_exchange(
                gw.http,
                &raw_get(&format!("/{name}/{i}"), &[("Authorization", &auth)], true),
                Duration::from_secs(5),
            )
            .await;
            let resps = out.responses();
            let r = resps
                .first()
                .unwrap_or_else(|| panic!("{name} {i}: {}", out.text()));
            assert_eq!(
                (r.status, r.complete, r.body_str().as_str()),
                (200, true, "hello"),
                "{name} {i}: {}",
                out.text()
            );
        }
        assert_eq!(stub.requests.load(Ordering::SeqCst), 2, "{name}");
        assert_eq!(
            stub.accepted.load(Ordering::SeqCst),
            connections,
            "{name}: upstream connections for two requests"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_upstream_hop_by_hop_headers_are_stripped() {
    let reply = b"HTTP/1.1 200 OK\r\n\
Connection: x-secret, close\r\n\
X-Secret: internal\r\n\
Keep-Alive: timeout=5\r\n\
Proxy-Authenticate: Basic\r\n\
Proxy-Connection: keep-alive\r\n\
Upgrade: h2c\r\n\
Trailer: x-sum\r\n\
Content-Type: text/plain\r\n\
X-Kept: yes\r\n\
Transfer-Encoding: chunked\r\n\r\n\
5\r\nhello\r\n0\r\n\r\n"
        .to_vec();
    let stub = RawStub::start(reply, true).await;
    let tail = format!(
        "[[upstreams]]\nname = \"hop\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"hop\"\npath_prefix = \"/hop\"\nupstream = \"hop\"\n",
        stub.addr
    );
    let env = Env::new(Mode::Echo, "", 20, &tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let out = raw_exchange(
        gw.http,
        &raw_get("/hop/x", &[("X-API-Key", &k.key)], true),
        NET_TIMEOUT,
    )
    .await;
    let resps = out.responses();
    assert_eq!(out.statuses(), [200], "{}", out.text());
    let r = &resps[0];
    assert!(r.complete, "{}", out.text());
    assert_eq!(r.body_str(), "hello");
    assert_eq!(r.header("x-kept").as_deref(), Some("yes"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    for h in [
        "x-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "upgrade",
        "trailer",
    ] {
        assert!(r.header(h).is_none(), "{h} relayed: {}", out.text());
    }
    // `Connection` may only be the gateway's own (e.g. `close` for our close request).
    for v in r.header_all("connection") {
        assert!(!v.to_ascii_lowercase().contains("x-secret"), "{v}");
    }
    assert_eq!(stub.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_client_disconnect_cancels_the_upstream_request() {
    let env = Env::new(Mode::Slow(Duration::from_secs(8)), "", 20, "").await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let in_flight = |gw: &Gateway| {
        let admin = gw.admin;
        async move {
            let (_, _, b) = get(admin, "/metrics", &[]).await;
            metric_in(
                &String::from_utf8_lossy(&b),
                "keygate_requests_in_flight",
                &[],
            )
        }
    };
    const N: usize = 5;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut s = connect(None, gw.http, NET_TIMEOUT).await;
        s.write_all(&raw_get("/invoices/slow", &[("X-API-Key", &k.key)], false))
            .await
            .unwrap();
        clients.push(s);
    }
    eventually_named("requests held by the slow upstream", POLL, || async {
        (env.up.count() == N && env.up.open_connections() == N).then_some(())
    })
    .await;
    assert_eq!(in_flight(&gw).await, N as f64);
    let dropped = Instant::now();
    drop(clients);
    // Well before the upstream's 8 s answer: the gateway dropped the work and its upstream
    // connections, and the in-flight gauge is back to zero.
    eventually_named("in-flight back to 0", Duration::from_secs(4), || async {
        (in_flight(&gw).await == 0.0).then_some(())
    })
    .await;
    eventually_named(
        "upstream connections closed",
        Duration::from_secs(4),
        || async { (env.up.open_connections() == 0).then_some(()) },
    )
    .await;
    eprintln!("H8: cancelled after {:?}", dropped.elapsed());
    assert!(dropped.elapsed() < Duration::from_secs(6));
    // Still serving.
    env.up.set_mode(Mode::Echo);
    let auth = bearer(&k.key);
    assert_eq!(
        get(
            gw.http,
            "/invoices/1",
            &[("host", HOST), ("authorization", &auth)]
        )
        .await
        .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h10_in_flight_cap_sheds_a_burst_fast() {
    let env = Env::new(
        Mode::Slow(Duration::from_millis(1500)),
        "max_in_flight = 3",
        20,
        "",
    )
    .await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    let addr = gw.http;
    let held: Vec<_> = (0..3)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move {
                get(
                    addr,
                    "/invoices/held",
                    &[("host", HOST), ("authorization", &auth)],
                )
                .await
                .0
            })
        })
        .collect();
    eventually_named("cap reached", POLL, || async {
        (env.up.count() == 3).then_some(())
    })
    .await;
    // A burst of 20 more: every one is refused at once with 503 + Retry-After.
    let started = Instant::now();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = get(
                    addr,
                    "/invoices/burst",
                    &[("host", HOST), ("authorization", &auth)],
                )
                .await;
                (r, t.elapsed())
            })
        })
        .collect();
    for b in burst {
        let ((st, h, body), took) = b.await.unwrap();
        assert_eq!(st, 503, "{}", String::from_utf8_lossy(&body));
        assert!(h.contains_key("retry-after"));
        assert!(took < Duration::from_millis(1000), "shed slowly: {took:?}");
    }
    assert!(started.elapsed() < Duration::from_millis(1400));
    for h in held {
        assert_eq!(within("held request", POLL, h).await.unwrap(), 200);
    }
    assert_eq!(env.up.count(), 3, "no shed request reached the upstream");
    assert_eq!(metric(&gw, "keygate_requests_in_flight", &[]).await, 0.0);
}

// ---------------------------------------------------------------------------------------------
// G. Rate limiting
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_one_key_over_20_connections_at_10x_stays_within_its_budget() {
    const RATE: f64 = 10.0;
    const BURST: f64 = 10.0;
    const CONNS: usize = 20;
    let env = Env::new(
        Mode::Echo,
        "",
        20,
        "[plans.g1]\nrate = \"10/s\"\nburst = 10\n",
    )
    .await;
    let k = env.create(&["--plan", "g1"]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(KeepAlive::connect(gw.http).await);
    }
    // Each connection sends every 200 ms: 100 requests/s in total, 10x the limit, for 2 s.
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ka| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                let mut seen = Vec::new();
                for _ in 0..10 {
                    tick.tick().await;
                    let (st, h, _) = ka
                        .get("/invoices/g1", &[("host", HOST), ("authorization", &auth)])
                        .await;
                    seen.push((st, h.contains_key("retry-after")));
                }
                seen
            })
        })
        .collect();
    let mut ok = 0usize;
    let mut limited = 0usize;
    for t in tasks {
        for (st, retry_after) in t.await.unwrap() {
            match st {
                200 => ok += 1,
                429 => {
                    assert!(retry_after, "429 without Retry-After");
                    limited += 1;
                }
                other => panic!("unexpected status {other}"),
            }
        }
    }
    let t = started.elapsed().as_secs_f64();
    let bound = BURST + RATE * t;
    let at_stub = env.up.count();
    eprintln!(
        "G1: {ok} accepted, {limited} limited in {t:.2}s; bound {bound:.1}; stub saw {at_stub}"
    );
    assert_eq!(at_stub, ok, "accepted == forwarded");
    assert!(
        (at_stub as f64) <= bound + 2.0,
        "over-admitted: {at_stub} > {bound:.1} + 2"
    );
    assert!(at_stub as f64 >= BURST, "the burst was admitted: {at_stub}");
    assert_eq!(ok + limited, CONNS * 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_one_key_from_19_sources_shares_one_budget() {
    let env = Env::new(
        Mode::Echo,
        "",
        20,
        "[plans.g2]\nrate = \"1/h\"\nburst = 5\n",
    )
    .await;
    let k = env.create(&["--plan", "g2"]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    let addr = gw.http;
    let tasks: Vec<_> = (2..=20u8)
        .map(|last| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..2 {
                    let r = get_from(
                        localhost(last),
                        addr,
                        "/invoices/g2",
                        &[("host", HOST), ("authorization", &auth)],
                    )
                    .await;
                    out.push(r.0);
                }
                out
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok, 5, "one burst of 5 for all 19 sources: {statuses:?}");
    assert_eq!(limited, statuses.len() - 5, "{statuses:?}");
    assert_eq!(env.up.count(), 5);
    // The peers were really distinct.
    let peers: std::collections::BTreeSet<String> = env
        .up
        .records()
        .iter()
        .filter_map(|r| r.header("x-forwarded-for"))
        .collect();
    assert!(peers.len() > 1 || ok == 5, "{peers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_d8_unknown_invalid_and_refused_keys_never_create_buckets() {
    let tail = r#"
[[routes]]
name = "write"
path_prefix = "/write"
scopes = ["invoices:write"]
upstream = "up"
"#;
    let env = Env::new(Mode::Echo, "", 100_000, tail).await;
    let good = env.create(&[]);
    let other = env.create(&[]);
    let revoked = env.create(&[]);
    cli_ok(&env.config, &["keys", "revoke", &revoked.id]);
    let gw = env.serve().await;
    let buckets = |gw: &Gateway| {
        let admin = gw.admin;
        async move {
            let (_, _, b) = get(admin, "/metrics", &[]).await;
            metric_in(
                &String::from_utf8_lossy(&b),
                "keygate_rate_limit_buckets",
                &[],
            )
        }
    };
    assert_eq!(buckets(&gw).await, 0.0);
    let mut ka = KeepAlive::connect(gw.http).await;
    let good_auth = bearer(&good.key);
    assert_eq!(
        ka.get(
            "/invoices/1",
            &[("host", HOST), ("authorization", &good_auth)]
        )
        .await
        .0,
        200
    );
    assert_eq!(buckets(&gw).await, 1.0);
    let rss_before = rss_kib(gw.pid());

    // 1000 unknown keys with a valid format and checksum (they reach the HMAC lookup), 500
    // malformed ones, the revoked key, and a valid key refused by scope (403).
    let format = keygate::keys::format::KeyFormat::new("kg", &["live".into(), "test".into()]);
    let mut unknown = 0;
    for i in 0..1500 {
        let presented = if i < 1000 {
            format.generate("live").unwrap()
        } else {
            format!("kg_live_garbage{i}")
        };
        let auth = bearer(&presented);
        let (st, _, _) = ka
            .get("/invoices/1", &[("host", HOST), ("authorization", &auth)])
            .await;
        assert_eq!(st, 401, "{presented}");
        unknown += 1;
    }
    let revoked_auth = bearer(&revoked.key);
    assert_eq!(
        ka.get(
            "/invoices/1",
            &[("host", HOST), ("authorization", &revoked_auth)]
        )
        .await
        .0,
        401
    );
    let other_auth = bearer(&other.key);
    for _ in 0..10 {
        assert_eq!(
            ka.get(
                "/write/1",
                &[("host", HOST), ("authorization", &other_auth)]
            )
            .await
            .0,
            403
        );
    }
    assert_eq!(
        buckets(&gw).await,
        1.0,
        "no bucket from {unknown} unknown/invalid keys or a 401/403"
    );
    // D8: the refused key's budget is untouched, and its first success creates its bucket.
    let (st, h, _) = ka
        .get(
            "/invoices/1",
            &[("host", HOST), ("authorization", &other_auth)],
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        h.get("ratelimit-remaining").and_then(|v| v.to_str().ok()),
        Some("99999"),
        "no token was taken by the ten 403s"
    );
    assert_eq!(buckets(&gw).await, 2.0);
    let rss_after = rss_kib(gw.pid());
    eprintln!("G4: RSS {rss_before} KiB -> {rss_after} KiB after {unknown} unknown keys");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// C7/C8. Brute force throttles the source, never the key
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c7_c8_brute_force_throttles_the_source_never_the_key() {
    let env = Env::new(Mode::Echo, "", 20, "").await;
    let victim = env.create(&[]);
    let gw = env.serve().await;
    let (attacker, bystander) = (localhost(2), localhost(3));
    let format = keygate::keys::format::KeyFormat::new("kg", &["live".into(), "test".into()]);
    let victim_auth = bearer(&victim.key);
    let valid = [("host", HOST), ("authorization", victim_auth.as_str())];

    // 200 well-formed guesses (valid checksum: each would cost an HMAC) from one source.
    let mut ka = KeepAlive::connect_from(attacker, gw.http).await;
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..200 {
        let auth = bearer(&format.generate("live").unwrap());
        let (st, h, _) = ka
            .get("/invoices/1", &[("host", HOST), ("authorization", &auth)])
            .await;
        if st == 429 {
            let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=60).contains(&retry), "retry-after {retry}");
        }
        statuses.push(st);
    }
    let n401 = statuses.iter().filter(|s| **s == 401).count();
    let n429 = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "C7: {n401} x 401 then {n429} x 429 in {:?}",
        started.elapsed()
    );
    assert!((20..=21).contains(&n401), "threshold 20/min: {n401} x 401");
    assert_eq!(n401 + n429, 200);
    assert!(
        statuses
            .iter()
            .skip_while(|s| **s == 401)
            .all(|s| *s == 429),
        "once blocked, always 429: {statuses:?}"
    );
    // Blocked guesses are not evaluated: the unknown-key counter stopped at the threshold.
    let unknown = metric(
        &gw,
        "keygate_auth_failures_total",
        &["reason=\"key_unknown\""],
    )
    .await;
    assert!(unknown <= 21.0, "{unknown} keys evaluated after the block");
    // The attacker's source is blocked even with the real key...
    assert_eq!(ka.get("/invoices/1", &valid).await.0, 429);
    // ...but the key is not locked out: other sources use it normally (C8), and the bystander
    // source is unaffected even for its own failures.
    assert_eq!(
        get_from(bystander, gw.http, "/invoices/1", &valid).await.0,
        200
    );
    assert_eq!(get(gw.http, "/invoices/1", &valid).await.0, 200);
    let junk = bearer(&format.generate("live").unwrap());
    assert_eq!(
        get_from(
            bystander,
            gw.http,
            "/invoices/1",
            &[("host", HOST), ("authorization", &junk)]
        )
        .await
        .0,
        401
    );
    assert_eq!(
        env.up.count(),
        2,
        "only the two real-key requests forwarded"
    );
}

// ---------------------------------------------------------------------------------------------
// D6/D7. IP allowlist behind proxies; method scopes and overrides
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d6_ip_allowlist_uses_the_peer_unless_the_proxy_is_trusted() {
    // Two gateways on one store: default (no trusted proxies) and one trusting 127.0.0.7.
    let env = Env::new(Mode::Echo, "", 100_000, "").await;
    let k = env.create(&["--allow-ip", "127.0.0.5/32"]);
    let trusting = write_file(
        env.dir.path(),
        "trusting.toml",
        &std::fs::read_to_string(&env.config).unwrap().replace(
            "drain_timeout_ms",
            "trusted_proxies = [\"127.0.0.7/32\"]\ndrain_timeout_ms",
        ),
    );
    let gw_default = env.serve().await;
    let gw_trusting = spawn_ready(&trusting, &[], POLL).await;
    let auth = bearer(&k.key);

    // (gateway, source, X-Forwarded-For, expected, client IP the upstream must see)
    let cases: &[(&str, u8, Option<&str>, u16, &str)] = &[
        ("default", 5, None, 200, "127.0.0.5"),
        ("default", 6, None, 403, ""),
        ("default", 6, Some("127.0.0.5"), 403, ""),
        ("default", 7, Some("127.0.0.5"), 403, ""),
        ("trusting", 5, None, 200, "127.0.0.5"),
        ("trusting", 6, Some("127.0.0.5"), 403, ""),
        ("trusting", 7, Some("127.0.0.5"), 200, "127.0.0.5"),
        ("trusting", 7, Some("127.0.0.6"), 403, ""),
        ("trusting", 7, None, 403, ""),
        ("trusting", 7, Some("127.0.0.5, 127.0.0.6"), 403, ""),
        (
            "trusting",
            7,
            Some("127.0.0.6, 127.0.0.5"),
            200,
            "127.0.0.5",
        ),
        (
            "trusting",
            7,
            Some("127.0.0.5, 127.0.0.7"),
            200,
            "127.0.0.5",
        ),
        ("trusting", 7, Some("not-an-ip"), 403, ""),
    ];
    let mut failures = Vec::new();
    for (which, src, xff, want, seen_as) in cases {
        let gw = if *which == "default" {
            &gw_default
        } else {
            &gw_trusting
        };
        let mut headers = vec![("host", HOST), ("authorization", auth.as_str())];
        if let Some(x) = xff {
            headers.push(("x-forwarded-for", *x));
        }
        let before = env.up.count();
        let (st, _, body) = get_from(localhost(*src), gw.http, "/invoices/d6", &headers).await;
        let forwarded = env.up.count() > before;
        let xff_seen = if forwarded {
            env.up.last().and_then(|r| r.header("x-forwarded-for"))
        } else {
            None
        };
        eprintln!("D6 {which} from .{src} xff {xff:?}: {st} upstream xff {xff_seen:?}");
        if st != *want
            || (st == 403 && !String::from_utf8_lossy(&body).contains("network_denied"))
            || (*want == 200 && xff_seen.as_deref() != Some(*seen_as))
        {
            failures.push(format!(
                "{which} from .{src} xff {xff:?}: want {want} (seen as {seen_as}), got {st} xff {xff_seen:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "D6:\n{}", failures.join("\n"));
}

/// (method, path, override header, expected status, method the upstream must see)
type D7Case = (
    Method,
    &'static str,
    Option<(&'static str, &'static str)>,
    u16,
    Option<&'static str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d7_method_scopes_overrides_and_head() {
    let tail = r#"
[[routes]]
name = "invoices-write"
path_prefix = "/invoices"
methods = ["POST", "PUT", "DELETE"]
scopes = ["invoices:write"]
upstream = "up"

[[routes]]
name = "get-only"
path_prefix = "/getonly"
methods = ["GET"]
upstream = "up"
"#;
    let env = Env::new(Mode::Echo, "", 100_000, tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    // (method, path, override header, expected status, method the upstream must see)
    let cases: &[D7Case] = &[
        (Method::GET, "/invoices/1", None, 200, Some("GET")),
        (Method::HEAD, "/invoices/1", None, 200, Some("HEAD")),
        (Method::POST, "/invoices/1", None, 403, None),
        (Method::DELETE, "/invoices/1", None, 403, None),
        (Method::PUT, "/invoices/1", None, 403, None),
        (
            Method::GET,
            "/invoices/1",
            Some(("X-HTTP-Method-Override", "DELETE")),
            200,
            Some("GET"),
        ),
        (
            Method::GET,
            "/invoices/1",
            Some(("X-HTTP-Method", "DELETE")),
            200,
            Some("GET"),
        ),
        (
            Method::GET,
            "/invoices/1",
            Some(("X-Method-Override", "PUT")),
            200,
            Some("GET"),
        ),
        (
            Method::POST,
            "/invoices/1",
            Some(("X-HTTP-Method-Override", "GET")),
            403,
            None,
        ),
        (Method::GET, "/getonly/x", None, 200, Some("GET")),
        (Method::HEAD, "/getonly/x", None, 405, None),
        (Method::OPTIONS, "/getonly/x", None, 405, None),
    ];
    let mut failures = Vec::new();
    for (method, path, over, want, up_method) in cases {
        let mut headers = vec![("host", HOST), ("authorization", auth.as_str())];
        if let Some(h) = over {
            headers.push(*h);
        }
        let before = env.up.count();
        let (st, h, _) = request(gw.http, method.clone(), path, &headers, "").await;
        let rec = (env.up.count() > before).then(|| env.up.last().unwrap());
        let line = format!(
            "{method} {path} {over:?}: {st}, upstream {:?}",
            rec.as_ref().map(|r| r.method.clone())
        );
        eprintln!("D7 {line}");
        let upstream_ok = match (up_method, &rec) {
            (None, None) => true,
            (Some(m), Some(r)) => {
                r.method == *m
                    && [
                        "x-http-method-override",
                        "x-http-method",
                        "x-method-override",
                    ]
                    .iter()
                    .all(|n| r.header(n).is_none())
            }
            _ => false,
        };
        if st != *want || !upstream_ok {
            failures.push(format!("want {want} / {up_method:?}; got {line}"));
        }
        if st == 405 {
            assert_eq!(
                h.get("allow").and_then(|v| v.to_str().ok()),
                Some("GET"),
                "{line}"
            );
        }
    }
    assert!(failures.is_empty(), "D7:\n{}", failures.join("\n"));
}

/// A request head with `method` as its request line gives it, `Connection: close`, and either
/// no body (served without hyper, `src/direct.rs`) or `body` with its `Content-Length` (hyper's).
fn raw_with_method(method: &str, path: &str, auth: &str, body: Option<&str>) -> Vec<u8> {
    let framing = body.map_or(String::new(), |b| {
        format!("Content-Length: {}\r\n", b.len())
    });
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {auth}\r\n{framing}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    )
    .into_bytes()
}

/// D7, a method in another case, and the `_method` query parameter. The config's methods are
/// uppercased; the request's were not, and `http::Method` makes `delete` an extension method
/// that no listed method equals, so `delete /invoices/1` skipped `invoices-write` (DELETE,
/// scope `invoices:write`), fell to `invoices-any` (any method, scope `invoices:read`) and
/// went upstream as sent, where case-insensitive routers (ASP.NET) run a DELETE. Now a
/// method that is not uppercase letters, `-` and `_` (nginx's rule) is a 400 problem+json
/// counted `bad_request`, whichever server path the request takes (a plain request:
/// `src/direct.rs`; one with a body: hyper). Laravel, Symfony and Express's method-override
/// take the method from a `_method` query parameter as they would from the override headers
/// (which are stripped, `d7_method_scopes_overrides_and_head`): a query naming it (as PHP and
/// `qs` decode names) is a 400 too; other names, and `_method` as a value, pass.
/// (method, target, body, expected status, method the upstream must see)
type MethodCase = (
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
    Option<&'static str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d7_odd_case_methods_and_query_method_overrides_are_refused() {
    let tail = r#"
[[routes]]
name = "invoices-write"
path_prefix = "/invoices"
methods = ["POST", "PUT", "DELETE"]
scopes = ["invoices:write"]
upstream = "up"

[[routes]]
name = "invoices-any"
path_prefix = "/invoices"
scopes = ["invoices:read"]
upstream = "up"
"#;
    let env = Env::new(Mode::Echo, "", 100_000, tail).await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let auth = bearer(&k.key);
    let cases: &[MethodCase] = &[
        ("delete", "/invoices/1", None, 400, None),
        ("delete", "/invoices/1", Some(""), 400, None),
        ("Delete", "/invoices/1", None, 400, None),
        ("dELETE", "/invoices/1", Some("a=1"), 400, None),
        ("get", "/invoices/1", None, 400, None),
        ("post", "/invoices/1", Some("a=1"), 400, None),
        ("head", "/invoices/1", None, 400, None),
        ("PURGE1", "/invoices/1", None, 400, None),
        ("DELETE", "/invoices/1", None, 403, None),
        ("DELETE", "/invoices/1", Some(""), 403, None),
        ("GET", "/invoices/1", None, 200, Some("GET")),
        ("PATCH", "/invoices/1", Some("a=1"), 200, Some("PATCH")),
        ("PURGE", "/invoices/1", None, 200, Some("PURGE")),
        ("M-SEARCH", "/invoices/1", None, 200, Some("M-SEARCH")),
        ("GET", "/invoices/1?_method=DELETE", None, 400, None),
        ("GET", "/invoices/1?_method=DELETE", Some(""), 400, None),
        (
            "POST",
            "/invoices/1?a=1&_method=PUT",
            Some("a=1"),
            400,
            None,
        ),
        ("GET", "/invoices/1?a=1;_method=PUT", None, 400, None),
        ("GET", "/invoices/1?%5Fmethod=PUT", None, 400, None),
        ("GET", "/invoices/1?_%6Dethod=PUT", None, 400, None),
        ("GET", "/invoices/1?.method=PUT", None, 400, None),
        ("GET", "/invoices/1?+_method=PUT", None, 400, None),
        ("GET", "/invoices/1?_method%5B%5D=PUT", None, 400, None),
        ("GET", "/invoices/1?_METHOD", None, 400, None),
        (
            "GET",
            "/invoices/1?my_method=PUT&x=_method&_methods=1",
            None,
            200,
            Some("GET"),
        ),
    ];
    let before = metric(&gw, "keygate_requests_total", &["outcome=\"bad_request\""]).await;
    let mut failures = Vec::new();
    let mut refused = 0.0;
    for (method, target, body, want, up_method) in cases {
        let ups = env.up.count();
        let out = raw_exchange(
            gw.http,
            &raw_with_method(method, target, &auth, *body),
            Duration::from_secs(5),
        )
        .await;
        let resps = out.responses();
        let r = resps.first();
        let status = r.map_or(0, |r| r.status);
        let rec = (env.up.count() > ups).then(|| env.up.last().unwrap());
        let line = format!(
            "{method} {target} (body {body:?}): {status} {}, upstream {:?}",
            r.map_or(String::new(), RawResponse::body_str),
            rec.as_ref()
                .map(|r| (r.method.clone(), r.path_and_query.clone()))
        );
        eprintln!("D7 {line}");
        let problem =
            r.and_then(|r| r.header("content-type")) == Some("application/problem+json".to_owned());
        let ok = match (up_method, &rec) {
            (None, None) => status == *want && problem,
            (Some(m), Some(rec)) => status == *want && rec.method == *m,
            _ => false,
        };
        if *want == 400 {
            refused += 1.0;
            if !r.is_some_and(|r| r.body_str().contains("\"code\":\"bad_request\"")) {
                failures.push(format!("want code bad_request; got {line}"));
            }
        }
        if !ok {
            failures.push(format!("want {want} / {up_method:?}; got {line}"));
        }
    }
    assert!(failures.is_empty(), "D7 methods:\n{}", failures.join("\n"));
    let after = metric(&gw, "keygate_requests_total", &["outcome=\"bad_request\""]).await;
    assert_eq!(after - before, refused, "each refusal counted bad_request");
}

// ---------------------------------------------------------------------------------------------
// E. Slow clients, floods, fd exhaustion
// ---------------------------------------------------------------------------------------------

/// A normal client looping GETs from `src` until `stop`: (latencies of 200s, other outcomes).
fn normal_client(
    src: IpAddr,
    addr: SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Duration>, Vec<String>)> {
    tokio::spawn(async move {
        let auth = bearer(&key);
        let mut lat = Vec::new();
        let mut bad = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && lat.len() < 100_000 {
            let t = Instant::now();
            // Fresh connection each time: accept must not be starved either.
            let out = raw_exchange_from(
                src,
                addr,
                &raw_get("/invoices/normal", &[("Authorization", &auth)], true),
                Duration::from_secs(5),
            )
            .await;
            match out.statuses().as_slice() {
                [200] => lat.push(t.elapsed()),
                other => bad.push(format!("{other:?} after {:?}", t.elapsed())),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (lat, bad)
    })
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Runs `slowhttptest` with `args` against the gateway while a normal client (127.0.0.2)
/// loops; checks the normal client stayed healthy and connections return to baseline.
async fn slowhttptest_run(name: &str, args: &[&str], path: &str) {
    let bin = require_tool("slowhttptest", "slowhttptest");
    let env = Env::new(
        Mode::Echo,
        "header_read_timeout_ms = 1000\nbody_timeout_ms = 2000",
        100_000,
        "[[routes]]\nname = \"upload\"\npath_prefix = \"/upload\"\nmethods = [\"POST\"]\nupstream = \"up\"\n",
    )
    .await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let fds_before = fd_count(gw.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let normal = normal_client(localhost(2), gw.http, k.key.clone(), stop.clone());
    let url = format!("http://{}{path}", gw.http);
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .args(["-u", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn slowhttptest");
    let pid = child.id();
    let started = Instant::now();
    // Bounded wait for slowhttptest (its own -l is shorter); kill it if it overruns.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let (lat, bad) = normal.await.unwrap();
    let text = metrics_text(&gw).await;
    eprintln!(
        "{name}: slowhttptest {status:?} after {:?}; normal client {} x 200, p99 {:?}, max {:?}, other {:?}; rejected conns {}",
        started.elapsed(),
        lat.len(),
        p99(lat.clone()),
        lat.iter().max(),
        bad,
        metric_in(&text, "keygate_connections_rejected_total", &[]),
    );
    assert!(
        lat.len() >= 20,
        "{name}: normal client starved: {}",
        lat.len()
    );
    assert!(bad.is_empty(), "{name}: normal client failures {bad:?}");
    assert!(
        p99(lat.clone()) < Duration::from_millis(1000),
        "{name}: p99 {:?}",
        p99(lat)
    );
    // The attack's connections are all gone again.
    eventually_named(
        "connections back to baseline",
        Duration::from_secs(10),
        || async {
            let open = metric(&gw, "keygate_connections_open", &["listener=\"http\""]).await;
            (open <= 1.0 && fd_count(gw.pid()) <= fds_before + 5).then_some(())
        },
    )
    .await;
    assert_eq!(
        env.up
            .records()
            .iter()
            .filter(|r| r.path_and_query != "/invoices/normal")
            .count(),
        0,
        "{name}: attack traffic reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e1_slowhttptest_slowloris_keeps_normal_traffic_healthy() {
    // 300 slow-header connections (over the per-IP cap of 256), 150/s, headers every 1 s.
    slowhttptest_run(
        "E1 slowloris",
        &[
            "-H", "-c", "300", "-r", "150", "-i", "1", "-l", "6", "-x", "16", "-p", "2",
        ],
        "/invoices/slow",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2_slowhttptest_slow_body_keeps_normal_traffic_healthy() {
    // 300 slow-body POSTs with a 8 KiB declared body, drip every 1 s.
    slowhttptest_run(
        "E2 slow body",
        &[
            "-B", "-c", "300", "-r", "150", "-i", "1", "-l", "6", "-s", "8192", "-x", "16", "-p",
            "2", "-t", "POST",
        ],
        "/upload/slow",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2_slow_authenticated_body_gets_408_and_frees_the_upstream() {
    let env = Env::new(
        Mode::Echo,
        "body_timeout_ms = 1000",
        20,
        "[[routes]]\nname = \"upload\"\npath_prefix = \"/upload\"\nmethods = [\"POST\"]\nupstream = \"up\"\n",
    )
    .await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let mut s = connect(None, gw.http, NET_TIMEOUT).await;
    let head = format!(
        "POST /upload/x HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {}\r\nContent-Length: 1000\r\n\r\n0123456789",
        k.key
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // Drip one byte every 100 ms (bounded: 40 bytes, 4 s) until the gateway answers.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..40 {
        if s.write_all(b"x").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&buf).into_owned();
    eprintln!(
        "E2 authenticated slow body: {:?} after {took:?}",
        text.lines().next()
    );
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The upstream connection that carried the partial body is released.
    eventually_named("upstream connection released", POLL, || async {
        (env.up.open_connections() == 0).then_some(())
    })
    .await;
    assert!(
        env.up.records().iter().all(|r| r.body.len() < 1000),
        "a partial body was passed off as complete"
    );
}

/// THREATS E3: a client that asks for a large response and never reads it. Its connection is
/// cut once a write to it has waited `send_timeout_ms`, and the upstream connection feeding
/// it is released; what the gateway holds meanwhile is bounded by the sockets' buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e3_a_client_that_never_reads_is_cut_and_frees_the_upstream() {
    let (up, ended, written) = endless_upstream().await;
    let dir = tempdir();
    let config = write_file(
        dir.path(),
        "keygate.toml",
        &config_text(up, "send_timeout_ms = 1000", 20, ""),
    );
    let k = create_key(&config, READ_SCOPE);
    let gw = spawn_ready(&config, &[], POLL).await;
    let mut s = connect(None, gw.http, NET_TIMEOUT).await;
    s.write_all(&raw_get("/invoices/big", &[("X-API-Key", &k.key)], false))
        .await
        .unwrap();
    let asked = Instant::now();
    // Without the send timeout nothing ends this (the upstream's response timeout is 5 s
    // and is not reached: the upstream never pauses, the relay does).
    eventually_named("the upstream released", Duration::from_secs(10), || async {
        (ended.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let took = asked.elapsed();
    let sent = written.load(Ordering::SeqCst);
    eprintln!(
        "E3: upstream released after {took:?}, {} MiB written",
        sent >> 20
    );
    assert!(
        took >= Duration::from_secs(1),
        "cut before the send timeout: {took:?}"
    );
    assert!(sent < 32 << 20, "the relay took in {sent} bytes of 64 MiB");
    assert_eq!(metric(&gw, "keygate_send_timeouts_total", &[]).await, 1.0);
    assert_eq!(metric(&gw, "keygate_requests_in_flight", &[]).await, 0.0);
    // The client finds the connection closed once it reads what was already in flight to it
    // (bounded: at most what the upstream wrote).
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(NET_TIMEOUT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the cut connection is still open after {got} bytes"),
        }
        assert!(got <= sent + 4096, "more came than the upstream wrote");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e6_flood_of_2000_connections_from_40_sources_caps_hold_and_recover() {
    const SOURCES: u8 = 40;
    const PER_SOURCE: usize = 50;
    let env = Env::new(
        Mode::Echo,
        "max_connections = 300\nmax_connections_per_ip = 10\nheader_read_timeout_ms = 20000",
        20,
        "",
    )
    .await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let pid = gw.pid();
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));
    let addr = gw.http;
    // Per-IP cap first, while the global cap has room: 20 from one source, 10 admitted.
    let mut probe = Vec::new();
    for _ in 0..20 {
        probe.push(connect(Some(localhost(9)), addr, NET_TIMEOUT).await);
    }
    let per_ip = eventually_named("per-IP rejections counted", POLL, || async {
        let v = metric(
            &gw,
            "keygate_connections_rejected_total",
            &["reason=\"per_ip\""],
        )
        .await;
        (v >= 10.0).then_some(v)
    })
    .await;
    assert_eq!(
        per_ip, 10.0,
        "exactly the 10 over the per-IP cap were rejected"
    );
    drop(probe);
    eventually_named("probe connections released", POLL, || async {
        (metric(&gw, "keygate_connections_open", &["listener=\"http\""]).await == 0.0).then_some(())
    })
    .await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..SOURCES)
        .map(|i| {
            tokio::spawn(async move {
                let src = localhost(10 + i);
                let mut held = Vec::new();
                for _ in 0..PER_SOURCE {
                    let sock = TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::new(src, 0)).unwrap();
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(3), sock.connect(addr)).await
                    {
                        held.push(s);
                    }
                }
                held
            })
        })
        .collect();
    let mut held: Vec<TcpStream> = Vec::new();
    for t in tasks {
        held.extend(t.await.unwrap());
    }
    eprintln!("E6: {} connections in {:?}", held.len(), started.elapsed());
    let text = eventually_named("rejections counted", POLL, || async {
        let text = metrics_text(&gw).await;
        let global = metric_in(
            &text,
            "keygate_connections_rejected_total",
            &["reason=\"global\""],
        );
        let per_ip = metric_in(
            &text,
            "keygate_connections_rejected_total",
            &["reason=\"per_ip\""],
        );
        (global + per_ip >= (held.len() as f64 - 300.0).max(1.0) * 0.9).then_some(text)
    })
    .await;
    let open = metric_in(&text, "keygate_connections_open", &["listener=\"http\""]);
    let global = metric_in(
        &text,
        "keygate_connections_rejected_total",
        &["reason=\"global\""],
    );
    let per_ip = metric_in(
        &text,
        "keygate_connections_rejected_total",
        &["reason=\"per_ip\""],
    );
    eprintln!(
        "E6: open {open}, rejected global {global} per_ip {per_ip}, fds {} (before {fds_before}), RSS {} KiB (before {rss_before})",
        fd_count(pid),
        rss_kib(pid)
    );
    assert!(open <= 300.0, "global cap: {open} open");
    assert!(global > 0.0, "global cap never applied");
    assert!(
        fd_count(pid) <= fds_before + 300 + 20,
        "fds {}",
        fd_count(pid)
    );
    // Recovery: once the flood is gone, a normal client is served and fds return.
    drop(held);
    let auth = bearer(&k.key);
    eventually_named("served after the flood", POLL, || async {
        let out = raw_exchange_from(
            localhost(3),
            addr,
            &raw_get("/invoices/after", &[("Authorization", &auth)], true),
            Duration::from_secs(2),
        )
        .await;
        (out.statuses() == [200]).then_some(())
    })
    .await;
    eventually_named("fds back to baseline", POLL, || async {
        (fd_count(pid) <= fds_before + 10).then_some(())
    })
    .await;
    assert!(
        rss_kib(pid) < rss_before + 64 * 1024,
        "RSS {}",
        rss_kib(pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e7_fd_exhaustion_backs_off_without_spinning_and_recovers() {
    const LIMIT: usize = 64;
    const CONNS: usize = 80;
    let env = Env::new(Mode::Echo, "header_read_timeout_ms = 30000", 20, "").await;
    let k = env.create(&[]);
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -n {LIMIT} && exec \"$0\" serve --config \"$1\""
        ))
        .arg(keygate_bin())
        .arg(&env.config)
        .env(SECRET_VAR, SECRET);
    let mut gw = Gateway::spawn_command(cmd, &env.dir.path().join("gateway.stderr.log"))
        .await
        .expect("gateway under ulimit -n 64 starts");
    wait_ready(&gw, POLL).await;
    let pid = gw.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(&LIMIT.to_string())),
        "{limits}"
    );
    let mut held = Vec::new();
    for _ in 0..CONNS {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(gw.http)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    // Let the accept loop hit EMFILE, then measure its CPU over 2 s.
    eventually_named("fd table full", POLL, || async {
        (fd_count(pid) >= LIMIT - 2).then_some(())
    })
    .await;
    let hz = clock_ticks_per_sec();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await; // a measurement window, not synchronisation
    let used = (cpu_ticks(pid) - c0) as f64 / hz as f64;
    let share = used / t0.elapsed().as_secs_f64();
    eprintln!(
        "E7: {} connections held, fds {}, CPU {:.0}% over {:?}",
        held.len(),
        fd_count(pid),
        share * 100.0,
        t0.elapsed()
    );
    assert!(gw.try_exit().is_none(), "gateway died under EMFILE");
    assert!(share < 0.5, "accept loop spins: {:.0}% CPU", share * 100.0);
    // Recovers once the connections close.
    drop(held);
    let auth = bearer(&k.key);
    eventually_named(
        "served again after EMFILE",
        Duration::from_secs(15),
        || async {
            let out = raw_exchange(
                gw.http,
                &raw_get("/invoices/after", &[("Authorization", &auth)], true),
                Duration::from_secs(2),
            )
            .await;
            (out.statuses() == [200]).then_some(())
        },
    )
    .await;
    assert!(gw.try_exit().is_none());
    let stderr = gw.stderr_contents();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// I12 + G3. Reload race under load; rate-limit state survives reloads
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i12_g3_100_reloads_under_load_never_5xx_or_mix_tables() {
    const RELOADS: u64 = 100;
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let variant = |n: u64| {
        config_text(
            up.addr(),
            "",
            100_000,
            &format!(
                "[plans.tight]\nrate = \"1/h\"\nburst = 2\n\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra-{}\"\nupstream = \"up\"\n",
                n % 2
            ),
        )
    };
    let config = write_file(dir.path(), "keygate.toml", &variant(0));
    let good = create_key(&config, READ_SCOPE);
    let revoked = create_key(&config, READ_SCOPE);
    let tight = create_key(&config, &[READ_SCOPE, &["--plan", "tight"]].concat());
    cli_ok(&config, &["keys", "revoke", &revoked.id]);
    let gw = spawn_ready(&config, &[], POLL).await;
    // G3: the tight key spends its burst before the reloads.
    let tight_auth = bearer(&tight.key);
    let tight_h = [("host", HOST), ("authorization", tight_auth.as_str())];
    assert_eq!(get(gw.http, "/invoices/1", &tight_h).await.0, 200);
    assert_eq!(get(gw.http, "/invoices/1", &tight_h).await.0, 200);
    assert_eq!(get(gw.http, "/invoices/1", &tight_h).await.0, 429);
    let rss_before = rss_kib(gw.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let mismatches = Arc::new(Mutex::new(Vec::<String>::new()));
    let addr = gw.http;
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, mismatches) = (stop.clone(), mismatches.clone());
            let (good, revoked) = (bearer(&good.key), bearer(&revoked.key));
            tokio::spawn(async move {
                let mut ka = KeepAlive::connect(addr).await;
                let mut n = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 200_000 {
                    for (auth, want) in [(&good, 200u16), (&revoked, 401)] {
                        let (st, _, body) = ka
                            .get("/invoices/1", &[("host", HOST), ("authorization", auth)])
                            .await;
                        n += 1;
                        if st != want {
                            mismatches.lock().unwrap().push(format!(
                                "want {want} got {st}: {}",
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    }
                }
                n
            })
        })
        .collect();
    let started = Instant::now();
    for i in 1..=RELOADS {
        let tmp = dir.path().join("keygate.toml.tmp");
        std::fs::write(&tmp, variant(i)).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        gw.sighup();
        let admin = gw.admin;
        eventually_named("reload applied", POLL, || async move {
            let (_, _, b) = get(admin, "/metrics", &[]).await;
            let text = String::from_utf8_lossy(&b).into_owned();
            let ok = metric_in(&text, "keygate_config_reloads_total", &["result=\"ok\""]);
            assert_eq!(
                metric_in(&text, "keygate_config_reloads_total", &["result=\"error\""]),
                0.0
            );
            (ok >= i as f64).then_some(())
        })
        .await;
    }
    let reload_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut requests = 0;
    for c in clients {
        requests += c.await.unwrap();
    }
    let mismatches = mismatches.lock().unwrap().clone();
    let rss_after = rss_kib(gw.pid());
    eprintln!(
        "I12: {RELOADS} reloads in {reload_time:?} with {requests} requests; {} mismatches; RSS {rss_before} -> {rss_after} KiB",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{:?}",
        &mismatches[..mismatches.len().min(10)]
    );
    assert!(requests > 2 * RELOADS, "too little load: {requests}");
    // Exactly the last config is live: /extra-0 routes (RELOADS is even), /extra-1 does not.
    let good_auth = bearer(&good.key);
    let good_h = [("host", HOST), ("authorization", good_auth.as_str())];
    assert_eq!(get(gw.http, "/extra-0/x", &good_h).await.0, 200);
    assert_eq!(get(gw.http, "/extra-1/x", &good_h).await.0, 404);
    // G3: 100 reloads refilled nobody's bucket.
    assert_eq!(get(gw.http, "/invoices/1", &tight_h).await.0, 429);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "old snapshots not freed? RSS {rss_before} -> {rss_after} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// K2. SIGTERM under load
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    /// Connection refused: the listener is gone.
    Refused,
    /// Accepted, then closed without a single response byte.
    Nothing,
    /// One complete response with this status.
    Complete(u16),
    /// Anything else: a half response.
    Partial(String),
}

async fn one_request(addr: SocketAddr, bytes: &[u8]) -> Got {
    let mut s = match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Got::Refused,
        Err(_) => return Got::Partial("connect timed out".into()),
    };
    let out = exchange_on(
        &mut s,
        bytes,
        &RawOpts {
            timeout: Duration::from_secs(8),
            ..RawOpts::default()
        },
    )
    .await;
    let resps = out.responses();
    match resps.as_slice() {
        [] if out.bytes.is_empty() && out.closed() => Got::Nothing,
        [r] if r.complete && out.closed() => Got::Complete(r.status),
        _ => Got::Partial(format!("closed {} {:?}", out.closed(), out.text())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k2_sigterm_under_load_never_half_answers_and_exits_zero() {
    const CLIENTS: usize = 8;
    let env = Env::new(Mode::Slow(Duration::from_millis(300)), "", 20, "").await;
    let k = env.create(&[]);
    let mut gw = env.serve().await;
    let addr = gw.http;
    let signalled: Arc<Mutex<Option<Instant>>> = Arc::default();
    let bytes = raw_get("/invoices/k2", &[("Authorization", &bearer(&k.key))], true);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (bytes, signalled) = (bytes.clone(), signalled.clone());
            tokio::spawn(async move {
                let mut log = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline && log.len() < 1000 {
                    let got = one_request(addr, &bytes).await;
                    let after = signalled.lock().unwrap().is_some();
                    let refused = got == Got::Refused;
                    log.push((got, after));
                    if refused {
                        break;
                    }
                }
                log
            })
        })
        .collect();
    eventually_named("load running", POLL, || async {
        (env.up.count() >= 2 * CLIENTS).then_some(())
    })
    .await;
    *signalled.lock().unwrap() = Some(Instant::now());
    gw.sigterm();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            within("client loop", Duration::from_secs(40), t)
                .await
                .unwrap(),
        );
    }
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    let partial: Vec<_> = all
        .iter()
        .filter(|(g, _)| matches!(g, Got::Partial(_)))
        .collect();
    let drained = all
        .iter()
        .filter(|(g, after)| *after && *g == Got::Complete(200))
        .count();
    let other: Vec<_> = all
        .iter()
        .filter(|(g, _)| matches!(g, Got::Complete(s) if *s != 200))
        .collect();
    eprintln!(
        "K2: {} exchanges, {drained} completed after the signal, {} refused/closed, exit {status:?}",
        all.len(),
        all.iter()
            .filter(|(g, _)| matches!(g, Got::Refused | Got::Nothing))
            .count()
    );
    assert!(partial.is_empty(), "half responses: {partial:?}");
    assert!(other.is_empty(), "non-200 answers: {other:?}");
    assert!(drained >= 1, "in-flight requests were not drained");
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        gw.stderr_contents()
    );
}

/// Lame duck: after SIGTERM `/readyz` is 503 at once, while a client that keeps opening new
/// connections is never refused before `shutdown_delay_ms` has passed; only then do the
/// listeners close and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k2_sigterm_lame_duck_refuses_nothing_before_the_delay() {
    const DELAY: Duration = Duration::from_millis(1500);
    let env = Env::new(Mode::Echo, "shutdown_delay_ms = 1500", 20, "").await;
    let k = env.create(&[]);
    let mut gw = env.serve().await;
    let addr = gw.http;
    let bytes = raw_get(
        "/invoices/lame",
        &[("Authorization", &bearer(&k.key))],
        true,
    );
    let signalled: Arc<Mutex<Option<Instant>>> = Arc::default();
    let client = {
        let signalled = signalled.clone();
        tokio::spawn(async move {
            // (outcome, time since the signal) per connection, until the first refusal.
            let mut log: Vec<(Got, Option<Duration>)> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && log.len() < 100_000 {
                let got = one_request(addr, &bytes).await;
                let since = signalled.lock().unwrap().map(|t| t.elapsed());
                let refused = got == Got::Refused;
                log.push((got, since));
                if refused {
                    break;
                }
            }
            log
        })
    };
    eventually_named("client running", POLL, || async {
        (env.up.count() >= 5).then_some(())
    })
    .await;
    *signalled.lock().unwrap() = Some(Instant::now());
    gw.sigterm();
    eventually_named("readyz 503 after SIGTERM", POLL, || async {
        (get(gw.admin, "/readyz", &[]).await.0 == 503).then_some(())
    })
    .await;
    let served_while_unready = env.up.count();
    let log = within("client loop", Duration::from_secs(40), client)
        .await
        .unwrap();
    let status = gw.wait_exit(POLL).await;
    let early: Vec<_> = log
        .iter()
        .filter(|(g, since)| *g != Got::Complete(200) && since.is_none_or(|d| d < DELAY))
        .collect();
    let after_signal = log.iter().filter(|(_, since)| since.is_some()).count();
    eprintln!(
        "lame duck: {} connections, {after_signal} after the signal, last {:?}",
        log.len(),
        log.last()
    );
    assert!(
        early.is_empty(),
        "refused or failed before the delay ended: {early:?}"
    );
    assert!(
        env.up.count() > served_while_unready,
        "requests were served after readyz turned 503"
    );
    assert!(
        matches!(log.last(), Some((Got::Refused | Got::Nothing, Some(d))) if *d >= DELAY),
        "listener closed after the delay: {:?}",
        log.last()
    );
    assert!(
        status.success(),
        "exit {status:?}\n{}",
        gw.stderr_contents()
    );
}

// ---------------------------------------------------------------------------------------------
// K3. A panic inside a request task (feature `test-panic`: `src/fault.rs`)
// ---------------------------------------------------------------------------------------------

/// Built with the `test-panic` feature only (`ci/test` runs `cargo test --all-features`): the
/// binary then panics on a request carrying `x-keygate-test-panic` once it is authenticated.
#[cfg(feature = "test-panic")]
mod k3 {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use sha2::Digest as _;

    /// The field that asks the gateway to panic (`keygate::fault::HEADER`).
    const PANIC: (&str, &str) = ("x-keygate-test-panic", "1");
    /// What the panic says (`keygate::fault::panic_if_asked`).
    const PANIC_MESSAGE: &str = "test-panic: a request asked for a panic";

    /// An upstream that holds every request it reads until `open` says true: a request parked
    /// in flight in the gateway while others panic beside it.
    struct Gate {
        addr: SocketAddr,
        arrived: Arc<AtomicUsize>,
        open: tokio::sync::watch::Sender<bool>,
        accept: tokio::task::AbortHandle,
    }

    impl Gate {
        async fn start() -> Gate {
            let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
            let addr = l.local_addr().unwrap();
            let arrived = Arc::new(AtomicUsize::new(0));
            let (open, opened) = tokio::sync::watch::channel(false);
            let seen = arrived.clone();
            let accept = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let (seen, mut opened) = (seen.clone(), opened.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut chunk = [0u8; 4096];
                        // One request head, bounded in size and time.
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                            match tokio::time::timeout(NET_TIMEOUT, s.read(&mut chunk)).await {
                                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        seen.fetch_add(1, Ordering::SeqCst);
                        let wait = tokio::time::timeout(POLL, opened.wait_for(|o| *o)).await;
                        if matches!(wait.map(|w| w.is_ok()), Ok(true)) {
                            let reply = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nparked";
                            let _ = s.write_all(reply.as_bytes()).await;
                            let _ = s.shutdown().await;
                        }
                    });
                }
            })
            .abort_handle();
            Gate {
                addr,
                arrived,
                open,
                accept,
            }
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    /// One HTTP/2 connection (h2c, prior knowledge), kept open across requests.
    struct H2 {
        sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        conn: tokio::task::JoinHandle<()>,
        addr: SocketAddr,
    }

    impl H2 {
        async fn connect(addr: SocketAddr) -> H2 {
            let stream = connect(None, addr, NET_TIMEOUT).await;
            let (sender, conn) = within(
                "h2 handshake",
                NET_TIMEOUT,
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)),
            )
            .await
            .expect("h2 handshake");
            let conn = tokio::spawn(async move {
                let _ = conn.await;
            });
            H2 { sender, conn, addr }
        }

        /// GET `path` on this connection: the status, or how the stream ended (hyper's error,
        /// debug-formatted: a reset shows as `Reset(StreamId(..), REASON, Remote)`). A hang
        /// fails the test.
        async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
            let mut b = http::Request::builder().uri(format!("http://{}{path}", self.addr));
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let req = b.body(Full::new(Bytes::new())).unwrap();
            let sender = &mut self.sender;
            within("h2 request", NET_TIMEOUT, async move {
                sender.ready().await.map_err(|e| format!("{e:?}"))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let status = resp.status().as_u16();
                resp.into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                Ok(status)
            })
            .await
        }
    }

    impl Drop for H2 {
        fn drop(&mut self) {
            self.conn.abort();
        }
    }

    /// Polls until `keygate_requests_in_flight` is `in_flight` and the plain listener's
    /// `keygate_connections_open` is `open`; fails naming every value seen meanwhile (the last
    /// ones may be later than the failure: idle connections close at the header timeout).
    async fn settle(gw: &Gateway, what: &str, in_flight: f64, open: f64) {
        let deadline = Instant::now() + POLL;
        let mut seen = Vec::new();
        loop {
            let text = metrics_text(gw).await;
            let now = (
                metric_in(&text, "keygate_requests_in_flight", &[]),
                metric_in(&text, "keygate_connections_open", &["listener=\"http\""]),
            );
            if now == (in_flight, open) {
                return;
            }
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: (requests in flight, connections open) expected {:?}, seen {seen:?}",
                (in_flight, open)
            );
            // Polling a gauge with a deadline, not synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// THREATS K3: a request that panics once authenticated, served without hyper (plain
    /// HTTP/1, `direct`), by hyper (HTTP/1 with a body, `keepalive`'s cycles) and as an
    /// HTTP/2 stream, fails alone and at once, answered 500 problem+json `internal_error`
    /// (`unwind`), counted in `keygate_requests_total` and in an access line like any other
    /// refusal; the HTTP/2 connection serves its next stream. Connections opened
    /// before (one with a request parked upstream, in flight on the same single worker while
    /// the panics unwind) and after are served, the process lives, and every guard comes back:
    /// requests in flight, the open-connections gauge, the per-IP cap's slots. The panics'
    /// reports on stderr (trace logging, backtraces) hold no key material (C2).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn k3_a_panicking_request_fails_alone_and_its_guards_come_back() {
        const PER_IP: usize = 8;
        let gate = Gate::start().await;
        let tail = format!(
            "[[upstreams]]\nname = \"parked\"\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"parked\"\npath_prefix = \"/parked\"\nmethods = [\"GET\"]\nscopes = [\"invoices:read\"]\nupstream = \"parked\"\n",
            gate.addr
        );
        // One worker: the panics unwind on the runtime that serves every bystander too.
        let server = format!("workers = 1\nmax_connections_per_ip = {PER_IP}");
        let env = Env::new(Mode::Echo, &server, 20, &tail).await;
        let k = env.create(&[]);
        let mut gw = spawn_ready(
            &env.config,
            &[("KEYGATE_LOG", "trace"), ("RUST_BACKTRACE", "1")],
            POLL,
        )
        .await;
        let addr = gw.http;
        let auth = bearer(&k.key);
        let key = [("authorization", auth.as_str())];
        let panic = [("authorization", auth.as_str()), PANIC];

        // Bystanders, opened before the panics: an HTTP/1 connection, an HTTP/2 one, and a
        // request parked upstream.
        let mut h1 = KeepAlive::connect(addr).await;
        assert_eq!(h1.get("/invoices/before", &key).await.0, 200);
        let mut h2 = H2::connect(addr).await;
        assert_eq!(h2.get("/invoices/before", &key).await, Ok(200));
        let parked = {
            let auth = auth.clone();
            tokio::spawn(async move {
                let mut c = KeepAlive::connect(addr).await;
                c.get("/parked/1", &[("authorization", &auth)]).await
            })
        };
        eventually_named("a request parked upstream", POLL, || async {
            (gate.arrived.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        settle(&gw, "before the panics", 1.0, 3.0).await;

        // Plain HTTP/1, served without hyper.
        let started = Instant::now();
        let (plain, headers, body) = get(addr, "/invoices/panic-plain", &panic).await;
        // HTTP/1 with a body: hyper's.
        let mut bodied = raw_get(
            "/invoices/panic-hyper",
            &[panic[0], panic[1], ("content-length", "5")],
            true,
        );
        bodied.extend_from_slice(b"hello");
        let hyper_h1 = one_request(addr, &bodied).await;
        // HTTP/2: a 500 on the stream, and its connection serves the next one.
        let mut h2p = H2::connect(addr).await;
        let on_h2 = h2p.get("/invoices/panic-h2", &panic).await;
        let after = h2p.get("/invoices/after-the-panic", &key).await;
        eprintln!(
            "K3: plain HTTP/1 {plain}, HTTP/1 by hyper {hyper_h1:?}, HTTP/2 {on_h2:?} then {after:?}, in {:?}",
            started.elapsed()
        );
        assert_eq!(plain, 500, "plain HTTP/1");
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/problem+json"[..])
        );
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "internal_error", "{problem}");
        assert_eq!(hyper_h1, Got::Complete(500), "HTTP/1 through hyper");
        assert_eq!(on_h2, Ok(500), "HTTP/2 stream");
        assert_eq!(after, Ok(200), "HTTP/2 connection after the panic");

        // The bystanders serve on; the panicking requests gave their slots back while the
        // parked one still holds its own.
        assert_eq!(h1.get("/invoices/after", &key).await.0, 200);
        assert!(!h1.is_closed(), "the HTTP/1 bystander was closed");
        assert_eq!(h2.get("/invoices/after", &key).await, Ok(200));
        // Open: h1, h2, h2p and the parked request's connection.
        settle(&gw, "after the panics", 1.0, 4.0).await;
        gate.open.send_replace(true);
        let (status, _, body) = within("the parked request", NET_TIMEOUT, parked)
            .await
            .unwrap();
        assert_eq!((status, &body[..]), (200, &b"parked"[..]));
        settle(&gw, "after the parked request", 0.0, 3.0).await;

        // Every per-IP slot but the three held is free: that many new connections, open at
        // once, are all served.
        let mut fresh = Vec::new();
        for _ in 0..PER_IP - 3 {
            fresh.push(KeepAlive::connect(addr).await);
        }
        for (i, c) in fresh.iter_mut().enumerate() {
            let req = build_request(
                Method::GET,
                addr,
                &format!("/invoices/fresh-{i}"),
                &key,
                Bytes::new(),
            );
            assert_eq!(c.try_send(req).await.map(|r| r.0), Ok(200), "fresh #{i}");
        }
        let text = metrics_text(&gw).await;
        assert_eq!(
            metric_in(&text, "keygate_connections_rejected_total", &[]),
            0.0
        );
        drop(fresh);

        // The process lives.
        assert!(gw.try_exit().is_none(), "the gateway exited");
        assert_eq!(get(gw.admin, "/healthz", &[]).await.0, 200);
        let forwarded: Vec<String> = env
            .up
            .records()
            .into_iter()
            .map(|r| r.path_and_query)
            .filter(|p| p.starts_with("/invoices/panic"))
            .collect();
        assert!(forwarded.is_empty(), "forwarded: {forwarded:?}");

        // Each counted and logged as the 500 it was answered with, and one report per panic,
        // with no key material in it (nor anywhere on stderr).
        assert_eq!(
            metric_in(
                &text,
                "keygate_requests_total",
                &["outcome=\"internal_error\""]
            ),
            3.0
        );
        let access_500 = |text: &str| {
            text.lines()
                .filter(|l| l.contains(" status=500 ") && l.contains("outcome=\"internal_error\""))
                .count()
        };
        let stderr = eventually_named("three panics reported and logged", POLL, || async {
            let text = gw.stderr_contents();
            (text.matches(PANIC_MESSAGE).count() >= 3 && access_500(&text) >= 3).then_some(text)
        })
        .await;
        assert_eq!(stderr.matches(PANIC_MESSAGE).count(), 3, "panic reports");
        assert_eq!(access_500(&stderr), 3, "access lines");
        let hasher = keygate::keys::digest::Hasher::new(vec![(1, SECRET.as_bytes().to_vec())]);
        let sha256: String = sha2::Sha256::digest(k.key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (what, text) in [
            ("key", k.key.as_str()),
            ("key's last 16 characters", &k.key[k.key.len() - 16..]),
            ("key's digest", hasher.digest(&k.key).1.to_hex().as_str()),
            ("key's SHA-256", sha256.as_str()),
            ("hash secret", SECRET),
        ] {
            assert!(!stderr.contains(text), "{what} on stderr");
        }
        gw.assert_not_logged(&k.key);
    }
}

// ---------------------------------------------------------------------------------------------
// A4–A8, A13. Malformed request framing (not covered in protocol.rs)
// ---------------------------------------------------------------------------------------------

/// What a malformed-framing row must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Refused before anything is forwarded: 400/501 (or 431), then close.
    Refused,
    /// The head may already be forwarded, but the body is refused: no 2xx, the connection
    /// ends, and the upstream never receives the declared body as complete.
    BodyRefused,
    /// Recorded behaviour: refused as above, or accepted with one unambiguous framing (the
    /// exact body forwarded once, with a single matching Content-Length).
    RefusedOrExact,
    /// Refused, or forwarded once without the body (a request has no close-delimited body).
    RefusedOrIgnored,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a4_a8_a13_malformed_request_framing_is_refused() {
    let env = Env::new(
        Mode::Echo,
        "",
        100_000,
        "[[routes]]\nname = \"upload\"\npath_prefix = \"/upload\"\nmethods = [\"POST\"]\nupstream = \"up\"\n",
    )
    .await;
    let k = env.create(&[]);
    let gw = env.serve().await;
    let key = k.key.clone();
    let post = |extra: &str, body: &str| -> Vec<u8> {
        format!("POST /upload/a HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\nConnection: close\r\n{extra}\r\n{body}")
            .into_bytes()
    };
    let big_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024));
    let cases: Vec<(&str, Vec<u8>, Frame)> = vec![
        // A4: Content-Length values.
        ("CL +5", post("Content-Length: +5\r\n", "hello"), Frame::Refused),
        ("CL 5 5", post("Content-Length: 5 5\r\n", "hello"), Frame::Refused),
        ("CL 0x5", post("Content-Length: 0x5\r\n", "hello"), Frame::Refused),
        ("CL -1", post("Content-Length: -1\r\n", "hello"), Frame::Refused),
        ("CL 2^64", post("Content-Length: 18446744073709551616\r\n", "hello"), Frame::Refused),
        ("CL 5,5", post("Content-Length: 5,5\r\n", "hello"), Frame::RefusedOrExact),
        ("CL OWS", post("Content-Length:  5 \r\n", "hello"), Frame::RefusedOrExact),
        // A5: Transfer-Encoding variants.
        ("TE xchunked", post("Transfer-Encoding: xchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), Frame::Refused),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", "5\r\nhello\r\n0\r\n\r\n"), Frame::Refused),
        ("TE gzip", post("Transfer-Encoding: gzip\r\n", "hello"), Frame::Refused),
        ("TE space before colon", post("Transfer-Encoding : chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), Frame::Refused),
        ("TE tab chunked", post("Transfer-Encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), Frame::RefusedOrExact),
        ("TE twice", post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), Frame::Refused),
        (
            "TE on HTTP/1.0",
            format!("POST /upload/a HTTP/1.0\r\nHost: {HOST}\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").into_bytes(),
            Frame::Refused,
        ),
        // A6: chunk sizes and lines.
        ("chunk size overflow", post("Transfer-Encoding: chunked\r\n", "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), Frame::BodyRefused),
        ("huge chunk extension", post("Transfer-Encoding: chunked\r\n", &big_ext), Frame::BodyRefused),
        ("bare LF chunk line", post("Transfer-Encoding: chunked\r\n", "5\nhello\r\n0\r\n\r\n"), Frame::BodyRefused),
        // A7: obs-fold.
        ("obs-fold key", format!("GET /invoices/a HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: kg_live_x\r\n {key}\r\nConnection: close\r\n\r\n").into_bytes(), Frame::Refused),
        // A8: bare CR, NUL, whitespace before the colon.
        ("bare CR in value", format!("GET /invoices/a HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\nX-A: a\rb\r\nConnection: close\r\n\r\n").into_bytes(), Frame::Refused),
        ("NUL in value", format!("GET /invoices/a HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {key}\r\nX-A: a\0b\r\nConnection: close\r\n\r\n").into_bytes(), Frame::Refused),
        ("space before colon", format!("GET /invoices/a HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key : {key}\r\nConnection: close\r\n\r\n").into_bytes(), Frame::Refused),
        // A13: HTTP/1.0 POST with a close-delimited body.
        (
            "HTTP/1.0 body without CL",
            format!("POST /upload/a HTTP/1.0\r\nHost: {HOST}\r\nX-API-Key: {key}\r\n\r\nhello").into_bytes(),
            Frame::RefusedOrIgnored,
        ),
    ];
    // Each row's request carries its own query tag, and only records with that tag count
    // for it: a row whose head was forwarded before its body was refused is recorded by
    // the upstream when that connection ends, which can be after the next row has begun.
    let tag = |row: usize| format!("?row={row}");
    let tagged = |row: usize, bytes: &[u8]| -> Vec<u8> {
        let text = String::from_utf8_lossy(bytes);
        let (line, rest) = text.split_once(" HTTP/").expect("request line");
        format!("{line}{} HTTP/{rest}", tag(row)).into_bytes()
    };
    let mut failures = Vec::new();
    for (row, (name, bytes, want)) in cases.iter().enumerate() {
        let out =
            raw_exchange_opts(gw.http, &tagged(row, bytes), Duration::from_secs(5), false).await;
        let st = out.statuses();
        let recs: Vec<_> = env
            .up
            .records()
            .into_iter()
            .filter(|r| r.path_and_query.ends_with(&tag(row)))
            .collect();
        let first = st.first().copied();
        let exact = recs.len() == 1
            && recs[0].body == b"hello"
            && recs[0]
                .header_all("content-length")
                .iter()
                .all(|v| v == "5")
            && first == Some(200);
        let ignored = recs.len() == 1 && recs[0].body.is_empty() && first == Some(200);
        let refused = matches!(first, Some(400 | 501 | 431 | 413)) && recs.is_empty();
        let body_refused = !first.is_some_and(|s| (200..300).contains(&s))
            && out.closed()
            && recs.iter().all(|r| r.body != b"hello");
        let line = format!(
            "{name}: statuses {st:?} closed {} upstream {:?}",
            out.closed(),
            recs.iter()
                .map(|r| (r.path_and_query.clone(), r.body.len()))
                .collect::<Vec<_>>()
        );
        eprintln!("A {line}");
        let ok = match want {
            Frame::Refused => refused && out.closed(),
            Frame::BodyRefused => body_refused,
            Frame::RefusedOrExact => (refused && out.closed()) || exact,
            Frame::RefusedOrIgnored => (refused && out.closed()) || ignored,
        };
        if !ok {
            failures.push(format!("want {want:?}; {line}"));
        }
    }
    assert!(failures.is_empty(), "A-rows:\n{}", failures.join("\n"));
    assert_eq!(
        get(
            gw.http,
            "/invoices/1",
            &[("host", HOST), ("x-api-key", &k.key)]
        )
        .await
        .0,
        200
    );
    // Records that arrived after their row was judged: none may belong to a row refused
    // before forwarding.
    let late: Vec<_> = env
        .up
        .records()
        .into_iter()
        .filter(|r| {
            cases.iter().enumerate().any(|(row, (_, _, want))| {
                matches!(want, Frame::Refused) && r.path_and_query.ends_with(&tag(row))
            })
        })
        .map(|r| r.path_and_query)
        .collect();
    assert!(
        late.is_empty(),
        "refused rows reached the upstream: {late:?}"
    );
}
