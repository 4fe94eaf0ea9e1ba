//! Millions of keys, measured as a user would meet them:
//!
//!   cargo run --release --example scale -- --keys 1000000
//!
//! Builds a store through the real import path (`keygate keys import` as a subprocess, fed
//! generated keys: one owner per ten keys, scope `invoices:read`), starts the real gateway
//! binary on it and prints:
//!
//! - resident bytes per key of the running gateway: its RSS (/proc/PID/status VmRSS) once
//!   ready and 2,000 requests in, minus the RSS of the same gateway started on an empty
//!   store, over the key count (after a start from the checkpoint; the start from the log
//!   alone is shown too: parsing leaves freed memory the allocator keeps);
//! - start → `/readyz` 200 from the binary checkpoint `keys compact` writes, and from the
//!   imported log alone (before compaction);
//! - import time and the import process's peak RSS (VmHWM, sampled until it exits);
//! - auth decision p50: `KeyTable::authenticate` (parse, HMAC, lookup, state rules) over the
//!   imported keys, on a table loaded from the same store by the gateway's own loading code,
//!   each decision less the timer's own cost (printed beside it);
//!   and p50 of a whole request through the gateway (loopback, keep-alive) for context;
//! - `/metrics` scrape time (median of 5);
//! - revocation apply time: from `keygate keys revoke` returning to the first 401 on an open
//!   keep-alive connection (and how long the CLI itself took).
//!
//! Everything runs on loopback in a fresh directory under /tmp, removed at the end
//! (`--keep` keeps it). Processes started here are killed on exit.

use keygate::config::Config;
use keygate::keys::table::KeyTable;
use keygate::keys::KeySettings;
use keygate::store::file::{Follower, LogFile};
use keygate::store::seal::Signer;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The gateway's allocator (`src/main.rs`), so the in-process auth decision runs on the same
/// memory layout as in the gateway.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Fail = Box<dyn std::error::Error>;

const SECRET: &str = "c2NhbGUtZXhhbXBsZS1zZWNyZXQtMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3";

/// Kills the child when dropped, however the example ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The `i`th generated key (an imported key: not in our format, accepted by digest).
fn key(i: u64) -> String {
    format!(
        "sk_scale_{:016x}{:016x}",
        splitmix(i),
        splitmix(i ^ 0xdead_beef)
    )
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An upstream that answers 200 to every request, on its own threads.
fn upstream() -> Result<String, Fail> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => return,
                });
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    let mut len = 0usize;
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err()
                        || conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn config(dir: &Path, upstream: &str) -> Result<PathBuf, Fail> {
    let path = dir.join("keygate.toml");
    std::fs::write(
        &path,
        format!(
            r#"[keys]
store = "keys.jsonl"
hash_secret_env = "SCALE_HASH_SECRET"
prefix = "kg"
envs = ["live", "test"]
audit_log = "audit.jsonl"
usage_file = "usage.json"
poll_interval_ms = 100

[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[limits]
auth_failures_per_minute = 1000000

[[upstreams]]
name = "up"
targets = ["{upstream}"]

[[routes]]
name = "invoices"
path_prefix = "/invoices"
methods = ["GET"]
scopes = ["invoices:read"]
upstream = "up"
"#
        ),
    )?;
    Ok(path)
}

fn keygate(bin: &Path, cfg: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("SCALE_HASH_SECRET", SECRET)
        .env("KEYGATE_LOG", "warn")
        .arg("--config")
        .arg(cfg);
    c
}

/// One HTTP/1.1 request on a keep-alive connection; the status code.
fn get(conn: &mut BufReader<TcpStream>, path: &str, auth: Option<&str>) -> Result<u16, Fail> {
    let auth = auth.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    conn.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}\r\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 = line.split_whitespace().nth(1).ok_or("no status")?.parse()?;
    let mut len = 0usize;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err("connection closed".into());
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse()?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok(status)
}

