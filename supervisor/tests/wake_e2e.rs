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
    assert_eq!(generations.len(), 1, "more than one process: {generations:?}");
    assert!(started >= 1, "the wake that started the process says so");
    let starts: Vec<String> = c
        .events("web:crowd")
        .into_iter()
        .filter(|e| e.starts_with("started"))
        .collect();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let status = c.status("web:crowd");
    assert_eq!(status.state, InstanceState::Running);
    assert!(starts[0].contains(&status.pid.unwrap().to_string()), "{starts:?}");
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
    for leaked in ["SECRET_TOKEN", "TENEMENT_SPAWN_SPEC", "RUST_LOG", "HOME"] {
        assert!(!env.contains_key(leaked), "{leaked} leaked into the app:\n{body}");
    }
    let mode = std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
}

#[test]
fn activated_socket_is_ready_before_the_app_listens() {
    let sb = Sandbox::new(
        r#"
[service.web]
command = "@TINY@"
listen = "activate"
[service.web.env]
FIXTURE_START_DELAY_MS = "500"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let t0 = Instant::now();
    let (route, _) = expect_woken(c.spawn("web:fast"));
    let woken = t0.elapsed();
    assert!(
        woken < Duration::from_millis(400),
        "the wake waited {woken:?} for an app that sleeps 500 ms before accepting"
    );
    // The kernel queues the connection until the app accepts on fd 3.
    let (code, body) = http_get(tcp_addr(&route), "/");
    assert_eq!((code, body.trim()), (200, "hello from web:fast"));
    let found = wait_until(Duration::from_secs(2), || {
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
    assert!(env.lines().any(|l| l.starts_with("NOTIFY_SOCKET=")), "{env}");
}
