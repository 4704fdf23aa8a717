//! Table-driven tests of the lifecycle machine. Time is plain `Instant`s built from one `t0`
//! plus milliseconds ("paused time"): nothing sleeps, every test runs in microseconds.

use super::*;
use Action::*;
use Event::*;
use InstanceState as S;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The policy most tests use. Keep the numbers in mind when reading the tables:
/// startup 10 s, stop grace 5 s, idle 300 s, 3 health failures, more than 3 failures in 60 s
/// is `failed`, backoff 500 ms doubling up to 30 s.
fn policy() -> Policy {
    Policy {
        startup_timeout: ms(10_000),
        stop_grace: ms(5_000),
        idle_timeout: Some(ms(300_000)),
        unhealthy_threshold: 3,
        max_restarts: 3,
        restart_window: ms(60_000),
        backoff_base: ms(500),
        backoff_max: ms(30_000),
    }
}

/// `policy()` with room for many restarts and no idle stop, to watch backoff alone.
fn crash_loop_policy() -> Policy {
    Policy {
        max_restarts: 100,
        idle_timeout: None,
        ..policy()
    }
}

fn exited() -> Event {
    Exited("exit status: 1".to_owned())
}

fn health_failed() -> Event {
    HealthFailed("GET /health: timeout".to_owned())
}

fn park(park_id: u64, accepted: bool) -> Event {
    ParkAnswered { park_id, accepted }
}

fn activity(in_flight: u32, started: u64) -> Event {
    Activity { in_flight, started }
}

fn start_failed(failure: Failure) -> Action {
    FailWaiters(WaitError::StartFailed(failure))
}

/// One lifecycle, its policy and the `t0` all times are relative to.
struct Harness {
    t0: Instant,
    policy: Policy,
    lc: Lifecycle,
    /// The `Restarted` actions so far, kept out of the tables (which are about what happens
    /// next) and checked by the tests of restart counting.
    restarted: Vec<RestartReason>,
}

impl Harness {
    fn new(policy: Policy) -> Self {
        let t0 = Instant::now();
        Self {
            t0,
            policy,
            lc: Lifecycle::new(t0),
            restarted: Vec::new(),
        }
    }

    fn at(&self, at_ms: u64) -> Instant {
        self.t0 + ms(at_ms)
    }

    /// Feeds one event at `at_ms`; returns the actions without the `Log` lines.
    fn send(&mut self, at_ms: u64, event: Event) -> Vec<Action> {
        let now = self.at(at_ms);
        let mut actions = without_logs(self.lc.handle(event, now, &self.policy));
        actions.retain(|action| match action {
            Restarted(reason) => {
                self.restarted.push(*reason);
                false
            }
            _ => true,
        });
        actions
    }

    /// Feeds each event in turn; returns each one's actions (without `Log` lines).
    fn run(&mut self, events: &[(u64, Event)]) -> Vec<Vec<Action>> {
        events
            .iter()
            .map(|(at_ms, event)| self.send(*at_ms, event.clone()))
            .collect()
    }

    /// Feeds each event in turn and checks the actions (without `Log` lines) and the state
    /// after it.
    #[track_caller]
    fn script(&mut self, steps: &[(u64, Event, &[Action], S)]) {
        for (i, (at_ms, event, want_actions, want_state)) in steps.iter().enumerate() {
            let actions = self.send(*at_ms, event.clone());
            assert_eq!(
                (&actions[..], self.lc.state()),
                (*want_actions, *want_state),
                "step {i}: {event:?} at {at_ms} ms"
            );
        }
    }

    /// Brings a stopped or unhealthy instance up at `up_ms` (the Wake, or the Tick that
    /// restarts it, must spawn), makes it ready, and crashes it at `crash_ms`. Returns the
    /// actions of the exit.
    #[track_caller]
    fn crash_once(&mut self, up_ms: u64, crash_ms: u64) -> Vec<Action> {
        let up = match self.lc.state() {
            S::Stopped => Wake,
            _ => Tick,
        };
        assert_eq!(
            self.send(up_ms, up),
            [Spawn, PublishRoute],
            "up at {up_ms} ms"
        );
        self.run(&[(up_ms, Spawned), (up_ms, Ready)]);
        assert_eq!(self.lc.state(), S::Running);
        self.send(crash_ms, exited())
    }

    /// How long after `from_ms` an unhealthy instance restarts: the time of the first Tick
    /// that spawns, found by bisection on copies of the lifecycle.
    fn restart_delay(&self, from_ms: u64) -> u64 {
        let spawns_at = |t: u64| {
            let mut lc = self.lc.clone();
            lc.handle(Tick, self.at(t), &self.policy).contains(&Spawn)
        };
        let (mut lo, mut hi) = (from_ms, from_ms + 3_600_000);
        assert!(spawns_at(hi), "no restart within an hour of {from_ms} ms");
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if spawns_at(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo - from_ms
    }
}

fn without_logs(actions: Vec<Action>) -> Vec<Action> {
    actions
        .into_iter()
        .filter(|action| !matches!(action, Log(_)))
        .collect()
}

/// Builds a lifecycle in some state, for tables of cases.
type Setup = fn() -> Harness;

/// Takes a running lifecycle into `stopping`, for tables of cases.
type BeginStop = fn(&mut Harness);

/// An instance that became ready at 0 ms.
fn running(policy: Policy) -> Harness {
    let mut h = Harness::new(policy);
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
        (0, Ready, &[WakeWaiters, PublishRoute], S::Running),
    ]);
    h
}

