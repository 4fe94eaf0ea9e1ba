//! The compact form of a key the gateway enforces, and the storage primitives of the key
//! table (`keys::table`): what makes a million keys cost about a hundred bytes each.
//!
//! - **`Entry`** (88 bytes, `Copy`): the digest, the id in binary (ids are `key_` + 26 base32
//!   characters of 128 random bits; any other id is interned), the revision, the validity
//!   window and revocation as 32-bit Unix seconds, the secret version, flags, and two small
//!   indexes: the key's `Profile` and its lineage (0: the key is its own lineage).
//! - **`Profile`**: owner, env, scopes, plan/rate/quota, allowed networks and origins: what
//!   many keys share, interned once (`Arc`), so a customer's thousand keys hold one copy.
//! - **`Slab`**: append-only chunks of write-once cells. A reader takes no lock: a slot, once
//!   written, never changes. A new version of a key is a new slot (the old one becomes garbage
//!   that the table's rebuild drops), so a reader sees one version whole, never a mix.
//! - **`Index`**: open addressing over atomic 64-bit slots (a 32-bit tag of the hash and the
//!   slot number), sized to the key count, not a power of two. Readers probe with atomic
//!   loads; the one writer (the table's writer lock) stores whole slots.
//!
//! Names, labels, hints, reasons and MACs are not here: the CLI and the control plane read
//! them from the store. Times beyond what 32 bits hold (before 1970 or after 2106) are
//! clamped, which decides the same at any instant between them.

use crate::keys::digest::Digest;
use crate::keys::record::{state_at, KeyRecord, KeyState};
use ipnet::IpNet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Slots per slab chunk: big enough that the chunk list stays short, small enough that the
/// last, partly used chunk costs little.
pub const CHUNK: usize = 4096;

/// What many keys share, interned once per distinct value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub owner: String,
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
            owner: r.owner.clone(),
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
    pub profile: u32,
    pub secret_version: u32,
    pub flags: u8,
}

/// Bytes of one entry in a checkpoint (`store::checkpoint`): fixed offsets, little-endian.
pub const ENTRY_BYTES: usize = 88;

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

impl Entry {
    /// The compact form of `r`, given where its id, lineage and profile were interned.
    pub fn new(r: &KeyRecord, id: [u8; 16], id_flag: u8, lineage: u32, profile: u32) -> Entry {
        let mut flags = id_flag;
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
            id,
            rev: r.rev,
            not_before: opt32(r.not_before, &mut flags, HAS_NOT_BEFORE),
            expires_at: opt32(r.expires_at, &mut flags, HAS_EXPIRES),
            revoked_at: opt32(r.revoked_at, &mut flags, HAS_REVOKED),
            created_at: t32(r.created_at),
            lineage,
            profile,
            secret_version: r.secret_version,
            flags,
        }
    }

    /// The checkpoint form: the fields at fixed offsets, so a load is slicing, not parsing.
    pub fn to_bytes(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[..32].copy_from_slice(&self.digest.0);
        b[32..48].copy_from_slice(&self.id);
        b[48..56].copy_from_slice(&self.rev.to_le_bytes());
        let words = [
            self.not_before,
            self.expires_at,
            self.revoked_at,
            self.created_at,
            self.lineage,
            self.profile,
            self.secret_version,
        ];
        for (i, w) in words.iter().enumerate() {
            b[56 + 4 * i..60 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[84] = self.flags;
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
            rev: u64::from_le_bytes(rev),
            not_before: word(0),
            expires_at: word(1),
            revoked_at: word(2),
            created_at: word(3),
            lineage: word(4),
            profile: word(5),
            secret_version: word(6),
            flags: b[84],
        }
    }
}

/// The revisions a cell holds: 40 bits (a trillion records; a log never gets there). A larger
/// revision is held as this, which only matters past it.
pub const MAX_REV: u64 = (1 << 40) - 1;

/// The flags and 32-bit times of a key version, read the same way from both of its forms
/// (`Entry` in a checkpoint, `Packed` in a slab cell).
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

impl Validity for Packed {
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

/// One key version as a slab cell holds it (see the module header): 88 bytes, so its
/// write-once cell is 96.
#[derive(Debug, Clone)]
pub struct Packed {
    pub digest: Digest,
    pub id: [u8; 16],
    pub profile: Arc<Profile>,
    rev_lo: u32,
    not_before: u32,
    expires_at: u32,
    revoked_at: u32,
    created_at: u32,
    /// As `Entry::lineage`.
    pub lineage: u32,
    pub secret_version: u32,
    rev_hi: u8,
    pub flags: u8,
}

impl Packed {
    /// The cell form of `e`, given the profile its number stands for.
    pub fn new(e: &Entry, profile: Arc<Profile>) -> Packed {
        let rev = e.rev.min(MAX_REV);
        Packed {
            digest: e.digest,
            id: e.id,
            profile,
            rev_lo: rev as u32,
            not_before: e.not_before,
            expires_at: e.expires_at,
            revoked_at: e.revoked_at,
            created_at: e.created_at,
            lineage: e.lineage,
            secret_version: e.secret_version,
            rev_hi: (rev >> 32) as u8,
            flags: e.flags,
        }
    }

