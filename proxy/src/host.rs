//! Host normalisation and routing: pure functions from a `Host` header (or an HTTP/2
//! `:authority`) to a [`Target`].
//!
//! Nothing here does I/O. Every label that leaves this module as an id went through
//! [`tenement_proto::ids`] validation, so a Host such as `../x.notes.example.com` is a 400 long
//! before anything could reach a path or the supervisor.

use tenement_proto::{InstanceId, ServiceName, TenantId};

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `{id}.{service}.{domain}`
    Instance(InstanceId),
    /// `{service}.{domain}`: a weighted choice among the service's instances.
    Service(ServiceName),
    /// `{domain}` itself: tenement's own page.
    Home,
    /// A host under none of the configured domains, or too deep under one.
    NoMatch,
}

/// Why a Host is refused with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("missing Host header")]
    Missing,
    #[error("malformed Host header")]
    Malformed,
    #[error("invalid name in Host header: {0}")]
    BadLabel(String),
    /// Two Host headers (RFC 9112 §3.2: exactly one).
    #[error("more than one Host header")]
    Duplicate,
    /// The request target's authority (absolute-form, or HTTP/2 `:authority`) names another
    /// host than the Host header (RFC 9113 §8.3.1).
    #[error("Host header does not match the request target")]
    Mismatch,
}

/// The one authority a request names: its target's (absolute-form, HTTP/2 `:authority`) or
/// else its Host header; refused when there are two Host headers or when the two disagree
/// about the host. The instance later gets exactly this as its Host.
pub fn authority_of<'a>(
    target: Option<&'a str>,
    mut hosts: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<&'a str>, HostError> {
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    let host = host
        .map(|h| std::str::from_utf8(h).map_err(|_| HostError::Malformed))
        .transpose()?;
    match (target, host) {
        (Some(target), Some(host)) => {
            if normalize(target)? != normalize(host)? {
                return Err(HostError::Mismatch);
            }
            Ok(Some(target))
        }
        (Some(target), None) => Ok(Some(target)),
        (None, host) => Ok(host),
    }
}

/// Lower-cases `raw`, strips the port and one trailing dot, and unwraps IPv6 literals.
/// Returns the bare host name.
pub fn normalize(raw: &str) -> Result<String, HostError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(HostError::Missing);
    }
    if !raw.is_ascii() || raw.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(HostError::Malformed);
    }
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port or [v6]
        let (inside, after) = rest.split_once(']').ok_or(HostError::Malformed)?;
        if !(after.is_empty() || is_port_suffix(after)) || inside.is_empty() {
            return Err(HostError::Malformed);
        }
        if !inside
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(HostError::Malformed);
        }
        return Ok(format!("[{}]", inside.to_ascii_lowercase()));
    } else {
        match raw.rsplit_once(':') {
            // A bare IPv6 address has several colons and no port we could tell apart.
            Some((h, _)) if h.contains(':') => return Err(HostError::Malformed),
            Some((h, port)) => {
                if !is_port(port) {
                    return Err(HostError::Malformed);
                }
                h
            }
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    // Empty labels anywhere (`a..b`, `.a`, `a..` before the strip) are malformed.
    if host.is_empty() || host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return Err(HostError::Malformed);
    }
    if host
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'))
    {
        return Err(HostError::Malformed);
    }
    Ok(host.to_ascii_lowercase())
}

fn is_port(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 5
        && text.bytes().all(|b| b.is_ascii_digit())
        && text.parse::<u16>().is_ok()
}

fn is_port_suffix(text: &str) -> bool {
    text.strip_prefix(':').is_some_and(is_port)
}

/// Maps a normalised host to its target under the configured `domains` (lower-case, no
/// trailing dot). The longest matching domain wins, so `example.com` and `eu.example.com` can
/// both be configured.
pub fn route(host: &str, domains: &[String]) -> Result<Target, HostError> {
    let mut best: Option<&str> = None;
    for domain in domains {
        let matches = host == domain
            || (host.len() > domain.len() + 1
                && host.ends_with(domain.as_str())
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.');
        if matches && best.is_none_or(|b| domain.len() > b.len()) {
            best = Some(domain);
        }
    }
    let Some(domain) = best else {
        return Ok(Target::NoMatch);
    };
    if host.len() == domain.len() {
        return Ok(Target::Home);
    }
    let prefix = &host[..host.len() - domain.len() - 1];
    let labels: Vec<&str> = prefix.split('.').collect();
    let bad = |e: tenement_proto::IdError| HostError::BadLabel(e.to_string());
    match labels.as_slice() {
        [service] => Ok(Target::Service(ServiceName::new(*service).map_err(bad)?)),
        [id, service] => Ok(Target::Instance(InstanceId::new(
            ServiceName::new(*service).map_err(bad)?,
            TenantId::new(*id).map_err(bad)?,
        ))),
        _ => {
            // Deeper names are not ours, but an empty label is malformed either way.
            if labels.iter().any(|l| l.is_empty()) {
                return Err(HostError::Malformed);
            }
            Ok(Target::NoMatch)
        }
    }
}

/// Normalise and route in one step; `None` for a missing header.
pub fn target_of(raw: Option<&str>, domains: &[String]) -> Result<Target, HostError> {
    let host = normalize(raw.ok_or(HostError::Missing)?)?;
    route(&host, domains)
}

#[cfg(test)]
mod tests;