/// An instance that crashed four times within the window and is `failed` since 3900 ms.
fn failed() -> Harness {
    let mut h = Harness::new(policy());
    h.crash_once(0, 100); // restart in 500 ms
    h.crash_once(600, 700); // in 1000 ms
    h.crash_once(1_700, 1_800); // in 2000 ms
    h.crash_once(3_800, 3_900);
    assert_eq!(h.lc.state(), S::Failed);
    h
}

/// Stopping for an idle stop, an operator's stop, or a policy failure (health checks), with
/// the process still alive. Each starts from `running(policy())` and ends at 300 000 ms.
fn stopping_cases() -> [(&'static str, BeginStop); 3] {
    [
        ("idle", |h| {
            h.script(&[
                (300_000, Tick, &[SendPark(1)], S::Running),
                (
                    300_000,
                    park(1, true),
                    &[Terminate, PublishRoute],
                    S::Stopping,
                ),
            ]);
        }),
        ("operator", |h| {
            let stop = [FailWaiters(WaitError::Stopped), Terminate, PublishRoute];
            h.script(&[(300_000, Stop, &stop, S::Stopping)]);
        }),
        ("health checks", |h| {
            h.script(&[
                (300_000, health_failed(), &[], S::Running),
                (300_000, health_failed(), &[], S::Running),
                (
                    300_000,
                    health_failed(),
                    &[Terminate, PublishRoute],
                    S::Stopping,
                ),
            ]);
        }),
    ]
}

// --- waking and starting ---

#[test]
fn wake_from_stopped_spawns_and_publishes_route() {
    let mut h = Harness::new(policy());
    assert_eq!(h.lc.state(), S::Stopped);
    h.script(&[(0, Wake, &[Spawn, PublishRoute], S::Starting)]);
}

#[test]
fn spawned_then_ready_runs_and_wakes_waiters() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (5, Spawned, &[], S::Starting),
        (20, Ready, &[WakeWaiters, PublishRoute], S::Running),
    ]);
    assert_eq!(h.lc.running_since(), Some(h.at(20)));
    assert_eq!(h.lc.restarts, 0);
}

#[test]
fn wake_while_starting_joins_the_start_without_a_second_spawn() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (1, Wake, &[], S::Starting),
        (2, Spawned, &[], S::Starting),
        (3, Wake, &[], S::Starting),
        (4, Ready, &[WakeWaiters, PublishRoute], S::Running),
    ]);
}

#[test]
fn wake_while_running_wakes_waiters_at_once() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Wake, &[WakeWaiters], S::Running),
        (2_000, Wake, &[WakeWaiters], S::Running),
    ]);
}

#[test]
fn ready_outside_starting_is_ignored() {
    let mut h = running(policy());
    h.script(&[(1_000, Ready, &[], S::Running)]);
    assert_eq!(
        h.lc.running_since(),
        Some(h.at(0)),
        "running since the first Ready"
    );

    let mut h = Harness::new(policy());
    h.script(&[(0, Ready, &[], S::Stopped)]);
}

// --- failed starts ---

#[test]
fn startup_timeout_fails_waiters_at_once_then_restarts_after_backoff_base() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
        (9_999, Tick, &[], S::Starting),
        // Waiters hear at once; the process is alive, so it is stopped first.
        (
            10_000,
            Tick,
            &[
                start_failed(Failure::StartupTimeout),
                Terminate,
                PublishRoute,
            ],
            S::Stopping,
        ),
        // A waiter arriving during that stop waits for the restart: not failed a second time.
        (10_050, Wake, &[], S::Stopping),
        (10_100, exited(), &[PublishRoute], S::Unhealthy),
        (10_599, Tick, &[], S::Unhealthy),
        (10_600, Tick, &[Spawn, PublishRoute], S::Starting),
    ]);
    assert_eq!(h.lc.restarts, 1);
}

#[test]
fn startup_timeout_kills_a_process_that_ignores_terminate() {
    let mut h = Harness::new(policy());
    let timeout = [
        start_failed(Failure::StartupTimeout),
        Terminate,
        PublishRoute,
    ];
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
        (10_000, Tick, &timeout, S::Stopping),
        (14_999, Tick, &[], S::Stopping),
        (15_000, Tick, &[Kill], S::Stopping),
        (15_010, exited(), &[PublishRoute], S::Unhealthy),
    ]);
    assert_eq!(h.restart_delay(15_010), 500);
}

#[test]
fn exit_during_start_fails_waiters_and_goes_unhealthy() {
    let mut h = Harness::new(policy());
    let status = "exit status: 2".to_owned();
    let fail = [
        start_failed(Failure::ExitedDuringStart(status.clone())),
        PublishRoute,
    ];
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
        (300, Exited(status), &fail, S::Unhealthy),
        (799, Tick, &[], S::Unhealthy),
        (800, Tick, &[Spawn, PublishRoute], S::Starting),
    ]);
    assert_eq!(h.restarted, [RestartReason::StartFailed]);
}

