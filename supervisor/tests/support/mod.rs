//! Shared harness of the supervisor's end-to-end tests: a sandbox directory with its own
//! `tenement.toml`, the real `tenement-supervisor` binary started on it, a blocking RPC client,
//! and small probes of processes, ports and HTTP.
//!
//! Every sandbox gets its own directories and its own block of instance ports (claimed across
//! processes: `tenement_fixtures::claim`, since nextest runs each test in a process), so tests run in
//! parallel. Nothing a test starts may outlive it: dropping a [`Supervisor`] SIGKILLs it, and
//! dropping the [`Sandbox`] SIGKILLs every process whose environment mentions the sandbox
//! (exec helpers carry it in their spawn spec, apps in `TENEMENT_DATA_DIR`), including
//! daemons that escaped their process group.
#![allow(dead_code, clippy::unwrap_used)]

mod probes;
mod rpc;

pub use probes::*;
pub use rpc::*;

use std::fs::{self, File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long the supervisor may take to accept on its admin socket after a start: a deadline
/// for a hang, generous for a loaded machine (see [`EVENT_DEADLINE`]).
const START_DEADLINE: Duration = EVENT_DEADLINE;
/// Numbers the output files of `run_to_exit` within a process.
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
            .prefix("tnm")
            .tempdir_in(base)
            .expect("create a sandbox directory");
        let root = dir.path().to_path_buf();
        let port_claim = tenement_fixtures::claim::ports();
        let ports = (port_claim.lo, port_claim.hi);
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
            _port_claim: port_claim,
            dir,
        };
        let text = format!(
            // Lifecycle tests run the apps as the supervisor's user in process groups, wherever
            // the checkout lives; tests/isolation covers namespaces and dynamic users.
            "[settings]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\ndata_dir = \"{}\"\nport_range = \"{}-{}\"\nisolation = \"process\"\nuser = \"self\"\n\n{body}\n",
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

    /// Starts the supervisor and waits until both its sockets accept.
    pub fn start(&self) -> Supervisor {
        self.start_with_env(&[])
    }

    /// [`Sandbox::start`] with extra variables in the supervisor's own environment.
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Supervisor {
        self.start_with(env, None)
    }

    /// [`Sandbox::start`] as systemd would: with this soft limit on open files (the hard one
    /// unchanged).
    pub fn start_with_nofile_soft(&self, soft: u64) -> Supervisor {
        self.start_with(&[], Some(soft))
    }

    fn start_with(&self, env: &[(&str, &str)], nofile_soft: Option<u64>) -> Supervisor {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the supervisor log");
        let mut command = match nofile_soft {
            None => Command::new(supervisor_binary()),
            Some(soft) => {
                // The shell lowers the soft limit and execs, so the pid stays the supervisor's.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""))
                    .arg(supervisor_binary());
                sh
            }
        };
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
            // admin.sock is bound first: wait for both.
            if UnixStream::connect(self.admin_socket()).is_ok()
                && UnixStream::connect(self.proxy_socket()).is_ok()
            {
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

    /// Runs a supervisor on this sandbox that is expected to exit by itself (a bad config, a
    /// second supervisor); its exit status and its output.
    pub fn run_to_exit(&self, within: Duration) -> (ExitStatus, String) {
        let out = self.root.join(format!(
            "run-to-exit-{}.log",
            NEXT_SANDBOX.fetch_add(1, Ordering::SeqCst)
        ));
        let file = File::create(&out).expect("create the output file");
        let mut child = Command::new(supervisor_binary())
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("TENEMENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start tenement-supervisor");
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waitpid") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tenement-supervisor kept running; output:\n{}",
                    fs::read_to_string(&out).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        (status, fs::read_to_string(&out).unwrap_or_default())
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

/// The running `tenement-supervisor`; SIGKILLed when dropped.
pub struct Supervisor {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Supervisor {
    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .expect("supervisor not yet stopped")
            .id() as i32
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
