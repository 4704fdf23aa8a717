#!/usr/bin/env python3
"""Where tenement-proxy's CPU goes on the warm request path: a flame graph and a table.

One warm tiny-http instance (tiny:a) behind the release proxy; wrk (1 thread, keep-alive)
runs against it while `perf record` samples the proxy (cpu-clock, so it works without a
hardware PMU; call graphs unwound from DWARF, as the release build has no frame pointers).
nginx in front of the same backend is sampled the same way, for the yardstick.

Prints, per side, system calls and context switches per request (perf stat, unsampled), the
share of samples by where they were taken (kernel, hyper, h2, tokio,
tenement's own code, the allocator, ...) both as self time and as the inclusive time of a
few named stages, and writes the flame graphs as SVG (inferno, installed with cargo if
missing):

    python3 bench/proxy_profile.py [--connections 4] [--duration 10] [--out docs/flame]

Shares, not absolute times: sampling under load is noisy, and these machines are shared.
"""

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from loadtools import build, ensure_tools, revision, snapshot_binaries, warm_tiny, WARM_HOST as HOST, wrk
from tenement_bench import machine

# Self time in user space is put in the first bucket whose pattern matches the sampled frame's
# symbol; a frame of the kernel's (perf names its object [kernel.kallsyms]) is "kernel".
BUCKETS = [
    ("allocator (malloc/free)", re.compile(r"^(_int_malloc|_int_free|malloc|free|realloc|cfree|"
                                           r"__libc_malloc|__libc_free|__libc_realloc|malloc_consolidate|"
                                           r"tcache|__rust_alloc|__rust_dealloc|__rust_realloc|"
                                           r"alloc::alloc|<alloc::alloc::Global)")),
    ("libc (syscall stubs, memcpy)", re.compile(r"^(__memmove|__memcpy|__memset|memcpy|memmove|memset|"
                                                 r"__GI_|__libc_|epoll_wait|__send|__recv|writev|read|"
                                                 r"__write|__read|syscall|__lll|pthread_|__pthread|"
                                                 r"__memcmp|__strlen|bcmp|memcmp|clock_gettime|"
                                                 r"__clock_gettime|__vdso)|\[vdso\]")),
    ("hyper", re.compile(r"^(<)?hyper(_util)?::|<hyper(_util)?::")),
    ("h2", re.compile(r"^(<)?h2::")),
    ("httparse", re.compile(r"httparse::")),
    ("http (HeaderMap etc.)", re.compile(r"^(<)?http(_body(_util)?)?::")),
    ("tokio", re.compile(r"^(<)?tokio(_util)?::|<tokio")),
    ("bytes", re.compile(r"^(<)?bytes::")),
    ("tracing", re.compile(r"tracing")),
    ("tenement-proxy", re.compile(r"tenement_proxy::|tenement_proto::|tenement_proxy")),
    ("futures", re.compile(r"futures_")),
    ("rustls / ring / aws-lc", re.compile(r"rustls|ring::|aws_lc")),
    ("std / core", re.compile(r"^(<)?(std|core|alloc)::|<(std|core|alloc)::")),
]

# Inclusive time of stages: a sample counts for a stage when any frame of its stack matches.
STAGES = [
    ("epoll wait and event loop", re.compile(r"tokio::runtime::io::driver::Driver::turn|epoll_wait")),
    ("socket reads (syscall)", re.compile(r"^(__x64_sys_read|__x64_sys_recvfrom|ksys_read)$")),
    ("socket writes (syscall)", re.compile(r"^(__x64_sys_write|__x64_sys_writev|__x64_sys_sendto|do_writev|"
                                           r"ksys_write)$")),
    ("client side: hyper server dispatch", re.compile(r"hyper::proto::h1::dispatch::Dispatcher<.*Server")),
    ("upstream side: hyper client dispatch", re.compile(r"hyper::proto::h1::dispatch::Dispatcher<.*Client")),
    ("request head parse (both sides)", re.compile(r"hyper::proto::h1::role::.*::parse|httparse::")),
    ("head encode (both sides)", re.compile(r"hyper::proto::h1::role::.*::encode")),
    ("tenement request path (Proxy::handle)", re.compile(r"tenement_proxy::forward::Proxy::(handle|serve|forward)")),
    ("pool checkout/put", re.compile(r"tenement_proxy::pool::Pool::")),
    ("timers (arming, firing, clearing)", re.compile(r"tokio::runtime::time::(entry|wheel|Handle::(process|reregister|clear))|"
                                                  r"TimerEntry|tokio::time::(sleep|timeout)::")),
    ("cross-thread wake-ups (eventfd write)", re.compile(r"mio::sys::unix::waker::Waker::wake")),
    ("malloc/free (inclusive)", re.compile(r"^(__GI___libc_malloc|__GI___libc_free|__GI___libc_realloc|malloc|free)$")),
    ("formatting (core::fmt)", re.compile(r"^core::fmt::write$")),
]


