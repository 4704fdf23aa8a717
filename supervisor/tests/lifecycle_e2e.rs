//! The instance lifecycle driven over the admin RPC of the real supervisor, with real apps:
//! spawn, stop, restart, rm, crashes, health checks, start failures.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{ErrorCode, InstanceState, Response};

const WEB: &str = r#"
[service.web]
command = "@TINY@"
stop_grace = "2s"
"#;

#[test]
fn spawn_stop_restart_and_rm_drive_real_processes() {
    let sb = Sandbox::new(WEB);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);

    // spawn: running, with a pid and a port that answers HTTP.
    let (route, started) = expect_woken(c.spawn("web:alice"));
    assert!(started, "spawn of a new instance starts a process");
    assert_eq!(route.state, InstanceState::Running);
    let addr = tcp_addr(&route);
    let status = c.status("web:alice");
    assert_eq!(status.state, InstanceState::Running);
    let app = status.pid.expect("a running instance has a pid") as i32;
    let helper = exec_helper_of(app);
    let (code, body) = http_get(addr, "/");
    assert_eq!((code, body.trim()), (200, "hello from web:alice"));
    assert_eq!(served_pid(addr), app, "status shows the app's pid");

    // stop: stopped, no pid, the processes gone, the port closed.
    expect_ok(c.stop("web:alice"));
    let status = c.status("web:alice");
    assert_eq!(status.state, InstanceState::Stopped);
    assert_eq!(status.pid, None);
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(helper) && !pid_alive(app)),
        "helper {helper} or app {app} survived stop"
    );
    assert!(
        !port_listening(addr.port()),
        "port {} still open",
        addr.port()
    );

    // restart of a running instance: a new process generation.
    let (route, _) = expect_woken(c.wake("web:alice"));
    let before = served_pid(tcp_addr(&route));
    let (restarted, started) = expect_woken(c.restart("web:alice"));
    assert!(started, "restart starts a process");
    assert!(restarted.generation > route.generation);
    let after = served_pid(tcp_addr(&restarted));
    assert_ne!(before, after, "restart must run a new process");
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(before)));
    assert_eq!(c.status("web:alice").restarts, 1);

    // rm: gone from ps, process stopped, data kept; wake no longer knows it.
    let data = sb.instance_data_dir("web:alice");
    assert!(data.is_dir(), "{} was created at start", data.display());
    expect_ok(c.remove("web:alice", false));
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(after)));
    assert!(
        c.ps().iter().all(|i| i.instance != iid("web:alice")),
        "rm left the instance in ps"
    );
    assert!(data.is_dir(), "rm without purge keeps the data");
    expect_error(c.wake("web:alice"), ErrorCode::UnknownInstance);
    expect_error(c.try_status("web:alice"), ErrorCode::UnknownInstance);

    // rm --purge deletes the data directory.
    expect_woken(c.spawn("web:alice"));
    expect_ok(c.remove("web:alice", true));
    assert!(!data.exists(), "rm --purge left {}", data.display());
    assert!(c.ps().is_empty());
    expect_error(c.wake("web:alice"), ErrorCode::UnknownInstance);
}

#[test]
fn crash_is_detected_by_reaping_and_restarted_after_backoff() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
backoff_base = "200ms"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:crashy"));
    let addr = tcp_addr(&route);
    let first = c.status("web:crashy").pid.expect("pid");

    let t0 = Instant::now();
    // `/crash` exits with status 3 without answering.
    assert!(
        try_http_get(addr, "/crash").is_err(),
        "/crash must not answer"
    );
    // No health check is configured and nothing else polls the app: reaping its exit is the
    // only way the supervisor can notice, so noticing at all proves it. The deadline only
    // bounds a hang.
    assert!(
        wait_until(EVENT_DEADLINE, || c.state("web:crashy")
            != InstanceState::Running),
        "the crash was not noticed within {EVENT_DEADLINE:?}"
    );
    eprintln!("crash noticed after {:?}", t0.elapsed());

    let restarted = wait_until(EVENT_DEADLINE, || {
        let s = c.status("web:crashy");
        s.state == InstanceState::Running && s.pid.is_some_and(|p| p != first)
    });
    assert!(
        restarted,
        "not restarted within {EVENT_DEADLINE:?}: {:?}",
        c.status("web:crashy")
    );
    // After the backoff: the supervisor scheduled the restart backoff_base after the crash
    // (that the schedule is kept is tested with injected time in lifecycle/tests.rs,
    // `crash_while_running_restarts_after_backoff`).
    let events = c.events("web:crashy");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("crashed") && e.ends_with("restarting in 200 ms")),
        "no restart scheduled after backoff_base = 200 ms: {events:?}"
    );
    let status = c.status("web:crashy");
    assert_eq!(status.restarts, 1, "{status:?}");
    assert!(
        status
            .last_exit
            .as_deref()
            .is_some_and(|e| e.contains("exit status 3")),
        "last_exit should say why the instance restarted: {status:?}"
    );
    let (code, _) = http_get(addr, "/");
    assert_eq!(code, 200, "the restarted instance serves on the same port");
}

