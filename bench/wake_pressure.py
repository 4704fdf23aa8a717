#!/usr/bin/env python3
"""Wakes under pressure: many distinct stopped tenants woken through the proxy, against the same
apps started directly the same way.

1. `--wakes` distinct cold wakes, `--parallel` at a time: each is one `GET /` on a fresh
   connection through the proxy for a tenant that has never run (its first request wakes it).
   The direct side starts the same app on a free port, polls the port every 1 ms (as
   cold_wake.py and cold_requests.py do) and sends the same GET; its latency counts from the
   launch. Done in chunks of `--chunk`, proxy and direct in turn (which goes first alternates),
   each chunk's apps stopped before the next, so both sides run on the same machine state and
   at most one chunk of apps is alive.
2. `--burst` tenants woken at once: that many threads released together, each with its own
   tenant's first GET (proxy) or its own direct start, poll and GET (direct); `--rounds` rounds,
   sides alternating.

Reported per service: p50, p99 and the slowest of each side in ms, the ratios proxy/direct of
p50 and p99, and failures (anything but a 200). The proxy side also counts how many processes
the supervisor started (exactly one per tenant).

    python3 bench/wake_pressure.py [--services native,python] [--wakes 500] [--parallel 8]
                                   [--chunk 50] [--burst 100] [--rounds 3] [--no-build]

Services: `native` (the tiny-http fixture) and `python` (examples/notes/app.py), listen = "tcp",
isolation = "process", run as this user (as root: the proxy as nobody).
"""

import argparse
import http.client
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import loadtools
from loadtools import build, get, keep_logs, proxied_sandbox, revision, snapshot_binaries
from tenement_bench import ROOT, machine, p, wait_port

SERVICES = """
[service.native]
command = "@BIN@/tiny-http"
idle_timeout = 0

[service.python]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
idle_timeout = 0
[service.python.env]
DATA_DIR = "{data_dir}/{id}"
"""

TIMEOUT = 60.0  # seconds per request; a failed wake answers long before
PROXY_PORTS = "24000-27999"  # the sandbox's instances
DIRECT_PORTS = (28000, 31999)  # the apps started directly, one port each at a time


def direct_argv(service):
    if service == "python":
        return ["python3", "app.py"], os.path.join(ROOT, "examples", "notes")
    return [os.path.join(loadtools.BIN, "tiny-http")], ROOT


class ProxySide:
    """One sandbox (supervisor and proxy) with every tenant the run will wake registered."""

    def __init__(self, services, count):
        self.sb = proxied_sandbox(SERVICES, port_range=PROXY_PORTS,
                                  settings_extra=["max_connections_per_client = 4096"])
        self.rpc = self.sb.admin(timeout=120)
        self.next = {s: 0 for s in services}
        for s in services:
            ids = [f"{s}:t{i}" for i in range(count)]
            for at in range(0, len(ids), 1000):
                reply = self.rpc.call({"type": "add", "instances": ids[at:at + 1000]})
                if reply.get("type") != "added":
                    raise SystemExit(f"add answered {reply}")

    def cpu_ticks(self):
        """utime + stime so far of the supervisor, the exec server and the proxy."""
        return loadtools.tenement_cpu_ticks(self.sb)

    def fresh(self, service, n):
        """`n` tenants of `service` that have not run yet."""
        first = self.next[service]
        self.next[service] += n
        return [f"t{i}" for i in range(first, first + n)]

    def one(self, service, tenant):
        """A first request for `tenant`: (ok, seconds)."""
        t0 = time.perf_counter()
        try:
            status, _ = get(self.sb.proxy_port, f"{tenant}.{service}.localhost", "/", timeout=TIMEOUT)
            ok = status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        return ok, time.perf_counter() - t0

    def started(self, service, tenants):
        """How many of `tenants` run now (each must, once)."""
        n = 0
        for t in tenants:
            reply = self.rpc.call({"type": "status", "instance": f"{service}:{t}"})
            n += reply.get("status", {}).get("state") == "running"
        return n

    def stop(self, service, tenants):
        for t in tenants:
            self.rpc.call({"type": "stop", "instance": f"{service}:{t}"})

    def close(self):
        keep_logs(self.sb)
        self.sb.close()


