//! The privileged harness: a sandbox whose apps run as dynamic uids inside namespaces, the
//! supervisor started on it as root (optionally inside a delegated cgroup of the test's own),
//! the probe app, and `tenctl`.
//!
//! Unlike the lifecycle tests' sandbox, nothing here sets `isolation` or `user` in
//! `[settings]`: the supervisor's root defaults (namespace, dynamic users) are what is tested.
//! The sandbox lives under [`BASE`] rather than /tmp, because a namespaced app gets a private
//! /tmp (its program and workdir would vanish), and every directory on the way is 0755 so the
//! dynamic uids can reach the probe, which is copied in (the checkout may sit under /root, 0700).

use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tenement_proto::rpc::InstanceInfo;

use crate::support::{
    self, expect_woken, http_get, processes_mentioning, tcp_addr, wait_until, Client,
    EVENT_DEADLINE,
};

/// Where sandboxes are made: not under /tmp, /var/tmp or /dev/shm (see the module docs).
pub const BASE: &str = "/run/tenement-isolation-tests";
/// The interpreter the probe runs on: a system path every uid can execute.
pub const PYTHON: &str = "/usr/bin/python3";
const START_DEADLINE: Duration = EVENT_DEADLINE;
/// Numbers the test cgroups within a process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// These tests need root; without it they fail, loudly, rather than pass having checked nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the isolation tests need root (CI runs them as root): sudo -E cargo test -p tenement-supervisor --test isolation"
    );
}

/// A built binary next to the supervisor (`cargo build --workspace` puts them there).
pub fn sibling_binary(name: &str) -> PathBuf {
    let path = support::supervisor_binary()
        .parent()
        .expect("the supervisor binary has a directory")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run cargo build --workspace first",
        path.display()
    );
    path
}

/// A directory with a config, state, data and sockets of one root supervisor, and the probe.
pub struct IsoSandbox {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub log_path: PathBuf,
    /// The sandbox's `dynamic_users` (unless made [`IsoSandbox::with_default_uids`]).
    pub uids: (u32, u32),
    /// Ports and uids held while the sandbox lives, across test processes
    /// (`tenement_fixtures::claim`): each sandbox's tenants have uids and ports of their own.
    _claims: (
        tenement_fixtures::claim::PortBlock,
        tenement_fixtures::claim::UidBlock,
    ),
}

impl IsoSandbox {
    /// A sandbox whose config is `[settings]` (directories, ports, uids) and then `body`.
    pub fn new(body: &str) -> IsoSandbox {
        Self::with_settings("", body)
    }

    /// As [`IsoSandbox::new`], with `settings` lines added to `[settings]`. In `settings` and
    /// `body`, `@PROBE@` is the probe's command line and `@ROOT@` the sandbox directory.
    pub fn with_settings(settings: &str, body: &str) -> IsoSandbox {
        Self::create(settings, body, true)
    }

    /// As [`IsoSandbox::new`] but without `dynamic_users`: the supervisor's default range.
    pub fn with_default_uids(body: &str) -> IsoSandbox {
        Self::create("", body, false)
    }

