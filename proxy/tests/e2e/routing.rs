//! Routing by Host: instance hosts wake their instance, service hosts pick one, the domain is
//! the status page, and everything else is refused before it reaches the supervisor or the
//! file system.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::thread;
use std::time::Duration;

use tenement_proto::rpc::InstanceState;

use crate::support::*;

const WEB: &str = r#"
[service.web]
command = "@TINY@"

[instances]
web = ["alice"]
"#;

#[test]
fn wake_on_first_request() {
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, _proxy) = sandbox.start();
    let mut admin = sandbox.admin();
    assert_eq!(admin.state("web:alice"), InstanceState::Stopped);

    let body = get_ok(sandbox.proxy_addr, "alice.web.localhost", "/");
    assert_eq!(body, "hello from web:alice");

    let ps = admin.ps();
    let alice = ps
        .iter()
        .find(|i| i.instance.to_string() == "web:alice")
        .expect("web:alice is listed");
    assert_eq!(alice.state, InstanceState::Running, "{alice:?}");
    assert!(alice.pid.is_some(), "{alice:?}");
    assert_eq!(admin.starts("web:alice"), 1);
}

#[test]
fn bad_hosts_are_400_and_unknown_are_404() {
    let sandbox = Sandbox::new(
        r#"
[service.notes]
command = "@TINY@"

[instances]
notes = ["alice"]
"#,
    );
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    let cases: [(&str, &[u8], u16); 8] = [
        (
            "a path in the id",
            b"GET / HTTP/1.1\r\nHost: ../x.notes.localhost\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "an id that is not a DNS label",
            b"GET / HTTP/1.1\r\nHost: a_b.notes.localhost\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "an unregistered instance",
            b"GET / HTTP/1.1\r\nHost: zed.notes.localhost\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "an unknown service",
            b"GET / HTTP/1.1\r\nHost: nope.localhost\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "an unknown service with an id",
            b"GET / HTTP/1.1\r\nHost: x.nope.localhost\r\nConnection: close\r\n\r\n",
            404,
        ),
        ("no Host at all (HTTP/1.0)", b"GET / HTTP/1.0\r\n\r\n", 400),
        (
            "another domain",
            b"GET / HTTP/1.1\r\nHost: evil.com\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "the domain itself: the dashboard's login page",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            200,
        ),
    ];
    for (what, request, status) in cases {
        let reply = exchange(addr, request).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(reply.status(), status, "{what}: {}", reply.text());
    }
    let home = get(addr, "localhost", "/");
    assert!(home.text().contains("Log in"), "{}", home.text());
    assert!(
        !home.text().contains("notes:alice"),
        "the login page shows no data"
    );

    assert_eq!(
        sandbox.data_listing(),
        Vec::<String>::new(),
        "nothing may be created under data_dir"
    );
    let mut admin = sandbox.admin();
    let registered: Vec<String> = admin.ps().iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(registered, ["notes:alice"], "nothing was registered");
    assert_eq!(admin.state("notes:alice"), InstanceState::Stopped);
}

#[test]
fn auto_spawn_registers_unknown_instances() {
    let sandbox = Sandbox::new(
        r#"
[service.svc]
command = "@TINY@"
auto_spawn = true
"#,
    );
    let (_supervisor, _proxy) = sandbox.start();
    let body = get_ok(sandbox.proxy_addr, "new.svc.localhost", "/");
    assert_eq!(body, "hello from svc:new");
    let mut admin = sandbox.admin();
    assert_eq!(admin.state("svc:new"), InstanceState::Running);
}

const TWO_NOTES: &str = r#"
[service.notes]
command = "@TINY@"

[instances]
notes = ["a", "b"]
"#;

/// The proxy's route table holds `instances` (its own `tenement_instances` gauge, on a
/// metrics listener at `metrics`).
fn wait_for_routes(metrics: std::net::SocketAddr, instances: usize) {
    let synced = wait_until(EVENT_DEADLINE, || {
        let Ok(reply) = try_get(metrics, "metrics", "/metrics") else {
            return false;
        };
        let total: f64 = reply
            .text()
            .lines()
            .filter(|l| l.starts_with("tenement_instances{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        total as usize == instances
    });
    assert!(
        synced,
        "the proxy's route table never held {instances} instances"
    );
}

#[test]
fn service_host_picks_a_running_instance() {
    let sandbox = Sandbox::new(TWO_NOTES);
    let supervisor = sandbox.start_supervisor();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], sandbox.spare_port()));
    let mut command = sandbox.proxy_command();
    command.arg("--metrics-listen").arg(metrics.to_string());
    let proxy = sandbox.start_proxy_with(command);
    let _daemons = (supervisor, proxy);
    wait_for_routes(metrics, 2);
    let addr = sandbox.proxy_addr;
    let mut admin = sandbox.admin();

    // None runs: one is woken.
    let first: i32 = get_ok(addr, "notes.localhost", "/pid")
        .parse()
        .expect("pid");
    let running: Vec<String> = admin
        .ps()
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .map(|i| i.instance.to_string())
        .collect();
    assert_eq!(running.len(), 1, "exactly one was woken: {running:?}");
    // One runs: it gets every request, nothing else is woken.
    for _ in 0..10 {
        let pid: i32 = get_ok(addr, "notes.localhost", "/pid")
            .parse()
            .expect("pid");
        assert_eq!(pid, first, "a stopped instance was picked while one runs");
    }
    let other = if running[0] == "notes:a" { "b" } else { "a" };
    assert_eq!(
        admin.state(&format!("notes:{other}")),
        InstanceState::Stopped
    );

    // Both run: both get requests (equal weights).
    get_ok(addr, &format!("{other}.notes.localhost"), "/");
    let mut seen = HashSet::new();
    for _ in 0..60 {
        seen.insert(get_ok(addr, "notes.localhost", "/pid"));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "60 requests all went to one instance");
}