#[test]
fn spawn_failure_fails_waiters_and_goes_unhealthy() {
    let mut h = Harness::new(policy());
    let error = "exec /srv/app: ENOENT".to_owned();
    let fail = [
        start_failed(Failure::SpawnError(error.clone())),
        PublishRoute,
    ];
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (1, SpawnFailed(error), &fail, S::Unhealthy),
    ]);
    assert_eq!(
        h.lc.reason().as_deref(),
        Some("could not start: exec /srv/app: ENOENT")
    );
    assert_eq!(h.restart_delay(1), 500);
}

// --- crashes and backoff ---

#[test]
fn crash_while_running_restarts_after_backoff() {
    let mut h = running(policy());
    h.script(&[
        (5_000, exited(), &[PublishRoute], S::Unhealthy),
        // A waiter during the backoff waits for the scheduled restart.
        (5_100, Wake, &[], S::Unhealthy),
        (5_499, Tick, &[], S::Unhealthy),
    ]);
    assert_eq!(h.lc.restarts, 0);
    assert_eq!(h.lc.reason().as_deref(), Some("crashed (exit status: 1)"));
    h.script(&[
        (5_500, Tick, &[Spawn, PublishRoute], S::Starting),
        (5_501, Tick, &[], S::Starting),
    ]);
    assert_eq!(h.lc.restarts, 1);
}

#[test]
fn crash_is_logged_with_the_restart_delay() {
    let mut h = running(policy());
    let actions = h.lc.handle(exited(), h.at(5_000), &h.policy);
    assert!(
        actions.contains(&Log(
            "crashed (exit status: 1); restarting in 500 ms".to_owned()
        )),
        "{actions:?}"
    );
}

#[test]
fn backoff_doubles_from_base_and_caps_at_max() {
    let p = policy();
    let table: &[(u32, u64)] = &[
        (0, 500), // restart numbers are 1-based; 0 is treated as the first
        (1, 500),
        (2, 1_000),
        (3, 2_000),
        (4, 4_000),
        (5, 8_000),
        (6, 16_000),
        (7, 30_000), // 32 000 capped
        (8, 30_000),
        (31, 30_000),
        (32, 30_000), // 2^31 times the base: no overflow
        (33, 30_000), // the shift itself would overflow
        (u32::MAX, 30_000),
    ];
    for &(n, want) in table {
        assert_eq!(Lifecycle::backoff(&p, n), ms(want), "restart {n}");
    }
}

#[test]
fn successive_crashes_wait_the_backoff_sequence() {
    let mut h = Harness::new(crash_loop_policy());
    let mut observed = Vec::new();
    let mut up = 0;
    for _ in 0..10 {
        let crash = up + 10;
        assert_eq!(h.crash_once(up, crash), [PublishRoute]);
        assert_eq!(h.lc.state(), S::Unhealthy);
        let delay = h.restart_delay(crash);
        observed.push(delay);
        up = crash + delay;
    }
    let want = [
        500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000,
    ];
    assert_eq!(observed, want);
    let from_backoff: Vec<u64> = (1..=10)
        .map(|n| Lifecycle::backoff(&h.policy, n).as_millis() as u64)
        .collect();
    assert_eq!(observed, from_backoff);
    assert_eq!(h.lc.restarts, 9);
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    Crash,
    HealthChecks,
}

#[test]
fn running_for_restart_window_resets_backoff() {
    // After three quick crashes (500, 1000, 2000 ms) the next delay is 4000 ms, unless the
    // instance ran for a whole restart window first: then it is back to the base.
    let table: &[(u64, bool, Ending, u64)] = &[
        // (ran for ms, ticks while running, how it ends, next delay ms)
        (59_999, true, Ending::Crash, 4_000),
        (60_000, true, Ending::Crash, 500),
        (59_999, false, Ending::Crash, 4_000),
        (60_000, false, Ending::Crash, 500),
        (600_000, false, Ending::Crash, 500),
        (59_999, false, Ending::HealthChecks, 4_000),
        (60_000, false, Ending::HealthChecks, 500),
        (60_000, true, Ending::HealthChecks, 500),
    ];
    for &(ran_for, ticks, ending, want) in table {
        let case = format!("ran {ran_for} ms, ticks {ticks}, ended by {ending:?}");
        let mut h = Harness::new(crash_loop_policy());
        h.crash_once(0, 10);
        h.crash_once(510, 520);
        h.crash_once(1_520, 1_530);
        let up = 3_530;
        assert_eq!(h.send(up, Tick), [Spawn, PublishRoute], "{case}");
        h.run(&[(up, Spawned), (up, Ready)]);
        let end = up + ran_for;
        if ticks {
            for t in (up..=end).step_by(1_000).chain([end]) {
                assert_eq!(h.send(t, Tick), [], "{case}: tick at {t}");
            }
        }
        match ending {
            Ending::Crash => {}
            Ending::HealthChecks => {
                let results = h.run(&[
                    (end, health_failed()),
                    (end, health_failed()),
                    (end, health_failed()),
                ]);
                assert_eq!(results[2], [Terminate, PublishRoute], "{case}");
            }
        }
        assert_eq!(h.send(end, exited()), [PublishRoute], "{case}");
        assert_eq!(h.lc.state(), S::Unhealthy, "{case}");
        assert_eq!(h.restart_delay(end), want, "{case}");
    }
}

