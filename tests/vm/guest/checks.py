"""The VM tier's checks, run inside the test VM by tenement-vm-checks.service (tests/vm/run.sh).

Real cgroup v2 with every controller exists only here: a fork bomb must stop at pids_max, a
memory hog must be OOM-killed alone and restarted by policy while a neighbour keeps serving,
cpu_max must throttle, and `tenctl status --json` must report all of it. One line per check,
`PASS name: detail` or `FAIL name: detail`, goes to /share/out/results.txt (the second disk);
logs and status documents go next to it.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time
import traceback
import urllib.request

SHARE = "/share"
OUT = os.path.join(SHARE, "out")
TENCTL = "/usr/local/bin/tenctl"
CGROUP_ROOT = "/sys/fs/cgroup"
# Seconds to wait for something that must happen (a process gone, a restart, an answer): they
# only bound a hang. The VM is emulated (TCG) on a host that may be busy, so "promptly" can take
# seconds; no check here measures speed (timing figures belong in bench/).
EVENT_DEADLINE = 60
# How many answers of the neighbour each phase wants before it ends, so that "served 200
# throughout" rests on enough requests however slow the VM is.
NEIGHBOUR_ANSWERS = 11
results = []


def log(message):
    print(f"[checks {time.monotonic():8.1f}] {message}", flush=True)


def check(name, ok, detail):
    line = f"{'PASS' if ok else 'FAIL'} {name}: {detail}"
    results.append(line)
    print(line, flush=True)
    return ok


def run(*argv, timeout=30):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout} s"


def tenctl(*args, timeout=30):
    return run(TENCTL, *args, timeout=timeout)


METRICS = "http://127.0.0.1:9464/metrics"


def scrape():
    """The proxy's metrics (tenement-proxy.service), or "" while it does not answer."""
    try:
        with urllib.request.urlopen(METRICS, timeout=10) as reply:
            return reply.read().decode()
    except OSError as e:
        log(f"scrape failed: {e}")
        return ""


