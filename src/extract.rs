//! API-key extraction: owns finding the single key a client presented, across
//! the `Authorization: Bearer` header, the configured key header and
//! (optionally) a query parameter.
//!
//! Every copy of a key anywhere in the request is collected. If the copies
//! disagree the request is refused as ambiguous (THREATS B6): the gateway must
//! never authenticate one copy while the upstream acts on another. Each value
//! is length-checked before its bytes are scanned, and only visible ASCII is
//! accepted, so hostile bytes are refused without allocation or panic.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

/// Why no key could be taken from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("no API key presented")]
    Missing,
    #[error("more than one distinct API key presented")]
    Ambiguous,
    #[error("malformed API key")]
    Malformed,
}

/// Returns the key as a `&str` borrowed from the headers/query.
///
/// `query` is the raw query string (no `?`); it is only consulted when the
/// route opted in with `query_param = Some(name)`.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    key_header: &HeaderName,
    query_param: Option<&str>,
    max_len: usize,
) -> Result<&'a str, ExtractError> {
    let mut found: Option<&'a str> = None;

    for value in headers.get_all(AUTHORIZATION) {
        if let Some(token) = bearer_token(value.as_bytes()) {
            merge(&mut found, validate(token, max_len)?)?;
        }
    }
    for value in headers.get_all(key_header) {
        merge(&mut found, validate(trim_ows(value.as_bytes()), max_len)?)?;
    }
    if let (Some(query), Some(param)) = (query, query_param) {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name_matches(name.as_bytes(), param.as_bytes()) {
                merge(&mut found, validate(value.as_bytes(), max_len)?)?;
            }
        }
    }
    found.ok_or(ExtractError::Missing)
}

/// Record one presented value; a second, different value is ambiguous.
fn merge<'a>(found: &mut Option<&'a str>, value: &'a str) -> Result<(), ExtractError> {
    match found {
        Some(prev) if *prev != value => Err(ExtractError::Ambiguous),
        Some(_) => Ok(()),
        None => {
            *found = Some(value);
            Ok(())
        }
    }
}

/// The credentials part of an `Authorization` value when its scheme is
/// `Bearer`, else `None` (other schemes are not key sources).
///
/// RFC 9110 §11.4: `credentials = auth-scheme [ 1*SP ( token68 / ... ) ]`,
/// scheme compared case-insensitively (§11.1). HTAB is tolerated as well as SP,
/// as for OWS elsewhere. Only the first 7 bytes are inspected to decide the
/// scheme, so a huge non-Bearer value costs nothing.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    match rest.first() {
        // `Bearer` alone: presented with an empty token; validate() refuses it.
        None => Some(rest),
        Some(b' ' | b'\t') => Some(trim_ows(rest)),
        // `Bearerx ...` is a different scheme.
        Some(_) => None,
    }
}

/// Strip leading and trailing SP/HTAB (RFC 9110 §5.6.3 OWS).
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Length first (so an oversized value is refused without being scanned),
/// then content: visible ASCII only (RFC 5234 VCHAR), which excludes controls,
/// obs-text and anything non-UTF-8.
///
/// A comma means a list: either `Bearer a, Bearer b` or several key-header
/// lines folded into one by an intermediary (RFC 9110 §5.3). Keys are base62,
/// so a comma is never part of a real key; refusing it as ambiguous stops a
/// second key from hiding inside the first. A `%` is refused because values
/// are never percent-decoded here but may be by the upstream.
fn validate(value: &[u8], max_len: usize) -> Result<&str, ExtractError> {
    if value.len() > max_len || value.is_empty() {
        return Err(ExtractError::Malformed);
    }
    // One pass without an early exit (it vectorises; every presented key takes it), and
    // only a refused value is searched again for the comma that makes it ambiguous.
    let clean = value.iter().fold(true, |ok, &b| {
        ok & matches!(b, 0x21..=0x7E) & (b != b'%') & (b != b',')
    });
    if !clean {
        return Err(if value.contains(&b',') {
            ExtractError::Ambiguous
        } else {
            ExtractError::Malformed
        });
    }
    std::str::from_utf8(value).map_err(|_| ExtractError::Malformed)
}

