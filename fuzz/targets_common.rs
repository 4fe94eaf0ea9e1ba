//! Fuzz harness bodies shared by `fuzz/fuzz_targets/*.rs` (libFuzzer, nightly or
//! `RUSTC_BOOTSTRAP=1`) and `tests/fuzz_corpus.rs` (corpus replay + deterministic random
//! inputs under plain `cargo test` on stable). Both include this file with `#[path]`.
//!
//! Every function takes arbitrary bytes, must never panic on its own, and asserts the
//! properties of the parser it drives (THREATS §4 K6). Where practical the property is a
//! differential against a small independent reference written here, so a disagreement is
//! an assertion failure and not merely "did not crash".

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use keygate::authz::{self, Requirements};
use keygate::extract::{self, ExtractError};
use keygate::hygiene::{self, HygieneError};
use keygate::keys::digest::Digest;
use keygate::keys::format::{self, KeyFormat, CHECK_LEN, MAX_KEY_LEN, SECRET_LEN};
use keygate::keys::record::KeyRecord;
use keygate::path::{self, MAX_PATH_LEN};
use keygate::store::file;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Once;

/// The fuzz targets, by the name of their `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/` directory.
/// A harness body: arbitrary bytes in, panics on a violated property.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("key_parse", key_parse),
    ("extract", extract_key),
    ("hygiene", hygiene_headers),
    ("path_canon", path_canon),
    ("cidr_authz", cidr_authz),
    ("record_log", record_log),
    ("config", config),
];

// ---------------------------------------------------------------------------------------
// key_parse: KeyFormat::parse, claims, hint; differential on the checksum encoding.
// ---------------------------------------------------------------------------------------

const B62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Independent base62 of a u32, fixed width 6 (62^6 > 2^32).
fn ref_check(crc: u32) -> [u8; CHECK_LEN] {
    let mut out = [b'0'; CHECK_LEN];
    let mut n = u64::from(crc);
    for slot in out.iter_mut().rev() {
        *slot = B62[(n % 62) as usize];
        n /= 62;
    }
    out
}

fn formats() -> [KeyFormat; 3] {
    [
        KeyFormat::new("kg", &["live".to_owned(), "test".to_owned()]),
        KeyFormat::new("acme1", &["prod".to_owned()]),
        KeyFormat::new("abcdefghijklmnop", &["a".to_owned(), "live".to_owned()]),
    ]
}

