//! `tenctl`: the operator's command line for tenement.
//!
//! This file owns the argument grammar (clap), dispatch to [`commands`], and the exit status:
//! 0 success, 1 supervisor unreachable or request refused, 2 bad usage or config, 3 unknown
//! service or instance, 4 the instance could not be woken. Every error is printed as one line
//! on stderr; tenctl never panics on input and never prints a backtrace. Talking to the
//! supervisor is [`client`]'s job, formatting is [`render`]'s.
#![forbid(unsafe_code)]

mod certs;
mod client;
mod commands;
mod journal;
mod releases;
mod remote;
mod render;
mod tokens;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand};
use tenement_proto::config::{parse_duration, DEFAULT_CONFIG_PATH};
use tenement_proto::rpc::ErrorCode;

use crate::client::RemoteError;
use crate::commands::{Context, LogsOptions, NotFound, UsageError};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success
  1  the supervisor could not be reached, or refused or failed the request
  2  bad usage: invalid arguments, instance id, service name, regex or config file
  3  unknown service or instance (unknown_service, unknown_instance)
  4  the instance could not be woken (wake_failed, wake_timeout, instance_failed, not_placed_here)
  5  the API refused the token (unauthenticated, forbidden, rate_limited)";

/// Control tenement: add, wake, stop and inspect instances.
#[derive(Debug, Parser)]
#[command(name = "tenctl", version, after_help = EXIT_STATUS_HELP)]
struct Args {
    /// The config file; it says where the supervisor's admin socket is.
    #[arg(
        long,
        short = 'c',
        env = "TENEMENT_CONFIG",
        default_value = DEFAULT_CONFIG_PATH,
        global = true,
        value_name = "FILE"
    )]
    config: PathBuf,
    /// Drive a tenement elsewhere through its management API: its bare domain, like
    /// https://example.com. The token comes from --token-file or TENEMENT_TOKEN.
    #[arg(long, env = "TENEMENT_URL", global = true, value_name = "URL")]
    remote: Option<String>,
    /// A file whose first line is the API token (for --remote).
    #[arg(long, env = "TENEMENT_TOKEN_FILE", global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificates to trust for --remote instead of the public roots (a private CA).
    #[arg(long, env = "TENEMENT_CA_FILE", global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ClapArgs)]
