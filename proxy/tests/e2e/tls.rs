//! HTTPS in the proxy with certificate files: SNI picks the certificate, ALPN picks HTTP/2 or
//! HTTP/1.1, a renewed file is served without a restart, plain HTTP is redirected, and what
//! is not TLS never harms the proxy. Clients verify the chain against the test's own CA
//! (rustls, and curl where it is installed), as a browser would.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::*;

const MIRROR: &str = r#"
[service.notes]
command = "python3 @FIXTURES@/mirror.py"

[service.blog]
command = "@TINY@"

[instances]
notes = ["alice", "bob"]
blog = ["carol"]
"#;

/// A CA of the test's own and certificates it signs.
pub struct Pki {
    pub ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tenement test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let dir = dir.join("tls");
        std::fs::create_dir_all(&dir).unwrap();
        Pki { ca, dir }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.ca.as_ref().der().clone()
    }

    /// Writes `NAME.pem` (leaf then CA) and `NAME.key` for `names`; the leaf's DER.
    pub fn issue(&self, file: &str, names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let chain = format!("{}{}", cert.pem(), self.ca.pem());
        // Written beside and renamed over, as certbot and lego do.
        let write = |name: String, text: String| {
            let tmp = self.dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        };
        write(format!("{file}.key"), key.serialize_pem());
        write(format!("{file}.pem"), chain);
        cert.der().clone()
    }

    pub fn pem_path(&self, file: &str) -> PathBuf {
        self.dir.join(format!("{file}.pem"))
    }
}

/// A sandbox whose proxy also listens for HTTPS, with `tls` as its `[settings.tls]`.
struct Https {
    sandbox: Sandbox,
    addr: SocketAddr,
    pki: Pki,
    _daemons: (Daemon, Daemon),
}

impl Https {
    /// `issue` runs before the proxy starts (it refuses to start without its files).
    fn start(tls: &str, issue: impl FnOnce(&Pki)) -> Https {
        let sandbox = Sandbox::new(&format!("{MIRROR}\n[settings.tls]\n{tls}\n"));
        let pki = Pki::new(&sandbox.root);
        issue(&pki);
        let text = std::fs::read_to_string(&sandbox.config_path)
            .unwrap()
            .replace("@TLS@", &pki.dir.to_string_lossy());
        std::fs::write(&sandbox.config_path, text).unwrap();
        let port = sandbox.spare_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let supervisor = sandbox.start_supervisor();
        let proxy = start_proxy_with_https(&sandbox, addr);
        Https {
            sandbox,
            addr,
            pki,
            _daemons: (supervisor, proxy),
        }
    }
}

/// The proxy of `sandbox` listening on its plain address and on `https`, logging at debug
/// (failed handshakes are logged there, with the peer); returns once both accept.
pub fn start_proxy_with_https(sandbox: &Sandbox, https: SocketAddr) -> Daemon {
    let mut command = sandbox.proxy_command();
    command
        .env("RUST_LOG", "info,tenement_proxy=debug")
        .arg("--listen")
        .arg(sandbox.proxy_addr.to_string())
        .arg("--listen")
        .arg(format!("https://{https}"));
    let proxy = sandbox.start_proxy_with(command);
    accepting(https);
    proxy
}

/// Waits until `addr` accepts: the proxy binds its listeners one after the other, and the
/// harness waits for the plain one only.
pub fn accepting(addr: SocketAddr) {
    let up = wait_until(EVENT_DEADLINE, || TcpStream::connect(addr).is_ok());
    assert!(up, "nothing accepts on {addr}");
}

pub fn client_config(root: CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A finished handshake with `name` as SNI (verified against `root`), or the TLS error.
pub fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, rustls::Error> {
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let connection = rustls::ClientConnection::new(config, server_name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(EVENT_DEADLINE)).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            return Err(
                match e
                    .into_inner()
                    .map(|inner| inner.downcast::<rustls::Error>())
                {
                    Some(Ok(tls)) => *tls,
                    other => rustls::Error::General(format!("{other:?}")),
                },
            );
        }
    }
    Ok(stream)
}

