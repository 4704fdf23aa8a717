//! cgroup v2: one cgroup per instance under the supervisor's own delegated subtree.
//!
//! Under systemd (`Delegate=yes`) the supervisor's service cgroup is its to manage. cgroup v2
//! forbids processes in a cgroup that delegates controllers to children ("no internal
//! processes"), so the supervisor first moves itself into a leaf, `supervisor/`, then enables
//! the controllers it was given for `instances/`, where each instance gets `SERVICE.ID/` with its
//! limits and `memory.oom.group = 1` (an OOM kills that tenant whole, nothing else). Stopping
//! uses `cgroup.kill`, which leaves no process behind.
//!
//! Where no writable cgroup v2 exists (a laptop, a container) the supervisor falls back to
//! process groups, says so once at start, and `tenctl status` shows the mode. Every path is
//! taken relative to a root given to [`Cgroups::at`], so tests run against a temp dir.
//! See <https://docs.kernel.org/admin-guide/cgroup-v2.html>.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::lock;
use tenement_proto::config::Limits;
use tenement_proto::InstanceId;

/// The controllers tenement uses, when the parent grants them.
const WANTED: &[&str] = &["cpu", "memory", "pids"];

/// The supervisor's subtree and what it may control there.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// The supervisor's own cgroup directory (the delegated one).
    base: PathBuf,
    /// Controllers enabled for instances.
    pub controllers: Vec<String>,
    /// Instance cgroups waiting to be removed once empty. A start of the same instance takes
    /// its name out (under this lock) before it prepares the directory, and a removal only
    /// happens under the lock while the name is still in: a removal can never delete the
    /// directory a new start just prepared.
    removals: Arc<Mutex<HashSet<String>>>,
}

/// How instances are contained: what `tenctl status` reports.
#[derive(Debug, Clone)]
pub enum Containment {
    Cgroups(Cgroups),
    /// No writable cgroup v2: process groups only, with the reason.
    ProcessGroups(String),
}

impl Containment {
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroups(c) if c.controllers.is_empty() => {
                "cgroup (no controllers delegated: limits unavailable)".to_owned()
            }
            Containment::Cgroups(c) => format!("cgroup ({})", c.controllers.join(", ")),
            Containment::ProcessGroups(_) => "process-group".to_owned(),
        }
    }

    pub fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Containment::Cgroups(c) => Some(c),
            Containment::ProcessGroups(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {action}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub action: &'static str,
    #[source]
    pub source: io::Error,
}

fn err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError {
        path,
        action,
        source,
    }
}

/// Finds the supervisor's cgroup v2 directory from `/proc/self/cgroup` and the cgroup2 mount in
/// `/proc/self/mountinfo` (which is `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// hosts).
pub fn own_cgroup_dir() -> Result<PathBuf, String> {
    let cgroup =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let relative = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 membership in /proc/self/cgroup")?
        .trim()
        .to_owned();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == "cgroup2")
                .then(|| before.split_whitespace().nth(4).map(str::to_owned))?
        })
        .ok_or("no cgroup2 file system is mounted")?;
    Ok(PathBuf::from(mount).join(relative.trim_start_matches('/')))
}

