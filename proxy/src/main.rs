//! `tenement-proxy`: the unprivileged front door. Routes by Host, wakes instances through the
//! supervisor, forwards HTTP.
//!
//! `main` is synchronous: it takes the systemd sockets (or binds `--listen`), drops privileges
//! if started as root with `--user`, refuses to run with any capability otherwise, and only
//! then builds the runtime. The proxy never forks and never spawns.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hyper_util::rt::TokioIo;
use tenement_proto::config::{Config, Environment, ListenAddress, DEFAULT_CONFIG_PATH};
use tokio_util::sync::CancellationToken;

use tenement_proxy::admission::{Admission, TenantUids};
use tenement_proxy::forward::{self, Peer, Proxy, ServicePolicy};
use tenement_proxy::listeners::{self, Listener};
use tenement_proxy::metrics::{Metrics, Snapshot};
use tenement_proxy::server::{self, HEADER_READ_TIMEOUT};
use tenement_proxy::workers::{self, Workers};
use tenement_proxy::{acme, fleet, link, privilege, tls};

/// tenement's front door: routes `{id}.{service}.{domain}` to instances, waking them.
#[derive(Debug, Parser)]
#[command(name = "tenement-proxy", version)]
struct Args {
    /// The config file (the same one the supervisor reads).
    #[arg(long, short = 'c', env = "TENEMENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Address to listen on when systemd passes no sockets (repeatable): `IP:PORT` for plain
    /// HTTP, `https://IP:PORT` for HTTPS; default: the `listen` setting.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<ListenAddress>,
    /// Serve the proxy's Prometheus metrics at `/metrics` on this address (plain HTTP,
    /// repeatable), when systemd passes no socket named `metrics`; default: the
    /// `metrics_listen` setting (none).
    #[arg(long = "metrics-listen", value_name = "IP:PORT")]
    metrics_listen: Vec<std::net::SocketAddr>,
    /// Serve HTTPS with a certificate made at start and signed by itself, for every domain,
    /// service and instance name (for trying HTTPS on a workstation: `curl -k`); configured
    /// certificate files still come first.
    #[arg(long)]
    tls_self_signed: bool,
    /// Drop to this user after taking the sockets (required when started as root).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Seconds requests in flight and upgraded connections (WebSockets) get to finish after
    /// SIGTERM; the proxy exits as soon as the last one has ended.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Threads serving clients, each with its own event loop accepting from every listener;
    /// default: one per CPU the proxy may run on.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenement-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Sockets first: systemd's (before any thread exists, LISTEN_* are consumed here), or our
    // own binds, which may need root for port 80 before the drop.
    let is_root = nix::unistd::geteuid().is_root();
    let environment = Environment {
        is_root,
        xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        ephemeral_ports: None,
    };
    let config = Config::load(&args.config, &environment).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut listeners = listeners::from_systemd()?;
    let from_systemd = !listeners.is_empty();
    if listeners.is_empty() {
        let addrs = if args.listen.is_empty() {
            config.settings.listen.clone()
        } else {
            args.listen.clone()
        };
        listeners = listeners::bind(&addrs, false)?;
        let metrics: Vec<ListenAddress> = if args.metrics_listen.is_empty() {
            config.settings.metrics_listen.clone()
        } else {
            args.metrics_listen
                .iter()
                .map(|&addr| ListenAddress { addr, tls: false })
                .collect()
        };
        listeners.extend(listeners::bind(&metrics, true)?);
    }
    if let Some(fleet) = config.fleet.as_ref().filter(|f| f.tls.is_some()) {
        listeners.push(listeners::bind_fleet(fleet.address)?);
    }
    privilege::ensure_unprivileged(args.user.as_deref())?;

    init_logging();
    if let Err(e) = tenement_proto::rlimit::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }

    // Clients are served on the workers; this runtime runs what is not about one client.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let workers = Workers::start(
        args.workers
            .map_or_else(workers::default_count, usize::from),
    )
    .context("cannot start the worker threads")?;
    let served = runtime.block_on(serve(
        config,
        environment,
        listeners,
        &workers,
        Duration::from_secs(args.shutdown_grace),
        args.tls_self_signed,
        from_systemd,
    ));
    workers.stop();
    served
}

