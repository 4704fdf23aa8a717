//! Target `host`: the Host / `:authority` parser and router,
//! [`tenement_proxy::host::normalize`] and [`tenement_proxy::host::target_of`].
//!
//! The input is the raw header value (lossily made UTF-8: a header the proxy reads is ASCII).
//! Invariants:
//! - nothing panics;
//! - a normalised host is lower-case ASCII, has no trailing dot and no port, and normalising it
//!   again gives it back;
//! - the route is a function of the normalised host: the raw value, the normalised one, and the
//!   normalised one upper-cased, with a trailing dot or with a port all route the same;
//! - an instance target's service and id each pass [`validate_label`], its string form
//!   re-parses to an equal [`InstanceId`], and `{id}.{service}.` + a configured domain is the
//!   normalised host; a service target is a valid label and `{service}.` + a domain is the host;
//!   home is a configured domain exactly.

use tenement_proto::ids::validate_label;
use tenement_proto::InstanceId;
use tenement_proxy::host::{normalize, route, target_of, Target};

/// What the proxy is configured with while fuzzing: nested domains, so the longest match
/// matters, and a single-label one.
pub fn domains() -> Vec<String> {
    [
        "localhost",
        "example.com",
        "eu.example.com",
        "apps.example.org",
    ]
    .map(str::to_owned)
    .to_vec()
}

pub fn check(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let domains = domains();
    let result = target_of(Some(&raw), &domains);
    assert_eq!(
        target_of(Some(&raw.to_ascii_uppercase()), &domains),
        result,
        "upper-casing {raw:?} changed its route"
    );
    let host = match normalize(&raw) {
        Ok(host) => host,
        Err(e) => {
            assert_eq!(
                result,
                Err(e),
                "target_of and normalize disagree on {raw:?}"
            );
            return;
        }
    };
    check_normalised(&raw, &host);
    assert_eq!(
        route(&host, &domains),
        result,
        "{raw:?} does not route as its normal form {host:?}"
    );
    for variant in variants(&host) {
        assert_eq!(
            target_of(Some(&variant), &domains),
            result,
            "{variant:?} routes differently from {raw:?} (normal form {host:?})"
        );
    }
    match &result {
        Ok(Target::Instance(id)) => check_instance(&host, id, &domains),
        Ok(Target::Service(service)) => {
            if let Err(e) = validate_label("service name", service.as_str()) {
                panic!("{raw:?} routed to an invalid service {service:?}: {e}");
            }
            let rest = host
                .strip_prefix(&format!("{service}."))
                .unwrap_or_default();
            assert!(
                domains.iter().any(|d| d == rest),
                "{raw:?} routed to service {service:?} but {host:?} is not it under a domain"
            );
        }
        Ok(Target::Home) => assert!(
            domains.contains(&host),
            "{raw:?} routed home but {host:?} is no configured domain"
        ),
        Ok(Target::NoMatch) | Err(_) => {}
    }
}

fn check_normalised(raw: &str, host: &str) {
    assert!(
        host.is_ascii() && host.to_ascii_lowercase() == host,
        "normalize({raw:?}) = {host:?} is not lower-case ASCII"
    );
    assert!(!host.is_empty(), "normalize({raw:?}) is empty");
    assert!(
        !host.ends_with('.'),
        "normalize({raw:?}) = {host:?} keeps a trailing dot"
    );
    if !host.starts_with('[') {
        assert!(
            !host.contains(':'),
            "normalize({raw:?}) = {host:?} keeps a port"
        );
    }
    assert_eq!(
        normalize(host).as_deref(),
        Ok(host),
        "normalize is not idempotent on {raw:?}"
    );
}

/// Spellings of `host` that must route exactly as it does.
fn variants(host: &str) -> Vec<String> {
    let upper = host.to_ascii_uppercase();
    let mut out = vec![
        upper.clone(),
        format!("{host}:8080"),
        format!("{upper}:443"),
        format!(" {host} "),
    ];
    // A trailing dot only goes on a name, not on an IPv6 literal's brackets.
    if !host.starts_with('[') {
        out.push(format!("{host}."));
        out.push(format!("{upper}.:80"));
    }
    out
}

fn check_instance(host: &str, id: &InstanceId, domains: &[String]) {
    for (what, label) in [
        ("service name", id.service.as_str()),
        ("instance id", id.id.as_str()),
    ] {
        if let Err(e) = validate_label(what, label) {
            panic!("{host:?} routed to {id:?} whose {what} is invalid: {e}");
        }
    }
    let text = id.to_string();
    match InstanceId::parse(&text) {
        Ok(back) => assert_eq!(&back, id, "{text:?} re-parses to a different instance"),
        Err(e) => {
            panic!("{host:?} routed to {id:?} whose string form {text:?} does not parse: {e}")
        }
    }
    let rest = host
        .strip_prefix(&format!("{}.{}.", id.id, id.service))
        .unwrap_or_default();
    assert!(
        domains.iter().any(|d| d == rest),
        "{host:?} routed to {id:?} but is not {{id}}.{{service}}.DOMAIN"
    );
}
