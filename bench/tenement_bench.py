"""Shared pieces of tenement's benchmarks: building, a sandboxed supervisor, the RPC client,
medians and ratio tables. Standard library only."""

import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")


def build():
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "tenement-supervisor", "-p", "tenement-proxy",
         "-p", "tenctl", "-p", "tenement-fixtures"],
        cwd=ROOT, check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Instances' ports of a sandbox that names none.
DEFAULT_PORT_RANGE = "24000-25999"


def stop(proc):
    """SIGTERM to a process this script started, by its Popen; waits for it (15 s, then
    SIGKILL)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sandbox:
    """A temp dir with a config, a running supervisor and (optionally) a proxy."""

    def __init__(self, services_toml, port_range=DEFAULT_PORT_RANGE, listen=None, settings_extra=()):
        self.dir = tempfile.mkdtemp(prefix="tenement-bench-")
        self.listen = listen
        settings = [
            "[settings]",
            f'data_dir = "{self.dir}/data"',
            f'state_dir = "{self.dir}/state"',
            f'runtime_dir = "{self.dir}/run"',
            f'port_range = "{port_range}"',
            'proxy_user = "nobody"',
            'isolation = "process"',
            'user = "self"',
        ]
        if listen:
            settings.append(f'listen = "{listen}"')
        settings.extend(settings_extra)
        self.config = os.path.join(self.dir, "tenement.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(settings) + "\n\n" + services_toml.replace("@ROOT@", ROOT) + "\n")
        self.procs = []

    def start_supervisor(self):
        log = open(os.path.join(self.dir, "supervisor.log"), "w")
        p = subprocess.Popen([os.path.join(RELEASE, "tenement-supervisor"), "--config", self.config],
                             stdout=log, stderr=log)
        self.procs.append(p)
        sock = os.path.join(self.dir, "run", "admin.sock")
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                Rpc(sock).close()
                self.supervisor = p
                return p
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("supervisor did not start; see " + log.name)

    def start_proxy(self):
        log = open(os.path.join(self.dir, "proxy.log"), "w")
        args = [os.path.join(RELEASE, "tenement-proxy"), "--config", self.config]
        if os.geteuid() == 0:
            args += ["--user", "nobody"]
        p = subprocess.Popen(args, stdout=log, stderr=log)
        self.procs.append(p)
        host, port = self.listen.rsplit(":", 1)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                self.proxy = p
                return p
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("proxy did not start; see " + log.name)

    def admin(self, timeout=None):
        return Rpc(os.path.join(self.dir, "run", "admin.sock"), timeout)

    def tenctl(self, *args):
        return subprocess.run([os.path.join(RELEASE, "tenctl"), "--config", self.config, *args],
                              capture_output=True, text=True)

    def close(self):
        for p in reversed(self.procs):
            stop(p)
        shutil.rmtree(self.dir, ignore_errors=True)


class Rpc:
    """A blocking client of the supervisor's framed JSON RPC.

    The supervisor closes a request connection left idle for 30 s; a call after 20 s of
    silence first opens a new one, so a benchmark may hold one client for its whole run."""

    IDLE_RECONNECT = 20.0

    def __init__(self, path, timeout=None):
        self.path = path
        self.timeout = timeout
        self._connect()

    def _connect(self):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(self.timeout)
        self.s.connect(self.path)
        self.last_used = time.monotonic()
        self._exchange({"type": "hello", "version": 1, "client": "bench"})

    def call(self, message):
        if time.monotonic() - self.last_used > self.IDLE_RECONNECT:
            self.s.close()
            self._connect()
        return self._exchange(message)

    def _exchange(self, message):
        self.last_used = time.monotonic()
        body = json.dumps(message).encode()
        self.s.sendall(struct.pack(">I", len(body)) + body)
        head = self._read(4)
        reply = json.loads(self._read(struct.unpack(">I", head)[0]))
        self.last_used = time.monotonic()
        return reply

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("supervisor closed the connection")
            buf += chunk
        return buf

    def close(self):
        self.s.close()


def wait_port(port, started, poll=0.001, timeout=30.0, alive=None):
    """Polls a connect every `poll` seconds; returns seconds from `started` to success. With
    `alive` (a Popen), gives up as soon as that process has exited."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return time.perf_counter() - started
        except OSError:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"port {port} never accepted")
            if alive is not None and alive.poll() is not None:
                raise ConnectionRefusedError(f"the app for port {port} exited ({alive.returncode})")
            time.sleep(poll)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def p(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cpus, {cpu}, kernel {os.uname().release}, python {sys.version.split()[0]}"


# ---- Added for soak.py and chaos.py: long runs, processes watched from the outside ----


def parse_duration(text):
    """Seconds in "1h", "5m", "90s", "1m30s" or a plain number of seconds."""
    import re
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (e.g. 1h, 5m, 90s, 1m30s, 300)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def proc_stat(pid):
    """(state, ppid, start time in clock ticks, comm) from /proc/PID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm_end = data.rfind(b")")
    fields = data[comm_end + 2:].split()
    # After the ")" the fields start at number 3 (state); ppid is 4, starttime 22.
    comm = data[data.find(b"(") + 1:comm_end].decode("utf-8", "replace")
    return fields[0].decode(), int(fields[1]), int(fields[19]), comm


def proc_stats(pid):
    """RSS and anonymous memory (KiB), threads and open fds of a process; None once it is gone."""
    try:
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "Threads"):
                    out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return {"rss_kib": out.get("VmRSS", 0), "anon_kib": out.get("RssAnon", 0),
            "threads": out.get("Threads", 0), "fds": out["fds"]}


def proc_environ(pid):
    """The environment of a process as a dict of bytes (root reads anyone's), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return env


def revision_of(path):
    """The git revision of the checkout holding `path` (a --bin directory such as
    WORKTREE/target/release), with -dirty for local changes; "?" without git or a checkout."""
    try:
        r = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                           capture_output=True, text=True)
    except OSError:
        return "?"
    return r.stdout.strip() or "?"


class TimedRpc(Rpc):
    """An Rpc whose socket operations (connect and hello included) time out: a supervisor that
    is down behind a socket someone else holds queues connections instead of refusing them."""

    def __init__(self, path, timeout=10.0):
        super().__init__(path, timeout)

    def call_all(self, message):
        """A call answered in several frames (`list`: every one but the last has `more`)."""
        replies = [self.call(message)]
        while replies[-1].get("more"):
            replies.append(json.loads(self._read(struct.unpack(">I", self._read(4))[0])))
        return replies