/// `--tls-self-signed`: the names its certificate covers under `config`.
fn self_signed(config: &Config, wanted: bool) -> Option<Vec<String>> {
    wanted.then(|| {
        tls::self_signed_names(
            &config.settings.domains,
            config.services.keys().map(|s| s.as_str()),
        )
    })
}

/// What the request path needs of the config; built at start and again at every reload.
fn settings_of(config: &Config) -> forward::Settings {
    let services: HashMap<_, _> = config
        .services
        .iter()
        .map(|(name, service)| {
            (
                name.clone(),
                ServicePolicy {
                    max_body: service.max_body_size,
                    max_upstream: service.max_upstream_connections,
                    auto_spawn: service.auto_spawn,
                },
            )
        })
        .collect();
    let wake_timeout = config
        .services
        .values()
        .map(|s| s.startup_timeout)
        .max()
        .unwrap_or(Duration::from_secs(30))
        .max(Duration::from_secs(5))
        + Duration::from_secs(2);
    if config
        .settings
        .trusted_proxies
        .iter()
        .any(|ip| ip.is_loopback())
    {
        tracing::info!(
            "trusted_proxies includes loopback: a connection from it is trusted only if its socket does not belong to a tenant's uid"
        );
    }
    forward::Settings {
        domains: config.settings.domains.clone(),
        services,
        wake_timeout,
        fleet_wait: config
            .fleet
            .as_ref()
            .map_or(Duration::ZERO, |f| f.lease_ttl + f.grace + wake_timeout),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(60),
        trusted_proxies: config.settings.trusted_proxies.clone(),
        tenant_uids: tenant_uids(config),
        redirect_http: config.settings.tls.redirect_http,
        https_port: config.settings.tls.https_port,
        metrics_per_instance: config.settings.metrics_per_instance,
        hsts: config.settings.tls.hsts.and_then(|max_age| {
            http::HeaderValue::try_from(format!("max-age={}", max_age.as_secs())).ok()
        }),
    }
}

