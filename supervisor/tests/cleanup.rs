//! `stop` leaves nothing behind: awkward process trees (a shell wrapper whose child ignores
//! SIGTERM, a parent waiting on its serving child, a double-forked daemon in its own session)
//! are gone once stop_grace is over, and their port can be bound again.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::InstanceState;

const TREES: &str = r#"
[service.wrapper]
command = "sh -c 'python3 @FIXTURES@/forker.py ignore-term; true'"
stop_grace = "500ms"

[service.parent]
command = "python3 @FIXTURES@/forker.py parent-child"
stop_grace = "500ms"

[service.daemon]
command = "python3 @FIXTURES@/forker.py double-fork"
stop_grace = "500ms"
[service.daemon.env]
DATA_DIR = "{data_dir}/{id}"
"#;

const GRACE: Duration = Duration::from_millis(500);

/// Wakes `instance`, records every process of its tree, stops it and checks nothing is left.
fn stop_leaves_nothing(sb: &Sandbox, c: &mut Client, instance: &str, extra: &dyn Fn() -> Vec<i32>) {
    let (route, _) = expect_woken(c.spawn(instance));
    let addr = tcp_addr(&route);
    let app = c.status(instance).pid.expect("pid") as i32;
    let helper = exec_helper_of(app);
    let server = served_pid(addr);
    let mut tree = vec![helper, app, server];
    tree.extend(descendants(helper));
    tree.extend(extra());
    tree.sort();
    tree.dedup();
    assert!(
        tree.len() >= 3,
        "{instance}: expected a tree, found {tree:?}"
    );

    let t0 = Instant::now();
    expect_ok(c.stop(instance));
    // A deadline for a hang only: what is checked is that every process of the tree dies.
    let gone = wait_until(GRACE + EVENT_DEADLINE, || {
        tree.iter().all(|&p| !pid_alive(p))
    });
    let alive: Vec<i32> = tree.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(
        gone,
        "{instance}: processes {alive:?} of {tree:?} still alive {:?} after stop",
        t0.elapsed()
    );
    assert!(
        wait_until(EVENT_DEADLINE, || port_bindable(addr.port())),
        "{instance}: port {} not free after stop",
        addr.port()
    );
    assert_eq!(c.state(instance), InstanceState::Stopped);
    let _ = sb;
}

#[test]
fn stop_kills_a_wrapper_whose_child_ignores_sigterm() {
    let sb = Sandbox::new(TREES);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    stop_leaves_nothing(&sb, &mut c, "wrapper:w", &|| Vec::new());
}

#[test]
fn stop_kills_the_serving_child_of_a_waiting_parent() {
    let sb = Sandbox::new(TREES);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    stop_leaves_nothing(&sb, &mut c, "parent:p", &|| Vec::new());
}

#[test]
fn stop_kills_a_double_forked_daemon_in_its_own_session() {
    let sb = Sandbox::new(TREES);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let pid_file = sb.instance_data_dir("daemon:d").join("daemon.pid");
    stop_leaves_nothing(&sb, &mut c, "daemon:d", &|| {
        let text = read_when_written(&pid_file, EVENT_DEADLINE);
        vec![text.trim().parse().expect("daemon.pid holds a pid")]
    });
}

#[test]
fn stop_kills_an_app_that_ignores_sigterm_once_stop_grace_is_over() {
    let sb = Sandbox::new(
        r#"
[service.stubborn]
command = "python3 @FIXTURES@/forker.py ignore-term"
stop_grace = "500ms"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("stubborn:s"));
    let addr = tcp_addr(&route);
    let server = served_pid(addr);
    let t0 = Instant::now();
    expect_ok(c.stop("stubborn:s"));
    let stopped = t0.elapsed();
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(server)),
        "the app that ignores SIGTERM survived the stop"
    );
    assert!(
        stopped >= GRACE - Duration::from_millis(50),
        "stop returned after {stopped:?}, before the grace given to SIGTERM"
    );
    assert!(port_bindable(addr.port()));
    let logs = c.logs("stubborn:s");
    assert!(
        logs.iter()
            .any(|l| l.line.contains("got SIGTERM, ignoring")),
        "the app was asked politely first: {logs:?}"
    );
}

#[test]
fn a_killed_exec_helper_takes_its_process_group_along_and_the_port_stays() {
    let sb = Sandbox::new(TREES);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("parent:orphaned"));
    let addr = tcp_addr(&route);
    let app = c.status("parent:orphaned").pid.expect("pid") as i32;
    let helper = exec_helper_of(app);
    let server = served_pid(addr);
    assert_ne!(server, app, "parent-child serves from the child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(app) && !pid_alive(server)),
        "orphans of the killed helper survive: app {app} {}, server {server} {}",
        pid_alive(app),
        pid_alive(server)
    );
    // Restarted after the crash, on its own port (nobody kept it).
    assert!(
        wait_until(EVENT_DEADLINE, || {
            let s = c.status("parent:orphaned");
            s.state == InstanceState::Running && s.restarts == 1
        }),
        "{:?}",
        c.status("parent:orphaned")
    );
    let info = c.status("parent:orphaned");
    assert_eq!(info_port(&info), addr.port(), "{info:?}");
    assert_ne!(served_pid(addr), server);
}