impl Cgroups {
    /// Sets up the subtree at `base` (the supervisor's own cgroup): moves `pid` into
    /// `base/supervisor`, enables what it can of [`WANTED`] for `base/instances`.
    pub fn at(base: &Path, pid: u32) -> Result<Cgroups, CgroupError> {
        let leaf = base.join("supervisor");
        mkdir(&leaf)?;
        let procs = leaf.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .map_err(err(&procs, "move the supervisor into its leaf"))?;
        // Anything else left in the base (a previous supervisor's threads cannot be, but
        // helpers of a crashed one could) goes to the leaf too, or subtree_control fails.
        if let Ok(left) = fs::read_to_string(base.join("cgroup.procs")) {
            for other in left.split_whitespace() {
                let _ = fs::write(&procs, other);
            }
        }
        let available = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        let controllers: Vec<String> = WANTED
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| (*c).to_owned())
            .collect();
        let instances = base.join("instances");
        mkdir(&instances)?;
        if !controllers.is_empty() {
            let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
            for dir in [base, instances.as_path()] {
                let control = dir.join("cgroup.subtree_control");
                fs::write(&control, enable.trim()).map_err(err(&control, "enable controllers"))?;
            }
        }
        Ok(Cgroups {
            base: base.to_path_buf(),
            controllers,
            removals: Arc::default(),
        })
    }

    /// The directory of one instance's cgroup.
    pub fn instance_dir(&self, id: &InstanceId) -> PathBuf {
        // Both labels are [a-z0-9-]: the name cannot leave the directory.
        self.base
            .join("instances")
            .join(format!("{}.{}", id.service, id.id))
    }

    /// Creates (or empties and reuses) the instance's cgroup and writes its limits. Limits for a
    /// controller that was not delegated are skipped; [`Self::unenforced`] names them.
    pub fn prepare(&self, id: &InstanceId, limits: &Limits) -> Result<PathBuf, CgroupError> {
        let mut removals = lock(&self.removals);
        removals.remove(&id.to_string());
        let dir = self.instance_dir(id);
        if dir.exists() {
            self.kill(id);
        } else {
            mkdir(&dir)?;
        }
        let has = |c: &str| self.controllers.iter().any(|x| x == c);
        let mut writes: Vec<(&str, String)> = Vec::new();
        if has("memory") {
            writes.push(("memory.oom.group", "1".to_owned()));
            writes.push((
                "memory.max",
                limits
                    .memory_max
                    .map_or("max".to_owned(), |v| v.to_string()),
            ));
            writes.push((
                "memory.high",
                limits
                    .memory_high
                    .map_or("max".to_owned(), |v| v.to_string()),
            ));
        }
        if has("pids") {
            writes.push((
                "pids.max",
                limits.pids_max.map_or("max".to_owned(), |v| v.to_string()),
            ));
        }
        if has("cpu") {
            writes.push(("cpu.weight", limits.cpu_weight.unwrap_or(100).to_string()));
            let quota = limits.cpu_max_percent.map_or("max 100000".to_owned(), |p| {
                format!("{} 100000", u64::from(p) * 1000)
            });
            writes.push(("cpu.max", quota));
        }
        for (file, value) in writes {
            let path = dir.join(file);
            fs::write(&path, &value).map_err(err(&path, "write a limit"))?;
        }
        Ok(dir)
    }

    /// Limits configured for a controller this subtree does not have.
    pub fn unenforced(&self, limits: &Limits) -> Vec<&'static str> {
        let has = |c: &str| self.controllers.iter().any(|x| x == c);
        let mut missing = Vec::new();
        if !has("memory") && (limits.memory_max.is_some() || limits.memory_high.is_some()) {
            missing.push("memory");
        }
        if !has("pids") && limits.pids_max.is_some() {
            missing.push("pids");
        }
        if !has("cpu") && (limits.cpu_weight.is_some() || limits.cpu_max_percent.is_some()) {
            missing.push("cpu");
        }
        missing
    }

    /// Kills every process of the instance (cgroup.kill, Linux 5.14+; else SIGKILL to each).
    pub fn kill(&self, id: &InstanceId) {
        let dir = self.instance_dir(id);
        if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids(id) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Processes in the instance's cgroup.
    pub fn pids(&self, id: &InstanceId) -> Vec<i32> {
        fs::read_to_string(self.instance_dir(id).join("cgroup.procs"))
            .map(|t| {
                t.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Marks `id`'s cgroup for removal; [`Cgroups::remove_when_empty`] then removes it unless
    /// a start of the same instance prepares it first. Called before the removal is handed to
    /// another thread, so a start that comes after it always wins.
    pub fn begin_removal(&self, id: &InstanceId) {
        lock(&self.removals).insert(id.to_string());
    }

    /// Removes the instance's cgroup once it is empty (rmdir of a cgroup with processes fails),
    /// waiting up to `within` for cgroup.kill to finish, unless a start took it over meanwhile
    /// (see [`Cgroups::begin_removal`]). Blocking: call off the event loop.
    pub fn remove_when_empty(&self, id: &InstanceId, within: std::time::Duration) {
        let name = id.to_string();
        let dir = self.instance_dir(id);
        let deadline = std::time::Instant::now() + within;
        loop {
            {
                let mut removals = lock(&self.removals);
                // A new start took it over: leave it.
                if !removals.contains(&name) {
                    return;
                }
                if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    removals.remove(&name);
                    return;
                }
                if std::time::Instant::now() >= deadline {
                    removals.remove(&name);
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Current usage: (memory.current bytes, pids.current).
    pub fn usage(&self, id: &InstanceId) -> (Option<u64>, Option<u64>) {
        let read = |file: &str| {
            fs::read_to_string(self.instance_dir(id).join(file))
                .ok()
                .and_then(|t| t.trim().parse().ok())
        };
        (read("memory.current"), read("pids.current"))
    }

    /// Processes of the instance the OOM killer has killed (`oom_kill` of memory.events), the
    /// counter of the cgroup's whole life: compare two readings.
    pub fn oom_kills(&self, id: &InstanceId) -> Option<u64> {
        self.keyed(id, "memory.events", "oom_kill")
    }

    /// CPU time the instance's cgroup has used (`usage_usec` of cpu.stat, present with or
    /// without the cpu controller), in seconds.
    pub fn cpu_seconds(&self, id: &InstanceId) -> Option<f64> {
        self.keyed(id, "cpu.stat", "usage_usec")
            .map(|us| us as f64 / 1e6)
    }

    /// One value of a flat keyed file of the instance's cgroup (`key value` lines).
    fn keyed(&self, id: &InstanceId, file: &str, key: &str) -> Option<u64> {
        let text = fs::read_to_string(self.instance_dir(id).join(file)).ok()?;
        text.lines().find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            (name == key).then(|| value.trim().parse().ok())?
        })
    }

    /// Kills and removes instance cgroups left by a previous supervisor.
    pub fn clean_leftovers(&self) -> usize {
        let Ok(entries) = fs::read_dir(self.base.join("instances")) else {
            return 0;
        };
        let mut cleaned = 0;
        for entry in entries.filter_map(Result::ok) {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            // cgroup.kill is asynchronous; give the kernel a moment before rmdir.
            for _ in 0..100 {
                if fs::remove_dir(&dir).is_ok() {
                    cleaned += 1;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        cleaned
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(path, "create")(e)),
    }
}

/// Sets up cgroups for the supervisor if its cgroup was delegated to it, else explains why not.
///
/// Delegation is what systemd marks with the `trusted.delegate` (or `user.delegate`) extended
/// attribute for `Delegate=yes`; without it the cgroup belongs to someone else (the root
/// cgroup, a login session) and tenement keeps out of it.
pub fn detect(pid: u32) -> Containment {
    let base = match own_cgroup_dir() {
        Ok(base) => base,
        Err(reason) => return Containment::ProcessGroups(reason),
    };
    let delegated = ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|name| crate::sys::has_xattr(&base, name));
    if !delegated {
        return Containment::ProcessGroups(format!(
            "cgroup {} is not delegated to tenement (run it from systemd with Delegate=yes)",
            base.display()
        ));
    }
    match Cgroups::at(&base, pid) {
        Ok(cgroups) => Containment::Cgroups(cgroups),
        Err(e) => Containment::ProcessGroups(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroupfs: plain files where the kernel would have virtual ones.
    fn fake(controllers: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("cgroup.controllers"), controllers).expect("write");
        fs::write(dir.path().join("cgroup.procs"), "").expect("write");
        fs::write(dir.path().join("cgroup.subtree_control"), "").expect("write");
        dir
    }

    fn id() -> InstanceId {
        InstanceId::parse("notes:alice").expect("valid")
    }

    #[test]
    fn setup_moves_the_supervisor_to_a_leaf_and_enables_what_it_was_given() {
        let root = fake("cpuset cpu io memory pids");
        // The kernel would create these files in new cgroups; the fake needs them up front.
        let cg = {
            fs::create_dir(root.path().join("instances")).expect("mkdir");
            fs::write(root.path().join("instances/cgroup.subtree_control"), "").expect("write");
            Cgroups::at(root.path(), 4242).expect("setup")
        };
        assert_eq!(cg.controllers, vec!["cpu", "memory", "pids"]);
        let procs = fs::read_to_string(root.path().join("supervisor/cgroup.procs")).expect("read");
        assert_eq!(procs, "4242");
        let control = fs::read_to_string(root.path().join("cgroup.subtree_control")).expect("read");
        assert_eq!(control, "+cpu +memory +pids");
    }

    #[test]
    fn limits_are_written_in_cgroup_v2_syntax() {
        let root = fake("memory pids cpu");
        fs::create_dir(root.path().join("instances")).expect("mkdir");
        fs::write(root.path().join("instances/cgroup.subtree_control"), "").expect("write");
        let cg = Cgroups::at(root.path(), 1).expect("setup");
        let limits = Limits {
            memory_max: Some(64 << 20),
            memory_high: None,
            cpu_weight: Some(50),
            cpu_max_percent: Some(150),
            pids_max: Some(32),
            nofile: None,
            nproc: None,
            tmp_size: None,
        };
        let dir = cg.prepare(&id(), &limits).expect("prepare");
        let read = |f: &str| fs::read_to_string(dir.join(f)).expect(f);
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.high"), "max");
        assert_eq!(read("memory.oom.group"), "1");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.weight"), "50");
        assert_eq!(read("cpu.max"), "150000 100000");
        assert!(dir.ends_with("instances/notes.alice"));
    }

    #[test]
    fn oom_kills_and_cpu_time_are_read_from_the_keyed_files() {
        let root = fake("memory");
        fs::create_dir(root.path().join("instances")).expect("mkdir");
        fs::write(root.path().join("instances/cgroup.subtree_control"), "").expect("write");
        let cg = Cgroups::at(root.path(), 1).expect("setup");
        let dir = cg.prepare(&id(), &Limits::default()).expect("prepare");
        assert_eq!(cg.oom_kills(&id()), None, "no memory.events yet");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 1\n",
        )
        .expect("write");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n",
        )
        .expect("write");
        assert_eq!(cg.oom_kills(&id()), Some(2));
        assert_eq!(cg.cpu_seconds(&id()), Some(1.5));
    }

    #[test]
    fn missing_controllers_are_named_not_written() {
        let root = fake("");
        fs::create_dir(root.path().join("instances")).expect("mkdir");
        let cg = Cgroups::at(root.path(), 1).expect("setup");
        assert!(cg.controllers.is_empty());
        let limits = Limits {
            memory_max: Some(1),
            pids_max: Some(2),
            ..Limits::default()
        };
        assert_eq!(cg.unenforced(&limits), vec!["memory", "pids"]);
        let dir = cg.prepare(&id(), &limits).expect("prepare");
        assert!(!dir.join("memory.max").exists());
        assert_eq!(
            Containment::Cgroups(cg).describe(),
            "cgroup (no controllers delegated: limits unavailable)"
        );
    }
}
