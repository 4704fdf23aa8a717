//! The exec helper, `tenement-exec`: a small synchronous program at the root of every
//! instance's process tree.
//!
//! The supervisor starts one exec server (`tenement-exec --serve`, see [`serve`]) and sends it
//! each instance's [`SpawnSpec`]; the server clones a helper for it, in a new process group,
//! as a child of the supervisor. A helper is single-threaded and synchronous: it becomes a child subreaper (so a
//! double-forked daemon is reparented to it, not to PID 1), forks the app, then waits for
//! signals. On SIGTERM/SIGINT it forwards the signal to its whole tree; `stop_grace` later it
//! SIGKILLs what is left. When the app exits, everything else in the tree is killed too and the
//! helper exits with the app's status (128+N for a signal), so no orphan keeps a port.
//! If the supervisor dies, the kernel sends the helper SIGTERM (PR_SET_PDEATHSIG).
//!
//! Isolation happens here, never in the multithreaded supervisor, in this order: join the
//! instance's cgroup; for `namespace` and `sandbox`, unshare PID, mount, IPC, UTS (and network)
//! namespaces and set up the mounts, then fork a PID 1 for the namespace that mounts its /proc,
//! reaps and forwards signals; the app's own process sets its rlimits, drops to its user and
//! every capability, sets no_new_privs (and the seccomp filter for `sandbox`) and execs.
//!
//! ```text
//! tenement-exec (host PID ns, subreaper) ─┬─ app                       process
//!                                          └─ init (PID 1) ── app (2)   namespace, sandbox
//! ```

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::procfs;
use crate::sys;

/// The helper's file name; it is installed next to `tenement-supervisor`.
pub const HELPER_NAME: &str = "tenement-exec";
/// Where packages may put it instead.
const LIBEXEC: &str = "/usr/libexec/tenement/tenement-exec";

/// Everything the helper needs to start one instance's app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpawnSpec {
    /// Absolute path of the program (resolved by the supervisor).
    pub program: PathBuf,
    pub argv: Vec<String>,
    /// The app's whole environment.
    pub env: Vec<(String, String)>,
    pub workdir: PathBuf,
    /// fd 3 of the helper is a listening socket for the app (LISTEN_FDS=1 is in `env`).
    pub listen_fd: bool,
    pub stop_grace_ms: u64,
    /// The supervisor's pid: if the helper's parent is already another process, the
    /// supervisor died before PR_SET_PDEATHSIG took effect and the helper gives up.
    pub supervisor_pid: u32,
    /// The instance's cgroup directory, joined first.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub isolation: IsolationSpec,
}

/// How the app is separated from everything else.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IsolationSpec {
    /// PID, mount, IPC and UTS namespaces, read-only file system, private /tmp.
    pub namespaces: bool,
    /// Its own network namespace with only loopback.
    pub network_none: bool,
    pub seccomp: bool,
    /// No new user namespaces (clone/unshare with CLONE_NEWUSER: EPERM; clone3: ENOSYS), for
    /// every level above `process` (the sandbox filter includes it).
    #[serde(default)]
    pub no_user_namespaces: bool,
    pub hostname: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub nofile: Option<u64>,
    /// Without `nofile`: the open-file soft limit to give the app back (the supervisor raised
    /// its own).
    #[serde(default)]
    pub nofile_soft: Option<u64>,
    pub nproc: Option<u64>,
    /// Covered by empty tmpfs: other tenants' data, the registry, the RPC sockets.
    pub hide: Vec<PathBuf>,
    /// Bound back read-write: the instance's own directories and the service's `writable`.
    pub writable: Vec<PathBuf>,
    /// Files covered by an empty read-only file: the config file and every `env_file`.
    #[serde(default)]
    pub mask: Vec<PathBuf>,
    /// Bytes each private tmpfs (/tmp, /var/tmp, /dev/shm) may hold.
    #[serde(default)]
    pub tmp_size: Option<u64>,
}

/// Finds `tenement-exec`: next to the running supervisor binary, else in libexec.
pub fn locate() -> Result<PathBuf, String> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(HELPER_NAME)));
    beside
        .into_iter()
        .chain(std::iter::once(PathBuf::from(LIBEXEC)))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            format!("cannot find the exec helper {HELPER_NAME} next to this binary or at {LIBEXEC}; reinstall tenement")
        })
}

