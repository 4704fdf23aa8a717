//! Carrying out lifecycle actions: starting an instance's exec helper and the tasks that watch
//! it (output, readiness, exit, health), signalling it, and answering waiters.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tenement_proto::config::{ListenMode, ReadyMode};
use tenement_proto::rpc::{Address, ErrorCode, InstanceState, LogStream, Response};
use tenement_proto::sockdiag::{self, SocketOwner};
use tenement_proto::InstanceId;
use tokio::io::AsyncRead;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};

use crate::lifecycle::{Action, Event, WaitError};
use crate::logs::{LogBuffer, MAX_LINE_LEN};
use crate::ownership::{self, Holder};
use crate::probe;
use crate::spawn::{self, Endpoints};
use crate::{ports, procfs, sys};

use super::instance::{
    app_socket_path, instance_runtime_dir, notify_socket_path, served_socket_path, snapshot_paths,
    Process, SquatSeen, StartStep, WakeOk,
};
use super::isolation;
use super::{Command, ProcessEvent, ProcessEventKind, Registry, RpcError};
use crate::lock;

impl Registry {
    /// Feeds one event to an instance's lifecycle and carries out what it decides.
    pub(super) fn event(&mut self, id: &InstanceId, event: Event, now: Instant) {
        let config = self.config.clone();
        let policy = match config.service(&id.service) {
            Some(service) => self.policy_for(id, service),
            None => {
                // A service removed from the config: its instances can still stop (and a
                // reload stops them), but never start again.
                if matches!(event, Event::Wake | Event::Restart) {
                    if let Some(i) = self.instances.get_mut(id) {
                        for waiter in i.waiters.drain(..) {
                            let _ = waiter.reply.send(Err(RpcError::new(
                                ErrorCode::UnknownService,
                                format!("service {} is no longer in the config", id.service),
                            )));
                        }
                    }
                    self.settle_stop_waiters(id);
                    return;
                }
                retired_policy()
            }
        };
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        let actions = instance.lifecycle.handle(event, now, &policy);
        if instance.lifecycle.needs_ticks() {
            self.active.insert(id.clone());
        } else {
            self.active.remove(id);
        }
        for action in actions {
            self.act(id, action, now);
        }
        self.settle_stop_waiters(id);
        self.check_trial(id, now);
    }

