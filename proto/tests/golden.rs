//! The wire format, pinned: each file in `tests/golden/` is the exact JSON of one request or
//! response. A change here is a protocol change and must follow the compatibility rules at the
//! top of `lib.rs`.
//!
//! `UPDATE_GOLDEN=1 cargo test -p tenement-proto --test golden` rewrites the files from the
//! values below; review the diff like any protocol change.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tenement_proto::auth::{Secret, TokenId, TokenInfo};
use tenement_proto::frame;
use tenement_proto::rpc::{
    ActivityReport, Address, ErrorCode, FleetHost, FleetOwned, FleetPeer, InstanceInfo,
    InstanceState, InstanceUsage, LogLine, LogStream, ReleaseInfo, Request, Response, Role,
    RolloutAction, RolloutFailure, RolloutInfo, RolloutOptions, RolloutProgress, Route,
    ServiceStats, SupervisorStats, WeightChange, PROTOCOL_VERSION,
};
use tenement_proto::rpc::{ListQuery, ListSort};
use tenement_proto::{InstanceId, ServiceName, TenantId};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn id(text: &str) -> InstanceId {
    InstanceId::parse(text).unwrap()
}

fn route() -> Route {
    Route {
        instance: id("notes:alice"),
        state: InstanceState::Running,
        address: Address::Tcp(SocketAddr::from(([127, 0, 0, 1], 20001))),
        weight: 1,
        generation: 3,
        owner_uid: Some(61184),
        backlog: None,
    }
}

fn token_info() -> TokenInfo {
    TokenInfo {
        id: TokenId::new("0123456789abcdef").unwrap(),
        name: Some("ci".to_owned()),
        scope: "service:notes".parse().unwrap(),
        read_only: true,
        created_ms: 1_700_000_000_000,
        expires_ms: Some(1_702_592_000_000),
        last_used_ms: Some(1_700_000_060_000),
    }
}

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        (
            "request_hello",
            Request::Hello {
                version: PROTOCOL_VERSION,
                client: "tenctl 0.1.0".to_owned(),
            },
        ),
        (
            "request_wake",
            Request::Wake {
                instance: id("notes:alice"),
                timeout_ms: None,
            },
        ),
        (
            "request_wake_timeout",
            Request::Wake {
                instance: id("notes:alice"),
                timeout_ms: Some(5000),
            },
        ),
        (
            "request_add",
            Request::Add {
                instances: vec![id("notes:alice"), id("notes:bob")],
            },
        ),
        (
            "request_list",
            Request::List {
                query: Default::default(),
            },
        ),
        (
            "request_list_query",
            Request::List {
                query: ListQuery {
                    service: Some(ServiceName::new("notes").unwrap()),
                    state: Some(InstanceState::Running),
                    search: Some("ali".to_owned()),
                    after: Some(id("notes:al")),
                    limit: Some(100),
                    sort: Some(ListSort::Restarts),
                    offset: Some(200),
                },
            },
        ),
        (
            "request_token_create",
            Request::TokenCreate {
                scope: "tenant:notes:alice".parse().unwrap(),
                read_only: true,
                lifetime_s: Some(2_592_000),
                name: Some("ci".to_owned()),
            },
        ),
        ("request_token_list", Request::TokenList),
        (
            "request_token_remove",
            Request::TokenRemove {
                id: TokenId::new("0123456789abcdef").unwrap(),
            },
        ),
        (
            "request_authed",
            Request::Authed {
                credential: Secret(format!("tnm_0123456789abcdef_{}", "5".repeat(64))),
                peer: Some("203.0.113.9".parse().unwrap()),
                call: Box::new(Request::Status {
                    instance: id("notes:alice"),
                }),
            },
        ),
        ("request_whoami", Request::Whoami),
        ("request_login", Request::Login),
        ("request_logout", Request::Logout),
        (
            "request_logs",
            Request::Logs {
                instance: id("notes:alice"),
                lines: Some(50),
                follow: true,
            },
        ),
        ("request_subscribe", Request::Subscribe),
        ("request_stats", Request::Stats { instances: true }),
        ("request_fleet_hosts", Request::FleetHosts),
        (
            "request_fleet_drain",
            Request::FleetDrain {
                host: "h2".to_owned(),
                drain: true,
            },
        ),
        (
            "request_fleet_own",
            Request::FleetOwn {
                owned: vec![
                    FleetOwned {
                        instance: id("notes:alice"),
                        epoch: 3,
                        held: false,
                    },
                    FleetOwned {
                        instance: id("notes:erin"),
                        epoch: 7,
                        held: true,
                    },
                ],
                valid_ms: 2250,
                peers: Some(vec![fleet_peer()]),
            },
        ),
        (
            "request_weight",
            Request::Weight {
                instance: id("notes:v1"),
                weight: 80,
            },
        ),
        (
            "request_route",
            Request::Route {
                from: id("notes:v1"),
                to: id("notes:v2"),
            },
        ),
        (
            "request_deploy",
            Request::Deploy {
                instance: id("notes:v2"),
                weight: Some(10),
                timeout_ms: Some(30_000),
            },
        ),
        (
            "request_release",
            Request::Release {
                service: ServiceName::new("notes").unwrap(),
                options: RolloutOptions {
                    canary: vec![TenantId::new("alice").unwrap()],
                    canary_percent: None,
                    steps: Vec::new(),
                    max_unavailable: Some(2),
                    bake_ms: Some(10_000),
                },
            },
        ),
        (
            "request_rollout",
            Request::Rollout {
                service: ServiceName::new("notes").unwrap(),
                action: RolloutAction::Pause,
            },
        ),
        (
            "request_rollback",
            Request::Rollback {
                service: ServiceName::new("notes").unwrap(),
                to: Some(3),
                options: RolloutOptions::default(),
            },
        ),
        (
            "request_pin",
            Request::Pin {
                instance: id("notes:alice"),
                release: Some(3),
            },
        ),
        (
            "request_activity",
            Request::Activity {
                reports: vec![ActivityReport {
                    instance: id("notes:alice"),
                    in_flight: 2,
                    started: 7,
                    succeeded: 5,
                    server_errors: 1,
                }],
            },
        ),
        (
            "request_park_ack",
            Request::ParkAck {
                instance: id("notes:alice"),
                park_id: 4,
                accepted: false,
            },
        ),
        (
            "request_remove",
            Request::Remove {
                instance: id("notes:alice"),
                purge: true,
            },
        ),
    ]
}

