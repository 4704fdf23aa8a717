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
    let mut body_bytes = 0;
    for _ in 0..10 {
        let reply = get(sandbox.proxy_addr, "alice.notes.localhost", "/");
        assert_eq!(reply.status(), 200);
        body_bytes += reply.body.len();
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
    // Only bodies count, and only the instances' (the 404s are the proxy's own).
    assert_eq!(
        value("tenement_http_sent_bytes_total{service=\"notes\"}"),
        body_bytes as f64
    );
    assert_eq!(
        value("tenement_http_received_bytes_total{service=\"notes\"}"),
        0.0
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
    // Both daemons' own figures: the supervisor's over the proxy role's `stats` call.
    for daemon in ["proxy", "supervisor"] {
        assert!(
            value(&format!(
                "tenement_process_resident_memory_bytes{{daemon=\"{daemon}\"}}"
            )) > 1e6
        );
        assert!(value(&format!("tenement_process_open_fds{{daemon=\"{daemon}\"}}")) >= 3.0);
        assert!(
            value(&format!(
                "tenement_process_cpu_seconds_total{{daemon=\"{daemon}\"}}"
            )) > 0.0
        );
        assert_eq!(
            value(&format!(
                "tenement_build_info{{daemon=\"{daemon}\",version=\"0.1.0\"}}"
            )),
            1.0
        );
    }
    // Restarts by reason for every configured service, zeros included; per-instance series
    // only when asked for.
    for reason in ["crash", "start_failed", "health", "operator", "reload"] {
        assert_eq!(
            value(&format!(
                "tenement_restarts_total{{service=\"notes\",reason=\"{reason}\"}}"
            )),
            0.0
        );
    }
    assert_eq!(value("tenement_oom_kills_total{service=\"notes\"}"), 0.0);
    assert!(!text.contains("tenement_instance_memory_bytes{"), "{text}");
    // Anything but /metrics is a 404 there.
    assert_eq!(get(metrics, "metrics", "/").status(), 404);

    let complaints = promtool(&text);
    assert!(complaints.is_empty(), "promtool: {complaints}\n{text}");
}

#[test]
fn restarts_by_reason_bytes_and_per_instance_series_come_and_go() {
    let sandbox = Sandbox::new(APPS);
    let config = std::fs::read_to_string(&sandbox.config_path).unwrap();
    std::fs::write(
        &sandbox.config_path,
        config.replacen(
            "[settings]\n",
            "[settings]\nmetrics_per_instance = true\n",
            1,
        ),
    )
    .unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], sandbox.spare_port()));
    let _daemons = start_with_metrics(&sandbox, metrics);
    let mut admin = sandbox.admin();
    let value = |series: &str| sample(&scrape(metrics), series);
    let alice = "{service=\"notes\",tenant=\"notes:alice\"}";

    // A wake, an upload and a download of known sizes.
    let pid = get_ok(sandbox.proxy_addr, "alice.notes.localhost", "/pid");
    let upload = vec![b'x'; 5000];
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nHost: alice.notes.localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    request.extend_from_slice(&upload);
    let uploaded = exchange(sandbox.proxy_addr, &request).unwrap();
    assert_eq!(uploaded.status(), 200, "{}", uploaded.text());
    let download = get(
        sandbox.proxy_addr,
        "alice.notes.localhost",
        "/download?bytes=100000",
    );
    assert_eq!(download.body.len(), 100_000);
    let text = scrape(metrics);
    let at =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(
        at("tenement_http_received_bytes_total{service=\"notes\"}"),
        5000.0
    );
    assert_eq!(
        at("tenement_http_sent_bytes_total{service=\"notes\"}"),
        (pid.len() + 1 + uploaded.body.len() + 100_000) as f64
    );
    // The running instance has its series; the sleeping one has none.
    assert!(at(&format!("tenement_instance_memory_bytes{alice}")) > 1e6);
    assert!(at(&format!("tenement_instance_cpu_seconds_total{alice}")) > 0.0);
    assert_eq!(at(&format!("tenement_instance_requests_total{alice}")), 3.0);
    assert!(!text.contains("tenant=\"notes:bob\""), "{text}");

    // A crash: killed from outside, restarted by policy.
    let pid: i32 = pid.parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarts = |reason: &str| {
        value(&format!(
            "tenement_restarts_total{{service=\"notes\",reason=\"{reason}\"}}"
        ))
    };
    assert!(
        wait_until(EVENT_DEADLINE, || restarts("crash") == Some(1.0)),
        "{}",
        scrape(metrics)
    );
    // An operator's restart.
    assert!(wait_until(EVENT_DEADLINE, || admin.state("notes:alice")
        == tenement_proto::rpc::InstanceState::Running));
    let answer = admin.call(tenement_proto::rpc::Request::Restart {
        instance: iid("notes:alice"),
    });
    assert!(
        matches!(answer, tenement_proto::rpc::Response::Woken { .. }),
        "{answer:?}"
    );
    assert_eq!(restarts("operator"), Some(1.0));
    // A reload that changes the service with `rollout = "restart"` restarts its running
    // instance; with the default, a rollout switches it.
    let config = std::fs::read_to_string(&sandbox.config_path).unwrap();
    let reload = |admin: &mut Admin, text: String| {
        std::fs::write(&sandbox.config_path, text).unwrap();
        let answer = admin.call(tenement_proto::rpc::Request::Reload);
        assert!(
            matches!(answer, tenement_proto::rpc::Response::Reloaded { .. }),
            "{answer:?}"
        );
    };
    reload(
        &mut admin,
        config.replace(
            "[service.notes]\n",
            "[service.notes]\nstop_grace = \"3s\"\nrollout = \"restart\"\n",
        ),
    );
    assert_eq!(restarts("reload"), Some(1.0));
    assert_eq!(restarts("rollout"), Some(0.0));
    assert!(wait_until(EVENT_DEADLINE, || admin.state("notes:alice")
        == tenement_proto::rpc::InstanceState::Running));
    reload(
        &mut admin,
        config.replace(
            "[service.notes]\n",
            "[service.notes]\nstop_grace = \"4s\"\n",
        ),
    );
    assert_eq!(restarts("rollout"), Some(1.0));
    assert_eq!(restarts("reload"), Some(1.0));
    assert_eq!(restarts("crash"), Some(1.0));
    assert_eq!(restarts("health"), Some(0.0));

    // Stopped: its series are gone.
    assert!(wait_until(EVENT_DEADLINE, || admin.state("notes:alice")
        == tenement_proto::rpc::InstanceState::Running));
    admin.stop("notes:alice");
    let text = scrape(metrics);
    assert!(!text.contains("tenant=\"notes:alice\""), "{text}");
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
    // The answer of Prometheus' query API to `expr`.
    let ask = |expr: &str| -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encoded(expr));
        let reply = try_get(
            SocketAddr::from(([127, 0, 0, 1], prometheus_port)),
            "localhost",
            &path,
        )
        .ok()?;
        serde_json::from_str(&reply.text()).ok()
    };
    let query = |expr: &str| -> Option<f64> {
        ask(expr)?["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    let counted = wait_until(std::time::Duration::from_secs(60), || {
        query("sum(tenement_wakes_total{outcome=\"ok\"})") == Some(2.0)
    });
    let states = query("tenement_instances{service=\"notes\",state=\"running\"}");
    let up = query("up{job=\"tenement\"}");
    // Every query of the shipped Grafana dashboard is one Prometheus accepts, with the
    // dashboard's `service` variable at "All".
    let mut refused = Vec::new();
    let exprs = dashboard_queries();
    for expr in &exprs {
        let answer = ask(&expr.replace("$service", ".*"));
        if answer.as_ref().and_then(|a| a["status"].as_str()) != Some("success") {
            refused.push(format!("{expr}: {answer:?}"));
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        counted,
        "Prometheus did not count 2 wakes:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    assert_eq!(states, Some(2.0));
    assert_eq!(up, Some(1.0));
    assert!(exprs.len() >= 20, "{exprs:?}");
    assert!(refused.is_empty(), "refused by Prometheus: {refused:#?}");
}

/// `text` with everything but RFC 3986's unreserved characters percent-encoded.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The PromQL of every panel of packaging/grafana/tenement.json, checked on the way: every
/// panel has an id and a place, and every query names the dashboard's data source variable.
fn dashboard_queries() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/tenement.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{panel}");
        assert!(panel["gridPos"]["w"].as_u64().unwrap() <= 24, "{panel}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{panel}");
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}
