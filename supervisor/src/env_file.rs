//! A service's `env_file`: where its secrets live, read by the supervisor only, at each start.
//!
//! The config file is readable by the proxy and by tenctl, and (under `process` isolation) by
//! tenants, so a secret in `env` is not secret. An env file belongs to the supervisor's user
//! and nobody else may read it; inside `namespace` and `sandbox` instances it is covered, like
//! the config file. The format is systemd's EnvironmentFile= in its simple form: `KEY=VALUE`
//! lines, `#` comments, blank lines, an optional `export `, and quotes around a value removed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Reads `path`, refusing a file another user could read or change.
pub fn load(path: &Path, owner: u32) -> Result<Vec<(String, String)>, String> {
    let shown = path.display();
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot read env_file {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "env_file {shown} is not a regular file (a symlink or a directory)"
        ));
    }
    if meta.uid() != owner {
        return Err(format!(
            "env_file {shown} belongs to uid {}, not the supervisor's ({owner}); chown it",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "env_file {shown} can be read or changed by other users (mode {mode:04o}); chmod 600 it"
        ));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read env_file {shown}: {e}"))?;
    parse(&text).map_err(|(line, why)| format!("env_file {shown}:{line}: {why}"))
}

/// The variables of an env file's text, or the 1-based line of the first problem and why.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((index + 1, "expected KEY=VALUE".to_owned()));
        };
        let key = key.trim();
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                index + 1,
                format!("{key:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            ));
        }
        let value = value.trim();
        let unquoted = ['"', '\''].iter().find_map(|&q| {
            value
                .strip_prefix(q)
                .and_then(|v| v.strip_suffix(q))
                .filter(|_| value.len() >= 2)
        });
        vars.push((key.to_owned(), unquoted.unwrap_or(value).to_owned()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lines_comments_export_and_quotes() {
        let text = "# secrets\n\nAPI_KEY=abc=def\nexport DB_URL=\"postgres://x\"\n  SPACED = ' v '\nEMPTY=\n";
        assert_eq!(
            parse(text).expect("valid"),
            [
                ("API_KEY".to_owned(), "abc=def".to_owned()),
                ("DB_URL".to_owned(), "postgres://x".to_owned()),
                ("SPACED".to_owned(), " v ".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        assert_eq!(parse("OK=1\nnot a pair\n").map_err(|e| e.0), Err(2));
        assert_eq!(parse("9LIVES=1\n").map_err(|e| e.0), Err(1));
        assert_eq!(parse("A-B=1\n").map_err(|e| e.0), Err(1));
    }

    #[test]
    fn a_file_others_can_read_or_that_is_not_ours_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notes.env");
        std::fs::write(&path, "SECRET=1\n").expect("write");
        let me = nix::unistd::geteuid().as_raw();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = load(&path, me).expect_err("world-readable");
        assert!(
            error.contains("mode 0644") && error.contains("chmod 600"),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            load(&path, me).expect("private"),
            [("SECRET".to_owned(), "1".to_owned())]
        );
        let error = load(&path, me + 1).expect_err("another owner");
        assert!(error.contains("chown"), "{error}");
        let link = dir.path().join("link.env");
        std::os::unix::fs::symlink(&path, &link).expect("ln");
        assert!(load(&link, me)
            .expect_err("symlink")
            .contains("not a regular file"));
    }
}
