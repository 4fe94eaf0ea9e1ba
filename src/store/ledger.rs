//! What writers remember apart from the log, so that restoring `keys.jsonl` from a backup can
//! neither reuse a revision nor bring a revoked key back.
//!
//! - `<store>.hwm`: the log id and the highest revision ever issued (replaced atomically after
//!   each write). A log found behind it, or under another log id, was restored or replaced;
//!   the next writer starts a new log that continues after it (`file::LogFile`), so gateways
//!   that already applied those revisions see a new log id and reload whole instead of
//!   ignoring "replays" forever.
//! - `<store>.revoked`: every revocation ever written, one JSON line each, appended (fsync)
//!   before the record reaches the log. A new log re-applies all of them, so a backup taken
//!   before a revocation is revoked again when it is restored. A torn last line (a writer
//!   that died mid-append) is cut off before the next append, so it cannot swallow it.
//!
//! Both are MAC'd with a key derived from the hash secret: editing them is detected (and
//! refused loudly) rather than trusted.

use crate::keys::record::KeyRecord;
use crate::store::file::{sibling, write_atomic};
use crate::store::seal::{LogId, Signer, Tag};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The high-water mark: (log id, highest revision issued).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hwm {
    pub log: LogId,
    pub rev: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signed<T> {
    body: T,
    mac: Tag,
}

fn tag_of<T: Serialize>(signer: &Signer, what: &[u8], body: &T) -> io::Result<Tag> {
    let mut chain = signer.file_chain();
    chain.update(what);
    chain.update(&serde_json::to_vec(body)?);
    Ok(chain.tag(b""))
}

fn check<T: Serialize>(signer: &Signer, what: &[u8], s: &Signed<T>) -> bool {
    let Ok(mut chain) = signer.file_chain_for(s.mac.version) else {
        return false;
    };
    chain.update(what);
    match serde_json::to_vec(&s.body) {
        Ok(bytes) => {
            chain.update(&bytes);
            chain.verify(b"", &s.mac)
        }
        Err(_) => false,
    }
}

/// A ledger line that did not verify: (line number, why).
pub type BadLine = (u64, String);

#[derive(Debug, Clone)]
pub struct Ledger {
    hwm: PathBuf,
    revoked: PathBuf,
}

impl Ledger {
    pub fn for_store(store: &Path) -> Ledger {
        Ledger {
            hwm: sibling(store, ".hwm"),
            revoked: sibling(store, ".revoked"),
        }
    }

    /// The high-water mark, `None` when never written. A file that does not verify is an
    /// error: silently treating it as absent would let whoever edited it hide a restore.
    pub fn hwm(&self, signer: &Signer) -> io::Result<Option<Hwm>> {
        let bytes = match fs::read(&self.hwm) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let signed: Signed<Hwm> = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.hwm.display()),
            )
        })?;
        if !check(signer, b"hwm", &signed) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: MAC does not verify (edited, or another hash secret); restore it or remove it to trust the log as it is",
                    self.hwm.display()
                ),
            ));
        }
        Ok(Some(signed.body))
    }

    pub fn set_hwm(&self, signer: &Signer, hwm: Hwm) -> io::Result<()> {
        let signed = Signed {
            mac: tag_of(signer, b"hwm", &hwm)?,
            body: hwm,
        };
        let mut bytes = serde_json::to_vec(&signed)?;
        bytes.push(b'\n');
        write_atomic(&self.hwm, &bytes)
    }

    /// Append revoked records (their latest version) and fsync. Callers hold the store's lock
    /// (`file::LogFile`), so appends never interleave. A torn last line (an append cut short
    /// by a crash or a full disk: no newline) is cut off first, as the log's writer cuts its
    /// partial tail: appended to, it would merge with this revocation's line into one that
    /// does not parse, and this revocation would be lost to every later restore. Nobody was
    /// told the torn one succeeded (its record reaches the log only after this file), so
    /// cutting it loses nothing acknowledged.
    pub fn add_revoked(&self, signer: &Signer, records: &[&KeyRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for r in records {
            let signed = Signed {
                mac: tag_of(signer, b"revoked", r)?,
                body: *r,
            };
            serde_json::to_writer(&mut out, &signed)?;
            out.push(b'\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.revoked)?;
        let len = f.metadata()?.len();
        let whole = whole_lines_len(&f, len)?;
        if whole < len {
            f.set_len(whole)?;
        }
        f.write_all(&out)?;
        f.sync_data()
    }

    /// Every revocation recorded; lines that do not verify are returned as errors (line, why)
    /// and skipped, the rest still count (losing one forged line must not lose the others).
    pub fn revoked(&self, signer: &Signer) -> io::Result<(Vec<KeyRecord>, Vec<BadLine>)> {
        let bytes = match fs::read(&self.revoked) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], vec![])),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Signed<KeyRecord>>(line) {
                Ok(s) if check(signer, b"revoked", &s) && s.body.revoked_at.is_some() => {
                    out.push(s.body)
                }
                Ok(_) => bad.push((i as u64 + 1, "MAC does not verify".to_owned())),
                Err(e) => bad.push((i as u64 + 1, e.to_string())),
            }
        }
        Ok((out, bad))
    }
}

