#!/usr/bin/env bash
# The release binary, optimised with the committed profile (pgo/keygate.profdata, made by
# pgo/train.sh): `cargo build --release --locked --bin keygate` plus `-Cprofile-use`.
# Arguments go to cargo.
#
#   bash pgo/build.sh                      # target/release/keygate
#   RUSTFLAGS="-C target-cpu=x86-64" bash pgo/build.sh   # for a CPU without x86-64-v3
#
# The profile needs its absolute path: cargo compiles each dependency in that dependency's
# own directory, where a relative path in .cargo/config.toml would not be found. So the flag
# is added here, to .cargo/config.toml's x86-64 rustflags (cargo appends a --config array to
# the files' arrays), or to RUSTFLAGS when that is set (it replaces the config's flags).
# Builds on other architectures take no profile (it was taken on x86-64).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=$root/pgo/keygate.profdata
[ -s "$profile" ] || { echo "pgo/build.sh: $profile is missing (bash pgo/train.sh makes it)" >&2; exit 1; }
cd "$root"
# Both ways of passing the flag split or quote on these.
case $profile in *"'"* | *" "*) echo "pgo/build.sh: the checkout's path may hold no quote or space: $root" >&2; exit 2 ;; esac
if [ -n "${RUSTFLAGS:-}" ]; then
  [ "$(uname -m)" != x86_64 ] || export RUSTFLAGS="$RUSTFLAGS -Cprofile-use=$profile"
  exec cargo build --release --locked --bin keygate "$@"
fi
exec cargo build --release --locked --bin keygate \
  --config "target.x86_64-unknown-linux-gnu.rustflags=['-Cprofile-use=$profile']" "$@"
