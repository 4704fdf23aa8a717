#!/usr/bin/env python3
"""Fleet suite: three tenement hosts on one machine, coordinated through a real etcd cluster.

Each host is a network namespace (tfl-h1..3, 10.77.0.1-3) cabled to a bridge in a fourth
namespace (tfl-sw) with a veth pair, and runs an etcd member (Debian's etcd-server), a
tenement-supervisor, the fleet agent (`tenement-fleet run`) and a tenement-proxy with the
fleet credential, on its own address only; the suite itself is a client on one more cable
(10.77.0.254). The checks play what a fleet must survive: placement across the hosts, a
request to any host reaching its tenant wherever it runs (one hop, never two), a fleet port
that takes no one without the fleet's certificate, a host killed (SIGKILL of everything in its
namespace) with requests for its tenants held until they run elsewhere, a host cut off (its
cable pulled) fencing itself before the others take its tenants, its return, a fleet agent
killed (its supervisor fences alone), one etcd member lost, and records that are not the
fleet's. "Runs" means a process: each check that moves tenants wakes them on their new hosts
and counts running instances on all three.

A drain under load closes the run: every tenant of the busiest host moved off it while
requests keep coming through all three proxies, none failing.

Not covered yet, because not built yet (docs/FLEET.md): replicas of a tenant's data and the
tenctl fleet verbs.

Prints `PASS name: detail` or `FAIL name: why` per check and `N passed, N failed` last; exits 1
if anything failed.

    sudo python3 tests/fleet/run.py [--bin target/debug] [--keep]
"""

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from rig import (EVENT_DEADLINE, GRACE, HOSTS, LEASE_TTL, ROOT, Fleet, addr, check, connects, ns,
                 placed_here, running_once, sh, switch, wait_for, wake_where_placed, when)

import rig  # noqa: E402  (its PREFIX and NET may be set by a caller first)

OBSERVER = f"{rig.NET}.254"

# ---- the checks ----------------------------------------------------------------------------
TENANTS = [f"notes:t{i:02d}" for i in range(30)]


def check_membership(f):
    for host in HOSTS:
        f.start_etcd(host)
    wait_for(lambda: f.healthy(HOSTS), EVENT_DEADLINE, "a healthy three-member etcd cluster")
    f.make_credentials()
    for host in HOSTS:
        f.start_supervisor(host)
        f.start_agent(host)
        f.start_proxy(host)
    wait_for(lambda: len(f.read("/tenement/hosts/")) == 3, EVENT_DEADLINE, "three host records")
    wait_for(lambda: all((f.status(h) or {}).get("membership") == "member" for h in HOSTS), EVENT_DEADLINE, "three members")
    leader = wait_for(lambda: f.controllers(), EVENT_DEADLINE, "a controller")
    time.sleep(1)
    check(len(f.controllers()) == 1, f"controllers: {f.controllers()}")
    records = f.read("/tenement/hosts/")
    addresses = sorted(r["address"] for r in records.values())
    check(addresses == [f"{addr(h)}:7443" for h in HOSTS], f"addresses {addresses}")
    return f"3 hosts joined with their own addresses; one controller ({leader[0]})"


