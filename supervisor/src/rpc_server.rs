//! The two RPC sockets: `proxy.sock` (proxy role) and `admin.sock` (admin role, checked with
//! SO_PEERCRED). Each connection: hello, then framed requests answered one by one; `subscribe`
//! and `logs --follow` turn it into a stream.
//!
//! A bad frame gets an error reply (or the connection closed when the stream cannot be
//! resynchronised), never a crash; every wait has a deadline.
//!
//! Each socket serves at most its own number of connections at once ([`PROXY_CONNECTIONS`],
//! [`ADMIN_CONNECTIONS`]): a slot is taken before `accept`, so past the cap new clients wait in
//! the kernel's listen backlog and cost the supervisor nothing, and however many connections
//! the proxy socket suffers, the admin socket keeps its own slots. A request connection holds
//! its slot only while it keeps talking ([`IDLE_TIMEOUT`]); a stream holds it while it lives.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tenement_proto::frame::{self, FrameError};
use tenement_proto::rpc::{
    ErrorCode, InstanceInfo, InstanceUsage, Request, Response, Role, ServiceStats, SupervisorStats,
    DEFAULT_WEIGHT, PROTOCOL_VERSION,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tenement_proto::auth::{Scope, Secret};

use crate::firewall::Firewall;
use crate::registry::{
    check_weight, Command, ListPage, RegistryHandle, ReleaseCall, RpcError, TokenCall, Weighing,
    MAX_WAKE_WAIT,
};
use crate::tokens::Grant;

/// How long a client has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait of a wake that names no deadline.
const DEFAULT_WAKE_WAIT: Duration = Duration::from_secs(60);
/// How long a request connection may wait between requests, counted until the whole next
/// frame is in (a client that trickles a frame byte by byte is closed like a silent one), and
/// how long it may leave an answer untaken. Every client we ship sends its request right after
/// hello and opens a connection per call (the proxy per wake or resolve, tenctl per command):
/// only a client that is gone or hostile waits this long. Streams (`subscribe`,
/// `logs --follow`) are meant to live long and are bounded by the caps below instead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a log stream opened with a token checks that the token is still good.
const STREAM_RECHECK: Duration = Duration::from_secs(2);
/// Connections `proxy.sock` serves at once. A proxy holds one watch stream and one connection
/// per wake or resolve in flight (concurrent wakes of an instance share one), and an old and a
/// new proxy overlap during a restart: 256 is far above that, and small enough that a
/// compromised proxy cannot make the root supervisor hold thousands of descriptors and tasks.
const PROXY_CONNECTIONS: usize = 256;
/// Connections `admin.sock` serves at once: tenctl uses one per command (and one per
/// `logs --follow`), so 64 covers every operator and script at once.
const ADMIN_CONNECTIONS: usize = 64;

/// Who may use the admin socket besides root and the supervisor's own user.
#[derive(Debug, Clone)]
pub struct AdminPolicy {
    pub own_uid: u32,
    pub admin_gid: Option<u32>,
}

impl AdminPolicy {
    fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(admin) = self.admin_gid else {
            return false;
        };
        gid == admin || pid.is_some_and(|pid| supplementary_groups(pid).contains(&admin))
    }
}

/// The peer's supplementary groups, from `/proc/PID/status` (proc(5), `Groups:`).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
        })
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another supervisor is already serving {0}; stop it or use another runtime_dir")]
    InUse(PathBuf),
    #[error("cannot create socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds a Unix socket at `path` with `mode`, without a window in which it exists with looser
/// permissions: it is bound inside a private directory, chmodded, then renamed into place.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BindError::InUse(path.to_path_buf()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_err)?;
    let private = dir.join(format!(".bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err)?;
    let result = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result.map_err(io_err)
}

/// The connection slots of one socket.
struct Slots {
    role: Role,
    cap: usize,
    free: Arc<Semaphore>,
    /// The cap was reached and at least half the slots have not been free since: one warning
    /// per episode, however many connections wait.
    warned: bool,
}

impl Slots {
    fn new(role: Role, cap: usize) -> Self {
        Self {
            role,
            cap,
            free: Arc::new(Semaphore::new(cap)),
            warned: false,
        }
    }

    /// A slot for the next connection, waiting for one to close if all are taken. `None` only
    /// if the semaphore were closed, which nothing does.
    async fn take(&mut self) -> Option<OwnedSemaphorePermit> {
        let slot = match self.free.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(
                        "{} reached its cap of {} connections: new ones wait in the listen \
                         backlog until one closes",
                        socket_name(self.role),
                        self.cap
                    );
                }
                self.free.clone().acquire_owned().await.ok()?
            }
        };
        if self.free.available_permits() >= self.cap - self.cap / 2 {
            self.warned = false;
        }
        Some(slot)
    }
}

