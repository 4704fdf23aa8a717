//! Releases and rollouts, carried out: which definition an instance starts with, the
//! `release`, `releases`, `rollout`, `rollback` and `pin` calls, the rollout driven on each
//! tick (planning is `crate::rollout`), and each moved tenant's trial: it bakes on its new
//! release, and goes back to the one before if it fails there.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tenement_proto::config::Service;
use tenement_proto::rpc::{
    ErrorCode, InstanceState, LogStream, ReleaseInfo, Response, RolloutAction, RolloutFailure,
    RolloutInfo, RolloutOptions,
};
use tenement_proto::{InstanceId, ServiceName, TenantId};

use crate::lifecycle::{Event, Policy};
use crate::logs::now_ms;
use crate::releases::{Definition, History};
use crate::rollout::{self, Move, Rollout, Select, Step};
use crate::state::PersistedService;

use super::{policy, Registry, RpcError};

/// The largest `--max-unavailable`.
const MAX_UNAVAILABLE: u32 = 1000;
/// The longest bake.
const MAX_BAKE: Duration = Duration::from_secs(24 * 3600);

/// A tenant an abort moves back: what to undo if the registry cannot be saved.
struct MovedBack {
    id: InstanceId,
    target: u32,
    trial: Option<u32>,
    switch: bool,
}

/// A tenant being switched by a rollout or baking on its new release.
#[derive(Debug, Clone)]
pub struct Switch {
    pub began: Instant,
    pub from: u32,
    pub to: u32,
    pub bake: Duration,
    /// Set once the process on the new release is ready.
    pub bake_until: Option<Instant>,
}

impl Registry {
    /// Gives every configured service its first release (from the config as it is now) and
    /// every instance without a target the service's current release.
    pub(super) fn ensure_releases(&mut self) {
        let now = now_ms();
        for (name, service) in &self.config.services {
            self.services
                .entry(name.clone())
                .or_insert_with(|| PersistedService {
                    history: History::first(Definition::of(service), now),
                    rollout: None,
                });
        }
    }

    /// The current release of `service`, 1 when it has none yet.
    pub(super) fn current_release(&self, service: &ServiceName) -> u32 {
        self.services.get(service).map_or(1, |s| s.history.current)
    }

    /// The service definition `id`'s next start runs: the loaded config's policy with its
    /// target release's definition.
    pub(super) fn service_for(&self, id: &InstanceId) -> Option<Service> {
        let live = self.config.service(&id.service)?;
        let target = self.instances.get(id).map(|i| i.target)?;
        Some(match self.definition(&id.service, target) {
            Some(definition) => definition.apply(live),
            None => live.clone(),
        })
    }

    /// The health check of `id`'s release: path, interval, timeout, and the live `listen`.
    pub(super) fn health_of(
        &self,
        id: &InstanceId,
    ) -> Option<(
        String,
        Duration,
        Duration,
        tenement_proto::config::ListenMode,
    )> {
        let live = self.config.service(&id.service)?;
        let target = self.instances.get(id)?.target;
        Some(match self.definition(&id.service, target) {
            Some(d) => (
                d.health.clone()?,
                d.health_interval,
                d.health_timeout,
                live.listen,
            ),
            None => (
                live.health.clone()?,
                live.health_interval,
                live.health_timeout,
                live.listen,
            ),
        })
    }

    fn definition(&self, service: &ServiceName, release: u32) -> Option<&Definition> {
        Some(&self.services.get(service)?.history.get(release)?.definition)
    }

    /// The lifecycle policy of `id`: the service's, with its release's start and stop times
    /// (and the release's `migrate_timeout` added while a migration is due).
    pub(super) fn policy_for(&self, id: &InstanceId, live: &Service) -> Policy {
        let mut p = policy(live);
        let Some(i) = self.instances.get(id) else {
            return p;
        };
        if let Some(d) = self.definition(&id.service, i.target) {
            p.startup_timeout = d.startup_timeout;
            p.stop_grace = d.stop_grace;
            if d.migrate.is_some() && i.migrate_due() {
                p.startup_timeout = p.startup_timeout.saturating_add(d.migrate_timeout);
            }
        }
        p
    }

