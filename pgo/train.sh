#!/usr/bin/env bash
# Regenerates pgo/keygate.profdata, the profile the release build is optimised with
# (pgo/build.sh; docs/performance.md: "Profile-guided build").
#
#   bash pgo/train.sh [OUT]  (about 10 minutes: an instrumented build, ~1 minute of traffic;
#                            OUT defaults to pgo/keygate.profdata; CI writes elsewhere)
#
# Run it after changes to the request path: a function changed since the profile was taken
# is compiled as without one (its counts no longer match it), so a stale profile costs the
# gain, never correctness. What it does:
#  1. builds the gateway instrumented (`-Cprofile-generate`, its own target dir);
#  2. runs it on loopback in front of an nginx upstream (plain and TLS, certificates made here
#     with openssl) with a plain and a TLS listener, 10,000 imported keys and minted ones, and
#     drives every data-plane path a deployment keeps hot: HTTP/1.1 with one key, with keys
#     rotating, refused keys (401) and scopes (403), HTTP/2 (cleartext and over TLS by ALPN),
#     HTTP/1.1 over TLS, a TLS upstream, and /metrics scrapes. Code no request reaches here is
#     laid out as cold, so a path left out would be slower than in a build without a profile;
#  3. stops the gateway (the profile is written at exit) and merges it with llvm-profdata
#     (LLVM >= 19 reads the raw profiles of Rust's LLVM; Debian's llvm-19 is installed when no
#     such llvm-profdata is found) into a sparse indexed profile (format 12, which the LLVM of
#     every Rust from the crate's rust-version, 1.89, reads).
# Needs nginx (nginx-light), h2load (nghttp2-client), wrk, openssl, curl, python3; installs
# the packages when missing. Everything started here is stopped on exit; KEEP=1 keeps the
# scratch directory for a look after a failure.
set -euo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/keygate.profdata}")
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -z "${RUSTFLAGS:-}" ] || { echo "pgo/train.sh: unset RUSTFLAGS: the profile is taken with the build settings of .cargo/config.toml" >&2; exit 2; }

need=()
for t in nginx:nginx-light h2load:nghttp2-client wrk:wrk openssl:openssl curl:curl; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
profdata=""
for p in llvm-profdata /usr/lib/llvm-2[0-9]/bin/llvm-profdata /usr/lib/llvm-19/bin/llvm-profdata; do
  # No version read (a missing path, or Debian's default LLVM 14, which knows no --version)
  # counts as too old.
  v=$("$p" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' || true)
  if [ "${v:-0}" -ge 19 ]; then
    profdata=$p
    break
  fi
done
[ -n "$profdata" ] || need+=(llvm-19)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  echo "pgo/train.sh: installing ${need[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
profdata=${profdata:-/usr/lib/llvm-19/bin/llvm-profdata}

D=$(mktemp -d /tmp/keygate-pgo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$D"
}
trap cleanup EXIT
# free_port, certs, upstream_conf (shared with benches/tls-upstream.sh).
. benches/support/nginx-upstream.sh

# 1. The instrumented gateway. Build scripts run instrumented too and write their own profiles
# there; only the gateway's (LLVM_PROFILE_FILE below) is merged.
TARGET_DIR=$ROOT/target/pgo-train
cargo build --release --locked --bin keygate --target-dir "$TARGET_DIR" \
  --config "target.x86_64-unknown-linux-gnu.rustflags=['-Cprofile-generate=$D/build-scripts']"
KG=$TARGET_DIR/release/keygate

# 2. Certificates (a CA; the upstream's and the gateway's for 127.0.0.1) and the upstream.
certs "$D" up gw
UP_PLAIN=$(free_port) UP_TLS=$(free_port) GW=$(free_port) GW_TLS=$(free_port) ADMIN=$(free_port)
upstream_conf "$D" "$UP_PLAIN" "$UP_TLS"

mkdir -p "$D/gw"
cat >"$D/gw/keygate.toml" <<CONF
[server]
listen = "127.0.0.1:$GW"
max_connections = 100000
max_connections_per_ip = 100000
tls = { cert = "$D/gw.pem", key = "$D/gw.key", listen = "127.0.0.1:$GW_TLS" }

[admin]
listen = "127.0.0.1:$ADMIN"

[keys]
store = "keys.jsonl"
hash_secret_env = "API_KEY_HASH_SECRET"
prefix = "kg"
audit_log = "audit.jsonl"

# The admitted path is what is profiled: a 100 ms tolerance leaves no refusal to the
# scheduler of a 2-core machine shared with h2load and nginx (the limiter's arithmetic under
# preemption is src/gcra.rs's unit tests' to judge).
[plans.default]
rate = "1000000/s"
burst = 100000

[[upstreams]]
name = "plain"
targets = ["127.0.0.1:$UP_PLAIN"]

[[upstreams]]
name = "secure"
targets = ["https://127.0.0.1:$UP_TLS"]
ca = "$D/ca.pem"

[[routes]]
name = "api"
path_prefix = "/api"
scopes = ["read"]
upstream = "plain"

[[routes]]
name = "secure"
path_prefix = "/secure"
scopes = ["read"]
upstream = "secure"
CONF
export API_KEY_HASH_SECRET=pgo-training-secret-0123456789abcdef0123456789

# Keys: 10,000 imported (what the peer benchmark presents), two minted ones (the key format's
# parse and checksum), one of them without the route's scope.
python3 - "$D" <<'PY'
import random, sys
rng = random.Random(20261204)
open(f"{sys.argv[1]}/keys.txt", "w").write("".join("gk_%040x\n" % rng.getrandbits(160) for _ in range(10000)))
PY
"$KG" keys import --file "$D/keys.txt" --owner train --scope read --config "$D/gw/keygate.toml" >/dev/null
MINTED=$("$KG" keys create --name train --owner train --scope read --config "$D/gw/keygate.toml")
NOSCOPE=$("$KG" keys create --name train-write --owner train --scope write --config "$D/gw/keygate.toml")
IMPORTED=$(head -1 "$D/keys.txt")

nginx -p "$D/" -c "$D/upstream.conf" -g 'daemon off; master_process off;' 2>>"$D/nginx.log" &
pids+=($!)
(cd "$D/gw" && LLVM_PROFILE_FILE="$D/gateway-%p.profraw" exec "$KG" serve --config keygate.toml >"$D/gw/serve.log" 2>&1) &
gw_pid=$!
pids+=($gw_pid)
for ((i = 0; i < 600; i++)); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "X-API-Key: $MINTED" "http://127.0.0.1:$GW/api/v1/items" || true)
  [ "$code" = 200 ] && break
  [ $i -eq 599 ] && { echo "the gateway is not answering 200 (last: $code)" >&2; tail -n 5 "$D/gw/serve.log" >&2; exit 1; }
  sleep 0.1
