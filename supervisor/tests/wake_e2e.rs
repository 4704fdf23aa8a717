//! Waking instances with the real supervisor: single flight under concurrent wakes, the
//! environment an app gets, and the listen/ready modes (activate, unix, notify).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{Address, InstanceState};

#[test]
fn fifty_concurrent_wakes_of_a_stopped_instance_share_one_start() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
[service.web.env]
FIXTURE_START_DELAY_MS = "100"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(
        c.add(&["web:crowd"]),
        tenement_proto::rpc::Response::Added { .. }
    ));
    let barrier = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let barrier = barrier.clone();
            let mut client = Client::proxy(&sb);
            thread::spawn(move || {
                barrier.wait();
                client.wake("web:crowd")
            })
        })
        .collect();
    let mut generations = BTreeSet::new();
    let mut started = 0;
    for t in threads {
        let (route, s) = expect_woken(t.join().unwrap());
        assert_eq!(route.state, InstanceState::Running);
        generations.insert(route.generation);
        started += usize::from(s);
    }
    assert_eq!(
        generations.len(),
        1,
        "more than one process: {generations:?}"
    );
    assert!(started >= 1, "the wake that started the process says so");
    let starts: Vec<String> = c
        .events("web:crowd")
        .into_iter()
        .filter(|e| e.starts_with("started"))
        .collect();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let status = c.status("web:crowd");
    assert_eq!(status.state, InstanceState::Running);
    let app = status.pid.unwrap() as i32;
    let helper = exec_helper_of(app);
    assert!(
        [app, helper]
            .iter()
            .any(|p| starts[0].contains(&format!("pid {p}"))),
        "{starts:?} names neither app {app} nor helper {helper}"
    );
}

#[test]
fn port_is_stable_across_stop_and_wake() {
    let sb = Sandbox::new("[service.web]\ncommand = \"@TINY@\"\n");
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(
        c.add(&["web:a", "web:b"]),
        tenement_proto::rpc::Response::Added { .. }
    ));
    let registered = info_port(&c.status("web:a"));
    let (route, _) = expect_woken(c.wake("web:a"));
    assert_eq!(tcp_addr(&route).port(), registered);
    // The route carries the accept queue readiness saw, for the proxy's herd limit.
    let listening = tenement_proto::sockdiag::tcp_listeners(registered).expect("sock_diag");
    assert_eq!(listening.len(), 1, "{listening:?}");
    assert_eq!(route.backlog, Some(listening[0].backlog));
    for _ in 0..3 {
        expect_ok(c.stop("web:a"));
        // Another instance starting meanwhile must not take it.
        expect_woken(c.wake("web:b"));
        let (route, started) = expect_woken(c.wake("web:a"));
        assert!(started);
        assert_eq!(tcp_addr(&route).port(), registered);
        assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
        expect_ok(c.stop("web:b"));
    }
}

#[test]
fn app_environment_is_cleared_and_templated_and_its_data_dir_is_private() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
[service.web.env]
DATA_DIR = "{data_dir}/{id}"
GREETING = "hi {id} of {service} on {port}"
"#,
    );
    let _sup = sb.start_with_env(&[("SECRET_TOKEN", "leak")]);
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:alice"));
    let port = tcp_addr(&route).port();
    let (code, body) = http_get(tcp_addr(&route), "/env");
    assert_eq!(code, 200);
    let env: HashMap<&str, &str> = body.lines().filter_map(|l| l.split_once('=')).collect();
    let data_dir = sb.instance_data_dir("web:alice");
    let data_text = data_dir.to_string_lossy().into_owned();
    let port_text = port.to_string();
    let greeting = format!("hi alice of web on {port}");
    for (key, want) in [
        ("PORT", port_text.as_str()),
        ("HOST", "127.0.0.1"),
        ("TENEMENT_SERVICE", "web"),
        ("TENEMENT_ID", "alice"),
        ("TENEMENT_INSTANCE", "web:alice"),
        ("TENEMENT_DATA_DIR", data_text.as_str()),
        ("DATA_DIR", data_text.as_str()),
        ("GREETING", greeting.as_str()),
    ] {
        assert_eq!(env.get(key).copied(), Some(want), "{key} in:\n{body}");
    }
    for leaked in [
        "SECRET_TOKEN",
        "TENEMENT_EXEC_SERVER_OF",
        "RUST_LOG",
        "HOME",
    ] {
        assert!(
            !env.contains_key(leaked),
            "{leaked} leaked into the app:\n{body}"
        );
    }
    let mode = std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
}

