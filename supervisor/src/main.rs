//! `tenement-supervisor`: runs one process tree per instance behind a Unix-socket RPC.
//!
//! `main` is synchronous: it parses arguments, loads the config, sets up logging, and only then
//! builds the tokio runtime, so nothing that mutates the process (environment, signal masks)
//! runs once threads exist.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tenement_proto::config::{Config, Environment, DEFAULT_CONFIG_PATH};
use tenement_proto::rpc::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tenement_supervisor::{exec_helper, ports, registry, rpc_server};

/// Runs tenement's instances: one process tree per tenant, woken on demand, stopped when idle.
#[derive(Debug, Parser)]
#[command(name = "tenement-supervisor", version)]
struct Args {
    /// The config file.
    #[arg(long, short = 'c', env = "TENEMENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let is_root = nix::unistd::geteuid().is_root();
    let environment = Environment {
        is_root,
        xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        ephemeral_ports: ports::ephemeral_range(),
    };
    let config = match Config::load(&args.config, &environment) {
        Ok(config) => config,
        Err(e) => {
            for d in &e.diagnostics {
                eprintln!("tenement-supervisor: {d}");
            }
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tenement-supervisor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Arc::new(config), is_root)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenement-supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Arc<Config>, is_root: bool) -> anyhow::Result<()> {
    let helper = exec_helper::locate().map_err(anyhow::Error::msg)?;
    let settings = &config.settings;
    if !is_root {
        tracing::warn!(
            "running without root: instances run as this user in their own process groups (no cgroups, namespaces or per-tenant users)"
        );
    }
    let admin_gid = match &settings.admin_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .with_context(|| format!("admin_group {name:?} does not exist"))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let admin_policy = Arc::new(rpc_server::AdminPolicy {
        own_uid: nix::unistd::geteuid().as_raw(),
        admin_gid,
    });

    // One supervisor per state directory: a second one must not touch the first one's
    // processes (opening the registry kills leftovers of a *dead* predecessor).
    let _lock = lock_state_dir(&settings.state_dir)?;
    let (registry, handle) = registry::Registry::open(config.clone(), helper)?;
    let admin_mode = if admin_gid.is_some() { 0o660 } else { 0o600 };
    let admin = rpc_server::bind_socket(&settings.admin_socket(), admin_mode)?;
    if let Some(gid) = admin_gid {
        nix::unistd::chown(
            &settings.admin_socket(),
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .context("cannot give the admin socket to admin_group")?;
    }
    // Without systemd, root hands proxy.sock to the proxy's group (with systemd the socket
    // unit does, see systemd/).
    let proxy_gid = match (&settings.proxy_user, is_root) {
        (Some(name), true) => Some(
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .with_context(|| format!("proxy_user {name:?} does not exist"))?
                .gid,
        ),
        _ => None,
    };
    let proxy = rpc_server::bind_socket(
        &settings.proxy_socket(),
        if proxy_gid.is_some() { 0o660 } else { 0o600 },
    )?;
    if let Some(gid) = proxy_gid {
        nix::unistd::chown(&settings.proxy_socket(), None, Some(gid))
            .context("cannot give the proxy socket to proxy_user")?;
    }

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let registered = registry.registered();
    let registry_task = tokio::spawn(registry.run(shutdown.child_token()));
    for (listener, role) in [(admin, Role::Admin), (proxy, Role::Proxy)] {
        tokio::spawn(rpc_server::serve(
            listener,
            role,
            handle.clone(),
            admin_policy.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    tracing::info!(
        instances = registered,
        admin = %settings.admin_socket().display(),
        proxy = %settings.proxy_socket().display(),
        "ready"
    );

    wait_for_signal().await;
    tracing::info!("stopping: every instance gets its stop_grace");
    shutdown.cancel();
    tracker.close();
    let _ = registry_task.await;
    tracker.wait().await;
    let _ = std::fs::remove_file(settings.admin_socket());
    let _ = std::fs::remove_file(settings.proxy_socket());
    Ok(())
}

/// Holds an exclusive flock(2) on `state_dir/supervisor.lock` for the supervisor's lifetime.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state_dir {}", dir.display()))?;
    let path = dir.join("supervisor.lock");
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                anyhow::anyhow!(
                    "another supervisor is already using {}; stop it or use another state_dir",
                    dir.display()
                )
            } else {
                anyhow::anyhow!("cannot lock {}: {errno}", path.display())
            }
        },
    )
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
