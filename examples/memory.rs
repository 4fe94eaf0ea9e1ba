//! Memory per key: load N keys (default 1,000,000; `KEYGATE_MEMORY_KEYS` or the first argument
//! overrides) into a `KeyTable` and report resident bytes per key — the RSS delta from
//! /proc/self/statm divided by N. KeyTable keeps no byte accounting of its own; alongside the
//! RSS figure this prints an estimate of where the bytes go (struct sizes, heap strings, map
//! slots), computed from the records themselves.
//!
//!   cargo run --release --example memory [-- N]

use keygate::keys::record::KeyRecord;
use keygate::keys::table::KeyTable;
use std::time::Instant;

#[path = "../benches/support/mod.rs"]
mod support;

fn heap_of(r: &KeyRecord) -> usize {
    let s = |x: &String| x.capacity();
    let o = |x: &Option<String>| x.as_ref().map_or(0, String::capacity);
    s(&r.id)
        + s(&r.name)
        + s(&r.owner)
        + s(&r.env)
        + s(&r.hint)
        + s(&r.lineage)
        + r.scopes.capacity() * std::mem::size_of::<String>()
        + r.scopes.iter().map(String::capacity).sum::<usize>()
        + o(&r.plan)
        + o(&r.rate)
        + o(&r.revoked_reason)
        + o(&r.rotated_from)
        + o(&r.rotated_to)
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("KEYGATE_MEMORY_KEYS").ok())
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    // Records are built one at a time and moved into the table, so the delta is the table's.
    let sample = support::synthetic_record(n / 2);
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

    let record_struct = std::mem::size_of::<KeyRecord>();
    let record_heap = heap_of(&sample);
    // Arc<KeyRecord>: two counters + the record; by_id: a String key (+ heap) and a digest.
    let arc = 16 + record_struct;
    let by_digest_slot = 32 + 8; // Digest + Arc pointer
    let by_id_slot = std::mem::size_of::<String>() + 32;
    let id_heap = sample.id.capacity();
    let estimate = arc + record_heap + by_digest_slot + by_id_slot + id_heap;

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
    println!("estimate (no allocator/map overhead):");
    println!("  Arc<KeyRecord>         {arc} (KeyRecord struct {record_struct} + counts 16)");
    println!(
        "  record heap strings    {record_heap} (id, name, owner, env, hint, lineage, scopes, …)"
    );
    println!("  by_digest slot         {by_digest_slot}");
    println!("  by_id slot + id copy   {} ", by_id_slot + id_heap);
    println!("  total                  {estimate} (the rest is malloc headers/rounding and map spare capacity)");
    drop(table);
}
