//! Reading the process table from `/proc` (see proc(5)): parents, process groups and start
//! times. Used to find every descendant of an instance's exec helper, including daemons that
//! left its process group with setsid(2), and to recognise a process from before a restart
//! without trusting a recycled pid.
//!
//! It only reads; signalling is the caller's business.

use std::collections::HashMap;
use std::path::Path;

/// The fields of `/proc/PID/stat` tenement uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    /// Clock ticks since boot at which the process started: with the pid, a unique identity.
    pub start_time: u64,
    /// User and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident memory, in pages.
    pub rss_pages: u64,
}

/// Parses the content of `/proc/PID/stat`. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let pid = text[..open].trim().parse().ok()?;
    let close = text.rfind(')')?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let (cpu_ticks, rss_pages) = tenement_proto::usage::parse_stat_usage(text)?;
    Some(ProcStat {
        pid,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
        cpu_ticks,
        rss_pages,
    })
}

/// Reads one process's stat under `proc_root` (normally `/proc`).
pub fn read_stat(proc_root: &Path, pid: i32) -> Option<ProcStat> {
    use std::io::Read;
    // One open and one read: procfs hands the whole line (well under 2 KiB: 50 numbers and a
    // 16-byte name) to the first read, and a stop scans every process on the host, so the
    // probing reads and the stat call of fs::read_to_string add up (4-5 system calls each).
    let mut file = std::fs::File::open(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let mut buf = [0u8; 2048];
    let n = file.read(&mut buf).ok()?;
    // The name is whatever bytes the process chose: never skip a process for them.
    parse_stat(&String::from_utf8_lossy(&buf[..n]))
}

/// Every process currently visible under `proc_root`.
pub fn all_processes(proc_root: &Path) -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| read_stat(proc_root, pid))
        .collect()
}

/// Pids of every descendant of `root` (not `root` itself), and of every process in `root`'s
/// process group, from one snapshot of the table.
pub fn tree_of(processes: &[ProcStat], root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in processes {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Some(kids) = children.get(&pid) {
            for &kid in kids {
                if !found.contains(&kid) {
                    found.push(kid);
                    stack.push(kid);
                }
            }
        }
    }
    for p in processes {
        if p.pgid == root && p.pid != root && !found.contains(&p.pid) {
            found.push(p.pid);
        }
    }
    found
}

/// Pids of every descendant of `root` (not `root` itself), found by walking the kernel's
/// per-thread `children` lists (`/proc/PID/task/TID/children`, proc(5)): as many reads as the
/// tree has processes, where [`tree_of`] needs a snapshot of the whole host. `None` when the
/// kernel has no such lists (CONFIG_PROC_CHILDREN). The lists are not a consistent snapshot
/// while the tree forks and exits, so a caller that must not miss a process (to kill it, or
/// before calling a socket a stranger's) confirms with [`tree_of`].
pub fn descendants(proc_root: &Path, root: i32) -> Option<Vec<i32>> {
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for kid in children(proc_root, pid)? {
            if !found.contains(&kid) {
                found.push(kid);
                stack.push(kid);
            }
        }
    }
    Some(found)
}

/// The children of `pid` (of all its threads), from the kernel's `children` lists; empty when
/// the process is gone, `None` when the kernel keeps no such lists.
pub fn children(proc_root: &Path, pid: i32) -> Option<Vec<i32>> {
    let Ok(tasks) = std::fs::read_dir(proc_root.join(pid.to_string()).join("task")) else {
        return Some(Vec::new());
    };
    let mut kids = Vec::new();
    for task in tasks.filter_map(|e| e.ok()) {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => kids.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse::<i32>().ok()),
            ),
            // The thread exited meanwhile, or the kernel keeps no lists: tell which.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None
            }
            Err(_) => {}
        }
    }
    Some(kids)
}

/// Bytes `dir` takes on disk (allocated blocks of everything under it, symlinks not
/// followed), counting at most [`DISK_WALK_LIMIT`] entries so a huge tree cannot stall the
/// caller. 0 for a directory that does not exist.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        total += meta.blocks() * 512;
        seen += 1;
        if seen >= DISK_WALK_LIMIT {
            break;
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
    }
    total
}

/// The most entries [`disk_usage`] looks at.
pub const DISK_WALK_LIMIT: usize = 200_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_what_a_tree_takes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = disk_usage(dir.path());
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/one"), vec![1u8; 1 << 20]).expect("write");
        let used = disk_usage(dir.path());
        assert!(used >= empty + (1 << 20), "{empty} -> {used}");
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let text = "1234 (my (odd) app) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        let stat = parse_stat(text).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                pid: 1234,
                ppid: 1,
                pgid: 1234,
                start_time: 98765,
                cpu_ticks: 3,
                rss_pages: 10,
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_stat_is_readable() {
        let me = std::process::id() as i32;
        let stat = read_stat(Path::new("/proc"), me).expect("own stat");
        assert_eq!(stat.pid, me);
        assert!(stat.start_time > 0);
    }

    #[test]
    fn descendants_are_walked_through_the_children_lists() {
        use std::process::{Command, Stdio};
        // sh -> sleep, under this test process.
        let mut shell = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(shell.stdout.as_mut().expect("stdout")),
            &mut line,
        )
        .expect("read");
        let sleeper: i32 = line.trim().parse().expect("pid");
        let shell_pid = shell.id() as i32;
        let found = descendants(Path::new("/proc"), shell_pid).expect("children lists");
        let table = tree_of(&all_processes(Path::new("/proc")), shell_pid);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleeper),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!(found, vec![sleeper]);
        assert_eq!(table, vec![sleeper], "the full scan agrees");
        assert_eq!(
            children(Path::new("/proc"), i32::MAX),
            Some(Vec::new()),
            "no such process"
        );
    }

    #[test]
    fn tree_includes_reparented_descendants_and_group_members() {
        let p = |pid, ppid, pgid| ProcStat {
            pid,
            ppid,
            pgid,
            start_time: 1,
            cpu_ticks: 0,
            rss_pages: 0,
        };
        let table = vec![
            p(10, 1, 10),  // helper
            p(11, 10, 10), // app
            p(12, 11, 10), // app's worker
            p(13, 10, 13), // daemon that called setsid, adopted by the helper
            p(14, 1, 10),  // orphan still in the group
            p(20, 1, 20),  // unrelated
        ];
        let mut tree = tree_of(&table, 10);
        tree.sort();
        assert_eq!(tree, vec![11, 12, 13, 14]);
    }
}
