//! The proxy's Prometheus metrics: served on their own listener only, counting what the test
//! did (requests by class, wakes, instances by state), accepted by `promtool check metrics`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::support::*;
use crate::tls::accepting;

const APPS: &str = r#"
[service.notes]
command = "python3 @FIXTURES@/mirror.py"

[instances]
notes = ["alice", "bob"]
"#;

/// The value of the sample `series` (name and labels exactly as written) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn scrape(addr: SocketAddr) -> String {
    let reply = get(addr, "metrics", "/metrics");
    assert_eq!(reply.status(), 200);
    assert!(reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    reply.text()
}

/// `promtool check metrics` on `text`: its complaints (empty when it has none).
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool is required (.ci/run installs prometheus): {e}"));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        String::new()
    } else {
        said
    }
}

#[test]
fn metrics_count_requests_wakes_and_states_on_their_own_listener_only() {
    let sandbox = Sandbox::new(APPS);
    let metrics_port = sandbox.spare_port();
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let _supervisor = sandbox.start_supervisor();
    let mut command = sandbox.proxy_command();
    command.arg("--metrics-listen").arg(metrics.to_string());
    let _proxy = sandbox.start_proxy_with(command);
    accepting(metrics);

    // The route table arrives a moment after the proxy accepts.
    let synced = wait_until(EVENT_DEADLINE, || {
        sample(&scrape(metrics), "tenement_supervisor_up{daemon=\"supervisor\"}") == Some(1.0)
    });
    assert!(synced, "{}", scrape(metrics));
    let before = scrape(metrics);
    assert_eq!(
        sample(&before, "tenement_supervisor_up{daemon=\"supervisor\"}"),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            "tenement_instances{service=\"notes\",state=\"stopped\"}"
        ),
        Some(2.0),
        "{before}"
    );

    // One wake, then nine warm requests: ten 2xx; two 404s for an unknown instance.
    for _ in 0..10 {
        assert_eq!(
            get(sandbox.proxy_addr, "alice.notes.localhost", "/").status(),
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            get(sandbox.proxy_addr, "nobody.notes.localhost", "/").status(),
            404
        );
    }
    // The public listener does not serve the metrics, whatever the Host.
    let public = get(sandbox.proxy_addr, "localhost", "/metrics");
    assert!(!public.text().contains("tenement_http_requests_total"));

    let text = scrape(metrics);
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        value("tenement_http_requests_total{service=\"notes\",class=\"2xx\"}"),
        10.0
    );
    assert_eq!(
        value("tenement_wakes_total{service=\"notes\",outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value("tenement_wake_duration_seconds_count{service=\"notes\"}"),
        1.0
    );
    assert_eq!(
        value("tenement_http_request_duration_seconds_count{service=\"notes\"}"),
        12.0
    );
    assert_eq!(value("tenement_http_requests_total{service=\"notes\",class=\"4xx\"}"), 2.0);
    assert_eq!(
        value("tenement_instances{service=\"notes\",state=\"running\"}"),
        1.0
    );
    assert_eq!(
        value("tenement_instances{service=\"notes\",state=\"stopped\"}"),
        1.0
    );
    assert_eq!(value("tenement_requests_waiting_for_wake"), 0.0);
    assert!(value("tenement_process_resident_memory_bytes{daemon=\"proxy\"}") > 1e6);
    assert_eq!(
        value("tenement_build_info{daemon=\"proxy\",version=\"0.1.0\"}"),
        1.0
    );
    // Anything but /metrics is a 404 there.
    assert_eq!(get(metrics, "metrics", "/").status(), 404);

    let complaints = promtool(&text);
    assert!(complaints.is_empty(), "promtool: {complaints}\n{text}");
}
