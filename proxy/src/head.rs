//! The request head an instance gets: a pure rewrite of the client's (origin-form target,
//! exactly one Host, hop-by-hop headers out, forwarding headers set for this hop, client
//! address claims of strangers dropped), and the checks that refuse a head before anything is
//! forwarded (413 on a declared body too large, 400 on a bad target). No I/O: the request path
//! (`forward.rs`) and the fuzz targets run the same functions.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};

use crate::forward::Peer;
use crate::host;
use crate::respond::ProxyError;

/// RFC 9110 7.6.1 plus the proxy-* headers meant for this hop, and the client as the proxy
/// of another fleet host saw it (`fleet.rs`), which only that hop may say.
const HOP_BY_HOP: [&str; 10] = [
    "tenement-fleet-client",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers in which frameworks and proxies look for the client's address or scheme. From a
/// peer that is not a trusted proxy they are the client's own claims: dropped, so that an app
/// reading any of them cannot be lied to (docs/CONFIG.md lists them). X-Real-IP is then set to
/// the peer's address.
const CLIENT_CLAIMS: [&str; 15] = [
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-forwarded-for",
    "forwarded-for",
    "x-forwarded",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-url-scheme",
    "front-end-https",
];

/// Turns a client's request head into the one the instance gets: origin-form target, HTTP/1.1,
/// hop-by-hop headers out (an upgrade's own two kept), forwarding headers set for this hop and
/// a Host. Pure, so the fuzz targets check the same code the request path runs.
pub fn rewrite_head(
    parts: &mut http::request::Parts,
    peer: Peer,
    raw_host: &str,
    trusted: &[IpAddr],
) -> Result<(), ProxyError> {
    let upgrade = is_upgrade(&parts.headers)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    prepare_headers(&mut parts.headers, peer, raw_host, trusted);
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
    }
    parts.uri = origin_form(&parts.method, &parts.uri)?;
    parts.version = http::Version::HTTP_11;
    // Exactly one Host, the authority that was routed (RFC 9112 §3.2), whatever the client
    // wrote in its header.
    let host = HeaderValue::from_str(raw_host)
        .map_err(|_| ProxyError::BadHost(host::HostError::Malformed))?;
    parts.headers.insert(header::HOST, host);
    Ok(())
}

/// Refuses a target the instance may not get: `*` with another method than OPTIONS (or with
/// a query), or anything else that is not a path. Nothing is built: the request path checks
/// this before a wake and builds the target only after it (`origin_form`).
pub fn check_target(method: &http::Method, target: &Uri) -> Result<(), ProxyError> {
    let path = target.path();
    let allowed = if path == "*" {
        method == http::Method::OPTIONS && target.query().is_none()
    } else {
        path.starts_with('/')
    };
    if allowed {
        Ok(())
    } else {
        Err(ProxyError::BadTarget)
    }
}

/// The target the instance gets: the path and query of an origin-form or absolute-form target,
/// the path `/` when empty (RFC 9112 3.2.1, 3.2.2), or `*` for OPTIONS alone (3.2.4). hyper
/// accepts `*` with any method; any other method with it is refused, never sent on as `GET *`.
fn origin_form(method: &http::Method, target: &Uri) -> Result<Uri, ProxyError> {
    check_target(method, target)?;
    let path = target.path();
    if path == "*" {
        return Ok(Uri::from_static("*"));
    }
    if target.scheme().is_none() && target.authority().is_none() {
        // Already origin-form (what HTTP/1 clients send): shared, not parsed again.
        return Ok(target.clone());
    }
    let origin = match target.query() {
        Some(query) => Uri::try_from(format!("{path}?{query}")),
        None => Uri::try_from(path),
    };
    origin.map_err(|_| ProxyError::BadTarget)
}

/// 413 when the declared Content-Length is over the service's `max_body_size` (a body without
/// one is cut at the limit while it streams).
pub fn check_body_size<B>(request: &Request<B>, max: u64) -> Result<(), ProxyError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max => Err(ProxyError::BodyTooLarge),
        _ => Ok(()),
    }
}

