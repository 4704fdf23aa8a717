//! Writes the seed corpus, `fuzz/corpus/<target>/`, from real inputs: hosts as browsers send
//! them, a frame of every RPC message kind encoded by `frame::encode`, every shipped and test
//! config, the templates in those configs, and HTTP/1 and HTTP/2 request heads.
//!
//! Deterministic: running it again rewrites the same files. `cargo run --bin seeds` in `fuzz/`.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};

use tenement_proto::frame::encode;
use tenement_proto::rpc::{
    ActivityReport, ErrorCode, InstanceInfo, LogLine, LogStream, Request, Response, Role, Route,
    PROTOCOL_VERSION,
};
use tenement_proto::{InstanceId, ServiceName};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = fuzz.parent().ok_or("fuzz/ has no parent")?;
    let corpus = fuzz.join("corpus");
    let mut written = 0;
    let mut write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        written += 1;
        Ok(())
    };

    for (i, host) in HOSTS.iter().enumerate() {
        write("host", &format!("host_{i:02}"), host.as_bytes())?;
    }

    for (name, message) in requests()? {
        let frame = encode(&message)?;
        write(
            "frame",
            &format!("request_{name}.body"),
            &with_mode(1, &frame[4..]),
        )?;
        write(
            "frame",
            &format!("request_{name}.stream"),
            &with_mode(0, &frame),
        )?;
    }
    for (name, message) in responses()? {
        let frame = encode(&message)?;
        write(
            "frame",
            &format!("response_{name}.body"),
            &with_mode(1, &frame[4..]),
        )?;
        write(
            "frame",
            &format!("response_{name}.stream"),
            &with_mode(0, &frame),
        )?;
    }
    let mut conversation = Vec::new();
    conversation.extend(encode(&Request::Hello {
        version: PROTOCOL_VERSION,
        client: "tenement-proxy".into(),
    })?);
    conversation.extend(encode(&Request::Subscribe)?);
    conversation.extend(encode(&Request::Resolve {
        instance: InstanceId::parse("notes:alice")?,
    })?);
    write("frame", "stream_three_frames", &with_mode(0, &conversation))?;
    write(
        "frame",
        "stream_oversized_prefix",
        &[0, 0x00, 0x10, 0x00, 0x01, b'{'],
    )?;
    write("frame", "stream_truncated", &[0, 0, 0, 0, 10, b'{', b'"'])?;
    for file in files_in(&repo.join("proto/tests/golden"), "json")? {
        let body = fs::read(&file)?;
        write(
            "frame",
            &format!("golden_{}", file_name(&file)),
            &with_mode(1, body.trim_ascii()),
        )?;
    }

    let mut configs: Vec<PathBuf> = vec![repo.join("packaging/tenement.toml")];
    for entry in fs::read_dir(repo.join("examples"))? {
        let file = entry?.path().join("tenement.toml");
        if file.exists() {
            configs.push(file);
        }
    }
    configs.extend(files_in(&repo.join("proto/tests/good_configs"), "toml")?);
    let bad: Vec<PathBuf> = files_in(&repo.join("proto/tests/bad_configs"), "toml")?;
    configs.extend(
        bad.iter()
            .filter(|f| BAD_CONFIGS.contains(&file_name(f).as_str()))
            .cloned(),
    );
    let mut templates = Vec::new();
    for file in &configs {
        let text = fs::read_to_string(file)?;
        let relative = file.strip_prefix(repo).unwrap_or(file);
        let name = relative.to_string_lossy().replace('/', "_");
        write("config", &name, text.as_bytes())?;
        if let Ok(value) = text.parse::<toml::Table>() {
            templates_of(&value, &mut templates);
        }
    }
    templates.extend(EXTRA_TEMPLATES.iter().map(|t| (*t).to_owned()));
    templates.sort();
    templates.dedup();
    for (i, template) in templates.iter().enumerate() {
        write("template", &format!("template_{i:02}"), template.as_bytes())?;
    }

    for (name, head) in HTTP1 {
        write("http_head", &format!("h1_{name}"), head.as_bytes())?;
    }
    let mut huge = b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nX-Big: ".to_vec();
    huge.resize(70 * 1024, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    write("http_head", "h1_head_over_64k", &huge)?;
    for (name, headers, data) in http2_requests() {
        write("http_head", &format!("h2_{name}"), &http2(&headers, data))?;
    }
    let mut indexed = PREFACE_AND_SETTINGS.to_vec();
    // :method GET, :scheme http, :path / from the static table (RFC 7541, appendix A), then a
    // literal :authority.
    let mut block = vec![0x82, 0x86, 0x84];
    literal(&mut block, ":authority", "alice.notes.localhost");
    frame(&mut indexed, 1, 0x5, 1, &block);
    write("http_head", "h2_static_table", &indexed)?;

    for (name, bytes) in api_requests()? {
        write("api_request", &format!("api_{name}"), &bytes)?;
    }

    println!("wrote {written} seed files under {}", corpus.display());
    Ok(())
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn files_in(dir: &Path, extension: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    Ok(files)
}

/// Every `command`, `args` element and `env` value under `[service.*]`.
fn templates_of(config: &toml::Table, out: &mut Vec<String>) {
    let Some(toml::Value::Table(services)) = config.get("service") else {
        return;
    };
    for service in services.values() {
        let toml::Value::Table(service) = service else {
            continue;
        };
        if let Some(toml::Value::String(command)) = service.get("command") {
            out.push(command.clone());
        }
        if let Some(toml::Value::Array(args)) = service.get("args") {
            out.extend(args.iter().filter_map(|a| a.as_str().map(str::to_owned)));
        }
        if let Some(toml::Value::Table(env)) = service.get("env") {
            out.extend(env.values().filter_map(|v| v.as_str().map(str::to_owned)));
        }
    }
}

const HOSTS: &[&str] = &[
    "alice.notes.localhost",
    "alice.notes.localhost:8080",
    "Alice.Notes.LOCALHOST.",
    "alice.notes.localhost.:443",
    "notes.localhost",
    "localhost",
    "localhost:8080",
    "bob-2.files.example.com",
    "files.eu.example.com",
    "x.files.eu.example.com",
    "a.b.c.example.com",
    "alice.notes.apps.example.org",
    "127.0.0.1:8080",
    "[::1]:8080",
    "[2001:db8::1]",
    "www.example.net",
    "../x.notes.localhost",
    "a..notes.localhost",
    "-a.notes.localhost",
    "a_b.notes.localhost",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.notes.localhost",
    "alice.notes.localhost:99999",
    " alice.notes.localhost ",
    "",
];

/// Bad configs whose errors come from the TOML parser or touch several checks at once.
const BAD_CONFIGS: &[&str] = &[
    "syntax_error_unclosed_header.toml",
    "three_independent_errors.toml",
    "duration_bare_time.toml",
    "unbalanced_quote_in_command.toml",
    "unknown_placeholder_in_env.toml",
    "runtime_dir_too_long_for_socket.toml",
    "service_array_of_tables.toml",
    "instances_not_an_array.toml",
];

const EXTRA_TEMPLATES: &[&str] = &[
    "{data_dir}/{id}",
    "{{literal}} {instance} :{port} {socket_path} {service}",
    "unix:{socket_path}",
    "--listen=127.0.0.1:{port}",
    "{{{id}}}",
    "{home}",
    "{id",
    "id}",
    "é{id}ü",
];

const HTTP1: &[(&str, &str)] = &[
    ("get", "GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"),
    ("browser", "GET /notes?page=2 HTTP/1.1\r\nHost: alice.notes.localhost:8080\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\nCookie: session=abc123\r\nUpgrade-Insecure-Requests: 1\r\n\r\n"),
    ("post_body", "POST /api/notes HTTP/1.1\r\nHost: alice.notes.localhost\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"text\":\"hi\"}"),
    ("post_chunked", "POST /upload HTTP/1.1\r\nHost: bob.files.localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("over_limit", "PUT /f HTTP/1.1\r\nHost: bob.files.localhost\r\nContent-Length: 17\r\n\r\n01234567890123456"),
    ("websocket", "GET /ws HTTP/1.1\r\nHost: alice.notes.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
    ("hop_by_hop", "GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nConnection: keep-alive, x-secret, te\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n\r\n"),
    ("spoofed_forwarding", "GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6;proto=https, for=7.7.7.7\r\n\r\n"),
    ("absolute_form", "GET http://alice.notes.localhost/x?y=1 HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n"),
    ("service_route", "GET / HTTP/1.1\r\nHost: notes.localhost\r\n\r\n"),
    ("home", "GET / HTTP/1.1\r\nHost: localhost:8080\r\n\r\n"),
    ("http10", "GET / HTTP/1.0\r\nHost: alice.notes.localhost\r\n\r\n"),
    ("no_host", "GET / HTTP/1.1\r\n\r\n"),
    ("pipelined", "GET /a HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: bob.notes.localhost\r\n\r\n"),
    ("options_star", "OPTIONS * HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n"),
    ("expect_continue", "PUT /x HTTP/1.1\r\nHost: alice.notes.localhost\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"),
    ("bad_host", "GET / HTTP/1.1\r\nHost: ../etc.notes.localhost\r\n\r\n"),
];

const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

type Headers = Vec<(&'static str, &'static str)>;

fn http2_requests() -> Vec<(&'static str, Headers, Option<&'static [u8]>)> {
    let get = |authority: &'static str| {
        vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", "/"),
            ("user-agent", "curl/8.5.0"),
            ("accept", "*/*"),
        ]
    };
    vec![
        ("get", get("alice.notes.localhost"), None),
        ("get_service", get("notes.localhost:8443"), None),
        (
            "post",
            vec![
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "alice.notes.localhost"),
                (":path", "/api"),
                ("content-length", "5"),
                ("x-forwarded-for", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
            ],
            Some(b"hello"),
        ),
        (
            "te_trailers",
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "bob.files.localhost"),
                (":path", "/f"),
                ("te", "trailers"),
            ],
            None,
        ),
    ]
}

