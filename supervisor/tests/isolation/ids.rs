//! The original project's holes, as regressions under the root defaults: an instance id
//! carrying `/`, `..`, `{port}` or spaces never reaches the file system or an argv. The RPC
//! refuses it as `bad_request` before the registry hears of it; nothing is created, no uid is
//! handed out, nothing starts.

use std::os::unix::net::UnixStream;
use std::path::Path;

use tenement_proto::rpc::{ErrorCode, Response};

use crate::harness::*;
use crate::support::{hello_frame, raw_connect, read_response, send_frame, tree_listing};

/// The service's argv and environment carry every placeholder an id reaches.
const NOTES: &str = r#"
[service.notes]
command = "@PROBE@"
args = ["{id}", "{data_dir}/{id}", "{instance}"]
auto_spawn = true
idle_timeout = "never"

[service.notes.env]
APP_HOME = "{data_dir}/{id}"
"#;

/// Ids that would escape a directory, split an argv or expand a placeholder, as JSON values:
/// strings, and the same id spelled as an object in case a decoder took that too.
fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "notes:../x",
        "notes:..",
        "notes:.",
        "notes:a/b",
        "notes:/tmp/x",
        "notes:a b",
        "notes: a",
        "notes:a\tb",
        "notes:{port}",
        "notes:{id}",
        "notes:{{port}}",
        "notes:%2e%2e",
        "notes:a\\b",
        "notes:A",
        "notes:a\u{0}b",
        "notes:a\nb",
        "../notes:x",
        "notes/../x:a",
        "no tes:a",
        "notes:",
        ":a",
        "",
    ]
    .iter()
    .map(|id| serde_json::to_string(id).unwrap())
    .collect();
    ids.push(r#"{"service":"notes","id":"../x"}"#.to_owned());
    ids.push(r#"["notes","../x"]"#.to_owned());
    ids
}

fn raw_hello(path: &Path) -> UnixStream {
    let mut s = raw_connect(path);
    send_frame(&mut s, &hello_frame(tenement_proto::rpc::PROTOCOL_VERSION));
    match read_response(&mut s) {
        Some(Response::Hello { .. }) => s,
        other => panic!("hello answered with {other:?}"),
    }
}

fn expect_bad_request(stream: &mut UnixStream, body: &str) {
    send_frame(stream, body.as_bytes());
    match read_response(stream) {
        Some(Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }) => {}
        other => panic!("{body}: expected bad_request, got {other:?}"),
    }
}

/// Nothing of any hostile id exists anywhere the supervisor writes, and nothing started.
fn assert_untouched(sb: &IsoSandbox, data_before: &[String]) {
    assert_eq!(tree_listing(&sb.data_dir), data_before, "data_dir changed");
    assert!(
        tree_listing(&sb.runtime_dir.join("instances")).is_empty(),
        "an instance runtime directory was made: {:?}",
        tree_listing(&sb.runtime_dir)
    );
    assert!(
        sb.admin().ps().is_empty(),
        "registered: {:?}",
        sb.admin().ps()
    );
    assert!(
        sb.leftover_processes().is_empty(),
        "a process was started: {:?}",
        sb.leftover_processes()
    );
    for outside in [sb.root.join("x"), sb.data_dir.join("x")] {
        assert!(!outside.exists(), "{} was created", outside.display());
    }
}

/// Admin requests with `ID` where the instance id goes.
const ADMIN_REQUESTS: &[&str] = &[
    r#"{"type":"wake","instance":ID}"#,
    r#"{"type":"wake","instance":ID,"timeout_ms":100}"#,
    r#"{"type":"spawn","instance":ID}"#,
    r#"{"type":"add","instances":[ID]}"#,
    r#"{"type":"add","instances":["notes:fine",ID]}"#,
    r#"{"type":"restart","instance":ID}"#,
    r#"{"type":"stop","instance":ID}"#,
    r#"{"type":"remove","instance":ID,"purge":true}"#,
    r#"{"type":"status","instance":ID}"#,
    r#"{"type":"logs","instance":ID,"lines":10,"follow":false}"#,
];

