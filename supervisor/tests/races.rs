//! Operator calls racing each other and the instance's own lifecycle on the real supervisor:
//! whatever the interleaving, an instance ends with at most one process tree and no leftovers.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{ErrorCode, InstanceState, Response};

const WEB: &str = r#"
[service.web]
command = "@TINY@"
stop_grace = "1s"
backoff_base = "50ms"
"#;

/// Processes of the sandbox: an exec helper and its app per running tiny-http instance.
fn process_count(sb: &Sandbox) -> usize {
    sb.leftover_processes().len()
}

#[test]
fn concurrent_restarts_leave_exactly_one_process_tree() {
    let sb = Sandbox::new(WEB);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    expect_woken(c.spawn("web:r"));
    let barrier = Arc::new(Barrier::new(10));
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let barrier = barrier.clone();
            let mut client = Client::admin(&sb);
            thread::spawn(move || {
                barrier.wait();
                client.restart("web:r")
            })
        })
        .collect();
    for t in threads {
        match t.join().unwrap() {
            Response::Woken { .. } => {}
            other => panic!("restart answered {other:?}"),
        }
    }
    assert_eq!(c.state("web:r"), InstanceState::Running);
    assert!(
        wait_until(EVENT_DEADLINE, || process_count(&sb) == 2),
        "expected one helper and one app, found {:?}",
        sb.leftover_processes()
    );
    let (route, _) = expect_woken(c.wake("web:r"));
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
}

#[test]
fn wakes_racing_stops_never_leak_a_process() {
    let sb = Sandbox::new(WEB);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(c.add(&["web:flap"]), Response::Added { .. }));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut counters = Vec::new();
    for waker in [true, false] {
        let stop = stop.clone();
        let answered = Arc::new(AtomicUsize::new(0));
        counters.push(answered.clone());
        // A wake may wait for a stop's grace and a start: the deadline only bounds a hang.
        let mut client = Client::admin(&sb).with_timeout(EVENT_DEADLINE);
        threads.push(thread::spawn(move || {
            let mut answers = 0;
            while !stop.load(Ordering::SeqCst) {
                let response = if waker {
                    client.wake("web:flap")
                } else {
                    client.stop("web:flap")
                };
                match response {
                    Response::Woken { .. } | Response::Ok => {}
                    // A wake whose start an operator stopped.
                    Response::Error {
                        code: ErrorCode::Unavailable,
                        ..
                    } => {}
                    other => panic!("unexpected answer {other:?}"),
                }
                answers += 1;
                answered.store(answers, Ordering::SeqCst);
            }
            answers
        }));
    }
    // Let them race for a while, and at least until both have had answers (on a loaded
    // machine a thread may get its first one late).
    thread::sleep(Duration::from_millis(1500));
    let both_answered = wait_until(EVENT_DEADLINE, || {
        counters.iter().all(|n| n.load(Ordering::SeqCst) >= 3)
    });
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let answers = t
            .join()
            .expect("a client thread failed: see its panic above");
        assert!(answers > 0);
    }
    assert!(
        both_answered,
        "the racing clients got no answers within {EVENT_DEADLINE:?}"
    );
    expect_ok(c.stop("web:flap"));
    assert_eq!(c.state("web:flap"), InstanceState::Stopped);
    assert!(
        wait_until(EVENT_DEADLINE, || process_count(&sb) == 0),
        "processes left after the final stop: {:?}",
        sb.leftover_processes()
    );
    let (route, started) = expect_woken(c.wake("web:flap"));
    assert!(started);
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
    assert!(wait_until(EVENT_DEADLINE, || process_count(&sb) == 2));
}

/// How long the app of `stop_and_rm_during_a_start_fail_its_waiters_and_kill_the_process`
/// takes to start: far longer than a stop takes even on a loaded machine.
const SLOW_START: Duration = Duration::from_secs(20);

#[test]
fn stop_and_rm_during_a_start_fail_its_waiters_and_kill_the_process() {
    let sb = Sandbox::new(&format!(
        r#"
[service.slow]
command = "@TINY@"
stop_grace = "1s"
startup_timeout = "60s"
[service.slow.env]
FIXTURE_START_DELAY_MS = "{}"
"#,
        SLOW_START.as_millis()
    ));
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    for remove in [false, true] {
        let id = if remove { "slow:rm" } else { "slow:stop" };
        assert!(matches!(c.add(&[id]), Response::Added { .. }));
        let mut waker = Client::admin(&sb);
        // Before the wake, so before the app's start delay begins.
        let t0 = Instant::now();
        let waiting = thread::spawn(move || waker.wake(id));
        assert!(wait_until(EVENT_DEADLINE, || c.state(id) == InstanceState::Starting));
        if remove {
            expect_ok(c.remove(id, true));
        } else {
            expect_ok(c.stop(id));
        }
        // Not a speed limit: a stop that waited for the start to finish could not be answered
        // before the app's start delay is over, SLOW_START after t0 at the earliest.
        assert!(
            t0.elapsed() < SLOW_START,
            "{id} took {:?}: it waited for the start",
            t0.elapsed()
        );
        // The waiter is failed, not woken: the start was abandoned, not finished.
        expect_error(waiting.join().unwrap(), ErrorCode::Unavailable);
        assert!(
            wait_until(EVENT_DEADLINE, || process_count(&sb) == 0),
            "{id}: {:?} left",
            sb.leftover_processes()
        );
    }
    let names: Vec<String> = c.ps().iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(names, ["slow:stop"]);
    assert!(!sb.instance_data_dir("slow:rm").exists());
}

