//! `keygate check`: validate the config and the release checklist, listing every problem.
//!
//! One function per checklist rule, each returning the problem text (or nothing), so the
//! README's list of what is checked maps one to one onto this file. What is deliberately not
//! checked, and why, is in the README ("Release checklist").

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
    problems.extend(touch_interval_problem(&config));
    let live = config.keys.envs.iter().any(|e| e == "live");
    problems.extend(
        crate::snapshot::allowed_origins(&config)
            .iter()
            .filter_map(|o| origin_problem(o, live)),
    );
    problems.extend(writable_problems(&config));
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

/// The last-use touch interval must be set (so the operator chose it) and be at least one
/// second: 0 would mean "flush on every tick" to some readers and "never" to others, and
/// the gateway clamps it to 1 s anyway.
fn touch_interval_problem(config: &Config) -> Option<String> {
    let (value, source) = match std::env::var("API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS") {
        Ok(v) => (
            Some(v.trim().to_owned()),
            "API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS",
        ),
        Err(_) => (
            config.keys.touch_interval_seconds.map(|s| s.to_string()),
            "keys.touch_interval_seconds",
        ),
    };
    match value.as_deref().map(str::parse::<u64>) {
        None => Some("last-use touch interval not set: set API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS or keys.touch_interval_seconds".into()),
        Some(Ok(0)) => Some(format!("{source} is 0: give the flush interval in seconds, at least 1 (e.g. 60)")),
        Some(Ok(_)) => None,
        Some(Err(_)) => Some(format!("{source} must be whole seconds")),
    }
}

/// An allowed origin must be exactly what a browser sends in `Origin` (RFC 6454 §6.2):
/// `https://host[:port]`, lowercase, no path, query, fragment, userinfo or trailing slash,
/// no wildcard and not `null` (sandboxed documents and `file:` pages send `null`, so allowing
/// it allows any of them). Plain `http://` only for localhost: elsewhere the key would travel
/// in clear text. (`*` is refused outright when live keys exist; it never matches anyway.)
pub fn origin_problem(origin: &str, live_keys: bool) -> Option<String> {
    let why = |w: &str| Some(format!("allowed origin {origin:?}: {w}"));
    if origin == "*" {
        return live_keys.then(|| {
            "allowed origins contain \"*\": list the browser origins explicitly for live keys"
                .to_string()
        });
    }
    if origin == "null" {
        return why(
            "`null` is what sandboxed frames and file: pages send; allowing it allows all of them",
        );
    }
    if origin.contains('*') {
        return why("wildcards are not supported: list each origin");
    }
    let (scheme, rest) = match origin.split_once("://") {
        Some((s @ ("https" | "http"), rest)) => (s, rest),
        _ => return why("give scheme://host[:port] with scheme https (or http for localhost)"),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return why("a browser origin has no path, query, fragment, user or trailing slash: give scheme://host[:port]");
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        return why("browsers send origins in lowercase; this one would never match");
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.starts_with('[') || h.ends_with(']')) => {
            (h, Some(p))
        }
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if !host_ok || !port_ok {
        return why("not a valid host[:port]");
    }
    if let Some(w) = unsent_form(scheme, host, port) {
        return why(&w);
    }
    let localhost = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
    if scheme == "http" && !localhost {
        return why("plain http outside localhost sends keys in clear text: use https");
    }
    None
}

/// A valid origin in a form no browser sends (it serialises the page's origin: no default
/// port, no leading zeros in the port, the host as served, which is without a trailing dot),
/// so it would never match: what to give instead.
fn unsent_form(scheme: &str, host: &str, port: Option<&str>) -> Option<String> {
    let default = if scheme == "https" { 443 } else { 80 };
    let port = match port.map(|p| (p, p.parse::<u16>())) {
        Some((p, Ok(n))) if n == default => {
            return Some(format!(
                "browsers omit the default port {p}, so the origin they send is: {scheme}://{}",
                host.trim_end_matches('.')
            ))
        }
        Some((p, Ok(n))) if p.starts_with('0') => {
            return Some(format!(
                "browsers send the port without leading zeros: {scheme}://{}:{n}",
                host.trim_end_matches('.')
            ))
        }
        Some((_, Ok(n))) => format!(":{n}"),
        _ => String::new(),
    };
    host.ends_with('.').then(|| {
        format!(
            "browsers send the host without the trailing dot (as pages are served): {scheme}://{}{port}",
            host.trim_end_matches('.')
        )
    })
}

