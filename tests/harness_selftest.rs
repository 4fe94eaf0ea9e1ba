//! Self-test of the shared harness in `tests/common/`: proves the upstream's
//! recording and fault modes, the raw/keep-alive/h2 clients and the process
//! plumbing work, without depending on the `keygate` binary's behaviour.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;

const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn echo_records_method_path_headers_body_exactly() {
    let up = Upstream::start(Mode::Echo).await;
    let req = b"POST /p/a%20b?x=1&y=2 HTTP/1.1\r\nHost: example\r\nX-Odd-CASE: Va lue\r\nx-dup: a\r\nX-Dup: b\r\nContent-Length: 5\r\n\r\nhello";
    let out = raw_exchange_n(up.addr(), req, 1, NET_TIMEOUT).await;
    assert_eq!(out.statuses(), vec![200], "{}", out.text());

    let recs = up.records();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path_and_query, "/p/a%20b?x=1&y=2");
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(r.body, b"hello");
    assert_eq!(r.header("x-odd-case").as_deref(), Some("Va lue"));
    assert_eq!(r.header("X-ODD-case").as_deref(), Some("Va lue"));
    assert_eq!(r.header_all("x-dup"), vec!["a", "b"]);
    assert_eq!(r.header("x-dup").as_deref(), Some("a, b"));
    let names: Vec<_> = r.header_names().into_iter().collect();
    assert_eq!(names, ["content-length", "host", "x-dup", "x-odd-case"]);
    assert_eq!(Some(r.peer), out.local_addr);
    assert_eq!(r.conn, 1);

    let resp = &out.responses()[0];
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = json(&resp.body);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/p/a%20b?x=1&y=2");
    assert_eq!(v["headers"]["x-odd-case"], "Va lue");
    assert_eq!(v["headers"]["x-dup"], "a, b");
}

#[tokio::test]
async fn status_and_set_mode_on_open_keepalive() {
    let up = Upstream::start(Mode::Status(503)).await;
    let (status, _, body) = get(up.addr(), "/s", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["path"], "/s");

    // HTTP modes are re-read per request, even on an open connection.
    let mut ka = KeepAlive::connect(up.addr()).await;
    assert_eq!(ka.get("/1", &[]).await.0, 503);
    up.set_mode(Mode::Echo);
    assert_eq!(up.mode(), Mode::Echo);
    assert_eq!(ka.get("/2", &[]).await.0, 200);
}

