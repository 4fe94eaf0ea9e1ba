//! RESP2, the Redis wire format: encoding commands and reading one reply.
//!
//! Replies come from the network, so the reader is defensive: lengths are bounded
//! (`MAX_BULK`, `MAX_ARRAY`), nesting is bounded (`MAX_DEPTH`), and anything malformed is a
//! `RedisError::Protocol`, never a panic.

use super::RedisError;
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Largest bulk string we accept (our replies are small: numbers and short lists).
const MAX_BULK: usize = 16 * 1024 * 1024;
/// Longest array we accept.
const MAX_ARRAY: usize = 1 << 20;
/// Deepest nesting we accept (our scripts return flat arrays; SENTINEL replies are 2 deep).
const MAX_DEPTH: usize = 8;
/// Longest `+`/`-`/`:`/`$`/`*` line.
const MAX_LINE: usize = 64 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Simple(String),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    /// A `-ERR …` reply: the command failed, the connection is fine.
    Error(String),
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::Simple(s) => s.parse().ok(),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Simple(s) => Some(s.clone()),
            Value::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The integers of a flat array reply (what our Lua scripts return).
    pub fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Array(items) => items.iter().map(Value::as_int).collect(),
            _ => None,
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Read exactly one reply.
pub async fn read<R: AsyncBufRead + Unpin + Send>(r: &mut R) -> Result<Value, RedisError> {
    read_depth(r, 0).await
}

fn read_depth<'a, R: AsyncBufRead + Unpin + Send>(
    r: &'a mut R,
    depth: usize,
) -> Pin<Box<dyn Future<Output = Result<Value, RedisError>> + Send + 'a>> {
    Box::pin(async move {
        if depth > MAX_DEPTH {
            return Err(RedisError::Protocol("reply nested too deep"));
        }
        let line = read_line(r).await?;
        let (kind, rest) = line
            .split_first()
            .ok_or(RedisError::Protocol("empty line"))?;
        let text = std::str::from_utf8(rest).map_err(|_| RedisError::Protocol("non-UTF-8 line"))?;
        match kind {
            b'+' => Ok(Value::Simple(text.to_owned())),
            b'-' => Ok(Value::Error(text.to_owned())),
            b':' => text
                .parse()
                .map(Value::Int)
                .map_err(|_| RedisError::Protocol("bad integer")),
            b'$' => {
                let Some(n) = length(text, MAX_BULK)? else {
                    return Ok(Value::Nil);
                };
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).await?;
                if !buf.ends_with(b"\r\n") {
                    return Err(RedisError::Protocol("bulk string not terminated"));
                }
                buf.truncate(n);
                Ok(Value::Bulk(buf))
            }
            b'*' => {
                let Some(n) = length(text, MAX_ARRAY)? else {
                    return Ok(Value::Nil);
                };
                let mut items = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    items.push(read_depth(r, depth + 1).await?);
                }
                Ok(Value::Array(items))
            }
            _ => Err(RedisError::Protocol("unknown reply type")),
        }
    })
}

/// A `$`/`*` length: `None` for the null reply (-1), an error past `max`.
fn length(text: &str, max: usize) -> Result<Option<usize>, RedisError> {
    let n: i64 = text
        .parse()
        .map_err(|_| RedisError::Protocol("bad length"))?;
    if n < 0 {
        return Ok(None);
    }
    match usize::try_from(n) {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(RedisError::Protocol("length over the limit")),
    }
}

/// One CRLF-terminated line without its CRLF, bounded by `MAX_LINE`.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, RedisError> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(RedisError::Closed);
    }
    if !line.ends_with(b"\r\n") {
        return Err(RedisError::Protocol("line not terminated"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Value, RedisError> {
        let mut r = tokio::io::BufReader::new(bytes);
        read(&mut r).await
    }

    #[tokio::test]
    async fn replies_parse_and_garbage_is_an_error() {
        assert_eq!(parse(b"+OK\r\n").await.unwrap(), Value::Simple("OK".into()));
        assert_eq!(parse(b":-3\r\n").await.unwrap(), Value::Int(-3));
        assert_eq!(parse(b"$-1\r\n").await.unwrap(), Value::Nil);
        assert_eq!(
            parse(b"*2\r\n$3\r\nabc\r\n:7\r\n").await.unwrap(),
            Value::Array(vec![Value::Bulk(b"abc".to_vec()), Value::Int(7)])
        );
        assert_eq!(
            parse(b"-NOSCRIPT x\r\n").await.unwrap(),
            Value::Error("NOSCRIPT x".into())
        );
        for bad in [
            &b""[..],
            b"?x\r\n",
            b":x\r\n",
            b"$5\r\nab\r\n",
            b"$99999999999\r\n",
            b"*9999999999\r\n",
            b"+no-crlf",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).await.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn encodes_bulk_arrays() {
        assert_eq!(
            encode(&[b"GET", b"k"]),
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()
        );
    }
}
