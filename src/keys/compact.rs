//! The compact form of a key the gateway enforces, and the storage primitives of the key
//! table (`keys::table`): what makes a million keys cost about a hundred bytes each.
//!
//! - **`Entry`** (`Copy`): the digest, the id in binary (ids are `key_` + 26 base32
//!   characters of 128 random bits; any other id is interned), the revision, the validity
//!   window and revocation as 32-bit Unix seconds, the secret version, flags, and three small
//!   numbers: the key's owner, its `Profile` and its lineage (0: the key is its own lineage;
//!   else an interned string).
//! - **Owners**: interned, numbered, each held as the `Name` a view carries (inline up to 22
//!   bytes), in a dense slab: a view copies its owner from one cell, with no pointer to
//!   follow and no reference count to bump.
//! - **`Profile`**: env, scopes, plan/rate/quota, allowed networks and origins: what many
//!   keys share, interned once (`Arc`). The owner is not in it (a platform has an owner per
//!   few keys, but a handful of plans and scope sets), so a million keys of a hundred thousand
//!   customers hold a few profiles, which stay in cache.
//! - **`Cell`**: an entry as 11 atomic words (88 bytes), written once by the one writer
//!   before any index points at it (the last word, which carries a written bit, with Release)
//!   and read after the index load (that word first, with Acquire): no lock, no `OnceLock`
//!   state, no pointer, and no torn read, since a cell never changes once published.
//! - **`Slab`**: append-only chunks of cells, each chunk one huge page (`keys::pages`). A new
//!   version of a key is a new cell (the old one becomes garbage that the table's rebuild
//!   drops), so a reader sees one version whole, never a mix.
//! - **`Index`**: open addressing over atomic words, sized to the key count, not a power of
//!   two: by digest a word per slot (a tag of the hash, the owner number, the slot number),
//!   by id half a word (a tag and the slot number). Readers probe with atomic loads; the one
//!   writer (the table's writer lock) stores whole words.
//!
//! Names, labels, hints, reasons and MACs are not here: the CLI and the control plane read
//! them from the store. Times beyond what 32 bits hold (before 1970 or after 2106) are
//! clamped, which decides the same at any instant between them.

use crate::keys::digest::Digest;
use crate::keys::record::{state_at, KeyRecord, KeyState};
use ipnet::IpNet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use zerocopy::{FromBytes, IntoBytes, KnownLayout};

/// Values per chunk of the interned slabs (owners, profiles, strings): big enough that the
/// chunk list stays short, small enough that the last, partly used chunk costs little. (The
/// entry slab's chunks are `SLAB_CHUNK`.)
pub const CHUNK: usize = 4096;

/// What many keys share, interned once per distinct value (the owner is not here: see the
/// module header).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub env: String,
    pub scopes: Vec<String>,
    pub plan: Option<String>,
    pub rate: Option<String>,
    pub quota: Option<String>,
    pub allow_ips: Vec<IpNet>,
    pub allow_origins: Vec<String>,
}

impl Profile {
    pub fn of(r: &KeyRecord) -> Profile {
        Profile {
            env: r.env.clone(),
            scopes: r.scopes.clone(),
            plan: r.plan.clone(),
            rate: r.rate.clone(),
            quota: r.quota.clone(),
            allow_ips: r.allow_ips.clone(),
            allow_origins: r.allow_origins.clone(),
        }
    }
}

pub const CANARY: u8 = 1;
pub const PUBLISHABLE: u8 = 1 << 1;
pub const IMPORTED: u8 = 1 << 2;
/// The id is not in the binary form: `id[..4]` is an index into the table's strings.
pub const ID_INTERNED: u8 = 1 << 3;
/// The key carried a rotation that is over (completed): `rotation::event` must not see a
/// later version as a new start.
pub const ROTATION_CLOSED: u8 = 1 << 4;
const HAS_NOT_BEFORE: u8 = 1 << 5;
const HAS_EXPIRES: u8 = 1 << 6;
const HAS_REVOKED: u8 = 1 << 7;

/// One key version as the gateway enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    pub id: [u8; 16],
    pub rev: u64,
    not_before: u32,
    expires_at: u32,
    revoked_at: u32,
    created_at: u32,
    /// 0: the key is its own lineage; else 1 + an index into the table's strings.
    pub lineage: u32,
    /// An index into the table's owners.
    pub owner: u32,
    pub profile: u32,
    pub secret_version: u32,
    pub flags: u8,
}

/// Bytes of one entry in a checkpoint (`store::checkpoint`): fixed offsets, little-endian.
pub const ENTRY_BYTES: usize = 92;

fn t32(t: i64) -> u32 {
    t.clamp(0, i64::from(u32::MAX)) as u32
}

fn opt32(t: Option<i64>, flags: &mut u8, bit: u8) -> u32 {
    match t {
        Some(t) => {
            *flags |= bit;
            t32(t)
        }
        None => 0,
    }
}

