//! The record log in Redis (`[keys] source = "redis"`): the same signed log as the file store
//! (`store::file`), on an engine a fleet already runs and replicates.
//!
//! Keys (all under `[redis] key_prefix`, built only from fixed suffixes: no id or client
//! string ever reaches a key name, THREATS L6):
//! - `s:meta` — hash: `log` (the log id), `rev` (the last revision issued);
//! - `s:log` — stream, one entry per record version, id `<rev>-1`, field `r` = the record's
//!   JSON: followers read it with a blocking `XREAD` from the revision they hold;
//! - `s:keys` — hash, key id → latest version (what writers and snapshots read);
//! - `s:revoked` — hash, key id → its revoked version, never deleted (tombstones forever);
//! - `s:checkpoint` — string, the binary checkpoint of the table (`store::checkpoint`, sealed
//!   like the file store's) at the revision `s:meta` field `ckpt` names; written by compaction
//!   (`keygate keys compact`) and read by a starting gateway instead of every record.
//!
//! Every write is one Lua script (`WRITE`) that checks the log and the revision the writer
//! signed against (optimistic: another writer in between makes it retry), refuses a version
//! that would un-revoke a key whoever the writer is, appends to the stream and updates the
//! hashes, all atomically. Records carry the same MAC as in the file store, so write access to
//! Redis alone cannot add, widen or un-revoke a key: readers verify every record.
//!
//! Readers follow it with [`Follower`]: a snapshot read with `HSCAN` in small steps (Redis is
//! never blocked for long) consistent at the revision R read first (versions newer than R seen
//! during the scan are dropped: the stream from R brings them), merged with `s:revoked`
//! (tombstones forever: a version in `s:keys` without a recorded revocation stays revoked),
//! then a blocking `XREAD` from R. The same `Update`s as the file follower, so gateways and the
//! control plane apply them the same way.
//!
//! Checkpoint: compaction builds the table at the head revision R from the same consistent
//! snapshot a follower reads, seals it (`checkpoint::encode_at_revision`: it stands for the log
//! id and R), writes it in chunks to a key of its own and renames it into `s:checkpoint` with
//! one script that re-checks the log id and that R is not behind the head or an existing
//! checkpoint (so the checkpoint and the revision it names change together). The trim keeps
//! every stream entry after the checkpoint's revision, so a gateway that loads the checkpoint
//! (chunked `GETRANGE` between reads of the checkpoint's generation: a checkpoint replaced
//! mid-read is read again, never spliced) finds the records after it in the stream and applies
//! them through `sync::apply`. A checkpoint that fails its seal, names another log, or a
//! revision the store does not have is refused loudly, and the whole snapshot is read.
//!
//! Migration (`keygate store migrate`) copies a log between the file and Redis with its log
//! id, revisions and MACs intact (`import_log`, `export_log`).
//!

use crate::keys::digest::Digest;
use crate::keys::record::{unrevokes, KeyRecord, KeyState};
use crate::keys::table::KeyTable;
use crate::redis::resp::Value;
use crate::redis::script::Script;
use crate::redis::{Client, RedisError, Settings};
use crate::store::checkpoint;
use crate::store::file::{last_revision, latest, Parsed, State, StoreError, Update};
use crate::store::seal::{LogId, SealError, Signer};
use std::sync::Arc;
use std::time::Duration;

/// Store commands may move whole tables: they get their own, longer, timeout (the request
/// path's `command_timeout_ms` is for limiter leases).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Records per write script, so no script blocks Redis for long.
const BATCH: usize = 1000;
/// Retries when another writer got in between (each costs one state read).
const RETRIES: usize = 20;

/// Creates the log on first use. Returns {log, rev}.
static INIT: Script = Script::new(
    r#"
if redis.call('HEXISTS', KEYS[1], 'log') == 0 then
  redis.call('HSET', KEYS[1], 'log', ARGV[1], 'rev', 0)
end
return redis.call('HMGET', KEYS[1], 'log', 'rev')
"#,
);

/// The writers' consistent view: {log, rev, every latest version}.
static STATE: Script = Script::new(
    r#"
local m = redis.call('HMGET', KEYS[1], 'log', 'rev')
return {m[1] or '', m[2] or '0', redis.call('HVALS', KEYS[2])}
"#,
);

/// KEYS: meta, log, keys, revoked. ARGV: log, expected rev, then (id, json, revoked 0|1)
/// triples, signed for revisions expected+1, expected+2, … in that order.
/// An entry in the stream above the meta revision (written by someone else than this script)
/// moves the revision past it first: the next ids must stay above the stream's top.
static WRITE: Script = Script::new(
    r#"
local m = redis.call('HMGET', KEYS[1], 'log', 'rev')
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if top[1] then
  local t = tonumber(string.match(top[1][1], '^(%d+)'))
  if t > tonumber(m[2] or '0') then
    redis.call('HSET', KEYS[1], 'rev', t)
    return {'conflict', m[1] or '', tostring(t)}
  end
end
if m[1] ~= ARGV[1] or tonumber(m[2] or '0') ~= tonumber(ARGV[2]) then
  return {'conflict', m[1] or '', m[2] or '0'}
end
for i = 3, #ARGV, 3 do
  if ARGV[i + 2] == '0' and redis.call('HEXISTS', KEYS[4], ARGV[i]) == 1 then
    return {'unrevoke', ARGV[i]}
  end
end
local rev = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  rev = rev + 1
  redis.call('XADD', KEYS[2], rev .. '-1', 'r', ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] == '1' then redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[1], 'rev', rev)
return {'ok', tostring(rev)}
"#,
);

/// Copies signed records verbatim (log id and revisions kept: their MACs stay valid) into an
/// empty store, or continues a copy of the same log that stopped part way (idempotent):
/// entries at or below the stream's top are skipped. ARGV: log, final rev, then
/// (rev, id, json, revoked 0|1) quadruples in revision order.
static IMPORT: Script = Script::new(
    r#"
local m = redis.call('HMGET', KEYS[1], 'log', 'rev')
if m[1] and m[1] ~= ARGV[1] then return {'other_log', m[1]} end
local top = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then top = tonumber(string.match(last[1][1], '^(%d+)')) end
for i = 3, #ARGV, 4 do
  local rev = tonumber(ARGV[i])
  if rev > top then
    redis.call('XADD', KEYS[2], rev .. '-1', 'r', ARGV[i + 2])
    redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 2])
    if ARGV[i + 3] == '1' then redis.call('HSET', KEYS[4], ARGV[i + 1], ARGV[i + 2]) end
    top = rev
  end
end
local cur = tonumber(m[2] or '0')
local want = tonumber(ARGV[2])
if top > want then want = top end
if cur > want then want = cur end
redis.call('HSET', KEYS[1], 'log', ARGV[1], 'rev', want)
return {'ok', tostring(want)}
"#,
);

