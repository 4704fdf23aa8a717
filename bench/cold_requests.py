#!/usr/bin/env python3
"""Simultaneous requests: N requests at once to one instance through the proxy, against the
same app started directly, in two modes:

- cold: the instance is stopped before each burst, so the N requests share one wake; the
  direct side starts the app, polls its port every 1 ms (like cold_wake.py's direct start) and
  sends the same N at once. Latency counts from the moment the requests are fired (proxy) or
  the app is launched (direct).
- warm: the instance is running and idle (the app started directly has been listening for
  0.3 s) and gets a sudden burst. Latency counts from the burst.

Both sides open N fresh connections at once with non-blocking connects and `Connection: close`.
Interleaved rounds (which side goes first alternates).

Services: `python` (examples/notes/app.py, listen backlog 128, listen = "tcp": the app binds
its own port), `python-activate` (the same app, listen = "activate": the supervisor binds the
socket and the app inherits it; its direct side is the plain direct start, which is what
"without tenement" means), `native` (tiny-http, backlog 128) and `pyserver` (`python3 -m
http.server`, Python's own server with its default listen backlog of 5: a burst larger than 5
overflows its accept queue, and each dropped SYN is retried by the client a second later).

Also counted per side: SYNs the kernel dropped because an accept queue was full (TcpExt
ListenOverflows, whole network namespace), and on the proxy side how many processes the N
requests started (cold: exactly 1, single flight; warm: none).

    python3 bench/cold_requests.py [--rounds 5] [--n 10,100,1000] [--modes cold,warm]
                                   [--services python,python-activate,native,pyserver]
"""

import argparse
import os
import resource
import signal
import subprocess
import sys
import time

import loadtools
from loadtools import build, fire, keep_logs, listen_overflows, proxied_sandbox, revision, snapshot_binaries, \
    wait_proxy_synced
from tenement_bench import ROOT, free_port, machine, median, p, wait_port

SERVICES = """
[service.python]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
idle_timeout = 0
[service.python.env]
DATA_DIR = "{data_dir}/{id}"

[service.python-activate]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
listen = "activate"
ready = "tcp"
idle_timeout = 0
[service.python-activate.env]
DATA_DIR = "{data_dir}/{id}"

[service.native]
command = "@BIN@/tiny-http"
idle_timeout = 0

[service.pyserver]
command = "python3 -m http.server {port} --bind 127.0.0.1"
workdir = "@ROOT@/examples"
idle_timeout = 0
"""

CLIENT_TIMEOUT = 40.0  # seconds; longer than Linux's SYN-ACK retry span (~31 s)


def direct_argv(service, port):
    if service == "pyserver":
        return ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"], os.path.join(ROOT, "examples")
    if service.startswith("python"):
        return ["python3", "app.py"], os.path.join(ROOT, "examples/notes")
    return [os.path.join(loadtools.BIN, "tiny-http")], ROOT


def started_events(rpc, inst):
    lines = rpc.call({"type": "logs", "instance": inst})["lines"]
    return sum(1 for x in lines if x["stream"] == "event" and x["line"].startswith("started"))


def proxy_side(sb, rpc, service, n, warm):
    inst = f"{service}:cold"
    host = f"cold.{service}.localhost"
    if warm:
        # A burst on a running instance: awake, idle, nothing kept open to it.
        reply = rpc.call({"type": "wake", "instance": inst})
        assert reply["type"] == "woken", reply
        wait_proxy_synced(sb, host, timeout=30)
        time.sleep(0.3)
    else:
        st = rpc.call({"type": "stop", "instance": inst})
        assert st["type"] == "ok", st
        # Let the stop reach the proxy's route table (the watch stream) and the machine
        # settle, so the requests take the normal cold path, not the "connect refused, wake"
        # fallback.
        time.sleep(0.3)
        state = rpc.call({"type": "status", "instance": inst})["status"]["state"]
        assert state == "stopped", state
    before = started_events(rpc, inst)
    pid_before = rpc.call({"type": "status", "instance": inst})["status"].get("pid")
    results = fire(sb.proxy_port, n, host, timeout=CLIENT_TIMEOUT)
    pid_after = rpc.call({"type": "status", "instance": inst})["status"].get("pid")
    if warm:
        # The app's own log lines (one per request for pyserver) can push the start events out
        # of the instance's log buffer: the same pid before and after says no start.
        return results, 0 if pid_before == pid_after else 1
    return results, started_events(rpc, inst) - before


