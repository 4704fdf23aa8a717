//! `[settings]`: domains, directories, listen addresses and the instance port range.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};

use super::{normalise, shown_path, Checker, RawEntry, RawTable, RawValue, Span};
use crate::config::{ListenAddress, Settings};
use crate::ids::validate_label;

const SETTINGS_KEYS: &[&str] = &[
    "domain",
    "data_dir",
    "state_dir",
    "runtime_dir",
    "listen",
    "metrics_listen",
    "metrics_per_instance",
    "port_range",
    "admin_group",
    "proxy_user",
    "trusted_proxies",
    "dynamic_users",
    "isolation",
    "user",
    "max_connections",
    "max_connections_per_client",
    "tls",
];

/// `sizeof(sockaddr_un.sun_path)` on Linux, terminating NUL included (unix(7)).
const UNIX_PATH_MAX: usize = 108;
/// RFC 1035, 2.3.4, without the trailing dot.
const MAX_DOMAIN_LEN: usize = 253;

/// Client connections the proxy holds at once; beyond it, new ones wait in the kernel.
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Client connections one address may hold at once; beyond it, new ones are closed.
const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 256;

/// `path` with `.` and `..` resolved by their names alone (no symlink is read).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl Checker<'_> {
    /// data_dir, state_dir and runtime_dir must not be one another or inside one another:
    /// tenants own directories under data_dir, and tenement's registry, pid files and sockets
    /// must never be among them (nor theirs among tenement's).
    fn disjoint_dirs(&mut self, table: &RawTable, dirs: [(&str, &PathBuf); 3]) {
        for (i, (a_key, a)) in dirs.iter().enumerate() {
            for (b_key, b) in &dirs[i + 1..] {
                let (la, lb) = (lexical(a), lexical(b));
                if !(la.starts_with(&lb) || lb.starts_with(&la)) {
                    continue;
                }
                let message = format!(
                    "{a_key} {} and {b_key} {} overlap: tenants' data and tenement's own files must live apart; give each its own directory (for example /var/lib/tenement/data, /var/lib/tenement/state, /run/tenement)",
                    shown_path(a),
                    shown_path(b)
                );
                let written = table.get(a_key).or_else(|| table.get(b_key));
                match written {
                    Some(e) => self.error(e.key.span(), message),
                    None => self.report.unplaced(message),
                }
            }
        }
    }

    pub(super) fn settings(&mut self, table: &RawTable) -> Settings {
        self.check_keys(table, "[settings]", SETTINGS_KEYS);
        let dir = &self.config_dir;
        let (data, state, runtime) = if self.env.is_root {
            let lib = Path::new("/var/lib/tenement");
            (lib.join("data"), lib.join("state"), "/run/tenement".into())
        } else {
            let runtime = match &self.env.xdg_runtime_dir {
                Some(xdg) => normalise(&dir.join(xdg).join("tenement")),
                None => dir.join(".tenement/run"),
            };
            (dir.join("data"), dir.join(".tenement/state"), runtime)
        };
        let data_dir = self.dir(table, "data_dir", normalise(&data));
        let state_dir = self.dir(table, "state_dir", normalise(&state));
        let runtime_dir = self.dir(table, "runtime_dir", normalise(&runtime));
        self.disjoint_dirs(
            table,
            [
                ("data_dir", &data_dir),
                ("state_dir", &state_dir),
                ("runtime_dir", &runtime_dir),
            ],
        );
        let socket = runtime_dir.join("admin.sock");
        let len = socket.as_os_str().len();
        if len >= UNIX_PATH_MAX {
            let message = format!(
                "runtime_dir {} is too long: {} is {len} bytes and a Unix socket path must be under {UNIX_PATH_MAX}; set a shorter runtime_dir",
                shown_path(&runtime_dir),
                shown_path(&socket),
            );
            match table.get("runtime_dir") {
                Some(e) => self.error(e.key.span(), message),
                None => self.report.unplaced(message),
            }
        }
        let domains = match table.get("domain") {
            Some(e) => self.domains(e),
            None => vec!["localhost".to_owned()],
        };
        let listen = match table.get("listen") {
            Some(e) => self.listen_addresses(e),
            None => vec![ListenAddress {
                addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
                tls: false,
            }],
        };
        let metrics_listen = match table.get("metrics_listen") {
            Some(e) => {
                let addresses = self.listen_addresses(e);
                for address in addresses.iter().filter(|a| a.tls) {
                    let message = format!(
                        "metrics_listen {address}: the metrics listener is plain HTTP; write {}",
                        address.addr
                    );
                    self.error(e.key.span(), message);
                }
                if let Some(clash) = addresses
                    .iter()
                    .find(|m| listen.iter().any(|l| l.addr == m.addr))
                {
                    let message = format!(
                        "metrics_listen {} is also in listen; metrics go on their own address",
                        clash.addr
                    );
                    self.error(e.key.span(), message);
                }
                addresses
            }
            None => Vec::new(),
        };
        let metrics_per_instance = self.flag(table, "metrics_per_instance", false);
        let tls = match table
            .get("tls")
            .and_then(|e| self.table(e, "[settings.tls]"))
        {
            Some(tls) => self.tls(tls),
            None => crate::config::Tls::default(),
        };
        let port_range = self.port_range(table.get("port_range"));
        let admin_group = table
            .get("admin_group")
            .and_then(|e| self.string(e))
            .map(str::to_owned);
        let proxy_user = table
            .get("proxy_user")
            .and_then(|e| self.string(e))
            .map(str::to_owned);
        let dynamic_users = self.uid_range(table.get("dynamic_users"));
        let isolation = table.get("isolation").map(|_| {
            self.choice(
                table,
                "isolation",
                super::service::ISOLATIONS,
                crate::config::Isolation::Process,
            )
        });
        let user = table
            .get("user")
            .and_then(|e| self.string(e))
            .map(str::to_owned);
        let trusted_proxies = match table.get("trusted_proxies") {
            Some(e) => self.ip_list(e),
            None => Vec::new(),
        };
        let max_connections = self
            .opt_count(table, "max_connections", 1..=1_000_000)
            .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as u32);
        let max_connections_per_client = self
            .opt_count(table, "max_connections_per_client", 1..=1_000_000)
            .map_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT, |n| n as u32);
        Settings {
            max_connections,
            max_connections_per_client,
            isolation,
            user,
            dynamic_users,
            trusted_proxies,
            domains,
            data_dir,
            state_dir,
            runtime_dir,
            listen,
            metrics_listen,
            metrics_per_instance,
            port_range,
            admin_group,
            proxy_user,
            tls,
        }
    }

    fn domains(&mut self, entry: &RawEntry) -> Vec<String> {
        let Some(items) = self.string_list(entry) else {
            return Vec::new();
        };
        if items.is_empty() {
            let message = "domain is empty; list at least one, like domain = \"example.com\"";
            self.error(entry.key.span(), message.to_owned());
        }
        let mut domains: Vec<String> = Vec::with_capacity(items.len());
        for (span, text) in items {
            match check_domain(&text) {
                Ok(domain) if domains.contains(&domain) => {
                    let message = format!("duplicate domain {domain}; list each domain once");
                    self.error(span, message);
                }
                Ok(domain) => domains.push(domain),
                Err(message) => self.error(span, message),
            }
        }
        domains
    }

    /// The uids handed to `user = "dynamic"` instances: "LO-HI", default systemd's
    /// DynamicUser range 61184-65519.
    fn uid_range(&mut self, entry: Option<&RawEntry>) -> RangeInclusive<u32> {
        let default = 61184..=65519;
        let Some(entry) = entry else {
            return default;
        };
        let bounds = match &entry.value {
            RawValue::String(s) => s.split_once('-').and_then(|(lo, hi)| {
                Some((
                    lo.trim().parse::<u32>().ok()?,
                    hi.trim().parse::<u32>().ok()?,
                ))
            }),
            _ => None,
        };
        match bounds {
            Some((lo, hi)) if lo >= 1000 && lo <= hi && hi < 2_147_483_647 => lo..=hi,
            _ => {
                let message = "dynamic_users must be \"LO-HI\" with 1000 <= LO <= HI, like \"61184-65519\"; pick uids no account uses";
                self.error(entry.key.span(), message.to_owned());
                default
            }
        }
    }

    fn ip_list(&mut self, entry: &RawEntry) -> Vec<std::net::IpAddr> {
        let Some(items) = self.string_list(entry) else {
            return Vec::new();
        };
        let mut ips = Vec::with_capacity(items.len());
        for (span, text) in items {
            match text.parse::<std::net::IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    let message = format!(
                        "trusted_proxies entry {text:?} is not an IP address; write it like \"127.0.0.1\" or \"::1\""
                    );
                    self.error(span, message);
                }
            }
        }
        ips
    }

    fn listen_addresses(&mut self, entry: &RawEntry) -> Vec<ListenAddress> {
        let Some(items) = self.string_list(entry) else {
            return Vec::new();
        };
        if items.is_empty() {
            let message =
                "listen is empty; list at least one address, like listen = \"127.0.0.1:8080\"";
            self.error(entry.key.span(), message.to_owned());
        }
        let mut addresses: Vec<ListenAddress> = Vec::with_capacity(items.len());
        for (span, text) in items {
            match text.parse::<ListenAddress>() {
                Ok(address) if addresses.iter().any(|a| a.addr == address.addr) => {
                    let message = format!(
                        "duplicate listen address {}; list each address once",
                        address.addr
                    );
                    self.error(span, message);
                }
                Ok(address) => addresses.push(address),
                Err(message) => self.error(span, message),
            }
        }
        addresses
    }

    fn port_range(&mut self, entry: Option<&RawEntry>) -> RangeInclusive<u16> {
        let default = 20000..=29999;
        let Some(entry) = entry else {
            self.check_ephemeral(&default, None);
            return default;
        };
        let bounds = match &entry.value {
            RawValue::String(s) => s
                .split_once('-')
                .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))),
            RawValue::Array(items) => match items.as_slice() {
                [lo, hi] => match (lo.get_ref(), hi.get_ref()) {
                    (toml::Value::Integer(lo), toml::Value::Integer(hi)) => {
                        u16::try_from(*lo).ok().zip(u16::try_from(*hi).ok())
                    }
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let span = entry.key.span();
        let Some((lo, hi)) = bounds else {
            let message = "port_range must be \"LO-HI\" or [LO, HI] with ports up to 65535; write port_range = \"20000-29999\"";
            self.error(span, message.to_owned());
            return default;
        };
        if lo > hi {
            let message = format!(
                "port_range {lo}-{hi} is backwards; write the lower port first: \"{hi}-{lo}\""
            );
            self.error(span, message);
            return default;
        }
        if lo < 1024 {
            let message = format!(
                "port_range {lo}-{hi} starts below 1024; privileged ports are not handed to apps, start at 1024 or above"
            );
            self.error(span.clone(), message);
        }
        let range = lo..=hi;
        self.check_ephemeral(&range, Some(span));
        range
    }

    /// The kernel hands out its ephemeral ports for outgoing connections at any moment, so an
    /// instance port taken from that range can be busy when the instance binds it.
    fn check_ephemeral(&mut self, range: &RangeInclusive<u16>, span: Option<Span>) {
        let Some(eph) = &self.env.ephemeral_ports else {
            return;
        };
        if range.start() > eph.end() || range.end() < eph.start() {
            return;
        }
        let fix = if *eph.start() > 1024 {
            format!("pick ports below {}", eph.start())
        } else {
            format!("pick ports above {}", eph.end())
        };
        let message = format!(
            "port_range {}-{} overlaps the kernel's ephemeral range {}-{}; {fix}",
            range.start(),
            range.end(),
            eph.start(),
            eph.end()
        );
        match span {
            Some(span) => self.error(span, message),
            None => self.report.unplaced(message),
        }
    }
}

/// A lower-case domain without its trailing dot, or what is wrong with it.
fn check_domain(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err(format!(
            "domain {text:?} is empty; write a host name like \"example.com\""
        ));
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "domain {text:?} is longer than {MAX_DOMAIN_LEN} characters; use a shorter name"
        ));
    }
    for label in name.split('.') {
        validate_label("domain label", label)
            .map_err(|e| format!("invalid domain {text:?}: {e}"))?;
    }
    Ok(name.to_owned())
}