/// Where `Entry::new` finds the interned parts of a record.
#[derive(Debug, Clone, Copy)]
pub struct Interned {
    /// The binary id, or the interned id's number in its first 4 bytes (with `ID_INTERNED`).
    pub id: [u8; 16],
    pub id_flag: u8,
    pub lineage: u32,
    pub owner: u32,
    pub profile: u32,
}

impl Entry {
    /// The compact form of `r`, given where its id, lineage, owner and profile were interned.
    pub fn new(r: &KeyRecord, at: Interned) -> Entry {
        let mut flags = at.id_flag;
        for (on, bit) in [
            (r.canary, CANARY),
            (r.publishable, PUBLISHABLE),
            (r.imported, IMPORTED),
            (
                r.rotation
                    .as_ref()
                    .is_some_and(|x| x.completed_at.is_some()),
                ROTATION_CLOSED,
            ),
        ] {
            if on {
                flags |= bit;
            }
        }
        Entry {
            digest: r.digest,
            id: at.id,
            rev: r.rev.min(MAX_REV),
            not_before: opt32(r.not_before, &mut flags, HAS_NOT_BEFORE),
            expires_at: opt32(r.expires_at, &mut flags, HAS_EXPIRES),
            revoked_at: opt32(r.revoked_at, &mut flags, HAS_REVOKED),
            created_at: t32(r.created_at),
            lineage: at.lineage,
            owner: at.owner,
            profile: at.profile,
            secret_version: r.secret_version,
            flags,
        }
    }

    fn words(&self) -> [u32; 8] {
        [
            self.not_before,
            self.expires_at,
            self.revoked_at,
            self.created_at,
            self.lineage,
            self.owner,
            self.profile,
            self.secret_version,
        ]
    }

    /// The checkpoint form: the fields at fixed offsets, so a load is slicing, not parsing.
    pub fn to_bytes(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[..32].copy_from_slice(&self.digest.0);
        b[32..48].copy_from_slice(&self.id);
        b[48..56].copy_from_slice(&self.rev.to_le_bytes());
        for (i, w) in self.words().iter().enumerate() {
            b[56 + 4 * i..60 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[88] = self.flags;
        b
    }

    pub fn from_bytes(b: &[u8; ENTRY_BYTES]) -> Entry {
        let word = |i: usize| {
            u32::from_le_bytes([b[56 + 4 * i], b[57 + 4 * i], b[58 + 4 * i], b[59 + 4 * i]])
        };
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[..32]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[32..48]);
        let mut rev = [0u8; 8];
        rev.copy_from_slice(&b[48..56]);
        Entry {
            digest: Digest(digest),
            id,
            rev: u64::from_le_bytes(rev).min(MAX_REV),
            not_before: word(0),
            expires_at: word(1),
            revoked_at: word(2),
            created_at: word(3),
            lineage: word(4),
            owner: word(5),
            profile: word(6),
            secret_version: word(7),
            flags: b[88],
        }
    }

    /// The interned id's string number (meaningful with `ID_INTERNED`).
    pub fn interned_id(&self) -> u32 {
        u32::from_le_bytes([self.id[0], self.id[1], self.id[2], self.id[3]])
    }

    /// The hash `by_id` indexes a binary id by (its last 8 random bytes; as `id_hash`).
    pub fn binary_id_hash(&self) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.id[8..]);
        u64::from_le_bytes(w)
    }
}

/// The revisions a cell holds: 40 bits (a trillion records; a log never gets there). A larger
/// revision is held as this, which only matters past it.
pub const MAX_REV: u64 = (1 << 40) - 1;

/// The flags and 32-bit times of a key version, read the same way from an `Entry` and a
/// `KeyView`.
pub trait Validity {
    /// The flag bits.
    fn flag_bits(&self) -> u8;
    /// `[not_before, expires_at, revoked_at, created_at]` as stored.
    fn times(&self) -> [u32; 4];

    fn has(&self, bit: u8) -> bool {
        self.flag_bits() & bit != 0
    }
    fn not_before(&self) -> Option<i64> {
        self.has(HAS_NOT_BEFORE)
            .then_some(i64::from(self.times()[0]))
    }
    fn expires_at(&self) -> Option<i64> {
        self.has(HAS_EXPIRES).then_some(i64::from(self.times()[1]))
    }
    fn revoked_at(&self) -> Option<i64> {
        self.has(HAS_REVOKED).then_some(i64::from(self.times()[2]))
    }
    fn created_at(&self) -> i64 {
        i64::from(self.times()[3])
    }
    fn state(&self, now: i64) -> KeyState {
        state_at(
            self.revoked_at(),
            self.has(CANARY),
            self.expires_at(),
            self.not_before(),
            now,
        )
    }
}

impl Validity for Entry {
    fn flag_bits(&self) -> u8 {
        self.flags
    }
    fn times(&self) -> [u32; 4] {
        [
            self.not_before,
            self.expires_at,
            self.revoked_at,
            self.created_at,
        ]
    }
}

/// Words of a cell.
const CELL_WORDS: usize = 11;
/// Set in a cell's last word once the cell is written.
const WRITTEN: u64 = 1 << 63;

