//! The proxy as a front door facing strangers: slow and oversized request heads, no
//! privilege, and a clean SIGTERM.

use std::io::Write;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

const WEB: &str = r#"
[service.web]
command = "@TINY@"

[instances]
web = ["alice"]
"#;

/// The proxy's `HEADER_READ_TIMEOUT` (15 s) plus a generous margin for a loaded machine: a
/// deadline for "never cut", not a measure of the timeout.
const CUT_WITHIN: Duration = Duration::from_secs(15 + 30);
/// The proxy's default `--shutdown-grace`: how long it waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long `/slow` takes: long enough that the request is surely still in flight when the
/// test has seen it counted, even on a loaded machine, and shorter than [`SHUTDOWN_GRACE`].
const SLOW_MS: u64 = 5000;

/// Writes `tail` one byte a second after `head`, until the proxy closes the connection; how
/// long that took, or `None` if it did not within [`CUT_WITHIN`].
fn trickle_until_closed(sandbox: &Sandbox, head: &[u8], tail: &[u8]) -> Option<Duration> {
    let mut stream = connect(sandbox.proxy_addr).expect("connect");
    let started = Instant::now();
    if !head.is_empty() {
        stream.write_all(head).expect("send the start of a head");
    }
    let mut tail = tail.iter().cycle();
    while started.elapsed() < CUT_WITHIN {
        if let Some(byte) = tail.next() {
            if stream.write_all(&[*byte]).is_err() {
                return Some(started.elapsed());
            }
        }
        if closed_within(&mut stream, Duration::from_secs(1)) {
            return Some(started.elapsed());
        }
    }
    None
}

#[test]
fn slowloris_client_is_cut() {
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, _proxy) = sandbox.start();
    let cut = trickle_until_closed(
        &sandbox,
        b"GET / HTTP/1.1\r\nHost: alice.web.localhost\r\nX-Slow: ",
        b"a",
    );
    let cut = cut
        .unwrap_or_else(|| panic!("a trickling client was still connected after {CUT_WITHIN:?}"));
    eprintln!("a trickled head was cut after {cut:?}");
}

#[test]
fn silent_client_is_cut() {
    // A client that connects and never sends a byte, or trickles a prefix of the HTTP/2
    // preface: the connection must not be held forever (file descriptors are finite).
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, _proxy) = sandbox.start();
    let preface = {
        let sandbox = &sandbox;
        thread::scope(|scope| {
            let preface = scope.spawn(move || {
                trickle_until_closed(sandbox, b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r")
            });
            let silent = trickle_until_closed(sandbox, b"", b"");
            (silent, preface.join().expect("preface client"))
        })
    };
    let (silent, preface) = preface;
    assert!(
        silent.is_some() && preface.is_some(),
        "still connected after {CUT_WITHIN:?}: silent client {}, HTTP/2 preface trickle {}",
        if silent.is_some() { "cut" } else { "NOT cut" },
        if preface.is_some() { "cut" } else { "NOT cut" },
    );
}

#[test]
fn oversized_headers_get_431() {
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, _proxy) = sandbox.start();
    let big = "a".repeat(100 * 1024);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: alice.web.localhost\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    let reply = exchange(sandbox.proxy_addr, request.as_bytes()).expect("an answer");
    assert_eq!(reply.status(), 431, "{}", reply.text());
    assert_eq!(
        sandbox.admin().state("web:alice"),
        tenement_proto::rpc::InstanceState::Stopped,
        "the instance was woken for a refused request"
    );
}

#[test]
fn proxy_refuses_root_without_user() {
    assert!(
        is_root(),
        "this test needs root (CI runs the suite as root): it checks what the proxy does when started as root"
    );
    let sandbox = Sandbox::new(WEB);
    let mut command = Command::new(proxy_binary());
    command
        .arg("--config")
        .arg(&sandbox.config_path)
        .env_remove("TENEMENT_CONFIG")
        .env("TENEMENT_TEST_SANDBOX", &sandbox.root);
    let (status, output) = run_to_exit(
        command,
        &sandbox.root.join("root-proxy.out"),
        Duration::from_secs(10),
    );
    assert!(!status.success(), "exited with {status}: {output}");
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {output:?}");
    assert!(lines[0].contains("refusing to run as root"), "{output:?}");
}

