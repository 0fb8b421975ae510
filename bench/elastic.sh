#!/usr/bin/env bash
# The elastic-tiers benchmark (issue 4): for each autoscaling policy, a fresh
# `quire up --profile cloud-sim --policy P` under `quire load --profile SPEC`, then the same
# profile and seed in `quire simulate`. Prints one table (unhappy clients, server-seconds,
# ratio to the oracle) and leaves every report (JSON) and chart (SVG) in OUT.
#
#   bench/elastic.sh                                  # every policy, the default profile
#   PROFILE=diurnal-40-120s POLICIES="default hpa" OUT=/tmp/e bench/elastic.sh
#   LIVE=0 bench/elastic.sh                           # simulator only (seconds, not minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-diurnal-40-180s,c-60-15s,diurnal-40-60s}
POLICIES=${POLICIES:-default hpa rate queue}
SEED=${SEED:-1}
LIVE=${LIVE:-1}
MAX_SERVERS=${MAX_SERVERS:-24}
OUT=${OUT:-bench/elastic-out}
command -v jq >/dev/null || { echo "bench needs jq (apt-get install jq)" >&2; exit 1; }

cargo build --release --bin quire 2>&1 | tail -1
QUIRE=$PWD/target/release/quire
mkdir -p "$OUT"
UP=
cleanup() { [ -n "$UP" ] && kill "$UP" 2>/dev/null && wait "$UP" 2>/dev/null || true; }
trap cleanup EXIT

for policy in $POLICIES; do
  if [ "$LIVE" = 1 ]; then
    data=$(mktemp -d)
    "$QUIRE" up --profile cloud-sim --policy "$policy" --max-servers "$MAX_SERVERS" --port 0 \
      --restock-amount 1000 --data-dir "$data" >/dev/null 2>&1 &
    UP=$!
    for _ in $(seq 1 120); do
      edge=$(jq -r '.servers[] | select(.name == "edge") | .url' "$data/store.json" 2>/dev/null || true)
      fleet=$(jq -r '.autoscaler // empty' "$data/store.json" 2>/dev/null || true)
      if [ -n "$edge" ] && [ -n "$fleet" ] && curl -sf "$edge/lookup/1" >/dev/null; then break; fi
      sleep 0.5
    done
    "$QUIRE" load --target "$edge" --fleet "$fleet/status" --profile "$PROFILE" --seed "$SEED" \
      --json --chart "$OUT/live-$policy.svg" > "$OUT/live-$policy.json"
    kill "$UP"; wait "$UP" 2>/dev/null || true; UP=
    rm -rf "$data"
  fi
  "$QUIRE" simulate --policy "$policy" --profile "$PROFILE" --seed "$SEED" \
    --json --chart "$OUT/sim-$policy.svg" > "$OUT/sim-$policy.json"
done

echo "profile $PROFILE, seed $SEED"
printf '%-8s %-5s %8s %10s %8s %8s %8s\n' policy run clients unhappy% server-s oracle ratio
for policy in $POLICIES; do
  for run in live sim; do
    f="$OUT/$run-$policy.json"
    [ -f "$f" ] || continue
    jq -r --arg p "$policy" --arg r "$run" \
      '"\($p) \($r) \(.clients) \(.unhappy_pct*100|round/100) \(.server_seconds.total|round) \(.oracle_server_seconds.total|round) \(.ratio_to_oracle*100|round/100)"' "$f" |
      xargs printf '%-8s %-5s %8s %10s %8s %8s %8s\n'
  done
done