fn socket_name(role: Role) -> &'static str {
    match role {
        Role::Proxy => "proxy.sock",
        Role::Admin => "admin.sock",
    }
}

/// Accepts connections on one socket until `shutdown`, at most the role's cap at once.
pub async fn serve(
    listener: UnixListener,
    role: Role,
    registry: RegistryHandle,
    admin: Arc<AdminPolicy>,
    firewall: Option<Firewall>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let cap = match role {
        Role::Proxy => PROXY_CONNECTIONS,
        Role::Admin => ADMIN_CONNECTIONS,
    };
    let mut slots = Slots::new(role, cap);
    loop {
        // The slot before the connection: past the cap, clients wait in the kernel's backlog
        // (listen(2)) instead of each costing a descriptor and a task here.
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            slot = slots.take() => match slot {
                Some(slot) => slot,
                None => return,
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(?role, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        let firewall = firewall.clone();
        tracker.spawn(async move {
            let _slot = slot;
            let firewall = firewall.as_ref();
            if let Err(e) = connection(stream, role, registry, &admin, firewall, &shutdown).await {
                tracing::debug!(?role, "connection ended: {e}");
            }
        });
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn from_rpc(e: RpcError) -> Response {
    error(e.code, e.message)
}

/// One connection. Request connections end with `shutdown` (between requests); a watch
/// stream lives on until the registry lets go of it, so the proxy can drain instances while
/// the supervisor stops them.
async fn connection(
    stream: UnixStream,
    role: Role,
    registry: RegistryHandle,
    admin: &AdminPolicy,
    firewall: Option<&Firewall>,
    shutdown: &CancellationToken,
) -> Result<(), FrameError> {
    let cred = stream.peer_cred()?;
    let (mut reader, mut writer) = stream.into_split();
    if role == Role::Admin && !admin.allows(cred.uid(), cred.gid(), cred.pid()) {
        let reply = error(
            ErrorCode::PermissionDenied,
            format!(
                "uid {} may not use the admin socket; run as root or join the admin group",
                cred.uid()
            ),
        );
        return respond(&mut writer, &reply).await;
    }

    // Hello first, with a deadline.
    let hello = match tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        hello = tokio::time::timeout(HELLO_TIMEOUT, frame::read_message_async::<_, Request>(&mut reader)) => hello,
    } {
        Err(_) => return Ok(()),
        Ok(Err(FrameError::Decode(e))) => {
            let reply = error(ErrorCode::BadRequest, format!("undecodable message: {e}"));
            return respond(&mut writer, &reply).await;
        }
        Ok(Err(e)) => return reply_to_frame_error(&mut writer, e).await,
        Ok(Ok(request)) => request,
    };
    match hello {
        Request::Hello { version, .. } if version == PROTOCOL_VERSION => {
            // Only the proxy may open proxy.sock (its mode says so): whatever uid it runs as
            // may reach every instance, before it is told of the first route.
            if let (Role::Proxy, Some(firewall)) = (role, firewall) {
                firewall.trust(cred.uid()).await;
            }
            let reply = Response::Hello {
                version: PROTOCOL_VERSION,
                server: format!("tenement-supervisor {}", env!("CARGO_PKG_VERSION")),
                role,
            };
            respond(&mut writer, &reply).await?;
        }
        Request::Hello { version, .. } => {
            let reply = error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this supervisor speaks {PROTOCOL_VERSION}"),
            );
            return respond(&mut writer, &reply).await;
        }
        other => {
            let reply = error(
                ErrorCode::HelloRequired,
                format!("the first message must be hello, not {}", other.name()),
            );
            return respond(&mut writer, &reply).await;
        }
    }

    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = tokio::time::timeout(IDLE_TIMEOUT, frame::read_message_async::<_, Request>(&mut reader)) => next,
        };
        let Ok(next) = next else {
            tracing::debug!(
                ?role,
                "closing a connection that sent no request for {IDLE_TIMEOUT:?}"
            );
            return Ok(());
        };
        let request = match next {
            Ok(request) => request,
            Err(FrameError::Decode(e)) => {
                // The frame boundary is intact: answer and carry on.
                let reply = error(ErrorCode::BadRequest, format!("undecodable message: {e}"));
                respond(&mut writer, &reply).await?;
                continue;
            }
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return reply_to_frame_error(&mut writer, e).await,
        };
        if !request.allowed_for(role) {
            let reply = error(
                ErrorCode::WrongRole,
                format!("{} is an admin call; use the admin socket", request.name()),
            );
            respond(&mut writer, &reply).await?;
            continue;
        }
        // A call of the management API: the credential and its scope are checked here, on
        // every call, whatever the proxy that forwarded it thinks.
        let (request, grant) = match request {
            Request::Authed {
                credential,
                peer,
                call,
            } => match authorize(&registry, credential, peer, &call).await {
                Ok(grant) => (*call, Some(grant)),
                Err((e, grant)) => {
                    if call.mutates() {
                        // A good token out of its scope is named; a bad credential by where
                        // it came from.
                        let actor = match &grant {
                            Some(grant) => Actor::Token(grant),
                            None => Actor::Refused { peer },
                        };
                        audit(&actor, &call, e.code.as_str());
                    }
                    respond(&mut writer, &from_rpc(e)).await?;
                    continue;
                }
            },
            other => (other, None),
        };
        match request {
            Request::Subscribe => return watch(reader, writer, registry).await,
            Request::Logs {
                instance,
                lines,
                follow,
            } => {
                let reply = registry
                    .ask(|reply| Command::Logs {
                        instance,
                        lines,
                        follow,
                        reply,
                    })
                    .await
                    .and_then(|r| r);
                match reply {
                    Err(e) => respond(&mut writer, &from_rpc(e)).await?,
                    Ok(logs) => {
                        respond(&mut writer, &Response::Logs { lines: logs.lines }).await?;
                        if let Some(feed) = logs.follow {
                            let recheck = grant.map(|grant| (registry.clone(), grant));
                            return tokio::select! {
                                () = shutdown.cancelled() => Ok(()),
                                result = follow_logs(reader, writer, feed, recheck) => result,
                            };
                        }
                    }
                }
            }
            Request::List { query } => {
                let scope = grant.map_or(Scope::Admin, |g| g.scope);
                match registry
                    .ask(|reply| Command::List {
                        scope,
                        query,
                        reply,
                    })
                    .await
                {
                    Err(e) => respond(&mut writer, &from_rpc(e)).await?,
                    // A client that stops reading must not hold up the supervisor's shutdown.
                    Ok(page) => tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        sent = send_instances(&mut writer, page) => sent?,
                    },
                }
            }
            Request::Stats { instances } => {
                match registry
                    .ask(|reply| Command::Stats { instances, reply })
                    .await
                {
                    Err(e) => respond(&mut writer, &from_rpc(e)).await?,
                    Ok((services, usage)) => tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        sent = send_stats(&mut writer, services, usage) => sent?,
                    },
                }
            }
            other => {
                // What an operator did (a token's holder, or a caller of the admin socket); the
                // proxy's own wakes are traffic, not acts, and the fleet agent's `fleet_own`
                // every few seconds is a heartbeat (the registry logs what it changes).
                let heartbeat = matches!(other, Request::FleetOwn { .. });
                let audited =
                    (other.mutates() && !heartbeat && (grant.is_some() || role == Role::Admin))
                        .then(|| other.clone());
                let reply = answer(other, &registry, grant.as_ref()).await;
                if let Some(call) = audited {
                    let actor = match &grant {
                        Some(grant) => Actor::Token(grant),
                        None => Actor::Local { uid: cred.uid() },
                    };
                    let result = match &reply {
                        Response::Error { code, .. } => code.as_str(),
                        _ => "ok",
                    };
                    audit(&actor, &call, result);
                }
                if shutdown.is_cancelled() {
                    // The answer may be "shutting down"; the caller learns more by seeing the
                    // connection close and asking the next supervisor.
                    return Ok(());
                }
                respond(&mut writer, &reply).await?;
            }
        }
    }
}

