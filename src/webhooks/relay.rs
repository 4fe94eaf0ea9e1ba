//! A fleet gateway's part in webhooks: the events only it sees (`key.canary_used`,
//! `key.quota_exceeded`) are relayed to the control plane, the fleet's one sender, with the
//! feed credentials it already holds (`POST /v1/events`, feed role).
//!
//! The source is the gateway's own audit log (the request path already audits both events),
//! read from a cursor kept beside the feed cache (`<feed_cache>.relay`) that moves only after
//! the control plane accepted the batch: at least once. Each event carries a `relay_id`
//! derived from its audit line, so a batch sent twice yields the same delivery id.
//!
//! A batch the control plane refuses as invalid (`refused_as_invalid`) would be refused again
//! forever, and the cursor would never move: every later event of this gateway would be stuck
//! behind it. The relay narrows such a batch by halves until the one event refused is alone,
//! then skips it (logged with its key id, counted in `keygate_relayed_events_total{result=
//! "dropped"}`; the gateway's audit log keeps it). No answer, a 5xx, 429, 401 or 403 say
//! nothing of the batch: it is sent again as it was, with backoff.

use super::delivery_id;
use crate::snapshot::FeedSource;
use crate::store::file::{complete_prefix, sibling, write_atomic};
use http::StatusCode;
use prometheus::IntCounterVec;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The events a gateway relays.
pub const RELAYED: [&str; 2] = ["key.canary_used", "key.quota_exceeded"];
/// Fields of an audit line a relayed event may carry (the rest stays on the gateway).
pub const RELAYED_FIELDS: [&str; 6] = [
    "client_ip",
    "route",
    "limit",
    "window_secs",
    "reset_secs",
    "timestamp",
];
const TICK: Duration = Duration::from_millis(200);
/// Audit log read per batch at most.
const MAX_BATCH_BYTES: u64 = 256 * 1024;
/// A batch's events, as sent, at most: the control plane reads up to `MAX_BODY_BYTES` on
/// `/v1/events` (the API's default body limit, 64 KiB), with room for the envelope. Without
/// it a dense run of events (a canary under attack) made a body the control plane refused
/// every time, and the relay stopped there.
const MAX_EVENTS_BYTES: usize = 48 * 1024;
/// What the control plane reads of one relayed batch at least, whatever
/// `[control] max_body_bytes` says for the API.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest string field of a relayed event the control plane takes (`audit_events`).
pub const MAX_FIELD_BYTES: usize = 256;

