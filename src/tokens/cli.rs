//! `keygate tokens …`: the signing keys of short-lived tokens (create, rotate, list, publish
//! as a JWKS). Private keys never reach stdout or stderr; only kids and public keys do.

use super::signing::{self, SigningKeys};
use crate::cli::{out, say, Failure, Level};
use crate::config::Config;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create the signing-key file (`[tokens] signing_keys`, mode 0600) with one Ed25519 key;
    /// refuses to replace an existing file.
    Keygen,
    /// Make a new signing key current. The old one stops signing now and stays published
    /// until its tokens have expired (`[tokens] max_ttl`); keys retired longer ago are dropped.
    Rotate,
    /// List the signing keys: kid, created, retired (never a private key).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the JWKS of the signing keys (public keys only), e.g. for `[tokens] jwks_file`
    /// on a gateway that does not follow a control plane.
    Jwks,
}

fn rfc3339(t: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
    )
    .to_string()
}

fn audit(c: &Config, event: crate::audit::Event) -> Result<(), Failure> {
    let path = c.resolve(&c.keys.audit_log);
    crate::audit::AuditLog::new(&path)
        .append(&[event])
        .map_err(|e| Failure::Error(format!("audit log {}: {e}", path.display())))
}

pub fn run(c: &Config, cmd: TokensCommand) -> Result<(), Failure> {
    let settings = super::TokenSettings::from_config(c, None)?;
    let path = &settings.signing_keys;
    let now = crate::clock::unix_secs();
    let actor = crate::audit::os_user();
    match cmd {
        TokensCommand::Keygen => {
            let kid = signing::keygen(path, now)?;
            audit(
                c,
                crate::audit::Event::new("token_signing_key.created", &actor)
                    .with("kid", kid.clone()),
            )?;
            say(
                Level::Info,
                &format!(
                    "created token signing keys {} (current kid {kid})",
                    path.display()
                ),
            );
            out(&kid)
        }
        TokensCommand::Rotate => {
            let (kid, dropped) = signing::rotate(path, settings.max_ttl_secs, now)?;
            audit(
                c,
                crate::audit::Event::new("token_signing_key.rotated", &actor)
                    .with("kid", kid.clone())
                    .with("dropped", dropped.clone()),
            )?;
            say(Level::Info, &format!("new current token signing key {kid}; previous keys stay published until their tokens expire; dropped {}", dropped.len()));
            out(&kid)
        }
        TokensCommand::List { json } => {
            let keys = SigningKeys::load(path)?;
            let current = keys
                .current()
                .map(|(k, _)| k.to_owned())
                .unwrap_or_default();
            if json {
                let rows: Vec<serde_json::Value> = keys
                    .list()
                    .iter()
                    .map(|(kid, created, retired)| serde_json::json!({"kid": kid, "current": *kid == current, "created_at": created, "retired_at": retired}))
                    .collect();
                return out(&serde_json::Value::Array(rows).to_string());
            }
            let mut text = format!(
                "{:<45} {:<8} {:<21} {}\n",
                "KID", "CURRENT", "CREATED", "RETIRED"
            );
            for (kid, created, retired) in keys.list() {
                text.push_str(&format!(
                    "{:<45} {:<8} {:<21} {}\n",
                    kid,
                    if *kid == current { "yes" } else { "" },
                    rfc3339(*created),
                    retired.map(rfc3339).unwrap_or_default()
                ));
            }
            out(text.trim_end())
        }
        TokensCommand::Jwks => out(&SigningKeys::load(path)?.jwks().to_string()),
    }
}
