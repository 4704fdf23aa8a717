#!/usr/bin/env python3
"""Soak: an hour of mixed traffic on one supervisor and one proxy, watched for leaks.

    sudo python3 bench/soak.py [--duration 1h|5m|SECONDS] [--tenants 200] [--bin DIR]

--tenants instances of examples/notes (Python, `health = "/health"`) and --mirror-tenants
(default a tenth as many) of tests/fixtures/py/mirror.py (the notes app takes neither
WebSockets nor bodies over 64 KiB), every one with idle_timeout 5 s, get visits: sessions
arriving as one Poisson process of --rate per second (default 4), each for one tenant chosen
uniformly, made of --session requests (default 2-12, uniform) one after the other, --gap
seconds apart (default 0.5-4: shorter than idle_timeout, so a session keeps its tenant awake):

  plain      90 % of sessions, to a notes tenant: POST /notes (45 %), GET /notes (45 %) or
                  GET /health (10 %), with the tenant's bearer token (fetched once per tenant
                  by GET /token, itself counted);
  websocket   5 % of sessions' requests, to a mirror tenant: GET /upgrade with the WebSocket
                  handshake (101 and Sec-WebSocket-Accept checked), held open 2-6 s with a
                  masked frame sent every 0.5 s and its echo checked, then a close frame, EOF;
  upload      5 %  the same: POST /upload of 1-8 MiB, its size and SHA-256 checked
                  (a mirror session mixes the two kinds half and half).

Why sessions, and 4 per second: every wake costs a Python start (~0.1 s of CPU), and uniform
single requests cannot keep a third of 200 tenants running without ~11 wakes per second, more
than two shared cores give. A session of 7 requests ~2 s apart keeps its tenant running ~20 s
for one wake: at 4 sessions/s (~28 requests/s) a tenant gets a visit every ~55 s, so about a
third run at any moment, two thirds sleep, and ~3.5 wakes per second keep them cycling.
(--session 1-1 --rate 20 gives the uniform stream.) Each sample line shows the counts seen.

Each request opens its own connection (`Connection: close`) through the proxy and is failed on
any connection error, timeout (120 s), unexpected status or wrong body; nothing is retried. The
client is one asyncio loop in a process of its own, so the measuring side cannot delay it.

Every 30 s: both daemons' RSS (and anonymous part), open fds and threads (/proc); the size of
state/registry.json; log lines per second written by the supervisor and the proxy (their
stderr, captured to files: journald is not running) and by the instances (what the supervisor
captured: the RPC `logs` that `tenctl logs` prints, each instance's tail read and the lines
timed within the interval counted); instances running and stopped (RPC `list`); wakes (the
supervisor's "started (pid N)" lines). Each instance process in the sandbox is also watched
(/proc, every 0.5 s) for two copies of one instance running at once.

At the end: requests sent / answered / failed by kind and by status, wakes, latency, and the
growth of RSS and fds from minute 5 to the end. Goals: 0 failed requests; no growth of RSS or
fds beyond 5 % after the first 5 minutes (with a --duration under 10 minutes the reference is
the middle of the run instead of minute 5). Growth is shown three ways (last sample against
the first, mean of the last window against the first, least-squares trend over every sample)
and judged on the trend: fds and memory follow the number of instances running at the moment
of a sample, which a single pair of samples mistakes for growth. Samples and the summary are
written to bench/out/soak-REV-TIME.{txt,json,csv}, every request to ...-requests.csv.gz, the
daemons' logs to ...-logs/.

--bin DIR takes tenement-supervisor, tenement-exec, tenement-proxy and tenctl from DIR (for
example a worktree's target/release) instead of building this checkout; either way they are
copied to a private directory first.
"""

import argparse
import base64
import collections
import csv
import gzip
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import loadtools
import tenement_bench
from loadtools import listen_overflows, snapshot_binaries
from tenement_bench import (TimedRpc, machine, median, p, parse_duration, proc_environ, proc_stat,
                            proc_stats, revision_of)

HERE = os.path.dirname(os.path.abspath(__file__))

SERVICES = """
[service.notes]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
health = "/health"
idle_timeout = "@IDLE@"
[service.notes.env]
DATA_DIR = "{data_dir}/{id}"

[service.mirror]
command = "python3 @ROOT@/tests/fixtures/py/mirror.py"
health = "/health"
idle_timeout = "@IDLE@"
"""

PLAIN, WEBSOCKET, UPLOAD = "plain", "websocket", "upload"
KINDS = (PLAIN, WEBSOCKET, UPLOAD)
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MIB = 1024 * 1024
GOAL_GROWTH = 5.0  # percent
REQUEST_TIMEOUT = 120.0


def services_toml(idle_timeout):
    return SERVICES.replace("@IDLE@", idle_timeout)


def notes_ids(n):
    return [f"t{i:03}" for i in range(n)]


def mirror_ids(n):
    return [f"m{i:02}" for i in range(n)]


def host_of(instance):
    service, tenant = instance.split(":")
    return f"{tenant}.{service}.localhost"


class Payloads:
    """Upload bodies of 1-8 MiB, made once, with their SHA-256 (so a request costs no hashing)."""

    SIZES_MIB = (1, 2, 3, 5, 8)

    def __init__(self, rng):
        self.bodies = []
        for size in self.SIZES_MIB:
            body = rng.randbytes(size * MIB)
            self.bodies.append((body, hashlib.sha256(body).hexdigest()))


class Record:
    """One request as the client saw it. Times are wall clock (time.time()) so they line up
    with other events; `latency` is to the response head (the 101 for a websocket), `duration`
    to the end of the exchange."""

    __slots__ = ("kind", "op", "instance", "sched", "start", "latency", "duration", "status", "error")

    def __init__(self, kind, op, instance, sched, start):
        self.kind, self.op, self.instance, self.sched, self.start = kind, op, instance, sched, start
        self.latency = self.duration = None
        self.status = self.error = None

    @property
    def end(self):
        return self.start + (self.duration or 0.0)

    @property
    def failed(self):
        return self.error is not None

    @classmethod
    def from_row(cls, row):
        rec = cls(row["kind"], row["op"], row["instance"], float(row["scheduled"]), float(row["start"]))
        rec.latency = float(row["latency_ms"]) / 1000
        rec.duration = float(row["duration_ms"]) / 1000
        rec.status = int(row["status"]) if row["status"] else None
        rec.error = row["error"] or None
        return rec

    def row(self):
        return [self.kind, self.op, self.instance, f"{self.sched:.4f}", f"{self.start:.4f}",
                f"{(self.latency or 0) * 1000:.3f}", f"{(self.duration or 0) * 1000:.3f}",
                self.status if self.status is not None else "", self.error or ""]


