//! Authenticated records and sealed files: what makes write access to a store file, a feed
//! cache or a feed alone unable to add, widen or un-revoke a key.
//!
//! - A **log id** names one history of revisions. A restore, a replaced file or a source found
//!   behind what a writer last issued starts a new log id; readers that see a new log id reload
//!   whole (and still keep every revocation they have seen, `sync::apply`).
//! - Every record carries a **MAC**: HMAC-SHA256 over (log id, revision, the record's JSON
//!   without the MAC), under a key derived from the hash secret and versioned like it. A record
//!   copied from another log, edited, or written by someone without the secret fails.
//! - A **sealed file** (the gateway's feed cache) ends with a trailer carrying the record
//!   count, the last revision and a MAC over every byte before it, so a cut anywhere, even on a
//!   line boundary (THREATS I4), a garbage tail or a reordered/replaced line is detected.
//! - A **sealed feed stream**: every line of a feed connection carries a tag over a nonce the
//!   reader chose for this connection, every byte the stream sent before the line and the
//!   line's own JSON. Someone on the path can then neither forge a heartbeat (to make a node
//!   that misses revocations look in sync), drop, add or reorder a line unseen, end a snapshot
//!   early, nor replay a stream recorded earlier; the reader checks each line before acting
//!   on it.
//!
//! Derived keys, not the hash secret itself: a MAC and a key digest made with one key would
//! let a record's MAC be replayed as some key's digest (and the reverse) if the inputs ever
//! collided; a label per use rules that out.

use crate::keys::digest::Hasher;
use crate::keys::record::KeyRecord;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use std::fmt;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const RECORD_LABEL: &[u8] = b"keygate/v1/record-mac";
const FILE_LABEL: &[u8] = b"keygate/v1/file-seal";
const FEED_LABEL: &[u8] = b"keygate/v1/feed-stream";

/// One history of revisions. 0 means "none": a legacy (unsigned) store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct LogId(pub u64);

impl LogId {
    pub const NONE: LogId = LogId(0);

    /// A fresh random log id (never 0).
    pub fn new() -> Result<LogId, getrandom::Error> {
        loop {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b)?;
            let v = u64::from_le_bytes(b);
            if v != 0 {
                return Ok(LogId(v));
            }
        }
    }

    pub fn is_none(&self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogId({self})")
    }
}

impl std::str::FromStr for LogId {
    type Err = String;
    fn from_str(s: &str) -> Result<LogId, String> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a log id is 16 hex digits".into());
        }
        u64::from_str_radix(s, 16)
            .map(LogId)
            .map_err(|e| e.to_string())
    }
}

impl Serialize for LogId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LogId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC and the secret version it was made with: `"<version>:<64 hex>"` in JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub version: u32,
    pub mac: [u8; 32],
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag(v{})", self.version)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every record line carries one (a bulk import writes a million): hex by table, not
        // one formatter call per byte.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 64];
        for (i, b) in self.mac.iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        write!(f, "{}:", self.version)?;
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl std::str::FromStr for Tag {
    type Err = String;
    fn from_str(s: &str) -> Result<Tag, String> {
        let (v, hex) = s.split_once(':').ok_or("a MAC is <version>:<64 hex>")?;
        let version = v.parse::<u32>().map_err(|_| "bad MAC version")?;
        let digest =
            crate::keys::digest::Digest::from_hex(hex).ok_or("a MAC is <version>:<64 hex>")?;
        Ok(Tag {
            version,
            mac: digest.0,
        })
    }
}

impl Serialize for Tag {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SealError {
    #[error("record {id} at revision {rev} carries no MAC in a signed log")]
    Unsigned { id: String, rev: u64 },
    #[error(
        "record {id} at revision {rev}: MAC does not verify (edited, foreign, or from another log)"
    )]
    BadRecord { id: String, rev: u64 },
    #[error("MAC made with secret version {0}, which is not configured")]
    UnknownVersion(u32),
    #[error(
        "feed {0} line carries no MAC (a control plane older than this gateway, or a forged line)"
    )]
    UnsignedLine(&'static str),
    #[error("feed {0} line: MAC does not verify (a line of this stream was forged, dropped, added, reordered or replayed)")]
    BadLine(&'static str),
    #[error("{0}")]
    BadFile(String),
}

/// The MAC keys, one per configured hash-secret version, newest first.
#[derive(Clone)]
pub struct Signer {
    record: Vec<(u32, HmacSha256)>,
    file: Vec<(u32, HmacSha256)>,
    feed: Vec<(u32, HmacSha256)>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let versions: Vec<u32> = self.record.iter().map(|(v, _)| *v).collect();
        f.debug_struct("Signer")
            .field("versions", &versions)
            .finish()
    }
}

impl Signer {
    pub fn new(hasher: &Hasher) -> Signer {
        Signer {
            record: hasher.derive(RECORD_LABEL),
            file: hasher.derive(FILE_LABEL),
            feed: hasher.derive(FEED_LABEL),
        }
    }

