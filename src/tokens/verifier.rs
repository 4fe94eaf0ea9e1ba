//! A gateway's side of tokens: the public keys it verifies with (a JWKS fetched from the
//! control plane or read from a file, cached, refreshed periodically and on an unknown `kid`)
//! and the token checks of the credential step.
//!
//! Verification never writes: a signature check against an in-memory key and one key-table
//! lookup by id for the parent's state. An unknown `kid` (a signing key rotated in after the
//! last refresh) refreshes the keys at most once a second, whatever the traffic, then
//! verifies again; a refresh that fails keeps the keys held (fail static).

use super::jwt::{self, Claims, JwtError};
use super::JwksSource;
use crate::keys::compact::KeyView;
use crate::keys::table::{AuthError, KeyTable, TokenRefusal};
use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Limited};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A JWKS larger than this is not ours.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Unknown kids refresh at most this often.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("no JWKS source configured")]
    NoSource,
    #[error("JWKS fetch: {0}")]
    Fetch(String),
    #[error("JWKS {0}")]
    Invalid(String),
}

pub struct Verifier {
    source: Option<JwksSource>,
    keys: ArcSwap<HashMap<String, [u8; 32]>>,
    /// When an unknown kid last caused a fetch; the lock makes refreshes single-flight.
    last_on_demand: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.keys.load().len())
            .finish()
    }
}

impl Verifier {
    pub fn new(source: Option<JwksSource>) -> Verifier {
        Verifier {
            source,
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_on_demand: tokio::sync::Mutex::new(None),
        }
    }

    pub fn configured(&self) -> bool {
        self.source.is_some()
    }

    /// Kids held now.
    pub fn kids(&self) -> usize {
        self.keys.load().len()
    }

    /// Fetch the keys and replace the held set; a failure keeps it.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _single = self.last_on_demand.lock().await;
        self.fetch_and_swap().await
    }

    async fn fetch_and_swap(&self) -> Result<usize, JwksError> {
        let bytes = match self.source.as_ref().ok_or(JwksError::NoSource)? {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| JwksError::Fetch(format!("{}: {e}", path.display())))?,
            JwksSource::Url { url, tls } => fetch(url, tls.as_ref()).await?,
            JwksSource::Signing(path) => {
                let path = path.clone();
                let keys =
                    tokio::task::spawn_blocking(move || super::signing::SigningKeys::load(&path))
                        .await
                        .map_err(|e| JwksError::Fetch(e.to_string()))?
                        .map_err(|e| JwksError::Fetch(e.to_string()))?;
                let n = keys.public_keys().len();
                self.keys.store(Arc::new(keys.public_keys()));
                return Ok(n);
            }
        };
        let keys = super::signing::parse_jwks(&bytes).map_err(JwksError::Invalid)?;
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// A refresh for a token naming `kid` we do not hold: skipped when another refresh just
    /// brought it, or when an unknown kid already caused one less than a second ago (random
    /// kids cannot turn traffic into JWKS fetches).
    async fn refresh_for(&self, kid: &str) {
        let mut last = self.last_on_demand.lock().await;
        if self.keys.load().contains_key(kid) || last.is_some_and(|t| t.elapsed() < MIN_REFRESH_GAP)
        {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch_and_swap().await {
            tracing::warn!(error = %e, "token keys: refresh for an unknown kid failed; keeping the held keys");
        }
    }

    /// Signature, algorithm and kid (refreshing once for an unknown kid).
    pub async fn verify_signature(&self, compact: &str) -> Result<Claims, JwtError> {
        let check = || {
            let keys = self.keys.load();
            jwt::verify(compact, |kid| keys.get(kid).copied())
        };
        match check() {
            Err(JwtError::UnknownKid(kid)) if self.source.is_some() => {
                self.refresh_for(&kid).await;
                check()
            }
            other => other,
        }
    }
}

async fn fetch(
    url: &http::Uri,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Vec<u8>, JwksError> {
    let fut = crate::sync::feed::request(url, "", tls, http::Method::GET, bytes::Bytes::new());
    let resp = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| JwksError::Fetch("timed out".into()))?
        .map_err(|e| JwksError::Fetch(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(JwksError::Fetch(format!("answered {}", resp.status())));
    }
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
    )
    .await
    .map_err(|_| JwksError::Fetch("body timed out".into()))?
    .map_err(|e| JwksError::Fetch(e.to_string()))?;
    Ok(body.to_bytes().to_vec())
}

