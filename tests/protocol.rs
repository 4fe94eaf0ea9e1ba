//! Hostile-input tests of `keygate serve` at the HTTP protocol layer (THREATS A, B, C5, D, E):
//! request smuggling and framing, header abuse, path and host confusion, slow clients and
//! connection caps. Every test drives the real binary over loopback with byte-exact requests
//! and checks three things per case: the status the client got, whether the gateway closed
//! the connection, and exactly what the recording upstream ("stub") received.
//!
//! What hyper 1.12 itself does with each A-row (recorded here because the gateway relies on
//! it; see `hyper/src/proto/h1/role.rs`, `Server::parse`):
//! - A1 CL.TE / A2 TE.CL: accepted. Transfer-Encoding wins, the Content-Length header is
//!   removed from the parsed head (whatever the order), and keep-alive is switched off, so
//!   the connection closes after the one response and the bytes after the chunked body are
//!   never parsed as a request.
//! - A3 differing duplicate Content-Length: rejected by hyper with 400 and close. Equal
//!   duplicates (5/5) are accepted and collapsed into ONE header before the gateway sees the
//!   request (so the gateway cannot refuse them as THREATS [R] suggests); the body is framed
//!   once with that single length and forwarded with one Content-Length: no desync.
//! - A9 GET without CL/TE: body length 0; trailing bytes are the next pipelined request and
//!   are authenticated on their own.
//! - A10 early 401 with an unread body: hyper drains what is already buffered; if the whole
//!   body was drained the connection stays usable, otherwise it closes the read side and
//!   the connection ends after the 401. The body is never parsed as a request.
//! - A11 `Expect: 100-continue`: hyper only sends `100 Continue` when the body is polled;
//!   the gateway never polls it on a 401, and hyper skips the 100 when draining.
//! - A12 `Upgrade`: hyper notes the wish but only switches protocols on a 101 response,
//!   which the gateway never sends (an upstream 101 is a 502).
//! - A14: CONNECT is parsed by hyper and refused by the gateway (405); an absolute-form
//!   target whose authority differs from Host is refused by the gateway (400); an over-long
//!   request line is refused by hyper with 431 (head larger than `max_buf_size`) and close;
//!   `OPTIONS *` is parsed by hyper and refused by the gateway (400 `bad_path`); two spaces
//!   between the parts of the request line are refused by hyper (400, empty body) and close.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A key-shaped value that is not a valid key.
const INVALID_KEY: &str = "kg_live_notavalidkey0000000000000000000000000";
/// Bound for one raw exchange where the gateway is expected to close or answer.
const EXCHANGE: Duration = Duration::from_secs(5);

/// Routes used by most tests: a key scoped to `public` may use `/v1/public` only.
const ROUTES: &str = r#"
[[routes]]
name = "public"
path_prefix = "/v1/public"
scopes = ["public"]
upstream = "up"

[[routes]]
name = "admin"
path_prefix = "/v1/admin"
scopes = ["admin"]
upstream = "up"
"#;

struct Env {
    _dir: tempfile::TempDir,
    gw: Gateway,
    up: Upstream,
    /// A valid key with scope `public` only.
    key: String,
}

fn config_text(up: SocketAddr, rate: u32, server: &str, routes: &str) -> String {
    // 500 ms unless the test sets its own.
    let header_timeout = if server.contains("header_read_timeout_ms") {
        ""
    } else {
        "header_read_timeout_ms = 500"
    };
    gateway_config(
        up,
        rate,
        &format!("drain_timeout_ms = 2000\n{header_timeout}\n{server}"),
        "connect_timeout_ms = 1000\nresponse_timeout_ms = 5000",
        &format!(
            r#"[limits]
# Many tests present invalid keys on purpose; keep the failed-auth limiter out of the way.
auth_failures_per_minute = 100000
{routes}"#
        ),
    )
}

/// Stub + config + key + running, ready gateway. `server` lines go into `[server]`.
async fn start_with(server: &str, routes: &str) -> Env {
    start_env(1000, server, routes, &[]).await
}

/// `start_with` with the plan's `rate` per second, the gateway run with `envs` added to its
/// environment.
async fn start_env(rate: u32, server: &str, routes: &str, envs: &[(&str, &str)]) -> Env {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let config: PathBuf = write_file(
        dir.path(),
        "keygate.toml",
        &config_text(up.addr(), rate, server, routes),
    );
    let key = create_key(&config, &["--scope", "public"]).key;
    let gw = spawn_ready(&config, envs, Duration::from_secs(15)).await;
    Env {
        _dir: dir,
        gw,
        up,
        key,
    }
}

async fn start() -> Env {
    start_with("", ROUTES).await
}

impl Env {
    fn paths(&self) -> Vec<String> {
        self.up
            .records()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect()
    }

