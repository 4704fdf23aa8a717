//! Whose listener is on an instance's port: the instance's own, nobody's, or a stranger's.
//!
//! With `listen = "tcp"` the app binds its port itself, a moment after the supervisor made
//! sure the port was free; any co-tenant could bind it in between (or after the app died) and
//! answer the instance's requests. So before an instance counts as ready, every listener on its
//! port must be one of the instance's own sockets: owned by the instance's uid (sock_diag(7)
//! reports a socket's uid), or with its inode among the open files of a process of the
//! instance's tree (`/proc/PID/fd`; under systemd the supervisor cannot read those of other
//! uids, it holds no CAP_SYS_PTRACE, so the uid is what is known there). A stranger's listener
//! is named by its uid and the processes that hold it, so the supervisor can log who it was.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

use tenement_proto::sockdiag;

use crate::procfs;

/// Who listens on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Only sockets of the instance's own processes.
    Own,
    /// Nothing listens.
    Nobody,
    /// At least one listener belongs to someone else.
    Stranger { uid: u32, pids: Vec<i32> },
}

/// Who listens on `port`, judged against the instance's uid `own_uid` and the processes under
/// `root` (the instance's exec helper; `None` when it has none).
pub fn port_holder(
    proc_root: &Path,
    port: u16,
    own_uid: Option<u32>,
    root: Option<i32>,
) -> io::Result<Holder> {
    let listeners = sockdiag::tcp_listeners(port)?;
    if listeners.is_empty() {
        return Ok(Holder::Nobody);
    }
    Ok(judge(proc_root, &listeners, own_uid, root))
}

/// Whether there are `listeners` and the uid alone makes every one of them the instance's: the
/// usual case, and then [`judge`] reads nothing under `/proc`.
pub fn all_of_uid(listeners: &[sockdiag::SocketOwner], own_uid: Option<u32>) -> bool {
    !listeners.is_empty() && own_uid.is_some_and(|uid| listeners.iter().all(|l| l.uid == uid))
}

/// Whose `listeners` (every socket listening on one port, as sock_diag just reported them)
/// are: [`Holder::Own`] when each is of `own_uid` or held by a process under `root`.
pub fn judge(
    proc_root: &Path,
    listeners: &[sockdiag::SocketOwner],
    own_uid: Option<u32>,
    root: Option<i32>,
) -> Holder {
    if listeners.is_empty() {
        return Holder::Nobody;
    }
    let is_own = |l: &sockdiag::SocketOwner, own: &HashSet<u32>| {
        Some(l.uid) == own_uid || own.contains(&l.inode)
    };
    if all_of_uid(listeners, own_uid) {
        return Holder::Own;
    }
    let none = HashSet::new();
    let Some(root) = root else {
        return stranger(proc_root, listeners, |l| is_own(l, &none));
    };
    // The tree by its children lists first: a few reads, where a snapshot of the whole process
    // table costs a read per process on the host, on every start of every instance.
    if let Some(mut pids) = procfs::descendants(proc_root, root) {
        pids.push(root);
        let own = tree_sockets(proc_root, &pids);
        if listeners.iter().all(|l| is_own(l, &own)) {
            return Holder::Own;
        }
    }
    // The lists can miss a process that forks or exits meanwhile: before a socket is called a
    // stranger's, the whole table decides.
    let mut pids = procfs::tree_of(&procfs::all_processes(proc_root), root);
    pids.push(root);
    let own = tree_sockets(proc_root, &pids);
    stranger(proc_root, listeners, |l| is_own(l, &own))
}

/// The accept queue of the listener a connect to `addr` reaches, among `listeners` (on
/// `addr`'s port): one bound to exactly its address, else a wildcard one. `None` when none is
/// found (a listener on another address only).
pub fn backlog_at(listeners: &[sockdiag::SocketOwner], addr: SocketAddr) -> Option<u32> {
    let at = |exact: bool| {
        listeners.iter().find(|l| {
            l.local.port() == addr.port()
                && if exact {
                    l.local.ip() == addr.ip()
                } else {
                    l.local.ip().is_unspecified()
                }
        })
    };
    at(true).or_else(|| at(false)).map(|l| l.backlog.max(1))
}

/// The inodes of every socket the processes `pids` hold.
fn tree_sockets(proc_root: &Path, pids: &[i32]) -> HashSet<u32> {
    pids.iter()
        .flat_map(|&pid| socket_inodes(proc_root, pid))
        .collect()
}