#[test]
fn an_idle_stop_resets_backoff_but_not_the_failure_window() {
    // Three quick crashes (500, 1000, 2000 ms); then a run shorter than the restart window
    // that ends in an idle stop: the next crash waits the base again. The crashes still count
    // towards max_restarts: two more make the fifth failure within the window.
    let idle_quickly = Policy {
        idle_timeout: Some(ms(1_000)),
        max_restarts: 4,
        ..policy()
    };
    let mut h = Harness::new(idle_quickly);
    h.crash_once(0, 10);
    h.crash_once(510, 520);
    h.crash_once(1_520, 1_530);
    assert_eq!(h.send(3_530, Tick), [Spawn, PublishRoute]);
    h.run(&[(3_530, Spawned), (3_530, Ready)]);
    h.script(&[
        (4_530, Tick, &[SendPark(1)], S::Running),
        (
            4_540,
            park(1, true),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        (4_600, exited(), &[PublishRoute], S::Stopped),
    ]);
    assert_eq!(h.crash_once(10_000, 10_010), [PublishRoute]);
    assert_eq!(h.lc.state(), S::Unhealthy);
    assert_eq!(h.restart_delay(10_010), 500);
    let actions = h.crash_once(10_510, 10_520);
    let reason = "crashed (exit status: 1); 5 failures within 60s (max_restarts = 4)";
    assert_eq!(
        actions,
        [
            FailWaiters(WaitError::Failed(reason.to_owned())),
            PublishRoute
        ]
    );
}

// --- health checks ---

#[test]
fn health_failures_below_threshold_do_nothing() {
    let mut h = running(policy());
    h.script(&[
        (1_000, health_failed(), &[], S::Running),
        (2_000, health_failed(), &[], S::Running),
        (3_000, Tick, &[], S::Running),
    ]);
    assert_eq!(h.lc.health_failures(), 2);
}

#[test]
fn health_passed_resets_the_failure_count() {
    let mut h = running(policy());
    h.script(&[
        (1_000, health_failed(), &[], S::Running),
        (2_000, health_failed(), &[], S::Running),
        (3_000, HealthPassed, &[], S::Running),
    ]);
    assert_eq!(h.lc.health_failures(), 0);
    h.script(&[
        (4_000, health_failed(), &[], S::Running),
        (5_000, health_failed(), &[], S::Running),
        (
            6_000,
            health_failed(),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
    ]);
}

#[test]
fn threshold_consecutive_health_failures_terminate_then_restart_after_backoff() {
    let mut h = running(policy());
    h.script(&[
        (1_000, health_failed(), &[], S::Running),
        (2_000, health_failed(), &[], S::Running),
        (
            3_000,
            health_failed(),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        // Later results of the dying process change nothing.
        (3_500, health_failed(), &[], S::Stopping),
        (7_999, Tick, &[], S::Stopping),
        (8_000, Tick, &[Kill], S::Stopping),
        (8_100, exited(), &[PublishRoute], S::Unhealthy),
    ]);
    assert_eq!(
        h.lc.reason().as_deref(),
        Some("failed its health checks (GET /health: timeout)")
    );
    h.script(&[
        (8_599, Tick, &[], S::Unhealthy),
        (8_600, Tick, &[Spawn, PublishRoute], S::Starting),
        (8_600, Spawned, &[], S::Starting),
        (8_700, Ready, &[WakeWaiters, PublishRoute], S::Running),
    ]);
    assert_eq!(
        h.lc.health_failures(),
        0,
        "a new process starts with a clean count"
    );
    assert_eq!(
        h.restarted,
        [RestartReason::Health],
        "counted as a health restart"
    );
}

#[test]
fn health_failures_outside_running_are_ignored() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
    ]);
    for t in 1..=5 {
        h.script(&[(t, health_failed(), &[], S::Starting)]);
    }
    assert_eq!(h.lc.health_failures(), 0);
}

// --- failed ---

#[test]
fn more_than_max_restarts_failures_within_window_make_instance_failed() {
    let mut h = Harness::new(policy());
    for (up, crash) in [(0, 100), (600, 700), (1_700, 1_800)] {
        assert_eq!(h.crash_once(up, crash), [PublishRoute]);
        assert_eq!(h.lc.state(), S::Unhealthy, "failure at {crash} ms");
    }
    let actions = h.crash_once(3_800, 3_900);
    let reason = "crashed (exit status: 1); 4 failures within 60s (max_restarts = 3)";
    assert_eq!(
        actions,
        [
            FailWaiters(WaitError::Failed(reason.to_owned())),
            PublishRoute
        ]
    );
    assert_eq!(h.lc.state(), S::Failed);
    assert_eq!(h.lc.reason().as_deref(), Some(reason));
    assert!(!h.lc.needs_ticks());
    // Failed waits for an operator: time alone never restarts it.
    h.script(&[(10_000_000, Tick, &[], S::Failed)]);
}

