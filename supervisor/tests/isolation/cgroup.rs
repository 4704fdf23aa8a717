//! cgroup v2 without controllers: the supervisor started inside a delegated cgroup (as systemd
//! does with `Delegate=yes`) moves itself into a leaf, puts each instance into a cgroup of its
//! own, kills through `cgroup.kill` what escaped every process group, and removes the cgroup
//! once the instance is gone. Limits need controllers, which only the VM tier has.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::*;
use crate::support::{expect_ok, http_get, parent_pid, pid_alive, wait_until, EVENT_DEADLINE};

const NO_CONTROLLERS: &str = "cgroup (no controllers delegated: limits unavailable)";

/// Asks the probe at `addr` to double-fork `count` daemons (own session, ignoring SIGTERM);
/// their pids.
fn start_daemons(addr: std::net::SocketAddr, count: usize) -> Vec<i32> {
    let (status, body) = http_get(addr, &format!("/daemon?count={count}"));
    assert_eq!(status, 200, "{body}");
    let pids: Vec<i32> = body
        .split_whitespace()
        .map(|p| p.parse().expect("a pid"))
        .collect();
    assert_eq!(pids.len(), count, "{body}");
    pids
}

fn start_daemon(addr: std::net::SocketAddr) -> i32 {
    start_daemons(addr, 1)[0]
}

fn gone(path: &Path) -> bool {
    wait_until(EVENT_DEADLINE, || !path.exists())
}

#[test]
fn the_supervisor_moves_into_a_leaf_and_each_instance_gets_its_own_cgroup() {
    let cg = TestCgroup::create();
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
idle_timeout = "never"
pids_max = 64
"#,
    );
    let sup = sb.start_in_cgroup(&cg);
    // With it only the `nft` process that owns its firewall table (firewall.rs).
    let leaf: Vec<i32> = cg
        .procs("supervisor")
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "nft")
        })
        .collect();
    assert_eq!(leaf, vec![sup.pid()], "the supervisor is alone in its leaf");
    assert!(
        cg.procs("").is_empty(),
        "processes left in the delegated cgroup itself: {:?}",
        cg.procs("")
    );

    for id in ["a", "b"] {
        let instance = format!("notes:{id}");
        let addr = sb.spawn(&instance);
        let relative = format!("instances/notes.{id}");
        let dir = cg.dir.join(&relative);
        let status = sb.admin().status(&instance);
        assert_eq!(status.isolation, format!("namespace, {NO_CONTROLLERS}"));
        assert_eq!(status.cgroup.as_deref(), Some(dir.to_str().unwrap()));
        assert_eq!(
            status.limits.as_deref(),
            Some("pids_max=64 (not enforced: pids)")
        );
        // The helper, the namespace's init and the app: all of the instance and nothing else.
        let init = status.pid.expect("running") as i32;
        let helper = parent_pid(init).expect("the init has a parent");
        let app = app_host_pid(init as u32);
        let members: BTreeSet<i32> = cg.procs(&relative).into_iter().collect();
        assert_eq!(
            members,
            BTreeSet::from([helper, init, app]),
            "{instance}: cgroup.procs"
        );
        let report = probe(addr, &[]);
        let membership = field(&report, "cgroup");
        assert!(
            membership
                .lines()
                .any(|l| l == format!("0::{}/{relative}", cg.relative)),
            "{instance} sees itself in {membership:?}"
        );
        let text = sb.tenctl(&["status", &instance]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(dir.to_str().unwrap()) && text.contains(NO_CONTROLLERS),
            "tenctl status {instance}:\n{text}"
        );
        let json = sb.tenctl_status(&instance);
        assert_eq!(json.cgroup, status.cgroup);
        assert_eq!(json.isolation, status.isolation);
    }

    expect_ok(sb.admin().stop("notes:a"));
    assert!(
        gone(&cg.dir.join("instances/notes.a")),
        "the cgroup of a stopped instance is removed"
    );
    assert!(cg.dir.join("instances/notes.b").is_dir(), "b's stays");
}

