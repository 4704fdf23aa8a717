//! `tenement.toml`: the typed, validated configuration every binary reads.
//!
//! Two phases (ripgrep's lowargs -> hiargs): [`raw`] is a serde mirror of the file with
//! `deny_unknown_fields` and spans; [`validate`] turns it into [`Config`], collecting every
//! problem at once as `FILE:LINE:COL: message` lines. Nothing here reads the environment or
//! the machine: what validation needs from them comes in an [`Environment`].

mod duration;
mod raw;
mod template;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ids::{InstanceId, ServiceName};

pub use duration::parse_duration;
pub use template::{Template, TemplateVars};

/// The default config path of every binary.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tenement/tenement.toml";

/// Facts about the machine and the caller that defaults and checks depend on.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// Whether the caller runs as root: picks /var/lib/tenement and /run/tenement defaults.
    pub is_root: bool,
    /// `$XDG_RUNTIME_DIR`, used for the non-root `runtime_dir` default.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`); a
    /// `port_range` overlapping it is refused.
    pub ephemeral_ports: Option<RangeInclusive<u16>>,
}

impl Environment {
    /// The facts as every tenement program finds them for itself, so all compute the same
    /// defaults (`runtime_dir` above all); `is_root` is the caller's effective uid being 0.
    pub fn of_this_process(is_root: bool) -> Self {
        Environment {
            is_root,
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
            ephemeral_ports: ephemeral_range(),
        }
    }
}

/// The kernel's ephemeral port range (ip_local_port_range in
/// <https://docs.kernel.org/networking/ip-sysctl.html>).
pub fn ephemeral_range() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (parts.next(), parts.next()) else {
        return None;
    };
    Some(lo..=hi)
}

/// A validated configuration. Every path is absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from (absolute).
    pub path: PathBuf,
    pub settings: Settings,
    pub services: BTreeMap<ServiceName, Service>,
    /// Instances declared in `[instances]`, in file order, without duplicates.
    pub instances: Vec<InstanceId>,
    /// `[fleet]`: this host is one of several sharing tenants through etcd (docs/FLEET.md).
    pub fleet: Option<Fleet>,
}

/// `[fleet]`: how this host joins a fleet of tenement hosts coordinated through etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    /// This host's name in the fleet: 1-63 of `a-z`, `0-9` and `-`, not starting or ending
    /// with `-`. Placement records name hosts by it.
    pub host: String,
    /// Where the other hosts reach this one's proxy (its own address, not a load balancer's).
    pub address: SocketAddr,
    /// The etcd members' client URLs (`http://10.0.0.1:2379`), at least one.
    pub etcd: Vec<String>,
    /// The time-to-live of this host's membership lease. A host that cannot renew it for this
    /// long is gone; it fences itself before then.
    pub lease_ttl: Duration,
    /// How long the controller waits after a host's lease expired before moving its tenants.
    pub grace: Duration,
    /// The most tenants the controller places on this host (none: no cap).
    pub max_tenants: Option<u32>,
    /// The fleet credential: with it the proxy takes requests from the other hosts on
    /// `address` and forwards there the requests for tenants placed on them (docs/FLEET.md).
    pub tls: Option<FleetTls>,
}

