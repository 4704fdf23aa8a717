//! The supervisor's RPC messages, for both roles.
//!
//! A connection starts with [`Request::Hello`] answered by [`Response::Hello`]; every later
//! request gets exactly one response, except [`Request::Subscribe`] (the proxy's watch stream)
//! and [`Request::Logs`] with `follow`, which turn the connection into a stream of responses.
//! Which calls a connection may make is decided by the socket it arrived on (see [`Role`]),
//! never by what the client claims.

use serde::{Deserialize, Serialize};

use crate::auth::{Scope, Secret, TokenId, TokenInfo};
use crate::ids::{InstanceId, ServiceName, TenantId};

/// The RPC protocol version spoken by this build. See the compatibility rules in `lib.rs`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest routing weight (`tenctl weight`): weights are shares, 0 to 100.
pub const MAX_WEIGHT: u32 = 100;
/// The weight of a newly registered instance.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Which socket a connection came in on, and so which calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `proxy.sock`: wake, resolve, report activity, acknowledge park.
    Proxy,
    /// `admin.sock`: everything `tenctl` does. Checked with SO_PEERCRED as well.
    Admin,
}

/// A message from a client (tenctl or the proxy) to the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message on every connection.
    Hello {
        version: u32,
        client: String,
    },

    // ---- proxy role (also allowed on the admin socket) ----
    /// Start the instance if it is not running and wait until it is ready.
    Wake {
        instance: InstanceId,
        /// How long the caller is willing to wait; the supervisor caps it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// The route of one instance, or `UnknownInstance`. With `auto_spawn` on its service an
    /// unknown instance is registered (stopped) first.
    Resolve {
        instance: InstanceId,
    },
    /// Turns the connection into a watch stream: a snapshot of the route table
    /// ([`Response::Routes`] with `reset`), then updates and [`Response::Park`] requests. The
    /// proxy answers park requests and reports activity on the same connection.
    Subscribe,
    /// In-flight counts and activity since the last report, proxy -> supervisor.
    Activity {
        reports: Vec<ActivityReport>,
    },
    /// The proxy's answer to [`Response::Park`].
    ParkAck {
        instance: InstanceId,
        park_id: u64,
        accepted: bool,
    },
    /// The supervisor's numbers for the proxy's metrics: its own process, counters per
    /// service and, with `instances`, the usage of every running instance. Read-only;
    /// answered with [`Response::Stats`] in as many messages as the instances take.
    Stats {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        instances: bool,
    },

    // ---- admin role ----
    /// Register instances without starting them.
    Add {
        instances: Vec<InstanceId>,
    },
    /// Register (if needed) and start.
    Spawn {
        instance: InstanceId,
    },
    Stop {
        instance: InstanceId,
    },
    Restart {
        instance: InstanceId,
    },
    Remove {
        instance: InstanceId,
        purge: bool,
    },
    /// Every registered instance, or with a query the matching ones a page at a time.
    List {
        #[serde(default, skip_serializing_if = "ListQuery::is_default")]
        query: ListQuery,
    },
    /// Re-read the config file: add, change and remove services; instances of unchanged
    /// services are not touched, a changed definition becomes a release rolled out by the
    /// service's `rollout` setting, running instances of removed services stop. A file with
    /// errors is refused and the running config stays.
    Reload,
    Status {
        instance: InstanceId,
    },
    /// Set an instance's share of `{service}.{domain}` traffic, 0 (none) to [`MAX_WEIGHT`].
    Weight {
        instance: InstanceId,
        weight: u32,
    },
    /// Move all of `from`'s weight to `to` (the same service) in one step: `to` gets the sum
    /// (at most [`MAX_WEIGHT`]), `from` 0.
    Route {
        from: InstanceId,
        to: InstanceId,
    },
    /// Register `instance` if needed (with weight 0), start it, wait until it is ready and,
    /// when its service has a health check, healthy; only then give it `weight` (default
    /// [`DEFAULT_WEIGHT`]). On failure or timeout it is stopped and no weight changes.
    Deploy {
        instance: InstanceId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Make a release of `service` from its current definition (paths resolved now) and
    /// roll it out; refused when nothing changed since the current release or while a
    /// rollout of the service is not finished.
    Release {
        service: ServiceName,
        #[serde(default, skip_serializing_if = "RolloutOptions::is_default")]
        options: RolloutOptions,
    },
    /// The releases of `service` and its rollout, if any.
    Releases {
        service: ServiceName,
    },
    /// Control the rollout of `service`: pause, resume or abort it (abort moves the tenants
    /// it switched back to where they were).
    Rollout {
        service: ServiceName,
        action: RolloutAction,
    },
    /// Roll `service` back to release `to` (default: the one before the current one).
    Rollback {
        service: ServiceName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u32>,
        #[serde(default, skip_serializing_if = "RolloutOptions::is_default")]
        options: RolloutOptions,
    },
    /// Keep `instance` on `release` through rollouts (`None`: unpin, back to the service's
    /// current release at its next start).
    Pin {
        instance: InstanceId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<u32>,
    },
    Logs {
        instance: InstanceId,
        /// Last N lines (default: all buffered).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lines: Option<usize>,
        #[serde(default)]
        follow: bool,
    },

    // ---- tokens (admin role, or an admin token through `authed`) ----
    /// Mint a token; the answer carries its secret, the only time it is ever shown.
    TokenCreate {
        scope: Scope,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
        /// Seconds from now until it expires (default: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lifetime_s: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    TokenList,
    /// Revoke a token and every dashboard session opened with it, at once.
    TokenRemove {
        id: TokenId,
    },
    /// The fleet agent -> the supervisor of a `[fleet]` host: the tenants placed on this host
    /// (with their placement epochs), true for `valid_ms` from now. Only these may start; the
    /// others are stopped. When `valid_ms` passes without another call, the supervisor stops
    /// every tenant itself: the host is fenced (docs/FLEET.md). Admin socket only, never
    /// through the management API.
    ///
    /// `peers`, when present, replaces what the supervisor knows of the tenants placed on the
    /// other hosts (sent when it changed, and first on each connection); the supervisor
    /// passes it to its proxy, which forwards their requests there.
    FleetOwn {
        owned: Vec<FleetOwned>,
        valid_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peers: Option<Vec<FleetPeer>>,
    },
    /// Admin, on a `[fleet]` host: every host of the fleet as etcd has it (the supervisor asks
    /// its fleet agent). Answered with `fleet_hosts`.
    FleetHosts,
    /// Admin, on a `[fleet]` host: drain `host` (its tenants move off it and nothing new goes
    /// there), or with `drain: false` undrain it.
    FleetDrain {
        host: String,
        drain: bool,
    },

    // ---- the management API: the proxy forwards a caller's call with its credential ----
    /// `call` made by the holder of `credential` (a token or a dashboard session) from
    /// `peer`; the supervisor checks the credential and its scope, and failed checks are
    /// limited per peer address.
    Authed {
        credential: Secret,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<std::net::IpAddr>,
        call: Box<Request>,
    },
    /// Inside `authed` only: the credential's token and scope.
    Whoami,
    /// Inside `authed` with a token only: open a dashboard session with its scope.
    Login,
    /// Inside `authed` with a session only: end it.
    Logout,
}

/// Which instances `list` answers with, for the API's pages and the dashboard's search.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<InstanceState>,
    /// A part of the instance id, `ali` for `notes:alice`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<String>,
    /// Only instances after this one (ids sort as `service:id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<InstanceId>,
    /// At most this many; the last message's `next` says where the next page starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The order (default: by id, the only one `after` and `next` page through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<ListSort>,
    /// Skip this many matching instances first (pages of the other orders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u32>,
}

/// The orders `list` can answer in; ties are broken by id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListSort {
    #[default]
    Id,
    /// Running first, then starting, unhealthy, stopping, failed, stopped.
    State,
    /// Most restarts first.
    Restarts,
    /// Most recently active first (running instances; the others after).
    Active,
}

