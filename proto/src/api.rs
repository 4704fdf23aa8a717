//! The management API's HTTP shape: which method and path is which RPC call, both ways.
//!
//! The proxy turns an HTTP request into a [`Request`] with [`from_http`] and forwards it with
//! the caller's credential; `tenctl --remote` turns its [`Request`] into HTTP with
//! [`to_http`]. One table serves both, so the two cannot drift apart (a test walks every call
//! there and back). Answers are the RPC [`crate::rpc::Response`] as JSON, errors
//! `{"error": {"code", "message"}}` with the status of [`status_of`]. docs/API.md lists it all.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{Scope, TokenId};
use crate::ids::{InstanceId, ServiceName};
use crate::rpc::{
    ErrorCode, InstanceState, ListQuery, ListSort, Request, RolloutAction, RolloutOptions,
};

/// Where the API lives under `{domain}`.
pub const PREFIX: &str = "/api/v1";
/// The largest request body the API reads.
pub const MAX_BODY: usize = 64 * 1024;
/// A page of `GET /instances` without `limit`.
pub const DEFAULT_PAGE: u32 = 100;

/// One API call as HTTP: method, path under `{domain}`, query pairs (not yet encoded) and a
/// JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    pub method: &'static str,
    pub path: String,
    pub query: Vec<(&'static str, String)>,
    pub body: Option<Value>,
}

/// Why an HTTP request is not an API call: a status, a code for machines, a message for
/// people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", message)
    }

    /// The JSON body: `{"error": {"code": ..., "message": ...}}`.
    pub fn body(&self) -> Value {
        json!({ "error": { "code": self.code, "message": self.message } })
    }
}

/// The HTTP status for a supervisor's error code.
pub fn status_of(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest | ErrorCode::HelloRequired | ErrorCode::UnsupportedVersion => 400,
        ErrorCode::Unauthenticated => 401,
        ErrorCode::Forbidden | ErrorCode::WrongRole | ErrorCode::PermissionDenied => 403,
        ErrorCode::UnknownService | ErrorCode::UnknownInstance => 404,
        ErrorCode::FrameTooLarge => 413,
        ErrorCode::RateLimited => 429,
        ErrorCode::Internal => 500,
        ErrorCode::WakeFailed => 502,
        ErrorCode::InstanceFailed | ErrorCode::Unavailable | ErrorCode::NotPlacedHere => 503,
        ErrorCode::WakeTimeout => 504,
    }
}

fn instance_path(instance: &InstanceId, rest: &str) -> String {
    format!("{PREFIX}/instances/{instance}{rest}")
}

fn service_path(service: &ServiceName, rest: &str) -> String {
    format!("{PREFIX}/services/{service}{rest}")
}

fn call(method: &'static str, path: String) -> HttpCall {
    HttpCall {
        method,
        path,
        query: Vec::new(),
        body: None,
    }
}

fn with_body(mut call: HttpCall, body: Value) -> HttpCall {
    call.body = Some(body);
    call
}

fn rollout_body(options: &RolloutOptions, to: Option<u32>) -> Value {
    let mut body = serde_json::to_value(options).unwrap_or_else(|_| json!({}));
    if let (Some(to), Value::Object(map)) = (to, &mut body) {
        map.insert("to".to_owned(), json!(to));
    }
    body
}

