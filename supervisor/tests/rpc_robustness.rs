//! The RPC sockets of the real supervisor under hostile input: ids that could reach a path or
//! an argv are refused before any file or process work, and garbage, oversized frames, silent
//! clients and protocol mistakes get typed errors (or a closed connection), never a crash or a
//! stall of other clients. A flood of one socket waits for its slots without touching the other
//! socket's, and request connections that go quiet are closed.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tenement_proto::rpc::{ErrorCode, Request, Response, Role, PROTOCOL_VERSION};

const NOTES: &str = r#"
[service.notes]
command = "@TINY@"
"#;

/// The supervisor's deadline for a client's hello (`HELLO_TIMEOUT` in rpc_server.rs). A
/// connection that waited for more input before hello is only closed when it expires, so an
/// answer before it proves the supervisor did not wait, however slow the machine is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The number of connections proxy.sock serves at once (`PROXY_CONNECTIONS` in rpc_server.rs).
const PROXY_CONNECTIONS: usize = 256;
/// How long the supervisor keeps a request connection that sends nothing (`IDLE_TIMEOUT` in
/// rpc_server.rs). Not configurable: the test that needs it waits it out.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Says hello on a raw connection.
fn raw_hello(path: &Path) -> UnixStream {
    let mut s = raw_connect(path);
    send_frame(&mut s, &hello_frame(PROTOCOL_VERSION));
    match read_response(&mut s) {
        Some(Response::Hello { .. }) => s,
        other => panic!("hello answered with {other:?}"),
    }
}

fn expect_code(stream: &mut UnixStream, code: ErrorCode, what: &str) -> String {
    match read_response(stream) {
        Some(Response::Error { code: got, message }) if got == code => message,
        other => panic!("{what}: expected {}, got {other:?}", code.as_str()),
    }
}

/// A request that needs no instance, to show the connection still works.
fn still_usable(stream: &mut UnixStream, role: Role, what: &str) {
    let probe = match role {
        Role::Admin => br#"{"type":"list"}"#.as_slice(),
        Role::Proxy => br#"{"type":"resolve","instance":"notes:nobody"}"#.as_slice(),
    };
    send_frame(stream, probe);
    match read_response(stream) {
        Some(Response::Instances { .. }) if role == Role::Admin => {}
        Some(Response::Error {
            code: ErrorCode::UnknownInstance,
            ..
        }) if role == Role::Proxy => {}
        other => panic!("{what}: the connection is not usable any more: {other:?}"),
    }
}

