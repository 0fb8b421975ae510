#!/usr/bin/env bash
# Runs Docker Compose whichever way this machine has it: `docker compose` (the plugin) or
# `docker-compose` (the standalone tool, e.g. Debian's 1.29), on docker/compose.yaml.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if docker compose version >/dev/null 2>&1; then
  exec docker compose -f "$here/compose.yaml" -p "${QUIRE_PROJECT:-quire}" "$@"
elif command -v docker-compose >/dev/null; then
  exec docker-compose -f "$here/compose.yaml" -p "${QUIRE_PROJECT:-quire}" "$@"
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
