//! The HTTP/1.1 wire format of the upstream side, without IO: the request head written from
//! the forwarded request and its body's framing; the response head parsed (httparse) into
//! `http` parts with its body's framing (RFC 9112 §6.3) and whether the connection may carry
//! another request; and the chunked decoder.
//!
//! Everything an upstream sends is checked here, and each fault is a `WireError` (a 502, the
//! connection closed): a head over 64 KiB or 100 fields, a malformed status line or field, an
//! unrequested 101 (THREATS H9), both Content-Length and Transfer-Encoding or conflicting
//! lengths (A15/H5), a transfer coding other than a lone `chunked` on a response with a body,
//! a malformed chunk line or an oversized trailer section. The framing
//! headers of a request are the gateway's alone: the client's `Content-Length` is written
//! again from the body it actually has, and `Transfer-Encoding` never passes through.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use thiserror::Error;

/// Largest upstream response head we relay; bigger is a broken or hostile upstream.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Response header fields accepted from an upstream (hyper's default, kept).
const MAX_HEADERS: usize = 100;
/// Room in a response's field map for what the gateway adds before relaying it
/// (`X-Request-Id`, the four `RateLimit-*`, CORS' two and `Vary`), so that adding them does
/// not grow and rehash the map: measured at ~900 instructions per request.
const GATEWAY_FIELDS: usize = 8;

/// Longest chunk-size line (size and extensions) and trailer section we read past.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// What an upstream sent that the gateway will not relay.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("upstream response head exceeds 64 KiB")]
    HeadTooLarge,
    #[error("upstream response head has more than 100 fields")]
    TooManyHeaders,
    #[error("malformed upstream response head: {0}")]
    Head(httparse::Error),
    #[error("upstream response status {0} is not valid")]
    Status(u16),
    #[error("invalid header field in upstream response")]
    Field,
    #[error("unrequested 101 from upstream")]
    Unrequested101,
    #[error("upstream response has both Content-Length and Transfer-Encoding")]
    TwoFramings,
    #[error("upstream response has a transfer coding other than chunked")]
    TransferCoding,
    #[error("upstream response has an invalid Content-Length")]
    ContentLength,
    #[error("malformed chunk in upstream response body")]
    Chunk,
    #[error("upstream closed the connection inside a response")]
    Truncated,
}

/// How a request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body (and no framing header added).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a body of unknown length (an HTTP/1.1 chunked or an
    /// HTTP/2 request without a length).
    Chunked,
}

impl RequestFraming {
    /// The framing for a body that is already over (`end_stream`) or has an exact length.
    pub fn of(end_stream: bool, exact: Option<u64>) -> RequestFraming {
        match (end_stream, exact) {
            (true, _) => RequestFraming::Empty,
            (false, Some(n)) => RequestFraming::Length(n),
            (false, None) => RequestFraming::Chunked,
        }
    }
}