/// The client's bytes of one HTTP/2 request: preface, empty SETTINGS, HEADERS (literal
/// fields, RFC 7541 6.2.2) and DATA if there is a body.
fn http2(headers: &Headers, data: Option<&[u8]>) -> Vec<u8> {
    let mut out = PREFACE_AND_SETTINGS.to_vec();
    let mut block = Vec::new();
    for (name, value) in headers {
        literal(&mut block, name, value);
    }
    let end_stream = if data.is_none() { 0x1 } else { 0 };
    frame(&mut out, 1, 0x4 | end_stream, 1, &block);
    if let Some(data) = data {
        frame(&mut out, 0, 0x1, 1, data);
    }
    out
}

/// A literal header field without indexing, new name, no Huffman coding.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    for text in [name, value] {
        integer(block, text.len());
        block.extend_from_slice(text.as_bytes());
    }
}

/// An HPACK integer with a 7-bit prefix (RFC 7541 5.1), Huffman bit clear.
fn integer(block: &mut Vec<u8>, mut value: usize) {
    if value < 127 {
        block.push(value as u8);
        return;
    }
    block.push(127);
    value -= 127;
    while value >= 128 {
        block.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.push(value as u8);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

fn requests() -> Result<Vec<(&'static str, Request)>, Box<dyn std::error::Error>> {
    let alice = InstanceId::parse("notes:alice")?;
    let bob = InstanceId::parse("notes:bob")?;
    Ok(vec![
        (
            "hello",
            Request::Hello {
                version: PROTOCOL_VERSION,
                client: "tenctl 0.1.0".into(),
            },
        ),
        (
            "wake",
            Request::Wake {
                instance: alice.clone(),
                timeout_ms: Some(30_000),
            },
        ),
        (
            "resolve",
            Request::Resolve {
                instance: alice.clone(),
            },
        ),
        ("subscribe", Request::Subscribe),
        (
            "activity",
            Request::Activity {
                reports: vec![serde_json::from_value::<ActivityReport>(
                    serde_json::json!({
                        "instance": "notes:alice",
                        "in_flight": 2,
                        "started": 17,
                        "succeeded": 15,
                    }),
                )?],
            },
        ),
        (
            "park_ack",
            Request::ParkAck {
                instance: alice.clone(),
                park_id: 9,
                accepted: true,
            },
        ),
        (
            "add",
            Request::Add {
                instances: vec![alice.clone(), bob.clone()],
            },
        ),
        (
            "spawn",
            Request::Spawn {
                instance: bob.clone(),
            },
        ),
        (
            "stop",
            Request::Stop {
                instance: bob.clone(),
            },
        ),
        (
            "restart",
            Request::Restart {
                instance: bob.clone(),
            },
        ),
        (
            "remove",
            Request::Remove {
                instance: bob.clone(),
                purge: true,
            },
        ),
        (
            "list",
            Request::List {
                query: Default::default(),
            },
        ),
        ("reload", Request::Reload),
        (
            "status",
            Request::Status {
                instance: alice.clone(),
            },
        ),
        (
            "logs",
            Request::Logs {
                instance: alice.clone(),
                lines: Some(100),
                follow: true,
            },
        ),
        (
            "list_query",
            serde_json::from_value(serde_json::json!({
                "type": "list",
                "query": {"service": "notes", "state": "running", "search": "ali",
                          "after": "notes:al", "limit": 100, "sort": "restarts", "offset": 5}
            }))?,
        ),
        (
            "token_create",
            serde_json::from_value(serde_json::json!({
                "type": "token_create", "scope": "tenant:notes:alice", "read_only": true,
                "lifetime_s": 3600, "name": "ci"
            }))?,
        ),
        (
            "authed",
            Request::Authed {
                credential: tenement_proto::auth::Secret(format!(
                    "tnm_0123456789abcdef_{}",
                    "5".repeat(64)
                )),
                peer: Some("203.0.113.9".parse()?),
                call: Box::new(Request::Status { instance: alice }),
            },
        ),
    ])
}

/// API requests as `METHOD\nPATH[?QUERY]\nBODY`: every call of the API's own table, and a
/// few a stranger would try.
/// Named seed files.
type Seeds = Vec<(String, Vec<u8>)>;

fn api_requests() -> Result<Seeds, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for (name, request) in requests()? {
        let Some(http) = tenement_proto::api::to_http(&request) else {
            continue;
        };
        let query: Vec<String> = http.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = if query.is_empty() {
            http.path.clone()
        } else {
            format!("{}?{}", http.path, query.join("&"))
        };
        let body = http.body.map(|b| b.to_string()).unwrap_or_default();
        out.push((
            name.to_owned(),
            format!("{}\n{target}\n{body}", http.method).into_bytes(),
        ));
    }
    for (name, text) in [
        (
            "traversal",
            "GET\n/api/v1/instances/..%2F..%2Fetc%2Fpasswd\n",
        ),
        (
            "tokens_create",
            "POST\n/api/v1/tokens\n{\"scope\":\"service:notes\",\"lifetime_s\":60}",
        ),
        (
            "rollback",
            "POST\n/api/v1/services/notes/rollback\n{\"to\":2,\"steps\":[5,100]}",
        ),
        (
            "page",
            "GET\n/api/v1/instances?service=notes&sort=active&offset=100&limit=1000\n",
        ),
        (
            "logs_search",
            "GET\n/api/v1/instances/notes:alice/logs?search=a%20b&follow=true\n",
        ),
        (
            "bad_json",
            "POST\n/api/v1/instances\n{\"instances\":[\"notes:a\"",
        ),
    ] {
        out.push((name.to_owned(), text.as_bytes().to_vec()));
    }
    Ok(out)
}

fn responses() -> Result<Vec<(&'static str, Response)>, Box<dyn std::error::Error>> {
    let alice = InstanceId::parse("notes:alice")?;
    let notes = ServiceName::new("notes")?;
    // Structs with many optional fields are written as JSON and decoded, so a field added
    // with a default does not break the generator; the frames are still made by `encode`.
    let route: Route = serde_json::from_value(serde_json::json!({
        "instance": "notes:alice",
        "state": "running",
        "address": {"kind": "tcp", "addr": "127.0.0.1:20001"},
        "weight": 1,
        "generation": 3,
        "owner_uid": 61000,
    }))?;
    let unix_route: Route = serde_json::from_value(serde_json::json!({
        "instance": "blog:bob",
        "state": "stopped",
        "address": {"kind": "unix", "addr": "/run/tenement/sockets/blog/bob.sock"},
        "weight": 0,
        "generation": 0,
    }))?;
    let info: InstanceInfo = serde_json::from_value(serde_json::json!({
        "instance": "notes:alice",
        "service": "notes",
        "id": "alice",
        "state": "running",
        "pid": 4242,
        "address": "127.0.0.1:20001",
        "uptime_s": 61,
        "idle_s": 5,
        "restarts": 1,
        "health": "healthy",
        "in_flight": 0,
        "weight": 1,
        "data_dir": "/var/lib/tenement/data/notes/alice",
        "isolation": "namespace, cgroup (cpu, memory, pids)",
        "uid": 61000,
        "cgroup": "/sys/fs/cgroup/tenement/notes/alice",
        "limits": "memory_max=64MiB pids_max=64",
        "memory_bytes": 12345678,
        "pids": 3,
        "last_exit": "signal 9 (SIGKILL)",
    }))?;
    Ok(vec![
        (
            "hello",
            Response::Hello {
                version: PROTOCOL_VERSION,
                server: "tenement-supervisor 0.1.0".into(),
                role: Role::Proxy,
            },
        ),
        ("ok", Response::Ok),
        ("config_reloaded", Response::ConfigReloaded),
        (
            "error",
            Response::Error {
                code: ErrorCode::WrongRole,
                message: "spawn is not allowed on proxy.sock".into(),
            },
        ),
        (
            "added",
            Response::Added {
                added: vec![alice.clone()],
                existing: vec![InstanceId::parse("notes:bob")?],
            },
        ),
        (
            "reloaded",
            Response::Reloaded {
                added: vec![ServiceName::new("blog")?],
                changed: vec![notes],
                removed: vec![],
            },
        ),
        (
            "woken",
            Response::Woken {
                route: route.clone(),
                started: true,
                elapsed_us: 48_211,
            },
        ),
        (
            "route",
            Response::Route {
                route: unix_route.clone(),
            },
        ),
        (
            "instances",
            Response::Instances {
                instances: vec![info.clone()],
                more: true,
                next: None,
                total: None,
            },
        ),
        (
            "status",
            Response::Status {
                status: Box::new(info),
            },
        ),
        (
            "logs",
            Response::Logs {
                lines: vec![
                    LogLine {
                        ts_ms: 1_700_000_000_000,
                        stream: LogStream::Stdout,
                        line: "listening on 127.0.0.1:20001".into(),
                    },
                    LogLine {
                        ts_ms: 1_700_000_000_001,
                        stream: LogStream::Event,
                        line: "ready".into(),
                    },
                ],
            },
        ),
        (
            "routes",
            Response::Routes {
                routes: vec![route, unix_route],
                reset: true,
                complete: true,
                removed: vec![InstanceId::parse("notes:carol")?],
            },
        ),
        (
            "park",
            Response::Park {
                instance: alice,
                park_id: 9,
                drain: true,
            },
        ),
    ])
}
