//! Runs one target's `check` over files and directories, outside AFL++:
//! `replay TARGET PATH...`. Prints `TARGET: N files, M failures` and each failure; exits 1 if
//! any file failed, 2 on a usage error. `smoke.sh` replays the corpus and the regressions with
//! it; it also confirms a crash AFL++ found (`replay http_head out/http_head/default/crashes`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, paths)) = args.split_first() else {
        eprintln!("usage: replay TARGET PATH...");
        return ExitCode::from(2);
    };
    let Some(check) = tenement_fuzz::target(name) else {
        let names: Vec<&str> = tenement_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("unknown target {name}; targets: {}", names.join(", "));
        return ExitCode::from(2);
    };
    // The panic message is printed once, below, with its file.
    std::panic::set_hook(Box::new(|_| {}));
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let outcome = tenement_fuzz::replay::replay(check, &paths);
    for failure in &outcome.failures {
        println!(
            "FAILED {}:\n  {}",
            failure.file.display(),
            failure.message.replace('\n', "\n  ")
        );
    }
    println!(
        "{name}: {} files, {} failures",
        outcome.files,
        outcome.failures.len()
    );
    if outcome.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