/// The argument that starts the exec server.
pub const SERVE_ARG: &str = "--serve";
/// The exec server's process name (comm); each helper it starts takes [`HELPER_NAME`] back.
pub const SERVER_NAME: &str = "tenement-execd";
/// In the exec server's environment: the state directory of the supervisor it serves, so
/// `ps e` (and the tests) can tell which supervisor a server and its helpers belong to.
pub const SERVER_OF_ENV: &str = "TENEMENT_EXEC_SERVER_OF";
/// The largest spawn request the server reads (a spec with a large environment).
pub const MAX_REQUEST: usize = 1 << 20;

/// The server's answer to one spawn request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpawnReply {
    /// The helper runs, as a child of the supervisor.
    Started {
        pid: i32,
    },
    Failed {
        error: String,
    },
}

/// Runs `tenement-exec`; never returns.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.as_slice() {
        [flag, supervisor] if flag == SERVE_ARG => match supervisor.parse() {
            Ok(pid) => serve(pid),
            Err(_) => usage(),
        },
        _ => usage(),
    };
    std::process::exit(code)
}

fn usage() -> i32 {
    eprintln!("{HELPER_NAME} is started by tenement-supervisor only ({HELPER_NAME} {SERVE_ARG} SUPERVISOR_PID)");
    2
}

/// The exec server: started once by the supervisor, ahead of need, with a SOCK_SEQPACKET
/// socket at fd 3. Each message is one spawn: a JSON [`SpawnSpec`] with descriptors for the
/// helper's stdin, stdout, stderr, its listening socket when `listen_fd`, and last the read end
/// of a go-ahead pipe. The server clones itself with CLONE_PARENT (so the helper is the
/// supervisor's child, as if the supervisor had forked it) and answers the helper's pid. The
/// helper prepares (cgroup, namespaces, mounts) and forks the app's process, which gives up its
/// privileges and then execs the app only once the supervisor, holding a pidfd of the helper,
/// writes a byte to the pipe: a helper whose answer was lost (the server killed between the
/// clone and the answer, or an answer too late) reads end-of-file there instead and exits 127,
/// so no app ever runs that the supervisor does not wait for, and the wait overlaps the
/// preparation. A wake thus costs a clone of this small process
/// instead of a fork of the supervisor and an exec of the helper: on the VM of
/// docs/BENCHMARKS.md the exec and the start of a Rust binary alone take about a millisecond.
/// The server ends when the supervisor closes the socket or dies (parent-death signal).
fn serve(supervisor: u32) -> i32 {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::io::IoSliceMut;
    use std::os::fd::{OwnedFd, RawFd};

    if let Err(e) = sys::set_parent_death_signal(Signal::SIGKILL) {
        eprintln!("tenement exec server: prctl(PR_SET_PDEATHSIG): {e}");
        return 127;
    }
    if nix::unistd::getppid().as_raw() as u32 != supervisor {
        return 0;
    }
    let _ = nix::sys::prctl::set_name(&CString::new(SERVER_NAME).unwrap_or_default());
    let socket: RawFd = 3;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        // At most five descriptors come with a request; room for more shows an extra as
        // MSG_CTRUNC instead of losing it silently.
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (bytes, truncated, fds_cut, fds): (usize, bool, bool, Vec<OwnedFd>) = match recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(sys::own_received(received));
                    }
                }
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                let fds_cut = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                (msg.bytes, truncated, fds_cut, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("tenement exec server: recvmsg: {e}");
                return 127;
            }
        };
        if bytes == 0 && fds.is_empty() {
            return 0; // the supervisor closed its end
        }
        let (reply, spec) = if truncated {
            let error = format!("the spawn request is larger than {MAX_REQUEST} bytes");
            (SpawnReply::Failed { error }, None)
        } else if fds_cut {
            let error = "more descriptors came with the spec than a request carries".to_owned();
            (SpawnReply::Failed { error }, None)
        } else {
            spawn(&buf[..bytes], &fds)
        };
        // The answer first: the new helper's app waits for the supervisor's go-ahead, which
        // comes once the supervisor has this answer. What follows writes to memory this process
        // shares with the helper just cloned (each first write copies a page), off that path.
        let answer = serde_json::to_vec(&reply).unwrap_or_default();
        if let Err(e) = nix::sys::socket::send(socket, &answer, MsgFlags::MSG_NOSIGNAL) {
            eprintln!("tenement exec server: send: {e}");
            return 127;
        }
        drop(fds);
        // Requests carry tenants' environments (secrets from env files among them); each
        // later helper is a copy of this process, so nothing of an earlier one stays here:
        // the request's bytes, and the environment and arguments parsed from them (zeroed
        // before the allocator reuses their memory).
        if let Some(mut spec) = spec {
            for (name, value) in &mut spec.env {
                name.zeroize();
                value.zeroize();
            }
            spec.argv.zeroize();
        }
        buf[..bytes].fill(0);
    }
}