async fn serve(
    config: Config,
    environment: Environment,
    listeners: Vec<Listener>,
    workers: &Workers,
    grace: Duration,
    tls_self_signed: bool,
    from_systemd: bool,
) -> anyhow::Result<()> {
    let link = link::Link::new(config.settings.proxy_socket());
    let https_port = listeners
        .iter()
        .find(|l| l.scheme == "https")
        .and_then(|l| l.socket.local_addr().ok())
        .map(|a| a.port());
    let has_http = listeners.iter().any(|l| l.scheme == "http");
    let acme = match (&config.settings.tls.acme, https_port) {
        (Some(settings), Some(_)) => {
            let dir = settings
                .state_dir(nix::unistd::geteuid().is_root())
                .context("no state directory for ACME: set [settings.tls] acme_state_dir")?;
            let mut can = vec![tenement_proto::config::Challenge::TlsAlpn01];
            if has_http {
                can.push(tenement_proto::config::Challenge::Http01);
            }
            let acme = acme::Acme::open(settings.clone(), &dir, can)
                .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(
                "ACME on: certificates from {} on demand, kept in {}",
                settings.directory,
                dir.display()
            );
            Some(acme)
        }
        (Some(_), None) => anyhow::bail!(
            "acme_email is set but the proxy has no https listener: add one (listen = \"https://0.0.0.0:443\", or a systemd socket named https)"
        ),
        (None, _) => None,
    };
    // Certificates are read when there is an HTTPS listener to serve them on.
    let certificates = match https_port {
        Some(_) => {
            if config.settings.tls.certificates.is_empty() && !tls_self_signed && acme.is_none() {
                if from_systemd {
                    // tenement-https.socket comes up with the proxy (Sockets= pulls it in):
                    // port 80 must not go down because 443 has no certificate yet.
                    tracing::error!(
                        "the https socket has no certificate to serve: every TLS handshake on it fails until [settings.tls] lists certificates (then systemctl reload tenement-proxy) or sets acme_email (then systemctl restart tenement-proxy)"
                    );
                } else {
                    // Before the proxy terminated TLS, a listener named https meant plain
                    // HTTP from a terminator in front: say so rather than fail every request.
                    anyhow::bail!(
                        "an https listener but no certificate: list files in [settings.tls] certificates, set acme_email for certificates from Let's Encrypt (or try --tls-self-signed); behind a TLS terminator, name the listener http and list the terminator in trusted_proxies"
                    );
                }
            }
            let store = tls::Store::new(
                &config.settings.tls.certificates,
                self_signed(&config, tls_self_signed),
                acme.clone(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            Some(Arc::new(store))
        }
        None => {
            if tls_self_signed || !config.settings.tls.certificates.is_empty() {
                tracing::warn!(
                    "certificates configured but no https listener: add one (listen = \"https://0.0.0.0:443\", or a systemd socket named https)"
                );
            }
            None
        }
    };
    let tls_config = match &certificates {
        Some(store) => Some(tls::server_config(store.clone()).map_err(|e| anyhow::anyhow!(e))?),
        None => None,
    };
    // The fleet credential: read now, so a bad file stops the start with one line.
    let fleet_credential = match config.fleet.as_ref().and_then(|f| f.tls.as_ref()) {
        Some(files) => Some(fleet::Credential::load(files).map_err(|e| anyhow::anyhow!(e))?),
        None => {
            if config.fleet.is_some() {
                tracing::warn!("[fleet] has no ca, cert and key: requests for tenants placed on other hosts are not forwarded there, so DNS must send each name to its tenant's host");
            }
            None
        }
    };
    let fleet = fleet_credential
        .as_ref()
        .map(|credential| Arc::new(fleet::Fleet::new(credential)));
    let table: Arc<tenement_proxy::table::Table> = Arc::default();
    // Without a metrics listener nothing would read what requests record: they record nothing.
    let scraped = listeners.iter().any(|l| l.scheme == "metrics");
    let metrics = Arc::new(Metrics::new(
        Arc::new(Scrape {
            table: table.clone(),
            certificates: certificates.clone(),
        }),
        scraped,
    ));
    let proxy = Arc::new(Proxy {
        settings: arc_swap::ArcSwap::from_pointee(settings_of(&config)),
        table,
        link: link.clone(),
        pool: Arc::default(),
        new_tenants: Default::default(),
        upgraded: tokio_util::task::TaskTracker::new(),
        https: certificates.clone().zip(https_port),
        acme: acme.clone(),
        metrics: metrics.clone(),
        recent_wakes: Arc::default(),
        api_slots: Arc::new(tokio::sync::Semaphore::new(tenement_proxy::api::SLOTS)),
        fleet: fleet.clone(),
    });
    // Reading the config again: asked by the supervisor after `tenctl reload`, or by SIGHUP.
    let reload: Arc<dyn Fn() + Send + Sync> = {
        let (proxy, path) = (proxy.clone(), config.path.clone());
        let certificates = certificates.clone();
        let acme_settings = config.settings.tls.acme.clone();
        Arc::new(move || match Config::load(&path, &environment) {
            Ok(new) => {
                proxy.settings.store(Arc::new(settings_of(&new)));
                if new.settings.tls.acme != acme_settings {
                    tracing::warn!(
                        "the acme_* settings changed: they take effect when the proxy restarts (systemctl restart tenement-proxy)"
                    );
                }
                if let Some(store) = &certificates {
                    if new.settings.tls.certificates.is_empty()
                        && !tls_self_signed
                        && acme_settings.is_none()
                    {
                        tracing::warn!(
                            "the config lists no certificate any more: every TLS handshake fails until one is listed in [settings.tls] certificates"
                        );
                    }
                    store.configure(
                        &new.settings.tls.certificates,
                        self_signed(&new, tls_self_signed),
                    );
                }
                tracing::info!("config reloaded: {} services", new.services.len());
            }
            Err(e) => tracing::error!("config reload failed, the running config stays: {e}"),
        })
    };
    if let Some(store) = &certificates {
        tokio::spawn(store.clone().watch());
    }
    if let Some(acme) = &acme {
        let proxy = proxy.clone();
        tokio::spawn(acme.clone().renew(move |name| {
            let proxy = proxy.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                proxy.is_ours(&name, deadline).await
            }
        }));
    }

    let shutdown = CancellationToken::new();
    // The route watch is also how the supervisor knows a proxy is there to report activity;
    // it stays up until the last request has ended, or an instance with a request still in
    // flight here could be stopped as idle under it.
    let unlink = CancellationToken::new();
    tokio::spawn(link.watch(
        proxy.table.clone(),
        fleet.clone(),
        reload.clone(),
        unlink.clone(),
    ));
    // SIGHUP is handled before the first connection is accepted: a reload right after start
    // (a spawned task registers its handler only once it first runs) must not kill us.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => {
            tokio::spawn(reload_on_sighup(reload, hangups));
        }
        Err(e) => tracing::warn!("cannot handle SIGHUP: {e}; reload with `tenctl reload`"),
    }

    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let builder = Arc::new(server::connection_builder());
    let admission = Admission::new(
        connection_cap(config.settings.max_connections),
        config.settings.max_connections_per_client,
    );

    let front = Front {
        proxy: proxy.clone(),
        builder: builder.clone(),
        graceful: graceful.clone(),
        shutdown: shutdown.clone(),
        admission: admission.clone(),
    };
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        tracing::info!(address = %listener.describe(), scheme = listener.scheme, "listening");
        if listener.scheme == "metrics" {
            let socket = tokio::net::TcpListener::from_std(listener.socket)
                .context("cannot register the metrics socket")?;
            accept_tasks.push(tokio::spawn(serve_metrics(
                socket,
                proxy.clone(),
                shutdown.clone(),
            )));
            continue;
        }
        if listener.scheme == "fleet" {
            let Some(credential) = &fleet_credential else {
                continue;
            };
            // Like the public listeners: every worker accepts, taking turns.
            let turn = Arc::new(tokio::sync::Mutex::new(()));
            for (handle, socket) in on_workers(workers, &listener.socket)? {
                accept_tasks.push(handle.spawn(fleet_accept_loop(
                    front.clone(),
                    socket,
                    turn.clone(),
                    credential.server.clone(),
                )));
            }
            continue;
        }
        let tls = match (listener.scheme, &tls_config) {
            ("https", Some(config)) => Some(Handshake {
                config: config.clone(),
                store: certificates.clone(),
                acme: acme.clone(),
            }),
            _ => None,
        };
        listener
            .socket
            .set_nonblocking(true)
            .context("cannot make a listening socket non-blocking")?;
        // Every worker accepts from the same socket (a descriptor each, registered with its
        // own event loop), one at a time: the turn passes in order from worker to worker, so
        // new connections are spread evenly and only the worker whose turn it is holds an
        // admission slot while it waits (max_connections counts connections, not waiters).
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        for (handle, socket) in on_workers(workers, &listener.socket)? {
            accept_tasks.push(handle.spawn(accept_loop(
                front.clone(),
                socket,
                turn.clone(),
                listener.scheme,
                tls.clone(),
            )));
        }
    }

    // The accept loops hold the rest of `graceful`'s references; the shutdown below needs
    // them all gone once they end.
    drop(front);
    sd_notify_quietly(&[sd_notify::NotifyState::Ready]);
    tokio::spawn(watchdog(shutdown.clone(), workers.liveness()));

    wait_for_signal().await;
    tracing::info!(
        "stopping: no new connections, {} s for requests in flight",
        grace.as_secs()
    );
    sd_notify_quietly(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    for task in accept_tasks {
        let _ = task.await;
    }
    // Connections accepted a moment ago may not have sent their request yet; a graceful
    // shutdown now would close them with the request unread (a reset the client sees). Give
    // them a moment to start it; what is still in the listen queue waits for the next proxy.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let graceful =
        Arc::try_unwrap(graceful).map_err(|_| anyhow::anyhow!("connections still shared"))?;
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with requests still in flight");
    }
    // Upgraded connections have left hyper's watch; they get what is left of the grace.
    proxy.upgraded.close();
    if !proxy.upgraded.is_empty() {
        tracing::info!(
            "waiting for {} upgraded connections (WebSockets)",
            proxy.upgraded.len()
        );
        if tokio::time::timeout_at(deadline, proxy.upgraded.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "grace period over with {} upgraded connections open; they are closed",
                proxy.upgraded.len()
            );
        }
    }
    unlink.cancel();
    Ok(())
}