/// One key version in a slab: an `Entry` as 11 atomic words (see the module header).
/// Words 0-3: digest; 4-5: id; 6: not_before, expires_at; 7: revoked_at, created_at;
/// 8: lineage, owner; 9: profile, secret_version; 10: rev (40 bits), flags, written.
///
/// `repr(transparent)` and the zerocopy traits let a slab chunk be a zeroed mapping viewed as
/// cells (`keys::pages`): all-zero words are an unwritten cell.
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout)]
#[repr(transparent)]
pub struct Cell([AtomicU64; CELL_WORDS]);

fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

fn halves(w: u64) -> (u32, u32) {
    (w as u32, (w >> 32) as u32)
}

fn le_words<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut out = [0u64; N];
    for (w, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *w = u64::from_le_bytes(b);
    }
    out
}

impl Cell {
    /// Write `e` into this unwritten cell. The one writer calls this before any index points
    /// at the cell; the last word goes last, with Release, so a reader that sees it written
    /// sees every word.
    pub fn write(&self, e: &Entry) {
        let d: [u64; 4] = le_words(&e.digest.0);
        let id: [u64; 2] = le_words(&e.id);
        let words = [
            d[0],
            d[1],
            d[2],
            d[3],
            id[0],
            id[1],
            pair(e.not_before, e.expires_at),
            pair(e.revoked_at, e.created_at),
            pair(e.lineage, e.owner),
            pair(e.profile, e.secret_version),
        ];
        for (cell, w) in self.0.iter().zip(words) {
            cell.store(w, Ordering::Relaxed);
        }
        let last = e.rev.min(MAX_REV) | (u64::from(e.flags) << 40) | WRITTEN;
        self.0[CELL_WORDS - 1].store(last, Ordering::Release);
    }

    /// The entry, once written.
    pub fn read(&self) -> Option<Entry> {
        let last = self.0[CELL_WORDS - 1].load(Ordering::Acquire);
        if last & WRITTEN == 0 {
            return None;
        }
        let w = |i: usize| self.0[i].load(Ordering::Relaxed);
        let mut digest = [0u8; 32];
        for (i, c) in digest.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&w(i).to_le_bytes());
        }
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&w(4).to_le_bytes());
        id[8..].copy_from_slice(&w(5).to_le_bytes());
        let (not_before, expires_at) = halves(w(6));
        let (revoked_at, created_at) = halves(w(7));
        let (lineage, owner) = halves(w(8));
        let (profile, secret_version) = halves(w(9));
        Some(Entry {
            digest: Digest(digest),
            id,
            rev: last & MAX_REV,
            not_before,
            expires_at,
            revoked_at,
            created_at,
            lineage,
            owner,
            profile,
            secret_version,
            flags: (last >> 40) as u8,
        })
    }
}

/// A name the request path carries (a key's owner): short ones, nearly all, inline (making a
/// view copies a few bytes, with no reference count to bump on a line of its own), longer
/// ones shared.
#[derive(Clone)]
pub enum Name {
    Inline { len: u8, bytes: [u8; NAME_INLINE] },
    Shared(Arc<str>),
}

/// Bytes a `Name` holds inline.
pub const NAME_INLINE: usize = 22;

impl Name {
    /// The name of `s`, copied inline when it fits; `shared` makes the shared form otherwise.
    pub fn of(s: &str, shared: impl FnOnce() -> Arc<str>) -> Name {
        if s.len() <= NAME_INLINE {
            let mut bytes = [0u8; NAME_INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Name::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Name::Shared(shared())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `str` (see `of`): always UTF-8.
            Name::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or("")
            }
            Name::Shared(s) => s,
        }
    }

    /// The bytes, without `as_str`'s UTF-8 check: what a header value is made of.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Name::Shared(s) => s.as_bytes(),
        }
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::of(s, || s.into())
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // As `str` hashes: `Borrow<str>` lets a map keyed by names be asked with a `&str`.
        self.as_str().hash(h)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A key's id as the request path carries it: a generated id is held as its 30 characters
/// inline (no allocation when a view is made), any other id as the interned string.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyId {
    Generated([u8; ID_LEN]),
    Other(Arc<str>),
}

/// `key_` + 26 base32 characters.
pub const ID_LEN: usize = 30;

impl KeyId {
    /// The id of a binary id (`id_bytes`), written without allocating.
    pub fn generated(bytes: &[u8; 16]) -> KeyId {
        const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut out = [0u8; ID_LEN];
        out[..4].copy_from_slice(b"key_");
        let v = u128::from_be_bytes(*bytes);
        // 25 characters of 5 bits, then the last 3 bits shifted up by 2 (as `format_id` pads).
        for (i, c) in out[4..29].iter_mut().enumerate() {
            *c = B32[((v >> (123 - 5 * i)) & 31) as usize];
        }
        out[29] = B32[((v & 7) << 2) as usize];
        KeyId::Generated(out)
    }

