//! The record log as one JSON-lines file.
//!
//! Why JSON lines: one record version per line is append-only friendly (a writer adds bytes,
//! never rewrites), diffable and greppable by operators, and a reader can follow it by byte
//! offset. The cost is parse time: ~2.3 µs per record line with serde_json, so a cold load of a
//! million keys takes ~3 s (see README "Performance"); appends are applied incrementally.
//!
//! Invariants:
//! - Writers hold an exclusive `flock` on the file while they append and fsync. After taking
//!   the lock they check the path still names the locked inode, because a compaction may have
//!   renamed a new file over it while they waited (else their append would land in an orphan).
//! - Revisions strictly increase in file order. A compacted file ends with a meta line that
//!   carries the revision it was compacted at, so dropping old tombstones never lowers it.
//! - A line without its trailing newline is a write that never finished (the writer died): a
//!   reader waits for it, the next writer truncates it away before appending.
//! - A corrupt complete line is reported with its line number and skipped; it never stops a
//!   reader and never blocks a writer (revocation must always be possible).

use crate::keys::record::KeyRecord;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
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
}

impl StoreError {
    /// A closed label for metrics (`keygate_source_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Io { .. } | StoreError::Unstable { .. } => "io",
            StoreError::Rollback { .. } => "rollback",
        }
    }
}

/// A complete line that did not parse, or whose revision went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    pub line: u64,
    pub reason: String,
}

/// The meta line closing a compacted file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    meta: String,
    rev: u64,
    at: i64,
}

enum Line {
    Record(Box<KeyRecord>),
    Meta(u64),
}

