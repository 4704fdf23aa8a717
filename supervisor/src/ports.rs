//! Port allocation: each instance gets a loopback port from `port_range` that stays its own
//! across restarts of the instance and of the supervisor (it is kept in the registry).
//!
//! The range is checked against the kernel's ephemeral range when the config is validated, so
//! an outgoing connection of some other program cannot be holding an instance's port by chance.
//! Before each start the supervisor checks the port is still bindable; if something else took
//! it the instance moves to a new port rather than route a tenant to a stranger.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;

/// Which ports of the range are taken by registered instances.
#[derive(Debug)]
pub struct PortAllocator {
    range: RangeInclusive<u16>,
    used: BTreeSet<u16>,
    /// Where the next search starts, so allocation is O(1) amortised for sequential adds.
    cursor: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no free port left in port_range {start}-{end}; widen port_range or remove instances")]
pub struct PortsExhausted {
    pub start: u16,
    pub end: u16,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let cursor = *range.start();
        Self {
            range,
            used: BTreeSet::new(),
            cursor,
        }
    }

    /// Marks a port loaded from the registry as taken. Returns false if it is outside the range
    /// (the config changed) or already taken by another instance.
    pub fn claim(&mut self, port: u16) -> bool {
        self.range.contains(&port) && self.used.insert(port)
    }

    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    /// A free port of the range, skipping those `usable` refuses.
    pub fn allocate(&mut self, mut usable: impl FnMut(u16) -> bool) -> Result<u16, PortsExhausted> {
        let (start, end) = (*self.range.start(), *self.range.end());
        let len = u32::from(end - start) + 1;
        let mut port = self.cursor.clamp(start, end);
        for _ in 0..len {
            if !self.used.contains(&port) && usable(port) {
                self.used.insert(port);
                self.cursor = if port == end { start } else { port + 1 };
                return Ok(port);
            }
            port = if port == end { start } else { port + 1 };
        }
        Err(PortsExhausted { start, end })
    }
}

/// Whether `127.0.0.1:port` can be bound right now.
pub fn bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_used_and_unusable_ports_and_wraps() {
        let mut ports = PortAllocator::new(100..=104);
        assert!(ports.claim(100));
        assert!(!ports.claim(100), "a port is claimed once");
        assert!(!ports.claim(99), "outside the range");
        assert_eq!(ports.allocate(|p| p != 101), Ok(102));
        assert_eq!(ports.allocate(|_| true), Ok(103));
        assert_eq!(ports.allocate(|_| true), Ok(104));
        assert_eq!(ports.allocate(|_| true), Ok(101), "wraps to the start");
        assert_eq!(
            ports.allocate(|_| true),
            Err(PortsExhausted {
                start: 100,
                end: 104
            })
        );
        ports.release(102);
        assert_eq!(ports.allocate(|_| true), Ok(102));
    }

    #[test]
    fn a_bound_port_is_not_bindable() {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        assert!(!bindable(port));
        drop(held);
    }

    #[test]
    fn the_kernel_range_is_readable() {
        let range =
            tenement_proto::config::ephemeral_range().expect("linux exposes ip_local_port_range");
        assert!(range.start() <= range.end());
    }
}
