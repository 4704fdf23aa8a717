//! `auto_spawn`: instances a stranger creates by asking for an unknown tenant, kept in bounds.
//!
//! - At most `auto_spawn_max` per service.
//! - Never the last [`RESERVE_PERCENT`] of `port_range` or `dynamic_users`: what strangers
//!   create cannot leave the operator without room for `tenctl add`.
//! - One that has never answered a request with a 2xx or 3xx status (the proxy reports
//!   successes with its activity) is removed, data and all, once it has been stopped and is
//!   older than its service's `auto_spawn_expire`.
//!
//! The proxy adds a rate limit per client address in front of all this.

use std::time::{Duration, Instant};

use tenement_proto::config::{ListenMode, Service};
use tenement_proto::rpc::{ActivityReport, ErrorCode, InstanceState};
use tenement_proto::InstanceId;

use crate::logs::now_ms;

use super::{Registry, RpcError};

/// Share of `port_range` and `dynamic_users` kept for the operator.
pub const RESERVE_PERCENT: usize = 10;

impl Registry {
    /// Whether a stranger's request may create `id`, an instance of `service`.
    pub(super) fn may_auto_spawn(
        &self,
        id: &InstanceId,
        service: &Service,
    ) -> Result<(), RpcError> {
        let refuse = |why: String| {
            tracing::warn!(instance = %id, "auto_spawn of {id} refused: {why}");
            // To the stranger it is simply no such tenant.
            Err(RpcError::new(
                ErrorCode::UnknownInstance,
                format!("no instance {id} ({why})"),
            ))
        };
        let auto = self
            .instances
            .values()
            .filter(|i| i.auto && i.id.service == id.service)
            .count();
        if auto >= service.auto_spawn_max as usize {
            return refuse(format!(
                "service {} has auto_spawn_max = {} auto-spawned instances already",
                id.service, service.auto_spawn_max
            ));
        }
        let settings = &self.config.settings;
        if service.listen != ListenMode::Unix {
            let size = settings.port_range.len();
            let used = self.instances.values().filter(|i| i.port.is_some()).count();
            if (size - used.min(size)) * 100 <= size * RESERVE_PERCENT {
                return refuse(format!(
                    "port_range has {} free ports left, kept for the operator",
                    size - used.min(size)
                ));
            }
        }
        let uids = settings.dynamic_users.clone();
        let size = (uids.end() - uids.start()) as usize + 1;
        let used = self.instances.values().filter(|i| i.uid.is_some()).count();
        if (size - used.min(size)) * 100 <= size * RESERVE_PERCENT {
            return refuse(format!(
                "dynamic_users has {} free uids left, kept for the operator",
                size - used.min(size)
            ));
        }
        Ok(())
    }

    /// Marks instances the proxy saw answer with success.
    pub(super) fn note_successes(&mut self, reports: &[ActivityReport]) {
        let mut changed = false;
        for report in reports.iter().filter(|r| r.succeeded > 0) {
            if let Some(i) = self.instances.get_mut(&report.instance) {
                if i.auto && !i.proven {
                    i.proven = true;
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = self.save() {
                tracing::warn!("cannot save the registry: {e}");
            }
        }
    }

    /// Removes auto-spawned instances that never answered with success, once stopped and
    /// older than their service's `auto_spawn_expire`.
    pub(super) fn sweep_unproven_auto_spawns(&mut self, now: Instant) {
        // Once a second is plenty for expiries of minutes, and cheap at 10,000 instances.
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = Some(now + Duration::from_secs(1));
        let now_ms = now_ms();
        let config = self.config.clone();
        let expired: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| {
                let expiry = config
                    .service(&i.id.service)
                    .map_or(Duration::ZERO, |s| s.auto_spawn_expire);
                i.auto
                    && !i.proven
                    && i.created_ms.saturating_add(expiry.as_millis() as u64) <= now_ms
                    && i.removal.is_none()
                    && matches!(
                        i.lifecycle.state(),
                        InstanceState::Stopped | InstanceState::Failed
                    )
            })
            .map(|i| i.id.clone())
            .collect();
        for id in expired {
            tracing::info!(instance = %id, "{id}: auto-spawned, never answered with success: removed");
            let (reply, _) = tokio::sync::oneshot::channel();
            self.remove(id, true, reply, now);
        }
    }
}