/// Trims the stream to its newest ARGV[1] entries, but never an entry after the checkpoint's
/// revision (a gateway loading the checkpoint reads them: revisions are dense, so that is the
/// newest `rev - ckpt`), and records in `base` the revision below which history is gone
/// (followers further behind reload whole). KEYS: meta, log, checkpoint. Returns {base, kept}.
static TRIM: Script = Script::new(
    r#"
local keep = tonumber(ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'rev', 'ckpt')
if m[2] and redis.call('EXISTS', KEYS[3]) == 1 then
  local since = tonumber(m[1] or '0') - tonumber(m[2])
  if since > keep then keep = since end
end
redis.call('XTRIM', KEYS[2], 'MAXLEN', keep)
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local base = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if first[1] then base = tonumber(string.match(first[1][1], '^(%d+)')) - 1 end
redis.call('HSET', KEYS[1], 'base', base)
return {base, redis.call('XLEN', KEYS[2])}
"#,
);

/// Replaces the store with a new log (ARGV: the log it replaces, the new log, its revision,
/// then (rev, id, json, revoked 0|1) quadruples signed for the new log), unless someone else already
/// did. One script, so readers see the old log or the new one, never a mix.
static NEW_LOG: Script = Script::new(
    r#"
if redis.call('HGET', KEYS[1], 'log') ~= ARGV[1] then return {'conflict'} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HDEL', KEYS[1], 'ckpt')
for i = 4, #ARGV, 4 do
  redis.call('XADD', KEYS[2], ARGV[i] .. '-1', 'r', ARGV[i + 2])
  redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 2])
  if ARGV[i + 3] == '1' then redis.call('HSET', KEYS[4], ARGV[i + 1], ARGV[i + 2]) end
end
redis.call('HSET', KEYS[1], 'log', ARGV[2], 'rev', ARGV[3], 'base', 0)
return {'ok'}
"#,
);

/// Puts a checkpoint written to its own key (KEYS[3], ARGV[3] bytes) in place as
/// `s:checkpoint` (KEYS[2]) for the log ARGV[1] at revision ARGV[2], with the revision in
/// meta (KEYS[1]) `ckpt` and a new generation, all at once. Refused (and the new key dropped)
/// when the log is another, the revision is ahead of the head, an existing checkpoint is
/// newer, or the written key is not the length written (two writers interleaved).
static CHECKPOINT_PUT: Script = Script::new(
    r#"
local m = redis.call('HMGET', KEYS[1], 'log', 'rev', 'ckpt')
local why = nil
if m[1] ~= ARGV[1] then why = 'other_log'
elseif tonumber(m[2] or '0') < tonumber(ARGV[2]) then why = 'ahead'
elseif m[3] and tonumber(m[3]) > tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 1 then why = 'older'
elseif redis.call('STRLEN', KEYS[3]) ~= tonumber(ARGV[3]) then why = 'torn'
end
if why then
  redis.call('DEL', KEYS[3])
  return {why}
end
redis.call('RENAME', KEYS[3], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], 'ckpt', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'ckpt_gen', 1)
return {'ok'}
"#,
);

/// Bytes per checkpoint write and read command: well under the reply bound (`resp`), and a
/// few milliseconds of Redis time each.
const CHECKPOINT_CHUNK: usize = 4 << 20;
/// The largest checkpoint written or read (Redis strings stop at 512 MiB): ~4M keys at 88
/// bytes an entry plus their strings. A larger table is read record by record.
pub const CHECKPOINT_MAX: usize = 384 << 20;
/// A half-written checkpoint key (a writer that died) expires on its own.
const CHECKPOINT_TMP_TTL_SECS: &[u8] = b"600";

/// The Redis key names of one store.
#[derive(Debug, Clone)]
pub struct Names {
    pub meta: String,
    pub log: String,
    pub keys: String,
    pub revoked: String,
    pub checkpoint: String,
}

impl Names {
    /// KEYS of the write, import and new-log scripts.
    fn all(&self) -> [&[u8]; 5] {
        [
            self.meta.as_bytes(),
            self.log.as_bytes(),
            self.keys.as_bytes(),
            self.revoked.as_bytes(),
            self.checkpoint.as_bytes(),
        ]
    }

    pub fn new(prefix: &str) -> Names {
        Names {
            meta: format!("{prefix}s:meta"),
            log: format!("{prefix}s:log"),
            keys: format!("{prefix}s:keys"),
            revoked: format!("{prefix}s:revoked"),
            checkpoint: format!("{prefix}s:checkpoint"),
        }
    }
}

fn err(e: RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

/// One record as script arguments: (revision,) id, JSON, revoked flag.
fn push_record(args: &mut Vec<Vec<u8>>, r: &KeyRecord, with_rev: bool) -> Result<(), StoreError> {
    if with_rev {
        args.push(r.rev.to_string().into_bytes());
    }
    args.push(r.id.clone().into_bytes());
    args.push(serde_json::to_vec(r).map_err(|e| StoreError::Redis(e.to_string()))?);
    args.push(if r.revoked_at.is_some() {
        b"1".to_vec()
    } else {
        b"0".to_vec()
    });
    Ok(())
}

/// Run one of the store's scripts (on all four keys) and return its reply array.
async fn store_script(
    c: &Client,
    script: &Script,
    n: &Names,
    args: &[Vec<u8>],
) -> Result<Vec<Value>, StoreError> {
    let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    match c.eval(script, &n.all(), &args).await.map_err(err)? {
        Value::Array(reply) => Ok(reply),
        _ => Err(StoreError::Redis(
            "unexpected reply from a store script".into(),
        )),
    }
}

fn text(v: Option<&Value>) -> String {
    v.and_then(Value::as_text).unwrap_or_default()
}

/// One command against the store's Redis from synchronous code (the CLI, a handler's blocking
/// section): its own thread and runtime, so it works inside or outside a runtime.
pub fn blocking_call(settings: &Settings, args: &[&[u8]]) -> Result<Value, StoreError> {
    on_own_runtime(client(settings), |c| async move {
        c.call(args).await.map_err(err)
    })
}

/// Run `f` with `client` on a thread and runtime of its own: a runtime cannot be blocked on
/// from inside another one, and the CLI has none.
fn on_own_runtime<T, F, Fut>(client: Arc<Client>, f: F) -> Result<T, StoreError>
where
    T: Send,
    F: FnOnce(Arc<Client>) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            rt.block_on(f(client))
        })
        .join()
        .unwrap_or_else(|_| Err(StoreError::Redis("store worker panicked".into())))
    })
}

/// The store's settings: `[redis]` with the store's own timeout.
pub fn store_settings(mut s: Settings) -> Settings {
    s.command_timeout = s
        .command_timeout
        .max(STORE_TIMEOUT)
        .max(s.revoke_wait_timeout + Duration::from_secs(1));
    s
}