/// `GET path` over HTTPS/1.1 to `host`; status and body.
fn https_get(https: &Https, host: &str, path: &str) -> (u16, String, Vec<(String, String)>) {
    let config = client_config(https.pki.root(), &[b"http/1.1"]);
    let mut stream = handshake(https.addr, config, host).expect("handshake");
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A peer that closes without close_notify is an error to rustls; what came is enough.
    let _ = stream.read_to_end(&mut raw);
    let mut reader = std::io::BufReader::new(&raw[..]);
    let head = read_head(&mut reader).expect("a response head");
    let mut body = Vec::new();
    body_reader(&mut reader, &head)
        .read_to_end(&mut body)
        .unwrap();
    (
        head.status,
        String::from_utf8_lossy(&body).into_owned(),
        head.headers.clone(),
    )
}

fn served_leaf(https: &Https, name: &str) -> Option<CertificateDer<'static>> {
    let config = client_config(https.pki.root(), &[b"http/1.1"]);
    let stream = handshake(https.addr, config, name).ok()?;
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first().cloned())
}

const WILDCARD_AND_ONE: &str = r#"certificates = [
  { cert = "@TLS@/alice.pem", key = "@TLS@/alice.key" },
  { cert = "@TLS@/wild.pem", key = "@TLS@/wild.key" },
]
hsts = "1d"
"#;

#[test]
fn sni_picks_the_certificate_alpn_picks_the_protocol_and_the_app_hears_https() {
    let mut leaves = Vec::new();
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        leaves.push(pki.issue("alice", &["alice.notes.localhost"]));
        leaves.push(pki.issue("wild", &["*.notes.localhost", "notes.localhost"]));
    });
    let (alice, wild) = (leaves[0].clone(), leaves[1].clone());
    assert_eq!(served_leaf(&https, "alice.notes.localhost"), Some(alice));
    assert_eq!(
        served_leaf(&https, "bob.notes.localhost"),
        Some(wild.clone())
    );
    assert_eq!(served_leaf(&https, "NOTES.localhost"), Some(wild));

    let (status, body, headers) = https_get(&https, "bob.notes.localhost", "/headers");
    assert_eq!(status, 200, "{body}");
    let seen: Vec<(String, String)> = serde_json::from_str(&body).unwrap();
    let header = |name: &str| {
        seen.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-forwarded-proto"), Some("https"), "{seen:?}");
    assert!(
        header("forwarded").is_some_and(|v| v.contains("proto=https")),
        "{seen:?}"
    );
    let hsts = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("strict-transport-security"));
    assert_eq!(hsts.map(|(_, v)| v.as_str()), Some("max-age=86400"));

    // HTTP/2 when the client offers it.
    let config = client_config(https.pki.root(), &[b"h2", b"http/1.1"]);
    let stream = handshake(https.addr, config, "alice.notes.localhost").unwrap();
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"h2"[..]));
    drop(stream);

    // No server name (an IP address): the first file's certificate, which is not valid for
    // the address, but it is ours.
    let config = client_config(https.pki.root(), &[b"http/1.1"]);
    let by_ip = handshake(https.addr, config, "127.0.0.1");
    assert!(
        matches!(
            by_ip,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{:?}",
        by_ip.err()
    );

    // A name no certificate covers: the handshake fails, nothing is served for it.
    let config = client_config(https.pki.root(), &[b"http/1.1"]);
    let refused = handshake(https.addr, config, "carol.blog.localhost");
    assert!(
        matches!(
            refused,
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            ))
        ),
        "{:?}",
        refused.err()
    );
}

