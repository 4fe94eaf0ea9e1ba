//! The gateway's local copy of its feed table, sealed: what lets a restart serve the last good
//! table while the control plane is down, without trusting whoever can write the file.
//!
//! Layout (JSON lines): a header `{"cache":"keygate-feed","log":"<id>"}`, the table's records
//! (as this gateway enforces them: revocations it kept against the source included), and a seal
//! `{"seal":{"log","count","rev","synced_ms"},"mac":"<v>:<hex>"}` whose MAC covers every byte
//! before it and the seal itself. The gateway holds the hash secret, so it authenticates what
//! it caches: an edited line, a foreign record, a reordered file, a cut anywhere (mid-line, on
//! a line boundary, or followed by garbage) fails the seal, and the cache is discarded loudly;
//! the gateway then fails closed until the feed answers.
//!
//! Appends keep one seal at the end: the new lines and the new seal are written in one write
//! over the old seal (then fsync), using a running MAC, so an append costs its own bytes. A
//! crash inside that write leaves a file that fails the seal: discarded, never half-trusted.

use crate::keys::record::KeyRecord;
use crate::store::file::write_atomic;
use crate::store::seal::{Chain, LogId, Signer, Tag};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

const KIND: &str = "keygate-feed";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    cache: String,
    log: LogId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealBody {
    log: LogId,
    count: u64,
    rev: u64,
    synced_ms: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealLine {
    seal: SealBody,
    mac: Tag,
}

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("feed cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("feed cache {path} rejected: {why}")]
    Rejected { path: PathBuf, why: String },
}

/// A verified cache.
#[derive(Debug)]
pub struct Cached {
    pub log: LogId,
    pub rev: u64,
    /// When the gateway last heard from the feed (the sync age continues from here).
    pub synced_ms: i64,
    pub records: Vec<KeyRecord>,
}

/// Read and verify the cache at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path, signer: &Signer) -> Result<Option<(Cached, CacheWriter)>, CacheError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let reject = |why: String| CacheError::Rejected {
        path: path.to_owned(),
        why,
    };
    if bytes.last() != Some(&b'\n') {
        return Err(reject(
            "does not end with a complete seal line (cut?)".into(),
        ));
    }
    let body = &bytes[..bytes.len() - 1];
    let seal_at = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let seal: SealLine = serde_json::from_slice(&body[seal_at..]).map_err(|e| {
        reject(format!(
            "last line is not a seal ({e}): cut or appended to?"
        ))
    })?;
    let mut chain = signer
        .file_chain_for(seal.mac.version)
        .map_err(|e| reject(e.to_string()))?;
    chain.update(&bytes[..seal_at]);
    let seal_json = serde_json::to_vec(&seal.seal).map_err(|e| reject(e.to_string()))?;
    if !chain.verify(&seal_json, &seal.mac) {
        return Err(reject(
            "seal does not verify: edited, cut, reordered or written by someone without the hash secret"
                .into(),
        ));
    }
    // The seal vouches for every byte; what follows only parses what it vouched for.
    let mut lines = bytes[..seal_at]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty());
    let header: Header = lines
        .next()
        .ok_or_else(|| reject("no header".into()))
        .and_then(|l| serde_json::from_slice(l).map_err(|e| reject(format!("header: {e}"))))?;
    if header.cache != KIND || header.log != seal.seal.log {
        return Err(reject("header does not match the seal".into()));
    }
    let mut records = Vec::with_capacity(seal.seal.count.min(1 << 24) as usize);
    for line in lines {
        records.push(
            serde_json::from_slice::<KeyRecord>(line)
                .map_err(|e| reject(format!("record: {e}")))?,
        );
    }
    if records.len() as u64 != seal.seal.count {
        return Err(reject(format!(
            "{} records where the seal says {}",
            records.len(),
            seal.seal.count
        )));
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| CacheError::Io {
            path: path.to_owned(),
            source,
        })?;
    let writer = CacheWriter {
        path: path.to_owned(),
        file,
        chain,
        seal: seal.seal,
        seal_at: seal_at as u64,
    };
    Ok(Some((
        Cached {
            log: seal.seal.log,
            rev: seal.seal.rev,
            synced_ms: seal.seal.synced_ms,
            records,
        },
        writer,
    )))
}

/// Keep a rejected cache for forensics, out of the way of the next start.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let to = crate::store::file::sibling(path, ".rejected");
    fs::rename(path, &to)?;
    Ok(to)
}

/// Appends to a sealed cache, keeping the running MAC.
#[derive(Debug)]
pub struct CacheWriter {
    path: PathBuf,
    file: File,
    chain: Chain,
    seal: SealBody,
    /// Where the current seal line starts (the next append overwrites it).
    seal_at: u64,
}

fn lines(records: &[KeyRecord]) -> io::Result<Vec<u8>> {
    crate::store::file::encode(records)
}

impl CacheWriter {
    /// Replace the cache with a whole table (atomically) and return a writer for appends.
    pub fn create(
        path: &Path,
        signer: &Signer,
        log: LogId,
        rev: u64,
        records: &[KeyRecord],
        synced_ms: i64,
    ) -> io::Result<CacheWriter> {
        let mut out = serde_json::to_vec(&Header {
            cache: KIND.into(),
            log,
        })?;
        out.push(b'\n');
        out.extend(lines(records)?);
        let mut chain = signer.file_chain();
        chain.update(&out);
        let seal = SealBody {
            log,
            count: records.len() as u64,
            rev,
            synced_ms,
        };
        let seal_at = out.len() as u64;
        out.extend(seal_line(&chain, seal)?);
        write_atomic(path, &out)?;
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(CacheWriter {
            path: path.to_owned(),
            file,
            chain,
            seal,
            seal_at,
        })
    }