struct Json {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// How a rollout proceeds (`deploy SERVICE`, `rollback`).
#[derive(Debug, Clone, ClapArgs)]
struct RolloutArgs {
    /// Tenants that go first, then the rollout pauses for `rollout resume`: a list
    /// (alice,bob) or a share of tenants by a stable hash of their id (5%).
    #[arg(long, value_name = "IDS|N%")]
    canary: Option<String>,
    /// Shares of tenants rising to 100%, each step baked before the next: 5%,25%,100%.
    #[arg(long, value_name = "N%,...")]
    steps: Option<String>,
    /// Running tenants switched at once (default 1).
    #[arg(long, value_name = "N")]
    max_unavailable: Option<u32>,
    /// How long a switched tenant must stay ready, healthy and free of 5xx before the next
    /// (default: the service's rollout_bake).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    bake: Option<Duration>,
}

impl RolloutArgs {
    fn flags(&self) -> releases::RolloutFlags {
        releases::RolloutFlags {
            canary: self.canary.clone(),
            steps: self.steps.clone(),
            max_unavailable: self.max_unavailable,
            bake: self.bake,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RolloutVerb {
    Status,
    Pause,
    Resume,
    Abort,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a config file without running anything (the supervisor is not needed).
    Validate {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
        #[command(flatten)]
        output: Json,
    },
    /// Register instances without starting them.
    Add {
        /// SERVICE:ID, for example notes:alice.
        #[arg(required = true, value_name = "INSTANCE")]
        instances: Vec<String>,
        #[command(flatten)]
        output: Json,
    },
    /// Register an instance if needed and start it.
    Spawn {
        /// SERVICE:ID.
        instance: String,
        #[command(flatten)]
        output: Json,
    },
    /// Start an instance if it is stopped and wait until it is ready.
    Wake {
        /// SERVICE:ID.
        instance: String,
        /// How long to wait for ready, like 30s or 500ms (the supervisor caps it at 2m).
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        timeout: Option<Duration>,
        #[command(flatten)]
        output: Json,
    },
    /// Re-read the config: new services appear, running instances of changed services
    /// restart, those of removed services stop; a bad file is refused and nothing changes.
    Reload {
        #[command(flatten)]
        output: Json,
    },
    /// On a fleet host: every host of the fleet as etcd has it (live or gone, drained, the
    /// controller, tenants placed and running, memory, last heartbeat).
    Hosts {
        #[command(flatten)]
        output: Json,
    },
    /// On a fleet host: move every tenant off HOST (each drained there, none failing) and
    /// place nothing new on it until `undrain`.
    Drain {
        /// The host's name in the fleet.
        host: String,
    },
    /// On a fleet host: let the fleet place tenants on HOST again.
    Undrain {
        /// The host's name in the fleet.
        host: String,
    },
    /// Stop an instance (it stays registered).
    Stop {
        /// SERVICE:ID.
        instance: String,
    },
    /// Stop and start an instance; also clears the failed state.
    Restart {
        /// SERVICE:ID.
        instance: String,
        #[command(flatten)]
        output: Json,
    },
    /// Set an instance's share of SERVICE.DOMAIN traffic: 0 (none) to 100. Kept across
    /// restarts; the proxy routes by it at its next route push.
    Weight {
        /// SERVICE:ID.
        instance: String,
        /// 0 to 100.
        #[arg(value_parser = parse_weight)]
        weight: u32,
        #[command(flatten)]
        output: Json,
    },
    /// Move all of one instance's weight to another of the same service, in one step.
    Route {
        /// The service, for example notes.
        service: String,
        /// The instance losing its weight: its id (v1) or SERVICE:ID.
        #[arg(long, value_name = "ID")]
        from: String,
        /// The instance getting it.
        #[arg(long, value_name = "ID")]
        to: String,
        #[command(flatten)]
        output: Json,
    },
    /// SERVICE: make a release of the service as configured now (paths resolved) and roll it
    /// out: sleeping tenants at their next wake, running ones one at a time. SERVICE:ID:
    /// register and start that instance, wait until it is ready and healthy, and only then
    /// give it its weight; on failure or timeout stop it and change no weight.
    Deploy {
        /// SERVICE (a release) or SERVICE:ID (an instance), for example notes or notes:v2.
        target: String,
        /// SERVICE:ID only: the weight it gets once healthy (0 to 100, default 100).
        #[arg(long, value_parser = parse_weight)]
        weight: Option<u32>,
        /// SERVICE:ID only: how long it may take to be ready and healthy, like 30s (the
        /// supervisor caps it at 2m).
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        timeout: Option<Duration>,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[command(flatten)]
        output: Json,
    },
    /// A service's releases (number, when, what changed, tenants on each) and its rollout.
    Releases {
        service: String,
        #[command(flatten)]
        output: Json,
    },
    /// Show, pause, resume or abort a service's rollout (abort moves the tenants it moved
    /// back to the release they ran).
    Rollout {
        #[arg(value_enum)]
        action: RolloutVerb,
        service: String,
        #[command(flatten)]
        output: Json,
    },
    /// Roll a service back to an earlier release (default: the one before the current).
    Rollback {
        service: String,
        /// The release to go back to.
        #[arg(long, value_name = "N")]
        to: Option<u32>,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[command(flatten)]
        output: Json,
    },
    /// Keep an instance on a release through rollouts (it switches to it now if running).
    Pin {
        /// SERVICE:ID.
        instance: String,
        /// The release number.
        release: u32,
        #[command(flatten)]
        output: Json,
    },
    /// Let a pinned instance follow its service's current release again.
    Unpin {
        /// SERVICE:ID.
        instance: String,
        #[command(flatten)]
        output: Json,
    },
    /// Stop and unregister an instance.
    Rm {
        /// SERVICE:ID.
        instance: String,
        /// Also delete the instance's data directory.
        #[arg(long)]
        purge: bool,
    },
    /// List registered instances.
    Ps {
        /// Only this service's instances.
        service: Option<String>,
        #[command(flatten)]
        output: Json,
    },
    /// Show everything about one instance.
    Status {
        /// SERVICE:ID.
        instance: String,
        #[command(flatten)]
        output: Json,
    },
    /// Show an instance's output.
    Logs {
        /// SERVICE:ID.
        instance: String,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only lines matching this regular expression (also while following).
        #[arg(long, value_name = "RE")]
        grep: Option<String>,
        /// Only the last N (matching) lines.
        #[arg(short = 'n', long = "lines", value_name = "N")]
        lines: Option<usize>,
        /// Only lines from this long ago on, like 10m or 2h.
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        since: Option<Duration>,
        #[command(flatten)]
        output: Json,
    },
    /// Show the proxy's certificates: files (names, expiry) and ACME (expiry, next renewal,
    /// failures and the order budget).
    Certs {
        #[command(flatten)]
        output: Json,
    },
    /// Tokens of the management API: create (the secret is shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a shell completion script (the packages install them).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a token and print it once, alone on stdout.
    Create {
        /// What it may reach: admin, service:NAME or tenant:SERVICE:ID.
        #[arg(long, value_name = "SCOPE")]
        scope: String,
        /// It may read (list, status, logs) but never change anything.
        #[arg(long)]
        read_only: bool,
        /// It stops working after this long: 30d, 12h, 90m (default: never).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
        /// A name to know it by in `token ls` and the audit log.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        output: Json,
    },
    /// Every token: id, name, scope, access, created, last used, expiry; never a secret.
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        output: Json,
    },
    /// Revoke a token (and end its dashboard sessions) at once.
    #[command(alias = "remove")]
    Rm {
        /// The token's id, as `token ls` shows it.
        id: String,
    },
}

fn parse_weight(text: &str) -> Result<u32, String> {
    let max = tenement_proto::rpc::MAX_WEIGHT;
    match text.parse::<u32>() {
        Ok(weight) if weight <= max => Ok(weight),
        _ => Err(format!("a weight is a whole number from 0 to {max}")),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout.is_zero() {
        return Err("the timeout must be longer than 0".to_owned());
    }
    Ok(timeout)
}

/// The exit status for a typed supervisor error.
fn remote_exit_status(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::UnknownService | ErrorCode::UnknownInstance => 3,
        ErrorCode::WakeFailed
        | ErrorCode::WakeTimeout
        | ErrorCode::InstanceFailed
        | ErrorCode::NotPlacedHere => 4,
        ErrorCode::Unauthenticated | ErrorCode::Forbidden | ErrorCode::RateLimited => 5,
        ErrorCode::BadRequest
        | ErrorCode::FrameTooLarge
        | ErrorCode::UnsupportedVersion
        | ErrorCode::HelloRequired
        | ErrorCode::WrongRole
        | ErrorCode::PermissionDenied
        | ErrorCode::Unavailable
        | ErrorCode::Internal => 1,
    }
}

/// The exit status for any error `run` returns.
fn exit_status(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(remote) = cause.downcast_ref::<RemoteError>() {
            return remote_exit_status(remote.code);
        }
        if cause.is::<UsageError>() {
            return 2;
        }
        if cause.is::<NotFound>() {
            return 3;
        }
    }
    1
}

/// Marks a write error on stdout as the reader having gone away (`tenctl logs -f | head`),
/// which ends tenctl quietly, unlike a broken connection to the supervisor.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

struct Stdout<W: Write>(W);

impl<W: Write> Stdout<W> {
    fn mark(e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::BrokenPipe {
            io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
        } else {
            e
        }
    }
}

impl<W: Write> Write for Stdout<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(Self::mark)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(Self::mark)
    }
}

