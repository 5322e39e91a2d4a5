#!/usr/bin/env bash
# Soak: a steady open-loop rate through the Weft mesh path (caller sidecar ->
# server sidecars -> backends) for MINUTES, with an instance leaving and another
# joining every CHURN seconds; errors, latency and every sidecar's RSS each minute,
# and the drift after the first minute.
#
# Usage: benches/soak.sh [MINUTES=30] [RATE=2000] [CHURN_SECONDS=10]
# Writes benches/results/soak.{json,md}; exits non-zero if any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
RATE=${2:-2000}
CHURN=${3:-10}
cargo build --release --locked -q -p weft-proxy -p weft-benches
bin=${CARGO_TARGET_DIR:-target}/release
exec python3 benches/harness.py --bin "$bin" --out benches/results soak \
  --minutes "$MINUTES" --rate "$RATE" --churn-every "$CHURN"
