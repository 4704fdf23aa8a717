# notes: the demo app from tenement's README. A tiny single-tenant notes service that knows
# nothing about tenants: tenement runs one copy per tenant and gives each its own DATA_DIR.
#
# Contract (the same for any app tenement runs), first match wins for listening:
#   LISTEN_FDS=1 + LISTEN_PID=<this pid>  serve on the inherited socket, fd 3 (socket activation)
#   SOCKET_PATH=/path                     bind this Unix stream socket
#   HOST (127.0.0.1) and PORT (8000)      bind TCP
#   DATA_DIR (./data)                     notes live in $DATA_DIR/notes.db (SQLite)
#   NOTIFY_SOCKET                         gets READY=1 once listening (sd_notify protocol)
#
# Routes: GET /health, GET /token, GET and POST /notes (Authorization: Bearer <token>), GET /.
# The whole contract, shared with notes-node and notes-go: examples/README.md.
# Python 3.11 standard library only; imports are kept to what start-up needs.
import json
import os
import signal
import socket
import socketserver
import sqlite3
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A constant-time comparison without importing hmac, which pulls in hashlib and OpenSSL at
# start-up (python3 -X importtime -c "import hmac" shows the cost); hmac.compare_digest is
# this function or OpenSSL's equivalent.
from _operator import _compare_digest as compare_digest

MAX_BODY = 64 * 1024  # bytes; a note is text, not an upload
RUNTIME = "python"
HELP = """notes: a single-tenant notes service (examples/README.md)
GET  /health  status, runtime, service and tenant (JSON)
GET  /token   this tenant's bearer token
GET  /notes   the notes (JSON); needs Authorization: Bearer <token>
POST /notes   add the body as a note; needs Authorization: Bearer <token>
"""
# Path -> methods it answers; anything else is 404, or 405 with Allow.
ROUTES = {
    "/": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
    "/token": ("GET", "HEAD"),
    "/notes": ("GET", "HEAD", "POST"),
}


def to_json(value):
    """Compact JSON and a newline, the shape notes-node and notes-go send."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"


def load_token(data_dir):
    """This tenant's bearer token: made once, kept in $DATA_DIR/token (0600, atomic)."""
    path = os.path.join(data_dir, "token")
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            token = f.read().strip()
        if len(token) == 64 and all(c in "0123456789abcdef" for c in token):
            return token
    except FileNotFoundError:
        pass
    token = os.urandom(32).hex()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return token


class NotesStore:
    """The notes database. One connection per call: sqlite3 connections are per thread."""

    def __init__(self, data_dir):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "notes.db")
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent; readers never block the writer
            with db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS notes ("
                    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
                    " text TEXT NOT NULL,"
                    " created TEXT NOT NULL)"
                )
        finally:
            db.close()

    def _connect(self):
        return sqlite3.connect(self.path, timeout=5)

    def add(self, text):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        db = self._connect()
        try:
            with db:
                cur = db.execute(
                    "INSERT INTO notes (text, created) VALUES (?, ?)", (text, created)
                )
            return cur.lastrowid
        finally:
            db.close()

    def all(self):
        db = self._connect()
        try:
            rows = db.execute("SELECT id, text, created FROM notes ORDER BY id").fetchall()
        finally:
            db.close()
        return [{"id": i, "text": t, "created": c} for (i, t, c) in rows]


