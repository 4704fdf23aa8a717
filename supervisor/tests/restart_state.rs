//! What survives a restart of the supervisor itself: registered instances, their ports, and
//! nothing of their processes after a `kill -9`.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use support::*;
use tenement_proto::rpc::{InstanceState, Response};

const WEB: &str = r#"
[service.web]
command = "@TINY@"
stop_grace = "500ms"
"#;
const GRACE: Duration = Duration::from_millis(500);

fn ports(c: &mut Client) -> BTreeMap<String, u16> {
    c.ps()
        .iter()
        .map(|i| (i.instance.to_string(), info_port(i)))
        .collect()
}

#[test]
fn port_is_stable_across_a_supervisor_restart_and_sigterm_stops_instances() {
    let sb = Sandbox::new(WEB);
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:keep"));
    let port = tcp_addr(&route).port();
    let app = served_pid(tcp_addr(&route));

    let status = sup.terminate();
    assert!(status.success(), "supervisor exit: {status}");
    assert!(
        !pid_alive(app),
        "SIGTERM to the supervisor stops its instances first"
    );
    assert!(port_bindable(port));

    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let info = c.status("web:keep");
    assert_eq!(info.state, InstanceState::Stopped);
    assert_eq!(info_port(&info), port);
    let (route, _) = expect_woken(c.wake("web:keep"));
    assert_eq!(tcp_addr(&route).port(), port);
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
}

#[test]
fn registry_survives_kill_9_and_the_apps_die_with_the_supervisor() {
    let sb = Sandbox::new(WEB);
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(
        c.add(&["web:a", "web:b", "web:c"]),
        Response::Added { .. }
    ));
    let (route, _) = expect_woken(c.wake("web:b"));
    let app = served_pid(tcp_addr(&route));
    let helper = exec_helper_of(app);
    let before = ports(&mut c);
    assert_eq!(before.len(), 3);

    sup.kill9();
    // The exec helper gets SIGTERM from PR_SET_PDEATHSIG and takes its tree down.
    assert!(
        wait_until(GRACE + EVENT_DEADLINE, || !pid_alive(app)
            && !pid_alive(helper)),
        "app {app} (alive: {}) or helper {helper} (alive: {}) outlived the supervisor",
        pid_alive(app),
        pid_alive(helper)
    );
    assert!(wait_until(EVENT_DEADLINE, || port_bindable(
        tcp_addr(&route).port()
    )));

    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let list = c.ps();
    let names: Vec<String> = list.iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(
        names,
        ["web:a", "web:b", "web:c"],
        "each instance exactly once"
    );
    for info in &list {
        assert_eq!(info.state, InstanceState::Stopped, "{info:?}");
        assert_eq!(info.pid, None, "{info:?}");
    }
    assert_eq!(ports(&mut c), before, "ports changed across the restart");
    let (route, started) = expect_woken(c.wake("web:b"));
    assert!(started);
    let fresh = served_pid(tcp_addr(&route));
    assert_ne!(fresh, app);
    assert_eq!(tcp_addr(&route).port(), before["web:b"]);
}

#[test]
fn hand_written_registry_with_a_duplicate_entry_loads_without_duplicates() {
    let sb = Sandbox::new(WEB);
    let (lo, _) = sb.ports;
    fs::create_dir_all(&sb.state_dir).unwrap();
    let registry = format!(
        r#"{{
  "version": 1,
  "instances": [
    {{ "instance": "web:dup", "port": {p0}, "weight": 1, "created_ms": 1 }},
    {{ "instance": "web:other", "port": {p1}, "weight": 1, "created_ms": 1 }},
    {{ "instance": "web:dup", "port": {p2}, "weight": 1, "created_ms": 2 }}
  ]
}}"#,
        p0 = lo + 10,
        p1 = lo + 11,
        p2 = lo + 12,
    );
    fs::write(sb.registry_file(), registry).unwrap();
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let got = ports(&mut c);
    let want: BTreeMap<String, u16> = [
        ("web:dup".to_owned(), lo + 10),
        ("web:other".to_owned(), lo + 11),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    // The file is rewritten without the duplicate.
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(sb.registry_file()).unwrap()).unwrap();
    let saved = saved["instances"].as_array().unwrap();
    assert_eq!(saved.len(), 2, "{saved:?}");
    // And a new instance does not get the duplicate's port or a taken one.
    assert!(matches!(c.add(&["web:new"]), Response::Added { .. }));
    let port = info_port(&c.status("web:new"));
    assert!(port != lo + 10 && port != lo + 11, "port {port}");
    let (route, _) = expect_woken(c.wake("web:dup"));
    assert_eq!(tcp_addr(&route).port(), lo + 10);
}

