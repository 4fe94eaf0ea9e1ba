//! Minting (the exchange behind `POST /v1/tokens`): the rules a request must meet and the
//! state the control plane keeps for it (its signing keys, re-read when the file changes, and
//! a key table built from the log it serves, rebuilt when the log moves).
//!
//! Rules, one function each: the audience is a plain name; the scopes asked for are held by
//! the key (none asked: all of them); the lifetime is at most `[tokens] max_ttl`.

use super::jwt::{self, Claims};
use super::signing::SigningKeys;
use super::TokenSettings;
use crate::keys::compact::{KeyView, Validity as _};
use crate::keys::table::KeyTable;
use crate::store::feed::FeedState;
use crate::store::seal::LogId;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// What the exchange is called where a route's name would go (a canary's alarm, in the
/// gateway's and the control plane's audit alike): the control plane's operation label for it.
pub const ROUTE: &str = "token_exchange";

/// Why a mint was refused (the caller maps each to its problem+json status).
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("audience must be 1-128 visible ASCII characters")]
    Audience,
    #[error("the key does not hold scope {0:?}")]
    ScopeNotHeld(String),
    #[error("ttl {asked}s is over the maximum of {max}s")]
    TtlTooLong { asked: i64, max: i64 },
    #[error("ttl must be at least 1s")]
    TtlTooShort,
    #[error("token signing is not available: {0}")]
    Unavailable(String),
    #[error("{0}")]
    BadJson(String),
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("{0}")]
    Invalid(String),
}

impl MintError {
    /// HTTP status and the stable problem `code`, the same wherever tokens are minted.
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            MintError::Audience
            | MintError::TtlTooLong { .. }
            | MintError::TtlTooShort
            | MintError::Invalid(_) => (400, "invalid_request"),
            MintError::BadJson(_) => (400, "invalid_json"),
            MintError::UnknownField(_) => (400, "unknown_field"),
            MintError::ScopeNotHeld(_) => (403, "scope_denied"),
            MintError::Unavailable(_) => (503, "tokens_unavailable"),
        }
    }
}

/// The request body: a JSON object with `audience` (required), `scopes` (a list of strings)
/// and `ttl` (a duration such as "5m"); nothing else.
pub fn parse_request(body: &[u8]) -> Result<MintRequest, MintError> {
    use serde_json::Value;
    // serde_json bounds nesting depth (128), so deeply nested input is a clean 400.
    let Value::Object(m) =
        serde_json::from_slice::<Value>(body).map_err(|e| MintError::BadJson(e.to_string()))?
    else {
        return Err(MintError::BadJson("body must be a JSON object".into()));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["audience", "scopes", "ttl"].contains(&k.as_str()))
    {
        return Err(MintError::UnknownField(k.clone()));
    }
    let audience = match m.get("audience") {
        Some(Value::String(a)) => a.clone(),
        None | Some(Value::Null) => return Err(MintError::Invalid("audience is required".into())),
        Some(_) => return Err(MintError::Invalid("audience must be a string".into())),
    };
    let scopes = match m.get("scopes") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<String>>(v.clone())
                .map_err(|_| MintError::Invalid("scopes must be a list of strings".into()))?,
        ),
    };
    let ttl_secs = match m.get("ttl") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => {
            let d = crate::config::parse_duration(t)
                .map_err(|e| MintError::Invalid(format!("ttl: {e}")))?;
            Some(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        }
        Some(_) => {
            return Err(MintError::Invalid(
                "ttl must be a string such as \"5m\"".into(),
            ))
        }
    };
    Ok(MintRequest {
        audience,
        scopes,
        ttl_secs,
    })
}

/// The `201` body of a mint: the token (shown once) and what it allows.
pub fn response_body(minted: &Minted, now: i64) -> serde_json::Value {
    serde_json::json!({
        "token": minted.token,
        "token_type": "Bearer",
        "expires_at": minted.claims.exp,
        "expires_in": minted.claims.exp - now,
        "key_id": minted.claims.sub,
        "audience": minted.claims.aud,
        "scopes": minted.claims.scopes,
        "jti": minted.claims.jti,
    })
}

