//! Authorization: pure checks of an authenticated key against the route and the request.
//! Scopes, client network, env and browser origin; each failure is its own 403 code.

use crate::error::GatewayError;
use crate::keys::compact::KeyView;
use ipnet::IpNet;
use std::net::IpAddr;

/// What the route demands of a key.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    pub scopes: Vec<String>,
    pub env: Option<String>,
    /// The route accepts publishable keys (`publishable = true`).
    pub publishable: bool,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack listener reports) is matched as
/// IPv4, so an allowlist of `10.0.0.0/8` means the same on every kind of listener.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Check scopes, env, network and origin, in that order. `origin` is the browser `Origin`
/// header if present; `global_origins` applies to keys that list no origins of their own.
pub fn authorize(
    key: &KeyView,
    req: &Requirements,
    client: IpAddr,
    origin: Option<&[u8]>,
    global_origins: &[String],
) -> Result<(), GatewayError> {
    // The key type first: a publishable key on a secret-key route is refused as such, whatever
    // scopes it holds.
    if key.publishable && !req.publishable {
        return Err(GatewayError::PublishableDenied);
    }
    if !req.scopes.iter().all(|s| key.scopes.iter().any(|k| k == s)) {
        return Err(GatewayError::ScopeDenied);
    }
    if req.env.as_ref().is_some_and(|e| *e != key.env) {
        return Err(GatewayError::EnvDenied);
    }
    if !key.allow_ips.is_empty() {
        let ip = canonical_ip(client);
        if !key.allow_ips.iter().any(|net: &IpNet| net.contains(&ip)) {
            return Err(GatewayError::NetworkDenied);
        }
    }
    if key.publishable {
        return publishable_origin(key, origin);
    }
    if let Some(origin) = origin {
        if !origin_allowed(origin, key, global_origins) {
            return Err(GatewayError::OriginDenied);
        }
    }
    Ok(())
}

/// A publishable key sits in web pages, so anyone can copy it: besides being limited to
/// routes that declare `publishable = true`, it is accepted only with an `Origin` the key
/// itself lists. A request without `Origin` is not from a browser page, and the global
/// `[cors]` list never applies. (Outside a browser `Origin` can be forged; what this stops is
/// other sites using the key from their visitors' browsers.)
fn publishable_origin(key: &KeyView, origin: Option<&[u8]>) -> Result<(), GatewayError> {
    match origin {
        // The key's own list only: with none, nothing matches.
        Some(o) if origin_allowed(o, key, &[]) => Ok(()),
        _ => Err(GatewayError::OriginDenied),
    }
}

/// A browser origin is allowed if the key lists it, or (for keys listing none) if the
/// configured global list does. Comparison is exact and ASCII case-insensitive (RFC 6454
/// serialises scheme and host lowercase).
pub fn origin_allowed(origin: &[u8], key: &KeyView, global: &[String]) -> bool {
    let list = if key.allow_origins.is_empty() {
        global
    } else {
        &key.allow_origins[..]
    };
    list.iter()
        .any(|o| o.as_bytes().eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest::Digest;
    use crate::keys::record::sample;

    #[test]
    fn publishable_keys_need_a_publishable_route_and_their_own_origin() {
        let mut key = sample("key_p", Digest([0; 32]));
        key.publishable = true;
        key.allow_origins = vec!["https://shop.example".into()];
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let route = |publishable| Requirements {
            scopes: vec!["invoices:read".into()],
            env: None,
            publishable,
        };
        let global = vec!["https://other.example".to_string()];
        let code = |r: Result<(), GatewayError>| r.err().map(|e| e.code());
        let shop: Option<&[u8]> = Some(b"https://shop.example");
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &route(true),
                ip,
                shop,
                &global
            )),
            None
        );
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &route(false),
                ip,
                shop,
                &global
            )),
            Some("publishable_key_denied")
        );
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &route(true),
                ip,
                None,
                &global
            )),
            Some("origin_denied"),
            "no Origin: not from a browser page"
        );
        let other: Option<&[u8]> = Some(b"https://other.example");
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &route(true),
                ip,
                other,
                &global
            )),
            Some("origin_denied"),
            "the global list never applies to publishable keys"
        );
        key.allow_origins.clear();
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &route(true),
                ip,
                other,
                &global
            )),
            Some("origin_denied")
        );
        // Secret keys are unaffected by the route flag.
        let secret = sample("key_s", Digest([1; 32]));
        assert_eq!(
            code(authorize(
                &KeyView::of(&secret),
                &route(true),
                ip,
                None,
                &[]
            )),
            None
        );
    }

    #[test]
    fn each_check_in_order() {
        let mut key = sample("key_a", Digest([0; 32]));
        key.scopes = vec!["invoices:read".into()];
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let read = Requirements {
            scopes: vec!["invoices:read".into()],
            env: Some("live".into()),
            publishable: false,
        };
        let write = Requirements {
            scopes: vec!["invoices:write".into()],
            env: None,
            publishable: false,
        };
        let test_env = Requirements {
            scopes: vec![],
            env: Some("test".into()),
            publishable: false,
        };
        let code = |r: Result<(), GatewayError>| r.err().map(|e| e.code());
        assert_eq!(
            code(authorize(&KeyView::of(&key), &read, ip, None, &[])),
            None
        );
        assert_eq!(
            code(authorize(&KeyView::of(&key), &write, ip, None, &[])),
            Some("scope_denied")
        );
        assert_eq!(
            code(authorize(&KeyView::of(&key), &test_env, ip, None, &[])),
            Some("env_denied")
        );

        key.allow_ips = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            code(authorize(&KeyView::of(&key), &read, ip, None, &[])),
            None
        );
        let mapped: IpAddr = "::ffff:10.9.9.9".parse().unwrap();
        assert_eq!(
            code(authorize(&KeyView::of(&key), &read, mapped, None, &[])),
            None
        );
        let outside: IpAddr = "192.168.1.1".parse().unwrap();
        assert_eq!(
            code(authorize(&KeyView::of(&key), &read, outside, None, &[])),
            Some("network_denied")
        );

        let global = vec!["https://app.example".to_string()];
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &read,
                ip,
                Some(b"https://app.example"),
                &global
            )),
            None
        );
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &read,
                ip,
                Some(b"https://evil.example"),
                &global
            )),
            Some("origin_denied")
        );
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &read,
                ip,
                Some(b"https://app.example"),
                &[]
            )),
            Some("origin_denied")
        );
        key.allow_origins = vec!["https://own.example".into()];
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &read,
                ip,
                Some(b"https://own.example"),
                &global
            )),
            None
        );
        assert_eq!(
            code(authorize(
                &KeyView::of(&key),
                &read,
                ip,
                Some(b"https://app.example"),
                &global
            )),
            Some("origin_denied")
        );
    }
}
