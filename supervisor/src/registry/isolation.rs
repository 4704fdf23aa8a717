//! Deciding how one start of an instance is isolated: its level, user, cgroup and the mounts
//! its namespace gets. The exec helper carries the plan out; this only decides and prepares
//! what the supervisor owns (the cgroup, the uid, directory ownership).

use std::path::{Path, PathBuf};

use tenement_proto::config::{Isolation, ListenMode, Network, Service};
use tenement_proto::InstanceId;

use crate::exec_helper::IsolationSpec;

use super::instance::instance_runtime_dir;
use super::Registry;

/// What a start needs from the isolation plan.
pub struct Plan {
    pub spec: IsolationSpec,
    pub cgroup: Option<PathBuf>,
}

impl Registry {
    /// The isolation level a service gets: what it asks for, else `namespace` when the
    /// supervisor is root and `process` otherwise.
    pub(super) fn level_of(&self, service: &Service) -> Isolation {
        service
            .isolation
            .or(self.config.settings.isolation)
            .unwrap_or(if self.is_root {
                Isolation::Namespace
            } else {
                Isolation::Process
            })
    }

    pub(super) fn plan_isolation(
        &mut self,
        id: &InstanceId,
        service: &Service,
    ) -> Result<Plan, String> {
        let level = self.level_of(service);
        if level != Isolation::Process && !self.is_root {
            return Err(format!(
                "isolation = \"{}\" needs the supervisor to run as root; use isolation = \"process\"",
                level_name(level)
            ));
        }
        let network = service.network.unwrap_or(if level == Isolation::Sandbox {
            Network::None
        } else {
            Network::Host
        });
        if network == Network::None && service.listen == ListenMode::Tcp {
            return Err(
                "network = \"none\" (the sandbox default) leaves no way to reach the app over TCP; use listen = \"activate\" or \"unix\", or network = \"host\""
                    .to_owned(),
            );
        }
        if network == Network::None && level == Isolation::Process {
            return Err(
                "network = \"none\" needs isolation = \"namespace\" or \"sandbox\"".to_owned(),
            );
        }
        let (uid, gid) = self.user_of(id, service)?;
        let settings = &self.config.settings;
        let data = settings.instance_data_dir(id);
        let runtime = instance_runtime_dir(settings, id);
        let mut writable = vec![data, runtime];
        writable.extend(service.writable.iter().cloned());
        let spec = IsolationSpec {
            namespaces: level != Isolation::Process,
            network_none: network == Network::None,
            seccomp: level == Isolation::Sandbox,
            no_user_namespaces: level != Isolation::Process,
            hostname: hostname_of(id),
            uid,
            gid,
            nofile: service.limits.nofile,
            nofile_soft: crate::sys::inherited_nofile_soft(),
            nproc: service.limits.nproc,
            tmp_size: Some(private_tmp_size(&service.limits)),
            hide: vec![
                settings.data_dir.clone(),
                settings.state_dir.clone(),
                settings.runtime_dir.clone(),
            ],
            writable,
            mask: std::iter::once(self.config.path.clone())
                .chain(
                    self.config
                        .services
                        .values()
                        .filter_map(|s| s.env_file.clone()),
                )
                .collect(),
        };
        let (cgroup, missing) = match self.containment.cgroups() {
            Some(cgroups) => {
                let missing = cgroups.unenforced(&service.limits);
                let dir = cgroups
                    .prepare(id, &service.limits)
                    .map_err(|e| e.to_string())?;
                (Some(dir), missing)
            }
            None => (None, cgroup_limits(&service.limits)),
        };
        let mut spec = spec;
        // pids_max without a pids controller: RLIMIT_NPROC counts the same tasks per real
        // uid, so it is the same limit when the uid is the instance's own (a dynamic one).
        let own_uid = spec
            .uid
            .is_some_and(|uid| self.config.settings.dynamic_users.contains(&uid));
        let pids_fallback = missing.contains(&"pids") && own_uid && spec.nproc.is_none();
        if pids_fallback {
            spec.nproc = service.limits.pids_max;
        }
        self.warn_unenforced(id, &missing, pids_fallback);
        Ok(Plan { spec, cgroup })
    }

