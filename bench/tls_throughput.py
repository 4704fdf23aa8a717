#!/usr/bin/env python3
"""TLS: tenement-proxy against nginx, both terminating TLS with the same certificate and key
(ECDSA P-256, one leaf for *.tiny.localhost signed by a CA made here with the openssl CLI) in
front of the same tiny-http backend, side by side in one run with interleaved rounds (which
server goes first rotates with the round). Medians over rounds, ratios tenement/nginx.

  nginx     2 workers, ssl_protocols TLSv1.2 TLSv1.3, ssl_session_tickets on, http2 on, upstream
            keepalive 64 over HTTP/1.1 with Connection "" (as loadtools.Nginx), keepalive_requests
            1000000 (so neither server closes a keep-alive connection during a run) -> tiny-http
  tenement  tenement-proxy --listen https://127.0.0.1:PORT, [settings.tls] certificates = the
            same files -> the instance tiny:a (tiny-http under the supervisor, woken first)

1. New TLS connections: `openssl s_time -new` (C, OpenSSL; several processes, each one
   connection at a time): every connection is a full handshake (checked: s_time prints `*`
   for a full one, `r` for a resumed one) and one `GET /` with Connection: close. Neither wrk
   nor h2load can do this: both resume the TLS session of a client's previous connection when
   they reconnect (checked against nginx's $ssl_session_reused while writing this script).
   s_time sends no SNI: each server answers with its only (default) certificate.
   Reports connections/s, the server's CPU per connection (handshake + one proxied request)
   and the client's.
2. Keep-alive HTTP/1.1 over TLS: wrk -t1 at 1, 4 and 32 connections (rps, p50, p99, server
   CPU per request).
3. Resumption: sequential connections with Python's ssl reusing the last session (SNI, the
   CA verified), TLS 1.3 and TLS 1.2, counting resumed against full; and the rate of resumed
   handshakes with `openssl s_time -reuse`.
4. Memory per idle TLS connection: a fresh server process per round, N connections that
   finished their handshake and got one keep-alive response, held idle; VmRSS (and RssAnon)
   of the proxy, or of nginx's workers summed, before and after, per connection. The same
   with plain-HTTP connections (nginx: loadtools.Nginx; the proxy's http listener, with
   redirect_http off) says what TLS adds. The connections are held a second only: the proxy
   closes a connection idle for 15 s.
5. ACME: time to first byte of the first-ever HTTPS request to a new tenant, certificate
   ordered on demand from a real pebble (TLS-ALPN-01 answered by the proxy), measured with
   curl from connect to first response byte. Each round restarts the proxy with a fresh
   acme_state_dir (so its first order also registers the ACME account), registers new
   tenants with the admin RPC `add` (not woken), and requests, in this order: tenant A
   (account + order + wake), tenant C of a service covered by the wildcard file certificate
   (wake only: the reference), tenant B (order + wake, account known), A again (stored
   certificate, running instance).

CPU per request or connection: utime+stime from /proc/PID/stat of the proxy (nginx: its
workers summed) over the run, divided by what completed. Needs root (the proxy drops to
nobody); installs wrk, nginx and curl with apt-get when missing; pebble comes from Debian's
`pebble` package (section 5 is skipped without it).

    python3 bench/tls_throughput.py [--rounds 5] [--duration 5] [--connections 1,4,32]
        [--clients 4] [--idle 2000] [--resume 100] [--acme-rounds 5] [--no-build]
"""

import argparse
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import loadtools
import tenement_bench
from loadtools import add_and_wake, CLK_TCK, Nginx, build, cpu_ticks, ensure_tools, memory, revision, \
    snapshot_binaries, start_tiny_http
from tenement_bench import Sandbox, free_port, machine, median

HOST, SERVICES = loadtools.WARM_HOST, loadtools.WARM_SERVICES
SERVERS = ["nginx", "tenement"]
ACME_SERVICES = SERVICES + """
[service.site]
command = "@BIN@/tiny-http"
idle_timeout = 0
"""
# What s_time sends: its -www argument goes into "GET %s HTTP/1.0\r\n\r\n", so the Host and
# Connection headers ride in it (the trailing "X-Bench:" takes s_time's " HTTP/1.0").
S_TIME_PATH = f"/ HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nX-Bench:"
S_TIME_REQUEST = f"GET {S_TIME_PATH} HTTP/1.0\r\n\r\n".encode()
KEEPALIVE_REQUEST = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: tenement-bench\r\n\r\n".encode()


def log(text):
    """Progress, on stderr (stdout is the report)."""
    print(text, file=sys.stderr, flush=True)


# ---- certificates ---------------------------------------------------------------------------

