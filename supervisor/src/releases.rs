//! Releases: immutable, numbered snapshots of what a service runs.
//!
//! A [`Definition`] is the part of a service's config that decides what a tenant's process
//! is (command, workdir, environment, health, readiness, limits, isolation, `migrate`); the
//! rest (idle timeout, restart policy, auto_spawn, the proxy's limits, `listen`) is policy
//! and always comes from the loaded config. Paths are resolved when a release is made, so a
//! release made while `/srv/notes/current` points at `releases/43` runs `releases/43` for
//! good, whatever the link points at later. Pure code: no I/O beyond resolving paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenement_proto::config::{Isolation, Limits, Network, ReadyMode, Service, Template};

/// What a release fixes about a service's processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub argv: Vec<Template>,
    pub workdir: PathBuf,
    pub env: BTreeMap<String, Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub unhealthy_threshold: u32,
    pub startup_timeout: Duration,
    pub stop_grace: Duration,
    pub ready: ReadyMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<PathBuf>,
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<Vec<Template>>,
    pub migrate_timeout: Duration,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

impl Definition {
    /// The definition of `service` as configured now, paths resolved through symlinks: the
    /// working directory, and the program and any absolute argument that exist (a program
    /// given relative to the working directory is resolved there).
    pub fn of(service: &Service) -> Definition {
        let workdir = resolve(&service.workdir);
        let argv = resolve_argv(&service.argv, &workdir);
        let migrate = service
            .migrate
            .as_ref()
            .map(|words| resolve_argv(words, &workdir));
        Definition {
            argv,
            workdir,
            env: service.env.clone(),
            env_file: service.env_file.clone(),
            health: service.health.clone(),
            health_interval: service.health_interval,
            health_timeout: service.health_timeout,
            unhealthy_threshold: service.unhealthy_threshold,
            startup_timeout: service.startup_timeout,
            stop_grace: service.stop_grace,
            ready: service.ready,
            isolation: service.isolation,
            user: service.user.clone(),
            network: service.network,
            writable: service.writable.clone(),
            limits: service.limits,
            migrate,
            migrate_timeout: service.migrate_timeout,
            snapshot: service.snapshot,
        }
    }

    /// `live` (the loaded config's policy) running this definition.
    pub fn apply(&self, live: &Service) -> Service {
        let mut service = live.clone();
        service.argv = self.argv.clone();
        service.workdir = self.workdir.clone();
        service.env = self.env.clone();
        service.env_file = self.env_file.clone();
        service.health = self.health.clone();
        service.health_interval = self.health_interval;
        service.health_timeout = self.health_timeout;
        service.unhealthy_threshold = self.unhealthy_threshold;
        service.startup_timeout = self.startup_timeout;
        service.stop_grace = self.stop_grace;
        service.ready = self.ready;
        service.isolation = self.isolation;
        service.user = self.user.clone();
        service.network = self.network;
        service.writable = self.writable.clone();
        service.limits = self.limits;
        service.migrate = self.migrate.clone();
        service.migrate_timeout = self.migrate_timeout;
        service.snapshot = self.snapshot;
        service
    }

    /// The config keys whose values differ from `before`, in the config's words.
    pub fn changes(&self, before: &Definition) -> Vec<String> {
        let mut changed = Vec::new();
        let mut note = |differs: bool, key: &str| {
            if differs {
                changed.push(key.to_owned());
            }
        };
        note(self.argv != before.argv, "command");
        note(self.workdir != before.workdir, "workdir");
        note(self.env != before.env, "env");
        note(self.env_file != before.env_file, "env_file");
        note(
            self.health != before.health
                || self.health_interval != before.health_interval
                || self.health_timeout != before.health_timeout
                || self.unhealthy_threshold != before.unhealthy_threshold,
            "health",
        );
        note(
            self.ready != before.ready || self.startup_timeout != before.startup_timeout,
            "ready",
        );
        note(self.stop_grace != before.stop_grace, "stop_grace");
        note(
            self.isolation != before.isolation
                || self.user != before.user
                || self.network != before.network
                || self.writable != before.writable,
            "isolation",
        );
        note(self.limits != before.limits, "limits");
        note(
            self.migrate != before.migrate
                || self.migrate_timeout != before.migrate_timeout
                || self.snapshot != before.snapshot,
            "migrate",
        );
        changed
    }

    /// The command line as `tenctl releases` shows it.
    pub fn command_line(&self) -> String {
        let words: Vec<&str> = self.argv.iter().map(Template::source).collect();
        words.join(" ")
    }
}

/// One release of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub number: u32,
    pub created_ms: u64,
    /// `config`, `deploy`, `reload` or `rollback`.
    pub origin: String,
    pub changes: Vec<String>,
    pub definition: Definition,
}

/// Every release of one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Oldest first; numbers rise by one.
    pub releases: Vec<Release>,
    /// The release unpinned tenants should run once a rollout has reached them.
    pub current: u32,
}

