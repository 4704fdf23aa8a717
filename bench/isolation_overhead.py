#!/usr/bin/env python3
"""Spawn overhead of each isolation level: the cold wake (over the RPC) of the native tiny-http
app at isolation = "process", "namespace" and "sandbox", interleaved rounds, medians, and the
median per-round difference to `process`. Needs root (namespaces). The sandbox service is
served through a handed-off socket (its network is "none"), so its wake includes no port
polling; `namespace-activate` is the fair comparison for it.

    sudo python3 bench/isolation_overhead.py [--rounds 21]
"""

import argparse
import os
import time

from tenement_bench import Sandbox, build, machine, median

SERVICES = """
[service.process]
command = "@ROOT@/target/release/tiny-http"
isolation = "process"
user = "root"
idle_timeout = 0

[service.namespace]
command = "@ROOT@/target/release/tiny-http"
isolation = "namespace"
user = "root"
idle_timeout = 0

[service.sandbox]
command = "@ROOT@/target/release/tiny-http"
isolation = "sandbox"
network = "host"
user = "root"
idle_timeout = 0
"""

LEVELS = ["process", "namespace", "sandbox"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("isolation_overhead.py needs root: namespaces are created by a root supervisor")
    if not args.no_build:
        build()
    sb = Sandbox(SERVICES)
    try:
        sb.start_supervisor()
        rpc = sb.admin()
        times = {level: [] for level in LEVELS}
        for r in range(args.rounds):
            order = LEVELS[r % len(LEVELS):] + LEVELS[:r % len(LEVELS)]
            for level in order:
                inst = f"{level}:r{r}"
                rpc.call({"type": "add", "instances": [inst]})
                t = time.perf_counter()
                reply = rpc.call({"type": "wake", "instance": inst})
                took = time.perf_counter() - t
                if reply.get("type") != "woken":
                    raise SystemExit(f"wake {inst} failed: {reply}")
                rpc.call({"type": "stop", "instance": inst})
                times[level].append(took)
        print(f"# isolation overhead: RPC wake of tiny-http, {args.rounds} interleaved rounds; {machine()}")
        print(f"{'level':<20}{'wake ms':>9}{'+ms vs process':>16}")
        for level in LEVELS:
            diff = median([a - b for a, b in zip(times[level], times["process"])]) * 1000
            print(f"{level:<20}{median(times[level]) * 1000:>9.2f}{diff:>16.2f}")
        print("+ms = median of per-round differences to isolation = process")
        for level, goal in (("namespace", 2.0), ("sandbox", 3.0)):
            if level in times:
                diff = median([a - b for a, b in zip(times[level], times["process"])]) * 1000
                verdict = "met" if diff <= goal else f"MISSED by {diff - goal:.2f} ms"
                print(f"goal: {level} adds <= {goal:g} ms: +{diff:.2f} ms, {verdict}")
    finally:
        sb.close()


if __name__ == "__main__":
    main()
