//! `tenement-fleet hosts`: the fleet as etcd has it now, one line a host. Hosts named by
//! placements but without a record (their lease expired) are listed as gone, with the tenants
//! still placed on them: those move once the controller's grace period has passed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use etcd_client::{Client, GetOptions};
use serde::Serialize;

use crate::records::{now_ms, HostRecord, Key, Placement, ELECTION, ROOT};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    pub host: String,
    /// `None` for a gone host.
    pub address: Option<SocketAddr>,
    pub live: bool,
    pub controller: bool,
    /// An operator drains it (`tenement-fleet drain`).
    pub drained: bool,
    /// Tenants placed on it.
    pub placed: usize,
    /// Running, as its supervisor last said (live hosts only).
    pub running: Option<u32>,
    pub memory_total: Option<u64>,
    pub memory_available: Option<u64>,
    pub max_tenants: Option<u32>,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: Option<u64>,
}

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

/// The table `tenement-fleet hosts` prints.
pub fn render(views: &[HostView]) -> String {
    let gib = |bytes: u64| format!("{:.1}", bytes as f64 / f64::from(1u32 << 30));
    let mut rows = vec![[
        "HOST".to_owned(),
        "STATE".to_owned(),
        "ADDRESS".to_owned(),
        "PLACED".to_owned(),
        "RUNNING".to_owned(),
        "MEMORY FREE (GiB)".to_owned(),
        "HEARTBEAT".to_owned(),
    ]];
    for v in views {
        let mut state = match (v.live, v.controller) {
            (true, true) => "live, controller",
            (true, false) => "live",
            (false, _) => "gone",
        }
        .to_owned();
        if v.drained {
            state.push_str(", drained");
        }
        let placed = match v.max_tenants {
            Some(cap) => format!("{}/{cap}", v.placed),
            None => v.placed.to_string(),
        };
        let memory = match (v.memory_available, v.memory_total) {
            (Some(free), Some(total)) => format!("{} of {}", gib(free), gib(total)),
            _ => "-".to_owned(),
        };
        rows.push([
            v.host.clone(),
            state,
            v.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            placed,
            v.running.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            memory,
            v.heartbeat_age_ms.map_or_else(
                || "-".to_owned(),
                |ms| format!("{:.1} s ago", ms as f64 / 1000.0),
            ),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
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
