//! Turning a service definition into a running exec helper: the argv, the cleared
//! environment, the program path, the pipes, the handed-off socket, and [`ExecServer`], which
//! has the exec server clone each helper.
//!
//! What goes into an argv or environment comes from the config (validated at load) and from
//! [`InstanceId`] (DNS labels by construction): nothing a client sent is interpolated
//! unchecked. The helper itself (see `exec_helper.rs`) forks the app.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tenement_proto::config::{ListenMode, ReadyMode, Service, Settings, TemplateVars};
use tenement_proto::InstanceId;

use crate::exec_helper::{SpawnReply, SpawnSpec};
use crate::sys;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

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

/// One helper the exec server started: a child of this process.
pub struct Launched {
    pub pid: i32,
    /// Readable when the helper has exited; [`sys::wait_pidfd`] reaps it through this.
    pub pidfd: OwnedFd,
    pub stdout: tokio::net::unix::pipe::Receiver,
    pub stderr: tokio::net::unix::pipe::Receiver,
}

/// The supervisor's side of the exec server (`tenement-exec --serve`, see exec_helper.rs):
/// started at the first spawn and again if it ever ended, then asked for every helper.
pub struct ExecServer {
    helper: PathBuf,
    /// The supervisor's state directory, named in the server's environment.
    state_dir: PathBuf,
    running: std::sync::Mutex<Option<Server>>,
}

struct Server {
    socket: OwnedFd,
    /// Reaped by tokio when the server exits (kill_on_drop: it ends with the supervisor).
    _process: tokio::process::Child,
}

/// How long a spawn request may wait to be sent and answered. The server answers right after a
/// clone (well under a millisecond); this blocks the registry, so it stays far below the 2 s in
/// which the registry must answer the systemd watchdog's check. A helper whose answer comes too
/// late gets no go-ahead and exits without starting its app.
const SERVER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

impl ExecServer {
    pub fn new(helper: PathBuf, state_dir: PathBuf) -> Self {
        ExecServer {
            helper,
            state_dir,
            running: std::sync::Mutex::new(None),
        }
    }

    fn start(&self) -> Result<Server, SpawnError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let helper_error = |source: std::io::Error| SpawnError::Helper {
            helper: self.helper.clone(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| helper_error(e.into()))?;
        // A request is one message: let it be as large as the server reads (forced as root;
        // else up to net.core.wmem_max, and a larger request fails with a clear error).
        let size = crate::exec_helper::MAX_REQUEST * 2;
        if nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SndBufForce, &size)
            .is_err()
        {
            let _ = nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SndBuf, &size);
        }
        let timeout = nix::sys::time::TimeVal::new(
            SERVER_DEADLINE.as_secs() as i64,
            SERVER_DEADLINE.subsec_micros() as i64,
        );
        let _ = nix::sys::socket::setsockopt(
            &ours,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeout,
        );
        let _ =
            nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::SendTimeout, &timeout);
        // The server's parent-death signal, and through CLONE_PARENT every helper's, follows
        // the thread that starts it here: a runtime worker of the registry, which lives as long
        // as the supervisor. Never start it from spawn_blocking or block_in_place, whose
        // threads come and go.
        let mut command = tokio::process::Command::new(&self.helper);
        command
            .arg(crate::exec_helper::SERVE_ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .env(crate::exec_helper::SERVER_OF_ENV, &self.state_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        sys::pass_fd(command.as_std_mut(), theirs.as_raw_fd());
        let process = command.spawn().map_err(helper_error)?;
        Ok(Server {
            socket: ours,
            _process: process,
        })
    }

    /// Starts a helper for `spec` in a new process group, stdout and stderr piped, with
    /// `listener` (if any) as its fd 3.
    pub fn launch(
        &self,
        spec: &SpawnSpec,
        listener: Option<&OwnedFd>,
    ) -> Result<Launched, SpawnError> {
        let request = serde_json::to_vec(spec)?;
        let io = |source: std::io::Error| SpawnError::Helper {
            helper: self.helper.clone(),
            source,
        };
        let stdin = std::fs::File::open("/dev/null").map_err(io)?;
        let pipe = || -> std::io::Result<_> {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            Ok((
                tokio::net::unix::pipe::Receiver::from_owned_fd(read)?,
                write,
            ))
        };
        let (stdout, stdout_w) = pipe().map_err(io)?;
        let (stderr, stderr_w) = pipe().map_err(io)?;
        // The helper forks its app only after a byte on this pipe, written once we hold a
        // pidfd of it (see exec_helper.rs): no app runs that we do not wait for.
        let (go, go_ahead) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io(e.into()))?;
        let mut fds = vec![
            stdin.as_raw_fd(),
            stdout_w.as_raw_fd(),
            stderr_w.as_raw_fd(),
        ];
        fds.extend(listener.map(|l| l.as_raw_fd()));
        fds.push(go.as_raw_fd());

        let mut running = crate::lock(&self.running);
        // A server that ended (killed by hand, or the first spawn) is started anew. A request
        // is sent again only if it never reached the server; one the server may have read is
        // never repeated (that could start a second helper), it fails this start instead.
        let mut fresh = false;
        let reply = loop {
            let server = match running.as_ref() {
                Some(server) => server,
                None => {
                    fresh = true;
                    running.insert(self.start()?)
                }
            };
            match send(&server.socket, &request, &fds) {
                Ok(()) => {}
                Err(e) if !fresh && is_gone(&e) => {
                    *running = None;
                    continue;
                }
                Err(e) => {
                    *running = None;
                    return Err(io(e));
                }
            }
            match receive(&server.socket) {
                Ok(reply) => break reply,
                Err(e) => {
                    *running = None;
                    return Err(io(e));
                }
            }
        };
        drop(running);
        let pid = match reply {
            SpawnReply::Started { pid } => pid,
            SpawnReply::Failed { error } => return Err(io(std::io::Error::other(error))),
        };
        // The helper is our child and we have not reaped it: the pid is still its own.
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Without a way to wait for it, it must not run: no go-ahead, and reap it now.
                drop(go_ahead);
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
                return Err(io(e));
            }
        };
        if let Err(e) = nix::unistd::write(&go_ahead, &[1]) {
            // The helper is gone already: its exit is what the pidfd will report.
            tracing::debug!(pid, "go-ahead to the helper: {e}");
        }
        Ok(Launched {
            pid,
            pidfd,
            stdout,
            stderr,
        })
    }
}

/// Whether a failed send means the server is gone (it never read the request).
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
    )
}

/// Sends one spawn request with its descriptors.
fn send(socket: &OwnedFd, request: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let rights = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(request)],
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    match sent {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EMSGSIZE) => Err(std::io::Error::other(format!(
            "the spawn request ({} bytes) is too large for the exec server",
            request.len()
        ))),
        Err(nix::errno::Errno::EAGAIN) => Err(std::io::Error::other(format!(
            "the exec server did not take the request within {} ms",
            SERVER_DEADLINE.as_millis()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The server's answer to the request just sent.
fn receive(socket: &OwnedFd) -> std::io::Result<SpawnReply> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut answer = [0u8; 4096];
    let n = loop {
        match recv(socket.as_raw_fd(), &mut answer, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(std::io::Error::other(format!(
                    "the exec server did not answer within {} ms",
                    SERVER_DEADLINE.as_millis()
                )))
            }
            other => break other?,
        }
    };
    if n == 0 {
        return Err(std::io::Error::other(
            "the exec server ended before it answered",
        ));
    }
    serde_json::from_slice(&answer[..n])
        .map_err(|e| std::io::Error::other(format!("bad answer from the exec server: {e}")))
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
