#!/usr/bin/env bash
# Load benchmark: keygate vs. going straight to the upstream, in one run.
#
#   bash benches/load.sh            (DURATION=10 RATE=… CONNS=32 KEYS=10000 to change)
#
# Builds release (pgo/build.sh: with the committed profile), starts a one-thread upstream
# (examples/upstream.rs) and the gateway on loopback with auth, the default plan (1000000/s,
# never refuses), per-key metrics (capped at 100 series) and usage tracking on, creates one
# real key (`keys create`) and imports KEYS-1 generated legacy-format keys (`keys import`),
# then measures with wrk:
#   1. closed-loop throughput (wrk -t1 -cCONNS) direct and through the gateway, for one key and
#      for KEYS keys rotating (a Lua script; the direct baseline uses the same script), with
#      CPU time per request of the gateway and the upstream (utime+stime from /proc/PID/stat);
#   2. latency at a fixed rate (RATE req/s over 8 connections, open loop; examples/fixedrate.rs
#      because wrk2 is not packaged here): p50/p99/p99.9 direct and through the gateway;
#   3. unloaded latency: wrk -t1 -c1, p50 direct vs. gateway.
# Pinning: gateway on core 0 (all its runtime threads), upstream and the load generator
# together on core 1. The load generator therefore competes with the upstream, not with the
# gateway: gateway figures are what one core of gateway delivers.
# Everything started here is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/bench-target}"
DURATION="${DURATION:-10}"
RATE="${RATE:-}"         # default: half the lower closed-loop gateway throughput, at most 5000
CONNS="${CONNS:-32}"
KEYS="${KEYS:-10000}"
GW_CORE=0
UP_CORE=1
LOAD_CORE=1
unset API_KEY_DEFAULT_RATE_LIMIT API_KEY_LAST_USED_TOUCH_INTERVAL_SECONDS ALLOWED_ORIGINS

if ! command -v wrk >/dev/null; then
  apt-get install -y wrk >/dev/null || { apt-get update -qq && apt-get install -y wrk >/dev/null; }
fi

echo "== building (release)" >&2
[ -n "${SKIP_BUILD:-}" ] || bash pgo/build.sh -j2 --example upstream --example fixedrate >&2
BIN="$CARGO_TARGET_DIR/release"
KG="$BIN/keygate"

WORK="$(mktemp -d /tmp/keygate-load.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_for_line() { # file, seconds
  for _ in $(seq 1 $(( $2 * 20 ))); do
    [ -s "$1" ] && return 0
    sleep 0.05
  done
  echo "timed out waiting for $1" >&2
  return 1
}

# --- upstream
taskset -c "$UP_CORE" "$BIN/examples/upstream" >"$WORK/upstream.addr" &
UP_PID=$!
PIDS+=("$UP_PID")
wait_for_line "$WORK/upstream.addr" 10
UP_ADDR="$(head -1 "$WORK/upstream.addr")"

# --- config, secret, keys
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
max_in_flight = 100000

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
REAL_KEY="$("$KG" --config "$CFG" keys create --name bench-real --owner bench --scope invoices:read 2>/dev/null)"
head -c $(( (KEYS - 1) * 24 )) /dev/urandom | od -An -v -tx1 | tr -d ' \n' | fold -w 48 \
  | sed 's/^/sk_bench_/' >"$WORK/imported.txt"
"$KG" --config "$CFG" keys import --file "$WORK/imported.txt" --owner bench --scope invoices:read >&2
{ echo "$REAL_KEY"; cat "$WORK/imported.txt"; } >"$WORK/all-keys.txt"
echo "keys: 1 created + $(wc -l <"$WORK/imported.txt") imported" >&2

