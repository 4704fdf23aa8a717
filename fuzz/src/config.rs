//! Target `config`: `tenement.toml`, both phases (the raw TOML tree and validation), through
//! [`Config::parse`] with a fixed [`Environment`].
//!
//! The input is the file's text (lossily made UTF-8: `Config::load` refuses other files before
//! parsing). Invariants:
//! - nothing panics;
//! - either the file loads, or the error carries at least one diagnostic located
//!   `file:line:col`, and every located diagnostic points inside the text (line within the
//!   file, column within that line or just past it) and names the file;
//! - every diagnostic is one non-empty line, and the error displays as one line per diagnostic;
//! - a loaded config is what the types promise: at least one domain, each lower-case without a
//!   trailing dot; absolute directories; services keyed by their own name; declared instances
//!   of declared services, without duplicates.

use std::path::Path;

use tenement_proto::config::{Config, ConfigError, Environment};
use tenement_proto::ids::validate_label;

use crate::known;

/// Where the fuzzed file claims to be.
pub const PATH: &str = "/etc/tenement/tenement.toml";

/// What the config is validated with: the bad-config catalogue's environment (a non-root
/// user on a default Linux kernel).
pub fn environment() -> Environment {
    Environment {
        is_root: false,
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ephemeral_ports: Some(32768..=60999),
    }
}

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new(PATH), &environment()) {
        Ok(config) => check_config(&config),
        Err(error) => check_error(&text, &error),
    }
}

fn check_error(text: &str, error: &ConfigError) {
    assert!(
        error.diagnostics.iter().any(|d| d.line > 0 && d.column > 0),
        "refused without a located problem: {error:?}"
    );
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &error.diagnostics {
        assert_eq!(d.path, Path::new(PATH), "diagnostic names another file");
        if !known::skipped("config-empty-toml-message") {
            assert!(
                !d.message.trim().is_empty(),
                "diagnostic without a message: {d:?}"
            );
        }
        if !known::skipped("config-diagnostic-embeds-raw-text") {
            assert!(
                !d.message.contains('\n'),
                "diagnostic is not one line: {d:?}"
            );
        }
        if d.line == 0 {
            continue;
        }
        let Some(line) = lines.get(d.line - 1) else {
            panic!(
                "{}:{} is past the end of a {}-line file",
                d.line,
                d.column,
                lines.len()
            );
        };
        assert!(
            d.column >= 1 && d.column <= line.chars().count() + 1,
            "{}:{} is outside its {}-character line",
            d.line,
            d.column,
            line.chars().count()
        );
    }
    if !known::skipped("config-diagnostic-embeds-raw-text") {
        assert_eq!(
            error.to_string().lines().count(),
            error.diagnostics.len(),
            "the error does not display as one line per diagnostic"
        );
    }
}

fn check_config(config: &Config) {
    let settings = &config.settings;
    assert!(
        !settings.domains.is_empty(),
        "a config loaded without a domain"
    );
    for domain in &settings.domains {
        assert!(
            !domain.ends_with('.') && domain.to_ascii_lowercase() == *domain,
            "domain {domain:?} is not normalised"
        );
        for label in domain.split('.') {
            if let Err(e) = validate_label("domain label", label) {
                panic!("domain {domain:?} loaded with a bad label: {e}");
            }
        }
    }
    for dir in [
        &settings.data_dir,
        &settings.state_dir,
        &settings.runtime_dir,
    ] {
        assert!(dir.is_absolute(), "{} is not absolute", dir.display());
    }
    assert!(
        settings.port_range.start() <= settings.port_range.end(),
        "port range {:?} is backwards",
        settings.port_range
    );
    for (name, service) in &config.services {
        assert_eq!(name, &service.name, "service keyed by another name");
        assert!(
            service.workdir.is_absolute(),
            "workdir {} is not absolute",
            service.workdir.display()
        );
        assert!(!service.argv.is_empty(), "service {name} has no argv");
    }
    let mut seen = std::collections::BTreeSet::new();
    for instance in &config.instances {
        assert!(
            config.services.contains_key(&instance.service),
            "instance {instance} of an undeclared service"
        );
        assert!(seen.insert(instance), "instance {instance} declared twice");
    }
}
