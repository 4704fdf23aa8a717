//! The management API's tokens: minted, checked, scoped and revoked here and nowhere else.
//!
//! A token's secret is 256 random bits; only the SHA-256 of the whole credential is kept
//! (a password hash buys nothing against a random 256-bit secret, and a check stays a few
//! microseconds), compared in constant time. Tokens are saved with the registry; dashboard
//! sessions live in memory only (a supervisor restart logs everyone out) and die with their
//! token. Failed checks are counted per client address, so a flood of bad credentials from
//! one address never locks anyone else out.
//!
//! [`permit`] decides whether a grant's scope covers a call; it is a pure function, tested by
//! a table below.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tenement_proto::auth::{self, CredentialKind, Scope, Secret, TokenId, TokenInfo};
use tenement_proto::rpc::{ErrorCode, Request};

use crate::registry::RpcError;

/// How long a dashboard session lasts (at most until its token expires).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions open at once, over all tokens; the oldest goes when a new one would exceed it.
const MAX_SESSIONS: usize = 10_000;
/// Tokens at once: far beyond any real use, it bounds the registry file.
const MAX_TOKENS: usize = 10_000;
/// Failed checks one address may make in a burst, and how fast it earns one more.
const FAILURE_BURST: f64 = 10.0;
const FAILURE_REFILL_PER_S: f64 = 1.0;
/// Addresses whose failures are remembered at once.
const MAX_TRACKED: usize = 10_000;
/// A token's `last_used_ms` is written to disk when it moved on by this much.
const LAST_USED_SAVE_MS: u64 = 60_000;

/// A token as the registry file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// Hex SHA-256 of the whole credential.
    pub sha256: String,
}

/// What a checked credential may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token: TokenId,
    pub scope: Scope,
    pub read_only: bool,
    /// The session the credential was, if it was one.
    pub session: Option<TokenId>,
}

struct Session {
    token: TokenId,
    sha256: [u8; 32],
    expires_ms: u64,
}

/// A token bucket of failures for one address.
struct Bucket {
    left: f64,
    at: Instant,
}

#[derive(Default)]
pub struct Tokens {
    tokens: BTreeMap<TokenId, Stored>,
    sessions: HashMap<TokenId, Session>,
    failures: HashMap<Option<IpAddr>, Bucket>,
}

struct Stored {
    info: TokenInfo,
    sha256: [u8; 32],
    /// `last_used_ms` as last written to disk.
    saved_use: std::cell::Cell<Option<u64>>,
}

fn unauthenticated(message: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::Unauthenticated, message)
}

fn forbidden(message: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::Forbidden, message)
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `bytes` random bytes from the kernel, as hex.
fn random_hex(bytes: usize) -> Result<String, RpcError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| {
        RpcError::new(
            ErrorCode::Internal,
            format!("no randomness for a token: {e}"),
        )
    })?;
    Ok(hex(&buf))
}

/// The key failures are counted under: the address, or its /64 for IPv6 (one host holds a
/// whole /64, so counting single addresses would count nothing).
fn failure_key(peer: Option<IpAddr>) -> Option<IpAddr> {
    peer.map(|ip| match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    })
}

impl Tokens {
    /// The tokens saved in the registry file. Entries whose hash is not 64 hex digits are
    /// dropped with a warning: they could never match.
    pub fn load(saved: Vec<StoredToken>) -> Tokens {
        let mut tokens = Tokens::default();
        for token in saved {
            match unhex(&token.sha256) {
                Some(sha256) => {
                    let saved_use = std::cell::Cell::new(token.info.last_used_ms);
                    tokens.tokens.insert(
                        token.info.id.clone(),
                        Stored {
                            info: token.info,
                            sha256,
                            saved_use,
                        },
                    );
                }
                None => {
                    tracing::warn!(token = %token.info.id, "dropping a saved token whose hash is damaged")
                }
            }
        }
        tokens
    }

