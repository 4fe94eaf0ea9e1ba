//! Revocation propagation, end to end: for each key, one already open keep-alive connection to
//! the gateway; revoke the key with the CLI (`keygate keys revoke ID`), and from the moment the
//! command returns, send requests back to back on that connection until the first 401. Prints
//! p50/p99/max of (first 401 − command returned) and (first 401 − command started).
//! Driven by benches/propagation.sh, which starts the gateway and the background load.
//!
//!   propagation GATEWAY_ADDR KEYGATE_BIN CONFIG KEYS_FILE PATH
//!   (KEYS_FILE: one "ID KEY" per line)

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};

type Fail = Box<dyn std::error::Error + Send + Sync>;

async fn connect(addr: &str) -> Result<SendRequest<Empty<Bytes>>, Fail> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn probe(
    s: &mut SendRequest<Empty<Bytes>>,
    path: &str,
    key: &str,
) -> Result<StatusCode, Fail> {
    s.ready().await?;
    let req = Request::get(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::new())?;
    let resp = s.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    Ok(status)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<(), Fail> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, bin, config, keys_file, path] = &args[..] else {
        return Err("usage: propagation GATEWAY_ADDR KEYGATE_BIN CONFIG KEYS_FILE PATH".into());
    };
    let keys: Vec<(String, String)> = std::fs::read_to_string(keys_file)?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.trim().to_owned()))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Open every connection first and prove each key works on it.
        let mut conns = Vec::with_capacity(keys.len());
        for (id, key) in &keys {
            let mut s = connect(addr).await?;
            let st = probe(&mut s, path, key).await?;
            if st != StatusCode::OK {
                return Err(format!("key {id}: expected 200 before revocation, got {st}").into());
            }
            conns.push(s);
        }
        let mut after_return = Vec::new();
        let mut after_start = Vec::new();
        let mut cli = Vec::new();
        let mut probes_total = 0u64;
        for ((id, key), s) in keys.iter().zip(conns.iter_mut()) {
            let started = Instant::now();
            let out = std::process::Command::new(bin)
                .args([
                    "--config",
                    config,
                    "keys",
                    "revoke",
                    id,
                    "--reason",
                    "propagation-bench",
                ])
                .output()?;
            let returned = Instant::now();
            if !out.status.success() {
                return Err(
                    format!("revoke {id}: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            let mut probes = 0u64;
            loop {
                probes += 1;
                let st = probe(s, path, key).await?;
                if st == StatusCode::UNAUTHORIZED {
                    break;
                }
                if st != StatusCode::OK {
                    return Err(format!("key {id}: unexpected {st}").into());
                }
                if returned.elapsed() > Duration::from_secs(10) {
                    return Err(format!("key {id}: still accepted 10 s after revocation").into());
                }
            }
            let now = Instant::now();
            after_return.push(now - returned);
            after_start.push(now - started);
            cli.push(returned - started);
            probes_total += probes;
            // Space revocations out a little, as operators would (and so each is its own append).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        after_return.sort();
        after_start.sort();
        cli.sort();
        let n = after_return.len();
        println!("revocations                          {n}");
        println!(
            "first 401 after revoke returned      p50 {}  p99 {}  max {}",
            ms(pct(&after_return, 0.5)),
            ms(pct(&after_return, 0.99)),
            ms(after_return[n - 1])
        );
        println!(
            "first 401 after revoke started       p50 {}  p99 {}  max {}",
            ms(pct(&after_start, 0.5)),
            ms(pct(&after_start, 0.99)),
            ms(after_start[n - 1])
        );
        println!(
            "revoke command (CLI) duration        p50 {}  p99 {}",
            ms(pct(&cli, 0.5)),
            ms(pct(&cli, 0.99))
        );
        println!(
            "probes per revocation (incl. the 401) {:.2}",
            probes_total as f64 / n as f64
        );
        println!(
            "RESULT propagation_p50_ms={:.3} propagation_p99_ms={:.3} n={n}",
            pct(&after_return, 0.5).as_secs_f64() * 1e3,
            pct(&after_return, 0.99).as_secs_f64() * 1e3
        );
        Ok(())
    })
}
