//! Target `http_head`: a client's bytes, as they arrive on a connection, through the proxy's
//! HTTP server ([`tenement_proxy::server::connection_builder`], HTTP/1 and, after the preface,
//! HTTP/2) into a service that does what the request path does before it forwards: refuse
//! CONNECT, take the one authority and route by it ([`forward::request_target`], the
//! proxy's own), refuse a declared body over the service's limit
//! ([`forward::check_body_size`], 413), read the body within that limit, rewrite the head
//! ([`forward::rewrite_head`]), then answer 200 instead of forwarding.
//!
//! Invariants on every rewritten head (checked for an untrusted IPv4 peer, an untrusted IPv6
//! peer, a trusted proxy, and a tenant's connection from the trusted proxy's address, which
//! must be treated as untrusted):
//! - no hop-by-hop header: `connection` and `upgrade` only for an upgrade (and then
//!   `connection: upgrade` exactly; an upgrade written in text keeps them), never keep-alive,
//!   proxy-connection, te, trailer, transfer-encoding, proxy-authorization,
//!   proxy-authenticate, nor any header the client's Connection header named (read as bytes,
//!   as a recipient would), except those the proxy sets itself;
//! - untrusted peer: X-Forwarded-For and X-Real-IP are exactly the peer's IP,
//!   X-Forwarded-Proto the listener's scheme, and Forwarded has exactly one element, whose
//!   `for=` is the peer;
//! - trusted peer: X-Forwarded-For and Forwarded end with this hop;
//! - exactly one Host header, naming the host that was routed;
//! - the target is origin-form (`*` only for OPTIONS), the version HTTP/1.1;
//! - a 413 from `check_body_size` means a declared Content-Length over the limit.
//!
//! The connection is served as the proxy's accept loop serves it: only once the first bytes
//! tell HTTP/1 from HTTP/2. On the connection: an HTTP/1 head over [`MAX_HEADER_BYTES`] that is otherwise valid so far
//! is answered 431; nothing panics, in the connection or in any task it spawns; the connection
//! ends by itself (answered, refused or timed out) once the client has sent everything.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tenement_proxy::forward::{self, Peer};
use tenement_proxy::host::Target;
use tenement_proxy::respond::{error_response, full, ProxyBody, ProxyError};
use tenement_proxy::server::{connection_builder, MAX_HEADER_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::known;

/// The HTTP/2 connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Services the fuzzed proxy knows, with their `max_body_size`.
const SERVICES: &[(&str, u64)] = &[("notes", 1 << 20), ("files", 16)];

const TRUSTED: &[&str] = &["192.0.2.1", "2001:db8::1"];

/// The peers every routed head is rewritten for: (address, whether the connection's socket
/// belongs to a tenant's uid, whether the proxy must trust it).
const PEERS: &[(&str, bool, bool)] = &[
    ("203.0.113.7:40000", false, false),
    ("[2001:db8::7]:40000", false, false),
    // Accepted on a dual-stack socket: the proxy must see the IPv4 address inside.
    ("[::ffff:192.0.2.1]:40000", false, true),
    // A tenant's process on a trusted address is never a trusted proxy.
    ("192.0.2.1:40000", true, false),
];

/// Headers the proxy sets itself, so a client's Connection header naming one does not make it
/// a leak.
const SET_BY_PROXY: &[&str] = &[
    "host",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

const ALWAYS_HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
];

/// How long, on the paused clock, a connection may stay open after the client sent its last
/// byte. The proxy's header timeout is 15 s and its HTTP/2 pings give up after 40 s.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(300);

/// How long the service waits for a request body, like the proxy's upstream response timeout.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs `future` on this thread's runtime: current-thread, its clock paused (timers fire as
/// soon as nothing else can run), created on first use. Under AFL++ there is one thread, so
/// one runtime per process; `cargo test` threads get one each, so one test's tasks never run
/// on another's thread.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: Runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => panic!("cannot build the fuzzing runtime: {e}"),
        };
    }
    RUNTIME.with(|runtime| runtime.block_on(future))
}

thread_local! {
    /// Panics on this thread, counted, so a panic that tokio catches in a spawned task (hyper's
    /// HTTP/2 streams run on this thread's runtime) still fails the check. Under AFL++ the
    /// hook this count is kept by aborts first.
    static PANICS: Cell<usize> = const { Cell::new(0) };
}

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

