//! HTTPS: the certificates the proxy serves and the rustls server config that picks one by
//! the client's server name (SNI).
//!
//! Sources, first match wins: the certificate files of `[settings.tls] certificates` in the
//! file's order (an exact name before a wildcard), then certificates from ACME (`acme.rs`),
//! then the proxy's own self-signed certificate when it runs with `--tls-self-signed`. A
//! client that sends no server name gets the first file's certificate; a name nothing covers
//! fails the handshake (rustls sends `access_denied`), so the proxy never shows a certificate
//! for a name it does not serve.
//!
//! Files are read again when the config is reloaded (SIGHUP, `tenctl reload`) and when one of
//! them changes on disk (checked every [`WATCH_INTERVAL`], following symlinks as certbot's
//! `live/` links are): a renewed certificate is served without a restart. A pair that fails
//! to load keeps the version read before, with an error in the log; at start there is no
//! earlier version, and the proxy refuses to start.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tenement_proto::config::CertificateFiles;

use crate::acme::{unix, Acme};
use crate::lock;

/// How often certificate files are checked for a change.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The names certificates are looked up by, built anew whenever a source changes.
#[derive(Default)]
struct Names {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.notes.example.com` is kept under `notes.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients that send no server name.
    default: Option<Arc<CertifiedKey>>,
}

impl Names {
    fn build<'a>(sources: impl Iterator<Item = &'a Loaded>) -> Names {
        let mut names = Names::default();
        for loaded in sources {
            names.default.get_or_insert_with(|| loaded.key.clone());
            for name in &loaded.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut names.wildcard, parent.to_owned()),
                    None => (&mut names.exact, name.clone()),
                };
                map.entry(key).or_insert_with(|| loaded.key.clone());
            }
        }
        names
    }

    fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key);
        }
        // A wildcard covers exactly one label (RFC 6125 6.4.3).
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// What identifies a file's content without reading it: a renewal writes a new file (a new
/// inode behind certbot's symlink) or rewrites it (a new mtime or size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            len: m.len(),
        })
    }
}

/// One certificate with its key, as served.
pub struct Loaded {
    /// The certificate file it came from (`None`: made in memory).
    file: Option<std::path::PathBuf>,
    key: Arc<CertifiedKey>,
    /// Lower-case DNS names of its subjectAltName, wildcards as `*.parent`.
    names: Vec<String>,
    not_after: SystemTime,
}

impl fmt::Display for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}", file.display()),
            None => f.write_str("the self-signed certificate"),
        }
    }
}

/// Reads a PEM certificate chain and its PEM private key; checks the key is the chain's and
/// reads the names the certificate is for. The error is one line naming the file.
fn load(files: &CertificateFiles) -> Result<Loaded, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate {cert_path}: {}", pem_error(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {cert_path}: no CERTIFICATE block in it; give the PEM chain (fullchain.pem), leaf first"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("key {key_path}: {}", pem_error(&e)))?;
    if let Ok(meta) = std::fs::metadata(&files.key) {
        if meta.mode() & 0o007 != 0 {
            tracing::warn!(
                "key {key_path} can be read by every user; make it readable by the proxy's user only (chmod 640, group tenement-proxy)"
            );
        }
    }
    certified(chain, key, Some(files.cert.clone()))
        .map_err(|e| format!("certificate {cert_path} with key {key_path}: {e}"))
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    file: Option<std::path::PathBuf>,
) -> Result<Loaded, String> {
    let (names, not_after) = names_of(&chain[0])?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the key does not belong to the certificate (the first one in the chain)".to_owned()
        }
        other => format!("unusable key: {other}"),
    })?;
    Ok(Loaded {
        file,
        key: Arc::new(key),
        names,
        not_after,
    })
}

pub(crate) fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM block of the expected kind in it".to_owned()
        }
        other => format!("not valid PEM ({other:?})"),
    }
}

/// The DNS names of a certificate's subjectAltName and its notAfter.
fn names_of(der: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("the first certificate cannot be parsed: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err(
            "the certificate names no DNS name in its subjectAltName; browsers ignore the common name, so tenement does too"
                .to_owned(),
        );
    }
    let seconds = cert.validity().not_after.timestamp();
    let not_after = if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    };
    Ok((names, not_after))
}

/// A certificate for `names` signed by its own key, made in memory (`--tls-self-signed`).
fn make_self_signed(names: Vec<String>) -> Result<Loaded, String> {
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
        .map_err(|e| format!("cannot use the self-signed key: {e}"))?;
    certified(vec![made.cert.der().clone()], key, None)
}

