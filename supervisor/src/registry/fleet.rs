//! On a `[fleet]` host the supervisor starts only what the fleet agent says is placed here,
//! and only while the agent's word holds (docs/FLEET.md).
//!
//! The agent (`tenement-fleet`) sends `fleet_own` after each renewal of its etcd lease: the
//! tenants placed here and how long that stays true, which is how long the lease is sure to
//! last. When that time passes without another word (the agent cannot reach etcd, or is
//! dead) the supervisor stops every tenant on its own: the host is fenced, and the fleet's
//! controller moves its tenants only after the lease has expired and a grace period passed.
//! So two hosts never run one tenant, whichever process on this host fails.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tenement_proto::rpc::{ErrorCode, FleetOwned, FleetPeer, Response};
use tenement_proto::InstanceId;

use super::{Registry, RpcError};
use crate::lifecycle::Event;

/// The longest one `fleet_own` can hold: a lease lasts at most 300 s (the config's cap).
const MAX_VALID: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct FleetGate {
    /// Placed here, with the placement's epoch and whether it is held: moved here off a live
    /// host (a drain) that has not yet said it stopped it. A held tenant's wakes wait.
    owned: HashMap<InstanceId, (u64, bool)>,
    /// Until when the agent's last word holds; `None` before its first.
    valid_until: Option<Instant>,
    /// Whether the stop for an expired word has been done (it is done once).
    fenced: bool,
    /// The tenants placed on the other hosts, as the agent last said: passed to the proxy,
    /// which forwards their requests there.
    peers: Vec<FleetPeer>,
}

impl FleetGate {
    fn check(&self, id: &InstanceId, now: Instant) -> Result<(), RpcError> {
        let refuse = |why: String| Err(RpcError::new(ErrorCode::NotPlacedHere, why));
        match self.valid_until {
            None => refuse(format!(
                "{id} cannot start: this fleet host has not heard from its fleet agent (tenement-fleet) yet"
            )),
            Some(until) if now >= until => refuse(format!(
                "{id} cannot start: this fleet host is fenced (its fleet agent has not renewed its placements)"
            )),
            Some(_) => match self.owned.get(id) {
                None => refuse(format!("{id} is not placed on this fleet host")),
                Some((_, true)) => refuse(format!(
                    "{id} is moving to this fleet host: its previous host has not stopped it yet"
                )),
                Some((_, false)) => Ok(()),
            },
        }
    }

    /// Placed here, but its previous host still has it.
    fn held(&self, id: &InstanceId, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
            && self.owned.get(id).is_some_and(|(_, held)| *held)
    }
}

impl Registry {
    /// Whether `id` may start here: always off a fleet; on one, only when placed here.
    pub(super) fn placed_here(&self, id: &InstanceId, now: Instant) -> Result<(), RpcError> {
        match &self.fleet {
            None => Ok(()),
            Some(gate) => gate.check(id, now),
        }
    }

    /// Whether a wake of `id` must wait: it is moving here and its previous host has not
    /// stopped it yet. The wake's waiter is kept and woken when the agent says it may start.
    pub(super) fn held_here(&self, id: &InstanceId, now: Instant) -> bool {
        self.fleet.as_ref().is_some_and(|gate| gate.held(id, now))
    }

