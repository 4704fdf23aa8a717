//! The proxy's cached route table, pushed by the supervisor, and the per-instance gate that
//! counts requests in flight and refuses new ones once an instance is parked.
//!
//! A warm request reads its [`Entry`] and increments one atomic: no RPC, no lock held across
//! an `.await`. The gate packs "parked" and the in-flight count into one `AtomicU64`, so a
//! request can never slip into an instance between the park check and the stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::lock;
use tenement_proto::rpc::{ActivityReport, Address, InstanceState, Route};
use tenement_proto::{InstanceId, ServiceName};
use tokio::sync::{watch, Notify};

const PARKED: u64 = 1 << 63;

/// What the proxy knows of where an instance is served.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteInfo {
    pub state: InstanceState,
    pub address: Address,
    pub weight: u32,
    pub generation: u64,
    /// The uid that must own the socket accepting a new upstream connection.
    pub owner_uid: Option<u32>,
    /// The accept queue of the instance's listener, when the supervisor said it.
    pub backlog: Option<u32>,
}

impl From<&Route> for RouteInfo {
    fn from(route: &Route) -> Self {
        Self {
            state: route.state,
            address: route.address.clone(),
            weight: route.weight,
            generation: route.generation,
            owner_uid: route.owner_uid,
            backlog: route.backlog,
        }
    }
}

/// The outcome of a shared wake, as every waiter sees it.
pub type WakeOutcome = Option<Result<RouteInfo, crate::respond::ProxyError>>;

pub struct Entry {
    pub id: InstanceId,
    route: Mutex<RouteInfo>,
    /// Bit 63: parked; the rest: requests in flight.
    gate: AtomicU64,
    /// Requests started, ever; and as of the last activity report.
    started: AtomicU64,
    reported: AtomicU64,
    /// Answers with a 2xx or 3xx status since the last activity report.
    succeeded: AtomicU64,
    /// Answers with a 5xx status from the instance since the last activity report.
    server_errors: AtomicU64,
    /// The in-flight count as of the last report, so its drop to 0 is reported too.
    reported_in_flight: AtomicU32,
    /// The wake in progress, shared by every request that needs it.
    pub wake: Mutex<Option<watch::Receiver<WakeOutcome>>>,
    /// The metric handles of its service, looked up once.
    pub metrics: std::sync::OnceLock<Arc<crate::metrics::ServiceHandles>>,
    /// The table's: woken when a drained instance's last request ends.
    drained: Arc<Notify>,
}

/// Held while a request (or an upgraded connection) is in flight; dropping it ends it.
pub struct InFlight {
    entry: Arc<Entry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.entry.gate.fetch_sub(1, Ordering::AcqRel);
        if before == PARKED | 1 {
            // The last request of an instance parked for a drain (a rollout's switch): the
            // supervisor waits for this, so it is reported now rather than at the next tick.
            self.entry.drained.notify_one();
        }
    }
}

impl Entry {
    fn new(id: InstanceId, route: RouteInfo, drained: Arc<Notify>) -> Self {
        Self {
            id,
            route: Mutex::new(route),
            gate: AtomicU64::new(0),
            started: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            reported_in_flight: AtomicU32::new(0),
            wake: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
            drained,
        }
    }

    pub fn route(&self) -> RouteInfo {
        lock(&self.route).clone()
    }

    /// Records a route; a new process generation or a running state lifts a park.
    pub fn set_route(&self, route: RouteInfo) {
        let mut current = lock(&self.route);
        let unpark = route.state == InstanceState::Running
            && (route.generation != current.generation || current.state != InstanceState::Running);
        *current = route;
        drop(current);
        if unpark {
            self.gate.fetch_and(!PARKED, Ordering::AcqRel);
        }
    }