    fn key(keys: &[(u32, HmacSha256)], version: u32) -> Result<&HmacSha256, SealError> {
        keys.iter()
            .find(|(v, _)| *v == version)
            .map(|(_, k)| k)
            .ok_or(SealError::UnknownVersion(version))
    }

    fn record_mac(key: &HmacSha256, log: LogId, record: &KeyRecord) -> [u8; 32] {
        // The record's own JSON without its MAC: serialisation of the struct is deterministic
        // (fixed field order, BTreeMap labels), so a reader re-serialising what it parsed gets
        // the bytes that were signed.
        let body = if record.mac.is_some() {
            let mut unsigned = record.clone();
            unsigned.mac = None;
            serde_json::to_vec(&unsigned)
        } else {
            serde_json::to_vec(record)
        };
        Self::mac_over(key, log, record.rev, &body.unwrap_or_default())
    }

    /// What a record's MAC covers: its log, its revision and its JSON without the MAC.
    fn mac_over(key: &HmacSha256, log: LogId, rev: u64, unsigned_json: &[u8]) -> [u8; 32] {
        let mut m = key.clone();
        m.update(&log.0.to_be_bytes());
        m.update(&rev.to_be_bytes());
        m.update(unsigned_json);
        m.finalize().into_bytes().into()
    }

    /// Sign `record` (at its final revision) as part of `log`, with the newest secret.
    pub fn sign(&self, log: LogId, record: &mut KeyRecord) {
        record.mac = None;
        if let Some((version, key)) = self.record.first() {
            let mac = Self::record_mac(key, log, record);
            record.mac = Some(Tag {
                version: *version,
                mac,
            });
        }
    }

    /// Sign `record` (at its final revision) as [`Signer::sign`] does and append its JSON line
    /// body (no newline) to `out`, serialising it once: the signed JSON is the unsigned JSON
    /// with the `mac` field (the struct's last, skipped when empty) added before the closing
    /// brace, so the bytes the MAC covers are also the bytes written. Bulk writers (an import
    /// writes a million lines) otherwise serialise every record twice.
    pub fn sign_into(
        &self,
        log: LogId,
        record: &mut KeyRecord,
        out: &mut Vec<u8>,
    ) -> serde_json::Result<()> {
        record.mac = None;
        let start = out.len();
        serde_json::to_writer(&mut *out, &*record)?;
        let Some((version, key)) = self.record.first() else {
            return Ok(());
        };
        let tag = Tag {
            version: *version,
            mac: Self::mac_over(key, log, record.rev, &out[start..]),
        };
        record.mac = Some(tag);
        // `{…}` → `{…,"mac":"<tag>"}`: a record always has fields, so the comma is right.
        out.pop();
        out.extend_from_slice(b",\"mac\":");
        serde_json::to_writer(&mut *out, &tag)?;
        out.push(b'}');
        Ok(())
    }

    /// The version new MACs are made with (the newest secret).
    pub fn version(&self) -> Option<u32> {
        self.record.first().map(|(v, _)| *v)
    }

    /// Check a record's MAC against `log`.
    pub fn verify(&self, log: LogId, record: &KeyRecord) -> Result<(), SealError> {
        let Some(tag) = record.mac else {
            return Err(SealError::Unsigned {
                id: record.id.clone(),
                rev: record.rev,
            });
        };
        let key = Self::key(&self.record, tag.version)?;
        if constant_eq(&Self::record_mac(key, log, record), &tag.mac) {
            Ok(())
        } else {
            Err(SealError::BadRecord {
                id: record.id.clone(),
                rev: record.rev,
            })
        }
    }

    /// MAC over arbitrary bytes for sealed files and small state files (the newest secret).
    pub fn file_chain(&self) -> Chain {
        let (version, key) = self
            .file
            .first()
            .map(|(v, k)| (*v, k.clone()))
            // KeySettings refuses to start without a secret; an empty signer seals nothing real.
            .unwrap_or_else(|| (0, <HmacSha256 as KeyInit>::new(&Default::default())));
        Chain { version, mac: key }
    }

    /// A chain keyed with a given version, to verify what an older secret sealed.
    pub fn file_chain_for(&self, version: u32) -> Result<Chain, SealError> {
        Ok(Chain {
            version,
            mac: Self::key(&self.file, version)?.clone(),
        })
    }

    /// The MAC over one feed stream, begun with the nonce its reader sent, keyed with the
    /// newest secret (the control plane's side).
    pub fn feed_chain(&self, nonce: &[u8]) -> Chain {
        let (version, key) = self
            .feed
            .first()
            .map(|(v, k)| (*v, k.clone()))
            .unwrap_or_else(|| (0, <HmacSha256 as KeyInit>::new(&Default::default())));
        Self::stream(version, key, nonce)
    }