/// Start relaying from `audit_log` to the control plane of `source`; `relayed` counts events
/// by result (`accepted`, `dropped`).
pub fn spawn(audit_log: PathBuf, source: FeedSource, relayed: IntCounterVec) {
    let cursor_path = sibling(&source.cache, ".relay");
    // First start: the cursor is set to the log's end before start-up completes, so what is
    // audited once the gateway serves is relayed.
    if !cursor_path.exists() {
        let len = std::fs::metadata(&audit_log).map_or(0, |m| m.len());
        if let Err(e) = write_atomic(&cursor_path, len.to_string().as_bytes()) {
            tracing::error!(path = %cursor_path.display(), error = %e, "cannot write the relay cursor; events will be relayed once it can be written");
        }
    }
    tokio::spawn(async move {
        let Some(url) = events_url(&source.usage_url) else {
            return tracing::error!("cannot derive the control plane's /v1/events URL");
        };
        let mut failures = 0u32;
        // Events a batch may carry: halved while the control plane refuses batches as
        // invalid, until the event it refuses is alone; back to the most once one goes by.
        let mut most = MAX_EVENTS;
        loop {
            let wait = TICK * 2u32.pow(failures.min(5));
            tokio::time::sleep(wait).await;
            let (a, c) = (audit_log.clone(), cursor_path.clone());
            let Ok(Ok(batch)) = tokio::task::spawn_blocking(move || next_batch(&a, &c, most)).await
            else {
                continue;
            };
            let Some((events, end)) = batch else { continue };
            if !events.is_empty() {
                let body = serde_json::json!({"node": source.node, "events": events});
                let sent = super::super::sync::feed::request(
                    &url,
                    &source.token,
                    source.tls.as_ref(),
                    http::Method::POST,
                    serde_json::to_vec(&body).unwrap_or_default().into(),
                )
                .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        failures = 0;
                        most = MAX_EVENTS;
                        relayed
                            .with_label_values(&["accepted"])
                            .inc_by(events.len() as u64);
                    }
                    Ok(r) if refused_as_invalid(r.status()) && events.len() > 1 => {
                        failures = 0;
                        most = events.len() / 2;
                        tracing::info!(
                            status = r.status().as_u16(),
                            events = events.len(),
                            "control plane refused a batch of relayed events; sending it in halves to find the event it refuses"
                        );
                        continue;
                    }
                    Ok(r) if refused_as_invalid(r.status()) => {
                        failures = 0;
                        most = MAX_EVENTS;
                        relayed.with_label_values(&["dropped"]).inc();
                        let field =
                            |f: &str| events[0].get(f).and_then(Value::as_str).map(str::to_owned);
                        tracing::warn!(
                            status = r.status().as_u16(),
                            event = field("event").as_deref().unwrap_or("-"),
                            key_id = field("key_id").as_deref().unwrap_or("-"),
                            relay_id = field("relay_id").as_deref().unwrap_or("-"),
                            "control plane refused a relayed event as invalid; skipped (it stays in this gateway's audit log)"
                        );
                    }
                    Ok(r) => {
                        failures += 1;
                        tracing::warn!(
                            status = r.status().as_u16(),
                            "control plane refused relayed events; retrying"
                        );
                        continue;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, "cannot relay events to the control plane; retrying");
                        continue;
                    }
                }
            }
            let c = cursor_path.clone();
            let _ =
                tokio::task::spawn_blocking(move || write_atomic(&c, end.to_string().as_bytes()))
                    .await;
        }
    });
}

/// Whether the control plane judged the batch itself invalid, so that it would refuse it
/// again however often it came: a 4xx, save those that say nothing of the batch. 401 and 403
/// are the feed token's (an operator fixes it, then the batch goes through), 404 and 405 a
/// control plane without `/v1/events` (mid-upgrade), 408 and 429 "come back later".
fn refused_as_invalid(status: StatusCode) -> bool {
    status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 404 | 405 | 408 | 429)
}

fn events_url(usage: &http::Uri) -> Option<http::Uri> {
    http::Uri::builder()
        .scheme(usage.scheme_str()?)
        .authority(usage.authority()?.as_str())
        .path_and_query("/v1/events")
        .build()
        .ok()
}

/// The relayable events after the cursor (`most` at most) and the offset after them; `None`
/// when there is nothing new. With no cursor yet, history is skipped (the cursor starts at
/// the end).
fn next_batch(
    audit: &Path,
    cursor_path: &Path,
    most: usize,
) -> std::io::Result<Option<(Vec<Value>, u64)>> {
    use std::io::{Read, Seek, SeekFrom};
    let len = std::fs::metadata(audit).map(|m| m.len()).unwrap_or(0);
    let cursor = match std::fs::read_to_string(cursor_path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(_) => return Ok(Some((vec![], len))),
    };
    let cursor = if len < cursor { 0 } else { cursor };
    if len == cursor {
        return Ok(None);
    }
    let mut f = std::fs::File::open(audit)?;
    f.seek(SeekFrom::Start(cursor))?;
    let mut buf = Vec::new();
    f.take(MAX_BATCH_BYTES).read_to_end(&mut buf)?;
    let (events, taken) = take_events(complete_prefix(&buf), most);
    Ok(Some((events, cursor + taken as u64)))
}

/// The relayable events of the whole lines in `lines`, up to `most` of them and
/// `MAX_EVENTS_BYTES` as sent (one at least), and how many bytes of `lines` they cover: the
/// cursor moves past those lines only.
fn take_events(lines: &[u8], most: usize) -> (Vec<Value>, usize) {
    let (mut events, mut size, mut taken) = (Vec::new(), 0, 0);
    for line in lines.split_inclusive(|b| *b == b'\n') {
        if let Some(e) = relayable(line.strip_suffix(b"\n").unwrap_or(line)) {
            let n = e.to_string().len() + 1;
            if !events.is_empty() && (events.len() >= most || size + n > MAX_EVENTS_BYTES) {
                break;
            }
            size += n;
            events.push(e);
        }
        taken += line.len();
    }
    (events, taken)
}

