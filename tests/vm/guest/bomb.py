"""A fork bomb for the VM tier: every process forks forever (children too), never exits.

Forks that fail (EAGAIN once pids.max is reached) are counted and retried at once. The first
process reports twice a second on stdout, `bomb: {json}`: how many forks it got, how many
failed, and how many processes it sees in /proc (its own PID namespace).
"""

import json
import os
import time

root = os.getpid()
got = failed = 0
started = time.monotonic()
last_report = 0.0


def visible_processes():
    try:
        return sum(1 for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return -1


while True:
    try:
        pid = os.fork()
    except OSError:
        failed += 1
    else:
        if pid == 0:
            # A child is a bomb of its own; only the first process reports.
            continue
        got += 1
    if os.getpid() == root:
        now = time.monotonic()
        if now - last_report >= 0.5:
            last_report = now
            doc = {
                "forks_ok": got,
                "forks_failed": failed,
                "visible_processes": visible_processes(),
                "seconds": round(now - started, 1),
            }
            print("bomb: " + json.dumps(doc), flush=True)
