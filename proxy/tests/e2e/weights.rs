//! The original tenement's deploy verbs with this project's meanings: `tenctl weight`, `route`
//! and `deploy`, through the real tenctl, supervisor and proxy. Weights decide where
//! `{service}.{domain}` goes, are saved before they are published, and survive a supervisor
//! killed with SIGKILL and an instance's restart.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;

/// notes:v1 declared; readiness by TCP, then a health check of its own (`deploy` waits for
/// both). An instance whose `data_dir/health` file says `fail` answers /health with 500.
const APPS: &str = r#"
[service.notes]
command = "@TINY@"
ready = "tcp"
health = "/health"
health_interval = "1s"
[service.notes.env]
FIXTURE_HEALTH_FILE = "{data_dir}/{id}/health"

[instances]
notes = ["v1"]
"#;

/// Every instance's weight, as the supervisor reports it.
fn weights(admin: &mut Admin) -> BTreeMap<String, u32> {
    admin
        .ps()
        .into_iter()
        .map(|i| (i.instance.to_string(), i.weight))
        .collect()
}

fn expected(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

/// Which instances answered `n` requests for `notes.localhost`, and how often.
fn answers(sandbox: &Sandbox, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = get_ok(sandbox.proxy_addr, "notes.localhost", "/");
        *seen.entry(body).or_default() += 1;
    }
    seen
}

/// Until the proxy routes only to `instance` (a weight change reaches it with the next route
/// push): true if it does within the deadline.
fn only(sandbox: &Sandbox, instance: &str) -> bool {
    let want = format!("hello from {instance}");
    wait_until(EVENT_DEADLINE, || {
        answers(sandbox, 10).keys().all(|body| *body == want)
    })
}

#[test]
fn deploy_weight_and_route_move_traffic_and_weights_survive_a_killed_supervisor() {
    let sandbox = Sandbox::new(APPS);
    let supervisor = sandbox.start_supervisor();
    let _proxy = sandbox.start_proxy();
    let mut admin = sandbox.admin();
    // New instances get 100.
    assert_eq!(weights(&mut admin), expected(&[("notes:v1", 100)]));
    get_ok(sandbox.proxy_addr, "v1.notes.localhost", "/");

    // deploy: registered, started, ready and healthy, then weighted.
    let said = tenctl_ok(&sandbox, &["deploy", "notes:v2", "--weight", "50"]);
    assert!(said.starts_with("deployed notes:v2 at "), "{said}");
    assert!(said.contains("with weight 50"), "{said}");
    assert_eq!(
        weights(&mut admin),
        expected(&[("notes:v1", 100), ("notes:v2", 50)])
    );
    assert_eq!(
        admin.state("notes:v2"),
        tenement_proto::rpc::InstanceState::Running
    );
    let both = answers(&sandbox, 60);
    assert_eq!(both.len(), 2, "60 requests went to one instance: {both:?}");

    // weight 0: no more traffic for v1; --json says what changed.
    let changed: serde_json::Value =
        serde_json::from_str(&tenctl_ok(&sandbox, &["weight", "notes:v1", "0", "--json"])).unwrap();
    assert_eq!(
        changed["changes"][0],
        serde_json::json!({"instance": "notes:v1", "from": 100, "to": 0})
    );
    assert!(only(&sandbox, "notes:v2"), "{:?}", answers(&sandbox, 10));

    // route: all of v2's weight to v1, in one step.
    let said = tenctl_ok(&sandbox, &["route", "notes", "--from", "v2", "--to", "v1"]);
    assert_eq!(said, "notes:v2 weight 50 -> 0\nnotes:v1 weight 0 -> 50\n");
    assert!(only(&sandbox, "notes:v1"), "{:?}", answers(&sandbox, 10));

    // The supervisor killed outright and started again: the weights are the saved ones.
    supervisor.signal(nix::sys::signal::Signal::SIGKILL);
    supervisor.wait_exit(Duration::from_secs(10));
    let _supervisor = sandbox.start_supervisor();
    let mut admin = sandbox.admin();
    let after = expected(&[("notes:v1", 50), ("notes:v2", 0)]);
    assert_eq!(weights(&mut admin), after);
    // An instance's restart keeps its weight (the original resets it to 100).
    tenctl_ok(&sandbox, &["restart", "notes:v1"]);
    assert_eq!(weights(&mut admin), after);
    assert!(only(&sandbox, "notes:v1"), "{:?}", answers(&sandbox, 10));
    let ps = tenctl_ok(&sandbox, &["ps"]);
    assert!(ps.to_lowercase().contains("weight"), "{ps}");

    // Bad input: one line, the right exit status, nothing changed.
    for (args, status, says) in [
        (&["weight", "notes:v1", "101"][..], 2, "0 to 100"),
        (
            &["route", "notes", "--from", "v1", "--to", "ghost"][..],
            3,
            "notes:ghost",
        ),
        (
            &["route", "notes", "--from", "v1", "--to", "v1"][..],
            1,
            "both",
        ),
        (
            &["route", "notes", "--from", "v1", "--to", "api:v2"][..],
            2,
            "not an instance of notes",
        ),
        (&["deploy", "nope:v1"][..], 3, "no service nope"),
        (&["weight", "notes:ghost", "5"][..], 3, "notes:ghost"),
    ] {
        let out = tenctl(&sandbox, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "tenctl {args:?}: {stderr}");
        assert!(stderr.contains(says), "tenctl {args:?}: {stderr}");
        // One line (clap adds its pointer to --help under a usage error).
        let lines = stderr
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
            .count();
        assert_eq!(lines, 1, "tenctl {args:?}: {stderr}");
    }
    assert_eq!(weights(&mut admin), after);
}

#[test]
fn a_deploy_that_never_becomes_healthy_is_stopped_and_changes_no_weight() {
    let sandbox = Sandbox::new(APPS);
    let _daemons = sandbox.start();
    let mut admin = sandbox.admin();
    get_ok(sandbox.proxy_addr, "v1.notes.localhost", "/");
    tenctl_ok(&sandbox, &["weight", "notes:v1", "70"]);
    // v3 starts and listens, but its health check fails.
    let dir = sandbox.data_dir.join("notes").join("v3");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(dir.join("health"), "fail").unwrap();

    let out = tenctl(&sandbox, &["deploy", "notes:v3", "--timeout", "3s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("deploy of notes:v3 failed")
            && stderr.contains("GET /health")
            && stderr.contains("no weight changed"),
        "{stderr}"
    );
    assert_eq!(
        weights(&mut admin),
        expected(&[("notes:v1", 70), ("notes:v3", 0)])
    );
    assert_eq!(
        admin.state("notes:v3"),
        tenement_proto::rpc::InstanceState::Stopped
    );
    assert!(only(&sandbox, "notes:v1"));
}
