#!/usr/bin/env bash
# TLS to the upstream, side by side: keygate and an nginx API-key gateway (the peer
# benchmark's nginx-gw: key map, scope check, limit_req) in front of one nginx upstream that
# speaks only TLS, and the same two in front of the same upstream in plain HTTP, in one run.
#
#   bash benches/tls-upstream.sh       (REPEAT=3 DURATION=10 CONNS=64 KEYS=10000 to change)
#
# Each gateway verifies the upstream's certificate (a CA made here with openssl, the
# certificate naming 127.0.0.1) and keeps a keep-alive pool of TLS connections to it. Per
# target: wrk -t1 -cCONNS, one key, DURATION seconds after a 2 s warm-up; gateway CPU per
# request from /proc/PID/stat (utime+stime) over the run. Placement as the peer benchmark's:
# gateway and upstream on CPU 1, wrk on CPU 0. Repetitions alternate the targets; the table
# gives medians, and what the TLS hop adds to each gateway's CPU per request.
# Needs: nginx (nginx-light), wrk, openssl, curl, taskset, python3; installs the packages when
# missing. Everything started here is killed on exit; KEEP=1 keeps the scratch directory
# (configs, certificates, logs) for a look after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
REPEAT="${REPEAT:-3}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
KEYS="${KEYS:-10000}"
GW_CPU=1
UP_CPU=1
LOAD_CPU=0

need=()
for t in nginx:nginx-light wrk:wrk openssl:openssl curl:curl; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y "${need[@]}" >/dev/null || { apt-get update -qq && apt-get install -y "${need[@]}" >/dev/null; }
fi
KG="${KEYGATE_BIN:-$CARGO_TARGET_DIR/release/keygate}"
[ -n "${KEYGATE_BIN:-}" ] || bash pgo/build.sh -j2 >&2