/// What the service saw on one connection.
#[derive(Default)]
struct Seen {
    violations: Mutex<Vec<String>>,
}

impl Seen {
    fn violation(&self, text: String) {
        match self.violations.lock() {
            Ok(mut v) => v.push(text),
            Err(poisoned) => poisoned.into_inner().push(text),
        }
    }
}

pub fn check(data: &[u8]) {
    count_panics();
    let panics_before = PANICS.with(Cell::get);
    let seen = Arc::new(Seen::default());
    let (output, ended) = block_on(serve(data, seen.clone()));
    if std::env::var_os("TENEMENT_FUZZ_TRACE").is_some() {
        eprintln!("output: {:?}", String::from_utf8_lossy(&output));
    }
    let mut violations = match seen.violations.lock() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    if !ended {
        violations.push(format!(
            "the connection was still open {CONNECTION_DEADLINE:?} after the client's last byte"
        ));
    }
    if expects_431(data) && !output.starts_with(b"HTTP/1.1 431 ") {
        violations.push(format!(
            "a {}-byte head got {:?} instead of 431",
            data.len(),
            String::from_utf8_lossy(&output[..output.len().min(40)])
        ));
    }
    let panics = PANICS.with(Cell::get) - panics_before;
    if panics > 0 {
        violations.push(format!("{panics} panic(s) while serving the connection"));
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Serves one connection whose client sends `data` and then only reads; returns what the
/// client got and whether the server ended the connection by itself.
async fn serve(data: &[u8], seen: Arc<Seen>) -> (Vec<u8>, bool) {
    // The proxy's accept loop (`main.rs`) serves a connection only once
    // `server::first_bytes` can tell HTTP/1 from HTTP/2, within its header timeout: a client
    // that stops inside the preface (or sends nothing) is dropped unserved, because hyper-util's
    // own sniff has no deadline. `first_bytes` peeks a TCP socket, so it is mirrored here.
    if PREFACE.starts_with(data) {
        return (Vec::new(), true);
    }
    let (client, server) = tokio::io::duplex(64 * 1024);
    let service = hyper::service::service_fn(move |request| handle(request, seen.clone()));
    let builder = connection_builder();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(server), service);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let client = async move {
        // The client sends everything, then reads until the server closes, as a browser does:
        // it never half-closes (the proxy treats an EOF mid-request as an abort). The proxy's
        // own timeouts (header read, HTTP/2 keep-alive pings) end the connection, at once on
        // the paused clock. A write error means the server closed first, which is its right.
        let _ = to_server.write_all(data).await;
        let mut output = Vec::new();
        let _ = from_server.read_to_end(&mut output).await;
        let _ = to_server.shutdown().await;
        output
    };
    let both = async {
        let (_, output) = tokio::join!(connection, client);
        output
    };
    let outcome = tokio::time::timeout(CONNECTION_DEADLINE, both).await;
    // Let the tasks the connection spawned (HTTP/2 streams) finish, so none of them runs, or
    // reports, during the next input.
    for _ in 0..1000 {
        if tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            == 0
        {
            break;
        }
        tokio::task::yield_now().await;
    }
    match outcome {
        Ok(output) => (output, true),
        Err(_) => (Vec::new(), false),
    }
}

/// Whether hyper must answer 431: an HTTP/1 head still incomplete after the largest head
/// allowed, and valid as far as it goes.
fn expects_431(data: &[u8]) -> bool {
    if data.len() < MAX_HEADER_BYTES || data.starts_with(&PREFACE[..PREFACE.len().min(data.len())])
    {
        return false;
    }
    let mut headers = [httparse::EMPTY_HEADER; 100];
    matches!(
        httparse::Request::new(&mut headers).parse(data),
        Ok(httparse::Status::Partial)
    )
}

async fn handle(
    request: Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<ProxyBody>, Infallible> {
    Ok(match route_and_rewrite(request, &seen).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    })
}

/// The request path up to the point where it would forward.
async fn route_and_rewrite(
    request: Request<Incoming>,
    seen: &Seen,
) -> Result<Response<ProxyBody>, ProxyError> {
    if std::env::var_os("TENEMENT_FUZZ_TRACE").is_some() {
        eprintln!("request: {request:?}");
    }
    let (raw_host, target) = forward::request_target(&request, &crate::host::domains())?;
    let service = match target {
        Target::Home => return Ok(Response::new(full("home\n"))),
        Target::NoMatch => return Err(ProxyError::UnknownHost),
        Target::Instance(id) => id.service,
        Target::Service(name) => name,
    };
    let max_body = SERVICES
        .iter()
        .find(|(name, _)| *name == service.as_str())
        .map(|(_, max)| *max)
        .ok_or(ProxyError::UnknownService)?;
    if let Err(error) = forward::check_body_size(&request, max_body) {
        let declared = request
            .headers()
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .filter_map(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .max();
        if declared.is_none_or(|len| len <= max_body) {
            seen.violation(format!(
                "413 without a Content-Length over {max_body}: {:?}",
                request.headers()
            ));
        }
        return Err(error);
    }
    let raw_host = raw_host.unwrap_or_default();
    let (parts, body) = request.into_parts();
    for (peer, tenant, trusted) in PEERS {
        let peer = Peer {
            addr: parse_addr(peer),
            scheme: "http",
            tenant: *tenant,
            via_fleet: false,
        };
        let mut rewritten = copy_head(&parts);
        let trusted_list: Vec<IpAddr> = TRUSTED.iter().map(|ip| parse_ip(ip)).collect();
        // An error means the path made no valid origin-form target: refused, nothing forwarded.
        if forward::rewrite_head(&mut rewritten, peer, &raw_host, &trusted_list).is_err() {
            continue;
        }
        for problem in head_problems(&parts, &rewritten, peer, *trusted, &raw_host) {
            seen.violation(format!(
                "{problem}\n  peer {} (tenant: {tenant}), routed host {raw_host:?}\n  client head: {} {} {:?} {:?}\n  rewritten: {} {} {:?}",
                peer.addr,
                parts.method,
                parts.uri,
                parts.version,
                parts.headers,
                rewritten.method,
                rewritten.uri,
                rewritten.headers
            ));
        }
    }
    // The proxy streams the body to the instance and gives up after its response timeout; here
    // it is read within the same kind of deadline.
    let body = Limited::new(body, max_body as usize).collect();
    match tokio::time::timeout(BODY_DEADLINE, body).await {
        Ok(Ok(_)) => Ok(Response::new(full("ok\n"))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge),
        Ok(Err(_)) => Ok(bad_request()),
        Err(_) => Err(ProxyError::UpstreamTimeout),
    }
}

fn bad_request() -> Response<ProxyBody> {
    let mut response = Response::new(full("bad body\n"));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response
}

fn parse_addr(text: &str) -> SocketAddr {
    match text.parse() {
        Ok(addr) => addr,
        Err(e) => panic!("bad peer address {text}: {e}"),
    }
}

fn parse_ip(text: &str) -> IpAddr {
    match text.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("bad trusted address {text}: {e}"),
    }
}

/// A copy of a request head (`Parts` is not `Clone` because of its extensions).
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// The header names a Connection header lists, read byte by byte as any recipient would (a
/// value that is not visible ASCII still names headers).
fn connection_tokens(headers: &HeaderMap) -> Vec<Vec<u8>> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Every invariant the rewritten head breaks.
fn head_problems(
    client: &http::request::Parts,
    head: &http::request::Parts,
    peer: Peer,
    trusted: bool,
    raw_host: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let tokens = connection_tokens(&client.headers);
    let upgrade =
        client.headers.contains_key(header::UPGRADE) && tokens.iter().any(|t| t == b"upgrade");
    let headers = &head.headers;

    for name in ALWAYS_HOP_BY_HOP {
        if headers.contains_key(*name) {
            problems.push(format!("hop-by-hop header {name} is forwarded"));
        }
    }
    let connection: Vec<_> = headers.get_all(header::CONNECTION).iter().collect();
    let upgrades = headers.get_all(header::UPGRADE).iter().count();
    if !connection.is_empty() || upgrades > 0 {
        if !upgrade || connection.len() != 1 || connection[0] != "upgrade" || upgrades != 1 {
            problems.push(format!(
                "Connection {connection:?} and {upgrades} Upgrade header(s) forwarded ({})",
                if upgrade { "an upgrade" } else { "no upgrade" }
            ));
        }
    } else if upgrade && tokens_are_text(client) {
        // Dropping an upgrade is safe, but one written in plain text must go through.
        problems.push("an upgrade request lost its Connection: upgrade and Upgrade".to_owned());
    }
    for token in &tokens {
        let Ok(name) = HeaderName::from_bytes(token) else {
            continue;
        };
        let kept_for_upgrade = upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if SET_BY_PROXY.contains(&name.as_str()) || kept_for_upgrade {
            continue;
        }
        if headers.contains_key(&name) {
            if known::skipped("http-connection-names-read-as-utf8") && !tokens_are_text(client) {
                continue;
            }
            problems.push(format!(
                "{name} is forwarded although the client's Connection header names it"
            ));
        }
    }

    let ip = peer.addr.ip().to_canonical();
    let xff: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    let forwarded: Vec<_> = headers.get_all("forwarded").iter().collect();
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if trusted {
        if xff.len() != 1 || !xff[0].as_bytes().ends_with(ip.to_string().as_bytes()) {
            problems.push(format!("X-Forwarded-For {xff:?} does not end with {ip}"));
        }
        let last = forwarded
            .first()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| forwarded_elements(v).pop());
        let ends_with_hop = last.as_ref().and_then(|e| param(e, "for")) == Some(node.clone());
        if forwarded.len() != 1
            || !(ends_with_hop || known::skipped("http-forwarded-extends-malformed-chain"))
        {
            problems.push(format!(
                "Forwarded {forwarded:?} does not end with for={node}"
            ));
        }
    } else {
        if xff.len() != 1 || xff[0] != ip.to_string().as_str() {
            problems.push(format!("X-Forwarded-For is {xff:?}, not exactly {ip}"));
        }
        let real: Vec<_> = headers.get_all("x-real-ip").iter().collect();
        if real.len() != 1 || real[0] != ip.to_string().as_str() {
            problems.push(format!("X-Real-IP is {real:?}, not exactly {ip}"));
        }
        let proto: Vec<_> = headers.get_all("x-forwarded-proto").iter().collect();
        if proto.len() != 1 || proto[0] != peer.scheme {
            problems.push(format!(
                "X-Forwarded-Proto is {proto:?}, not {}",
                peer.scheme
            ));
        }
        let elements = match forwarded.as_slice() {
            [one] => one.to_str().map(forwarded_elements).unwrap_or_default(),
            _ => Vec::new(),
        };
        if elements.len() != 1 || param(&elements[0], "for") != Some(node.clone()) {
            problems.push(format!(
                "Forwarded is {forwarded:?}, not one element with for={node}"
            ));
        }
    }

    let hosts: Vec<_> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() != 1 {
        problems.push(format!("{} Host headers: {hosts:?}", hosts.len()));
    } else if hosts[0] != raw_host {
        problems.push(format!(
            "Host {:?} is not the routed host {raw_host:?}",
            hosts[0]
        ));
    }

    let uri = &head.uri;
    let origin_form = uri.scheme().is_none()
        && uri.authority().is_none()
        && uri.path_and_query().is_some_and(|p| {
            p.as_str().starts_with('/')
                || (p.as_str() == "*" && head.method == http::Method::OPTIONS)
        });
    let known_asterisk = uri.path_and_query().is_some_and(|p| p.as_str() == "*")
        && known::skipped("http-asterisk-target-for-non-options");
    if !origin_form && !known_asterisk {
        problems.push(format!("target {uri} is not origin-form"));
    }
    if head.version != http::Version::HTTP_11 {
        problems.push(format!("version {:?} forwarded", head.version));
    }
    problems
}

/// Whether every Connection value of the client is text (what the proxy reads).
fn tokens_are_text(client: &http::request::Parts) -> bool {
    client
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .all(|v| v.to_str().is_ok())
}

/// A Forwarded value's elements (RFC 7239, 4), split on commas outside quoted strings.
fn forwarded_elements(value: &str) -> Vec<String> {
    split_outside_quotes(value, ',')
}

/// The value of parameter `name` of one Forwarded element, unquoted.
fn param(element: &str, name: &str) -> Option<String> {
    split_outside_quotes(element, ';')
        .into_iter()
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            if !key.trim().eq_ignore_ascii_case(name) {
                return None;
            }
            let value = value.trim();
            Some(
                match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    Some(inner) => unescape(inner),
                    None => value.to_owned(),
                },
            )
        })
}

fn unescape(quoted: &str) -> String {
    let mut out = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

fn split_outside_quotes(value: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            '\\' if quoted => {
                current.push(c);
                current.extend(chars.next());
            }
            c if c == separator && !quoted => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}
