#!/usr/bin/env python3
"""Where a cold wake's milliseconds go: one request to a stopped instance through the proxy,
cut into stages by kernel tracepoints (perf, Debian's linux-perf).

    sudo python3 bench/wake_breakdown.py [--rounds 15] [--services native,python] [--no-build]

Each round stops the instance, waits for the stop to reach the proxy, and sends one GET with a
fresh connection, as cold_requests.py does with N=1. `perf record -a` runs through all rounds
with a handful of tracepoints (process fork and exec, and the connect, accept4, listen, socket,
sendmsg, sendto and recvfrom system calls); the stages of each round are then read from the processes
it knows: this client, the proxy, the supervisor, the exec server, the helper the server
cloned and the app the helper forked.

| stage | from | to |
|---|---|---|
| accept | the client's connect | the proxy's accept4 returns it |
| wake RPC, prepare | accept | the supervisor sends the spawn request to the exec server (the proxy read the request, asked the supervisor to wake; the supervisor checked the port, made the directories, built the spec) |
| exec server clone | spawn request | the server's clone of the helper |
| helper setup | clone | the helper forks the app (cgroup, namespaces, subreaper, signal mask) |
| app exec | fork | the app's exec (rlimits, uid, capabilities, close_range, the wait for the supervisor's go-ahead byte, execve) |
| app start | exec | the app's listen |
| readiness seen | listen | the supervisor's next sock_diag request (a 72-byte sendto: ready = "tcp" asks sock_diag every 200 us for 10 ms which listener a connect to the port reaches) |
| answer, proxy connect | sock_diag | the proxy's connect to the app (ownership check: one dump of the port's listeners, Ready, route, wake answer) |
| app accept | proxy connect | the app's accept4 returns |
| response | app accept | the client's last recv |

Printed apart below "app exec": the wait for the supervisor's go-ahead byte, from the read of
the pipe to its return, by the helper before it forks (builds before 5307bc9, where it is
part of "helper setup") or by the app's process before its exec.

Tracing costs time on every traced system call, so the stages add up to more than a wake takes
untraced (the untraced total of the same rounds is printed beside it, from the client's clock):
read the stages as shares. Medians over rounds, in ms.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import loadtools
from loadtools import build, fire, proxied_sandbox, revision, snapshot_binaries, wait_proxy_synced
from tenement_bench import machine, median, proc_stat

SERVICES = {
    "native": '[service.native]\ncommand = "@BIN@/tiny-http"\nidle_timeout = 0\n',
    "python": ('[service.python]\ncommand = "@PYTHON@ app.py"\nworkdir = "@ROOT@/examples/notes"\n'
               'idle_timeout = 0\n[service.python.env]\nDATA_DIR = "{data_dir}/{id}"\n'),
}

EVENTS = ["sched:sched_process_fork", "sched:sched_process_exec",
          "syscalls:sys_enter_connect", "syscalls:sys_exit_accept4", "syscalls:sys_enter_listen",
          "syscalls:sys_enter_socket", "syscalls:sys_enter_sendmsg", "syscalls:sys_enter_recvfrom",
          "syscalls:sys_enter_sendto"]

# The helper's read of the go-ahead byte (its descriptor 3, or 4 after a listening socket):
# traced apart, filtered in the kernel, since reads are everywhere.
READ_EVENTS = [("syscalls:sys_enter_read", "fd == 3 || fd == 4"), ("syscalls:sys_exit_read", "ret == 1")]

# A sock_diag request for one socket: a netlink header (16 bytes) and an inet_diag_req_v2 (56).
SOCK_DIAG_REQUEST = 72

STAGES = ["accept", "wake RPC, prepare", "exec server clone", "helper setup", "app exec",
          "app start", "readiness seen", "answer, proxy connect", "app accept", "response"]

LINE = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")


def parse(path):
    out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,pid,tid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    events = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            comm, pid, _tid, t, event, args = m.groups()
            events.append((float(t), int(pid), event.rstrip(":"), args, comm))
    events.sort(key=lambda e: e[0])
    return events


def field(args, name):
    m = re.search(rf"{name}[:=] ?(0x[0-9a-f]+|-?\d+)", args)
    if not m:
        return None
    return int(m.group(1), 16) if m.group(1).startswith("0x") else int(m.group(1))


def ret(args):
    """The return value of a sys_exit event, signed."""
    try:
        v = int(args.strip(), 16)
    except ValueError:
        return None
    return v - (1 << 64) if v >= 1 << 63 else v


def stages_of(events, client, proxy, supervisor, server):
    """Splits the events of one round (starting at the client's connect) into stage boundaries;
    None when a boundary is missing."""
    def first(after, pred):
        for e in events:
            if e[0] >= after and pred(e):
                return e
        return None

    t = []
    connect = first(0, lambda e: e[1] == client and e[2] == "syscalls:sys_enter_connect"
                    and field(e[3], "addrlen") == 16)
    if not connect:
        return None
    t.append(connect[0])
    steps = [
        lambda e: e[1] == proxy and e[2] == "syscalls:sys_exit_accept4" and (ret(e[3]) or -1) >= 0,
        lambda e: e[1] == supervisor and e[2] == "syscalls:sys_enter_sendmsg",
        lambda e: e[1] == server and e[2] == "sched:sched_process_fork",
    ]
    for pred in steps:
        e = first(t[-1], pred)
        if not e:
            return None
        t.append(e[0])
        last = e
    helper = field(last[3], "child_pid")
    fork = first(t[-1], lambda e: e[1] == helper and e[2] == "sched:sched_process_fork")
    if not fork:
        return None
    app = field(fork[3], "child_pid")
    exec_ = first(fork[0], lambda e: e[1] == app and e[2] == "sched:sched_process_exec")
    # The wait for the go-ahead byte, from the read of the pipe to its return: in the helper
    # before it forks the app (builds before 5307bc9), or in the app's process before exec.
    waited = None
    for pid, start, end in ((helper, t[-1], fork[0]), (app, fork[0], exec_[0] if exec_ else None)):
        asked = first(start, lambda e: e[1] == pid and e[2] == "syscalls:sys_enter_read")
        told = asked and first(asked[0], lambda e: e[1] == pid and e[2] == "syscalls:sys_exit_read")
        if told and end is not None and told[0] <= end:
            waited = (told[0] - asked[0]) * 1000
            break
    t.append(fork[0])
    for pred in [
        lambda e: e[1] == app and e[2] == "sched:sched_process_exec",
        lambda e: e[1] == app and e[2] == "syscalls:sys_enter_listen",
        lambda e: (e[1] == supervisor and e[2] == "syscalls:sys_enter_sendto"
                   and field(e[3], "len") == SOCK_DIAG_REQUEST),
        lambda e: e[1] == proxy and e[2] == "syscalls:sys_enter_connect" and field(e[3], "addrlen") == 16,
        lambda e: e[1] == app and e[2] == "syscalls:sys_exit_accept4" and (ret(e[3]) or -1) >= 0,
    ]:
        e = first(t[-1], pred)
        if not e:
            return None
        t.append(e[0])
    # The client's reads of this connection (it also talks to the supervisor's admin socket).
    fd = field(connect[3], "fd")
    last_recv = None
    for e in events:
        if (e[0] >= t[-1] and e[1] == client and e[2] == "syscalls:sys_enter_recvfrom"
                and field(e[3], "fd") == fd):
            last_recv = e
    if not last_recv:
        return None
    t.append(last_recv[0])
    return [(b - a) * 1000 for a, b in zip(t, t[1:])] + [waited]


def exec_server_of(supervisor):
    """The pid of `supervisor`'s exec server (tenement-execd), or None."""
    for name in os.listdir("/proc"):
        st = proc_stat(name) if name.isdigit() else None
        if st and st[3] == "tenement-execd" and st[1] == supervisor:
            return int(name)
    return None


def run_service(service, rounds):
    toml = SERVICES[service].replace("@PYTHON@", sys.executable).replace("@ROOT@", loadtools.ROOT)
    sb = proxied_sandbox(toml)
    inst, host = f"{service}:cold", f"cold.{service}.localhost"
    perf_data = os.path.join(sb.dir, "perf.data")
    try:
        rpc = sb.admin()
        rpc.call({"type": "add", "instances": [inst]})
        rpc.call({"type": "wake", "instance": inst})
        wait_proxy_synced(sb, host, timeout=30)
        server = exec_server_of(sb.supervisor.pid)
        traced = ["-e", ",".join(EVENTS)]
        for event, kernel_filter in READ_EVENTS:
            traced += ["-e", event, "--filter", kernel_filter]
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-o", perf_data, *traced],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)  # perf needs a moment to enable every tracepoint
        totals = []
        for _ in range(rounds):
            rpc.call({"type": "stop", "instance": inst})
            time.sleep(0.3)
            res = fire(sb.proxy_port, 1, host)
            if res[0][1] != 200:
                raise SystemExit(f"{service}: the request got {res[0][1]} {res[0][2]}")
            totals.append(res[0][0] * 1000)
            time.sleep(0.05)
        perf.send_signal(signal.SIGINT)
        perf.wait()
        events = parse(perf_data)
    finally:
        sb.close()
    # Cut the trace at each of the client's connects to the proxy.
    client = os.getpid()
    starts = [i for i, e in enumerate(events) if e[1] == client and e[2] == "syscalls:sys_enter_connect"
              and field(e[3], "addrlen") == 16]
    per_round = []
    for k, i in enumerate(starts):
        j = starts[k + 1] if k + 1 < len(starts) else len(events)
        s = stages_of(events[i:j], client, sb.proxy.pid, sb.supervisor.pid, server)
        if s:
            per_round.append(s)
    return per_round, totals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--services", default="native,python")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--per-round", action="store_true", help="also print every round's stages")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("wake_breakdown.py needs root (perf record -a of tracepoints)")
    services = args.services.split(",")
    for s in services:
        if s not in SERVICES:
            raise SystemExit(f"unknown service {s!r}; choose from {', '.join(SERVICES)}")
    loadtools.ensure_tools("perf")
    if not args.no_build:
        build()
    snapshot_binaries()
    results = {s: run_service(s, args.rounds) for s in services}
    print(f"# wake breakdown: one request to a stopped instance through the proxy, {args.rounds} rounds; "
          f"{machine()}; {revision()}")
    print("stage                      " + "".join(f"{s:>12}" for s in services))
    for k, name in enumerate(STAGES):
        cells = []
        for s in services:
            rows = results[s][0]
            cells.append(f"{median([r[k] for r in rows]):12.2f}" if rows else f"{'-':>12}")
        print(f"{name:<27}" + "".join(cells))
        if name == "app exec":
            cells = []
            for s in services:
                waits = [r[len(STAGES)] for r in results[s][0] if r[len(STAGES)] is not None]
                cells.append(f"{median(waits):12.2f}" if waits else f"{'-':>12}")
            print(f"{'  go-ahead wait (in these)':<27}" + "".join(cells))
    print(f"{'sum of stages (traced)':<27}" + "".join(
        f"{median([sum(r[:len(STAGES)]) for r in results[s][0]]):12.2f}" if results[s][0] else f"{'-':>12}"
        for s in services))
    print(f"{'client latency (traced)':<27}" + "".join(f"{median(results[s][1]):12.2f}" for s in services))
    print(f"{'rounds read':<27}" + "".join(f"{len(results[s][0]):>12}" for s in services))
    print("ms, medians over rounds; stages are measured under tracing, which slows every traced system call")
    if args.per_round:
        for s in services:
            print(f"\n{s}, per round:")
            print("  " + " ".join(f"{name[:10]:>10}" for name in STAGES))
            for row in results[s][0]:
                print("  " + " ".join(f"{v:10.2f}" for v in row[:len(STAGES)]))


if __name__ == "__main__":
    main()
