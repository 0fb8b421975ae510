#!/usr/bin/env bash
# From a clean checkout: build the binary and the image, then start the store.
# The edge listens on host port ${QUIRE_EDGE_PORT:-8080}; the cluster token is kept in
# docker/.token (made on first use) and passed to every container.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
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
    exit 0
  fi
  sleep 0.5
done
echo "quire did not answer on port $port within 60 s; see: docker/compose.sh logs" >&2
exit 1
