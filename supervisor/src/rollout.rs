//! Planning a rollout: which tenants move to the new release next, and when the rollout
//! pauses or ends. Pure code, tested by tables; the registry carries the moves out.
//!
//! A rollout walks its steps in order. A step selects tenants (a list, or a share by a
//! stable hash of the id, cumulative with the steps before it). Within the current step:
//! tenants without a running process are *retargeted* at once (they start on the release at
//! their next wake, at no cost); running ones are *switched*, at most `max_unavailable` at a
//! time, each one busy until it has baked. A step whose tenants have all moved and baked ends;
//! then the rollout pauses (after a canary step) or goes on, and after the last step is done.
//! Pinned tenants and those that failed in this rollout are left where they are.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenement_proto::rpc::InstanceState;
use tenement_proto::TenantId;

/// Which tenants a step adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    List(BTreeSet<TenantId>),
    /// Tenants whose [`bucket`] is below this share (0 to 100).
    Percent(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub select: Select,
    /// Pause once the step is done (a canary), for `tenctl rollout resume`.
    pub pause_after: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum State {
    Running,
    Paused(String),
    Done,
    Aborted,
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused(_) => "paused",
            State::Done => "done",
            State::Aborted => "aborted",
        }
    }

    /// Running or paused: the service has a rollout in progress.
    pub fn unfinished(&self) -> bool {
        matches!(self, State::Running | State::Paused(_))
    }
}

/// One service's rollout, as saved in the registry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub release: u32,
    /// The service's current release before this rollout (abort goes back to it).
    pub from: u32,
    pub steps: Vec<Step>,
    /// Index of the step being rolled out.
    pub step: usize,
    pub max_unavailable: u32,
    pub bake: Duration,
    pub state: State,
    /// Tenants this rollout moved, and the release each was to run before.
    pub moved: BTreeMap<TenantId, u32>,
    /// Tenants that failed on the release and went back, with why.
    pub failed: BTreeMap<TenantId, String>,
    pub started_ms: u64,
}

/// What the planner needs to know of one tenant of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub state: InstanceState,
    /// The release it should run (its target).
    pub target: u32,
    /// Pinned to a release: never moved.
    pub pinned: bool,
    /// Being switched, or on the release and not yet baked while running.
    pub busy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// No process: the tenant starts on the release at its next wake.
    Retarget(TenantId),
    /// Running: park, stop, start on the release, bake.
    Switch(TenantId),
}

/// A stable share bucket (0 to 99) of a tenant id: FNV-1a, so the same tenants form the same
/// share in every rollout, on every machine and every build.
pub fn bucket(id: &TenantId) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % 100) as u32
}

impl Rollout {
    /// Whether `id` is in the current step or an earlier one.
    pub fn selects(&self, id: &TenantId) -> bool {
        self.steps
            .iter()
            .take(self.step + 1)
            .any(|step| match &step.select {
                Select::List(ids) => ids.contains(id),
                Select::Percent(share) => bucket(id) < *share,
            })
    }

