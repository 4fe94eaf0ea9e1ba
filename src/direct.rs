//! A connection's service (`ConnService`), and HTTP/1 requests served without hyper. Between
//! hyper's cycles (`keepalive`) a connection's bytes pass through here first: a request that
//! is plain (`ConnService::take`) is parsed where it lies, sent down the request path, and its
//! response written to the socket (`ConnService::exchange`); anything else goes to hyper from
//! the same bytes, as before, and hyper calls the same service (`ConnService::call`).
//!
//! Why: hyper's server, with the cycles that give its buffers back while a connection idles,
//! was the largest piece of user space left, and most of its cost was not parsing but what
//! surrounds it: a read buffer taken and a header timer boxed per message, the dispatcher's
//! polls, the date cache's clock reads, the cycle's framing count. Gateway CPU per request,
//! alternating builds: −5 % without the profile-guided build, −1.9 % with it; an idle
//! connection of plain requests never holds hyper's state (docs/performance.md, "Plain
//! requests served without hyper").
//!
//! Plain means: HTTP/1.1, a method other than `HEAD` and `CONNECT`, an origin-form target, no
//! `Content-Length`, `Transfer-Encoding`, `Expect` or `Upgrade` field, the head whole in the
//! bytes at hand and within `max_header_bytes` and `max_headers`, parsed by httparse as hyper
//! parses it, and not the token exchange (served beside the request path). Such a request has
//! no body, so its head's end is the next message's start under any reading (RFC 9112 §6.3):
//! no framing decision is made here that hyper could make differently, and every request
//! whose framing needs one (a body, `Expect: 100-continue`, an upgrade) and every malformed
//! or oversized head is hyper's, with hyper's answers (400, 431, 501, ...) unchanged.
//!
//! The response is written as hyper writes it: the status line, the fields, `date`, the
//! body's framing from its size (`content-length`, or `transfer-encoding: chunked`; none for
//! 1xx, 204 and 304), `connection: close` when the client asked for it or the server is
//! stopping; frames are gathered while they are ready and written when the body waits or
//! ends. A body that fails or falls short of its length closes the connection.

use crate::access::AccessBody;
use crate::boxed::boxed;
use crate::forward::ClientBody;
use crate::gateway::Gateway;
use crate::keepalive::Socket;
use crate::pipeline::{self, Conn};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use hyper::body::Incoming;
use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Fields parsed in place; a head with more goes to hyper (its limit is `max_headers`).
const MAX_FIELDS: usize = 100;

/// Response bytes gathered before a write while the body keeps producing.
const WRITE_AT: usize = 64 * 1024;

/// A connection's service: the gateway and the connection's facts, kept once per connection
/// whichever way its requests are served, through hyper (`call`) or without it (`take`,
/// `exchange`).
pub struct ConnService {
    pub gw: Arc<Gateway>,
    pub conn: Conn,
}

/// A request's response, as either arm of the service (the request path or the token
/// exchange) produces it.
pub type Served =
    Pin<Box<dyn Future<Output = Result<Response<AccessBody>, std::convert::Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<AccessBody>;
    type Error = std::convert::Infallible;
    type Future = Served;

    /// The token exchange of a gateway that issues sits beside the request path. Boxed per
    /// request: hyper keeps a slot the size of the service's future for the connection's
    /// whole life (`in_flight`, allocated at the start), so an unboxed request path (several
    /// KiB of state) would cost every idle keep-alive connection that much; boxed, the slot
    /// is a pointer and the state lives only while a request is in flight. Each arm's own
    /// future is boxed, not an `async` block around both: such a block holds the request
    /// path's state once more (~4 KiB) and copies it in when it starts the inner future, on
    /// every request.
    fn call(&self, req: Request<Incoming>) -> Served {
        let (gw, conn) = (self.gw.clone(), self.conn);
        if crate::tokens::issue::is_exchange(&gw, &req) {
            boxed(move || crate::tokens::issue::handle(gw, conn, req))
        } else {
            let req = req.map(ClientBody::Hyper);
            boxed(move || pipeline::handle(gw, conn, req))
        }
    }
}

impl ConnService {
    /// The request at the start of `bytes` when it is plain (module header) and not the
    /// token exchange; `None`: it is hyper's (or not whole yet: hyper reads the rest).
    pub fn take(&self, bytes: &Bytes, max_head: usize, max_headers: usize) -> Option<Plain> {
        plain(bytes, max_head, max_headers)
            .filter(|p| !crate::tokens::issue::is_exchange(&self.gw, &p.req))
    }

