//! The management API at `{domain}/api/v1/`: HTTP in, one `authed` RPC call out.
//!
//! This module holds no authority. It checks the transport (tokens only over HTTPS, or from
//! loopback), takes the bearer token, turns the request into an RPC call with
//! `tenement_proto::api::from_http` and forwards it with the token and the client's address;
//! the supervisor decides whether the token may make it. Answers are the RPC response as
//! JSON; a log stream with `follow` is Server-Sent Events (`sse.rs`).

pub(crate) mod sse;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tenement_proto::api::{self, ApiError};
use tenement_proto::auth::{self, Secret};
use tenement_proto::frame;
use tenement_proto::rpc::{self, ErrorCode, LogLine};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::forward::{Peer, Proxy, Settings};
use crate::respond::{full, ProxyBody};

/// How long a client has to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a call that only reads.
const READ_DEADLINE: Duration = Duration::from_secs(30);
/// The deadline of a call that may start or stop processes (the supervisor caps a wake at
/// 120 s; a stop waits for the service's `stop_grace`).
const ACT_DEADLINE: Duration = Duration::from_secs(180);

/// Serves one request under `{domain}/api/`. Never fails: errors are JSON answers.
pub async fn serve(
    proxy: &Proxy,
    request: Request<Incoming>,
    peer: Peer,
    settings: &Settings,
) -> Response<ProxyBody> {
    match handle(proxy, request, peer, settings).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

/// The JSON answer for an error, with `WWW-Authenticate` on a 401.
pub fn error_response(e: &ApiError) -> Response<ProxyBody> {
    let mut response = json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.body().to_string(),
    );
    if e.status == 401 {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tenement\""),
        );
    }
    if e.status == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Answers may carry a token's secret (token create) and always carry private data.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Whether a credential may be sent over this request's transport: HTTPS (this proxy's, or
/// a trusted proxy's in front that says so), or plain HTTP from this host.
pub fn transport_allows_credentials(
    headers: &HeaderMap,
    peer: Peer,
    settings: &Settings,
) -> Result<IpAddr, ApiError> {
    let client = crate::head::client_ip(headers, peer, &settings.trusted_proxies);
    let scheme = crate::head::client_scheme(headers, peer, &settings.trusted_proxies);
    if scheme == "https" || client.is_loopback() {
        return Ok(client);
    }
    Err(ApiError::new(
        403,
        "https_required",
        format!(
            "tokens are accepted over HTTPS only (or from this host), and this request came over plain HTTP from {client}; use https:// and revoke a token sent this way (tenctl token rm)"
        ),
    ))
}

/// The bearer token of `Authorization`, refused before any lookup when it is not of the
/// token's form.
fn bearer(headers: &HeaderMap) -> Result<Secret, ApiError> {
    let unauthenticated = |message: &str| ApiError::new(401, "unauthenticated", message);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("this call needs a token: Authorization: Bearer tnm_..."))?;
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let text = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| unauthenticated("the Authorization header must read Bearer TOKEN"))?;
    if auth::split_credential(text).is_none() {
        return Err(unauthenticated(
            "the token is not valid (unknown, revoked or mistyped)",
        ));
    }
    Ok(Secret(text.to_owned()))
}

async fn handle(
    proxy: &Proxy,
    request: Request<Incoming>,
    peer: Peer,
    settings: &Settings,
) -> Result<Response<ProxyBody>, ApiError> {
    let client = transport_allows_credentials(request.headers(), peer, settings)?;
    let credential = bearer(request.headers())?;
    let (parts, body) = request.into_parts();
    let bytes = read_body(body).await?;
    let (call, query) = parse_call(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query(),
        &bytes,
    )?;
    let search = query
        .iter()
        .rev()
        .find(|(k, _)| k == "search")
        .map(|(_, v)| v.clone())
        .filter(|_| matches!(call, rpc::Request::Logs { .. }));
    let follow = matches!(call, rpc::Request::Logs { follow: true, .. });
    let deadline = Instant::now()
        + if call.mutates() {
            ACT_DEADLINE
        } else {
            READ_DEADLINE
        };
    let authed = rpc::Request::Authed {
        credential,
        peer: Some(client),
        call: Box::new(call),
    };
    if follow {
        return sse::follow(proxy, authed, search, deadline).await;
    }
    let answer = exchange(proxy, &authed, deadline).await?;
    let answer = match answer {
        rpc::Response::Logs { lines } => rpc::Response::Logs {
            lines: matching(lines, search.as_deref()),
        },
        other => other,
    };
    let body = serde_json::to_vec(&answer)
        .map_err(|e| ApiError::new(500, "internal", format!("cannot encode the answer: {e}")))?;
    Ok(json_response(StatusCode::OK, body))
}

