//! The access line: one per request (target `keygate::access`, opt-in), written when the
//! response body is done, so it can carry the bytes actually sent and the whole latency.
//!
//! Cheap when off: `handle` asks `enabled()` once (a cached callsite check) and, when it is
//! false, builds no line, counts no bytes and wraps the body in a `None`. Fields are an
//! allow-list: the route's name (never the raw path), the canonical host, ids, sizes and
//! times; never a key or a client-sent header value.

use crate::pipeline::RespBody;
use bytes::Bytes;
use http::{HeaderValue, Method};
use hyper::body::{Body, Frame, SizeHint};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Whether access lines are wanted at all (`KEYGATE_LOG=…,keygate::access=info`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "keygate::access", tracing::Level::INFO)
}

/// Request body bytes read from the client, shared with the body streamed upstream.
#[derive(Debug, Clone, Default)]
pub struct BytesIn(Arc<AtomicU64>);

impl BytesIn {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the line says, gathered by `handle`; written on drop of the response body.
#[derive(Debug)]
pub struct Line {
    pub request_id: HeaderValue,
    pub method: Method,
    pub host: Option<String>,
    pub route: Option<String>,
    pub status: u16,
    pub outcome: &'static str,
    pub key_id: Option<String>,
    pub client_ip: IpAddr,
    pub trace_id: String,
    pub started: Instant,
    pub upstream: Option<Duration>,
    pub bytes_in: BytesIn,
    pub bytes_out: u64,
}

impl Line {
    fn write(&self) {
        tracing::info!(
            target: "keygate::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            method = %self.method,
            host = self.host.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("none"),
            status = self.status,
            outcome = self.outcome,
            key_id = self.key_id.as_deref().unwrap_or("-"),
            client_ip = %self.client_ip,
            trace_id = %self.trace_id,
            bytes_in = self.bytes_in.get(),
            bytes_out = self.bytes_out,
            upstream_us = self.upstream.map(|d| d.as_micros() as u64),
            latency_us = self.started.elapsed().as_micros() as u64,
            "request",
        );
    }
}

/// The response body, counting what it hands to hyper when there is a line to write.
pub struct AccessBody {
    inner: RespBody,
    line: Option<Box<Line>>,
}

impl AccessBody {
    pub fn new(inner: RespBody, line: Option<Box<Line>>) -> AccessBody {
        AccessBody { inner, line }
    }
}

/// hyper drops the body once it is sent, or when the client goes away mid-body: either way
/// the request is over and the line is due.
impl Drop for AccessBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.write();
        }
    }
}

impl Body for AccessBody {
    type Data = Bytes;
    type Error = <RespBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(line)) = (&polled, self.line.as_mut()) {
            line.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
