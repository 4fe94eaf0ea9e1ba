//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): a valid `traceparent` from the
//! client is continued, a missing or invalid one starts a new trace; the upstream gets the
//! trace with keygate's own span as the parent, and the trace id goes into the access line
//! and problem+json bodies so one id joins the client's, keygate's and the upstream's logs.
//!
//! On the request path, so: ids are fixed-size arrays, hex is written into stack buffers, and
//! a new id costs no syscall (a per-process random seed mixed with a counter, as for request
//! ids). Nothing is allocated: the upstream's `traceparent` is returned as bytes and written
//! straight into the request head (`hygiene::to_upstream`).

use http::{HeaderMap, HeaderName};
use std::sync::atomic::{AtomicU64, Ordering};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
const LEN: usize = 55;

/// A 16-byte trace id; `Display` writes 32 lowercase hex digits without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 32];
        hex(&self.0, &mut buf);
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| std::fmt::Error)?)
    }
}

/// This request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// keygate's span: the parent the upstream sees.
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The client's trace was continued (its `tracestate` belongs to it and is kept).
    pub continued: bool,
    /// The client's span, parent of keygate's (None for a new trace).
    pub parent: Option<[u8; 8]>,
}

/// Makes ids for new traces and spans: unique per process (a bijective mix of a counter) and
/// unpredictable across processes (random seeds).
#[derive(Debug)]
pub struct IdSource {
    seeds: [u64; 3],
    seq: AtomicU64,
    /// New traces are marked sampled: keygate exports spans (the `otlp` feature, configured).
    sample_new: bool,
}

impl IdSource {
    pub fn new() -> IdSource {
        let mut raw = [0u8; 24];
        // Without OS randomness ids are still unique within this process (the counter).
        let _ = getrandom::fill(&mut raw);
        let seed = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        IdSource {
            seeds: [seed(0), seed(1), seed(2)],
            seq: AtomicU64::new(0),
            sample_new: false,
        }
    }

    /// Mark the traces keygate starts as sampled (it records their spans itself).
    pub fn sampling_new_traces(mut self, on: bool) -> IdSource {
        self.sample_new = on;
        self
    }

    /// The context for a request with these headers.
    pub fn context(&self, headers: &HeaderMap) -> TraceContext {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let span_id = nonzero(splitmix(self.seeds[2] ^ n)).to_be_bytes();
        match incoming(headers) {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id,
                flags,
                continued: true,
                parent: Some(parent),
            },
            None => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&splitmix(self.seeds[0] ^ n).to_be_bytes());
                id[8..].copy_from_slice(&nonzero(splitmix(self.seeds[1] ^ n)).to_be_bytes());
                TraceContext {
                    trace_id: TraceId(id),
                    span_id,
                    // Sampled only when keygate records spans itself (`otlp`).
                    flags: u8::from(self.sample_new),
                    continued: false,
                    parent: None,
                }
            }
        }
    }
}

impl Default for IdSource {
    fn default() -> Self {
        IdSource::new()
    }
}

impl TraceContext {
    /// The W3C `sampled` flag: the caller (or keygate, for a trace it started) records it.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// `traceparent` for the upstream: version 00, this trace, keygate's span as the parent.
    fn traceparent(&self) -> [u8; LEN] {
        let mut buf = [0u8; LEN];
        buf[..3].copy_from_slice(b"00-");
        hex(&self.trace_id.0, &mut buf[3..35]);
        buf[35] = b'-';
        hex(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex(&[self.flags], &mut buf[53..55]);
        buf
    }

    /// Remove the client's trace headers and return our `traceparent` for the upstream
    /// (`hygiene::to_upstream` sets it); the client's `tracestate` stays only when its trace
    /// is continued (the spec drops it with an invalid parent).
    pub fn for_upstream(&self, h: &mut HeaderMap) -> [u8; LEN] {
        h.remove(&TRACEPARENT);
        if !self.continued {
            h.remove(&TRACESTATE);
        }
        self.traceparent()
    }
}

/// The trace id and flags of the request's one valid `traceparent`. Several values are
/// ambiguous and start a new trace, as does anything malformed (spec §3.2, §4.3).
fn incoming(headers: &HeaderMap) -> Option<(TraceId, [u8; 8], u8)> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse_with_parent(value.as_bytes())
}

