//! The proxy holds no privilege: started as root it must be told which user to become, and
//! then really becomes it (setgroups, setgid, setuid, verified); started as anyone else it
//! refuses to run with a capability.

use anyhow::{bail, Context};
use caps::CapSet;
use nix::unistd::{Gid, Uid, User};

pub fn ensure_unprivileged(user: Option<&str>) -> anyhow::Result<()> {
    let root = nix::unistd::geteuid().is_root() || nix::unistd::getuid().is_root();
    match (root, user) {
        (true, None) => {
            bail!("refusing to run as root; pass --user NAME to drop to an unprivileged user")
        }
        (true, Some(name)) => drop_to(name)?,
        (false, Some(name)) => {
            let me = nix::unistd::geteuid();
            let wanted = lookup(name)?;
            if wanted.uid != me {
                bail!("--user {name} needs root to switch users; already running as uid {me}");
            }
        }
        (false, None) => {}
    }
    let effective = caps::read(None, CapSet::Effective).context("cannot read capabilities")?;
    let permitted = caps::read(None, CapSet::Permitted).context("cannot read capabilities")?;
    if !effective.is_empty() || !permitted.is_empty() {
        bail!("refusing to run with capabilities {effective:?}; tenement-proxy needs none");
    }
    Ok(())
}

fn lookup(name: &str) -> anyhow::Result<User> {
    User::from_name(name)
        .with_context(|| format!("cannot look up user {name}"))?
        .with_context(|| format!("no such user {name}"))
}

fn drop_to(name: &str) -> anyhow::Result<()> {
    let user = lookup(name)?;
    if user.uid.is_root() {
        bail!("--user {name} is root; pick an unprivileged user");
    }
    nix::unistd::setgroups(&[user.gid]).context("setgroups")?;
    nix::unistd::setgid(user.gid).context("setgid")?;
    nix::unistd::setuid(user.uid).context("setuid")?;
    // Verify: every id is the user's, and going back is impossible.
    if nix::unistd::getuid() != user.uid
        || nix::unistd::geteuid() != user.uid
        || nix::unistd::getgid() != user.gid
        || nix::unistd::getegid() != user.gid
    {
        bail!("privilege drop to {name} did not take");
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok()
        || nix::unistd::setgid(Gid::from_raw(0)).is_ok()
    {
        bail!("privilege drop to {name} is reversible; refusing to run");
    }
    Ok(())
}
