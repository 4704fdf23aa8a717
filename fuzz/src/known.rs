//! Findings that are reported but not yet fixed, and how a long fuzz run may step over them.
//!
//! Each finding has a name and a regression file under `fuzz/regressions/<target>/`. By default
//! every check runs, so the regressions fail `smoke.sh` and `cargo test` until the code is
//! fixed. A long AFL++ run that would otherwise stop at the first known crash may set
//! `TENEMENT_FUZZ_KNOWN=name,name` (or `all`) to skip exactly those checks; docs/FUZZING.md
//! names the run that did. Skipping never applies to a plain panic of the code under test.

use std::sync::OnceLock;

/// Every finding that can be skipped, with the invariant it breaks.
pub const FINDINGS: &[(&str, &str)] = &[
    (
        "frame-closed-on-partial-prefix",
        "frame: `Closed` only when the stream ended where a frame would start",
    ),
    (
        "frame-instance-info-id-unchecked",
        "frame: every id inside a decoded message is a valid label",
    ),
    (
        "config-diagnostic-embeds-raw-text",
        "config, template: every diagnostic is one line (file text is quoted, not pasted)",
    ),
    (
        "config-empty-toml-message",
        "config: every diagnostic says what is wrong (a non-empty message)",
    ),
    (
        "http-asterisk-target-for-non-options",
        "http_head: the target is origin-form, `*` only for OPTIONS",
    ),
    (
        "http-forwarded-extends-malformed-chain",
        "http_head: behind a trusted proxy, Forwarded still ends with this hop",
    ),
    (
        "http-connection-names-read-as-utf8",
        "http_head: no header the client's Connection header named is forwarded",
    ),
];

/// Whether the check for finding `name` is to be skipped in this process.
pub fn skipped(name: &str) -> bool {
    static SKIPPED: OnceLock<Vec<String>> = OnceLock::new();
    let list = SKIPPED.get_or_init(|| {
        std::env::var("TENEMENT_FUZZ_KNOWN")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    });
    debug_assert!(
        FINDINGS.iter().any(|(n, _)| *n == name),
        "unknown finding {name}"
    );
    list.iter().any(|s| s == name || s == "all")
}
