//! `[service.NAME]`: the command line, environment, health checking and restart policy of
//! one service.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{show, toml_key, Checker, RawEntry, RawTable, RawValue, Span};
use crate::config::{
    Isolation, Limits, ListenMode, Network, ReadyMode, RolloutPolicy, Service, Template,
};
use crate::ids::ServiceName;

const SERVICE_KEYS: &[&str] = &[
    "command",
    "args",
    "workdir",
    "health",
    "health_interval",
    "health_timeout",
    "unhealthy_threshold",
    "startup_timeout",
    "stop_grace",
    "idle_timeout",
    "listen",
    "ready",
    "max_restarts",
    "restart_window",
    "backoff_base",
    "backoff_max",
    "auto_spawn",
    "auto_spawn_max",
    "auto_spawn_expire",
    "max_upstream_connections",
    "isolation",
    "user",
    "max_body_size",
    "network",
    "writable",
    "env_file",
    "memory_max",
    "memory_high",
    "cpu_weight",
    "cpu_max",
    "pids_max",
    "nofile",
    "nproc",
    "tmp_size",
    "migrate",
    "migrate_timeout",
    "snapshot",
    "rollout",
    "rollout_bake",
    "env",
];
const NETWORKS: &[(&str, Network)] = &[("host", Network::Host), ("none", Network::None)];
/// Variables the supervisor sets for every instance; a config value would be overwritten or,
/// worse, confuse socket activation.
const RESERVED_ENV: &[&str] = &[
    "PORT",
    "HOST",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "SOCKET_PATH",
];
const MAX_HEALTH_PATH: usize = 1024;
/// 1 GiB: large uploads work out of the box; lower it per service.
const DEFAULT_MAX_BODY_SIZE: u64 = 1 << 30;
/// Instances `auto_spawn` may create for a service, at most.
const DEFAULT_AUTO_SPAWN_MAX: u32 = 100;
/// Connections from the proxy to one instance at once.
const DEFAULT_MAX_UPSTREAM_CONNECTIONS: u32 = 256;
/// `health_timeout` when not written, or half of `health_interval` if that is shorter.
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const LISTEN_MODES: &[(&str, ListenMode)] = &[
    ("tcp", ListenMode::Tcp),
    ("unix", ListenMode::Unix),
    ("activate", ListenMode::Activate),
];
const ROLLOUT_POLICIES: &[(&str, RolloutPolicy)] = &[
    ("rolling", RolloutPolicy::Rolling),
    ("restart", RolloutPolicy::Restart),
];
const READY_MODES: &[(&str, ReadyMode)] = &[
    ("tcp", ReadyMode::Tcp),
    ("health", ReadyMode::Health),
    ("notify", ReadyMode::Notify),
];
pub(super) const ISOLATIONS: &[(&str, Isolation)] = &[
    ("process", Isolation::Process),
    ("namespace", Isolation::Namespace),
    ("sandbox", Isolation::Sandbox),
];