    pub fn of(id: &str) -> KeyId {
        match id_bytes(id) {
            Some(b) => KeyId::generated(&b),
            None => KeyId::Other(id.into()),
        }
    }

    /// The id of an interned string, sharing it when it is not a generated id.
    pub fn shared(id: Arc<str>) -> KeyId {
        match id_bytes(&id) {
            Some(b) => KeyId::generated(&b),
            None => KeyId::Other(id),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Always ASCII (written above from the base32 alphabet).
            KeyId::Generated(b) => std::str::from_utf8(b).unwrap_or(""),
            KeyId::Other(s) => s,
        }
    }

    /// The bytes, without `as_str`'s UTF-8 check: what a header value is made of.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            KeyId::Generated(b) => b,
            KeyId::Other(s) => s.as_bytes(),
        }
    }
}

/// Hashes as its text, as `Borrow<str>` requires: a map keyed by `KeyId` is looked up with a
/// `&str`, and compares inline bytes, not a pointer to follow.
impl std::hash::Hash for KeyId {
    /// What `str::hash` writes (its bytes, then 0xff: `Hasher::write_str` as every hasher
    /// has it on stable Rust), from the bytes: `as_str` would check them as UTF-8 again on
    /// every lookup, ~150 instructions each, several per request.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for KeyId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for KeyId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for KeyId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A generated id (`key_` + 26 base32 characters of 128 bits) in binary; `None` for any other
/// shape, which the table interns as a string instead.
pub fn id_bytes(id: &str) -> Option<[u8; 16]> {
    let body = id.strip_prefix("key_")?.as_bytes();
    if body.len() != 26 {
        return None;
    }
    let mut acc: u128 = 0;
    for (i, &c) in body.iter().enumerate() {
        let v = match c {
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        if i == 25 {
            // The last character carries the 3 low bits, shifted up by 2 (as `new_id` pads).
            if v & 3 != 0 {
                return None;
            }
            acc = (acc << 3) | u128::from(v >> 2);
        } else {
            acc = (acc << 5) | u128::from(v);
        }
    }
    Some(acc.to_be_bytes())
}

/// The id string of a binary id (the inverse of `id_bytes`).
pub fn id_string(bytes: &[u8; 16]) -> String {
    crate::keys::record::format_id("key", bytes)
}

/// Append-only storage of write-once values (interned strings and profiles), shared by
/// every version of the table's inner state that has the chunk.
pub type Chunk<T> = Arc<[OnceLock<T>]>;

pub fn new_chunk<T>() -> Chunk<T> {
    (0..CHUNK).map(|_| OnceLock::new()).collect()
}

/// The value `i` of `chunks`, if written.
pub fn cell<T>(chunks: &[Chunk<T>], i: u32) -> Option<&T> {
    let i = i as usize;
    chunks.get(i / CHUNK)?.get(i % CHUNK)?.get()
}

/// Cells per chunk of the entry slab: as many as fill one huge page (`keys::pages`), so every
/// chunk after the first sits on one.
pub const SLAB_CHUNK: usize = crate::keys::pages::HUGE_PAGE / std::mem::size_of::<Cell>();

/// A chunk of the entry slab (`Cell`s in their own mapping, shared like `Chunk`).
pub type Cells = Arc<crate::keys::pages::CellPage>;

/// Chunk `nth` of a slab: the first on small pages (a small table stays small), the rest on
/// a huge page each.
pub fn new_cells(nth: usize) -> Cells {
    Arc::new(crate::keys::pages::cells(SLAB_CHUNK, nth > 0))
}

/// Where slab slot `i` lives: (chunk, cell in the chunk).
pub fn slab_at(i: usize) -> (usize, usize) {
    (i / SLAB_CHUNK, i % SLAB_CHUNK)
}

/// The cell `i` of `chunks` (written or not: `Cell::read` says).
pub fn slab_cell(chunks: &[Cells], i: u32) -> Option<&Cell> {
    let (chunk, at) = slab_at(i as usize);
    chunks.get(chunk)?.get(at)
}

const EMPTY: u64 = 0;
const TOMB: u64 = 1;
/// The owner field of a slot whose entry's owner number does not fit it (`Index` header).
const NO_OWNER: u32 = (1 << 24) - 1;

/// Open addressing from a 64-bit hash to a slot number, in one of two forms:
///
/// - **By digest** (`DigestIndex`, the request path's): a slot is one atomic word,
///   `tag << 56 | owner << 32 | (n + 2)`, where the tag is 8 bits of the hash and `owner` the
///   entry's owner number (`NO_OWNER` from 2^24 − 1 owners on).
/// - **By id** (`IdIndex`, the control path's): a slot is half a word, two to a word (5
///   bytes per key at 80 % load where a whole word was 10): `tag << bits | (n + 2)`, where
///   `bits` holds any slot number the slab reaches before the writer rebuilds (`fits`) and
///   the tag is as many low bits of the hash as are left (10 at a million keys), so a probe
///   for an id not held reads almost no cells.
///
/// In both, 0 is empty and 1 a removed slot that probes pass over.
///
/// Why the owner is in a digest slot: a lookup reads a slot, then the entry's cell, then its
/// owner's name, and at a million keys each of those is a miss to DRAM (~160 ns on the
/// reference VM). With the owner number in the slot, the owner's name is fetched while the
/// cell is (`Index::find` hands it to the caller before the cell is read): two misses in a
/// row, not three. It is only ever a hint for that early fetch; the entry's own owner field
/// is what a view carries. 8 bits of tag still spare all but 1 in 256 of the cells a probe
/// passes.
#[derive(Debug)]
pub struct Index<const BY_ID: bool> {
    words: crate::keys::pages::Slots,
    len: usize,
    /// By id: the low bits of a slot that hold `n + 2` (the rest hold the tag).
    slot_bits: u32,
}

pub type DigestIndex = Index<false>;
pub type IdIndex = Index<true>;

/// Most slots in use (including removed ones) before the writer rebuilds: 85%.
pub fn index_full(used: usize, cap: usize) -> bool {
    used * 20 >= cap * 17
}

impl<const BY_ID: bool> Index<BY_ID> {
    /// An index for `n` keys at 80% load (and never fewer than 64 slots).
    pub fn for_keys(n: usize) -> Self {
        let len = (n + n / 4).max(64);
        let words = if BY_ID { len.div_ceil(2) } else { len };
        // The slab holds at most live entries (under 85 % of `len`) plus superseded ones
        // (up to half the live ones and a chunk) before the writer rebuilds: twice `len`
        // and a chunk is room for every slot number it reaches (`fits` holds it to that).
        let reach = (2 * len + CHUNK + 2) as u64;
        let slot_bits = (u64::BITS - reach.leading_zeros()).min(32);
        // EMPTY is 0: the zeroed mapping is an empty index.
        Index {
            words: crate::keys::pages::slots(words),
            len,
            slot_bits,
        }
    }

    /// Whether slot number `slot` fits this index (always, by digest; by id, the writer
    /// rebuilds before the slab outgrows it).
    pub fn fits(&self, slot: u32) -> bool {
        !BY_ID || u64::from(slot) + 2 < 1 << self.slot_bits
    }

    /// The bits of a slot that hold `n + 2`.
    fn slot_mask(&self) -> u64 {
        if BY_ID {
            u64::from(u32::MAX) >> (32 - self.slot_bits)
        } else {
            u64::from(u32::MAX)
        }
    }

    /// By id: the tag of `hash` in a slot (the low bits the slot number leaves).
    fn id_tag(&self, hash: u64) -> u64 {
        (hash << self.slot_bits) & u64::from(u32::MAX)
    }

    pub fn capacity(&self) -> usize {
        self.len
    }

    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.len as u128) >> 64) as usize
    }

    /// Slot `at`'s value.
    fn get(&self, at: usize, order: Ordering) -> u64 {
        if BY_ID {
            let w = self.words[at / 2].load(order);
            (w >> (32 * (at % 2))) & u64::from(u32::MAX)
        } else {
            self.words[at].load(order)
        }
    }

    /// Set slot `at` (the one writer: the other half of a shared word is written back as it
    /// was, and a reader sees the word before or after, whole).
    fn put(&self, at: usize, v: u64) {
        if BY_ID {
            let word = &self.words[at / 2];
            let shift = 32 * (at % 2);
            let keep = word.load(Ordering::Relaxed) & !(u64::from(u32::MAX) << shift);
            word.store(keep | (v << shift), Ordering::Release);
        } else {
            self.words[at].store(v, Ordering::Release);
        }
    }

    fn encode(&self, hash: u64, slot: u32, owner: u32) -> u64 {
        debug_assert!(
            self.fits(slot),
            "the writer rebuilds before a slot outgrows its index"
        );
        if BY_ID {
            self.id_tag(hash) | u64::from(slot + 2)
        } else {
            (u64::from(hash as u8) << 56)
                | (u64::from(owner.min(NO_OWNER)) << 32)
                | u64::from(slot + 2)
        }
    }

    /// The positions a probe for `hash` visits, in order: every slot once, from its home.
    fn probes(&self, hash: u64) -> impl Iterator<Item = usize> {
        let (home, n) = (self.home(hash), self.len);
        (home..n).chain(0..home)
    }

    /// The slot position and number of the first entry with `hash` that `is` accepts. `is`
    /// gets the slot number and the entry's owner number, if the slot holds it.
    pub fn find(
        &self,
        hash: u64,
        mut is: impl FnMut(u32, Option<u32>) -> bool,
    ) -> Option<(usize, u32)> {
        let slot_mask = self.slot_mask();
        let (tag, tag_mask) = if BY_ID {
            (self.id_tag(hash), u64::from(u32::MAX) & !slot_mask)
        } else {
            ((hash as u8 as u64) << 56, 0xff << 56)
        };
        for at in self.probes(hash) {
            let s = self.get(at, Ordering::Acquire);
            if s == EMPTY {
                return None;
            }
            if s == TOMB || s & tag_mask != tag {
                continue;
            }
            let slot = ((s & slot_mask) as u32).wrapping_sub(2);
            let owner = ((s >> 32) as u32) & NO_OWNER;
            if is(slot, (!BY_ID && owner != NO_OWNER).then_some(owner)) {
                return Some((at, slot));
            }
        }
        None
    }

    /// Point position `at` (from `find`) at `slot`, whose entry's owner is `owner`.
    pub fn repoint(&self, at: usize, hash: u64, slot: u32, owner: u32) {
        self.put(at, self.encode(hash, slot, owner));
    }

    /// Add `hash` → `slot` (whose entry's owner is `owner`) at the first free position; true
    /// when it took an empty one (the caller counts use for `index_full`).
    pub fn insert(&self, hash: u64, slot: u32, owner: u32) -> bool {
        for at in self.probes(hash) {
            let s = self.get(at, Ordering::Relaxed);
            if s == EMPTY || s == TOMB {
                self.repoint(at, hash, slot, owner);
                return s == EMPTY;
            }
        }
        false
    }

    pub fn remove(&self, at: usize) {
        self.put(at, TOMB);
    }

    /// Every slot number the index points at.
    pub fn targets(&self) -> impl Iterator<Item = u32> + '_ {
        let slot_mask = self.slot_mask();
        (0..self.len).filter_map(move |at| {
            let s = self.get(at, Ordering::Acquire);
            (s != EMPTY && s != TOMB).then(|| ((s & slot_mask) as u32).wrapping_sub(2))
        })
    }
}

