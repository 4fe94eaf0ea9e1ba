//! `keygate scan`'s matcher over source-like text: the substring search for the prefix plus
//! the format check at each hit. Reported as throughput (the issue asks ≥ 200 MB/s).
//! Text: 16 MiB of code-like lines with a `kg_` near-miss every ~40 lines and a real key
//! every ~4000 lines, so both the fast path and the parser are exercised.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keygate::scan::find::Matcher;
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;

fn corpus(format: &keygate::keys::format::KeyFormat, size: usize) -> Vec<u8> {
    let mut text = String::with_capacity(size + 256);
    let mut i = 0u64;
    while text.len() < size {
        i += 1;
        match i % 4000 {
            0 => text.push_str(&format!(
                "    let key = \"{}\"; // leaked\n",
                format.generate("live").unwrap_or_default()
            )),
            n if n % 40 == 0 => {
                text.push_str("    total_kg_live = weight_kg_live * 2; // kg_ near miss\n")
            }
            _ => text.push_str(&format!(
                "    let value_{i} = compute(alpha, beta, {i}) + offset; // étude ✓\n"
            )),
        }
    }
    text.into_bytes()
}

fn bench(c: &mut Criterion) {
    let format = support::format();
    let matcher = Matcher::new(format.clone());
    let text = corpus(&format, 16 << 20);
    let mut g = c.benchmark_group("scan");
    g.measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("find_16MiB_text", |b| {
        b.iter(|| matcher.find(black_box(&text)).len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