    fn create(settings: &str, body: &str, own_uids: bool) -> IsoSandbox {
        require_root();
        fs::create_dir_all(BASE).unwrap_or_else(|e| panic!("create {BASE}: {e}"));
        fs::set_permissions(BASE, fs::Permissions::from_mode(0o755)).expect("chmod the base");
        let dir = tempfile::Builder::new()
            .prefix("s")
            .tempdir_in(BASE)
            .expect("create a sandbox directory");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod the sandbox");
        let probe = root.join("probe.py");
        fs::copy(support::fixtures_dir().join("probe.py"), &probe).expect("copy probe.py");
        fs::set_permissions(&probe, fs::Permissions::from_mode(0o644)).expect("chmod probe.py");

        let port_claim = tenement_fixtures::claim::ports();
        let uid_claim = tenement_fixtures::claim::uids();
        let ports = (port_claim.lo, port_claim.hi);
        let uids = (uid_claim.lo, uid_claim.hi);
        let sandbox = IsoSandbox {
            config_path: root.join("tenement.toml"),
            data_dir: root.join("data"),
            state_dir: root.join("state"),
            runtime_dir: root.join("run"),
            log_path: root.join("supervisor.log"),
            root,
            uids,
            _claims: (port_claim, uid_claim),
            dir,
        };
        let own_uids = if own_uids {
            format!("dynamic_users = \"{}-{}\"\n", uids.0, uids.1)
        } else {
            String::new()
        };
        let text = format!(
            "[settings]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\ndata_dir = \"{}\"\nport_range = \"{}-{}\"\n{own_uids}{settings}\n\n{body}\n",
            sandbox.runtime_dir.display(),
            sandbox.state_dir.display(),
            sandbox.data_dir.display(),
            ports.0,
            ports.1,
        );
        let text = text
            .replace("@PROBE@", &format!("{PYTHON} {}", probe.display()))
            .replace("@ROOT@", &sandbox.root.to_string_lossy());
        fs::write(&sandbox.config_path, text).expect("write tenement.toml");
        sandbox
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    pub fn proxy_socket(&self) -> PathBuf {
        self.runtime_dir.join("proxy.sock")
    }

    /// `data_dir/SERVICE/ID`.
    pub fn instance_data_dir(&self, instance: &str) -> PathBuf {
        let id = support::iid(instance);
        self.data_dir.join(id.service.as_str()).join(id.id.as_str())
    }

    pub fn admin(&self) -> Client {
        Client::connect(&self.admin_socket())
    }

    /// Registers `instance` if needed, starts it unless it runs, and returns its loopback
    /// address (`tenctl spawn`).
    pub fn spawn(&self, instance: &str) -> SocketAddr {
        tcp_addr(&expect_woken(self.admin().spawn(instance)).0)
    }

    /// Starts the supervisor as a child of this test and waits until both sockets accept.
    pub fn start(&self) -> IsoSupervisor {
        let mut command = Command::new(support::supervisor_binary());
        command.arg("--config").arg(&self.config_path);
        self.launch(command)
    }

    /// Starts the supervisor the way systemd would with `Delegate=yes`: its first process is
    /// already in `cgroup` (the shell moves itself there, then execs the supervisor).
    pub fn start_in_cgroup(&self, cgroup: &TestCgroup) -> IsoSupervisor {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" --config "$3""#)
            .arg("sh")
            .arg(&cgroup.dir)
            .arg(support::supervisor_binary())
            .arg(&self.config_path);
        self.launch(command)
    }

    /// Starts the supervisor from a careless parent: a shell that leaves `file` open on fd 9
    /// (read-write, without close-on-exec), as any process manager or shell might.
    pub fn start_with_open_fd(&self, file: &Path) -> IsoSupervisor {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"exec 9<>"$1" && exec "$2" --config "$3""#)
            .arg("sh")
            .arg(file)
            .arg(support::supervisor_binary())
            .arg(&self.config_path);
        self.launch(command)
    }

    fn launch(&self, mut command: Command) -> IsoSupervisor {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the supervisor log");
        command
            .env_remove("TENEMENT_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let child = command.spawn().expect("start tenement-supervisor");
        let mut supervisor = IsoSupervisor {
            child: Some(child),
            log_path: self.log_path.clone(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
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
            assert!(
                Instant::now() < deadline,
                "tenement-supervisor did not accept within {START_DEADLINE:?}:\n{}",
                self.supervisor_log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn supervisor_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `tenctl --config CONFIG ARGS...`.
    pub fn tenctl(&self, args: &[&str]) -> Output {
        Command::new(sibling_binary("tenctl"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("TENEMENT_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run tenctl")
    }

    /// `tenctl status INSTANCE --json`, decoded.
    pub fn tenctl_status(&self, instance: &str) -> InstanceInfo {
        let out = self.tenctl(&["status", instance, "--json"]);
        assert!(
            out.status.success(),
            "tenctl status {instance} --json: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "tenctl status --json printed something else ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Live processes started for this sandbox (by their environment).
    pub fn leftover_processes(&self) -> Vec<i32> {
        processes_mentioning(&format!("{}/", self.root.display()))
    }
}

impl Drop for IsoSandbox {
    fn drop(&mut self) {
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

/// The running root supervisor; SIGKILLed when dropped.
pub struct IsoSupervisor {
    child: Option<Child>,
    log_path: PathBuf,
}

impl IsoSupervisor {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("waitpid")
    }

    /// SIGTERM, then waits for the clean exit (which stops every instance first).
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("waitpid") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tenement-supervisor did not exit within {EVENT_DEADLINE:?} of SIGTERM");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as a crash would; returns once it is reaped.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for IsoSupervisor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let log = fs::read_to_string(&self.log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- supervisor log (last lines) ----\n{}", tail.join("\n"));
        }
    }
}

/// `GET /probe?QUERY` on the probe at `addr`: its JSON report.
pub fn probe(addr: SocketAddr, query: &[(&str, String)]) -> Value {
    let query: Vec<String> = query
        .iter()
        .map(|(key, value)| {
            assert!(
                value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c)),
                "probe parameter {key}={value:?} would need URL encoding"
            );
            format!("{key}={value}")
        })
        .collect();
    let path = format!("/probe?{}", query.join("&"));
    let (status, body) = http_get(addr, &path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("the probe's answer is not JSON ({e}): {body}"))
}

/// A string field of a probe report (a result such as "ok" or "EACCES").
pub fn field<'a>(report: &'a Value, key: &str) -> &'a str {
    report[key]
        .as_str()
        .unwrap_or_else(|| panic!("probe field {key} is not a string: {}", report[key]))
}

/// `{path: result}` maps of a probe report (`write`, `read`, `supervisor_socket_connect`).
pub fn entry<'a>(report: &'a Value, key: &str, path: &Path) -> &'a Value {
    let value = &report[key][path.to_string_lossy().as_ref()];
    assert!(
        !value.is_null(),
        "probe field {key} has nothing for {}: {}",
        path.display(),
        report[key]
    );
    value
}

/// The probe's uid as `[real, effective, saved]`.
pub fn uids(report: &Value) -> Vec<u64> {
    report["uid"]
        .as_array()
        .unwrap_or_else(|| panic!("no uid in {report}"))
        .iter()
        .map(|v| v.as_u64().expect("a uid"))
        .collect()
}

/// The one uid the probe runs as (real, effective and saved must agree).
pub fn single_uid(report: &Value) -> u32 {
    let ids = uids(report);
    assert!(
        ids.len() == 3 && ids.iter().all(|&u| u == ids[0]),
        "real, effective and saved uid differ: {ids:?}"
    );
    ids[0] as u32
}

/// Asserts every capability set is empty, no_new_privs is set and the seccomp mode is `seccomp`.
pub fn assert_unprivileged(report: &Value, seccomp: &str) {
    let who = field(report, "instance");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            report["status"][set].as_str(),
            Some("0000000000000000"),
            "{who}: {set} is not empty: {}",
            report["status"]
        );
    }
    assert_eq!(
        report["status"]["NoNewPrivs"].as_str(),
        Some("1"),
        "{who}: no_new_privs"
    );
    assert_eq!(
        report["status"]["Seccomp"].as_str(),
        Some(seccomp),
        "{who}: seccomp mode"
    );
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// The host pid of the probe app of an instance whose status says `status_pid` (the exec
/// helper's first child: the app itself, or the namespace's init above it).
pub fn app_host_pid(status_pid: u32) -> i32 {
    let pid = status_pid as i32;
    if cmdline(pid).contains("probe.py") {
        return pid;
    }
    support::descendants(pid)
        .into_iter()
        .find(|&p| {
            cmdline(p).contains("probe.py")
                && support::parent_pid(p).is_some_and(|pp| !cmdline(pp).contains("probe.py"))
        })
        .unwrap_or_else(|| panic!("no probe app under pid {pid} ({})", cmdline(pid)))
}

/// The owner and permission bits of `path`.
pub fn owner_and_mode(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (meta.uid(), meta.mode() & 0o7777)
}

/// A cgroup v2 directory of this test's own, marked delegated as systemd does for
/// `Delegate=yes` (the `trusted.delegate` xattr). Dropping it kills everything inside
/// (`cgroup.kill`) and removes it with its children.
pub struct TestCgroup {
    pub dir: PathBuf,
    /// Relative to the cgroup2 mount: what `/proc/PID/cgroup` shows after `0::`.
    pub relative: String,
}

impl TestCgroup {
    pub fn create() -> TestCgroup {
        require_root();
        let mount = cgroup2_mount();
        let name = format!(
            "tenement-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = mount.join(&name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = TestCgroup {
            dir,
            relative: format!("/{name}"),
        };
        let out = Command::new(PYTHON)
            .arg("-c")
            .arg("import os, sys; os.setxattr(sys.argv[1], 'trusted.delegate', b'1')")
            .arg(&cgroup.dir)
            .output()
            .expect("run python3 for setxattr");
        assert!(
            out.status.success(),
            "setxattr trusted.delegate on {}: {}",
            cgroup.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        cgroup
    }

    /// Pids in `cgroup.procs` of `relative` (`""` for the cgroup itself).
    pub fn procs(&self, relative: &str) -> Vec<i32> {
        let path = self.dir.join(relative).join("cgroup.procs");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .split_whitespace()
            .map(|p| p.parse().expect("a pid"))
            .collect()
    }

    fn populated(&self) -> bool {
        fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|t| !t.lines().any(|l| l == "populated 0"))
            .unwrap_or(false)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.dir.exists() {
            return;
        }
        let _ = fs::write(self.dir.join("cgroup.kill"), "1");
        if !wait_until(EVENT_DEADLINE, || !self.populated()) {
            eprintln!(
                "{} still has processes after cgroup.kill",
                self.dir.display()
            );
        }
        remove_cgroup_tree(&self.dir);
    }
}

/// rmdir of a cgroup and its children, deepest first (a cgroup's files cannot be unlinked).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("rmdir {}: {e}", dir.display());
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// a hybrid host like this one).
fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("no cgroup2 file system is mounted: these tests need cgroup v2")
}