/// The RPC call of an API request, from its method, path, raw query and body as received,
/// with the query's decoded pairs. What a stranger with anything shaped like a token reaches
/// before the supervisor is asked (the `api_request` fuzz target drives it).
pub fn parse_call(
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<(rpc::Request, Vec<(String, String)>), ApiError> {
    let query: Vec<(String, String)> = query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let call = api::from_http(method, path, &query, body)?;
    Ok((call, query))
}

/// The lines that contain `search` (all of them without one).
fn matching(mut lines: Vec<LogLine>, search: Option<&str>) -> Vec<LogLine> {
    if let Some(search) = search.filter(|s| !s.is_empty()) {
        lines.retain(|l| l.line.contains(search));
    }
    lines
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, api::MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            408,
            "request_timeout",
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            "body_too_large",
            format!("a request body is at most {} bytes", api::MAX_BODY),
        )),
        Ok(Err(_)) => Err(ApiError::new(
            400,
            "bad_request",
            "the request body broke off",
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn unavailable() -> ApiError {
    ApiError::new(503, "unavailable", "the supervisor is not reachable")
}

/// Connections to the supervisor the API and the dashboard may hold at once (calls and log
/// streams together). `proxy.sock` serves 256: the rest stay for the proxy's own wakes, so
/// however many calls and streams token holders open, requests can still wake tenants.
pub const SLOTS: usize = 96;
/// How long a call waits for a slot before it is refused with 503.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection to the supervisor with a call sent on it, and the slot it holds.
pub(crate) struct Open {
    pub stream: UnixStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Takes a slot, connects and sends the call.
pub(crate) async fn open(
    proxy: &Proxy,
    authed: &rpc::Request,
    deadline: Instant,
) -> Result<Open, ApiError> {
    let busy = || {
        ApiError::new(
            503,
            "unavailable",
            "too many management calls and log streams at once; try again shortly",
        )
    };
    let slot = tokio::time::timeout(SLOT_WAIT, proxy.api_slots.clone().acquire_owned())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    let mut stream = proxy
        .link
        .connect(deadline)
        .await
        .map_err(|_| unavailable())?;
    tokio::time::timeout_at(deadline, frame::write_message_async(&mut stream, authed))
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())?;
    Ok(Open {
        stream,
        _slot: slot,
    })
}

/// Reads one answer; an `error` answer becomes the [`ApiError`] of its code.
pub(crate) async fn receive(
    stream: &mut UnixStream,
    deadline: Instant,
) -> Result<rpc::Response, ApiError> {
    let message = tokio::time::timeout_at(deadline, frame::read_message_async(stream))
        .await
        .map_err(|_| ApiError::new(504, "timeout", "the supervisor did not answer in time"))?
        .map_err(|_| unavailable())?;
    match message {
        rpc::Response::Error { code, message } => Err(from_rpc(code, message)),
        other => Ok(other),
    }
}

pub(crate) fn from_rpc(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(api::status_of(code), code.as_str(), message)
}

/// One call and its whole answer (a paged `list` joined into one `instances`).
pub(crate) async fn exchange(
    proxy: &Proxy,
    authed: &rpc::Request,
    deadline: Instant,
) -> Result<rpc::Response, ApiError> {
    let mut open = open(proxy, authed, deadline).await?;
    let stream = &mut open.stream;
    let mut answer = receive(stream, deadline).await?;
    while let rpc::Response::Instances {
        instances,
        more: true,
        ..
    } = &mut answer
    {
        let mut so_far = std::mem::take(instances);
        match receive(stream, deadline).await? {
            rpc::Response::Instances {
                instances,
                more,
                next,
                total,
            } => {
                so_far.extend(instances);
                answer = rpc::Response::Instances {
                    instances: so_far,
                    more,
                    next,
                    total,
                };
            }
            other => {
                return Err(ApiError::new(
                    500,
                    "internal",
                    format!("unexpected answer in a list: {}", other.name()),
                ))
            }
        }
    }
    Ok(answer)
}
