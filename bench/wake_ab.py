#!/usr/bin/env python3
"""Two builds of the supervisor side by side: how long does each take to wake an instance?

    python3 bench/wake_ab.py --a OLD_DIR --b NEW_DIR [--rounds 10] [--wakes 15]
                             [--runtime native|python] [--proxy]

Each DIR holds a `tenement-supervisor` and the `tenement-exec` built with it (`cargo build
--release -p tenement-supervisor` at the revision to compare, both binaries copied out; the
exec helper's protocol changes with the supervisor, so they go together). Every round starts
a fresh sandbox per side, A and B in an order that alternates, and wakes one stopped instance
--wakes times (each wake followed by a stop, untimed, and a 20 ms pause). Reported: each side's
median of the supervisor's own `elapsed_us` from the `woken` replies, the median of the
per-round ratios B/A, and the CPU tenement's own processes spent per wake. The instance is
tiny-http (native, from this tree's target/release) or examples/notes/app.py (python),
listen = "tcp", isolation = "process".

With --proxy each DIR holds the `tenement-proxy` of its build too, and what is timed is the
issue's figure: one `GET /` on a fresh connection through the proxy to the stopped instance,
from the client's connect to the whole answer (the proxy asks for the wake; 0.3 s between
the stop and the request, so the stop has reached the proxy's route table).
"""

import argparse
import os
import sys
import time

import loadtools
import tenement_bench
from tenement_bench import ROOT, Sandbox, free_port, machine, median

SERVICES = {
    "native": '[service.app]\ncommand = "{release}/tiny-http"\nidle_timeout = 0\n',
    "python": ('[service.app]\ncommand = "{python} app.py"\nworkdir = "{root}/examples/notes"\n'
               'idle_timeout = 0\n[service.app.env]\nDATA_DIR = "{{data_dir}}/{{id}}"\n'),
}


def proxied_get(port):
    """One `GET /` for app:ab through the proxy on a fresh connection: (status, ms)."""
    t0 = time.perf_counter()
    status, _ = loadtools.get(port, "ab.app.localhost", "/", timeout=30)
    return status, (time.perf_counter() - t0) * 1000


def side(build_dir, runtime, wakes, release, proxy):
    """`wakes` wake times in ms with the binaries of `build_dir` (the supervisor's elapsed_us,
    or with `proxy` a client's GET through that build's proxy), and the clock ticks of CPU
    tenement's processes spent during them."""
    tenement_bench.RELEASE = build_dir  # Sandbox starts the supervisor and proxy from here
    services = SERVICES[runtime].format(release=release, python=sys.executable, root=ROOT)
    sb = Sandbox(services, listen=f"127.0.0.1:{free_port()}" if proxy else None)
    try:
        sb.start_supervisor()
        if proxy:
            # As root the proxy drops to nobody, which must reach run/proxy.sock.
            os.chmod(sb.dir, 0o711)
            sb.start_proxy()
            port = int(sb.listen.rsplit(":", 1)[1])
        rpc = sb.admin()
        rpc.call({"type": "add", "instances": ["app:ab"]})
        if proxy:
            loadtools.wait_proxy_synced_at(port, "ab.app.localhost", timeout=30)  # warm-up
        else:
            rpc.call({"type": "wake", "instance": "app:ab"})  # warm-up, not counted
        rpc.call({"type": "stop", "instance": "app:ab"})
        took = []
        ticks = 0
        for _ in range(wakes):
            if proxy:
                time.sleep(0.3)
                before = loadtools.tenement_cpu_ticks(sb)
                status, ms = proxied_get(port)
                ticks += loadtools.tenement_cpu_ticks(sb) - before
                if status != 200:
                    raise SystemExit(f"{build_dir}: the proxy answered {status}; see {sb.dir}")
                took.append(ms)
            else:
                time.sleep(0.02)
                before = loadtools.tenement_cpu_ticks(sb)
                reply = rpc.call({"type": "wake", "instance": "app:ab"})
                ticks += loadtools.tenement_cpu_ticks(sb) - before
                if reply.get("type") != "woken" or not reply.get("started"):
                    raise SystemExit(f"{build_dir}: wake answered {reply}")
                took.append(reply["elapsed_us"] / 1000)
            rpc.call({"type": "stop", "instance": "app:ab"})
        return took, ticks
    finally:
        sb.close()
        tenement_bench.RELEASE = release


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="directory with the first build's supervisor and exec helper")
    ap.add_argument("--b", required=True, help="directory with the second build's")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--wakes", type=int, default=15, help="wakes per side and round")
    ap.add_argument("--runtime", choices=sorted(SERVICES), default="native")
    ap.add_argument("--proxy", action="store_true",
                    help="time a GET through each build's proxy instead of the admin wake")
    args = ap.parse_args()
    names = ("tenement-supervisor", "tenement-exec") + (("tenement-proxy",) if args.proxy else ())
    for d in (args.a, args.b):
        for name in names:
            if not os.access(os.path.join(d, name), os.X_OK):
                raise SystemExit(f"{d} has no executable {name}")
    release = tenement_bench.RELEASE
    if args.runtime == "native" and not os.access(os.path.join(release, "tiny-http"), os.X_OK):
        raise SystemExit(f"no {release}/tiny-http: cargo build --release -p tenement-fixtures")
    per_round = {"A": [], "B": []}
    ticks = {"A": 0, "B": 0}
    for r in range(args.rounds):
        order = [("A", args.a), ("B", args.b)]
        for name, d in order if r % 2 == 0 else reversed(order):
            took, spent = side(d, args.runtime, args.wakes, release, args.proxy)
            per_round[name].append(took)
            ticks[name] += spent
        print(f"  round {r + 1}/{args.rounds}: A {median(per_round['A'][-1]):.2f} ms, "
              f"B {median(per_round['B'][-1]):.2f} ms", file=sys.stderr, flush=True)
    a = [t for rnd in per_round["A"] for t in rnd]
    b = [t for rnd in per_round["B"] for t in rnd]
    ratios = [median(y) / median(x) for x, y in zip(per_round["A"], per_round["B"])]
    what = "GET through the proxy" if args.proxy else "in sup"
    print(f"# wake A/B: {args.runtime}, {args.rounds} interleaved rounds of {args.wakes} wakes; {machine()}")
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    cpu = {name: ticks[name] * tick_ms / (args.rounds * args.wakes) for name in ticks}
    print(f"A {args.a}: {what} median {median(a):.2f} ms, CPU {cpu['A']:.2f} ms per wake")
    print(f"B {args.b}: {what} median {median(b):.2f} ms, CPU {cpu['B']:.2f} ms per wake")
    print(f"B/A: {median(ratios):.3f} (median of per-round ratios)")
    print("CPU = user + system time of the supervisor, its exec server and (with --proxy) the proxy during "
          "the timed wakes, in clock ticks of " + f"{tick_ms:.0f} ms, per wake")


if __name__ == "__main__":
    main()
