//! Header hygiene for forwarding: owns deciding which client request headers
//! reach the upstream and which upstream response headers reach the client, and
//! the headers the gateway itself sets on the way up (`to_upstream`: remove,
//! then set, in one place, so nothing a client sends survives under a name the
//! gateway sets).
//!
//! Requests: hop-by-hop headers (RFC 9110 §7.6.1) and everything the client
//! could use to impersonate the gateway (credentials, forwarding metadata,
//! `x-keygate-*`, method overrides, underscore names) are removed. A client
//! that nominates a security-relevant header in `Connection` is refused
//! outright (THREATS B3): a later hop honouring the nomination would strip a
//! header the gateway relies on. Responses: hop-by-hop headers are removed
//! before relaying (RFC 9110 §7.6.1), never failing.
//!
//! A method override in the query (`_method`, `query_overrides_method`) cannot be
//! removed without rebuilding the request target: the request path refuses it.

use crate::keys::compact::{KeyView, Profile};
use crate::trace::{TraceContext, TRACEPARENT};
use http::header::{CONNECTION, CONTENT_LENGTH, COOKIE, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

pub static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub static X_KEYGATE_OWNER: HeaderName = HeaderName::from_static("x-keygate-owner");
pub static X_KEYGATE_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
pub static X_KEYGATE_ENV: HeaderName = HeaderName::from_static("x-keygate-env");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Why a request's headers cannot be forwarded. Both map to a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HygieneError {
    #[error("Connection header nominates a protected header")]
    ProtectedNominated,
    #[error("malformed Connection header")]
    BadConnectionHeader,
}

/// Fixed hop-by-hop set: RFC 9110 §7.6.1 (`proxy-connection`, `keep-alive`,
/// `te`, `transfer-encoding`, `upgrade`) plus RFC 9110 §11.7's proxy
/// credentials, `trailer` (the trailer section is not relayed) and
/// `http2-settings`, which only ever describes the client's own connection
/// (RFC 7540 §3.2.1) even when the client forgot to nominate it in `Connection`.
/// `connection` itself goes too.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "http2-settings"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// `is_hop_by_hop` for a token as a `Connection` header lists it (any case), without
/// allocating: lowered into a stack buffer as long as the longest such name.
fn names_hop_by_hop(token: &[u8]) -> bool {
    let mut lower = [0u8; 20];
    let Some(buf) = lower.get_mut(..token.len()) else {
        return false;
    };
    for (l, t) in buf.iter_mut().zip(token) {
        *l = t.to_ascii_lowercase();
    }
    std::str::from_utf8(buf).is_ok_and(is_hop_by_hop)
}

/// Request-only removals: the client's credentials (the upstream gets the
/// gateway's identity headers instead), forwarding metadata and the request id
/// the gateway regenerates (THREATS B5; a client's valid id was taken as the
/// request id before), method overrides that would let a client
/// run a method the route did not allow (THREATS B4), and URL overrides that
/// would let it name another path than the one authorised (IIS URL Rewrite,
/// Zend/laminas and old Symfony take the request's path from `X-Original-URL`
/// or `X-Rewrite-URL`; THREATS D1). Underscore names are
/// dropped wholesale: CGI/WSGI upstreams map `_` and `-` to the same variable,
/// so `X_API_Key` or `x_consumer_id` could shadow the real header (THREATS B4).
/// One `match` on the lowercase name (by length, then bytes): no lookup table.
fn is_request_only(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
            | "x-http-method-override"
            | "x-method-override"
            | "x-http-method"
            | "x-original-url"
            | "x-rewrite-url"
    ) || name.starts_with(X_FORWARDED)
        || name.starts_with(X_KEYGATE)
        || name.contains('_')
}

/// A query naming a method override: Laravel and Symfony (`_method`, on a POST) and
/// Express's `method-override` (a getter over `req.query`) run the method it names instead
/// of the request's, as other frameworks do from the override headers `is_request_only`
/// strips, so the route and scopes authorised here would not be the ones run. Such a
/// request is refused (`pipeline::validate_head`) whatever its method: which methods an
/// upstream takes overrides on is its configuration (`method-override`'s `methods`), not
/// ours to guess. A body's `_method` (a form POST) is not looked at: the body streams
/// through unread. Pairs are split on `&` and `;`; names are compared as those frameworks
/// decode them (`names_method_override`).
pub fn query_overrides_method(query: &str) -> bool {
    query
        .as_bytes()
        .split(|&b| b == b'&' || b == b';')
        .any(|pair| names_method_override(pair.split(|&b| b == b'=').next().unwrap_or(pair)))
}

