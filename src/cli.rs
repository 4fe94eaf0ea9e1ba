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
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the config and the release checklist; non-zero exit listing every problem.
    Check,
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
    /// Hash-secret versions: which keys use which, for a secret rotation.
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Per secret version: configured, current, live keys under it, last seen, retirable.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run_secret(config: &Config, cmd: SecretCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    let now = crate::clock::unix_secs();
    match cmd {
        SecretCommand::Status { json } => {
            let latest = settings.latest_unverified().map_err(Failure)?;
            let ids: Vec<&str> = latest.keys().map(String::as_str).collect();
            let usage = load_usage(config, &settings, &ids);
            let rows = settings.secret_versions(latest.values(), &usage, now);
            if json {
                return out(&serde_json::to_string(&rows)?);
            }
            const WIDTHS: &[usize] = &[8, 10, 7, 9, 21, 0];
            let mut text = columns(
                WIDTHS,
                &[
                    "VERSION",
                    "CONFIGURED",
                    "CURRENT",
                    "LIVE KEYS",
                    "LAST SEEN",
                    "RETIRABLE",
                ],
            );
            for r in &rows {
                text.push_str(&columns(
                    WIDTHS,
                    &[
                        &r.version.to_string(),
                        if r.configured { "yes" } else { "NO" },
                        if r.current { "yes" } else { "no" },
                        &r.live_keys.to_string(),
                        &fmt_time(r.last_seen),
                        if r.retirable { "yes" } else { "no" },
                    ],
                ));
            }
            out(text.trim_end())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Mint a token; printed once (alone on stdout, or in one JSON object with --json).
    Create {
        #[arg(long, value_enum)]
        role: crate::control::tokens::Role,
        /// A note on who holds it (e.g. the gateway or CI job).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 90d; the token is refused from then on (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens (id, role, name, times, state; never a digest).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: the control plane refuses it from the next request on.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run_admin_token(config: &Config, cmd: AdminTokenCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    let path = config.resolve(&config.control.tokens);
    let now = crate::clock::unix_secs();
    match cmd {
        AdminTokenCommand::Create {
            role,
            name,
            expires_in,
            json,
        } => {
            let expires_at = expires_in
                .as_deref()
                .map(secs)
                .transpose()?
                .map(|s| {
                    if s > 0 {
                        Ok(now + s)
                    } else {
                        Err(Failure("--expires-in must be more than zero".into()))
                    }
                })
                .transpose()?;
            let minted = crate::control::tokens::create(
                &path,
                &settings.hasher,
                role,
                name,
                expires_at,
                now,
            )
            .map_err(|e| {
                Failure(format!(
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
                .with("role", role.as_str())
                .with("expires_at", expires_at)])
                .map_err(|e| Failure(format!("audit log {}: {e}", settings.audit_log.display())))?;
            if json {
                out(&serde_json::json!({"id": minted.record.id, "role": role.as_str(), "expires_at": expires_at, "token": minted.token}).to_string())?;
            } else {
                out(&minted.token)?;
            }
            eprintln!(
                "created admin token {} (role {}, expires {}); shown once",
                minted.record.id,
                role.as_str(),
                fmt_time(expires_at)
            );
            Ok(())
        }
        AdminTokenCommand::List { json } => {
            let tokens = crate::control::tokens::list(&path);
            if json {
                let rows: Vec<serde_json::Value> =
                    tokens.iter().map(|t| t.public_json(now)).collect();
                return out(&serde_json::Value::Array(rows).to_string());
            }
            const WIDTHS: &[usize] = &[30, 6, 8, 21, 21, 0];
            let mut text = columns(
                WIDTHS,
                &["ID", "ROLE", "STATE", "CREATED", "EXPIRES", "NAME"],
            );
            for t in &tokens {
                text.push_str(&columns(
                    WIDTHS,
                    &[
                        &t.id,
                        t.role.as_str(),
                        t.state(now).as_str(),
                        &fmt_time(Some(t.created_at)),
                        &fmt_time(t.expires_at),
                        t.name.as_deref().unwrap_or(""),
                    ],
                ));
            }
            out(text.trim_end())
        }
        AdminTokenCommand::Revoke { id, json } => {
            let audit = crate::audit::AuditLog::new(&settings.audit_log);
            let t =
                crate::control::tokens::revoke(&path, &audit, &crate::audit::os_user(), &id, now)?;
            eprintln!("revoked admin token {}", t.id);
            if json {
                out(&t.public_json(now).to_string())?;
            }
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
    /// Refuse the key until then: RFC 3339 (2026-12-24T09:00:00Z) or a duration from now
    /// (10m); the key is `pending` until then (create and import only).
    #[arg(long)]
    pub not_before: Option<String>,
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
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, default_value = "live")]
        env: String,
        #[command(flatten)]
        grants: GrantArgs,
        /// A key that is always rejected and raises an alarm when used.
        #[arg(long)]
        canary: bool,
        /// Browser-safe key (`kg_pub_live_…`): needs --allow-origin, works only from those
        /// origins and only on routes with `publishable = true`.
        #[arg(long, conflicts_with = "canary")]
        publishable: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys.
    List {
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        env: Option<String>,
        #[arg(long, value_enum)]
        state: Option<KeyState>,
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a key's grants or metadata (given scopes/IPs/origins replace the current ones).
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[command(flatten)]
        grants: GrantArgs,
        /// Remove the expiry.
        #[arg(long, conflicts_with = "expires_in")]
        no_expiry: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key at once; or, with --owner/--env/--label and --yes, every matching key.
    Revoke {
        #[arg(required_unless_present_any = ["owner", "env", "label"])]
        id: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, conflicts_with = "id")]
        owner: Option<String>,
        #[arg(long, conflicts_with = "id")]
        env: Option<String>,
        #[arg(long, conflicts_with = "id")]
        label: Option<String>,
        /// Confirm a mass revoke.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// New key with the same grants; the old one keeps working for the grace period.
    /// With --abort SUCCESSOR_ID: roll a rotation back instead.
    Rotate {
        #[arg(required_unless_present = "abort")]
        id: Option<String>,
        /// How long the old key keeps working, e.g. 48h (default: keys.rotate_grace).
        #[arg(long)]
        grace: Option<String>,
        /// Revoke the old key by itself once the new one has been used and the old one has
        /// been quiet this long, e.g. 1h (checked by `keygate serve` or `keygate control`).
        #[arg(long)]
        complete_when_idle: Option<String>,
        /// Roll back the rotation that minted SUCCESSOR_ID: it is revoked and the old key's
        /// expiry restored. Refused once the rotation completed.
        #[arg(long, value_name = "SUCCESSOR_ID", conflicts_with_all = ["id", "grace", "complete_when_idle"])]
        abort: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Keys whose expiry falls within a window.
    Expiring {
        #[arg(long, default_value = "14d")]
        within: String,
        #[arg(long)]
        json: bool,
    },
    /// Active keys not used for a while (last use from the usage file the gateway flushes).
    Stale {
        #[arg(long, default_value = "90d")]
        unused: String,
        #[arg(long)]
        json: bool,
    },
    /// Store digests of keys issued elsewhere (one key or JSON object per line).
    Import {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, default_value = "live")]
        env: String,
        #[arg(long, default_value = "imported")]
        name: String,
        #[command(flatten)]
        grants: GrantArgs,
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the store keeping the latest version of each key.
    Compact,
}

/// A failed command: message for stderr, and the exit code.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

fn secs(s: &str) -> Result<i64, Failure> {
    parse_duration(s)
        .map(|d| d.as_secs() as i64)
        .map_err(Failure)
}

fn labels(raw: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    raw.iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Failure(format!("bad label {l:?}: use key=value")))
        })
        .collect()
}

fn grants(
    name: String,
    owner: String,
    env: String,
    g: GrantArgs,
    (canary, publishable): (bool, bool),
    now: i64,
) -> Result<Grants, Failure> {
    Ok(Grants {
        publishable,
        not_before: g
            .not_before
            .as_deref()
            .map(|s| crate::keys::ops::parse_not_before(s, now))
            .transpose()?,
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

fn out(line: &str) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")?;
    o.flush()?;
    Ok(())
}

/// One line of a plain-text table: each cell left-aligned in its width, one space apart.
fn columns(widths: &[usize], cells: &[&str]) -> String {
    let mut line = cells
        .iter()
        .zip(widths)
        .map(|(c, w)| format!("{c:<w$}"))
        .collect::<Vec<_>>()
        .join(" ");
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
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
            eprintln!(
                "warning: cannot read usage from redis ({e}); showing this node's usage file"
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
        Err(e) => eprintln!("warning: cannot read quota use from redis ({e})"),
    }
    Some(v)
}

/// One key, as `keys show` (and `update`, `revoke --json`) print it: the same fields as a
/// `keys list --json` row, including last use (fleet-wide from Redis when configured) and,
/// for `show`, the quota used; the human form prints times as RFC 3339 like the list table.
fn print_record(
    r: &KeyRecord,
    usage: &Usage,
    extra: Option<serde_json::Map<String, serde_json::Value>>,
    now: i64,
    json: bool,
) -> Result<(), Failure> {
    let mut v = listed_json(r, usage, now);
    if let Some(obj) = v.as_object_mut() {
        obj.extend(extra.unwrap_or_default());
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
    eprintln!(
        "{verb} {} ({}, owner {:?}, env {}); the key above is shown once and cannot be recovered",
        record.id, record.name, record.owner, record.env
    );
    if let Some(nb) = record.not_before {
        eprintln!(
            "{} is pending: refused until {}",
            record.id,
            fmt_time(Some(nb))
        );
    }
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
            publishable,
            json,
        } => {
            let m = keys.create(
                &grants(name, owner, env, g, (canary, publishable), now)?,
                now,
            )?;
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
            let latest = crate::store::file::latest(keys.state()?.records);
            let r = latest
                .get(&id)
                .ok_or_else(|| crate::keys::ops::OpsError::NotFound(id.clone()))?;
            let pair = crate::keys::rotation::of(&latest, r);
            let mut ids = vec![r.id.as_str()];
            ids.extend(
                pair.map(|(o, n)| [o.id.as_str(), n.id.as_str()])
                    .into_iter()
                    .flatten(),
            );
            let usage = load_usage(config, &settings, &ids);
            let mut extra = serde_json::Map::new();
            if let Some(q) = quota_used(config, r) {
                extra.insert("quota_usage".into(), q);
            }
            if let Some((old, new)) = pair {
                extra.insert(
                    "rotation_status".into(),
                    crate::keys::rotation::report(old, new, &usage),
                );
            }
            print_record(r, &usage, Some(extra), now, json)
        }
        KeysCommand::Update {
            id,
            name,
            owner,
            grants: g,
            no_expiry,
            json,
        } => {
            if g.not_before.is_some() {
                return Err(Failure(
                    "--not-before is set at creation only (a key's validity start is part of what was issued)".into(),
                ));
            }
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
            eprintln!("updated {}", r.id);
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
            eprintln!("revoked {}", r.id);
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
                        .ok_or_else(|| Failure(format!("bad label {l:?}: use key=value")))
                })
                .transpose()?;
            if !yes {
                return Err(Failure(
                    "mass revoke needs --yes: it revokes every matching key at once".into(),
                ));
            }
            let done =
                keys.revoke_matching(&Selector { owner, env, label }, reason.as_deref(), now)?;
            eprintln!("revoked {} keys", done.revoked.len());
            if done.canaries_spared > 0 {
                eprintln!(
                    "left {} canary key(s) armed: revoking a canary disarms its alarm; revoke one by id if you mean it",
                    done.canaries_spared
                );
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
        KeysCommand::Rotate {
            abort: Some(successor),
            json,
            ..
        } => {
            let old = keys.abort_rotation(&successor, now)?;
            eprintln!(
                "aborted the rotation of {} to {successor}: {successor} is revoked, {} keeps working until {}",
                old.id,
                old.id,
                fmt_time(old.expires_at)
            );
            if json {
                print_record(&old, &Usage::new(), None, now, true)?;
            }
            Ok(())
        }
        KeysCommand::Rotate {
            id: None,
            abort: None,
            ..
        } => Err(Failure("give the id of the key to rotate".into())),
        KeysCommand::Rotate {
            id: Some(id),
            grace,
            complete_when_idle,
            json,
            ..
        } => {
            let grace = grace
                .as_deref()
                .map(secs)
                .transpose()?
                .unwrap_or(settings.rotate_grace_secs);
            let opts = crate::keys::ops::RotateOptions {
                grace_secs: grace,
                complete_when_idle_secs: complete_when_idle.as_deref().map(secs).transpose()?,
                old_requests: load_usage(config, &settings, &[id.as_str()])
                    .get(&id)
                    .map_or(0, |u| u.requests),
            };
            let m = keys.rotate(&id, opts, now)?;
            print_minted(&m.record, &m.key, now, json, &format!("rotated {id} to"))?;
            // What is stored, which is earlier than now + grace when the key expired sooner.
            let until = m.replaced.as_ref().and_then(|old| old.expires_at);
            eprintln!("{id} keeps working until {}", fmt_time(until));
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
                .map_err(|e| Failure(format!("cannot read {}: {e}", file.display())))?;
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let defaults = grants(name, owner, env, g, (false, false), now)?;
            let tty = std::io::stderr().is_terminal();
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
                eprintln!("line {line}: {why}");
            }
            eprintln!(
                "imported {}, duplicates {}, invalid {}",
                report.imported,
                report.duplicates,
                report.invalid.len()
            );
            if json {
                out(&serde_json::json!({"imported": report.imported, "duplicates": report.duplicates, "invalid": report.invalid.len()}).to_string())?;
            }
            Ok(())
        }
        KeysCommand::Compact => {
            let c = keys.compact(now)?;
            eprintln!(
                "compacted {}: kept {} keys ({} revoked past the retention kept as tombstones), dropped {} superseded versions",
                settings.store.display(),
                c.kept,
                c.tombstoned,
                c.dropped
            );
            Ok(())
        }
    }
}

fn warn_corrupt(corrupt: &[crate::store::Corrupt]) {
    for c in corrupt {
        eprintln!("warning: store line {} skipped: {}", c.line, c.reason);
    }
}

impl From<Failure> for ExitCode {
    fn from(f: Failure) -> ExitCode {
        eprintln!("keygate: error: {}", f.0);
        ExitCode::FAILURE
    }
}