    /// (uid, gid) for the app, or (None, None) to keep the supervisor's.
    fn user_of(
        &mut self,
        id: &InstanceId,
        service: &Service,
    ) -> Result<(Option<u32>, Option<u32>), String> {
        let wanted = service
            .user
            .as_deref()
            .or(self.config.settings.user.as_deref())
            .unwrap_or(if self.is_root { "dynamic" } else { "self" });
        match wanted {
            "self" => Ok((None, None)),
            _ if !self.is_root => Err(format!(
                "user = \"{wanted}\" needs the supervisor to run as root; remove it to run as the supervisor's user"
            )),
            "root" => Ok((Some(0), Some(0))),
            "dynamic" => {
                let uid = self.dynamic_uid(id)?;
                Ok((Some(uid), Some(uid)))
            }
            name => {
                let user = nix::unistd::User::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("user {name:?} does not exist on this machine"))?;
                Ok((Some(user.uid.as_raw()), Some(user.gid.as_raw())))
            }
        }
    }

    /// The instance's own uid from `dynamic_users`, allocated once and kept in the registry.
    /// A uid that still owns the kept data of a removed tenant is never handed to someone
    /// else; a tenant that comes back gets its old uid (and so its data) again.
    fn dynamic_uid(&mut self, id: &InstanceId) -> Result<u32, String> {
        use std::os::unix::fs::MetadataExt;
        if let Some(uid) = self.instances.get(id).and_then(|i| i.uid) {
            return Ok(uid);
        }
        let taken: std::collections::HashSet<u32> =
            self.instances.values().filter_map(|i| i.uid).collect();
        let range = self.config.settings.dynamic_users.clone();
        let own_data = std::fs::metadata(self.config.settings.instance_data_dir(id))
            .ok()
            .map(|m| m.uid())
            .filter(|uid| range.contains(uid) && !taken.contains(uid));
        let uid = match own_data {
            Some(uid) => uid,
            None => {
                let settings = &self.config.settings;
                let mut kept = data_owners(&settings.data_dir, &range);
                kept.extend(data_owners(&settings.runtime_dir, &range));
                range
                    .clone()
                    .find(|uid| {
                        !taken.contains(uid)
                            && !kept.contains(uid)
                            && nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid))
                                .ok()
                                .flatten()
                                .is_none()
                    })
                    .ok_or_else(|| {
                        format!(
                            "no free uid left in dynamic_users {}-{}; widen it",
                            range.start(),
                            range.end()
                        )
                    })?
            }
        };
        if let Some(i) = self.instances.get_mut(id) {
            i.uid = Some(uid);
        }
        self.save().map_err(|e| e.to_string())?;
        Ok(uid)
    }
}

/// Bytes each private tmpfs of an instance may hold: `tmp_size`, else `memory_max`, else 256 MiB
/// (the kernel's own default, half of the RAM for each of three per instance, is no bound).
pub fn private_tmp_size(limits: &tenement_proto::config::Limits) -> u64 {
    limits
        .tmp_size
        .or(limits.memory_max)
        .unwrap_or(DEFAULT_TMP_SIZE)
}

/// `private_tmp_size` without `tmp_size` or `memory_max`.
pub const DEFAULT_TMP_SIZE: u64 = 256 << 20;

/// The cgroup controllers `limits` need (all unenforced without cgroups).
fn cgroup_limits(limits: &tenement_proto::config::Limits) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if limits.memory_max.is_some() || limits.memory_high.is_some() {
        needed.push("memory");
    }
    if limits.pids_max.is_some() {
        needed.push("pids");
    }
    if limits.cpu_weight.is_some() || limits.cpu_max_percent.is_some() {
        needed.push("cpu");
    }
    needed
}

/// The UTS hostname of an instance: `ID.SERVICE`, or `ID` alone when that would pass the
/// kernel's 64 bytes (two DNS labels can reach 127).
pub fn hostname_of(id: &InstanceId) -> String {
    let full = format!("{}.{}", id.id, id.service);
    if full.len() <= 64 {
        full
    } else {
        id.id.to_string()
    }
}

/// Uids in `range` owning an entry two levels down: an instance directory under `data_dir`
/// (`SERVICE/ID`) or under `runtime_dir` (`instances/SERVICE.ID`). Such a uid is not handed to
/// another tenant: it would own what the old one left.
fn data_owners(
    data_dir: &Path,
    range: &std::ops::RangeInclusive<u32>,
) -> std::collections::HashSet<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut owners = std::collections::HashSet::new();
    let Ok(services) = std::fs::read_dir(data_dir) else {
        return owners;
    };
    for service in services.filter_map(Result::ok) {
        let Ok(instances) = std::fs::read_dir(service.path()) else {
            continue;
        };
        for instance in instances.filter_map(Result::ok) {
            if let Ok(meta) = instance.metadata() {
                if range.contains(&meta.uid()) {
                    owners.insert(meta.uid());
                }
            }
        }
    }
    owners
}