#[test]
fn curl_verifies_the_chain_over_http2_and_http1() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required (.ci/run installs it)");
    }
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        pki.issue("alice", &["alice.notes.localhost"]);
        pki.issue("wild", &["*.notes.localhost"]);
    });
    let ca = https.pki.dir.join("ca.pem");
    std::fs::write(&ca, https.pki.ca.pem()).unwrap();
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = Command::new("curl")
            .args(["-sS", flag, "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("bob.notes.localhost:{}:127.0.0.1", https.addr.port()),
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
            .arg(format!(
                "https://bob.notes.localhost:{}/headers",
                https.addr.port()
            ))
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            shown,
            format!("200 {version}"),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn self_signed_mode_serves_every_name_with_no_file() {
    let sandbox = Sandbox::new(MIRROR);
    let port = sandbox.spare_port();
    let _supervisor = sandbox.start_supervisor();
    let mut command = sandbox.proxy_command();
    command
        .arg("--tls-self-signed")
        .arg("--listen")
        .arg(sandbox.proxy_addr.to_string())
        .arg("--listen")
        .arg(format!("https://127.0.0.1:{port}"));
    let _proxy = sandbox.start_proxy_with(command);
    accepting(SocketAddr::from(([127, 0, 0, 1], port)));
    for host in ["alice.notes.localhost", "carol.blog.localhost", "localhost"] {
        let out = Command::new("curl")
            .args(["-sS", "-k", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/"))
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            code,
            "200",
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without -k the certificate is refused: it is nobody's CA.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn a_renewed_file_is_served_without_a_restart_and_a_broken_one_changes_nothing() {
    let mut first = None;
    let https = Https::start(
        r#"certificates = [{ cert = "@TLS@/wild.pem", key = "@TLS@/wild.key" }]"#,
        |pki| first = Some(pki.issue("wild", &["*.notes.localhost"])),
    );
    let first = first.unwrap();
    assert_eq!(
        served_leaf(&https, "alice.notes.localhost"),
        Some(first.clone())
    );

    // A half-written or wrong file: the proxy keeps the certificate it has.
    std::fs::write(
        https.pki.pem_path("wild"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    let logged = wait_until(EVENT_DEADLINE, || {
        https
            .sandbox
            .proxy_log()
            .contains("still serving the version read before")
    });
    assert!(logged, "{}", https.sandbox.proxy_log());
    assert_eq!(
        served_leaf(&https, "alice.notes.localhost"),
        Some(first.clone())
    );

    // The renewal lands: served from the next check on, no restart, no failed handshake.
    let renewed = https.pki.issue("wild", &["*.notes.localhost"]);
    assert_ne!(renewed, first);
    let switched = wait_until(EVENT_DEADLINE, || {
        let served = served_leaf(&https, "alice.notes.localhost");
        assert!(served.is_some(), "a handshake failed during the renewal");
        served == Some(renewed.clone())
    });
    assert!(switched, "{}", https.sandbox.proxy_log());
}

#[test]
fn a_certificate_added_to_the_config_is_served_after_sighup() {
    let https = Https::start(
        r#"certificates = [{ cert = "@TLS@/wild.pem", key = "@TLS@/wild.key" }]"#,
        |pki| {
            pki.issue("wild", &["*.notes.localhost"]);
        },
    );
    assert_eq!(served_leaf(&https, "carol.blog.localhost"), None);
    let blog = https.pki.issue("blog", &["*.blog.localhost"]);
    let tls = https.pki.dir.to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&https.sandbox.config_path)
        .unwrap()
        .replace(
            "certificates = [",
            &format!("certificates = [{{ cert = \"{tls}/blog.pem\", key = \"{tls}/blog.key\" }}, "),
        );
    std::fs::write(&https.sandbox.config_path, text).unwrap();
    https._daemons.1.signal(nix::sys::signal::Signal::SIGHUP);
    let served = wait_until(EVENT_DEADLINE, || {
        served_leaf(&https, "carol.blog.localhost") == Some(blog.clone())
    });
    assert!(served, "{}", https.sandbox.proxy_log());
    assert!(served_leaf(&https, "alice.notes.localhost").is_some());
}

#[test]
fn plain_http_is_redirected_for_names_with_a_certificate_only() {
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        pki.issue("alice", &["alice.notes.localhost"]);
        pki.issue("wild", &["*.notes.localhost"]);
    });
    let plain = https.sandbox.proxy_addr;
    let reply = get(plain, "bob.notes.localhost", "/headers?x=1");
    assert_eq!(reply.status(), 308, "{}", reply.text());
    let location = format!(
        "https://bob.notes.localhost:{}/headers?x=1",
        https.addr.port()
    );
    assert_eq!(reply.header("location"), Some(location.as_str()));
    // HSTS only over HTTPS.
    assert_eq!(reply.header("strict-transport-security"), None);
    // The ACME HTTP-01 path stays on plain HTTP (here the app answers it).
    let challenge = get(
        plain,
        "bob.notes.localhost",
        "/.well-known/acme-challenge/token",
    );
    assert_ne!(challenge.status(), 308);
    // No certificate for the blog: served over plain HTTP as before.
    assert_eq!(
        get_ok(plain, "carol.blog.localhost", "/"),
        "hello from blog:carol"
    );
    // OPTIONS * names no URL to redirect to.
    let options = exchange(
        plain,
        b"OPTIONS * HTTP/1.1\r\nHost: bob.notes.localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_ne!(options.status(), 308);

    // A TLS terminator in front says the client used HTTPS: believed from a trusted proxy
    // only, and then not redirected (the terminator would loop).
    let behind_terminator = b"GET /headers HTTP/1.1\r\nHost: bob.notes.localhost\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    assert_eq!(exchange(plain, behind_terminator).unwrap().status(), 308);
    let text = std::fs::read_to_string(&https.sandbox.config_path)
        .unwrap()
        .replacen(
            "[settings]\n",
            "[settings]\ntrusted_proxies = [\"127.0.0.1\"]\n",
            1,
        );
    std::fs::write(&https.sandbox.config_path, text).unwrap();
    https._daemons.1.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_until(EVENT_DEADLINE, || {
        exchange(plain, behind_terminator).is_ok_and(|r| r.status() == 200)
    });
    assert!(reloaded, "{}", https.sandbox.proxy_log());
}

/// A ClientHello (TLS 1.3, X25519, one cipher suite) naming `server_name` in SNI, written by
/// hand so the name can be what no TLS library would send.
pub fn client_hello(server_name: &[u8]) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }
    fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(u16be(body.len()));
        out.extend(body);
        out
    }
    let mut sni = u16be(server_name.len() + 3).to_vec();
    sni.push(0); // host_name
    sni.extend(u16be(server_name.len()));
    sni.extend(server_name);
    let mut key_share = u16be(36).to_vec();
    key_share.extend([0x00, 0x1d, 0x00, 0x20]);
    key_share.extend([7u8; 32]);
    let mut extensions = Vec::new();
    extensions.extend(extension(0x0000, &sni));
    extensions.extend(extension(0x002b, &[2, 0x03, 0x04])); // supported_versions
    extensions.extend(extension(0x000a, &[0, 2, 0x00, 0x1d])); // supported_groups
    extensions.extend(extension(0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04])); // signature_algorithms
    extensions.extend(extension(0x0033, &key_share));
    let mut body = vec![0x03, 0x03];
    body.extend([1u8; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend([1, 0]); // compression: null
    body.extend(u16be(extensions.len()));
    body.extend(extensions);
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(u16be(handshake.len()));
    record.extend(handshake);
    record
}

/// A server name of more than 255 bytes (four 63-byte labels and a 40-byte one, then
/// `tail`): longer than DNS allows.
pub fn long_server_name(tail: &[u8]) -> Vec<u8> {
    let label = [b'a'; 63];
    let name = [
        &label[..],
        b".",
        &label,
        b".",
        &label,
        b".",
        &label,
        b".",
        &[b'e'; 40],
        tail,
    ]
    .concat();
    assert!(name.len() > 255);
    name
}

/// Everything the peer sends until it closes (bounded by a generous deadline).
pub fn answer_then_close(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(EVENT_DEADLINE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("no close within {EVENT_DEADLINE:?}: {e}; got {got:?}"),
        }
    }
}

#[test]
fn what_is_not_a_tls_client_hello_fails_its_handshake_and_the_proxy_goes_on() {
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        pki.issue("alice", &["alice.notes.localhost"]);
        pki.issue("wild", &["*.notes.localhost"]);
    });
    // The hand-made hello itself is sound: with a name we serve, the server answers it with
    // a ServerHello (a handshake record).
    let mut tcp = TcpStream::connect(https.addr).unwrap();
    tcp.write_all(&client_hello(b"alice.notes.localhost"))
        .unwrap();
    let mut first = [0u8; 1];
    tcp.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 0x16, "a handshake record");
    drop(tcp);

    let long_sni = long_server_name(b"");
    let attempts: [(&str, Vec<u8>); 6] = [
        ("garbage", b"\x16\x03\x01\x00\x10 not a handshake".to_vec()),
        (
            "plain HTTP",
            b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n".to_vec(),
        ),
        ("zeros", vec![0; 4096]),
        (
            "a record longer than TLS allows",
            b"\x16\x03\x01\x7f\xff".to_vec(),
        ),
        ("an SNI of 300 bytes", client_hello(&long_sni)),
        (
            "an SNI with .. and upper case",
            client_hello(b"..ALICE.notes.localhost"),
        ),
    ];
    for (what, bytes) in attempts {
        let mut stream = TcpStream::connect(https.addr).unwrap();
        let peer = stream.local_addr().unwrap();
        stream.write_all(&bytes).unwrap();
        // Closed (after a fatal alert, or none), and for the failed handshake, not for the
        // timeout of a client that says nothing.
        let answer = answer_then_close(&mut stream);
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: answered {answer:?}"
        );
        let logged = wait_until(EVENT_DEADLINE, || {
            https.sandbox.proxy_log().lines().any(|line| {
                line.contains("TLS handshake failed") && line.contains(&format!("peer={peer}"))
            })
        });
        assert!(logged, "{what}: {}", https.sandbox.proxy_log());
    }
    // TLS on the plain-HTTP port: a 400 or a close, never a crash.
    let mut tcp = TcpStream::connect(https.sandbox.proxy_addr).unwrap();
    tcp.write_all(&client_hello(b"alice.notes.localhost"))
        .unwrap();
    let answer = answer_then_close(&mut tcp);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Still serving both.
    let (status, _, _) = https_get(&https, "alice.notes.localhost", "/headers");
    assert_eq!(status, 200);
    assert_eq!(
        get(https.sandbox.proxy_addr, "carol.blog.localhost", "/").status(),
        200
    );
    let log = https.sandbox.proxy_log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_client_that_stalls_after_the_handshake_or_inside_the_http2_preface_is_closed() {
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        pki.issue("alice", &["alice.notes.localhost"]);
        pki.issue("wild", &["*.notes.localhost"]);
    });
    // All three at once: each waits out the same deadline.
    let mut streams = Vec::new();
    for sent in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let config = client_config(https.pki.root(), &[b"h2"]);
        let mut stream = handshake(https.addr, config, "alice.notes.localhost").unwrap();
        stream.write_all(sent).unwrap();
        stream.flush().unwrap();
        streams.push((sent, stream));
    }
    for (sent, mut stream) in streams {
        // The proxy's first-bytes deadline (15 s) closes it; a generous wait for that event.
        let closed = closed_within(&mut stream.sock, Duration::from_secs(15) + EVENT_DEADLINE);
        assert!(closed, "after {sent:?} the connection stayed open");
    }
}

