//! `keygate health`: ask a running gateway's admin `/readyz` and turn the answer into an exit
//! status, for container health checks (Docker `HEALTHCHECK`, on distroless images that have no
//! curl or shell). A plain blocking HTTP/1.0 GET with one deadline: no runtime, no client
//! library, and the connection closes with the response.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The most of a `/readyz` answer we read: the status line and a short reason fit easily.
const MAX_RESPONSE: usize = 4096;

#[derive(Debug, Error)]
pub enum HealthError {
    #[error("admin address {0:?} does not resolve")]
    Address(String),
    #[error("cannot reach the admin listener at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin listener at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin listener at {addr} did not answer HTTP")]
    NotHttp { addr: SocketAddr },
    #[error("not ready ({status}): {reason}")]
    NotReady { status: u16, reason: String },
}

/// Where to connect for a listen address: a wildcard (`0.0.0.0`, `[::]`) listens on every
/// interface, so this host's loopback reaches it.
pub fn target(listen: &str) -> Result<SocketAddr, HealthError> {
    let addr = listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| HealthError::Address(listen.to_owned()))?;
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    })
}

/// `Ok(body)` when `/readyz` answers 200 within `timeout`.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<String, HealthError> {
    let deadline = Instant::now() + timeout;
    let io = |source| HealthError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| HealthError::Connect { addr, source })?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream.set_write_timeout(Some(left())).map_err(io)?;
    stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(io)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while buf.len() < MAX_RESPONSE {
        stream.set_read_timeout(Some(left())).map_err(io)?;
        match stream.read(&mut chunk).map_err(io)? {
            0 => break,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let (status, body) = parse(&buf).ok_or(HealthError::NotHttp { addr })?;
    if status == 200 {
        Ok(body)
    } else {
        Err(HealthError::NotReady {
            status,
            reason: body,
        })
    }
}

/// Status code and body text of an HTTP/1.x response.
fn parse(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut status_line = head.lines().next()?.split(' ');
    if !status_line.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.next()?.parse().ok()?;
    Some((status, body.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_loopback_and_responses_parse() {
        assert_eq!(
            target("0.0.0.0:9090").unwrap().to_string(),
            "127.0.0.1:9090"
        );
        assert_eq!(target("[::]:9090").unwrap().to_string(), "[::1]:9090");
        assert_eq!(target("10.1.2.3:9").unwrap().to_string(), "10.1.2.3:9");
        assert!(target("no port").is_err());
        assert_eq!(
            parse(b"HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nnot ready: shutting down\n"),
            Some((503, "not ready: shutting down".into()))
        );
        assert_eq!(parse(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse(b""), None);
    }
}
