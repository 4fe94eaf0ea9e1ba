//! The record log as one JSON-lines file.
//!
//! Why JSON lines: one record version per line is append-only friendly (a writer adds bytes,
//! never rewrites), diffable and greppable by operators, and a reader can follow it by byte
//! offset. The cost is parse time: ~2.3 µs per record line with serde_json, so a cold load of a
//! million keys takes ~3 s (docs/performance.md, "Millions of keys"); appends are applied
//! incrementally.
//!
//! Layout: a header line naming the log (`{"header":"keygate-log","log":"<id>"}`), record
//! lines each carrying a MAC over (log id, revision, content) (`store::seal`), and after a
//! compaction a signed meta line. A file without a header is a legacy unsigned store: the
//! first write (or `keygate keys compact`) signs it in place under a new log id.
//!
//! Invariants:
//! - Writers hold an exclusive `flock` on the file while they append and fsync. After taking
//!   the lock they check the path still names the locked inode, because a compaction may have
//!   renamed a new file over it while they waited (else their append would land in an orphan).
//! - Writers learn the next revision from the last line whose MAC verifies (`tail_revision`),
//!   never from one that merely parses, and add to it checked (`last_revision`): never
//!   wrapped, never past the highest revision a key table holds.
//! - Revisions strictly increase in file order and are never reused: a writer that finds the
//!   log behind the high-water mark it keeps apart from the log (`store::ledger`), or under
//!   another log id, starts a new log that continues after it and re-applies every revocation
//!   ever written (a restored backup cannot bring a revoked key back).
//! - A writer never writes a version of a key that un-revokes it (`unrevokes`).
//! - A compacted file ends with a meta line that carries the revision it was compacted at, so
//!   dropping superseded versions never lowers it; revoked keys stay as tombstones forever.
//! - A line without its trailing newline is a write that never finished (the writer died): a
//!   reader waits for it, the next writer truncates it away before appending.
//! - A corrupt complete line (bad JSON, bad MAC) is reported with its line number and
//!   skipped; it never stops a reader and never blocks a writer (revocation must always be
//!   possible).

use crate::keys::compact::MAX_REV;
use crate::keys::digest::Digest;
use crate::keys::record::{unrevokes, KeyRecord};
use crate::store::ledger::{Hwm, Ledger};
use crate::store::seal::{LogId, Signer, Tag};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store {path}: kept being replaced while we waited for its lock")]
    Unstable { path: PathBuf },
    #[error("store {path} is at revision {file_rev}, older than revision {applied_rev} already applied: refusing a rollback")]
    Rollback {
        path: PathBuf,
        file_rev: u64,
        applied_rev: u64,
    },
    #[error("store {path} is unsigned, but the signed log {log} was applied before: refusing it (an old backup or a forged file?)")]
    Downgrade { path: PathBuf, log: LogId },
    #[error("refusing to un-revoke key {id}: revocation is final")]
    Unrevoke { id: String },
    #[error("redis store: {0}")]
    Redis(String),
    #[error("the revocation is written but only {acked} of {wanted} replicas confirmed it within the timeout; it is enforced, and a failover now could lose it")]
    NotReplicated { acked: i64, wanted: u32 },
    #[error("the store is at revision {rev}, and {count} more would pass revision {max}, the highest a key table holds: nothing written (a revision this high is forged or a mistake: find the log line or Redis stream entry that carries it)", max = MAX_REV)]
    RevisionBound { rev: u64, count: usize },
}

impl StoreError {
    /// A closed label for metrics (`keygate_source_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Io { .. }
            | StoreError::Unstable { .. }
            | StoreError::Redis(_)
            | StoreError::NotReplicated { .. }
            | StoreError::RevisionBound { .. } => "io",
            StoreError::Rollback { .. } | StoreError::Unrevoke { .. } => "rollback",
            StoreError::Downgrade { .. } => "unsigned",
        }
    }
}

/// The last of `count` revisions issued after `rev`: checked, never wrapped, and never past
/// [`MAX_REV`], the highest revision a key table holds (it caps revisions there, so a version
/// written above it would be ignored as not newer than the one before). Every writer's
/// revision arithmetic goes through here (the file's and Redis's).
pub fn last_revision(rev: u64, count: usize) -> Result<u64, StoreError> {
    if count == 0 {
        return Ok(rev); // nothing issued, nothing to refuse
    }
    u64::try_from(count)
        .ok()
        .and_then(|n| rev.checked_add(n))
        .filter(|&last| last <= MAX_REV)
        .ok_or(StoreError::RevisionBound { rev, count })
}

/// A complete line that did not parse, did not verify, or whose revision went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    pub line: u64,
    pub reason: String,
}

/// The first line of a signed log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    header: String,
    log: LogId,
}

const HEADER_KIND: &str = "keygate-log";

/// The meta line closing a compacted file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    meta: String,
    rev: u64,
    at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<Tag>,
}

impl Meta {
    fn tag(signer: &Signer, log: LogId, rev: u64, at: i64) -> Tag {
        let mut c = signer.file_chain();
        c.update(&log.0.to_be_bytes());
        c.update(&rev.to_be_bytes());
        c.update(&at.to_be_bytes());
        c.tag(b"meta")
    }

    fn verify(&self, signer: &Signer, log: LogId) -> bool {
        let Some(tag) = self.mac else { return false };
        let Ok(mut c) = signer.file_chain_for(tag.version) else {
            return false;
        };
        c.update(&log.0.to_be_bytes());
        c.update(&self.rev.to_be_bytes());
        c.update(&self.at.to_be_bytes());
        c.verify(b"meta", &tag)
    }
}

enum Line {
    Header(LogId),
    Record(Box<KeyRecord>),
    Meta(Meta),
}

fn parse_line(line: &[u8]) -> Result<Line, String> {
    if line.starts_with(b"{\"header\":") {
        return match serde_json::from_slice::<Header>(line) {
            Ok(h) if h.header == HEADER_KIND && !h.log.is_none() => Ok(Line::Header(h.log)),
            Ok(h) => Err(format!("unknown header {:?}", h.header)),
            Err(e) => Err(e.to_string()),
        };
    }
    if line.starts_with(b"{\"meta\":") {
        return serde_json::from_slice::<Meta>(line)
            .map(Line::Meta)
            .map_err(|e| e.to_string());
    }
    serde_json::from_slice::<KeyRecord>(line)
        .map(|r| Line::Record(Box::new(r)))
        .map_err(|e| e.to_string())
}

/// Parsed lines of a byte range of the log.
#[derive(Debug, Default)]
pub struct Parsed {
    pub records: Vec<KeyRecord>,
    pub corrupt: Vec<Corrupt>,
    /// Highest revision seen (records and meta lines), or the input revision if none.
    pub rev: u64,
    /// The revision of the last compaction meta line, if the range held one: records at or
    /// below it are a compacted snapshot, not the full history.
    pub compacted_at: Option<u64>,
    /// The log these lines belong to; `LogId::NONE` for a legacy unsigned file.
    pub log: LogId,
}

/// Parse complete lines in `buf`, numbering from `first_line`, accepting only revisions above
/// `after`. In a signed log (`log`, or a header on line 1) every record and meta line must
/// verify under `signer`; a line that does not is reported corrupt and skipped. Without a
/// signer (fuzzing, benchmarks) nothing is verified.
fn parse_lines(
    buf: &[u8],
    first_line: u64,
    after: u64,
    log: LogId,
    signer: Option<&Signer>,
) -> Parsed {
    let mut out = Parsed {
        rev: after,
        log,
        ..Parsed::default()
    };
    // `last` orders records; a compaction meta line raises the file's revision without
    // constraining the (older) records that follow it.
    let mut last = after;
    for (i, line) in buf.split(|&b| b == b'\n').enumerate() {
        let number = first_line + i as u64;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let signed = (!out.log.is_none()).then_some(signer).flatten();
        let corrupt = |reason: String| Corrupt {
            line: number,
            reason,
        };
        match parse_line(line) {
            Ok(Line::Header(id)) if number == 1 => out.log = id,
            Ok(Line::Header(_)) => out
                .corrupt
                .push(corrupt("a header is only valid on line 1".into())),
            Ok(Line::Meta(m)) if signed.is_some_and(|s| !m.verify(s, out.log)) => out
                .corrupt
                .push(corrupt("meta line MAC does not verify".into())),
            Ok(Line::Meta(m)) => {
                out.rev = out.rev.max(m.rev);
                out.compacted_at = Some(m.rev);
            }
            Ok(Line::Record(r)) if r.rev <= last => out.corrupt.push(corrupt(format!(
                "revision {} does not follow {}",
                r.rev, last
            ))),
            Ok(Line::Record(r)) => match signed.map(|s| s.verify(out.log, &r)) {
                Some(Err(e)) => out.corrupt.push(corrupt(e.to_string())),
                Some(Ok(())) | None => {
                    last = r.rev;
                    out.rev = out.rev.max(r.rev);
                    out.records.push(*r);
                }
            },
            Err(reason) => out.corrupt.push(corrupt(reason)),
        }
    }
    out
}