#[test]
fn an_app_killed_from_outside_is_restarted_and_its_signal_reported() {
    let sb = Sandbox::new(WEB);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:victim"));
    let app = served_pid(tcp_addr(&route));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(EVENT_DEADLINE, || {
            let s = c.status("web:victim");
            s.state == InstanceState::Running && s.restarts == 1
        }),
        "not restarted: {:?}",
        c.status("web:victim")
    );
    let status = c.status("web:victim");
    assert_ne!(served_pid(tcp_addr(&route)), app);
    // Running again: no reason now; the last exit tells what happened.
    assert_eq!(status.reason, None, "{status:?}");
    let last_exit = status.last_exit.clone().unwrap_or_default();
    assert!(last_exit.contains("SIGKILL"), "{status:?}");
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
    assert_eq!(process_count(&sb), 2);
}

/// The stop grace of the app that ignores SIGTERM: the window in which the tests below act
/// while it is stopping, long enough that a loaded machine still acts inside it.
const STUBBORN_GRACE: Duration = Duration::from_secs(3);

/// A service whose app ignores SIGTERM, with [`STUBBORN_GRACE`].
fn stubborn() -> String {
    format!(
        r#"
[service.stubborn]
command = "python3 @FIXTURES@/forker.py ignore-term"
stop_grace = "{}ms"
"#,
        STUBBORN_GRACE.as_millis()
    )
}

/// Runs `call` on its own connection; the answer arrives on the returned channel.
fn in_background(
    sb: &Sandbox,
    call: impl FnOnce(&mut Client) -> Response + Send + 'static,
) -> mpsc::Receiver<Response> {
    let mut client = Client::admin(sb);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(call(&mut client));
    });
    rx
}

#[test]
fn a_stop_is_answered_when_its_process_exits_even_if_a_wake_restarts_the_instance() {
    let sb = Sandbox::new(&stubborn());
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("stubborn:s"));
    let old = served_pid(tcp_addr(&route));
    let stopping = in_background(&sb, |c| c.stop("stubborn:s"));
    assert!(wait_until(EVENT_DEADLINE, || c.state("stubborn:s")
        == InstanceState::Stopping));
    // A request arrives during the stop grace: the instance starts again after the exit.
    let (route, started) = expect_woken(c.wake("stubborn:s"));
    assert!(started);
    assert_ne!(served_pid(tcp_addr(&route)), old);
    // The operator's stop did happen (the old process is gone): it must be answered.
    assert!(!pid_alive(old));
    match stopping.recv_timeout(STUBBORN_GRACE + EVENT_DEADLINE) {
        Ok(response) => expect_ok(response),
        Err(_) => panic!(
            "stop never answered although its process exited; the instance is {:?}",
            c.state("stubborn:s")
        ),
    }
}

#[test]
fn a_wake_during_rm_does_not_resurrect_the_instance() {
    let sb = Sandbox::new(&stubborn());
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("stubborn:gone"));
    let old = served_pid(tcp_addr(&route));
    let removing = in_background(&sb, |c| c.remove("stubborn:gone", true));
    assert!(wait_until(EVENT_DEADLINE, || c.state("stubborn:gone")
        == InstanceState::Stopping));
    let mut p = Client::proxy(&sb).with_timeout(STUBBORN_GRACE + EVENT_DEADLINE);
    match p.wake("stubborn:gone") {
        Response::Error {
            code: ErrorCode::Unavailable | ErrorCode::UnknownInstance,
            ..
        } => {}
        other => panic!("a wake of an instance being removed got {other:?}"),
    }
    match removing.recv_timeout(STUBBORN_GRACE + EVENT_DEADLINE) {
        Ok(response) => expect_ok(response),
        Err(_) => panic!(
            "rm never answered; ps: {:?}",
            c.ps()
                .iter()
                .map(|i| (i.instance.to_string(), i.state))
                .collect::<Vec<_>>()
        ),
    }
    assert!(!pid_alive(old));
    assert!(c.ps().is_empty(), "{:?}", c.ps());
    assert!(
        wait_until(EVENT_DEADLINE, || sb.leftover_processes().is_empty()),
        "{:?}",
        sb.leftover_processes()
    );
    assert!(!sb.instance_data_dir("stubborn:gone").exists());
}
