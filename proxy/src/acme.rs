//! Certificates from an ACME CA (RFC 8555), ordered on demand and renewed before they expire.
//!
//! A TLS handshake for a name without a certificate is held (up to `acme_wait`) while one is
//! ordered, but only for a name that is tenement's (the caller asks [`crate::forward::Proxy::
//! is_ours`]: a configured domain, a service of it, or an instance the supervisor has
//! registered): a name that merely arrives in SNI never causes an order. One order per name
//! runs at a time; the handshakes waiting for it share its outcome. A failed name is not
//! tried again before its backoff (1 min, doubling to 6 h) has passed, and every order counts
//! against a budget per hour and per 7 days that survives restarts.
//!
//! Challenges are answered by the proxy itself: TLS-ALPN-01 (RFC 8737) on its https listener,
//! HTTP-01 on its http listener under `/.well-known/acme-challenge/`.
//!
//! Everything lives in `<state dir>/acme/<directory>/` (0700, files 0600, written atomically):
//! `account.json` (the account key), `orders.json` (when orders were placed: the budget),
//! `certs/<name>/{cert.pem,key.pem}` and `status.json` (what `tenctl certs` shows). A
//! restarted proxy serves the stored certificates at once and places no new order.
//!
//! Renewal needs no traffic: a certificate is renewed inside the window the CA suggests (ARI,
//! RFC 9773) or else when a third of its lifetime is left, less a random jitter, as long as
//! its name is still tenement's.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tenement_proto::atomic::write_atomically;
use tenement_proto::certs::{acme_dir, AcmeStatus, NameStatus, STATUS_FILE};
use tenement_proto::config::{self, Challenge};
use tokio::sync::{watch, Notify, OnceCell};

use crate::lock;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// The longest an order may take, all steps included (a CA that stops answering).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Backoff after a failed order for a name: doubled per failure up to the cap.
const BACKOFF_FIRST: Duration = Duration::from_secs(60);
const BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);
/// The renewal loop looks again at least this often.
const RENEW_CHECK_MAX: Duration = Duration::from_secs(3600);
const HOUR: Duration = Duration::from_secs(3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

/// A stored certificate's dates and when it is due for renewal.
#[derive(Debug, Clone)]
struct Held {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    renew_at: SystemTime,
    /// ARI's name for it; `None` without an Authority Key Identifier.
    ari_id: Option<CertificateIdentifier<'static>>,
    /// When ARI was last asked about it (`None`: not yet).
    ari_checked: Option<SystemTime>,
    /// Its name stopped being tenement's: not renewed (logged once).
    abandoned: bool,
}

/// Failed orders of one name.
#[derive(Debug, Clone)]
struct Failure {
    count: u32,
    retry_at: SystemTime,
    reason: String,
}

/// Why a name got no certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}")]
    Failed(String),
    #[error("backing off after {count} failed orders until {until} s from now: {reason}")]
    BackingOff {
        count: u32,
        until: u64,
        reason: String,
    },
    #[error("the ACME budget is spent: {0}")]
    Budget(String),
    #[error("no certificate within acme_wait; the order goes on")]
    Waiting,
}

/// An order's outcome as its waiters see it (`None`: still running).
type Outcome = Option<Result<(), AcmeError>>;

/// Certificates from ACME: the store, the orders in flight and the challenges being answered.
pub struct Acme {
    config: config::Acme,
    /// `<state dir>/acme/<directory>`.
    dir: PathBuf,
    /// Which challenges this proxy can answer (it has the listener for them).
    can: Vec<Challenge>,
    account: OnceCell<Account>,
    /// Served certificates by name (what handshakes read).
    served: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    held: Mutex<HashMap<String, Held>>,
    pending: Mutex<HashMap<String, watch::Receiver<Outcome>>>,
    failures: Mutex<HashMap<String, Failure>>,
    /// Unix seconds of the orders placed in the last 7 days.
    orders: Mutex<Vec<u64>>,
    /// Whether the spent budget was already logged (once per spell).
    budget_logged: Mutex<bool>,
    /// HTTP-01: token -> key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name -> the challenge certificate.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Wakes the renewal loop when a certificate was added.
    changed: Notify,
}

impl fmt::Debug for Acme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acme").field("dir", &self.dir).finish()
    }
}

