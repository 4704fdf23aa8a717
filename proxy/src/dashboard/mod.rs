//! The dashboard at `{domain}`: server-rendered pages (`pages.rs`, maud), readable without
//! JavaScript, with one small script for live updates (`app.js`).
//!
//! Like the API it holds no authority. Logging in sends the token to the supervisor
//! (`authed` + `login`) and keeps the session it answers with in a cookie (HttpOnly, Secure,
//! SameSite=Strict); every page forwards that session with each call, and the supervisor
//! decides what it shows. Every form carries a CSRF value derived from the session (so a
//! cookie of one session never fits the form of another), and a cross-site `Origin` is
//! refused besides. Without a session, `{domain}` shows the login page and nothing else.

mod pages;

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tenement_proto::api::ApiError;
use tenement_proto::auth::{self, Scope, Secret, TokenInfo};
use tenement_proto::rpc::{self, InstanceInfo, InstanceState, ListQuery, ListSort};
use tenement_proto::{InstanceId, ServiceName};
use tokio::time::Instant;

use crate::forward::{Peer, Proxy, Settings};
use crate::respond::{full, ProxyBody};

const SESSION_COOKIE: &str = "tenement_session";
/// The login form's own CSRF value (double-submitted: cookie and field).
const LOGIN_COOKIE: &str = "tenement_login";
/// Rows of the tenants page.
pub const PAGE_ROWS: u32 = 50;
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
const ACT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(180);

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("app.js");

/// What a logged-in page knows about its viewer.
pub struct Viewer {
    pub session: Secret,
    pub token: TokenInfo,
    pub csrf: String,
}

impl Viewer {
    pub fn scope(&self) -> &Scope {
        &self.token.scope
    }

    /// The services this viewer may look at, of those configured.
    pub fn services(&self, settings: &Settings) -> Vec<ServiceName> {
        let mut all: Vec<ServiceName> = settings.services.keys().cloned().collect();
        all.sort();
        all.retain(|s| match self.scope() {
            Scope::Admin => true,
            Scope::Service(own) => own == s,
            Scope::Tenant(_) => false,
        });
        all
    }
}

