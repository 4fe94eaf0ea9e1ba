//! HMAC-SHA256 digest of a presented key under the server secret.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use keygate::keys::digest::Hasher;
use std::time::Duration;

#[path = "support/mod.rs"]
mod support;

fn bench(c: &mut Criterion) {
    let key = support::format().generate("live").unwrap_or_default();
    let one = support::hasher();
    // During a secret rotation lookup tries every configured version (worst case: a miss).
    let two = Hasher::new(vec![(2, vec![0x33; 48]), (1, support::SECRET.to_vec())]);

    let mut g = c.benchmark_group("digest");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("hmac_sha256_one_version", |b| {
        b.iter(|| one.digest(black_box(&key)))
    });
    g.bench_function("hmac_sha256_two_versions_all", |b| {
        b.iter(|| two.all_digests(black_box(&key)).count())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
