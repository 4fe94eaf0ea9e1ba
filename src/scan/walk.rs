//! What `keygate scan` reads: files, directories (recursively, in name order), `-` for stdin,
//! and inside them gzip members and tar entries (ustar, GNU long names, pax `path`), nested
//! up to a few levels. `.git` directories and binary content (a NUL byte in the first 8000
//! bytes, git's own test) are skipped unless asked for; symlinks inside a directory are not
//! followed (a link back up the tree would loop, and a link within it would report twice).
//!
//! Each piece of text reaches the visitor with its display name: the path as given, and for
//! an archive entry `archive.tar.gz!path/in/tar`. Decompressed sizes are bounded (gzip bombs).

use std::io::Read;
use std::path::Path;

/// Nested archives deeper than this (a tar in a gzip in a tar…) are not opened.
const MAX_DEPTH: usize = 4;
/// Git's binary heuristic: a NUL in the first 8000 bytes.
const SNIFF: usize = 8000;

#[derive(Debug, Clone)]
pub struct WalkOptions {
    /// Descend into `.git` directories.
    pub include_git: bool,
    /// Scan binary content too.
    pub binary: bool,
    /// Open gzip and tar content.
    pub archives: bool,
    /// Larger files and decompressed entries are not read: an error, since a key in them
    /// would go unseen (the scan is incomplete, exit 2).
    pub max_bytes: u64,
}

/// What the walk did besides visiting text.
#[derive(Debug, Default)]
pub struct Walked {
    /// Pieces of text scanned (files and archive entries).
    pub scanned: u64,
    /// Bytes of text scanned.
    pub bytes: u64,
    /// Skipped on purpose, with why (binary, too large, not opened).
    pub skipped: Vec<(String, String)>,
    /// Could not be read: the scan is incomplete (exit 2).
    pub errors: Vec<String>,
}

pub struct Walker<'a> {
    opts: &'a WalkOptions,
    visit: &'a mut dyn FnMut(&str, &[u8]),
    pub walked: Walked,
}

impl<'a> Walker<'a> {
    pub fn new(opts: &'a WalkOptions, visit: &'a mut dyn FnMut(&str, &[u8])) -> Walker<'a> {
        Walker {
            opts,
            visit,
            walked: Walked::default(),
        }
    }

    /// One argument: `-`, a file or a directory.
    pub fn arg(&mut self, arg: &str) {
        if arg == "-" {
            let mut buf = Vec::new();
            match std::io::stdin()
                .lock()
                .take(self.opts.max_bytes + 1)
                .read_to_end(&mut buf)
            {
                Ok(_) => self.content("-", buf, 0),
                Err(e) => self.walked.errors.push(format!("-: {e}")),
            }
            return;
        }
        let path = Path::new(arg);
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => self.dir(path),
            Ok(_) => self.file(path),
            Err(e) => self.walked.errors.push(format!("{arg}: {e}")),
        }
    }

    fn dir(&mut self, dir: &Path) {
        let mut entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(dir) {
            Ok(rd) => match rd.collect::<Result<_, _>>() {
                Ok(v) => v,
                Err(e) => return self.walked.errors.push(format!("{}: {e}", dir.display())),
            },
            Err(e) => return self.walked.errors.push(format!("{}: {e}", dir.display())),
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let kind = match e.file_type() {
                Ok(k) => k,
                Err(err) => {
                    self.walked
                        .errors
                        .push(format!("{}: {err}", path.display()));
                    continue;
                }
            };
            if kind.is_symlink() {
                continue;
            }
            if kind.is_dir() {
                if e.file_name() == ".git" && !self.opts.include_git {
                    continue;
                }
                self.dir(&path);
            } else if kind.is_file() {
                self.file(&path);
            }
        }
    }

    fn file(&mut self, path: &Path) {
        let name = display(path);
        match std::fs::metadata(path) {
            Ok(m) if m.len() > self.opts.max_bytes => return self.too_large(&name),
            Ok(_) => {}
            Err(e) => return self.walked.errors.push(format!("{name}: {e}")),
        }
        match std::fs::read(path) {
            Ok(bytes) => self.content(&name, bytes, 0),
            Err(e) => self.walked.errors.push(format!("{name}: {e}")),
        }
    }

    /// Content over `--max-size` is not read (memory stays bounded), and the scan says it is
    /// incomplete rather than passing over it: a pre-commit hook must not pass a file it did
    /// not read.
    fn too_large(&mut self, name: &str) {
        self.walked.errors.push(format!(
            "{name}: not scanned, larger than --max-size ({} bytes); raise --max-size to scan it",
            self.opts.max_bytes
        ));
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.walked.skipped.push((name.to_owned(), why.to_owned()));
    }

    /// Dispatch one piece of content by what it is: gzip, tar, binary or text.
    fn content(&mut self, name: &str, bytes: Vec<u8>, depth: usize) {
        if bytes.len() as u64 > self.opts.max_bytes {
            return self.too_large(name);
        }
        let archive = is_gzip(&bytes) || is_tar(&bytes);
        if archive && self.opts.archives {
            if depth >= MAX_DEPTH {
                return self.skip(name, "archive nested too deep");
            }
            if is_gzip(&bytes) {
                return self.gzip(name, &bytes, depth);
            }
            return self.tar(name, &bytes, depth);
        }
        if !self.opts.binary && memchr::memchr(0, &bytes[..bytes.len().min(SNIFF)]).is_some() {
            return self.skip(name, "binary");
        }
        self.walked.scanned += 1;
        self.walked.bytes += bytes.len() as u64;
        (self.visit)(name, &bytes);
    }

    /// A gzip file (every member, as `gzip -d` does): its content keeps the file's name
    /// (`notes.txt.gz`); a tarball inside names its entries after it (`a.tar.gz!path`).
    fn gzip(&mut self, name: &str, bytes: &[u8], depth: usize) {
        let mut out = Vec::new();
        let read = flate2::read::MultiGzDecoder::new(bytes)
            .take(self.opts.max_bytes + 1)
            .read_to_end(&mut out);
        match read {
            Ok(_) => self.content(name, out, depth + 1),
            Err(e) => self.walked.errors.push(format!("{name}: gzip: {e}")),
        }
    }

    fn tar(&mut self, name: &str, bytes: &[u8], depth: usize) {
        match tar_entries(bytes) {
            Ok(entries) => {
                for (path, range) in entries {
                    let entry = format!("{name}!{path}");
                    self.content(&entry, bytes[range].to_vec(), depth + 1);
                }
            }
            Err(e) => self.walked.errors.push(format!("{name}: tar: {e}")),
        }
    }
}