    /// Tenants of the current step (cumulative) still to be moved.
    pub fn pending<'a>(&self, tenants: &'a [Tenant]) -> Vec<&'a Tenant> {
        tenants
            .iter()
            .filter(|t| {
                t.target != self.release
                    && !t.pinned
                    && !self.failed.contains_key(&t.id)
                    && self.selects(&t.id)
            })
            .collect()
    }

    /// The next moves, and the state changes a finished step brings. Nothing while paused or
    /// finished.
    pub fn plan(&mut self, tenants: &[Tenant]) -> Vec<Move> {
        let mut moves = Vec::new();
        while self.state == State::Running {
            let busy = tenants.iter().filter(|t| t.busy).count() as u32;
            let mut slots = self.max_unavailable.saturating_sub(busy);
            let mut waiting = false;
            for tenant in self.pending(tenants) {
                match tenant.state {
                    InstanceState::Running => {
                        if slots > 0 {
                            slots -= 1;
                            moves.push(Move::Switch(tenant.id.clone()));
                        }
                        waiting = true;
                    }
                    // Its process runs the old release and is not ready yet: switched once
                    // it is.
                    InstanceState::Starting => waiting = true,
                    _ => moves.push(Move::Retarget(tenant.id.clone())),
                }
            }
            if waiting || busy > 0 || !moves.is_empty() {
                return moves;
            }
            // The step is done.
            let pause = self.steps.get(self.step).is_some_and(|s| s.pause_after);
            if self.step + 1 >= self.steps.len() {
                self.state = State::Done;
            } else {
                self.step += 1;
                if pause {
                    self.state = State::Paused(format!(
                        "step {} of {} done; `tenctl rollout resume` goes on",
                        self.step,
                        self.steps.len()
                    ));
                }
            }
        }
        moves
    }

    /// `id` failed on the release: it goes back and the rollout pauses.
    pub fn fail(&mut self, id: &TenantId, reason: String) {
        self.failed.insert(id.clone(), reason.clone());
        if self.state == State::Running {
            self.state = State::Paused(reason);
        }
    }

    /// Resume: failed tenants are tried again (after a fix).
    pub fn resume(&mut self) {
        self.failed.clear();
        self.state = State::Running;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState as S;

    fn id(text: &str) -> TenantId {
        TenantId::new(text).expect("valid in the test")
    }

    fn rollout(steps: Vec<Step>, max_unavailable: u32) -> Rollout {
        Rollout {
            release: 2,
            from: 1,
            steps,
            step: 0,
            max_unavailable,
            bake: Duration::from_secs(5),
            state: State::Running,
            moved: BTreeMap::new(),
            failed: BTreeMap::new(),
            started_ms: 0,
        }
    }

    fn all() -> Vec<Step> {
        vec![Step {
            select: Select::Percent(100),
            pause_after: false,
        }]
    }

    fn tenant(name: &str, state: S, target: u32) -> Tenant {
        Tenant {
            id: id(name),
            state,
            target,
            pinned: false,
            busy: false,
        }
    }

    #[test]
    fn sleeping_tenants_move_at_once_and_running_ones_one_at_a_time() {
        let mut r = rollout(all(), 1);
        let tenants = vec![
            tenant("a", S::Running, 1),
            tenant("b", S::Stopped, 1),
            tenant("c", S::Running, 1),
            tenant("d", S::Failed, 1),
        ];
        assert_eq!(
            r.plan(&tenants),
            vec![
                Move::Switch(id("a")),
                Move::Retarget(id("b")),
                Move::Retarget(id("d")),
            ]
        );
        assert_eq!(r.state, State::Running);
    }

    #[test]
    fn a_busy_tenant_holds_its_slot_until_it_has_baked() {
        let mut r = rollout(all(), 1);
        let mut tenants = vec![tenant("a", S::Running, 2), tenant("c", S::Running, 1)];
        tenants[0].busy = true;
        assert_eq!(r.plan(&tenants), vec![]);
        tenants[0].busy = false;
        assert_eq!(r.plan(&tenants), vec![Move::Switch(id("c"))]);
        tenants[1].target = 2;
        tenants[1].busy = true;
        assert_eq!(r.plan(&tenants), vec![]);
        assert_eq!(r.state, State::Running);
        tenants[1].busy = false;
        assert_eq!(r.plan(&tenants), vec![]);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn max_unavailable_switches_several_at_once() {
        let mut r = rollout(all(), 2);
        let tenants = vec![
            tenant("a", S::Running, 1),
            tenant("b", S::Running, 1),
            tenant("c", S::Running, 1),
        ];
        assert_eq!(
            r.plan(&tenants),
            vec![Move::Switch(id("a")), Move::Switch(id("b"))]
        );
    }

    #[test]
    fn pinned_failed_and_starting_tenants_are_not_moved() {
        let mut r = rollout(all(), 5);
        r.failed.insert(id("f"), "migrate failed".into());
        let mut pinned = tenant("p", S::Stopped, 1);
        pinned.pinned = true;
        let tenants = vec![
            pinned,
            tenant("f", S::Stopped, 1),
            tenant("s", S::Starting, 1),
        ];
        assert_eq!(r.plan(&tenants), vec![]);
        assert_eq!(r.state, State::Running, "waits for the starting one");
        let tenants = vec![tenant("s", S::Running, 1)];
        assert_eq!(r.plan(&tenants), vec![Move::Switch(id("s"))]);
    }

    #[test]
    fn a_canary_step_pauses_then_the_rest_follows_on_resume() {
        let canary = Step {
            select: Select::List([id("alice")].into()),
            pause_after: true,
        };
        let mut r = rollout(vec![canary, all()[0].clone()], 1);
        let mut tenants = vec![tenant("alice", S::Stopped, 1), tenant("bob", S::Stopped, 1)];
        assert_eq!(r.plan(&tenants), vec![Move::Retarget(id("alice"))]);
        tenants[0].target = 2;
        assert_eq!(r.plan(&tenants), vec![]);
        assert!(matches!(r.state, State::Paused(_)));
        assert_eq!(r.step, 1);
        r.resume();
        assert_eq!(r.plan(&tenants), vec![Move::Retarget(id("bob"))]);
        tenants[1].target = 2;
        assert_eq!(r.plan(&tenants), vec![]);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn steps_by_share_go_on_without_a_pause() {
        let steps = [10, 50, 100]
            .into_iter()
            .map(|share| Step {
                select: Select::Percent(share),
                pause_after: false,
            })
            .collect();
        let mut r = rollout(steps, 1);
        let mut tenants: Vec<Tenant> = (0..40)
            .map(|n| tenant(&format!("t{n}"), S::Stopped, 1))
            .collect();
        let first = r.plan(&tenants);
        let expected: Vec<Move> = tenants
            .iter()
            .filter(|t| bucket(&t.id) < 10)
            .map(|t| Move::Retarget(t.id.clone()))
            .collect();
        assert_eq!(first, expected);
        for _ in 0..3 {
            let moves = r.plan(&tenants);
            for t in &mut tenants {
                if moves.contains(&Move::Retarget(t.id.clone()))
                    || first.contains(&Move::Retarget(t.id.clone()))
                {
                    t.target = 2;
                }
            }
        }
        assert_eq!(r.plan(&tenants), vec![]);
        assert_eq!(r.state, State::Done);
        assert!(tenants.iter().all(|t| t.target == 2));
    }

    #[test]
    fn a_failure_pauses_and_resume_tries_the_tenant_again() {
        let mut r = rollout(all(), 1);
        r.fail(&id("carol"), "migrate exited with status 1".into());
        assert_eq!(
            r.state,
            State::Paused("migrate exited with status 1".into())
        );
        let tenants = vec![tenant("carol", S::Stopped, 1)];
        assert_eq!(r.plan(&tenants), vec![]);
        r.resume();
        assert_eq!(r.plan(&tenants), vec![Move::Retarget(id("carol"))]);
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket(&id("alice")), bucket(&id("alice")));
        let buckets: BTreeSet<u32> = (0..1000).map(|n| bucket(&id(&format!("t{n}")))).collect();
        assert!(buckets.len() > 90, "{} distinct buckets", buckets.len());
    }
}