/// `name` (raw, from a query) is `_method` as PHP and `qs` read it: percent-escapes and `+`
/// decoded, leading spaces dropped and a `.` taken for the `_` (PHP's variable names), any
/// case, alone or as an array (`_method[]`). Nearly every name is shorter than any spelling
/// of `_method` and is passed over without decoding.
fn names_method_override(name: &[u8]) -> bool {
    const METHOD: &[u8] = b"method";
    if name.len() <= METHOD.len() {
        return false;
    }
    let mut decoded = FormDecoded(name).skip_while(|&b| b == b' ');
    matches!(decoded.next(), Some(b'_' | b'.'))
        && METHOD.iter().all(|want| {
            decoded
                .next()
                .is_some_and(|b| b.to_ascii_lowercase() == *want)
        })
        && matches!(decoded.next(), None | Some(b'['))
}

/// The bytes of a form-encoded name as decoded: `%XX` is its byte, `+` a space, and a `%`
/// starting no escape stays itself.
struct FormDecoded<'a>(&'a [u8]);

impl Iterator for FormDecoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        match (b, rest) {
            (b'+', _) => Some(b' '),
            (b'%', [hi, lo, tail @ ..]) => {
                match (crate::path::hex_val(*hi), crate::path::hex_val(*lo)) {
                    (Some(hi), Some(lo)) => {
                        self.0 = tail;
                        Some((hi << 4) | lo)
                    }
                    _ => Some(b'%'),
                }
            }
            _ => Some(b),
        }
    }
}

const X_FORWARDED: &str = "x-forwarded-";
const X_KEYGATE: &str = "x-keygate-";

/// What the gateway tells the upstream about a request it forwards.
pub struct Forwarding<'a> {
    pub key: &'a KeyView,
    pub request_id: &'a HeaderValue,
    /// The canonical request host.
    pub host: Option<&'a str>,
    /// The client connection is TLS.
    pub tls: bool,
    pub client: IpAddr,
    pub trace: &'a TraceContext,
}

/// The request headers the upstream gets: the client's, stripped (`sanitize_request`), then
/// the gateway's own: the key's identity, `X-Forwarded-*`, the request id, the trace context.
/// The gateway's own are returned in wire form (`Fields`), for the request head, rather than
/// inserted into the map: each would otherwise be hashed into it only to be written out.
pub fn to_upstream(
    headers: &mut HeaderMap,
    key_header: &HeaderName,
    f: &Forwarding<'_>,
) -> Result<Fields, HygieneError> {
    sanitize_request(headers, key_header)?;
    let mut out = Fields::default();
    let (scopes, env) = profile_values(&f.key.profile);
    out.set(&X_KEYGATE_KEY_ID, f.key.id.as_bytes());
    out.set(&X_KEYGATE_OWNER, f.key.owner.as_bytes());
    if let Some(v) = &scopes {
        out.set_value(&X_KEYGATE_SCOPES, v);
    }
    if let Some(v) = &env {
        out.set_value(&X_KEYGATE_ENV, v);
    }
    out.set(
        &X_FORWARDED_FOR,
        crate::ascii::IpText::default().ip(f.client).as_bytes(),
    );
    if let Some(host) = f.host {
        out.set(&X_FORWARDED_HOST, host.as_bytes());
    }
    let proto: &[u8] = if f.tls { b"https" } else { b"http" };
    out.set(&X_FORWARDED_PROTO, proto);
    out.set_value(&X_REQUEST_ID, f.request_id);
    // HTTP/2 clients send no Host header; an HTTP/1.1 upstream needs one (RFC 9112 §3.2).
    if !headers.contains_key(HOST) {
        if let Some(host) = f.host {
            out.set(&HOST, host.as_bytes());
        }
    }
    // HTTP/2 may split cookies into crumbs (RFC 9113 §8.2.3); HTTP/1.1 wants one header.
    if headers.get_all(COOKIE).iter().nth(1).is_some() {
        let joined: Vec<&[u8]> = headers
            .get_all(COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(COOKIE, v);
        }
    }
    out.set(&TRACEPARENT, &f.trace.for_upstream(headers));
    Ok(out)
}