class Pki:
    """A CA and leaves made with the openssl CLI, ECDSA P-256, in a directory the proxy's user
    can read (the CA and certificates 0644; keys 0600 owned by that user: nginx's master reads
    them as root)."""

    def __init__(self, key_owner=None):
        self.dir = tempfile.mkdtemp(prefix="tenement-bench-pki-")
        os.chmod(self.dir, 0o755)
        self.key_owner = key_owner
        self.ca = self.path("ca.pem")
        self.ca_key = self.path("ca.key")
        self._openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", self.ca_key)
        self._openssl("req", "-x509", "-new", "-key", self.ca_key, "-sha256", "-days", "30",
                      "-subj", "/CN=tenement bench CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", self.ca)
        os.chmod(self.ca, 0o644)

    def path(self, name):
        return os.path.join(self.dir, name)

    def _openssl(self, *args):
        r = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {r.stderr.strip()}")

    def issue(self, name, dns=(), ips=()):
        """A leaf for `dns` names and `ips`; returns (cert path, key path). The key is PKCS#8."""
        cert, key, csr, ext = (self.path(f"{name}{s}") for s in (".pem", ".key", ".csr", ".ext"))
        san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        self._openssl("req", "-new", "-key", key, "-subj", f"/CN={(list(dns) or list(ips))[0]}", "-out", csr)
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key, "-CAcreateserial",
                      "-days", "30", "-sha256", "-extfile", ext, "-out", cert)
        os.chmod(cert, 0o644)
        os.chmod(key, 0o600)
        if self.key_owner:
            os.chown(key, self.key_owner.pw_uid, self.key_owner.pw_gid)
        return cert, key

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the two servers ------------------------------------------------------------------------

def TlsNginx(upstream_port, cert, key, access_log=None):  # noqa: N802 (reads as the class it was)
    """loadtools.Nginx terminating TLS with `cert`, `key` (same upstream block, same forwarding
    headers as the plain one), room for the idle connections of section 4, and keep-alive
    connections never closed during a run."""
    return Nginx(upstream_port, tls=(cert, key), access_log=access_log, worker_connections=16384,
                 http_extra="keepalive_requests 1000000;")


