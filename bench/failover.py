#!/usr/bin/env python3
"""How long buys stop when a Raft group's leader is killed (run by bench/failover.sh).

Usage: failover.py QUIRE DATA_DIR EDGE_URL

Buyers (`BUYERS`, 16 by default) and readers (`READERS`, 4) run against the edge the whole
time, each on one keep-alive connection; every buy has a key of its own and a 10 s deadline,
so a buy caught by an election waits for the new leader instead of failing. Then, for each
group in `FAILOVER_GROUPS` ("catalog order"), `KILLS` times (4): find the group's leader in
`quire status`, kill -9 it, and measure the time from the kill to the first buy that was
*sent after the kill* and acknowledged (it needed a write in both groups, so the killed
group's write was committed by its new leader). `quire up` restarts the killed server;
the next kill waits until all servers are ready again and buys flow.

At the end: the median and every failover time per group, every buy's and lookup's
outcome (anything but 200 is counted as failed), elections (the term's growth over the run)
against kills, and every acknowledged order read back through the edge (a lost one is
printed and fails the run).
"""

import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

QUIRE, DATA, EDGE = sys.argv[1], sys.argv[2], sys.argv[3]
GROUPS = os.environ.get("FAILOVER_GROUPS", "catalog order").split()
KILLS = int(os.environ.get("KILLS", "4"))
BUYERS = int(os.environ.get("BUYERS", "16"))
READERS = int(os.environ.get("READERS", "4"))
BOOKS = int(os.environ.get("BOOKS", "100"))
EDGE_HOST = urllib.parse.urlparse(EDGE)
RUN = f"failover-{os.getpid()}-{time.time_ns()}"

stop = threading.Event()
buys = []  # (sent, answered, status, order_id)
lookups = []  # (sent, answered, status)
lock = threading.Lock()


def status():
    out = subprocess.run([QUIRE, "status", "--json", "--data-dir", DATA], capture_output=True, check=True)
    return json.loads(out.stdout)["servers"]


def connect():
    return http.client.HTTPConnection(EDGE_HOST.hostname, EDGE_HOST.port, timeout=15)


def request(conn, method, path, headers, body=None):
    """Returns (connection to reuse, status, parsed body or None); status 0 if no answer."""
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        return conn, answer.status, parsed
    except (OSError, http.client.HTTPException):
        conn.close()
        return connect(), 0, None


def buyer(n):
    conn = connect()
    i = 0
    while not stop.is_set():
        i += 1
        deadline = int(time.time() * 1000) + 10_000
        headers = {"Content-Type": "application/json", "Idempotency-Key": f"{RUN}-{n}-{i}",
                   "x-quire-deadline": str(deadline)}
        sent = time.monotonic()
        conn, code, body = request(conn, "POST", f"/buy/{random.randint(1, BOOKS)}", headers, b'{"quantity": 1}')
        order = body.get("order_id") if code == 200 and isinstance(body, dict) else None
        with lock:
            buys.append((sent, time.monotonic(), code, order))


def reader(n):
    conn = connect()
    while not stop.is_set():
        sent = time.monotonic()
        conn, code, _ = request(conn, "GET", f"/lookup/{random.randint(1, BOOKS)}", {})
        with lock:
            lookups.append((sent, time.monotonic(), code))


def wait_until(what, probe, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if probe():
            return
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


def all_ready():
    try:
        servers = status()
    except (subprocess.CalledProcessError, ValueError):
        return False
    return len(servers) == 13 and all(s["ready"] for s in servers)


def acked_since(t):
    with lock:
        return [b for b in buys if b[0] >= t and b[2] == 200]


def terms():
    out = {}
    for s in status():
        if s["tier"] in GROUPS:
            out[s["tier"]] = max(out.get(s["tier"], 0), s.get("term", 0))
    return out


def watch_election(survivors, term, killed):
    """FAILOVER_VERBOSE: when each survivor first names a leader of a later term."""
    seen = {}
    while len(seen) < len(survivors) and time.monotonic() < killed + 3:
        for s in survivors:
            if s["name"] in seen:
                continue
            url = urllib.parse.urlparse(s["url"])
            try:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=1)
                conn.request("GET", "/status")
                body = json.loads(conn.getresponse().read())
                conn.close()
            except (OSError, ValueError, http.client.HTTPException):
                continue
            if body.get("term", 0) > term and body.get("leader") is not None:
                seen[s["name"]] = (time.monotonic() - killed, body.get("term"), body.get("role"))
        time.sleep(0.005)
    for name, (at, t, role) in sorted(seen.items(), key=lambda kv: kv[1][0]):
        print(f"    {name} sees a leader of term {t} (itself {role}) {1000 * at:.0f} ms after the kill")


