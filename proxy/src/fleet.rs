//! The one-hop forward between the proxies of a fleet (docs/FLEET.md).
//!
//! A request for a tenant placed on another host goes to that host's proxy, at its `[fleet]
//! address`, over TLS 1.3 where both sides show a certificate from the fleet's CA: that
//! certificate is the fleet credential, and nothing else is accepted on the fleet listener.
//! The proxy there serves it as if the client had come to it directly (the client's address
//! and scheme travel in `tenement-fleet-client`, which only this hop may set), and never
//! forwards it again: a request crosses at most one hop, whatever the placements say.
//!
//! Where the tenants are comes from the fleet agent through the supervisor (`fleet_peers` on
//! the route watch). A request for a tenant whose host is down, or that a host refuses
//! because it no longer has it, waits for the placement to change, up to the wake deadline,
//! like a request waits for a wake: the controller moves a dead host's tenants after its
//! lease has expired and the grace has passed.
//!
//! Requests share one HTTP/2 connection per peer host. An upgrade (a WebSocket) has an
//! HTTP/1.1 connection of its own, which carries it after the 101.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tenement_proto::config::FleetTls;
use tenement_proto::rpc::FleetPeer;
use tenement_proto::InstanceId;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::forward::{Peer, Proxy, Settings};
use crate::head::strip_hop_by_hop;
use crate::lock;
use crate::respond::{full, BoxError, ProxyBody, ProxyError};

/// The client of a request handed over by another host's proxy: `ADDRESS SCHEME`, and
/// ` tenant` when the client was a tenant of that host (never a trusted proxy).
pub const CLIENT: HeaderName = HeaderName::from_static("tenement-fleet-client");
/// On a 503 from a fleet host that does not have the tenant: `not-placed-here`.
pub const REFUSED: HeaderName = HeaderName::from_static("tenement-fleet");

/// How often a request waiting for a peer looks again when nothing tells it to sooner.
const RETRY: Duration = Duration::from_millis(250);
/// A request body up to this size (with a Content-Length) is read whole before it is handed
/// over, so it can go out again if the host refuses it (a move under way).
const RESEND_BODY_LIMIT: u64 = 64 * 1024;

/// A request's body while it waits to be handed over.
enum Pending<B> {
    /// Read whole: it can go out any number of times.
    Whole(Bytes),
    /// Streamed: it goes out once (`None` once it has).
    Streaming(Option<B>),
}

/// Where a tenant placed on another host is served.
#[derive(Debug, PartialEq)]
pub struct PeerHost {
    pub host: String,
    /// `None`: the host is down (its record is gone from etcd).
    pub address: Option<SocketAddr>,
}

/// The tenants placed on the other hosts, replaced whole by each `fleet_peers`.
#[derive(Default)]
pub struct Placements {
    table: ArcSwap<HashMap<InstanceId, Arc<PeerHost>>>,
    /// Bumped on each new table; requests waiting for a move watch it.
    changed: watch::Sender<u64>,
}

impl Placements {
    /// Replaces the table and wakes the requests waiting for a change.
    pub fn replace(&self, peers: Vec<FleetPeer>) {
        let mut table = HashMap::new();
        let hosts = peers.len();
        for peer in peers {
            let host = Arc::new(PeerHost {
                host: peer.host,
                address: peer.address,
            });
            for id in peer.instances {
                table.insert(id, host.clone());
            }
        }
        tracing::debug!(
            hosts,
            tenants = table.len(),
            "fleet: placements on the other hosts"
        );
        self.table.store(Arc::new(table));
        self.changed.send_modify(|n| *n += 1);
    }

    /// The host `id` is placed on, when it is another.
    pub fn get(&self, id: &InstanceId) -> Option<Arc<PeerHost>> {
        self.table.load().get(id).cloned()
    }

    /// How many tenants are placed on the other hosts.
    pub fn len(&self) -> usize {
        self.table.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells of every table replaced after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut changes = self.changed.subscribe();
        changes.borrow_and_update();
        changes
    }
}

/// The tenants placed on the other hosts, and the connections to their proxies.
pub struct Fleet {
    pub placements: Placements,
    /// TLS to the peers, offering `h2` (requests) or `http/1.1` (upgrades).
    client_h2: Arc<rustls::ClientConfig>,
    client_http1: Arc<rustls::ClientConfig>,
    connections: Mutex<HashMap<SocketAddr, http2::SendRequest<ProxyBody>>>,
}

