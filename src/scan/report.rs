//! `keygate scan` output: text lines, one JSON object, or a SARIF 2.1.0 log (for code
//! scanning in CI). Every format shows a key only as its hint (`kg_live_…a1B2`).

use super::check::Status;
use crate::keys::lookup::LookupState;
use serde_json::{json, Value};

/// One key found at one place. The key itself is private to the scan (lookups, revocation)
/// and has no way out through this type: no `Serialize`, and `Debug` shows the hint.
#[derive(Clone)]
pub struct Finding {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub hint: String,
    pub env: String,
    pub publishable: bool,
    pub(super) key: String,
    /// With `--check`.
    pub status: Option<Status>,
    /// `--revoke` revoked it in this run.
    pub revoked: bool,
}

impl std::fmt::Debug for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Finding({}:{}:{} {})",
            self.file, self.line, self.column, self.hint
        )
    }
}

impl Finding {
    /// Whether this finding makes the exit status 1: without `--check` every valid key
    /// counts; with it, keys that work now or will (`LookupState::is_exposed`).
    pub fn exposed(&self) -> bool {
        self.status.as_ref().is_none_or(|s| s.state.is_exposed())
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
            "env": self.env,
            "publishable": self.publishable,
        });
        if let Some(s) = &self.status {
            v["state"] = s.state.as_str().into();
            v["id"] = s.id.clone().into();
            v["owner"] = s.owner.clone().into();
            v["revoked"] = self.revoked.into();
        }
        v
    }

    /// `path:line:column: hint [state id owner=…] [revoked]`.
    pub fn text(&self) -> String {
        let mut t = format!("{}:{}:{}: {}", self.file, self.line, self.column, self.hint);
        if let Some(s) = &self.status {
            t.push(' ');
            t.push_str(s.state.as_str());
            if let Some(id) = &s.id {
                t.push_str(&format!(" {id}"));
            }
            if let Some(owner) = &s.owner {
                t.push_str(&format!(" owner={owner}"));
            }
        }
        if self.revoked {
            t.push_str(" -> revoked");
        }
        t
    }

    fn message(&self) -> String {
        let mut m = format!("keygate API key {} found in the source", self.hint);
        if let Some(s) = &self.status {
            m.push_str(&format!(": {}", s.state.as_str()));
            if let Some(id) = &s.id {
                m.push_str(&format!(", key {id}"));
            }
            if let Some(owner) = &s.owner {
                m.push_str(&format!(", owner {owner}"));
            }
        }
        if self.revoked {
            m.push_str("; revoked by this scan");
        } else if self.exposed() {
            m.push_str("; revoke it (keygate scan --revoke --reason leaked --yes) and remove it");
        }
        m
    }

    /// SARIF level: exposed keys are errors, keys that no longer work are warnings (still a
    /// secret in the source), unknown ones notes.
    fn level(&self) -> &'static str {
        match self.status.as_ref().map(|s| s.state) {
            _ if self.revoked => "warning",
            None | Some(LookupState::Live | LookupState::NotYetValid) => "error",
            Some(LookupState::Unknown) => "note",
            Some(_) => "warning",
        }
    }
}

/// Totals of a scan, for every format.
#[derive(Debug, Default)]
pub struct Summary {
    pub scanned: u64,
    pub bytes: u64,
    pub skipped: Vec<(String, String)>,
    pub errors: Vec<String>,
}

pub fn json_report(findings: &[Finding], s: &Summary) -> Value {
    json!({
        "findings": findings.iter().map(Finding::json).collect::<Vec<_>>(),
        "exposed": findings.iter().filter(|f| f.exposed()).count(),
        "scanned": s.scanned,
        "bytes": s.bytes,
        "skipped": s.skipped.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
        "errors": s.errors,
    })
}

const RULE_ID: &str = "keygate/api-key";

/// A relative URI reference for a display path: percent-encode what is not safe in a path
/// (`!` stays: it separates an archive from its entry).
fn uri(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A SARIF 2.1.0 log with one run and one rule. Columns count code points
/// (`columnKind: unicodeCodePoints`); `partialFingerprints` carry the hint and key id so code
/// scanning tracks one leak across commits.
pub fn sarif(findings: &[Finding], s: &Summary) -> Value {
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let key_len = f.key.chars().count() as u64;
            let mut fp = f.hint.clone();
            if let Some(id) = f.status.as_ref().and_then(|s| s.id.as_ref()) {
                fp = format!("{fp}:{id}");
            }
            json!({
                "ruleId": RULE_ID,
                "ruleIndex": 0,
                "level": f.level(),
                "message": {"text": f.message()},
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": {"uri": uri(&f.file)},
                        "region": {
                            "startLine": f.line,
                            "startColumn": f.column,
                            "endColumn": f.column + key_len,
                        }
                    }
                }],
                "partialFingerprints": {"keygateKey/v1": fp},
            })
        })
        .collect();
    let notifications: Vec<Value> = s
        .errors
        .iter()
        .map(|e| json!({"level": "error", "message": {"text": e}}))
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "keygate",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": [{
                    "id": RULE_ID,
                    "name": "LeakedApiKey",
                    "shortDescription": {"text": "A keygate API key is in the source"},
                    "fullDescription": {"text": "The text holds a valid keygate API key (prefix and checksum match). Anyone who can read it can call the APIs it grants."},
                    "help": {"text": "Revoke the key (keygate scan --revoke --reason leaked --yes, or keygate keys revoke ID), remove it from the file and its history, and load keys from a secret store instead."},
                    "defaultConfiguration": {"level": "error"},
                }],
            }},
            "columnKind": "unicodeCodePoints",
            "invocations": [{
                "executionSuccessful": s.errors.is_empty(),
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_keep_paths_and_archive_marks_and_escape_the_rest() {
        assert_eq!(uri("a b/c.tar.gz!x/y.txt"), "a%20b/c.tar.gz!x/y.txt");
        assert_eq!(uri("\u{e9}"), "%C3%A9");
    }
}
