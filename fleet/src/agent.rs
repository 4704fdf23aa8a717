//! One host's membership: a lease, renewed; the host record under it; the placement watch;
//! the controller's campaign; and the fence when the lease cannot be renewed in time.
//!
//! A membership term starts with a new lease and ends when this host fences itself. A fenced
//! host drops everything the term started (the controller's turn included), tries to revoke
//! the old lease so the others learn at once, and joins again with a new lease: placements
//! name hosts, not leases, so what is still placed here is served again once it is a member.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tenement_proto::config::Fleet;
use tenement_proto::ids::InstanceId;
use tenement_proto::rpc::FleetPeer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout};
use tracing::{error, info, warn};

use crate::controller;
use crate::fence::LeaseClock;
use crate::records::{self, now_ms, HostRecord, Release, HOSTS, PLACEMENTS};
use crate::status::{Membership, Status};
use crate::supervisor::{Report, Word};
use crate::view::View;

/// The agent's status, kept in memory and in its file, and the word for the supervisor
/// (crate::supervisor) that follows from it.
#[derive(Clone)]
pub struct Shared {
    status: Arc<Mutex<Status>>,
    /// Until when this host's lease is sure to hold (`None`: not a member).
    until: Arc<Mutex<Option<Instant>>>,
    /// The tenants placed on the other hosts, for the proxy, and those placed here that
    /// must wait for their previous host.
    view: Arc<Mutex<(Vec<FleetPeer>, BTreeSet<String>)>>,
    path: PathBuf,
    word: watch::Sender<Word>,
    reports: watch::Receiver<Report>,
}

impl Shared {
    /// `word` goes to the supervisor; `reports` is what it answers.
    pub fn new(
        host: &str,
        path: PathBuf,
        word: watch::Sender<Word>,
        reports: watch::Receiver<Report>,
    ) -> Self {
        Shared {
            status: Arc::new(Mutex::new(Status::new(host))),
            until: Arc::new(Mutex::new(None)),
            view: Arc::default(),
            path,
            word,
            reports,
        }
    }

    /// Changes the status and writes the file (when something changed).
    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let before = status.clone();
        change(&mut status);
        if *status == before {
            return;
        }
        status.updated_ms = now_ms();
        if let Err(e) = status.write(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot write the fleet status");
        }
        let owned = status.placed_here.clone();
        drop(status);
        self.publish(owned);
    }

    /// Writes the status file as it is now, changed or not.
    fn write_all(&self) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.updated_ms = now_ms();
        if let Err(e) = status.write(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot write the fleet status");
        }
    }

    /// The lease now holds until `until` (`None`: it does not).
    fn hold_until(&self, until: Option<Instant>) {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner) = until;
        self.publish_current();
    }

    /// The tenants placed on the other hosts, or those held here, changed (or may have).
    fn set_view(&self, peers: Vec<FleetPeer>, held: BTreeSet<String>) {
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = (peers, held);
        self.publish_current();
    }

    /// The word again, with the tenants placed here as the status has them.
    fn publish_current(&self) {
        let owned = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .placed_here
            .clone();
        self.publish(owned);
    }

    fn publish(&self, owned: BTreeMap<String, u64>) {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        let (peers, held) = self
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let word = Word {
            owned,
            until,
            peers,
            held,
        };
        self.word.send_if_modified(|current| {
            let changed = *current != word;
            *current = word;
            changed
        });
    }

    fn running(&self) -> u32 {
        self.reports.borrow().running
    }
}

/// Runs membership terms until the process is stopped.
pub async fn run(fleet: Fleet, shared: Shared) {
    let clock = LeaseClock::new(fleet.lease_ttl);
    // Whatever a previous agent left in the file is no longer true.
    shared.write_all();
    let mut backoff = Duration::from_millis(250);
    loop {
        match term(&fleet, &clock, &shared).await {
            Ok(()) => backoff = Duration::from_millis(250),
            Err(e) => {
                warn!(error = %describe(&e), "cannot join the fleet; trying again in {backoff:?}");
                backoff = (backoff * 2).min(fleet.lease_ttl);
            }
        }
        sleep(backoff).await;
    }
}

/// A client of one etcd member that answers with a leader behind it, trying the members in
/// turn (each call starts at the next one, so a host's clients spread over the members).
/// With `timeout`, every call that does not answer within it fails (the campaign, which waits
/// until it wins, gets a client without one).
///
/// One member per client, not etcd-client's balanced channel over all: that one keeps
/// sending a share of the calls to a member that is down.
pub async fn connect(fleet: &Fleet, timeout: Option<Duration>) -> anyhow::Result<Client> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = NEXT.fetch_add(1, Ordering::Relaxed);
    let count = fleet.etcd.len();
    let mut failures = Vec::with_capacity(count);
    for i in 0..count {
        let endpoint = &fleet.etcd[(start + i) % count];
        match tokio::time::timeout(CONNECT_TIMEOUT, member(endpoint, timeout)).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => failures.push(format!("{endpoint}: {}", describe(&e))),
            Err(_) => failures.push(format!("{endpoint}: no answer in {CONNECT_TIMEOUT:?}")),
        }
    }
    anyhow::bail!("no etcd member answers: {}", failures.join("; "))
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

