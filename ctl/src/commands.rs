//! One function per tenctl verb: validate the arguments locally, load the config, talk to the
//! supervisor through [`crate::client`], and write the answer as text or JSON.
//!
//! Arguments that can be checked without the supervisor (instance ids, service names, regexes,
//! the config itself) are checked before connecting, and a bad one is a [`UsageError`] (exit 2).
//! Output goes to the writer handed in, never straight to stdout, so errors writing it (a
//! closed pipe) reach `main`. Nothing here decides exit statuses beyond returning errors.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use regex::Regex;
use serde_json::json;
use tenement_proto::config::{Config, ConfigError, Environment};
use tenement_proto::rpc::{LogLine, Request, Response, Route, WeightChange};
use tenement_proto::{InstanceId, ServiceName};

use crate::client::{unexpected, Client};
use crate::render;

/// How long tenctl waits for an ordinary answer. Above the supervisor's cap on a wake (120 s),
/// so a slow wake is reported by the supervisor (`wake_timeout`), not by a client timeout.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(130);
/// The supervisor's own cap on how long a wake may wait.
const MAX_WAKE_WAIT: Duration = Duration::from_secs(120);
/// Added to a wake's own deadline before tenctl gives up on the answer.
const WAKE_MARGIN: Duration = Duration::from_secs(10);

/// Bad arguments or config, found before anything was asked of the supervisor (exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Something named on the command line does not exist (exit 3, like `unknown_service`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFound(pub String);

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

/// What every verb that talks to the supervisor needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// The config file, which says where the admin socket is.
    pub config: PathBuf,
    /// `--remote`: talk to a tenement elsewhere through its management API instead.
    pub remote: Option<crate::remote::Remote>,
}

/// The facts about this machine and caller that config defaults depend on, found exactly as
/// `tenement-supervisor` finds them, so both compute the same `runtime_dir`.
pub fn environment() -> Environment {
    Environment::of_this_process(nix::unistd::geteuid().is_root())
}

/// Validates every id, reporting the first bad one as `invalid instance "../x": why`.
pub fn parse_instances(values: &[String]) -> Result<Vec<InstanceId>, UsageError> {
    values.iter().map(|v| parse_instance(v)).collect()
}

/// Validates a service name.
pub fn parse_service(value: &str) -> Result<ServiceName, UsageError> {
    ServiceName::new(value).map_err(|e| {
        UsageError(format!(
            "invalid service {:?}: {e}",
            render::sanitize(&shorten(value))
        ))
    })
}

/// Validates one id.
pub fn parse_instance(value: &str) -> Result<InstanceId, UsageError> {
    InstanceId::parse(value).map_err(|e| {
        UsageError(format!(
            "invalid instance {:?}: {e}",
            render::sanitize(&shorten(value))
        ))
    })
}

fn shorten(value: &str) -> String {
    const KEEP: usize = 80;
    match value.char_indices().nth(KEEP) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_owned(),
    }
}

/// A config problem for a verb that only needed the socket path: one line, with the way on.
fn config_unusable(path: &Path, e: &ConfigError) -> UsageError {
    let Some(first) = e.diagnostics.first() else {
        return UsageError(format!("{}: invalid config", path.display()));
    };
    let more = e.diagnostics.len() - 1;
    let hint = if first.line == 0 {
        "pass --config FILE or set TENEMENT_CONFIG".to_owned()
    } else if more > 0 {
        format!("{more} more; see tenctl validate {}", path.display())
    } else {
        format!("see tenctl validate {}", path.display())
    };
    UsageError(format!("{} ({hint})", render::sanitize(&first.to_string())))
}

impl Context {
    pub fn load_config(&self) -> Result<Config, UsageError> {
        Config::load(&self.config, &environment()).map_err(|e| config_unusable(&self.config, &e))
    }

    /// The config file when tenctl talks to this machine's supervisor; `None` with
    /// `--remote`, where the remote tenement's file is not ours to read.
    pub fn local_config(&self) -> Result<Option<Config>, UsageError> {
        match self.remote {
            Some(_) => Ok(None),
            None => self.load_config().map(Some),
        }
    }

