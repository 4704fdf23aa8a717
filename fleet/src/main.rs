//! `tenement-fleet`: the fleet agent of one tenement host (docs/FLEET.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenement_fleet::agent::{self, Shared};
use tenement_fleet::hosts;
use tenement_fleet::status::Status;
use tenement_fleet::supervisor::{self, Word};
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
            });
            let (running_tx, running_rx) = tokio::sync::watch::channel(0);
            let shared = Shared::new(&fleet.host, status_path, word_tx, running_rx);
            let socket = config.settings.admin_socket();
            let every = fleet.lease_ttl / 3;
            runtime.block_on(async {
                tokio::select! {
                    () = agent::run(fleet, shared) => {}
                    () = supervisor::tell(socket, word_rx, running_tx, every) => {}
                    _ = tokio::signal::ctrl_c() => {}
                    () = terminated() => {}
                }
            });
            Ok(ExitCode::SUCCESS)
        }
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