#[test]
fn start_failures_count_towards_failed_too() {
    let mut h = Harness::new(policy());
    let exit_in_start = start_failed(Failure::ExitedDuringStart("exit status: 1".to_owned()));
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (
            100,
            exited(),
            &[exit_in_start.clone(), PublishRoute],
            S::Unhealthy,
        ),
        (600, Tick, &[Spawn, PublishRoute], S::Starting),
        (
            700,
            exited(),
            &[exit_in_start.clone(), PublishRoute],
            S::Unhealthy,
        ),
        (1_700, Tick, &[Spawn, PublishRoute], S::Starting),
        (
            1_800,
            exited(),
            &[exit_in_start.clone(), PublishRoute],
            S::Unhealthy,
        ),
        (3_800, Tick, &[Spawn, PublishRoute], S::Starting),
    ]);
    let actions = h.send(3_900, exited());
    assert_eq!(actions.len(), 3, "{actions:?}");
    assert_eq!(actions[0], exit_in_start);
    assert!(
        matches!(&actions[1], FailWaiters(WaitError::Failed(r)) if r.contains("4 failures")),
        "{actions:?}"
    );
    assert_eq!(h.lc.state(), S::Failed);
}

#[test]
fn wake_while_failed_fails_waiters_with_failed() {
    let mut h = failed();
    let reason = h.lc.reason().expect("failed has a reason");
    let fail = [FailWaiters(WaitError::Failed(reason))];
    h.script(&[
        (4_000, Wake, &fail, S::Failed),
        (5_000, Wake, &fail, S::Failed),
    ]);
}

#[test]
fn failures_older_than_restart_window_are_forgotten() {
    // Failures at 100, 700 and 1800 ms; the fourth at `fourth` ms. The one at 100 ms still
    // counts when exactly a window old, and is forgotten a millisecond later.
    let table: &[(u64, S)] = &[
        (3_900, S::Failed),
        (60_100, S::Failed),
        (60_101, S::Unhealthy),
        (100_000, S::Unhealthy),
    ];
    for &(fourth, want) in table {
        let mut h = Harness::new(policy());
        h.crash_once(0, 100);
        h.crash_once(600, 700);
        h.crash_once(1_700, 1_800);
        h.crash_once(3_800, fourth);
        assert_eq!(h.lc.state(), want, "fourth failure at {fourth} ms");
    }
}

#[test]
fn spaced_out_crashes_never_reach_failed() {
    let mut h = Harness::new(policy());
    let mut crash = 100;
    assert_eq!(h.crash_once(0, crash), [PublishRoute]);
    for i in 0..20 {
        // 61 s between crashes, more than the 60 s window; 30 s covers any backoff.
        let up = crash + 30_000;
        crash += 61_000;
        assert_eq!(h.crash_once(up, crash), [PublishRoute], "crash {i}");
        assert_eq!(h.lc.state(), S::Unhealthy, "crash {i}");
    }
    assert_eq!(h.lc.restarts, 20);
}

#[test]
fn restart_from_failed_spawns_and_resets_failure_counters() {
    let mut h = failed();
    h.script(&[(4_000, Restart, &[Spawn, PublishRoute], S::Starting)]);
    assert_eq!(h.lc.reason(), None);
    // The four old failures (all within the window) are forgotten and the backoff is back at
    // the base: it takes four new failures to fail again.
    h.script(&[
        (4_000, Spawned, &[], S::Starting),
        (4_000, Ready, &[WakeWaiters, PublishRoute], S::Running),
        (4_100, exited(), &[PublishRoute], S::Unhealthy),
    ]);
    assert_eq!(h.restart_delay(4_100), 500);
    h.crash_once(4_600, 4_700);
    assert_eq!(h.restart_delay(4_700), 1_000);
    h.crash_once(5_700, 5_800);
    assert_eq!(h.lc.state(), S::Unhealthy);
    h.crash_once(7_800, 7_900);
    assert_eq!(h.lc.state(), S::Failed);
}

#[test]
fn stop_from_failed_goes_stopped_and_can_start_again() {
    let mut h = failed();
    h.script(&[
        (
            4_000,
            Stop,
            &[FailWaiters(WaitError::Stopped), PublishRoute],
            S::Stopped,
        ),
        (4_100, Tick, &[], S::Stopped),
        (4_200, Wake, &[Spawn, PublishRoute], S::Starting),
    ]);
}

#[test]
fn stop_from_unhealthy_cancels_the_scheduled_restart() {
    let mut h = running(policy());
    h.script(&[
        (1_000, exited(), &[PublishRoute], S::Unhealthy),
        (
            1_100,
            Stop,
            &[FailWaiters(WaitError::Stopped), PublishRoute],
            S::Stopped,
        ),
        (1_500, Tick, &[], S::Stopped),
        (100_000, Tick, &[], S::Stopped),
    ]);
    assert!(!h.lc.needs_ticks());
}

#[test]
fn restart_from_unhealthy_starts_at_once() {
    let mut h = running(policy());
    h.script(&[
        (1_000, exited(), &[PublishRoute], S::Unhealthy),
        (1_100, Restart, &[Spawn, PublishRoute], S::Starting),
        // The backoff's restart no longer fires.
        (1_500, Tick, &[], S::Starting),
    ]);
}

// --- idle stop and the park handshake ---

#[test]
fn park_is_sent_once_at_idle_timeout() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Tick, &[], S::Running),
        (299_999, Tick, &[], S::Running),
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_001, Tick, &[], S::Running),
        (900_000, Tick, &[], S::Running),
    ]);
}

