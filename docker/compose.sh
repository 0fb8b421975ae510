#!/usr/bin/env bash
# Runs Docker Compose whichever way this machine has it: `docker compose` (the plugin) or
# `docker-compose` (the standalone tool, e.g. Debian's 1.29), on docker/compose.yaml.
set -euo pipefail
# QUIRE_COMPOSE_OVERRIDE names an extra compose file layered on top (tests use one).
here="$(cd "$(dirname "$0")" && pwd)"
files=(-f "$here/compose.yaml")
# QUIRE_CLOUD_SIM=1 adds compose.cloud-sim.yaml: cloud-sim servers and the autoscaler container.
[ "${QUIRE_CLOUD_SIM:-}" = 1 ] && files+=(-f "$here/compose.cloud-sim.yaml")
[ -n "${QUIRE_COMPOSE_OVERRIDE:-}" ] && files+=(-f "$QUIRE_COMPOSE_OVERRIDE")
if docker compose version >/dev/null 2>&1; then
  exec docker compose "${files[@]}" -p "${QUIRE_PROJECT:-quire}" "$@"
elif command -v docker-compose >/dev/null; then
  exec docker-compose "${files[@]}" -p "${QUIRE_PROJECT:-quire}" "$@"
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