    /// Enters the instance if it is running and not parked.
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlight> {
        if lock(&self.route).state != InstanceState::Running {
            return None;
        }
        let mut gate = self.gate.load(Ordering::Acquire);
        loop {
            if gate & PARKED != 0 {
                return None;
            }
            match self.gate.compare_exchange_weak(
                gate,
                gate + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.started.fetch_add(1, Ordering::Relaxed);
                    return Some(InFlight {
                        entry: self.clone(),
                    });
                }
                Err(now) => gate = now,
            }
        }
    }

    /// Parks the instance if nothing is in flight and nothing started since the last report.
    pub fn try_park(&self) -> bool {
        if self.started.load(Ordering::Acquire) != self.reported.load(Ordering::Acquire) {
            return false;
        }
        self.gate
            .compare_exchange(0, PARKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Parks whatever is in flight: requests already inside finish, new ones wait for a wake.
    pub fn park_for_drain(&self) {
        self.gate.fetch_or(PARKED, Ordering::AcqRel);
    }

    /// Lifts a park (the wake that follows will bring the instance back).
    pub fn unpark(&self) {
        self.gate.fetch_and(!PARKED, Ordering::AcqRel);
    }

    /// Requests started since this proxy learned of the instance.
    pub fn requests(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        (self.gate.load(Ordering::Acquire) & !PARKED) as u32
    }

    /// The instance answered a request with a 2xx or 3xx status.
    pub fn note_success(&self) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
    }

    /// The instance answered a request with a 5xx status (a rollout's bake watches these).
    pub fn note_server_error(&self) {
        self.server_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// What happened since the last call (requests started, answers that succeeded or were
    /// 5xx) and the in-flight count, when any of it is news.
    pub fn take_activity(&self) -> Option<ActivityReport> {
        let started = self.started.load(Ordering::Acquire);
        let before = self.reported.swap(started, Ordering::AcqRel);
        let in_flight = self.in_flight();
        let previous = self.reported_in_flight.swap(in_flight, Ordering::AcqRel);
        let succeeded = self.succeeded.swap(0, Ordering::AcqRel);
        let server_errors = self.server_errors.swap(0, Ordering::AcqRel);
        let started = started.wrapping_sub(before);
        (started > 0
            || in_flight > 0
            || previous != in_flight
            || succeeded > 0
            || server_errors > 0)
            .then(|| ActivityReport {
                instance: self.id.clone(),
                in_flight,
                started,
                succeeded,
                server_errors,
            })
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<InstanceId, Arc<Entry>>,
    by_service: HashMap<ServiceName, Vec<Arc<Entry>>>,
}

/// Every instance the proxy knows of.
pub struct Table {
    inner: RwLock<Inner>,
    /// Park requests agreed to (idle stops), ever.
    parks: AtomicU64,
    /// A complete snapshot has been received on the current watch stream.
    synced: watch::Sender<bool>,
    /// Notified when the last request of an instance parked for a drain ends.
    drained: Arc<Notify>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            parks: AtomicU64::new(0),
            synced: watch::channel(false).0,
            drained: Arc::new(Notify::new()),
        }
    }
}

impl Table {
    /// Resolves when a drained instance's last request has ended since the last call (the
    /// watch stream then reports activity at once).
    pub async fn drained(&self) {
        self.drained.notified().await;
    }

    pub fn get(&self, id: &InstanceId) -> Option<Arc<Entry>> {
        read(&self.inner).entries.get(id).cloned()
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.send_replace(synced);
    }

    /// A park request was agreed to.
    pub fn note_park(&self) {
        self.parks.fetch_add(1, Ordering::Relaxed);
    }

    /// Park requests agreed to, ever.
    pub fn parks(&self) -> u64 {
        self.parks.load(Ordering::Relaxed)
    }

    /// Whether the supervisor's route table is held now.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Every instance with its state (for the metrics).
    pub fn states(&self) -> Vec<(InstanceId, InstanceState)> {
        read(&self.inner)
            .entries
            .values()
            .map(|e| (e.id.clone(), e.route().state))
            .collect()
    }

    /// Waits until the table holds a full snapshot (at start, or after the supervisor came
    /// back), or until `deadline`. Returns whether it is synced.
    pub async fn wait_synced(&self, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.synced.subscribe();
        let synced = tokio::time::timeout_at(deadline, rx.wait_for(|synced| *synced))
            .await
            .is_ok_and(|r| r.is_ok());
        synced
    }

    /// Inserts or updates one route; returns its entry.
    pub fn upsert(&self, route: &Route) -> Arc<Entry> {
        if let Some(entry) = self.get(&route.instance) {
            entry.set_route(route.into());
            return entry;
        }
        let mut inner = write(&self.inner);
        if let Some(entry) = inner.entries.get(&route.instance) {
            entry.set_route(route.into());
            return entry.clone();
        }
        let entry = Arc::new(Entry::new(
            route.instance.clone(),
            route.into(),
            self.drained.clone(),
        ));
        inner.entries.insert(route.instance.clone(), entry.clone());
        inner
            .by_service
            .entry(route.instance.service.clone())
            .or_default()
            .push(entry.clone());
        entry
    }

    pub fn remove(&self, id: &InstanceId) {
        let mut inner = write(&self.inner);
        if inner.entries.remove(id).is_some() {
            if let Some(list) = inner.by_service.get_mut(&id.service) {
                list.retain(|e| &e.id != id);
            }
        }
    }

    /// Drops every entry not in `keep` (after a full snapshot).
    pub fn retain(&self, keep: &std::collections::HashSet<InstanceId>) {
        let mut inner = write(&self.inner);
        inner.entries.retain(|id, _| keep.contains(id));
        for list in inner.by_service.values_mut() {
            list.retain(|e| keep.contains(&e.id));
        }
    }