    /// The admin socket `config` names, or the remote tenement's API.
    pub fn connect(
        &self,
        config: Option<&Config>,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Client> {
        match (&self.remote, config) {
            (Some(remote), _) => Client::remote(remote, timeout),
            (None, Some(config)) => Client::connect(&config.settings.admin_socket(), timeout),
            (None, None) => {
                let config = self.load_config()?;
                Client::connect(&config.settings.admin_socket(), timeout)
            }
        }
    }

    /// A connection for a call that needs nothing else from the config.
    pub fn client(&self, timeout: Option<Duration>) -> anyhow::Result<Client> {
        self.connect(None, timeout)
    }

    /// The deadline for calls that stop a process: the service's stop grace on top of the
    /// usual wait, so a long `stop_grace` is not cut short by tenctl.
    fn stop_timeout(config: Option<&Config>, instance: &InstanceId) -> Duration {
        RPC_TIMEOUT.saturating_add(Self::stop_grace(config, instance))
    }

    /// A service's stop grace; with `--remote`, where the config is not at hand, a minute
    /// (the API itself waits at most three).
    fn stop_grace(config: Option<&Config>, instance: &InstanceId) -> Duration {
        match config {
            Some(config) => config
                .service(&instance.service)
                .map_or(Duration::ZERO, |s| s.stop_grace),
            None => Duration::from_secs(60),
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `tenctl validate`: loads the file with the supervisor's own code; returns the exit status.
pub fn validate(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<u8> {
    match Config::load(path, &environment()) {
        Ok(config) => {
            if json {
                let doc = json!({
                    "ok": true,
                    "file": path,
                    "services": config.services.len(),
                    "instances": config.instances.len(),
                });
                writeln!(out, "{doc}")?;
            } else {
                writeln!(
                    out,
                    "{}: ok ({}, {} declared)",
                    path.display(),
                    plural(config.services.len(), "service"),
                    plural(config.instances.len(), "instance"),
                )?;
            }
            Ok(0)
        }
        Err(e) => {
            if json {
                let errors: Vec<_> = e
                    .diagnostics
                    .iter()
                    .map(|d| {
                        let place = |n: usize| (n > 0).then_some(n);
                        json!({
                            "file": d.path,
                            "line": place(d.line),
                            "column": place(d.column),
                            "message": d.message,
                            "text": d.to_string(),
                        })
                    })
                    .collect();
                let doc = json!({ "ok": false, "file": path, "errors": errors });
                writeln!(out, "{doc}")?;
            } else {
                let stderr = std::io::stderr();
                let mut stderr = stderr.lock();
                for d in &e.diagnostics {
                    writeln!(stderr, "{}", render::sanitize(&d.to_string()))?;
                }
            }
            Ok(2)
        }
    }
}

/// `tenctl add`.
pub fn add(ctx: &Context, ids: &[String], json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let instances = parse_instances(ids)?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    let request = Request::Add {
        instances: instances.clone(),
    };
    let (added, existing) = match client.call(&request)? {
        Response::Added { added, existing } => (added, existing),
        other => return Err(unexpected("add", &other)),
    };
    if json {
        writeln!(out, "{}", json!({ "added": added, "existing": existing }))?;
        return Ok(());
    }
    let mut shown = Vec::new();
    for id in instances.iter().chain(&added).chain(&existing) {
        if shown.contains(&id) {
            continue;
        }
        shown.push(id);
        if added.contains(id) {
            writeln!(out, "added {id}")?;
        } else if existing.contains(id) {
            writeln!(out, "{id} already registered")?;
        }
    }
    Ok(())
}

fn woken_json(route: &Route, started: bool, elapsed_us: u64) -> serde_json::Value {
    json!({
        "instance": route.instance,
        "address": route.address.to_string(),
        "started": started,
        "elapsed_ms": elapsed_us as f64 / 1000.0,
        "state": route.state,
    })
}

fn expect_woken(what: &str, response: Response) -> anyhow::Result<(Route, bool, u64)> {
    match response {
        Response::Woken {
            route,
            started,
            elapsed_us,
        } => Ok((route, started, elapsed_us)),
        other => Err(unexpected(what, &other)),
    }
}

/// `tenctl spawn`: register if needed and start.
pub fn spawn(ctx: &Context, id: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    let (route, started, elapsed_us) =
        expect_woken("spawn", client.call(&Request::Spawn { instance })?)?;
    if json {
        writeln!(out, "{}", woken_json(&route, started, elapsed_us))?;
    } else if started {
        writeln!(
            out,
            "{} running at {} (ready in {})",
            route.instance,
            route.address,
            render::elapsed(elapsed_us)
        )?;
    } else {
        writeln!(
            out,
            "{} already running at {}",
            route.instance, route.address
        )?;
    }
    Ok(())
}

/// How long tenctl waits for the answer to a call that waits `timeout` (or the
/// supervisor's default) itself.
fn wait_timeout(timeout: Option<Duration>) -> Duration {
    timeout.map_or(RPC_TIMEOUT, |t| {
        t.min(MAX_WAKE_WAIT).saturating_add(WAKE_MARGIN)
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `tenctl wake`: start if stopped and wait until ready.
pub fn wake(
    ctx: &Context,
    id: &str,
    timeout: Option<Duration>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let read_timeout = wait_timeout(timeout);
    let mut client = ctx.connect(config.as_ref(), Some(read_timeout))?;
    let request = Request::Wake {
        instance,
        timeout_ms: timeout.map(millis),
    };
    let (route, started, elapsed_us) = expect_woken("wake", client.call(&request)?)?;
    if json {
        writeln!(out, "{}", woken_json(&route, started, elapsed_us))?;
    } else {
        let how = if started {
            "started"
        } else {
            "already running"
        };
        writeln!(
            out,
            "{} ready in {} ({how}) at {}",
            route.instance,
            render::elapsed(elapsed_us),
            route.address
        )?;
    }
    Ok(())
}

/// `tenctl stop`.
pub fn stop(ctx: &Context, id: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let timeout = Context::stop_timeout(config.as_ref(), &instance);
    let mut client = ctx.connect(config.as_ref(), Some(timeout))?;
    match client.call(&Request::Stop {
        instance: instance.clone(),
    })? {
        Response::Ok => writeln!(out, "stopped {instance}")?,
        other => return Err(unexpected("stop", &other)),
    }
    Ok(())
}

/// `tenctl hosts`: the fleet, through this host's supervisor and fleet agent.
pub fn hosts(ctx: &Context, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), None)?;
    match client.call(&Request::FleetHosts)? {
        Response::FleetHosts { hosts } => {
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&hosts)?)?;
            } else {
                write!(out, "{}", tenement_proto::display::fleet_hosts(&hosts))?;
            }
        }
        other => return Err(unexpected("fleet_hosts", &other)),
    }
    Ok(())
}

/// `tenctl drain HOST` and `tenctl undrain HOST`.
pub fn drain(ctx: &Context, host: &str, drain: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    if !tenement_proto::config::Fleet::valid_host(host) {
        anyhow::bail!("{host:?} is not a host name: use 1-63 of a-z, 0-9 and '-'");
    }
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), None)?;
    let request = Request::FleetDrain {
        host: host.to_owned(),
        drain,
    };
    match client.call(&request)? {
        Response::Ok if drain => writeln!(
            out,
            "{host} drained: its tenants move to other hosts, and nothing new goes there until `tenctl undrain {host}` (follow it with `tenctl hosts`)"
        )?,
        Response::Ok => writeln!(out, "{host} takes new tenants again")?,
        other => return Err(unexpected("fleet_drain", &other)),
    }
    Ok(())
}

/// `tenctl reload`.
pub fn reload(ctx: &Context, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), None)?;
    match client.call(&Request::Reload)? {
        Response::Reloaded {
            added,
            changed,
            removed,
        } => {
            let names = |list: &[tenement_proto::ServiceName]| {
                list.iter().map(ToString::to_string).collect::<Vec<_>>()
            };
            if json {
                let value = serde_json::json!({
                    "added": names(&added),
                    "changed": names(&changed),
                    "removed": names(&removed),
                });
                writeln!(out, "{value}")?;
            } else if added.is_empty() && changed.is_empty() && removed.is_empty() {
                writeln!(out, "reloaded: no service changed")?;
            } else {
                for (what, list) in [
                    ("added", &added),
                    ("changed", &changed),
                    ("removed", &removed),
                ] {
                    if !list.is_empty() {
                        writeln!(out, "{what}: {}", names(list).join(", "))?;
                    }
                }
            }
        }
        other => return Err(unexpected("reload", &other)),
    }
    Ok(())
}