fn connect(addr: &str) -> Result<BufReader<TcpStream>, Fail> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(BufReader::new(s))
}

struct Running {
    child: Killed,
    http: String,
    admin: String,
    ready_after: Duration,
}

/// Start the gateway and wait (bounded) for `/readyz` 200.
fn serve(bin: &Path, cfg: &Path) -> Result<Running, Fail> {
    let started = Instant::now();
    let mut child = Killed(
        keygate(bin, cfg)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let out = child.0.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let field = |name: &str| -> Result<String, Fail> {
        let v: serde_json::Value = serde_json::from_str(&line)?;
        Ok(v[name].as_str().ok_or("no address")?.to_owned())
    };
    let (http, admin) = (field("http")?, field("admin")?);
    let deadline = started + Duration::from_secs(600);
    loop {
        if let Ok(mut c) = connect(&admin) {
            if get(&mut c, "/readyz", None).ok() == Some(200) {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err("gateway not ready within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Running {
        ready_after: started.elapsed(),
        child,
        http,
        admin,
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.1} µs", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

/// What timing an interval adds to it: the median of empty intervals timed the way the
/// decisions are (two clock reads; ~20 ns on the reference VM, a tenth of a decision at
/// 10K keys), so a decision's figure is the decision's own time.
fn timer_overhead() -> Duration {
    let mut empty: Vec<Duration> = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed()
        })
        .collect();
    empty.sort();
    pct(&empty, 0.5)
}

/// `rounds` auth decisions in process (`KeyTable::authenticate`, the step the request path
/// runs for a key), on a table loaded from the store by the gateway's own loading code (the
/// checkpoint and the log after it, as a starting gateway does; the whole log when there is
/// no checkpoint), rotating over up to 65,536 of the imported keys; each decision timed,
/// less the timer's own overhead (returned too), sorted.
fn auth_decisions(cfg: &Path, n: u64, rounds: usize) -> Result<(Vec<Duration>, Duration), Fail> {
    std::env::set_var("SCALE_HASH_SECRET", SECRET);
    let config = Config::load(cfg)?;
    let settings = KeySettings::from_config(&config)?;
    let file = LogFile::new(&settings.store, Signer::new(&settings.hasher));
    let table = match Follower::new(file.clone()).resume_from_checkpoint()? {
        Some((table, tail)) => {
            keygate::sync::apply::records(&table, tail.log, tail.records, tail.rev, &mut ())?;
            table
        }
        None => {
            let parsed = file.load()?;
            keygate::sync::apply::snapshot(
                &KeyTable::new(),
                parsed.log,
                parsed.rev,
                parsed.records,
            )?
            .0
        }
    };
    let probes: Vec<String> = (0..65_536u64.min(n))
        .map(|i| key(splitmix(i) % n))
        .collect();
    let now = keygate::clock::unix_secs();
    let timer = timer_overhead();
    let mut decisions = Vec::with_capacity(rounds);
    let mut k = String::with_capacity(probes.iter().map(String::len).max().unwrap_or(0));
    for i in 0..rounds {
        k.clear();
        k.push_str(&probes[i % probes.len()]);
        let t = Instant::now();
        let ok = table
            .authenticate(&k, &settings.format, &settings.hasher, now, 0)
            .is_ok();
        decisions.push(t.elapsed().saturating_sub(timer));
        if !ok {
            return Err("imported key refused in-process".into());
        }
    }
    decisions.sort();
    Ok((decisions, timer))
}

fn main() -> Result<(), Fail> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .iter()
        .position(|a| a == "--keys")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.replace('_', "").parse())
        .transpose()?
        .unwrap_or(10_000);
    let keep = args.iter().any(|a| a == "--keep");
    // `--auth-only DIR`: only the in-process auth decision, on a store kept by `--keep`
    // (for repeats and profiling).
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--auth-only")
        .and_then(|i| args.get(i + 1))
    {
        let rounds = args
            .iter()
            .position(|a| a == "--rounds")
            .and_then(|i| args.get(i + 1))
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(200_000);
        let (d, timer) = auth_decisions(&Path::new(dir).join("keygate.toml"), n, rounds)?;
        println!(
            "auth decision p50 / p99       {} / {} (timer's own {} taken off)",
            human(pct(&d, 0.5)),
            human(pct(&d, 0.99)),
            human(timer)
        );
        return Ok(());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // `cargo run` gives this process the `CARGO_*` variables of the example's own crate;
    // passed on, build scripts that watch such variables (ring's) would see a change and
    // rebuild everything once more.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            build.env_remove(k);
        }
    }
    let built = build
        // The same targets `cargo run --example scale` builds, so features unify the same
        // way and nothing is rebuilt.
        .args([
            "build",
            "--release",
            "--bin",
            "keygate",
            "--example",
            "scale",
        ])
        .status()?;
    if !built.success() {
        return Err("cargo build --release --bin keygate failed".into());
    }
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .ok_or("no target dir")?
        .join("keygate");

    let dir = std::env::temp_dir().join(format!("keygate-scale-{}", std::process::id()));
    let empty_dir = dir.join("empty");
    std::fs::create_dir_all(&empty_dir)?;
    let up = upstream()?;
    let cfg = config(&dir, &up)?;
    let empty_cfg = config(&empty_dir, &up)?;

    // Baseline: the same gateway on an empty store.
    let empty = serve(&bin, &empty_cfg)?;
    std::thread::sleep(Duration::from_millis(300));
    let empty_rss = status_kb(empty.child.0.id(), "VmRSS:") * 1024;
    drop(empty);

    // The store: one probe key created by the CLI (revoked at the end), then `n` imported.
    let created = keygate(&bin, &cfg)
        .args([
            "keys",
            "create",
            "--name",
            "probe",
            "--owner",
            "scale",
            "--scope",
            "invoices:read",
            "--json",
        ])
        .output()?;
    let created: serde_json::Value = serde_json::from_slice(&created.stdout)?;
    let probe_id = created["id"].as_str().ok_or("no id")?.to_owned();
    let probe_key = created["key"].as_str().ok_or("no key")?.to_owned();
    let input = dir.join("import.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&input)?);
        let owners = (n / 10).max(1);
        for i in 0..n {
            writeln!(
                w,
                r#"{{"key":"{}","owner":"customer-{}"}}"#,
                key(i),
                i % owners
            )?;
        }
    }
    let started = Instant::now();
    let mut import = Killed(
        keygate(&bin, &cfg)
            .args(["keys", "import", "--file"])
            .arg(&input)
            .args(["--scope", "invoices:read"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = import.0.id();
    let mut import_peak = 0;
    let status = loop {
        import_peak = import_peak.max(status_kb(pid, "VmHWM:") * 1024);
        if let Some(s) = import.0.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let import_time = started.elapsed();
    if !status.success() {
        return Err(format!("keys import failed: {status}").into());
    }
    let store_bytes = std::fs::metadata(dir.join("keys.jsonl"))?.len();

    // Start on the log as imported (parse and verify every line), then compact (which
    // writes the binary checkpoint) and start again: the figures below are from that start.
    // `--no-log-start` skips it (at 10M keys the whole-log parse needs many GB).
    let (log_ready, log_rss) = if args.iter().any(|a| a == "--no-log-start") {
        (Duration::ZERO, 0)
    } else {
        let from_log = serve(&bin, &cfg)?;
        let rss = status_kb(from_log.child.0.id(), "VmRSS:") * 1024;
        (from_log.ready_after, rss)
    };
    let t = Instant::now();
    let compacted = keygate(&bin, &cfg)
        .args(["keys", "compact"])
        .stdout(Stdio::null())
        .status()?;
    let compact_time = t.elapsed();
    if !compacted.success() {
        return Err("keys compact failed".into());
    }
    let checkpoint_bytes = std::fs::metadata(dir.join("keys.jsonl.checkpoint"))?.len();
    let gw = serve(&bin, &cfg)?;
    let mut c = connect(&gw.http)?;
    let mut request_times = Vec::new();
    for i in 0..2_000u64 {
        let k = key(splitmix(i) % n);
        let t = Instant::now();
        let s = get(&mut c, "/invoices/1", Some(&k))?;
        request_times.push(t.elapsed());
        if s != 200 {
            return Err(format!("imported key answered {s}").into());
        }
    }
    request_times.sort();
    let rss = status_kb(gw.child.0.id(), "VmRSS:") * 1024;
    let per_key = rss.saturating_sub(empty_rss) as f64 / n as f64;

    let mut scrapes = Vec::new();
    let mut m = connect(&gw.admin)?;
    for _ in 0..5 {
        let t = Instant::now();
        get(&mut m, "/metrics", None)?;
        scrapes.push(t.elapsed());
    }
    scrapes.sort();

    // Revocation: an open keep-alive connection, the CLI revokes, probe until the first 401.
    let mut p = connect(&gw.http)?;
    if get(&mut p, "/invoices/1", Some(&probe_key))? != 200 {
        return Err("probe key refused before revocation".into());
    }
    let t = Instant::now();
    let revoked = keygate(&bin, &cfg)
        .args(["keys", "revoke", &probe_id])
        .stdout(Stdio::null())
        .status()?;
    let cli = t.elapsed();
    if !revoked.success() {
        return Err("keys revoke failed".into());
    }
    let returned = Instant::now();
    let deadline = returned + Duration::from_secs(60);
    // The CLI reads the whole log at a million keys: the gateway may have closed the idle
    // probe connection meanwhile (header_read_timeout_ms), so a failed probe reconnects.
    loop {
        let status = match get(&mut p, "/invoices/1", Some(&probe_key)) {
            Ok(s) => s,
            Err(_) => {
                p = connect(&gw.http)?;
                get(&mut p, "/invoices/1", Some(&probe_key))?
            }
        };
        if status == 401 {
            break;
        }
        if Instant::now() > deadline {
            return Err("revoked key still admitted after 60 s".into());
        }
    }
    let revocation = returned.elapsed();
    let ready = gw.ready_after;
    drop(gw);

    // The auth decision in-process, on a table loaded by the gateway's own code.
    let (decisions, timer) = auth_decisions(&cfg, n, 200_000)?;

    println!("keys                          {n}");
    println!(
        "store file                    {:.0} B/key",
        store_bytes as f64 / n as f64
    );
    println!(
        "import (keys import)          {} , peak RSS {:.0} MB",
        human(import_time),
        import_peak as f64 / 1e6
    );
    println!(
        "keys compact (+ checkpoint)   {} , checkpoint {:.0} B/key",
        human(compact_time),
        checkpoint_bytes as f64 / n as f64
    );
    println!(
        "gateway start -> /readyz 200  {} from the checkpoint ({} from the log alone)",
        human(ready),
        human(log_ready)
    );
    println!(
        "gateway RSS after a log load  {:.0} B/key over the empty store",
        log_rss.saturating_sub(empty_rss) as f64 / n as f64
    );
    println!(
        "gateway resident per key      {per_key:.0} B (RSS {:.0} MB, empty store {:.0} MB)",
        rss as f64 / 1e6,
        empty_rss as f64 / 1e6
    );
    println!(
        "auth decision p50 / p99       {} / {} (timer's own {} taken off)",
        human(pct(&decisions, 0.5)),
        human(pct(&decisions, 0.99)),
        human(timer)
    );
    println!(
        "request through gateway p50   {}",
        human(pct(&request_times, 0.5))
    );
    println!(
        "/metrics scrape (median of 5) {}",
        human(pct(&scrapes, 0.5))
    );
    println!(
        "revocation applied            {} after `keys revoke` returned (the CLI took {})",
        human(revocation),
        human(cli)
    );
    if keep {
        println!("kept {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
