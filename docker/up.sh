#!/usr/bin/env bash
# From a clean checkout: build the binary and the image, then start the store.
# The edge listens on host port ${QUIRE_EDGE_PORT:-8080}; the cluster token is kept in
# docker/.token (made on first use) and passed to every container.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# --cloud-sim: servers under the simulated cloud's capacity, and the autoscaler container
# (docker/compose.cloud-sim.yaml); the same as QUIRE_CLOUD_SIM=1.
for arg in "$@"; do
  case "$arg" in
    --cloud-sim) export QUIRE_CLOUD_SIM=1 ;;
    *) echo "usage: docker/up.sh [--cloud-sim]" >&2; exit 2 ;;
  esac
done
"$here/build.sh"
if [ -z "${QUIRE_TOKEN:-}" ]; then
  [ -s "$here/.token" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$here/.token"
  QUIRE_TOKEN=$(cat "$here/.token")
fi
export QUIRE_TOKEN
"$here/compose.sh" up -d
port=${QUIRE_EDGE_PORT:-8080}
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/lookup/1" >/dev/null 2>&1; then
    echo "quire is up at http://127.0.0.1:$port"
    if [ "${QUIRE_CLOUD_SIM:-}" = 1 ]; then
      echo "autoscaler status at http://127.0.0.1:${QUIRE_AUTOSCALER_PORT:-8081}/status"
    fi
    exit 0
  fi
  sleep 0.5
done
echo "quire did not answer on port $port within 60 s; see: docker/compose.sh logs" >&2
exit 1
