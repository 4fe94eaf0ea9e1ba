//! `keygate scan --check` and `--revoke`: what each found key is, and revoking the exposed
//! ones, against one of two sources:
//! - the local store the config names (file or Redis), through `store::Store` and the
//!   config's hash secret: the same lookup a gateway does (`keys::lookup`), and revocation
//!   through `keys::ops` (the same lock, policy and audit as `keygate keys revoke`);
//! - a control plane (`--control-plane URL`, admin token from `--token-file` or
//!   `KEYGATE_ADMIN_TOKEN`): `POST /v1/api-keys/lookup` with the key in the body (read role),
//!   and `DELETE /v1/api-keys/{id}` (write role). A laptop needs no hash secret for this.
//!
//! The key travels only in the lookup body; revocations go by id, with the places it was
//! found (`found_in`) for the audit event.

use crate::keys::lookup::{Lookup, LookupState};
use crate::keys::ops::Keys;
use crate::keys::table::KeyTable;
use crate::keys::KeySettings;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("key store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("revoking {id}: {source}")]
    Revoke {
        id: String,
        #[source]
        source: crate::keys::ops::OpsError,
    },
    #[error("control plane {url}: {message}")]
    Remote { url: String, message: String },
    #[error("{0}")]
    Setup(String),
}

/// What the control plane or the store said about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: LookupState,
    pub id: Option<String>,
    pub owner: Option<String>,
}

impl Status {
    fn from_lookup(l: &Lookup) -> Status {
        Status {
            state: l.state,
            id: l.record.as_ref().map(|r| r.id.to_string()),
            owner: l.record.as_ref().map(|r| r.owner.to_string()),
        }
    }
}

/// Where `--check` looks keys up.
pub enum Source {
    Local {
        settings: Box<KeySettings>,
        table: KeyTable,
    },
    Remote(Remote),
}

pub struct Remote {
    base: String,
    token: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    runtime: tokio::runtime::Runtime,
}

impl Source {
    /// The store the config names, loaded once (a consistent prefix of the log).
    pub fn local(config: &crate::config::Config) -> Result<Source, CheckError> {
        let settings = KeySettings::from_config(config)?;
        let parsed = settings.store_backend().load()?;
        let (log, rev) = (parsed.log, parsed.rev);
        let latest = crate::store::file::latest(parsed.records);
        let table = KeyTable::from_records(latest.into_values(), log, rev);
        Ok(Source::Local {
            settings: Box::new(settings),
            table,
        })
    }

    /// A control plane at `base` (`http://host:port` or `https://…` with `ca`).
    pub fn remote(
        base: &str,
        token: String,
        ca: Option<&std::path::Path>,
    ) -> Result<Source, CheckError> {
        let base = base.trim_end_matches('/').to_owned();
        let tls = match ca {
            Some(path) => Some(
                crate::tls::client_config(path).map_err(|e| CheckError::Setup(e.to_string()))?,
            ),
            None => None,
        };
        if base.starts_with("https://") && tls.is_none() {
            return Err(CheckError::Setup(
                "an https:// control plane needs --ca FILE (the CA that signs its certificate)"
                    .into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CheckError::Setup(e.to_string()))?;
        Ok(Source::Remote(Remote {
            base,
            token,
            tls,
            runtime,
        }))
    }

    /// What `key` is now.
    pub fn lookup(&self, key: &str) -> Result<Status, CheckError> {
        match self {
            Source::Local { settings, table } => Ok(Status::from_lookup(&Lookup::find(
                table,
                settings,
                key,
                crate::clock::unix_secs(),
            ))),
            Source::Remote(r) => {
                let v = r.call(
                    http::Method::POST,
                    "/v1/api-keys/lookup",
                    json!({ "key": key }),
                )?;
                let state = v
                    .get("state")
                    .and_then(Value::as_str)
                    .and_then(LookupState::parse)
                    .ok_or_else(|| r.error("lookup answered without a known state"))?;
                let text = |f: &str| v.get(f).and_then(Value::as_str).map(str::to_owned);
                Ok(Status {
                    state,
                    id: text("id"),
                    owner: text("owner"),
                })
            }
        }
    }

    /// Revoke key `id`, audited with where it was found.
    pub fn revoke(&self, id: &str, reason: &str, found_in: &[String]) -> Result<(), CheckError> {
        match self {
            Source::Local { settings, .. } => Keys::new(settings, crate::audit::os_user())
                .revoke_found(id, Some(reason), found_in, crate::clock::unix_secs())
                .map(|_| ())
                .map_err(|source| CheckError::Revoke {
                    id: id.to_owned(),
                    source,
                }),
            Source::Remote(r) => {
                let v = r.call(
                    http::Method::DELETE,
                    &format!("/v1/api-keys/{id}"),
                    json!({ "reason": reason, "found_in": found_in }),
                )?;
                match v.get("state").and_then(Value::as_str) {
                    Some("revoked") => Ok(()),
                    other => Err(r.error(&format!("revoke of {id} answered state {other:?}"))),
                }
            }
        }
    }
}

impl Remote {
    fn error(&self, message: &str) -> CheckError {
        CheckError::Remote {
            url: self.base.clone(),
            message: message.to_owned(),
        }
    }

    /// One JSON request; a non-2xx answer is an error carrying the problem's `code` and
    /// `detail` (which never contain the key: the control plane does not echo it).
    fn call(&self, method: http::Method, path: &str, body: Value) -> Result<Value, CheckError> {
        let uri: http::Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|_| self.error("not a URL"))?;
        let body = Bytes::from(body.to_string());
        let fut = async {
            let resp =
                crate::sync::feed::request(&uri, &self.token, self.tls.as_ref(), method, body)
                    .await
                    .map_err(|e| self.error(&e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.error(&e.to_string()))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if !status.is_success() {
                let code = v.get("code").and_then(Value::as_str).unwrap_or("");
                let detail = v.get("detail").and_then(Value::as_str).unwrap_or("");
                return Err(self.error(&format!("{status} {code}: {detail}")));
            }
            Ok(v)
        };
        self.runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), fut).await })
            .map_err(|_| self.error("no answer within 30s"))?
    }
}