#[test]
fn failing_health_checks_restart_then_fail_until_an_operator_restarts() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
health = "/health"
ready = "tcp"
health_interval = "1s"
health_timeout = "900ms"
unhealthy_threshold = 2
max_restarts = 2
restart_window = "60s"
backoff_base = "100ms"
stop_grace = "1s"
[service.web.env]
FIXTURE_HEALTH_FILE = "{data_dir}/{id}.health"
"#,
    );
    let health_file = sb.data_dir.join("web").join("sick.health");
    fs::create_dir_all(health_file.parent().unwrap()).unwrap();
    fs::write(&health_file, "fail\n").unwrap();
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:sick"));
    assert_eq!(http_get(tcp_addr(&route), "/health").0, 500);

    // 3 starts x (2 failed probes 1 s apart) + backoffs: about 6 s.
    assert!(
        wait_until(Duration::from_secs(6) + EVENT_DEADLINE, || c
            .state("web:sick")
            == InstanceState::Failed),
        "never failed: {:?}",
        c.status("web:sick")
    );
    let status = c.status("web:sick");
    assert_eq!(status.restarts, 2, "{status:?}");
    assert_eq!(status.pid, None, "a failed instance has no process");
    assert!(
        status
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("health")),
        "the reason names the health checks: {status:?}"
    );
    let message = expect_error(c.wake("web:sick"), ErrorCode::InstanceFailed);
    assert!(message.contains("web:sick"), "{message}");
    // It stays failed: no start behind the operator's back.
    assert_eq!(c.state("web:sick"), InstanceState::Failed);

    // Fixed, then restarted by the operator: running, and it stays so.
    fs::write(&health_file, "ok\n").unwrap();
    let (route, started) = expect_woken(c.restart("web:sick"));
    assert!(started);
    assert_eq!(http_get(tcp_addr(&route), "/health").0, 200);
    let pid = c.status("web:sick").pid;
    assert!(pid.is_some());
    // Three health intervals: a restart would take two failed checks in a row. The timeout of
    // a check (900 ms) is generous on purpose: a check that a loaded machine answers slowly
    // must not count as a failure here.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let s = c.status("web:sick");
        assert_eq!(s.state, InstanceState::Running, "{s:?}");
        assert_eq!(s.pid, pid, "restarted although healthy: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.status("web:sick").health, "healthy");
}

#[test]
fn service_without_health_path_is_never_health_checked() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
backoff_base = "100ms"
[service.web.env]
FIXTURE_HEALTH_FILE = "{data_dir}/{id}.health"
"#,
    );
    let health_file = sb.data_dir.join("web").join("plain.health");
    fs::create_dir_all(health_file.parent().unwrap()).unwrap();
    fs::write(&health_file, "fail\n").unwrap();
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:plain"));
    assert_eq!(
        http_get(tcp_addr(&route), "/health").0,
        500,
        "its /health would fail"
    );
    let pid = c.status("web:plain").pid;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let s = c.status("web:plain");
        assert_eq!(s.state, InstanceState::Running, "{s:?}");
        assert_eq!(s.restarts, 0, "{s:?}");
        assert_eq!(s.pid, pid, "{s:?}");
        assert_eq!(s.health, "unchecked", "{s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = c.events("web:plain");
    assert!(
        events.iter().all(|e| !e.contains("health")),
        "no health check may run: {events:?}"
    );
}