/// The names `--tls-self-signed` covers: every domain, its services' names and their
/// instances' (`*.{service}.{domain}`).
pub fn self_signed_names<'a>(
    domains: &[String],
    services: impl Iterator<Item = &'a str> + Clone,
) -> Vec<String> {
    let mut names = Vec::new();
    for domain in domains {
        names.push(domain.clone());
        names.push(format!("*.{domain}"));
        names.extend(services.clone().map(|s| format!("*.{s}.{domain}")));
    }
    names
}

/// One `{ cert, key }` of the config and what was last read from it.
struct Source {
    files: CertificateFiles,
    /// The last version that loaded; kept while the files are broken.
    cert: Option<Loaded>,
    /// The files' stamps at the last attempt (taken before reading, so a change made while
    /// reading is seen at the next check): unchanged files are not read, nor their error
    /// logged, again. `None`: never tried.
    tried: Option<[Option<Stamp>; 2]>,
}

impl Source {
    fn stamps(files: &CertificateFiles) -> [Option<Stamp>; 2] {
        [Stamp::of(&files.cert), Stamp::of(&files.key)]
    }

    /// Reads the files again if they changed since the last attempt; whether they had.
    fn refresh(&mut self) -> bool {
        let now = Source::stamps(&self.files);
        if self.tried == Some(now) {
            return false;
        }
        self.tried = Some(now);
        match load(&self.files) {
            Ok(cert) => {
                log_loaded(&cert);
                self.cert = Some(cert);
            }
            Err(e) if self.cert.is_some() => {
                tracing::error!("{e}; still serving the version read before")
            }
            Err(e) => tracing::error!("{e}; its names get no certificate until it is fixed"),
        }
        true
    }
}

struct Sources {
    files: Vec<Source>,
    /// `--tls-self-signed`: the certificate and the names it was made for.
    self_signed: Option<(Vec<String>, Loaded)>,
}

/// Every certificate the proxy serves; the rustls resolver of its HTTPS listeners.
pub struct Store {
    /// From the files, and the self-signed certificate (ACME's come between the two).
    names: ArcSwap<(Names, Names)>,
    sources: Mutex<Sources>,
    acme: Option<Arc<Acme>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tls::Store")
    }
}

impl Store {
    /// Reads every file; the first that cannot be used is the error (the proxy does not start
    /// with a certificate missing).
    pub fn new(
        files: &[CertificateFiles],
        self_signed: Option<Vec<String>>,
        acme: Option<Arc<Acme>>,
    ) -> Result<Store, String> {
        let mut sources = Vec::with_capacity(files.len());
        for pair in files {
            let tried = Source::stamps(pair);
            let cert = load(pair)?;
            log_loaded(&cert);
            sources.push(Source {
                files: pair.clone(),
                cert: Some(cert),
                tried: Some(tried),
            });
        }
        let self_signed = match self_signed {
            Some(names) => {
                let cert = make_self_signed(names.clone())?;
                log_loaded(&cert);
                Some((names, cert))
            }
            None => None,
        };
        let store = Store {
            names: ArcSwap::default(),
            sources: Mutex::new(Sources {
                files: sources,
                self_signed,
            }),
            acme,
        };
        store.publish(&lock(&store.sources));
        Ok(store)
    }

