//! Lua scripts: loaded once (`SCRIPT LOAD` returns the SHA1), then run with `EVALSHA`; a
//! server that lost its script cache (restart, failover, `SCRIPT FLUSH`) answers `NOSCRIPT`
//! and the call falls back to `EVAL` with the body, which also re-caches it.

use super::resp::Value;
use super::{Client, RedisError};
use std::sync::Mutex;

#[derive(Debug)]
pub struct Script {
    body: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    pub const fn new(body: &'static str) -> Script {
        Script {
            body,
            sha: Mutex::new(None),
        }
    }

    fn cached_sha(&self) -> Option<String> {
        self.sha.lock().ok().and_then(|s| s.clone())
    }
}

impl Client {
    /// Run `script` with `keys` and `args`; a script error is `RedisError::Reply`.
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value, RedisError> {
        let sha = match script.cached_sha() {
            Some(s) => s,
            None => match self
                .call(&[b"SCRIPT", b"LOAD", script.body.as_bytes()])
                .await?
            {
                Value::Bulk(b) => {
                    let s = String::from_utf8_lossy(&b).into_owned();
                    if let Ok(mut cached) = script.sha.lock() {
                        *cached = Some(s.clone());
                    }
                    s
                }
                Value::Error(e) => return Err(RedisError::Reply(e)),
                _ => return Err(RedisError::Unexpected("SCRIPT LOAD")),
            },
        };
        let numkeys = keys.len().to_string();
        let mut cmd: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        cmd.extend_from_slice(&[b"EVALSHA", sha.as_bytes(), numkeys.as_bytes()]);
        cmd.extend_from_slice(keys);
        cmd.extend_from_slice(args);
        match self.call(&cmd).await? {
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                cmd[0] = b"EVAL";
                cmd[1] = script.body.as_bytes();
                match self.call(&cmd).await? {
                    Value::Error(e) => Err(RedisError::Reply(e)),
                    v => Ok(v),
                }
            }
            Value::Error(e) => Err(RedisError::Reply(e)),
            v => Ok(v),
        }
    }
}
