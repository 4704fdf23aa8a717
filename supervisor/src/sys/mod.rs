//! The only place in tenement with `unsafe`: fork, exec, and what runs between them.
//!
//! - [`pass_fd`]: a `pre_exec` hook that puts a descriptor at fd 3 of a process the supervisor
//!   starts (the exec server's end of its socket). It runs in the forked child of the
//!   multithreaded supervisor, so it makes only async-signal-safe calls (dup2, fcntl).
//! - [`fork_sibling`], [`take_stdio`]: the exec server's clone of a helper, and the helper
//!   taking the descriptors that came with the request. [`pidfd_open`], [`wait_pidfd`],
//!   [`own_received`]: the supervisor's handle on the helper, and descriptors from SCM_RIGHTS.
//! - [`fork_exec_app`]: the exec helper's fork of the app. The helper is single-threaded (a
//!   clone of the exec server, which never starts a runtime or a thread), so the child may
//!   allocate.
//!
//! - [`FineSleep`]: a timerfd registered with tokio's reactor, for sub-millisecond readiness
//!   polling.
//!
//! Every `unsafe` block names the invariant it relies on.
#![allow(unsafe_code)]

pub mod isolate;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use nix::unistd::Pid;

/// Arranges for `fd` to be fd 3 (without close-on-exec) in the process `command` starts.
pub fn pass_fd(command: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec of a multithreaded parent.
    // It only calls dup2(2) and fcntl(2), both async-signal-safe (signal-safety(7)), touches
    // no allocator or lock, and captures `fd` by value (a plain integer).
    unsafe {
        command.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself keeps FD_CLOEXEC; clear it explicitly.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What the exec helper's child needs to become the app. Built before the fork.
pub struct AppExec {
    pub program: CString,
    pub argv: Vec<CString>,
    /// `KEY=VALUE` entries, except LISTEN_PID which the child adds with its own pid.
    pub env: Vec<CString>,
    pub workdir: CString,
    /// Whether fd 3 is a listening socket to hand over (LISTEN_PID is then set).
    pub listen_fd: bool,
    /// What the app gives up before exec.
    pub drop: isolate::Drop,
    /// The read end of the go-ahead pipe: the child waits for its byte last, after giving up
    /// its privileges and right before execve, so no app code runs until the supervisor holds
    /// a pidfd of the helper, while the child's own preparation overlaps that wait. End of
    /// file (the supervisor never took the helper in) exits 127.
    pub go: Option<RawFd>,
}

/// Forks the app from the single-threaded exec helper. Returns the child's pid in the parent;
/// the child never returns (it execs or exits 127 with a message on stderr).
pub fn fork_exec_app(app: &AppExec) -> nix::Result<Pid> {
    // SAFETY: fork(2) is sound here because the exec helper is single-threaded: a clone of the
    // exec server, which never starts a tokio runtime or any thread (see exec_helper.rs), so no
    // lock or allocator state can be held by another thread at the fork.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => child_exec(app),
    }
}

fn child_exec(app: &AppExec) -> ! {
    use nix::sys::signal::{signal, SigHandler, SigSet, SigmaskHow, Signal};

    // Rust ignores SIGPIPE and the helper blocks the signals it handles; an ignored disposition
    // and the mask survive exec, so give the app the defaults a shell would.
    // SAFETY: installing SIG_DFL is not a handler; no Rust code runs on delivery.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);

    let mut env = app.env.clone();
    if app.listen_fd {
        let pid = std::process::id();
        if let Ok(entry) = CString::new(format!("LISTEN_PID={pid}")) {
            env.push(entry);
        }
    }
    // Nothing the supervisor or the helper inherited reaches the app: close every descriptor
    // above stdio (and above the handed-over socket at 3), but the go-ahead pipe until its
    // byte has come.
    let first = if app.listen_fd { 4 } else { 3 };
    let close_range = |from: libc::c_uint, to: libc::c_uint| {
        // SAFETY: close_range(2) takes integers and only closes descriptors of this process,
        // which is about to exec; nothing in it uses them afterwards.
        from > to || unsafe { libc::close_range(from, to, 0) } != -1
    };
    let closed = match app.go.and_then(|go| libc::c_uint::try_from(go).ok()) {
        Some(go) if go >= first => {
            close_range(first, go.saturating_sub(1)) && close_range(go + 1, libc::c_uint::MAX)
        }
        _ => close_range(first, libc::c_uint::MAX),
    };
    if !closed {
        die(&format!(
            "tenement: cannot close inherited descriptors: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Err(e) = isolate::drop_privileges(&app.drop) {
        die(&format!("tenement: cannot drop privileges: {e}"));
    }
    if let Err(e) = nix::unistd::chdir(app.workdir.as_c_str()) {
        die(&format!(
            "tenement: cannot enter workdir {}: {e}",
            app.workdir.to_string_lossy()
        ));
    }
    if let Some(go) = app.go {
        if !wait_go_ahead(go) {
            die("tenement: the supervisor did not take this helper in; not starting the app");
        }
        let _ = nix::unistd::close(go);
    }
    let err = nix::unistd::execve(&app.program, &app.argv, &env).err();
    die(&format!(
        "tenement: cannot execute {}: {}",
        app.program.to_string_lossy(),
        err.map(|e| e.to_string()).unwrap_or_default()
    ));
}

/// Blocks until one byte comes on `go` (the supervisor's go-ahead); false on end of file or
/// an error.
fn wait_go_ahead(go: RawFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(go, &mut byte) {
            Err(nix::errno::Errno::EINTR) => continue,
            read => return read == Ok(1),
        }
    }
}

/// Forks the single-threaded exec helper; the child runs `body` and exits with its code.
/// Used for the PID 1 of an instance's PID namespace.
pub fn fork_child(body: impl FnOnce() -> i32) -> nix::Result<Pid> {
    // SAFETY: as in fork_exec_app: the exec helper is single-threaded.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => {
            let code = body();
            // SAFETY: _exit(2) is always safe to call; it never returns.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Forks this process, except that the new process's parent is this process's parent
/// (clone(2) with CLONE_PARENT): `None` in the new process, its pid in this one. The exec server
/// makes each instance's helper this way, so the helper is the supervisor's child: the
/// supervisor waits for it, and the helper's parent-death signal follows the supervisor.
pub fn fork_sibling() -> nix::Result<Option<Pid>> {
    // SAFETY: a raw clone(2) with no new stack and no CLONE_VM behaves as fork(2): the child
    // continues from here, with its own copy of this process's memory and of this very stack
    // (guard page included). Sound because the exec server is single-threaded (a fresh exec of
    // this binary that starts no thread or runtime), so no lock or allocator state is held
    // elsewhere. What glibc's fork() would add: atfork handlers (the server registers none) and
    // a fresh cached thread id; the child never relies on that id (Rust's locks do not use it,
    // glibc's raise(3) and fork(2) ask the kernel), and it registers no robust futexes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match rc {
        -1 => Err(nix::errno::Errno::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

/// Makes `fds` this process's descriptors 0, 1, 2, ... in order and closes every other one: the
/// exec server's new helper takes its stdio, its listening socket and its go-ahead pipe.
pub fn take_stdio(fds: &[RawFd]) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let count = fds.len() as RawFd;
    // First above every target, so that no dup2 below overwrites a descriptor still to move.
    let high = fds
        .iter()
        .map(|&fd| fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(count)))
        .collect::<nix::Result<Vec<RawFd>>>()?;
    for (target, &fd) in high.iter().enumerate() {
        nix::unistd::dup2(fd, target as RawFd)?;
    }
    // SAFETY: close_range(2) takes integers and only closes descriptors of this process; the
    // ones closed (the server's socket, the received copies) are not used afterwards.
    if unsafe { libc::close_range(count as libc::c_uint, libc::c_uint::MAX, 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for `pid` (pidfd_open(2)): readable once the process has exited, and a handle
/// waitid(2) reaps by, immune to pid reuse.
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; on success
    // the descriptor is ours alone, so OwnedFd may own it.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd as RawFd))
    }
}

/// Waits until the helper behind `pidfd` exits, reaps it, and returns its status.
pub async fn wait_pidfd(pidfd: std::os::fd::OwnedFd) -> std::io::Result<std::process::ExitStatus> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    use std::os::fd::AsFd;
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: the OwnedFd moves into the AsyncFd and is closed only when the AsyncFd drops it;
    // its `as_raw_fd` always returns that same descriptor.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }?;
    loop {
        let mut ready = fd.readable().await?;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        match waitid(Id::PIDFd(fd.get_ref().as_fd()), flags) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatusExt::from_raw(code << 8)),
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                let raw = signal as i32 | if core { 0x80 } else { 0 };
                return Ok(ExitStatusExt::from_raw(raw));
            }
            Ok(_) => ready.clear_ready(),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Owns the descriptors an SCM_RIGHTS message just installed in this process.
pub fn own_received(fds: Vec<RawFd>) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    fds.into_iter()
        // SAFETY: the kernel installed each descriptor for this message alone; nothing else in
        // the process knows its number.
        .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect()
}

fn die(message: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
    // Exit without running the parent's atexit handlers or flushing its buffers twice.
    // SAFETY: _exit(2) is always safe to call; it never returns.
    unsafe { libc::_exit(127) }
}

/// Makes the calling process a child subreaper: orphaned descendants (a double-forked daemon)
/// are reparented to it instead of to PID 1, so the exec helper can still kill them.
/// See prctl(2), PR_SET_CHILD_SUBREAPER.
pub fn set_child_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to send `signal` to the calling process when its parent dies.
/// See prctl(2), PR_SET_PDEATHSIG.
pub fn set_parent_death_signal(signal: nix::sys::signal::Signal) -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A sleep with microsecond resolution (tokio's timer wheel has 1 ms), from a timerfd
/// (timerfd_create(2)), so a native app that listens 1.1 ms after exec is seen at 1.2 ms.
pub struct FineSleep {
    fd: AsyncFd<TimerHandle>,
}

struct TimerHandle(TimerFd);

impl AsRawFd for TimerHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FineSleep {
    /// `None` where timerfd is unavailable; callers fall back to tokio's sleep.
    pub fn new() -> Option<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()?;
        // SAFETY: the fd comes from the TimerFd's OwnedFd, which moves into the AsyncFd and is
        // only closed when the AsyncFd drops it; `as_raw_fd` always returns that same fd.
        let fd = unsafe { AsyncFd::register_with_interest(TimerHandle(timer), Interest::READABLE) };
        Some(Self { fd: fd.ok()? })
    }

    pub async fn sleep(&self, pause: Duration) {
        let armed = self.fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(pause)),
            TimerSetTimeFlags::empty(),
        );
        if armed.is_err() {
            tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
            return;
        }
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                tokio::time::sleep(Duration::from_millis(1)).await;
                return;
            };
            if guard
                .try_io(|inner| inner.get_ref().0.wait().map_err(std::io::Error::from))
                .is_ok()
            {
                return;
            }
        }
    }
}

/// The open-file soft limit the supervisor was started with, before [`raise_nofile_limit`].
static INHERITED_NOFILE_SOFT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Raises the soft limit on open files to the hard limit (each running instance costs the
/// supervisor a few descriptors) and remembers the old one for the apps (see
/// [`inherited_nofile_soft`]).
pub fn raise_nofile_limit() -> nix::Result<()> {
    let soft = tenement_proto::rlimit::raise_nofile_limit()?;
    let _ = INHERITED_NOFILE_SOFT.set(soft);
    Ok(())
}

/// The soft limit apps get when their service sets no `nofile`: the one the supervisor was
/// given (many programs still use select(2), which breaks on descriptors above 1023).
pub fn inherited_nofile_soft() -> Option<u64> {
    INHERITED_NOFILE_SOFT.get().copied()
}

/// Whether `path` carries the extended attribute `name` (getxattr(2)).
pub fn has_xattr(path: &std::path::Path, name: &str) -> bool {
    let (Ok(path), Ok(name)) = (
        CString::new(path.as_os_str().as_encoded_bytes()),
        CString::new(name),
    ) else {
        return false;
    };
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; a null buffer
    // with size 0 asks only for the value's length and writes nothing.
    let rc = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    rc >= 0
}
