//! The control-plane store: an ordered log of key record versions.
//!
//! `file` is the embedded default (one JSON-lines file, appended under a lock, compacted
//! atomically, followed incrementally by gateways). The feed (fleet mode) serves the same log
//! over HTTP.

pub mod feed;
pub mod feed_client;
pub mod file;
pub mod follow;

pub use file::{Corrupt, Follower, LogFile, StoreError, Update};
