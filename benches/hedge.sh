#!/usr/bin/env bash
# Hedged requests against a slow tail: open-loop p50/p99/p99.9 through one
# sidecar to three backends, one of which answers every 10th request it gets
# 100 ms late, without hedging, with `hedge = { after = "10ms" }` and with
# `hedge = { after = "p95" }` (a fresh sidecar per case, default retry budget).
#
# Usage: benches/hedge.sh [RATE=500] [SECONDS=20]
#   NOBUILD=1      use the binaries already built
#   PROFILE=debug  the debug binaries (default release)
#
# About a minute and a half. Writes benches/results/hedge.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-500}
SECS=${2:-20}
PROFILE=${PROFILE:-release}
if [ -z "${NOBUILD:-}" ]; then
  if [ "$PROFILE" = release ]; then release=--release; else release=; fi
  cargo build $release --locked -q -p weft-proxy -p weft-benches --bins
fi
bin=${CARGO_TARGET_DIR:-target}/$PROFILE
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)" >&2
exec python3 benches/harness.py --bin "$bin" --out benches/results hedge --rate "$RATE" --seconds "$SECS"