/// One spawn request: checks it and clones the helper that runs it. Returns the answer in the
/// server, with the parsed spec for the caller to zero once the answer is sent; the helper
/// never returns from it (it exits).
fn spawn(request: &[u8], fds: &[std::os::fd::OwnedFd]) -> (SpawnReply, Option<SpawnSpec>) {
    use std::os::fd::AsRawFd;
    let spec: SpawnSpec = match serde_json::from_slice(request) {
        Ok(spec) => spec,
        Err(e) => {
            let error = format!("bad spawn spec: {e}");
            return (SpawnReply::Failed { error }, None);
        }
    };
    // stdin, stdout, stderr, [listening socket], go-ahead pipe.
    let wanted = if spec.listen_fd { 5 } else { 4 };
    if fds.len() != wanted {
        let error = format!(
            "{} descriptors came with the spec, {wanted} expected",
            fds.len()
        );
        return (SpawnReply::Failed { error }, Some(spec));
    }
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let reply = match sys::fork_sibling() {
        Ok(Some(pid)) => SpawnReply::Started { pid: pid.as_raw() },
        Err(e) => SpawnReply::Failed {
            error: format!("clone: {e}"),
        },
        Ok(None) => {
            // The new helper: its own name and process group (the supervisor signals the
            // group), the received descriptors as 0.., then what a helper does. A panic must
            // not unwind into the server's loop, which this copy of the stack still holds.
            let go = (wanted - 1) as i32;
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = nix::sys::prctl::set_name(&CString::new(HELPER_NAME).unwrap_or_default());
                nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
                    .map_err(|e| format!("setpgid: {e}"))
                    .and_then(|()| sys::take_stdio(&raw).map_err(|e| format!("descriptors: {e}")))
                    .and_then(|()| run(&spec, go))
            }));
            std::process::exit(match code {
                Ok(Ok(code)) => code,
                Ok(Err(message)) => {
                    eprintln!("tenement exec helper: {message}");
                    127
                }
                Err(_) => 127,
            })
        }
    };
    (reply, Some(spec))
}

/// Starts the app of `spec` (which execs once the supervisor gives the go-ahead on `go`) and
/// supervises it; the exit code for the helper.
fn run(spec: &SpawnSpec, go: i32) -> Result<i32, String> {
    // The cgroup first: everything forked from here on is accounted and killable there.
    if let Some(cgroup) = &spec.cgroup {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("cannot join {}: {e}", procs.display()))?;
    }
    sys::set_parent_death_signal(Signal::SIGTERM)
        .map_err(|e| format!("prctl(PR_SET_PDEATHSIG): {e}"))?;
    if nix::unistd::getppid().as_raw() as u32 != spec.supervisor_pid {
        return Err("the supervisor exited before the app started".to_owned());
    }
    sys::set_child_subreaper().map_err(|e| format!("prctl(PR_SET_CHILD_SUBREAPER): {e}"))?;

    // Block the signals we handle before forking, so none is lost between fork and the wait
    // loop; the app's child unblocks everything before exec.
    let mut mask = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        mask.add(signal);
    }
    mask.thread_block()
        .map_err(|e| format!("sigprocmask: {e}"))?;
    let mut signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| format!("signalfd: {e}"))?;

    let grace = Duration::from_millis(spec.stop_grace_ms);
    let app = app_exec(spec, go)?;
    let iso = &spec.isolation;
    let (child, tree) = if iso.namespaces {
        sys::isolate::enter_namespaces(iso.network_none, &iso.hostname)?;
        sys::isolate::isolate_mounts(&sys::isolate::MountPlan {
            hide: &iso.hide,
            writable: &iso.writable,
            mask: &iso.mask,
            workdir: &spec.workdir,
            tmp_size: iso.tmp_size,
        })?;
        // The next process is PID 1 of the new namespace: it mounts /proc and stays as the
        // init that reaps and forwards signals; the app runs under it.
        let init = sys::fork_child(|| {
            if let Err(e) = sys::isolate::mount_proc() {
                eprintln!("tenement exec helper: {e}");
                return 127;
            }
            let forked = sys::fork_exec_app(&app);
            let _ = nix::unistd::close(go);
            match forked {
                Ok(app_pid) => supervise(app_pid, &mut signals, grace, Tree::NamespaceInit),
                Err(e) => {
                    eprintln!("tenement exec helper: fork: {e}");
                    127
                }
            }
        })
        .map_err(|e| format!("fork: {e}"))?;
        (init, Tree::Child(init.as_raw()))
    } else {
        let app_pid = sys::fork_exec_app(&app).map_err(|e| format!("fork: {e}"))?;
        (app_pid, Tree::ProcessGroup)
    };
    // The app's side waits for the go-ahead byte; this copy of the pipe is not needed.
    let _ = nix::unistd::close(go);
    if spec.listen_fd {
        // The app has its copy; ours would keep the port open after the app died.
        let _ = nix::unistd::close(3);
    }
    Ok(supervise(child, &mut signals, grace, tree))
}