pub fn key_parse(data: &[u8]) {
    let fmts = formats();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let f = &fmts[usize::from(sel) % fmts.len()];

    // 1. Arbitrary text as a presented key.
    let text = String::from_utf8_lossy(rest);
    let _ = format::hint(&text);
    let _ = f.claims(&text);
    if let Ok(parsed) = f.parse(&text) {
        assert!(text.len() <= MAX_KEY_LEN);
        assert!(text.is_ascii());
        assert!(f.envs().iter().any(|e| e == parsed.env));
        let want = f.prefix().len() + 1 + parsed.env.len() + 1 + SECRET_LEN + CHECK_LEN;
        assert_eq!(text.len(), want, "{text:?}");
        let split = text.len() - CHECK_LEN;
        let crc = crc32fast::hash(&text.as_bytes()[..split]);
        assert_eq!(&text.as_bytes()[split..], &ref_check(crc), "{text:?}");
    }

    // 2. A well-formed key built from the input by the reference encoder must parse; one
    //    with a changed character must not (unless the change is a no-op).
    if rest.len() < 2 {
        return;
    }
    let env = &f.envs()[usize::from(rest[0]) % f.envs().len()];
    let mut key = format!("{}_{}_", f.prefix(), env);
    for i in 0..SECRET_LEN {
        let b = rest.get(1 + i).copied().unwrap_or(i as u8);
        key.push(char::from(B62[usize::from(b) % 62]));
    }
    let crc = crc32fast::hash(key.as_bytes());
    key.push_str(std::str::from_utf8(&ref_check(crc)).unwrap());
    assert_eq!(
        f.parse(&key).map(|p| p.env),
        Ok(env.as_str()),
        "reference-built key refused: {key:?}"
    );
    let hint = format::hint(&key);
    assert!(hint.ends_with(&key[key.len() - 4..]), "{hint:?}");
    assert!(
        !hint.contains(&key[key.len() - 20..key.len() - 4]),
        "hint leaks: {hint:?}"
    );
    let pos = f.prefix().len() + env.len() + 2 + usize::from(rest[1]) % (SECRET_LEN + CHECK_LEN);
    let mut bytes = key.clone().into_bytes();
    bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
    let changed = String::from_utf8(bytes).unwrap();
    assert_eq!(
        f.parse(&changed),
        Err(format::FormatError::BadChecksum),
        "{changed:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Header maps from bytes, shared by `extract` and `hygiene`.
// ---------------------------------------------------------------------------------------

/// Lines of `name:value` (one optional space after the colon is dropped; the rest of the
/// value is kept byte for byte, so OWS, obs-text and non-UTF-8 reach the parsers). A line
/// starting with `?` is the query string. Lines that are not a valid header name or value
/// (as hyper/h2 would have refused them) are skipped.
pub fn header_map(data: &[u8]) -> (HeaderMap, Option<String>) {
    let mut headers = HeaderMap::new();
    let mut query = None;
    for line in data.split(|b| *b == b'\n') {
        if let Some(q) = line.strip_prefix(b"?") {
            query = Some(String::from_utf8_lossy(q).into_owned());
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        headers.append(name, value);
        if headers.len() > 64 {
            break;
        }
    }
    (headers, query)
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn ref_trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !is_ows(*b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ows(*b)).map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

// ---------------------------------------------------------------------------------------
// extract: the key sources (Authorization: Bearer, key header, opt-in query parameter).
// ---------------------------------------------------------------------------------------

/// Reference: RFC 9110 §11.1/§11.4, scheme case-insensitive, 1*(SP/HTAB) then the token.
fn ref_bearer(v: &[u8]) -> Option<&[u8]> {
    if v.len() < 6 || !v[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    match v.get(6) {
        None => Some(&v[6..]),
        Some(b) if is_ows(*b) => Some(ref_trim(&v[6..])),
        Some(_) => None,
    }
}

/// Reference percent-decoding of a query parameter name; `None` on a bad escape.
fn ref_decode_name(raw: &str) -> Option<Vec<u8>> {
    let b = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn ref_extract(
    headers: &HeaderMap,
    query: Option<&str>,
    key_header: &HeaderName,
    param: Option<&str>,
    max_len: usize,
) -> Result<Vec<u8>, ExtractError> {
    let mut candidates: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(http::header::AUTHORIZATION) {
        if let Some(t) = ref_bearer(v.as_bytes()) {
            candidates.push(t);
        }
    }
    for v in headers.get_all(key_header) {
        candidates.push(ref_trim(v.as_bytes()));
    }
    if let (Some(q), Some(p)) = (query, param) {
        for pair in q.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if ref_decode_name(name).as_deref() == Some(p.as_bytes()) {
                candidates.push(value.as_bytes());
            }
        }
    }
    let mut found: Option<&[u8]> = None;
    for c in candidates {
        if c.is_empty() || c.len() > max_len {
            return Err(ExtractError::Malformed);
        }
        if c.contains(&b',') {
            return Err(ExtractError::Ambiguous);
        }
        if !c.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b'%') {
            return Err(ExtractError::Malformed);
        }
        match found {
            Some(prev) if prev != c => return Err(ExtractError::Ambiguous),
            _ => found = Some(c),
        }
    }
    found.map(<[u8]>::to_vec).ok_or(ExtractError::Missing)
}

pub fn extract_key(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (headers, query) = header_map(rest);
    let key_header = if sel & 1 == 0 {
        HeaderName::from_static("x-api-key")
    } else {
        HeaderName::from_static("x-key")
    };
    let param = (sel & 2 != 0).then_some("api_key");
    let max_len = if sel & 4 == 0 { MAX_KEY_LEN } else { 8 };
    let got = extract::extract(&headers, query.as_deref(), &key_header, param, max_len);
    let want = ref_extract(&headers, query.as_deref(), &key_header, param, max_len);
    assert_eq!(
        got.map(str::as_bytes),
        want.as_deref().map_err(|e| *e),
        "headers {headers:?} query {query:?}"
    );
    if let Ok(k) = got {
        // Whatever was extracted then goes through the key-format check.
        for f in formats() {
            let _ = f.parse(k);
        }
    }
}

// ---------------------------------------------------------------------------------------
// hygiene: Connection parsing and sanitize_request / sanitize_response.
// ---------------------------------------------------------------------------------------

const REF_HOP_BY_HOP: &[&str] = &[
    "connection",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];
const REF_REQUEST_STRIP: &[&str] = &[
    "authorization",
    "forwarded",
    "x-real-ip",
    "x-request-id",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-url",
    "x-rewrite-url",
];
const REF_PROTECTED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "cookie",
    "authorization",
    "forwarded",
    "x-real-ip",
    "x-request-id",
];

fn ref_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reference Connection-list parse: `Err` on the first invalid or protected element.
fn ref_nominated(
    headers: &HeaderMap,
    key_header: &HeaderName,
) -> Result<Vec<String>, HygieneError> {
    let mut out = Vec::new();
    for v in headers.get_all(http::header::CONNECTION) {
        for elem in v.as_bytes().split(|b| *b == b',') {
            let t = ref_trim(elem);
            if t.is_empty() {
                continue;
            }
            if !t.iter().all(|b| ref_tchar(*b)) {
                return Err(HygieneError::BadConnectionHeader);
            }
            let name = String::from_utf8(t.to_ascii_lowercase()).unwrap();
            if name == key_header.as_str()
                || REF_PROTECTED.contains(&name.as_str())
                || name.starts_with("x-forwarded-")
                || name.starts_with("x-keygate-")
            {
                return Err(HygieneError::ProtectedNominated);
            }
            out.push(name);
        }
    }
    Ok(out)
}

pub fn hygiene_headers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (original, _) = header_map(rest);
    let key_header = if sel & 1 == 0 {
        HeaderName::from_static("x-api-key")
    } else {
        HeaderName::from_static("x-custom-key")
    };

    let mut headers = original.clone();
    let got = hygiene::sanitize_request(&mut headers, &key_header);
    let want = ref_nominated(&original, &key_header);
    match (&got, &want) {
        (Err(g), Err(w)) => {
            assert_eq!(g, w, "{original:?}");
            assert_eq!(headers, original, "mutated on error");
        }
        (Ok(()), Ok(nominated)) => {
            let dropped = |n: &str| {
                n == key_header.as_str()
                    || REF_HOP_BY_HOP.contains(&n)
                    || REF_REQUEST_STRIP.contains(&n)
                    || nominated.iter().any(|x| x == n)
                    || n.starts_with("x-forwarded-")
                    || n.starts_with("x-keygate-")
                    || n.contains('_')
            };
            for name in original.keys() {
                let before: Vec<_> = original.get_all(name).iter().collect();
                let after: Vec<_> = headers.get_all(name).iter().collect();
                if dropped(name.as_str()) {
                    assert!(after.is_empty(), "{name} forwarded: {original:?}");
                } else {
                    assert_eq!(before, after, "{name} changed: {original:?}");
                }
            }
            assert!(headers.keys().all(|n| original.contains_key(n)));
        }
        _ => panic!("sanitize_request {got:?}, reference {want:?}: {original:?}"),
    }

    let mut response = original.clone();
    hygiene::sanitize_response(&mut response);
    for name in REF_HOP_BY_HOP {
        assert!(
            !response.contains_key(*name),
            "{name} relayed: {original:?}"
        );
    }
    if let Some(id) = hygiene::client_request_id(&original) {
        assert!((1..=128).contains(&id.len()));
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }
}

// ---------------------------------------------------------------------------------------
// path_canon: canonicalize, with properties and an independent reference.
// ---------------------------------------------------------------------------------------

fn ref_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

fn ref_pchar_raw(b: u8) -> bool {
    ref_unreserved(b) || b"!$&'()*+,;=:@".contains(&b)
}

/// Decode one raw segment: unreserved escapes decoded, others kept with uppercase hex.
fn ref_segment(seg: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < seg.len() {
        let b = seg[i];
        if b == b'%' {
            let h = seg.get(i + 1..i + 3)?;
            if !h.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let v = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
            if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                return None;
            }
            if ref_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push_str(&format!("%{v:02X}"));
            }
            i += 3;
        } else if ref_pchar_raw(b) {
            out.push(char::from(b));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

/// Reference canonicaliser: split on raw `/` first, decode per segment, then resolve with
/// empty segments merged, `.` dropped and `..` popping (never above the root).
fn ref_canonicalize(p: &str) -> Option<String> {
    if p.len() > MAX_PATH_LEN || !p.starts_with('/') {
        return None;
    }
    let raw: Vec<&[u8]> = p.as_bytes()[1..].split(|b| *b == b'/').collect();
    let decoded: Vec<String> = raw.iter().map(|s| ref_segment(s)).collect::<Option<_>>()?;
    let mut stack: Vec<&str> = Vec::new();
    for seg in &decoded {
        let head = seg.split(';').next().unwrap_or("");
        let head = head.split("%3B").next().unwrap_or("");
        // Empty or a dot segment once its params are dropped (as servlet containers do).
        if seg.as_str() != head && (head.is_empty() || head == "." || head == "..") {
            return None;
        }
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    let last = decoded.last().map(String::as_str).unwrap_or("");
    let mut out: String = stack.iter().map(|s| format!("/{s}")).collect();
    if matches!(last, "" | "." | "..") || out.is_empty() {
        out.push('/');
    }
    Some(out)
}

fn check_canonical(input: &str, out: &str) {
    assert!(out.starts_with('/'), "{input:?} -> {out:?}");
    assert!(out.len() <= input.len().max(1), "{input:?} -> {out:?} grew");
    for bad in ["//", "%2f", "%2F", "%5c", "%5C", "\\"] {
        assert!(!out.contains(bad), "{input:?} -> {out:?} contains {bad}");
    }
    for seg in out.split('/').skip(1) {
        assert!(
            seg != "." && seg != "..",
            "{input:?} -> {out:?} dot segment"
        );
    }
    assert!(
        out.bytes().all(|b| (0x21..0x7f).contains(&b)),
        "{input:?} -> {out:?} control/non-ASCII"
    );
    assert_eq!(
        path::canonicalize(out).as_deref(),
        Ok(out),
        "not idempotent: {input:?} -> {out:?}"
    );
}

pub fn path_canon(data: &[u8]) {
    let input = String::from_utf8_lossy(data);
    let got = path::canonicalize(&input);
    let want = ref_canonicalize(&input);
    assert_eq!(got.as_deref().ok(), want.as_deref(), "{input:?}: {got:?}");
    if let Ok(out) = &got {
        check_canonical(&input, out);
    }
    // Also as a path with a leading slash, so most inputs reach the later passes.
    if !input.starts_with('/') {
        let slashed = format!("/{input}");
        let got = path::canonicalize(&slashed);
        assert_eq!(
            got.as_deref().ok(),
            ref_canonicalize(&slashed).as_deref(),
            "{slashed:?}"
        );
        if let Ok(out) = &got {
            check_canonical(&slashed, out);
        }
    }
}

// ---------------------------------------------------------------------------------------
// cidr_authz: IpNet parsing (as the record log, admin API and config use it) and
// authz::authorize with arbitrary allow_ips.
// ---------------------------------------------------------------------------------------

fn record(allow_ips: Vec<IpNet>) -> KeyRecord {
    KeyRecord {
        rev: 1,
        id: "key_fuzz".into(),
        digest: Digest([7; 32]),
        secret_version: 1,
        name: "fuzz".into(),
        owner: "team".into(),
        env: "live".into(),
        scopes: vec!["a:read".into()],
        plan: None,
        rate: None,
        quota: None,
        allow_ips,
        allow_origins: vec![],
        labels: BTreeMap::new(),
        hint: "kg_live_…abcd".into(),
        created_at: 1,
        written_at_ms: 1,
        not_before: None,
        expires_at: None,
        revoked_at: None,
        revoked_reason: None,
        canary: false,
        publishable: false,
        imported: false,
        rotated_from: None,
        rotated_to: None,
        rotation: None,
        mac: None,
        lineage: "key_fuzz".into(),
    }
}

/// Reference membership by masks; IPv4-mapped IPv6 clients compare as IPv4.
fn ref_contains(net: &IpNet, client: IpAddr) -> bool {
    let client = match client {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
                IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))
            } else {
                client
            }
        }
        v4 => v4,
    };
    match (net, client) {
        (IpNet::V4(n), IpAddr::V4(c)) => {
            let p = u32::from(n.prefix_len());
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(n.addr()) & mask == u32::from(c) & mask
        }
        (IpNet::V6(n), IpAddr::V6(c)) => {
            let p = u32::from(n.prefix_len());
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(n.addr()) & mask == u128::from(c) & mask
        }
        _ => false,
    }
}

