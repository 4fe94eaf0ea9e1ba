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
//!   before a revocation is revoked again when it is restored.
//!
//! Both are MAC'd with a key derived from the hash secret: editing them is detected (and
//! refused loudly) rather than trusted.

use crate::keys::record::KeyRecord;
use crate::store::file::{sibling, write_atomic};
use crate::store::seal::{LogId, Signer, Tag};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
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

    /// Append revoked records (their latest version) and fsync.
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
            .append(true)
            .open(&self.revoked)?;
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
}
