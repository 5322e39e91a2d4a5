#!/usr/bin/env bash
# Adaptive concurrency bench: two instances of bounded capacity behind one
# caller sidecar, open-loop load, one instance's capacity halves mid-run; a
# static per-endpoint cap set for the healthy capacity, then at twice that,
# then an adaptive limit. About 3 minutes.
#
# Usage: benches/adaptive.sh [RATE=1000]
#   LB=p2c-ewma benches/adaptive.sh    another load balancer (default round-robin)
#
# Builds the release binaries, pins the sidecar to CPU 0 and the load
# generator and the backends to CPU 1, and writes
# benches/results/adaptive.{json,md}. See benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1000}
cargo build --release --locked -q -p weft-proxy -p weft-benches --bin weft-proxy --bin weft-bench-backend --bin weft-load
bin=${CARGO_TARGET_DIR:-target}/release
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)" >&2
exec python3 benches/adaptive.py --bin "$bin" --out benches/results \
  --rate "$RATE" --load-balancer "${LB:-round-robin}"
