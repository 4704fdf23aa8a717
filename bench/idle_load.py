#!/usr/bin/env python3
"""Idle load: requests that arrive while an instance idles out must never be lost.

Services with idle_timeout = "1s": `tiny` (tiny-http) and `py` (examples/notes/app.py). For each,
`--requests` GETs go through the proxy in bursts (random size) separated by random 1-2 s
pauses, so the supervisor idles the instance out in many pauses and some bursts land right
while it is being parked or stopped. A pool of `--clients` threads, each with its own
keep-alive connection to the proxy, sends each burst. A failure is any answer but 200 or any
connection error (no retries). Wakes = "started" events in the instance's log (RPC `logs`),
stops = "exited" events.

Prints `requests, failures, wakes, duration` per service and exits non-zero on any failure.

    python3 bench/idle_load.py [--requests 10000] [--clients 8] [--services tiny,py] [--seed N]
"""

import argparse
import http.client
import json
import os
import queue
import random
import socket
import struct
import sys
import threading
import time

from loadtools import build, keep_logs, listen_overflows, proxied_sandbox, revision, snapshot_binaries
from tenement_bench import machine, p

SERVICES = """
[service.tiny]
command = "@BIN@/tiny-http"
idle_timeout = "1s"

[service.py]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
idle_timeout = "1s"
[service.py.env]
DATA_DIR = "{data_dir}/{id}"
"""


class Client(threading.Thread):
    """One keep-alive connection to the proxy; takes (burst, seq) items, records outcomes."""

    def __init__(self, port, host, work, records):
        super().__init__(daemon=True)
        self.port, self.host, self.work, self.records = port, host, work, records
        self.conn = None

    def run(self):
        while True:
            item = self.work.get()
            if item is None:
                self.work.task_done()
                return
            burst, seq = item
            t = time.perf_counter()
            status, error, reused = None, None, self.conn is not None
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.conn.request("GET", f"/?seq={seq}", headers={"Host": self.host})
                r = self.conn.getresponse()
                body = r.read()
                status = r.status
                if status != 200:
                    error = body[:200].decode("utf-8", "replace").strip()
                if r.will_close:
                    self.conn.close()
                    self.conn = None
            except Exception as e:  # noqa: BLE001 - every failure is recorded
                error = f"{type(e).__name__}: {e}"
                if self.conn:
                    self.conn.close()
                self.conn = None
            self.records.append((burst, seq, time.perf_counter() - t, status, error, reused, time.time()))
            self.work.task_done()


class EventCounter(threading.Thread):
    """Follows the instance's log (RPC `logs` with follow) and counts lifecycle events.

    Following, not reading the buffer afterwards: the buffer keeps the last 2000 lines, and
    the notes app logs a line per request, so "started" events scroll out of it under load."""

    def __init__(self, sb, inst):
        super().__init__(daemon=True)
        self.rpc = sb.admin()
        body = json.dumps({"type": "logs", "instance": inst, "lines": 0, "follow": True}).encode()
        self.rpc.s.sendall(struct.pack(">I", len(body)) + body)
        self._frame()  # the (empty) tail comes first
        self.started = self.exited = self.lagged = 0
        self.events = []

    def _frame(self):
        n = struct.unpack(">I", self.rpc._read(4))[0]
        return json.loads(self.rpc._read(n))

    def run(self):
        try:
            while True:
                for line in self._frame().get("lines", []):
                    if line["stream"] != "event":
                        continue
                    text = line["line"]
                    self.events.append((line["ts_ms"], text))
                    if text.startswith("started"):
                        self.started += 1
                    elif text.startswith("exited"):
                        self.exited += 1
                    elif "lines skipped" in text:
                        self.lagged += 1
        except (OSError, ConnectionError, ValueError):
            return

    def close(self):
        time.sleep(0.2)  # let the last events arrive
        try:
            self.rpc.s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.join(5)
        self.rpc.close()