#[test]
fn websockets_pass_over_tls() {
    let https = Https::start(WILDCARD_AND_ONE, |pki| {
        pki.issue("alice", &["alice.notes.localhost"]);
        pki.issue("wild", &["*.notes.localhost"]);
    });
    let config = client_config(https.pki.root(), &[b"http/1.1"]);
    let mut stream = handshake(https.addr, config, "bob.notes.localhost").unwrap();
    write!(
        stream,
        "GET /upgrade HTTP/1.1\r\nHost: bob.notes.localhost\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let head = read_head(&mut reader).unwrap();
    assert_eq!(head.status, 101, "{head:?}");
    // The mirror echoes whatever follows the 101, both ways through the TLS connection.
    for round in 0..3 {
        let message = format!("round {round} through TLS");
        reader.get_mut().write_all(message.as_bytes()).unwrap();
        let mut echo = vec![0u8; message.len()];
        reader.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message.as_bytes());
    }
}

#[test]
fn a_proxy_with_a_missing_certificate_file_refuses_to_start_with_its_name() {
    let sandbox = Sandbox::new(&format!(
        "{MIRROR}\n[settings.tls]\ncertificates = [{{ cert = \"/nonexistent/site.pem\", key = \"/nonexistent/site.key\" }}]\n"
    ));
    let mut command = sandbox.proxy_command();
    command
        .arg("--config")
        .arg(&sandbox.config_path)
        .arg("--listen")
        .arg(format!("https://127.0.0.1:{}", sandbox.spare_port()));
    let out = command.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("certificate /nonexistent/site.pem:") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn remote_tenctl_verifies_the_chain_over_https() {
    let https = Https::start(
        r#"certificates = [{ cert = "@TLS@/home.pem", key = "@TLS@/home.key" }]"#,
        |pki| {
            pki.issue("home", &["localhost"]);
        },
    );
    let ca = https.pki.dir.join("ca.pem");
    std::fs::write(&ca, https.pki.ca.pem()).unwrap();
    let token = tenctl_ok(&https.sandbox, &["token", "create", "--scope", "admin"])
        .trim()
        .to_owned();
    let url = format!("https://localhost:{}", https.addr.port());
    let remote = |extra: &[&str]| {
        Command::new(tenctl_binary())
            .arg("--remote")
            .arg(&url)
            .args(extra)
            .env("TENEMENT_TOKEN", &token)
            .env_remove("TENEMENT_CA_FILE")
            .output()
            .unwrap()
    };
    // Against the test's CA: the same list as on this machine.
    let out = remote(&["--ca-file", ca.to_str().unwrap(), "ps"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        tenctl_ok(&https.sandbox, &["ps"])
    );
    // Without it, the public roots do not know the CA: one line, and nothing was sent.
    let out = remote(&["ps"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot reach {url}")), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