    /// The request path for `plain` and its response written to `stream`. When no bytes of a
    /// next request are at hand (`Plain::watch`), the client is watched while the request is
    /// in flight, as hyper watches it: gone, the request is dropped, and with it the upstream
    /// exchange (THREATS H8); bytes it sends meanwhile are kept (`After::Read`). Boxed: the
    /// request path's state (~4 KiB) lives only while a request is in flight, never in an
    /// idle connection's future.
    pub fn exchange<'a, T: Socket>(
        &self,
        plain: Plain,
        stop: &'a watch::Receiver<bool>,
        stream: &'a mut T,
    ) -> Pin<Box<dyn Future<Output = After> + Send + 'a>> {
        let (gw, conn) = (self.gw.clone(), self.conn);
        boxed(move || exchange(gw, conn, plain, stop, stream))
    }
}

/// A plain request taken from the front of a connection's bytes.
pub struct Plain {
    req: Request<ClientBody>,
    /// Bytes of the head: what the caller steps over.
    pub len: usize,
    /// The client asked to close after this response (`Connection: close`).
    close: bool,
    /// The head ends the bytes at hand: nothing of a next request is here yet, so the client
    /// is watched while this one is in flight. A field, not an argument of the exchange: as
    /// an argument, a `bool` is laid out past the future's largest state, and the copy into
    /// its box would span the gap (`crate::boxed`).
    watch: bool,
}

/// What a connection does after a plain request's exchange.
pub enum After {
    Close,
    Keep,
    /// Keep, and these bytes came while the request was in flight: the next request's.
    Read(Bytes),
}

async fn exchange<T: Socket>(
    gw: Arc<Gateway>,
    conn: Conn,
    plain: Plain,
    stop: &watch::Receiver<bool>,
    stream: &mut T,
) -> After {
    let mut ahead = None;
    // The request path's state (~4.9 KiB) ends with this block, before the response is
    // written: a state alive across two awaits sits in the part of the future that every
    // request copies into its box, set or not (`crate::boxed`).
    let answered = {
        let mut handle = std::pin::pin!(pipeline::handle(gw, conn, plain.req));
        let mut wait = true;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answered) = handle.as_mut().poll(cx) {
                return Poll::Ready(Some(answered));
            }
            if plain.watch && ahead.is_none() {
                match crate::keepalive::poll_next_bytes(&mut *stream, cx, &mut wait) {
                    Poll::Ready(Ok(bytes)) if !bytes.is_empty() => ahead = Some(bytes),
                    // Closed or failed: the request goes with its client.
                    Poll::Ready(_) => return Poll::Ready(None),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    };
    let resp = match answered {
        Some(Ok(resp)) => resp,
        Some(Err(never)) => match never {},
        None => return After::Close,
    };
    // A server told to stop closes after the response in flight, saying so in it, as
    // hyper's graceful shutdown does.
    let close = plain.close || *stop.borrow();
    if !respond(stream, resp, close).await || close {
        return After::Close;
    }
    match ahead {
        Some(bytes) => After::Read(bytes),
        None => After::Keep,
    }
}

/// The request at the start of `bytes` when it is plain (module header).
fn plain(bytes: &Bytes, max_head: usize, max_headers: usize) -> Option<Plain> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut head = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut head,
        bytes,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if len > max_head || head.headers.len() > max_headers || head.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(head.method?.as_bytes()).ok()?;
    let target = head.path?;
    if method == Method::HEAD || method == Method::CONNECT || !target.starts_with('/') {
        return None;
    }
    let mut map = HeaderMap::with_capacity(head.headers.len());
    let mut close = false;
    for field in head.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE
        {
            return None;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(field.value)).ok()?;
        if name == CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        map.append(name, value);
    }
    let uri = Uri::from_maybe_shared(bytes.slice_ref(target.as_bytes())).ok()?;
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = map;
    Some(Plain {
        req,
        len,
        close,
        watch: len == bytes.len(),
    })
}