#[test]
fn proxy_with_user_holds_no_capability() {
    assert!(
        is_root(),
        "this test needs root (CI runs the suite as root): it checks the drop to --user"
    );
    let sandbox = Sandbox::new(WEB);
    let (_supervisor, proxy) = sandbox.start();
    // It works after the drop: it reaches the supervisor and an instance.
    assert_eq!(
        get_ok(sandbox.proxy_addr, "alice.web.localhost", "/"),
        "hello from web:alice"
    );
    let pid = proxy.pid();
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            proc_status_field(pid, set),
            "0000000000000000",
            "{set} of the proxy"
        );
    }
    let nobody = nix::unistd::User::from_name(PROXY_USER)
        .expect("getpwnam")
        .expect("the user nobody exists");
    let uid = nobody.uid.to_string();
    let gid = nobody.gid.to_string();
    let uids: Vec<String> = proc_status_field(pid, "Uid")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        uids,
        [uid.clone(), uid.clone(), uid.clone(), uid],
        "real, effective, saved, fs uid"
    );
    let gids: Vec<String> = proc_status_field(pid, "Gid")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        gids,
        [gid.clone(), gid.clone(), gid.clone(), gid.clone()],
        "real, effective, saved, fs gid"
    );
    assert_eq!(
        proc_status_field(pid, "Groups"),
        gid,
        "supplementary groups"
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let sandbox = Sandbox::new(
        r#"
[service.mirror]
command = "python3 @FIXTURES@/mirror.py"

[instances]
mirror = ["a"]
"#,
    );
    let (_supervisor, proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    get_ok(addr, "a.mirror.localhost", "/health");
    let slow =
        thread::spawn(move || try_get(addr, "a.mirror.localhost", &format!("/slow?ms={SLOW_MS}")));
    let mut admin = sandbox.admin();
    let in_flight = wait_until(EVENT_DEADLINE, || admin.status("mirror:a").in_flight >= 1);
    assert!(in_flight, "the slow request never showed as in flight");
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let reply = slow
        .join()
        .expect("client thread")
        .expect("the in-flight request got an answer");
    assert_eq!(reply.status(), 200, "{}", reply.text());
    assert_eq!(reply.text().trim(), "slow");
    let status = proxy.wait_exit(SHUTDOWN_GRACE + EVENT_DEADLINE);
    assert!(status.success(), "the proxy exited with {status}");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the proxy's port still accepts"
    );
}

