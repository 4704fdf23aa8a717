//! Tenants may not open connections to each other's ports: an nftables table of this
//! supervisor's own (nft(8), run as `nft -f -`).
//!
//! Every tenant shares the host's network under `process` and `namespace` isolation, so
//! without this any tenant could connect straight to another tenant's port, skip the proxy and
//! forge `X-Forwarded-For`. The rule, on the loopback output path: a TCP or UDP packet to a
//! port of `port_range` is rejected unless its socket's uid is trusted (root, this supervisor,
//! the proxy) or owns that port (the pair uid . port is in the `owners` set). The proxy, the
//! supervisor's probes and an app calling its own port get through; a co-tenant gets
//! "connection refused".
//!
//! What it cannot tell apart: instances that run as the same uid (a shared named user, or
//! `user = "self"`), and tenants running as root. Listeners an app opens outside `port_range`
//! are not covered either (isolation = "sandbox" gives an app a network of its own).
//!
//! The rules are text built by [`ruleset`] and [`owners_update`] from numbers only (uids and
//! ports), so nothing a tenant controls reaches nft.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use tokio::sync::watch;

/// The whole desired state of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub table: String,
    pub range: (u16, u16),
    /// Uids whose packets always pass: root, the supervisor, the proxy.
    pub trusted: BTreeSet<u32>,
    /// (uid, port): the uid an instance runs as and the port it owns.
    pub owners: BTreeSet<(u32, u16)>,
}

/// A table name of this supervisor's own (two supervisors with other runtime dirs on one host
/// never touch each other's table): `tenement_` and a hash of the runtime directory.
pub fn table_name(runtime_dir: &Path) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    runtime_dir.hash(&mut hasher);
    format!("tenement_{:016x}", hasher.finish())
}

fn elements<T>(items: impl IntoIterator<Item = T>, show: impl Fn(T) -> String) -> String {
    let list: Vec<String> = items.into_iter().map(show).collect();
    if list.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", list.join(", "))
    }
}

/// The table, created or replaced as a whole (one nft transaction).
pub fn ruleset(rules: &Rules) -> String {
    let (lo, hi) = rules.range;
    let table = &rules.table;
    let mut text = String::new();
    // `table` first so that `flush` finds it; the definition then fills it again.
    let _ = writeln!(text, "table inet {table}");
    let _ = writeln!(text, "flush table inet {table}");
    let _ = writeln!(text, "table inet {table} {{");
    let _ = writeln!(
        text,
        "  set trusted {{ type uid;{} }}",
        elements(rules.trusted.iter(), |u| u.to_string())
    );
    let _ = writeln!(
        text,
        "  set owners {{ type uid . inet_service;{} }}",
        elements(rules.owners.iter(), |(u, p)| format!("{u} . {p}"))
    );
    let _ = writeln!(text, "  chain output {{");
    let _ = writeln!(
        text,
        "    type filter hook output priority filter; policy accept;"
    );
    let _ = writeln!(
        text,
        "    oifname \"lo\" meta l4proto {{ tcp, udp }} th dport {lo}-{hi} meta skuid != @trusted meta skuid . th dport != @owners reject with icmpx port-unreachable"
    );
    let _ = writeln!(text, "  }}");
    let _ = writeln!(text, "}}");
    text
}

/// Replaces the two sets' contents in one transaction.
pub fn sets_update(rules: &Rules) -> String {
    let table = &rules.table;
    let mut text = String::new();
    let _ = writeln!(text, "flush set inet {table} trusted");
    let _ = writeln!(text, "flush set inet {table} owners");
    if !rules.trusted.is_empty() {
        let list: Vec<String> = rules.trusted.iter().map(u32::to_string).collect();
        let _ = writeln!(
            text,
            "add element inet {table} trusted {{ {} }}",
            list.join(", ")
        );
    }
    if !rules.owners.is_empty() {
        let list: Vec<String> = rules
            .owners
            .iter()
            .map(|(u, p)| format!("{u} . {p}"))
            .collect();
        let _ = writeln!(
            text,
            "add element inet {table} owners {{ {} }}",
            list.join(", ")
        );
    }
    text
}

/// Runs `nft -f -` with `script`; the error is nft's own message.
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e} (install nftables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("cannot write to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let message = String::from_utf8_lossy(&out.stderr);
        Err(format!("nft: {}", message.trim()))
    }
}