/// `[fleet] ca`, `cert`, `key`: the fleet's own CA and this host's certificate from it. Hosts
/// talk to each other over TLS where each side shows its certificate: only a holder of one
/// signed by `ca` can hand a request to a proxy, or take one.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Fleet {
    /// Whether `name` can be a host's name: 1-63 of `a-z`, `0-9` and `-`, not starting or
    /// ending with `-` (a DNS label, so it is safe in an etcd key, a path and a log line).
    pub fn valid_host(name: &str) -> bool {
        (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Lower-case domains without trailing dot; at least one.
    pub domains: Vec<String>,
    /// Root of every service's data: instance dirs are `data_dir/<service>/<id>`.
    pub data_dir: PathBuf,
    /// Where the registry is kept.
    pub state_dir: PathBuf,
    /// Where the RPC sockets live.
    pub runtime_dir: PathBuf,
    /// The proxy's listen addresses when systemd hands it none.
    pub listen: Vec<ListenAddress>,
    /// Ports handed to instances.
    pub port_range: RangeInclusive<u16>,
    /// Members of this group may use the admin socket (root always may).
    pub admin_group: Option<String>,
    /// When the supervisor runs as root without systemd, `proxy.sock` is made usable by this
    /// user's group (the user `tenement-proxy --user` drops to).
    pub proxy_user: Option<String>,
    /// Peers whose X-Forwarded-For/-Proto and Forwarded headers the proxy keeps and extends
    /// (a load balancer in front of it). Anyone else's are replaced.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Uids (and gids) for instances of services with `user = "dynamic"`.
    pub dynamic_users: RangeInclusive<u32>,
    /// Client connections the proxy holds at once (more wait in the kernel's backlog).
    pub max_connections: u32,
    /// Client connections one address may hold at once (more are closed at once).
    pub max_connections_per_client: u32,
    /// The isolation of services that do not set their own.
    pub isolation: Option<Isolation>,
    /// The user of services that do not set their own.
    pub user: Option<String>,
    /// HTTPS in the proxy (`[settings.tls]`).
    pub tls: Tls,
    /// Where the proxy serves `/metrics` when systemd passes no socket named `metrics`
    /// (plain HTTP; empty: nowhere).
    pub metrics_listen: Vec<ListenAddress>,
    /// Series per running instance (memory, CPU, requests) in the metrics.
    pub metrics_per_instance: bool,
}

/// A listening address of the proxy: `127.0.0.1:8080` (plain HTTP, also written
/// `http://127.0.0.1:8080`) or `https://127.0.0.1:8443` (the proxy terminates TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddress {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl std::str::FromStr for ListenAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (tls, rest) = match text.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "listen address {text:?} has scheme {scheme:?}; use http:// or https://"
                ))
            }
            None => (false, text),
        };
        let addr = rest.parse::<SocketAddr>().map_err(|_| {
            format!(
                "listen address {text:?} is not [https://]IP:PORT; write it like \"127.0.0.1:8080\" or \"https://[::1]:8443\""
            )
        })?;
        Ok(ListenAddress { addr, tls })
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            write!(f, "https://{}", self.addr)
        } else {
            write!(f, "{}", self.addr)
        }
    }
}

/// `[settings.tls]`: where the proxy's certificates come from and how plain HTTP is treated.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    /// Certificate files (PEM chain and key), in the file's order; the first is also the
    /// certificate of clients that send no server name.
    pub certificates: Vec<CertificateFiles>,
    /// A plain-HTTP request for a name that has a certificate is answered 308 to https://
    /// (default true).
    pub redirect_http: bool,
    /// `Strict-Transport-Security: max-age=...` on HTTPS answers; `None`: not sent.
    pub hsts: Option<Duration>,
    /// The port redirects to https:// name (`None`: the first HTTPS listener's own port).
    pub https_port: Option<u16>,
    /// Certificates from an ACME CA, on demand (`None`: off; on when `acme_email` is set).
    pub acme: Option<Acme>,
}

/// The Let's Encrypt production directory, the default of `acme_directory`.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `[settings.tls] acme_*`: certificates ordered from an ACME CA by the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Acme {
    /// The account's contact address.
    pub email: String,
    /// The CA's directory URL (https).
    pub directory: String,
    /// A PEM root to trust for the directory's own HTTPS (a test or private CA); `None`:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The challenge types to answer, in order of preference.
    pub challenges: Vec<Challenge>,
    /// Orders placed in any hour / any 7 days, renewals included, at most.
    pub orders_per_hour: u32,
    pub orders_per_week: u32,
    /// How long a TLS handshake for a name without a certificate is held while one is ordered.
    pub wait: Duration,
    /// Where the account and the certificates are kept (`None`: the proxy's state directory:
    /// `$STATE_DIRECTORY`, else /var/lib/tenement-proxy as root, else
    /// `$XDG_STATE_HOME/tenement-proxy`).
    pub state_dir: Option<PathBuf>,
}