D=$(mktemp -d /tmp/keygate-tls-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$D"; }
trap cleanup EXIT
# free_port, certs, upstream_conf (shared with pgo/train.sh).
. benches/support/nginx-upstream.sh

# A CA, and the upstream's certificate for 127.0.0.1 signed by it.
certs "$D" up

# Keys: plaintext for keygate's import, the same as an nginx map.
python3 - "$D" "$KEYS" <<'PY'
import random, sys
d, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(20261203)
keys = ["gk_" + "%040x" % rng.getrandbits(160) for _ in range(n)]
open(f"{d}/keys.txt", "w").write("".join(k + "\n" for k in keys))
open(f"{d}/nginx-keys.map", "w").write("".join(f'"{k}" "c{i:06d} read,write";\n' for i, k in enumerate(keys)))
PY
KEY=$(head -1 "$D/keys.txt")

UP_PLAIN=$(free_port); UP_TLS=$(free_port)
upstream_conf "$D" "$UP_PLAIN" "$UP_TLS"

# nginx-gw, once per upstream scheme (the peer benchmark's config, proxy_ssl_* added for TLS).
nginx_gw() { # name port scheme upstream_port
  cat >"$D/$1.conf" <<CONF
$nginx_common
pid $D/$1.pid;
http {
    access_log off; $temp_paths
    keepalive_timeout 300s; keepalive_requests 100000000; server_tokens off;
    map_hash_max_size 4194304; map_hash_bucket_size 128;
    map \$http_x_api_key \$api_principal { default ""; include $D/nginx-keys.map; }
    map \$api_principal \$api_client { default ""; "~^(?<cid>\\S+) " \$cid; }
    limit_req_zone \$api_client zone=per_key:64m rate=1000000r/s;
    limit_req_status 429;
    upstream backend { server 127.0.0.1:$4; keepalive 256; keepalive_requests 100000000; keepalive_timeout 300s; }
    server {
        listen 127.0.0.1:$2 backlog=4096;
        location / {
            if (\$api_principal = "") { return 401 "unauthorized\n"; }
            if (\$api_principal !~ " ([^ ]*,)?read(,|\$)") { return 403 "forbidden\n"; }
            limit_req zone=per_key burst=1000 nodelay;
            proxy_pass $3://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
            proxy_set_header X-Client-Id \$api_client;
            proxy_ssl_trusted_certificate $D/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name 127.0.0.1;
            proxy_ssl_session_reuse on;
        }
    }
}
CONF
}

# keygate, once per upstream scheme, with its keys imported.
keygate_cfg() { # name port target
  mkdir -p "$D/$1"
  cat >"$D/$1/keygate.toml" <<CONF
[server]
listen = "127.0.0.1:$2"
max_connections = 100000
max_connections_per_ip = 100000

[admin]
listen = "127.0.0.1:$(free_port)"

[keys]
store = "keys.jsonl"
hash_secret_env = "API_KEY_HASH_SECRET"
prefix = "kg"
audit_log = "audit.jsonl"

[plans.default]
rate = "1000000/s"
burst = 1000

[[upstreams]]
name = "bench"
targets = ["$3"]
$([[ $3 == https://* ]] && echo "ca = \"$D/ca.pem\"")

[[routes]]
name = "api"
path_prefix = "/api"
scopes = ["read"]
upstream = "bench"
CONF
  "$KG" keys import --file "$D/keys.txt" --owner bench --scope read --scope write \
    --config "$D/$1/keygate.toml" >"$D/$1/import.out" 2>&1
}
export API_KEY_HASH_SECRET=bench-secret-0123456789abcdef0123456789abcdef

declare -A port
port[nginx-gw]=$(free_port); nginx_gw nginx-gw "${port[nginx-gw]}" http "$UP_PLAIN"
port[nginx-gw-tls]=$(free_port); nginx_gw nginx-gw-tls "${port[nginx-gw-tls]}" https "$UP_TLS"
port[keygate]=$(free_port); keygate_cfg keygate "${port[keygate]}" "127.0.0.1:$UP_PLAIN"
port[keygate-tls]=$(free_port); keygate_cfg keygate-tls "${port[keygate-tls]}" "https://127.0.0.1:$UP_TLS"
TARGETS="nginx-gw nginx-gw-tls keygate keygate-tls"

taskset -c "$UP_CPU" nginx -p "$D/" -c "$D/upstream.conf" -g 'daemon off; master_process off;' 2>>"$D/nginx.log" &
pids+=($!)
for t in $TARGETS; do
  case $t in
  nginx-gw*) taskset -c "$GW_CPU" nginx -p "$D/" -c "$D/$t.conf" -g 'daemon off; master_process off;' 2>>"$D/nginx.log" & ;;
  keygate*) (cd "$D/$t" && exec taskset -c "$GW_CPU" "$KG" serve --config keygate.toml >"$D/$t/serve.log" 2>&1) & ;;
  esac
  pids+=($!)
done

# Every target answers 200 with a known key before anything is measured (60 s at most).
for t in $TARGETS; do
  for ((i = 0; i < 600; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "X-API-Key: $KEY" "http://127.0.0.1:${port[$t]}/api/v1/items" || true)
    [ "$code" = 200 ] && break
    [ $i -eq 599 ] && { echo "$t: not answering 200 (last: $code)" >&2; tail -n 5 "$D/nginx.log" "$D/$t/serve.log" 2>/dev/null >&2; exit 1; }
    sleep 0.1
  done
done

pid_of() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cat >"$D/key.lua" <<'LUA'
function init(args) wrk.headers["X-API-Key"] = args[1] end
function done(s, l, r) io.write(string.format("RESULT requests=%d errors=%d non2xx=%d\n", s.requests, s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout, s.errors.status)) end
LUA
hz=$(getconf CLK_TCK)
: >"$D/results.tsv"
for ((r = 1; r <= REPEAT; r++)); do
  for t in $TARGETS; do
    url="http://127.0.0.1:${port[$t]}/api/v1/items"
    p=$(pid_of "${port[$t]}")
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -s "$D/key.lua" "$url" -- "$KEY" >/dev/null
    t0=$(cpu_ticks "$p")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$D/key.lua" "$url" -- "$KEY")
    t1=$(cpu_ticks "$p")
    reqs=$(sed -n 's/.*RESULT requests=\([0-9]*\).*/\1/p' <<<"$out")
    bad=$(sed -n 's/.*errors=\([0-9]*\) non2xx=\([0-9]*\).*/\1+\2/p' <<<"$out")
    [ "$bad" = "0+0" ] || { echo "$t: errors or non-2xx ($bad)" >&2; exit 1; }
    printf '%s\t%s\t%s\n' "$t" "$reqs" "$((t1 - t0))" >>"$D/results.tsv"
    echo "run $r $t: $reqs requests" >&2
  done
done

python3 - "$D/results.tsv" "$DURATION" "$hz" "$CONNS" <<'PY'
import statistics, sys
from collections import defaultdict
path, dur, hz, conns = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rps, cpu = defaultdict(list), defaultdict(list)
for line in open(path):
    t, reqs, ticks = line.split("\t")
    rps[t].append(int(reqs) / dur)
    cpu[t].append(int(ticks) / hz * 1e6 / int(reqs))
m = {t: (statistics.median(rps[t]), statistics.median(cpu[t])) for t in rps}
print(f"medians of {len(cpu['keygate'])}; gateway CPU µs per request; one key, wrk -c{conns}")
print("| gateway | upstream plain: req/s | CPU µs/req | upstream TLS: req/s | CPU µs/req | TLS hop adds |")
print("|---|---:|---:|---:|---:|---:|")
for g in ("nginx-gw", "keygate"):
    (pr, pc), (tr, tc) = m[g], m[g + "-tls"]
    print(f"| {g} | {pr:,.0f} | {pc:.1f} | {tr:,.0f} | {tc:.1f} | {tc - pc:+.1f} µs |")
print(f"keygate ÷ nginx-gw, CPU per request: plain {m['keygate'][1] / m['nginx-gw'][1]:.2f}×, "
      f"TLS upstream {m['keygate-tls'][1] / m['nginx-gw-tls'][1]:.2f}×")
PY