/// Live processes named `comm` whose parent is `parent`.
fn children_named(parent: i32, comm: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid_alive(pid) && parent_pid(pid) == Some(parent))
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim_end() == comm)
        })
        .collect()
}

#[test]
fn helpers_are_the_supervisors_children_and_a_dead_exec_server_is_started_again() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
"#,
    );
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    let (first, _) = expect_woken(c.spawn("web:a"));
    // One exec server, and the helper it cloned is the supervisor's child (CLONE_PARENT), the
    // leader of its own process group, with nothing of the server's but its binary.
    let servers = children_named(sup.pid(), "tenement-execd");
    assert_eq!(servers.len(), 1, "exec servers: {servers:?}");
    let helpers = children_named(sup.pid(), "tenement-exec");
    assert_eq!(helpers.len(), 1, "helpers: {helpers:?}");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", helpers[0])).unwrap();
    let pgid: i32 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgid, helpers[0], "a helper leads its process group");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", helpers[0]))
        .unwrap()
        .count();
    assert!(
        fds <= 5,
        "the helper holds {fds} descriptors: stdio, its signalfd, no more"
    );

    // The server dies: running instances do not notice, and the next start gets a new one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(servers[0])));
    assert_eq!(http_get(tcp_addr(&first), "/").0, 200);
    assert_eq!(c.state("web:a"), InstanceState::Running);
    let (second, started) = expect_woken(c.spawn("web:b"));
    assert!(started);
    assert_eq!(http_get(tcp_addr(&second), "/").0, 200);
    let again = children_named(sup.pid(), "tenement-execd");
    assert_eq!(again.len(), 1, "exec servers: {again:?}");
    assert_ne!(again[0], servers[0]);
    assert_eq!(children_named(sup.pid(), "tenement-exec").len(), 2);
}

/// How long the app of `activated_socket_is_ready_before_the_app_listens` sleeps before it
/// accepts: far longer than a wake takes even on a loaded machine.
const SLOW_ACCEPT: Duration = Duration::from_secs(10);

#[test]
fn activated_socket_is_ready_before_the_app_listens() {
    let sb = Sandbox::new(&format!(
        r#"
[service.web]
command = "@TINY@"
listen = "activate"
[service.web.env]
FIXTURE_START_DELAY_MS = "{}"
"#,
        SLOW_ACCEPT.as_millis()
    ));
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let t0 = Instant::now();
    let (route, _) = expect_woken(c.spawn("web:fast"));
    let woken = t0.elapsed();
    // Not a speed limit: a wake that waited for the app to accept could not return before the
    // app's own sleep is over, so returning earlier proves it did not wait.
    assert!(
        woken < SLOW_ACCEPT,
        "the wake waited {woken:?} for an app that sleeps {SLOW_ACCEPT:?} before accepting"
    );
    // The kernel queues the connection until the app accepts on fd 3.
    let (code, body) = http_get(tcp_addr(&route), "/");
    assert_eq!((code, body.trim()), (200, "hello from web:fast"));
    let found = wait_until(EVENT_DEADLINE, || {
        c.logs("web:fast")
            .iter()
            .any(|l| l.line.contains("listening on fd 3"))
    });
    assert!(found, "tiny-http did not serve the inherited fd 3");
}

#[test]
fn unix_socket_instance_is_served_on_its_socket_path() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
listen = "unix"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:local"));
    let Address::Unix(path) = &route.address else {
        panic!("expected a unix address, got {}", route.address);
    };
    assert!(path.starts_with(&sb.runtime_dir), "{}", path.display());
    let (code, body) = http_get_unix(path, "/");
    assert_eq!((code, body.trim()), (200, "hello from web:local"));
    assert!(
        c.status("web:local").address.starts_with("unix:"),
        "{:?}",
        c.status("web:local")
    );
    let (_, env) = http_get_unix(path, "/env");
    assert!(!env.lines().any(|l| l.starts_with("PORT=")), "{env}");
}

#[test]
fn notify_ready_instance_is_woken_by_its_ready_message() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
ready = "notify"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, started) = expect_woken(c.spawn("web:told"));
    assert!(started);
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
    let (_, env) = http_get(tcp_addr(&route), "/env");
    assert!(
        env.lines().any(|l| l.starts_with("NOTIFY_SOCKET=")),
        "{env}"
    );
}