/// Checks a management API credential and whether its scope covers `call`. A refusal
/// carries the grant when the credential itself was good (the call was out of its scope).
async fn authorize(
    registry: &RegistryHandle,
    credential: Secret,
    peer: Option<std::net::IpAddr>,
    call: &Request,
) -> Result<Grant, (RpcError, Option<Grant>)> {
    let grant = registry
        .ask(|reply| Command::Authenticate {
            credential,
            peer,
            reply,
        })
        .await
        .and_then(|checked| checked)
        .map_err(|e| (e, None))?;
    match crate::tokens::permit(&grant, call) {
        Ok(()) => Ok(grant),
        Err(e) => Err((e, Some(grant))),
    }
}

/// Who made a call, for the audit log.
enum Actor<'a> {
    Token(&'a Grant),
    /// A caller of the admin socket.
    Local {
        uid: u32,
    },
    /// A credential that did not pass.
    Refused {
        peer: Option<std::net::IpAddr>,
    },
}

/// One audit event: who did what to what, and how it ended. Never a secret: a token is named
/// by its public id.
fn audit(actor: &Actor<'_>, call: &Request, result: &str) {
    let action = call.name();
    let target = call.target().unwrap_or_default();
    let (token, scope, by) = match actor {
        Actor::Token(grant) => (
            grant.token.to_string(),
            grant.scope.to_string(),
            format!("token {} ({})", grant.token, grant.scope),
        ),
        Actor::Local { uid } => (
            "-".to_owned(),
            "local".to_owned(),
            format!("uid {uid} on the admin socket"),
        ),
        Actor::Refused { peer } => (
            "-".to_owned(),
            "-".to_owned(),
            match peer {
                Some(peer) => format!("a refused credential from {peer}"),
                None => "a refused credential".to_owned(),
            },
        ),
    };
    let what = if target.is_empty() {
        action.to_owned()
    } else {
        format!("{action} {target}")
    };
    tracing::info!(
        target: "tenement::audit",
        audit_token = %token,
        audit_scope = %scope,
        audit_action = action,
        audit_target = %target,
        audit_result = result,
        "audit: {what} by {by}: {result}"
    );
}

