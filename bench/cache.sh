#!/usr/bin/env bash
# The frontend cache's hit ratio while books are bought: lookups through the edge over a
# few hot books, alone and then with buys of the same books running beside them, on a fresh
# store. Prints lookups/s, buys/s and the hit ratio the frontends report. QUIRE chooses the
# binary, so two builds can be compared in one sitting (see bench/README.md).
#
#   bench/cache.sh                          # target/release/quire, 20 books, 10 s per run
#   QUIRE=/elsewhere/quire BOOKS=20 DURATION=10s bench/cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
BOOKS=${BOOKS:-20}
export BOOKS
QUIRE=${QUIRE:-$PWD/target/release/quire}
for tool in wrk jq curl; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install wrk jq curl)" >&2; exit 1; }
done
[ -x "$QUIRE" ] || cargo build --release --bin quire 2>&1 | tail -1
. bench/lib.sh
start_store "$BOOKS" 100000000
EDGE=$(status | jq -r '.servers[] | select(.name == "edge") | .url')
FRONTENDS=$(status | jq -r '.servers[] | select(.tier == "frontend") | .url')
for i in $(seq 1 "$BOOKS"); do curl -sf "$EDGE/lookup/$i" >/dev/null; done

# Hits and misses summed over the frontends.
counts() {
  for f in $FRONTENDS; do curl -sf "$f/status"; done | jq -s '[(map(.details.cache_hits) | add), (map(.details.cache_misses) | add)]'
}
rate() { awk '/Requests\/sec/ {print $2}' <<<"$1"; }
ratio() { # before, after: the hit ratio between two counts
  jq -n --argjson a "$1" --argjson b "$2" '($b[0] - $a[0]) as $h | ($b[1] - $a[1]) as $m | if $h + $m == 0 then 0 else ($h / ($h + $m) * 1000 | round / 10) end'
}

before=$(counts)
alone=$(wrk -t1 -c32 -d"$DURATION" -s bench/lookup_many.lua "$EDGE")
after=$(counts)
alone_ratio=$(ratio "$before" "$after")

before=$(counts)
wrk -t1 -c8 -d"$DURATION" -s bench/buy.lua "$EDGE" > "$TMP/buys.txt" &
BUYS=$!
mixed=$(wrk -t1 -c32 -d"$DURATION" -s bench/lookup_many.lua "$EDGE")
wait "$BUYS"
after=$(counts)
mixed_ratio=$(ratio "$before" "$after")

echo "cache under buys: $("$QUIRE" --version), $BOOKS books, wrk $DURATION, $(nproc) cores"
printf '%-44s %12s %10s\n' "run" "requests/s" "hit ratio"
printf '%-44s %12s %9s%%\n' "lookups alone (edge, c32)" "$(rate "$alone")" "$alone_ratio"
printf '%-44s %12s %9s%%\n' "lookups while buying (edge, c32)" "$(rate "$mixed")" "$mixed_ratio"
printf '%-44s %12s %10s\n' "  buys beside them (edge, c8)" "$(rate "$(cat "$TMP/buys.txt")")" ""
