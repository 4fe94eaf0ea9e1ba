//! Shared fixtures for the criterion benches and the memory example: a key format, a hasher,
//! realistic key records built directly (no CLI, no log), and tables of any size.
//!
//! Big tables are filled with records whose digests are synthetic (uniform bytes from a
//! counter; the table cannot tell them from HMAC outputs) plus a probe set of real keys whose
//! digests are real HMACs, so a 10M-key table builds in seconds instead of minutes.
#![allow(dead_code)]

use keygate::keys::digest::{Digest, Hasher};
use keygate::keys::format::{hint, KeyFormat};
use keygate::keys::record::KeyRecord;
use keygate::keys::table::KeyTable;
use std::collections::BTreeMap;

pub const SECRET: [u8; 48] = [0x5a; 48];
/// Unix seconds used as "now" in every bench (records are created before it, expire never).
pub const NOW: i64 = 1_750_000_000;

pub fn format() -> KeyFormat {
    KeyFormat::new("kg", &["live".to_owned(), "test".to_owned()])
}

pub fn hasher() -> Hasher {
    Hasher::new(vec![(1, SECRET.to_vec())])
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// 32 uniform bytes derived from `i` (a stand-in for an HMAC output).
pub fn synthetic_digest(i: u64) -> Digest {
    let mut out = [0u8; 32];
    for (j, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix(i.wrapping_mul(4).wrapping_add(j as u64)).to_le_bytes());
    }
    Digest(out)
}

/// A deterministic public id as `new_id("key")` makes them: `key_` + 26 base32 chars of
/// 128 bits.
pub fn id_for(i: u64) -> String {
    let x = u128::from(splitmix(i)) << 64 | u128::from(i);
    keygate::keys::record::format_id("key", &x.to_be_bytes())
}

/// A record as `keys create --name … --owner … --scope invoices:read` would write it.
pub fn record(i: u64, digest: Digest, key_hint: String) -> KeyRecord {
    let id = id_for(i);
    KeyRecord {
        rev: i + 1,
        lineage: id.clone(),
        id,
        digest,
        secret_version: 1,
        name: format!("bench-{i}"),
        owner: format!("team-{}", i % 100),
        env: "live".to_owned(),
        scopes: vec!["invoices:read".to_owned()],
        plan: None,
        rate: None,
        quota: None,
        allow_ips: vec![],
        allow_origins: vec![],
        labels: BTreeMap::new(),
        hint: key_hint,
        created_at: NOW - 86_400,
        written_at_ms: (NOW - 86_400) * 1000,
        not_before: None,
        expires_at: Some(NOW + 90 * 86_400),
        revoked_at: None,
        revoked_reason: None,
        canary: false,
        publishable: false,
        imported: false,
        rotated_from: None,
        rotated_to: None,
        rotation: None,
        mac: None,
    }
}

/// A synthetic record number `i` (synthetic digest).
pub fn synthetic_record(i: u64) -> KeyRecord {
    record(i, synthetic_digest(i), "kg_live_…abcd".to_owned())
}

/// A table of `n` keys; the first `real` of them (at most `n`) are real keys, returned in
/// plaintext for probing. Records are applied one by one with `KeyTable::apply`.
pub fn table(n: u64, real: u64) -> (KeyTable, Vec<String>) {
    let format = format();
    let hasher = hasher();
    let table = KeyTable::new();
    let real = real.min(n);
    let mut keys = Vec::with_capacity(real as usize);
    for i in 0..n {
        let r = if i < real {
            let key = format.generate("live").unwrap_or_default();
            let (_, d) = hasher.digest(&key);
            let r = record(i, d, hint(&key));
            keys.push(key);
            r
        } else {
            synthetic_record(i)
        };
        table.apply(r);
    }
    (table, keys)
}

/// Resident set size of this process in bytes (from /proc/self/statm).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
