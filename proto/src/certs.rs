//! What the proxy tells operators about its ACME certificates: `status.json` in its state
//! directory, written by the proxy whenever something changes and read by `tenctl certs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One name the proxy holds or wants a certificate for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NameStatus {
    pub name: String,
    /// Unix seconds; `None`: no certificate yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// When it will be renewed (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<u64>,
    /// Consecutive failed orders, and the last one's reason and when the next may be placed.
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// The name is no longer tenement's (its instance was removed): not renewed.
    #[serde(default)]
    pub abandoned: bool,
}

/// The whole of `status.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcmeStatus {
    /// The CA's directory URL.
    pub directory: String,
    pub orders_last_hour: usize,
    pub orders_last_week: usize,
    pub orders_per_hour: u32,
    pub orders_per_week: u32,
    /// Sorted by name.
    pub names: Vec<NameStatus>,
}

/// `https://acme-v02.api.letsencrypt.org/directory` -> `acme-v02.api.letsencrypt.org-directory`:
/// one directory per CA, so certificates of a staging CA are never served under production.
pub fn directory_slug(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let slug: String = rest
        .trim_end_matches('/')
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    slug.trim_start_matches('.').to_owned()
}

/// Where the proxy keeps what it has from the CA at `directory`: `<state>/acme/<slug>`.
pub fn acme_dir(state_dir: &Path, directory: &str) -> PathBuf {
    state_dir.join("acme").join(directory_slug(directory))
}

/// The status file under [`acme_dir`].
pub const STATUS_FILE: &str = "status.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_slugs_are_one_safe_path_component() {
        assert_eq!(
            directory_slug("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(
            directory_slug("https://127.0.0.1:14000/dir"),
            "127.0.0.1-14000-dir"
        );
        assert_eq!(directory_slug("https://x/../../etc"), "x-..-..-etc");
        assert!(!directory_slug("https://../a").contains('/'));
        assert_ne!(directory_slug("https://../a"), "..");
    }
}