def run_service(sb, rpc, service, args, rng):
    inst = f"{service}:idle"
    host = f"idle.{service}.localhost"
    rpc.call({"type": "add", "instances": [inst]})
    events = EventCounter(sb, inst)
    events.start()
    work, records = queue.Queue(), []
    clients = [Client(sb.proxy_port, host, work, records) for _ in range(args.clients)]
    for c in clients:
        c.start()
    states = {}
    sent, burst = 0, 0
    ovf0 = listen_overflows()[0]
    t0 = time.perf_counter()
    while sent < args.requests:
        size = min(rng.randint(args.burst_min, args.burst_max), args.requests - sent)
        state = rpc.call({"type": "status", "instance": inst})["status"]["state"]
        states[state] = states.get(state, 0) + 1
        for i in range(size):
            work.put((burst, sent + i))
        work.join()
        sent += size
        burst += 1
        pause = rng.uniform(args.pause_min, args.pause_max)
        failed_so_far = sum(1 for r in records if r[3] != 200)
        print(f"  {service}: burst {burst} ({size} requests, instance was {state}) done, "
              f"{sent}/{args.requests} sent, {failed_so_far} failed; pausing {pause:.2f} s",
              file=sys.stderr, flush=True)
        if sent < args.requests:
            time.sleep(pause)
    duration = time.perf_counter() - t0
    overflows = listen_overflows()[0] - ovf0
    for _ in clients:
        work.put(None)
    for c in clients:
        c.join()
    events.close()
    wakes, stops = events.started, events.exited
    if events.lagged:
        print(f"  {service}: the log follower lagged {events.lagged} times; wakes/stops are lower bounds",
              file=sys.stderr)
    return {"service": service, "requests": len(records), "records": records, "bursts": burst,
            "states": states, "wakes": wakes, "stops": stops, "duration": duration,
            "failures": [r for r in records if r[3] != 200], "overflows": overflows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000, help="per service")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--services", default="tiny,py")
    ap.add_argument("--burst-min", type=int, default=20)
    ap.add_argument("--burst-max", type=int, default=600)
    ap.add_argument("--pause-min", type=float, default=1.0)
    ap.add_argument("--pause-max", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    if not args.no_build:
        build()
    snapshot_binaries()
    sb = proxied_sandbox(SERVICES)
    results = []
    try:
        rpc = sb.admin()
        for service in args.services.split(","):
            results.append(run_service(sb, rpc, service, args, rng))
        print(f"# idle load: idle_timeout 1s, {args.clients} keep-alive clients, bursts of "
              f"{args.burst_min}-{args.burst_max} requests, pauses {args.pause_min}-{args.pause_max} s, "
              f"seed {seed}; {machine()}; {revision()}")
        print(f"{'service':<8}{'requests':>9}{'failures':>9}{'wakes':>7}{'stops':>7}{'bursts':>7}"
              f"{'duration s':>11}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'SYN drops':>10}  bursts by state at start")
        for r in results:
            lat = sorted(x[2] for x in r["records"])
            print(f"{r['service']:<8}{r['requests']:>9}{len(r['failures']):>9}{r['wakes']:>7}{r['stops']:>7}"
                  f"{r['bursts']:>7}{r['duration']:>11.1f}{p(lat, 50) * 1000:>8.2f}{p(lat, 99) * 1000:>8.2f}"
                  f"{lat[-1] * 1000:>8.1f}{r['overflows']:>10}  {r['states']}")
        print("SYN drops = TcpExt ListenOverflows during the service's run (accept queue full, "
              "whole network namespace): each costs the connecting side a 1 s SYN retransmit")
        print()
        for r in results:
            print(f"{r['service']}: requests {r['requests']}, failures {len(r['failures'])}, "
                  f"wakes {r['wakes']}, duration {r['duration']:.1f} s")
        total_failures = sum(len(r["failures"]) for r in results)
        if total_failures:
            kept = keep_logs(sb)
            print(f"\nFAILED: {total_failures} requests; sandbox logs kept in {kept}")
            for r in results:
                kinds = {}
                for f in r["failures"]:
                    key = f"{f[3]} {f[4]}" if f[3] else f[4]
                    kinds[key] = kinds.get(key, 0) + 1
                for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
                    print(f"  {r['service']}: {v} x {k}")
                for f in r["failures"][:10]:
                    print(f"    burst {f[0]} seq {f[1]} after {f[2] * 1000:.1f} ms at "
                          f"{time.strftime('%H:%M:%S', time.gmtime(f[6]))}.{int(f[6] % 1 * 1000):03d}Z "
                          f"keep-alive reused={f[5]}: {f[3]} {f[4]}")
            with open(os.path.join(kept, "proxy.log")) as f:
                warn = [line for line in f if " WARN " in line or " ERROR " in line]
            print(f"  proxy log WARN/ERROR lines: {len(warn)}")
            print("".join(warn[:10]))
    finally:
        sb.close()
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
