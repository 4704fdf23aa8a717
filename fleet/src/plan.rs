//! What the controller should change, decided from what it read: pure, so it is tested by
//! tables. The controller carries the actions out as etcd transactions that each check the
//! record they change is still the one read here, and that this controller still leads.
//!
//! - A wanted tenant without a placement goes to the least loaded live host with room.
//! - A placement on a host that is gone (its lease expired) moves once the host has been gone
//!   for the grace period: to its first live standby with room, else the least loaded host;
//!   the epoch goes up by one, so the old host can never take it for its own again.
//! - A placement on a live host that is drained moves to its first standby with room that is
//!   not drained, else the least loaded such host, naming the host it leaves (`from`): that
//!   host drains and stops it first, and says so (docs/FLEET.md, drains).
//! - A placement whose tenant is no longer wanted is removed.
//!
//! "Least loaded": the fewest tenants placed (counting this plan's), then the fewest running,
//! then the most memory available. A host with under a tenth of its memory available is only
//! chosen when no other has room, and never beyond its `max_tenants`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tenement_proto::ids::InstanceId;

use crate::records::{HostRecord, Placement, TenantRecord, Tier};

/// What the controller read, in one revision of etcd.
#[derive(Debug, Default)]
pub struct World {
    /// Live hosts (their lease holds).
    pub hosts: BTreeMap<String, HostRecord>,
    pub tenants: BTreeMap<InstanceId, TenantRecord>,
    /// Placements with their `mod_revision`.
    pub placements: BTreeMap<InstanceId, (Placement, i64)>,
    /// For hosts named by placements but not live: how long this controller has seen them
    /// gone. A host missing here counts as gone since now.
    pub gone_for: BTreeMap<String, Duration>,
    pub grace: Duration,
    /// Hosts an operator drains: nothing new goes there, and what is there moves away.
    pub drained: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the placement; only if the tenant has none.
    Place {
        tenant: InstanceId,
        placement: Placement,
    },
    /// Replace the placement read at `expected` (the old host is gone, or drained).
    Move {
        tenant: InstanceId,
        from: String,
        placement: Placement,
        expected: i64,
    },
    /// Delete the placement read at `expected` (the tenant is no longer wanted).
    Unplace { tenant: InstanceId, expected: i64 },
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Tenants on a gone host still inside its grace period, with the time left.
    pub waiting: Vec<(InstanceId, Duration)>,
    /// Tenants that no live host has room for.
    pub unplaceable: Vec<InstanceId>,
}

impl Plan {
    /// When the controller should look again even if nothing changes in etcd.
    pub fn next_check(&self) -> Option<Duration> {
        self.waiting.iter().map(|(_, left)| *left).min()
    }
}

struct Load<'a> {
    record: &'a HostRecord,
    placed: u32,
    drained: bool,
}

impl Load<'_> {
    fn has_room(&self) -> bool {
        !self.drained && self.record.max_tenants.is_none_or(|cap| self.placed < cap)
    }

    fn low_on_memory(&self) -> bool {
        self.record.memory_available < self.record.memory_total / 10
    }
}