/// The CSRF value of a session: a hash of it, so it proves the form came from a page of
/// that session and says nothing about the session itself.
fn csrf_of(session: &Secret) -> String {
    let digest = Sha256::digest(format!("tenement-csrf:{}", session.0).as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn random_hex(bytes: usize) -> Option<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).ok()?;
    Some(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Security headers of every dashboard answer: nothing but this origin's own script and
/// style, no framing, no caching of private pages.
fn secure(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn html(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn with_cookie(mut response: Response<ProxyBody>, cookie: &str) -> Response<ProxyBody> {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn session_cookie(session: &Secret, max_age_s: u64) -> String {
    format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_s}",
        session.0
    )
}

fn clear_session_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

fn asset(body: &'static str, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    response
}

/// A dashboard error page, or JSON for the script's calls.
fn failure(e: &ApiError, json: bool, viewer: Option<&Viewer>) -> Response<ProxyBody> {
    if json {
        return crate::api::error_response(e);
    }
    html(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        pages::error(viewer, e),
    )
}

/// Serves one request at `{domain}` outside `/api/`. Never fails.
pub async fn serve(
    proxy: &Proxy,
    request: Request<Incoming>,
    peer: Peer,
    settings: &Settings,
) -> Response<ProxyBody> {
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/static/style.css") => return asset(STYLE, "text/css; charset=utf-8"),
        (&Method::GET, "/static/app.js") => return asset(SCRIPT, "text/javascript; charset=utf-8"),
        _ => {}
    }
    secure(route(proxy, request, peer, settings, &path).await)
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A cross-site form post: an `Origin` that is not this host's.
fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
    !origin_host.eq_ignore_ascii_case(host)
}

async fn route(
    proxy: &Proxy,
    request: Request<Incoming>,
    peer: Peer,
    settings: &Settings,
    path: &str,
) -> Response<ProxyBody> {
    let json = wants_json(request.headers());
    let transport = crate::api::transport_allows_credentials(request.headers(), peer, settings);
    if request.method() == Method::POST && foreign_origin(request.headers()) {
        let e = ApiError::new(403, "csrf", "a form from another site is refused");
        return failure(&e, json, None);
    }
    match (request.method(), path) {
        (&Method::GET, "/login") => return login_page(request.headers(), None, &transport),
        (&Method::POST, "/login") => return login(proxy, request, transport).await,
        _ => {}
    }
    // Everything else needs a session.
    let Some(session) = cookie(request.headers(), SESSION_COOKIE)
        .filter(|v| auth::split_credential(v).is_some())
        .map(|v| Secret(v.to_owned()))
    else {
        return match (request.method(), path) {
            (&Method::GET, "/") => login_page(request.headers(), None, &transport),
            _ if json => failure(
                &ApiError::new(401, "unauthenticated", "log in first"),
                true,
                None,
            ),
            _ => redirect("/login"),
        };
    };
    let client = match transport {
        Ok(client) => client,
        Err(e) => return login_page(request.headers(), Some(e.message.clone()), &Err(e)),
    };
    let viewer = match whoami(proxy, &session, client).await {
        Ok(viewer) => viewer,
        Err(e) if e.status == 401 || e.status == 429 => {
            let page = login_page(request.headers(), Some(e.message), &Ok(client));
            return with_cookie(page, &clear_session_cookie());
        }
        Err(e) => return failure(&e, json, None),
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let result = match (request.method(), segments.as_slice()) {
        (&Method::GET, [""]) => overview(proxy, &viewer, client, settings).await,
        (&Method::GET, ["tenants"]) => tenants(proxy, &viewer, client, settings, &request).await,
        (&Method::GET, ["tenants", id]) => tenant(proxy, &viewer, client, id, &request).await,
        (&Method::GET, ["services"]) => services(proxy, &viewer, client, settings).await,
        (&Method::GET, ["ui", "status", id]) => ui_status(proxy, &viewer, client, id).await,
        (&Method::GET, ["ui", "logs", id]) => ui_logs(proxy, &viewer, client, id, &request).await,
        (&Method::POST, ["logout"]) => logout(proxy, &viewer, client, request).await,
        (&Method::POST, ["tenants", id, action]) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            act(proxy, &viewer, client, &id, &action, request, json).await
        }
        _ => Err(ApiError::new(404, "not_found", "no such page")),
    };
    match result {
        Ok(response) => response,
        Err(e) => failure(&e, json, Some(&viewer)),
    }
}

fn login_page(
    headers: &HeaderMap,
    message: Option<String>,
    transport: &Result<IpAddr, ApiError>,
) -> Response<ProxyBody> {
    let message = message.or_else(|| transport.as_ref().err().map(|e| e.message.clone()));
    // Keep the login value of an earlier visit, so two tabs do not undo each other.
    let existing = cookie(headers, LOGIN_COOKIE)
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    let Some(value) = existing.or_else(|| random_hex(16)) else {
        let e = ApiError::new(500, "internal", "no randomness for the login form");
        return failure(&e, false, None);
    };
    let status = if message.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let page = html(status, pages::login(&value, message.as_deref()));
    with_cookie(
        page,
        &format!("{LOGIN_COOKIE}={value}; Path=/login; HttpOnly; Secure; SameSite=Strict"),
    )
}

async fn read_form(body: Incoming) -> Result<Vec<(String, String)>, ApiError> {
    let limited = Limited::new(body, 16 * 1024);
    let bytes =
        match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => {
                return Err(ApiError::new(
                    400,
                    "bad_request",
                    "the form did not arrive whole",
                ))
            }
        };
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn login(
    proxy: &Proxy,
    request: Request<Incoming>,
    transport: Result<IpAddr, ApiError>,
) -> Response<ProxyBody> {
    let headers = request.headers().clone();
    let client = match transport {
        Ok(client) => client,
        Err(e) => return login_page(&headers, Some(e.message.clone()), &Err(e)),
    };
    let form = match read_form(request.into_body()).await {
        Ok(form) => form,
        Err(e) => return login_page(&headers, Some(e.message), &Ok(client)),
    };
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    let sent = field(&form, "csrf").unwrap_or_default();
    if expected.is_empty() || !same(expected, sent) {
        let message = "the login form expired; try again".to_owned();
        return login_page(&headers, Some(message), &Ok(client));
    }
    let token = field(&form, "token").unwrap_or_default().trim();
    if auth::split_credential(token).is_none() || !token.starts_with(auth::TOKEN_PREFIX) {
        let message = "that is not a token (tnm_..., as tenctl token create prints it)".to_owned();
        return login_page(&headers, Some(message), &Ok(client));
    }
    let call = rpc::Request::Authed {
        credential: Secret(token.to_owned()),
        peer: Some(client),
        call: Box::new(rpc::Request::Login),
    };
    let deadline = Instant::now() + CALL_DEADLINE;
    match crate::api::exchange(proxy, &call, deadline).await {
        Ok(rpc::Response::Identity {
            session: Some(session),
            session_expires_ms,
            ..
        }) => {
            let now = crate::recent::now_ms();
            let max_age = session_expires_ms.map_or(3600, |at| at.saturating_sub(now) / 1000);
            with_cookie(redirect("/"), &session_cookie(&session, max_age))
        }
        Ok(other) => {
            let e = ApiError::new(
                500,
                "internal",
                format!("unexpected answer {}", other.name()),
            );
            login_page(&headers, Some(e.message), &Ok(client))
        }
        Err(e) => login_page(&headers, Some(e.message), &Ok(client)),
    }
}

/// One call with the viewer's session.
async fn call(
    proxy: &Proxy,
    session: &Secret,
    client: IpAddr,
    request: rpc::Request,
) -> Result<rpc::Response, ApiError> {
    let deadline = Instant::now()
        + if request.mutates() {
            ACT_DEADLINE
        } else {
            CALL_DEADLINE
        };
    let authed = rpc::Request::Authed {
        credential: session.clone(),
        peer: Some(client),
        call: Box::new(request),
    };
    crate::api::exchange(proxy, &authed, deadline).await
}

fn unexpected(what: &str, answer: &rpc::Response) -> ApiError {
    ApiError::new(
        500,
        "internal",
        format!("unexpected answer to {what}: {}", answer.name()),
    )
}

async fn whoami(proxy: &Proxy, session: &Secret, client: IpAddr) -> Result<Viewer, ApiError> {
    if !session.0.starts_with(auth::SESSION_PREFIX) {
        return Err(ApiError::new(401, "unauthenticated", "log in again"));
    }
    match call(proxy, session, client, rpc::Request::Whoami).await? {
        rpc::Response::Identity { token, .. } => Ok(Viewer {
            csrf: csrf_of(session),
            session: session.clone(),
            token,
        }),
        other => Err(unexpected("whoami", &other)),
    }
}

/// A page of instances.
pub struct Listed {
    pub instances: Vec<InstanceInfo>,
    pub total: u32,
}

async fn list(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    query: ListQuery,
) -> Result<Listed, ApiError> {
    match call(proxy, &viewer.session, client, rpc::Request::List { query }).await? {
        rpc::Response::Instances {
            instances, total, ..
        } => Ok(Listed {
            total: total.unwrap_or(instances.len() as u32),
            instances,
        }),
        other => Err(unexpected("list", &other)),
    }
}

/// What the overview shows.
pub struct Overview {
    pub registered: u32,
    pub by_state: Vec<(InstanceState, u32)>,
    pub wakes: Vec<crate::recent::WakeRecord>,
    pub failed: Vec<InstanceInfo>,
    pub restarted: Vec<InstanceInfo>,
    pub rollouts: Vec<(ServiceName, rpc::RolloutInfo)>,
    /// (name, source, days left), soonest first; admin only.
    pub certificates: Vec<(String, &'static str, i64)>,
}

const STATES: [InstanceState; 6] = [
    InstanceState::Running,
    InstanceState::Starting,
    InstanceState::Unhealthy,
    InstanceState::Stopping,
    InstanceState::Failed,
    InstanceState::Stopped,
];

fn count_query(state: Option<InstanceState>) -> ListQuery {
    ListQuery {
        state,
        limit: Some(1),
        ..ListQuery::default()
    }
}

async fn overview(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    settings: &Settings,
) -> Result<Response<ProxyBody>, ApiError> {
    let registered = list(proxy, viewer, client, count_query(None)).await?.total;
    let mut by_state = Vec::new();
    for state in STATES {
        let n = list(proxy, viewer, client, count_query(Some(state)))
            .await?
            .total;
        by_state.push((state, n));
    }
    let failed = list(
        proxy,
        viewer,
        client,
        ListQuery {
            state: Some(InstanceState::Failed),
            limit: Some(10),
            ..ListQuery::default()
        },
    )
    .await?
    .instances;
    let restarted = list(
        proxy,
        viewer,
        client,
        ListQuery {
            sort: Some(ListSort::Restarts),
            limit: Some(10),
            ..ListQuery::default()
        },
    )
    .await?
    .instances
    .into_iter()
    .filter(|i| i.restarts > 0)
    .collect();
    let scope = viewer.scope().clone();
    let wakes = proxy.recent_wakes.within_window(|id| scope.covers(id));
    let mut rollouts = Vec::new();
    for service in viewer.services(settings) {
        let request = rpc::Request::Releases {
            service: service.clone(),
        };
        if let Ok(rpc::Response::Releases {
            rollout: Some(rollout),
            ..
        }) = call(proxy, &viewer.session, client, request).await
        {
            if rollout.state == "running" || rollout.state == "paused" {
                rollouts.push((service, *rollout));
            }
        }
    }
    let mut certificates = Vec::new();
    if *viewer.scope() == Scope::Admin {
        if let Some((store, _)) = &proxy.https {
            let now_s = (crate::recent::now_ms() / 1000) as i64;
            certificates = store
                .expiries()
                .into_iter()
                .map(|(name, source, at)| (name, source, (at as i64 - now_s) / 86_400))
                .collect();
            certificates.sort_by_key(|c| c.2);
            certificates.truncate(10);
        }
    }
    let overview = Overview {
        registered,
        by_state,
        wakes,
        failed,
        restarted,
        rollouts,
        certificates,
    };
    Ok(html(StatusCode::OK, pages::overview(viewer, &overview)))
}

fn query_pairs<B>(request: &Request<B>) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The tenants page's filters, as the URL gives them.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub search: String,
    pub service: Option<ServiceName>,
    pub state: Option<InstanceState>,
    pub sort: ListSort,
    pub page: u32,
}

fn filters(pairs: &[(String, String)]) -> Result<Filters, ApiError> {
    let bad = |m: &str| ApiError::new(400, "bad_request", m);
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let search = get("search").unwrap_or_default();
    if search.len() > 63 {
        return Err(bad("a search is at most 63 characters"));
    }
    let service = get("service")
        .map(ServiceName::new)
        .transpose()
        .map_err(|e| bad(&e.to_string()))?;
    let state = get("state")
        .map(|s| {
            STATES
                .into_iter()
                .find(|st| st.as_str() == s)
                .ok_or_else(|| bad("no such state"))
        })
        .transpose()?;
    let sort = get("sort")
        .map(|s| {
            ListSort::ALL
                .into_iter()
                .find(|st| st.as_str() == s)
                .ok_or_else(|| bad("no such order"))
        })
        .transpose()?
        .unwrap_or(ListSort::Id);
    let page = get("page")
        .map(|p| p.parse::<u32>().map_err(|_| bad("page is a number")))
        .transpose()?
        .unwrap_or(0)
        .min(100_000);
    Ok(Filters {
        search: search.to_owned(),
        service,
        state,
        sort,
        page,
    })
}

async fn tenants<B>(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    settings: &Settings,
    request: &Request<B>,
) -> Result<Response<ProxyBody>, ApiError> {
    let filters = filters(&query_pairs(request))?;
    let query = ListQuery {
        service: filters.service.clone(),
        state: filters.state,
        search: (!filters.search.is_empty()).then(|| filters.search.clone()),
        after: None,
        limit: Some(PAGE_ROWS),
        sort: Some(filters.sort),
        offset: Some(filters.page.saturating_mul(PAGE_ROWS)),
    };
    let listed = list(proxy, viewer, client, query).await?;
    let services = viewer.services(settings);
    Ok(html(
        StatusCode::OK,
        pages::tenants(viewer, &services, &filters, &listed),
    ))
}

fn instance(id: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(id).map_err(|e| ApiError::new(400, "bad_request", e.to_string()))
}

async fn status(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    id: &InstanceId,
) -> Result<InstanceInfo, ApiError> {
    let request = rpc::Request::Status {
        instance: id.clone(),
    };
    match call(proxy, &viewer.session, client, request).await? {
        rpc::Response::Status { status } => Ok(*status),
        other => Err(unexpected("status", &other)),
    }
}

async fn tenant<B>(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    id: &str,
    request: &Request<B>,
) -> Result<Response<ProxyBody>, ApiError> {
    let id = instance(id)?;
    let info = status(proxy, viewer, client, &id).await?;
    let pairs = query_pairs(request);
    let search = pairs
        .iter()
        .find(|(k, _)| k == "search")
        .map(|(_, v)| v.chars().take(200).collect::<String>())
        .unwrap_or_default();
    let logs = rpc::Request::Logs {
        instance: id.clone(),
        lines: Some(1000),
        follow: false,
    };
    let lines = match call(proxy, &viewer.session, client, logs).await? {
        rpc::Response::Logs { lines } => lines,
        other => return Err(unexpected("logs", &other)),
    };
    let done = pairs
        .iter()
        .find(|(k, _)| k == "done")
        .map(|(_, v)| v.as_str())
        .filter(|v| ["wake", "restart", "stop"].contains(v));
    Ok(html(
        StatusCode::OK,
        pages::tenant(viewer, &info, &lines, &search, done),
    ))
}

async fn services(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    settings: &Settings,
) -> Result<Response<ProxyBody>, ApiError> {
    let mut shown = Vec::new();
    for service in viewer.services(settings) {
        let request = rpc::Request::Releases { service };
        match call(proxy, &viewer.session, client, request).await? {
            rpc::Response::Releases {
                service,
                current,
                releases,
                rollout,
            } => shown.push(pages::ServiceReleases {
                service,
                current,
                releases,
                rollout: rollout.map(|r| *r),
            }),
            other => return Err(unexpected("releases", &other)),
        }
    }
    Ok(html(StatusCode::OK, pages::services(viewer, &shown)))
}

async fn ui_status(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    id: &str,
) -> Result<Response<ProxyBody>, ApiError> {
    let info = status(proxy, viewer, client, &instance(id)?).await?;
    let body =
        serde_json::to_vec(&info).map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn ui_logs<B>(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    id: &str,
    request: &Request<B>,
) -> Result<Response<ProxyBody>, ApiError> {
    let id = instance(id)?;
    let search = query_pairs(request)
        .into_iter()
        .find(|(k, _)| k == "search")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty());
    let authed = rpc::Request::Authed {
        credential: viewer.session.clone(),
        peer: Some(client),
        call: Box::new(rpc::Request::Logs {
            instance: id,
            lines: Some(0),
            follow: true,
        }),
    };
    crate::api::sse::follow(proxy, authed, search, Instant::now() + CALL_DEADLINE).await
}

fn check_csrf(viewer: &Viewer, form: &[(String, String)]) -> Result<(), ApiError> {
    let sent = field(form, "csrf").unwrap_or_default();
    if same(&viewer.csrf, sent) {
        Ok(())
    } else {
        Err(ApiError::new(
            403,
            "csrf",
            "this form is not from a page of this session; reload the page and try again",
        ))
    }
}

async fn logout(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ApiError> {
    let form = read_form(request.into_body()).await?;
    check_csrf(viewer, &form)?;
    call(proxy, &viewer.session, client, rpc::Request::Logout).await?;
    Ok(with_cookie(redirect("/login"), &clear_session_cookie()))
}

async fn act(
    proxy: &Proxy,
    viewer: &Viewer,
    client: IpAddr,
    id: &str,
    action: &str,
    request: Request<Incoming>,
    json: bool,
) -> Result<Response<ProxyBody>, ApiError> {
    let id = instance(id)?;
    let form = read_form(request.into_body()).await?;
    check_csrf(viewer, &form)?;
    let call_of = match action {
        "wake" => rpc::Request::Wake {
            instance: id.clone(),
            timeout_ms: None,
        },
        "restart" => rpc::Request::Restart {
            instance: id.clone(),
        },
        "stop" => rpc::Request::Stop {
            instance: id.clone(),
        },
        _ => return Err(ApiError::new(404, "not_found", "no such action")),
    };
    call(proxy, &viewer.session, client, call_of).await?;
    if json {
        let mut response = Response::new(full(format!("{{\"done\":\"{action}\"}}")));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(response);
    }
    Ok(redirect(&format!("/tenants/{id}?done={action}")))
}
