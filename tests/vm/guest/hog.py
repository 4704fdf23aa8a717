"""A memory hog for the VM tier: allocates (and touches) 4 MiB chunks until it is killed.

It eats only while /etc/tenement-vm/hog-eat exists: the checks create that file, wait for the
OOM kill, remove it, and expect the supervisor's restart to stay up. Every start also reports
whether the app (its own dynamic uid) can write its data directory.
"""

import os
import time

probe = os.path.join(os.environ.get("DATA_DIR", "/nonexistent"), "hog-was-here")
try:
    with open(probe, "w") as f:
        f.write(str(os.getpid()))
    print(f"hog: data dir write: ok (uid {os.getuid()})", flush=True)
except OSError as e:
    print(f"hog: data dir write: {type(e).__name__}: {e} (uid {os.getuid()})", flush=True)

if not os.path.exists("/etc/tenement-vm/hog-eat"):
    print("hog: idling", flush=True)
    while True:
        time.sleep(3600)
chunks = []
while True:
    chunks.append(b"x" * (4 << 20))  # bytes * n writes every page: resident, not just mapped
    print(f"hog: {4 * len(chunks)} MiB", flush=True)
    time.sleep(0.02)
