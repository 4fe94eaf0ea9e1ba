//! The systemd notify protocol (`sd_notify(3)`), for `Type=notify` units: `READY=1` once the
//! listeners are bound (readiness for traffic is `/readyz`'s business: a gateway waiting for
//! its table is started, not failed), `STOPPING=1` when the lame duck begins,
//! and `WATCHDOG=1` at half of `WatchdogSec` while the runtime is alive (a wedged runtime
//! stops the pings and systemd restarts the service).
//!
//! The protocol is one datagram per message to the socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace), so it needs no libsystemd. Without `NOTIFY_SOCKET`
//! (not under systemd) every call is a no-op.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one notification; `Ok(false)` when not running under a notify-aware manager.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(true)
}

/// `notify`, with a failure logged rather than returned: the service keeps running either
/// way, and systemd reports the missing notification itself.
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "systemd notification failed");
    }
}

/// The watchdog ping interval (half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises),
/// if systemd asked for pings for this process.
pub fn watchdog_interval() -> Option<Duration> {
    // WATCHDOG_PID, when set, names the process the pings are for (not a child of it).
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Ping the watchdog until the runtime ends (spawned once at start when enabled).
pub async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        tell("WATCHDOG=1");
    }
}