/// Refresh the keys every `[tokens] jwks_refresh`, for the life of the process (the first
/// fetch at once), while some route accepts tokens: a gateway whose routes take none never
/// asks for keys it would not use (a route added by a reload starts the fetching).
pub fn spawn_refresh(gw: Arc<crate::gateway::Gateway>) {
    if !gw.tokens.configured() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let (wanted, every) = {
                let snap = gw.snapshot();
                let wanted = snap.routes.iter().any(|r| r.accept_tokens.is_some());
                (wanted, snap.tokens.jwks_refresh)
            };
            if wanted {
                match gw.tokens.refresh().await {
                    Ok(n) => tracing::debug!(kids = n, "token keys refreshed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "token keys: refresh failed; keeping the held keys")
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// The token checks, in order, after the signature: the route accepts this audience, the
/// token is within its lifetime, and its parent key is live now (the key table by id). The
/// result is the parent's record narrowed to the token's scopes.
pub fn admit(
    claims: Claims,
    audience: &str,
    table: &KeyTable,
    now: i64,
    leeway: i64,
) -> Result<KeyView, AuthError> {
    if claims.aud != audience || claims.iss != jwt::ISSUER {
        return Err(AuthError::Token(TokenRefusal::NotAccepted));
    }
    if claims.exp + leeway <= now {
        return Err(AuthError::Token(TokenRefusal::Expired));
    }
    if claims.iat - leeway > now {
        return Err(AuthError::Token(TokenRefusal::Invalid));
    }
    let parent = table.view_by_id(&claims.sub).ok_or(AuthError::Unknown)?;
    // The parent's state decides, as for the key itself: a revoked, expired, not-yet-valid
    // or canary parent refuses its tokens with the parent's own outcome.
    let parent = crate::keys::table::live(parent, now, leeway)?;
    if parent.lineage() != claims.lineage {
        return Err(AuthError::Token(TokenRefusal::Invalid));
    }
    Ok(narrowed(parent, &claims.scopes))
}

/// The parent with only the token's scopes that the parent still holds (a key narrowed after
/// minting narrows its tokens too).
fn narrowed(mut parent: KeyView, scopes: &[String]) -> KeyView {
    let mut profile = (*parent.profile).clone();
    profile.scopes = scopes
        .iter()
        .filter(|s| parent.scopes.contains(s))
        .cloned()
        .collect();
    parent.profile = Arc::new(profile);
    parent
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::{sample, KeyRecord};

    fn claims() -> Claims {
        Claims {
            iss: jwt::ISSUER.into(),
            sub: "key_a".into(),
            lineage: "lin_a".into(),
            scopes: vec!["invoices:read".into(), "gone".into()],
            aud: "billing".into(),
            iat: 100,
            exp: 400,
            jti: "tok_1".into(),
        }
    }

    fn table(edit: impl FnOnce(&mut KeyRecord)) -> KeyTable {
        let mut r = sample("key_a", Digest([3; 32]));
        r.lineage = "lin_a".into();
        r.rev = 1;
        edit(&mut r);
        KeyTable::from_records([r], crate::store::seal::LogId::NONE, 1)
    }

    fn reason(r: Result<KeyView, AuthError>) -> &'static str {
        r.err().map_or("ok", |e| e.reason())
    }

    #[test]
    fn each_rule_refuses_with_its_outcome() {
        let live = table(|_| {});
        let ok = admit(claims(), "billing", &live, 200, 0).unwrap();
        assert_eq!(&*ok.id, "key_a");
        assert_eq!(
            ok.scopes,
            vec!["invoices:read".to_owned()],
            "narrowed to what the key still holds"
        );
        assert_eq!(
            reason(admit(claims(), "reports", &live, 200, 0)),
            "token_not_accepted"
        );
        assert_eq!(
            reason(admit(claims(), "billing", &live, 400, 0)),
            "token_expired"
        );
        assert_eq!(
            reason(admit(claims(), "billing", &live, 400, 1)),
            "ok",
            "leeway"
        );
        assert_eq!(
            reason(admit(claims(), "billing", &live, 401, 1)),
            "token_expired"
        );
        assert_eq!(
            reason(admit(claims(), "billing", &live, 50, 0)),
            "token_invalid"
        );
        let mut other = claims();
        other.lineage = "lin_b".into();
        assert_eq!(
            reason(admit(other, "billing", &live, 200, 0)),
            "token_invalid"
        );
        let mut iss = claims();
        iss.iss = "someone".into();
        assert_eq!(
            reason(admit(iss, "billing", &live, 200, 0)),
            "token_not_accepted"
        );
        assert_eq!(
            reason(admit(claims(), "billing", &KeyTable::new(), 200, 0)),
            "key_unknown"
        );
        let revoked = table(|r| r.revoked_at = Some(150));
        assert_eq!(
            reason(admit(claims(), "billing", &revoked, 200, 0)),
            "key_revoked"
        );
        let expired = table(|r| r.expires_at = Some(150));
        assert_eq!(
            reason(admit(claims(), "billing", &expired, 200, 0)),
            "key_expired"
        );
        let canary = table(|r| r.canary = true);
        assert_eq!(
            reason(admit(claims(), "billing", &canary, 200, 0)),
            "key_canary"
        );
        let later = table(|r| r.not_before = Some(300));
        assert_eq!(
            reason(admit(claims(), "billing", &later, 200, 0)),
            "key_not_yet_valid"
        );
    }
}