class TlsProxy:
    """A sandbox (supervisor + proxy) whose proxy listens on plain HTTP and HTTPS, with
    `[settings.tls]` from `tls_toml`; the proxy can be restarted (with a new config)."""

    def __init__(self, services, tls_toml, settings_extra=""):
        self.http_port, self.https_port = free_port(), free_port()
        while self.https_port == self.http_port:
            self.https_port = free_port()
        self.sb = Sandbox(services.replace("@BIN@", loadtools.BIN), listen=f"127.0.0.1:{self.http_port}")
        os.chmod(self.sb.dir, 0o711)  # the proxy drops to nobody and must reach run/proxy.sock
        with open(self.sb.config) as f:
            self.base = f.read().replace("[settings]\n", "[settings]\n" + settings_extra, 1)
        self.write_config(tls_toml)
        self.port = self.https_port
        self.proxy = None
        try:
            self.sb.start_supervisor()
            self.start_proxy()
        except BaseException:
            self.close()
            raise

    @property
    def dir(self):
        return self.sb.dir

    def write_config(self, tls_toml):
        with open(self.sb.config, "w") as f:
            f.write(self.base + "\n" + tls_toml + "\n")

    def start_proxy(self):
        logf = open(os.path.join(self.sb.dir, "proxy.log"), "a")
        args = [os.path.join(tenement_bench.RELEASE, "tenement-proxy"), "--config", self.sb.config,
                "--listen", f"127.0.0.1:{self.http_port}", "--listen", f"https://127.0.0.1:{self.https_port}"]
        if os.geteuid() == 0:
            args += ["--user", "nobody"]
        p = subprocess.Popen(args, stdout=logf, stderr=logf, env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        self.sb.procs.append(p)
        deadline = time.time() + 10
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"proxy exited {p.returncode}; see {self.sb.dir}/proxy.log:\n"
                                   + self.log_tail())
            try:
                socket.create_connection(("127.0.0.1", self.https_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("proxy did not start:\n" + self.log_tail())
                time.sleep(0.01)
        self.proxy = p
        return p

    def restart_proxy(self, tls_toml=None):
        p = self.proxy
        if p and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if tls_toml is not None:
            self.write_config(tls_toml)
        return self.start_proxy()

    def pids(self):
        return [self.proxy.pid]

    def cpu_ticks(self):
        return cpu_ticks(self.proxy.pid)

    def log_tail(self, n=3000):
        try:
            with open(os.path.join(self.sb.dir, "proxy.log")) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def close(self):
        self.sb.close()


# ---- clients --------------------------------------------------------------------------------

def client_context(cafile, version=None):
    ctx = ssl.create_default_context(cafile=cafile)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def read_response(s, timeout=10.0):
    """Reads one whole response (Content-Length or until close); returns (status, bytes)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ssl.SSLZeroReturnError:
            chunk = b""
        if chunk:
            buf += chunk
            status = loadtools._complete(buf)
            if status is not None:
                return status, buf
        else:
            return loadtools._complete(buf, eof=True), buf


def tls_request(port, ctx, request, sni=HOST, session=None, timeout=10.0):
    """One TLS connection, one request; returns a dict (status, resumed, version, cipher,
    session, length). The connection is closed."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw, server_hostname=sni, session=session)
    except BaseException:
        raw.close()
        raise
    with s:
        s.sendall(request)
        status, buf = read_response(s, timeout)
        return {"status": status, "resumed": s.session_reused, "version": s.version(),
                "cipher": s.cipher()[0], "session": s.session, "length": len(buf),
                "alpn": s.selected_alpn_protocol()}


def wait_tls_ok(port, ctx, timeout=15.0):
    """Until a TLS GET answers 200 (the proxy's route table synced, the instance up)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = tls_request(port, ctx, KEEPALIVE_REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            if r["status"] == 200:
                return r
            last = r["status"]
        except (OSError, ssl.SSLError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"no 200 over TLS on port {port}: {last}")


def s_time(port, reuse, seconds, clients):
    """`openssl s_time` (-new or -reuse) from `clients` processes at once for `seconds`.

    Returns conns, rate (sum of each process's connections / its wall time), full and resumed
    counts (s_time prints `*` or `r` per connection), bytes per connection (min, max), the
    client processes' CPU per connection in us, errors."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse" if reuse else "-new",
            "-time", str(seconds), "-www", S_TIME_PATH]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = [None] * clients

    def run(i):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        results[i] = (p, time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"conns": 0, "rate": 0.0, "full": 0, "resumed": 0, "bytes": [], "errors": 0, "raw": []}
    for p, wall in results:
        text = p.stdout
        out["raw"].append(text + p.stderr)
        m = re.search(r"(\d+) connections in [\d.]+s;", text)
        n = int(m.group(1)) if m else 0
        if p.returncode != 0 or not m:
            out["errors"] += 1
        marks = "".join(line for line in text.splitlines() if re.fullmatch(r"[*r3t]+", line))
        out["full"] += sum(marks.count(c) for c in "*3t")
        out["resumed"] += marks.count("r")
        m = re.search(r"(\d+) bytes read per connection", text)
        if m:
            out["bytes"].append(int(m.group(1)))
        out["conns"] += n
        out["rate"] += n / wall
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["client_cpu_us"] = cpu * 1e6 / out["conns"] if out["conns"] else float("nan")
    return out


def wrk_https(port, connections, duration):
    """wrk -t1 over TLS (its SNI is the URL's host, 127.0.0.1: both servers answer it with
    their default certificate)."""
    return loadtools.wrk(port, connections, duration, host=HOST, scheme="https")


def wrk_resumes(tiny_port, cert, key):
    """Whether wrk resumes TLS sessions when it reconnects: wrk -H "Connection: close" for
    1 s against an nginx logging $ssl_session_reused; (resumed, connections)."""
    logdir = tempfile.mkdtemp(prefix="tenement-bench-wrkcheck-")
    os.chmod(logdir, 0o777)
    path = os.path.join(logdir, "access.log")
    nginx = TlsNginx(tiny_port, cert, key, access_log=path)
    try:
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", "-H", f"Host: {HOST}", "-H", "Connection: close",
                        f"https://127.0.0.1:{nginx.port}/"], capture_output=True, timeout=60)
    finally:
        nginx.stop()
    with open(path) as f:
        marks = f.read().split()
    shutil.rmtree(logdir, ignore_errors=True)
    return marks.count("r"), len(marks)


def open_idle(port, ctx, n, threads=8):
    """Opens `n` TLS connections (handshake, one keep-alive GET, its whole response) from
    `threads` threads; plain TCP ones when `ctx` is None. Returns (sockets, errors, seconds)."""
    socks, errors = [], []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def work(count):
        for _ in range(count):
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=15)
                s = ctx.wrap_socket(raw, server_hostname=HOST) if ctx else raw
                s.sendall(KEEPALIVE_REQUEST)
                status, _ = read_response(s, 15)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                with lock:
                    socks.append(s)
            except Exception as e:  # noqa: counted and reported
                with lock:
                    errors.append(str(e))

    shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=work, args=(k,)) for k in shares]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return socks, errors, time.perf_counter() - t0


# ---- pebble ---------------------------------------------------------------------------------