/// Parse a whole log file's bytes as [`LogFile::load`] does (complete lines only: a partial
/// last line is a write still in progress), without verifying MACs. Public so the fuzz
/// harness (`fuzz/targets_common.rs`) can drive the line parser without a file.
pub fn parse_log(buf: &[u8]) -> Parsed {
    parse_lines(complete_prefix(buf), 1, 0, LogId::NONE, None)
}

/// Latest version per id, from records in revision order.
pub fn latest(records: Vec<KeyRecord>) -> HashMap<String, KeyRecord> {
    let mut map = HashMap::with_capacity(records.len());
    for r in records {
        map.insert(r.id.clone(), r);
    }
    map
}

/// What a writer sees under the lock: the current state of every key.
#[derive(Debug)]
pub struct State {
    pub keys: HashMap<String, KeyRecord>,
    pub rev: u64,
    pub corrupt: Vec<Corrupt>,
}

/// Why a writer started a new log before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewLog {
    /// An empty store gets its first log id.
    Fresh,
    /// A legacy unsigned store, signed in place.
    Upgrade,
    /// The log is behind the highest revision ever issued, or under another log id: it was
    /// restored from a backup or replaced.
    Restored,
}

/// What [`LogFile::create_if_missing`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The path exists (readable or not: the reader judges it).
    Existed,
    /// The file was missing and is now an empty signed log.
    Created(LogId),
    /// The directory itself is missing: nothing was written.
    NoDirectory(PathBuf),
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Keys in the new file (tombstones included).
    pub kept: usize,
    /// Superseded versions dropped.
    pub dropped: usize,
    /// Revoked keys past the retention reduced to a tombstone (id, digest, times).
    pub tombstoned: usize,
}

/// The log file at a path. Cheap to construct; every operation opens the file.
#[derive(Debug, Clone)]
pub struct LogFile {
    path: PathBuf,
    signer: Signer,
    ledger: Ledger,
}

impl LogFile {
    pub fn new(path: impl Into<PathBuf>, signer: Signer) -> LogFile {
        let path = path.into();
        LogFile {
            ledger: Ledger::for_store(&path),
            path,
            signer,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Parse (and verify) complete lines of a byte range of this log.
    pub fn parse(&self, buf: &[u8], first_line: u64, after: u64, log: LogId) -> Parsed {
        parse_lines(buf, first_line, after, log, Some(&self.signer))
    }

    /// The log's last revision, from its tail alone (no lock, no parse of the whole file):
    /// what a reader holding the log in memory waits for to see every write made so far.
    pub fn head_revision(&self) -> Result<u64, StoreError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        let log = read_header(&mut file).map_err(|e| self.io(e))?;
        tail_revision(&mut file, len, log, &self.signer)
            .map(|(_, rev)| rev)
            .map_err(|e| self.io(e))
    }

    /// The digest of every key the log holds, read in bounded chunks (an import's one look at
    /// the store: 32 bytes a key instead of whole parsed records). Lines that do not verify
    /// are left out, as every reader leaves them out.
    pub fn digests(&self) -> Result<HashSet<Digest>, StoreError> {
        const CHUNK: usize = 4 << 20;
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut reader = io::BufReader::with_capacity(1 << 20, file);
        let mut out = HashSet::new();
        let (mut log, mut after, mut line) = (LogId::NONE, 0, 1);
        let mut chunk = Vec::with_capacity(CHUNK + 4096);
        loop {
            chunk.clear();
            while chunk.len() < CHUNK {
                if reader
                    .read_until(b'\n', &mut chunk)
                    .map_err(|e| self.io(e))?
                    == 0
                {
                    break;
                }
            }
            let complete = complete_prefix(&chunk);
            if complete.is_empty() {
                return Ok(out);
            }
            let parsed = self.parse(complete, line, after, log);
            line += complete.iter().filter(|&&b| b == b'\n').count() as u64;
            log = parsed.log;
            // Records order against records only (a compaction meta line may precede older
            // revisions), as in one parse of the whole file.
            after = parsed.records.last().map_or(after, |r| r.rev);
            out.extend(parsed.records.iter().map(|r| r.digest));
        }
    }

    /// Read the whole log (no lock: appends are whole lines and replacement is a rename, so a
    /// reader always sees a consistent prefix). A missing file is an empty log.
    pub fn load(&self) -> Result<Parsed, StoreError> {
        match fs::read(&self.path) {
            Ok(buf) => Ok(self.parse(complete_prefix(&buf), 1, 0, LogId::NONE)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Parsed::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Open, lock exclusively, and make sure the locked inode is still the one at the path.
    fn lock(&self) -> Result<File, StoreError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        // Bounded: each retry means a compaction finished between our open and our lock.
        for _ in 0..100 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            file.lock().map_err(|e| self.io(e))?;
            let locked = file.metadata().map_err(|e| self.io(e))?;
            match fs::metadata(&self.path) {
                Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => {
                    return Ok(file)
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(e)),
            }
        }
        Err(StoreError::Unstable {
            path: self.path.clone(),
        })
    }

    /// Lock and read the whole file; `None` (after starting a new log) when the log had to be
    /// replaced first, in which case the caller locks again.
    fn lock_and_read(
        &self,
        known: Option<(u64, &[KeyRecord])>,
    ) -> Result<Option<(File, Vec<u8>, Parsed)>, StoreError> {
        let mut file = self.lock()?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| self.io(e))?;
        let parsed = self.parse(complete_prefix(&buf), 1, 0, LogId::NONE);
        match self.needs_new_log(&parsed, known.map(|k| k.0))? {
            None => Ok(Some((file, buf, parsed))),
            Some(why) => {
                self.start_new_log(parsed, why, known.map_or(&[], |k| k.1))?;
                // The old inode's lock is released on drop; we lock the new file next.
                drop(file);
                Ok(None)
            }
        }
    }

    /// Does the log need a new log id before anyone writes to it? `known_rev` is a revision a
    /// caller knows was issued in this log (a control plane's memory).
    fn needs_new_log(
        &self,
        parsed: &Parsed,
        known_rev: Option<u64>,
    ) -> Result<Option<NewLog>, StoreError> {
        let hwm = self.ledger.hwm(&self.signer).map_err(|e| self.io(e))?;
        let issued = hwm.map_or(0, |h| h.rev).max(known_rev.unwrap_or(0));
        if parsed.log.is_none() {
            let empty = parsed.records.is_empty() && parsed.rev == 0;
            return Ok(Some(match (empty, hwm) {
                (true, None) => NewLog::Fresh,
                (false, None) => NewLog::Upgrade,
                (_, Some(_)) => NewLog::Restored,
            }));
        }
        let behind = parsed.rev < issued;
        let other_log = hwm.is_some_and(|h| h.log != parsed.log);
        Ok((behind || other_log).then_some(NewLog::Restored))
    }

    /// Rewrite the log under a new log id: the latest version of each key, every revocation
    /// ever written (the ledger, plus `also_revoked` from the caller) re-applied, revisions
    /// continuing after the highest ever issued, all signed. The high-water mark is written
    /// first: a crash between the two leaves a log that is "behind" it, which only means the
    /// next writer does this again.
    fn start_new_log(
        &self,
        parsed: Parsed,
        why: NewLog,
        also_revoked: &[KeyRecord],
    ) -> Result<(), StoreError> {
        let hwm = self.ledger.hwm(&self.signer).map_err(|e| self.io(e))?;
        let (ledger, bad) = self.ledger.revoked(&self.signer).map_err(|e| self.io(e))?;
        for (line, why) in bad {
            tracing::error!(line, reason = %why, "revocation ledger line skipped");
        }
        let mut keys = latest(parsed.records);
        let mut revived = Vec::new();
        for gone in ledger.into_iter().chain(also_revoked.iter().cloned()) {
            match keys.get_mut(&gone.id) {
                Some(cur) if cur.revoked_at.is_some() => {}
                Some(cur) => {
                    revived.push(gone.id.clone());
                    *cur = gone;
                }
                None => {
                    keys.insert(gone.id.clone(), gone);
                }
            }
        }
        let mut records: Vec<KeyRecord> = keys.into_values().collect();
        records.sort_by(|a, b| a.rev.cmp(&b.rev).then_with(|| a.id.cmp(&b.id)));
        let log = LogId::new().map_err(|e| self.io(io::Error::other(e.to_string())))?;
        let base = hwm.map_or(0, |h| h.rev).max(parsed.rev);
        let rev = last_revision(base, records.len())?;
        // `rev` bounds the range: with records in it, base + 1 ..= rev holds one each.
        for (r, next) in records.iter_mut().zip(base.saturating_add(1)..=rev) {
            r.rev = next;
            self.signer.sign(log, r);
        }
        let now = crate::clock::unix_secs();
        let bytes = self.encode_file(log, &records, rev, now)?;
        self.ledger
            .set_hwm(&self.signer, Hwm { log, rev })
            .map_err(|e| self.io(e))?;
        write_atomic(&self.path, &bytes).map_err(|e| self.io(e))?;
        match why {
            NewLog::Fresh => tracing::info!(path = %self.path.display(), %log, "new key store log"),
            NewLog::Upgrade => {
                tracing::warn!(path = %self.path.display(), %log, keys = records.len(), "unsigned key store signed in place under a new log")
            }
            NewLog::Restored => tracing::error!(
                path = %self.path.display(),
                %log,
                revision = rev,
                keys_revoked_again = ?revived,
                "key store was restored or replaced (behind the highest revision issued, or another log): continuing as a new log after revision {}, every recorded revocation re-applied",
                hwm.map_or(0, |h| h.rev)
            ),
        }
        Ok(())
    }

    /// A whole signed file: header, records, signed meta line.
    fn encode_file(
        &self,
        log: LogId,
        records: &[KeyRecord],
        rev: u64,
        now: i64,
    ) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(records.len() * 400 + 128);
        let header = Header {
            header: HEADER_KIND.into(),
            log,
        };
        serde_json::to_writer(&mut out, &header).map_err(|e| self.io(e.into()))?;
        out.push(b'\n');
        out.extend(encode(records).map_err(|e| self.io(e))?);
        if rev == 0 {
            return Ok(out);
        }
        // The meta line goes last: appenders learn the next revision from the tail alone.
        let meta = Meta {
            meta: "compacted".into(),
            rev,
            at: now,
            mac: Some(Meta::tag(&self.signer, log, rev, now)),
        };
        serde_json::to_writer(&mut out, &meta).map_err(|e| self.io(e.into()))?;
        out.push(b'\n');
        Ok(out)
    }