def sample(text, series):
    """The value of `series` (its name and labels exactly as written) in `text`, or None."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line[len(series) + 1:])
    return None


def scraped_until(series, ok):
    """Scrapes until `ok(value of series)` holds (EVENT_DEADLINE at most): (value, last text)."""
    deadline = time.monotonic() + EVENT_DEADLINE
    while True:
        text = scrape()
        value = sample(text, series)
        if (value is not None and ok(value)) or time.monotonic() >= deadline:
            return value, text
        time.sleep(0.5)


def status(instance):
    code, out, err = tenctl("status", "--json", instance)
    if code != 0:
        raise RuntimeError(f"tenctl status {instance}: exit {code}: {err.strip()}")
    return json.loads(out)


def save(name, text):
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text)


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def keyed(path):
    """A flat-keyed cgroup file (memory.events, cpu.stat, pids.events) as a dict of ints."""
    values = {}
    for line in (read(path, "") or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


def spawn(instance):
    code, out, err = tenctl("spawn", instance, timeout=60)
    if code != 0:
        raise RuntimeError(f"tenctl spawn {instance}: exit {code}: {(out + err).strip()}")
    return status(instance)


def supervisor_main_pid():
    return run("systemctl", "show", "-p", "MainPID,NRestarts,OOMPolicy", "--value",
               "tenement-supervisor.service")[1].split()


class Poller(threading.Thread):
    """GETs the neighbour every 0.2 s and records every answer; a slow answer is not a failure,
    only an error or a status other than 200 is."""

    def __init__(self, address):
        super().__init__(daemon=True)
        self.url = f"http://{address}/"
        self.answers = []  # (seconds since start, status or error, latency)
        self.done = threading.Event()

    def run(self):
        start = time.monotonic()
        while not self.done.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=EVENT_DEADLINE) as r:
                    r.read()
                    outcome = r.status
            except Exception as e:  # any failure is a failed answer
                outcome = f"{type(e).__name__}: {e}"
            self.answers.append((round(t0 - start, 2), outcome, time.monotonic() - t0))
            self.done.wait(0.2)

    def wait_answers(self, count, deadline):
        """Waits until `count` answers are recorded in all, or until `deadline` (monotonic)."""
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.1)


def wait_for_supervisor():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if tenctl("ps", timeout=10)[0] == 0:
            return True
        time.sleep(0.2)
    return False


def describe_status(doc):
    keys = ("state", "pid", "uid", "restarts", "isolation", "cgroup", "limits", "memory_bytes",
            "pids", "last_exit", "reason")
    return json.dumps({k: doc.get(k) for k in keys})


def check_status_doc(name, doc, want_limit):
    problems = []
    if "cgroup (cpu, memory, pids)" not in (doc.get("isolation") or ""):
        problems.append(f"isolation {doc.get('isolation')!r}")
    cgroup = doc.get("cgroup") or ""
    if not (cgroup.startswith(CGROUP_ROOT + "/") and os.path.isdir(cgroup)):
        problems.append(f"cgroup {cgroup!r} is not a cgroup directory")
    if want_limit not in (doc.get("limits") or ""):
        problems.append(f"limits {doc.get('limits')!r} lack {want_limit}")
    if not (isinstance(doc.get("memory_bytes"), int) and doc["memory_bytes"] > 0):
        problems.append(f"memory_bytes {doc.get('memory_bytes')!r}")
    if not (isinstance(doc.get("pids"), int) and doc["pids"] >= 1):
        problems.append(f"pids {doc.get('pids')!r}")
    if not (isinstance(doc.get("uid"), int) and doc["uid"] != 0):
        problems.append(f"uid {doc.get('uid')!r} (want a dynamic, non-root uid)")
    check(name, not problems, "; ".join(problems) or describe_status(doc))


def bomb_phase(poller):
    log("bomb: spawning")
    doc = spawn("bomb:one")
    cgroup = doc["cgroup"]
    check("fork bomb: pids.max is 32 in its cgroup", read(f"{cgroup}/pids.max") == "32",
          f"{cgroup}/pids.max = {read(f'{cgroup}/pids.max')!r}")
    samples, worst, slowest = 0, 0, 0.0
    status_doc = None
    probes = []
    start = time.monotonic()
    next_probe = start + 1
    neighbour_before = len(poller.answers)

    def seen_enough():
        # 12 s of the bomb at least, and enough samples, probes and neighbour answers however
        # slow the VM is; a deadline bounds it should the VM be hung.
        return (time.monotonic() - start >= 12 and samples > 50 and len(probes) >= 5
                and len(poller.answers) >= neighbour_before + NEIGHBOUR_ANSWERS)

    while not seen_enough() and time.monotonic() - start < 12 + 2 * EVENT_DEADLINE:
        current = read(f"{cgroup}/pids.current")
        if current is not None and current.isdigit():
            samples += 1
            worst = max(worst, int(current))
        now = time.monotonic()
        if now >= next_probe:
            # Is the machine usable while the bomb runs? A fork+exec and an RPC round trip.
            t0 = time.monotonic()
            ok_true = run("/bin/true", timeout=EVENT_DEADLINE)[0] == 0
            t1 = time.monotonic()
            try:
                status_doc = status("bomb:one")
                ok_status = True
            except Exception as e:
                ok_status = False
                log(f"bomb: status failed: {e}")
            t2 = time.monotonic()
            probes.append((ok_true, t1 - t0, ok_status, t2 - t1))
            slowest = max(slowest, t1 - t0, t2 - t1)
            next_probe = time.monotonic() + 1
        time.sleep(0.02)
    events = keyed(f"{cgroup}/pids.events")
    bomb_log = tenctl("logs", "bomb:one", "-n", "400")[1]
    save("bomb.log", bomb_log)
    reports = re.findall(r"bomb: (\{.*\})", bomb_log)
    report = json.loads(reports[-1]) if reports else {"reports": 0}
    bomb_seconds = time.monotonic() - start
    # pids.peak is the kernel's own high-water mark of charged pids. pids.current is not the
    # measure: a fork first adds its charge and then takes it back when that passes pids.max, so
    # a sample can catch 33 for a fork that was refused (and shows up in pids.events max).
    peak = read(f"{cgroup}/pids.peak")
    check("fork bomb: the cgroup never held more than pids_max = 32 pids",
          samples > 50 and peak is not None and peak.isdigit() and int(peak) <= 32,
          f"pids.peak {peak!r}; pids.current sampled {samples} times in {bomb_seconds:.1f} s,"
          f" highest {worst} (refused charges included)")
    check("fork bomb: forks were refused at the limit",
          events.get("max", 0) > 0 and report.get("forks_failed", 0) > 0
          and 0 < report.get("visible_processes", 0) <= 32,
          f"pids.events max={events.get('max')}, bomb reports {json.dumps(report)}")
    # Responsive means every fork+exec and every RPC worked (each within a generous deadline):
    # without pids_max they would fail for want of pids, not merely be slow.
    check("fork bomb: the VM stayed responsive",
          len(probes) >= 5 and all(p[0] and p[2] for p in probes),
          f"{len(probes)} probes (fork+exec /bin/true, tenctl status), slowest {slowest:.2f} s")
    if status_doc is not None:
        save("status-bomb.json", json.dumps(status_doc, indent=2))
        check_status_doc("tenctl status --json (bomb): isolation, cgroup, limits, usage",
                         status_doc, "pids_max=32")
    else:
        check("tenctl status --json (bomb): isolation, cgroup, limits, usage", False,
              "no status answered while the bomb ran")
    log("bomb: stopping")
    code, out, err = tenctl("stop", "bomb:one", timeout=60)
    left = None
    deadline = time.monotonic() + EVENT_DEADLINE
    while time.monotonic() < deadline:
        procs = read(f"{cgroup}/cgroup.procs")
        left = [] if procs is None else procs.split()
        if not left:
            break
        time.sleep(0.1)
    check("fork bomb: tenctl stop leaves no process in its cgroup", code == 0 and left == [],
          f"stop exit {code} {(out + err).strip()!r}; left: {left}")


def stat_line(path):
    try:
        st = os.stat(path)
        return f"{path} {oct(st.st_mode & 0o7777)} uid {st.st_uid}"
    except OSError as e:
        return f"{path}: {e.strerror}"


def hog_phase(calm_cgroup, poller):
    instances = os.path.dirname(calm_cgroup)
    parent_before = keyed(f"{instances}/memory.events").get("oom_kill", 0)
    dmesg_before = len(run("dmesg")[1].splitlines())
    log("hog: spawning")
    os.makedirs("/etc/tenement-vm", exist_ok=True)
    trigger = "/etc/tenement-vm/hog-eat"
    with open(trigger, "w") as f:
        f.write("eat\n")
    neighbour_before = len(poller.answers)
    first = spawn("hog:one")
    cgroup = first["cgroup"]
    check("memory hog: memory.max is 64 MiB and memory.oom.group 1 in its cgroup",
          read(f"{cgroup}/memory.max") == str(64 << 20) and read(f"{cgroup}/memory.oom.group") == "1",
          f"memory.max={read(f'{cgroup}/memory.max')!r} memory.oom.group={read(f'{cgroup}/memory.oom.group')!r}")
    own_oom = parent_delta = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        own_oom = max(own_oom, keyed(f"{cgroup}/memory.events").get("oom_kill", 0))
        parent_delta = keyed(f"{instances}/memory.events").get("oom_kill", 0) - parent_before
        if own_oom or parent_delta:
            break
        time.sleep(0.05)
    os.unlink(trigger)  # the restarted hog idles
    log(f"hog: OOM kill seen after {time.monotonic() - t0:.1f} s" if own_oom or parent_delta
        else "hog: no OOM kill in 60 s")
    doc = first
    deadline = time.monotonic() + EVENT_DEADLINE
    while time.monotonic() < deadline:
        try:
            doc = status("hog:one")
        except Exception as e:
            log(f"hog: status failed: {e}")
        if doc.get("restarts", 0) >= 1 and doc.get("state") == "running" \
                and doc.get("pid") != first.get("pid"):
            break
        time.sleep(0.1)
    time.sleep(1.5)  # the restarted hog must stay up, not be killed again
    poller.wait_answers(neighbour_before + NEIGHBOUR_ANSWERS, time.monotonic() + EVENT_DEADLINE)
    doc = status("hog:one")
    save("status-hog.json", json.dumps(doc, indent=2))
    parent_delta = keyed(f"{instances}/memory.events").get("oom_kill", 0) - parent_before
    kernel = run("dmesg")[1].splitlines()[dmesg_before:]
    oom_lines = [l for l in kernel if "oom-kill:" in l]
    killed = [l for l in kernel if "Killed process" in l]
    global_oom = [l for l in kernel if "Out of memory:" in l]
    relative = cgroup[len(CGROUP_ROOT):]
    memcgs = sorted({m.group(1) for l in oom_lines for m in [re.search(r"oom_memcg=([^,]+)", l)] if m})
    check("memory hog: OOM-killed in its cgroup",
          (own_oom > 0 or parent_delta > 0) and bool(killed),
          f"oom_kill: own cgroup {own_oom}, instances/ +{parent_delta}; kernel: {len(killed)} killed "
          f"({'; '.join(l.split('] ', 1)[-1][:100] for l in killed[:3])})")
    check("memory hog: the OOM kill stayed in its own cgroup",
          bool(memcgs) and memcgs == [relative] and not global_oom,
          f"oom_memcg {memcgs}, want [{relative!r}]; global OOM lines: {len(global_oom)}")
    check("memory hog: last_exit names SIGKILL (signal 9) and the OOM killer",
          re.search(r"signal 9|SIGKILL", doc.get("last_exit") or "") is not None
          and "out of memory" in (doc.get("last_exit") or ""),
          f"last_exit {doc.get('last_exit')!r}")
    ooms, text = scraped_until('tenement_oom_kills_total{service="hog"}', lambda v: v >= 1)
    crashes = sample(text, 'tenement_restarts_total{service="hog",reason="crash"}')
    save("metrics-hog.txt", text)
    check("metrics: the OOM kill and its restart are counted for the hog's service",
          ooms is not None and ooms >= 1 and crashes is not None and crashes >= 1,
          f"tenement_oom_kills_total{{service=\"hog\"}} {ooms}, "
          f"tenement_restarts_total{{service=\"hog\",reason=\"crash\"}} {crashes}")
    check("memory hog: restarted by policy and running again",
          doc.get("restarts", 0) >= 1 and doc.get("state") == "running"
          and doc.get("pid") not in (None, first.get("pid")),
          f"restarts {doc.get('restarts')}, state {doc.get('state')}, pid {first.get('pid')} -> {doc.get('pid')}")
    check_status_doc("tenctl status --json (hog): isolation, cgroup, limits, usage", doc,
                     "memory_max=64MiB")
    hog_log = tenctl("logs", "hog:one", "-n", "200")[1]
    save("hog.log", hog_log)
    writes = re.findall(r"hog: data dir write: (.*)", hog_log)
    data_dir = doc.get("data_dir") or "/var/lib/tenement/data/hog/one"
    tree = [stat_line(p) for p in ("/var/lib/tenement", os.path.dirname(os.path.dirname(data_dir)),
                                   os.path.dirname(data_dir), data_dir)]
    check("an app running as its dynamic uid can write its own data directory",
          bool(writes) and all(w.startswith("ok") for w in writes),
          f"{len(writes)} starts: {sorted(set(writes))}; on the host: {'; '.join(tree)}")
    tenctl("stop", "hog:one", timeout=60)


def spin_phase():
    log("spin: spawning")
    doc = spawn("spin:one")
    cgroup = doc["cgroup"]
    time.sleep(1)
    before, t0 = keyed(f"{cgroup}/cpu.stat"), time.monotonic()
    time.sleep(3)
    after, t1 = keyed(f"{cgroup}/cpu.stat"), time.monotonic()
    used = (after.get("usage_usec", 0) - before.get("usage_usec", 0)) / 1e6 / (t1 - t0)
    throttled = after.get("throttled_usec", 0) - before.get("throttled_usec", 0)
    # Per-instance series from the cgroups (metrics_per_instance = true in the guest config).
    text = scrape()
    save("metrics-spin.txt", text)
    cpu = sample(text, 'tenement_instance_cpu_seconds_total{service="spin",tenant="spin:one"}')
    memory = sample(text, 'tenement_instance_memory_bytes{service="spin",tenant="spin:one"}')
    current = keyed(f"{cgroup}/cpu.stat").get("usage_usec", 0) / 1e6
    check("metrics: a running instance's CPU and memory come from its cgroup",
          cpu is not None and 0 < cpu <= current and memory is not None and memory > 0,
          f"cpu {cpu} s (cgroup now {current:.2f} s), memory {memory} bytes")
    check("cpu_max 20%: a busy loop is throttled",
          read(f"{cgroup}/cpu.max") == "20000 100000" and throttled > 0 and used <= 0.3,
          f"cpu.max {read(f'{cgroup}/cpu.max')!r}, {used:.0%} of a CPU over {t1 - t0:.1f} s, "
          f"throttled {throttled} us ({after.get('nr_throttled', 0) - before.get('nr_throttled', 0)} periods)")
    tenctl("stop", "spin:one", timeout=60)


def run_checks():
    if not check("the supervisor answers tenctl", wait_for_supervisor(), "tenctl ps within 60 s"):
        return
    supervisor_before = supervisor_main_pid()
    calm = spawn("calm:one")
    save("status-calm.json", json.dumps(calm, indent=2))
    check("the supervisor contains instances in cgroups (cpu, memory, pids)",
          "cgroup (cpu, memory, pids)" in calm.get("isolation", ""),
          f"isolation {calm.get('isolation')!r}, cgroup {calm.get('cgroup')!r}")
    if not calm.get("cgroup"):
        return
    poller = Poller(calm["address"])
    poller.start()
    try:
        bomb_phase(poller)
    except Exception:
        check("fork bomb phase ran to the end", False, traceback.format_exc().replace("\n", " | "))
    during_bomb = list(poller.answers)
    try:
        hog_phase(calm["cgroup"], poller)
    except Exception:
        check("memory hog phase ran to the end", False, traceback.format_exc().replace("\n", " | "))
    poller.done.set()
    poller.join(EVENT_DEADLINE)
    during_hog = poller.answers[len(during_bomb):]
    after = status("calm:one")
    same = (after.get("pid") == calm.get("pid") and after.get("restarts") == 0
            and after.get("state") == "running")
    for phase, answers in (("the fork bomb", during_bomb), ("the memory hog's OOM kill", during_hog)):
        bad = [a for a in answers if a[1] != 200]
        slowest = max((a[2] for a in answers), default=0)
        check(f"neighbour calm served HTTP 200 throughout {phase}, same process",
              len(answers) >= NEIGHBOUR_ANSWERS and not bad and same,
              f"{len(answers)} requests, {len(bad)} not 200 {bad[:3]}, slowest {slowest:.2f} s; "
              f"pid {calm.get('pid')} -> {after.get('pid')}, restarts {after.get('restarts')}, "
              f"state {after.get('state')}")
    supervisor_after = supervisor_main_pid()
    check("the supervisor itself survived", supervisor_after == supervisor_before,
          f"MainPID,NRestarts,OOMPolicy {supervisor_before} -> {supervisor_after}")
    try:
        spin_phase()
    except Exception:
        check("cpu phase ran to the end", False, traceback.format_exc().replace("\n", " | "))
    instances = os.path.dirname(calm["cgroup"])
    left = sorted(e.name for e in os.scandir(instances) if e.is_dir())
    check("stopped instances leave no cgroup behind", left == ["calm.one"],
          f"{instances}: {left}")
    text = scrape()
    save("metrics-end.txt", text)
    tenants = sorted(set(re.findall(r'^tenement_instance_memory_bytes\{[^}]*tenant="([^"]+)"', text, re.M)))
    supervisor_rss = sample(text, 'tenement_process_resident_memory_bytes{daemon="supervisor"}')
    check("metrics: only running instances have series, and the supervisor's own figures are there",
          tenants == ["calm:one"] and supervisor_rss is not None and supervisor_rss > 0,
          f"instances with series {tenants}, supervisor RSS {supervisor_rss}")


def on_sigterm(signum, frame):
    # systemd's TimeoutStartSec ran out: record that, then let main's finally write the results.
    check("the checks finished in time", False, "SIGTERM (TimeoutStartSec of tenement-vm-checks.service)")
    raise SystemExit(1)


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    os.makedirs(SHARE, exist_ok=True)
    mounted = run("mount", "LABEL=tenement-share", SHARE)[0] == 0 or \
        run("mount", "/dev/nvme0n2", SHARE)[0] == 0
    os.makedirs(OUT, exist_ok=True)
    log(f"share mounted: {mounted}; kernel {os.uname().release}")
    try:
        run_checks()
    except Exception:
        check("checks ran to the end", False, traceback.format_exc().replace("\n", " | "))
    finally:
        save("results.txt", "".join(line + "\n" for line in results))
        save("supervisor.log", run("journalctl", "-b", "-u", "tenement-supervisor", "--no-pager")[1])
        save("proxy.log", run("journalctl", "-b", "-u", "tenement-proxy", "--no-pager")[1])
        save("dmesg.txt", run("dmesg")[1])
        save("cgroups.txt", run("sh", "-c", "cd /sys/fs/cgroup/system.slice/tenement-supervisor.service "
                                "&& for f in cgroup.controllers cgroup.subtree_control */cgroup.controllers "
                                "*/cgroup.subtree_control; do echo \"$f: $(cat $f)\"; done; "
                                "find . -maxdepth 2 -type d")[1])
        os.sync()
        if mounted:
            run("umount", SHARE)
        log(f"done: {sum(l.startswith('PASS') for l in results)} passed, "
            f"{sum(l.startswith('FAIL') for l in results)} failed")


if __name__ == "__main__":
    main()
