#!/usr/bin/env bash
# Benchmarks a local quire store with wrk and compares it with two baselines: a bare axum
# handler returning the same JSON as a cached lookup, and a 3-member etcd cluster (fsync on)
# taking puts at the same concurrencies as the buys (64, 16, 1) and linearizable reads on a
# follower. Prints one table; see bench/README.md.
#
#   bench/run.sh                 # 10 s per run, 64 connections
#   DURATION=30s CONNS=64 bench/run.sh
#   QUIRE=/elsewhere/quire bench/run.sh   # another build of quire against the same anchors
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
for tool in wrk etcd jq curl; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install wrk etcd-server jq curl)" >&2; exit 1; }
done

cargo build --release --bin quire --example bare_axum 2>&1 | tail -1
# QUIRE chooses the binary under test (another build, to compare two in one sitting).
QUIRE=${QUIRE:-$PWD/target/release/quire}
. bench/lib.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# 1000 books with stock enough for every buy of the run.
start_store 1000 100000000
url_of() { status | jq -r --arg n "$1" '.servers[] | select(.name == $n) | .url'; }
EDGE=$(url_of edge); FRONTEND=$(url_of frontend-1); CATALOG_BALANCER=$(url_of catalog-balancer-1)

"$PWD/target/release/examples/bare_axum" "127.0.0.1:$(free_port)" > "$TMP/baseline.addr" &
also_stop $!
for _ in $(seq 1 50); do [ -s "$TMP/baseline.addr" ] && break; sleep 0.1; done
BASELINE="http://$(cat "$TMP/baseline.addr")"
BASELINE_PID=$!
QUIRE_PIDS=$(status | jq -r '.servers[].pid' | tr '\n' ' ')

# Warm the caches.
for i in $(seq 1 5); do curl -sf "$FRONTEND/lookup/1" >/dev/null; curl -sf "$EDGE/lookup/1" >/dev/null; done

# CPU time (utime + stime, proc(5)) of the processes in METER, in clock ticks.
HZ=$(getconf CLK_TCK)
ticks() {
  local total=0 pid
  for pid in $METER; do total=$(( total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0) )); done
  echo "$total"
}

RESULTS=()
run() { # name, url, [script]: the better of two runs (this machine's rates vary run to run)
  local name=$1 url=$2 script=${3:-}
  local conns=${C:-$CONNS}
  local args=(-t "$(( THREADS < conns ? THREADS : conns ))" -c "$conns" -d "$DURATION" --latency)
  [ -n "$script" ] && args+=(-s "$script")
  local out first second before cpu
  before=$(ticks)
  first=$(wrk "${args[@]}" "$url"); second=$(wrk "${args[@]}" "$url")
  # CPU per request over both runs: what the metered servers burned, wrk not counted.
  cpu=$(awk -v t="$(( $(ticks) - before ))" -v hz="$HZ" \
    -v n="$(awk '/requests in/ {s += $1} END {print s}' <<<"$first"$'\n'"$second")" \
    'BEGIN {printf "%.3f", (n > 0 ? t / hz * 1000 / n : 0)}')
  if awk -v a="$(awk '/Requests\/sec/ {print $2}' <<<"$first")" -v b="$(awk '/Requests\/sec/ {print $2}' <<<"$second")" 'BEGIN {exit !(a >= b)}'; then
    out=$first
  else
    out=$second
  fi
  local rps p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  RESULTS+=("$(printf '%-34s %12s %10s %8s  %s' "$name" "$rps" "$p99" "$cpu" "$errors")")
  echo "done: $name ($rps rps)" >&2
}

METER=$BASELINE_PID run "bare axum, same JSON (baseline)" "$BASELINE/lookup/1"
METER=$QUIRE_PIDS
run "cached lookup, one frontend" "$FRONTEND/lookup/1"
run "lookup through the edge" "$EDGE/lookup/1"
PREFIX=/books run "uncached linearizable lookup" "$CATALOG_BALANCER" bench/lookup_many.lua
run "buy through the edge" "$EDGE" bench/buy.lua
C=16 run "buy through the edge, c16" "$EDGE" bench/buy.lua
C=1 run "buy through the edge, c1" "$EDGE" bench/buy.lua
# A 3-member etcd cluster on loopback, fsync on (etcd's default), started only now so its
# start-up work does not load the machine during the quire runs.
ETCD_CLUSTER=""
ETCD_PIDS=""
declare -a ETCD_CLIENT
for i in 1 2 3; do
  peer=$(free_port); ETCD_CLIENT[$i]=$(free_port)
  eval "ETCD_PEER_$i=$peer"
  ETCD_CLUSTER+="e$i=http://127.0.0.1:$peer,"
done
for i in 1 2 3; do
  peer_var="ETCD_PEER_$i"
  etcd --name "e$i" --data-dir "$TMP/etcd$i" --log-level error \
    --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${!peer_var}" --initial-advertise-peer-urls "http://127.0.0.1:${!peer_var}" \
    --initial-cluster "${ETCD_CLUSTER%,}" --initial-cluster-state new >"$TMP/etcd$i.log" 2>&1 &
  also_stop $!
  ETCD_PIDS+="$! "
done
METER=$ETCD_PIDS
ETCD="http://127.0.0.1:${ETCD_CLIENT[1]}"
for _ in $(seq 1 100); do curl -sf "$ETCD/health" | grep -q true && break; sleep 0.2; done

run "etcd 3 members, put (fsync)" "$ETCD" bench/etcd_put.lua
C=16 run "etcd put, c16" "$ETCD" bench/etcd_put.lua
C=1 run "etcd put, c1" "$ETCD" bench/etcd_put.lua
# A linearizable range (etcd's default) on a follower: the anchor of the uncached lookup.
ETCD_LEADER=$(curl -sf -X POST "$ETCD/v3/maintenance/status" -d '{}' | jq -r .leader)
for i in 1 2 3; do
  member=$(curl -sf -X POST "http://127.0.0.1:${ETCD_CLIENT[$i]}/v3/maintenance/status" -d '{}' | jq -r .header.member_id)
  if [ "$member" != "$ETCD_LEADER" ]; then ETCD_FOLLOWER="http://127.0.0.1:${ETCD_CLIENT[$i]}"; break; fi
done
run "etcd linearizable range, follower" "$ETCD_FOLLOWER" bench/etcd_range.lua

echo
echo "quire benchmark: wrk -t$THREADS -c$CONNS -d$DURATION on $(nproc) cores"
printf '%-34s %12s %10s %8s  %s\n' "what" "requests/s" "p99" "CPU ms" "notes"
printf '%s\n' "${RESULTS[@]}"
echo
echo "resident memory after the runs:"
status | jq -r '.servers[] | "\(.name) \(.pid)"' | while read -r name pid; do
  printf '  %-20s %6s MB\n' "$name" "$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status" 2>/dev/null)"
done