#[tokio::test]
async fn keepalive_reuses_one_connection() {
    let up = Upstream::start(Mode::Echo).await;
    let mut ka = KeepAlive::connect(up.addr()).await;
    for i in 0..3 {
        let (status, headers, body) = ka.get(&format!("/k{i}"), &[("x-n", "v")]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(json(&body)["headers"]["x-n"], "v");
    }
    let (status, _, body) = ka.post("/post", &[], "payload").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["body_len"], 7);
    assert!(!ka.is_closed());
    assert_eq!(up.accepted(), 1);
    assert_eq!(up.count(), 4);
    assert!(up
        .records()
        .iter()
        .all(|r| r.conn == 1 && r.peer == ka.local_addr()));
    assert_eq!(up.last().expect("record").body_str(), "payload");

    // The upstream dropping the connection is visible to the client.
    up.drop_connections();
    eventually_named("keep-alive closed", NET_TIMEOUT, || async {
        ka.is_closed().then_some(())
    })
    .await;
    assert!(ka
        .try_send(build_request(
            http::Method::GET,
            up.addr(),
            "/",
            &[],
            bytes::Bytes::new()
        ))
        .await
        .is_err());
    eventually(NET_TIMEOUT, || async {
        (up.open_connections() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn source_ip_binding() {
    let up = Upstream::start(Mode::Echo).await;
    let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let out = raw_exchange_from(
        src,
        up.addr(),
        b"GET /from HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        NET_TIMEOUT,
    )
    .await;
    assert!(out.eof && !out.timed_out);
    assert_eq!(out.statuses(), vec![200]);
    assert_eq!(up.last().expect("record").peer.ip(), src);

    let mut ka = KeepAlive::connect_from(src, up.addr()).await;
    assert_eq!(ka.get("/ka", &[]).await.0, 200);
    assert_eq!(ka.local_addr().ip(), src);
    assert_eq!(get_from(src, up.addr(), "/g", &[]).await.0, 200);
    assert!(up.records().iter().all(|r| r.peer.ip() == src));
}

#[tokio::test]
async fn pipelined_responses_parse() {
    let up = Upstream::start(Mode::Echo).await;
    let req = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\nGET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(up.addr(), req, NET_TIMEOUT).await;
    assert!(out.eof, "server should close after Connection: close");
    let rs = out.responses();
    assert_eq!(out.statuses(), vec![200, 200, 200]);
    let paths: Vec<_> = rs.iter().map(|r| json(&r.body)["path"].clone()).collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);
    assert_eq!(up.accepted(), 1);
}

#[test]
fn parser_handles_chunked_interim_and_bodyless() {
    let bytes = b"HTTP/1.1 100 Continue\r\n\r\n\
HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n\
HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n\
HTTP/1.0 404 Not Found\r\nContent-Length: 3\r\n\r\nnopHTTP/1.1 200 OK\r\n\r\nto-eof";
    let rs = parse_responses(bytes, true);
    let st: Vec<_> = rs.iter().map(|r| r.status).collect();
    assert_eq!(st, [100, 200, 204, 404, 200]);
    assert_eq!(rs[1].body, b"abcde");
    assert_eq!(rs[3].version, "HTTP/1.0");
    assert_eq!(rs[3].reason, "Not Found");
    assert_eq!(rs[3].body, b"nop");
    assert_eq!(rs[4].body, b"to-eof");
    assert!(rs.iter().all(|r| r.complete));
    // Same bytes but connection still open: the read-to-close body is incomplete.
    assert!(!parse_responses(bytes, false)[4].complete);
    // Truncated chunked body.
    let cut = parse_responses(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        false,
    );
    assert_eq!(cut.len(), 1);
    assert!(!cut[0].complete);
    assert!(parse_responses(b"garbage\r\n\r\n", true).is_empty());
}

#[tokio::test]
async fn slow_mode_delays_and_sees_client_disconnect() {
    let up = Upstream::start(Mode::Slow(Duration::from_millis(200))).await;
    let t = Instant::now();
    assert_eq!(get(up.addr(), "/slow", &[]).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));

    // A client that gives up mid-request closes the upstream connection long
    // before the slow answer is due.
    up.set_mode(Mode::Slow(Duration::from_secs(30)));
    let out = raw_exchange(up.addr(), b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n", SHORT).await;
    assert!(out.timed_out && out.bytes.is_empty());
    eventually_named(
        "upstream sees disconnect",
        Duration::from_secs(3),
        || async { (up.open_connections() == 0).then_some(()) },
    )
    .await;
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn blackhole_never_answers() {
    let up = Upstream::start(Mode::Blackhole).await;
    let out = raw_exchange(up.addr(), b"GET /bh HTTP/1.1\r\nHost: x\r\n\r\n", SHORT).await;
    assert!(out.timed_out && !out.closed() && out.bytes.is_empty());
    assert_eq!(up.last().expect("record").path_and_query, "/bh");
    assert_eq!(up.open_connections(), 1);
}

#[tokio::test]
async fn slow_headers_sends_only_status_line() {
    let up = Upstream::start(Mode::SlowHeaders).await;
    let req = b"GET /sh HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n";
    // Stalls: nothing ends the response while we keep our side open.
    let out = raw_exchange(up.addr(), req, SHORT).await;
    assert!(out.timed_out && !out.closed());
    assert!(out.responses().is_empty());
    // Exactly the status line was sent: after our half-close the upstream
    // closes, so the capture is complete without relying on timing.
    let out = raw_exchange_opts(up.addr(), req, NET_TIMEOUT, true).await;
    assert!(out.eof);
    assert_eq!(out.bytes, b"HTTP/1.1 200 OK\r\n");
    let r = up.last().expect("record");
    assert_eq!((r.method.as_str(), r.version.as_str()), ("GET", "HTTP/1.1"));
    assert_eq!(r.header("x-a").as_deref(), Some("1"));
}

#[tokio::test]
async fn stall_body_sends_ten_of_hundred() {
    let up = Upstream::start(Mode::StallBody).await;
    let req = b"GET /st HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = raw_exchange(up.addr(), req, SHORT).await;
    assert!(out.timed_out && !out.closed());
    let out = raw_exchange_opts(up.addr(), req, NET_TIMEOUT, true).await;
    assert!(out.eof);
    let rs = out.responses();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].header("content-length").as_deref(), Some("100"));
    assert_eq!(rs[0].body, b"0123456789");
    assert!(!rs[0].complete);
}

#[tokio::test]
async fn rst_mid_body_resets() {
    let up = Upstream::start(Mode::RstMidBody).await;
    let out = raw_exchange(
        up.addr(),
        b"GET /rst HTTP/1.1\r\nHost: x\r\n\r\n",
        NET_TIMEOUT,
    )
    .await;
    assert!(out.reset, "expected ECONNRESET, got {out:?}");
    assert!(!out.timed_out);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn huge_headers_mode() {
    let up = Upstream::start(Mode::HugeHeaders).await;
    let out = raw_exchange(
        up.addr(),
        b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n",
        NET_TIMEOUT,
    )
    .await;
    assert!(out.eof);
    let rs = out.responses();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].header("x-huge").map(|v| v.len()), Some(200 * 1024));
    assert_eq!(rs[0].body, b"ok");
}

#[tokio::test]
async fn bad_framing_mode() {
    let up = Upstream::start(Mode::BadFraming).await;
    let out = raw_exchange(
        up.addr(),
        b"GET /bf HTTP/1.1\r\nHost: x\r\n\r\n",
        NET_TIMEOUT,
    )
    .await;
    assert!(out.eof);
    let rs = out.responses();
    assert_eq!(rs[0].header("content-length").as_deref(), Some("5"));
    assert_eq!(
        rs[0].header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(rs[0].body, b"hello");
}

#[tokio::test]
async fn unasked_101_mode() {
    let up = Upstream::start(Mode::Unasked101).await;
    // Half-close so the holding upstream sees EOF and closes promptly.
    let out = raw_exchange_opts(
        up.addr(),
        b"GET /u HTTP/1.1\r\nHost: x\r\n\r\n",
        NET_TIMEOUT,
        true,
    )
    .await;
    assert!(out.eof && !out.timed_out);
    let rs = out.responses();
    assert_eq!(out.statuses(), vec![101]);
    assert_eq!(rs[0].header("upgrade").as_deref(), Some("websocket"));
}

#[tokio::test]
async fn raw_modes_apply_to_new_connections_and_stop_refuses() {
    let up = Upstream::start(Mode::Echo).await;
    let mut ka = KeepAlive::connect(up.addr()).await;
    // A completed request proves the upstream accepted (and sampled the mode
    // for) this connection; connect() alone may return before accept().
    assert_eq!(ka.get("/first", &[]).await.0, 200);
    up.set_mode(Mode::Blackhole);
    // The open hyper connection keeps answering; a new one is blackholed.
    assert_eq!(ka.get("/still", &[]).await.0, 200);
    let out = raw_exchange(up.addr(), b"GET /new HTTP/1.1\r\nHost: x\r\n\r\n", SHORT).await;
    assert!(out.timed_out && out.bytes.is_empty());
    assert_eq!(up.accepted(), 2);

    up.stop();
    // stop() aborts the accept task; the listener closes on the runtime's
    // next tick, and a connect racing that close may see a reset instead.
    eventually_named("listener closed", NET_TIMEOUT, || async {
        let r = tokio::net::TcpStream::connect(up.addr()).await;
        r.err()
            .filter(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
}

#[tokio::test]
async fn refused_addr_refuses() {
    let addr = Upstream::refused_addr();
    let err = within("connect", NET_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .expect_err("nothing should listen there");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn h2_prior_knowledge_client() {
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
            let body = format!(
                "{:?} {} {}",
                req.version(),
                req.uri().path(),
                req.headers()
                    .get("x-k")
                    .map(|v| v.to_str().unwrap_or(""))
                    .unwrap_or("")
            );
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(bytes::Bytes::from(
                body,
            ))))
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    });
    let (status, _, body) = h2_get(addr, "/h2?q=1", &[("x-k", "v")]).await;
    assert_eq!(status, 200);
    assert_eq!(body, "HTTP/2.0 /h2 v");
    server.abort();
}

#[tokio::test]
async fn eventually_returns_value() {
    let start = Instant::now();
    let v = eventually(NET_TIMEOUT, || async {
        (start.elapsed() > Duration::from_millis(20)).then_some(42)
    })
    .await;
    assert_eq!(v, 42);
}

#[tokio::test]
#[should_panic(expected = "never true not met within")]
async fn eventually_panics_at_deadline() {
    eventually_named("never true", Duration::from_millis(50), || async {
        None::<()>
    })
    .await;
}

#[test]
fn listening_line_parses() {
    let l = parse_listening(
        r#"{"event":"listening","http":"127.0.0.1:1","https":null,"admin":"127.0.0.1:2"}"#,
    )
    .expect("parse");
    assert_eq!(l.http.port(), 1);
    assert_eq!(l.https, None);
    assert_eq!(l.admin.port(), 2);
    let l = parse_listening(
        r#"{"event":"listening","http":"127.0.0.1:1","https":"127.0.0.1:3","admin":"127.0.0.1:2"}"#,
    )
    .expect("parse");
    assert_eq!(l.https.map(|a| a.port()), Some(3));
    assert!(parse_listening(r#"{"event":"other"}"#).is_none());
    assert!(parse_listening("plain log line").is_none());
    // Must compile; the binary itself is not exercised here.
    assert!(keygate_bin().ends_with("keygate"));
}

/// A shell script stands in for the gateway to exercise the process plumbing.
fn fake_gateway(script: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

#[tokio::test]
async fn process_plumbing_with_fake_gateway() {
    let dir = tempdir();
    let log = dir.path().join("gateway.stderr.log");
    let script = r#"echo 'starting'; echo '{"event":"listening","http":"127.0.0.1:11","https":null,"admin":"127.0.0.1:12"}'; echo 'after'; echo 'secret-on-stderr' >&2; exec sleep 30"#;
    let mut gw = Gateway::spawn_command(fake_gateway(script), &log)
        .await
        .expect("spawn");
    assert_eq!(gw.http.port(), 11);
    assert_eq!(gw.admin.port(), 12);
    assert_eq!(gw.https, None);
    eventually_named("stdout drained", NET_TIMEOUT, || async {
        (gw.stdout_lines().len() == 3).then_some(())
    })
    .await;
    assert_eq!(gw.stdout_lines()[2], "after");
    eventually_named("stderr logged", NET_TIMEOUT, || async {
        gw.stderr_contents()
            .contains("secret-on-stderr")
            .then_some(())
    })
    .await;
    let leak = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gw.assert_not_logged("secret-on-stderr")
    }));
    assert!(leak.is_err(), "leak must be detected");
    gw.assert_not_logged("never-printed");

    assert!(gw.try_exit().is_none());
    gw.sigterm();
    let status = gw.wait_exit(Duration::from_secs(5)).await;
    assert!(!status.success());

    // Startup failure is reported with stderr, not a hang.
    let err = Gateway::spawn_command(fake_gateway("echo boom >&2; exit 3"), &log)
        .await
        .err()
        .expect("must fail");
    assert!(err.contains("boom") && err.contains("exit status"), "{err}");
}

#[tokio::test]
async fn drop_kills_and_reaps_fake_gateway() {
    let dir = tempdir();
    let log = dir.path().join("gateway.stderr.log");
    let script = r#"echo '{"event":"listening","http":"127.0.0.1:1","https":"127.0.0.1:3","admin":"127.0.0.1:2"}'; exec sleep 30"#;
    let gw = Gateway::spawn_command(fake_gateway(script), &log)
        .await
        .expect("spawn");
    assert_eq!(gw.https.map(|a| a.port()), Some(3));
    let pid = gw.pid().to_string();
    drop(gw);
    // The child was SIGKILLed and reaped, so the pid no longer exists.
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("kill -0");
    assert!(!alive.success());
}
