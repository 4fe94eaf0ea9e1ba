//! This node's wall clock against its key source's (THREATS I14): the control plane's, from the
//! feed's heartbeats, or Redis' `TIME` on a Redis-store node. Expiry and not-before are judged
//! by the node's own clock, so an operator has to see when it is off:
//! `keygate_clock_skew_seconds` (alert `KeygateClockSkew`), and one log line each time the
//! skew crosses a minute either way, not one per measurement.

use crate::gateway::Gateway;

/// Past this (either way) the node says so in its log.
const SAY_OVER_SECONDS: f64 = 60.0;

/// Whose clock a skew was measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// The control plane's, from a feed heartbeat's `time_ms`.
    ControlPlane,
    /// The store's Redis, from `TIME`.
    Redis,
}

impl Against {
    fn whose(self) -> &'static str {
        match self {
            Against::ControlPlane => "the control plane's",
            Against::Redis => "Redis'",
        }
    }
}

/// Record a measured skew (this node's clock minus the source's, seconds): the gauge always,
/// the log line when it crosses a minute.
pub fn observe(gw: &Gateway, skew: f64, against: Against) {
    let was = gw.metrics.clock_skew.get();
    gw.metrics.clock_skew.set(skew);
    let whose = against.whose();
    match (was.abs() > SAY_OVER_SECONDS, skew.abs() > SAY_OVER_SECONDS) {
        (false, true) => tracing::warn!(
            skew_seconds = skew,
            "clock differs from {whose} by over a minute: expiry and not-before are judged by this clock"
        ),
        (true, false) => tracing::info!(skew_seconds = skew, "clock within a minute of {whose} again"),
        _ => {}
    }
}
