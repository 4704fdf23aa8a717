#!/usr/bin/env python3
"""Cold wake per runtime and listen mode: tenement's wake against starting the app directly.

    python3 bench/cold_wake.py [--rounds 15] [--runtimes python,node,go,native]
                               [--modes tcp,unix,activate] [--no-build]

Rows: every runtime x listen mode.

- Runtimes, all implementing examples/README.md's contract:
  - python: examples/notes/app.py;
  - node: examples/notes-node/app.js;
  - go: examples/notes-go, built here with `go build`;
  - native: tiny-http (tests/fixtures), the floor.
- Python and Node run under absolute interpreter paths (this script's own Python, and the
  `node` in PATH), on both sides. A bare `python3` may be a pyenv shim, a bash script that
  costs a few ms of its own.

The two sides:

- tenement: one stopped instance per row, woken with the admin RPC `wake`. Timed from sending
  the request to reading the `woken` reply, on the client side; the reply must say `started`.
  It is stopped again with the RPC `stop`, untimed.
- direct: the same argv, working directory and environment (what tenement passes: PATH,
  LANG/LC_ALL/TZ, the listen variables, TENEMENT_*, DATA_DIR), started with posix_spawn
  (vfork + exec, the cheapest start Python has). Readiness is polled every 1 ms until the
  row's condition holds, then the app is stopped with SIGTERM, untimed.

Readiness is the same condition on both sides:

| mode | tenement config | condition |
|---|---|---|
| tcp | listen = "tcp", ready = "tcp" | a TCP connect to the port succeeds |
| unix | listen = "unix", ready = "tcp" | a connect to SOCKET_PATH succeeds |
| activate | listen = "activate", health = "/health", ready = "health" | GET /health answers 2xx |

- activate needs an HTTP answer. With activate, the supervisor binds the socket, so a connect
  succeeds before the app runs. With ready = "tcp", tenement declares the instance ready as
  soon as the helper is spawned. The old version of this script measured python-activate
  that way: 1.6 ms against 53 ms direct, a wake that did not wait for Python at all.
- The direct side of activate binds its own TCP port (PORT) and is polled the same way.
  Handing it the socket as fd 3 would need LISTEN_PID = the child's pid before exec, so
  os.fork instead of posix_spawn. Forking this Python process costs about 1.2 ms more (tiny-http
  start 2.6 vs 1.3 ms). That would hand tenement an advantage the app never has on its own.
- Polling is not quite even. The direct side sleeps 1 ms between tries. tenement polls every
  200 us for its first 10 ms, and in activate its first GET waits in the listen queue until
  the app answers. So the direct side loses up to about 1 ms per start (0.5 ms on average),
  which matters only for native and go.

Rounds: one warm-up round first, not counted, which creates each app's token and warms the
page cache. Then --rounds rounds. In each round every row is measured on both sides, and
which side goes first alternates from round to round and from row to row. Each start is
preceded by a 20 ms pause, so that a stop's aftermath does not land in the next measurement.

Reported per row:

- medians of each side;
- `ratio`: the median of the per-round tenement/direct ratios;
- `added`: the median of the per-round differences;
- `in sup`: the median of the supervisor's own `elapsed_us` from the reply. The rest of
  `tenement` is the RPC round trip and the client.

`tenctl wake` is no longer measured. It adds the tenctl process's own start, config load and
connection (about 3 ms), which says nothing about a wake through the proxy, and it needed
tenctl built.
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple

import loadtools
from tenement_bench import ROOT, Sandbox, free_port, machine, median

MODES = ("tcp", "unix", "activate")
RUNTIMES = ("python", "node", "go", "native")
READY = {"tcp": "connect", "unix": "connect", "activate": "health"}
POLL = 0.001             # direct side's readiness poll, seconds
SETTLE = 0.02            # pause before every measured start, seconds
START_TIMEOUT = 10.0     # both sides: a start slower than this fails the run
HEALTH_TIMEOUT = 2.0     # per GET /health try (tenement's default health_timeout)
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ")  # supervisor/src/spawn.rs


# One counted round of one row, in seconds.
Sample = namedtuple("Sample", "tenement in_sup direct")


class RowFailure(Exception):
    def __init__(self, row, side, message, log=None):
        super().__init__(f"{row[0]}/{row[1]} ({side} side): {message}")
        self.row, self.side, self.log = row, side, log


# ---- runtimes ---------------------------------------------------------------------------------

def prepare_runtimes(names, snap):
    """{runtime: (argv, workdir)} with absolute argv[0]; builds notes-go into the snapshot."""
    out = {}
    for name in names:
        if name == "python":
            app = os.path.join(ROOT, "examples/notes/app.py")
            out[name] = ([sys.executable, app], os.path.dirname(app))
        elif name == "node":
            app = os.path.join(ROOT, "examples/notes-node/app.js")
            node = shutil.which("node")
            if node is None:
                raise SystemExit("node is not installed (Debian: apt-get install -y nodejs)")
            out[name] = ([node, app], os.path.dirname(app))
        elif name == "go":
            src = os.path.join(ROOT, "examples/notes-go")
            loadtools.PACKAGES.setdefault("go", "golang-go")
            loadtools.ensure_tools("go")
            r = subprocess.run(["go", "build", "-o", "notes-go", "."], cwd=src,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"go build in {src} failed:\n{r.stderr.strip()}")
            # Like the Rust binaries: the run measures this build even if someone rebuilds.
            shutil.copy2(os.path.join(src, "notes-go"), snap)
            out[name] = ([os.path.join(snap, "notes-go")], src)
        elif name == "native":
            out[name] = ([os.path.join(snap, "tiny-http")], ROOT)
        for path in out[name][0]:
            if not os.path.exists(path):
                raise SystemExit(f"{name}: {path} does not exist")
    return out


def versions(runtimes):
    parts = []
    if "python" in runtimes:
        parts.append(f"python app on {runtimes['python'][0][0]}")
    if "node" in runtimes:
        v = subprocess.run([runtimes["node"][0][0], "--version"], capture_output=True, text=True)
        parts.append(f"node {v.stdout.strip()}")
    if "go" in runtimes:
        v = subprocess.run(["go", "version"], capture_output=True, text=True)
        parts.append(v.stdout.strip().removeprefix("go version "))
    return "; ".join(parts)


def service_name(row):
    return f"{row[0]}-{row[1]}"


def services_toml(rows, runtimes):
    out = []
    for row in rows:
        argv, workdir = runtimes[row[0]]
        name = service_name(row)
        out += [f"[service.{name}]",
                f"command = {toml_str(shlex.join(argv))}",
                f"workdir = {toml_str(workdir)}",
                f'listen = "{row[1]}"',
                "idle_timeout = 0",
                f'startup_timeout = "{int(START_TIMEOUT)}s"']
        if READY[row[1]] == "health":
            out += ['health = "/health"', 'ready = "health"']
        else:
            out += ['ready = "tcp"']
        out += [f"[service.{name}.env]", 'DATA_DIR = "{data_dir}/{id}"', ""]
    return "\n".join(out)


def toml_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- readiness probes (direct side) -----------------------------------------------------------

def tcp_accepts(port):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def unix_accepts(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def health_ok(port):
    """GET /health on a fresh connection answers 2xx (what tenement's ready = "health" checks)."""
    s = socket.socket()
    s.settimeout(HEALTH_TIMEOUT)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tenement-bench\r\n"
                  b"Connection: close\r\n\r\n")
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(1024)
            if not chunk:
                return False
            buf += chunk
        parts = buf.split(b" ", 2)
        return len(parts) > 1 and parts[1][:1] == b"2"
    except OSError:
        return False
    finally:
        s.close()


