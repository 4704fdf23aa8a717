//! Harness of the proxy's end-to-end tests: a sandbox directory with its own `tenement.toml`,
//! the real `tenement-supervisor` and `tenement-proxy` binaries started on it, a blocking admin
//! RPC client, a raw HTTP client, and probes of processes.
//!
//! Modelled on `supervisor/tests/support` (which another crate's tests cannot import). Every
//! sandbox gets its own directories, its own block of instance ports and its own proxy port,
//! so tests run in parallel. Nothing a test starts may outlive it: dropping a [`Daemon`]
//! SIGKILLs it, and dropping the [`Sandbox`] SIGKILLs every process whose environment mentions
//! the sandbox (the daemons carry `TENEMENT_TEST_SANDBOX`, apps `TENEMENT_DATA_DIR`).
//!
//! Run as root (CI does), the proxy is started with `--user nobody` and the config names
//! `proxy_user = "nobody"`, so the supervisor gives `proxy.sock` to nobody's group; the
//! sandbox directory is 0755 so nobody can reach the sockets in it.
#![allow(dead_code, clippy::unwrap_used)]

mod h2;
mod http;
mod rpc;

pub use h2::*;
pub use http::*;
pub use rpc::*;

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a test waits for something that must happen (a state change, a process exit, a
/// route update): generous, because on a shared 2-core machine under load "promptly" can take
/// seconds. The deadline only bounds a hang; it proves nothing about speed.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(20);
/// How long a daemon may take to accept after a start.
const START_DEADLINE: Duration = EVENT_DEADLINE;
/// Of a claimed block of ports (`tenement_fixtures::claim`, shared with every suite and held
/// across processes), the first `INSTANCE_PORTS` are the instances' `port_range`, the rest
/// candidates for the proxy's `listen`.
const INSTANCE_PORTS: u16 = 180;
/// The user the proxy drops to when the tests run as root.
pub const PROXY_USER: &str = "nobody";

/// Whether the tests run as root (then the proxy needs `--user`).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The directory of the binaries under test (`target/debug` or `target/release`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tenement-proxy"))
        .parent()
        .expect("the proxy binary has a directory")
        .to_path_buf()
}

fn sibling_binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    if !path.is_file() {
        panic!(
            "build the workspace first: cargo build --workspace (no {})",
            path.display()
        );
    }
    path
}

pub fn proxy_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tenement-proxy"))
}

pub fn tenctl_binary() -> PathBuf {
    sibling_binary("tenctl")
}

pub fn supervisor_binary() -> PathBuf {
    sibling_binary("tenement-supervisor")
}

/// The `tiny-http` fixture (crate `tenement-fixtures`).
pub fn tiny_http() -> PathBuf {
    sibling_binary("tiny-http")
}

