#!/usr/bin/env python3
"""Metrics cost: what the proxy's Prometheus metrics cost, in three parts.

1. Requests with metrics on and off. One supervisor runs the instance tiny:a (tiny-http,
   idle_timeout 0, woken first). Each round starts two fresh proxies against it, side by side:
   "on" with `--metrics-listen 127.0.0.1:PORT` (so it records every request) and "off" without
   one (its Metrics is built disabled and records nothing); otherwise the same config. Then,
   for 1, 4 and 32 connections, wrk -t1 for `--duration` seconds against each, the one that
   goes first alternating with the round (after a 1 s warm-up run of each). Both proxies are
   stopped at the end of the round, so no process-specific luck (placement, layout) lasts
   more than a round. Nothing scrapes during the runs: this is the cost of recording. After
   each round the "on" proxy is scraped once to check that it counted every request.
   Reports medians over rounds of rps, p50, p99 and the proxy's CPU per request, and per-round
   on/off ratios and on-minus-off CPU differences, median [min..max]. CPU per request is the
   proxy's utime+stime (/proc/PID/stat, clock ticks of 10 ms) over the run divided by the
   requests wrk completed; it is also given from the threads' schedstat run time (ns) for a
   finer reading of a sub-microsecond difference.

2. A scrape at scale. A second supervisor with `--instances` (10,000) tenants of tiny-http
   registered with the admin RPC `add` (batches of 1,000, as scale.py registers them) and
   `--running` (100) of them woken with the admin RPC `wake`. For metrics_per_instance false
   and true (a copy of the config with `metrics_per_instance = true` in [settings]), each
   round starts a fresh proxy with a metrics listener, sends one request to every running
   tenant through it (so the route table is synced and the per-instance request counters are
   non-zero), waits a second, then scrapes GET /metrics `--scrapes` times one after another,
   each on a new connection, timed from connect to the last byte of the body. Which setting
   goes first alternates with the round. Reports the time to answer (median, p90, max over
   every scrape), the body's bytes, lines and series, the proxy's VmRSS before the first and
   after the last scrape, the supervisor's, and both daemons' CPU per scrape (each scrape asks
   the supervisor for `stats`; with metrics_per_instance it reads every running instance's
   memory and CPU, from its cgroup or /proc).

3. The recording itself, in-process (`proxy/examples/metrics_record.rs`): the calls the request
   path makes for one proxied request (its status and duration into the service's counter and
   histogram, the response body's bytes), timed over millions of requests on one thread and
   on as many threads as the proxy has workers, all counting into one service's series (the
   contended case), with metrics on and off, alternating, 11 rounds. This reads a difference
   of nanoseconds that part 1's wrk runs cannot resolve on a shared machine.

Goals (from the issue): with metrics on, at most 2 % fewer requests per second and at most
0.5 us more proxy CPU per request. Needs root (the proxy drops to nobody); installs wrk with
apt-get when missing.

    python3 bench/metrics_cost.py [--rounds 5] [--duration 5] [--connections 1,4,32]
        [--instances 10000] [--running 100] [--scrapes 20] [--scrape-rounds 2] [--no-build]

--rounds 0 skips part 1, --scrape-rounds 0 part 2, --record-rounds 0 part 3.
"""

import argparse
import http.client
import os
import re
import socket
import subprocess
import sys
import time

import loadtools
import tenement_bench
from loadtools import WARM_HOST, WARM_SERVICES, add_and_wake, CLK_TCK, build, cpu_ticks, ensure_tools, get, \
    keep_logs, revision, snapshot_binaries, wrk
from tenement_bench import Sandbox, free_port, machine, median, p, proc_stats, stop

HOST, SERVICES = WARM_HOST, WARM_SERVICES
MODES = ["off", "on"]
BATCH = 1000

GOAL_RPS_RATIO = 0.98   # on/off
GOAL_CPU_US = 0.5       # on - off, per request


def log(text):
    """Progress, on stderr (stdout is the report)."""
    print(text, file=sys.stderr, flush=True)


def sandbox(port_range=tenement_bench.DEFAULT_PORT_RANGE):
    """A Sandbox whose supervisor is started; proxies are started apart (start_proxy)."""
    sb = Sandbox(SERVICES.replace("@BIN@", loadtools.BIN), port_range=port_range)
    os.chmod(sb.dir, 0o711)  # the proxy drops to nobody and must reach run/proxy.sock
    try:
        sb.start_supervisor()
    except BaseException:
        sb.close()
        raise
    return sb


