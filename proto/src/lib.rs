//! tenement-proto: everything that crosses a tenement process boundary.
//!
//! - [`ids`]: validated service names, tenant ids and instance ids.
//! - [`api`]: the management API's HTTP form of each call, both ways.
//! - [`auth`]: management API tokens: scopes, ids and the form a caller holds.
//! - [`display`]: durations and dates as tenctl and the dashboard show them.
//! - [`rpc`]: the messages of the supervisor's two RPC roles (proxy and admin).
//! - [`frame`]: length-prefixed JSON framing with a size cap checked before allocation.
//! - [`config`]: `tenement.toml`, parsed strictly and validated with file:line errors.
//!
//! This crate depends on no other tenement crate and does no I/O beyond reading and writing the
//! streams and files it is handed.
//!
//! # Compatibility rules
//!
//! The RPC is spoken between binaries of possibly different releases during an upgrade (the
//! proxy and supervisor restart independently), so:
//!
//! 1. Every connection starts with `hello { version }`. The supervisor answers with its own
//!    version; a client whose major protocol version differs gets `unsupported_version` and
//!    the connection is closed. [`rpc::PROTOCOL_VERSION`] is bumped only for changes that
//!    break rule 2 or 3.
//! 2. New request and response types and new optional fields (`#[serde(default)]`) may be
//!    added within a version. Unknown request types get `bad_request`, never a crash. Fields
//!    are never renamed or retyped within a version.
//! 3. Error codes are a closed, additive list; clients treat an unknown code as `internal`.
//! 4. The golden files in `proto/tests/golden/` pin the wire format; a change to them is a
//!    protocol change and must follow the rules above.
//! 5. Config keys are stable across releases: a key is never renamed, only added; a removed
//!    key keeps being accepted with a deprecation warning for one release.
//! 6. An answer that grows with the number of instances comes in several messages, and its
//!    type says whether more follow (`routes` until `complete`, `instances` and `stats` with
//!    `more`).
//!    `list` became such an answer within version 1: a `tenctl` from before reads the first
//!    250 instances only. tenctl ships in the same package as the supervisor, so only a copy
//!    kept from an older release is affected.
#![forbid(unsafe_code)]

pub mod api;
pub mod atomic;
pub mod auth;
pub mod certs;
pub mod config;
pub mod display;
pub mod frame;
pub mod ids;
#[cfg(feature = "rlimit")]
pub mod rlimit;
pub mod rpc;
#[cfg(feature = "sockdiag")]
pub mod sockdiag;
#[cfg(feature = "usage")]
pub mod usage;

pub use ids::{IdError, InstanceId, ServiceName, TenantId};

/// The wall clock in Unix milliseconds, as every timestamp tenement writes (logs, records,
/// placements) carries it; 0 before 1970.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
