//! The control-plane store: an ordered log of key record versions.
//!
//! Persistence only (gateways' followers live in `sync`): `file` is the embedded default (one
//! JSON-lines file, appended under a lock, compacted atomically), `ledger` what writers keep
//! apart from it (high-water mark, every revocation), `seal` the log ids and MACs that make
//! records and files authenticated, `feed` the control plane's side of the feed.

pub mod feed;
pub mod file;
pub mod ledger;
pub mod seal;

pub use file::{Corrupt, Follower, LogFile, StoreError, Update};
