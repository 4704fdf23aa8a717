//! `tenement-fleet hosts`: the fleet as etcd has it now, one line a host. Hosts named by
//! placements but without a record (their lease expired) are listed as gone, with the tenants
//! still placed on them: those move once the controller's grace period has passed.

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions};

use crate::records::{now_ms, HostRecord, Key, Placement, ELECTION, ROOT};

/// One host as etcd has it (the protocol's `FleetHost`, which tenctl gets too).
pub type HostView = tenement_proto::rpc::FleetHost;

/// Reads everything under the fleet's prefix once, and the controller's name.
pub async fn read(client: &mut Client) -> anyhow::Result<Vec<HostView>> {
    let answer = client
        .get(ROOT, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut records = BTreeMap::new();
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    let mut drained = std::collections::BTreeSet::new();
    for kv in answer.kvs() {
        match Key::parse(kv.key()) {
            Key::Host(name) => {
                if let Ok(record) = serde_json::from_slice::<HostRecord>(kv.value()) {
                    records.insert(name, record);
                }
            }
            Key::Placement(_) => {
                if let Ok(p) = serde_json::from_slice::<Placement>(kv.value()) {
                    *placed.entry(p.host).or_default() += 1;
                }
            }
            Key::Drain(name) => {
                drained.insert(name);
            }
            Key::Tenant(_) | Key::Released(_) | Key::Other => {}
        }
    }
    let controller = match client.leader(ELECTION).await {
        Ok(answer) => answer
            .kv()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok().map(str::to_owned)),
        Err(_) => None,
    };
    let mut views = views(&records, &placed, controller.as_deref(), now_ms());
    for view in &mut views {
        view.drained = drained.contains(&view.host);
    }
    Ok(views)
}

/// Live hosts first, then gone ones, each by name.
pub fn views(
    records: &BTreeMap<String, HostRecord>,
    placed: &BTreeMap<String, usize>,
    controller: Option<&str>,
    now_ms: u64,
) -> Vec<HostView> {
    let mut out: Vec<HostView> = records
        .iter()
        .map(|(name, r)| HostView {
            host: name.clone(),
            address: Some(r.address),
            live: true,
            controller: controller == Some(name.as_str()),
            drained: false,
            placed: placed.get(name).copied().unwrap_or(0),
            running: Some(r.running),
            memory_total: Some(r.memory_total),
            memory_available: Some(r.memory_available),
            max_tenants: r.max_tenants,
            heartbeat_age_ms: Some(now_ms.saturating_sub(r.heartbeat_ms)),
        })
        .collect();
    for (name, count) in placed {
        if !records.contains_key(name) {
            out.push(HostView {
                host: name.clone(),
                address: None,
                live: false,
                controller: false,
                drained: false,
                placed: *count,
                running: None,
                memory_total: None,
                memory_available: None,
                max_tenants: None,
                heartbeat_age_ms: None,
            });
        }
    }
    out
}

/// The table `tenement-fleet hosts` (and `tenctl hosts`) prints.
pub fn render(views: &[HostView]) -> String {
    tenement_proto::display::fleet_hosts(views)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_hosts_then_gone_ones_with_what_is_still_placed_on_them() {
        let record = |running| HostRecord {
            address: "10.0.0.1:7443".parse().expect("addr"),
            memory_total: 16 << 30,
            memory_available: 8 << 30,
            running,
            max_tenants: Some(100),
            heartbeat_ms: 9_000,
        };
        let records = BTreeMap::from([("h1".to_owned(), record(3)), ("h3".to_owned(), record(0))]);
        let placed = BTreeMap::from([("h1".to_owned(), 10), ("h2".to_owned(), 7)]);
        let views = views(&records, &placed, Some("h3"), 10_500);
        let names: Vec<(&str, bool, bool, usize)> = views
            .iter()
            .map(|v| (v.host.as_str(), v.live, v.controller, v.placed))
            .collect();
        assert_eq!(
            names,
            [
                ("h1", true, false, 10),
                ("h3", true, true, 0),
                ("h2", false, false, 7)
            ]
        );
        assert_eq!(views[0].heartbeat_age_ms, Some(1_500));
        let table = render(&views);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("HOST  STATE"), "{table}");
        assert!(
            lines[1].contains("10/100")
                && lines[1].contains("8.0 of 16.0")
                && lines[1].contains("1.5 s ago"),
            "{table}"
        );
        assert!(lines[2].contains("live, controller"), "{table}");
        assert!(
            lines[3].starts_with("h2    gone") && lines[3].ends_with('-'),
            "{table}"
        );
    }
}
