//! tenement-proxy as a library: the binary (`src/main.rs`) takes its sockets, drops privilege
//! and runs these modules; the fuzz targets (`fuzz/`) and tests drive the same code.
//!
//! Invariants of every module here: no `unsafe`, no fork, no capability, and a warm request
//! makes no RPC.
#![forbid(unsafe_code)]

pub mod acme;
pub mod admission;
pub mod api;
pub mod dashboard;
pub mod fleet;
pub mod forward;
pub mod head;
pub mod host;
pub mod link;
pub mod listeners;
pub mod metrics;
pub mod pool;
pub mod privilege;
pub mod recent;
pub mod relay;
pub mod respond;
pub mod server;
pub mod table;
pub mod tls;
pub mod workers;

/// Locks `m`, also when a thread panicked while holding it: every lock here guards plain data
/// left consistent between statements, and a proxy or supervisor that stops serving over one
/// poisoned lock loses more than it protects.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
