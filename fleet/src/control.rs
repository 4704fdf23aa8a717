//! The agent's control socket, `fleet.sock` in the supervisor's `runtime_dir` (mode 0600, the
//! supervisor's user only): the supervisor relays the fleet calls of tenctl and the management
//! API here, since only the agent speaks to etcd. Same frames as the supervisor's sockets, one
//! request and one answer per call:
//!
//! - `fleet_hosts`: the fleet as etcd has it;
//! - `fleet_drain`: drain or undrain a host;
//! - `add`: the tenants are wanted by the fleet (their records written where absent), which
//!   places them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tenement_proto::config::Fleet;
use tenement_proto::frame::{read_message_async, write_message_async};
use tenement_proto::ids::InstanceId;
use tenement_proto::rpc::{ErrorCode, Request, Response};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::agent::{self, describe};
use crate::records::{self, TenantRecord};
use crate::{drain, hosts};

/// Serves the control socket until the process ends (binding it once the supervisor has made
/// its runtime directory).
pub async fn serve(path: &Path, fleet: Fleet) {
    let mut complained = false;
    let listener = loop {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(listener) => break listener,
            Err(e) => {
                if !complained {
                    warn!(socket = %path.display(), error = %e, "cannot serve the fleet calls (tenctl hosts, drain, add) yet; trying again every second");
                    complained = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        warn!(socket = %path.display(), error = %e, "cannot make the fleet socket private; not serving it");
        let _ = std::fs::remove_file(path);
        return std::future::pending().await;
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        tokio::spawn(handle(stream, fleet.clone()));
    }
}

async fn handle(mut stream: UnixStream, fleet: Fleet) {
    let Ok(Ok(request)) = tokio::time::timeout(
        Duration::from_secs(10),
        read_message_async::<_, Request>(&mut stream),
    )
    .await
    else {
        return;
    };
    let name = request.name();
    let answer = match call(&fleet, request).await {
        Ok(answer) => answer,
        Err(e) => {
            let message = describe(&e);
            warn!(call = name, error = %message, "a fleet call failed");
            Response::Error {
                code: ErrorCode::Unavailable,
                message,
            }
        }
    };
    let _ = write_message_async(&mut stream, &answer).await;
}

async fn call(fleet: &Fleet, request: Request) -> anyhow::Result<Response> {
    let bad = |message: String| {
        Ok(Response::Error {
            code: ErrorCode::BadRequest,
            message,
        })
    };
    match request {
        Request::FleetHosts => {
            let mut client = agent::connect(fleet, Some(Duration::from_secs(5))).await?;
            Ok(Response::FleetHosts {
                hosts: hosts::read(&mut client).await?,
            })
        }
        Request::FleetDrain { host, drain } => {
            if !Fleet::valid_host(&host) {
                return bad(format!("{host:?} is not a host name"));
            }
            let mut client = agent::connect(fleet, Some(Duration::from_secs(5))).await?;
            drain::set(&mut client, &host, drain).await?;
            info!(host = %host, drain, "an operator {} a host", if drain { "drained" } else { "undrained" });
            Ok(Response::Ok)
        }
        Request::Add { instances } => {
            let mut client = agent::connect(fleet, Some(Duration::from_secs(5))).await?;
            let (added, existing) = want(&mut client, instances).await?;
            if !added.is_empty() {
                info!(
                    tenants = added.len(),
                    "wanted by the fleet through the supervisor"
                );
            }
            Ok(Response::Added { added, existing })
        }
        other => bad(format!("{} is not a fleet call", other.name())),
    }
}

/// Writes each tenant's record where it has none (a default record: the cold tier); which
/// were new and which the fleet already wanted.
async fn want(
    client: &mut etcd_client::Client,
    instances: Vec<InstanceId>,
) -> anyhow::Result<(Vec<InstanceId>, Vec<InstanceId>)> {
    let value = serde_json::to_vec(&TenantRecord::default())?;
    let (mut added, mut existing) = (Vec::new(), Vec::new());
    for id in instances {
        let key = records::tenant_key(&id);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), None)]);
        if client.txn(txn).await?.succeeded() {
            added.push(id);
        } else {
            existing.push(id);
        }
    }
    Ok((added, existing))
}