/// The request line and fields, in origin-form with HTTP/1.1: `headers`, then `more` (fields
/// already in wire form), then the framing header for `framing` (any the client sent is
/// dropped: the body decides). `target` is an origin-form request target and `headers`
/// values are `HeaderValue`s: neither can hold CR or LF.
pub fn request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    more: &[u8],
    framing: RequestFraming,
) -> Bytes {
    // Room for a typical head at once; a larger one grows.
    let mut out = BytesMut::with_capacity(1024 + target.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(more);
    match framing {
        RequestFraming::Empty => {
            // A client's own `Content-Length: 0` is kept: some upstreams want it on a POST.
            if headers.contains_key(CONTENT_LENGTH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(crate::ascii::Text::<20>::default().decimal(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// One chunk of a chunked request body: size line, data, CRLF.
pub fn chunk(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 20);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// The last chunk, with no trailer section (trailers are never sent upstream, THREATS B7).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// None (HEAD, 204, 304, or `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed final response head.
#[derive(Debug)]
pub struct Head {
    pub parts: Parts,
    pub framing: BodyFraming,
    /// The connection may carry another request once this response is read.
    pub keep_alive: bool,
}

/// A final response head from the start of `buf`, consumed from it; interim (1xx) heads
/// before it are consumed and skipped. `Ok(None)`: the head is not complete yet.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, WireError> {
    loop {
        let Some(scanned) = scan_head(buf)? else {
            return Ok(None);
        };
        if scanned.code == 101 {
            // We never ask for an upgrade, so a 101 is a desync or an attack.
            return Err(WireError::Unrequested101);
        }
        if (100..200).contains(&scanned.code) {
            buf.advance(scanned.len);
            continue;
        }
        let status =
            StatusCode::from_u16(scanned.code).map_err(|_| WireError::Status(scanned.code))?;
        let head = buf.split_to(scanned.len).freeze();
        let mut headers = HeaderMap::with_capacity(scanned.fields.len() + GATEWAY_FIELDS);
        let mut framing = FramingFields::default();
        for f in &scanned.fields {
            let name = HeaderName::from_bytes(&head[f.name.0 as usize..f.name.1 as usize])
                .map_err(|_| WireError::Field)?;
            let value =
                HeaderValue::from_maybe_shared(head.slice(f.value.0 as usize..f.value.1 as usize))
                    .map_err(|_| WireError::Field)?;
            framing.note(&name, &value)?;
            headers.append(name, value);
        }
        let version = if scanned.version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let body = framing.body(status, method)?;
        let keep_alive = framing.keep_alive(version) && body != BodyFraming::Close;
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(Head {
            parts,
            framing: body,
            keep_alive,
        }));
    }
}

/// Where a field's name and value lie in the head, as byte ranges (a head is at most 64 KiB).
#[derive(Debug, Clone, Copy)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// A complete head at the start of a buffer: its length, status code, minor version and
/// where its fields lie.
struct Scanned {
    len: usize,
    code: u16,
    version: u8,
    /// Sized to the head's fields: a zeroed array for the most a head may hold would be
    /// 1.6 KiB written per response for the usual half dozen.
    fields: Vec<Field>,
}

/// Scan a head at the start of `buf` (httparse); `None` when it is not complete yet.
fn scan_head(buf: &[u8]) -> Result<Option<Scanned>, WireError> {
    let mut storage = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut storage,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(WireError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::TooManyHeaders),
        Err(e) => return Err(WireError::Head(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(WireError::HeadTooLarge);
    }
    let (Some(code), Some(version)) = (response.code, response.version) else {
        return Err(WireError::Head(httparse::Error::Status));
    };
    let base = buf.as_ptr() as usize;
    // Offsets into `buf`, which is under 64 KiB + a little here: they fit a u32.
    let at = |s: &[u8]| {
        let start = (s.as_ptr() as usize - base) as u32;
        (start, start + s.len() as u32)
    };
    let fields = response
        .headers
        .iter()
        .map(|h| Field {
            name: at(h.name.as_bytes()),
            value: at(h.value),
        })
        .collect();
    Ok(Some(Scanned {
        len,
        code,
        version,
        fields,
    }))
}

/// The fields that frame a response, noted as the head's fields go by.
#[derive(Default)]
struct FramingFields {
    /// The one length every `Content-Length` value agrees on.
    length: Option<u64>,
    /// The response has a `Transfer-Encoding` field.
    transfer_encoding: bool,
    /// The codings its fields list, all fields together (saturating).
    codings: u8,
    /// One of them is not `chunked`.
    other_coding: bool,
    close: bool,
    keep_alive: bool,
}

impl FramingFields {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), WireError> {
        if name == CONTENT_LENGTH {
            for n in content_lengths(value) {
                let n = n?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(WireError::ContentLength);
                }
                self.length = Some(n);
            }
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            let codings = value.as_bytes().split(|&b| b == b',').map(trim);
            for coding in codings.filter(|c| !c.is_empty()) {
                self.codings = self.codings.saturating_add(1);
                self.other_coding |= !coding.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',').map(trim) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }

    /// RFC 9112 §6.3, in its order, with the two framings on one response refused outright.
    fn body(&self, status: StatusCode, method: &Method) -> Result<BodyFraming, WireError> {
        if self.transfer_encoding && self.length.is_some() {
            return Err(WireError::TwoFramings);
        }
        if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(BodyFraming::Empty);
        }
        if self.transfer_encoding {
            return self.transfer_coding();
        }
        Ok(match self.length {
            None => BodyFraming::Close,
            Some(0) => BodyFraming::Empty,
            Some(n) => BodyFraming::Length(n),
        })
    }

    /// A body with a `Transfer-Encoding` is relayed only when its one coding is `chunked`,
    /// as requests are held to (`pipeline::transfer_coding_is_chunked_only`, THREATS A5).
    /// The gateway decodes the chunks and drops the field (hop-by-hop), so any other coding
    /// (`gzip, chunked`) would reach the client as bytes nothing describes, and one after
    /// `chunked` (`chunked, gzip`, read to the close by RFC 9112 §6.3) as chunked framing
    /// nothing describes either: not a framing the gateway relays, a 502.
    fn transfer_coding(&self) -> Result<BodyFraming, WireError> {
        if self.codings == 1 && !self.other_coding {
            Ok(BodyFraming::Chunked)
        } else {
            Err(WireError::TransferCoding)
        }
    }

    /// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
    /// `keep-alive`, and never after a `Transfer-Encoding`: an HTTP/1.0 message carrying one
    /// has faulty framing and its connection must close after it (RFC 9112 §6.1), whatever
    /// the upstream says (it spoke of a coding HTTP/1.0 does not have).
    fn keep_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close && !self.transfer_encoding
        } else {
            !self.close
        }
    }
}

/// The values of one `Content-Length` field (a list is allowed): decimal numbers.
fn content_lengths(value: &HeaderValue) -> impl Iterator<Item = Result<u64, WireError>> + '_ {
    value.as_bytes().split(|&b| b == b',').map(|item| {
        let digits = trim(item);
        if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(WireError::ContentLength);
        }
        Ok(digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// What the chunked decoder made of the bytes it had.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Nothing yet: read more.
    More,
    /// The last chunk and the trailer section (read and discarded) are through.
    End,
}

/// A chunked body being decoded (RFC 9112 §7.1); trailer fields are read past, not relayed.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Data bytes left in the current chunk.
    left: u64,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data,
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Decode from the front of `buf`, consuming what it decodes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    self.left = chunk_size(&line)?;
                    self.state = if self.left == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Chunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let room = MAX_TRAILER_BYTES.saturating_sub(self.trailer_bytes);
                    let Some(line) = take_line(buf, room)? else {
                        return Ok(Decoded::More);
                    };
                    self.trailer_bytes += line.len() + 2;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The next CRLF-terminated line (without the CRLF), consumed; `None` until it is all there.
/// Longer than `max`, or a bare LF, is a broken chunk.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, WireError> {
    match memchr::memchr(b'\n', &buf[..buf.len().min(max + 2)]) {
        Some(end) if end > 0 && buf[end - 1] == b'\r' => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end - 1);
            Ok(Some(line))
        }
        Some(_) => Err(WireError::Chunk),
        None if buf.len() >= max + 2 => Err(WireError::Chunk),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then nothing, or extensions after `;` (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(WireError::Chunk);
    }
    let rest = trim(&line[digits..]);
    if !rest.is_empty() && rest[0] != b';' {
        return Err(WireError::Chunk);
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], method: &Method) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(bytes), method)
    }

    fn framing(bytes: &[u8]) -> Result<(BodyFraming, bool), WireError> {
        head(bytes, &Method::GET).map(|h| {
            let h = h.expect("complete");
            (h.framing, h.keep_alive)
        })
    }

    #[test]
    fn request_heads_carry_the_bodys_own_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("svc"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let cases = [
            (
                RequestFraming::Empty,
                "GET /a?b HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                RequestFraming::Length(5),
                "GET /a?b HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\n\r\n",
            ),
            (
                RequestFraming::Chunked,
                "GET /a?b HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(
                request_head(&Method::GET, "/a?b", &headers, b"", f),
                want.as_bytes()
            );
        }
        headers.remove(CONTENT_LENGTH);
        assert_eq!(
            request_head(
                &Method::GET,
                "/",
                &headers,
                b"x-more: 1\r\n",
                RequestFraming::Empty
            ),
            &b"GET / HTTP/1.1\r\nhost: svc\r\nx-more: 1\r\n\r\n"[..]
        );
        assert_eq!(
            chunk(b"hello world, 17 b"),
            &b"11\r\nhello world, 17 b\r\n"[..]
        );
        assert_eq!(RequestFraming::of(true, Some(0)), RequestFraming::Empty);
        assert_eq!(
            RequestFraming::of(false, Some(3)),
            RequestFraming::Length(3)
        );
        assert_eq!(RequestFraming::of(false, None), RequestFraming::Chunked);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        use BodyFraming::*;
        type Want = Result<(BodyFraming, bool), WireError>;
        let cases: &[(&[u8], Want)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                Ok((Empty, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(WireError::ContentLength),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                Err(WireError::ContentLength),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
                Err(WireError::ContentLength),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Err(WireError::ContentLength),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok((Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\nTransfer-Encoding: ,\r\n\r\n",
                Ok((Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n",
                Err(WireError::TransferCoding),
            ),
            // No body to frame: the codings do not matter.
            (
                b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Ok((Empty, true)),
            ),
            // RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding never keeps its connection.
            (
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
                Ok((Chunked, false)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Err(WireError::TwoFramings),
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", Ok((Close, false))),
            (
                b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
                Ok((Empty, true)),
            ),
            (b"HTTP/1.1 304 Not Modified\r\n\r\n", Ok((Empty, true))),
            (
                b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 1\r\n\r\n",
                Ok((Length(1), false)),
            ),
            (
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                Ok((Length(1), false)),
            ),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                Ok((Length(1), true)),
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                Err(WireError::Unrequested101),
            ),
            (
                b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n",
                Err(WireError::Head(httparse::Error::Status)),
            ),
            (
                b"hello from the nineties\n\r\n\r\n",
                Err(WireError::Head(httparse::Error::Version)),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(&framing(bytes), want, "{}", String::from_utf8_lossy(bytes));
        }
        // HEAD: no body whatever the fields say.
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(h.unwrap().unwrap().framing, Empty);
    }

    #[test]
    fn heads_are_parsed_once_complete_interim_ones_skipped_and_limits_hold() {
        let full = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 2\r\n\r\nokNEXT";
        for cut in 0..full.len() - 6 {
            assert!(
                head(&full[..cut], &Method::GET).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let mut buf = BytesMut::from(&full[..]);
        let h = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(h.parts.status, 201);
        assert_eq!(h.parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(h.framing, BodyFraming::Length(2));
        assert_eq!(&buf[..], b"okNEXT", "the body's bytes stay in the buffer");

        let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
        let bytes = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(
            framing(bytes.as_bytes()).unwrap_err(),
            WireError::TooManyHeaders
        );
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(
            head(big.as_bytes(), &Method::GET).unwrap_err(),
            WireError::HeadTooLarge
        );
        assert!(framing(b"HTTP/1.1 200 OK\r\nbad\x01name: v\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_decode_across_every_split() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\nNEXT";
        for cut in 0..wire.len() - b"NEXT".len() {
            let mut c = Chunked::default();
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut body = Vec::new();
            let mut feed = |buf: &mut BytesMut, body: &mut Vec<u8>| loop {
                match c.decode(buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::More => return false,
                    Decoded::End => return true,
                }
            };
            assert!(!feed(&mut buf, &mut body), "cut {cut}: not over yet");
            buf.extend_from_slice(&wire[cut..]);
            assert!(feed(&mut buf, &mut body), "cut {cut}");
            assert_eq!(body, b"hello, world", "cut {cut}");
            assert_eq!(&buf[..], b"NEXT");
        }
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            let mut c = Chunked::default();
            let mut buf = BytesMut::from(bad);
            let result = std::iter::from_fn(|| Some(c.decode(&mut buf)))
                .find(|r| !matches!(r, Ok(Decoded::Data(_))))
                .unwrap();
            assert_eq!(
                result,
                Err(WireError::Chunk),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut c = Chunked::default();
        let mut buf = BytesMut::from(format!("1;{}", "e".repeat(MAX_CHUNK_LINE)).as_bytes());
        assert_eq!(c.decode(&mut buf), Err(WireError::Chunk));
    }
}
