//! Which client connections the proxy takes, and when (the connection caps).
//!
//! - At most `max_connections` at once: the accept loop takes a slot *before* it accepts, so
//!   beyond the cap new connections wait in the kernel's listen backlog (backpressure) instead
//!   of being accepted and starving everyone of descriptors and memory. Each held connection
//!   costs at most one request head (64 KiB) of buffer, so the cap bounds that memory too.
//! - At most `max_connections_per_client` from one address: one client cannot take the
//!   slots of everybody else; its connections past the cap are closed at once.
//!
//! Pure bookkeeping, no I/O: the accept loop in `main.rs` asks, the ticket it gets back gives
//! everything back when the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::lock;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    per_client_max: u32,
}

/// One admitted connection: its slot and its place in its client's count, both given back
/// when dropped.
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Admission {
    pub fn new(max_connections: u32, per_client_max: u32) -> Arc<Admission> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(max_connections as usize)),
            per_client: Mutex::new(HashMap::new()),
            per_client_max,
        })
    }

    /// Waits for a free slot: call before accepting.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        match self.slots.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Admits a connection from `client` on `slot`, or `None` when that client already holds
    /// its share (the caller closes the connection).
    pub fn admit(self: &Arc<Self>, slot: OwnedSemaphorePermit, client: IpAddr) -> Option<Ticket> {
        let client = client.to_canonical();
        let mut counts = lock(&self.per_client);
        let count = counts.entry(client).or_insert(0);
        if *count >= self.per_client_max {
            return None;
        }
        *count += 1;
        Some(Ticket {
            _slot: slot,
            admission: self.clone(),
            client,
        })
    }

    /// Connections `client` holds now.
    pub fn held_by(&self, client: IpAddr) -> u32 {
        lock(&self.per_client)
            .get(&client.to_canonical())
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = lock(&self.admission.per_client);
        if let Some(count) = counts.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// How many unknown tenants of `auto_spawn` services one client address may ask for: a
/// burst of [`NEW_TENANT_BURST`], then one every [`NEW_TENANT_EVERY`] (a token bucket).
pub const NEW_TENANT_BURST: f64 = 10.0;
pub const NEW_TENANT_EVERY: std::time::Duration = std::time::Duration::from_secs(6);

/// The rate limit per client address on requests that would create an instance.
#[derive(Default)]
pub struct NewTenantLimit {
    buckets: Mutex<HashMap<IpAddr, (f64, std::time::Instant)>>,
}

impl NewTenantLimit {
    /// Takes a token for `client` at `now`; false when it has none left.
    pub fn allow(&self, client: IpAddr, now: std::time::Instant) -> bool {
        let mut buckets = lock(&self.buckets);
        if buckets.len() > 100_000 {
            // Forget clients whose bucket is full again.
            let full_after = NEW_TENANT_EVERY.mul_f64(NEW_TENANT_BURST);
            buckets.retain(|_, (_, at)| now.duration_since(*at) < full_after);
        }
        let (tokens, at) = buckets
            .entry(client.to_canonical())
            .or_insert((NEW_TENANT_BURST, now));
        let refill = now.duration_since(*at).as_secs_f64() / NEW_TENANT_EVERY.as_secs_f64();
        *tokens = (*tokens + refill).min(NEW_TENANT_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The uids tenants run as, so that a connection from this host can be told apart: a TLS
/// terminator on loopback may be a trusted proxy, a tenant on loopback never is.
#[derive(Debug, Clone, Default)]
pub struct TenantUids {
    pub dynamic: Option<std::ops::RangeInclusive<u32>>,
    /// Named users of services, root included when a service runs as root.
    pub named: std::collections::HashSet<u32>,
}

impl TenantUids {
    pub fn contains(&self, uid: u32) -> bool {
        self.dynamic.as_ref().is_some_and(|r| r.contains(&uid)) || self.named.contains(&uid)
    }

    /// Whether the loopback connection `stream` comes from a tenant's socket (sock_diag
    /// names the uid of the client's socket). When that cannot be told, it is treated as one.
    pub fn is_tenant(&self, stream: &tokio::net::TcpStream) -> bool {
        let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) else {
            return true;
        };
        match tenement_proto::sockdiag::tcp_peer(local, remote) {
            Ok(Some(owner)) => self.contains(owner.uid),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_gets_its_share_and_gets_it_back() {
        let admission = Admission::new(10, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = admission.admit(admission.slot().await, a).expect("1st");
        let _second = admission.admit(admission.slot().await, a).expect("2nd");
        assert!(
            admission.admit(admission.slot().await, a).is_none(),
            "3rd from a"
        );
        let _other = admission
            .admit(admission.slot().await, b)
            .expect("b has its own share");
        assert_eq!(admission.held_by(a), 2);
        drop(first);
        assert_eq!(admission.held_by(a), 1);
        assert!(admission.admit(admission.slot().await, a).is_some());
        // IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(admission.held_by(mapped), 1);
    }

    #[test]
    fn new_tenants_per_client_come_in_a_burst_then_at_a_rate() {
        let limit = NewTenantLimit::default();
        let t0 = std::time::Instant::now();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let granted = (0..20).filter(|_| limit.allow(a, t0)).count();
        assert_eq!(granted, NEW_TENANT_BURST as usize);
        assert!(limit.allow(b, t0), "another client has its own bucket");
        assert!(!limit.allow(a, t0 + NEW_TENANT_EVERY / 2));
        assert!(limit.allow(a, t0 + NEW_TENANT_EVERY));
        assert!(!limit.allow(a, t0 + NEW_TENANT_EVERY));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_global_cap_a_new_connection_waits_for_a_slot() {
        let admission = Admission::new(2, 10);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let one = admission.admit(admission.slot().await, ip).expect("one");
        let _two = admission.admit(admission.slot().await, ip).expect("two");
        let waiting = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.slot().await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "a third slot was given past the cap"
        );
        drop(one);
        let slot = waiting
            .await
            .expect("the waiting accept gets the freed slot");
        assert!(admission.admit(slot, ip).is_some());
    }
}
