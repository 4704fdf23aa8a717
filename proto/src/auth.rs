//! Tokens of the management API: their scopes, public ids and the text form a caller holds.
//!
//! A token reads `tnm_<id>_<secret>`: the prefix lets secret scanners recognise it, the id
//! (16 hex digits) is public and names it in `tenctl token ls` and the audit log, the secret
//! (64 hex digits, 256 random bits) is shown once and stored only as a SHA-256 hash. A
//! dashboard session reads the same with `tns_`. The supervisor alone decides what a token
//! may do; nothing here checks a secret.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{IdError, InstanceId, ServiceName};

/// The prefix of an API token.
pub const TOKEN_PREFIX: &str = "tnm_";
/// The prefix of a dashboard session.
pub const SESSION_PREFIX: &str = "tns_";
/// Hex digits of a public id.
pub const ID_LEN: usize = 16;
/// Hex digits of a secret.
pub const SECRET_LEN: usize = 64;
/// The length of every well-formed credential; anything longer is refused before it is read.
pub const CREDENTIAL_LEN: usize = TOKEN_PREFIX.len() + ID_LEN + 1 + SECRET_LEN;
/// The longest token name.
pub const MAX_NAME_LEN: usize = 64;

/// What a token may see and act on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything, including tokens.
    Admin,
    /// The instances, releases and rollouts of one service.
    Service(ServiceName),
    /// One instance: its status and logs, wake, restart and stop.
    Tenant(InstanceId),
}

impl Scope {
    /// Whether this scope covers `instance`.
    pub fn covers(&self, instance: &InstanceId) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Service(service) => instance.service == *service,
            Scope::Tenant(own) => own == instance,
        }
    }
}

/// Why a scope does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope {0:?} is not admin, service:NAME or tenant:SERVICE:ID")]
    Unknown(String),
    #[error("scope {scope:?}: {source}")]
    BadId { scope: String, source: IdError },
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |source| ScopeError::BadId {
            scope: text.chars().take(80).collect(),
            source,
        };
        if text == "admin" {
            Ok(Scope::Admin)
        } else if let Some(service) = text.strip_prefix("service:") {
            ServiceName::new(service).map(Scope::Service).map_err(bad)
        } else if let Some(instance) = text.strip_prefix("tenant:") {
            InstanceId::parse(instance).map(Scope::Tenant).map_err(bad)
        } else {
            Err(ScopeError::Unknown(text.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::Service(service) => write!(f, "service:{service}"),
            Scope::Tenant(instance) => write!(f, "tenant:{instance}"),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A token's public id: 16 lower-case hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(String);

impl TokenId {
    pub fn new(text: &str) -> Option<TokenId> {
        is_hex(text, ID_LEN).then(|| TokenId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for TokenId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TokenId::new(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "token id {:?} is not 16 hex digits",
                shorten(&text)
            ))
        })
    }
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn shorten(text: &str) -> String {
    text.chars().take(40).collect()
}

/// A credential as a caller presents it: never printed, never logged (its `Debug` hides it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Whether a credential is an API token or a dashboard session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Token,
    Session,
}

/// A credential taken apart: its kind, its public id and the secret part. `None` for anything
/// not of the form `tnm_<16 hex>_<64 hex>` (or `tns_`), so an overlong or malformed value is
/// refused before any lookup.
pub fn split_credential(text: &str) -> Option<(CredentialKind, TokenId, &str)> {
    if text.len() != CREDENTIAL_LEN {
        return None;
    }
    let (kind, rest) = if let Some(rest) = text.strip_prefix(TOKEN_PREFIX) {
        (CredentialKind::Token, rest)
    } else if let Some(rest) = text.strip_prefix(SESSION_PREFIX) {
        (CredentialKind::Session, rest)
    } else {
        return None;
    };
    let (id, secret) = rest.split_once('_')?;
    let id = TokenId::new(id)?;
    is_hex(secret, SECRET_LEN).then_some((kind, id, secret))
}

/// A name given to a token: printable ASCII without quotes, at most [`MAX_NAME_LEN`].
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a token name is 1 to {MAX_NAME_LEN} characters, not {}",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/ ".contains(&b))
    {
        return Err(format!(
            "token name {:?} may only contain letters, digits, space and -_.:@/",
            shorten(name)
        ));
    }
    Ok(())
}

/// One token as `tenctl token ls` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: TokenId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_read_and_print_alike() {
        for text in ["admin", "service:notes", "tenant:notes:alice"] {
            let scope: Scope = text.parse().expect("valid scope");
            assert_eq!(scope.to_string(), text);
        }
        for bad in [
            "",
            "root",
            "service:",
            "service:Notes",
            "tenant:notes",
            "tenant:../x:y",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?} accepted");
        }
        let alice = InstanceId::parse("notes:alice").expect("valid");
        let bob = InstanceId::parse("notes:bob").expect("valid");
        let wiki = InstanceId::parse("wiki:alice").expect("valid");
        let tenant = Scope::Tenant(alice.clone());
        assert!(tenant.covers(&alice) && !tenant.covers(&bob));
        let service: Scope = "service:notes".parse().expect("valid");
        assert!(service.covers(&bob) && !service.covers(&wiki));
        assert!(Scope::Admin.covers(&wiki));
    }

    #[test]
    fn only_well_formed_credentials_split() {
        let id = "0123456789abcdef";
        let secret = "a".repeat(SECRET_LEN);
        let token = format!("tnm_{id}_{secret}");
        let (kind, got, rest) = split_credential(&token).expect("well formed");
        assert_eq!(
            (kind, got.as_str(), rest),
            (CredentialKind::Token, id, secret.as_str())
        );
        let session = format!("tns_{id}_{secret}");
        assert_eq!(
            split_credential(&session).map(|s| s.0),
            Some(CredentialKind::Session)
        );
        for bad in [
            String::new(),
            format!("tnx_{id}_{secret}"),
            format!("tnm_{id}_{secret}0"),
            format!("tnm_{}_{secret}", "0123456789ABCDEF"),
            format!("tnm_{id}-{secret}"),
            format!("tnm_{id}_{}", "g".repeat(SECRET_LEN)),
            "x".repeat(100_000),
        ] {
            assert!(split_credential(&bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret("tnm_secret".to_owned());
        assert!(!format!("{secret:?}").contains("tnm_secret"));
    }
}
