#!/usr/bin/env bash
# Refresh ci/advisory-db, the RustSec advisory database that ci/audit.sh checks Cargo.lock
# against, from a git clone (bare or not) of https://github.com/rustsec/advisory-db (CI cannot reach
# GitHub, so the database travels with the repository; ci/audit.sh fails once the snapshot
# is older than its limit). Copies what cargo-audit reads (crates/, rust/) and the licence
# (CC0-1.0, GHSA-derived entries CC-BY-4.0), and records the commit in SNAPSHOT.
#
#   git clone https://github.com/rustsec/advisory-db /tmp/advisory-db
#   bash ci/advisory-db-refresh.sh /tmp/advisory-db && bash ci/audit.sh
set -euo pipefail
SRC="${1:?usage: ci/advisory-db-refresh.sh <git clone of rustsec/advisory-db>}"
DEST="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/advisory-db"
git -C "$SRC" cat-file -e HEAD:crates 2>/dev/null || { echo "$SRC has no crates/ at HEAD: not a clone of rustsec/advisory-db" >&2; exit 1; }
commit="$(git -C "$SRC" log -1 --format=%H)"
date="$(git -C "$SRC" log -1 --format=%cI)"
tmp="$(mktemp -d "$DEST.new.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
git -C "$SRC" archive "$commit" crates rust LICENSE.txt LICENSES | tar -x -C "$tmp"
printf 'source = "https://github.com/rustsec/advisory-db"\ncommit = "%s"\ndate = "%s"\n' \
  "$commit" "$date" >"$tmp/SNAPSHOT"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "ci/advisory-db: rustsec/advisory-db $commit ($date), $(find "$DEST/crates" -name 'RUSTSEC-*.md' | wc -l) crate advisories"
