//! Route matching: owns mapping a (host, canonical path, method) triple to the
//! index of the configured route that governs it, and host canonicalisation.
//!
//! A [`Router`] is built once per configuration snapshot and is immutable;
//! [`Router::find`] does no allocation on the success path. Paths given to
//! `find` must already be canonical (see `crate::path::canonicalize`), so
//! prefix matching here is plain byte comparison on segment boundaries, read
//! a second time with each segment's `;params` dropped only for a path that
//! has some (see [`Router::find`]).

use http::Method;

/// One configured route, as given by the configuration layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Canonical host (see [`canonical_host`]); `None` matches any host.
    pub host: Option<String>,
    /// Path prefix starting with `/`; matched on segment boundaries.
    pub path_prefix: String,
    /// Allowed methods; empty means any method.
    pub methods: Vec<Method>,
}

/// Why no route was selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no route matches")]
    NotFound,
    /// The path's `;params` decide its route: dropped (servlet containers, Spring) they
    /// select another route than kept (most other servers) do.
    #[error("path parameters change the route")]
    ParamsChangeRoute,
    /// Routes exist for the path but none allows the method; `allow` feeds
    /// the `Allow` header of the 405 (RFC 9110 §15.5.6), sorted and deduped.
    #[error("method not allowed")]
    MethodNotAllowed { allow: Vec<Method> },
}

#[derive(Debug)]
struct Entry {
    index: usize,
    host: Option<String>,
    /// Prefix with trailing slashes removed; `/` becomes the empty string,
    /// which matches every path.
    prefix: String,
    methods: Vec<Method>,
}

/// How a route's prefix fits a path (`prefix_fit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    No,
    /// As the path's bytes say; then also with its params dropped.
    Yes,
    /// Only once each path segment's `;params` are dropped.
    WithoutParams,
}

impl Entry {
    fn host_ok(&self, host: Option<&str>) -> bool {
        match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            // A host-specific route never applies when the request has no
            // host: it cannot be proven to be addressed to that host.
            (Some(_), None) => false,
        }
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        self.host_ok(host) && prefix_matches(&self.prefix, path)
    }

    fn fit(&self, host: Option<&str>, path: &str, params: &mut Option<bool>) -> Fit {
        if !self.host_ok(host) {
            return Fit::No;
        }
        prefix_fit(self.prefix.as_bytes(), path.as_bytes(), params)
    }

    /// HEAD is deliberately *not* implied by GET: an operator who allows only
    /// GET gets exactly GET. RFC 9110 §9.3.2 lets HEAD mirror GET, but implicit
    /// grants make policy harder to audit, so HEAD must be listed explicitly.
    fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// A method spelled as the routes' methods are: uppercase letters, `-` and `_` (nginx
/// refuses anything else with 400 too). The config's methods are uppercased when loaded and
/// `Method` compares bytes, so a request's `delete` would be an extension method equal to no
/// listed `DELETE`: it would fall through to a route allowing any method, and go upstream as
/// sent, where case-insensitive routers (ASP.NET) run it as DELETE. A few bytes to look at,
/// nothing allocated.
pub fn method_is_canonical(method: &Method) -> bool {
    let m = method.as_str().as_bytes();
    !m.is_empty()
        && m.iter()
            .all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

/// `prefix` (already stripped of trailing `/`) matches `path` only on a
/// segment boundary, so `/invoices` never matches `/invoicesX`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.as_bytes().strip_prefix(prefix.as_bytes()) {
        Some(rest) => rest.first().is_none_or(|b| *b == b'/'),
        None => false,
    }
}

