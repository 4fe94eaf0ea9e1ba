//! Fleet-wide key usage in Redis: one hash per key, `<prefix>u:<key id>`, with `requests`,
//! `s2xx`, `s4xx`, `s5xx` (summed over every node) and `last_used` (the latest anywhere).
//! Gateways write it in one script call per touch interval (batches of `CHUNK` keys), never
//! per request; the CLI and control plane read it for `keys list/show/stale`. A control plane
//! adds its feed gateways' report batches here too, each once (`add_report`).

use super::resp::Value;
use super::script::Script;
use super::{safe_id, Client, RedisError};
use crate::usage::{Delta, Process, Used};
use sha2::Digest as _;
use std::collections::BTreeMap;

const CHUNK: usize = 200;

/// KEYS: usage hashes, after a report's progress mark when ARGV[1] is '1' (then ARGV[2..4]:
/// the batch's seq, this part's number, seconds to keep the mark). Then five numbers per key
/// (requests, s2xx, s4xx, s5xx, last_used). A part the mark covers is skipped (0); every key
/// is read before any is written (a key of another type fails the call), so a part is applied
/// whole or not at all.
static ADD: Script = Script::new(
    r#"
local first, base = 1, 1
if ARGV[1] == '1' then
  first, base = 2, 4
  local m = redis.call('GET', KEYS[1])
  if m then
    local s, p = string.match(m, '^(%d+):(%d+)$')
    local seq, part = tonumber(ARGV[2]), tonumber(ARGV[3])
    if s and (seq < tonumber(s) or (seq == tonumber(s) and part <= tonumber(p))) then return 0 end
  end
end
local last = {}
for i = first, #KEYS do
  local l = redis.pcall('HGET', KEYS[i], 'last_used')
  if type(l) == 'table' and l.err then return redis.error_reply(KEYS[i] .. ': ' .. l.err) end
  last[i] = tonumber(l or '0') or 0
end
for i = first, #KEYS do
  local k, b = KEYS[i], base + (i - first) * 5
  redis.call('HINCRBY', k, 'requests', ARGV[b + 1])
  redis.call('HINCRBY', k, 's2xx', ARGV[b + 2])
  redis.call('HINCRBY', k, 's4xx', ARGV[b + 3])
  redis.call('HINCRBY', k, 's5xx', ARGV[b + 4])
  if tonumber(ARGV[b + 5]) > last[i] then redis.call('HSET', k, 'last_used', ARGV[b + 5]) end
end
if first == 2 then redis.call('SET', KEYS[1], ARGV[2] .. ':' .. ARGV[3], 'EX', ARGV[4]) end
return 1
"#,
);

static READ: Script = Script::new(
    r#"
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('HMGET', k, 'requests', 's2xx', 's4xx', 's5xx', 'last_used')
end
return out
"#,
);

fn key(client: &Client, id: &str) -> String {
    format!("{}u:{id}", client.prefix())
}

/// Add what `usage` counted since its last flush; on failure the counts not added stay
/// pending for the next one (gateways flush this way every touch interval).
pub async fn flush(client: &Client, usage: &crate::usage::Usage) -> Result<(), RedisError> {
    let mut deltas = usage.take_pending();
    let added = add(client, &mut deltas).await;
    if added.is_err() {
        usage.restore(deltas);
    }
    added
}

/// Add one flush's counts, in parts of `CHUNK` keys, taking each part out of `deltas` once it
/// is in: on failure, `deltas` holds what was not added (a failure halfway never has the
/// first parts counted again). Ids that could not be a key name are dropped (keygate never
/// generates them).
pub async fn add(client: &Client, deltas: &mut Vec<Delta>) -> Result<(), RedisError> {
    deltas.retain(|d| safe_id(&d.id));
    let (mut added, mut result) = (0, Ok(()));
    for part in chunks(deltas) {
        if let Err(e) = run_add(client, None, &part).await {
            result = Err(e);
            break;
        }
        added += part.len();
    }
    deltas.drain(..added);
    result
}