/// The HTTP form of an API call; `None` for calls the API does not offer (the proxy's own
/// plumbing, `authed`, and the dashboard's `login`/`logout`).
pub fn to_http(request: &Request) -> Option<HttpCall> {
    Some(match request {
        Request::Whoami => call("GET", format!("{PREFIX}/whoami")),
        Request::List { query } => {
            let mut c = call("GET", format!("{PREFIX}/instances"));
            if let Some(service) = &query.service {
                c.query.push(("service", service.to_string()));
            }
            if let Some(state) = query.state {
                c.query.push(("state", state.as_str().to_owned()));
            }
            if let Some(search) = &query.search {
                c.query.push(("search", search.clone()));
            }
            if let Some(after) = &query.after {
                c.query.push(("after", after.to_string()));
            }
            if let Some(limit) = query.limit {
                c.query.push(("limit", limit.to_string()));
            }
            if let Some(sort) = query.sort {
                c.query.push(("sort", sort.as_str().to_owned()));
            }
            if let Some(offset) = query.offset {
                c.query.push(("offset", offset.to_string()));
            }
            c
        }
        Request::Add { instances } => with_body(
            call("POST", format!("{PREFIX}/instances")),
            json!({ "instances": instances }),
        ),
        Request::Status { instance } => call("GET", instance_path(instance, "")),
        Request::Remove { instance, purge } => {
            let mut c = call("DELETE", instance_path(instance, ""));
            if *purge {
                c.query.push(("purge", "true".to_owned()));
            }
            c
        }
        Request::Wake {
            instance,
            timeout_ms,
        } => {
            let mut c = call("POST", instance_path(instance, "/wake"));
            if let Some(ms) = timeout_ms {
                c.query.push(("timeout_ms", ms.to_string()));
            }
            c
        }
        Request::Spawn { instance } => call("POST", instance_path(instance, "/spawn")),
        Request::Stop { instance } => call("POST", instance_path(instance, "/stop")),
        Request::Restart { instance } => call("POST", instance_path(instance, "/restart")),
        Request::Logs {
            instance,
            lines,
            follow,
        } => {
            let mut c = call("GET", instance_path(instance, "/logs"));
            if let Some(lines) = lines {
                c.query.push(("lines", lines.to_string()));
            }
            if *follow {
                c.query.push(("follow", "true".to_owned()));
            }
            c
        }
        Request::Weight { instance, weight } => with_body(
            call("PUT", instance_path(instance, "/weight")),
            json!({ "weight": weight }),
        ),
        Request::Deploy {
            instance,
            weight,
            timeout_ms,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(weight) = weight {
                body.insert("weight".to_owned(), json!(weight));
            }
            if let Some(ms) = timeout_ms {
                body.insert("timeout_ms".to_owned(), json!(ms));
            }
            with_body(
                call("POST", instance_path(instance, "/deploy")),
                Value::Object(body),
            )
        }
        Request::Pin {
            instance,
            release: Some(release),
        } => with_body(
            call("PUT", instance_path(instance, "/pin")),
            json!({ "release": release }),
        ),
        Request::Pin {
            instance,
            release: None,
        } => call("DELETE", instance_path(instance, "/pin")),
        Request::Route { from, to } => with_body(
            call("POST", format!("{PREFIX}/route")),
            json!({ "from": from, "to": to }),
        ),
        Request::Reload => call("POST", format!("{PREFIX}/reload")),
        Request::Releases { service } => call("GET", service_path(service, "/releases")),
        Request::Release { service, options } => with_body(
            call("POST", service_path(service, "/releases")),
            rollout_body(options, None),
        ),
        Request::Rollout {
            service,
            action: RolloutAction::Status,
        } => call("GET", service_path(service, "/rollout")),
        Request::Rollout { service, action } => {
            let verb = match action {
                RolloutAction::Pause => "pause",
                RolloutAction::Resume => "resume",
                RolloutAction::Abort | RolloutAction::Status => "abort",
            };
            call("POST", service_path(service, &format!("/rollout/{verb}")))
        }
        Request::Rollback {
            service,
            to,
            options,
        } => with_body(
            call("POST", service_path(service, "/rollback")),
            rollout_body(options, *to),
        ),
        Request::TokenList => call("GET", format!("{PREFIX}/tokens")),
        Request::TokenCreate {
            scope,
            read_only,
            lifetime_s,
            name,
        } => with_body(
            call("POST", format!("{PREFIX}/tokens")),
            serde_json::to_value(TokenBody {
                scope: scope.clone(),
                read_only: *read_only,
                lifetime_s: *lifetime_s,
                name: name.clone(),
            })
            .unwrap_or_else(|_| json!({})),
        ),
        Request::TokenRemove { id } => call("DELETE", format!("{PREFIX}/tokens/{id}")),
        Request::FleetHosts => call("GET", format!("{PREFIX}/fleet/hosts")),
        Request::FleetDrain { host, drain } => call(
            if *drain { "PUT" } else { "DELETE" },
            format!("{PREFIX}/fleet/hosts/{host}/drain"),
        ),
        Request::Hello { .. }
        | Request::Resolve { .. }
        | Request::Subscribe
        | Request::Activity { .. }
        | Request::ParkAck { .. }
        | Request::Stats { .. }
        | Request::FleetOwn { .. }
        | Request::Authed { .. }
        | Request::Login
        | Request::Logout => return None,
    })
}

