#!/usr/bin/env python3
"""Security suite: hostile tenants against tenement, as root, from the outside.

Starts tenement-supervisor (root: every instance in its own namespaces as its own dynamic uid,
the default) and tenement-proxy (dropped to `nobody`) from their binaries, with a victim app
(`tiny-http`) and hostile tenants (tests/fixtures/py/hostile.py: a web shell, and optionally a
port squatter). Each check plays one attack of the adversarial review (the findings F1-F17 of
the security issue) and says what it saw.

Prints `PASS name: detail` or `FAIL name: why` per check and `N passed, N failed` last; exits 1
if anything failed.

    sudo python3 tests/security/run.py [--bin target/debug] [--keep] [--only NAME]

Needs root (the attacks are about uids, namespaces and the firewall) and python3.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "py")
# How long anything that must happen may take: generous, it only bounds a hang.
EVENT_DEADLINE = 30
SQUAT_ROUNDS = 200
SANDBOX_PARENT = "/var/lib/tenement-security-test"


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_block(size=100):
    """A block of ports below the ephemeral range that nothing listens on."""
    for lo in range(26000, 31000, size):
        if all(bindable(p) for p in range(lo, lo + size, 7)):
            return lo, lo + size - 1
    raise SystemExit("security: no free block of ports between 26000 and 31000")


def wait_for(condition, within, what):
    deadline = time.monotonic() + within
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise Failed(f"waited {within} s for {what}")
        time.sleep(0.02)


class Suite:
    def __init__(self, bin_dir, keep):
        self.bin = bin_dir
        self.keep = keep
        self.passed = 0
        self.failed = 0
        self.procs = []
        # Not under /tmp: instances get a private /tmp, which would hide the config file from
        # them whatever tenement does, and F15 checks that tenement hides it.
        os.makedirs(SANDBOX_PARENT, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="run-", dir=SANDBOX_PARENT)
        os.chmod(self.dir, 0o711)
        self.port = free_port()
        self.range = port_block()
        self.config = os.path.join(self.dir, "tenement.toml")
        self.fixtures = self.install_fixtures()

    def run(self, name, fn):
        try:
            detail = fn()
        except Failed as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            self.passed += 1
            print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)

    def install_fixtures(self):
        """The tenants' programs, copied into the sandbox: the checkout may live where an
        instance cannot see it (a clone under /tmp is hidden by the instance's private /tmp),
        and a tenant's program should not depend on where the tests were started from."""
        fixtures = os.path.join(self.dir, "fixtures")
        shutil.copytree(FIXTURES, fixtures, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(os.path.join(self.bin, "tiny-http"), fixtures)
        for dirpath, dirnames, filenames in os.walk(fixtures):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                path = os.path.join(dirpath, name)
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
        return fixtures

    def write_config(self):
        lo, hi = self.range
        tiny = os.path.join(self.fixtures, "tiny-http")
        fixtures = self.fixtures
        text = f"""
[settings]
domain = "localhost"
listen = "127.0.0.1:{self.port}"
data_dir = "{self.dir}/data"
state_dir = "{self.dir}/state"
runtime_dir = "{self.dir}/run"
port_range = "{lo}-{hi}"
dynamic_users = "63000-63099"
proxy_user = "nobody"
max_connections = 100
max_connections_per_client = 40
# A TLS terminator on this host would be trusted like this; tenants must not be (F14).
trusted_proxies = ["127.0.0.1"]

[service.victim]
command = "{tiny}"
idle_timeout = "never"
# A squatter that takes the port just before the app binds it and lets it go before the
# supervisor looks makes a start fail (EADDRINUSE) without a trace: those few count as failed
# starts, so the racer check must not run into max_restarts.
max_restarts = 1000
[service.victim.env]
# A 30 ms start: the window a squatter races.
FIXTURE_START_DELAY_MS = "30"

[service.hostile]
command = "python3 {fixtures}/hostile.py"
idle_timeout = "never"
env_file = "{self.dir}/hostile.env"
[service.hostile.env]
VISIBLE = "in the config"

[service.lurker]
command = "python3 {fixtures}/hostile.py"
idle_timeout = "never"
[service.lurker.env]
SQUAT_RANGE = "{lo}-{hi}"

[service.uvictim]
command = "{tiny}"
listen = "unix"
idle_timeout = "never"

[service.usurper]
command = "python3 {fixtures}/hostile.py"
listen = "unix"
idle_timeout = "never"
startup_timeout = "10s"
[service.usurper.env]
SYMLINK_TO = "{self.dir}/run/sockets/uvictim.v.sock"

[service.open]
command = "{tiny}"
auto_spawn = true
auto_spawn_max = 5
auto_spawn_expire = "3s"
idle_timeout = "1s"

[service.open2]
command = "{tiny}"
auto_spawn = true
idle_timeout = "1s"

[service.forky]
command = "python3 {fixtures}/hostile.py"
idle_timeout = "never"
pids_max = 24
memory_max = "64MB"
tmp_size = "8MB"

[service.busy]
command = "python3 {fixtures}/mirror.py"
idle_timeout = "never"
max_upstream_connections = 4

[instances]
victim = ["v"]
hostile = ["h"]
lurker = ["l"]
"""
        with open(self.config, "w") as f:
            f.write(text)
        env_file = os.path.join(self.dir, "hostile.env")
        with open(os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("# the hostile tenant's own secret\nSECRET_TOKEN=s3cr3t-value\n")

    def start(self):
        log = open(os.path.join(self.dir, "supervisor.log"), "w")
        self.supervisor = subprocess.Popen(
            [os.path.join(self.bin, "tenement-supervisor"), "--config", self.config],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.supervisor)
        wait_for(lambda: self.tenctl("ps").returncode == 0, EVENT_DEADLINE, "the supervisor to answer tenctl")
        log = open(os.path.join(self.dir, "proxy.log"), "w")
        self.proxy = subprocess.Popen(
            [os.path.join(self.bin, "tenement-proxy"), "--config", self.config, "--user", "nobody"],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.proxy)
        wait_for(lambda: not bindable(self.port), EVENT_DEADLINE, "the proxy to listen")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(2 * EVENT_DEADLINE)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def log(self, name):
        with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
            return f.read()

    # ---- talking to tenement ----------------------------------------------------------------

    def tenctl(self, *args):
        return subprocess.run([os.path.join(self.bin, "tenctl"), "--config", self.config, *args],
                              capture_output=True, text=True, timeout=120)

    def ok(self, *args):
        out = self.tenctl(*args)
        check(out.returncode == 0, f"tenctl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def status(self, instance):
        return json.loads(self.ok("status", instance, "--json"))

    def request(self, host, path, method="GET", body=None, timeout=EVENT_DEADLINE):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def shell(self, instance, command):
        """Runs `command` as tenant `instance` (hostile.py's /run); its result."""
        service, tenant = instance.split(":")
        status, body = self.request(f"{tenant}.{service}.localhost", "/run", "POST", command.encode())
        check(status == 200, f"{instance} /run: {status} {body[:200]}")
        return json.loads(body)

    # ---- the attacks --------------------------------------------------------------------------

    def wake_rounds(self, rounds):
        """Stops and wakes victim:v `rounds` times through the proxy. Returns the answers that
        were not the victim's (never acceptable) and the number of 503s: a start the squatter
        broke by taking the port just before the app bound it and letting it go again before
        the supervisor looked (the app died of EADDRINUSE; it is counted as a failed start)."""
        wrong, unavailable = [], 0
        for i in range(rounds):
            self.ok("stop", "victim:v")
            status, body = self.request("v.victim.localhost", "/")
            if (status, body.strip()) == (200, "hello from victim:v"):
                continue
            if status == 503:
                unavailable += 1
            else:
                wrong.append(f"round {i}: {status} {body.strip()[:60]!r}")
        return wrong, unavailable

    def f1_tenant_squatter_is_banned(self):
        """F1: a co-tenant lurks for the victim's port and races its wakes."""
        self.ok("spawn", "victim:v")
        self.ok("spawn", "lurker:l")  # it learns the victim's port from /proc/net/tcp
        wrong, unavailable = self.wake_rounds(SQUAT_ROUNDS)
        captured = self.ok("logs", "lurker:l", "-n", "100000").count("CAPTURED")
        lurker = self.status("lurker:l")
        victim = self.status("victim:v")
        check(not wrong and captured == 0,
              f"{len(wrong)} of {SQUAT_ROUNDS} wakes answered by someone else ({wrong[:3]}), "
              f"{captured} requests captured by the lurker")
        # Once caught the lurker is gone: at most the race that caught it can have cost a wake.
        check(unavailable <= 1, f"{unavailable} wakes failed with 503")
        check(lurker["state"] == "failed" and "security" in (lurker.get("reason") or ""),
              f"the lurker is {lurker['state']} ({lurker.get('reason')}), not failed for security")
        check(victim["state"] == "running", f"victim is {victim['state']} ({victim.get('reason')})")
        events = self.log("supervisor").count("security: uid")
        return (f"{SQUAT_ROUNDS} wakes: 0 captured, {SQUAT_ROUNDS - unavailable} answered by the "
                f"victim, {unavailable} 503; the lurker was caught ({events} security events) "
                f"and is failed: {lurker['reason']}")

    def f1_local_racer_gets_nothing(self):
        """F1: a local process (not a tenant, so it cannot be stopped) races every wake."""
        lo, hi = self.range
        out = open(os.path.join(self.dir, "racer.log"), "w")
        env = dict(os.environ, PORT=str(free_port()), SQUAT_RANGE=f"{lo}-{hi}",
                   SQUAT_HOLD_MS="50", SQUAT_PAUSE_MS="100")
        racer = subprocess.Popen(
            ["setpriv", "--reuid=63099", "--regid=63099", "--clear-groups",
             "python3", os.path.join(self.fixtures, "hostile.py")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/")
        self.procs.append(racer)
        try:
            self.ok("spawn", "victim:v")
            time.sleep(0.1)  # the racer learns the victim's port
            events_before = self.log("supervisor").count("security: uid")
            wrong, unavailable = self.wake_rounds(SQUAT_ROUNDS)
        finally:
            racer.kill()
            racer.wait()
        captured = self.log("racer").count("CAPTURED")
        events = self.log("supervisor").count("security: uid") - events_before
        check(captured == 0, f"the racer captured {captured} requests")
        check(not wrong, f"{len(wrong)} of {SQUAT_ROUNDS} wakes answered by someone else: {wrong[:3]}")
        # A squat found is never a failure; a race lost unseen (see wake_rounds) is counted as a
        # failed start (the victim's max_restarts is high here so that counting them is safe).
        # The last round may be such a race, leaving the victim unhealthy until its scheduled
        # restart: with the racer gone, the next request must reach it, and it must not be failed.
        check(events > 0, "the racer never got the victim's port: the attack was not exercised")
        status, body = self.request("v.victim.localhost", "/")
        victim = self.status("victim:v")
        check((status, body.strip()) == (200, "hello from victim:v"),
              f"with the racer gone the victim does not answer: {status} {body.strip()[:80]!r}")
        check(victim["state"] == "running", f"victim is {victim['state']} ({victim.get('reason')})")
        return (f"{SQUAT_ROUNDS} wakes raced: 0 captured, {SQUAT_ROUNDS - unavailable} answered by "
                f"the victim, {unavailable} 503 (races lost unseen); {events} squats found and "
                f"moved away from without a failure counted")


    def f2_no_direct_connections(self):
        """F2: a tenant connects straight to another tenant's port, skipping the proxy."""
        self.ok("spawn", "victim:v")
        self.ok("spawn", "hostile:h")
        victim_port = int(self.status("victim:v")["address"].rsplit(":", 1)[1])
        own_port = int(self.status("hostile:h")["address"].rsplit(":", 1)[1])
        probe = ("python3 -c \"import socket,sys\n"
                 "try:\n"
                 " s=socket.create_connection(('{host}', {port}), timeout=3)\n"
                 " s.sendall(b'GET / HTTP/1.1\\r\\nHost: v\\r\\nX-Forwarded-For: 1.2.3.4\\r\\n\\r\\n')\n"
                 " print('CONNECTED', s.recv(100))\n"
                 "except OSError as e: print('REFUSED', e)\"")
        seen = {}
        for host in ("127.0.0.1", "127.0.0.2", "::1"):
            out = self.shell("hostile:h", probe.format(host=host, port=victim_port))
            seen[host] = (out["out"] + out["err"]).strip()
            check("CONNECTED" not in seen[host], f"hostile:h reached victim:v at {host}:{victim_port}: {seen[host]}")
        own = self.shell("hostile:h", probe.format(host="127.0.0.1", port=own_port))
        check("CONNECTED" in own["out"], f"an app cannot reach its own port: {own}")
        status, body = self.request("v.victim.localhost", "/")
        check((status, body.strip()) == (200, "hello from victim:v"), f"the proxy cannot reach the victim: {status} {body}")
        return (f"hostile:h -> victim:v port {victim_port}: {seen['127.0.0.1']}; "
                "its own port and the proxy still connect")


    def f4_overlapping_dirs_refused(self):
        """F4: a state_dir inside the data root would hand tenement's pid files to a tenant."""
        bad = os.path.join(self.dir, "overlap.toml")
        with open(bad, "w") as f:
            f.write(f'[settings]\ndata_dir = "{self.dir}/d"\nstate_dir = "{self.dir}/d/state"\n'
                    f'runtime_dir = "{self.dir}/r"\n')
        out = subprocess.run([os.path.join(self.bin, "tenctl"), "validate", bad],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode != 0 and "overlap" in out.stderr, f"validate: {out.returncode} {out.stderr}")
        sup = subprocess.run([os.path.join(self.bin, "tenement-supervisor"), "--config", bad],
                             capture_output=True, text=True, timeout=60)
        check(sup.returncode != 0 and "overlap" in sup.stderr, f"supervisor: {sup.returncode} {sup.stderr}")
        return "tenctl validate and the supervisor refuse it: " + out.stderr.strip().splitlines()[0][:160]


    def f10_f11_hostile_output(self):
        """F10, F11: output that is not UTF-8, and output that lies to the operator's terminal."""
        self.ok("spawn", "hostile:h")
        for line in (b"bad \xff\xfe byte\n", b"after the bad byte\n",
                     "<0>EMERG ok \u202egnp.exe zero\u200bwidth\n".encode()):
            status, body = self.request("h.hostile.localhost", "/say", "POST", line)
            check((status, body.strip()) == (200, "said"), f"the app could not write: {status} {body}")
        wait_for(lambda: "after the bad byte" in self.ok("logs", "hostile:h", "-n", "50"), EVENT_DEADLINE,
                 "the line after the bad byte in tenctl logs")
        logs = self.ok("logs", "hostile:h", "-n", "50")
        check("bad \ufffd\ufffd byte" in logs, f"the bad bytes are not shown lossily: {logs!r}")
        check("\u202e" not in logs and "\u200b" not in logs, f"bidi/zero-width characters reached the terminal: {logs!r}")
        check("\\u{202e}gnp.exe" in logs and "\\u{200b}width" in logs, f"not escaped visibly: {logs!r}")
        # The app still writes and is still captured (no EPIPE after the bad byte).
        status, body = self.request("h.hostile.localhost", "/say", "POST", b"still-captured\n")
        check(status == 200, f"the app could not write after the bad byte: {status} {body}")
        wait_for(lambda: "still-captured" in self.ok("logs", "hostile:h", "-n", "50"), EVENT_DEADLINE,
                 "a later line")
        return "capture goes on after invalid UTF-8 (shown as U+FFFD); U+202E and U+200B shown as escapes"


    def f12_host_sockets_hidden(self):
        """F12: host Unix sockets under /run (journald's, D-Bus's) reached from a tenant."""
        probe = "/run/tenement-security-probe.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(probe)
        except FileNotFoundError:
            pass
        server.bind(probe)
        os.chmod(probe, 0o777)
        server.listen(1)
        try:
            self.ok("spawn", "hostile:h")
            out = self.shell("hostile:h",
                             f"ls -A /run; python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); "
                             f"s.connect('{probe}'); print('CONNECTED')\"")
        finally:
            server.close()
            os.unlink(probe)
        check("CONNECTED" not in out["out"], f"a tenant reached a host socket in /run: {out}")
        check("tenement-security-probe" not in out["out"], f"/run is visible: {out['out']!r}")
        journal = self.shell("hostile:h", "ls /run/systemd/journal/socket /dev/log 2>&1; echo done")
        check("No such file" in journal["out"] or journal["out"].strip() == "done",
              f"journald's socket is visible: {journal}")
        return f"/run inside a tenant holds only {out['out'].split()[:3]}; a host socket there is out of reach"

    def f15_config_and_secrets_hidden(self):
        """F15: the config file (every service's env) and secrets read from inside a tenant."""
        self.ok("spawn", "hostile:h")
        out = self.shell("hostile:h", f"cat {self.config} 2>/dev/null | wc -c; cat {self.dir}/hostile.env 2>&1; "
                                      "echo \"secret=$SECRET_TOKEN visible=$VISIBLE\"")
        lines = out["out"].splitlines()
        check(lines and lines[0].strip() == "0", f"the config file is readable in the tenant: {out}")
        check("s3cr3t-value" not in "\n".join(lines[1:-1]) and "SECRET_TOKEN=" not in out["out"],
              f"the env_file is readable in the tenant: {out}")
        check(lines[-1] == "secret=s3cr3t-value visible=in the config",
              f"the app did not get its env_file: {lines[-1]!r}")
        # A secrets file others can read is refused, with the fix.
        env_file = os.path.join(self.dir, "hostile.env")
        os.chmod(env_file, 0o644)
        try:
            self.ok("stop", "hostile:h")
            out = self.tenctl("wake", "hostile:h")
            check(out.returncode != 0 and "chmod 600" in out.stderr, f"a world-readable env_file was used: {out.stderr}")
        finally:
            os.chmod(env_file, 0o600)
        return "the config file reads as empty, the env_file is covered, the app has SECRET_TOKEN; mode 0644 refused"

    def f16_no_user_namespaces(self):
        """F16: a `namespace` tenant makes itself root of a user namespace of its own."""
        self.ok("spawn", "hostile:h")
        out = self.shell("hostile:h", "unshare -Ur id 2>&1; python3 -c \"import ctypes, os\n"
                                      "libc = ctypes.CDLL(None, use_errno=True)\n"
                                      "if libc.unshare(0x10000000) == 0: print('UNSHARED')\n"
                                      "else: print('REFUSED', os.strerror(ctypes.get_errno()))\"")
        check("uid=0" not in out["out"] and "UNSHARED" not in out["out"], f"a user namespace was created: {out}")
        check("REFUSED" in out["out"], f"{out}")
        return out["out"].strip().splitlines()[-1]


    def f17_removal_leaves_nothing_owned(self):
        """F17: `rm --purge` left the runtime directory, owned by a uid the next tenant gets."""
        self.ok("add", "hostile:gone")
        self.ok("wake", "hostile:gone")
        uid = self.status("hostile:gone")["uid"]
        run_dir = os.path.join(self.dir, "run", "instances", "hostile.gone")
        data_dir = os.path.join(self.dir, "data", "hostile", "gone")
        check(os.path.isdir(run_dir) and os.stat(run_dir).st_uid == uid, f"{run_dir} is not the tenant's")
        self.ok("rm", "--purge", "hostile:gone")
        check(not os.path.exists(run_dir), f"rm --purge left {run_dir}")
        check(not os.path.exists(data_dir), f"rm --purge left {data_dir}")
        owned = [os.path.join(root, n) for top in ("data", "run")
                 for root, dirs, files in os.walk(os.path.join(self.dir, top))
                 for n in dirs + files if os.lstat(os.path.join(root, n)).st_uid == uid]
        check(not owned, f"files of the removed tenant's uid {uid} remain: {owned[:5]}")
        # Without --purge the data stays, and so its uid stays reserved.
        self.ok("add", "hostile:kept")
        self.ok("wake", "hostile:kept")
        kept_uid = self.status("hostile:kept")["uid"]
        self.ok("rm", "hostile:kept")
        check(not os.path.exists(os.path.join(self.dir, "run", "instances", "hostile.kept")),
              "rm left the runtime directory")
        self.ok("add", "hostile:next")
        self.ok("wake", "hostile:next")
        next_uid = self.status("hostile:next")["uid"]
        check(next_uid != kept_uid, f"uid {kept_uid} still owns hostile:kept's data and was given to hostile:next")
        return f"rm --purge leaves nothing of uid {uid}; uid {kept_uid} stays reserved for kept data"


    def f9_unix_socket_symlink(self):
        """F9: a `listen = "unix"` tenant puts a symlink to another tenant's socket at its own."""
        self.ok("spawn", "uvictim:v")
        status, body = self.request("v.uvictim.localhost", "/")
        check((status, body.strip()) == (200, "hello from uvictim:v"), f"the unix victim: {status} {body}")
        self.ok("add", "usurper:u")
        woke = self.tenctl("wake", "usurper:u")
        u_status, u_body = self.request("u.usurper.localhost", "/")
        usurper = self.status("usurper:u")
        check("uvictim" not in u_body, f"the usurper's host served the victim: {u_status} {u_body}")
        check(woke.returncode != 0 and usurper["state"] == "failed"
              and "security" in (usurper.get("reason") or ""),
              f"the usurper is {usurper['state']} ({usurper.get('reason')}), wake said {woke.stderr.strip()}")
        served = self.status("uvictim:v")["address"]
        check("/sockets/" in served, f"the proxy is given the app's own path: {served}")
        status, body = self.request("v.uvictim.localhost", "/")
        check((status, body.strip()) == (200, "hello from uvictim:v"), f"the unix victim after: {status} {body}")
        return (f"a request for the usurper got {u_status} {u_body.strip()[:30]!r}; it is failed: "
                f"{usurper['reason'][:90]}")


    def get_from(self, source, host, path="/"):
        """GET through the proxy from 127.0.0.x `source`: (status, body)."""
        c = socket.create_connection(("127.0.0.1", self.port), timeout=EVENT_DEADLINE,
                                     source_address=(source, 0))
        try:
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            c.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head else 0
        return status, body.decode(errors="replace")

    def f5_auto_spawn_bounds(self):
        """F5: strangers creating instances of an auto_spawn service at will."""
        # The cap: five per service, then "no such tenant".
        statuses = [self.get_from("127.0.0.7", f"x{n}.open.localhost")[0] for n in range(1, 8)]
        check(statuses == [200] * 5 + [404] * 2, f"auto_spawn_max = 5: {statuses}")
        # The rate per client: a burst of ten, then 429; another client still gets in.
        burst = [self.get_from("127.0.0.8", f"y{n}.open2.localhost")[0] for n in range(1, 13)]
        check(burst[:10] == [200] * 10 and burst[10:] == [429, 429], f"one client's new tenants: {burst}")
        other = self.get_from("127.0.0.9", "z1.open2.localhost")[0]
        check(other == 200, f"another client: {other}")
        # One that never answered with success goes (auto_spawn_expire = 3s); one that did
        # stays. The service is at its cap: make room for the newcomer first.
        self.ok("rm", "--purge", "open:x5")
        status, _ = self.get_from("127.0.0.10", "w1.open.localhost", "/crash")
        check(status != 200 and self.tenctl("status", "open:w1").returncode == 0,
              f"w1 was not auto-spawned: {status}")
        wait_for(lambda: self.tenctl("status", "open:w1").returncode != 0, EVENT_DEADLINE,
                 "the never-successful open:w1 to be removed")
        check(self.tenctl("status", "open:x1").returncode == 0, "open:x1 answered 200 and was removed anyway")
        return (f"cap: {statuses}; one client's burst: {burst}; an instance that never answered "
                "with success was removed after auto_spawn_expire, one that did stays")

    def f14_tenants_are_not_trusted_proxies(self):
        """F14: trusted_proxies = ["127.0.0.1"] trusted every co-tenant on loopback."""
        self.ok("spawn", "busy:b")
        self.ok("spawn", "hostile:h")
        forged = ("python3 -c \"import socket\n"
                  f"s=socket.create_connection(('127.0.0.1', {self.port}))\n"
                  "s.sendall(b'GET /headers HTTP/1.1\\r\\nHost: b.busy.localhost\\r\\n"
                  "X-Forwarded-For: 6.6.6.6\\r\\nX-Forwarded-Proto: https\\r\\nConnection: close\\r\\n\\r\\n')\n"
                  "data=b''\n"
                  "while True:\n"
                  "    c=s.recv(65536)\n"
                  "    if not c: break\n"
                  "    data+=c\n"
                  "print(data.split(b'\\r\\n\\r\\n',1)[1].decode())\"")
        out = self.shell("hostile:h", forged)
        seen = dict((k.lower(), v) for k, v in json.loads(out["out"]))
        check(seen.get("x-forwarded-for") == "127.0.0.1" and seen.get("x-forwarded-proto") == "http",
              f"a tenant on loopback was trusted: {seen}")
        # The same from a process that is not a tenant (this suite, as root): trusted.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=EVENT_DEADLINE)
        conn.request("GET", "/headers", headers={"Host": "b.busy.localhost", "X-Forwarded-For": "1.2.3.4"})
        trusted = dict((k.lower(), v) for k, v in json.loads(conn.getresponse().read()))
        conn.close()
        check(trusted.get("x-forwarded-for") == "1.2.3.4, 127.0.0.1", f"a trusted terminator: {trusted}")
        return ("from a tenant's socket on trusted loopback: X-Forwarded-For replaced "
                f"({seen['x-forwarded-for']}); from another user's: kept ({trusted['x-forwarded-for']})")

    def f6_limits_without_cgroups(self):
        """F6: without cgroups, pids_max did nothing and each private tmpfs could take half the RAM."""
        self.ok("spawn", "forky:f")
        forks = ("python3 -c \"import os, time\n"
                 "n = 0\n"
                 "for i in range(80):\n"
                 "    try:\n"
                 "        pid = os.fork()\n"
                 "    except OSError:\n"
                 "        break\n"
                 "    if pid == 0:\n"
                 "        os.close(1); os.close(2); time.sleep(3); os._exit(0)\n"
                 "    n += 1\n"
                 "print('started=%d' % n)\"; ")
        # The tmpfs first: once the forks have taken every process the limit allows, the shell
        # could not start dd.
        out = self.shell("forky:f",
                         "dd if=/dev/zero of=/tmp/fill bs=1M count=32 2>&1 | grep -o 'No space left'; rm -f /tmp/fill; "
                         "df -B1 --output=size /tmp /dev/shm /var/tmp | tail -3 | tr '\\n' ' '; " + forks)
        text = out["out"] + out["err"]
        started = int(re.search(r"started=(\d+)", text).group(1)) if "started=" in text else -1
        check(0 <= started < 24, f"pids_max = 24 without cgroups, but {started} of 80 children started: {text[-300:]}")
        check("No space left" in text, f"/tmp took 32 MB with tmp_size = 8MB: {text[-300:]}")
        sizes = [int(x) for x in re.findall(r"\b\d{4,}\b", text.split("started=")[0])[-3:]]
        check(all(s == 8 << 20 for s in sizes), f"private tmpfs sizes {sizes}, want 8 MiB each")
        log = self.log("supervisor")
        check("service forky: limits for memory cannot be enforced" in log
              and "pids_max is enforced as RLIMIT_NPROC" in log,
              "no warning naming the unenforceable limits: " + "".join(l for l in log.splitlines(True) if "forky" in l)[-400:])
        disk = self.status("forky:f").get("disk_bytes")
        check(isinstance(disk, int), f"tenctl status reports no disk usage: {disk!r}")
        return (f"{started} of 80 children started under pids_max = 24 (RLIMIT_NPROC); /tmp, "
                "/var/tmp, /dev/shm 8 MiB each; the supervisor says memory is not enforced here; "
                f"tenctl status: data directory {disk} bytes")

    def open_idle(self, source, count):
        """`count` connections to the proxy from 127.0.0.x `source`, sending nothing."""
        conns = []
        for _ in range(count):
            c = socket.socket()
            c.bind((source, 0))
            c.connect(("127.0.0.1", self.port))
            conns.append(c)
        return conns

    def closed_by_proxy(self, conns, within=2.0):
        """How many of `conns` the proxy closed (EOF or reset) within `within` seconds."""
        closed = 0
        for c in conns:
            c.settimeout(max(0.05, within / len(conns)))
            try:
                if c.recv(1) == b"":
                    closed += 1
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except socket.timeout:
                pass
        return closed

    def f7_connection_caps(self):
        """F7: one client holding every connection; HTTP/2 fanning out to one app."""
        held = []
        try:
            mine = self.open_idle("127.0.0.2", 60)
            held += mine
            closed = self.closed_by_proxy(mine)
            check(closed == 20, f"max_connections_per_client = 40, but {closed} of 60 were closed")
            held += self.open_idle("127.0.0.3", 40)
            held += self.open_idle("127.0.0.4", 40)  # 20 of these wait in the kernel: cap 100
            late = socket.socket()
            late.bind(("127.0.0.5", 0))
            late.connect(("127.0.0.1", self.port))
            late.sendall(b"GET /health HTTP/1.1\r\nHost: v.victim.localhost\r\nConnection: close\r\n\r\n")
            late.settimeout(2)
            try:
                early = late.recv(100)
            except socket.timeout:
                early = b""
            check(early == b"", f"answered past max_connections: {early!r}")
            for c in mine:
                c.close()
            late.settimeout(EVENT_DEADLINE)
            answer = late.recv(100)
            check(answer.startswith(b"HTTP/1.1 "), f"the waiting connection was not served once slots freed: {answer!r}")
        finally:
            for c in held:
                c.close()

        # max_upstream_connections = 4: twelve slow requests at once, never more than four
        # connections to the app, and all twelve answered.
        self.ok("spawn", "busy:b")
        port = int(self.status("busy:b")["address"].rsplit(":", 1)[1])
        import threading
        results = []
        def slow():
            try:
                results.append(self.request("b.busy.localhost", "/slow?ms=1500")[0])
            except Exception as e:  # noqa: BLE001
                results.append(repr(e))
        threads = [threading.Thread(target=slow) for _ in range(12)]
        for t in threads:
            t.start()
        most = 0
        while any(t.is_alive() for t in threads):
            out = subprocess.run(["ss", "-Htn", "state", "established", f"dport = :{port}"],
                                 capture_output=True, text=True).stdout
            most = max(most, len(out.splitlines()))
            time.sleep(0.05)
        for t in threads:
            t.join()
        check(results.count(200) == 12, f"answers: {results}")
        check(0 < most <= 4, f"{most} connections to the app at once, max_upstream_connections = 4")
        return (f"a client's 41st-60th connections closed; past 100 a connection waits and is "
                f"served once one closes; 12 requests met at most {most} connections to the app")


    def long_ids_start_in_a_namespace(self):
        """A valid 63-character id could not start in a namespace (hostname over 64 bytes)."""
        long_id = "a" * 63
        self.ok("add", f"victim:{long_id}")
        self.ok("wake", f"victim:{long_id}")
        status, body = self.request(f"{long_id}.victim.localhost", "/")
        check((status, body.strip()) == (200, f"hello from victim:{long_id}"), f"{status} {body}")
        self.ok("rm", "--purge", f"victim:{long_id}")
        return "a 63-character id starts in its namespace and answers"


CHECKS = [
    ("F1 a squatting tenant is caught and banned", Suite.f1_tenant_squatter_is_banned),
    ("F1 a local racer captures nothing", Suite.f1_local_racer_gets_nothing),
    ("F2 no direct connection between tenants", Suite.f2_no_direct_connections),
    ("F4 overlapping directories are refused", Suite.f4_overlapping_dirs_refused),
    ("F5 auto_spawn is bounded", Suite.f5_auto_spawn_bounds),
    ("F6 limits without cgroups", Suite.f6_limits_without_cgroups),
    ("F7 connection caps", Suite.f7_connection_caps),
    ("F9 a socket symlink leads nowhere", Suite.f9_unix_socket_symlink),
    ("F14 tenants are not trusted proxies", Suite.f14_tenants_are_not_trusted_proxies),
    ("F10 F11 hostile output", Suite.f10_f11_hostile_output),
    ("F12 host sockets are out of reach", Suite.f12_host_sockets_hidden),
    ("F15 config and secrets are hidden", Suite.f15_config_and_secrets_hidden),
    ("F16 no user namespaces", Suite.f16_no_user_namespaces),
    ("F17 removal leaves nothing owned", Suite.f17_removal_leaves_nothing_owned),
    ("a 63-character id starts", Suite.long_ids_start_in_a_namespace),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory")
    parser.add_argument("--only", help="run only the checks whose name contains this")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("FAIL security suite: needs root (CI runs it as root): sudo python3 tests/security/run.py")
        print("0 passed, 1 failed")
        return 1
    suite = Suite(os.path.abspath(args.bin), args.keep)
    suite.write_config()
    try:
        suite.start()
        for name, fn in CHECKS:
            if args.only and args.only not in name:
                continue
            suite.run(name, lambda fn=fn: fn(suite))
    finally:
        suite.stop()
        if suite.failed or args.keep:
            for name in ("supervisor", "proxy"):
                print(f"--- last lines of {name}.log")
                print("\n".join(suite.log(name).splitlines()[-40:]))
            print(f"kept {suite.dir}")
        else:
            shutil.rmtree(suite.dir, ignore_errors=True)
    print(f"{suite.passed} passed, {suite.failed} failed")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
