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

use std::time::Duration;

use sd_notify::NotifyState;
use tenement_supervisor::{cgroup, exec_helper, registry, rpc_server, systemd};
use tokio::net::UnixListener;

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
    let environment = Environment::of_this_process(is_root);
    let config = match Config::load(&args.config, &environment) {
        Ok(config) => config,
        Err(e) => {
            for d in &e.diagnostics {
                eprintln!("tenement-supervisor: {d}");
            }
            return ExitCode::from(2);
        }
    };
    // Before any thread exists: this consumes LISTEN_*.
    let inherited = match systemd::take_sockets() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("tenement-supervisor: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    systemd::init_logging();
    if let Err(e) = tenement_supervisor::sys::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
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
    match runtime.block_on(run(Arc::new(config), environment, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenement-supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: Arc<Config>,
    environment: Environment,
    inherited: Option<systemd::InheritedSockets>,
) -> anyhow::Result<()> {
    let is_root = environment.is_root;
    let helper = exec_helper::locate().map_err(anyhow::Error::msg)?;
    let settings = &config.settings;
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
    let containment = cgroup::detect(std::process::id());
    match &containment {
        // One warning says it all without root.
        cgroup::Containment::ProcessGroups(_) if !is_root => tracing::warn!(
            "running without root: instances run as this user in their own process groups (no namespaces, per-tenant users or cgroup limits)"
        ),
        cgroup::Containment::ProcessGroups(reason) => tracing::warn!(
            "no cgroups: instances are contained by process groups only, without memory, cpu or pids limits ({reason})"
        ),
        cgroup::Containment::Cgroups(c) if c.controllers.is_empty() => tracing::warn!(
            "cgroups without controllers: instances are contained and killed as a whole, but memory, cpu and pids limits cannot be enforced"
        ),
        cgroup::Containment::Cgroups(c) => tracing::info!(controllers = ?c.controllers, "instances get a cgroup each"),
    }
    let firewall = if is_root {
        start_firewall(settings).await
    } else {
        None
    };
    let (registry, handle) = registry::Registry::open(
        config.clone(),
        helper,
        containment,
        is_root,
        environment,
        firewall.clone(),
    )?;
    let bound_here = inherited.is_none();
    let (admin, proxy) = match inherited {
        Some(sockets) => (
            UnixListener::from_std(sockets.admin).context("cannot use systemd's admin socket")?,
            UnixListener::from_std(sockets.proxy).context("cannot use systemd's proxy socket")?,
        ),
        None => bind_sockets(settings, admin_gid, is_root)?,
    };

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
            firewall.clone(),
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
    // SIGHUP is handled before READY=1, so a reload right after start cannot kill us.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    tokio::spawn(reload_on_sighup(handle.clone(), hangups));
    systemd::notify(&[NotifyState::Ready]);
    tokio::spawn(report_to_systemd(handle.clone(), shutdown.clone()));

    wait_for_signal().await;
    tracing::info!("stopping: every instance gets its stop_grace");
    systemd::notify(&[NotifyState::Stopping]);
    shutdown.cancel();
    tracker.close();
    let _ = registry_task.await;
    tracker.wait().await;
    if let Some(firewall) = &firewall {
        firewall.remove().await;
    }
    if bound_here {
        let _ = std::fs::remove_file(settings.admin_socket());
        let _ = std::fs::remove_file(settings.proxy_socket());
    }
    Ok(())
}

/// The nftables table that keeps tenants off each other's ports (`firewall.rs`): root, this
/// supervisor and `proxy_user` always pass; a proxy that connects is added then. Without nft
/// the supervisor runs on and says what that costs.
async fn start_firewall(
    settings: &tenement_proto::config::Settings,
) -> Option<tenement_supervisor::firewall::Firewall> {
    use tenement_supervisor::firewall::{table_name, Firewall, Rules};
    let mut trusted: std::collections::BTreeSet<u32> =
        [0, nix::unistd::geteuid().as_raw()].into_iter().collect();
    if let Some(name) = &settings.proxy_user {
        if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
            trusted.insert(user.uid.as_raw());
        }
    }
    let rules = Rules {
        table: table_name(&settings.runtime_dir),
        range: (*settings.port_range.start(), *settings.port_range.end()),
        trusted,
        owners: Default::default(),
    };
    let table = rules.table.clone();
    match Firewall::start(rules).await {
        Ok(firewall) => {
            tracing::info!(table = %table, "tenants are kept off each other's ports (nftables table inet {table})");
            Some(firewall)
        }
        Err(e) => {
            tracing::warn!("{e}: tenants can connect straight to each other's ports");
            None
        }
    }
}

/// Creates the RPC sockets ourselves (no systemd): admin for root, this user and admin_group;
/// proxy for this user, or proxy_user's group when root.
fn bind_sockets(
    settings: &tenement_proto::config::Settings,
    admin_gid: Option<u32>,
    is_root: bool,
) -> anyhow::Result<(UnixListener, UnixListener)> {
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
    let proxy_mode = if proxy_gid.is_some() { 0o660 } else { 0o600 };
    let proxy = rpc_server::bind_socket(&settings.proxy_socket(), proxy_mode)?;
    if let Some(gid) = proxy_gid {
        nix::unistd::chown(&settings.proxy_socket(), None, Some(gid))
            .context("cannot give the proxy socket to proxy_user")?;
    }
    Ok((admin, proxy))
}

/// STATUS= with live counts, and WATCHDOG=1 only when the registry actor answers: a stuck
/// event loop stops the pings and systemd restarts us.
async fn report_to_systemd(registry: registry::RegistryHandle, shutdown: CancellationToken) {
    let watchdog = systemd::watchdog_period();
    let period = watchdog
        .unwrap_or(Duration::from_secs(2))
        .min(Duration::from_secs(2));
    let mut last = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let answer = tokio::time::timeout(
            period,
            registry.ask(|reply| registry::Command::Counts { reply }),
        )
        .await;
        let Ok(Ok(counts)) = answer else {
            tracing::warn!(
                "the registry did not answer within {} ms",
                period.as_millis()
            );
            continue;
        };
        let status = counts.to_string();
        let mut states = Vec::new();
        if last.as_ref() != Some(&status) {
            states.push(NotifyState::Status(&status));
        }
        if watchdog.is_some() {
            states.push(NotifyState::Watchdog);
        }
        if !states.is_empty() {
            systemd::notify(&states);
        }
        last = Some(status.clone());
    }
}

/// SIGHUP re-reads the config (like `tenctl reload`), telling systemd RELOADING=1 meanwhile.
async fn reload_on_sighup(
    registry: registry::RegistryHandle,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        systemd::notify(&[NotifyState::Reloading]);
        match registry
            .ask(|reply| registry::Command::Reload { reply })
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => tracing::error!("{e}; the running config stays"),
        }
        systemd::notify(&[NotifyState::Ready]);
    }
}

/// Holds an exclusive flock(2) on `state_dir/supervisor.lock` for the supervisor's lifetime.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    tenement_supervisor::state::create_private_dir(dir)
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
