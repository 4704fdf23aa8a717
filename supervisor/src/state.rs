//! The registry on disk: which instances exist, their ports and weights.
//!
//! Written atomically (temp file in the same directory, fsync, rename, fsync of the directory)
//! so a crash or power cut leaves the old file or the new one, never half of either. The
//! process ids of running instances are kept apart, one small file per instance under
//! `state_dir/pids/`, so waking an instance never rewrites the whole registry; after a
//! supervisor crash they name the leftovers to kill (checked by start time, never by pid
//! alone).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenement_proto::{InstanceId, ServiceName};

use crate::releases::History;
use crate::rollout::Rollout;
use crate::tokens::StoredToken;

use crate::procfs;

/// 3: releases and rollouts per service, each instance's release, target, pin and last
/// migration. Version 2 files (weights, no releases) are read as they are: every service gets
/// its first release from the config and every instance runs it. Version 1 files (every
/// weight the 1 nothing could change) are read with their weights made 100. Both are written
/// back as version 3 at the next save.
///
/// 4: the management API's tokens (hashes only). A version 3 file has none and is read as it
/// is; a supervisor of version 3 refuses a version 4 file rather than drop its tokens.
const STATE_VERSION: u32 = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub instances: Vec<PersistedInstance>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<ServiceName, PersistedService>,
    /// The management API's tokens, hashed (`tokens.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<StoredToken>,
}

/// A service's releases and its latest rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedService {
    pub history: History,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedInstance {
    pub instance: InstanceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The uid given to a `user = "dynamic"` instance, kept so it owns its data for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Created by `auto_spawn` (a request for an unknown tenant), not by an operator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto: bool,
    /// Has answered a request with a 2xx or 3xx status at least once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proven: bool,
    /// The release it should run; `None` in version 2 files: the service's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u32>,
    /// The release its last process ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<u32>,
    /// The release whose `migrate` last succeeded for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated: Option<u32>,
    /// Moved by a rollout and not yet proven on its target: the release to go back to if it
    /// fails there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRecord>,
}

/// A copy of an instance's data directory taken before a release's `migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The release whose `migrate` ran after it.
    pub release: u32,
    /// The instance's last migrated release when the copy was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated: Option<u32>,
    /// Taken while the instance was on trial for that release (moved by a rollout): only
    /// such a copy is ever put back, and only if that trial fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_trial: bool,
    /// The instance failed on that release: its next start puts the copy back first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read registry {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("registry {path} is corrupt: {source}; move it away to start with an empty registry")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "registry {path} has version {version}, this supervisor reads version {STATE_VERSION}"
    )]
    Version { path: PathBuf, version: u32 },
    #[error("cannot write registry {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The registry file and the pid files beside it.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Creates the state directory (0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let write_err = |source| StateError::Write {
            path: dir.to_path_buf(),
            source,
        };
        create_private_dir(&dir.join("pids")).map_err(write_err)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// The saved registry, or an empty one when there is none yet.
    pub fn load(&self) -> Result<StateFile, StateError> {
        let path = self.registry_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(StateFile {
                    version: STATE_VERSION,
                    instances: Vec::new(),
                    services: BTreeMap::new(),
                    tokens: Vec::new(),
                })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let mut state: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.version == 1 {
            for instance in &mut state.instances {
                instance.weight = tenement_proto::rpc::DEFAULT_WEIGHT;
            }
            state.version = 2;
        }
        if state.version == 2 || state.version == 3 {
            state.version = STATE_VERSION;
        }
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path,
                version: state.version,
            });
        }
        Ok(state)
    }

    /// Replaces the registry atomically.
    pub fn save(
        &self,
        instances: &[PersistedInstance],
        services: &BTreeMap<ServiceName, PersistedService>,
        tokens: &[StoredToken],
    ) -> Result<(), StateError> {
        /// [`StateFile`], borrowed: the registry is written without copying its releases.
        #[derive(Serialize)]
        struct Borrowed<'a> {
            version: u32,
            instances: &'a [PersistedInstance],
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            services: &'a BTreeMap<ServiceName, PersistedService>,
            #[serde(skip_serializing_if = "<[StoredToken]>::is_empty")]
            tokens: &'a [StoredToken],
        }
        let path = self.registry_path();
        let state = Borrowed {
            version: STATE_VERSION,
            instances,
            services,
            tokens,
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| StateError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomically(&path, &bytes).map_err(|source| StateError::Write { path, source })
    }

    fn pid_path(&self, instance: &InstanceId) -> PathBuf {
        // Both halves are DNS labels, so the name cannot escape the directory.
        self.dir
            .join("pids")
            .join(format!("{}.{}", instance.service, instance.id))
    }

    /// Remembers the exec helper of a running instance. Not fsynced: after a power cut no
    /// process is left to clean up anyway.
    pub fn record_process(
        &self,
        instance: &InstanceId,
        pid: i32,
        start_time: u64,
    ) -> io::Result<()> {
        let path = self.pid_path(instance);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, format!("{pid} {start_time}\n"))?;
        fs::rename(&tmp, &path)
    }

    pub fn forget_process(&self, instance: &InstanceId) {
        let _ = fs::remove_file(self.pid_path(instance));
    }

    /// Kills process trees left by a previous supervisor that died without stopping them.
    ///
    /// A pid file is trusted only as far as the process it names proves it: a regular file
    /// (not a symlink) in our own `pids/`, naming a process that still has the recorded start
    /// time, leads its own process group, and runs the exec helper (`tenement-exec`, also
    /// when an upgrade replaced the binary). Anything else is deleted and nothing is killed,
    /// so a planted file can never make the supervisor kill a process it did not start.
    /// Returns the pids killed.
    pub fn kill_leftovers(&self, proc_root: &Path) -> Vec<i32> {
        let mut killed = Vec::new();
        let Ok(entries) = fs::read_dir(self.dir.join("pids")) else {
            return killed;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let regular = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
            let recorded = regular
                .then(|| fs::read_to_string(&path).ok())
                .flatten()
                .and_then(|text| parse_pid_file(&text));
            if let Some((pid, start_time)) = recorded {
                if is_our_helper(proc_root, pid, start_time) {
                    let processes = procfs::all_processes(proc_root);
                    let mut tree = procfs::tree_of(&processes, pid);
                    tree.push(pid);
                    for p in &tree {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(*p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    killed.extend(tree);
                } else if procfs::read_stat(proc_root, pid).is_some() {
                    tracing::warn!(
                        pid,
                        file = %path.display(),
                        "a pid file names a process that is not an exec helper this supervisor started; left alone"
                    );
                }
            }
            let _ = fs::remove_file(&path);
        }
        killed
    }
}

/// Whether `pid` is an exec helper started at `start_time`: same start time, leader of its
/// own process group (the supervisor starts each helper in a new group), and its executable is
/// `tenement-exec` (" (deleted)" after an upgrade replaced it).
fn is_our_helper(proc_root: &Path, pid: i32, start_time: u64) -> bool {
    let Some(stat) = procfs::read_stat(proc_root, pid) else {
        return false;
    };
    if stat.start_time != start_time || stat.pgid != pid {
        return false;
    }
    fs::read_link(proc_root.join(pid.to_string()).join("exe")).is_ok_and(|exe| {
        exe.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|name| name.starts_with(crate::exec_helper::HELPER_NAME))
    })
}