    /// What the registry file keeps; remembers the `last_used_ms` written.
    pub fn persisted(&self) -> Vec<StoredToken> {
        self.tokens
            .values()
            .map(|stored| {
                stored.saved_use.set(stored.info.last_used_ms);
                StoredToken {
                    info: stored.info.clone(),
                    sha256: hex(&stored.sha256),
                }
            })
            .collect()
    }

    /// Mints a token; the credential is in the answer and nowhere else.
    pub fn create(
        &mut self,
        scope: Scope,
        read_only: bool,
        lifetime_s: Option<u64>,
        name: Option<String>,
        now_ms: u64,
    ) -> Result<(Secret, TokenInfo), RpcError> {
        if let Some(name) = &name {
            auth::validate_name(name).map_err(|e| RpcError::new(ErrorCode::BadRequest, e))?;
        }
        if self.tokens.len() >= MAX_TOKENS {
            return Err(RpcError::new(
                ErrorCode::Unavailable,
                format!("there are already {MAX_TOKENS} tokens; remove some first"),
            ));
        }
        let expires_ms = match lifetime_s {
            None => None,
            Some(0) => {
                return Err(RpcError::new(
                    ErrorCode::BadRequest,
                    "a token's lifetime must be at least one second",
                ))
            }
            Some(s) => Some(now_ms.saturating_add(s.saturating_mul(1000))),
        };
        let id = loop {
            let id = TokenId::new(&random_hex(auth::ID_LEN / 2)?)
                .ok_or_else(|| RpcError::new(ErrorCode::Internal, "bad token id"))?;
            if !self.tokens.contains_key(&id) {
                break id;
            }
        };
        let credential = format!(
            "{}{id}_{}",
            auth::TOKEN_PREFIX,
            random_hex(auth::SECRET_LEN / 2)?
        );
        let info = TokenInfo {
            id: id.clone(),
            name,
            scope,
            read_only,
            created_ms: now_ms,
            expires_ms,
            last_used_ms: None,
        };
        self.tokens.insert(
            id,
            Stored {
                info: info.clone(),
                sha256: digest(&credential),
                saved_use: std::cell::Cell::new(None),
            },
        );
        Ok((Secret(credential), info))
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut list: Vec<TokenInfo> = self.tokens.values().map(|s| s.info.clone()).collect();
        list.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        list
    }

    /// Revokes a token and its sessions.
    pub fn remove(&mut self, id: &TokenId) -> Result<TokenInfo, RpcError> {
        let stored = self.tokens.remove(id).ok_or_else(|| {
            RpcError::new(ErrorCode::BadRequest, format!("there is no token {id}"))
        })?;
        self.sessions.retain(|_, s| s.token != *id);
        Ok(stored.info)
    }

    pub fn info(&self, id: &TokenId) -> Option<&TokenInfo> {
        self.tokens.get(id).map(|s| &s.info)
    }

    /// Checks a credential from `peer`. The answer is the same for every kind of bad
    /// credential (malformed, unknown, wrong secret, expired, revoked) bar expiry, which only
    /// the holder of the right secret learns. `Ok((grant, save))`: `save` when the token's
    /// last use should reach the disk.
    pub fn authenticate(
        &mut self,
        credential: &Secret,
        peer: Option<IpAddr>,
        now: Instant,
        now_ms: u64,
    ) -> Result<(Grant, bool), RpcError> {
        let key = failure_key(peer);
        if let Some(bucket) = self.failures.get_mut(&key) {
            refill(bucket, now);
            if bucket.left < 1.0 {
                return Err(RpcError::new(
                    ErrorCode::RateLimited,
                    "too many bad credentials from this address; try again in a few seconds",
                ));
            }
        }
        match self.check(credential, now_ms) {
            Ok(found) => Ok(found),
            Err(e) => {
                self.fail(key, now);
                Err(e)
            }
        }
    }