def config_with(sb, name, settings_extra):
    """A copy of the sandbox's config with more [settings] lines, for a proxy to read."""
    with open(sb.config) as f:
        text = f.read().replace("[settings]\n", "[settings]\n" + settings_extra, 1)
    path = os.path.join(sb.dir, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


def start_proxy(sb, config, port, metrics_port=None, name="proxy"):
    """tenement-proxy on 127.0.0.1:port (and a metrics listener on metrics_port), reading
    `config`; returns its Popen once the port accepts."""
    logf = open(os.path.join(sb.dir, f"{name}.log"), "a")
    args = [os.path.join(tenement_bench.RELEASE, "tenement-proxy"), "--config", config,
            "--listen", f"127.0.0.1:{port}"]
    if metrics_port:
        args += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    if os.geteuid() == 0:
        args += ["--user", "nobody"]
    proc = subprocess.Popen(args, stdout=logf, stderr=logf)
    logf.close()
    deadline = time.time() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}; see {sb.dir}/{name}.log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.time() > deadline:
                stop(proc)
                raise RuntimeError(f"{name} did not start; see {sb.dir}/{name}.log")
            time.sleep(0.01)


def wait_ok(port, host, timeout=15.0):
    """Waits until a GET for `host` through the proxy on `port` answers 200; returns how many
    requests it took."""
    deadline = time.time() + timeout
    sent, last = 0, None
    while time.time() < deadline:
        sent += 1
        try:
            status, _ = get(port, host, "/", timeout=5)
            if status == 200:
                return sent
            last = status
        except (OSError, http.client.HTTPException) as e:
            last = e
        time.sleep(0.02)
    raise RuntimeError(f"the proxy on {port} never answered 200 for {host}: {last}")


def sched_ns(pid):
    """Run time of a process's live threads (schedstat, ns) and their ids."""
    total, tids = 0, set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            tids.add(tid)
        except OSError:
            pass
    return total, tids


def scrape(port, timeout=30.0):
    """GET /metrics on a new connection; returns (seconds from connect to the body's end, body)."""
    started = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read()
        took = time.perf_counter() - started
        if r.status != 200:
            raise RuntimeError(f"GET /metrics answered {r.status}: {body[:200]!r}")
        return took, body
    finally:
        c.close()


def sample_value(text, series):
    """The value of one series (`name{labels}` exactly as written) in an exposition, or None."""
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def count_series(text, name):
    return len(re.findall(r"^" + re.escape(name) + r"[{ ]", text, re.M))


def fmt_spread(xs, digits=3, sign=False):
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(median(xs))} [{f.format(min(xs))}..{f.format(max(xs))}]"


# ---- 1. throughput with metrics on and off ---------------------------------------------------

