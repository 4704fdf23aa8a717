//! One registered instance as the registry holds it: its lifecycle, its current process, the
//! callers waiting for it, and how it is described to `tenctl` and the proxy.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tenement_proto::config::{ListenMode, Settings};
use tenement_proto::rpc::{Address, InstanceInfo, InstanceState, Route};
use tenement_proto::InstanceId;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::lifecycle::Lifecycle;
use crate::logs::LogBuffer;

use super::RpcError;

/// What a successful wake tells the caller.
#[derive(Debug, Clone)]
pub struct WakeOk {
    pub route: Route,
    pub started: bool,
    pub elapsed: Duration,
}

pub type WakeReply = oneshot::Sender<Result<WakeOk, RpcError>>;

/// Someone waiting for the instance to be ready.
pub struct Waiter {
    pub reply: WakeReply,
    pub since: Instant,
}

/// The running process of an instance.
pub struct Process {
    /// The exec helper: root of the tree and leader of its process group.
    pub pid: i32,
    /// Tasks tied to this process (readiness, output readers), aborted when it is gone.
    pub tasks: Vec<AbortHandle>,
    /// A stranger readiness found listening on the instance's port during this start (its
    /// uid and pids): set before the event that reports it, so an exit handled first still
    /// knows the app died of a squat, not of itself.
    pub squatter: SquatSeen,
    /// The cgroup's OOM kill count when this process started: a higher count at its exit
    /// means the OOM killer ended it.
    pub oom_baseline: Option<u64>,
}

/// A stranger seen on an instance's port: its uid and the pids holding the socket.
pub type SquatSeen = Arc<Mutex<Option<(u32, Vec<i32>)>>>;

pub struct Instance {
    pub id: InstanceId,
    pub lifecycle: Lifecycle,
    pub port: Option<u16>,
    /// The dynamic uid, once allocated.
    pub uid: Option<u32>,
    /// The uid the current or last process ran as, whatever chose it.
    pub run_uid: Option<u32>,
    /// The uid that owns the current process's listening TCP socket (the app's, or the
    /// supervisor's for a handed-off socket): the proxy checks every connection against it.
    pub listener_uid: Option<u32>,
    /// The accept queue of the current process's listener, as readiness saw it.
    pub listener_backlog: Option<u32>,
    pub weight: u32,
    pub created_ms: u64,
    /// Created by `auto_spawn` rather than by an operator (see `auto_spawn.rs`).
    pub auto: bool,
    /// Has answered a request with a 2xx or 3xx status at least once.
    pub proven: bool,
    /// Bumped at each spawn; events from older processes are ignored.
    pub generation: u64,
    pub process: Option<Process>,
    pub waiters: Vec<Waiter>,
    /// Whether the current start was made for a waiter (reported as `started`).
    pub start_began: Option<Instant>,
    pub logs: LogBuffer,
    pub last_exit: Option<String>,
    pub next_health: Option<Instant>,
    pub health_running: bool,
    /// Callers of `stop` waiting for the process to be gone.
    pub stop_waiters: Vec<oneshot::Sender<()>>,
    /// Set by `rm`: remove (and purge the data if true) once stopped.
    pub removal: Option<(bool, oneshot::Sender<Result<(), RpcError>>)>,
    /// The release it should run (see `releases.rs`); its next start runs this one.
    pub target: u32,
    /// The release its current or last process runs.
    pub release: Option<u32>,
    /// Kept on this release through rollouts (`tenctl pin`).
    pub pinned: Option<u32>,
    /// The release whose `migrate` last succeeded for it.
    pub migrated: Option<u32>,
    /// Moved by a rollout and not yet proven on `target`: where it goes back if it fails.
    pub trial: Option<u32>,
    /// Which step of a start the current process is.
    pub step: StartStep,
    /// The snapshot of the data directory kept for a release's `migrate`, if any.
    pub snapshot: Option<crate::state::SnapshotRecord>,
}

/// The steps of a start, each the instance's process in turn: the copy of its data directory
/// (`snapshot`), the release's `migrate`, then the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartStep {
    Snapshot,
    Migrate,
    App,
}

impl Instance {
    /// Whether its next start runs its target release's `migrate` first (if the release has
    /// one): migrations run forward, once per release; a tenant going back to an older
    /// release does not run that release's `migrate` again.
    pub fn migrate_due(&self) -> bool {
        self.migrated.is_none_or(|m| m < self.target)
    }
}

impl Instance {
    pub fn new(
        id: InstanceId,
        port: Option<u16>,
        weight: u32,
        created_ms: u64,
        now: Instant,
    ) -> Self {
        let logs = LogBuffer::for_instance(&id);
        Self {
            id,
            lifecycle: Lifecycle::new(now),
            port,
            uid: None,
            run_uid: None,
            listener_uid: None,
            listener_backlog: None,
            weight,
            created_ms,
            auto: false,
            proven: false,
            generation: 0,
            process: None,
            waiters: Vec::new(),
            start_began: None,
            logs,
            last_exit: None,
            next_health: None,
            health_running: false,
            stop_waiters: Vec::new(),
            removal: None,
            target: 1,
            release: None,
            pinned: None,
            migrated: None,
            trial: None,
            step: StartStep::App,
            snapshot: None,
        }
    }

