//! The agent's word to this host's supervisor: `fleet_own`, the tenants placed here and how
//! long that holds, sent on the admin socket after every renewal of the lease and every change
//! of the placements. The supervisor starts nothing else and stops everything once the word
//! runs out (supervisor/src/registry/fleet.rs), so fencing holds even if this agent dies.
//! With it, when they changed (and first on each connection), the tenants placed on the other
//! hosts, which the supervisor passes to its proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tenement_proto::frame::{read_message_async, write_message_async};
use tenement_proto::ids::InstanceId;
use tenement_proto::rpc::{FleetOwned, FleetPeer, Request, Response, PROTOCOL_VERSION};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::{info, warn};

/// What the agent wants the supervisor to know: placed here, and until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub owned: BTreeMap<String, u64>,
    /// `None`: nothing holds (not a member, or fenced).
    pub until: Option<Instant>,
    /// The tenants placed on the other hosts, by host.
    pub peers: Vec<FleetPeer>,
    /// Of `owned`, those moving here that their previous host has not released yet.
    pub held: BTreeSet<String>,
}

/// What the supervisor answered the last word it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub running: u32,
    /// What that word said was placed here (`None` before the first answer).
    pub owned: Option<BTreeSet<String>>,
    /// Instances not placed here that still have a process (draining, stopping).
    pub stopping: BTreeSet<String>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon the word goes again while a tenant that moved away is still stopping here: its
/// new host waits for the release that follows.
const WHILE_STOPPING: Duration = Duration::from_millis(100);

/// Sends every new word, and the current one again every `every` (so a restarted supervisor
/// hears it soon), or every [`WHILE_STOPPING`] while a tenant that moved away still stops;
/// publishes what the supervisor answers through `reports`.
pub async fn tell(
    socket: PathBuf,
    mut words: watch::Receiver<Word>,
    reports: watch::Sender<Report>,
    every: Duration,
) {
    let mut link: Option<UnixStream> = None;
    // The peers the supervisor has from this connection (a new one has none).
    let mut told_peers: Option<Vec<FleetPeer>> = None;
    let mut complained = false;
    loop {
        let word = words.borrow_and_update().clone();
        if link.is_none() {
            told_peers = None;
        }
        let peers = (told_peers.as_ref() != Some(&word.peers)).then(|| word.peers.clone());
        let mut wait = every;
        match say(&socket, &mut link, &word, peers.clone()).await {
            Ok((running, stopping)) => {
                if peers.is_some() {
                    told_peers = peers;
                }
                if !stopping.is_empty() {
                    wait = WHILE_STOPPING;
                }
                let report = Report {
                    running,
                    owned: Some(if word.until.is_some() {
                        word.owned.keys().cloned().collect()
                    } else {
                        BTreeSet::new()
                    }),
                    stopping: stopping.iter().map(ToString::to_string).collect(),
                };
                reports.send_if_modified(|current| {
                    let changed = *current != report;
                    *current = report;
                    changed
                });
                if complained {
                    info!("the supervisor hears the fleet agent again");
                    complained = false;
                }
            }
            Err(e) => {
                link = None;
                if !complained {
                    warn!(socket = %socket.display(), error = %format!("{e:#}"), "cannot tell the supervisor what is placed here; it fences this host by itself when the last word runs out");
                    complained = true;
                }
            }
        }
        let _ = timeout(wait, words.changed()).await;
    }
}

async fn say(
    socket: &PathBuf,
    link: &mut Option<UnixStream>,
    word: &Word,
    peers: Option<Vec<FleetPeer>>,
) -> anyhow::Result<(u32, Vec<InstanceId>)> {
    if link.is_none() {
        *link = Some(
            timeout(CALL_TIMEOUT, hello(socket))
                .await
                .context("no answer")??,
        );
    }
    let stream = link.as_mut().expect("connected above");
    let valid_ms = word.until.map_or(0, |until| {
        u64::try_from(until.saturating_duration_since(Instant::now()).as_millis())
            .unwrap_or(u64::MAX)
    });
    let owned = if valid_ms == 0 {
        Vec::new()
    } else {
        word.owned
            .iter()
            .filter_map(|(id, epoch)| {
                Some(FleetOwned {
                    instance: InstanceId::parse(id).ok()?,
                    epoch: *epoch,
                    held: word.held.contains(id),
                })
            })
            .collect()
    };
    let request = Request::FleetOwn {
        owned,
        valid_ms,
        peers,
    };
    let answer = timeout(CALL_TIMEOUT, async {
        write_message_async(stream, &request).await?;
        read_message_async::<_, Response>(stream).await
    })
    .await
    .context("no answer")??;
    match answer {
        Response::FleetOwned { running, stopping } => Ok((running, stopping)),
        Response::Error { code, message } => {
            anyhow::bail!(
                "the supervisor refused fleet_own: {message} ({})",
                code.as_str()
            )
        }
        other => anyhow::bail!("the supervisor answered fleet_own with {}", other.name()),
    }
}

async fn hello(socket: &PathBuf) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "tenement-fleet".to_owned(),
    };
    write_message_async(&mut stream, &hello).await?;
    match read_message_async::<_, Response>(&mut stream).await? {
        Response::Hello { .. } => Ok(stream),
        Response::Error { message, .. } => anyhow::bail!("the supervisor refused: {message}"),
        other => anyhow::bail!("the supervisor answered hello with {}", other.name()),
    }
}