/// `request` sent as HTTP and read back, as `tenctl --remote` and the proxy do: `None` when
/// the API does not offer it. The tests and the `api_request` fuzz target hold it equal.
pub fn round_trip(request: &Request) -> Option<Result<Request, ApiError>> {
    let http = to_http(request)?;
    let query: Vec<(String, String)> = http
        .query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let body = http.body.map(|b| b.to_string()).unwrap_or_default();
    Some(from_http(http.method, &http.path, &query, body.as_bytes()))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    scope: Scope,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lifetime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    instances: Vec<InstanceId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    release: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteBody {
    from: InstanceId,
    to: InstanceId,
}

/// Not `deny_unknown_fields` (serde cannot with `flatten`): [`rollout_keys`] checks instead.
#[derive(Deserialize, Default)]
struct RollbackBody {
    #[serde(default)]
    to: Option<u32>,
    #[serde(flatten)]
    options: RolloutOptions,
}

/// `text` as one line of at most 200 characters: control characters escaped. Decoding
/// errors quote what the client sent, newlines included.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

fn bad_json(e: &serde_json::Error) -> ApiError {
    ApiError::bad(format!("bad JSON body: {}", one_line(&e.to_string())))
}

/// A JSON body as `T`; an empty body is `T::default()` where `empty` allows it.
fn body<T: DeserializeOwned>(bytes: &[u8], empty: Option<T>) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return empty.ok_or_else(|| ApiError::bad("this call needs a JSON body"));
    }
    serde_json::from_slice(bytes).map_err(|e| bad_json(&e))
}

/// Refuses a rollout body with a key [`RolloutOptions`] (and `to`, where `with_to`) does
/// not have, so a typo is an error rather than a default.
fn rollout_keys(bytes: &[u8], with_to: bool) -> Result<(), ApiError> {
    const KEYS: [&str; 5] = [
        "canary",
        "canary_percent",
        "steps",
        "max_unavailable",
        "bake_ms",
    ];
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let map: serde_json::Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| bad_json(&e))?;
    match map
        .keys()
        .find(|k| !(KEYS.contains(&k.as_str()) || (with_to && k.as_str() == "to")))
    {
        Some(key) => Err(ApiError::bad(format!(
            "unknown field {:?}; a rollout takes {}{}",
            key.chars().take(40).collect::<String>(),
            KEYS.join(", "),
            if with_to { ", to" } else { "" }
        ))),
        None => Ok(()),
    }
}

fn instance(text: &str) -> Result<InstanceId, ApiError> {
    InstanceId::parse(text).map_err(|e| ApiError::bad(e.to_string()))
}

fn service(text: &str) -> Result<ServiceName, ApiError> {
    ServiceName::new(text).map_err(|e| ApiError::bad(e.to_string()))
}

