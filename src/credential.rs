//! The credential step of the request path: the presented value is an API key (one HMAC and
//! a key-table lookup by digest) or, when it carries the token prefix (`kgt_`), a short-lived
//! token (signature against a held public key, the route's audience, lifetime, the parent
//! key's state by id). Tokens never reach the digest path and keys never reach the token
//! path. Either way the result is the key record the request acts as, so everything after
//! this step (authorization, limits, forwarding, audit) is one path for both.

use crate::gateway::Gateway;
use crate::keys::compact::KeyView;
use crate::keys::table::{AuthError, TokenRefusal};
use crate::snapshot::{Route, Snapshot};
use crate::tokens::{jwt, verifier};

pub async fn authenticate(
    gw: &Gateway,
    snap: &Snapshot,
    route: &Route,
    presented: &str,
    now: i64,
) -> Result<KeyView, AuthError> {
    let leeway = snap.keys.leeway_secs;
    let Some(compact) = jwt::strip_prefix(presented) else {
        return gw.table().authenticate(
            presented,
            &snap.keys.format,
            &snap.keys.hasher,
            now,
            leeway,
        );
    };
    // A route that does not opt in refuses tokens before any signature work.
    let audience = route
        .accept_tokens
        .as_deref()
        .ok_or(AuthError::Token(TokenRefusal::NotAccepted))?;
    // Boxed: the key-set fetch's state (~4.7 KiB) would otherwise be part of, and copied
    // with, the future of every request, tokens or not (docs/performance.md).
    let claims = crate::boxed::boxed(|| gw.tokens.verify_signature(compact))
        .await
        .map_err(|_| AuthError::Token(TokenRefusal::Invalid))?;
    verifier::admit(claims, audience, &gw.table(), now, leeway)
}
