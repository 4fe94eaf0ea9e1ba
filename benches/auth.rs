//! The full auth decision, as the request path runs it (`pipeline::pipeline`):
//! extract → parse + checksum → HMAC digest → table lookup → scope check → token bucket.
//! The credential step is the request path's own (`credential::authenticate` on a real
//! `Gateway` built from a config, with the route's requirements), not a copy of it.
//!
//! - `auth/single_thread_1k` and `auth/two_threads_1k`: a 1K-key table.
//! - `auth_scale/{1K,100K,1M,10M}`: the same decision against bigger tables. Probes rotate
//!   over up to 65,536 real keys (so the touched records do not fit in cache) and the rest of
//!   the table is filled with synthetic records. 10M runs only with KEYGATE_BENCH_10M=1.
//! - `auth/reject_*`: refusals (unknown key: HMAC + miss; bad checksum: no HMAC).
//!
//! Single-thread figures decide requests whose headers were made just before (untimed, in
//! batches of 64), as the request path decides headers it has just parsed. Two-thread figures
//! are per-thread time per decision with both threads deciding at once, over prebuilt
//! requests; aggregate throughput is 2 / time (criterion prints it as elements/s).

// Setup failures (config, runtime) must stop a bench loudly.
#![allow(clippy::expect_used)]

use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, Bencher, BenchmarkId, Criterion,
    Throughput,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::authz::authorize;
use keygate::config::Config;
use keygate::extract::extract;
use keygate::gateway::Gateway;
use keygate::keys::format::{KeyFormat, MAX_KEY_LEN};
use keygate::limit::{Buckets, Rate, Shape};
use keygate::metrics::Metrics;
use keygate::snapshot::Snapshot;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

const PROBES: u64 = 65_536;

/// The gateway's config for the bench: the support hasher's secret, one route that needs
/// the scope the support records carry.
const CONFIG: &str = r#"[keys]
store = "keys.jsonl"
hash_secret_env = "KEYGATE_BENCH_HASH_SECRET"
prefix = "kg"
envs = ["live", "test"]

[server]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["127.0.0.1:9"]

[[routes]]
name = "invoices"
path_prefix = "/invoices"
scopes = ["invoices:read"]
upstream = "up"
"#;

struct Decider {
    gw: Arc<Gateway>,
    snap: Arc<Snapshot>,
    format: KeyFormat,
    key_header: HeaderName,
    ip: IpAddr,
    buckets: Buckets,
    shape: Shape,
    requests: Vec<HeaderMap>,
    /// The probe keys' `Authorization` values, for requests made just before they are decided.
    authorizations: Vec<String>,
    /// Gateway::new starts its background tasks on this runtime.
    _rt: tokio::runtime::Runtime,
}

/// A gateway as `serve` builds one (config → snapshot → gateway), holding `table`.
fn gateway(table: keygate::keys::table::KeyTable) -> (tokio::runtime::Runtime, Arc<Gateway>) {
    let secret = String::from_utf8(support::SECRET.to_vec()).expect("the bench secret is ASCII");
    std::env::set_var("KEYGATE_BENCH_HASH_SECRET", secret);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let gw = rt.block_on(async {
        let config = Config::parse(CONFIG, &std::env::temp_dir().join("keygate-bench.toml"))
            .expect("bench config");
        let metrics = Arc::new(Metrics::new(0));
        let sinks = keygate::access::Sinks::start(&config, &metrics).expect("sinks");
        let snapshot = Snapshot::build(config, &metrics).expect("bench snapshot");
        let gw = Gateway::new(snapshot, metrics, sinks);
        gw.replace_table(table);
        gw
    });
    (rt, gw)
}

impl Decider {
    fn new(n: u64) -> Decider {
        let (table, keys) = support::table(n, PROBES);
        let authorizations: Vec<String> = keys.iter().map(|k| format!("Bearer {k}")).collect();
        let requests = authorizations.iter().map(|a| request(a)).collect();
        let (rt, gw) = gateway(table);
        let snap = gw.snapshot().clone();
        Decider {
            gw,
            snap,
            format: support::format(),
            key_header: HeaderName::from_static("x-api-key"),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            buckets: Buckets::new(),
            // High enough never to refuse: we measure the admitted path.
            shape: Shape::new(
                Rate {
                    count: 1_000_000_000,
                    per: Duration::from_secs(1),
                },
                None,
            ),
            requests,
            authorizations,
            _rt: rt,
        }
    }