    /// A normal request with the valid key still works (the gateway survived the abuse).
    async fn assert_healthy(&self) {
        let (status, _, body) = get(
            self.gw.http,
            "/v1/public/health",
            &[("x-api-key", &self.key)],
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
}

fn statuses(out: &RawOutcome) -> Vec<u16> {
    out.statuses()
}

/// Pipelined-safe request bytes: `GET path` with the given extra header lines.
fn get_req(path: &str, key: Option<&str>, extra: &str) -> String {
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: a\r\n{key}{extra}\r\n")
}

/// A request with a small body: hyper serves it in a cycle (`keepalive`), where a plain `GET`
/// is served without hyper (`direct`).
fn post_req(path: &str, key: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: a\r\nX-API-Key: {key}\r\nContent-Length: 3\r\n\r\na=1")
}

// ---------------------------------------------------------------------------------------------
// A. Framing and smuggling
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a1_a2_cl_te_and_te_cl_never_smuggle() {
    let env = start().await;
    let k = env.key.clone();
    let smuggled = get_req("/v1/public/smuggled", Some(&k), "");

    // A1 CL.TE: Content-Length first, then Transfer-Encoding; the chunked body ends at once and
    // the smuggled request follows.
    let a1 = format!(
        "POST /v1/public/a1 HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    // A2 TE.CL: Transfer-Encoding first, then a short Content-Length; a CL-framing hop would
    // end the body after `5c\r\n` and parse the chunk data as a request.
    let inner = format!(
        "GET /v1/public/smuggled HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nContent-Length: 15\r\n\r\nx=1"
    );
    let a2 = format!(
        "POST /v1/public/a2 HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n{smuggled}",
        inner.len()
    );
    let cases: &[(&str, &str, &str, &[u8])] = &[
        ("A1 CL.TE", &a1, "/v1/public/a1", b""),
        ("A2 TE.CL", &a2, "/v1/public/a2", inner.as_bytes()),
    ];
    for (name, bytes, outer, chunked_body) in cases {
        env.up.clear();
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        let st = statuses(&out);
        let paths = env.paths();
        eprintln!(
            "{name}: statuses {st:?} closed {} stub {paths:?}",
            out.closed()
        );
        assert!(
            st == [200] || st == [400],
            "{name}: exactly one response, 200 (hyper: TE wins) or 400: {st:?}\n{}",
            out.text()
        );
        assert!(
            out.closed(),
            "{name}: connection must close after the response"
        );
        assert!(env.up.count() <= 1, "{name}: stub saw {paths:?}");
        assert!(
            !paths.iter().any(|p| p.contains("smuggled")),
            "{name}: smuggled request reached the stub: {paths:?}"
        );
        if st == [200] {
            // What hyper does: TE wins, the client's Content-Length is dropped, and the body is
            // forwarded with framing the gateway chose.
            let rec = env.up.last().expect("forwarded");
            assert_eq!(rec.path_and_query, *outer, "{name}");
            assert_eq!(
                rec.body, *chunked_body,
                "{name}: de-chunked body forwarded once"
            );
            for cl in rec.header_all("content-length") {
                assert_eq!(
                    cl,
                    chunked_body.len().to_string(),
                    "{name}: forwarded Content-Length must frame the forwarded body"
                );
            }
        }
    }
    env.assert_healthy().await;
}

#[tokio::test]
async fn a3_duplicate_content_length() {
    let env = start().await;
    let k = env.key.clone();

    // Differing: hyper refuses with 400 and closes; nothing is forwarded.
    let differing = format!(
        "POST /v1/public/a3 HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!{}",
        get_req("/v1/public/a3-next", Some(&k), "")
    );
    let out = raw_exchange(env.gw.http, differing.as_bytes(), EXCHANGE).await;
    eprintln!(
        "A3 5/6: statuses {:?} closed {}",
        statuses(&out),
        out.closed()
    );
    assert_eq!(statuses(&out), [400], "{}", out.text());
    assert!(out.closed());
    assert_eq!(env.up.count(), 0, "stub saw {:?}", env.paths());

    // Equal: THREATS [R] says 400; hyper accepts and collapses them into one header. The safe
    // property asserted: the 5-byte body is forwarded exactly once with a single matching
    // Content-Length, and the next pipelined request is a separate, separately handled one.
    env.up.clear();
    let equal = format!(
        "POST /v1/public/a3 HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{}",
        get_req("/v1/public/a3-next", Some(&k), "Connection: close\r\n")
    );
    let out = raw_exchange(env.gw.http, equal.as_bytes(), EXCHANGE).await;
    let st = statuses(&out);
    eprintln!(
        "A3 5/5: statuses {st:?} closed {} stub {:?}",
        out.closed(),
        env.paths()
    );
    assert!(out.closed());
    if st.first() == Some(&400) {
        assert_eq!(env.up.count(), 0);
    } else {
        assert_eq!(st, [200, 200], "{}", out.text());
        let recs = env.up.records();
        assert_eq!(recs.len(), 2, "{:?}", env.paths());
        assert_eq!(recs[0].path_and_query, "/v1/public/a3");
        assert_eq!(recs[0].body, b"hello");
        assert_eq!(recs[0].header_all("content-length"), ["5"]);
        assert_eq!(recs[1].path_and_query, "/v1/public/a3-next");
        assert!(recs[1].body.is_empty());
    }
}

#[tokio::test]
async fn a9_get_body_without_framing_is_the_next_request() {
    let env = start().await;
    let k = env.key.clone();
    let first = get_req("/v1/public/a9", Some(&k), "");

    // Trailing bytes form a keyless request: it must be authenticated on its own (401).
    let keyless = format!(
        "{first}{}",
        get_req("/v1/public/a9-next", None, "Connection: close\r\n")
    );
    // Trailing bytes form a keyed request: handled as a separate request (200).
    let keyed = format!(
        "{first}{}",
        get_req("/v1/public/a9-next", Some(&k), "Connection: close\r\n")
    );
    // Trailing bytes are garbage: at most a 400 for them, never part of the first body.
    let garbage = format!("{first}hello gateway\r\n\r\n");
    let cases: &[(&str, &str, &[u16], &[&str])] = &[
        ("keyless next", &keyless, &[200, 401], &["/v1/public/a9"]),
        (
            "keyed next",
            &keyed,
            &[200, 200],
            &["/v1/public/a9", "/v1/public/a9-next"],
        ),
        ("garbage", &garbage, &[200, 400], &["/v1/public/a9"]),
    ];
    for (name, bytes, want, want_paths) in cases {
        env.up.clear();
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        eprintln!(
            "A9 {name}: statuses {:?} closed {} stub {:?}",
            statuses(&out),
            out.closed(),
            env.paths()
        );
        assert_eq!(statuses(&out), *want, "{name}: {}", out.text());
        assert!(out.closed(), "{name}");
        assert_eq!(env.paths(), *want_paths, "{name}");
        for r in env.up.records() {
            assert!(
                r.body.is_empty(),
                "{name}: body forwarded: {:?}",
                r.body_str()
            );
        }
    }
}

#[tokio::test]
async fn a10_early_401_with_unread_body_never_forwards_the_body() {
    let env = start().await;
    let k = env.key.clone();
    let embedded = get_req("/v1/public/embedded", Some(&k), "");
    let after = get_req("/v1/public/after", Some(&k), "Connection: close\r\n");
    // Small (one read) and large (far more than hyper drains) bodies made of valid requests.
    for n in [100usize, 200 * 1024] {
        env.up.clear();
        let mut body = String::new();
        while body.len() < n {
            body.push_str(&embedded);
        }
        let bytes = format!(
            "POST /v1/public/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {INVALID_KEY}\r\nContent-Length: {}\r\n\r\n{body}{after}",
            body.len()
        );
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        let st = statuses(&out);
        let paths = env.paths();
        eprintln!(
            "A10 N={}: statuses {st:?} closed {} stub {paths:?}",
            body.len(),
            out.closed()
        );
        assert_eq!(st.first(), Some(&401), "N={n}: {}", out.text());
        assert!(
            !paths.iter().any(|p| p.contains("embedded")),
            "N={n}: embedded request reached the stub: {paths:?}"
        );
        match st.as_slice() {
            // Drained: the pipelined request is handled on its own.
            [401, 200] => assert_eq!(paths, ["/v1/public/after"], "N={n}"),
            // Closed after the 401: nothing forwarded at all.
            [401] => assert!(paths.is_empty(), "N={n}: {paths:?}"),
            other => panic!("N={n}: unexpected responses {other:?}\n{}", out.text()),
        }
        assert!(out.closed(), "N={n}");
    }
    env.assert_healthy().await;
}

#[tokio::test]
async fn a11_expect_continue_invalid_key_gets_no_100() {
    let env = start().await;
    let head = format!(
        "POST /v1/public/a11 HTTP/1.1\r\nHost: a\r\nX-API-Key: {INVALID_KEY}\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
    );
    let out = raw_exchange(env.gw.http, head.as_bytes(), EXCHANGE).await;
    eprintln!(
        "A11 invalid: statuses {:?} closed {}",
        statuses(&out),
        out.closed()
    );
    assert_eq!(statuses(&out), [401], "{}", out.text());
    assert!(!out.text().contains("100 Continue"), "{}", out.text());
    assert_eq!(env.up.count(), 0);

    // With a valid key: 100 Continue, then the body is forwarded.
    let head = format!(
        "POST /v1/public/a11 HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        env.key
    );
    let mut s = connect(None, env.gw.http, EXCHANGE).await;
    let opts = RawOpts {
        stop_after: Some(1),
        timeout: EXCHANGE,
        ..RawOpts::default()
    };
    let first = exchange_on(&mut s, head.as_bytes(), &opts).await;
    assert_eq!(statuses(&first), [100], "{}", first.text());
    let rest = exchange_on(
        &mut s,
        b"hello",
        &RawOpts {
            timeout: EXCHANGE,
            ..RawOpts::default()
        },
    )
    .await;
    assert_eq!(statuses(&rest), [200], "{}", rest.text());
    assert_eq!(env.up.last().expect("forwarded").body, b"hello");
}

#[tokio::test]
async fn a12_upgrade_requests_are_never_tunnelled() {
    let env = start().await;
    let k = env.key.clone();
    // Sent immediately after the upgrade request's head, without a key: tunnelled raw it would
    // reach the stub; parsed as HTTP it must be refused on its own.
    let trailing = get_req("/v1/public/after-upgrade", None, "Connection: close\r\n");
    let cases: &[(&str, &str)] = &[
        (
            "websocket",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        ),
        (
            "h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        (
            "h2c settings not nominated",
            "Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
    ];
    for (name, extra) in cases {
        env.up.clear();
        let bytes = format!(
            "{}{trailing}",
            get_req("/v1/public/upgrade", Some(&k), extra)
        );
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        let st = statuses(&out);
        eprintln!(
            "A12 {name}: statuses {st:?} closed {} stub {:?}",
            out.closed(),
            env.paths()
        );
        assert!(
            !st.contains(&101),
            "{name}: 101 sent to the client: {}",
            out.text()
        );
        assert_eq!(st.first(), Some(&200), "{name}: {}", out.text());
        assert!(
            st.len() == 1 || st[1] == 401,
            "{name}: trailing bytes must be refused or dropped: {st:?}"
        );
        assert_eq!(env.paths(), ["/v1/public/upgrade"], "{name}");
        let rec = env.up.last().expect("forwarded");
        for h in ["upgrade", "connection", "http2-settings"] {
            assert!(
                rec.header(h).is_none(),
                "{name}: stub received {h}: {:?}",
                rec.header(h)
            );
        }
        assert!(rec.body.is_empty(), "{name}: bytes forwarded raw");
    }
}

#[tokio::test]
async fn a14_connect_absolute_form_and_long_uri() {
    let env = start().await;
    let k = env.key.clone();

    let connect_req = format!(
        "CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\nX-API-Key: {k}\r\n\r\n"
    );
    let out = raw_exchange(env.gw.http, connect_req.as_bytes(), EXCHANGE).await;
    let st = statuses(&out);
    eprintln!("A14 CONNECT: statuses {st:?} closed {}", out.closed());
    assert!(st == [405] || st == [400], "{}", out.text());

    let absolute = format!(
        "GET http://other.example/v1/public/x HTTP/1.1\r\nHost: api\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n"
    );
    let out = raw_exchange(env.gw.http, absolute.as_bytes(), EXCHANGE).await;
    eprintln!("A14 absolute-form: statuses {:?}", statuses(&out));
    assert_eq!(statuses(&out), [400], "{}", out.text());
    assert!(out.closed());

    // Over the path limit but under the head limit: refused by the gateway.
    let long_path = format!("/v1/public/{}", "a".repeat(10 * 1024));
    let out = raw_exchange(
        env.gw.http,
        get_req(&long_path, Some(&k), "Connection: close\r\n").as_bytes(),
        EXCHANGE,
    )
    .await;
    eprintln!("A14 10 KiB URI: statuses {:?}", statuses(&out));
    assert!(
        matches!(statuses(&out).as_slice(), [400] | [414]),
        "{}",
        out.text()
    );

    // Over the head limit (64 KiB): hyper answers 431 and closes (recorded behaviour).
    let huge_path = format!("/v1/public/{}", "a".repeat(100 * 1024));
    let out = raw_exchange(
        env.gw.http,
        get_req(&huge_path, Some(&k), "").as_bytes(),
        EXCHANGE,
    )
    .await;
    let st = statuses(&out);
    eprintln!("A14 100 KiB URI: statuses {st:?} closed {}", out.closed());
    assert!(
        matches!(st.as_slice(), [414] | [431] | [400]),
        "{}",
        out.text()
    );
    assert!(out.closed());
    assert_eq!(env.up.count(), 0, "{:?}", env.paths());
    env.assert_healthy().await;
}

/// `OPTIONS *` (asterisk-form) names no path the gateway could route or scope: refused by the
/// gateway with 400 `bad_path` in problem+json (`path::canonicalize`: not origin-form). A
/// request line with two spaces between its parts is malformed (RFC 9112 §3: single SP):
/// refused with 400 and an empty body by hyper's parser before the gateway sees it. A valid
/// key rides on each, so a gateway that took any of them would forward it.
#[tokio::test]
async fn a14_options_asterisk_and_extra_spaces_in_the_request_line() {
    let env = start().await;
    let k = env.key.clone();
    // (request line, answered by the gateway with a problem body)
    let cases = [
        ("OPTIONS * HTTP/1.1", true),
        ("GET  /v1/public/a14 HTTP/1.1", false),
        ("GET /v1/public/a14  HTTP/1.1", false),
        ("GET  /v1/public/a14  HTTP/1.1", false),
    ];
    for (line, problem) in cases {
        let bytes = format!("{line}\r\nHost: a\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n");
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        assert_eq!(statuses(&out), [400], "{line}: {}", out.text());
        assert!(out.closed(), "{line}");
        let r = &out.responses()[0];
        if problem {
            let ctype = r.header("content-type");
            assert_eq!(ctype.as_deref(), Some("application/problem+json"), "{line}");
            assert_eq!(json(&r.body)["code"], "bad_path", "{line}");
        } else {
            assert!(r.body.is_empty(), "{line}: {}", out.text());
        }
    }
    assert_eq!(env.up.count(), 0, "{:?}", env.paths());
    assert!(env.up.wire().is_empty(), "the upstream was sent bytes");
    env.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// B. Header abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn b1_b2_header_size_and_count_limits() {
    let env = start().await;
    let k = env.key.clone();

    // B1: one 100 KiB header.
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b1", Some(&k), &big).as_bytes(),
        EXCHANGE,
    )
    .await;
    eprintln!("B1: statuses {:?} closed {}", statuses(&out), out.closed());
    assert_eq!(statuses(&out), [431], "{}", out.text());
    assert!(out.closed());

    // B2: Host + key + 99 more = 101 header lines -> 431; 100 lines -> fine.
    let filler = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b2", Some(&k), &filler(99)).as_bytes(),
        EXCHANGE,
    )
    .await;
    eprintln!(
        "B2 101 headers: statuses {:?} closed {}",
        statuses(&out),
        out.closed()
    );
    assert_eq!(statuses(&out), [431], "{}", out.text());
    assert!(out.closed());
    assert_eq!(env.up.count(), 0);

    // 100 header lines are accepted by the gateway (hyper's limit is inclusive). The gateway
    // then adds its own identity and forwarding headers (8), so the stub, itself a hyper
    // server with the default 100-header limit, refuses the forwarded request with 431, which
    // the gateway relays: recognisable by the gateway's x-request-id and the absence of the
    // gateway's problem+json body.
    let at_limit = format!("{}Connection: close\r\n", filler(97));
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b2", Some(&k), &at_limit).as_bytes(),
        EXCHANGE,
    )
    .await;
    let resp = out.responses();
    eprintln!("B2 100 headers: statuses {:?}", statuses(&out));
    assert_eq!(resp.len(), 1, "{}", out.text());
    assert!(resp[0].header("x-request-id").is_some(), "{}", out.text());
    assert!(
        !resp[0].body_str().contains("headers_too_large"),
        "{}",
        out.text()
    );
    // Comfortably under every limit (92 + 8 = 100 lines upstream): forwarded.
    let fits = format!("{}Connection: close\r\n", filler(89));
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b2-fits", Some(&k), &fits).as_bytes(),
        EXCHANGE,
    )
    .await;
    assert_eq!(statuses(&out), [200], "{}", out.text());
    assert_eq!(env.paths(), ["/v1/public/b2-fits"]);
    env.assert_healthy().await;
}

