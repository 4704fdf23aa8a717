"""Helpers for the load benchmarks (proxy_throughput, cold_requests, idle_load): installing the
external tools, a Sandbox with the proxy running, wrk, a throwaway nginx, per-process CPU time
and a many-requests-at-once HTTP client. Standard library only; everything binds and targets
127.0.0.1."""

import atexit
import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import tenement_bench
from tenement_bench import DEFAULT_PORT_RANGE, ROOT, Sandbox, free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Debian package that provides each tool we may need.
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "perf": "linux-perf", "h2load": "nghttp2-client",
            "go": "golang-go", "curl": "curl", "etcd": "etcd-server", "etcdctl": "etcd-client",
            "protoc": "protobuf-compiler"}


def ensure_tools(*tools):
    """Installs missing tools with apt-get, once, idempotently (`command -v X || apt-get ...`)."""
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}; install with: "
                         f"apt-get install -y {' '.join(PACKAGES[t] for t in missing)}")
    pkgs = [PACKAGES[t] for t in missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # The nginx package's postinst would start a system nginx on :80; forbid service starts
    # while installing (policy-rc.d exit 101), and restore whatever was there before.
    policy = "/usr/sbin/policy-rc.d"
    had_policy = os.path.exists(policy)
    try:
        if not had_policy:
            with open(policy, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
        r = subprocess.run(["apt-get", "install", "-y", "-q", *pkgs], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", *pkgs], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    finally:
        if not had_policy and os.path.exists(policy):
            os.remove(policy)
    still = [t for t in missing if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if still:
        raise SystemExit(f"could not install {', '.join(still)}")


BINARIES = ["tenement-supervisor", "tenement-exec", "tenement-proxy", "tenctl", "tiny-http"]
BIN = tenement_bench.RELEASE


def snapshot_binaries():
    """Copies the freshly built binaries to a private directory and points the harness at it.

    target/release is shared with whoever else builds in this tree; a rebuild during a run
    replaced tenement-supervisor under a running supervisor once (its exec helper then failed
    with "unexpected argument '__exec-helper'" and every wake answered 503). The copy makes a
    run measure one build from start to end. Services use @BIN@ for this directory."""
    global BIN
    snap = tempfile.mkdtemp(prefix="tenement-bench-bin-")
    os.chmod(snap, 0o755)
    for name in BINARIES:
        src = os.path.join(tenement_bench.RELEASE, name)
        if os.path.exists(src):
            shutil.copy2(src, snap)
    atexit.register(shutil.rmtree, snap, True)
    tenement_bench.RELEASE = snap
    BIN = snap
    return snap


def build():
    """Builds what these benchmarks run (tenctl too: api.py and rollout.py call it)."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tenement-supervisor",
                    "-p", "tenement-proxy", "-p", "tenctl", "-p", "tenement-fixtures"], cwd=ROOT,
                   check=True)


def revision():
    """The git revision benchmarked, with -dirty when the tree had local changes."""
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "?"


def listen_overflows():
    """TcpExt ListenOverflows + ListenDrops (this network namespace): SYNs dropped because an
    accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return d.get("ListenOverflows", 0), d.get("ListenDrops", 0)
    return 0, 0


def nginx_binary():
    return shutil.which("nginx") or "/usr/sbin/nginx"


# One warm instance of the fast native backend, the yardstick of the warm-path benchmarks.
WARM_HOST = "a.tiny.localhost"
WARM_SERVICES = """
[service.tiny]
command = "@BIN@/tiny-http"
idle_timeout = 0
"""


@contextlib.contextmanager
def warm_tiny(settings_extra=(), h2c=False):
    """tiny-http started directly, nginx in front of it (`Nginx(..., h2c=h2c)`), and a sandbox
    whose proxy serves the instance tiny:a, woken and routed: yields (tiny_port, nginx, sb),
    and stops all three whatever happens."""
    tiny, tiny_port = start_tiny_http()
    nginx = sb = None
    try:
        nginx = Nginx(tiny_port, h2c=h2c)
        sb = proxied_sandbox(WARM_SERVICES, settings_extra=settings_extra)
        add_and_wake(sb)
        wait_proxy_synced(sb, WARM_HOST)
        yield tiny_port, nginx, sb
    finally:
        if sb:
            sb.close()
        if nginx:
            nginx.stop()
        tiny.terminate()
        tiny.wait()


def proxied_sandbox(services_toml, port_range=DEFAULT_PORT_RANGE, settings_extra=()):
    """A Sandbox with supervisor and proxy running, the proxy listening on a free port.

    Workaround: Sandbox's temp dir is mkdtemp's 0700. As root the proxy drops to `nobody` and
    then cannot reach `run/proxy.sock` inside it (EACCES), so every proxied request waits for
    the whole wake deadline (~32 s) and gets a 503. Opening the directory for traversal (0711)
    fixes that without touching the shared harness."""
    port = free_port()
    sb = Sandbox(services_toml.replace("@BIN@", BIN), port_range=port_range, listen=f"127.0.0.1:{port}",
                 settings_extra=settings_extra)
    os.chmod(sb.dir, 0o711)
    sb.proxy_port = port
    try:
        sb.start_supervisor()
        sb.start_proxy()
    except BaseException:
        sb.close()
        raise
    return sb


def add_and_wake(sb, instance="tiny:a"):
    """Registers `instance` and wakes it over the sandbox's admin socket; returns the client."""
    rpc = sb.admin()
    rpc.call({"type": "add", "instances": [instance]})
    reply = rpc.call({"type": "wake", "instance": instance})
    assert reply["type"] == "woken", reply
    return rpc


def wait_proxy_synced(sb, host, timeout=10.0):
    """Waits until a request for `host` through the proxy answers 200 (table synced, woken)."""
    wait_proxy_synced_at(sb.proxy_port, host, timeout, sb.dir)


def wait_proxy_synced_at(port, host, timeout=10.0, logs="the sandbox"):
    """Waits until a request for `host` through the proxy on `port` answers 200."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status, _ = get(port, host, "/", timeout=5)
            if status == 200:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"proxy never answered 200 for {host}: {last}; see {logs}/proxy.log")


def get(port, host, path="/", timeout=5.0):
    """One GET on a fresh connection; returns (status, body)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def cpu_ticks(pid):
    """utime + stime of a whole process (all its threads, live and exited), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" the fields start at number 3 (state); utime is 14, stime 15.
    return int(fields[11]) + int(fields[12])


def memory(pids):
    """VmRSS and RssAnon (KiB) and open fds, summed over `pids` (a process that is gone counts 0)."""
    rss = anon = fds = 0
    for pid in pids:
        st = tenement_bench.proc_stats(pid)
        if st:
            rss += st["rss_kib"]
            anon += st["anon_kib"]
            fds += st["fds"]
    return rss, anon, fds


def proc_comm(pid):
    """A process's name (/proc/PID/comm), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def tenement_cpu_ticks(sb):
    """utime + stime so far, in clock ticks, of a sandbox's supervisor, its exec server and
    (when it runs one) its proxy."""
    sup = sb.supervisor.pid
    pids = [sup] + [c for c in children(sup) if proc_comm(c) == "tenement-execd"]
    if getattr(sb, "proxy", None):
        pids.append(sb.proxy.pid)
    total = 0
    for pid in pids:
        try:
            total += cpu_ticks(pid)
        except OSError:
            pass
    return total


def children(pid):
    """Direct children of `pid`."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            out.append(int(entry))
                except OSError:
                    pass
    return out


_UNIT = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(port, connections, duration, host=None, path="/", threads=1, timeout=None, scheme="http",
        address="127.0.0.1"):
    """Runs wrk once; returns rps, p50_us, p99_us, requests, errors (socket errors + non-2xx).
    scheme="https": over TLS (wrk's SNI is then the address)."""
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if host:
        args += ["-H", f"Host: {host}"]
    if timeout:
        args += ["--timeout", f"{timeout}s"]
    args.append(f"{scheme}://{address}:{port}{path}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    out = r.stdout
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip()}\n{out}")
    res = {"raw": out}
    res["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    res["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M))
    res["p50_us"] = _us(lat["50"]) if "50" in lat else float("nan")
    res["p99_us"] = _us(lat["99"]) if "99" in lat else float("nan")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    res["errors"] = errors
    return res


def h2load(port, connections, duration, host, path="/"):
    """Runs h2load once over cleartext HTTP/2 (prior knowledge), one stream at a time per
    connection (like an HTTP/1.1 keep-alive client); returns rps, mean_us, requests, errors."""
    args = ["h2load", "-c", str(connections), "-m", "1", "-D", str(duration),
            f"--connect-to=127.0.0.1:{port}", f"http://{host}{path}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    out = r.stdout
    if r.returncode != 0:
        raise RuntimeError(f"h2load failed ({r.returncode}): {r.stderr.strip()}\n{out}")
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    res = {"raw": out, "requests": int(done.group(3)), "rps": float(rate.group(1))}
    res["mean_us"] = _us(mean.group(1)) if mean else float("nan")
    res["errors"] = (int(done.group(5)) + int(done.group(6))
                     + sum(int(x) for x in statuses.groups()[2:]))
    return res


class Nginx:
    """nginx in the foreground with a generated config in its own temp dir: 2 workers, an
    upstream with keepalive 64, HTTP/1.1 to the upstream, Connection "" (so upstream
    connections are reused). Never daemonizes; stop() ends it."""

    def __init__(self, upstream_port, workers=2, keepalive=64, tls=None, access_log=None,
                 worker_connections=4096, http_extra="", h2c=False):
        """tls: (cert, key) to terminate TLS (HTTP/2 too) with; access_log: a file to log
        `$ssl_session_reused` to; http_extra: more lines for the http block; h2c: also serve
        cleartext HTTP/2 (prior knowledge) on a second port, `self.h2c_port`."""
        self.dir = tempfile.mkdtemp(prefix="tenement-bench-nginx-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        d = self.dir
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        rlimit = f"worker_rlimit_nofile {worker_connections + 4000};" if worker_connections > 4096 else ""
        log = (f"log_format reuse '$ssl_session_reused'; access_log {access_log} reuse;"
               if access_log else "access_log off;")
        if tls:
            cert, key = tls
            listen = f"""listen 127.0.0.1:{self.port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;"""
        else:
            listen = f"listen 127.0.0.1:{self.port};"
        self.h2c_port = None
        if h2c:
            # nginx serves only HTTP/2 on a cleartext port marked http2: a port of its own.
            # Without keepalive_requests it ends an HTTP/2 connection after 1,000 requests,
            # and h2load does not reconnect (a run would count 1,000 requests per client).
            self.h2c_port = free_port()
            listen += f"\n        listen 127.0.0.1:{self.h2c_port} http2;"
            http_extra += "\n    keepalive_requests 1000000;"
        conf = f"""
{user}
worker_processes {workers};
{rlimit}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    {log}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    {http_extra}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive {keepalive};
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The same forwarding headers tenement-proxy sets, for a like-for-like request.
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\\"$http_host\\"";
        }}
    }}
}}
"""
        self.conf = os.path.join(d, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.log = open(os.path.join(d, "stderr.log"), "w")
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", d, "-e", os.path.join(d, "error.log"), "-c", self.conf,
             "-g", "daemon off;"], stdout=self.log, stderr=self.log)
        deadline = time.time() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {open(os.path.join(d, 'error.log')).read()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if len(self.workers()) >= workers:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("nginx did not start")
            time.sleep(0.02)

    def workers(self):
        return children(self.proc.pid)

    def cpu_ticks(self):
        total = 0
        for pid in self.workers():
            try:
                total += cpu_ticks(pid)
            except OSError:
                pass
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_tiny_http(port=None):
    port = port or free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOST": "127.0.0.1"}
    p = subprocess.Popen([os.path.join(BIN, "tiny-http")], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                p.kill()
                raise RuntimeError("tiny-http did not start")
            time.sleep(0.005)


def fire(port, n, host, path="/", timeout=30.0, started=None):
    """Opens `n` connections to 127.0.0.1:port at once (non-blocking connects), sends one GET on
    each as soon as it is connected, and waits for every response (Content-Length bodies).

    Returns a list of (seconds from `started` to the end of the response, status or None,
    error text or None), one per request. `started` defaults to the moment of the call."""
    t0 = time.perf_counter() if started is None else started
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tenement-bench\r\n"
               f"Connection: close\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    state = {}
    results = [None] * n
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, 115):  # EINPROGRESS
            results[i] = (time.perf_counter() - t0, None, f"connect: {os.strerror(err)}")
            s.close()
            continue
        state[s] = {"i": i, "sent": False, "buf": b""}
        sel.register(s, selectors.EVENT_WRITE)
    deadline = time.perf_counter() + timeout
    while state:
        left = deadline - time.perf_counter()
        if left <= 0:
            for s, st in state.items():
                results[st["i"]] = (time.perf_counter() - t0, None, "timeout")
                s.close()
            break
        for key, ev in sel.select(left):
            s = key.fileobj
            st = state[s]
            now = time.perf_counter()
            if not st["sent"]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    results[st["i"]] = (now - t0, None, f"connect: {os.strerror(err)}")
                    sel.unregister(s); s.close(); del state[s]
                    continue
                s.sendall(request)  # small: fits the socket buffer
                st["sent"] = True
                sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                chunk = s.recv(65536)
            except OSError as e:
                chunk = None
                results[st["i"]] = (now - t0, None, f"recv: {e}")
            if chunk:
                st["buf"] += chunk
                done = _complete(st["buf"])
                if done is None:
                    continue
                results[st["i"]] = (now - t0, done, None)
            elif chunk == b"":
                status = _complete(st["buf"], eof=True)
                results[st["i"]] = (now - t0, status,
                                    None if status else f"closed after {len(st['buf'])} bytes")
            sel.unregister(s); s.close(); del state[s]
    sel.close()
    return results


def _complete(buf, eof=False):
    """The status code if `buf` holds a whole response, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].decode("latin-1")
    status = int(head.split(" ", 2)[1])
    m = re.search(r"(?im)^content-length:\s*(\d+)\s*$", head)
    if m:
        return status if len(buf) - head_end - 4 >= int(m.group(1)) else None
    return status if eof else None


def keep_logs(sb):
    """Copies the sandbox's logs (proxy, supervisor) somewhere that survives sb.close()."""
    kept = tempfile.mkdtemp(prefix="tenement-bench-logs-")
    for name in os.listdir(sb.dir):
        if name.endswith(".log") or name.endswith(".toml"):
            shutil.copy(os.path.join(sb.dir, name), kept)
    return kept