/// A stopping proxy keeps what it has: an open WebSocket goes on working for the grace period,
/// and instances with traffic still in flight here are not stopped as idle under it (the
/// supervisor hears from this proxy until its last connection has ended).
#[test]
fn sigterm_keeps_websockets_and_in_flight_instances_until_they_end() {
    let sandbox = Sandbox::new(
        r#"
[service.mirror]
command = "python3 @FIXTURES@/mirror.py"
idle_timeout = "1s"

[instances]
mirror = ["a", "b"]
"#,
    );
    let _supervisor = sandbox.start_supervisor();
    // A grace period no loaded machine runs out of: what is measured is that the proxy waits,
    // not how long.
    let mut command = sandbox.proxy_command();
    command.args(["--shutdown-grace", "120"]);
    let proxy = sandbox.start_proxy_with(command);
    let addr = sandbox.proxy_addr;
    get_ok(addr, "b.mirror.localhost", "/health");
    let slow =
        thread::spawn(move || try_get(addr, "b.mirror.localhost", &format!("/slow?ms={SLOW_MS}")));

    let (mut socket, mut reader, head) =
        open_websocket(addr, "a.mirror.localhost").expect("the handshake");
    assert_eq!(head.status, 101, "{head:?}");

    let mut admin = sandbox.admin();
    let in_flight = wait_until(EVENT_DEADLINE, || admin.status("mirror:b").in_flight >= 1);
    assert!(in_flight, "the slow request never showed as in flight");
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let stopping = Instant::now();

    // Several idle timeouts after the signal, the upgraded connection still carries bytes and
    // neither instance has been stopped.
    let mut round = 0;
    while stopping.elapsed() < Duration::from_secs(3) {
        let message = format!("ping {round}\n");
        socket
            .write_all(message.as_bytes())
            .expect("write after SIGTERM");
        let mut echo = vec![0u8; message.len()];
        std::io::Read::read_exact(&mut reader, &mut echo).expect("the echo after SIGTERM");
        assert_eq!(String::from_utf8_lossy(&echo), message);
        for id in ["mirror:a", "mirror:b"] {
            assert_eq!(
                admin.state(id),
                tenement_proto::rpc::InstanceState::Running,
                "{id} stopped {:?} after the proxy's SIGTERM with traffic in flight",
                stopping.elapsed()
            );
        }
        round += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let reply = slow
        .join()
        .expect("client thread")
        .expect("the in-flight request got an answer");
    assert_eq!(reply.status(), 200, "{}", reply.text());
    assert_eq!(reply.text().trim(), "slow");
    assert!(
        pid_alive(proxy.pid()),
        "the proxy exited with a WebSocket still open"
    );

    socket.shutdown(std::net::Shutdown::Both).expect("close");
    drop(reader);
    drop(socket);
    let status = proxy.wait_exit(EVENT_DEADLINE);
    assert!(status.success(), "the proxy exited with {status}");
    // With the proxy gone, the idle clock runs again.
    let stopped = wait_until(Duration::from_secs(30), || {
        admin.state("mirror:a") == tenement_proto::rpc::InstanceState::Stopped
    });
    assert!(stopped, "mirror:a never stopped once the proxy had gone");
}

/// The names of a process's threads (`comm` of each task).
fn thread_names(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the proxy's tasks")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn workers_serve_clients_side_by_side_and_a_bad_count_is_refused() {
    let sandbox = Sandbox::new(WEB);
    let _supervisor = sandbox.start_supervisor();
    let mut command = sandbox.proxy_command();
    command.args(["--workers", "3"]);
    let proxy = sandbox.start_proxy_with(command);
    // The listening socket accepts connections (the kernel completes them) before every
    // worker thread has run far enough to be named: wait for the names.
    let workers = || -> Vec<String> {
        thread_names(proxy.pid())
            .into_iter()
            .filter(|name| name.starts_with("worker-"))
            .collect()
    };
    let named = wait_until(Duration::from_secs(10), || {
        workers() == ["worker-0", "worker-1", "worker-2"]
    });
    assert!(named, "the proxy's worker threads: {:?}", workers());

    // Many keep-alive clients at once, each on whichever worker accepted it, sharing one
    // instance's upstream connections: every request answered.
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let addr = sandbox.proxy_addr;
            thread::spawn(move || {
                let stream = connect(addr).expect("connect");
                for _ in 0..20 {
                    (&stream)
                        .write_all(b"GET / HTTP/1.1\r\nHost: alice.web.localhost\r\n\r\n")
                        .expect("send");
                    let reply = read_reply(&stream).expect("reply");
                    assert_eq!(reply.status(), 200);
                    assert_eq!(reply.text().trim_end(), "hello from web:alice");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }

    // A count out of range is refused before anything starts.
    for bad in ["0", "1025", "many"] {
        let output = Command::new(proxy_binary())
            .args(["--workers", bad, "--listen", "127.0.0.1:1"])
            .output()
            .expect("run tenement-proxy");
        assert_eq!(output.status.code(), Some(2), "--workers {bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--workers"),
            "--workers {bad}: the error names the flag: {stderr}"
        );
    }
}
