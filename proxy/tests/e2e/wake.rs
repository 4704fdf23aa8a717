//! Waking through the proxy: concurrent first requests share one start, a crash costs one
//! request and no more, and a supervisor restart delays requests without failing them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

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
    let crash = get(addr, "alice.web.localhost", "/crash");
    assert_eq!(crash.status(), 502, "{}", crash.text());
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
    let slow = thread::spawn(move || try_get(addr, "a.mirror.localhost", "/slow?ms=1000"));
    let mut admin = sandbox.admin();
    let in_flight = wait_until(Duration::from_secs(5), || {
        admin.status("mirror:a").in_flight >= 1
    });
    assert!(in_flight, "the slow request never showed as in flight");
    drop(admin);
    let status = supervisor.terminate(Duration::from_secs(20));
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

#[test]
fn supervisor_restart_delays_requests_but_does_not_fail_them() {
    let sandbox = Sandbox::new(WEB);
    let (supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    get_ok(addr, "alice.web.localhost", "/");

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let outcome = match try_get(addr, "alice.web.localhost", "/pid") {
                    Ok(reply) if reply.status() == 200 => Ok(reply.text().trim().to_owned()),
                    Ok(reply) => Err(format!("{} {}", reply.status(), reply.text().trim())),
                    Err(e) => Err(e.to_string()),
                };
                outcomes.push((outcome, started.elapsed()));
            }
            outcomes
        })
    };
    thread::sleep(Duration::from_millis(1000));
    let status = supervisor.terminate(Duration::from_secs(20));
    assert!(status.success(), "the supervisor exited with {status}");
    let _supervisor = sandbox.start_supervisor();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let outcomes = client.join().expect("client thread");

    let failed: Vec<_> = outcomes.iter().filter(|(o, _)| o.is_err()).collect();
    let pids: std::collections::BTreeSet<&String> = outcomes
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
    assert!(outcomes.len() > 20, "only {} requests", outcomes.len());
    eprintln!(
        "{} requests, slowest {slowest:?}, pids {pids:?}",
        outcomes.len()
    );
}