    /// The entry form, given the number the table knows the profile by.
    pub fn entry(&self, profile: u32) -> Entry {
        Entry {
            digest: self.digest,
            id: self.id,
            rev: self.rev(),
            not_before: self.not_before,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            created_at: self.created_at,
            lineage: self.lineage,
            profile,
            secret_version: self.secret_version,
            flags: self.flags,
        }
    }

    pub fn rev(&self) -> u64 {
        (u64::from(self.rev_hi) << 32) | u64::from(self.rev_lo)
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

/// Append-only storage of write-once cells, shared by every version of the table's inner
/// state that has the chunk.
pub type Chunk<T> = Arc<[OnceLock<T>]>;

pub fn new_chunk<T>() -> Chunk<T> {
    (0..CHUNK).map(|_| OnceLock::new()).collect()
}

/// The cell `i` of `chunks`, if written.
pub fn cell<T>(chunks: &[Chunk<T>], i: u32) -> Option<&T> {
    let i = i as usize;
    chunks.get(i / CHUNK)?.get(i % CHUNK)?.get()
}

const EMPTY: u64 = 0;
const TOMB: u64 = 1;

/// Open addressing from a 64-bit hash to a slot number. Slots hold `tag << 32 | (n + 2)`;
/// 0 is empty, 1 a removed slot that probes pass over.
#[derive(Debug)]
pub struct Index {
    slots: Box<[AtomicU64]>,
}

/// Most slots in use (including removed ones) before the writer rebuilds: 85%.
pub fn index_full(used: usize, cap: usize) -> bool {
    used * 20 >= cap * 17
}

impl Index {
    /// An index for `n` keys at 80% load (and never fewer than 64 slots).
    pub fn for_keys(n: usize) -> Index {
        let cap = (n + n / 4).max(64);
        Index {
            slots: (0..cap).map(|_| AtomicU64::new(EMPTY)).collect(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    /// The slot position and number of the first entry with `hash` that `is` accepts.
    pub fn find(&self, hash: u64, mut is: impl FnMut(u32) -> bool) -> Option<(usize, u32)> {
        let tag = hash as u32;
        let n = self.slots.len();
        let mut at = self.home(hash);
        for _ in 0..n {
            let s = self.slots[at].load(Ordering::Acquire);
            if s == EMPTY {
                return None;
            }
            if s != TOMB && (s >> 32) as u32 == tag {
                let slot = (s as u32).wrapping_sub(2);
                if is(slot) {
                    return Some((at, slot));
                }
            }
            at += 1;
            if at == n {
                at = 0;
            }
        }
        None
    }

    /// Point position `at` (from `find`) at `slot`.
    pub fn repoint(&self, at: usize, hash: u64, slot: u32) {
        let v = (u64::from(hash as u32) << 32) | u64::from(slot + 2);
        self.slots[at].store(v, Ordering::Release);
    }

    /// Add `hash` → `slot` at the first free position; true when it took an empty one (the
    /// caller counts use for `index_full`).
    pub fn insert(&self, hash: u64, slot: u32) -> bool {
        let n = self.slots.len();
        let mut at = self.home(hash);
        for _ in 0..n {
            let s = self.slots[at].load(Ordering::Relaxed);
            if s == EMPTY || s == TOMB {
                self.repoint(at, hash, slot);
                return s == EMPTY;
            }
            at += 1;
            if at == n {
                at = 0;
            }
        }
        false
    }

    pub fn remove(&self, at: usize) {
        self.slots[at].store(TOMB, Ordering::Release);
    }

    /// Every slot number the index points at.
    pub fn targets(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().filter_map(|s| {
            let s = s.load(Ordering::Acquire);
            (s != EMPTY && s != TOMB).then(|| (s as u32).wrapping_sub(2))
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
/// Made without allocating (the id is inline, `KeyId`; only a rotated key's lineage is boxed,
/// which keeps the view, and every `AuthError` carrying one, small); cheap to clone.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub id: KeyId,
    /// `None`: the key is its own lineage.
    lineage: Option<Box<KeyId>>,
    pub profile: Arc<Profile>,
    pub secret_version: u32,
    pub created_at: i64,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
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

impl KeyView {
    pub fn new(e: &Packed, id: KeyId, lineage: Option<Box<KeyId>>) -> Self {
        KeyView {
            id,
            lineage,
            profile: e.profile.clone(),
            secret_version: e.secret_version,
            created_at: e.created_at(),
            not_before: e.not_before(),
            expires_at: e.expires_at(),
            revoked_at: e.revoked_at(),
            canary: e.has(CANARY),
            publishable: e.has(PUBLISHABLE),
            imported: e.has(IMPORTED),
        }
    }

    /// The view of a whole record (tests, benches, and tools that hold records).
    pub fn of(r: &KeyRecord) -> KeyView {
        KeyView {
            id: KeyId::of(&r.id),
            lineage: (r.lineage != r.id).then(|| Box::new(KeyId::of(&r.lineage))),
            profile: Arc::new(Profile::of(r)),
            secret_version: r.secret_version,
            created_at: r.created_at,
            not_before: r.not_before,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            canary: r.canary,
            publishable: r.publishable,
            imported: r.imported,
        }
    }

    /// The id rate-limit buckets and quotas belong to (the first key of a rotation chain).
    pub fn lineage(&self) -> &str {
        self.lineage.as_deref().unwrap_or(&self.id).as_str()
    }

    pub fn state(&self, now: i64) -> KeyState {
        state_at(
            self.revoked_at,
            self.canary,
            self.expires_at,
            self.not_before,
            now,
        )
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

    #[test]
    fn entry_is_small_and_keeps_what_is_enforced() {
        assert!(std::mem::size_of::<Entry>() <= 88);
        assert!(std::mem::size_of::<Packed>() <= 88);
        assert!(std::mem::size_of::<OnceLock<Packed>>() <= 96);
        assert!(
            std::mem::size_of::<KeyView>() < 128,
            "AuthError carries one"
        );
        let mut r = crate::keys::record::sample("key_a", Digest([3; 32]));
        r.expires_at = Some(5_000);
        r.revoked_at = Some(0);
        r.canary = true;
        let e = Entry::new(&r, [0; 16], 0, 0, 7);
        assert_eq!(e.expires_at(), Some(5_000));
        assert_eq!(e.revoked_at(), Some(0), "zero is a time, not absence");
        assert_eq!(e.not_before(), None);
        assert!(e.has(CANARY) && !e.has(PUBLISHABLE));
        assert_eq!(e.state(10), r.state(10));
        r.expires_at = Some(i64::MAX);
        assert_eq!(
            Entry::new(&r, [0; 16], 0, 0, 7).expires_at(),
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
        for b in [[0u8; 16], [0xff; 16]] {
            assert_eq!(KeyId::generated(&b).as_str(), id_string(&b));
        }
        assert_eq!(KeyId::of("legacy-1").as_str(), "legacy-1");
        assert_eq!(KeyId::of("legacy-1").to_string(), "legacy-1");
    }

    #[test]
    fn packed_keeps_the_entry() {
        let mut r = crate::keys::record::sample("key_a", Digest([9; 32]));
        r.rev = (1 << 36) + 5;
        r.not_before = Some(12);
        r.expires_at = Some(99);
        r.canary = true;
        let e = Entry::new(&r, [5; 16], ID_INTERNED, 3, 4);
        let p = Packed::new(&e, Arc::new(Profile::of(&r)));
        assert_eq!(p.entry(4), e);
        assert_eq!(p.state(50), e.state(50));
        assert_eq!(*p.profile, Profile::of(&r));
        r.rev = u64::MAX;
        let e = Entry::new(&r, [5; 16], 0, 0, 0);
        assert_eq!(Packed::new(&e, p.profile.clone()).rev(), MAX_REV);
    }

    #[test]
    fn entry_bytes_round_trip() {
        let mut r = crate::keys::record::sample("key_a", Digest([9; 32]));
        r.rev = 77;
        r.not_before = Some(12);
        r.publishable = true;
        let e = Entry::new(&r, [5; 16], ID_INTERNED, 3, 4);
        assert_eq!(Entry::from_bytes(&e.to_bytes()), e);
    }

    #[test]
    fn index_finds_repoints_and_removes() {
        let idx = Index::for_keys(10);
        let hashes: Vec<u64> = (0..40u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for (n, h) in hashes.iter().enumerate() {
            assert!(idx.insert(*h, n as u32));
        }
        for (n, h) in hashes.iter().enumerate() {
            assert_eq!(idx.find(*h, |s| s == n as u32).map(|x| x.1), Some(n as u32));
        }
        let (at, _) = idx.find(hashes[3], |s| s == 3).unwrap();
        idx.repoint(at, hashes[3], 99);
        assert!(idx.find(hashes[3], |s| s == 99).is_some());
        idx.remove(at);
        assert!(idx.find(hashes[3], |_| true).map(|x| x.1) != Some(99));
        assert!(
            idx.find(hashes[4], |s| s == 4).is_some(),
            "probes pass removed slots"
        );
        assert_eq!(idx.targets().count(), 39);
    }
}
