//! The proxy's listening sockets: handed over by systemd (LISTEN_FDS, with LISTEN_FDNAMES
//! telling `http` from `https`; sd_listen_fds(3)) or bound from `--listen`. On an `https`
//! listener the proxy terminates TLS itself.
//!
//! Called from `main` before any thread exists: taking systemd's sockets consumes the LISTEN_*
//! variables.

use anyhow::Context;
use tenement_proto::config::ListenAddress;

pub struct Listener {
    /// Registered with the runtime once it exists.
    pub socket: std::net::TcpListener,
    /// `http` or `https` (TLS, terminated by the proxy): what X-Forwarded-Proto says for
    /// requests on this socket; or `metrics` (the proxy's own `/metrics`); or `fleet` (the
    /// other hosts' proxies, `fleet.rs`).
    pub scheme: &'static str,
    name: String,
}

impl Listener {
    pub fn describe(&self) -> String {
        match self.socket.local_addr() {
            Ok(addr) => format!("{addr} ({})", self.name),
            Err(_) => self.name.clone(),
        }
    }
}

/// The scheme a listener name stands for: names starting with `https` are TLS, terminated by
/// the proxy; `metrics` serves the proxy's `/metrics` and nothing else; everything else is
/// plain HTTP.
pub fn scheme_of(name: &str) -> &'static str {
    if name.starts_with("https") {
        "https"
    } else if name.starts_with("metrics") {
        "metrics"
    } else {
        "http"
    }
}

/// The sockets systemd passed, if any.
pub fn from_systemd() -> anyhow::Result<Vec<Listener>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::new();
    for index in 0..fds.len() {
        let std_listener = fds
            .take_tcp_listener(index)
            .with_context(|| format!("systemd socket {index} is not a TCP listener"))?
            .with_context(|| format!("systemd socket {index} was already taken"))?;
        std_listener.set_nonblocking(true)?;
        let name = names
            .get(index)
            .cloned()
            .unwrap_or_else(|| "http".to_owned());
        listeners.push(Listener {
            socket: std_listener,
            scheme: scheme_of(&name),
            name,
        });
    }
    Ok(listeners)
}

/// The accept queue of a listener the proxy binds itself: systemd's default for a socket unit
/// (SOMAXCONN), capped by the kernel's `net.core.somaxconn`. std's 128 would drop the SYNs of a
/// burst of first requests that arrive faster than the workers accept.
const BACKLOG: i32 = 4096;

/// Binds `addrs` ourselves (foreground use); `metrics`: as metrics listeners.
pub fn bind(addrs: &[ListenAddress], metrics: bool) -> anyhow::Result<Vec<Listener>> {
    addrs
        .iter()
        .map(|address| {
            let socket =
                listen(address.addr).with_context(|| format!("cannot listen on {address}"))?;
            socket.set_nonblocking(true)?;
            let scheme = match (metrics, address.tls) {
                (true, _) => "metrics",
                (false, true) => "https",
                (false, false) => "http",
            };
            Ok(Listener {
                socket,
                scheme,
                name: scheme.to_owned(),
            })
        })
        .collect()
}

/// The fleet listener, on `[fleet] address`: where the other hosts' proxies hand requests over
/// (bound by the proxy itself, systemd or not: it is a port of the proxy's own).
pub fn bind_fleet(addr: std::net::SocketAddr) -> anyhow::Result<Listener> {
    let socket = listen(addr).with_context(|| {
        format!("cannot listen on {addr}, the [fleet] address, for the other hosts' proxies")
    })?;
    socket.set_nonblocking(true)?;
    Ok(Listener {
        socket,
        scheme: "fleet",
        name: "fleet".to_owned(),
    })
}

/// A listening TCP socket on `addr` with [`BACKLOG`], SO_REUSEADDR set as std sets it.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_bound_here_take_a_large_accept_queue() {
        let listener = listen("127.0.0.1:0".parse().expect("address")).expect("listen");
        let port = listener.local_addr().expect("address").port();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("somaxconn")
            .trim()
            .parse()
            .expect("a number");
        let found = tenement_proto::sockdiag::tcp_listeners(port).expect("sock_diag");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].backlog, (BACKLOG as u32).min(somaxconn));
    }

    #[test]
    fn listener_names_pick_the_scheme() {
        assert_eq!(scheme_of("http"), "http");
        assert_eq!(scheme_of("https"), "https");
        assert_eq!(scheme_of("https-alt"), "https");
        assert_eq!(scheme_of("web"), "http");
        assert_eq!(scheme_of("metrics"), "metrics");
    }
}
