//! Fixed-rate (open-loop) HTTP/1.1 load with latency percentiles, because wrk2 is not packaged
//! here and wrk only runs closed-loop. One thread per keep-alive connection sends on a fixed
//! schedule (rate / connections per thread). Coordinated omission is corrected the wrk2 way
//! when the sender falls behind: a request whose slot passed while the previous response was
//! still outstanding is timed from its scheduled slot, not from when it could be sent. When the
//! sender is on time, latency is timed from the actual send (so timer wake-up slack is not
//! counted as server latency).
//!
//!   fixedrate ADDR PATH RATE SECONDS CONNECTIONS [KEYS_FILE]
//!   (KEYS_FILE: one key per line, rotated over; without it no key is sent)
//! Prints `RESULT rate=… sent=… ok=… p50_us=… p99_us=… p999_us=… max_us=…`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

type Fail = Box<dyn std::error::Error + Send + Sync>;

fn read_response(r: &mut BufReader<TcpStream>, line: &mut String) -> Result<u16, Fail> {
    line.clear();
    r.read_line(line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            return Err("connection closed".into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(line)?;
            let size = usize::from_str_radix(line.trim(), 16)?;
            let mut buf = vec![0u8; size + 2];
            r.read_exact(&mut buf)?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf)?;
    }
    Ok(status)
}

fn worker(
    addr: String,
    path: String,
    keys: Vec<String>,
    interval: Duration,
    start: Instant,
    end: Instant,
) -> Result<(Vec<u32>, u64), Fail> {
    let stream = TcpStream::connect(&addr)?;
    stream.set_nodelay(true)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let requests: Vec<Vec<u8>> = if keys.is_empty() {
        vec![format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()]
    } else {
        keys.iter()
            .map(|k| {
                format!(
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {k}\r\n\r\n"
                )
                .into_bytes()
            })
            .collect()
    };
    let mut lat =
        Vec::with_capacity(((end - start).as_secs_f64() / interval.as_secs_f64()) as usize + 16);
    let mut errors = 0u64;
    let mut line = String::new();
    let mut k = 0usize;
    let mut slot = start;
    let mut prev_done = start;
    while slot < end {
        let t0 = if prev_done > slot {
            slot // behind schedule: count the time this request waited for its turn
        } else {
            let now = Instant::now();
            if slot > now {
                std::thread::sleep(slot - now);
            }
            Instant::now()
        };
        w.write_all(&requests[k])?;
        let status = read_response(&mut r, &mut line)?;
        let done = Instant::now();
        if status != 200 {
            errors += 1;
        }
        lat.push((done - t0).as_micros().min(u128::from(u32::MAX)) as u32);
        prev_done = done;
        k += 1;
        if k == requests.len() {
            k = 0;
        }
        slot += interval;
    }
    Ok((lat, errors))
}

fn main() -> Result<(), Fail> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err("usage: fixedrate ADDR PATH RATE SECONDS CONNECTIONS [KEYS_FILE]".into());
    }
    let (addr, path) = (args[1].clone(), args[2].clone());
    let rate: f64 = args[3].parse()?;
    let secs: f64 = args[4].parse()?;
    let conns: usize = args[5].parse()?;
    let keys: Vec<String> = match args.get(6) {
        Some(f) => std::fs::read_to_string(f)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None => vec![],
    };
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..conns)
        .map(|t| {
            // Each connection gets its own share of the keys and its own phase in the schedule.
            let mine: Vec<String> = if keys.len() >= conns {
                keys.iter().skip(t).step_by(conns).cloned().collect()
            } else {
                keys.clone()
            };
            let (addr, path) = (addr.clone(), path.clone());
            let phase = start + interval.mul_f64(t as f64 / conns as f64);
            std::thread::spawn(move || worker(addr, path, mine, interval, phase, end))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (lat, e) = h.join().map_err(|_| "worker panicked")??;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1];
    println!(
        "RESULT rate={rate} sent={} ok={} p50_us={} p99_us={} p999_us={} max_us={}",
        all.len(),
        all.len() as u64 - errors,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        all[all.len() - 1]
    );
    Ok(())
}