    fn act(&mut self, id: &InstanceId, action: Action, now: Instant) {
        match action {
            Action::Spawn => self.start_process(id, now),
            Action::Terminate => {
                if let Some(pid) = self.pid_of(id) {
                    // The helper forwards SIGTERM to the whole tree and enforces the grace.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
            Action::Kill => {
                if let Some(cgroups) = self.containment.cgroups() {
                    cgroups.kill(id);
                } else if let Some(pid) = self.pid_of(id) {
                    // Everything under the helper, not the helper: it reaps what dies and then
                    // exits itself, so nothing is left as a zombie of PID 1.
                    kill_descendants(pid);
                }
            }
            Action::WakeWaiters => {
                let Some(route) = self.route_of(id) else {
                    return;
                };
                if let Some(i) = self.instances.get_mut(id) {
                    let began = i.start_began.take();
                    for waiter in i.waiters.drain(..) {
                        let _ = waiter.reply.send(Ok(WakeOk {
                            route: route.clone(),
                            started: began.is_some(),
                            elapsed: now.duration_since(waiter.since),
                        }));
                    }
                }
            }
            Action::FailWaiters(error) => {
                if let Some(i) = self.instances.get_mut(id) {
                    if i.trial.is_some()
                        && i.release == Some(i.target)
                        && matches!(error, WaitError::StartFailed(_))
                    {
                        // It failed on a release it is trying: it goes back to the one
                        // before (`check_trial`), which then answers those waiting.
                        return;
                    }
                    let error = match error {
                        WaitError::StartFailed(failure) => {
                            let tail = i.logs.tail_text(5);
                            let mut message = format!("{id} {failure}");
                            if !tail.is_empty() {
                                message.push_str(&format!("; last output: {tail}"));
                            }
                            RpcError::new(ErrorCode::WakeFailed, message)
                        }
                        WaitError::Failed(reason) => RpcError::new(
                            ErrorCode::InstanceFailed,
                            format!("{id} is failed ({reason}); `tenctl restart {id}` once fixed"),
                        ),
                        WaitError::Stopped => RpcError::new(
                            ErrorCode::Unavailable,
                            format!("{id} was stopped while waiting for it"),
                        ),
                    };
                    for waiter in i.waiters.drain(..) {
                        let _ = waiter.reply.send(Err(error.clone()));
                    }
                }
            }
            Action::SendPark(park_id) | Action::SendDrain(park_id) => {
                let drain = matches!(action, Action::SendDrain(_));
                if self.watchers.is_empty() {
                    // No proxy, so nothing can be in flight.
                    self.event(
                        id,
                        Event::ParkAnswered {
                            park_id,
                            accepted: true,
                        },
                        now,
                    );
                } else {
                    self.parks.insert(
                        (id.clone(), park_id),
                        super::PendingPark {
                            waiting_for: self.watchers.keys().copied().collect(),
                        },
                    );
                    self.broadcast(Response::Park {
                        instance: id.clone(),
                        park_id,
                        drain,
                    });
                }
            }
            Action::PublishRoute => {
                if let Some(route) = self.route_of(id) {
                    self.broadcast(Response::Routes {
                        routes: vec![route],
                        reset: false,
                        complete: false,
                        removed: Vec::new(),
                    });
                }
            }
            Action::Restarted(reason) => self.count_restart(id, reason),
            Action::Log(message) => {
                tracing::info!(instance = %id, "{id}: {message}");
                if let Some(i) = self.instances.get(id) {
                    i.logs.push(LogStream::Event, message);
                }
            }
        }
    }

    fn pid_of(&self, id: &InstanceId) -> Option<i32> {
        self.instances.get(id)?.process.as_ref().map(|p| p.pid)
    }

    /// Starts a new process generation; failures go back into the lifecycle.
    fn start_process(&mut self, id: &InstanceId, now: Instant) {
        match self.try_start(id, now) {
            Ok(()) => self.event(id, Event::Spawned, now),
            Err(error) => {
                tracing::warn!(instance = %id, "{error}");
                if let Some(i) = self.instances.get(id) {
                    i.logs
                        .push(LogStream::Event, format!("could not start: {error}"));
                }
                self.event(id, Event::SpawnFailed(error), now);
            }
        }
    }

    fn try_start(&mut self, id: &InstanceId, now: Instant) -> Result<(), String> {
        // Wakes are refused earlier with the reason; this catches any other way to a start
        // (a restart after a crash, a rollout) on a fleet host that no longer owns `id`.
        self.placed_here(id, now).map_err(|e| e.message)?;
        let config = self.config.clone();
        let settings = &config.settings;
        let service = self
            .service_for(id)
            .ok_or_else(|| format!("no service {}", id.service))?;
        let service = &service;
        // A release's `migrate` runs first, once per tenant per release, as the app would.
        let (target, migrate) = match self.instances.get(id) {
            Some(i) if i.migrate_due() => (i.target, service.migrate.clone()),
            Some(i) => (i.target, None),
            None => return Err(format!("{id} vanished")),
        };
        if let Some(i) = self.instances.get_mut(id) {
            // The release this start tries, whether or not it gets as far as a process.
            i.release = Some(target);
        }
        self.restore_if_due(id)?;
        let snapshot_due = migrate.is_some()
            && service.snapshot
            && self
                .instances
                .get(id)
                .is_some_and(|i| i.snapshot.is_none_or(|s| s.release != target));
        if snapshot_due {
            return self.start_snapshot(id, target, now);
        }
        let plan = self.plan_isolation(id, service)?;
        let (uid, gid) = (plan.spec.uid, plan.spec.gid);
        // Who will own the listening socket: the app (as its uid), or this supervisor, which
        // binds a handed-off socket itself.
        let own_uid = nix::unistd::geteuid().as_raw();
        let listener_uid = match service.listen {
            ListenMode::Tcp => Some(uid.unwrap_or(own_uid)),
            ListenMode::Activate => Some(own_uid),
            ListenMode::Unix => None,
        };
        if let Some(i) = self.instances.get_mut(id) {
            i.run_uid = uid;
            i.listener_uid = listener_uid;
            i.listener_backlog = None;
        }

        // The port must be ours right now, or the readiness check could succeed against a
        // stranger. Moving is better than routing a tenant to somebody else's server.
        let mut listener: Option<TcpListener> = None;
        let mut port = None;
        if service.listen != ListenMode::Unix {
            let current = self.instances.get(id).and_then(|i| i.port);
            let bound = current.and_then(|p| bind_loopback(p).ok().map(|l| (p, l)));
            let mut moved = false;
            let (p, l) = match bound {
                Some(found) => found,
                None => {
                    moved = true;
                    if let Some(old) = current {
                        self.ports.release(old);
                        let own = self.instances.get(id).and_then(|i| i.listener_uid);
                        match ownership::port_holder(Path::new("/proc"), old, own, None) {
                            Ok(Holder::Stranger { uid, pids }) => {
                                if let Some(squatter) = self.report_squat(id, old, uid, &pids) {
                                    let reason =
                                        format!("security: listened on port {old} of {id}");
                                    self.event(&squatter, Event::Ban(reason), now);
                                }
                            }
                            _ => {
                                tracing::warn!(instance = %id, port = old, "port {old} is taken by another program; moving to a new port")
                            }
                        }
                    }
                    // A port that was free a moment ago may be taken before we bind it (a
                    // squatter racing): then the next one.
                    let mut attempt = 0;
                    let (p, l) = loop {
                        let p = self
                            .ports
                            .allocate(ports::bindable)
                            .map_err(|e| e.to_string())?;
                        match bind_loopback(p) {
                            Ok(l) => break (p, l),
                            Err(e) if attempt < 16 => {
                                attempt += 1;
                                tracing::warn!(instance = %id, port = p, "port {p} was taken before it could be bound ({e}); trying another");
                            }
                            Err(e) => return Err(format!("cannot bind port {p}: {e}")),
                        }
                    };
                    if let Some(i) = self.instances.get_mut(id) {
                        i.port = Some(p);
                    }
                    self.save().map_err(|e| e.to_string())?;
                    (p, l)
                }
            };
            port = Some(p);
            // The firewall's owners are rebuilt (a walk of every instance) only when this
            // start changed the instance's pair: a new port, or a uid it had not.
            let pair = self
                .instances
                .get(id)
                .and_then(|i| Some((i.run_uid.or(i.uid)?, p)));
            if moved || pair.is_some_and(|pair| !self.firewall_owners.contains(&pair)) {
                self.sync_firewall();
            }
            if service.listen == ListenMode::Activate && migrate.is_none() {
                listener = Some(l);
            }
        }

        let socket_path =
            (service.listen == ListenMode::Unix).then(|| app_socket_path(settings, id));
        if let Some(path) = &socket_path {
            prepare_socket_dir(path)?;
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(served_socket_path(settings, id));
        }
        let notify_path = (service.ready == ReadyMode::Notify && migrate.is_none())
            .then(|| notify_socket_path(settings, id));
        let notify = match &notify_path {
            Some(path) => {
                prepare_socket_dir(path)?;
                Some(
                    probe::bind_notify(path)
                        .map_err(|e| format!("cannot bind {}: {e}", path.display()))?,
                )
            }
            None => None,
        };

        let data_dir = settings.instance_data_dir(id);
        spawn::ensure_data_dir(&data_dir).map_err(|e| e.to_string())?;
        let runtime_dir = instance_runtime_dir(settings, id);
        std::fs::create_dir_all(&runtime_dir)
            .map_err(|e| format!("cannot create {}: {e}", runtime_dir.display()))?;
        isolation::give_to(&data_dir, uid, gid)?;
        isolation::give_to(&runtime_dir, uid, gid)?;
        if let Some(path) = &notify_path {
            isolation::give_to(path, uid, gid)?;
        }
        let endpoints = Endpoints {
            port,
            socket_path: socket_path.clone(),
            notify_socket: notify_path,
        };
        // An app that runs as another user gets the standard PATH, not root's (which may
        // point into directories it cannot enter, and is root's business anyway).
        let migrate_service = migrate.as_ref().map(|words| {
            let mut s = service.clone();
            s.argv = words.clone();
            s
        });
        let run = migrate_service.as_ref().unwrap_or(service);
        let mut spec = spawn::build_spec(settings, run, id, &endpoints, |name| {
            if name == "PATH" && uid.is_some() {
                return None;
            }
            std::env::var(name).ok()
        })
        .map_err(|e| e.to_string())?;
        if let Some(path) = &service.env_file {
            // Secrets, read now (a changed file is picked up at the next start), added after
            // `env`: a name in both takes the file's value.
            let vars = crate::env_file::load(path, own_uid)?;
            spec.env
                .retain(|(k, _)| !vars.iter().any(|(name, _)| name == k));
            spec.env.extend(vars);
        }
        spec.cgroup = plan.cgroup;
        spec.isolation = plan.spec;
        let listener_fd: Option<OwnedFd> = listener.map(OwnedFd::from);
        let asked = Instant::now();
        let launched = self
            .exec
            .launch(&spec, listener_fd.as_ref())
            .map_err(|e| e.to_string())?;
        tracing::debug!(instance = %id, micros = asked.elapsed().as_micros() as u64, "{id}: helper started");
        // Our copy of the handed-off socket closes here; the helper passes its copy on.
        drop(listener_fd);
        let pid = launched.pid;

        let Some(instance) = self.instances.get_mut(id) else {
            // Never left to run unwaited: end it and reap it in the background.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            tokio::spawn(sys::wait_pidfd(launched.pidfd));
            return Err(format!("{id} vanished"));
        };
        instance.generation += 1;
        let generation = instance.generation;
        instance.start_began = Some(now);
        instance.step = if migrate.is_some() {
            StartStep::Migrate
        } else {
            StartStep::App
        };
        instance.next_health = service
            .health
            .as_ref()
            .map(|_| now + service.health_interval);
        let logs = instance.logs.clone();
        logs.set_running(true);
        let what = if migrate.is_some() {
            format!("migrate for release {target}")
        } else {
            format!("release {target}")
        };
        logs.push(LogStream::Event, format!("started {what} (pid {pid})"));
        tracing::info!(instance = %id, pid, release = target, "{id}: started {what} (pid {pid})");

        let mut tasks = Vec::new();
        for (pipe, stream) in [
            (launched.stdout, LogStream::Stdout),
            (launched.stderr, LogStream::Stderr),
        ] {
            tasks.push(
                tokio::spawn(read_lines(pipe, logs.clone(), stream, id.clone())).abort_handle(),
            );
        }

        // Readiness looks where the app binds; the proxy is given the moved socket once ready.
        let address = match &socket_path {
            Some(path) => Address::Unix(path.clone()),
            None => instance.address(service.listen, settings),
        };
        let ready_now = service.listen == ListenMode::Activate && service.ready == ReadyMode::Tcp;
        let watch_readiness = migrate.is_none();
        let tx = self.tx.clone();
        let event_id = id.clone();
        let event = move |kind| {
            Command::Process(ProcessEvent {
                instance: event_id.clone(),
                generation,
                kind,
            })
        };
        let health_path = service.health.clone().unwrap_or_else(|| "/".to_owned());
        let per_try = service.health_timeout;
        let ready_mode = service.ready;
        let ready_tx = tx.clone();
        // The app binds its port itself: before it counts as ready, the listener must be its.
        let check_port = (service.listen == ListenMode::Tcp)
            .then_some(port)
            .flatten();
        // Readiness by connect on a TCP port is learned from sock_diag: the listener a connect
        // reaches, whose accept queue the route then carries.
        let listen_at = match (&address, check_port, ready_mode) {
            (Address::Tcp(addr), Some(_), ReadyMode::Tcp) => Some(*addr),
            _ => None,
        };
        let taken_event = event.clone();
        let squatter = SquatSeen::default();
        let seen = squatter.clone();
        if watch_readiness {
            tasks.push(
                tokio::spawn(async move {
                    let mut reached = None;
                    if !ready_now {
                        match (ready_mode, notify, listen_at) {
                            (ReadyMode::Notify, Some(socket), _) => {
                                probe::wait_notify(&socket).await
                            }
                            (ReadyMode::Health, _, _) => {
                                probe::wait_healthy(&address, &health_path, per_try).await
                            }
                            (_, _, Some(addr)) => match probe::wait_listening(addr).await {
                                Ok(listener) => reached = Some(listener),
                                Err(e) => {
                                    tracing::warn!(port = addr.port(), "cannot ask sock_diag who listens on port {}: {e}; probing with connects", addr.port());
                                    probe::wait_accepting(&address).await
                                }
                            },
                            _ => probe::wait_accepting(&address).await,
                        }
                    }
                    let mut backlog = None;
                    if let Some(port) = check_port {
                        match own_listener(port, reached, listener_uid, pid).await {
                            Ok(found) => backlog = found,
                            Err((uid, pids)) => {
                                *lock(&seen) = Some((uid, pids.clone()));
                                let _ = ready_tx
                                    .send(taken_event(ProcessEventKind::PortTaken {
                                        port,
                                        uid,
                                        pids,
                                    }))
                                    .await;
                                return;
                            }
                        }
                    }
                    let _ = ready_tx
                        .send(event(ProcessEventKind::Ready { backlog }))
                        .await;
                })
                .abort_handle(),
            );
        }
        watch_exit(sys::wait_pidfd(launched.pidfd), tx, id.clone(), generation);

        let oom_baseline = self.containment.cgroups().and_then(|c| c.oom_kills(id));
        if let Some(stat) = procfs::read_stat(Path::new("/proc"), pid) {
            if let Err(e) = self.store.record_process(id, pid, stat.start_time) {
                tracing::warn!(instance = %id, "cannot record pid file: {e}");
            }
        }
        if let Some(i) = self.instances.get_mut(id) {
            i.process = Some(Process {
                pid,
                tasks,
                squatter,
                oom_baseline,
            });
        }
        Ok(())
    }

    pub(super) fn process_event(&mut self, event: ProcessEvent, now: Instant) {
        let Some(i) = self.instances.get_mut(&event.instance) else {
            return;
        };
        if i.generation != event.generation {
            return;
        }
        let id = event.instance;
        match event.kind {
            ProcessEventKind::Ready { backlog } => {
                let unix = self
                    .config
                    .service(&id.service)
                    .is_some_and(|s| s.listen == ListenMode::Unix);
                if unix {
                    let settings = &self.config.settings;
                    let (app, served) = (
                        app_socket_path(settings, &id),
                        served_socket_path(settings, &id),
                    );
                    let owner = i.run_uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
                    match publish_socket(&app, &served, owner) {
                        Ok(()) => {
                            if let Err(e) = open_to_proxy(&served, settings.proxy_user.as_deref()) {
                                tracing::warn!(instance = %id, "cannot open {} to the proxy: {e}", served.display());
                            }
                        }
                        Err(e) => {
                            // Not its own socket at its path (a symlink to someone else's, a
                            // file of another uid): hostile, and nothing is routed to it.
                            tracing::warn!(target: "tenement::security", instance = %id, "security: {id}: {e}");
                            self.event(&id, Event::Ban(format!("security: {e}")), now);
                            return;
                        }
                    }
                }
                let Some(i) = self.instances.get_mut(&id) else {
                    return;
                };
                i.listener_backlog = backlog;
                if let (Some(process), true) = (&i.process, crate::journal::enabled()) {
                    // The app is the helper's child (or its init's); OBJECT_PID names it. The
                    // children lists cost a read per level, where the process table costs one
                    // per process on the host.
                    let proc_root = Path::new("/proc");
                    let mut pid = process.pid;
                    loop {
                        let kids = procfs::children(proc_root, pid).unwrap_or_else(|| {
                            let table = procfs::all_processes(proc_root);
                            table
                                .iter()
                                .filter(|p| p.ppid == pid)
                                .map(|p| p.pid)
                                .collect()
                        });
                        match kids.into_iter().min() {
                            Some(child) => pid = child,
                            None => break,
                        }
                    }
                    i.logs.set_pid(pid as u32);
                }
                if let Some(began) = i.start_began {
                    let ms = now.duration_since(began).as_secs_f64() * 1000.0;
                    i.logs
                        .push(LogStream::Event, format!("ready in {ms:.1} ms"));
                    tracing::info!(instance = %id, ready_ms = ms, "{id}: ready in {ms:.1} ms");
                }
                self.event(&id, Event::Ready, now);
                self.trial_ready(&id, now);
            }
            ProcessEventKind::Exited(status)
                if i.step == StartStep::Migrate
                    && i.lifecycle.state() == InstanceState::Starting =>
            {
                self.migrate_exited(&id, status, now);
            }
            ProcessEventKind::Exited(status)
                if i.step == StartStep::Snapshot
                    && i.lifecycle.state() == InstanceState::Starting =>
            {
                self.snapshot_exited(&id, status, now);
            }
            ProcessEventKind::Exited(mut status) => {
                i.step = StartStep::App;
                let mut squatter = None;
                let mut oom_killed = false;
                if let Some(process) = i.process.take() {
                    squatter = lock(&process.squatter).take();
                    // Read before cgroup.kill below: the count of this cgroup's whole life,
                    // against the one at this process's start.
                    if let (Some(before), Some(cgroups)) =
                        (process.oom_baseline, self.containment.cgroups())
                    {
                        oom_killed = cgroups.oom_kills(&id).is_some_and(|after| after > before);
                    }
                    // Normally the helper took its tree down with it; if the helper itself was
                    // killed, whatever is left of its process group goes now, so no orphan
                    // keeps the instance's port.
                    let _ = killpg(Pid::from_raw(process.pid), Signal::SIGKILL);
                    if let Some(cgroups) = self.containment.cgroups() {
                        // cgroup.kill only starts the kill: wait for the cgroup to empty, off
                        // the actor, then remove it.
                        cgroups.kill(&id);
                        cgroups.begin_removal(&id);
                        let (cgroups, id) = (cgroups.clone(), id.clone());
                        tokio::task::spawn_blocking(move || {
                            cgroups.remove_when_empty(&id, Duration::from_secs(5))
                        });
                    }
                    // Readiness may still be polling; output readers end on EOF by themselves
                    // but are stopped too in case a grandchild kept the pipes open.
                    for task in process.tasks {
                        task.abort();
                    }
                }
                // Whoever waited for this process to stop is answered now, even if the same
                // exit starts the next process (a wake arrived during the stop).
                for waiter in i.stop_waiters.drain(..) {
                    let _ = waiter.send(());
                }
                if oom_killed {
                    status.push_str(", out of memory: killed by the OOM killer at memory_max");
                    self.counters
                        .entry(id.service.clone())
                        .or_default()
                        .oom_kills += 1;
                }
                i.logs.push(LogStream::Event, format!("exited ({status})"));
                i.logs.set_running(false);
                i.last_exit = Some(status.clone());
                i.health_running = false;
                i.next_health = None;
                let unexpected = matches!(
                    i.lifecycle.state(),
                    InstanceState::Starting | InstanceState::Running
                );
                let port = i.port;
                let own_uid = i.listener_uid;
                self.store.forget_process(&id);
                tracing::info!(instance = %id, "{id}: exited ({status})");
                // An app that died starting or running may have lost its port to a co-tenant
                // (EADDRINUSE): that is a squat to report and move away from, not a crash.
                let tcp = self
                    .config
                    .service(&id.service)
                    .is_some_and(|s| s.listen == ListenMode::Tcp);
                if let (true, true, Some(port)) = (unexpected, tcp, port) {
                    // A listener of the instance's own uid is its own tree dying (a daemon
                    // that held the socket a moment longer), not a stranger.
                    let now_held =
                        match ownership::port_holder(Path::new("/proc"), port, own_uid, None) {
                            Ok(Holder::Stranger { uid, pids }) => Some((uid, pids)),
                            _ => None,
                        };
                    if let Some((uid, pids)) = now_held.or(squatter) {
                        self.port_taken(&id, port, uid, &pids, now);
                    }
                }
                self.event(&id, Event::Exited(status), now);
            }
            ProcessEventKind::PortTaken { port, uid, pids } => {
                self.port_taken(&id, port, uid, &pids, now);
            }
            ProcessEventKind::Health(result) => {
                i.health_running = false;
                match result {
                    Ok(_) => self.event(&id, Event::HealthPassed, now),
                    Err(detail) => {
                        i.logs
                            .push(LogStream::Event, format!("health check failed: {detail}"));
                        self.event(&id, Event::HealthFailed(detail), now);
                    }
                }
            }
        }
    }

    /// `snapshot = true`: before a release's `migrate`, the instance's data directory is
    /// copied beside it (`cp -a --reflink=auto`, as the supervisor's user, so the copy keeps
    /// owners and modes). The copy is this start's first process: a stop or a deadline ends
    /// it like any other.
    fn start_snapshot(&mut self, id: &InstanceId, target: u32, now: Instant) -> Result<(), String> {
        let settings = &self.config.settings;
        let data = settings.instance_data_dir(id);
        spawn::ensure_data_dir(&data).map_err(|e| e.to_string())?;
        let (_, tmp) = snapshot_paths(settings, id);
        remove_aside(&tmp)?;
        // The copy runs as the supervisor's user: it must not fill the file system that the
        // registry is written to. Refused unless the data directory fits in what is free
        // (a reflink copy would need less, but that cannot be known beforehand).
        let needed = procfs::disk_usage(&data);
        if let Some(root) = data.parent() {
            let stat = nix::sys::statvfs::statvfs(root)
                .map_err(|e| format!("cannot read the free space of {}: {e}", root.display()))?;
            let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
            if needed.saturating_mul(11) / 10 > free {
                return Err(format!(
                    "no room for a snapshot of the data directory: it holds {} MiB, {} MiB are free on {}",
                    needed >> 20,
                    free >> 20,
                    root.display()
                ));
            }
        }
        let mut child = tokio::process::Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg("--")
            .arg(&data)
            .arg(&tmp)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run cp for the snapshot: {e}"))?;
        let pid = child.id().map(|p| p as i32).ok_or("cp exited at once")?;
        let instance = self
            .instances
            .get_mut(id)
            .ok_or_else(|| format!("{id} vanished"))?;
        instance.generation += 1;
        let generation = instance.generation;
        instance.start_began = Some(now);
        instance.step = StartStep::Snapshot;
        let logs = instance.logs.clone();
        logs.set_running(true);
        let message = format!("copying the data directory before release {target}'s migrate");
        logs.push(LogStream::Event, message.clone());
        tracing::info!(instance = %id, release = target, "{id}: {message}");
        let mut tasks = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            tasks.push(
                tokio::spawn(read_lines(stderr, logs, LogStream::Stderr, id.clone()))
                    .abort_handle(),
            );
        }
        watch_exit(
            async move { child.wait().await },
            self.tx.clone(),
            id.clone(),
            generation,
        );
        instance.process = Some(Process {
            pid,
            tasks,
            squatter: SquatSeen::default(),
            oom_baseline: None,
        });
        Ok(())
    }

    /// A tenant that failed on a release whose `migrate` had a snapshot gets its data
    /// directory back before it starts again: the directory as the failed release left it is
    /// kept beside it as `.ID.failed` (the one before that is deleted), the copy takes its
    /// place, and the last migrated release is the one before that `migrate`.
    fn restore_if_due(&mut self, id: &InstanceId) -> Result<(), String> {
        let Some(record) = self
            .instances
            .get(id)
            .and_then(|i| i.snapshot)
            .filter(|s| s.restore)
        else {
            return Ok(());
        };
        let settings = &self.config.settings;
        let data = settings.instance_data_dir(id);
        let (snapshot, _) = snapshot_paths(settings, id);
        let failed = data
            .parent()
            .map(|root| root.join(format!(".{}.failed", id.id)))
            .ok_or("a data directory without a parent")?;
        if std::fs::symlink_metadata(&snapshot).is_err() {
            // Deleted by hand, or already put back by a run whose save failed: the data stays
            // as it is, said once.
            let message = format!(
                "the copy {} to put back is missing; the data directory stays as it is",
                snapshot.display()
            );
            tracing::warn!(instance = %id, "{id}: {message}");
            if let Some(i) = self.instances.get_mut(id) {
                i.snapshot = None;
                i.logs.push(LogStream::Event, message);
            }
            if let Err(e) = self.save() {
                tracing::warn!(instance = %id, "cannot save: {e}");
            }
            return Ok(());
        }
        remove_aside(&failed)?;
        if std::fs::symlink_metadata(&data).is_ok() {
            std::fs::rename(&data, &failed)
                .map_err(|e| format!("cannot move {} aside: {e}", data.display()))?;
        }
        std::fs::rename(&snapshot, &data)
            .map_err(|e| format!("cannot restore {}: {e}", data.display()))?;
        let Some(i) = self.instances.get_mut(id) else {
            return Ok(());
        };
        i.snapshot = None;
        i.migrated = record.migrated;
        let message = format!(
            "data directory restored from the copy taken before release {}'s migrate (what release {} left is in {})",
            record.release,
            record.release,
            failed.display()
        );
        i.logs.push(LogStream::Event, message.clone());
        tracing::info!(instance = %id, "{id}: {message}");
        self.save().map_err(|e| e.to_string())
    }

    /// The snapshot's copy ended while the instance starts: on success it replaces the
    /// previous snapshot and the start goes on with `migrate`; on failure the start fails.
    fn snapshot_exited(&mut self, id: &InstanceId, status: String, now: Instant) {
        let settings = self.config.settings.clone();
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        i.step = StartStep::App;
        if let Some(process) = i.process.take() {
            for task in process.tasks {
                task.abort();
            }
        }
        // The release the copy was started for (the target may have moved since: a pin, an abort).
        let target = i.release.unwrap_or(i.target);
        let took = i
            .start_began
            .map_or(0, |began| now.duration_since(began).as_millis());
        let (snapshot, tmp) = snapshot_paths(&settings, id);
        let kept = if exited_cleanly(&status) {
            remove_aside(&snapshot).and_then(|()| {
                std::fs::rename(&tmp, &snapshot)
                    .map_err(|e| format!("cannot keep the snapshot {}: {e}", snapshot.display()))
            })
        } else {
            Err(format!("the copy of the data directory failed ({status})"))
        };
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        match kept {
            Ok(()) => {
                i.snapshot = Some(crate::state::SnapshotRecord {
                    release: target,
                    migrated: i.migrated,
                    on_trial: i.trial.is_some(),
                    restore: false,
                });
                let message = format!("data directory copied in {took} ms");
                i.logs.push(LogStream::Event, message.clone());
                tracing::info!(instance = %id, "{id}: {message}");
                let started = self
                    .save()
                    .map_err(|e| e.to_string())
                    .and_then(|()| self.try_start(id, now));
                if let Err(error) = started {
                    tracing::warn!(instance = %id, "{error}");
                    self.event(id, Event::SpawnFailed(error), now);
                }
            }
            Err(error) => {
                i.logs.set_running(false);
                i.logs.push(LogStream::Event, error.clone());
                i.last_exit = Some(error.clone());
                tracing::warn!(instance = %id, "{id}: {error}");
                let _ = remove_aside(&tmp);
                self.event(id, Event::SpawnFailed(error), now);
            }
        }
    }

    /// The release's `migrate` ended while the instance starts: on success it is recorded (it
    /// never runs again for this tenant and release) and the app starts; on failure the start
    /// fails with its status, and the instance's trial (if a rollout moved it) sends it back.
    fn migrate_exited(&mut self, id: &InstanceId, status: String, now: Instant) {
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        i.step = StartStep::App;
        if let Some(process) = i.process.take() {
            // The helper took its tree down with it; what is left of the group goes now.
            let _ = killpg(Pid::from_raw(process.pid), Signal::SIGKILL);
            for task in process.tasks {
                task.abort();
            }
        }
        self.store.forget_process(id);
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        // The release the migrate was started for (the target may have moved since).
        let target = i.release.unwrap_or(i.target);
        let took = i
            .start_began
            .map_or(0, |began| now.duration_since(began).as_millis());
        if exited_cleanly(&status) {
            i.migrated = Some(target);
            i.logs.push(
                LogStream::Event,
                format!("migrate for release {target} finished in {took} ms"),
            );
            tracing::info!(instance = %id, release = target, "{id}: migrate for release {target} finished in {took} ms");
            if let Err(e) = self.save() {
                let error = format!("migrate finished but cannot be recorded: {e}");
                self.event(id, Event::SpawnFailed(error), now);
                return;
            }
            if let Err(error) = self.try_start(id, now) {
                tracing::warn!(instance = %id, "{error}");
                if let Some(i) = self.instances.get(id) {
                    i.logs
                        .push(LogStream::Event, format!("could not start: {error}"));
                }
                self.event(id, Event::SpawnFailed(error), now);
            }
        } else {
            i.logs.set_running(false);
            let error = format!("migrate for release {target} failed ({status})");
            i.logs.push(LogStream::Event, error.clone());
            i.last_exit = Some(error.clone());
            tracing::warn!(instance = %id, release = target, "{id}: {error}");
            self.event(id, Event::SpawnFailed(error), now);
        }
    }

    /// A stranger listens on `id`'s port while it starts or runs: a security event naming it,
    /// and the instance moves to a new port and starts again at once (`Event::PortTaken`).
    fn port_taken(&mut self, id: &InstanceId, port: u16, uid: u32, pids: &[i32], now: Instant) {
        if let Some(squatter) = self.report_squat(id, port, uid, pids) {
            // A tenant listening on another tenant's port broke the one rule of its network:
            // it is killed and stays failed until an operator restarts it.
            let reason = format!("security: listened on port {port} of {id}");
            self.event(&squatter, Event::Ban(reason), now);
        }
        if let Some(i) = self.instances.get_mut(id) {
            if i.port == Some(port) {
                i.port = None;
                self.ports.release(port);
            }
        }
        if let Err(e) = self.save() {
            tracing::warn!(instance = %id, "cannot save the registry: {e}");
        }
        self.sync_firewall();
        self.event(id, Event::PortTaken, now);
    }

    /// The security event of a squat: who (uid, the instance running as it, pids) listens on
    /// `port`, which belongs to `id`. Nothing is routed to it; `id` moves to a new port.
    /// Returns the squatting instance when the uid is a tenant's own (a dynamic or named user
    /// no other instance shares, never the supervisor's).
    fn report_squat(
        &self,
        id: &InstanceId,
        port: u16,
        uid: u32,
        pids: &[i32],
    ) -> Option<InstanceId> {
        let own_uid = nix::unistd::geteuid().as_raw();
        let mut running_as = self
            .instances
            .values()
            .filter(|other| {
                other.id != *id && other.run_uid == Some(uid) && other.process.is_some()
            })
            .map(|other| other.id.clone());
        let squatter = running_as.next();
        // A uid several instances run as (a shared named user) says nothing about which one.
        let squatter = squatter.filter(|_| running_as.next().is_none() && uid != own_uid);
        let who = match &squatter {
            Some(other) => format!("uid {uid} ({other})"),
            None => format!("uid {uid}"),
        };
        let squatter_name = squatter.as_ref().map(ToString::to_string);
        tracing::warn!(
            target: "tenement::security",
            instance = %id,
            port,
            squatter_uid = uid,
            squatter_instance = squatter_name.as_deref().unwrap_or("-"),
            squatter_pids = ?pids,
            "security: {who} listens on port {port} of {id} (pids {pids:?}); nothing is routed \
             to it, {id} moves to a new port"
        );
        if let Some(i) = self.instances.get(id) {
            i.logs.push(
                LogStream::Event,
                format!("security: {who} took port {port}; moving to a new port"),
            );
        }
        squatter
    }

    /// Starts a health probe when one is due; each runs in its own task.
    pub(super) fn maybe_check_health(&mut self, id: &InstanceId, now: Instant) {
        let Some((path, interval, timeout, listen)) = self.health_of(id) else {
            return;
        };
        let settings = self.config.settings.clone();
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        if i.health_running
            || i.lifecycle.state() != tenement_proto::rpc::InstanceState::Running
            || i.next_health.is_none_or(|at| now < at)
        {
            return;
        }
        i.health_running = true;
        i.next_health = Some(now + interval);
        let address: Address = i.address(listen, &settings);
        let generation = i.generation;
        let tx = self.tx.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let result = probe::check_health(&address, &path, timeout).await;
            let _ = tx
                .send(Command::Process(ProcessEvent {
                    instance: id,
                    generation,
                    kind: ProcessEventKind::Health(result),
                }))
                .await;
        });
    }
}

