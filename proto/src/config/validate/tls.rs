//! `[settings.tls]`: the proxy's certificate files, ACME, and how it treats plain HTTP.

use std::time::Duration;

use super::{normalise, Checker, RawTable, RawValue};
use crate::config::{
    parse_duration, Acme, CertificateFiles, Challenge, Tls, LETS_ENCRYPT_DIRECTORY,
};

/// The keys of `[settings.tls]` besides `acme_email` and the [`ACME_KEYS`].
const TLS_KEYS: &[&str] = &["certificates", "redirect_http", "hsts", "https_port"];
/// The keys that only mean something with `acme_email`.
const ACME_KEYS: &[&str] = &[
    "acme_directory",
    "acme_ca_file",
    "acme_challenges",
    "acme_orders_per_hour",
    "acme_orders_per_week",
    "acme_wait",
    "acme_state_dir",
];
/// Under Let's Encrypt's 50 new certificates per registered domain per week, with room for
/// a few made by hand.
const DEFAULT_ORDERS_PER_WEEK: u32 = 40;
const DEFAULT_ORDERS_PER_HOUR: u32 = 20;
const CERTIFICATE_KEYS: &[&str] = &["cert", "key"];

impl Checker<'_> {
    pub(super) fn tls(&mut self, table: &RawTable) -> Tls {
        let known = [TLS_KEYS, &["acme_email"], ACME_KEYS].concat();
        self.check_keys(table, "[settings.tls]", &known);
        let mut tls = Tls::default();
        if let Some(entry) = table.get("certificates") {
            tls.certificates = self.certificate_files(entry);
        }
        tls.redirect_http = self.flag(table, "redirect_http", tls.redirect_http);
        if let Some(entry) = table.get("hsts") {
            let parsed = match &entry.value {
                RawValue::Integer(n) => u64::try_from(*n).map(Duration::from_secs).ok(),
                RawValue::String(text) => parse_duration(text).ok(),
                _ => None,
            };
            match parsed {
                Some(max_age) if max_age >= Duration::from_secs(1) => tls.hsts = Some(max_age),
                _ => {
                    let message = "hsts must be a max-age of at least a second, like hsts = \"365d\"; leave it out to send no Strict-Transport-Security";
                    self.error(entry.key.span(), message.to_owned());
                }
            }
        }
        tls.https_port = self
            .opt_count(table, "https_port", 1..=65_535)
            .and_then(|p| u16::try_from(p).ok());
        tls.acme = self.acme(table);
        tls
    }

    /// The `acme_*` keys; ACME is on when `acme_email` is set.
    fn acme(&mut self, table: &RawTable) -> Option<Acme> {
        let Some(email_entry) = table.get("acme_email") else {
            for key in ACME_KEYS {
                if let Some(entry) = table.get(key) {
                    let message = format!(
                        "{key} has no effect without acme_email, which turns ACME on; add acme_email = \"ops@example.com\""
                    );
                    self.error(entry.key.span(), message);
                }
            }
            return None;
        };
        let email = self.string(email_entry).map(str::trim).map(str::to_owned);
        if let Some(email) = &email {
            let valid = email.split_once('@').is_some_and(|(user, host)| {
                !user.is_empty() && host.contains('.') && !host.contains('@')
            }) && !email
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',');
            if !valid {
                let message = format!(
                    "acme_email {email:?} is not an email address; the CA sends account notices to it"
                );
                self.error(email_entry.key.span(), message);
            }
        }
        let directory = match table.get("acme_directory") {
            Some(entry) => match self.string(entry) {
                Some(url) if url.starts_with("https://") && url.len() > "https://".len() => {
                    url.to_owned()
                }
                Some(url) => {
                    let message = format!(
                        "acme_directory {url:?} must be an https:// URL, like \"{LETS_ENCRYPT_DIRECTORY}\""
                    );
                    self.error(entry.key.span(), message);
                    String::new()
                }
                None => String::new(),
            },
            None => LETS_ENCRYPT_DIRECTORY.to_owned(),
        };
        let ca_file = table
            .get("acme_ca_file")
            .and_then(|e| self.string(e))
            .map(|s| normalise(&self.config_dir.join(s)));
        let state_dir = table
            .get("acme_state_dir")
            .and_then(|e| self.string(e))
            .map(|s| normalise(&self.config_dir.join(s)));
        let challenges = match table.get("acme_challenges") {
            None => vec![Challenge::TlsAlpn01, Challenge::Http01],
            Some(entry) => {
                let mut out = Vec::new();
                for (span, name) in self.string_array(entry).unwrap_or_default() {
                    let challenge = match name.as_str() {
                        "tls-alpn-01" => Challenge::TlsAlpn01,
                        "http-01" => Challenge::Http01,
                        other => {
                            let message = format!(
                                "acme_challenges: {other:?} is not supported; use \"tls-alpn-01\" (port 443) and/or \"http-01\" (port 80); DNS-01 needs a DNS plugin: use certbot or lego and list the wildcard in certificates"
                            );
                            self.error(span, message);
                            continue;
                        }
                    };
                    if !out.contains(&challenge) {
                        out.push(challenge);
                    }
                }
                if out.is_empty() {
                    self.error(
                        entry.key.span(),
                        "acme_challenges needs at least one of \"tls-alpn-01\", \"http-01\""
                            .to_owned(),
                    );
                }
                out
            }
        };
        let orders_per_hour = self
            .opt_count(table, "acme_orders_per_hour", 1..=10_000)
            .map_or(DEFAULT_ORDERS_PER_HOUR, |n| n as u32);
        let orders_per_week = self
            .opt_count(table, "acme_orders_per_week", 1..=1_000_000)
            .map_or(DEFAULT_ORDERS_PER_WEEK, |n| n as u32);
        let wait = self.duration(table, "acme_wait", Duration::from_secs(30));
        if wait < Duration::from_secs(1) {
            if let Some(entry) = table.get("acme_wait") {
                self.error(
                    entry.key.span(),
                    "acme_wait must be at least 1s: a first handshake waits that long for its certificate".to_owned(),
                );
            }
        }
        Some(Acme {
            email: email?,
            directory,
            ca_file,
            challenges,
            orders_per_hour,
            orders_per_week,
            wait,
            state_dir,
        })
    }

    /// `certificates = [{ cert = "...", key = "..." }, ...]` (or `[[settings.tls.certificates]]`).
    fn certificate_files(&mut self, entry: &super::RawEntry) -> Vec<CertificateFiles> {
        const SHAPE: &str = "write certificates = [{ cert = \"/etc/tenement/tls/site.pem\", key = \"/etc/tenement/tls/site.key\" }]";
        let RawValue::Array(items) = &entry.value else {
            let message = format!(
                "certificates must be an array of tables, not {}; {SHAPE}",
                entry.value.kind()
            );
            self.error(entry.key.span(), message);
            return Vec::new();
        };
        let mut files: Vec<CertificateFiles> = Vec::with_capacity(items.len());
        for item in items {
            let span = item.span();
            let toml::Value::Table(fields) = item.get_ref() else {
                let message = format!(
                    "each certificate is a table with cert and key, not {}; {SHAPE}",
                    super::value_kind(item.get_ref())
                );
                self.error(span, message);
                continue;
            };
            let mut complete = true;
            for key in fields.keys() {
                if !CERTIFICATE_KEYS.contains(&key.as_str()) {
                    let message = format!(
                        "unknown key `{}` in a certificate; expected cert and key",
                        key.escape_debug()
                    );
                    self.error(span.clone(), message);
                    complete = false;
                }
            }
            let mut path = |name: &str| match fields.get(name) {
                Some(toml::Value::String(s)) if !s.trim().is_empty() => {
                    Some(normalise(&self.config_dir.join(s)))
                }
                Some(_) => {
                    let message = format!("a certificate's {name} must be a path (a string)");
                    self.error(span.clone(), message);
                    None
                }
                None => {
                    let message = format!(
                        "a certificate needs both cert (the PEM chain) and key; {name} is missing"
                    );
                    self.error(span.clone(), message);
                    None
                }
            };
            let (cert, key) = (path("cert"), path("key"));
            let (Some(cert), Some(key), true) = (cert, key, complete) else {
                continue;
            };
            if files.iter().any(|f| f.cert == cert) {
                let message = format!(
                    "certificate {} is listed twice; list each file once",
                    super::shown_path(&cert)
                );
                self.error(span, message);
                continue;
            }
            files.push(CertificateFiles { cert, key });
        }
        files
    }
}
