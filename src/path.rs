//! Request-path canonicalisation: owns turning the raw URI path of a request
//! into the single canonical form that routing, policy and forwarding all use.
//!
//! The gateway must make its decision on exactly the path the upstream will
//! act on. Any normalisation step the upstream performs but the gateway does
//! not (or vice versa) is a path-confusion bypass, so the rules are strict and
//! refuse anything ambiguous rather than guessing (THREATS, path section).
//!
//! Rules, in the order they apply:
//! - input longer than [`MAX_PATH_LEN`] bytes is refused before any work;
//! - the path must be in origin-form, i.e. start with `/` (RFC 9112 §3.2.1);
//! - percent-escapes of unreserved characters are decoded, every other escape
//!   is kept and its hex normalised to uppercase (RFC 3986 §6.2.2.1-2);
//! - encoded or raw separators other than `/` (`%2F`, `%5C`, `\`), control
//!   characters (raw or encoded), and raw bytes outside RFC 3986 `pchar` are
//!   refused;
//! - repeated slashes are merged and dot segments removed without ever going
//!   above the root (RFC 3986 §5.2.4 / §6.2.2.3);
//! - a segment that is empty or a dot segment once its path parameters are dropped (`..;x`,
//!   `;x`) is refused (see [`segment_name`]).
//!
//! The result is idempotent: `canonicalize(canonicalize(p)) == canonicalize(p)`.

/// Longest raw path accepted. Far beyond any real API path; bounds the work
/// and the allocation done per request.
pub const MAX_PATH_LEN: usize = 8192;

use std::borrow::Cow;

/// Why a path was refused. Every variant maps to a 400 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with '/'")]
    NotOriginForm,
    #[error("invalid percent-escape in path")]
    BadEscape,
    #[error("encoded '/' or '\\' separator in path")]
    EncodedSeparator,
    #[error("control character in path")]
    ControlChar,
    #[error("character not allowed in path")]
    InvalidChar,
    #[error("dot segment with path parameter")]
    DotSegmentParam,
    #[error("empty segment with path parameter")]
    EmptySegmentParam,
    #[error("path longer than {MAX_PATH_LEN} bytes")]
    TooLong,
}

/// Canonicalise a URI path (no query, no fragment). See the module docs for
/// the exact rules;
/// nearly every request's path is canonical already, and is then borrowed, not copied.
pub fn canonicalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if is_canonical(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let normalised = normalise_escapes(path.as_bytes())?;
    remove_dot_segments(&normalised, path.len()).map(Cow::Owned)
}

/// `path` (which starts with `/`) is what the two passes would return unchanged: no escape
/// (pass 1 may rewrite one), only `pchar`s and `/`, no empty segment but a last one (`//`),
/// and no segment starting with a dot or a `;` (`.`, `..`, `..;x` and `;x` are the passes'
/// to judge; a `.well-known` only takes the longer way). A quick scan; anything it does not
/// vouch for goes through the passes.
fn is_canonical(path: &[u8]) -> bool {
    let mut prev = 0u8;
    path.iter().all(|&b| {
        let ok = match b {
            b'/' => prev != b'/',
            b'.' | b';' => prev != b'/',
            _ => is_pchar(b),
        };
        prev = b;
        ok
    })
}

