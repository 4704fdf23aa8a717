//! Shared harness of the supervisor's end-to-end tests: a sandbox directory with its own
//! `tenement.toml`, the real `tenement-supervisor` binary started on it, a blocking RPC client,
//! and small probes of processes, ports and HTTP.
//!
//! Every sandbox gets its own directories and its own block of instance ports, so tests run in
//! parallel. Nothing a test starts may outlive it: dropping a [`Supervisor`] SIGKILLs it, and
//! dropping the [`Sandbox`] SIGKILLs every process whose environment mentions the sandbox
//! (exec helpers carry it in their spawn spec, apps in `TENEMENT_DATA_DIR`), including
//! daemons that escaped their process group.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tenement_proto::frame::{self, FrameError};
use tenement_proto::rpc::{
    Address, ErrorCode, InstanceInfo, InstanceState, LogLine, LogStream, Request, Response,
    Route, PROTOCOL_VERSION,
};
use tenement_proto::InstanceId;

/// How long the supervisor may take to accept on its admin socket after a start.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// The read timeout of RPC clients: longer than any wake a test makes.
const RPC_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Instance ports: blocks of this many ports between these bounds (below the kernel's default
/// ephemeral range, 32768-60999, which the config refuses to overlap).
const PORT_BLOCK: u32 = 200;
const PORT_FIRST: u32 = 20000;
const PORT_LAST: u32 = 32000;

static NEXT_SANDBOX: AtomicU32 = AtomicU32::new(0);

/// The `tenement-supervisor` binary under test.
pub fn supervisor_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tenement-supervisor"))
}

/// The `tiny-http` fixture, built next to the supervisor by `cargo build -p tenement-fixtures`.
pub fn tiny_http() -> PathBuf {
    let path = supervisor_binary()
        .parent()
        .expect("the supervisor binary has a directory")
        .join("tiny-http");
    if !path.is_file() {
        panic!(
            "build the fixtures first: cargo build -p tenement-fixtures (no {})",
            path.display()
        );
    }
    path
}