/// `tenctl restart`.
pub fn restart(ctx: &Context, id: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let timeout = Context::stop_timeout(config.as_ref(), &instance);
    let mut client = ctx.connect(config.as_ref(), Some(timeout))?;
    let (route, started, elapsed_us) =
        expect_woken("restart", client.call(&Request::Restart { instance })?)?;
    if json {
        writeln!(out, "{}", woken_json(&route, started, elapsed_us))?;
    } else {
        writeln!(
            out,
            "restarted {}, running at {} (ready in {})",
            route.instance,
            route.address,
            render::elapsed(elapsed_us)
        )?;
    }
    Ok(())
}

/// The weight changes of `weight` and `route`, as text or JSON.
fn print_weights(changes: &[WeightChange], json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", json!({ "changes": changes }))?;
        return Ok(());
    }
    for change in changes {
        if change.from == change.to {
            writeln!(out, "{} weight {} (unchanged)", change.instance, change.to)?;
        } else {
            writeln!(
                out,
                "{} weight {} -> {}",
                change.instance, change.from, change.to
            )?;
        }
    }
    Ok(())
}

/// `tenctl weight`.
pub fn weight(
    ctx: &Context,
    id: &str,
    weight: u32,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    match client.call(&Request::Weight { instance, weight })? {
        Response::Weights { changes } => print_weights(&changes, json, out),
        other => Err(unexpected("weight", &other)),
    }
}