    /// A weighted random choice among the service's running instances, or among all its
    /// routed ones (to wake) when none runs.
    pub fn pick(&self, service: &ServiceName) -> Option<Arc<Entry>> {
        let inner = read(&self.inner);
        let list = inner.by_service.get(service)?;
        let routed: Vec<(&Arc<Entry>, RouteInfo)> = list
            .iter()
            .map(|e| (e, e.route()))
            .filter(|(_, r)| r.weight > 0 && r.state != InstanceState::Failed)
            .collect();
        let running: Vec<&(&Arc<Entry>, RouteInfo)> = routed
            .iter()
            .filter(|(_, r)| r.state == InstanceState::Running)
            .collect();
        let pool: Vec<&(&Arc<Entry>, RouteInfo)> = if running.is_empty() {
            routed.iter().collect()
        } else {
            running
        };
        let total: u64 = pool.iter().map(|(_, r)| u64::from(r.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = fastrand::u64(0..total);
        for (entry, route) in pool {
            let w = u64::from(route.weight);
            if ticket < w {
                return Some((*entry).clone());
            }
            ticket -= w;
        }
        None
    }

    /// Counts for the status page: (instances, running).
    pub fn counts(&self) -> (usize, usize) {
        let inner = read(&self.inner);
        let running = inner
            .entries
            .values()
            .filter(|e| e.route().state == InstanceState::Running)
            .count();
        (inner.entries.len(), running)
    }

    /// Entries with activity to report: something started since the last report or still in
    /// flight.
    pub fn activity(&self) -> Vec<ActivityReport> {
        let inner = read(&self.inner);
        inner
            .entries
            .values()
            .filter_map(|e| e.take_activity())
            .collect()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn route(id: &str, state: InstanceState, weight: u32, generation: u64) -> Route {
        Route {
            instance: InstanceId::parse(id).expect("valid"),
            state,
            address: Address::Tcp("127.0.0.1:1".parse().expect("addr")),
            weight,
            generation,
            owner_uid: None,
            backlog: None,
        }
    }

    #[test]
    fn a_parked_instance_admits_nobody_and_park_needs_quiet() {
        let table = Table::default();
        let entry = table.upsert(&route("notes:alice", InstanceState::Running, 1, 1));
        let guard = entry.try_enter().expect("running");
        assert!(!entry.try_park(), "in flight");
        drop(guard);
        assert!(!entry.try_park(), "a request started since the last report");
        let _ = entry.take_activity();
        assert!(entry.try_park());
        assert!(entry.try_enter().is_none(), "parked");
        // A new process lifts the park.
        table.upsert(&route("notes:alice", InstanceState::Running, 1, 2));
        assert!(entry.try_enter().is_some());
    }

    #[tokio::test]
    async fn the_last_request_of_a_drained_instance_is_reported_at_once() {
        let table = Table::default();
        let entry = table.upsert(&route("notes:alice", InstanceState::Running, 1, 1));
        let (a, b) = (entry.try_enter(), entry.try_enter());
        entry.park_for_drain();
        assert!(entry.try_enter().is_none(), "nothing new enters");
        drop(a);
        let early = tokio::time::timeout(Duration::from_millis(50), table.drained()).await;
        assert!(early.is_err(), "one request is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), table.drained())
            .await
            .expect("the drop to zero wakes the watch stream");
        assert_eq!(entry.in_flight(), 0);
    }

    #[test]
    fn activity_reports_started_and_in_flight_once() {
        let table = Table::default();
        let entry = table.upsert(&route("notes:alice", InstanceState::Running, 1, 1));
        let a = entry.try_enter();
        let _b = entry.try_enter();
        drop(a);
        let report = table.activity();
        assert_eq!(report.len(), 1);
        assert_eq!((report[0].started, report[0].in_flight), (2, 1));
        let report = table.activity();
        assert_eq!(
            (report[0].started, report[0].in_flight),
            (0, 1),
            "only in flight remains"
        );
        drop(_b);
        let report = table.activity();
        assert_eq!(
            (report[0].started, report[0].in_flight),
            (0, 0),
            "the drop to zero is news"
        );
        assert!(table.activity().is_empty(), "then nothing is");
    }

    #[test]
    fn weighted_pick_prefers_running_and_respects_weights() {
        let table = Table::default();
        table.upsert(&route("web:a", InstanceState::Stopped, 1, 0));
        table.upsert(&route("web:b", InstanceState::Running, 3, 1));
        table.upsert(&route("web:c", InstanceState::Running, 1, 1));
        table.upsert(&route("web:d", InstanceState::Running, 0, 1));
        let service = ServiceName::new("web").expect("valid");
        let mut counts = HashMap::new();
        for _ in 0..4000 {
            let e = table.pick(&service).expect("some");
            *counts.entry(e.id.id.to_string()).or_insert(0) += 1;
        }
        assert!(
            !counts.contains_key("a"),
            "a stopped instance is not picked while others run"
        );
        assert!(!counts.contains_key("d"), "weight 0 is never picked");
        let (b, c) = (counts["b"], counts["c"]);
        assert!(b > 2 * c && b < 4 * c, "about 3:1, got {b}:{c}");
        // None running: a stopped one is picked to be woken.
        table.upsert(&route("web:b", InstanceState::Stopped, 3, 1));
        table.upsert(&route("web:c", InstanceState::Stopped, 1, 1));
        assert!(table.pick(&service).is_some());
        assert!(table
            .pick(&ServiceName::new("nope").expect("valid"))
            .is_none());
    }
}