    /// Create the store empty (header and log id, via [`LogFile::ensure_signed`]) when the
    /// file is missing but its directory exists, so a fresh install has a valid zero-key
    /// table. A missing directory is not created: it usually means a volume that is not
    /// mounted, and the reader must fail closed rather than serve from a stray empty file.
    pub fn create_if_missing(&self) -> Result<Missing, StoreError> {
        match fs::symlink_metadata(&self.path) {
            Ok(_) => return Ok(Missing::Existed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(e)),
        }
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Ok(Missing::NoDirectory(dir.to_owned()));
        }
        self.ensure_signed().map(Missing::Created)
    }

    /// Write a whole signed log copied from another store (`keygate store migrate --to
    /// file`): the same log id, revisions and MACs, every version. Refuses to overwrite a file
    /// that already holds records of another log; writing the same log again is harmless.
    pub fn import_log(
        &self,
        log: LogId,
        rev: u64,
        records: &[KeyRecord],
    ) -> Result<usize, StoreError> {
        let file = self.lock()?;
        let existing = self.load()?;
        if !existing.records.is_empty() && existing.log != log {
            return Err(StoreError::Io {
                path: self.path.clone(),
                source: io::Error::other(format!(
                    "already holds another store (log {}); refusing to mix two logs",
                    existing.log
                )),
            });
        }
        let revoked: Vec<&KeyRecord> = records.iter().filter(|r| r.revoked_at.is_some()).collect();
        self.ledger
            .add_revoked(&self.signer, &revoked)
            .map_err(|e| self.io(e))?;
        let bytes = self.encode_file(log, records, rev, crate::clock::unix_secs())?;
        self.ledger
            .set_hwm(&self.signer, Hwm { log, rev })
            .map_err(|e| self.io(e))?;
        write_atomic(&self.path, &bytes).map_err(|e| self.io(e))?;
        drop(file);
        Ok(records.len())
    }

    /// Sign a legacy store, give an empty one its log id, or continue a restored one as a new
    /// log (see [`LogFile::start_new_log`]); nothing else is written. Returns the log id.
    pub fn ensure_signed(&self) -> Result<LogId, StoreError> {
        self.continue_after(0, &[])
    }

    /// Like [`LogFile::ensure_signed`], for a caller that knows more than the files: a control
    /// plane that applied revision `known_rev` and the revoked records `known_revoked` before
    /// the log was replaced under it.
    pub fn continue_after(
        &self,
        known_rev: u64,
        known_revoked: &[KeyRecord],
    ) -> Result<LogId, StoreError> {
        for _ in 0..3 {
            if let Some((_, _, parsed)) = self.lock_and_read(Some((known_rev, known_revoked)))? {
                return Ok(parsed.log);
            }
        }
        Err(StoreError::Unstable {
            path: self.path.clone(),
        })
    }

    /// Append records built from the current state, under the lock: `build` sees every key's
    /// latest version and returns the new versions to write (revisions are assigned here).
    /// Returns the written records.
    pub fn transact<E>(
        &self,
        build: impl FnOnce(&State) -> Result<Vec<KeyRecord>, E>,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError> {
        let mut locked = None;
        for _ in 0..3 {
            locked = self.lock_and_read(None)?;
            if locked.is_some() {
                break;
            }
        }
        let Some((file, buf, parsed)) = locked else {
            return Err(StoreError::Unstable {
                path: self.path.clone(),
            });
        };
        let complete = complete_prefix(&buf).len();
        let (log, rev) = (parsed.log, parsed.rev);
        let state = State {
            keys: latest(parsed.records),
            rev,
            corrupt: parsed.corrupt,
        };
        let records = match build(&state) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let tail = Tail {
            file,
            len: buf.len() as u64,
            complete: complete as u64,
            log,
            rev,
        };
        self.write_changes(tail, records, |id| state.keys.get(id))
            .map(Ok)
    }

    /// [`LogFile::transact`] for a change to one key (revoke, update): `build` sees that key's
    /// latest version (`None`: not in the log) instead of every key's, so the log is scanned,
    /// not parsed. Under the same lock, with the same checks: the log and its next revision
    /// come from the header and tail, checked against the high-water mark as
    /// [`LogFile::append`] does (anything unusual takes the careful path, `transact`), and the
    /// written versions must not un-revoke a key (each checked against its own current
    /// version, found by [`LogFile::key_version`] like the changed key's).
    pub fn transact_key<E>(
        &self,
        id: &str,
        build: impl FnOnce(Option<&KeyRecord>) -> Result<Vec<KeyRecord>, E>,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError> {
        let Some(mut tail) = self.vouched_tail()? else {
            return self.transact(|state| build(state.keys.get(id)));
        };
        let current = self.key_version(&mut tail.file, tail.complete, tail.log, id)?;
        let records = match build(current.as_ref()) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        // The checks below need the current version of every key written: a rotation also
        // writes its successor (a new id: one more scan finds nothing).
        let mut currents = HashMap::from([(id.to_owned(), current)]);
        for r in &records {
            if !currents.contains_key(&r.id) {
                let found = self.key_version(&mut tail.file, tail.complete, tail.log, &r.id)?;
                currents.insert(r.id.clone(), found);
            }
        }
        self.write_changes(tail, records, |id| {
            currents.get(id).and_then(Option::as_ref)
        })
        .map(Ok)
    }

    /// Write `records` into the locked log `tail`, `current` giving each key's version in it
    /// (`None`: a new key): refused whole if one would un-revoke its key; the ones that newly
    /// revoke a key go into the ledger before the lines are written.
    fn write_changes<'c>(
        &self,
        tail: Tail,
        records: Vec<KeyRecord>,
        current: impl Fn(&str) -> Option<&'c KeyRecord>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        if let Some(r) = records.iter().find(|r| unrevokes(current(&r.id), r)) {
            return Err(StoreError::Unrevoke { id: r.id.clone() });
        }
        // Refused before anything is written, the ledger included.
        let last = last_revision(tail.rev, records.len())?;
        let newly_revoked: Vec<&KeyRecord> = records
            .iter()
            .filter(|r| {
                r.revoked_at.is_some() && current(&r.id).is_none_or(|c| c.revoked_at.is_none())
            })
            .collect();
        self.ledger
            .add_revoked(&self.signer, &newly_revoked)
            .map_err(|e| self.io(e))?;
        self.write_locked(tail, records, last)
    }

    /// The latest version of key `id` in the first `complete` bytes of the locked log, found
    /// by [`key_lines`] and parsed and verified like any line. Records order against records,
    /// as in a parse of the whole file; all of a key's versions are among the lines found, so
    /// their order is checked whole.
    fn key_version(
        &self,
        file: &mut File,
        complete: u64,
        log: LogId,
        id: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        file.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
        let lines = key_lines(
            io::BufReader::with_capacity(1 << 20, file.take(complete)),
            id.as_bytes(),
        )
        .map_err(|e| self.io(e))?;
        let mut current: Option<KeyRecord> = None;
        for (number, line) in lines {
            let after = current.as_ref().map_or(0, |r| r.rev);
            let parsed = self.parse(&line, number, after, log);
            for c in &parsed.corrupt {
                tracing::warn!(path = %self.path.display(), line = c.line, reason = %c.reason, "store line skipped");
            }
            if let Some(r) = parsed.records.into_iter().rfind(|r| r.id == id) {
                current = Some(r);
            }
        }
        Ok(current)
    }

    /// The locked log with its id and the revision of its last line that verifies, when the
    /// ledger vouches for them: the precondition of the paths that read only the header and the tail
    /// (`append`, `transact_key`). `None` (the lock released) for a fresh, legacy, restored
    /// or ledger-less log, which the careful path (`transact`, the whole log) sorts out.
    fn vouched_tail(&self) -> Result<Option<Tail>, StoreError> {
        let mut file = self.lock()?;
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        let log = read_header(&mut file).map_err(|e| self.io(e))?;
        let hwm = self.ledger.hwm(&self.signer).map_err(|e| self.io(e))?;
        let (complete, rev) =
            tail_revision(&mut file, len, log, &self.signer).map_err(|e| self.io(e))?;
        let vouched = !log.is_none() && hwm.is_some_and(|h| h.log == log && h.rev <= rev);
        Ok(vouched.then_some(Tail {
            file,
            len,
            complete,
            log,
            rev,
        }))
    }

    /// Append records without reading the whole log (creation, import): only the header and
    /// the tail are read, to learn the log and the last revision. New keys only: a record
    /// for a key already in the log goes through [`LogFile::transact`].
    pub fn append(&self, records: Vec<KeyRecord>) -> Result<Vec<KeyRecord>, StoreError> {
        let Some(tail) = self.vouched_tail()? else {
            return self.transact(|_| Ok::<_, StoreError>(records))?;
        };
        // New keys: nothing to un-revoke, every revoked one newly revoked.
        self.write_changes(tail, records, |_| None)
    }

    /// Write `records` after the last whole line of the locked log `t` (signed, numbered
    /// from its revision on up to `last`, checked by [`last_revision`]), fsync, and move the
    /// high-water mark.
    fn write_locked(
        &self,
        mut t: Tail,
        mut records: Vec<KeyRecord>,
        last: u64,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        if records.is_empty() {
            return Ok(records);
        }
        // A partial last line is a write whose writer died before finishing it: nobody was
        // told it succeeded, so dropping it loses nothing and keeps the next line parseable.
        if t.complete < t.len {
            t.file.set_len(t.complete).map_err(|e| self.io(e))?;
        }
        // Room for a typical signed line (~450 bytes): a buffer that has to grow copies
        // megabytes on a bulk write.
        let mut out = Vec::with_capacity(records.len() * 512);
        // `last` bounds the range: t.rev + 1 ..= last holds one revision per record.
        for (r, next) in records.iter_mut().zip(t.rev.saturating_add(1)..=last) {
            r.rev = next;
            self.signer
                .sign_into(t.log, r, &mut out)
                .map_err(|e| self.io(e.into()))?;
            out.push(b'\n');
        }
        t.rev = last;
        t.file
            .seek(SeekFrom::Start(t.complete))
            .map_err(|e| self.io(e))?;
        t.file.write_all(&out).map_err(|e| self.io(e))?;
        t.file.sync_data().map_err(|e| self.io(e))?;
        self.ledger
            .set_hwm(
                &self.signer,
                Hwm {
                    log: t.log,
                    rev: t.rev,
                },
            )
            .map_err(|e| self.io(e))?;
        Ok(records)
    }

    /// Rewrite the log with only the latest version of each id. Revoked keys whose
    /// revocation is older than `retain_revoked_until` (a Unix time) are kept as tombstones
    /// (id, digest, owner, env, times; names, scopes, labels and networks dropped), never
    /// dropped: a key revoked once must stay revoked even against an old backup. Atomic:
    /// temp file, fsync, rename, fsync the directory.
    pub fn compact(&self, now: i64, retain_revoked_until: i64) -> Result<Compacted, StoreError> {
        let mut locked = None;
        for _ in 0..3 {
            locked = self.lock_and_read(None)?;
            if locked.is_some() {
                break;
            }
        }
        let Some((file, _, parsed)) = locked else {
            return Err(StoreError::Unstable {
                path: self.path.clone(),
            });
        };
        let total = parsed.records.len();
        let (log, rev) = (parsed.log, parsed.rev);
        let mut tombstoned = 0;
        let mut keep: Vec<KeyRecord> = latest(parsed.records).into_values().collect();
        for r in &mut keep {
            if r.revoked_at.is_some_and(|t| t < retain_revoked_until) && !is_tombstone(r) {
                *r = tombstone(r);
                self.signer.sign(log, r);
                tombstoned += 1;
            }
        }
        // Records MAC'd under an older secret version (they verified above) are signed again
        // under the newest: after a compaction no kept record needs an old secret, so a version
        // that no live key uses any more can be retired (`keygate secret status`) without its
        // records (revoked keys, say) turning into unverifiable lines.
        for r in &mut keep {
            if r.mac
                .is_some_and(|t| Some(t.version) != self.signer.version())
            {
                self.signer.sign(log, r);
            }
        }
        keep.sort_by_key(|r| r.rev);
        let out = self.encode_file(log, &keep, rev, now)?;
        // The checkpoint first: a gateway that sees the new log finds the checkpoint for it.
        self.write_checkpoint(log, rev, &keep, &out);
        write_atomic(&self.path, &out).map_err(|e| self.io(e))?;
        // The old inode's lock is released on drop; waiting writers see the new inode and retry.
        drop(file);
        Ok(Compacted {
            kept: keep.len(),
            dropped: total - keep.len(),
            tombstoned,
        })
    }
}