/// `prefix_matches`, and whether `prefix` matches `path` once each path segment is read
/// without its params (`path::segment_name`), as servlet containers and Spring read it
/// before they route: `/invoices;v=1/x` is `/invoices/x` to them. Prefixes carry no params
/// (`snapshot` refuses them), so a match on the bytes is one without params too. The second
/// reading is only needed where the bytes do not match and the path has params at all:
/// `params` says whether it has, looked for once per request and only then.
fn prefix_fit(prefix: &[u8], path: &[u8], params: &mut Option<bool>) -> Fit {
    match path.strip_prefix(prefix) {
        Some([] | [b'/', ..]) => return Fit::Yes,
        // The prefix's last segment carries params in the path.
        Some(rest) if crate::path::segment_name(rest).is_empty() => return Fit::WithoutParams,
        Some(_) => return Fit::No,
        None => {}
    }
    if !*params.get_or_insert_with(|| crate::path::has_params(path)) {
        return Fit::No;
    }
    let mut names = path
        .split(|&b| b == b'/')
        .skip(1)
        .map(crate::path::segment_name);
    let fits = prefix
        .split(|&b| b == b'/')
        .skip(1)
        .all(|want| names.next() == Some(want));
    if fits {
        Fit::WithoutParams
    } else {
        Fit::No
    }
}

/// Immutable route table for one configuration snapshot.
#[derive(Debug)]
pub struct Router {
    /// Sorted by prefix length descending, then host-specific before
    /// host-less, then configuration order: the first match is the winner.
    entries: Vec<Entry>,
}

impl Router {
    /// Build the table. The index reported by [`Router::find`] is the route's
    /// position in `routes`.
    pub fn new(routes: Vec<RouteSpec>) -> Router {
        let mut entries: Vec<Entry> = routes
            .into_iter()
            .enumerate()
            .map(|(index, spec)| Entry {
                index,
                // Canonicalise defensively; an uncanonicalisable host is kept
                // verbatim (lowercased) and simply never matches a real host.
                host: spec
                    .host
                    .map(|h| canonical_host(&h).unwrap_or_else(|| h.to_ascii_lowercase())),
                prefix: spec.path_prefix.trim_end_matches('/').to_owned(),
                methods: spec.methods,
            })
            .collect();
        entries.sort_by_key(|e| (std::cmp::Reverse(e.prefix.len()), e.host.is_none(), e.index));
        Router { entries }
    }

    /// Select the route for a request. `host` may be raw (`Example.COM:8443`)
    /// or canonical; `path` must be canonical.
    ///
    /// A path with `;params` is routed two ways: as its bytes say, and with each segment's
    /// params dropped (servlet containers and Spring do that before they route, so
    /// `/v1/admin;x/users` is `/v1/admin/users` to them, where it is a segment `admin;x` to
    /// a server that keeps them). Whichever way the upstream reads it, the gateway must have
    /// authorised it under that route, so when the two ways select different routes the
    /// path is refused (`ParamsChangeRoute`); params that leave the route the same
    /// (`/v1/users;v=2`) pass, and the path is forwarded as it came. A route matching without
    /// params matches a superset of the paths it matches with them, so the two ways agree
    /// exactly when the first route to match without params matches with them too.
    ///
    /// The winning group is the set of matching routes sharing the longest
    /// prefix and the same host-specificity as the best match: a host-specific
    /// route shadows a host-less one with the same prefix even when only the
    /// host-less one would allow the method (the specific config is the
    /// operator's intent for that host). Within the group the first route in
    /// configuration order that allows the method wins.
    pub fn find(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
    ) -> Result<usize, RouteError> {
        // Compare against the host with port/trailing dot stripped so that no
        // allocation is needed; case is folded by the comparison.
        let host = host.and_then(host_view);
        let mut params = None;
        let Some((pos, fit)) = self.entries.iter().enumerate().find_map(|(i, e)| {
            match e.fit(host, path, &mut params) {
                Fit::No => None,
                fit => Some((i, fit)),
            }
        }) else {
            return Err(RouteError::NotFound);
        };
        if fit == Fit::WithoutParams {
            return Err(RouteError::ParamsChangeRoute);
        }
        let winner = &self.entries[pos];
        let group_len = winner.prefix.len();
        let group_specific = winner.host.is_some();
        let group = self.entries[pos..]
            .iter()
            .take_while(|e| e.prefix.len() == group_len && e.host.is_some() == group_specific)
            .filter(|e| e.matches(host, path));
        if let Some(e) = group.clone().find(|e| e.allows(method)) {
            return Ok(e.index);
        }
        let mut allow: Vec<Method> = group.flat_map(|e| e.methods.iter().cloned()).collect();
        allow.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        allow.dedup();
        Err(RouteError::MethodNotAllowed { allow })
    }
}