/// Request header fields in wire form (`name: value` and CRLF each), as the request head
/// carries them after the client's (`forward::wire::request_head`).
#[derive(Debug, Default)]
pub struct Fields(Vec<u8>);

impl Fields {
    /// A field whose value is bytes the gateway took from a record or the request; left out
    /// when a field value cannot hold them (a control character: what `HeaderValue` refuses).
    pub fn set(&mut self, name: &HeaderName, value: &[u8]) {
        // A fold, not `all`: without the early exit the check vectorises (these values are
        // short and nearly always clean; `all` went byte by byte, ~700 instructions a request).
        let clean = value.iter().fold(true, |ok, &b| {
            ok & ((b >= b' ' && b != 0x7f) | (b == b'\t'))
        });
        if clean {
            self.push(name, value);
        }
    }

    /// A field whose value is already a `HeaderValue` (checked when it was made).
    pub fn set_value(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.push(name, value.as_bytes());
    }

    fn push(&mut self, name: &HeaderName, value: &[u8]) {
        if self.0.is_empty() {
            self.0.reserve(FIELDS_ROOM);
        }
        self.0.extend_from_slice(name.as_str().as_bytes());
        self.0.extend_from_slice(b": ");
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(b"\r\n");
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The fields as (name, value) pairs (the tests read them back).
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_suffix(b"\r"))
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                Some((&line[..colon], &line[colon + 2..]))
            })
    }
}

/// A header value of bytes the gateway took from a record; `None` (the header is left out)
/// for bytes a header value cannot hold.
fn value(bytes: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_bytes(bytes).ok()
}

/// Room for the fields `to_upstream` adds (the four identity fields, three `X-Forwarded-*`,
/// the request id, `traceparent`, `Host`) in one allocation.
const FIELDS_ROOM: usize = 512;

/// Past this many profiles a thread's cache of profile values starts over (reloads leave
/// replaced profiles behind; a table of many distinct profiles must not grow it unbounded).
const PROFILE_CACHE_MAX: usize = 1024;

/// The identity header values that depend only on a key's profile, built once.
struct ProfileValues {
    /// Held so the address this entry is keyed by cannot be reused by another profile while
    /// the entry lives.
    _profile: Arc<Profile>,
    scopes: Option<HeaderValue>,
    env: Option<HeaderValue>,
}

thread_local! {
    /// Per worker thread (each serves its connections to the end), so no lock: profile
    /// address → its values.
    static PROFILE_VALUES: RefCell<HashMap<usize, ProfileValues, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// `X-Keygate-Scopes` and `X-Keygate-Env` for a profile: many keys share one profile, so
/// the values are built (scopes joined, bytes checked and copied) once per profile and
/// thread, and each request clones a reference to them instead of allocating them anew.
fn profile_values(profile: &Arc<Profile>) -> (Option<HeaderValue>, Option<HeaderValue>) {
    let key = Arc::as_ptr(profile) as usize;
    PROFILE_VALUES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(v) = cache.get(&key) {
            return (v.scopes.clone(), v.env.clone());
        }
        if cache.len() >= PROFILE_CACHE_MAX {
            cache.clear();
        }
        let v = ProfileValues {
            _profile: Arc::clone(profile),
            scopes: value(profile.scopes.join(",").as_bytes()),
            env: value(profile.env.as_bytes()),
        };
        let out = (v.scopes.clone(), v.env.clone());
        cache.insert(key, v);
        out
    })
}