def throughput(args, conns):
    sb = sandbox()
    rows = {}  # (mode, c) -> [per-round dicts]
    checks = []
    try:
        rpc = add_and_wake(sb)
        rpc.close()
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            ports = {m: free_port() for m in MODES}
            while ports["on"] == ports["off"]:
                ports["on"] = free_port()
            metrics_port = free_port()
            procs = {}
            try:
                for mode in order:
                    procs[mode] = start_proxy(sb, sb.config, ports[mode],
                                              metrics_port if mode == "on" else None, name=f"proxy-{mode}")
                own_requests = {m: wait_ok(ports[m], HOST) for m in MODES}
                completed = {m: 0 for m in MODES}
                runs = {m: 0 for m in MODES}
                for c in conns:  # warm-up: upstream pools, page cache, CPU frequency
                    for mode in order:
                        res = wrk(ports[mode], c, 1, host=HOST)
                        completed[mode] += res["requests"]
                        runs[mode] += c
                for c in conns:
                    for mode in order:
                        pid = procs[mode].pid
                        t0, (n0, tids0) = cpu_ticks(pid), sched_ns(pid)
                        res = wrk(ports[mode], c, args.duration, host=HOST)
                        t1, (n1, tids1) = cpu_ticks(pid), sched_ns(pid)
                        n = res["requests"]
                        res["cpu_us"] = (t1 - t0) / CLK_TCK * 1e6 / n if n else float("nan")
                        res["sched_us"] = (n1 - n0) / 1e3 / n if n and tids0 <= tids1 else float("nan")
                        completed[mode] += n
                        runs[mode] += c
                        rows.setdefault((mode, c), []).append(res)
                        log(f"  round {r + 1}/{args.rounds} c={c:<3} metrics {mode:<3} {res['rps']:>9.0f} rps "
                            f"p50 {res['p50_us']:>6.0f} us p99 {res['p99_us']:>6.0f} us  cpu/req "
                            f"{res['cpu_us']:>5.1f} us (schedstat {res['sched_us']:>5.2f})"
                            f"{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}")
                # The "on" proxy must have counted every request it answered: those wrk completed,
                # the readiness GETs, and at most one per connection that wrk left at its end.
                _, body = scrape(metrics_port)
                text = body.decode()
                counted = sum(float(v) for v in re.findall(
                    r'^tenement_http_requests_total\{service="tiny",class="\dxx"\} (\S+)$', text, re.M))
                expected = completed["on"] + own_requests["on"]
                checks.append((counted, expected, runs["on"]))
            finally:
                for proc in procs.values():
                    stop(proc)
            log(f"round {r + 1}/{args.rounds} done")
    except Exception:
        log(f"logs kept in {keep_logs(sb)}")
        raise
    finally:
        sb.close()
    return rows, checks


def report_throughput(args, conns, rows, checks):
    print(f"1. requests with metrics on and off: wrk -t1, {args.duration} s per run, {args.rounds} rounds, "
          f"two fresh proxies per round (on: --metrics-listen, off: none), which goes first alternating")
    print(f"{'conns':>5} {'metrics':<8}{'rps':>9}{'p50 us':>8}{'p99 us':>8}{'cpu us/req':>12}"
          f"{'schedstat us/req':>18}{'errors':>8}")
    for c in conns:
        for mode in MODES:
            xs = rows[(mode, c)]
            print(f"{c:>5} {mode:<8}{median([x['rps'] for x in xs]):>9.0f}{median([x['p50_us'] for x in xs]):>8.0f}"
                  f"{median([x['p99_us'] for x in xs]):>8.0f}{median([x['cpu_us'] for x in xs]):>12.2f}"
                  f"{median([x['sched_us'] for x in xs]):>18.2f}{sum(x['errors'] for x in xs):>8}")
    print("on/off per round, median [min..max] over rounds:")
    print(f"{'conns':>5}{'rps on/off':>24}{'cpu on-off us/req':>27}{'schedstat on-off us/req':>27}"
          f"{'p99 on/off':>24}")
    summary = {}
    for c in conns:
        on, off = rows[("on", c)], rows[("off", c)]
        rps = [a["rps"] / b["rps"] for a, b in zip(on, off)]
        cpu = [a["cpu_us"] - b["cpu_us"] for a, b in zip(on, off)]
        sched = [a["sched_us"] - b["sched_us"] for a, b in zip(on, off)]
        p99 = [a["p99_us"] / b["p99_us"] for a, b in zip(on, off)]
        summary[c] = (rps, cpu, sched)
        print(f"{c:>5}{fmt_spread(rps):>24}{fmt_spread(cpu, 2, True):>27}{fmt_spread(sched, 2, True):>27}"
              f"{fmt_spread(p99, 2):>24}")
    ok = all(0 <= counted - expected <= slack for counted, expected, slack in checks)
    print(f"check: the on proxy's tenement_http_requests_total matched what it answered in every round: "
          f"{'yes' if ok else 'NO'} (" + ", ".join(f"{counted:.0f}/{expected}" for counted, expected, _ in checks)
          + " counted/answered; counted may exceed answered by one request per connection and run, "
          "the answers wrk left unread when it stopped)")
    def noise(xs, goal):
        return " (the rounds fall on both sides of the goal)" if min(xs) < goal < max(xs) else ""

    print("goals (median over rounds [min..max]):")
    for c, (rps, cpu, sched) in summary.items():
        print(f"  rps with metrics >= {GOAL_RPS_RATIO:.2f}x without (c={c}): {median(rps):.3f}x "
              f"[{min(rps):.3f}..{max(rps):.3f}]  {'MET' if median(rps) >= GOAL_RPS_RATIO else 'MISSED'}"
              f"{noise(rps, GOAL_RPS_RATIO)}")
    for c, (rps, cpu, sched) in summary.items():
        print(f"  proxy CPU with metrics <= +{GOAL_CPU_US} us/request (c={c}): {median(cpu):+.2f} us "
              f"[{min(cpu):+.2f}..{max(cpu):+.2f}] (schedstat {median(sched):+.2f} us "
              f"[{min(sched):+.2f}..{max(sched):+.2f}])  {'MET' if median(cpu) <= GOAL_CPU_US else 'MISSED'}"
              f"{noise(cpu, GOAL_CPU_US)}")
    errors = sum(x["errors"] for v in rows.values() for x in v)
    print(f"cpu us/req = utime+stime of the proxy during the run / requests wrk completed (clock tick "
          f"{1e6 / CLK_TCK:.0f} us); schedstat us/req = run time of its threads (ns) / requests; "
          f"wrk errors: {errors}")