/// What the metrics read at scrape time.
struct Scrape {
    table: Arc<tenement_proxy::table::Table>,
    certificates: Option<Arc<tls::Store>>,
}

impl Snapshot for Scrape {
    fn table(&self) -> &tenement_proxy::table::Table {
        &self.table
    }

    fn supervisor_up(&self) -> bool {
        self.table.is_synced()
    }

    fn certificates(&self) -> Vec<(String, &'static str, u64)> {
        self.certificates
            .as_ref()
            .map_or_else(Vec::new, |store| store.expiries())
    }

    fn acme_failures(&self) -> Vec<(String, u32)> {
        self.certificates
            .as_ref()
            .map_or_else(Vec::new, |store| store.acme_failures())
    }
}

/// How long a scrape waits for the supervisor's numbers before it answers without them
/// (Prometheus' default scrape timeout is 10 s).
const STATS_TIMEOUT: Duration = Duration::from_secs(3);

/// The exposition of one scrape: the supervisor's numbers are asked for first, unless it is
/// known to be away (the route table is not held), which answers at once without them.
async fn scrape(proxy: &Proxy) -> String {
    let report = if proxy.table.is_synced() {
        let per_instance = proxy.settings.load().metrics_per_instance;
        let deadline = tokio::time::Instant::now() + STATS_TIMEOUT;
        proxy.link.stats(per_instance, deadline).await
    } else {
        None
    };
    proxy.metrics.encode(report)
}

