//! What hyper and h2 refuse before a request reaches the request path, counted in
//! `keygate_protocol_errors_total{kind}`. hyper answers a malformed HTTP/1 head itself (400,
//! 414, 431) and closes the connection, closes one whose head is not whole within
//! `header_read_timeout_ms`, and h2 sends GOAWAY to a client that breaks HTTP/2's rules
//! (floods, rapid reset, bad frames). None of these reach the request path, so without this
//! they showed in no metric and no access line: a scanner or a broken client fleet sending
//! nothing but bad heads was invisible.
//!
//! Not counted: a client that closes or resets its connection, or stops mid-message (normal
//! on the Internet), and a client that stops reading (`keygate_send_timeouts_total`).

use std::error::Error;

/// The counters, one per kind, resolved once at start.
#[derive(Clone, Debug)]
pub struct ProtocolErrors {
    malformed: prometheus::IntCounter,
    too_large: prometheus::IntCounter,
    header_timeout: prometheus::IntCounter,
    h2_calm: prometheus::IntCounter,
    h2_protocol: prometheus::IntCounter,
}

/// The kinds, as the metric's label names them.
pub const KINDS: [&str; 5] = [
    "malformed",
    "too_large",
    "header_timeout",
    "h2_calm",
    "h2_protocol",
];

impl ProtocolErrors {
    pub fn new(family: &prometheus::IntCounterVec) -> ProtocolErrors {
        let c = |kind: &str| family.with_label_values(&[kind]);
        ProtocolErrors {
            malformed: c(KINDS[0]),
            too_large: c(KINDS[1]),
            header_timeout: c(KINDS[2]),
            h2_calm: c(KINDS[3]),
            h2_protocol: c(KINDS[4]),
        }
    }

    /// Counts the error a connection ended with, when it is one of the kinds.
    pub fn count(&self, err: &(dyn Error + 'static)) {
        let Some(err) = err.downcast_ref::<hyper::Error>() else {
            return;
        };
        let counter = if err.is_parse_too_large() {
            &self.too_large
        } else if err.is_parse() {
            &self.malformed
        } else if err.is_timeout() {
            &self.header_timeout
        } else {
            match err.source().and_then(|s| s.downcast_ref::<h2::Error>()) {
                // A GOAWAY h2 sent for the client's behaviour (not the client's own, and not
                // a graceful one).
                Some(e) if e.is_go_away() && e.is_library() => match e.reason() {
                    Some(h2::Reason::ENHANCE_YOUR_CALM) => &self.h2_calm,
                    Some(h2::Reason::NO_ERROR) | None => return,
                    Some(_) => &self.h2_protocol,
                },
                _ => return,
            }
        };
        counter.inc();
    }
}