/// The query pairs a route reads; any other is refused, so a typo is an error.
struct Query<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Query<'a> {
    fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            Some((k, _)) => Err(ApiError::bad(format!(
                "unknown query parameter {:?}{}",
                k.chars().take(40).collect::<String>(),
                if allowed.is_empty() {
                    String::new()
                } else {
                    format!("; this call takes {}", allowed.join(", "))
                }
            ))),
            None => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad(format!("{key} must be a whole number")))
            })
            .transpose()
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false" | "0") => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some(_) => Err(ApiError::bad(format!("{key} is true or false"))),
        }
    }
}

fn list_query(q: &Query<'_>) -> Result<ListQuery, ApiError> {
    q.only(&[
        "service", "state", "search", "after", "limit", "sort", "offset",
    ])?;
    let sort = match q.get("sort") {
        None => None,
        Some(text) => Some(
            ListSort::ALL
                .into_iter()
                .find(|s| s.as_str() == text)
                .ok_or_else(|| ApiError::bad("sort is one of id, state, restarts, active"))?,
        ),
    };
    let state = match q.get("state") {
        None => None,
        Some(text) => Some(
            serde_json::from_value::<InstanceState>(Value::String(text.to_owned())).map_err(
                |_| {
                    ApiError::bad(
                        "state is one of stopped, starting, running, stopping, unhealthy, failed",
                    )
                },
            )?,
        ),
    };
    let search = q.get("search").map(str::to_owned);
    if search.as_ref().is_some_and(|s| s.len() > 63) {
        return Err(ApiError::bad("search is at most 63 characters"));
    }
    Ok(ListQuery {
        service: q.get("service").map(service).transpose()?,
        state,
        search,
        after: q.get("after").map(instance).transpose()?,
        limit: Some(q.number("limit")?.unwrap_or(DEFAULT_PAGE)),
        sort,
        offset: q.number("offset")?,
    })
}