    /// After a config reload: the files now listed, each read again if it changed since it
    /// was last tried (a file that fails keeps its earlier version); with `self_signed`, a
    /// new self-signed certificate if the names it must cover changed.
    pub fn configure(&self, files: &[CertificateFiles], self_signed: Option<Vec<String>>) {
        let mut sources = lock(&self.sources);
        let mut previous = std::mem::take(&mut sources.files);
        for pair in files {
            let mut source = match previous.iter().position(|s| s.files == *pair) {
                Some(i) => previous.swap_remove(i),
                None => Source {
                    files: pair.clone(),
                    cert: None,
                    tried: None,
                },
            };
            source.refresh();
            sources.files.push(source);
        }
        if let Some(names) = self_signed {
            if sources.self_signed.as_ref().map(|(n, _)| n) != Some(&names) {
                match make_self_signed(names.clone()) {
                    Ok(cert) => {
                        log_loaded(&cert);
                        sources.self_signed = Some((names, cert));
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
        }
        self.publish(&sources);
    }

    /// Reads again every file that changed on disk since it was last tried; whether any had.
    pub fn refresh(&self) -> bool {
        let mut sources = lock(&self.sources);
        let mut changed = false;
        for source in &mut sources.files {
            changed |= source.refresh();
        }
        if changed {
            self.publish(&sources);
        }
        changed
    }

    fn publish(&self, sources: &Sources) {
        let files = Names::build(sources.files.iter().filter_map(|s| s.cert.as_ref()));
        let own = Names::build(
            sources
                .self_signed
                .as_ref()
                .map(|(_, cert)| cert)
                .into_iter(),
        );
        self.names.store(Arc::new((files, own)));
    }

    /// The certificate for `name` (any case, a trailing dot allowed), in the order of the
    /// sources; `None`: no certificate.
    pub fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let names = self.names.load();
        if let Some(key) = names.0.find(name) {
            return Some(key.clone());
        }
        if let Some(acme) = &self.acme {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = acme.find(&lower) {
                return Some(key);
            }
        }
        names.1.find(name).cloned()
    }

    /// Every certificate served: (name, source, notAfter in unix seconds), for the metrics.
    pub fn expiries(&self) -> Vec<(String, &'static str, u64)> {
        let sources = lock(&self.sources);
        let mut out = Vec::new();
        for cert in sources.files.iter().filter_map(|s| s.cert.as_ref()) {
            out.extend(
                cert.names
                    .iter()
                    .map(|n| (n.clone(), "file", unix(cert.not_after))),
            );
        }
        if let Some((_, cert)) = &sources.self_signed {
            out.extend(
                cert.names
                    .iter()
                    .map(|n| (n.clone(), "self_signed", unix(cert.not_after))),
            );
        }
        drop(sources);
        if let Some(acme) = &self.acme {
            out.extend(acme.expiries().into_iter().map(|(n, at)| (n, "acme", at)));
        }
        out
    }

    /// ACME names with failed orders in a row.
    pub fn acme_failures(&self) -> Vec<(String, u32)> {
        self.acme
            .as_ref()
            .map_or_else(Vec::new, |acme| acme.failures())
    }

    /// Whether some certificate covers `host` (a normalised host name).
    pub fn covers(&self, host: &str) -> bool {
        self.find(host).is_some()
    }

    /// Checks the files every [`WATCH_INTERVAL`] until the proxy stops.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = self.clone();
            // File reads and key parsing: off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || store.refresh()).await;
        }
    }
}

fn log_loaded(cert: &Loaded) {
    let expires = crate::acme::expiry_text(cert.not_after);
    if cert.not_after <= SystemTime::now() {
        tracing::warn!(
            "{cert} for {} has expired; clients will refuse it until it is renewed",
            cert.names.join(", ")
        );
    } else {
        tracing::info!("serving {cert} for {} ({expires})", cert.names.join(", "));
    }
}

impl ResolvesServerCert for Store {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => self.find(name),
            None => {
                let names = self.names.load();
                names.0.default.clone().or_else(|| names.1.default.clone())
            }
        }
    }
}

/// The rustls config of every HTTPS listener: TLS 1.2 and 1.3, ALPN h2 then http/1.1,
/// certificates from `store`, session tickets for resumption.
pub fn server_config(store: Arc<Store>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_for(list: &[&str]) -> Loaded {
        make_self_signed(list.iter().map(|s| (*s).to_owned()).collect())
            .expect("a self-signed certificate")
    }

    #[test]
    fn exact_names_win_over_wildcards_and_a_wildcard_covers_one_label() {
        let wild = names_for(&["*.notes.example.com"]);
        let alice = names_for(&["alice.notes.example.com"]);
        let names = Names::build([&wild, &alice].into_iter());
        let found = |n: &str| names.find(n).map(|k| k.cert[0].clone());
        assert_eq!(
            found("alice.notes.example.com"),
            Some(alice.key.cert[0].clone())
        );
        assert_eq!(
            found("ALICE.Notes.Example.com."),
            Some(alice.key.cert[0].clone())
        );
        assert_eq!(
            found("bob.notes.example.com"),
            Some(wild.key.cert[0].clone())
        );
        assert_eq!(found("x.bob.notes.example.com"), None);
        assert_eq!(found("notes.example.com"), None);
        assert_eq!(found("example.com"), None);
        // The first source is the certificate of clients without a server name.
        assert_eq!(
            names.default.as_ref().map(|k| k.cert[0].clone()),
            Some(wild.key.cert[0].clone())
        );
    }

    #[test]
    fn self_signed_names_cover_domains_services_and_instances() {
        let names = self_signed_names(&["localhost".to_owned()], ["notes", "blog"].into_iter());
        assert_eq!(
            names,
            [
                "localhost",
                "*.localhost",
                "*.notes.localhost",
                "*.blog.localhost"
            ]
        );
        let cert = make_self_signed(names).expect("a self-signed certificate");
        let built = Names::build(std::iter::once(&cert));
        for host in [
            "localhost",
            "notes.localhost",
            "alice.notes.localhost",
            "x.blog.localhost",
        ] {
            assert!(built.find(host).is_some(), "{host}");
        }
    }
}