/// Unix seconds of `at` (0 before 1970).
pub(crate) fn unix(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The error and its causes on one line (hyper's "client error (Connect)" says little alone).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn acme_error(what: &str, e: instant_acme::Error) -> String {
    match &e {
        instant_acme::Error::Api(problem) => {
            let detail = problem.detail.as_deref().unwrap_or("no detail");
            let kind = problem.r#type.as_deref().unwrap_or("problem");
            format!("{what}: the CA says {kind}: {detail}")
        }
        _ => format!("{what}: {}", chain(&e)),
    }
}

/// A name this module may use as a directory name: lower-case DNS characters only.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

/// Creates `dir` (and parents) at 0700, or narrows an existing one to 0700.
fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private (0700): {e}", dir.display()))?;
    }
    Ok(())
}

/// When to renew a certificate valid from `not_before` to `not_after` without ARI: when a
/// third of its lifetime is left, less up to a 15th of it at random (so certificates made
/// together are not all renewed in the same second).
fn renewal_point(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let jitter = lifetime.mul_f64(fastrand::f64() / 15.0);
    not_after
        .checked_sub(lifetime / 3 + jitter)
        .unwrap_or(not_before)
}

/// A random point of ARI's suggested window (RFC 9773 4.2).
fn in_window(start: SystemTime, end: SystemTime) -> SystemTime {
    let span = end.duration_since(start).unwrap_or(Duration::ZERO);
    start + span.mul_f64(fastrand::f64())
}

/// Reads a stored certificate: its chain and key as served, its dates and ARI name.
fn read_held(cert_pem: &[u8], key_pem: &[u8]) -> Result<Held, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM chain: {e:?}"))?;
    let leaf = chain.first().ok_or("no certificate in it")?.clone();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e:?}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let key =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("unusable key: {e}"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let time = |t: x509_parser::time::ASN1Time| {
        let s = t.timestamp();
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0))
    };
    let not_before = time(parsed.validity().not_before);
    let not_after = time(parsed.validity().not_after);
    Ok(Held {
        key: Arc::new(key),
        not_after,
        renew_at: renewal_point(not_before, not_after),
        ari_id: CertificateIdentifier::try_from(&leaf).ok(),
        ari_checked: None,
        abandoned: false,
    })
}