#[test]
fn exit_during_start_is_wake_failed_with_the_status_and_the_last_output() {
    let sb = Sandbox::new(
        r#"
[service.bad]
command = "@TINY@"
backoff_base = "5s"
[service.bad.env]
FIXTURE_EXIT_AT_START = "7"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    // Several times: the app's last line and its exit race inside the supervisor.
    for n in 0..5 {
        let id = format!("bad:b{n}");
        let response = if n % 2 == 0 {
            c.spawn(&id)
        } else {
            assert!(matches!(
                c.add(&[id.as_str()]),
                tenement_proto::rpc::Response::Added { .. }
            ));
            c.wake(&id)
        };
        let message = expect_error(response, ErrorCode::WakeFailed);
        assert!(message.contains("exit status 7"), "{message}");
        assert!(
            message.contains("starting"),
            "the error must carry the app's last output line: {message}"
        );
    }
}

#[test]
fn missing_command_is_wake_failed_naming_it_not_found() {
    let sb = Sandbox::new(
        r#"
[service.ghost]
command = "no-such-program-tenement-e2e"
backoff_base = "5s"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let message = expect_error(c.spawn("ghost:x"), ErrorCode::WakeFailed);
    assert!(message.contains("not found"), "{message}");
    assert!(
        message.contains("no-such-program-tenement-e2e"),
        "{message}"
    );
    assert_ne!(c.state("ghost:x"), InstanceState::Running);
}

#[test]
fn notes_example_keeps_each_tenants_data_across_stop_and_wake() {
    let sb = Sandbox::new(
        r#"
[service.notes]
command = "python3 app.py"
workdir = "@NOTES@"
health = "/health"
[service.notes.env]
DATA_DIR = "{data_dir}/{id}"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (alice, _) = expect_woken(c.spawn("notes:alice"));
    let (code, token) = http_get(tcp_addr(&alice), "/token");
    assert_eq!(code, 200);
    let auth = format!("Bearer {}", token.trim());
    let auth = [("Authorization", auth.as_str())];
    let (code, _) = http_request(tcp_addr(&alice), "POST", "/notes", &auth, "buy milk");
    assert_eq!(code, 201);
    assert!(sb
        .instance_data_dir("notes:alice")
        .join("notes.db")
        .is_file());

    expect_ok(c.stop("notes:alice"));
    let (alice, started) = expect_woken(c.wake("notes:alice"));
    assert!(started);
    let (code, body) = http_request(tcp_addr(&alice), "GET", "/notes", &auth, "");
    assert_eq!(code, 200);
    assert!(body.contains("buy milk"), "{body}");

    let (bob, _) = expect_woken(c.spawn("notes:bob"));
    assert_ne!(tcp_addr(&bob), tcp_addr(&alice));
    let (code, body) = http_request(tcp_addr(&bob), "GET", "/notes", &auth, "");
    assert_eq!(code, 403, "alice's token opens bob's notes: {body}");
    let (_, bob_token) = http_get(tcp_addr(&bob), "/token");
    let bob_auth = format!("Bearer {}", bob_token.trim());
    let (code, body) = http_request(
        tcp_addr(&bob),
        "GET",
        "/notes",
        &[("Authorization", bob_auth.as_str())],
        "",
    );
    assert_eq!(code, 200);
    assert!(!body.contains("buy milk"), "bob sees alice's notes: {body}");
}

#[test]
fn supervisor_raises_its_open_file_limit_and_apps_get_the_inherited_one_back() {
    let sb = Sandbox::new(
        r#"
[service.plain]
command = "sh"
args = ["-c", "ulimit -Sn >{data_dir}/{id}.nofile; exec @TINY@"]
[service.limited]
command = "sh"
args = ["-c", "ulimit -Sn >{data_dir}/{id}.nofile; exec @TINY@"]
nofile = 300
"#,
    );
    let sup = sb.start_with_nofile_soft(512);
    let limits = fs::read_to_string(format!("/proc/{}/limits", sup.pid())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields[3], fields[4],
        "soft = hard for the supervisor: {line}"
    );
    assert_ne!(fields[3], "512", "{line}");

    let mut c = Client::admin(&sb);
    expect_woken(c.spawn("plain:a"));
    expect_woken(c.spawn("limited:a"));
    let read = |service: &str| {
        let path = sb
            .instance_data_dir(&format!("{service}:a"))
            .with_extension("nofile");
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert_eq!(
        read("plain").trim(),
        "512",
        "apps get the limit systemd gave"
    );
    assert_eq!(read("limited").trim(), "300", "nofile in the config wins");
}

#[test]
fn list_of_thousands_of_instances_arrives_whole() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
listen = "unix" # no port each: the sandbox has a few hundred
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    // One JSON frame for all of them would pass the 1 MiB frame cap.
    let names: Vec<String> = (0..3000).map(|n| format!("web:tenant-{n:05}")).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    match c.add(&ids) {
        Response::Added { added, existing } => {
            assert_eq!((added.len(), existing.len()), (3000, 0));
        }
        other => panic!("add: {other:?}"),
    }
    let mut listed: Vec<String> = c.ps().iter().map(|i| i.instance.to_string()).collect();
    listed.sort();
    assert_eq!(listed, names);
}

#[test]
fn add_that_runs_out_of_ports_registers_nothing() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let range = usize::from(sb.ports.1 - sb.ports.0) + 1;
    let first: Vec<String> = (0..range - 10).map(|n| format!("web:a{n}")).collect();
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    assert!(matches!(c.add(&first), Response::Added { .. }));
    // 20 more do not fit in the 10 ports left: none of them is registered.
    let more: Vec<String> = (0..20).map(|n| format!("web:b{n}")).collect();
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let message = expect_error(c.add(&more), ErrorCode::Unavailable);
    assert!(message.contains("port_range"), "{message}");
    assert_eq!(c.ps().len(), range - 10);
    // The ports of the refused ones were given back.
    let fits: Vec<String> = (0..10).map(|n| format!("web:c{n}")).collect();
    let fits: Vec<&str> = fits.iter().map(String::as_str).collect();
    assert!(matches!(c.add(&fits), Response::Added { .. }));
    assert_eq!(c.ps().len(), range);
}