#[test]
fn accepted_park_stops_the_idle_instance() {
    let mut h = running(policy());
    h.script(&[
        (300_000, Tick, &[SendPark(1)], S::Running),
        (
            300_010,
            park(1, true),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        (300_100, exited(), &[PublishRoute], S::Stopped),
        (300_200, Tick, &[], S::Stopped),
    ]);
    assert_eq!(h.lc.restarts, 0);
    assert_eq!(h.lc.reason(), None, "an idle stop is not a failure");
    assert!(!h.lc.needs_ticks());
}

#[test]
fn park_answer_with_wrong_id_is_ignored() {
    let mut h = running(policy());
    h.script(&[
        // No park pending at all.
        (1_000, park(1, true), &[], S::Running),
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_010, park(2, true), &[], S::Running),
        (300_020, park(0, false), &[], S::Running),
        // Still waiting for the answer to park 1: nothing resent.
        (300_030, Tick, &[], S::Running),
        (
            300_040,
            park(1, true),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
    ]);
}

#[test]
fn an_unanswered_park_counts_as_refused_after_the_answer_timeout() {
    let mut h = running(policy());
    let timeout = PARK_ANSWER_TIMEOUT.as_millis() as u64;
    h.script(&[
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_000 + timeout - 1, Tick, &[], S::Running),
        // Postponed: no stop, and the idle clock starts again.
        (300_000 + timeout, Tick, &[], S::Running),
        (600_000 + timeout - 1, Tick, &[], S::Running),
        (600_000 + timeout, Tick, &[SendPark(2)], S::Running),
        // A late answer to the first request changes nothing.
        (600_000 + timeout + 1, park(1, true), &[], S::Running),
    ]);
}

#[test]
fn refused_park_keeps_running_and_restarts_idle_clock() {
    let mut h = running(policy());
    h.script(&[
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_050, park(1, false), &[], S::Running),
        (300_051, Tick, &[], S::Running),
        (600_049, Tick, &[], S::Running),
        (600_050, Tick, &[SendPark(2)], S::Running),
        (600_060, park(2, false), &[], S::Running),
        // An answer to an old park after the refusal changes nothing.
        (600_070, park(1, true), &[], S::Running),
        (900_060, Tick, &[SendPark(3)], S::Running),
    ]);
}

#[test]
fn accepted_park_with_requests_in_flight_is_treated_as_refused() {
    let mut h = running(policy());
    h.script(&[
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_005, activity(1, 1), &[], S::Running),
        (300_010, park(1, true), &[], S::Running),
        (10_000_000, Tick, &[], S::Running),
    ]);
}

#[test]
fn open_requests_prevent_parking_and_idle_clock_starts_when_they_end() {
    let mut h = running(policy());
    h.script(&[
        (1_000, activity(1, 1), &[], S::Running),
        (301_000, Tick, &[], S::Running),
        (10_000_000, Tick, &[], S::Running),
        // The websocket closes: the instance has been idle for no time at all.
        (10_000_000, activity(0, 0), &[], S::Running),
        (10_000_001, Tick, &[], S::Running),
        (10_299_999, Tick, &[], S::Running),
        (10_300_000, Tick, &[SendPark(1)], S::Running),
    ]);
    assert_eq!(h.lc.in_flight(), 0);
}

#[test]
fn new_requests_push_the_idle_deadline() {
    let mut h = running(policy());
    h.script(&[
        (200_000, activity(0, 3), &[], S::Running),
        (300_000, Tick, &[], S::Running),
        // A report of nothing new and nothing open is not activity.
        (400_000, activity(0, 0), &[], S::Running),
        (499_999, Tick, &[], S::Running),
        (500_000, Tick, &[SendPark(1)], S::Running),
    ]);
    assert_eq!(h.lc.last_activity(), h.at(200_000));
}

#[test]
fn no_idle_timeout_never_parks() {
    let mut h = running(Policy {
        idle_timeout: None,
        ..policy()
    });
    for t in [1_000, 300_000, 3_600_000, 1_000_000_000] {
        h.script(&[(t, Tick, &[], S::Running)]);
    }
}

#[test]
fn wake_while_parking_cancels_the_park() {
    let mut h = running(policy());
    h.script(&[
        (300_000, Tick, &[SendPark(1)], S::Running),
        (300_010, Wake, &[WakeWaiters], S::Running),
        // The proxy accepted before it saw the new request: too late, the park is off.
        (300_020, park(1, true), &[], S::Running),
        (300_030, Tick, &[], S::Running),
        (600_009, Tick, &[], S::Running),
        (600_010, Tick, &[SendPark(2)], S::Running),
    ]);
}

#[test]
fn forget_proxy_clears_in_flight_and_a_pending_park() {
    let mut h = running(policy());
    h.run(&[(1_000, activity(2, 2))]);
    assert_eq!(h.lc.in_flight(), 2);
    h.lc.forget_proxy(h.at(2_000));
    assert_eq!(h.lc.in_flight(), 0);
    h.script(&[(301_000, Tick, &[SendPark(1)], S::Running)]);

    h.lc.forget_proxy(h.at(301_500));
    h.script(&[
        // The park went to the proxy that is gone; its answer no longer counts.
        (301_600, park(1, true), &[], S::Running),
        (301_700, Tick, &[], S::Running),
        (601_499, Tick, &[], S::Running),
        (601_500, Tick, &[SendPark(2)], S::Running),
    ]);
}

// --- operator stop and restart ---