class Pebble:
    """Debian's pebble with pebble-challtestsrv answering every DNS query with 127.0.0.1, as
    proxy/tests/e2e/acme.rs starts them: validation of TLS-ALPN-01 on `tls_port` and HTTP-01
    on `http_port` of 127.0.0.1 (the proxy's), PEBBLE_VA_NOSLEEP=1, no nonce rejected on
    purpose, no authorization reused."""

    def __init__(self, pki, http_port, tls_port):
        self.dir = tempfile.mkdtemp(prefix="tenement-bench-pebble-")
        cert, key = pki.issue("pebble-api", dns=["localhost"], ips=["127.0.0.1"])
        self.api_ca = pki.ca
        used = {http_port, tls_port}
        ports = []
        while len(ports) < 4:
            p = free_port()
            if p not in used:
                used.add(p)
                ports.append(p)
        listen, self.management, dns, dns_mgmt = ports
        self.directory = f"https://127.0.0.1:{listen}/dir"
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{listen}",
            "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        path = os.path.join(self.dir, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.log_path = os.path.join(self.dir, "pebble.log")
        self.logs = [open(self.log_path, "w"), open(os.path.join(self.dir, "challtestsrv.log"), "w")]
        self.procs = [
            subprocess.Popen(["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                              "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                              "-management", f"127.0.0.1:{dns_mgmt}"],
                             stdout=self.logs[1], stderr=self.logs[1], stdin=subprocess.DEVNULL),
            subprocess.Popen(["pebble", "-config", path, "-dnsserver", f"127.0.0.1:{dns}"],
                             env=dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                                      PEBBLE_AUTHZREUSE="0"),
                             stdout=self.logs[0], stderr=self.logs[0], stdin=subprocess.DEVNULL),
        ]
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                socket.create_connection(("127.0.0.1", self.management), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                    self.stop()
                    raise RuntimeError("pebble did not start:\n" + self.log_text()[-2000:])
                time.sleep(0.05)

    def log_text(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def orders(self):
        return self.log_text().count("Added order")

    def root_pem(self):
        ctx = ssl.create_default_context(cafile=self.api_ca)
        deadline = time.time() + 10
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0",
                                            context=ctx, timeout=5) as r:
                    return r.read()
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def curl_timed(port, name, cafile):
    """curl's view of one HTTPS GET /: status, http version and the connect, TLS done, first
    byte and total times in ms (each from the start)."""
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "60", "--cacert", cafile,
                        "--resolve", f"{name}:{port}:127.0.0.1", "-w",
                        "%{http_code} %{http_version} %{time_connect} %{time_appconnect} "
                        "%{time_starttransfer} %{time_total}", f"https://{name}:{port}/"],
                       capture_output=True, text=True)
    fields = r.stdout.split()
    if r.returncode != 0 or len(fields) != 6:
        return {"status": None, "error": (r.stderr.strip() or r.stdout.strip())[:300]}
    code, version, connect, app, first, total = fields
    ms = lambda x: float(x) * 1000
    return {"status": int(code), "version": version, "connect": ms(connect), "tls": ms(app) - ms(connect),
            "request": ms(first) - ms(app), "ttfb": ms(first), "total": ms(total), "error": None}


# ---- the sections ---------------------------------------------------------------------------

def rotate(r):
    return SERVERS[r % 2:] + SERVERS[:r % 2]


def run_rounds(args, conns, servers):
    """Sections 1, 2 and 3 (rates), interleaved; returns rows[(section, key, server)] = [..]."""
    rows = {}
    for r in range(args.rounds):
        for name in rotate(r):
            srv = servers[name]
            for mode in ("new", "reuse"):
                before = srv.cpu_ticks()
                res = s_time(srv.port, mode == "reuse", args.duration, args.clients)
                after = srv.cpu_ticks()
                res["cpu_us"] = (after - before) / CLK_TCK * 1e6 / res["conns"] if res["conns"] else float("nan")
                rows.setdefault((mode, 0, name), []).append(res)
                log(f"  round {r + 1}/{args.rounds} s_time -{mode:<5} {name:<9} {res['rate']:>8.0f} conn/s "
                    f"cpu/conn {res['cpu_us']:>6.0f} us  client {res['client_cpu_us']:>5.0f} us  "
                    f"full {res['full']} resumed {res['resumed']} bytes {sorted(set(res['bytes']))}"
                    f"{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}")
        for c in conns:
            for name in rotate(r):
                srv = servers[name]
                before = srv.cpu_ticks()
                res = wrk_https(srv.port, c, args.duration)
                after = srv.cpu_ticks()
                res["cpu_us"] = (after - before) / CLK_TCK * 1e6 / res["requests"] if res["requests"] else float("nan")
                rows.setdefault(("keepalive", c, name), []).append(res)
                log(f"  round {r + 1}/{args.rounds} wrk c={c:<3} {name:<9} {res['rps']:>9.0f} rps "
                    f"p50 {res['p50_us']:>6.0f} us p99 {res['p99_us']:>6.0f} us cpu/req {res['cpu_us']:>5.1f} us"
                    f"{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}")
    return rows


