//! tenement's fuzz targets: one module per parser that faces a stranger, each with a plain
//! `check(data: &[u8])` that panics when an invariant breaks.
//!
//! The same functions run under AFL++ (`src/bin/<target>.rs`, built with `cargo afl build
//! --features afl`), over the seed corpus and the regressions (`src/bin/replay.rs`, used by
//! `smoke.sh`) and under `cargo test` (`tests/replay.rs`). Nothing here changes the code under
//! test: a finding is reported, never worked around silently (see [`known`]).
#![forbid(unsafe_code)]

pub mod api_request;
pub mod config;
pub mod frame;
pub mod host;
pub mod http_head;
pub mod known;
pub mod replay;
pub mod template;

/// A target's checks: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every target, by the name its binary, corpus and regression directories use.
pub const TARGETS: &[(&str, Check)] = &[
    ("host", host::check),
    ("frame", frame::check),
    ("config", config::check),
    ("template", template::check),
    ("http_head", http_head::check),
    ("api_request", api_request::check),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Check> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
