#!/usr/bin/env python3
"""Rollout: a release rolled out across 1,000 registered tenants, 20 of them running under
load, then the supervisor's memory with 10 releases of those 1,000 tenants.

One supervisor and one proxy (release binaries). The service runs `./tiny-http` in
`workdir = "current"`, a symlink to `releases/N` (each with its own copy of the binary and a
VERSION file that `/version` answers), health "/health" checked every second, idle_timeout
never. In order:

  1. register `--tenants` (1,000) with the admin RPC `add` (batches of 500), wake `--running`
     (20) through the proxy; the supervisor's memory (smaps_rollup RSS and anonymous);
  2. one client thread per running tenant sends GET /version through the proxy on a
     keep-alive connection, one request after another, for `--warmup` seconds (the baseline),
     then through the rollout;
  3. `ln -sfn releases/2 current; tenctl deploy notes --bake B`: release 2 rolled out,
     running tenants one at a time (`--max-unavailable`), sleeping ones retargeted at once;
     polled with `tenctl releases notes --json` until the rollout is done;
  4. reported: time until every running tenant answered with release 2, time until the
     rollout was done, requests that failed (goal 0), and the latency of the requests held
     by a switch (per running tenant, the first request answered by release 2: it waited
     while its tenant drained, stopped and started) against the baseline's, p50 and p99;
  5. the running tenants stopped, releases 3 to 10 deployed (each retargets the 1,000 sleeping
     tenants at once), then the supervisor's memory again and the registry file's size: the
     cost of 10 releases x 1,000 tenants.

Not part of the pass/fail tests. Machine-dependent: read the ratios and the failure count.

    python3 bench/rollout.py [--tenants 1000] [--running 20] [--bake 2s] [--max-unavailable 1]
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import loadtools
from loadtools import get, revision
from tenement_bench import RELEASE, Sandbox, build, free_port, machine, median, p

SERVICE = """
[service.notes]
command = "./tiny-http"
workdir = "current"
ready = "tcp"
health = "/health"
health_interval = "1s"
idle_timeout = "never"
"""
HOST = "{}.notes.localhost"


def memory_kib(pid):
    """(RSS, anonymous) of a process from /proc/PID/smaps_rollup, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1])
    return fields.get("Rss", 0), fields.get("Anonymous", 0)