/// The length of the first `len` bytes of `file` up to and including its last newline: its
/// whole lines. Reads backwards from the end in chunks (a torn line is one record long).
fn whole_lines_len(file: &File, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 4096;
    let mut end = len;
    let mut buf = [0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::{Digest, Hasher};
    use crate::keys::record::sample;

    #[test]
    fn hwm_and_revocations_round_trip_and_refuse_edits() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::new(&Hasher::new(vec![(1, vec![1; 32])]));
        let l = Ledger::for_store(&dir.path().join("keys.jsonl"));
        assert_eq!(l.hwm(&signer).unwrap(), None);
        let h = Hwm {
            log: LogId(5),
            rev: 9,
        };
        l.set_hwm(&signer, h).unwrap();
        assert_eq!(l.hwm(&signer).unwrap(), Some(h));
        let text = fs::read_to_string(dir.path().join("keys.jsonl.hwm")).unwrap();
        fs::write(
            dir.path().join("keys.jsonl.hwm"),
            text.replace("\"rev\":9", "\"rev\":1"),
        )
        .unwrap();
        assert!(l.hwm(&signer).is_err(), "edited hwm is refused");

        let mut r = sample("key_a", Digest([1; 32]));
        r.revoked_at = Some(5);
        l.add_revoked(&signer, &[&r]).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("keys.jsonl.revoked"))
            .unwrap();
        f.write_all(b"{\"body\":{},\"mac\":\"1:00\"}\n").unwrap();
        let (got, bad) = l.revoked(&signer).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "key_a");
        assert_eq!(bad.len(), 1);
    }

    /// A ledger append torn by a crash or a full disk (a line without its newline) cannot
    /// swallow the next revocation's line: that revocation is recorded, so restoring a backup
    /// taken before it does not bring the key back.
    #[test]
    fn a_torn_ledger_line_never_swallows_the_next_revocation() {
        use crate::store::file::{latest, test_signer, LogFile};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        let log = LogFile::new(&path, test_signer());
        log.append(vec![
            sample("key_a", Digest([1; 32])),
            sample("key_b", Digest([2; 32])),
        ])
        .unwrap();
        let backup = fs::read(&path).unwrap();
        let mut torn = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("keys.jsonl.revoked"))
            .unwrap();
        torn.write_all(b"{\"body\":{\"rev\":").unwrap();
        drop(torn);
        log.transact_key("key_a", |cur| {
            let mut r = cur.expect("key_a is in the log").clone();
            r.revoked_at = Some(5);
            Ok::<_, ()>(vec![r])
        })
        .unwrap()
        .unwrap();
        fs::write(&path, &backup).unwrap();
        log.ensure_signed().unwrap();
        let keys = latest(log.load().unwrap().records);
        assert!(
            keys["key_a"].revoked_at.is_some(),
            "revoked after the restore"
        );
        assert!(keys["key_b"].revoked_at.is_none());
        // The torn line is cut off (nobody was told it succeeded), not left to be reported.
        let (recorded, bad) = Ledger::for_store(&path).revoked(&test_signer()).unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].id, "key_a");
        assert!(bad.is_empty(), "{bad:?}");
    }
}