pub fn cidr_authz(data: &[u8]) {
    // Byte 0 picks the client address family, the next 16 bytes are its bits, the rest is
    // a list of candidate CIDRs separated by ',' or newlines.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut raw = [0u8; 16];
    let n = rest.len().min(16);
    raw[..n].copy_from_slice(&rest[..n]);
    let text = String::from_utf8_lossy(&rest[n..]);
    let client = match sel % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        1 => IpAddr::V6(Ipv6Addr::from(raw)),
        _ => IpAddr::V6(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]).to_ipv6_mapped()),
    };

    let candidates: Vec<&str> = text.split([',', '\n']).collect();
    let mut nets = Vec::new();
    let mut all_ok = true;
    for c in &candidates {
        let parsed = c.parse::<IpNet>();
        // serde (record log, admin API) and FromStr (config) must agree.
        let via_json = serde_json::from_value::<IpNet>(serde_json::Value::String((*c).to_owned()));
        assert_eq!(parsed.as_ref().ok(), via_json.as_ref().ok(), "{c:?}");
        match parsed {
            Ok(net) => {
                let max = match net {
                    IpNet::V4(_) => 32,
                    IpNet::V6(_) => 128,
                };
                assert!(net.prefix_len() <= max);
                assert_eq!(
                    net.to_string().parse::<IpNet>(),
                    Ok(net),
                    "round trip {c:?}"
                );
                assert!(net.contains(&net.network()) && net.contains(&net.broadcast()));
                assert!(net.contains(&net.addr()));
                nets.push(net);
            }
            Err(_) => all_ok = false,
        }
    }

    // A record whose allow_ips holds an invalid CIDR is refused whole (THREATS D6).
    let json = serde_json::to_value(record(vec![])).unwrap();
    let mut obj = json.as_object().unwrap().clone();
    obj.insert("allow_ips".into(), serde_json::json!(candidates));
    let from_log = serde_json::from_value::<KeyRecord>(serde_json::Value::Object(obj));
    assert_eq!(from_log.is_ok(), all_ok, "{candidates:?}");
    if let Ok(r) = &from_log {
        assert_eq!(r.allow_ips, nets);
    }

    let key = record(nets.clone());
    let req = Requirements {
        scopes: vec!["a:read".into()],
        env: Some("live".into()),
        publishable: false,
    };
    let got = authz::authorize(
        &keygate::keys::compact::KeyView::of(&key),
        &req,
        client,
        None,
        &[],
    );
    let want = nets.is_empty() || nets.iter().any(|n| ref_contains(n, client));
    assert_eq!(got.is_ok(), want, "client {client} nets {nets:?}: {got:?}");
    if !want {
        assert_eq!(got.err().map(|e| e.code()), Some("network_denied"));
    }
}