/// A metrics listener: `GET /metrics` answers the exposition, anything else 404. Plain
/// HTTP/1.1, a connection at a time per scraper; never on a public listener.
async fn serve_metrics(
    socket: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let proxy = proxy.clone();
                async move {
                    let _: &hyper::body::Incoming = request.body();
                    let response = if request.uri().path() == "/metrics"
                        && matches!(*request.method(), http::Method::GET | http::Method::HEAD)
                    {
                        http::Response::builder()
                            .header(
                                http::header::CONTENT_TYPE,
                                tenement_proxy::metrics::CONTENT_TYPE,
                            )
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                scrape(&proxy).await,
                            )))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"404 not found: only /metrics is served here\n",
                            )))
                    };
                    response
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), connection).await;
        });
    }
}

/// A descriptor of `socket` for each worker, registered with its event loop now (so a failure
/// stops the start): every worker accepts from the same listening socket.
fn on_workers<'w>(
    workers: &'w Workers,
    socket: &std::net::TcpListener,
) -> anyhow::Result<Vec<(&'w tokio::runtime::Handle, tokio::net::TcpListener)>> {
    workers
        .handles()
        .iter()
        .map(|handle| {
            let socket = socket
                .try_clone()
                .context("cannot share a listening socket with the workers")?;
            let _worker = handle.enter();
            let socket = tokio::net::TcpListener::from_std(socket)
                .context("cannot register a listening socket")?;
            Ok((handle, socket))
        })
        .collect()
}

/// What every accept loop shares.
#[derive(Clone)]
struct Front {
    proxy: Arc<Proxy>,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    shutdown: CancellationToken,
    admission: Arc<Admission>,
}

