#!/usr/bin/env bash
# Data-plane macro bench: the same work direct, through one Weft sidecar hop,
# through the Weft mesh path (caller sidecar -> server sidecars), through nginx
# and through HAProxy, in turns (A B C D E, A B C D E, ...).
#
# Usage: benches/data-plane.sh [ROUNDS=5] [SECONDS=10] [CONNECTIONS=16,64,256]
#   TARGETS=weft,haproxy benches/data-plane.sh ...   only some paths
#   RATES=1000,2000,5000                             open-loop rates
#
# Installs nginx and HAProxy from Debian when missing (as root), builds the
# release binaries, pins every proxy to CPU 0 and the load generator and the
# three backends to CPU 1, and writes benches/results/data-plane.{json,md}
# and the SVG plots (benches/plot.py).
# See benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SECS=${2:-10}
CONNS=${3:-16,64,256}

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No service is started: the bench runs its own instances on loopback.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

cargo build --release --locked -q -p weft-proxy -p weft-benches -p weft-control-plane
bin=${CARGO_TARGET_DIR:-target}/release
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)" >&2
exec python3 benches/harness.py --bin "$bin" --out benches/results data-plane \
  --rounds "$ROUNDS" --seconds "$SECS" --connections "$CONNS" \
  --rates "${RATES:-1000,2000,5000}" --targets "${TARGETS:-}"