def frame(line):
    """The symbol of one `perf script` frame line ('addr sym+off (dso)'), and whether it is the
    kernel's."""
    parts = line.strip().split(None, 1)
    if len(parts) < 2:
        return "?", False
    sym, _, dso = parts[1].rpartition(" (")
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
    if sym in ("[unknown]", ""):
        sym = f"[{dso.rstrip(')')}]"
    return sym, "kernel.kallsyms" in dso


def stacks(script_text):
    """Each sample's frames, leaf first, and the set of kernel symbols seen."""
    out, frames, kernel = [], [], set()
    for line in script_text.splitlines():
        if not line.strip():
            if frames:
                out.append(frames)
            frames = []
        elif line.startswith((" ", "\t")):
            sym, in_kernel = frame(line)
            frames.append(sym)
            if in_kernel:
                kernel.add(sym)
    if frames:
        out.append(frames)
    return out, kernel


def tables(script_text, name, rps, seconds):
    """Prints one side's shares; `rps` while sampled over `seconds` gives the time per request."""
    samples, kernel = stacks(script_text)
    total = len(samples) or 1
    selfs = collections.Counter()
    for frames in samples:
        leaf = frames[0]
        bucket = "kernel" if leaf in kernel else next((b for b, rx in BUCKETS if rx.search(leaf)), "other")
        selfs[bucket] += 1
    top = collections.Counter(f[0] for f in samples if f[0] not in kernel)
    print(f"\n{name}: {len(samples)} samples")
    per_request = len(samples) / SAMPLE_HZ / seconds / rps * 1e6 if rps else float("nan")
    print(f"  CPU per request while sampled: {per_request:.1f} us, {per_request * selfs['kernel'] / total:.1f} "
          f"in the kernel, {per_request * (total - selfs['kernel']) / total:.1f} in user space "
          f"(samples / {SAMPLE_HZ} Hz / {seconds} s / {rps:.0f} requests per second)")
    print("  self time by where it was sampled:")
    for bucket, n in selfs.most_common():
        print(f"    {100 * n / total:5.1f}%  {bucket}")
    print("  inclusive time of stages (a sample counts once per stage):")
    for stage, rx in STAGES:
        n = sum(1 for frames in samples if any(rx.search(f) for f in frames))
        if n:
            print(f"    {100 * n / total:5.1f}%  {stage}")
    print("  hottest user-space functions (self):")
    for sym, n in top.most_common(12):
        print(f"    {100 * n / total:5.1f}%  {sym[:110]}")
    allocator = dict(BUCKETS)["allocator (malloc/free)"]
    callers = collections.Counter()
    for frames in samples:
        if frames[0] not in kernel and allocator.search(frames[0]):
            callers[next((f for f in frames if not allocator.search(f) and not f.startswith("__GI_")), "?")] += 1
    if callers:
        print("  the allocator's self time by its first caller outside it:")
        for sym, n in callers.most_common(5):
            print(f"    {100 * n / total:5.1f}%  {sym[:110]}")


SAMPLE_HZ = 1999


