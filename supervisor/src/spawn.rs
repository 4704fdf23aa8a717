//! Turning a service definition into a running exec helper: the argv, the cleared
//! environment, the program path, the pipes, the handed-off socket.
//!
//! What goes into an argv or environment comes from the config (validated at load) and from
//! [`InstanceId`] (DNS labels by construction): nothing a client sent is interpolated
//! unchecked. The helper itself (see `exec_helper.rs`) forks the app.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tenement_proto::config::{ListenMode, ReadyMode, Service, Settings, TemplateVars};
use tenement_proto::InstanceId;

use crate::exec_helper::{SpawnSpec, SPEC_ENV};
use crate::sys;

/// Variables passed through from the supervisor's own environment; everything else is
/// cleared.
const PASSED_THROUGH: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where one start of an instance listens and reports.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// TCP port (tcp and activate modes).
    pub port: Option<u16>,
    /// Unix socket path (unix mode).
    pub socket_path: Option<PathBuf>,
    /// sd_notify socket (ready = "notify").
    pub notify_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command {program:?} not found in PATH ({path})")]
    NotFound { program: String, path: String },
    #[error("{path} is not an executable file")]
    NotExecutable { path: PathBuf },
    #[error("the command line is empty")]
    EmptyCommand,
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the exec helper {helper}: {source}")]
    Helper {
        helper: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode the spawn spec: {0}")]
    Spec(#[from] serde_json::Error),
}

/// Builds the helper's [`SpawnSpec`] for one start of `instance`.
pub fn build_spec(
    settings: &Settings,
    service: &Service,
    instance: &InstanceId,
    endpoints: &Endpoints,
    supervisor_env: impl Fn(&str) -> Option<String>,
) -> Result<SpawnSpec, SpawnError> {
    let data_root = settings.service_data_dir(&instance.service);
    let data_root_text = data_root.to_string_lossy().into_owned();
    let instance_text = instance.to_string();
    let port_text = endpoints.port.map(|p| p.to_string()).unwrap_or_default();
    let socket_text = endpoints
        .socket_path
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vars = TemplateVars {
        data_dir: &data_root_text,
        id: instance.id.as_str(),
        service: instance.service.as_str(),
        instance: &instance_text,
        port: &port_text,
        socket_path: &socket_text,
    };

    let mut env: Vec<(String, String)> = Vec::new();
    for name in PASSED_THROUGH {
        match supervisor_env(name) {
            Some(value) => env.push(((*name).to_owned(), value)),
            None if *name == "PATH" => env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned())),
            None => {}
        }
    }
    if let Some(port) = endpoints.port {
        env.push(("PORT".to_owned(), port.to_string()));
        env.push(("HOST".to_owned(), "127.0.0.1".to_owned()));
    }
    if let Some(path) = &endpoints.socket_path {
        env.push((
            "SOCKET_PATH".to_owned(),
            path.to_string_lossy().into_owned(),
        ));
    }
    let listen_fd = service.listen == ListenMode::Activate;
    if listen_fd {
        env.push(("LISTEN_FDS".to_owned(), "1".to_owned()));
        env.push(("LISTEN_FDNAMES".to_owned(), "http".to_owned()));
    }
    if let (ReadyMode::Notify, Some(path)) = (service.ready, &endpoints.notify_socket) {
        env.push((
            "NOTIFY_SOCKET".to_owned(),
            path.to_string_lossy().into_owned(),
        ));
    }
    env.push(("TENEMENT_SERVICE".to_owned(), instance.service.to_string()));
    env.push(("TENEMENT_ID".to_owned(), instance.id.to_string()));
    env.push(("TENEMENT_INSTANCE".to_owned(), instance_text.clone()));
    env.push((
        "TENEMENT_DATA_DIR".to_owned(),
        settings
            .instance_data_dir(instance)
            .to_string_lossy()
            .into_owned(),
    ));
    for (name, template) in &service.env {
        env.push((name.clone(), template.render(&vars)));
    }

    let argv: Vec<String> = service.argv.iter().map(|t| t.render(&vars)).collect();
    let first = argv.first().ok_or(SpawnError::EmptyCommand)?;
    let search_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    let program = resolve_program(first, &service.workdir, &search_path)?;

    Ok(SpawnSpec {
        program,
        argv,
        env,
        workdir: service.workdir.clone(),
        listen_fd,
        stop_grace_ms: service.stop_grace.as_millis() as u64,
        supervisor_pid: std::process::id(),
        // Filled in by the registry, which knows the instance's cgroup and user.
        cgroup: None,
        isolation: Default::default(),
    })
}

