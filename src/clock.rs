//! Wall-clock time as Unix seconds and milliseconds: one definition for the request path,
//! the CLI, the control plane and the store, so they all agree on what "now" means.
//! (Rate limits and timeouts use monotonic clocks instead; only expiry, audit and
//! propagation ages are wall-clock.)

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