/// How the response body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Write `resp` to `stream`; false when the connection must close (a write failed, the body
/// failed or fell short of its length).
async fn respond<T, B>(stream: &mut T, resp: Response<B>, close: bool) -> bool
where
    T: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
{
    let (parts, body) = resp.into_parts();
    let mut out = Vec::with_capacity(512);
    let framing = head(&mut out, parts.status, &parts.headers, &body, close);
    let mut body = std::pin::pin!(body);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let ok = loop {
        let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            // Nothing more yet: what is gathered goes out now (a streamed response).
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match next {
            None => {
                if !write(stream, &mut out).await {
                    return false;
                }
            }
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not sent (HTTP/1 responses here carry none)
                };
                match framing {
                    Framing::None => {}
                    Framing::Length(_) => {
                        if data.len() as u64 > left {
                            break false;
                        }
                        left -= data.len() as u64;
                        out.extend_from_slice(&data);
                    }
                    Framing::Chunked if data.is_empty() => {}
                    Framing::Chunked => {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                }
                if out.len() >= WRITE_AT && !write(stream, &mut out).await {
                    return false;
                }
            }
            Some(Some(Err(_))) => break false,
            Some(None) => {
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                break left == 0;
            }
        }
    };
    // What was gathered goes out even when the body failed: the client sees a response cut
    // short of its framing, and the connection closes, as hyper aborts one.
    write(stream, &mut out).await && ok
}

async fn write<T: AsyncWrite + Unpin>(stream: &mut T, out: &mut Vec<u8>) -> bool {
    let ok = stream.write_all(out).await.is_ok() && stream.flush().await.is_ok();
    out.clear();
    ok
}

