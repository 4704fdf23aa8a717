#!/usr/bin/env python3
"""Proxy throughput: wrk against the same fast native backend (tiny-http) three ways, side by
side in one run with interleaved rounds:

  direct    wrk -> tiny-http started directly on a port
  nginx     wrk -> nginx (2 workers, upstream keepalive 64, HTTP/1.1, Connection "") -> that tiny-http
  tenement  wrk -> tenement-proxy -> the instance tiny:a (a tiny-http the supervisor runs,
            woken before the first round), Host: a.tiny.localhost

HTTP/2 from the client, in the same rounds: h2load (cleartext, prior knowledge, one stream at a
time per connection) against nginx's `listen ... http2` port and against tenement-proxy (which
tells HTTP/2 from HTTP/1 by the client's first bytes), both still HTTP/1.1 to tiny-http.

1 wrk thread; 1, 4, 32 and 1,000 connections; each run `--duration` seconds. Round r runs, for
each connection count, the three configs in an order rotated by r. Reports medians of rps and
p50, medians of per-round ratios, the p50 added over direct, the proxy's (and nginx workers')
CPU time per request from /proc/PID/stat utime+stime, and their memory: the highest RSS seen
during a run (sampled every 100 ms; nginx: its workers' summed). The proxy's per-client
connection cap (256 by default) is raised for the run: every connection comes from 127.0.0.1.
Memory per idle connection, from a fresh process, is tls_throughput.py's section 4. SYN drops
are the kernel's ListenOverflows counter over each run (wrk's first connects included).

    python3 bench/proxy_throughput.py [--rounds 5] [--duration 5] [--connections 1,4,32,1000]
"""

import argparse
import os
import resource
import sys
import threading

from loadtools import build, cpu_ticks, CLK_TCK, ensure_tools, h2load, listen_overflows, memory, revision, \
    snapshot_binaries, warm_tiny, WARM_HOST as HOST, wrk
from tenement_bench import machine, median
CONFIGS = ["direct", "nginx", "tenement", "nginx-h2", "tenement-h2"]
WRK_CONFIGS = CONFIGS[:3]

GOAL_RPS_VS_NGINX = 1.2     # at every connection count
GOAL_CPU_VS_NGINX = 0.8     # proxy CPU per request against nginx's workers'
GOAL_P99_VS_NGINX = 1.0     # p99 latency no worse than nginx's


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", default="1,4,32,1000")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(conns) + 1024)), hard))
    ensure_tools("wrk", "nginx", "h2load")
    if not args.no_build:
        build()
    snapshot_binaries()

    settings = [f"max_connections_per_client = {2 * max(conns) + 64}"]
    with warm_tiny(settings_extra=settings, h2c=True) as (tiny_port, nginx, sb):
        proxy_pid = sb.proxy.pid
        ports = {"direct": tiny_port, "nginx": nginx.port, "tenement": sb.proxy_port,
                 "nginx-h2": nginx.h2c_port, "tenement-h2": sb.proxy_port}

        def run(cfg, c, duration):
            if cfg.endswith("-h2"):
                return h2load(ports[cfg], c, duration, HOST)
            return wrk(ports[cfg], c, duration, host=HOST)

        # Warm-up: upstream connection pools, page cache, CPU frequency.
        for c in conns:
            for cfg in CONFIGS:
                run(cfg, c, 1)

        rows = {}  # (cfg, c) -> list of per-round dicts
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for c in conns:
                for cfg in order:
                    side = cfg.removesuffix("-h2")
                    pids = ([proxy_pid] if side == "tenement" else nginx.workers() if side == "nginx" else [])
                    before = sum(map(cpu_ticks, pids))
                    overflows = listen_overflows()[0]
                    with PeakRss(pids) as peak:
                        res = run(cfg, c, args.duration)
                    res["syn_drops"] = listen_overflows()[0] - overflows
                    after = sum(map(cpu_ticks, pids))
                    res["cpu_us"] = ((after - before) / CLK_TCK * 1e6 / res["requests"]
                                     if cfg != "direct" and res["requests"] else float("nan"))
                    res["peak_mib"] = (peak.peak / 1024 if pids else float("nan"))
                    rows.setdefault((cfg, c), []).append(res)
                    print(f"  round {r + 1}/{args.rounds} c={c:<3} {cfg:<11} {res['rps']:>9.0f} rps "
                          f"p50 {res.get('p50_us', float('nan')):>7.0f} us  cpu/req {res['cpu_us']:>6.1f} us"
                          f"{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}",
                          file=sys.stderr, flush=True)
        report(args, conns, rows)
        errors = sum(x["errors"] for v in rows.values() for x in v)
        if errors:
            print(f"\n{errors} wrk errors (socket errors or non-2xx); proxy log: {sb.dir}/proxy.log")
            with open(os.path.join(sb.dir, "proxy.log")) as f:
                tail = f.read()[-3000:]
            print(tail)


