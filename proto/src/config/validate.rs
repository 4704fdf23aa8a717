//! The second phase of reading `tenement.toml`: walks the [`raw`](super::raw) tree against the
//! schema, fills in defaults and builds a [`Config`].
//!
//! Every problem becomes one located [`Diagnostic`] and checking goes on, so a user fixes the
//! whole file in one round. Unknown keys are refused here (the tree has no schema). Nothing
//! here touches the file system or the process environment: relative paths are joined to the
//! config file's directory lexically, and machine facts come in an [`Environment`].

mod fleet;
mod service;
mod settings;
mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::raw::{self, value_kind, RawEntry, RawTable, RawValue};
use super::{absolute_path, parse_duration, Config, ConfigError, Diagnostic, Environment, Service};
use crate::ids::{InstanceId, ServiceName, TenantId};

type Span = Range<usize>;

const TOP_KEYS: &[&str] = &["settings", "service", "instances", "fleet"];

pub(super) fn validate(text: &str, path: &Path, env: &Environment) -> Result<Config, ConfigError> {
    let path = absolute_path(path);
    let mut checker = Checker {
        report: Report {
            path: &path,
            text,
            diagnostics: Vec::new(),
        },
        config_dir: path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
        env,
    };
    let config = match raw::parse(text) {
        Ok(doc) => checker.config(&doc),
        Err(e) => {
            checker.report.toml_error(&e);
            None
        }
    };
    let mut diagnostics = checker.report.diagnostics;
    match config {
        Some(config) if diagnostics.is_empty() => Ok(config),
        _ => {
            diagnostics.sort_by_key(|d| (d.line == 0, d.line, d.column));
            Err(ConfigError { diagnostics })
        }
    }
}

/// Collects diagnostics, turning byte offsets into 1-based lines and columns.
struct Report<'a> {
    path: &'a Path,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl Report<'_> {
    fn error(&mut self, span: Span, message: String) {
        let mut offset = span.start.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        self.push(
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
            message,
        );
    }

    /// A problem with a default, which has no place in the file.
    fn unplaced(&mut self, message: String) {
        self.push(0, 0, message);
    }

    fn push(&mut self, line: usize, column: usize, message: String) {
        self.diagnostics.push(Diagnostic {
            path: self.path.to_path_buf(),
            line,
            column,
            message: one_line(message),
        });
    }

    fn toml_error(&mut self, e: &toml::de::Error) {
        let message = if e.message().contains("$__toml_private_datetime") {
            // A bare date or time (`stop_grace = 00:00:10`): the tree cannot hold one outside
            // an array, and no key accepts one.
            "dates and times are not accepted; write durations like \"30s\" and quote other values"
                .to_owned()
        } else {
            let lines: Vec<&str> = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let joined = lines.join("; ");
            // toml 0.8 has no message for some syntax errors (a control character in a
            // comment, a file ending after `key =`): never print `FILE:LINE:COL: ` alone.
            if joined.is_empty() {
                unexplained_toml_error(self.text, e.span())
            } else {
                joined
            }
        };
        match e.span() {
            Some(span) => self.error(span, message),
            None => self.unplaced(message),
        }
    }
}

/// A message for a TOML syntax error toml did not explain: what is at its place.
fn unexplained_toml_error(text: &str, span: Option<Span>) -> String {
    let Some(span) = span else {
        return "invalid TOML syntax".to_owned();
    };
    if span.start >= text.len() {
        return "invalid TOML: the file ends too early; complete its last line".to_owned();
    }
    match text.get(span.start..).and_then(|rest| rest.chars().next()) {
        Some(c) if c.is_control() => format!(
            "invalid TOML: control character '{}' is not allowed here; remove it",
            c.escape_debug()
        ),
        Some(c) => format!("invalid TOML: unexpected '{}'", c.escape_debug()),
        None => "invalid TOML syntax".to_owned(),
    }
}

