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

/// The supervisor, and the proxy with its metrics on `metrics`.
fn start_with_metrics(sandbox: &Sandbox, metrics: SocketAddr) -> (Daemon, Daemon) {
    let supervisor = sandbox.start_supervisor();
    let mut command = sandbox.proxy_command();
    command.arg("--metrics-listen").arg(metrics.to_string());
    let proxy = sandbox.start_proxy_with(command);
    accepting(metrics);
    (supervisor, proxy)
}

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
    let metrics = SocketAddr::from(([127, 0, 0, 1], sandbox.spare_port()));
    let _daemons = start_with_metrics(&sandbox, metrics);

    // The route table arrives a moment after the proxy accepts.
    let synced = wait_until(EVENT_DEADLINE, || {
        sample(
            &scrape(metrics),
            "tenement_supervisor_up{daemon=\"supervisor\"}",
        ) == Some(1.0)
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
    assert_eq!(
        value("tenement_http_requests_total{service=\"notes\",class=\"4xx\"}"),
        2.0
    );
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

/// The shipped rules and scrape config, as Prometheus users load them.
fn shipped(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus")
        .join(file)
}

#[test]
fn a_real_prometheus_scrapes_the_proxy_with_the_shipped_config_and_rules() {
    let rules = Command::new("promtool")
        .args(["check", "rules"])
        .arg(shipped("tenement.rules.yml"))
        .output()
        .unwrap_or_else(|e| panic!("promtool is required (.ci/run installs prometheus): {e}"));
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );

    let sandbox = Sandbox::new(APPS);
    let [metrics_port, prometheus_port] = sandbox.spare_ports(2)[..] else {
        unreachable!()
    };
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let _daemons = start_with_metrics(&sandbox, metrics);
    for host in ["alice.notes.localhost", "bob.notes.localhost"] {
        assert_eq!(get(sandbox.proxy_addr, host, "/").status(), 200);
    }

    // The shipped scrape config, with the test's address, rules path and a 1 s interval.
    let config = std::fs::read_to_string(shipped("prometheus.yml"))
        .unwrap()
        .replace("127.0.0.1:9464", &metrics.to_string())
        .replace(
            "/usr/share/tenement/prometheus/tenement.rules.yml",
            &shipped("tenement.rules.yml").to_string_lossy(),
        )
        .replace("15s", "1s");
    let dir = sandbox.root.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let query = |expr: &str| -> Option<f64> {
        let path = format!(
            "/api/v1/query?query={}",
            expr.replace(' ', "%20")
                .replace('"', "%22")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('=', "%3D")
                .replace(',', "%2C")
        );
        let reply = try_get(
            SocketAddr::from(([127, 0, 0, 1], prometheus_port)),
            "localhost",
            &path,
        )
        .ok()?;
        let body: serde_json::Value = serde_json::from_str(&reply.text()).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let counted = wait_until(std::time::Duration::from_secs(60), || {
        query("sum(tenement_wakes_total{outcome=\"ok\"})") == Some(2.0)
    });
    let states = query("tenement_instances{service=\"notes\",state=\"running\"}");
    let up = query("up{job=\"tenement\"}");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        counted,
        "Prometheus did not count 2 wakes:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    assert_eq!(states, Some(2.0));
    assert_eq!(up, Some(1.0));
}
