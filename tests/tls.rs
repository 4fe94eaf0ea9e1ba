//! TLS on the data listener (THREATS K1, E4): real rustls handshakes against `keygate serve`
//! with certificates generated in the test, HTTP/1.1 and HTTP/2 via ALPN, TLS 1.2, plain
//! HTTP on the TLS port, handshake and post-handshake stalls, certificate replacement without
//! a restart, and the certificate-expiry metric.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

struct Env {
    dir: tempfile::TempDir,
    gw: Gateway,
    up: Upstream,
    key: String,
    /// DER of the certificate the gateway started with.
    cert: CertificateDer<'static>,
}

/// A fresh self-signed `localhost` certificate: (cert PEM, key PEM, cert DER).
fn new_cert() -> (String, String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    (
        ck.cert.pem(),
        ck.key_pair.serialize_pem(),
        ck.cert.der().clone(),
    )
}

/// Replace `name` atomically: write a temp file in the same directory, then rename over it.
fn replace_file(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).expect("write temp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

async fn start() -> Env {
    start_with_header_ms(500).await
}

/// `start` with `header_read_timeout_ms` (also the idle limit of a keep-alive connection).
async fn start_with_header_ms(header_ms: u64) -> Env {
    let up = Upstream::start(Mode::Echo).await;
    let dir = tempdir();
    let (cert_pem, key_pem, cert) = new_cert();
    write_file(dir.path(), "cert.pem", &cert_pem);
    write_file(dir.path(), "key.pem", &key_pem);
    let config: PathBuf = write_file(
        dir.path(),
        "keygate.toml",
        &gateway_config(
            up.addr(),
            1000,
            &format!(
                r#"tls = {{ cert = "cert.pem", key = "key.pem" }}
tls_handshake_timeout_ms = 500
header_read_timeout_ms = {header_ms}
drain_timeout_ms = 2000"#
            ),
            "",
            r#"[limits]
auth_failures_per_minute = 100000

[[routes]]
name = "public"
path_prefix = "/v1/public"
scopes = ["public"]
upstream = "up"
"#,
        ),
    );
    let key = create_key(&config, &["--scope", "public"]).key;
    let gw = Gateway::spawn(&config, SECRET_ENV).await;
    assert_eq!(
        gw.https,
        Some(gw.http),
        "tls without its own listen makes the main listener HTTPS"
    );
    wait_ready(&gw, Duration::from_secs(15)).await;
    Env {
        dir,
        gw,
        up,
        key,
        cert,
    }
}

enum Versions {
    Default,
    Tls12Only,
}

fn client_config(
    roots: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
    versions: Versions,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("add root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let builder = match versions {
        Versions::Default => builder.with_safe_default_protocol_versions(),
        Versions::Tls12Only => builder.with_protocol_versions(&[&rustls::version::TLS12]),
    }
    .expect("protocol versions");
    let mut cfg = builder.with_root_certificates(store).with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = connect(None, addr, NET_TIMEOUT).await;
    let name = ServerName::try_from("localhost").expect("server name");
    match tokio::time::timeout(NET_TIMEOUT, TlsConnector::from(cfg).connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("handshake: {e}")),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// An HTTP/1.1 client on an established TLS stream, and the task driving it.
async fn h1_client(
    tls: TlsStream<TcpStream>,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, conn) = within(
        "h1 handshake",
        NET_TIMEOUT,
        hyper::client::conn::http1::handshake(TokioIo::new(tls)),
    )
    .await
    .expect("h1 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

/// One HTTP/1.1 GET over an established TLS stream.
async fn h1_over(tls: TlsStream<TcpStream>, path: &str, key: &str) -> (u16, Bytes) {
    let (mut sender, conn) = h1_client(tls).await;
    let req = Request::get(path)
        .header("host", "localhost")
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within("h1 request", NET_TIMEOUT, sender.send_request(req))
        .await
        .expect("h1 response");
    let status = resp.status().as_u16();
    let body = within("h1 body", NET_TIMEOUT, resp.into_body().collect())
        .await
        .expect("h1 body")
        .to_bytes();
    conn.abort();
    (status, body)
}

/// One HTTP/2 GET over an established TLS stream.
async fn h2_over(tls: TlsStream<TcpStream>, path: &str, key: &str) -> (u16, Bytes) {
    let (mut sender, conn) = within(
        "h2 handshake",
        NET_TIMEOUT,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(format!("https://localhost{path}"))
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = within("h2 request", NET_TIMEOUT, sender.send_request(req))
        .await
        .expect("h2 response");
    let status = resp.status().as_u16();
    let body = within("h2 body", NET_TIMEOUT, resp.into_body().collect())
        .await
        .expect("h2 body")
        .to_bytes();
    conn.abort();
    (status, body)
}

/// Value of an unlabelled (or the first matching) metric line starting with `prefix`.
async fn metric(gw: &Gateway, prefix: &str) -> Option<f64> {
    let (status, _, body) = get(gw.admin, "/metrics", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn h1_and_h2_over_tls_via_alpn() {
    let env = start().await;

    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
    )
    .await
    .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, body) = h1_over(tls, "/v1/public/h1", &env.key).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = env.up.last().expect("forwarded");
    assert_eq!(rec.path_and_query, "/v1/public/h1");
    assert_eq!(rec.header("x-forwarded-proto").as_deref(), Some("https"));
    assert!(rec.header("x-api-key").is_none());

    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"h2"], Versions::Default),
    )
    .await
    .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, body) = h2_over(tls, "/v1/public/h2", &env.key).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let rec = env.up.last().expect("forwarded");
    assert_eq!(rec.path_and_query, "/v1/public/h2");
    assert_eq!(rec.header("x-forwarded-proto").as_deref(), Some("https"));

    // Bad key over TLS: refused like over plain HTTP.
    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
    )
    .await
    .expect("tls");
    let (status, _) = h1_over(tls, "/v1/public/h1", "kg_live_nope").await;
    assert_eq!(status, 401);
    assert_eq!(env.up.count(), 2);
}

