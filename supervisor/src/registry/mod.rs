//! The registry: the one owner of every instance's state.
//!
//! An actor fed by a bounded channel of [`Command`]s: RPC handlers send requests, the tasks
//! watching processes send events, a ticker checks deadlines. Nothing else holds instance state,
//! so there is no lock to hold across an `.await`. The lifecycle policy is the pure
//! [`Lifecycle`](crate::lifecycle::Lifecycle); this module carries out its actions
//! (see `process.rs`) and answers callers.

mod access;
mod auto_spawn;
mod fleet;
mod instance;
mod isolation;
mod process;
mod releases;
mod weights;

pub use weights::{check_weight, DeployPlan, Weighing};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenement_proto::config::{Config, ListenMode, Service};
use tenement_proto::rpc::{
    ActivityReport, ErrorCode, InstanceInfo, InstanceUsage, LogLine, Response, RestartReason,
    Route, ServiceStats, WeightChange, DEFAULT_WEIGHT,
};
use tenement_proto::{InstanceId, ServiceName};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cgroup::Containment;
use crate::lifecycle::{Event, Policy};
use crate::ports::PortAllocator;
use crate::state::{PersistedInstance, StateStore};

use crate::tokens::Grant;
pub use access::{ListPage, TokenCall, MAX_PAGE};
pub use instance::WakeOk;
use instance::{Instance, Waiter, WakeReply};
use tenement_proto::auth::{Scope, Secret};
use tenement_proto::rpc::ListQuery;

/// How often deadlines (startup, grace, backoff, idle, health) are checked.
const TICK: Duration = Duration::from_millis(50);
/// Routes per `Routes` frame in a snapshot, to stay well below the frame limit.
const SNAPSHOT_CHUNK: usize = 500;
/// The longest any wake may wait.
pub const MAX_WAKE_WAIT: Duration = Duration::from_secs(120);

/// An RPC-level error: a typed code and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn unknown(id: &InstanceId) -> Self {
        Self::new(
            ErrorCode::UnknownInstance,
            format!("{id} is not registered; add it with `tenctl add {id}`"),
        )
    }
}

/// What a `logs` call gets: the buffered lines and, with `follow`, the live feed.
pub struct LogsReply {
    pub lines: Vec<LogLine>,
    pub follow: Option<broadcast::Receiver<LogLine>>,
}

type Reply<T> = oneshot::Sender<Result<T, RpcError>>;

/// Everything the registry can be told.
pub enum Command {
    Add {
        instances: Vec<InstanceId>,
        reply: Reply<(Vec<InstanceId>, Vec<InstanceId>)>,
    },
    /// `register`: add the instance first if missing (spawn, or auto_spawn services).
    Wake {
        instance: InstanceId,
        register: bool,
        /// `spawn` is an operator's act: it also clears `failed`.
        reset_failed: bool,
        reply: WakeReply,
    },
    Stop {
        instance: InstanceId,
        reply: Reply<()>,
    },
    Restart {
        instance: InstanceId,
        reply: WakeReply,
    },
    Remove {
        instance: InstanceId,
        purge: bool,
        reply: Reply<()>,
    },
    /// The instances `scope` covers that match `query`, in id order.
    List {
        scope: Scope,
        query: ListQuery,
        reply: oneshot::Sender<ListPage>,
    },
    /// Check a management API credential from `peer`.
    Authenticate {
        credential: Secret,
        peer: Option<std::net::IpAddr>,
        reply: Reply<Grant>,
    },
    /// Whether a grant's token (and session) is still there and unexpired, for streams.
    StillValid {
        grant: Grant,
        reply: oneshot::Sender<bool>,
    },
    /// Tokens and sessions (`access.rs`).
    Tokens {
        call: TokenCall,
        reply: Reply<Response>,
    },
    /// `weight` and `route`.
    Weigh {
        weighing: Weighing,
        reply: Reply<Vec<WeightChange>>,
    },
    /// The first step of `deploy`: register the instance with weight 0 if it is new.
    PrepareDeploy {
        instance: InstanceId,
        reply: Reply<DeployPlan>,
    },
    /// `release`, `releases`, `rollout`, `rollback` and `pin`.
    Releases {
        call: ReleaseCall,
        reply: Reply<Response>,
    },
    /// Counters per service and, with `instances`, the usage of every running instance.
    Stats {
        instances: bool,
        reply: oneshot::Sender<(Vec<ServiceStats>, Vec<InstanceUsage>)>,
    },
    Status {
        instance: InstanceId,
        reply: Reply<InstanceInfo>,
    },
    /// The fleet agent's word: what is placed here, true for `valid_ms` (`fleet.rs`).
    FleetOwn {
        owned: Vec<tenement_proto::rpc::FleetOwned>,
        valid_ms: u64,
        peers: Option<Vec<tenement_proto::rpc::FleetPeer>>,
        reply: Reply<(u32, Vec<InstanceId>)>,
    },
    Logs {
        instance: InstanceId,
        lines: Option<usize>,
        follow: bool,
        reply: Reply<LogsReply>,
    },
    Resolve {
        instance: InstanceId,
        reply: Reply<Route>,
    },
    Subscribe {
        tx: mpsc::Sender<Response>,
        reply: oneshot::Sender<u64>,
    },
    Unsubscribe {
        watcher: u64,
    },
    Activity {
        reports: Vec<ActivityReport>,
    },
    ParkAck {
        watcher: u64,
        instance: InstanceId,
        park_id: u64,
        accepted: bool,
    },
    /// Re-read the config file (SIGHUP or `tenctl reload`).
    Reload {
        reply: Reply<Reloaded>,
    },
    /// Counts for systemd's STATUS= line; answering it also proves the actor is alive.
    Counts {
        reply: oneshot::Sender<Counts>,
    },
    /// From the tasks watching a process.
    Process(ProcessEvent),
}