/// The hash a digest is indexed by: HMAC output is uniform and not steerable by a caller,
/// so its first 8 bytes are the hash (no SipHash on the request path).
pub fn digest_hash(d: &Digest) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&d.0[..8]);
    u64::from_le_bytes(w)
}

/// The hash an id is indexed by: the binary id's random bytes, or SipHash of an interned id.
pub fn id_hash(id: &str) -> u64 {
    match id_bytes(id) {
        Some(b) => u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        None => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            id.hash(&mut h);
            h.finish()
        }
    }
}

/// A key as the request path sees it: the entry's fields decoded, its profile shared.
/// Made without allocating and without touching a per-key or per-owner reference count (the
/// id and, nearly always, the owner are inline; the profile is one of a few, hot; only a
/// rotated key's lineage is boxed, which keeps the view, and every `AuthError` carrying one,
/// small); cheap to clone. Times as the entry holds them (`Validity`: `revoked_at()`, …).
#[derive(Debug, Clone)]
pub struct KeyView {
    pub id: KeyId,
    /// `None`: the key is its own lineage.
    lineage: Option<Box<KeyId>>,
    pub owner: Name,
    pub profile: Arc<Profile>,
    pub secret_version: u32,
    times: [u32; 4],
    flags: u8,
    pub canary: bool,
    pub publishable: bool,
    pub imported: bool,
}