    pub fn log(&self) -> LogId {
        self.seal.log
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append records (as enforced) at revision `rev`, heard from the feed at `synced_ms`.
    pub fn append(&mut self, records: &[KeyRecord], rev: u64, synced_ms: i64) -> io::Result<()> {
        let new = lines(records)?;
        self.seal.count += records.len() as u64;
        self.seal.rev = self.seal.rev.max(rev);
        self.seal.synced_ms = synced_ms;
        self.chain.update(&new);
        self.write_tail(new)
    }

    /// Append records this gateway enforces without having heard its source in step: the
    /// revocations of a whole table it refused (`sync::file::shrink`). The seal keeps its
    /// revision and sync time, so a restart serves the revocations and still counts its sync
    /// age from when the source was last in step.
    pub fn append_unsynced(&mut self, records: &[KeyRecord]) -> io::Result<()> {
        let (rev, synced_ms) = (self.seal.rev, self.seal.synced_ms);
        self.append(records, rev, synced_ms)
    }

    /// Record that the feed was heard from (heartbeats) without new records.
    pub fn touch(&mut self, rev: u64, synced_ms: i64) -> io::Result<()> {
        self.seal.rev = self.seal.rev.max(rev);
        self.seal.synced_ms = synced_ms;
        self.write_tail(Vec::new())
    }

    fn write_tail(&mut self, mut new: Vec<u8>) -> io::Result<()> {
        let start = self.seal_at;
        self.seal_at += new.len() as u64;
        new.extend(seal_line(&self.chain, self.seal)?);
        self.file.write_all_at(&new, start)?;
        self.file.set_len(start + new.len() as u64)?;
        self.file.sync_data()
    }
}

fn seal_line(chain: &Chain, seal: SealBody) -> io::Result<Vec<u8>> {
    let mac = chain.tag(&serde_json::to_vec(&seal)?);
    let mut line = serde_json::to_vec(&SealLine { seal, mac })?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::{Digest, Hasher};
    use crate::keys::record::sample;

    fn signer() -> Signer {
        Signer::new(&Hasher::new(vec![(1, vec![3; 32])]))
    }

    fn rec(id: &str, n: u8, rev: u64, revoked: bool) -> KeyRecord {
        KeyRecord {
            rev,
            revoked_at: revoked.then_some(5),
            ..sample(id, Digest([n; 32]))
        }
    }

    fn fixture(dir: &Path) -> (PathBuf, Vec<u8>) {
        let path = dir.join("cache.jsonl");
        let s = signer();
        let mut w = CacheWriter::create(
            &path,
            &s,
            LogId(9),
            2,
            &[rec("key_a", 1, 1, false), rec("key_b", 2, 2, false)],
            1_000,
        )
        .unwrap();
        w.append(&[rec("key_a", 1, 3, true)], 3, 2_000).unwrap();
        w.touch(4, 3_000).unwrap();
        let bytes = fs::read(&path).unwrap();
        (path, bytes)
    }

    #[test]
    fn round_trip_after_appends_and_touches() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = fixture(dir.path());
        let (c, mut w) = load(&path, &signer()).unwrap().unwrap();
        assert_eq!((c.log, c.rev, c.synced_ms), (LogId(9), 4, 3_000));
        assert_eq!(c.records.len(), 3);
        assert!(c.records[2].revoked_at.is_some());
        // The writer recovered from a load continues the same chain.
        w.append(&[rec("key_c", 3, 5, false)], 5, 4_000).unwrap();
        let (c, _) = load(&path, &signer()).unwrap().unwrap();
        assert_eq!(c.records.len(), 4);
        assert_eq!(c.rev, 5);
    }

    #[test]
    fn every_cut_every_edit_and_every_foreign_line_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = fixture(dir.path());
        let s = signer();
        // Every truncation, including each line boundary (THREATS I4).
        for cut in 0..bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(load(&path, &s), Err(CacheError::Rejected { .. })),
                "cut at {cut} accepted"
            );
        }
        // Garbage after the seal.
        let mut tail = bytes.clone();
        tail.extend_from_slice(b"{\"junk\":1}\n");
        fs::write(&path, &tail).unwrap();
        assert!(load(&path, &s).is_err());
        // The revocation removed, keeping everything else.
        let text = String::from_utf8(bytes.clone()).unwrap();
        fs::write(&path, text.replacen(",\"revoked_at\":5", "", 1)).unwrap();
        assert!(load(&path, &s).is_err(), "edited revocation accepted");
        // A foreign record inserted before the seal.
        let seal_at = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        let foreign = serde_json::to_string(&rec("key_evil", 9, 10, false)).unwrap();
        fs::write(
            &path,
            format!("{}{foreign}\n{}", &text[..seal_at], &text[seal_at..]),
        )
        .unwrap();
        assert!(load(&path, &s).is_err(), "foreign record accepted");
        // Another secret.
        fs::write(&path, &bytes).unwrap();
        let other = Signer::new(&Hasher::new(vec![(1, vec![4; 32])]));
        assert!(load(&path, &other).is_err());
        assert!(load(&path, &s).is_ok());
    }
}
