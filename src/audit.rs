//! The audit log: one JSON line per lifecycle change or notable event.
//!
//! Written by the CLI, the control plane and the gateway to the same file with `O_APPEND`
//! (each event is one `write`, so concurrent writers never interleave within a line) and
//! fsynced, because an audit trail that loses the last revocation is no trail. Events carry
//! key ids and hints, never a key or its digest. Writers of lifecycle changes write a change's
//! events exactly once, at their store's commit point (`store::Store::transact`): the file
//! store's is before the write, under its lock, and a failed audit write refuses the change;
//! the Redis store's is after its write, and a failed audit write is reported as a change made
//! without its record.

use serde::Serialize;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// RFC 3339, UTC. Named like the `timestamp` of the JSON app logs, so one pipeline rule
    /// reads both streams.
    pub timestamp: String,
    /// `key.created`, `key.updated`, `key.rotated`, `key.revoked`, `key.imported`,
    /// `key.canary_used`, `key.quota_exceeded`, `key.redigested`, `table.applied`,
    /// `store.created`, `source.error`, `config.reloaded`, `auth.denied`, `webhook.delivered`,
    /// `webhook.attempt_failed`, `webhook.failed`.
    pub event: &'static str,
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Event-specific fields (never secrets).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    pub fn new(event: &'static str, actor: &str) -> Event {
        Event {
            timestamp: now_rfc3339(),
            event,
            actor: actor.to_owned(),
            key_id: None,
            owner: None,
            hint: None,
            details: serde_json::Map::new(),
        }
    }

    pub fn key(mut self, r: &crate::keys::record::KeyRecord) -> Event {
        self.key_id = Some(r.id.clone());
        self.owner = Some(r.owner.clone());
        self.hint = Some(r.shown_hint());
        self
    }

    /// The key fields of a view from the gateway's table, which keeps no hint: the caller
    /// passes the hint of the key it was presented, when it has one.
    pub fn key_view(mut self, k: &crate::keys::compact::KeyView, hint: Option<String>) -> Event {
        self.key_id = Some(k.id.to_string());
        self.owner = Some(k.owner.to_string());
        self.hint = hint;
        self
    }

    pub fn with(mut self, field: &str, value: impl Into<serde_json::Value>) -> Event {
        self.details.insert(field.to_owned(), value.into());
        self
    }
}

pub fn now_rfc3339() -> String {
    timestamp_now().to_string()
}

/// Now as audit and access lines write their `timestamp`: RFC 3339, UTC, milliseconds (a
/// value to format where it is written, with no `String` between).
pub fn timestamp_now() -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(std::time::SystemTime::now())
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    pub fn new(path: impl Into<PathBuf>) -> AuditLog {
        AuditLog { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append events as one write and fsync. An error means none of them may be relied on.
    pub fn append(&self, events: &[Event]) -> io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * 256);
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()
    }
}

/// Who is acting, for the `actor` field: the OS user running the CLI, as `name (uid N)`.
///
/// From the kernel, not from `$USER`/`$LOGNAME` (anyone can set those): the real uid from
/// `/proc/self/status`, its name from `/etc/passwd`. Reading files keeps this free of `unsafe`
/// (the crate forbids it) and of new dependencies.
pub fn os_user() -> String {
    let Some(uid) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| real_uid(&s))
    else {
        return "unknown".into();
    };
    match std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| user_name(&p, uid))
    {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The real uid: the first number of the `Uid:` line of `/proc/<pid>/status`.
fn real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The name of `uid` in passwd(5) text (`name:password:uid:…`).
fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_comes_from_the_uid_and_passwd() {
        let status = "Name:\tkeygate\nUid:\t1001\t0\t0\t0\nGid:\t1001\n";
        assert_eq!(
            real_uid(status),
            Some(1001),
            "the real uid, not the effective one"
        );
        let passwd = "root:x:0:0:root:/root:/bin/sh\n#junk\nalice:x:1001:1001::/home/a:/bin/sh\n";
        assert_eq!(user_name(passwd, 1001).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 7), None);
        assert!(os_user().contains("uid "), "{}", os_user());
    }

    #[test]
    fn appends_json_lines_and_fails_on_a_full_device() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("a/audit.jsonl"));
        log.append(&[
            Event::new("key.created", "me").with("n", 1),
            Event::new("key.revoked", "me"),
        ])
        .unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "key.created");
        assert_eq!(lines[0]["n"], 1);
        if Path::new("/dev/full").exists() {
            assert!(AuditLog::new("/dev/full")
                .append(&[Event::new("x", "me")])
                .is_err());
        }
    }
}
