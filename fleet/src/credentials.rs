//! `tenement-fleet credentials`: the fleet credential, made with rcgen. The fleet has a CA
//! of its own (made once, `ca.pem` and `ca.key`); each host gets a certificate from it naming
//! the host and its `[fleet] address` IP, good for both ends of a TLS connection. The proxies
//! accept requests only from holders of such a certificate, and hand requests only to them.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tenement_proto::atomic::write_atomically;
use tenement_proto::config::Fleet;
use time::{Duration, OffsetDateTime};

/// How long the fleet's CA lasts.
const CA_DAYS: i64 = 3650;

/// What `credentials` wrote.
#[derive(Debug)]
pub struct Made {
    /// Whether the CA was made now (rather than found in the directory).
    pub new_ca: bool,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes the CA in `dir` unless it is there, then a certificate and key for `host` at `ip`,
/// valid for `days`. An existing host certificate is replaced only with `replace`.
pub fn make(dir: &Path, host: &str, ip: IpAddr, days: u32, replace: bool) -> anyhow::Result<Made> {
    if !Fleet::valid_host(host) {
        anyhow::bail!(
            "host {host:?} is not a host name: use 1-63 of a-z, 0-9 and '-', as in [fleet] host"
        );
    }
    if ip.is_unspecified() || ip.is_multicast() {
        anyhow::bail!("{ip} is not a host's address; give the IP of its [fleet] address");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let cert_path = dir.join(format!("{host}.pem"));
    let key_path = dir.join(format!("{host}.key"));
    if !replace && (cert_path.exists() || key_path.exists()) {
        anyhow::bail!(
            "{} already has a certificate for {host}; pass --replace to make a new one",
            dir.display()
        );
    }
    let now = OffsetDateTime::now_utc();
    let new_ca = !ca_key_path.exists();
    let (ca_pem, ca_key) = if new_ca {
        if ca_pem_path.exists() {
            anyhow::bail!(
                "{} is there without {}; the CA's key is needed to sign (move ca.pem away to start a new fleet CA)",
                ca_pem_path.display(),
                ca_key_path.display()
            );
        }
        let key = KeyPair::generate().context("cannot make the CA's key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "tenement fleet CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_DAYS);
        let cert = params.self_signed(&key).context("cannot make the CA")?;
        write_atomically(&ca_key_path, key.serialize_pem().as_bytes())
            .with_context(|| format!("cannot write {}", ca_key_path.display()))?;
        write_public(&ca_pem_path, &cert.pem())?;
        (cert.pem(), key)
    } else {
        let pem = std::fs::read_to_string(&ca_pem_path)
            .with_context(|| format!("cannot read {}", ca_pem_path.display()))?;
        let key_pem = std::fs::read_to_string(&ca_key_path)
            .with_context(|| format!("cannot read {}", ca_key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a private key", ca_key_path.display()))?;
        (pem, key)
    };
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{} is not a CA certificate", ca_pem_path.display()))?;

    let key = KeyPair::generate().context("cannot make the host's key")?;
    let mut params = CertificateParams::new(vec![host.to_owned()])?;
    params.subject_alt_names.push(SanType::IpAddress(ip));
    params.distinguished_name.push(DnType::CommonName, host);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Each proxy is a server to the others and a client of them.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the host's certificate")?;
    write_atomically(&key_path, key.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    write_public(&cert_path, &cert.pem())?;
    Ok(Made {
        new_ca,
        ca: ca_pem_path,
        cert: cert_path,
        key: key_path,
    })
}

/// A certificate: written whole, readable by everyone.
fn write_public(path: &Path, pem: &str) -> anyhow::Result<()> {
    write_atomically(path, pem.as_bytes())
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn one_ca_signs_every_host_and_keys_stay_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = make(dir.path(), "h1", "10.0.0.1".parse().expect("ip"), 30, false).expect("h1");
        assert!(first.new_ca);
        let ca = std::fs::read(&first.ca).expect("ca");
        let second =
            make(dir.path(), "h2", "10.0.0.2".parse().expect("ip"), 30, false).expect("h2");
        assert!(!second.new_ca);
        assert_eq!(
            std::fs::read(&second.ca).expect("ca"),
            ca,
            "the CA is made once"
        );
        for key in [&first.key, &dir.path().join("ca.key")] {
            assert_eq!(std::fs::metadata(key).expect("key").mode() & 0o777, 0o600);
        }
        assert_eq!(
            std::fs::metadata(&first.cert).expect("cert").mode() & 0o777,
            0o644
        );
        let again =
            make(dir.path(), "h1", "10.0.0.1".parse().expect("ip"), 30, false).expect_err("exists");
        assert!(again.to_string().contains("--replace"), "{again}");
        make(dir.path(), "h1", "10.0.0.9".parse().expect("ip"), 30, true).expect("replaced");
        let bad = make(
            dir.path(),
            "../h1",
            "10.0.0.1".parse().expect("ip"),
            30,
            false,
        )
        .expect_err("bad host");
        assert!(bad.to_string().contains("not a host name"));
        assert!(!dir.path().join("../h1.pem").exists());
    }
}