impl Acme {
    /// Where the proxy keeps the account and certificates: `acme_state_dir`, else systemd's
    /// `$STATE_DIRECTORY` (`StateDirectory=tenement-proxy`), else /var/lib/tenement-proxy for
    /// root, else `$XDG_STATE_HOME/tenement-proxy` (`~/.local/state/tenement-proxy`).
    pub fn state_dir(&self, is_root: bool) -> Option<PathBuf> {
        if let Some(dir) = &self.state_dir {
            return Some(dir.clone());
        }
        if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
            let dirs = dirs.to_string_lossy().into_owned();
            if let Some(first) = dirs.split(':').find(|d| d.starts_with('/')) {
                return Some(PathBuf::from(first));
            }
        }
        if is_root {
            return Some(PathBuf::from("/var/lib/tenement-proxy"));
        }
        let base = match std::env::var_os("XDG_STATE_HOME") {
            Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".local/state"),
        };
        Some(base.join("tenement-proxy"))
    }
}

/// An ACME challenge type the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// TLS-ALPN-01 (RFC 8737): a certificate shown on the https listener (port 443).
    TlsAlpn01,
    /// HTTP-01: a file served on the http listener (port 80) under /.well-known/acme-challenge/.
    Http01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Http01 => "http-01",
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certificates: Vec::new(),
            redirect_http: true,
            hsts: None,
            https_port: None,
            acme: None,
        }
    }
}

/// One `{ cert = "...", key = "..." }` of `[settings.tls] certificates` (absolute paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Settings {
    /// The admin RPC socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.runtime_dir.join("admin.sock")
    }

    /// The proxy-role RPC socket.
    pub fn proxy_socket(&self) -> PathBuf {
        self.runtime_dir.join("proxy.sock")
    }

    /// The fleet agent's control socket (on a `[fleet]` host), for the supervisor only.
    pub fn fleet_socket(&self) -> PathBuf {
        self.runtime_dir.join("fleet.sock")
    }

    /// The registry file.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("registry.json")
    }

    /// A service's data root, `{data_dir}` in templates.
    pub fn service_data_dir(&self, service: &ServiceName) -> PathBuf {
        self.data_dir.join(service.as_str())
    }

    /// An instance's own directory.
    pub fn instance_data_dir(&self, instance: &InstanceId) -> PathBuf {
        self.service_data_dir(&instance.service)
            .join(instance.id.as_str())
    }
}

/// How an instance is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenMode {
    /// The app binds `127.0.0.1:$PORT`.
    Tcp,
    /// The app binds the Unix socket at `$SOCKET_PATH`.
    Unix,
    /// The supervisor binds `127.0.0.1:PORT` and passes it as fd 3 (LISTEN_FDS=1).
    Activate,
}