# ---- 2. a scrape at scale -------------------------------------------------------------------

def cpu_per_scrape(before, after, scrapes):
    """CPU ms per scrape from (ticks, (schedstat ns, thread ids)) before and after: the threads'
    run time when none of them ended in between (tokio's blocking threads come and go), else
    utime+stime in clock ticks."""
    (t0, (n0, tids0)), (t1, (n1, tids1)) = before, after
    if tids0 <= tids1:
        return (n1 - n0) / 1e6 / scrapes
    return (t1 - t0) / CLK_TCK * 1e3 / scrapes


def ids(n):
    return [f"t{i:05}" for i in range(n)]


def scrape_at_scale(args):
    sb = sandbox(port_range="20000-31999")
    results = {m: [] for m in ("false", "true")}
    try:
        rpc = sb.admin()
        started = time.perf_counter()
        every = ids(args.instances)
        for i in range(0, len(every), BATCH):
            reply = rpc.call({"type": "add", "instances": [f"tiny:{t}" for t in every[i:i + BATCH]]})
            if reply.get("type") != "added":
                raise RuntimeError(f"add: {reply}")
        added = time.perf_counter() - started
        started = time.perf_counter()
        running = every[:args.running]
        for t in running:
            reply = rpc.call({"type": "wake", "instance": f"tiny:{t}"})
            if reply.get("type") != "woken":
                raise RuntimeError(f"wake tiny:{t}: {reply}")
        woken = time.perf_counter() - started
        rpc.close()
        log(f"  registered {args.instances:,} in {added:.2f} s, woke {args.running} in {woken:.2f} s")
        configs = {"false": config_with(sb, "tenement-per-instance-false.toml", "metrics_per_instance = false\n"),
                   "true": config_with(sb, "tenement-per-instance-true.toml", "metrics_per_instance = true\n")}
        sup = sb.supervisor.pid
        for r in range(args.scrape_rounds):
            order = ["false", "true"] if r % 2 == 0 else ["true", "false"]
            for mode in order:
                port, metrics_port = free_port(), free_port()
                while metrics_port == port:
                    metrics_port = free_port()
                proxy = start_proxy(sb, configs[mode], port, metrics_port, name=f"proxy-per-instance-{mode}")
                try:
                    wait_ok(port, f"{running[0]}.tiny.localhost")
                    for t in running:
                        status, _ = get(port, f"{t}.tiny.localhost", "/", timeout=10)
                        if status != 200:
                            raise RuntimeError(f"GET through the proxy for {t}: {status}")
                    time.sleep(1.0)
                    before, sup_before = proc_stats(proxy.pid), proc_stats(sup)
                    cpu0 = {who: (cpu_ticks(pid), sched_ns(pid)) for who, pid in (("proxy", proxy.pid), ("sup", sup))}
                    times = []
                    for _ in range(args.scrapes):
                        took, body = scrape(metrics_port)
                        times.append(took)
                    cpu1 = {who: (cpu_ticks(pid), sched_ns(pid)) for who, pid in (("proxy", proxy.pid), ("sup", sup))}
                    after, sup_after = proc_stats(proxy.pid), proc_stats(sup)
                finally:
                    stop(proxy)
                text = body.decode()
                lines = text.splitlines()
                res = {
                    "times": times, "bytes": len(body), "lines": len(lines),
                    "series": sum(1 for x in lines if x and not x.startswith("#")),
                    "families": sum(1 for x in lines if x.startswith("# TYPE ")),
                    "per_instance_memory": count_series(text, "tenement_instance_memory_bytes"),
                    "running": sample_value(text, 'tenement_instances{service="tiny",state="running"}'),
                    "stopped": sample_value(text, 'tenement_instances{service="tiny",state="stopped"}'),
                    "supervisor_up": sample_value(text, 'tenement_supervisor_up{daemon="supervisor"}'),
                    "rss_before": before["rss_kib"], "rss_after": after["rss_kib"],
                    "anon_before": before["anon_kib"], "anon_after": after["anon_kib"],
                    "sup_rss_before": sup_before["rss_kib"], "sup_rss_after": sup_after["rss_kib"],
                    "proxy_cpu_ms": cpu_per_scrape(cpu0["proxy"], cpu1["proxy"], args.scrapes),
                    "sup_cpu_ms": cpu_per_scrape(cpu0["sup"], cpu1["sup"], args.scrapes),
                }
                results[mode].append(res)
                log(f"  round {r + 1}/{args.scrape_rounds} metrics_per_instance={mode:<5}: {args.scrapes} scrapes, "
                    f"median {median(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms, {len(body):,} bytes, "
                    f"proxy RSS {before['rss_kib'] / 1024:.1f} -> {after['rss_kib'] / 1024:.1f} MiB")
            log(f"round {r + 1}/{args.scrape_rounds} done")
    except Exception:
        log(f"logs kept in {keep_logs(sb)}")
        raise
    finally:
        sb.close()
    return results, added, woken