// ---------------------------------------------------------------------------------------
// record_log: arbitrary bytes as a log file, and every prefix of it.
// ---------------------------------------------------------------------------------------

/// Largest input whose prefixes are all checked; beyond it prefixes are sampled.
const MAX_CUTS: usize = 48;

fn check_record(r: &KeyRecord) {
    let _ = r.state(0);
    let _ = r.state(i64::MAX);
    let public = r.public_json(0).to_string();
    assert!(
        !public.contains(&r.digest.to_hex()),
        "digest in public json"
    );
}

pub fn record_log(data: &[u8]) {
    let full = file::parse_log(data);
    let mut last = 0;
    for r in &full.records {
        assert!(
            r.rev > last,
            "revisions not increasing: {} after {last}",
            r.rev
        );
        last = r.rev;
        assert!(r.rev <= full.rev);
        check_record(r);
    }
    if let Some(c) = full.compacted_at {
        assert!(c <= full.rev);
    }
    // Truncation (THREATS I4): only the complete lines of a prefix count, so a prefix
    // yields a prefix of the full file's records, never a higher revision.
    let newlines: Vec<usize> = data
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let step = newlines.len().div_ceil(MAX_CUTS).max(1);
    let mut cuts: Vec<usize> = newlines
        .iter()
        .step_by(step)
        .flat_map(|&i| [i, i + 1])
        .collect();
    cuts.extend([0, data.len() / 2, data.len().saturating_sub(1)]);
    for cut in cuts {
        let part = file::parse_log(&data[..cut.min(data.len())]);
        assert!(
            part.rev <= full.rev,
            "prefix {cut}: rev {} > {}",
            part.rev,
            full.rev
        );
        assert!(part.records.len() <= full.records.len());
        assert!(
            part.records[..] == full.records[..part.records.len()],
            "prefix {cut}: records are not a prefix of the full file's"
        );
        assert!(part.corrupt.len() <= full.corrupt.len());
    }
}