/// The store's keys must never be evicted (THREATS L4): an evicted revocation is an un-revoked
/// key. Refuses a server whose `maxmemory-policy` is not `noeviction`; a server that does not
/// let us ask (an ACL without `CONFIG`) is allowed with a warning, since the policy may be
/// enforced where we cannot see it.
async fn refuse_eviction(c: &Client) -> Result<(), StoreError> {
    match c.call(&[b"CONFIG", b"GET", b"maxmemory-policy"]).await {
        Ok(Value::Array(v)) => {
            let policy = text(v.get(1));
            if policy.is_empty() || policy == "noeviction" {
                Ok(())
            } else {
                Err(StoreError::Redis(format!(
                    "maxmemory-policy is {policy:?}: the key store's keys could be evicted (an evicted revocation is a live key); set maxmemory-policy noeviction, or give the store its own instance"
                )))
            }
        }
        Ok(Value::Error(e)) => {
            tracing::warn!(reply = %e, "cannot read maxmemory-policy; make sure it is noeviction for the key store");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// A client for store work (its own pool and timeouts; a throwaway metrics registry: the
/// request path's `keygate_redis_*` series describe the limiter's client).
/// One connection: a write and the `WAIT` after it must share a connection (`WAIT` counts the
/// replicas that have that connection's writes).
pub fn client(settings: &Settings) -> Arc<Client> {
    Client::with_pool(
        store_settings(settings.clone()),
        crate::metrics::Metrics::new(0).redis_metrics(),
        1,
    )
}

/// Give a new store its log id; returns (log, revision).
pub async fn init(c: &Client, n: &Names) -> Result<(LogId, u64), StoreError> {
    let fresh = LogId::new().map_err(|e| StoreError::Redis(e.to_string()))?;
    let fresh = fresh.to_string();
    let v = c
        .eval(&INIT, &[n.meta.as_bytes()], &[fresh.as_bytes()])
        .await
        .map_err(err)?;
    let Value::Array(m) = v else {
        return Err(StoreError::Redis(
            "unexpected reply to the init script".into(),
        ));
    };
    head_of(&text(m.first()), &text(m.get(1)))
}

fn head_of(log: &str, rev: &str) -> Result<(LogId, u64), StoreError> {
    let log = if log.is_empty() {
        LogId::NONE
    } else {
        log.parse()
            .map_err(|e| StoreError::Redis(format!("store meta log id: {e}")))?
    };
    let rev = rev
        .parse()
        .map_err(|_| StoreError::Redis("store meta revision is not a number".into()))?;
    Ok((log, rev))
}

/// The log id and last revision (`NONE`, 0 before the first write).
pub async fn head(c: &Client, n: &Names) -> Result<(LogId, u64), StoreError> {
    head_and_base(c, n).await.map(|(log, rev, _)| (log, rev))
}

/// The log id, last revision, and the revision below which the stream was trimmed.
async fn head_and_base(c: &Client, n: &Names) -> Result<(LogId, u64, u64), StoreError> {
    let v = c
        .call(&[b"HMGET", n.meta.as_bytes(), b"log", b"rev", b"base"])
        .await
        .map_err(err)?;
    let Value::Array(m) = v else {
        return Err(StoreError::Redis("unexpected reply to HMGET".into()));
    };
    let rev = text(m.get(1));
    let (log, rev) = head_of(&text(m.first()), if rev.is_empty() { "0" } else { &rev })?;
    let base = text(m.get(2)).parse().unwrap_or(0);
    Ok((log, rev, base))
}

/// Records a read could not verify because their MAC names a secret version that is not
/// configured: never used, but what the start-up secret-version check is about (`server.rs`).
/// (id, revision, the key's digest secret version, its state when read.)
pub type Unverifiable = Vec<(String, u64, u32, KeyState)>;

/// What starting from the checkpoint gave: its table and the records after it, none, or why
/// the checkpoint in Redis was refused.
pub type Resumed = Result<Option<(KeyTable, Parsed)>, String>;

/// Parse and verify stored record JSON; what does not verify is reported corrupt, never used.
pub fn verified(signer: &Signer, log: LogId, raw: &[u8], out: &mut Parsed) -> Option<KeyRecord> {
    checked(signer, log, raw, out, &mut Vec::new())
}

/// [`verified`], noting in `unknown` the records under a secret version not configured.
fn checked(
    signer: &Signer,
    log: LogId,
    raw: &[u8],
    out: &mut Parsed,
    unknown: &mut Unverifiable,
) -> Option<KeyRecord> {
    let corrupt = |reason: String| crate::store::file::Corrupt { line: 0, reason };
    match serde_json::from_slice::<KeyRecord>(raw) {
        Ok(r) => match signer.verify(log, &r) {
            Ok(()) => Some(r),
            Err(e) => {
                if let SealError::UnknownVersion(_) = e {
                    let state = r.state(crate::clock::unix_secs());
                    unknown.push((r.id.clone(), r.rev, r.secret_version, state));
                }
                out.corrupt.push(corrupt(e.to_string()));
                None
            }
        },
        Err(e) => {
            out.corrupt.push(corrupt(e.to_string()));
            None
        }
    }
}

/// Every latest version, verified, in revision order, with the log and revision.
async fn state(c: &Client, n: &Names, signer: &Signer) -> Result<Parsed, StoreError> {
    let v = c
        .eval(&STATE, &[n.meta.as_bytes(), n.keys.as_bytes()], &[])
        .await
        .map_err(err)?;
    let Value::Array(parts) = v else {
        return Err(StoreError::Redis(
            "unexpected reply to the state script".into(),
        ));
    };
    let (log, rev) = head_of(&text(parts.first()), &text(parts.get(1)))?;
    let mut out = Parsed {
        log,
        rev,
        ..Parsed::default()
    };
    if let Some(Value::Array(values)) = parts.get(2) {
        for v in values {
            if let Value::Bulk(raw) = v {
                if let Some(r) = verified(signer, log, raw, &mut out) {
                    out.records.push(r);
                }
            }
        }
    }
    out.records.sort_by_key(|r| r.rev);
    Ok(out)
}

/// The log in Redis, with the same interface as the file (`LogFile`) for the CLI and the
/// control plane. Its methods are blocking: each runs on a private thread and runtime, so it
/// is callable from the CLI and from a runtime's blocking pool alike.
#[derive(Debug, Clone)]
pub struct RedisLog {
    settings: Settings,
    names: Names,
    signer: Signer,
}

impl RedisLog {
    pub fn new(settings: Settings, signer: Signer) -> RedisLog {
        RedisLog {
            names: Names::new(&settings.prefix),
            settings,
            signer,
        }
    }

    /// Run `f` with a fresh client on its own thread and runtime (a runtime cannot be
    /// blocked on from inside another one).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send,
        F: FnOnce(Arc<Client>) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        on_own_runtime(client(&self.settings), f)
    }

    pub fn load(&self) -> Result<Parsed, StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(|c| async move { state(&c, n, signer).await })
    }

    /// The digest of every key the store holds (what an import skips), read with `HSCAN` in
    /// small steps rather than one `HVALS` reply (which times out on a large store).
    pub fn digests(&self) -> Result<std::collections::HashSet<Digest>, StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(move |c| async move {
            let (log, rev) = head(&c, n).await?;
            let records = Follower::scan_with(&c, &n.keys, signer, log, rev).await?;
            Ok(records.iter().map(|r| r.digest).collect())
        })
    }

    /// The latest version of every key, parsed but not verified (as
    /// `KeySettings::latest_unverified` reads the file): a record signed under a secret
    /// version no longer configured cannot be verified, and secret-version reports are about
    /// exactly those. Unparsable values are skipped.
    pub fn latest_unverified(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let n = &self.names;
        self.run(move |c| async move {
            let mut out = Vec::new();
            hscan_values(&c, &n.keys, |raw| {
                if let Ok(r) = serde_json::from_slice::<KeyRecord>(&raw) {
                    out.push(r);
                }
            })
            .await?;
            Ok(out)
        })
    }

    /// The log's last revision (one `HMGET`).
    pub fn head_revision(&self) -> Result<u64, StoreError> {
        let n = &self.names;
        self.run(|c| async move { head(&c, n).await.map(|h| h.1) })
    }

    /// Give a new store its log id (and refuse a server that may evict it). Returns the id.
    pub fn ensure_signed(&self) -> Result<LogId, StoreError> {
        let n = &self.names;
        self.run(|c| async move {
            refuse_eviction(&c).await?;
            init(&c, n).await.map(|h| h.0)
        })
    }

    /// As `LogFile::transact`: `build` sees every key's latest version; the new versions are
    /// signed for the next revisions and written by one script that re-checks the log and
    /// revision (another writer in between: read again and rebuild, bounded), and refuses an
    /// un-revoke. Batches of at most `BATCH` records (each atomic; a larger change is several).
    /// `commit` runs once, after the write, with what the written run of `build` returned
    /// (`Store::transact`, `CommitPoint::AfterWrite`).
    pub fn transact<T, E>(
        &self,
        build: impl FnMut(&State) -> Result<(Vec<KeyRecord>, T), E> + Send,
        commit: impl FnOnce(T) -> Result<(), E> + Send,
    ) -> Result<Result<Vec<KeyRecord>, E>, StoreError>
    where
        T: Send,
        E: Send,
    {
        let (n, signer) = (&self.names, &self.signer);
        let (wait_replicas, wait_timeout) = (
            self.settings.revoke_wait_replicas,
            self.settings.revoke_wait_timeout,
        );
        let mut build = build;
        self.run(move |c| async move {
            init(&c, n).await?;
            for _ in 0..RETRIES {
                let parsed = state(&c, n, signer).await?;
                let (log, rev) = (parsed.log, parsed.rev);
                let st = State {
                    keys: latest(parsed.records),
                    rev,
                    corrupt: parsed.corrupt,
                };
                let (mut records, done) = match build(&st) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                };
                if let Some(r) = records.iter().find(|r| unrevokes(st.keys.get(&r.id), r)) {
                    return Err(StoreError::Unrevoke { id: r.id.clone() });
                }
                match write(&c, n, signer, log, rev, &mut records).await? {
                    Written::Ok => {
                        // Written: this run is the change, committed once (its audit).
                        let committed = commit(done);
                        let waited = if records.iter().any(|r| r.revoked_at.is_some()) {
                            replicated(&c, wait_replicas, wait_timeout).await
                        } else {
                            Ok(())
                        };
                        // A failed commit first: nothing else tells the caller of it.
                        return match committed {
                            Err(e) => Ok(Err(e)),
                            Ok(()) => waited.map(|()| Ok(records)),
                        };
                    }
                    // Nothing written and nothing committed: build again on the new state.
                    Written::Conflict => continue,
                }
            }
            Err(StoreError::Redis(
                "other writers kept changing the store; try again".into(),
            ))
        })
    }

    /// Copy a whole signed log (records in revision order, every version) into Redis as it is:
    /// same log id, revisions and MACs. Refuses a Redis store of another log; resumable.
    /// Returns how many records Redis holds in its stream afterwards.
    pub fn import_log(
        &self,
        log: LogId,
        rev: u64,
        records: &[KeyRecord],
    ) -> Result<u64, StoreError> {
        let n = &self.names;
        self.run(|c| async move {
            let log_s = log.to_string();
            let rev_s = rev.to_string();
            // Even an empty log gets its meta (log id, revision).
            let chunks: Vec<&[KeyRecord]> = if records.is_empty() {
                vec![&[]]
            } else {
                records.chunks(BATCH).collect()
            };
            for chunk in chunks {
                let mut args: Vec<Vec<u8>> =
                    vec![log_s.clone().into_bytes(), rev_s.clone().into_bytes()];
                for r in chunk {
                    push_record(&mut args, r, true)?;
                }
                let reply = store_script(&c, &IMPORT, n, &args).await?;
                if text(reply.first()) != "ok" {
                    return Err(StoreError::Redis(format!(
                        "Redis already holds another store (log {}); refusing to mix two logs",
                        text(reply.get(1))
                    )));
                }
            }
            let v = c.call(&[b"XLEN", n.log.as_bytes()]).await.map_err(err)?;
            Ok(v.as_int().unwrap_or(0).max(0) as u64)
        })
    }

    /// Every version in the stream, verified, in revision order, with the log id and the
    /// last revision: what `keygate store migrate --to file` writes.
    pub fn export_log(&self) -> Result<Parsed, StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(|c| async move {
            let (log, rev) = head(&c, n).await?;
            let mut out = Parsed {
                log,
                rev,
                ..Parsed::default()
            };
            let mut from = "-".to_owned();
            // Bounded: each step moves past the last id read.
            for _ in 0..10_000_000u64 {
                let page = xrange_page(&c, &n.log, &from).await?;
                let Some(last) = page.last().map(|e| e.0) else {
                    break;
                };
                for (_, raw) in page {
                    if let Some(r) = verified(signer, log, &raw, &mut out) {
                        out.records.push(r);
                    }
                }
                from = format!("({last}-1");
            }
            Ok(out)
        })
    }

    /// Compaction for the Redis store: the latest versions already live in `s:keys` and every
    /// revocation in `s:revoked`, so it writes the table's checkpoint (what gateways start
    /// from) and then trims the stream's history (`trim`). Returns the keys in the table.
    /// A checkpoint that cannot be written is only warned about: gateways then read the
    /// keys record by record, as before.
    pub fn compact(&self) -> Result<usize, StoreError> {
        let keys = match self.write_checkpoint() {
            Ok((keys, Ok(bytes))) => {
                tracing::info!(keys, bytes, "redis store: table checkpoint written");
                keys
            }
            Ok((keys, Err(why))) => {
                tracing::warn!(keys, reason = %why, "redis store: table checkpoint not written; gateways will read the keys record by record");
                keys
            }
            Err(e) => return Err(e),
        };
        let (kept, _base) = self.trim()?;
        tracing::info!(stream_entries = kept, "redis store: stream trimmed");
        Ok(keys)
    }

    /// Write the checkpoint of the table at the head revision (`s:checkpoint`): the same
    /// snapshot a follower reads, sealed (`checkpoint::encode_at_revision`), put in place with
    /// the revision it stands for. Returns the keys in the table and the bytes written, or why
    /// nothing was written (too large: the old checkpoint is removed too, so it holds no
    /// stream history back; or another writer's was newer).
    pub fn write_checkpoint(&self) -> Result<(usize, Result<usize, String>), StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(|c| async move {
            let (log, rev) = head(&c, n).await?;
            if log.is_none() {
                return Ok((0, Err("the store has no log yet".into())));
            }
            let mut parsed = Parsed::default();
            let records =
                snapshot(&c, n, signer, (log, rev), &mut parsed, &mut Vec::new()).await?;
            if !parsed.corrupt.is_empty() {
                tracing::warn!(records = parsed.corrupt.len(), "redis store: records that do not verify are left out of the checkpoint (gateways skip them too)");
            }
            let table = KeyTable::from_records(records, log, rev);
            let keys = table.len();
            let bytes = checkpoint::encode_at_revision(&table, signer)
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            drop(table);
            if bytes.len() > CHECKPOINT_MAX {
                c.call(&[b"DEL", n.checkpoint.as_bytes()]).await.map_err(err)?;
                c.call(&[b"HDEL", n.meta.as_bytes(), b"ckpt"]).await.map_err(err)?;
                return Ok((
                    keys,
                    Err(format!(
                        "{} bytes, above the {CHECKPOINT_MAX} a checkpoint may hold",
                        bytes.len()
                    )),
                ));
            }
            Ok(match put_checkpoint(&c, n, log, rev, &bytes).await? {
                None => (keys, Ok(bytes.len())),
                Some(why) => (keys, Err(format!("refused by the store ({why})"))),
            })
        })
    }

    /// Trims the stream's history to its newest `[redis] stream_keep_entries` entries (never
    /// an entry after the checkpoint's revision). Returns (entries kept, revision below which
    /// history is gone).
    pub fn trim(&self) -> Result<(u64, u64), StoreError> {
        let (n, keep) = (&self.names, self.settings.stream_keep_entries);
        self.run(|c| async move {
            let keep = keep.max(1).to_string();
            let v = c
                .eval(
                    &TRIM,
                    &[n.meta.as_bytes(), n.log.as_bytes(), n.checkpoint.as_bytes()],
                    &[keep.as_bytes()],
                )
                .await
                .map_err(err)?;
            let Value::Array(r) = v else {
                return Err(StoreError::Redis(
                    "unexpected reply to the trim script".into(),
                ));
            };
            let int = |i: usize| r.get(i).and_then(Value::as_int).unwrap_or(0).max(0) as u64;
            Ok((int(1), int(0)))
        })
    }

    /// A writer that knows the log went back (a failover lost writes acknowledged without
    /// `WAIT`, or an old dump was loaded): continue as a new log whose revisions start after
    /// `known_rev`, with every revocation Redis still records and every one in
    /// `known_revoked` (what this writer served) re-applied. Readers see a new log id, reload
    /// whole, and keep what they had revoked. Returns the new log id.
    pub fn continue_after(
        &self,
        known_rev: u64,
        known_revoked: &[KeyRecord],
    ) -> Result<LogId, StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(|c| async move {
            let current = state(&c, n, signer).await?;
            let old_log = current.log;
            let mut keys = latest(current.records);
            let mut gone = Follower::scan_with(&c, &n.revoked, signer, old_log, u64::MAX).await?;
            gone.extend(known_revoked.iter().cloned());
            for r in gone {
                match keys.get(&r.id) {
                    Some(cur) if cur.revoked_at.is_some() => {}
                    _ => {
                        keys.insert(r.id.clone(), r);
                    }
                }
            }
            let mut records: Vec<KeyRecord> = keys.into_values().collect();
            records.sort_by(|a, b| a.rev.cmp(&b.rev).then_with(|| a.id.cmp(&b.id)));
            let log = LogId::new().map_err(|e| StoreError::Redis(e.to_string()))?;
            let base = current.rev.max(known_rev);
            let rev = last_revision(base, records.len())?;
            let mut args: Vec<Vec<u8>> = vec![
                old_log.to_string().into_bytes(),
                log.to_string().into_bytes(),
                Vec::new(),
            ];
            // `rev` bounds the range: with records in it, base + 1 ..= rev holds one each.
            for (r, next) in records.iter_mut().zip(base.saturating_add(1)..=rev) {
                r.rev = next;
                signer.sign(log, r);
                push_record(&mut args, r, true)?;
            }
            args[2] = rev.to_string().into_bytes();
            let reply = store_script(&c, &NEW_LOG, n, &args).await?;
            if text(reply.first()) != "ok" {
                // Another control plane did it first: follow its log.
                return head(&c, n).await.map(|h| h.0);
            }
            tracing::error!(%log, revision = rev, replaced = %old_log, "redis store went back (lost writes?): continued as a new log with every known revocation");
            Ok(log)
        })
    }

    /// New keys (creation, import): written after the log's head (id and revision, one
    /// `HMGET`), never reading every key (`HVALS`) as `transact` does, so an import of a
    /// million keys in batches stays linear. The write script still re-checks the head (a
    /// writer in between: read the head again) and refuses an un-revoke.
    pub fn append(&self, records: Vec<KeyRecord>) -> Result<Vec<KeyRecord>, StoreError> {
        let (n, signer) = (&self.names, &self.signer);
        self.run(move |c| async move {
            let mut records = records;
            let mut at = init(&c, n).await?;
            for _ in 0..RETRIES {
                match write(&c, n, signer, at.0, at.1, &mut records).await? {
                    Written::Ok => return Ok(records),
                    Written::Conflict => at = head(&c, n).await?,
                }
            }
            Err(StoreError::Redis(
                "other writers kept changing the store; try again".into(),
            ))
        })
    }
}

