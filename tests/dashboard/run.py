#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven over the DevTools protocol.

Starts tenement-supervisor and tenement-proxy from their binaries on a sandbox config
(`domain = "localhost"`), mints tokens with tenctl, and as a user would: logs in, sees the
tenants list, searches for one, opens it, wakes it and sees its state change without a
reload, sees a line the app writes appear in the live log, logs out; then logs in with a
tenant's token and sees only that tenant. Every page is checked for console errors (a
refused script or style under the content security policy is one) and screenshotted into
--out.

Prints `PASS name: detail` or `FAIL name: why` per check and `N passed, N failed` last; exits
1 if anything failed.

    python3 tests/dashboard/run.py [--bin target/debug] [--out DIR] [--keep]

Needs chromium and python3-websocket (Debian packages; .ci/run installs them).
"""

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import websocket  # python3-websocket
except ImportError:
    # Debian's package, when python3 on PATH is another interpreter (pyenv, a venv).
    sys.path.append("/usr/lib/python3/dist-packages")
    import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE = 30
MANY = 120


class Failed(Exception):
    pass


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


def port_block(n):
    """`n` ports below the kernel's ephemeral range (the supervisor insists), all free now."""
    import random
    for _ in range(200):
        base = random.randrange(22000, 32000 - n)
        if all(bindable(p) for p in range(base, base + n)):
            return base
    raise Failed(f"no {n} free ports below 32000")