impl ListSort {
    pub const ALL: [ListSort; 4] = [
        ListSort::Id,
        ListSort::State,
        ListSort::Restarts,
        ListSort::Active,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ListSort::Id => "id",
            ListSort::State => "state",
            ListSort::Restarts => "restarts",
            ListSort::Active => "active",
        }
    }
}

impl ListQuery {
    pub fn is_default(&self) -> bool {
        *self == ListQuery::default()
    }
}

impl Request {
    /// Whether a connection of `role` may make this call.
    pub fn allowed_for(&self, role: Role) -> bool {
        match self {
            Request::Hello { .. }
            | Request::Wake { .. }
            | Request::Resolve { .. }
            | Request::Subscribe
            | Request::Activity { .. }
            | Request::ParkAck { .. }
            | Request::Stats { .. }
            | Request::Authed { .. } => true,
            Request::Whoami | Request::Login | Request::Logout => false,
            Request::Add { .. }
            | Request::Spawn { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. }
            | Request::List { .. }
            | Request::Reload
            | Request::Status { .. }
            | Request::Weight { .. }
            | Request::Route { .. }
            | Request::Deploy { .. }
            | Request::Release { .. }
            | Request::Releases { .. }
            | Request::Rollout { .. }
            | Request::Rollback { .. }
            | Request::Pin { .. }
            | Request::Logs { .. }
            | Request::TokenCreate { .. }
            | Request::TokenList
            | Request::TokenRemove { .. }
            | Request::FleetOwn { .. }
            | Request::FleetHosts
            | Request::FleetDrain { .. } => role == Role::Admin,
        }
    }

