//! Shared integration-test harness for `keygate`.
//!
//! Use it from any file in `tests/` with `mod common;` (then `use common::*;`).
//! Everything here drives real components: the real `keygate` binary as a
//! child process, real upstream servers and clients on 127.0.0.1 port 0.
//!
//! Ground rules the helpers enforce so that a broken gateway makes a test
//! *fail* rather than *hang*:
//! - no fixed ports: every listener binds port 0 and reports its address;
//! - no sleeps for synchronisation: use [`eventually`] to poll with a deadline;
//! - every network operation and every child-process wait has a timeout.
//!
//! Sub-modules: [`upstream`] (recording upstream with fault modes),
//! [`raw`] (byte-exact HTTP/1 client, keep-alive and h2 clients) and [`keys`]
//! (the shared secret, key minting, gateway config, gateway and control-plane start-up).

// Each test file compiles its own copy of this module and uses only a subset
// of it; without this every unused helper would warn (and fail clippy -D).
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod keys;
pub mod raw;
pub mod redis;
pub mod upstream;

pub use keys::*;
pub use raw::*;
pub use upstream::*;

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default upper bound for a single network operation in the helpers.
pub const NET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Gateway::spawn`] waits for the `listening` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a synchronous CLI invocation may run before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `f` until it yields `Some(T)` and returns it; panics once `deadline`
/// (measured from the call) has passed.
pub async fn eventually<F, Fut, T>(deadline: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_named("condition", deadline, f).await
}

/// Like [`eventually`], but names what is awaited in the panic message.
pub async fn eventually_named<F, Fut, T>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut attempts: u64 = 0;
    // Short first delay so fast conditions resolve quickly; capped so slow
    // ones are still observed promptly. This is polling, not synchronisation.
    let mut backoff = Duration::from_millis(2);
    loop {
        attempts += 1;
        let remaining = deadline.saturating_sub(start.elapsed());
        // Bound each attempt too: a single hung probe must not outlive the deadline.
        if let Ok(Some(v)) = tokio::time::timeout(remaining, f()).await {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("eventually: {what} not met within {deadline:?} ({attempts} attempts)");
        }
        let remaining = deadline.saturating_sub(start.elapsed());
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A fresh temporary directory, removed when the returned guard drops.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create tempdir")
}

/// Writes `contents` to `dir/name` and returns the full path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

/// The path of the external tool `bin` on PATH; panics naming the Debian package `apt_package`
/// when it is missing. Project rule: a test whose tool is missing fails, it never skips
/// (`.ci/run` installs every tool the suites need).
pub fn require_tool(bin: &str, apt_package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(bin))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{bin} is not on PATH: install it (apt-get install -y {apt_package}, as .ci/run does); \
                 a test whose tool is missing fails rather than skips"
            )
        })
}

/// `keygate serve --config <config>` with its wall clock moved by `offset` (a `faketime`
/// offset such as "+10m"; Debian package `faketime`). Monotonic time is left alone, so timers
/// and deadlines keep the real clock. Not yet ready: see `wait_ready`.
///
/// The library `faketime` preloads is set on keygate itself rather than run through the
/// `faketime` wrapper: the wrapper forks, so killing it (as `Gateway`'s drop does) left the
/// gateway running after the test.
pub async fn spawn_with_clock(config: &Path, offset: &str, envs: &[(&str, &str)]) -> Gateway {
    let faketime = require_tool("faketime", "faketime");
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} is installed but no /usr/lib/*/faketime/libfaketime.so.1 was found: \
                 install libfaketime (apt-get install -y faketime)",
                faketime.display()
            )
        });
    let mut cmd = Command::new(keygate_bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("LD_PRELOAD", lib)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .envs(envs.iter().copied());
    let log = config.with_file_name("gateway.stderr.log");
    Gateway::spawn_command(cmd, &log)
        .await
        .unwrap_or_else(|e| panic!("gateway under faketime did not start: {e}"))
}

/// Path of the `keygate` binary built by cargo for this test run.
pub fn keygate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keygate"))
}

/// Lossy UTF-8 view of a CLI output's stdout.
pub fn stdout_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lossy UTF-8 view of a CLI output's stderr.
pub fn stderr_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `keygate serve` child process and the addresses it bound.
///
/// Dropping it SIGKILLs and reaps the child, so a failing test never leaks a
/// gateway process.
pub struct Gateway {
    child: Child,
    /// Plain-HTTP listener address.
    pub http: SocketAddr,
    /// TLS listener address, if configured.
    pub https: Option<SocketAddr>,
    /// Admin/metrics listener address.
    pub admin: SocketAddr,
    /// File receiving the child's stderr (`gateway.stderr.log` next to the config).
    pub stderr_log: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
}

/// Parsed `{"event":"listening",...}` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// Plain-HTTP listener.
    pub http: SocketAddr,
    /// TLS listener (`null` in the JSON when not configured).
    pub https: Option<SocketAddr>,
    /// Admin listener.
    pub admin: SocketAddr,
}

/// Parses the gateway's `{"event":"listening",...}` stdout line; `None` for
/// any other line.
pub fn parse_listening(line: &str) -> Option<Listening> {
    // Other stdout lines (if any) are not JSON or not this event: skip them.
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != "listening" {
        return None;
    }
    let addr = |k: &str| -> Option<SocketAddr> { v.get(k)?.as_str()?.parse().ok() };
    Some(Listening {
        http: addr("http")?,
        https: addr("https"),
        admin: addr("admin")?,
    })
}

impl Gateway {
    /// Starts `keygate serve --config <config_path>` with extra `envs` and waits
    /// (≤ 30 s) for its `listening` line; panics with the stderr log on failure.
    pub async fn spawn(config_path: &Path, envs: &[(&str, &str)]) -> Gateway {
        match Self::try_spawn(config_path, envs).await {
            Ok(gw) => gw,
            Err(e) => panic!("gateway failed to start: {e}"),
        }
    }

    /// Like [`Gateway::spawn`] but returns the failure (exit status or timeout,
    /// plus stderr) instead of panicking, for tests expecting startup to fail.
    pub async fn try_spawn(config_path: &Path, envs: &[(&str, &str)]) -> Result<Gateway, String> {
        Self::try_spawn_args(config_path, &[], envs).await
    }

    /// Like [`Gateway::try_spawn`] with extra arguments appended after
    /// `serve --config <path>`.
    pub async fn try_spawn_args(
        config_path: &Path,
        extra_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let dir = config_path
            .parent()
            .expect("config path has a parent directory");
        let mut cmd = Command::new(keygate_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(config_path)
            .args(extra_args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::spawn_command(cmd, &dir.join("gateway.stderr.log")).await
    }

    /// Runs an arbitrary prepared command under the same protocol (stdout
    /// piped and drained, stderr to `stderr_log`, wait for the `listening`
    /// line). Lets the harness test itself without the real binary.
    pub async fn spawn_command(mut cmd: Command, stderr_log: &Path) -> Result<Gateway, String> {
        let stderr_log = stderr_log.to_path_buf();
        let stderr_file = std::fs::File::create(&stderr_log).expect("create stderr log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file));
        let mut child = cmd.spawn().expect("spawn gateway process");

        // Drain stdout on a plain thread (std::process keeps the harness free
        // of tokio's `process` feature). The pipe must never fill up, or the
        // gateway would block on a log write; lines are also forwarded so the
        // startup wait below can be async and bounded.
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                // Ends at EOF, i.e. when the child exits (Drop kills it).
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\r', '\n'])
                                .to_string();
                            lines.lock().expect("stdout lock").push(line.clone());
                            let _ = tx.send(line);
                        }
                    }
                }
            });
        }

        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        // Bounded: a chatty binary that never reports listening still stops here.
        const MAX_LINES: usize = 10_000;
        let mut seen = 0usize;
        let failure = loop {
            if seen >= MAX_LINES {
                break format!("no listening line within {MAX_LINES} stdout lines");
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    seen += 1;
                    if let Some(l) = parse_listening(&line) {
                        return Ok(Gateway {
                            child,
                            http: l.http,
                            https: l.https,
                            admin: l.admin,
                            stderr_log,
                            stdout: lines,
                            exit: None,
                        });
                    }
                }
                Ok(None) => {
                    // stdout closed: the process exited (or closed stdout). Reap
                    // it with a bound so we can report the status.
                    let status = wait_child(&mut child, Duration::from_secs(5)).await;
                    break format!("stdout closed before listening line; exit status {status:?}");
                }
                Err(_) => break format!("no listening line within {STARTUP_TIMEOUT:?}"),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
        let stdout = lines.lock().expect("stdout lock").join("\n");
        Err(format!(
            "{failure}\n--- stdout ---\n{stdout}\n--- stderr ({}) ---\n{stderr}",
            stderr_log.display()
        ))
    }

    /// OS process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<http addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// `http://<admin addr><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// All stdout lines seen so far (including the `listening` line).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lock").clone()
    }

    /// Current contents of the stderr log file.
    pub fn stderr_contents(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Panics unless `message` appears exactly once in the gateway's stderr: a condition
    /// said once when it begins, not at every check that finds it still so.
    pub fn assert_logged_once(&self, message: &str) {
        let log = self.stderr_contents();
        assert_eq!(
            log.matches(message).count(),
            1,
            "{message:?} once in:\n{log}"
        );
    }

    /// Panics if `secret` appears anywhere in the gateway's stdout or stderr.
    pub fn assert_not_logged(&self, secret: &str) {
        assert!(
            !secret.is_empty(),
            "assert_not_logged needs a non-empty secret"
        );
        let stderr = self.stderr_contents();
        assert!(
            !stderr.contains(secret),
            "secret leaked into stderr log {}",
            self.stderr_log.display()
        );
        assert!(
            !self.stdout_lines().iter().any(|l| l.contains(secret)),
            "secret leaked into stdout"
        );
    }

    /// Sends SIGTERM (via `kill -TERM <pid>`).
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGHUP (via `kill -HUP <pid>`).
    pub fn sighup(&self) {
        self.signal("-HUP");
    }

    /// Sends SIGUSR1 (reopen the access-log file).
    pub fn sigusr1(&self) {
        self.signal("-USR1");
    }

    fn signal(&self, sig: &str) {
        // Once reaped, the pid may be reused by an unrelated process.
        assert!(
            self.exit.is_none(),
            "gateway already exited; not signalling"
        );
        let status = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid());
    }

    /// Exit status if the child has exited (non-blocking).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    /// Waits up to `deadline` for the child to exit and returns its status;
    /// panics (with the stderr log) if it is still running.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        match wait_child(&mut self.child, deadline).await {
            Some(s) => {
                self.exit = Some(s);
                s
            }
            None => panic!(
                "gateway did not exit within {deadline:?}\n--- stderr ---\n{}",
                self.stderr_contents()
            ),
        }
    }
}