/// The fleet credential, read: what the fleet listener accepts with, and what the proxy
/// forwards with.
pub struct Credential {
    pub server: Arc<rustls::ServerConfig>,
    client_h2: Arc<rustls::ClientConfig>,
    client_http1: Arc<rustls::ClientConfig>,
}

impl Credential {
    /// Reads `ca`, `cert` and `key`; the error is one line naming the file.
    pub fn load(files: &FleetTls) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certificates(&files.ca, "fleet ca")?);
        if added == 0 {
            return Err(format!(
                "fleet ca {}: no CA certificate in it",
                files.ca.display()
            ));
        }
        let roots = Arc::new(roots);
        let chain = certificates(&files.cert, "fleet cert")?;
        let key = || {
            PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
                format!(
                    "fleet key {}: {}",
                    files.key.display(),
                    crate::tls::pem_error(&e)
                )
            })
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("fleet ca {}: {e}", files.ca.display()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("fleet TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| format!("fleet cert {} with its key: {e}", files.cert.display()))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, String> {
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| format!("fleet TLS: {e}"))?
                .with_root_certificates(roots.clone())
                .with_client_auth_cert(chain.clone(), key()?)
                .map_err(|e| format!("fleet cert {} with its key: {e}", files.cert.display()))?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        Ok(Credential {
            server: Arc::new(server),
            client_h2: client(b"h2")?,
            client_http1: client(b"http/1.1")?,
        })
    }
}

/// The PEM certificates in `path`, at least one; the error is one line naming the file.
fn certificates(
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let list = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {}", path.display(), crate::tls::pem_error(&e)))?;
    if list.is_empty() {
        return Err(format!(
            "{what} {}: no CERTIFICATE block in it",
            path.display()
        ));
    }
    Ok(list)
}

/// What became of a request for a tenant placed elsewhere.
pub enum Handed {
    /// The peer's answer (or the upgrade it agreed to).
    Answered(Response<ProxyBody>),
    /// The tenant is placed on this host now: serve the request here (its body as it was, or
    /// empty for a bodyless request that went out once already).
    PlacedHere(Request<ProxyBody>),
}

impl Fleet {
    pub fn new(credential: &Credential) -> Self {
        Fleet {
            placements: Placements::default(),
            client_h2: credential.client_h2.clone(),
            client_http1: credential.client_http1.clone(),
            connections: Mutex::default(),
        }
    }

    /// A connection to `address` that requests can go out on now (the one shared, or a new
    /// one); an error when the host cannot be reached or is not a member of the fleet.
    async fn h2(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<http2::SendRequest<ProxyBody>> {
        if let Some(send) = lock(&self.connections).get(&address) {
            if !send.is_closed() {
                return Ok(send.clone());
            }
        }
        let stream = self.connect(address, &self.client_h2, timeout).await?;
        let (send, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(10)))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(peer = %address, "fleet connection ended: {e}");
            }
        });
        lock(&self.connections).insert(address, send.clone());
        Ok(send)
    }

    async fn connect(
        &self,
        address: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let attempt = async {
            let tcp = TcpStream::connect(address).await?;
            let _ = tcp.set_nodelay(true);
            // The peer's certificate must name its address: the one etcd says it has.
            connector
                .connect(ServerName::IpAddress(address.ip().into()), tcp)
                .await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection in {timeout:?}"),
            )),
        }
    }
}