    fn check(&mut self, credential: &Secret, now_ms: u64) -> Result<(Grant, bool), RpcError> {
        let bad = || unauthenticated("the token is not valid (unknown, revoked or mistyped)");
        let (kind, id, _) = auth::split_credential(&credential.0).ok_or_else(bad)?;
        let sha256 = digest(&credential.0);
        let (token, session) = match kind {
            CredentialKind::Token => (id, None),
            CredentialKind::Session => {
                let session = self.sessions.get(&id).ok_or_else(bad)?;
                if !bool::from(session.sha256.ct_eq(&sha256)) {
                    return Err(bad());
                }
                if session.expires_ms <= now_ms {
                    self.sessions.remove(&id);
                    return Err(unauthenticated("the session has ended; log in again"));
                }
                (session.token.clone(), Some(id))
            }
        };
        let stored = self.tokens.get_mut(&token).ok_or_else(bad)?;
        if session.is_none() && !bool::from(stored.sha256.ct_eq(&sha256)) {
            return Err(bad());
        }
        if stored.info.expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(unauthenticated(format!(
                "token {token} has expired; ask for a new one"
            )));
        }
        stored.info.last_used_ms = Some(now_ms);
        let save = stored
            .saved_use
            .get()
            .is_none_or(|saved| now_ms.saturating_sub(saved) >= LAST_USED_SAVE_MS);
        Ok((
            Grant {
                token,
                scope: stored.info.scope.clone(),
                read_only: stored.info.read_only,
                session,
            },
            save,
        ))
    }

    fn fail(&mut self, key: Option<IpAddr>, now: Instant) {
        if !self.failures.contains_key(&key) && self.failures.len() >= MAX_TRACKED {
            // Forget the addresses that have earned their whole burst back; if a flood from
            // many addresses leaves none, forget them all rather than refuse strangers.
            self.failures.retain(|_, bucket| {
                refill(bucket, now);
                bucket.left < FAILURE_BURST
            });
            if self.failures.len() >= MAX_TRACKED {
                self.failures.clear();
            }
        }
        let bucket = self.failures.entry(key).or_insert(Bucket {
            left: FAILURE_BURST,
            at: now,
        });
        refill(bucket, now);
        bucket.left -= 1.0;
    }

    /// Opens a dashboard session for a grant made from a token (not from another session).
    pub fn login(&mut self, grant: &Grant, now_ms: u64) -> Result<(Secret, u64), RpcError> {
        if grant.session.is_some() {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "log in with a token, not with a session",
            ));
        }
        let token_expiry = self
            .tokens
            .get(&grant.token)
            .and_then(|s| s.info.expires_ms)
            .unwrap_or(u64::MAX);
        let expires_ms = now_ms
            .saturating_add(SESSION_LIFETIME.as_millis() as u64)
            .min(token_expiry);
        self.sessions.retain(|_, s| s.expires_ms > now_ms);
        if self.sessions.len() >= MAX_SESSIONS {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.sessions.remove(&oldest);
            }
        }
        let id = loop {
            let id = TokenId::new(&random_hex(auth::ID_LEN / 2)?)
                .ok_or_else(|| RpcError::new(ErrorCode::Internal, "bad session id"))?;
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        let credential = format!(
            "{}{id}_{}",
            auth::SESSION_PREFIX,
            random_hex(auth::SECRET_LEN / 2)?
        );
        self.sessions.insert(
            id,
            Session {
                token: grant.token.clone(),
                sha256: digest(&credential),
                expires_ms,
            },
        );
        Ok((Secret(credential), expires_ms))
    }

    /// Ends the session a grant was made from.
    pub fn logout(&mut self, grant: &Grant) -> Result<(), RpcError> {
        let session = grant.session.as_ref().ok_or_else(|| {
            RpcError::new(
                ErrorCode::BadRequest,
                "logout ends a dashboard session; revoke a token with token rm",
            )
        })?;
        self.sessions.remove(session);
        Ok(())
    }

    /// Whether the token behind a grant (and its session) still exists and has not expired.
    pub fn still_valid(&self, grant: &Grant, now_ms: u64) -> bool {
        let token = self
            .tokens
            .get(&grant.token)
            .is_some_and(|s| s.info.expires_ms.is_none_or(|at| at > now_ms));
        let session = grant
            .session
            .as_ref()
            .is_none_or(|id| self.sessions.get(id).is_some_and(|s| s.expires_ms > now_ms));
        token && session
    }

    pub fn session_expiry(&self, grant: &Grant) -> Option<u64> {
        grant
            .session
            .as_ref()
            .and_then(|id| self.sessions.get(id))
            .map(|s| s.expires_ms)
    }
}

