#!/usr/bin/env bash
# Cost of fleet-wide limits: the peer benchmark's throughput scenarios (../shared/bench/peers)
# run against keygate with `[limits] backend = "local"` and with `backend = "redis"` (a
# private redis-server on loopback), alternating, REPEAT times each; prints the medians of
# gateway CPU µs per request, Redis CPU µs per request, and Redis commands per 1,000 requests.
#
#   cargo build --release && REPEAT=3 bash benches/redis-limits.sh
#
# Needs: apt-get install -y redis-server nginx-light haproxy wrk nghttp2-client curl
# Redis is started here, outside the gateway's process tree, so the harness's "gateway CPU"
# is keygate's alone; Redis's own CPU is read from /proc and reported beside it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
peers=${PEERS_DIR:-$root/../shared/bench/peers}
export KEYGATE_BIN=${KEYGATE_BIN:-$root/target/release/keygate}
[ -x "$KEYGATE_BIN" ] || { echo "no $KEYGATE_BIN: cargo build --release first" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }
REPEAT=${REPEAT:-3}
work=$(mktemp -d)
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
    --daemonize no >"$work/redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; wait $redis_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$port" ping >/dev/null

# The adapter: the shared one's config plus a backend, then `keygate serve`.
cat >"$work/adapter.sh" <<'ADAPTER'
#!/usr/bin/env bash
set -euo pipefail
dir="$BENCH_RUN_DIR/keygate"; rm -rf "$dir"; mkdir -p "$dir"
admin_port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
export API_KEY_HASH_SECRET=bench-secret-0123456789abcdef0123456789abcdef
redis=""
[ "$KG_BACKEND" = redis ] && redis=$'[redis]\nurl = "redis://127.0.0.1:'"$KG_REDIS_PORT"$'/0"\n'
cat >"$dir/keygate.toml" <<CFG
[server]
listen = "$BENCH_LISTEN_ADDR"
max_connections = 100000
max_connections_per_ip = 100000

[admin]
listen = "127.0.0.1:$admin_port"

[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"

[limits]
backend = "$KG_BACKEND"

$redis
[plans.default]
rate = "${BENCH_RATE_PER_KEY}/s"
burst = ${BENCH_RATE_BURST}

[[upstreams]]
name = "bench"
targets = ["$BENCH_UPSTREAM_ADDR"]

[[routes]]
name = "api"
path_prefix = "/api"
scopes = ["read"]
upstream = "bench"
CFG
echo "$admin_port" >"$KG_ADMIN_PORT_FILE"
"$KEYGATE_BIN" keys import --file "$BENCH_KEYS_FILE" --owner bench --scope read --scope write \
    --config "$dir/keygate.toml" >"$dir/import.out" 2>&1
exec "$KEYGATE_BIN" serve --config "$dir/keygate.toml"
ADAPTER
chmod +x "$work/adapter.sh"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Round trips: the commands clients send (EVALSHA/EVAL, SCRIPT LOAD, PING), not the commands
# the scripts run inside Redis.
commands() {
    redis-cli -p "$port" info commandstats | python3 -c 'import re, sys
print(sum(int(m.group(2)) for m in re.finditer(
    r"cmdstat_(evalsha|eval|script\|load|ping):calls=(\d+)", sys.stdin.read())))'
}
hz=$(getconf CLK_TCK)
printf 'backend\trep\tscenario\trequests\tgw_cpu_us_per_req\tredis_cpu_us_per_req\tredis_cmds_per_1000\n' >"$work/all.tsv"
for rep in $(seq "$REPEAT"); do
  for scenario in tput_single tput_rotate; do
    for backend in local redis; do
        out="$work/out-$scenario-$backend-$rep"
        c0=$(commands); t0=$(cpu_ticks "$redis_pid")
        KG_BACKEND=$backend KG_REDIS_PORT=$port KG_ADMIN_PORT_FILE="$work/admin-port" \
            GATEWAY_NAME=keygate GATEWAY_CMD="$work/adapter.sh" TARGETS=keygate \
            SCENARIOS="$scenario" OUT_DIR="$out" REPEAT=1 \
            "$peers/run.sh" >"$work/run-$scenario-$backend-$rep.log" 2>&1
        c1=$(commands); t1=$(cpu_ticks "$redis_pid")
        # Redis work per request includes the harness's warm-up requests (WARMUP s at the
        # same load), which `requests` does not count: scale by the measured share.
        python3 - "$out/results.tsv" "$backend" "$rep" $((c1 - c0)) $((t1 - t0)) "$hz" \
            "${WARMUP:-2}" "${TPUT_DURATION:-10}" >>"$work/all.tsv" <<'PY'
import csv, sys
path, backend, rep = sys.argv[1:4]
cmds, ticks, hz, warm, dur = (int(x) for x in sys.argv[4:9])
share = dur / (dur + warm)
for r in csv.DictReader(open(path), delimiter="\t"):
    if r["target"] != "keygate":
        continue
    n = int(r["requests"]) or 1
    print(f"{backend}\t{rep}\t{r['scenario']}\t{n}\t{r['gw_cpu_us_per_req']}\t"
          f"{ticks * share / hz * 1e6 / n:.2f}\t{cmds * share * 1000 / n:.2f}")
PY
    done
  done
done
python3 - "$work/all.tsv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| scenario | backend | gateway CPU µs/req | Redis CPU µs/req | Redis round trips / 1,000 req | runs |")
print("|---|---|---:|---:|---:|---:|")
med = {}
for sc in ("tput_single", "tput_rotate"):
    for b in ("local", "redis"):
        rs = [r for r in rows if r["scenario"] == sc and r["backend"] == b]
        g = statistics.median(float(r["gw_cpu_us_per_req"]) for r in rs)
        rc = statistics.median(float(r["redis_cpu_us_per_req"]) for r in rs)
        cm = statistics.median(float(r["redis_cmds_per_1000"]) for r in rs)
        med[(sc, b)] = g
        print(f"| {sc} | {b} | {g:.1f} | {rc:.2f} | {cm:.2f} | {len(rs)} |")
for sc in ("tput_single", "tput_rotate"):
    print(f"{sc}: redis / local gateway CPU = {med[(sc, 'redis')] / med[(sc, 'local')]:.3f}")
PY