/// How the supervisor knows a start finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyMode {
    /// The address accepts a connection.
    Tcp,
    /// The health path answers 2xx.
    Health,
    /// The app sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Process,
    Namespace,
    Sandbox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: ServiceName,
    /// `command` shell-split (without a shell), then `args`. Each element may hold
    /// placeholders; see [`Template`].
    pub argv: Vec<Template>,
    /// Absolute working directory (default: the config file's directory).
    pub workdir: PathBuf,
    /// Extra environment, in name order; values are templates.
    pub env: BTreeMap<String, Template>,
    /// Health path such as `/health`.
    pub health: Option<String>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub unhealthy_threshold: u32,
    pub startup_timeout: Duration,
    pub stop_grace: Duration,
    /// `None`: never stopped for idleness (`idle_timeout = 0` or `"never"`).
    pub idle_timeout: Option<Duration>,
    pub listen: ListenMode,
    pub ready: ReadyMode,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub auto_spawn: bool,
    /// The most instances `auto_spawn` may create for this service.
    pub auto_spawn_max: u32,
    /// How long an auto-spawned instance that never answered with success stays registered.
    pub auto_spawn_expire: Duration,
    /// Connections the proxy opens to one instance at once; more requests wait for one.
    pub max_upstream_connections: u32,
    /// `None`: the supervisor's default for how it runs.
    pub isolation: Option<Isolation>,
    pub user: Option<String>,
    /// Largest request body the proxy forwards to this service (larger: 413).
    pub max_body_size: u64,
    /// `None`: the isolation level's default (`none` for sandbox, `host` otherwise).
    pub network: Option<Network>,
    /// Paths that stay writable when the file system is read-only (namespace, sandbox).
    pub writable: Vec<PathBuf>,
    /// `KEY=VALUE` lines the supervisor reads at each start and adds to the environment after
    /// `env`: where secrets go, since the config file is readable by the proxy and tenctl.
    pub env_file: Option<PathBuf>,
    pub limits: Limits,
    /// Run before the app starts on a release it has not run yet (once per tenant per
    /// release), with the instance's own environment, user and isolation: `command` words.
    pub migrate: Option<Vec<Template>>,
    /// How long `migrate` may run.
    pub migrate_timeout: Duration,
    /// Copy the tenant's data directory before `migrate`, and put the copy back if the
    /// tenant fails on the release.
    pub snapshot: bool,
    /// What a reload that changes the service's release does to its running instances.
    pub rollout: RolloutPolicy,
    /// How long a tenant switched by a rollout must stay ready, healthy and free of 5xx
    /// answers before the rollout moves on.
    pub rollout_bake: Duration,
}

/// What a reload that changes a service's definition does to its running instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutPolicy {
    /// A new release and a rollout: one tenant at a time, sleeping ones at their next wake.
    Rolling,
    /// A new release, and every running instance restarts on it at once.
    Restart,
}

/// Whether an instance shares the host's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    Host,
    /// Its own network namespace with only loopback.
    None,
}

/// Resource limits of one instance: cgroup v2 controls and rlimits. `None`: not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// memory.max, bytes.
    pub memory_max: Option<u64>,
    /// memory.high, bytes.
    pub memory_high: Option<u64>,
    /// cpu.weight, 1-10000.
    pub cpu_weight: Option<u32>,
    /// cpu.max as a percentage of one CPU.
    pub cpu_max_percent: Option<u32>,
    /// pids.max.
    pub pids_max: Option<u64>,
    /// RLIMIT_NOFILE.
    pub nofile: Option<u64>,
    /// RLIMIT_NPROC.
    pub nproc: Option<u64>,
    /// Size of each private tmpfs (/tmp, /var/tmp, /dev/shm) under `namespace` and `sandbox`.
    pub tmp_size: Option<u64>,
}

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    /// 1-based; 0 when the problem has no place in the file (it could not be read).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found in a config file, one [`Diagnostic`] per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, env: &Environment) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            diagnostics: vec![Diagnostic {
                path: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read config: {e}"),
            }],
        })?;
        let absolute = absolute_path(path);
        Self::parse(&text, &absolute, env)
    }

    /// Validates `text` as if read from `path` (which must be absolute: relative paths in the
    /// file resolve against its directory).
    pub fn parse(text: &str, path: &Path, env: &Environment) -> Result<Config, ConfigError> {
        validate::validate(text, path, env)
    }

    pub fn service(&self, name: &ServiceName) -> Option<&Service> {
        self.services.get(name)
    }
}

/// `path` made absolute against the current directory, without touching the file system
/// beyond reading the current directory.
pub fn absolute_path(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path.to_path_buf(),
    }
}
