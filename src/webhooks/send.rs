//! One delivery attempt: POST the body with its signature over a fresh HTTP/1.1 connection
//! (TLS with the endpoint's CA bundle for `https://`), everything within the endpoint's
//! timeout; and the backoff between attempts.
//!
//! A fresh connection per attempt keeps a receiver that dropped the last one from poisoning
//! the next; deliveries are rare enough that pooling would buy nothing.

use super::{signature, Endpoint, SIGNATURE_HEADER};
use bytes::Bytes;
use http::{header, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Why an attempt did not deliver. Only the kind reaches metrics; the text goes to the log
/// and audit (it names the receiver, never the body).
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("HTTP {0}")]
    Status(u16),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// POST `body` to `ep`, signed at `t` (Unix seconds). `Ok` only for a 2xx answer.
pub async fn attempt(
    ep: &Endpoint,
    id: &str,
    kind: &str,
    body: Bytes,
    t: i64,
) -> Result<u16, AttemptError> {
    match tokio::time::timeout(ep.timeout, exchange(ep, id, kind, body, t)).await {
        Ok(r) => r,
        Err(_) => Err(AttemptError::Timeout),
    }
}

async fn exchange(
    ep: &Endpoint,
    id: &str,
    kind: &str,
    body: Bytes,
    t: i64,
) -> Result<u16, AttemptError> {
    let authority = ep
        .url
        .authority()
        .ok_or_else(|| AttemptError::Connect("no host".into()))?
        .clone();
    let https = ep.url.scheme_str() == Some("https");
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(if https { 443 } else { 80 })
    );
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| AttemptError::Connect(format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let req = Request::post(ep.url.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("keygate-webhooks/", env!("CARGO_PKG_VERSION")),
        )
        .header("keygate-delivery", id)
        .header("keygate-event", kind)
        .header(SIGNATURE_HEADER, signature(&ep.secret, t, &body))
        .body(Full::new(body))
        .map_err(|e| AttemptError::Protocol(e.to_string()))?;
    match (&ep.tls, https) {
        (Some(config), true) => {
            let name = rustls::pki_types::ServerName::try_from(authority.host().to_owned())
                .map_err(|_| AttemptError::Connect(format!("{addr}: not a TLS server name")))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, stream)
                .await
                .map_err(|e| AttemptError::Connect(format!("{addr}: TLS: {e}")))?;
            post(TokioIo::new(tls), req).await
        }
        (None, true) => Err(AttemptError::Connect("https without a CA bundle".into())),
        _ => post(TokioIo::new(stream), req).await,
    }
}

async fn post<I>(io: I, req: Request<Full<Bytes>>) -> Result<u16, AttemptError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| AttemptError::Protocol(e.to_string()))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| AttemptError::Protocol(e.to_string()))?;
    let status = resp.status().as_u16();
    // The status is the answer; the body is not read (a receiver could send any amount) and
    // the connection, used once, closes when it drops.
    drop(resp);
    if resp_ok(status) {
        Ok(status)
    } else {
        Err(AttemptError::Status(status))
    }
}

fn resp_ok(status: u16) -> bool {
    (200..300).contains(&status)
}

impl AttemptError {
    /// The metrics label of a failed attempt.
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Timeout => "timeout",
            AttemptError::Status(_) => "status",
            AttemptError::Protocol(_) => "protocol",
        }
    }
}

/// Delay before attempt `attempts + 1`: `base · 2^(attempts-1)`, capped, with "equal jitter"
/// (half fixed, half random) so receivers coming back are not hit by every sender at once.
pub fn backoff(base: Duration, attempts: u32, random: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let half = exp / 2;
    let jitter = half.mul_f64(f64::from(random) / f64::from(u32::MAX));
    half + jitter
}

/// A random u32 for jitter (0 if the OS source fails: jitter is a nicety).
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let base = Duration::from_millis(1000);
        assert_eq!(backoff(base, 1, 0), Duration::from_millis(500));
        assert_eq!(backoff(base, 1, u32::MAX), Duration::from_millis(1000));
        assert_eq!(backoff(base, 3, 0), Duration::from_millis(2000));
        assert!(backoff(base, 40, u32::MAX) <= MAX_BACKOFF);
        assert!(backoff(base, 40, 0) >= MAX_BACKOFF / 2);
    }
}