/// The tokens of every Connection header, read as bytes: hyper accepts obs-text (bytes
/// 0x80-0xFF) in a value, and the names beside it still name headers for every recipient, so a
/// value that is not visible ASCII must not be skipped whole.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|token| token.eq_ignore_ascii_case(b"upgrade"))
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    remove_named(headers, &HOP_BY_HOP);
}

/// Removes every header named in `names` (lower case). It looks at the names present, a
/// handful, rather than looking each of a long list up (a parse and a hash each, twice per
/// request), and allocates only when one is there.
fn remove_named(headers: &mut HeaderMap, names: &[&str]) {
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| names.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// The scheme the client used: the listener's, or what a trusted proxy in front says in
/// `X-Forwarded-Proto` (a TLS terminator talking plain HTTP to this proxy).
pub fn client_scheme(headers: &HeaderMap, peer: Peer, trusted: &[IpAddr]) -> &'static str {
    let trusted_peer = !peer.tenant && trusted.contains(&peer.addr.ip().to_canonical());
    if !trusted_peer {
        return peer.scheme;
    }
    match headers.get(X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
        Some(b"https") => "https",
        Some(b"http") => "http",
        _ => peer.scheme,
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the last address
/// in its `X-Forwarded-For` (the one that proxy saw; anything before it the client could have
/// written).
pub fn client_ip(headers: &HeaderMap, peer: Peer, trusted: &[IpAddr]) -> IpAddr {
    let ip = peer.addr.ip().to_canonical();
    if peer.tenant || !trusted.contains(&ip) {
        return ip;
    }
    headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .last()
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .map_or(ip, |forwarded| forwarded.to_canonical())
}

/// Hop-by-hop headers out; X-Forwarded-For/-Proto/-Host and Forwarded set for this hop,
/// replacing what an untrusted client sent.
pub fn prepare_headers(headers: &mut HeaderMap, peer: Peer, raw_host: &str, trusted: &[IpAddr]) {
    strip_hop_by_hop(headers);
    let client_ip = peer.addr.ip().to_canonical();
    let trusted_peer = !peer.tenant && trusted.contains(&client_ip);
    let prior_for = if trusted_peer {
        headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    } else {
        None
    };
    // Extended only when it is a well-formed list: text appended to a malformed one (an
    // unclosed quoted string) would land inside the client's element, not after it.
    let prior_forwarded = if trusted_peer {
        prior_forwarded_elements(headers)
    } else {
        None
    };
    let proto = client_scheme(headers, peer, trusted);
    let prior_real_ip = if trusted_peer {
        headers.get(X_REAL_IP).cloned()
    } else {
        remove_named(headers, &CLIENT_CLAIMS);
        None
    };
    remove_named(
        headers,
        &[
            X_FORWARDED_FOR.as_str(),
            X_FORWARDED_PROTO.as_str(),
            X_FORWARDED_HOST.as_str(),
            FORWARDED.as_str(),
        ],
    );
    let ip_text = client_ip.to_string();
    match prior_real_ip {
        Some(value) => {
            headers.insert(X_REAL_IP, value);
        }
        None => {
            if let Ok(value) = HeaderValue::from_str(&ip_text) {
                headers.insert(X_REAL_IP, value);
            }
        }
    }
    let xff = match prior_for {
        Some(prior) => format!("{prior}, {ip_text}"),
        None => ip_text.clone(),
    };
    let node = match client_ip {
        IpAddr::V4(_) => ip_text,
        IpAddr::V6(_) => format!("\"[{ip_text}]\""),
    };
    // Neither a quote nor a backslash, so this hop's element always parses (the host was
    // routed, so it has neither anyway).
    let host_param = raw_host.replace(['"', '\\'], "");
    let this_hop = format!("for={node};proto={proto};host=\"{host_param}\"");
    let forwarded = match prior_forwarded {
        Some(prior) => format!("{prior}, {this_hop}"),
        None => this_hop,
    };
    let mut set = |name: HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set(X_FORWARDED_FOR, xff);
    set(X_FORWARDED_PROTO, proto.to_owned());
    set(X_FORWARDED_HOST, raw_host.to_owned());
    set(FORWARDED, forwarded);
}

/// The elements of a trusted peer's Forwarded headers (all their lines, as one list), joined
/// with `, `; `None` when there are none, or when any line is not visible ASCII or does not
/// parse as RFC 7239 elements (then this hop's element replaces them).
fn prior_forwarded_elements(headers: &HeaderMap) -> Option<String> {
    let mut elements = Vec::new();
    for value in headers.get_all(FORWARDED) {
        elements.extend(forwarded_elements(value.to_str().ok()?)?);
    }
    (!elements.is_empty()).then(|| elements.join(", "))
}

/// Splits a Forwarded value into its elements (RFC 7239 section 4), each trimmed; `None` when
/// it is not a list of them.
///
/// ```text
/// Forwarded         = 1#forwarded-element
/// forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] )
/// forwarded-pair    = token "=" value
/// value             = token / quoted-string
/// ```
///
/// Read a little more strictly than the grammar: every element holds at least one pair and
/// no pair is empty (`for=a;;by=b`), while blanks around `,` and `;` and empty list elements
/// (`a=1, , b=2`, RFC 9110 5.6.1) are accepted. A quoted string must be closed, with `\`
/// escaping one visible character, space or tab.
fn forwarded_elements(value: &str) -> Option<Vec<&str>> {
    let bytes = value.as_bytes();
    let mut elements = Vec::new();
    let mut i = skip_blanks(bytes, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            // An empty list element.
            i = skip_blanks(bytes, i + 1);
            continue;
        }
        let start = i;
        let end = loop {
            // One pair: token "=" (token / quoted-string).
            let name_end = skip_token(bytes, i);
            if name_end == i || bytes.get(name_end) != Some(&b'=') {
                return None;
            }
            let value_start = name_end + 1;
            let value_end = if bytes.get(value_start) == Some(&b'"') {
                skip_quoted_string(bytes, value_start)?
            } else {
                skip_token(bytes, value_start)
            };
            if value_end == value_start {
                return None;
            }
            i = skip_blanks(bytes, value_end);
            match bytes.get(i) {
                Some(b';') => i = skip_blanks(bytes, i + 1),
                Some(b',') | None => break value_end,
                Some(_) => return None,
            }
        };
        elements.push(&value[start..end]);
        if i < bytes.len() {
            // At the `,` after the element.
            i = skip_blanks(bytes, i + 1);
        }
    }
    (!elements.is_empty()).then_some(elements)
}

/// Past spaces and tabs (OWS) from `i`.
fn skip_blanks(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

/// Past the token (RFC 9110 5.6.2) starting at `i`; `i` itself when there is none.
fn skip_token(bytes: &[u8], mut i: usize) -> usize {
    while bytes
        .get(i)
        .is_some_and(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        i += 1;
    }
    i
}

/// Past the quoted string (RFC 9110 5.6.4) whose opening quote is at `i`; `None` when it is
/// not closed or holds a character it may not.
fn skip_quoted_string(bytes: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match *bytes.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *bytes.get(i + 1)? {
                b'\t' | b' '..=b'~' => i += 2,
                _ => return None,
            },
            b'\t' | b' '..=b'~' => i += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{Response, StatusCode};
    use hyper::body::Incoming;

    use crate::respond::full;

    fn peer(ip: &str) -> Peer {
        Peer {
            addr: SocketAddr::new(ip.parse().expect("ip"), 5555),
            scheme: "http",
            tenant: false,
            via_fleet: false,
        }
    }

    #[test]
    fn forwarding_headers_replace_what_a_client_sent() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-drop-me"),
        );
        headers.insert("x-drop-me", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        prepare_headers(&mut headers, peer("10.1.2.3"), "alice.notes.localhost", &[]);
        assert_eq!(headers[header::AUTHORIZATION], "Bearer secret");
        assert_eq!(headers[X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "alice.notes.localhost");
        assert_eq!(
            headers[FORWARDED],
            "for=10.1.2.3;proto=http;host=\"alice.notes.localhost\""
        );
        assert!(!headers.contains_key("x-drop-me"));
        assert!(!headers.contains_key("keep-alive"));
        assert!(!headers.contains_key(header::CONNECTION));
    }

    #[test]
    fn client_address_claims_from_a_stranger_are_dropped_and_x_real_ip_is_the_peer() {
        let mut headers = HeaderMap::new();
        for name in CLIENT_CLAIMS {
            headers.insert(name, HeaderValue::from_static("6.6.6.6"));
        }
        headers.insert("x-app-header", HeaderValue::from_static("kept"));
        prepare_headers(&mut headers, peer("10.1.2.3"), "a.notes.localhost", &[]);
        for name in CLIENT_CLAIMS.iter().filter(|n| **n != "x-real-ip") {
            assert!(
                !headers.contains_key(*name),
                "{name} passed from a stranger"
            );
        }
        assert_eq!(headers[X_REAL_IP], "10.1.2.3");
        assert_eq!(headers["x-app-header"], "kept");

        // A trusted proxy in front says who the client is.
        let mut headers = HeaderMap::new();
        headers.insert(X_REAL_IP, HeaderValue::from_static("1.1.1.1"));
        headers.insert("cf-connecting-ip", HeaderValue::from_static("1.1.1.1"));
        let trusted = ["10.1.2.3".parse().expect("ip")];
        prepare_headers(
            &mut headers,
            peer("10.1.2.3"),
            "a.notes.localhost",
            &trusted,
        );
        assert_eq!(headers[X_REAL_IP], "1.1.1.1");
        assert_eq!(headers["cf-connecting-ip"], "1.1.1.1");
    }

    #[test]
    fn the_instance_gets_exactly_one_host_the_routed_authority() {
        let request = Request::get("http://bob.notes.localhost/x?y=1")
            .header(header::HOST, "bob.notes.localhost")
            .body(())
            .expect("request");
        let (mut parts, ()) = request.into_parts();
        rewrite_head(&mut parts, peer("10.1.2.3"), "bob.notes.localhost", &[]).expect("rewrite");
        let hosts: Vec<_> = parts.headers.get_all(header::HOST).iter().collect();
        assert_eq!(hosts, ["bob.notes.localhost"]);
        assert_eq!(parts.uri, "/x?y=1");
        assert_eq!(parts.version, http::Version::HTTP_11);
    }

    #[test]
    fn a_tenant_on_a_trusted_loopback_address_is_not_trusted() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        let trusted = ["127.0.0.1".parse().expect("ip")];
        let tenant = Peer {
            tenant: true,
            ..peer("127.0.0.1")
        };
        prepare_headers(&mut headers, tenant, "x.localhost", &trusted);
        assert_eq!(headers[X_FORWARDED_FOR], "127.0.0.1");
    }

    #[test]
    fn a_trusted_proxy_extends_the_chain() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(
            FORWARDED,
            HeaderValue::from_static("for=1.1.1.1;proto=https"),
        );
        let trusted = ["::1".parse().expect("ip")];
        prepare_headers(&mut headers, peer("::1"), "x.localhost", &trusted);
        assert_eq!(headers[X_FORWARDED_FOR], "1.1.1.1, ::1");
        assert_eq!(headers[X_FORWARDED_PROTO], "https");
        assert_eq!(
            headers[FORWARDED],
            "for=1.1.1.1;proto=https, for=\"[::1]\";proto=https;host=\"x.localhost\""
        );
    }

    #[test]
    fn upgrade_detection_reads_connection_tokens() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&headers));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert!(!is_upgrade(&headers));
    }

    #[test]
    fn upgrade_detection_reads_connection_tokens_as_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let value = HeaderValue::from_bytes(b"Upgrade, \xe9").expect("obs-text is a valid value");
        headers.insert(header::CONNECTION, value);
        assert!(is_upgrade(&headers));
    }

    #[test]
    fn headers_named_beside_obs_text_in_connection_are_stripped() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"x-secret, \xe9, X-Other ,").expect("valid value");
        headers.insert(header::CONNECTION, value);
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn forwarded_values_parse_as_rfc_7239_elements_or_not_at_all() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            // RFC 7239's own examples.
            ("for=\"_gazonk\"", Some(&["for=\"_gazonk\""])),
            (
                "For=\"[2001:db8:cafe::17]:4711\"",
                Some(&["For=\"[2001:db8:cafe::17]:4711\""]),
            ),
            (
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                Some(&["for=192.0.2.60;proto=http;by=203.0.113.43"]),
            ),
            (
                "for=192.0.2.43, for=198.51.100.17",
                Some(&["for=192.0.2.43", "for=198.51.100.17"]),
            ),
            // Separators inside a quoted string, and an escaped quote.
            (
                "for=\"a,b;c=d\";proto=http, for=x",
                Some(&["for=\"a,b;c=d\";proto=http", "for=x"]),
            ),
            ("for=\"a\\\"b\"", Some(&["for=\"a\\\"b\""])),
            ("host=\"\"", Some(&["host=\"\""])),
            // Blanks around separators, empty list elements.
            (
                " for=a ; proto=https ,\tfor=b ",
                Some(&["for=a ; proto=https", "for=b"]),
            ),
            (", for=a, , for=b,", Some(&["for=a", "for=b"])),
            // Not a list of elements.
            ("", None),
            (" ", None),
            (",", None),
            ("for=\"6.6.6.6", None),
            ("for=\"a\\", None),
            ("for=\"a\\\"", None),
            ("for=\"a\"b", None),
            ("for=a\"b\"", None),
            ("for=\"a\u{1}\"", None),
            ("for=", None),
            ("for=;proto=http", None),
            ("=a", None),
            ("for", None),
            ("for a", None),
            ("for = a", None),
            ("for=a b", None),
            ("for=[::1]", None),
            ("for=a;", None),
            ("for=a;;by=b", None),
            ("for=a;, for=b", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                forwarded_elements(value).as_deref(),
                *expected,
                "Forwarded: {value}"
            );
        }
    }

    fn trusted_peer_forwarded(values: &[&[u8]]) -> HeaderValue {
        let mut headers = HeaderMap::new();
        for value in values {
            let value = HeaderValue::from_bytes(value).expect("valid value");
            headers.append(FORWARDED, value);
        }
        let trusted = ["10.1.2.3".parse().expect("ip")];
        prepare_headers(&mut headers, peer("10.1.2.3"), "x.localhost", &trusted);
        let forwarded: Vec<&HeaderValue> = headers.get_all(FORWARDED).iter().collect();
        assert_eq!(forwarded.len(), 1, "{forwarded:?}");
        forwarded[0].clone()
    }

    #[test]
    fn a_trusted_proxys_forwarded_chain_is_extended_only_when_well_formed() {
        let hop = "for=10.1.2.3;proto=http;host=\"x.localhost\"";
        let cases: &[(&[&[u8]], String)] = &[
            (&[b"for=1.1.1.1"], format!("for=1.1.1.1, {hop}")),
            // Every line of the header, as one list.
            (
                &[b"for=1.1.1.1", b"for=2.2.2.2;proto=https"],
                format!("for=1.1.1.1, for=2.2.2.2;proto=https, {hop}"),
            ),
            // Malformed: this hop alone, as for an untrusted peer.
            (&[b"for=\"6.6.6.6"], hop.to_owned()),
            (&[b"for=1.1.1.1", b"for=\"6.6.6.6"], hop.to_owned()),
            (&[b"garbage"], hop.to_owned()),
            (&[b"for=\"\xe9\""], hop.to_owned()),
        ];
        for (values, expected) in cases {
            let forwarded = trusted_peer_forwarded(values);
            assert_eq!(forwarded, expected.as_str(), "{values:?}");
            let text = forwarded.to_str().expect("text");
            assert!(forwarded_elements(text).is_some(), "{text}");
        }
        // This hop's element parses whatever the host.
        let mut headers = HeaderMap::new();
        prepare_headers(&mut headers, peer("10.1.2.3"), "a\"b\\c", &[]);
        let forwarded = headers[FORWARDED].to_str().expect("text");
        assert_eq!(
            forwarded_elements(forwarded).as_deref(),
            Some(&["for=10.1.2.3;proto=http;host=\"abc\""][..])
        );
    }

    #[test]
    fn asterisk_form_is_for_options_only() {
        for method in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "TRACE", "X-CUSTOM",
        ] {
            let request = Request::builder()
                .method(method)
                .uri("*")
                .body(())
                .expect("request");
            let (mut parts, ()) = request.into_parts();
            assert_eq!(
                rewrite_head(&mut parts, peer("10.1.2.3"), "a.notes.localhost", &[]),
                Err(ProxyError::BadTarget),
                "{method} *"
            );
        }
        let request = Request::options("*").body(()).expect("request");
        let (mut parts, ()) = request.into_parts();
        rewrite_head(&mut parts, peer("10.1.2.3"), "a.notes.localhost", &[]).expect("OPTIONS *");
        assert_eq!(parts.uri, "*");
    }

    #[test]
    fn the_target_becomes_origin_form() {
        let cases = [
            ("/x?y=1", "/x?y=1"),
            ("http://a.notes.localhost", "/"),
            ("http://a.notes.localhost/p/q", "/p/q"),
            // An absolute-form target with an empty path and a query (RFC 9112 3.2.1).
            ("http://a.notes.localhost?y=1", "/?y=1"),
        ];
        for (target, expected) in cases {
            let request = Request::get(target).body(()).expect("request");
            let (mut parts, ()) = request.into_parts();
            rewrite_head(&mut parts, peer("10.1.2.3"), "a.notes.localhost", &[]).expect(target);
            assert_eq!(parts.uri, expected, "{target}");
        }
    }

    /// The fuzz campaign's `http_head` regressions (docs/FUZZING.md; the inputs of
    /// `fuzz/regressions/http_head/`), each sent as bytes on a connection and read into a
    /// request head by the proxy's own HTTP server, then routed and rewritten as the request
    /// path does.
    mod wire {
        use super::*;
        use tokio::io::AsyncWriteExt;

        /// The request head the proxy's server ([`crate::server::connection_builder`]) reads
        /// from `bytes`.
        async fn head_from_wire(bytes: &[u8]) -> http::request::Parts {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                if let Some(tx) = tx.lock().expect("not poisoned").take() {
                    let _ = tx.send(request.into_parts().0);
                }
                async { Ok::<_, std::convert::Infallible>(Response::new(full(Bytes::new()))) }
            });
            let builder = crate::server::connection_builder();
            let connection = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(server), service);
            let exchange = async {
                client.write_all(bytes).await.expect("written");
                rx.await.expect("a request reached the service")
            };
            tokio::select! {
                head = exchange => head,
                ended = connection => panic!("the connection ended without a request: {ended:?}"),
            }
        }

        /// What `Proxy::serve` and `Proxy::forward` do to a head before it leaves: one
        /// authority, then the rewrite.
        fn route_and_rewrite(
            head: &http::request::Parts,
            peer: Peer,
            trusted: &[IpAddr],
        ) -> Result<http::request::Parts, ProxyError> {
            let raw_host = host::authority_of(
                head.uri.authority().map(|a| a.as_str()),
                head.headers
                    .get_all(header::HOST)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )?
            .unwrap_or_default()
            .to_owned();
            let (mut copy, ()) = Request::new(()).into_parts();
            copy.method = head.method.clone();
            copy.uri = head.uri.clone();
            copy.version = head.version;
            copy.headers = head.headers.clone();
            rewrite_head(&mut copy, peer, &raw_host, trusted)?;
            Ok(copy)
        }

        /// fuzz/regressions/http_head/h1_connection_with_obs_text
        #[tokio::test]
        async fn a_header_named_beside_obs_text_in_connection_is_not_forwarded() {
            let input = b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nConnection: x-secret, \xe9\r\nX-Secret: 1\r\n\r\n";
            let head = head_from_wire(input).await;
            assert!(head.headers.contains_key("x-secret"));
            let rewritten = route_and_rewrite(&head, peer("203.0.113.7"), &[]).expect("rewritten");
            assert!(!rewritten.headers.contains_key("x-secret"));
            assert!(!rewritten.headers.contains_key(header::CONNECTION));
        }

        /// fuzz/regressions/http_head/h1_get_asterisk
        #[tokio::test]
        async fn get_with_an_asterisk_target_is_a_400() {
            let input = b"GET * HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n";
            let head = head_from_wire(input).await;
            let error = route_and_rewrite(&head, peer("203.0.113.7"), &[]).expect_err("refused");
            assert_eq!(error, ProxyError::BadTarget);
            assert_eq!(
                crate::respond::error_response(&error).status(),
                StatusCode::BAD_REQUEST
            );
            let input = b"OPTIONS * HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n";
            let head = head_from_wire(input).await;
            let rewritten = route_and_rewrite(&head, peer("203.0.113.7"), &[]).expect("OPTIONS *");
            assert_eq!(rewritten.uri, "*");
        }

        /// fuzz/regressions/http_head/h1_trusted_forwarded_with_open_quote
        #[tokio::test]
        async fn a_trusted_proxys_unclosed_quote_does_not_swallow_this_hop() {
            let input =
                b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nForwarded: for=\"6.6.6.6\r\n\r\n";
            let head = head_from_wire(input).await;
            let trusted = ["192.0.2.1".parse().expect("ip")];
            // Accepted on a dual-stack socket, as the fuzz target's trusted peer is.
            let rewritten =
                route_and_rewrite(&head, peer("::ffff:192.0.2.1"), &trusted).expect("rewritten");
            assert_eq!(
                rewritten.headers[FORWARDED],
                "for=192.0.2.1;proto=http;host=\"alice.notes.localhost\""
            );
        }

        /// fuzz/regressions/http_head/h1_two_host_headers, h1_absolute_form_other_host and
        /// h2_authority_and_other_host_header (fixed before the campaign reported).
        #[tokio::test]
        async fn a_second_authority_is_refused() {
            let cases: [(&[u8], host::HostError); 3] = [
                (
                    b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\nHost: bob.notes.localhost\r\n\r\n",
                    host::HostError::Duplicate,
                ),
                (
                    b"GET http://alice.notes.localhost/ HTTP/1.1\r\nHost: bob.notes.localhost\r\n\r\n",
                    host::HostError::Mismatch,
                ),
                (
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
                      \x00\x00\x00\x04\x00\x00\x00\x00\x00\
                      \x00\x00\x61\x01\x05\x00\x00\x00\x01\
                      \x00\x07:method\x03GET\
                      \x00\x07:scheme\x05https\
                      \x00\x0a:authority\x15alice.notes.localhost\
                      \x00\x05:path\x01/\
                      \x00\x04host\x13bob.notes.localhost",
                    host::HostError::Mismatch,
                ),
            ];
            for (input, expected) in cases {
                let head = head_from_wire(input).await;
                assert_eq!(
                    route_and_rewrite(&head, peer("203.0.113.7"), &[]).map(|_| ()),
                    Err(ProxyError::BadHost(expected)),
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }
}