impl std::ops::Deref for KeyView {
    type Target = Profile;
    fn deref(&self) -> &Profile {
        &self.profile
    }
}

impl Validity for KeyView {
    fn flag_bits(&self) -> u8 {
        self.flags
    }
    fn times(&self) -> [u32; 4] {
        self.times
    }
}

impl KeyView {
    pub fn new(
        e: &Entry,
        id: KeyId,
        lineage: Option<Box<KeyId>>,
        owner: Name,
        profile: Arc<Profile>,
    ) -> Self {
        KeyView {
            id,
            lineage,
            owner,
            profile,
            secret_version: e.secret_version,
            times: e.times(),
            flags: e.flags,
            canary: e.has(CANARY),
            publishable: e.has(PUBLISHABLE),
            imported: e.has(IMPORTED),
        }
    }

    /// The view of a whole record (tests, benches, and tools that hold records).
    pub fn of(r: &KeyRecord) -> KeyView {
        let at = Interned {
            id: [0; 16],
            id_flag: 0,
            lineage: 0,
            owner: 0,
            profile: 0,
        };
        KeyView::new(
            &Entry::new(r, at),
            KeyId::of(&r.id),
            (r.lineage != r.id).then(|| Box::new(KeyId::of(&r.lineage))),
            Name::from(r.owner.as_str()),
            Arc::new(Profile::of(r)),
        )
    }

    /// The id rate-limit buckets and quotas belong to (the first key of a rotation chain).
    pub fn lineage(&self) -> &str {
        self.lineage_id().as_str()
    }