/// An instance of `service` named by its id (`v1`) or in full (`notes:v1`).
fn instance_of(service: &ServiceName, text: &str) -> Result<InstanceId, UsageError> {
    let full = if text.contains(':') {
        text.to_owned()
    } else {
        format!("{service}:{text}")
    };
    let instance = parse_instance(&full)?;
    if instance.service != *service {
        return Err(UsageError(format!(
            "{instance} is not an instance of {service}"
        )));
    }
    Ok(instance)
}

/// `tenctl route SERVICE --from ID --to ID`.
pub fn route(
    ctx: &Context,
    service: &str,
    from: &str,
    to: &str,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = parse_service(service)?;
    let from = instance_of(&service, from)?;
    let to = instance_of(&service, to)?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    match client.call(&Request::Route { from, to })? {
        Response::Weights { changes } => print_weights(&changes, json, out),
        other => Err(unexpected("route", &other)),
    }
}

/// `tenctl deploy SERVICE:ID`.
pub fn deploy(
    ctx: &Context,
    id: &str,
    weight: u32,
    timeout: Option<Duration>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    // A failed deploy also stops the instance: its stop grace on top of the wait.
    let read_timeout =
        wait_timeout(timeout).saturating_add(Context::stop_grace(config.as_ref(), &instance));
    let mut client = ctx.connect(config.as_ref(), Some(read_timeout))?;
    let request = Request::Deploy {
        instance,
        weight: Some(weight),
        timeout_ms: timeout.map(millis),
    };
    match client.call(&request)? {
        Response::Deployed {
            route,
            started,
            elapsed_us,
        } => {
            if json {
                let mut doc = woken_json(&route, started, elapsed_us);
                doc["weight"] = json!(route.weight);
                writeln!(out, "{doc}")?;
            } else {
                writeln!(
                    out,
                    "deployed {} at {} with weight {} (ready and healthy in {})",
                    route.instance,
                    route.address,
                    route.weight,
                    render::elapsed(elapsed_us)
                )?;
            }
            Ok(())
        }
        other => Err(unexpected("deploy", &other)),
    }
}