def check_placement(f):
    # Created through one host: on a fleet host `tenctl add` (the admin socket, or the same
    # call through the management API) asks the fleet, which places them.
    added = f.tenctl("h2", "add", *TENANTS, "--json")
    check(added.returncode == 0 and sorted(json.loads(added.stdout)["added"]) == TENANTS,
          f"tenctl add on h2: exit {added.returncode}, {added.stdout[:200]} {added.stderr.strip()}")
    again = f.tenctl("h2", "add", TENANTS[0], "--json")
    check(again.returncode == 0 and json.loads(again.stdout)["existing"] == [TENANTS[0]],
          f"tenctl add of a wanted tenant: {again.stdout} {again.stderr.strip()}")
    placements = wait_for(lambda: when(f.placements, lambda p: len(p) == 30), EVENT_DEADLINE, "30 placements")
    per_host = {h: sorted(t for t, p in placements.items() if p["host"] == h) for h in HOSTS}
    check(all(len(v) == 10 for v in per_host.values()), f"spread {[(h, len(v)) for h, v in per_host.items()]}")
    check(all(p["epoch"] == 1 for p in placements.values()), "every first placement has epoch 1")
    check(all(p["standby"] and p["standby"][0] != p["host"] for p in placements.values()), "each has a standby elsewhere")
    # Each host's agent sees exactly its own, and no tenant is on two hosts.
    wait_for(lambda: all(placed_here(f, h) == set(per_host[h]) for h in HOSTS), EVENT_DEADLINE, "each agent to see its placements")
    union = [t for h in HOSTS for t in placed_here(f, h)]
    check(len(union) == len(set(union)) == 30, "no tenant placed on two hosts")
    # Each supervisor registers exactly its own; each starts them, and refuses the others'.
    wait_for(lambda: all(set(f.instances(h)) == set(per_host[h]) for h in HOSTS), EVENT_DEADLINE,
             "each supervisor to register its placements")
    for h in HOSTS:
        f.wake(h, per_host[h])
    elsewhere = next(t for t in TENANTS if t not in per_host["h1"])
    refused = f.tenctl("h1", "wake", elsewhere)
    check(refused.returncode == 4 and "is not placed on this fleet host" in refused.stderr,
          f"waking {elsewhere} on h1 (not placed there): exit {refused.returncode}, {refused.stderr.strip()}")
    once = running_once(f, HOSTS)
    check(once == set(TENANTS), f"{len(once)} of 30 running")
    # `tenement-fleet hosts` on any host: all three live, the controller, what each holds and runs
    # (running as the supervisors report it at the agents' next renewal).
    def hosts_agree():
        result = f.fleet_cli("h3", "hosts", "--json")
        if result.returncode != 0:
            return None
        views = {v["host"]: v for v in json.loads(result.stdout)}
        ok = (sorted(views) == HOSTS and all(v["live"] for v in views.values())
              and [h for h, v in views.items() if v["controller"]] == f.controllers()
              and all(views[h]["placed"] == 10 and views[h]["running"] == 10 for h in HOSTS))
        return views if ok else None
    wait_for(hosts_agree, EVENT_DEADLINE, "tenement-fleet hosts to show 3 live hosts with 10 placed and 10 running each")
    table = f.fleet_cli("h1", "hosts").stdout
    check(table.startswith("HOST") and "live, controller" in table, f"tenement-fleet hosts printed {table!r}")
    # The same through each host's supervisor (tenctl hosts, relayed to the fleet agent).
    for h in HOSTS:
        seen = f.tenctl(h, "hosts", "--json")
        check(seen.returncode == 0 and sorted(v["host"] for v in json.loads(seen.stdout)) == HOSTS,
              f"tenctl hosts on {h}: exit {seen.returncode}, {seen.stdout[:200]} {seen.stderr.strip()}")
    return ("30 tenants created with one `tenctl add` on h2 placed 10/10/10, epoch 1, each with a standby on another host; "
            "each supervisor registered and started exactly its own and refused another's (exit 4); 30 processes, "
            "none twice; `tenement-fleet hosts` shows each host's placed and running counts and the controller")


MIRRORS = ["mirror:m0", "mirror:m1", "mirror:m2"]


