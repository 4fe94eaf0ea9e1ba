//! Real `redis-server` processes for the tests (limits, usage, and later the Redis key store).
//!
//! Each [`RedisServer`] runs in its own temp dir on a free loopback port with persistence off
//! (`--save '' --appendonly no`) and is SIGKILLed on drop; never a system service, never a
//! fixed port. Redis cannot bind port 0, so a port is found by binding `127.0.0.1:0`, closing
//! it and starting the server there, retrying with a new port if the server loses the race.
//! Readiness is a PING polled with a deadline, never a sleep.
//!
//! Helpers: `requirepass` and ACL users ([`RedisOpts`]), `kill` / `restart` on the same port,
//! replicas (`replica_of`), and [`Sentinels`] (three `redis-server --sentinel` on loopback with
//! a short `down-after-milliseconds`). [`RedisServer::cmd`] is a tiny blocking RESP client so a
//! test can inspect or poke the server without the code under test.
//!
//! A missing `redis-server` binary FAILS the test, naming the Debian package: a skipped
//! fleet test is a silent hole in CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
pub const REDIS_STARTUP: Duration = Duration::from_secs(10);

/// Options for [`RedisServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct RedisOpts {
    /// `requirepass` (the `default` user's password).
    pub password: Option<String>,
    /// ACL rules, one user per entry, in `user` directive syntax (e.g.
    /// `"keygate-gw on >pw ~keygate:* +@all"`), written to an ACL file.
    pub acl_users: Vec<String>,
    /// Start as a replica of this port on 127.0.0.1.
    pub replica_of: Option<u16>,
    /// `masterauth` for a replica of a password-protected primary.
    pub master_auth: Option<String>,
    /// Append-only file with fsync always: the data survives `restart` (the store tests).
    pub persist: bool,
    /// Also serve TLS with this certificate and key (PEM paths), on `tls_port`; the plain
    /// port stays for the harness's own commands.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A test-owned `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// The TLS port when `RedisOpts::tls` is set.
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    opts: RedisOpts,
}

/// Panics with the package to install when `bin` is not on PATH.
pub fn require_binary(bin: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "{bin} not found on PATH: install the Debian package `redis-server` \
             (apt-get install -y redis-server; .ci/run does this)"
        ),
    }
}