impl Acme {
    /// Opens (creating it) the store under `state_dir` and loads every stored certificate.
    /// `can` lists the challenges this proxy has a listener for.
    pub fn open(
        config: config::Acme,
        state_dir: &Path,
        can: Vec<Challenge>,
    ) -> Result<Arc<Acme>, String> {
        private_dir(state_dir)?;
        let dir = acme_dir(state_dir, &config.directory);
        private_dir(&dir.join("certs"))?;
        let can: Vec<Challenge> = config
            .challenges
            .iter()
            .copied()
            .filter(|c| can.contains(c))
            .collect();
        if can.is_empty() {
            return Err(format!(
                "acme_challenges = [{}] but the proxy has no listener to answer them on: tls-alpn-01 needs the https listener, http-01 an http one (port 80)",
                config
                    .challenges
                    .iter()
                    .map(|c| format!("\"{}\"", c.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let orders: Vec<u64> = std::fs::read(dir.join("orders.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let acme = Acme {
            config,
            dir,
            can,
            account: OnceCell::new(),
            served: ArcSwap::default(),
            held: Mutex::default(),
            pending: Mutex::default(),
            failures: Mutex::default(),
            orders: Mutex::new(orders),
            budget_logged: Mutex::new(false),
            http01: Mutex::default(),
            tls_alpn01: Mutex::default(),
            changed: Notify::new(),
        };
        acme.load_stored();
        Ok(Arc::new(acme))
    }

    fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// Loads every `certs/<name>/` that holds a usable pair; the rest is logged and left.
    fn load_stored(&self) {
        let Ok(entries) = std::fs::read_dir(self.certs_dir()) else {
            return;
        };
        let mut held = lock(&self.held);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !safe_name(&name) {
                continue;
            }
            let path = entry.path();
            let loaded = std::fs::read(path.join("cert.pem"))
                .and_then(|c| std::fs::read(path.join("key.pem")).map(|k| (c, k)))
                .map_err(|e| e.to_string())
                .and_then(|(c, k)| read_held(&c, &k));
            match loaded {
                Ok(h) => {
                    tracing::info!(
                        "serving the stored ACME certificate of {name} ({})",
                        expiry_text(h.not_after)
                    );
                    held.insert(name, h);
                }
                Err(e) => tracing::error!(
                    "the stored ACME certificate in {} cannot be used ({e}); {name} gets a new one when asked for",
                    path.display()
                ),
            }
        }
        self.publish(&held);
        drop(held);
        self.write_status();
    }

    fn publish(&self, held: &HashMap<String, Held>) {
        let served = held
            .iter()
            .map(|(name, h)| (name.clone(), h.key.clone()))
            .collect();
        self.served.store(Arc::new(served));
    }

    /// The certificate served for `name` (lower-case), if ACME has one.
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.served.load().get(name).cloned()
    }

    /// (name, notAfter in unix seconds) of every certificate held.
    pub fn expiries(&self) -> Vec<(String, u64)> {
        lock(&self.held)
            .iter()
            .map(|(name, h)| (name.clone(), unix(h.not_after)))
            .collect()
    }

    /// (name, failed orders in a row) of every name whose last order failed.
    pub fn failures(&self) -> Vec<(String, u32)> {
        lock(&self.failures)
            .iter()
            .map(|(name, f)| (name.clone(), f.count))
            .collect()
    }

    /// How long a first handshake waits for its certificate (`acme_wait`).
    pub fn wait(&self) -> Duration {
        self.config.wait
    }

    /// HTTP-01: the key authorization to answer `/.well-known/acme-challenge/<token>` with.
    pub fn http01_answer(&self, token: &str) -> Option<String> {
        lock(&self.http01).get(token).cloned()
    }

    /// TLS-ALPN-01: the config of a handshake that asked for `acme-tls/1` for `name`, if a
    /// challenge for it is being answered.
    pub fn tls_alpn01_config(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        let key = lock(&self.tls_alpn01).get(name).cloned()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneKey(key)));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Some(Arc::new(config))
    }

    /// Makes sure `name` (lower-case, and tenement's: the caller checked) has a certificate,
    /// ordering one if needed and waiting for it until `deadline`.
    pub async fn ensure(
        self: &Arc<Self>,
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), AcmeError> {
        if self.find(name).is_some() {
            return Ok(());
        }
        let mut rx = {
            let mut pending = lock(&self.pending);
            match pending.get(name) {
                Some(rx) => rx.clone(),
                None => {
                    if let Some(f) = lock(&self.failures).get(name) {
                        if f.retry_at > SystemTime::now() {
                            return Err(AcmeError::BackingOff {
                                count: f.count,
                                until: f
                                    .retry_at
                                    .duration_since(SystemTime::now())
                                    .map_or(0, |d| d.as_secs()),
                                reason: f.reason.clone(),
                            });
                        }
                    }
                    let (tx, rx) = watch::channel(None);
                    pending.insert(name.to_owned(), rx.clone());
                    tokio::spawn(self.clone().run_pending(name.to_owned(), tx));
                    rx
                }
            }
        };
        let outcome = match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Err(AcmeError::Waiting)),
            Ok(Err(_)) => Err(AcmeError::Failed("the order was dropped".to_owned())),
            Err(_) => Err(AcmeError::Waiting),
        };
        outcome
    }

    /// Runs the order of `name` registered in `pending`: every waiter gets its outcome.
    async fn run_pending(self: Arc<Self>, name: String, tx: watch::Sender<Outcome>) {
        let outcome = self.obtain(&name).await;
        lock(&self.pending).remove(&name);
        let _ = tx.send(Some(outcome));
    }