/// [`Holder::Own`] when `own` accepts every listener, else the first stranger and who holds it.
fn stranger(
    proc_root: &Path,
    listeners: &[sockdiag::SocketOwner],
    own: impl Fn(&sockdiag::SocketOwner) -> bool,
) -> Holder {
    match listeners.iter().find(|l| !own(l)) {
        None => Holder::Own,
        Some(stranger) => Holder::Stranger {
            uid: stranger.uid,
            pids: holders_of(proc_root, stranger.inode),
        },
    }
}

/// The inodes of the sockets `pid` has open (`socket:[N]` links in `/proc/PID/fd`).
fn socket_inodes(proc_root: &Path, pid: i32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| parse_socket_link(&target.to_string_lossy()))
        .collect()
}

fn parse_socket_link(target: &str) -> Option<u32> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Every process holding socket `inode` (a scan of all of /proc: only done for a stranger).
fn holders_of(proc_root: &Path, inode: u32) -> Vec<i32> {
    procfs::all_processes(proc_root)
        .iter()
        .map(|p| p.pid)
        .filter(|&pid| socket_inodes(proc_root, pid).contains(&inode))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};

    #[test]
    fn socket_links_are_parsed() {
        assert_eq!(parse_socket_link("socket:[12345]"), Some(12345));
        assert_eq!(parse_socket_link("pipe:[12345]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
    }

    fn listener(local: &str, uid: u32, backlog: u32) -> sockdiag::SocketOwner {
        sockdiag::SocketOwner {
            local: local.parse().expect("addr"),
            uid,
            inode: 7,
            backlog,
        }
    }

    #[test]
    fn the_backlog_is_the_listener_a_connect_reaches() {
        let at: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        let exact = listener("127.0.0.1:8000", 1, 5);
        let wildcard = listener("0.0.0.0:8000", 1, 64);
        let elsewhere = listener("127.0.0.2:8000", 1, 9);
        assert_eq!(backlog_at(&[wildcard, exact], at), Some(5));
        assert_eq!(backlog_at(&[elsewhere, wildcard], at), Some(64));
        assert_eq!(backlog_at(&[listener("[::]:8000", 1, 32)], at), Some(32));
        assert_eq!(backlog_at(&[elsewhere], at), None);
        assert_eq!(backlog_at(&[listener("127.0.0.1:8001", 1, 5)], at), None);
        // A listener reported with no queue still takes one connection.
        assert_eq!(backlog_at(&[listener("127.0.0.1:8000", 1, 0)], at), Some(1));
    }

    #[test]
    fn the_uid_alone_settles_listeners_all_of_it() {
        let proc_root = Path::new("/nonexistent");
        let ours = [
            listener("127.0.0.1:8000", 1, 5),
            listener("[::]:8000", 1, 5),
        ];
        assert!(all_of_uid(&ours, Some(1)));
        assert_eq!(judge(proc_root, &ours, Some(1), None), Holder::Own);
        let mixed = [ours[0], listener("0.0.0.0:8000", 2, 5)];
        assert!(!all_of_uid(&mixed, Some(1)));
        assert!(!all_of_uid(&ours, None));
        assert!(!all_of_uid(&[], Some(1)));
        assert!(matches!(
            judge(proc_root, &mixed, Some(1), None),
            Holder::Stranger { uid: 2, .. }
        ));
        assert_eq!(judge(proc_root, &[], Some(1), None), Holder::Nobody);
    }

    #[test]
    fn a_listener_of_our_tree_is_own_and_of_another_process_a_strangers() {
        let proc_root = Path::new("/proc");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let me = std::process::id() as i32;
        let uid = nix::unistd::geteuid().as_raw();
        let other_uid = Some(uid.wrapping_add(1));
        // Of our tree, judged with another uid: own by its inode.
        assert_eq!(
            port_holder(proc_root, port, other_uid, Some(me)).expect("sock_diag"),
            Holder::Own
        );
        // Our uid is the instance's: own, whatever the tree.
        assert_eq!(
            port_holder(proc_root, port, Some(uid), None).expect("sock_diag"),
            Holder::Own
        );

        // The same listener judged against another tree (a child of ours that holds nothing).
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep");
        let holder =
            port_holder(proc_root, port, other_uid, Some(child.id() as i32)).expect("sock_diag");
        let _ = child.kill();
        let _ = child.wait();
        match holder {
            Holder::Stranger { pids, .. } => assert!(pids.contains(&me), "{pids:?}"),
            other => panic!("expected a stranger, got {other:?}"),
        }
        drop(listener);
        // A process another test forks holds a copy of every descriptor until it execs.
        let mut holder = Holder::Own;
        for _ in 0..500 {
            holder = port_holder(proc_root, port, None, Some(me)).expect("sock_diag");
            if holder == Holder::Nobody {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(holder, Holder::Nobody);
    }
}