/// Polls `try_wait` until the child exits or `deadline` passes.
async fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        // std::process has no async wait; a short poll interval keeps exit
        // detection prompt without a blocking wait on a runtime thread.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // SIGKILL cannot be ignored, so the reap below returns promptly.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `keygate --config <config> <args...>` synchronously with `envs`
/// (≤ 30 s, then killed and panics) and returns its output.
pub fn cli(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Cli::new(config);
    for (k, v) in envs {
        c = c.env(k, v);
    }
    c.run(args)
}

/// Builder for synchronous `keygate --config <path> ...` invocations.
///
/// Blocking by design (CLI commands are short); it only ever talks to other
/// processes, so blocking a test's runtime thread briefly is harmless.
#[derive(Clone, Debug)]
pub struct Cli {
    config: PathBuf,
    envs: Vec<(String, String)>,
    timeout: Duration,
}

impl Cli {
    /// A CLI runner bound to `config`.
    pub fn new(config: &Path) -> Cli {
        Cli {
            config: config.to_path_buf(),
            envs: Vec::new(),
            timeout: CLI_TIMEOUT,
        }
    }

    /// Adds an environment variable for every run.
    pub fn env(mut self, key: &str, value: &str) -> Cli {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Overrides the 30 s run limit.
    pub fn timeout(mut self, limit: Duration) -> Cli {
        self.timeout = limit;
        self
    }

    /// Runs `keygate --config <config> <args...>` with empty stdin.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, &[])
    }

    /// Runs with `stdin` bytes piped in (then closed).
    pub fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = Command::new(keygate_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn keygate cli");
        let pid = child.id();
        let mut child_stdin = child.stdin.take().expect("piped stdin");
        let input = stdin.to_vec();
        // Feed stdin on a thread so a CLI that never reads it cannot deadlock us.
        std::thread::spawn(move || {
            let _ = child_stdin.write_all(&input);
        });
        // wait_with_output drains both pipes; run it on a thread so we can
        // bound the total run time.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(self.timeout) {
            Ok(out) => out.expect("wait for keygate cli"),
            Err(_) => {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
                panic!("keygate {args:?} did not finish within {:?}", self.timeout);
            }
        }
    }
}

/// Reads a whole file into a lossy string (empty if missing); handy for logs.
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// VmRSS of process `pid` in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