    /// `tenctl deploy SERVICE`: a release from the service's definition now, rolled out.
    pub(super) fn make_release(
        &mut self,
        service: &ServiceName,
        options: RolloutOptions,
        origin: &str,
    ) -> Result<Response, RpcError> {
        let live = self.service_of_name(service)?.clone();
        self.refuse_if_rolling(service)?;
        let options = self.check_options(service, options)?;
        let entry = self.services_entry(service)?;
        let before = entry.clone();
        let Some(number) = entry.history.add(Definition::of(&live), origin, now_ms()) else {
            let current = entry.history.current;
            let latest = entry.history.latest().number;
            let message = if latest == current {
                format!("nothing to deploy: {service} is unchanged since release {current} (a path that a symlink points to is read when the release is made)")
            } else {
                format!("nothing new: release {latest} already has this definition; `tenctl rollback {service} --to {latest}` rolls it out")
            };
            return Err(RpcError::new(ErrorCode::BadRequest, message));
        };
        self.begin_rollout(service, number, options, before)
    }

    /// `tenctl rollback SERVICE [--to N]`: roll an earlier release out again.
    pub(super) fn rollback(
        &mut self,
        service: &ServiceName,
        to: Option<u32>,
        options: RolloutOptions,
    ) -> Result<Response, RpcError> {
        self.service_of_name(service)?;
        let entry = self.services_entry(service)?;
        let before = entry.clone();
        let current = entry.history.current;
        let to = match to {
            Some(n) => n,
            None if current > 1 => current - 1,
            None => {
                return Err(RpcError::new(
                    ErrorCode::BadRequest,
                    format!("{service} has no release before {current} to roll back to"),
                ))
            }
        };
        if entry.history.get(to).is_none() {
            return Err(unknown_release(service, to, &entry.history));
        }
        if to == current {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                format!("release {to} is already {service}'s current release"),
            ));
        }
        self.refuse_if_rolling(service)?;
        let options = self.check_options(service, options)?;
        self.begin_rollout(service, to, options, before)
    }

    fn begin_rollout(
        &mut self,
        service: &ServiceName,
        release: u32,
        options: RolloutOptions,
        before: PersistedService,
    ) -> Result<Response, RpcError> {
        let bake = options.bake_ms.map_or_else(
            || {
                self.config
                    .service(service)
                    .map_or(Duration::from_secs(5), |s| s.rollout_bake)
            },
            Duration::from_millis,
        );
        let mut steps = Vec::new();
        if !options.canary.is_empty() {
            steps.push(Step {
                select: Select::List(options.canary.iter().cloned().collect()),
                pause_after: true,
            });
        } else if let Some(share) = options.canary_percent {
            steps.push(Step {
                select: Select::Percent(share),
                pause_after: true,
            });
        }
        for share in &options.steps {
            steps.push(Step {
                select: Select::Percent(*share),
                pause_after: false,
            });
        }
        if !steps
            .last()
            .is_some_and(|s| s.select == Select::Percent(100))
        {
            steps.push(Step {
                select: Select::Percent(100),
                pause_after: false,
            });
        }
        let entry = self.services_entry(service)?;
        let from = entry.history.current;
        entry.history.current = release;
        entry.rollout = Some(Rollout {
            release,
            from,
            steps,
            step: 0,
            max_unavailable: options.max_unavailable.unwrap_or(1),
            bake,
            state: rollout::State::Running,
            moved: BTreeMap::new(),
            failed: BTreeMap::new(),
            started_ms: now_ms(),
        });
        if let Err(e) = self.save() {
            self.services.insert(service.clone(), before);
            return Err(e);
        }
        tracing::info!(service = %service, from, to = release, "{service}: rolling out release {release} (from {from})");
        self.drive_rollout(service, Instant::now());
        Ok(self.releases_response(service))
    }

    pub(super) fn rollout_action(
        &mut self,
        service: &ServiceName,
        action: RolloutAction,
    ) -> Result<Response, RpcError> {
        self.service_of_name(service)?;
        let Some(entry) = self.services.get_mut(service) else {
            return Err(no_rollout(service));
        };
        let before = entry.clone();
        let Some(rollout) = entry.rollout.as_mut() else {
            return Err(no_rollout(service));
        };
        match action {
            RolloutAction::Status => return Ok(self.releases_response(service)),
            RolloutAction::Pause => match rollout.state {
                rollout::State::Running => {
                    rollout.state = rollout::State::Paused("paused by an operator".to_owned())
                }
                rollout::State::Paused(_) => {}
                _ => return Err(finished(service, rollout)),
            },
            RolloutAction::Resume => match rollout.state {
                rollout::State::Running | rollout::State::Paused(_) => rollout.resume(),
                _ => return Err(finished(service, rollout)),
            },
            RolloutAction::Abort => {
                if !rollout.state.unfinished() {
                    return Err(finished(service, rollout));
                }
                rollout.state = rollout::State::Aborted;
                entry.history.current = rollout.from;
            }
        }
        let moved_back = match entry.rollout.as_ref() {
            Some(r) if action == RolloutAction::Abort => {
                let (aborted, from, moved) = (r.release, r.from, r.moved.clone());
                self.move_back(service, aborted, from, &moved)
            }
            _ => Vec::new(),
        };
        if let Err(e) = self.save() {
            self.services.insert(service.clone(), before);
            for back in &moved_back {
                if let Some(i) = self.instances.get_mut(&back.id) {
                    (i.target, i.trial) = (back.target, back.trial);
                }
            }
            return Err(e);
        }
        let now = Instant::now();
        for back in moved_back {
            self.switches.remove(&back.id);
            if back.switch {
                self.switch(&back.id, now);
            }
        }
        tracing::info!(service = %service, action = ?action, "{service}: rollout {action:?}");
        self.drive_rollout(service, now);
        Ok(self.releases_response(service))
    }

    /// Aborting: every tenant of the service on the aborted release goes back, those the
    /// rollout moved to the release each ran before, those registered during it to `from`.
    /// Returns each one's previous target and trial (to undo a failed save), and whether it
    /// runs and must switch.
    fn move_back(
        &mut self,
        service: &ServiceName,
        aborted: u32,
        from: u32,
        moved: &BTreeMap<TenantId, u32>,
    ) -> Vec<MovedBack> {
        let mut back = Vec::new();
        for i in self
            .instances
            .values_mut()
            .filter(|i| &i.id.service == service && i.pinned.is_none() && i.target == aborted)
        {
            let previous = moved.get(&i.id.id).copied().unwrap_or(from);
            if previous == aborted {
                continue;
            }
            back.push(MovedBack {
                id: i.id.clone(),
                target: i.target,
                trial: i.trial,
                switch: i.release != Some(previous)
                    && matches!(
                        i.lifecycle.state(),
                        InstanceState::Running | InstanceState::Starting
                    ),
            });
            i.target = previous;
            i.trial = None;
        }
        back.sort_by(|a, b| a.id.cmp(&b.id));
        back
    }

    /// `tenctl pin INSTANCE N` / `unpin`.
    pub(super) fn pin(
        &mut self,
        id: &InstanceId,
        release: Option<u32>,
    ) -> Result<Response, RpcError> {
        self.service_of_name(&id.service)?;
        if !self.instances.contains_key(id) {
            return Err(RpcError::unknown(id));
        }
        let current = self.current_release(&id.service);
        if let Some(n) = release {
            if let Some(entry) = self.services.get(&id.service) {
                if entry.history.get(n).is_none() {
                    return Err(unknown_release(&id.service, n, &entry.history));
                }
            }
        }
        let Some(i) = self.instances.get_mut(id) else {
            return Err(RpcError::unknown(id));
        };
        let before = (i.pinned, i.target, i.trial);
        i.pinned = release;
        i.target = release.unwrap_or(current);
        i.trial = None;
        let switch = i.release.is_some_and(|r| r != i.target)
            && matches!(
                i.lifecycle.state(),
                InstanceState::Running | InstanceState::Starting
            );
        if let Err(e) = self.save() {
            if let Some(i) = self.instances.get_mut(id) {
                (i.pinned, i.target, i.trial) = before;
            }
            return Err(e);
        }
        self.switches.remove(id);
        tracing::info!(instance = %id, pinned = ?release, "{id}: {}", match release {
            Some(n) => format!("pinned to release {n}"),
            None => format!("unpinned: follows release {current}"),
        });
        if switch {
            self.switch(id, Instant::now());
        }
        Ok(self.releases_response(&id.service))
    }

    /// The answer to every release call: releases, counts of tenants on each, the rollout.
    pub(super) fn releases_response(&self, service: &ServiceName) -> Response {
        let Some(entry) = self.services.get(service) else {
            return Response::Releases {
                service: service.clone(),
                current: 1,
                releases: Vec::new(),
                rollout: None,
            };
        };
        let mut tenants: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
        for i in self.instances.values().filter(|i| &i.id.service == service) {
            let counts = tenants.entry(i.target).or_default();
            counts.0 += 1;
            if i.process.is_some() && i.release == Some(i.target) {
                counts.1 += 1;
            }
        }
        let releases = entry
            .history
            .releases
            .iter()
            .map(|r| {
                let (tenants, running) = tenants.get(&r.number).copied().unwrap_or_default();
                ReleaseInfo {
                    number: r.number,
                    created_ms: r.created_ms,
                    origin: r.origin.clone(),
                    changes: r.changes.clone(),
                    command: r.definition.command_line(),
                    workdir: r.definition.workdir.to_string_lossy().into_owned(),
                    tenants,
                    running,
                }
            })
            .collect();
        let rollout = entry.rollout.as_ref().map(|r| {
            let views = self.tenant_views(service);
            let mut switching: Vec<InstanceId> = self
                .switches
                .keys()
                .filter(|id| &id.service == service)
                .cloned()
                .collect();
            switching.sort();
            Box::new(RolloutInfo {
                release: r.release,
                state: r.state.name().to_owned(),
                reason: match &r.state {
                    rollout::State::Paused(reason) => Some(reason.clone()),
                    _ => None,
                },
                step: (r.step + 1).min(r.steps.len()) as u32,
                steps: r.steps.len() as u32,
                moved: r.moved.len() as u32,
                pending: if r.state.unfinished() {
                    r.pending(&views).len() as u32
                } else {
                    0
                },
                switching,
                failed: r
                    .failed
                    .iter()
                    .map(|(tenant, reason)| RolloutFailure {
                        instance: InstanceId::new(service.clone(), tenant.clone()),
                        reason: reason.clone(),
                    })
                    .collect(),
                started_ms: r.started_ms,
            })
        });
        Response::Releases {
            service: service.clone(),
            current: entry.history.current,
            releases,
            rollout,
        }
    }

    /// The progress of `service`'s rollout while it is running or paused.
    pub(super) fn rollout_progress(
        &self,
        service: &ServiceName,
    ) -> Option<tenement_proto::rpc::RolloutProgress> {
        let r = self
            .services
            .get(service)?
            .rollout
            .as_ref()
            .filter(|r| r.state.unfinished())?;
        let views = self.tenant_views(service);
        Some(tenement_proto::rpc::RolloutProgress {
            release: r.release,
            paused: matches!(r.state, rollout::State::Paused(_)),
            moved: r.moved.len() as u32,
            pending: r.pending(&views).len() as u32,
            switching: views.iter().filter(|v| v.busy).count() as u32,
            failed: r.failed.len() as u32,
        })
    }

    fn tenant_views(&self, service: &ServiceName) -> Vec<rollout::Tenant> {
        let mut views: Vec<rollout::Tenant> = self
            .instances
            .values()
            .filter(|i| &i.id.service == service)
            .map(|i| rollout::Tenant {
                id: i.id.id.clone(),
                state: i.lifecycle.state(),
                target: i.target,
                pinned: i.pinned.is_some(),
                busy: self.switches.contains_key(&i.id),
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }

    /// Every tick: bakes that passed, then each running rollout's next moves.
    pub(super) fn drive_rollouts(&mut self, now: Instant) {
        let baked: Vec<InstanceId> = self
            .switches
            .iter()
            .filter(|(_, s)| s.bake_until.is_some_and(|at| now >= at))
            .map(|(id, _)| id.clone())
            .collect();
        for id in baked {
            self.trial_passed(&id, now);
        }
        let running: Vec<ServiceName> = self
            .services
            .iter()
            .filter(|(_, s)| {
                s.rollout
                    .as_ref()
                    .is_some_and(|r| r.state == rollout::State::Running)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for service in running {
            self.drive_rollout(&service, now);
        }
    }

    fn drive_rollout(&mut self, service: &ServiceName, now: Instant) {
        let views = self.tenant_views(service);
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        let Some(rollout) = entry.rollout.as_mut() else {
            return;
        };
        let rollout_before = rollout.clone();
        let state_before = rollout.state.clone();
        let moves = rollout.plan(&views);
        let (release, bake) = (rollout.release, rollout.bake);
        let mut switch = Vec::new();
        let mut undo = Vec::new();
        for m in &moves {
            let (Move::Retarget(tenant) | Move::Switch(tenant)) = m;
            let id = InstanceId::new(service.clone(), tenant.clone());
            let Some(i) = self.instances.get_mut(&id) else {
                continue;
            };
            let from = i.target;
            undo.push((id.clone(), from, i.trial));
            rollout.moved.entry(tenant.clone()).or_insert(from);
            i.target = release;
            i.trial = Some(from);
            if let Move::Switch(_) = m {
                switch.push((id, from));
            }
        }
        let state_after = rollout.state.clone();
        if moves.is_empty() && state_after == state_before {
            return;
        }
        if state_after != state_before {
            tracing::info!(service = %service, release, state = state_after.name(), "{service}: rollout of release {release} {}", match &state_after {
                rollout::State::Paused(reason) => format!("paused: {reason}"),
                other => other.name().to_owned(),
            });
        }
        if let Err(e) = self.save() {
            // Nothing moves that the registry file does not say: undone, and paused.
            for (id, target, trial) in undo {
                if let Some(i) = self.instances.get_mut(&id) {
                    (i.target, i.trial) = (target, trial);
                }
            }
            if let Some(r) = self
                .services
                .get_mut(service)
                .and_then(|s| s.rollout.as_mut())
            {
                *r = rollout_before;
                r.state = rollout::State::Paused(format!("cannot save the registry: {e}"));
            }
            tracing::warn!(service = %service, "rollout of release {release} paused: cannot save the registry: {e}");
            return;
        }
        for (id, from) in switch {
            self.switches.insert(
                id.clone(),
                Switch {
                    began: now,
                    from,
                    to: release,
                    bake,
                    bake_until: None,
                },
            );
            self.switch(&id, now);
        }
    }

    /// Moves a running instance to its target release (counted as a `rollout` restart): a
    /// drained switch, or a plain restart for one still starting (it serves nobody yet).
    fn switch(&mut self, id: &InstanceId, now: Instant) {
        match self.instances.get(id).map(|i| i.lifecycle.state()) {
            Some(InstanceState::Running) => {
                self.count_restart(id, tenement_proto::rpc::RestartReason::Rollout);
                self.event(id, Event::Switch, now);
            }
            Some(InstanceState::Starting) => {
                self.count_restart(id, tenement_proto::rpc::RestartReason::Rollout);
                self.event(id, Event::Restart, now);
            }
            _ => {}
        }
    }

    /// An instance on trial became ready on its new release: its bake begins (with a health
    /// check at once when the service has one).
    pub(super) fn trial_ready(&mut self, id: &InstanceId, now: Instant) {
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        let Some(from) = i.trial else {
            return;
        };
        let to = i.target;
        if i.next_health.is_some() {
            i.next_health = Some(now);
        }
        let bake = self
            .services
            .get(&id.service)
            .and_then(|s| s.rollout.as_ref())
            .map(|r| r.bake)
            .or_else(|| self.config.service(&id.service).map(|s| s.rollout_bake))
            .unwrap_or(Duration::from_secs(5));
        let switch = self.switches.entry(id.clone()).or_insert(Switch {
            began: now,
            from,
            to,
            bake,
            bake_until: None,
        });
        switch.bake_until = Some(now.checked_add(switch.bake).unwrap_or(now + MAX_BAKE));
    }

    /// After each lifecycle event: an instance on trial that failed on its release (its start,
    /// `migrate`, a crash, a failed health check) goes back.
    pub(super) fn check_trial(&mut self, id: &InstanceId, now: Instant) {
        let Some(i) = self.instances.get(id) else {
            return;
        };
        let on_target = i.release == Some(i.target);
        let state = i.lifecycle.state();
        if self.switches.contains_key(id)
            && (state == InstanceState::Stopped || (state == InstanceState::Failed && !on_target))
        {
            // Stopped in the middle of its switch (an operator, an idle stop), or its old
            // process failed for good while draining: it proves itself at its next start on
            // the release; the rollout does not wait for it.
            self.switches.remove(id);
            return;
        }
        // Judged only on a run of the release it is trying: a tenant that was already failed
        // or backing off when the rollout moved it is not the release's fault.
        if i.trial.is_none() || !on_target {
            return;
        }
        let baking = self
            .switches
            .get(id)
            .is_some_and(|s| s.bake_until.is_some());
        let reason = match i.lifecycle.state() {
            InstanceState::Unhealthy | InstanceState::Failed => i
                .lifecycle
                .reason()
                .unwrap_or_else(|| "it did not start".to_owned()),
            InstanceState::Running if baking && i.lifecycle.health_failures() > 0 => {
                "a health check failed during the bake".to_owned()
            }
            _ => return,
        };
        self.trial_failed(id, reason, now);
    }

    /// The proxy saw 5xx answers from an instance: one that is baking fails its trial.
    pub(super) fn note_server_errors(&mut self, id: &InstanceId, errors: u64, now: Instant) {
        if errors > 0
            && self
                .switches
                .get(id)
                .is_some_and(|s| s.bake_until.is_some())
        {
            let reason = format!("answered {errors} request(s) with 5xx during the bake");
            self.trial_failed(id, reason, now);
        }
    }

    fn trial_passed(&mut self, id: &InstanceId, now: Instant) {
        let Some(switch) = self.switches.remove(id) else {
            return;
        };
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        if i.lifecycle.state() != InstanceState::Running {
            // Not running at the end of its bake (stopped meanwhile): it proves itself at its
            // next start.
            return;
        }
        i.trial = None;
        // Its copy from before the migrate is for a failed trial only: it goes now (space).
        if i.snapshot.take().is_some() {
            let (copy, _) = super::instance::snapshot_paths(&self.config.settings, id);
            if let Err(e) = super::process::remove_aside(&copy) {
                tracing::warn!(instance = %id, "{e}");
            }
        }
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        let elapsed = now.duration_since(switch.began);
        let message = format!(
            "switched from release {} to {} in {} ms",
            switch.from,
            switch.to,
            elapsed.as_millis()
        );
        i.logs.push(LogStream::Event, message.clone());
        tracing::info!(instance = %id, from = switch.from, to = switch.to, duration_ms = elapsed.as_millis() as u64, outcome = "ok", "{id}: {message}");
        if let Err(e) = self.save() {
            tracing::warn!(instance = %id, "cannot save: {e}");
        }
        self.drive_rollout(&id.service.clone(), now);
    }

    fn trial_failed(&mut self, id: &InstanceId, reason: String, now: Instant) {
        let switch = self.switches.remove(id);
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        let Some(previous) = i.trial.take() else {
            return;
        };
        let failed_on = i.target;
        i.target = previous;
        if let Some(record) = i
            .snapshot
            .as_mut()
            .filter(|s| s.release == failed_on && s.on_trial)
        {
            // Its data goes back to the copy taken before the release's migrate, at its next
            // start (once its process is gone).
            record.restore = true;
        }
        let message =
            format!("failed on release {failed_on} ({reason}); back to release {previous}");
        i.logs.push(LogStream::Event, message.clone());
        let elapsed = switch.map_or(0, |s| now.duration_since(s.began).as_millis() as u64);
        tracing::warn!(instance = %id, from = previous, to = failed_on, duration_ms = elapsed, outcome = "failed", "{id}: {message}");
        if let Some(rollout) = self
            .services
            .get_mut(&id.service)
            .and_then(|s| s.rollout.as_mut())
            .filter(|r| r.release == failed_on)
        {
            rollout.fail(
                &id.id,
                format!("{id} failed on release {failed_on}: {reason}"),
            );
        }
        if let Err(e) = self.save() {
            tracing::warn!(instance = %id, "cannot save: {e}");
        }
        // Back on the release it came from, now: waiting requests are served by it. A tenant
        // still running (it failed its bake) is drained first, like any switch; one that
        // failed to start starts again at once. One being stopped or removed, or failed for
        // good (a ban), is left as it is: it starts on its previous release when it is next
        // asked to.
        match self.instances.get(id).map(|i| i.lifecycle.state()) {
            Some(InstanceState::Running) => self.switch(id, now),
            Some(InstanceState::Unhealthy) => self.event(id, Event::Restart, now),
            _ => {}
        }
    }

    /// A reload changed `service`: a new release if its definition changed, rolled out by
    /// its `rollout` policy (`restart`: every tenant that is not pinned gets it at once, the
    /// caller restarts the running ones). Returns the new release's number.
    pub(super) fn release_on_reload(&mut self, service: &ServiceName, origin: &str) -> Option<u32> {
        let live = self.config.service(service)?.clone();
        let entry = self.services.get_mut(service)?;
        let before = entry.clone();
        let number = entry.history.add(Definition::of(&live), origin, now_ms())?;
        if live.rollout == tenement_proto::config::RolloutPolicy::Restart {
            entry.history.current = number;
            if let Some(r) = entry.rollout.as_mut().filter(|r| r.state.unfinished()) {
                r.state = rollout::State::Aborted;
            }
            let mut undo = Vec::new();
            for i in self
                .instances
                .values_mut()
                .filter(|i| &i.id.service == service && i.pinned.is_none())
            {
                undo.push((i.id.clone(), i.target, i.trial));
                i.target = number;
                i.trial = None;
            }
            if let Err(e) = self.save() {
                // Not saved, not made: the running instances are not restarted either.
                self.services.insert(service.clone(), before);
                for (id, target, trial) in undo {
                    if let Some(i) = self.instances.get_mut(&id) {
                        (i.target, i.trial) = (target, trial);
                    }
                }
                tracing::warn!(service = %service, "release {number} not made: cannot save the registry: {e}");
                return None;
            }
            self.switches.retain(|id, _| &id.service != service);
            return Some(number);
        }
        // A rollout still going is overtaken by this one: tenants not yet moved go straight to
        // the newest release.
        if let Some(r) = entry.rollout.as_mut().filter(|r| r.state.unfinished()) {
            r.state = rollout::State::Aborted;
        }
        match self.begin_rollout(service, number, RolloutOptions::default(), before) {
            Ok(_) => Some(number),
            Err(e) => {
                tracing::warn!(service = %service, "cannot roll out release {number}: {e}");
                None
            }
        }
    }

    fn refuse_if_rolling(&self, service: &ServiceName) -> Result<(), RpcError> {
        match self
            .services
            .get(service)
            .and_then(|s| s.rollout.as_ref())
            .filter(|r| r.state.unfinished())
        {
            Some(r) => Err(RpcError::new(
                ErrorCode::BadRequest,
                format!(
                    "{service} is rolling out release {} ({}); `tenctl rollout resume|abort {service}` first",
                    r.release,
                    r.state.name()
                ),
            )),
            None => Ok(()),
        }
    }

    fn check_options(
        &self,
        service: &ServiceName,
        options: RolloutOptions,
    ) -> Result<RolloutOptions, RpcError> {
        let bad = |message: String| Err(RpcError::new(ErrorCode::BadRequest, message));
        if !options.canary.is_empty() && options.canary_percent.is_some() {
            return bad("--canary takes a list of tenants or a share, not both".to_owned());
        }
        if let Some(share) = options.canary_percent {
            if !(1..=99).contains(&share) {
                return bad(format!("--canary {share}% must be 1% to 99%"));
            }
        }
        for tenant in &options.canary {
            let id = InstanceId::new(service.clone(), tenant.clone());
            if !self.instances.contains_key(&id) {
                return bad(format!("--canary {tenant}: {id} is not registered"));
            }
        }
        let mut last = 0;
        for &share in &options.steps {
            if share <= last || share > 100 {
                return bad(format!(
                    "--steps must rise from 1% to at most 100% ({share}% after {last}%)"
                ));
            }
            last = share;
        }
        if options
            .max_unavailable
            .is_some_and(|n| n == 0 || n > MAX_UNAVAILABLE)
        {
            return bad(format!("--max-unavailable must be 1 to {MAX_UNAVAILABLE}"));
        }
        if options
            .bake_ms
            .is_some_and(|ms| Duration::from_millis(ms) > MAX_BAKE)
        {
            return bad("--bake must be at most 24h".to_owned());
        }
        Ok(options)
    }

    fn services_entry(&mut self, service: &ServiceName) -> Result<&mut PersistedService, RpcError> {
        self.ensure_releases();
        let path = self.config.path.display().to_string();
        self.services.get_mut(service).ok_or_else(|| {
            RpcError::new(
                ErrorCode::UnknownService,
                format!("no service {service} in {path}; add [service.{service}]"),
            )
        })
    }

    pub(super) fn service_of_name(&self, service: &ServiceName) -> Result<&Service, RpcError> {
        self.config.service(service).ok_or_else(|| {
            RpcError::new(
                ErrorCode::UnknownService,
                format!(
                    "no service {service} in {}; add [service.{service}]",
                    self.config.path.display()
                ),
            )
        })
    }
}

fn unknown_release(service: &ServiceName, n: u32, history: &History) -> RpcError {
    RpcError::new(
        ErrorCode::BadRequest,
        format!(
            "{service} has no release {n}; its releases are 1 to {}",
            history.latest().number
        ),
    )
}

fn no_rollout(service: &ServiceName) -> RpcError {
    RpcError::new(
        ErrorCode::BadRequest,
        format!("{service} has no rollout; `tenctl deploy {service}` starts one"),
    )
}

fn finished(service: &ServiceName, rollout: &Rollout) -> RpcError {
    RpcError::new(
        ErrorCode::BadRequest,
        format!(
            "the rollout of {service} release {} is {}",
            rollout.release,
            rollout.state.name()
        ),
    )
}
