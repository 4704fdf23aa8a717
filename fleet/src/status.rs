//! What the agent tells the rest of the host, in one file written whole (`fleet.json` in the
//! state directory): whether it is a member or fenced, whether it leads, what is placed here.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Membership {
    /// Not (yet, or again) holding a lease: nothing here may be served.
    Joining,
    /// Holding a renewed lease.
    Member,
    /// Could not renew the lease in time: stopped serving; rejoins with a new lease.
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub host: String,
    pub membership: Membership,
    /// The lease this host's membership hangs on (hex, as etcdctl prints it).
    pub lease: Option<String>,
    /// Whether this host is the fleet's controller now.
    pub controller: bool,
    /// Tenants placed on this host, with their placement epoch.
    pub placed_here: BTreeMap<String, u64>,
    /// How many times this agent fenced the host, and when it last did (Unix ms).
    pub fences: u32,
    pub fenced_ms: Option<u64>,
    pub updated_ms: u64,
}

impl Status {
    pub fn new(host: &str) -> Self {
        Status {
            host: host.to_owned(),
            membership: Membership::Joining,
            lease: None,
            controller: false,
            placed_here: BTreeMap::new(),
            fences: 0,
            fenced_ms: None,
            updated_ms: 0,
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        tenement_proto::atomic::write_atomically(path, &bytes)
    }

    pub fn read(path: &Path) -> anyhow::Result<Status> {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a fleet status: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_file_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.json");
        let mut status = Status::new("h1");
        status.placed_here.insert("notes:alice".into(), 3);
        status.membership = Membership::Fenced;
        status.write(&path).expect("write");
        assert_eq!(Status::read(&path).expect("read"), status);
        std::fs::write(&path, "{").expect("garbage");
        let err = Status::read(&path).expect_err("garbage").to_string();
        assert!(err.contains("is not a fleet status"), "{err}");
    }
}
