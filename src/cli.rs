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
pub enum WebhooksCommand {
    /// Send one signed sample delivery to URL now (not queued); exit 1 unless it answers 2xx.
    Test {
        /// The receiver: a configured [[webhooks]] url (its secret and CA are used), or any
        /// URL with --secret-env.
        url: String,
        /// Event type of the sample.
        #[arg(long, default_value = "key.revoked")]
        event: String,
        /// Env var holding the signing secret (≥ 32 bytes), for a URL not in the config.
        #[arg(long)]
        secret_env: Option<String>,
        /// PEM CA bundle for an https:// URL not in the config.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

/// `keygate webhooks …`.
pub fn run_webhooks(config: &Config, cmd: WebhooksCommand) -> Result<(), Failure> {
    match cmd {
        WebhooksCommand::Test {
            url,
            event,
            secret_env,
            ca_file,
        } => {
            let (id, status) = crate::webhooks::sample::run(
                config,
                &url,
                &event,
                secret_env.as_deref(),
                ca_file.as_deref(),
            )?;
            out(&format!(
                "delivered {event} sample {id} to {url}: HTTP {status}"
            ))
        }
    }
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
    /// Webhook receivers: send a signed sample delivery.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Governance figures from the store and the audit log: rotation success and time, TTL
    /// within policy, stale keys found and removed, canary alarm to revocation.
    Report {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create, list, rotate and revoke API keys.
    #[command(subcommand)]
    Keys(Box<KeysCommand>),
    /// Run the control plane: admin REST API and the feed for gateways in fleet mode.
    Control,
    /// Mint admin tokens for the control plane.
    #[command(subcommand)]
    AdminToken(AdminTokenCommand),
    /// The key store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Hash-secret versions: which keys use which, for a secret rotation.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Find keygate API keys in files, trees, gzip/tar archives and stdin (prefix and
    /// checksum: no false positives); exit 0 none exposed, 1 exposed keys found, 2 error.
    Scan(Box<crate::scan::ScanArgs>),
    /// Signing keys of short-lived tokens (`POST /v1/tokens`): keygen, rotate, list, jwks.
    #[command(subcommand)]
    Tokens(crate::tokens::cli::TokensCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Per secret version: configured, current, live keys under it, last seen, retirable;
    /// under a version that is not current, the ids of the keys still on it (the first 20,
    /// then "and N more").
    Status {
        /// Print a JSON array (one object per version, with its `ids`: the first 20 live
        /// keys' ids) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the steps that add a new hash-secret version (N+1) to the config: the current
    /// secret moves to `[[keys.previous_secrets]]`, a fresh one becomes current. Writes
    /// nothing and prints no secret; existing keys keep working under their version.
    Rotate {
        /// Print a JSON object (new version, previous-secret entry, shell steps) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The config edit of a secret rotation, derived from the current `[keys]` settings.
fn rotation_plan(k: &crate::config::KeysConfig) -> serde_json::Value {
    let current = k.hash_secret_version;
    let next = current.saturating_add(1);
    // The old secret stays where it is (file) or is kept under a versioned variable (env),
    // so the current variable can take the new secret.
    let (previous, shell) = match &k.hash_secret_file {
        Some(file) => {
            let new_file = format!("{}.v{next}", file.display());
            (
                serde_json::json!({"version": current, "file": file.display().to_string()}),
                vec![
                    format!("(umask 077 && openssl rand -base64 48 > {new_file})"),
                    format!("# then set  hash_secret_file = \"{new_file}\""),
                ],
            )
        }
        None => {
            let old_env = format!("{}_V{current}", k.hash_secret_env);
            (
                serde_json::json!({"version": current, "env": old_env}),
                vec![
                    format!("export {old_env}=\"${}\"", k.hash_secret_env),
                    format!(
                        "export {}=\"$(openssl rand -base64 48)\"",
                        k.hash_secret_env
                    ),
                ],
            )
        }
    };
    let mut toml = format!(
        "[keys]\nhash_secret_version = {next}\n\n[[keys.previous_secrets]]\nversion = {current}\n"
    );
    if let Some(f) = previous["file"].as_str() {
        toml.push_str(&format!("file = \"{f}\"\n"));
    }
    if let Some(e) = previous["env"].as_str() {
        toml.push_str(&format!("env = \"{e}\"\n"));
    }
    serde_json::json!({
        "current_version": current,
        "new_version": next,
        "previous_secret": previous,
        "shell": shell,
        "config": toml,
        "then": [
            "keygate check (the new and every previous version must have a secret)",
            "reload every gateway and the control plane (SIGHUP or restart); new keys use the new version, old keys keep working",
            "keygate secret status: retire the old version once it is retirable (rotate or revoke the keys still on it)"
        ],
    })
}

pub fn run_secret(config: &Config, cmd: SecretCommand) -> Result<(), Failure> {
    let now = crate::clock::unix_secs();
    match cmd {
        SecretCommand::Rotate { json } => {
            let plan = rotation_plan(&config.keys);
            if json {
                return out(&plan.to_string());
            }
            let mut t = format!(
                "Rotate the hash secret from version {} to {}:\n\n1. Keep the current secret and make a new one:\n",
                plan["current_version"], plan["new_version"]
            );
            for line in plan["shell"].as_array().into_iter().flatten() {
                t.push_str(&format!("   {}\n", line.as_str().unwrap_or("")));
            }
            t.push_str("\n2. In the config (hash_secret_version in the existing [keys]; keep any\n   existing [[keys.previous_secrets]]):\n\n");
            for line in plan["config"].as_str().unwrap_or("").lines() {
                if line.is_empty() {
                    t.push('\n');
                } else {
                    t.push_str(&format!("   {line}\n"));
                }
            }
            for (i, step) in plan["then"].as_array().into_iter().flatten().enumerate() {
                t.push_str(&format!("\n{}. {}", i + 3, step.as_str().unwrap_or("")));
            }
            out(&t)
        }
        SecretCommand::Status { json } => {
            let settings = KeySettings::from_config(config)?;
            let latest = settings.latest_unverified().map_err(Failure::Error)?;
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
                        &r.keys.count.to_string(),
                        &fmt_time(r.last_seen),
                        if r.retirable { "yes" } else { "no" },
                    ],
                ));
                // Which keys hold the version (ids only, bounded): what to rotate or revoke
                // before it can retire.
                if !r.current && !r.keys.ids.is_empty() {
                    text.push_str(&format!("  {}\n", r.keys.listed()));
                }
            }
            out(text.trim_end())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the whole log between the file (`[keys] store`) and Redis (`[redis]`), with its
    /// log id, revisions and signatures intact. Idempotent: run it again after an
    /// interruption. Then set `[keys] source` to the target.
    Migrate {
        /// Where to copy to (from the other one).
        #[arg(long, value_enum)]
        to: MigrateTo,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigrateTo {
    Redis,
    File,
}

pub fn run_store(config: &Config, cmd: StoreCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    let StoreCommand::Migrate { to } = cmd;
    let redis_settings = crate::redis::Settings::from_config(config)?.ok_or_else(|| {
        Failure::Error(
            "store migrate needs a [redis] section (the other side is [keys] store)".into(),
        )
    })?;
    let signer = crate::store::seal::Signer::new(&settings.hasher);
    let file = crate::store::file::LogFile::new(&settings.store, signer.clone());
    let redis = crate::store::redis::RedisLog::new(redis_settings, signer);
    let store_err = |e: crate::store::StoreError| Failure::Error(e.to_string());
    let (from, copied) = match to {
        MigrateTo::Redis => {
            let src = file.load().map_err(store_err)?;
            warn_corrupt(&src.corrupt);
            if src.log.is_none() {
                return Err(Failure::Error(format!(
                    "{} is unsigned (or empty): sign it first with `keygate keys compact`",
                    settings.store.display()
                )));
            }
            let n = redis
                .import_log(src.log, src.rev, &src.records)
                .map_err(store_err)?;
            (
                settings.store.display().to_string(),
                (src.records.len(), n, src.log, src.rev),
            )
        }
        MigrateTo::File => {
            let src = redis.export_log().map_err(store_err)?;
            warn_corrupt(&src.corrupt);
            if src.log.is_none() {
                return Err(Failure::Error("Redis holds no store to copy".into()));
            }
            let n = file
                .import_log(src.log, src.rev, &src.records)
                .map_err(store_err)?;
            (
                "redis".to_owned(),
                (src.records.len(), n as u64, src.log, src.rev),
            )
        }
    };
    let (read, held, log, rev) = copied;
    say(
        Level::Info,
        &format!(
            "copied {read} record versions of log {log} (revision {rev}) from {from}; the target holds {held}. \
             Set [keys] source = \"{}\" to use it.",
            match to {
                MigrateTo::Redis => "redis",
                MigrateTo::File => "file",
            }
        ),
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Mint a token; printed once (alone on stdout, or in one JSON object with --json).
    Create {
        /// What the token may do: read, write (read + changes), feed (gateways), redigest
        /// (gateways handing in keys re-digested under the current secret version) or verify
        /// (only POST /v1/api-keys/verify, for services outside the proxy).
        #[arg(long, value_enum)]
        role: crate::control::tokens::Role,
        /// A note on who holds it (e.g. the gateway or CI job).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 90d; the token is refused from then on (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        /// Print one JSON object (id, role, token) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (id, role, name, times, state; never a digest).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: the control plane refuses it from the next request on.
    Revoke {
        /// The token id (from `admin-token list`).
        id: String,
        /// Print the revoked token as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub fn run_admin_token(config: &Config, cmd: AdminTokenCommand) -> Result<(), Failure> {
    let settings = KeySettings::from_config(config)?;
    let path = crate::control::tokens::TokenStore::for_config(config, &settings);
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
                        Err(Failure::Error("--expires-in must be more than zero".into()))
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
                Failure::Error(format!(
                    "cannot write admin tokens to {}: {e}",
                    path.describe()
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
                .map_err(|e| {
                    Failure::Error(format!("audit log {}: {e}", settings.audit_log.display()))
                })?;
            if json {
                out(&serde_json::json!({"id": minted.record.id, "role": role.as_str(), "expires_at": expires_at, "token": minted.token}).to_string())?;
            } else {
                out(&minted.token)?;
            }
            say(
                Level::Info,
                &format!(
                    "created admin token {} (role {}, expires {}); shown once",
                    minted.record.id,
                    role.as_str(),
                    fmt_time(expires_at)
                ),
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
            say(Level::Info, &format!("revoked admin token {}", t.id));
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
        /// Browser-safe key (`kg_pub_live_…`): needs --allow-origin, works only from those
        /// origins and only on routes with `publishable = true`.
        #[arg(long, conflicts_with = "canary")]
        publishable: bool,
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
    /// Leak forensics for one key: requests by status class and route, top source IPs and
    /// user agents (bounded top-16 sketches, counts are upper bounds), first/last seen and
    /// attempts after revocation. From the gateways' flushed sketches (`<usage file>.forensics.json`).
    Usage {
        /// Key id (key_…).
        id: String,
        /// Count requests from then on (RFC 3339 time, Unix seconds, or a duration ago: 24h):
        /// status classes and attempts after revocation from the hour that holds it (the day,
        /// past two days; `counted_from` says which), and only sources, user agents and routes
        /// seen since then.
        #[arg(long)]
        since: Option<String>,
        /// Print a JSON object instead of text.
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
    /// With --abort SUCCESSOR_ID: roll a rotation back instead.
    Rotate {
        /// Key id (key_…) to rotate.
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
    /// Store digests of keys issued elsewhere (one key or JSON object per line), streamed in
    /// batches; refused lines are named and skipped, and make the exit status 1.
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
    /// Already reported by the command itself, which has exit statuses of its own
    /// (`keygate scan`: 1 exposed keys, 2 error).
    Status(ExitCode),
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
            Failure::Status(code) => code,
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

/// Every stdout line of the CLI goes through here, so a closed pipe is handled in one place.
pub fn out(line: &str) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")
        .and_then(|()| o.flush())
        .map_err(Failure::stdout)
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
pub fn load_usage(config: &Config, settings: &KeySettings, ids: &[&str]) -> Usage {
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
    say(
        Level::Info,
        &format!(
        "{verb} {} ({}, owner {:?}, env {}); the key above is shown once and cannot be recovered",
        record.id, record.name, record.owner, record.env
    ),
    );
    if let Some(nb) = record.not_before {
        say(
            Level::Info,
            &format!(
                "{} is pending: refused until {}",
                record.id,
                fmt_time(Some(nb))
            ),
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
        KeysCommand::Usage { id, since, json } => {
            let latest = crate::store::file::latest(keys.state()?.records);
            if !latest.contains_key(&id) {
                return Err(crate::keys::ops::OpsError::NotFound(id).into());
            }
            let since = since
                .map(|s| crate::forensics::parse_since(&s, now))
                .transpose()?
                .unwrap_or(0);
            let nodes = crate::forensics::read(&crate::forensics::path_for(&settings.usage_file));
            let v = match crate::forensics::merged(&nodes, &id) {
                Some(stats) => stats.report(&id, since),
                None => crate::forensics::empty_report(&id, since),
            };
            if json {
                out(&v.to_string())
            } else {
                out(crate::forensics::render_text(&v).trim_end())
            }
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
                return Err(Failure::Error(
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
        KeysCommand::Rotate {
            abort: Some(successor),
            json,
            ..
        } => {
            let old = keys.abort_rotation(&successor, now)?;
            say(
                Level::Info,
                &format!(
                    "aborted the rotation of {} to {successor}: {successor} is revoked, {} keeps working until {}",
                    old.id,
                    old.id,
                    fmt_time(old.expires_at)
                ),
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
        } => Err(Failure::Error("give the id of the key to rotate".into())),
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
            let input = std::fs::File::open(&file)
                .map_err(|e| Failure::Error(format!("cannot read {}: {e}", file.display())))?;
            let size = input.metadata().map_or(0, |m| m.len()).max(1);
            let defaults = grants(name, owner, env, g, (false, false), now)?;
            // A progress counter only for a human at a terminal (never inside JSON logs).
            let tty = std::io::stderr().is_terminal() && log_format() == LogFormat::Human;
            let started = std::time::Instant::now();
            let report = keys.import_from(
                std::io::BufReader::with_capacity(1 << 20, input),
                &defaults,
                now,
                |p| {
                    if tty {
                        eprint!(
                            "\rimporting: line {}, {}% of {}",
                            p.lines,
                            p.bytes * 100 / size,
                            file.display()
                        );
                    }
                },
            )?;
            if tty {
                eprintln!();
            }
            for (line, why) in &report.invalid {
                say(Level::Warn, &format!("line {line}: {why}"));
            }
            if report.refused > report.invalid.len() {
                say(
                    Level::Warn,
                    &format!(
                        "… and {} more refused lines",
                        report.refused - report.invalid.len()
                    ),
                );
            }
            say(
                Level::Info,
                &format!(
                    "imported {}, duplicates {}, invalid {} ({:.1} s)",
                    report.imported,
                    report.duplicates,
                    report.refused,
                    started.elapsed().as_secs_f64()
                ),
            );
            if json {
                out(&serde_json::json!({"imported": report.imported, "duplicates": report.duplicates, "invalid": report.refused}).to_string())?;
            }
            // The good lines are imported; a refused line is still a failed migration step
            // for a script (`set -e`), so the exit status says so.
            if report.refused > 0 {
                let lines: Vec<String> =
                    report.invalid.iter().map(|(l, _)| l.to_string()).collect();
                let more = if report.refused > report.invalid.len() {
                    ", …"
                } else {
                    ""
                };
                return Err(Failure::Error(format!(
                    "{} lines refused (lines {}{more}); the other lines were imported",
                    report.refused,
                    lines.join(", ")
                )));
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
