//! Memory per key: load N keys (default 1,000,000; `KEYGATE_MEMORY_KEYS` or the first argument
//! overrides) into a `KeyTable` and report resident bytes per key — the RSS delta from
//! /proc/self/statm divided by N — beside the sizes of the compact table's parts
//! (`keys::compact`). For the whole running gateway, see `examples/scale.rs`.
//!
//!   cargo run --release --example memory [-- N]

use keygate::keys::compact::{Cell, Entry};
use keygate::keys::table::KeyTable;
use std::time::Instant;

#[path = "../benches/support/mod.rs"]
mod support;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("KEYGATE_MEMORY_KEYS").ok())
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    // Records are built one at a time and moved into the table, so the delta is the table's.
    let before = support::rss_bytes();
    let started = Instant::now();
    let table = KeyTable::new();
    for i in 0..n {
        table.apply(support::synthetic_record(i));
    }
    let elapsed = started.elapsed();
    let after = support::rss_bytes();
    assert_eq!(table.len() as u64, n);
    let delta = after.saturating_sub(before);
    let per_key = delta as f64 / n as f64;

    println!("keys                     {n}");
    println!(
        "build time               {elapsed:.2?} ({:.0} ns/key)",
        elapsed.as_nanos() as f64 / n as f64
    );
    println!(
        "rss before / after       {:.1} MB / {:.1} MB",
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    println!("resident bytes per key   {per_key:.0}");
    let cell = std::mem::size_of::<Cell>();
    println!("parts per key:");
    println!(
        "  slab cell              {cell} (an Entry, {} B in registers, as 11 atomic words)",
        std::mem::size_of::<Entry>()
    );
    println!("  index slots            2 x 8 B at 53-85% load (digest and id)");
    println!("  owner                  an interned string (shared by the owner's keys)");
    println!("  profiles               shared (env, scopes, limits, networks, origins)");
    drop(table);
}
