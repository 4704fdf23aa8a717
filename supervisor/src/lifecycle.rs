//! The instance lifecycle as a pure state machine: `(state, event, now) -> actions`.
//!
//! No I/O, no tokio, no clock of its own: the registry feeds it events with the current time
//! and carries out the [`Action`]s it returns. That keeps every policy decision (backoff,
//! thresholds, `failed`, idle deadlines, the park handshake) testable with plain values.
//!
//! ```text
//!  stopped --wake--> starting --ready--> running --idle+park ok--> stopping --exit--> stopped
//!                       |                   |  \--health x N / crash--> (stopping) --> unhealthy
//!                       |                   |                                   |  backoff
//!                       +--exit/timeout-----+--------> unhealthy --restart_at---+--> starting
//!                      more than max_restarts in restart_window: failed (until an operator acts)
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tenement_proto::rpc::{InstanceState, RestartReason};

/// How long the proxy has to answer a park request before it counts as refused.
pub const PARK_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The service settings the lifecycle needs; copied from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub startup_timeout: Duration,
    pub stop_grace: Duration,
    pub idle_timeout: Option<Duration>,
    pub unhealthy_threshold: u32,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Why an instance stops or failed to start; carried into errors and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The process could not be started at all.
    SpawnError(String),
    /// The process exited while starting.
    ExitedDuringStart(String),
    /// Not ready within `startup_timeout`.
    StartupTimeout,
    /// The process exited while running.
    Crashed(String),
    /// `unhealthy_threshold` consecutive failed health checks.
    Unhealthy(String),
}