    /// The agent's word: registers what is placed here, stops what is not (drained first while
    /// the word holds: it moved to another host, which waits for it); how many run, and which
    /// are still stopping.
    pub(super) fn fleet_own(
        &mut self,
        owned: Vec<FleetOwned>,
        valid_ms: u64,
        peers: Option<Vec<FleetPeer>>,
        now: Instant,
    ) -> Result<(u32, Vec<InstanceId>), RpcError> {
        let Some(gate) = self.fleet.as_mut() else {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "this supervisor's config has no [fleet] section",
            ));
        };
        let valid = Duration::from_millis(valid_ms).min(MAX_VALID);
        let owned: HashMap<InstanceId, (u64, bool)> = owned
            .into_iter()
            .map(|o| (o.instance, (o.epoch, o.held)))
            .collect();
        // Held until now, free to start from now: their waiting wakes go ahead.
        let released: Vec<InstanceId> = gate
            .owned
            .iter()
            .filter(|(id, (_, held))| *held && owned.get(*id).is_some_and(|(_, h)| !h))
            .map(|(id, _)| id.clone())
            .collect();
        // Held, and moved on before they started here: their waiting wakes are refused, so
        // the proxy sends those requests to where the tenant went.
        let gone_on: Vec<InstanceId> = gate
            .owned
            .iter()
            .filter(|(id, (_, held))| *held && !owned.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        if owned != gate.owned {
            let gained = owned
                .keys()
                .filter(|id| !gate.owned.contains_key(*id))
                .count();
            let lost = gate
                .owned
                .keys()
                .filter(|id| !owned.contains_key(*id))
                .count();
            tracing::info!(
                placed = owned.len(),
                gained,
                lost,
                "fleet: the tenants placed on this host changed"
            );
        }
        gate.owned = owned;
        gate.valid_until = Some(now + valid);
        let peers = peers.filter(|p| *p != gate.peers);
        if let Some(peers) = &peers {
            gate.peers = peers.clone();
        }
        if valid.is_zero() {
            gate.owned.clear();
        } else if gate.fenced {
            tracing::info!("fleet: the agent holds a lease again; placed tenants may start");
            gate.fenced = false;
        }
        let unknown: Vec<InstanceId> = gate
            .owned
            .keys()
            .filter(|id| !self.instances.contains_key(*id))
            .cloned()
            .collect();
        let (known, unserved): (Vec<InstanceId>, Vec<InstanceId>) = unknown
            .into_iter()
            .partition(|id| self.config.service(&id.service).is_some());
        for id in &unserved {
            tracing::warn!(instance = %id, "fleet: placed here, but this host's config has no service {}", id.service);
        }
        if !known.is_empty() {
            self.add(known, now)?;
        }
        // The proxy learns where moved tenants went before they stop here, so what arrives
        // meanwhile goes there.
        if let Some(peers) = peers {
            self.broadcast(Response::FleetPeers { peers });
        }
        self.stop_unplaced(now);
        for id in gone_on {
            if let Some(i) = self.instances.get_mut(&id) {
                for waiter in i.waiters.drain(..) {
                    let _ = waiter.reply.send(Err(RpcError::new(
                        ErrorCode::NotPlacedHere,
                        format!("{id} moved on to another fleet host before it started here"),
                    )));
                }
            }
        }
        for id in released {
            if self
                .instances
                .get(&id)
                .is_some_and(|i| !i.waiters.is_empty() && i.process.is_none())
            {
                tracing::info!(instance = %id, "fleet: its previous host stopped it; starting it here");
                self.event(&id, Event::Wake, now);
            }
        }
        let running = self
            .instances
            .values()
            .filter(|i| i.process.is_some())
            .count();
        Ok((
            u32::try_from(running).unwrap_or(u32::MAX),
            self.unplaced_with_process(now),
        ))
    }

    /// Instances with a process that may not run here now (draining or stopping once
    /// `stop_unplaced` has seen them).
    fn unplaced_with_process(&self, now: Instant) -> Vec<InstanceId> {
        self.instances
            .iter()
            .filter(|(id, i)| i.process.is_some() && self.placed_here(id, now).is_err())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stops every instance with a process that may not run here now: drained first (the
    /// requests inside finish, new ones go to its new host) while the agent's word holds,
    /// at once when it has run out (the lease may be gone).
    fn stop_unplaced(&mut self, now: Instant) {
        let fenced = self
            .fleet
            .as_ref()
            .is_none_or(|gate| gate.valid_until.is_none_or(|until| now >= until));
        let stop: Vec<InstanceId> = self
            .unplaced_with_process(now)
            .into_iter()
            .filter(|id| {
                fenced
                    || self.instances.get(id).is_some_and(|i| {
                        i.lifecycle.state() != tenement_proto::rpc::InstanceState::Stopping
                    })
            })
            .collect();
        for id in stop {
            if fenced {
                tracing::info!(instance = %id, "fleet: stopping, no longer placed on this host");
                self.event(&id, Event::Stop, now);
            } else {
                tracing::info!(instance = %id, "fleet: moved to another host; draining, then stopping");
                self.event(&id, Event::Handoff, now);
            }
        }
    }

    /// What a new proxy watch stream gets after the route snapshot: the tenants placed on the
    /// other hosts (nothing off a fleet).
    pub(super) fn fleet_peers(&self) -> Option<Response> {
        let gate = self.fleet.as_ref()?;
        Some(Response::FleetPeers {
            peers: gate.peers.clone(),
        })
    }

    /// On each tick: once the agent's word has run out, everything stops.
    pub(super) fn fence_if_expired(&mut self, now: Instant) {
        let Some(gate) = self.fleet.as_mut() else {
            return;
        };
        let expired = gate.valid_until.is_some_and(|until| now >= until);
        if !expired || gate.fenced {
            return;
        }
        gate.fenced = true;
        gate.owned.clear();
        tracing::error!("fleet: the fleet agent has not renewed this host's placements in time; fenced, stopping every tenant");
        self.stop_unplaced(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> InstanceId {
        InstanceId::parse(text).expect("id")
    }

    #[test]
    fn only_what_is_placed_here_may_start_and_only_while_the_word_holds() {
        let now = Instant::now();
        let mut gate = FleetGate::default();
        let silent = gate.check(&id("notes:a"), now).expect_err("no word yet");
        assert_eq!(silent.code, ErrorCode::NotPlacedHere);
        assert!(silent.message.contains("not heard from its fleet agent"));
        gate.owned.insert(id("notes:a"), (3, false));
        gate.owned.insert(id("notes:c"), (2, true));
        gate.valid_until = Some(now + Duration::from_secs(2));
        assert!(gate.check(&id("notes:a"), now).is_ok());
        assert!(!gate.held(&id("notes:a"), now));
        // Moving here from a live host: held, so neither started nor refused for good.
        assert!(gate.held(&id("notes:c"), now));
        let moving = gate.check(&id("notes:c"), now).expect_err("held");
        assert!(
            moving.message.contains("previous host has not stopped it"),
            "{}",
            moving.message
        );
        let elsewhere = gate.check(&id("notes:b"), now).expect_err("not placed");
        assert_eq!(
            elsewhere.message,
            "notes:b is not placed on this fleet host"
        );
        let later = now + Duration::from_secs(2);
        let fenced = gate.check(&id("notes:a"), later).expect_err("expired");
        assert!(fenced.message.contains("fenced"), "{}", fenced.message);
        assert!(
            !gate.held(&id("notes:c"), later),
            "a fenced host holds nothing"
        );
    }
}