/// Add a report batch's counts once, in parts of `CHUNK` keys. The process's mark in Redis
/// (`<prefix>ur:<boot>:<32 hex digits of the node name's SHA-256>`, "seq:part", kept `keep`
/// after its last write) says how far its batches got, so a batch sent again, or one stopped
/// halfway by a failure, counts each part once: on any control plane, also after a restart.
/// Whether any part was applied now (false: the whole batch was applied before).
pub async fn add_report(
    client: &Client,
    from: &Process,
    seq: u64,
    deltas: &[Delta],
    keep: std::time::Duration,
) -> Result<bool, RedisError> {
    // The node name is the reporter's own word: only its digest goes into a key name (L6).
    let digest = sha2::Sha256::digest(from.node.as_bytes());
    let node: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mark = format!("{}ur:{}:{node}", client.prefix(), from.boot);
    let (seq, keep) = (seq.to_string(), keep.as_secs().max(1).to_string());
    let mut applied = false;
    for (part, chunk) in chunks(deltas).into_iter().enumerate() {
        let part = part.to_string();
        let header = [seq.as_str(), part.as_str(), keep.as_str()];
        applied |= run_add(client, Some((&mark, header)), &chunk).await? == Value::Int(1);
    }
    Ok(applied)
}

/// `deltas` with a key name, in parts of at most `CHUNK`, in their order: a batch sent again
/// is cut the same way (`add` and `add_report` both cut here).
fn chunks(deltas: &[Delta]) -> Vec<Vec<&Delta>> {
    let named: Vec<&Delta> = deltas.iter().filter(|d| safe_id(&d.id)).collect();
    named.chunks(CHUNK).map(<[&Delta]>::to_vec).collect()
}

/// One `ADD` call: a part's counts, under a report's mark (its key, seq, part, keep) or none.
async fn run_add(
    client: &Client,
    mark: Option<(&str, [&str; 3])>,
    chunk: &[&Delta],
) -> Result<Value, RedisError> {
    let mut keys: Vec<String> = mark.iter().map(|(k, _)| (*k).to_owned()).collect();
    keys.extend(chunk.iter().map(|d| key(client, &d.id)));
    let mut args: Vec<String> = vec![if mark.is_some() { "1" } else { "0" }.to_owned()];
    if let Some((_, header)) = mark {
        args.extend(header.map(str::to_owned));
    }
    for d in chunk {
        let u = d.used;
        args.extend([u.requests, u.s2xx, u.s4xx, u.s5xx].map(|n| n.to_string()));
        args.push(u.last_used.to_string());
    }
    let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    client.eval(&ADD, &keys, &args).await
}

/// Fleet-wide usage of `ids` (absent keys: never used).
pub async fn read(client: &Client, ids: &[&str]) -> Result<BTreeMap<String, Used>, RedisError> {
    let ids: Vec<&str> = ids.iter().copied().filter(|id| safe_id(id)).collect();
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(CHUNK) {
        let keys: Vec<String> = chunk.iter().map(|id| key(client, id)).collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let Value::Array(rows) = client.eval(&READ, &keys, &[]).await? else {
            return Err(RedisError::Unexpected("usage read"));
        };
        for (id, row) in chunk.iter().zip(rows) {
            let Value::Array(f) = row else { continue };
            let n = |i: usize| f.get(i).and_then(Value::as_int).unwrap_or(0);
            if f.iter().all(|v| *v == Value::Nil) {
                continue;
            }
            out.insert(
                (*id).to_owned(),
                Used {
                    requests: n(0).max(0) as u64,
                    s2xx: n(1).max(0) as u64,
                    s4xx: n(2).max(0) as u64,
                    s5xx: n(3).max(0) as u64,
                    last_used: n(4),
                },
            );
        }
    }
    Ok(out)
}
