//! The in-memory key table: every key the gateway enforces, in compact form
//! (`keys::compact`), by digest and by id.
//!
//! Requests never wait on disk, network or a lock: authentication is one HMAC per configured
//! secret version, one `ArcSwap` load and a probe of atomic index slots. Writers (the sync
//! task applying records; there is one per table in practice) take the writer lock; applying
//! one record is O(1) amortised: a new version is appended to the slab and the index slots are
//! repointed with one atomic store each, so a reader sees the old version or the new one,
//! whole. Growing a slab chunk or an index, or dropping superseded versions once they are a
//! third of the slab, builds a new inner state aside and swaps it in (readers of the old one
//! finish undisturbed). A whole new table (first load, compaction, another log) is built aside
//! and swapped in by the owner (`Gateway::install_table`).
//!
//! Names, labels, hints and MACs are not kept: `get_by_id`, `records` and friends return
//! records rebuilt from what is kept (enough for `sync::apply` and the local copies), and the
//! full record of a key with an open rotation (few) is kept beside the table for the
//! rotation rules.

use crate::keys::compact::{
    cell, digest_hash, id_bytes, id_hash, id_string, index_full, new_cells, new_chunk, slab_at,
    slab_cell, Cells, Chunk, DigestIndex, Entry, IdIndex, Index, Interned, KeyId, KeyView, Name,
    Profile, Validity, CANARY, CHUNK, ID_INTERNED, IMPORTED, MAX_REV, PUBLISHABLE, ROTATION_CLOSED,
    SLAB_CHUNK,
};
use crate::keys::digest::{Digest, Hasher};
use crate::keys::format::{FormatError, KeyFormat, MAX_KEY_LEN};
use crate::keys::record::{KeyRecord, KeyState, Rotation};
use crate::store::seal::LogId;
use arc_swap::{ArcSwap, Guard};
use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// Why a presented key was refused. The caller shows all of these as the same 401; the
/// variant only reaches metrics, logs and the audit log.
#[derive(Debug, Clone, Error)]
pub enum AuthError {
    #[error("key is malformed: {0}")]
    Malformed(FormatError),
    #[error("key is unknown")]
    Unknown,
    #[error("key {} is revoked", .0.id)]
    Revoked(KeyView),
    #[error("key {} is expired", .0.id)]
    Expired(KeyView),
    #[error("key {} is not yet valid", .0.id)]
    NotYetValid(KeyView),
    #[error("canary key {} was used", .0.id)]
    Canary(KeyView),
    /// A short-lived token refused before its parent key decided (`tokens::verifier`).
    #[error("token refused: {0}")]
    Token(TokenRefusal),
}

/// Why a short-lived token was refused on its own account (a refused parent key uses the
/// key's variants). Closed, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenRefusal {
    /// Malformed, bad signature, unknown signing key, wrong algorithm, wrong lineage.
    #[error("invalid")]
    Invalid,
    #[error("expired")]
    Expired,
    /// The route does not accept tokens, or not for this audience.
    #[error("not accepted on this route")]
    NotAccepted,
}

impl AuthError {
    /// Closed label for metrics and audit (`keygate_auth_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "key_malformed",
            AuthError::Unknown => "key_unknown",
            AuthError::Revoked(_) => "key_revoked",
            AuthError::Expired(_) => "key_expired",
            AuthError::NotYetValid(_) => "key_not_yet_valid",
            AuthError::Canary(_) => "key_canary",
            AuthError::Token(TokenRefusal::Invalid) => "token_invalid",
            AuthError::Token(TokenRefusal::Expired) => "token_expired",
            AuthError::Token(TokenRefusal::NotAccepted) => "token_not_accepted",
        }
    }

    /// The key behind the failure, when it was found.
    pub fn record(&self) -> Option<&KeyView> {
        match self {
            AuthError::Malformed(_) | AuthError::Unknown | AuthError::Token(_) => None,
            AuthError::Revoked(r)
            | AuthError::Expired(r)
            | AuthError::NotYetValid(r)
            | AuthError::Canary(r) => Some(r),
        }
    }
}

/// What readers load: the slabs and both indexes, swapped whole when one of them grows.
#[derive(Clone)]
struct Inner {
    entries: Vec<Cells>,
    profiles: Vec<Chunk<Arc<Profile>>>,
    /// Names these profiles (`near_profile`): a number means the same profile for as long as
    /// the store lives (interned, never changed), whichever inner state holds it.
    profile_store: u64,
    /// Owners by number, as the views carry them (inline when short): one dense read.
    owners: Vec<Chunk<Name>>,
    strings: Vec<Chunk<Arc<str>>>,
    by_digest: Arc<DigestIndex>,
    by_id: Arc<IdIndex>,
}

/// A probe met a slot this inner state does not have yet (a writer grew the slab after it
/// was loaded): load again.
struct Stale;

impl Inner {
    fn sized(n: usize) -> Inner {
        static STORES: AtomicU64 = AtomicU64::new(0);
        Inner {
            entries: Vec::with_capacity(n / SLAB_CHUNK + 1),
            profiles: Vec::new(),
            profile_store: STORES.fetch_add(1, Ordering::Relaxed),
            owners: Vec::new(),
            strings: Vec::new(),
            by_digest: Arc::new(DigestIndex::for_keys(n)),
            by_id: Arc::new(IdIndex::for_keys(n)),
        }
    }

    fn entry(&self, slot: u32) -> Option<Entry> {
        slab_cell(&self.entries, slot)?.read()
    }

    /// Place `e` in slot `slot` of a state being built aside (no reader sees it yet), the
    /// slots in order: indexed by digest and by id, and written to its cell (a chunk is added
    /// when the slot starts one).
    fn place(&mut self, slot: usize, e: &Entry) {
        let slot32 = slot as u32;
        self.by_digest
            .insert(digest_hash(&e.digest), slot32, e.owner);
        self.by_id.insert(self.id_hash_of(e), slot32, e.owner);
        let (chunk, at) = slab_at(slot);
        if chunk == self.entries.len() {
            self.entries.push(new_cells(chunk));
        }
        if let Some(c) = self.entries.get(chunk) {
            c[at].write(e);
        }
    }

    fn string(&self, n: u32) -> Option<Arc<str>> {
        cell(&self.strings, n).cloned()
    }

    fn profile(&self, n: u32) -> Option<&Arc<Profile>> {
        cell(&self.profiles, n)
    }

    /// Position in `index`, slot and entry of the first entry under `hash` that `is` accepts.
    /// A slot whose cell cannot be read yet is `Stale`: the caller retries on a newer table.
    fn find_in<const BY_ID: bool>(
        &self,
        index: &Index<BY_ID>,
        hash: u64,
        is: impl Fn(&Entry) -> bool,
    ) -> Result<Option<(usize, u32, Entry)>, Stale> {
        let mut stale = false;
        let found = index.find(hash, |s, owner| {
            if let Some(o) = owner {
                self.fetch_owner(o);
            }
            match self.entry(s) {
                Some(e) => is(&e),
                None => {
                    stale = true;
                    false
                }
            }
        });
        match found.and_then(|(at, s)| Some((at, s, self.entry(s)?))) {
            Some(f) => Ok(Some(f)),
            None if stale => Err(Stale),
            None => Ok(None),
        }
    }