/// Strip everything the upstream must not see from a client request, in place.
/// On error nothing has been removed; the request must be refused.
pub fn sanitize_request(
    headers: &mut HeaderMap,
    key_header: &HeaderName,
) -> Result<(), HygieneError> {
    let mut nominated = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in connection_tokens(value.as_bytes()) {
            let name = token
                .and_then(|t| HeaderName::from_bytes(t).ok())
                .ok_or(HygieneError::BadConnectionHeader)?;
            if is_protected(&name, key_header) {
                return Err(HygieneError::ProtectedNominated);
            }
            nominated.push(name);
        }
    }
    // One pass over the names present (a handful) rather than one lookup per name that
    // might be; the key header is always there and removed by name.
    headers.remove(key_header);
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str()) || is_request_only(n.as_str()))
        .chain(&nominated)
        .cloned()
        .collect();
    for name in &dropped {
        headers.remove(name);
    }
    Ok(())
}

/// Strip hop-by-hop headers from an upstream response before relaying it.
/// Lenient: list elements that are not header names are skipped, and
/// `connection` itself is always removed.
pub fn sanitize_response(headers: &mut HeaderMap) {
    let any_left = |h: &HeaderMap| h.keys().any(|n| is_hop_by_hop(n.as_str()));
    // The common response has none: one pass over its names, no allocation.
    if !any_left(headers) {
        return;
    }
    // The next commonest has one `Connection` (`keep-alive` from an HTTP/1.1 upstream): it
    // goes, with the names it lists, still without allocating (a `&str` name is looked up
    // as it is, where a `HeaderName` of a non-standard name would be a copy).
    if headers.get_all(CONNECTION).iter().nth(1).is_none() {
        if let Some(value) = headers.remove(CONNECTION) {
            for token in connection_tokens(value.as_bytes()).flatten() {
                // A hop-by-hop name (nginx's `keep-alive`) is not looked up here: if such a
                // field is present, `any_left` below finds it and the general pass drops it.
                if names_hop_by_hop(token) {
                    continue;
                }
                if let Ok(name) = std::str::from_utf8(token) {
                    headers.remove(name);
                }
            }
            if !any_left(headers) {
                return;
            }
        }
    }
    let dropped: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| connection_tokens(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t?).ok())
        .chain(
            headers
                .keys()
                .filter(|n| is_hop_by_hop(n.as_str()))
                .cloned(),
        )
        .collect();
    for name in &dropped {
        headers.remove(name);
    }
}

/// Keep a client X-Request-Id only if it is 1..=128 chars of `[A-Za-z0-9._-]`.
/// Several values are refused too: which one would the logs correlate on?
pub fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    let value = values.next()?.as_bytes();
    if values.next().is_some() || value.is_empty() || value.len() > 128 {
        return None;
    }
    if !value
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return None;
    }
    std::str::from_utf8(value).ok()
}