impl History {
    /// A service's first release.
    pub fn first(definition: Definition, created_ms: u64) -> History {
        History {
            releases: vec![Release {
                number: 1,
                created_ms,
                origin: "config".to_owned(),
                changes: Vec::new(),
                definition,
            }],
            current: 1,
        }
    }

    pub fn get(&self, number: u32) -> Option<&Release> {
        self.releases.iter().find(|r| r.number == number)
    }

    pub fn latest(&self) -> &Release {
        // Never empty: made by `first` and only ever added to.
        &self.releases[self.releases.len() - 1]
    }

    /// Adds a release of `definition` unless it equals the latest one; returns its number.
    pub fn add(&mut self, definition: Definition, origin: &str, created_ms: u64) -> Option<u32> {
        let latest = self.latest();
        if latest.definition == definition {
            return None;
        }
        let number = latest.number + 1;
        let changes = definition.changes(&latest.definition);
        self.releases.push(Release {
            number,
            created_ms,
            origin: origin.to_owned(),
            changes,
            definition,
        });
        Some(number)
    }
}

fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn resolve_argv(argv: &[Template], workdir: &Path) -> Vec<Template> {
    argv.iter()
        .enumerate()
        .map(|(n, word)| {
            let text = word.source();
            // Placeholders are filled per tenant; braces never name a file here.
            if text.contains('{') || text.contains('}') {
                return word.clone();
            }
            let path = Path::new(text);
            let candidate = if path.is_absolute() {
                path.to_path_buf()
            } else if n == 0 && text.contains('/') {
                workdir.join(path)
            } else {
                return word.clone();
            };
            match std::fs::canonicalize(&candidate) {
                Ok(real) if real != candidate || !path.is_absolute() => real
                    .to_str()
                    .map_or_else(|| word.clone(), Template::literal),
                _ => word.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(argv: &[&str]) -> Definition {
        Definition {
            argv: argv
                .iter()
                .map(|w| Template::parse(w).expect("valid in the test"))
                .collect(),
            workdir: PathBuf::from("/"),
            env: BTreeMap::new(),
            env_file: None,
            health: None,
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(2),
            unhealthy_threshold: 3,
            startup_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            ready: ReadyMode::Tcp,
            isolation: None,
            user: None,
            network: None,
            writable: Vec::new(),
            limits: Limits::default(),
            migrate: None,
            migrate_timeout: Duration::from_secs(300),
            snapshot: false,
        }
    }

    #[test]
    fn a_release_is_added_only_when_the_definition_changed() {
        let mut history = History::first(definition(&["app"]), 1);
        assert_eq!(history.add(definition(&["app"]), "deploy", 2), None);
        assert_eq!(
            history.add(definition(&["app", "--v2"]), "deploy", 3),
            Some(2)
        );
        let latest = history.latest();
        assert_eq!(latest.number, 2);
        assert_eq!(latest.changes, vec!["command".to_owned()]);
        assert_eq!(history.get(1).map(|r| r.number), Some(1));
    }

    #[test]
    fn paths_are_resolved_through_symlinks_when_the_release_is_made() {
        let dir = tempfile::tempdir().expect("valid in the test");
        let v1 = dir.path().join("releases/1");
        std::fs::create_dir_all(&v1).expect("valid in the test");
        std::fs::write(v1.join("server"), "").expect("valid in the test");
        let current = dir.path().join("current");
        std::os::unix::fs::symlink(&v1, &current).expect("valid in the test");
        let program = current.join("server");
        let mut d = definition(&[
            program.to_str().expect("valid in the test"),
            "--port",
            "{port}",
        ]);
        d.workdir = resolve(&current);
        d.argv = resolve_argv(&d.argv, &d.workdir);
        let real = std::fs::canonicalize(v1.join("server")).expect("valid in the test");
        assert_eq!(
            d.argv[0].source(),
            real.to_str().expect("valid in the test")
        );
        assert_eq!(d.argv[2].source(), "{port}");
        assert_eq!(
            d.workdir,
            std::fs::canonicalize(&v1).expect("valid in the test")
        );
        // Relative programs are resolved against the working directory.
        let relative = resolve_argv(
            &[Template::parse("./server").expect("valid in the test")],
            &d.workdir,
        );
        assert_eq!(
            relative[0].source(),
            real.to_str().expect("valid in the test")
        );
        // Words that are not files are left alone.
        let plain = resolve_argv(
            &[Template::parse("python3").expect("valid in the test")],
            &d.workdir,
        );
        assert_eq!(plain[0].source(), "python3");
    }

    #[test]
    fn a_definition_survives_the_state_file() {
        let mut d = definition(&["app", "{data_dir}/x"]);
        d.migrate = Some(vec![Template::parse("migrate").expect("valid in the test")]);
        let text = serde_json::to_string(&d).expect("valid in the test");
        let back: Definition = serde_json::from_str(&text).expect("valid in the test");
        assert_eq!(back, d);
    }
}
