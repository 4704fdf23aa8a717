#!/usr/bin/env python3
"""Acceptance suite: tenement from the outside, as a user meets it.

Starts tenement-supervisor and tenement-proxy from their binaries with the multi-runtime
example (examples/multi/tenement.toml: the notes app in Python, Node.js and Go, two tenants
each, listening on TCP, a Unix socket and a handed-off socket) and checks everything by Host
header against the proxy, or with tenctl. The config is used as shipped except for what a
test cannot share with a person running the example: its directories (a temporary one), the
proxy's port (a free one), the apps' working directories (made absolute) and idle_timeout
(2 s instead of 5 minutes, so that idling out takes seconds).

Prints one line per check (`PASS name` or `FAIL name: why`) and `N passed, N failed` last;
exits 1 if anything failed.

    python3 tests/acceptance/run.py [--bin target/debug] [--keep]

Needs python3, node and go (Debian: nodejs, golang-go); builds the Go app and, without
--bin, the three tenement binaries (debug).
"""

import argparse
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
CONFIG = os.path.join(EXAMPLES, "multi", "tenement.toml")
SERVICES = {"py": "python", "node": "node", "go": "go"}  # service -> runtime it reports
TENANTS = ["alice", "bob"]
IDLE_TIMEOUT = 2  # seconds
# How long a check waits for something that must happen (a daemon answering, an exit): generous,
# because on a loaded 2-core machine "promptly" can take seconds. It only bounds a hang; no
# check measures speed (timing figures belong in bench/).
EVENT_DEADLINE = 30  # seconds
TOKEN = re.compile(r"[0-9a-f]{64}")


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


