//! The catalogue of bad configs: every file in `tests/bad_configs/` starts with one or more
//! `# expect: LINE:COL: message` lines, and validating it must report exactly those
//! diagnostics, in that order, and nothing else. Files in `tests/good_configs/` and every
//! shipped `examples/*/tenement.toml` must validate.
//!
//! To add a case, write the file with a guessed expect line and run the tests: a mismatch
//! prints what was reported.

use std::fs;
use std::path::{Path, PathBuf};

use tenement_proto::config::{Config, Environment};

/// What the fixtures are validated with: a non-root user on a default Linux kernel.
fn environment() -> Environment {
    Environment {
        is_root: false,
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ephemeral_ports: Some(32768..=60999),
    }
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn catalogue_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// Validates `file`'s text as if it were `/cfg/NAME.toml`; the error is the diagnostics, one
/// per line.
fn validate_fixture(file: &Path) -> Result<Config, String> {
    let text = fs::read_to_string(file).expect("readable fixture");
    let name = file.file_name().expect("file name");
    let path = Path::new("/cfg").join(name);
    Config::parse(&text, &path, &environment()).map_err(|e| e.to_string())
}

#[test]
fn every_bad_config_reports_exactly_its_expected_diagnostics() {
    let files = toml_files(&catalogue_dir("bad_configs"));
    assert!(files.len() >= 20, "the catalogue shrank to {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("readable fixture");
        let name = file.file_name().expect("file name").to_string_lossy();
        let expected: Vec<String> = text
            .lines()
            .map_while(|l| l.strip_prefix("# expect: "))
            .map(|e| format!("/cfg/{name}:{e}"))
            .collect();
        assert!(!expected.is_empty(), "{name} has no `# expect: ` line");
        let expected = expected.join("\n");
        match validate_fixture(file) {
            Ok(_) => failures.push(format!("{name}: accepted, expected\n{expected}")),
            Err(actual) if actual != expected => {
                failures.push(format!(
                    "{name}:\n  expected: {expected}\n  actual:   {actual}"
                ));
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn independent_errors_in_one_file_are_all_reported() {
    let file = catalogue_dir("bad_configs").join("three_independent_errors.toml");
    let err = validate_fixture(&file).expect_err("invalid config");
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn good_configs_and_shipped_examples_validate() {
    let mut files = toml_files(&catalogue_dir("good_configs"));
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for entry in fs::read_dir(&examples).expect("examples directory") {
        let config = entry.expect("directory entry").path().join("tenement.toml");
        if config.exists() {
            files.push(config);
        }
    }
    assert!(
        files.iter().any(|f| f.starts_with(&examples)),
        "no example config found"
    );
    for file in &files {
        if let Err(e) = validate_fixture(file) {
            panic!("{} should be valid:\n{e}", file.display());
        }
    }
}

#[test]
fn truncated_fixtures_never_panic_the_validator() {
    let mut files = toml_files(&catalogue_dir("bad_configs"));
    files.extend(toml_files(&catalogue_dir("good_configs")));
    for file in &files {
        let text = fs::read_to_string(file).expect("readable fixture");
        for (end, _) in text.char_indices() {
            let _ = Config::parse(&text[..end], Path::new("/cfg/t.toml"), &environment());
            let _ = Config::parse(&text[end..], Path::new("/cfg/t.toml"), &environment());
        }
    }
}
