#!/usr/bin/env bash
# Soak test (THREATS K4). NOT run in CI: 30 minutes by default.
#
#   bash tests/soak.sh                 # DURATION=1800 s
#   DURATION=60 bash tests/soak.sh     # a short trial
#
# A release build of `keygate serve` in front of a stub upstream (Python, loopback), driven by
# a Python 3 client (standard library only) with mixed traffic: valid keep-alive GETs and
# POSTs, slow upstream responses, slow request bodies, slowloris heads, invalid keys from
# other sources, one rate-limited key, requests to a route whose upstream refuses connections
# (injected 502s, counted apart), and probes with revoked keys. Meanwhile a control loop
# creates and revokes a key every REVOKE_EVERY seconds and compacts the store every
# COMPACT_EVERY seconds, with the real CLI.
#
# Every SAMPLE seconds the gateway's RSS (VmRSS) and open fds are sampled. It FAILS on:
#   - RSS at the end > 1.5 x RSS after warm-up;
#   - fds at the end (after traffic stopped) > fds after warm-up + 50;
#   - any 2xx for a key revoked more than 1 s before the request was sent;
#   - any 5xx that is not an injected upstream fault (the refusing route);
#   - a rate-limited key admitted more than burst + rate x t (+ tolerance);
#   - more than 0.1 % client-side connection errors; a panic in the gateway log;
#   - a non-zero exit after SIGTERM.
# It prints a summary either way. Environment knobs: DURATION, SAMPLE, REVOKE_EVERY,
# COMPACT_EVERY, KEYGATE_BIN (skip the build and use this binary), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KEYGATE_BIN:-}" ]]; then
  cargo build --release --bin keygate -j "${CARGO_BUILD_JOBS:-2}" >&2
  KEYGATE_BIN="${CARGO_TARGET_DIR:-target}/release/keygate"
fi
export KEYGATE_BIN
export DURATION="${DURATION:-1800}"
export SAMPLE="${SAMPLE:-60}"
export REVOKE_EVERY="${REVOKE_EVERY:-3}"
export COMPACT_EVERY="${COMPACT_EVERY:-15}"

exec python3 - <<'PY'
import collections, http.client, json, os, random, signal, socket, string, subprocess
import sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BIN = os.environ["KEYGATE_BIN"]
DURATION = float(os.environ["DURATION"])
SAMPLE = float(os.environ["SAMPLE"])
REVOKE_EVERY = float(os.environ["REVOKE_EVERY"])
COMPACT_EVERY = float(os.environ["COMPACT_EVERY"])
WARMUP = max(10.0, min(120.0, DURATION * 0.2))
SECRET = "soak-secret-0123456789abcdefghijklmnopqrstuvwxyz"
TIGHT_RATE, TIGHT_BURST = 5.0, 5
HOST = "api.soak"

def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)

