//! The open-file limit of the two daemons. Each keeps a descriptor per connection (the proxy:
//! clients and upstreams; the supervisor: RPC clients and each running instance's pipes and
//! sockets). systemd starts services with a soft limit of 1024, for programs still using
//! select(2), and a high hard limit for the others to raise the soft one to.

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// Raises the soft limit on open files to the hard one. Returns the soft limit found, which
/// is what programs started from here should get back.
pub fn raise_nofile_limit() -> nix::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // An unlimited hard limit cannot be passed: the kernel caps descriptors at fs.nr_open and
    // refuses a higher soft limit.
    let target = if hard == RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    Ok(soft)
}