    /// Position in `by_digest`, slot and entry of `d`.
    fn find_digest(&self, d: &Digest) -> Result<Option<(usize, u32, Entry)>, Stale> {
        self.find_in(&self.by_digest, digest_hash(d), |e| e.digest == *d)
    }

    fn id_is(&self, e: &Entry, id: &str, binary: Option<&[u8; 16]>) -> bool {
        match binary {
            Some(b) => !e.has(ID_INTERNED) && e.id == *b,
            None => e.has(ID_INTERNED) && self.id_of(e).as_deref() == Some(id),
        }
    }

    /// Position in `by_id`, slot and entry of `id`.
    fn find_id(&self, id: &str) -> Result<Option<(usize, u32, Entry)>, Stale> {
        let binary = id_bytes(id);
        self.find_in(&self.by_id, id_hash(id), |e| {
            self.id_is(e, id, binary.as_ref())
        })
    }

    fn id_of(&self, e: &Entry) -> Option<Arc<str>> {
        if e.has(ID_INTERNED) {
            self.string(e.interned_id())
        } else {
            Some(id_string(&e.id).into())
        }
    }

    /// The id of `e` as the request path carries it: inline for a generated id.
    fn key_id(&self, e: &Entry) -> Option<KeyId> {
        if e.has(ID_INTERNED) {
            self.id_of(e).map(KeyId::Other)
        } else {
            Some(KeyId::generated(&e.id))
        }
    }

    fn id_hash_of(&self, e: &Entry) -> u64 {
        if e.has(ID_INTERNED) {
            self.id_of(e).map_or(0, |id| id_hash(&id))
        } else {
            e.binary_id_hash()
        }
    }

    /// The owner of `e`, copied (inline when short: no reference count touched).
    fn owner(&self, e: &Entry) -> Option<Name> {
        cell(&self.owners, e.owner).cloned()
    }

    /// Start reading owner `n` from memory while the entry's cell is read (see `Index`): a
    /// load whose result is only kept (`black_box`), so the CPU issues it and goes on to the
    /// cell without waiting; `owner` then finds the name in cache. (A prefetch instruction
    /// would say the same, but needs `unsafe`, which this crate forbids.)
    fn fetch_owner(&self, n: u32) {
        std::hint::black_box(cell(&self.owners, n).is_some());
    }

    fn view(&self, e: &Entry) -> Option<KeyView> {
        let id = self.key_id(e)?;
        let lineage = match e.lineage {
            0 => None,
            n => Some(Box::new(KeyId::shared(self.string(n - 1)?))),
        };
        let owner = self.owner(e)?;
        let profile = near_profile(self.profile_store, e.profile, self.profile(e.profile)?);
        Some(KeyView::new(e, id, lineage, owner, profile))
    }

    /// Every live entry (the ones the digest index points at).
    fn live(&self) -> impl Iterator<Item = Entry> + '_ {
        self.by_digest.targets().filter_map(|s| self.entry(s))
    }
}

/// Profiles a thread keeps copies of (`near_profile`).
const NEAR_PROFILES: usize = 16;

