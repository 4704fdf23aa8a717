//! Idle stop with the real supervisor: on its own when no proxy is subscribed, and through the
//! two-phase park handshake with a proxy-role watch stream that reports in-flight requests.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{ActivityReport, InstanceState, Request, Response};

const IDLE: &str = r#"
[service.web]
command = "@TINY@"
idle_timeout = "1s"
"#;
/// How long a test waits for an idle stop or a park request that is due after one
/// `idle_timeout`: a deadline for a hang, not a measure of the idle clock.
const IDLE_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn idle_instance_stops_on_its_own_without_a_proxy() {
    let sb = Sandbox::new(IDLE);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    let (route, _) = expect_woken(c.spawn("web:sleepy"));
    let woken_at = Instant::now();
    let app = served_pid(tcp_addr(&route));
    assert!(
        wait_until(IDLE_DEADLINE, || c.state("web:sleepy")
            == InstanceState::Stopped),
        "not stopped {IDLE_DEADLINE:?} after the wake with idle_timeout = 1s: {:?}",
        c.status("web:sleepy")
    );
    let after = woken_at.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "stopped after {after:?}, before idle_timeout"
    );
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(app)));
    assert!(!port_listening(tcp_addr(&route).port()));
    let events = c.events("web:sleepy");
    assert!(events.iter().any(|e| e.contains("idle")), "{events:?}");
}

#[test]
fn idle_stop_waits_for_in_flight_requests_and_the_proxys_park_answer() {
    let sb = Sandbox::new(IDLE);
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    expect_ok_added(c.add(&["web:busy"]));
    let (mut watch, routes) = Watch::subscribe(&sb);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].instance, iid("web:busy"));

    let (route, _) = expect_woken(c.wake("web:busy"));
    // One request in flight (say a long download) for more than twice idle_timeout. Reported
    // at once: the idle clock runs from the wake, and a real proxy reports within 250 ms.
    watch.send(&Request::Activity {
        reports: vec![ActivityReport {
            instance: iid("web:busy"),
            in_flight: 1,
            started: 1,
            succeeded: 0,
            server_errors: 0,
        }],
    });
    let app = served_pid(tcp_addr(&route));
    let busy_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < busy_until {
        if let Some(Response::Park {
            instance, park_id, ..
        }) = watch.recv(Duration::from_millis(50))
        {
            // Refuse, as the proxy must; asking at all is already wrong.
            watch.send(&Request::ParkAck {
                instance: instance.clone(),
                park_id,
                accepted: false,
            });
            panic!("park of {instance} requested while a request was in flight");
        }
        assert_eq!(
            c.state("web:busy"),
            InstanceState::Running,
            "stopped with a request in flight"
        );
    }

    // The request ends. After idle_timeout the supervisor asks to park; the proxy refuses
    // once (a request arrived meanwhile), so the instance keeps running.
    watch.send(&Request::Activity {
        reports: vec![ActivityReport {
            instance: iid("web:busy"),
            in_flight: 0,
            started: 0,
            succeeded: 0,
            server_errors: 0,
        }],
    });
    let ended = Instant::now();
    let (instance, park_id) = next_park(&watch, IDLE_DEADLINE);
    assert_eq!(instance, "web:busy");
    assert!(
        ended.elapsed() >= Duration::from_millis(900),
        "park requested {:?} after the last request ended",
        ended.elapsed()
    );
    watch.send(&Request::ParkAck {
        instance: iid("web:busy"),
        park_id,
        accepted: false,
    });
    let refused = Instant::now();

    // The next park is accepted: now it stops.
    let (_, park_id) = next_park(&watch, IDLE_DEADLINE);
    assert!(
        refused.elapsed() >= Duration::from_millis(900),
        "a refused park restarts the idle clock; asked again after {:?}",
        refused.elapsed()
    );
    assert_eq!(
        c.state("web:busy"),
        InstanceState::Running,
        "nothing stops before the proxy accepts"
    );
    watch.send(&Request::ParkAck {
        instance: iid("web:busy"),
        park_id,
        accepted: true,
    });
    assert!(
        wait_until(EVENT_DEADLINE, || c.state("web:busy")
            == InstanceState::Stopped),
        "not stopped after the park was accepted: {:?}",
        c.status("web:busy")
    );
    assert!(wait_until(EVENT_DEADLINE, || !pid_alive(app)));
}

/// The next `Park` on the watch stream (route updates are skipped).
fn next_park(watch: &Watch, within: Duration) -> (String, u64) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(Response::Park {
            instance, park_id, ..
        }) = watch.recv(Duration::from_millis(50))
        {
            return (instance.to_string(), park_id);
        }
    }
    panic!("no park request within {within:?}");
}

fn expect_ok_added(response: Response) {
    assert!(
        matches!(response, Response::Added { .. }),
        "expected added, got {response:?}"
    );
}