/// The RPC call for an HTTP request to the API: `path` is the request's path (with
/// [`PREFIX`]), `query` its decoded query pairs.
pub fn from_http(
    method: &str,
    path: &str,
    query: &[(String, String)],
    bytes: &[u8],
) -> Result<Request, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "not_found",
            format!(
                "no API call at {} (see docs/API.md)",
                one_line(&path.chars().take(80).collect::<String>())
            ),
        )
    };
    let rest = path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let q = Query { pairs: query };
    let wrong_method = |allowed: &str| {
        ApiError::new(
            405,
            "method_not_allowed",
            format!(
                "{} is not allowed here; use {allowed}",
                one_line(&method.chars().take(20).collect::<String>())
            ),
        )
    };
    let request = match segments.as_slice() {
        ["whoami"] => match method {
            "GET" => Request::Whoami,
            _ => return Err(wrong_method("GET")),
        },
        ["instances"] => match method {
            "GET" => Request::List {
                query: list_query(&q)?,
            },
            "POST" => Request::Add {
                instances: body::<AddBody>(bytes, None)?.instances,
            },
            _ => return Err(wrong_method("GET or POST")),
        },
        ["instances", id] => {
            let instance = instance(id)?;
            match method {
                "GET" => Request::Status { instance },
                "DELETE" => {
                    q.only(&["purge"])?;
                    Request::Remove {
                        instance,
                        purge: q.flag("purge")?,
                    }
                }
                _ => return Err(wrong_method("GET or DELETE")),
            }
        }
        ["instances", id, verb] => {
            let instance = instance(id)?;
            match (*verb, method) {
                ("wake", "POST") => {
                    q.only(&["timeout_ms"])?;
                    Request::Wake {
                        instance,
                        timeout_ms: q.number("timeout_ms")?,
                    }
                }
                ("spawn", "POST") => Request::Spawn { instance },
                ("stop", "POST") => Request::Stop { instance },
                ("restart", "POST") => Request::Restart { instance },
                ("logs", "GET") => {
                    q.only(&["lines", "follow", "search"])?;
                    Request::Logs {
                        instance,
                        lines: q.number("lines")?,
                        follow: q.flag("follow")?,
                    }
                }
                ("weight", "PUT") => Request::Weight {
                    instance,
                    weight: body::<WeightBody>(bytes, None)?.weight,
                },
                ("deploy", "POST") => {
                    let b = body::<DeployBody>(bytes, Some(DeployBody::default()))?;
                    Request::Deploy {
                        instance,
                        weight: b.weight,
                        timeout_ms: b.timeout_ms,
                    }
                }
                ("pin", "PUT") => Request::Pin {
                    instance,
                    release: Some(body::<PinBody>(bytes, None)?.release),
                },
                ("pin", "DELETE") => Request::Pin {
                    instance,
                    release: None,
                },
                ("wake" | "spawn" | "stop" | "restart" | "deploy", _) => {
                    return Err(wrong_method("POST"))
                }
                ("logs", _) => return Err(wrong_method("GET")),
                ("weight", _) => return Err(wrong_method("PUT")),
                ("pin", _) => return Err(wrong_method("PUT or DELETE")),
                _ => return Err(not_found()),
            }
        }
        ["route"] => match method {
            "POST" => {
                let b = body::<RouteBody>(bytes, None)?;
                Request::Route {
                    from: b.from,
                    to: b.to,
                }
            }
            _ => return Err(wrong_method("POST")),
        },
        ["reload"] => match method {
            "POST" => Request::Reload,
            _ => return Err(wrong_method("POST")),
        },
        ["services", name, "releases"] => {
            let service = service(name)?;
            match method {
                "GET" => Request::Releases { service },
                "POST" => {
                    rollout_keys(bytes, false)?;
                    Request::Release {
                        service,
                        options: body(bytes, Some(RolloutOptions::default()))?,
                    }
                }
                _ => return Err(wrong_method("GET or POST")),
            }
        }
        ["services", name, "rollout"] => match method {
            "GET" => Request::Rollout {
                service: service(name)?,
                action: RolloutAction::Status,
            },
            _ => return Err(wrong_method("GET")),
        },
        ["services", name, "rollout", verb] => {
            let service = service(name)?;
            let action = match *verb {
                "pause" => RolloutAction::Pause,
                "resume" => RolloutAction::Resume,
                "abort" => RolloutAction::Abort,
                _ => return Err(not_found()),
            };
            match method {
                "POST" => Request::Rollout { service, action },
                _ => return Err(wrong_method("POST")),
            }
        }
        ["services", name, "rollback"] => match method {
            "POST" => {
                let service = service(name)?;
                rollout_keys(bytes, true)?;
                let b = body::<RollbackBody>(bytes, Some(RollbackBody::default()))?;
                Request::Rollback {
                    service,
                    to: b.to,
                    options: b.options,
                }
            }
            _ => return Err(wrong_method("POST")),
        },
        ["tokens"] => match method {
            "GET" => Request::TokenList,
            "POST" => {
                let b = body::<TokenBody>(bytes, None)?;
                Request::TokenCreate {
                    scope: b.scope,
                    read_only: b.read_only,
                    lifetime_s: b.lifetime_s,
                    name: b.name,
                }
            }
            _ => return Err(wrong_method("GET or POST")),
        },
        ["tokens", id] => match method {
            "DELETE" => Request::TokenRemove {
                id: TokenId::new(id).ok_or_else(|| ApiError::bad("a token id is 16 hex digits"))?,
            },
            _ => return Err(wrong_method("DELETE")),
        },
        ["fleet", "hosts"] => match method {
            "GET" => Request::FleetHosts,
            _ => return Err(wrong_method("GET")),
        },
        ["fleet", "hosts", host, "drain"] => {
            if !crate::config::Fleet::valid_host(host) {
                return Err(ApiError::bad(
                    "a host name is 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
                ));
            }
            let drain = match method {
                "PUT" => true,
                "DELETE" => false,
                _ => return Err(wrong_method("PUT or DELETE")),
            };
            Request::FleetDrain {
                host: (*host).to_owned(),
                drain,
            }
        }
        _ => return Err(not_found()),
    };
    // Query parameters where a route reads none are refused too.
    let reads_query = matches!(
        request,
        Request::List { .. } | Request::Remove { .. } | Request::Wake { .. } | Request::Logs { .. }
    );
    if !reads_query {
        q.only(&[])?;
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> InstanceId {
        InstanceId::parse(text).expect("valid")
    }

    fn there_and_back(request: &Request) -> Request {
        round_trip(request)
            .expect("an API call")
            .unwrap_or_else(|e| panic!("{}: {e:?}", request.name()))
    }

    #[test]
    fn every_api_call_survives_http_both_ways() {
        let notes = ServiceName::new("notes").expect("valid");
        let options = RolloutOptions {
            canary: vec![crate::TenantId::new("alice").expect("valid")],
            canary_percent: None,
            steps: vec![5, 100],
            max_unavailable: Some(2),
            bake_ms: Some(1000),
        };
        let calls = vec![
            Request::Whoami,
            Request::List {
                query: ListQuery {
                    service: Some(notes.clone()),
                    state: Some(InstanceState::Running),
                    search: Some("a b&c=d".to_owned()),
                    after: Some(id("notes:al")),
                    limit: Some(7),
                    sort: Some(ListSort::Restarts),
                    offset: Some(14),
                },
            },
            Request::Add {
                instances: vec![id("notes:a"), id("notes:b")],
            },
            Request::Status {
                instance: id("notes:alice"),
            },
            Request::Remove {
                instance: id("notes:alice"),
                purge: true,
            },
            Request::Remove {
                instance: id("notes:alice"),
                purge: false,
            },
            Request::Wake {
                instance: id("notes:alice"),
                timeout_ms: Some(500),
            },
            Request::Spawn {
                instance: id("notes:alice"),
            },
            Request::Stop {
                instance: id("notes:alice"),
            },
            Request::Restart {
                instance: id("notes:alice"),
            },
            Request::Logs {
                instance: id("notes:alice"),
                lines: Some(20),
                follow: true,
            },
            Request::Weight {
                instance: id("notes:v2"),
                weight: 30,
            },
            Request::Deploy {
                instance: id("notes:v2"),
                weight: Some(50),
                timeout_ms: None,
            },
            Request::Pin {
                instance: id("notes:alice"),
                release: Some(3),
            },
            Request::Pin {
                instance: id("notes:alice"),
                release: None,
            },
            Request::Route {
                from: id("notes:v1"),
                to: id("notes:v2"),
            },
            Request::Reload,
            Request::Releases {
                service: notes.clone(),
            },
            Request::Release {
                service: notes.clone(),
                options: options.clone(),
            },
            Request::Rollout {
                service: notes.clone(),
                action: RolloutAction::Status,
            },
            Request::Rollout {
                service: notes.clone(),
                action: RolloutAction::Pause,
            },
            Request::Rollout {
                service: notes.clone(),
                action: RolloutAction::Resume,
            },
            Request::Rollout {
                service: notes.clone(),
                action: RolloutAction::Abort,
            },
            Request::Rollback {
                service: notes.clone(),
                to: Some(2),
                options,
            },
            Request::TokenList,
            Request::TokenCreate {
                scope: "tenant:notes:alice".parse().expect("scope"),
                read_only: true,
                lifetime_s: Some(60),
                name: Some("ci".to_owned()),
            },
            Request::TokenRemove {
                id: TokenId::new("0123456789abcdef").expect("valid"),
            },
            Request::FleetHosts,
            Request::FleetDrain {
                host: "h2".to_owned(),
                drain: true,
            },
            Request::FleetDrain {
                host: "h2".to_owned(),
                drain: false,
            },
        ];
        for call in calls {
            assert_eq!(there_and_back(&call), call, "{}", call.name());
            assert!(call.api_call());
        }
        // Everything else stays off the API.
        for call in [Request::Subscribe, Request::Login, Request::Logout] {
            assert!(to_http(&call).is_none());
        }
    }

    #[test]
    fn bad_requests_get_a_status_and_a_reason() {
        let none: &[(String, String)] = &[];
        type Case = (
            &'static str,
            &'static str,
            Vec<(String, String)>,
            &'static str,
            u16,
        );
        let cases: Vec<Case> = vec![
            (
                "GET",
                "/api/v1/instances/..%2f..%2fetc:passwd",
                vec![],
                "",
                400,
            ),
            ("GET", "/api/v1/instances/../x", vec![], "", 400),
            (
                "GET",
                "/api/v1/instances/notes:alice/../../tokens",
                vec![],
                "",
                404,
            ),
            ("GET", "/api/v1/instances/notes:ALICE", vec![], "", 400),
            ("PUT", "/api/v1/fleet/hosts/..%2fx/drain", vec![], "", 400),
            ("PUT", "/api/v1/fleet/hosts/H1/drain", vec![], "", 400),
            ("POST", "/api/v1/fleet/hosts/h1/drain", vec![], "", 405),
            ("POST", "/api/v1/fleet/hosts", vec![], "", 405),
            ("GET", "/api/v1/instances/notes", vec![], "", 400),
            ("GET", "/api/v1/nothing", vec![], "", 404),
            ("GET", "/api/v2/instances", vec![], "", 404),
            ("GET", "/api/v1/", vec![], "", 404),
            ("PATCH", "/api/v1/instances/notes:a", vec![], "", 405),
            ("GET", "/api/v1/instances/notes:a/wake", vec![], "", 405),
            ("POST", "/api/v1/instances", vec![], "", 400),
            (
                "POST",
                "/api/v1/instances",
                vec![],
                "{\"instances\":[\"x\"]}",
                400,
            ),
            (
                "POST",
                "/api/v1/instances",
                vec![],
                "{\"instance\":[]}",
                400,
            ),
            (
                "PUT",
                "/api/v1/instances/notes:a/weight",
                vec![],
                "{\"weight\":\"x\"}",
                400,
            ),
            (
                "POST",
                "/api/v1/tokens",
                vec![],
                "{\"scope\":\"root\"}",
                400,
            ),
            ("DELETE", "/api/v1/tokens/xyz", vec![], "", 400),
            (
                "POST",
                "/api/v1/services/notes/rollout/explode",
                vec![],
                "",
                404,
            ),
            (
                "POST",
                "/api/v1/services/notes/releases",
                vec![],
                "{\"canery\":[]}",
                400,
            ),
            (
                "POST",
                "/api/v1/services/notes/rollback",
                vec![],
                "{\"too\":1}",
                400,
            ),
            (
                "GET",
                "/api/v1/instances",
                vec![("limit".to_owned(), "many".to_owned())],
                "",
                400,
            ),
            (
                "GET",
                "/api/v1/instances",
                vec![("state".to_owned(), "asleep".to_owned())],
                "",
                400,
            ),
            (
                "GET",
                "/api/v1/instances",
                vec![("serivce".to_owned(), "notes".to_owned())],
                "",
                400,
            ),
            (
                "POST",
                "/api/v1/reload",
                vec![("now".to_owned(), "1".to_owned())],
                "",
                400,
            ),
        ];
        for (method, path, query, body, status) in cases {
            let got = from_http(method, path, &query, body.as_bytes());
            match got {
                Err(e) => assert_eq!(e.status, status, "{method} {path}: {e:?}"),
                Ok(request) => panic!("{method} {path} became {request:?}"),
            }
        }
        assert!(from_http("GET", "/api/v1/whoami", none, b"").is_ok());
    }
}
