#!/usr/bin/env python3
"""Chaos: faults under steady load, what each one cost, and two invariants checked after.

    sudo python3 bench/chaos.py [--duration 10m] [--tenants 25] [--mirror-tenants 5] [--rate 1] [--bin DIR]

The load is soak.py's (Poisson arrivals of sessions of 2-12 requests 0.5-4 s apart: plain
requests to examples/notes tenants, WebSockets held open 2-6 s and uploads of 1-8 MiB to
tests/fixtures/py/mirror.py tenants; idle_timeout 5 s, one connection per request, nothing
retried), here 30 tenants and 1 session per second (~7 requests/s), so that some tenants are
running and others asleep when a fault strikes. After --warmup seconds, every
--every-min..--every-max seconds one fault chosen at random:

  app-kill        kill -9 of a random running app (an instance the supervisor says is running);
  supervisor-kill kill -9 of the supervisor, restarted after RestartSec (2 s, as in
                  tenement-supervisor.service) with the same arguments and state directory;
  proxy-restart   SIGTERM of the proxy; when it has exited a new one starts at once on the same
                  listening socket (a `systemctl restart`);
  app-stop        SIGSTOP of a random running app, SIGCONT 10 s later (a tenant that hangs).

The script plays systemd: it binds the public TCP socket (backlog 4096, as tenement.socket)
and the supervisor's admin.sock and proxy.sock (0600 and 0660 for nobody's group, as the two
socket units) once, and hands them to every daemon it starts with the socket-activation
protocol: LISTEN_FDS, LISTEN_FDNAMES (http; admin:proxy) and LISTEN_PID set by the process
itself (`bash -c 'export LISTEN_PID=$$; exec DAEMON ... 3<&N'`), fds from 3. So connections
queue in the kernel while a daemon is down and are served by the next one. A daemon that exits
on its own is restarted the same way (supervisor after 2 s, proxy after 1 s) and counted.

Faults are one at a time: the next one comes after the previous recovered (the supervisor
answers again, the new proxy answers); a stopped app is continued in the background and is
never picked for a fault meanwhile.

What each fault cost, from the requests' times (wall clock on both sides):
  failed, in flight on a killed process: a failed request for an instance whose app was killed
    (app-kill; or any app, killed with its supervisor) that started before that app's end and
    ended after the fault. Only these may fail;
  failed, in flight at the proxy's SIGTERM: reported apart (SIGTERM is graceful);
  failed, other: any other failed request, attributed to the fault whose impact window it
    overlapped if any. These should not happen;
  delayed: the requests whose lifetime overlapped the fault's impact window (from the fault to
    the recovery: the instance's next app seen, the supervisor answering, the new proxy
    answering, SIGCONT), for the same instance (app faults) or all (daemon faults); their
    extra latency is their latency (to the response head) minus the median latency of the
    requests of the same kind that no fault touched.

Invariants, checked from the outside:
  no instance ran twice at once: /proc is scanned every 50 ms (soak.ProcessScanner) and two
    live (non-zombie) apps of one instance in one scan is a duplicate;
  nothing runs that the registry does not know: every 20 s during the run and at the end (load
    stopped), every process of the sandbox (apps and exec helpers) must belong to an instance
    `tenctl ps --json` lists with a pid that is the process or its ancestor; a process that
    fails this in two listings (before and after the scan), twice 1 s apart, is reported;
  after the load stops, everything idles out (no process left after idle_timeout + 20 s),
    and after SIGTERM to the supervisor no process of the sandbox is left at all.

Usable inside an nspawn container: Python 3 standard library, bash, /proc; no systemd, cgroup
or network set-up of its own (127.0.0.1 only); pass --bin with prebuilt binaries when the
container has no cargo. Results: bench/out/chaos-REV-TIME.{txt,json}, the requests in
...-requests.csv.gz, the daemons' logs in ...-logs/.
"""

import argparse
import collections
import fcntl
import json
import os
import pwd
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import tenement_bench
from loadtools import listen_overflows
from soak import (KINDS, PLAIN, UPLOAD, WEBSOCKET, Load, LogCounter, ProcessScanner, add_load_arguments,
                  add_run_arguments, check_firewall,
                  keep_daemon_logs, mirror_ids, nft_overlaps, notes_ids, out_paths, parse_range,
                  prepare_binaries, request_summary, services_toml, write_requests)
