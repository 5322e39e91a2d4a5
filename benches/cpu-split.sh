#!/usr/bin/env bash
# Where a proxied request's CPU goes: user and kernel time per request, and
# system calls per request, for one Weft sidecar hop and for HAProxy
# (nbthread 1) in front of the same three backends, in alternating runs.
#
# Usage: benches/cpu-split.sh [ROUNDS=6] [SECONDS=4]
#   NOBUILD=1      use the release binaries already built
#   SYSCALLS=1     also count system calls per request (perf stat on the
#                  syscalls tracepoints; needs root or perf_event_paranoid <= 1)
#
# Each run: closed loop, 32 keep-alive connections from weft-load on CPU 1 (with
# the backends), the proxy alone on CPU 0; utime and stime of the proxy from
# /proc/PID/stat before and after. Prints each run and the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-6}
SECS=${2:-4}
source benches/lib.sh
need_haproxy
bench_init
hz=$(getconf CLK_TCK)

start_backends

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# One measured run: prints "NAME requests user_us sys_us [syscalls_per_request]".
run() {
  local name=$1 pid addr u0 s0 u1 s1 res n calls=""
  read -r pid addr < <("start_$name")
  taskset -c 1 "$bin/weft-load" --target "$addr" --connections 32 --duration 2 --warmup 0 --label warm-up > /dev/null
  read -r u0 s0 < <(ticks "$pid")
  if [ -n "${SYSCALLS:-}" ]; then
    perf stat -e 'raw_syscalls:sys_enter' -p "$pid" -x, -o "$w/perf" -- sleep "$SECS" &
    local perfpid=$!
  fi
  res=$(taskset -c 1 "$bin/weft-load" --target "$addr" --connections 32 --duration "$SECS" --warmup 0 --label run | tail -1)
  read -r u1 s1 < <(ticks "$pid")
  n=$(echo "$res" | python3 -c "import json,sys; print(json.load(sys.stdin)['finished_all'])")
  if [ -n "${SYSCALLS:-}" ]; then
    wait "$perfpid" || true
    calls=$(awk -F, -v n="$n" '/sys_enter/ { printf "%.2f", $1 / n }' "$w/perf")
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c "print('$name', $n, ($u1-$u0)*1e6/$hz/$n, ($s1-$s0)*1e6/$hz/$n, '$calls')"
}

for r in $(seq "$ROUNDS"); do
  for name in weft haproxy; do run "$name"; done
done | python3 -c '
import sys, statistics as st
rows = {}
for line in sys.stdin:
    f = line.split()
    name, n, user, kern = f[0], int(f[1]), float(f[2]), float(f[3])
    calls = f[4] if len(f) > 4 else "-"
    print(f"{name:8} {n:8} requests  user {user:6.2f} us/req  kernel {kern:6.2f} us/req  syscalls/req {calls}")
    rows.setdefault(name, []).append((user, kern))
print()
print("| proxy | user us/request | kernel us/request | total |")
print("|---|---|---|---|")
for name, v in rows.items():
    u, k = st.median(x[0] for x in v), st.median(x[1] for x in v)
    print(f"| {name} | {u:.2f} | {k:.2f} | {u + k:.2f} |")
'