#[test]
fn service_host_waits_for_the_first_route_snapshot() {
    // Boot order (or a proxy restart with requests queued in the backlog): the proxy accepts
    // before it has heard from the supervisor. An instance host waits for the supervisor; a
    // service host must too, instead of answering 404 from an empty table.
    let sandbox = Sandbox::new(TWO_NOTES);
    let _proxy = sandbox.start_proxy();
    let addr = sandbox.proxy_addr;
    let instance = thread::spawn(move || get(addr, "a.notes.localhost", "/"));
    let service = thread::spawn(move || get(addr, "notes.localhost", "/"));
    thread::sleep(Duration::from_millis(300));
    let _supervisor = sandbox.start_supervisor();
    let instance = instance.join().expect("instance request");
    let service = service.join().expect("service request");
    assert_eq!(instance.status(), 200, "{}", instance.text());
    assert_eq!(
        service.status(),
        200,
        "a service-host request that arrives before the proxy's first route snapshot: {}",
        service.text()
    );
}

#[test]
fn unix_socket_and_activate_instances_are_reachable() {
    let sandbox = Sandbox::new(
        r#"
[service.act]
command = "@TINY@"
listen = "activate"

[service.sock]
command = "@TINY@"
listen = "unix"

[instances]
act = ["a"]
sock = ["a"]
"#,
    );
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    assert_eq!(get_ok(addr, "a.act.localhost", "/"), "hello from act:a");
    let env = get_ok(addr, "a.act.localhost", "/env");
    assert!(
        env.contains("LISTEN_FDNAMES=http"),
        "not served on a handed-off socket:\n{env}"
    );

    let reply = get(addr, "a.sock.localhost", "/");
    let socket = sandbox.runtime_dir.join("instances").join("sock.a.sock");
    let detail = match std::fs::metadata(&socket) {
        Ok(m) => format!(
            "{} is mode {:o}, uid {} gid {}; the proxy runs as {}",
            socket.display(),
            m.permissions().mode() & 0o7777,
            m.uid(),
            m.gid(),
            if is_root() { PROXY_USER } else { "this user" },
        ),
        Err(e) => format!("{}: {e}", socket.display()),
    };
    assert_eq!(
        reply.status(),
        200,
        "listen = \"unix\" through the proxy: {} ({detail})",
        reply.text().trim()
    );
    assert_eq!(reply.text().trim(), "hello from sock:a");
}

/// `tenctl reload` adds a service: the supervisor tells the proxy, which reads the config
/// again, so the new service answers without a restart of the proxy.
#[test]
fn a_service_added_by_a_reload_is_routed_without_restarting_the_proxy() {
    let sandbox = Sandbox::new(
        r#"
[service.old]
command = "@TINY@"
"#,
    );
    let (_supervisor, proxy) = sandbox.start();
    let proxy_pid = proxy.pid();
    let mut admin = sandbox.admin();
    assert_eq!(
        get(sandbox.proxy_addr, "a.new.localhost", "/").status(),
        404
    );

    let text = std::fs::read_to_string(&sandbox.config_path).expect("config");
    std::fs::write(
        &sandbox.config_path,
        format!(
            "{text}\n[service.new]\ncommand = \"{}\"\n",
            tiny_http().display()
        ),
    )
    .expect("write config");
    match admin.call(tenement_proto::rpc::Request::Reload) {
        tenement_proto::rpc::Response::Reloaded { .. } => {}
        other => panic!("reload: {other:?}"),
    }
    match admin.call(tenement_proto::rpc::Request::Add {
        instances: vec![iid("new:a")],
    }) {
        tenement_proto::rpc::Response::Added { .. } => {}
        other => panic!("add: {other:?}"),
    }
    assert_new_service_routed(&sandbox);
    assert!(
        sandbox.proxy_log().contains("config reloaded"),
        "{}",
        sandbox.proxy_log()
    );
    assert!(
        pid_alive(proxy_pid),
        "the proxy that served it is the one started first"
    );
}

/// The config changed while the proxy was not subscribed (here: the supervisor restarted on
/// an edited file, which pushes no reload to anyone): the proxy reads the file again when its
/// subscription is back, so the new service is routed by the proxy that was already running.
#[test]
fn a_config_changed_while_the_supervisor_was_away_is_read_when_the_proxy_resubscribes() {
    let sandbox = Sandbox::new(
        r#"
[service.old]
command = "@TINY@"
"#,
    );
    let (supervisor, mut proxy) = sandbox.start();
    assert_eq!(
        get(sandbox.proxy_addr, "a.new.localhost", "/").status(),
        404
    );
    supervisor.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(supervisor.wait_exit(EVENT_DEADLINE).success());

    let text = std::fs::read_to_string(&sandbox.config_path).expect("config");
    let added = format!(
        "{text}\n[service.new]\ncommand = \"{}\"\n\n[instances]\nnew = [\"a\"]\n",
        tiny_http().display()
    );
    std::fs::write(&sandbox.config_path, added).expect("write config");
    let _supervisor = sandbox.start_supervisor();

    assert_new_service_routed(&sandbox);
    assert!(proxy.try_wait().is_none(), "the same proxy served it");
}

/// Waits until `a.new.localhost` is answered by `new:a`.
fn assert_new_service_routed(sandbox: &Sandbox) {
    let answered = wait_until(EVENT_DEADLINE, || {
        try_get(sandbox.proxy_addr, "a.new.localhost", "/")
            .is_ok_and(|r| r.status() == 200 && r.text().contains("new:a"))
    });
    assert!(
        answered,
        "the new service is not routed:\n{}",
        sandbox.proxy_log()
    );
}