/// Proxy-role requests, likewise.
const PROXY_REQUESTS: &[&str] = &[
    r#"{"type":"wake","instance":ID}"#,
    r#"{"type":"wake","instance":ID,"timeout_ms":100}"#,
    r#"{"type":"resolve","instance":ID}"#,
];

/// Each request is well-formed: with an unknown but valid id it is answered, not refused as
/// bad_request (so the refusals below are about the id).
fn assert_well_formed(stream: &mut UnixStream, requests: &[&str], valid_id: &str) {
    for template in requests {
        let body = template.replace("ID", &serde_json::to_string(valid_id).unwrap());
        send_frame(stream, body.as_bytes());
        match read_response(stream) {
            Some(Response::Error {
                code: ErrorCode::BadRequest,
                message,
            }) => panic!("{body} is refused even with a valid id: {message}"),
            Some(_) => {}
            None => panic!("{body}: the connection closed"),
        }
    }
}

#[test]
fn hostile_ids_are_refused_by_every_admin_call_before_touching_anything() {
    let sb = IsoSandbox::new(
        NOTES
            .replace("auto_spawn = true", "auto_spawn = false")
            .as_str(),
    );
    let _sup = sb.start();
    let data_before = tree_listing(&sb.data_dir);
    let mut admin = raw_hello(&sb.admin_socket());
    for id in hostile_ids() {
        for template in ADMIN_REQUESTS {
            expect_bad_request(&mut admin, &template.replace("ID", &id));
        }
    }
    assert_untouched(&sb, &data_before);

    // tenctl refuses them itself (exit status 2: bad usage), before any RPC.
    for id in ["notes:../x", "notes:a b", "notes:{port}", "notes:a/b"] {
        for verb in ["wake", "spawn", "add", "status", "rm"] {
            let out = sb.tenctl(&[verb, id]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "tenctl {verb} {id:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_untouched(&sb, &data_before);

    // A valid id still starts, and the argv and environment carry exactly its labels.
    let report = probe(sb.spawn("notes:ok-1"), &[]);
    let data = sb.instance_data_dir("notes:ok-1");
    let argv: Vec<String> = serde_json::from_value(report["argv"].clone()).unwrap();
    assert_eq!(
        argv[1..],
        [
            "ok-1".to_owned(),
            data.to_string_lossy().into_owned(),
            "notes:ok-1".to_owned()
        ],
        "argv {argv:?}"
    );
    assert_well_formed(&mut admin, ADMIN_REQUESTS, "notes:nobody");
}

/// The proxy's role can only wake and resolve; with `auto_spawn`, a wake registers unknown
/// instances, so a traversal id that slipped through would be created on the spot.
#[test]
fn a_wake_of_a_traversal_id_on_the_proxy_socket_is_refused() {
    let sb = IsoSandbox::new(NOTES);
    let _sup = sb.start();
    let data_before = tree_listing(&sb.data_dir);
    let mut proxy = raw_hello(&sb.proxy_socket());
    for id in hostile_ids() {
        for template in PROXY_REQUESTS {
            expect_bad_request(&mut proxy, &template.replace("ID", &id));
        }
    }
    assert_untouched(&sb, &data_before);
    // The connection is still usable, and the same requests with a valid id are answered (a
    // wake auto-spawns it).
    assert_well_formed(&mut proxy, PROXY_REQUESTS, "notes:fine");
    let after: Vec<String> = tree_listing(&sb.data_dir)
        .into_iter()
        .filter(|p| !data_before.contains(p))
        .collect();
    assert_eq!(
        after,
        ["notes", "notes/fine"],
        "only the valid instance's directory"
    );
    let names: Vec<String> = sb
        .admin()
        .ps()
        .into_iter()
        .map(|i| i.instance.to_string())
        .collect();
    assert_eq!(names, ["notes:fine"]);
    for outside in [sb.root.join("x"), sb.data_dir.join("x")] {
        assert!(!outside.exists(), "{} was created", outside.display());
    }
}
