#!/usr/bin/env bash
# User-space instructions per proxied request under callgrind: a count that
# other work on the machine does not skew (wall-clock benches are).
#
# One sidecar hop (default): weft-proxy (release build) runs under valgrind in
# front of three backends. MESH=plain or MESH=mtls: the mesh path, a caller
# sidecar -> a callee sidecar (in front of one backend) -> the backend, both
# sidecars under valgrind, with plaintext HTTP/1.1 or mTLS (TLS 1.3, HTTP/2)
# between them; the figure is given per sidecar and for both.
# weft-load sends closed-loop requests on 4 connections; counters are zeroed
# after a 3 s warm-up and dumped after SECONDS.
#
# Usage: benches/callgrind.sh [SECONDS=15] [OUT=benches/results/callgrind.out]
#   MESH=mtls benches/callgrind.sh     the mesh path (OUT.caller.1, OUT.callee.1)
# Then: callgrind_annotate --inclusive=yes OUT.1 | less
# NOBUILD=1 profiles the release binaries already built.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
OUT=${2:-benches/results/callgrind.out}
MESH=${MESH:-}
command -v valgrind >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
source benches/lib.sh
bench_init
[ -z "$MESH" ] || [ -n "${NOBUILD:-}" ] || cargo build --release --locked -q -p weft-control-plane
start_backends

# Starts weft-proxy with config $w/$1.toml under callgrind (profile $2); waits
# for its bound file.
start_profiled() {
  rm -f "$2" "$2".*
  WEFT_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$2" --dump-instr=no \
    "$bin/weft-proxy" run --config "$w/$1.toml" --bound-file "$w/$1.json" 2> "$w/$1.valgrind.log" &
  pids+=($!)
  for _ in $(seq 600); do [ -s "$w/$1.json" ] && return; sleep 0.1; done
  echo "$1 did not start:" >&2; cat "$w/$1.valgrind.log" >&2; exit 1
}
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

listen='[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
admin = "127.0.0.1:0"'
if [ -z "$MESH" ]; then
  write_weft_config
  mv "$w/weft.toml" "$w/hop.toml"
  start_profiled hop "$OUT"
  profiles=("$OUT")
  out=$(field "$w/hop.json" outbound)
else
  tls_callee="" tls_caller="" mode=""
  if [ "$MESH" = mtls ]; then
    "$bin/weftctl" certs ca --out "$w/certs" >/dev/null
    for id in bench load; do "$bin/weftctl" certs issue "$id" --ca "$w/certs" --out "$w/certs" >/dev/null; done
    tls_callee=$'[tls]\nca = "certs/ca.pem"\ncert = "certs/bench.pem"\nkey = "certs/bench-key.pem"'
    tls_caller=$'[tls]\nca = "certs/ca.pem"\ncert = "certs/load.pem"\nkey = "certs/load-key.pem"'
    mode='tls = "mesh"'
  elif [ "$MESH" != plain ]; then
    echo "MESH is plain or mtls, not $MESH" >&2; exit 2
  fi
  printf '[service]\nname = "bench"\napp = "%s"\n%s\n%s\n' "$b1" "$listen" "$tls_callee" > "$w/callee.toml"
  start_profiled callee "$OUT.callee"
  printf '%s\n%s\n[[directory.services]]\nname = "bench"\n%s\nendpoints = [ { address = "%s" } ]\n' \
    "$listen" "$tls_caller" "$mode" "$(field "$w/callee.json" inbound)" > "$w/caller.toml"
  start_profiled caller "$OUT.caller"
  profiles=("$OUT.caller" "$OUT.callee")
  out=$(field "$w/caller.json" outbound)
fi

"$bin/weft-load" --target "$out" --connections 4 --duration 3 --warmup 0 --label warm-up > /dev/null
callgrind_control -z > /dev/null 2>&1
n=$("$bin/weft-load" --target "$out" --connections 4 --duration "$SECS" --warmup 0 --label prof | tail -1 |
  python3 -c "import json,sys; print(json.load(sys.stdin)['finished_all'])")
callgrind_control -d > /dev/null 2>&1
total=0
for p in "${profiles[@]}"; do
  for _ in $(seq 100); do grep -qs '^summary:' "$p".1 && break; sleep 0.1; done
  ir=$(grep '^summary:' "$p".1 | awk '{print $2}')
  total=$((total + ir))
  echo "$n requests, $ir instructions: $((ir / n)) user-space instructions per request (profile: $p.1)"
done
if [ ${#profiles[@]} -gt 1 ]; then
  echo "both sidecars: $((total / n)) user-space instructions per request"
fi
