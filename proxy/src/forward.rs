//! The request path: route by Host, wait for a wake when needed, forward over a pooled
//! connection, stream both bodies, and keep the instance counted as busy until the response
//! (or the upgraded connection) has ended.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tenement_proto::rpc::InstanceState;
use tenement_proto::ServiceName;
use tokio::time::Instant;

// The head rewrite lives in `head.rs`; named here too for the fuzz targets and older callers.
pub use crate::head::{check_body_size, prepare_headers, rewrite_head, strip_hop_by_hop};
use crate::host::{self, Target};
use crate::link::Link;
use crate::metrics::{ServiceHandles, UpstreamKind};
use crate::pool::{Pool, PoolKey};
use crate::relay::{Progress, RequestBody, ResponseBody};
use crate::respond::{error_response, full, BoxError, ProxyBody, ProxyError};
use crate::table::{Entry, InFlight, RouteInfo, Table};

/// Per-service settings the proxy needs.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    pub max_body: u64,
    /// Connections to one instance at once (`max_upstream_connections`).
    pub max_upstream: u32,
    /// A request for an unknown tenant creates it (`auto_spawn`).
    pub auto_spawn: bool,
}

/// Everything the request path is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub domains: Vec<String>,
    pub services: HashMap<ServiceName, ServicePolicy>,
    /// How long a request may wait for a wake.
    pub wake_timeout: Duration,
    /// How long a request for a tenant placed on another host may wait while that host is
    /// down: until its lease has expired, the grace has passed and the tenant woke on its
    /// new host (`lease_ttl + grace + wake_timeout`; zero off a fleet).
    pub fleet_wait: Duration,
    pub connect_timeout: Duration,
    /// How long the upstream has to send its response head.
    pub response_timeout: Duration,
    /// Peers whose X-Forwarded-*/Forwarded headers are kept and extended.
    pub trusted_proxies: Vec<IpAddr>,
    /// The uids tenants run as: a loopback peer of one of these is never a trusted proxy.
    pub tenant_uids: crate::admission::TenantUids,
    /// A plain-HTTP request for a name with a certificate is answered 308 to https://.
    pub redirect_http: bool,
    /// `Strict-Transport-Security` for HTTPS answers.
    pub hsts: Option<HeaderValue>,
    /// The port redirects name (`None`: the first HTTPS listener's).
    pub https_port: Option<u16>,
    /// Scrapes include series per running instance.
    pub metrics_per_instance: bool,
}

pub struct Proxy {
    /// Replaced whole when the config is reloaded; each request reads it once.
    pub settings: arc_swap::ArcSwap<Settings>,
    pub table: Arc<Table>,
    pub link: Link,
    pub pool: Arc<Pool>,
    /// Requests that would create an instance, per client address.
    pub new_tenants: crate::admission::NewTenantLimit,
    /// Upgraded connections (WebSockets), which outlive their HTTP connection: a stopping
    /// proxy waits for them within its grace period, as it waits for requests in flight.
    pub upgraded: tokio_util::task::TaskTracker,
    /// The certificates of the HTTPS listeners and the port of the first one, when there is
    /// one: where plain-HTTP requests are redirected.
    pub https: Option<(Arc<crate::tls::Store>, u16)>,
    /// Certificates from ACME, whose HTTP-01 challenges plain HTTP answers.
    pub acme: Option<Arc<crate::acme::Acme>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The wakes of the last hour, for the dashboard.
    pub recent_wakes: Arc<crate::recent::RecentWakes>,
    /// Supervisor connections the API and the dashboard may hold (`api::SLOTS`).
    pub api_slots: Arc<tokio::sync::Semaphore>,
    /// On a fleet host with the fleet credential: the tenants placed on the other hosts and
    /// the connections to their proxies (`fleet.rs`).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// Whether a path at `{domain}` is the management API's.
fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// How a request reached the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `http` or `https`, from the listener's name.
    pub scheme: &'static str,
    /// A connection from this host whose socket belongs to a tenant's uid: never a trusted
    /// proxy, whatever `trusted_proxies` says about its address (see `admission.rs`).
    pub tenant: bool,
    /// Handed over by another host's proxy (`fleet.rs`): `addr`, `scheme` and `tenant` are
    /// the client's as that proxy saw them, and the request is served here or not at all.
    pub via_fleet: bool,
}