#[test]
fn stop_while_running_terminates_then_kills_once_after_grace() {
    let mut h = running(policy());
    h.script(&[
        (
            1_000,
            Stop,
            &[FailWaiters(WaitError::Stopped), Terminate, PublishRoute],
            S::Stopping,
        ),
        (5_999, Tick, &[], S::Stopping),
        (6_000, Tick, &[Kill], S::Stopping),
        (6_001, Tick, &[], S::Stopping),
        (20_000, Tick, &[], S::Stopping),
        (20_100, exited(), &[PublishRoute], S::Stopped),
    ]);
    assert_eq!(h.lc.reason(), None);
}

#[test]
fn stop_while_starting_fails_waiters_with_stopped() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Wake, &[Spawn, PublishRoute], S::Starting),
        (0, Spawned, &[], S::Starting),
        (
            100,
            Stop,
            &[FailWaiters(WaitError::Stopped), Terminate, PublishRoute],
            S::Stopping,
        ),
        // The dying process's readiness is too late.
        (150, Ready, &[], S::Stopping),
        (200, exited(), &[PublishRoute], S::Stopped),
        // Nor does the startup deadline fire afterwards.
        (10_000, Tick, &[], S::Stopped),
    ]);
}

#[test]
fn wake_during_idle_or_operator_stop_starts_again_right_after_exit() {
    for (case, begin_stop) in &stopping_cases()[..2] {
        let mut h = running(policy());
        begin_stop(&mut h);
        h.script(&[
            (300_100, Wake, &[], S::Stopping),
            (300_200, exited(), &[Spawn, PublishRoute], S::Starting),
        ]);
        assert_eq!(h.lc.restarts, 0, "{case}");
    }
}

#[test]
fn wake_during_failure_stop_waits_for_the_backoff() {
    let (_, begin_stop) = &stopping_cases()[2];
    let mut h = running(policy());
    begin_stop(&mut h);
    h.script(&[
        (300_100, Wake, &[], S::Stopping),
        (300_200, exited(), &[PublishRoute], S::Unhealthy),
        (300_700, Tick, &[Spawn, PublishRoute], S::Starting),
    ]);
}

#[test]
fn stop_during_any_stop_ends_stopped() {
    for (case, begin_stop) in stopping_cases() {
        let mut h = running(policy());
        begin_stop(&mut h);
        h.script(&[
            // A wake, then the operator's stop: the stop wins.
            (300_100, Wake, &[], S::Stopping),
            (300_200, Stop, &[], S::Stopping),
            (300_300, exited(), &[PublishRoute], S::Stopped),
        ]);
        assert!(!h.lc.needs_ticks(), "{case}");
    }
}

#[test]
fn restart_while_running_terminates_then_spawns_on_exit() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Restart, &[Terminate, PublishRoute], S::Stopping),
        (1_100, exited(), &[Spawn, PublishRoute], S::Starting),
    ]);
    assert_eq!(h.lc.restarts, 1);
}

#[test]
fn restart_during_any_stop_spawns_right_after_exit() {
    for (case, begin_stop) in stopping_cases() {
        let mut h = running(policy());
        begin_stop(&mut h);
        h.script(&[
            (300_100, Restart, &[], S::Stopping),
            (300_200, exited(), &[Spawn, PublishRoute], S::Starting),
        ]);
        assert_eq!(h.lc.restarts, 1, "{case}");
    }
}

#[test]
fn restart_while_stopped_starts() {
    let mut h = Harness::new(policy());
    h.script(&[(0, Restart, &[Spawn, PublishRoute], S::Starting)]);
}

// --- stale events ---

#[test]
fn late_exit_of_an_old_process_changes_nothing() {
    let cases: [(&str, Setup); 4] = [
        ("never started", || Harness::new(policy())),
        ("stopped after idle", || {
            let mut h = running(policy());
            h.run(&[
                (300_000, Tick),
                (300_000, park(1, true)),
                (300_100, exited()),
            ]);
            h
        }),
        ("unhealthy", || {
            let mut h = running(policy());
            h.run(&[(300_000, exited())]);
            h
        }),
        ("failed", failed),
    ];
    for (case, setup) in cases {
        let mut h = setup();
        let (state, reason, restarts) = (h.lc.state(), h.lc.reason(), h.lc.restarts);
        let actions = h.lc.handle(exited(), h.at(300_200), &h.policy);
        assert_eq!(actions, [], "{case}");
        assert_eq!(
            (h.lc.state(), h.lc.reason(), h.lc.restarts),
            (state, reason, restarts),
            "{case}"
        );
    }
}

#[test]
fn late_exit_keeps_the_scheduled_restart() {
    let mut h = running(policy());
    h.script(&[
        (1_000, exited(), &[PublishRoute], S::Unhealthy),
        (1_200, exited(), &[], S::Unhealthy),
    ]);
    assert_eq!(h.restart_delay(1_000), 500);
}

// --- accessors ---