#[test]
fn wake_with_a_short_deadline_times_out_while_the_start_goes_on() {
    let sb = Sandbox::new(
        r#"
[service.slow]
command = "@TINY@"
[service.slow.env]
FIXTURE_START_DELAY_MS = "5000"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(
        c.add(&["slow:s"]),
        tenement_proto::rpc::Response::Added { .. }
    ));
    let t0 = Instant::now();
    let message = expect_error(
        c.call(tenement_proto::rpc::Request::Wake {
            instance: iid("slow:s"),
            timeout_ms: Some(100),
        }),
        tenement_proto::rpc::ErrorCode::WakeTimeout,
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(90),
        "waited {waited:?} for a 100 ms deadline: {message}"
    );
    // The app sleeps 5 s before it listens: still starting now, whatever the machine's load.
    assert_eq!(c.state("slow:s"), InstanceState::Starting);
    // The start was not abandoned: the next wake joins it.
    let (route, _) = expect_woken(c.wake("slow:s"));
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
    let starts = c
        .events("slow:s")
        .into_iter()
        .filter(|e| e.starts_with("started"))
        .count();
    assert_eq!(starts, 1);
}

#[test]
fn app_that_never_gets_ready_fails_at_startup_timeout_and_is_killed() {
    let sb = Sandbox::new(
        r#"
[service.stuck]
command = "@TINY@"
startup_timeout = "300ms"
stop_grace = "200ms"
backoff_base = "30s"
[service.stuck.env]
FIXTURE_START_DELAY_MS = "60000"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let t0 = Instant::now();
    let message = expect_error(
        c.spawn("stuck:s"),
        tenement_proto::rpc::ErrorCode::WakeFailed,
    );
    let waited = t0.elapsed();
    assert!(message.contains("startup_timeout"), "{message}");
    assert!(
        waited >= Duration::from_millis(300),
        "failed after {waited:?}, before startup_timeout = 300ms"
    );
    assert!(
        wait_until(EVENT_DEADLINE, || sb.leftover_processes().is_empty()),
        "the stuck app is still running: {:?}",
        sb.leftover_processes()
    );
    // The supervisor notices the exit after the processes are gone: wait for that too.
    assert!(
        wait_until(EVENT_DEADLINE, || c.state("stuck:s")
            == InstanceState::Unhealthy),
        "{:?}",
        c.status("stuck:s")
    );
    let status = c.status("stuck:s");
    assert_eq!(status.pid, None, "{status:?}");
}

#[test]
fn instance_whose_port_was_taken_by_a_stranger_moves_to_a_new_port() {
    let sb = Sandbox::new("[service.web]\ncommand = \"@TINY@\"\n");
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(
        c.add(&["web:moved"]),
        tenement_proto::rpc::Response::Added { .. }
    ));
    let old = info_port(&c.status("web:moved"));
    let stranger = std::net::TcpListener::bind(("127.0.0.1", old)).unwrap();
    let (route, _) = expect_woken(c.wake("web:moved"));
    let new = tcp_addr(&route).port();
    assert_ne!(new, old, "routed to the stranger's port");
    let (code, body) = http_get(tcp_addr(&route), "/");
    assert_eq!((code, body.trim()), (200, "hello from web:moved"));
    assert_eq!(info_port(&c.status("web:moved")), new);
    let saved = std::fs::read_to_string(sb.registry_file()).unwrap();
    assert!(
        saved.contains(&new.to_string()),
        "the new port is saved: {saved}"
    );
    drop(stranger);
}

#[test]
fn unknown_services_and_unregistered_instances_are_refused_without_side_effects() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"

[service.auto]
command = "@TINY@"
auto_spawn = true
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let mut p = Client::proxy(&sb);
    use tenement_proto::rpc::{ErrorCode, Request, Response};
    expect_error(c.wake("nope:x"), ErrorCode::UnknownService);
    expect_error(c.spawn("nope:x"), ErrorCode::UnknownService);
    expect_error(c.add(&["web:ok", "nope:x"]), ErrorCode::UnknownService);
    expect_error(p.wake("web:stranger"), ErrorCode::UnknownInstance);
    expect_error(
        p.call(Request::Resolve {
            instance: iid("web:stranger"),
        }),
        ErrorCode::UnknownInstance,
    );
    assert!(c.ps().is_empty(), "{:?}", c.ps());
    assert!(tree_listing(&sb.data_dir).is_empty());

    // With auto_spawn the proxy's resolve registers the instance, stopped.
    match p.call(Request::Resolve {
        instance: iid("auto:visitor"),
    }) {
        Response::Route { route } => assert_eq!(route.state, InstanceState::Stopped),
        other => panic!("resolve answered {other:?}"),
    }
    let names: Vec<String> = c.ps().iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(names, ["auto:visitor"]);
    let (route, _) = expect_woken(p.wake("auto:visitor"));
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
}