def check_forward(f):
    owner = {t: p["host"] for t, p in f.placements().items()}
    # The peers' placements reach each proxy through its agent and supervisor.
    def everywhere(t):
        return all(f.get(via, t)[0] == 200 for via in HOSTS)
    wait_for(lambda: all(everywhere(t) for t in TENANTS[:3]), EVENT_DEADLINE, "every proxy to know the others' tenants")
    handed = 0
    for t in TENANTS:
        for via in HOSTS:
            status, _, body = f.get(via, t)
            check(status == 200 and body == f"hello from {t}\n".encode(), f"{t} via {via}: {status} {body[:80]!r}")
            handed += via != owner[t]
    # Stopped tenants of another service: the hand-over wakes them where they are placed.
    f.want(MIRRORS)
    mirrors = wait_for(lambda: when(f.placements, lambda p: all(m in p for m in MIRRORS)), EVENT_DEADLINE, "mirror placements")
    details = []
    for m in MIRRORS:
        there = mirrors[m]["host"]
        via = next(h for h in HOSTS if h != there)
        status, _, body = wait_for(lambda: when(lambda: f.get(via, m, "/headers", headers={
            "X-Forwarded-For": "6.6.6.6", "tenement-fleet-client": "6.6.6.6:1 https"}), lambda r: r[0] == 200),
            EVENT_DEADLINE, f"{m} via {via}")
        seen = {name.lower(): value for name, value in json.loads(body)}
        check(seen.get("x-forwarded-for") == OBSERVER and seen.get("x-forwarded-proto") == "http"
              and seen.get("host") == f"{m.split(':')[1]}.mirror.example.com" and "tenement-fleet-client" not in seen,
              f"{m} on {there}, asked through {via}, saw {seen}")
        # A body both ways, streamed through the hop.
        upload = os.urandom(1 << 20)
        status, _, body = f.get(via, m, "/upload", method="POST", body=upload)
        check(status == 200 and body.decode().split() == [str(len(upload)), hashlib.sha256(upload).hexdigest()],
              f"upload of 1 MiB to {m} via {via}: {status} {body[:100]!r}")
        status, headers, body = f.get(via, m, "/download?bytes=5000000")
        check(status == 200 and len(body) == 5000000 and hashlib.sha256(body).hexdigest() == headers.get("x-sha256"),
              f"download of 5 MB from {m} via {via}: {status}, {len(body)} bytes")
        # An upgrade (a WebSocket handshake), then raw bytes both ways.
        with socket.create_connection((addr(via), 80), timeout=EVENT_DEADLINE) as raw:
            raw.sendall((f"GET /upgrade HTTP/1.1\r\nHost: {m.split(':')[1]}.mirror.example.com\r\n"
                         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = raw.recv(4096)
                check(chunk, f"the upgrade to {m} via {via} closed after {head!r}")
                head += chunk
            check(head.startswith(b"HTTP/1.1 101"), f"the upgrade to {m} via {via}: {head[:80]!r}")
            echoed = head.split(b"\r\n\r\n", 1)[1]
            raw.sendall(b"across one hop")
            while len(echoed) < len(b"across one hop"):
                chunk = raw.recv(4096)
                check(chunk, f"the upgraded connection to {m} closed")
                echoed += chunk
            check(echoed == b"across one hop", f"echoed {echoed!r}")
        details.append(f"{m} on {there} via {via}")
    # Nothing ran twice, and no supervisor registered a tenant that is not placed on it.
    once = running_once(f, HOSTS)
    check(once == set(TENANTS) | set(MIRRORS), f"running: {sorted(once)}")
    for h in HOSTS:
        mine = placed_here(f, h)
        check(set(f.instances(h)) == mine, f"{h} registered {sorted(set(f.instances(h)) - mine)} not placed on it")
    f.etcdctl("del", "--prefix", "/tenement/tenants/mirror:")
    wait_for(lambda: not any(m in f.placements() for m in MIRRORS), EVENT_DEADLINE, "the mirrors unplaced")
    return (f"90 requests, each of 30 tenants through each of the 3 proxies: all answered by the tenant, {handed} handed "
            f"over one hop; stopped tenants woken by a hand-over ({', '.join(details)}): the app saw the client's "
            "address and scheme (a forged tenement-fleet-client and X-Forwarded-For dropped), 1 MiB up and 5 MB down "
            "intact, a WebSocket upgrade echoed; nothing ran twice")


def fleet_port(host, cert=None, key=None, ca=None, request=b""):
    """What the fleet port of `host` answers `request` over TLS with the given client certificate
    (b"" when the connection ends without an HTTP answer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    if cert:
        context.load_cert_chain(cert, key)
    data = b""
    try:
        with socket.create_connection((addr(host), 7443), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=addr(host)) as tls:
                tls.sendall(request)
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
    except (ssl.SSLError, OSError):
        pass
    return data


def check_fleet_port(f):
    creds = f.credentials
    ca = os.path.join(creds, "ca.pem")
    placements = f.placements()
    target = "h2"
    here = next(t for t, p in placements.items() if p["host"] == target and t.startswith("notes:"))
    elsewhere = next(t for t, p in placements.items() if p["host"] != target and t.startswith("notes:"))
    def ask(tenant, client="203.0.113.9:4444 https"):
        ident, service = tenant.split(":")[1], tenant.split(":")[0]
        extra = f"tenement-fleet-client: {client}\r\n" if client else ""
        return f"GET / HTTP/1.1\r\nHost: {ident}.{service}.example.com\r\n{extra}Connection: close\r\n\r\n".encode()
    h1 = (os.path.join(creds, "h1.pem"), os.path.join(creds, "h1.key"))
    # Strangers: no certificate, one from another CA, plain HTTP.
    other = os.path.join(f.dir, "other-ca")
    sh(os.path.join(f.bin, "tenement-fleet"), "credentials", other, "--host", "h1", "--ip", addr("h1"))
    strangers = {
        "no certificate": fleet_port(target, ca=ca, request=ask(here)),
        "a certificate from another CA": fleet_port(target, os.path.join(other, "h1.pem"), os.path.join(other, "h1.key"),
                                                    ca=ca, request=ask(here)),
    }
    with socket.create_connection((addr(target), 7443), timeout=10) as raw:
        raw.sendall(ask(here))
        raw.settimeout(10)
        try:
            strangers["plain HTTP"] = raw.recv(4096)
        except OSError:
            strangers["plain HTTP"] = b""
    for who, answer in strangers.items():
        check(b"HTTP/" not in answer, f"{target}'s fleet port answered {who}: {answer[:80]!r}")
    check("fleet: refused a connection" in f.log(target, "proxy"), "the refusals were not logged")
    # A fleet host: served here, never handed on.
    served = fleet_port(target, *h1, ca=ca, request=ask(here))
    check(served.startswith(b"HTTP/1.1 200"), f"{here} (placed on {target}) through its fleet port: {served[:120]!r}")
    refused = fleet_port(target, *h1, ca=ca, request=ask(elsewhere))
    check(refused.startswith(b"HTTP/1.1 503") and b"tenement-fleet: not-placed-here" in refused.lower(),
          f"{elsewhere} (placed on {placements[elsewhere]['host']}) through {target}'s fleet port: {refused[:200]!r}")
    anonymous = fleet_port(target, *h1, ca=ca, request=ask(here, client=None))
    check(anonymous.startswith(b"HTTP/1.1 400"), f"a hand-over without tenement-fleet-client: {anonymous[:120]!r}")
    return (f"{target}'s fleet port gave no HTTP answer without a certificate, with one from another CA, or to plain HTTP "
            f"(each refusal logged); with the fleet's it served {here}, answered 503 not-placed-here for {elsewhere} "
            "(a second hop is never taken) and 400 without the client's name")


def check_load_balancer(f):
    """The shipped HAProxy example in front of the three hosts, their addresses put in."""
    with open(os.path.join(ROOT, "examples", "fleet", "haproxy.cfg")) as src:
        text = src.read()
    swaps = [("bind :80", f"bind {OBSERVER}:8080")] + [(f"10.0.0.{i}:80", f"{addr(h)}:80")
                                                        for i, h in enumerate(HOSTS, 1)]
    for old, new in swaps:
        check(old in text, f"examples/fleet/haproxy.cfg no longer has {old!r}; update the fleet suite")
        text = text.replace(old, new)
    config = os.path.join(f.dir, "haproxy.cfg")
    with open(config, "w") as out:
        out.write(text)
    check(sh("haproxy", "-c", "-f", config, check_status=False).returncode == 0, "haproxy -c refused the example")
    log = open(os.path.join(f.dir, "haproxy.log"), "w")
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: connects(OBSERVER, 8080), EVENT_DEADLINE, "haproxy to listen")
        served = 0
        for t in TENANTS:
            for _ in HOSTS:
                service, ident = t.split(":")
                conn = http.client.HTTPConnection(OBSERVER, 8080, timeout=EVENT_DEADLINE)
                try:
                    conn.request("GET", "/", headers={"Host": f"{ident}.{service}.example.com"})
                    answer = conn.getresponse()
                    body = answer.read()
                finally:
                    conn.close()
                check(answer.status == 200 and body == f"hello from {t}\n".encode(),
                      f"{t} through haproxy: {answer.status} {body[:80]!r}")
                served += 1
    finally:
        haproxy.kill()
        haproxy.wait()
        log.close()
    return (f"the shipped examples/fleet/haproxy.cfg (round robin over the three proxies): {served} requests, "
            "every tenant answered whichever host HAProxy chose")


def check_kill_host(f):
    victim = f.controllers()[0]
    survivors = [h for h in HOSTS if h != victim]
    before = f.placements()
    theirs = sorted(t for t, p in before.items() if p["host"] == victim)
    fences = {h: f.status(h)["fences"] for h in survivors}
    # Requests for one of its tenants through both survivors, sent as it dies: held until the
    # tenant runs on its new host.
    held = theirs[0]
    for via in survivors:
        check(f.get(via, held)[0] == 200, f"{held} via {via} before the kill")
    answers = {}
    def ask(via):
        sent = time.monotonic()
        try:
            status, _, body = f.get(via, held, timeout=120)
            answers[via] = (status, body, time.monotonic() - sent)
        except OSError as e:
            answers[via] = (None, str(e).encode(), time.monotonic() - sent)
    killed_ms = time.time() * 1000
    started = time.monotonic()
    f.kill_namespace(ns(victim))
    askers = [threading.Thread(target=ask, args=(via,)) for via in survivors]
    for t in askers:
        t.start()
    after = wait_for(
        lambda: when(lambda: f.placements(via=survivors[0]), lambda p: all(p[t]["host"] in survivors for t in theirs)),
        EVENT_DEADLINE, f"{victim}'s tenants to move to {survivors}")
    took = time.monotonic() - started
    for t in theirs:
        check(after[t]["epoch"] == before[t]["epoch"] + 1, f"{t} epoch {before[t]['epoch']} -> {after[t]['epoch']}")
        # Safety: nobody takes a tenant before the gone host's lease can have expired and the
        # grace has passed (the lease lives at least TTL minus the renewal period after the kill).
        check(after[t]["placed_ms"] - killed_ms >= (LEASE_TTL - LEASE_TTL / 3 + GRACE) * 1000 - 50,
              f"{t} moved {after[t]['placed_ms'] - killed_ms:.0f} ms after the kill, before lease expiry + grace")
        if before[t]["standby"][0] in survivors:
            check(after[t]["host"] == before[t]["standby"][0], f"{t} went to {after[t]['host']}, not its standby {before[t]['standby']}")
    for t, p in before.items():
        if t not in theirs:
            check(after[t] == p, f"{t} on a live host changed: {p} -> {after[t]}")
    new_leader = wait_for(lambda: f.controllers(survivors), EVENT_DEADLINE, "a new controller")
    wait_for(lambda: sum(len(placed_here(f, h)) for h in survivors) == 30, EVENT_DEADLINE, "the survivors to report all 30")
    for t in askers:
        t.join()
    for via, (status, body, took_s) in answers.items():
        check(status == 200 and body == f"hello from {held}\n".encode(),
              f"{held} via {via}, sent as {victim} died: {status} {body[:100]!r} after {took_s:.1f} s")
    wake_where_placed(f, theirs, survivors)
    check(running_once(f, survivors) == set(TENANTS), "all 30 running on the survivors")
    check(len(f.read("/tenement/hosts/", via=survivors[0])) == 2, "the dead host's record is gone with its lease")
    now = {h: f.status(h)["fences"] for h in survivors}
    check(now == fences, f"a survivor fenced itself when {victim} (with its etcd member) died: {fences} -> {now}")
    held_s = ", ".join(f"{answers[v][2]:.1f} s via {v}" for v in survivors)
    return (f"killed {victim} (the controller); its {len(theirs)} tenants moved to their standbys with epoch +1 "
            f"{took:.1f} s later (lease {LEASE_TTL} s + grace {GRACE} s); {new_leader[0]} leads; nothing else changed; "
            f"requests for {held} sent as it died were held and answered from its new host ({held_s})")


def check_rejoin(f):
    gone = [h for h in HOSTS if (h, "agent") not in f.procs][0]
    f.start_etcd(gone, state="existing")
    wait_for(lambda: f.healthy(HOSTS), EVENT_DEADLINE, f"{gone}'s etcd member back")
    f.start_supervisor(gone)
    check(f.tenctl(gone, "wake", "notes:t00").returncode == 4, "a supervisor started a tenant before its agent said anything")
    f.start_agent(gone)
    f.start_proxy(gone)
    wait_for(lambda: (f.status(gone) or {}).get("membership") == "member" and len(f.read("/tenement/hosts/")) == 3,
             EVENT_DEADLINE, f"{gone} to rejoin")
    time.sleep(LEASE_TTL)
    check(placed_here(f, gone) == set(), f"{gone} came back with {placed_here(f, gone)}")
    check(f.running(gone) == set(), f"{gone} runs {f.running(gone)}")
    running_once(f, HOSTS)
    return f"{gone} restarted (same etcd and registry): its supervisor refused to start anything before its agent spoke; rejoined empty"


def check_partition(f):
    victim = next(h for h in HOSTS if placed_here(f, h))
    others = [h for h in HOSTS if h != victim]
    theirs = sorted(placed_here(f, victim))
    fences = f.status(victim)["fences"]
    cut_ms = time.time() * 1000
    f.wake(victim, theirs)
    check(f.running(victim) == set(theirs), f"{victim} runs {sorted(f.running(victim))}, placed {theirs}")
    sh("ip", "-n", switch(), "link", "set", f.cable_of(victim), "down")
    try:
        wait_for(lambda: not f.running(victim), EVENT_DEADLINE, f"{victim}'s supervisor to stop its tenants")
        # Seen after the fact: the processes were gone at the latest by now.
        stopped_ms = time.time() * 1000
        status = wait_for(lambda: when(lambda: f.status(victim), lambda s: s["fences"] > fences), EVENT_DEADLINE, f"{victim} to fence itself")
        fenced_ms = status["fenced_ms"]
        check(status["membership"] in ("fenced", "joining") and not status["placed_here"], f"fenced status {status}")
        after = wait_for(
            lambda: when(lambda: f.placements(via=others[0]), lambda p: all(p[t]["host"] in others for t in theirs)),
            EVENT_DEADLINE, f"{victim}'s tenants to move")
        first_move = min(after[t]["placed_ms"] for t in theirs)
        check(fenced_ms < first_move, f"{victim} fenced at {fenced_ms}, its first tenant moved at {first_move}")
        check(stopped_ms < first_move, f"{victim}'s tenants still ran at {stopped_ms}, the first moved at {first_move}")
        wake_where_placed(f, theirs, others)
        check(running_once(f, others) == set(theirs) | {t for h in others for t in placed_here(f, h)}, "the moved tenants run once")
        detail = (f"cut {victim} off: its agent fenced {fenced_ms - cut_ms:.0f} ms after the cut and its tenants' processes were "
                  f"gone {first_move - stopped_ms:.0f} ms or more before the first moved; {len(theirs)} tenants moved and run once")
    finally:
        sh("ip", "-n", switch(), "link", "set", f.cable_of(victim), "up")
    wait_for(lambda: (f.status(victim) or {}).get("membership") == "member" and len(f.read("/tenement/hosts/")) == 3,
             EVENT_DEADLINE, f"{victim} to rejoin after the cable is back")
    time.sleep(LEASE_TTL)
    check(placed_here(f, victim) == set(), f"{victim} came back with {placed_here(f, victim)}")
    counts = {h: sum(1 for p in f.placements().values() if p["host"] == h) for h in HOSTS}
    emptiest = [h for h in HOSTS if counts[h] == min(counts.values())]
    new = [f"notes:new{i}" for i in range(3)]
    f.want(new)
    placements = wait_for(lambda: when(f.placements, lambda p: all(t in p for t in new)), EVENT_DEADLINE, "3 new placements")
    went = [placements[t]["host"] for t in new]
    check(all(h in emptiest for h in went) and victim in went, f"with {counts} placed, new tenants went to {went}")
    mine = {t for t, h in zip(new, went) if h == victim}
    wait_for(lambda: placed_here(f, victim) == mine, EVENT_DEADLINE, f"{victim} to report its new tenants")
    return detail + f"; back on the network it rejoined empty and took new tenants ({went} with {counts} placed before)"


def check_agent_killed(f):
    victim = max(HOSTS, key=lambda h: len(placed_here(f, h)))
    others = [h for h in HOSTS if h != victim]
    theirs = sorted(placed_here(f, victim))
    f.wake(victim, theirs)
    killed_ms = time.time() * 1000
    f.stop(victim, "agent")
    wait_for(lambda: not f.running(victim), EVENT_DEADLINE, f"{victim}'s supervisor to fence alone")
    stopped_ms = time.time() * 1000
    after = wait_for(
        lambda: when(lambda: f.placements(via=others[0]), lambda p: all(p[t]["host"] in others for t in theirs)),
        EVENT_DEADLINE, f"{victim}'s tenants to move")
    first_move = min(after[t]["placed_ms"] for t in theirs)
    check(stopped_ms < first_move, f"{victim}'s tenants still ran at {stopped_ms}, the first moved at {first_move}")
    check(f.tenctl(victim, "wake", theirs[0]).returncode == 4, f"{victim}'s supervisor started {theirs[0]} with no agent")
    wake_where_placed(f, theirs, others)
    running_once(f, HOSTS)
    f.start_agent(victim)
    wait_for(lambda: (f.status(victim) or {}).get("membership") == "member", EVENT_DEADLINE, f"{victim}'s agent back")
    return (f"SIGKILLed {victim}'s agent with {len(theirs)} tenants running: its supervisor stopped them within "
            f"{stopped_ms - killed_ms:.0f} ms on its own, {first_move - stopped_ms:.0f} ms or more before the first moved")


def check_etcd_member_loss(f):
    member = "h1"
    fences = {h: f.status(h)["fences"] for h in HOSTS}
    before = {k: v for k, v in f.placements(via="h2").items()}
    f.stop(member, "etcd")
    try:
        time.sleep(LEASE_TTL * 3)
        after = f.placements(via="h2")
        check(after == before, "placements changed while one etcd member was down")
        now = {h: f.status(h)["fences"] for h in HOSTS}
        check(now == fences, f"a host fenced itself: {fences} -> {now}")
        check(all(f.status(h)["membership"] == "member" for h in HOSTS), "every host still a member")
    finally:
        f.start_etcd(member, state="existing")
    wait_for(lambda: f.healthy(HOSTS), EVENT_DEADLINE, "the member back")
    return f"stopped {member}'s etcd member for {LEASE_TTL * 3} s: no host fenced, no placement changed"


def check_foreign_records(f):
    f.etcdctl("put", "/tenement/tenants/notes:../../etc", "{}")
    f.etcdctl("put", "/tenement/tenants/NOTES:x", "{}")
    f.etcdctl("put", "/tenement/tenants/notes:garbage", "not json")
    f.etcdctl("put", "/tenement/hosts/../x", "{}")
    f.want(["notes:after"])
    placements = wait_for(lambda: when(f.placements, lambda p: "notes:after" in p), EVENT_DEADLINE, "a placement after the bad records")
    check(not any(k in placements for k in ("notes:../../etc", "NOTES:x")), f"a bad id was placed: {sorted(placements)}")
    # Not JSON, but a valid id: still wanted (a typo must not stop a tenant), with the defaults.
    check(placements.get("notes:garbage", {}).get("tier") == "cold", "the unreadable record's tenant was not placed")
    for h in HOSTS:
        proc = f.procs.get((h, "agent"))
        check(proc and proc.poll() is None, f"{h}'s agent exited")
    warnings = "".join(f.log(h, "agent") for h in HOSTS).count("not JSON the fleet reads")
    check(1 <= warnings <= len(HOSTS), f"{warnings} warnings about the unreadable record: once per controller, not per read")
    f.etcdctl("del", "--prefix", "/tenement/tenants/notes:after")
    wait_for(lambda: "notes:after" not in f.placements(), EVENT_DEADLINE, "an unwanted tenant to be unplaced")
    return ("keys that are not ids are ignored; a record that is not JSON keeps its tenant wanted with the defaults "
            "(one warning); the controller goes on; a deleted tenant is unplaced")


def check_drain(f):
    placements = f.placements()
    counts = {h: sum(1 for p in placements.values() if p["host"] == h) for h in HOSTS}
    victim = max(HOSTS, key=lambda h: counts[h])
    others = [h for h in HOSTS if h != victim]
    theirs = sorted(t for t, p in placements.items() if p["host"] == victim)
    check(theirs, f"nothing placed on {victim} to drain: {counts}")
    wake_where_placed(f, theirs, [victim])
    # Load: GETs and POSTs with a body, for the drained host's tenants, through every proxy.
    stop = threading.Event()
    tally = {"ok": 0, "failed": []}
    lock = threading.Lock()
    def load(n):
        i = n
        while not stop.is_set():
            tenant = theirs[i % len(theirs)]
            via = HOSTS[i % len(HOSTS)]
            post = i % 2 == 1
            i += 7
            try:
                status, _, body = f.get(via, tenant, "/drain", method="POST" if post else "GET",
                                        body=b"x" * 2048 if post else None, timeout=120)
                good = status == 200 and body == f"hello from {tenant}\n".encode()
                what = f"{'POST' if post else 'GET'} {tenant} via {via}: {status} {body[:80]!r}"
            except OSError as e:
                good, what = False, f"{tenant} via {via}: {e}"
            with lock:
                if good:
                    tally["ok"] += 1
                else:
                    tally["failed"].append(what)
    workers = [threading.Thread(target=load, args=(n,)) for n in range(6)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        started = time.monotonic()
        result = f.fleet_cli(others[0], "drain", victim, "--wait")
        took = time.monotonic() - started
        check(result.returncode == 0 and "is empty" in result.stdout,
              f"tenement-fleet drain {victim} --wait: exit {result.returncode}, {result.stdout.strip()} {result.stderr.strip()}")
        time.sleep(2)
    finally:
        stop.set()
        for w in workers:
            w.join()
    check(not tally["failed"], f"{len(tally['failed'])} of {tally['ok'] + len(tally['failed'])} requests failed "
          f"during the drain, first: {tally['failed'][:3]}")
    after = f.placements()
    for t in theirs:
        check(after[t]["host"] in others and after[t]["epoch"] == placements[t]["epoch"] + 1
              and after[t].get("from") == victim, f"{t} after the drain: {after[t]}")
    check(not f.running(victim), f"{victim} still runs {sorted(f.running(victim))}")
    once = running_once(f, HOSTS)
    check(set(theirs) <= once, f"not running after the drain: {sorted(set(theirs) - once)}")
    released = f.read("/tenement/released/")
    check(all(released.get(f"/tenement/released/{t}", {}).get("epoch") == after[t]["epoch"] for t in theirs),
          f"releases: {released}")
    table = f.tenctl("h1", "hosts").stdout
    check(any(line.startswith(victim) and "drained" in line for line in table.splitlines()), f"tenctl hosts: {table!r}")
    new = [f"notes:d{i}" for i in range(3)]
    f.want(new)
    got = wait_for(lambda: when(f.placements, lambda p: all(t in p for t in new)), EVENT_DEADLINE, "new placements")
    check(all(got[t]["host"] != victim for t in new), f"a new tenant went to the drained {victim}: {[got[t]['host'] for t in new]}")
    undrained = f.tenctl(others[0], "undrain", victim)
    check(undrained.returncode == 0 and "takes new tenants again" in undrained.stdout,
          f"tenctl undrain: {undrained.stdout} {undrained.stderr.strip()}")
    bad = f.tenctl(others[0], "drain", "../h1")
    check(bad.returncode != 0 and "not a host name" in bad.stderr, f"tenctl drain ../h1: {bad.stderr.strip()}")
    more = [f"notes:u{i}" for i in range(3)]
    f.want(more)
    got = wait_for(lambda: when(f.placements, lambda p: all(t in p for t in more)), EVENT_DEADLINE, "placements after undrain")
    check(any(got[t]["host"] == victim for t in more), f"after undrain nothing went to the empty {victim}: {[got[t]['host'] for t in more]}")
    for t in new + more:
        f.etcdctl("del", f"/tenement/tenants/{t}")
    return (f"drained {victim} under load ({len(theirs)} tenants, GETs and 2 KiB POSTs through all three proxies): "
            f"{tally['ok']} requests, 0 failed; `drain --wait` returned after {took:.1f} s with each tenant drained "
            f"there, released and running once elsewhere (epoch +1); `tenctl hosts` showed it drained; new tenants "
            "avoided it until `tenctl undrain`")


CHECKS = [
    ("membership", check_membership),
    ("placement", check_placement),
    ("one hop to wherever a tenant runs", check_forward),
    ("the fleet port takes only the fleet", check_fleet_port),
    ("behind a load balancer", check_load_balancer),
    ("kill a host", check_kill_host),
    ("a killed host rejoins", check_rejoin),
    ("partition, fence, heal", check_partition),
    ("a fleet agent killed", check_agent_killed),
    ("etcd member loss", check_etcd_member_loss),
    ("records that are not the fleet's", check_foreign_records),
    ("drain a host under load", check_drain),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "debug"))
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory and the namespaces")
    args = parser.parse_args()
    # A SIGTERM (CI's timeout) still takes the namespaces down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("FAIL fleet suite: needs root (network namespaces; CI runs it as root): sudo python3 tests/fleet/run.py")
        print("0 passed, 1 failed")
        return 1
    for tool in ("etcd", "etcdctl", "ip", "haproxy"):
        if not shutil.which(tool):
            print(f"FAIL fleet suite: {tool} is not installed (.ci/run installs etcd-server, etcd-client and haproxy)")
            print("0 passed, 1 failed")
            return 1
    fleet = Fleet(os.path.abspath(args.bin), args.keep)
    try:
        fleet.cable(observer=True)
        for name, fn in CHECKS:
            before = fleet.failed
            fleet.run(name, lambda fn=fn: fn(fleet))
            if fleet.failed > before and name in ("membership", "placement"):
                break  # the rest build on these
    finally:
        if fleet.failed or args.keep:
            for host in HOSTS:
                for what in ("agent", "proxy"):
                    print(f"--- last lines of {host}'s {what}.log")
                    print("\n".join(fleet.log(host, what).splitlines()[-30:]))
        if not args.keep:
            fleet.uncable()
            if not fleet.failed:
                shutil.rmtree(fleet.dir, ignore_errors=True)
        print(f"kept {fleet.dir}" if (fleet.failed or args.keep) else "", end="\n" if (fleet.failed or args.keep) else "")
    print(f"{fleet.passed} passed, {fleet.failed} failed")
    return 1 if fleet.failed else 0


if __name__ == "__main__":
    sys.exit(main())