fn parse_line(line: &[u8]) -> Result<Line, String> {
    if line.starts_with(b"{\"meta\":") {
        return serde_json::from_slice::<Meta>(line)
            .map(|m| Line::Meta(m.rev))
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
}

/// Parse complete lines in `buf`, numbering from `first_line`, accepting only revisions above
/// `after`.
fn parse_lines(buf: &[u8], first_line: u64, after: u64) -> Parsed {
    let mut out = Parsed {
        rev: after,
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
        match parse_line(line) {
            Ok(Line::Meta(rev)) => {
                out.rev = out.rev.max(rev);
                out.compacted_at = Some(rev);
            }
            Ok(Line::Record(r)) if r.rev <= last => out.corrupt.push(Corrupt {
                line: number,
                reason: format!("revision {} does not follow {}", r.rev, last),
            }),
            Ok(Line::Record(r)) => {
                last = r.rev;
                out.rev = out.rev.max(r.rev);
                out.records.push(*r);
            }
            Err(reason) => out.corrupt.push(Corrupt {
                line: number,
                reason,
            }),
        }
    }
    out
}

/// Parse a whole log file's bytes exactly as [`LogFile::load`] does: complete lines only
/// (a partial last line is a write still in progress), revisions from 0. Public so the fuzz
/// harness (`fuzz/targets_common.rs`) can drive the line parser without a file.
pub fn parse_log(buf: &[u8]) -> Parsed {
    parse_lines(complete_prefix(buf), 1, 0)
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

/// The log file at a path. Cheap to construct; every operation opens the file.
#[derive(Debug, Clone)]
pub struct LogFile {
    path: PathBuf,
}

impl LogFile {
    pub fn new(path: impl Into<PathBuf>) -> LogFile {
        LogFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Read the whole log (no lock: appends are whole lines and replacement is a rename, so a
    /// reader always sees a consistent prefix). A missing file is an empty log.
    pub fn load(&self) -> Result<Parsed, StoreError> {
        match fs::read(&self.path) {
            Ok(buf) => Ok(parse_log(&buf)),
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

    /// Append records built from the current state, under the lock: `build` sees every key's
    /// latest version and returns the new versions to write (revisions are assigned here).
    /// Returns the written records.
    pub fn transact<E>(
        &self,
        build: impl FnOnce(&State) -> Result<Vec<KeyRecord>, E>,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError> {
        let mut file = self.lock()?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| self.io(e))?;
        let complete = complete_prefix(&buf).len();
        let parsed = parse_lines(&buf[..complete], 1, 0);
        let state = State {
            keys: latest(parsed.records),
            rev: parsed.rev,
            corrupt: parsed.corrupt,
        };
        let records = match build(&state) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        self.write_locked(
            &mut file,
            complete as u64,
            buf.len() as u64,
            state.rev,
            records,
        )
        .map(Ok)
    }

    /// Append records without reading the whole log (creation, import): only the tail is read,
    /// to learn the last revision.
    pub fn append(&self, records: Vec<KeyRecord>) -> Result<Vec<KeyRecord>, StoreError> {
        let mut file = self.lock()?;
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        let (complete, rev) = tail_revision(&mut file, len).map_err(|e| self.io(e))?;
        self.write_locked(&mut file, complete, len, rev, records)
    }

    fn write_locked(
        &self,
        file: &mut File,
        complete: u64,
        len: u64,
        mut rev: u64,
        mut records: Vec<KeyRecord>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        if records.is_empty() {
            return Ok(records);
        }
        // A partial last line is a write whose writer died before finishing it: nobody was
        // told it succeeded, so dropping it loses nothing and keeps the next line parseable.
        if complete < len {
            file.set_len(complete).map_err(|e| self.io(e))?;
        }
        let mut out = Vec::with_capacity(records.len() * 400);
        for r in &mut records {
            rev += 1;
            r.rev = rev;
            serde_json::to_writer(&mut out, r).map_err(|e| self.io(e.into()))?;
            out.push(b'\n');
        }
        file.seek(SeekFrom::Start(complete))
            .map_err(|e| self.io(e))?;
        file.write_all(&out).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))?;
        Ok(records)
    }

    /// Rewrite the log with only the latest version of each id, dropping revoked keys whose
    /// revocation is older than `retain_revoked_until` (a Unix time). Atomic: temp file, fsync,
    /// rename, fsync the directory. Returns (records kept, records dropped).
    pub fn compact(
        &self,
        now: i64,
        retain_revoked_until: i64,
    ) -> Result<(usize, usize), StoreError> {
        let mut file = self.lock()?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| self.io(e))?;
        let parsed = parse_lines(complete_prefix(&buf), 1, 0);
        let total = parsed.records.len();
        let mut keep: Vec<KeyRecord> = latest(parsed.records)
            .into_values()
            .filter(|r| r.revoked_at.is_none_or(|t| t >= retain_revoked_until))
            .collect();
        keep.sort_by_key(|r| r.rev);
        // The meta line goes last: appenders learn the next revision from the tail alone.
        let mut out = encode(&keep).map_err(|e| self.io(e))?;
        let meta = Meta {
            meta: "compacted".into(),
            rev: parsed.rev,
            at: now,
        };
        serde_json::to_writer(&mut out, &meta).map_err(|e| self.io(e.into()))?;
        out.push(b'\n');
        write_atomic(&self.path, &out).map_err(|e| self.io(e))?;
        // The old inode's lock is released on drop; waiting writers see the new inode and retry.
        drop(file);
        Ok((keep.len(), total - keep.len()))
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

/// Replace `path` with `bytes` atomically: a temp file in the same directory, fsync, rename,
/// fsync the directory. A crash leaves the old file or the new one, never a mix; the temp file
/// is removed on failure. Used for every file keygate rewrites whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> io::Result<()> {
        let mut t = File::create(&tmp)?;
        keep_mode_and_owner(path, &t)?;
        t.write_all(bytes)?;
        t.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
fn complete_prefix(buf: &[u8]) -> &[u8] {
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => &buf[..=i],
        None => &[],
    }
}

/// Scan backwards from the end for the last parseable line; returns (end of complete lines,
/// its revision). Reads in 64 KiB chunks so an append costs O(tail), not O(file).
fn tail_revision(file: &mut File, len: u64) -> io::Result<(u64, u64)> {
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
                Ok(Line::Record(r)) => return Ok((complete.unwrap_or(0), r.rev)),
                Ok(Line::Meta(rev)) => return Ok((complete.unwrap_or(0), rev)),
                Err(_) => {}
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

/// Follows the log by byte offset; detects replacement by inode or shrink.
#[derive(Debug)]
pub struct Follower {
    file: LogFile,
    ino: Option<(u64, u64)>,
    offset: u64,
    next_line: u64,
    rev: u64,
    /// The file version we refused (rollback), so we report it once, not on every poll.
    refused: Option<(u64, u64, u64)>,
    /// The last bytes consumed (up to `TAIL`): if they changed, the file was rewritten in
    /// place (e.g. a backup copied over it) and our offset means nothing any more.
    tail: Vec<u8>,
}

const TAIL: usize = 64;

impl Follower {
    pub fn new(file: LogFile) -> Follower {
        Follower {
            file,
            ino: None,
            offset: 0,
            next_line: 1,
            rev: 0,
            refused: None,
            tail: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The revision of everything applied so far.
    pub fn revision(&self) -> u64 {
        self.rev
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
        if self.ino == Some(id) && meta.len() >= self.offset {
            if meta.len() == self.offset {
                return Ok(Update::Unchanged);
            }
            let back = self.tail.len() as u64;
            f.seek(SeekFrom::Start(self.offset - back)).map_err(io)?;
            let mut buf = Vec::with_capacity((meta.len() - self.offset + back) as usize);
            f.read_to_end(&mut buf).map_err(io)?;
            if buf.starts_with(&self.tail) {
                let complete = complete_prefix(&buf[self.tail.len()..]);
                if complete.is_empty() {
                    return Ok(Update::Unchanged);
                }
                let parsed = parse_lines(complete, self.next_line, self.rev);
                self.offset += complete.len() as u64;
                self.next_line += complete.iter().filter(|&&b| b == b'\n').count() as u64;
                self.rev = parsed.rev;
                let end = self.tail.len() + complete.len();
                self.tail = buf[end.saturating_sub(TAIL)..end].to_vec();
                return Ok(Update::Appended(parsed));
            }
            // Rewritten in place: fall through and judge it whole.
            f.seek(SeekFrom::Start(0)).map_err(io)?;
        }
        // First read, replaced, or shrunk: read it whole and judge it as a new table.
        let mut buf = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut buf).map_err(io)?;
        let complete = complete_prefix(&buf);
        let parsed = parse_lines(complete, 1, 0);
        if parsed.rev < self.rev {
            self.refused = Some(fingerprint);
            return Err(StoreError::Rollback {
                path,
                file_rev: parsed.rev,
                applied_rev: self.rev,
            });
        }
        self.refused = None;
        self.ino = Some(id);
        self.offset = complete.len() as u64;
        self.tail = complete[complete.len().saturating_sub(TAIL)..].to_vec();
        self.next_line = 1 + complete.iter().filter(|&&b| b == b'\n').count() as u64;
        self.rev = parsed.rev;
        Ok(Update::Replaced(parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    fn rec(id: &str, n: u8) -> KeyRecord {
        sample(id, Digest([n; 32]))
    }

    #[test]
    fn append_assigns_increasing_revisions_and_load_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("keys.jsonl"));
        let w = log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        assert_eq!(w.iter().map(|r| r.rev).collect::<Vec<_>>(), vec![1, 2]);
        let w = log.append(vec![rec("key_c", 3)]).unwrap();
        assert_eq!(w[0].rev, 3);
        let loaded = log.load().unwrap();
        assert_eq!(loaded.rev, 3);
        assert_eq!(loaded.records.len(), 3);
        assert!(loaded.corrupt.is_empty());
    }

    #[test]
    fn writer_drops_partial_tail_and_skips_corrupt_lines_for_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.jsonl");
        let log = LogFile::new(&path);
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
        assert_eq!(loaded.corrupt[0].line, 2);
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("trunc"), "partial tail removed");
    }

    #[test]
    fn tail_revision_spans_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("k.jsonl"));
        let mut big = rec("key_big", 1);
        big.name = "n".repeat(200_000);
        log.append(vec![big]).unwrap();
        assert_eq!(log.append(vec![rec("key_x", 2)]).unwrap()[0].rev, 2);
    }

    #[test]
    fn transact_sees_latest_state() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("k.jsonl"));
        log.append(vec![rec("key_a", 1)]).unwrap();
        let out = log
            .transact(|s| {
                let mut r = s.keys["key_a"].clone();
                r.revoked_at = Some(5);
                Ok::<_, ()>(vec![r])
            })
            .unwrap()
            .unwrap();
        assert_eq!(out[0].rev, 2);
        let state = latest(log.load().unwrap().records);
        assert_eq!(state["key_a"].revoked_at, Some(5));
    }

    #[test]
    fn compaction_keeps_latest_and_revision_and_drops_old_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(dir.path().join("k.jsonl"));
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
        let (kept, dropped) = log.compact(100, 50).unwrap();
        assert_eq!((kept, dropped), (1, 3));
        let loaded = log.load().unwrap();
        assert_eq!(loaded.rev, 4, "meta line keeps the revision");
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.records[0].name, "renamed");
        assert_eq!(log.append(vec![rec("key_c", 3)]).unwrap()[0].rev, 5);
    }

    #[test]
    fn follower_detects_an_in_place_rewrite_behind_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = LogFile::new(&path);
        log.append(vec![rec("key_a", 1), rec("key_b", 2)]).unwrap();
        let mut fol = Follower::new(log.clone());
        fol.poll().unwrap();
        // Same inode, different bytes before our offset, and longer than before.
        let mut other = rec("key_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", 3);
        other.rev = 1;
        let mut bytes = serde_json::to_vec(&other).unwrap();
        bytes.push(b'\n');
        for rev in 2..=4 {
            let mut r = rec(&format!("key_{rev}"), rev as u8);
            r.rev = rev;
            bytes.extend(serde_json::to_vec(&r).unwrap());
            bytes.push(b'\n');
        }
        std::fs::write(&path, &bytes).unwrap();
        match fol.poll().unwrap() {
            Update::Replaced(p) => {
                assert_eq!(p.records.len(), 4, "read whole, not from a stale offset")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn follower_reads_appends_waits_for_partial_lines_and_detects_replacement_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.jsonl");
        let log = LogFile::new(&path);
        log.append(vec![rec("key_a", 1)]).unwrap();
        let mut fol = Follower::new(log.clone());
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.records.len() == 1));
        assert!(matches!(fol.poll().unwrap(), Update::Unchanged));

        // A partial line is not consumed until its newline arrives.
        let mut line = serde_json::to_vec(&KeyRecord {
            rev: 2,
            ..rec("key_b", 2)
        })
        .unwrap();
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

        // A corrupt appended line is reported with its line number.
        f.write_all(b"{broken\n").unwrap();
        match fol.poll().unwrap() {
            Update::Appended(p) => assert_eq!(p.corrupt[0].line, 3),
            other => panic!("{other:?}"),
        }

        // Compaction replaces the inode: read whole.
        log.compact(0, 0).unwrap();
        assert!(matches!(fol.poll().unwrap(), Update::Replaced(p) if p.rev == 2));

        // Rollback: an older file renamed into place is refused, once.
        let old = dir.path().join("old.jsonl");
        LogFile::new(&old).append(vec![rec("key_a", 1)]).unwrap();
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

        // Truncation on a line boundary in place is a shrink: also refused.
        log.compact(0, 0).unwrap();
        let mut fol = Follower::new(log.clone());
        log.append(vec![rec("key_z", 9)]).unwrap();
        fol.poll().unwrap();
        let text = fs::read(&path).unwrap();
        let cut = text[..text.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        assert!(matches!(fol.poll(), Err(StoreError::Rollback { .. })));
    }
}