/// Accepts clients from one listener (registered with the event loop of the worker it runs
/// on), and serves each there until `shutdown`.
async fn accept_loop(
    front: Front,
    socket: tokio::net::TcpListener,
    turn: Arc<tokio::sync::Mutex<()>>,
    scheme: &'static str,
    tls: Option<Handshake>,
) {
    let Front {
        proxy,
        builder,
        graceful,
        shutdown,
        admission,
    } = front;
    loop {
        // This worker's turn (tokio's mutex queues fairly), then a slot: past
        // max_connections, connections wait in the kernel.
        let my_turn = tokio::select! {
            () = shutdown.cancelled() => return,
            my_turn = turn.lock() => my_turn,
        };
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            slot = admission.slot() => slot,
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        drop(my_turn);
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(ticket) = admission.admit(slot, addr.ip()) else {
            tracing::debug!(peer = %addr, "closed: the client holds max_connections_per_client already");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A trusted proxy on this host (a TLS terminator on loopback) is only trusted
        // if the connection is not a tenant's.
        let ip = addr.ip().to_canonical();
        let settings = proxy.settings.load();
        let tenant = ip.is_loopback()
            && settings.trusted_proxies.contains(&ip)
            && settings.tenant_uids.is_tenant(&stream);
        drop(settings);
        let peer = Peer {
            addr,
            scheme,
            tenant,
            via_fleet: false,
        };
        let proxy_for_names = proxy.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        // Taken now, so the shutdown waits for this connection even while it is still
        // being sniffed or shaking hands.
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let open = tenement_proxy::metrics::Held::new(proxy.metrics.connections.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            let _open = open;
            let service =
                hyper::service::service_fn(move |request| proxy.clone().handle(request, peer));
            let ended = match tls {
                None => {
                    // hyper-util reads the first bytes to tell HTTP/1 from HTTP/2 with
                    // no deadline of its own; a client that sends nothing must not
                    // hold a socket.
                    let started =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, server::first_bytes(&stream))
                            .await;
                    if !matches!(started, Ok(true)) {
                        return;
                    }
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(handshake) => {
                    let Some(stream) =
                        tls_handshake(&handshake, &proxy_for_names, stream, addr).await
                    else {
                        return;
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(peer = %addr, "connection ended: {e}");
            }
        });
    }
}

/// The fleet listener: the other hosts' proxies, each with a certificate from the fleet's CA
/// (the handshake refuses anyone else), hand requests over; they are served here only.
async fn fleet_accept_loop(
    front: Front,
    socket: tokio::net::TcpListener,
    turn: Arc<tokio::sync::Mutex<()>>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let my_turn = tokio::select! {
            () = front.shutdown.cancelled() => return,
            my_turn = turn.lock() => my_turn,
        };
        let accepted = tokio::select! {
            () = front.shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        drop(my_turn);
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("fleet: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = front.proxy.clone();
        let builder = front.builder.clone();
        let watcher = front.graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::warn!(target: "tenement::security", peer = %addr, "fleet: refused a connection without a certificate from the fleet's CA: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "fleet: TLS handshake timed out");
                    return;
                }
            };
            let Some(stream) =
                tokio::time::timeout(HEADER_READ_TIMEOUT, server::read_first_bytes(stream))
                    .await
                    .ok()
                    .flatten()
            else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                proxy.clone().handle_fleet(request, addr)
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(peer = %addr, "fleet connection ended: {e}");
            }
        });
    }
}

/// What an https listener needs to shake hands.
#[derive(Clone)]
struct Handshake {
    config: Arc<rustls::ServerConfig>,
    store: Option<Arc<tls::Store>>,
    acme: Option<Arc<acme::Acme>>,
}

/// One part of a TLS handshake (reading the ClientHello, then the rest) within
/// [`tls::HANDSHAKE_TIMEOUT`]; `None`, logged at debug, when it failed or took too long.
async fn handshake_step<T>(
    step: impl std::future::Future<Output = std::io::Result<T>>,
    addr: std::net::SocketAddr,
) -> Option<T> {
    match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, step).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %addr, "TLS handshake timed out");
            None
        }
    }
}

