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
# Routes: GET /health, GET / (HTML, or plain text for curl), POST /notes, GET /notes (JSON).
# Python 3.11 standard library only; imports are kept to what start-up needs.
import os
import signal
import socket
import socketserver
import sqlite3
import sys
import time
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

MAX_BODY = 64 * 1024  # bytes; a note is text, not an upload


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


class BadRequest(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    server_version = "notes/1"
    protocol_version = "HTTP/1.1"  # keep-alive; every response sets Content-Length
    # Headers and body go out in two writes; without TCP_NODELAY the second waits for the
    # peer's delayed ACK (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self):
        self._run(self._get)

    def do_HEAD(self):
        self._run(self._get)

    def do_POST(self):
        self._run(self._post)

    def _run(self, route):
        # Never let an exception reach the client as a traceback: log it, answer 500.
        try:
            route(self.path.split("?", 1)[0])
        except BadRequest as err:
            self._send(400, f"bad request: {err}\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - last line of defence
            print(f"error: {self.command} {self.path}: {err!r}", file=sys.stderr, flush=True)
            try:
                self._send(500, "internal error\n")
            except OSError:
                self.close_connection = True

    def _get(self, path):
        if path == "/health":
            self._send(200, "ok\n")
        elif path == "/":
            notes = self.server.store.all()
            if "text/html" in self.headers.get("Accept", ""):
                self._send(200, render_html(notes), "text/html; charset=utf-8")
            else:
                lines = [f"{n['id']}. {n['text']}" for n in notes]
                lines.append("POST /notes with a body to add one")
                self._send(200, "\n".join(lines) + "\n")
        elif path == "/notes":
            import json  # only this route needs it; keeps start-up lean

            body = json.dumps(self.server.store.all()) + "\n"
            self._send(200, body, "application/json")
        else:
            self._send(404, "not found\n")

    def _post(self, path):
        if path not in ("/notes", "/notes/"):
            self._read_body()  # keep the connection in sync before answering
            self._send(404, "not found\n")
            return
        raw = self._read_body()
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the note must be UTF-8 text") from None
        is_form = self.headers.get("Content-Type", "").startswith(
            "application/x-www-form-urlencoded"
        )
        text = body
        if is_form:
            # curl -d 'buy milk' also sends this content type: use the raw body unless a
            # 'text' field is really there.
            fields = parse_qs(body)
            if "text" in fields:
                text = fields["text"][0]
        text = text.strip()
        if not text:
            raise BadRequest("empty note; send the text as the body or a form field 'text'")
        note_id = self.server.store.add(text)
        if is_form and "text/html" in self.headers.get("Accept", ""):
            self._send(303, f"{note_id}\n", extra={"Location": "/"})
        else:
            self._send(201, f"{note_id}\n", extra={"Location": f"/notes#{note_id}"})

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("chunked bodies are not supported; send Content-Length")
        value = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(value)
        except ValueError:
            self.close_connection = True
            raise BadRequest("bad Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise BadRequest("bad Content-Length")
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be parsed as a request
            raise BadRequest(f"body too large (max {MAX_BODY} bytes)")
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


def render_html(notes):
    items = "".join(
        f"<li>{escape(n['text'])} <small>{escape(n['created'])}</small></li>" for n in notes
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>notes</title></head><body>"
        "<h1>notes</h1>"
        f"<ul>{items or '<li><em>no notes yet</em></li>'}</ul>"
        '<form method=post action="/notes">'
        '<input name=text autofocus placeholder="a new note"> <button>add</button>'
        "</form></body></html>\n"
    )


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
    store = NotesStore(os.environ.get("DATA_DIR", "./data"))
    server, where, socket_file = make_server()
    server.store = store
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
