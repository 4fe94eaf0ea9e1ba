//! The token buckets (`limit::Buckets::check`: GCRA in `gcra::Table`, keyed by lineage):
//! one hot key, many keys (100K lineages in rotation), and two threads on one hot key.
//! Two-thread figures are per-thread time per check with both threads checking at once.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keygate::keys::compact::KeyId;
use keygate::limit::{Buckets, Rate, Shape};
use std::time::{Duration, Instant};

const MANY: usize = 100_000;

fn shape(count: u32) -> Shape {
    Shape::new(
        Rate {
            count,
            per: Duration::from_secs(1),
        },
        None,
    )
}

fn bench(c: &mut Criterion) {
    // Never refuses: the admitted path, as in the load benchmark's plan.
    let open = shape(1_000_000_000);
    // Refuses almost everything once the burst is spent: the denied path.
    let tight = shape(1);
    // Generated ids, as the table hands lineages to the limiter.
    let hot = KeyId::generated(&u128::MAX.to_be_bytes());
    let lineages: Vec<KeyId> = (0..MANY)
        .map(|i| KeyId::generated(&(i as u128).to_be_bytes()))
        .collect();

    let buckets = Buckets::new();
    for l in &lineages {
        buckets.check(open, l);
    }
    buckets.check(tight, &hot);

    let mut g = c.benchmark_group("limit");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    g.bench_function("hot_key", |b| {
        b.iter(|| buckets.check(open, black_box(&hot)))
    });
    g.bench_function("hot_key_denied", |b| {
        b.iter(|| buckets.check(tight, black_box(&hot)))
    });
    let mut i = 0usize;
    g.bench_function("many_keys_100k", |b| {
        b.iter(|| {
            i += 1;
            if i == MANY {
                i = 0;
            }
            buckets.check(open, black_box(&lineages[i]))
        })
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("two_threads_hot_key", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            black_box(buckets.check(open, black_box(&hot)));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.bench_function("two_threads_many_keys", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (buckets, lineages) = (&buckets, &lineages);
                    s.spawn(move || {
                        let mut i = t * MANY / 2;
                        for _ in 0..iters {
                            i += 1;
                            if i == MANY {
                                i = 0;
                            }
                            black_box(buckets.check(open, black_box(&lineages[i])));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