async fn member(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        // A member cut off from the others' quorum must not answer from its stale copy.
        .with_require_leader(true);
    if let Some(timeout) = timeout {
        options = options.with_timeout(timeout);
    }
    let mut client = Client::connect([endpoint], Some(options)).await?;
    // Refused by a member without a leader (require_leader), so only a useful one is kept.
    client
        .get(
            records::HOSTS,
            Some(GetOptions::new().with_keys_only().with_limit(1)),
        )
        .await?;
    Ok(client)
}

/// One membership term; returns when the host fenced itself (an error before it joined).
async fn term(fleet: &Fleet, clock: &LeaseClock, shared: &Shared) -> anyhow::Result<()> {
    let mut client = connect(fleet, Some(clock.renew_every())).await?;
    let ttl_secs = i64::try_from(clock.ttl().as_secs()).unwrap_or(i64::MAX);
    let sent = Instant::now();
    let grant = client
        .lease_grant(ttl_secs, None)
        .await
        .context("cannot get a lease")?;
    let lease = grant.id();
    let granted = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0));
    let (deadline_tx, mut deadline_rx) = watch::channel(clock.deadline(sent, granted));
    put_host_record(&mut client, fleet, lease, shared.running())
        .await
        .context("cannot announce this host")?;
    info!(lease = %format!("{lease:x}"), ttl = ?clock.ttl(), "joined the fleet");
    shared.update(|s| {
        s.membership = Membership::Member;
        s.lease = Some(format!("{lease:x}"));
    });

    let mut tasks = JoinSet::new();
    tasks.spawn(renew(
        client.clone(),
        fleet.clone(),
        *clock,
        lease,
        deadline_tx,
        shared.clone(),
    ));
    tasks.spawn(watch_placements(
        client.clone(),
        fleet.clone(),
        *clock,
        shared.clone(),
    ));
    tasks.spawn(controller::take_turns(
        fleet.clone(),
        *clock,
        lease,
        shared.clone(),
    ));
    loop {
        let deadline = *deadline_rx.borrow_and_update();
        shared.hold_until(Some(deadline));
        tokio::select! {
            () = sleep_until(deadline.into()) => break,
            changed = deadline_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    tasks.abort_all();
    shared.hold_until(None);
    error!(lease = %format!("{lease:x}"), "fenced: the lease was not renewed in time; this host serves nothing until it rejoins");
    shared.update(|s| {
        s.membership = Membership::Fenced;
        s.controller = false;
        s.placed_here.clear();
        s.fences += 1;
        s.fenced_ms = Some(now_ms());
    });
    // Best effort: if etcd is reachable after all, the others need not wait for the expiry.
    let _ = timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
    Ok(())
}

/// Renews the lease every third of its life; each acknowledged renewal moves the fence
/// deadline. A renewal that fails or is late reopens the stream, so an answer is never taken
/// for a later request's, and is tried again after [`RETRY`], from another member if that one
/// fails too: the fence deadline, not the renewal period, bounds how long etcd may take to
/// come back (an election after its leader died takes a second or two).
async fn renew(
    mut client: Client,
    fleet: Fleet,
    clock: LeaseClock,
    lease: i64,
    deadline: watch::Sender<Instant>,
    shared: Shared,
) {
    let mut stream = None;
    let mut complained = false;
    loop {
        let sent = Instant::now();
        let mut next = sent + clock.renew_every();
        let round = async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(lease).await?);
            }
            let (keeper, responses) = stream.as_mut().expect("opened above");
            keeper.keep_alive().await?;
            responses.message().await
        };
        match timeout(clock.renew_every(), round).await {
            Ok(Ok(Some(answer))) => {
                if answer.ttl() <= 0 {
                    error!(lease = %format!("{lease:x}"), "the lease has expired in etcd");
                    let _ = deadline.send(Instant::now());
                    return;
                }
                let granted = Duration::from_secs(u64::try_from(answer.ttl()).unwrap_or(0));
                let _ = deadline.send(clock.deadline(sent, granted));
                if complained {
                    info!("renewing the lease again");
                    complained = false;
                }
                let _ = timeout(
                    clock.renew_every(),
                    put_host_record(&mut client, &fleet, lease, shared.running()),
                )
                .await;
            }
            outcome => {
                stream = None;
                next = Instant::now() + RETRY;
                // The member may be the problem: the next round asks another.
                if let Ok(Ok(other)) = timeout(
                    clock.renew_every(),
                    connect(&fleet, Some(clock.renew_every())),
                )
                .await
                {
                    client = other;
                }
                if !complained {
                    let why = match outcome {
                        Ok(Err(e)) => brief(&e),
                        Ok(Ok(None)) => "etcd closed the renewal stream".to_owned(),
                        _ => "no answer in time".to_owned(),
                    };
                    warn!(reason = %why, "cannot renew the lease; trying again");
                    complained = true;
                }
            }
        }
        sleep_until(next.into()).await;
    }
}

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_millis(200);

