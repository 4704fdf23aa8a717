//! The exec helper's privileged steps: namespaces, mounts, loopback, and dropping every
//! privilege before exec. Runs only in the single-threaded helper (or its children), never in
//! the supervisor.
//!
//! Safe wrappers (nix, caps, seccompiler) are used where they exist; the `unsafe` blocks are
//! the raw syscalls they lack, each with its invariant.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;

/// Syscalls a `sandbox` instance gets EPERM for: they change the system, reach into other
/// processes or load code into the kernel, and a web app has no use for them.
const DENIED_SYSCALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "setns",
    "unshare",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "acct",
    "quotactl",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "syslog",
    "lookup_dcookie",
    "fanotify_init",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
];

/// Enters new PID, mount, IPC and UTS namespaces (and network, when `network_none`). The PID
/// namespace applies to children: the next fork is PID 1 there. See unshare(2).
pub fn enter_namespaces(network_none: bool, hostname: &str) -> Result<(), String> {
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if network_none {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    if network_none {
        loopback_up()?;
    }
    Ok(())
}

/// What an instance sees of the file system (see [`isolate_mounts`]).
pub struct MountPlan<'a> {
    /// Covered by empty tmpfs: the data root, the registry, the RPC sockets.
    pub hide: &'a [PathBuf],
    /// Bound back read-write: the instance's own directories and `writable`.
    pub writable: &'a [PathBuf],
    /// Files covered by an empty read-only file: the config file, env files.
    pub mask: &'a [PathBuf],
    /// The app's working directory: stays visible (read-only) even under `/run`.
    pub workdir: &'a Path,
    /// Bytes each private tmpfs may hold (else the kernel's default: half of the RAM).
    pub tmp_size: Option<u64>,
}

/// The mount namespace's view, in this order:
/// 1. everything read-only; private /tmp, /var/tmp and /dev/shm;
/// 2. `/run`, where the host keeps its sockets (journald, D-Bus, databases), covered by an
///    empty tmpfs, and what an app needs from it bound back read-only: its working directory
///    if it lives there, and the resolver's configuration (systemd-resolved keeps
///    /etc/resolv.conf's target in /run);
/// 3. `hide` covered (after 2, so a working directory bound back cannot show them again);
/// 4. `writable` bound back read-write (they may live under a hidden directory: the
///    instance's own data directory does);
/// 5. every `mask` file covered by an empty read-only file.
pub fn isolate_mounts(plan: &MountPlan<'_>) -> Result<(), String> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("make / private: {e}"))?;
    let run = Path::new("/run");
    let cover_run = run.is_dir() && !run.is_symlink();
    // Handles on what stays visible, taken before anything covers them.
    let mut readable = Vec::new();
    if cover_run {
        let resolver = std::fs::canonicalize("/etc/resolv.conf").ok();
        for path in resolver.iter().map(PathBuf::as_path).chain([plan.workdir]) {
            if path.starts_with(run) {
                if let Some(fd) = open_path(path)? {
                    readable.push((path.to_path_buf(), fd));
                }
            }
        }
    }
    let mut writable = Vec::new();
    for path in plan.writable {
        if let Some(fd) = open_path(path)? {
            writable.push((path.clone(), fd));
        }
    }
    set_readonly_recursive(Path::new("/"), true)?;
    let private = match plan.tmp_size {
        Some(bytes) => format!("mode=1777,size={bytes}"),
        None => "mode=1777".to_owned(),
    };
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        if Path::new(dir).is_dir() {
            tmpfs(Path::new(dir), &private)?;
        }
    }
    if cover_run {
        tmpfs(run, "mode=0755")?;
    }
    for (path, fd) in readable {
        bind_back(&path, &fd, false)?;
    }
    for path in plan.hide {
        if path.is_dir() {
            tmpfs(path, "mode=0755")?;
        }
    }
    for (path, fd) in writable {
        bind_back(&path, &fd, true)?;
    }
    if cover_run {
        // Nothing of the app's own goes there: the empty /run becomes read-only itself (this
        // mount only, so what was bound back under it keeps its own flags).
        mount(
            none,
            run,
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            none,
        )
        .map_err(|e| format!("read-only /run: {e}"))?;
    }
    for path in plan.mask {
        // Only what is still visible: a file under a hidden directory is gone already.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
            mount(Some("/dev/null"), path, none, MsFlags::MS_BIND, none)
                .map_err(|e| format!("cover {}: {e}", path.display()))?;
            set_readonly_recursive(path, true)?;
        }
    }
    Ok(())
}

