#!/usr/bin/env python3
"""The fleet, measured: three hosts in network namespaces (tests/fleet/rig.py) on a real
three-member etcd cluster, each with a supervisor, a fleet agent and a proxy (with the fleet
credential) from the release build.

0. The one-hop forward: one warm tenant asked through the proxy of its own host and through
   another host's (which hands it over, mutual TLS and HTTP/2), with wrk from a fourth
   namespace at 1, 4 and 32 connections, --rounds interleaved rounds of --duration s each;
   medians of p50 latency and of requests per second, and their ratios.
0b. A drain under load, --drains times: the busiest host of 30 running tenants is drained
   (`tenement-fleet drain --wait`) while six clients send GETs and 2 KiB POSTs for its
   tenants through all three proxies; requests sent, requests failed (the goal is 0), and
   how long the drain took; then the host is undrained and the tenants spread again.
1. Failover of the cold tier, over --trials trials: the host with the most tenants is killed
   (SIGKILL of everything in its namespace) with its tenants running; the time until the
   first and until the last of them answers a wake on its new host. Against the bound the
   design promises: lease_ttl + grace + a wake. The killed host then comes back (same etcd
   data), empty, for the next trial.
2. --tenants tenants at once: the time until every one is placed (the controller's rate),
   then --samples single new tenants one after another, each timed from its record's write
   until its placement exists (the controller's latency) and until the owning host's agent
   has it (the watch's latency); and the memory (RSS) of the agents and of the proxies (which
   hold the other hosts' placements) at 30 tenants and at --tenants.

Not measured, because not built yet (docs/FLEET.md): the warm tier.

    sudo python3 bench/fleet.py [--rounds 5] [--duration 5] [--trials 20] [--tenants 5000]
                                [--samples 20] [--no-build]
"""

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "fleet"))

import rig  # noqa: E402  (after the path it lives on)
from loadtools import ensure_tools, revision, wrk  # noqa: E402
from tenement_bench import ROOT  # noqa: E402

# Its own namespaces and network, so it never meets the test suite's.
rig.PREFIX = "tfb"
rig.NET = "10.78.0"


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(seconds):
    return f"{seconds * 1000:.0f} ms"