/// Moves `path` (a directory or file, if there) out of the way at once and deletes it off the
/// actor: a large data directory's copy must not stall the registry.
pub fn remove_aside(path: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let mut trash = path.as_os_str().to_owned();
    trash.push(format!(".trash-{}", crate::logs::now_ms()));
    let trash = std::path::PathBuf::from(trash);
    std::fs::rename(path, &trash)
        .map_err(|e| format!("cannot move {} aside: {e}", path.display()))?;
    tokio::task::spawn_blocking(move || {
        if trash.is_dir() {
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            let _ = std::fs::remove_file(&trash);
        }
    });
    Ok(())
}

/// Waits for a process of an instance to exit (`exited`: tokio's wait of a child, or a pidfd's)
/// and tells the registry how it ended.
fn watch_exit(
    exited: impl std::future::Future<Output = std::io::Result<std::process::ExitStatus>>
        + Send
        + 'static,
    tx: tokio::sync::mpsc::Sender<Command>,
    instance: InstanceId,
    generation: u64,
) {
    tokio::spawn(async move {
        let status = match exited.await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("wait failed: {e}"),
        };
        let _ = tx
            .send(Command::Process(ProcessEvent {
                instance,
                generation,
                kind: ProcessEventKind::Exited(status),
            }))
            .await;
    });
}