fn repo_dir(relative: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `tests/fixtures/py`.
pub fn fixtures_dir() -> PathBuf {
    repo_dir("tests/fixtures/py")
}

/// `examples/notes`.
pub fn notes_dir() -> PathBuf {
    repo_dir("examples/notes")
}

/// A port block no other sandbox of this test process uses, and probably none of another
/// test process running at the same time (the block depends on the pid too).
fn port_block() -> (u16, u16) {
    let blocks = (PORT_LAST - PORT_FIRST) / PORT_BLOCK;
    let n = NEXT_SANDBOX.fetch_add(1, Ordering::SeqCst);
    let block = (std::process::id().wrapping_mul(7).wrapping_add(n)) % blocks;
    let lo = PORT_FIRST + block * PORT_BLOCK;
    (lo as u16, (lo + PORT_BLOCK - 1) as u16)
}

/// A directory with a config, state, data and sockets of one supervisor.
pub struct Sandbox {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub log_path: PathBuf,
    pub ports: (u16, u16),
}

impl Sandbox {
    /// Writes `tenement.toml`: a `[settings]` block of the sandbox's own, then `body` with
    /// `@TINY@`, `@FIXTURES@` and `@NOTES@` replaced by the fixture paths.
    pub fn new(body: &str) -> Sandbox {
        // Unix socket paths must stay under 108 bytes: keep the root short.
        let tmp = std::env::temp_dir();
        let base = if tmp.as_os_str().len() > 40 {
            PathBuf::from("/tmp")
        } else {
            tmp
        };
        let dir = tempfile::Builder::new()
            .prefix("tnm")
            .tempdir_in(base)
            .expect("create a sandbox directory");
        let root = dir.path().to_path_buf();
        let ports = port_block();
        let mut body = body.to_owned();
        if body.contains("@TINY@") {
            body = body.replace("@TINY@", &tiny_http().to_string_lossy());
        }
        body = body
            .replace("@FIXTURES@", &fixtures_dir().to_string_lossy())
            .replace("@NOTES@", &notes_dir().to_string_lossy());
        let sandbox = Sandbox {
            config_path: root.join("tenement.toml"),
            data_dir: root.join("data"),
            state_dir: root.join("state"),
            runtime_dir: root.join("run"),
            log_path: root.join("supervisor.log"),
            root,
            ports,
            dir,
        };
        let text = format!(
            "[settings]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\ndata_dir = \"{}\"\nport_range = \"{}-{}\"\n\n{body}\n",
            sandbox.runtime_dir.display(),
            sandbox.state_dir.display(),
            sandbox.data_dir.display(),
            ports.0,
            ports.1,
        );
        fs::write(&sandbox.config_path, text).expect("write tenement.toml");
        sandbox
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    pub fn proxy_socket(&self) -> PathBuf {
        self.runtime_dir.join("proxy.sock")
    }

    pub fn registry_file(&self) -> PathBuf {
        self.state_dir.join("registry.json")
    }

    /// `data_dir/SERVICE/ID` of `instance` (`"web:alice"`).
    pub fn instance_data_dir(&self, instance: &str) -> PathBuf {
        let id = iid(instance);
        self.data_dir.join(id.service.as_str()).join(id.id.as_str())
    }

    /// Starts the supervisor and waits until its admin socket accepts.
    pub fn start(&self) -> Supervisor {
        self.start_with_env(&[])
    }

    /// [`Sandbox::start`] with extra variables in the supervisor's own environment.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Supervisor {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the supervisor log");
        let mut command = Command::new(supervisor_binary());
        command
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("TENEMENT_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start tenement-supervisor");
        let mut supervisor = Supervisor {
            child: Some(child),
            log_path: self.log_path.clone(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if UnixStream::connect(self.admin_socket()).is_ok() {
                return supervisor;
            }
            if let Some(status) = supervisor.try_wait() {
                panic!(
                    "tenement-supervisor exited during start ({status}):\n{}",
                    self.supervisor_log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "tenement-supervisor did not accept on {} within {START_DEADLINE:?}:\n{}",
                    self.admin_socket().display(),
                    self.supervisor_log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the supervisor(s) of this sandbox wrote to stderr.
    pub fn supervisor_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Pids of live processes whose initial environment mentions this sandbox's root.
    pub fn leftover_processes(&self) -> Vec<i32> {
        processes_mentioning(&format!("{}/", self.root.display()))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A failed test must not leak apps: kill everything started for this sandbox, again
        // until nothing is left (a dying parent may fork once more).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.leftover_processes();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = &self.dir;
    }
}

/// Pids of live (non-zombie) processes whose `/proc/PID/environ` contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && pid_alive(pid))
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.windows(needle.len())
                        .any(|w| w == needle.as_bytes())
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The running `tenement-supervisor`; SIGKILLed when dropped.
pub struct Supervisor {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Supervisor {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("supervisor not yet stopped").id() as i32
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("waitpid")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGKILL, as a crash or the OOM killer would; returns once it is reaped.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit (which stops every instance first).
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("waitpid") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tenement-supervisor did not exit within 20 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let log = fs::read_to_string(&self.log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("---- supervisor log (last lines) ----\n{}", tail.join("\n"));
        }
    }
}

/// Parses `"service:id"`.
pub fn iid(text: &str) -> InstanceId {
    InstanceId::parse(text).unwrap_or_else(|e| panic!("bad instance id in a test: {e}"))
}

/// A blocking RPC client that has said hello.
pub struct Client {
    stream: UnixStream,
    pub role: tenement_proto::rpc::Role,
}

impl Client {
    pub fn admin(sandbox: &Sandbox) -> Client {
        Client::connect(&sandbox.admin_socket())
    }

    pub fn proxy(sandbox: &Sandbox) -> Client {
        Client::connect(&sandbox.proxy_socket())
    }

    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(RPC_READ_TIMEOUT))
            .expect("set a read timeout");
        let mut client = Client {
            stream,
            role: tenement_proto::rpc::Role::Admin,
        };
        match client.call(Request::Hello {
            version: PROTOCOL_VERSION,
            client: "supervisor-e2e".to_owned(),
        }) {
            Response::Hello { role, .. } => client.role = role,
            other => panic!("hello was answered with {other:?}"),
        }
        client
    }

    /// Sends one request and reads one response.
    pub fn call(&mut self, request: Request) -> Response {
        let name = request.name();
        frame::write_message(&mut self.stream, &request)
            .unwrap_or_else(|e| panic!("send {name}: {e}"));
        self.read()
            .unwrap_or_else(|e| panic!("no answer to {name}: {e}"))
    }

    /// Reads one response.
    pub fn read(&mut self) -> Result<Response, FrameError> {
        frame::read_message(&mut self.stream)
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    pub fn wake(&mut self, instance: &str) -> Response {
        self.call(Request::Wake {
            instance: iid(instance),
            timeout_ms: None,
        })
    }

    pub fn spawn(&mut self, instance: &str) -> Response {
        self.call(Request::Spawn {
            instance: iid(instance),
        })
    }

    pub fn stop(&mut self, instance: &str) -> Response {
        self.call(Request::Stop {
            instance: iid(instance),
        })
    }

    pub fn restart(&mut self, instance: &str) -> Response {
        self.call(Request::Restart {
            instance: iid(instance),
        })
    }

    pub fn remove(&mut self, instance: &str, purge: bool) -> Response {
        self.call(Request::Remove {
            instance: iid(instance),
            purge,
        })
    }

    pub fn add(&mut self, instances: &[&str]) -> Response {
        self.call(Request::Add {
            instances: instances.iter().map(|i| iid(i)).collect(),
        })
    }

    pub fn ps(&mut self) -> Vec<InstanceInfo> {
        match self.call(Request::List) {
            Response::Instances { instances } => instances,
            other => panic!("list was answered with {other:?}"),
        }
    }

    pub fn try_status(&mut self, instance: &str) -> Response {
        self.call(Request::Status {
            instance: iid(instance),
        })
    }

    pub fn status(&mut self, instance: &str) -> InstanceInfo {
        match self.try_status(instance) {
            Response::Status { status } => status,
            other => panic!("status {instance} was answered with {other:?}"),
        }
    }

    pub fn state(&mut self, instance: &str) -> InstanceState {
        self.status(instance).state
    }

    pub fn logs(&mut self, instance: &str) -> Vec<LogLine> {
        match self.call(Request::Logs {
            instance: iid(instance),
            lines: None,
            follow: false,
        }) {
            Response::Logs { lines } => lines,
            other => panic!("logs {instance} was answered with {other:?}"),
        }
    }

    /// The supervisor's own lifecycle lines about `instance`.
    pub fn events(&mut self, instance: &str) -> Vec<String> {
        self.logs(instance)
            .into_iter()
            .filter(|l| l.stream == LogStream::Event)
            .map(|l| l.line)
            .collect()
    }
}

/// The route of a successful wake/spawn/restart, and whether it started a process.
pub fn expect_woken(response: Response) -> (Route, bool) {
    match response {
        Response::Woken { route, started, .. } => (route, started),
        other => panic!("expected woken, got {other:?}"),
    }
}

pub fn expect_ok(response: Response) {
    assert_eq!(response, Response::Ok, "expected ok");
}

/// The message of an error response with `code`.
pub fn expect_error(response: Response, code: ErrorCode) -> String {
    match response {
        Response::Error { code: got, message } if got == code => message,
        other => panic!("expected error {}, got {other:?}", code.as_str()),
    }
}

/// The loopback TCP address of a route.
pub fn tcp_addr(route: &Route) -> SocketAddr {
    match &route.address {
        Address::Tcp(addr) => *addr,
        other => panic!("expected a TCP address, got {other}"),
    }
}

/// `127.0.0.1:PORT` as shown in `InstanceInfo::address`.
pub fn info_port(info: &InstanceInfo) -> u16 {
    let addr: SocketAddr = info
        .address
        .parse()
        .unwrap_or_else(|e| panic!("address {:?} of {}: {e}", info.address, info.instance));
    addr.port()
}

// ---- raw frames, for tests of what the supervisor refuses ----

/// A connection that has said nothing yet.
pub fn raw_connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    stream
}

/// Writes `body` with its 4-byte big-endian length prefix.
pub fn send_frame(stream: &mut UnixStream, body: &[u8]) {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("write a frame");
}

/// The next response, `None` when the supervisor closed the connection.
pub fn read_response(stream: &mut UnixStream) -> Option<Response> {
    match frame::read_message::<_, Response>(stream) {
        Ok(response) => Some(response),
        Err(FrameError::Closed) => None,
        Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("reading a response: {e}"),
    }
}

/// Reads until the supervisor closes the connection; panics if it does not within the read
/// timeout.
pub fn expect_closed(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the supervisor kept the connection open: {e}"),
        }
    }
}

pub fn hello_frame(version: u32) -> Vec<u8> {
    serde_json::to_vec(&Request::Hello {
        version,
        client: "raw".to_owned(),
    })
    .expect("encode hello")
}

// ---- the proxy's watch stream ----

/// A `subscribe`d proxy connection: responses are read by a thread into a channel.
pub struct Watch {
    writer: UnixStream,
    rx: mpsc::Receiver<Response>,
}

impl Watch {
    /// Subscribes on the proxy socket; returns with the initial snapshot read.
    pub fn subscribe(sandbox: &Sandbox) -> (Watch, Vec<Route>) {
        let mut client = Client::proxy(sandbox);
        frame::write_message(client.stream(), &Request::Subscribe).expect("send subscribe");
        let mut reader = client.stream().try_clone().expect("dup the stream");
        reader.set_read_timeout(None).expect("no read timeout");
        let writer = client.stream().try_clone().expect("dup the stream");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            while let Ok(response) = frame::read_message::<_, Response>(&mut reader) {
                if tx.send(response).is_err() {
                    return;
                }
            }
        });
        let watch = Watch { writer, rx };
        let mut routes = Vec::new();
        loop {
            match watch.recv(Duration::from_secs(10)) {
                Some(Response::Routes {
                    routes: chunk,
                    complete,
                    ..
                }) => {
                    routes.extend(chunk);
                    if complete {
                        break;
                    }
                }
                other => panic!("expected the route snapshot, got {other:?}"),
            }
        }
        (watch, routes)
    }

    pub fn send(&mut self, request: &Request) {
        frame::write_message(&mut self.writer, request).expect("write on the watch stream");
    }

    /// The next message within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Response> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}

// ---- processes, ports, HTTP ----

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Every live descendant of `pid` (children, grandchildren, ...).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut table: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                table.push((p, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(parent) = stack.pop() {
        for &(p, pp) in &table {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                stack.push(p);
            }
        }
    }
    found
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether `127.0.0.1:port` can be bound now.
pub fn port_bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// Polls `condition` every 10 ms until it holds (true) or `within` passed (false).
pub fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn http_exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<(u16, String)> {
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("incomplete response {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad head {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// `GET path` over TCP; the status and the body.
pub fn try_http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http_exchange(&mut stream, "GET", path, "")
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `POST path` with a text body over TCP; the status and the body.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let result = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        http_exchange(&mut s, "POST", path, body)
    });
    result.unwrap_or_else(|e| panic!("POST http://{addr}{path}: {e}"))
}

/// `GET path` over a Unix stream socket.
pub fn http_get_unix(socket: &Path, path: &str) -> (u16, String) {
    let result = UnixStream::connect(socket).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        http_exchange(&mut stream, "GET", path, "")
    });
    result.unwrap_or_else(|e| panic!("GET unix:{}{path}: {e}", socket.display()))
}

/// The pid of the process serving `addr` (tiny-http and the Python fixtures answer `/pid`).
pub fn served_pid(addr: SocketAddr) -> i32 {
    let (status, body) = http_get(addr, "/pid");
    assert_eq!(status, 200, "GET /pid: {body}");
    body.trim().parse().expect("a pid")
}

/// Every file and directory under `dir`, relative, sorted (empty if it does not exist).
pub fn tree_listing(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Reads a whole file that another process writes, waiting until it is non-empty.
pub fn read_when_written(path: &Path, within: Duration) -> String {
    let mut text = String::new();
    let found = wait_until(within, || {
        text = File::open(path)
            .and_then(|mut f| {
                let mut s = String::new();
                f.read_to_string(&mut s)?;
                Ok(s)
            })
            .unwrap_or_default();
        text.ends_with('\n')
    });
    assert!(found, "{} was not written within {within:?}", path.display());
    text
}