fn app_exec(spec: &SpawnSpec, go: i32) -> Result<sys::AppExec, String> {
    let cstring = |what: &str, s: &str| {
        CString::new(s).map_err(|_| format!("{what} contains a NUL byte: {s:?}"))
    };
    Ok(sys::AppExec {
        program: cstring("program", &spec.program.to_string_lossy())?,
        argv: spec
            .argv
            .iter()
            .map(|a| cstring("argument", a))
            .collect::<Result<_, _>>()?,
        env: spec
            .env
            .iter()
            .map(|(k, v)| cstring("environment", &format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        workdir: cstring("workdir", &spec.workdir.to_string_lossy())?,
        listen_fd: spec.listen_fd,
        go: Some(go),
        drop: sys::isolate::Drop {
            uid: spec.isolation.uid,
            gid: spec.isolation.gid,
            nofile: spec.isolation.nofile,
            nofile_soft: spec.isolation.nofile_soft,
            nproc: spec.isolation.nproc,
            seccomp: spec.isolation.seccomp,
            no_user_namespaces: spec.isolation.no_user_namespaces,
        },
    })
}

/// Which processes a stop signal is forwarded to.
#[derive(Debug, Clone, Copy)]
enum Tree {
    /// The helper without namespaces: its process group and every descendant (a daemon that
    /// left the group with setsid is still reparented to us, the subreaper).
    ProcessGroup,
    /// PID 1 of an instance's namespace: everyone else in it (kill(-1), see kill(2)).
    NamespaceInit,
    /// The helper above a namespace: only its init, which forwards; if the init dies, the
    /// kernel kills the whole namespace.
    Child(i32),
}

impl Tree {
    fn signal(self, me: i32, signal: Signal) {
        use nix::sys::signal::{kill, killpg};
        match self {
            Tree::ProcessGroup => {
                // The group first (one syscall reaches the common case), then stragglers.
                let _ = killpg(Pid::from_raw(me), signal);
                for pid in procfs::tree_of(&procfs::all_processes(Path::new("/proc")), me) {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
            Tree::NamespaceInit => {
                let _ = kill(Pid::from_raw(-1), signal);
            }
            Tree::Child(pid) => {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }
}

/// Waits for `child`, forwarding stop signals to `tree`; returns the exit code to use.
fn supervise(child: Pid, signals: &mut SignalFd, grace: Duration, tree: Tree) -> i32 {
    let me = nix::unistd::getpid().as_raw();
    let mut kill_at: Option<Instant> = None;
    loop {
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            kill_descendants(me);
            kill_at = None;
        }
        let timeout = match kill_at {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        if wait_readable(signals, timeout) {
            if let Ok(Some(info)) = signals.read_signal() {
                let signo = info.ssi_signo as i32;
                // Our own killpg reaches us too; forwarding that again would loop.
                let from_self = info.ssi_pid as i32 == me;
                if signo != libc::SIGCHLD && !from_self {
                    if let Ok(signal) = Signal::try_from(signo) {
                        tree.signal(me, signal);
                    }
                    kill_at.get_or_insert_with(|| Instant::now() + grace);
                }
            }
        }
        // Reap everything that exited; stop when the child itself did.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return finish(me, code),
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                    return finish(me, 128 + signal as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// The child is gone: nothing else of the instance may outlive it.
fn finish(me: i32, code: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = procfs::tree_of(&procfs::all_processes(Path::new("/proc")), me);
        // Reap whatever died meanwhile, then kill what is left.
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            return code;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill_descendants(me: i32) {
    for pid in procfs::tree_of(&procfs::all_processes(Path::new("/proc")), me) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn wait_readable(signals: &SignalFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0)
}
