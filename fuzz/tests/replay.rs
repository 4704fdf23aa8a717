//! Every file of the seed corpus and of the regressions, through its target's `check`: what
//! `smoke.sh` replays, as an ordinary `cargo test` inside `fuzz/`.

use std::path::{Path, PathBuf};

fn replay(target: &str) {
    let check = tenement_fuzz::target(target).expect("a known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus").join(target);
    let paths: Vec<PathBuf> = vec![corpus.clone(), root.join("regressions").join(target)];
    let outcome = tenement_fuzz::replay::replay(check, &paths);
    assert!(
        !tenement_fuzz::replay::inputs(&[corpus]).is_empty(),
        "the {target} corpus is empty"
    );
    let report: Vec<String> = outcome
        .failures
        .iter()
        .map(|f| format!("{}: {}", f.file.display(), f.message))
        .collect();
    assert!(report.is_empty(), "\n{}", report.join("\n"));
}

#[test]
fn host_corpus_and_regressions_pass() {
    replay("host");
}

#[test]
fn frame_corpus_and_regressions_pass() {
    replay("frame");
}

#[test]
fn config_corpus_and_regressions_pass() {
    replay("config");
}

#[test]
fn template_corpus_and_regressions_pass() {
    replay("template");
}

#[test]
fn http_head_corpus_and_regressions_pass() {
    replay("http_head");
}

#[test]
fn api_request_corpus_and_regressions_pass() {
    replay("api_request");
}