#[tokio::test]
async fn b6_duplicate_key_headers() {
    let env = start().await;
    let k = env.key.clone();
    // A different key by construction: a fixed replacement would equal the random last
    // character one time in 62, and two identical keys are not ambiguous.
    let last = if k.ends_with('x') { 'y' } else { 'x' };
    let other = format!("{}{last}", &k[..k.len() - 1]);

    let two = format!("X-API-Key: {other}\r\nConnection: close\r\n");
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b6", Some(&k), &two).as_bytes(),
        EXCHANGE,
    )
    .await;
    assert_eq!(statuses(&out), [400], "{}", out.text());
    assert_eq!(env.up.count(), 0);

    let same = format!("X-API-Key: {k}\r\nConnection: close\r\n");
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/b6", Some(&k), &same).as_bytes(),
        EXCHANGE,
    )
    .await;
    assert_eq!(statuses(&out), [200], "{}", out.text());
    let rec = env.up.last().expect("forwarded");
    assert!(rec.header("x-api-key").is_none(), "{:?}", rec.headers);
    assert!(rec.header("authorization").is_none(), "{:?}", rec.headers);
}

#[tokio::test]
async fn b8_non_utf8_header_bytes() {
    let env = start().await;
    let k = env.key.clone();
    let bad_key = b"GET /v1/public/b8 HTTP/1.1\r\nHost: a\r\nX-API-Key: kg_live_\xff\xfe\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(env.gw.http, bad_key, EXCHANGE).await;
    eprintln!("B8 key: statuses {:?}", statuses(&out));
    assert!(
        matches!(statuses(&out).as_slice(), [400] | [401]),
        "{}",
        out.text()
    );
    // A raw 0xff inside a Connection token, with a valid key.
    let mut bytes =
        format!("GET /v1/public/b8 HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nConnection: close, x-")
            .into_bytes();
    bytes.extend_from_slice(b"\xff\r\n\r\n");
    let out = raw_exchange(env.gw.http, &bytes, EXCHANGE).await;
    eprintln!("B8 connection: statuses {:?}", statuses(&out));
    assert!(
        matches!(statuses(&out).as_slice(), [400] | [401]),
        "{}",
        out.text()
    );
    assert_eq!(env.up.count(), 0, "{:?}", env.paths());
    env.assert_healthy().await;
}

