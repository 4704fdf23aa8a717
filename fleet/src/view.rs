//! What the agent follows of the fleet: every placement, where each live host's proxy
//! listens, and the releases of tenants moved off live hosts. From it come the tenants placed
//! here (for the supervisor's gate; held while the host they moved from still has them), the
//! tenants placed elsewhere with their hosts' addresses (for the proxy, which forwards to
//! them), and the tenants this host handed over and has yet to release.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use tenement_proto::ids::InstanceId;
use tenement_proto::rpc::FleetPeer;

use crate::records::{HostRecord, Key, Placement, Release};

#[derive(Debug, Default)]
pub struct View {
    placements: BTreeMap<InstanceId, Placed>,
    /// Live hosts (their record is in etcd) -> where their proxies listen.
    addresses: BTreeMap<String, SocketAddr>,
    /// Tenant -> the epoch its previous host released.
    released: BTreeMap<InstanceId, u64>,
}

#[derive(Debug)]
struct Placed {
    host: String,
    epoch: u64,
    /// The live host it is moving off (a drain).
    from: Option<String>,
}

impl View {
    /// A key of the fleet was written (`value` is `None` when it was deleted). Keys of
    /// other kinds, and values that do not parse, change nothing (an unreadable placement is
    /// taken for no placement, as the controller does).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        match Key::parse(key) {
            Key::Placement(id) => {
                let placed = parse::<Placement>(value).map(|p| Placed {
                    host: p.host,
                    epoch: p.epoch,
                    from: p.from,
                });
                set(&mut self.placements, id, placed);
            }
            Key::Host(name) => {
                let address = parse::<HostRecord>(value).map(|r| r.address);
                set(&mut self.addresses, name, address);
            }
            Key::Released(id) => {
                let epoch = parse::<Release>(value).map(|r| r.epoch);
                set(&mut self.released, id, epoch);
            }
            Key::Tenant(_) | Key::Drain(_) | Key::Other => {}
        }
    }

    /// The tenants placed on `host`, with their epochs.
    pub fn placed_on(&self, host: &str) -> BTreeMap<String, u64> {
        self.placements
            .iter()
            .filter(|(_, p)| p.host == host)
            .map(|(id, p)| (id.to_string(), p.epoch))
            .collect()
    }

    /// Of the tenants placed on `host`, those it must not start yet: moved off a host that is
    /// still live and has not released them for this epoch. (A host that is gone fenced
    /// itself before its lease expired: nothing to wait for.)
    pub fn held_on(&self, host: &str) -> BTreeSet<String> {
        self.placements
            .iter()
            .filter(|(id, p)| {
                p.host == host
                    && p.from
                        .as_ref()
                        .is_some_and(|from| self.addresses.contains_key(from))
                    && self.released.get(*id) != Some(&p.epoch)
            })
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// The tenants moved off `host` while it was live that it has not released yet, with the
    /// epoch to release.
    pub fn to_release(&self, host: &str) -> BTreeMap<InstanceId, u64> {
        self.placements
            .iter()
            .filter(|(id, p)| {
                p.host != host
                    && p.from.as_deref() == Some(host)
                    && self.released.get(*id) != Some(&p.epoch)
            })
            .map(|(id, p)| (id.clone(), p.epoch))
            .collect()
    }

    /// The tenants placed on the other hosts, by host (sorted, so equal views compare
    /// equal); a host without a live record has no address.
    pub fn peers(&self, me: &str) -> Vec<FleetPeer> {
        let mut by_host: BTreeMap<&str, Vec<InstanceId>> = BTreeMap::new();
        for (id, p) in &self.placements {
            if p.host != me {
                by_host.entry(&p.host).or_default().push(id.clone());
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

/// A value read from etcd; `None` when deleted or not JSON of that kind.
fn parse<T: serde::de::DeserializeOwned>(value: Option<&[u8]>) -> Option<T> {
    value.and_then(|v| serde_json::from_slice(v).ok())
}

/// `key` now has `value`, or nothing.
fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(value) => {
            map.insert(key, value);
        }
        None => {
            map.remove(&key);
        }
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
            from: None,
        })
        .expect("json")
    }

    fn moved(host: &str, epoch: u64, from: &str) -> Vec<u8> {
        serde_json::to_vec(&Placement {
            host: host.to_owned(),
            standby: vec![],
            tier: Tier::Cold,
            epoch,
            placed_ms: 0,
            from: Some(from.to_owned()),
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

    #[test]
    fn a_tenant_moved_off_a_live_host_is_held_until_that_host_releases_it() {
        use crate::records::released_key;
        let mut view = View::default();
        for h in ["h1", "h2"] {
            view.apply(host_key(h).as_bytes(), Some(&record("10.0.0.1:7443")));
        }
        let t = id("notes:a");
        view.apply(placement_key(&t).as_bytes(), Some(&moved("h2", 5, "h1")));
        assert!(view.held_on("h2").contains("notes:a"));
        assert_eq!(view.to_release("h1").get(&t), Some(&5));
        assert!(view.to_release("h2").is_empty());
        // h2's proxy serves it (held there), h1's hands it to h2.
        assert!(view.peers("h2").is_empty());
        assert_eq!(view.peers("h1")[0].instances, std::slice::from_ref(&t));
        // A release of an older epoch changes nothing; this epoch's frees it.
        let release = |epoch: u64| {
            serde_json::to_vec(&Release {
                epoch,
                host: "h1".to_owned(),
            })
            .expect("json")
        };
        view.apply(released_key(&t).as_bytes(), Some(&release(4)));
        assert!(view.held_on("h2").contains("notes:a"));
        view.apply(released_key(&t).as_bytes(), Some(&release(5)));
        assert!(view.held_on("h2").is_empty());
        assert!(view.to_release("h1").is_empty());
        // Moved off a host that is gone: nothing to wait for.
        view.apply(placement_key(&t).as_bytes(), Some(&moved("h2", 6, "h3")));
        assert!(view.held_on("h2").is_empty());
    }
}