class DirectSide:
    """The same apps started by this script, one per request."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="tenement-bench-direct-")
        self.lock = threading.Lock()
        self.alive = []
        self.next_port = DIRECT_PORTS[0]
        self.errors = {}
        self.port_retries = 0

    def port(self):
        """A port of its own for the next app: from a range no other side uses, checked free.
        (Port 0's pick, released before the app binds it, can be handed to two apps started
        at once.)"""
        while True:
            with self.lock:
                self.next_port = DIRECT_PORTS[0] + (self.next_port + 1 - DIRECT_PORTS[0]) % (
                    DIRECT_PORTS[1] - DIRECT_PORTS[0])
                port = self.next_port
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue

    def one(self, service, tenant):
        """Starts the app, waits for its port, sends the GET: (ok, seconds from the launch).
        An app that could not bind its port (EADDRINUSE, seen a few times in 300 starts at
        once although each port was checked free just before) is started again on another
        one, its clock restarted; `port_retries` counts those."""
        argv, cwd = direct_argv(service)
        for _ in range(5):
            port = self.port()
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOST": "127.0.0.1",
                   "DATA_DIR": os.path.join(self.tmp, tenant)}
            logname = os.path.join(self.tmp, f"{tenant}.log")
            with open(logname, "wb") as log:
                t0 = time.perf_counter()
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=log)
            with self.lock:
                self.alive.append(proc)
            try:
                wait_port(port, t0, timeout=TIMEOUT, alive=proc)
                status, _ = get(port, f"{tenant}.{service}.localhost", "/", timeout=TIMEOUT)
                return status == 200, time.perf_counter() - t0
            except (OSError, RuntimeError, http.client.HTTPException) as e:
                with open(logname, "rb") as f:
                    said = f.read().decode(errors="replace").strip().splitlines()[-1:]
                if proc.poll() is not None and said and "Address already in use" in said[0]:
                    with self.lock:
                        self.port_retries += 1
                    continue
                error = f"{e}" + (f" (the app: {said[0]})" if said else "")
                with self.lock:
                    self.errors[error] = self.errors.get(error, 0) + 1
                return False, time.perf_counter() - t0
        return False, 0.0

    def stop_all(self):
        with self.lock:
            procs, self.alive = self.alive, []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_parallel(one, service, tenants, parallel):
    """`one(service, tenant)` for every tenant, `parallel` at a time: [(ok, seconds)]."""
    work = queue.Queue()
    for t in tenants:
        work.put(t)
    results = []
    lock = threading.Lock()

    def worker():
        while True:
            try:
                t = work.get_nowait()
            except queue.Empty:
                return
            r = one(service, t)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_at_once(one, service, tenants):
    """`one(service, tenant)` for every tenant, all threads released together."""
    barrier = threading.Barrier(len(tenants))
    results = []
    lock = threading.Lock()

    def worker(t):
        barrier.wait()
        r = one(service, t)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tenants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(results):
    ms = [s * 1000 for ok, s in results if ok]
    failed = sum(1 for ok, _ in results if not ok)
    if not ms:
        return None, None, None, failed
    return p(ms, 50), p(ms, 99), max(ms), failed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", default="native,python")
    ap.add_argument("--wakes", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    services = [s for s in args.services.split(",") if s]
    for s in services:
        if s not in ("native", "python"):
            raise SystemExit(f"unknown service {s!r}: native or python")
    if not args.no_build:
        build()
    snapshot_binaries()
    need = args.wakes + args.burst * args.rounds
    proxy = ProxySide(services, need)
    direct = DirectSide()
    rows = []
    try:
        for service in services:
            # 1. `wakes` distinct cold wakes, `parallel` at a time, chunk by chunk.
            got = {"proxy": [], "direct": []}
            started = 0
            ticks = 0
            done = 0
            k = 0
            while done < args.wakes:
                n = min(args.chunk, args.wakes - done)
                sides = ["proxy", "direct"] if k % 2 == 0 else ["direct", "proxy"]
                for side in sides:
                    if side == "proxy":
                        tenants = proxy.fresh(service, n)
                        before = proxy.cpu_ticks()
                        got["proxy"] += run_parallel(proxy.one, service, tenants, args.parallel)
                        ticks += proxy.cpu_ticks() - before
                        started += proxy.started(service, tenants)
                        proxy.stop(service, tenants)
                    else:
                        got["direct"] += run_parallel(direct.one, service, [f"d{done + i}" for i in range(n)],
                                                      args.parallel)
                        direct.stop_all()
                done += n
                k += 1
                print(f"  {service}: {done}/{args.wakes} wakes {args.parallel} at a time", file=sys.stderr,
                      flush=True)
            rows.append((service, f"{args.wakes}, {args.parallel} at a time", summary(got["proxy"]),
                         summary(got["direct"]), started, args.wakes, ticks))
            # 2. `burst` tenants at once, `rounds` times.
            got = {"proxy": [], "direct": []}
            started = 0
            ticks = 0
            for r in range(args.rounds):
                sides = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
                for side in sides:
                    if side == "proxy":
                        tenants = proxy.fresh(service, args.burst)
                        before = proxy.cpu_ticks()
                        got["proxy"] += run_at_once(proxy.one, service, tenants)
                        ticks += proxy.cpu_ticks() - before
                        started += proxy.started(service, tenants)
                        proxy.stop(service, tenants)
                    else:
                        got["direct"] += run_at_once(direct.one, service, [f"b{r}-{i}" for i in range(args.burst)])
                        direct.stop_all()
                print(f"  {service}: round {r + 1}/{args.rounds} of {args.burst} at once", file=sys.stderr,
                      flush=True)
            rows.append((service, f"{args.burst} at once x{args.rounds}", summary(got["proxy"]),
                         summary(got["direct"]), started, args.burst * args.rounds, ticks))
    finally:
        direct.stop_all()
        shutil.rmtree(direct.tmp, ignore_errors=True)
        proxy.close()

    print(f"# wake pressure: distinct stopped tenants through the proxy vs the app started directly; "
          f"{machine()}; {revision()}")
    print(f"{'service':8} {'load':22} | {'proxy p50':>9} {'p99':>7} {'max':>7} | {'direct p50':>10} {'p99':>7} "
          f"{'max':>7} | {'p50 ratio':>9} {'p99 ratio':>9} | {'failed':>9} {'started':>9} | {'cpu/wake':>8}")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    for service, load, (pp50, pp99, pmax, pfail), (dp50, dp99, dmax, dfail), started, total, ticks in rows:
        def f(x):
            return f"{x:.1f}" if x is not None else "-"

        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else "-"
        print(f"{service:8} {load:22} | {f(pp50):>9} {f(pp99):>7} {f(pmax):>7} | {f(dp50):>10} {f(dp99):>7} "
              f"{f(dmax):>7} | {ratio(pp50, dp50):>9} {ratio(pp99, dp99):>9} | {f'{pfail}/{dfail}':>9} "
              f"{f'{started}/{total}':>9} | {ticks * tick_ms / total:>8.2f}")
    print("latency in ms: proxy from the client's connect to the whole answer; direct from the app's launch "
          "to the whole answer (port polled every 1 ms); failed = proxy/direct requests without a 200; "
          "started = proxy tenants running after their request / requests; cpu/wake = ms of CPU (user + "
          "system) the supervisor, the exec server and the proxy spent per proxy-side wake")
    for error, n in sorted(direct.errors.items()):
        print(f"direct side failure x{n}: {error}")
    if direct.port_retries:
        print(f"direct side: {direct.port_retries} start(s) found their port taken and were started again "
              f"on another (clock restarted)")


if __name__ == "__main__":
    main()