/// The `token.issued` audit event: the parent key and the token's id, never the token.
pub fn issued_event(parent: &KeyView, minted: &Minted) -> crate::audit::Event {
    crate::audit::Event::new("token.issued", &format!("key:{}", parent.id))
        .key_view(parent, None)
        .with("jti", minted.claims.jti.clone())
        .with("audience", minted.claims.aud.clone())
        .with("scopes", minted.claims.scopes.clone())
        .with("kid", minted.kid.clone())
        .with("expires_at", minted.claims.exp)
}

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub audience: String,
    /// None: every scope the key holds.
    pub scopes: Option<Vec<String>>,
    /// None: `[tokens] default_ttl`.
    pub ttl_secs: Option<i64>,
}

pub struct Minted {
    pub token: String,
    pub claims: Claims,
    pub kid: String,
}

fn check_audience(a: &str) -> Result<(), MintError> {
    super::valid_audience(a)
        .then_some(())
        .ok_or(MintError::Audience)
}

/// The token's scopes: a subset of the key's, never more.
fn check_scopes(parent: &KeyView, asked: Option<&[String]>) -> Result<Vec<String>, MintError> {
    let Some(asked) = asked else {
        return Ok(parent.scopes.clone());
    };
    let mut out: Vec<String> = Vec::with_capacity(asked.len());
    for s in asked {
        if !parent.scopes.contains(s) {
            return Err(MintError::ScopeNotHeld(s.clone()));
        }
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

fn check_ttl(asked: Option<i64>, settings: &TokenSettings) -> Result<i64, MintError> {
    let ttl = asked.unwrap_or(settings.default_ttl_secs);
    if ttl < 1 {
        return Err(MintError::TtlTooShort);
    }
    if ttl > settings.max_ttl_secs {
        return Err(MintError::TtlTooLong {
            asked: ttl,
            max: settings.max_ttl_secs,
        });
    }
    Ok(ttl)
}

/// Mint a token for `parent` (already authenticated) under the current signing key. A token
/// never outlives its parent key's expiry.
pub fn mint(
    keys: &SigningKeys,
    parent: &KeyView,
    req: &MintRequest,
    settings: &TokenSettings,
    now: i64,
) -> Result<Minted, MintError> {
    check_audience(&req.audience)?;
    let scopes = check_scopes(parent, req.scopes.as_deref())?;
    let ttl = check_ttl(req.ttl_secs, settings)?;
    let (kid, pair) = keys
        .current()
        .ok_or_else(|| MintError::Unavailable("no current signing key".into()))?;
    let exp = parent.expires_at().map_or(now + ttl, |e| e.min(now + ttl));
    let claims = Claims {
        iss: jwt::ISSUER.into(),
        sub: parent.id.to_string(),
        lineage: parent.lineage().to_owned(),
        scopes,
        aud: req.audience.clone(),
        iat: now,
        exp,
        jti: crate::keys::record::new_id("tok")
            .map_err(|e| MintError::Unavailable(e.to_string()))?,
    };
    Ok(Minted {
        token: jwt::sign(&claims, kid, pair),
        claims,
        kid: kid.to_owned(),
    })
}

/// mtime, length and inode: a rewritten key file is noticed without reading it.
type FileVersion = (std::time::SystemTime, u64, u64);

fn file_version(path: &std::path::Path) -> Option<FileVersion> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.modified().ok()?,
        m.len(),
        std::os::unix::fs::MetadataExt::ino(&m),
    ))
}

type LoadedKeys = (Option<FileVersion>, Result<Arc<SigningKeys>, String>);

/// The control plane's token state.
pub struct Broker {
    pub settings: TokenSettings,
    keys: ArcSwap<LoadedKeys>,
    table: ArcSwap<(LogId, u64, Arc<KeyTable>)>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(settings: TokenSettings) -> Broker {
        Broker {
            settings,
            keys: ArcSwap::from_pointee((None, Err("not loaded".into()))),
            table: ArcSwap::from_pointee((LogId::NONE, 0, Arc::new(KeyTable::new()))),
        }
    }

