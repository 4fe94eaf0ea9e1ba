//! Short-lived tokens (the key broker): a client exchanges its API key for a token valid for
//! minutes, scoped to one audience and a subset of the key's scopes.
//!
//! - `jwt`: the wire form (`kgt_` + an Ed25519-signed compact JWS) and its strict checks;
//! - `cli`: `keygate tokens keygen|rotate|list|jwks`;
//! - `signing`: the signing-key file (private, control plane only), rotation, the JWKS;
//! - `broker`: minting (`POST /v1/tokens` on the control plane, `control::exchange`, or on a
//!   gateway with `issue = true`, `issue`): the exchange's rules;
//! - `verifier`: a gateway's public keys (JWKS fetched and cached) and the token half of the
//!   request path's credential step (`credential`).
//!
//! A token acts as its parent key narrowed to the token's scopes: same id in audit, metrics
//! and upstream headers, same lineage for rate limits and quotas, and the parent's state is
//! checked on every request, so revoking the key kills its tokens at once.

pub mod broker;
pub mod cli;
pub mod issue;
pub mod jwt;
pub mod signing;
pub mod verifier;

use crate::config::{parse_duration, Config, ConfigError};
use crate::snapshot::FeedSource;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// No token lives longer than this, whatever `[tokens] max_ttl` says: they are short-lived.
pub const TTL_CEILING_SECS: i64 = 24 * 3600;
/// Longest audience accepted (a name, not a document).
pub const MAX_AUDIENCE_LEN: usize = 128;

/// Where a gateway gets the public keys it verifies with.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// `GET` a JWKS over HTTP(S) (the control plane's `/v1/jwks`, or `tokens.jwks_url`).
    /// The JWKS is public: no credential is sent (the feed token never leaves for a
    /// `jwks_url` that may be another host).
    Url {
        url: http::Uri,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    /// A JWKS file, re-read on every refresh.
    File(PathBuf),
    /// The public halves of this node's own signing keys (`issue = true`), re-read likewise.
    Signing(PathBuf),
}

/// `[tokens]`, validated.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub max_ttl_secs: i64,
    pub default_ttl_secs: i64,
    pub signing_keys: PathBuf,
    /// A gateway mints at `POST /v1/tokens` (`[tokens] issue`).
    pub issue: bool,
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
}

fn secs(c: &Config, field: &str, value: &str) -> Result<i64, ConfigError> {
    let s = parse_duration(value)
        .map_err(|m| c.invalid(field, m))?
        .as_secs() as i64;
    if s <= 0 || s > TTL_CEILING_SECS {
        return Err(c.invalid(field, "must be between 1s and 24h (tokens are short-lived)"));
    }
    Ok(s)
}

/// An audience a route declares or a client asks for: a non-empty name of visible ASCII.
pub fn valid_audience(a: &str) -> bool {
    !a.is_empty() && a.len() <= MAX_AUDIENCE_LEN && a.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl TokenSettings {
    /// `feed` is the gateway's feed source (its control plane serves the default JWKS).
    pub fn from_config(
        c: &Config,
        feed: Option<&FeedSource>,
    ) -> Result<TokenSettings, ConfigError> {
        let t = &c.tokens;
        // Keys would then look like tokens (`kgt_live_…`) and never reach the key table.
        if c.keys.prefix == jwt::PREFIX.trim_end_matches('_') {
            return Err(c.invalid("keys.prefix", "\"kgt\" is the prefix of short-lived tokens"));
        }
        let max_ttl_secs = secs(c, "tokens.max_ttl", &t.max_ttl)?;
        let default_ttl_secs = secs(c, "tokens.default_ttl", &t.default_ttl)?;
        if default_ttl_secs > max_ttl_secs {
            return Err(c.invalid("tokens.default_ttl", "longer than tokens.max_ttl"));
        }
        let jwks_refresh = parse_duration(&t.jwks_refresh)
            .map_err(|m| c.invalid("tokens.jwks_refresh", m))?
            .max(Duration::from_secs(1));
        let signing_keys = c.resolve(&t.signing_keys);
        let jwks = match (&t.jwks_url, &t.jwks_file, feed) {
            (Some(_), _, _) | (_, Some(_), _) if t.issue => {
                return Err(c.invalid(
                    "tokens.issue",
                    "a gateway that issues tokens verifies them with its own signing keys: remove jwks_url / jwks_file",
                ))
            }
            _ if t.issue => Some(JwksSource::Signing(signing_keys.clone())),
            (Some(_), Some(_), _) => {
                return Err(c.invalid("tokens.jwks_file", "set jwks_url or jwks_file, not both"))
            }
            (None, Some(file), _) => Some(JwksSource::File(c.resolve(file))),
            (Some(url), None, _) => Some(jwks_url(c, url)?),
            (None, None, Some(f)) => {
                let base: http::Uri = f
                    .url
                    .parse()
                    .map_err(|_| c.invalid("keys.feed_url", "not a URL"))?;
                let url = format!(
                    "{}://{}/v1/jwks",
                    base.scheme_str().unwrap_or("http"),
                    base.authority().map(|a| a.as_str()).unwrap_or_default()
                )
                .parse()
                .map_err(|_| c.invalid("keys.feed_url", "not a URL"))?;
                Some(JwksSource::Url {
                    url,
                    tls: f.tls.clone(),
                })
            }
            (None, None, None) => None,
        };
        for (i, r) in c.routes.iter().enumerate() {
            let Some(a) = &r.accept_tokens else { continue };
            let field = format!("routes[{i}].accept_tokens");
            if !valid_audience(&a.audience) {
                return Err(c.invalid(field, "audience must be 1-128 visible ASCII characters"));
            }
            if jwks.is_none() {
                return Err(c.invalid(field, "a gateway verifying tokens needs the public keys: set tokens.jwks_url or tokens.jwks_file, or follow a control plane (keys.source = \"feed\")"));
            }
        }
        Ok(TokenSettings {
            max_ttl_secs,
            default_ttl_secs,
            signing_keys,
            issue: t.issue,
            jwks,
            jwks_refresh,
        })
    }
}

impl TokenSettings {
    /// A gateway that issues must be able to sign: checked when its snapshot is built, so it
    /// does not start (or reload) as an issuer without keys. (The CLI, which creates the
    /// file, does not check.)
    pub fn check_issuer(&self, c: &Config) -> Result<(), ConfigError> {
        if self.issue {
            signing::SigningKeys::load(&self.signing_keys)
                .map_err(|e| c.invalid("tokens.signing_keys", e.to_string()))?;
        }
        Ok(())
    }
}

/// `tokens.jwks_url`: http(s); https trusts `keys.feed_ca` (the CA of the control plane).
fn jwks_url(c: &Config, url: &str) -> Result<JwksSource, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| c.invalid("tokens.jwks_url", "not a URL"))?;
    let tls = match (uri.scheme_str(), &c.keys.feed_ca) {
        (Some("http"), _) => None,
        (Some("https"), Some(ca)) => Some(
            crate::tls::client_config(&c.resolve(ca))
                .map_err(|e| c.invalid("keys.feed_ca", e.to_string()))?,
        ),
        (Some("https"), None) => {
            return Err(c.invalid(
                "tokens.jwks_url",
                "https needs keys.feed_ca: the CA that signs the JWKS server's certificate",
            ))
        }
        _ => return Err(c.invalid("tokens.jwks_url", "use http(s)://host:port/v1/jwks")),
    };
    if uri.authority().is_none() {
        return Err(c.invalid("tokens.jwks_url", "use http(s)://host:port/v1/jwks"));
    }
    Ok(JwksSource::Url { url: uri, tls })
}
