//! What a process uses, read from `/proc` (proc(5)): a daemon's own resident memory, open
//! files and CPU time for the metrics, and the units those files count in.

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;

/// Bytes per page (the unit of `statm` and of `rss` in `stat`).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
}

/// Clock ticks per second (the unit of `utime` and `stime` in `stat`).
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |n| n as f64)
}

/// One process's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub rss_bytes: u64,
    pub open_fds: u64,
    /// User and system CPU time.
    pub cpu_seconds: f64,
}

/// `(utime + stime, rss pages)` from the text of `/proc/PID/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_usage(text: &str) -> Option<(u64, u64)> {
    let rest: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // rest[0] is field 3 (state): field N is rest[N - 3]; utime 14, stime 15, rss 24.
    let user: u64 = rest.get(11)?.parse().ok()?;
    let system: u64 = rest.get(12)?.parse().ok()?;
    let rss: u64 = rest.get(21)?.parse().ok()?;
    Some((user + system, rss))
}

/// The calling process's own figures; a file that cannot be read counts as 0.
///
/// CPU time comes from getrusage(2), in microseconds: `stat` counts whole clock ticks (10 ms
/// here), so a daemon that has just started would read 0 there.
pub fn own() -> Usage {
    let rss_pages = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat_usage(&t))
        .map_or(0, |(_, rss)| rss);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let cpu_seconds = getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |usage| {
        seconds(usage.user_time()) + seconds(usage.system_time())
    });
    Usage {
        rss_bytes: rss_pages * page_size(),
        // read_dir's own descriptor is in the listing.
        open_fds: open_fds.saturating_sub(1),
        cpu_seconds,
    }
}

fn seconds(time: TimeVal) -> f64 {
    time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A name with spaces and a ')' of its own; utime 7, stime 5, rss 321.
        let line = "42 (a ) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 1234 100000 321 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat_usage(line), Some((12, 321)));
        assert_eq!(parse_stat_usage("42 (short) S 1"), None);
    }

    #[test]
    fn own_figures_are_plausible() {
        let usage = own();
        assert!(usage.rss_bytes > 0);
        // Microseconds, not clock ticks: some CPU has been spent by now, even so early.
        assert!(usage.cpu_seconds > 0.0, "{usage:?}");
        assert!(
            usage.open_fds >= 3,
            "stdin, stdout, stderr at least: {usage:?}"
        );
    }
}
