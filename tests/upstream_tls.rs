//! The upstream client on the real binary: `https://` targets (a TLS upstream with a CA and
//! certificates generated here; the pooled connection reused across requests, counted by the
//! upstream; a wrong CA → 502 problem+json; mTLS required by the upstream, satisfied by the
//! configured client certificate and refused without it), the pool against upstreams that
//! close idle keep-alive connections (no client request fails), the idle timeout closing
//! pooled connections, and config errors naming the field (`keygate check`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// A CA (certificate and key) generated for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names` (DNS names or IPs) with `usage`, written as `<prefix>.pem` and
    /// `<prefix>-key.pem` in `dir`.
    fn issue(
        &self,
        dir: &Path,
        prefix: &str,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, prefix);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = dir.join(format!("{prefix}.pem"));
        let key_path = dir.join(format!("{prefix}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }
}

/// A TLS HTTP/1.1 upstream on 127.0.0.1:0 counting accepted connections and requests.
struct TlsUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: AbortHandle,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    /// Serves `cert`/`key`; with `client_ca`, requires a client certificate it signed.
    async fn start(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsUpstream {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (accepted.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let r = r.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(NET_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let body = format!("tls upstream saw {}", req.uri().path());
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        })
        .abort_handle();
        TlsUpstream {
            addr,
            accepted,
            requests,
            task,
        }
    }
}

/// Gateway config: key store beside it, a generous default plan, listeners on port 0, and
/// `upstreams_and_routes` appended.
fn config(dir: &Path, upstreams_and_routes: &str) -> PathBuf {
    write_file(
        dir,
        "keygate.toml",
        &format!(
            r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
poll_interval_ms = 50

[plans.default]
rate = "1000/s"
burst = 1000

[server]
listen = "127.0.0.1:0"
shutdown_delay_ms = 0

[admin]
listen = "127.0.0.1:0"

{upstreams_and_routes}
"#
        ),
    )
}

fn route(name: &str, prefix: &str, upstream: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\n"
    )
}