impl Proxy {
    /// Hands `request` for `id` to the proxy of the host it is placed on, waiting (until
    /// `deadline`) while that host is down or does not have it yet.
    pub(crate) async fn hand_over<B>(
        &self,
        request: Request<B>,
        id: &InstanceId,
        peer: Peer,
        raw_host: &str,
        deadline: Instant,
        settings: &Settings,
    ) -> Result<Handed, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let boxed = |body: B| -> ProxyBody { body.map_err(Into::into).boxed() };
        let Some(fleet) = self.fleet.as_deref() else {
            return Ok(Handed::PlacedHere(request.map(boxed)));
        };
        let mut changes = fleet.placements.subscribe();
        // A dead host's tenants move only after its lease expired and the grace passed.
        let deadline = deadline.max(Instant::now() + settings.fleet_wait);
        let (mut parts, body) = request.into_parts();
        let mut client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let upgrade = client_upgrade.is_some()
            && parts.headers.contains_key(header::UPGRADE)
            && parts.version == http::Version::HTTP_11;
        // A bodyless GET or HEAD may go out again whatever happened to it; any request whose
        // body is here whole may go out again after a refusal (a move under way: the host
        // that refused gave nothing of it to the app). Small bodies are read whole first for
        // that; larger ones stream, and go out once.
        let idempotent = (parts.method == http::Method::GET || parts.method == http::Method::HEAD)
            && body.is_end_stream();
        let small = !upgrade
            && body
                .size_hint()
                .exact()
                .is_some_and(|len| len <= RESEND_BODY_LIMIT);
        let mut pending = if idempotent || small {
            let whole = tokio::time::timeout_at(deadline, body.collect())
                .await
                .map_err(|_| ProxyError::BadBody("the body did not arrive in time".to_owned()))?
                .map_err(|e| ProxyError::BadBody(e.into().to_string()))?
                .to_bytes();
            Pending::Whole(whole)
        } else {
            Pending::Streaming(Some(body))
        };
        let mut why;
        loop {
            let Some(place) = fleet.placements.get(id) else {
                // Moved here while it waited: served here.
                let body = match pending {
                    Pending::Whole(bytes) => full(bytes),
                    Pending::Streaming(Some(body)) => boxed(body),
                    Pending::Streaming(None) => {
                        return Err(ProxyError::NotPlacedHere(format!(
                            "{id} moved to this host after another refused its streamed body"
                        )))
                    }
                };
                if let Some(upgrade) = client_upgrade {
                    parts.extensions.insert(upgrade);
                }
                return Ok(Handed::PlacedHere(Request::from_parts(parts, body)));
            };
            why = match place.address {
                None => format!("{id} is placed on {}, which is down", place.host),
                Some(address) => match self.open(fleet, address, upgrade, settings).await {
                    // Nothing went out: the request is intact for the next try.
                    Err(text) => text,
                    Ok(connection) => {
                        let head = outgoing_head(&parts, peer, raw_host, upgrade)?;
                        let body: ProxyBody = match &mut pending {
                            Pending::Whole(bytes) => full(bytes.clone()),
                            Pending::Streaming(body) => {
                                body.take().map_or_else(|| full(Bytes::new()), boxed)
                            }
                        };
                        let again = matches!(pending, Pending::Whole(_));
                        let outgoing = Request::from_parts(head, body);
                        let client_upgrade = client_upgrade.take();
                        match self
                            .send(
                                connection,
                                address,
                                outgoing,
                                client_upgrade,
                                fleet,
                                settings,
                            )
                            .await
                        {
                            Sent::Answered(response) => return Ok(Handed::Answered(response)),
                            Sent::Refused(text) if again => text,
                            Sent::Broken(text) if idempotent => text,
                            Sent::Refused(text) => return Err(ProxyError::NotPlacedHere(text)),
                            Sent::Broken(text) => return Err(ProxyError::Upstream(text)),
                            Sent::Failed(error) => return Err(error),
                        }
                    }
                },
            };
            if upgrade && client_upgrade.is_none() {
                // The client's upgrade went with the request: one try.
                return Err(ProxyError::Upstream(why));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProxyError::WakeFailed(why));
            }
            tracing::debug!(instance = %id, "{why}; waiting for the fleet");
            let _ = tokio::time::timeout_at(deadline.min(now + RETRY), changes.changed()).await;
        }
    }

    /// A request for `id`, which this host's supervisor just refused as not placed here: it
    /// moved to another host (a drain) after the request was routed. The placement says so
    /// already (the supervisor tells the proxy before it stops the tenant), or soon; then the
    /// request goes there.
    pub(crate) async fn moved_away<B>(
        &self,
        request: Request<B>,
        id: &InstanceId,
        peer: Peer,
        raw_host: &str,
        deadline: Instant,
        settings: &Settings,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let refused = || ProxyError::NotPlacedHere(format!("{id} is not placed on this host"));
        let Some(fleet) = self.fleet.as_deref() else {
            return Err(refused());
        };
        let mut changes = fleet.placements.subscribe();
        while fleet.placements.get(id).is_none() {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(refused()),
            }
        }
        match Box::pin(self.hand_over(request, id, peer, raw_host, deadline, settings)).await? {
            Handed::Answered(response) => Ok(response),
            Handed::PlacedHere(_) => Err(refused()),
        }
    }

    /// A connection to the peer at `address` for one request: the shared HTTP/2 one, or an
    /// HTTP/1.1 one of its own for an upgrade. The error says why there is none.
    async fn open(
        &self,
        fleet: &Fleet,
        address: SocketAddr,
        upgrade: bool,
        settings: &Settings,
    ) -> Result<Open, String> {
        let failed = |e: &dyn std::fmt::Display| format!("fleet host {address}: {e}");
        if !upgrade {
            let mut send = fleet
                .h2(address, settings.connect_timeout)
                .await
                .map_err(|e| failed(&e))?;
            if let Err(e) = send.ready().await {
                lock(&fleet.connections).remove(&address);
                return Err(failed(&e));
            }
            return Ok(Open::H2(send));
        }
        let stream = fleet
            .connect(address, &fleet.client_http1, settings.connect_timeout)
            .await
            .map_err(|e| failed(&e))?;
        let (send, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(peer = %address, "fleet upgrade connection ended: {e}");
            }
        });
        Ok(Open::Http1(send))
    }

    async fn send(
        &self,
        connection: Open,
        address: SocketAddr,
        request: Request<ProxyBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        fleet: &Fleet,
        settings: &Settings,
    ) -> Sent {
        let sent = match connection {
            Open::H2(mut send) => {
                tokio::time::timeout(settings.response_timeout, send.send_request(request)).await
            }
            Open::Http1(mut send) => {
                tokio::time::timeout(settings.response_timeout, send.send_request(request)).await
            }
        };
        let response = match sent {
            Err(_) => return Sent::Failed(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => {
                lock(&fleet.connections).remove(&address);
                return Sent::Broken(format!("fleet host {address}: {e}"));
            }
            Ok(Ok(response)) => response,
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return answer(response);
        }
        let metrics = self.metrics.service(None);
        Sent::Answered(crate::forward::switch_protocols(
            &self.upgraded,
            response,
            client_upgrade,
            (),
            metrics,
        ))
    }

    /// A request on the fleet listener, from the proxy of another host: served as if its
    /// client had come here, and only here.
    pub async fn handle_fleet(
        self: Arc<Self>,
        request: Request<Incoming>,
        from: SocketAddr,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let Some(peer) = request.headers().get(CLIENT).and_then(client_of) else {
            tracing::warn!(peer = %from, "fleet: a request without a valid tenement-fleet-client header; answered 400");
            let mut response = Response::new(full("400 bad request: no tenement-fleet-client\n"));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        };
        self.handle(request, peer).await
    }
}

