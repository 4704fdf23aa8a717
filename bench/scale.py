#!/usr/bin/env python3
"""Scale and memory: one supervisor and one proxy with thousands of tenants of one Python
service (examples/notes, listen = "tcp", health = "/health"), in this order:

  1. memory idle: both daemons' resident memory after start, nothing registered;
  2. register 1,000 (one `tenctl add` of 1,000 ids), memory;
  3. wake 100 of them through the proxy, 8 at a time, memory with 100 running; stop them;
  4. register 9,000 more in nine more `tenctl add` of 1,000 (time of all ten), then one more
     `tenctl add` of a single id at 10,000 (the marginal cost), memory with 10,000 registered,
     `tenctl ps --json` at 10,000 (median of 5 runs);
  5. wake 500 distinct stopped instances through the proxy, 8 at a time (GET /health with the
     instance's Host: success rate, first-request latency p50/p99), memory with 500 running;
  6. let them idle out: each woken app's process is watched through a pidfd, and each must end
     between idle_timeout and idle_timeout + 1 s after the end of its last request.

Memory is reported three ways from /proc/PID/smaps_rollup: RSS (what `ps` and the goals
mean), PSS (shared pages divided among the processes that map them) and anonymous (heap,
stacks, data: what the daemon allocated). Most of an idle daemon's RSS is code, its own
binary's and libc's, read from the page cache and shared with anything else that maps it.

Goals: both daemons <= 10 MB RSS together idle and <= 40 MB with 10,000 registered;
`tenctl ps --json` at 10,000 <= 300 ms.

    python3 bench/scale.py [--instances 10000] [--wakes 500] [--parallel 8] [--idle-timeout 10]
"""

import argparse
import http.client
import json
import os
import queue
import selectors
import subprocess
import sys
import threading
import time

import loadtools
from loadtools import build, get, keep_logs, revision, snapshot_binaries
from tenement_bench import Sandbox, free_port, machine, median, p

SERVICE = """
[service.py]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
health = "/health"
idle_timeout = "@IDLE@s"
[service.py.env]
DATA_DIR = "{data_dir}/{id}"
"""
HOST = "{}.py.localhost"
BATCH = 1000

GOAL_IDLE_MB = 10.0
GOAL_10K_MB = 40.0
GOAL_PS_MS = 300.0