CSV_HEADER = ["kind", "op", "instance", "scheduled", "start", "latency_ms", "duration_ms", "status", "error"]


def _ws_frame(payload, opcode=0x1):
    """A masked client frame (RFC 6455), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class Load:
    """Poisson arrivals of sessions (`rate` per second) over the tenants, sent by a process of its
    own. A session is one tenant chosen uniformly, asked `session` (a range) requests one after
    the other, each `gap` (a range, seconds) after the previous one ended; with session=(1, 1)
    this is a plain Poisson stream of requests. `shares` splits sessions between the kinds:
    plain sessions go to the `notes` instances, websocket and upload ones to `mirror`, where
    each request of the session is a websocket or an upload in the proportion of their shares. The client is one asyncio loop in a child process (spawned, not
    forked), so neither the measuring process's threads nor its GIL can delay a request or the
    schedule. Live counts come through shared memory; each finished request is a row of a CSV
    file that `records()` reads once the load has stopped."""

    def __init__(self, port, notes, mirror, rate, shares, seed, session=(2, 12), gap=(0.5, 4.0),
                 ws_hold=(2.0, 6.0), ws_every=0.5):
        ctx = multiprocessing.get_context("spawn")
        self.values = {k: ctx.Value("q", 0, lock=False) for k in ("sent", "done", "failed", "in_flight")}
        self.stop_event = ctx.Event()
        fd, self.path = tempfile.mkstemp(prefix="tenement-load-", suffix=".csv")
        os.close(fd)
        config = {"port": port, "notes": list(notes), "mirror": list(mirror), "rate": rate, "shares": shares,
                  "seed": seed, "session": session, "gap": gap, "ws_hold": ws_hold, "ws_every": ws_every,
                  "path": self.path}
        self.proc = ctx.Process(target=_load_main, args=(config, self.values, self.stop_event),
                                name="tenement-load", daemon=True)
        self._records = None

    def start(self):
        self.started = time.time()
        self.proc.start()

    def stop(self, drain=REQUEST_TIMEOUT + 10):
        """Stops sending; the requests in flight get up to `drain` s to finish."""
        self.stop_event.set()
        self.proc.join(drain + 5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.stopped = time.time()

    @property
    def stopping(self):
        return self.stop_event

    def counts(self):
        """(sent, finished, failed, in flight) so far."""
        v = self.values
        return v["sent"].value, v["done"].value, v["failed"].value, v["in_flight"].value

    def records(self):
        if self._records is None:
            self._records = []
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    self._records.append(Record.from_row(row))
            os.unlink(self.path)
        return self._records


def _load_main(config, values, stop_event):
    """The load process: runs the asyncio client until stop_event, then drains."""
    import asyncio
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    with open(config["path"], "w", newline="", buffering=1) as out:
        writer = csv.writer(out)
        writer.writerow(CSV_HEADER)
        client = _AsyncClient(config, values, writer)
        asyncio.run(client.main(stop_event))


class _AsyncClient:
    def __init__(self, config, values, writer):
        self.port = config["port"]
        self.notes, self.mirror = config["notes"], config["mirror"]
        self.rate, self.shares = config["rate"], config["shares"]
        self.rng = random.Random(config["seed"])
        self.payloads = Payloads(random.Random(config["seed"] + 1))
        self.ws_hold, self.ws_every = config["ws_hold"], config["ws_every"]
        self.session, self.gap = config["session"], config["gap"]
        self.values, self.writer = values, writer
        self.tokens = {}
        self.tasks = set()

    async def main(self, stop_event):
        import asyncio
        rng = self.rng
        kinds = [k for k in KINDS if self.shares.get(k, 0) > 0]
        weights = [self.shares[k] for k in kinds]
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop_event.is_set():
            due += rng.expovariate(self.rate)
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if stop_event.is_set():
                break
            kind = rng.choices(kinds, weights)[0]
            instance = rng.choice(self.notes if kind == PLAIN else self.mirror)
            n = rng.randint(*self.session)
            sched = time.time() + min(0.0, wait)
            task = asyncio.create_task(self.run_session(kind, instance, n, sched, random.Random(rng.random()),
                                                        stop_event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=REQUEST_TIMEOUT + 10)

    async def run_session(self, kind, instance, n, sched, rng, stop_event):
        import asyncio
        mirror_kinds = [k for k in (WEBSOCKET, UPLOAD) if self.shares.get(k, 0) > 0]
        mirror_weights = [self.shares[k] for k in mirror_kinds]
        for i in range(n):
            if i:
                await asyncio.sleep(rng.uniform(*self.gap))
                sched = time.time()
            if stop_event.is_set():
                return
            this = kind if kind == PLAIN else rng.choices(mirror_kinds, mirror_weights)[0]
            self.values["sent"].value += 1
            self.values["in_flight"].value += 1
            await self.one(this, instance, sched, rng)

    async def one(self, kind, instance, sched, rng):
        try:
            if kind == PLAIN:
                await self.plain(instance, sched, rng)
            elif kind == WEBSOCKET:
                await self.websocket(instance, sched, rng)
            else:
                await self.upload(instance, sched, rng)
        finally:
            self.values["in_flight"].value -= 1

    def record(self, rec):
        self.values["done"].value += 1
        if rec.failed:
            self.values["failed"].value += 1
        self.writer.writerow(rec.row())

    async def exchange(self, rec, method, path, check, body=None, headers=None):
        """One HTTP/1.1 exchange on a new connection (Connection: close) into `rec`;
        check(status, body) returns an error text or None. Returns the body."""
        import asyncio
        t0 = time.perf_counter()
        data = None
        try:
            status, data, head = await asyncio.wait_for(
                self._http(host_of(rec.instance), method, path, body, headers, t0), REQUEST_TIMEOUT)
            rec.status, rec.latency = status, head
            rec.error = check(status, data)
        except Exception as e:  # noqa: BLE001 - every failure is recorded
            rec.error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
        rec.duration = time.perf_counter() - t0
        if rec.latency is None:
            rec.latency = rec.duration
        self.record(rec)
        return data

    async def _http(self, host, method, path, body, headers, t0):
        import asyncio
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
                     "User-Agent: tenement-soak"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            if body:
                writer.write(body)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            t_head = time.perf_counter() - t0
            status, fields = _parse_head(head)
            if method == "HEAD" or status in (204, 304):
                data = b""
            elif "content-length" in fields:
                data = await reader.readexactly(int(fields["content-length"]))
            elif "chunked" in fields.get("transfer-encoding", "").lower():
                data = await _read_chunked(reader)
            else:
                data = await reader.read()
            return status, data, t_head
        finally:
            writer.close()

    async def plain(self, instance, sched, rng):
        token = self.tokens.get(instance)
        if token is None:
            rec = Record(PLAIN, "GET /token", instance, sched, time.time())
            body = await self.exchange(rec, "GET", "/token", lambda s, b: None if s == 200 and len(b.strip()) == 64
                                       else f"status {s}: {b[:100]!r}")
            if rec.failed:
                return
            token = body.decode().strip()
            self.tokens[instance] = token
            sched = time.time()
        auth = {"Authorization": f"Bearer {token}"}
        roll = rng.random()
        rec = Record(PLAIN, "", instance, sched, time.time())
        if roll < 0.45:
            rec.op = "POST /notes"
            text = f"soak note {rng.randrange(1 << 30)}"
            await self.exchange(rec, "POST", "/notes", lambda s, b: None if s == 201 and b.startswith(b'{"id":')
                                else f"status {s}: {b[:100]!r}", body=text.encode(), headers=auth)
        elif roll < 0.90:
            rec.op = "GET /notes"
            await self.exchange(rec, "GET", "/notes", lambda s, b: None if s == 200 and b.startswith(b"[")
                                else f"status {s}: {b[:100]!r}", headers=auth)
        else:
            rec.op = "GET /health"
            tenant = instance.split(":")[1]
            await self.exchange(rec, "GET", "/health",
                                lambda s, b: None if s == 200 and f'"tenant":"{tenant}"'.encode() in b
                                else f"status {s}: {b[:100]!r}")

    async def upload(self, instance, sched, rng):
        body, digest = rng.choice(self.payloads.bodies)
        rec = Record(UPLOAD, f"POST /upload {len(body) // MIB} MiB", instance, sched, time.time())
        expected = f"{len(body)} {digest}".encode()
        await self.exchange(rec, "POST", "/upload", lambda s, b: None if s == 200 and b.strip() == expected
                            else f"status {s}: {b[:100]!r}", body=body,
                            headers={"Content-Type": "application/octet-stream"})

    async def websocket(self, instance, sched, rng):
        import asyncio
        rec = Record(WEBSOCKET, "GET /upgrade", instance, sched, time.time())
        t0 = time.perf_counter()
        hold = rng.uniform(*self.ws_hold)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), REQUEST_TIMEOUT)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write((f"GET /upgrade HTTP/1.1\r\nHost: {host_of(instance)}\r\nUser-Agent: tenement-soak\r\n"
                          f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            rec.latency = time.perf_counter() - t0
            rec.status, fields = _parse_head(head)
            if rec.status != 101:
                first = head.split(b"\r\n", 1)[0]
                raise ValueError(f"status {rec.status}: {first!r}")
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            if fields.get("sec-websocket-accept") != accept:
                raise ValueError(f"bad Sec-WebSocket-Accept {fields.get('sec-websocket-accept')!r}")
            until = time.perf_counter() + hold
            n = 0
            while True:
                frame = _ws_frame(f"soak {n} {instance}".encode())
                writer.write(frame)
                echo = await asyncio.wait_for(reader.readexactly(len(frame)), 30)
                if echo != frame:
                    raise ValueError(f"echo {n} differs")
                n += 1
                left = until - time.perf_counter()
                if left <= 0:
                    break
                await asyncio.sleep(min(self.ws_every, left))
            close = _ws_frame(struct.pack(">H", 1000), opcode=0x8)
            writer.write(close)
            if await asyncio.wait_for(reader.readexactly(len(close)), 30) != close:
                raise ValueError("close frame echo differs")
            writer.write_eof()
            if await asyncio.wait_for(reader.read(1), 10):
                raise ValueError("bytes after the close frame")
        except asyncio.IncompleteReadError as e:
            rec.error = f"IncompleteReadError: closed after {len(e.partial)} of {e.expected} bytes"
        except Exception as e:  # noqa: BLE001 - every failure is recorded
            rec.error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
        finally:
            if writer is not None:
                writer.close()
        rec.duration = time.perf_counter() - t0
        if rec.latency is None:
            rec.latency = rec.duration
        self.record(rec)


def _parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if sep:
            fields[k.strip().lower()] = v.strip()
    return status, fields


async def _read_chunked(reader):
    out = b""
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return out
        out += await reader.readexactly(size)
        await reader.readline()


class ProcessScanner(threading.Thread):
    """Watches /proc for the sandbox's instance processes, from the outside.

    An app is a process whose environment has TENEMENT_INSTANCE and a TENEMENT_DATA_DIR inside
    the sandbox; a helper (tenement-exec, cloned by the exec server) one whose
    TENEMENT_EXEC_SERVER_OF names the sandbox's state directory and whose name (comm) is
    tenement-exec (the server itself is tenement-execd). A
    process is classified when first seen, again during its first 2 s (it may not have exec'd
    yet), and again when its name (comm) changes: the helper's child is a copy of the helper
    until it execs the app. After 2 s only processes classified as the sandbox's are re-read
    (state, parent, name), so a scan is cheap. Zombies (state Z or X) have exited and do not count.

    Each scan groups live apps by instance: two or more at once is a duplicate, recorded in
    `duplicates` (time, instance, [(pid, start time), ...]) once per distinct set."""

    def __init__(self, sandbox_dir, period=0.05):
        super().__init__(daemon=True, name="scanner")
        self.marker = sandbox_dir.encode()
        self.period = period
        self.cache = {}  # pid -> [first_seen, role or None, instance, start, comm]
        self.live = {}   # pid -> dict(role, instance, start, ppid, state)
        self.lock = threading.Lock()
        self.duplicates = []
        self._dup_seen = set()
        self.app_starts = {}  # (pid, start) -> (instance, first seen, last seen)
        self.scans = 0
        self.peak_apps = 0  # most live apps in one scan; reset by whoever reads it
        self.stopping = threading.Event()

    def classify(self, pid):
        env = proc_environ(pid)
        if not env:
            return None, None
        data_dir = env.get(b"TENEMENT_DATA_DIR", b"")
        if b"TENEMENT_INSTANCE" in env and data_dir.startswith(self.marker):
            return "app", env[b"TENEMENT_INSTANCE"].decode()
        if self.marker in env.get(b"TENEMENT_EXEC_SERVER_OF", b""):
            try:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    comm = f.read().strip()
            except OSError:
                return None, None
            if comm == b"tenement-exec":
                return "helper", "?"
        return None, None

    def scan(self):
        now = time.time()
        pids = [int(x) for x in os.listdir("/proc") if x.isdigit()]
        seen = set(pids)
        for gone in [pid for pid in self.cache if pid not in seen]:
            del self.cache[gone]
        live = {}
        for pid in pids:
            entry = self.cache.get(pid)
            if entry is not None and entry[1] is None and now - entry[0] >= 2.0:
                continue  # not the sandbox's, and old enough to have exec'd whatever it runs
            st = proc_stat(pid)
            if st is None:
                continue
            # New, young, or a sandbox process whose program changed (exec: the helper's child
            # becomes the app) or whose pid was recycled: (re)classify.
            if entry is None or entry[1] is None or st[2] != entry[3] or st[3] != entry[4]:
                role, instance = self.classify(pid)
                if entry is None or st[2] != entry[3]:
                    entry = self.cache[pid] = [now, role, instance, st[2], st[3]]
                else:
                    entry[1], entry[2], entry[4] = role, instance, st[3]
            if entry[1] is None or st[0] in ("Z", "X"):
                continue
            live[pid] = {"role": entry[1], "instance": entry[2], "start": entry[3], "ppid": st[1],
                         "state": st[0], "comm": st[3]}
        by_instance = collections.defaultdict(list)
        for pid, info in live.items():
            if info["role"] == "app":
                by_instance[info["instance"]].append((pid, info["start"]))
                key = (pid, info["start"])
                first = self.app_starts.get(key, (info["instance"], now, now))[1]
                self.app_starts[key] = (info["instance"], first, now)
        with self.lock:
            self.live = live
            self.scans += 1
            self.peak_apps = max(self.peak_apps, sum(len(v) for v in by_instance.values()))
            for instance, procs in by_instance.items():
                if len(procs) > 1:
                    key = (instance, tuple(sorted(procs)))
                    if key not in self._dup_seen:
                        self._dup_seen.add(key)
                        self.duplicates.append((now, instance, sorted(procs)))
        return live

    def run(self):
        while not self.stopping.is_set():
            try:
                self.scan()
            except Exception as e:  # noqa: BLE001 - keep watching
                print(f"scanner: {type(e).__name__}: {e}", file=sys.stderr)
            self.stopping.wait(self.period)

    def stop(self):
        self.stopping.set()
        self.join(5)

    def apps(self):
        """{pid: info} of the live apps, from the last scan."""
        with self.lock:
            return {pid: i for pid, i in self.live.items() if i["role"] == "app"}


def cpu_times():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def list_instances(rpc):
    """Every registered instance (RPC `list`, all frames)."""
    out = []
    for reply in rpc.call_all({"type": "list"}):
        if reply.get("type") != "instances":
            raise RuntimeError(f"list: {reply}")
        out.extend(reply["instances"])
    return out


class LogCounter:
    """Counts new lines in a growing file (a daemon's captured stderr)."""

    def __init__(self, path, needles=()):
        self.path = path
        self.offset = 0
        self.needles = needles
        self.lines = 0
        self.found = collections.Counter()
        self.partial = b""

    def poll(self):
        """New complete lines since the last poll (and the needle counts in them)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return 0
        self.offset += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        data = data[:cut]
        n = data.count(b"\n")
        self.lines += n
        for needle in self.needles:
            self.found[needle] += data.count(needle)
        return n


class InstanceLogCounter:
    """Lines the supervisor captured from the instances (the RPC `logs`, as `tenctl logs`
    shows them), counted per interval: each instance's tail is read and the lines stamped
    after the previous poll counted; a tail that is all new is read again twice as long."""

    def __init__(self, admin_path, instances):
        self.admin_path = admin_path
        self.instances = instances
        self.last_ms = int(time.time() * 1000)
        self.want = {i: 64 for i in instances}
        self.total = collections.Counter()  # instance -> lines captured since the start
        self.total_bytes = collections.Counter()

    def buffered(self):
        """What the supervisor holds now, estimated from the lines counted since the start: per
        instance at most 2000 lines and 512 KiB of text (supervisor/src/logs.rs)."""
        lines = text = 0
        for inst, n in self.total.items():
            keep = min(n, 2000)
            lines += keep
            text += min(512 * 1024, self.total_bytes[inst] * keep // max(1, n))
        return lines, text

    def poll(self):
        now_ms = int(time.time() * 1000)
        counts = collections.Counter()
        rpc = TimedRpc(self.admin_path, timeout=30)
        try:
            for inst in self.instances:
                n = self.want[inst]
                while True:
                    reply = rpc.call({"type": "logs", "instance": inst, "lines": n})
                    lines = reply.get("lines", [])
                    fresh = [ln for ln in lines if self.last_ms < ln["ts_ms"] <= now_ms]
                    if len(fresh) < len(lines) or len(lines) < n or n >= 2000:
                        break
                    n = min(2000, n * 2)
                self.want[inst] = max(64, n)
                self.total[inst] += len(fresh)
                self.total_bytes[inst] += sum(len(ln["line"]) for ln in fresh)
                for ln in fresh:
                    counts[ln["stream"]] += 1
                    if ln["stream"] == "event" and ln["line"].startswith("started"):
                        counts["started"] += 1
        finally:
            rpc.close()
        interval = (now_ms - self.last_ms) / 1000
        self.last_ms = now_ms
        return counts, interval


class RpcPoller(threading.Thread):
    """Asks the supervisor, once per interval and apart from the /proc samples (under heavy load
    a sweep of hundreds of RPCs can take longer than the interval, and must not delay them):
    the instances' states (RPC `list`) and their captured log lines (InstanceLogCounter).
    `latest` holds the last completed sweep."""

    def __init__(self, admin_path, instances, interval):
        super().__init__(daemon=True, name="rpc-poller")
        self.admin_path, self.interval = admin_path, interval
        self.logs = InstanceLogCounter(admin_path, instances)
        self.latest = None
        self.sweeps = 0
        self.stopping = threading.Event()

    def run(self):
        start = time.time()
        while not self.stopping.is_set():
            began = time.time()
            try:
                rpc = TimedRpc(self.admin_path, timeout=60)
                states = collections.Counter(i["state"] for i in list_instances(rpc))
                rpc.close()
                counts, dt = self.logs.poll()
                lines = counts["stdout"] + counts["stderr"] + counts["event"]
                buffered, text = self.logs.buffered()
                self.latest = {"at": began, "took": time.time() - began, "states": states,
                               "buffered_lines": buffered, "buffered_text": text,
                               "lines_s": lines / dt, "stdout_s": counts["stdout"] / dt,
                               "stderr_s": counts["stderr"] / dt, "event_s": counts["event"] / dt,
                               "first": self.sweeps == 0}
                self.sweeps += 1
            except (OSError, ConnectionError, RuntimeError, ValueError) as e:
                print(f"rpc poller: {type(e).__name__}: {e}", file=sys.stderr)
            n = int((time.time() - start) / self.interval) + 1
            self.stopping.wait(max(0.0, start + n * self.interval - time.time()))

    def stop(self):
        self.stopping.set()


def growth(samples, key, ref_t):
    """Growth of samples[key] from ref_t to the end, three ways: `point`, the last sample
    against the first at or after ref_t (what the goal literally says, but fds and memory move
    with the number of instances running at that instant); `means`, the mean of the last window
    against the first (each a third of the span, at most 5 minutes); and `trend`, the least-squares
    line through every sample after ref_t, its rise over the span as a % of its value at ref_t
    (a leak shows as a steady rise, load noise averages out). The goal is judged on the trend."""
    after = [s for s in samples if s["t"] >= ref_t - 1e-6]
    if len(after) < 2:
        return None
    first, last = after[0][key], after[-1][key]
    span = after[-1]["t"] - after[0]["t"]
    window = min(300.0, span / 3) if span > 0 else 0
    w1 = [s[key] for s in after if s["t"] <= after[0]["t"] + window]
    w2 = [s[key] for s in after if s["t"] >= after[-1]["t"] - window]
    m1, m2 = sum(w1) / len(w1), sum(w2) / len(w2)
    xs = [s["t"] for s in after]
    ys = [s[key] for s in after]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    at_ref = my + slope * (xs[0] - mx)
    pct = lambda a, b: (b - a) / a * 100 if a else float("nan")  # noqa: E731
    return {"ref_t": after[0]["t"], "end_t": after[-1]["t"], "first": first, "last": last,
            "point_pct": pct(first, last), "window_s": window, "mean_first": m1, "mean_last": m2,
            "mean_pct": pct(m1, m2), "trend_pct": slope * span / at_ref * 100 if at_ref else float("nan"),
            "slope_per_h": slope * 3600, "max_after": max(ys), "min_after": min(ys)}


def nft_tables():
    """{table name: [(lo, hi), ...]} of the nftables tables named tenement_* and the port ranges
    their rules reject on; {} without nft. A supervisor as root keeps one such table (named after
    its runtime dir) and removes it at a clean stop; one left by a killed supervisor of someone
    else's run, over the ports a run uses and not trusting its proxy's uid, refuses the proxy's
    connections to the instances."""
    import re
    if shutil.which("nft") is None:
        return {}
    r = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    tables, name = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*table inet (tenement_\w+)", line)
        if m:
            name = m.group(1)
            tables.setdefault(name, [])
        elif name:
            for lo, hi in re.findall(r"dport (\d+)-(\d+)", line):
                tables[name].append((int(lo), int(hi)))
    return tables


def parse_range(text, kind):
    """(lo, hi) from "LO-HI" (or a single value)."""
    lo, _, hi = str(text).partition("-")
    return kind(lo), kind(hi or lo)


def port_range_of(text):
    lo, hi = (int(x) for x in text.split("-"))
    return lo, hi


def nft_overlaps(port_range):
    """Tables of tenement_* whose rules cover part of `port_range` ("LO-HI"), with the ranges."""
    lo, hi = port_range_of(port_range)
    return {t: rs for t, rs in nft_tables().items() if any(a <= hi and b >= lo for a, b in rs)}


def check_firewall(port_range):
    """Refuses to start over someone else's leftover table covering our ports."""
    foreign = nft_overlaps(port_range)
    if foreign:
        raise SystemExit(f"nftables tables {', '.join(sorted(foreign))} (left by another supervisor) cover ports "
                         f"of --port-range {port_range}: {foreign}; they would refuse the proxy's connections. "
                         f"Pick a free range with --port-range (in use: "
                         f"{sorted({r for rs in nft_tables().values() for r in rs})[:3]}...)")


def prepare_binaries(args):
    """Points the harness at --bin DIR (or builds this checkout), copies the binaries to a
    private directory, and returns the revision they were built from."""
    if args.bin:
        bin_dir = os.path.abspath(args.bin)
        missing = [b for b in ("tenement-supervisor", "tenement-exec", "tenement-proxy", "tenctl")
                   if not os.path.exists(os.path.join(bin_dir, b))]
        if missing:
            raise SystemExit(f"--bin {bin_dir}: missing {', '.join(missing)}")
        tenement_bench.RELEASE = bin_dir
        rev = args.revision or revision_of(bin_dir)
    else:
        if shutil.which("cargo") is None:
            raise SystemExit("cargo not found: build elsewhere and pass --bin DIR")
        if not args.no_build:
            tenement_bench.build()
        rev = args.revision or loadtools.revision()
    snapshot_binaries()
    return rev


def out_paths(name, rev):
    out_dir = os.path.join(HERE, "out")
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{name}-{rev}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_requests(path, records):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for r in sorted(records, key=lambda r: r.start):
            w.writerow(r.row())


def keep_daemon_logs(sb, dest):
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(sb.dir):
        if name.endswith(".log") or name.endswith(".toml"):
            with open(os.path.join(sb.dir, name), "rb") as src, gzip.open(os.path.join(dest, name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)


def request_summary(records, emit):
    """Prints requests sent / answered / failed by kind, the statuses, the failures' errors and
    latencies; returns the counts by kind."""
    by_kind = {}
    emit(f"{'kind':<10}{'requests':>9}{'answered':>9}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  statuses")
    for kind in KINDS + ("all",):
        rs = [r for r in records if kind in ("all", r.kind)]
        if not rs:
            continue
        answered = sum(1 for r in rs if r.status is not None)
        failed = sum(1 for r in rs if r.failed)
        statuses = collections.Counter(str(r.status) if r.status is not None else "none" for r in rs)
        lat = sorted(r.latency for r in rs if not r.failed)
        by_kind[kind] = {"requests": len(rs), "answered": answered, "failed": failed,
                         "statuses": dict(statuses),
                         "p50_ms": p(lat, 50) * 1000, "p99_ms": p(lat, 99) * 1000,
                         "max_ms": (lat[-1] * 1000 if lat else float("nan"))}
        emit(f"{kind:<10}{len(rs):>9}{answered:>9}{failed:>8}{p(lat, 50) * 1000:>9.1f}{p(lat, 99) * 1000:>9.1f}"
             f"{(lat[-1] * 1000 if lat else float('nan')):>9.1f}  "
             + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    emit("(latency: to the response head, the 101 for websockets; websockets are then held 2-6 s)")
    failures = [r for r in records if r.failed]
    if failures:
        kinds = collections.Counter((r.kind, r.status, r.error.split(":")[0]) for r in failures)
        emit("failures by kind, status and error:")
        for (kind, status, err), n in kinds.most_common():
            emit(f"  {n:>6} x {kind} {status} {err}")
    return by_kind


def add_load_arguments(ap, tenants, mirror_tenants, rate):
    """The tenants and the traffic, shared with chaos.py (which has other defaults)."""
    mirror_default = "tenants/10" if mirror_tenants is None else mirror_tenants
    ap.add_argument("--tenants", type=int, default=tenants, help=f"notes tenants (default {tenants})")
    ap.add_argument("--mirror-tenants", type=int, default=mirror_tenants,
                    help=f"mirror tenants (default {mirror_default})")
    ap.add_argument("--rate", type=float, default=rate,
                    help=f"sessions per second (default {rate:g}; a session is ~7 requests)")
    ap.add_argument("--session", default="2-12", help="requests per session, a range (default 2-12; 1-1: "
                    "single requests)")
    ap.add_argument("--gap", default="0.5-4", help="seconds between a session's requests, a range (default 0.5-4)")
    ap.add_argument("--websocket-share", type=float, default=0.05)
    ap.add_argument("--upload-share", type=float, default=0.05)
    ap.add_argument("--idle-timeout", default="5s")
    ap.add_argument("--port-range", default="13000-13999",
                    help="instances' ports (default 13000-13999, away from the tests' 20000-31999)")


def add_run_arguments(ap):
    """Seed and binaries, shared with chaos.py."""
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", help="directory with prebuilt binaries (default: build this checkout)")
    ap.add_argument("--revision", help="what to call the binaries' revision in the report")
    ap.add_argument("--no-build", action="store_true")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", default="1h", help="1h, 5m, 90s or seconds (default 1h)")
    add_load_arguments(ap, tenants=200, mirror_tenants=None, rate=4.0)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30)")
    add_run_arguments(ap)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: needs root (the proxy drops to nobody)")
    duration = parse_duration(args.duration)
    session, gap = parse_range(args.session, int), parse_range(args.gap, float)
    mirrors = args.mirror_tenants if args.mirror_tenants is not None else max(1, args.tenants // 10)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    shares = {PLAIN: 1 - args.websocket_share - args.upload_share, WEBSOCKET: args.websocket_share,
              UPLOAD: args.upload_share}
    rev = prepare_binaries(args)
    base = out_paths("soak", rev)
    report = open(base + ".txt", "w")

    def emit(text=""):
        print(text, flush=True)
        report.write(text + "\n")

    ref_t = 300.0 if duration >= 600 else duration / 2
    check_firewall(args.port_range)
    sb = loadtools.proxied_sandbox(services_toml(args.idle_timeout), args.port_range)
    samples = []
    load = scanner = None
    try:
        notes = [f"notes:{i}" for i in notes_ids(args.tenants)]
        mirror = [f"mirror:{i}" for i in mirror_ids(mirrors)]
        admin_path = os.path.join(sb.dir, "run", "admin.sock")
        rpc = TimedRpc(admin_path)
        for batch in range(0, len(notes + mirror), 500):
            reply = rpc.call({"type": "add", "instances": (notes + mirror)[batch:batch + 500]})
            if reply.get("type") != "added":
                raise RuntimeError(f"add: {reply}")
        rpc.close()
        emit(f"# soak: {len(notes)} notes + {len(mirror)} mirror tenants, idle_timeout {args.idle_timeout}, "
             f"{args.rate:g} sessions/s of {args.session} requests {args.gap} s apart (plain {shares[PLAIN]:.0%}, "
             f"websocket {shares[WEBSOCKET]:.0%}, upload {shares[UPLOAD]:.0%}), {duration:.0f} s, sample every "
             f"{args.interval:g} s, seed {seed}")
        emit(f"# {machine()}; binaries {rev}; sandbox {sb.dir}; reference for growth t={ref_t:.0f} s")
        sup_log = LogCounter(os.path.join(sb.dir, "supervisor.log"), needles=(b"started (pid",))
        proxy_log = LogCounter(os.path.join(sb.dir, "proxy.log"))
        sup_log.poll(), proxy_log.poll()
        scanner = ProcessScanner(sb.dir, period=0.5)
        scanner.start()
        poller = RpcPoller(admin_path, notes + mirror, args.interval)
        load = Load(sb.proxy_port, notes, mirror, args.rate, shares, seed, session=session, gap=gap)
        ovf0 = listen_overflows()
        t0 = time.time()
        load.start()
        poller.start()
        emit(f"{'t s':>6} {'sup MiB':>7} {'anon':>5} {'fds':>5} {'thr':>3} | {'proxy MiB':>9} {'anon':>5} "
             f"{'fds':>5} {'thr':>3} | {'registry B':>10} | {'log/s sup':>9} {'proxy':>6} {'inst':>6} | "
             f"{'running':>7} {'stopped':>7} {'other':>5} {'apps':>5} | {'wakes/s':>7} | "
             f"{'sent':>7} {'failed':>6} {'in flight':>9} | {'cpu %':>5} {'load':>5}")
        last_t = t0
        prev_wakes = 0
        cpu_prev = cpu_times()
        next_t = t0
        while True:
            now = time.time()
            if now < next_t:
                time.sleep(min(1.0, next_t - now))
                continue
            t = now - t0
            sup, prox = proc_stats(sb.supervisor.pid), proc_stats(sb.proxy.pid)
            if sup is None or prox is None:
                raise RuntimeError(f"a daemon died: supervisor {sb.supervisor.poll()}, proxy {sb.proxy.poll()}")
            reg = os.path.getsize(os.path.join(sb.dir, "state", "registry.json"))
            cpu = cpu_times()
            busy = (cpu[0] - cpu_prev[0]) / max(1, cpu[1] - cpu_prev[1]) * 100
            cpu_prev = cpu
            load1 = os.getloadavg()[0]
            sent, answered, failed, in_flight = load.counts()
            apps = len(scanner.apps())
            dt = max(1e-3, now - last_t)
            sup_lines, proxy_lines = sup_log.poll(), proxy_log.poll()
            wakes = sup_log.found[b"started (pid"]
            peak = scanner.peak_apps
            scanner.peak_apps = apps
            rpcs = poller.latest or {"states": {}, "lines_s": 0.0, "stdout_s": 0.0, "stderr_s": 0.0,
                                     "event_s": 0.0, "took": 0.0, "first": True, "buffered_lines": 0,
                                     "buffered_text": 0}
            states = rpcs["states"]
            first = not samples
            rate = lambda n, d=dt: 0.0 if first else round(n / d, 2)  # noqa: E731
            irate = lambda k: 0.0 if rpcs["first"] else round(rpcs[k], 2)  # noqa: E731
            row = {
                "t": round(t, 1), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                "sup_rss_kib": sup["rss_kib"], "sup_anon_kib": sup["anon_kib"], "sup_fds": sup["fds"],
                "sup_threads": sup["threads"], "proxy_rss_kib": prox["rss_kib"], "proxy_anon_kib": prox["anon_kib"],
                "proxy_fds": prox["fds"], "proxy_threads": prox["threads"], "registry_bytes": reg,
                "sup_log_lines_s": rate(sup_lines), "proxy_log_lines_s": rate(proxy_lines),
                "instance_log_lines_s": irate("lines_s"), "instance_stdout_s": irate("stdout_s"),
                "instance_stderr_s": irate("stderr_s"), "instance_event_s": irate("event_s"),
                "log_buffered_lines_est": rpcs["buffered_lines"], "log_buffered_text_kib_est": rpcs["buffered_text"] // 1024,
                "running": states.get("running", 0), "stopped": states.get("stopped", 0),
                "other_states": sum(v for k, v in states.items() if k not in ("running", "stopped")),
                "app_processes": apps, "peak_apps": peak, "wakes_total": wakes, "wakes_s": rate(wakes - prev_wakes),
                "sent": sent, "answered": answered, "failed": failed, "in_flight": in_flight,
                "rpc_sweep_s": round(rpcs["took"], 2), "machine_cpu_busy_pct": round(busy, 1),
                "machine_load1": round(load1, 2),
            }
            samples.append(row)
            prev_wakes = wakes
            last_t = now
            emit(f"{t:>6.0f} {sup['rss_kib'] / 1024:>7.1f} {sup['anon_kib'] / 1024:>5.1f} {sup['fds']:>5} "
                 f"{sup['threads']:>3} | {prox['rss_kib'] / 1024:>9.1f} {prox['anon_kib'] / 1024:>5.1f} "
                 f"{prox['fds']:>5} {prox['threads']:>3} | {reg:>10} | {row['sup_log_lines_s']:>9.1f} "
                 f"{row['proxy_log_lines_s']:>6.1f} {row['instance_log_lines_s']:>6.1f} | {row['running']:>7} "
                 f"{row['stopped']:>7} {row['other_states']:>5} {apps:>5} | {row['wakes_s']:>7.1f} | "
                 f"{sent:>7} {failed:>6} {in_flight:>9} | {busy:>5.0f} {load1:>5.1f}")
            if t >= duration - 0.5:
                break
            # The next slot in the future: a late sample is not followed by a burst of catch-ups.
            next_t = t0 + args.interval * (int((time.time() - t0) / args.interval) + 1)
        load.stop()
        poller.stop()
        records = load.records()
        ovf = [a - b for a, b in zip(listen_overflows(), ovf0)]
        scanner.stop()
        tables_running = nft_overlaps(args.port_range)
        for proc in reversed(sb.procs):  # a clean stop, as systemctl stop would
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        tables_stopped = nft_overlaps(args.port_range)
        sup_log.poll()

        emit()
        emit(f"## requests ({load.stopped - t0:.0f} s)")
        by_kind = request_summary(records, emit)
        lags = sorted(r.start - r.sched for r in records)
        emit(f"client lag (scheduled to sent): p50 {p(lags, 50) * 1000:.1f} ms, p99 {p(lags, 99) * 1000:.1f} ms, "
             f"max {lags[-1] * 1000:.0f} ms; SYN drops (ListenOverflows, ListenDrops): {ovf}")
        wakes = sup_log.found[b"started (pid"]
        # States come from the RPC sweep, one interval behind: skip the samples before the first.
        running = [s["running"] for s in samples if s["t"] >= 2 * args.interval - 1] or [0]
        total = len(notes) + len(mirror)
        emit(f"wakes: {wakes} (supervisor 'started' lines), {wakes / (load.stopped - t0):.1f}/s; instances running "
             f"per sample: mean {sum(running) / len(running):.0f} of {total} ({sum(running) / len(running) / total:.0%}), "
             f"min {min(running)}, max {max(running)}")
        busy = [s["machine_cpu_busy_pct"] for s in samples[1:]] or [0]
        emit(f"machine (everything on it, the other engineer's work included): CPU busy per sample median "
             f"{median(busy):.0f} %, min {min(busy):.0f} %, max {max(busy):.0f} %; load average 1 min median "
             f"{median([s['machine_load1'] for s in samples[1:]] or [0]):.1f}")
        emit(f"duplicates (two processes of one instance at once, /proc every 0.5 s, {scanner.scans} scans): "
             f"{len(scanner.duplicates)}")
        for d in scanner.duplicates[:10]:
            emit(f"  {time.strftime('%H:%M:%S', time.localtime(d[0]))} {d[1]}: {d[2]}")

        emit()
        emit(f"## growth from t={ref_t:.0f} s to the end (point: last sample against the first; means: last "
             f"window against the first; trend: least-squares line over all samples, judged against the goal)")
        emit(f"{'figure':<20}{'at ref':>9}{'at end':>9}{'point':>8}{'mean 1st':>9}{'mean last':>10}{'means':>8}"
             f"{'trend':>8}{'min':>8}{'max':>8}  goal (trend)")
        grow = {}
        goals = []
        for key, label, scale in (("sup_rss_kib", "supervisor RSS MiB", 1024), ("sup_anon_kib", "supervisor anon MiB", 1024),
                                  ("sup_fds", "supervisor fds", 1), ("sup_threads", "supervisor threads", 1),
                                  ("proxy_rss_kib", "proxy RSS MiB", 1024), ("proxy_anon_kib", "proxy anon MiB", 1024),
                                  ("proxy_fds", "proxy fds", 1), ("proxy_threads", "proxy threads", 1),
                                  ("registry_bytes", "registry bytes", 1), ("running", "instances running", 1)):
            g = growth(samples, key, ref_t)
            if g is None:
                continue
            grow[key] = g
            verdict = ""
            if key in ("sup_rss_kib", "sup_fds", "proxy_rss_kib", "proxy_fds"):
                ok = g["trend_pct"] <= GOAL_GROWTH
                verdict = f"<= +{GOAL_GROWTH:g} %: {'met' if ok else 'MISSED'}"
                goals.append((label, g, ok))
            emit(f"{label:<20}{g['first'] / scale:>9.1f}{g['last'] / scale:>9.1f}{g['point_pct']:>+7.1f}%"
                 f"{g['mean_first'] / scale:>9.1f}{g['mean_last'] / scale:>10.1f}{g['mean_pct']:>+7.1f}%"
                 f"{g['trend_pct']:>+7.1f}%{g['min_after'] / scale:>8.1f}{g['max_after'] / scale:>8.1f}  {verdict}")
        lb = [s for s in samples if s["t"] >= ref_t - 1e-6]
        if len(lb) >= 2:
            emit(f"instance output the supervisor keeps (estimated from the lines counted: at most 2000 lines and "
                 f"512 KiB of text per instance): {lb[0]['log_buffered_lines_est']} lines, "
                 f"{lb[0]['log_buffered_text_kib_est'] / 1024:.1f} MiB of text at t={lb[0]['t']:.0f} s -> "
                 f"{lb[-1]['log_buffered_lines_est']} lines, {lb[-1]['log_buffered_text_kib_est'] / 1024:.1f} MiB at "
                 f"t={lb[-1]['t']:.0f} s (bounded by design; it grows until every instance's buffer is full)")
        rates = {k: [s[k] for s in samples[1:]] for k in ("sup_log_lines_s", "proxy_log_lines_s", "instance_log_lines_s")}
        emit("log lines/s (median of the samples): supervisor stderr "
             + f"{median(rates['sup_log_lines_s']):.1f}, proxy stderr {median(rates['proxy_log_lines_s']):.2f}, "
             + f"instances (captured by the supervisor, RPC logs) {median(rates['instance_log_lines_s']):.1f}")
        emit()
        failed_total = sum(1 for r in records if r.failed)
        emit(f"goal: 0 failed requests: {failed_total} failed of {len(records)}, "
             f"{'met' if failed_total == 0 else 'MISSED'}")
        for label, g, ok in goals:
            emit(f"goal: {label} growth t={g['ref_t']:.0f} s -> t={g['end_t']:.0f} s <= +{GOAL_GROWTH:g} %: "
                 f"trend {g['trend_pct']:+.1f} %, {'met' if ok else 'MISSED'} (point {g['first']:.0f} -> "
                 f"{g['last']:.0f} {g['point_pct']:+.1f} %, window means {g['mean_pct']:+.1f} %)")
        emit(f"check: no instance ran twice at once: {'yes' if not scanner.duplicates else 'NO'}")
        if shutil.which("nft"):
            emit(f"check: nftables tables over the port range: {len(tables_running)} while running "
                 f"({', '.join(tables_running) or 'none'}), {len(tables_stopped)} after SIGTERM to the "
                 f"supervisor: {'yes' if len(tables_running) <= 1 and not tables_stopped else 'NO'}")

        result = {"script": "soak.py", "revision": rev, "machine": machine(), "argv": sys.argv[1:],
                  "seed": seed, "duration_s": duration, "ref_t": ref_t, "tenants": len(notes),
                  "mirror_tenants": len(mirror), "sessions_per_s": args.rate, "session": session, "gap": gap,
                  "shares": shares, "samples": samples,
                  "requests": by_kind, "wakes": wakes, "growth": grow, "syn_drops": ovf,
                  "duplicates": scanner.duplicates, "nft_running": tables_running, "nft_stopped": tables_stopped,
                  "failures": [dict(zip(CSV_HEADER, r.row())) for r in records if r.failed][:1000]}
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(samples[0]))
            w.writeheader()
            w.writerows(samples)
        write_requests(base + "-requests.csv.gz", records)
        keep_daemon_logs(sb, base + "-logs")
        emit(f"results: {os.path.relpath(base, os.getcwd())}.{{txt,json,csv}}, -requests.csv.gz, -logs/")
        return 0 if failed_total == 0 and all(ok for _, _, ok in goals) and not scanner.duplicates else 1
    except BaseException:
        if samples or load:
            keep_daemon_logs(sb, base + "-logs")
            print(f"logs kept in {base}-logs", file=sys.stderr)
        raise
    finally:
        if load and not load.stopping.is_set():
            load.stop(drain=0)
        if scanner:
            scanner.stop()
        report.close()
        sb.close()


if __name__ == "__main__":
    sys.exit(main())
