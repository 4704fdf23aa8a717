//! The proxy's watch stream on the real supervisor: a snapshot, then a route update for every
//! change of an instance's routed state, with a new generation per process.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{InstanceState, Response, Route};

/// Route updates for `instance` until one matches `done`.
fn updates_until(watch: &Watch, done: impl Fn(&Route) -> bool) -> Vec<Route> {
    let deadline = Instant::now() + EVENT_DEADLINE;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Some(Response::Routes { routes, .. }) = watch.recv(Duration::from_millis(50)) {
            for route in routes {
                let finished = done(&route);
                seen.push(route);
                if finished {
                    return seen;
                }
            }
        }
    }
    panic!("no matching route update; saw {seen:?}");
}

#[test]
fn watchers_get_a_snapshot_then_every_route_change() {
    let sb = Sandbox::new("[service.web]\ncommand = \"@TINY@\"\n");
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    assert!(matches!(c.add(&["web:old"]), Response::Added { .. }));
    let (watch, snapshot) = Watch::subscribe(&sb);
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].state, InstanceState::Stopped);

    assert!(matches!(c.add(&["web:r"]), Response::Added { .. }));
    let seen = updates_until(&watch, |r| r.instance == iid("web:r"));
    assert_eq!(seen.last().unwrap().state, InstanceState::Stopped);

    let (woken, _) = expect_woken(c.wake("web:r"));
    let seen = updates_until(&watch, |r| {
        r.instance == iid("web:r") && r.state == InstanceState::Running
    });
    let running = seen.last().unwrap();
    assert_eq!(running.generation, woken.generation);
    assert_eq!(running.address, woken.address);

    expect_ok(c.stop("web:r"));
    updates_until(&watch, |r| {
        r.instance == iid("web:r") && r.state == InstanceState::Stopped
    });

    let (again, _) = expect_woken(c.wake("web:r"));
    assert!(again.generation > woken.generation);
    let seen = updates_until(&watch, |r| {
        r.instance == iid("web:r") && r.state == InstanceState::Running
    });
    assert_eq!(seen.last().unwrap().generation, again.generation);

    expect_ok(c.remove("web:r", false));
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no removal on the watch stream");
        if let Some(Response::Routes { removed, .. }) = watch.recv(Duration::from_millis(50)) {
            if removed.contains(&iid("web:r")) {
                break;
            }
        }
    }
}