def report_scale(args, results, added, woken):
    print(f"2. a scrape at {args.instances:,} registered tenants, {args.running} running (tiny-http, isolation "
          f"process): {args.scrapes} scrapes in a row x {args.scrape_rounds} rounds per setting, a fresh proxy "
          f"each time, which setting goes first alternating")
    print(f"   registered with {-(-args.instances // BATCH)} admin RPC add in {added:.2f} s; "
          f"{args.running} woken with the admin RPC wake in {woken:.2f} s")
    print(f"{'metrics_per_instance':<21}{'median ms':>10}{'p90 ms':>8}{'max ms':>8}{'bytes':>8}{'lines':>7}"
          f"{'series':>7}{'proxy RSS MiB before':>22}{'after':>7}{'sup RSS MiB':>13}"
          f"{'proxy cpu ms/scrape':>21}{'sup cpu ms/scrape':>19}")
    for mode in ("false", "true"):
        rs = results[mode]
        times = [t for x in rs for t in x["times"]]
        last = rs[-1]
        print(f"{mode:<21}{median(times) * 1e3:>10.2f}{p(times, 90) * 1e3:>8.2f}{max(times) * 1e3:>8.2f}"
              f"{last['bytes']:>8}{last['lines']:>7}{last['series']:>7}"
              f"{median([x['rss_before'] for x in rs]) / 1024:>22.1f}{median([x['rss_after'] for x in rs]) / 1024:>7.1f}"
              f"{median([x['sup_rss_after'] for x in rs]) / 1024:>13.1f}"
              f"{median([x['proxy_cpu_ms'] for x in rs]):>21.2f}{median([x['sup_cpu_ms'] for x in rs]):>19.2f}")
    print("   per round: " + "; ".join(
        f"{mode} r{i + 1} median {median(x['times']) * 1e3:.2f} ms, proxy RSS {x['rss_before']} -> "
        f"{x['rss_after']} KiB (anon {x['anon_before']} -> {x['anon_after']})"
        for mode in ("false", "true") for i, x in enumerate(results[mode])))
    every = [x for rs in results.values() for x in rs]
    states_ok = all(x["running"] == args.running and x["stopped"] == args.instances - args.running
                    and x["supervisor_up"] == 1 for x in every)
    series_ok = (all(x["per_instance_memory"] == 0 for x in results["false"])
                 and all(x["per_instance_memory"] == args.running for x in results["true"]))
    print(f"check: every scrape's last body had supervisor_up 1 and tenement_instances running "
          f"{args.running}, stopped {args.instances - args.running:,}: {'yes' if states_ok else 'NO'}")
    print(f"check: tenement_instance_memory_bytes series: 0 without metrics_per_instance, "
          f"{args.running} with it: {'yes' if series_ok else 'NO'} "
          f"({', '.join(str(x['per_instance_memory']) for x in every)})")
    print("time = from connect to the body's last byte, a new connection per scrape, over every scrape "
          "of every round; bytes, lines, series (samples) from the last scrape; RSS = VmRSS, medians "
          f"over rounds; cpu = the daemon's threads' run time (schedstat) over the {args.scrapes} scrapes "
          f"/ {args.scrapes}, medians over rounds")
    return states_ok and series_ok


