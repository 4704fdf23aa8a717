//! `PortTaken`: an instance whose port a stranger took moves and starts again at once, without
//! a failure, a restart or a backoff counted against it.

use super::*;

fn policy() -> Policy {
    Policy {
        startup_timeout: Duration::from_secs(10),
        stop_grace: Duration::from_secs(5),
        idle_timeout: Some(Duration::from_secs(300)),
        unhealthy_threshold: 3,
        max_restarts: 0,
        restart_window: Duration::from_secs(60),
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
    }
}

fn without_logs(actions: Vec<Action>) -> Vec<Action> {
    actions
        .into_iter()
        .filter(|a| !matches!(a, Action::Log(_)))
        .collect()
}

#[test]
fn a_taken_port_while_starting_restarts_at_once_and_counts_nothing() {
    // max_restarts = 0: a single counted failure would make the instance failed.
    let (policy, t0) = (policy(), Instant::now());
    let mut lc = Lifecycle::new(t0);
    lc.handle(Event::Wake, t0, &policy);
    lc.handle(Event::Spawned, t0, &policy);
    let taken = without_logs(lc.handle(Event::PortTaken, t0, &policy));
    assert_eq!(taken, [Action::Terminate, Action::PublishRoute]);
    assert_eq!(lc.state(), InstanceState::Stopping);
    // The waiters of the start keep waiting: nobody was failed.
    let exit = without_logs(lc.handle(Event::Exited("signal 15".into()), t0, &policy));
    assert_eq!(exit, [Action::Spawn, Action::PublishRoute]);
    assert_eq!(lc.state(), InstanceState::Starting);
    assert_eq!(lc.restarts, 0);
    lc.handle(Event::Spawned, t0, &policy);
    let ready = lc.handle(Event::Ready, t0, &policy);
    assert_eq!(ready, [Action::WakeWaiters, Action::PublishRoute]);
    assert_eq!(lc.reason(), None);
}

#[test]
fn a_taken_port_found_when_the_process_already_died_starts_again_at_once() {
    // The app died of EADDRINUSE before readiness saw the stranger: the registry feeds
    // PortTaken before the exit, and the exit is not a crash.
    let (policy, t0) = (policy(), Instant::now());
    let mut lc = Lifecycle::new(t0);
    lc.handle(Event::Wake, t0, &policy);
    lc.handle(Event::Spawned, t0, &policy);
    lc.handle(Event::PortTaken, t0, &policy);
    let exit = without_logs(lc.handle(Event::Exited("exit status 1".into()), t0, &policy));
    assert_eq!(exit, [Action::Spawn, Action::PublishRoute]);
    assert_eq!(lc.state(), InstanceState::Starting);
}

#[test]
fn a_taken_port_of_a_running_instance_moves_it() {
    let (policy, t0) = (policy(), Instant::now());
    let mut lc = Lifecycle::new(t0);
    lc.handle(Event::Wake, t0, &policy);
    lc.handle(Event::Spawned, t0, &policy);
    lc.handle(Event::Ready, t0, &policy);
    assert_eq!(
        without_logs(lc.handle(Event::PortTaken, t0, &policy)),
        [Action::Terminate, Action::PublishRoute]
    );
    let exit = without_logs(lc.handle(Event::Exited("signal 15".into()), t0, &policy));
    assert_eq!(exit, [Action::Spawn, Action::PublishRoute]);
}

#[test]
fn a_taken_port_of_a_stopped_or_stopping_instance_changes_nothing() {
    let (policy, t0) = (policy(), Instant::now());
    let mut lc = Lifecycle::new(t0);
    assert_eq!(lc.handle(Event::PortTaken, t0, &policy), []);
    assert_eq!(lc.state(), InstanceState::Stopped);
    lc.handle(Event::Wake, t0, &policy);
    lc.handle(Event::Spawned, t0, &policy);
    lc.handle(Event::Ready, t0, &policy);
    lc.handle(Event::Stop, t0, &policy);
    assert_eq!(lc.handle(Event::PortTaken, t0, &policy), []);
    let exit = without_logs(lc.handle(Event::Exited("signal 15".into()), t0, &policy));
    assert_eq!(
        exit,
        [Action::PublishRoute],
        "an operator's stop stays a stop"
    );
    assert_eq!(lc.state(), InstanceState::Stopped);
}

#[test]
fn a_banned_instance_is_killed_at_once_and_stays_failed() {
    let (policy, t0) = (policy(), Instant::now());
    let mut lc = Lifecycle::new(t0);
    lc.handle(Event::Wake, t0, &policy);
    lc.handle(Event::Spawned, t0, &policy);
    lc.handle(Event::Ready, t0, &policy);
    let reason = "security: listened on port 20001 of notes:bob".to_owned();
    let actions = without_logs(lc.handle(Event::Ban(reason.clone()), t0, &policy));
    assert_eq!(
        actions,
        [
            Action::FailWaiters(WaitError::Failed(reason.clone())),
            Action::Kill,
            Action::PublishRoute
        ]
    );
    // A wake meanwhile does not bring it back.
    lc.handle(Event::Wake, t0, &policy);
    let exit = without_logs(lc.handle(Event::Exited("signal 9".into()), t0, &policy));
    assert!(exit.contains(&Action::PublishRoute), "{exit:?}");
    assert!(!exit.contains(&Action::Spawn), "{exit:?}");
    assert_eq!(lc.state(), InstanceState::Failed);
    assert_eq!(lc.reason(), Some(reason));
    let later = lc.handle(Event::Wake, t0 + Duration::from_secs(3600), &policy);
    assert!(!later.contains(&Action::Spawn), "{later:?}");
    // Only an operator brings it back.
    let restart = lc.handle(Event::Restart, t0, &policy);
    assert!(restart.contains(&Action::Spawn), "{restart:?}");
}