/// The release calls, as the registry takes them.
pub enum ReleaseCall {
    Release {
        service: ServiceName,
        options: tenement_proto::rpc::RolloutOptions,
    },
    Releases {
        service: ServiceName,
    },
    Rollout {
        service: ServiceName,
        action: tenement_proto::rpc::RolloutAction,
    },
    Rollback {
        service: ServiceName,
        to: Option<u32>,
        options: tenement_proto::rpc::RolloutOptions,
    },
    Pin {
        instance: InstanceId,
        release: Option<u32>,
    },
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<ServiceName>,
    pub changed: Vec<ServiceName>,
    pub removed: Vec<ServiceName>,
}

/// How many instances are in each interesting state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub registered: usize,
    pub running: usize,
    pub starting: usize,
    pub failed: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} running, {} waking, {} failed, {} registered",
            self.running, self.starting, self.failed, self.registered
        )
    }
}

/// Events about one process generation of an instance.
pub struct ProcessEvent {
    pub instance: InstanceId,
    pub generation: u64,
    pub kind: ProcessEventKind,
}

pub enum ProcessEventKind {
    /// The instance is ready; `backlog` is its listener's accept queue when readiness saw it
    /// (a TCP port the app binds), sent on to the proxy with the route.
    Ready {
        backlog: Option<u32>,
    },
    Exited(String),
    Health(Result<u16, String>),
    /// A listener on the instance's port is not the instance's own (readiness found it).
    PortTaken {
        port: u16,
        uid: u32,
        pids: Vec<i32>,
    },
}

/// A cheap, cloneable way to talk to the registry.
#[derive(Clone)]
pub struct RegistryHandle {
    tx: mpsc::Sender<Command>,
    /// On a `[fleet]` host: the fleet agent's control socket, where the fleet calls go
    /// (`[fleet]` cannot come or go without a restart).
    pub fleet_socket: Option<std::path::PathBuf>,
}

impl RegistryHandle {
    /// Sends a command built around a fresh reply channel and waits for the answer.
    pub async fn ask<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RpcError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(build(reply)).await.map_err(|_| {
            RpcError::new(ErrorCode::Unavailable, "the supervisor is shutting down")
        })?;
        rx.await
            .map_err(|_| RpcError::new(ErrorCode::Unavailable, "the supervisor is shutting down"))
    }

    pub async fn send(&self, command: Command) {
        let _ = self.tx.send(command).await;
    }
}

/// What `stats` counts per service.
#[derive(Debug, Clone, Default)]
struct ServiceCounters {
    /// Indexed by `RestartReason as usize`.
    restarts: [u64; RestartReason::ALL.len()],
    oom_kills: u64,
}

struct Watcher {
    tx: mpsc::Sender<Response>,
}

/// A park request sent to every watcher, waiting for all of them.
struct PendingPark {
    waiting_for: HashSet<u64>,
}

pub struct Registry {
    config: Arc<Config>,
    store: StateStore,
    ports: PortAllocator,
    instances: HashMap<InstanceId, Instance>,
    /// Instances whose lifecycle needs ticks.
    active: HashSet<InstanceId>,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher: u64,
    parks: HashMap<(InstanceId, u64), PendingPark>,
    /// Starts every instance's exec helper (see spawn.rs).
    exec: crate::spawn::ExecServer,
    /// Cgroups or process groups: how instances are contained and stopped.
    containment: Containment,
    /// Whether the supervisor runs as root (namespaces and users need it).
    is_root: bool,
    /// What the config was validated against, for reloads.
    environment: tenement_proto::config::Environment,
    /// The nftables rules that keep tenants off each other's ports (root only).
    firewall: Option<crate::firewall::Firewall>,
    /// The owners last given to the firewall.
    firewall_owners: BTreeSet<(u32, u16)>,
    /// When `auto_spawn.rs` next looks for expired auto-spawned instances.
    next_sweep: Option<Instant>,
    /// Services whose unenforceable limits were already warned about.
    warned_limits: HashSet<tenement_proto::ServiceName>,
    /// Restarts and OOM kills per service since this supervisor started (`stats`).
    counters: HashMap<ServiceName, ServiceCounters>,
    /// Each service's releases and latest rollout (`releases.rs`).
    services: BTreeMap<ServiceName, crate::state::PersistedService>,
    /// Tenants being switched by a rollout, or baking on their new release.
    switches: HashMap<InstanceId, releases::Switch>,
    /// The management API's tokens and sessions (`access.rs`).
    tokens: crate::tokens::Tokens,
    /// On a `[fleet]` host: what the fleet agent says is placed here, until when (`fleet.rs`).
    fleet: Option<fleet::FleetGate>,
    tx: mpsc::Sender<Command>,
    rx: mpsc::Receiver<Command>,
}

use crate::logs::now_ms;

/// The app under each running exec helper (its first child), from one scan of /proc, so `ps`
/// shows the app's pid rather than the helper's.
fn app_pids(instances: &HashMap<InstanceId, Instance>) -> HashMap<i32, i32> {
    if instances.values().all(|i| i.process.is_none()) {
        return HashMap::new();
    }
    let mut children = HashMap::new();
    for p in crate::procfs::all_processes(std::path::Path::new("/proc")) {
        children
            .entry(p.ppid)
            .and_modify(|c: &mut i32| *c = (*c).min(p.pid))
            .or_insert(p.pid);
    }
    children
}

