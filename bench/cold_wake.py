#!/usr/bin/env python3
"""Cold wake: `tenctl wake` (and the same wake over the RPC) against starting the same app
directly and polling its port every 1 ms. Interleaved rounds, medians and per-round ratios.

    python3 bench/cold_wake.py [--rounds N]
"""

import argparse
import os
import signal
import subprocess
import time

from tenement_bench import RELEASE, ROOT, Sandbox, build, free_port, machine, median, wait_port

SERVICES = """
[service.python]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
idle_timeout = 0
[service.python.env]
DATA_DIR = "{data_dir}/{id}"

[service.native]
command = "@ROOT@/target/release/tiny-http"
idle_timeout = 0

[service.native-activate]
command = "@ROOT@/target/release/tiny-http"
listen = "activate"
idle_timeout = 0

[service.python-activate]
command = "python3 app.py"
workdir = "@ROOT@/examples/notes"
listen = "activate"
ready = "tcp"
idle_timeout = 0
[service.python-activate.env]
DATA_DIR = "{data_dir}/{id}"
"""

DIRECT = {
    "python": (["python3", "app.py"], os.path.join(ROOT, "examples/notes")),
    "native": ([os.path.join(RELEASE, "tiny-http")], ROOT),
}


def direct_start(kind, tmp):
    argv, cwd = DIRECT[kind]
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port), "HOST": "127.0.0.1",
           "DATA_DIR": os.path.join(tmp, "direct")}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = wait_port(port, started)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    build()
    sb = Sandbox(SERVICES)
    try:
        sb.start_supervisor()
        rpc = sb.admin()
        results = {}
        for r in range(args.rounds):
            for service, kind in [("python", "python"), ("native", "native"),
                                  ("native-activate", "native"), ("python-activate", "python")]:
                inst = f"{service}:r{r}"
                rpc.call({"type": "add", "instances": [inst]})
                # tenctl wake: what an operator sees, process start of tenctl included.
                t = time.perf_counter()
                out = sb.tenctl("wake", inst)
                tenctl_s = time.perf_counter() - t
                if out.returncode != 0:
                    raise SystemExit(f"tenctl wake {inst} failed: {out.stderr.strip()}")
                rpc.call({"type": "stop", "instance": inst})
                # The same wake over the RPC: what the proxy sees.
                t = time.perf_counter()
                reply = rpc.call({"type": "wake", "instance": inst})
                rpc_s = time.perf_counter() - t
                assert reply["type"] == "woken" and reply["started"], reply
                rpc.call({"type": "stop", "instance": inst})
                direct_s = direct_start(kind, sb.dir)
                results.setdefault(service, []).append((tenctl_s, rpc_s, direct_s))
        print(f"# cold wake, {args.rounds} interleaved rounds; {machine()}")
        print(f"{'service':<18}{'direct ms':>10}{'rpc ms':>9}{'tenctl ms':>11}{'rpc/direct':>12}{'tenctl/direct':>15}")
        for service, rows in results.items():
            d = median([x[2] for x in rows])
            rp = median([x[1] for x in rows])
            tc = median([x[0] for x in rows])
            ratio_rpc = median([x[1] / x[2] for x in rows])
            ratio_tc = median([x[0] / x[2] for x in rows])
            print(f"{service:<18}{d*1000:>10.2f}{rp*1000:>9.2f}{tc*1000:>11.2f}{ratio_rpc:>12.3f}{ratio_tc:>15.3f}")
        print("ratios are medians of per-round ratios; direct = the same app started by Python's "
              "subprocess with its port polled every 1 ms")
    finally:
        sb.close()


if __name__ == "__main__":
    main()
