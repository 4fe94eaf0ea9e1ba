//! The concurrent map for per-key state read on every request (usage, forensics, per-key
//! series, limiter buckets). Its keys are key ids and lineages, which the key store issues,
//! not strings a client picks, so a fast seeded hash (foldhash) is enough; DashMap's default
//! SipHash cost more than the lookup itself in the request-path profile.

/// `DashMap` with foldhash.
pub type FastMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

/// An empty [`FastMap`].
pub fn new<K: Eq + std::hash::Hash, V>() -> FastMap<K, V> {
    FastMap::with_hasher(foldhash::fast::RandomState::default())
}