from tenement_bench import Sandbox, TimedRpc, free_port, machine, median, p, parse_duration, proc_stat

FAULTS = ("app-kill", "supervisor-kill", "proxy-restart", "app-stop")
SUPERVISOR_RESTART_SEC = 2.0  # RestartSec= of systemd/tenement-supervisor.service
PROXY_RESTART_SEC = 1.0       # RestartSec= of systemd/tenement-proxy.service (after a crash only)
STOP_SECONDS = 10.0


def launch(argv, fds, names, log_path):
    """Starts `argv` with `fds` as 3, 4, ... and LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set
    to its own pid (bash sets it to $$ and execs, so the pid is the daemon's)."""
    redirs = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(fds))
    env = dict(os.environ, LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
    env.pop("LISTEN_PID", None)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(["bash", "-c", f'export LISTEN_PID=$$; exec "$@" {redirs}', "launch", *argv],
                                pass_fds=fds, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def high_fd(sock):
    """A duplicate of the socket's fd numbered 10 or more (out of the way of 3, 4, ...)."""
    return fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)


class Daemons:
    """The supervisor and the proxy, started the way systemd starts them from their socket units,
    restarted by `restart_*` or, if one exits on its own, by the watchdog thread."""

    def __init__(self, sb, events):
        self.sb = sb
        self.events = events  # list of (time, text), shared with the caller
        self.lock = threading.RLock()
        run = os.path.join(sb.dir, "run")
        os.makedirs(run, mode=0o755, exist_ok=True)
        os.chmod(run, 0o755)
        self.admin_path, self.proxy_path = os.path.join(run, "admin.sock"), os.path.join(run, "proxy.sock")
        nobody = pwd.getpwnam("nobody")
        self.socks = []
        self.admin_sock = self._unix(self.admin_path, 0o600, None)
        self.proxy_sock = self._unix(self.proxy_path, 0o660, nobody.pw_gid)
        self.http_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.http_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.http_sock.bind(("127.0.0.1", sb.proxy_port))
        self.http_sock.listen(4096)
        self.fds = {"admin": high_fd(self.admin_sock), "proxy": high_fd(self.proxy_sock),
                    "http": high_fd(self.http_sock)}
        self.supervisor = self.proxy = None
        self.expected = set()  # daemons we are stopping on purpose: their exit is not a crash
        self.unexpected = []   # (time, daemon, exit status)
        self.restarts = collections.Counter()
        self.stopping = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, daemon=True, name="watchdog")

    def _unix(self, path, mode, gid):
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, 0, gid)
        s.listen(1024)
        self.socks.append(s)
        return s

    def start_supervisor(self):
        with self.lock:
            self.supervisor = launch([os.path.join(tenement_bench.RELEASE, "tenement-supervisor"),
                                      "--config", self.sb.config],
                                     [self.fds["admin"], self.fds["proxy"]], ["admin", "proxy"],
                                     os.path.join(self.sb.dir, "supervisor.log"))
            self.sb.supervisor = self.supervisor
        self.wait_supervisor()
        return self.supervisor

    def wait_supervisor(self, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                TimedRpc(self.admin_path, timeout=max(0.5, deadline - time.time())).close()
                return time.time()
            except (OSError, ConnectionError):
                if time.time() > deadline:
                    raise RuntimeError("the supervisor did not answer; see supervisor.log")
                time.sleep(0.05)

    def start_proxy(self):
        with self.lock:
            self.proxy = launch([os.path.join(tenement_bench.RELEASE, "tenement-proxy"), "--config",
                                 self.sb.config, "--user", "nobody"], [self.fds["http"]], ["http"],
                                os.path.join(self.sb.dir, "proxy.log"))
            self.sb.proxy = self.proxy
        return self.wait_proxy()

    def wait_proxy(self, timeout=60):
        """Waits until the proxy answers its home page (Host: localhost); returns that time."""
        deadline = time.time() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.sb.proxy_port), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1.1 200"):
                        return time.time()
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the proxy did not answer; see proxy.log")
            time.sleep(0.05)

    def kill_supervisor(self):
        """kill -9, then the restart systemd would do. Returns the fault's timeline."""
        with self.lock:
            old = self.supervisor
            self.expected.add(old.pid)
            t = time.time()
            old.send_signal(signal.SIGKILL)
            old.wait()
            dead = time.time()
        time.sleep(SUPERVISOR_RESTART_SEC)
        with self.lock:
            started = time.time()
            self.restarts["supervisor"] += 1
            self.start_supervisor()
        return {"t": t, "dead": dead, "restarted": started, "recovered": time.time(), "pid": old.pid,
                "new_pid": self.supervisor.pid}

    def restart_proxy(self):
        """SIGTERM; a new proxy as soon as the old one has exited (systemctl restart)."""
        with self.lock:
            old = self.proxy
            self.expected.add(old.pid)
            t = time.time()
            old.send_signal(signal.SIGTERM)
            try:
                status = old.wait(60)
            except subprocess.TimeoutExpired:
                old.kill()
                status = old.wait()
            dead = time.time()
            self.restarts["proxy"] += 1
            started = time.time()
            recovered = self.start_proxy()
        return {"t": t, "dead": dead, "restarted": started, "recovered": recovered, "pid": old.pid,
                "new_pid": self.proxy.pid, "exit": status}

    def _watch(self):
        while not self.stopping.wait(0.2):
            with self.lock:
                for name in ("supervisor", "proxy"):
                    proc = getattr(self, name)
                    if proc is None or proc.poll() is None or proc.pid in self.expected:
                        continue
                    self.unexpected.append((time.time(), name, proc.returncode))
                    self.events.append((time.time(), f"{name} pid {proc.pid} exited on its own "
                                                     f"(status {proc.returncode}); restarting"))
                    time.sleep(SUPERVISOR_RESTART_SEC if name == "supervisor" else PROXY_RESTART_SEC)
                    self.restarts[f"{name} (crash)"] += 1
                    (self.start_supervisor if name == "supervisor" else self.start_proxy)()

    def stop(self):
        """SIGTERM to both (the proxy first), as `systemctl stop` would."""
        self.stopping.set()
        self.watchdog.join(5)
        for proc in (self.proxy, self.supervisor):
            if proc is not None and proc.poll() is None:
                self.expected.add(proc.pid)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def close(self):
        for s in self.socks + [self.http_sock]:
            s.close()
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def pidfd_signal(pid, start, sig):
    """Signals `pid` only if it is still the process that started at `start` (a pidfd, so a
    recycled pid is never hit). Returns False if that process is gone."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        st = proc_stat(pid)
        if st is None or st[2] != start:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


class Chaos:
    def __init__(self, args, rev):
        self.args = args
        self.rev = rev
        self.rng = random.Random(args.seed)
        port = free_port()
        self.sb = Sandbox(services_toml(args.idle_timeout), port_range=args.port_range,
                          listen=f"127.0.0.1:{port}")
        os.chmod(self.sb.dir, 0o711)  # the proxy runs as nobody and must reach run/proxy.sock
        self.sb.proxy_port = port
        self.events = []
        self.faults = []
        self.stopped = {}  # (pid, start) -> instance, apps under SIGSTOP now
        self.stopped_lock = threading.Lock()
        self.registry_checks = []
        self.daemons = Daemons(self.sb, self.events)
        self.scanner = ProcessScanner(self.sb.dir, period=0.05)

    def log(self, text):
        self.events.append((time.time(), text))
        print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)

    def status(self, instance):
        rpc = TimedRpc(self.daemons.admin_path, timeout=5)
        try:
            return rpc.call({"type": "status", "instance": instance}).get("status", {})
        finally:
            rpc.close()

    def running_app(self):
        """A random app the supervisor says is running (not one under SIGSTOP), or None."""
        apps = list(self.scanner.apps().items())
        self.rng.shuffle(apps)
        with self.stopped_lock:
            stopped = set(self.stopped)
        for pid, info in apps[:10]:
            if (pid, info["start"]) in stopped:
                continue
            try:
                if self.status(info["instance"]).get("state") == "running":
                    return pid, info
            except (OSError, ConnectionError):
                return None
        return None

    # ---- the faults ----

    def app_kill(self):
        found = self.running_app()
        if found is None:
            return None
        pid, info = found
        apps_before = self.scanner.apps()
        t = time.time()
        if not pidfd_signal(pid, info["start"], signal.SIGKILL):
            return None
        return {"t": t, "instance": info["instance"], "pid": pid, "start": info["start"],
                "killed": [(info["instance"], pid, info["start"])],
                "apps_before": len(apps_before)}

    def supervisor_kill(self):
        apps = self.scanner.apps()
        fault = self.daemons.kill_supervisor()
        fault["killed"] = [(i["instance"], pid, i["start"]) for pid, i in apps.items()]
        return fault

    def proxy_restart(self):
        return self.daemons.restart_proxy()

    def app_stop(self):
        found = self.running_app()
        if found is None:
            return None
        pid, info = found
        key = (pid, info["start"])
        t = time.time()
        if not pidfd_signal(pid, info["start"], signal.SIGSTOP):
            return None
        with self.stopped_lock:
            self.stopped[key] = info["instance"]
        fault = {"t": t, "instance": info["instance"], "pid": pid, "start": info["start"], "killed": []}

        def cont():
            time.sleep(STOP_SECONDS)
            fault["cont"] = time.time()
            fault["continued"] = pidfd_signal(pid, info["start"], signal.SIGCONT)
            with self.stopped_lock:
                self.stopped.pop(key, None)

        threading.Thread(target=cont, daemon=True).start()
        return fault

    # ---- invariants ----

    def registry_check(self, label):
        """Sandbox processes the registry does not account for, in two listings around a fresh
        /proc scan, twice 1 s apart; only what fails all four comparisons is reported. Likewise
        a stale pid (listed as running, starting or stopping in both listings of a round, the
        process gone) counts only if it is so in both rounds."""
        persistent = persistent_stale = None
        rounds = []
        for attempt in range(2):
            if attempt:
                time.sleep(1.0)
            before = self._ps()
            live = ProcessScanner(self.sb.dir).scan()
            after = self._ps()
            bad = {}
            for pid, info in live.items():
                why = [self._unaccounted(pid, info, live, listing) for listing in (before, after)]
                if all(why):
                    bad[(pid, info["start"])] = (info, why[0])
            stale = [i for i in after.values()
                     if i.get("pid") and i["state"] in ("running", "starting", "stopping")
                     and proc_stat(i["pid"]) is None and i["instance"] in before
                     and before[i["instance"]].get("pid") == i["pid"]]
            rounds.append({"processes": len(live), "listed_running": sum(1 for i in after.values() if i.get("pid")),
                           "unaccounted": bad, "stale": stale})
            persistent = set(bad) if persistent is None else persistent & set(bad)
            stale_keys = {(i["instance"], i["pid"]) for i in stale}
            persistent_stale = stale_keys if persistent_stale is None else persistent_stale & stale_keys
        result = {"t": time.time(), "label": label, "processes": rounds[-1]["processes"],
                  "nft_tables": sorted(nft_overlaps(self.args.port_range)),
                  "listed_running": rounds[-1]["listed_running"],
                  "orphans": [{"pid": k[0], "start": k[1], **rounds[-1]["unaccounted"][k][0],
                               "why": rounds[-1]["unaccounted"][k][1]} for k in sorted(persistent)],
                  "stale": [{"instance": i["instance"], "pid": i["pid"], "state": i["state"]}
                            for i in rounds[-1]["stale"] if (i["instance"], i["pid"]) in persistent_stale]}
        self.registry_checks.append(result)
        if result["orphans"] or result["stale"]:
            self.log(f"registry check ({label}): {len(result['orphans'])} unaccounted processes, "
                     f"{len(result['stale'])} stale pids: {result['orphans'][:3]} {result['stale'][:3]}")
        return result

    def _ps(self):
        out = self.sb.tenctl("ps", "--json")
        if out.returncode != 0:
            raise RuntimeError(f"tenctl ps --json: {out.stderr.strip()}")
        return {i["instance"]: i for i in json.loads(out.stdout)}

    @staticmethod
    def _unaccounted(pid, info, live, listing):
        """Why `pid` is not accounted for by `listing` (None if it is): it must be the pid the
        registry lists for its instance (the app), an ancestor of it (the exec helper; the
        namespace init) or a descendant (the app's children)."""
        def ancestors(x):
            out, seen = [], set()
            while x and x not in seen:
                seen.add(x)
                out.append(x)
                st = live.get(x)
                x = st["ppid"] if st else (proc_stat(x) or (None, 0))[1]
            return out

        if info["instance"] == "?":
            # A helper (the exec server's clone) does not name its instance: it must be an
            # ancestor of a pid the registry lists.
            if any(pid in ancestors(e["pid"]) for e in listing.values() if e.get("pid")):
                return None
            return "a helper above no pid the registry lists"
        entry = listing.get(info["instance"])
        if entry is None:
            return "instance not registered"
        root = entry.get("pid")
        if not root:
            return f"registry says {entry['state']}, no pid"

        if root in ancestors(pid) or pid in ancestors(root):
            return None
        return f"not related to the registry's pid {root} ({entry['state']})"

    # ---- the run ----

    def run(self):
        a = self.args
        sb = self.sb
        out = out_paths("chaos", self.rev)
        self.out = out
        report = open(out + ".txt", "w")

        def emit(text=""):
            print(text, flush=True)
            report.write(text + "\n")

        notes = [f"notes:{i}" for i in notes_ids(a.tenants)]
        mirror = [f"mirror:{i}" for i in mirror_ids(a.mirror_tenants)]
        d = self.daemons
        d.start_supervisor()
        d.start_proxy()
        d.watchdog.start()
        rpc = TimedRpc(d.admin_path)
        reply = rpc.call({"type": "add", "instances": notes + mirror})
        rpc.close()
        if reply.get("type") != "added":
            raise RuntimeError(f"add: {reply}")
        kinds = [k for k in FAULTS if k in a.faults.split(",")]
        shares = {PLAIN: 1 - a.websocket_share - a.upload_share, WEBSOCKET: a.websocket_share,
                  UPLOAD: a.upload_share}
        emit(f"# chaos: {len(notes)} notes + {len(mirror)} mirror tenants, idle_timeout {a.idle_timeout}, "
             f"{a.rate:g} sessions/s of {a.session} requests {a.gap} s apart (plain {shares[PLAIN]:.0%}, "
             f"websocket {shares[WEBSOCKET]:.0%}, upload {shares[UPLOAD]:.0%}); faults {', '.join(kinds)} every {a.every_min:g}-{a.every_max:g} s "
             f"for {a.duration:.0f} s after {a.warmup:.0f} s of warm-up; seed {a.seed}")
        emit(f"# {machine()}; binaries {self.rev}; sandbox {sb.dir}")
        sup_log = LogCounter(os.path.join(sb.dir, "supervisor.log"), needles=(b"started (pid",))
        self.scanner.start()
        load = Load(sb.proxy_port, notes, mirror, a.rate, shares, a.seed, session=parse_range(a.session, int),
                    gap=parse_range(a.gap, float))
        ovf0 = listen_overflows()
        t0 = time.time()
        load.start()
        self.log(f"load started; warm-up {a.warmup:.0f} s")
        time.sleep(a.warmup)
        end = time.time() + a.duration
        next_check = time.time() + 20
        while time.time() < end:
            kind = self.rng.choice(kinds)
            try:
                fault = getattr(self, kind.replace("-", "_"))()
            except Exception as e:  # noqa: BLE001 - record and go on
                self.log(f"{kind}: {type(e).__name__}: {e}")
                fault = None
            if fault is None:
                self.log(f"{kind}: no running app to pick; skipped")
            else:
                fault["kind"] = kind
                self.faults.append(fault)
                what = fault.get("instance") or f"pid {fault.get('pid')}"
                took = fault.get("recovered", fault["t"]) - fault["t"]
                sent, done, failed, in_flight = load.counts()
                self.log(f"{kind} {what}" + (f", back after {took:.2f} s" if "recovered" in fault else "")
                         + f"; requests so far {done}, failed {failed}, in flight {in_flight}")
            if time.time() >= next_check:
                self.registry_check("during the run")
                next_check = time.time() + 20
            time.sleep(self.rng.uniform(a.every_min, a.every_max))
        self.log(f"faults over; {a.cooldown:.0f} s of load without faults")
        time.sleep(a.cooldown)
        load.stop()
        records = load.records()
        ovf = [x - y for x, y in zip(listen_overflows(), ovf0)]
        self.log(f"load stopped: {len(records)} requests")
        # Nothing may stay stopped by us.
        for (pid, start) in list(self.stopped):
            pidfd_signal(pid, start, signal.SIGCONT)
        final = self.registry_check("load stopped")
        # Everything must idle out.
        idle = parse_duration(a.idle_timeout)
        deadline = time.time() + idle + 20
        while time.time() < deadline and self.scanner.apps():
            time.sleep(0.5)
        left_idle = self.scanner.apps()
        idle_check = self.registry_check("idled out")
        d.stop()
        time.sleep(1.0)
        left_stop = ProcessScanner(sb.dir).scan()
        self.nft_after_stop = sorted(nft_overlaps(a.port_range))
        self.scanner.stop()
        sup_log.poll()
        self.report(emit, records, t0, ovf, sup_log, final, idle_check, left_idle, left_stop)
        report.close()
        return self.exit_code

    # ---- the report ----

    def app_deaths(self):
        """(pid, start) -> the last time the scanner saw that app alive."""
        return {k: v[2] for k, v in self.scanner.app_starts.items()}

    def windows(self):
        """Each fault's impact window and scope, and the end of each killed app."""
        deaths = self.app_deaths()
        starts_by_instance = collections.defaultdict(list)
        for (pid, start), (instance, first, last) in self.scanner.app_starts.items():
            starts_by_instance[instance].append(first)
        for f in self.faults:
            t = f["t"]
            if f["kind"] == "app-kill":
                nxt = [x for x in starts_by_instance[f["instance"]] if x > t]
                f["recovered"] = min(nxt) if nxt else t + 5.0
                f["scope"] = {f["instance"]}
            elif f["kind"] == "app-stop":
                f["recovered"] = f.get("cont", t + STOP_SECONDS)
                f["scope"] = {f["instance"]}
            else:
                f["scope"] = None  # everything
            f["deaths"] = {(inst, pid, start): deaths.get((pid, start), t) + self.scanner.period
                           for inst, pid, start in f.get("killed", [])}

    def classify(self, records):
        """Each failed request: ('killed', fault) | ('proxy', fault) | ('other', fault or None)."""
        out = []
        for r in records:
            if not r.failed:
                continue
            verdict = None
            for f in self.faults:
                if f["kind"] in ("app-kill", "supervisor-kill"):
                    for (inst, pid, start), death in f["deaths"].items():
                        if inst == r.instance and r.start <= death and r.end >= f["t"] - 0.01:
                            verdict = ("killed", f)
                            break
                elif f["kind"] == "proxy-restart" and r.start <= f["t"] <= r.end:
                    verdict = ("proxy", f)
                if verdict:
                    break
            if verdict is None:
                near = [f for f in self.faults if self.touches(f, r)]
                verdict = ("other", near[0] if near else None)
            out.append((r, verdict))
        return out

    @staticmethod
    def touches(f, r):
        """Whether request r overlapped fault f's impact window in f's scope."""
        if f["scope"] is not None and r.instance not in f["scope"]:
            return False
        return r.start <= f["recovered"] and r.end >= f["t"]

    def report(self, emit, records, t0, ovf, sup_log, final, idle_check, left_idle, left_stop):
        self.windows()
        failures = self.classify(records)
        untouched = [r for r in records if not r.failed and not any(self.touches(f, r) for f in self.faults)]
        baseline = {k: median([r.latency for r in untouched if r.kind == k]) for k in KINDS}

        emit()
        emit(f"## requests ({max((r.end for r in records), default=t0) - t0:.0f} s of load)")
        by_kind = request_summary(records, emit)
        emit("baseline latency (requests no fault touched, median): "
             + ", ".join(f"{k} {baseline[k] * 1000:.1f} ms" for k in KINDS))
        wakes = sup_log.found[b"started (pid"]
        emit(f"wakes: {wakes} (supervisor 'started' lines); SYN drops (ListenOverflows, ListenDrops): {ovf}")

        emit()
        emit("## faults")
        header = (f"{'fault':<17}{'count':>6}{'failed':>7}{'killed':>7}{'proxy':>6}{'other':>6}"
                  f"{'delayed':>8}{'extra p50 ms':>13}{'extra p99 ms':>13}{'max ms':>8}{'recovery p50 s':>15}")
        emit(header)
        table = {}
        for kind in FAULTS + ("(none)",):
            fs = [f for f in self.faults if f["kind"] == kind]
            if kind != "(none)" and not fs:
                continue
            mine = [(r, v) for r, v in failures if (v[1]["kind"] if v[1] else "(none)") == kind]
            killed = sum(1 for _, v in mine if v[0] == "killed")
            proxy = sum(1 for _, v in mine if v[0] == "proxy")
            other = sum(1 for _, v in mine if v[0] == "other")
            delayed = [r for r in records if not r.failed and any(self.touches(f, r) for f in fs)]
            extra = sorted(r.latency - baseline[r.kind] for r in delayed)
            rec = [f["recovered"] - f["t"] for f in fs if "recovered" in f]
            table[kind] = {"count": len(fs), "failed": len(mine), "failed_killed": killed, "failed_proxy": proxy,
                           "failed_other": other, "delayed": len(delayed),
                           "extra_p50_ms": p(extra, 50) * 1000, "extra_p99_ms": p(extra, 99) * 1000,
                           "extra_max_ms": (extra[-1] * 1000 if extra else float("nan")),
                           "recovery_p50_s": median(rec)}
            t = table[kind]
            emit(f"{kind:<17}{t['count']:>6}{t['failed']:>7}{killed:>7}{proxy:>6}{other:>6}{t['delayed']:>8}"
                 f"{t['extra_p50_ms']:>13.0f}{t['extra_p99_ms']:>13.0f}{t['extra_max_ms']:>8.0f}"
                 f"{t['recovery_p50_s']:>15.2f}")
        emit("failed = killed (in flight on a killed process: may fail) + proxy (in flight at the proxy's "
             "SIGTERM) + other (should not fail);")
        emit("delayed = answered requests that overlapped the fault's window (fault -> recovery), same instance "
             "for app faults, all for daemon faults; extra = latency - baseline of its kind; recovery = fault -> "
             "instance's next app / supervisor answering / new proxy answering / SIGCONT")
        bad = [(r, v) for r, v in failures if v[0] != "killed"]
        if bad:
            emit("failures not on a killed process:")
            for r, v in bad[:30]:
                f = v[1]
                where = (f"{f['kind']} at {time.strftime('%H:%M:%S', time.localtime(f['t']))}."
                         f"{int(f['t'] % 1 * 1000):03d}" if f else "no fault near")
                # How long after a killed process of the same instance was last seen alive.
                after = [r.start - (d - self.scanner.period) for ff in self.faults
                         for (inst, _pid, _start), d in ff["deaths"].items() if inst == r.instance
                         and 0 <= r.start - (d - self.scanner.period) <= 2.0]
                if after:
                    where += f"; started {min(after) * 1000:.0f} ms after its killed app was last seen alive"
                emit(f"  {time.strftime('%H:%M:%S', time.localtime(r.start))}.{int(r.start % 1 * 1000):03d} "
                     f"+{r.duration:.3f}s {r.kind} {r.op} {r.instance}: {r.status} {r.error} [{v[0]}; {where}]")

        emit()
        emit("## invariants")
        dups = self.scanner.duplicates
        emit(f"check: no instance ran twice at once (/proc every {self.scanner.period * 1000:.0f} ms, "
             f"{self.scanner.scans} scans, {len(self.scanner.app_starts)} app processes seen): "
             f"{'yes' if not dups else f'NO, {len(dups)} times'}")
        for dtime, inst, procs in dups[:10]:
            emit(f"  {time.strftime('%H:%M:%S', time.localtime(dtime))} {inst}: {procs}")
        orphans = [c for c in self.registry_checks if c["orphans"] or c["stale"]]
        emit(f"check: every sandbox process is an instance `tenctl ps --json` lists ({len(self.registry_checks)} "
             f"checks, the last with the load stopped: {final['processes']} processes, "
             f"{final['listed_running']} instances with a pid): "
             f"{'yes' if not orphans else f'NO in {len(orphans)} checks'}")
        for c in orphans[:10]:
            emit(f"  {time.strftime('%H:%M:%S', time.localtime(c['t']))} ({c['label']}): orphans {c['orphans'][:5]} "
                 f"stale {c['stale'][:5]}")
        emit(f"check: all idled out within idle_timeout + 20 s of the last request: "
             f"{'yes' if not left_idle else f'NO, {len(left_idle)} apps left: {list(left_idle.values())[:5]}'}")
        emit(f"check: nothing left after SIGTERM to the supervisor: "
             f"{'yes' if not left_stop else f'NO, {len(left_stop)} processes: {list(left_stop.items())[:5]}'}")
        tables = [c["nft_tables"] for c in self.registry_checks]
        nft_ok = all(len(t) <= 1 for t in tables) and not self.nft_after_stop
        emit(f"check: one nftables table over the port range while running (most seen: "
             f"{max((len(t) for t in tables), default=0)}), none after the supervisor's clean stop "
             f"({len(self.nft_after_stop)}): {'yes' if nft_ok else 'NO: ' + str(self.nft_after_stop)}")
        unexpected = self.daemons.unexpected
        emit(f"check: no daemon exited on its own: {'yes' if not unexpected else f'NO: {unexpected}'}")
        other = sum(1 for _, v in failures if v[0] != "killed")
        emit(f"check: every failed request was in flight on a killed process: "
             f"{'yes' if not other else f'NO, {other} others'} ({len(failures)} failed of {len(records)})")
        emit("(a killed process: an app killed by the fault, or by its supervisor's death, or by the next "
             "supervisor's clean-up of what the last one left)")

        ok = not dups and not orphans and not left_idle and not left_stop and not unexpected and not other and nft_ok
        self.exit_code = 0 if ok else 1
        result = {"script": "chaos.py", "revision": self.rev, "machine": machine(), "argv": sys.argv[1:],
                  "seed": self.args.seed, "requests": by_kind, "baseline_ms": {k: v * 1000 for k, v in baseline.items()},
                  "faults_table": table, "wakes": wakes, "syn_drops": ovf,
                  "faults": [{**{k: (sorted(v) if isinstance(v, set) else v) for k, v in f.items() if k != "deaths"},
                              "deaths": [[*k, d] for k, d in f["deaths"].items()]} for f in self.faults],
                  "events": self.events, "duplicates": dups, "registry_checks": self.registry_checks,
                  "left_after_idle": list(left_idle.values()), "left_after_stop": list(left_stop.values()),
                  "unexpected_exits": unexpected,
                  "failures": [{"start": r.start, "duration": r.duration, "kind": r.kind, "op": r.op,
                                "instance": r.instance, "status": r.status, "error": r.error, "class": v[0],
                                "fault": (v[1]["kind"], v[1]["t"]) if v[1] else None} for r, v in failures]}
        with open(self.out + ".json", "w") as f:
            json.dump(result, f, indent=1, default=str)
        write_requests(self.out + "-requests.csv.gz", records)
        keep_daemon_logs(self.sb, self.out + "-logs")
        emit(f"results: {os.path.relpath(self.out, os.getcwd())}.{{txt,json}}, -requests.csv.gz, -logs/")

    def close(self):
        self.scanner.stopping.set()
        with self.stopped_lock:
            for (pid, start) in list(self.stopped):
                pidfd_signal(pid, start, signal.SIGCONT)
        self.daemons.stop()
        self.daemons.close()
        self.sb.procs = []
        self.sb.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", default="10m", help="time with faults: 10m, 600, ... (default 10m)")
    ap.add_argument("--warmup", default="15s")
    ap.add_argument("--cooldown", default="15s")
    add_load_arguments(ap, tenants=25, mirror_tenants=5, rate=1.0)
    ap.add_argument("--every-min", type=float, default=3.0, help="seconds between faults, at least")
    ap.add_argument("--every-max", type=float, default=8.0, help="seconds between faults, at most")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"which, comma-separated (default all: {','.join(FAULTS)})")
    add_run_arguments(ap)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("chaos: needs root (the proxy drops to nobody; signals to every app)")
    args.duration = parse_duration(args.duration)
    args.warmup = parse_duration(args.warmup)
    args.cooldown = parse_duration(args.cooldown)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}; choose from {','.join(FAULTS)}")
    check_firewall(args.port_range)
    rev = prepare_binaries(args)
    chaos = Chaos(args, rev)
    try:
        return chaos.run()
    except BaseException:
        keep_daemon_logs(chaos.sb, out_paths("chaos-failed", rev) + "-logs")
        raise
    finally:
        chaos.close()


if __name__ == "__main__":
    sys.exit(main())