/// Instances per `Instances` message: each frame stays far below the 1 MiB cap (an entry is a
/// few hundred bytes) however many instances are registered.
const INSTANCES_PER_MESSAGE: usize = 250;

/// The answer to `list`: the page, in messages of at most [`INSTANCES_PER_MESSAGE`], the last
/// one with where the next page starts and how many match.
async fn send_instances(writer: &mut OwnedWriteHalf, page: ListPage) -> Result<(), FrameError> {
    let mut rest = page.instances.into_iter().peekable();
    let (mut next, mut total) = (page.next, page.total);
    loop {
        let instances: Vec<InstanceInfo> = rest.by_ref().take(INSTANCES_PER_MESSAGE).collect();
        let more = rest.peek().is_some();
        let (next, total) = if more {
            (None, None)
        } else {
            (next.take(), total.take())
        };
        let message = Response::Instances {
            instances,
            more,
            next,
            total,
        };
        respond(writer, &message).await?;
        if !more {
            return Ok(());
        }
    }
}

/// The answer to `stats`: this process and the services first, then the instances in
/// messages of at most [`INSTANCES_PER_MESSAGE`].
async fn send_stats(
    writer: &mut OwnedWriteHalf,
    services: Vec<ServiceStats>,
    instances: Vec<InstanceUsage>,
) -> Result<(), FrameError> {
    let own = tenement_proto::usage::own();
    let mut supervisor = Some(SupervisorStats {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        rss_bytes: own.rss_bytes,
        open_fds: own.open_fds,
        cpu_seconds: own.cpu_seconds,
    });
    let mut services = Some(services);
    let mut rest = instances.into_iter().peekable();
    loop {
        let instances: Vec<InstanceUsage> = rest.by_ref().take(INSTANCES_PER_MESSAGE).collect();
        let more = rest.peek().is_some();
        let message = Response::Stats {
            supervisor: supervisor.take(),
            services: services.take().unwrap_or_default(),
            instances,
            more,
        };
        respond(writer, &message).await?;
        if !more {
            return Ok(());
        }
    }
}

/// Tells the peer why its frame was refused, then ends the connection.
async fn reply_to_frame_error(
    writer: &mut OwnedWriteHalf,
    e: FrameError,
) -> Result<(), FrameError> {
    if let FrameError::TooLarge { .. } = e {
        let reply = error(ErrorCode::FrameTooLarge, e.to_string());
        let _ = respond(writer, &reply).await;
        return Ok(());
    }
    Err(e)
}

