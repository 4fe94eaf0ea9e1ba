//! Fleet mode over TLS: `keygate control` with `[control] tls`, a gateway with an `https://`
//! `feed_url` trusting only `keys.feed_ca`, a revocation through the REST API reaching the
//! gateway; and a gateway whose CA does not match never syncs (fails closed, not open).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRET: &str = "feed-tls-test-secret-0123456789abcdefghijklmnop";

struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `keygate control` and read its `{"event":"listening","control":…}` line.
fn start_control(config: &Path) -> (Control, SocketAddr) {
    let mut child = Command::new(keygate_bin())
        .arg("--config")
        .arg(config)
        .arg("control")
        .env("API_KEY_HASH_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(config.with_file_name("control.stderr.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(STARTUP_TIMEOUT)
        .expect("control plane listening line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["control"].as_str().unwrap().parse().unwrap();
    (Control(child), addr)
}

fn cert(dir: &Path, prefix: &str) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join(format!("{prefix}.pem")), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-key.pem")),
        ck.key_pair.serialize_pem(),
    )
    .unwrap();
}

fn gateway_config(dir: &Path, control: SocketAddr, up: SocketAddr, ca: &str) -> std::path::PathBuf {
    write_file(
        dir,
        "gw.toml",
        &format!(
            r#"[keys]
source = "feed"
feed_url = "https://localhost:{port}/v1/feed"
feed_ca = "{ca}"
feed_token_env = "KEYGATE_FEED_TOKEN"
feed_cache = "gw-cache.jsonl"
usage_file = "gw-usage.json"
audit_log = "gw-audit.jsonl"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[plans.default]
rate = "1000/s"
[[upstreams]]
name = "up"
targets = ["{up}"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "up"
"#,
            port = control.port()
        ),
    )
}

fn token(config: &Path, role: &str) -> String {
    let out = cli(
        config,
        &["admin-token", "create", "--role", role],
        &[("API_KEY_HASH_SECRET", SECRET)],
    );
    assert!(out.status.success(), "{}", stderr_str(&out));
    stdout_str(&out).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_over_tls_syncs_and_a_wrong_ca_never_does() {
    let dir = tempdir();
    cert(dir.path(), "cp");
    cert(dir.path(), "other");
    let cp_config = write_file(
        dir.path(),
        "control.toml",
        "[keys]\nstore = \"keys.jsonl\"\n[control]\nlisten = \"127.0.0.1:0\"\nheartbeat_ms = 200\ntls = { cert = \"cp.pem\", key = \"cp-key.pem\" }\n[plans.default]\nrate = \"1000/s\"\n",
    );
    let feed_token = token(&cp_config, "feed");
    let out = cli(
        &cp_config,
        &["keys", "create", "--name", "n", "--owner", "o", "--json"],
        &[("API_KEY_HASH_SECRET", SECRET)],
    );
    let created: serde_json::Value = serde_json::from_str(stdout_str(&out).trim()).unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    let (_control, cp_addr) = start_control(&cp_config);
    let up = Upstream::start(Mode::Echo).await;

    // Trusting the control plane's certificate: syncs, serves, and sees a revocation.
    let good_dir = dir.path().join("good");
    std::fs::create_dir_all(&good_dir).unwrap();
    let good = gateway_config(&good_dir, cp_addr, up.addr(), "../cp.pem");
    let gw = Gateway::spawn(
        &good,
        &[
            ("API_KEY_HASH_SECRET", SECRET),
            ("KEYGATE_FEED_TOKEN", &feed_token),
        ],
    )
    .await;
    let addr = gw.http;
    let auth = format!("Bearer {key}");
    eventually_named("key works through the TLS feed", Duration::from_secs(20), || {
        let auth = auth.clone();
        async move { (get(addr, "/x", &[("authorization", &auth)]).await.0 == 200).then_some(()) }
    })
    .await;
    let out = cli(
        &cp_config,
        &["keys", "revoke", &id],
        &[("API_KEY_HASH_SECRET", SECRET)],
    );
    assert!(out.status.success());
    eventually_named("revocation over the TLS feed", Duration::from_secs(20), || {
        let auth = auth.clone();
        async move { (get(addr, "/x", &[("authorization", &auth)]).await.0 == 401).then_some(()) }
    })
    .await;

    // Trusting some other CA: the handshake fails, the gateway never loads a table and fails closed.
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = gateway_config(&bad_dir, cp_addr, up.addr(), "../other.pem");
    let gw_bad = Gateway::spawn(
        &bad,
        &[
            ("API_KEY_HASH_SECRET", SECRET),
            ("KEYGATE_FEED_TOKEN", &feed_token),
        ],
    )
    .await;
    let admin = gw_bad.admin;
    let log = gw_bad.stderr_log.clone();
    eventually_named("TLS failure logged", Duration::from_secs(20), || {
        let log = log.clone();
        async move { read_lossy(&log).contains("TLS").then_some(()) }
    })
    .await;
    assert_eq!(get(admin, "/readyz", &[]).await.0, 503);
    assert_eq!(
        get(gw_bad.http, "/x", &[("authorization", &auth)]).await.0,
        503
    );
}