#[test]
fn needs_ticks_only_while_something_can_happen_by_time() {
    let cases: [(S, bool, Setup); 6] = [
        (S::Stopped, false, || Harness::new(policy())),
        (S::Starting, true, || {
            let mut h = Harness::new(policy());
            h.run(&[(0, Wake)]);
            h
        }),
        (S::Running, true, || running(policy())),
        (S::Stopping, true, || {
            let mut h = running(policy());
            h.run(&[(1_000, Stop)]);
            h
        }),
        (S::Unhealthy, true, || {
            let mut h = running(policy());
            h.run(&[(1_000, exited())]);
            h
        }),
        (S::Failed, false, failed),
    ];
    for (state, want, setup) in cases {
        let h = setup();
        assert_eq!(h.lc.state(), state);
        assert_eq!(h.lc.needs_ticks(), want, "{state:?}");
    }
}

#[test]
fn restarts_are_counted_by_reason_and_only_when_they_happen() {
    // Two crashes, each followed by its restart: two crash restarts.
    let mut h = Harness::new(crash_loop_policy());
    h.crash_once(0, 1_000);
    let delay = h.restart_delay(1_000);
    h.crash_once(1_000 + delay, 2_000 + delay);
    assert_eq!(h.restarted, [RestartReason::Crash]);
    h.send(2_000 + delay + h.restart_delay(2_000 + delay), Tick);
    assert_eq!(h.restarted, [RestartReason::Crash, RestartReason::Crash]);

    // An operator's restart is counted where it is asked for (the registry), not here.
    let mut h = running(policy());
    h.send(1_000, Restart);
    h.send(1_100, exited());
    assert_eq!(h.lc.state(), S::Starting);
    assert_eq!(h.restarted, []);

    // A crash that makes the instance failed restarts nothing.
    let mut h = Harness::new(Policy {
        max_restarts: 0,
        ..policy()
    });
    h.crash_once(0, 1_000);
    assert_eq!(h.lc.state(), S::Failed);
    h.send(600_000, Tick);
    assert_eq!(h.restarted, []);
}

// --- a rollout's switch ---

#[test]
fn a_switch_drains_holds_wakes_then_stops_and_starts_at_once() {
    let mut h = running(policy());
    h.script(&[
        (1_000, activity(2, 5), &[], S::Running),
        (1_010, Switch, &[SendDrain(1)], S::Stopping),
        // Requests arriving now wait for the new process.
        (1_020, Wake, &[], S::Stopping),
        (1_030, park(1, true), &[], S::Stopping),
        (1_040, activity(1, 0), &[], S::Stopping),
        (
            1_050,
            activity(0, 0),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        (1_100, exited(), &[Spawn, PublishRoute], S::Starting),
        (1_200, Spawned, &[], S::Starting),
        (1_300, Ready, &[WakeWaiters, PublishRoute], S::Running),
    ]);
    assert_eq!(h.lc.restarts, 0, "a switch is not a restart");
    assert!(h.restarted.is_empty());
}

#[test]
fn a_switch_waits_for_the_park_before_trusting_an_idle_count() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Switch, &[SendDrain(1)], S::Stopping),
        // Nothing in flight, but the proxy has not parked yet: a request may be entering.
        (1_010, activity(0, 0), &[], S::Stopping),
        (
            1_020,
            park(1, true),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
    ]);
}

#[test]
fn a_switch_stops_anyway_after_stop_grace() {
    let mut h = running(policy());
    h.script(&[
        (1_000, activity(1, 1), &[], S::Running),
        (1_000, Switch, &[SendDrain(1)], S::Stopping),
        (1_010, park(1, true), &[], S::Stopping),
        (5_999, Tick, &[], S::Stopping),
        (6_000, Tick, &[Terminate, PublishRoute], S::Stopping),
    ]);
}

#[test]
fn a_crash_while_draining_is_a_crash() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Switch, &[SendDrain(1)], S::Stopping),
        (1_010, exited(), &[PublishRoute], S::Unhealthy),
    ]);
}

#[test]
fn a_handoff_drains_like_a_switch_then_stays_stopped() {
    let mut h = running(policy());
    h.script(&[
        (1_000, activity(1, 3), &[], S::Running),
        (1_010, Handoff, &[SendDrain(1)], S::Stopping),
        (1_020, park(1, true), &[], S::Stopping),
        (
            1_030,
            activity(0, 0),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        (1_100, exited(), &[PublishRoute], S::Stopped),
        (2_000, Tick, &[], S::Stopped),
    ]);
    assert!(h.restarted.is_empty());
}

#[test]
fn a_handoff_turns_a_switch_under_way_into_a_stop_and_stops_a_start() {
    let mut h = running(policy());
    h.script(&[
        (1_000, Switch, &[SendDrain(1)], S::Stopping),
        (1_010, Handoff, &[], S::Stopping),
        (
            1_020,
            park(1, true),
            &[Terminate, PublishRoute],
            S::Stopping,
        ),
        (1_100, exited(), &[PublishRoute], S::Stopped),
        (1_200, Wake, &[Spawn, PublishRoute], S::Starting),
        (1_205, Spawned, &[], S::Starting),
        (
            1_210,
            Handoff,
            &[FailWaiters(WaitError::Stopped), Terminate, PublishRoute],
            S::Stopping,
        ),
    ]);
}

#[test]
fn a_switch_of_an_instance_that_is_not_running_does_nothing() {
    let mut h = Harness::new(policy());
    h.script(&[
        (0, Switch, &[], S::Stopped),
        (1, Wake, &[Spawn, PublishRoute], S::Starting),
        (2, Switch, &[], S::Starting),
    ]);
}