/// Writes one answer on a request connection: a client that does not take it within
/// [`IDLE_TIMEOUT`] loses the connection rather than holding its slot.
async fn respond(writer: &mut OwnedWriteHalf, response: &Response) -> Result<(), FrameError> {
    match tokio::time::timeout(IDLE_TIMEOUT, frame::write_message_async(writer, response)).await {
        Ok(written) => written,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client left an answer untaken for {IDLE_TIMEOUT:?}"),
        ))),
    }
}

/// A fleet call, relayed to this host's fleet agent (which alone speaks to etcd) on its
/// control socket.
async fn fleet_call(registry: &RegistryHandle, request: Request) -> Result<Response, RpcError> {
    let Some(socket) = &registry.fleet_socket else {
        return Err(RpcError::new(
            ErrorCode::BadRequest,
            format!(
                "{} is a fleet call, and this host's config has no [fleet] section",
                request.name()
            ),
        ));
    };
    let unanswered = |why: String| {
        RpcError::new(
            ErrorCode::Unavailable,
            format!(
                "the fleet agent (tenement-fleet) does not answer on {}: {why}",
                socket.display()
            ),
        )
    };
    let call = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        frame::write_message_async(&mut stream, &request).await?;
        frame::read_message_async::<_, Response>(&mut stream).await
    };
    match tokio::time::timeout(FLEET_CALL_TIMEOUT, call).await {
        Ok(Ok(Response::Error { code, message })) => Err(RpcError::new(code, message)),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(unanswered(e.to_string())),
        Err(_) => Err(unanswered(format!("no answer in {FLEET_CALL_TIMEOUT:?}"))),
    }
}