/// Canonicalise a Host header / authority host: lowercase, drop the port
/// (RFC 3986 §3.2.3; `[v6]:port` handled), drop one trailing dot (the
/// absolute-FQDN form, RFC 1034 §3.1, names the same host). `None` for an
/// empty or malformed host.
pub fn canonical_host(raw: &str) -> Option<String> {
    let host = host_view(raw)?;
    let ok = if let Some(inner) = host.strip_prefix('[') {
        // IP-literal (RFC 3986 §3.2.2); zone IDs and IPvFuture are refused.
        let inner = inner.strip_suffix(']')?;
        !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        // reg-name restricted to what DNS and IPv4 literals actually use;
        // percent-escapes and sub-delims are refused. Empty labels (`a..b`,
        // `.a`) are malformed. One pass over the bytes (this runs per request).
        let mut label = 0usize;
        host.bytes().all(|b| {
            if b == b'.' {
                std::mem::take(&mut label) > 0
            } else {
                label += 1;
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
            }
        }) && label > 0
    };
    ok.then(|| host.to_ascii_lowercase())
}

/// The port a Host or authority value names, or `default` (the scheme's) when it names none
/// or an empty one (RFC 3986 §3.2.3); `None` when it is not a port number.
pub fn port_or(raw: &str, default: u16) -> Option<u16> {
    let port = match raw.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.1.strip_prefix(':'),
        None => raw.split_once(':').map(|(_, p)| p),
    };
    match port {
        None | Some("") => Some(default),
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
        Some(_) => None,
    }
}