class Browser:
    """One headless Chromium and one page of it, over the DevTools protocol."""

    def __init__(self, workdir):
        self.profile = os.path.join(workdir, "chromium")
        self.process = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = None
        deadline = time.time() + DEADLINE
        while time.time() < deadline:
            line = self.process.stderr.readline()
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                url = m.group(1)
                break
            if not line and self.process.poll() is not None:
                break
        if not url:
            raise Failed("chromium did not start its DevTools endpoint")
        port = re.search(r":(\d+)/", url).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=DEADLINE)
        self.next_id = 0
        self.events = []
        self.console_errors = []
        self.dialogs = 0
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        self.process.kill()
        self.process.wait()

    def _handle(self, message):
        method = message.get("method")
        params = message.get("params", {})
        if method == "Page.javascriptDialogOpening":
            self.dialogs += 1
            self.send("Page.handleJavaScriptDialog", {"accept": True})
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console_errors.append(text)
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"].get("text", "an exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console_errors.append(params["entry"]["text"])
        elif method:
            self.events.append(message)

    def send(self, method, params=None):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        return self.next_id

    def call(self, method, params=None):
        wanted = self.send(method, params)
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise Failed(f"{method}: {message['error']}")
                return message.get("result", {})
            self._handle(message)

    def pump(self, seconds):
        """Handles events (dialogs, console) for a while."""
        self.ws.settimeout(seconds)
        try:
            while True:
                self._handle(json.loads(self.ws.recv()))
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(DEADLINE)

    def wait_load(self):
        deadline = time.time() + DEADLINE
        while time.time() < deadline:
            for i, event in enumerate(self.events):
                if event["method"] == "Page.loadEventFired":
                    del self.events[: i + 1]
                    return
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                self._handle(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        self.ws.settimeout(DEADLINE)
        raise Failed("the page did not finish loading")

    def goto(self, url):
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_load()

    def js(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise Failed(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def click_and_load(self, selector):
        self.events.clear()
        self.js(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_load()

    def wait_for(self, expression, what):
        deadline = time.time() + DEADLINE
        while time.time() < deadline:
            if self.js(expression):
                return
            self.pump(0.2)
        raise Failed(f"{what} did not happen within {DEADLINE} s")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


class Tenement:
    def __init__(self, bin_dir, workdir):
        self.bin = bin_dir
        self.dir = workdir
        os.chmod(workdir, 0o755)
        self.port = free_port()
        ports = port_block(41)
        self.config = os.path.join(workdir, "tenement.toml")
        root = os.geteuid() == 0
        with open(self.config, "w") as f:
            f.write(f"""[settings]
domain = "localhost"
listen = "127.0.0.1:{self.port}"
runtime_dir = "{workdir}/run"
state_dir = "{workdir}/state"
data_dir = "{workdir}/data"
port_range = "{ports}-{ports + 40}"
isolation = "process"
user = "self"
{'proxy_user = "nobody"' if root else ''}

[service.notes]
command = "{os.path.join(bin_dir, 'tiny-http')}"

# Many tenants for the list's pages; never started.
[service.many]
command = "{os.path.join(bin_dir, 'tiny-http')}"
listen = "unix"
""")
        log = open(os.path.join(workdir, "daemons.log"), "w")
        self.supervisor = subprocess.Popen(
            [os.path.join(bin_dir, "tenement-supervisor"), "--config", self.config],
            stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: os.path.exists(f"{workdir}/run/proxy.sock"), "the supervisor's sockets")
        args = [os.path.join(bin_dir, "tenement-proxy"), "--config", self.config]
        if root:
            args += ["--user", "nobody"]
        self.proxy = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.wait(self.accepting, "the proxy's listener")
        self.url = f"http://localhost:{self.port}"

    def accepting(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    @staticmethod
    def wait(condition, what):
        deadline = time.time() + DEADLINE
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.05)
        raise Failed(f"{what} did not come up")

    def tenctl(self, *args):
        out = subprocess.run([os.path.join(self.bin, "tenctl"), "--config", self.config, *args],
                             capture_output=True, text=True, timeout=DEADLINE)
        if out.returncode != 0:
            raise Failed(f"tenctl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip()

    def stop(self):
        for p in (self.proxy, self.supervisor):
            p.terminate()
        for p in (self.proxy, self.supervisor):
            try:
                p.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--out", default=None, help="where screenshots go")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    bin_dir = os.path.abspath(args.bin)
    workdir = tempfile.mkdtemp(prefix="tenement-dashboard-")
    out = args.out or os.path.join(workdir, "screenshots")
    os.makedirs(out, exist_ok=True)
    results = []

    def check(name, fn):
        try:
            detail = fn()
            results.append(True)
            print(f"PASS {name}: {detail}", flush=True)
        except Exception as e:  # a check's failure is reported, the next one still runs
            results.append(False)
            print(f"FAIL {name}: {e}", flush=True)

    tenement = browser = None
    try:
        tenement = Tenement(bin_dir, workdir)
        tenement.tenctl("add", "notes:alice", "notes:bob")
        tenement.tenctl("add", *[f"many:m{n:03}" for n in range(MANY)])
        admin = tenement.tenctl("token", "create", "--scope", "admin", "--name", "browser")
        bob = tenement.tenctl("token", "create", "--scope", "tenant:notes:bob")
        browser = Browser(workdir)
        url = tenement.url
        shots = []

        def shot(name):
            path = os.path.join(out, f"{len(shots) + 1:02}-{name}.png")
            browser.screenshot(path)
            shots.append(path)

        def no_console_errors(page):
            browser.pump(0.3)
            if browser.console_errors:
                errors = browser.console_errors[:]
                browser.console_errors.clear()
                raise Failed(f"console errors on {page}: {errors}")

        def login_page_without_data():
            browser.goto(url + "/")
            title = browser.js("document.title")
            body = browser.js("document.body.innerText")
            shot("login")
            no_console_errors("the login page")
            if "Log in" not in title or "notes:alice" in body or "registered" in body:
                raise Failed(f"{title!r}: {body[:200]!r}")
            return "no session: the login page, and no data"

        def log_in_as_admin():
            browser.js(f"document.querySelector('#token').value = {json.dumps(admin)}")
            browser.click_and_load("section.login button[type=submit]")
            registered = browser.js("document.querySelector('#registered')?.textContent")
            shot("overview")
            no_console_errors("the overview")
            if registered != str(MANY + 2):
                raise Failed(f"the overview says {registered!r} registered")
            return f"overview: {registered} registered"

        def tenants_list_and_search():
            browser.goto(url + "/tenants")
            count = browser.js("document.querySelector('#count').textContent")
            rows = browser.js("document.querySelectorAll('table.instances tbody tr').length")
            has_next = browser.js("!!document.querySelector('a[rel=next]')")
            shot("tenants")
            no_console_errors("the tenants list")
            if rows != 50 or not has_next or str(MANY + 2) not in count:
                raise Failed(f"{rows} rows, next link {has_next}, {count!r}")
            browser.js("document.querySelector('input[name=search]').value = 'alice'")
            browser.click_and_load("form.filters button[type=submit]")
            names = browser.js("[...document.querySelectorAll('table.instances tbody tr td:first-child')].map(td => td.textContent)")
            shot("search")
            no_console_errors("the search")
            if names != ["notes:alice"]:
                raise Failed(f"searching alice listed {names}")
            return f"{rows} rows of {count.split(' of ')[-1]} on page 1; search 'alice': {names}"

        def open_wake_and_watch():
            browser.click_and_load("table.instances tbody tr td a")
            if browser.js("location.pathname") != "/tenants/notes:alice":
                raise Failed(f"opened {browser.js('location.pathname')}")
            before = browser.js("document.querySelector('#state').textContent")
            browser.js("window.__same_page = 'yes'")
            browser.js("document.querySelector('#do-wake').click()")
            browser.wait_for("document.querySelector('#state').textContent === 'running'",
                             "the state turning to running")
            if browser.js("window.__same_page") != "yes":
                raise Failed("the page reloaded")
            if browser.dialogs < 1:
                raise Failed("no confirmation was asked")
            browser.wait_for("document.querySelector('#log').textContent.includes('tiny-http listening')",
                             "the app's first log line in the live tail")
            shot("tenant-woken")
            no_console_errors("the tenant page")
            return f"state {before} -> running without a reload; the app's line arrived live"

        def log_out():
            browser.click_and_load("form.logout button")
            title = browser.js("document.title")
            shot("logged-out")
            if "Log in" not in title:
                raise Failed(f"after logout: {title!r}")
            browser.goto(url + "/tenants")
            if "Log in" not in browser.js("document.title"):
                raise Failed("the tenants page is still shown after logout")
            return "back at the login page; pages need a new login"

        def tenant_sees_only_itself():
            browser.goto(url + "/login")
            browser.js(f"document.querySelector('#token').value = {json.dumps(bob)}")
            browser.click_and_load("section.login button[type=submit]")
            registered = browser.js("document.querySelector('#registered')?.textContent")
            browser.goto(url + "/tenants")
            names = browser.js("[...document.querySelectorAll('table.instances tbody tr td:first-child')].map(td => td.textContent)")
            shot("tenant-scope")
            no_console_errors("a tenant's list")
            browser.goto(url + "/tenants/notes:alice")
            other = browser.js("document.body.innerText")
            shot("tenant-refused")
            browser.console_errors.clear()  # the 403 of that page is the point
            if registered != "1" or names != ["notes:bob"]:
                raise Failed(f"registered {registered!r}, listed {names}")
            if "may not" not in other or "running" in other:
                raise Failed(f"another tenant's page showed: {other[:200]!r}")
            return "a tenant token's session lists notes:bob only and is refused notes:alice"

        def pages_are_small():
            sizes = {}
            for path in ["/login", "/static/app.js", "/static/style.css"]:
                with urllib.request.urlopen(url + path) as r:
                    sizes[path] = len(r.read())
            too_big = {p: n for p, n in sizes.items() if n >= 100_000}
            if too_big:
                raise Failed(f"over 100 KB: {too_big}")
            return ", ".join(f"{p} {n} B" for p, n in sizes.items())

        for name, fn in [
            ("login page without data", login_page_without_data),
            ("log in", log_in_as_admin),
            ("tenants list and search", tenants_list_and_search),
            ("wake without a reload, live log", open_wake_and_watch),
            ("log out", log_out),
            ("tenant scope", tenant_sees_only_itself),
            ("page sizes", pages_are_small),
        ]:
            check(name, fn)
        print(f"screenshots: {out}", flush=True)
    except Failed as e:
        results.append(False)
        print(f"FAIL setup: {e}", flush=True)
    finally:
        if browser:
            browser.close()
        if tenement:
            tenement.stop()
        if not args.keep:
            shutil.rmtree(os.path.join(workdir, "chromium"), ignore_errors=True)
            if args.out:
                shutil.rmtree(workdir, ignore_errors=True)
    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