    /// The same chain keyed with the version the stream's first tag names (the reader's side).
    pub fn feed_chain_for(&self, version: u32, nonce: &[u8]) -> Result<Chain, SealError> {
        Ok(Self::stream(
            version,
            Self::key(&self.feed, version)?.clone(),
            nonce,
        ))
    }

    fn stream(version: u32, mut mac: HmacSha256, nonce: &[u8]) -> Chain {
        // Length first: no nonce's chain is a prefix of another's.
        mac.update(&(nonce.len() as u64).to_be_bytes());
        mac.update(nonce);
        Chain { version, mac }
    }
}

/// A running MAC over a file's bytes: the writer keeps one and appends to it, so sealing after
/// each append costs the appended bytes, not the file.
#[derive(Clone)]
pub struct Chain {
    version: u32,
    mac: HmacSha256,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Chain(v{})", self.version)
    }
}

impl Chain {
    pub fn update(&mut self, bytes: &[u8]) {
        self.mac.update(bytes);
    }

    /// The tag over everything so far plus `trailer` (without consuming the chain).
    pub fn tag(&self, trailer: &[u8]) -> Tag {
        let mut m = self.mac.clone();
        m.update(trailer);
        Tag {
            version: self.version,
            mac: m.finalize().into_bytes().into(),
        }
    }

    pub fn verify(&self, trailer: &[u8], tag: &Tag) -> bool {
        tag.version == self.version && constant_eq(&self.tag(trailer).mac, &tag.mac)
    }
}

/// MAC comparison without an early exit: a verifier that stops at the first differing byte
/// would let a forger learn a valid tag a byte at a time.
fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    fn signer(secret: u8) -> Signer {
        Signer::new(&Hasher::new(vec![(1, vec![secret; 32])]))
    }

    #[test]
    fn sign_into_writes_the_bytes_sign_and_serialise_write() {
        let s = signer(1);
        let mut a = sample("key_a", Digest([1; 32]));
        a.rev = 9;
        a.labels.insert("k".into(), "v \"q\" }".into());
        let mut b = a.clone();
        s.sign(LogId(7), &mut a);
        let mut out = b"prefix".to_vec();
        s.sign_into(LogId(7), &mut b, &mut out).unwrap();
        assert_eq!(a, b);
        assert_eq!(&out[6..], serde_json::to_vec(&a).unwrap().as_slice());
        assert!(s.verify(LogId(7), &b).is_ok());
    }

    #[test]
    fn records_verify_only_in_their_log_and_unchanged() {
        let s = signer(1);
        let log = LogId(7);
        let mut r = sample("key_a", Digest([1; 32]));
        r.rev = 3;
        s.sign(log, &mut r);
        assert_eq!(s.verify(log, &r), Ok(()));
        // Survives a JSON round trip (what every reader does).
        let back: KeyRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(s.verify(log, &back), Ok(()));
        assert!(s.verify(LogId(8), &r).is_err(), "foreign log");
        let mut edited = r.clone();
        edited.revoked_at = None;
        edited.scopes.push("admin".into());
        assert!(matches!(
            s.verify(log, &edited),
            Err(SealError::BadRecord { .. })
        ));
        let mut moved = r.clone();
        moved.rev = 4;
        assert!(s.verify(log, &moved).is_err(), "revision is covered");
        assert!(signer(2).verify(log, &r).is_err(), "other secret");
        let mut unsigned = r.clone();
        unsigned.mac = None;
        assert!(matches!(
            s.verify(log, &unsigned),
            Err(SealError::Unsigned { .. })
        ));
    }

    #[test]
    fn older_secret_versions_still_verify() {
        let old = Signer::new(&Hasher::new(vec![(1, vec![1; 32])]));
        let both = Signer::new(&Hasher::new(vec![(1, vec![1; 32]), (2, vec![2; 32])]));
        let mut r = sample("key_a", Digest([1; 32]));
        old.sign(LogId(1), &mut r);
        assert_eq!(both.verify(LogId(1), &r), Ok(()));
        both.sign(LogId(1), &mut r);
        assert_eq!(r.mac.unwrap().version, 2);
        assert_eq!(old.verify(LogId(1), &r), Err(SealError::UnknownVersion(2)));
    }

    #[test]
    fn chain_tags_cover_every_byte_and_the_trailer() {
        let s = signer(1);
        let mut c = s.file_chain();
        c.update(b"line one\n");
        let t1 = c.tag(b"trailer");
        c.update(b"line two\n");
        let t2 = c.tag(b"trailer");
        assert_ne!(t1, t2);
        let mut again = s.file_chain_for(1).unwrap();
        again.update(b"line one\nline two\n");
        assert!(again.verify(b"trailer", &t2));
        assert!(!again.verify(b"trailer!", &t2));
        let tag: Tag = t2.to_string().parse().unwrap();
        assert_eq!(tag, t2);
        assert_eq!(
            LogId(0xab).to_string().parse::<LogId>().unwrap(),
            LogId(0xab)
        );
    }
}