/// Makes `path` (and nothing else) the app user's, mode 0700.
pub fn give_to(path: &Path, uid: Option<u32>, gid: Option<u32>) -> Result<(), String> {
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    nix::unistd::chown(
        path,
        uid.map(nix::unistd::Uid::from_raw),
        gid.map(nix::unistd::Gid::from_raw),
    )
    .map_err(|e| format!("chown {}: {e}", path.display()))
}

/// `memory_max=64MiB pids_max=64 nofile=1024`, or `none`.
pub fn describe_limits(limits: &tenement_proto::config::Limits) -> String {
    let mib = |b: u64| format!("{}MiB", b >> 20);
    let mut parts = Vec::new();
    if let Some(v) = limits.memory_max {
        parts.push(format!("memory_max={}", mib(v)));
    }
    if let Some(v) = limits.memory_high {
        parts.push(format!("memory_high={}", mib(v)));
    }
    if let Some(v) = limits.cpu_weight {
        parts.push(format!("cpu_weight={v}"));
    }
    if let Some(v) = limits.cpu_max_percent {
        parts.push(format!("cpu_max={v}%"));
    }
    if let Some(v) = limits.pids_max {
        parts.push(format!("pids_max={v}"));
    }
    if let Some(v) = limits.nofile {
        parts.push(format!("nofile={v}"));
    }
    if let Some(v) = limits.nproc {
        parts.push(format!("nproc={v}"));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(" ")
    }
}

impl Registry {
    /// Says, once per service, which of its limits cannot be enforced here (no cgroups, or
    /// controllers not delegated) and which fall back to an rlimit.
    fn warn_unenforced(&mut self, id: &InstanceId, missing: &[&str], pids_fallback: bool) {
        if missing.is_empty() || !self.warned_limits.insert(id.service.clone()) {
            return;
        }
        let why = if self.containment.cgroups().is_some() {
            "their cgroup controllers were not delegated"
        } else {
            "there are no cgroups"
        };
        let unenforced: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|m| !(pids_fallback && *m == "pids"))
            .collect();
        let fallback = if pids_fallback {
            "; pids_max is enforced as RLIMIT_NPROC (the instance's own uid)"
        } else {
            ""
        };
        if unenforced.is_empty() {
            tracing::warn!(service = %id.service, "service {}: {why}{fallback}", id.service);
        } else {
            tracing::warn!(
                service = %id.service,
                "service {}: limits for {} cannot be enforced: {why}{fallback}",
                id.service,
                unenforced.join(", ")
            );
        }
    }

    /// Adds what only the registry knows to an instance's description: level, containment,
    /// cgroup, limits and current usage.
    pub(super) fn describe_isolation(&self, info: &mut tenement_proto::rpc::InstanceInfo) {
        let Some(service) = self.config.service(&info.instance.service) else {
            info.isolation = "-".to_owned();
            return;
        };
        info.isolation = format!(
            "{}, {}",
            level_name(self.level_of(service)),
            self.containment.describe()
        );
        let mut limits = describe_limits(&service.limits);
        if let Some(cgroups) = self.containment.cgroups() {
            let missing = cgroups.unenforced(&service.limits);
            if !missing.is_empty() {
                limits.push_str(&format!(" (not enforced: {})", missing.join(", ")));
            }
            info.cgroup = Some(
                cgroups
                    .instance_dir(&info.instance)
                    .to_string_lossy()
                    .into_owned(),
            );
            if info.pid.is_some() {
                let (memory, pids) = cgroups.usage(&info.instance);
                info.memory_bytes = memory;
                info.pids = pids;
            }
        } else if service.limits != Default::default() {
            limits.push_str(" (cgroup limits not enforced: no cgroups)");
        }
        info.limits = Some(limits);
    }
}

pub fn level_name(level: Isolation) -> &'static str {
    match level {
        Isolation::Process => "process",
        Isolation::Namespace => "namespace",
        Isolation::Sandbox => "sandbox",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostname_never_passes_64_bytes() {
        let short = InstanceId::parse("notes:alice").expect("valid");
        assert_eq!(hostname_of(&short), "alice.notes");
        let long_id = "a".repeat(63);
        let long = InstanceId::parse(&format!("{}:{long_id}", "s".repeat(63))).expect("valid");
        assert_eq!(hostname_of(&long), long_id);
        let edge = InstanceId::parse(&format!("ab:{}", "c".repeat(61))).expect("valid");
        assert_eq!(hostname_of(&edge).len(), 64);
    }
}