fn refill(bucket: &mut Bucket, now: Instant) {
    let earned = now.saturating_duration_since(bucket.at).as_secs_f64() * FAILURE_REFILL_PER_S;
    bucket.left = (bucket.left + earned).min(FAILURE_BURST);
    bucket.at = now;
}

/// Whether `grant` may make `call`. Scope is checked before existence, so a refusal says
/// nothing about whether an instance out of scope exists. `list` is allowed to every scope
/// and answered with the instances the scope covers.
pub fn permit(grant: &Grant, call: &Request) -> Result<(), RpcError> {
    let who = || format!("token {} ({})", grant.token, grant.scope);
    if !call.api_call() {
        return Err(RpcError::new(
            ErrorCode::BadRequest,
            format!("{} is not a call of the management API", call.name()),
        ));
    }
    if grant.read_only && call.mutates() {
        return Err(forbidden(format!(
            "{} is read-only and may not {}",
            who(),
            call.name()
        )));
    }
    let tenant = matches!(grant.scope, Scope::Tenant(_));
    let covers = |instance: &tenement_proto::InstanceId| grant.scope.covers(instance);
    let of_service = |service: &tenement_proto::ServiceName| match &grant.scope {
        Scope::Admin => true,
        Scope::Service(own) => own == service,
        Scope::Tenant(_) => false,
    };
    let allowed = match call {
        Request::Whoami | Request::Login | Request::Logout | Request::List { .. } => true,
        Request::TokenCreate { .. }
        | Request::TokenList
        | Request::TokenRemove { .. }
        | Request::FleetHosts
        | Request::FleetDrain { .. }
        | Request::Reload => grant.scope == Scope::Admin,
        Request::Wake { instance, .. }
        | Request::Status { instance }
        | Request::Logs { instance, .. }
        | Request::Restart { instance }
        | Request::Stop { instance } => covers(instance),
        Request::Spawn { instance }
        | Request::Remove { instance, .. }
        | Request::Weight { instance, .. }
        | Request::Deploy { instance, .. }
        | Request::Pin { instance, .. } => !tenant && covers(instance),
        Request::Route { from, to } => !tenant && covers(from) && covers(to),
        Request::Add { instances } => !tenant && instances.iter().all(covers),
        Request::Release { service, .. }
        | Request::Releases { service }
        | Request::Rollout { service, .. }
        | Request::Rollback { service, .. } => of_service(service),
        // Not API calls; refused above.
        Request::Hello { .. }
        | Request::Resolve { .. }
        | Request::Subscribe
        | Request::Activity { .. }
        | Request::ParkAck { .. }
        | Request::Stats { .. }
        | Request::FleetOwn { .. }
        | Request::Authed { .. } => false,
    };
    if allowed {
        Ok(())
    } else {
        let target = call.target().map(|t| format!(" {t}")).unwrap_or_default();
        Err(forbidden(format!(
            "{} may not {}{target}",
            who(),
            call.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenement_proto::rpc::{ListQuery, RolloutAction, RolloutOptions};
    use tenement_proto::{InstanceId, ServiceName};

    fn id(text: &str) -> InstanceId {
        InstanceId::parse(text).expect("valid id")
    }

    fn grant(scope: &str, read_only: bool) -> Grant {
        Grant {
            token: TokenId::new("0123456789abcdef").expect("valid"),
            scope: scope.parse().expect("valid scope"),
            read_only,
            session: None,
        }
    }

    #[test]
    fn scopes_cover_what_the_issue_says() {
        let notes = ServiceName::new("notes").expect("valid");
        let wiki = ServiceName::new("wiki").expect("valid");
        let alice = || id("notes:alice");
        let bob = || id("notes:bob");
        let calls: Vec<(Request, [bool; 5])> = vec![
            // admin, service:notes, tenant:notes:alice, read-only admin, read-only tenant
            (
                Request::Status { instance: alice() },
                [true, true, true, true, true],
            ),
            (
                Request::Status { instance: bob() },
                [true, true, false, true, false],
            ),
            (
                Request::Status {
                    instance: id("wiki:alice"),
                },
                [true, false, false, true, false],
            ),
            (
                Request::Logs {
                    instance: bob(),
                    lines: None,
                    follow: true,
                },
                [true, true, false, true, false],
            ),
            (
                Request::Wake {
                    instance: alice(),
                    timeout_ms: None,
                },
                [true, true, true, false, false],
            ),
            (
                Request::Restart { instance: alice() },
                [true, true, true, false, false],
            ),
            (
                Request::Stop { instance: bob() },
                [true, true, false, false, false],
            ),
            (
                Request::Remove {
                    instance: alice(),
                    purge: false,
                },
                [true, true, false, false, false],
            ),
            (
                Request::Spawn { instance: alice() },
                [true, true, false, false, false],
            ),
            (
                Request::Add {
                    instances: vec![alice(), id("wiki:x")],
                },
                [true, false, false, false, false],
            ),
            (
                Request::Route {
                    from: alice(),
                    to: bob(),
                },
                [true, true, false, false, false],
            ),
            (Request::Reload, [true, false, false, false, false]),
            (
                Request::Releases {
                    service: notes.clone(),
                },
                [true, true, false, true, false],
            ),
            (
                Request::Rollout {
                    service: notes.clone(),
                    action: RolloutAction::Status,
                },
                [true, true, false, true, false],
            ),
            (
                Request::Rollout {
                    service: notes.clone(),
                    action: RolloutAction::Pause,
                },
                [true, true, false, false, false],
            ),
            (
                Request::Release {
                    service: wiki,
                    options: RolloutOptions::default(),
                },
                [true, false, false, false, false],
            ),
            (Request::TokenList, [true, false, false, true, false]),
            // The fleet's hosts: admin tokens only, read-only ones may look.
            (Request::FleetHosts, [true, false, false, true, false]),
            (
                Request::FleetDrain {
                    host: "h1".to_owned(),
                    drain: true,
                },
                [true, false, false, false, false],
            ),
            (
                Request::TokenCreate {
                    scope: Scope::Tenant(alice()),
                    read_only: true,
                    lifetime_s: None,
                    name: None,
                },
                [true, false, false, false, false],
            ),
            (
                Request::List {
                    query: ListQuery::default(),
                },
                [true, true, true, true, true],
            ),
            (Request::Whoami, [true, true, true, true, true]),
            (Request::Subscribe, [false, false, false, false, false]),
            (
                Request::Resolve { instance: alice() },
                [false, false, false, false, false],
            ),
        ];
        let grants = [
            grant("admin", false),
            grant("service:notes", false),
            grant("tenant:notes:alice", false),
            grant("admin", true),
            grant("tenant:notes:alice", true),
        ];
        for (call, expected) in calls {
            for (grant, want) in grants.iter().zip(expected) {
                let got = permit(grant, &call);
                assert_eq!(
                    got.is_ok(),
                    want,
                    "{} by {} read_only={}: {got:?}",
                    call.name(),
                    grant.scope,
                    grant.read_only
                );
            }
        }
    }

    #[test]
    fn tokens_check_revoke_and_expire() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        let (secret, info) = tokens
            .create(Scope::Admin, false, Some(60), Some("ci".into()), 1_000)
            .expect("created");
        assert!(secret.0.starts_with("tnm_") && secret.0.len() == auth::CREDENTIAL_LEN);
        let (grant, save) = tokens
            .authenticate(&secret, None, now, 2_000)
            .expect("valid");
        assert_eq!(
            (grant.token.clone(), grant.scope.clone(), save),
            (info.id.clone(), Scope::Admin, true)
        );
        // The registry saves; within a minute of that, a use is not worth a write.
        let _ = tokens.persisted();
        let (_, save) = tokens
            .authenticate(&secret, None, now, 3_000)
            .expect("valid");
        assert!(!save);
        // A flipped secret digit is refused.
        let mut wrong = secret.0.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        let wrong = Secret(String::from_utf8(wrong).expect("ascii"));
        let e = tokens
            .authenticate(&wrong, None, now, 3_000)
            .expect_err("wrong");
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        // Expiry.
        let e = tokens
            .authenticate(&secret, None, now, 61_000)
            .expect_err("expired");
        assert!(e.message.contains("expired"), "{e:?}");
        // Sessions die with their token.
        let (session, expires) = tokens.login(&grant, 4_000).expect("login");
        assert_eq!(expires, 61_000, "capped at the token's expiry");
        let (by_session, _) = tokens
            .authenticate(&session, None, now, 5_000)
            .expect("session valid");
        assert!(by_session.session.is_some());
        assert!(
            tokens.login(&by_session, 5_000).is_err(),
            "no session from a session"
        );
        tokens.remove(&info.id).expect("removed");
        assert!(tokens.authenticate(&session, None, now, 6_000).is_err());
        assert!(tokens.authenticate(&secret, None, now, 6_000).is_err());
    }

    #[test]
    fn saved_tokens_keep_working_and_hold_no_secret() {
        let mut tokens = Tokens::default();
        let (secret, _) = tokens
            .create("service:notes".parse().expect("scope"), true, None, None, 1)
            .expect("created");
        let saved = tokens.persisted();
        let text = serde_json::to_string(&saved).expect("json");
        let secret_part = secret.0.rsplit('_').next().expect("secret part");
        assert!(
            !text.contains(secret_part),
            "the secret reached the file: {text}"
        );
        let mut again = Tokens::load(serde_json::from_str(&text).expect("read back"));
        let (grant, _) = again
            .authenticate(&secret, None, Instant::now(), 2)
            .expect("valid after a reload");
        assert!(grant.read_only);
    }

    #[test]
    fn failures_are_limited_per_address_only() {
        let mut tokens = Tokens::default();
        let (good, _) = tokens
            .create(Scope::Admin, false, None, None, 1)
            .expect("created");
        let now = Instant::now();
        let attacker: IpAddr = "203.0.113.7".parse().expect("ip");
        let friend: IpAddr = "198.51.100.1".parse().expect("ip");
        let junk = Secret("tnm_nope".into());
        let mut limited = 0;
        for _ in 0..1000 {
            let e = tokens
                .authenticate(&junk, Some(attacker), now, 2)
                .expect_err("junk");
            if e.code == ErrorCode::RateLimited {
                limited += 1;
            }
        }
        assert_eq!(limited, 1000 - FAILURE_BURST as usize);
        // The attacker's address is refused even with a good token, for a while ...
        let e = tokens
            .authenticate(&good, Some(attacker), now, 2)
            .expect_err("limited");
        assert_eq!(e.code, ErrorCode::RateLimited);
        // ... everyone else is not.
        tokens
            .authenticate(&good, Some(friend), now, 2)
            .expect("another address is not locked out");
        // And the attacker earns attempts back with time.
        tokens
            .authenticate(&good, Some(attacker), now + Duration::from_secs(2), 2)
            .expect("refilled");
        // IPv6 neighbours in one /64 share a bucket.
        let a = failure_key(Some("2001:db8:1:2::1".parse().expect("ip")));
        let b = failure_key(Some("2001:db8:1:2:ffff::9".parse().expect("ip")));
        assert_eq!(a, b);
    }
}