def record_cost(args):
    """Part 3: runs the metrics_record example on one thread and on one per CPU (the proxy's
    default worker count); returns [(threads, {on_ns, off_ns, added_ns, added_spread})]."""
    binary = os.path.join(loadtools.ROOT, "target", "release", "examples", "metrics_record")
    if not args.no_build or not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tenement-proxy", "--example",
                        "metrics_record"], cwd=loadtools.ROOT, check=True)
    results = []
    for threads in sorted({1, os.cpu_count() or 1}):
        log(f"part 3: recording cost on {threads} thread(s)")
        out = subprocess.run([binary, str(threads), str(args.record_requests), str(args.record_rounds)],
                             capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out))
        results.append((threads, fields))
    return results


def report_record(args, results):
    print(f"3. the recording itself, in-process (proxy/examples/metrics_record.rs): {args.record_requests:,} "
          f"requests per thread and round, {args.record_rounds} rounds, on and off alternating")
    print(f"{'threads':>7}{'on ns/req':>11}{'off ns/req':>12}{'added ns/req':>14}  per round [min..max]")
    worst = 0.0
    for threads, f in results:
        print(f"{threads:>7}{float(f['on_ns']):>11.1f}{float(f['off_ns']):>12.1f}{float(f['added_ns']):>14.1f}"
              f"  {f['added_spread']}")
        worst = max(worst, float(f["added_ns"]))
    print(f"goal: proxy CPU with metrics <= +0.5 us/request: the recording adds {worst / 1000:.3f} us at most "
          f"(the contended case: every thread counts into one service at full speed) "
          f"{'MET' if worst <= 500 else 'MISSED'}")
    print("ns/req = the slowest thread's time over its requests, median over rounds; a request's calls: "
          "ServiceHandles::sent (its body bytes) and ServiceHandles::request (status class, duration)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", default="1,4,32")
    ap.add_argument("--instances", type=int, default=10000)
    ap.add_argument("--running", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=20, help="scrapes per proxy and round")
    ap.add_argument("--scrape-rounds", type=int, default=2)
    ap.add_argument("--record-rounds", type=int, default=11, help="part 3's rounds")
    ap.add_argument("--record-requests", type=int, default=2000000, help="part 3's requests per thread and round")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    if args.rounds < 0 or args.scrape_rounds < 0 or args.record_rounds < 0:
        ap.error("--rounds 0 skips part 1, --scrape-rounds 0 part 2, --record-rounds 0 part 3; no fewer")
    if not 0 < args.running <= args.instances or args.instances > 12000:
        ap.error("need 0 < --running <= --instances <= 12000 (the port range has 12,000 ports)")
    ensure_tools("wrk")
    if not args.no_build:
        build()
    snapshot_binaries()
    began, load_before = time.time(), os.getloadavg()
    rows, checks = throughput(args, conns) if args.rounds else ({}, [])
    scale = scrape_at_scale(args) if args.scrape_rounds else None
    recorded = record_cost(args) if args.record_rounds else None
    print(f"# metrics cost; {machine()}; {revision()}")
    ok = all(0 <= counted - expected <= slack for counted, expected, slack in checks)
    if args.rounds:
        print()
        report_throughput(args, conns, rows, checks)
    if scale:
        print()
        ok = report_scale(args, *scale) and ok
    if recorded:
        print()
        report_record(args, recorded)
    load = lambda xs: "/".join(f"{x:.2f}" for x in xs)
    print(f"(took {time.time() - began:.0f} s; load average 1/5/15 min at the start {load(load_before)}, "
          f"at the end {load(os.getloadavg())})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