async fn put_host_record(
    client: &mut Client,
    fleet: &Fleet,
    lease: i64,
    running: u32,
) -> anyhow::Result<()> {
    let (memory_total, memory_available) = memory();
    let record = HostRecord {
        address: fleet.address,
        memory_total,
        memory_available,
        running,
        max_tenants: fleet.max_tenants,
        heartbeat_ms: now_ms(),
    };
    let value = serde_json::to_vec(&record)?;
    client
        .put(
            records::host_key(&fleet.host),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(())
}

/// MemTotal and MemAvailable from /proc/meminfo, in bytes (0 when unreadable).
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Keeps `placed_here` and the peers current: a read of every placement and host record,
/// then a watch from that revision; when the watch breaks, the same from another member.
async fn watch_placements(mut client: Client, fleet: Fleet, clock: LeaseClock, shared: Shared) {
    loop {
        if let Err(e) = follow_placements(&mut client, &fleet.host, &shared).await {
            warn!(error = %describe(&e), "lost the placement watch; reading again");
            sleep(Duration::from_millis(200)).await;
            if let Ok(other) = connect(&fleet, Some(clock.renew_every())).await {
                client = other;
            }
        }
    }
}

async fn follow_placements(client: &mut Client, host: &str, shared: &Shared) -> anyhow::Result<()> {
    // One transaction, so both reads are of one revision, which the watch starts after.
    let prefix = || Some(GetOptions::new().with_prefix());
    let read = client
        .txn(Txn::new().and_then([
            TxnOp::get(HOSTS, prefix()),
            TxnOp::get(PLACEMENTS, prefix()),
        ]))
        .await?;
    let revision = read.header().map_or(0, |h| h.revision());
    let mut view = View::default();
    for answer in read.op_responses() {
        if let TxnOpResponse::Get(got) = answer {
            for kv in got.kvs() {
                view.apply(kv.key(), Some(kv.value()));
            }
        }
    }
    let publish = |view: &View| {
        let mine = view.placed_on(host);
        shared.update(|s| s.placed_here = mine);
        shared.set_view(view.peers(host), view.held_on(host));
    };
    publish(&view);
    let mut reports = shared.reports.clone();
    // Written by this watch already (its echo may not have come back yet).
    let mut written = BTreeSet::new();
    let first = reports.borrow_and_update().clone();
    release(client, host, &view, &first, &mut written).await?;
    let mut stream = client
        .watch(
            records::ROOT,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    loop {
        tokio::select! {
            answer = stream.message() => {
                let Some(answer) = answer? else {
                    anyhow::bail!("etcd ended the watch");
                };
                if answer.canceled() {
                    anyhow::bail!("etcd cancelled the watch: {}", answer.cancel_reason());
                }
                for event in answer.events() {
                    let Some(kv) = event.kv() else { continue };
                    let value = (event.event_type() == EventType::Put).then(|| kv.value());
                    view.apply(kv.key(), value);
                }
                publish(&view);
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the supervisor link ended");
                }
            }
        }
        let report = reports.borrow_and_update().clone();
        release(client, host, &view, &report, &mut written).await?;
    }
}

/// Writes the release of each tenant moved off this host (a drain) that the supervisor has
/// stopped: its answer to a word that no longer placed the tenant here lists no process for
/// it. The tenant's new host starts it only then, so two hosts never run it.
async fn release(
    client: &mut Client,
    host: &str,
    view: &View,
    report: &Report,
    written: &mut BTreeSet<(InstanceId, u64)>,
) -> anyhow::Result<()> {
    let Some(owned) = &report.owned else {
        return Ok(());
    };
    for (tenant, epoch) in view.to_release(host) {
        let name = tenant.to_string();
        if owned.contains(&name)
            || report.stopping.contains(&name)
            || written.contains(&(tenant.clone(), epoch))
        {
            continue;
        }
        let value = serde_json::to_vec(&Release {
            epoch,
            host: host.to_owned(),
        })?;
        client
            .put(records::released_key(&tenant), value, None)
            .await?;
        info!(tenant = %tenant, epoch, "released: stopped here, its new host may start it");
        written.insert((tenant, epoch));
    }
    Ok(())
}

/// An error's causes on one line, an etcd error among them said briefly ([`brief`]).
pub fn describe(error: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        if let Some(etcd) = cause.downcast_ref::<etcd_client::Error>() {
            parts.push(brief(etcd));
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// An etcd client error without the debug dump of its transport: gRPC's message and the
/// root cause, like "tcp connect error (Connection refused (os error 111))".
pub fn brief(error: &etcd_client::Error) -> String {
    let (message, mut cause): (String, Option<&(dyn std::error::Error + 'static)>) = match error {
        etcd_client::Error::GRpcStatus(status) => (
            status.message().to_owned(),
            std::error::Error::source(status),
        ),
        etcd_client::Error::TransportError(e) => ("transport error".to_owned(), Some(e)),
        other => return other.to_string(),
    };
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    match root.map(ToString::to_string) {
        Some(root) if !root.is_empty() && root != message => format!("{message} ({root})"),
        _ => message,
    }
}