class PeakRss:
    """The highest RSS of `pids` (KiB) while the block runs, sampled every 100 ms."""

    def __init__(self, pids):
        self.pids = pids
        self.peak = 0
        self.done = threading.Event()

    def __enter__(self):
        self.peak = memory(self.pids)[0]
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, memory(self.pids)[0])

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def report(args, conns, rows):
    print(f"# proxy throughput: wrk -t1, {args.duration} s per run, {args.rounds} interleaved rounds; "
          f"{machine()}; {revision()}")
    print(f"{'conns':>5} {'config':<9}{'rps':>10}{'p50 us':>9}{'p99 us':>9}{'+p50 us':>9}"
          f"{'cpu us/req':>11}{'RSS MiB':>9}{'errors':>8}{'SYN drops':>10}")
    for c in conns:
        for cfg in WRK_CONFIGS:
            xs = rows[(cfg, c)]
            added = ("" if cfg == "direct" else
                     f"{median([x['p50_us'] - d['p50_us'] for x, d in zip(xs, rows[('direct', c)])]):.0f}")
            cpu = "" if cfg == "direct" else f"{median([x['cpu_us'] for x in xs]):.1f}"
            mem = "" if cfg == "direct" else f"{median([x['peak_mib'] for x in xs]):.1f}"
            print(f"{c:>5} {cfg:<9}{median([x['rps'] for x in xs]):>10.0f}"
                  f"{median([x['p50_us'] for x in xs]):>9.0f}{median([x['p99_us'] for x in xs]):>9.0f}"
                  f"{added:>9}{cpu:>11}{mem:>9}{sum(x['errors'] for x in xs):>8}"
                  f"{sum(x['syn_drops'] for x in xs):>10}")
    print()
    print("per-round ratios (median [min..max] over rounds):")
    print(f"{'conns':>5}{'tenement/nginx rps':>26}{'tenement/direct rps':>26}{'nginx/direct rps':>24}")
    summary = {}
    for c in conns:
        t, n, d = rows[("tenement", c)], rows[("nginx", c)], rows[("direct", c)]
        tn = [a["rps"] / b["rps"] for a, b in zip(t, n)]
        td = [a["rps"] / b["rps"] for a, b in zip(t, d)]
        nd = [a["rps"] / b["rps"] for a, b in zip(n, d)]
        summary[c] = {
            "tn": median(tn),
            "cpu": median([a["cpu_us"] / b["cpu_us"] for a, b in zip(t, n)]),
            "p99": median([a["p99_us"] / b["p99_us"] for a, b in zip(t, n)]),
        }
        fmt = lambda xs: f"{median(xs):.3f} [{min(xs):.2f}..{max(xs):.2f}]"
        print(f"{c:>5}{fmt(tn):>26}{fmt(td):>26}{fmt(nd):>24}")
    print()
    print("HTTP/2 from the client (h2load -m 1; mean latency, as h2load reports no percentiles):")
    print(f"{'conns':>5} {'config':<12}{'rps':>10}{'mean us':>9}{'cpu us/req':>11}{'errors':>8}"
          f"{'tenement/nginx rps':>26}{'cpu ratio':>16}")
    for c in conns:
        t, n = rows[("tenement-h2", c)], rows[("nginx-h2", c)]
        fmt = lambda xs: f"{median(xs):.3f} [{min(xs):.2f}..{max(xs):.2f}]"
        for cfg in ("nginx-h2", "tenement-h2"):
            xs = rows[(cfg, c)]
            ratios = ("", "") if cfg == "nginx-h2" else (
                fmt([a["rps"] / b["rps"] for a, b in zip(t, n)]),
                fmt([a["cpu_us"] / b["cpu_us"] for a, b in zip(t, n)]))
            print(f"{c:>5} {cfg:<12}{median([x['rps'] for x in xs]):>10.0f}"
                  f"{median([x['mean_us'] for x in xs]):>9.0f}{median([x['cpu_us'] for x in xs]):>11.1f}"
                  f"{sum(x['errors'] for x in xs):>8}{ratios[0]:>26}{ratios[1]:>16}")
        summary[("h2", c)] = {
            "tn": median([a["rps"] / b["rps"] for a, b in zip(t, n)]),
            "cpu": median([a["cpu_us"] / b["cpu_us"] for a, b in zip(t, n)]),
            "p99": median([a["mean_us"] / b["mean_us"] for a, b in zip(t, n)]),
        }
    print()
    print("goals (per-round ratios against nginx, medians; HTTP/2 compares mean latency):")
    for c, s in summary.items():
        c = f"{c[1]} h2" if isinstance(c, tuple) else str(c)
        print(f"  c={c:<5} rps >= {GOAL_RPS_VS_NGINX}x nginx: {s['tn']:.2f}x "
              f"{'MET' if s['tn'] >= GOAL_RPS_VS_NGINX else 'MISSED'};  "
              f"CPU/request <= {GOAL_CPU_VS_NGINX}x nginx: {s['cpu']:.2f}x "
              f"{'MET' if s['cpu'] <= GOAL_CPU_VS_NGINX else 'MISSED'};  "
              f"p99 <= {GOAL_P99_VS_NGINX}x nginx: {s['p99']:.2f}x "
              f"{'MET' if s['p99'] <= GOAL_P99_VS_NGINX else 'MISSED'}")
    print("cpu us/req = utime+stime of the proxy process (nginx: sum of its workers) during the run "
          f"/ requests completed (clock tick {1e6 / CLK_TCK:.0f} us); "
          "+p50 = median over rounds of (p50 - direct p50 in the same round); RSS MiB = the highest "
          "VmRSS during the run (nginx: its workers' summed); per idle connection: tls_throughput.py "
          "section 4; errors, SYN drops = summed over rounds (drops: the kernel's ListenOverflows, any "
          "listener on the machine)")


if __name__ == "__main__":
    main()
