//! Replaying files through a target's `check`: the seed corpus, the regressions and whatever a
//! fuzz run found, outside AFL++, each file caught on its own so one failure does not hide
//! the next.

use std::path::{Path, PathBuf};

/// One file whose check failed, with the panic message.
#[derive(Debug)]
pub struct Failure {
    pub file: PathBuf,
    pub message: String,
}

/// What replaying a set of files gave.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: usize,
    pub failures: Vec<Failure>,
}

/// The files under each of `paths` (a path may be a file), in name order. Hidden files,
/// `*.md` notes and AFL++'s `README.txt` are skipped; a missing directory holds nothing.
pub fn inputs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files);
    }
    files.sort();
    files
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // AFL++ leaves a README.txt beside the crashes it saves.
    if name.starts_with('.') || name.ends_with(".md") || name == "README.txt" {
        return;
    }
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            collect(&entry.path(), files);
        }
    } else if path.is_file() {
        files.push(path.to_path_buf());
    }
}

/// Runs `check` over every file under `paths`.
pub fn replay(check: fn(&[u8]), paths: &[PathBuf]) -> Outcome {
    let mut outcome = Outcome::default();
    for file in inputs(paths) {
        let data = match std::fs::read(&file) {
            Ok(data) => data,
            Err(e) => {
                outcome.failures.push(Failure {
                    message: format!("cannot read: {e}"),
                    file,
                });
                continue;
            }
        };
        outcome.files += 1;
        if let Err(payload) = std::panic::catch_unwind(|| check(&data)) {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic with a non-text payload".to_owned());
            outcome.failures.push(Failure { file, message });
        }
    }
    outcome
}
