//! Test support: a scripted RESP server on `127.0.0.1:0` for the client's unit tests.
//!
//! Each accepted connection reads one command at a time (a command is a RESP array of bulk
//! strings, which `resp::read` parses like a reply), hands its arguments to the test's
//! `answer` and writes back the bytes it returns, in order, like Redis does. An answer may
//! wait (a slow or stalled server) or be `None` (the server closes the connection). Every
//! connection's task is owned by the server and ends when it is dropped, so a stalled answer
//! never outlives its test.

use super::resp::{self, Value};
use super::{Settings, Target};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// What the server says to one command: the raw reply bytes, or `None` to hang up.
pub type Answer = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>;

pub struct FakeServer {
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Dropping the accept task drops its `JoinSet`, which aborts every connection.
        self.accept.abort();
    }
}

impl FakeServer {
    pub async fn start<F>(answer: F) -> FakeServer
    where
        F: Fn(Vec<Vec<u8>>) -> Answer + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        let accept = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let answer = answer.clone();
                conns.spawn(async move {
                    let (r, mut w) = tcp.into_split();
                    let mut r = BufReader::new(r);
                    while let Ok(Value::Array(items)) = resp::read(&mut r).await {
                        let args = items
                            .into_iter()
                            .map(|v| match v {
                                Value::Bulk(b) => b,
                                _ => Vec::new(),
                            })
                            .collect();
                        let Some(reply) = answer(args).await else {
                            return;
                        };
                        if w.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeServer { addr, accept }
    }

    /// `host:port` as the client's settings and the sentinels name it.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }
}

/// A bulk string reply.
pub fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", b.len()).into_bytes();
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out
}

/// Client settings for `target` with short timeouts (the tests' failures come fast).
pub fn settings(target: Target, command_timeout: Duration) -> Settings {
    Settings {
        target,
        db: 0,
        tls: None,
        tls_name: String::new(),
        username: None,
        password: None,
        prefix: "t:".into(),
        connect_timeout: Duration::from_millis(500),
        command_timeout,
        revoke_wait_replicas: 0,
        revoke_wait_timeout: Duration::from_millis(10),
        stream_keep_entries: 1,
    }
}

/// Settings for a client talking to `server` directly.
pub fn direct(server: &FakeServer, command_timeout: Duration) -> Settings {
    settings(
        Target::Direct {
            host: server.addr.ip().to_string(),
            port: server.addr.port(),
        },
        command_timeout,
    )
}
