//! The exec server's protocol, spoken directly: a helper forks its app only after the go-ahead,
//! one whose go-ahead never comes exits without starting anything, and bad requests get a
//! one-line answer instead of a helper.
#![allow(clippy::unwrap_used)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tenement_supervisor::exec_helper::{SpawnReply, SpawnSpec, SERVE_ARG};

fn exec_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tenement-exec"))
}

/// A running `tenement-exec --serve` with our end of its socket.
struct Server {
    socket: OwnedFd,
    process: std::process::Child,
}

impl Server {
    fn start() -> Server {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let fd = theirs.as_raw_fd();
        let mut command = Command::new(exec_binary());
        command
            .arg(SERVE_ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .stdin(Stdio::null());
        tenement_supervisor::sys::pass_fd(&mut command, fd);
        let process = command.spawn().unwrap();
        Server {
            socket: ours,
            process,
        }
    }

    fn ask(&self, request: &[u8], fds: &[RawFd]) -> SpawnReply {
        sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(request)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut answer = [0u8; 4096];
        let n = recv(self.socket.as_raw_fd(), &mut answer, MsgFlags::empty()).unwrap();
        serde_json::from_slice(&answer[..n]).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A spec that runs `sh -c script` in `dir`.
fn spec(dir: &Path, script: &str) -> SpawnSpec {
    SpawnSpec {
        program: PathBuf::from("/bin/sh"),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        workdir: dir.to_path_buf(),
        listen_fd: false,
        stop_grace_ms: 1000,
        supervisor_pid: std::process::id(),
        cgroup: None,
        isolation: Default::default(),
    }
}

/// stdin, stdout, stderr for a helper, and a go-ahead pipe (read end, write end).
fn descriptors() -> (Vec<OwnedFd>, OwnedFd, OwnedFd) {
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let out: OwnedFd = std::fs::File::create("/dev/null").unwrap().into();
    let err: OwnedFd = std::fs::File::create("/dev/null").unwrap().into();
    let (go, go_ahead) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (vec![null, out, err], go, go_ahead)
}

fn raw(fds: &[&OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(|fd| fd.as_raw_fd()).collect()
}

/// Waits for our child `pid` (the helper is ours: CLONE_PARENT) and returns its exit code.
fn exit_code(pid: i32) -> i32 {
    match waitpid(Pid::from_raw(pid), None).unwrap() {
        WaitStatus::Exited(_, code) => code,
        other => panic!("helper ended with {other:?}"),
    }
}

fn wait_for(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A server, and a helper it started whose app would create `ran` in the returned directory;
/// the helper's pid and the write end of its go-ahead pipe.
fn helper_that_touches_a_marker() -> (tempfile::TempDir, Server, i32, OwnedFd) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (stdio, go, go_ahead) = descriptors();
    let request = serde_json::to_vec(&spec(dir.path(), "touch ran")).unwrap();
    let fds = raw(&[&stdio[0], &stdio[1], &stdio[2], &go]);
    let pid = match server.ask(&request, &fds) {
        SpawnReply::Started { pid } => pid,
        other => panic!("expected a helper, got {other:?}"),
    };
    (dir, server, pid, go_ahead)
}

#[test]
fn the_app_starts_after_the_go_ahead_and_the_helper_is_our_child() {
    let (dir, _server, pid, go_ahead) = helper_that_touches_a_marker();
    let marker = dir.path().join("ran");
    // Not before the go-ahead.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!marker.exists(), "the app ran before the go-ahead");
    nix::unistd::write(&go_ahead, &[1]).unwrap();
    assert!(wait_for(&marker), "the app did not run after the go-ahead");
    // The helper exits with the app's status, and it is ours to reap.
    assert_eq!(exit_code(pid), 0);
}

#[test]
fn a_helper_without_go_ahead_exits_and_starts_nothing() {
    let (dir, _server, pid, go_ahead) = helper_that_touches_a_marker();
    let marker = dir.path().join("ran");
    // The supervisor lost the answer (or gave up on it): the write end closes unwritten.
    drop(go_ahead);
    assert_eq!(exit_code(pid), 127);
    assert!(!marker.exists(), "an app ran without the go-ahead");
}

#[test]
fn bad_requests_are_answered_and_start_no_helper() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (stdio, go, _go_ahead) = descriptors();
    let four = raw(&[&stdio[0], &stdio[1], &stdio[2], &go]);
    match server.ask(b"{not json", &four) {
        SpawnReply::Failed { error } => assert!(error.starts_with("bad spawn spec"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let request = serde_json::to_vec(&spec(dir.path(), "true")).unwrap();
    match server.ask(&request, &four[..2]) {
        SpawnReply::Failed { error } => {
            assert_eq!(error, "2 descriptors came with the spec, 4 expected")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // The server is still there for a good request.
    let (stdio, go, go_ahead) = descriptors();
    let fds = raw(&[&stdio[0], &stdio[1], &stdio[2], &go]);
    let pid = match server.ask(&request, &fds) {
        SpawnReply::Started { pid } => pid,
        other => panic!("expected a helper, got {other:?}"),
    };
    nix::unistd::write(&go_ahead, &[1]).unwrap();
    assert_eq!(exit_code(pid), 0);
}

#[test]
fn the_server_without_its_arguments_says_how_it_is_started() {
    let out = Command::new(exec_binary()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is started by tenement-supervisor only"),
        "{stderr}"
    );
}
