//! `tenement-fleet drain` and `undrain`: an operator's drain of one host, as a record in etcd
//! that the controller acts on (fleet/src/plan.rs). Each tenant on the host is moved to
//! another, naming the host it leaves; that host drains and stops it, then releases it, and
//! the new host starts it only then, holding its requests meanwhile (docs/FLEET.md, drains).

use std::time::Duration;

use etcd_client::GetOptions;
use tenement_proto::config::Fleet;

use crate::agent;
use crate::records::{self, now_ms, DrainRecord, ROOT};
use crate::view::View;

/// The longest `--wait` waits.
const WAIT: Duration = Duration::from_secs(600);

/// Drains `host` (writes its drain record), or undrains it (deletes it); whether it was
/// drained before.
pub async fn set(
    client: &mut etcd_client::Client,
    host: &str,
    drain: bool,
) -> anyhow::Result<bool> {
    check_name(host)?;
    if drain {
        let value = serde_json::to_vec(&DrainRecord { since_ms: now_ms() })?;
        let put = client
            .put(
                records::drain_key(host),
                value,
                Some(etcd_client::PutOptions::new().with_prev_key()),
            )
            .await?;
        Ok(put.prev_key().is_some())
    } else {
        let deleted = client.delete(records::drain_key(host), None).await?;
        Ok(deleted.deleted() > 0)
    }
}

pub async fn drain(fleet: &Fleet, host: &str, wait: bool) -> anyhow::Result<()> {
    check_name(host)?;
    let mut client = agent::connect(fleet, Some(Duration::from_secs(5))).await?;
    set(&mut client, host, true).await?;
    let (placed, leaving) = count(&mut client, host).await?;
    println!("{host} drained: {placed} tenants placed on it move to other hosts; nothing new goes there until `tenement-fleet undrain {host}`");
    if !wait {
        if placed + leaving > 0 {
            println!("follow it with `tenement-fleet hosts`, or drain with --wait");
        }
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = (placed, leaving);
    loop {
        let now = count(&mut client, host).await?;
        if now == (0, 0) {
            println!("{host} is empty: every tenant left it and runs elsewhere");
            return Ok(());
        }
        if now != last {
            println!("{host}: {} placed, {} still stopping there", now.0, now.1);
            last = now;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{host} still has {} tenants placed and {} stopping after {} s; is a host with room live? (tenement-fleet hosts)",
                now.0,
                now.1,
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn undrain(fleet: &Fleet, host: &str) -> anyhow::Result<()> {
    check_name(host)?;
    let mut client = agent::connect(fleet, Some(Duration::from_secs(5))).await?;
    if !set(&mut client, host, false).await? {
        println!("{host} was not drained");
    } else {
        println!("{host} takes new tenants again");
    }
    Ok(())
}

fn check_name(host: &str) -> anyhow::Result<()> {
    if Fleet::valid_host(host) {
        Ok(())
    } else {
        anyhow::bail!("{host:?} is not a host name: use 1-63 of a-z, 0-9 and '-'")
    }
}

/// Tenants placed on `host`, and tenants that moved off it it has not released yet.
async fn count(client: &mut etcd_client::Client, host: &str) -> anyhow::Result<(usize, usize)> {
    let answer = client
        .get(ROOT, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut view = View::default();
    for kv in answer.kvs() {
        view.apply(kv.key(), Some(kv.value()));
    }
    Ok((view.placed_on(host).len(), view.to_release(host).len()))
}