impl LogFile {
    /// Write the binary checkpoint of the table `records` make, standing for `log_bytes`
    /// (`store::checkpoint`). Best effort: the log is the record, so a checkpoint that cannot be
    /// written is removed (an old one would no longer match anyway) and the gateway reads the
    /// log whole.
    fn write_checkpoint(&self, log: LogId, rev: u64, records: &[KeyRecord], log_bytes: &[u8]) {
        let path = crate::store::checkpoint::path_for(&self.path);
        let table = crate::keys::table::KeyTable::from_records(records.iter().cloned(), log, rev);
        let written = crate::store::checkpoint::encode(&table, log_bytes, &self.signer)
            .and_then(|bytes| write_atomic(&path, &bytes));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not write the key table checkpoint; gateways will read the log whole");
            let _ = fs::remove_file(&path);
        }
    }
}

/// What a revoked key keeps after the retention: enough to recognise it (id, digest) and to
/// explain it (owner, env, times, reason), nothing it granted.
fn tombstone(r: &KeyRecord) -> KeyRecord {
    KeyRecord {
        name: String::new(),
        scopes: vec![],
        plan: None,
        rate: None,
        allow_ips: vec![],
        allow_origins: vec![],
        labels: Default::default(),
        mac: None,
        ..r.clone()
    }
}

fn is_tombstone(r: &KeyRecord) -> bool {
    r.name.is_empty() && r.scopes.is_empty() && r.labels.is_empty()
}

/// The log id named by the file's first line, `NONE` if it has no header.
fn read_header(file: &mut File) -> io::Result<LogId> {
    let mut head = [0u8; 256];
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let line = head[..n].split(|&b| b == b'\n').next().unwrap_or(&[]);
    Ok(match parse_line(line) {
        Ok(Line::Header(log)) if n > line.len() => log,
        _ => LogId::NONE,
    })
}

/// The lines (number from 1, bytes) of a log that may hold a version of key `id`: every line
/// containing `id`'s bytes, and every line with a backslash. A JSON string equal to `id` is
/// either its bytes or has an escape in it, so no version of the key is missed however the
/// line was written (a re-encoded line still verifies: the MAC covers the record, not the
/// bytes); the caller parses each line found and keeps the records whose id is `id`. Read in
/// bounded chunks: memory is the chunk and the lines found, not the log.
pub fn key_lines(mut input: impl BufRead, id: &[u8]) -> io::Result<Vec<(u64, Vec<u8>)>> {
    const CHUNK: usize = 4 << 20;
    let finder = memchr::memmem::Finder::new(id);
    let mut found = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK + 4096);
    let mut first = 1u64;
    loop {
        chunk.clear();
        while chunk.len() < CHUNK {
            if input.read_until(b'\n', &mut chunk)? == 0 {
                break;
            }
        }
        let complete = complete_prefix(&chunk);
        if complete.is_empty() {
            return Ok(found);
        }
        // Starts of candidate lines, in order, each once.
        let mut starts: Vec<usize> = finder
            .find_iter(complete)
            .chain(memchr::memchr_iter(b'\\', complete))
            .map(|at| memchr::memrchr(b'\n', &complete[..at]).map_or(0, |nl| nl + 1))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let (mut line, mut counted) = (first, 0);
        for start in starts {
            line += memchr::memchr_iter(b'\n', &complete[counted..start]).count() as u64;
            counted = start;
            let end =
                memchr::memchr(b'\n', &complete[start..]).map_or(complete.len(), |i| start + i);
            found.push((line, complete[start..end].to_vec()));
        }
        first += memchr::memchr_iter(b'\n', complete).count() as u64;
    }
}