/// Creates `path` 0700, and any missing parents 0755: a shared parent such as
/// /var/lib/tenement must stay traversable for instances reaching their data directories.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

fn parse_pid_file(text: &str) -> Option<(i32, u64)> {
    let mut parts = text.split_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub use tenement_proto::atomic::write_atomically;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, port: u16) -> PersistedInstance {
        PersistedInstance {
            instance: InstanceId::parse(name).expect("valid"),
            port: Some(port),
            weight: 1,
            created_ms: 1,
            uid: None,
            auto: false,
            proven: false,
            target: None,
            release: None,
            pinned: None,
            migrated: None,
            trial: None,
            snapshot: None,
        }
    }

    #[test]
    fn a_version_1_registry_is_read_with_weights_of_100() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let v1 = r#"{"version":1,"instances":[{"instance":"notes:alice","port":20001,"weight":1,"created_ms":5}]}"#;
        fs::write(store.registry_path(), v1).expect("write");
        let state = store.load().expect("load");
        assert_eq!(state.version, STATE_VERSION);
        assert_eq!(state.instances[0].weight, 100);
        assert_eq!(state.instances[0].port, Some(20001));
    }

    #[test]
    fn registry_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        assert!(store.load().expect("empty").instances.is_empty());
        store
            .save(
                &[entry("notes:alice", 20001), entry("notes:bob", 20002)],
                &BTreeMap::new(),
                &[],
            )
            .expect("save");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.instances.len(), 2);
        assert_eq!(loaded.instances[1].port, Some(20002));
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    }

    #[test]
    fn a_corrupt_registry_is_an_error_not_an_empty_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        fs::write(store.registry_path(), b"{\"version\":1,\"instan").expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }

    #[test]
    fn pid_files_with_a_recycled_pid_are_not_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        let me = std::process::id() as i32;
        // Our own pid with a start time that is not ours: must be left alone.
        store
            .record_process(&InstanceId::parse("notes:alice").expect("valid"), me, 1)
            .expect("record");
        assert!(store.kill_leftovers(Path::new("/proc")).is_empty());
        assert!(fs::read_dir(dir.path().join("pids"))
            .expect("list")
            .next()
            .is_none());
    }

    #[test]
    fn a_planted_pid_file_naming_another_process_kills_nothing() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path()).expect("open");
        // A process with the right start time, leading its own group, but not an exec helper:
        // what a tenant could name if it could write into pids/.
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = victim.id() as i32;
        let stat = procfs::read_stat(Path::new("/proc"), pid).expect("stat");
        store
            .record_process(
                &InstanceId::parse("state:pids").expect("valid"),
                pid,
                stat.start_time,
            )
            .expect("record");
        let killed = store.kill_leftovers(Path::new("/proc"));
        let alive = victim.try_wait().expect("wait").is_none();
        let _ = victim.kill();
        let _ = victim.wait();
        assert!(killed.is_empty(), "killed {killed:?}");
        assert!(alive, "the planted pid's process was killed");

        // A symlink in pids/ is never followed.
        fs::create_dir_all(dir.path().join("pids")).expect("pids");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("pids/evil.link")).expect("ln");
        assert!(store.kill_leftovers(Path::new("/proc")).is_empty());
    }
}