/// The status line and fields of a response, with its framing decided.
fn head<B: Body>(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &B,
    close: bool,
) -> Framing {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    for (name, value) in headers {
        // The framing is written below, from the body this response has.
        if name == TRANSFER_ENCODING || name == CONNECTION || name == CONTENT_LENGTH {
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !headers.contains_key(DATE) {
        field(out, b"date", &date());
    }
    // The declared length is the upstream's (hyper's client has checked it against the
    // body); the body's exact size otherwise; chunked when neither is known.
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = pipeline::declared_length(headers).or_else(|| body.size_hint().exact())
    {
        field(
            out,
            b"content-length",
            crate::ascii::Text::<20>::default().decimal(n).as_bytes(),
        );
        Framing::Length(n)
    } else {
        field(out, b"transfer-encoding", b"chunked");
        Framing::Chunked
    };
    if close {
        field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `date` field's value and the second it was made for: made once a second per worker.
    static DATE_LINE: Cell<(i64, [u8; 29])> = const { Cell::new((i64::MIN, [b' '; 29])) };
}

/// The `date` field's value, made again when the second has turned (one clock read per
/// response, where hyper's date cache read it ~2.3 times).
fn date() -> [u8; 29] {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    DATE_LINE.with(|d| {
        if d.get().0 != secs {
            let mut text = [b' '; 29];
            let made = httpdate::fmt_http_date(now);
            if made.len() == text.len() {
                text.copy_from_slice(made.as_bytes());
            }
            d.set((secs, text));
        }
        d.get().1
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::collections::VecDeque;

    fn taken(text: &str) -> Option<Plain> {
        plain(&Bytes::copy_from_slice(text.as_bytes()), 64 * 1024, 100)
    }

    #[test]
    fn plain_requests_are_taken_and_every_other_is_left_to_hyper() {
        let get = "GET /v1/a?b=1 HTTP/1.1\r\nHost: a\r\nX-API-Key: k\r\n\r\n";
        let p = taken(get).expect("plain");
        assert_eq!(p.len, get.len());
        assert!(!p.close);
        assert_eq!(p.req.method(), Method::GET);
        assert_eq!(p.req.uri().path(), "/v1/a");
        assert_eq!(p.req.uri().query(), Some("b=1"));
        assert_eq!(p.req.headers()["x-api-key"], "k");
        for (what, close) in [
            ("close", true),
            ("keep-alive, Close", true),
            ("keep-alive", false),
        ] {
            let text = format!("DELETE /a HTTP/1.1\r\nHost: a\r\nConnection: {what}\r\n\r\n");
            assert_eq!(taken(&text).expect(what).close, close, "{what}");
        }
        // A pipelined pair: the first head only.
        let pair = format!("{get}{get}");
        assert_eq!(taken(&pair).expect("first of two").len, get.len());
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: 1\r\n".repeat(5));
        assert!(plain(&Bytes::from(many.clone()), 64 * 1024, 5).is_some());
        let hyper_s = [
            ("HTTP/1.0", "GET / HTTP/1.0\r\nHost: a\r\n\r\n".to_owned()),
            ("HEAD", "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n".to_owned()),
            (
                "CONNECT",
                "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
            ),
            (
                "asterisk",
                "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
            ),
            (
                "absolute form",
                "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
            ),
            (
                "Content-Length: 0",
                "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_owned(),
            ),
            (
                "a body",
                "POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\na".to_owned(),
            ),
            (
                "chunked",
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
            ),
            (
                "Expect",
                "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n".to_owned(),
            ),
            (
                "Upgrade",
                "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_owned(),
            ),
            ("incomplete", "GET / HTTP/1.1\r\nHost: a\r\n".to_owned()),
            (
                "space before colon",
                "GET / HTTP/1.1\r\nHost : a\r\n\r\n".to_owned(),
            ),
            (
                "obs-fold",
                "GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n".to_owned(),
            ),
            ("bare CR", "GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n".to_owned()),
            ("NUL", "GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n".to_owned()),
            ("bad target", "GET /a b HTTP/1.1\r\n\r\n".to_owned()),
            (
                "over max_head",
                format!("GET / HTTP/1.1\r\nX-A: {}\r\n\r\n", "a".repeat(2000)),
            ),
        ];
        for (what, text) in &hyper_s {
            assert!(
                plain(&Bytes::copy_from_slice(text.as_bytes()), 1024, 100).is_none(),
                "{what}"
            );
        }
        assert!(
            plain(&Bytes::from(many), 64 * 1024, 4).is_none(),
            "over max_headers"
        );
        let over = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_FIELDS + 1)
        );
        assert!(taken(&over).is_none(), "over the fields parsed in place");
    }

    /// A body of frames, with or without a known size.
    struct Frames {
        frames: VecDeque<Result<Bytes, ()>>,
        exact: Option<u64>,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = ();

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, ()>>> {
            Poll::Ready(
                self.frames
                    .pop_front()
                    .map(|f| f.map(http_body::Frame::data)),
            )
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.exact
                .map(http_body::SizeHint::with_exact)
                .unwrap_or_default()
        }
    }

    fn frames(parts: &[Result<&'static str, ()>], exact: Option<u64>) -> Frames {
        Frames {
            frames: parts
                .iter()
                .map(|p| p.map(|s| Bytes::from_static(s.as_bytes())))
                .collect(),
            exact,
        }
    }

    /// The response as written, with its `date` line taken out (checked, then removed).
    async fn written<B: Body<Data = Bytes>>(resp: Response<B>, close: bool) -> (bool, String) {
        let mut out = Vec::new();
        let keep = respond(&mut out, resp, close).await;
        let text = String::from_utf8(out).expect("text");
        let date = text
            .lines()
            .find(|l| l.starts_with("date: "))
            .expect("a date field")
            .to_owned();
        assert_eq!(date.len(), "date: ".len() + 29, "{date}");
        assert!(date.ends_with(" GMT"), "{date}");
        (keep, text.replace(&format!("{date}\r\n"), ""))
    }

    #[tokio::test]
    async fn responses_are_framed_from_their_bodies() {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"hello")));
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r1"));
        // Hop-by-hop fields never pass (the request path strips them; the framing is ours).
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        resp.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(
            written(resp, false).await,
            (
                true,
                "HTTP/1.1 200 OK\r\nx-request-id: r1\r\ncontent-length: 5\r\n\r\nhello".to_owned()
            )
        );
        let streamed = Response::new(frames(&[Ok("ab"), Ok(""), Ok("cde")], None));
        assert_eq!(
            written(streamed, true).await,
            (
                true,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
                    .to_owned()
            )
        );
        let mut empty = Response::new(frames(&[], Some(0)));
        *empty.status_mut() = StatusCode::NO_CONTENT;
        empty
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert_eq!(
            written(empty, false).await,
            (true, "HTTP/1.1 204 No Content\r\n\r\n".to_owned())
        );
        let mut declared = Response::new(frames(&[Ok("abc")], None));
        declared
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(
            written(declared, false).await,
            (
                true,
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn a_body_that_fails_or_falls_short_closes_the_connection() {
        let short = Response::new(frames(&[Ok("ab")], Some(5)));
        let (keep, text) = written(short, false).await;
        assert!(!keep);
        assert!(text.ends_with("content-length: 5\r\n\r\nab"), "{text}");
        let long = Response::new(frames(&[Ok("abcdef")], Some(5)));
        assert!(!written(long, false).await.0);
        let failed = Response::new(frames(&[Ok("ab"), Err(())], None));
        let (keep, text) = written(failed, false).await;
        assert!(!keep);
        // No last chunk: the client sees the response cut short.
        assert!(text.ends_with("\r\n\r\n2\r\nab\r\n"), "{text}");
    }
}