#[test]
fn awkward_trees_die_after_kill_9_of_the_supervisor() {
    let sb = Sandbox::new(
        r#"
[service.stubborn]
command = "python3 @FIXTURES@/forker.py ignore-term"
stop_grace = "500ms"

[service.daemon]
command = "python3 @FIXTURES@/forker.py double-fork"
stop_grace = "500ms"
[service.daemon.env]
DATA_DIR = "{data_dir}/{id}"
"#,
    );
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    let mut tree = Vec::new();
    let mut ports = Vec::new();
    for id in ["stubborn:s", "daemon:d"] {
        let (route, _) = expect_woken(c.spawn(id));
        let app = c.status(id).pid.unwrap() as i32;
        let helper = exec_helper_of(app);
        tree.push(helper);
        tree.push(app);
        tree.push(served_pid(tcp_addr(&route)));
        tree.extend(descendants(helper));
        ports.push(tcp_addr(&route).port());
    }
    let daemon_pid = read_when_written(
        &sb.instance_data_dir("daemon:d").join("daemon.pid"),
        EVENT_DEADLINE,
    );
    tree.push(daemon_pid.trim().parse().unwrap());

    sup.kill9();
    // The stubborn app outlives its SIGTERM by stop_grace; the deadline only bounds a hang.
    let gone = wait_until(GRACE + EVENT_DEADLINE, || {
        tree.iter().all(|&p| !pid_alive(p))
    });
    let alive: Vec<i32> = tree.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(gone, "{alive:?} of {tree:?} outlived the supervisor");
    for port in ports {
        assert!(port_bindable(port), "port {port} still taken");
    }
}

#[test]
fn a_second_supervisor_on_the_same_directories_refuses_and_leaves_the_first_alone() {
    let sb = Sandbox::new(WEB);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:first"));
    let app = served_pid(tcp_addr(&route));

    let (status, output) = sb.run_to_exit(Duration::from_secs(10));
    assert!(!status.success(), "a second supervisor started: {output}");
    assert!(output.contains("already"), "{output}");
    assert!(
        pid_alive(app),
        "starting a second supervisor killed the first one's instance {app}:\n{output}"
    );
    assert_eq!(http_get(tcp_addr(&route), "/").0, 200);
    assert_eq!(c.state("web:first"), InstanceState::Running);
    // The first supervisor still answers, on sockets that are still its own.
    let mut fresh = Client::admin(&sb);
    assert_eq!(fresh.ps().len(), 1);
}

#[test]
fn an_invalid_config_exits_2_with_file_line_and_column() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
idle_timout = "5m"
"#,
    );
    let (status, output) = sb.run_to_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{output}");
    let config = sb.config_path.to_string_lossy().into_owned();
    assert!(
        output.contains(&format!("{config}:")) && output.contains("idle_timout"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    assert!(!sb.admin_socket().exists());
}

#[test]
fn sigterm_to_the_supervisor_stops_an_app_that_ignores_sigterm_after_its_grace() {
    let sb = Sandbox::new(
        r#"
[service.stubborn]
command = "python3 @FIXTURES@/forker.py ignore-term"
stop_grace = "500ms"
"#,
    );
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("stubborn:s"));
    let app = served_pid(tcp_addr(&route));
    let t0 = std::time::Instant::now();
    let status = sup.terminate();
    let took = t0.elapsed();
    assert!(status.success(), "{status}");
    // The app ignores SIGTERM: the supervisor must give it its grace before the SIGKILL, and
    // `terminate` bounds the whole shutdown with a generous deadline.
    assert!(
        took >= GRACE - Duration::from_millis(50),
        "shutdown took {took:?}: the app that ignores SIGTERM was not given its stop_grace"
    );
    assert!(!pid_alive(app), "app {app} outlived the supervisor");
    assert!(sb.leftover_processes().is_empty());
    assert!(
        !sb.admin_socket().exists(),
        "the admin socket is removed on exit"
    );
}

#[test]
fn a_corrupt_registry_stops_the_start_with_the_fix_instead_of_forgetting_instances() {
    let sb = Sandbox::new(WEB);
    fs::create_dir_all(&sb.state_dir).unwrap();
    fs::write(sb.registry_file(), b"{\"version\":1,\"instan").unwrap();
    let (status, output) = sb.run_to_exit(Duration::from_secs(10));
    assert!(!status.success(), "{output}");
    assert!(output.contains("corrupt"), "{output}");
    assert!(
        output.contains(&sb.registry_file().to_string_lossy().into_owned()),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
    // The file is left for the operator, not overwritten with an empty registry.
    assert_eq!(
        fs::read(sb.registry_file()).unwrap(),
        b"{\"version\":1,\"instan"
    );
}

#[test]
fn instances_declared_in_the_config_are_registered_once_and_stopped() {
    let sb = Sandbox::new(&format!("{WEB}\n[instances]\nweb = [\"alice\", \"bob\"]\n"));
    let sup = sb.start();
    let mut c = Client::admin(&sb);
    let before = ports(&mut c);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["web:alice", "web:bob"],
        "{before:?}"
    );
    assert!(c.ps().iter().all(|i| i.state == InstanceState::Stopped));
    assert!(
        sb.leftover_processes().is_empty(),
        "declared is not started"
    );
    sup.terminate();
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert_eq!(ports(&mut c), before);
}