/// How long a fleet call may take: etcd answers in milliseconds, or its client gives up
/// after 5 s.
const FLEET_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One request, one response. `grant`: what the management API caller's credential allows
/// (already checked against the request), `None` on the admin and proxy sockets.
async fn answer(request: Request, registry: &RegistryHandle, grant: Option<&Grant>) -> Response {
    let result: Result<Response, RpcError> = async {
        match request {
            Request::Hello { .. } => Err(RpcError::new(
                ErrorCode::HelloRequired,
                "hello was already said",
            )),
            Request::Wake {
                instance,
                timeout_ms,
            } => wake(registry, instance, timeout_ms, false).await,
            Request::Spawn { instance } => wake(registry, instance, None, true).await,
            Request::Restart { instance } => {
                let rx = registry
                    .ask(|reply| Command::Restart { instance, reply })
                    .await?;
                Ok(woken(rx?))
            }
            Request::Resolve { instance } => {
                let route = registry
                    .ask(|reply| Command::Resolve { instance, reply })
                    .await??;
                Ok(Response::Route { route })
            }
            Request::Activity { reports } => {
                registry.send(Command::Activity { reports }).await;
                Ok(Response::Ok)
            }
            Request::ParkAck { .. } => Err(RpcError::new(
                ErrorCode::BadRequest,
                "park_ack is only valid on a subscribed connection",
            )),
            Request::Weight { instance, weight } => {
                let weighing = Weighing::Set { instance, weight };
                let changes = registry
                    .ask(|reply| Command::Weigh { weighing, reply })
                    .await??;
                Ok(Response::Weights { changes })
            }
            Request::Route { from, to } => {
                let weighing = Weighing::Move { from, to };
                let changes = registry
                    .ask(|reply| Command::Weigh { weighing, reply })
                    .await??;
                Ok(Response::Weights { changes })
            }
            Request::Deploy {
                instance,
                weight,
                timeout_ms,
            } => deploy(registry, instance, weight, timeout_ms).await,
            Request::Release { service, options } => {
                release_call(registry, ReleaseCall::Release { service, options }).await
            }
            Request::Releases { service } => {
                release_call(registry, ReleaseCall::Releases { service }).await
            }
            Request::Rollout { service, action } => {
                release_call(registry, ReleaseCall::Rollout { service, action }).await
            }
            Request::Rollback {
                service,
                to,
                options,
            } => {
                let call = ReleaseCall::Rollback {
                    service,
                    to,
                    options,
                };
                release_call(registry, call).await
            }
            Request::Pin { instance, release } => {
                release_call(registry, ReleaseCall::Pin { instance, release }).await
            }
            Request::FleetOwn {
                owned,
                valid_ms,
                peers,
            } => {
                let (running, stopping) = registry
                    .ask(|reply| Command::FleetOwn {
                        owned,
                        valid_ms,
                        peers,
                        reply,
                    })
                    .await??;
                Ok(Response::FleetOwned { running, stopping })
            }
            // On a fleet host a new tenant is wanted by the fleet, which places it.
            Request::Add { instances } if registry.fleet_socket.is_some() => {
                fleet_call(registry, Request::Add { instances }).await
            }
            Request::Add { instances } => {
                let (added, existing) = registry
                    .ask(|reply| Command::Add { instances, reply })
                    .await??;
                Ok(Response::Added { added, existing })
            }
            Request::FleetHosts | Request::FleetDrain { .. } => fleet_call(registry, request).await,
            Request::Stop { instance } => {
                registry
                    .ask(|reply| Command::Stop { instance, reply })
                    .await??;
                Ok(Response::Ok)
            }
            Request::Remove { instance, purge } => {
                registry
                    .ask(|reply| Command::Remove {
                        instance,
                        purge,
                        reply,
                    })
                    .await??;
                Ok(Response::Ok)
            }
            Request::Reload => {
                let r = registry.ask(|reply| Command::Reload { reply }).await??;
                Ok(Response::Reloaded {
                    added: r.added,
                    changed: r.changed,
                    removed: r.removed,
                })
            }
            Request::Status { instance } => {
                let status = registry
                    .ask(|reply| Command::Status { instance, reply })
                    .await??;
                Ok(Response::Status {
                    status: Box::new(status),
                })
            }
            Request::TokenCreate {
                scope,
                read_only,
                lifetime_s,
                name,
            } => {
                let call = TokenCall::Create {
                    scope,
                    read_only,
                    lifetime_s,
                    name,
                };
                token_call(registry, call).await
            }
            Request::TokenList => token_call(registry, TokenCall::List).await,
            Request::TokenRemove { id } => token_call(registry, TokenCall::Remove { id }).await,
            Request::Whoami | Request::Login | Request::Logout => {
                let Some(grant) = grant.cloned() else {
                    return Err(RpcError::new(
                        ErrorCode::BadRequest,
                        format!("{} is only valid inside authed", request.name()),
                    ));
                };
                let call = match request {
                    Request::Whoami => TokenCall::Whoami(grant),
                    Request::Login => TokenCall::Login(grant),
                    _ => TokenCall::Logout(grant),
                };
                token_call(registry, call).await
            }
            Request::Authed { .. } => Err(RpcError::new(
                ErrorCode::BadRequest,
                "authed calls do not nest",
            )),
            // Handled by the caller.
            Request::Subscribe
            | Request::Logs { .. }
            | Request::List { .. }
            | Request::Stats { .. } => Err(RpcError::new(ErrorCode::Internal, "misrouted request")),
        }
    }
    .await;
    result.unwrap_or_else(from_rpc)
}

fn woken(ok: crate::registry::WakeOk) -> Response {
    Response::Woken {
        route: ok.route,
        started: ok.started,
        elapsed_us: ok.elapsed.as_micros() as u64,
    }
}

async fn wake(
    registry: &RegistryHandle,
    instance: tenement_proto::InstanceId,
    timeout_ms: Option<u64>,
    spawn: bool,
) -> Result<Response, RpcError> {
    let wait = timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_WAKE_WAIT)
        .min(MAX_WAKE_WAIT);
    let name = instance.to_string();
    let (reply, rx) = tokio::sync::oneshot::channel();
    registry
        .send(Command::Wake {
            instance,
            register: spawn,
            reset_failed: spawn,
            reply,
        })
        .await;
    match tokio::time::timeout(wait, rx).await {
        Err(_) => Err(RpcError::new(
            ErrorCode::WakeTimeout,
            format!("{name} was not ready within {} ms", wait.as_millis()),
        )),
        Ok(Err(_)) => Err(RpcError::new(
            ErrorCode::Unavailable,
            "the supervisor is shutting down",
        )),
        Ok(Ok(result)) => result.map(woken),
    }
}

async fn token_call(registry: &RegistryHandle, call: TokenCall) -> Result<Response, RpcError> {
    registry
        .ask(|reply| Command::Tokens { call, reply })
        .await?
}