/// Records as JSON lines, in the order given (revisions as they are).
pub fn encode(records: &[KeyRecord]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(records.len() * 400);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// `path` with `suffix` appended to its file name (`keys.jsonl` → `keys.jsonl.hwm`): the
/// files keygate keeps beside another one.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Take an exclusive lock on `<path>.lock` (created if missing), held until the returned
/// file drops: writers that read-modify-replace `path` whole (usage and forensics flushes
/// from several nodes) wait for each other instead of overwriting each other.
pub fn lock_beside(path: &Path) -> io::Result<File> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sibling(path, ".lock"))?;
    lock.lock()?;
    Ok(lock)
}

/// Like `lock_beside`, but without waiting: `None` when another process holds the lock (a
/// file only one process may own, such as the webhook queue).
pub fn lock_beside_nowait(path: &Path) -> io::Result<Option<File>> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(sibling(path, ".lock"))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some(lock)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Replace `path` with `bytes` atomically: a temp file in the same directory, fsync, rename,
/// fsync the directory. A crash leaves the old file or the new one, never a mix; the temp file
/// is removed on failure. Used for every file keygate rewrites whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    stage_with(path, |t| t.write_all(bytes))?.commit()
}

/// `value` as JSON, replacing `path` as `write_atomic` does. Written to the file as it is
/// serialised: a file of megabytes (10,000 keys' sketches) built in a `Vec` first grew it by
/// doubling, and those copies were most of the memory a flush touched.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    stage_json(path, value)?.commit()
}

/// The first half of `write_json_atomic`: the replacement written and synced beside `path`,
/// not yet in its place. For a caller that must record which file will land (`Staged::ino`)
/// before it does (`usage::merge_report_locked`).
pub fn stage_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<Staged> {
    stage_with(path, |t| {
        let mut out = io::BufWriter::with_capacity(64 * 1024, t);
        serde_json::to_writer(&mut out, value)?;
        out.flush()
    })
}

/// A whole replacement of `path`, its contents written by `fill` and synced to a temp file in
/// the same directory; `commit` renames it into place. Dropped without a commit, the temp file
/// is removed.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    ino: u64,
    committed: bool,
}

/// Write `fill`'s contents beside `path` and sync them (`Staged`).
fn stage_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<Staged> {
    let mut tmp_name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let mut staged = Staged {
        tmp: path.with_file_name(tmp_name),
        path: path.to_owned(),
        ino: 0,
        committed: false,
    };
    let mut t = File::create(&staged.tmp)?;
    keep_mode_and_owner(path, &t)?;
    fill(&mut t)?;
    t.sync_all()?;
    staged.ino = t.metadata()?.ino();
    Ok(staged)
}

impl Staged {
    /// The inode the file at `path` has once this lands, and only then (the old file and this
    /// one exist side by side until the rename, so they cannot share one).
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Rename into place, then sync the directory: a crash leaves the old file or the new one,
    /// never a mix.
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Give the replacement `tmp` the mode (and, where permitted, the owner) of the file it
/// replaces, before any byte is written: a 0600 store must not become 0644 on compaction.
/// Ownership can only be kept by a privileged writer; anyone else keeps their own (EPERM).
fn keep_mode_and_owner(path: &Path, tmp: &File) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return Ok(()); // first write: the umask decides, as for any new file
    };
    tmp.set_permissions(meta.permissions())?;
    match std::os::unix::fs::fchown(tmp, Some(meta.uid()), Some(meta.gid())) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// The prefix of `buf` that ends with a newline (complete lines only).
pub fn complete_prefix(buf: &[u8]) -> &[u8] {
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => &buf[..=i],
        None => &[],
    }
}

/// Scan backwards from the end for the last line that verifies: in a signed log `log`, a record
/// or compaction meta line whose MAC checks under `signer` (in a legacy unsigned file, any
/// that parses); returns (end of complete lines, its revision). A line that does not verify
/// is passed over like one that does not parse, as every reader passes over it: whoever can
/// write the file but lacks the secret must not choose the revision writers continue from (a
/// forged meta line at `u64::MAX` wrapped the next revision to 0, and readers then dropped
/// every later write as not following). Reads in 64 KiB chunks so an append costs O(tail),
/// not O(file).
fn tail_revision(file: &mut File, len: u64, log: LogId, signer: &Signer) -> io::Result<(u64, u64)> {
    let signed = (!log.is_none()).then_some(signer);
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut complete: Option<u64> = None;
    let mut carry: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&carry);
        let base = start;
        // Lines fully inside `chunk` (after its first newline, unless at file start).
        let mut lines_end = chunk.len();
        if complete.is_none() {
            match chunk.iter().rposition(|&b| b == b'\n') {
                Some(i) => {
                    complete = Some(base + i as u64 + 1);
                    lines_end = i;
                }
                None if start == 0 => return Ok((0, 0)),
                None => {
                    carry = chunk;
                    end = start;
                    continue;
                }
            }
        }
        let mut upto = lines_end;
        loop {
            let line_start = match chunk[..upto].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if start == 0 => 0,
                None => break,
            };
            match parse_line(&chunk[line_start..upto]) {
                Ok(Line::Record(r)) if signed.is_none_or(|s| s.verify(log, &r).is_ok()) => {
                    return Ok((complete.unwrap_or(0), r.rev))
                }
                Ok(Line::Meta(m)) if signed.is_none_or(|s| m.verify(s, log)) => {
                    return Ok((complete.unwrap_or(0), m.rev))
                }
                // Only the first line names the log (as for readers).
                Ok(Line::Header(_)) if start == 0 && line_start == 0 => {
                    return Ok((complete.unwrap_or(0), 0))
                }
                _ => {}
            }
            if line_start == 0 {
                return Ok((complete.unwrap_or(0), 0));
            }
            upto = line_start - 1;
        }
        carry = chunk[..upto].to_vec();
        end = start;
    }
    Ok((complete.unwrap_or(0), 0))
}

/// What a follower found since its last poll.
#[derive(Debug)]
pub enum Update {
    Unchanged,
    /// New complete lines at the end of the same file.
    Appended(Parsed),
    /// The file was replaced (compaction, restore) or read for the first time: a whole table.
    Replaced(Parsed),
}

/// Follows the log by byte offset; detects replacement by inode or shrink. Within one log it
/// never moves backwards (an older file of the same log is refused as a rollback); a file of
/// another log is handed over whole (`Update::Replaced` with its `log`), and the caller's apply
/// keeps every revocation it had seen. Once a signed log was seen, an unsigned file is refused.
#[derive(Debug)]
pub struct Follower {
    file: LogFile,
    at: At,
    /// The file version we refused (a rollback here, a shrink by the caller), so we report it
    /// once, not on every poll.
    refused: Option<Fingerprint>,
    /// The last file read whole and where the follower stood before it, so a caller that
    /// refuses that table (`refuse_last_whole`) leaves the follower where it was.
    last_whole: Option<(Fingerprint, At)>,
}

/// Where a follower stands in the file it follows.
#[derive(Debug, Clone)]
struct At {
    ino: Option<(u64, u64)>,
    offset: u64,
    next_line: u64,
    rev: u64,
    log: LogId,
    /// The last bytes consumed (up to `TAIL`): if they changed, the file was rewritten in
    /// place (e.g. a backup copied over it) and our offset means nothing any more.
    tail: Vec<u8>,
}

/// One version of the file: device, inode, length.
type Fingerprint = (u64, u64, u64);

const TAIL: usize = 64;