#[test]
fn unsafe_instance_ids_are_refused_before_any_file_or_process_work() {
    let sb = Sandbox::new(NOTES);
    let _sup = sb.start();
    let data_before = tree_listing(&sb.data_dir);
    let state_before = tree_listing(&sb.state_dir);
    let long = format!("notes:{}", "a".repeat(64));
    let bad_ids = [
        "notes:../x",
        "notes:A B",
        "notes:a.b",
        "notes:",
        long.as_str(),
        "../x",
        "notes:{port}",
        "notes:/tmp/x",
        "notes:a\u{0}b",
    ];
    let mut admin = raw_hello(&sb.admin_socket());
    let mut proxy = raw_hello(&sb.proxy_socket());
    for id in bad_ids {
        let id_json = serde_json::to_string(id).unwrap();
        for body in [
            format!(r#"{{"type":"wake","instance":{id_json}}}"#),
            format!(r#"{{"type":"wake","instance":{id_json},"timeout_ms":100}}"#),
            format!(r#"{{"type":"add","instances":[{id_json}]}}"#),
            format!(r#"{{"type":"add","instances":["notes:fine",{id_json}]}}"#),
            format!(r#"{{"type":"spawn","instance":{id_json}}}"#),
            format!(r#"{{"type":"remove","instance":{id_json},"purge":true}}"#),
            format!(r#"{{"type":"status","instance":{id_json}}}"#),
        ] {
            send_frame(&mut admin, body.as_bytes());
            expect_code(&mut admin, ErrorCode::BadRequest, &body);
        }
        for body in [
            format!(r#"{{"type":"wake","instance":{id_json}}}"#),
            format!(r#"{{"type":"resolve","instance":{id_json}}}"#),
        ] {
            send_frame(&mut proxy, body.as_bytes());
            expect_code(&mut proxy, ErrorCode::BadRequest, &body);
        }
    }
    still_usable(&mut admin, Role::Admin, "after bad ids");
    still_usable(&mut proxy, Role::Proxy, "after bad ids");
    let mut c = Client::admin(&sb);
    assert!(c.ps().is_empty(), "a bad id was registered: {:?}", c.ps());
    assert_eq!(tree_listing(&sb.data_dir), data_before, "data_dir changed");
    assert_eq!(
        tree_listing(&sb.state_dir),
        state_before,
        "state_dir changed"
    );
    assert!(sb.leftover_processes().is_empty(), "a process was started");
}

/// Pseudo-random bytes (xorshift), the same each run.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn garbage_on(sb: &Sandbox, socket: &Path, role: Role) {
    let what = format!("{role:?} socket");

    // Random bytes without hello, then the write side closed: an error reply or a close.
    for seed in 1..=8u64 {
        let mut s = raw_connect(socket);
        s.write_all(&noise(64, seed)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        while let Some(response) = read_response_lenient(&mut s) {
            assert!(
                matches!(response, Response::Error { .. }),
                "{what}: noise answered with {response:?}"
            );
        }
    }

    // A text protocol spoken at it.
    let mut s = raw_connect(socket);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    match read_response_lenient(&mut s) {
        None
        | Some(Response::Error {
            code: ErrorCode::FrameTooLarge | ErrorCode::BadRequest,
            ..
        }) => {}
        other => panic!("{what}: HTTP answered with {other:?}"),
    }

    // A length prefix of 4 GiB: refused at once, without waiting for the body.
    for hello_first in [false, true] {
        // Before the connection exists, so that its hello deadline cannot end before
        // t0 + HELLO_TIMEOUT.
        let t0 = Instant::now();
        let mut s = if hello_first {
            raw_hello(socket)
        } else {
            raw_connect(socket)
        };
        s.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        match read_response_lenient(&mut s) {
            None
            | Some(Response::Error {
                code: ErrorCode::FrameTooLarge,
                ..
            }) => {}
            other => panic!("{what}: 4 GiB frame answered with {other:?}"),
        }
        // After hello only IDLE_TIMEOUT closes a connection that waits for input: that would
        // hang until the read timeout above. Before hello it would close at the hello deadline.
        assert!(
            t0.elapsed() < HELLO_TIMEOUT,
            "{what}: waited {:?} for the body",
            t0.elapsed()
        );
    }

    // A valid length with non-JSON: before hello the connection ends with bad_request...
    let mut s = raw_connect(socket);
    send_frame(&mut s, b"\x00\x01not json at all\xff");
    expect_code(&mut s, ErrorCode::BadRequest, "non-JSON before hello");
    // ...after hello it continues.
    let mut s = raw_hello(socket);
    send_frame(&mut s, b"not json at all");
    expect_code(&mut s, ErrorCode::BadRequest, "non-JSON after hello");
    still_usable(&mut s, role, "after non-JSON");

    // Well-formed JSON the protocol does not know.
    for body in [
        r#"{"type":"format_disk"}"#,
        r#"{"type":"format_disk","device":"/dev/sda"}"#,
        r#"{"no_type":true}"#,
        r#"[1,2,3]"#,
        r#""hello""#,
        r#"{"type":"wake"}"#,
        r#"{"type":"wake","instance":17}"#,
    ] {
        send_frame(&mut s, body.as_bytes());
        expect_code(&mut s, ErrorCode::BadRequest, body);
    }
    still_usable(&mut s, role, "after unknown requests");

    // A second hello is a mistake, not a new session.
    send_frame(&mut s, &hello_frame(PROTOCOL_VERSION));
    expect_code(&mut s, ErrorCode::HelloRequired, "second hello");
    still_usable(&mut s, role, "after a second hello");

    // No hello first.
    let mut s = raw_connect(socket);
    send_frame(&mut s, br#"{"type":"list"}"#);
    expect_code(&mut s, ErrorCode::HelloRequired, "list before hello");

    // Another protocol version.
    let mut s = raw_connect(socket);
    send_frame(&mut s, &hello_frame(PROTOCOL_VERSION + 98));
    expect_code(&mut s, ErrorCode::UnsupportedVersion, "hello version 99");

    // Half a frame, then gone; and a half frame left hanging while others work.
    let mut s = raw_hello(socket);
    s.write_all(&[0, 0, 0, 100, b'{', b'"']).unwrap();
    drop(s);
    let mut hanging = raw_hello(socket);
    hanging.write_all(&[0, 0, 0, 100, b'{', b'"']).unwrap();

    // Clients that connect and say nothing do not hold up anyone else: one that waited behind
    // even one of them would wait for its hello deadline.
    let t0 = Instant::now();
    let silent: Vec<UnixStream> = (0..10).map(|_| raw_connect(socket)).collect();
    let mut other = raw_hello(socket);
    still_usable(&mut other, role, "beside silent clients");
    assert!(
        t0.elapsed() < HELLO_TIMEOUT,
        "{what}: a client waited {:?} behind silent ones",
        t0.elapsed()
    );
    drop(silent);
    drop(hanging);
    let _ = sb;
}

/// Like [`read_response`], but a reset or undecodable answer counts as closed.
fn read_response_lenient(stream: &mut UnixStream) -> Option<Response> {
    match tenement_proto::frame::read_message::<_, Response>(stream) {
        Ok(response) => Some(response),
        Err(tenement_proto::frame::FrameError::Io(e))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!("the supervisor neither answered nor closed the connection")
        }
        Err(_) => None,
    }
}

#[test]
fn garbage_on_both_sockets_gets_errors_and_the_supervisor_keeps_serving() {
    let sb = Sandbox::new(NOTES);
    let mut sup = sb.start();
    garbage_on(&sb, &sb.admin_socket(), Role::Admin);
    garbage_on(&sb, &sb.proxy_socket(), Role::Proxy);
    assert!(
        sup.is_running(),
        "the supervisor died:\n{}",
        sb.supervisor_log()
    );
    let mut c = Client::admin(&sb);
    assert!(c.ps().is_empty());
    let p = Client::proxy(&sb);
    assert_eq!(p.role, Role::Proxy);
}

#[test]
fn admin_calls_on_the_proxy_socket_are_wrong_role_and_the_connection_continues() {
    let sb = Sandbox::new(NOTES);
    let _sup = sb.start();
    let mut admin = Client::admin(&sb);
    assert!(matches!(admin.add(&["notes:bob"]), Response::Added { .. }));
    let mut p = Client::proxy(&sb);
    assert_eq!(p.role, Role::Proxy);
    for request in [
        Request::List {
            query: Default::default(),
        },
        Request::Spawn {
            instance: iid("notes:mallory"),
        },
        Request::Stop {
            instance: iid("notes:bob"),
        },
        Request::Remove {
            instance: iid("notes:bob"),
            purge: true,
        },
        Request::Add {
            instances: vec![iid("notes:mallory")],
        },
        Request::Logs {
            instance: iid("notes:bob"),
            lines: None,
            follow: true,
        },
    ] {
        let name = request.name();
        let message = expect_error(p.call(request), ErrorCode::WrongRole);
        assert!(message.contains(name), "{message}");
    }
    // Still usable for what the proxy may do.
    let (route, _) = expect_woken(p.wake("notes:bob"));
    assert_eq!(route.instance, iid("notes:bob"));
    // Read-only numbers for the metrics: the supervisor itself, every service, and with
    // `instances` the running ones only.
    match p.call(Request::Stats { instances: true }) {
        Response::Stats {
            supervisor: Some(supervisor),
            services,
            instances,
            more: false,
        } => {
            assert!(supervisor.rss_bytes > 0 && supervisor.open_fds > 0);
            let names: Vec<&str> = services.iter().map(|s| s.service.as_str()).collect();
            assert_eq!(names, ["notes"]);
            assert_eq!(instances.len(), 1, "{instances:?}");
            assert_eq!(instances[0].instance, iid("notes:bob"));
            assert!(instances[0].memory_bytes.is_some_and(|m| m > 0));
        }
        other => panic!("stats: {other:?}"),
    }
    let names: Vec<String> = admin.ps().iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(names, ["notes:bob"], "the proxy changed the registry");
    assert!(!sb.instance_data_dir("notes:mallory").exists());
}

#[test]
fn rpc_sockets_are_created_private_to_the_supervisors_user() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sb = Sandbox::new(NOTES);
    let _sup = sb.start();
    for socket in [sb.admin_socket(), sb.proxy_socket()] {
        let meta = std::fs::metadata(&socket).unwrap();
        assert!(meta.file_type().is_socket(), "{}", socket.display());
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", socket.display());
    }
    // No temporary bind directory is left beside them.
    let names: Vec<String> = tree_listing(&sb.runtime_dir);
    assert!(names.iter().all(|n| !n.starts_with(".bind")), "{names:?}");
}

/// Whether the supervisor has answered on `stream` (or closed it), without waiting. An
/// answer loses its first byte: call it only where an answer fails the test.
fn has_answered(stream: &mut UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let answered = match stream.read(&mut [0u8; 1]) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("read: {e}"),
    };
    stream.set_nonblocking(false).unwrap();
    answered
}

#[test]
fn connections_past_the_proxy_sockets_cap_wait_unserved_and_the_admin_socket_still_answers() {
    let sb = Sandbox::new(NOTES);
    let mut sup = sb.start();
    let mut admin = Client::admin(&sb);
    assert!(matches!(admin.add(&["notes:bob"]), Response::Added { .. }));
    drop(admin);

    let t0 = Instant::now();
    let mut held: Vec<UnixStream> = (0..PROXY_CONNECTIONS)
        .map(|_| raw_hello(&sb.proxy_socket()))
        .collect();
    // Past the cap a connection still succeeds (the kernel queues it) but is not accepted:
    // its hello waits.
    const PAST_CAP: usize = 50;
    let mut waiting: Vec<UnixStream> = (0..PAST_CAP)
        .map(|_| {
            let mut s = raw_connect(&sb.proxy_socket());
            send_frame(&mut s, &hello_frame(PROTOCOL_VERSION));
            s
        })
        .collect();

    // The admin socket has slots of its own: tenctl's calls answer as ever (within the
    // client's generous read timeout).
    let mut admin = Client::admin(&sb);
    let names: Vec<String> = admin.ps().iter().map(|i| i.instance.to_string()).collect();
    assert_eq!(names, ["notes:bob"]);
    assert_eq!(admin.status("notes:bob").instance, iid("notes:bob"));

    // No hello answer for a second, and none for any other connection past the cap. (The held
    // connections stay open for IDLE_TIMEOUT after their hello; only if setting this up took
    // longer would a slot free by itself.)
    waiting[0]
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    match waiting[0].read(&mut [0u8; 1]) {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!(
            "a connection past the cap was served ({other:?}) {:?} after the first of {PROXY_CONNECTIONS} held ones",
            t0.elapsed()
        ),
    }
    for (i, s) in waiting.iter_mut().enumerate() {
        assert!(
            !has_answered(s),
            "connection {i} past the cap was served {:?} after the first held one",
            t0.elapsed()
        );
    }

    // Closing as many held connections lets every waiting one in.
    held.truncate(PROXY_CONNECTIONS - PAST_CAP);
    for (i, s) in waiting.iter_mut().enumerate() {
        s.set_read_timeout(Some(EVENT_DEADLINE)).unwrap();
        match read_response(s) {
            Some(Response::Hello {
                role: Role::Proxy, ..
            }) => {}
            other => panic!("waiting connection {i}: hello answered with {other:?}"),
        }
    }
    still_usable(
        &mut waiting[PAST_CAP - 1],
        Role::Proxy,
        "let in after the cap",
    );
    still_usable(admin.stream(), Role::Admin, "beside a full proxy socket");

    // Said once, however many connections waited.
    let warning = format!("proxy.sock reached its cap of {PROXY_CONNECTIONS} connections");
    assert!(
        wait_until(EVENT_DEADLINE, || sb.supervisor_log().contains(&warning)),
        "no warning about the cap:\n{}",
        sb.supervisor_log()
    );
    let log = sb.supervisor_log();
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    assert!(!log.contains("admin.sock reached its cap"), "{log}");
    assert!(
        sup.is_running(),
        "the supervisor died:\n{}",
        sb.supervisor_log()
    );
}

/// Writes `frame` one byte every 250 ms until the supervisor closes the connection; sends how
/// long that took after `t0`.
fn trickle(mut stream: UnixStream, frame: Vec<u8>, t0: Instant, done: mpsc::Sender<Duration>) {
    for byte in frame {
        if stream.write_all(&[byte]).is_err() {
            let _ = done.send(t0.elapsed());
            return;
        }
        thread::sleep(Duration::from_millis(250));
    }
    panic!("the whole trickled frame was read");
}

/// Sends `list` requests and never reads an answer, until the supervisor closes the
/// connection.
fn never_read(mut stream: UnixStream, done: mpsc::Sender<()>) {
    let mut list = Vec::new();
    for _ in 0..64 {
        list.extend_from_slice(&(15u32).to_be_bytes());
        list.extend_from_slice(br#"{"type":"list"}"#);
    }
    while stream.write_all(&list).is_ok() {}
    let _ = done.send(());
}

/// One slow test (about IDLE_TIMEOUT) for everything that needs the idle deadline to pass.
#[test]
fn idle_trickling_and_non_reading_request_connections_are_closed_but_streams_stay_open() {
    let sb = Sandbox::new(NOTES);
    let _sup = sb.start();
    let mut admin = Client::admin(&sb);
    expect_woken(admin.spawn("notes:bob"));
    drop(admin);
    let (watch, _) = Watch::subscribe(&sb);
    let mut follower = Client::admin(&sb).with_timeout(EVENT_DEADLINE);
    let first = follower.call(Request::Logs {
        instance: iid("notes:bob"),
        lines: Some(1),
        follow: true,
    });
    assert!(matches!(first, Response::Logs { .. }), "{first:?}");

    // Before any of the connections exists, so before any of their idle clocks starts.
    let t0 = Instant::now();
    let mut silent = vec![raw_hello(&sb.proxy_socket()), raw_hello(&sb.admin_socket())];
    // Half a length prefix, then nothing.
    let mut half_prefix = raw_hello(&sb.proxy_socket());
    half_prefix.write_all(&[0, 0]).unwrap();
    silent.push(half_prefix);
    // A frame of 4 KiB trickled a byte at a time: it would take over 1000 s to arrive.
    let (trickled_tx, trickled) = mpsc::channel();
    let mut frame = 4096u32.to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(b' ', 4096));
    let trickler = raw_hello(&sb.proxy_socket());
    thread::spawn(move || trickle(trickler, frame, t0, trickled_tx));
    let (greedy_tx, greedy) = mpsc::channel();
    let reader_less = raw_hello(&sb.admin_socket());
    thread::spawn(move || never_read(reader_less, greedy_tx));

    for (i, s) in silent.iter_mut().enumerate() {
        s.set_read_timeout(Some(IDLE_TIMEOUT + EVENT_DEADLINE))
            .unwrap();
        expect_closed(s);
        // A lower bound only: the supervisor's clock started after t0.
        assert!(
            t0.elapsed() >= IDLE_TIMEOUT,
            "silent connection {i} closed {:?} after connecting, before the idle timeout",
            t0.elapsed()
        );
    }
    let trickled_for = trickled
        .recv_timeout(EVENT_DEADLINE)
        .expect("a connection trickling one frame is still open");
    assert!(
        trickled_for >= IDLE_TIMEOUT,
        "the trickling connection was closed after {trickled_for:?}"
    );
    greedy
        .recv_timeout(EVENT_DEADLINE)
        .expect("a connection that never reads its answers is still open");

    // The watch stream and the log stream, older than all of these, still deliver.
    let mut admin = Client::admin(&sb);
    assert!(matches!(admin.add(&["notes:late"]), Response::Added { .. }));
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the watch stream stopped delivering after {:?}",
            t0.elapsed()
        );
        if let Some(Response::Routes { routes, .. }) = watch.recv(Duration::from_millis(50)) {
            if routes.iter().any(|r| r.instance == iid("notes:late")) {
                break;
            }
        }
    }
    expect_ok(admin.stop("notes:bob"));
    let mut seen = Vec::new();
    let got_stop = wait_until(EVENT_DEADLINE, || {
        match follower.read() {
            Ok(Response::Logs { lines }) => seen.extend(lines.into_iter().map(|l| l.line)),
            other => panic!("the log stream gave {other:?} after {:?}", t0.elapsed()),
        }
        seen.iter()
            .any(|l| l.contains("stopped") || l.contains("exited"))
    });
    assert!(got_stop, "the stop never reached the log stream: {seen:?}");
}
