#!/usr/bin/env bash
# Where a buy's time goes: a store under buys through the edge (wrk, like bench/run.sh), a
# system-wide CPU profile (perf record) over the middle of the run, and the syncs to disk
# each server makes. Prints the CPU share of every server and of wrk, what the two group
# leaders spend their CPU on (grouped: SQLite, JSON, HTTP, the kernel, ...), their hottest
# functions, and each server's fsyncs per buy. See bench/README.md, "Where a buy's time goes".
#
#   bench/profile.sh                    # 64 connections, 10 s profiled, then 5 s traced
#   CONNS=16 bench/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-64}
PROFILE=${PROFILE:-10}
TRACE=${TRACE:-5}
DURATION=$((PROFILE + TRACE + 8))
for tool in wrk jq curl perf; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool (apt-get install wrk jq curl linux-perf)" >&2; exit 1; }
done
cargo build --release --bin quire 2>&1 | tail -1
QUIRE=$PWD/target/release/quire
. bench/lib.sh
start_store 1000 100000000
status > "$TMP/status.json"
EDGE=$(jq -r '.servers[] | select(.name == "edge") | .url' "$TMP/status.json")
pid_of() { jq -r --arg n "$1" '.servers[] | select(.name == $n) | .pid' "$TMP/status.json"; }
leader_of() { jq -r --arg t "$1" '[.servers[] | select(.tier == $t and .role == "leader")][0].name' "$TMP/status.json"; }
CATALOG_LEADER=$(leader_of catalog); ORDER_LEADER=$(leader_of order)

# The edge's request count: every request it serves here is a buy.
served() { curl -sf "$EDGE/status" | jq '.details.requests'; }
wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s bench/buy.lua "$EDGE" > "$TMP/wrk.txt" &
WRK=$!
sleep 4
# First the CPU profile, then (apart: tracing every write slows the store) the syscalls.
b0=$(served)
perf record -a -F 499 -o "$TMP/perf.data" -- sleep "$PROFILE" >/dev/null 2>&1
b1=$(served)
perf record -a -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync \
  -e syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg \
  -o "$TMP/syncs.data" -- sleep "$TRACE" >/dev/null 2>&1
b2=$(served)
wait "$WRK"
RATE=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk.txt")
name_of() { jq -r --argjson p "$1" '.servers[] | select(.pid == $p) | .name' "$TMP/status.json"; }
BUYS_PROFILED=$((b1 - b0)); BUYS_TRACED=$((b2 - b1))

echo "buys through the edge, wrk -t1 -c$CONNS: $RATE/s, p99 $(awk '$1 == "99%" {print $2}' "$TMP/wrk.txt"); $(nproc) cores"
echo "buys while profiled: $BUYS_PROFILED in $PROFILE s; while traced: $BUYS_TRACED in $TRACE s"
echo
echo "per buy: syncs to disk (fsync + fdatasync), and writes to sockets and files"
echo "(write, writev, sendto, sendmsg: about one per HTTP request or answer a server sends, plus log writes)"
printf '  %-22s %8s %8s\n' "server" "syncs" "writes"
perf script -i "$TMP/syncs.data" -F pid,event 2>/dev/null |
  awk '{kind = ($2 ~ /sync/) ? "s" : "w"; n[$1 " " kind]++; pids[$1] = 1}
       END {for (p in pids) print n[p " w"] + 0, n[p " s"] + 0, p}' | sort -rn |
  while read -r writes syncs pid; do
    name=$(name_of "$pid")
    [ -z "$name" ] && continue
    printf '  %-22s %8.2f %8.2f\n' "$name" \
      "$(awk -v c="$syncs" -v b="$BUYS_TRACED" 'BEGIN {print c / b}')" \
      "$(awk -v c="$writes" -v b="$BUYS_TRACED" 'BEGIN {print c / b}')"
  done

# CPU share per process (samples of every CPU; idle is the kernel's swapper).
echo
echo "CPU share over ${PROFILE} s (100% = both cores busy):"
perf script -i "$TMP/perf.data" -F pid,comm 2>/dev/null | awk '{n[$NF " " $1]++; t++} END {for (k in n) printf "%.1f %s\n", 100 * n[k] / t, k}' |
  sort -rn > "$TMP/pids.txt"
declare -A SHARE
while read -r share pid comm; do
  name=$(name_of "$pid")
  if [ -z "$name" ]; then
    case $comm in swapper) name="idle" ;; wrk) name="wrk" ;; *) name="other" ;; esac
  fi
  SHARE[$name]=$(awk -v a="${SHARE[$name]:-0}" -v b="$share" 'BEGIN {print a + b}')
done < "$TMP/pids.txt"
for name in "${!SHARE[@]}"; do printf '  %-22s %6.1f%%\n' "$name" "${SHARE[$name]}"; done | sort -k2 -rn
busy=$(awk -v i="${SHARE[idle]:-0}" 'BEGIN {print 100 - i}')
echo "CPU per buy: $(awk -v u="$busy" -v c="$(nproc)" -v p="$PROFILE" -v b="$BUYS_PROFILED" \
  'BEGIN {printf "%.2f", u / 100 * c * p * 1000 / b}') ms (all servers and wrk; ${busy}% of $(nproc) cores)"

# What a leader's CPU goes to, by the library each function comes from.
groups() {
  perf report -i "$TMP/perf.data" --pid "$1" --sort dso,sym --stdio 2>/dev/null | awk '
    $1 ~ /%$/ {
      share = $1; sub(/%/, "", share); line = $0
      group = "other (quire, std, ...)"
      if (line ~ /\[kernel/ || line ~ /\[k\]/) group = "kernel (syscalls, TCP, fs)"
      else if (line ~ /sqlite|Vdbe|vdbe|btree|Btree|pager|Pager|pcache|yy_|wal[A-Z]|fts5|Fts5/) group = "SQLite"
      else if (line ~ /serde_json|serde::|Serialize|Deserialize|ryu|itoa/) group = "JSON (serde)"
      else if (line ~ /hyper|h1|http::|httparse|reqwest|axum|tower/) group = "HTTP (hyper, axum, reqwest)"
      else if (line ~ /tokio|mio|parking_lot|futures/) group = "tokio runtime"
      else if (line ~ /openraft/) group = "openraft"
      else if (line ~ /malloc|free|realloc|_int_|memcpy|memmove|memset|libc/) group = "malloc, memcpy (libc)"
      total[group] += share; sum += share
    }
    END { for (g in total) printf "%.1f\t%s\n", 100 * total[g] / sum, g }' | sort -rn |
    awk -F'\t' '{printf "    %-30s %5.1f%%\n", $2, $1}'
}
hottest() {
  perf report -i "$TMP/perf.data" --pid "$1" --percentage relative --sort sym --stdio 2>/dev/null | awk '$1 ~ /%$/' | head -"$2" |
    awk '{share = $1; $1 = ""; $2 = ""; printf "    %6s %s\n", share, substr($0, 1, 90)}' || true
}
for leader in "$CATALOG_LEADER" "$ORDER_LEADER"; do
  echo
  echo "$leader (leader): its CPU by library"
  groups "$(pid_of "$leader")"
  echo "  hottest functions (share of the process's samples):"
  hottest "$(pid_of "$leader")" 12
done