/// An audit line as relayed: event, key id, the allowed fields and its `relay_id`.
fn relayable(raw: &[u8]) -> Option<Value> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(raw) else {
        return None;
    };
    let event = obj.get("event")?.as_str()?;
    if !RELAYED.contains(&event) {
        return None;
    }
    let mut out = Map::new();
    out.insert("event".into(), event.into());
    out.insert("key_id".into(), obj.get("key_id")?.clone());
    out.insert(
        "relay_id".into(),
        delivery_id(&["relay", &String::from_utf8_lossy(raw)]).into(),
    );
    for f in RELAYED_FIELDS {
        if let Some(v) = obj.get(f) {
            out.insert(f.into(), v.clone());
        }
    }
    Some(Value::Object(out))
}

/// Most events one relayed batch may carry.
pub const MAX_EVENTS: usize = 1000;

/// The control plane's side of `POST /v1/events`: each relayed event as the audit event the
/// control plane writes (its own sender then delivers it). Events naming a key the control
/// plane does not hold are left out; the count of those is returned too. `Err` names what is
/// malformed (a 400).
pub fn audit_events(
    body: &Map<String, Value>,
    node: &str,
    key: impl Fn(&str) -> Option<std::sync::Arc<crate::keys::record::KeyRecord>>,
) -> Result<(Vec<crate::audit::Event>, usize), String> {
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or("events: required, an array")?;
    if events.len() > MAX_EVENTS {
        return Err(format!("events: at most {MAX_EVENTS} per request"));
    }
    let actor = format!("gateway:{node}");
    let mut out = Vec::new();
    let mut unknown = 0;
    for (i, e) in events.iter().enumerate() {
        let obj = e
            .as_object()
            .ok_or(format!("events[{i}]: must be an object"))?;
        let name = obj.get("event").and_then(Value::as_str).unwrap_or_default();
        let event = RELAYED
            .iter()
            .find(|r| **r == name)
            .ok_or(format!("events[{i}].event: one of {}", RELAYED.join(", ")))?;
        let key_id = obj
            .get("key_id")
            .and_then(Value::as_str)
            .ok_or(format!("events[{i}].key_id: required, a string"))?;
        let relay_id = obj
            .get("relay_id")
            .and_then(Value::as_str)
            .filter(|r| r.starts_with("whd_") && r.len() <= 64)
            .ok_or(format!("events[{i}].relay_id: required, a whd_ id"))?;
        let mut audit = crate::audit::Event::new(event, &actor).with("relay_id", relay_id);
        for (field, v) in obj {
            if ["event", "key_id", "relay_id"].contains(&field.as_str()) {
                continue;
            }
            if !RELAYED_FIELDS.contains(&field.as_str()) {
                return Err(format!("events[{i}].{field}: unknown field"));
            }
            let ok = v.as_str().is_some_and(|s| s.len() <= MAX_FIELD_BYTES) || v.is_u64();
            if !ok {
                return Err(format!(
                    "events[{i}].{field}: a string (≤ {MAX_FIELD_BYTES} bytes) or a non-negative integer"
                ));
            }
            let name = if field == "timestamp" {
                "gateway_timestamp"
            } else {
                field.as_str()
            };
            audit = audit.with(name, v.clone());
        }
        match key(key_id) {
            Some(r) => out.push(audit.key(&r)),
            None => unknown += 1,
        }
    }
    Ok((out, unknown))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A dense run of events (a canary used from many addresses) goes out in bodies the
    /// control plane takes, each event once, in order, however many there are.
    #[test]
    fn a_dense_run_of_events_is_relayed_in_bodies_under_the_limit_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let cursor = dir.path().join("cache.relay");
        std::fs::write(&cursor, "0").unwrap();
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&format!(
                "{{\"event\":\"key.canary_used\",\"key_id\":\"key_{i:05}\",\"client_ip\":\"203.0.113.{}\",\"route\":\"invoices-read\",\"owner\":\"someone\",\"timestamp\":\"2026-12-06T16:00:00Z\"}}\n",
                i % 250
            ));
            if i % 7 == 0 {
                text.push_str("{\"event\":\"table.applied\",\"rev\":1}\n");
            }
        }
        std::fs::write(&audit, &text).unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            let Some((events, end)) = next_batch(&audit, &cursor, MAX_EVENTS).unwrap() else {
                break;
            };
            assert!(!events.is_empty() && events.len() <= MAX_EVENTS);
            let body = serde_json::json!({"node": "n".repeat(128), "events": events});
            let len = serde_json::to_vec(&body).unwrap().len();
            assert!(len <= MAX_BODY_BYTES, "a body of {len} bytes");
            seen.extend(
                events
                    .iter()
                    .map(|e| e["key_id"].as_str().unwrap().to_owned()),
            );
            std::fs::write(&cursor, end.to_string()).unwrap();
        }
        let want: Vec<String> = (0..3000).map(|i| format!("key_{i:05}")).collect();
        assert_eq!(seen, want);
        assert_eq!(
            std::fs::read_to_string(&cursor).unwrap(),
            text.len().to_string()
        );
    }

    /// Only a refusal that judges the batch skips an event; the others send it again.
    #[test]
    fn only_a_batch_judged_invalid_is_skipped() {
        for (status, skipped) in [
            (400, true),
            (413, true),
            (422, true),
            (401, false),
            (403, false),
            (404, false),
            (405, false),
            (408, false),
            (429, false),
            (500, false),
            (503, false),
            (200, false),
        ] {
            let s = StatusCode::from_u16(status).unwrap();
            assert_eq!(refused_as_invalid(s), skipped, "{status}");
        }
    }

    /// A batch narrowed to one event covers its line and the lines before it, no more: the
    /// cursor skips the refused event alone.
    #[test]
    fn a_batch_of_one_covers_its_event_only() {
        let lines = "{\"event\":\"table.applied\"}\n{\"event\":\"key.canary_used\",\"key_id\":\"key_a\"}\n{\"event\":\"key.canary_used\",\"key_id\":\"key_b\"}\n";
        let (events, taken) = take_events(lines.as_bytes(), 1);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["key_id"], "key_a");
        assert_eq!(
            &lines[taken..],
            "{\"event\":\"key.canary_used\",\"key_id\":\"key_b\"}\n"
        );
        let (events, taken) = take_events(lines.as_bytes(), MAX_EVENTS);
        assert_eq!((events.len(), taken), (2, lines.len()));
    }

    #[test]
    fn relays_only_its_events_from_the_cursor_on() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let cursor = dir.path().join("cache.relay");
        std::fs::write(
            &audit,
            "{\"event\":\"key.canary_used\",\"key_id\":\"key_old\"}\n",
        )
        .unwrap();
        let (events, end) = next_batch(&audit, &cursor, MAX_EVENTS).unwrap().unwrap();
        assert!(
            events.is_empty(),
            "history before the first start is skipped"
        );
        std::fs::write(&cursor, end.to_string()).unwrap();
        let mut text = std::fs::read_to_string(&audit).unwrap();
        text.push_str("{\"event\":\"table.applied\"}\n{\"event\":\"key.canary_used\",\"key_id\":\"key_a\",\"route\":\"r\",\"hint\":\"h\",\"timestamp\":\"t\"}\n{\"event\":\"key.ca");
        std::fs::write(&audit, &text).unwrap();
        let (events, end2) = next_batch(&audit, &cursor, MAX_EVENTS).unwrap().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["key_id"], "key_a");
        assert_eq!(events[0]["route"], "r");
        assert!(events[0].get("hint").is_none());
        assert!(events[0]["relay_id"].as_str().unwrap().starts_with("whd_"));
        assert_eq!(
            end2 as usize,
            text.rfind('\n').unwrap() + 1,
            "the torn line waits"
        );
    }
}