fn responses() -> Vec<(&'static str, Response)> {
    vec![
        (
            "response_hello",
            Response::Hello {
                version: PROTOCOL_VERSION,
                server: "tenement-supervisor 0.1.0".to_owned(),
                role: Role::Proxy,
            },
        ),
        ("response_ok", Response::Ok),
        (
            "response_error",
            Response::Error {
                code: ErrorCode::InstanceFailed,
                message: "notes:alice is failed".to_owned(),
            },
        ),
        (
            "response_woken",
            Response::Woken {
                route: Route {
                    backlog: Some(4096),
                    ..route()
                },
                started: true,
                elapsed_us: 1234,
            },
        ),
        (
            "response_instances",
            Response::Instances {
                instances: vec![InstanceInfo {
                    instance: id("notes:alice"),
                    service: ServiceName::new("notes").unwrap(),
                    id: TenantId::new("alice").unwrap(),
                    state: InstanceState::Running,
                    pid: Some(4242),
                    address: "127.0.0.1:20001".to_owned(),
                    uptime_s: Some(60),
                    idle_s: Some(5),
                    restarts: 1,
                    health: "healthy".to_owned(),
                    in_flight: 0,
                    weight: 1,
                    data_dir: "/var/lib/tenement/data/notes/alice".to_owned(),
                    isolation: "process-group".to_owned(),
                    uid: None,
                    cgroup: None,
                    limits: None,
                    memory_bytes: None,
                    pids: None,
                    disk_bytes: None,
                    cpu_seconds: None,
                    last_exit: Some("exit status 3".to_owned()),
                    reason: None,
                    release: Some(3),
                    target_release: Some(4),
                    pinned: None,
                }],
                more: false,
                next: None,
                total: None,
            },
        ),
        (
            "response_instances_page",
            Response::Instances {
                instances: Vec::new(),
                more: false,
                next: Some(id("notes:bob")),
                total: Some(10_000),
            },
        ),
        (
            "response_token_created",
            Response::TokenCreated {
                token: Secret(format!("tnm_0123456789abcdef_{}", "5".repeat(64))),
                info: token_info(),
            },
        ),
        (
            "response_fleet_owned",
            Response::FleetOwned {
                running: 12,
                stopping: vec![id("notes:frank")],
            },
        ),
        (
            "response_fleet_hosts",
            Response::FleetHosts {
                hosts: vec![
                    FleetHost {
                        host: "h1".to_owned(),
                        address: Some("10.0.0.1:7443".parse().expect("address")),
                        live: true,
                        controller: true,
                        drained: false,
                        placed: 10,
                        running: Some(3),
                        memory_total: Some(16 << 30),
                        memory_available: Some(8 << 30),
                        max_tenants: Some(2000),
                        heartbeat_age_ms: Some(400),
                    },
                    FleetHost {
                        host: "h3".to_owned(),
                        address: None,
                        live: false,
                        controller: false,
                        drained: true,
                        placed: 4,
                        running: None,
                        memory_total: None,
                        memory_available: None,
                        max_tenants: None,
                        heartbeat_age_ms: None,
                    },
                ],
            },
        ),
        (
            "response_fleet_peers",
            Response::FleetPeers {
                peers: vec![
                    fleet_peer(),
                    FleetPeer {
                        host: "h3".to_owned(),
                        address: None,
                        instances: vec![id("blog:carol")],
                    },
                ],
            },
        ),
        (
            "response_tokens",
            Response::Tokens {
                tokens: vec![token_info()],
            },
        ),
        (
            "response_identity",
            Response::Identity {
                token: token_info(),
                session: Some(Secret(format!("tns_fedcba9876543210_{}", "a".repeat(64)))),
                session_expires_ms: Some(1_700_043_200_000),
            },
        ),
        (
            "response_releases",
            Response::Releases {
                service: ServiceName::new("notes").unwrap(),
                current: 4,
                releases: vec![ReleaseInfo {
                    number: 4,
                    created_ms: 1_700_000_000_000,
                    origin: "deploy".to_owned(),
                    changes: vec!["workdir".to_owned()],
                    command: "/srv/notes/releases/43/server --port {port}".to_owned(),
                    workdir: "/srv/notes/releases/43".to_owned(),
                    tenants: 20,
                    running: 5,
                }],
                rollout: Some(Box::new(RolloutInfo {
                    release: 4,
                    state: "paused".to_owned(),
                    reason: Some(
                        "notes:carol failed on release 4: migrate exited with status 1".to_owned(),
                    ),
                    step: 1,
                    steps: 1,
                    moved: 19,
                    pending: 0,
                    switching: Vec::new(),
                    failed: vec![RolloutFailure {
                        instance: id("notes:carol"),
                        reason: "migrate exited with status 1".to_owned(),
                    }],
                    started_ms: 1_700_000_000_000,
                })),
            },
        ),
        (
            "response_routes",
            Response::Routes {
                routes: vec![
                    route(),
                    Route {
                        instance: id("blog:bob"),
                        state: InstanceState::Stopped,
                        address: Address::Unix("/run/tenement/instances/blog.bob.sock".into()),
                        weight: 0,
                        generation: 0,
                        owner_uid: None,
                        backlog: None,
                    },
                ],
                reset: true,
                complete: true,
                removed: vec![id("notes:carol")],
            },
        ),
        ("response_config_reloaded", Response::ConfigReloaded),
        (
            "response_routes_update",
            Response::Routes {
                routes: vec![route()],
                reset: false,
                complete: false,
                removed: Vec::new(),
            },
        ),
        (
            "response_park",
            Response::Park {
                instance: id("notes:alice"),
                park_id: 4,
                drain: false,
            },
        ),
        (
            "response_logs",
            Response::Logs {
                lines: vec![
                    LogLine {
                        ts_ms: 1_700_000_000_000,
                        stream: LogStream::Event,
                        line: "started (pid 4242)".to_owned(),
                    },
                    LogLine {
                        ts_ms: 1_700_000_000_001,
                        stream: LogStream::Stdout,
                        line: "notes listening on 127.0.0.1:20001".to_owned(),
                    },
                ],
            },
        ),
        (
            "response_weights",
            Response::Weights {
                changes: vec![
                    WeightChange {
                        instance: id("notes:v1"),
                        from: 100,
                        to: 0,
                    },
                    WeightChange {
                        instance: id("notes:v2"),
                        from: 0,
                        to: 100,
                    },
                ],
            },
        ),
        (
            "response_deployed",
            Response::Deployed {
                route: route(),
                started: true,
                elapsed_us: 52_000,
            },
        ),
        (
            "response_stats",
            Response::Stats {
                supervisor: Some(SupervisorStats {
                    version: "0.1.0".to_owned(),
                    rss_bytes: 12_582_912,
                    open_fds: 24,
                    cpu_seconds: 1.5,
                }),
                services: vec![ServiceStats {
                    service: ServiceName::new("notes").unwrap(),
                    restarts: [("crash".to_owned(), 2), ("operator".to_owned(), 1)]
                        .into_iter()
                        .collect(),
                    oom_kills: 1,
                    release: 4,
                    rollout: Some(RolloutProgress {
                        release: 4,
                        paused: false,
                        moved: 19,
                        pending: 1,
                        switching: 1,
                        failed: 0,
                    }),
                }],
                instances: vec![InstanceUsage {
                    instance: id("notes:alice"),
                    memory_bytes: Some(31_457_280),
                    cpu_seconds: Some(0.25),
                }],
                more: false,
            },
        ),
    ]
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Compares (or with `UPDATE_GOLDEN=1` rewrites) one golden file; returns a mismatch report.
fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    name: &str,
    value: &T,
) -> Option<String> {
    let path = golden_dir().join(format!("{name}.json"));
    let json = serde_json::to_string(value).unwrap();
    if updating() {
        fs::create_dir_all(golden_dir()).unwrap();
        fs::write(&path, format!("{json}\n")).unwrap();
        return None;
    }
    let golden = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            return Some(format!(
                "{}: {e} (UPDATE_GOLDEN=1 creates it)",
                path.display()
            ))
        }
    };
    let golden = golden.trim();
    if json != golden {
        return Some(format!(
            "{name}: encoding changed\n  golden: {golden}\n  now:    {json}"
        ));
    }
    match serde_json::from_str::<T>(golden) {
        Ok(back) if back == *value => None,
        Ok(back) => Some(format!("{name}: decodes to {back:?}, not {value:?}")),
        Err(e) => Some(format!("{name}: does not decode: {e}")),
    }
}