/// Whether an exit status (as [`describe_exit`] words it) is a success.
pub fn exited_cleanly(status: &str) -> bool {
    status == "exit status 0"
}

/// Waits until every listener on `port` is the instance's (its uid `own_uid`, or a socket of
/// the tree under `helper`; then the accept queue of the listener a connect reaches: `reached`,
/// when readiness found it, else the one on the loopback address), or a stranger's is found
/// (its uid and pids). Readiness saw something accept on the port, so an empty answer is a
/// listener closing or not yet visible: asked again shortly. A failed sock_diag query is
/// retried too: an instance that cannot be checked is not called ready (its startup_timeout
/// ends the wait).
async fn own_listener(
    port: u16,
    reached: Option<SocketOwner>,
    own_uid: Option<u32>,
    helper: i32,
) -> Result<Option<u32>, (u32, Vec<i32>)> {
    let mut said = false;
    let at = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let backlog_of = |found: &[SocketOwner]| {
        reached
            .map(|l| l.backlog.max(1))
            .or_else(|| ownership::backlog_at(found, at))
    };
    loop {
        let failed = match sockdiag::tcp_listeners(port) {
            Ok(found) if found.is_empty() => None,
            // Of the instance's uid: settled without reading /proc.
            Ok(found) if ownership::all_of_uid(&found, own_uid) => return Ok(backlog_of(&found)),
            Ok(found) => {
                let backlog = backlog_of(&found);
                let judged = tokio::task::spawn_blocking(move || {
                    ownership::judge(Path::new("/proc"), &found, own_uid, Some(helper))
                })
                .await;
                match judged {
                    Ok(Holder::Own) => return Ok(backlog),
                    Ok(Holder::Stranger { uid, pids }) => return Err((uid, pids)),
                    _ => None,
                }
            }
            Err(e) => Some(e),
        };
        if let (Some(e), false) = (failed, said) {
            said = true;
            tracing::warn!(port, "cannot tell who listens on port {port}: {e}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Moves the app's Unix socket from its own directory to `served`, in a directory only the
/// supervisor can change, after checking it is a socket (not a symlink) owned by `owner`; and
/// checks again after the move, since the app could swap the file in between (rename moves
/// whatever is there, never what a symlink points to).
fn publish_socket(app: &Path, served: &Path, owner: u32) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let is_own_socket = |path: &Path| {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == owner)
    };
    if !is_own_socket(app) {
        return Err(format!(
            "{} is not a socket owned by uid {owner} (a symlink or someone else's file)",
            app.display()
        ));
    }
    if let Some(dir) = served.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::rename(app, served)
        .map_err(|e| format!("cannot move {} to {}: {e}", app.display(), served.display()))?;
    if !is_own_socket(served) {
        let _ = std::fs::remove_file(served);
        return Err(format!(
            "{} was swapped for something that is not its socket while it was moved",
            app.display()
        ));
    }
    Ok(())
}

/// The app created its Unix socket with its own umask; the proxy (another user in
/// production) must be able to connect: 0660 for `proxy_user`'s group when we can chown,
/// else 0666. The app owns the directory, so the path may be anything it likes by now: only a
/// socket is touched, and never through a symlink.
fn open_to_proxy(path: &Path, proxy_user: Option<&str>) -> std::io::Result<()> {
    use nix::sys::stat::{fchmodat, FchmodatFlags, Mode};
    use nix::unistd::fchownat;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::other(
            "not a socket (a symlink or a file); left alone",
        ));
    }
    let group = proxy_user
        .filter(|_| nix::unistd::geteuid().is_root())
        .and_then(|name| nix::unistd::User::from_name(name).ok().flatten())
        .map(|user| user.gid);
    let mode = match group {
        Some(gid) => {
            fchownat(
                None,
                path,
                None,
                Some(gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            0o660
        }
        None => 0o666,
    };
    fchmodat(
        None,
        path,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// The policy of an instance whose service left the config: enough to stop it.
fn retired_policy() -> crate::lifecycle::Policy {
    crate::lifecycle::Policy {
        startup_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(10),
        idle_timeout: None,
        unhealthy_threshold: 3,
        max_restarts: 0,
        restart_window: Duration::from_secs(60),
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
    }
}

fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

fn prepare_socket_dir(path: &Path) -> Result<(), String> {
    let dir = path.parent().ok_or("socket path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// `exit status N`, or `signal N (NAME)` for the helper's 128+N convention.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        if code > 128 && code < 128 + 65 {
            let signo = code - 128;
            let name = Signal::try_from(signo).map(|s| s.as_str()).unwrap_or("?");
            return format!("signal {signo} ({name})");
        }
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(signo) => {
            let name = Signal::try_from(signo).map(|s| s.as_str()).unwrap_or("?");
            format!("signal {signo} ({name})")
        }
        None => "unknown status".to_owned(),
    }
}

/// SIGKILL to every descendant of an exec helper and its process group, but not the helper.
pub fn kill_descendants(pid: i32) {
    for p in procfs::tree_of(&procfs::all_processes(Path::new("/proc")), pid) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// SIGKILL to an exec helper's process group and every descendant.
pub fn kill_tree(pid: i32) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    for p in procfs::tree_of(&procfs::all_processes(Path::new("/proc")), pid) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Reads an instance's output line by line as bytes and decodes each lossily: an app's output
/// is not necessarily UTF-8, and a stray byte must neither stop the capture nor leave the
/// pipe unread (the app's next write would get EPIPE).
async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    logs: LogBuffer,
    stream: LogStream,
    id: InstanceId,
) {
    capture_lines(reader, |line| {
        tracing::debug!(target: "instance", instance = %id, "{line}");
        logs.push(stream, line);
    })
    .await;
}

/// Calls `sink` with every line `reader` gives until it ends: `\n`-terminated (a `\r` before
/// it dropped), decoded lossily, one over [`MAX_LINE_LEN`] bytes replaced by a note.
pub async fn capture_lines<R: AsyncRead + Unpin>(reader: R, mut sink: impl FnMut(String)) {
    let codec = AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE_LEN);
    let mut lines = FramedRead::new(reader, codec);
    let mut after_error = false;
    loop {
        match lines.next().await {
            Some(Ok(bytes)) => {
                after_error = false;
                let bytes = bytes.strip_suffix(b"\r").unwrap_or(&bytes);
                sink(String::from_utf8_lossy(bytes).into_owned());
            }
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                after_error = true;
                sink("[line over 8 KiB dropped]".to_owned());
            }
            Some(Err(AnyDelimiterCodecError::Io(_))) => return,
            // After a decoder error the stream yields one `None` and then goes on reading
            // (tokio-util's FramedRead); a second `None` in a row is the end.
            None if after_error => after_error = false,
            None => return,
        }
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    async fn captured(input: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        capture_lines(input, |line| lines.push(line)).await;
        lines
    }

    #[tokio::test]
    async fn bytes_that_are_not_utf8_are_kept_lossily_and_capture_goes_on() {
        let lines = captured(b"before\nbad \xff\xfe byte\r\nafter\nlast without newline").await;
        assert_eq!(
            lines,
            [
                "before",
                "bad \u{fffd}\u{fffd} byte",
                "after",
                "last without newline"
            ]
        );
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_noted_and_capture_goes_on() {
        let mut input = vec![b'x'; MAX_LINE_LEN + 100];
        input.extend_from_slice(b"\nnext\n");
        let lines = captured(&input).await;
        assert_eq!(lines, ["[line over 8 KiB dropped]", "next"]);
    }
}