/// One of the release calls, answered with the service's releases.
async fn release_call(registry: &RegistryHandle, call: ReleaseCall) -> Result<Response, RpcError> {
    registry
        .ask(|reply| Command::Releases { call, reply })
        .await?
}

/// `deploy`: registered with weight 0 if new, started, ready, healthy (when its service has a
/// health check readiness did not already pass), and only then given its weight. A failure
/// at any step stops the instance and changes no weight.
async fn deploy(
    registry: &RegistryHandle,
    instance: tenement_proto::InstanceId,
    weight: Option<u32>,
    timeout_ms: Option<u64>,
) -> Result<Response, RpcError> {
    let weight = weight.unwrap_or(DEFAULT_WEIGHT);
    check_weight(weight)?;
    let began = std::time::Instant::now();
    let wait = timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_WAKE_WAIT)
        .min(MAX_WAKE_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let id = instance.clone();
    let plan = registry
        .ask(|reply| Command::PrepareDeploy { instance, reply })
        .await??;
    let started = async {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        let (route, started) = match wake(registry, id.clone(), Some(ms), true).await? {
            Response::Woken { route, started, .. } => (route, started),
            other => {
                return Err(RpcError::new(
                    ErrorCode::Internal,
                    format!("unexpected answer to a wake: {}", other.name()),
                ))
            }
        };
        if let Some((path, per_try)) = &plan.health {
            let healthy = crate::probe::wait_healthy(&route.address, path, *per_try);
            if tokio::time::timeout_at(deadline, healthy).await.is_err() {
                return Err(RpcError::new(
                    ErrorCode::WakeTimeout,
                    format!(
                        "{id} was ready but GET {path} did not answer 2xx within {} ms",
                        wait.as_millis()
                    ),
                ));
            }
        }
        Ok((route, started))
    }
    .await;
    let (route, started) = match started {
        Ok(ready) => ready,
        Err(e) => {
            // Stopped, weights untouched (a new instance stays registered at weight 0).
            let stop = id.clone();
            let _ = registry
                .ask(|reply| Command::Stop {
                    instance: stop,
                    reply,
                })
                .await;
            return Err(RpcError::new(
                e.code,
                format!(
                    "deploy of {id} failed: {}; it is stopped and no weight changed",
                    e.message
                ),
            ));
        }
    };
    let weighing = Weighing::Set {
        instance: id.clone(),
        weight,
    };
    registry
        .ask(|reply| Command::Weigh { weighing, reply })
        .await??;
    let route = registry
        .ask(|reply| Command::Resolve {
            instance: id,
            reply,
        })
        .await?
        .unwrap_or(route);
    tracing::info!(instance = %route.instance, fresh = plan.fresh, "{}: deployed with weight {weight}", route.instance);
    Ok(Response::Deployed {
        route,
        started,
        elapsed_us: began.elapsed().as_micros() as u64,
    })
}

/// The proxy's watch stream: route updates and park requests down, activity and park
/// answers up.
async fn watch(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    registry: RegistryHandle,
) -> Result<(), FrameError> {
    let (tx, mut rx) = mpsc::channel::<Response>(4096);
    let watcher = registry.ask(|reply| Command::Subscribe { tx, reply }).await;
    let Ok(watcher) = watcher else {
        return Ok(());
    };
    let (frames_tx, mut frames_rx) = mpsc::channel::<Result<Request, FrameError>>(64);
    // Reading in its own task keeps frame reads whole (read_frame is not cancel-safe).
    let reader_task = tokio::spawn(async move {
        loop {
            let result = frame::read_message_async::<_, Request>(&mut reader).await;
            let stop = matches!(
                result,
                Err(FrameError::Closed | FrameError::TooLarge { .. } | FrameError::Io(_))
            );
            if frames_tx.send(result).await.is_err() || stop {
                return;
            }
        }
    });
    let result = loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(message) => {
                    if let Err(e) = frame::write_message_async(&mut writer, &message).await {
                        break Err(e);
                    }
                }
                // The registry dropped us for falling behind.
                None => break Ok(()),
            },
            incoming = frames_rx.recv() => match incoming {
                None | Some(Err(FrameError::Closed)) => break Ok(()),
                Some(Err(FrameError::Decode(e))) => {
                    let reply = error(ErrorCode::BadRequest, format!("undecodable message: {e}"));
                    if let Err(e) = frame::write_message_async(&mut writer, &reply).await {
                        break Err(e);
                    }
                }
                Some(Err(e)) => break reply_to_frame_error(&mut writer, e).await,
                Some(Ok(Request::Activity { reports })) => registry.send(Command::Activity { reports }).await,
                Some(Ok(Request::ParkAck { instance, park_id, accepted })) => {
                    registry.send(Command::ParkAck { watcher, instance, park_id, accepted }).await;
                }
                Some(Ok(other)) => {
                    let reply = error(ErrorCode::BadRequest, format!("{} is not valid on a watch stream", other.name()));
                    if let Err(e) = frame::write_message_async(&mut writer, &reply).await {
                        break Err(e);
                    }
                }
            },
        }
    };
    reader_task.abort();
    registry.send(Command::Unsubscribe { watcher }).await;
    result
}