/// A TLS handshake within [`tls::HANDSHAKE_TIMEOUT`], then, within [`HEADER_READ_TIMEOUT`],
/// enough of the client's first bytes to tell HTTP/1 from HTTP/2 (a client that shakes hands
/// and says nothing, or stops inside the HTTP/2 preface, must not hold a socket either).
///
/// The ClientHello is read first: a CA validating TLS-ALPN-01 (ALPN `acme-tls/1`) gets the
/// challenge certificate; a name of tenement's with no certificate yet is held while ACME
/// orders one (up to `acme_wait`). `None`: the connection is over (logged at debug:
/// handshake failures are scanners and clients asking for names nobody serves).
async fn tls_handshake(
    handshake: &Handshake,
    proxy: &Proxy,
    stream: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
) -> Option<server::Rewind<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = handshake_step(acceptor, addr).await?;
    let hello = start.client_hello();
    let name = hello
        .server_name()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let wants_challenge = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == acme::ACME_TLS_ALPN));
    let mut config = handshake.config.clone();
    if let (Some(acme), Some(name)) = (&handshake.acme, &name) {
        if wants_challenge {
            match acme.tls_alpn01_config(name) {
                Some(challenge) => config = challenge,
                None => {
                    tracing::debug!(peer = %addr, "TLS-ALPN-01 for {name}: no challenge pending");
                    return None;
                }
            }
        } else if handshake
            .store
            .as_ref()
            .is_some_and(|store| store.find(name).is_none())
        {
            // Either way the handshake goes on: without a certificate it fails with an
            // alert (access_denied), as for any name nobody serves.
            let deadline = tokio::time::Instant::now() + acme.wait();
            if proxy.is_ours(name, deadline).await != Some(true) {
                tracing::debug!(peer = %addr, "TLS for {name}: not a name of tenement's, no certificate ordered");
            } else if let Err(e) = acme.ensure(name, deadline).await {
                tracing::debug!(peer = %addr, "TLS for {name}: {e}");
            }
        }
    }
    let stream = handshake_step(start.into_stream(config), addr).await?;
    tokio::time::timeout(HEADER_READ_TIMEOUT, server::read_first_bytes(stream))
        .await
        .ok()
        .flatten()
}

/// The uids tenants may run as: `dynamic_users`, and every named `user` of a service (root for
/// `user = "root"`). `user = "self"` tenants run as the supervisor's user, which the proxy
/// cannot name; with those, loopback should not be trusted (docs/SECURITY.md).
fn tenant_uids(config: &Config) -> TenantUids {
    let mut uids = TenantUids {
        dynamic: Some(config.settings.dynamic_users.clone()),
        ..TenantUids::default()
    };
    let users = config
        .services
        .values()
        .filter_map(|s| s.user.as_deref().or(config.settings.user.as_deref()));
    for name in users {
        match name {
            "dynamic" | "self" => {}
            "root" => {
                uids.named.insert(0);
            }
            name => {
                if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
                    uids.named.insert(user.uid.as_raw());
                }
            }
        }
    }
    uids
}

/// `max_connections`, lowered to what the open-file limit allows: each client connection may
/// come with an upstream one, and some descriptors are the proxy's own.
fn connection_cap(configured: u32) -> u32 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let allowed = (soft.saturating_sub(64) / 2).clamp(16, u64::from(u32::MAX)) as u32;
    if allowed < configured {
        tracing::warn!(
            "max_connections {configured} lowered to {allowed}: the open-file limit is {soft} (two descriptors per connection); raise LimitNOFILE to allow more"
        );
    }
    configured.min(allowed)
}

/// Logs to the journal when started by systemd (JOURNAL_STREAM is set), to stderr otherwise.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("tenement-proxy".to_owned()))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// sd_notify(3); a no-op without systemd.
fn sd_notify_quietly(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// WATCHDOG=1 at half the interval systemd asked for, while every worker's event loop runs:
/// if one stalls (or this runtime does), the pings stop.
async fn watchdog(shutdown: CancellationToken, workers: Arc<workers::Liveness>) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    // Several beats fit in a period (WatchdogSec=10s: ten), so a late timer is no false
    // alarm; a watchdog much shorter than that pings on this runtime's liveness alone.
    let check_workers = period >= workers::BEAT * 4;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {
                if !check_workers || workers.all_alive() {
                    sd_notify_quietly(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("a worker thread stopped running: no watchdog ping");
                }
            }
        }
    }
}

/// `systemctl reload tenement-proxy`: read the config again.
async fn reload_on_sighup(
    reload: Arc<dyn Fn() + Send + Sync>,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        reload();
    }
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
