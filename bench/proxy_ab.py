#!/usr/bin/env python3
"""Two builds of tenement-proxy side by side: both run at once against one supervisor and one
warm tiny-http instance (tiny:a), with nginx in front of the same backend as the yardstick;
wrk (1 thread) runs against each in turn, the order rotated every round. Reports, per
connection count, each side's requests per second and its CPU per request split into user
and system time (from /proc/PID/stat), as medians over rounds, and the per-round ratios B/A.

    python3 bench/proxy_ab.py --a OLD/tenement-proxy --b NEW/tenement-proxy \\
        [--rounds 4] [--duration 3] [--connections 1,4,32] [--b-args "--workers 1"]

`--b-args` adds arguments to B's command line: one build against itself with another setting
(`--a X --b X --b-args "--workers 1"`). Build each side with `cargo build --release -p tenement-proxy` at the revision to compare and
copy the binary out; the supervisor and tiny-http are the current tree's (`--no-build` to use
target/release as it is).
"""

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

from loadtools import WARM_HOST, build, ensure_tools, revision, snapshot_binaries, warm_tiny, wrk
from tenement_bench import free_port, machine, median

HOST = WARM_HOST


def ticks(pids):
    """utime and stime of these processes, in clock ticks."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the first tenement-proxy binary")
    ap.add_argument("--b", required=True, help="the second tenement-proxy binary")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--connections", default="1,4,32")
    ap.add_argument("--b-args", default="", help="more arguments for B's command line")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    ensure_tools("wrk", "nginx")
    if not args.no_build:
        build()
    snap = snapshot_binaries()
    shutil.copy2(args.a, os.path.join(snap, "tenement-proxy"))
    shutil.copy2(args.b, os.path.join(snap, "proxy-b"))
    clk = os.sysconf("SC_CLK_TCK")

    b = None
    with warm_tiny() as (_, nginx, sb):
        try:
            # B: the same config, its own port; a second proxy of the same supervisor.
            b_port = free_port()
            command = [os.path.join(snap, "proxy-b"), "--config", sb.config, "--listen", f"127.0.0.1:{b_port}",
                       *shlex.split(args.b_args)]
            if os.geteuid() == 0:
                command += ["--user", "nobody"]
            b = subprocess.Popen(command, stdout=open(os.path.join(sb.dir, "proxy-b.log"), "w"),
                                 stderr=subprocess.STDOUT)
            deadline = time.time() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", b_port), 0.2).close()
                    break
                except OSError:
                    if time.time() > deadline or b.poll() is not None:
                        raise RuntimeError("proxy B did not start; see " + os.path.join(sb.dir, "proxy-b.log"))
                    time.sleep(0.05)
            sides = {
                "nginx": (nginx.port, nginx.workers()),
                "A": (sb.proxy_port, [sb.proxy.pid]),
                "B": (b_port, [b.pid]),
            }
            names = list(sides)
            for c in conns:  # warm-up: pools, page cache, CPU frequency
                for name in names:
                    wrk(sides[name][0], c, 1, host=HOST)
            rows = {}
            for r in range(args.rounds):
                order = names[r % 3:] + names[:r % 3]
                for c in conns:
                    for name in order:
                        port, pids = sides[name]
                        before = ticks(pids)
                        res = wrk(port, c, args.duration, host=HOST)
                        after = ticks(pids)
                        n = max(res["requests"], 1)
                        res["user_us"] = (after[0] - before[0]) / clk * 1e6 / n
                        res["sys_us"] = (after[1] - before[1]) / clk * 1e6 / n
                        rows.setdefault((name, c), []).append(res)
                        print(f"  round {r + 1}/{args.rounds} c={c:<3} {name:<6}{res['rps']:>9.0f} rps  "
                              f"user {res['user_us']:5.1f} us  sys {res['sys_us']:5.1f} us"
                              f"{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}",
                              file=sys.stderr, flush=True)
            print(f"# proxy A/B: A = {args.a}, B = {args.b}{' ' + args.b_args if args.b_args else ''}; wrk -t1, {args.duration} s per run, "
                  f"{args.rounds} interleaved rounds; {machine()}; tree {revision()}")
            print(f"{'conns':>5} {'side':<6}{'rps':>9}{'user us':>9}{'sys us':>8}{'cpu us':>8}{'errors':>8}")
            for c in conns:
                for name in names:
                    xs = rows[(name, c)]
                    print(f"{c:>5} {name:<6}{median([x['rps'] for x in xs]):>9.0f}"
                          f"{median([x['user_us'] for x in xs]):>9.1f}{median([x['sys_us'] for x in xs]):>8.1f}"
                          f"{median([x['user_us'] + x['sys_us'] for x in xs]):>8.1f}{sum(x['errors'] for x in xs):>8}")
            print()
            print("per-round ratios B/A (median [min..max]):")
            fmt = lambda xs: f"{median(xs):.3f} [{min(xs):.2f}..{max(xs):.2f}]"
            for c in conns:
                a, bb = rows[("A", c)], rows[("B", c)]
                rps = [y["rps"] / x["rps"] for x, y in zip(a, bb)]
                cpu = [(y["user_us"] + y["sys_us"]) / (x["user_us"] + x["sys_us"]) for x, y in zip(a, bb)]
                print(f"  c={c:<4} rps {fmt(rps)}   cpu per request {fmt(cpu)}")
        finally:
            if b:
                b.terminate()
                b.wait()


if __name__ == "__main__":
    main()