/// A path as the user would write it: no leading `./`.
fn display(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.strip_prefix("./").unwrap_or(&s).to_owned()
}

fn is_gzip(b: &[u8]) -> bool {
    b.starts_with(&[0x1f, 0x8b, 0x08])
}

/// POSIX ustar and GNU tar both carry `ustar` at offset 257 of the first header.
fn is_tar(b: &[u8]) -> bool {
    b.len() >= 512 && b.get(257..262) == Some(b"ustar".as_slice())
}

/// A NUL-terminated header field as text.
fn field(h: &[u8]) -> String {
    let end = memchr::memchr(0, h).unwrap_or(h.len());
    String::from_utf8_lossy(&h[..end]).into_owned()
}

/// The size field: octal digits, or GNU base-256 (high bit of the first byte set).
fn tar_size(h: &[u8]) -> Result<u64, String> {
    if h.first().is_some_and(|b| b & 0x80 != 0) {
        let mut n: u64 = 0;
        for (i, b) in h.iter().enumerate() {
            let b = if i == 0 { b & 0x7f } else { *b };
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(b)))
                .ok_or("size overflows")?;
        }
        return Ok(n);
    }
    let text = field(h);
    let digits = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(digits, 8).map_err(|_| format!("bad size field {digits:?}"))
}

/// The `path` record of a pax extended header (`<len> path=<value>\n` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.split('\n')
        .filter_map(|rec| rec.split_once(' ').map(|(_, kv)| kv))
        .find_map(|kv| kv.strip_prefix("path=").map(str::to_owned))
}

/// The regular files of a tar archive: (path, byte range of the content). Bounds-checked
/// throughout: a truncated or hostile archive is an error, never a panic.
fn tar_entries(b: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut long_name: Option<String> = None;
    while at + 512 <= b.len() {
        let h = &b[at..at + 512];
        if h.iter().all(|x| *x == 0) {
            break; // end-of-archive marker
        }
        let size = usize::try_from(tar_size(&h[124..136])?).map_err(|_| "entry too large")?;
        let start = at + 512;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= b.len())
            .ok_or_else(|| format!("entry at byte {at} runs past the end"))?;
        let data = &b[start..end];
        match h[156] {
            b'L' => long_name = Some(field(data)),
            b'x' => long_name = pax_path(data).or(long_name),
            b'0' | 0 | b'7' => {
                let path = long_name.take().unwrap_or_else(|| {
                    let name = field(&h[0..100]);
                    let prefix = if &h[257..262] == b"ustar" {
                        field(&h[345..500])
                    } else {
                        String::new()
                    };
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                });
                out.push((path, start..end));
            }
            _ => long_name = None,
        }
        at = start + size.div_ceil(512) * 512;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ustar header for `name` with `size` bytes (checksum not needed by the reader).
    fn header(name: &str, size: usize, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h
    }

    fn pad(v: &mut Vec<u8>) {
        while !v.len().is_multiple_of(512) {
            v.push(0);
        }
    }

    #[test]
    fn tar_entries_regular_long_names_and_truncation() {
        let mut t = header("a.txt", 3, b'0');
        t.extend_from_slice(b"abc");
        pad(&mut t);
        t.extend(header("dir", 0, b'5'));
        let long = "d/".repeat(80) + "deep.txt";
        t.extend(header("././@LongLink", long.len() + 1, b'L'));
        t.extend_from_slice(long.as_bytes());
        t.push(0);
        pad(&mut t);
        t.extend(header("ignored", 2, b'0'));
        t.extend_from_slice(b"xy");
        pad(&mut t);
        t.extend(vec![0u8; 1024]);
        let entries = tar_entries(&t).unwrap();
        let names: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(n, r)| (n.as_str(), &t[r.clone()]))
            .collect();
        assert_eq!(
            names,
            vec![("a.txt", &b"abc"[..]), (long.as_str(), &b"xy"[..])]
        );
        assert!(is_tar(&t));
        let cut = &t[..514]; // the first entry holds 3 bytes; 2 are left
        assert!(tar_entries(cut).is_err());
        assert!(tar_size(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap() == 256);
    }
}
