//! The proxy's side of the supervisor RPC (proxy role only): wake and resolve calls, and the
//! watch stream that keeps the route table current, carries activity reports up and answers
//! park requests.
//!
//! The supervisor may restart at any time (socket-activated in production): calls retry the
//! connection until their deadline instead of failing, and the watch stream reconnects and
//! takes a fresh snapshot.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tenement_proto::frame::{self, FrameError};
use tenement_proto::rpc::{
    ActivityReport, ErrorCode, InstanceUsage, Request, Response, ServiceStats, SupervisorStats,
    PROTOCOL_VERSION,
};
use tenement_proto::InstanceId;
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::respond::ProxyError;
use crate::table::{RouteInfo, Table};

/// How often activity is reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// How long a connection that completed a call is kept for the next one: well under the 30 s
/// after which the supervisor closes a connection that sends nothing.
const KEEP_FOR: Duration = Duration::from_secs(20);
/// Connections kept per thread and supervisor socket (calls on one thread at once).
const KEEP_AT_MOST: usize = 4;

/// A connection that said hello and completed a call, waiting for the next call.
struct Kept {
    socket: PathBuf,
    stream: UnixStream,
    since: std::time::Instant,
}

thread_local! {
    /// Kept connections of this thread. Per thread because a tokio stream belongs to the
    /// runtime that made it, and every runtime of the proxy is a single thread (workers.rs).
    static KEPT: std::cell::RefCell<Vec<Kept>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a scrape gets from the supervisor (`stats`), all its messages together.
#[derive(Debug, Clone, Default)]
pub struct SupervisorReport {
    pub supervisor: Option<SupervisorStats>,
    pub services: Vec<ServiceStats>,
    pub instances: Vec<InstanceUsage>,
}

#[derive(Clone)]
pub struct Link {
    socket: PathBuf,
}

impl Link {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// Connects and says hello, retrying until `deadline` while the supervisor is away.
    pub(crate) async fn connect(&self, deadline: Instant) -> Result<UnixStream, ProxyError> {
        let mut pause = Duration::from_millis(5);
        loop {
            // A supervisor at its connection cap leaves us in its backlog: bounded by the
            // request's deadline like everything else.
            let attempt = tokio::time::timeout_at(deadline, self.try_connect())
                .await
                .unwrap_or_else(|_| {
                    Err(FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no hello before the deadline",
                    )))
                });
            match attempt {
                Ok(stream) => return Ok(stream),
                Err(e) => {
                    if Instant::now() + pause >= deadline {
                        tracing::warn!("supervisor unreachable at {}: {e}", self.socket.display());
                        return Err(ProxyError::WakeFailed(format!(
                            "supervisor unreachable: {e}"
                        )));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    async fn try_connect(&self) -> Result<UnixStream, FrameError> {
        let mut stream = UnixStream::connect(&self.socket).await?;
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: format!("tenement-proxy {}", env!("CARGO_PKG_VERSION")),
        };
        frame::write_message_async(&mut stream, &hello).await?;
        match frame::read_message_async::<_, Response>(&mut stream).await? {
            Response::Hello { .. } => Ok(stream),
            other => Err(FrameError::Io(std::io::Error::other(format!(
                "unexpected hello answer: {other:?}"
            )))),
        }
    }

    /// One request and its answer, retried on a fresh connection if the supervisor went away
    /// mid-call (a restart), until `deadline`. A connection that completed a call is kept for
    /// the next one on this thread ([`KEPT`]): a cold wake then skips a connect and a hello.
    async fn call(&self, request: Request, deadline: Instant) -> Result<Response, ProxyError> {
        loop {
            let (mut stream, kept) = match self.take_kept() {
                Some(stream) => (stream, true),
                None => (self.connect(deadline).await?, false),
            };
            let exchange = async {
                frame::write_message_async(&mut stream, &request).await?;
                frame::read_message_async::<_, Response>(&mut stream).await
            };
            match tokio::time::timeout_at(deadline, exchange).await {
                Err(_) => return Err(ProxyError::WakeFailed("wake deadline passed".to_owned())),
                Ok(Ok(response)) => {
                    self.keep(stream);
                    return Ok(response);
                }
                // The supervisor closed a kept connection (idle, or it restarted): every call
                // is safe to send again, at once, on a fresh connection.
                Ok(Err(e)) if kept => {
                    tracing::debug!("kept supervisor connection gone, reconnecting: {e}");
                }
                Ok(Err(e)) => {
                    tracing::debug!("supervisor call interrupted, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// A kept connection to this link's socket, if this thread has one young enough.
    fn take_kept(&self) -> Option<UnixStream> {
        KEPT.with(|kept| {
            let mut kept = kept.borrow_mut();
            kept.retain(|k| k.since.elapsed() < KEEP_FOR);
            let i = kept.iter().rposition(|k| k.socket == self.socket)?;
            Some(kept.swap_remove(i).stream)
        })
    }

    fn keep(&self, stream: UnixStream) {
        KEPT.with(|kept| {
            let mut kept = kept.borrow_mut();
            if kept.iter().filter(|k| k.socket == self.socket).count() < KEEP_AT_MOST {
                kept.push(Kept {
                    socket: self.socket.clone(),
                    stream,
                    since: std::time::Instant::now(),
                });
            }
        });
    }

    /// Wakes `id` and returns its route once it is ready.
    pub async fn wake(&self, id: &InstanceId, deadline: Instant) -> Result<RouteInfo, ProxyError> {
        let timeout_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let request = Request::Wake {
            instance: id.clone(),
            timeout_ms: Some(timeout_ms),
        };
        loop {
            match self.call(request.clone(), deadline).await? {
                Response::Woken { route, .. } => return Ok(RouteInfo::from(&route)),
                // Shutting down or in the middle of something: ask again shortly.
                Response::Error {
                    code: ErrorCode::Unavailable,
                    ..
                } if Instant::now() + Duration::from_millis(20) < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Response::Error { code, message } => return Err(map_error(code, message)),
                other => {
                    return Err(ProxyError::WakeFailed(format!(
                        "unexpected answer {other:?}"
                    )))
                }
            }
        }
    }

    /// Looks an instance up (registering it if its service has `auto_spawn`).
    pub async fn resolve(
        &self,
        id: &InstanceId,
        deadline: Instant,
    ) -> Result<tenement_proto::rpc::Route, ProxyError> {
        match self
            .call(
                Request::Resolve {
                    instance: id.clone(),
                },
                deadline,
            )
            .await?
        {
            Response::Route { route } => Ok(route),
            Response::Error { code, message } => Err(map_error(code, message)),
            other => Err(ProxyError::WakeFailed(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// The supervisor's numbers for a scrape (`instances`: with every running instance's
    /// usage), read within `deadline`. `None` when the supervisor is away or too slow: the
    /// scrape goes on without them.
    pub async fn stats(&self, instances: bool, deadline: Instant) -> Option<SupervisorReport> {
        let exchange = async {
            let mut stream = self.try_connect().await?;
            frame::write_message_async(&mut stream, &Request::Stats { instances }).await?;
            let mut report = SupervisorReport::default();
            loop {
                match frame::read_message_async::<_, Response>(&mut stream).await? {
                    Response::Stats {
                        supervisor,
                        services,
                        instances,
                        more,
                    } => {
                        report.supervisor = report.supervisor.or(supervisor);
                        report.services.extend(services);
                        report.instances.extend(instances);
                        if !more {
                            return Ok(report);
                        }
                    }
                    other => {
                        return Err(FrameError::Io(std::io::Error::other(format!(
                            "unexpected answer to stats: {}",
                            other.name()
                        ))))
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(report)) => Some(report),
            Ok(Err(e)) => {
                tracing::debug!("no stats from the supervisor: {e}");
                None
            }
            Err(_) => {
                tracing::debug!("no stats from the supervisor before the scrape's deadline");
                None
            }
        }
    }

    /// Keeps `table` in step with the supervisor's routes (reconnecting as needed) and calls
    /// `reload` when the supervisor says the config file was reloaded.
    /// On a fleet host, `fleet` gets the tenants placed on the other hosts.
    pub async fn watch(
        self,
        table: Arc<Table>,
        fleet: Option<Arc<crate::fleet::Fleet>>,
        reload: Arc<dyn Fn() + Send + Sync>,
        shutdown: CancellationToken,
    ) {
        let mut pause = Duration::from_millis(10);
        let mut last_problem = String::new();
        loop {
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.watch_once(&table, fleet.as_deref(), &*reload) => result,
            };
            table.set_synced(false);
            if let Err(e) = result {
                // Say it once per kind of trouble: a permission problem (proxy_user, the
                // socket's group) never fixes itself and must not hide behind a debug line.
                let problem = e.to_string();
                if problem != last_problem {
                    tracing::warn!(
                        "supervisor at {} unreachable: {problem}; retrying",
                        self.socket.display()
                    );
                    last_problem = problem;
                }
            } else {
                last_problem.clear();
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn watch_once(
        &self,
        table: &Table,
        fleet: Option<&crate::fleet::Fleet>,
        reload: &(dyn Fn() + Send + Sync),
    ) -> Result<(), FrameError> {
        let mut stream = self.try_connect().await?;
        frame::write_message_async(&mut stream, &Request::Subscribe).await?;
        tracing::info!("watching routes from {}", self.socket.display());
        let (mut reader, mut writer) = stream.into_split();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Request>(256);

        // Frames are read whole in their own task (reads are not cancel-safe).
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Result<Response, FrameError>>(256);
        let reader_task = tokio::spawn(async move {
            loop {
                let message = frame::read_message_async::<_, Response>(&mut reader).await;
                let end = message.is_err();
                if in_tx.send(message).await.is_err() || end {
                    return;
                }
            }
        });
        let writer_task = tokio::spawn(async move {
            while let Some(request) = out_rx.recv().await {
                frame::write_message_async(&mut writer, &request).await?;
            }
            Ok::<(), FrameError>(())
        });

        let mut snapshot: Option<HashSet<InstanceId>> = None;
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                message = in_rx.recv() => match message {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e),
                    Some(Ok(Response::Routes { routes, reset, complete, removed })) => {
                        if reset {
                            snapshot = Some(HashSet::new());
                        }
                        for route in &routes {
                            table.upsert(route);
                            if let Some(seen) = snapshot.as_mut() {
                                seen.insert(route.instance.clone());
                            }
                        }
                        for id in &removed {
                            table.remove(id);
                        }
                        if complete {
                            if let Some(seen) = snapshot.take() {
                                table.retain(&seen);
                                // A reload the supervisor pushed before this subscription
                                // existed (the proxy starting, or reconnecting, at that
                                // moment) never reached us: read the config now that every
                                // later one will.
                                reload();
                            }
                            table.set_synced(true);
                        }
                    }
                    Some(Ok(Response::Park { instance, park_id, drain: true })) => {
                        // Shutdown of the supervisor: nothing new enters; tell it what is
                        // still in flight, then agree.
                        if let Some(entry) = table.get(&instance) {
                            entry.park_for_drain();
                        }
                        send_activity(table, &out_tx).await;
                        let _ = out_tx.send(Request::ParkAck { instance, park_id, accepted: true }).await;
                    }
                    Some(Ok(Response::Park { instance, park_id, drain: false })) => {
                        let accepted = table.get(&instance).is_some_and(|e| e.try_park());
                        if accepted {
                            table.note_park();
                        } else {
                            // Tell the supervisor why: what is in flight right now.
                            send_activity(table, &out_tx).await;
                        }
                        let _ = out_tx.send(Request::ParkAck { instance, park_id, accepted }).await;
                    }
                    Some(Ok(Response::Error { code, message })) => {
                        tracing::warn!(?code, "supervisor: {message}");
                    }
                    Some(Ok(Response::ConfigReloaded)) => reload(),
                    Some(Ok(Response::FleetPeers { peers })) => {
                        if let Some(fleet) = fleet {
                            fleet.placements.replace(peers);
                        }
                    }
                    Some(Ok(_)) => {}
                },
                _ = report.tick() => send_activity(table, &out_tx).await,
                () = table.drained() => send_activity(table, &out_tx).await,
            }
            if writer_task.is_finished() {
                break Ok(());
            }
        };
        reader_task.abort();
        writer_task.abort();
        result
    }
}

async fn send_activity(table: &Table, out: &tokio::sync::mpsc::Sender<Request>) {
    let reports: Vec<ActivityReport> = table.activity();
    if !reports.is_empty() {
        let _ = out.send(Request::Activity { reports }).await;
    }
}

fn map_error(code: ErrorCode, message: String) -> ProxyError {
    match code {
        ErrorCode::UnknownInstance => ProxyError::UnknownInstance,
        ErrorCode::UnknownService => ProxyError::UnknownService,
        ErrorCode::InstanceFailed => ProxyError::InstanceFailed(message),
        ErrorCode::NotPlacedHere => ProxyError::NotPlacedHere(message),
        _ => ProxyError::WakeFailed(message),
    }
}