/// A revocation is acknowledged only once `replicas` replicas have it (`WAIT`, on the
/// connection that wrote it): an asynchronous replica promoted by a failover would otherwise
/// lose it. Nothing to wait for when `replicas` is 0.
async fn replicated(c: &Client, replicas: u32, timeout: Duration) -> Result<(), StoreError> {
    if replicas == 0 {
        return Ok(());
    }
    let (n, ms) = (replicas.to_string(), timeout.as_millis().to_string());
    let acked = c
        .call(&[b"WAIT", n.as_bytes(), ms.as_bytes()])
        .await
        .map_err(err)?
        .as_int()
        .unwrap_or(0);
    if acked >= i64::from(replicas) {
        Ok(())
    } else {
        Err(StoreError::NotReplicated {
            acked,
            wanted: replicas,
        })
    }
}

enum Written {
    Ok,
    Conflict,
}

/// Sign `records` for the revisions after `rev` in `log` and write them, `BATCH` at a time.
/// A conflict on the first batch means nothing was written; on a later one, the earlier
/// batches stand (each is atomic), which is what makes a bulk write resumable.
async fn write(
    c: &Client,
    n: &Names,
    signer: &Signer,
    log: LogId,
    mut rev: u64,
    records: &mut [KeyRecord],
) -> Result<Written, StoreError> {
    let log_s = log.to_string();
    for (i, chunk) in records.chunks_mut(BATCH).enumerate() {
        // The head comes from Redis, where an entry with a huge id needs no secret: checked.
        let last = last_revision(rev, chunk.len())?;
        let mut args: Vec<Vec<u8>> = vec![log_s.clone().into_bytes(), rev.to_string().into_bytes()];
        for (r, next) in chunk.iter_mut().zip(rev.saturating_add(1)..=last) {
            r.rev = next;
            signer.sign(log, r);
            push_record(&mut args, r, false)?;
        }
        let reply = store_script(c, &WRITE, n, &args).await?;
        match text(reply.first()).as_str() {
            "ok" => rev = last,
            "conflict" if i == 0 => return Ok(Written::Conflict),
            "conflict" => {
                return Err(StoreError::Redis(
                    "another writer got in during a bulk write; the batches before it are written, run it again".into(),
                ))
            }
            "unrevoke" => {
                return Err(StoreError::Unrevoke {
                    id: text(reply.get(1)),
                })
            }
            other => return Err(StoreError::Redis(format!("write script said {other:?}"))),
        }
    }
    Ok(Written::Ok)
}

