//! The fleet's controller: every host campaigns through etcd's election API with its lease;
//! the one elected reads the fleet, plans (crate::plan) and writes placements, each in a
//! transaction that holds only while it still leads and the record is the one it read. Its
//! turn ends with its lease; another host's campaign then wins.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaderKey, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use tenement_proto::config::Fleet;
use tenement_proto::ids::InstanceId;
use tokio::time::{sleep, timeout};
use tracing::{info, warn};

use crate::agent::{self, Shared};
use crate::fence::LeaseClock;
use crate::plan::{plan, Action, World};
use crate::records::{self, now_ms, Key, TenantRecord, ELECTION, ROOT};

/// The longest the controller goes without reading the fleet again.
const RECHECK: Duration = Duration::from_secs(5);

/// Campaigns, then leads until leadership is lost; then campaigns again. Each turn gets
/// fresh clients (the member they used may be the reason the turn ended).
pub async fn take_turns(fleet: Fleet, clock: LeaseClock, lease: i64, shared: Shared) {
    // What the last turn learned of gone hosts, kept only if the next turn is the same
    // leadership (the same election key): otherwise a host may have come and gone unseen.
    let mut kept: Option<(i64, GoneSince)> = None;
    loop {
        let turn = async {
            // Without a call timeout: a campaign waits until it wins.
            let mut campaigner = agent::connect(&fleet, None).await?;
            let leader = campaigner
                .campaign(ELECTION, fleet.host.as_bytes(), lease)
                .await?
                .take_leader()
                .ok_or_else(|| anyhow::anyhow!("etcd elected no leader key"))?;
            let client = agent::connect(&fleet, Some(clock.renew_every())).await?;
            anyhow::Ok((leader, client))
        };
        let (leader, mut client) = match turn.await {
            Ok(elected) => elected,
            Err(e) => {
                warn!(error = %agent::describe(&e), "cannot campaign for the controller; trying again");
                sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut gone_since = match kept.take() {
            Some((rev, gone_since)) if rev == leader.rev() => gone_since,
            _ => {
                info!("this host is the fleet's controller");
                GoneSince::new()
            }
        };
        shared.update(|s| s.controller = true);
        let outcome = lead(&mut client, &fleet, &leader, &mut gone_since).await;
        match outcome {
            Ok(()) => {
                info!("no longer the fleet's controller");
                shared.update(|s| s.controller = false);
            }
            Err(e) => {
                // Still the leader in etcd, most likely: the next campaign returns at once
                // with the same key, and the turn goes on where it was.
                warn!(error = %agent::describe(&e), "the controller lost etcd; reconnecting");
                kept = Some((leader.rev(), gone_since));
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
}

type GoneSince = BTreeMap<String, Instant>;

/// Leads until this host's election key is gone or replaced; an error ends the turn too.
async fn lead(
    client: &mut Client,
    fleet: &Fleet,
    leader: &LeaderKey,
    gone_since: &mut GoneSince,
) -> anyhow::Result<()> {
    let mut unplaceable: BTreeSet<InstanceId> = BTreeSet::new();
    let mut unreadable: BTreeSet<(InstanceId, i64)> = BTreeSet::new();
    let mut changes: Option<WatchStream> = None;
    loop {
        let read = client
            .get(ROOT, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = read.header().map_or(0, |h| h.revision());
        let mut world = World {
            grace: fleet.grace,
            ..World::default()
        };
        let mut leading = false;
        for kv in read.kvs() {
            if kv.key() == leader.key() {
                leading = kv.create_revision() == leader.rev();
            }
            match Key::parse(kv.key()) {
                Key::Host(name) => {
                    if let Ok(record) = serde_json::from_slice(kv.value()) {
                        world.hosts.insert(name, record);
                    }
                }
                Key::Tenant(id) => {
                    // An unreadable record still says the tenant is wanted: a typo must not
                    // stop a tenant. It is placed with the defaults and reported once.
                    let record = serde_json::from_slice(kv.value()).unwrap_or_else(|e| {
                        if unreadable.insert((id.clone(), kv.mod_revision())) {
                            warn!(tenant = %id, error = %e, "a tenant record is not JSON the fleet reads; the tenant is kept with the default tier");
                        }
                        TenantRecord::default()
                    });
                    world.tenants.insert(id, record);
                }
                Key::Placement(id) => {
                    if let Ok(placement) = serde_json::from_slice(kv.value()) {
                        world.placements.insert(id, (placement, kv.mod_revision()));
                    }
                }
                Key::Drain(host) => {
                    world.drained.insert(host);
                }
                Key::Released(_) | Key::Other => {}
            }
        }
        if !leading {
            return Ok(());
        }
        let now = Instant::now();
        gone_since.retain(|host, _| !world.hosts.contains_key(host));
        for (placement, _) in world.placements.values() {
            if !world.hosts.contains_key(&placement.host) {
                gone_since.entry(placement.host.clone()).or_insert(now);
            }
        }
        world.gone_for = gone_since
            .iter()
            .map(|(host, since)| (host.clone(), now - *since))
            .collect();
        let plan = plan(&world, now_ms());
        for tenant in &plan.unplaceable {
            if unplaceable.insert(tenant.clone()) {
                warn!(tenant = %tenant, "no live host has room for this tenant; it waits for one");
            }
        }
        unplaceable.retain(|t| plan.unplaceable.contains(t));
        for batch in plan.actions.chunks(BATCH) {
            if !carry_out(client, leader, batch).await? {
                // Someone else changed a record (or this host no longer leads): read again.
                break;
            }
        }
        if changes.is_none() {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            changes = Some(client.watch(ROOT, Some(options)).await?);
        }
        if !plan.actions.is_empty() {
            continue;
        }
        let wait = plan.next_check().map_or(RECHECK, |d| d.min(RECHECK));
        let stream = changes.as_mut().expect("opened above");
        if let Ok(Err(e)) = timeout(wait, next_change(stream)).await {
            return Err(e);
        }
    }
}

/// Waits for a change that can alter the plan: a host joining or leaving, any tenant or
/// placement write, the election. A host renewing its record is not one.
async fn next_change(stream: &mut WatchStream) -> anyhow::Result<()> {
    loop {
        let Some(answer) = stream.message().await? else {
            anyhow::bail!("etcd ended the watch");
        };
        if answer.canceled() {
            anyhow::bail!("etcd cancelled the watch: {}", answer.cancel_reason());
        }
        let relevant = answer.events().iter().any(|event| {
            let Some(kv) = event.kv() else { return false };
            match Key::parse(kv.key()) {
                Key::Host(_) => event.event_type() == EventType::Delete || kv.version() == 1,
                Key::Tenant(_) | Key::Placement(_) | Key::Drain(_) => true,
                Key::Released(_) => false,
                Key::Other => kv.key().starts_with(ELECTION.as_bytes()),
            }
        });
        if relevant {
            return Ok(());
        }
    }
}

/// Actions per transaction: etcd refuses more than 128 compares or operations in one.
const BATCH: usize = 64;

/// A batch of actions as one transaction (one disk write in etcd instead of one per action),
/// each action's check with it; when the batch is refused, each action alone, so one stale
/// record does not hold the others back. Whether every action was applied.
async fn carry_out(
    client: &mut Client,
    leader: &LeaderKey,
    actions: &[Action],
) -> anyhow::Result<bool> {
    if actions.len() > 1 && transact(client, leader, actions).await? {
        actions.iter().for_each(report);
        return Ok(true);
    }
    for action in actions {
        if !transact(client, leader, std::slice::from_ref(action)).await? {
            return Ok(false);
        }
        report(action);
    }
    Ok(true)
}

/// `actions` in one transaction that holds only while this controller leads and each record
/// is the one it read; whether it was applied.
async fn transact(
    client: &mut Client,
    leader: &LeaderKey,
    actions: &[Action],
) -> anyhow::Result<bool> {
    let mut compares = Vec::with_capacity(actions.len() + 1);
    compares.push(Compare::create_revision(
        leader.key(),
        CompareOp::Equal,
        leader.rev(),
    ));
    let mut ops = Vec::with_capacity(actions.len());
    for action in actions {
        let (compare, op) = match action {
            Action::Place { tenant, placement } => {
                let key = records::placement_key(tenant);
                (
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                    TxnOp::put(key, serde_json::to_vec(placement)?, None),
                )
            }
            Action::Move {
                tenant,
                placement,
                expected,
                ..
            } => {
                let key = records::placement_key(tenant);
                (
                    Compare::mod_revision(key.clone(), CompareOp::Equal, *expected),
                    TxnOp::put(key, serde_json::to_vec(placement)?, None),
                )
            }
            Action::Unplace { tenant, expected } => {
                let key = records::placement_key(tenant);
                (
                    Compare::mod_revision(key.clone(), CompareOp::Equal, *expected),
                    TxnOp::delete(key, None),
                )
            }
        };
        compares.push(compare);
        ops.push(op);
    }
    let txn = Txn::new().when(compares).and_then(ops);
    Ok(client.txn(txn).await?.succeeded())
}

fn report(action: &Action) {
    match action {
        Action::Place { tenant, placement } => {
            info!(tenant = %tenant, host = %placement.host, epoch = placement.epoch, "placed");
        }
        Action::Move {
            tenant,
            from,
            placement,
            ..
        } => {
            if placement.from.is_some() {
                info!(tenant = %tenant, from = %from, host = %placement.host, epoch = placement.epoch, "moving off a drained host");
            } else {
                info!(tenant = %tenant, from = %from, host = %placement.host, epoch = placement.epoch, "moved off a gone host");
            }
        }
        Action::Unplace { tenant, .. } => info!(tenant = %tenant, "unplaced: no longer wanted"),
    }
}