/// Files the gateway writes must be writable by the user running the check (run it as the
/// service user): a path that exists must be a writable regular file; one that does not must
/// be creatable (its nearest existing ancestor a writable directory, probed with a temporary
/// file that is removed at once). The store is only written by the CLI, the control plane and
/// rotation completion on a single node; a gateway following a feed writes its feed cache.
///
/// Files replaced whole (`store::file::write_atomic`: a temp file renamed over them) under a
/// `<file>.lock` (`store::file::lock_beside`) need more: a writable directory, and a lock file
/// that can be opened. The usage file, its forensics file (`forensics::path_for`), the store
/// (compaction, its checkpoint beside it) and the feed cache are written that way; the audit
/// and access logs are only appended to.
fn writable_problems(config: &Config) -> Vec<String> {
    let usage = config.resolve(&config.keys.usage_file);
    let mut paths = vec![
        (
            "keys.audit_log",
            config.resolve(&config.keys.audit_log),
            false,
        ),
        ("keys.usage_file", usage.clone(), true),
        (
            "keys.usage_file (forensics)",
            crate::forensics::path_for(&usage),
            true,
        ),
    ];
    match config.keys.source.as_str() {
        "file" => paths.push(("keys.store", config.resolve(&config.keys.store), true)),
        "feed" => paths.push((
            "keys.feed_cache",
            config.resolve(&config.keys.feed_cache),
            true,
        )),
        // The Redis store is not a local file.
        _ => {}
    }
    if let Some(a) = &config.access_log {
        paths.push(("access_log.path", config.resolve(&a.path), false));
    }
    let mut problems = Vec::new();
    // One probe and one problem per directory, naming every file that needs it.
    let mut dirs: Vec<(std::path::PathBuf, Vec<&str>)> = Vec::new();
    for (field, path, atomic) in paths {
        if let Some(why) = not_writable(&path) {
            problems.push(format!("{field} {}: {why}", path.display()));
            continue;
        }
        if !atomic {
            continue;
        }
        let lock = crate::store::file::sibling(&path, ".lock");
        if let Some(why) = lock.exists().then(|| not_writable(&lock)).flatten() {
            problems.push(format!("{field} lock file {}: {why}", lock.display()));
        }
        let dir = dir_of(&path).to_path_buf();
        match dirs.iter_mut().find(|(d, _)| *d == dir) {
            Some((_, fields)) => fields.push(field),
            None => dirs.push((dir, vec![field])),
        }
    }
    for (dir, fields) in dirs {
        // A missing directory was judged above (its nearest existing ancestor was probed).
        if let Some(why) = dir.is_dir().then(|| not_creatable_in(&dir)).flatten() {
            problems.push(format!(
                "directory {} ({}): not writable ({why}); these files are replaced whole (a temporary file renamed over them, beside a .lock file), which needs a writable directory",
                dir.display(),
                fields.join(", ")
            ));
        }
    }
    problems
}

/// The directory `path` is in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Why `path` cannot be written (or created), if it cannot.
fn not_writable(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Some("is not a regular file".into()),
        Ok(_) => {
            return std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .err()
                .map(|e| format!("not writable ({e})"))
        }
        Err(_) => {}
    }
    let dir = path
        .ancestors()
        .skip(1)
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find(|d| d.exists())?;
    if !dir.is_dir() {
        return Some(format!("{} is not a directory", dir.display()));
    }
    not_creatable_in(dir).map(|why| format!("cannot be created in {} ({why})", dir.display()))
}

/// Why a file cannot be created in the directory `dir`, probed with a temporary file that is
/// removed at once.
fn not_creatable_in(dir: &Path) -> Option<String> {
    let probe = dir.join(format!(".keygate-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_rule_table() {
        for ok in [
            "https://app.example.com",
            "https://app.example.com:8443",
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:5173",
            "https://[2001:db8::1]",
        ] {
            assert_eq!(origin_problem(ok, true), None, "{ok}");
        }
        for bad in [
            "null",
            "https://*.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com?x",
            "https://u@app.example.com",
            "http://app.example.com",
            "ftp://app.example.com",
            "app.example.com",
            "https://App.Example.com",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://",
            "*",
        ] {
            assert!(origin_problem(bad, true).is_some(), "{bad}");
        }
        // Valid, but never what a browser sends: refused, naming the form it does send.
        for (unsent, sent) in [
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://localhost:80", "http://localhost"),
            ("http://[::1]:80", "http://[::1]"),
            (
                "https://app.example.com:08443",
                "https://app.example.com:8443",
            ),
            ("https://app.example.com:0443", "https://app.example.com"),
            ("https://app.example.com.", "https://app.example.com"),
            (
                "https://app.example.com.:8443",
                "https://app.example.com:8443",
            ),
        ] {
            let why = origin_problem(unsent, true).unwrap_or_default();
            assert!(why.ends_with(&format!(": {sent}")), "{unsent}: {why}");
        }
        // A non-default port is sent as given.
        assert_eq!(origin_problem("http://localhost:443", true), None);
        assert_eq!(origin_problem("https://app.example.com:80", true), None);
        assert_eq!(origin_problem("*", false), None, "test-only deployments");
    }

    #[test]
    fn writability() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(not_writable(&dir.path().join("new/deeper/file")), None);
        std::fs::write(dir.path().join("f"), "").unwrap();
        assert_eq!(not_writable(&dir.path().join("f")), None);
        assert!(not_writable(dir.path()).is_some(), "a directory");
        assert!(not_writable(&dir.path().join("f/under-a-file")).is_some());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "probe removed"
        );
    }

    /// Files replaced whole need their directory and their lock file, not only the file: a
    /// directory where the forensics file or a lock file should be is refused even for root.
    #[test]
    fn files_replaced_whole_need_their_lock_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[keys]\nusage_file = \"u/usage.json\"\n";
        let config = Config::parse(text, &dir.path().join("k.toml")).unwrap();
        std::fs::create_dir(dir.path().join("u")).unwrap();
        assert_eq!(writable_problems(&config), Vec::<String>::new());
        std::fs::create_dir(dir.path().join("u/usage.json.forensics.json")).unwrap();
        std::fs::create_dir(dir.path().join("u/usage.json.lock")).unwrap();
        let problems = writable_problems(&config);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("keys.usage_file lock file ")
                && problems[0].contains("not a regular file"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("keys.usage_file (forensics) ")
                && problems[1].contains("not a regular file"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_access_log_file_must_be_writable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "").unwrap();
        let text = "[keys]\naudit_log = \"a.jsonl\"\n[access_log]\npath = \"f/access.jsonl\"\n";
        let config = Config::parse(text, &dir.path().join("k.toml")).unwrap();
        let problems = writable_problems(&config);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("access_log.path "), "{problems:?}");
    }
}