#[tokio::test]
async fn tls12_works_and_plain_http_on_the_tls_port_gets_no_http_response() {
    let env = start().await;
    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Tls12Only),
    )
    .await
    .expect("tls 1.2 handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (status, _) = h1_over(tls, "/v1/public/tls12", &env.key).await;
    assert_eq!(status, 200);

    let before = metric(&env.gw, "keygate_tls_handshake_failures_total")
        .await
        .unwrap_or(0.0);
    let request = format!(
        "GET /v1/public/plain HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {}\r\n\r\n",
        env.key
    );
    let out = raw_exchange(env.gw.http, request.as_bytes(), Duration::from_secs(5)).await;
    eprintln!(
        "plain HTTP on TLS port: closed {} bytes {:?}",
        out.closed(),
        out.bytes
    );
    assert!(out.closed(), "plain HTTP connection not closed");
    assert!(
        !out.text().contains("HTTP/"),
        "an HTTP response came back: {}",
        out.text()
    );
    assert!(
        env.up
            .records()
            .iter()
            .all(|r| r.path_and_query != "/v1/public/plain"),
        "plain request forwarded"
    );
    let gw = &env.gw;
    eventually_named(
        "handshake failure counted",
        Duration::from_secs(5),
        || async move {
            let now = metric(gw, "keygate_tls_handshake_failures_total").await?;
            (now > before).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn handshake_and_post_handshake_stalls_are_cut() {
    let env = start().await;
    // TCP connect, no ClientHello: closed by tls_handshake_timeout_ms (500 ms).
    let started = Instant::now();
    let out = raw_exchange(env.gw.http, b"", Duration::from_secs(5)).await;
    let took = started.elapsed();
    eprintln!(
        "silent TCP on TLS port: closed {} after {took:?}",
        out.closed()
    );
    assert!(out.closed(), "still open after {took:?}");
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );

    // Handshake completes, then the client sends nothing: closed by the header read timeout
    // (the HTTP/2 preface sniffing phase must be bounded as well).
    let mut tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
    )
    .await
    .expect("tls");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
    )
    .await;
    let took = started.elapsed();
    eprintln!("silent TLS session: {res:?} after {took:?}");
    match res {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes: {:?}", &buf[..n]),
        Err(_) => panic!("idle TLS connection still open after {took:?}"),
    }

    // The listener is still healthy.
    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
    )
    .await
    .expect("tls");
    assert_eq!(h1_over(tls, "/v1/public/ok", &env.key).await.0, 200);
}

