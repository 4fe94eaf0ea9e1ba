//! One Redis connection: TCP (or TLS for `rediss://`), then `AUTH` and `SELECT`, then one
//! command at a time. Timeouts are the caller's (`client`): a command that timed out, failed or
//! was given up (its future dropped) leaves an unread reply behind, so the caller reuses a
//! connection only after a call that read its reply.

use super::resp::{self, Value};
use super::{RedisError, Settings};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Conn {
    io: BufReader<Box<dyn Stream>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl Conn {
    /// Connect to `addr` (`host:port`) within `connect_timeout`, TLS when configured.
    pub async fn open_raw(addr: &str, settings: &Settings, tls: bool) -> Result<Conn, RedisError> {
        let t = settings.connect_timeout;
        let tcp = tokio::time::timeout(t, TcpStream::connect(addr))
            .await
            .map_err(|_| RedisError::ConnectTimeout(addr.to_owned()))??;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Stream> = match settings.tls.as_ref().filter(|_| tls) {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(settings.tls_name.clone())
                    .map_err(|e| RedisError::Tls(e.to_string()))?;
                let s = tokio::time::timeout(
                    t,
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| RedisError::ConnectTimeout(addr.to_owned()))?
                .map_err(|e| RedisError::Tls(e.to_string()))?;
                Box::new(s)
            }
            None => Box::new(tcp),
        };
        Ok(Conn {
            io: BufReader::new(io),
        })
    }

    /// Connect to a data node and authenticate / select the database, all within
    /// `connect_timeout + command_timeout`.
    pub async fn open(addr: &str, settings: &Settings) -> Result<Conn, RedisError> {
        let budget = settings.connect_timeout + settings.command_timeout;
        tokio::time::timeout(budget, async {
            let mut c = Conn::open_raw(addr, settings, true).await?;
            if let Some(pw) = &settings.password {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                if let Some(u) = &settings.username {
                    args.push(u.as_bytes());
                }
                args.push(pw.expose().as_bytes());
                // The reply text is dropped: it could echo nothing secret, but keep it simple.
                match c.call(&args).await? {
                    Value::Simple(_) => {}
                    _ => return Err(RedisError::Auth),
                }
            }
            if settings.db != 0 {
                let db = settings.db.to_string();
                match c.call(&[b"SELECT", db.as_bytes()]).await? {
                    Value::Simple(_) => {}
                    Value::Error(e) => return Err(RedisError::Reply(e)),
                    _ => return Err(RedisError::Unexpected("SELECT")),
                }
            }
            Ok(c)
        })
        .await
        .map_err(|_| RedisError::ConnectTimeout(addr.to_owned()))?
    }

    /// Send one command and read its reply (no timeout here: see the module docs).
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Value, RedisError> {
        self.io.get_mut().write_all(&resp::encode(args)).await?;
        self.io.get_mut().flush().await?;
        resp::read(&mut self.io).await
    }

    /// `call` bounded by `limit`; the connection must be dropped after an `Err`, and after a
    /// call whose future was dropped before it returned.
    pub async fn call_within(
        &mut self,
        limit: Duration,
        args: &[&[u8]],
    ) -> Result<Value, RedisError> {
        tokio::time::timeout(limit, self.call(args))
            .await
            .map_err(|_| RedisError::Timeout)?
    }
}
