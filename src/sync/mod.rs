//! Keeping a gateway's key table in step with its source: the store file (`file`), the
//! control plane's feed (`feed`) and its sealed local copy (`cache`), the Redis store
//! (`redis`); what a feed gateway reports back to its control plane (`report`); and the node's
//! wall clock against its source's (`skew`). Every source goes
//! through `apply`, which holds the rules (revocation is final; never backwards), so no source
//! can bring a revoked key back. `store` is persistence only and knows nothing of gateways.

pub mod apply;
pub mod cache;
pub mod feed;
pub mod file;
pub mod redis;
pub mod report;
pub mod skew;