impl Failure {
    /// What a restart after this failure is counted as.
    pub fn restart_reason(&self) -> RestartReason {
        match self {
            Failure::Crashed(_) => RestartReason::Crash,
            Failure::Unhealthy(_) => RestartReason::Health,
            Failure::SpawnError(_) | Failure::ExitedDuringStart(_) | Failure::StartupTimeout => {
                RestartReason::StartFailed
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::SpawnError(e) => write!(f, "could not start: {e}"),
            Failure::ExitedDuringStart(status) => write!(f, "exited while starting ({status})"),
            Failure::StartupTimeout => write!(f, "not ready within startup_timeout"),
            Failure::Crashed(status) => write!(f, "crashed ({status})"),
            Failure::Unhealthy(detail) => write!(f, "failed its health checks ({detail})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Someone wants the instance running (wake, spawn, a request through the proxy).
    Wake,
    /// The process was started.
    Spawned,
    /// Starting the process failed before it ran.
    SpawnFailed(String),
    /// The readiness check passed.
    Ready,
    /// The process tree exited; the text describes the status.
    Exited(String),
    HealthPassed,
    HealthFailed(String),
    /// An operator asked for a stop.
    Stop,
    /// An operator asked for a restart (also clears `failed`).
    Restart,
    /// A rollout moves the running instance to another release: requests are held in the
    /// proxy (a drain park), those in flight finish (at most `stop_grace`), then the process
    /// stops and starts again at once.
    Switch,
    /// The instance moved to another fleet host: parked like a switch (requests inside
    /// finish, new ones wait), then stopped, and it stays stopped.
    Handoff,
    /// The proxy reported activity: `in_flight` open now, `started` new since the last report.
    Activity {
        in_flight: u32,
        started: u64,
    },
    /// Something else listens on the instance's port (a co-tenant took it while it was free):
    /// the instance moves to a new port and starts again at once. Not the app's failure, so
    /// it counts neither as a crash nor as a restart.
    PortTaken,
    /// The instance broke the rules of its tenancy (it listened on another instance's port):
    /// killed at once and `failed` until an operator restarts it.
    Ban(String),
    /// The proxy answered a park request.
    ParkAnswered {
        park_id: u64,
        accepted: bool,
    },
    /// Time passed; deadlines are checked.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a new process (the registry bumps the generation).
    Spawn,
    /// SIGTERM to the process tree.
    Terminate,
    /// SIGKILL to the process tree.
    Kill,
    /// Everyone waiting for this instance may proceed: it is ready.
    WakeWaiters,
    /// Everyone waiting gets this error.
    FailWaiters(WaitError),
    /// Ask the proxy to park the instance before an idle stop.
    SendPark(u64),
    /// Ask the proxy to park the instance whatever is in flight (new requests wait, those
    /// inside finish) before a switch.
    SendDrain(u64),
    /// The routed state changed: push a route update to proxies.
    PublishRoute,
    /// A lifecycle event worth a log line.
    Log(String),
    /// The instance starts again on its own after a failure (counted for the metrics; an
    /// operator's or a reload's restart is counted where it is asked for).
    Restarted(RestartReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// The start failed; the instance may retry later per policy.
    StartFailed(Failure),
    /// Too many restarts: the instance is failed.
    Failed(String),
    /// An operator stopped it while someone waited.
    Stopped,
}

/// Why the process is being stopped; decides what happens when it has exited.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopReason {
    Idle,
    Operator,
    /// Restart requested by an operator: start again at once.
    Restart,
    /// The port was taken by someone else: start again at once on a new one.
    Relocate,
    /// A rollout's switch: start again at once (on the release the registry now gives).
    Switch,
    /// Banned (`Event::Ban`): failed once stopped, whatever the restart policy.
    Ban(String),
    /// A policy failure: go to unhealthy (backoff) or failed.
    Failure(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Stopped,
    Starting {
        deadline: Instant,
    },
    Running {
        since: Instant,
        /// A park request waiting for the proxy's answer.
        parking: Option<u64>,
    },
    /// Running, parked for a switch: waiting for the requests in flight to finish.
    Draining {
        since: Instant,
        park_id: u64,
        /// Every proxy has parked it (and reported what was in flight then).
        parked: bool,
        /// A handoff to another fleet host: stopped, not started again, once drained.
        then_stop: bool,
    },
    Stopping {
        reason: StopReason,
        kill_at: Option<Instant>,
        /// A wake arrived while stopping: start again once stopped.
        then_start: bool,
    },
    Unhealthy {
        restart_at: Instant,
        failure: Failure,
    },
    Failed {
        reason: String,
    },
}

/// One instance's lifecycle state.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    /// Failures inside the current restart window.
    failures: VecDeque<Instant>,
    /// Failures since the last healthy period; the backoff exponent.
    consecutive_failures: u32,
    health_failures: u32,
    pub restarts: u32,
    in_flight: u32,
    last_activity: Instant,
    next_park_id: u64,
    /// When the pending park request was sent.
    park_sent_at: Option<Instant>,
    /// The process is alive (spawned and not yet exited).
    process_alive: bool,
    last_failure: Option<String>,
}

impl Lifecycle {
    pub fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Stopped,
            failures: VecDeque::new(),
            consecutive_failures: 0,
            health_failures: 0,
            restarts: 0,
            in_flight: 0,
            last_activity: now,
            next_park_id: 1,
            park_sent_at: None,
            process_alive: false,
            last_failure: None,
        }
    }

    pub fn state(&self) -> InstanceState {
        match self.phase {
            Phase::Stopped => InstanceState::Stopped,
            Phase::Starting { .. } => InstanceState::Starting,
            Phase::Running { .. } => InstanceState::Running,
            Phase::Draining { .. } | Phase::Stopping { .. } => InstanceState::Stopping,
            Phase::Unhealthy { .. } => InstanceState::Unhealthy,
            Phase::Failed { .. } => InstanceState::Failed,
        }
    }

    /// When the process became ready, if it is running.
    pub fn running_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running { since, .. } => Some(since),
            _ => None,
        }
    }

    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn health_failures(&self) -> u32 {
        self.health_failures
    }

    /// Why the instance is unhealthy or failed, or what last went wrong.
    pub fn reason(&self) -> Option<String> {
        match &self.phase {
            Phase::Failed { reason } => Some(reason.clone()),
            Phase::Unhealthy { failure, .. } => Some(failure.to_string()),
            // Serving again: the last exit says what happened before, there is no reason now.
            Phase::Running { .. } => None,
            _ => self.last_failure.clone(),
        }
    }

    /// Whether the instance needs `Tick`s (has a deadline or may go idle).
    pub fn needs_ticks(&self) -> bool {
        !matches!(self.phase, Phase::Stopped | Phase::Failed { .. })
    }

