//! The registry's side of the management API: listing a scope's instances a page at a time,
//! checking credentials, and the token and session calls. The decisions (what a scope
//! covers, what a token may do) are in `tokens.rs`; this only applies them.

use std::time::Instant;

use tenement_proto::auth::{Scope, Secret};
use tenement_proto::rpc::{ErrorCode, InstanceInfo, InstanceState, ListQuery, ListSort, Response};
use tenement_proto::InstanceId;

use super::{app_pids, now_ms, Instance, Registry, RpcError};
use crate::tokens::Grant;

/// The most instances one page of `list` holds; a larger `limit` is cut to it.
pub const MAX_PAGE: u32 = 1000;

/// One answer to `list`.
#[derive(Debug, Default)]
pub struct ListPage {
    pub instances: Vec<InstanceInfo>,
    /// Where the next page starts, when the query's `limit` cut this one short.
    pub next: Option<InstanceId>,
    /// How many instances match the query (without `after` and `limit`); only asked-for
    /// queries report it.
    pub total: Option<u32>,
}

/// A token or session call, with the grant it was made under (`None`: the admin socket).
#[derive(Debug)]
pub enum TokenCall {
    Create {
        scope: Scope,
        read_only: bool,
        lifetime_s: Option<u64>,
        name: Option<String>,
    },
    List,
    Remove {
        id: tenement_proto::auth::TokenId,
    },
    Whoami(Grant),
    Login(Grant),
    Logout(Grant),
}

/// The order of `sort=state`: what is up first.
fn state_rank(state: InstanceState) -> u8 {
    match state {
        InstanceState::Running => 0,
        InstanceState::Starting => 1,
        InstanceState::Unhealthy => 2,
        InstanceState::Stopping => 3,
        InstanceState::Failed => 4,
        InstanceState::Stopped => 5,
    }
}

impl Registry {
    pub(super) fn list(&self, scope: &Scope, query: &ListQuery, now: Instant) -> ListPage {
        let search = query.search.as_deref().filter(|s| !s.is_empty());
        let mut matching: Vec<&Instance> = self
            .instances
            .values()
            .filter(|i| {
                scope.covers(&i.id)
                    && query.service.as_ref().is_none_or(|s| *s == i.id.service)
                    && query.state.is_none_or(|s| s == i.lifecycle.state())
                    && search.is_none_or(|s| i.id.to_string().contains(s))
            })
            .collect();
        match query.sort.unwrap_or(ListSort::Id) {
            ListSort::Id => matching.sort_by(|a, b| a.id.cmp(&b.id)),
            ListSort::State => matching.sort_by_key(|i| (state_rank(i.lifecycle.state()), &i.id)),
            ListSort::Restarts => {
                matching.sort_by_key(|i| (std::cmp::Reverse(i.lifecycle.restarts), &i.id))
            }
            ListSort::Active => matching.sort_by_key(|i| {
                let running = i.lifecycle.state() == InstanceState::Running;
                (
                    !running,
                    std::cmp::Reverse(running.then(|| i.lifecycle.last_activity())),
                    &i.id,
                )
            }),
        }
        let matching: Vec<&InstanceId> = matching.into_iter().map(|i| &i.id).collect();
        let total = (!query.is_default()).then_some(matching.len() as u32);
        let by_id = query.sort.is_none_or(|s| s == ListSort::Id);
        let start = match &query.after {
            Some(after) if by_id => matching.partition_point(|id| *id <= after),
            _ => 0,
        };
        let start = start
            .saturating_add(query.offset.unwrap_or(0) as usize)
            .min(matching.len());
        let limit = query
            .limit
            .map_or(usize::MAX, |l| l.clamp(1, MAX_PAGE) as usize);
        let page = &matching[start..];
        // `next` pages by id; the other orders page with `offset`.
        let next = (by_id && page.len() > limit).then(|| page[limit - 1].clone());
        let apps = app_pids(&self.instances);
        let instances = page
            .iter()
            .take(limit)
            .filter_map(|id| self.instances.get(*id))
            .map(|i| {
                let mut info = i.info(self.address_of(i), &self.config.settings, &apps, now);
                self.describe_isolation(&mut info);
                info
            })
            .collect();
        ListPage {
            instances,
            next,
            total,
        }
    }

    pub(super) fn authenticate(
        &mut self,
        credential: &Secret,
        peer: Option<std::net::IpAddr>,
        now: Instant,
    ) -> Result<Grant, RpcError> {
        let (grant, save) = self.tokens.authenticate(credential, peer, now, now_ms())?;
        if save {
            // Only the time of last use changed: a failed write is not the caller's problem.
            if let Err(e) = self.save() {
                tracing::warn!("cannot record a token's last use: {e}");
            }
        }
        Ok(grant)
    }

    pub(super) fn token_call(&mut self, call: TokenCall) -> Result<Response, RpcError> {
        let identity = |tokens: &crate::tokens::Tokens, grant: &Grant| {
            tokens
                .info(&grant.token)
                .cloned()
                .ok_or_else(|| RpcError::new(ErrorCode::Unauthenticated, "the token was revoked"))
        };
        match call {
            TokenCall::Create {
                scope,
                read_only,
                lifetime_s,
                name,
            } => {
                if let Scope::Tenant(id) = &scope {
                    // A tenant token for a tenant that is not there would be a surprise later.
                    if !self.instances.contains_key(id) {
                        return Err(RpcError::new(
                            ErrorCode::UnknownInstance,
                            format!("{id} is not registered; add it first"),
                        ));
                    }
                }
                if let Scope::Service(service) = &scope {
                    if self.config.service(service).is_none() {
                        return Err(RpcError::new(
                            ErrorCode::UnknownService,
                            format!("service {service:?} is not in the config"),
                        ));
                    }
                }
                let (token, info) =
                    self.tokens
                        .create(scope, read_only, lifetime_s, name, now_ms())?;
                self.save()?;
                Ok(Response::TokenCreated { token, info })
            }
            TokenCall::List => Ok(Response::Tokens {
                tokens: self.tokens.list(),
            }),
            TokenCall::Remove { id } => {
                let info = self.tokens.remove(&id)?;
                self.save()?;
                Ok(Response::Tokens { tokens: vec![info] })
            }
            TokenCall::Whoami(grant) => Ok(Response::Identity {
                token: identity(&self.tokens, &grant)?,
                session: None,
                session_expires_ms: self.tokens.session_expiry(&grant),
            }),
            TokenCall::Login(grant) => {
                let token = identity(&self.tokens, &grant)?;
                let (session, expires) = self.tokens.login(&grant, now_ms())?;
                Ok(Response::Identity {
                    token,
                    session: Some(session),
                    session_expires_ms: Some(expires),
                })
            }
            TokenCall::Logout(grant) => {
                self.tokens.logout(&grant)?;
                Ok(Response::Ok)
            }
        }
    }
}