# --- gateway
KEYGATE_LOG=warn taskset -c "$GW_CORE" "$KG" --config "$CFG" serve >"$WORK/gw.out" 2>"$WORK/gw.err" &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for_line "$WORK/gw.out" 20
GW_ADDR="$(sed -n 's/.*"http":"\([^"]*\)".*/\1/p' "$WORK/gw.out")"
ADMIN_ADDR="$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' "$WORK/gw.out")"
for _ in $(seq 1 200); do
  code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $REAL_KEY" "http://$GW_ADDR/invoices/1" || true)"
  [ "$code" = 200 ] && break
  sleep 0.05
done
[ "$code" = 200 ] || { echo "gateway not answering 200 (got $code)"; cat "$WORK/gw.err"; exit 1; }
code="$(curl -s -o /dev/null -w '%{http_code}' -H "x-api-key: $(sed -n 2p "$WORK/imported.txt")" "http://$GW_ADDR/invoices/1")"
[ "$code" = 200 ] || { echo "imported key refused ($code)"; exit 1; }
echo "affinity: gateway $(awk '/Cpus_allowed_list/ {print $2}' /proc/$GW_PID/status), upstream $(awk '/Cpus_allowed_list/ {print $2}' /proc/$UP_PID/status)" >&2

cat >"$WORK/rotate.lua" <<'EOF'
local keys = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do keys[#keys + 1] = line end
end
request = function()
  i = i + 1
  if i > #keys then i = 1 end
  return wrk.format("GET", "/invoices/1", { ["Authorization"] = "Bearer " .. keys[i] })
end
EOF

# --- helpers
TCK="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
to_us() { # "123.45us" | "1.20ms" | "1.00s" -> microseconds
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.1f", v }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.1f", v * 1000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.1f", v * 1000000 }
    else printf "nan" }'
}
# run_wrk NAME URL CONNS [wrk options...] [-- script args...]: sets R_RPS R_REQ R_P50 R_P99 R_GW_CPU R_UP_CPU (us/req)
run_wrk() {
  local name="$1" url="$2" c="$3"; shift 3
  local opts=() post=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; post=(-- "$@"); break; fi
    opts+=("$1"); shift
  done
  local g0 u0 g1 u1
  g0="$(ticks "$GW_PID")"; u0="$(ticks "$UP_PID")"
  # wrk hands the arguments after the URL to the Lua script's init(args) (args[1] onwards).
  taskset -c "$LOAD_CORE" wrk -t1 -c"$c" -d"${DURATION}s" --latency "${opts[@]}" "$url" "${post[@]}" >"$WORK/$name.wrk"
  g1="$(ticks "$GW_PID")"; u1="$(ticks "$UP_PID")"
  R_RPS="$(awk '/^Requests\/sec/ {print $2}' "$WORK/$name.wrk")"
  R_REQ="$(awk '/requests in/ {print $1}' "$WORK/$name.wrk")"
  R_P50="$(to_us "$(awk '$1 == "50%" {print $2}' "$WORK/$name.wrk")")"
  R_P99="$(to_us "$(awk '$1 == "99%" {print $2}' "$WORK/$name.wrk")")"
  R_GW_CPU="$(awk -v a="$g0" -v b="$g1" -v t="$TCK" -v n="$R_REQ" 'BEGIN {printf "%.2f", (b - a) / t / n * 1e6}')"
  R_UP_CPU="$(awk -v a="$u0" -v b="$u1" -v t="$TCK" -v n="$R_REQ" 'BEGIN {printf "%.2f", (b - a) / t / n * 1e6}')"
  local errs
  errs="$(awk '/Non-2xx/ {print $NF}' "$WORK/$name.wrk")"
  [ -z "$errs" ] || echo "WARNING: $name: $errs non-2xx responses" >&2
  printf '%-22s %10s req/s  p50 %8s us  p99 %8s us  gateway %6s us/req  upstream %6s us/req\n' \
    "$name" "$R_RPS" "$R_P50" "$R_P99" "$R_GW_CPU" "$R_UP_CPU" >&2
}
# run_fixed NAME ADDR [KEYS_FILE]: sets F_P50 F_P99 F_P999
run_fixed() {
  local name="$1" addr="$2"; shift 2
  taskset -c "$LOAD_CORE" "$BIN/examples/fixedrate" "$addr" /invoices/1 "$RATE" "$DURATION" 8 "$@" >"$WORK/$name.fixed"
  local line; line="$(grep '^RESULT' "$WORK/$name.fixed")"
  F_P50="$(sed 's/.*p50_us=\([0-9]*\).*/\1/' <<<"$line")"
  F_P99="$(sed 's/.*p99_us=\([0-9]*\).*/\1/' <<<"$line")"
  F_P999="$(sed 's/.*p999_us=\([0-9]*\).*/\1/' <<<"$line")"
  local sent ok; sent="$(sed 's/.*sent=\([0-9]*\).*/\1/' <<<"$line")"; ok="$(sed 's/.*ok=\([0-9]*\).*/\1/' <<<"$line")"
  [ "$sent" = "$ok" ] || echo "WARNING: $name: $((sent - ok)) non-200 of $sent" >&2
  printf '%-22s fixed %s req/s  p50 %6s us  p99 %6s us  p99.9 %6s us\n' "$name" "$RATE" "$F_P50" "$F_P99" "$F_P999" >&2
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
diff_us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }

DIRECT="http://$UP_ADDR/invoices/1"
GATEWAY="http://$GW_ADDR/invoices/1"
AUTH=(-H "Authorization: Bearer $REAL_KEY")

echo "== warm-up" >&2
taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d2s -s "$WORK/rotate.lua" "$GATEWAY" -- "$WORK/all-keys.txt" >/dev/null

echo "== closed loop, $CONNS connections, ${DURATION}s each" >&2
run_wrk direct_1key "$DIRECT" "$CONNS" "${AUTH[@]}"
D1_RPS=$R_RPS; D1_UP=$R_UP_CPU
run_wrk gateway_1key "$GATEWAY" "$CONNS" "${AUTH[@]}"
G1_RPS=$R_RPS; G1_GW=$R_GW_CPU; G1_UP=$R_UP_CPU
run_wrk direct_10k "$DIRECT" "$CONNS" -s "$WORK/rotate.lua" -- "$WORK/all-keys.txt"
D2_RPS=$R_RPS
run_wrk gateway_10k "$GATEWAY" "$CONNS" -s "$WORK/rotate.lua" -- "$WORK/all-keys.txt"
G2_RPS=$R_RPS; G2_GW=$R_GW_CPU; G2_UP=$R_UP_CPU

if [ -z "$RATE" ]; then
  RATE="$(awk -v a="$G1_RPS" -v b="$G2_RPS" 'BEGIN { m = (a < b ? a : b) / 2; if (m > 5000) m = 5000; printf "%d", (m < 100 ? 100 : m) }')"
fi
echo "== fixed rate $RATE req/s, 8 connections, ${DURATION}s each" >&2
echo "$REAL_KEY" >"$WORK/real-key.txt"
run_fixed fixed_direct "$UP_ADDR" "$WORK/real-key.txt"
FD_P50=$F_P50; FD_P99=$F_P99; FD_P999=$F_P999
run_fixed fixed_gateway_1key "$GW_ADDR" "$WORK/real-key.txt"
FG1_P50=$F_P50; FG1_P99=$F_P99; FG1_P999=$F_P999
run_fixed fixed_gateway_10k "$GW_ADDR" "$WORK/all-keys.txt"
FG2_P50=$F_P50; FG2_P99=$F_P99; FG2_P999=$F_P999

echo "== unloaded: one connection, ${DURATION}s each" >&2
run_wrk c1_direct "$DIRECT" 1 "${AUTH[@]}"
C1D_P50=$R_P50; C1D_P99=$R_P99
run_wrk c1_gateway "$GATEWAY" 1 "${AUTH[@]}"
C1G_P50=$R_P50; C1G_P99=$R_P99

ERRS="$(curl -s "http://$ADMIN_ADDR/metrics" | awk '/^keygate_requests_total/ && !/outcome="ok"/ && $NF > 0' | wc -l)"

cat <<EOF

keygate load benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
gateway on core $GW_CORE; upstream + load generator on core $UP_CORE; ${DURATION}s per run; $KEYS keys in the table

| scenario | direct req/s | gateway req/s | throughput gw/direct | gateway CPU µs/req | upstream CPU µs/req | CPU ratio gw/upstream |
|---|---|---|---|---|---|---|
| 1 key (keys create), $CONNS conns | $D1_RPS | $G1_RPS | $(ratio "$G1_RPS" "$D1_RPS") | $G1_GW | $G1_UP | $(ratio "$G1_GW" "$G1_UP") |
| $KEYS keys rotating, $CONNS conns | $D2_RPS | $G2_RPS | $(ratio "$G2_RPS" "$D2_RPS") | $G2_GW | $G2_UP | $(ratio "$G2_GW" "$G2_UP") |

| latency (µs) | p50 | p99 | p99.9 | added p50 vs direct |
|---|---|---|---|---|
| direct, $RATE req/s fixed | $FD_P50 | $FD_P99 | $FD_P999 | |
| gateway 1 key, $RATE req/s fixed | $FG1_P50 | $FG1_P99 | $FG1_P999 | $(diff_us "$FG1_P50" "$FD_P50") |
| gateway $KEYS keys, $RATE req/s fixed | $FG2_P50 | $FG2_P99 | $FG2_P999 | $(diff_us "$FG2_P50" "$FD_P50") |
| direct, 1 conn closed loop (wrk -c1) | $C1D_P50 | $C1D_P99 | – | |
| gateway, 1 conn closed loop (wrk -c1) | $C1G_P50 | $C1G_P99 | – | $(diff_us "$C1G_P50" "$C1D_P50") |

gateway non-ok outcome series with a non-zero count: $ERRS (expected 0)
EOF
