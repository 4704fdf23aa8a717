//! `[fleet]`: this host's name and address in a fleet, where etcd is, and the lease timings.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Checker, RawTable, Span};
use crate::config::{Fleet, FleetTls};

const FLEET_KEYS: &[&str] = &[
    "host",
    "address",
    "etcd",
    "lease_ttl",
    "grace",
    "max_tenants",
    "ca",
    "cert",
    "key",
];
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// etcd refuses leases shorter than about 1.5 election timeouts (1.5 s by default); a host
/// renews three times per lease, so under 2 s would be all renewal.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

impl Checker<'_> {
    pub(super) fn fleet(&mut self, header: Span, table: &RawTable) -> Option<Fleet> {
        self.check_keys(table, "[fleet]", FLEET_KEYS);
        let mut complete = true;
        let host = match table
            .get("host")
            .and_then(|e| self.string(e).map(|s| (e, s)))
        {
            Some((_, name)) if Fleet::valid_host(name) => Some(name.to_owned()),
            Some((entry, name)) => {
                let message = format!(
                    "host {name:?} is not a host name: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-', like host = \"h1\""
                );
                self.error(entry.key.span(), message);
                None
            }
            None => None,
        };
        let address = match table
            .get("address")
            .and_then(|e| self.string(e).map(|s| (e, s)))
        {
            Some((entry, text)) => match text.parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Some(addr),
                _ => {
                    let message = format!(
                        "address {text:?} must be this host's own IP address and a port where the other hosts reach its proxy (it listens there for them), like address = \"10.0.0.1:7443\""
                    );
                    self.error(entry.key.span(), message);
                    None
                }
            },
            None => None,
        };
        let mut etcd = Vec::new();
        if let Some(entry) = table.get("etcd") {
            for (span, url) in self.string_list(entry).unwrap_or_default() {
                if let Some(rest) = url.strip_prefix("http://") {
                    let authority = rest.trim_end_matches('/');
                    if !authority.is_empty() && !authority.contains('/') && authority.contains(':')
                    {
                        etcd.push(format!("http://{authority}"));
                        continue;
                    }
                }
                let message = format!(
                    "etcd member {url:?} must be a client URL like \"http://10.0.0.1:2379\" (TLS to etcd is not supported yet: keep etcd on a private network)"
                );
                self.error(span, message);
                complete = false;
            }
        }
        for (key, missing) in [
            ("host", host.is_none()),
            ("address", address.is_none()),
            ("etcd", etcd.is_empty()),
        ] {
            if missing && table.get(key).is_none() {
                let example = match key {
                    "host" => "host = \"h1\"",
                    "address" => "address = \"10.0.0.1:7443\"",
                    _ => "etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]",
                };
                self.error(
                    header.clone(),
                    format!("[fleet] needs {key}; add {example}"),
                );
            }
        }
        let lease_ttl = self.duration(table, "lease_ttl", DEFAULT_LEASE_TTL);
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&lease_ttl) {
            if let Some(entry) = table.get("lease_ttl") {
                let message = format!(
                    "lease_ttl must be from {}s to {}s; a host that cannot renew its lease that long is taken for gone",
                    MIN_LEASE_TTL.as_secs(),
                    MAX_LEASE_TTL.as_secs()
                );
                self.error(entry.key.span(), message);
            }
        }
        let grace = self.duration(table, "grace", DEFAULT_GRACE);
        let max_tenants = self
            .opt_count(table, "max_tenants", 1..=1_000_000)
            .map(|n| n as u32);
        let tls = self.fleet_tls(header, table, &mut complete);
        if !complete {
            return None;
        }
        Some(Fleet {
            host: host?,
            address: address?,
            etcd,
            lease_ttl,
            grace,
            max_tenants,
            tls,
        })
    }

    /// `ca`, `cert` and `key`: all three or none.
    fn fleet_tls(
        &mut self,
        header: Span,
        table: &RawTable,
        complete: &mut bool,
    ) -> Option<FleetTls> {
        let mut path = |name: &str| {
            let entry = table.get(name)?;
            match self.string(entry) {
                Some(text) => Some(super::normalise(&self.config_dir.join(text))),
                None => {
                    *complete = false;
                    None
                }
            }
        };
        let (ca, cert, key) = (path("ca"), path("cert"), path("key"));
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Some(FleetTls { ca, cert, key }),
            (None, None, None) => None,
            (ca, cert, key) => {
                if *complete {
                    let missing: Vec<&str> = [
                        ("ca", ca.is_none()),
                        ("cert", cert.is_none()),
                        ("key", key.is_none()),
                    ]
                    .into_iter()
                    .filter_map(|(name, gone)| gone.then_some(name))
                    .collect();
                    let message = format!(
                        "[fleet] needs ca, cert and key together (the fleet's CA and this host's certificate and key from it; tenement-fleet credentials makes them); missing {}",
                        missing.join(", ")
                    );
                    self.error(header, message);
                    *complete = false;
                }
                None
            }
        }
    }
}
