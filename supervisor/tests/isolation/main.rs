//! The privileged tier of issue 4: what an instance can see and do under each isolation level,
//! asked of the app itself (`tests/fixtures/py/probe.py`) and checked against what the level
//! promises (docs/CONFIG.md, `isolation`, `user`, `network`).
//!
//! Every test runs the real `tenement-supervisor` as root with the root defaults (namespace
//! isolation, dynamic users), two tenants of one service, and asserts each probe answer. The
//! cgroup tests run the supervisor inside a delegated cgroup v2 of their own; this tier needs
//! no controllers (limits are checked in the VM tier). Without root every test fails with the
//! reason: CI runs as root, and a skipped privileged test would hide exactly what it guards.
//!
//! `cargo build --workspace && cargo test -p tenement-supervisor --test isolation`
#![allow(clippy::unwrap_used)]

#[path = "../support/mod.rs"]
mod support;

mod cgroup;
mod harness;
mod hostile;
mod ids;
mod levels;
mod users;