    /// Whether a caller of the management API may make this call at all (its scope decides
    /// the rest): the admin calls, `wake` and the session calls; never the proxy's own
    /// plumbing nor a nested `authed`.
    pub fn api_call(&self) -> bool {
        match self {
            Request::Hello { .. }
            | Request::Resolve { .. }
            | Request::Subscribe
            | Request::Activity { .. }
            | Request::ParkAck { .. }
            | Request::Stats { .. }
            | Request::FleetOwn { .. }
            | Request::Authed { .. } => false,
            Request::Wake { .. }
            | Request::Add { .. }
            | Request::Spawn { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. }
            | Request::List { .. }
            | Request::Reload
            | Request::Status { .. }
            | Request::Weight { .. }
            | Request::Route { .. }
            | Request::Deploy { .. }
            | Request::Release { .. }
            | Request::Releases { .. }
            | Request::Rollout { .. }
            | Request::Rollback { .. }
            | Request::Pin { .. }
            | Request::Logs { .. }
            | Request::TokenCreate { .. }
            | Request::TokenList
            | Request::TokenRemove { .. }
            | Request::FleetHosts
            | Request::FleetDrain { .. }
            | Request::Whoami
            | Request::Login
            | Request::Logout => true,
        }
    }

    /// Whether the call changes anything (a read-only token may not make it; an audit
    /// event records it). `rollout` with `status` only reads.
    pub fn mutates(&self) -> bool {
        match self {
            Request::Hello { .. }
            | Request::Resolve { .. }
            | Request::Subscribe
            | Request::Activity { .. }
            | Request::ParkAck { .. }
            | Request::Stats { .. }
            | Request::List { .. }
            | Request::Status { .. }
            | Request::Releases { .. }
            | Request::Logs { .. }
            | Request::TokenList
            | Request::FleetHosts
            | Request::Whoami
            | Request::Login
            | Request::Logout => false,
            Request::Rollout { action, .. } => *action != RolloutAction::Status,
            Request::Authed { call, .. } => call.mutates(),
            Request::Wake { .. }
            | Request::Add { .. }
            | Request::Spawn { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. }
            | Request::Reload
            | Request::Weight { .. }
            | Request::Route { .. }
            | Request::Deploy { .. }
            | Request::Release { .. }
            | Request::Rollback { .. }
            | Request::Pin { .. }
            | Request::TokenCreate { .. }
            | Request::TokenRemove { .. }
            | Request::FleetOwn { .. }
            | Request::FleetDrain { .. } => true,
        }
    }