pub fn plan(world: &World, now_ms: u64) -> Plan {
    let mut loads: BTreeMap<&str, Load<'_>> = world
        .hosts
        .iter()
        .map(|(name, record)| {
            let drained = world.drained.contains(name);
            (
                name.as_str(),
                Load {
                    record,
                    placed: 0,
                    drained,
                },
            )
        })
        .collect();
    for (placement, _) in world.placements.values() {
        if let Some(load) = loads.get_mut(placement.host.as_str()) {
            load.placed += 1;
        }
    }
    let mut out = Plan::default();
    for (tenant, (placement, revision)) in &world.placements {
        if !world.tenants.contains_key(tenant) {
            out.actions.push(Action::Unplace {
                tenant: tenant.clone(),
                expected: *revision,
            });
            if let Some(load) = loads.get_mut(placement.host.as_str()) {
                load.placed -= 1;
            }
            continue;
        }
        let drained = match loads.get(placement.host.as_str()) {
            Some(load) if load.drained => true,
            Some(_) => continue,
            None => false,
        };
        if !drained {
            let gone_for = world
                .gone_for
                .get(&placement.host)
                .copied()
                .unwrap_or_default();
            if gone_for < world.grace {
                out.waiting.push((tenant.clone(), world.grace - gone_for));
                continue;
            }
        }
        let standby = placement
            .standby
            .iter()
            .find(|h| loads.get(h.as_str()).is_some_and(Load::has_room))
            .cloned();
        let Some(host) = standby.or_else(|| least_loaded(&loads, &[])) else {
            out.unplaceable.push(tenant.clone());
            continue;
        };
        let mut moved = assign(
            &mut loads,
            host,
            placement.tier,
            placement.epoch + 1,
            now_ms,
        );
        if drained {
            // The host is alive and hands the tenant over itself (no grace to wait).
            moved.from = Some(placement.host.clone());
            if let Some(load) = loads.get_mut(placement.host.as_str()) {
                load.placed -= 1;
            }
        }
        out.actions.push(Action::Move {
            tenant: tenant.clone(),
            from: placement.host.clone(),
            placement: moved,
            expected: *revision,
        });
    }
    for (tenant, record) in &world.tenants {
        if world.placements.contains_key(tenant) {
            continue;
        }
        let Some(host) = least_loaded(&loads, &[]) else {
            out.unplaceable.push(tenant.clone());
            continue;
        };
        out.actions.push(Action::Place {
            tenant: tenant.clone(),
            placement: assign(&mut loads, host, record.tier, 1, now_ms),
        });
    }
    out
}

fn least_loaded(loads: &BTreeMap<&str, Load<'_>>, except: &[&str]) -> Option<String> {
    loads
        .iter()
        .filter(|(name, load)| load.has_room() && !except.contains(name))
        .min_by_key(|(name, load)| {
            (
                load.low_on_memory(),
                load.placed,
                load.record.running,
                Reverse(load.record.memory_available),
                *name,
            )
        })
        .map(|(name, _)| (*name).to_owned())
}

/// `host` takes one more tenant; the placement that says so, with a standby elsewhere.
fn assign(
    loads: &mut BTreeMap<&str, Load<'_>>,
    host: String,
    tier: Tier,
    epoch: u64,
    now_ms: u64,
) -> Placement {
    if let Some(load) = loads.get_mut(host.as_str()) {
        load.placed += 1;
    }
    let standby = standby_for(loads, tier, &host);
    Placement {
        host,
        standby,
        tier,
        epoch,
        placed_ms: now_ms,
        from: None,
    }
}

