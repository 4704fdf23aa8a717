//! When a host must stop serving: before its lease can have expired in etcd.
//!
//! etcd expires a lease `ttl` after the leader last received a renewal; that is after the
//! renewal was sent. So a host whose last acknowledged renewal was sent at `t` still holds its
//! lease until at least `t + ttl`, and fences itself at `t + ttl - margin`, with a margin for
//! the time it takes to stop serving. The controller moves a gone host's tenants only after
//! the lease expired and a grace period passed, so the two never overlap.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct LeaseClock {
    ttl: Duration,
}

impl LeaseClock {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often the lease is renewed: three times per lease, so one lost renewal is no harm.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Time kept in hand to stop serving before the lease can have expired.
    pub fn margin(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(500))
    }

    /// The moment this host must have fenced itself, given that a renewal sent at `sent` was
    /// acknowledged with `granted` seconds left (etcd answers 0 for an expired lease).
    pub fn deadline(&self, sent: Instant, granted: Duration) -> Instant {
        sent + granted.saturating_sub(self.margin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_comes_before_the_lease_can_expire_with_renewals_to_spare() {
        let t = Instant::now();
        for secs in [2, 3, 10, 300] {
            let clock = LeaseClock::new(Duration::from_secs(secs));
            let ttl = clock.ttl();
            let deadline = clock.deadline(t, ttl);
            assert!(deadline < t + ttl, "{secs}");
            // at least two renewals fit between an acknowledged one and the deadline
            assert!(t + clock.renew_every() * 2 < deadline, "{secs}");
            assert!(clock.margin() >= Duration::from_millis(500));
        }
        let clock = LeaseClock::new(Duration::from_secs(3));
        assert_eq!(clock.deadline(t, Duration::ZERO), t);
        assert_eq!(
            clock.deadline(t, Duration::from_secs(3)),
            t + Duration::from_millis(2250)
        );
    }
}
