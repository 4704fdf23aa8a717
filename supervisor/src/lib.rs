//! The supervisor's library: everything `tenement-supervisor` and the exec helper
//! `tenement-exec` are made of. See ARCHITECTURE.md for the map.
//!
//! `unsafe` is denied everywhere but in [`sys`].
#![deny(unsafe_code)]

pub mod cgroup;
pub mod env_file;
pub mod exec_helper;
pub mod firewall;
pub mod journal;
pub mod lifecycle;
pub mod logs;
pub mod ownership;
pub mod ports;
pub mod probe;
pub mod procfs;
pub mod registry;
pub mod releases;
pub mod rollout;
pub mod rpc_server;
pub mod spawn;
pub mod state;
pub mod sys;
pub mod systemd;
pub mod tokens;

/// Locks `m`, also when a thread panicked while holding it: every lock here guards plain data
/// left consistent between statements, and a proxy or supervisor that stops serving over one
/// poisoned lock loses more than it protects.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
