//! Routing weights: `tenctl weight`, `route` and the registry half of `deploy`.
//!
//! A weight is an instance's share of `{service}.{domain}` traffic, 0 (none) to
//! [`MAX_WEIGHT`]. Every change is saved before it is published: a weight the proxy routes by
//! is one that survives a restart of the supervisor or the machine. A change that cannot be
//! saved is undone and reported.

use tenement_proto::config::ReadyMode;
use tenement_proto::rpc::{ErrorCode, Response, WeightChange, MAX_WEIGHT};
use tenement_proto::InstanceId;

use super::{Registry, RpcError};

/// What `weight` and `route` ask for.
#[derive(Debug, Clone)]
pub enum Weighing {
    Set { instance: InstanceId, weight: u32 },
    Move { from: InstanceId, to: InstanceId },
}

/// What `deploy` needs to know before it starts the instance.
#[derive(Debug, Clone)]
pub struct DeployPlan {
    /// Registered by this deploy (with weight 0).
    pub fresh: bool,
    /// The health path and per-try timeout to pass after ready, when readiness did not
    /// already check it.
    pub health: Option<(String, std::time::Duration)>,
}

pub fn check_weight(weight: u32) -> Result<(), RpcError> {
    if weight > MAX_WEIGHT {
        return Err(RpcError::new(
            ErrorCode::BadRequest,
            format!("weight {weight} is out of range: 0 to {MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

impl Registry {
    pub(super) fn weigh(&mut self, weighing: Weighing) -> Result<Vec<WeightChange>, RpcError> {
        let wanted: Vec<(InstanceId, u32)> = match weighing {
            Weighing::Set { instance, weight } => {
                check_weight(weight)?;
                self.weight_of(&instance)?;
                vec![(instance, weight)]
            }
            Weighing::Move { from, to } => {
                if from.service != to.service {
                    return Err(RpcError::new(
                        ErrorCode::BadRequest,
                        format!("{from} and {to} are instances of different services"),
                    ));
                }
                if from == to {
                    return Err(RpcError::new(
                        ErrorCode::BadRequest,
                        format!("--from and --to are both {from}"),
                    ));
                }
                let moved = self.weight_of(&from)?;
                let kept = self.weight_of(&to)?;
                vec![(from, 0), (to, (kept + moved).min(MAX_WEIGHT))]
            }
        };
        for (id, _) in &wanted {
            self.refuse_if_removing(id)?;
        }
        self.set_weights(wanted)
    }

    /// Sets every weight, saves, then publishes; on a failed save nothing changes.
    pub(super) fn set_weights(
        &mut self,
        wanted: Vec<(InstanceId, u32)>,
    ) -> Result<Vec<WeightChange>, RpcError> {
        let mut changes = Vec::new();
        for (id, weight) in wanted {
            if let Some(i) = self.instances.get_mut(&id) {
                changes.push(WeightChange {
                    instance: id,
                    from: i.weight,
                    to: weight,
                });
                i.weight = weight;
            }
        }
        if let Err(e) = self.save() {
            for change in &changes {
                if let Some(i) = self.instances.get_mut(&change.instance) {
                    i.weight = change.from;
                }
            }
            return Err(e);
        }
        let routes = changes
            .iter()
            .filter(|c| c.from != c.to)
            .filter_map(|c| self.route_of(&c.instance))
            .collect::<Vec<_>>();
        if !routes.is_empty() {
            self.broadcast(Response::Routes {
                routes,
                reset: false,
                complete: false,
                removed: Vec::new(),
            });
        }
        for change in changes.iter().filter(|c| c.from != c.to) {
            tracing::info!(instance = %change.instance, "{}: weight {} -> {}", change.instance, change.from, change.to);
        }
        Ok(changes)
    }

    fn weight_of(&self, id: &InstanceId) -> Result<u32, RpcError> {
        self.instances
            .get(id)
            .map(|i| i.weight)
            .ok_or_else(|| RpcError::unknown(id))
    }

    /// Registers `id` with weight 0 unless it exists, and says how to check it is healthy.
    pub(super) fn prepare_deploy(
        &mut self,
        id: &InstanceId,
        now: std::time::Instant,
    ) -> Result<DeployPlan, RpcError> {
        let service = self.service_of(id)?;
        let health = match (&service.health, service.ready) {
            (Some(path), ready) if ready != ReadyMode::Health => {
                Some((path.clone(), service.health_timeout))
            }
            _ => None,
        };
        let fresh = !self.instances.contains_key(id);
        if fresh {
            self.add_with_weight(vec![id.clone()], 0, now)?;
        }
        self.refuse_if_removing(id)?;
        Ok(DeployPlan { fresh, health })
    }
}