class Suite:
    def __init__(self, bin_dir, keep):
        self.bin = bin_dir
        self.keep = keep
        self.passed = 0
        self.failed = 0
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="tenement-acceptance-")
        # As root the proxy drops to `nobody`, which must reach run/proxy.sock inside.
        os.chmod(self.dir, 0o711)
        self.port = free_port()
        self.config = os.path.join(self.dir, "tenement.toml")
        self.tokens = {}
        self.written = {}  # service -> the note written through alice

    # ---- running ------------------------------------------------------------------------

    def run(self, name, fn, *args):
        try:
            fn(*args)
        except Failed as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            self.passed += 1
            print(f"PASS {name}", flush=True)

    def write_config(self):
        with open(CONFIG) as f:
            text = f.read()
        replacements = [
            ('data_dir = "./data"', f'data_dir = "{self.dir}/data"\nstate_dir = "{self.dir}/state"\n'
                                    f'runtime_dir = "{self.dir}/run"'),
            ('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{self.port}"'),
            ('workdir = "../', f'workdir = "{EXAMPLES}/'),
            ('idle_timeout = "5m"', f'idle_timeout = "{IDLE_TIMEOUT}s"'),
        ]
        for old, new in replacements:
            if old not in text:
                raise SystemExit(f"acceptance: {CONFIG} no longer has {old!r}; update tests/acceptance/run.py")
            text = text.replace(old, new)
        with open(self.config, "w") as f:
            f.write(text)

    def start(self):
        log = open(os.path.join(self.dir, "supervisor.log"), "w")
        self.supervisor = subprocess.Popen(
            [os.path.join(self.bin, "tenement-supervisor"), "--config", self.config],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.supervisor)
        wait_for(lambda: self.tenctl("ps").returncode == 0, EVENT_DEADLINE, "the supervisor to answer tenctl")
        args = [os.path.join(self.bin, "tenement-proxy"), "--config", self.config]
        if os.geteuid() == 0:
            args += ["--user", "nobody"]
        log = open(os.path.join(self.dir, "proxy.log"), "w")
        self.proxy = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.proxy)
        wait_for(lambda: connects(self.port), EVENT_DEADLINE, "the proxy to listen")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(2 * EVENT_DEADLINE)  # a stop_grace (10 s) and then some
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def tenctl(self, *args):
        return subprocess.run([os.path.join(self.bin, "tenctl"), "--config", self.config, *args],
                              capture_output=True, text=True, timeout=60)

    def status(self, instance):
        out = self.tenctl("status", instance, "--json")
        check(out.returncode == 0, f"tenctl status {instance}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def request(self, host, path, method="GET", body=None, token=None, authorization=None, timeout=30):
        headers = {"Host": host}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if authorization is not None:
            headers["Authorization"] = authorization
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.headers, r.read().decode("utf-8", "replace")  # headers: any case
        finally:
            c.close()

    # ---- checks -----------------------------------------------------------------------

    def health(self, service, tenant):
        status, headers, body = self.request(f"{tenant}.{service}.localhost", "/health")
        check(status == 200, f"GET /health answered {status}: {body.strip()[:200]}")
        doc = json.loads(body)
        want = {"status": "ok", "runtime": SERVICES[service], "service": service, "tenant": tenant}
        check(doc == want, f"/health said {doc}, expected {want}")

    def token(self, service, tenant):
        status, _, body = self.request(f"{tenant}.{service}.localhost", "/token")
        check(status == 200, f"GET /token answered {status}")
        token = body.strip()
        check(TOKEN.fullmatch(token), f"not a 64-digit hex token: {token[:80]!r}")
        self.tokens[(service, tenant)] = token

    def tokens_differ(self):
        check(len(self.tokens) == 6, f"only {len(self.tokens)} of 6 tokens were fetched")
        check(len(set(self.tokens.values())) == 6, "two instances share a token")

    def authorization(self, service):
        host = f"alice.{service}.localhost"
        own, other = self.tokens[(service, "alice")], self.tokens[(service, "bob")]
        status, headers, _ = self.request(host, "/notes")
        check(status == 401, f"no Authorization: {status}, expected 401")
        check(headers.get("WWW-Authenticate", "").startswith("Bearer"),
              f"401 without WWW-Authenticate: Bearer ({headers.get('WWW-Authenticate')!r})")
        status, _, _ = self.request(host, "/notes", authorization=f"Basic {own}")
        check(status == 401, f"Authorization: Basic: {status}, expected 401")
        status, _, _ = self.request(host, "/notes", token="0" * 64)
        check(status == 403, f"a wrong token: {status}, expected 403")
        status, _, _ = self.request(host, "/notes", token=other)
        check(status == 403, f"bob's token on alice: {status}, expected 403")
        other_service = next(s for s in SERVICES if s != service)
        status, _, _ = self.request(host, "/notes", token=self.tokens[(other_service, "alice")])
        check(status == 403, f"alice's {other_service} token on alice.{service}: {status}, expected 403")
        # The token arrives exactly as sent: any change to the header would fail the compare.
        status, _, body = self.request(host, "/notes", token=own)
        check(status == 200, f"alice's own token: {status}, expected 200 ({body.strip()[:200]})")

    def notes_are_private(self, service):
        text = f"note for alice.{service} {uuid.uuid4()}"
        host = f"alice.{service}.localhost"
        token = self.tokens[(service, "alice")]
        status, headers, body = self.request(host, "/notes", "POST", text.encode(), token=token)
        check(status == 201, f"POST /notes: {status} {body.strip()[:200]}")
        note_id = json.loads(body)["id"]
        check(headers.get("Location") == f"/notes/{note_id}", f"Location {headers.get('Location')!r}")
        status, _, body = self.request(host, "/notes", token=token)
        check(status == 200 and text in [n["text"] for n in json.loads(body)], "alice cannot read her own note")
        self.written[service] = text
        readers = [(service, "bob")] + [(s, "alice") for s in SERVICES if s != service]
        for s, tenant in readers:
            status, _, body = self.request(f"{tenant}.{s}.localhost", "/notes", token=self.tokens[(s, tenant)])
            check(status == 200, f"{tenant}.{s} GET /notes: {status}")
            check(text not in body, f"{tenant}.{s} sees alice.{service}'s note")

    def errors(self, service):
        host = f"alice.{service}.localhost"
        token = self.tokens[(service, "alice")]
        status, _, body = self.request(host, "/no-such-page")
        check(status == 404, f"unknown path: {status}")
        check(body.endswith("\n") and body.count("\n") == 1, f"404 body is not one line: {body!r}")
        status, headers, _ = self.request(host, "/notes", "DELETE", token=token)
        check(status == 405, f"DELETE /notes: {status}")
        allow = {m.strip() for m in (headers.get("Allow") or "").split(",")}
        check({"GET", "POST"} <= allow, f"405 Allow: {headers.get('Allow')!r}")
        status, _, _ = self.request(host, "/notes", "POST", b"   ", token=token)
        check(status == 400, f"an empty note: {status}")
        status, _, _ = self.request(host, "/notes", "POST", b"\xff\xfe", token=token)
        check(status == 400, f"a note that is not UTF-8: {status}")
        status, _, _ = self.request(host, "/notes", "POST", b"x" * (64 * 1024 + 1), token=token)
        check(status == 413, f"a note over 64 KiB: {status}")
        status, _, body = self.request(host, "/health", "HEAD")
        check(status == 200 and body == "", f"HEAD /health: {status} {body!r}")

    def listen_modes(self):
        want = {"py": "tcp", "node": "unix", "go": "tcp"}  # activate is tcp on the outside
        for service, mode in want.items():
            address = self.status(f"{service}:bob")["address"]
            is_tcp = re.fullmatch(r"127\.0\.0\.1:\d+", address) is not None
            check(is_tcp == (mode == "tcp"), f"{service}:bob listens on {address!r}, expected {mode}")
            if mode == "unix":
                check(address.endswith(".sock") and os.path.isabs(address.removeprefix("unix:")),
                      f"{service}:bob address {address!r} is not a socket path")

    def ps_lists_six(self):
        out = self.tenctl("ps", "--json")
        check(out.returncode == 0, f"tenctl ps --json: {out.stderr.strip()}")
        listed = sorted(i["instance"] for i in json.loads(out.stdout))
        want = sorted(f"{s}:{t}" for s in SERVICES for t in TENANTS)
        check(listed == want, f"listed {listed}, expected {want}")

    def idle_stop_and_wake(self):
        # All six idle out; the alice ones were just used, so they are surely running.
        for s in SERVICES:
            status, _, _ = self.request(f"alice.{s}.localhost", "/health")
            check(status == 200, f"alice.{s} /health: {status}")
        pids = {f"{s}:alice": self.status(f"{s}:alice")["pid"] for s in SERVICES}
        check(all(pids.values()), f"not all running before idling: {pids}")

        def all_stopped():
            out = self.tenctl("ps", "--json")
            return out.returncode == 0 and all(i["state"] == "stopped" for i in json.loads(out.stdout))

        wait_for(all_stopped, IDLE_TIMEOUT + EVENT_DEADLINE,
                 f"all six instances to stop after idle_timeout {IDLE_TIMEOUT}s", exc=Failed)
        gone = [i for i, pid in pids.items() if pid_alive(pid)]
        check(not gone, f"stopped but their processes are alive: {gone}")
        self.before_idle = pids

    def woken_with_data(self, service):
        instance = f"{service}:alice"
        status, _, body = self.request(f"alice.{service}.localhost", "/notes", token=self.tokens[(service, "alice")])
        check(status == 200, f"first request after the idle stop: {status} {body.strip()[:200]}")
        check(self.written[service] in body, "the note written before the idle stop is gone")
        after = self.status(instance)
        check(after["state"] == "running", f"state {after['state']}")
        check(after["pid"] != self.before_idle[instance], "the same process answered: it never stopped")

    def killed_is_back(self, service):
        instance = f"{service}:alice"
        host = f"alice.{service}.localhost"
        status, _, _ = self.request(host, "/health")
        check(status == 200, f"before the kill: {status}")
        pid = self.status(instance)["pid"]
        victims = [pid] + descendants(pid)
        # kill(2) returns before the process is gone, and a multi-threaded one (node, go)
        # shows as a zombie while its other threads still hold its sockets: a pidfd turns
        # readable only when all of them have exited.
        pidfds = []
        for v in victims:
            try:
                pidfds.append(os.pidfd_open(v))
                os.kill(v, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in pidfds:
            ready, _, _ = select.select([fd], [], [], EVENT_DEADLINE)
            os.close(fd)
            check(ready, f"the killed app did not exit within {EVENT_DEADLINE} s")
        # The next request comes once the app is dead, before or after the supervisor noticed:
        # either way it must be answered.
        status, _, body = self.request(host, "/health", timeout=60)
        check(status == 200, f"next request after kill -9: {status} {body.strip()[:200]}")
        new_pid = self.status(instance)["pid"]
        check(new_pid and new_pid != pid, f"pid {pid} -> {new_pid}")

    def nothing_left(self):
        out = self.tenctl("ps", "--json")
        check(out.returncode == 0, f"tenctl ps --json: {out.stderr.strip()}")
        pids = [i["pid"] for i in json.loads(out.stdout) if i["pid"]]
        check(pids, "no instance was running before the shutdown")
        pids += [d for pid in pids for d in descendants(pid)]
        self.stop()
        check(self.supervisor.returncode == 0, f"the supervisor exited with {self.supervisor.returncode}")
        check(self.proxy.returncode == 0, f"the proxy exited with {self.proxy.returncode}")
        left = [pid for pid in pids if pid_alive(pid)]
        check(not left, f"app processes still alive after shutdown: {left}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def wait_for(condition, seconds, what, exc=SystemExit):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise exc(f"gave up waiting {seconds}s for {what}")


def build(bin_dir):
    if shutil.which("go") is None or shutil.which("node") is None:
        raise SystemExit("acceptance: needs node and go (Debian: apt-get install nodejs golang-go)")
    env = dict(os.environ)
    if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
        env["GOCACHE"] = os.path.join(tempfile.gettempdir(), "tenement-go-cache")  # go needs one
    subprocess.run(["go", "build", "-o", "notes-go", "."], cwd=os.path.join(EXAMPLES, "notes-go"), check=True,
                   env=env)
    if bin_dir is None:
        subprocess.run(["cargo", "build", "--quiet", "-p", "tenement-supervisor", "-p", "tenement-proxy",
                        "-p", "tenctl"], cwd=ROOT, check=True)
        bin_dir = os.path.join(ROOT, "target", "debug")
    return bin_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="directory with tenement-supervisor, tenement-proxy, tenctl "
                                  "(default: build target/debug)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = ap.parse_args()
    bin_dir = build(os.path.abspath(args.bin) if args.bin else None)

    suite = Suite(bin_dir, args.keep)
    suite.write_config()
    try:
        suite.start()
        for service in SERVICES:
            for tenant in TENANTS:
                suite.run(f"health.{service}.{tenant}", suite.health, service, tenant)
        for service in SERVICES:
            for tenant in TENANTS:
                suite.run(f"token.{service}.{tenant}", suite.token, service, tenant)
        suite.run("tokens_differ", suite.tokens_differ)
        for service in SERVICES:
            suite.run(f"authorization.{service}", suite.authorization, service)
        for service in SERVICES:
            suite.run(f"notes_private.{service}", suite.notes_are_private, service)
        for service in SERVICES:
            suite.run(f"errors.{service}", suite.errors, service)
        suite.run("listen_modes", suite.listen_modes)
        suite.run("ps_json_lists_six", suite.ps_lists_six)
        suite.run("idle_stop", suite.idle_stop_and_wake)
        for service in SERVICES:
            suite.run(f"wake_keeps_data.{service}", suite.woken_with_data, service)
        for service in SERVICES:
            suite.run(f"killed_back.{service}", suite.killed_is_back, service)
        suite.run("shutdown_leaves_nothing", suite.nothing_left)
    except SystemExit as e:
        suite.failed += 1
        print(f"FAIL setup: {e}", flush=True)
    finally:
        suite.stop()
        if suite.failed:
            for name in ("supervisor.log", "proxy.log"):
                path = os.path.join(suite.dir, name)
                if os.path.exists(path):
                    print(f"--- last lines of {name}")
                    with open(path, errors="replace") as f:
                        print("".join(f.readlines()[-30:]), end="")
        if args.keep or suite.failed:
            print(f"kept {suite.dir}")
        else:
            shutil.rmtree(suite.dir, ignore_errors=True)
    print(f"{suite.passed} passed, {suite.failed} failed")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