/// A loopback port that was free a moment ago (the caller retries if it is taken).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl RedisServer {
    /// A plain server (no password).
    pub fn start() -> RedisServer {
        Self::start_with(RedisOpts::default())
    }

    /// A server with `opts`; panics (with its log) if it does not answer PING in time.
    pub fn start_with(opts: RedisOpts) -> RedisServer {
        require_binary("redis-server");
        let mut last = String::new();
        // Another process may grab the port between our probe and redis' bind: retry.
        for _ in 0..5 {
            let mut s = RedisServer {
                child: None,
                port: free_port(),
                tls_port: opts.tls.as_ref().map(|_| free_port()),
                dir: tempfile::tempdir().expect("redis tempdir"),
                opts: opts.clone(),
            };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start after 5 ports: {last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        let dir = self.dir.path().to_string_lossy().into_owned();
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir])
            .args(["--save", "", "--daemonize", "no"])
            .args(if self.opts.persist {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .args(["--protected-mode", "no", "--loglevel", "notice"]);
        cmd.arg("--logfile").arg(self.log_path());
        if let Some(pw) = &self.opts.password {
            cmd.args(["--requirepass", pw]);
        }
        if !self.opts.acl_users.is_empty() {
            let acl = self.dir.path().join("users.acl");
            let mut text = String::new();
            for u in &self.opts.acl_users {
                text.push_str("user ");
                text.push_str(u);
                text.push('\n');
            }
            // The default user keeps requirepass semantics via the ACL file when one is used.
            match &self.opts.password {
                Some(pw) => text.push_str(&format!("user default on >{pw} ~* &* +@all\n")),
                None => text.push_str("user default on nopass ~* &* +@all\n"),
            }
            std::fs::write(&acl, text).expect("write ACL file");
            cmd.arg("--aclfile").arg(&acl);
        }
        if let Some(p) = self.opts.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        if let Some(a) = &self.opts.master_auth {
            cmd.args(["--masterauth", a]);
        }
        if let (Some((cert, key)), Some(port)) = (&self.opts.tls, self.tls_port) {
            cmd.args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(cert);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(
            cmd.spawn()
                .map_err(|e| format!("spawn redis-server: {e}"))?,
        );
        self.wait_ping()
    }

    fn wait_ping(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "redis-server on {} exited ({status}): {}",
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            // Any RESP reply (even -NOAUTH) means the server is up and serving.
            if raw_command(self.addr(), None, &["PING"]).is_ok() {
                return Ok(());
            }
            if started.elapsed() > REDIS_STARTUP {
                return Err(format!("no PING reply from port {}", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `rediss://localhost:<tls port>/0` (the name the test's certificate carries).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started with RedisOpts::tls");
        format!("rediss://localhost:{port}/0")
    }

    /// SIGKILL (no shutdown save): like a crashed or partitioned primary.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty dataset unless `persist`).
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        // The old socket may linger briefly; retry on the same port within a deadline.
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if started.elapsed() > REDIS_STARTUP => {
                    panic!("redis restart on {}: {e}", self.port)
                }
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Run one command as `default` (authenticating with the password if set); the reply as
    /// text (integers and bulk strings as-is, arrays space-joined, errors prefixed `ERR:`).
    pub fn cmd(&self, args: &[&str]) -> String {
        raw_command(self.addr(), self.opts.password.as_deref(), args)
            .unwrap_or_else(|e| panic!("redis {args:?} on {}: {e}", self.port))
    }

    /// The server log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three sentinels watching master name `name` at `primary`, quorum 2.
pub struct Sentinels {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    pub fn start(name: &str, primary: u16, down_after_ms: u64) -> Sentinels {
        require_binary("redis-server");
        let dir = tempfile::tempdir().expect("sentinel tempdir");
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let mut started = None;
            for _ in 0..5 {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                // Sentinel rewrites its config file, so each gets its own writable copy.
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {d}\n\
                         logfile {d}/sentinel-{i}.log\n\
                         sentinel monitor {name} 127.0.0.1 {primary} 2\n\
                         sentinel down-after-milliseconds {name} {down_after_ms}\n\
                         sentinel failover-timeout {name} 3000\n\
                         sentinel parallel-syncs {name} 1\n",
                        d = dir.path().display()
                    ),
                )
                .expect("write sentinel conf");
                let mut child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server --sentinel");
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let t = Instant::now();
                let ok = loop {
                    if raw_command(addr, None, &["PING"]).is_ok() {
                        break true;
                    }
                    if matches!(child.try_wait(), Ok(Some(_))) || t.elapsed() > REDIS_STARTUP {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                if ok {
                    started = Some((child, port));
                    break;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            let (child, port) = started.expect("sentinel did not start after 5 ports");
            children.push(child);
            ports.push(port);
        }
        Sentinels {
            children,
            ports,
            _dir: dir,
        }
    }

    /// `["127.0.0.1:p1", …]` for the gateway config.
    pub fn addrs(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The primary's port as the first sentinel sees it.
    pub fn primary_port(&self, name: &str) -> Option<u16> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports[0]));
        let r = raw_command(addr, None, &["SENTINEL", "get-master-addr-by-name", name]).ok()?;
        r.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One command on a fresh connection (AUTH first when `password` is set), 2 s bound.
pub fn raw_command(
    addr: SocketAddr,
    password: Option<&str>,
    args: &[&str],
) -> Result<String, String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    if let Some(pw) = password {
        s.write_all(&encode(&["AUTH", pw]))
            .map_err(|e| e.to_string())?;
        let reply = read_reply(&mut r)?;
        if reply.starts_with("ERR:") {
            return Err(reply);
        }
    }
    s.write_all(&encode(args)).map_err(|e| e.to_string())?;
    read_reply(&mut r)
}

/// Several commands on one connection (e.g. `AUTH user pw` then what that user may do); the
/// replies in order, errors as `ERR:…` strings.
pub fn raw_session(addr: SocketAddr, cmds: &[&[&str]]) -> Result<Vec<String>, String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut out = Vec::new();
    for c in cmds {
        s.write_all(&encode(c)).map_err(|e| e.to_string())?;
        out.push(read_reply(&mut r)?);
    }
    Ok(out)
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("connection closed".into());
    }
    let (kind, rest) = line.split_at(1);
    let rest = rest.trim_end();
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Ok(format!("ERR:{rest}")),
        "$" => {
            let n: i64 = rest.parse().map_err(|_| format!("bad bulk {rest}"))?;
            if n < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| format!("bad array {rest}"))?;
            let mut parts = Vec::new();
            for _ in 0..n.max(0) {
                parts.push(read_reply(r)?);
            }
            Ok(parts.join(" "))
        }
        other => Err(format!("unexpected RESP type {other:?}")),
    }
}

/// A primary, a replica in sync with it, and three sentinels that see both: what the HA tests
/// start from. Polls with deadlines until Sentinel is ready to fail over.
pub struct Ha {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Sentinels,
}

impl Ha {
    pub async fn start(name: &str) -> Ha {
        let primary = RedisServer::start();
        let replica = RedisServer::start_with(RedisOpts {
            replica_of: Some(primary.port),
            ..RedisOpts::default()
        });
        crate::common::eventually_named("replica in sync", Duration::from_secs(20), || async {
            replica
                .cmd(&["INFO", "replication"])
                .contains("master_link_status:up")
                .then_some(())
        })
        .await;
        let sentinels = Sentinels::start(name, primary.port, 500);
        crate::common::eventually_named(
            "sentinels see each other and the replica",
            Duration::from_secs(30),
            || async {
                let ok = sentinels.ports.iter().all(|p| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], *p));
                    let info =
                        raw_command(addr, None, &["SENTINEL", "master", name]).unwrap_or_default();
                    let fields: Vec<&str> = info.split(' ').collect();
                    let field = |f: &str| {
                        fields
                            .iter()
                            .position(|x| *x == f)
                            .and_then(|i| fields.get(i + 1).copied())
                    };
                    field("num-other-sentinels") == Some("2") && field("num-slaves") == Some("1")
                });
                ok.then_some(())
            },
        )
        .await;
        Ha {
            primary,
            replica,
            sentinels,
        }
    }

    /// The `[redis]` body that reaches the primary through the sentinels.
    pub fn section(&self, name: &str) -> String {
        format!(
            "url = \"redis://127.0.0.1:{}/0\"\ncommand_timeout_ms = 200\nsentinels = {:?}\nsentinel_master = \"{name}\"",
            self.primary.port,
            self.sentinels.addrs()
        )
    }

    /// Kill the primary and wait until the sentinels have promoted the replica.
    pub async fn fail_over(&mut self, name: &str) {
        self.primary.kill();
        let (sentinels, replica) = (&self.sentinels, self.replica.port);
        crate::common::eventually_named(
            "sentinels promote the replica",
            Duration::from_secs(30),
            || async { (sentinels.primary_port(name) == Some(replica)).then_some(()) },
        )
        .await;
    }
}
