#!/usr/bin/env bash
# Run every keygate fuzz target with libFuzzer for a fixed budget (THREATS §4 K6).
#
#   bash fuzz/run.sh                  # every target, BUDGET seconds each (default 60)
#   BUDGET=30 bash fuzz/run.sh path_canon record_log
#
# Needs cargo-fuzz (installed here if missing) and a compiler that accepts -Z flags: a nightly
# toolchain if rustup has one, else the stable one with RUSTC_BOOTSTRAP=1. Not part of
# .ci/run: CI only replays the corpus (tests/fuzz_corpus.rs). New inputs go to a scratch
# corpus, so fuzz/corpus/ keeps only the curated seeds; crashes land in fuzz/artifacts/<t>/.
# Add a crash to fuzz/corpus/<t>/ once it is fixed, so `cargo test` replays it forever.
#
# Env: BUDGET (s per target), SANITIZER (address|none, default address), JOBS (build jobs,
# default 2), CARGO_TARGET_DIR (builds go to $CARGO_TARGET_DIR/fuzz, default fuzz/target),
# SCRATCH (where generated corpora go, default a temp dir).
set -uo pipefail
cd "$(dirname "$0")"

BUDGET=${BUDGET:-60}
SANITIZER=${SANITIZER:-address}
JOBS=${JOBS:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}/fuzz
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/keygate-fuzz.XXXXXX)}
ALL_TARGETS=(key_parse extract hygiene path_canon cidr_authz record_log config)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked -j "$JOBS" || exit 1
fi

# A toolchain that takes -Zsanitizer / -Cpasses=sancov: nightly, else stable + RUSTC_BOOTSTRAP.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
  echo "== toolchain: $(rustc +nightly --version)"
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
  echo "== toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

COMMON=(--sanitizer "$SANITIZER" --target-dir "$TARGET_DIR")
echo "== building ${TARGETS[*]} (sanitizer $SANITIZER, target dir $TARGET_DIR)"
start=$(date +%s)
for t in "${TARGETS[@]}"; do
  CARGO_BUILD_JOBS=$JOBS "${FUZZ[@]}" build "${COMMON[@]}" "$t" || {
    echo "build of $t failed"
    exit 1
  }
done
echo "== built in $(($(date +%s) - start)) s"

status=0
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$SCRATCH/$t"
  log="$SCRATCH/$t.log"
  echo "== $t: ${BUDGET}s (log $log)"
  # First corpus dir receives new inputs (scratch); the seed dir is only read.
  "${FUZZ[@]}" run "${COMMON[@]}" "$t" "$SCRATCH/$t" "corpus/$t" -- \
    -max_total_time="$BUDGET" -print_final_stats=1 -rss_limit_mb=2048 -max_len=16384 \
    >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  [ -n "$execs" ] || execs=$(grep -oE '^(#[0-9]+|Done [0-9]+ runs)' "$log" | grep -oE '[0-9]+' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
  if [ $rc -ne 0 ] || grep -qE '^==[0-9]+==ERROR|panicked at|SUMMARY: libFuzzer' "$log"; then
    status=1
    line="$t: CRASH after ${execs:-?} execs ($cov) — see $log and artifacts/$t/"
    grep -m3 -E 'panicked at|ERROR|Test unit written' "$log" | sed 's/^/    /'
  else
    line="$t: ${execs:-?} execs, ${cov:-no cov}, 0 crashes"
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "== summary (budget ${BUDGET}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