/// B7: a chunked request announcing `Trailer: X-API-Key` and carrying the key in its trailer
/// section (any case spelling), with the key in the head too: forwarded with the body, and not
/// one byte of the key, nor the key header's name, reaches the upstream (trailers are dropped,
/// `forward::body`). The upstream's whole wire capture is searched, trailer section included.
/// With the key in the trailer only, it is no credential: 401, nothing forwarded.
#[tokio::test]
async fn b7_a_key_in_chunked_trailers_never_reaches_the_upstream() {
    let env = start().await;
    let k = env.key.clone();
    let chunked = |head_key: &str| {
        format!(
            "POST /v1/public/b7 HTTP/1.1\r\nHost: a\r\n{head_key}Transfer-Encoding: chunked\r\nTrailer: X-API-Key\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-Api-KEY: {k}\r\nX-API-Key: {k}\r\n\r\n"
        )
    };
    let out = raw_exchange(
        env.gw.http,
        chunked(&format!("X-API-Key: {k}\r\n")).as_bytes(),
        EXCHANGE,
    )
    .await;
    assert_eq!(statuses(&out), [200], "{}", out.text());
    let rec = env.up.last().expect("forwarded");
    assert_eq!(rec.body, b"hello world");
    for h in ["x-api-key", "authorization", "trailer"] {
        assert!(rec.header(h).is_none(), "{h}: {:?}", rec.headers);
    }
    let wire = env.up.wire();
    assert!(
        wire.starts_with(b"POST /v1/public/b7 "),
        "{}",
        String::from_utf8_lossy(&wire)
    );
    let secret_part = &k[k.len() - 20..];
    for needle in [k.as_bytes(), secret_part.as_bytes()] {
        assert!(
            find(&wire, needle).is_none(),
            "key bytes on the upstream's wire"
        );
    }
    assert!(
        find(&wire.to_ascii_lowercase(), b"x-api-key").is_none(),
        "{}",
        String::from_utf8_lossy(&wire)
    );

    let out = raw_exchange(env.gw.http, chunked("").as_bytes(), EXCHANGE).await;
    assert_eq!(statuses(&out), [401], "{}", out.text());
    assert_eq!(env.up.count(), 1, "{:?}", env.paths());
    env.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------------
// C. Where a key may be presented
// ---------------------------------------------------------------------------------------------

/// C5: a valid key in the query string on a route without `query_key_param`, in a Cookie, or
/// in a POST body (form or JSON) is no credential: 401 `missing_api_key`, nothing forwarded.
/// Each request gets its access line (file and stderr), and the key appears in neither.
#[tokio::test]
async fn c5_a_key_in_the_query_a_cookie_or_the_body_is_refused_and_never_logged() {
    let access = "\n[access_log]\npath = \"access.log\"\n";
    let env = start_env(
        1000,
        "",
        &format!("{ROUTES}{access}"),
        &[("KEYGATE_LOG", "info,keygate::access=info")],
    )
    .await;
    let k = env.key.clone();
    let post = |ctype: &str, body: String| {
        let len = body.len();
        format!("POST /v1/public/c5 HTTP/1.1\r\nHost: a\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}")
    };
    let close = "Connection: close\r\n";
    let cases = [
        get_req(&format!("/v1/public/c5?api_key={k}"), None, close),
        get_req(&format!("/v1/public/c5?a=1&key={k}"), None, close),
        get_req(
            "/v1/public/c5",
            None,
            &format!("Cookie: api_key={k}\r\n{close}"),
        ),
        post("application/x-www-form-urlencoded", format!("api_key={k}")),
        post("application/json", format!(r#"{{"api_key":"{k}"}}"#)),
    ];
    for req in &cases {
        let out = raw_exchange(env.gw.http, req.as_bytes(), EXCHANGE).await;
        assert_eq!(statuses(&out), [401], "{req}: {}", out.text());
        let code = json(&out.responses()[0].body)["code"].clone();
        assert_eq!(code, "missing_api_key", "{req}");
    }
    assert_eq!(env.up.count(), 0, "{:?}", env.paths());
    assert!(env.up.wire().is_empty(), "the upstream was sent bytes");

    let log = env.gw.stderr_log.with_file_name("access.log");
    let n = cases.len();
    let text = eventually_named(
        "an access line per request",
        Duration::from_secs(10),
        || {
            let text = read_lossy(&log);
            let on_stderr = env
                .gw
                .stderr_contents()
                .matches(" keygate::access: request ")
                .count();
            async move { (text.lines().count() == n && on_stderr == n).then_some(text) }
        },
    )
    .await;
    for line in text.lines() {
        assert_eq!(json(line.as_bytes())["status"], 401, "{line}");
    }
    let secret_part = &k[k.len() - 20..];
    for needle in [k.as_str(), secret_part] {
        assert!(!text.contains(needle), "key in the access log");
        env.gw.assert_not_logged(needle);
    }
}

// ---------------------------------------------------------------------------------------------
// D. Path, admin endpoints and host
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn d1_path_tricks_never_reach_admin() {
    let env = start().await;
    let k = env.key.clone();
    // (input, expected status). 403: canonicalised into /v1/admin, where the key has no scope.
    let cases: &[(&str, u16)] = &[
        ("/v1/public/../admin/x", 403),
        ("/v1/public/%2e%2e/admin/x", 403),
        ("/v1/public/%2E%2E/admin/x", 403),
        ("/v1/public/.%2e/admin/x", 403),
        ("/v1/public/%252e%252e/admin/x", 200),
        ("/v1/public//..//admin/x", 403),
        ("//v1/admin/x", 403),
        ("/v1/public/..;/admin/x", 400),
        ("/v1/public/%2fadmin", 400),
        ("/v1/public/%2Fadmin", 400),
        ("/v1/public/%5Cadmin", 400),
        ("/v1/public/\\admin", 400),
        ("/v1/admin%00", 400),
        ("/v1/./admin/x", 403),
        ("/v1/public/%c0%ae%c0%ae/admin", 200),
    ];
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (input, want) in cases {
        env.up.clear();
        let out = raw_exchange(
            env.gw.http,
            get_req(input, Some(&k), "Connection: close\r\n").as_bytes(),
            EXCHANGE,
        )
        .await;
        let status = statuses(&out).first().copied().unwrap_or(0);
        let paths = env.paths();
        assert!(out.closed(), "{input}: Connection: close not honoured");
        table.push(format!("{input:<36} {status:>3}  {paths:?}"));
        // The invariant: never anything under /v1/admin, and what is forwarded is exactly the
        // canonical path that was authorised.
        for p in &paths {
            assert!(!p.starts_with("/v1/admin"), "{input}: stub got {p}");
            assert!(p.starts_with("/v1/public/"), "{input}: stub got {p}");
            let canonical = keygate::path::canonicalize(input).expect("forwarded => canonical");
            assert_eq!(*p, canonical, "{input}: forwarded path != authorised path");
        }
        assert!(paths.len() <= 1, "{input}: {paths:?}");
        if status != *want || (status == 200) != (paths.len() == 1) {
            failures.push(format!("{input}: want {want}, got {status} stub {paths:?}"));
        }
    }
    eprintln!("D1 input / status / stub path:\n{}", table.join("\n"));
    assert!(
        failures.is_empty(),
        "D1 mismatches:\n{}",
        failures.join("\n")
    );
}

/// D1, path parameters: servlet containers and Spring drop each segment's `;params` before
/// they route, so `/v1/admin;x/users` is `/v1/admin/users` to them, and `/;/v1/admin/users`
/// is `//v1/admin/users`, merged to the same. A gateway that routes on the literal segments
/// authorises those under `/v1` or `/` (scope `public`) and forwards them unchanged: a
/// `public` key reached the admin route. Now a path whose route depends on whether its
/// params are dropped (`src/route.rs`), and one with a segment that is empty or a dot segment
/// once they are (`src/path.rs`), is refused with 400; a `;` that leaves the route the same
/// either way is forwarded as sent. Each case goes both ways into the gateway: a plain `GET`
/// (`src/direct.rs`) and the same with `Content-Length: 0` (hyper's).
#[tokio::test]
async fn d1_path_parameters_never_move_a_request_to_a_broader_route() {
    const PARAM_ROUTES: &str = r#"
[[routes]]
name = "root"
path_prefix = "/"
scopes = ["public"]
upstream = "up"

[[routes]]
name = "v1"
path_prefix = "/v1"
scopes = ["public"]
upstream = "up"

[[routes]]
name = "admin"
path_prefix = "/v1/admin"
scopes = ["admin"]
upstream = "up"
"#;
    let env = start_with("", PARAM_ROUTES).await;
    let k = env.key.clone();
    // (path, expected status); a 200 is forwarded exactly as sent.
    let cases: &[(&str, u16)] = &[
        ("/v1/admin;x/users", 400),
        ("/v1/admin;jsessionid=1/users", 400),
        ("/v1;x/admin/users", 400),
        ("/v1/admin;x", 400),
        ("/v1/admin%3Bx/users", 400),
        ("/;/v1/admin/users", 400),
        ("/;x/v1/admin/users", 400),
        ("/v1/;x/admin/users", 400),
        ("/v1/%3B/admin/users", 400),
        ("/v1/admin/;", 400),
        // The route is `admin` either way: the scope decides.
        ("/v1/admin/users;v=2", 403),
        ("/v1/admin;x/../users", 200),
        // Params that leave the route the same either way.
        ("/v1/users;v=2/x", 200),
        ("/v1/users/x;jsessionid=1", 200),
        ("/other;v=1/x", 200),
    ];
    let mut failures = Vec::new();
    for (path, want) in cases {
        for (way, extra) in [
            ("direct", "Connection: close\r\n"),
            ("hyper", "Content-Length: 0\r\nConnection: close\r\n"),
        ] {
            env.up.clear();
            let out = raw_exchange(
                env.gw.http,
                get_req(path, Some(&k), extra).as_bytes(),
                EXCHANGE,
            )
            .await;
            let resps = out.responses();
            let status = resps.first().map_or(0, |r| r.status);
            let paths = env.paths();
            let line = format!("{path} ({way}): {status}, stub {paths:?}");
            eprintln!("D1 params {line}");
            let forwarded = keygate::path::canonicalize(path)
                .map(|p| p.into_owned())
                .unwrap_or_default();
            let ok = match want {
                200 => status == 200 && paths == [forwarded],
                _ => {
                    status == *want
                        && paths.is_empty()
                        && resps.first().and_then(|r| r.header("content-type"))
                            == Some("application/problem+json".to_owned())
                }
            };
            if !ok {
                failures.push(format!("want {want}; got {line}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "D1 path parameters:\n{}",
        failures.join("\n")
    );
}

/// D1, URL-rewrite headers: IIS URL Rewrite, Zend/laminas and old Symfony take the request's
/// path from `X-Original-URL` or `X-Rewrite-URL` when present, so a client sending
/// `X-Original-URL: /v1/admin/x` on a request authorised for `/v1/public/x` had the upstream
/// serve the admin path. They are stripped like the other request-only headers
/// (`src/hygiene.rs`): the stub never reads their names, in any case spelling, on either
/// server path (a plain `GET`: `src/direct.rs`; a `POST` with a body: hyper).
#[tokio::test]
async fn d1_url_rewrite_headers_never_reach_the_upstream() {
    let env = start().await;
    let k = env.key.clone();
    let rewrites = "X-Original-URL: /v1/admin/x\r\nX-Rewrite-URL: /v1/admin/x\r\n\
                    x-original-url: /v1/admin/y\r\nX-REWRITE-URL: /v1/admin/y\r\n";
    let plain = get_req(
        "/v1/public/x",
        Some(&k),
        &format!("{rewrites}Connection: close\r\n"),
    );
    let with_body = format!(
        "POST /v1/public/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\n{rewrites}Content-Length: 3\r\nConnection: close\r\n\r\na=1"
    );
    for (way, bytes) in [("direct", plain), ("hyper", with_body)] {
        env.up.clear();
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        assert_eq!(statuses(&out), vec![200], "{way}: {}", out.text());
        let recs = env.up.records();
        assert_eq!(recs.len(), 1, "{way}");
        assert_eq!(recs[0].path_and_query, "/v1/public/x", "{way}");
        let names = recs[0].header_names();
        assert!(
            !names.contains("x-original-url") && !names.contains("x-rewrite-url"),
            "{way}: the upstream got {names:?}"
        );
    }
    let wire = String::from_utf8_lossy(&env.up.wire()).to_ascii_lowercase();
    assert!(wire.contains("/v1/public/x"), "the stub's wire log is read");
    for name in ["x-original-url", "x-rewrite-url", "/v1/admin"] {
        assert!(!wire.contains(name), "{name} reached the upstream:\n{wire}");
    }
}

#[tokio::test]
async fn d3_admin_endpoints_are_not_on_the_data_port() {
    let env = start().await;
    let k = env.key.clone();
    for path in ["/metrics", "/healthz", "/readyz", "/healthz/../v1/admin/x"] {
        for key in [None, Some(k.as_str())] {
            let out = raw_exchange(
                env.gw.http,
                get_req(path, key, "Connection: close\r\n").as_bytes(),
                EXCHANGE,
            )
            .await;
            let resp = out.responses();
            let r = resp
                .first()
                .unwrap_or_else(|| panic!("{path}: {}", out.text()));
            let body = r.body_str();
            if path.starts_with("/healthz/..") {
                // Canonicalised to /v1/admin/x first: a routed, scope-checked request.
                assert!(matches!(r.status, 401 | 403), "{path}: {}", r.status);
            } else {
                assert_eq!(r.status, 404, "{path} key={}: {body}", key.is_some());
                assert!(body.contains("route_not_found"), "{path}: {body}");
            }
            assert!(
                !body.contains("keygate_"),
                "{path}: admin content leaked: {body}"
            );
            assert!(
                !body.contains("ready"),
                "{path}: admin content leaked: {body}"
            );
        }
    }
    assert_eq!(env.up.count(), 0, "{:?}", env.paths());
}

#[tokio::test]
async fn d4_host_confusion() {
    const HOSTED: &str = r#"
[[routes]]
name = "hosted"
host = "api.example"
path_prefix = "/v1/public"
scopes = ["public"]
upstream = "up"
"#;
    let env = start_with("", HOSTED).await;
    let k = env.key.clone();
    let with_host = |host: &str| {
        format!("GET /v1/public/d4 HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n")
    };
    let dup = format!(
        "GET /v1/public/d4 HTTP/1.1\r\nHost: api.example\r\nHost: evil.example\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n"
    );
    // Absolute-form: the target's authority and Host must name the same host and port.
    let absolute = |authority: &str, host: &str| {
        format!("GET http://{authority}/v1/public/d4 HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {k}\r\nConnection: close\r\n\r\n")
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("canonical", with_host("api.example"), 200),
        (
            "absolute-form, Host names the default port",
            absolute("api.example", "api.example:80"),
            200,
        ),
        (
            "absolute-form, another port in Host",
            absolute("api.example:8080", "api.example:9090"),
            400,
        ),
        (
            "absolute-form, another host in Host",
            absolute("api.example", "evil.example"),
            400,
        ),
        ("upper + trailing dot", with_host("API.EXAMPLE."), 200),
        ("with port", with_host("api.example:443"), 200),
        ("unknown host", with_host("other.example"), 404),
        ("duplicate Host", dup, 400),
    ];
    for (name, bytes, want) in cases {
        env.up.clear();
        let out = raw_exchange(env.gw.http, bytes.as_bytes(), EXCHANGE).await;
        eprintln!(
            "D4 {name}: statuses {:?} stub {:?}",
            statuses(&out),
            env.paths()
        );
        assert_eq!(statuses(&out), [want], "{name}: {}", out.text());
        assert!(out.closed(), "{name}");
        let forwarded = if want == 200 { 1 } else { 0 };
        assert_eq!(env.up.count(), forwarded, "{name}: {:?}", env.paths());
    }
}

/// `keygate_protocol_errors_total{kind}` as the admin listener reports it.
async fn protocol_errors(env: &Env, kind: &str) -> String {
    let (_, _, body) = get(env.gw.admin, "/metrics", &[]).await;
    let want = format!("keygate_protocol_errors_total{{kind=\"{kind}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&want).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {want} in /metrics"))
}

/// What hyper refuses before the request path (a malformed head: 400; a head over
/// `max_header_bytes`: 431; a head not whole within `header_read_timeout_ms`: closed) is
/// counted by kind, once each; a client that closes mid-head is not counted at all.
#[tokio::test]
async fn refusals_before_the_request_path_are_counted_by_kind() {
    let env = start().await;
    let k = env.key.clone();
    for kind in [
        "malformed",
        "too_large",
        "header_timeout",
        "h2_calm",
        "h2_protocol",
    ] {
        assert_eq!(protocol_errors(&env, kind).await, "0", "{kind} at start");
    }
    let malformed =
        format!("GET /v1/public/m HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nno colon here\r\n\r\n");
    let out = raw_exchange(env.gw.http, malformed.as_bytes(), EXCHANGE).await;
    assert_eq!(statuses(&out), [400], "{}", out.text());
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    let out = raw_exchange(
        env.gw.http,
        get_req("/v1/public/t", Some(&k), &big).as_bytes(),
        EXCHANGE,
    )
    .await;
    assert_eq!(statuses(&out), [431], "{}", out.text());
    // A partial head, then silence: closed at the header timeout (500 ms here).
    let out = raw_exchange(
        env.gw.http,
        b"GET /v1/public/s HTTP/1.1\r\nHost: a\r\n",
        EXCHANGE,
    )
    .await;
    assert!(out.closed() && statuses(&out).is_empty(), "{}", out.text());
    // A partial head, then the client's close: not the gateway's refusal.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(env.gw.http).await.unwrap();
        s.write_all(b"GET /v1/public/c HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
    }
    env.assert_healthy().await;
    for (kind, want) in [
        ("malformed", "1"),
        ("too_large", "1"),
        ("header_timeout", "1"),
    ] {
        eventually_named(kind, EXCHANGE, || async {
            (protocol_errors(&env, kind).await == want).then_some(())
        })
        .await;
    }
    // Every connection's end seen (the client-closed one's included): still nothing more.
    eventually_named("no connection open", EXCHANGE, || async {
        let (_, _, body) = get(env.gw.admin, "/metrics", &[]).await;
        String::from_utf8_lossy(&body)
            .lines()
            .any(|l| l == "keygate_connections_open{listener=\"http\"} 0")
            .then_some(())
    })
    .await;
    for (kind, want) in [
        ("malformed", "1"),
        ("too_large", "1"),
        ("header_timeout", "1"),
        ("h2_calm", "0"),
        ("h2_protocol", "0"),
    ] {
        assert_eq!(protocol_errors(&env, kind).await, want, "{kind}");
    }
    assert_eq!(env.up.count(), 1, "{:?}", env.paths());
}

// ---------------------------------------------------------------------------------------------
// E. Slow clients and connection caps
// ---------------------------------------------------------------------------------------------

/// Waits (≤ 5 s) for the gateway to end the connection; returns how long that took.
async fn time_to_close(s: &mut tokio::net::TcpStream, send: &[u8]) -> (RawOutcome, Duration) {
    let started = Instant::now();
    let out = exchange_on(
        s,
        send,
        &RawOpts {
            timeout: Duration::from_secs(5),
            ..RawOpts::default()
        },
    )
    .await;
    (out, started.elapsed())
}

#[tokio::test]
async fn e1_slowloris_is_cut_at_the_header_timeout() {
    let env = start().await;
    let k = env.key.clone();
    let partial = b"GET /v1/public/slow HTTP/1.1\r\nHost: a\r\n";

    // Fresh connection, partial head, then nothing.
    let mut fresh = connect(None, env.gw.http, EXCHANGE).await;
    // Fresh connection that sends nothing at all, and one that sends a prefix of the HTTP/2
    // preface (the protocol sniffing phase must be bounded too).
    let mut silent = connect(None, env.gw.http, EXCHANGE).await;
    let mut preface = connect(None, env.gw.http, EXCHANGE).await;
    // Keep-alive: one full request first, then a partial head.
    let mut ka = connect(None, env.gw.http, EXCHANGE).await;
    let first = exchange_on(
        &mut ka,
        get_req("/v1/public/first", Some(&k), "").as_bytes(),
        &RawOpts {
            stop_after: Some(1),
            timeout: EXCHANGE,
            ..RawOpts::default()
        },
    )
    .await;
    assert_eq!(statuses(&first), [200], "{}", first.text());

    let key_header = [("x-api-key", k.as_str())];
    let (r_fresh, r_silent, r_preface, r_ka, normal) = tokio::join!(
        time_to_close(&mut fresh, partial),
        time_to_close(&mut silent, b""),
        time_to_close(&mut preface, b"PRI * HTTP/2.0\r\n"),
        time_to_close(&mut ka, partial),
        // Meanwhile a normal client is served.
        get(env.gw.http, "/v1/public/normal", &key_header),
    );
    assert_eq!(normal.0, 200);
    for (name, (out, took)) in [
        ("fresh partial head", r_fresh),
        ("fresh silent", r_silent),
        ("fresh h2 preface prefix", r_preface),
        ("keep-alive partial head", r_ka),
    ] {
        eprintln!("E1 {name}: closed {} after {took:?}", out.closed());
        assert!(
            out.closed(),
            "{name}: still open after {took:?} (header_read_timeout 500 ms)"
        );
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
        assert!(
            took >= Duration::from_millis(250),
            "{name}: closed before the timeout could fire: {took:?}"
        );
    }
    assert!(
        !env.paths().iter().any(|p| p.contains("slow")),
        "{:?}",
        env.paths()
    );
}

/// The value of the counter `keygate_connections_released_total`.
async fn released(env: &Env) -> u64 {
    let (_, _, m) = get(env.gw.admin, "/metrics", &[]).await;
    String::from_utf8_lossy(&m)
        .lines()
        .find_map(|l| l.strip_prefix("keygate_connections_released_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Idle plain HTTP/1 keep-alive connections (TLS ones: `tests/tls.rs`) give hyper's buffers back between requests
/// (`src/keepalive.rs`) and go on serving as before: after each release, on the same
/// connection, a request with a body (hyper's), a plain request and a pipelined pair of
/// them (served without hyper, `src/direct.rs`) and a head over `max_header_bytes` (431) are
/// answered as on a fresh connection.
#[tokio::test]
async fn idle_keep_alive_connections_release_their_buffers_and_keep_serving() {
    let env = start_with("header_read_timeout_ms = 20000", ROUTES).await;
    let k = env.key.clone();
    let one = RawOpts {
        stop_after: Some(1),
        ..RawOpts::default()
    };
    let mut s = connect(None, env.gw.http, EXCHANGE).await;
    let out = exchange_on(&mut s, post_req("/v1/public/e2a", &k).as_bytes(), &one).await;
    assert_eq!(statuses(&out), [200], "{}", out.text());
    let mut seen = 0;
    for round in 1..=2u64 {
        eventually_named("an idle connection released", EXCHANGE, || async {
            (released(&env).await >= round).then_some(())
        })
        .await;
        seen = released(&env).await;
        // A plain request, then a pipelined pair in one write, then one with a body (the
        // next round's release).
        let out = exchange_on(
            &mut s,
            get_req("/v1/public/e2b", Some(&k), "").as_bytes(),
            &one,
        )
        .await;
        assert_eq!(statuses(&out), [200], "round {round}: {}", out.text());
        assert!(!out.closed());
        let pair = format!(
            "{}{}",
            get_req("/v1/public/e2c", Some(&k), ""),
            get_req("/v1/public/e2d", Some(&k), "")
        );
        let two = RawOpts {
            stop_after: Some(2),
            ..RawOpts::default()
        };
        let out = exchange_on(&mut s, pair.as_bytes(), &two).await;
        assert_eq!(statuses(&out), [200, 200], "round {round}: {}", out.text());
        let out = exchange_on(&mut s, post_req("/v1/public/e2f", &k).as_bytes(), &one).await;
        assert_eq!(statuses(&out), [200], "round {round}: {}", out.text());
    }
    assert!(seen >= 2);
    // A released connection's next head is held to the limit too (64 KiB by default).
    eventually_named("released again", EXCHANGE, || async {
        (released(&env).await > seen).then_some(())
    })
    .await;
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    let out = exchange_on(
        &mut s,
        get_req("/v1/public/e2e", Some(&k), &big).as_bytes(),
        &RawOpts::default(),
    )
    .await;
    assert_eq!(statuses(&out), [431], "{}", out.text());
    assert!(out.closed());
    let paths = env.paths();
    for p in [
        "/v1/public/e2a",
        "/v1/public/e2b",
        "/v1/public/e2c",
        "/v1/public/e2d",
        "/v1/public/e2f",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} not forwarded: {paths:?}");
    }
    assert!(!paths.iter().any(|x| x == "/v1/public/e2e"), "{paths:?}");
    env.assert_healthy().await;
}

/// Plain requests (served without hyper, `src/direct.rs`) and requests with bodies (hyper's
/// cycles, `src/keepalive.rs`) share one connection in any order, pipelined in one write too:
/// each is answered in order and reaches the upstream once, bodies intact; a plain request
/// asking to close is answered with `connection: close`, and the connection closes.
#[tokio::test]
async fn plain_requests_and_requests_with_bodies_share_a_connection() {
    let env = start_with("header_read_timeout_ms = 20000", ROUTES).await;
    let k = env.key.clone();
    let mut s = connect(None, env.gw.http, EXCHANGE).await;
    let burst = format!(
        "{}{}{}",
        get_req("/v1/public/m1", Some(&k), ""),
        post_req("/v1/public/m2", &k),
        get_req("/v1/public/m3", Some(&k), "")
    );
    let three = RawOpts {
        stop_after: Some(3),
        ..RawOpts::default()
    };
    let out = exchange_on(&mut s, burst.as_bytes(), &three).await;
    assert_eq!(statuses(&out), [200, 200, 200], "{}", out.text());
    assert!(!out.closed());
    // Answered in order: each response echoes its own path.
    let text = out.text();
    let at = |p: &str| {
        text.find(p)
            .unwrap_or_else(|| panic!("{p} missing: {text}"))
    };
    assert!(at("/v1/public/m1") < at("/v1/public/m2"), "{text}");
    assert!(at("/v1/public/m2") < at("/v1/public/m3"), "{text}");
    let one = RawOpts {
        stop_after: Some(1),
        ..RawOpts::default()
    };
    for req in [
        post_req("/v1/public/m4", &k),
        get_req("/v1/public/m5", Some(&k), ""),
    ] {
        let out = exchange_on(&mut s, req.as_bytes(), &one).await;
        assert_eq!(statuses(&out), [200], "{req}: {}", out.text());
        assert!(!out.closed(), "{req}");
    }
    let last = get_req("/v1/public/m6", Some(&k), "Connection: close\r\n");
    let out = exchange_on(&mut s, last.as_bytes(), &RawOpts::default()).await;
    assert_eq!(statuses(&out), [200], "{}", out.text());
    assert!(
        out.text().contains("\r\nconnection: close\r\n"),
        "{}",
        out.text()
    );
    assert!(out.closed());
    let recs = env.up.records();
    for n in 1..=6 {
        let p = format!("/v1/public/m{n}");
        let seen: Vec<_> = recs.iter().filter(|r| r.path_and_query == p).collect();
        assert_eq!(seen.len(), 1, "{p}");
        let body: &[u8] = if n == 2 || n == 4 { b"a=1" } else { b"" };
        assert_eq!(seen[0].body, body, "{p}");
    }
    env.assert_healthy().await;
}

/// What an idle keep-alive connection holds (`keepalive::serve`): the gateway's resident
/// memory grows by under 2 KiB per idle connection (issue 12's stretch goal; nginx 0.24,
/// HAProxy 0.97), both after a plain request (served without hyper, `direct`: nothing of the
/// request is kept) and once released after one with a body (hyper's cycle). The allocator
/// returns freed pages at once here, so the figure is what the connections hold rather than
/// what it keeps of earlier requests, and it is the growth from a first batch of idle
/// connections to the whole set, so the worker's one-off allocations are not in it. 2.3–2.5
/// KiB before `keepalive::unbox` (the emptied box of hyper's connection was freed only after
/// the idle wait), ~1.4 with it.
#[tokio::test]
async fn idle_connections_hold_under_2_kib_each() {
    for plain in [true, false] {
        idle_connections_hold_under_2_kib_after(plain).await;
    }
}

async fn idle_connections_hold_under_2_kib_after(plain: bool) {
    const FIRST: usize = 500;
    const MORE: usize = 1500;
    let env = start_env(
        1_000_000,
        "header_read_timeout_ms = 60000\nmax_connections = 5000\nmax_connections_per_ip = 5000",
        ROUTES,
        &[("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")],
    )
    .await;
    let req = if plain {
        get_req("/v1/public/idle", Some(&env.key), "")
    } else {
        post_req("/v1/public/idle", &env.key)
    };
    let one = RawOpts {
        stop_after: Some(1),
        ..RawOpts::default()
    };
    let mut idle = Vec::with_capacity(FIRST + MORE);
    let mut rss = Vec::new();
    for batch in [FIRST, MORE] {
        for _ in 0..batch {
            let mut s = connect(None, env.gw.http, EXCHANGE).await;
            let out = exchange_on(&mut s, req.as_bytes(), &one).await;
            assert_eq!(
                statuses(&out),
                [200],
                "connection {}: {}",
                idle.len(),
                out.text()
            );
            idle.push(s);
        }
        // A plain request's connection is idle once its response is written, before the
        // client has read it: only hyper's cycles have a release to wait for.
        let all = idle.len() as u64;
        if !plain {
            eventually_named(
                "every connection released",
                Duration::from_secs(30),
                || async { (released(&env).await >= all).then_some(()) },
            )
            .await;
        }
        rss.push(rss_kib(env.gw.pid()));
    }
    assert!(rss.iter().all(|&kib| kib > 0), "the gateway's VmRSS unread");
    let per = rss[1].saturating_sub(rss[0]) as f64 / MORE as f64;
    eprintln!(
        "idle connections (plain {plain}) {FIRST} -> {}: RSS {rss:?} KiB, {per:.2} KiB each",
        FIRST + MORE
    );
    assert!(per < 2.0, "plain {plain}: {per:.2} KiB per idle connection");
    drop(idle);
    env.assert_healthy().await;
}

/// A connection whose requests carry bodies (`Content-Length`) is released between requests
/// too, once each body has been given to hyper whole (`keepalive::Framing` steps over it by
/// its length, empty lines and request-like lines in it included); the body reaches the
/// upstream intact and the connection goes on serving; a head after a body is held to
/// `max_header_bytes` like any other.
#[tokio::test]
async fn idle_connections_are_released_after_requests_with_bodies() {
    let env = start_with("header_read_timeout_ms = 20000", ROUTES).await;
    let k = env.key.clone();
    let one = RawOpts {
        stop_after: Some(1),
        ..RawOpts::default()
    };
    let body = "a=1\r\n\r\nGET /v1/public/inside HTTP/1.1\r\nHost: a\r\n\r\n";
    let post = format!(
        "POST /v1/public/post HTTP/1.1\r\nHost: a\r\nX-API-Key: {k}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = connect(None, env.gw.http, EXCHANGE).await;
    for round in 1..=2 {
        for (what, bytes) in [
            ("POST", post.clone()),
            ("GET", get_req("/v1/public/get", Some(&k), "")),
        ] {
            let before = released(&env).await;
            let out = exchange_on(&mut s, bytes.as_bytes(), &one).await;
            assert_eq!(
                statuses(&out),
                [200],
                "round {round} {what}: {}",
                out.text()
            );
            assert!(!out.closed(), "round {round} {what}");
            // A plain GET after a release is served without hyper (`direct`): no cycle.
            if what == "POST" {
                eventually_named("released after the exchange", EXCHANGE, || async {
                    (released(&env).await > before).then_some(())
                })
                .await;
            }
        }
    }
    // A head after a body in the same cycle is held to the limit too (64 KiB by default).
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    let then_big = format!("{post}{}", get_req("/v1/public/big", Some(&k), &big));
    let out = exchange_on(&mut s, then_big.as_bytes(), &RawOpts::default()).await;
    assert_eq!(statuses(&out), [200, 431], "{}", out.text());
    assert!(out.closed());
    assert!(!env.paths().iter().any(|p| p == "/v1/public/big"));
    let posts: Vec<_> = env
        .up
        .records()
        .into_iter()
        .filter(|r| r.path_and_query == "/v1/public/post")
        .collect();
    assert_eq!(posts.len(), 3);
    assert!(posts.iter().all(|r| r.body == body.as_bytes()));
    assert!(!env.paths().iter().any(|p| p.contains("inside")));
    env.assert_healthy().await;
}

/// Between requests an idle connection (released by hyper's cycle, or after a plain request
/// served without one) waits for the client's next bytes within the idle limit
/// (`header_read_timeout_ms`) and for the gateway's stop: one left silent is closed at the
/// limit, with no response; one idle when the gateway is told to stop is closed at once (not
/// at its limit), and the gateway exits cleanly.
#[tokio::test]
async fn idle_connections_are_closed_at_the_idle_limit_and_at_stop() {
    for (stop, plain) in [(false, true), (false, false), (true, true), (true, false)] {
        let server = if stop {
            "header_read_timeout_ms = 60000\nshutdown_delay_ms = 0"
        } else {
            "header_read_timeout_ms = 400"
        };
        let mut env = start_with(server, ROUTES).await;
        let one = RawOpts {
            stop_after: Some(1),
            ..RawOpts::default()
        };
        let mut s = connect(None, env.gw.http, EXCHANGE).await;
        let req = if plain {
            get_req("/v1/public/e5", Some(&env.key), "")
        } else {
            post_req("/v1/public/e5", &env.key)
        };
        let out = exchange_on(&mut s, req.as_bytes(), &one).await;
        assert_eq!(statuses(&out), [200], "{}", out.text());
        if !plain {
            eventually_named("the connection released", EXCHANGE, || async {
                (released(&env).await >= 1).then_some(())
            })
            .await;
        }
        if stop {
            env.gw.sigterm();
        }
        // Nothing more from the client: read until the gateway closes (10 s at most, well
        // under the 60 s limit of the stopping case).
        let out = exchange_on(&mut s, b"", &RawOpts::default()).await;
        assert!(
            out.closed() && !out.timed_out,
            "stop {stop} plain {plain}: {out:?}"
        );
        assert!(
            out.bytes.is_empty(),
            "stop {stop} plain {plain}: {}",
            out.text()
        );
        if stop {
            let status = env.gw.wait_exit(EXCHANGE).await;
            assert!(status.success(), "{status:?}\n{}", env.gw.stderr_contents());
        } else {
            env.assert_healthy().await;
        }
    }
}

#[tokio::test]
async fn e6_per_ip_connection_cap() {
    // Idle connections must outlive the test's checks: use a long header timeout here.
    let env = start_with(
        "max_connections_per_ip = 5\nheader_read_timeout_ms = 20000",
        ROUTES,
    )
    .await;
    let k = env.key.clone();
    let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let b = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(Some(a), env.gw.http, EXCHANGE).await);
    }
    // A connect returns once the kernel queued the connection. Each worker accepts from its own
    // listener (`[server] workers`), so wait until all five are accepted: otherwise the sixth
    // may be accepted first on another worker, and one of the five is the one refused.
    eventually_named("five connections accepted", EXCHANGE, || async {
        let (_, _, m) = get(env.gw.admin, "/metrics", &[]).await;
        String::from_utf8_lossy(&m)
            .contains("keygate_connections_open{listener=\"http\"} 5")
            .then_some(())
    })
    .await;
    // The sixth from the same source is closed at once, with no response.
    let started = Instant::now();
    let sixth = raw_exchange_with(
        env.gw.http,
        b"",
        &RawOpts {
            src_ip: Some(a),
            timeout: Duration::from_secs(3),
            ..RawOpts::default()
        },
    )
    .await;
    eprintln!(
        "E6 sixth: closed {} after {:?}, {} bytes",
        sixth.closed(),
        started.elapsed(),
        sixth.bytes.len()
    );
    assert!(sixth.closed(), "sixth connection from {a} not closed");
    let (_, _, metrics) = get(env.gw.admin, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("keygate_connections_rejected_total{reason=\"per_ip\"} ")
            && !l.ends_with(" 0")),
        "per_ip rejection not counted"
    );
    assert!(sixth.bytes.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));

    // Another source is unaffected.
    let (status, _, _) = get_from(
        b,
        env.gw.http,
        "/v1/public/e6",
        &[("x-api-key", k.as_str())],
    )
    .await;
    assert_eq!(status, 200);
    // The five held connections were admitted and are served.
    let out = exchange_on(
        &mut held[0],
        get_req("/v1/public/held", Some(&k), "Connection: close\r\n").as_bytes(),
        &RawOpts {
            timeout: EXCHANGE,
            ..RawOpts::default()
        },
    )
    .await;
    assert_eq!(statuses(&out), [200], "{}", out.text());

    // Once they are gone, the source may connect again (caps are released).
    drop(held);
    let gw = env.gw.http;
    let k2 = k.clone();
    eventually_named("per-ip slots released", Duration::from_secs(10), || {
        let k2 = k2.clone();
        async move {
            let out = raw_exchange_with(
                gw,
                get_req("/v1/public/again", Some(&k2), "Connection: close\r\n").as_bytes(),
                &RawOpts {
                    src_ip: Some(a),
                    timeout: Duration::from_secs(2),
                    ..RawOpts::default()
                },
            )
            .await;
            (out.statuses() == [200]).then_some(())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 prior knowledge on the plain listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_is_forwarded_as_http1_with_host() {
    let env = start().await;
    let (status, _, body) = h2_get(env.gw.http, "/v1/public/h2", &[("x-api-key", &env.key)]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = env.up.last().expect("forwarded");
    assert_eq!(rec.path_and_query, "/v1/public/h2");
    assert_eq!(rec.version, "HTTP/1.1");
    // HTTP/2 has no Host header; the gateway sets one from the canonical :authority, which
    // drops the port (recorded behaviour: "127.0.0.1", not "127.0.0.1:PORT").
    let host = rec
        .header("host")
        .expect("Host set for the HTTP/1.1 upstream");
    assert!(
        host == "127.0.0.1" || host == env.gw.http.to_string(),
        "unexpected Host {host:?}"
    );
    assert!(rec.header("x-api-key").is_none());
    assert!(rec.header("authorization").is_none());

    let (status, _, _) = h2_get(env.gw.http, "/v1/public/h2", &[("x-api-key", INVALID_KEY)]).await;
    assert_eq!(status, 401);
    assert_eq!(env.up.count(), 1);
}
