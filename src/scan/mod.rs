//! `keygate scan PATH…`: find keygate API keys in files, trees, archives and stdin, by the key
//! format itself (prefix and checksum: no false positives), and report each one's place and
//! hint, never the key. Optionally look each up (`--check`) and revoke the exposed ones
//! (`--revoke`), audited with where they were found.
//!
//! `find` matches, `walk` reads (files, directories, gzip, tar), `check` talks to the store or
//! the control plane, `report` prints. Exit status: 0 nothing exposed found, 1 exposed keys
//! found (without `--check`, any valid key), 2 the scan could not be completed.

pub mod check;
pub mod find;
pub mod report;
pub mod walk;

use crate::cli::{say, Level};
use crate::config::Config;
use crate::keys::format::{hint, KeyFormat};
use check::{Source, Status};
use report::{Finding, Summary};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `keygate scan`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Files and directories (recursively) to scan; `-` reads stdin.
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Look each key up and report live, revoked, expired, not_yet_valid, canary or unknown
    /// with its id and owner: in the store the config names, or at --control-plane.
    #[arg(long)]
    pub check: bool,
    /// Revoke every key found that works now or will (live, not_yet_valid); implies --check
    /// and needs --reason and --yes. Canaries are left armed.
    #[arg(long, requires = "reason")]
    pub revoke: bool,
    /// Reason recorded with each revocation, e.g. `leaked`.
    #[arg(long)]
    pub reason: Option<String>,
    /// Confirm --revoke: it takes keys out of service at once.
    #[arg(long)]
    pub yes: bool,
    /// Ask this control plane (`http://host:port`, `https://…` with --ca) instead of the local
    /// store: needs an admin token of the read role (--check) or write role (--revoke).
    #[arg(long, env = "KEYGATE_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// File holding the admin token for --control-plane (default: env KEYGATE_ADMIN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA(s) that sign an https:// control plane's certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Print one JSON object (findings, totals, skipped, errors) instead of text lines.
    #[arg(long, conflicts_with = "sarif")]
    pub json: bool,
    /// Print a SARIF 2.1.0 log (for code scanning uploads) instead of text lines.
    #[arg(long)]
    pub sarif: bool,
    /// Descend into `.git` directories too (skipped by default).
    #[arg(long)]
    pub include_git: bool,
    /// Scan binary files too (skipped by default: a NUL in the first 8000 bytes).
    #[arg(long)]
    pub binary: bool,
    /// Do not open gzip and tar files (by default their content and entries are scanned).
    #[arg(long)]
    pub no_archives: bool,
    /// Largest file or decompressed entry read (e.g. 256MiB, 1GiB, 5000000); a larger one is
    /// not read and makes the scan incomplete (exit 2).
    #[arg(long, default_value = "256MiB")]
    pub max_size: String,
}

/// Exit statuses.
const NOTHING: u8 = 0;
const EXPOSED: u8 = 1;
const ERROR: u8 = 2;

/// Run a scan and turn it into the exit status. Errors are reported on stderr.
pub fn run(config_path: &Path, args: ScanArgs) -> ExitCode {
    match scan(config_path, &args) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            say(Level::Error, &format!("keygate scan: error: {message}"));
            ExitCode::from(ERROR)
        }
    }
}

/// `256MiB`, `1GiB`, `10MB`, `64KiB`, `5000000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "bad size {s:?}: use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The config when there is one; without a file, the defaults (`kg` prefix, `live`/`test`):
/// a plain scan needs only the key format.
fn config(path: &Path, needs_store: bool) -> Result<Config, String> {
    if path.exists() || needs_store {
        Config::load(path).map_err(|e| e.to_string())
    } else {
        Ok(Config::default())
    }
}

fn token(args: &ScanArgs) -> Result<String, String> {
    let raw = match &args.token_file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => std::env::var("KEYGATE_ADMIN_TOKEN").map_err(|_| {
            "--control-plane needs an admin token: --token-file FILE or env KEYGATE_ADMIN_TOKEN"
                .to_owned()
        })?,
    };
    let t = raw.trim().to_owned();
    if t.is_empty() {
        return Err("the admin token is empty".into());
    }
    Ok(t)
}