impl Proxy {
    /// Serves one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Peer,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let started = Instant::now();
        let hsts = match peer.scheme {
            "https" => self.settings.load().hsts.clone(),
            _ => None,
        };
        let mut handles = None;
        let response = match self.serve(request, peer, &mut handles).await {
            Ok(response) => response,
            Err(error) => {
                let kind = match &error {
                    ProxyError::Upstream(_) => Some(UpstreamKind::Broken),
                    ProxyError::UpstreamTimeout => Some(UpstreamKind::Timeout),
                    ProxyError::Busy(_) => Some(UpstreamKind::Busy),
                    ProxyError::WakeFailed(_) => Some(UpstreamKind::WakeFailed),
                    ProxyError::InstanceFailed(_) => Some(UpstreamKind::Failed),
                    _ => None,
                };
                if let (Some(kind), Some(handles)) = (kind, &handles) {
                    handles.upstream_error(kind);
                }
                match &error {
                    ProxyError::WakeFailed(detail)
                    | ProxyError::InstanceFailed(detail)
                    | ProxyError::Busy(detail)
                    | ProxyError::Upstream(detail) => {
                        tracing::warn!(peer = %peer.addr, "{error}: {detail}")
                    }
                    _ => tracing::debug!(peer = %peer.addr, "{error}"),
                }
                error_response(&error)
            }
        };
        let handles = handles.unwrap_or_else(|| self.metrics.service(None));
        handles.request(response.status().as_u16(), started.elapsed());
        Ok(with_hsts(response, hsts))
    }

    /// `handles`: set to the metric handles of the service once the request has one.
    async fn serve(
        &self,
        request: Request<Incoming>,
        peer: Peer,
        handles: &mut Option<Arc<ServiceHandles>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Some(acme) = &self.acme {
            if let Some(token) = request
                .uri()
                .path()
                .strip_prefix("/.well-known/acme-challenge/")
            {
                // Whatever the Host: the CA asks for the name being validated, and a token
                // nobody knows answers nothing.
                return Ok(match acme.http01_answer(token) {
                    Some(answer) => {
                        let mut response = Response::new(full(answer));
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/octet-stream"),
                        );
                        response
                    }
                    None => error_response(&ProxyError::UnknownChallenge),
                });
            }
        }
        let settings = self.settings.load_full();
        let (raw_host, target) = request_target(&request, &settings.domains)?;
        // Only with an HTTPS listener to send anyone to.
        if self.https.is_some()
            && settings.redirect_http
            && crate::head::client_scheme(request.headers(), peer, &settings.trusted_proxies)
                == "http"
        {
            let port = settings.https_port;
            if let Some(location) = self.https_location(&request, raw_host.as_deref(), port) {
                return Ok(redirect(location));
            }
        }
        let deadline = Instant::now() + settings.wake_timeout;
        let entry = match target {
            // Boxed, as the API and the dashboard are the rare paths: their futures would
            // otherwise make the future of every request larger, and hyper keeps room for one
            // in each client connection for its whole life, idle or not.
            Target::Home if is_api(request.uri().path()) => {
                return Ok(Box::pin(crate::api::serve(self, request, peer, &settings)).await)
            }
            Target::Home => {
                return Ok(Box::pin(crate::dashboard::serve(self, request, peer, &settings)).await)
            }
            Target::NoMatch => return Err(ProxyError::UnknownHost),
            Target::Instance(id) => {
                let policy = settings
                    .services
                    .get(&id.service)
                    .ok_or(ProxyError::UnknownService)?;
                check_body_size(&request, policy.max_body)?;
                if let Some(fleet) = self.fleet.as_ref().filter(|_| !peer.via_fleet) {
                    if fleet.placements.get(&id).is_some() {
                        *handles = Some(self.metrics.service(Some(&id.service)));
                        let host = raw_host.clone().unwrap_or_default();
                        // Boxed like the API: a rare path's future stays out of every
                        // request's.
                        let handed = Box::pin(
                            self.hand_over(request, &id, peer, &host, deadline, &settings),
                        )
                        .await?;
                        return match handed {
                            crate::fleet::Handed::Answered(response) => Ok(response),
                            crate::fleet::Handed::PlacedHere(back) => {
                                let entry = self
                                    .instance_entry(&id, policy, peer, deadline, handles)
                                    .await?;
                                Box::pin(self.forward(back, entry, peer, host, deadline, &settings))
                                    .await
                            }
                        };
                    }
                }
                self.instance_entry(&id, policy, peer, deadline, handles)
                    .await?
            }
            Target::Service(name) => {
                let policy = settings
                    .services
                    .get(&name)
                    .ok_or(ProxyError::UnknownService)?;
                check_body_size(&request, policy.max_body)?;
                let picked = self.table.pick(&name);
                if picked.is_none() {
                    // The cold path: counted under its service even if it ends in an error.
                    *handles = Some(self.metrics.service(Some(&name)));
                }
                match picked {
                    Some(entry) => entry,
                    // Right after start (or a supervisor restart) the table may be empty
                    // only because the snapshot has not arrived yet.
                    None if self.table.wait_synced(deadline).await => {
                        self.table.pick(&name).ok_or(ProxyError::UnknownInstance)?
                    }
                    None => {
                        return Err(ProxyError::WakeFailed(
                            "no route table from the supervisor".to_owned(),
                        ))
                    }
                }
            }
        };
        *handles = Some(
            entry
                .metrics
                .get_or_init(|| self.metrics.service(Some(&entry.id.service)))
                .clone(),
        );
        self.forward(
            request,
            entry,
            peer,
            raw_host.unwrap_or_default(),
            deadline,
            &settings,
        )
        .await
    }

    /// The route table's entry of `id`, asking the supervisor when it has none (the cold
    /// path, counted under its service even if it ends in a 404).
    async fn instance_entry(
        &self,
        id: &tenement_proto::InstanceId,
        policy: &ServicePolicy,
        peer: Peer,
        deadline: Instant,
        handles: &mut Option<Arc<ServiceHandles>>,
    ) -> Result<Arc<Entry>, ProxyError> {
        if let Some(entry) = self.table.get(id) {
            return Ok(entry);
        }
        *handles = Some(self.metrics.service(Some(&id.service)));
        if peer.via_fleet {
            // Handed over by a host that takes it for placed here: it is, or is about to be
            // (the supervisor registers it when the agent says so), or it moved on. That host
            // waits and asks again.
            return match self.link.resolve(id, deadline).await {
                Ok(route) => Ok(self.table.upsert(&route)),
                Err(ProxyError::UnknownInstance) => Err(ProxyError::NotPlacedHere(format!(
                    "{id} is not registered on this host"
                ))),
                Err(e) => Err(e),
            };
        }
        // Not in the cache: ask (the supervisor registers it for auto_spawn, which a client
        // may only make happen so often).
        if policy.auto_spawn
            && !self
                .new_tenants
                .allow(peer.addr.ip(), std::time::Instant::now())
        {
            return Err(ProxyError::TooManyNewTenants);
        }
        let route = self.link.resolve(id, deadline).await?;
        Ok(self.table.upsert(&route))
    }

    /// Whether `name` (a lower-case host name) is tenement's: a configured domain, a
    /// configured service under one, an instance the supervisor has registered (its route
    /// table, pushed over the proxy role, waited for until `deadline` right after a start or
    /// while the supervisor is away), or on a fleet host a tenant placed on another host.
    /// Only such names get certificates from ACME. `None`: cannot tell, the supervisor's
    /// table is not there (never a reason to order, nor to give a name up).
    pub async fn is_ours(&self, name: &str, deadline: Instant) -> Option<bool> {
        let settings = self.settings.load_full();
        match host::route(name, &settings.domains) {
            Ok(Target::Home) => Some(true),
            Ok(Target::Service(service)) => Some(settings.services.contains_key(&service)),
            Ok(Target::Instance(id)) => {
                if !settings.services.contains_key(&id.service) {
                    return Some(false);
                }
                // A tenant placed on another fleet host is served here too (handed over).
                let elsewhere = || {
                    self.fleet
                        .as_ref()
                        .is_some_and(|fleet| fleet.placements.get(&id).is_some())
                };
                if self.table.get(&id).is_some() || elsewhere() {
                    return Some(true);
                }
                self.table
                    .wait_synced(deadline)
                    .await
                    .then(|| self.table.get(&id).is_some())
            }
            Ok(Target::NoMatch) | Err(_) => Some(false),
        }
    }

    /// Where a plain-HTTP request goes instead, when its host has a certificate: the same
    /// URL over https, on `port` or the first HTTPS listener's (the ACME HTTP-01 challenge
    /// path stays on plain HTTP, and `OPTIONS *` names no URL).
    fn https_location<B>(
        &self,
        request: &Request<B>,
        raw_host: Option<&str>,
        port: Option<u16>,
    ) -> Option<String> {
        let (store, listener_port) = self.https.as_ref()?;
        let port = port.unwrap_or(*listener_port);
        let host = host::normalize(raw_host?).ok()?;
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        if !path.starts_with('/')
            || path.starts_with("/.well-known/acme-challenge/")
            || !store.covers(&host)
        {
            return None;
        }
        Some(match port {
            443 => format!("https://{host}{path}"),
            port => format!("https://{host}:{port}{path}"),
        })
    }

    /// Enters the instance, waking it first if it is not serving.
    async fn enter(
        &self,
        entry: &Arc<Entry>,
        deadline: Instant,
    ) -> Result<(InFlight, RouteInfo), ProxyError> {
        for _ in 0..4 {
            if let Some(guard) = entry.try_enter() {
                let route = entry.route();
                return Ok((guard, route));
            }
            if entry.route().state == InstanceState::Failed {
                return Err(ProxyError::InstanceFailed("instance is failed".to_owned()));
            }
            self.wake(entry, deadline).await?;
        }
        Err(ProxyError::WakeFailed(
            "the instance stopped again right after waking".to_owned(),
        ))
    }

    /// One wake per instance at a time, shared by every request waiting for it.
    async fn wake(&self, entry: &Arc<Entry>, deadline: Instant) -> Result<RouteInfo, ProxyError> {
        let mut rx = {
            let mut slot = match entry.wake.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match slot.as_ref() {
                Some(rx) if rx.borrow().is_none() => rx.clone(),
                _ => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    *slot = Some(rx.clone());
                    let link = self.link.clone();
                    let recent = self.recent_wakes.clone();
                    let entry = entry.clone();
                    let handles = entry
                        .metrics
                        .get_or_init(|| self.metrics.service(Some(&entry.id.service)))
                        .clone();
                    tokio::spawn(async move {
                        let began = Instant::now();
                        let result = link.wake(&entry.id, deadline).await;
                        handles.wake(result.is_ok(), began.elapsed());
                        recent.record(&entry.id, result.is_ok(), began.elapsed());
                        if let Ok(route) = &result {
                            entry.set_route(route.clone());
                            // The supervisor says it runs: any park it asked for is over.
                            entry.unpark();
                        }
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let waiting = crate::metrics::Held::new(self.metrics.waiting_for_wake.clone());
        let outcome = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
        drop(waiting);
        match outcome {
            Ok(Ok(value)) => value
                .clone()
                .unwrap_or_else(|| Err(ProxyError::WakeFailed("no outcome".to_owned()))),
            Ok(Err(_)) => Err(ProxyError::WakeFailed("wake task ended".to_owned())),
            Err(_) => Err(ProxyError::WakeFailed("wake deadline passed".to_owned())),
        }
    }

    async fn forward<B>(
        &self,
        request: Request<B>,
        entry: Arc<Entry>,
        peer: Peer,
        raw_host: String,
        deadline: Instant,
        settings: &Settings,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let max_body = settings
            .services
            .get(&entry.id.service)
            .map_or(u64::MAX, |p| p.max_body);
        // A target the instance may not get is refused before anything wakes it.
        crate::head::check_target(request.method(), request.uri())?;
        // Entered while the request is still whole: on a fleet host the tenant may have moved
        // to another host a moment ago (the wake is refused as not placed here), and the
        // request then goes there instead.
        let (mut guard, mut route) = match self.enter(&entry, deadline).await {
            Ok(entered) => entered,
            Err(ProxyError::NotPlacedHere(_)) if !peer.via_fleet && self.fleet.is_some() => {
                return Box::pin(
                    self.moved_away(request, &entry.id, peer, &raw_host, deadline, settings),
                )
                .await;
            }
            Err(e) => return Err(e),
        };
        let (mut parts, body) = request.into_parts();
        let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let client_http1 = parts.version < http::Version::HTTP_2;
        rewrite_head(&mut parts, peer, &raw_host, &settings.trusted_proxies)?;
        let body: ProxyBody = if max_body == u64::MAX {
            body.map_err(Into::into).boxed()
        } else {
            Limited::new(body, max_body as usize).boxed()
        };
        // A bodyless GET or HEAD can be sent again if a kept-alive connection turns out dead
        // after the request left (the instance stopped or restarted meanwhile): nothing of it
        // reached an app that answered.
        let resendable = (parts.method == http::Method::GET || parts.method == http::Method::HEAD)
            && body.is_end_stream();
        let progress = Progress::new(client_http1);
        let max_upstream = settings
            .services
            .get(&entry.id.service)
            .map_or(256, |p| p.max_upstream);
        let metrics = entry
            .metrics
            .get_or_init(|| self.metrics.service(Some(&entry.id.service)))
            .clone();
        let body = RequestBody::new(body, progress.clone(), metrics.clone()).boxed();
        let mut upstream_request = Request::from_parts(parts, body);

        let mut resent = false;
        let (response, key, connection) = loop {
            let key = PoolKey {
                address: route.address.clone(),
                generation: route.generation,
                owner_uid: route.owner_uid,
                instance: entry.id.clone(),
            };
            // After one kept-alive connection turned out dead, its siblings in the pool are as
            // suspect (the process behind them is likely gone): the resend uses a new one, which
            // a dead instance refuses, and that leads to a wake.
            let checkout = self
                .pool
                .checkout(
                    &key,
                    route.backlog,
                    max_upstream,
                    resent,
                    deadline,
                    settings.connect_timeout,
                )
                .await;
            let (mut connection, reused) = match checkout {
                Ok(found) => found,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(ProxyError::Busy(format!("{}: {e}", entry.id)));
                }
                Err(e) => {
                    // The instance stopped or crashed and nothing was sent: wake it and try
                    // again. The supervisor may not have reaped the old process yet and
                    // answer with the same route; keep trying until the deadline.
                    if Instant::now() >= deadline {
                        return Err(ProxyError::Upstream(format!(
                            "connect to {}: {e}",
                            entry.id
                        )));
                    }
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        tracing::warn!(
                            target: "tenement::security",
                            instance = %entry.id,
                            "security: {e}; nothing sent, waking {} again",
                            entry.id
                        );
                    } else {
                        tracing::debug!(instance = %entry.id, "connect failed ({e}); waking and retrying");
                    }
                    drop(guard);
                    let refused_generation = route.generation;
                    entry.set_route(RouteInfo {
                        state: InstanceState::Stopped,
                        ..route
                    });
                    (guard, route) = self.enter(&entry, deadline).await?;
                    if route.generation == refused_generation {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    continue;
                }
            };
            // Only a request on a kept-alive connection may need a second try: copy its head
            // then, not on every request.
            let saved = (resendable && reused && !resent).then(|| {
                (
                    upstream_request.method().clone(),
                    upstream_request.uri().clone(),
                    upstream_request.headers().clone(),
                )
            });
            let attempt = tokio::time::timeout(
                settings.response_timeout,
                connection.send.try_send_request(upstream_request),
            )
            .await;
            match attempt {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Ok(response)) => {
                    connection.answered();
                    break (response, key, connection);
                }
                Ok(Err(mut error)) => match error.take_message() {
                    // The connection was closed before the request went out: it comes back
                    // untouched and goes out on another one.
                    Some(request) => upstream_request = request,
                    None => {
                        let error = error.into_error();
                        if source_is::<http_body_util::LengthLimitError>(&error) {
                            return Err(ProxyError::BodyTooLarge);
                        }
                        if progress.client_failed() {
                            return Err(ProxyError::BadBody(error.to_string()));
                        }
                        match saved {
                            Some((method, uri, headers)) => {
                                resent = true;
                                let mut again = Request::new(full(Bytes::new()));
                                *again.method_mut() = method;
                                *again.uri_mut() = uri;
                                *again.headers_mut() = headers;
                                upstream_request = again;
                            }
                            None => {
                                return Err(ProxyError::Upstream(format!("{}: {error}", entry.id)))
                            }
                        }
                    }
                },
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(switch_protocols(
                &self.upgraded,
                response,
                client_upgrade,
                guard,
                metrics,
            ));
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if parts.status.is_success() || parts.status.is_redirection() {
            entry.note_success();
        } else if parts.status.is_server_error() {
            entry.note_server_error();
        }
        if progress.answered_early() {
            // The instance answered before the request body was all out (and may have closed
            // the connection): relay the answer; this client connection ends after it.
            tracing::debug!(instance = %entry.id, status = %parts.status, "early answer");
            if client_http1 {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        let body = ResponseBody::new(
            body,
            guard,
            self.pool.clone(),
            key,
            connection,
            progress,
            metrics,
        );
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// Where a request is going, before anything else is read of it: CONNECT is refused (405);
/// the authority is the target's (HTTP/2, absolute-form) or the one Host header's, the two
/// agreeing when both are there; and the target is what that authority names among
/// `domains`. Also the entry of the `http_head` fuzz target.
pub fn request_target<B>(
    request: &Request<B>,
    domains: &[String],
) -> Result<(Option<String>, Target), ProxyError> {
    if request.method() == http::Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    let raw_host = host::authority_of(
        request.uri().authority().map(|a| a.as_str()),
        request
            .headers()
            .get_all(header::HOST)
            .iter()
            .map(HeaderValue::as_bytes),
    )?
    .map(str::to_owned);
    let target = host::target_of(raw_host.as_deref(), domains)?;
    Ok((raw_host, target))
}

/// 308: the same request again at `location` (method and body kept, unlike 301).
fn redirect(location: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(format!("moved to {location}\n")));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::try_from(location) {
        headers.insert(header::LOCATION, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Adds `Strict-Transport-Security` unless the app set its own.
fn with_hsts(mut response: Response<ProxyBody>, hsts: Option<HeaderValue>) -> Response<ProxyBody> {
    if let Some(value) = hsts {
        response
            .headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert(value);
    }
    response
}

fn source_is<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Relays a 101 answer and splices the two upgraded connections; the instance counts as busy
/// until both directions have closed.
/// `guard` is held until then (the instance's in-flight count, or nothing for a request
/// handed to another fleet host).
pub(crate) fn switch_protocols<G: Send + 'static>(
    upgraded: &tokio_util::task::TaskTracker,
    mut response: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    guard: G,
    metrics: Arc<ServiceHandles>,
) -> Response<ProxyBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let (parts, _) = response.into_parts();
    if let Some(client_upgrade) = client_upgrade {
        upgraded.spawn(async move {
            let _guard = guard;
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = hyper_util::rt::TokioIo::new(client);
                    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        Ok((received, sent)) => {
                            metrics.received(received);
                            metrics.sent(sent);
                        }
                        Err(e) => tracing::debug!("upgraded connection ended: {e}"),
                    }
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    Response::from_parts(parts, full(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns.
    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_request_future_leaves_the_rare_paths_boxed() {
        // hyper keeps room for one request future in every HTTP/1 client connection for the
        // connection's whole life (`Box<Option<Future>>`), idle or not: this is memory per
        // connection. Unboxed, the API's and the dashboard's futures made it 4.6 KiB.
        let size = future_size(Proxy::handle);
        assert!(size < 4096, "Proxy::handle's future is {size} bytes");
    }
}