def resumption_counts(servers, ca, n):
    """Sequential connections reusing the last session: {(server, version): (resumed, of)}."""
    out = {}
    request = KEEPALIVE_REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    for name in SERVERS:
        for label, version in (("TLSv1.3", ssl.TLSVersion.TLSv1_3), ("TLSv1.2", ssl.TLSVersion.TLSv1_2)):
            ctx = client_context(ca, version)
            session, resumed, bad = None, 0, 0
            for i in range(n):
                try:
                    res = tls_request(servers[name].port, ctx, request, session=session)
                except (OSError, ssl.SSLError):
                    bad += 1
                    continue
                if res["status"] != 200:
                    bad += 1
                resumed += bool(res["resumed"])
                session = res["session"]
            out[(name, label)] = (resumed, n - 1, bad)
    return out


IDLE_KINDS = [("nginx", "tls"), ("tenement", "tls"), ("nginx", "http"), ("tenement", "http")]


def idle_memory(args, tiny_port, proxy, cert, key, ctx):
    """Section 4: per round, server and scheme, a fresh process, warmed up (100 connections
    opened and closed), then N idle connections. The plain-HTTP rows (nginx: loadtools.Nginx;
    tenement: the proxy's http listener, redirect_http off) say what TLS adds."""
    rows = {}
    for r in range(args.rounds):
        k = r % len(IDLE_KINDS)
        for name, scheme in IDLE_KINDS[k:] + IDLE_KINDS[:k]:
            nginx = None
            if name == "nginx":
                nginx = TlsNginx(tiny_port, cert, key) if scheme == "tls" else Nginx(tiny_port)
                srv, port = nginx, nginx.port
                pids = nginx.workers()
            else:
                proxy.restart_proxy()
                port = proxy.https_port if scheme == "tls" else proxy.http_port
                pids = proxy.pids()
            cctx = ctx if scheme == "tls" else None
            try:
                if name == "tenement":
                    wait_tls_ok(proxy.https_port, ctx)  # routes synced after the restart
                elif scheme == "tls":
                    wait_tls_ok(port, ctx)
                warm, werr, _ = open_idle(port, cctx, 100)
                for sock in warm:
                    sock.close()
                time.sleep(0.5)
                before = memory(pids)
                socks, errors, took = open_idle(port, cctx, args.idle)
                time.sleep(1.0)
                after = memory(pids)
                res = {"n": len(socks), "errors": len(errors) + len(werr), "open_s": took,
                       "before": before, "after": after,
                       "rss_per": (after[0] - before[0]) / max(1, len(socks)),
                       "anon_per": (after[1] - before[1]) / max(1, len(socks)),
                       "fds": after[2] - before[2], "first_error": (errors or werr or [None])[0]}
                for sock in socks:
                    try:
                        sock.close()
                    except OSError:
                        pass
            finally:
                if nginx:
                    nginx.stop()
            rows.setdefault((name, scheme), []).append(res)
            log(f"  round {r + 1}/{args.rounds} idle {name:<9}{scheme:<5} {res['n']} held (opened in {took:.1f} s), "
                f"RSS {before[0] / 1024:.1f} -> {after[0] / 1024:.1f} MiB = {res['rss_per']:.1f} KiB/conn, "
                f"anon {res['anon_per']:.1f} KiB/conn, fds +{res['fds']}"
                f"{'  ERRORS ' + str(res['errors']) + ': ' + str(res['first_error']) if res['errors'] else ''}")
    return rows


def acme_section(args, pki, cert, key):
    """Section 5. Returns (rows, notes) or raises."""
    nobody = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    http_port = https_port = None
    proxy = pebble = None
    rows = {}
    notes = []
    try:
        # Ports first: pebble is told where the proxy's listeners are.
        placeholder = "[settings.tls]\ncertificates = [{ cert = \"%s\", key = \"%s\" }]\n" % (cert, key)
        proxy = TlsProxy(ACME_SERVICES, placeholder, settings_extra="max_connections_per_client = 10000\n")
        http_port, https_port = proxy.http_port, proxy.https_port
        pebble = Pebble(pki, http_port, https_port)
        roots = os.path.join(proxy.dir, "roots.pem")
        with open(roots, "wb") as f:
            f.write(pebble.root_pem())
            with open(pki.ca, "rb") as g:
                f.write(g.read())
        rpc = proxy.sb.admin()
        orders_before = pebble.orders()
        for r in range(args.acme_rounds):
            state = os.path.join(proxy.dir, f"acme-state-{r}")
            os.mkdir(state, 0o700)
            if nobody:
                os.chown(state, nobody.pw_uid, nobody.pw_gid)
            tls = placeholder + (
                f'acme_email = "bench@example.com"\nacme_directory = "{pebble.directory}"\n'
                f'acme_ca_file = "{pki.ca}"\nacme_state_dir = "{state}"\n'
                "acme_orders_per_hour = 10000\nacme_orders_per_week = 1000000\n")
            proxy.restart_proxy(tls)
            a, b, c = f"r{r}a", f"r{r}b", f"r{r}c"
            reply = rpc.call({"type": "add", "instances": [f"site:{a}", f"site:{b}", f"tiny:{c}"]})
            if reply.get("type") == "error":
                raise RuntimeError(f"add: {reply}")
            time.sleep(0.5)  # the supervisor pushes the routes to the proxy
            plan = [("first tenant: account + order + wake", f"{a}.site.localhost"),
                    ("file certificate: wake only", f"{c}.tiny.localhost"),
                    ("second tenant: order + wake", f"{b}.site.localhost"),
                    ("first tenant again: warm", f"{a}.site.localhost")]
            for label, name in plan:
                res = curl_timed(https_port, name, roots)
                rows.setdefault(label, []).append(res)
                if res["status"] is None:
                    log(f"  acme round {r + 1}/{args.acme_rounds} {label}: FAILED {res['error']}")
                else:
                    log(f"  acme round {r + 1}/{args.acme_rounds} {label:<38} {res['status']} h{res['version']} "
                        f"connect {res['connect']:.1f} TLS {res['tls']:.1f} request {res['request']:.1f} "
                        f"ttfb {res['ttfb']:.1f} ms")
        orders = pebble.orders() - orders_before
        notes.append(f"pebble accepted {orders} orders for {2 * args.acme_rounds} ordered names")
        failed = sum(1 for v in rows.values() for x in v if x["status"] != 200)
        if failed:
            notes.append(f"{failed} requests did not answer 200; proxy log tail:\n{proxy.log_tail()}")
    finally:
        if proxy:
            proxy.close()
        if pebble:
            pebble.stop()
    return rows, notes


