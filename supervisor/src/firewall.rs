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
//! The table is owned by the `nft -i` process the supervisor keeps running for its whole
//! life (`flags owner`, nft(8)): no other process may change it, and when that process ends
//! (the supervisor stopped, or died and its pipe closed) the kernel deletes the table. A
//! crashed supervisor therefore never leaves rules behind that would refuse a later one's
//! proxy.
//!
//! The rules are text built by [`ruleset`] and [`sets_update`] from numbers only (uids and
//! ports), so nothing a tenant controls reaches nft.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};

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

fn element_list<T>(items: impl IntoIterator<Item = T>, show: impl Fn(T) -> String) -> String {
    items.into_iter().map(show).collect::<Vec<_>>().join(", ")
}

/// The table, created owned by the nft process that runs this (one line: one transaction).
pub fn ruleset(rules: &Rules) -> String {
    let (lo, hi) = rules.range;
    let table = &rules.table;
    let mut text = format!(
        "add table inet {table} {{ flags owner; }}; \
         add set inet {table} trusted {{ type uid; }}; \
         add set inet {table} owners {{ type uid . inet_service; }}; \
         add chain inet {table} output {{ type filter hook output priority filter; policy accept; }}; \
         add rule inet {table} output oifname \"lo\" meta l4proto {{ tcp, udp }} th dport {lo}-{hi} \
         meta skuid != @trusted meta skuid . th dport != @owners reject with icmpx port-unreachable"
    );
    text.push_str(&elements(rules));
    text
}

/// `; add element ...` for both sets' contents (nothing for an empty set).
fn elements(rules: &Rules) -> String {
    let table = &rules.table;
    let mut text = String::new();
    if !rules.trusted.is_empty() {
        let _ = write!(
            text,
            "; add element inet {table} trusted {{ {} }}",
            element_list(rules.trusted.iter(), |u| u.to_string())
        );
    }
    if !rules.owners.is_empty() {
        let _ = write!(
            text,
            "; add element inet {table} owners {{ {} }}",
            element_list(rules.owners.iter(), |(u, p)| format!("{u} . {p}"))
        );
    }
    text
}

/// Replaces both sets' contents in one transaction (one line).
pub fn sets_update(rules: &Rules) -> String {
    let table = &rules.table;
    format!(
        "flush set inet {table} trusted; flush set inet {table} owners{}",
        elements(rules)
    )
}

/// How long nft may take to apply one line.
const NFT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The `nft -i` process that owns the table, its standard error merged into its output.
struct Nft {
    child: Child,
    stdin: ChildStdin,
    output: Lines<BufReader<ChildStdout>>,
    table: String,
}

impl Nft {
    async fn spawn(table: &str) -> Result<Nft, String> {
        // stdbuf: nft buffers its output when it is not a terminal, and each answer must be
        // read as soon as it is written.
        let mut child = Command::new("sh")
            .args(["-c", "exec stdbuf -oL nft -i 2>&1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run nft: {e}"))?;
        let stdin = child.stdin.take().ok_or("nft has no stdin")?;
        let stdout = child.stdout.take().ok_or("nft has no stdout")?;
        Ok(Nft {
            child,
            stdin,
            output: BufReader::new(stdout).lines(),
            table: table.to_owned(),
        })
    }

