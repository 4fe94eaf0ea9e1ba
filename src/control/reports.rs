//! `POST /v1/usage` (role feed): a feed gateway's report batch (`sync::report`). Its counts
//! are what the gateway's keys did since its previous batch, added where this control plane
//! keeps its own (`Control::add_usage`: Redis, else the usage file, as every node adds its
//! counts there); its sketches replace that node's in the forensics file.
//!
//! Each batch is applied once. A gateway sends a batch again, as it was, when no answer
//! reached it; one whose (node, boot, seq) was already applied is answered without counting
//! it twice (`boot` is random per gateway process, `seq` increases with each new batch). The
//! sketches are written before the counts, and the batch is marked applied only after both: a
//! batch answered with an error may come again whole, and writing a node's sketches twice is
//! harmless where adding its counts twice is not. What this control plane remembers goes
//! with it: a batch applied just before a restart and sent again after it counts twice.
//!
//! The body may be up to `sync::report::MAX_BYTES` whatever `[control] max_body_bytes` says
//! for the API: only a holder of a feed token gets to send one.

use super::api::{err, json_response, read_limited, ApiError, Body};
use super::Control;
use crate::sync::report::{Received, MAX_BYTES};
use crate::usage::Delta;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;

/// Gateway processes whose last applied batch is remembered; past it, one is forgotten (a
/// batch of it sent again could then count twice: only a fleet restarting more gateways than
/// this within one control plane's life would see it).
const MAX_PROCESSES: usize = 10_000;

/// The last batch applied per gateway process (node, boot): its sequence number. Keyed by the
/// process, not the node alone: two processes under one name never undo each other's record.
#[derive(Debug, Default)]
pub struct Applied(HashMap<(String, u64), u64>);

impl Applied {
    fn already(&self, node: &str, boot: u64, seq: u64) -> bool {
        self.0
            .get(&(node.to_owned(), boot))
            .is_some_and(|&last| seq <= last)
    }

    fn record(&mut self, node: String, boot: u64, seq: u64) {
        let key = (node, boot);
        if self.0.len() >= MAX_PROCESSES && !self.0.contains_key(&key) {
            if let Some(k) = self.0.keys().next().cloned() {
                self.0.remove(&k);
            }
        }
        self.0.insert(key, seq);
    }
}

fn bad(detail: String) -> ApiError {
    err(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

/// A body this version cannot take, said plainly: a report of totals comes from a gateway
/// older than this control plane.
fn refusal(bytes: &[u8], e: serde_json::Error) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Older {
        usage: Option<serde::de::IgnoredAny>,
        seq: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Older>(bytes) {
        Ok(Older {
            usage: Some(_),
            seq: None,
        }) => bad(
            "a usage report of totals, from a gateway older than this control plane: upgrade \
             the gateway (its usage is not counted until then)"
                .to_owned(),
        ),
        _ => bad(format!("usage report: {e}")),
    }
}

pub async fn receive(c: &Arc<Control>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let limit = MAX_BYTES.max(c.config.control.max_body_bytes);
    let bytes = read_limited(req, limit).await?;
    let report: Received = serde_json::from_slice(&bytes).map_err(|e| refusal(&bytes, e))?;
    let node: String = report.node.chars().take(128).collect();
    let mut forensics = report.forensics;
    // A gateway never tracks more; a report claiming more is cut, not trusted.
    while forensics.len() > crate::forensics::MAX_KEYS {
        forensics.pop_last();
    }
    let mut applied = c.reports.lock().await;
    if applied.already(&node, report.boot, report.seq) {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"accepted": true, "duplicate": true}),
        ));
    }
    let unavailable = |what: &str, e: String| {
        tracing::warn!(error = %e, node = %node, "cannot apply a usage report's {what}; the gateway will send it again");
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("usage report not applied ({what}); send it again"),
        )
    };
    if !forensics.is_empty() {
        let path = crate::forensics::path_for(&c.settings.usage_file);
        let n = node.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::forensics::upsert_file(&path, &n, forensics, crate::forensics::MAX_KEYS)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unavailable("forensics", e.to_string())),
            Err(e) => return Err(unavailable("forensics", e.to_string())),
        }
    }
    let deltas: Vec<Delta> = report
        .added
        .into_iter()
        .map(|(id, used)| Delta { id, used })
        .collect();
    c.add_usage(&deltas)
        .await
        .map_err(|e| unavailable("usage", e.to_string()))?;
    applied.record(node, report.boot, report.seq);
    Ok(json_response(StatusCode::OK, &json!({"accepted": true})))
}