/// `tenctl rm`.
pub fn remove(ctx: &Context, id: &str, purge: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let timeout = Context::stop_timeout(config.as_ref(), &instance);
    let mut client = ctx.connect(config.as_ref(), Some(timeout))?;
    let request = Request::Remove {
        instance: instance.clone(),
        purge,
    };
    let data_dir = config.as_ref().map_or_else(String::new, |c| {
        format!(" {}", c.settings.instance_data_dir(&instance).display())
    });
    match client.call(&request)? {
        Response::Ok if purge => {
            writeln!(out, "removed {instance} and deleted its data dir{data_dir}")?
        }
        Response::Ok => writeln!(
            out,
            "removed {instance} (its data dir{data_dir} is kept; rm --purge deletes it)"
        )?,
        other => return Err(unexpected("rm", &other)),
    }
    if let Some(config) = config.as_ref().filter(|c| c.instances.contains(&instance)) {
        writeln!(
            out,
            "note: {instance} is declared in [instances] of {}; the supervisor registers it again when it restarts unless you remove it there",
            config.path.display()
        )?;
    }
    Ok(())
}

/// `tenctl ps`.
pub fn ps(
    ctx: &Context,
    service: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let service = service
        .map(|s| {
            ServiceName::new(s).map_err(|e| {
                UsageError(format!(
                    "invalid service {:?}: {e}",
                    render::sanitize(&shorten(s))
                ))
            })
        })
        .transpose()?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    let mut instances = Vec::new();
    let mut reply = client.call(&Request::List {
        query: Default::default(),
    })?;
    loop {
        match reply {
            Response::Instances {
                instances: chunk,
                more,
                ..
            } => {
                instances.extend(chunk);
                if !more {
                    break;
                }
            }
            other => return Err(unexpected("list", &other)),
        }
        reply = client.next_streamed()?.ok_or_else(|| {
            anyhow::anyhow!("the supervisor closed the connection in the middle of the list")
        })?;
    }
    if let Some(service) = &service {
        instances.retain(|i| &i.instance.service == service);
    }
    instances.sort_by(|a, b| a.instance.cmp(&b.instance));
    // A typo in the filter is an error, not an empty list. Only when nothing matched: the
    // supervisor may still run instances of a service since removed from the file.
    let unknown = service
        .as_ref()
        .zip(config.as_ref())
        .filter(|(s, config)| config.service(s).is_none());
    if let Some((s, config)) = unknown {
        if instances.is_empty() {
            return Err(NotFound(format!(
                "no service {s} in {}; add [service.{s}]",
                config.path.display()
            ))
            .into());
        }
    }
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&instances)?)?;
    } else if instances.is_empty() {
        match &service {
            Some(s) => writeln!(
                out,
                "no {s} instances registered; add one with tenctl add {s}:ID"
            )?,
            None => writeln!(
                out,
                "no instances registered; add one with tenctl add SERVICE:ID"
            )?,
        }
    } else {
        out.write_all(render::instance_table(&instances).as_bytes())?;
    }
    Ok(())
}

/// `tenctl status`.
pub fn status(ctx: &Context, id: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(id)?;
    let config = ctx.local_config()?;
    let mut client = ctx.connect(config.as_ref(), Some(RPC_TIMEOUT))?;
    let status = match client.call(&Request::Status { instance })? {
        Response::Status { status } => *status,
        other => return Err(unexpected("status", &other)),
    };
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    } else {
        out.write_all(render::status_block(&status).as_bytes())?;
    }
    Ok(())
}