/// Finds `program` like execvp(3) would, but in the supervisor, before any fork.
pub fn resolve_program(program: &str, workdir: &Path, path: &str) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        let candidate = workdir.join(program);
        return if is_executable(&candidate) {
            Ok(candidate)
        } else {
            Err(SpawnError::NotExecutable { path: candidate })
        };
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| SpawnError::NotFound {
            program: program.to_owned(),
            path: path.to_owned(),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Creates the instance's data directory (0700) and its parents (0711: an instance with its own
/// uid can pass through to its directory but list nobody else's).
pub fn ensure_data_dir(path: &Path) -> Result<(), SpawnError> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path.parent().unwrap_or(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(parent)
        .and_then(|()| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
        })
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| SpawnError::DataDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Starts the exec helper for `spec` in a new process group, stdout and stderr piped, with
/// `listener` (if any) as its fd 3.
pub fn launch(
    helper: &Path,
    spec: &SpawnSpec,
    listener: Option<&OwnedFd>,
) -> Result<tokio::process::Child, SpawnError> {
    let mut command = tokio::process::Command::new(helper);
    command
        .env_clear()
        .env(SPEC_ENV, serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(fd) = listener {
        sys::pass_fd(&mut command, fd.as_raw_fd());
    }
    command.spawn().map_err(|source| SpawnError::Helper {
        helper: helper.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenement_proto::config::{Config, Environment};

    fn config() -> Config {
        let text = r#"
[settings]
data_dir = "/srv/data"
[service.notes]
command = "sh -c 'echo {id}'"
args = ["--port", "{port}"]
[service.notes.env]
DATA_DIR = "{data_dir}/{id}"
"#;
        Config::parse(
            text,
            Path::new("/etc/tenement/tenement.toml"),
            &Environment::default(),
        )
        .expect("valid config")
    }

    #[test]
    fn spec_has_a_clean_templated_environment() {
        let config = config();
        let instance = InstanceId::parse("notes:alice").expect("valid");
        let service = config.service(&instance.service).expect("service");
        let endpoints = Endpoints {
            port: Some(20001),
            socket_path: None,
            notify_socket: None,
        };
        let spec = build_spec(
            &config.settings,
            service,
            &instance,
            &endpoints,
            |name| match name {
                "PATH" => Some("/usr/bin:/bin".to_owned()),
                "LANG" => Some("C.UTF-8".to_owned()),
                _ => None,
            },
        )
        .expect("spec");
        let env: std::collections::HashMap<_, _> = spec.env.iter().cloned().collect();
        assert_eq!(env["DATA_DIR"], "/srv/data/notes/alice");
        assert_eq!(env["TENEMENT_DATA_DIR"], "/srv/data/notes/alice");
        assert_eq!(env["PORT"], "20001");
        assert_eq!(env["HOST"], "127.0.0.1");
        assert_eq!(env["TENEMENT_INSTANCE"], "notes:alice");
        assert_eq!(env["LANG"], "C.UTF-8");
        assert!(
            !env.contains_key("HOME"),
            "only the allow-list passes through"
        );
        assert_eq!(spec.argv, vec!["sh", "-c", "echo alice", "--port", "20001"]);
        assert!(spec.program.ends_with("sh"), "{:?}", spec.program);
    }

    #[test]
    fn missing_programs_are_reported_with_the_search_path() {
        let err = resolve_program("no-such-program-xyz", Path::new("/"), "/usr/bin:/bin")
            .expect_err("missing");
        assert_eq!(
            err.to_string(),
            "command \"no-such-program-xyz\" not found in PATH (/usr/bin:/bin)"
        );
        assert!(resolve_program("./nope", Path::new("/tmp"), "/bin").is_err());
    }
}
