//! What the fleet keeps in etcd, and where: one key per host (under its lease), one desired
//! record and one placement per tenant. Values are JSON; unknown fields are kept out of the
//! way (ignored), so hosts of two versions can share a fleet during an upgrade.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tenement_proto::config::Fleet;
use tenement_proto::ids::InstanceId;

/// Everything the fleet writes is under this prefix.
pub const ROOT: &str = "/tenement/";
/// `/tenement/hosts/{host}`: a [`HostRecord`], attached to the host's lease.
pub const HOSTS: &str = "/tenement/hosts/";
/// `/tenement/tenants/{service}:{id}`: a [`TenantRecord`], the tenant wanted somewhere.
pub const TENANTS: &str = "/tenement/tenants/";
/// `/tenement/placement/{service}:{id}`: a [`Placement`], where the controller put it.
pub const PLACEMENTS: &str = "/tenement/placement/";
/// `/tenement/drain/{host}`: a [`DrainRecord`]; the controller moves the host's tenants off it
/// and places nothing new there while it exists.
pub const DRAINS: &str = "/tenement/drain/";
/// `/tenement/released/{service}:{id}`: a [`Release`], written by the host a live move left:
/// the tenant's process there has stopped, so its new host may start it.
pub const RELEASED: &str = "/tenement/released/";
/// The controller's election (etcd's election API keeps its keys under this name).
pub const ELECTION: &str = "/tenement/controller";

/// A live host, as it announces itself while its lease lasts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Where the other hosts reach this one's proxy.
    pub address: SocketAddr,
    /// Memory of the machine, bytes.
    pub memory_total: u64,
    /// Memory the kernel says is available for new work, bytes.
    pub memory_available: u64,
    /// Tenants running on this host now.
    pub running: u32,
    /// The most tenants the controller may place here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tenants: Option<u32>,
    /// When the host last wrote this record (Unix milliseconds).
    pub heartbeat_ms: u64,
}

/// How a tenant's data survives the loss of its host (docs/FLEET.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Restarted elsewhere from its latest replica.
    #[default]
    Cold,
    /// A standby kept current and ready.
    Warm,
    /// The app replicates itself; the fleet only routes.
    ActiveActive,
}

/// A tenant the fleet should run somewhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    #[serde(default)]
    pub tier: Tier,
}

/// Where a tenant runs. Only the controller writes it, each time with a transaction that
/// checks the record is still the one it read; `epoch` counts the moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub host: String,
    /// Hosts that hold (or will hold) its replica, in order of preference.
    #[serde(default)]
    pub standby: Vec<String>,
    #[serde(default)]
    pub tier: Tier,
    pub epoch: u64,
    /// When this placement was written (Unix milliseconds).
    pub placed_ms: u64,
    /// A move off a live host (a drain): that host, which still runs the tenant until it has
    /// drained and stopped it and says so in a [`Release`] for this epoch. The new host holds
    /// the tenant's requests until then. `None` for a first placement, and for a move off a
    /// host that is gone (it fenced itself before its lease expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// An operator's drain of one host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// When the drain was asked for (Unix milliseconds).
    #[serde(default)]
    pub since_ms: u64,
}

/// A host has stopped a tenant that moved off it at `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub epoch: u64,
    pub host: String,
}

/// A key of the fleet, checked: names that are not valid hosts or instances are `Other` and
/// never reach a path, an argv or a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Host(String),
    Tenant(InstanceId),
    Placement(InstanceId),
    Drain(String),
    Released(InstanceId),
    Other,
}

impl Key {
    pub fn parse(key: &[u8]) -> Key {
        let Ok(key) = std::str::from_utf8(key) else {
            return Key::Other;
        };
        if let Some(name) = key.strip_prefix(HOSTS) {
            if Fleet::valid_host(name) {
                return Key::Host(name.to_owned());
            }
        } else if let Some(id) = key.strip_prefix(TENANTS) {
            if let Ok(id) = InstanceId::parse(id) {
                return Key::Tenant(id);
            }
        } else if let Some(id) = key.strip_prefix(PLACEMENTS) {
            if let Ok(id) = InstanceId::parse(id) {
                return Key::Placement(id);
            }
        } else if let Some(name) = key.strip_prefix(DRAINS) {
            if Fleet::valid_host(name) {
                return Key::Drain(name.to_owned());
            }
        } else if let Some(id) = key.strip_prefix(RELEASED) {
            if let Ok(id) = InstanceId::parse(id) {
                return Key::Released(id);
            }
        }
        Key::Other
    }
}

pub fn host_key(name: &str) -> String {
    format!("{HOSTS}{name}")
}

pub fn tenant_key(id: &InstanceId) -> String {
    format!("{TENANTS}{id}")
}

pub fn placement_key(id: &InstanceId) -> String {
    format!("{PLACEMENTS}{id}")
}

pub fn drain_key(host: &str) -> String {
    format!("{DRAINS}{host}")
}

pub fn released_key(id: &InstanceId) -> String {
    format!("{RELEASED}{id}")
}

pub use tenement_proto::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_what_is_not_a_name() {
        let id = InstanceId::parse("notes:alice").expect("id");
        assert_eq!(
            Key::parse(placement_key(&id).as_bytes()),
            Key::Placement(id.clone())
        );
        assert_eq!(
            Key::parse(format!("{TENANTS}{id}").as_bytes()),
            Key::Tenant(id)
        );
        assert_eq!(
            Key::parse(host_key("h1").as_bytes()),
            Key::Host("h1".into())
        );
        for bad in [
            "/tenement/hosts/../etc",
            "/tenement/hosts/H1",
            "/tenement/placement/notes:../x",
            "/tenement/placement/notes",
            "/tenement/tenants/",
            "/tenement/controller/694d",
            "/elsewhere/hosts/h1",
        ] {
            assert_eq!(Key::parse(bad.as_bytes()), Key::Other, "{bad}");
        }
        assert_eq!(Key::parse(b"/tenement/hosts/\xff"), Key::Other);
    }

    #[test]
    fn records_read_what_a_newer_host_writes() {
        let placement: Placement = serde_json::from_str(
            r#"{"host":"h2","epoch":3,"placed_ms":5,"tier":"active-active","region":"x"}"#,
        )
        .expect("placement");
        assert_eq!(placement.tier, Tier::ActiveActive);
        assert!(placement.standby.is_empty());
        let tenant: TenantRecord = serde_json::from_str("{}").expect("tenant");
        assert_eq!(tenant.tier, Tier::Cold);
    }
}