class HttpError(Exception):
    """An answer other than success: status, one-line message, extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class Handler(BaseHTTPRequestHandler):
    server_version = "notes/1"
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    # Headers and body go out in two writes; without TCP_NODELAY the second waits for the
    # peer's delayed ACK (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def __getattr__(self, name):
        # http.server looks up do_<METHOD>: every method goes through the router, which
        # answers 404 or 405 with Allow for those a path does not take.
        if name.startswith("do_"):
            return self._run
        raise AttributeError(name)

    def send_error(self, code, message=None, explain=None):
        # What http.server itself refuses (a bad request line, an unknown method, huge
        # headers) gets the same one-line text as everything else, not an HTML page.
        self.close_connection = True
        short = message or self.responses.get(code, ("error",))[0]
        self._send(code, f"{short.lower()}\n")

    def _run(self):
        # Never let an exception reach the client as a traceback: log it, answer 500.
        self.body_read = False
        has_body = self.headers.get("Content-Length", "0") not in ("", "0") or bool(
            self.headers.get("Transfer-Encoding")
        )
        if has_body and (self.command, self.path.split("?", 1)[0]) != ("POST", "/notes"):
            # Only a new note's body is read; any other would be parsed as the next request
            # on this connection (behind a proxy, somebody else's).
            self.close_connection = True
        try:
            self._route(self.path.split("?", 1)[0])
        except HttpError as err:
            if has_body and not self.body_read:
                self.close_connection = True  # a refused note's body was never read
            self._send(err.status, f"{err}\n", extra=err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - last line of defence
            print(f"error: {self.command} {self.path}: {err!r}", file=sys.stderr, flush=True)
            try:
                self._send(500, "internal error\n")
            except OSError:
                self.close_connection = True

    def _route(self, path):
        methods = ROUTES.get(path)
        if methods is None or self.command not in methods:
            if methods is None:
                raise HttpError(404, "not found")
            raise HttpError(405, "method not allowed", {"Allow": ", ".join(methods)})
        if path == "/health":
            body = {
                "status": "ok",
                "runtime": RUNTIME,
                "service": os.environ.get("TENEMENT_SERVICE"),
                "tenant": os.environ.get("TENEMENT_ID"),
            }
            self._send(200, to_json(body), "application/json")
        elif path == "/token":
            self._send(200, self.server.token + "\n")
        elif path == "/":
            self._send(200, HELP)
        elif self.command == "POST":
            self._authenticate()
            self._add_note()
        else:
            self._authenticate()
            self._send(200, to_json(self.server.store.all()), "application/json")

    def _authenticate(self):
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                401,
                "authorization required: Authorization: Bearer <token from /token>",
                {"WWW-Authenticate": 'Bearer realm="notes"'},
            )
        given = token.strip().encode("utf-8", "replace")
        if not compare_digest(given, self.server.token.encode("ascii")):
            raise HttpError(403, "this token does not open these notes")

    def _add_note(self):
        raw = self._read_body()
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise HttpError(400, "the note must be UTF-8 text") from None
        if not text:
            raise HttpError(400, "empty note; send the text as the request body")
        note_id = self.server.store.add(text)
        self._send(
            201,
            to_json({"id": note_id}),
            "application/json",
            {"Location": f"/notes/{note_id}"},
        )

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(400, "chunked bodies are not supported; send Content-Length")
        value = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(value)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length")
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be parsed as a request
            raise HttpError(413, f"note too large (max {MAX_BODY} bytes)")
        self.body_read = True
        return self.rfile.read(length)

    def _send(self, status, body, content_type="text/plain; charset=utf-8", extra=None):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        # One line per request on stdout, flushed so tenement's log capture sees it at once.
        print(f"{self.address_string()} {format % args}", flush=True)

    def address_string(self):
        # Over a Unix socket client_address is '' (not a (host, port) tuple).
        if isinstance(self.client_address, tuple) and self.client_address:
            return str(self.client_address[0])
        return "unix"


class NotesServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of new connections beyond it is
    # dropped by the kernel and retried by clients a second later.
    request_queue_size = 128

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (getfqdn), which can take seconds
        # without DNS; the app never needs it.
        socketserver.TCPServer.server_bind(self)  # SO_REUSEADDR, bind
        self.server_name, self.server_port = self.server_address[:2]


class UnixNotesServer(NotesServer):
    address_family = socket.AF_UNIX

    def server_bind(self):
        # Skip HTTPServer.server_bind: it expects a (host, port) address.
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def make_server():
    """Picks the listener in the contract's order.

    Returns (server, description, path of a socket file we created or None).
    """
    if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)  # do not leak them to anything we might run
        sock = socket.socket(fileno=3)
        cls = UnixNotesServer if sock.family == socket.AF_UNIX else NotesServer
        if sock.family == socket.AF_INET6:
            cls = type("NotesServer6", (NotesServer,), {"address_family": socket.AF_INET6})
        server = cls(sock.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        if cls is not UnixNotesServer:
            host, port = sock.getsockname()[:2]
            server.server_name, server.server_port = host, port
        return server, f"fd 3 ({describe(sock)})", None

    path = os.environ.get("SOCKET_PATH")
    if path:
        try:
            os.unlink(path)  # a stale socket from a previous run
        except FileNotFoundError:
            pass
        return UnixNotesServer(path, Handler), f"unix:{path}", path

    host = os.environ.get("HOST", "127.0.0.1")
    try:
        port = int(os.environ.get("PORT", "8000"))
    except ValueError:
        raise SystemExit(f"notes: PORT must be a number, got {os.environ['PORT']!r}") from None
    if ":" in host:
        cls = type("NotesServer6", (NotesServer,), {"address_family": socket.AF_INET6})
    else:
        cls = NotesServer
    server = cls((host, port), Handler)
    return server, describe(server.socket), None


def describe(sock):
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return f"{name[0]}:{name[1]}"


def notify_ready():
    """sd_notify(READY=1): a datagram to $NOTIFY_SOCKET; '@name' is an abstract socket."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)
    except OSError as err:
        print(f"notes: cannot notify {target}: {err}", file=sys.stderr, flush=True)


class Stop(BaseException):
    """Raised in the main thread by the SIGTERM handler to leave serve_forever at once. A
    BaseException, so socketserver's per-request `except Exception` cannot swallow it."""


def on_term(signum, frame):
    # Raising here interrupts serve_forever's select immediately; server.shutdown() would
    # wait up to a poll interval, and a short interval would wake idle instances for nothing.
    raise Stop


def main():
    signal.signal(signal.SIGTERM, on_term)
    data_dir = os.environ.get("DATA_DIR", "./data")
    store = NotesStore(data_dir)
    token = load_token(data_dir)
    server, where, socket_file = make_server()
    server.store = store
    server.token = token
    print(f"notes listening on {where} (data in {store.path})", flush=True)
    notify_ready()
    try:
        server.serve_forever(poll_interval=3600)
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        if socket_file:
            try:
                os.unlink(socket_file)
            except OSError:
                pass
    print("notes stopped", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stop:  # SIGTERM before the server was up
        sys.exit(0)
    except (OSError, sqlite3.Error) as err:
        print(f"notes: cannot start: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