/// Slice of `raw` without port and without one trailing dot; `None` if the
/// port is not all digits or the result is empty. Does not validate the host
/// characters (that is [`canonical_host`]'s job).
fn host_view(raw: &str) -> Option<&str> {
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']')?;
        let (h, rest) = raw.split_at(end + 1);
        if rest.is_empty() {
            (h, None)
        } else {
            (h, Some(rest.strip_prefix(':')?))
        }
    } else {
        match raw.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    // RFC 3986 §3.2.3: port = *DIGIT (an empty port is allowed).
    if let Some(port) = port {
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_canonical_in_uppercase_only() {
        for ok in [
            "GET",
            "DELETE",
            "PURGE",
            "M-SEARCH",
            "VERSION-CONTROL",
            "X_Y",
        ] {
            let m = Method::from_bytes(ok.as_bytes()).unwrap();
            assert!(method_is_canonical(&m), "{ok}");
        }
        for bad in [
            "get", "delete", "Delete", "dELETE", "head", "PURGE1", "GET!", "M.SEARCH",
        ] {
            let m = Method::from_bytes(bad.as_bytes()).unwrap();
            assert!(!method_is_canonical(&m), "{bad}");
        }
    }

    #[test]
    fn port_or_names_the_port_or_the_default() {
        assert_eq!(port_or("api.example", 80), Some(80));
        assert_eq!(port_or("api.example:", 443), Some(443));
        assert_eq!(port_or("api.example:8080", 80), Some(8080));
        assert_eq!(port_or("api.example:080", 443), Some(80));
        assert_eq!(port_or("[::1]", 80), Some(80));
        assert_eq!(port_or("[::1]:9090", 80), Some(9090));
        assert_eq!(port_or("api.example:99999", 80), None);
        assert_eq!(port_or("api.example:+80", 80), None);
        assert_eq!(port_or("[::1", 80), None);
    }

    fn spec(host: Option<&str>, prefix: &str, methods: &[Method]) -> RouteSpec {
        RouteSpec {
            host: host.map(str::to_owned),
            path_prefix: prefix.to_owned(),
            methods: methods.to_vec(),
        }
    }

    #[test]
    fn canonical_host_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("example.com", Some("example.com")),
            ("Example.COM", Some("example.com")),
            ("example.com:8443", Some("example.com")),
            ("example.com:", Some("example.com")),
            ("example.com.", Some("example.com")),
            ("example.com.:443", Some("example.com")),
            ("example.com..", None),
            ("a..b", None),
            (".a", None),
            ("10.0.0.1:80", Some("10.0.0.1")),
            ("[::1]", Some("[::1]")),
            ("[::1]:8080", Some("[::1]")),
            ("[2001:DB8::1]:443", Some("[2001:db8::1]")),
            ("[::ffff:10.0.0.1]", Some("[::ffff:10.0.0.1]")),
            ("[::1", None),
            ("[::1]x", None),
            ("[::1]:x", None),
            ("[]", None),
            ("[fe80::1%25eth0]", None),
            ("", None),
            (".", None),
            (":80", None),
            ("example.com:80x", None),
            ("example.com:80:90", None),
            ("exa mple.com", None),
            ("exa%41mple.com", None),
            ("example.com/x", None),
            ("user@example.com", None),
            ("ex\u{e4}mple.com", None),
            ("my_host.internal", Some("my_host.internal")),
        ];
        for (raw, want) in cases {
            assert_eq!(canonical_host(raw).as_deref(), *want, "raw {raw:?}");
        }
    }

    /// (request host, canonical path, method, expected result)
    type FindCase = (
        Option<&'static str>,
        &'static str,
        Method,
        Result<usize, RouteError>,
    );

    #[test]
    fn find_table() {
        use Method as M;
        let router = Router::new(vec![
            /* 0 */ spec(None, "/", &[]),
            /* 1 */ spec(None, "/invoices", &[M::GET, M::POST]),
            /* 2 */ spec(Some("API.example.com"), "/invoices", &[M::GET]),
            /* 3 */ spec(None, "/v1/", &[M::GET]),
            /* 4 */ spec(None, "/v1/admin", &[M::DELETE]),
            /* 5 */ spec(None, "/v1/admin", &[M::PUT, M::DELETE]),
            /* 6 */ spec(Some("other.example.com"), "/v1/admin", &[M::PATCH]),
            /* 7 */ spec(None, "/get-only", &[M::GET]),
        ]);
        let not_allowed = |allow: &[Method]| {
            Err(RouteError::MethodNotAllowed {
                allow: allow.to_vec(),
            })
        };
        let cases: &[FindCase] = &[
            (None, "/", M::GET, Ok(0)),
            (None, "/anything/else", M::OPTIONS, Ok(0)),
            (None, "/invoices", M::GET, Ok(1)),
            (None, "/invoices/", M::GET, Ok(1)),
            (None, "/invoices/42", M::POST, Ok(1)),
            // Segment boundary: falls back to the catch-all.
            (None, "/invoicesX", M::GET, Ok(0)),
            (
                None,
                "/invoices",
                M::DELETE,
                not_allowed(&[M::GET, M::POST]),
            ),
            // Host-specific wins over host-less with the same prefix...
            (Some("api.example.com"), "/invoices/1", M::GET, Ok(2)),
            (Some("API.Example.com:443"), "/invoices/1", M::GET, Ok(2)),
            (Some("api.example.com."), "/invoices", M::GET, Ok(2)),
            // ...and shadows it for methods it does not allow.
            (
                Some("api.example.com"),
                "/invoices",
                M::POST,
                not_allowed(&[M::GET]),
            ),
            (Some("other.example.com"), "/invoices", M::POST, Ok(1)),
            // Trailing-slash prefix matches with and without the slash.
            (None, "/v1", M::GET, Ok(3)),
            (None, "/v1/", M::GET, Ok(3)),
            (None, "/v1/users", M::GET, Ok(3)),
            (None, "/v1x", M::GET, Ok(0)),
            (None, "/v1/users", M::POST, not_allowed(&[M::GET])),
            // Equal prefixes: first in config order allowing the method.
            (None, "/v1/admin", M::DELETE, Ok(4)),
            (None, "/v1/admin/x", M::PUT, Ok(5)),
            (None, "/v1/admin", M::GET, not_allowed(&[M::DELETE, M::PUT])),
            (Some("other.example.com"), "/v1/admin", M::PATCH, Ok(6)),
            (
                Some("other.example.com"),
                "/v1/admin",
                M::DELETE,
                not_allowed(&[M::PATCH]),
            ),
            (Some("api.example.com"), "/v1/admin", M::DELETE, Ok(4)),
            // HEAD is not implied by GET.
            (None, "/get-only", M::HEAD, not_allowed(&[M::GET])),
        ];
        for (host, path, method, want) in cases {
            assert_eq!(
                &router.find(*host, path, method),
                want,
                "{host:?} {path} {method}"
            );
        }
    }

    /// `;params` that select another route once dropped (as servlet containers and Spring
    /// drop them) are refused; params that leave the route the same pass.
    #[test]
    fn params_never_change_the_route() {
        use Method as M;
        let router = Router::new(vec![
            /* 0 */ spec(None, "/", &[]),
            /* 1 */ spec(None, "/v1", &[M::GET]),
            /* 2 */ spec(None, "/v1/admin", &[M::GET]),
            /* 3 */ spec(Some("a.example"), "/v2/admin", &[M::GET]),
        ]);
        let changes = Err(RouteError::ParamsChangeRoute);
        let cases: &[FindCase] = &[
            (None, "/v1/admin;x/users", M::GET, changes.clone()),
            (
                None,
                "/v1/admin;jsessionid=1/users",
                M::GET,
                changes.clone(),
            ),
            (None, "/v1;x/admin/users", M::GET, changes.clone()),
            (None, "/v1/admin;x", M::GET, changes.clone()),
            (None, "/v1/admin%3Bx/users", M::GET, changes.clone()),
            (None, "/v1;x", M::GET, changes.clone()),
            (None, "/v1;x/users", M::DELETE, changes.clone()),
            (
                Some("a.example"),
                "/v2/admin;x/users",
                M::GET,
                changes.clone(),
            ),
            // Without the host the host route does not apply either way.
            (Some("b.example"), "/v2/admin;x/users", M::GET, Ok(0)),
            // The same route either way.
            (None, "/v1/users;v=2", M::GET, Ok(1)),
            (None, "/v1/users;v=2/x;y", M::GET, Ok(1)),
            (None, "/v1/admin/users;v=2", M::GET, Ok(2)),
            (None, "/v1x;y/admin", M::GET, Ok(0)),
            (None, "/v1/adm;x/in", M::GET, Ok(1)),
            (None, "/other;x/v1/admin", M::GET, Ok(0)),
            (None, "/v1/admin%3Ax", M::GET, Ok(1)),
            (None, "/v1/users;x", M::POST, not_allowed_get()),
        ];
        for (host, path, method, want) in cases {
            assert_eq!(
                &router.find(*host, path, method),
                want,
                "{host:?} {path} {method}"
            );
        }
    }

    fn not_allowed_get() -> Result<usize, RouteError> {
        Err(RouteError::MethodNotAllowed {
            allow: vec![Method::GET],
        })
    }

    #[test]
    fn host_routes_need_a_host_and_empty_router_finds_nothing() {
        let router = Router::new(vec![spec(Some("a.example"), "/", &[])]);
        let cases: &[(Option<&str>, Result<usize, RouteError>)] = &[
            (None, Err(RouteError::NotFound)),
            (Some("b.example"), Err(RouteError::NotFound)),
            (Some("bad host"), Err(RouteError::NotFound)),
            (Some("A.EXAMPLE:1"), Ok(0)),
        ];
        for (host, want) in cases {
            assert_eq!(&router.find(*host, "/x", &Method::GET), want, "{host:?}");
        }
        let empty = Router::new(Vec::new());
        assert_eq!(
            empty.find(None, "/", &Method::GET),
            Err(RouteError::NotFound)
        );
    }
}