    /// Where the instance is served under `listen`.
    pub fn address(&self, listen: ListenMode, settings: &Settings) -> Address {
        match listen {
            ListenMode::Unix => Address::Unix(served_socket_path(settings, &self.id)),
            ListenMode::Tcp | ListenMode::Activate => Address::Tcp(std::net::SocketAddr::from((
                std::net::Ipv4Addr::LOCALHOST,
                self.port.unwrap_or(0),
            ))),
        }
    }

    pub fn route(&self, address: Address) -> Route {
        Route {
            instance: self.id.clone(),
            state: self.lifecycle.state(),
            address,
            weight: self.weight,
            generation: self.generation,
            owner_uid: self.listener_uid,
            backlog: self.listener_backlog,
        }
    }

    /// `apps` maps a pid to its first child: the app under the exec helper.
    pub fn info(
        &self,
        address: Option<Address>,
        settings: &Settings,
        apps: &std::collections::HashMap<i32, i32>,
        now: Instant,
    ) -> InstanceInfo {
        let state = self.lifecycle.state();
        let running = state == InstanceState::Running;
        let health = if !running {
            "-".to_owned()
        } else if self.next_health.is_none() {
            "unchecked".to_owned()
        } else if self.lifecycle.health_failures() == 0 {
            "healthy".to_owned()
        } else {
            format!("failing ({})", self.lifecycle.health_failures())
        };
        InstanceInfo {
            instance: self.id.clone(),
            service: self.id.service.clone(),
            id: self.id.id.clone(),
            state,
            pid: self
                .process
                .as_ref()
                .map(|p| *apps.get(&p.pid).unwrap_or(&p.pid) as u32),
            address: address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            uptime_s: self
                .lifecycle
                .running_since()
                .map(|since| now.duration_since(since).as_secs()),
            idle_s: running.then(|| now.duration_since(self.lifecycle.last_activity()).as_secs()),
            restarts: self.lifecycle.restarts,
            health,
            in_flight: self.lifecycle.in_flight(),
            weight: self.weight,
            data_dir: settings
                .instance_data_dir(&self.id)
                .to_string_lossy()
                .into_owned(),
            // The registry fills in isolation, uid, cgroup, limits and usage.
            isolation: String::new(),
            uid: self.run_uid.or(self.uid),
            cgroup: None,
            limits: None,
            memory_bytes: None,
            pids: None,
            disk_bytes: None,
            cpu_seconds: None,
            last_exit: self.last_exit.clone(),
            reason: self.lifecycle.reason(),
            release: self.release,
            target_release: Some(self.target),
            pinned: self.pinned,
        }
    }
}

/// The instance's own runtime directory, for its sockets; in a namespace it is the only part
/// of `runtime_dir` the instance sees.
pub fn instance_runtime_dir(settings: &Settings, id: &InstanceId) -> PathBuf {
    // Both labels are [a-z0-9-], so the name cannot escape the directory.
    settings
        .runtime_dir
        .join("instances")
        .join(format!("{}.{}", id.service, id.id))
}

/// The Unix socket an instance with `listen = "unix"` binds (`SOCKET_PATH`), in its own
/// runtime directory, which it owns.
pub fn app_socket_path(settings: &Settings, id: &InstanceId) -> PathBuf {
    instance_runtime_dir(settings, id).join("http.sock")
}

/// Where the proxy connects to that socket: once the app is ready the supervisor moves it
/// into `runtime_dir/sockets/`, a directory only it can change, so the tenant can no longer
/// swap it for a symlink to somebody else's socket.
pub fn served_socket_path(settings: &Settings, id: &InstanceId) -> PathBuf {
    settings
        .runtime_dir
        .join("sockets")
        .join(format!("{}.{}.sock", id.service, id.id))
}

/// Where the copy of an instance's data directory taken before a `migrate` is kept, beside
/// the data directory (a tenant id never starts with a dot), and where it is copied first.
pub fn snapshot_paths(settings: &Settings, id: &InstanceId) -> (PathBuf, PathBuf) {
    let root = settings.data_dir.join(id.service.as_str());
    (
        root.join(format!(".{}.snapshot", id.id)),
        root.join(format!(".{}.snapshot.tmp", id.id)),
    )
}

/// The sd_notify socket of an instance with `ready = "notify"`.
pub fn notify_socket_path(settings: &Settings, id: &InstanceId) -> PathBuf {
    instance_runtime_dir(settings, id).join("notify.sock")
}