/// An O_PATH handle on `path`, or None if it does not exist.
fn open_path(path: &Path) -> Result<Option<OwnedFd>, String> {
    match open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
        // SAFETY: `fd` was just returned by open(2) and is owned by nothing else.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(format!("open {}: {e}", path.display())),
    }
}

/// Binds what `fd` (taken before it was covered) refers to at `path` again, creating the
/// mount point on the covering tmpfs, read-write or read-only.
fn bind_back(path: &Path, fd: &OwnedFd, writable: bool) -> Result<(), String> {
    let none: Option<&str> = None;
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if !path.exists() {
        let is_dir = std::fs::metadata(&source).is_ok_and(|m| m.is_dir());
        if is_dir {
            std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        } else {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
            }
            std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        }
    }
    mount(
        Some(source.as_str()),
        path,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("bind {}: {e}", path.display()))?;
    set_readonly_recursive(path, !writable)
}

fn tmpfs(path: &Path, options: &str) -> Result<(), String> {
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(|e| format!("tmpfs on {}: {e}", path.display()))
}

/// Mounts a fresh /proc for the current PID namespace (called as its PID 1), with the
/// kernel's knobs in it read-only (an app running as root, even without capabilities, could
/// otherwise write /proc/sys/kernel/core_pattern).
pub fn mount_proc() -> Result<(), String> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount /proc: {e}"))?;
    for path in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/irq",
        "/proc/bus",
        "/proc/fs",
    ] {
        let path = Path::new(path);
        if !path.exists() {
            continue;
        }
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind {}: {e}", path.display()))?;
        set_readonly_recursive(path, true)?;
    }
    Ok(())
}