    /// The backoff before restart number `n` (1-based): base * 2^(n-1), capped.
    pub fn backoff(policy: &Policy, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        policy
            .backoff_base
            .checked_mul(factor)
            .unwrap_or(policy.backoff_max)
            .min(policy.backoff_max)
    }

    pub fn handle(&mut self, event: Event, now: Instant, policy: &Policy) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Wake => self.on_wake(now, policy, &mut actions),
            Event::Spawned => self.process_alive = true,
            Event::SpawnFailed(error) => {
                self.process_alive = false;
                if let Phase::Starting { .. } = self.phase {
                    self.fail_start(Failure::SpawnError(error), now, policy, &mut actions);
                }
            }
            Event::Ready => {
                if let Phase::Starting { .. } = self.phase {
                    self.phase = Phase::Running {
                        since: now,
                        parking: None,
                    };
                    self.health_failures = 0;
                    self.last_activity = now;
                    actions.push(Action::WakeWaiters);
                    actions.push(Action::PublishRoute);
                }
            }
            Event::Exited(status) => self.on_exit(status, now, policy, &mut actions),
            Event::HealthPassed => {
                self.health_failures = 0;
            }
            Event::HealthFailed(detail) => {
                if let Phase::Running { .. } = self.phase {
                    self.health_failures += 1;
                    if self.health_failures >= policy.unhealthy_threshold {
                        let failure = Failure::Unhealthy(detail);
                        actions.push(Action::Log(format!(
                            "{failure} {} times in a row; restarting",
                            self.health_failures
                        )));
                        self.begin_stop(StopReason::Failure(failure), now, policy, &mut actions);
                    }
                }
            }
            Event::Stop => match self.phase {
                Phase::Starting { .. } | Phase::Running { .. } => {
                    actions.push(Action::FailWaiters(WaitError::Stopped));
                    self.begin_stop(StopReason::Operator, now, policy, &mut actions);
                }
                Phase::Draining { .. } => {
                    actions.push(Action::FailWaiters(WaitError::Stopped));
                    self.begin_stop(StopReason::Operator, now, policy, &mut actions);
                }
                Phase::Stopping {
                    ref mut then_start,
                    ref mut reason,
                    ..
                } => {
                    *then_start = false;
                    *reason = StopReason::Operator;
                }
                Phase::Unhealthy { .. } | Phase::Failed { .. } => {
                    actions.push(Action::FailWaiters(WaitError::Stopped));
                    self.phase = Phase::Stopped;
                    self.reset_failures();
                    actions.push(Action::PublishRoute);
                }
                Phase::Stopped => {}
            },
            Event::Restart => {
                self.reset_failures();
                self.last_failure = None;
                match self.phase {
                    Phase::Starting { .. } | Phase::Running { .. } | Phase::Draining { .. } => {
                        self.begin_stop(StopReason::Restart, now, policy, &mut actions);
                    }
                    // Whatever the stop was for (idle, operator, a failure), start again as
                    // soon as the process has exited: no backoff for an operator's restart.
                    Phase::Stopping { ref mut reason, .. } => *reason = StopReason::Restart,
                    Phase::Stopped | Phase::Unhealthy { .. } | Phase::Failed { .. } => {
                        self.start(now, policy, &mut actions);
                    }
                }
            }
            Event::Switch | Event::Handoff => {
                let then_stop = event == Event::Handoff;
                match self.phase {
                    Phase::Running { .. } => {
                        let park_id = self.next_park_id;
                        self.next_park_id += 1;
                        self.park_sent_at = None;
                        self.phase = Phase::Draining {
                            since: now,
                            park_id,
                            parked: false,
                            then_stop,
                        };
                        actions.push(Action::Log(
                            if then_stop {
                                "moved to another fleet host: draining, then stopping"
                            } else {
                                "switching release: draining"
                            }
                            .to_owned(),
                        ));
                        actions.push(Action::SendDrain(park_id));
                    }
                    Phase::Draining {
                        then_stop: ref mut stop,
                        ..
                    } if then_stop => *stop = true,
                    // Nothing serves yet: a handoff is a plain stop.
                    Phase::Starting { .. } if then_stop => {
                        actions.push(Action::FailWaiters(WaitError::Stopped));
                        self.begin_stop(StopReason::Operator, now, policy, &mut actions);
                    }
                    _ => {}
                }
            }
            Event::Activity { in_flight, started } => {
                // New requests, open ones, or the last open ones just ending: the idle clock
                // starts again from now (a websocket closing after an hour is not an hour idle).
                if started > 0 || in_flight > 0 || self.in_flight > 0 {
                    self.last_activity = now;
                }
                self.in_flight = in_flight;
                self.maybe_drained(now, policy, &mut actions);
            }
            Event::ParkAnswered { park_id, accepted } => {
                if let Phase::Draining {
                    park_id: pending,
                    ref mut parked,
                    ..
                } = self.phase
                {
                    if pending == park_id && accepted {
                        *parked = true;
                    }
                    self.maybe_drained(now, policy, &mut actions);
                }
                if let Phase::Running {
                    parking: Some(pending),
                    ..
                } = self.phase
                {
                    if pending == park_id {
                        if accepted && self.in_flight == 0 {
                            actions.push(Action::Log("idle: stopping".to_owned()));
                            self.begin_stop(StopReason::Idle, now, policy, &mut actions);
                        } else {
                            // Something arrived meanwhile: the idle clock starts again.
                            self.set_parking(None);
                            self.last_activity = now;
                        }
                    }
                }
            }
            Event::PortTaken => match self.phase {
                Phase::Starting { .. } | Phase::Running { .. } | Phase::Draining { .. } => {
                    actions.push(Action::Log(
                        "another program listens on this instance's port: moving to a new port"
                            .to_owned(),
                    ));
                    self.begin_stop(StopReason::Relocate, now, policy, &mut actions);
                }
                // Stopping: it starts again (or not) as it was going to, and the next start
                // finds the port taken and moves. Otherwise nothing runs on the port.
                _ => {}
            },
            Event::Ban(reason) => self.ban(reason, &mut actions),
            Event::Tick => self.on_tick(now, policy, &mut actions),
        }
        actions
    }

    /// The proxy is gone: forget its in-flight counts and any park waiting for it.
    pub fn forget_proxy(&mut self, now: Instant) {
        self.in_flight = 0;
        if let Phase::Running {
            parking: Some(_), ..
        } = self.phase
        {
            self.set_parking(None);
            self.last_activity = now;
        }
    }

    /// A draining instance stops once every proxy parked it and nothing is in flight.
    fn maybe_drained(&mut self, now: Instant, policy: &Policy, actions: &mut Vec<Action>) {
        if let Phase::Draining {
            parked: true,
            then_stop,
            ..
        } = self.phase
        {
            if self.in_flight == 0 {
                self.begin_stop(Self::after_drain(then_stop), now, policy, actions);
            }
        }
    }

    /// What a drained instance's stop is for: a switch starts it again, a handoff does not.
    fn after_drain(then_stop: bool) -> StopReason {
        if then_stop {
            StopReason::Operator
        } else {
            StopReason::Switch
        }
    }

    fn set_parking(&mut self, value: Option<u64>) {
        self.park_sent_at = None;
        if let Phase::Running {
            ref mut parking, ..
        } = self.phase
        {
            *parking = value;
        }
    }

    fn on_wake(&mut self, now: Instant, policy: &Policy, actions: &mut Vec<Action>) {
        self.last_activity = now;
        match self.phase {
            Phase::Stopped => self.start(now, policy, actions),
            Phase::Running { parking, .. } => {
                if parking.is_some() {
                    // A wake while parking means traffic: cancel the idle stop.
                    self.set_parking(None);
                }
                actions.push(Action::WakeWaiters);
            }
            Phase::Stopping {
                ref mut then_start,
                ref reason,
                ..
            } => {
                if !matches!(reason, StopReason::Failure(_)) {
                    *then_start = true;
                }
            }
            Phase::Failed { ref reason } => {
                actions.push(Action::FailWaiters(WaitError::Failed(reason.clone())));
            }
            // Starting: the waiter joins the start in progress. Unhealthy: it waits for the
            // scheduled restart (or its own deadline). Draining: it waits for the switch.
            Phase::Starting { .. } | Phase::Unhealthy { .. } | Phase::Draining { .. } => {}
        }
    }

    fn start(&mut self, now: Instant, policy: &Policy, actions: &mut Vec<Action>) {
        self.phase = Phase::Starting {
            deadline: now + policy.startup_timeout,
        };
        self.in_flight = 0;
        self.last_activity = now;
        actions.push(Action::Spawn);
        actions.push(Action::PublishRoute);
    }

    fn begin_stop(
        &mut self,
        reason: StopReason,
        now: Instant,
        policy: &Policy,
        actions: &mut Vec<Action>,
    ) {
        if let Phase::Running { since, .. } = self.phase {
            self.note_healthy_period(since, now, policy);
        }
        if !self.process_alive {
            // Nothing to signal: treat as exited at once.
            self.phase = Phase::Stopping {
                reason,
                kill_at: None,
                then_start: false,
            };
            self.on_exit("not running".to_owned(), now, policy, actions);
            return;
        }
        self.phase = Phase::Stopping {
            reason,
            kill_at: Some(now + policy.stop_grace),
            then_start: false,
        };
        actions.push(Action::Terminate);
        actions.push(Action::PublishRoute);
    }

    fn on_exit(
        &mut self,
        status: String,
        now: Instant,
        policy: &Policy,
        actions: &mut Vec<Action>,
    ) {
        self.process_alive = false;
        self.in_flight = 0;
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Starting { .. } => {
                self.fail_start(Failure::ExitedDuringStart(status), now, policy, actions);
            }
            Phase::Running { since, .. } => {
                self.note_healthy_period(since, now, policy);
                self.fail(Failure::Crashed(status), now, policy, actions);
            }
            Phase::Draining { .. } => self.fail(Failure::Crashed(status), now, policy, actions),
            Phase::Stopping {
                reason, then_start, ..
            } => match reason {
                StopReason::Failure(failure) => self.fail(failure, now, policy, actions),
                StopReason::Restart => {
                    self.restarts += 1;
                    self.start(now, policy, actions);
                }
                StopReason::Relocate | StopReason::Switch => self.start(now, policy, actions),
                StopReason::Ban(reason) => {
                    actions.push(Action::FailWaiters(WaitError::Failed(reason.clone())));
                    self.phase = Phase::Failed { reason };
                    actions.push(Action::PublishRoute);
                }
                StopReason::Idle | StopReason::Operator => {
                    // An idle stop ends a run that served and went quiet: as healthy a period
                    // as `restart_window` of running, which an instance that idles out sooner
                    // would never reach. The failures stay counted for `max_restarts`.
                    if matches!(reason, StopReason::Idle) {
                        self.consecutive_failures = 0;
                    }
                    actions.push(Action::Log(format!("stopped ({status})")));
                    if then_start {
                        self.start(now, policy, actions);
                    } else {
                        actions.push(Action::PublishRoute);
                    }
                }
            },
            // A late exit of an older process: nothing changes.
            other => self.phase = other,
        }
    }

    /// Kills the process at once (no grace: it is hostile) and ends in `failed`.
    fn ban(&mut self, reason: String, actions: &mut Vec<Action>) {
        actions.push(Action::Log(format!("failed: {reason}")));
        actions.push(Action::FailWaiters(WaitError::Failed(reason.clone())));
        if self.process_alive {
            self.phase = Phase::Stopping {
                reason: StopReason::Ban(reason),
                kill_at: None,
                then_start: false,
            };
            actions.push(Action::Kill);
        } else {
            self.phase = Phase::Failed { reason };
        }
        actions.push(Action::PublishRoute);
    }

    /// A start failed: its waiters hear of it at once (not after the stop grace), exactly once;
    /// then the usual failure handling.
    fn fail_start(
        &mut self,
        failure: Failure,
        now: Instant,
        policy: &Policy,
        actions: &mut Vec<Action>,
    ) {
        actions.push(Action::FailWaiters(WaitError::StartFailed(failure.clone())));
        self.fail(failure, now, policy, actions);
    }

    /// A failure: stop the process if it lives, then back off or fail for good.
    ///
    /// Called a second time with the same failure once a process stopped for it has exited, so
    /// it must not fail waiters itself: those that arrived meanwhile wait for the restart.
    fn fail(&mut self, failure: Failure, now: Instant, policy: &Policy, actions: &mut Vec<Action>) {
        if self.process_alive {
            self.begin_stop(StopReason::Failure(failure), now, policy, actions);
            return;
        }
        self.last_failure = Some(failure.to_string());
        while self
            .failures
            .front()
            .is_some_and(|&t| now.duration_since(t) > policy.restart_window)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        self.consecutive_failures += 1;
        if self.failures.len() as u32 > policy.max_restarts {
            let reason = format!(
                "{failure}; {} failures within {}s (max_restarts = {})",
                self.failures.len(),
                policy.restart_window.as_secs(),
                policy.max_restarts
            );
            actions.push(Action::Log(format!("failed: {reason}")));
            actions.push(Action::FailWaiters(WaitError::Failed(reason.clone())));
            self.phase = Phase::Failed { reason };
        } else {
            let delay = Self::backoff(policy, self.consecutive_failures);
            actions.push(Action::Log(format!(
                "{failure}; restarting in {} ms",
                delay.as_millis()
            )));
            self.phase = Phase::Unhealthy {
                restart_at: now + delay,
                failure,
            };
        }
        actions.push(Action::PublishRoute);
    }

    /// Running since `since` for at least `restart_window` is a healthy period: it resets the
    /// backoff exponent. Checked on every tick and whenever the instance leaves running, so
    /// the outcome does not depend on how often the registry ticks.
    fn note_healthy_period(&mut self, since: Instant, now: Instant, policy: &Policy) {
        if now.duration_since(since) >= policy.restart_window {
            self.consecutive_failures = 0;
        }
    }

    fn reset_failures(&mut self) {
        self.failures.clear();
        self.consecutive_failures = 0;
        self.health_failures = 0;
    }

    fn on_tick(&mut self, now: Instant, policy: &Policy, actions: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting { deadline } if now >= deadline => {
                self.fail_start(Failure::StartupTimeout, now, policy, actions);
            }
            Phase::Running { since, parking } => {
                self.note_healthy_period(since, now, policy);
                let Some(idle_timeout) = policy.idle_timeout else {
                    return;
                };
                if parking.is_some()
                    && self
                        .park_sent_at
                        .is_some_and(|at| now.duration_since(at) >= PARK_ANSWER_TIMEOUT)
                {
                    // No answer from the proxy: as safe as a refusal, and the idle clock
                    // starts again so the next try comes one idle_timeout later.
                    actions.push(Action::Log(
                        "the proxy did not answer the park request; idle stop postponed".to_owned(),
                    ));
                    self.set_parking(None);
                    self.last_activity = now;
                    return;
                }
                if parking.is_none()
                    && self.in_flight == 0
                    && now.duration_since(self.last_activity) >= idle_timeout
                {
                    let park_id = self.next_park_id;
                    self.next_park_id += 1;
                    self.set_parking(Some(park_id));
                    self.park_sent_at = Some(now);
                    actions.push(Action::SendPark(park_id));
                }
            }
            Phase::Draining {
                since, then_stop, ..
            } if now >= since + policy.stop_grace => {
                actions.push(Action::Log(format!(
                    "requests still in flight {} ms after the drain began: stopping anyway",
                    policy.stop_grace.as_millis()
                )));
                self.begin_stop(Self::after_drain(then_stop), now, policy, actions);
            }
            Phase::Draining { .. } => self.maybe_drained(now, policy, actions),
            Phase::Stopping {
                kill_at: Some(kill_at),
                ref reason,
                then_start,
            } if now >= kill_at => {
                actions.push(Action::Log(format!(
                    "still running {} ms after SIGTERM: SIGKILL",
                    policy.stop_grace.as_millis()
                )));
                actions.push(Action::Kill);
                self.phase = Phase::Stopping {
                    reason: reason.clone(),
                    kill_at: None,
                    then_start,
                };
            }
            Phase::Unhealthy {
                restart_at,
                ref failure,
            } if now >= restart_at => {
                actions.push(Action::Restarted(failure.restart_reason()));
                self.restarts += 1;
                self.start(now, policy, actions);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod relocation_tests;
#[cfg(test)]
mod tests;