    /// One request's decision; true when it would be forwarded.
    #[inline]
    fn decide(&self, headers: &HeaderMap) -> bool {
        let Ok(key) = extract(headers, None, &self.key_header, None, MAX_KEY_LEN) else {
            return false;
        };
        let route = &self.snap.routes[0];
        // The request path's credential step. A key (not a token) never waits, so one poll
        // decides it.
        let step =
            keygate::credential::authenticate(&self.gw, &self.snap, route, key, support::NOW);
        let Poll::Ready(Ok(record)) =
            std::pin::pin!(step).poll(&mut Context::from_waker(Waker::noop()))
        else {
            return false;
        };
        if authorize(&record, &route.requirements, self.ip, None, &[]).is_err() {
            return false;
        }
        self.buckets.check(self.shape, record.lineage_id()).allowed
    }

    /// Run `iters` decisions rotating over the probe keys from `start`.
    fn run(&self, iters: u64, start: usize) -> usize {
        let n = self.requests.len();
        let mut i = start % n;
        let mut ok = 0;
        for _ in 0..iters {
            ok += usize::from(self.decide(black_box(&self.requests[i])));
            i += 1;
            if i == n {
                i = 0;
            }
        }
        ok
    }

    /// Time single decisions rotating over the probe keys, each request's headers made just
    /// before its batch of 64 (untimed): on the request path the headers were just parsed and
    /// are in cache, while the key table and the limiter's buckets are not. (Prebuilt maps
    /// for 65,536 probes are themselves misses at 1M: several per decision that no request
    /// pays.)
    fn bench_single(&self, b: &mut Bencher<'_>, next: &mut usize) {
        b.iter_batched_ref(
            || {
                *next = (*next + 1) % self.authorizations.len();
                request(&self.authorizations[*next])
            },
            |r| self.decide(black_box(r)),
            BatchSize::NumIterations(64),
        )
    }

    fn warm(&self) {
        // First pass creates every probe key's bucket (as the first request of a key would).
        assert_eq!(self.run(self.requests.len() as u64, 0), self.requests.len());
    }
}

fn request(authorization: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::HOST, HeaderValue::from_static("api.example"));
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("bench/1.0"),
    );
    h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    if let Ok(v) = HeaderValue::from_str(authorization) {
        h.insert(http::header::AUTHORIZATION, v);
    }
    h
}

fn two_threads(d: &Decider, iters: u64) -> Duration {
    let half = d.requests.len() / 2;
    let start = Instant::now();
    std::thread::scope(|s| {
        let a = s.spawn(|| d.run(iters, 0));
        let b = s.spawn(|| d.run(iters, half));
        black_box(a.join().unwrap_or(0) + b.join().unwrap_or(0));
    });
    start.elapsed()
}

fn small(c: &mut Criterion) {
    let d = Decider::new(1_000);
    d.warm();
    let unknown = request(&format!(
        "Bearer {}",
        d.format.generate("live").unwrap_or_default()
    ));
    let mut bad = d.format.generate("live").unwrap_or_default().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'a' { b'b' } else { b'a' };
    let bad = request(&format!(
        "Bearer {}",
        String::from_utf8(bad).unwrap_or_default()
    ));

    let mut g = c.benchmark_group("auth");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    g.bench_function("single_thread_1k", |b| d.bench_single(b, &mut next));
    g.bench_function("reject_unknown_key", |b| {
        b.iter(|| d.decide(black_box(&unknown)))
    });
    g.bench_function("reject_bad_checksum", |b| {
        b.iter(|| d.decide(black_box(&bad)))
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("two_threads_1k", |b| {
        b.iter_custom(|iters| two_threads(&d, iters))
    });
    g.finish();
}

fn scale(c: &mut Criterion) {
    let mut sizes: Vec<(u64, &str)> = vec![(1_000, "1K"), (100_000, "100K"), (1_000_000, "1M")];
    if std::env::var("KEYGATE_BENCH_10M").as_deref() == Ok("1") {
        sizes.push((10_000_000, "10M"));
    }
    let mut g = c.benchmark_group("auth_scale");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    g.throughput(Throughput::Elements(1));
    for (n, label) in sizes {
        let built = Instant::now();
        let d = Decider::new(n);
        d.warm();
        eprintln!(
            "auth_scale: built and warmed a {label}-key table in {:.1?}",
            built.elapsed()
        );
        let mut next = 0usize;
        g.bench_with_input(BenchmarkId::new("single_thread", label), &d, |b, d| {
            d.bench_single(b, &mut next)
        });
        g.throughput(Throughput::Elements(2));
        g.bench_with_input(BenchmarkId::new("two_threads", label), &d, |b, d| {
            b.iter_custom(|iters| two_threads(d, iters))
        });
        g.throughput(Throughput::Elements(1));
        drop(d);
    }
    g.finish();
}

criterion_group!(benches, small, scale);
criterion_main!(benches);
