//! What the supervisor does differently under systemd: its RPC sockets come from
//! `tenement-supervisor.socket` (LISTEN_FDS with the names `admin` and `proxy`), its logs go to
//! the journal, and it reports READY, STATUS, WATCHDOG and STOPPING (sd_notify(3)).
//!
//! Without systemd every call here is a no-op or returns `None`, so the foreground supervisor
//! behaves as before.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use anyhow::{bail, Context};
use sd_notify::NotifyState;

/// The RPC sockets handed over by systemd, by name.
pub struct InheritedSockets {
    pub admin: UnixListener,
    pub proxy: UnixListener,
}

/// Takes the sockets systemd passed, if any. Must run before any thread exists: it consumes
/// the LISTEN_* variables.
pub fn take_sockets() -> anyhow::Result<Option<InheritedSockets>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let (mut admin, mut proxy) = (None, None);
    for index in 0..fds.len() {
        let name = names.get(index).map(String::as_str).unwrap_or("");
        let listener = fds
            .take_unix_listener(index)
            .with_context(|| {
                format!("systemd socket {index} ({name}) is not a Unix stream socket")
            })?
            .with_context(|| format!("systemd socket {index} ({name}) was already taken"))?;
        listener.set_nonblocking(true)?;
        match name {
            "admin" => admin = Some(listener),
            "proxy" => proxy = Some(listener),
            other => bail!("unexpected systemd socket name {other:?}; name them admin and proxy (FileDescriptorName=)"),
        }
    }
    match (admin, proxy) {
        (Some(admin), Some(proxy)) => Ok(Some(InheritedSockets { admin, proxy })),
        _ => bail!("systemd passed sockets but not both admin and proxy (FileDescriptorName=)"),
    }
}

/// Logs to the journal when started by systemd (JOURNAL_STREAM is set), to stderr otherwise.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("tenement-supervisor".to_owned()))
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

/// Sends states to systemd's notify socket; nothing happens without one.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Half the watchdog interval systemd asked for, if it asked.
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}