fn scan(config_path: &Path, args: &ScanArgs) -> Result<u8, String> {
    if args.revoke && !args.yes {
        return Err("--revoke takes keys out of service: confirm with --yes".into());
    }
    let checking = args.check || args.revoke;
    let local = checking && args.control_plane.is_none();
    let config = config(config_path, local)?;
    let format = KeyFormat::new(&config.keys.prefix, &config.keys.envs);
    let opts = walk::WalkOptions {
        include_git: args.include_git,
        binary: args.binary,
        archives: !args.no_archives,
        max_bytes: parse_size(&args.max_size)?,
    };
    // Connect before reading anything: a wrong token or URL fails fast.
    let source = match (&args.control_plane, checking) {
        (_, false) => None,
        (Some(url), true) => {
            Some(Source::remote(url, token(args)?, args.ca.as_deref()).map_err(|e| e.to_string())?)
        }
        (None, true) => Some(Source::local(&config).map_err(|e| e.to_string())?),
    };
    let (mut findings, summary) = collect(&format, &opts, &args.paths);
    let mut errors = summary.errors;
    if let Some(source) = &source {
        if let Err(e) = look_up(source, &mut findings) {
            errors.push(e);
        } else if args.revoke {
            errors.extend(revoke(
                source,
                args.reason.as_deref().unwrap_or(""),
                &mut findings,
            ));
        }
    }
    let summary = Summary { errors, ..summary };
    match print(args, &findings, &summary) {
        // Whoever reads stdout went away (`| head`): the exit status still says what was found.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.map_err(|e| format!("stdout: {e}"))?,
    }
    Ok(if !summary.errors.is_empty() {
        ERROR
    } else if findings.iter().any(Finding::exposed) {
        EXPOSED
    } else {
        NOTHING
    })
}

/// Walk every path and match every piece of text.
fn collect(
    format: &KeyFormat,
    opts: &walk::WalkOptions,
    paths: &[String],
) -> (Vec<Finding>, Summary) {
    let matcher = find::Matcher::new(format.clone());
    let mut findings = Vec::new();
    let mut visit = |name: &str, text: &[u8]| {
        for h in matcher.find(text) {
            let parsed = format.parse(&h.key).ok();
            findings.push(Finding {
                file: name.to_owned(),
                line: h.line,
                column: h.column,
                hint: hint(&h.key),
                env: parsed.map(|p| p.env.to_owned()).unwrap_or_default(),
                publishable: parsed.is_some_and(|p| p.publishable),
                key: h.key,
                status: None,
                revoked: false,
            });
        }
    };
    let mut walker = walk::Walker::new(opts, &mut visit);
    for p in paths {
        walker.arg(p);
    }
    let w = std::mem::take(&mut walker.walked);
    drop(walker);
    let summary = Summary {
        scanned: w.scanned,
        bytes: w.bytes,
        skipped: w.skipped,
        errors: w.errors,
    };
    (findings, summary)
}

/// Look each distinct key up once.
fn look_up(source: &Source, findings: &mut [Finding]) -> Result<(), String> {
    let mut seen: HashMap<String, Status> = HashMap::new();
    for f in findings.iter_mut() {
        let status = match seen.get(&f.key) {
            Some(s) => s.clone(),
            None => {
                let s = source.lookup(&f.key).map_err(|e| e.to_string())?;
                seen.insert(f.key.clone(), s.clone());
                s
            }
        };
        f.status = Some(status);
    }
    Ok(())
}

/// Revoke each exposed key once, audited with every place it was found. Returns the errors.
fn revoke(source: &Source, reason: &str, findings: &mut [Finding]) -> Vec<String> {
    let mut places: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in findings.iter().filter(|f| f.exposed()) {
        if let Some(id) = f.status.as_ref().and_then(|s| s.id.clone()) {
            places
                .entry(id)
                .or_default()
                .push(format!("{}:{}:{}", f.file, f.line, f.column));
        }
    }
    let mut errors = Vec::new();
    for (id, found_in) in &places {
        match source.revoke(id, reason, found_in) {
            Ok(()) => {
                for f in findings.iter_mut() {
                    if f.exposed() && f.status.as_ref().and_then(|s| s.id.as_ref()) == Some(id) {
                        f.revoked = true;
                    }
                }
                say(
                    Level::Info,
                    &format!("revoked {id} (found in {})", found_in.join(", ")),
                );
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors
}

fn print(args: &ScanArgs, findings: &[Finding], s: &Summary) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.sarif {
        writeln!(out, "{}", report::sarif(findings, s))?;
    } else if args.json {
        writeln!(out, "{}", report::json_report(findings, s))?;
    } else {
        for f in findings {
            writeln!(out, "{}", f.text())?;
        }
    }
    out.flush()?;
    for (path, why) in &s.skipped {
        if why != "binary" {
            say(Level::Warn, &format!("skipped {path}: {why}"));
        }
    }
    for e in &s.errors {
        say(Level::Error, &format!("keygate scan: {e}"));
    }
    let exposed = findings.iter().filter(|f| f.exposed()).count();
    say(
        Level::Info,
        &format!(
            "scanned {} file(s), {} bytes; {} key(s) found, {} exposed; {} skipped",
            s.scanned,
            s.bytes,
            findings.len(),
            exposed,
            s.skipped.len()
        ),
    );
    Ok(())
}
