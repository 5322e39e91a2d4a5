#!/usr/bin/env bash
# The chaos run: a whole Weft mesh under steady traffic while a seeded fault
# injector kills, terminates and pauses its processes, then an overload;
# prints the invariants table and exits 1 if any invariant failed.
#
# Usage: benches/chaos.sh [MINUTES=10]
#   CHAOS_SEED=N   replay a seed (the seed is printed first either way)
#   CHAOS_OUT=DIR  where the records go (default $CARGO_TARGET_DIR/chaos/<time>)
#   NOBUILD=1      use the binaries already built
# Needs etcd (scripts/setup installs it). Debug binaries, as the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
target=${CARGO_TARGET_DIR:-target}
# The whole workspace, as scripts/test builds it: the same feature set, so the
# dependencies already built are reused.
[ -n "${NOBUILD:-}" ] || cargo build --locked -q --workspace --bins
out=${CHAOS_OUT:-$target/chaos/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
args=(--minutes "$minutes" --out "$out")
[ -z "${CHAOS_SEED:-}" ] || args+=(--seed "$CHAOS_SEED")
echo "chaos: records in $out (requests.csv, events.log, report.md); process logs in $out/stderr.log"

# weft-chaos stops every process it started on every way out it controls
# (end, error, panic, SIGINT, SIGTERM). It runs in a process group of its
# own, killed at the end, so not even a SIGKILL of it leaves processes behind.
setsid "$target/debug/weft-chaos" "${args[@]}" 2> "$out/stderr.log" &
pid=$!
stop() { kill -TERM "$pid" 2>/dev/null || true; }
trap stop INT TERM
status=0
wait "$pid" || status=$?
# A signal interrupts the first wait; wait again for weft-chaos to clean up.
if kill -0 "$pid" 2>/dev/null; then wait "$pid" || status=$?; fi
kill -KILL -- "-$pid" 2>/dev/null || true
exit "$status"