    /// What the call acts on, for the audit log and scope checks: an instance, a service,
    /// a token, or nothing in particular.
    pub fn target(&self) -> Option<String> {
        match self {
            Request::Wake { instance, .. }
            | Request::Resolve { instance }
            | Request::Spawn { instance }
            | Request::Stop { instance }
            | Request::Restart { instance }
            | Request::Remove { instance, .. }
            | Request::Status { instance }
            | Request::Weight { instance, .. }
            | Request::Deploy { instance, .. }
            | Request::Pin { instance, .. }
            | Request::Logs { instance, .. } => Some(instance.to_string()),
            Request::Route { from, to } => Some(format!("{from}>{to}")),
            Request::Add { instances } => Some(
                instances
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Request::Release { service, .. }
            | Request::Releases { service }
            | Request::Rollout { service, .. }
            | Request::Rollback { service, .. } => Some(service.to_string()),
            Request::TokenCreate { scope, .. } => Some(scope.to_string()),
            Request::TokenRemove { id } => Some(id.to_string()),
            Request::FleetDrain { host, .. } => Some(host.clone()),
            Request::Authed { call, .. } => call.target(),
            _ => None,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Wake { .. } => "wake",
            Request::Resolve { .. } => "resolve",
            Request::Subscribe => "subscribe",
            Request::Activity { .. } => "activity",
            Request::ParkAck { .. } => "park_ack",
            Request::Stats { .. } => "stats",
            Request::FleetOwn { .. } => "fleet_own",
            Request::FleetHosts => "fleet_hosts",
            Request::FleetDrain { drain: true, .. } => "fleet_drain",
            Request::FleetDrain { drain: false, .. } => "fleet_undrain",
            Request::Add { .. } => "add",
            Request::Spawn { .. } => "spawn",
            Request::Stop { .. } => "stop",
            Request::Restart { .. } => "restart",
            Request::Remove { .. } => "remove",
            Request::List { .. } => "list",
            Request::Reload => "reload",
            Request::Status { .. } => "status",
            Request::Weight { .. } => "weight",
            Request::Route { .. } => "route",
            Request::Deploy { .. } => "deploy",
            Request::Release { .. } => "release",
            Request::Releases { .. } => "releases",
            Request::Rollout { .. } => "rollout",
            Request::Rollback { .. } => "rollback",
            Request::Pin { .. } => "pin",
            Request::Logs { .. } => "logs",
            Request::TokenCreate { .. } => "token_create",
            Request::TokenList => "token_list",
            Request::TokenRemove { .. } => "token_remove",
            Request::Authed { .. } => "authed",
            Request::Whoami => "whoami",
            Request::Login => "login",
            Request::Logout => "logout",
        }
    }
}

/// A message from the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        server: String,
        role: Role,
    },
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Answer to `add`: which were new and which already existed.
    Added {
        added: Vec<InstanceId>,
        existing: Vec<InstanceId>,
    },
    /// Answer to `reload`: what changed.
    Reloaded {
        added: Vec<ServiceName>,
        changed: Vec<ServiceName>,
        removed: Vec<ServiceName>,
    },
    /// Answer to `wake` and `spawn`.
    Woken {
        route: Route,
        /// Whether this call (or the wake it joined) started a process.
        started: bool,
        /// Time from the request to ready, in microseconds.
        elapsed_us: u64,
    },
    Route {
        route: Route,
    },
    /// Answer to `list`, in as many messages as it takes to keep each frame small: every one
    /// but the last has `more`.
    Instances {
        instances: Vec<InstanceInfo>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// On the last message of a `list` with a `limit`: the `after` of the next page, when
        /// there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<InstanceId>,
        /// On the last message of a `list` with a query: how many instances match it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<u32>,
    },
    Status {
        status: Box<InstanceInfo>,
    },
    Logs {
        lines: Vec<LogLine>,
    },
    /// Route table changes on a watch stream. `reset` means: forget everything cached, this
    /// and the following `Routes` until `complete` are the whole table.
    Routes {
        routes: Vec<Route>,
        #[serde(default)]
        reset: bool,
        #[serde(default)]
        complete: bool,
        /// Instances removed from the registry.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<InstanceId>,
    },
    /// Supervisor -> proxy on a watch stream: stop sending new requests to `instance`, and
    /// answer with `ParkAck { accepted: false }` if anything is in flight or arrived since the
    /// last activity report.
    Park {
        instance: InstanceId,
        park_id: u64,
        /// The supervisor is shutting down: park even if requests are in flight (new ones
        /// wait for the next supervisor), report activity, then accept; the supervisor waits
        /// for the in-flight count to reach 0 before stopping the instance.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        drain: bool,
    },
    /// Answer to `weight` and `route`: every weight that changed (or was asked for).
    Weights {
        changes: Vec<WeightChange>,
    },
    /// Answer to `deploy`: the instance is ready (and healthy) and has its weight.
    Deployed {
        route: Route,
        /// Whether this call started its process.
        started: bool,
        /// Time from the request until the weight was given, in microseconds.
        elapsed_us: u64,
    },
    /// Answer to `release`, `releases`, `rollout`, `rollback` and `pin`: the service's
    /// releases, newest last, and its latest rollout.
    Releases {
        service: ServiceName,
        /// The release new and unpinned tenants run.
        current: u32,
        releases: Vec<ReleaseInfo>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout: Option<Box<RolloutInfo>>,
    },
    /// Answer to `stats`: `supervisor` and `services` in the first message, running
    /// instances 250 to a message, every message but the last with `more`.
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        supervisor: Option<SupervisorStats>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        services: Vec<ServiceStats>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        instances: Vec<InstanceUsage>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// Supervisor -> proxy on a watch stream: the config file was reloaded (`tenctl reload`,
    /// SIGHUP); the proxy reads it again (new services, domains, body limits).
    ConfigReloaded,
    /// Answer to `token_create`: the token, shown this once, and what it is.
    TokenCreated {
        token: Secret,
        info: TokenInfo,
    },
    /// Answer to `fleet_own`: how many of this host's instances run now, and those that are
    /// not placed here but still have a process (draining or stopping).
    FleetOwned {
        running: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stopping: Vec<InstanceId>,
    },
    /// Supervisor -> proxy on a watch stream of a `[fleet]` host: the tenants placed on the
    /// other hosts and where those hosts' proxies listen, replacing what came before (sent
    /// after the route snapshot and whenever the fleet agent reports a change).
    FleetPeers {
        peers: Vec<FleetPeer>,
    },
    /// Answer to `fleet_hosts`: live hosts first, then gone ones that still have tenants
    /// placed on them, each by name.
    FleetHosts {
        hosts: Vec<FleetHost>,
    },
    /// Answer to `token_list`, oldest first.
    Tokens {
        tokens: Vec<TokenInfo>,
    },
    /// Answer to `whoami` and `login`: the token behind the credential and, for a session,
    /// the session and when it ends.
    Identity {
        token: TokenInfo,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<Secret>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_expires_ms: Option<u64>,
    },
}

