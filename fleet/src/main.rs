//! `tenement-fleet`: the fleet agent of one tenement host (docs/FLEET.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenement_fleet::agent::{self, Shared};
use tenement_fleet::status::Status;
use tenement_fleet::supervisor::{self, Report, Word};
use tenement_fleet::{control, drain, hosts};
use tenement_proto::config::{Config, Environment};

#[derive(Parser)]
#[command(
    version,
    about = "The fleet agent of a tenement host: membership under an etcd lease, the elected placement controller, self-fencing"
)]
struct Cli {
    /// The host's tenement.toml; its [fleet] section says where etcd is.
    #[arg(
        long,
        global = true,
        env = "TENEMENT_CONFIG",
        default_value = "/etc/tenement/tenement.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the fleet and stay in it (the daemon).
    Run,
    /// What the running agent last wrote: membership, controller, tenants placed here.
    Status {
        /// The status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every host of the fleet as etcd has it now: live or gone, the controller, tenants
    /// placed, running, memory, last heartbeat.
    Hosts {
        /// The hosts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move every tenant off HOST, each drained there (requests inside finish, new ones are
    /// held) and started on its new host once stopped, and place nothing new on it until
    /// `undrain`.
    Drain {
        host: String,
        /// Wait until every tenant has left HOST (up to 10 minutes).
        #[arg(long)]
        wait: bool,
    },
    /// Let the controller place tenants on HOST again.
    Undrain { host: String },
    /// Make the fleet credential for one host: the fleet's CA in DIR (made the first time,
    /// ca.pem and ca.key), then HOST.pem and HOST.key, a certificate from it naming the host
    /// and its IP. Needs no config: run it where the CA's key is kept.
    Credentials {
        /// Where the CA is kept and the host's files are written.
        dir: PathBuf,
        /// The host's name, as in its [fleet] host.
        #[arg(long)]
        host: String,
        /// The host's IP address, as in its [fleet] address.
        #[arg(long)]
        ip: std::net::IpAddr,
        /// How many days the host's certificate lasts.
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Replace the host's certificate and key if DIR has them.
        #[arg(long)]
        replace: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match start(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tenement-fleet: {}", agent::describe(&e));
            ExitCode::from(2)
        }
    }
}

fn start(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Credentials {
        dir,
        host,
        ip,
        days,
        replace,
    } = &cli.command
    {
        let made = tenement_fleet::credentials::make(dir, host, *ip, *days, *replace)?;
        if made.new_ca {
            println!(
                "made the fleet's CA: {} (its key, next to it, stays here: it signs every host)",
                made.ca.display()
            );
        }
        println!(
            "{host}: {} and {}, for {ip}, valid {days} days",
            made.cert.display(),
            made.key.display()
        );
        println!(
            "copy {}, {} and {} to {host}, and name them in its [fleet] ca, cert and key; the key must be readable by tenement-proxy (chgrp tenement-proxy, chmod 640)",
            made.ca.display(),
            made.cert.display(),
            made.key.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(
        &cli.config,
        &Environment::of_this_process(nix::unistd::geteuid().is_root()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(fleet) = config.fleet.clone() else {
        anyhow::bail!(
            "{} has no [fleet] section; add one with host, address and etcd (docs/FLEET.md)",
            config.path.display()
        );
    };
    let status_path = config.settings.state_dir.join("fleet.json");
    match cli.command {
        Command::Status { json } => {
            let status = Status::read(&status_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Hosts { json } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let views = runtime.block_on(async {
                let mut client =
                    agent::connect(&fleet, Some(std::time::Duration::from_secs(5))).await?;
                hosts::read(&mut client).await
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print!("{}", hosts::render(&views));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            init_logging();
            std::fs::create_dir_all(&config.settings.state_dir).map_err(|e| {
                anyhow::anyhow!("cannot create {}: {e}", config.settings.state_dir.display())
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (word_tx, word_rx) = tokio::sync::watch::channel(Word {
                owned: Default::default(),
                until: None,
                peers: Vec::new(),
                held: Default::default(),
            });
            let (report_tx, report_rx) = tokio::sync::watch::channel(Report::default());
            let shared = Shared::new(&fleet.host, status_path, word_tx, report_rx);
            let socket = config.settings.admin_socket();
            let control = config.settings.fleet_socket();
            let every = fleet.lease_ttl / 3;
            runtime.block_on(async {
                tokio::select! {
                    () = control::serve(&control, fleet.clone()) => {}
                    () = agent::run(fleet, shared) => {}
                    () = supervisor::tell(socket, word_rx, report_tx, every) => {}
                    _ = tokio::signal::ctrl_c() => {}
                    () = terminated() => {}
                }
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Drain { host, wait } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(drain::drain(&fleet, &host, wait))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Undrain { host } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(drain::undrain(&fleet, &host))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Credentials { .. } => unreachable!("handled before the config is read"),
    }
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn print_status(status: &Status) {
    let membership = serde_json::to_value(status.membership)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    println!("host        {}", status.host);
    println!("membership  {membership}");
    println!("lease       {}", status.lease.as_deref().unwrap_or("-"));
    println!(
        "controller  {}",
        if status.controller { "yes" } else { "no" }
    );
    println!("fences      {}", status.fences);
    println!("placed here {}", status.placed_here.len());
    for (tenant, epoch) in &status.placed_here {
        println!("  {tenant} (epoch {epoch})");
    }
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}