done

# Each step checks its status codes: a profile of refusals that should have been answers
# would train the wrong paths.
drive() { # expected-status h2load-args...
  local want=$1 out
  shift
  out=$(h2load "$@" 2>&1)
  grep -q "status codes: .*" <<<"$out" || { echo "h2load failed: $*" >&2; echo "$out" >&2; exit 1; }
  local got
  got=$(sed -n 's/^status codes: \([0-9]*\) 2xx, [0-9]* 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx/\1 \2 \3/p' <<<"$out")
  case $want in
  2xx) [ "${got%% *}" -gt 0 ] && [ "$(cut -d' ' -f2,3 <<<"$got")" = "0 0" ] ;;
  4xx) [ "${got%% *}" = 0 ] && [ "$(cut -d' ' -f3 <<<"$got")" = 0 ] ;;
  esac || {
    echo "unexpected status codes ($got, wanted $want): $*" >&2
    # What the gateway answered, by outcome: names the refusal.
    curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^keygate_requests_total.* [1-9][0-9]*$' >&2 || true
    exit 1
  }
  echo "ok $want: ${*: -1} ($got)"
}
H=http://127.0.0.1:$GW
S=https://127.0.0.1:$GW_TLS
drive 2xx --h1 -n 200000 -c 64 -H "x-api-key: $MINTED" "$H/api/v1/items"
drive 2xx --h1 -n 100000 -c 64 -H "x-api-key: $IMPORTED" "$H/api/v1/items"
cat >"$D/rotate.lua" <<'LUA'
local keys, i = {}, 0
function init(args) for line in io.lines(args[1]) do keys[#keys + 1] = line end end
function request() i = i % #keys + 1; wrk.headers["X-API-Key"] = keys[i]; return wrk.format(nil) end
function done(s) io.write(string.format("RESULT requests=%d non2xx=%d\n", s.requests, s.errors.status)) end
LUA
out=$(wrk -t1 -c64 -d8s -s "$D/rotate.lua" "$H/api/v1/items" -- "$D/keys.txt")
grep -q 'RESULT requests=[1-9][0-9]* non2xx=0' <<<"$out" || { echo "rotating keys: $out" >&2; exit 1; }
echo "ok 2xx: rotating keys ($(grep -o 'requests=[0-9]*' <<<"$out"))"
drive 2xx -n 50000 -c 16 -m 10 -H "x-api-key: $MINTED" "$H/api/v1/items"
drive 2xx --h1 -n 40000 -c 16 -H "x-api-key: $MINTED" "$S/api/v1/items"
drive 2xx -n 40000 -c 16 -m 10 -H "x-api-key: $MINTED" "$S/api/v1/items"
drive 2xx --h1 -n 60000 -c 64 -H "x-api-key: $MINTED" "$H/secure/v1/items"
# Requests with a body: served by hyper's HTTP/1 server (plain requests, the steps above, by
# `direct`), so its code is laid out as hot too.
printf 'a=1&b=2\n' >"$D/body.txt"
drive 2xx --h1 -n 40000 -c 16 -d "$D/body.txt" -H "x-api-key: $MINTED" "$H/api/v1/items"
drive 4xx --h1 -n 20000 -c 16 -H "x-api-key: kg_live_0000000000000000000000000000000000000000000000000" "$H/api/v1/items"
drive 4xx --h1 -n 20000 -c 16 -H "x-api-key: gk_unknown_key_0123456789abcdef" "$H/api/v1/items"
drive 4xx --h1 -n 20000 -c 16 "$H/api/v1/items"
drive 4xx --h1 -n 20000 -c 16 -H "x-api-key: $NOSCOPE" "$H/api/v1/items"
for ((i = 0; i < 20; i++)); do
  curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/metrics" || { echo "/metrics failed" >&2; exit 1; }
done

# 3. Stop (SIGTERM: the lame-duck delay, the drain, then exit writes the profile) and merge.
kill -TERM "$gw_pid"
wait "$gw_pid" || { echo "the gateway exited with $?" >&2; exit 1; }
shopt -s nullglob
raw=("$D"/gateway-*.profraw)
[ ${#raw[@]} -eq 1 ] || { echo "expected one gateway profile, found ${#raw[@]}" >&2; exit 1; }
"$profdata" merge --sparse -o "$OUT" "${raw[@]}"
"$profdata" show "$OUT" | grep -q '^Total functions: [1-9]' || { echo "$OUT holds no functions" >&2; exit 1; }
ls -l "$OUT"