# ---- report ---------------------------------------------------------------------------------

def fmt_ratio(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{median(xs):.2f} [{min(xs):.2f}..{max(xs):.2f}]"


def handshake_table(rows, mode):
    print(f"{'server':<9}{'conn/s':>8}{'server cpu us/conn':>20}{'per core':>10}{'client cpu us/conn':>20}"
          f"{'full':>7}{'resumed':>9}{'errors':>8}")
    for name in SERVERS:
        xs = rows[(mode, 0, name)]
        cpu = median([x['cpu_us'] for x in xs])
        print(f"{name:<9}{median([x['rate'] for x in xs]):>8.0f}{cpu:>20.0f}{1e6 / cpu:>10.0f}"
              f"{median([x['client_cpu_us'] for x in xs]):>20.0f}{sum(x['full'] for x in xs):>7}"
              f"{sum(x['resumed'] for x in xs):>9}{sum(x['errors'] for x in xs):>8}")
    t, n = rows[(mode, 0, "tenement")], rows[(mode, 0, "nginx")]
    print(f"tenement/nginx per round: conn/s {fmt_ratio([a['rate'] / b['rate'] for a, b in zip(t, n)])}, "
          f"server cpu/conn {fmt_ratio([a['cpu_us'] / b['cpu_us'] for a, b in zip(t, n)])}")


def report(args, conns, rows, counts, mem, acme, negotiated, checks):
    print(f"# TLS: tenement-proxy vs nginx, same ECDSA P-256 certificate, {args.rounds} interleaved rounds, "
          f"{args.duration} s per run; {machine()}; {revision()}")
    for line in negotiated:
        print(f"# {line}")
    for line in checks:
        print(f"# {line}")
    print()
    print(f"1. new TLS connections: full handshake + GET / + close, openssl s_time -new x{args.clients} processes")
    handshake_table(rows, "new")
    print("per core = 1e6 / server cpu us/conn: the connections/s one core of the server would take. When the")
    print("client's CPU per connection exceeds the server's, conn/s measures the client on these shared CPUs.")
    print()
    print("2. keep-alive HTTP/1.1 over TLS, wrk -t1")
    print(f"{'conns':>5} {'server':<9}{'rps':>9}{'p50 us':>9}{'p99 us':>9}{'cpu us/req':>12}{'errors':>8}")
    for c in conns:
        for name in SERVERS:
            xs = rows[("keepalive", c, name)]
            print(f"{c:>5} {name:<9}{median([x['rps'] for x in xs]):>9.0f}{median([x['p50_us'] for x in xs]):>9.0f}"
                  f"{median([x['p99_us'] for x in xs]):>9.0f}{median([x['cpu_us'] for x in xs]):>12.1f}"
                  f"{sum(x['errors'] for x in xs):>8}")
    print("tenement/nginx per round, median [min..max]:")
    print(f"{'conns':>5}{'rps':>20}{'cpu/req':>20}{'p50':>20}")
    for c in conns:
        t, n = rows[("keepalive", c, "tenement")], rows[("keepalive", c, "nginx")]
        print(f"{c:>5}{fmt_ratio([a['rps'] / b['rps'] for a, b in zip(t, n)]):>20}"
              f"{fmt_ratio([a['cpu_us'] / b['cpu_us'] for a, b in zip(t, n)]):>20}"
              f"{fmt_ratio([a['p50_us'] / b['p50_us'] for a, b in zip(t, n)]):>20}")
    print()
    print(f"3. resumption: {args.resume} sequential connections each reusing the previous one's session "
          "(Python ssl, SNI, CA verified)")
    print(f"{'server':<9}{'TLS 1.3 resumed':>18}{'TLS 1.2 resumed':>18}")
    for name in SERVERS:
        cells = []
        for v in ("TLSv1.3", "TLSv1.2"):
            res, of, bad = counts[(name, v)]
            cells.append(f"{res}/{of}" + (f" ({bad} failed)" if bad else ""))
        print(f"{name:<9}{cells[0]:>18}{cells[1]:>18}")
    print(f"resumed handshakes, openssl s_time -reuse x{args.clients} processes (TLS 1.3, GET / + close each):")
    handshake_table(rows, "reuse")
    print()
    print(f"4. idle connections: {args.idle} held after a handshake (TLS) and one keep-alive response, "
          "a fresh server process per round (nginx: both workers summed)")
    print(f"{'server':<14}{'held':>6}{'RSS before MiB':>16}{'RSS after MiB':>15}{'KiB/conn':>10}"
          f"{'anon KiB/conn':>15}{'fds added':>11}{'errors':>8}")
    for name, scheme in IDLE_KINDS:
        xs = mem[(name, scheme)]
        label = f"{name} {'TLS' if scheme == 'tls' else 'HTTP'}"
        print(f"{label:<14}{median([x['n'] for x in xs]):>6.0f}{median([x['before'][0] for x in xs]) / 1024:>16.1f}"
              f"{median([x['after'][0] for x in xs]) / 1024:>15.1f}{median([x['rss_per'] for x in xs]):>10.1f}"
              f"{median([x['anon_per'] for x in xs]):>15.1f}{median([x['fds'] for x in xs]):>11.0f}"
              f"{sum(x['errors'] for x in xs):>8}")
    t, n = mem[("tenement", "tls")], mem[("nginx", "tls")]
    print(f"tenement/nginx KiB per TLS connection {fmt_ratio([a['rss_per'] / b['rss_per'] if b['rss_per'] > 0 else float('nan') for a, b in zip(t, n)])}; "
          "TLS adds (TLS minus HTTP, KiB/conn): " + ", ".join(
              f"{name} {median([a['rss_per'] - b['rss_per'] for a, b in zip(mem[(name, 'tls')], mem[(name, 'http')])]):.1f}"
              for name in SERVERS))
    print()
    if acme is None:
        print("5. ACME: skipped")
        return
    if isinstance(acme, str):
        print(f"5. ACME: FAILED: {acme}")
        return
    acme_rows, notes = acme
    print(f"5. ACME: first HTTPS request to a new tenant, certificate ordered on demand from pebble, "
          f"{args.acme_rounds} rounds (curl; ms from the start; TLS = handshake, request = after it to first byte)")
    print(f"{'':<40}{'connect':>9}{'TLS':>9}{'request':>9}{'TTFB':>9}{'ok':>6}")
    for label, xs in acme_rows.items():
        good = [x for x in xs if x["status"] == 200]
        cell = lambda k: f"{median([x[k] for x in good]):>9.1f}" if good else f"{'-':>9}"
        print(f"{label:<40}{cell('connect')}{cell('tls')}{cell('request')}{cell('ttfb')}{len(good):>3}/{len(xs)}")
    med = lambda label, k: median([x[k] for x in acme_rows.get(label, []) if x["status"] == 200])
    first, second = "first tenant: account + order + wake", "second tenant: order + wake"
    file_, warm = "file certificate: wake only", "first tenant again: warm"
    print(f"handshake held for the order: {med(first, 'tls') - med(file_, 'tls'):.0f} ms with a new account, "
          f"{med(second, 'tls') - med(file_, 'tls'):.0f} ms without (TLS minus the file-certificate tenant's); "
          f"the wake: {med(file_, 'request') - med(warm, 'request'):.1f} ms (request minus a running instance's)")
    for note in notes:
        print(note)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per s_time and wrk run")
    ap.add_argument("--connections", default="1,4,32", help="wrk connection counts")
    ap.add_argument("--clients", type=int, default=4, help="s_time processes at once")
    ap.add_argument("--idle", type=int, default=2000, help="idle TLS connections held for the memory figure")
    ap.add_argument("--resume", type=int, default=100, help="sequential connections per resumption count")
    ap.add_argument("--acme-rounds", type=int, default=5, help="0: skip section 5")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin", help="prebuilt binaries (tenement-supervisor, tenement-exec, tenement-proxy, "
                    "tiny-http) instead of building target/release; implies --no-build")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    started = time.time()
    if os.geteuid() != 0:
        raise SystemExit("tls_throughput: needs root (the proxy drops to nobody)")
    ensure_tools("wrk", "nginx")
    if shutil.which("curl") is None:
        loadtools.PACKAGES.setdefault("curl", "curl")
        ensure_tools("curl")
    if args.bin:
        tenement_bench.RELEASE = os.path.abspath(args.bin)
    elif not args.no_build:
        build()
    snapshot_binaries()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the idle connections
    if hard < args.idle + 200:
        raise SystemExit(f"open-file hard limit {hard} is too low for --idle {args.idle}")

    nobody = pwd.getpwnam("nobody")
    pki = Pki(key_owner=nobody)
    cert, key = pki.issue("tiny", dns=["*.tiny.localhost", "tiny.localhost"])
    # redirect_http off: plain requests are proxied (the HTTP rows of section 4), not redirected.
    tls_toml = f'[settings.tls]\nredirect_http = false\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n'
    tiny, tiny_port = start_tiny_http()
    nginx = proxy = None
    failed = False
    try:
        nginx = TlsNginx(tiny_port, cert, key)
        proxy = TlsProxy(SERVICES, tls_toml, settings_extra="max_connections_per_client = 100000\n")
        rpc = add_and_wake(proxy.sb)
        servers = {"nginx": nginx, "tenement": proxy}
        ctx = client_context(pki.ca)

        # What is negotiated, and the exact request s_time sends answered 200 by both.
        negotiated, checks = [], []
        for name in SERVERS:
            r = wait_tls_ok(servers[name].port, ctx)
            raw = socket.create_connection(("127.0.0.1", servers[name].port), timeout=10)
            noverify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            noverify.check_hostname = False
            noverify.verify_mode = ssl.CERT_NONE
            with noverify.wrap_socket(raw) as s:  # no SNI, as s_time and wrk (an IP) send
                s.sendall(S_TIME_REQUEST)
                status, buf = read_response(s)
                leaf_ok = s.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(open(cert).read())
            servers[name].s_time_bytes = len(buf)
            negotiated.append(f"{name}: {r['version']} {r['cipher']} (SNI, no ALPN: HTTP/1.1); "
                              f"s_time's request without SNI: {status}, {len(buf)} bytes, "
                              f"{'the same leaf' if leaf_ok else 'ANOTHER CERTIFICATE'}")
            if status != 200:
                failed = True
        # ALPN: both offer h2 (curl and browsers use it); wrk and s_time offer no ALPN.
        for name in SERVERS:
            actx = client_context(pki.ca)
            actx.set_alpn_protocols(["h2", "http/1.1"])
            raw = socket.create_connection(("127.0.0.1", servers[name].port), timeout=10)
            with actx.wrap_socket(raw, server_hostname=HOST) as s:
                checks.append(f"{name}: ALPN h2,http/1.1 offered -> {s.selected_alpn_protocol()}")

        resumed, total = wrk_resumes(tiny_port, cert, key)
        checks.append(f"wrk -H 'Connection: close' against nginx: {resumed} of {total} connections resumed "
                      "their TLS session ($ssl_session_reused), so wrk cannot count full handshakes")

        # Warm-up: upstream pools, page cache, CPU frequency.
        for name in SERVERS:
            for c in conns:
                wrk_https(servers[name].port, c, 1)
            s_time(servers[name].port, False, 1, args.clients)

        log("sections 1-3: s_time and wrk, interleaved")
        rows = run_rounds(args, conns, servers)
        log("section 3: resumption counts")
        counts = resumption_counts(servers, pki.ca, args.resume)
        log("section 4: idle connections")
        mem = idle_memory(args, tiny_port, proxy, cert, key, ctx)
        for name in SERVERS:
            xs = rows[("new", 0, name)] + rows[("reuse", 0, name)]
            sizes = sorted({b for x in xs for b in x["bytes"]})
            if sizes and (min(sizes) < servers[name].s_time_bytes - 2 or max(sizes) > servers[name].s_time_bytes + 2):
                checks.append(f"{name}: s_time read {sizes} bytes per connection, a 200 is "
                              f"{servers[name].s_time_bytes}: SOME RESPONSES WERE NOT 200")
                failed = True
            else:
                checks.append(f"{name}: every s_time connection read {sizes} bytes, the size of the 200 answer")
        proxy.close()
        proxy = None
        nginx.stop()
        nginx = None

        acme = None
        if args.acme_rounds > 0 and shutil.which("pebble") and shutil.which("pebble-challtestsrv"):
            log("section 5: ACME with pebble")
            try:
                acme = acme_section(args, pki, cert, key)
            except Exception as e:  # noqa: reported in the table
                acme = f"{type(e).__name__}: {e}"
                failed = True
        report(args, conns, rows, counts, mem, acme, negotiated, checks)
        print(f"(took {time.time() - started:.0f} s)")
    finally:
        if proxy:
            proxy.close()
        if nginx:
            nginx.stop()
        tiny.terminate()
        tiny.wait()
        pki.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