class Gateway:
    """etcd's JSON gateway on one member, from this namespace (the rig's observer cable)."""

    def __init__(self, host):
        self.base = f"http://{rig.addr(host)}:2379/v3"

    def call(self, path, body):
        """One call; retried for a while when the member has no leader (an election after a
        kill answers 503) or cannot be reached."""
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + rig.EVENT_DEADLINE
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    return json.load(answer)
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def put(self, key, value):
        self.call("/kv/put", {"key": b64(key), "value": b64(value)})

    def get(self, key):
        kvs = self.call("/kv/range", {"key": b64(key)}).get("kvs", [])
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def put_many(self, pairs, per_txn=100):
        for i in range(0, len(pairs), per_txn):
            ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in pairs[i:i + per_txn]]
            self.call("/kv/txn", {"success": ops})

    def is_etcd_leader(self):
        """Whether this member is the etcd cluster's raft leader."""
        status = self.call("/maintenance/status", {})
        return status.get("leader") == status.get("header", {}).get("member_id")

    def count(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = self.call("/kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
        return int(answer.get("count", 0))


def b64(text):
    return base64.b64encode(text.encode()).decode()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proxy_memory(fleet):
    """host -> the proxy's RSS in KiB (its process, not the `ip netns exec` wrapper's)."""
    out = {}
    for host in rig.HOSTS:
        wrapper = fleet.procs.get((host, "proxy"))
        if wrapper:
            pids = subprocess.run(["pgrep", "-P", str(wrapper.pid)], capture_output=True, text=True).stdout.split()
            out[host] = rss_kib(int(pids[0])) if pids else rss_kib(wrapper.pid)
    return out


def agent_memory(fleet):
    out = {}
    for host in rig.HOSTS:
        proc = fleet.procs.get((host, "agent"))
        if proc:
            role = "controller" if (fleet.status(host) or {}).get("controller") else "member"
            out[host] = (rss_kib(proc.pid), role)
    return out


def start(fleet):
    for host in rig.HOSTS:
        fleet.start_etcd(host)
    rig.wait_for(lambda: fleet.healthy(rig.HOSTS), rig.EVENT_DEADLINE, "etcd")
    fleet.make_credentials()
    for host in rig.HOSTS:
        fleet.start_supervisor(host)
        fleet.start_agent(host)
        fleet.start_proxy(host)
    rig.wait_for(lambda: all((fleet.status(h) or {}).get("membership") == "member" for h in rig.HOSTS),
                 rig.EVENT_DEADLINE, "three members")


def bring_back(fleet, host):
    fleet.start_etcd(host, state="existing")
    rig.wait_for(lambda: fleet.healthy(rig.HOSTS), rig.EVENT_DEADLINE, f"{host}'s etcd member")
    fleet.start_supervisor(host)
    fleet.start_agent(host)
    fleet.start_proxy(host)
    rig.wait_for(lambda: (fleet.status(host) or {}).get("membership") == "member", rig.EVENT_DEADLINE,
                 f"{host} to rejoin")


def forward(fleet, gateway, rounds, duration):
    tenant = "notes:fw"
    gateway.put(f"/tenement/tenants/{tenant}", "{}")
    placement = rig.wait_for(lambda: gateway.get(f"/tenement/placement/{tenant}"), rig.EVENT_DEADLINE, "a placement")
    owner = placement["host"]
    other = next(h for h in rig.HOSTS if h != owner)
    name = "fw.notes.example.com"
    rig.wait_for(lambda: all(fleet.get(h, tenant)[0] == 200 for h in (owner, other)), rig.EVENT_DEADLINE,
                 f"{tenant} through both proxies")
    print(f"one-hop forward: {tenant} runs on {owner}; asked through {owner}'s proxy (local) and {other}'s "
          f"(handed over), wrk from {rig.NET}.254, {rounds} interleaved rounds of {duration} s")
    for connections in (1, 4, 32):
        local, hop = [], []
        for _ in range(rounds):
            for host, out in ((owner, local), (other, hop)):
                result = wrk(80, connections, duration, host=name, address=rig.addr(host))
                if result["errors"]:
                    raise SystemExit(f"wrk through {host}: {result['errors']} errors")
                out.append(result)
        med = {key: (statistics.median(r[key] for r in local), statistics.median(r[key] for r in hop))
               for key in ("p50_us", "p99_us", "rps")}
        print(f"  c={connections}: p50 {med['p50_us'][0]:.0f} -> {med['p50_us'][1]:.0f} us "
              f"(+{med['p50_us'][1] - med['p50_us'][0]:.0f} us, {med['p50_us'][1] / med['p50_us'][0]:.2f}x); "
              f"p99 {med['p99_us'][0]:.0f} -> {med['p99_us'][1]:.0f} us; "
              f"requests/s {med['rps'][0]:.0f} -> {med['rps'][1]:.0f} ({med['rps'][1] / med['rps'][0]:.2f}x)",
              flush=True)
    gateway.call("/kv/deleterange", {"key": b64(f"/tenement/tenants/{tenant}")})


def drains(fleet, gateway, count):
    tenants = [f"notes:d{i:02d}" for i in range(30)]
    gateway.put_many([(f"/tenement/tenants/{t}", "{}") for t in tenants])
    rig.wait_for(lambda: all(gateway.get(f"/tenement/placement/{t}") for t in tenants), rig.EVENT_DEADLINE,
                 "30 placements")
    totals = []
    for n in range(count):
        placements = {t: gateway.get(f"/tenement/placement/{t}") for t in tenants}
        load = {h: sorted(t for t, p in placements.items() if p["host"] == h) for h in rig.HOSTS}
        victim = max(rig.HOSTS, key=lambda h: len(load[h]))
        theirs = load[victim]
        rig.wake_where_placed(fleet, theirs, [victim])
        stop = threading.Event()
        tally = {"ok": 0, "failed": 0}
        lock = threading.Lock()

        def client(k):
            i = k
            while not stop.is_set():
                tenant, via, post = theirs[i % len(theirs)], rig.HOSTS[i % 3], i % 2 == 1
                i += 7
                try:
                    status, _, body = fleet.get(via, tenant, "/d", method="POST" if post else "GET",
                                                body=b"x" * 2048 if post else None, timeout=120)
                    good = status == 200 and body == f"hello from {tenant}\n".encode()
                except OSError:
                    good = False
                with lock:
                    tally["ok" if good else "failed"] += 1

        workers = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for w in workers:
            w.start()
        time.sleep(1)
        started = time.monotonic()
        result = fleet.fleet_cli(victim, "drain", victim, "--wait")
        took = time.monotonic() - started
        time.sleep(1)
        stop.set()
        for w in workers:
            w.join()
        if result.returncode != 0:
            raise SystemExit(f"drain {victim}: {result.stderr.strip()}")
        totals.append((tally["ok"] + tally["failed"], tally["failed"], took, len(theirs)))
        print(f"drain {n + 1}/{count}: {victim} with {len(theirs)} running tenants under load: "
              f"{tally['ok'] + tally['failed']} requests, {tally['failed']} failed; empty after {took:.2f} s",
              flush=True)
        fleet.fleet_cli(victim, "undrain", victim)
    print(f"drains under load: {sum(t[0] for t in totals)} requests, {sum(t[1] for t in totals)} failed "
          f"(goal 0); drain --wait took {statistics.median(t[2] for t in totals):.2f} s at the median for "
          f"{statistics.median(t[3] for t in totals):.0f} tenants")
    for t in tenants:
        gateway.call("/kv/deleterange", {"key": b64(f"/tenement/tenants/{t}")})


def failover(fleet, gateway, trials):
    tenants = [f"notes:f{i:02d}" for i in range(30)]
    gateway.put_many([(f"/tenement/tenants/{t}", "{}") for t in tenants])
    rig.wait_for(lambda: len(fleet.placements()) >= len(tenants), rig.EVENT_DEADLINE, "30 placements")
    firsts, lasts, held = [], [], []
    for trial in range(trials):
        placements = fleet.placements()
        victim = max(rig.HOSTS, key=lambda h: sum(1 for p in placements.values() if p["host"] == h))
        survivors = [h for h in rig.HOSTS if h != victim]
        theirs = sorted(t for t, p in placements.items() if p["host"] == victim)
        rig.wake_where_placed(fleet, theirs, [victim])
        etcd_leader = Gateway(victim).is_etcd_leader()
        controller = bool((fleet.status(victim) or {}).get("controller"))
        started = time.monotonic()
        fleet.kill_namespace(rig.ns(victim))
        ask = Gateway(survivors[0])
        answered = {}
        while len(answered) < len(theirs):
            if time.monotonic() - started > rig.EVENT_DEADLINE:
                raise SystemExit(f"trial {trial + 1}: {len(theirs) - len(answered)} tenants did not come back")
            for t in theirs:
                if t in answered:
                    continue
                placement = ask.get(f"/tenement/placement/{t}")
                if placement and placement["host"] in survivors:
                    if fleet.tenctl(placement["host"], "wake", t).returncode == 0:
                        answered[t] = time.monotonic() - started
            time.sleep(0.01)
        firsts.append(min(answered.values()))
        lasts.append(max(answered.values()))
        held.append((etcd_leader, lasts[-1]))
        print(f"trial {trial + 1}/{trials}: killed {victim} with {len(theirs)} tenants (etcd leader: "
              f"{'yes' if etcd_leader else 'no'}, fleet controller: {'yes' if controller else 'no'}); first back "
              f"after {ms(firsts[-1])}, all after {ms(lasts[-1])}", flush=True)
        bring_back(fleet, victim)
    bound = fleet.lease_ttl + fleet.grace
    print()
    print(f"failover, cold tier, {trials} trials (lease_ttl {fleet.lease_ttl} s, grace {fleet.grace} s):")
    print(f"  first tenant answering on its new host: p50 {ms(statistics.median(firsts))}, "
          f"p90 {ms(percentile(firsts, 0.9))}")
    print(f"  all of the host's tenants answering:   p50 {ms(statistics.median(lasts))}, "
          f"p90 {ms(percentile(lasts, 0.9))}")
    print(f"  the design's bound: lease_ttl + grace = {bound} s after the host's last renewal (at most "
          f"lease_ttl/3 before the kill), then the election, the controller's read and a wake")
    for leader, label in ((True, "held etcd's leader"), (False, "did not hold etcd's leader")):
        times = [t for was, t in held if was == leader]
        if times:
            print(f"  killed host {label}: {len(times)} trials, all back p50 {ms(statistics.median(times))}, "
                  f"max {ms(max(times))}")


def at_scale(fleet, gateway, count, samples):
    before = agent_memory(fleet)
    proxies_before = proxy_memory(fleet)
    tenants = [f"notes:s{i:05d}" for i in range(count)]
    started = time.monotonic()
    gateway.put_many([(f"/tenement/tenants/{t}", "{}") for t in tenants])
    written = time.monotonic() - started
    target = gateway.count("/tenement/tenants/")
    rig.wait_for(lambda: gateway.count("/tenement/placement/") >= target, 600, f"{target} placements")
    placed = time.monotonic() - started
    print()
    print(f"{count} tenants written in {written:.1f} s; all {target} placed {placed:.1f} s after the first write "
          f"({count / placed:.0f} placements/s)")
    place_lat, watch_lat = [], []
    for i in range(samples):
        tenant = f"notes:lat{i:03d}"
        t0 = time.monotonic()
        gateway.put(f"/tenement/tenants/{tenant}", "{}")
        placement = None
        while placement is None:
            placement = gateway.get(f"/tenement/placement/{tenant}")
            if placement is None:
                time.sleep(0.001)
        t1 = time.monotonic()
        host = placement["host"]
        while tenant not in ((fleet.status(host) or {}).get("placed_here") or {}):
            time.sleep(0.001)
        t2 = time.monotonic()
        place_lat.append(t1 - t0)
        watch_lat.append(t2 - t1)
    after = agent_memory(fleet)
    proxies_after = proxy_memory(fleet)
    print(f"with {target} placed, {samples} new tenants one at a time:")
    print(f"  record written -> placement written (the controller): p50 {ms(statistics.median(place_lat))}, "
          f"p90 {ms(percentile(place_lat, 0.9))}")
    print(f"  placement written -> its host's agent has it (the watch): p50 {ms(statistics.median(watch_lat))}, "
          f"p90 {ms(percentile(watch_lat, 0.9))}")
    print("fleet agents' memory (RSS), 30 tenants -> " + f"{target + samples} tenants:")
    for host in rig.HOSTS:
        if host in before and host in after:
            print(f"  {host} ({after[host][1]}): {before[host][0] / 1024:.1f} MiB -> {after[host][0] / 1024:.1f} MiB")
    print("proxies' memory (RSS; each holds the other hosts' placements), the same two moments:")
    for host in rig.HOSTS:
        if host in proxies_before and host in proxies_after:
            print(f"  {host}: {proxies_before[host] / 1024:.1f} MiB -> {proxies_after[host] / 1024:.1f} MiB")


def main():
    # A SIGTERM (a timeout, an impatient operator) still takes the namespaces down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--drains", type=int, default=3)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tenants", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--lease-ttl", type=int, default=rig.LEASE_TTL)
    ap.add_argument("--grace", type=int, default=rig.GRACE)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fleet: needs root (network namespaces)")
    ensure_tools("etcd", "etcdctl", "protoc", "wrk")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tenement-supervisor", "-p", "tenctl",
                       "-p", "tenement-fixtures", "-p", "tenement-fleet", "-p", "tenement-proxy"], cwd=ROOT, check=True)
    print(f"fleet benchmark at {revision()}: 3 hosts, etcd 3 members, lease_ttl {args.lease_ttl} s, "
          f"grace {args.grace} s")
    fleet = rig.Fleet(os.path.join(ROOT, "target", "release"), lease_ttl=args.lease_ttl, grace=args.grace)
    try:
        fleet.cable(observer=True)
        start(fleet)
        gateway = Gateway("h1")
        if args.rounds > 0:
            forward(fleet, gateway, args.rounds, args.duration)
        if args.drains > 0:
            drains(fleet, gateway, args.drains)
        if args.trials > 0:
            failover(fleet, gateway, args.trials)
        at_scale(fleet, gateway, args.tenants, args.samples)
        print()
        print("not measured, not built yet: the warm tier")
    finally:
        fleet.uncable()
    return 0


if __name__ == "__main__":
    sys.exit(main())