    /// One order for `name`, from budget check to the stored certificate; a failure is
    /// recorded for the backoff and logged (once per distinct reason).
    async fn obtain(self: &Arc<Self>, name: &str) -> Result<(), AcmeError> {
        if !safe_name(name) {
            return Err(AcmeError::Failed(format!("{name:?} is not a DNS name")));
        }
        self.spend_budget()?;
        let renewal = lock(&self.held).get(name).map(|h| h.ari_id.clone());
        tracing::info!(
            "ordering a certificate for {name} from {}{}",
            self.config.directory,
            if renewal.is_some() { " (renewal)" } else { "" }
        );
        let started = std::time::Instant::now();
        let result =
            match tokio::time::timeout(ORDER_TIMEOUT, self.order(name, renewal.flatten())).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no answer within {} s from {}",
                    ORDER_TIMEOUT.as_secs(),
                    self.config.directory
                )),
            };
        // Whatever happened, no challenge of this name stays answerable.
        lock(&self.tls_alpn01).remove(name);
        match result {
            Ok(held) => {
                tracing::info!(
                    "certificate for {name} issued in {} ms ({})",
                    started.elapsed().as_millis(),
                    expiry_text(held.not_after)
                );
                lock(&self.failures).remove(name);
                let mut all = lock(&self.held);
                all.insert(name.to_owned(), held);
                self.publish(&all);
                drop(all);
                self.changed.notify_one();
                self.write_status();
                Ok(())
            }
            Err(reason) => {
                let mut failures = lock(&self.failures);
                let failure = failures.entry(name.to_owned()).or_insert(Failure {
                    count: 0,
                    retry_at: SystemTime::now(),
                    reason: String::new(),
                });
                failure.count += 1;
                let delay = BACKOFF_FIRST
                    .saturating_mul(1 << (failure.count - 1).min(16))
                    .min(BACKOFF_MAX);
                failure.retry_at = SystemTime::now() + delay;
                if failure.reason != reason {
                    tracing::warn!(
                        "no certificate for {name}: {reason}; trying again in {} s at the earliest",
                        delay.as_secs()
                    );
                } else {
                    tracing::debug!("no certificate for {name} again: {reason}");
                }
                failure.reason = reason.clone();
                let count = failure.count;
                drop(failures);
                self.write_status();
                Err(AcmeError::Failed(format!(
                    "{reason} (failure {count}, next try in {} s)",
                    delay.as_secs()
                )))
            }
        }
    }

    /// Counts an order against the budget, or refuses it.
    fn spend_budget(&self) -> Result<(), AcmeError> {
        let now = unix(SystemTime::now());
        let mut orders = lock(&self.orders);
        orders.retain(|&t| t + WEEK.as_secs() > now);
        let last_hour = orders.iter().filter(|&&t| t + HOUR.as_secs() > now).count();
        let refusal = if last_hour >= self.config.orders_per_hour as usize {
            Some(format!(
                "{last_hour} orders in the last hour (acme_orders_per_hour = {})",
                self.config.orders_per_hour
            ))
        } else if orders.len() >= self.config.orders_per_week as usize {
            Some(format!(
                "{} orders in the last 7 days (acme_orders_per_week = {}); a fleet of many tenants wants a wildcard certificate file (docs/CONFIG.md)",
                orders.len(),
                self.config.orders_per_week
            ))
        } else {
            None
        };
        let mut logged = lock(&self.budget_logged);
        if let Some(why) = refusal {
            if !*logged {
                tracing::warn!("ACME budget spent, no order placed: {why}");
                *logged = true;
            }
            return Err(AcmeError::Budget(why));
        }
        *logged = false;
        orders.push(now);
        let bytes = serde_json::to_vec(&*orders).unwrap_or_default();
        drop(orders);
        if let Err(e) = write_atomically(&self.dir.join("orders.json"), &bytes) {
            tracing::error!("cannot record the order in {}: {e}", self.dir.display());
        }
        Ok(())
    }

    /// The account: loaded from `account.json`, or created at the CA and saved there.
    async fn account(&self) -> Result<&Account, String> {
        self.account
            .get_or_try_init(|| async {
                let builder = || match &self.config.ca_file {
                    Some(ca) => Account::builder_with_root(ca)
                        .map_err(|e| acme_error(&format!("acme_ca_file {}", ca.display()), e)),
                    None => Account::builder().map_err(|e| acme_error("the system's roots", e)),
                };
                let path = self.dir.join("account.json");
                if let Ok(bytes) = std::fs::read(&path) {
                    match serde_json::from_slice::<AccountCredentials>(&bytes) {
                        Ok(credentials) => {
                            return builder()?
                                .from_credentials(credentials)
                                .await
                                .map_err(|e| acme_error("the ACME directory", e));
                        }
                        Err(e) => tracing::error!(
                            "{} cannot be read ({e}); registering a new account",
                            path.display()
                        ),
                    }
                }
                let contact = format!("mailto:{}", self.config.email);
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &[&contact],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| acme_error("registering the ACME account", e))?;
                let bytes = serde_json::to_vec(&credentials)
                    .map_err(|e| format!("cannot serialise the account: {e}"))?;
                write_atomically(&path, &bytes)
                    .map_err(|e| format!("cannot save the account to {}: {e}", path.display()))?;
                tracing::info!(
                    "registered ACME account {} at {}",
                    account.id(),
                    self.config.directory
                );
                Ok(account)
            })
            .await
    }

    /// The ACME exchange for one name: order, one challenge answered, finalize, download,
    /// store.
    async fn order(
        &self,
        name: &str,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<Held, String> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_owned())];
        let mut new = NewOrder::new(&identifiers);
        if let Some(id) = replaces.clone() {
            new = new.replaces(id);
        }
        let mut order = match account.new_order(&new).await {
            Err(instant_acme::Error::Unsupported(_)) if replaces.is_some() => account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map_err(|e| acme_error("placing the order", e))?,
            other => other.map_err(|e| acme_error("placing the order", e))?,
        };
        let mut tokens = Vec::new();
        let answered = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(|e| acme_error("reading the authorization", e))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => return Err(format!("the authorization is {other:?}")),
                }
                let offered: Vec<ChallengeType> =
                    authz.challenges.iter().map(|c| c.r#type.clone()).collect();
                let Some(kind) = self
                    .can
                    .iter()
                    .find(|c| offered.contains(&challenge_type(**c)))
                    .copied()
                else {
                    return Err(format!(
                        "the CA offers none of the challenges this proxy answers ({})",
                        self.can
                            .iter()
                            .map(|c| c.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                };
                let mut challenge = authz
                    .challenge(challenge_type(kind))
                    .ok_or("the challenge disappeared")?;
                let key_authorization = challenge.key_authorization();
                match kind {
                    Challenge::Http01 => {
                        lock(&self.http01).insert(
                            challenge.token.clone(),
                            key_authorization.as_str().to_owned(),
                        );
                        tokens.push(challenge.token.clone());
                    }
                    Challenge::TlsAlpn01 => {
                        let key = alpn_certificate(name, key_authorization.digest().as_ref())?;
                        lock(&self.tls_alpn01).insert(name.to_owned(), key);
                    }
                }
                tracing::debug!("answering {} for {name}", kind.as_str());
                challenge
                    .set_ready()
                    .await
                    .map_err(|e| acme_error("starting the challenge", e))?;
            }
            Ok::<(), String>(())
        }
        .await;
        // The first look soon (a CA close by validates in tens of milliseconds, and a
        // handshake is waiting), then backing off: 50, 100, 200 ms...
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(50))
            .backoff(2.0)
            .timeout(ORDER_TIMEOUT);
        let ready = match answered {
            Ok(()) => order
                .poll_ready(&retry)
                .await
                .map_err(|e| acme_error("waiting for validation", e)),
            Err(e) => Err(e),
        };
        {
            let mut http01 = lock(&self.http01);
            for token in &tokens {
                http01.remove(token);
            }
        }
        let status = ready?;
        if status != OrderStatus::Ready {
            return Err(self.why_invalid(&mut order, status).await);
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| acme_error("finalizing the order", e))?;
        let chain_pem = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| acme_error("downloading the certificate", e))?;
        let mut held = read_held(chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| format!("the CA's certificate cannot be used: {e}"))?;
        let dir = self.certs_dir().join(name);
        private_dir(&dir)?;
        // The key first: a crash between the two leaves a new key beside the old
        // certificate, which the next start refuses and orders again, never a mismatch served.
        write_atomically(&dir.join("key.pem"), key_pem.as_bytes())
            .and_then(|()| write_atomically(&dir.join("cert.pem"), chain_pem.as_bytes()))
            .map_err(|e| format!("cannot store the certificate in {}: {e}", dir.display()))?;
        held.ari_checked = None;
        Ok(held)
    }

    /// The CA's reason an order ended `status` instead of ready.
    async fn why_invalid(&self, order: &mut instant_acme::Order, status: OrderStatus) -> String {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(authz)) = authorizations.next().await {
            for challenge in &authz.challenges {
                if let Some(problem) = &challenge.error {
                    reasons.push(format!(
                        "{:?}: {}",
                        challenge.r#type,
                        problem.detail.as_deref().unwrap_or("failed")
                    ));
                }
            }
        }
        if reasons.is_empty() {
            format!("the order ended {status:?}")
        } else {
            format!("validation failed: {}", reasons.join("; "))
        }
    }

    /// Renews certificates when due, until the proxy stops. `is_ours` says whether a name is
    /// still tenement's (`None`: cannot tell now, the supervisor is away): a name that is not
    /// (its instance removed) is not renewed, looked at again every hour (it may come back),
    /// and forgotten, files and all, once its certificate has expired.
    pub async fn renew<F, Fut>(self: Arc<Self>, is_ours: F)
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Option<bool>>,
    {
        loop {
            self.refresh_ari().await;
            let now = SystemTime::now();
            let mut due = Vec::new();
            let mut next = now + RENEW_CHECK_MAX;
            {
                let held = lock(&self.held);
                let failures = lock(&self.failures);
                for (name, h) in held.iter() {
                    let at = match failures.get(name) {
                        Some(f) => f.retry_at.max(h.renew_at),
                        None => h.renew_at,
                    };
                    if at <= now {
                        due.push(name.clone());
                    } else {
                        next = next.min(at);
                    }
                }
            }
            for name in due {
                match is_ours(name.clone()).await {
                    Some(true) => {}
                    Some(false) => {
                        self.give_up(&name);
                        continue;
                    }
                    None => {
                        tracing::debug!(
                            "renewal of {name} waits: the supervisor's route table is not there"
                        );
                        if let Some(h) = lock(&self.held).get_mut(&name) {
                            h.renew_at = SystemTime::now() + Duration::from_secs(60);
                        }
                        continue;
                    }
                }
                if let Some(h) = lock(&self.held).get_mut(&name) {
                    if h.abandoned {
                        h.abandoned = false;
                        tracing::info!("{name} is tenement's again: its certificate is renewed");
                    }
                }
                // Registered as pending, so a handshake-driven order of the name (after the
                // certificate expired) is never doubled.
                let tx = {
                    let mut pending = lock(&self.pending);
                    if pending.contains_key(&name) {
                        continue;
                    }
                    let (tx, rx) = watch::channel(None);
                    pending.insert(name.clone(), rx);
                    tx
                };
                self.clone().run_pending(name, tx).await;
            }
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.changed.notified() => {}
            }
        }
    }

    /// `name` is no longer tenement's: not renewed (said once), looked at again in an hour,
    /// and once its certificate has expired, removed from memory and disk.
    fn give_up(&self, name: &str) {
        let mut held = lock(&self.held);
        let Some(h) = held.get_mut(name) else {
            return;
        };
        if !h.abandoned {
            h.abandoned = true;
            tracing::info!(
                "not renewing the certificate of {name}: the name is no longer tenement's (its instance or service was removed)"
            );
        }
        h.renew_at = SystemTime::now() + RENEW_CHECK_MAX;
        if h.not_after <= SystemTime::now() {
            held.remove(name);
            self.publish(&held);
            let dir = self.certs_dir().join(name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            } else {
                tracing::info!("forgot the expired certificate of {name}");
            }
        }
        drop(held);
        self.write_status();
    }

    /// Asks the CA's ARI for the renewal window of every certificate not asked about in the
    /// last 6 hours (when the CA offers ARI; otherwise the third-of-lifetime rule stays).
    async fn refresh_ari(&self) {
        let now = SystemTime::now();
        let stale: Vec<(String, CertificateIdentifier<'static>)> = lock(&self.held)
            .iter()
            .filter(|(_, h)| {
                !h.abandoned
                    && h.ari_checked
                        .is_none_or(|at| at + Duration::from_secs(6 * 3600) <= now)
            })
            .filter_map(|(n, h)| Some((n.clone(), h.ari_id.clone()?)))
            .collect();
        if stale.is_empty() {
            return;
        }
        let Ok(account) = self.account().await else {
            return;
        };
        for (name, id) in stale {
            let answer = account.renewal_info(&id).await;
            let mut held = lock(&self.held);
            let Some(h) = held.get_mut(&name) else {
                continue;
            };
            h.ari_checked = Some(now);
            match answer {
                Ok((info, _)) => {
                    let start: SystemTime = info.suggested_window.start.into();
                    let end: SystemTime = info.suggested_window.end.into();
                    h.renew_at = if start <= now {
                        now
                    } else {
                        in_window(start, end)
                    };
                }
                Err(instant_acme::Error::Unsupported(_)) => {}
                Err(e) => tracing::debug!("ARI for {name}: {}", chain(&e)),
            }
        }
    }

    /// What `tenctl certs` shows.
    pub fn status(&self) -> AcmeStatus {
        let now = unix(SystemTime::now());
        let orders = lock(&self.orders).clone();
        let mut names: HashMap<String, NameStatus> = HashMap::new();
        for (name, h) in lock(&self.held).iter() {
            names.insert(
                name.clone(),
                NameStatus {
                    name: name.clone(),
                    not_after: Some(unix(h.not_after)),
                    renew_at: Some(unix(h.renew_at)),
                    failures: 0,
                    last_error: None,
                    retry_at: None,
                    abandoned: h.abandoned,
                },
            );
        }
        for (name, f) in lock(&self.failures).iter() {
            let entry = names.entry(name.clone()).or_insert(NameStatus {
                name: name.clone(),
                not_after: None,
                renew_at: None,
                failures: 0,
                last_error: None,
                retry_at: None,
                abandoned: false,
            });
            entry.failures = f.count;
            entry.last_error = Some(f.reason.clone());
            entry.retry_at = Some(unix(f.retry_at));
        }
        let mut names: Vec<NameStatus> = names.into_values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        AcmeStatus {
            directory: self.config.directory.clone(),
            orders_last_hour: orders.iter().filter(|&&t| t + HOUR.as_secs() > now).count(),
            orders_last_week: orders.iter().filter(|&&t| t + WEEK.as_secs() > now).count(),
            orders_per_hour: self.config.orders_per_hour,
            orders_per_week: self.config.orders_per_week,
            names,
        }
    }

    fn write_status(&self) {
        let status = self.status();
        if let Ok(bytes) = serde_json::to_vec_pretty(&status) {
            if let Err(e) = write_atomically(&self.dir.join(STATUS_FILE), &bytes) {
                tracing::debug!("cannot write the ACME status: {e}");
            }
        }
    }
}