thread_local! {
    /// This thread's own copies of the profiles its views carried, by store and number.
    static NEAR: std::cell::RefCell<Vec<(u64, u32, Arc<Profile>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The profile a view carries: this thread's own copy of `shared`. A million keys share a
/// handful of profiles, so the shared `Arc`'s count is one cache line that every worker
/// wrote twice per request (clone, drop), bouncing between cores; a thread's own copy's
/// count is written by that thread alone. Up to `NEAR_PROFILES` a thread: past that (a
/// platform with many distinct plans and scope sets), copies of another store (a table
/// replaced since) make room, else the view shares `shared` as before.
fn near_profile(store: u64, n: u32, shared: &Arc<Profile>) -> Arc<Profile> {
    NEAR.try_with(|near| {
        let mut near = near.borrow_mut();
        if let Some((_, _, own)) = near.iter().find(|(s, m, _)| *s == store && *m == n) {
            return own.clone();
        }
        if near.len() == NEAR_PROFILES {
            match near.iter().position(|(s, _, _)| *s != store) {
                Some(stale) => {
                    near.swap_remove(stale);
                }
                None => return shared.clone(),
            }
        }
        let own = Arc::new(Profile::clone(shared));
        near.push((store, n, own.clone()));
        own
    })
    // The thread is exiting (its copies are gone): the shared one.
    .unwrap_or_else(|_| shared.clone())
}

/// The writer's bookkeeping (under the writer lock; readers never look at it).
#[derive(Default)]
struct Writer {
    next_entry: u32,
    digest_used: usize,
    id_used: usize,
    /// Slab slots no index points at any more (superseded versions).
    garbage: usize,
    /// The interned values and their numbers, which run from 0 (so the next is the length).
    profiles: HashMap<Arc<Profile>, u32>,
    strings: HashMap<Arc<str>, u32>,
    owners: OwnerNumbers,
}

/// The writer's owner numbers by name, without a second copy of each name: numbers hashed
/// by the name the owner slab holds for each. A `HashMap<Name, u32>` kept every name twice
/// (3.6 bytes a key at a million keys, one owner per ten keys).
#[derive(Default)]
struct OwnerNumbers {
    numbers: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl OwnerNumbers {
    fn len(&self) -> usize {
        self.numbers.len()
    }

    /// The number of `name`, given the owners by number.
    fn get(&self, name: &str, owners: &[Chunk<Name>]) -> Option<u32> {
        let named = |n: &u32| cell(owners, *n).is_some_and(|o| o.as_str() == name);
        self.numbers
            .find(self.hasher.hash_one(name), named)
            .copied()
    }

    /// Number `name` `n` (the owners by number already hold it at `n`).
    fn insert(&mut self, name: &str, n: u32, owners: &[Chunk<Name>]) {
        let hasher = &self.hasher;
        let rehash = |m: &u32| cell(owners, *m).map_or(0, |o| hasher.hash_one(o.as_str()));
        self.numbers.insert_unique(hasher.hash_one(name), n, rehash);
    }
}

/// Write `values` into new chunks after `chunks` (a table being built from its parts:
/// strings, owners, profiles), each `number`ed from 0 as it is written.
fn fill<T: Clone>(
    chunks: &mut Vec<Chunk<T>>,
    values: impl Iterator<Item = T>,
    mut number: impl FnMut(T, u32),
) {
    for (i, value) in values.enumerate() {
        if i % CHUNK == 0 {
            chunks.push(new_chunk());
        }
        if let Some(c) = chunks.last() {
            let _ = c[i % CHUNK].set(value.clone());
        }
        number(value, i as u32);
    }
}

/// `fill`, numbered in `numbers`; the count of distinct values.
fn fill_numbered<T: Clone + Eq + std::hash::Hash>(
    chunks: &mut Vec<Chunk<T>>,
    numbers: &mut HashMap<T, u32>,
    values: impl ExactSizeIterator<Item = T>,
) -> u32 {
    numbers.reserve(values.len());
    fill(chunks, values, |value, n| {
        numbers.insert(value, n);
    });
    numbers.len() as u32
}

pub struct KeyTable {
    inner: ArcSwap<Inner>,
    writer: Mutex<Writer>,
    /// Full records of keys with an open rotation (the rotation rules need its details).
    rotations: Mutex<HashMap<String, Arc<KeyRecord>>>,
    live: AtomicUsize,
    /// The log whose revisions `rev` counts; fixed for the table's life (a new log means a new
    /// table, built aside by `sync::apply`).
    log: LogId,
    rev: AtomicU64,
    /// Imported keys are not in our format; while there are none, a key that does not claim
    /// our prefix is rejected without an HMAC.
    imported: AtomicUsize,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable")
            .field("log", &self.log)
            .field("rev", &self.revision())
            .field("keys", &self.len())
            .finish()
    }
}

impl Default for KeyTable {
    fn default() -> KeyTable {
        KeyTable::sized(LogId::default(), 0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a closed rotation is rebuilt as: `rotation::event` only asks whether one was open.
fn closed_rotation() -> Rotation {
    Rotation {
        started_at: 0,
        prior_expires_at: None,
        complete_when_idle_secs: None,
        requests_at_start: 0,
        completed_at: Some(0),
    }
}

/// What a checkpoint stores besides the entries (`KeyTable::each_part`), numbered as the
/// entries refer to them.
pub struct Parts<'a> {
    pub strings: &'a [Arc<str>],
    pub owners: &'a [Name],
    pub profiles: &'a [Arc<Profile>],
    pub rotations: &'a [KeyRecord],
    /// How many entries follow.
    pub entries: usize,
}

/// A record with nothing in it, for `KeyTable::fill` to write into.
fn blank() -> KeyRecord {
    KeyRecord {
        rev: 0,
        id: String::new(),
        digest: Digest([0; 32]),
        secret_version: 0,
        name: String::new(),
        owner: String::new(),
        env: String::new(),
        scopes: Vec::new(),
        plan: None,
        rate: None,
        quota: None,
        allow_ips: Vec::new(),
        allow_origins: Vec::new(),
        labels: Default::default(),
        hint: String::new(),
        created_at: 0,
        written_at_ms: 0,
        not_before: None,
        expires_at: None,
        revoked_at: None,
        revoked_reason: None,
        canary: false,
        publishable: false,
        imported: false,
        rotated_from: None,
        rotated_to: None,
        rotation: None,
        lineage: String::new(),
        mac: None,
    }
}

fn rotation_open(r: &KeyRecord) -> bool {
    r.rotation
        .as_ref()
        .is_some_and(|x| x.completed_at.is_none())
}

impl KeyTable {
    pub fn new() -> KeyTable {
        KeyTable::default()
    }

    /// An empty table positioned in `log`.
    pub fn for_log(log: LogId) -> KeyTable {
        KeyTable::sized(log, 0)
    }

    /// An empty table positioned in `log`, with room for `n` keys (a whole-table load).
    pub fn sized(log: LogId, n: usize) -> KeyTable {
        KeyTable {
            inner: ArcSwap::from_pointee(Inner::sized(n)),
            writer: Mutex::new(Writer::default()),
            rotations: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            log,
            rev: AtomicU64::new(0),
            imported: AtomicUsize::new(0),
        }
    }

    /// Build a table from records in revision order (the latest version of an id wins).
    /// Mechanism only: sources go through `sync::apply`, which holds the rules.
    pub fn from_records(
        records: impl IntoIterator<Item = KeyRecord>,
        log: LogId,
        rev: u64,
    ) -> KeyTable {
        let records = records.into_iter();
        let table = KeyTable::sized(log, records.size_hint().0);
        for r in records {
            table.apply(r);
        }
        table.rev.fetch_max(rev, Ordering::Relaxed);
        table
    }

    /// The current inner state, loaded again if a probe met a slot it does not have yet.
    fn probe<T>(&self, f: impl Fn(&Inner) -> Result<T, Stale>) -> Option<(Guard<Arc<Inner>>, T)> {
        let inner = self.inner.load();
        match f(&inner) {
            Ok(t) => Some((inner, t)),
            Err(Stale) => {
                drop(inner);
                let inner = self.inner.load();
                let t = f(&inner).ok()?;
                Some((inner, t))
            }
        }
    }

    /// What `make` builds from the entry `find` picks (a view, a record). `make` answers
    /// `None` only when this state lacks an owner, profile or string the entry names: the
    /// writer interned it into a chunk added after this state was loaded, then published the
    /// entry. That is `Stale`: the state is loaded again, never "unknown" for a valid key.
    fn found<T>(
        &self,
        find: impl Fn(&Inner) -> Result<Option<(usize, u32, Entry)>, Stale>,
        make: impl Fn(&Inner, &Entry) -> Option<T>,
    ) -> Option<T> {
        let (_, found) = self.probe(|i| match find(i)? {
            Some((_, _, e)) => make(i, &e).ok_or(Stale).map(Some),
            None => Ok(None),
        })?;
        found
    }

    /// The number of `key` among `numbers`, interned on first sight: the next number (one
    /// past the last, so the count is the map's length), its value (`make`) written to the
    /// slab `get` picks out of the inner state.
    fn intern<T, Q>(
        &self,
        numbers: &mut HashMap<T, u32>,
        get: fn(&Inner) -> &Vec<Chunk<T>>,
        get_mut: fn(&mut Inner) -> &mut Vec<Chunk<T>>,
        key: &Q,
        make: impl FnOnce(&Q) -> T,
    ) -> u32
    where
        T: Clone + Eq + std::hash::Hash + std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        if let Some(n) = numbers.get(key) {
            return *n;
        }
        let n = numbers.len() as u32;
        let value = make(key);
        self.push(get, get_mut, n, value.clone());
        numbers.insert(value, n);
        n
    }

    fn intern_string(&self, w: &mut Writer, s: &str) -> u32 {
        self.intern(
            &mut w.strings,
            |i| &i.strings,
            |i| &mut i.strings,
            s,
            |s| Arc::from(s),
        )
    }

    fn intern_owner(&self, w: &mut Writer, s: &str) -> u32 {
        if let Some(n) = w.owners.get(s, &self.inner.load().owners) {
            return n;
        }
        let n = w.owners.len() as u32;
        self.push(|i| &i.owners, |i| &mut i.owners, n, Name::from(s));
        w.owners.insert(s, n, &self.inner.load().owners);
        n
    }

    /// The number of `p`, interned (the entry's and the checkpoint's reference to it).
    fn intern_profile(&self, w: &mut Writer, p: Profile) -> u32 {
        self.intern(
            &mut w.profiles,
            |i| &i.profiles,
            |i| &mut i.profiles,
            &p,
            |p| Arc::new(p.clone()),
        )
    }

    /// Write slab cell `n`, adding a chunk (a new inner state) when it is full.
    fn push_entry(&self, n: u32, e: &Entry) {
        let (chunk, at) = slab_at(n as usize);
        let mut inner = self.inner.load_full();
        if chunk >= inner.entries.len() {
            let mut next = (*inner).clone();
            next.entries.push(new_cells(chunk));
            inner = Arc::new(next);
            self.inner.store(inner.clone());
        }
        if let Some(c) = inner.entries.get(chunk) {
            // Each cell is written once, by the one writer, before any index points at it.
            c[at].write(e);
        }
    }

    /// Write cell `n` of one slab, adding a chunk (a new inner state) when it is full.
    fn push<T>(
        &self,
        get: fn(&Inner) -> &Vec<Chunk<T>>,
        get_mut: fn(&mut Inner) -> &mut Vec<Chunk<T>>,
        n: u32,
        value: T,
    ) {
        let (chunk, at) = (n as usize / CHUNK, n as usize % CHUNK);
        let mut inner = self.inner.load_full();
        if chunk >= get(&inner).len() {
            let mut next = (*inner).clone();
            get_mut(&mut next).push(new_chunk());
            inner = Arc::new(next);
            self.inner.store(inner.clone());
        }
        if let Some(c) = get(&inner).get(chunk) {
            // Each cell is written once, by the one writer, before any index points at it.
            let _ = c[at].set(value);
        }
    }

    /// Apply one record version. Older or equal revisions of an id already applied are
    /// ignored, so replays are harmless. Returns whether it changed the table.
    pub fn apply(&self, record: KeyRecord) -> bool {
        let rev = record.rev;
        let changed = self.apply_keeping_revision(record);
        if changed {
            self.rev.fetch_max(rev, Ordering::Release);
        }
        changed
    }

    /// [`KeyTable::apply`] without moving the table's revision, for a version that is no
    /// place in the log the table follows: a revocation this node obeys from a whole table it
    /// refused (`sync::apply::revocations_of_refused`) is numbered after the version held, and
    /// the table's revision says which record of its log comes next: moved past the log's own,
    /// the log's next record would be skipped as a replay. Also for a whole table whose source
    /// states its revision (`sync::apply::snapshot`), which sets it with [`KeyTable::advance`].
    pub fn apply_keeping_revision(&self, record: KeyRecord) -> bool {
        let mut w = lock(&self.writer);
        // Position, slot, revision, digest and flags of the version held.
        let held = self
            .probe(|i| {
                Ok(i.find_id(&record.id)?
                    .map(|(at, s, e)| (at, s, e.rev, e.digest, e.flags)))
            })
            .and_then(|(_, f)| f);
        if held.is_some_and(|(_, _, rev, _, _)| rev >= record.rev.min(MAX_REV)) {
            return false;
        }
        let (id, id_flag) = match id_bytes(&record.id) {
            Some(b) => (b, 0),
            None => {
                let n = self.intern_string(&mut w, &record.id);
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&n.to_le_bytes());
                (b, ID_INTERNED)
            }
        };
        let lineage = if record.lineage == record.id {
            0
        } else {
            self.intern_string(&mut w, &record.lineage) + 1
        };
        let owner = self.intern_owner(&mut w, &record.owner);
        let profile = self.intern_profile(&mut w, Profile::of(&record));
        let entry = Entry::new(
            &record,
            Interned {
                id,
                id_flag,
                lineage,
                owner,
                profile,
            },
        );
        let (digest, id_hash) = (entry.digest, self.inner.load().id_hash_of(&entry));
        let slot = w.next_entry;
        self.push_entry(slot, &entry);
        w.next_entry += 1;
        let inner = self.inner.load_full();
        if let Some((at, old_slot, _, old_digest, old_flags)) = held {
            // The old version becomes garbage; its digest leaves the index if it changed (and
            // still points at this key: another id may have taken the digest since).
            w.garbage += 1;
            if old_digest != digest {
                if let Ok(Some((dat, _, _))) = inner
                    .find_digest(&old_digest)
                    .map(|f| f.filter(|(_, s, _)| *s == old_slot))
                {
                    inner.by_digest.remove(dat);
                    self.live.fetch_sub(1, Ordering::Relaxed);
                }
            }
            inner.by_id.repoint(at, id_hash, slot, entry.owner);
            if old_flags & IMPORTED != 0 {
                self.imported.fetch_sub(1, Ordering::Relaxed);
            }
        } else if inner.by_id.insert(id_hash, slot, entry.owner) {
            w.id_used += 1;
        }
        match inner.find_digest(&digest) {
            Ok(Some((at, s, _))) if s != slot => {
                inner
                    .by_digest
                    .repoint(at, digest_hash(&digest), slot, entry.owner);
                if held.is_none_or(|(_, _, _, old_digest, _)| old_digest != digest) {
                    // Another id held this digest: its entry is no longer reachable by it.
                    w.garbage += 1;
                }
            }
            _ => {
                if inner
                    .by_digest
                    .insert(digest_hash(&digest), slot, entry.owner)
                {
                    w.digest_used += 1;
                }
                self.live.fetch_add(1, Ordering::Relaxed);
            }
        }
        if record.imported {
            self.imported.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut rot = lock(&self.rotations);
            if rotation_open(&record) {
                rot.insert(record.id.clone(), Arc::new(record));
            } else {
                rot.remove(&record.id);
            }
        }
        self.maybe_rebuild(&mut w);
        true
    }

    /// Drop superseded versions and regrow the indexes when they are due (amortised O(1):
    /// each rebuild is paid for by the applies since the last one).
    fn maybe_rebuild(&self, w: &mut Writer) {
        let inner = self.inner.load_full();
        let live = self.live.load(Ordering::Relaxed);
        let due = w.garbage > live / 2 + CHUNK
            || index_full(w.digest_used, inner.by_digest.capacity())
            || index_full(w.id_used, inner.by_id.capacity())
            || !inner.by_id.fits(w.next_entry);
        if !due {
            return;
        }
        let entries: Vec<Entry> = inner.live().collect();
        let n = entries.len();
        let room = n + n / 2 + 64;
        let mut next = Inner {
            entries: Vec::with_capacity(n / SLAB_CHUNK + 1),
            profiles: inner.profiles.clone(),
            profile_store: inner.profile_store,
            owners: inner.owners.clone(),
            strings: inner.strings.clone(),
            by_digest: Arc::new(DigestIndex::for_keys(room)),
            by_id: Arc::new(IdIndex::for_keys(room)),
        };
        for (slot, e) in entries.iter().enumerate() {
            next.place(slot, e);
        }
        self.inner.store(Arc::new(next));
        w.next_entry = n as u32;
        w.garbage = 0;
        w.digest_used = n;
        w.id_used = n;
        self.live.store(n, Ordering::Relaxed);
    }

    /// What a checkpoint stores (`store::checkpoint`), written into `out`: `head` gets the
    /// interned strings, owners and profiles in number order, the full records of open
    /// rotations and the entry count; then `entry` gets every live entry. Under the writer lock, so the
    /// entries name only strings and profiles `head` was given.
    pub fn each_part<S>(
        &self,
        out: &mut S,
        head: impl FnOnce(&mut S, Parts<'_>),
        mut entry: impl FnMut(&mut S, &Entry),
    ) {
        let w = lock(&self.writer);
        let inner = self.inner.load();
        let strings: Vec<Arc<str>> = (0..w.strings.len() as u32)
            .filter_map(|n| inner.string(n))
            .collect();
        let owners: Vec<Name> = (0..w.owners.len() as u32)
            .filter_map(|n| cell(&inner.owners, n).cloned())
            .collect();
        let profiles: Vec<Arc<Profile>> = (0..w.profiles.len() as u32)
            .filter_map(|n| inner.profile(n).cloned())
            .collect();
        let rotations: Vec<KeyRecord> = lock(&self.rotations)
            .values()
            .map(|r| (**r).clone())
            .collect();
        let parts = Parts {
            strings: &strings,
            owners: &owners,
            profiles: &profiles,
            rotations: &rotations,
            entries: self.len(),
        };
        head(out, parts);
        for e in inner.live() {
            entry(out, &e);
        }
        drop(w);
    }

    /// Call `f` with every live entry (counts by secret version and state, without a record)
    /// and a way to its id, formatted only when asked for.
    pub fn each_entry(&self, mut f: impl FnMut(&Entry, &dyn Fn() -> Option<String>)) {
        let inner = self.inner.load();
        for e in inner.live() {
            f(&e, &|| inner.id_of(&e).map(|id| id.to_string()));
        }
    }

    /// A table from a checkpoint's parts, without a record in sight. Refuses entries that
    /// point past the strings or profiles given (a checkpoint from another build). One pass
    /// over the entries: each is written to its cell and indexed, nothing hashed but the
    /// interned strings and profiles (few per key).
    pub fn from_parts(
        log: LogId,
        rev: u64,
        strings: Vec<Arc<str>>,
        owners: Vec<&str>,
        profiles: Vec<Profile>,
        rotations: Vec<KeyRecord>,
        entries: impl ExactSizeIterator<Item = Entry>,
    ) -> Result<KeyTable, String> {
        let n = entries.len();
        let table = KeyTable::sized(log, 0);
        let mut w = lock(&table.writer);
        let mut next = Inner::sized(n);
        let strings = fill_numbered(&mut next.strings, &mut w.strings, strings.into_iter());
        fill(
            &mut next.owners,
            owners.iter().map(|o| Name::from(*o)),
            |_, _| (),
        );
        for (n, o) in owners.iter().enumerate() {
            w.owners.insert(o, n as u32, &next.owners);
        }
        let owners = owners.len() as u32;
        let profiles = fill_numbered(
            &mut next.profiles,
            &mut w.profiles,
            profiles.into_iter().map(|mut value| {
                // Parsed lists may hold spare capacity; these live as long as the table.
                value.scopes.shrink_to_fit();
                value.allow_ips.shrink_to_fit();
                value.allow_origins.shrink_to_fit();
                Arc::new(value)
            }),
        );
        let mut imported = 0;
        for (slot, e) in entries.enumerate() {
            let past = e.profile >= profiles
                || e.owner >= owners
                || e.lineage > strings
                || (e.has(ID_INTERNED) && e.interned_id() >= strings);
            if past {
                return Err(format!("entry {slot} refers past the interned values"));
            }
            imported += usize::from(e.has(IMPORTED));
            next.place(slot, &e);
        }
        w.next_entry = n as u32;
        w.digest_used = n;
        w.id_used = n;
        drop(w);
        table.inner.store(Arc::new(next));
        table.live.store(n, Ordering::Relaxed);
        table.imported.store(imported, Ordering::Relaxed);
        *lock(&table.rotations) = rotations
            .into_iter()
            .map(|r| (r.id.clone(), Arc::new(r)))
            .collect();
        table.rev.store(rev, Ordering::Release);
        Ok(table)
    }

    /// Raise the table's revision without a record (e.g. a compaction meta line).
    pub fn advance(&self, rev: u64) {
        self.rev.fetch_max(rev, Ordering::Release);
    }

    pub fn revision(&self) -> u64 {
        self.rev.load(Ordering::Acquire)
    }

    pub fn log(&self) -> LogId {
        self.log
    }

    /// The record of `e` as far as the table keeps it (see the module header).
    fn rebuilt(
        &self,
        inner: &Inner,
        e: &Entry,
        rotations: &HashMap<String, Arc<KeyRecord>>,
    ) -> Option<KeyRecord> {
        let mut r = blank();
        self.fill(inner, e, rotations, &mut r).then_some(r)
    }

    /// Write the record of `e` into `out`, reusing its allocations (a pass over every key
    /// allocates almost nothing). False when `e` names a string this state lacks.
    fn fill(
        &self,
        inner: &Inner,
        e: &Entry,
        rotations: &HashMap<String, Arc<KeyRecord>>,
        out: &mut KeyRecord,
    ) -> bool {
        let Some(v) = inner.view(e) else {
            return false;
        };
        if let Some(full) = rotations
            .get(&*v.id)
            .filter(|r| r.rev.min(MAX_REV) == e.rev)
        {
            out.clone_from(full);
            return true;
        }
        let p = &v.profile;
        // Every field named (no `..`): a field added to the record must be decided here.
        let KeyRecord {
            rev,
            id,
            digest,
            secret_version,
            name,
            owner,
            env,
            scopes,
            plan,
            rate,
            quota,
            allow_ips,
            allow_origins,
            labels,
            hint,
            created_at,
            written_at_ms,
            not_before,
            expires_at,
            revoked_at,
            revoked_reason,
            canary,
            publishable,
            imported,
            rotated_from,
            rotated_to,
            rotation,
            lineage,
            mac,
        } = out;
        *rev = e.rev;
        id.clear();
        id.push_str(&v.id);
        *digest = e.digest;
        *secret_version = e.secret_version;
        name.clear();
        owner.clear();
        owner.push_str(&v.owner);
        env.clone_from(&p.env);
        scopes.clone_from(&p.scopes);
        plan.clone_from(&p.plan);
        rate.clone_from(&p.rate);
        quota.clone_from(&p.quota);
        allow_ips.clone_from(&p.allow_ips);
        allow_origins.clone_from(&p.allow_origins);
        labels.clear();
        hint.clear();
        *created_at = e.created_at();
        *written_at_ms = 0;
        *not_before = e.not_before();
        *expires_at = e.expires_at();
        *revoked_at = e.revoked_at();
        *revoked_reason = None;
        *canary = e.has(CANARY);
        *publishable = e.has(PUBLISHABLE);
        *imported = e.has(IMPORTED);
        *rotated_from = None;
        *rotated_to = None;
        *rotation = e.has(ROTATION_CLOSED).then(closed_rotation);
        lineage.clear();
        lineage.push_str(v.lineage());
        *mac = None;
        true
    }

    pub fn get_by_digest(&self, digest: &Digest) -> Option<Arc<KeyRecord>> {
        let rotations = lock(&self.rotations);
        self.found(
            |i| i.find_digest(digest),
            |i, e| self.rebuilt(i, e, &rotations),
        )
        .map(Arc::new)
    }

    pub fn get_by_id(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let rotations = lock(&self.rotations);
        self.found(|i| i.find_id(id), |i, e| self.rebuilt(i, e, &rotations))
            .map(Arc::new)
    }

    /// The versions held of the keys `ids` names (ids not held are left out), as records to
    /// write elsewhere (a gateway's local copy).
    pub fn versions_of(&self, ids: &[String]) -> Vec<KeyRecord> {
        ids.iter()
            .filter_map(|id| self.get_by_id(id).map(|r| (*r).clone()))
            .collect()
    }

    /// The request path's view of the key with `id`.
    pub fn view_by_id(&self, id: &str) -> Option<KeyView> {
        self.found(|i| i.find_id(id), Inner::view)
    }

    /// Every revoked record (carried into a new table so revocations survive a new log).
    pub fn revoked(&self) -> Vec<Arc<KeyRecord>> {
        let inner = self.inner.load();
        let rotations = lock(&self.rotations);
        inner
            .live()
            .filter(|e| e.revoked_at().is_some())
            .filter_map(|e| self.rebuilt(&inner, &e, &rotations).map(Arc::new))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Call `f` with every key's record, rebuilt one at a time (whole counts at load, such as
    /// the key gauges': a million keys never become a million records in memory at once).
    pub fn each_record(&self, mut f: impl FnMut(&KeyRecord)) {
        let inner = self.inner.load();
        // A copy of the few open rotations, so applies do not wait for the whole pass.
        let rotations = lock(&self.rotations).clone();
        let mut scratch = blank();
        for e in inner.live() {
            if self.fill(&inner, &e, &rotations, &mut scratch) {
                f(&scratch);
            }
        }
    }

    /// Group the keys by `key` (given each one's entry and id) and call `f` once per group
    /// with the record of one of them and the group's size: a whole count where most keys
    /// count alike (the key gauges at load) rebuilds a record per group, not per key.
    pub fn each_group<K: std::hash::Hash + Eq>(
        &self,
        key: impl Fn(&Entry, &str) -> K,
        mut f: impl FnMut(&KeyRecord, u64),
    ) {
        let inner = self.inner.load();
        let rotations = lock(&self.rotations).clone();
        let mut groups: HashMap<K, (Entry, u64)> = HashMap::new();
        for e in inner.live() {
            if let Some(id) = inner.key_id(&e) {
                groups.entry(key(&e, &id)).or_insert((e, 0)).1 += 1;
            }
        }
        let mut scratch = blank();
        for (e, n) in groups.into_values() {
            if self.fill(&inner, &e, &rotations, &mut scratch) {
                f(&scratch, n);
            }
        }
    }

    /// Every record, rebuilt (for reports and local copies; not for the request path).
    pub fn records(&self) -> Vec<Arc<KeyRecord>> {
        let inner = self.inner.load();
        let rotations = lock(&self.rotations);
        inner
            .live()
            .filter_map(|e| self.rebuilt(&inner, &e, &rotations).map(Arc::new))
            .collect()
    }

    /// Call `f` with every key's view (gauges; no record is rebuilt).
    pub fn for_each_view(&self, mut f: impl FnMut(&KeyView)) {
        let inner = self.inner.load();
        for e in inner.live() {
            if let Some(v) = inner.view(&e) {
                f(&v);
            }
        }
    }

    /// Full records of keys with an open rotation (the rotation rules' input).
    pub fn open_rotations(&self) -> Vec<Arc<KeyRecord>> {
        lock(&self.rotations).values().cloned().collect()
    }

    /// Count by (state, env) at `now`.
    pub fn count_states(&self, now: i64) -> std::collections::BTreeMap<(KeyState, String), u64> {
        let mut out = std::collections::BTreeMap::new();
        let inner = self.inner.load();
        for e in inner.live() {
            let env = inner.profile(e.profile).map(|p| p.env.clone());
            *out.entry((e.state(now), env.unwrap_or_default()))
                .or_insert(0) += 1;
        }
        out
    }

    /// Authenticate a presented key at `now` (Unix seconds). `leeway` loosens expiry and
    /// not-before for clock skew; zero means exact.
    pub fn authenticate(
        &self,
        key: &str,
        format: &KeyFormat,
        hasher: &Hasher,
        now: i64,
        leeway: i64,
    ) -> Result<KeyView, AuthError> {
        if key.len() > MAX_KEY_LEN {
            return Err(AuthError::Malformed(FormatError::TooLong));
        }
        if format.claims(key) {
            format.parse(key).map_err(AuthError::Malformed)?;
        } else if self.imported.load(Ordering::Relaxed) == 0 {
            return Err(AuthError::Malformed(FormatError::WrongPrefix));
        }
        let record = hasher
            .all_digests(key)
            .find_map(|(version, d)| {
                self.found(
                    |i| {
                        Ok(i.find_digest(&d)?
                            .filter(|(_, _, e)| e.secret_version == version))
                    },
                    Inner::view,
                )
            })
            .ok_or(AuthError::Unknown)?;
        live(record, now, leeway)
    }
}

/// A found key at `now`, or why it is refused: the gateway's decision for a presented key,
/// and for the parent of a token it presents (`tokens::verifier`). `leeway` loosens expiry
/// and not-before for clock skew; a revocation has none (`record::is_revoked`).
pub fn live(record: KeyView, now: i64, leeway: i64) -> Result<KeyView, AuthError> {
    // Canary before revoked: a revoked canary must still alarm (revoking one, e.g. by a
    // mass revoke, would otherwise disarm it silently). Both answer the same 401.
    if record.canary {
        Err(AuthError::Canary(record))
    } else if crate::keys::record::is_revoked(record.revoked_at()) {
        Err(AuthError::Revoked(record))
    } else if record.expires_at().is_some_and(|t| t + leeway <= now) {
        Err(AuthError::Expired(record))
    } else if record.not_before().is_some_and(|t| t - leeway > now) {
        Err(AuthError::NotYetValid(record))
    } else {
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::record::sample;

    struct Fixture {
        table: KeyTable,
        format: KeyFormat,
        hasher: Hasher,
    }

    fn fixture() -> Fixture {
        Fixture {
            table: KeyTable::new(),
            format: KeyFormat::new("kg", &["live".into(), "test".into()]),
            hasher: Hasher::new(vec![(1, vec![7; 32])]),
        }
    }

    impl Fixture {
        fn add(&self, id: &str, rev: u64, edit: impl FnOnce(&mut KeyRecord)) -> String {
            let key = self.format.generate("live").unwrap();
            let (v, d) = self.hasher.digest(&key);
            let mut r = sample(id, d);
            r.secret_version = v;
            r.rev = rev;
            edit(&mut r);
            self.table.apply(r);
            key
        }
        fn auth(&self, key: &str, now: i64) -> Result<KeyView, AuthError> {
            self.table
                .authenticate(key, &self.format, &self.hasher, now, 0)
        }
    }

    #[test]
    fn authenticate_covers_every_state() {
        let f = fixture();
        let ok = f.add("key_ok", 1, |_| {});
        let revoked = f.add("key_rev", 2, |r| r.revoked_at = Some(100));
        let expired = f.add("key_exp", 3, |r| r.expires_at = Some(100));
        let pending = f.add("key_nb", 4, |r| r.not_before = Some(300));
        let canary = f.add("key_can", 5, |r| r.canary = true);
        let unknown = f.format.generate("live").unwrap();
        let reason = |k: &str, now| f.auth(k, now).err().map(|e| e.reason());
        assert_eq!(&*f.auth(&ok, 200).unwrap().id, "key_ok");
        assert_eq!(reason(&revoked, 200), Some("key_revoked"));
        assert_eq!(
            reason(&revoked, 50),
            Some("key_revoked"),
            "a revocation holds from when it is held, even stamped by a clock 50 s ahead"
        );
        assert_eq!(
            reason(&expired, 100),
            Some("key_expired"),
            "expiry is exact"
        );
        assert_eq!(reason(&expired, 99), None);
        assert_eq!(reason(&pending, 299), Some("key_not_yet_valid"));
        assert_eq!(reason(&pending, 300), None);
        assert_eq!(reason(&canary, 200), Some("key_canary"));
        let revoked_canary = f.add("key_rcan", 6, |r| {
            r.canary = true;
            r.revoked_at = Some(100);
        });
        assert_eq!(
            reason(&revoked_canary, 200),
            Some("key_canary"),
            "a revoked canary still alarms"
        );
        assert_eq!(reason(&unknown, 200), Some("key_unknown"));
        assert_eq!(reason("kg_live_short", 200), Some("key_malformed"));
        assert_eq!(
            reason("legacy-imported-key", 200),
            Some("key_malformed"),
            "no imports: no HMAC"
        );
        assert_eq!(reason(&"x".repeat(10_000), 200), Some("key_malformed"));
        assert_eq!(
            f.table
                .authenticate(&expired, &f.format, &f.hasher, 105, 10)
                .unwrap()
                .id
                .to_string(),
            "key_exp"
        );
    }

    #[test]
    fn imported_keys_authenticate_by_digest() {
        let f = fixture();
        let legacy = "sk-legacy-0123456789";
        let (v, d) = f.hasher.digest(legacy);
        let mut r = sample("key_imp", d);
        r.secret_version = v;
        r.rev = 1;
        r.imported = true;
        f.table.apply(r);
        assert_eq!(&*f.auth(legacy, 10).unwrap().id, "key_imp");
        assert_eq!(f.auth("sk-other", 10).unwrap_err().reason(), "key_unknown");
    }

    #[test]
    fn apply_is_versioned_and_indexes_by_id() {
        let f = fixture();
        let key = f.add("key_a", 5, |_| {});
        assert_eq!(f.table.revision(), 5);
        let mut older = (*f.table.get_by_id("key_a").unwrap()).clone();
        older.rev = 4;
        older.revoked_at = Some(1);
        assert!(!f.table.apply(older.clone()), "older revision ignored");
        assert!(f.auth(&key, 10).is_ok());
        older.rev = 6;
        assert!(f.table.apply(older));
        assert_eq!(f.auth(&key, 10).unwrap_err().reason(), "key_revoked");
        assert_eq!(f.table.len(), 1);
        assert_eq!(f.table.revision(), 6);
    }

    #[test]
    fn secret_rotation_keeps_old_digests_valid() {
        let f = fixture();
        let key = f.add("key_a", 1, |_| {});
        let rotated = Hasher::new(vec![(1, vec![7; 32]), (2, vec![9; 32])]);
        assert_eq!(
            f.table
                .authenticate(&key, &f.format, &rotated, 10, 0)
                .unwrap()
                .id
                .to_string(),
            "key_a"
        );
        let only_new = Hasher::new(vec![(2, vec![9; 32])]);
        assert!(f
            .table
            .authenticate(&key, &f.format, &only_new, 10, 0)
            .is_err());
    }

    #[test]
    fn random_applies_match_a_model_through_rebuilds() {
        // Updates, digest changes and revocations over enough versions to force several
        // rebuilds (garbage and index growth); the table must answer like a plain map.
        let table = KeyTable::new();
        let mut model: std::collections::HashMap<String, KeyRecord> = Default::default();
        let mut owners: std::collections::HashMap<Digest, String> = Default::default();
        let mut x: u64 = 7;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for rev in 1..=30_000u64 {
            let n = next();
            let id = if n % 3 == 0 {
                format!("legacy-{}", n % 500)
            } else {
                crate::keys::record::format_id("key", &u128::from(n % 3000).to_be_bytes())
            };
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(n % 3000 + (n >> 40) % 2 * 10_000).to_le_bytes());
            d[8] = (n % 3) as u8;
            let mut r = sample(&id, Digest(d));
            r.rev = rev;
            // Owners and profiles vary apart (each is interned on its own); some owners are
            // too long to be carried inline.
            r.owner = if n % 13 == 0 {
                format!("a-team-with-a-name-longer-than-a-view-holds-{}", n % 5)
            } else {
                format!("team-{}", n % 7)
            };
            r.scopes = vec![format!("s{}", (n >> 8) % 5)];
            r.revoked_at = (n % 11 == 0).then_some(5);
            // One digest, one id: a digest another id holds is taken off it in the model.
            if let Some(other) = owners.insert(r.digest, id.clone()) {
                if other != id {
                    model.remove(&other);
                }
            }
            if let Some(old) = model.insert(id.clone(), r.clone()) {
                if old.digest != r.digest && owners.get(&old.digest) == Some(&id) {
                    owners.remove(&old.digest);
                }
            }
            table.apply(r);
        }
        assert_eq!(table.len(), model.len());
        for (id, r) in &model {
            let got = table.get_by_id(id).unwrap();
            assert_eq!(
                (got.rev, got.digest, &got.owner, &got.scopes),
                (r.rev, r.digest, &r.owner, &r.scopes),
                "{id}"
            );
            let v = table.view_by_id(id).unwrap();
            assert_eq!(
                (&*v.owner, &v.scopes),
                (r.owner.as_str(), &r.scopes),
                "{id}"
            );
            assert_eq!(got.revoked_at, r.revoked_at);
            assert_eq!(table.get_by_digest(&r.digest).unwrap().id, *id);
        }
        assert_eq!(table.records().len(), model.len());
        // The one-at-a-time pass writes each record into one reused allocation: it must hand
        // out exactly what `records` rebuilds, nothing left over from the previous key.
        let mut each = Vec::new();
        table.each_record(|r| each.push(r.clone()));
        let mut all: Vec<KeyRecord> = table.records().iter().map(|r| (**r).clone()).collect();
        each.sort_by(|a, b| a.id.cmp(&b.id));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(each, all);
        assert_eq!(
            table.revoked().len(),
            model.values().filter(|r| r.revoked_at.is_some()).count()
        );
    }

    /// The owners a table numbers (what its checkpoint stores).
    fn owners_of(t: &KeyTable) -> Vec<String> {
        let mut out = Vec::new();
        t.each_part(
            &mut out,
            |out, p| out.extend(p.owners.iter().map(|o| o.as_str().to_string())),
            |_, _| {},
        );
        out
    }

    #[test]
    fn owners_are_numbered_once_each_across_chunks_and_a_checkpoint() {
        // More owners than a chunk holds, each named by several keys, some too long to be
        // carried inline: each is numbered once, and a table rebuilt from its parts (a
        // checkpoint) finds the same numbers for them rather than numbering them again.
        let distinct = CHUNK + 100;
        let owner = |i: usize| match i % distinct {
            n if n % 97 == 0 => format!("an-owner-with-a-name-longer-than-a-view-holds-{n}"),
            n => format!("owner-{n}"),
        };
        let record = |i: usize, rev: u64| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            let mut r = sample(&format!("legacy-{i}"), Digest(d));
            r.rev = rev;
            r.owner = owner(i);
            r
        };
        let table = KeyTable::new();
        for i in 0..3 * distinct {
            table.apply(record(i, i as u64 + 1));
        }
        let numbered = owners_of(&table);
        assert_eq!(numbered.len(), distinct);
        let unique: std::collections::HashSet<&String> = numbered.iter().collect();
        assert_eq!(unique.len(), distinct, "no owner numbered twice");

        let (mut strings, mut owners, mut profiles, mut entries) = (vec![], vec![], vec![], vec![]);
        table.each_part(
            &mut entries,
            |_, p| {
                strings = p.strings.to_vec();
                owners = p.owners.iter().map(|o| o.as_str().to_string()).collect();
                profiles = p.profiles.iter().map(|p| (**p).clone()).collect();
            },
            |out, e| out.push(*e),
        );
        let rebuilt = KeyTable::from_parts(
            LogId(7),
            table.revision(),
            strings,
            owners.iter().map(String::as_str).collect(),
            profiles,
            vec![],
            entries.into_iter(),
        )
        .unwrap();
        let rev = 10 * distinct as u64;
        for i in 0..distinct {
            assert!(rebuilt.apply(record(i, rev + i as u64)));
        }
        assert_eq!(
            owners_of(&rebuilt),
            numbered,
            "the same owners, no new numbers"
        );
        for i in [0, 97, distinct - 1] {
            let v = rebuilt.view_by_id(&format!("legacy-{i}")).unwrap();
            assert_eq!(&*v.owner, owner(i));
        }
    }

    #[test]
    fn a_state_older_than_an_entrys_owner_is_stale_not_unknown() {
        // The writer interns a new owner into a new chunk (a new inner state), writes the
        // entry into an existing entry chunk and repoints the index, which every state
        // shares: a reader holding the older state finds the entry but not its owner, and
        // must load again (`Stale`), never answer "unknown" for a valid key.
        let f = fixture();
        let key = f.add("key_a", 1, |r| r.owner = "o0".into());
        {
            let mut w = lock(&f.table.writer);
            for i in 1..CHUNK {
                f.table.intern_owner(&mut w, &format!("o{i}"));
            }
        }
        let old = f.table.inner.load_full();
        let mut r = (*f.table.get_by_id("key_a").unwrap()).clone();
        r.rev = 2;
        r.owner = "a-new-owner".into();
        assert!(f.table.apply(r));
        let (_, slot, e) = old.find_id("key_a").ok().flatten().unwrap();
        assert_eq!(
            slot, 1,
            "the new version is in the entry chunk the old state has"
        );
        assert!(
            old.view(&e).is_none(),
            "the old state lacks the owner: stale"
        );
        assert_eq!(&*f.auth(&key, 10).unwrap().owner, "a-new-owner");
        assert_eq!(&*f.table.view_by_id("key_a").unwrap().owner, "a-new-owner");
        assert_eq!(f.table.get_by_id("key_a").unwrap().owner, "a-new-owner");
    }

    #[test]
    fn readers_see_whole_versions_while_a_writer_applies() {
        let f = fixture();
        let key = f.add("key_a", 1, |r| {
            r.owner = "0".into();
            r.scopes = vec!["s0".into()];
        });
        let table = std::sync::Arc::new(f.table);
        let (format, hasher) = (f.format, f.hasher);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (table, stop, key) = (table.clone(), stop.clone(), key.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = table.authenticate(&key, &format, &hasher, 10, 0).unwrap();
                    // Scopes and owner change together in every version the writer applies.
                    assert_eq!(v.scopes[0], format!("s{}", v.owner));
                    seen += 1;
                }
                seen
            })
        };
        let mut r = table.get_by_id("key_a").map(|r| (*r).clone()).unwrap();
        // A new owner and profile with every version: their slabs gain chunks (a new inner
        // state) while the reader probes, so the reader meets entries naming an owner or
        // profile its loaded state lacks, and must load again rather than answer unknown.
        for rev in 2..20_000u64 {
            r.rev = rev;
            r.owner = rev.to_string();
            r.scopes = vec![format!("s{}", r.owner)];
            table.apply(r.clone());
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(table.len(), 1);
    }

    /// Views carry their thread's own copy of a profile (`near_profile`): the same copy on
    /// one thread, another on another thread, equal in content to the table's; past
    /// `NEAR_PROFILES` of one store the table's own, shared; a replaced table's copies make
    /// room for the new one's.
    #[test]
    fn a_threads_views_carry_its_own_copy_of_a_profile() {
        let f = fixture();
        let scoped = |i: usize| move |r: &mut KeyRecord| r.scopes = vec![format!("scope:{i}")];
        let keys: Vec<String> = (0..NEAR_PROFILES + 4)
            .map(|i| f.add(&format!("key_{i}"), i as u64 + 1, scoped(i)))
            .collect();
        let shared = |table: &KeyTable, v: &KeyView| {
            let inner = table.inner.load();
            (0..64u32)
                .filter_map(|n| inner.profile(n))
                .any(|p| Arc::ptr_eq(p, &v.profile))
        };
        for (i, key) in keys.iter().enumerate() {
            let v = f.auth(key, 200).unwrap();
            assert_eq!(v.scopes, [format!("scope:{i}")]);
            let again = f.auth(key, 200).unwrap();
            assert!(
                Arc::ptr_eq(&v.profile, &again.profile),
                "{i}: one copy a thread"
            );
            assert_eq!(shared(&f.table, &v), i >= NEAR_PROFILES, "{i}");
        }
        let (here, there) = std::thread::scope(|s| {
            let there = s.spawn(|| f.auth(&keys[0], 200).unwrap().profile);
            (
                f.auth(&keys[0], 200).unwrap().profile,
                there.join().unwrap(),
            )
        });
        assert!(!Arc::ptr_eq(&here, &there) && *here == *there);
        // Another table on this thread: its views get copies, in room the first one's made.
        let g = fixture();
        let other = g.add("key_other", 1, scoped(99));
        let v = g.auth(&other, 200).unwrap();
        assert!(!shared(&g.table, &v));
        assert_eq!(v.scopes, ["scope:99"]);
    }
}