/// Pass 1: validate every byte and normalise percent-escapes. Decoding only
/// ever shrinks the input, so the output never exceeds the length bound.
fn normalise_escapes(input: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex_val);
            let lo = input.get(i + 2).copied().and_then(hex_val);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            let v = (hi << 4) | lo;
            match v {
                // An encoded separator would be a second, hidden segment
                // boundary for upstreams that decode before splitting.
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0x00..=0x1F | 0x7F => return Err(PathError::ControlChar),
                // RFC 3986 §6.2.2.2: unreserved escapes are equivalent to the
                // character itself, so decoding them is always safe; this is
                // also what exposes `%2e%2e` as a dot segment.
                _ if is_unreserved(v) => out.push(char::from(v)),
                // Everything else stays encoded (decoding e.g. `%3F` would
                // change meaning); only the hex case is normalised
                // (RFC 3986 §6.2.2.1). `%25` stays `%25`, so a
                // double-encoded `%252e` is never decoded twice.
                _ => {
                    out.push('%');
                    out.push(char::from(HEX_UPPER[usize::from(v >> 4)]));
                    out.push(char::from(HEX_UPPER[usize::from(v & 0x0F)]));
                }
            }
            i += 3;
            continue;
        }
        match b {
            // Windows-style upstreams treat `\` as `/`.
            b'\\' => return Err(PathError::EncodedSeparator),
            0x00..=0x1F | 0x7F => return Err(PathError::ControlChar),
            _ if is_pchar(b) || b == b'/' => out.push(char::from(b)),
            // Space, `#`, `?`, `"`, `<`, `>`, `[`, `]`, `^`, `` ` ``, `{`, `|`,
            // `}` and any byte >= 0x80 are not `pchar` (RFC 3986 §3.3).
            _ => return Err(PathError::InvalidChar),
        }
        i += 1;
    }
    Ok(out)
}

