//! The control-plane store: an ordered log of key record versions.
//!
//! Persistence only (gateways' followers live in `sync`): `file` is the embedded default (one
//! JSON-lines file, appended under a lock, compacted atomically), `ledger` what writers keep
//! apart from it (high-water mark, every revocation), `seal` the log ids and MACs that make
//! records and files authenticated, `feed` the control plane's side of the feed.

pub mod checkpoint;
pub mod feed;
pub mod file;
pub mod ledger;
pub mod redis;
pub mod seal;

pub use file::{Corrupt, Follower, LogFile, StoreError, Update};

use crate::keys::digest::Digest;
use crate::keys::record::KeyRecord;
use file::{Compacted, Parsed, State};
use seal::LogId;

/// Where a transaction's `commit` runs ([`Store::transact`]), which decides what its failure
/// means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitPoint {
    /// The file store: under its exclusive lock, after `build`, before the write. No other
    /// writer can get in, so this run of `build` is the one written, and a failed commit
    /// refuses the change with the store untouched (fail closed, THREATS J6).
    BeforeWrite,
    /// The Redis store: no lock; its write script refuses a write another writer got ahead
    /// of, and only its acceptance tells which run of `build` is written. So `commit` runs
    /// after it, and a failed commit cannot undo the change.
    AfterWrite,
}

/// The store writers use (the CLI, the control plane): the file (the embedded default) or
/// Redis (`[keys] source = "redis"`). One interface, two backends, the same signed records and
/// the same rules.
#[derive(Debug, Clone)]
pub enum Store {
    File(LogFile),
    Redis(Box<redis::RedisLog>),
}

impl Store {
    pub fn load(&self) -> Result<Parsed, StoreError> {
        match self {
            Store::File(f) => f.load(),
            Store::Redis(r) => r.load(),
        }
    }

    /// The last revision written, read cheaply (the file's tail, Redis's head).
    pub fn head_revision(&self) -> Result<u64, StoreError> {
        match self {
            Store::File(f) => f.head_revision(),
            Store::Redis(r) => r.head_revision(),
        }
    }

    /// Every digest the store holds (what an import skips).
    pub fn digests(&self) -> Result<std::collections::HashSet<Digest>, StoreError> {
        match self {
            Store::File(f) => f.digests(),
            Store::Redis(r) => r.digests(),
        }
    }

    pub fn ensure_signed(&self) -> Result<LogId, StoreError> {
        match self {
            Store::File(f) => f.ensure_signed(),
            Store::Redis(r) => r.ensure_signed(),
        }
    }

    /// One change, read-modify-write: `build` sees every key's latest version and returns
    /// the versions to write and what the change must do exactly once if they are written
    /// (`T`: its audit events); `commit` does that, once, with what the written run of
    /// `build` returned, and never when nothing is written. `build` must have no effect of
    /// its own: the Redis store runs it again when another writer got in between its read
    /// and its write (THREATS J6 wants one audit record per change; an audit written while
    /// building wrote one per run, the first for a version that never existed). When
    /// `commit` runs depends on how the store serialises writers ([`CommitPoint`]).
    pub fn transact<T: Send, E: Send>(
        &self,
        mut build: impl FnMut(&State) -> Result<(Vec<KeyRecord>, T), E> + Send,
        commit: impl FnOnce(T, CommitPoint) -> Result<(), E> + Send,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError> {
        match self {
            Store::File(f) => f.transact(|state| {
                let (records, t) = build(state)?;
                commit(t, CommitPoint::BeforeWrite)?;
                Ok(records)
            }),
            Store::Redis(r) => r.transact(build, |t| commit(t, CommitPoint::AfterWrite)),
        }
    }

    /// [`Store::transact`] for a change to one key: `build` sees that key's latest version
    /// (the file store scans for it instead of parsing every key; see
    /// [`LogFile::transact_key`]).
    pub fn transact_key<T: Send, E: Send>(
        &self,
        id: &str,
        mut build: impl FnMut(Option<&KeyRecord>) -> Result<(Vec<KeyRecord>, T), E> + Send,
        commit: impl FnOnce(T, CommitPoint) -> Result<(), E> + Send,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError> {
        match self {
            Store::File(f) => f.transact_key(id, |current| {
                let (records, t) = build(current)?;
                commit(t, CommitPoint::BeforeWrite)?;
                Ok(records)
            }),
            Store::Redis(r) => r.transact(
                |state| build(state.keys.get(id)),
                |t| commit(t, CommitPoint::AfterWrite),
            ),
        }
    }

    pub fn append(&self, records: Vec<KeyRecord>) -> Result<Vec<KeyRecord>, StoreError> {
        match self {
            Store::File(f) => f.append(records),
            Store::Redis(r) => r.append(records),
        }
    }

    pub fn compact(&self, now: i64, retain_revoked_until: i64) -> Result<Compacted, StoreError> {
        match self {
            Store::File(f) => f.compact(now, retain_revoked_until),
            // Latest versions and revocations are kept in their hashes already: compaction
            // writes the table's checkpoint and trims the stream's history (tombstoning stays
            // a file-store feature).
            Store::Redis(r) => Ok(Compacted {
                kept: r.compact()?,
                dropped: 0,
                tombstoned: 0,
            }),
        }
    }
}
