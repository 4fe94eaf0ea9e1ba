#!/usr/bin/env bash
# Revocation propagation benchmark.
#
#   bash benches/propagation.sh        (REVOCATIONS=60 KEYS=10000 to change)
#
# Starts the upstream and the gateway on loopback (as benches/load.sh does, with KEYS keys in
# the store), puts a moderate background load on the gateway (wrk, 4 connections each pausing
# 10 ms between requests: ~400 req/s on another key), then examples/propagation.rs revokes
# REVOCATIONS keys one after another with `keygate keys revoke` and, from the moment each
# command returns, probes that key back to back on its already open keep-alive connection until
# the first 401. Reports p50/p99 of that time, and the gateway's own
# keygate_propagation_seconds histogram (record written -> applied on the node).
# Pinning: gateway on core 0; upstream, wrk, the prober and the CLI on core 1.
# Everything started here is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/bench-target}"
REVOCATIONS="${REVOCATIONS:-60}"
KEYS="${KEYS:-10000}"
unset API_KEY_DEFAULT_RATE_LIMIT API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS ALLOWED_ORIGINS

if ! command -v wrk >/dev/null; then
  apt-get install -y wrk >/dev/null || { apt-get update -qq && apt-get install -y wrk >/dev/null; }
fi

echo "== building (release)" >&2
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -j2 --bin keygate --example upstream --example propagation >&2
BIN="$CARGO_TARGET_DIR/release"
KG="$BIN/keygate"

WORK="$(mktemp -d /tmp/keygate-prop.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_for_line() {
  for _ in $(seq 1 $(( $2 * 20 ))); do
    [ -s "$1" ] && return 0
    sleep 0.05
  done
  echo "timed out waiting for $1" >&2
  return 1
}

taskset -c 1 "$BIN/examples/upstream" >"$WORK/upstream.addr" &
PIDS+=("$!")
wait_for_line "$WORK/upstream.addr" 10
UP_ADDR="$(head -1 "$WORK/upstream.addr")"

export API_KEY_HASH_SECRET="$(head -c 48 /dev/urandom | base64 | tr -d '\n')"
cat >"$WORK/keygate.toml" <<EOF
[keys]
store = "keys.jsonl"
hash_secret_env = "API_KEY_HASH_SECRET"
prefix = "kg"
envs = ["live", "test"]
audit_log = "audit.jsonl"
usage_file = "usage.json"
touch_interval_seconds = 5
poll_interval_ms = 250

[plans.default]
rate = "1000000/s"
burst = 1000000

[server]
listen = "127.0.0.1:0"
max_connections_per_ip = 4096

[admin]
listen = "127.0.0.1:0"

[limits]
auth_failures_per_minute = 1000000

[metrics]
per_key_series = 100

[[upstreams]]
name = "up"
targets = ["$UP_ADDR"]

[[routes]]
name = "bench"
path_prefix = "/invoices"
methods = ["GET"]
scopes = ["invoices:read"]
upstream = "up"
EOF
CFG="$WORK/keygate.toml"

echo "== creating $REVOCATIONS keys to revoke + 1 load key, importing $((KEYS - REVOCATIONS - 1))" >&2
LOAD_KEY="$("$KG" --config "$CFG" keys create --name load --owner bench --scope invoices:read 2>/dev/null)"
: >"$WORK/victims.txt"
for i in $(seq 1 "$REVOCATIONS"); do
  json="$("$KG" --config "$CFG" keys create --name "victim-$i" --owner bench --scope invoices:read --json 2>/dev/null)"
  id="$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$json")"
  key="$(sed -n 's/.*"key":"\([^"]*\)".*/\1/p' <<<"$json")"
  echo "$id $key" >>"$WORK/victims.txt"
done
head -c $(( (KEYS - REVOCATIONS - 1) * 24 )) /dev/urandom | od -An -v -tx1 | tr -d ' \n' | fold -w 48 \
  | sed 's/^/sk_bench_/' >"$WORK/imported.txt"
"$KG" --config "$CFG" keys import --file "$WORK/imported.txt" --owner bench --scope invoices:read >&2

KEYGATE_LOG=warn taskset -c 0 "$KG" --config "$CFG" serve >"$WORK/gw.out" 2>"$WORK/gw.err" &
PIDS+=("$!")
wait_for_line "$WORK/gw.out" 20
GW_ADDR="$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$WORK/gw.out")"
ADMIN_ADDR="$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' "$WORK/gw.out")"
for _ in $(seq 1 200); do
  code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $LOAD_KEY" "http://$GW_ADDR/invoices/1" || true)"
  [ "$code" = 200 ] && break
  sleep 0.05
done
[ "$code" = 200 ] || { echo "gateway not answering 200 (got $code)"; cat "$WORK/gw.err"; exit 1; }

cat >"$WORK/slow.lua" <<'EOF'
function delay() return 10 end
EOF
taskset -c 1 wrk -t1 -c4 -d600s -s "$WORK/slow.lua" -H "Authorization: Bearer $LOAD_KEY" \
  "http://$GW_ADDR/invoices/1" >"$WORK/wrk.out" 2>&1 &
PIDS+=("$!")
sleep 1

echo "== revoking $REVOCATIONS keys under background load" >&2
taskset -c 1 "$BIN/examples/propagation" "$GW_ADDR" "$KG" "$CFG" "$WORK/victims.txt" /invoices/1 | tee "$WORK/result.txt"

curl -s "http://$ADMIN_ADDR/metrics" >"$WORK/metrics.txt"
awk '
  /^keygate_propagation_seconds_bucket/ { match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); b[++n] = le; c[n] = $NF }
  /^keygate_propagation_seconds_sum/ { sum = $NF }
  /^keygate_propagation_seconds_count/ { cnt = $NF }
  END {
    if (cnt == 0) { print "gateway keygate_propagation_seconds: no observations"; exit }
    printf "gateway keygate_propagation_seconds (record written -> applied): count %d, mean %.2f ms\n", cnt, sum / cnt * 1000
    for (i = 1; i <= n; i++) if (c[i] >= cnt * 0.5) { printf "  p50 <= %s s", b[i]; break }
    for (i = 1; i <= n; i++) if (c[i] >= cnt * 0.99) { printf ", p99 <= %s s (bucket bounds)\n", b[i]; break }
  }' "$WORK/metrics.txt"
bg="$(awk '/^keygate_requests_total/ && /outcome="ok"/ {s += $NF} END {print s + 0}' "$WORK/metrics.txt")"
echo "background + probe requests answered ok during the run: $bg"