/// One other host to hold the tenant's replica (none for active-active: the app replicates).
fn standby_for(loads: &BTreeMap<&str, Load<'_>>, tier: Tier, host: &str) -> Vec<String> {
    if tier == Tier::ActiveActive {
        return Vec::new();
    }
    least_loaded(loads, &[host]).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(running: u32, available_gib: u64, cap: Option<u32>) -> HostRecord {
        HostRecord {
            address: "10.0.0.1:7443".parse().expect("addr"),
            memory_total: 16 * GIB,
            memory_available: available_gib * GIB,
            running,
            max_tenants: cap,
            heartbeat_ms: 0,
        }
    }

    fn id(text: &str) -> InstanceId {
        InstanceId::parse(text).expect("id")
    }

    fn world(hosts: &[(&str, HostRecord)], tenants: &[&str]) -> World {
        World {
            hosts: hosts
                .iter()
                .map(|(n, r)| ((*n).to_owned(), r.clone()))
                .collect(),
            tenants: tenants
                .iter()
                .map(|t| (id(t), TenantRecord::default()))
                .collect(),
            grace: Duration::from_secs(30),
            ..World::default()
        }
    }

    fn placed(host: &str, standby: &[&str], epoch: u64) -> Placement {
        Placement {
            host: host.to_owned(),
            standby: standby.iter().map(|s| (*s).to_owned()).collect(),
            tier: Tier::Cold,
            epoch,
            placed_ms: 1,
            from: None,
        }
    }

    /// host -> tenants it was given, from the plan's Place and Move actions.
    fn given(plan: &Plan) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for action in &plan.actions {
            if let Action::Place { tenant, placement }
            | Action::Move {
                tenant, placement, ..
            } = action
            {
                out.entry(placement.host.clone())
                    .or_default()
                    .push(tenant.to_string());
            }
        }
        out
    }

    #[test]
    fn new_tenants_spread_evenly_with_a_standby_elsewhere() {
        let tenants: Vec<String> = (0..30).map(|i| format!("notes:t{i:02}")).collect();
        let names: Vec<&str> = tenants.iter().map(String::as_str).collect();
        let w = world(
            &[
                ("h1", host(0, 8, None)),
                ("h2", host(0, 8, None)),
                ("h3", host(0, 8, None)),
            ],
            &names,
        );
        let plan = plan(&w, 7);
        let counts: Vec<usize> = given(&plan).values().map(Vec::len).collect();
        assert_eq!(counts, [10, 10, 10]);
        for action in &plan.actions {
            let Action::Place { placement, .. } = action else {
                panic!("only placements: {action:?}");
            };
            assert_eq!(placement.epoch, 1);
            assert_eq!(placement.placed_ms, 7);
            assert_eq!(placement.standby.len(), 1);
            assert_ne!(placement.standby[0], placement.host);
        }
    }

    #[test]
    fn least_loaded_is_fewest_placed_then_running_then_memory() {
        /// A host with its running count and free GiB.
        type Host = (&'static str, u32, u64);
        /// Hosts, tenants already placed per host, the host chosen.
        type Case = (
            &'static [Host],
            &'static [(&'static str, usize)],
            &'static str,
        );
        let table: &[Case] = &[
            (&[("h1", 0, 8), ("h2", 0, 8)], &[], "h1"),
            (&[("h1", 0, 8), ("h2", 0, 8)], &[("h1", 1)], "h2"),
            (&[("h1", 3, 8), ("h2", 1, 8)], &[], "h2"),
            (&[("h1", 1, 4), ("h2", 1, 9)], &[], "h2"),
            // under a tenth of 16 GiB free: only when no one else has room
            (&[("h1", 0, 1), ("h2", 9, 8)], &[("h2", 5)], "h2"),
        ];
        for (hosts, already, expected) in table {
            let records: Vec<(&str, HostRecord)> = hosts
                .iter()
                .map(|(n, running, free)| (*n, host(*running, *free, None)))
                .collect();
            let mut w = world(&records, &["notes:new"]);
            for (h, count) in *already {
                for i in 0..*count {
                    let t = id(&format!("notes:{h}-{i}"));
                    w.tenants.insert(t.clone(), TenantRecord::default());
                    w.placements.insert(t, (placed(h, &[], 1), 1));
                }
            }
            let plan = plan(&w, 0);
            let chosen = plan.actions.iter().find_map(|a| match a {
                Action::Place { tenant, placement } if tenant.to_string() == "notes:new" => {
                    Some(placement.host.clone())
                }
                _ => None,
            });
            assert_eq!(chosen.as_deref(), Some(*expected), "{hosts:?} {already:?}");
        }
    }

    #[test]
    fn a_full_fleet_leaves_tenants_unplaced_and_says_so() {
        let mut w = world(
            &[("h1", host(0, 8, Some(1))), ("h2", host(0, 8, Some(1)))],
            &["notes:a", "notes:b", "notes:c"],
        );
        let p = plan(&w, 0);
        assert_eq!(given(&p).values().map(Vec::len).sum::<usize>(), 2);
        assert_eq!(p.unplaceable, [id("notes:c")]);
        w.hosts.clear();
        assert_eq!(plan(&w, 0).unplaceable.len(), 3);
    }

    #[test]
    fn a_gone_hosts_tenants_wait_out_the_grace_then_move_with_a_new_epoch() {
        let mut w = world(
            &[("h1", host(0, 8, None)), ("h3", host(0, 8, None))],
            &["notes:a", "notes:b"],
        );
        w.placements
            .insert(id("notes:a"), (placed("h2", &["h3"], 4), 40));
        w.placements
            .insert(id("notes:b"), (placed("h1", &["h2"], 1), 41));
        // Never seen gone before: the whole grace is left.
        let p = plan(&w, 9);
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.waiting, [(id("notes:a"), Duration::from_secs(30))]);
        w.gone_for.insert("h2".into(), Duration::from_secs(12));
        let p = plan(&w, 9);
        assert_eq!(p.next_check(), Some(Duration::from_secs(18)));
        w.gone_for.insert("h2".into(), Duration::from_secs(30));
        let p = plan(&w, 9);
        assert!(p.waiting.is_empty());
        assert_eq!(
            p.actions,
            [Action::Move {
                tenant: id("notes:a"),
                from: "h2".into(),
                // its standby h3 first, although h1 has fewer tenants
                placement: Placement {
                    host: "h3".into(),
                    standby: vec!["h1".into()],
                    tier: Tier::Cold,
                    epoch: 5,
                    placed_ms: 9,
                    from: None,
                },
                expected: 40,
            }]
        );
    }

    #[test]
    fn a_gone_hosts_tenants_go_to_the_least_loaded_when_the_standby_is_gone_or_full() {
        let mut w = world(
            &[("h1", host(0, 8, None)), ("h3", host(0, 8, Some(1)))],
            &["notes:a", "notes:b"],
        );
        w.placements
            .insert(id("notes:a"), (placed("h2", &["h3"], 1), 5));
        w.placements
            .insert(id("notes:b"), (placed("h3", &[], 1), 6));
        w.gone_for.insert("h2".into(), Duration::from_secs(60));
        let p = plan(&w, 0);
        assert_eq!(given(&p)["h1"], ["notes:a"]);
    }

    #[test]
    fn a_tenant_no_longer_wanted_is_unplaced_and_frees_its_room() {
        let mut w = world(&[("h1", host(0, 8, Some(1)))], &["notes:b"]);
        w.placements
            .insert(id("notes:a"), (placed("h1", &[], 2), 77));
        let p = plan(&w, 0);
        assert_eq!(
            p.actions[0],
            Action::Unplace {
                tenant: id("notes:a"),
                expected: 77
            }
        );
        assert_eq!(given(&p)["h1"], ["notes:b"]);
    }

    #[test]
    fn active_active_tenants_get_no_standby() {
        let mut w = world(&[("h1", host(0, 8, None)), ("h2", host(0, 8, None))], &[]);
        w.tenants.insert(
            id("notes:a"),
            TenantRecord {
                tier: Tier::ActiveActive,
            },
        );
        let p = plan(&w, 0);
        let Action::Place { placement, .. } = &p.actions[0] else {
            panic!("{p:?}");
        };
        assert!(placement.standby.is_empty());
        assert_eq!(placement.tier, Tier::ActiveActive);
    }

    #[test]
    fn a_drained_host_hands_its_tenants_over_and_takes_nothing_new() {
        let mut w = world(
            &[
                ("h1", host(0, 8, None)),
                ("h2", host(0, 8, None)),
                ("h3", host(0, 8, None)),
            ],
            &["notes:a", "notes:b", "notes:new"],
        );
        w.placements
            .insert(id("notes:a"), (placed("h1", &["h3"], 4), 40));
        w.placements
            .insert(id("notes:b"), (placed("h1", &["h1"], 1), 41));
        w.drained.insert("h1".into());
        let p = plan(&w, 9);
        let moves: Vec<(String, &str, u64, Option<&str>, i64)> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Move {
                    tenant,
                    placement,
                    expected,
                    ..
                } => Some((
                    tenant.to_string(),
                    placement.host.as_str(),
                    placement.epoch,
                    placement.from.as_deref(),
                    *expected,
                )),
                _ => None,
            })
            .collect();
        // At once (no grace: the host is alive and hands them over), to the standby first,
        // each naming the host it leaves.
        assert_eq!(
            moves,
            [
                ("notes:a".to_owned(), "h3", 5, Some("h1"), 40),
                ("notes:b".to_owned(), "h2", 2, Some("h1"), 41)
            ]
        );
        let given = given(&p);
        assert!(!given.contains_key("h1"), "{given:?}");
        assert!(p
            .actions
            .iter()
            .all(|a| !matches!(a, Action::Move { placement, .. } | Action::Place { placement, .. } if placement.standby.contains(&"h1".to_owned()))));
        // Nowhere to go: the tenant stays, reported.
        let mut alone = world(&[("h1", host(0, 8, None))], &["notes:a"]);
        alone
            .placements
            .insert(id("notes:a"), (placed("h1", &[], 1), 7));
        alone.drained.insert("h1".into());
        let p = plan(&alone, 0);
        assert!(p.actions.is_empty());
        assert_eq!(p.unplaceable, [id("notes:a")]);
    }
}