impl Follower {
    pub fn new(file: LogFile) -> Follower {
        Follower {
            file,
            at: At {
                ino: None,
                offset: 0,
                next_line: 1,
                rev: 0,
                log: LogId::NONE,
                tail: Vec::new(),
            },
            refused: None,
            last_whole: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The revision of everything applied so far.
    pub fn revision(&self) -> u64 {
        self.at.rev
    }

    /// The log being followed (`NONE` before the first read or for a legacy file).
    pub fn log(&self) -> LogId {
        self.at.log
    }

    /// Start from the checkpoint beside the log (`store::checkpoint`) instead of reading the
    /// log whole: the checkpoint's table plus the log lines after it, parsed and verified like
    /// any append. `Ok(None)`: no checkpoint, or one that stands for another log or other
    /// bytes than the log in place (a newer compaction, a restored backup); the first poll
    /// then reads the log whole. `Err`: a checkpoint that is unreadable or fails its seal.
    pub fn resume_from_checkpoint(
        &mut self,
    ) -> Result<Option<(crate::keys::table::KeyTable, Parsed)>, String> {
        use crate::store::checkpoint;
        let bytes = match fs::read(checkpoint::path_for(self.file.path())) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let loaded = checkpoint::decode(&bytes, self.file.signer())?;
        drop(bytes);
        let seal = loaded.seal;
        let Ok(mut f) = File::open(self.file.path()) else {
            return Ok(None);
        };
        let meta = f.metadata().map_err(|e| e.to_string())?;
        let fp = &loaded.fingerprint;
        if meta.len() < seal.log_bytes
            || (fp.len() as u64) > seal.log_bytes
            || read_header(&mut f).ok() != Some(seal.log)
        {
            tracing::info!(log = %seal.log, "key table checkpoint is for another log; reading the log");
            return Ok(None);
        }
        let start = seal.log_bytes - fp.len() as u64;
        let mut buf = Vec::with_capacity((meta.len() - start) as usize);
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| e.to_string())?;
        if !buf.starts_with(fp) {
            tracing::info!(log = %seal.log, "key table checkpoint does not match the log in place; reading the log");
            return Ok(None);
        }
        let complete = complete_prefix(&buf[fp.len()..]);
        let parsed = self
            .file
            .parse(complete, seal.log_lines + 1, seal.rev, seal.log);
        let end = fp.len() + complete.len();
        self.at.ino = Some((meta.dev(), meta.ino()));
        self.at.offset = seal.log_bytes + complete.len() as u64;
        self.at.next_line =
            seal.log_lines + 1 + complete.iter().filter(|&&b| b == b'\n').count() as u64;
        self.at.rev = parsed.rev.max(seal.rev);
        self.at.log = seal.log;
        self.at.tail = buf[end.saturating_sub(TAIL)..end].to_vec();
        Ok(Some((loaded.table, parsed)))
    }

    pub fn poll(&mut self) -> Result<Update, StoreError> {
        let path = self.file.path().to_owned();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut f = File::open(&path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        let id = (meta.dev(), meta.ino());
        let fingerprint = (meta.dev(), meta.ino(), meta.len());
        if self.refused == Some(fingerprint) {
            return Ok(Update::Unchanged);
        }
        if self.at.ino == Some(id) && meta.len() >= self.at.offset {
            if meta.len() == self.at.offset {
                return Ok(Update::Unchanged);
            }
            let back = self.at.tail.len() as u64;
            f.seek(SeekFrom::Start(self.at.offset - back)).map_err(io)?;
            let mut buf = Vec::with_capacity((meta.len() - self.at.offset + back) as usize);
            f.read_to_end(&mut buf).map_err(io)?;
            if buf.starts_with(&self.at.tail) {
                let complete = complete_prefix(&buf[self.at.tail.len()..]);
                if complete.is_empty() {
                    return Ok(Update::Unchanged);
                }
                let parsed = self
                    .file
                    .parse(complete, self.at.next_line, self.at.rev, self.at.log);
                self.at.offset += complete.len() as u64;
                self.at.next_line += complete.iter().filter(|&&b| b == b'\n').count() as u64;
                self.at.rev = parsed.rev;
                let end = self.at.tail.len() + complete.len();
                self.at.tail = buf[end.saturating_sub(TAIL)..end].to_vec();
                return Ok(Update::Appended(parsed));
            }
            // Rewritten in place: fall through and judge it whole.
            f.seek(SeekFrom::Start(0)).map_err(io)?;
        }
        // First read, replaced, or shrunk: read it whole and judge it as a new table.
        let mut buf = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut buf).map_err(io)?;
        let complete = complete_prefix(&buf);
        let parsed = self.file.parse(complete, 1, 0, LogId::NONE);
        if parsed.log.is_none() && !self.at.log.is_none() {
            self.refused = Some(fingerprint);
            return Err(StoreError::Downgrade {
                path,
                log: self.at.log,
            });
        }
        if parsed.log == self.at.log && parsed.rev < self.at.rev {
            self.refused = Some(fingerprint);
            return Err(StoreError::Rollback {
                path,
                file_rev: parsed.rev,
                applied_rev: self.at.rev,
            });
        }
        self.refused = None;
        self.last_whole = Some((fingerprint, self.at.clone()));
        self.at.log = parsed.log;
        self.at.ino = Some(id);
        self.at.offset = complete.len() as u64;
        self.at.tail = complete[complete.len().saturating_sub(TAIL)..].to_vec();
        self.at.next_line = 1 + complete.iter().filter(|&&b| b == b'\n').count() as u64;
        self.at.rev = parsed.rev;
        Ok(Update::Replaced(parsed))
    }

    /// The caller refused the table of the last `Update::Replaced` (`sync::apply::shrink`):
    /// stand where the follower stood before it, so nothing of that file is applied as an
    /// append and an older file of the log the caller holds is still judged against it, and
    /// leave that version of the file alone until it changes or `judge_again`.
    pub fn refuse_last_whole(&mut self) {
        if let Some((fingerprint, before)) = self.last_whole.take() {
            self.at = before;
            self.refused = Some(fingerprint);
        }
    }

    /// Read a refused file whole again at the next poll (the rule that refused it changed).
    pub fn judge_again(&mut self) {
        self.refused = None;
    }
}

#[cfg(test)]
pub(crate) fn test_signer() -> Signer {
    Signer::new(&crate::keys::digest::Hasher::new(vec![(1, vec![7; 32])]))
}

/// What `LogFile::vouched_tail` hands over: the locked file, its length, the end of its last
/// whole line, its log id and that line's revision.
struct Tail {
    file: File,
    len: u64,
    complete: u64,
    log: LogId,
    rev: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    fn rec(id: &str, n: u8) -> KeyRecord {
        sample(id, Digest([n; 32]))
    }

    fn log_at(path: impl Into<PathBuf>) -> LogFile {
        LogFile::new(path, test_signer())
    }

    fn revoke(log: &LogFile, id: &str) {
        log.transact(|s| {
            let mut r = s.keys[id].clone();
            r.revoked_at = Some(5);
            Ok::<_, ()>(vec![r])
        })
        .unwrap()
        .unwrap();
    }

