//! End-to-end tests of the `tenctl` binary against a scripted stand-in for the supervisor.
//!
//! Each test writes a config whose `runtime_dir` is a temp dir, serves `admin.sock` there from
//! a thread that speaks the real framing and messages, runs the binary, and checks stdout,
//! stderr and the exit status. The real supervisor is exercised by hand and in `tests/`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::thread::JoinHandle;

use tenement_proto::frame::{read_message, write_message};
use tenement_proto::rpc::{
    Address, ErrorCode, InstanceInfo, InstanceState, LogLine, LogStream, Request, Response, Route,
    PROTOCOL_VERSION,
};
use tenement_proto::InstanceId;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tenement.toml");
    let root = dir.path().display();
    std::fs::write(
        &config,
        format!(
            r#"[settings]
data_dir = "{root}/data"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[service.notes]
command = "python3 app.py"

[instances]
notes = ["alice", "bob"]
"#
        ),
    )
    .expect("write config");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    Setup { dir, config }
}

impl Setup {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("admin.sock")
    }

    /// Serves one connection: hello, then answers each request with `answer` and records it.
    fn serve(
        &self,
        answer: impl Fn(&Request) -> Vec<Response> + Send + 'static,
    ) -> JoinHandle<Vec<Request>> {
        let listener = UnixListener::bind(self.socket()).expect("bind");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let hello: Request = read_message(&mut stream).expect("hello");
            assert!(matches!(
                hello,
                Request::Hello {
                    version: PROTOCOL_VERSION,
                    ..
                }
            ));
            let reply = Response::Hello {
                version: PROTOCOL_VERSION,
                server: "fake".into(),
                role: tenement_proto::rpc::Role::Admin,
            };
            write_message(&mut stream, &reply).expect("hello reply");
            // One request per connection, like tenctl; then close (ends a follow stream).
            let mut seen = Vec::new();
            if let Ok(request) = read_message::<_, Request>(&mut stream) {
                for response in answer(&request) {
                    if write_message(&mut stream, &response).is_err() {
                        break;
                    }
                }
                seen.push(request);
            }
            seen
        })
    }

    fn tenctl(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_tenctl"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("TENEMENT_CONFIG")
            .output()
            .expect("run tenctl")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn id(s: &str) -> InstanceId {
    InstanceId::parse(s).expect("valid id")
}

/// Asserts the run failed with `status` and exactly one stderr line containing `needle`.
fn assert_one_line_error(out: &Output, status: i32, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("tenctl: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
}

fn info(instance: &str, state: InstanceState) -> InstanceInfo {
    let instance = id(instance);
    InstanceInfo {
        service: instance.service.clone(),
        id: instance.id.clone(),
        instance,
        state,
        pid: (state == InstanceState::Running).then_some(4242),
        address: "127.0.0.1:20001".into(),
        uptime_s: (state == InstanceState::Running).then_some(312),
        idle_s: None,
        restarts: 0,
        health: "healthy".into(),
        in_flight: 0,
        weight: 1,
        data_dir: "/data/notes/x".into(),
        isolation: "process, process-group".into(),
        uid: None,
        cgroup: None,
        limits: None,
        memory_bytes: None,
        pids: None,
        disk_bytes: None,
        cpu_seconds: None,
        last_exit: None,
        reason: None,
        release: Some(1),
        target_release: Some(1),
        pinned: None,
    }
}

#[test]
fn without_a_supervisor_the_error_names_the_socket_and_the_fix() {
    let s = setup();
    let out = s.tenctl(&["ps"]);
    assert_one_line_error(
        &out,
        1,
        &format!(
            "cannot reach the supervisor at {}: No such file or directory (is tenement-supervisor running with this config?)",
            s.socket().display()
        ),
    );
}

#[test]
fn bad_instance_ids_are_refused_before_connecting() {
    let s = setup();
    // No supervisor is running: the id error must come first.
    let out = s.tenctl(&["add", "notes:alice", "../x"]);
    assert_one_line_error(&out, 2, r#"tenctl: invalid instance "../x": "#);
    let out = s.tenctl(&["logs", "notes:alice", "--grep", "a("]);
    assert_one_line_error(&out, 2, "invalid --grep pattern");
}

#[test]
fn add_reports_new_and_existing_instances_in_argument_order() {
    let s = setup();
    let server = s.serve(|_| {
        vec![Response::Added {
            added: vec![id("notes:carol")],
            existing: vec![id("notes:alice")],
        }]
    });
    let out = s.tenctl(&["add", "notes:alice", "notes:carol"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "notes:alice already registered\nadded notes:carol\n"
    );
    let seen = server.join().expect("server");
    assert_eq!(
        seen,
        [Request::Add {
            instances: vec![id("notes:alice"), id("notes:carol")]
        }]
    );
}

#[test]
fn error_codes_become_exit_statuses() {
    for (code, status) in [
        (ErrorCode::UnknownInstance, 3),
        (ErrorCode::UnknownService, 3),
        (ErrorCode::WakeFailed, 4),
        (ErrorCode::WakeTimeout, 4),
        (ErrorCode::InstanceFailed, 4),
        (ErrorCode::Internal, 1),
    ] {
        let s = setup();
        let _server = s.serve(move |_| {
            vec![Response::Error {
                code,
                message: format!("it went {}", code.as_str()),
            }]
        });
        let out = s.tenctl(&["wake", "notes:zed"]);
        assert_one_line_error(&out, status, &format!("tenctl: it went {}", code.as_str()));
    }
}

#[test]
fn wake_prints_how_long_it_took_and_json_has_the_woken_fields() {
    let s = setup();
    let woken = || Response::Woken {
        route: Route {
            instance: id("notes:alice"),
            state: InstanceState::Running,
            address: Address::Tcp(([127, 0, 0, 1], 20001).into()),
            weight: 1,
            generation: 3,
            owner_uid: None,
            backlog: None,
        },
        started: true,
        elapsed_us: 43_210,
    };
    let server = s.serve(move |_| vec![woken()]);
    let out = s.tenctl(&["wake", "notes:alice", "--timeout", "5s"]);
    assert_eq!(
        text(&out.stdout),
        "notes:alice ready in 43.2 ms (started) at 127.0.0.1:20001\n"
    );
    assert_eq!(
        server.join().expect("server"),
        [Request::Wake {
            instance: id("notes:alice"),
            timeout_ms: Some(5000)
        }]
    );

    let s = setup();
    let _server = s.serve(move |_| vec![woken()]);
    let out = s.tenctl(&["wake", "notes:alice", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        doc,
        serde_json::json!({
            "instance": "notes:alice",
            "address": "127.0.0.1:20001",
            "started": true,
            "elapsed_ms": 43.21,
            "state": "running",
        })
    );
}

#[test]
fn ps_filters_by_service_and_prints_a_table_or_json() {
    let s = setup();
    // The supervisor answers `list` in several messages; tenctl joins them.
    let list = || {
        vec![
            Response::Instances {
                instances: vec![
                    info("notes:bob", InstanceState::Stopped),
                    info("blog:ann", InstanceState::Running),
                ],
                more: true,
                next: None,
                total: None,
            },
            Response::Instances {
                instances: vec![info("notes:alice", InstanceState::Running)],
                more: false,
                next: None,
                total: None,
            },
        ]
    };
    let _server = s.serve(move |_| list());
    let out = s.tenctl(&["ps", "notes"]);
    assert_eq!(
        text(&out.stdout),
        "INSTANCE     STATE    PID   ADDRESS          UPTIME  IDLE  RESTARTS  HEALTH   WEIGHT  RELEASE\n\
         notes:alice  running  4242  127.0.0.1:20001  5m12s   -     0         healthy  1       1\n\
         notes:bob    stopped  -     127.0.0.1:20001  -       -     0         healthy  1       1\n"
    );

    let s = setup();
    let _server = s.serve(move |_| list());
    let out = s.tenctl(&["ps", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let names: Vec<&str> = doc
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["instance"].as_str())
        .collect();
    assert_eq!(names, ["blog:ann", "notes:alice", "notes:bob"]);
    assert_eq!(doc[2]["pid"], serde_json::Value::Null);

    let s = setup();
    let _server = s.serve(|_| {
        vec![Response::Instances {
            instances: vec![],
            more: false,
            next: None,
            total: None,
        }]
    });
    let out = s.tenctl(&["ps"]);
    assert_eq!(
        text(&out.stdout),
        "no instances registered; add one with tenctl add SERVICE:ID\n"
    );
    let s = setup();
    let _server = s.serve(|_| {
        vec![Response::Instances {
            instances: vec![],
            more: false,
            next: None,
            total: None,
        }]
    });
    assert_eq!(text(&s.tenctl(&["ps", "--json"]).stdout), "[]\n");
}

#[test]
fn logs_grep_keeps_the_last_n_matches_and_follows_until_the_stream_ends() {
    let s = setup();
    let line = |ts_ms, text: &str| LogLine {
        ts_ms,
        stream: LogStream::Stdout,
        line: text.to_owned(),
    };
    let server = s.serve(move |_| {
        vec![
            Response::Logs {
                lines: vec![
                    line(1_700_000_000_123, "GET /a"),
                    line(1_700_000_000_124, "POST /b"),
                    line(1_700_000_000_125, "GET /c"),
                ],
            },
            Response::Logs {
                lines: vec![line(1_700_000_001_000, "GET /d")],
            },
            Response::Logs {
                lines: vec![line(1_700_000_001_001, "POST /e")],
            },
        ]
    });
    let out = s.tenctl(&["logs", "notes:alice", "-f", "--grep", "^GET", "-n", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "2023-11-14T22:13:20.125Z stdout | GET /c\n\
         2023-11-14T22:13:21.000Z stdout | GET /d\n"
    );
    // With --grep every buffered line is requested, so -n counts matches.
    assert_eq!(
        server.join().expect("server"),
        [Request::Logs {
            instance: id("notes:alice"),
            lines: None,
            follow: true
        }]
    );
}

#[test]
fn validate_reports_ok_or_every_problem() {
    let s = setup();
    let out = s.tenctl(&["validate"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}: ok (1 service, 2 instances declared)\n",
            s.config.display()
        )
    );

    let bad = s.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[settings]\nbogus = 1\n[service.notes]\ncomand = \"x\"\n",
    )
    .expect("write");
    let out = s.tenctl(&["validate", path_str(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.lines().count() >= 2, "{stderr}");
    assert!(
        stderr.lines().all(|l| l.starts_with(path_str(&bad))),
        "{stderr}"
    );
    let out = s.tenctl(&["validate", "--json", path_str(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["ok"], false);
    assert!(
        doc["errors"].as_array().is_some_and(|e| e.len() >= 2),
        "{doc}"
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}