fn stdout_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<StdoutClosed>()
            || cause
                .downcast_ref::<io::Error>()
                .and_then(|e| e.get_ref())
                .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let remote = match &args.remote {
        Some(url) => Some(remote::Remote::new(
            url,
            args.token_file.as_deref(),
            std::env::var("TENEMENT_TOKEN").ok(),
            args.ca_file.clone(),
        )?),
        None => None,
    };
    let ctx = Context {
        config: args.config.clone(),
        remote,
    };
    match args.command {
        Command::Token(TokenCommand::Create {
            scope,
            read_only,
            expires,
            name,
            output,
        }) => {
            let options = tokens::CreateOptions {
                scope: &scope,
                read_only,
                expires,
                name: name.as_deref(),
            };
            tokens::create(&ctx, &options, output.json, out, &mut io::stderr())?;
        }
        Command::Token(TokenCommand::Ls { output }) => tokens::list(&ctx, output.json, out)?,
        Command::Token(TokenCommand::Rm { id }) => tokens::remove(&ctx, &id, out)?,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "tenctl", &mut script);
            out.write_all(&script)?;
        }
        Command::Validate { file, output } => {
            let path = file.unwrap_or(args.config);
            return commands::validate(&path, output.json, out);
        }
        Command::Add { instances, output } => commands::add(&ctx, &instances, output.json, out)?,
        Command::Spawn { instance, output } => commands::spawn(&ctx, &instance, output.json, out)?,
        Command::Wake {
            instance,
            timeout,
            output,
        } => commands::wake(&ctx, &instance, timeout, output.json, out)?,
        Command::Stop { instance } => commands::stop(&ctx, &instance, out)?,
        Command::Hosts { output } => commands::hosts(&ctx, output.json, out)?,
        Command::Drain { host } => commands::drain(&ctx, &host, true, out)?,
        Command::Undrain { host } => commands::drain(&ctx, &host, false, out)?,
        Command::Reload { output } => commands::reload(&ctx, output.json, out)?,
        Command::Restart { instance, output } => {
            commands::restart(&ctx, &instance, output.json, out)?;
        }
        Command::Rm { instance, purge } => commands::remove(&ctx, &instance, purge, out)?,
        Command::Weight {
            instance,
            weight,
            output,
        } => commands::weight(&ctx, &instance, weight, output.json, out)?,
        Command::Route {
            service,
            from,
            to,
            output,
        } => commands::route(&ctx, &service, &from, &to, output.json, out)?,
        Command::Deploy {
            target,
            weight,
            timeout,
            rollout,
            output,
        } => {
            let flags = rollout.flags();
            if target.contains(':') {
                if !flags.is_empty() {
                    return Err(UsageError(
                        "--canary, --steps, --max-unavailable and --bake are for `tenctl deploy SERVICE`; SERVICE:ID takes --weight and --timeout".to_owned(),
                    )
                    .into());
                }
                let weight = weight.unwrap_or(tenement_proto::rpc::DEFAULT_WEIGHT);
                commands::deploy(&ctx, &target, weight, timeout, output.json, out)?;
            } else {
                if weight.is_some() || timeout.is_some() {
                    return Err(UsageError(
                        "--weight and --timeout are for `tenctl deploy SERVICE:ID`; a release is rolled out with --canary, --steps, --max-unavailable and --bake".to_owned(),
                    )
                    .into());
                }
                releases::deploy_service(&ctx, &target, &flags, output.json, out)?;
            }
        }
        Command::Releases { service, output } => {
            releases::releases(&ctx, &service, output.json, out)?;
        }
        Command::Rollout {
            action,
            service,
            output,
        } => {
            let action = match action {
                RolloutVerb::Status => tenement_proto::rpc::RolloutAction::Status,
                RolloutVerb::Pause => tenement_proto::rpc::RolloutAction::Pause,
                RolloutVerb::Resume => tenement_proto::rpc::RolloutAction::Resume,
                RolloutVerb::Abort => tenement_proto::rpc::RolloutAction::Abort,
            };
            releases::rollout(&ctx, action, &service, output.json, out)?;
        }
        Command::Rollback {
            service,
            to,
            rollout,
            output,
        } => releases::rollback(&ctx, &service, to, &rollout.flags(), output.json, out)?,
        Command::Pin {
            instance,
            release,
            output,
        } => releases::pin(&ctx, &instance, Some(release), output.json, out)?,
        Command::Unpin { instance, output } => {
            releases::pin(&ctx, &instance, None, output.json, out)?;
        }
        Command::Certs { output } => certs::certs(&ctx, output.json, out)?,
        Command::Ps { service, output } => {
            commands::ps(&ctx, service.as_deref(), output.json, out)?;
        }
        Command::Status { instance, output } => {
            commands::status(&ctx, &instance, output.json, out)?;
        }
        Command::Logs {
            instance,
            follow,
            grep,
            lines,
            since,
            output,
        } => {
            let options = LogsOptions {
                instance,
                follow,
                grep,
                lines,
                since,
                json: output.json,
            };
            commands::logs(&ctx, &options, out)?;
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut out = Stdout(io::stdout().lock());
    let result = run(args, &mut out).and_then(|status| {
        out.flush()?;
        Ok(status)
    });
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) if stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let line = render::sanitize(&format!("{e:#}"));
            // Nothing sensible is left to do if stderr is gone too.
            let _ = writeln!(io::stderr(), "tenctl: {line}");
            ExitCode::from(exit_status(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_documented_exit_statuses() {
        assert_eq!(remote_exit_status(ErrorCode::UnknownInstance), 3);
        assert_eq!(remote_exit_status(ErrorCode::UnknownService), 3);
        assert_eq!(remote_exit_status(ErrorCode::WakeFailed), 4);
        assert_eq!(remote_exit_status(ErrorCode::WakeTimeout), 4);
        assert_eq!(remote_exit_status(ErrorCode::InstanceFailed), 4);
        assert_eq!(remote_exit_status(ErrorCode::PermissionDenied), 1);
        assert_eq!(remote_exit_status(ErrorCode::Internal), 1);
        assert_eq!(remote_exit_status(ErrorCode::Unavailable), 1);
    }

    #[test]
    fn exit_status_looks_through_context() {
        use anyhow::Context as _;
        let remote: anyhow::Error = RemoteError {
            code: ErrorCode::WakeTimeout,
            message: "slow".into(),
        }
        .into();
        assert_eq!(exit_status(&remote), 4);
        let wrapped = Err::<(), _>(remote)
            .context("log stream ended")
            .expect_err("err");
        assert_eq!(exit_status(&wrapped), 4);
        assert_eq!(exit_status(&UsageError("bad".into()).into()), 2);
        assert_eq!(exit_status(&NotFound("no service x".into()).into()), 3);
        assert_eq!(exit_status(&anyhow::anyhow!("cannot reach")), 1);
    }

    #[test]
    fn a_closed_stdout_is_told_apart_from_a_closed_socket() {
        let mut out = Stdout(BrokenPipeWriter);
        let err: anyhow::Error = out.write_all(b"x").expect_err("broken").into();
        assert!(stdout_closed(&err));
        let socket: anyhow::Error = io::Error::from(io::ErrorKind::BrokenPipe).into();
        assert!(!stdout_closed(&socket));
    }

    struct BrokenPipeWriter;

    impl Write for BrokenPipeWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_grammar_is_consistent_and_documents_exit_statuses() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(
            help.contains("4  the instance could not be woken"),
            "{help}"
        );
    }

    #[test]
    fn completions_name_every_verb() {
        for shell in ["bash", "zsh", "fish"] {
            let args = Args::try_parse_from(["tenctl", "completions", shell]).expect("parses");
            let mut out = Vec::new();
            assert_eq!(run(args, &mut out).expect("runs"), 0);
            let script = String::from_utf8(out).expect("utf-8");
            for verb in ["validate", "wake", "logs", "completions"] {
                assert!(script.contains(verb), "{shell} completion lacks {verb}");
            }
        }
    }

    #[test]
    fn timeouts_take_config_durations() {
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