impl Checker<'_> {
    pub(super) fn service(&mut self, entry: &RawEntry) -> Option<Service> {
        let raw_name = entry.key.get_ref();
        let name = match ServiceName::new(raw_name.as_str()) {
            Ok(name) => Some(name),
            Err(e) => {
                let message = format!("invalid service name {raw_name:?}: {e}");
                self.error(entry.key.span(), message);
                None
            }
        };
        let header = format!("[service.{}]", toml_key(raw_name));
        let body = self.table(entry, &header)?;
        // A misspelt `command` is reported as unknown, not also as missing.
        let keys_known = self.check_keys(body, &header, SERVICE_KEYS);

        let argv = self.argv(entry, body, keys_known);
        let workdir = self.dir(body, "workdir", self.config_dir.clone());
        let env = body
            .get("env")
            .and_then(|e| self.table(e, &format!("[service.{}.env]", toml_key(raw_name))))
            .map(|t| self.env_vars(t))
            .unwrap_or_default();
        let health = body.get("health").and_then(|e| self.health(e));
        let health_interval = self.duration(body, "health_interval", Duration::from_secs(10));
        // The default timeout follows a short interval the user chose, so that writing only
        // `health_interval = "1s"` stays valid; a timeout the user wrote is checked as written.
        let health_timeout = match body.get("health_timeout") {
            Some(_) => self.duration(body, "health_timeout", DEFAULT_HEALTH_TIMEOUT),
            None => DEFAULT_HEALTH_TIMEOUT.min(health_interval / 2),
        };
        let unhealthy_threshold = self.count(body, "unhealthy_threshold", 3);
        let startup_timeout = self.duration(body, "startup_timeout", Duration::from_secs(30));
        let stop_grace = self.duration(body, "stop_grace", Duration::from_secs(10));
        let idle_timeout = match body.get("idle_timeout") {
            Some(e) if e.value == RawValue::String("never".into()) => None,
            _ => Some(self.duration(body, "idle_timeout", Duration::from_secs(300)))
                .filter(|d| !d.is_zero()),
        };
        let listen = self.choice(body, "listen", LISTEN_MODES, ListenMode::Tcp);
        let ready_default = match health {
            Some(_) => ReadyMode::Health,
            None => ReadyMode::Tcp,
        };
        let ready = self.choice(body, "ready", READY_MODES, ready_default);
        let max_restarts = self.count(body, "max_restarts", 5);
        let restart_window = self.duration(body, "restart_window", Duration::from_secs(60));
        let backoff_base = self.duration(body, "backoff_base", Duration::from_millis(500));
        let backoff_max = self.duration(body, "backoff_max", Duration::from_secs(30));
        let auto_spawn = self.flag(body, "auto_spawn", false);
        let isolation = body
            .get("isolation")
            .map(|_| self.choice(body, "isolation", ISOLATIONS, Isolation::Process));
        let user = body
            .get("user")
            .and_then(|e| self.string(e))
            .map(str::to_owned);
        let max_body_size = self.size(body, "max_body_size", DEFAULT_MAX_BODY_SIZE);
        let network = body
            .get("network")
            .map(|_| self.choice(body, "network", NETWORKS, Network::Host));
        let auto_spawn_max = self
            .opt_count(body, "auto_spawn_max", 1..=1_000_000)
            .map_or(DEFAULT_AUTO_SPAWN_MAX, |n| n as u32);
        let auto_spawn_expire =
            self.duration(body, "auto_spawn_expire", Duration::from_secs(15 * 60));
        let max_upstream_connections = self
            .opt_count(body, "max_upstream_connections", 1..=65_536)
            .map_or(DEFAULT_MAX_UPSTREAM_CONNECTIONS, |n| n as u32);
        let writable = match body.get("writable") {
            Some(e) => self.absolute_paths(e),
            None => Vec::new(),
        };
        // Relative to the config file, like workdir; read by the supervisor only, at each start.
        let env_file = body
            .get("env_file")
            .and_then(|e| self.string(e))
            .map(|s| crate::config::absolute_path(&self.config_dir.join(s)));
        let limits = Limits {
            memory_max: self.opt_size(body, "memory_max"),
            memory_high: self.opt_size(body, "memory_high"),
            cpu_weight: self
                .opt_count(body, "cpu_weight", 1..=10_000)
                .map(|n| n as u32),
            cpu_max_percent: body.get("cpu_max").and_then(|e| self.percent(e)),
            pids_max: self.opt_count(body, "pids_max", 1..=4_194_304),
            nofile: self.opt_count(body, "nofile", 16..=1_048_576),
            nproc: self.opt_count(body, "nproc", 1..=4_194_304),
            tmp_size: self.opt_size(body, "tmp_size"),
        };
        let migrate = body
            .get("migrate")
            .and_then(|e| self.command_words(e, "migrate"));
        let migrate_timeout = self.duration(body, "migrate_timeout", Duration::from_secs(300));
        let snapshot = self.flag(body, "snapshot", false);
        let rollout = self.choice(body, "rollout", ROLLOUT_POLICIES, RolloutPolicy::Rolling);
        let rollout_bake = self.duration(body, "rollout_bake", Duration::from_secs(5));
        let day = Duration::from_secs(24 * 3600);
        if migrate_timeout.is_zero() || migrate_timeout > day {
            let message =
                "migrate_timeout must be more than 0 and at most 24h; write migrate_timeout = \"5m\"";
            self.error(
                body.get("migrate_timeout")
                    .map_or_else(|| entry.key.span(), |e| e.key.span()),
                message.to_owned(),
            );
        }
        if rollout_bake > day {
            let message = "rollout_bake must be at most 24h; write rollout_bake = \"5s\"";
            self.error(
                body.get("rollout_bake")
                    .map_or_else(|| entry.key.span(), |e| e.key.span()),
                message.to_owned(),
            );
        }
        if network == Some(Network::None) && listen == ListenMode::Tcp {
            let message = "network = \"none\" leaves the app no way to be reached over TCP; use listen = \"activate\" or listen = \"unix\"";
            self.error(
                body.get("network")
                    .map_or_else(|| entry.key.span(), |e| e.key.span()),
                message.to_owned(),
            );
        }

        // Checks between keys: reported at the first of the keys that is written, else at
        // the service's header.
        let at = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| body.get(k))
                .map_or_else(|| entry.key.span(), |e| e.key.span())
        };
        if ready == ReadyMode::Health && health.is_none() && body.get("health").is_none() {
            let message = "ready = \"health\" needs health = \"/path\"; add a health path or use ready = \"tcp\"";
            self.error(at(&["ready"]), message.to_owned());
        }
        if body.get("unhealthy_threshold").is_some() && unhealthy_threshold == 0 {
            let message =
                "unhealthy_threshold must be at least 1: it counts failed probes before a restart";
            self.error(at(&["unhealthy_threshold"]), message.to_owned());
        }
        if startup_timeout.is_zero() {
            let message = "startup_timeout must be more than 0; write startup_timeout = \"30s\"";
            self.error(at(&["startup_timeout"]), message.to_owned());
        }
        if health_interval.is_zero() {
            let message = "health_interval must be more than 0; write health_interval = \"10s\"";
            self.error(at(&["health_interval"]), message.to_owned());
        } else if health_timeout >= health_interval {
            let message = format!(
                "health_timeout {} must be shorter than health_interval {}; lower health_timeout or raise health_interval",
                show(health_timeout),
                show(health_interval)
            );
            self.error(at(&["health_timeout", "health_interval"]), message);
        }
        if backoff_base > backoff_max {
            let message = format!(
                "backoff_base {} is longer than backoff_max {}; lower backoff_base or raise backoff_max",
                show(backoff_base),
                show(backoff_max)
            );
            self.error(at(&["backoff_base", "backoff_max"]), message);
        }

        Some(Service {
            name: name?,
            argv: argv?,
            workdir,
            env,
            health,
            health_interval,
            health_timeout,
            unhealthy_threshold,
            startup_timeout,
            stop_grace,
            idle_timeout,
            listen,
            ready,
            max_restarts,
            restart_window,
            backoff_base,
            backoff_max,
            auto_spawn,
            auto_spawn_max,
            auto_spawn_expire,
            max_upstream_connections,
            isolation,
            user,
            max_body_size,
            network,
            writable,
            env_file,
            limits,
            migrate,
            migrate_timeout,
            snapshot,
            rollout,
            rollout_bake,
        })
    }

    /// A command line such as `migrate = "python3 migrate.py {data_dir}"`: words split
    /// without a shell, each a template.
    fn command_words(&mut self, entry: &RawEntry, key: &str) -> Option<Vec<Template>> {
        let span = entry.key.span();
        let text = self.string(entry)?;
        let words = match shell_words::split(text) {
            Ok(words) if !words.is_empty() => words,
            Ok(_) => {
                let message =
                    format!("{key} is empty; write the program to run, like {key} = \"./migrate\"");
                self.error(span, message);
                return None;
            }
            Err(e) => {
                let message = format!("{key} has unbalanced quotes ({e}); close the quote");
                self.error(span, message);
                return None;
            }
        };
        let mut argv = Vec::with_capacity(words.len());
        for word in words {
            match Template::parse(&word) {
                Ok(t) => argv.push(t),
                Err(e) => {
                    self.error(span.clone(), format!("{key}: {e}"));
                    return None;
                }
            }
        }
        Some(argv)
    }

    /// `"50%"` of one CPU (up to `"6400%"`), for cpu_max.
    fn percent(&mut self, entry: &RawEntry) -> Option<u32> {
        let parsed = match &entry.value {
            RawValue::String(s) => s
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<u32>().ok())
                .filter(|n| (1..=6400).contains(n)),
            _ => None,
        };
        if parsed.is_none() {
            let message =
                "cpu_max must be a share of one CPU like \"50%\" or \"200%\" (1% to 6400%)";
            self.error(entry.key.span(), message.to_owned());
        }
        parsed
    }

    fn absolute_paths(&mut self, entry: &RawEntry) -> Vec<std::path::PathBuf> {
        let Some(items) = self.string_list(entry) else {
            return Vec::new();
        };
        let mut paths = Vec::new();
        for (span, text) in items {
            let path = std::path::PathBuf::from(&text);
            if path.is_absolute() && !text.split('/').any(|part| part == "..") {
                paths.push(path);
            } else {
                let message = format!(
                    "writable path {text:?} must be absolute without '..', like \"/var/cache/app\""
                );
                self.error(span, message);
            }
        }
        paths
    }

    /// `command` split into words without a shell, then `args`, each word a template.
    fn argv(
        &mut self,
        service: &RawEntry,
        body: &RawTable,
        keys_known: bool,
    ) -> Option<Vec<Template>> {
        let mut words: Vec<(Span, &str, String)> = Vec::new();
        let mut ok = true;
        let command = body.get("command");
        if let Some(entry) = command {
            let span = entry.key.span();
            match &entry.value {
                RawValue::String(s) => match shell_words::split(s) {
                    Ok(split) if split.is_empty() => {
                        let message = "command is empty; write the program to run, like command = \"python3 app.py\"";
                        self.error(span, message.to_owned());
                        ok = false;
                    }
                    Ok(split) => {
                        words.extend(split.into_iter().map(|w| (span.clone(), "command", w)))
                    }
                    Err(e) => {
                        let message = format!(
                            "command has unbalanced quotes ({e}); close the quote or move the arguments to args = [\"...\"]"
                        );
                        self.error(span, message);
                        ok = false;
                    }
                },
                _ => ok &= self.string(entry).is_some(),
            }
        }
        let args = body.get("args");
        if let Some(entry) = args {
            match self.string_array(entry) {
                Some(items) => words.extend(items.into_iter().map(|(span, w)| (span, "args", w))),
                None => ok = false,
            }
        }
        if words.is_empty() {
            if !ok || !keys_known {
                return None;
            }
            let message = format!(
                "service {} has no command; add command = \"...\"",
                service.key.get_ref().escape_debug()
            );
            self.error(service.key.span(), message);
            return None;
        }
        let mut argv = Vec::with_capacity(words.len());
        for (span, key, word) in words {
            match Template::parse(&word) {
                Ok(t) => argv.push(t),
                Err(e) => {
                    self.error(span, format!("{key}: {e}"));
                    ok = false;
                }
            }
        }
        ok.then_some(argv)
    }

    fn env_vars(&mut self, table: &RawTable) -> BTreeMap<String, Template> {
        let mut vars = BTreeMap::new();
        for entry in &table.entries {
            let name = entry.key.get_ref();
            let shown_name = name.escape_debug();
            let span = entry.key.span();
            if !is_env_name(name) {
                let message = format!(
                    "env name {name:?} is not valid; use letters, digits and '_', not starting with a digit"
                );
                self.error(span.clone(), message);
            } else if RESERVED_ENV.contains(&name.as_str()) || name.starts_with("TENEMENT_") {
                self.error(
                    span.clone(),
                    format!("env {shown_name} is set by tenement; remove it"),
                );
            }
            match &entry.value {
                RawValue::String(s) => match Template::parse(s) {
                    Ok(t) => {
                        vars.insert(name.clone(), t);
                    }
                    Err(e) => self.error(span, format!("env {shown_name}: {e}")),
                },
                other => {
                    let message = format!(
                        "env {shown_name} must be a string, not {}; quote it",
                        other.kind()
                    );
                    self.error(span, message);
                }
            }
        }
        vars
    }

    fn health(&mut self, entry: &RawEntry) -> Option<String> {
        let path = self.string(entry)?;
        let problem = if !path.starts_with('/') {
            format!("health {path:?} must start with '/', like health = \"/health\"")
        } else if !path.bytes().all(|b| b.is_ascii_graphic()) {
            format!("health {path:?} may only hold printable ASCII without spaces; percent-encode the rest")
        } else if path.len() > MAX_HEALTH_PATH {
            format!(
                "health is {} bytes long; use a path of at most {MAX_HEALTH_PATH}",
                path.len()
            )
        } else {
            return Some(path.to_owned());
        };
        self.error(entry.key.span(), problem);
        None
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, what a POSIX shell accepts as a variable name.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::{Config, Environment};

    fn first_service(text: &str) -> Result<crate::config::Service, String> {
        let text = format!("[settings]\ndomain = \"localhost\"\n\n{text}");
        Config::parse(
            &text,
            Path::new("/t/tenement.toml"),
            &Environment::default(),
        )
        .map(|config| config.services.into_values().next().expect("one service"))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_short_health_interval_alone_gets_a_timeout_that_fits() {
        let service = first_service(
            "[service.web]\ncommand = \"app\"\nhealth = \"/h\"\nhealth_interval = \"1s\"\n",
        )
        .expect("only an interval of 1 s is a valid service");
        assert_eq!(service.health_interval, Duration::from_secs(1));
        assert_eq!(service.health_timeout, Duration::from_millis(500));
        let long = first_service("[service.web]\ncommand = \"app\"\nhealth_interval = \"1m\"\n")
            .expect("valid");
        assert_eq!(long.health_timeout, Duration::from_secs(2));
    }

    #[test]
    fn a_written_timeout_not_shorter_than_the_interval_is_still_refused() {
        let error = first_service(
            "[service.web]\ncommand = \"app\"\nhealth_interval = \"1s\"\nhealth_timeout = \"2s\"\n",
        )
        .expect_err("a timeout the user wrote is checked");
        assert!(
            error.contains("health_timeout 2s must be shorter than health_interval 1s"),
            "{error}"
        );
        assert!(error.contains("tenement.toml:"), "{error}");
    }
}