def memory(pid):
    """RSS, PSS and private memory of one process, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": fields["Rss"] / 1024, "pss": fields["Pss"] / 1024, "anon": fields["Anonymous"] / 1024}


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class ExitWatcher:
    """Records when watched processes end, through pidfds (exact, no polling)."""

    def __init__(self):
        self.added = queue.Queue()
        self.ended = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def watch(self, name, pid):
        self.added.put((name, os.pidfd_open(pid)))

    def _run(self):
        sel = selectors.DefaultSelector()
        while not self.done.is_set():
            while not self.added.empty():
                name, fd = self.added.get()
                sel.register(fd, selectors.EVENT_READ, name)
            for key, _ in sel.select(timeout=0.02):
                self.ended[key.data] = time.perf_counter()
                sel.unregister(key.fd)
                os.close(key.fd)

    def wait(self, count, deadline):
        """Waits until `count` processes ended or `deadline` (perf_counter); returns name -> end."""
        while len(self.ended) < count and time.perf_counter() < deadline:
            time.sleep(0.1)
        self.done.set()
        self.thread.join()
        return dict(self.ended)


class Run:
    def __init__(self, args):
        self.args = args
        self.rows = []  # (label, supervisor memory, proxy memory)
        port = free_port()
        self.sb = Sandbox(SERVICE.replace("@BIN@", loadtools.BIN).replace("@IDLE@", str(args.idle_timeout)),
                          port_range="20000-31999", listen=f"127.0.0.1:{port}")
        os.chmod(self.sb.dir, 0o711)  # the proxy drops to nobody and must reach run/proxy.sock
        self.port = port

    def ids(self, first, count):
        return [f"t{n:05}" for n in range(first, first + count)]

    def snapshot(self, label):
        time.sleep(1.0)  # let the daemons settle (freed memory, background tasks)
        sup, prox = memory(self.sb.supervisor.pid), memory(self.sb.proxy.pid)
        self.rows.append((label, sup, prox))
        print(f"  memory {label}: supervisor RSS {sup['rss']:.1f} MiB, proxy RSS {prox['rss']:.1f} MiB, "
              f"together {sup['rss'] + prox['rss']:.1f} MiB", flush=True)

    def tenctl(self, *args):
        started = time.perf_counter()
        out = self.sb.tenctl(*args)
        took = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"tenctl {' '.join(args[:3])} ...: {out.stderr.strip()}")
        return took, out.stdout

    def add(self, ids):
        took, _ = self.tenctl("add", *[f"py:{i}" for i in ids])
        return took

    def wake_through_proxy(self, ids, exits=None):
        """GET /health for each id, `parallel` at a time; returns [(id, ok, seconds, ended_at)].

        With `exits` (an ExitWatcher), each woken app's pid (from the admin `status` call) is
        watched, so that the moment its process ends is known exactly, without polling."""
        work = queue.Queue()
        for i in ids:
            work.put(i)
        results = []
        lock = threading.Lock()

        def worker():
            rpc = self.sb.admin() if exits else None
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    break
                started = time.perf_counter()
                try:
                    status, body = get(self.port, HOST.format(i), "/health", timeout=60)
                    ok = status == 200 and f'"tenant":"{i}"'.encode() in body
                except (OSError, http.client.HTTPException):
                    ok = False
                ended = time.perf_counter()
                if ok and exits:
                    reply = rpc.call({"type": "status", "instance": f"py:{i}"})
                    pid = reply.get("status", {}).get("pid")
                    try:
                        exits.watch(i, pid)
                    except (TypeError, ProcessLookupError):
                        ok = False  # not running right after its answer: counted as a failure
                with lock:
                    results.append((i, ok, ended - started, ended))
            if rpc:
                rpc.close()

        threads = [threading.Thread(target=worker) for _ in range(self.args.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def main(self):
        a = self.args
        sb = self.sb
        sb.start_supervisor()
        sb.start_proxy()
        print(f"# scale: {a.instances} instances of a Python service, {a.wakes} wakes {a.parallel} at a time, "
              f"idle_timeout {a.idle_timeout}s; {machine()}; {revision()}", flush=True)

        self.snapshot("idle")

        add_times = [self.add(self.ids(0, BATCH))]
        self.snapshot("1,000 registered")

        first = self.wake_through_proxy(self.ids(0, 100))
        failed = [i for i, ok, _, _ in first if not ok]
        if failed:
            raise RuntimeError(f"{len(failed)} of 100 wakes failed, e.g. {failed[:3]}")
        self.snapshot("1,000 registered, 100 running")
        rpc = self.sb.admin()
        for i in self.ids(0, 100):
            reply = rpc.call({"type": "stop", "instance": f"py:{i}"})
            if reply["type"] != "ok":
                raise RuntimeError(f"stop py:{i}: {reply}")
        rpc.close()

        for start in range(BATCH, a.instances, BATCH):
            add_times.append(self.add(self.ids(start, min(BATCH, a.instances - start))))
        one_more = self.add([f"x{a.instances}"])
        registered = a.instances + 1
        self.snapshot(f"{registered:,} registered")
        ps_times = []
        for _ in range(5):
            took, out = self.tenctl("ps", "--json")
            ps_times.append(took)
        listed = len(json.loads(out))
        print(f"  register {a.instances:,} in {len(add_times)} tenctl add of {BATCH:,}: {sum(add_times):.2f} s "
              f"({sum(add_times) / a.instances * 1e6:.0f} us per instance); one more at {a.instances:,}: "
              f"{one_more * 1000:.0f} ms", flush=True)
        print(f"  tenctl ps --json at {registered:,}: median {median(ps_times) * 1000:.0f} ms "
              f"(runs: {', '.join(f'{t * 1000:.0f}' for t in ps_times)}), {listed:,} instances listed, "
              f"{len(out) / 1e6:.1f} MB of JSON", flush=True)

        wake_ids = self.ids(100, a.wakes)
        exits = ExitWatcher()
        started = time.perf_counter()
        results = self.wake_through_proxy(wake_ids, exits)
        wall = time.perf_counter() - started
        ok = [r for r in results if r[1]]
        lat = [r[2] for r in ok]
        print(f"  wake {a.wakes} distinct instances, {a.parallel} at a time, through the proxy: "
              f"{len(ok)}/{len(wake_ids)} answered 200 ({len(ok) / len(wake_ids):.1%}) in {wall:.1f} s; "
              f"first-request latency p50 {p(lat, 50) * 1000:.0f} ms, p99 {p(lat, 99) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms", flush=True)
        out = json.loads(self.tenctl("ps", "--json")[1])
        running = sum(1 for i in out if i["state"] == "running")
        print(f"  running after the wakes: {running}; supervisor open fds {open_fds(sb.supervisor.pid)}, "
              f"proxy {open_fds(sb.proxy.pid)}", flush=True)
        self.snapshot(f"{registered:,} registered, {running} running")

        # Idle out: each instance must be stopped by the end of its last request + idle_timeout + 1 s.
        last_request = {r[0]: r[3] for r in results}
        stopped_at = exits.wait(len(last_request), max(last_request.values()) + a.idle_timeout + 30)
        late = {i: stopped_at.get(i, float("inf")) - last_request[i] - a.idle_timeout for i in last_request}
        after = sorted(late.values())
        # Not before idle_timeout (the request's end is seen by the client a little after the
        # proxy saw it, hence the small allowance), and not more than 1 s after.
        within = sum(1 for x in after if -0.1 <= x <= 1.0)
        print(f"  idle out (idle_timeout {a.idle_timeout}s): {within}/{len(after)} stopped within "
              f"idle_timeout + 1 s (and not before idle_timeout) of their last request; after idle_timeout: "
              f"median {median(after):.2f} s, "
              f"max {after[-1]:.2f} s (the app's exit, seen through a pidfd)", flush=True)
        self.snapshot(f"{registered:,} registered, all stopped again")

        print()
        print(f"{'memory (MiB)':<40} {'supervisor RSS':>15} {'proxy RSS':>10} {'together':>9}  "
              f"{'PSS (both)':>10} {'anonymous (both)':>16}")
        for label, sup, prox in self.rows:
            print(f"{label:<40} {sup['rss']:>15.1f} {prox['rss']:>10.1f} {sup['rss'] + prox['rss']:>9.1f}  "
                  f"{sup['pss'] + prox['pss']:>10.1f} {sup['anon'] + prox['anon']:>16.1f}")
        idle = self.rows[0]
        at_10k = next(r for r in self.rows if r[0] == f"{registered:,} registered")
        checks = [
            ("daemons' RSS together idle", idle[1]["rss"] + idle[2]["rss"], GOAL_IDLE_MB, "MiB"),
            (f"daemons' RSS together with {registered:,} registered", at_10k[1]["rss"] + at_10k[2]["rss"],
             GOAL_10K_MB, "MiB"),
            (f"tenctl ps --json at {registered:,}", median(ps_times) * 1000, GOAL_PS_MS, "ms"),
        ]
        print()
        for name, value, goal, unit in checks:
            verdict = "met" if value <= goal else f"MISSED by {value - goal:.1f} {unit}"
            print(f"goal: {name} <= {goal:g} {unit}: {value:.1f} {unit}, {verdict}")
        wake_ok = len(ok) == len(wake_ids)
        idle_ok = within == len(wake_ids)
        list_ok = listed == registered
        print(f"check: tenctl ps --json lists all {registered:,} instances: {'yes' if list_ok else f'NO ({listed:,})'}")
        if not (wake_ok and idle_ok):
            print(f"logs kept in {keep_logs(sb)}")
        print(f"check: all {a.wakes} wakes answered 200: {'yes' if wake_ok else 'NO'}")
        print(f"check: all stopped within idle_timeout + 1 s: {'yes' if idle_ok else 'NO'}")
        return 0 if wake_ok and idle_ok and list_ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10000)
    ap.add_argument("--wakes", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--idle-timeout", type=int, default=10, help="seconds")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if args.instances < BATCH or args.wakes + 100 > args.instances:
        ap.error(f"--instances must be >= {BATCH} and leave room for 100 + --wakes distinct instances")
    if not args.no_build:
        build()
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tenctl"], cwd=loadtools.ROOT, check=True)
    snapshot_binaries()
    run = Run(args)
    try:
        return run.main()
    except Exception:
        print(f"logs kept in {keep_logs(run.sb)}", file=sys.stderr)
        raise
    finally:
        run.sb.close()


if __name__ == "__main__":
    sys.exit(main())
