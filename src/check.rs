//! `keygate check`: validate the config and the release checklist, listing every problem.

use crate::config::{Config, ConfigError};
use crate::keys::KeySettings;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use std::path::Path;

/// Returns the problems found (empty: ready to ship) and notes worth printing anyway.
pub fn check(config_path: &Path) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return (vec![e.to_string()], notes),
    };
    for o in &config.overrides {
        notes.push(format!("{} set by {}", o.field, o.var));
    }
    match KeySettings::from_config(&config) {
        // Config errors already name file, line and field; only secret problems need context.
        Err(e @ ConfigError::Secret(_)) => problems.push(format!("hash secret: {e}")),
        Err(e) => problems.push(e.to_string()),
        Ok(settings) => {
            if let Err(e) = Snapshot::build(config.clone(), &Metrics::new(0)) {
                problems.push(e.to_string());
            }
            // Keys per secret version: a version in use without a secret is a fleet of 401s.
            // Only the file store is local; a feed gateway's control plane checks its own.
            if config.keys.source == "file" {
                match settings.check_secret_versions(crate::clock::unix_secs()) {
                    Ok(warnings) => {
                        notes.extend(warnings.into_iter().map(|w| format!("warning: {w}")))
                    }
                    Err(found) => problems.extend(found),
                }
            }
        }
    }
    if std::env::var_os("API_KEY_DEFAULT_RATE_LIMIT").is_none()
        && !config.plans.contains_key("default")
    {
        problems.push(
            "no default rate limit: set API_KEY_DEFAULT_RATE_LIMIT or define [plans.default]"
                .into(),
        );
    }
    if std::env::var_os("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS").is_none()
        && config.keys.touch_interval_seconds.is_none()
    {
        problems.push("last-use touch interval not set: set API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS or keys.touch_interval_seconds".into());
    }
    let origins: Vec<String> = match std::env::var("ALLOWED_ORIGINS") {
        Ok(v) => v.split(',').map(|s| s.trim().to_owned()).collect(),
        Err(_) => config.cors.allowed_origins.clone(),
    };
    if origins.iter().any(|o| o == "*") && config.keys.envs.iter().any(|e| e == "live") {
        problems.push(
            "allowed origins contain \"*\": list the browser origins explicitly for live keys"
                .into(),
        );
    }
    if let Ok(addr) = config.admin.listen.parse::<std::net::SocketAddr>() {
        if !addr.ip().is_loopback() {
            notes.push(format!("admin listener {addr} is not loopback: make sure only Prometheus and your orchestrator reach it"));
        }
    }
    if config.keys.source == "file" {
        check_store_path(
            &config.resolve(&config.keys.store),
            &mut problems,
            &mut notes,
        );
    }
    (problems, notes)
}

/// The gateway creates a missing store empty when its directory exists (a fresh install comes
/// up Ready with zero keys) and fails closed when the directory is missing, so only that is a
/// problem. Writability is not probed: `check` writes nothing, and the gateway logs a failed
/// create loudly.
fn check_store_path(store: &Path, problems: &mut Vec<String>, notes: &mut Vec<String>) {
    if store.exists() {
        return;
    }
    let dir = store
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.is_dir() {
        notes.push(format!(
            "key store {} does not exist yet: the gateway creates it empty at start (zero keys, ready)",
            store.display()
        ));
    } else {
        problems.push(format!(
            "key store directory {} does not exist: the gateway fails closed (503) until it does (volume not mounted?)",
            dir.display()
        ));
    }
}
