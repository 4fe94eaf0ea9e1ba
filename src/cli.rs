//! The command line: clap definitions and the `keys` subcommands' input/output.
//!
//! Output contract: `keys create` and `keys rotate` print the plaintext key exactly once, alone
//! on stdout (so `KEY=$(keygate keys create …)` works) or inside one JSON object under `--json`;
//! everything else goes to stderr. No command prints a digest.

use crate::config::{parse_duration, Config};
use crate::keys::ops::{Changes, Grants, Keys, Selector};
use crate::keys::record::{KeyRecord, KeyState};
use crate::keys::KeySettings;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "API-key gateway: mint keys, run the proxy, watch it"
)]
pub struct Cli {
    /// Config file; paths inside it resolve relative to it.
    #[arg(
        long,
        global = true,
        default_value = "config/keygate.toml",
        env = "KEYGATE_CONFIG"
    )]
    pub config: PathBuf,
    /// Log format on stderr: human text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Human,
        env = "KEYGATE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text for people (colours only on a terminal, never with NO_COLOR).
    Human,
    /// One JSON object per line, each with a message.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the config and the release checklist; non-zero exit listing every problem.
    Check {
        /// Print one JSON object (config, ok, problems, notes) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when a running gateway's admin /readyz answers 200 (for container health checks).
    Health {
        /// Admin address to ask; default: [admin] listen from the config (a wildcard address
        /// means this host's loopback).
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this long, e.g. 2s.
        #[arg(long, default_value = "2s")]
        timeout: String,
    },
    /// Print a shell completion script, e.g. `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `keygate man > /usr/local/share/man/man1/keygate.1`.
    Man,
    /// Start a demo upstream, a demo key store and the gateway, and print curl lines to try.
    Demo {
        /// Directory for the demo's config, store and logs.
        #[arg(long, default_value = "demo")]
        dir: PathBuf,
        /// Gateway listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin (metrics, health) listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: String,
    },
    /// Create, list, rotate and revoke API keys.
    #[command(subcommand)]
    Keys(Box<KeysCommand>),
    /// Run the control plane: admin REST API and the feed for gateways in fleet mode.
    Control,
    /// Mint admin tokens for the control plane.
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Mint a token; printed once (alone on stdout, or in one JSON object with --json).
    Create {
        /// What the token may do: read, write (read + changes) or feed (gateways).
        #[arg(long, value_enum)]
        role: crate::control::tokens::Role,
        /// A note on who holds it (e.g. the gateway or CI job).
        #[arg(long)]
        name: Option<String>,
        /// Print one JSON object (id, role, token) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
}

pub fn run_admin_token(config: &Config, cmd: AdminTokenCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    match cmd {
        AdminTokenCommand::Create { role, name, json } => {
            let path = config.resolve(&config.control.tokens);
            let minted = crate::control::tokens::create(
                &path,
                &settings.hasher,
                role,
                name,
                crate::clock::unix_secs(),
            )
            .map_err(|e| {
                Failure::Error(format!(
                    "cannot write admin tokens to {}: {e}",
                    path.display()
                ))
            })?;
            let audit = crate::audit::AuditLog::new(&settings.audit_log);
            audit
                .append(&[crate::audit::Event::new(
                    "admin_token.created",
                    &crate::audit::os_user(),
                )
                .with("token_id", minted.record.id.clone())
                .with("role", role.as_str())])
                .map_err(|e| {
                    Failure::Error(format!("audit log {}: {e}", settings.audit_log.display()))
                })?;
            if json {
                out(&serde_json::json!({"id": minted.record.id, "role": role.as_str(), "token": minted.token}).to_string())?;
            } else {
                out(&minted.token)?;
            }
            say(
                Level::Info,
                &format!(
                    "created admin token {} (role {}); shown once",
                    minted.record.id,
                    role.as_str()
                ),
            );
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// Scope the key holds (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Named plan from [plans.*].
    #[arg(long, conflicts_with = "rate")]
    pub plan: Option<String>,
    /// Own rate, e.g. 100/s.
    #[arg(long)]
    pub rate: Option<String>,
    /// Calendar quota, e.g. 100000/month (also /day, /hour; UTC); needs [redis].
    #[arg(long)]
    pub quota: Option<String>,
    /// Lifetime, e.g. 90d.
    #[arg(long)]
    pub expires_in: Option<String>,
    /// Client network allowed to use the key (repeatable CIDR).
    #[arg(long = "allow-ip")]
    pub allow_ips: Vec<IpNet>,
    /// Browser origin allowed to use the key (repeatable).
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Label k=v (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Mint a key; the plaintext is printed once.
    Create {
        /// Human-readable name, e.g. the service that holds the key.
        #[arg(long)]
        name: String,
        /// Team or person responsible for the key (required by the default policy).
        #[arg(long, default_value = "")]
        owner: String,
        /// Environment: live or test (a prefix of the key; routes may require one).
        #[arg(long, default_value = "live")]
        env: String,
        #[command(flatten)]
        grants: GrantArgs,
        /// A key that is always rejected and raises an alarm when used.
        #[arg(long)]
        canary: bool,
        /// Print one JSON object (id, key, record) instead of the bare key.
        #[arg(long)]
        json: bool,
    },
    /// List keys.
    List {
        /// Only keys of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Only keys of this environment.
        #[arg(long)]
        env: Option<String>,
        /// Only keys in this state.
        #[arg(long, value_enum)]
        state: Option<KeyState>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show {
        /// Key id (key_…).
        id: String,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change a key's grants or metadata (given scopes/IPs/origins replace the current ones).
    Update {
        /// Key id (key_…).
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Refused: the owner is fixed at creation (kept for a clear error).
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        grants: GrantArgs,
        /// Remove the expiry.
        #[arg(long, conflicts_with = "expires_in")]
        no_expiry: bool,
        /// Print the updated record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once; or, with --owner/--env/--label and --yes, every matching key.
    Revoke {
        /// Key id (key_…) to revoke.
        #[arg(required_unless_present_any = ["owner", "env", "label"])]
        id: Option<String>,
        /// Why, for the audit log (e.g. leaked).
        #[arg(long)]
        reason: Option<String>,
        /// Mass revoke: every key of this owner (needs --yes).
        #[arg(long, conflicts_with = "id")]
        owner: Option<String>,
        /// Mass revoke: every key of this environment (needs --yes).
        #[arg(long, conflicts_with = "id")]
        env: Option<String>,
        /// Mass revoke: every key with this label k=v (needs --yes).
        #[arg(long, conflicts_with = "id")]
        label: Option<String>,
        /// Confirm a mass revoke.
        #[arg(long)]
        yes: bool,
        /// Print the revoked record(s) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// New key with the same grants; the old one keeps working for the grace period.
    Rotate {
        /// Key id (key_…) to rotate.
        id: String,
        /// How long the old key keeps working, e.g. 48h (default: keys.rotate_grace).
        #[arg(long)]
        grace: Option<String>,
        /// Print one JSON object (id, key, record) instead of the bare key.
        #[arg(long)]
        json: bool,
    },
    /// Keys whose expiry falls within a window.
    Expiring {
        /// Window from now, e.g. 14d.
        #[arg(long, default_value = "14d")]
        within: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Active keys not used for a while (last use from the usage file the gateway flushes).
    Stale {
        /// Not used for at least this long, e.g. 90d.
        #[arg(long, default_value = "90d")]
        unused: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Store digests of keys issued elsewhere (one key or JSON object per line).
    Import {
        /// File of keys: one plaintext key or JSON object per line (only digests are stored).
        #[arg(long)]
        file: PathBuf,
        /// Owner for lines that name none.
        #[arg(long, default_value = "")]
        owner: String,
        /// Environment for lines that name none.
        #[arg(long, default_value = "live")]
        env: String,
        /// Name for lines that name none.
        #[arg(long, default_value = "imported")]
        name: String,
        #[command(flatten)]
        grants: GrantArgs,
        /// Print the import counts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the store keeping the latest version of each key.
    Compact {
        /// Print the compaction counts as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How a command failed.
#[derive(Debug)]
pub enum Failure {
    /// A message for stderr; exit status 1.
    Error(String),
    /// Whoever reads our stdout went away (`keygate keys list | head -1`): not an error of
    /// ours, so exit 0 quietly, as Unix tools do.
    ClosedPipe,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Error(e.to_string())
    }
}

impl Failure {
    /// A write to stdout failed: a closed pipe, or a real error.
    pub fn stdout(e: std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure::ClosedPipe
        } else {
            Failure::Error(format!("stdout: {e}"))
        }
    }

    /// Report on stderr and give the exit status.
    pub fn exit(self) -> ExitCode {
        match self {
            Failure::ClosedPipe => ExitCode::SUCCESS,
            Failure::Error(message) => {
                say(Level::Error, &format!("keygate: error: {message}"));
                ExitCode::FAILURE
            }
        }
    }
}

/// The stderr format of this process, set once by `main` from `--log-format`.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

pub fn set_log_format(format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
}

pub fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or(LogFormat::Human)
}

/// Severity of a [`say`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One line for the operator on stderr (never on stdout: that is for keys and `--json`). Under
/// `--log-format json` it is one JSON object shaped like the tracing lines (`timestamp`,
/// `level`, `target`, `message`), so a pipeline that parses every line as JSON also gets
/// the CLI's notes and the reason a process stopped.
pub fn say(level: Level, text: &str) {
    let line = match log_format() {
        LogFormat::Human => text.to_owned(),
        LogFormat::Json => serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": level.as_str(),
            "target": "keygate",
            "message": text,
        })
        .to_string(),
    };
    // Nothing more to do if stderr is gone too.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn secs(s: &str) -> Result<i64, Failure> {
    parse_duration(s)
        .map(|d| d.as_secs() as i64)
        .map_err(Failure::Error)
}

fn labels(raw: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    raw.iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Failure::Error(format!("bad label {l:?}: use key=value")))
        })
        .collect()
}

fn grants(
    name: String,
    owner: String,
    env: String,
    g: GrantArgs,
    canary: bool,
) -> Result<Grants, Failure> {
    Ok(Grants {
        name,
        owner,
        env,
        scopes: g.scopes,
        plan: g.plan,
        rate: g.rate,
        quota: g.quota,
        expires_in_secs: g.expires_in.as_deref().map(secs).transpose()?,
        allow_ips: g.allow_ips,
        allow_origins: g.allow_origins,
        labels: labels(&g.labels)?,
        canary,
    })
}

/// Every stdout line of the CLI goes through here, so a closed pipe is handled in one place.
pub fn out(line: &str) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")
        .and_then(|()| o.flush())
        .map_err(Failure::stdout)
}

fn fmt_time(t: Option<i64>) -> String {
    match t {
        Some(t) if t >= 0 => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
        )
        .to_string(),
        Some(_) => "-".into(),
        None => "never".into(),
    }
}

fn print_table(records: &[&KeyRecord], usage: &Usage, now: i64) -> Result<(), Failure> {
    let mut text = format!(
        "{:<31} {:<20} {:<16} {:<5} {:<8} {:<21} {:<21} {}\n",
        "ID", "NAME", "OWNER", "ENV", "STATE", "EXPIRES", "LAST USED", "SCOPES"
    );
    for r in records {
        let last = usage
            .get(&r.id)
            .map(|u| fmt_time(Some(u.last_used)))
            .unwrap_or_else(|| "never".into());
        text.push_str(&format!(
            "{:<31} {:<20} {:<16} {:<5} {:<8} {:<21} {:<21} {}\n",
            r.id,
            truncate(&r.name, 20),
            truncate(&r.owner, 16),
            r.env,
            r.state(now).as_str(),
            fmt_time(r.expires_at),
            last,
            r.scopes.join(",")
        ));
    }
    out(text.trim_end())
}

type Usage = std::collections::BTreeMap<String, crate::usage::Used>;

/// A record's JSON for listings: public fields plus last use, when known.
fn listed_json(r: &KeyRecord, usage: &Usage, now: i64) -> serde_json::Value {
    let mut v = r.public_json(now);
    if let Some(u) = usage.get(&r.id) {
        v["last_used"] = u.last_used.into();
        v["requests"] = u.requests.into();
        v["status_classes"] = serde_json::json!({"2xx": u.s2xx, "4xx": u.s4xx, "5xx": u.s5xx});
    }
    v
}

fn print_rows(rows: &[&KeyRecord], usage: &Usage, now: i64, json: bool) -> Result<(), Failure> {
    if json {
        let arr = rows.iter().map(|r| listed_json(r, usage, now)).collect();
        out(&serde_json::Value::Array(arr).to_string())
    } else {
        print_table(rows, usage, now)
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Usage of `ids`: fleet-wide from Redis when `[redis]` is configured, else the usage file.
fn load_usage(config: &Config, settings: &KeySettings, ids: &[&str]) -> Usage {
    let Ok(Some(redis)) = crate::redis::Settings::from_config(config) else {
        return crate::usage::read(&settings.usage_file);
    };
    let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    match crate::redis::blocking(redis, |c| async move {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::redis::usage::read(&c, &ids).await
    }) {
        Ok(u) => u,
        Err(e) => {
            say(
                Level::Warn,
                &format!(
                    "warning: cannot read usage from redis ({e}); showing this node's usage file"
                ),
            );
            crate::usage::read(&settings.usage_file)
        }
    }
}

/// The quota that applies to `r` and what has been used of it this period (from Redis).
fn quota_used(config: &Config, r: &KeyRecord) -> Option<serde_json::Value> {
    use crate::redis::quota::{self, Quota};
    let plan = r.plan.as_deref().unwrap_or("default");
    let text = r
        .quota
        .clone()
        .or_else(|| config.plans.get(plan).and_then(|p| p.quota.clone()))?;
    let q = Quota::parse(&text).ok()?;
    let redis = crate::redis::Settings::from_config(config).ok()??;
    let key = quota::key(&redis.prefix, &r.lineage, q);
    let mut v = serde_json::json!({ "quota": q.to_string() });
    match crate::redis::blocking(redis, |c| async move { quota::used(&c, &key, q).await }) {
        Ok(t) => {
            v["used"] = t.used.into();
            v["resets_in_seconds"] = t.reset.as_secs().into();
        }
        Err(e) => say(
            Level::Warn,
            &format!("warning: cannot read quota use from redis ({e})"),
        ),
    }
    Some(v)
}

/// One key, as `keys show` (and `update`, `revoke --json`) print it: the same fields as a
/// `keys list --json` row, including last use (fleet-wide from Redis when configured) and,
/// for `show`, the quota used; the human form prints times as RFC 3339 like the list table.
fn print_record(
    r: &KeyRecord,
    usage: &Usage,
    extra: Option<serde_json::Value>,
    now: i64,
    json: bool,
) -> Result<(), Failure> {
    let mut v = listed_json(r, usage, now);
    if let Some(q) = extra {
        v["quota_usage"] = q;
    }
    if json {
        return out(&v.to_string());
    }
    let mut text = String::new();
    if let Some(obj) = v.as_object() {
        for (k, v) in obj {
            let shown = match (k.as_str(), v.as_i64()) {
                ("created_at" | "expires_at" | "revoked_at" | "not_before" | "last_used", t) => {
                    fmt_time(t)
                }
                ("written_at_ms", Some(ms)) if ms >= 0 => humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64),
                )
                .to_string(),
                _ => v.to_string(),
            };
            text.push_str(&format!("{k:<15} {shown}\n"));
        }
    }
    out(text.trim_end())
}

/// Print a freshly minted key: alone on stdout, or inside one JSON object.
fn print_minted(
    record: &KeyRecord,
    key: &str,
    now: i64,
    json: bool,
    verb: &str,
) -> Result<(), Failure> {
    if json {
        let mut v = record.public_json(now);
        if let Some(o) = v.as_object_mut() {
            o.insert("key".into(), key.into());
        }
        out(&v.to_string())?;
    } else {
        out(key)?;
    }
    say(
        Level::Info,
        &format!(
        "{verb} {} ({}, owner {:?}, env {}); the key above is shown once and cannot be recovered",
        record.id, record.name, record.owner, record.env
    ),
    );
    Ok(())
}

pub fn run_keys(config: &Config, cmd: KeysCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    let keys = Keys::new(&settings, crate::audit::os_user());
    let now = crate::clock::unix_secs();
    match cmd {
        KeysCommand::Create {
            name,
            owner,
            env,
            grants: g,
            canary,
            json,
        } => {
            let m = keys.create(&grants(name, owner, env, g, canary)?, now)?;
            print_minted(&m.record, &m.key, now, json, "created")
        }
        KeysCommand::List {
            owner,
            env,
            state,
            json,
        } => {
            let parsed = keys.state()?;
            warn_corrupt(&parsed.corrupt);
            let latest = crate::store::file::latest(parsed.records);
            let mut rows: Vec<&KeyRecord> = latest
                .values()
                .filter(|r| owner.as_ref().is_none_or(|o| &r.owner == o))
                .filter(|r| env.as_ref().is_none_or(|e| &r.env == e))
                .filter(|r| state.is_none_or(|s| r.state(now) == s))
                .collect();
            // Id breaks ties within a second, so the order is the same on every run.
            rows.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            print_rows(&rows, &load_usage(config, &settings, &ids), now, json)
        }
        KeysCommand::Show { id, json } => {
            let r = keys.show(&id)?;
            let usage = load_usage(config, &settings, &[r.id.as_str()]);
            print_record(&r, &usage, quota_used(config, &r), now, json)
        }
        KeysCommand::Update {
            id,
            name,
            owner,
            grants: g,
            no_expiry,
            json,
        } => {
            let changes = Changes {
                name,
                owner,
                scopes: (!g.scopes.is_empty()).then_some(g.scopes),
                plan: g.plan.map(Some),
                rate: g.rate.map(Some),
                quota: g.quota.map(Some),
                expires_in_secs: if no_expiry {
                    Some(None)
                } else {
                    g.expires_in.as_deref().map(secs).transpose()?.map(Some)
                },
                allow_ips: (!g.allow_ips.is_empty()).then_some(g.allow_ips),
                allow_origins: (!g.allow_origins.is_empty()).then_some(g.allow_origins),
                labels: labels(&g.labels)?,
            };
            let r = keys.update(&id, &changes, now)?;
            say(Level::Info, &format!("updated {}", r.id));
            let usage = load_usage(config, &settings, &[r.id.as_str()]);
            print_record(&r, &usage, None, now, json)
        }
        KeysCommand::Revoke {
            id: Some(id),
            reason,
            json,
            ..
        } => {
            let r = keys.revoke(&id, reason.as_deref(), now)?;
            say(Level::Info, &format!("revoked {}", r.id));
            if json {
                print_record(&r, &Usage::new(), None, now, true)?;
            }
            Ok(())
        }
        KeysCommand::Revoke {
            id: None,
            reason,
            owner,
            env,
            label,
            yes,
            json,
        } => {
            let label = label
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| Failure::Error(format!("bad label {l:?}: use key=value")))
                })
                .transpose()?;
            if !yes {
                return Err(Failure::Error(
                    "mass revoke needs --yes: it revokes every matching key at once".into(),
                ));
            }
            let done =
                keys.revoke_matching(&Selector { owner, env, label }, reason.as_deref(), now)?;
            say(Level::Info, &format!("revoked {} keys", done.revoked.len()));
            if done.canaries_spared > 0 {
                say(Level::Info, &format!(
                    "left {} canary key(s) armed: revoking a canary disarms its alarm; revoke one by id if you mean it",
                    done.canaries_spared
                ));
            }
            if json {
                let ids: Vec<&str> = done.revoked.iter().map(|r| r.id.as_str()).collect();
                out(
                    &serde_json::json!({ "revoked": ids, "canaries_spared": done.canaries_spared })
                        .to_string(),
                )?;
            }
            Ok(())
        }
        KeysCommand::Rotate { id, grace, json } => {
            let grace = grace
                .as_deref()
                .map(secs)
                .transpose()?
                .unwrap_or(settings.rotate_grace_secs);
            let m = keys.rotate(&id, grace, now)?;
            print_minted(&m.record, &m.key, now, json, &format!("rotated {id} to"))?;
            // What is stored, which is earlier than now + grace when the key expired sooner.
            let until = m.replaced.as_ref().and_then(|old| old.expires_at);
            say(
                Level::Info,
                &format!("{id} keeps working until {}", fmt_time(until)),
            );
            Ok(())
        }
        KeysCommand::Expiring { within, json } => {
            let horizon = now + secs(&within)?;
            let latest = crate::store::file::latest(keys.state()?.records);
            let mut rows: Vec<&KeyRecord> = latest
                .values()
                .filter(|r| {
                    r.state(now) == KeyState::Active && r.expires_at.is_some_and(|e| e <= horizon)
                })
                .collect();
            rows.sort_by_key(|r| r.expires_at);
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            print_rows(&rows, &load_usage(config, &settings, &ids), now, json)
        }
        KeysCommand::Stale { unused, json } => {
            let before = now - secs(&unused)?;
            let latest = crate::store::file::latest(keys.state()?.records);
            let ids: Vec<&str> = latest.values().map(|r| r.id.as_str()).collect();
            let usage = load_usage(config, &settings, &ids);
            // Never used counts from creation, so a key minted yesterday is not stale.
            let last_use = |r: &KeyRecord| {
                usage
                    .get(&r.id)
                    .map_or(r.created_at, |u| u.last_used.max(r.created_at))
            };
            let mut rows: Vec<&KeyRecord> = latest
                .values()
                .filter(|r| r.state(now) == KeyState::Active && last_use(r) < before)
                .collect();
            rows.sort_by_key(|r| last_use(r));
            print_rows(&rows, &usage, now, json)
        }
        KeysCommand::Import {
            file,
            owner,
            env,
            name,
            grants: g,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure::Error(format!("cannot read {}: {e}", file.display())))?;
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let defaults = grants(name, owner, env, g, false)?;
            // A progress counter only for a human at a terminal (never inside JSON logs).
            let tty = std::io::stderr().is_terminal() && log_format() == LogFormat::Human;
            let total = lines.len();
            let report = keys.import(&lines, &defaults, now, |i| {
                if tty && (i % 1000 == 0 || i == total) {
                    eprint!("\rimporting {i}/{total}");
                }
            })?;
            if tty {
                eprintln!();
            }
            for (line, why) in &report.invalid {
                say(Level::Warn, &format!("line {line}: {why}"));
            }
            say(
                Level::Info,
                &format!(
                    "imported {}, duplicates {}, invalid {}",
                    report.imported,
                    report.duplicates,
                    report.invalid.len()
                ),
            );
            if json {
                out(&serde_json::json!({"imported": report.imported, "duplicates": report.duplicates, "invalid": report.invalid.len()}).to_string())?;
            }
            Ok(())
        }
        KeysCommand::Compact { json } => {
            let c = keys.compact(now)?;
            say(Level::Info, &format!(
                "compacted {}: kept {} keys ({} revoked past the retention kept as tombstones), dropped {} superseded versions",
                settings.store.display(),
                c.kept,
                c.tombstoned,
                c.dropped
            ));
            if json {
                out(&serde_json::json!({"store": settings.store, "kept": c.kept, "tombstoned": c.tombstoned, "dropped": c.dropped}).to_string())?;
            }
            Ok(())
        }
    }
}

fn warn_corrupt(corrupt: &[crate::store::Corrupt]) {
    for c in corrupt {
        say(
            Level::Warn,
            &format!("warning: store line {} skipped: {}", c.line, c.reason),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument and every command says what it is for (`--help`, completions and the
    /// man page all come from these strings).
    #[test]
    fn every_argument_and_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} <{id}>"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub
                    .get_about()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "keygate", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
        // The walk sees the tree (a walk of nothing would pass).
        assert!(cmd
            .find_subcommand("keys")
            .is_some_and(|k| k.get_subcommands().count() >= 10));
    }
}