impl Response {
    /// The wire name of the type, for "unexpected answer" errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Ok => "ok",
            Response::Error { .. } => "error",
            Response::Added { .. } => "added",
            Response::Woken { .. } => "woken",
            Response::Route { .. } => "route",
            Response::Instances { .. } => "instances",
            Response::Status { .. } => "status",
            Response::Logs { .. } => "logs",
            Response::Routes { .. } => "routes",
            Response::Park { .. } => "park",
            Response::Reloaded { .. } => "reloaded",
            Response::Stats { .. } => "stats",
            Response::Weights { .. } => "weights",
            Response::Deployed { .. } => "deployed",
            Response::Releases { .. } => "releases",
            Response::ConfigReloaded => "config_reloaded",
            Response::TokenCreated { .. } => "token_created",
            Response::Tokens { .. } => "tokens",
            Response::FleetOwned { .. } => "fleet_owned",
            Response::FleetPeers { .. } => "fleet_peers",
            Response::FleetHosts { .. } => "fleet_hosts",
            Response::Identity { .. } => "identity",
        }
    }
}

/// Typed error codes: clients match on these, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a request this version understands.
    BadRequest,
    /// The frame was longer than [`crate::frame::MAX_FRAME_LEN`].
    FrameTooLarge,
    /// The client's protocol version is not supported.
    UnsupportedVersion,
    /// First message was not `hello`, or a second `hello`.
    HelloRequired,
    /// This socket's role may not make this call.
    WrongRole,
    /// The peer's uid/gid may not use the admin socket.
    PermissionDenied,
    UnknownService,
    UnknownInstance,
    /// The instance could not be started (exit during start, spawn error, startup timeout).
    WakeFailed,
    /// The caller's deadline passed before the instance was ready.
    WakeTimeout,
    /// The instance is `failed` and stays so until an operator restarts it.
    InstanceFailed,
    /// The instance is being removed or the supervisor is shutting down.
    Unavailable,
    Internal,
    /// No credential, or one that is malformed, unknown, expired or revoked.
    Unauthenticated,
    /// The credential is good but its scope does not cover the call.
    Forbidden,
    /// Too many failed credentials from this address; try again later.
    RateLimited,
    /// A `[fleet]` host was asked to start a tenant that is not placed on it (or it is
    /// fenced): another host runs it.
    NotPlacedHere,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::WrongRole => "wrong_role",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::UnknownInstance => "unknown_instance",
            ErrorCode::WakeFailed => "wake_failed",
            ErrorCode::WakeTimeout => "wake_timeout",
            ErrorCode::InstanceFailed => "instance_failed",
            ErrorCode::NotPlacedHere => "not_placed_here",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// A tenant placed on this host, in `fleet_own`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetOwned {
    pub instance: InstanceId,
    /// The placement's epoch: it goes up each time the tenant moves between hosts.
    pub epoch: u64,
    /// Moved here off a live host that has not yet stopped it: its wakes wait.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

