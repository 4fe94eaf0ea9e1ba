//! The key store at 1M keys:
//! - `store/apply_one_record_1M`: `KeyTable::apply` of one new record version (a revocation)
//!   to a 1M-key table — what the follower does per appended line.
//! - `store/cold_load_1M`: read + parse a 1M-record log from disk (`LogFile::load`) and build
//!   the table (`KeyTable::from_records`), as a gateway does at startup. The file is written
//!   once into a temp dir; it is in the page cache when measured (no disk reads).
//! - `store/parse_1M`: the `LogFile::load` part alone.
//! - append → applied: after `LogFile::append` of one revocation returns (fsync included, not
//!   timed), the time for a `Follower::poll` to read it and the table to apply it. The file
//!   notification wake-up is not included (see benches/propagation.sh for end-to-end). Printed
//!   as p50/p99 over 200 appends (an fsync per append makes it unsuited to criterion's loop).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use keygate::keys::table::KeyTable;
use keygate::store::seal::Signer;
use keygate::store::{Follower, LogFile, Update};
use std::io::Write;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

const N: u64 = 1_000_000;

fn apply_one(c: &mut Criterion) {
    let table = KeyTable::new();
    for i in 0..N {
        table.apply(support::synthetic_record(i));
    }
    let mut g = c.benchmark_group("store");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    let mut next = 0u64;
    g.bench_function("apply_one_record_1M", |b| {
        b.iter_batched(
            || {
                next += 1;
                let mut r = support::synthetic_record(next.wrapping_mul(7919) % N);
                r.rev = N + next;
                r.revoked_at = Some(support::NOW);
                r.revoked_reason = Some("bench".to_owned());
                r
            },
            |r| table.apply(black_box(r)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn write_log(path: &std::path::Path) -> u64 {
    let started = Instant::now();
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    for i in 0..N {
        let _ = serde_json::to_writer(&mut w, &support::synthetic_record(i));
        let _ = w.write_all(b"\n");
    }
    let _ = w.flush();
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "store: wrote a {N}-record log ({:.0} MB) in {:.1?}",
        len as f64 / 1e6,
        started.elapsed()
    );
    len
}

fn load(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("keys.jsonl");
    write_log(&path);
    let log = LogFile::new(&path, Signer::new(&support::hasher()));
    // Sign it as any first write would: the loads below verify every record's MAC.
    let signed = Instant::now();
    let log_id = log.ensure_signed().unwrap_or_else(|e| panic!("sign: {e}"));
    eprintln!("store: signed in place in {:.1?}", signed.elapsed());

    let mut g = c.benchmark_group("store");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15));
    // iter_with_large_drop: freeing the previous iteration's records/table is not timed.
    g.bench_function("parse_1M", |b| {
        b.iter_with_large_drop(|| {
            let parsed = log.load().unwrap_or_default();
            assert_eq!(parsed.records.len() as u64, N);
            parsed
        })
    });
    g.bench_function("cold_load_1M", |b| {
        b.iter_with_large_drop(|| {
            let parsed = log.load().unwrap_or_default();
            let table = KeyTable::from_records(parsed.records, log_id, parsed.rev);
            assert_eq!(table.len() as u64, N);
            table
        })
    });
    g.finish();

    append_to_applied(&log);
}

fn append_to_applied(log: &LogFile) {
    let mut follower = Follower::new(log.clone());
    let table = match follower.poll() {
        Ok(Update::Replaced(p)) => KeyTable::from_records(p.records, p.log, p.rev),
        other => panic!("first poll: {other:?}"),
    };
    let mut times = Vec::with_capacity(200);
    for k in 0..200u64 {
        let mut r = support::synthetic_record(k * 4999 % N);
        r.revoked_at = Some(support::NOW);
        r.revoked_reason = Some("bench".to_owned());
        if let Err(e) = log.append(vec![r]) {
            panic!("append: {e}");
        }
        let start = Instant::now();
        let applied = match follower.poll() {
            Ok(Update::Appended(p)) => p
                .records
                .into_iter()
                .map(|r| table.apply(r))
                .filter(|x| *x)
                .count(),
            other => panic!("poll after append: {other:?}"),
        };
        times.push(start.elapsed());
        assert_eq!(applied, 1);
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "store/append_to_applied_1M   p50 {:.1?}  p99 {:.1?}  max {:.1?}  (n = {}; poll + parse + apply after the append's fsync returned)",
        pct(0.50),
        pct(0.99),
        times[times.len() - 1],
        times.len()
    );
}

criterion_group!(benches, apply_one, load);
criterion_main!(benches);