    /// Ends nft: its standard input closes, it exits, and the kernel deletes the table it owns.
    async fn close(self) {
        let Nft {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        if tokio::time::timeout(NFT_DEADLINE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Runs one line of commands (one transaction), then lists the trusted set: its output
    /// ends with a lone `}`, which tells that everything before was done. Any `Error:` line
    /// in between is the line's failure.
    async fn run(&mut self, commands: &str) -> Result<(), String> {
        tokio::time::timeout(NFT_DEADLINE, self.run_inner(commands))
            .await
            .unwrap_or_else(|_| Err(format!("nft did not answer within {NFT_DEADLINE:?}")))
    }

    async fn run_inner(&mut self, commands: &str) -> Result<(), String> {
        let script = format!("{commands}\nlist set inet {} trusted\n", self.table);
        self.stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("nft: {e}"))?;
        let mut errors = Vec::new();
        loop {
            match self.output.next_line().await {
                Ok(Some(line)) if line == "}" => break,
                Ok(Some(line)) => {
                    if line.starts_with("Error") || !errors.is_empty() && !line.starts_with("table")
                    {
                        errors.push(line);
                    }
                }
                Ok(None) => {
                    errors.push("nft exited (is nftables installed?)".to_owned());
                    break;
                }
                Err(e) => {
                    errors.push(e.to_string());
                    break;
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("nft: {}", errors.join(" ")))
        }
    }
}

enum Request {
    Owners(BTreeSet<(u32, u16)>),
    Trust(u32, oneshot::Sender<()>),
    Remove(oneshot::Sender<()>),
}

/// The running table: changes are applied by one task, in order.
#[derive(Clone)]
pub struct Firewall {
    tx: mpsc::UnboundedSender<Request>,
}

impl Firewall {
    /// Installs the table (an error when nft is missing or refuses) and starts the task that
    /// keeps it as desired.
    pub async fn start(mut rules: Rules) -> Result<Firewall, String> {
        // A table of the same name that an older tenement made without an owner: gone first.
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &rules.table])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let mut nft = Nft::spawn(&rules.table).await?;
        nft.run(&ruleset(&rules)).await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let (changed, done) = match request {
                    Request::Owners(owners) => {
                        let changed = rules.owners != owners;
                        rules.owners = owners;
                        (changed, None)
                    }
                    Request::Trust(uid, done) => (rules.trusted.insert(uid), Some(done)),
                    Request::Remove(done) => {
                        nft.close().await;
                        let _ = done.send(());
                        return;
                    }
                };
                if changed {
                    if let Err(e) = nft.run(&sets_update(&rules)).await {
                        tracing::error!(
                            "cannot update the firewall ({e}): tenants may reach other tenants' ports"
                        );
                    }
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        });
        Ok(Firewall { tx })
    }

    /// The (uid, port) pairs of every instance that has both.
    pub fn set_owners(&self, owners: BTreeSet<(u32, u16)>) {
        let _ = self.tx.send(Request::Owners(owners));
    }

    /// Lets `uid` reach every instance (a proxy that just connected); returns once the rule is
    /// in place, so its first request already passes.
    pub async fn trust(&self, uid: u32) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Request::Trust(uid, done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Removes the table (at a clean shutdown; the kernel would when nft exits anyway).
    pub async fn remove(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Request::Remove(done)).is_ok() {
            let _ = wait.await;
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
    fn the_ruleset_is_one_owned_table_that_rejects_strangers_on_the_range() {
        let text = ruleset(&rules());
        assert!(!text.contains('\n'), "one line, one transaction: {text}");
        assert!(text.starts_with("add table inet tenement_0123456789abcdef { flags owner; }; "));
        assert!(text.contains("th dport 20000-29999 meta skuid != @trusted meta skuid . th dport != @owners reject"), "{text}");
        assert!(text.ends_with("; add element inet tenement_0123456789abcdef trusted { 0, 65534 }; add element inet tenement_0123456789abcdef owners { 61184 . 20001, 61185 . 20002 }"), "{text}");
        let empty = Rules {
            trusted: BTreeSet::new(),
            owners: BTreeSet::new(),
            ..rules()
        };
        assert!(!ruleset(&empty).contains("add element"));
    }

    #[test]
    fn an_update_replaces_both_sets_in_one_line() {
        assert_eq!(
            sets_update(&rules()),
            "flush set inet tenement_0123456789abcdef trusted; flush set inet tenement_0123456789abcdef owners; add element inet tenement_0123456789abcdef trusted { 0, 65534 }; add element inet tenement_0123456789abcdef owners { 61184 . 20001, 61185 . 20002 }"
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

    /// Against the real nft, as root (CI): the table lives exactly as long as its owner.
    #[tokio::test]
    async fn the_table_goes_with_its_owner_and_takes_updates() {
        if !nix::unistd::geteuid().is_root() {
            panic!("needs root for nftables (CI runs the tests as root)");
        }
        let rules = Rules {
            table: format!("tenement_test_{}", std::process::id()),
            range: (20000, 20009),
            ..rules()
        };
        let listed = |table: String| async move {
            let out = Command::new("nft")
                .args(["list", "table", "inet", &table])
                .output()
                .await
                .expect("nft");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let firewall = Firewall::start(rules.clone())
            .await
            .expect("nft works here");
        assert!(listed(rules.table.clone()).await.contains("61184 . 20001"));
        firewall.trust(4242).await;
        firewall.set_owners([(61190, 20005)].into_iter().collect());
        firewall.trust(4243).await; // ordered after the owners update
        let now = listed(rules.table.clone()).await;
        assert!(now.contains("4242") && now.contains("4243"), "{now}");
        assert!(
            now.contains("61190 . 20005") && !now.contains("61184 . 20001"),
            "{now}"
        );
        firewall.remove().await;
        assert_eq!(listed(rules.table.clone()).await, "");
    }
}