/// A connection to a peer, ready for one request.
enum Open {
    H2(http2::SendRequest<ProxyBody>),
    Http1(http1::SendRequest<ProxyBody>),
}

/// How a hand-over went.
enum Sent {
    Answered(Response<ProxyBody>),
    /// The host does not have the tenant (a move under way).
    Refused(String),
    /// The connection broke before an answer: the request may or may not have been served.
    Broken(String),
    Failed(ProxyError),
}

fn answer(response: Response<Incoming>) -> Sent {
    let (mut parts, body) = response.into_parts();
    if parts.status == StatusCode::SERVICE_UNAVAILABLE && parts.headers.remove(REFUSED).is_some() {
        return Sent::Refused("the host it is placed on does not have it yet".to_owned());
    }
    // HTTP/2 carries no hop-by-hop headers; an upgrade's answer keeps its two.
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut parts.headers);
    }
    let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed();
    Sent::Answered(Response::from_parts(parts, body))
}

/// The head that goes to the peer: the client's, with this hop's headers out, the target
/// in absolute form (HTTP/2's :authority is the client's Host) and the client named.
fn outgoing_head(
    parts: &http::request::Parts,
    peer: Peer,
    raw_host: &str,
    upgrade: bool,
) -> Result<http::request::Parts, ProxyError> {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.headers = parts.headers.clone();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if upgrade {
        // HTTP/1.1 to the peer, the Upgrade and Connection headers kept.
        head.version = http::Version::HTTP_11;
        head.uri = path.parse::<Uri>().map_err(|_| ProxyError::BadTarget)?;
        head.headers.insert(
            header::HOST,
            HeaderValue::from_str(raw_host).map_err(|_| ProxyError::BadTarget)?,
        );
    } else {
        strip_hop_by_hop(&mut head.headers);
        head.headers.remove(header::HOST);
        head.version = http::Version::HTTP_2;
        head.uri = Uri::builder()
            .scheme("https")
            .authority(raw_host)
            .path_and_query(path)
            .build()
            .map_err(|_| ProxyError::BadTarget)?;
    }
    head.headers.insert(CLIENT, client_value(peer));
    Ok(head)
}