fn challenge_type(c: Challenge) -> ChallengeType {
    match c {
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Http01 => ChallengeType::Http01,
    }
}

/// The self-signed certificate of a TLS-ALPN-01 answer: `name` as its only subjectAltName
/// and the critical acmeIdentifier extension holding the key authorization's digest.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])
        .map_err(|e| format!("challenge certificate: {e}"))?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let key = rcgen::KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("challenge certificate: {e}"))?;
    let der =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| format!("challenge key: {e}"))?;
    // Not `from_der`: its key check parses the certificate with webpki, which refuses the
    // critical extension no browser knows (it is for the CA's eyes only).
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// A resolver with one certificate, whatever the client asks (the TLS-ALPN-01 answer).
#[derive(Debug)]
struct OneKey(Arc<CertifiedKey>);

impl ResolvesServerCert for OneKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// "expires in 89 days".
pub fn expiry_text(at: SystemTime) -> String {
    match at.duration_since(SystemTime::now()) {
        Ok(left) if left >= Duration::from_secs(2 * 86_400) => {
            format!("expires in {} days", left.as_secs() / 86_400)
        }
        Ok(left) => format!("expires in {} s", left.as_secs()),
        Err(_) => "expired".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_case_dns_names_become_directories() {
        assert!(safe_name("alice.notes.example.com"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "A.example.com",
            "a..b",
            ".hidden",
            "a b",
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn renewal_falls_when_a_third_of_the_lifetime_is_left_less_jitter() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90 * 86_400);
        for _ in 0..200 {
            let at = renewal_point(start, end);
            let left = end.duration_since(at).expect("before the end");
            assert!(left >= Duration::from_secs(30 * 86_400), "{left:?}");
            assert!(left <= Duration::from_secs(36 * 86_400), "{left:?}");
        }
        let (a, b) = (start, start + Duration::from_secs(100));
        for _ in 0..200 {
            let at = in_window(a, b);
            assert!(at >= a && at <= b);
        }
    }

    #[test]
    fn a_tls_alpn_01_certificate_carries_the_critical_acme_identifier() {
        let digest = [7u8; 32];
        let key = alpn_certificate("alice.notes.example.com", &digest).expect("made");
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).expect("parses");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier present");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
    }
}