/// Pass 2: merge repeated slashes and remove dot segments. Slashes are merged
/// *before* dot removal, so `/a//..` is `/` and not `/a` as plain RFC 3986
/// §5.2.4 would give: upstream frameworks overwhelmingly treat `//` as `/`, and
/// the gateway must agree with them.
fn remove_dot_segments(path: &str, cap: usize) -> Result<String, PathError> {
    // `path` starts with '/', checked by the caller; skip it.
    let body = path.get(1..).unwrap_or("");
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "" | "." => trailing_slash = last,
            ".." => {
                stack.pop();
                trailing_slash = last;
            }
            _ => {
                if let Some(e) = hidden_by_params(seg) {
                    return Err(e);
                }
                stack.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(cap);
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || stack.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Tomcat (and other servlet containers) and Spring drop each segment's `;params` before
/// they resolve dots and merge slashes: `/..;/admin` is `/../admin` to them and `/;x/admin`
/// is `//admin`, that is `/admin`, where both are plain segments here. Such a segment is
/// refused: the gateway would route and forward a path other than the one they serve. (A
/// segment with a name and params is kept; the router judges it, `route::Router::find`.)
fn hidden_by_params(seg: &str) -> Option<PathError> {
    let name = segment_name(seg.as_bytes());
    if name.len() == seg.len() {
        return None;
    }
    match name {
        b"" => Some(PathError::EmptySegmentParam),
        b"." | b".." => Some(PathError::DotSegmentParam),
        _ => None,
    }
}

/// A segment's name: its bytes before its first path parameter, which starts at a `;`
/// (RFC 3986 §3.3) or at a `%3B`, for a hop that decodes before a server that drops params
/// (nginx's `proxy_pass` with a URI in front of Tomcat). Over a whole canonical path, it
/// ends at the path's first parameter (`has_params`). The escape's hex is uppercase in a
/// canonical path (pass 1).
pub(crate) fn segment_name(seg: &[u8]) -> &[u8] {
    let end = memchr::memchr2_iter(b';', b'%', seg)
        .find(|&i| seg.get(i) == Some(&b';') || seg.get(i..).is_some_and(|t| t.starts_with(b"%3B")))
        .unwrap_or(seg.len());
    seg.get(..end).unwrap_or(seg)
}

/// A canonical path with a path parameter in any segment (`segment_name`).
pub(crate) fn has_params(path: &[u8]) -> bool {
    segment_name(path).len() != path.len()
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The value of a hex digit of a `%XX` escape, either case: the one reading of escapes for
/// paths here, the key's query parameter (`extract`) and query names (`hygiene`).
pub fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3 unreserved.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §3.3 `pchar` minus pct-encoded (handled separately).
fn is_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_table() {
        use PathError::*;
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/v1/public/../admin", Ok("/v1/admin")),
            ("/v1/public/%2e%2e/admin", Ok("/v1/admin")),
            ("/v1/public/%2E%2E/admin", Ok("/v1/admin")),
            ("/v1/public/.%2e/admin", Ok("/v1/admin")),
            ("/v1/public/%2e./admin", Ok("/v1/admin")),
            (
                "/v1/public/%252e%252e/admin",
                Ok("/v1/public/%252e%252e/admin"),
            ),
            (
                "/v1/public/%252E%252E/admin",
                Ok("/v1/public/%252E%252E/admin"),
            ),
            ("/v1/public//..//admin", Ok("/v1/admin")),
            ("//v1/admin", Ok("/v1/admin")),
            ("/v1/public/..;/admin", Err(DotSegmentParam)),
            ("/v1/public/.;x/admin", Err(DotSegmentParam)),
            ("/v1/public/..;jsessionid=1/admin", Err(DotSegmentParam)),
            ("/v1/public/%2e%2e;/admin", Err(DotSegmentParam)),
            ("/v1/public/..%3b/admin", Err(DotSegmentParam)),
            ("/v1/public/a;b/admin", Ok("/v1/public/a;b/admin")),
            ("/v1/admin;x/users", Ok("/v1/admin;x/users")),
            ("/v1;a=1,2/admin;b", Ok("/v1;a=1,2/admin;b")),
            ("/v1/admin%3bx/users", Ok("/v1/admin%3Bx/users")),
            ("/v1/admin;x/../users", Ok("/v1/users")),
            ("/;/v1/admin/users", Err(EmptySegmentParam)),
            ("/;x/v1/admin", Err(EmptySegmentParam)),
            ("/v1/;jsessionid=1/admin", Err(EmptySegmentParam)),
            ("/v1/admin/;", Err(EmptySegmentParam)),
            ("//;x/admin", Err(EmptySegmentParam)),
            ("/v1/%3B/admin", Err(EmptySegmentParam)),
            ("/v1/%3bx/admin", Err(EmptySegmentParam)),
            ("/v1/%2e;/admin", Err(DotSegmentParam)),
            ("/v1/public/%2fadmin", Err(EncodedSeparator)),
            ("/v1/public/%2Fadmin", Err(EncodedSeparator)),
            ("/v1/public/%5cadmin", Err(EncodedSeparator)),
            ("/v1/public/%5Cadmin", Err(EncodedSeparator)),
            ("/v1/public\\admin", Err(EncodedSeparator)),
            ("/v1/admin%00", Err(ControlChar)),
            ("/v1/admin%1f", Err(ControlChar)),
            ("/v1/admin%7F", Err(ControlChar)),
            ("/v1/admin\0", Err(ControlChar)),
            ("/v1/admin\t", Err(ControlChar)),
            ("/v1/admin\x7f", Err(ControlChar)),
            ("/v1/admin/", Ok("/v1/admin/")),
            ("/v1/admin.", Ok("/v1/admin.")),
            ("/v1/admin%20", Ok("/v1/admin%20")),
            ("/v1/admin ", Err(InvalidChar)),
            ("/v1/admin#x", Err(InvalidChar)),
            ("/v1/admin?x", Err(InvalidChar)),
            ("/v1/adm\u{e9}n", Err(InvalidChar)),
            ("/v1/./admin", Ok("/v1/admin")),
            ("/v1/%c0%ae%c0%ae/admin", Ok("/v1/%C0%AE%C0%AE/admin")),
            ("/v1/%7e%41%2d", Ok("/v1/~A-")),
            ("/v1/%3a%3F", Ok("/v1/%3A%3F")),
            ("/v1/%", Err(BadEscape)),
            ("/v1/%2", Err(BadEscape)),
            ("/v1/%zz", Err(BadEscape)),
            ("/v1/%%32e", Err(BadEscape)),
            ("/", Ok("/")),
            ("//", Ok("/")),
            ("/..", Ok("/")),
            ("/../..", Ok("/")),
            ("/.", Ok("/")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/a/b/../", Ok("/a/")),
            ("/a/..b/c..", Ok("/a/..b/c..")),
            ("/a/...", Ok("/a/...")),
            ("/a:b@c!$&'()*+,=~", Ok("/a:b@c!$&'()*+,=~")),
            ("", Err(NotOriginForm)),
            ("v1/admin", Err(NotOriginForm)),
            ("*", Err(NotOriginForm)),
            ("http://h/v1", Err(NotOriginForm)),
        ];
        for (input, want) in cases {
            let got = canonicalize(input);
            assert_eq!(got.as_deref(), want.as_ref().map(|s| *s), "input {input:?}");
        }
    }

    #[test]
    fn length_bound() {
        let ok = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert_eq!(canonicalize(&ok).as_deref(), Ok(ok.as_str()));
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(canonicalize(&long), Err(PathError::TooLong));
        // Checked before anything else: even a malformed path reports TooLong.
        let bad = "%".repeat(MAX_PATH_LEN + 1);
        assert_eq!(canonicalize(&bad), Err(PathError::TooLong));
    }

    fn check_properties(input: &str, out: &str) {
        assert!(out.starts_with('/'), "{input:?} -> {out:?}");
        for bad in ["/../", "/./", "//", "%2F", "%5C", "%2f", "%5c"] {
            assert!(!out.contains(bad), "{input:?} -> {out:?} contains {bad}");
        }
        assert!(!out.ends_with("/.."), "{input:?} -> {out:?}");
        assert!(!out.ends_with("/."), "{input:?} -> {out:?}");
        // No segment is empty or a dot segment to a server that drops `;params`.
        for seg in out.split('/').skip(1) {
            let name = segment_name(seg.as_bytes());
            assert!(
                name.len() == seg.len() || !matches!(name, b"" | b"." | b".."),
                "{input:?} -> {out:?}: segment {seg:?}"
            );
        }
        assert!(out.len() <= input.len().max(1), "{input:?} -> {out:?} grew");
        assert_eq!(
            canonicalize(out).as_deref(),
            Ok(out),
            "not idempotent: {input:?} -> {out:?}"
        );
    }

    /// xorshift64: deterministic, dependency-free, good enough to shuffle an
    /// alphabet.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    #[test]
    fn random_paths_properties() {
        const ALPHABET: &[&str] = &[
            "/", "/", ".", ".", "%", "2", "e", "E", "f", "F", "5", "c", "a", ";", "\0", "b", "%2e",
            "%2E", "%25", "..", "//", ";", "%3B", "%3b",
        ];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (mut ok, mut err, mut quick) = (0u32, 0u32, 0u32);
        for _ in 0..100_000 {
            let len = (rng.next() % 24) as usize;
            let mut p = String::from("/");
            for _ in 0..len {
                p.push_str(ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize]);
            }
            if is_canonical(p.as_bytes()) {
                quick += 1;
                let passes =
                    normalise_escapes(p.as_bytes()).and_then(|n| remove_dot_segments(&n, p.len()));
                assert_eq!(
                    passes.as_deref(),
                    Ok(p.as_str()),
                    "quick scan vouched for {p:?}"
                );
            }
            match canonicalize(&p) {
                Ok(out) => {
                    check_properties(&p, &out);
                    ok += 1;
                }
                Err(_) => err += 1,
            }
        }
        // Make sure the generator exercises both outcomes meaningfully.
        assert!(ok > 10_000 && err > 10_000, "ok={ok} err={err}");
        assert!(quick > 1_000, "the quick scan vouched for {quick} paths");
    }
}