/// One host of the fleet as etcd has it, in `fleet_hosts` (and `tenement-fleet hosts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHost {
    pub host: String,
    /// Where its proxy takes requests from the other hosts; `None` for a gone host.
    pub address: Option<std::net::SocketAddr>,
    /// Its lease holds.
    pub live: bool,
    /// It runs the fleet's controller now.
    pub controller: bool,
    /// An operator drains it.
    #[serde(default)]
    pub drained: bool,
    /// Tenants placed on it.
    pub placed: usize,
    /// Running, as its supervisor last said (live hosts only).
    pub running: Option<u32>,
    pub memory_total: Option<u64>,
    pub memory_available: Option<u64>,
    pub max_tenants: Option<u32>,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: Option<u64>,
}

/// Another host of the fleet and the tenants placed on it, in `fleet_own` and `fleet_peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPeer {
    /// The host's name in the fleet.
    pub host: String,
    /// Where its proxy takes requests from the other hosts (`[fleet] address`); `None` when
    /// the host's record is gone from etcd (the host is down): its tenants' requests wait
    /// for them to move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::SocketAddr>,
    pub instances: Vec<InstanceId>,
}

/// The lifecycle states an instance is reported in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Unhealthy,
    Failed,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Stopped => "stopped",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Failed => "failed",
        }
    }
}

/// Where an instance is served.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "addr", rename_all = "snake_case")]
pub enum Address {
    /// Loopback TCP, `127.0.0.1:PORT`.
    Tcp(std::net::SocketAddr),
    /// A Unix stream socket path.
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What the proxy needs to route to one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub instance: InstanceId,
    pub state: InstanceState,
    pub address: Address,
    /// Share of `{service}.{domain}` traffic; 0 means not routed by service name.
    pub weight: u32,
    /// Bumped each time a new process serves the instance, so a cached connection pool for an
    /// older generation is never reused.
    pub generation: u64,
    /// The uid owning the instance's listening TCP socket: the proxy sends nothing over a
    /// connection accepted by a socket of another uid (a co-tenant on the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// The accept queue of the instance's listener, when the supervisor saw it as it found the
    /// instance ready: the proxy leaves at most this many new connections unanswered at once
    /// (its herd limit), and asks sock_diag itself when it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u32>,
}

/// One instance as `tenctl ps` and `tenctl status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub instance: InstanceId,
    pub service: ServiceName,
    /// The tenant id, `alice` of `notes:alice`, validated on decode like every id in the
    /// protocol. Once a plain string: the JSON of every valid id is unchanged (rule 2).
    pub id: TenantId,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub address: String,
    /// Seconds since the current process became ready.
    pub uptime_s: Option<u64>,
    /// Seconds since the last request or wake.
    pub idle_s: Option<u64>,
    pub restarts: u32,
    /// `healthy`, `unhealthy (N failures)`, `unchecked` or `-` when not running.
    pub health: String,
    pub in_flight: u32,
    pub weight: u32,
    pub data_dir: String,
    /// The isolation level and containment, e.g. `namespace, cgroup (cpu, memory, pids)` or
    /// `process, process-group`.
    pub isolation: String,
    /// The uid the app runs as, when the supervisor chose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The instance's cgroup directory, when cgroups are in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The configured limits, e.g. `memory_max=64MiB pids_max=64`, and any that cannot be
    /// enforced here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
    /// memory.current of the instance's cgroup, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// pids.current of the instance's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Bytes its data directory takes on disk (`status` only; `ps` leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// CPU time its cgroup has used since it started (`status` only, while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Last exit, for example `exit status 1` or `signal 9 (SIGKILL)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Why the instance is failed or unhealthy, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The release its process runs (or last ran), and the one it should run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_release: Option<u32>,
    /// The release it is pinned to (`tenctl pin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<u32>,
}