/// The lifecycle policy of a service.
pub fn policy(service: &Service) -> Policy {
    Policy {
        startup_timeout: service.startup_timeout,
        stop_grace: service.stop_grace,
        idle_timeout: service.idle_timeout,
        unhealthy_threshold: service.unhealthy_threshold,
        max_restarts: service.max_restarts,
        restart_window: service.restart_window,
        backoff_base: service.backoff_base,
        backoff_max: service.backoff_max,
    }
}

impl Registry {
    /// Loads the saved registry, adds the instances declared in the config, kills leftovers of
    /// a previous run, and saves.
    pub fn open(
        config: Arc<Config>,
        helper: PathBuf,
        containment: Containment,
        is_root: bool,
        environment: tenement_proto::config::Environment,
        firewall: Option<crate::firewall::Firewall>,
    ) -> anyhow::Result<(Registry, RegistryHandle)> {
        let store = StateStore::open(&config.settings.state_dir)?;
        let killed = store.kill_leftovers(std::path::Path::new("/proc"));
        if !killed.is_empty() {
            tracing::warn!(pids = ?killed, "killed processes left by a previous supervisor");
        }
        if let Some(cgroups) = containment.cgroups() {
            let cleaned = cgroups.clean_leftovers();
            if cleaned > 0 {
                tracing::warn!(
                    cgroups = cleaned,
                    "killed instances left by a previous supervisor"
                );
            }
        }
        let saved = store.load()?;
        let state_dir = config.settings.state_dir.clone();
        let (tx, rx) = mpsc::channel(1024);
        let fleet = config.fleet.as_ref().map(|_| fleet::FleetGate::default());
        let mut registry = Registry {
            ports: PortAllocator::new(config.settings.port_range.clone()),
            config,
            store,
            instances: HashMap::new(),
            active: HashSet::new(),
            watchers: BTreeMap::new(),
            next_watcher: 1,
            parks: HashMap::new(),
            exec: crate::spawn::ExecServer::new(helper, state_dir),
            containment,
            is_root,
            environment,
            firewall,
            firewall_owners: BTreeSet::new(),
            next_sweep: None,
            warned_limits: HashSet::new(),
            counters: HashMap::new(),
            services: saved.services,
            switches: HashMap::new(),
            fleet,
            tokens: crate::tokens::Tokens::load(saved.tokens),
            tx: tx.clone(),
            rx,
        };
        let had_releases = !registry.services.is_empty();
        registry.ensure_releases();
        let mut changed = !had_releases && !registry.services.is_empty();
        let now = Instant::now();
        for entry in saved.instances {
            if registry.instances.contains_key(&entry.instance) {
                changed = true;
                continue;
            }
            // Instances of unix services give their port back (a port from before the
            // service switched to unix, or from before unix instances took none).
            let needs_port = registry.needs_port(&entry.instance.service);
            let port = entry
                .port
                .filter(|&p| needs_port && registry.ports.claim(p));
            changed |= port != entry.port;
            let mut instance = Instance::new(
                entry.instance.clone(),
                port,
                entry.weight,
                entry.created_ms,
                now,
            );
            instance.uid = entry.uid;
            instance.auto = entry.auto;
            instance.proven = entry.proven;
            instance.target = entry
                .target
                .unwrap_or_else(|| registry.current_release(&entry.instance.service));
            instance.release = entry.release;
            instance.pinned = entry.pinned;
            instance.migrated = entry.migrated;
            instance.trial = entry.trial;
            instance.snapshot = entry.snapshot;
            registry.instances.insert(entry.instance, instance);
        }
        let declared = registry.config.instances.clone();
        for id in declared {
            if !registry.instances.contains_key(&id) {
                registry.insert_new(id, DEFAULT_WEIGHT, now)?;
                changed = true;
            }
        }
        // A service whose definition changed while the supervisor was away gets a release of
        // it now (origin `config`), rolled out by its `rollout` setting: every instance is
        // stopped at this point, so each simply starts on it at its next wake.
        let names: Vec<ServiceName> = registry.config.services.keys().cloned().collect();
        for name in names {
            if registry.release_on_reload(&name, "config").is_some() {
                tracing::info!(service = %name, "{name}: its definition changed since the last run: release {} made", registry.current_release(&name));
            }
        }
        // Instances whose port was lost (range changed) get a new one.
        let missing: Vec<InstanceId> = registry
            .instances
            .values()
            .filter(|i| i.port.is_none() && registry.needs_port(&i.id.service))
            .map(|i| i.id.clone())
            .collect();
        for id in missing {
            let port = registry.ports.allocate(|_| true)?;
            if let Some(i) = registry.instances.get_mut(&id) {
                i.port = Some(port);
            }
            changed = true;
        }
        if changed {
            registry.save()?;
        }
        let fleet_socket = registry
            .config
            .fleet
            .as_ref()
            .map(|_| registry.config.settings.fleet_socket());
        Ok((registry, RegistryHandle { tx, fleet_socket }))
    }

    /// Whether instances of `service` are served on a port of `port_range` (`listen = "unix"`
    /// ones are not, so they do not use up the range). An instance whose service starts to need
    /// a port after a reload gets one when it starts.
    fn needs_port(&self, service: &ServiceName) -> bool {
        self.config
            .service(service)
            .is_some_and(|s| s.listen != ListenMode::Unix)
    }

    fn insert_new(&mut self, id: InstanceId, weight: u32, now: Instant) -> Result<(), RpcError> {
        let port = if self.needs_port(&id.service) {
            let port = self
                .ports
                .allocate(|_| true)
                .map_err(|e| RpcError::new(ErrorCode::Unavailable, e.to_string()))?;
            Some(port)
        } else {
            None
        };
        let mut instance = Instance::new(id.clone(), port, weight, now_ms(), now);
        instance.target = self.current_release(&id.service);
        self.instances.insert(id, instance);
        Ok(())
    }