#[test]
fn a_double_forked_daemon_dies_with_its_instance_on_stop() {
    let cg = TestCgroup::create();
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"
stop_grace = "2s"
"#,
    );
    let _sup = sb.start_in_cgroup(&cg);
    let addr = sb.spawn("notes:a");
    let daemon = start_daemon(addr);
    let app = sb.admin().status("notes:a").pid.unwrap() as i32;
    assert!(pid_alive(daemon));
    assert!(
        cg.procs("instances/notes.a").contains(&daemon),
        "the daemon is in the instance's cgroup"
    );
    assert_ne!(
        nix::unistd::getpgid(Some(Pid::from_raw(daemon))).unwrap(),
        nix::unistd::getpgid(Some(Pid::from_raw(app))).unwrap(),
        "the daemon left the app's process group"
    );
    expect_ok(sb.admin().stop("notes:a"));
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(daemon)),
        "the daemon outlived its instance"
    );
    assert!(
        gone(&cg.dir.join("instances/notes.a")),
        "the instance's cgroup is removed after stop"
    );
}

/// SIGKILL to the exec helper: its process group dies with it, but a daemon in its own
/// session is only reachable through the cgroup.
#[test]
fn a_daemon_that_outlives_its_exec_helper_is_killed_through_the_cgroup() {
    let cg = TestCgroup::create();
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"
max_restarts = 0
"#,
    );
    let _sup = sb.start_in_cgroup(&cg);
    let addr = sb.spawn("notes:a");
    // Several, so that dying takes the kernel a moment after cgroup.kill returns.
    let daemons = start_daemons(addr, 16);
    let app = sb.admin().status("notes:a").pid.unwrap() as i32;
    let helper = parent_pid(app).unwrap();
    kill(Pid::from_raw(helper), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(app)),
        "the app outlived its helper"
    );
    assert!(
        wait_until(EVENT_DEADLINE, || daemons.iter().all(|&d| !pid_alive(d))),
        "daemons outlived their helper: cgroup.procs = {:?}",
        cg.procs("instances/notes.a")
    );
    let dir = cg.dir.join("instances/notes.a");
    assert!(
        gone(&dir),
        "the cgroup of the dead instance is left behind, with cgroup.procs {:?} and cgroup.events {:?}",
        cg.procs("instances/notes.a"),
        std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default()
    );
}

/// A supervisor that crashed together with an exec helper leaves the app and its daemon
/// running; the next one kills them through their cgroup before anything else.
#[test]
fn a_restarted_supervisor_kills_what_a_crashed_one_left_in_instance_cgroups() {
    let cg = TestCgroup::create();
    let sb = IsoSandbox::new(
        r#"
[service.notes]
command = "@PROBE@"
isolation = "process"
idle_timeout = "never"
"#,
    );
    let sup = sb.start_in_cgroup(&cg);
    let addr = sb.spawn("notes:a");
    let daemon = start_daemon(addr);
    let app = sb.admin().status("notes:a").pid.unwrap() as i32;
    let helper = parent_pid(app).unwrap();
    // Freeze the supervisor so it cannot clean up after the helper, then kill both.
    kill(Pid::from_raw(sup.pid()), Signal::SIGSTOP).unwrap();
    // kill(2) returns before the process has stopped: wait until it has, or it could still
    // reap the helper and clean up, which is not the case under test.
    let stopped = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(false)
    };
    assert!(wait_until(EVENT_DEADLINE, || stopped(sup.pid())));
    kill(Pid::from_raw(helper), Signal::SIGKILL).unwrap();
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(helper)));
    sup.kill9();
    assert!(
        pid_alive(app) && pid_alive(daemon),
        "the app and its daemon survive the crash (nothing but the cgroup holds them)"
    );
    let leftovers: BTreeSet<i32> = cg.procs("instances/notes.a").into_iter().collect();
    assert!(leftovers.contains(&app) && leftovers.contains(&daemon));

    let _sup = sb.start_in_cgroup(&cg);
    assert!(
        wait_until(EVENT_DEADLINE, || !pid_alive(app) && !pid_alive(daemon)),
        "the next supervisor left the old app and daemon running"
    );
    assert!(
        gone(&cg.dir.join("instances/notes.a")),
        "the leftover cgroup is removed"
    );
    // And the instance starts again, in a fresh cgroup.
    sb.spawn("notes:a");
    assert!(!cg.procs("instances/notes.a").is_empty());
}