threads = [threading.Thread(target=buyer, args=(n,)) for n in range(BUYERS)]
threads += [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
for t in threads:
    t.start()
wait_until("buys to flow", lambda: len(acked_since(time.monotonic() - 1)) > 0)
time.sleep(2)
terms_before = terms()
failovers = {g: [] for g in GROUPS}
for round_ in range(KILLS):
    for group in GROUPS:
        wait_until("every server ready", all_ready)
        mark = time.monotonic()
        wait_until("buys to flow", lambda: len(acked_since(mark)) >= 20)
        leader = next(s for s in status() if s["tier"] == group and s["role"] == "leader")
        survivors = [s for s in status() if s["tier"] == group and s["name"] != leader["name"]]
        killed = time.monotonic()
        os.kill(leader["pid"], signal.SIGKILL)
        if os.environ.get("FAILOVER_VERBOSE"):
            threading.Thread(target=watch_election, args=(survivors, leader["term"], killed)).start()
        wait_until(f"a buy after killing {leader['name']}", lambda: acked_since(killed), timeout=30)
        first = min(b[1] for b in acked_since(killed))
        failovers[group].append(first - killed)
        if os.environ.get("FAILOVER_VERBOSE"):
            with lock:
                after = sorted(b for b in buys if b[1] >= killed)[:12]
            for sent, answered, code, _ in after:
                print(f"    buy sent {1000 * (sent - killed):+.0f} ms, answered {1000 * (answered - killed):+.0f} ms: {code}")
        print(f"kill -9 {leader['name']} (leader, term {leader['term']}): first buy sent after the kill "
              f"acknowledged {1000 * (first - killed):.0f} ms after it", flush=True)
wait_until("every server ready", all_ready)
time.sleep(1)
terms_after = terms()
stop.set()
for t in threads:
    t.join()

print()
for group in GROUPS:
    times = failovers[group]
    elections = terms_after[group] - terms_before[group]
    print(f"{group} leader killed {len(times)} times: failover median {1000 * statistics.median(times):.0f} ms "
          f"(each: {', '.join(f'{1000 * t:.0f}' for t in times)} ms); "
          f"elections {elections} for {len(times)} kills ({elections - len(times)} beyond one per kill)")
codes = {}
for b in buys:
    codes[b[2]] = codes.get(b[2], 0) + 1
lookup_codes = {}
for r in lookups:
    lookup_codes[r[2]] = lookup_codes.get(r[2], 0) + 1
print(f"buys: {len(buys)}, by status {dict(sorted(codes.items()))}; "
      f"lookups: {len(lookups)}, by status {dict(sorted(lookup_codes.items()))} (0: no answer)")

# Every acknowledged buy must be there, confirmed, after all the kills.
conn, lost = connect(), []
for b in buys:
    if b[2] != 200:
        continue
    conn, code, order = request(conn, "GET", f"/orders/{b[3]}", {"x-quire-deadline": str(int(time.time() * 1000) + 10_000)})
    if code != 200 or order.get("state") != "confirmed":
        lost.append((b[3], code, order))
acked = codes.get(200, 0)
print(f"acknowledged buys read back: {acked - len(lost)} of {acked} confirmed")
for order_id, code, order in lost[:10]:
    print(f"  LOST order {order_id}: {code} {order}")
sys.exit(1 if lost else 0)