/// How long one `XREAD` blocks: also how often an idle follower checks the log's head.
pub const BLOCK: Duration = Duration::from_millis(1000);
/// Entries per `XREAD` and per `HSCAN` step.
const COUNT: &[u8] = b"1000";

/// Follows the Redis log and yields `Update`s, as `file::Follower` does for the file.
#[derive(Debug)]
pub struct Follower {
    client: Arc<Client>,
    names: Names,
    signer: Signer,
    /// The log followed and the stream position (entry ids are `<rev>-1`), once loaded.
    at: Option<(LogId, u64)>,
    /// A position handed in by the caller is checked against Redis' head before it is used.
    check_head: bool,
    /// Records of the last whole read (or checkpoint tail) under a secret version not configured.
    unverifiable: Unverifiable,
}

impl Follower {
    /// A follower with its own client (a blocking read must not hold a connection writers or
    /// the limiter need, and needs a timeout longer than the block). `held`: the log and
    /// revision the caller already has, to resume without a reload when Redis still holds
    /// that log.
    pub fn new(settings: &Settings, signer: Signer, held: Option<(LogId, u64)>) -> Follower {
        let mut s = store_settings(settings.clone());
        s.command_timeout = s.command_timeout.max(BLOCK * 2);
        Follower {
            names: Names::new(&settings.prefix),
            client: Client::new(s, crate::metrics::Metrics::new(0).redis_metrics()),
            signer,
            at: held.filter(|(log, _)| !log.is_none()),
            check_head: true,
            unverifiable: Vec::new(),
        }
    }