# ---- the two sides ----------------------------------------------------------------------------

class Direct:
    """Starts a row's app directly and polls it until ready."""

    def __init__(self, row, runtimes, tmp):
        self.row = row
        self.argv, self.workdir = runtimes[row[0]]
        name = service_name(row)
        self.dir = os.path.join(tmp, "direct", name)
        os.makedirs(self.dir, mode=0o700)
        self.log_path = os.path.join(tmp, "direct", name + ".log")
        self.log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        self.env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        self.env.update({"TENEMENT_SERVICE": name, "TENEMENT_ID": "direct",
                         "TENEMENT_INSTANCE": f"{name}:direct", "TENEMENT_DATA_DIR": self.dir,
                         "DATA_DIR": self.dir})
        self.pid = None

    def measure(self):
        env = dict(self.env)
        if self.row[1] == "unix":
            path = os.path.join(self.dir, "app.sock")
            if os.path.exists(path):
                os.unlink(path)
            env["SOCKET_PATH"] = path
            ready = lambda: unix_accepts(path)  # noqa: E731
        else:
            port = free_port()
            env.update({"PORT": str(port), "HOST": "127.0.0.1"})
            probe = tcp_accepts if READY[self.row[1]] == "connect" else health_ok
            ready = lambda: probe(port)  # noqa: E731
        here = os.getcwd()
        os.chdir(self.workdir)  # posix_spawn has no cwd; the child inherits ours
        try:
            started = time.perf_counter()
            self.pid = os.posix_spawn(self.argv[0], self.argv, env, setpgroup=0, file_actions=[
                (os.POSIX_SPAWN_DUP2, self.log, 1), (os.POSIX_SPAWN_DUP2, self.log, 2)])
        finally:
            os.chdir(here)
        try:
            while not ready():
                if time.perf_counter() - started > START_TIMEOUT:
                    raise RowFailure(self.row, "direct", f"not ready after {START_TIMEOUT:.0f} s",
                                     self.log_path)
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.pid = None
                    raise RowFailure(self.row, "direct", f"the app exited while starting "
                                     f"(wait status {status})", self.log_path)
                time.sleep(POLL)
            return time.perf_counter() - started
        finally:
            self.stop()

    def stop(self):
        """SIGTERM (every app stops at once on it, by contract), SIGKILL after 5 s."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 5
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.002)

    def close(self):
        self.stop()
        os.close(self.log)


def tenement_wake(rpc, row):
    """Seconds from sending `wake` to reading `woken` (client side) and the supervisor's own
    elapsed_us from the reply; then stops the instance again."""
    inst = f"{service_name(row)}:bench"
    t = time.perf_counter()
    reply = rpc.call({"type": "wake", "instance": inst})
    took = time.perf_counter() - t
    if reply.get("type") != "woken" or not reply.get("started"):
        raise RowFailure(row, "tenement", f"wake answered {reply}")
    stopped = rpc.call({"type": "stop", "instance": inst})
    if stopped.get("type") != "ok":
        raise RowFailure(row, "tenement", f"stop answered {stopped}")
    return took, reply["elapsed_us"] / 1e6


# ---- reporting --------------------------------------------------------------------------------

def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip() or "(empty)"
    except OSError as e:
        return f"(cannot read {path}: {e})"


def report_failure(e, sb, rpc):
    print(f"\nFAILED: {e}", file=sys.stderr)
    if e.side == "direct" and e.log:
        print(f"--- the app's output ({e.log}), last lines:\n{tail(e.log)}", file=sys.stderr)
    if rpc is not None and e.side == "tenement":
        try:
            lines = rpc.call({"type": "logs", "instance": f"{service_name(e.row)}:bench",
                              "lines": 25}).get("lines", [])
            text = "\n".join(f"[{x['stream']}] {x['line']}" for x in lines) or "(empty)"
            print(f"--- the instance's log, last lines:\n{text}", file=sys.stderr)
        except Exception as err:  # the supervisor may be what failed
            print(f"--- (no instance log: {err})", file=sys.stderr)
    print(f"--- supervisor log, last lines:\n{tail(os.path.join(sb.dir, 'supervisor.log'))}",
          file=sys.stderr)


def goal_line(text, value, limit, unit):
    if value != value:  # NaN: row not run
        return f"goal: {text}: not measured (row filtered out)"
    fmt = (lambda v: f"{v:.3f}x") if unit == "x" else (lambda v: f"{v:.2f} ms")
    if value <= limit:
        return f"goal: {text}: met ({fmt(value)}, {fmt(limit - value)} to spare)"
    return f"goal: {text}: MISSED by {fmt(value - limit)} ({fmt(value)})"


def print_table(rows, results, rounds, runtimes):
    print(f"# cold wake: tenement wake RPC vs direct start (1 ms polling), {rounds} interleaved "
          f"rounds after 1 warm-up; {loadtools.revision()}")
    print(f"# {machine()}")
    v = versions(runtimes)
    if v:
        print(f"# {v}")
    print(f"{'runtime':<8}{'mode':<10}{'ready':<9}{'tenement ms':>12}{'direct ms':>11}"
          f"{'ratio':>8}{'added ms':>10}{'in sup ms':>11}")
    summary = {}
    for row in rows:
        xs = results[row]
        ten = median([x.tenement for x in xs])
        direct = median([x.direct for x in xs])
        ratio = median([x.tenement / x.direct for x in xs])
        added = median([x.tenement - x.direct for x in xs])
        in_sup = median([x.in_sup for x in xs])
        summary[row] = (ten, ratio)
        print(f"{row[0]:<8}{row[1]:<10}{READY[row[1]]:<9}{ten * 1e3:>12.2f}{direct * 1e3:>11.2f}"
              f"{ratio:>8.3f}{added * 1e3:>+10.2f}{in_sup * 1e3:>11.2f}")
    print("ratio = median of per-round tenement/direct; added = median of per-round "
          "tenement - direct;\nin sup = median of the supervisor's own elapsed_us in the woken "
          "reply (the rest of tenement ms is the RPC round trip)")
    print('ready: connect = a connect succeeds (tenement: ready = "tcp"); health = GET /health '
          'answers 2xx\n(tenement: health = "/health", ready = "health"; direct: the app binds '
          "its own port, GET polled every 1 ms)")
    nan = (float("nan"), float("nan"))
    print(goal_line("Python wake <= 1.05x direct (tcp, ratio)",
                    summary.get(("python", "tcp"), nan)[1], 1.05, "x"))
    print(goal_line("native wake <= 2.5 ms (tcp, tenement median)",
                    summary.get(("native", "tcp"), nan)[0] * 1e3, 2.5, "ms"))


# ---- leftovers --------------------------------------------------------------------------------

def processes_mentioning(marker):
    """(pid, command line) of every process whose command line or environment contains
    `marker`: every app of this run has its DATA_DIR under the sandbox, the supervisor its
    config there."""
    found = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if marker.encode() in cmd or marker.encode() in env:
            found.append((int(pid), cmd.replace(b"\0", b" ").decode(errors="replace").strip()))
    return found


def check_leftovers(marker):
    """Reports and kills (by pid) processes of this run still alive after the shutdown."""
    left = processes_mentioning(marker)
    for pid, cmd in left:
        print(f"leftover process {pid} ({cmd}): killing it", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return not left


# ---- main -------------------------------------------------------------------------------------

def parse_list(text, allowed, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {', '.join(bad) or '(none)'}; choose from "
                         f"{','.join(allowed)}")
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-build", action="store_true", help="use target/release as it is")
    args = ap.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    names = parse_list(args.runtimes, RUNTIMES, "runtimes")
    modes = parse_list(args.modes, MODES, "modes")
    rows = [(rt, mode) for rt in names for mode in modes]

    if not args.no_build:
        loadtools.build()
    snap = loadtools.snapshot_binaries()
    runtimes = prepare_runtimes(names, snap)

    sb = Sandbox(services_toml(rows, runtimes))
    directs = {}
    rpc = None
    failed = False
    try:
        sb.start_supervisor()
        rpc = sb.admin(timeout=START_TIMEOUT + 20)  # a hung supervisor fails the run, not hangs it
        added = rpc.call({"type": "add", "instances": [f"{service_name(r)}:bench" for r in rows]})
        if added.get("type") != "added":
            raise RuntimeError(f"add answered {added}")
        directs = {row: Direct(row, runtimes, sb.dir) for row in rows}
        results = {row: [] for row in rows}
        for rnd in range(-1, args.rounds):  # round -1: warm-up, not counted
            for i, row in enumerate(rows):
                sides = {}
                tenement_first = (rnd + i) % 2 == 0
                for side in (("tenement", "direct") if tenement_first else ("direct", "tenement")):
                    time.sleep(SETTLE)
                    try:
                        if side == "tenement":
                            sides[side] = tenement_wake(rpc, row)
                        else:
                            sides[side] = directs[row].measure()
                    except RowFailure:
                        raise
                    except Exception as e:
                        raise RowFailure(row, side, f"{type(e).__name__}: {e}",
                                         directs[row].log_path) from e
                if rnd >= 0:
                    results[row].append(Sample(*sides["tenement"], sides["direct"]))
            if rnd >= 0:
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print_table(rows, results, args.rounds, runtimes)
    except RowFailure as e:
        failed = True
        report_failure(e, sb, rpc)
    except Exception as e:  # not tied to a row: the supervisor did not start, add failed...
        failed = True
        print(f"\nFAILED: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"--- supervisor log, last lines:\n{tail(os.path.join(sb.dir, 'supervisor.log'))}",
              file=sys.stderr)
    finally:
        for d in directs.values():
            d.close()
        if rpc is not None:
            rpc.close()
        sb.close()  # SIGTERM to the supervisor, which stops its instances
        if not check_leftovers(sb.dir):
            failed = True
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
