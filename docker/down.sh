#!/usr/bin/env bash
# Stops the store and removes its containers and network; the data volumes are kept unless
# you pass -v (docker/down.sh -v).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# --remove-orphans: also the autoscaler's containers (and the autoscaler, if started with
# --cloud-sim), which carry the project's label but are not in compose.yaml.
QUIRE_TOKEN=${QUIRE_TOKEN:-unused} "$here/compose.sh" down --remove-orphans "$@"
