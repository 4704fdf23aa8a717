//! Waking through the proxy: concurrent first requests share one start, a crash costs one
//! request and no more, and a supervisor restart delays requests without failing them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tenement_proto::rpc::InstanceState;

use crate::support::*;

/// The default `stop_grace`: how long a supervisor's shutdown waits for requests in flight.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[test]
fn twenty_concurrent_first_requests_start_one_process() {
    let sandbox = Sandbox::new(
        r#"
[service.notes]
command = "python3 app.py"
workdir = "@NOTES@"

[service.notes.env]
DATA_DIR = "{data_dir}/{id}"

[instances]
notes = ["cold"]
"#,
    );
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    let barrier = Arc::new(Barrier::new(20));
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                try_get(addr, "cold.notes.localhost", "/health")
            })
        })
        .collect();
    let mut failures = Vec::new();
    for (n, client) in clients.into_iter().enumerate() {
        match client.join().expect("client thread") {
            Ok(reply) if reply.status() == 200 && reply.text().contains(r#""status":"ok""#) => {}
            Ok(reply) => failures.push(format!("#{n}: {} {}", reply.status(), reply.text())),
            Err(e) => failures.push(format!("#{n}: {e}")),
        }
    }
    assert!(failures.is_empty(), "failed first requests: {failures:?}");
    let events = sandbox.admin().events("notes:cold");
    let starts = events.iter().filter(|l| l.starts_with("started")).count();
    assert_eq!(starts, 1, "events: {events:?}");
}

const WEB: &str = r#"
[service.web]
command = "@TINY@"

[instances]
web = ["alice"]
"#;

#[test]
fn crashing_instance_gives_502_then_recovers() {
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    let before: i32 = get_ok(addr, "alice.web.localhost", "/pid")
        .parse()
        .expect("pid");
    // A POST: a bodyless GET on a kept-alive connection may be sent again once (RFC 9112
    // 9.3.1), which would crash the next process too.
    let crash = exchange(
        addr,
        b"POST /crash HTTP/1.1\r\nHost: alice.web.localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(crash.status(), 502, "{}", crash.text());
    // The next request after the supervisor has seen the crash (before that, a request may
    // still reach the dying process, like any request in flight on it).
    let mut admin = sandbox.admin();
    let noticed = wait_until(EVENT_DEADLINE, || {
        admin.starts("web:alice") >= 2 || admin.state("web:alice") != InstanceState::Running
    });
    assert!(noticed, "{}", sandbox.supervisor_log());
    let after = get(addr, "alice.web.localhost", "/pid");
    assert_eq!(
        after.status(),
        200,
        "the request after a crash: {}",
        after.text()
    );
    let after: i32 = after.text().trim().parse().expect("pid");
    assert_ne!(after, before, "served by a new process");
}

#[test]
fn supervisor_restart_lets_an_in_flight_request_finish() {
    // The deterministic form of the next test's race: a request that is in flight when the
    // supervisor is told to stop must still be answered ("a restart loses no request").
    let sandbox = Sandbox::new(
        r#"
[service.mirror]
command = "python3 @FIXTURES@/mirror.py"

[instances]
mirror = ["a"]
"#,
    );
    let (supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    get_ok(addr, "a.mirror.localhost", "/health");
    // 5 s: surely still in flight when the test has seen it counted, even on a loaded
    // machine, and shorter than the stop grace the supervisor's shutdown waits for it.
    let slow = thread::spawn(move || try_get(addr, "a.mirror.localhost", "/slow?ms=5000"));
    let mut admin = sandbox.admin();
    let in_flight = wait_until(EVENT_DEADLINE, || admin.status("mirror:a").in_flight >= 1);
    assert!(in_flight, "the slow request never showed as in flight");
    drop(admin);
    let status = supervisor.terminate(STOP_GRACE + EVENT_DEADLINE);
    assert!(status.success(), "the supervisor exited with {status}");
    let _supervisor = sandbox.start_supervisor();
    let reply = slow
        .join()
        .expect("client thread")
        .expect("the in-flight request got an answer");
    assert_eq!(
        reply.status(),
        200,
        "a request in flight during a supervisor restart: {}",
        reply.text().trim()
    );
}

/// One request's outcome: the pid that answered, or why it failed; and how long it took.
type Outcome = (Result<String, String>, Duration);

/// Receives outcomes into `seen` until `enough` holds; panics after a generous deadline (a
/// request may take up to its read timeout to fail).
fn receive_until(
    rx: &mpsc::Receiver<Outcome>,
    seen: &mut Vec<Outcome>,
    what: &str,
    enough: impl Fn(&[Outcome]) -> bool,
) {
    let deadline = Instant::now() + READ_TIMEOUT + EVENT_DEADLINE;
    while !enough(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(outcome) => seen.push(outcome),
            Err(_) => panic!("never saw {what}; outcomes so far: {seen:?}"),
        }
    }
}

#[test]
fn supervisor_restart_delays_requests_but_does_not_fail_them() {
    let sandbox = Sandbox::new(WEB);
    let (supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    get_ok(addr, "alice.web.localhost", "/");

    // A client sends requests one after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Outcome>();
    let client = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let outcome = match try_get(addr, "alice.web.localhost", "/pid") {
                    Ok(reply) if reply.status() == 200 => Ok(reply.text().trim().to_owned()),
                    Ok(reply) => Err(format!("{} {}", reply.status(), reply.text().trim())),
                    Err(e) => Err(e.to_string()),
                };
                if tx.send((outcome, started.elapsed())).is_err() {
                    return;
                }
            }
        })
    };
    // Answers before the restart, then the restart while the client keeps asking, then
    // answers from the process the new supervisor woke: events, however slow the machine.
    let mut outcomes = Vec::new();
    receive_until(&rx, &mut outcomes, "5 answers before the restart", |seen| {
        seen.len() >= 5
    });
    let status = supervisor.terminate(STOP_GRACE + EVENT_DEADLINE);
    assert!(status.success(), "the supervisor exited with {status}");
    let _supervisor = sandbox.start_supervisor();
    let first = outcomes
        .iter()
        .find_map(|(o, _)| o.as_ref().ok().cloned())
        .unwrap_or_default();
    receive_until(
        &rx,
        &mut outcomes,
        "5 answers from the instance after the restart",
        |seen| {
            seen.iter()
                .filter(|(o, _)| o.as_ref().is_ok_and(|pid| *pid != first))
                .count()
                >= 5
        },
    );
    stop.store(true, Ordering::SeqCst);
    client.join().expect("client thread");
    outcomes.extend(rx.try_iter());

    let failed: Vec<_> = outcomes.iter().filter(|(o, _)| o.is_err()).collect();
    let pids: BTreeSet<&String> = outcomes
        .iter()
        .filter_map(|(o, _)| o.as_ref().ok())
        .collect();
    let slowest = outcomes.iter().map(|(_, t)| *t).max().unwrap_or_default();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restart: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    assert!(
        pids.len() >= 2,
        "the instance was not re-woken after the restart: pids {pids:?}"
    );
    eprintln!(
        "{} requests, slowest {slowest:?}, pids {pids:?}",
        outcomes.len()
    );
}