    /// The signing keys, re-read whenever the file changes (a rotation by the CLI takes
    /// effect on the next mint, without a restart).
    pub fn signing_keys(&self) -> Result<Arc<SigningKeys>, MintError> {
        let path = &self.settings.signing_keys;
        let version = file_version(path);
        let held = self.keys.load_full();
        let loaded = if held.0.is_some() && held.0 == version {
            held
        } else {
            let fresh = SigningKeys::load(path)
                .map(Arc::new)
                .map_err(|e| e.to_string());
            if let Err(e) = &fresh {
                tracing::warn!(error = %e, "token signing keys unavailable");
            }
            let fresh = Arc::new((version, fresh));
            self.keys.store(fresh.clone());
            fresh
        };
        loaded.1.clone().map_err(MintError::Unavailable)
    }

    /// A key table of the log the control plane serves, rebuilt when its revision moves.
    /// The revision is read before the records, so a table is never labelled newer than
    /// what it holds (a revocation is always in the table of any later revision).
    pub fn table(&self, feed: &FeedState) -> Arc<KeyTable> {
        let (log, rev) = (feed.log_id(), feed.revision());
        let held = self.table.load();
        if held.0 == log && held.1 == rev && rev > 0 {
            return held.2.clone();
        }
        let records = feed.latest().into_iter().map(|r| (*r).clone());
        let table = Arc::new(KeyTable::from_records(records, log, rev));
        self.table.store(Arc::new((log, rev, table.clone())));
        table
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::record::sample;

    fn settings() -> TokenSettings {
        TokenSettings {
            max_ttl_secs: 900,
            default_ttl_secs: 300,
            signing_keys: "unused".into(),
            issue: false,
            jwks: None,
            jwks_refresh: std::time::Duration::from_secs(60),
        }
    }

    fn parent() -> KeyView {
        let mut r = sample("key_a", crate::keys::digest::Digest([1; 32]));
        r.scopes = vec!["invoices:read".into(), "invoices:write".into()];
        KeyView::of(&r)
    }

    #[test]
    fn scopes_are_a_subset_and_ttl_is_bounded() {
        let p = parent();
        assert_eq!(check_scopes(&p, None).unwrap(), p.scopes);
        assert_eq!(
            check_scopes(&p, Some(&["invoices:read".into(), "invoices:read".into()])).unwrap(),
            vec!["invoices:read".to_owned()]
        );
        assert!(matches!(
            check_scopes(&p, Some(&["admin".into()])),
            Err(MintError::ScopeNotHeld(s)) if s == "admin"
        ));
        let s = settings();
        assert_eq!(check_ttl(None, &s).unwrap(), 300);
        assert_eq!(check_ttl(Some(900), &s).unwrap(), 900);
        assert!(matches!(
            check_ttl(Some(901), &s),
            Err(MintError::TtlTooLong { .. })
        ));
        assert!(matches!(
            check_ttl(Some(0), &s),
            Err(MintError::TtlTooShort)
        ));
        assert!(check_audience("billing").is_ok());
        let r = parse_request(br#"{"audience":"a","scopes":["x"],"ttl":"5m"}"#).unwrap();
        assert_eq!((r.audience.as_str(), r.ttl_secs), ("a", Some(300)));
        assert!(matches!(parse_request(b"[]"), Err(MintError::BadJson(_))));
        assert!(matches!(
            parse_request(br#"{"audience":"a","x":1}"#),
            Err(MintError::UnknownField(_))
        ));
        assert!(matches!(
            parse_request(br#"{"scopes":[]}"#),
            Err(MintError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(br#"{"audience":"a","ttl":5}"#),
            Err(MintError::Invalid(_))
        ));
        let huge = parse_request(br#"{"audience":"a","ttl":"600000000000000000s"}"#).unwrap();
        assert!(matches!(
            check_ttl(huge.ttl_secs, &s),
            Err(MintError::TtlTooLong { .. })
        ));
        for bad in ["", "a b", "é", &"x".repeat(129)] {
            assert!(check_audience(bad).is_err(), "{bad:?}");
        }
    }
}