def record(pids, seconds, out):
    """perf record on `pids` for `seconds`; returns the `perf script` text."""
    data = os.path.join(out, "perf.data")
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "--call-graph", "dwarf,16384",
                    "-p", ",".join(str(p) for p in pids), "-o", data, "--", "sleep", str(seconds)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(["perf", "script", "-i", data, "-F", "comm,tid,time,event,ip,sym,dso"],
                       capture_output=True, text=True, check=True)
    os.unlink(data)
    return r.stdout


SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read",
                  "syscalls:sys_enter_writev", "syscalls:sys_enter_write", "syscalls:sys_enter_sendto",
                  "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_futex", "context-switches"]


def count_events(pids, port, connections, seconds):
    """`perf stat` of SYSCALL_EVENTS on `pids` around one wrk run of `seconds`: ({event: count},
    the requests wrk completed)."""
    args = ["perf", "stat", "-x", ","]
    for event in SYSCALL_EVENTS:
        args += ["-e", event]
    args += ["-p", ",".join(str(p) for p in pids)]
    stat = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # perf attached
        requests = wrk(port, connections, seconds, host=HOST)["requests"]
    finally:
        stat.send_signal(signal.SIGINT)
        _, err = stat.communicate()
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2]] = int(fields[0])
    return counts, requests


def flame(script_text, title, path):
    collapse = subprocess.run(["inferno-collapse-perf", "--all"], input=script_text, capture_output=True,
                              text=True, check=True).stdout
    svg = subprocess.run(["inferno-flamegraph", "--title", title, "--width", "1600"], input=collapse,
                         capture_output=True, text=True, check=True).stdout
    with open(path, "w") as f:
        f.write(svg)


def ensure_inferno():
    if shutil.which("inferno-flamegraph"):
        return
    subprocess.run(["cargo", "install", "--quiet", "--locked", "inferno"], check=True)
    cargo_bin = os.path.expanduser("~/.cargo/bin")
    os.environ["PATH"] = cargo_bin + os.pathsep + os.environ["PATH"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--duration", type=int, default=10, help="seconds sampled per side")
    ap.add_argument("--count", type=int, default=5, help="seconds of system call counting per side")
    ap.add_argument("--out", default=None, help="directory for the SVG flame graphs (none: not written)")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    ensure_tools("wrk", "nginx", "perf")
    if args.out:
        ensure_inferno()
    if not args.no_build:
        build()
    snapshot_binaries()
    work = tempfile.mkdtemp(prefix="tenement-profile-")
    try:
        with warm_tiny() as (_, nginx, sb):
            print(f"# proxy profile: wrk -t1 -c{args.connections}, perf record -e cpu-clock -F {SAMPLE_HZ} "
                  f"--call-graph dwarf, {args.duration} s per side; {machine()}; {revision()}")
            for name, port, pids in (("tenement-proxy", sb.proxy_port, [sb.proxy.pid]),
                                     ("nginx", nginx.port, nginx.workers())):
                profile(args, name, port, pids, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile(args, name, port, pids, work):
    """Counts, samples and reports one side."""
    wrk(port, args.connections, 2, host=HOST)  # warm-up
    # Counted first (not sampled), over one whole wrk run.
    counts, requests = count_events(pids, port, args.connections, args.count)
    print(f"\n{name}: per request over a {args.count} s wrk run ({requests} requests, perf stat): "
          + ", ".join(f"{counts.get(e, 0) / max(requests, 1):.2f} {e.split(':')[-1].removeprefix('sys_enter_')}"
                      for e in SYSCALL_EVENTS if counts.get(e) or e == "raw_syscalls:sys_enter"))
    load = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                             "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = record(pids, args.duration, work)
    finally:
        out, _ = load.communicate()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rps = float(rps.group(1)) if rps else 0.0
    print(f"{name}: {rps:.0f} requests per second while sampled")
    tables(text, name, rps, args.duration)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{name}-c{args.connections}.svg")
        flame(text, f"{name}, wrk -c{args.connections} keep-alive, {revision()}", path)
        print(f"  flame graph: {path}")


if __name__ == "__main__":
    sys.exit(main())