/// What `tenctl logs` was asked for.
#[derive(Debug, Clone)]
pub struct LogsOptions {
    pub instance: String,
    pub follow: bool,
    pub grep: Option<String>,
    pub lines: Option<usize>,
    /// Only lines newer than this long ago.
    pub since: Option<Duration>,
    pub json: bool,
}

/// A regex error on one line: the crate's syntax errors span several (pattern, caret, error).
fn compile_grep(pattern: &str) -> Result<Regex, UsageError> {
    Regex::new(pattern).map_err(|e| {
        let text = e.to_string();
        let why = text
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .map_or_else(|| text.lines().collect::<Vec<_>>().join(" "), str::to_owned);
        UsageError(format!(
            "invalid --grep pattern {:?}: {why}",
            render::sanitize(&shorten(pattern))
        ))
    })
}

pub fn write_log_line(out: &mut dyn Write, line: &LogLine, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, line)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", render::log_line(line))?;
    }
    Ok(())
}

/// The lines of one batch that match `grep`.
fn matching<'a>(
    lines: &'a [LogLine],
    grep: Option<&'a Regex>,
) -> impl Iterator<Item = &'a LogLine> {
    lines
        .iter()
        .filter(move |l| grep.map_or(true, |re| re.is_match(&l.line)))
}

/// The last `last` lines of the backlog that match `grep` (all of them without `last`).
pub fn last_matching<'a>(
    lines: &'a [LogLine],
    grep: Option<&'a Regex>,
    last: Option<usize>,
) -> Vec<&'a LogLine> {
    let mut selected: Vec<&LogLine> = matching(lines, grep).collect();
    let skip = last.map_or(0, |n| selected.len().saturating_sub(n));
    selected.drain(..skip);
    selected
}