fn is_problem(headers: &http::HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_reached_over_one_pooled_connection_and_a_wrong_ca_is_502() {
    let dir = tempdir();
    let ca = Ca::new("upstream test CA");
    let other = Ca::new("some other CA");
    let (cert, key) = ca.issue(
        dir.path(),
        "upstream",
        &["localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    ca.write(dir.path(), "ca.pem");
    other.write(dir.path(), "other-ca.pem");
    let up = TlsUpstream::start(&cert, &key, None).await;
    let port = up.addr.port();
    // `localhost` goes through the resolver (and the certificate's DNS name is checked).
    let cfg = config(
        dir.path(),
        &format!(
            r#"[[upstreams]]
name = "tls"
targets = ["https://localhost:{port}"]
ca = "ca.pem"

[[upstreams]]
name = "wrong-ca"
targets = ["https://localhost:{port}"]
ca = "other-ca.pem"

{}
{}"#,
            route("good", "/good", "tls"),
            route("wrong", "/wrong", "wrong-ca"),
        ),
    );
    let k = create_key(&cfg, &[]);
    let gw = spawn_ready(&cfg, &[], Duration::from_secs(30)).await;
    let auth = format!("Bearer {}", k.key);

    for i in 0..5 {
        let (status, _, body) =
            get(gw.http, &format!("/good/{i}"), &[("authorization", &auth)]).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], format!("tls upstream saw /good/{i}").as_bytes());
    }
    assert_eq!(
        up.accepted.load(Ordering::SeqCst),
        1,
        "five sequential requests share one pooled TLS connection"
    );

    let (status, headers, body) = get(gw.http, "/wrong/x", &[("authorization", &auth)]).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert!(is_problem(&headers), "{headers:?}");
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        5,
        "nothing reached the upstream"
    );
    gw.assert_not_logged(&k.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_upstream_accepts_the_configured_client_certificate_and_refuses_without() {
    let dir = tempdir();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    // Reached by IP, checked against the name in `server_name`: the certificate carries only it.
    let (cert, key) = server_ca.issue(
        dir.path(),
        "upstream",
        &["upstream.internal"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    client_ca.issue(
        dir.path(),
        "gateway-client",
        &["keygate"],
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    server_ca.write(dir.path(), "server-ca.pem");
    let client_ca_path = client_ca.write(dir.path(), "client-ca.pem");
    let up = TlsUpstream::start(&cert, &key, Some(&client_ca_path)).await;
    let target = format!("https://{}", up.addr);
    let cfg = config(
        dir.path(),
        &format!(
            r#"[[upstreams]]
name = "mtls"
targets = ["{target}"]
ca = "server-ca.pem"
server_name = "upstream.internal"
client_cert = "gateway-client.pem"
client_key = "gateway-client-key.pem"

[[upstreams]]
name = "no-cert"
targets = ["{target}"]
ca = "server-ca.pem"
server_name = "upstream.internal"

{}
{}"#,
            route("mtls", "/mtls", "mtls"),
            route("nocert", "/nocert", "no-cert"),
        ),
    );
    let k = create_key(&cfg, &[]);
    let gw = spawn_ready(&cfg, &[], Duration::from_secs(30)).await;
    let auth = format!("Bearer {}", k.key);

    let (status, _, body) = get(gw.http, "/mtls/a", &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"tls upstream saw /mtls/a");

    let (status, headers, body) = get(gw.http, "/nocert/a", &[("authorization", &auth)]).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert!(is_problem(&headers), "{headers:?}");
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "only the request with a client certificate was served"
    );
}

/// A plain HTTP/1.1 upstream speaking raw bytes: answers each request with a keep-alive 200
/// (no `Connection: close`), then closes the connection either at once (`idle` = zero) or
/// after `idle` without a next request, like nginx's `keepalive_timeout`. Counts accepted and
/// closed connections.
struct ClosingUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: AbortHandle,
}

impl Drop for ClosingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosingUpstream {
    async fn start(idle: Duration) -> ClosingUpstream {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut first = true;
                    loop {
                        // The first request gets the full network timeout; later ones `idle`.
                        let wait = if first { NET_TIMEOUT } else { idle };
                        first = false;
                        match tokio::time::timeout(wait, read_head(&mut tcp)).await {
                            Ok(true) => {
                                let ok = tcp
                                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                    .await;
                                if ok.is_err() || idle.is_zero() {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    drop(tcp);
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
        .abort_handle();
        ClosingUpstream {
            addr,
            accepted,
            closed,
            task,
        }
    }
}

/// Reads one request head (GET, no body); false on EOF or error.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_closing_idle_keep_alive_connections_fail_no_request() {
    let dir = tempdir();
    let at_once = ClosingUpstream::start(Duration::ZERO).await;
    let after_idle = ClosingUpstream::start(Duration::from_millis(100)).await;
    let cfg = config(
        dir.path(),
        &format!(
            r#"[[upstreams]]
name = "at-once"
targets = ["{}"]

[[upstreams]]
name = "after-idle"
targets = ["http://{}"]

{}
{}"#,
            at_once.addr,
            after_idle.addr,
            route("at-once", "/once", "at-once"),
            route("after-idle", "/idle", "after-idle"),
        ),
    );
    let k = create_key(&cfg, &[]);
    let gw = spawn_ready(&cfg, &[], Duration::from_secs(30)).await;
    let auth = format!("Bearer {}", k.key);

    // Closed right after each response: the gateway's pooled connection is dead by the next
    // request (seen as closed, or the request comes back unsent and goes on a new one).
    for i in 0..20 {
        let (status, _, body) = get(gw.http, "/once/x", &[("authorization", &auth)]).await;
        assert_eq!(
            status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(at_once.accepted.load(Ordering::SeqCst), 20);

    // Closed after 100 ms idle: each request after the upstream closed gets a new connection.
    for i in 1..=3 {
        let (status, _, body) = get(gw.http, "/idle/x", &[("authorization", &auth)]).await;
        assert_eq!(
            status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        let closed = after_idle.closed.clone();
        eventually_named(
            "upstream closed the idle connection",
            Duration::from_secs(10),
            || {
                let closed = closed.clone();
                async move { (closed.load(Ordering::SeqCst) >= i).then_some(()) }
            },
        )
        .await;
    }
    assert_eq!(after_idle.accepted.load(Ordering::SeqCst), 3);
}

/// An upstream that answers the first request on each connection (keep-alive 200), then reads
/// the next request whole and closes without answering: the race of an upstream's idle close
/// with a reused connection, made certain. Counts connections and request heads.
async fn drop_second_request_upstream() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, h) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                if !read_head(&mut tcp).await {
                    return;
                }
                h.fetch_add(1, Ordering::SeqCst);
                if tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
                if read_head(&mut tcp).await {
                    h.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, accepted, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_bodiless_request_is_sent_again_when_its_pooled_connection_was_closed() {
    let dir = tempdir();
    let (addr, accepted, heads) = drop_second_request_upstream().await;
    let cfg = config(
        dir.path(),
        &format!(
            "[[upstreams]]\nname = \"up\"\ntargets = [\"{addr}\"]\n\n{}",
            route("all", "/", "up"),
        ),
    );
    let k = create_key(&cfg, &[]);
    let gw = spawn_ready(&cfg, &[], Duration::from_secs(30)).await;
    let auth = format!("Bearer {}", k.key);
    let ok = |r: Resp| (r.0, r.2);
    assert_eq!(
        ok(get(gw.http, "/a", &[("authorization", &auth)]).await),
        (200, Bytes::from_static(b"ok"))
    );
    // Written on the pooled connection, which the upstream closes unanswered: a GET with no
    // body is sent again on a new connection and the client never sees the close.
    assert_eq!(
        ok(get(gw.http, "/a", &[("authorization", &auth)]).await),
        (200, Bytes::from_static(b"ok"))
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(heads.load(Ordering::SeqCst), 3, "the GET went out twice");
    // A POST with a body on the pooled connection (the one the retry opened): not safe to
    // repeat, so the client gets the 502 and the upstream saw it once.
    let (status, _, body) = post(
        gw.http,
        "/a",
        &[("authorization", &auth), ("content-type", "text/plain")],
        "abc",
    )
    .await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "no second attempt");
    assert_eq!(heads.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_idle_past_the_timeout_are_closed() {
    let dir = tempdir();
    let up = Upstream::start(Mode::Echo).await;
    let cfg = config(
        dir.path(),
        &format!(
            "[[upstreams]]\nname = \"up\"\ntargets = [\"{}\"]\npool_idle_timeout_ms = 300\n\n{}",
            up.addr(),
            route("all", "/", "up"),
        ),
    );
    let k = create_key(&cfg, &[]);
    let gw = spawn_ready(&cfg, &[], Duration::from_secs(30)).await;
    let auth = format!("Bearer {}", k.key);
    for _ in 0..3 {
        assert_eq!(get(gw.http, "/a", &[("authorization", &auth)]).await.0, 200);
    }
    assert_eq!(
        up.accepted(),
        1,
        "sequential requests reuse the pooled connection"
    );
    let up = &up;
    eventually_named(
        "idle connection closed by the gateway",
        Duration::from_secs(10),
        || async move { (up.open_connections() == 0).then_some(()) },
    )
    .await;
    assert_eq!(get(gw.http, "/a", &[("authorization", &auth)]).await.0, 200);
    assert_eq!(
        up.accepted(),
        2,
        "a new connection after the idle one was closed"
    );
}

#[test]
fn check_names_the_upstream_tls_fields() {
    let dir = tempdir();
    let ca = Ca::new("check CA");
    ca.write(dir.path(), "ca.pem");
    std::fs::write(dir.path().join("not-a-cert.pem"), "hello").unwrap();
    let cases = [
        (
            "targets = [\"https://127.0.0.1:1\"]",
            "upstreams[0].ca",
            "required",
        ),
        (
            "targets = [\"https://127.0.0.1:1\"]\nca = \"missing.pem\"",
            "upstreams[0].ca",
            "missing.pem",
        ),
        (
            "targets = [\"https://127.0.0.1:1\"]\nca = \"not-a-cert.pem\"",
            "upstreams[0].ca",
            "no PEM certificate",
        ),
        (
            "targets = [\"https://127.0.0.1:1\"]\nca = \"ca.pem\"\nclient_cert = \"ca.pem\"",
            "upstreams[0].client_key",
            "client_cert needs client_key",
        ),
        (
            "targets = [\"127.0.0.1:1\"]\nca = \"ca.pem\"",
            "upstreams[0].ca",
            "no target is https://",
        ),
        (
            "targets = [\"https://127.0.0.1:1\"]\nca = \"ca.pem\"\nserver_name = \"bad name!\"",
            "upstreams[0].server_name",
            "bad name!",
        ),
        (
            "targets = [\"ftp://127.0.0.1:1\"]",
            "upstreams[0].targets",
            "ftp://",
        ),
        (
            "targets = [\"127.0.0.1:1\"]\ncert = \"x\"",
            "cert",
            "unknown field",
        ),
    ];
    for (upstream, field, message) in cases {
        let cfg = config(
            dir.path(),
            &format!(
                "[[upstreams]]\nname = \"up\"\n{upstream}\n\n{}",
                route("all", "/", "up")
            ),
        );
        let out = cli(&cfg, &["check"], SECRET_ENV);
        let text = format!("{}{}", stdout_str(&out), stderr_str(&out));
        assert!(!out.status.success(), "{upstream}: {text}");
        assert!(
            text.contains(field) && text.contains(message),
            "{upstream}: want {field} / {message}: {text}"
        );
    }
}
