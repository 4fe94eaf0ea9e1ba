//! The test secret, key minting, gateway config and start-up shared by the suites.
//!
//! Every suite hashes keys with the same [`SECRET`]: [`cli_ok`], [`create_key`],
//! [`spawn_ready`] and [`ControlPlane`] pass it as [`SECRET_VAR`], so a key minted by one
//! verifies in a gateway or control plane started by another.

use super::{cli, eventually_named, get, json, keygate_bin, stderr_str, stdout_str};
use super::{Gateway, STARTUP_TIMEOUT};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The key-hashing secret of every suite (48 characters: well above the 32-byte minimum).
pub const SECRET: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL";
/// The environment variable `keygate` reads the secret from.
pub const SECRET_VAR: &str = "API_KEY_HASH_SECRET";
/// `[(SECRET_VAR, SECRET)]`, for [`cli`] and [`Gateway::spawn`].
pub const SECRET_ENV: &[(&str, &str)] = &[(SECRET_VAR, SECRET)];

/// A minted key: id and plaintext.
#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub key: String,
}

/// Runs `keygate --config <config> <args...>` with the secret; panics (with its stderr and
/// stdout) unless it succeeds, and returns its stdout.
pub fn cli_ok(config: &Path, args: &[&str]) -> String {
    let out = cli(config, args, SECRET_ENV);
    assert!(
        out.status.success(),
        "keygate {args:?} failed: {}\n{}",
        stderr_str(&out),
        stdout_str(&out)
    );
    stdout_str(&out)
}

/// `keys create --name n --owner o --json <extra...>`; scopes, plan etc. go in `extra`
/// (e.g. `&["--scope", "invoices:read"]`).
pub fn create_key(config: &Path, extra: &[&str]) -> Key {
    let mut args = vec!["keys", "create", "--name", "n", "--owner", "o", "--json"];
    args.extend_from_slice(extra);
    let v = json(cli_ok(config, &args).trim().as_bytes());
    Key {
        id: v["id"].as_str().expect("id in --json output").to_owned(),
        key: v["key"].as_str().expect("key in --json output").to_owned(),
    }
}

/// Polls the gateway's admin `/readyz` until it answers 200; panics after `deadline`.
pub async fn wait_ready(gw: &Gateway, deadline: Duration) {
    let admin = gw.admin;
    eventually_named("readyz 200", deadline, || async move {
        (get(admin, "/readyz", &[]).await.0 == 200).then_some(())
    })
    .await;
}

/// [`Gateway::spawn`] with the secret (plus `envs`), then [`wait_ready`] within `deadline`.
pub async fn spawn_ready(config: &Path, envs: &[(&str, &str)], deadline: Duration) -> Gateway {
    spawn_ready_args(config, &[], envs, deadline).await
}

/// [`spawn_ready`] with `args` after `serve --config <config>` (e.g. `--log-format json`).
pub async fn spawn_ready_args(
    config: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    deadline: Duration,
) -> Gateway {
    let mut all = SECRET_ENV.to_vec();
    all.extend_from_slice(envs);
    let gw = Gateway::try_spawn_args(config, args, &all)
        .await
        .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
    wait_ready(&gw, deadline).await;
    gw
}

/// Gateway config text: store and audit log next to the config (50 ms poll), a default plan
/// of `rate` per second (burst `rate`), `[server]` and `[admin]` on port 0 (no lame-duck delay
/// unless `server` sets `shutdown_delay_ms`), and upstream `up`.
///
/// `server` goes into `[server]`, `upstream` into upstream `up` (timeouts), and `tail` is
/// appended, so it starts with a table header (`[limits]`, `[plans.x]`, `[[routes]]`, ...).
pub fn gateway_config(
    up: SocketAddr,
    rate: u32,
    server: &str,
    upstream: &str,
    tail: &str,
) -> String {
    // A lame-duck delay would add seconds to every test that stops a gateway: off unless the
    // test sets its own.
    let delay = if server.contains("shutdown_delay_ms") {
        ""
    } else {
        "shutdown_delay_ms = 0"
    };
    format!(
        r#"[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
poll_interval_ms = 50

[plans.default]
rate = "{rate}/s"
burst = {rate}

[server]
listen = "127.0.0.1:0"
{delay}
{server}

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["{up}"]
{upstream}

{tail}
"#
    )
}

/// The `invoices-read` route: GET under `/invoices` with scope `invoices:read`, to upstream `up`.
pub const INVOICES_READ: &str = r#"[[routes]]
name = "invoices-read"
path_prefix = "/invoices"
methods = ["GET"]
scopes = ["invoices:read"]
upstream = "up"
"#;

/// What follows `[keys]` (and `[redis]`, plans, limits) in a one-route gateway's config:
/// `[server]` and `[admin]` on port 0, upstream `up` at `up`, and [`INVOICES_READ`].
pub fn one_route(up: SocketAddr) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["{up}"]

{INVOICES_READ}"#
    )
}

/// A running `keygate control` (with the secret); SIGKILLed and reaped on drop.
pub struct ControlPlane {
    child: Child,
    /// The control API's address, from its `{"event":"listening","control":…}` line.
    pub addr: SocketAddr,
}

impl ControlPlane {
    /// Starts `keygate --config <config> control` and waits for its listening line; on
    /// failure returns its stderr log (`control.stderr.log` next to the config).
    pub async fn try_spawn(config: &Path) -> Result<ControlPlane, String> {
        Self::try_spawn_env(config, &[]).await
    }

    /// Like [`ControlPlane::try_spawn`] with extra environment variables.
    pub async fn try_spawn_env(
        config: &Path,
        envs: &[(&str, &str)],
    ) -> Result<ControlPlane, String> {
        let log = config.with_file_name("control.stderr.log");
        let mut child = Command::new(keygate_bin())
            .arg("--config")
            .arg(config)
            .arg("control")
            .env(SECRET_VAR, SECRET)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("spawn keygate control");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Drains stdout until the child exits, so it never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = tokio::task::spawn_blocking(move || loop {
            // Ends with None when stdout closes (the process exited) or after the timeout.
            let line = rx.recv_timeout(STARTUP_TIMEOUT).ok()?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] == "listening" {
                return v["control"].as_str()?.parse::<SocketAddr>().ok();
            }
        })
        .await
        .unwrap();
        match addr {
            Some(addr) => Ok(ControlPlane { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    }

    /// Like [`ControlPlane::try_spawn`], panicking with the stderr log on failure.
    pub async fn spawn(config: &Path) -> ControlPlane {
        match Self::try_spawn(config).await {
            Ok(cp) => cp,
            Err(e) => panic!("control plane did not start:\n{e}"),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