/// Split a `Connection` field value into its list elements, OWS-trimmed
/// (RFC 9110 §5.6.1). Empty elements (`a,,b`, a trailing comma) are skipped
/// as the RFC requires recipients to do. An element containing anything but
/// token characters is yielded as `None`.
fn connection_tokens(value: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    value
        .split(|b| *b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
        .map(|t| t.iter().all(|b| is_tchar(*b)).then_some(t))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Headers a client may not nominate for removal. `close` and `keep-alive`
/// are ordinary connection options and deliberately not listed.
fn is_protected(name: &HeaderName, key_header: &HeaderName) -> bool {
    let s = name.as_str();
    name == key_header
        || name == HOST
        || name == CONTENT_LENGTH
        || name == TRANSFER_ENCODING
        || name == COOKIE
        || matches!(
            s,
            "authorization" | "forwarded" | "x-real-ip" | "x-request-id"
        )
        || s.starts_with(X_FORWARDED)
        || s.starts_with(X_KEYGATE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A list of (name, raw value) header lines.
    type Lines = &'static [(&'static str, &'static [u8])];

    /// Ok(extra header names kept besides BASE) or the expected error.
    type Expected = Result<&'static [&'static str], HygieneError>;

    fn map(headers: &[(&str, &[u8])]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (name, value) in headers {
            m.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        m
    }

    fn names(m: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = m.keys().map(|n| n.as_str().to_owned()).collect();
        v.sort();
        v
    }

    const BASE: Lines = &[
        ("host", b"api.example.com"),
        ("content-type", b"application/json"),
        ("content-length", b"2"),
        ("accept", b"*/*"),
        ("x-request-id", b"abc-123"),
        ("cookie", b"a=b"),
    ];
    /// `BASE` as the upstream gets it: the client's request id is replaced by the gateway's.
    const BASE_NAMES: &[&str] = &["accept", "content-length", "content-type", "cookie", "host"];

    #[test]
    fn sanitize_request_table() {
        use HygieneError::*;
        let cases: &[(&str, Lines, Expected)] = &[
            ("plain", &[], Ok(&[])),
            (
                "B3 key header",
                &[("connection", b"close, X-API-Key")],
                Err(ProtectedNominated),
            ),
            (
                "B3 authorization",
                &[("connection", b"Authorization")],
                Err(ProtectedNominated),
            ),
            (
                "B3 xff",
                &[("connection", b"X-Forwarded-For")],
                Err(ProtectedNominated),
            ),
            (
                "B3 keygate",
                &[("connection", b"x-keygate-key-id")],
                Err(ProtectedNominated),
            ),
            (
                "B3 framing",
                &[("connection", b"Host, Content-Length, Transfer-Encoding")],
                Err(ProtectedNominated),
            ),
            (
                "B3 host",
                &[("connection", b"host")],
                Err(ProtectedNominated),
            ),
            (
                "B3 cookie",
                &[("connection", b"keep-alive,cookie")],
                Err(ProtectedNominated),
            ),
            (
                "B3 request id",
                &[("connection", b"X-Request-Id")],
                Err(ProtectedNominated),
            ),
            (
                "B3 forwarded",
                &[("connection", b"Forwarded")],
                Err(ProtectedNominated),
            ),
            (
                "B3 x-real-ip",
                &[("connection", b"x-real-ip")],
                Err(ProtectedNominated),
            ),
            (
                "B3 second Connection line",
                &[("connection", b"close"), ("connection", b"x-api-key")],
                Err(ProtectedNominated),
            ),
            (
                "nominated removed",
                &[
                    ("connection", b"close, x-foo"),
                    ("x-foo", b"1"),
                    ("x-bar", b"2"),
                ],
                Ok(&["x-bar"]),
            ),
            (
                "OWS and empty elements",
                &[
                    ("connection", b" ,\tx-foo ,, keep-alive ,"),
                    ("x-foo", b"1"),
                ],
                Ok(&[]),
            ),
            (
                "non-utf8 Connection",
                &[("connection", b"x-foo\xff")],
                Err(BadConnectionHeader),
            ),
            (
                "space inside token",
                &[("connection", b"x foo")],
                Err(BadConnectionHeader),
            ),
            (
                "separator in token",
                &[("connection", b"x-foo;y")],
                Err(BadConnectionHeader),
            ),
            (
                "hop-by-hop list",
                &[
                    ("keep-alive", b"timeout=5"),
                    ("proxy-connection", b"keep-alive"),
                    ("te", b"trailers"),
                    ("trailer", b"x-checksum"),
                    ("transfer-encoding", b"chunked"),
                    ("upgrade", b"websocket"),
                    ("http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
                    ("proxy-authorization", b"Basic eA=="),
                    ("proxy-authenticate", b"Basic"),
                ],
                Ok(&[]),
            ),
            (
                "credentials",
                &[
                    ("authorization", b"Bearer k1"),
                    ("x-api-key", b"k1"),
                    ("x-api-key", b"k2"),
                ],
                Ok(&[]),
            ),
            (
                "B5 forwarding metadata",
                &[
                    ("forwarded", b"for=1.2.3.4"),
                    ("x-real-ip", b"1.2.3.4"),
                    ("x-forwarded-for", b"1.2.3.4"),
                    ("x-forwarded-proto", b"https"),
                    ("x-forwarded-host", b"evil"),
                    ("x-keygate-key-id", b"admin"),
                    ("x-keygate-consumer", b"admin"),
                ],
                Ok(&[]),
            ),
            (
                "D1 URL overrides",
                &[
                    ("x-original-url", b"/v1/admin"),
                    ("X-Rewrite-URL", b"/v1/admin"),
                    (
                        "x-original-uri",
                        b"kept: no framework takes the path from it",
                    ),
                ],
                Ok(&["x-original-uri"]),
            ),
            (
                "B4 method override and underscores",
                &[
                    ("x-http-method-override", b"DELETE"),
                    ("x-method-override", b"DELETE"),
                    ("x-http-method", b"DELETE"),
                    ("X_API_Key", b"k2"),
                    ("x_consumer_id", b"admin"),
                    ("x-keygate_key_id", b"admin"),
                    ("x-forwarded", b"kept: not a prefix match"),
                ],
                Ok(&["x-forwarded"]),
            ),
        ];
        let key_header = HeaderName::from_static("x-api-key");
        for (name, extra, want) in cases {
            let mut headers = map(BASE);
            for (n, v) in *extra {
                headers.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let before = headers.clone();
            let got = sanitize_request(&mut headers, &key_header);
            match want {
                Ok(extra_kept) => {
                    assert_eq!(got, Ok(()), "case {name}");
                    let mut expected: Vec<String> = BASE_NAMES
                        .iter()
                        .chain(extra_kept.iter())
                        .map(|s| s.to_string())
                        .collect();
                    expected.sort();
                    assert_eq!(names(&headers), expected, "case {name}");
                }
                Err(e) => {
                    assert_eq!(got, Err(*e), "case {name}");
                    assert_eq!(headers, before, "case {name}: mutated on error");
                }
            }
        }
    }

    #[test]
    fn sanitize_response_table() {
        let cases: &[(&str, Lines, &[&str])] = &[
            (
                "plain",
                &[("content-type", b"text/plain"), ("x-upstream", b"1")],
                &["content-type", "x-upstream"],
            ),
            (
                "nominated and hop-by-hop",
                &[
                    ("connection", b"close, x-secret"),
                    ("x-secret", b"1"),
                    ("keep-alive", b"timeout=5"),
                    ("transfer-encoding", b"chunked"),
                    ("trailer", b"x-sum"),
                    ("upgrade", b"h2c"),
                    ("proxy-authenticate", b"Basic"),
                    ("content-type", b"text/plain"),
                ],
                &["content-type"],
            ),
            (
                "one Connection, as an HTTP/1.1 upstream sends it",
                &[
                    ("connection", b"keep-alive"),
                    ("content-type", b"text/plain"),
                ],
                &["content-type"],
            ),
            (
                "one Connection naming a hop-by-hop field that is present, in another case",
                &[
                    ("connection", b"Keep-Alive, Upgrade"),
                    ("keep-alive", b"timeout=5"),
                    ("upgrade", b"h2c"),
                    ("content-type", b"text/plain"),
                ],
                &["content-type"],
            ),
            (
                "one Connection naming a header in another case",
                &[
                    ("connection", b"X-Secret"),
                    ("x-secret", b"1"),
                    ("x-a", b"2"),
                ],
                &["x-a"],
            ),
            (
                "two Connection values",
                &[
                    ("connection", b"x-a"),
                    ("connection", b"x-b"),
                    ("x-a", b"1"),
                    ("x-b", b"2"),
                    ("x-c", b"3"),
                ],
                &["x-c"],
            ),
            (
                "unparseable Connection",
                &[("connection", b"\xff\xfe"), ("x-a", b"1")],
                &["x-a"],
            ),
            (
                "partly unparseable Connection",
                &[("connection", b"x a, x-b"), ("x-a", b"1"), ("x-b", b"2")],
                &["x-a"],
            ),
        ];
        for (name, headers, want) in cases {
            let mut headers = map(headers);
            sanitize_response(&mut headers);
            assert_eq!(names(&headers), want.to_vec(), "case {name}");
        }
    }

    /// Fields go out in wire form, in order; a value a field cannot hold (CR, LF, NUL, DEL)
    /// leaves its field out rather than split the head.
    #[test]
    fn fields_are_wire_lines_and_refuse_control_bytes() {
        let mut f = Fields::default();
        f.set(&X_KEYGATE_OWNER, b"acme\tcorp \xc3\xa9");
        f.set(&X_KEYGATE_ENV, b"live\r\nx-injected: 1");
        f.set(&X_KEYGATE_KEY_ID, b"key\0");
        f.set(&X_FORWARDED_PROTO, b"bad\x7f");
        f.set_value(&X_REQUEST_ID, &HeaderValue::from_static("r-1"));
        assert_eq!(
            f.as_bytes(),
            &b"x-keygate-owner: acme\tcorp \xc3\xa9\r\nx-request-id: r-1\r\n"[..]
        );
        let pairs: Vec<_> = f.iter().collect();
        assert_eq!(
            pairs,
            vec![
                (&b"x-keygate-owner"[..], &b"acme\tcorp \xc3\xa9"[..]),
                (&b"x-request-id"[..], &b"r-1"[..])
            ]
        );
    }

    fn profile(env: &str, scopes: &[&str]) -> Arc<Profile> {
        Arc::new(Profile {
            env: env.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ..Profile::default()
        })
    }

    /// The cached values are each profile's own, on a hit, on a miss and after the cache
    /// started over; equal profiles at different addresses are separate entries.
    #[test]
    fn profile_values_are_each_profiles_own() {
        let live = profile("live", &["read", "write"]);
        let test = profile("test", &[]);
        let live_copy = profile("live", &["read", "write"]);
        for _ in 0..2 {
            for (p, scopes, env) in [
                (&live, "read,write", "live"),
                (&test, "", "test"),
                (&live_copy, "read,write", "live"),
            ] {
                let (s, e) = profile_values(p);
                assert_eq!(
                    s.as_ref().map(HeaderValue::as_bytes),
                    Some(scopes.as_bytes())
                );
                assert_eq!(e.as_ref().map(HeaderValue::as_bytes), Some(env.as_bytes()));
            }
        }
        let others: Vec<_> = (0..PROFILE_CACHE_MAX)
            .map(|i| profile(&format!("env{i}"), &["x"]))
            .collect();
        for p in &others {
            profile_values(p);
        }
        assert!(PROFILE_VALUES.with(|c| c.borrow().len()) <= PROFILE_CACHE_MAX);
        let (s, e) = profile_values(&test);
        assert_eq!(s.as_ref().map(HeaderValue::as_bytes), Some(&b""[..]));
        assert_eq!(e.as_ref().map(HeaderValue::as_bytes), Some(&b"test"[..]));
        // A value a header cannot hold is left out, not sent mangled.
        let (_, bad) = profile_values(&profile("a\nb", &[]));
        assert!(bad.is_none());
    }

    #[test]
    fn query_method_overrides_table() {
        let cases: &[(&str, bool)] = &[
            ("_method=DELETE", true),
            ("a=1&_method=PUT&b=2", true),
            ("a=1;_method=PUT", true),
            ("_method", true),
            ("_method=", true),
            ("_METHOD=put", true),
            ("%5Fmethod=PUT", true),
            ("%5fmethod=PUT", true),
            ("_%6Dethod=PUT", true),
            (".method=PUT", true),
            ("+_method=PUT", true),
            ("%20%20.method=PUT", true),
            ("_method[]=PUT", true),
            ("_method%5B0%5D=PUT", true),
            ("", false),
            ("a=1", false),
            ("method=PUT", false),
            ("+method=PUT", false),
            ("my_method=PUT", false),
            ("_methods=1", false),
            ("_method_id=1", false),
            ("x=_method", false),
            ("_meth%6Fd2=1", false),
            ("%5Fmethod%", false),
            ("%ZZmethod=1", false),
        ];
        for (query, want) in cases {
            assert_eq!(query_overrides_method(query), *want, "{query:?}");
        }
    }

    #[test]
    fn client_request_id_table() {
        let long_ok = "a".repeat(128);
        let long_bad = "a".repeat(129);
        let cases: &[(&[&[u8]], Option<&str>)] = &[
            (&[], None),
            (&[b"abc-123_X.y"], Some("abc-123_X.y")),
            (&[long_ok.as_bytes()], Some(long_ok.as_str())),
            (&[long_bad.as_bytes()], None),
            (&[b""], None),
            (&[b"a b"], None),
            (&[b"a/b"], None),
            (&[b"abc\xff"], None),
            (&[b"a", b"a"], None),
        ];
        for (values, want) in cases {
            let mut headers = HeaderMap::new();
            for v in *values {
                headers.append("x-request-id", HeaderValue::from_bytes(v).unwrap());
            }
            assert_eq!(client_request_id(&headers), *want, "values {values:?}");
        }
    }
}