    #[test]
    fn append_assigns_increasing_signed_revisions_and_load_verifies_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path().join("keys.jsonl"));
        let w = log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        assert_eq!(w.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![1, 2]);
        let w = log.append(vec![rec("key_c", 3)]).unwrap();
        assert_eq!(w[0].rev, 3);
        let loaded = log.load().unwrap();
        assert_eq!(loaded.rev, 3);
        assert_eq!(loaded.records.len(), 3);
        assert!(loaded.corrupt.is_empty(), "{:?}", loaded.corrupt);
        assert!(!loaded.log.is_none());
        assert!(loaded.records.iter().all(|r| r.mac.is_some()));
        // Another secret verifies nothing.
        let other = LogFile::new(
            log.path(),
            Signer::new(&crate::keys::digest::Hasher::new(vec![(1, vec![8; 32])])),
        );
        assert_eq!(other.load().unwrap().records.len(), 0);
    }

    #[test]
    fn forged_edited_and_foreign_lines_are_skipped_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        revoke(&log, "key_a");
        // Edit: drop the revocation but keep the MAC.
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace(",\"revoked_at\":5", "")).unwrap();
        // Forge: a record with no MAC, and one signed for another log.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut unsigned = rec("key_x", 9);
        unsigned.rev = 10;
        writeln!(f, "{}", serde_json::to_string(&unsigned).unwrap()).unwrap();
        let mut foreign = rec("key_y", 9);
        foreign.rev = 11;
        test_signer().sign(LogId(42), &mut foreign);
        writeln!(f, "{}", serde_json::to_string(&foreign).unwrap()).unwrap();
        let loaded = log.load().unwrap();
        let ids: Vec<_> = loaded.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["key_a", "key_b"], "only the original versions verify");
        assert_eq!(loaded.corrupt.len(), 3, "{:?}", loaded.corrupt);
    }

    #[test]
    fn writer_drops_partial_tail_and_skips_corrupt_lines_for_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1)]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"this is not json\n{\"rev\":9,\"id\":\"trunc")
            .unwrap();
        drop(f);
        let w = log.append(vec![rec("key_b", 2)]).unwrap();
        assert_eq!(w[0].rev, 2, "revision follows the last valid line");
        let loaded = log.load().unwrap();
        assert_eq!(loaded.records.len(), 2);
        assert_eq!(loaded.corrupt.len(), 1);
        assert_eq!(loaded.corrupt[0].line, 3, "line 1 is the header");
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("trunc"), "partial tail removed");
    }

    #[test]
    fn compaction_signs_old_secret_versions_again_so_the_old_secret_can_retire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        log_at(&path).append(vec![rec("key_a", 1)]).unwrap();
        revoke(&log_at(&path), "key_a");
        let both = Signer::new(&crate::keys::digest::Hasher::new(vec![
            (1, vec![7; 32]),
            (2, vec![8; 32]),
        ]));
        let v2_only = Signer::new(&crate::keys::digest::Hasher::new(vec![(2, vec![8; 32])]));
        assert_eq!(
            LogFile::new(&path, v2_only.clone())
                .load()
                .unwrap()
                .records
                .len(),
            0
        );
        LogFile::new(&path, both).compact(10, 0).unwrap();
        let loaded = LogFile::new(&path, v2_only).load().unwrap();
        assert!(loaded.corrupt.is_empty(), "{:?}", loaded.corrupt);
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.records[0].mac.map(|t| t.version), Some(2));
        assert!(loaded.records[0].revoked_at.is_some(), "still revoked");
    }

    #[test]
    fn tail_revision_spans_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path().join("k.jsonl"));
        let mut big = rec("key_big", 1);
        big.name = "n".repeat(200_000);
        log.append(vec![big]).unwrap();
        assert_eq!(log.append(vec![rec("key_x", 2)]).unwrap()[0].rev, 2);
    }

    #[test]
    fn transact_sees_latest_state_and_refuses_to_unrevoke() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path().join("k.jsonl"));
        log.append(vec![rec("key_a", 1)]).unwrap();
        revoke(&log, "key_a");
        let state = latest(log.load().unwrap().records);
        assert_eq!(state["key_a"].revoked_at, Some(5));
        let again = log.transact(|s| {
            let mut r = s.keys["key_a"].clone();
            r.revoked_at = None;
            Ok::<_, ()>(vec![r])
        });
        assert!(
            matches!(again, Err(StoreError::Unrevoke { .. })),
            "{again:?}"
        );
    }

    #[test]
    fn legacy_unsigned_store_is_signed_on_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let mut legacy = Vec::new();
        for (i, id) in ["key_a", "key_b"].iter().enumerate() {
            let mut r = rec(id, i as u8);
            r.rev = i as u64 + 1;
            legacy.extend(serde_json::to_vec(&r).unwrap());
            legacy.push(b'\n');
        }
        fs::write(&path, &legacy).unwrap();
        let log = log_at(&path);
        assert!(log.load().unwrap().log.is_none(), "legacy: no log id");
        assert_eq!(
            log.load().unwrap().records.len(),
            2,
            "legacy records are read"
        );
        let w = log.append(vec![rec("key_c", 3)]).unwrap();
        let loaded = log.load().unwrap();
        assert!(!loaded.log.is_none());
        assert_eq!(loaded.records.len(), 3);
        assert!(loaded.corrupt.is_empty());
        assert!(w[0].rev > 2);
    }

    #[test]
    fn restored_backup_continues_as_a_new_log_with_every_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        let before = log.load().unwrap();
        let backup = fs::read(&path).unwrap();
        revoke(&log, "key_a");
        log.append(vec![rec("key_c", 3)]).unwrap();
        // Restore (in place), then write again.
        fs::write(&path, &backup).unwrap();
        let w = log.append(vec![rec("key_d", 4)]).unwrap();
        let after = log.load().unwrap();
        assert_ne!(after.log, before.log, "a restore starts a new log");
        assert!(
            w[0].rev > 4,
            "revisions continue after the highest issued: {}",
            w[0].rev
        );
        let keys = latest(after.records);
        assert!(keys["key_a"].revoked_at.is_some(), "revocation re-applied");
        assert!(keys.contains_key("key_d"));
        assert!(after.corrupt.is_empty(), "{:?}", after.corrupt);
    }

    #[test]
    fn compaction_keeps_latest_and_revision_and_keeps_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path().join("k.jsonl"));
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        log.transact(|s| {
            let mut b = s.keys["key_b"].clone();
            b.revoked_at = Some(10);
            let mut a = s.keys["key_a"].clone();
            a.name = "renamed".into();
            Ok::<_, ()>(vec![a, b])
        })
        .unwrap()
        .unwrap();
        let c = log.compact(100, 50).unwrap();
        assert_eq!(
            c,
            Compacted {
                kept: 2,
                dropped: 2,
                tombstoned: 1
            }
        );
        let loaded = log.load().unwrap();
        assert!(loaded.corrupt.is_empty(), "{:?}", loaded.corrupt);
        assert_eq!(loaded.rev, 4, "meta line keeps the revision");
        let keys = latest(loaded.records);
        assert_eq!(keys["key_a"].name, "renamed");
        let b = &keys["key_b"];
        assert!(b.revoked_at.is_some() && b.scopes.is_empty() && b.name.is_empty());
        assert_eq!(b.digest, Digest([2; 32]), "a tombstone keeps the digest");
        assert_eq!(log.append(vec![rec("key_c", 3)]).unwrap()[0].rev, 5);
    }

    /// What `transact_key` hands its builder must be what a parse of the whole log says the
    /// key is, on a compacted log with writes after the compaction and a line of the key
    /// re-encoded with escapes (it still verifies: the MAC covers the record, not the bytes).
    #[test]
    fn transact_key_sees_the_keys_latest_version_and_keeps_revocation_final() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1), rec("key_ab", 2), rec("key_b", 3)])
            .unwrap();
        log.compact(100, 0).unwrap();
        // After the compaction: key_ab renamed, key_a's id only inside another key's label.
        log.transact_key("key_ab", |cur| {
            let mut r = cur.unwrap().clone();
            r.name = "renamed".into();
            Ok::<_, ()>(vec![r])
        })
        .unwrap()
        .unwrap();
        let mut b = rec("key_c", 4);
        b.labels.insert("id".into(), "key_a".into());
        log.append(vec![b]).unwrap();
        let seen = |id: &str| {
            let mut got = None;
            log.transact_key(id, |cur| {
                got = cur.cloned();
                Ok::<_, ()>(vec![])
            })
            .unwrap()
            .unwrap();
            got
        };
        let whole = latest(log.load().unwrap().records);
        for id in ["key_a", "key_ab", "key_b", "key_c"] {
            assert_eq!(seen(id).as_ref(), whole.get(id), "{id}");
        }
        assert_eq!(seen("key_ab").unwrap().name, "renamed");
        assert_eq!(seen("key_zz"), None);

        // Revoke key_b through the one-key path; it is final for both paths.
        let revoked = log
            .transact_key("key_b", |cur| {
                let mut r = cur.unwrap().clone();
                r.revoked_at = Some(7);
                Ok::<_, ()>(vec![r])
            })
            .unwrap()
            .unwrap();
        assert_eq!(revoked[0].id, "key_b");
        assert!(seen("key_b").unwrap().revoked_at.is_some());
        assert!(latest(log.load().unwrap().records)["key_b"]
            .revoked_at
            .is_some());
        let unrevoke = log.transact_key("key_b", |cur| {
            let mut r = cur.unwrap().clone();
            r.revoked_at = None;
            Ok::<_, ()>(vec![r])
        });
        assert!(matches!(unrevoke, Err(StoreError::Unrevoke { .. })));
        // Another key written alongside (a rotation's successor) is checked against its own
        // versions: key_b cannot be un-revoked through a change to key_a either.
        let mut b = seen("key_b").unwrap();
        b.revoked_at = None;
        let other = log.transact_key("key_a", |_| Ok::<_, ()>(vec![b]));
        assert!(matches!(other, Err(StoreError::Unrevoke { .. })));

        // key_b's revocation line with its id escaped: still key_b, still revoked.
        let text = fs::read_to_string(&path).unwrap();
        let line = text.lines().find(|l| l.contains("\"revoked_at\"")).unwrap();
        let escaped = line.replace("\"id\":\"key_b\"", "\"id\":\"key\\u005fb\"");
        assert_ne!(escaped, line);
        fs::write(&path, text.replace(line, &escaped)).unwrap();
        assert!(log.load().unwrap().corrupt.is_empty());
        assert!(seen("key_b").unwrap().revoked_at.is_some());
    }

    #[test]
    fn key_lines_finds_every_line_naming_the_id_or_escaped() {
        let log = b"{\"header\":1}\n{\"id\":\"key_a\"}\n{\"id\":\"key_b\"}\n{\"id\":\"k\\u0065y_a\"}\n{\"id\":\"key_a\",\"x\":\"key_a\"}\n";
        let found = key_lines(&log[..], b"key_a").unwrap();
        let numbers: Vec<u64> = found.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [2, 4, 5]);
        assert_eq!(found[0].1, b"{\"id\":\"key_a\"}");
        // Lines across chunk boundaries are numbered the same (small reader buffer).
        let reader = io::BufReader::with_capacity(3, &log[..]);
        assert_eq!(key_lines(reader, b"key_a").unwrap(), found);
    }

    #[test]
    fn follower_detects_an_in_place_rewrite_behind_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        let mut fol = Follower::new(log.clone());
        fol.poll().unwrap();
        // Same inode, different bytes before our offset, and longer than before: another
        // store's (signed) file copied over ours.
        let other = log_at(dir.path().join("other.jsonl"));
        other
            .append(
                (1..=4)
                    .map(|n| rec(&format!("key_{n}zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"), n))
                    .collect(),
            )
            .unwrap();
        fs::write(&path, fs::read(other.path()).unwrap()).unwrap();
        match fol.poll().unwrap() {
            Update::Replaced(p) => {
                assert_eq!(p.records.len(), 4, "read whole, not from a stale offset");
                assert_eq!(p.log, other.load().unwrap().log);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refused_whole_file_leaves_the_follower_where_it_stood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        let older = fs::read(&path).unwrap();
        log.append(vec![rec("key_c", 3)]).unwrap();
        let mut fol = Follower::new(log.clone());
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(_)));
        let (held_log, held_rev) = (fol.log(), fol.revision());
        // Another store's file renamed in; the caller refuses its table.
        let other = log_at(dir.path().join("other.jsonl"));
        other.append(vec![rec("key_x", 9)]).unwrap();
        fs::rename(other.path(), &path).unwrap();
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.records.len() == 1));
        fol.refuse_last_whole();
        assert_eq!((fol.log(), fol.revision()), (held_log, held_rev));
        // That version is left alone...
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));
        // ...until asked to judge it again, and then it is read whole, not as an append.
        fol.judge_again();
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.records.len() == 1));
        fol.refuse_last_whole();
        // A line appended to the refused file: the file is judged whole again, never applied
        // as an append onto the table held.
        LogFile::new(&path, test_signer())
            .append(vec![rec("key_y", 8)])
            .unwrap();
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.records.len() == 2));
        fol.refuse_last_whole();
        // An older copy of the log held is still judged against what was applied of it.
        let tmp = dir.path().join("older.jsonl");
        fs::write(&tmp, &older).unwrap();
        fs::rename(&tmp, &path).unwrap();
        assert!(matches!(
            fol.poll(),
            Err(StoreError::Rollback {
                file_rev: 2,
                applied_rev: 3,
                ..
            })
        ));
    }

    #[test]
    fn follower_reads_appends_waits_for_partial_lines_and_detects_replacement_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = log_at(&path);
        log.append(vec![rec("key_a", 1)]).unwrap();
        let mut fol = Follower::new(log.clone());
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.records.len() == 1));
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));
        let backup = fs::read(&path).unwrap();

        // A partial line is not consumed until its newline arrives.
        let mut b = KeyRecord {
            rev: 2,
            ..rec("key_b", 2)
        };
        test_signer().sign(fol.log(), &mut b);
        let mut line = serde_json::to_vec(&b).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&line[..10]).unwrap();
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));
        line.push(b'\n');
        f.write_all(&line[10..]).unwrap();
        match fol.poll().unwrap() {
            Update::Appended(p) => assert_eq!(p.records[0].id, "key_b"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fol.revision(), 2);

        // A corrupt appended line is reported with its line number (header is line 1).
        f.write_all(b"{broken\n").unwrap();
        match fol.poll().unwrap() {
            Update::Appended(p) => assert_eq!(p.corrupt[0].line, 4),
            other => panic!("{other:?}"),
        }

        // Compaction replaces the inode: read whole.
        log.compact(0, 0).unwrap();
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.rev == 2));

        // Rollback: an older copy of the same log renamed into place is refused, once.
        let old = dir.path().join("old.jsonl");
        fs::write(&old, &backup).unwrap();
        fs::rename(&old, &path).unwrap();
        assert!(matches!(
            fol.poll(),
            Err(StoreError::Rollback {
                file_rev: 1,
                applied_rev: 2,
                ..
            })
        ));
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));

        // An unsigned file after a signed one is refused.
        let mut legacy = rec("key_z", 9);
        legacy.rev = 50;
        fs::write(
            &old,
            format!("{}\n", serde_json::to_string(&legacy).unwrap()),
        )
        .unwrap();
        fs::rename(&old, &path).unwrap();
        assert!(matches!(fol.poll(), Err(StoreError::Downgrade { .. })));

        // Truncation on a line boundary in place is a shrink: also refused.
        let dir2 = tempfile::tempdir().unwrap();
        let log = log_at(dir2.path().join("k.jsonl"));
        log.append(vec![rec("key_y", 8)]).unwrap();
        let mut fol = Follower::new(log.clone());
        log.append(vec![rec("key_z", 9)]).unwrap();
        fol.poll().unwrap();
        let text = fs::read(log.path()).unwrap();
        let cut = text[..text.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        OpenOptions::new()
            .write(true)
            .open(log.path())
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        assert!(matches!(fol.poll(), Err(StoreError::Rollback { .. })));
    }

    /// Append `line` and a newline to the log at `path`, as someone with write access to the
    /// file but not the hash secret could.
    fn append_line(path: &Path, line: &str) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        writeln!(f, "{line}").unwrap();
    }

    /// Revoke `id` the way the CLI does (`transact_key`, the fast path).
    fn revoke_key(log: &LogFile, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        log.transact_key(id, |cur| {
            let mut r = cur.expect("the key is in the log").clone();
            r.revoked_at = Some(5);
            Ok::<_, ()>(vec![r])
        })
        .map(|r| r.unwrap())
    }

    /// A line with a huge revision appended by someone without the secret (a meta line, which
    /// has no record MAC, or a record whose MAC does not verify) must not set the revision
    /// writers continue from: the next revocation is written right after the last line that
    /// verifies, and every reader applies it.
    #[test]
    fn writers_continue_from_the_last_verified_line_not_a_forged_tail() {
        let mut forged_record = rec("key_forged", 9);
        forged_record.rev = 1 << 40;
        let cases = [
            r#"{"meta":"compacted","rev":18446744073709551615,"at":0}"#.to_owned(),
            r#"{"meta":"compacted","rev":1099511627776,"at":0}"#.to_owned(),
            serde_json::to_string(&forged_record).unwrap(),
        ];
        for forged in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keys.jsonl");
            let log = log_at(&path);
            log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
            append_line(&path, &forged);
            let w = revoke_key(&log, "key_a").unwrap();
            assert_eq!(w[0].rev, 3, "{forged}");
            let w = log.append(vec![rec("key_c", 3)]).unwrap();
            assert_eq!(w[0].rev, 4, "{forged}");
            let loaded = log.load().unwrap();
            assert_eq!(loaded.rev, 4, "{forged}");
            assert_eq!(loaded.corrupt.len(), 1, "{forged}: {:?}", loaded.corrupt);
            let keys = latest(loaded.records);
            assert!(keys["key_a"].revoked_at.is_some(), "{forged}: revoked");
            assert!(keys.contains_key("key_c"), "{forged}");
            assert_eq!(log.head_revision().unwrap(), 4, "{forged}");
        }
    }

    /// Revisions are checked, never wrapped: a signed log already at the highest revision a
    /// key table holds (`keys::compact::MAX_REV`; only a holder of the secret could write such
    /// a line) refuses the next write, on every path, instead of issuing a revision readers
    /// would ignore or wrap to 0.
    #[test]
    fn a_revision_past_what_a_table_holds_is_refused_never_wrapped() {
        use crate::keys::compact::MAX_REV;
        for at in [MAX_REV, u64::MAX] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keys.jsonl");
            let log = log_at(&path);
            log.append(vec![rec("key_a", 1)]).unwrap();
            let id = log.load().unwrap().log;
            let meta = Meta {
                meta: "compacted".into(),
                rev: at,
                at: 0,
                mac: Some(Meta::tag(&test_signer(), id, at, 0)),
            };
            append_line(&path, &serde_json::to_string(&meta).unwrap());
            assert_eq!(log.load().unwrap().rev, at, "a signed meta line counts");
            let appended = log.append(vec![rec("key_b", 2)]);
            assert!(appended.is_err(), "{at}: {appended:?}");
            let revoked = revoke_key(&log, "key_a");
            assert!(revoked.is_err(), "{at}: {revoked:?}");
            let careful = log.transact(|_| Ok::<_, ()>(vec![rec("key_c", 3)]));
            assert!(careful.is_err(), "{at}: {careful:?}");
            let loaded = log.load().unwrap();
            assert_eq!(loaded.records.len(), 1, "{at}: nothing written");
            let (ledger, _) = Ledger::for_store(&path).revoked(&test_signer()).unwrap();
            assert!(
                ledger.is_empty(),
                "{at}: not even the revocation's ledger line"
            );
        }
        assert_eq!(last_revision(MAX_REV - 2, 2).unwrap(), MAX_REV);
        assert_eq!(
            last_revision(u64::MAX, 0).unwrap(),
            u64::MAX,
            "nothing to issue"
        );
        for (rev, count) in [
            (MAX_REV - 1, 2),
            (MAX_REV, 1),
            (u64::MAX, 1),
            (0, usize::MAX),
        ] {
            assert!(
                matches!(
                    last_revision(rev, count),
                    Err(StoreError::RevisionBound { .. })
                ),
                "{rev} + {count}"
            );
        }
    }

    #[test]
    fn create_if_missing_creates_an_empty_signed_log_only_in_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_at(dir.path().join("keys.jsonl"));
        let Missing::Created(id) = log.create_if_missing().unwrap() else {
            panic!("not created")
        };
        let loaded = log.load().unwrap();
        assert_eq!((loaded.log, loaded.rev, loaded.records.len()), (id, 0, 0));
        assert!(loaded.corrupt.is_empty());
        // A second call (a restart) writes nothing.
        let before = fs::read(log.path()).unwrap();
        assert_eq!(log.create_if_missing().unwrap(), Missing::Existed);
        assert_eq!(fs::read(log.path()).unwrap(), before);
        // Writers append to it as to any signed log.
        assert_eq!(log.append(vec![rec("key_a", 1)]).unwrap()[0].rev, 1);

        let nested = log_at(dir.path().join("not-mounted/keys.jsonl"));
        assert_eq!(
            nested.create_if_missing().unwrap(),
            Missing::NoDirectory(dir.path().join("not-mounted"))
        );
        assert!(!dir.path().join("not-mounted").exists());
    }
}