/// How a rollout proceeds; unset fields take the service's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutOptions {
    /// Tenants that go first, then the rollout pauses for `rollout resume`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary: Vec<TenantId>,
    /// A share of tenants (by a stable hash of the id) that goes first, then a pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u32>,
    /// Shares of tenants, rising to 100, each step baked before the next without a pause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u32>,
    /// Running tenants switched at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    /// How long a switched tenant must stay well (default: the service's `rollout_bake`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_ms: Option<u64>,
}

impl RolloutOptions {
    pub fn is_default(&self) -> bool {
        *self == RolloutOptions::default()
    }
}

/// What `rollout` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    Status,
    Pause,
    Resume,
    Abort,
}

/// One release of a service, for `releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub number: u32,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// What made it: `config` (the first), `deploy`, `reload` or `rollback`.
    pub origin: String,
    /// The definition's keys that differ from the release before it.
    pub changes: Vec<String>,
    /// The command line, paths resolved.
    pub command: String,
    pub workdir: String,
    /// Tenants that should run it, and of those how many run it now.
    pub tenants: u32,
    pub running: u32,
}

/// The state of a service's latest rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutInfo {
    /// The release being rolled out.
    pub release: u32,
    /// `running`, `paused`, `done` or `aborted`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// 1-based step, and how many there are.
    pub step: u32,
    pub steps: u32,
    /// Tenants moved to the release by this rollout, and those of the current step still to go.
    pub moved: u32,
    pub pending: u32,
    /// Tenants being switched right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switching: Vec<InstanceId>,
    /// Tenants that failed on the release and went back, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<RolloutFailure>,
    pub started_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutFailure {
    pub instance: InstanceId,
    pub reason: String,
}

/// One instance's weight before and after a `weight`, `route` or `deploy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightChange {
    pub instance: InstanceId,
    pub from: u32,
    pub to: u32,
}

/// The supervisor process itself, for `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStats {
    pub version: String,
    pub rss_bytes: u64,
    pub open_fds: u64,
    /// User and system CPU time since it started.
    pub cpu_seconds: f64,
}

/// Counters of one service since the supervisor started, for `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub service: ServiceName,
    /// Restarts by reason ([`RestartReason::as_str`]); reasons with none are left out.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub restarts: std::collections::BTreeMap<String, u64>,
    /// Runs of its instances that ended in the kernel's OOM killer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub oom_kills: u64,
    /// The release unpinned tenants run once rolled out to (0 from an older supervisor).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub release: u32,
    /// Its latest rollout, while it is running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutProgress>,
}

/// How far a service's rollout has come, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    pub release: u32,
    pub paused: bool,
    pub moved: u32,
    pub pending: u32,
    pub switching: u32,
    pub failed: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// Why an instance was started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RestartReason {
    /// It exited while running.
    Crash,
    /// A start failed (exit while starting, not ready in time, could not be spawned).
    StartFailed,
    /// It failed `unhealthy_threshold` health checks in a row.
    Health,
    /// `tenctl restart`.
    Operator,
    /// A config reload changed its service (`rollout = "restart"`, or `listen` changed).
    Reload,
    /// A rollout switched it to another release (also `abort` and `pin` switching it back).
    Rollout,
}

impl RestartReason {
    pub const ALL: [RestartReason; 6] = [
        RestartReason::Crash,
        RestartReason::StartFailed,
        RestartReason::Health,
        RestartReason::Operator,
        RestartReason::Reload,
        RestartReason::Rollout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Crash => "crash",
            RestartReason::StartFailed => "start_failed",
            RestartReason::Health => "health",
            RestartReason::Operator => "operator",
            RestartReason::Reload => "reload",
            RestartReason::Rollout => "rollout",
        }
    }
}

/// What one running instance uses now, for `stats` with `instances`: from its cgroup, or
/// summed over its process tree where there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceUsage {
    pub instance: InstanceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time of the current process tree since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
}

/// Proxy -> supervisor: what happened to one instance since the previous report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityReport {
    pub instance: InstanceId,
    /// Requests (and upgraded connections) open right now.
    pub in_flight: u32,
    /// Requests started since the previous report.
    pub started: u64,
    /// Of those that ended since the previous report, how many the instance answered with a
    /// 2xx or 3xx status (an `auto_spawn` instance that never does is removed after a while).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub succeeded: u64,
    /// Of those, how many the instance answered with a 5xx status (a rollout's bake).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub server_errors: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One line of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub stream: LogStream,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lifecycle events written by the supervisor itself (started, ready, crashed, ...).
    Event,
}