    /// What the last whole read (or checkpoint resume) could not verify because its MAC names
    /// a secret version not configured (`Unverifiable`); taken once.
    pub fn take_unverifiable(&mut self) -> Unverifiable {
        std::mem::take(&mut self.unverifiable)
    }

    /// Start from the store's checkpoint (`s:checkpoint`) instead of reading every record:
    /// its table, plus the stream entries after its revision, verified like any append.
    /// `Ok(Ok(None))`: the store has no checkpoint (or none that fits under
    /// `CHECKPOINT_MAX`); the next call to [`Follower::next`] reads the whole table.
    /// `Ok(Err)`: a checkpoint that fails its seal, was cut from a file, names another log, or
    /// a revision this store is not at (ahead of its head, or behind its trimmed stream): not
    /// used, say so loudly. `Err`: Redis did not answer.
    pub async fn resume_from_checkpoint(&mut self) -> Result<Resumed, StoreError> {
        let (c, n) = (&self.client, &self.names);
        let (log, head_rev, base) = head_and_base(c, n).await?;
        if log.is_none() {
            return Ok(Ok(None));
        }
        let started = std::time::Instant::now();
        let Some(bytes) = read_checkpoint(c, n).await? else {
            return Ok(Ok(None));
        };
        let (read, size) = (started.elapsed(), bytes.len());
        let loaded = match checkpoint::decode(&bytes, &self.signer) {
            Ok(l) => l,
            Err(why) => return Ok(Err(why)),
        };
        drop(bytes);
        let decoded = started.elapsed();
        if let Err(why) = fits(&loaded, log, head_rev, base) {
            return Ok(Err(why));
        }
        let mut parsed = Parsed {
            log,
            rev: loaded.seal.rev,
            ..Parsed::default()
        };
        let mut unknown = Vec::new();
        let mut from = format!("({}-1", loaded.seal.rev);
        // Bounded: each step moves past the last id read.
        for _ in 0..10_000_000u64 {
            let page = xrange_page(c, &n.log, &from).await?;
            let Some(last) = page.last().map(|e| e.0) else {
                break;
            };
            for (id, raw) in page {
                // Revisions are dense: a missing one is a change (a revocation, say) this
                // gateway would never see. The whole read has `s:revoked` for that.
                if id != parsed.rev + 1 {
                    return Ok(Err(format!(
                        "the stream after it has a gap (revision {} missing: trimmed or deleted)",
                        parsed.rev + 1
                    )));
                }
                // As in `next`: a record must carry its entry's revision (else a replay).
                if let Some(r) = checked(&self.signer, log, &raw, &mut parsed, &mut unknown) {
                    if r.rev == id {
                        parsed.records.push(r);
                    }
                }
                parsed.rev = parsed.rev.max(id);
            }
            from = format!("({last}-1");
        }
        if parsed.rev < head_rev {
            return Ok(Err(format!(
                "the stream after it stops at revision {}, before the store's head {head_rev}",
                parsed.rev
            )));
        }
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            bytes = size,
            read_ms = ms(read),
            verify_decode_ms = ms(decoded - read),
            stream_after_ms = ms(started.elapsed() - decoded),
            "redis store checkpoint read"
        );
        self.unverifiable = unknown;
        self.at = Some((log, parsed.rev));
        self.check_head = false;
        Ok(Ok(Some((loaded.table, parsed))))
    }

    /// This node's wall clock minus Redis' (`TIME`), in seconds, read at the middle of the
    /// round trip (so off by at most half of it: milliseconds, against a skew that matters
    /// in seconds).
    pub async fn clock_skew(&self) -> Result<f64, StoreError> {
        let sent = crate::clock::unix_ms();
        let v = self.client.call(&[b"TIME"]).await.map_err(err)?;
        let back = crate::clock::unix_ms();
        let (secs, micros) = match &v {
            Value::Array(t) => (
                t.first().and_then(Value::as_int),
                t.get(1).and_then(Value::as_int),
            ),
            Value::Error(e) => return Err(StoreError::Redis(e.clone())),
            _ => (None, None),
        };
        let (Some(secs), Some(micros)) = (secs, micros) else {
            return Err(StoreError::Redis("unexpected reply to TIME".into()));
        };
        let redis_ms = secs * 1000 + micros / 1000;
        Ok(((sent + back) / 2 - redis_ms) as f64 / 1000.0)
    }

    /// The next change: a whole table (first call, or a new log), appended records, or
    /// `Unchanged` after an idle block. Errors leave the position as it was.
    pub async fn next(&mut self) -> Result<Update, StoreError> {
        let Some((log, pos)) = self.at else {
            return self.load(None).await;
        };
        if std::mem::take(&mut self.check_head) {
            let (now_log, now_rev, base) = head_and_base(&self.client, &self.names).await?;
            // Behind the trimmed history: what we missed is gone from the stream.
            if now_log != log || now_rev < pos || pos < base {
                // Another log, or this one behind us: a whole table (apply refuses one that
                // goes backwards within a log).
                return self.load(Some(log)).await;
            }
        }
        let from = format!("{pos}-1");
        let block = BLOCK.as_millis().to_string();
        let v = self
            .client
            .call(&[
                b"XREAD",
                b"COUNT",
                COUNT,
                b"BLOCK",
                block.as_bytes(),
                b"STREAMS",
                self.names.log.as_bytes(),
                from.as_bytes(),
            ])
            .await
            .map_err(err)?;
        let entries = match v {
            // Idle: is the log still the one we follow, and not behind us?
            Value::Nil => {
                let (now_log, now_rev) = head(&self.client, &self.names).await?;
                if now_log != log {
                    return self.load(Some(log)).await;
                }
                if now_rev < pos {
                    return Err(StoreError::Rollback {
                        path: "redis".into(),
                        file_rev: now_rev,
                        applied_rev: pos,
                    });
                }
                return Ok(Update::Unchanged);
            }
            Value::Array(streams) => stream_entries(streams)?,
            Value::Error(e) => return Err(StoreError::Redis(e)),
            _ => return Err(StoreError::Redis("unexpected reply to XREAD".into())),
        };
        let mut parsed = Parsed {
            log,
            ..Parsed::default()
        };
        // Revisions are dense in the stream: a gap after our position means history we had not
        // read was trimmed away, so read the whole table again.
        if entries.first().is_some_and(|(id, _)| *id > pos + 1) {
            let (_, _, base) = head_and_base(&self.client, &self.names).await?;
            if pos < base {
                return self.load(Some(log)).await;
            }
        }
        let mut next = pos;
        for (id, raw) in entries {
            next = next.max(id);
            // A record must carry its entry's revision: an old record under a new entry id
            // is a replay, and is passed over (once: the position moves past it).
            if let Some(r) = verified(&self.signer, log, &raw, &mut parsed) {
                if r.rev == id {
                    parsed.records.push(r);
                }
            }
        }
        parsed.rev = next;
        self.at = Some((log, next));
        Ok(Update::Appended(parsed))
    }

    /// A whole table consistent at the head revision. `was`: the log followed before, if any
    /// (an empty Redis after a real log is refused, not loaded as an empty table).
    async fn load(&mut self, was: Option<LogId>) -> Result<Update, StoreError> {
        let (log, rev) = head(&self.client, &self.names).await?;
        if log.is_none() && was.is_some() {
            return Err(StoreError::Redis(
                "the store is gone from Redis (wiped, or a new server without its data); keeping the last table".into(),
            ));
        }
        let mut parsed = Parsed {
            log,
            rev,
            ..Parsed::default()
        };
        let mut unknown = Vec::new();
        parsed.records = snapshot(
            &self.client,
            &self.names,
            &self.signer,
            (log, rev),
            &mut parsed,
            &mut unknown,
        )
        .await?;
        self.unverifiable = unknown;
        self.at = Some((log, rev));
        Ok(Update::Replaced(parsed))
    }

    /// [`Follower::scan`] for a writer (corrupt entries are skipped silently: the writer
    /// re-signs what it keeps).
    pub async fn scan_with(
        c: &Client,
        key: &str,
        signer: &Signer,
        log: LogId,
        rev: u64,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        scan(
            c,
            key,
            signer,
            (log, rev),
            &mut Parsed::default(),
            &mut Vec::new(),
        )
        .await
    }
}