    fn save(&self) -> Result<(), RpcError> {
        let mut entries: Vec<PersistedInstance> = self
            .instances
            .values()
            .map(|i| PersistedInstance {
                instance: i.id.clone(),
                port: i.port,
                weight: i.weight,
                created_ms: i.created_ms,
                uid: i.uid,
                auto: i.auto,
                proven: i.proven,
                target: Some(i.target),
                release: i.release,
                pinned: i.pinned,
                migrated: i.migrated,
                trial: i.trial,
                snapshot: i.snapshot,
            })
            .collect();
        entries.sort_by(|a, b| a.instance.cmp(&b.instance));
        self.store
            .save(&entries, &self.services, &self.tokens.persisted())
            .map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))
    }

    fn counts(&self) -> Counts {
        use tenement_proto::rpc::InstanceState as S;
        let mut counts = Counts {
            registered: self.instances.len(),
            ..Counts::default()
        };
        for i in self.instances.values() {
            match i.lifecycle.state() {
                S::Running => counts.running += 1,
                S::Starting => counts.starting += 1,
                S::Failed => counts.failed += 1,
                _ => {}
            }
        }
        counts
    }

    /// How many instances are registered.
    pub fn registered(&self) -> usize {
        self.instances.len()
    }

    /// Runs until `shutdown` is cancelled, then stops every instance and returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.sync_firewall();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(command) = self.rx.recv() => self.handle(command),
                _ = tick.tick() => self.tick(),
            }
        }
        self.stop_all().await;
    }

    fn handle(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Add { instances, reply } => {
                let _ = reply.send(self.add(instances, now));
            }
            Command::Wake {
                instance,
                register,
                reset_failed,
                reply,
            } => self.wake(instance, register, reset_failed, reply, now),
            Command::Stop { instance, reply } => self.stop(instance, reply, now),
            Command::Restart { instance, reply } => {
                if !self.instances.contains_key(&instance) {
                    let _ = reply.send(Err(RpcError::unknown(&instance)));
                    return;
                }
                if let Err(e) = self
                    .service_of(&instance)
                    .map(|_| ())
                    .and_then(|()| self.refuse_if_removing(&instance))
                    .and_then(|()| self.placed_here(&instance, now))
                {
                    let _ = reply.send(Err(e));
                    return;
                }
                if let Some(i) = self.instances.get_mut(&instance) {
                    i.waiters.push(Waiter { reply, since: now });
                }
                if self
                    .instances
                    .get(&instance)
                    .is_some_and(|i| i.process.is_some())
                {
                    self.count_restart(&instance, RestartReason::Operator);
                }
                self.event(&instance, Event::Restart, now);
            }
            Command::Remove {
                instance,
                purge,
                reply,
            } => self.remove(instance, purge, reply, now),
            Command::List {
                scope,
                query,
                reply,
            } => {
                let _ = reply.send(self.list(&scope, &query, now));
            }
            Command::Authenticate {
                credential,
                peer,
                reply,
            } => {
                let _ = reply.send(self.authenticate(&credential, peer, now));
            }
            Command::StillValid { grant, reply } => {
                let _ = reply.send(self.tokens.still_valid(&grant, now_ms()));
            }
            Command::Tokens { call, reply } => {
                let _ = reply.send(self.token_call(call));
            }
            Command::Weigh { weighing, reply } => {
                let _ = reply.send(self.weigh(weighing));
            }
            Command::Releases { call, reply } => {
                let result = match call {
                    ReleaseCall::Release { service, options } => {
                        self.make_release(&service, options, "deploy")
                    }
                    ReleaseCall::Releases { service } => self
                        .service_of_name(&service)
                        .map(|_| self.releases_response(&service)),
                    ReleaseCall::Rollout { service, action } => {
                        self.rollout_action(&service, action)
                    }
                    ReleaseCall::Rollback {
                        service,
                        to,
                        options,
                    } => self.rollback(&service, to, options),
                    ReleaseCall::Pin { instance, release } => self.pin(&instance, release),
                };
                let _ = reply.send(result);
            }
            Command::PrepareDeploy { instance, reply } => {
                let _ = reply.send(self.prepare_deploy(&instance, now));
            }
            Command::FleetOwn {
                owned,
                valid_ms,
                peers,
                reply,
            } => {
                let _ = reply.send(self.fleet_own(owned, valid_ms, peers, now));
            }
            Command::Stats { instances, reply } => {
                let services = self.service_stats();
                let usage = if instances {
                    self.instance_usage()
                } else {
                    Vec::new()
                };
                let _ = reply.send((services, usage));
            }
            Command::Status { instance, reply } => {
                let apps = app_pids(&self.instances);
                let result = match self.instances.get(&instance) {
                    Some(i) => {
                        let mut info =
                            i.info(self.address_of(i), &self.config.settings, &apps, now);
                        self.describe_isolation(&mut info);
                        info.disk_bytes = Some(crate::procfs::disk_usage(
                            &self.config.settings.instance_data_dir(&instance),
                        ));
                        if info.pid.is_some() {
                            info.cpu_seconds = self
                                .containment
                                .cgroups()
                                .and_then(|cgroups| cgroups.cpu_seconds(&instance));
                        }
                        Ok(info)
                    }
                    None => Err(RpcError::unknown(&instance)),
                };
                let _ = reply.send(result);
            }
            Command::Logs {
                instance,
                lines,
                follow,
                reply,
            } => {
                let result = match self.instances.get(&instance) {
                    Some(i) => {
                        let (lines, follow) = i.logs.tail_and_follow(lines, follow);
                        Ok(LogsReply { lines, follow })
                    }
                    None => Err(RpcError::unknown(&instance)),
                };
                let _ = reply.send(result);
            }
            Command::Resolve { instance, reply } => {
                let _ = reply.send(self.resolve(&instance, now));
            }
            Command::Subscribe { tx, reply } => self.subscribe(tx, reply),
            Command::Unsubscribe { watcher } => self.unsubscribe(watcher, now),
            Command::Activity { reports } => {
                self.note_successes(&reports);
                for report in &reports {
                    self.note_server_errors(&report.instance, report.server_errors, now);
                }
                for report in reports {
                    self.event(
                        &report.instance,
                        Event::Activity {
                            in_flight: report.in_flight,
                            started: report.started,
                        },
                        now,
                    );
                }
            }
            Command::ParkAck {
                watcher,
                instance,
                park_id,
                accepted,
            } => self.park_ack(watcher, instance, park_id, accepted, now),
            Command::Reload { reply } => {
                let reloaded = self.reload(now);
                if reloaded.is_ok() {
                    self.broadcast(Response::ConfigReloaded);
                }
                let _ = reply.send(reloaded);
            }
            Command::Counts { reply } => {
                let _ = reply.send(self.counts());
            }
            Command::Process(event) => self.process_event(event, now),
        }
    }

    fn add(
        &mut self,
        ids: Vec<InstanceId>,
        now: Instant,
    ) -> Result<(Vec<InstanceId>, Vec<InstanceId>), RpcError> {
        self.add_with_weight(ids, DEFAULT_WEIGHT, now)
    }

    /// [`Self::add`], new instances getting `weight`.
    fn add_with_weight(
        &mut self,
        ids: Vec<InstanceId>,
        weight: u32,
        now: Instant,
    ) -> Result<(Vec<InstanceId>, Vec<InstanceId>), RpcError> {
        for id in &ids {
            self.service_of(id)?;
        }
        let mut added = Vec::new();
        let mut existing = Vec::new();
        let mut inserted = Ok(());
        for id in ids {
            if self.instances.contains_key(&id) {
                existing.push(id);
            } else if let Err(e) = self.insert_new(id.clone(), weight, now) {
                inserted = Err(e);
                break;
            } else {
                added.push(id);
            }
        }
        // All or nothing, and not saved means not registered: undo, so that memory and disk
        // agree.
        let saved = inserted.and_then(|()| {
            if added.is_empty() {
                Ok(())
            } else {
                self.save()
            }
        });
        if let Err(e) = saved {
            for id in &added {
                if let Some(i) = self.instances.remove(id) {
                    if let Some(port) = i.port {
                        self.ports.release(port);
                    }
                }
            }
            return Err(e);
        }
        if !added.is_empty() {
            let routes: Vec<Route> = added.iter().filter_map(|id| self.route_of(id)).collect();
            self.broadcast(Response::Routes {
                routes,
                reset: false,
                complete: false,
                removed: Vec::new(),
            });
        }
        Ok((added, existing))
    }

    fn service_of(&self, id: &InstanceId) -> Result<&Service, RpcError> {
        self.config.service(&id.service).ok_or_else(|| {
            RpcError::new(
                ErrorCode::UnknownService,
                format!(
                    "no service {} in {}; add [service.{}]",
                    id.service,
                    self.config.path.display(),
                    id.service
                ),
            )
        })
    }

    fn wake(
        &mut self,
        id: InstanceId,
        register: bool,
        reset_failed: bool,
        reply: WakeReply,
        now: Instant,
    ) {
        let auto_spawn = match self.service_of(&id) {
            Ok(service) => service.auto_spawn,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if self.held_here(&id, now) {
            // Moving here from a live host that still drains it: the wake waits (until its
            // deadline) for the agent to say it may start.
            if !self.instances.contains_key(&id) {
                if let Err(e) = self.add(vec![id.clone()], now) {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            if let Some(i) = self.instances.get_mut(&id) {
                i.waiters.push(Waiter { reply, since: now });
            }
            return;
        }
        if let Err(e) = self.placed_here(&id, now) {
            let _ = reply.send(Err(e));
            return;
        }
        if !self.instances.contains_key(&id) {
            if !(register || auto_spawn) {
                let _ = reply.send(Err(RpcError::unknown(&id)));
                return;
            }
            if let Err(e) = self.add(vec![id.clone()], now) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        if let Err(e) = self.refuse_if_removing(&id) {
            let _ = reply.send(Err(e));
            return;
        }
        let mut event = Event::Wake;
        if let Some(i) = self.instances.get_mut(&id) {
            if reset_failed && i.lifecycle.state() == tenement_proto::rpc::InstanceState::Failed {
                event = Event::Restart;
            }
            i.waiters.push(Waiter { reply, since: now });
        }
        self.event(&id, event, now);
    }

    fn stop(&mut self, id: InstanceId, reply: oneshot::Sender<Result<(), RpcError>>, now: Instant) {
        let Some(i) = self.instances.get_mut(&id) else {
            let _ = reply.send(Err(RpcError::unknown(&id)));
            return;
        };
        let (tx, rx) = oneshot::channel();
        i.stop_waiters.push(tx);
        tokio::spawn(async move {
            let _ = rx.await;
            let _ = reply.send(Ok(()));
        });
        self.event(&id, Event::Stop, now);
        self.settle_stop_waiters(&id);
    }

    fn remove(
        &mut self,
        id: InstanceId,
        purge: bool,
        reply: oneshot::Sender<Result<(), RpcError>>,
        now: Instant,
    ) {
        let Some(i) = self.instances.get_mut(&id) else {
            let _ = reply.send(Err(RpcError::unknown(&id)));
            return;
        };
        if i.removal.is_some() {
            let _ = reply.send(Err(RpcError::new(
                ErrorCode::Unavailable,
                format!("{id} is already being removed"),
            )));
            return;
        }
        i.removal = Some((purge, reply));
        self.event(&id, Event::Stop, now);
        self.settle_stop_waiters(&id);
    }

    /// Finishes `stop` and `rm` calls once the instance has no process.
    fn settle_stop_waiters(&mut self, id: &InstanceId) {
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        if i.process.is_some() {
            return;
        }
        for waiter in i.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
        if let Some((purge, reply)) = i.removal.take() {
            let result = self.finish_removal(id, purge);
            let _ = reply.send(result);
        }
    }

    fn finish_removal(&mut self, id: &InstanceId, purge: bool) -> Result<(), RpcError> {
        let Some(instance) = self.instances.remove(id) else {
            return Ok(());
        };
        self.active.remove(id);
        self.switches.remove(id);
        if let Err(e) = self.save() {
            self.instances.insert(id.clone(), instance);
            return Err(e);
        }
        if let Some(port) = instance.port {
            self.ports.release(port);
        }
        self.sync_firewall();
        for waiter in instance.waiters {
            let _ = waiter.reply.send(Err(RpcError::new(
                ErrorCode::Unavailable,
                format!("{id} was removed"),
            )));
        }
        self.broadcast(Response::Routes {
            routes: Vec::new(),
            reset: false,
            complete: false,
            removed: vec![id.clone()],
        });
        // The runtime directory (sockets) never outlives its instance; the data directory
        // only goes with --purge. Neither is left owned by a uid the next tenant could get.
        let runtime = instance::instance_runtime_dir(&self.config.settings, id);
        let mut dirs = vec![runtime];
        if purge {
            dirs.push(self.config.settings.instance_data_dir(id));
            let (snapshot, tmp) = instance::snapshot_paths(&self.config.settings, id);
            let failed = tmp.with_file_name(format!(".{}.failed", id.id));
            dirs.extend([snapshot, tmp, failed]);
        }
        for dir in dirs {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RpcError::new(
                        ErrorCode::Internal,
                        format!("{id} removed, but removing {} failed: {e}", dir.display()),
                    ))
                }
            }
        }
        tracing::info!(instance = %id, purge, "{id}: removed");
        Ok(())
    }

    /// An instance being removed takes no more wakes: they would bring it back.
    fn refuse_if_removing(&self, id: &InstanceId) -> Result<(), RpcError> {
        match self.instances.get(id) {
            Some(i) if i.removal.is_some() => Err(RpcError::new(
                ErrorCode::Unavailable,
                format!("{id} is being removed"),
            )),
            _ => Ok(()),
        }
    }

    fn resolve(&mut self, id: &InstanceId, now: Instant) -> Result<Route, RpcError> {
        self.refuse_if_removing(id)?;
        let service = self.service_of(id)?.clone();
        if !self.instances.contains_key(id) {
            if !service.auto_spawn {
                return Err(RpcError::unknown(id));
            }
            self.may_auto_spawn(id, &service)?;
            self.add(vec![id.clone()], now)?;
            if let Some(i) = self.instances.get_mut(id) {
                i.auto = true;
            }
            self.save()?;
        }
        self.route_of(id).ok_or_else(|| RpcError::unknown(id))
    }

    fn address_of(&self, i: &Instance) -> Option<tenement_proto::rpc::Address> {
        let service = self.config.service(&i.id.service)?;
        Some(i.address(service.listen, &self.config.settings))
    }

    /// Tells the firewall which uid owns which port: every instance that has run as a uid of
    /// its own and has a port. Cheap when nothing changed (the firewall compares).
    pub(super) fn sync_firewall(&mut self) {
        let Some(firewall) = &self.firewall else {
            return;
        };
        let owners: BTreeSet<(u32, u16)> = self
            .instances
            .values()
            .filter_map(|i| Some((i.run_uid.or(i.uid)?, i.port?)))
            .collect();
        firewall.set_owners(owners.clone());
        self.firewall_owners = owners;
    }

    fn route_of(&self, id: &InstanceId) -> Option<Route> {
        let i = self.instances.get(id)?;
        Some(i.route(self.address_of(i)?))
    }

    fn subscribe(&mut self, tx: mpsc::Sender<Response>, reply: oneshot::Sender<u64>) {
        let id = self.next_watcher;
        self.next_watcher += 1;
        let mut routes: Vec<Route> = self
            .instances
            .keys()
            .filter_map(|id| self.route_of(id))
            .collect();
        routes.sort_by(|a, b| a.instance.cmp(&b.instance));
        let chunks: Vec<Vec<Route>> = routes
            .chunks(SNAPSHOT_CHUNK)
            .map(<[Route]>::to_vec)
            .collect();
        let last = chunks.len().saturating_sub(1);
        let watcher = Watcher { tx };
        let mut ok = true;
        if chunks.is_empty() {
            ok = watcher
                .tx
                .try_send(Response::Routes {
                    routes: Vec::new(),
                    reset: true,
                    complete: true,
                    removed: Vec::new(),
                })
                .is_ok();
        }
        for (n, chunk) in chunks.into_iter().enumerate() {
            // The snapshot may exceed the channel: send it from a task so the actor never
            // waits on a slow proxy.
            let frame = Response::Routes {
                routes: chunk,
                reset: n == 0,
                complete: n == last,
                removed: Vec::new(),
            };
            if watcher.tx.try_send(frame.clone()).is_err() {
                let tx = watcher.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
        if let Some(frame) = self.fleet_peers() {
            if watcher.tx.try_send(frame.clone()).is_err() {
                let tx = watcher.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
        if ok {
            self.watchers.insert(id, watcher);
        }
        let _ = reply.send(id);
    }

    fn unsubscribe(&mut self, watcher: u64, now: Instant) {
        if self.watchers.remove(&watcher).is_none() {
            return;
        }
        // Parks waiting for this proxy now wait for one fewer; in-flight counts it reported
        // are void (with several proxies this forgets the others' until their next report).
        let keys: Vec<(InstanceId, u64)> = self.parks.keys().cloned().collect();
        for key in keys {
            self.park_ack(watcher, key.0, key.1, true, now);
        }
        let ids: Vec<InstanceId> = self.active.iter().cloned().collect();
        for id in ids {
            if let Some(i) = self.instances.get_mut(&id) {
                i.lifecycle.forget_proxy(now);
            }
        }
    }

    fn park_ack(
        &mut self,
        watcher: u64,
        id: InstanceId,
        park_id: u64,
        accepted: bool,
        now: Instant,
    ) {
        let key = (id, park_id);
        let Some(park) = self.parks.get_mut(&key) else {
            return;
        };
        if accepted {
            park.waiting_for.remove(&watcher);
            if !park.waiting_for.is_empty() {
                return;
            }
        }
        self.parks.remove(&key);
        let (id, park_id) = key;
        self.event(&id, Event::ParkAnswered { park_id, accepted }, now);
    }

    /// Sends to every watcher; one that cannot keep up is dropped (it reconnects and gets a
    /// fresh snapshot).
    fn broadcast(&mut self, message: Response) {
        let mut dead = Vec::new();
        for (id, watcher) in &self.watchers {
            if watcher.tx.try_send(message.clone()).is_err() {
                dead.push(*id);
            }
        }
        for id in dead {
            tracing::warn!(
                watcher = id,
                "dropping a proxy watch stream that fell behind"
            );
            self.watchers.remove(&id);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.fence_if_expired(now);
        self.sweep_unproven_auto_spawns(now);
        let ids: Vec<InstanceId> = self.active.iter().cloned().collect();
        for id in ids {
            self.event(&id, Event::Tick, now);
            self.maybe_check_health(&id, now);
        }
        self.drive_rollouts(now);
    }

    /// Reads the config file again and applies it: new services are available at once,
    /// running instances of changed services restart, those of removed services stop, and
    /// everything else is left alone. Settings that decide where things live cannot change
    /// under a running supervisor.
    fn reload(&mut self, now: Instant) -> Result<Reloaded, RpcError> {
        let new = Config::load(&self.config.path, &self.environment).map_err(|e| {
            let first = e
                .diagnostics
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            let more = e.diagnostics.len().saturating_sub(1);
            let tail = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            RpcError::new(
                ErrorCode::BadRequest,
                format!("config not reloaded: {first}{tail}"),
            )
        })?;
        let (old_s, new_s) = (&self.config.settings, &new.settings);
        for (name, changed) in [
            ("data_dir", old_s.data_dir != new_s.data_dir),
            ("state_dir", old_s.state_dir != new_s.state_dir),
            ("runtime_dir", old_s.runtime_dir != new_s.runtime_dir),
            ("port_range", old_s.port_range != new_s.port_range),
            ("dynamic_users", old_s.dynamic_users != new_s.dynamic_users),
            // Whether this host is in a fleet; the agent's own settings are the agent's.
            (
                "[fleet]",
                self.config.fleet.is_some() != new.fleet.is_some(),
            ),
        ] {
            if changed {
                return Err(RpcError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "config not reloaded: {name} changed; restart the supervisor to apply it"
                    ),
                ));
            }
        }
        let mut report = Reloaded::default();
        for (name, service) in &new.services {
            match self.config.services.get(name) {
                None => report.added.push(name.clone()),
                Some(old) if old != service => report.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        report.removed = self
            .config
            .services
            .keys()
            .filter(|name| !new.services.contains_key(*name))
            .cloned()
            .collect();
        let old = std::mem::replace(&mut self.config, Arc::new(new));
        self.ensure_releases();
        // A changed definition is a new release, rolled out as the service's `rollout` says;
        // a changed `listen` restarts the running instances; other changes (idle, restart
        // policy, the proxy's limits) apply without touching a process.
        let mut restart: HashSet<ServiceName> = HashSet::new();
        for name in &report.changed {
            let listen_changed = match (old.service(name), self.config.service(name)) {
                (Some(a), Some(b)) => a.listen != b.listen,
                _ => false,
            };
            if listen_changed {
                restart.insert(name.clone());
            }
            if let Some(release) = self.release_on_reload(name, "reload") {
                if restart.contains(name) {
                    continue;
                }
                if self.config.service(name).map(|s| s.rollout)
                    == Some(tenement_proto::config::RolloutPolicy::Restart)
                {
                    restart.insert(name.clone());
                } else {
                    tracing::info!(service = %name, release, "{name}: release {release} made by the reload");
                }
            }
        }
        let affected: Vec<(InstanceId, Event)> = self
            .instances
            .values()
            .filter(|i| i.process.is_some())
            .filter_map(|i| {
                if restart.contains(&i.id.service) {
                    Some((i.id.clone(), Event::Restart))
                } else if report.removed.contains(&i.id.service) {
                    Some((i.id.clone(), Event::Stop))
                } else {
                    None
                }
            })
            .collect();
        for (id, event) in affected {
            if event == Event::Restart {
                self.count_restart(&id, RestartReason::Reload);
            }
            self.event(&id, event, now);
        }
        let declared: Vec<InstanceId> = self
            .config
            .instances
            .iter()
            .filter(|id| !self.instances.contains_key(*id))
            .cloned()
            .collect();
        if !declared.is_empty() {
            self.add(declared, now)?;
        }
        tracing::info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed, "config reloaded");
        Ok(report)
    }

    pub(super) fn count_restart(&mut self, id: &InstanceId, reason: RestartReason) {
        let counters = self.counters.entry(id.service.clone()).or_default();
        counters.restarts[reason as usize] += 1;
    }

    /// Counters of every configured service (zeros included, so a scrape shows each service
    /// from the start) and of removed services that still have some.
    fn service_stats(&self) -> Vec<ServiceStats> {
        let mut names: Vec<&ServiceName> = self.config.services.keys().collect();
        names.extend(
            self.counters
                .keys()
                .filter(|n| !self.config.services.contains_key(*n)),
        );
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let counters = self.counters.get(name).cloned().unwrap_or_default();
                ServiceStats {
                    service: name.clone(),
                    restarts: RestartReason::ALL
                        .iter()
                        .filter(|r| counters.restarts[**r as usize] > 0)
                        .map(|r| (r.as_str().to_owned(), counters.restarts[*r as usize]))
                        .collect(),
                    oom_kills: counters.oom_kills,
                    release: self.services.get(name).map_or(0, |s| s.history.current),
                    rollout: self.rollout_progress(name),
                }
            })
            .collect()
    }

    /// Memory and CPU of every instance with a process: from its cgroup, else summed over
    /// its process tree in /proc.
    fn instance_usage(&self) -> Vec<InstanceUsage> {
        let mut running: Vec<&Instance> = self
            .instances
            .values()
            .filter(|i| i.process.is_some())
            .collect();
        if running.is_empty() {
            return Vec::new();
        }
        running.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(cgroups) = self.containment.cgroups() {
            return running
                .into_iter()
                .map(|i| InstanceUsage {
                    instance: i.id.clone(),
                    memory_bytes: cgroups.usage(&i.id).0,
                    cpu_seconds: cgroups.cpu_seconds(&i.id),
                })
                .collect();
        }
        let table = crate::procfs::all_processes(std::path::Path::new("/proc"));
        let page = tenement_proto::usage::page_size();
        let ticks = tenement_proto::usage::clock_ticks();
        running
            .into_iter()
            .map(|i| {
                let root = i.process.as_ref().map_or(0, |p| p.pid);
                let tree = crate::procfs::tree_of(&table, root);
                let (mut rss, mut cpu) = (0u64, 0u64);
                for stat in table
                    .iter()
                    .filter(|s| s.pid == root || tree.contains(&s.pid))
                {
                    rss += stat.rss_pages * page;
                    cpu += stat.cpu_ticks;
                }
                InstanceUsage {
                    instance: i.id.clone(),
                    memory_bytes: Some(rss),
                    cpu_seconds: Some(cpu as f64 / ticks),
                }
            })
            .collect()
    }

    /// Before a shutdown stops them: every proxy parks the running instances (new requests
    /// wait for the next supervisor instead of reaching a dying process) and the requests
    /// already inside finish, until `deadline`.
    async fn drain(&mut self, deadline: tokio::time::Instant) {
        use tenement_proto::rpc::InstanceState;
        if self.watchers.is_empty() {
            return;
        }
        let running: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.lifecycle.state() == InstanceState::Running)
            .map(|i| i.id.clone())
            .collect();
        let mut unacked: HashMap<InstanceId, HashSet<u64>> = HashMap::new();
        for id in &running {
            unacked.insert(id.clone(), self.watchers.keys().copied().collect());
            self.broadcast(Response::Park {
                instance: id.clone(),
                park_id: 0,
                drain: true,
            });
        }
        loop {
            let drained = running.iter().all(|id| {
                unacked.get(id).is_none_or(HashSet::is_empty)
                    && self
                        .instances
                        .get(id)
                        .is_none_or(|i| i.lifecycle.in_flight() == 0)
            });
            if drained {
                return;
            }
            let command = tokio::select! {
                command = self.rx.recv() => command,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("requests still in flight at the end of the stop grace");
                    return;
                }
            };
            let now = Instant::now();
            match command {
                None => return,
                Some(Command::Activity { reports }) => {
                    for r in reports {
                        let event = Event::Activity {
                            in_flight: r.in_flight,
                            started: r.started,
                        };
                        self.event(&r.instance, event, now);
                    }
                }
                Some(Command::ParkAck {
                    watcher, instance, ..
                }) => {
                    if let Some(set) = unacked.get_mut(&instance) {
                        set.remove(&watcher);
                    }
                }
                Some(Command::Unsubscribe { watcher }) => {
                    self.watchers.remove(&watcher);
                    for set in unacked.values_mut() {
                        set.remove(&watcher);
                    }
                }
                Some(Command::Process(event)) => self.process_event(event, now),
                // Anything else waits for the next supervisor: its reply channel is dropped
                // and the caller retries.
                Some(_) => {}
            }
        }
    }

    /// Stops every instance, waiting at most the longest stop grace plus a margin.
    async fn stop_all(&mut self) {
        let grace = self
            .config
            .services
            .values()
            .map(|s| s.stop_grace)
            .max()
            .unwrap_or_default();
        self.drain(tokio::time::Instant::now() + grace).await;
        let now = Instant::now();
        let ids: Vec<InstanceId> = self.active.iter().cloned().collect();
        for id in &ids {
            self.event(id, Event::Stop, now);
        }
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
        while self.instances.values().any(|i| i.process.is_some()) {
            tokio::select! {
                Some(command) = self.rx.recv() => {
                    if let Command::Process(event) = command {
                        self.process_event(event, Instant::now());
                    }
                }
                _ = tokio::time::sleep(TICK) => self.tick(),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        for i in self.instances.values() {
            if let Some(p) = &i.process {
                process::kill_tree(p.pid);
            }
        }
    }
}