#[tokio::test]
async fn certificate_is_replaced_without_restart() {
    let mut env = start().await;
    let pid = env.gw.pid();
    let (cert_pem, key_pem, new_der) = new_cert();
    assert_ne!(new_der, env.cert);
    // Trust both so a handshake works whichever certificate is served.
    let cfg = client_config(&[&env.cert, &new_der], &[b"http/1.1"], Versions::Default);

    let tls = tls_connect(env.gw.http, cfg.clone()).await.expect("tls");
    let served = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
    assert_eq!(served, env.cert, "initial certificate");
    drop(tls);

    // Key first, then certificate, each replaced atomically.
    replace_file(env.dir.path(), "key.pem", &key_pem);
    replace_file(env.dir.path(), "cert.pem", &cert_pem);

    let addr = env.gw.http;
    let want = new_der.clone();
    let tls = eventually_named("new certificate served", Duration::from_secs(10), || {
        let cfg = cfg.clone();
        let want = want.clone();
        async move {
            // A handshake may fail while the pair is half-replaced; that is "not yet".
            let tls = tls_connect(addr, cfg).await.ok()?;
            let leaf = tls.get_ref().1.peer_certificates()?.first()?.clone();
            (leaf == want).then_some(tls)
        }
    })
    .await;
    let (status, _) = h1_over(tls, "/v1/public/rotated", &env.key).await;
    assert_eq!(status, 200);
    assert_eq!(env.gw.pid(), pid);
    assert!(env.gw.try_exit().is_none(), "gateway restarted or exited");
}

#[tokio::test]
async fn certificate_expiry_metric_is_exported() {
    let env = start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let expiry = metric(&env.gw, "keygate_tls_certificate_expiry_timestamp_seconds")
        .await
        .expect("expiry metric exported");
    eprintln!("certificate expiry metric: {expiry}");
    assert!(
        expiry > now,
        "expiry {expiry} not in the future (now {now})"
    );
}

/// `max_header_bytes` holds over TLS too (THREATS B1). hyper checks its limit only on an
/// incomplete head; a plain connection's reads are cut to keep it so (`keepalive`), and a
/// TLS connection's reads never exceed one TLS record (16 KiB), so a head past the limit is
/// always seen incomplete at it: 431 and close. One just under the limit is served.
#[tokio::test]
async fn a_head_over_the_header_limit_is_refused_over_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start().await;
    for (kib, want) in [
        (63usize, "HTTP/1.1 200 "),
        (65, "HTTP/1.1 431 "),
        (200, "HTTP/1.1 431 "),
    ] {
        let mut tls = tls_connect(
            env.gw.http,
            client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
        )
        .await
        .expect("tls");
        let req = format!(
            "GET /v1/public/big HTTP/1.1\r\nhost: localhost\r\nx-api-key: {}\r\nx-big: {}\r\nconnection: close\r\n\r\n",
            env.key,
            "a".repeat(kib * 1024)
        );
        // One write: the whole head is there for the gateway's first reads. A refused head
        // may be answered and closed before all of it is written: the write may then fail,
        // and the answer is read all the same.
        let _ = within("write", NET_TIMEOUT, tls.write_all(req.as_bytes())).await;
        let mut got = Vec::new();
        let _ = within("response", NET_TIMEOUT, tls.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(want), "{kib} KiB: {got}");
    }
    let forwarded = env.up.records().len();
    assert_eq!(forwarded, 1, "only the head under the limit is forwarded");
}

/// HTTP/1.1 over TLS (chosen by ALPN) is served in cycles as plain HTTP/1 is (`keepalive`): an
/// idle keep-alive connection gives hyper's buffers back, counted in
/// `keygate_connections_released_total`, and the same TLS session serves the next request.
#[tokio::test]
async fn idle_tls_keep_alive_connections_are_released_and_keep_serving() {
    let env = start_with_header_ms(20_000).await;
    let tls = tls_connect(
        env.gw.http,
        client_config(&[&env.cert], &[b"http/1.1"], Versions::Default),
    )
    .await
    .expect("tls");
    let (mut sender, conn) = h1_client(tls).await;
    let released = || async {
        metric(&env.gw, "keygate_connections_released_total")
            .await
            .unwrap_or(0.0)
    };
    for round in 0..3 {
        let before = released().await;
        let req = Request::post(format!("/v1/public/tls-{round}"))
            .header("host", "localhost")
            .header("x-api-key", &env.key)
            .body(Full::new(Bytes::from_static(b"a=1\r\n\r\nb=2")))
            .expect("request");
        let resp = within("h1 request", NET_TIMEOUT, sender.send_request(req))
            .await
            .expect("h1 response on the same connection");
        assert_eq!(resp.status(), 200, "round {round}");
        within("h1 body", NET_TIMEOUT, resp.into_body().collect())
            .await
            .expect("h1 body");
        eventually_named("an idle TLS connection released", NET_TIMEOUT, || async {
            (released().await > before).then_some(())
        })
        .await;
    }
    conn.abort();
    let recs = env.up.records();
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r.body == b"a=1\r\n\r\nb=2"));
}
