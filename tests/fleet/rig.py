"""The fleet rig: tenement hosts as network namespaces on one machine, each with an etcd
member, a supervisor, a fleet agent and a proxy from the real binaries. Used by
tests/fleet/run.py and bench/fleet.py.

Each host is a network namespace (PREFIX-h1..3, 10.77.0.1-3) cabled to a bridge in another
namespace (PREFIX-sw) with a veth pair; everything a host runs listens on its own address:
etcd on 2379/2380, the proxy on 80 for clients and on 7443 for the other hosts' proxies, with
the fleet credential `tenement-fleet credentials` makes.
"""

import http.client
import json
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIRROR = os.path.join(ROOT, "tests", "fixtures", "py", "mirror.py")
HOSTS = ["h1", "h2", "h3"]
NET = "10.77.0"
# Short enough for a quick suite, long enough that killing etcd's leader (an election of a
# second or two) never fences a host: renewals every 2 s, a fence 4.5 s after the last one.
LEASE_TTL = 6
GRACE = 2
# How long anything that must happen may take: generous, it only bounds a hang.
EVENT_DEADLINE = 60


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


def sh(*argv, check_status=True, **kw):
    result = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check_status and result.returncode != 0:
        raise Failed(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def wait_for(condition, within, what):
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise Failed(f"waited {within} s for {what}")
        time.sleep(0.05)


def when(get, condition):
    """get()'s value if it meets condition, else None: for wait_for."""
    value = get()
    return value if condition(value) else None


PREFIX = "tfl"


def ns(host):
    return f"{PREFIX}-{host}"


def switch():
    return f"{PREFIX}-sw"


def addr(host):
    return f"{NET}.{HOSTS.index(host) + 1}"


class Fleet:
    def __init__(self, bin_dir, keep=False, lease_ttl=LEASE_TTL, grace=GRACE):
        self.bin = bin_dir
        self.keep = keep
        self.lease_ttl = lease_ttl
        self.grace = grace
        self.dir = tempfile.mkdtemp(prefix="tenement-fleet.")
        # The proxies run as nobody: they must reach their configs and sockets.
        os.chmod(self.dir, 0o711)
        self.credentials = os.path.join(self.dir, "fleet-ca")
        self.procs = {}
        self.passed = 0
        self.failed = 0

    # ---- the rig -------------------------------------------------------------------------
    def cable(self, observer=False):
        """The namespaces and their cables; with `observer`, one more cable from this (the root)
        namespace at NET.254, so the caller can reach every host's addresses itself."""
        self.uncable()
        sh("ip", "netns", "add", switch())
        sh("ip", "-n", switch(), "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch(), "link", "set", "br0", "up")
        if observer:
            sh("ip", "link", "add", f"{PREFIX}-obs", "type", "veth", "peer", "name", "obs", "netns", switch())
            sh("ip", "-n", switch(), "link", "set", "obs", "master", "br0", "up")
            sh("ip", "addr", "add", f"{NET}.254/24", "dev", f"{PREFIX}-obs")
            sh("ip", "link", "set", f"{PREFIX}-obs", "up")
        for i, host in enumerate(HOSTS, 1):
            sh("ip", "netns", "add", ns(host))
            sh("ip", "link", "add", "eth0", "netns", ns(host), "type", "veth", "peer", "name", f"p{i}", "netns", switch())
            sh("ip", "-n", switch(), "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns(host), "addr", "add", f"{addr(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns(host), "link", "set", "eth0", "up")
            sh("ip", "-n", ns(host), "link", "set", "lo", "up")

    def uncable(self):
        for name in [switch()] + [ns(h) for h in HOSTS]:
            if os.path.exists(f"/run/netns/{name}"):
                self.kill_namespace(name)
                sh("ip", "netns", "del", name, check_status=False)

    def kill_namespace(self, name):
        pids = sh("ip", "netns", "pids", name, check_status=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for key, proc in list(self.procs.items()):
            if key[0] == name.removeprefix(f"{PREFIX}-"):
                proc.wait()
                del self.procs[key]

    def cable_of(self, host):
        return f"p{HOSTS.index(host) + 1}"

    def start_etcd(self, host, state="new"):
        cluster = ",".join(f"{h}=http://{addr(h)}:2380" for h in HOSTS)
        data = os.path.join(self.dir, host, "etcd")
        argv = [
            "etcd", "--name", host, "--data-dir", data,
            "--listen-client-urls", f"http://{addr(host)}:2379",
            "--advertise-client-urls", f"http://{addr(host)}:2379",
            "--listen-peer-urls", f"http://{addr(host)}:2380",
            "--initial-advertise-peer-urls", f"http://{addr(host)}:2380",
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", "tenement-fleet-test",
            # A member cut off and back must not depose a healthy leader with the terms it
            # ran up alone (docs/FLEET.md recommends it; etcd 3.5 has it on by default).
            "--pre-vote",
        ]
        self.spawn(host, "etcd", argv)

    def make_credentials(self):
        """The fleet's CA and a certificate per host, keys readable by the proxies' user."""
        nobody = pwd.getpwnam("nobody").pw_uid
        for host in HOSTS:
            sh(os.path.join(self.bin, "tenement-fleet"), "credentials", self.credentials, "--host", host,
               "--ip", addr(host))
            os.chown(os.path.join(self.credentials, f"{host}.key"), nobody, -1)
        os.chmod(self.credentials, 0o755)

    def start_proxy(self, host):
        self.spawn(host, "proxy", [os.path.join(self.bin, "tenement-proxy"), "--config", self.config(host),
                                   "--user", "nobody"])
        wait_for(lambda: connects(addr(host), 80) and connects(addr(host), 7443), EVENT_DEADLINE,
                 f"{host}'s proxy to listen")

    def get(self, via, tenant, path="/", method="GET", body=None, headers=None, timeout=EVENT_DEADLINE):
        """A request for `tenant` (service:id) to `via`'s proxy: (status, headers, body)."""
        service, ident = tenant.split(":")
        conn = http.client.HTTPConnection(addr(via), 80, timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Host": f"{ident}.{service}.example.com", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def start_supervisor(self, host):
        self.spawn(host, "supervisor", [os.path.join(self.bin, "tenement-supervisor"), "--config", self.config(host)])
        wait_for(lambda: self.tenctl(host, "ps").returncode == 0, EVENT_DEADLINE, f"{host}'s supervisor to answer")

    def tenctl(self, host, *args):
        return sh("ip", "netns", "exec", ns(host), os.path.join(self.bin, "tenctl"), "--config", self.config(host),
                  *args, check_status=False)

    def fleet_cli(self, host, *args):
        return sh("ip", "netns", "exec", ns(host), os.path.join(self.bin, "tenement-fleet"), "--config",
                  self.config(host), *args, check_status=False)

    def instances(self, host):
        """{instance: state} of host's supervisor."""
        result = self.tenctl(host, "ps", "--json")
        if result.returncode != 0:
            return {}
        return {i["instance"]: i["state"] for i in json.loads(result.stdout)}

    def running(self, host):
        return {i for i, state in self.instances(host).items() if state == "running"}

    def wake(self, host, tenants):
        for tenant in tenants:
            result = self.tenctl(host, "wake", tenant)
            check(result.returncode == 0, f"tenctl wake {tenant} on {host}: {result.stderr.strip()}")

    def start_agent(self, host):
        # Waits on the status must see this agent's, not a killed one's.
        try:
            os.remove(os.path.join(self.dir, host, "state", "fleet.json"))
        except FileNotFoundError:
            pass
        self.spawn(host, "agent", [os.path.join(self.bin, "tenement-fleet"), "--config", self.config(host), "run"])

    def spawn(self, host, what, argv):
        os.makedirs(os.path.join(self.dir, host), exist_ok=True)
        log = open(os.path.join(self.dir, host, f"{what}.log"), "ab")
        self.procs[(host, what)] = subprocess.Popen(
            ["ip", "netns", "exec", ns(host)] + argv, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""), RUST_LOG="info"),
        )
        log.close()

    def stop(self, host, what):
        proc = self.procs.pop((host, what), None)
        if proc:
            proc.kill()
            proc.wait()

    def config(self, host):
        path = os.path.join(self.dir, host, "tenement.toml")
        if not os.path.exists(path):
            endpoints = ", ".join(f'"http://{addr(h)}:2379"' for h in HOSTS)
            with open(path, "w") as f:
                f.write(f"""[settings]
domain = "example.com"
state_dir = "state"
data_dir = "data"
runtime_dir = "run"
isolation = "process"
user = "self"

listen = "http://{addr(host)}:80"
proxy_user = "nobody"

[service.notes]
command = "{os.path.join(self.bin, 'tiny-http')}"
idle_timeout = "never"

[service.mirror]
command = "python3 {MIRROR}"
idle_timeout = "never"

[fleet]
host = "{host}"
address = "{addr(host)}:7443"
etcd = [{endpoints}]
lease_ttl = "{self.lease_ttl}s"
grace = "{self.grace}s"
ca = "{self.credentials}/ca.pem"
cert = "{self.credentials}/{host}.pem"
key = "{self.credentials}/{host}.key"
""")
        return path

    def etcdctl(self, *args, via="h1"):
        return sh("ip", "netns", "exec", ns(via), "etcdctl", "--dial-timeout=2s", "--command-timeout=5s",
                  "--endpoints", ",".join(f"http://{addr(h)}:2379" for h in HOSTS), *args,
                  env=dict(os.environ, ETCDCTL_API="3"))

    def read(self, prefix, via="h1"):
        """{key: value} under prefix; values are parsed JSON where they are JSON."""
        lines = self.etcdctl("get", "--prefix", prefix, via=via).stdout.splitlines()
        out = {}
        for key, value in zip(lines[0::2], lines[1::2]):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
        return out

    def placements(self, via="h1"):
        return {k.removeprefix("/tenement/placement/"): v for k, v in self.read("/tenement/placement/", via).items()}

    def status(self, host):
        try:
            with open(os.path.join(self.dir, host, "state", "fleet.json")) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def want(self, tenants, via="h1"):
        for tenant in tenants:
            self.etcdctl("put", f"/tenement/tenants/{tenant}", "{}", via=via)

    def healthy(self, hosts):
        for host in hosts:
            result = sh("ip", "netns", "exec", ns(host), "etcdctl", "--endpoints", f"http://{addr(host)}:2379",
                        "endpoint", "health", check_status=False, env=dict(os.environ, ETCDCTL_API="3"))
            if result.returncode != 0:
                return False
        return True

    def controllers(self, hosts=HOSTS):
        return [h for h in hosts if (self.status(h) or {}).get("controller")]

    def log(self, host, what):
        try:
            with open(os.path.join(self.dir, host, f"{what}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def run(self, name, fn):
        try:
            detail = fn()
            self.passed += 1
            print(f"PASS {name}: {detail}", flush=True)
        except Failed as e:
            self.failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # a bug in the suite is a failure too, never a skip
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)


def connects(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def placed_here(f, host):
    return set((f.status(host) or {}).get("placed_here", {}))


def running_once(f, hosts):
    """The tenants running on `hosts`; fails if one runs on two."""
    seen = {}
    for h in hosts:
        for t in f.running(h):
            check(t not in seen, f"{t} runs on {seen.get(t)} and {h}")
            seen[t] = h
    return set(seen)


def wake_where_placed(f, tenants, hosts):
    placements = f.placements(via=hosts[0])
    for t in tenants:
        host = placements[t]["host"]
        wait_for(lambda: t in f.instances(host), EVENT_DEADLINE, f"{host}'s supervisor to register {t}")
        f.wake(host, [t])
