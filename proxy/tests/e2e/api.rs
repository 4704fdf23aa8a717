//! The management API at `{domain}/api/v1/` (docs/API.md) against the real daemons: every
//! verb with admin, service, tenant and read-only tokens, log streams as Server-Sent Events,
//! the transport rule (tokens over HTTPS or from this host only), the per-address limit of
//! bad tokens, bad input, and no secret in any log or in the registry file.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const APPS: &str = r#"
[service.notes]
command = "@TINY@"
[service.wiki]
command = "@TINY@"
# Registered by the thousand, never started: a Unix socket each, so no port is used up.
[service.many]
command = "@TINY@"
listen = "unix"
"#;

/// One API request on a new connection; `extra` are more header lines.
fn api_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    extra: &[&str],
) -> Reply {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    exchange(addr, request.as_bytes()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn api(sandbox: &Sandbox, method: &str, path: &str, token: &str, body: Option<&str>) -> Reply {
    api_with(sandbox.proxy_addr, method, path, Some(token), body, &[])
}

/// The JSON of an answer that must have `status`.
fn expect(reply: &Reply, status: u16, what: &str) -> Value {
    assert_eq!(reply.status(), status, "{what}: {}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{what}");
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{what}: {e}: {}", reply.text()))
}

fn error_code(reply: &Reply, status: u16, what: &str) -> String {
    let doc = expect(reply, status, what);
    doc["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error code in {doc}"))
        .to_owned()
}

fn names(doc: &Value) -> Vec<String> {
    doc["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap().to_owned())
        .collect()
}

/// `tenctl token create ARGS`: the token printed alone on stdout.
fn mint(sandbox: &Sandbox, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let token = tenctl_ok(sandbox, &all).trim().to_owned();
    assert!(token.starts_with("tnm_"), "{token}");
    token
}

fn token_id(token: &str) -> &str {
    token.split('_').nth(1).unwrap()
}

#[test]
fn every_verb_answers_by_scope() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice", "notes:bob", "wiki:carol"]);
    let admin = mint(&sb, &["--scope", "admin", "--name", "ops"]);
    let notes = mint(&sb, &["--scope", "service:notes"]);
    let alice = mint(&sb, &["--scope", "tenant:notes:alice"]);
    let viewer = mint(&sb, &["--scope", "admin", "--read-only"]);

    // Admin: everything.
    let doc = expect(
        &api(&sb, "GET", "/api/v1/instances", &admin, None),
        200,
        "list",
    );
    assert_eq!(names(&doc), ["notes:alice", "notes:bob", "wiki:carol"]);
    assert_eq!(doc["total"], 3);
    let doc = expect(
        &api(&sb, "GET", "/api/v1/whoami", &admin, None),
        200,
        "whoami",
    );
    assert_eq!(doc["token"]["scope"], "admin");
    assert_eq!(doc["token"]["name"], "ops");
    let doc = expect(
        &api(
            &sb,
            "POST",
            "/api/v1/instances/notes:bob/wake",
            &admin,
            None,
        ),
        200,
        "wake",
    );
    assert_eq!(doc["type"], "woken");
    let doc = expect(
        &api(&sb, "GET", "/api/v1/instances/notes:bob", &admin, None),
        200,
        "status",
    );
    assert_eq!(doc["status"]["state"], "running");
    let doc = expect(
        &api(
            &sb,
            "GET",
            "/api/v1/instances/notes:bob/logs?lines=50",
            &admin,
            None,
        ),
        200,
        "logs",
    );
    assert!(doc["lines"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["line"].as_str().unwrap().contains("tiny-http listening")));
    let doc = expect(
        &api(
            &sb,
            "GET",
            "/api/v1/instances/notes:bob/logs?search=no%20such%20line",
            &admin,
            None,
        ),
        200,
        "logs search",
    );
    assert_eq!(doc["lines"].as_array().unwrap().len(), 0);
    expect(
        &api(
            &sb,
            "POST",
            "/api/v1/instances/notes:bob/restart",
            &admin,
            None,
        ),
        200,
        "restart",
    );
    expect(
        &api(
            &sb,
            "POST",
            "/api/v1/instances/notes:bob/stop",
            &admin,
            None,
        ),
        200,
        "stop",
    );
    let doc = expect(
        &api(
            &sb,
            "POST",
            "/api/v1/instances",
            &admin,
            Some(r#"{"instances":["notes:dave"]}"#),
        ),
        200,
        "add",
    );
    assert_eq!(doc["added"], serde_json::json!(["notes:dave"]));
    let doc = expect(
        &api(
            &sb,
            "PUT",
            "/api/v1/instances/notes:dave/weight",
            &admin,
            Some(r#"{"weight":0}"#),
        ),
        200,
        "weight",
    );
    assert_eq!(doc["changes"][0]["to"], 0);
    expect(
        &api(
            &sb,
            "POST",
            "/api/v1/instances/notes:dave/spawn",
            &admin,
            None,
        ),
        200,
        "spawn",
    );
    expect(
        &api(
            &sb,
            "DELETE",
            "/api/v1/instances/notes:dave?purge=true",
            &admin,
            None,
        ),
        200,
        "remove",
    );
    let doc = expect(
        &api(&sb, "GET", "/api/v1/services/notes/releases", &admin, None),
        200,
        "releases",
    );
    assert_eq!(doc["service"], "notes");
    // No rollout yet: the same answer as `tenctl rollout status notes`.
    let reply = api(&sb, "GET", "/api/v1/services/notes/rollout", &admin, None);
    assert_eq!(error_code(&reply, 400, "rollout status"), "bad_request");
    assert!(reply.text().contains("has no rollout"), "{}", reply.text());
    let doc = expect(
        &api(&sb, "POST", "/api/v1/reload", &admin, None),
        200,
        "reload",
    );
    assert_eq!(doc["type"], "reloaded");
    let doc = expect(
        &api(
            &sb,
            "POST",
            "/api/v1/tokens",
            &admin,
            Some(r#"{"scope":"tenant:notes:bob","read_only":true,"name":"from the api"}"#),
        ),
        200,
        "token create",
    );
    let minted = doc["token"].as_str().unwrap().to_owned();
    let minted_id = doc["info"]["id"].as_str().unwrap().to_owned();
    let doc = expect(
        &api(&sb, "GET", "/api/v1/tokens", &admin, None),
        200,
        "tokens",
    );
    assert_eq!(doc["tokens"].as_array().unwrap().len(), 5);
    assert!(!doc.to_string().contains(minted.rsplit('_').next().unwrap()));
    expect(
        &api(
            &sb,
            "DELETE",
            &format!("/api/v1/tokens/{minted_id}"),
            &admin,
            None,
        ),
        200,
        "token rm",
    );
    error_code(
        &api(&sb, "GET", "/api/v1/whoami", &minted, None),
        401,
        "a revoked token",
    );

    // A service token: its service only, no tokens, no reload.
    let doc = expect(
        &api(&sb, "GET", "/api/v1/instances", &notes, None),
        200,
        "list",
    );
    assert_eq!(names(&doc), ["notes:alice", "notes:bob"]);
    expect(
        &api(&sb, "GET", "/api/v1/services/notes/releases", &notes, None),
        200,
        "own releases",
    );
    for (method, path) in [
        ("GET", "/api/v1/instances/wiki:carol"),
        ("POST", "/api/v1/instances/wiki:carol/wake"),
        ("GET", "/api/v1/services/wiki/releases"),
        ("POST", "/api/v1/reload"),
        ("GET", "/api/v1/tokens"),
    ] {
        let code = error_code(&api(&sb, method, path, &notes, None), 403, path);
        assert_eq!(code, "forbidden");
    }

    // A tenant token: its own instance, and only status, logs, wake, restart, stop.
    let doc = expect(
        &api(&sb, "GET", "/api/v1/instances", &alice, None),
        200,
        "list",
    );
    assert_eq!(names(&doc), ["notes:alice"]);
    for (method, path) in [
        ("POST", "/api/v1/instances/notes:alice/wake"),
        ("GET", "/api/v1/instances/notes:alice"),
        ("GET", "/api/v1/instances/notes:alice/logs"),
        ("POST", "/api/v1/instances/notes:alice/restart"),
        ("POST", "/api/v1/instances/notes:alice/stop"),
    ] {
        expect(&api(&sb, method, path, &alice, None), 200, path);
    }
    for (method, path, body) in [
        ("GET", "/api/v1/instances/notes:bob", None),
        ("GET", "/api/v1/instances/notes:bob/logs", None),
        ("GET", "/api/v1/instances/notes:bob/logs?follow=true", None),
        ("POST", "/api/v1/instances/notes:bob/wake", None),
        ("GET", "/api/v1/instances/notes:nobody", None),
        ("DELETE", "/api/v1/instances/notes:alice", None),
        ("POST", "/api/v1/instances/notes:alice/spawn", None),
        ("GET", "/api/v1/services/notes/releases", None),
        ("POST", "/api/v1/tokens", Some(r#"{"scope":"admin"}"#)),
        ("GET", "/api/v1/tokens", None),
    ] {
        error_code(&api(&sb, method, path, &alice, body), 403, path);
    }

    // Read-only: reads, never changes.
    expect(
        &api(&sb, "GET", "/api/v1/instances", &viewer, None),
        200,
        "ro list",
    );
    expect(
        &api(&sb, "GET", "/api/v1/tokens", &viewer, None),
        200,
        "ro tokens",
    );
    for (method, path) in [
        ("POST", "/api/v1/instances/notes:alice/wake"),
        ("POST", "/api/v1/reload"),
        (
            "DELETE",
            &format!("/api/v1/tokens/{}", token_id(&alice)) as &str,
        ),
    ] {
        error_code(&api(&sb, method, path, &viewer, None), 403, path);
    }

    // Expired and revoked tokens are refused at once.
    let brief = mint(&sb, &["--scope", "admin", "--expires", "1s"]);
    expect(
        &api(&sb, "GET", "/api/v1/whoami", &brief, None),
        200,
        "fresh",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let reply = api(&sb, "GET", "/api/v1/whoami", &brief, None);
    error_code(&reply, 401, "expired");
    assert!(reply.text().contains("expired"), "{}", reply.text());
    tenctl_ok(&sb, &["token", "rm", token_id(&notes)]);
    let reply = api(&sb, "GET", "/api/v1/instances", &notes, None);
    error_code(&reply, 401, "revoked");
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"tenement\"")
    );

    // Audit events name the token by its id; no secret anywhere on disk or in a log.
    let log = sb.supervisor_log();
    assert!(
        log.contains(&format!(
            "audit: wake notes:alice by token {} (tenant:notes:alice): ok",
            token_id(&alice)
        )),
        "{log}"
    );
    assert!(
        log.contains("audit: token_create tenant:notes:bob by token"),
        "{log}"
    );
    // A refusal of a good token is audited with its id; a bad credential with its address.
    assert!(
        log.contains(&format!(
            "audit: wake notes:bob by token {} (tenant:notes:alice): forbidden",
            token_id(&alice)
        )),
        "{log}"
    );
    assert!(log.contains("audit: reload by token"), "{log}");
    let registry = std::fs::read_to_string(sb.state_dir.join("registry.json")).unwrap();
    let proxy_log = sb.proxy_log();
    for token in [&admin, &notes, &alice, &viewer, &brief, &minted] {
        let secret = token.rsplit('_').next().unwrap();
        assert!(!registry.contains(secret), "a secret in the registry");
        assert!(!log.contains(secret), "a secret in the supervisor's log");
        assert!(!proxy_log.contains(secret), "a secret in the proxy's log");
    }
    assert!(registry.contains(token_id(&admin)));
}

/// Reads SSE events (the `data:` of each, or `error:` + data for error events) until `stop`
/// says so or `within` passes.
fn read_events(
    reader: &mut impl BufRead,
    within: Duration,
    mut stop: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    let mut kind = String::new();
    while Instant::now() < deadline {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => panic!("reading the event stream: {e}"),
        }
        let line = line.trim_end();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let event = if kind.is_empty() {
                data.to_owned()
            } else {
                format!("{kind}: {data}")
            };
            kind.clear();
            let done = stop(&event);
            events.push(event);
            if done {
                break;
            }
        }
    }
    events
}

#[test]
fn log_streams_are_server_sent_events_within_scope() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice", "notes:bob"]);
    let alice = mint(&sb, &["--scope", "tenant:notes:alice"]);

    // Another tenant's stream is refused before it starts, as plain JSON.
    let reply = api(
        &sb,
        "GET",
        "/api/v1/instances/notes:bob/logs?follow=true",
        &alice,
        None,
    );
    error_code(&reply, 403, "another tenant's stream");

    let mut stream = connect(sb.proxy_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        stream,
        "GET /api/v1/instances/notes:alice/logs?follow=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut content_type = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-type:") {
            content_type = Some(v.trim().to_owned());
        }
    }
    assert_eq!(content_type.as_deref(), Some("text/event-stream"));
    // The chunked framing's size lines are not `data:` lines, so they are skipped as noise.
    // Waking the tenant writes its first line, which arrives as an event.
    tenctl_ok(&sb, &["wake", "notes:alice"]);
    let events = read_events(&mut reader, EVENT_DEADLINE, |e| {
        e.contains("tiny-http listening")
    });
    let last = events.last().expect("an event");
    assert!(last.contains("tiny-http listening"), "{events:?}");
    let doc: Value = serde_json::from_str(last).unwrap();
    assert_eq!(doc["type"], "logs");

    // Revoking the token ends the stream with an error event.
    tenctl_ok(&sb, &["token", "rm", token_id(&alice)]);
    let events = read_events(&mut reader, EVENT_DEADLINE, |e| e.starts_with("error: "));
    let last = events.last().expect("an error event");
    assert!(last.starts_with("error: "), "{events:?}");
    assert!(last.contains("unauthenticated"), "{last}");
}

#[test]
fn tokens_travel_over_https_or_from_this_host_only() {
    let sb = Sandbox::new(&format!(
        "{APPS}\n# a TLS terminator in front, on this host\n"
    ));
    // trusted_proxies belongs to [settings]: rewrite the file with it there.
    let text = std::fs::read_to_string(&sb.config_path).unwrap();
    let text = text.replacen(
        "[settings]\n",
        "[settings]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        1,
    );
    std::fs::write(&sb.config_path, text).unwrap();
    let _daemons = sb.start();
    let admin = mint(&sb, &["--scope", "admin"]);
    let from_afar = |proto: &str| {
        api_with(
            sb.proxy_addr,
            "GET",
            "/api/v1/whoami",
            Some(&admin),
            None,
            &[
                "X-Forwarded-For: 203.0.113.5",
                &format!("X-Forwarded-Proto: {proto}"),
            ],
        )
    };
    let reply = from_afar("http");
    assert_eq!(
        error_code(&reply, 403, "plain http from afar"),
        "https_required"
    );
    assert!(reply.text().contains("203.0.113.5"), "{}", reply.text());
    expect(&from_afar("https"), 200, "https from afar");
    // From this host, plain HTTP is fine.
    expect(
        &api(&sb, "GET", "/api/v1/whoami", &admin, None),
        200,
        "loopback",
    );

    // 1,000 bad tokens from one address do not lock out a good token from another.
    let bad = format!("tnm_00000000deadbeef_{}", "0".repeat(64));
    let mut limited = 0;
    for _ in 0..1000 {
        let reply = api_with(
            sb.proxy_addr,
            "GET",
            "/api/v1/whoami",
            Some(&bad),
            None,
            &["X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https"],
        );
        match reply.status() {
            429 => {
                limited += 1;
                assert_eq!(reply.header("retry-after"), Some("5"));
            }
            401 => {}
            other => panic!("a bad token got {other}: {}", reply.text()),
        }
    }
    assert!(
        limited >= 950,
        "only {limited} of 1000 bad tokens were limited"
    );
    let reply = api_with(
        sb.proxy_addr,
        "GET",
        "/api/v1/whoami",
        Some(&admin),
        None,
        &["X-Forwarded-For: 198.51.100.7", "X-Forwarded-Proto: https"],
    );
    expect(&reply, 200, "a good token from another address");
}

#[test]
fn bad_input_gets_a_clean_4xx() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice"]);
    let admin = mint(&sb, &["--scope", "admin"]);
    let addr = sb.proxy_addr;

    // No token, a malformed one, an overlong one.
    let reply = api_with(addr, "GET", "/api/v1/instances", None, None, &[]);
    assert_eq!(error_code(&reply, 401, "no token"), "unauthenticated");
    error_code(
        &api_with(addr, "GET", "/api/v1/instances", Some("hunter2"), None, &[]),
        401,
        "malformed token",
    );
    let long = "tnm_".to_owned() + &"a".repeat(8000);
    error_code(
        &api_with(addr, "GET", "/api/v1/instances", Some(&long), None, &[]),
        401,
        "overlong token",
    );
    error_code(
        &api_with(
            addr,
            "GET",
            "/api/v1/instances",
            None,
            None,
            &[&format!("Authorization: Basic {admin}")],
        ),
        401,
        "not a bearer",
    );

    // Paths, ids and bodies.
    for (method, path, body, status) in [
        ("GET", "/api/v1/instances/..%2F..%2Fetc%2Fpasswd", None, 400),
        ("GET", "/api/v1/instances/notes:..", None, 400),
        ("GET", "/api/v1/instances/notes:alice%00", None, 400),
        (
            "GET",
            "/api/v1/instances/notes:alice/../../tokens",
            None,
            404,
        ),
        ("GET", "/api/v1/services/..%2f/releases", None, 400),
        ("DELETE", "/api/v1/tokens/..%2F..", None, 400),
        ("GET", "/api/v1/nowhere", None, 404),
        ("GET", "/api/v1", None, 404),
        ("PATCH", "/api/v1/instances/notes:alice", None, 405),
        ("POST", "/api/v1/instances", Some("{not json"), 400),
        (
            "POST",
            "/api/v1/instances",
            Some(r#"{"instances":["../x"]}"#),
            400,
        ),
        ("GET", "/api/v1/instances?limit=-1", None, 400),
        ("GET", "/api/v1/instances/notes:nobody", None, 404),
    ] {
        let reply = api(&sb, method, path, &admin, body);
        assert_eq!(reply.status(), status, "{method} {path}: {}", reply.text());
        expect(&reply, status, path);
    }
    // A body beyond the limit.
    let big = format!(r#"{{"instances":["{}"]}}"#, "a".repeat(70_000));
    let reply = api(&sb, "POST", "/api/v1/instances", &admin, Some(&big));
    assert_eq!(error_code(&reply, 413, "a big body"), "body_too_large");

    // The API is at {domain} only: elsewhere /api is a tenant's own path or no host at all.
    let request = format!(
        "GET /api/v1/whoami HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n"
    );
    let reply = exchange(addr, request.as_bytes()).unwrap();
    assert_eq!(reply.status(), 404, "{}", reply.text());
    assert!(!reply.text().contains("\"type\""), "{}", reply.text());
    let request = format!(
        "GET /api/v1/whoami HTTP/1.1\r\nHost: alice.notes.localhost\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n"
    );
    let reply = exchange(addr, request.as_bytes()).unwrap();
    assert_eq!(
        reply.text(),
        "hello from notes:alice\n",
        "a tenant's /api is the tenant's own path"
    );
}

/// `tenctl --remote URL ARGS` with `token` in TENEMENT_TOKEN.
fn remote_tenctl(sandbox: &Sandbox, token: &str, args: &[&str]) -> std::process::Output {
    let url = format!("http://localhost:{}", sandbox.proxy_addr.port());
    std::process::Command::new(tenctl_binary())
        .arg("--remote")
        .arg(&url)
        .args(args)
        .env("TENEMENT_TOKEN", token)
        .env_remove("TENEMENT_URL")
        .env_remove("TENEMENT_TOKEN_FILE")
        .env_remove("TENEMENT_CONFIG")
        .output()
        .expect("run tenctl --remote")
}

/// Runs a verb locally and remotely until both print the same (a second may tick between
/// two runs and change an uptime); the two outputs of the last try.
fn local_and_remote(sandbox: &Sandbox, token: &str, args: &[&str]) -> (String, String) {
    let mut last = (String::new(), String::new());
    for _ in 0..5 {
        let local = tenctl_ok(sandbox, args);
        let out = remote_tenctl(sandbox, token, args);
        assert!(
            out.status.success(),
            "tenctl --remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let remote = String::from_utf8_lossy(&out.stdout).into_owned();
        if remote == local {
            return (local, remote);
        }
        last = (local, remote);
    }
    last
}

#[test]
fn remote_tenctl_prints_what_local_tenctl_prints() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice", "notes:bob", "wiki:carol"]);
    tenctl_ok(&sb, &["wake", "notes:alice"]);
    let admin = mint(&sb, &["--scope", "admin"]);
    for args in [
        &["ps"][..],
        &["ps", "--json"],
        &["ps", "notes"],
        &["status", "notes:alice"],
        &["status", "notes:bob", "--json"],
        &["logs", "notes:alice"],
        &["logs", "notes:alice", "-n", "1", "--grep", "listening"],
        &["releases", "notes"],
    ] {
        let (local, remote) = local_and_remote(&sb, &admin, args);
        assert_eq!(remote, local, "tenctl {args:?}");
    }
    // More than one page (1,000) of instances: tenctl follows the pages.
    let many: Vec<String> = (0..1050).map(|n| format!("many:m{n:04}")).collect();
    let mut args = vec!["add"];
    args.extend(many.iter().map(String::as_str));
    tenctl_ok(&sb, &args);
    let (local, remote) = local_and_remote(&sb, &admin, &["ps", "many", "--json"]);
    assert!(remote == local, "ps of 1,050 instances differs");
    let listed: Value = serde_json::from_str(&remote).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1050);
    // wake prints how long the wake took: the same line but for that figure.
    let figure = without_figure;
    let local = tenctl_ok(&sb, &["wake", "notes:alice"]);
    let out = remote_tenctl(&sb, &admin, &["wake", "notes:alice"]);
    assert!(out.status.success());
    assert_eq!(
        figure(&String::from_utf8_lossy(&out.stdout)),
        figure(&local),
        "wake"
    );
    let out = remote_tenctl(&sb, &admin, &["wake", "wiki:carol"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wiki:carol ready in "));
    assert!(tenctl_ok(&sb, &["status", "wiki:carol", "--json"]).contains("\"state\": \"running\""));
    // token ls differs in one thing only: the remote call itself is the token's last use.
    let out = remote_tenctl(&sb, &admin, &["token", "ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(token_id(&admin)));

    // A tenant token through tenctl: its own instance, and the refusal says why, exit 5.
    let alice = mint(&sb, &["--scope", "tenant:notes:alice"]);
    let out = remote_tenctl(&sb, &alice, &["ps"]);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("notes:alice") && !listed.contains("notes:bob"),
        "{listed}"
    );
    let out = remote_tenctl(&sb, &alice, &["status", "notes:bob"]);
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may not status notes:bob"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = remote_tenctl(&sb, &alice, &["token", "create", "--scope", "admin"]);
    assert_eq!(out.status.code(), Some(5));

    // logs --follow through the API: new lines arrive, and the stream ends when the token
    // is revoked, with the reason.
    let url = format!("http://localhost:{}", sb.proxy_addr.port());
    let mut follower = std::process::Command::new(tenctl_binary())
        .args(["--remote", &url, "logs", "-f", "notes:bob"])
        .env("TENEMENT_TOKEN", &admin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tenctl_ok(&sb, &["wake", "notes:bob"]);
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let seen = rx
        .iter()
        .find(|l| l.contains("tiny-http listening"))
        .is_some();
    assert!(seen);
    tenctl_ok(&sb, &["token", "rm", token_id(&admin)]);
    let status = follower.wait().unwrap();
    assert_eq!(status.code(), Some(5));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut follower.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("revoked or has expired"), "{err}");
}

/// `wake`'s line with its figure (`ready in 0.4 ms`) taken out.
fn without_figure(text: &str) -> String {
    let Some(start) = text.find("ready in ") else {
        return text.to_owned();
    };
    let rest = &text[start + "ready in ".len()..];
    let end = rest.find(" (").unwrap_or(rest.len());
    format!("{}ready in _{}", &text[..start], &rest[end..])
}

#[test]
fn log_streams_cannot_starve_wakes() {
    let sb = Sandbox::new(APPS);
    let _daemons = sb.start();
    tenctl_ok(&sb, &["add", "notes:alice", "notes:bob"]);
    let alice = mint(&sb, &["--scope", "tenant:notes:alice"]);
    // A token holder opens more log streams than the API may hold supervisor connections for.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut stream = connect(sb.proxy_addr).unwrap();
        write!(
            stream,
            "GET /api/v1/instances/notes:alice/logs?follow=true HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        if status.starts_with("HTTP/1.1 503") {
            refused += 1;
        } else {
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            open.push(stream);
        }
    }
    assert_eq!(open.len(), 96, "streams held");
    assert_eq!(refused, 4);
    // Requests still wake tenants: the proxy's own calls have their connections.
    let body = get_ok(sb.proxy_addr, "bob.notes.localhost", "/");
    assert_eq!(body, "hello from notes:bob");
    // Streams that end give their connections back.
    open.clear();
    let ok = wait_until(EVENT_DEADLINE, || {
        api(&sb, "GET", "/api/v1/whoami", &alice, None).status() == 200
    });
    assert!(ok, "the API never had a connection again");
}
