#!/usr/bin/env bash
# Failover under buys: kill -9 each Raft group's leader, KILLS times, while buyers and
# readers run through the edge; prints how long buys stopped each time, elections per kill,
# failed requests, and checks that every acknowledged buy is still there (see
# bench/failover.py and bench/README.md, "Failover").
#
#   bench/failover.sh                   # 4 kills per group, 16 buyers, 4 readers
#   KILLS=2 FAILOVER_GROUPS=order bench/failover.sh
#   QUIRE=/path/to/other/quire bench/failover.sh        # another build
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need jq python3
build_quire
start_store 100 100000000
EDGE=$(status | jq -r '.servers[] | select(.name == "edge") | .url')
python3 bench/failover.py "$QUIRE" "$TMP/store" "$EDGE"