# ------------------------------------------------------------------ stub upstream
class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path.startswith("/api/slow"):
            time.sleep(0.3)
        out = json.dumps({"path": self.path, "len": len(body),
                          "key_id": self.headers.get("x-keygate-key-id")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = _answer

class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

stub = StubServer(("127.0.0.1", 0), Stub)
threading.Thread(target=stub.serve_forever, daemon=True).start()
s = socket.socket(); s.bind(("127.0.0.1", 0)); refused_port = s.getsockname()[1]; s.close()

# ------------------------------------------------------------------ gateway
work = tempfile.mkdtemp(prefix="keygate-soak-")
cfg = os.path.join(work, "keygate.toml")
with open(cfg, "w") as f:
    f.write(f"""[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
poll_interval_ms = 100
revoked_retention = "10s"

[plans.default]
rate = "1000/s"
burst = 1000

[plans.tight]
rate = "5/s"
burst = {TIGHT_BURST}

[server]
listen = "127.0.0.1:0"
header_read_timeout_ms = 2000
body_timeout_ms = 10000
drain_timeout_ms = 5000

[admin]
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
targets = ["127.0.0.1:{stub.server_address[1]}"]
connect_timeout_ms = 1000
response_timeout_ms = 5000

[[upstreams]]
name = "dead"
targets = ["127.0.0.1:{refused_port}"]
connect_timeout_ms = 500
response_timeout_ms = 1000

[[routes]]
name = "api"
path_prefix = "/api"
methods = ["GET", "POST"]
scopes = ["api"]
upstream = "up"

[[routes]]
name = "dead"
path_prefix = "/dead"
scopes = ["api"]
upstream = "dead"
""")
ENV = dict(os.environ, API_KEY_HASH_SECRET=SECRET)

def cli(*args):
    r = subprocess.run([BIN, "--config", cfg, *args], env=ENV, capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"keygate {args}: {r.stderr.strip()}")
    return r.stdout

def create(*extra):
    v = json.loads(cli("keys", "create", "--name", "soak", "--owner", "soak",
                       "--scope", "api", "--json", *extra))
    return v["id"], v["key"]

active = [create() for _ in range(10)]
tight_id, tight_key = create("--plan", "tight")

gw_err = open(os.path.join(work, "gateway.stderr.log"), "w")
gw = subprocess.Popen([BIN, "serve", "--config", cfg], env=ENV, stdout=subprocess.PIPE,
                      stderr=gw_err, text=True)
listening = None
deadline = time.time() + 30
while time.time() < deadline:
    line = gw.stdout.readline()
    if not line:
        break
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("event") == "listening":
        listening = v
        break
if not listening:
    log("gateway did not start; stderr:", open(gw_err.name).read())
    sys.exit(2)
threading.Thread(target=lambda: [None for _ in gw.stdout], daemon=True).start()
def hostport(a):
    h, p = a.rsplit(":", 1)
    return h, int(p)
GW = hostport(listening["http"])
ADMIN = hostport(listening["admin"])
PID = gw.pid
log(f"gateway pid {PID} http {listening['http']} admin {listening['admin']} dir {work}")

for _ in range(300):
    try:
        c = http.client.HTTPConnection(*ADMIN, timeout=2)
        c.request("GET", "/readyz"); st = c.getresponse().status; c.close()
        if st == 200:
            break
    except OSError:
        pass
    time.sleep(0.1)

# ------------------------------------------------------------------ bookkeeping
lock = threading.Lock()
statuses = collections.defaultdict(collections.Counter)   # kind -> status -> n
errors = collections.Counter()                            # kind of error -> n
violations = []                                           # failures worth printing
revoked = {}                                              # key -> monotonic revoke time
active_lock = threading.Lock()
counters = collections.Counter()
stop = threading.Event()
t0 = time.monotonic()

def note(kind, status):
    with lock:
        statuses[kind][status] += 1

def err(kind, e):
    with lock:
        errors[f"{kind}:{type(e).__name__}"] += 1

def violation(msg):
    with lock:
        if len(violations) < 50:
            violations.append(msg)
        counters["violations"] += 1

def check(kind, key, sent_at, status, path):
    note(kind, status)
    if 500 <= status < 600 and not path.startswith("/dead"):
        violation(f"{kind}: unexpected {status} on {path}")
    if 200 <= status < 300 and key is not None:
        with lock:
            r = revoked.get(key)
        if r is not None and sent_at > r + 1.0:
            violation(f"{kind}: 2xx for a key revoked {sent_at - r:.2f}s before the request")

class Conn:
    """A keep-alive connection that reconnects on failure, optionally from a source IP."""
    def __init__(self, src=None, timeout=10):
        self.src, self.timeout, self.c = src, timeout, None
    def request(self, method, path, key=None, body=None):
        if self.c is None:
            self.c = http.client.HTTPConnection(*GW, timeout=self.timeout,
                                                source_address=(self.src, 0) if self.src else None)
        h = {"Host": HOST}
        if key:
            h["Authorization"] = "Bearer " + key
        try:
            self.c.request(method, path, body=body, headers=h)
            r = self.c.getresponse()
            r.read()
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return r.status
        except Exception:
            self.close()
            raise
    def close(self):
        if self.c is not None:
            self.c.close()
            self.c = None

def pick_active():
    with active_lock:
        return random.choice(active)[1]

def loop(kind, fn, pause):
    while not stop.is_set():
        try:
            fn()
        except Exception as e:  # counted, judged at the end
            err(kind, e)
            time.sleep(0.05)
        if pause:
            time.sleep(pause)

def valid_worker(i):
    c = Conn()
    def once():
        key = pick_active()
        path = f"/api/items/{random.randint(1, 10**6)}"
        sent = time.monotonic()
        check("valid", key, sent, c.request("GET", path, key), path)
    loop("valid", once, 0.005)

def post_worker():
    c = Conn()
    def once():
        key = pick_active()
        sent = time.monotonic()
        check("post", key, sent, c.request("POST", "/api/items", key, b"x" * random.randint(0, 4096)), "/api/items")
    loop("post", once, 0.01)

def slow_upstream_worker():
    c = Conn()
    def once():
        key = pick_active()
        sent = time.monotonic()
        check("slow_upstream", key, sent, c.request("GET", "/api/slow", key), "/api/slow")
    loop("slow_upstream", once, 0)

def slow_body_worker():
    def once():
        key = pick_active()
        sent = time.monotonic()
        c = http.client.HTTPConnection(*GW, timeout=15)
        try:
            c.putrequest("POST", "/api/upload", skip_host=True)
            c.putheader("Host", HOST)
            c.putheader("Authorization", "Bearer " + key)
            c.putheader("Content-Length", "100")
            c.endheaders()
            for _ in range(10):
                c.send(b"0123456789")
                time.sleep(0.1)
            r = c.getresponse(); r.read()
            check("slow_body", key, sent, r.status, "/api/upload")
        finally:
            c.close()
    loop("slow_body", once, 0)

def slowloris_worker():
    def once():
        socks = []
        for _ in range(5):
            s = socket.create_connection(GW, timeout=10)
            s.sendall(b"GET /api/x HTTP/1.1\r\nHost: api.soak\r\nX-Slow: ")
            socks.append(s)
        started = time.monotonic()
        for s in socks:
            try:
                data = s.recv(4096)
                while data:
                    data = s.recv(4096)
                closed_after = time.monotonic() - started
                with lock:
                    counters["slowloris_closed"] += 1
                    counters["slowloris_max_ms"] = max(counters["slowloris_max_ms"], int(closed_after * 1000))
            except socket.timeout:
                violation("slowloris connection still open after 10 s")
            except OSError:
                with lock:
                    counters["slowloris_closed"] += 1
            finally:
                s.close()
    loop("slowloris", once, 0.5)

def invalid_worker():
    c = Conn(src="127.0.0.9")
    def once():
        junk = "kg_live_" + "".join(random.choices(string.ascii_letters + string.digits, k=random.randint(5, 60)))
        path = random.choice(["/api/x", "/api/y?z=1", "/nope", "/dead/x"])
        sent = time.monotonic()
        st = c.request("GET", path, random.choice([junk, None]))
        if st < 300:
            violation(f"invalid key accepted: {st} on {path}")
        check("invalid", None, sent, st, path)
    loop("invalid", once, 0.01)

def tight_worker():
    c = Conn()
    def once():
        sent = time.monotonic()
        st = c.request("GET", "/api/tight", tight_key)
        check("rate_limited_key", tight_key, sent, st, "/api/tight")
        if st == 200:
            with lock:
                counters["tight_ok"] += 1
    loop("tight", once, 0.02)

def dead_worker():
    c = Conn()
    def once():
        key = pick_active()
        sent = time.monotonic()
        st = c.request("GET", "/dead/x", key)
        check("injected_fault", key, sent, st, "/dead/x")
    loop("dead", once, 0.05)

def revoked_probe_worker():
    n = [0]
    def once():
        with lock:
            recent = sorted(revoked.items(), key=lambda kv: kv[1])[-5:]
        now = time.monotonic()
        ready = [(k, t) for k, t in recent if now > t + 1.05]
        if not ready:
            time.sleep(0.2)
            return
        key, _ = random.choice(ready)
        n[0] += 1
        # Rotate sources so the failed-auth budget (per source) never kicks in.
        src = f"127.0.1.{n[0] % 200 + 1}"
        c = Conn(src=src)
        try:
            sent = time.monotonic()
            st = c.request("GET", "/api/revoked", key)
        finally:
            c.close()
        check("revoked_probe", key, sent, st, "/api/revoked")
    loop("revoked_probe", once, 0.1)

def control_worker():
    last_compact = time.monotonic()
    while not stop.wait(REVOKE_EVERY):
        try:
            new = create()
            with active_lock:
                active.append(new)
                victim = active.pop(0)
            cli("keys", "revoke", victim[0], "--reason", "soak")
            with lock:
                revoked[victim[1]] = time.monotonic()
                counters["revocations"] += 1
                counters["creations"] += 1
            if time.monotonic() - last_compact >= COMPACT_EVERY:
                cli("keys", "compact")
                last_compact = time.monotonic()
                with lock:
                    counters["compactions"] += 1
        except Exception as e:
            err("control", e)
            violation(f"control loop: {e}")

def sample():
    rss = 0
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{PID}/fd"))
    return rss, fds

samples = []
def sampler_worker():
    next_at = 0.0
    while not stop.is_set():
        el = time.monotonic() - t0
        if el >= next_at:
            rss, fds = sample()
            with lock:
                total = sum(sum(c.values()) for c in statuses.values())
            samples.append((el, rss, fds))
            log(f"t={el:6.0f}s rss={rss} kB fds={fds} requests={total} "
                f"revocations={counters['revocations']} violations={counters['violations']}")
            next_at += SAMPLE
        stop.wait(1.0)

workers = [threading.Thread(target=valid_worker, args=(i,), daemon=True) for i in range(3)]
workers += [threading.Thread(target=f, daemon=True) for f in (
    post_worker, slow_upstream_worker, slow_body_worker, slowloris_worker, invalid_worker,
    tight_worker, dead_worker, revoked_probe_worker, control_worker, sampler_worker)]
for w in workers:
    w.start()

baseline = None
while time.monotonic() - t0 < DURATION:
    time.sleep(1)
    if baseline is None and time.monotonic() - t0 >= WARMUP:
        baseline = sample()
        tight_t0 = time.monotonic()
        with lock:
            tight_ok0 = counters["tight_ok"]
        log(f"warm-up done: rss={baseline[0]} kB fds={baseline[1]}")
    if gw.poll() is not None:
        violation(f"gateway exited early with {gw.returncode}")
        break
stop.set()
for w in workers:
    w.join(timeout=20)
elapsed = time.monotonic() - t0

# ------------------------------------------------------------------ verdict
failures = list(violations)
rss_end, fds_live = sample()
# Let client connections close, then take the fd count (bounded wait).
fds_end = fds_live
for _ in range(100):
    rss_end, fds_end = sample()
    if baseline and fds_end <= baseline[1] + 10:
        break
    time.sleep(0.1)
if baseline is None:
    baseline = samples[0][1:] if samples else (rss_end, fds_end)
    tight_t0, tight_ok0 = t0, 0
if rss_end > 1.5 * baseline[0]:
    failures.append(f"RSS grew: {baseline[0]} kB after warm-up -> {rss_end} kB at the end")
if fds_end > baseline[1] + 50:
    failures.append(f"fds grew: {baseline[1]} after warm-up -> {fds_end} at the end")
tight_window = time.monotonic() - tight_t0
tight_allowed = TIGHT_BURST + TIGHT_RATE * tight_window
tight_seen = counters["tight_ok"] - tight_ok0
if tight_seen > tight_allowed * 1.05 + 5:
    failures.append(f"rate limit over-admitted: {tight_seen} > {tight_allowed:.0f}")
total = sum(sum(c.values()) for c in statuses.values())
client_errors = sum(v for k, v in errors.items() if not k.startswith("control"))
if total == 0 or client_errors > max(10, total // 1000):
    failures.append(f"client-side errors: {client_errors} of {total} requests")
stderr = open(gw_err.name, errors="replace").read()
if "panicked" in stderr:
    failures.append("panic in gateway stderr")

gw.send_signal(signal.SIGTERM)
try:
    rc = gw.wait(timeout=30)
except subprocess.TimeoutExpired:
    gw.kill(); rc = "timeout"
if rc != 0:
    failures.append(f"gateway exit after SIGTERM: {rc}")
stub.shutdown()

by_status = collections.Counter()
for c in statuses.values():
    by_status.update(c)
print("\n==================== soak summary ====================")
print(f"duration            {elapsed:.0f} s (requested {DURATION:.0f} s, warm-up {WARMUP:.0f} s)")
print(f"requests            {total}")
print(f"by status           {dict(sorted(by_status.items()))}")
for kind in sorted(statuses):
    print(f"  {kind:<18}{dict(sorted(statuses[kind].items()))}")
print(f"injected 502s       {statuses['injected_fault'].get(502, 0)} (route /dead, upstream refuses)")
print(f"revocations         {counters['revocations']}  creations {counters['creations']}  compactions {counters['compactions']}")
print(f"rate-limited key    {tight_seen} admitted after warm-up, bound {tight_allowed:.0f}")
print(f"slowloris           {counters['slowloris_closed']} connections cut, slowest {counters['slowloris_max_ms']} ms")
print(f"RSS kB              warm-up {baseline[0]} -> end {rss_end}  (samples: {[s[1] for s in samples]})")
print(f"open fds            warm-up {baseline[1]} -> end {fds_end} (live at stop {fds_live}; samples: {[s[2] for s in samples]})")
print(f"errors by kind      {dict(errors) or '{}'}")
print(f"gateway exit        {rc}")
print(f"work dir            {work}")
if failures:
    print("RESULT: FAIL")
    for f_ in failures:
        print("  -", f_)
    sys.exit(1)
print("RESULT: PASS")
PY