    /// The lineage as an id: what per-lineage state (the rate limiter's buckets) is keyed by.
    pub fn lineage_id(&self) -> &KeyId {
        self.lineage.as_deref().unwrap_or(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::new_id;

    #[test]
    fn generated_ids_are_binary_and_round_trip() {
        for _ in 0..200 {
            let id = new_id("key").unwrap();
            let b = id_bytes(&id).expect("generated ids are binary");
            assert_eq!(id_string(&b), id);
            assert_eq!(KeyId::generated(&b).as_str(), id);
        }
        for other in [
            "key_short",
            "adm_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "key_aaaaaaaaaaaaaaaaaaaaaaaaab",
            "key_AAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(id_bytes(other), None, "{other}");
        }
    }

    fn at(id: [u8; 16], id_flag: u8, lineage: u32, owner: u32, profile: u32) -> Interned {
        Interned {
            id,
            id_flag,
            lineage,
            owner,
            profile,
        }
    }

    #[test]
    fn entry_is_small_and_keeps_what_is_enforced() {
        assert!(std::mem::size_of::<Entry>() <= 96);
        assert_eq!(std::mem::size_of::<Cell>(), 88, "the slab's bytes per key");
        assert!(
            std::mem::size_of::<KeyView>() < 128,
            "AuthError carries one"
        );
        let mut r = crate::keys::record::sample("key_a", Digest([3; 32]));
        r.expires_at = Some(5_000);
        r.revoked_at = Some(0);
        r.canary = true;
        let e = Entry::new(&r, at([0; 16], 0, 0, 0, 7));
        assert_eq!(e.expires_at(), Some(5_000));
        assert_eq!(e.revoked_at(), Some(0), "zero is a time, not absence");
        assert_eq!(e.not_before(), None);
        assert!(e.has(CANARY) && !e.has(PUBLISHABLE));
        assert_eq!(e.state(10), r.state(10));
        r.expires_at = Some(i64::MAX);
        assert_eq!(
            Entry::new(&r, at([0; 16], 0, 0, 0, 7)).expires_at(),
            Some(i64::from(u32::MAX))
        );
    }

    #[test]
    fn key_ids_are_written_inline_as_format_id_writes_them() {
        for _ in 0..200 {
            let id = new_id("key").unwrap();
            let b = id_bytes(&id).unwrap();
            assert_eq!(KeyId::generated(&b).as_str(), id);
            assert_eq!(KeyId::of(&id), KeyId::generated(&b));
        }
        // Each bit alone (every character, and the one across the halves), then patterns.
        let single = (0..128).map(|bit| (1u128 << bit).to_be_bytes());
        for b in single.chain([[0u8; 16], [0xff; 16], [0x55; 16], [0xaa; 16]]) {
            assert_eq!(KeyId::generated(&b).as_str(), id_string(&b));
        }
        assert_eq!(KeyId::of("legacy-1").as_str(), "legacy-1");
        assert_eq!(KeyId::of("legacy-1").to_string(), "legacy-1");
    }

    #[test]
    fn a_key_id_hashes_as_its_text_so_maps_find_it_by_str() {
        use std::hash::BuildHasher;
        let fold = foldhash::fast::RandomState::default();
        let sip = std::collections::hash_map::RandomState::new();
        let ids = [
            new_id("key").unwrap(),
            "legacy-1".to_string(),
            String::new(),
        ];
        for id in &ids {
            let k = KeyId::of(id);
            assert_eq!(fold.hash_one(&k), fold.hash_one(id.as_str()), "{id}");
            assert_eq!(sip.hash_one(&k), sip.hash_one(id.as_str()), "{id}");
        }
        // What the request path relies on: a map keyed by `KeyId`, looked up with `&str`.
        let map = crate::fastmap::new();
        for id in &ids {
            map.insert(KeyId::of(id), id.len());
        }
        for id in &ids {
            assert_eq!(map.get(id.as_str()).map(|v| *v), Some(id.len()));
        }
    }

    #[test]
    fn names_are_inline_when_short_and_shared_when_long() {
        let short = Name::from("customer-123456");
        assert!(matches!(short, Name::Inline { .. }));
        assert_eq!(short.as_str(), "customer-123456");
        let edge = "é".repeat(NAME_INLINE / 2);
        assert!(matches!(Name::from(edge.as_str()), Name::Inline { .. }));
        assert_eq!(Name::from(edge.as_str()).as_str(), edge);
        let long = "an-owner-name-longer-than-the-inline-room";
        assert!(matches!(Name::from(long), Name::Shared(_)));
        assert_eq!(Name::from(long).as_str(), long);
        assert_eq!(Name::from(""), "");
        assert_eq!(
            serde_json::to_string(&short).unwrap(),
            "\"customer-123456\""
        );
    }

    #[test]
    fn a_cell_keeps_the_entry() {
        let mut r = crate::keys::record::sample("key_a", Digest([9; 32]));
        r.rev = (1 << 36) + 5;
        r.not_before = Some(12);
        r.expires_at = Some(99);
        r.canary = true;
        r.digest.0[31] = 0xff;
        r.secret_version = u32::MAX;
        let e = Entry::new(&r, at([5; 16], ID_INTERNED, 3, u32::MAX, 4));
        let c = Cell::default();
        assert_eq!(c.read(), None, "an unwritten cell reads as nothing");
        c.write(&e);
        assert_eq!(c.read(), Some(e));
        r.rev = u64::MAX;
        let e = Entry::new(&r, at([5; 16], 0, 0, 0, 0));
        assert_eq!(e.rev, MAX_REV);
        let c = Cell::default();
        c.write(&e);
        assert_eq!(c.read().map(|e| e.rev), Some(MAX_REV));
    }

    #[test]
    fn a_view_decodes_what_the_entry_holds() {
        let mut r = crate::keys::record::sample("key_a", Digest([9; 32]));
        r.owner = "team-7".into();
        r.lineage = "key_first".into();
        r.expires_at = Some(500);
        r.revoked_at = Some(400);
        r.publishable = true;
        let v = KeyView::of(&r);
        assert_eq!(
            (&*v.id, v.lineage(), &*v.owner),
            ("key_a", "key_first", "team-7")
        );
        assert_eq!(
            (v.expires_at(), v.revoked_at(), v.not_before()),
            (Some(500), Some(400), None)
        );
        assert_eq!(v.created_at(), r.created_at);
        assert!(v.publishable && !v.canary && !v.imported);
        assert_eq!(v.state(450), r.state(450));
        assert_eq!(v.env, r.env);
    }

    #[test]
    fn entry_bytes_round_trip() {
        let mut r = crate::keys::record::sample("key_a", Digest([9; 32]));
        r.rev = 77;
        r.not_before = Some(12);
        r.publishable = true;
        let e = Entry::new(&r, at([5; 16], ID_INTERNED, 3, 9, 4));
        assert_eq!(Entry::from_bytes(&e.to_bytes()), e);
    }

    #[test]
    fn an_id_index_keeps_half_word_slots_apart_and_tags_them() {
        let idx = IdIndex::for_keys(10);
        assert_eq!(idx.capacity(), 64);
        // 64 slots: room for slot numbers up to 2 * 64 + a chunk, in 13 bits; 19 bits of tag.
        let widest = (1 << 13) - 3;
        assert!(idx.fits(widest) && !idx.fits(widest + 1));
        // Hashes whose homes are consecutive positions 0..40, so neighbours share words.
        let home = |at: u64| (at << 58) | 0x5a5a;
        for at in 0..40u64 {
            assert!(idx.insert(home(at), at as u32 * 3, 0));
        }
        for at in 0..40u64 {
            let found = idx.find(home(at), |s, owner| {
                assert_eq!(owner, None, "an id slot holds no owner");
                s == at as u32 * 3
            });
            assert_eq!(found, Some((at as usize, at as u32 * 3)));
        }
        // Writing one slot leaves the other half of its word as it was.
        idx.repoint(6, home(6), widest, 0);
        idx.remove(7);
        assert_eq!(idx.find(home(5), |s, _| s == 15), Some((5, 15)));
        assert_eq!(idx.find(home(6), |s, _| s == widest), Some((6, widest)));
        assert_eq!(idx.find(home(8), |s, _| s == 24), Some((8, 24)));
        assert_eq!(idx.find(home(7), |s, _| s == 21), None);
        assert!(
            !idx.insert(home(7), 77, 0),
            "a removed slot is reused, not an empty one taken"
        );
        assert_eq!(idx.find(home(7), |s, _| s == 77), Some((7, 77)));
        // Same home, other low bits: another tag, so the probe offers none of these slots.
        let mut offered = 0;
        assert_eq!(
            idx.find(home(3) ^ 1, |_, _| {
                offered += 1;
                false
            }),
            None
        );
        assert_eq!(offered, 0, "a tag that differs spares the cell read");
        assert_eq!(idx.targets().count(), 40);
        assert!(idx.targets().any(|s| s == widest));
    }

    #[test]
    fn index_finds_repoints_and_removes() {
        let idx = DigestIndex::for_keys(10);
        let hashes: Vec<u64> = (0..40u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        // Owner numbers: small ones are held in the slot, from NO_OWNER on they are not.
        let owner = |n: usize| {
            if n.is_multiple_of(2) {
                n as u32 * 7
            } else {
                NO_OWNER + n as u32
            }
        };
        for (n, h) in hashes.iter().enumerate() {
            assert!(idx.insert(*h, n as u32, owner(n)));
        }
        for (n, h) in hashes.iter().enumerate() {
            let mut hint = None;
            let found = idx.find(*h, |s, o| {
                hint = o;
                s == n as u32
            });
            assert_eq!(found.map(|x| x.1), Some(n as u32));
            assert_eq!(hint, n.is_multiple_of(2).then(|| owner(n)));
        }
        let (at, _) = idx.find(hashes[3], |s, _| s == 3).unwrap();
        idx.repoint(at, hashes[3], 99, 5);
        assert!(idx
            .find(hashes[3], |s, o| s == 99 && o == Some(5))
            .is_some());
        idx.remove(at);
        assert!(idx.find(hashes[3], |_, _| true).map(|x| x.1) != Some(99));
        assert!(
            idx.find(hashes[4], |s, _| s == 4).is_some(),
            "probes pass removed slots"
        );
        assert_eq!(idx.targets().count(), 39);
    }
}