def direct_side(service, n, tmp, warm):
    port = free_port()
    argv, cwd = direct_argv(service, port)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOST": "127.0.0.1",
           "DATA_DIR": os.path.join(tmp, "direct")}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, started)
        if warm:
            time.sleep(0.3)
            started = None  # the burst's own clock, as on the proxy side
        return fire(port, n, f"cold.{service}.localhost", started=started, timeout=CLIENT_TIMEOUT)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", default="10,100,1000")
    ap.add_argument("--services", default="python,python-activate,native,pyserver")
    ap.add_argument("--modes", default="cold,warm",
                    help="cold: the instance is stopped before each burst; warm: it is running and idle")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    services = args.services.split(",")
    modes = args.modes.split(",")
    if any(m not in ("cold", "warm") for m in modes):
        raise SystemExit(f"--modes takes cold and/or warm, not {args.modes!r}")
    # N connections at once need N descriptors here, and the direct app as many.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    if not args.no_build:
        build()
    snapshot_binaries()
    # Every burst comes from this one address: let it hold N connections (by default one
    # address may hold 256, and its connections past that are closed at once).
    sb = proxied_sandbox(SERVICES, settings_extra=[f"max_connections_per_client = {max(ns) + 16}"])
    failures = []    # (round, service, n, side, [(status, error)])
    wake_counts = []  # proxy rounds that did not start exactly one process
    try:
        rpc = sb.admin()
        rpc.call({"type": "add", "instances": [f"{s}:cold" for s in services]})
        for s in services:
            rpc.call({"type": "wake", "instance": f"{s}:cold"})
            wait_proxy_synced(sb, f"cold.{s}.localhost", timeout=30)
        data = {}  # (service, mode, n) -> list of {side: [seconds]}
        drops = {}  # (service, mode, n, side) -> list of ListenOverflows deltas
        for r in range(args.rounds):
            for service in services:
                for mode in modes:
                    warm = mode == "warm"
                    for n in ns:
                        sides = ["proxy", "direct"] if r % 2 == 0 else ["direct", "proxy"]
                        got = {}
                        for side in sides:
                            ovf0 = listen_overflows()[0]
                            if side == "proxy":
                                res, wakes = proxy_side(sb, rpc, service, n, warm)
                                if wakes != (0 if warm else 1):
                                    wake_counts.append((r + 1, service, mode, n, wakes))
                            else:
                                res = direct_side(service, n, sb.dir, warm)
                            ovf = listen_overflows()[0] - ovf0
                            drops.setdefault((service, mode, n, side), []).append(ovf)
                            bad = [(status, err) for _, status, err in res if status != 200]
                            if bad:
                                failures.append((r + 1, f"{service} {mode}", n, side, bad))
                            got[side] = sorted(t for t, _, _ in res)
                            times = got[side]
                            print(f"  round {r + 1}/{args.rounds} {service:<15} {mode} N={n:<5}{side:<7}"
                                  f"p50 {p(times, 50) * 1000:8.1f} ms  max {times[-1] * 1000:8.1f} ms"
                                  f"  SYN drops {ovf}"
                                  f"{'  FAILED ' + str(len(bad)) if bad else ''}", file=sys.stderr, flush=True)
                        data.setdefault((service, mode, n), []).append(got)
        print(f"# simultaneous requests: N at once to a stopped (cold) or running, idle (warm) instance, "
              f"{args.rounds} interleaved rounds; {machine()}; {revision()}")
        print(f"{'service':<16}{'mode':<5}{'N':>5} | {'direct p50':>10}{'p90':>8}{'max':>8} | {'proxy p50':>10}"
              f"{'p90':>8}{'max':>8} | {'p50 ratio':>9}{'p90 ratio':>10}{'max ratio':>10} | "
              f"{'SYN drops d/p':>13}")
        for (service, mode, n), rounds in data.items():
            stat = lambda side, q: [p(x[side], q) for x in rounds]
            dmax = [x["direct"][-1] for x in rounds]
            pmax = [x["proxy"][-1] for x in rounds]
            ratio = lambda a, b: median([x / y for x, y in zip(a, b)])
            d50, d90, p50, p90 = stat("direct", 50), stat("direct", 90), stat("proxy", 50), stat("proxy", 90)
            dd = median(drops[(service, mode, n, "direct")])
            dp = median(drops[(service, mode, n, "proxy")])
            print(f"{service:<16}{mode:<5}{n:>5} | {median(d50) * 1000:>10.1f}{median(d90) * 1000:>8.1f}"
                  f"{median(dmax) * 1000:>8.1f} | {median(p50) * 1000:>10.1f}{median(p90) * 1000:>8.1f}"
                  f"{median(pmax) * 1000:>8.1f} | {ratio(p50, d50):>9.2f}{ratio(p90, d90):>10.2f}"
                  f"{ratio(pmax, dmax):>10.2f} | {dd:>6.0f}/{dp:<6.0f}")
        print("ms; each cell is the median over rounds of that round's p50/p90/max over the N requests; "
              "ratios (proxy/direct) are medians of per-round ratios; SYN drops = median per round of "
              "TcpExt ListenOverflows (accept queue full), direct/proxy")
        print(f"failed requests (non-200 or connection errors): {sum(len(f[4]) for f in failures)}")
        for r, service, n, side, bad in failures:
            kinds = {}
            for status, err in bad:
                kinds[status or err] = kinds.get(status or err, 0) + 1
            print(f"  round {r} {service} N={n} {side}: {kinds}")
        print(f"proxy rounds that did not start exactly one process (cold) or none (warm): "
              f"{wake_counts or 'none'}")
        if failures or wake_counts:
            kept = keep_logs(sb)
            print(f"  sandbox logs kept in {kept}; last proxy log lines:")
            with open(os.path.join(kept, "proxy.log")) as f:
                print("".join(f.readlines()[-10:]))
    finally:
        sb.close()
    # Exit status: the proxy's side only (the direct side's failures are the app's own).
    return 1 if wake_counts or any(f[3] == "proxy" for f in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