/// The table at `at` (log, revision), read record by record: every latest version at or below
/// the revision (`s:keys`, HSCAN in small steps: versions newer than it are dropped, the
/// stream after it brings them), merged with every revocation (`s:revoked`: a version without
/// its recorded revocation stays revoked). In revision order.
async fn snapshot(
    c: &Client,
    n: &Names,
    signer: &Signer,
    at: (LogId, u64),
    parsed: &mut Parsed,
    unknown: &mut Unverifiable,
) -> Result<Vec<KeyRecord>, StoreError> {
    let latest = scan(c, &n.keys, signer, at, parsed, unknown).await?;
    let revoked = scan(c, &n.revoked, signer, at, parsed, unknown).await?;
    let mut by_id: std::collections::HashMap<String, KeyRecord> =
        latest.into_iter().map(|r| (r.id.clone(), r)).collect();
    for r in revoked {
        if by_id.get(&r.id).is_none_or(|cur| unrevokes(Some(&r), cur)) {
            by_id.insert(r.id.clone(), r);
        }
    }
    let mut records: Vec<KeyRecord> = by_id.into_values().collect();
    records.sort_by_key(|r| r.rev);
    Ok(records)
}

/// Whether a verified checkpoint can stand in for the store at (`log`, `head`) whose stream
/// holds the history after `base`; why not, if not. A sealed checkpoint can still be the
/// wrong one: cut from a store file, from a log the store replaced, or for a revision the
/// store does not have (it went back), and one whose following records were trimmed away.
fn fits(loaded: &checkpoint::Loaded, log: LogId, head: u64, base: u64) -> Result<(), String> {
    let seal = loaded.seal;
    if !loaded.stands_for_a_revision() {
        Err("it was cut from a store file, not written for the Redis store".into())
    } else if seal.log != log {
        Err(format!(
            "it stands for log {}, the store holds log {log} (stale: the store became a new log since)",
            seal.log
        ))
    } else if seal.rev > head {
        Err(format!(
            "it stands for revision {}, ahead of the store's head {head} (the store went back?)",
            seal.rev
        ))
    } else if seal.rev < base {
        Err(format!(
            "it stands for revision {}, but the stream after it was trimmed (history from {base} on)",
            seal.rev
        ))
    } else {
        Ok(())
    }
}

/// Every verified record of the hash `key` at or below the revision of `at` (HSCAN in small
/// steps).
async fn scan(
    c: &Client,
    key: &str,
    signer: &Signer,
    (log, rev): (LogId, u64),
    parsed: &mut Parsed,
    unknown: &mut Unverifiable,
) -> Result<Vec<KeyRecord>, StoreError> {
    let mut out = Vec::new();
    hscan_values(c, key, |raw| {
        if let Some(r) = checked(signer, log, &raw, parsed, unknown) {
            if r.rev <= rev {
                out.push(r);
            }
        }
    })
    .await?;
    Ok(out)
}