/// Streams new log lines until the client goes away.
async fn follow_logs(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    mut feed: tokio::sync::broadcast::Receiver<tenement_proto::rpc::LogLine>,
    recheck: Option<(RegistryHandle, Grant)>,
) -> Result<(), FrameError> {
    use tokio::io::AsyncReadExt;
    use tokio::sync::broadcast::error::RecvError;
    let mut probe = [0u8; 64];
    let mut every = tokio::time::interval(STREAM_RECHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A stream opened with a token ends soon after the token is revoked or expires.
            _ = every.tick(), if recheck.is_some() => {
                if let Some((registry, grant)) = &recheck {
                    let grant = grant.clone();
                    let valid = registry.ask(|reply| Command::StillValid { grant, reply }).await.unwrap_or(false);
                    if !valid {
                        let reply = error(ErrorCode::Unauthenticated, "the token or session of this stream was revoked or has expired");
                        return frame::write_message_async(&mut writer, &reply).await;
                    }
                }
            }
            line = feed.recv() => match line {
                Ok(line) => frame::write_message_async(&mut writer, &Response::Logs { lines: vec![line] }).await?,
                Err(RecvError::Lagged(n)) => {
                    let note = tenement_proto::rpc::LogLine {
                        ts_ms: crate::logs::now_ms(),
                        stream: tenement_proto::rpc::LogStream::Event,
                        line: format!("[{n} lines skipped: the reader fell behind]"),
                    };
                    frame::write_message_async(&mut writer, &Response::Logs { lines: vec![note] }).await?;
                }
                // The instance was removed.
                Err(RecvError::Closed) => return Ok(()),
            },
            // Any input or EOF from the client ends the stream.
            _ = reader.read(&mut probe) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_policy_allows_root_self_and_group() {
        let policy = AdminPolicy {
            own_uid: 1000,
            admin_gid: Some(50),
        };
        assert!(policy.allows(0, 0, None));
        assert!(policy.allows(1000, 1000, None));
        assert!(policy.allows(1001, 50, None));
        assert!(!policy.allows(1001, 1001, None));
        let closed = AdminPolicy {
            own_uid: 0,
            admin_gid: None,
        };
        assert!(!closed.allows(1001, 50, None));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_wait_at_the_cap_and_warn_once_until_half_are_free_again() {
        let mut slots = Slots::new(Role::Proxy, 4);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(slots.take().await.expect("a free slot"));
        }
        assert!(!slots.warned, "warned before the cap was reached");
        // The fifth connection waits...
        let waited = tokio::time::timeout(Duration::from_secs(60), slots.take()).await;
        assert!(waited.is_err(), "a fifth slot was given out");
        assert!(slots.warned);
        // ...until one closes; taking the freed slot is the same episode.
        held.pop();
        held.push(slots.take().await.expect("the freed slot"));
        assert!(slots.warned);
        // Once half the slots are free again, reaching the cap is worth a new warning.
        held.truncate(1);
        held.push(slots.take().await.expect("a free slot"));
        assert!(!slots.warned);
    }

    #[tokio::test]
    async fn sockets_are_created_with_their_mode_and_refuse_a_second_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let listener = bind_socket(&path, 0o600).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_socket(&path, 0o600),
            Err(BindError::InUse(_))
        ));
        drop(listener);
        // A stale socket file with nobody behind it is replaced.
        bind_socket(&path, 0o600).expect("rebind over a stale file");
    }
}