/// Compare a raw query-parameter name with the configured one, decoding
/// percent-escapes in the raw name first: otherwise `%6Bey=B` would slip past
/// the gateway and reach an upstream that decodes it to `key=B`. Names with a
/// bad escape never match (and the upstream cannot agree on them either).
pub(crate) fn name_matches(raw: &[u8], want: &[u8]) -> bool {
    let mut want = want.iter();
    let mut i = 0;
    while i < raw.len() {
        let b = if raw[i] == b'%' {
            let hi = raw.get(i + 1).copied().and_then(crate::path::hex_val);
            let lo = raw.get(i + 2).copied().and_then(crate::path::hex_val);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return false;
            };
            i += 3;
            (hi << 4) | lo
        } else {
            i += 1;
            raw[i - 1]
        };
        if want.next() != Some(&b) {
            return false;
        }
    }
    want.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use ExtractError::*;

    const KEY_HEADER: &str = "x-api-key";
    const MAX: usize = 64;

    struct Case {
        name: &'static str,
        headers: &'static [(&'static str, &'static [u8])],
        query: Option<&'static str>,
        param: Option<&'static str>,
        want: Result<&'static str, ExtractError>,
    }

    const fn h(
        name: &'static str,
        headers: &'static [(&'static str, &'static [u8])],
        want: Result<&'static str, ExtractError>,
    ) -> Case {
        Case {
            name,
            headers,
            query: None,
            param: None,
            want,
        }
    }

    const fn q(
        name: &'static str,
        headers: &'static [(&'static str, &'static [u8])],
        query: &'static str,
        param: Option<&'static str>,
        want: Result<&'static str, ExtractError>,
    ) -> Case {
        Case {
            name,
            headers,
            query: Some(query),
            param,
            want,
        }
    }

    const AUTH: &str = "authorization";
    const KEY: &str = KEY_HEADER;

    const CASES: &[Case] = &[
        h("nothing", &[], Err(Missing)),
        h("bearer", &[(AUTH, b"Bearer abc123")], Ok("abc123")),
        h(
            "lowercase bearer",
            &[(AUTH, b"bearer abc123")],
            Ok("abc123"),
        ),
        h(
            "uppercase bearer",
            &[(AUTH, b"BEARER abc123")],
            Ok("abc123"),
        ),
        h("two spaces", &[(AUTH, b"Bearer  abc123")], Ok("abc123")),
        h("tab", &[(AUTH, b"Bearer\tabc123")], Ok("abc123")),
        h("trailing ws", &[(AUTH, b"Bearer abc123 \t ")], Ok("abc123")),
        h("bearer no token", &[(AUTH, b"Bearer")], Err(Malformed)),
        h("bearer only ws", &[(AUTH, b"Bearer   ")], Err(Malformed)),
        h("bearer glued", &[(AUTH, b"Bearerabc123")], Err(Missing)),
        h(
            "basic ignored",
            &[(AUTH, b"Basic dXNlcjpwYXNz")],
            Err(Missing),
        ),
        h(
            "basic + key header",
            &[(AUTH, b"Basic dXNlcjpwYXNz"), (KEY, b"k1")],
            Ok("k1"),
        ),
        h("short scheme", &[(AUTH, b"Bea")], Err(Missing)),
        h(
            "comma list",
            &[(AUTH, b"Bearer a, Bearer b")],
            Err(Ambiguous),
        ),
        h("comma same", &[(AUTH, b"Bearer a,a")], Err(Ambiguous)),
        h(
            "space inside token",
            &[(AUTH, b"Bearer a b")],
            Err(Malformed),
        ),
        h(
            "non-utf8 bearer",
            &[(AUTH, b"Bearer ab\xffcd")],
            Err(Malformed),
        ),
        h(
            "non-utf8 basic ignored",
            &[(AUTH, b"Basic \xff\xfe")],
            Err(Missing),
        ),
        h("obs-text key", &[(KEY, b"abc\x80")], Err(Malformed)),
        h("percent in header", &[(KEY, b"abc%41")], Err(Malformed)),
        h("key header", &[(KEY, b"k1")], Ok("k1")),
        h("key header trimmed", &[(KEY, b" \tk1\t ")], Ok("k1")),
        h("key header empty", &[(KEY, b"")], Err(Malformed)),
        h(
            "key header dup equal",
            &[(KEY, b"k1"), (KEY, b"k1")],
            Ok("k1"),
        ),
        h(
            "key header dup different",
            &[(KEY, b"k1"), (KEY, b"k2")],
            Err(Ambiguous),
        ),
        h("key header folded", &[(KEY, b"k1, k2")], Err(Ambiguous)),
        h(
            "bearer dup equal",
            &[(AUTH, b"Bearer k1"), (AUTH, b"bearer k1")],
            Ok("k1"),
        ),
        h(
            "bearer dup different",
            &[(AUTH, b"Bearer k1"), (AUTH, b"Bearer k2")],
            Err(Ambiguous),
        ),
        h(
            "bearer + header equal",
            &[(AUTH, b"Bearer k1"), (KEY, b"k1")],
            Ok("k1"),
        ),
        h(
            "bearer + header different",
            &[(AUTH, b"Bearer k1"), (KEY, b"k2")],
            Err(Ambiguous),
        ),
        h("at max len", &[(KEY, &[b'a'; MAX])], Ok(A64)),
        h("over max len", &[(KEY, &[b'a'; MAX + 1])], Err(Malformed)),
        h("10 KB value", &[(KEY, &[b'k'; 10 * 1024])], Err(Malformed)),
        h(
            "10 KB non-bearer",
            &[(AUTH, &[b'k'; 10 * 1024])],
            Err(Missing),
        ),
        q(
            "query ignored without opt-in",
            &[],
            "api_key=k1",
            None,
            Err(Missing),
        ),
        q(
            "query opt-in",
            &[],
            "a=b&api_key=k1&c=d",
            Some("api_key"),
            Ok("k1"),
        ),
        q(
            "query empty value",
            &[],
            "api_key=",
            Some("api_key"),
            Err(Malformed),
        ),
        q(
            "query no '='",
            &[],
            "api_key",
            Some("api_key"),
            Err(Malformed),
        ),
        q(
            "query percent",
            &[],
            "api_key=k%31",
            Some("api_key"),
            Err(Malformed),
        ),
        q(
            "query dup equal",
            &[],
            "api_key=k1&api_key=k1",
            Some("api_key"),
            Ok("k1"),
        ),
        q(
            "query dup different",
            &[],
            "api_key=k1&api_key=k2",
            Some("api_key"),
            Err(Ambiguous),
        ),
        q(
            "query encoded name",
            &[],
            "api%5Fkey=k2",
            Some("api_key"),
            Ok("k2"),
        ),
        q(
            "query bad escape name",
            &[],
            "api%zkey=k2",
            Some("api_key"),
            Err(Missing),
        ),
        q(
            "query prefix name",
            &[],
            "api_keyx=k2&xapi_key=k3",
            Some("api_key"),
            Err(Missing),
        ),
        q(
            "query + header equal",
            &[(KEY, b"k1")],
            "api_key=k1",
            Some("api_key"),
            Ok("k1"),
        ),
        q(
            "query + header different",
            &[(KEY, b"k1")],
            "api_key=k2",
            Some("api_key"),
            Err(Ambiguous),
        ),
        q(
            "encoded name smuggles second key",
            &[(KEY, b"k1")],
            "%61pi_key=k2",
            Some("api_key"),
            Err(Ambiguous),
        ),
        q("no query string", &[], "", Some("api_key"), Err(Missing)),
    ];

    /// 64 'a's, exactly MAX.
    const A64: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn ten_kb_bearer_is_malformed() {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(&[b'k'; 10 * 1024]);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_bytes(&value).unwrap());
        let key_header = HeaderName::from_static(KEY_HEADER);
        assert_eq!(
            extract(&headers, None, &key_header, None, MAX),
            Err(Malformed)
        );
    }

    #[test]
    fn extract_table() {
        let key_header = HeaderName::from_static(KEY_HEADER);
        for case in CASES {
            let mut headers = HeaderMap::new();
            for (name, value) in case.headers {
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_bytes(value).unwrap(),
                );
            }
            let got = extract(&headers, case.query, &key_header, case.param, MAX);
            assert_eq!(got, case.want, "case {:?}", case.name);
        }
    }

    #[test]
    fn name_matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("key", "key", true),
            ("%6Bey", "key", true),
            ("%6bey", "key", true),
            ("ke", "key", false),
            ("keyy", "key", false),
            ("%6", "key", false),
            ("", "", true),
        ];
        for (raw, want, expected) in cases {
            assert_eq!(
                name_matches(raw.as_bytes(), want.as_bytes()),
                *expected,
                "{raw:?}"
            );
        }
    }
}