/// `version-traceid-parentid-flags`, lowercase hex. Version 00 is exactly 55 bytes; a later
/// version may append `-…` fields (read as 00, spec §4.3); version ff is invalid. All-zero
/// trace or parent ids are invalid.
pub fn parse(v: &[u8]) -> Option<(TraceId, u8)> {
    parse_with_parent(v).map(|(trace, _, flags)| (trace, flags))
}

/// `parse`, keeping the parent span id too.
fn parse_with_parent(v: &[u8]) -> Option<(TraceId, [u8; 8], u8)> {
    if v.len() < LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&v[..2])?[0];
    if version == 0xff || (version == 0 && v.len() != LEN) || (v.len() > LEN && v[LEN] != b'-') {
        return None;
    }
    let trace = unhex::<16>(&v[3..35])?;
    let parent = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((TraceId(trace), parent, flags))
}

/// Lowercase hex of `bytes` (ids in OTLP's JSON encoding).
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex(bytes, &mut out);
    out.into_iter().map(char::from).collect()
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Lowercase hex only (the spec forbids uppercase).
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// SplitMix64's finaliser: a bijection on u64, so distinct counters give distinct ids.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// All-zero ids are invalid on the wire.
fn nonzero(x: u64) -> u64 {
    x.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TRACEPARENT.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn parse_table() {
        let ok = parse(VALID.as_bytes()).unwrap();
        assert_eq!(ok.0.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ok.1, 1);
        // A later version with extra fields is read as 00.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-extra";
        assert_eq!(parse(future.as_bytes()).map(|p| p.1), Some(9));
        for bad in [
            "",
            &VALID[..54],
            &format!("{VALID}-x"), // 00 is exactly 55
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // forbidden version
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn valid_parent_is_continued_with_a_new_span_and_anything_else_starts_a_trace() {
        let ids = IdSource::new();
        let c = ids.context(&headers(&[VALID]));
        assert!(c.continued);
        assert_eq!(c.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let v = HeaderValue::from_bytes(&c.traceparent()).unwrap();
        let v = v.to_str().unwrap();
        assert!(v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{v}");
        assert!(v.ends_with("-01") && !v.contains("00f067aa0ba902b7"), "{v}");
        assert!(parse(v.as_bytes()).is_some());

        for h in [
            headers(&[]),
            headers(&["garbage"]),
            headers(&[VALID, VALID]),
        ] {
            let a = ids.context(&h);
            let b = ids.context(&h);
            assert!(!a.continued);
            assert_ne!(a.trace_id, b.trace_id, "new traces are distinct");
            assert_ne!(a.span_id, b.span_id);
            let v = HeaderValue::from_bytes(&a.traceparent()).unwrap();
            assert_eq!(
                parse(v.as_bytes()).map(|p| p.0),
                Some(a.trace_id),
                "our own header is valid"
            );
        }
    }

    #[test]
    fn upstream_headers_replace_the_parent_and_drop_an_orphaned_tracestate() {
        let ids = IdSource::new();
        let mut h = headers(&["garbage"]);
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("a=b"));
        let ours = ids.context(&h).for_upstream(&mut h);
        assert!(!h.contains_key(&TRACEPARENT) && !h.contains_key(&TRACESTATE));
        assert!(parse(&ours).is_some(), "our own traceparent is valid");

        let mut h = headers(&[VALID]);
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("a=b"));
        let ours = ids.context(&h).for_upstream(&mut h);
        assert_eq!(h[&TRACESTATE], "a=b");
        assert!(!h.contains_key(&TRACEPARENT));
        assert_eq!(
            &ours[3..35],
            &VALID.as_bytes()[3..35],
            "the trace continues"
        );
        assert_ne!(&ours[..], VALID.as_bytes());
    }
}
