#!/usr/bin/env python3
"""The whole benchmark report in one command: builds once, runs every benchmark in turn and
prints each one's table, then a summary of the goals. The report is also written to
bench/out/report-REVISION.txt. docs/BENCHMARKS.md quotes a run of exactly this command.

    python3 bench/run_all.py [--quick]

--quick runs fewer rounds and a smaller scale run (1,000 instances, 100 wakes): a smoke test
of the scripts in a few minutes, not figures to quote. Root is needed for the proxy's user
drop, for the isolation benchmark and for the fleet's network namespaces; wrk, nginx, node, go
and etcd are installed with apt-get when missing.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from loadtools import ensure_tools, revision
from tenement_bench import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))

# (title, script, full arguments, quick arguments)
BENCHMARKS = [
    ("cold wake per runtime and listen mode", "cold_wake.py", ["--rounds", "15"], ["--rounds", "3"]),
    ("10, 100 and 1,000 simultaneous requests, cold and warm", "cold_requests.py", ["--rounds", "5"],
     ["--rounds", "1", "--n", "10,100"]),
    ("where a cold wake's milliseconds go", "wake_breakdown.py", ["--rounds", "15"], ["--rounds", "3"]),
    ("wakes under pressure: 500 distinct, 8 at a time, and 100 at once", "wake_pressure.py", [],
     ["--wakes", "40", "--chunk", "20", "--burst", "10", "--rounds", "1"]),
    ("warm throughput: direct, nginx, tenement", "proxy_throughput.py", ["--rounds", "5", "--duration", "5"],
     ["--rounds", "1", "--duration", "2", "--connections", "4,1000"]),
    ("where the proxy's CPU goes: perf against nginx's", "proxy_profile.py",
     ["--duration", "10", "--out", os.path.join(HERE, "out", "flame")], ["--duration", "2"]),
    ("scale and memory", "scale.py", [], ["--instances", "1000", "--wakes", "100", "--idle-timeout", "5"]),
    ("idle load: no request lost", "idle_load.py", ["--requests", "10000"], ["--requests", "1000"]),
    ("isolation overhead", "isolation_overhead.py", ["--rounds", "21"], ["--rounds", "3"]),
    ("TLS: tenement-proxy vs nginx", "tls_throughput.py", ["--rounds", "5", "--duration", "5"],
     ["--rounds", "1", "--duration", "2", "--idle", "300", "--resume", "20", "--acme-rounds", "1"]),
    ("metrics cost: on and off, a scrape at 10,000", "metrics_cost.py", ["--rounds", "5", "--duration", "5"],
     ["--rounds", "1", "--duration", "2", "--instances", "1000", "--running", "20", "--scrapes", "5",
      "--scrape-rounds", "1", "--record-rounds", "3", "--record-requests", "200000"]),
    ("rollout across 1,000 tenants, 20 running under load", "rollout.py", [],
     ["--tenants", "200", "--running", "5", "--bake", "1s", "--releases", "4"]),
    ("management API and dashboard at 10,000 registered", "api.py", [],
     ["--rounds", "1", "--calls", "200", "--instances", "1000", "--page-requests", "5", "--duration", "2"]),
    ("a fleet of three hosts on etcd: failover, placement at 5,000 tenants", "fleet.py", [],
     ["--trials", "2", "--tenants", "500", "--samples", "5"]),
]


def ensure_runtimes():
    missing = [pkg for tool, pkg in (("node", "nodejs"), ("go", "golang-go")) if shutil.which(tool) is None]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run_all: needs root (the proxy drops to nobody; isolation needs namespaces)")
    ensure_tools("wrk", "nginx", "perf")
    ensure_runtimes()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tenement-supervisor", "-p", "tenement-proxy",
                    "-p", "tenctl", "-p", "tenement-fixtures", "-p", "tenement-fleet"], cwd=ROOT, check=True)

    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    rev = revision()
    report_path = os.path.join(out_dir, f"report-{rev}.txt")
    report = open(report_path, "w")

    def emit(text=""):
        print(text, flush=True)
        report.write(text + "\n")

    emit(f"# tenement benchmark report, {rev}, {time.strftime('%Y-%m-%d %H:%M')}"
         + (" (--quick: smoke test, not figures)" if args.quick else ""))
    summary = []
    for title, script, full, quick in BENCHMARKS:
        argv = [sys.executable, os.path.join(HERE, script), *(quick if args.quick else full), "--no-build"]
        emit()
        emit(f"## {title}: python3 bench/{script} {' '.join(argv[2:])}")
        started = time.time()
        proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            if re.fullmatch(r"round \d+/\d+ done", line):
                continue  # progress, not results
            lines.append(line)
            emit(line)
        code = proc.wait()
        took = time.time() - started
        emit(f"({script} exited {code} after {took:.0f} s)")
        goals = [line for line in lines
                 if re.search(r"\b(met|missed)\b", line, re.IGNORECASE) or line.startswith("check:")]
        summary.append((title, code, goals))

    emit()
    emit("## summary")
    failed = 0
    for title, code, goals in summary:
        emit(f"{title}: {'ok' if code == 0 else f'EXITED {code}'}")
        for g in goals:
            emit(f"  {g.strip()}")
        failed += code != 0
    emit(f"report written to {os.path.relpath(report_path, ROOT)}")
    report.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