/// The running table: changes are coalesced and applied by one task, in order.
#[derive(Clone)]
pub struct Firewall {
    desired: watch::Sender<(Rules, u64)>,
    applied: watch::Receiver<u64>,
}

impl Firewall {
    /// Installs the table (an error when nft is missing or refuses) and starts the task that
    /// keeps it as desired.
    pub async fn start(rules: Rules) -> Result<Firewall, String> {
        let script = ruleset(&rules);
        tokio::task::spawn_blocking(move || nft(&script))
            .await
            .map_err(|e| e.to_string())??;
        let (desired, mut wanted) = watch::channel((rules, 0u64));
        let (applied_tx, applied) = watch::channel(0u64);
        tokio::spawn(async move {
            while wanted.changed().await.is_ok() {
                let (rules, version) = wanted.borrow_and_update().clone();
                let script = sets_update(&rules);
                match tokio::task::spawn_blocking(move || nft(&script)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(
                        "cannot update the firewall ({e}): tenants may reach other tenants' ports"
                    ),
                    Err(e) => tracing::error!("firewall update task: {e}"),
                }
                let _ = applied_tx.send(version);
            }
        });
        Ok(Firewall { desired, applied })
    }

    /// The (uid, port) pairs of every instance that has both.
    pub fn set_owners(&self, owners: BTreeSet<(u32, u16)>) {
        self.desired.send_if_modified(|(rules, version)| {
            if rules.owners == owners {
                return false;
            }
            rules.owners = owners;
            *version += 1;
            true
        });
    }

    /// Lets `uid` reach every instance (a proxy that just connected); returns once the rule is
    /// in place, so its first request already passes.
    pub async fn trust(&self, uid: u32) {
        let mut target = None;
        self.desired.send_if_modified(|(rules, version)| {
            if rules.trusted.insert(uid) {
                *version += 1;
                target = Some(*version);
                true
            } else {
                false
            }
        });
        if let Some(target) = target {
            let mut applied = self.applied.clone();
            let _ = applied.wait_for(|v| *v >= target).await;
        }
    }

    /// Removes the table (at a clean shutdown).
    pub async fn remove(&self) {
        let table = self.desired.borrow().0.table.clone();
        let script = format!("delete table inet {table}\n");
        match tokio::task::spawn_blocking(move || nft(&script)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot remove the firewall table: {e}"),
            Err(e) => tracing::warn!("cannot remove the firewall table: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            table: "tenement_0123456789abcdef".to_owned(),
            range: (20000, 29999),
            trusted: [0, 65534].into_iter().collect(),
            owners: [(61184, 20001), (61185, 20002)].into_iter().collect(),
        }
    }

    #[test]
    fn the_ruleset_rejects_strangers_on_the_range_and_lists_who_may_pass() {
        let text = ruleset(&rules());
        assert!(text.starts_with(
            "table inet tenement_0123456789abcdef\nflush table inet tenement_0123456789abcdef\n"
        ));
        assert!(
            text.contains("set trusted { type uid; elements = { 0, 65534 }; }"),
            "{text}"
        );
        assert!(
            text.contains(
                "set owners { type uid . inet_service; elements = { 61184 . 20001, 61185 . 20002 }; }"
            ),
            "{text}"
        );
        assert!(text.contains("th dport 20000-29999 meta skuid != @trusted meta skuid . th dport != @owners reject"), "{text}");
        let empty = Rules {
            owners: BTreeSet::new(),
            ..rules()
        };
        assert!(ruleset(&empty).contains("set owners { type uid . inet_service; }"));
    }

    #[test]
    fn an_update_replaces_both_sets_in_one_script() {
        let text = sets_update(&rules());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "flush set inet tenement_0123456789abcdef trusted",
                "flush set inet tenement_0123456789abcdef owners",
                "add element inet tenement_0123456789abcdef trusted { 0, 65534 }",
                "add element inet tenement_0123456789abcdef owners { 61184 . 20001, 61185 . 20002 }",
            ]
        );
    }

    #[test]
    fn table_names_differ_per_runtime_dir_and_fit_nft() {
        let a = table_name(Path::new("/run/tenement"));
        let b = table_name(Path::new("/tmp/x/run"));
        assert_ne!(a, b);
        assert_eq!(a, table_name(Path::new("/run/tenement")));
        assert!(a.len() <= 32 && a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
    }
}
