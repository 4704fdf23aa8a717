//! `tenctl certs`: every certificate the proxy serves, from the files of `[settings.tls]`
//! (read here) and from ACME (the proxy's `status.json`), with what is wrong.

use std::io::Write;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tenement_proto::certs::{acme_dir, AcmeStatus, STATUS_FILE};
use tenement_proto::config::CertificateFiles;

use crate::commands::{environment, Context};
use crate::render;

/// One file certificate as read now.
struct FileCert {
    path: String,
    names: Vec<String>,
    not_after: Option<u64>,
    error: Option<String>,
}

fn read_file_cert(files: &CertificateFiles) -> FileCert {
    let path = files.cert.display().to_string();
    let parsed = std::fs::read(&files.cert)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            let (_, pem) =
                x509_parser::pem::parse_x509_pem(&bytes).map_err(|e| format!("not PEM: {e}"))?;
            let cert = pem
                .parse_x509()
                .map_err(|e| format!("not a certificate: {e}"))?;
            let mut names = Vec::new();
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for name in &san.value.general_names {
                    if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                        names.push((*d).to_owned());
                    }
                }
            }
            let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
            Ok((names, not_after))
        });
    match parsed {
        Ok((names, not_after)) => FileCert {
            path,
            names,
            not_after: Some(not_after),
            error: None,
        },
        Err(e) => FileCert {
            path,
            names: Vec::new(),
            not_after: None,
            error: Some(e),
        },
    }
}

/// "in 89 days", "in 40 s", "2 days ago".
fn relative(at: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
    let now = SystemTime::now();
    let (span, future) = match at.duration_since(now) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let text = if span >= Duration::from_secs(2 * 86_400) {
        format!("{} days", span.as_secs() / 86_400)
    } else if span >= Duration::from_secs(2 * 3600) {
        format!("{} h", span.as_secs() / 3600)
    } else {
        format!("{} s", span.as_secs())
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// `tenctl certs`.
pub fn certs(ctx: &Context, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    if ctx.remote.is_some() {
        return Err(crate::commands::UsageError(
            "certs reads the proxy's files on its own machine; run it there (the metrics' tenement_certificate_expiry_seconds shows the same from afar)".to_owned(),
        )
        .into());
    }
    let config = ctx.load_config()?;
    let tls = &config.settings.tls;
    let files: Vec<FileCert> = tls.certificates.iter().map(read_file_cert).collect();
    let acme = match &tls.acme {
        Some(acme) => {
            let dir = acme.state_dir(environment().is_root).ok_or_else(|| {
                anyhow::anyhow!("no state directory for ACME: set [settings.tls] acme_state_dir")
            })?;
            let path = acme_dir(&dir, &acme.directory).join(STATUS_FILE);
            let status = match std::fs::read(&path) {
                Ok(bytes) => Some(
                    serde_json::from_slice::<AcmeStatus>(&bytes)
                        .map_err(|e| anyhow::anyhow!("{} cannot be read: {e}", path.display()))?,
                ),
                // Not written yet: the proxy has not run with ACME on.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "cannot read {}: {e} (run as root or as the proxy's user)",
                        path.display()
                    ))
                }
            };
            Some((acme.directory.clone(), path, status))
        }
        None => None,
    };
    if json {
        let files: Vec<_> = files
            .iter()
            .map(|f| {
                json!({ "file": f.path, "names": f.names, "not_after": f.not_after, "error": f.error })
            })
            .collect();
        let acme = acme.as_ref().map(|(directory, path, status)| {
            json!({ "directory": directory, "status_file": path, "status": status })
        });
        writeln!(out, "{}", json!({ "files": files, "acme": acme }))?;
        return Ok(());
    }
    if files.is_empty() && acme.is_none() {
        writeln!(
            out,
            "no certificates: list files in [settings.tls] certificates, or set acme_email for certificates from ACME"
        )?;
        return Ok(());
    }
    for f in &files {
        match (&f.error, f.not_after) {
            (Some(e), _) => writeln!(out, "{}: cannot be read: {}", f.path, render::sanitize(e))?,
            (None, Some(at)) => writeln!(
                out,
                "{}  {}  expires {}",
                f.path,
                f.names.join(","),
                relative(at)
            )?,
            (None, None) => {}
        }
    }
    if let Some((directory, path, status)) = &acme {
        let Some(status) = status else {
            writeln!(
                out,
                "ACME from {directory}: no status yet ({} is written by the proxy once it runs with ACME on)",
                path.display()
            )?;
            return Ok(());
        };
        writeln!(
            out,
            "ACME from {directory}: {} orders in the last hour (at most {}), {} in the last 7 days (at most {})",
            status.orders_last_hour, status.orders_per_hour, status.orders_last_week, status.orders_per_week
        )?;
        let width = status
            .names
            .iter()
            .map(|n| n.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            out,
            "{:width$}  {:16}  {:16}  STATE",
            "NAME", "EXPIRES", "RENEWAL"
        )?;
        for name in &status.names {
            let state = if name.abandoned {
                "not renewed: no longer tenement's".to_owned()
            } else if name.failures > 0 {
                format!(
                    "{} failed: {}; next try {}",
                    name.failures,
                    render::sanitize(name.last_error.as_deref().unwrap_or("")),
                    name.retry_at.map_or_else(|| "-".to_owned(), relative)
                )
            } else {
                "ok".to_owned()
            };
            writeln!(
                out,
                "{:width$}  {:16}  {:16}  {state}",
                name.name,
                name.not_after.map_or_else(|| "-".to_owned(), relative),
                name.renew_at.map_or_else(|| "-".to_owned(), relative),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_say_them() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        assert_eq!(relative(now + 90 * 86_400 + 60), "in 90 days");
        assert!(relative(now + 40).ends_with(" s"));
        assert!(relative(now - 3 * 86_400).ends_with("days ago"));
    }
}