/// Sets or clears MOUNT_ATTR_RDONLY on `path` and every mount below it, in one call
/// (mount_setattr(2), Linux 5.12).
fn set_readonly_recursive(path: &Path, readonly: bool) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains NUL", path.display()))?;
    let mut attr = libc::mount_attr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if readonly {
        attr.attr_set = libc::MOUNT_ATTR_RDONLY;
    } else {
        attr.attr_clr = libc::MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_setattr reads `size` bytes from `&attr`, a live, initialised mount_attr of
    // exactly that size, and the NUL-terminated path from `c_path`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == -1 {
        return Err(format!(
            "mount_setattr {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Brings `lo` up in a fresh network namespace (it starts down). See netdevice(7).
fn loopback_up() -> Result<(), String> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface name from and writes the flags into `request`,
    // a valid ifreq that lives across the call; the socket fd is open.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } == -1 {
        return Err(format!(
            "SIOCGIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS just filled in.
    unsafe {
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above, for SIOCSIFFLAGS, which only reads `request`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } == -1 {
        return Err(format!(
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// What the app's process gives up before exec.
#[derive(Debug, Clone, Default)]
pub struct Drop {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub nofile: Option<u64>,
    /// Without `nofile`: the soft limit to set back (the hard one stays).
    pub nofile_soft: Option<u64>,
    pub nproc: Option<u64>,
    pub seccomp: bool,
    pub no_user_namespaces: bool,
}

/// Limits, user, capabilities, no_new_privs and (for sandbox) the seccomp filter, in that
/// order: capabilities go while we may still drop the bounding set; no_new_privs makes the
/// filter installable without privilege and keeps setuid binaries from giving anything back.
pub fn drop_privileges(drop: &Drop) -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Some(n) = drop.nofile {
        setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(|e| format!("setrlimit NOFILE: {e}"))?;
    } else if let Some(soft) = drop.nofile_soft {
        let (current, hard) =
            getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit NOFILE: {e}"))?;
        if soft < current {
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(|e| format!("setrlimit NOFILE: {e}"))?;
        }
    }
    if let Some(n) = drop.nproc {
        setrlimit(Resource::RLIMIT_NPROC, n, n).map_err(|e| format!("setrlimit NPROC: {e}"))?;
    }
    let root = nix::unistd::geteuid().is_root();
    if root {
        // The bounding set can only shrink while CAP_SETPCAP is held.
        caps::clear(None, caps::CapSet::Bounding).map_err(|e| format!("drop bounding set: {e}"))?;
    }
    let _ = caps::clear(None, caps::CapSet::Ambient);
    if let Some(gid) = drop.gid {
        let gid = nix::unistd::Gid::from_raw(gid);
        nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    }
    if let Some(uid) = drop.uid {
        let uid = nix::unistd::Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    }
    // Still root (user = "root"), or never were: empty every remaining set explicitly.
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| format!("clear {set:?} capabilities: {e}"))?;
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == -1 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    if drop.seccomp {
        install_seccomp()?;
    } else if drop.no_user_namespaces {
        install_user_namespace_filter()?;
    }
    Ok(())
}

/// The `namespace` level's one filter: no new user namespace (in which an unprivileged app
/// becomes root of its own namespace and reaches kernel code meant for root). clone(2) and
/// unshare(2) with CLONE_NEWUSER get EPERM; clone3(2), whose flags a filter cannot read,
/// gets ENOSYS so the C library falls back to clone.
fn install_user_namespace_filter() -> Result<(), String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    use std::collections::BTreeMap;
    let newuser = libc::CLONE_NEWUSER as u64;
    let rule = || -> Result<SeccompRule, String> {
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(newuser),
            newuser,
        )
        .map_err(|e| format!("seccomp condition: {e}"))?;
        SeccompRule::new(vec![condition]).map_err(|e| format!("seccomp rule: {e}"))
    };
    let mut denied = BTreeMap::new();
    denied.insert(libc::SYS_clone, vec![rule()?]);
    denied.insert(libc::SYS_unshare, vec![rule()?]);
    let mut no_clone3 = BTreeMap::new();
    no_clone3.insert(libc::SYS_clone3, Vec::new());
    for program in [
        compile_filter(denied, libc::EPERM)?,
        compile_filter(no_clone3, libc::ENOSYS)?,
    ] {
        seccompiler::apply_filter(&program).map_err(|e| format!("seccomp apply: {e}"))?;
    }
    Ok(())
}

/// A filter that answers `errno` to the calls matching `rules` and allows everything else.
fn compile_filter(
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    errno: i32,
) -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{SeccompAction, SeccompFilter};
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp arch: {e:?}"))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    filter
        .try_into()
        .map_err(|e| format!("seccomp compile: {e:?}"))
}

/// The namespace flags of clone(2): creating namespaces from inside a sandbox (a user
/// namespace above all, which hands out capabilities inside it) is what `unshare` is denied
/// for, so `clone` with any of them is denied too.
const CLONE_NEW_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWTIME as u64,
];

fn install_seccomp() -> Result<(), String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    use std::collections::BTreeMap;
    let compile = compile_filter;
    let mut denied = BTreeMap::new();
    for name in DENIED_SYSCALLS {
        if let Some(number) = syscall_number(name) {
            denied.insert(number, Vec::new());
        }
    }
    // clone(flags, ...) with a CLONE_NEW* bit: one rule per bit, any of them matches.
    let clone_rules = CLONE_NEW_FLAGS
        .iter()
        .map(|&bit| {
            let condition =
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(bit), bit)
                    .map_err(|e| format!("seccomp condition: {e}"))?;
            SeccompRule::new(vec![condition]).map_err(|e| format!("seccomp rule: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    // clone3 passes its flags in memory a filter cannot read: deny it with ENOSYS, which makes
    // the C library fall back to clone (EPERM would break thread creation).
    let mut no_clone3 = BTreeMap::new();
    no_clone3.insert(libc::SYS_clone3, Vec::new());
    for program in [
        compile(denied, libc::EPERM)?,
        compile(no_clone3, libc::ENOSYS)?,
    ] {
        seccompiler::apply_filter(&program).map_err(|e| format!("seccomp apply: {e}"))?;
    }
    Ok(())
}

fn syscall_number(name: &str) -> Option<i64> {
    Some(match name {
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "chroot" => libc::SYS_chroot,
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "bpf" => libc::SYS_bpf,
        "keyctl" => libc::SYS_keyctl,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "reboot" => libc::SYS_reboot,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "setns" => libc::SYS_setns,
        "unshare" => libc::SYS_unshare,
        "perf_event_open" => libc::SYS_perf_event_open,
        "userfaultfd" => libc::SYS_userfaultfd,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        #[cfg(target_arch = "x86_64")]
        "iopl" => libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        "ioperm" => libc::SYS_ioperm,
        "syslog" => libc::SYS_syslog,
        "lookup_dcookie" => libc::SYS_lookup_dcookie,
        "fanotify_init" => libc::SYS_fanotify_init,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "fsopen" => libc::SYS_fsopen,
        "fsmount" => libc::SYS_fsmount,
        "fsconfig" => libc::SYS_fsconfig,
        "fspick" => libc::SYS_fspick,
        "mount_setattr" => libc::SYS_mount_setattr,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denied_syscall_has_a_number_here() {
        for name in DENIED_SYSCALLS {
            assert!(syscall_number(name).is_some(), "{name}");
        }
    }
}