/// Keeps a diagnostic one printable line whatever it quotes: control characters left in it
/// are written as escapes (`\n`, `\u{1b}`). Messages escape the file text they echo
/// themselves (`escape_debug`, `{:?}`); this only guards the `FILE:LINE:COL: message` shape
/// against one that does not.
fn one_line(message: String) -> String {
    if !message.contains(char::is_control) {
        return message;
    }
    let mut out = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// A path from the file (or built from one) as a diagnostic shows it: unprintable
/// characters escaped.
fn shown_path(path: &Path) -> String {
    path.to_string_lossy().escape_debug().to_string()
}

struct Checker<'a> {
    report: Report<'a>,
    config_dir: PathBuf,
    env: &'a Environment,
}

impl Checker<'_> {
    fn error(&mut self, span: Span, message: String) {
        self.report.error(span, message);
    }

    fn config(&mut self, doc: &RawTable) -> Option<Config> {
        self.check_keys(doc, "the top level", TOP_KEYS);
        let settings = doc
            .get("settings")
            .and_then(|e| self.table(e, "[settings]"));
        let settings = self.settings(settings.unwrap_or(&RawTable::default()));
        let mut services = BTreeMap::new();
        let mut declared = BTreeSet::new();
        if let Some(table) = doc
            .get("service")
            .and_then(|e| self.table(e, "[service.NAME]"))
        {
            for entry in &table.entries {
                declared.insert(entry.key.get_ref().as_str());
                if let Some(service) = self.service(entry) {
                    self.not_the_proxys_user(&settings, &service, entry);
                    services.insert(service.name.clone(), service);
                }
            }
        }
        let instances = doc
            .get("instances")
            .and_then(|e| self.table(e, "[instances]"))
            .map(|t| self.instances(t, &declared, &services))
            .unwrap_or_default();
        let fleet = doc.get("fleet").and_then(|entry| {
            let table = self.table(entry, "[fleet]")?;
            self.fleet(entry.key.span(), table)
        });
        Some(Config {
            path: self.report.path.to_path_buf(),
            settings,
            services,
            instances,
            fleet,
        })
    }

    /// A service must not run as `proxy_user`: `proxy.sock` is given to that user's group, so
    /// the tenant would hold the proxy's role (and the firewall lets that uid reach every
    /// tenant).
    fn not_the_proxys_user(
        &mut self,
        settings: &crate::config::Settings,
        service: &Service,
        entry: &RawEntry,
    ) {
        let Some(proxy_user) = &settings.proxy_user else {
            return;
        };
        let user = service.user.as_ref().or(settings.user.as_ref());
        if user != Some(proxy_user) {
            return;
        }
        let message = format!(
            "service {} runs as {proxy_user:?}, the proxy_user: it would hold the proxy's socket; give it another user (user = \"dynamic\")",
            service.name
        );
        let span = match &entry.value {
            RawValue::Table(body) => body.get("user").map_or(entry.key.span(), |e| e.key.span()),
            _ => entry.key.span(),
        };
        self.error(span, message);
    }

    /// Reports every key of `table` not in `known`; whether there was none.
    fn check_keys(&mut self, table: &RawTable, place: &str, known: &[&str]) -> bool {
        let mut all_known = true;
        for entry in &table.entries {
            if !known.contains(&entry.key.get_ref().as_str()) {
                all_known = false;
                let message = format!(
                    "unknown key `{}` in {place}; expected one of: {}",
                    entry.key.get_ref().escape_debug(),
                    known.join(", ")
                );
                self.error(entry.key.span(), message);
            }
        }
        all_known
    }

    fn table<'t>(&mut self, entry: &'t RawEntry, header: &str) -> Option<&'t RawTable> {
        match &entry.value {
            RawValue::Table(table) => Some(table),
            other => {
                let message = format!(
                    "`{}` must be a table written {header}, not {}",
                    entry.key.get_ref().escape_debug(),
                    other.kind()
                );
                self.error(entry.key.span(), message);
                None
            }
        }
    }

    fn string<'t>(&mut self, entry: &'t RawEntry) -> Option<&'t str> {
        let key = entry.key.get_ref().escape_debug();
        match &entry.value {
            RawValue::String(s) if s.trim().is_empty() => {
                let message = format!("{key} is empty; remove it or give it a value");
                self.error(entry.key.span(), message);
                None
            }
            RawValue::String(s) => Some(s),
            other => {
                let message = format!(
                    "{key} must be a string, not {}; write {key} = \"...\"",
                    other.kind()
                );
                self.error(entry.key.span(), message);
                None
            }
        }
    }

    /// An array of strings with each element's place; `None` after reporting a problem.
    fn string_array(&mut self, entry: &RawEntry) -> Option<Vec<(Span, String)>> {
        let key = entry.key.get_ref().escape_debug();
        let RawValue::Array(items) = &entry.value else {
            let message = format!(
                "{key} must be an array of strings, not {}; write {key} = [\"...\"]",
                entry.value.kind()
            );
            self.error(entry.key.span(), message);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.get_ref() {
                toml::Value::String(s) => out.push((item.span(), s.clone())),
                other => {
                    let message = format!(
                        "{key} may only hold strings, not {}; quote it",
                        value_kind(other)
                    );
                    self.error(item.span(), message);
                }
            }
        }
        (out.len() == items.len()).then_some(out)
    }

    /// A string or an array of strings.
    fn string_list(&mut self, entry: &RawEntry) -> Option<Vec<(Span, String)>> {
        match &entry.value {
            RawValue::String(s) => Some(vec![(entry.key.span(), s.clone())]),
            RawValue::Array(_) => self.string_array(entry),
            other => {
                let key = entry.key.get_ref().escape_debug();
                let message = format!(
                    "{key} must be a string or an array of strings, not {}",
                    other.kind()
                );
                self.error(entry.key.span(), message);
                None
            }
        }
    }

    /// A path, absolute or relative to the config file's directory.
    fn dir(&mut self, table: &RawTable, key: &str, default: PathBuf) -> PathBuf {
        match table.get(key).and_then(|e| self.string(e)) {
            Some(s) => normalise(&self.config_dir.join(s)),
            None => default,
        }
    }

    fn duration(&mut self, table: &RawTable, key: &str, default: Duration) -> Duration {
        let Some(entry) = table.get(key) else {
            return default;
        };
        let parsed = match &entry.value {
            RawValue::Integer(n) => match u64::try_from(*n) {
                Ok(secs) => Ok(Duration::from_secs(secs)),
                Err(_) => parse_duration(&n.to_string()),
            },
            RawValue::String(s) => parse_duration(s),
            other => Err(format!(
                "expected seconds (300) or a string like \"30s\", not {}",
                other.kind()
            )),
        };
        parsed.unwrap_or_else(|e| {
            self.error(entry.key.span(), format!("{key}: {e}"));
            default
        })
    }

    /// `true` or `false`; anything else is an error naming the key, and `default`.
    fn flag(&mut self, table: &RawTable, key: &str, default: bool) -> bool {
        match table.get(key).map(|e| (e, &e.value)) {
            None => default,
            Some((_, RawValue::Boolean(b))) => *b,
            Some((e, other)) => {
                let message = format!(
                    "{key} must be true or false, not {}; write {key} = {}",
                    other.kind(),
                    !default
                );
                self.error(e.key.span(), message);
                default
            }
        }
    }

    fn count(&mut self, table: &RawTable, key: &str, default: u32) -> u32 {
        let Some(entry) = table.get(key) else {
            return default;
        };
        let message = match &entry.value {
            RawValue::Integer(n) if *n < 0 => format!("{key} must be 0 or more, not {n}"),
            RawValue::Integer(n) => match u32::try_from(*n) {
                Ok(n) => return n,
                Err(_) => format!("{key} {n} is too large; use at most {}", u32::MAX),
            },
            other => format!(
                "{key} must be a whole number, not {}; write {key} = {default}",
                other.kind()
            ),
        };
        self.error(entry.key.span(), message);
        default
    }

    /// A size in bytes: an integer, or a string such as "512KB", "10MB", "1GB" (powers of 1024).
    fn size(&mut self, table: &RawTable, key: &str, default: u64) -> u64 {
        self.opt_size(table, key).unwrap_or(default)
    }

    /// [`Self::size`] without a default: `None` when the key is absent (or wrong).
    fn opt_size(&mut self, table: &RawTable, key: &str) -> Option<u64> {
        let entry = table.get(key)?;
        let parsed = match &entry.value {
            RawValue::Integer(n) => u64::try_from(*n).ok(),
            RawValue::String(text) => parse_size(text),
            _ => None,
        };
        match parsed {
            Some(n) if n > 0 => Some(n),
            _ => {
                let message = format!(
                    "{key} must be a size in bytes like 1048576 or \"10MB\" (KB, MB, GB are powers of 1024)"
                );
                self.error(entry.key.span(), message);
                None
            }
        }
    }

    /// A positive whole number within `range`, or `None` when absent.
    fn opt_count(
        &mut self,
        table: &RawTable,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Option<u64> {
        let entry = table.get(key)?;
        match &entry.value {
            RawValue::Integer(n) if u64::try_from(*n).is_ok_and(|n| range.contains(&n)) => {
                u64::try_from(*n).ok()
            }
            _ => {
                let message = format!(
                    "{key} must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                );
                self.error(entry.key.span(), message);
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        table: &RawTable,
        key: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(entry) = table.get(key) else {
            return default;
        };
        if let RawValue::String(s) = &entry.value {
            if let Some((_, value)) = choices.iter().find(|(name, _)| name == s) {
                return *value;
            }
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let written = match &entry.value {
            RawValue::String(s) => format!("{s:?}"),
            other => other.kind().to_owned(),
        };
        let message = format!(
            "{key} = {written} is not supported; use one of: {}",
            names.join(", ")
        );
        self.error(entry.key.span(), message);
        default
    }

    fn instances(
        &mut self,
        table: &RawTable,
        declared: &BTreeSet<&str>,
        services: &BTreeMap<ServiceName, Service>,
    ) -> Vec<InstanceId> {
        let mut instances = Vec::new();
        for entry in &table.entries {
            let raw_name = entry.key.get_ref();
            let shown_name = raw_name.escape_debug();
            if !declared.contains(raw_name.as_str()) {
                let message = format!(
                    "instances for unknown service {shown_name}; add [service.{}]",
                    toml_key(raw_name)
                );
                self.error(entry.key.span(), message);
            }
            let service = services.keys().find(|s| s.as_str() == raw_name).cloned();
            let Some(ids) = self.string_array(entry) else {
                continue;
            };
            let mut seen = BTreeSet::new();
            for (span, id) in ids {
                let id = match TenantId::new(id.as_str()) {
                    Ok(id) => id,
                    Err(e) => {
                        self.error(span, format!("invalid instance id {id:?}: {e}"));
                        continue;
                    }
                };
                if !seen.insert(id.clone()) {
                    let message =
                        format!("duplicate instance {shown_name}:{id}; list each id once");
                    self.error(span, message);
                } else if let Some(service) = &service {
                    instances.push(InstanceId::new(service.clone(), id));
                }
            }
        }
        instances
    }
}

/// A key as written in a TOML header: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// `path` without `.` components; `..` is kept because resolving it needs the file system.
fn normalise(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// A duration as a user would write it: `500ms`, `30s`, `5m`, `1h`.
fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    match (secs % 3600, secs % 60) {
        _ if secs == 0 => "0s".to_owned(),
        (0, _) => format!("{}h", secs / 3600),
        (_, 0) => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

/// `"10MB"` -> 10 * 1024 * 1024; `None` for anything else.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let value: u64 = text.get(..digits)?.parse().ok()?;
    let factor: u64 = match text[digits..].trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return None,
    };
    value.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_accept_bytes_and_binary_units() {
        use super::parse_size;
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("4k"), Some(4096));
        for bad in ["", "MB", "1.5MB", "10 TB", "-1", "99999999999999999999"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    use std::net::SocketAddr;

    use super::*;
    use crate::config::{Isolation, ListenMode, ReadyMode, Template};

    const EXAMPLE: &str = r#"
[settings]
domain = "localhost"
data_dir = "./data"
state_dir = "./state"
runtime_dir = "/run/user/1000/tenement"
listen = "127.0.0.1:8080"
port_range = "20000-29999"
admin_group = "tenement-admin"

[service.notes]
command = "python3 app.py"
args = ["--flag", "{port}"]
workdir = "examples/notes"
health = "/health"
health_interval = "10s"
health_timeout = "2s"
unhealthy_threshold = 3
startup_timeout = "30s"
stop_grace = "10s"
idle_timeout = 300
listen = "tcp"
ready = "tcp"
max_restarts = 5
restart_window = "60s"
backoff_base = "500ms"
backoff_max = "30s"
auto_spawn = false
isolation = "process"
user = "www-data"
[service.notes.env]
DATA_DIR = "{data_dir}/{id}"

[instances]
notes = ["alice", "bob"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        validate(
            text,
            Path::new("/etc/app/tenement.toml"),
            &Environment::default(),
        )
    }

    fn parse_ok(text: &str) -> Config {
        match parse(text) {
            Ok(config) => config,
            Err(e) => panic!("config should be valid:\n{e}"),
        }
    }

    fn messages(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("config should be refused:\n{text}"),
            Err(e) => e.diagnostics.into_iter().map(|d| d.message).collect(),
        }
    }

    fn service(config: &Config) -> &Service {
        config.services.values().next().expect("one service")
    }

    #[test]
    fn https_listeners_and_certificate_files_are_read() {
        let config = parse_ok(
            r#"
[settings]
listen = ["http://0.0.0.0:80", "https://[::]:443", "127.0.0.1:8080"]
[settings.tls]
certificates = [
  { cert = "tls/wild.pem", key = "/etc/tenement/tls/wild.key" },
  { cert = "/etc/tenement/tls/other.pem", key = "tls/other.key" },
]
redirect_http = false
hsts = "365d"
"#,
        );
        let s = &config.settings;
        let shown: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["0.0.0.0:80", "https://[::]:443", "127.0.0.1:8080"]);
        assert_eq!(s.tls.certificates.len(), 2);
        assert_eq!(
            s.tls.certificates[0].cert,
            Path::new("/etc/app/tls/wild.pem")
        );
        assert_eq!(
            s.tls.certificates[1].key,
            Path::new("/etc/app/tls/other.key")
        );
        assert!(!s.tls.redirect_http);
        assert_eq!(s.tls.hsts, Some(Duration::from_secs(365 * 86_400)));
    }

    #[test]
    fn bad_tls_settings_are_each_reported() {
        let found = messages(
            r#"
[settings]
listen = ["ftp://127.0.0.1:21", "https://localhost:443", "127.0.0.1:80", "https://127.0.0.1:80"]
[settings.tls]
certificates = [{ cert = "a.pem" }, { cert = "b.pem", key = "b.key", chain = "c" }, "x.pem",
                { cert = "d.pem", key = "d.key" }, { cert = "d.pem", key = "e.key" }]
redirect_http = "yes"
hsts = 0
acme = true
acme_wait = "10s"
"#,
        );
        let expected = [
            "has scheme \"ftp\"",
            "\"https://localhost:443\" is not [https://]IP:PORT",
            "duplicate listen address 127.0.0.1:80",
            "unknown key `acme` in [settings.tls]",
            "key is missing",
            "unknown key `chain` in a certificate",
            "each certificate is a table with cert and key, not a string",
            "certificate /etc/app/d.pem is listed twice",
            "redirect_http must be true or false",
            "hsts must be a max-age",
            "acme_wait has no effect without acme_email",
        ];
        for want in expected {
            assert!(
                found.iter().any(|m| m.contains(want)),
                "no message with {want:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn bad_acme_settings_are_each_reported_and_good_ones_parse() {
        let found = messages(
            r#"
[settings.tls]
acme_email = "not an address"
acme_directory = "http://acme.example/dir"
acme_challenges = ["dns-01"]
acme_orders_per_week = 0
acme_wait = "0s"
"#,
        );
        for want in [
            "acme_email \"not an address\" is not an email address",
            "acme_directory \"http://acme.example/dir\" must be an https:// URL",
            "\"dns-01\" is not supported",
            "acme_challenges needs at least one",
            "acme_orders_per_week must be a whole number from 1",
            "acme_wait must be at least 1s",
        ] {
            assert!(
                found.iter().any(|m| m.contains(want)),
                "no message with {want:?} in {found:#?}"
            );
        }
        let config = parse_ok(
            r#"
[settings.tls]
acme_email = "ops@example.com"
acme_challenges = ["http-01"]
acme_ca_file = "ca.pem"
acme_state_dir = "/var/lib/x"
"#,
        );
        let acme = config.settings.tls.acme.expect("ACME on");
        assert_eq!(acme.directory, crate::config::LETS_ENCRYPT_DIRECTORY);
        assert_eq!(acme.challenges, [crate::config::Challenge::Http01]);
        assert_eq!(acme.ca_file.as_deref(), Some(Path::new("/etc/app/ca.pem")));
        assert_eq!(
            acme.state_dir(false).as_deref(),
            Some(Path::new("/var/lib/x"))
        );
        assert_eq!((acme.orders_per_hour, acme.orders_per_week), (20, 40));
        assert_eq!(acme.wait, Duration::from_secs(30));
    }

    #[test]
    fn the_documented_example_parses_into_every_field() {
        let config = parse_ok(EXAMPLE);
        let s = &config.settings;
        assert_eq!(s.domains, ["localhost"]);
        assert_eq!(s.data_dir, Path::new("/etc/app/data"));
        assert_eq!(s.state_dir, Path::new("/etc/app/state"));
        assert_eq!(s.runtime_dir, Path::new("/run/user/1000/tenement"));
        assert_eq!(s.admin_group.as_deref(), Some("tenement-admin"));
        let notes = service(&config);
        assert_eq!(notes.name.as_str(), "notes");
        let argv: Vec<&str> = notes.argv.iter().map(Template::source).collect();
        assert_eq!(argv, ["python3", "app.py", "--flag", "{port}"]);
        assert_eq!(notes.workdir, Path::new("/etc/app/examples/notes"));
        assert_eq!(notes.health.as_deref(), Some("/health"));
        assert_eq!(notes.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(notes.backoff_base, Duration::from_millis(500));
        assert_eq!(notes.ready, ReadyMode::Tcp);
        assert_eq!(notes.isolation, Some(Isolation::Process));
        assert_eq!(notes.user.as_deref(), Some("www-data"));
        assert_eq!(notes.env["DATA_DIR"].source(), "{data_dir}/{id}");
        let instances: Vec<String> = config.instances.iter().map(|i| i.to_string()).collect();
        assert_eq!(instances, ["notes:alice", "notes:bob"]);
    }

    #[test]
    fn an_empty_file_gets_every_default_next_to_the_config() {
        let config = parse_ok("");
        let s = &config.settings;
        assert_eq!(s.domains, ["localhost"]);
        assert_eq!(s.data_dir, Path::new("/etc/app/data"));
        assert_eq!(s.state_dir, Path::new("/etc/app/.tenement/state"));
        assert_eq!(s.runtime_dir, Path::new("/etc/app/.tenement/run"));
        let plain = crate::config::ListenAddress {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: false,
        };
        assert_eq!(s.listen, [plain]);
        assert_eq!(s.tls, crate::config::Tls::default());
        assert!(s.tls.redirect_http);
        assert_eq!(s.port_range, 20000..=29999);
        assert_eq!(s.admin_group, None);
        assert!(config.services.is_empty());
        assert!(config.instances.is_empty());
    }

    #[test]
    fn root_and_xdg_pick_their_directory_defaults() {
        let path = Path::new("/etc/tenement/tenement.toml");
        let root = Environment {
            is_root: true,
            ..Environment::default()
        };
        let config = validate("", path, &root).expect("valid");
        assert_eq!(
            config.settings.data_dir,
            Path::new("/var/lib/tenement/data")
        );
        assert_eq!(
            config.settings.state_dir,
            Path::new("/var/lib/tenement/state")
        );
        assert_eq!(config.settings.runtime_dir, Path::new("/run/tenement"));
        let user = Environment {
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..Environment::default()
        };
        let config = validate("", path, &user).expect("valid");
        assert_eq!(
            config.settings.runtime_dir,
            Path::new("/run/user/1000/tenement")
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory_not_the_cwd() {
        let config = parse_ok(
            "[settings]\ndata_dir = \"./d/./e\"\nstate_dir = \"../s\"\n[service.a]\ncommand = \"x\"\nworkdir = \".\"\n",
        );
        assert_eq!(config.settings.data_dir, Path::new("/etc/app/d/e"));
        assert_eq!(config.settings.state_dir, Path::new("/etc/app/../s"));
        assert_eq!(service(&config).workdir, Path::new("/etc/app"));
        let config = parse_ok("[service.a]\ncommand = \"x\"\n");
        assert_eq!(service(&config).workdir, Path::new("/etc/app"));
    }

    #[test]
    fn domain_takes_a_string_or_an_array_and_drops_one_trailing_dot() {
        let config = parse_ok("[settings]\ndomain = \"example.com.\"\n");
        assert_eq!(config.settings.domains, ["example.com"]);
        let config = parse_ok("[settings]\ndomain = [\"a.example\", \"b.example\"]\n");
        assert_eq!(config.settings.domains, ["a.example", "b.example"]);
        assert!(messages("[settings]\ndomain = \"Example.com\"\n")[0].contains("a-z"));
        assert!(messages("[settings]\ndomain = \"a..b\"\n")[0].contains("empty"));
    }

    #[test]
    fn port_range_takes_a_string_or_a_pair() {
        let config = parse_ok("[settings]\nport_range = \"3000-3999\"\n");
        assert_eq!(config.settings.port_range, 3000..=3999);
        let config = parse_ok("[settings]\nport_range = [4000, 4001]\n");
        assert_eq!(config.settings.port_range, 4000..=4001);
        for bad in ["\"4000\"", "[1, 2, 3]", "[4000, 70000]", "\"a-b\"", "4000"] {
            let text = format!("[settings]\nport_range = {bad}\n");
            assert!(
                messages(&text)[0].starts_with("port_range must be"),
                "{bad}"
            );
        }
    }

    #[test]
    fn args_follow_the_split_command_and_may_stand_alone() {
        let config = parse_ok("[service.a]\ncommand = \"run 'a b' c\"\nargs = [\"d e\"]\n");
        let argv: Vec<&str> = service(&config).argv.iter().map(Template::source).collect();
        assert_eq!(argv, ["run", "a b", "c", "d e"]);
        let config = parse_ok("[service.a]\nargs = [\"/bin/app\", \"{port}\"]\n");
        let argv: Vec<&str> = service(&config).argv.iter().map(Template::source).collect();
        assert_eq!(argv, ["/bin/app", "{port}"]);
    }

    #[test]
    fn ready_defaults_to_health_only_when_a_health_path_is_set() {
        let config = parse_ok("[service.a]\ncommand = \"x\"\nhealth = \"/up\"\n");
        assert_eq!(service(&config).ready, ReadyMode::Health);
        let config = parse_ok("[service.a]\ncommand = \"x\"\n");
        let s = service(&config);
        assert_eq!(s.ready, ReadyMode::Tcp);
        assert_eq!(s.listen, ListenMode::Tcp);
        assert_eq!(s.isolation, None);
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.health_interval, Duration::from_secs(10));
        assert_eq!(s.health_timeout, Duration::from_secs(2));
        assert_eq!(s.unhealthy_threshold, 3);
        assert_eq!(s.startup_timeout, Duration::from_secs(30));
        assert_eq!(s.stop_grace, Duration::from_secs(10));
        assert_eq!(s.max_restarts, 5);
        assert_eq!(s.restart_window, Duration::from_secs(60));
        assert_eq!(s.backoff_max, Duration::from_secs(30));
        assert!(!s.auto_spawn);
    }

    #[test]
    fn idle_timeout_zero_or_never_means_never_idle_stopped() {
        for value in ["0", "\"never\"", "\"0s\""] {
            let config = parse_ok(&format!(
                "[service.a]\ncommand = \"x\"\nidle_timeout = {value}\n"
            ));
            assert_eq!(service(&config).idle_timeout, None, "{value}");
        }
    }

    #[test]
    fn implicit_and_dotted_tables_are_read_like_headers() {
        let config = parse_ok(
            "service.a.command = \"x\"\n[service.b.env]\nA = \"1\"\n[service.b]\nargs = [\"y\"]\n",
        );
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.services.values().nth(1).expect("b").env.len(), 1);
        let messages = messages("[service.b.env]\nA = \"1\"\n");
        assert_eq!(
            messages,
            ["service b has no command; add command = \"...\""]
        );
    }

    #[test]
    fn a_bare_date_is_refused_with_one_line() {
        let messages = messages("[service.a]\ncommand = \"x\"\nstop_grace = 00:00:10\n");
        assert_eq!(messages.len(), 1);
        assert!(
            messages[0].starts_with("dates and times are not accepted"),
            "{messages:?}"
        );
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let err = parse("[settings]\ndomain = \"é\" # x\nnope = 1\n").expect_err("invalid");
        let places: Vec<(usize, usize)> =
            err.diagnostics.iter().map(|d| (d.line, d.column)).collect();
        assert_eq!(places, [(2, 1), (3, 1)]);
    }

    #[test]
    fn a_fleet_section_is_read_with_defaults() {
        let config = parse_ok(
            "[fleet]\nhost = \"h-1\"\naddress = \"10.0.0.1:7443\"\netcd = [\"http://10.0.0.1:2379/\", \"http://10.0.0.2:2379\"]\n",
        );
        let fleet = config.fleet.expect("fleet");
        assert_eq!(fleet.host, "h-1");
        assert_eq!(fleet.address.to_string(), "10.0.0.1:7443");
        assert_eq!(fleet.etcd, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(fleet.lease_ttl, Duration::from_secs(10));
        assert_eq!(fleet.grace, Duration::from_secs(30));
        assert_eq!(fleet.max_tenants, None);
        assert_eq!(fleet.tls, None);
        assert_eq!(parse_ok("").fleet, None);
    }

    #[test]
    fn the_fleet_credential_is_three_files_or_none() {
        let head = "[fleet]\nhost = \"h1\"\naddress = \"10.0.0.1:7443\"\netcd = \"http://10.0.0.1:2379\"\n";
        let config = parse_ok(&format!(
            "{head}ca = \"fleet/ca.pem\"\ncert = \"/etc/f/h1.pem\"\nkey = \"/etc/f/h1.key\"\n"
        ));
        let tls = config.fleet.and_then(|f| f.tls).expect("tls");
        assert!(tls.ca.is_absolute() && tls.ca.ends_with("fleet/ca.pem"));
        assert_eq!(tls.key, std::path::Path::new("/etc/f/h1.key"));
        assert_eq!(
            messages(&format!("{head}ca = \"/etc/f/ca.pem\"\n")),
            ["[fleet] needs ca, cert and key together (the fleet's CA and this host's certificate and key from it; tenement-fleet credentials makes them); missing cert, key"]
        );
        assert_eq!(
            messages(&format!("{head}ca = \"\"\ncert = \"a\"\nkey = \"b\"\n")),
            ["ca is empty; remove it or give it a value"]
        );
    }

    #[test]
    fn a_fleet_section_refuses_bad_values_one_line_each() {
        let bad = messages(
            "[fleet]\nhost = \"H1/..\"\naddress = \"0.0.0.0:443\"\netcd = [\"https://e:2379\", \"e\"]\nlease_ttl = \"1s\"\nmax_tenants = 0\nzone = \"a\"\n",
        );
        assert_eq!(bad.len(), 7, "{bad:?}");
        assert!(bad[0].starts_with("host \"H1/..\" is not a host name"));
        assert!(bad[1].starts_with("address \"0.0.0.0:443\" must be this host's own"));
        assert!(bad[2].starts_with("etcd member \"https://e:2379\" must be a client URL"));
        assert!(bad[3].starts_with("etcd member \"e\""));
        assert!(bad[4].starts_with("lease_ttl must be from 2s to 300s"));
        assert!(bad[5].starts_with("max_tenants must be a whole number from 1"));
        assert!(bad[6].starts_with("unknown key `zone` in [fleet]"));
        assert_eq!(
            messages("[fleet]\nlease_ttl = 5\n"),
            [
                "[fleet] needs host; add host = \"h1\"",
                "[fleet] needs address; add address = \"10.0.0.1:7443\"",
                "[fleet] needs etcd; add etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]",
            ]
        );
    }

    #[test]
    fn host_names_are_dns_labels() {
        use crate::config::Fleet;
        for good in ["h1", "a", "web-2", &"x".repeat(63)] {
            assert!(Fleet::valid_host(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A1",
            "a.b",
            "a/b",
            "..",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!Fleet::valid_host(bad), "{bad}");
        }
    }
}
