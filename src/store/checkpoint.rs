//! The binary checkpoint of a gateway's key table, written beside the store by compaction
//! (`<store>.checkpoint`): what lets a gateway with a million keys be ready in well under a
//! second, where parsing and verifying the JSON log takes seconds.
//!
//! Layout: a magic line, the last bytes of the log prefix it covers (its fingerprint), the
//! table's interned strings and owners (length-prefixed), its profiles and open rotations (one JSON
//! array each: there are few), then every entry at 92 fixed bytes (`compact::Entry`), and a
//! seal: `{"seal":{"log","rev","keys","log_bytes","log_lines"},"mac":"<v>:<hex>"}` followed by
//! its length (4 bytes LE). The MAC (the feed cache's file chain, keyed from the hash secret)
//! covers every byte before the seal and the seal itself: an edited, cut, extended or forged
//! checkpoint fails it and is refused loudly; the log is then read whole.
//!
//! The JSON-lines log stays the record of changes: a checkpoint only stands in for the first
//! `log_bytes` of the log it was cut from, and only while that log (same id, same bytes at the
//! end of that prefix) is still in place. The lines after it are applied on top through
//! `sync::apply`, so revocation stays final however old the checkpoint is.
//!
//! The Redis store (`store::redis`) keeps the same bytes in one Redis string. There is no byte
//! prefix to stand for: its log is a stream of dense revisions, so a Redis checkpoint stands
//! for a log id and a revision ([`encode_at_revision`]: no fingerprint, `log_bytes` 0), and
//! the stream entries after that revision are applied on top.

use crate::keys::compact::{Entry, Profile, ENTRY_BYTES};
use crate::keys::record::KeyRecord;
use crate::keys::table::KeyTable;
use crate::store::seal::{LogId, Signer, Tag};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version 2: an owners section; entries of 92 bytes with the owner's number; profiles
/// without owner.
const MAGIC: &[u8; 8] = b"KGCKPT2\n";
/// Earlier formats, refused by name (the log is read instead, and the next compaction
/// writes the current format).
const OLD_MAGICS: [&[u8; 8]; 1] = [b"KGCKPT1\n"];
/// Log bytes kept as the fingerprint of the prefix (its last line's MAC is among them).
pub const FINGERPRINT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    pub log: LogId,
    pub rev: u64,
    pub keys: u64,
    /// The length of the log prefix this checkpoint stands in for.
    pub log_bytes: u64,
    /// Lines in that prefix (so later lines keep their numbers in reports).
    pub log_lines: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealLine {
    seal: Seal,
    mac: Tag,
}

pub fn path_for(store: &Path) -> PathBuf {
    crate::store::file::sibling(store, ".checkpoint")
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u64).to_le_bytes());
    out.extend(bytes);
}

/// The checkpoint of `table`, which stands for `log_prefix` (the log's bytes up to and
/// including its last line at `table`'s revision).
pub fn encode(table: &KeyTable, log_prefix: &[u8], signer: &Signer) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(MAGIC.len() + table.len() * ENTRY_BYTES + 4096);
    out.extend(MAGIC);
    put(
        &mut out,
        &log_prefix[log_prefix.len().saturating_sub(FINGERPRINT)..],
    );
    let mut head = Ok(());
    let mut keys = 0u64;
    table.each_part(
        &mut out,
        |out, parts| {
            for list in [
                parts.strings.iter().map(|s| &**s).collect::<Vec<&str>>(),
                parts.owners.iter().map(|s| &**s).collect(),
            ] {
                out.extend((list.len() as u64).to_le_bytes());
                for s in list {
                    put(out, s.as_bytes());
                }
            }
            let profiles: Vec<&Profile> = parts.profiles.iter().map(|p| &**p).collect();
            head = serde_json::to_vec(&profiles)
                .and_then(|p| Ok((p, serde_json::to_vec(&parts.rotations)?)))
                .map(|(p, r)| {
                    put(out, &p);
                    put(out, &r);
                    out.extend((parts.entries as u64).to_le_bytes());
                });
        },
        |out, e| {
            out.extend(e.to_bytes());
            keys += 1;
        },
    );
    head?;
    let seal = Seal {
        log: table.log(),
        rev: table.revision(),
        keys,
        log_bytes: log_prefix.len() as u64,
        log_lines: log_prefix.iter().filter(|&&b| b == b'\n').count() as u64,
    };
    let mut chain = signer.file_chain();
    chain.update(&out);
    let mac = chain.tag(&serde_json::to_vec(&seal)?);
    let line = serde_json::to_vec(&SealLine { seal, mac })?;
    out.extend(&line);
    out.extend((line.len() as u32).to_le_bytes());
    Ok(out)
}

