#!/usr/bin/env bash
# User-space instructions per proxied request, one sidecar hop, under callgrind:
# a count that other work on the machine does not skew (wall-clock benches are).
# weft-proxy (release build) runs under valgrind in front of three backends;
# weft-load sends closed-loop requests on 4 connections; counters are zeroed
# after a 3 s warm-up and dumped after SECONDS.
#
# Usage: benches/callgrind.sh [SECONDS=15] [OUT=benches/results/callgrind.out]
# Then: callgrind_annotate --inclusive=yes OUT.1 | less
# NOBUILD=1 profiles the release binaries already built.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
OUT=${2:-benches/results/callgrind.out}
command -v valgrind >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
source benches/lib.sh
bench_init
start_backends
write_weft_config
rm -f "$OUT" "$OUT".*
WEFT_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" --dump-instr=no \
  "$bin/weft-proxy" run --config "$w/weft.toml" --bound-file "$w/bound.json" 2> "$w/valgrind.log" &
pids+=($!)
for _ in $(seq 600); do [ -s "$w/bound.json" ] && break; sleep 0.1; done
out=$(python3 -c "import json; print(json.load(open('$w/bound.json'))['outbound'])")
"$bin/weft-load" --target "$out" --connections 4 --duration 3 --warmup 0 --label warm-up > /dev/null
callgrind_control -z > /dev/null 2>&1
n=$("$bin/weft-load" --target "$out" --connections 4 --duration "$SECS" --warmup 0 --label prof | tail -1 |
  python3 -c "import json,sys; print(json.load(sys.stdin)['finished_all'])")
callgrind_control -d > /dev/null 2>&1
for _ in $(seq 100); do grep -qs '^summary:' "$OUT".1 && break; sleep 0.1; done
ir=$(grep '^summary:' "$OUT".1 | awk '{print $2}')
echo "$n requests, $ir instructions: $((ir / n)) user-space instructions per request (profile: $OUT.1)"