def release_dir(sb, n):
    d = os.path.join(sb.dir, "releases", str(n))
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(RELEASE, "tiny-http"), os.path.join(d, "tiny-http"))
    with open(os.path.join(d, "VERSION"), "w") as f:
        f.write(f"{n}\n")
    tmp = os.path.join(sb.dir, "current.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(f"releases/{n}", tmp)
    os.replace(tmp, os.path.join(sb.dir, "current"))


def releases(sb):
    r = sb.tenctl("releases", "notes", "--json")
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    return json.loads(r.stdout)


def wait_done(sb, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = releases(sb)
        state = (doc.get("rollout") or {}).get("state")
        if state == "done":
            return doc
        if state in ("paused", "aborted"):
            raise RuntimeError(f"the rollout is {state}: {doc['rollout']}")
        time.sleep(0.1)
    raise RuntimeError("the rollout did not finish in time")


class Client(threading.Thread):
    """GET /version of one tenant, one after another on a keep-alive connection, until
    stopped; every request's start, latency, status and answer."""

    def __init__(self, port, tenant):
        super().__init__(daemon=True)
        self.port, self.tenant = port, tenant
        self.samples = []  # (start, seconds, status, body)
        self.stop = threading.Event()

    def run(self):
        conn = None
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("GET", "/version", headers={"Host": HOST.format(self.tenant)})
                r = conn.getresponse()
                body = r.read().decode().strip()
                self.samples.append((start, time.perf_counter() - start, r.status, body))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self.samples.append((start, time.perf_counter() - start, 0, str(e)))
                if conn is not None:
                    conn.close()
                conn = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--running", type=int, default=20)
    ap.add_argument("--bake", default="2s")
    ap.add_argument("--max-unavailable", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--releases", type=int, default=10)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build()
    began = time.time()
    port = free_port()
    sb = Sandbox(SERVICE, listen=f"127.0.0.1:{port}")
    os.chmod(sb.dir, 0o711)
    try:
        release_dir(sb, 1)
        supervisor = sb.start_supervisor()
        sb.start_proxy()
        ids = [f"t{n}" for n in range(args.tenants)]
        admin = sb.admin(timeout=60)
        for i in range(0, len(ids), 500):
            admin.call({"type": "add", "instances": [f"notes:{t}" for t in ids[i:i + 500]]})
        admin.close()
        running = ids[: args.running]
        for t in running:
            status, body = get(port, HOST.format(t), "/version", timeout=30)
            assert status == 200 and body.strip() == b"1", (t, status, body)
        rss_one, anon_one = memory_kib(supervisor.pid)

        clients = [Client(port, t) for t in running]
        for c in clients:
            c.start()
        time.sleep(args.warmup)
        release_dir(sb, 2)
        deployed = time.perf_counter()
        r = sb.tenctl("deploy", "notes", "--bake", args.bake, "--max-unavailable", str(args.max_unavailable))
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip())
        doc = wait_done(sb, timeout=600)
        done = time.perf_counter() - deployed
        time.sleep(0.5)
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(70)

        failed, baseline, held, switched_at = [], [], [], []
        for c in clients:
            for start, secs, status, body in c.samples:
                if status != 200:
                    failed.append((c.tenant, status, body))
                elif start < deployed:
                    baseline.append(secs)
            firsts = [(start, secs) for start, secs, status, body in c.samples if status == 200 and body == "2"]
            if firsts:
                start, secs = min(firsts)
                held.append(secs)
                switched_at.append(start + secs - deployed)
        all_switched = max(switched_at) if len(switched_at) == len(clients) else float("nan")

        # 10 releases x the tenants: the running ones stopped, releases 3.. retarget everyone.
        admin = sb.admin(timeout=60)
        for t in running:
            admin.call({"type": "stop", "instance": f"notes:{t}"})
        admin.close()
        for n in range(3, args.releases + 1):
            release_dir(sb, n)
            r = sb.tenctl("deploy", "notes")
            if r.returncode != 0:
                raise RuntimeError(r.stderr.strip())
            wait_done(sb, timeout=60)
        final = releases(sb)
        rss_ten, anon_ten = memory_kib(supervisor.pid)
        registry = os.path.getsize(os.path.join(sb.dir, "state", "registry.json"))

        ms = lambda s: s * 1000.0
        print(f"# rollout; {machine()}; {revision()}")
        print(f"{args.tenants} tenants, {args.running} running under load (one client each, GET /version on keep-alive), "
              f"bake {args.bake}, max-unavailable {args.max_unavailable}")
        print(f"requests: {sum(len(c.samples) for c in clients)} sent, {len(failed)} failed (goal 0)")
        for f in failed[:5]:
            print(f"  failed: {f}")
        print(f"all {len(clients)} running tenants answered by release 2 after {all_switched:.2f} s; "
              f"the rollout was done after {done:.2f} s ({doc['rollout']['moved']} tenants moved)")
        if baseline and held:
            print(f"latency before the rollout: p50 {ms(median(baseline)):.2f} ms, p99 {ms(p(baseline, 99)):.2f} ms ({len(baseline)} requests)")
            print(f"requests held by a switch (the first answer of release 2 per tenant, {len(held)}): "
                  f"p50 {ms(median(held)):.1f} ms, p99 {ms(p(held, 99)):.1f} ms; "
                  f"extra over the baseline p50: p50 +{ms(median(held) - median(baseline)):.1f} ms, "
                  f"p99 +{ms(p(held, 99) - median(baseline)):.1f} ms")
        print(f"supervisor memory, {args.tenants} tenants: 1 release RSS {rss_one / 1024:.1f} MiB (anonymous {anon_one / 1024:.1f}); "
              f"{len(final['releases'])} releases RSS {rss_ten / 1024:.1f} MiB (anonymous {anon_ten / 1024:.1f}); "
              f"difference {(rss_ten - rss_one) / 1024:+.1f} MiB RSS, {(anon_ten - anon_one) / 1024:+.1f} MiB anonymous; "
              f"registry file {registry / 1024:.0f} KiB")
        print(f"(took {time.time() - began:.0f} s)")
        return 1 if failed else 0
    finally:
        sb.close()


if __name__ == "__main__":
    sys.exit(main())