#[test]
fn requests_and_responses_match_their_golden_files() {
    let mut problems: Vec<String> = Vec::new();
    for (name, request) in requests() {
        problems.extend(check(name, &request));
    }
    for (name, response) in responses() {
        problems.extend(check(name, &response));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn every_golden_file_is_checked() {
    let known: Vec<String> = requests()
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(responses().iter().map(|(n, _)| n.to_string()))
        .collect();
    if updating() {
        return;
    }
    for entry in fs::read_dir(golden_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".json").unwrap_or(&name);
        assert!(
            known.iter().any(|k| k == stem),
            "{name} in tests/golden is not checked by any value"
        );
    }
}

#[test]
fn a_frame_is_a_big_endian_length_then_the_json() {
    let bytes = frame::encode(&Request::List {
        query: Default::default(),
    })
    .unwrap();
    let json = br#"{"type":"list"}"#;
    assert_eq!(&bytes[..4], &(json.len() as u32).to_be_bytes());
    assert_eq!(&bytes[..4], &[0, 0, 0, 15]);
    assert_eq!(&bytes[4..], json);

    let wake = Request::Wake {
        instance: id("notes:alice"),
        timeout_ms: Some(5000),
    };
    let bytes = frame::encode(&wake).unwrap();
    let json = br#"{"type":"wake","instance":"notes:alice","timeout_ms":5000}"#;
    let mut want = (json.len() as u32).to_be_bytes().to_vec();
    want.extend_from_slice(json);
    assert_eq!(bytes, want);
    let mut reader: &[u8] = &bytes;
    let back: Request = frame::read_message(&mut reader).unwrap();
    assert_eq!(back, wake);
}

fn fleet_peer() -> FleetPeer {
    FleetPeer {
        host: "h2".to_owned(),
        address: Some("10.0.0.2:7443".parse().expect("address")),
        instances: vec![id("notes:bob"), id("notes:dave")],
    }
}
