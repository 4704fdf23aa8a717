//! What the agent follows of the fleet: every placement and where each live host's proxy
//! listens. From it come the tenants placed here (for the supervisor's gate) and the tenants
//! placed elsewhere with their hosts' addresses (for the proxy, which forwards to them).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tenement_proto::ids::InstanceId;
use tenement_proto::rpc::FleetPeer;

use crate::records::{HostRecord, Key, Placement};

#[derive(Debug, Default)]
pub struct View {
    /// Tenant -> (host, epoch).
    placements: BTreeMap<InstanceId, (String, u64)>,
    /// Live hosts (their record is in etcd) -> where their proxies listen.
    addresses: BTreeMap<String, SocketAddr>,
}

impl View {
    /// A key of the fleet was written (`value` is `None` when it was deleted). Keys of
    /// other kinds, and values that do not parse, change nothing (an unreadable placement is
    /// taken for no placement, as the controller does).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        match Key::parse(key) {
            Key::Placement(id) => {
                match value.and_then(|v| serde_json::from_slice::<Placement>(v).ok()) {
                    Some(p) => {
                        self.placements.insert(id, (p.host, p.epoch));
                    }
                    None => {
                        self.placements.remove(&id);
                    }
                }
            }
            Key::Host(name) => {
                match value.and_then(|v| serde_json::from_slice::<HostRecord>(v).ok()) {
                    Some(record) => {
                        self.addresses.insert(name, record.address);
                    }
                    None => {
                        self.addresses.remove(&name);
                    }
                }
            }
            Key::Tenant(_) | Key::Other => {}
        }
    }

    /// The tenants placed on `host`, with their epochs.
    pub fn placed_on(&self, host: &str) -> BTreeMap<String, u64> {
        self.placements
            .iter()
            .filter(|(_, (h, _))| h == host)
            .map(|(id, (_, epoch))| (id.to_string(), *epoch))
            .collect()
    }

    /// The tenants placed on the other hosts, by host (sorted, so equal views compare
    /// equal); a host without a live record has no address.
    pub fn peers(&self, me: &str) -> Vec<FleetPeer> {
        let mut by_host: BTreeMap<&str, Vec<InstanceId>> = BTreeMap::new();
        for (id, (host, _)) in &self.placements {
            if host != me {
                by_host.entry(host).or_default().push(id.clone());
            }
        }
        by_host
            .into_iter()
            .map(|(host, instances)| FleetPeer {
                host: host.to_owned(),
                address: self.addresses.get(host).copied(),
                instances,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{host_key, placement_key, Tier};

    fn placement(host: &str, epoch: u64) -> Vec<u8> {
        serde_json::to_vec(&Placement {
            host: host.to_owned(),
            standby: vec![],
            tier: Tier::Cold,
            epoch,
            placed_ms: 0,
        })
        .expect("json")
    }

    fn record(address: &str) -> Vec<u8> {
        serde_json::to_vec(&HostRecord {
            address: address.parse().expect("address"),
            memory_total: 0,
            memory_available: 0,
            running: 0,
            max_tenants: None,
            heartbeat_ms: 0,
        })
        .expect("json")
    }

    fn id(text: &str) -> InstanceId {
        InstanceId::parse(text).expect("id")
    }

    #[test]
    fn placements_split_into_mine_and_the_peers_with_their_addresses() {
        let mut view = View::default();
        view.apply(host_key("h2").as_bytes(), Some(&record("10.0.0.2:7443")));
        for (tenant, host) in [
            ("notes:a", "h1"),
            ("notes:b", "h2"),
            ("notes:c", "h3"),
            ("notes:d", "h2"),
        ] {
            view.apply(
                placement_key(&id(tenant)).as_bytes(),
                Some(&placement(host, 1)),
            );
        }
        assert_eq!(
            view.placed_on("h1").into_iter().collect::<Vec<_>>(),
            [("notes:a".to_owned(), 1)]
        );
        let peers = view.peers("h1");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].host, "h2");
        assert_eq!(
            peers[0].address,
            Some("10.0.0.2:7443".parse().expect("addr"))
        );
        assert_eq!(peers[0].instances, [id("notes:b"), id("notes:d")]);
        // h3 has no live record: its tenants are known, its address is not.
        assert_eq!(peers[1].host, "h3");
        assert_eq!(peers[1].address, None);

        // h2's lease expires, then the controller moves notes:b here.
        view.apply(host_key("h2").as_bytes(), None);
        view.apply(
            placement_key(&id("notes:b")).as_bytes(),
            Some(&placement("h1", 2)),
        );
        assert_eq!(view.placed_on("h1").get("notes:b"), Some(&2));
        let peers = view.peers("h1");
        assert_eq!(peers[0].address, None);
        assert_eq!(peers[0].instances, [id("notes:d")]);

        // Deleted, unreadable and foreign keys.
        view.apply(placement_key(&id("notes:d")).as_bytes(), None);
        view.apply(placement_key(&id("notes:c")).as_bytes(), Some(b"{not json"));
        view.apply(b"/tenement/placement/../etc", Some(&placement("h9", 1)));
        assert!(view.peers("h1").is_empty());
    }
}