fn client_value(peer: Peer) -> HeaderValue {
    let tenant = if peer.tenant { " tenant" } else { "" };
    HeaderValue::from_str(&format!("{} {}{tenant}", peer.addr, peer.scheme))
        .unwrap_or_else(|_| HeaderValue::from_static("0.0.0.0:0 http"))
}

/// The client a peer proxy names; `None` when the header is not one it would write.
fn client_of(value: &HeaderValue) -> Option<Peer> {
    let text = value.to_str().ok()?;
    let mut words = text.split(' ');
    let addr = words.next()?.parse::<SocketAddr>().ok()?;
    let scheme = match words.next()? {
        "http" => "http",
        "https" => "https",
        _ => return None,
    };
    let tenant = match words.next() {
        None => false,
        Some("tenant") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(Peer {
        addr,
        scheme,
        tenant,
        via_fleet: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_header_round_trips_and_refuses_anything_else() {
        let peer = Peer {
            addr: "203.0.113.7:51234".parse().expect("addr"),
            scheme: "https",
            tenant: false,
            via_fleet: false,
        };
        let value = client_value(peer);
        assert_eq!(value, "203.0.113.7:51234 https");
        let back = client_of(&value).expect("parsed");
        assert_eq!(
            (back.addr, back.scheme, back.tenant, back.via_fleet),
            (peer.addr, "https", false, true)
        );
        let tenant = client_value(Peer {
            addr: "[::1]:80".parse().expect("addr"),
            scheme: "http",
            tenant: true,
            via_fleet: false,
        });
        assert_eq!(tenant, "[::1]:80 http tenant");
        assert!(client_of(&tenant).expect("parsed").tenant);
        for bad in [
            "",
            "1.2.3.4 https",
            "1.2.3.4:5 ftp",
            "1.2.3.4:5 https admin",
            "1.2.3.4:5 https tenant x",
            "1.2.3.4:5  https",
        ] {
            assert!(
                client_of(&HeaderValue::from_static(bad)).is_none(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_head_for_a_peer_is_absolute_and_names_the_client() {
        let request = Request::builder()
            .method("POST")
            .uri("/notes?x=1")
            .header("host", "alice.notes.example.com")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop")
            .header(CLIENT, "6.6.6.6:1 https")
            .header("x-app", "kept")
            .body(())
            .expect("request");
        let (parts, ()) = request.into_parts();
        let peer = Peer {
            addr: "198.51.100.2:4000".parse().expect("addr"),
            scheme: "http",
            tenant: false,
            via_fleet: false,
        };
        let head = outgoing_head(&parts, peer, "alice.notes.example.com", false).expect("head");
        assert_eq!(head.uri, "https://alice.notes.example.com/notes?x=1");
        assert_eq!(head.version, http::Version::HTTP_2);
        assert!(head.headers.get(header::HOST).is_none());
        assert!(head.headers.get("x-secret").is_none());
        assert!(head.headers.get(header::CONNECTION).is_none());
        assert_eq!(head.headers[CLIENT], "198.51.100.2:4000 http");
        assert_eq!(head.headers["x-app"], "kept");
    }

    #[test]
    fn a_new_placement_table_replaces_the_old_and_wakes_the_waiting() {
        let id = |text: &str| InstanceId::parse(text).expect("id");
        let placements = Placements::default();
        let mut changes = placements.subscribe();
        placements.replace(vec![
            FleetPeer {
                host: "h2".to_owned(),
                address: Some("10.0.0.2:7443".parse().expect("addr")),
                instances: vec![id("notes:a"), id("notes:b")],
            },
            FleetPeer {
                host: "h3".to_owned(),
                address: None,
                instances: vec![id("notes:c")],
            },
        ]);
        assert!(changes.has_changed().expect("open"));
        changes.borrow_and_update();
        assert_eq!(placements.len(), 3);
        assert_eq!(placements.get(&id("notes:b")).expect("placed").host, "h2");
        assert_eq!(
            placements.get(&id("notes:c")).expect("placed").address,
            None
        );
        assert!(placements.get(&id("notes:z")).is_none());
        // notes:a moved here, h3 came back: the next table says so, and nothing else.
        placements.replace(vec![FleetPeer {
            host: "h3".to_owned(),
            address: Some("10.0.0.3:7443".parse().expect("addr")),
            instances: vec![id("notes:b"), id("notes:c")],
        }]);
        assert!(changes.has_changed().expect("open"));
        assert!(placements.get(&id("notes:a")).is_none());
        assert_eq!(placements.get(&id("notes:b")).expect("placed").host, "h3");
        assert_eq!(placements.len(), 2);
    }
}
