//! Certificates from a real ACME server: Debian's `pebble`, with `pebble-challtestsrv`
//! answering its DNS queries for the test names with loopback, so pebble validates
//! TLS-ALPN-01 and HTTP-01 against the proxy's own listeners. Every certificate is verified
//! against pebble's root, as a browser would verify Let's Encrypt's.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tenement_proto::rpc::{InstanceState, Request, Response};

use crate::support::*;
use crate::tls::{
    answer_then_close, client_config, client_hello, handshake, long_server_name,
    start_proxy_with_https, Pki,
};

const APPS: &str = r#"
[service.notes]
command = "python3 @FIXTURES@/mirror.py"

[instances]
notes = ["alice", "bob", "carol"]
"#;

/// pebble and its DNS, killed when dropped.
struct Pebble {
    directory: String,
    management: u16,
    /// The CA of pebble's own HTTPS (its directory and management API).
    api_ca: PathBuf,
    log: PathBuf,
    children: Vec<Child>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is required (.ci/run installs Debian's pebble package)"
    );
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1, issuing certificates valid `validity` (seconds; pebble's default: 5 years).
    fn start(sandbox: &Sandbox, http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
        require("pebble");
        require("pebble-challtestsrv");
        let dir = sandbox.root.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::new(&dir);
        pki.issue("api", &["localhost", "127.0.0.1"]);
        let api_ca = dir.join("api-ca.pem");
        std::fs::write(&api_ca, pki.ca.pem()).unwrap();
        let ports = sandbox.spare_ports(6);
        // The first ones may be the proxy's https port (bound after this) : skip it.
        let ports: Vec<u16> = ports.into_iter().filter(|&p| p != tls_port).collect();
        let (listen, management, dns) = (ports[0], ports[1], ports[2]);
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": pki.pem_path("api"),
                "privateKey": pki.dir.join("api.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(seconds) = validity {
            config["pebble"]["certificateValidityPeriod"] = seconds.into();
        }
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let out = std::fs::File::create(&log).unwrap();
        let dns_log = std::fs::File::create(dir.join("challtestsrv.log")).unwrap();
        let mut children = Vec::new();
        children.push(
            Command::new("pebble-challtestsrv")
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{}", ports[3])])
                .stdout(dns_log.try_clone().unwrap())
                .stderr(dns_log)
                .spawn()
                .unwrap(),
        );
        children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                // No random sleeps before validation, no nonce rejected on purpose, and
                // every order validated afresh.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pebble = Pebble {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            api_ca,
            log,
            children,
        };
        let up = wait_until(EVENT_DEADLINE, || {
            TcpStream::connect(("127.0.0.1", listen)).is_ok()
                && TcpStream::connect(("127.0.0.1", management)).is_ok()
        });
        assert!(up, "pebble did not start:\n{}", pebble.log_text());
        pebble
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Orders pebble has accepted so far.
    fn orders(&self) -> usize {
        self.log_text().matches("Added order").count()
    }

    /// The root pebble signs with (made at its start), from its management API.
    fn root(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(&self.root_pem()).unwrap()
    }

    fn root_pem(&self) -> Vec<u8> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.api_ca)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// The proxy's state directory in `sandbox`. The proxy runs as nobody when the tests run as
/// root: the directory is its own, as under systemd's StateDirectory=.
fn proxy_state_dir(sandbox: &Sandbox) -> PathBuf {
    let state = sandbox.root.join("proxy-state");
    std::fs::create_dir(&state).unwrap();
    if is_root() {
        let nobody = nix::unistd::User::from_name(PROXY_USER).unwrap().unwrap();
        nix::unistd::chown(&state, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    state
}

/// A sandbox whose proxy listens on plain HTTP and HTTPS with ACME from `pebble`.
struct Acme {
    sandbox: Sandbox,
    https: SocketAddr,
    pebble: Pebble,
    state: PathBuf,
    daemons: Option<(Daemon, Daemon)>,
}

impl Acme {
    /// `tls`: extra `[settings.tls]` lines.
    fn start(tls: &str, validity: Option<u64>) -> Acme {
        let sandbox = Sandbox::new(APPS);
        let https_port = sandbox.spare_port();
        let pebble = Pebble::start(&sandbox, sandbox.proxy_addr.port(), https_port, validity);
        let state = proxy_state_dir(&sandbox);
        let text = std::fs::read_to_string(&sandbox.config_path).unwrap();
        let text = format!(
            "{text}\n[settings.tls]\nacme_email = \"ops@example.com\"\nacme_directory = \"{}\"\nacme_ca_file = \"{}\"\nacme_state_dir = \"{}\"\n{tls}\n",
            pebble.directory,
            pebble.api_ca.display(),
            state.display()
        );
        std::fs::write(&sandbox.config_path, text).unwrap();
        let https = SocketAddr::from(([127, 0, 0, 1], https_port));
        let mut acme = Acme {
            sandbox,
            https,
            pebble,
            state,
            daemons: None,
        };
        let supervisor = acme.sandbox.start_supervisor();
        let proxy = acme.start_proxy();
        acme.daemons = Some((supervisor, proxy));
        acme
    }

    fn start_proxy(&self) -> Daemon {
        start_proxy_with_https(&self.sandbox, self.https)
    }

    fn restart_proxy(&mut self) {
        let (supervisor, proxy) = self.daemons.take().unwrap();
        proxy.terminate(EVENT_DEADLINE);
        let proxy = self.start_proxy();
        self.daemons = Some((supervisor, proxy));
    }

    /// The leaf served for `name`, verified against pebble's root; the TLS error otherwise.
    fn leaf(&self, name: &str, alpn: &[&[u8]]) -> Result<CertificateDer<'static>, rustls::Error> {
        let config = client_config(self.pebble.root(), alpn);
        let stream = handshake(self.https, config, name)?;
        Ok(stream.conn.peer_certificates().unwrap()[0].clone())
    }

    fn log(&self) -> String {
        format!(
            "proxy:\n{}\npebble:\n{}",
            self.sandbox.proxy_log(),
            self.pebble.log_text()
        )
    }
}

/// The DNS names of a certificate's subjectAltName.
fn names_of(der: &CertificateDer<'_>) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn curl_https(acme: &Acme, root: &Path, host: &str, extra: &[&str]) -> String {
    let port = acme.https.port();
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(extra)
        .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"])
        .arg(format!("https://{host}:{port}/headers"))
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_registered_tenant_gets_its_own_certificate_on_its_first_handshake_and_only_once() {
    let acme = Acme::start(r#"acme_challenges = ["tls-alpn-01"]"#, None);
    assert_eq!(acme.pebble.orders(), 0, "no order before anyone asks");

    // 20 first handshakes at once: one order, all 20 served with the same certificate.
    let root = acme.pebble.root();
    let config = client_config(root.clone(), &[b"http/1.1"]);
    let leaves: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let config = config.clone();
                scope.spawn(move || {
                    handshake(acme.https, config, "alice.notes.localhost")
                        .map(|s| s.conn.peer_certificates().unwrap()[0].clone())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = leaves[0]
        .clone()
        .unwrap_or_else(|e| panic!("{e}\n{}", acme.log()));
    for leaf in &leaves {
        assert_eq!(leaf.as_ref().ok(), Some(&first), "{}", acme.log());
    }
    assert_eq!(acme.pebble.orders(), 1, "{}", acme.log());
    assert_eq!(names_of(&first), ["alice.notes.localhost"]);

    // curl agrees with pebble's root, over HTTP/2 and HTTP/1.1; the app hears https.
    let root_pem = acme.sandbox.root.join("pebble-root.pem");
    std::fs::write(&root_pem, acme.pebble.root_pem()).unwrap();
    assert_eq!(
        curl_https(&acme, &root_pem, "alice.notes.localhost", &["--http2"]),
        "200 2"
    );
    assert_eq!(
        curl_https(&acme, &root_pem, "alice.notes.localhost", &["--http1.1"]),
        "200 1.1"
    );

    // A name that is not a registered instance: no order, a failed handshake.
    let mallory = acme.leaf("mallory.notes.localhost", &[b"http/1.1"]);
    assert!(
        matches!(
            mallory,
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::AccessDenied
            ))
        ),
        "{mallory:?}"
    );
    let stranger = acme.leaf("alice.notes.elsewhere.test", &[b"http/1.1"]);
    assert!(stranger.is_err());
    assert_eq!(acme.pebble.orders(), 1, "{}", acme.log());

    // Plain HTTP for the name now redirects; the challenge path does not.
    let reply = get(acme.sandbox.proxy_addr, "alice.notes.localhost", "/x?y=1");
    assert_eq!(reply.status(), 308);
    assert_eq!(
        reply.header("location"),
        Some(format!("https://alice.notes.localhost:{}/x?y=1", acme.https.port()).as_str())
    );
    let reply = get(
        acme.sandbox.proxy_addr,
        "alice.notes.localhost",
        "/.well-known/acme-challenge/nothing-pending",
    );
    assert_eq!(reply.status(), 404);

    // Stored privately: the directory 0700, the files 0600.
    let stored: Vec<PathBuf> = walk(&acme.state);
    assert!(
        stored
            .iter()
            .any(|p| p.ends_with("alice.notes.localhost/key.pem")),
        "{stored:?}"
    );
    assert_eq!(mode(&acme.state), 0o700);
    for path in &stored {
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(path), expected, "{}", path.display());
    }

    // A restarted proxy serves the stored certificate at once, with no new order.
    let mut acme = acme;
    acme.restart_proxy();
    assert_eq!(
        acme.leaf("alice.notes.localhost", &[b"h2"]).ok(),
        Some(first)
    );
    assert_eq!(acme.pebble.orders(), 1, "{}", acme.log());
    assert!(acme
        .sandbox
        .proxy_log()
        .contains("serving the stored ACME certificate of alice.notes.localhost"));
    let out = Command::new(tenctl_binary())
        .args(["certs", "--json", "--config"])
        .arg(&acme.sandbox.config_path)
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = &shown["acme"]["status"]["names"];
    assert_eq!(names[0]["name"], "alice.notes.localhost", "{shown}");
    assert!(names[0]["not_after"].as_u64().is_some(), "{shown}");
    assert_eq!(shown["acme"]["status"]["orders_last_week"], 1, "{shown}");
}

#[test]
fn http_01_is_answered_on_the_plain_listener_within_the_order_budget() {
    let acme = Acme::start(
        "acme_challenges = [\"http-01\"]\nacme_orders_per_hour = 1\n",
        None,
    );
    let bob = acme
        .leaf("bob.notes.localhost", &[b"http/1.1"])
        .unwrap_or_else(|e| panic!("{e}\n{}", acme.log()));
    assert_eq!(names_of(&bob), ["bob.notes.localhost"]);
    // The budget of one order an hour is spent: carol waits, no second order.
    let carol = acme.leaf("carol.notes.localhost", &[b"http/1.1"]);
    assert!(carol.is_err());
    assert_eq!(acme.pebble.orders(), 1, "{}", acme.log());
    assert!(
        acme.sandbox.proxy_log().contains("ACME budget spent"),
        "{}",
        acme.log()
    );
    // The budget is kept on disk: a restart does not reset it.
    let mut acme = acme;
    acme.restart_proxy();
    assert!(acme.leaf("carol.notes.localhost", &[b"http/1.1"]).is_err());
    assert_eq!(acme.pebble.orders(), 1, "{}", acme.log());
}

#[test]
fn certificates_near_their_end_are_renewed_with_no_failed_request_and_removed_names_are_not() {
    // 60-second certificates: renewal falls 36-40 s after issuance.
    let acme = Acme::start("", Some(60));
    let leaf = |name: &str| {
        acme.leaf(name, &[b"http/1.1"])
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", acme.log()))
    };
    let alice = leaf("alice.notes.localhost");
    // bob is never woken (a handshake wakes nothing): a sleeping tenant's name.
    let bob = leaf("bob.notes.localhost");
    leaf("carol.notes.localhost");
    let removed = acme.sandbox.admin().call(Request::Remove {
        instance: iid("notes:carol"),
        purge: false,
    });
    assert!(matches!(removed, Response::Ok), "{removed:?}");
    let root = acme.pebble.root();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let renewed = std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let config = client_config(root.clone(), &[b"http/1.1"]);
                while !stop.load(Ordering::Relaxed) {
                    match tls_get(acme.https, config.clone(), "alice.notes.localhost") {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        let renewed = wait_until(Duration::from_secs(90), || {
            let changed = |name: &str, old: &CertificateDer<'_>| {
                acme.leaf(name, &[b"http/1.1"])
                    .is_ok_and(|leaf| leaf != *old)
            };
            changed("alice.notes.localhost", &alice) && changed("bob.notes.localhost", &bob)
        });
        stop.store(true, Ordering::Relaxed);
        renewed
    });
    assert!(renewed, "not renewed:\n{}", acme.log());
    assert_eq!(failed.load(Ordering::Relaxed), 0, "{}", acme.log());
    assert!(ok.load(Ordering::Relaxed) > 0);
    // Three orders, two renewals: carol's name is no longer tenement's. Its renewal point
    // (jittered like the others') may fall a few seconds after theirs.
    let given_up = wait_until(EVENT_DEADLINE, || {
        acme.sandbox
            .proxy_log()
            .contains("not renewing the certificate of carol.notes.localhost")
    });
    assert!(given_up, "{}", acme.log());
    assert_eq!(acme.pebble.orders(), 5, "{}", acme.log());
    let state = acme.sandbox.admin().state("notes:bob");
    assert_ne!(state, InstanceState::Running, "renewing woke bob");
}

#[test]
fn an_unreachable_ca_is_a_logged_backed_off_failure_and_nothing_else() {
    let sandbox = Sandbox::new(APPS);
    let [https_port, closed] = sandbox.spare_ports(2)[..] else {
        unreachable!()
    };
    let state = proxy_state_dir(&sandbox);
    let text = std::fs::read_to_string(&sandbox.config_path).unwrap();
    std::fs::write(
        &sandbox.config_path,
        format!(
            "{text}\n[settings.tls]\nacme_email = \"ops@example.com\"\nacme_directory = \"https://127.0.0.1:{closed}/dir\"\nacme_state_dir = \"{}\"\nacme_wait = \"5s\"\n",
            state.display()
        ),
    )
    .unwrap();
    let _supervisor = sandbox.start_supervisor();
    let https = SocketAddr::from(([127, 0, 0, 1], https_port));
    let mut proxy = start_proxy_with_https(&sandbox, https);
    let any_root = Pki::new(&sandbox.root).root();
    for _ in 0..3 {
        let config = client_config(any_root.clone(), &[b"http/1.1"]);
        assert!(handshake(https, config, "alice.notes.localhost").is_err());
    }
    let log = sandbox.proxy_log();
    assert_eq!(
        log.matches("no certificate for alice.notes.localhost:")
            .count(),
        1,
        "one order, logged once:\n{log}"
    );
    assert!(log.contains("backing off"), "{log}");
    // Plain HTTP still serves, the proxy runs on.
    assert_eq!(
        get(sandbox.proxy_addr, "alice.notes.localhost", "/").status(),
        200
    );
    assert!(proxy.try_wait().is_none());
    let status: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            walk(&state)
                .into_iter()
                .find(|p| p.ends_with("status.json"))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(status["names"][0]["name"], "alice.notes.localhost");
    assert_eq!(status["names"][0]["failures"], 1);
    // And the operator sees it.
    let out = Command::new(tenctl_binary())
        .arg("certs")
        .arg("--config")
        .arg(&sandbox.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("alice.notes.localhost"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("1 failed:") && line.contains("next try in"),
        "{text}"
    );
}

/// `GET /` over TLS/1.1 with a fresh handshake; the status.
fn tls_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>, host: &str) -> Result<u16, String> {
    use std::io::{Read, Write};
    let mut stream = handshake(addr, config, host).map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no response: {text:?}"))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn hostile_client_hellos_order_nothing_and_write_nothing() {
    use std::io::Write;
    let acme = Acme::start(r#"acme_challenges = ["tls-alpn-01"]"#, None);
    let long_sni = long_server_name(b".notes.localhost");
    let attempts: [(&str, Vec<u8>); 7] = [
        ("garbage", b"\x16\x03\x01\x00\x10 not a handshake".to_vec()),
        (
            "plain HTTP",
            b"GET / HTTP/1.1\r\nHost: alice.notes.localhost\r\n\r\n".to_vec(),
        ),
        ("an SNI of 300 bytes", client_hello(&long_sni)),
        ("an SNI with ..", client_hello(b"..alice.notes.localhost")),
        (
            "an SNI with a path",
            client_hello(b"alice.notes.localhost/../../etc"),
        ),
        (
            "an unregistered name in upper case",
            client_hello(b"MALLORY.NOTES.LOCALHOST"),
        ),
        ("a name too deep", client_hello(b"x.alice.notes.localhost")),
    ];
    for (what, bytes) in attempts {
        let mut stream = TcpStream::connect(acme.https).unwrap();
        stream.write_all(&bytes).unwrap();
        let answer = answer_then_close(&mut stream);
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: answered {answer:?}"
        );
    }
    // TLS on the plain-HTTP port: a 400 or a close.
    let mut tcp = TcpStream::connect(acme.sandbox.proxy_addr).unwrap();
    tcp.write_all(&client_hello(b"alice.notes.localhost"))
        .unwrap();
    let answer = answer_then_close(&mut tcp);
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"));

    assert_eq!(acme.pebble.orders(), 0, "{}", acme.log());
    let certs: Vec<PathBuf> = walk(&acme.state)
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "certs") && !p.ends_with("certs"))
        .collect();
    assert!(certs.is_empty(), "{certs:?}");
    assert!(!acme.sandbox.proxy_log().contains("panicked"));

    // A registered name in upper case is the same name: its certificate is for the
    // lower-case form, and it is served.
    let leaf = acme
        .leaf("ALICE.Notes.localhost", &[b"http/1.1"])
        .unwrap_or_else(|e| panic!("{e}\n{}", acme.log()));
    assert_eq!(names_of(&leaf), ["alice.notes.localhost"]);
}