fn repo_dir(relative: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
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

/// A directory with a config, state, data and sockets of one supervisor and one proxy.
pub struct Sandbox {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    /// Where the proxy listens (`127.0.0.1:PORT`).
    pub proxy_addr: SocketAddr,
    pub ports: (u16, u16),
    /// Held while the sandbox lives: no other test process gets these ports.
    _port_claim: tenement_fixtures::claim::PortBlock,
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
            .prefix("tpx")
            .tempdir_in(base)
            .expect("create a sandbox directory");
        // tempfile makes it 0700; the proxy (nobody) must traverse it to reach proxy.sock.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod the sandbox");
        let root = dir.path().to_path_buf();
        let port_claim = tenement_fixtures::claim::ports();
        let lo = port_claim.lo;
        let ports = (lo, lo + INSTANCE_PORTS - 1);
        let listen_port = (lo + INSTANCE_PORTS..=port_claim.hi)
            .find(|&p| port_bindable(p))
            .expect("a free proxy port in the block");
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
            proxy_addr: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            root,
            ports,
            _port_claim: port_claim,
            dir,
        };
        let proxy_user = if is_root() {
            format!("proxy_user = \"{PROXY_USER}\"\n")
        } else {
            String::new()
        };
        let text = format!(
            "[settings]\ndomain = \"localhost\"\nlisten = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\ndata_dir = \"{}\"\nport_range = \"{}-{}\"\nisolation = \"process\"\nuser = \"self\"\n{proxy_user}\n{body}\n",
            sandbox.proxy_addr,
            sandbox.runtime_dir.display(),
            sandbox.state_dir.display(),
            sandbox.data_dir.display(),
            ports.0,
            ports.1,
        );
        fs::write(&sandbox.config_path, text).expect("write tenement.toml");
        sandbox
    }

    /// Another port of the sandbox's block that can be bound now (for a second listener).
    pub fn spare_port(&self) -> u16 {
        self.spare_ports(1)[0]
    }

    /// `n` distinct ports of the sandbox's block that can be bound now (for other servers).
    pub fn spare_ports(&self, n: usize) -> Vec<u16> {
        let ports: Vec<u16> = (self.proxy_addr.port() + 1..=self._port_claim.hi)
            .filter(|&p| port_bindable(p))
            .take(n)
            .collect();
        assert_eq!(ports.len(), n, "{n} spare ports in the block");
        ports
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    pub fn proxy_socket(&self) -> PathBuf {
        self.runtime_dir.join("proxy.sock")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.log"))
    }

    /// Everything the supervisor(s) of this sandbox wrote.
    pub fn supervisor_log(&self) -> String {
        fs::read_to_string(self.log_path("supervisor")).unwrap_or_default()
    }

    /// Everything the proxy (or proxies) of this sandbox wrote.
    pub fn proxy_log(&self) -> String {
        fs::read_to_string(self.log_path("proxy")).unwrap_or_default()
    }

    fn spawn_daemon(&self, name: &'static str, mut command: Command) -> Daemon {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("open a daemon log");
        // A test may ask for more (debug) logging by setting RUST_LOG itself.
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        command
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("TENEMENT_CONFIG")
            .env("TENEMENT_TEST_SANDBOX", &self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name,
            child: Some(child),
            log_path: self.log_path(name),
        }
    }

    /// Starts the supervisor and waits until both its sockets accept.
    pub fn start_supervisor(&self) -> Daemon {
        let mut supervisor = self.spawn_daemon("supervisor", Command::new(supervisor_binary()));
        let ready = wait_until(START_DEADLINE, || {
            assert!(
                supervisor.try_wait().is_none(),
                "tenement-supervisor exited during start:\n{}",
                self.supervisor_log()
            );
            UnixStream::connect(self.admin_socket()).is_ok()
                && UnixStream::connect(self.proxy_socket()).is_ok()
        });
        assert!(
            ready,
            "tenement-supervisor did not accept within {START_DEADLINE:?}:\n{}",
            self.supervisor_log()
        );
        supervisor
    }

    /// The proxy command, with `--user nobody` when the tests run as root.
    pub fn proxy_command(&self) -> Command {
        let mut command = Command::new(proxy_binary());
        if is_root() {
            command.arg("--user").arg(PROXY_USER);
        }
        command
    }

    /// Starts the proxy and waits until it accepts on [`Sandbox::proxy_addr`].
    pub fn start_proxy(&self) -> Daemon {
        self.start_proxy_with(self.proxy_command())
    }

    /// Starts `command` (see [`Sandbox::proxy_command`]) as the proxy of this sandbox.
    pub fn start_proxy_with(&self, command: Command) -> Daemon {
        let mut proxy = self.spawn_daemon("proxy", command);
        let ready = wait_until(START_DEADLINE, || {
            assert!(
                proxy.try_wait().is_none(),
                "tenement-proxy exited during start:\n{}",
                self.proxy_log()
            );
            TcpStream::connect_timeout(&self.proxy_addr, Duration::from_millis(200)).is_ok()
        });
        assert!(
            ready,
            "tenement-proxy did not accept on {} within {START_DEADLINE:?}:\n{}",
            self.proxy_addr,
            self.proxy_log()
        );
        proxy
    }

    /// Both daemons, supervisor first.
    pub fn start(&self) -> (Daemon, Daemon) {
        let supervisor = self.start_supervisor();
        let proxy = self.start_proxy();
        (supervisor, proxy)
    }

    /// A connected admin client.
    pub fn admin(&self) -> Admin {
        Admin::connect(&self.admin_socket())
    }

    /// Every file and directory under `data_dir`, relative, sorted.
    pub fn data_listing(&self) -> Vec<String> {
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
        walk(&self.data_dir, &self.data_dir, &mut out);
        out.sort();
        out
    }

    /// Pids of live processes whose initial environment mentions this sandbox's root.
    pub fn leftover_processes(&self) -> Vec<i32> {
        processes_mentioning(&self.root.to_string_lossy())
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
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = &self.dir;
    }
}

/// Whether `pid` exists and is not a zombie.
/// `tenctl --config SANDBOX ARGS`, run to its end.
pub fn tenctl(sandbox: &Sandbox, args: &[&str]) -> Output {
    Command::new(tenctl_binary())
        .arg("--config")
        .arg(&sandbox.config_path)
        .args(args)
        .output()
        .expect("run tenctl")
}

/// `tenctl ARGS` that must succeed; its stdout.
pub fn tenctl_ok(sandbox: &Sandbox, args: &[&str]) -> String {
    let out = tenctl(sandbox, args);
    assert!(
        out.status.success(),
        "tenctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
        // A supervisor's exec server names its state directory, but it is the supervisor's
        // (it ends with it), not an instance's process; the helpers it starts rename
        // themselves `tenement-exec`.
        .filter(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map_or(true, |comm| comm.trim_end() != "tenement-execd")
        })
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// One `Key:\tvalue` line of `/proc/PID/status`.
pub fn proc_status_field(pid: i32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// The peak resident set (`VmHWM`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let value = proc_status_field(pid, "VmHWM");
    value
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("VmHWM {value:?}: {e}"))
}

/// A daemon of the sandbox (supervisor or proxy); SIGKILLed when dropped, with the tail of its
/// log printed if the test is failing.
pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon already reaped").id() as i32
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("waitpid")
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal)
            .unwrap_or_else(|e| panic!("{signal} to {}: {e}", self.name));
    }

    /// Waits for the exit, SIGKILLing and panicking after `within`.
    pub fn wait_exit(mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("waitpid") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {within:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(self, within: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(within)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let log = fs::read_to_string(&self.log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- {} log (last lines) ----\n{}",
                self.name,
                tail.join("\n")
            );
        }
    }
}

/// Runs `command` to its exit within `within`; its status and its output (stdout + stderr).
pub fn run_to_exit(mut command: Command, out: &Path, within: Duration) -> (ExitStatus, String) {
    let file = File::create(out).expect("create the output file");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .expect("start the command");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the command kept running; output:\n{}",
                fs::read_to_string(out).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    (status, fs::read_to_string(out).unwrap_or_default())
}
