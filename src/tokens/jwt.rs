//! The wire form of a short-lived token: `kgt_` + a compact JWS (RFC 7515) signed with
//! Ed25519 (`alg: EdDSA`, RFC 8037), and the only code that encodes or checks one.
//!
//! Verification is strict on purpose: exactly three base64url parts in canonical unpadded
//! form (so one token has one spelling), a header with exactly `alg`, `typ` and `kid`
//! (`alg` must be `EdDSA`: `none` and every other algorithm are refused before any key is
//! looked at; a `crit` or `jwk` header is refused as an unknown field), and claims with
//! exactly the fields keygate writes. The signature is checked before the claims are parsed.

use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

/// What tells a token apart from an API key (`kg_live_…`) wherever a credential is read.
pub const PREFIX: &str = "kgt_";
/// Longest token accepted: a token is ~600 bytes; anything much larger is not ours.
pub const MAX_TOKEN_LEN: usize = 2048;
/// The one algorithm keygate signs and accepts.
pub const ALG: &str = "EdDSA";

/// Why a token string was refused (before any key-table lookup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a well-formed keygate token")]
    Malformed,
    #[error("token algorithm is not EdDSA")]
    Algorithm,
    #[error("token signed by an unknown key")]
    UnknownKid(String),
    #[error("token signature does not verify")]
    Signature,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// The claims keygate writes (and the only ones it accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Always "keygate".
    pub iss: String,
    /// The parent API key's id.
    pub sub: String,
    /// The parent key's lineage (rate limits and quotas are counted per lineage).
    pub lineage: String,
    /// A subset of the parent key's scopes.
    pub scopes: Vec<String>,
    /// The audience a route must declare (`accept_tokens = { audience = "…" }`).
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Unique token id, for audit.
    pub jti: String,
}

pub const ISSUER: &str = "keygate";

/// The compact JWS of a presented credential, when it is a token.
pub fn strip_prefix(presented: &str) -> Option<&str> {
    presented.strip_prefix(PREFIX)
}

/// Sign `claims` with `key` under `kid`: the full token, prefix included.
pub fn sign(claims: &Claims, kid: &str, key: &Ed25519KeyPair) -> String {
    let header = Header {
        alg: ALG.into(),
        typ: "JWT".into(),
        kid: kid.into(),
    };
    let h = b64url_encode(&serde_json::to_vec(&header).unwrap_or_default());
    let c = b64url_encode(&serde_json::to_vec(claims).unwrap_or_default());
    let input = format!("{h}.{c}");
    let sig = key.sign(input.as_bytes());
    format!("{PREFIX}{input}.{}", b64url_encode(sig.as_ref()))
}

/// Check a compact JWS (without the prefix) against the public key `key_for(kid)` returns
/// and return its claims. Times are not checked here (the caller knows its clock and leeway).
pub fn verify(
    compact: &str,
    key_for: impl Fn(&str) -> Option<[u8; 32]>,
) -> Result<Claims, JwtError> {
    if compact.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed);
    }
    let mut parts = compact.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Header =
        serde_json::from_slice(&b64url_decode(h)?).map_err(|_| JwtError::Malformed)?;
    if header.alg != ALG {
        return Err(JwtError::Algorithm);
    }
    if header.typ != "JWT" {
        return Err(JwtError::Malformed);
    }
    let public = key_for(&header.kid).ok_or(JwtError::UnknownKid(header.kid))?;
    let sig = b64url_decode(s)?;
    let signed = &compact[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ED25519, public)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;
    serde_json::from_slice(&b64url_decode(c)?).map_err(|_| JwtError::Malformed)
}

/// The `kid` a token names, without verifying anything (to decide whether to refresh keys).
pub fn kid_of(compact: &str) -> Option<String> {
    let h = compact.split('.').next()?;
    let header: Header = serde_json::from_slice(&b64url_decode(h).ok()?).ok()?;
    Some(header.kid)
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Unpadded base64url (RFC 4648 §5), as JOSE uses it.
pub fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(B64URL[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Decode unpadded base64url; anything else (padding, other alphabets, a non-canonical last
/// character, an impossible length) is malformed, so one value has one spelling.
pub fn b64url_decode(s: &str) -> Result<Vec<u8>, JwtError> {
    if s.len() % 4 == 1 {
        return Err(JwtError::Malformed);
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return Err(JwtError::Malformed),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero: otherwise two spellings would decode alike.
    if acc != 0 {
        return Err(JwtError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    fn pair() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "key_a".into(),
            lineage: "lin_a".into(),
            scopes: vec!["invoices:read".into()],
            aud: "billing".into(),
            iat: 100,
            exp: 400,
            jti: "tok_1".into(),
        }
    }

    fn public(k: &Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    #[test]
    fn base64url_round_trips_and_is_canonical() {
        for n in 0..70u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64url_decode(&b64url_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64url_encode(b"f"), "Zg");
        assert!(b64url_decode("Zg==").is_err());
        assert!(b64url_decode("Zh").is_err(), "non-zero leftover bits");
        assert!(b64url_decode("Z").is_err());
        assert!(b64url_decode("Z+").is_err());
    }

    #[test]
    fn signed_tokens_verify_and_every_tampering_is_refused() {
        let k = pair();
        let t = sign(&claims(), "k1", &k);
        let jws = strip_prefix(&t).unwrap();
        let keys = |kid: &str| (kid == "k1").then(|| public(&k));
        assert_eq!(verify(jws, keys).unwrap(), claims());
        // Unknown kid, another key, a changed claim, a truncated signature.
        assert_eq!(
            verify(jws, |_| None),
            Err(JwtError::UnknownKid("k1".into()))
        );
        let other = pair();
        assert_eq!(
            verify(jws, |_| Some(public(&other))),
            Err(JwtError::Signature)
        );
        let parts: Vec<&str> = jws.split('.').collect();
        let mut c = claims();
        c.scopes.push("admin".into());
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url_encode(&serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(verify(&forged, keys), Err(JwtError::Signature));
        assert!(verify(&jws[..jws.len() - 2], keys).is_err());
        // alg=none, with or without a signature.
        let none = b64url_encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        for tail in ["", parts[2]] {
            let t = format!("{none}.{}.{tail}", parts[1]);
            assert_eq!(verify(&t, keys), Err(JwtError::Algorithm));
        }
        // Extra header fields (crit, an embedded jwk) are refused.
        let crit = b64url_encode(br#"{"alg":"EdDSA","typ":"JWT","kid":"k1","crit":["x"]}"#);
        assert_eq!(
            verify(&format!("{crit}.{}.{}", parts[1], parts[2]), keys),
            Err(JwtError::Malformed)
        );
        assert_eq!(verify("a.b", keys), Err(JwtError::Malformed));
        assert_eq!(verify("a.b.c.d", keys), Err(JwtError::Malformed));
    }
}