/// One page (`COUNT` entries) of the stream from `from` (an `XRANGE` start: `-` or an
/// exclusive `(<rev>-1`): (revision, record JSON) each.
async fn xrange_page(c: &Client, log: &str, from: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let v = c
        .call(&[
            b"XRANGE",
            log.as_bytes(),
            from.as_bytes(),
            b"+",
            b"COUNT",
            COUNT,
        ])
        .await
        .map_err(err)?;
    let Value::Array(entries) = v else {
        return Err(StoreError::Redis("unexpected reply to XRANGE".into()));
    };
    stream_entries(vec![Value::Array(vec![Value::Nil, Value::Array(entries)])])
}

/// The checkpoint's bytes, read in chunks (`GETRANGE`) of one generation: the generation
/// (meta `ckpt_gen`) changes in the same script as the bytes and only goes up, so the same
/// generation read before and after every chunk means no chunk is from another checkpoint
/// (one replaced mid-read is read again, bounded). Read-only commands, no script: a gateway's
/// Redis user needs no more than it reads the store with. `None`: there is none, or it is
/// larger than `CHECKPOINT_MAX` (said in the log: the table is then read record by record).
async fn read_checkpoint(c: &Client, n: &Names) -> Result<Option<Vec<u8>>, StoreError> {
    let generation = || async {
        let v = c
            .call(&[b"HGET", n.meta.as_bytes(), b"ckpt_gen"])
            .await
            .map_err(err)?;
        Ok::<_, StoreError>(text(Some(&v)))
    };
    let bad = |what: &str| StoreError::Redis(format!("unexpected reply to {what}"));
    for _ in 0..3 {
        let before = generation().await?;
        let len = c
            .call(&[b"STRLEN", n.checkpoint.as_bytes()])
            .await
            .map_err(err)?
            .as_int()
            .ok_or_else(|| bad("STRLEN"))?;
        let len = usize::try_from(len).unwrap_or(0);
        if len == 0 {
            return Ok(None);
        }
        if len > CHECKPOINT_MAX {
            tracing::warn!(bytes = len, max = CHECKPOINT_MAX, "redis store checkpoint larger than a gateway reads; reading the keys record by record");
            return Ok(None);
        }
        let mut out = Vec::with_capacity(len);
        let mut same = true;
        while same && out.len() < len {
            let (a, b) = (
                out.len().to_string(),
                (out.len() + CHECKPOINT_CHUNK - 1).to_string(),
            );
            let chunk = c
                .call(&[
                    b"GETRANGE",
                    n.checkpoint.as_bytes(),
                    a.as_bytes(),
                    b.as_bytes(),
                ])
                .await
                .map_err(err)?;
            let Value::Bulk(chunk) = chunk else {
                return Err(bad("GETRANGE"));
            };
            same = !chunk.is_empty() && generation().await? == before;
            out.extend(chunk);
        }
        if same && out.len() == len {
            return Ok(Some(out));
        }
    }
    tracing::warn!(
        "redis store checkpoint kept changing while read; reading the keys record by record"
    );
    Ok(None)
}

/// Write `bytes` as the checkpoint for (`log`, `rev`): in chunks to a key of its own (which
/// expires if this writer dies), then renamed into place by one script with the revision it
/// stands for. Returns the script's refusal, if any (`other_log`, `ahead`, `older`, `torn`).
async fn put_checkpoint(
    c: &Client,
    n: &Names,
    log: LogId,
    rev: u64,
    bytes: &[u8],
) -> Result<Option<String>, StoreError> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| StoreError::Redis(e.to_string()))?;
    // A key name from our own random bytes only (THREATS L6: nothing a client sent).
    let tmp = format!("{}:new:{:016x}", n.checkpoint, u64::from_le_bytes(nonce));
    for (i, part) in bytes.chunks(CHECKPOINT_CHUNK).enumerate() {
        let reply = if i == 0 {
            c.call(&[b"SET", tmp.as_bytes(), part, b"EX", CHECKPOINT_TMP_TTL_SECS])
                .await
        } else {
            c.call(&[b"APPEND", tmp.as_bytes(), part]).await
        }
        .map_err(err)?;
        if let Value::Error(e) = reply {
            let _ = c.call(&[b"DEL", tmp.as_bytes()]).await;
            return Err(StoreError::Redis(e));
        }
    }
    let (log_s, rev_s, len_s) = (log.to_string(), rev.to_string(), bytes.len().to_string());
    let v = c
        .eval(
            &CHECKPOINT_PUT,
            &[n.meta.as_bytes(), n.checkpoint.as_bytes(), tmp.as_bytes()],
            &[log_s.as_bytes(), rev_s.as_bytes(), len_s.as_bytes()],
        )
        .await
        .map_err(err)?;
    let Value::Array(reply) = v else {
        return Err(StoreError::Redis(
            "unexpected reply to the checkpoint script".into(),
        ));
    };
    Ok(match text(reply.first()).as_str() {
        "ok" => None,
        other => Some(other.to_owned()),
    })
}

/// Each value of the hash `key`, read with `HSCAN` in small steps (one `HVALS` reply times
/// out on a large store).
async fn hscan_values(
    c: &Client,
    key: &str,
    mut each: impl FnMut(Vec<u8>),
) -> Result<(), StoreError> {
    let mut cursor = b"0".to_vec();
    // Bounded: HSCAN returns cursor 0 after one full pass; cap the steps anyway.
    for _ in 0..10_000_000u64 {
        let v = c
            .call(&[b"HSCAN", key.as_bytes(), &cursor, b"COUNT", COUNT])
            .await
            .map_err(err)?;
        let Value::Array(mut parts) = v else {
            return Err(StoreError::Redis("unexpected reply to HSCAN".into()));
        };
        let (Some(Value::Array(pairs)), Some(Value::Bulk(next))) = (parts.pop(), parts.pop())
        else {
            return Err(StoreError::Redis("unexpected reply to HSCAN".into()));
        };
        for (i, item) in pairs.into_iter().enumerate() {
            if let (1, Value::Bulk(raw)) = (i % 2, item) {
                each(raw);
            }
        }
        if next == b"0" {
            break;
        }
        cursor = next;
    }
    Ok(())
}

/// (revision from the entry id, record JSON) of each entry of an `XREAD` reply.
fn stream_entries(streams: Vec<Value>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let bad = || StoreError::Redis("unexpected reply to XREAD".into());
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(parts) = s else {
            return Err(bad());
        };
        let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
            return Err(bad());
        };
        for e in entries {
            let Value::Array(mut id_fields) = e else {
                return Err(bad());
            };
            let Some(Value::Array(fields)) = id_fields.pop() else {
                return Err(bad());
            };
            let rev = id_fields
                .pop()
                .and_then(|v| v.as_text())
                .and_then(|id| id.split_once('-').and_then(|(r, _)| r.parse::<u64>().ok()))
                .ok_or_else(bad)?;
            // fields = ["r", json]
            if let Some(Value::Bulk(json)) = fields.into_iter().nth(1) {
                out.push((rev, json));
            }
        }
    }
    Ok(out)
}