// ---------------------------------------------------------------------------------------
// config: Config::parse on arbitrary UTF-8, then Snapshot::build when it parses.
// ---------------------------------------------------------------------------------------

static ENV: Once = Once::new();

/// Set the hash secret once, before any other env access of this process's harness.
pub fn init_env() {
    ENV.call_once(|| {
        std::env::set_var(
            "API_KEY_HASH_SECRET",
            "fuzz-secret-0123456789abcdef0123456789abcdef",
        );
    });
}

/// A config that names a secret file by absolute path would make the harness read an
/// arbitrary file (`/dev/zero`…); relative ones resolve below a directory that does not
/// exist and fail fast.
fn reads_absolute_files(c: &keygate::config::Config) -> bool {
    c.keys
        .hash_secret_file
        .iter()
        .chain(
            c.keys
                .previous_secrets
                .iter()
                .filter_map(|p| p.file.as_ref()),
        )
        .any(|p| p.is_absolute() || p.starts_with("~"))
}

pub fn config(data: &[u8]) {
    init_env();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed =
        keygate::config::Config::parse(text, Path::new("/nonexistent-keygate-fuzz/k.toml"));
    let Ok(c) = parsed else {
        return;
    };
    if reads_absolute_files(&c) {
        return;
    }
    let metrics = keygate::metrics::Metrics::new(c.metrics.per_key_series.min(16));
    let Ok(snap) = keygate::snapshot::Snapshot::build(c, &metrics) else {
        return;
    };
    // What a built snapshot promises the request path.
    for r in &snap.config.routes {
        assert_eq!(
            path::canonicalize(&r.path_prefix).as_deref(),
            Ok(r.path_prefix.as_str()),
            "route prefix not canonical"
        );
        assert!(
            !r.path_prefix.contains(';') && !r.path_prefix.contains("%3B"),
            "route prefix with path parameters"
        );
    }
    assert!(snap.server.max_header_bytes >= 8192);
    assert!(snap.server.max_headers >= 1);
    let _ = snap.policy.shape_for(Some("1/s"), Some("default"));
}