/// The checkpoint of `table` for a log that is a sequence of revisions (the Redis store): it
/// stands for `table`'s log id and revision, not for bytes of a file.
pub fn encode_at_revision(table: &KeyTable, signer: &Signer) -> std::io::Result<Vec<u8>> {
    encode(table, b"", signer)
}

/// A verified checkpoint.
#[derive(Debug)]
pub struct Loaded {
    pub table: KeyTable,
    pub seal: Seal,
    /// The last bytes of the log prefix it stands for.
    pub fingerprint: Vec<u8>,
}

impl Loaded {
    /// Made by [`encode_at_revision`] (stands for a log id and revision), not cut from a file.
    pub fn stands_for_a_revision(&self) -> bool {
        self.seal.log_bytes == 0 && self.fingerprint.is_empty()
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err("cut short".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn count(&mut self, unit: usize) -> Result<usize, String> {
        let n = usize::try_from(self.u64()?).map_err(|e| e.to_string())?;
        // A count can never promise more than the bytes left.
        if n.saturating_mul(unit.max(1)) > self.buf.len() {
            return Err("a count runs past the end".into());
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.count(1)?;
        self.take(n)
    }

    /// A count, then that many length-prefixed UTF-8 strings.
    fn strs(&mut self) -> Result<Vec<&'a str>, String> {
        let n = self.count(8)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(std::str::from_utf8(self.bytes()?).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

/// Verify and load a checkpoint's bytes. Any error means: do not use it.
pub fn decode(bytes: &[u8], signer: &Signer) -> Result<Loaded, String> {
    if OLD_MAGICS.iter().any(|m| bytes.starts_with(*m)) {
        return Err(
            "a checkpoint of an older format (written before keygate's compact table v2): \
             the log is read instead; `keygate keys compact` writes the current format"
                .into(),
        );
    }
    if !bytes.starts_with(MAGIC) || bytes.len() < MAGIC.len() + 4 {
        return Err("not a keygate checkpoint (wrong magic, or cut)".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&bytes[bytes.len() - 4..]);
    let seal_at = (bytes.len() - 4)
        .checked_sub(u32::from_le_bytes(len) as usize)
        .filter(|at| *at >= MAGIC.len())
        .ok_or("no seal at the end (cut or extended?)")?;
    let line: SealLine = serde_json::from_slice(&bytes[seal_at..bytes.len() - 4])
        .map_err(|e| format!("no seal at the end (cut or extended?): {e}"))?;
    let mut chain = signer
        .file_chain_for(line.mac.version)
        .map_err(|e| e.to_string())?;
    chain.update(&bytes[..seal_at]);
    let seal_json = serde_json::to_vec(&line.seal).map_err(|e| e.to_string())?;
    if !chain.verify(&seal_json, &line.mac) {
        return Err(
            "seal does not verify: edited, cut or written by someone without the hash secret"
                .into(),
        );
    }
    // The seal vouches for every byte; what follows only slices what it vouched for.
    let seal = line.seal;
    let mut r = Reader {
        buf: &bytes[MAGIC.len()..seal_at],
    };
    let fingerprint = r.bytes()?.to_vec();
    let strings: Vec<Arc<str>> = r.strs()?.into_iter().map(Arc::from).collect();
    let owners = r.strs()?;
    let profiles: Vec<Profile> =
        serde_json::from_slice(r.bytes()?).map_err(|e| format!("profiles: {e}"))?;
    let rotations: Vec<KeyRecord> =
        serde_json::from_slice(r.bytes()?).map_err(|e| format!("rotations: {e}"))?;
    let n = r.count(ENTRY_BYTES)?;
    let body = r.take(n * ENTRY_BYTES)?;
    if n as u64 != seal.keys || !r.buf.is_empty() {
        return Err("entry count does not match the seal".into());
    }
    let entries = body.chunks_exact(ENTRY_BYTES).map(|c| {
        let mut b = [0u8; ENTRY_BYTES];
        b.copy_from_slice(c);
        Entry::from_bytes(&b)
    });
    let table = KeyTable::from_parts(
        seal.log, seal.rev, strings, owners, profiles, rotations, entries,
    )?;
    Ok(Loaded {
        table,
        seal,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::{Digest, Hasher};
    use crate::keys::record::{sample, Rotation};

    fn signer(byte: u8) -> Signer {
        Signer::new(&Hasher::new(vec![(1, vec![byte; 32])]))
    }

    fn table() -> KeyTable {
        let mut records = Vec::new();
        for i in 0..300u64 {
            let id = crate::keys::record::format_id("key", &u128::from(i).to_be_bytes());
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i * 7919).to_le_bytes());
            let mut r = sample(&id, Digest(d));
            r.rev = i + 1;
            r.owner = format!("team-{}", i % 4);
            r.revoked_at = (i % 50 == 0).then_some(10);
            r.imported = i % 3 == 0;
            records.push(r);
        }
        let mut odd = sample("legacy-id", Digest([200; 32]));
        odd.rev = 301;
        odd.lineage = "key_first".into();
        odd.rotated_to = Some("key_next".into());
        odd.rotation = Some(Rotation {
            started_at: 5,
            prior_expires_at: None,
            complete_when_idle_secs: Some(60),
            requests_at_start: 0,
            completed_at: None,
        });
        records.push(odd);
        KeyTable::from_records(records, LogId(42), 305)
    }

    #[test]
    fn round_trips_the_table() {
        let t = table();
        let s = signer(1);
        let bytes = encode(&t, b"...the log prefix\n", &s).unwrap();
        let back = decode(&bytes, &s).unwrap();
        assert_eq!(
            (back.seal.log, back.seal.rev, back.seal.keys),
            (LogId(42), 305, 301)
        );
        assert_eq!(back.fingerprint, b"...the log prefix\n");
        assert_eq!(back.table.len(), t.len());
        assert_eq!(back.table.revision(), 305);
        let mut want: Vec<KeyRecord> = t.records().iter().map(|r| (**r).clone()).collect();
        let mut got: Vec<KeyRecord> = back.table.records().iter().map(|r| (**r).clone()).collect();
        want.sort_by_key(|r| r.rev);
        got.sort_by_key(|r| r.rev);
        assert_eq!(got, want, "the same table, record for record");
        assert_eq!(back.table.open_rotations().len(), 1);
        let v = back.table.view_by_id("legacy-id").unwrap();
        assert_eq!(v.lineage(), "key_first");
    }

    #[test]
    fn a_cut_edited_extended_or_forged_checkpoint_is_refused() {
        let t = table();
        let s = signer(1);
        let bytes = encode(&t, b"prefix\n", &s).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("cut", bytes[..bytes.len() - 1].to_vec()),
            ("cut in the body", bytes[..bytes.len() / 2].to_vec()),
            ("extended", [bytes.clone(), b"x".to_vec()].concat()),
            ("empty", vec![]),
        ];
        for at in [10, bytes.len() / 2, bytes.len() - 20] {
            let mut edited = bytes.clone();
            edited[at] ^= 1;
            cases.push(("edited", edited));
        }
        cases.push(("forged", encode(&t, b"prefix\n", &signer(2)).unwrap()));
        for (what, b) in cases {
            assert!(decode(&b, &s).is_err(), "{what} checkpoint accepted");
        }
    }

    #[test]
    fn an_older_format_is_refused_by_name() {
        let t = table();
        let s = signer(1);
        let mut bytes = encode(&t, b"prefix\n", &s).unwrap();
        bytes[..8].copy_from_slice(OLD_MAGICS[0]);
        let err = decode(&bytes, &s).unwrap_err();
        assert!(err.contains("older format"), "{err}");
    }

    #[test]
    fn a_revision_checkpoint_says_so_and_a_file_one_does_not() {
        let t = table();
        let s = signer(1);
        let at_rev = decode(&encode_at_revision(&t, &s).unwrap(), &s).unwrap();
        assert!(at_rev.stands_for_a_revision());
        assert_eq!((at_rev.seal.log, at_rev.seal.rev), (LogId(42), 305));
        assert_eq!(at_rev.table.len(), t.len());
        let of_file = decode(&encode(&t, b"header\nline\n", &s).unwrap(), &s).unwrap();
        assert!(!of_file.stands_for_a_revision());
    }
}
