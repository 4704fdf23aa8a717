//! `[settings.tls]`: the proxy's certificate files and how it treats plain HTTP.

use std::time::Duration;

use super::{normalise, Checker, RawTable, RawValue};
use crate::config::{parse_duration, CertificateFiles, Tls};

const TLS_KEYS: &[&str] = &["certificates", "redirect_http", "hsts", "https_port"];
const CERTIFICATE_KEYS: &[&str] = &["cert", "key"];

impl Checker<'_> {
    pub(super) fn tls(&mut self, table: &RawTable) -> Tls {
        self.check_keys(table, "[settings.tls]", TLS_KEYS);
        let mut tls = Tls::default();
        if let Some(entry) = table.get("certificates") {
            tls.certificates = self.certificate_files(entry);
        }
        if let Some(entry) = table.get("redirect_http") {
            match entry.value {
                RawValue::Boolean(b) => tls.redirect_http = b,
                ref other => {
                    let message = format!(
                        "redirect_http must be true or false, not {}; write redirect_http = false",
                        other.kind()
                    );
                    self.error(entry.key.span(), message);
                }
            }
        }
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
        tls
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
