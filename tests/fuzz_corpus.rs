//! Replays every seed in `fuzz/corpus/<target>/` through the fuzz target bodies, plus
//! ~2,000 deterministic pseudo-random inputs per target (random bytes and mutated seeds),
//! so the properties the fuzzers check are exercised by plain `cargo test` on stable, with
//! no nightly and no libFuzzer (THREATS §4 K6: "always replays the corpus").
//!
//! The bodies live in `fuzz/targets_common.rs`, included here and by `fuzz/fuzz_targets/*.rs`.
//! A crash found by `fuzz/run.sh` is added as a file under `fuzz/corpus/<target>/` once fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/targets_common.rs"]
mod targets;

use std::path::{Path, PathBuf};

/// Random inputs per target on top of the corpus.
const RANDOM_INPUTS: usize = 2_000;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Bytes that matter to these parsers, so random inputs reach past the first check.
const INTERESTING: &[&[u8]] = &[
    b"\n",
    b":",
    b",",
    b" ",
    b"\t",
    b"/",
    b"..",
    b".",
    b"%2e",
    b"%2f",
    b"%5C",
    b"%25",
    b";",
    b"\\",
    b"\0",
    b"\xff",
    b"\x80",
    b"Bearer ",
    b"bearer\t",
    b"authorization:",
    b"x-api-key:",
    b"connection:",
    b"?api_key=",
    b"&",
    b"=",
    b"_",
    b"/0",
    b"/32",
    b"/128",
    b"::ffff:",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"rev\":",
    b"kg_live_",
];

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(5) {
            0 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(at..at, piece.iter().copied());
            }
            1 if at < out.len() => out[at] = rng.next() as u8,
            2 if at < out.len() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            3 => out.truncate(at),
            _ => {
                let from = rng.below(out.len() + 1);
                let end = (from + rng.below(32)).min(out.len());
                let piece = out[from..end].to_vec();
                out.splice(at..at, piece);
            }
        }
    }
    out
}

fn random_input(rng: &mut XorShift, seeds: &[(PathBuf, Vec<u8>)]) -> Vec<u8> {
    if !seeds.is_empty() && rng.below(4) != 0 {
        let (_, seed) = &seeds[rng.below(seeds.len())];
        return mutate(rng, seed);
    }
    let len = rng.below(96);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if rng.below(3) == 0 {
            out.extend_from_slice(INTERESTING[rng.below(INTERESTING.len())]);
        } else {
            out.push(rng.next() as u8);
        }
    }
    out
}

fn replay(target: &str) {
    let f = targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap();
    let seeds = corpus(target);
    assert!(
        seeds.len() >= 3,
        "{target}: corpus has {} files",
        seeds.len()
    );
    for (path, bytes) in &seeds {
        let run = std::panic::catch_unwind(|| f(bytes));
        assert!(
            run.is_ok(),
            "{target}: corpus file {} failed",
            path.display()
        );
    }
    let mut rng = XorShift(0x5EED_0000_0000_0001 ^ (target.len() as u64 * 0x9E37_79B9));
    for i in 0..RANDOM_INPUTS {
        let input = random_input(&mut rng, &seeds);
        let run = std::panic::catch_unwind(|| f(&input));
        assert!(run.is_ok(), "{target}: random input #{i} failed: {input:?}");
    }
}

#[test]
fn every_target_has_a_corpus_and_a_fuzz_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, _) in targets::TARGETS {
        assert!(root.join("corpus").join(name).is_dir(), "corpus/{name}");
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz_targets/{name}.rs"
        );
    }
}

#[test]
fn key_parse_corpus() {
    replay("key_parse");
}

#[test]
fn extract_corpus() {
    replay("extract");
}

#[test]
fn hygiene_corpus() {
    replay("hygiene");
}

#[test]
fn path_canon_corpus() {
    replay("path_canon");
}

#[test]
fn cidr_authz_corpus() {
    replay("cidr_authz");
}

#[test]
fn record_log_corpus() {
    replay("record_log");
}

#[test]
fn config_corpus() {
    targets::init_env();
    replay("config");
}

/// `parse_log` (what the fuzzer drives) is what `LogFile::load` does on a real file.
#[test]
fn record_log_corpus_through_log_file_load() {
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in corpus("record_log") {
        let file = dir.path().join("keys.jsonl");
        std::fs::write(&file, &bytes).unwrap();
        let signer =
            keygate::store::seal::Signer::new(&keygate::keys::digest::Hasher::new(vec![(
                1,
                vec![9; 32],
            )]));
        // Corpus files are unsigned (no header): a verifying load reads them as parse_log does.
        let loaded = keygate::store::file::LogFile::new(&file, signer)
            .load()
            .unwrap();
        let parsed = keygate::store::file::parse_log(&bytes);
        assert_eq!(loaded.records, parsed.records, "{}", path.display());
        assert_eq!(loaded.rev, parsed.rev, "{}", path.display());
        assert_eq!(loaded.corrupt, parsed.corrupt, "{}", path.display());
    }
}

/// The config target only checks snapshot properties when a build succeeds: make sure the
/// seeds get that far, so the target is not vacuous.
#[test]
fn config_seeds_reach_snapshot_build() {
    targets::init_env();
    for name in ["example", "minimal"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/config")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let c =
            keygate::config::Config::parse(&text, Path::new("/nonexistent-keygate-fuzz/k.toml"))
                .unwrap();
        let metrics = keygate::metrics::Metrics::new(0);
        let built = keygate::snapshot::Snapshot::build(c, &metrics);
        assert!(built.is_ok(), "{name}: {:?}", built.err());
    }
}

/// The router reads request paths with and without their `;params` (`route::Router::find`),
/// so a route prefix carrying params is refused when the snapshot is built (seed
/// `route_prefix_params`), naming the field.
#[test]
fn config_refuses_route_prefixes_with_path_parameters() {
    targets::init_env();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config/route_prefix_params");
    let text = std::fs::read_to_string(&path).unwrap();
    for (prefix, refused) in [
        ("/v1/admin;x", true),
        ("/v1/admin%3Bx", true),
        ("/v1/admin", false),
    ] {
        let text = text.replace("/v1/admin;x", prefix);
        let c =
            keygate::config::Config::parse(&text, Path::new("/nonexistent-keygate-fuzz/k.toml"))
                .unwrap();
        let built = keygate::snapshot::Snapshot::build(c, &keygate::metrics::Metrics::new(0));
        match built {
            Ok(_) => assert!(!refused, "{prefix}: built"),
            Err(e) => {
                assert!(refused, "{prefix}: {e}");
                assert!(e.to_string().contains("path_prefix"), "{prefix}: {e}");
            }
        }
    }
}
