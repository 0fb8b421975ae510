#!/usr/bin/env bash
# Where a buy's time goes, hop by hop: a store under buys through the edge (wrk, like
# bench/run.sh), every server's span timings (`quire_span_seconds` in /metrics, see
# common/src/timings.rs) read before and after, and what each span costs one buy: how many
# times it runs per buy, its mean duration, and its time per buy. Spans nest (the edge's
# `forward` holds the whole buy), so rows are not to be added up across servers; a row's
# time is wall time, waits included. See bench/README.md, "Where a buy's time goes".
#
#   bench/spans.sh                      # 64 connections, 10 s measured
#   CONNS=16 DURATION=20 bench/spans.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
. bench/lib.sh
need wrk jq curl python3
build_quire
start_store 1000 100000000
status > "$TMP/status.json"
EDGE=$(jq -r '.servers[] | select(.name == "edge") | .url' "$TMP/status.json")

scrape() { # DIR: every server's /metrics, one file per server name; CPU ticks in DIR.cpu
  mkdir -p "$1"
  jq -r '.servers[] | "\(.name) \(.url) \(.pid)"' "$TMP/status.json" | while read -r name url pid; do
    curl -sf "$url/metrics" > "$1/$name" || true
    # utime + stime of the server's process, in clock ticks (proc(5), fields 14 and 15).
    echo "$name $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)" >> "$1.cpu"
  done
  # The whole machine's busy and total ticks (proc(5), the first line of /proc/stat).
  awk '/^cpu / {print "machine", $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat >> "$1.cpu"
}

# Warm up (connections, caches, the first elections' aftermath), then measure.
wrk -t1 -c"$CONNS" -d3s -s bench/buy.lua "$EDGE" >/dev/null
scrape "$TMP/before"
wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s bench/buy.lua "$EDGE" > "$TMP/wrk.txt"
scrape "$TMP/after"
status > "$TMP/status-after.json"

echo "buys through the edge, wrk -t1 -c$CONNS -d${DURATION}s: $(awk '/Requests\/sec/ {print $2}' "$TMP/wrk.txt")/s," \
  "p50 $(awk '$1 == "50%" {print $2}' "$TMP/wrk.txt"), p99 $(awk '$1 == "99%" {print $2}' "$TMP/wrk.txt"); $(nproc) cores"
python3 - "$TMP" <<'EOF'
import json, os, re, sys
tmp = sys.argv[1]
servers = json.load(open(f"{tmp}/status.json"))["servers"]
series = re.compile(r'^quire_span_seconds_(sum|count)\{server="([^"]*)".*span="((?:[^"\\]|\\.)*)"\} (\S+)$')
def read(d):
    out = {}
    for name in os.listdir(d):
        for line in open(os.path.join(d, name)):
            m = series.match(line.strip())
            if m:
                kind, server, span, value = m.groups()
                out.setdefault((server, span), {})[kind] = float(value)
    return out
before, after = read(f"{tmp}/before"), read(f"{tmp}/after")
def delta(key, kind):
    return after.get(key, {}).get(kind, 0.0) - before.get(key, {}).get(kind, 0.0)
buys = delta(("edge", "forward edge work"), "count")
if buys <= 0:
    sys.exit("the edge served no buys while measured")
role = {s["name"]: s.get("role", "") for s in servers}
def label(server):
    r = role.get(server, "")
    return f"{server} ({r})" if r in ("leader", "follower", "learner") else server
rows = []
for key in sorted(after):
    count, total = delta(key, "count"), delta(key, "sum")
    # Heartbeats, status polls and lease renewals run whether or not anyone buys: shown only
    # when they are a visible part of a buy's cost.
    if count <= 0 or key[1].startswith(("serve GET /status", "serve GET /metrics")):
        continue
    rows.append((label(key[0]), key[1], count / buys, total / count * 1e3, total / buys * 1e3))
def terms(path):
    out = {}
    for s in json.load(open(path))["servers"]:
        if s["tier"] in ("catalog", "order"):
            out[s["tier"]] = max(out.get(s["tier"], 0), s.get("term", 0))
    return out
t0, t1 = terms(f"{tmp}/status.json"), terms(f"{tmp}/status-after.json")
elections = ", ".join(f"{g} {t1[g] - t0[g]}" for g in sorted(t0))
print(f"{int(buys)} buys measured (the edge's own count); elections from start to end: {elections}\n")
print(f"{'server':<24} {'span':<44} {'per buy':>8} {'mean ms':>9} {'ms per buy':>11}")
for server, span, per, mean, per_buy in sorted(rows, key=lambda r: (r[0], -r[4])):
    if per < 0.005:
        continue
    print(f"{server:<24} {span:<44} {per:>8.2f} {mean:>9.2f} {per_buy:>11.2f}")

# CPU: what each server's process burned per buy, and how busy the machine was.
hz = os.sysconf("SC_CLK_TCK")
def cpu(path):
    out = {}
    for line in open(path):
        name, *ticks = line.split()
        out[name] = [float(t) for t in ticks]
    return out
c0, c1 = cpu(f"{tmp}/before.cpu"), cpu(f"{tmp}/after.cpu")
busy, total = (c1["machine"][i] - c0["machine"][i] for i in (0, 1))
print(f"\nCPU per buy (ms; the machine was {busy / total * 100:.0f} % busy while measured, wrk included)")
spent = {n: (c1[n][0] - c0[n][0]) / hz * 1e3 / buys for n in c0 if n != "machine" and n in c1}
for name, ms in sorted(spent.items(), key=lambda kv: -kv[1]):
    print(f"{label(name):<24} {ms:>6.3f}")
print(f"{'all servers':<24} {sum(spent.values()):>6.3f}")
EOF
