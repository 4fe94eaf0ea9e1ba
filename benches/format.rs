//! Key parse + checksum: the work done on every presented key before any HMAC.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;

fn bench(c: &mut Criterion) {
    let format = support::format();
    let good = format.generate("live").unwrap_or_default();
    // Same length and alphabet, last checksum character changed: the CRC is computed and refused.
    let mut bad = good.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'a' { b'b' } else { b'a' };
    let bad = String::from_utf8(bad).unwrap_or_default();
    let foreign = "sk_live_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLM";

    let mut g = c.benchmark_group("format");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("parse_valid", |b| b.iter(|| format.parse(black_box(&good))));
    g.bench_function("parse_bad_checksum", |b| {
        b.iter(|| format.parse(black_box(&bad)))
    });
    g.bench_function("parse_wrong_prefix", |b| {
        b.iter(|| format.parse(black_box(foreign)))
    });
    g.bench_function("generate", |b| {
        b.iter(|| format.generate(black_box("live")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
