#!/usr/bin/env bash
# Fuzz the control plane's REST API against docs/openapi.yaml with schemathesis.
#
# What it does: a throwaway venv with a pinned schemathesis, the keygate binary (built if
# missing), a temporary config and store, a write admin token, one key (so GET paths have
# data), `keygate control` on 127.0.0.1 port 0 (the port is read from its `listening` line),
# then `st run` against the spec the server itself serves at /v1/openapi.yaml. Exits non-zero
# on any failure; the control plane and the temp dir are cleaned up on every exit.
#
# The requests are generated from the spec narrowed to this script's config (envs, plans,
# owners, quotas, and the ids of the two runs below that need one: ci/schemathesis_hooks.py),
# and the runs' HAR reports must show every gated operation answered with its success status
# (ci/schemathesis_reached.py).
#
# The runs, in order (each explained where it is made): abortRotation alone, on a rotation
# made for it; POST /v1/tokens with the seed API key; the main run, every other operation a
# write token may call; redigestKey with a redigest token, on the seed key; massRevoke alone.
#
# Not fuzzed (they are in the spec):
# - GET /v1/feed: a 200 is an endless ndjson stream (it never completes a response), and it
#   needs a feed-role token; tests/fleet.rs covers it end to end.
# - POST /v1/usage: feed-role only, so with this script's write token every case would be
#   the same 403; the gateways' usage reports exercise it.
# - POST /v1/events: feed-role only for the same reason; tests/webhooks.rs relays through it
#   end to end (a feed gateway's canary event delivered by the control plane).
# - DELETE /v1/admin-tokens/{id} (revokeAdminToken): the stateful phase takes ids from
#   GET /v1/admin-tokens and revokes this script's own token, after which every operation is
#   a 401 and nothing else gets fuzzed; tests/control.rs covers it end to end.
#
# Env: SCHEMATHESIS_VERSION (default pinned below), MAX_EXAMPLES (default 30),
# CARGO_TARGET_DIR (honoured), KEYGATE_BIN (use this binary instead of building),
# STORE=redis (the control plane on the Redis store: a private redis-server on a free port in
# the temp dir, started and stopped here; needs `redis-server`, a failure without it).
set -euo pipefail

SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${MAX_EXAMPLES:-30}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WORK="$(mktemp -d -t keygate-st.XXXXXX)"
CP_PID=""
REDIS_PID=""
cleanup() {
  for pid in "$CP_PID" "$REDIS_PID"; do
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# --- schemathesis in its own venv -------------------------------------------------------
echo "schemathesis: installing ${SCHEMATHESIS_VERSION} into a temporary venv" >&2
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check "schemathesis==${SCHEMATHESIS_VERSION}"
ST="$WORK/venv/bin/st"

# --- the binary ------------------------------------------------------------------------
if [[ -n "${KEYGATE_BIN:-}" ]]; then
  BIN="$KEYGATE_BIN"
else
  TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
  BIN="$TARGET/debug/keygate"
  # cargo is a no-op when the binary is up to date (the spec is include_str!'d, so an edited
  # spec rebuilds it).
  (cd "$ROOT" && cargo build --quiet --bin keygate)
fi
[[ -x "$BIN" ]] || { echo "no keygate binary at $BIN" >&2; exit 1; }

# --- config, secret, token, one key ------------------------------------------------------
cat > "$WORK/keygate.toml" <<'TOML'
[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"

[policy]
max_ttl = "365d"
require_owner = true

[plans.default]
rate = "100/s"

[control]
listen = "127.0.0.1:0"
tokens = "admin-tokens.jsonl"
TOML
export API_KEY_HASH_SECRET="schemathesis-only-secret-0123456789abcdefghijklmnop"
CFG="$WORK/keygate.toml"

if [[ "${STORE:-file}" == redis ]]; then
  command -v redis-server >/dev/null || { echo "STORE=redis needs redis-server (apt-get install -y redis-server)" >&2; exit 1; }
  PORT="$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
  redis-server --port "$PORT" --bind 127.0.0.1 --dir "$WORK" --save '' --appendonly no \
    --daemonize no >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-cli -p "$PORT" ping >/dev/null || { echo "redis-server did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }
  sed -i 's/^\[keys\]$/[keys]\nsource = "redis"/' "$CFG"
  printf '\n[redis]\nurl = "redis://127.0.0.1:%s/0"\n' "$PORT" >>"$CFG"
  echo "schemathesis: control plane on the Redis store (port $PORT)" >&2
fi

TOKEN="$("$BIN" --config "$CFG" admin-token create --role write --name schemathesis 2>/dev/null)"
[[ "$TOKEN" == kgadm_* ]] || { echo "could not mint an admin token" >&2; exit 1; }
# Signing keys, so /v1/jwks answers 200 (POST /v1/tokens needs an API key: 401 here).
"$BIN" --config "$CFG" tokens keygen >/dev/null 2>&1
API_KEY="$("$BIN" --config "$CFG" keys create --name seed --owner fuzz --scope invoices:read \
  --expires-in 30d --label team=fuzz 2>/dev/null)"
RTOKEN="$("$BIN" --config "$CFG" admin-token create --role redigest --name schemathesis 2>/dev/null)"
[[ "$RTOKEN" == kgadm_* ]] || { echo "could not mint a redigest token" >&2; exit 1; }

# --- the control plane ------------------------------------------------------------------
mkfifo "$WORK/stdout"
"$BIN" --config "$CFG" control >"$WORK/stdout" 2>"$WORK/control.stderr.log" &
CP_PID=$!
exec 3<"$WORK/stdout"
ADDR=""
# Bounded: the listening line comes first; give up after 30 s.
if IFS= read -r -t 30 line <&3; then
  ADDR="$(printf '%s' "$line" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["control"] if v.get("event")=="listening" else "")')"
fi
if [[ -z "$ADDR" ]]; then
  echo "control plane did not report listening; stderr:" >&2
  cat "$WORK/control.stderr.log" >&2
  exit 1
fi
# Keep draining its stdout so it never blocks on a full pipe.
cat <&3 >/dev/null &
URL="http://$ADDR"
echo "control plane at $URL (pid $CP_PID)" >&2

# --- the runs ---------------------------------------------------------------------------
status=0
# Run from the temp dir: schemathesis keeps a cache directory (.schemathesis/) in the cwd.
cd "$WORK"
# The config's facts for ci/schemathesis_hooks.py (keep in step with keygate.toml above).
export SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH="$ROOT/ci"
export ST_ENVS=live,test ST_PLANS=default ST_REQUIRE_OWNER=1
if [[ "${STORE:-file}" == redis ]]; then export ST_QUOTAS=1; else export ST_QUOTAS=0; fi
REPORTS="$WORK/reports"

# One run of schemathesis; "$@" selects the operations and the credential.
# One worker: with two, hypothesis parses lambda sources from two threads at once, and
# CPython 3.11 can then fail `ast.parse` with a spurious "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905 and the reports around it: rare, in
# threaded programs; seen once in CI here, on 3.11.7). A crash of the tool is not a finding
# about the API, and one worker costs a few seconds.
fuzz() {
  "$ST" run "$URL/v1/openapi.yaml" \
    --url "$URL" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --workers 1 \
    --seed 42 \
    --request-timeout 10 \
    --no-color \
    --report har --report-dir "$REPORTS" \
    "$@" || status=$?
}
# The runs of one operation leave out the stateful phase: it chains operations along the
# spec's links, and with one operation selected there are none to follow (an error).
ALONE=(--phases examples,coverage,fuzzing)

# Ids the generator cannot guess: a rotation in progress (its successor) for abortRotation,
# and the seed key for redigestKey. Made through the API, as a client would.
read -r ABORT_ID SEED_ID < <("$WORK/venv/bin/python" - "$URL" "$TOKEN" <<'PY'
import json, sys, urllib.request
url, token = sys.argv[1], sys.argv[2]
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)
seed = call("GET", "/v1/api-keys?owner=fuzz")["items"][0]["id"]
old = call("POST", "/v1/api-keys", {"name": "rotated", "owner": "fuzz-rotation", "expires_in": "30d"})["id"]
print(call("POST", f"/v1/api-keys/{old}/rotate", {"grace": "1h"})["id"], seed)
PY
)
[[ "$ABORT_ID" == key_* && "$SEED_ID" == key_* ]] || { echo "could not set up the rotation and seed ids" >&2; exit 1; }

# The abort first, on its own rotation: every case names the successor, so the first valid
# one rolls it back (200) and the rest meet a rotation no longer in progress (400).
ST_PATH_ID="$ABORT_ID" fuzz --header "Authorization: Bearer $TOKEN" \
  --include-operation-id abortRotation "${ALONE[@]}"

# POST /v1/tokens is authenticated by an API key, not an admin token: fuzzed with the seed
# key before the main run can revoke it.
fuzz --header "Authorization: Bearer $API_KEY" --include-path /v1/tokens "${ALONE[@]}"

# The main run: every other operation a write token may call. /v1/tokens is left out: an
# admin token there is a refused API key, and twenty refusals spend the client's failed-auth
# budget (the exchange's run after it was once answered 429 in every case).
fuzz --header "Authorization: Bearer $TOKEN" \
  --exclude-path /v1/feed \
  --exclude-path /v1/usage \
  --exclude-path /v1/events \
  --exclude-path /v1/tokens \
  --exclude-operation-id revokeAdminToken \
  --exclude-operation-id redigestKey \
  --exclude-operation-id massRevoke

# Re-digests with the redigest token, on the seed key (random ids are all 404): the cases
# reach the proof check, which only a gateway can pass.
ST_PATH_ID="$SEED_ID" fuzz --header "Authorization: Bearer $RTOKEN" \
  --include-operation-id redigestKey "${ALONE[@]}"

# Mass revocation last, on its own: in the main run a mass revoke once named the createKey
# example's owner and revoked the 60 keys made with it, and most rotations after it were
# refused as revoked. Here its example revokes those keys once the other runs are done.
fuzz --header "Authorization: Bearer $TOKEN" --include-operation-id massRevoke "${ALONE[@]}"

# Passing every check is not enough: each operation must also have reached its success status
# (a run answered only 400/401/404/429 tests nothing behind the validation).
"$WORK/venv/bin/python" "$ROOT/ci/schemathesis_reached.py" "$ROOT/docs/openapi.yaml" "$REPORTS"/*.json || status=$?

if ! kill -0 "$CP_PID" 2>/dev/null; then
  echo "the control plane died during the run; stderr:" >&2
  cat "$WORK/control.stderr.log" >&2
  status=1
fi
if grep -q "panicked" "$WORK/control.stderr.log"; then
  echo "the control plane panicked during the run:" >&2
  grep -A3 "panicked" "$WORK/control.stderr.log" >&2
  status=1
fi
exit "$status"