/// `tenctl logs`: the buffered lines, then with `--follow` new ones until the supervisor ends
/// the stream (or the user interrupts).
pub fn logs(ctx: &Context, options: &LogsOptions, out: &mut dyn Write) -> anyhow::Result<()> {
    let instance = parse_instance(&options.instance)?;
    let grep = options.grep.as_deref().map(compile_grep).transpose()?;
    let config = ctx.local_config()?;
    // Under systemd the journal has every line (and what survived restarts of the
    // supervisor); the supervisor's buffer is the fallback, and what a remote API serves.
    if config.is_some() && crate::journal::has_entries(&instance) {
        return crate::journal::logs(&instance, grep.as_ref(), options, out);
    }
    let since_ms = options.since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|n| n.as_millis() as u64)
            .unwrap_or(0);
        now.saturating_sub(d.as_millis() as u64)
    });
    let timeout = (!options.follow).then_some(RPC_TIMEOUT);
    let mut client = ctx.connect(config.as_ref(), timeout)?;
    // With --grep, -n counts matching lines, so all buffered lines are needed to find them.
    let request = Request::Logs {
        instance,
        lines: if grep.is_some() { None } else { options.lines },
        follow: options.follow,
    };
    let mut backlog = match client.call(&request)? {
        Response::Logs { lines } => lines,
        other => return Err(unexpected("logs", &other)),
    };
    if let Some(since) = since_ms {
        backlog.retain(|l| l.ts_ms >= since);
    }
    for line in last_matching(&backlog, grep.as_ref(), options.lines) {
        write_log_line(out, line, options.json)?;
    }
    out.flush()?;
    if !options.follow {
        return Ok(());
    }
    while let Some(response) = client.next_streamed().context("log stream ended")? {
        match response {
            Response::Logs { lines } => {
                for line in matching(&lines, grep.as_ref()) {
                    write_log_line(out, line, options.json)?;
                }
                out.flush()?;
            }
            other => return Err(unexpected("logs --follow", &other)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenement_proto::config::Diagnostic;

    #[test]
    fn bad_instance_ids_are_one_line_usage_errors() {
        let cases = [
            (
                "../x",
                r#"invalid instance "../x": instance "../x" must be written SERVICE:ID, like notes:alice"#,
            ),
            (
                "notes:../x",
                r#"invalid instance "notes:../x": instance id "../x" may only contain a-z, 0-9 and '-'"#,
            ),
            (
                "Notes:alice",
                r#"invalid instance "Notes:alice": service name "Notes" may only contain a-z, 0-9 and '-'"#,
            ),
            (
                "notes:-a",
                r#"invalid instance "notes:-a": instance id "-a" may not start or end with '-'"#,
            ),
            (
                "notes:",
                r#"invalid instance "notes:": instance id is empty"#,
            ),
        ];
        for (input, message) in cases {
            assert_eq!(
                parse_instance(input),
                Err(UsageError(message.to_owned())),
                "{input}"
            );
        }
        let huge = format!("notes:{}\n\x1b", "a".repeat(10_000));
        let err = parse_instance(&huge).expect_err("too long").0;
        assert!(err.len() < 400, "{err}");
        assert!(!err.contains('\n') && !err.contains('\x1b'), "{err}");
    }

    #[test]
    fn the_first_bad_id_of_many_is_reported() {
        let ids = vec!["notes:alice".to_owned(), "x".to_owned(), "../y".to_owned()];
        let err = parse_instances(&ids).expect_err("x is bad");
        assert!(err.0.starts_with("invalid instance \"x\""), "{err}");
        let ok = parse_instances(&["notes:alice".to_owned()]).expect("valid");
        assert_eq!(ok[0].to_string(), "notes:alice");
    }

    #[test]
    fn invalid_regexes_are_one_line() {
        let err = compile_grep("a(").expect_err("unclosed group").0;
        assert_eq!(err, r#"invalid --grep pattern "a(": unclosed group"#);
        assert!(compile_grep("GET /health").is_ok());
    }

    #[test]
    fn config_errors_for_other_verbs_are_one_line_with_a_hint() {
        let path = Path::new("/etc/tenement/tenement.toml");
        let diag = |line, message: &str| Diagnostic {
            path: path.to_path_buf(),
            line,
            column: 1,
            message: message.to_owned(),
        };
        let missing = ConfigError {
            diagnostics: vec![diag(0, "cannot read config: No such file or directory")],
        };
        assert_eq!(
            config_unusable(path, &missing).0,
            "/etc/tenement/tenement.toml: cannot read config: No such file or directory (pass --config FILE or set TENEMENT_CONFIG)"
        );
        let several = ConfigError {
            diagnostics: vec![diag(3, "unknown key `comand`"), diag(9, "bad")],
        };
        assert_eq!(
            config_unusable(path, &several).0,
            "/etc/tenement/tenement.toml:3:1: unknown key `comand` (1 more; see tenctl validate /etc/tenement/tenement.toml)"
        );
    }

    #[test]
    fn grep_then_last_n_keeps_the_last_matching_lines() {
        let line = |text: &str| LogLine {
            ts_ms: 0,
            stream: tenement_proto::rpc::LogStream::Stdout,
            line: text.to_owned(),
        };
        let lines = vec![
            line("GET /a"),
            line("POST /b"),
            line("GET /c"),
            line("GET /d"),
        ];
        let re = compile_grep("^GET").expect("valid");
        let got: Vec<&str> = matching(&lines, Some(&re))
            .map(|l| l.line.as_str())
            .collect();
        assert_eq!(got, ["GET /a", "GET /c", "GET /d"]);
        assert_eq!(matching(&lines, None).count(), 4);
        let texts = |v: Vec<&LogLine>| v.into_iter().map(|l| l.line.clone()).collect::<Vec<_>>();
        assert_eq!(
            texts(last_matching(&lines, Some(&re), Some(2))),
            ["GET /c", "GET /d"]
        );
        assert_eq!(texts(last_matching(&lines, Some(&re), Some(10))).len(), 3);
        assert_eq!(texts(last_matching(&lines, None, Some(1))), ["GET /d"]);
        assert!(last_matching(&lines, None, Some(0)).is_empty());
    }
}
