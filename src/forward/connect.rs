//! One upstream target: its address as parsed from the config (`host:port`, `http://host:port`
//! or `https://host:port`), and opening a new connection to it: resolve (skipped for an IP
//! literal), TCP with TCP_NODELAY, then TLS for https, all within the upstream's connect
//! timeout.

use super::conn::{Conn, Stream};
use super::pool::{IdlePool, Lease};
use rustls::pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a new connection to a target could not be made (a 502 that ejects the target).
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("{target}: connect timed out")]
    Timeout { target: Box<str> },
    #[error("{target}: resolve: {source}")]
    Resolve {
        target: Box<str>,
        source: std::io::Error,
    },
    #[error("{target}: connect: {source}")]
    Tcp {
        target: Box<str>,
        source: std::io::Error,
    },
    #[error("{target}: TLS handshake: {source}")]
    Tls {
        target: Box<str>,
        source: std::io::Error,
    },
}

/// A target address as configured: host, port and whether it speaks TLS.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Address {
    /// As written in the config (error messages name it).
    pub text: Box<str>,
    /// Host as in a URI (IPv6 in brackets).
    pub host: Box<str>,
    pub port: u16,
    pub https: bool,
}

impl Address {
    /// `host[:port]`, `http://host[:port]` or `https://host[:port]` (default ports 80 and 443);
    /// nothing else: no userinfo, path or query. `None` when it is not one of those.
    pub(super) fn parse(text: &str) -> Option<Address> {
        let (https, rest) = match text.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some(_) => return None,
            None => (false, text),
        };
        if rest.contains('@') || rest.ends_with(':') {
            return None;
        }
        let authority = rest.parse::<http::uri::Authority>().ok()?;
        if authority.as_str() != rest || authority.host().is_empty() {
            return None;
        }
        // Without a port, the scheme's (a bare `host` has always meant port 80); anything
        // after the host must be a numeric port.
        let has_port = rest.len() > authority.host().len();
        let port = match (authority.port_u16(), has_port, https) {
            (Some(p), _, _) => p,
            (None, true, _) => return None,
            (None, false, true) => 443,
            (None, false, false) => 80,
        };
        Some(Address {
            text: text.into(),
            host: authority.host().into(),
            port,
            https,
        })
    }

    fn ip(&self) -> Option<IpAddr> {
        let bare = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        bare.parse().ok()
    }
}

/// TLS for one https target.
pub(super) struct TargetTls {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

pub(super) struct Target {
    pub text: Box<str>,
    host: Box<str>,
    port: u16,
    /// An IP literal target needs no resolver round trip (a blocking-pool hop in tokio).
    ip: Option<SocketAddr>,
    tls: Option<TargetTls>,
    /// Monotonic ms (since `Upstream::epoch`) until which this target is skipped.
    pub ejected_until: AtomicI64,
    pub pool: Arc<IdlePool>,
}

impl Target {
    pub(super) fn new(address: Address, tls: Option<TargetTls>, idle_timeout: Duration) -> Target {
        let ip = address.ip().map(|ip| SocketAddr::new(ip, address.port));
        Target {
            text: address.text,
            host: address.host,
            port: address.port,
            ip,
            tls,
            ejected_until: AtomicI64::new(0),
            pool: Arc::new(IdlePool::new(idle_timeout)),
        }
    }

    /// A new connection, leased to the caller.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<Lease, ConnectError> {
        let target = || self.text.clone();
        let opened = tokio::time::timeout(timeout, async {
            let tcp = self.tcp().await?;
            Ok(match &self.tls {
                None => Stream::Plain(tcp),
                Some(tls) => Stream::Tls(Box::new(
                    tls.connector
                        .connect(tls.name.clone(), tcp)
                        .await
                        .map_err(|source| ConnectError::Tls {
                            target: target(),
                            source,
                        })?,
                )),
            })
        })
        .await;
        let stream = opened.unwrap_or_else(|_| Err(ConnectError::Timeout { target: target() }))?;
        Ok(self.pool.lease(Conn::new(stream)))
    }

    /// TCP to the target: its IP, or each address its name resolves to in turn.
    async fn tcp(&self) -> Result<TcpStream, ConnectError> {
        let tcp_error = |source| ConnectError::Tcp {
            target: self.text.clone(),
            source,
        };
        let stream = match self.ip {
            Some(addr) => TcpStream::connect(addr).await.map_err(tcp_error)?,
            None => {
                let addrs = tokio::net::lookup_host((&*self.host, self.port))
                    .await
                    .map_err(|source| ConnectError::Resolve {
                        target: self.text.clone(),
                        source,
                    })?;
                let mut last = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the name resolved to no address",
                );
                let mut connected = None;
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                connected.ok_or_else(|| tcp_error(last))?
            }
        };
        // Small request heads must not wait for Nagle's delayed ACK round trip.
        stream.set_nodelay(true).map_err(tcp_error)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_forms() {
        let a = Address::parse("127.0.0.1:9000").unwrap();
        assert_eq!((&*a.host, a.port, a.https), ("127.0.0.1", 9000, false));
        let a = Address::parse("http://svc.internal:8080").unwrap();
        assert_eq!((&*a.host, a.port, a.https), ("svc.internal", 8080, false));
        let a = Address::parse("https://svc.internal").unwrap();
        assert_eq!((&*a.host, a.port, a.https), ("svc.internal", 443, true));
        let a = Address::parse("https://[::1]:8443").unwrap();
        assert_eq!((&*a.host, a.port, a.https), ("[::1]", 8443, true));
        assert_eq!(a.ip(), Some("::1".parse().unwrap()));
        let a = Address::parse("svc.internal").unwrap();
        assert_eq!((&*a.host, a.port, a.https), ("svc.internal", 80, false));
        for bad in [
            "",
            ":80",
            "ftp://h:1",
            "https://h:1/",
            "https://u@h:1",
            "u@h:1",
            "h:port",
            "https://h:1?x",
            "https://",
            "h:",
        ] {
            assert_eq!(Address::parse(bad), None, "{bad:?}");
        }
    }
}
