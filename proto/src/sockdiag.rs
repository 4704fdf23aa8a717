//! Who owns a TCP socket, asked of the kernel through sock_diag(7) (feature `sockdiag`).
//!
//! Both daemons use it to make sure a request never reaches a listener that is not the
//! instance's own: the supervisor before it calls an instance ready (the listener on the
//! instance's port must be one of the instance's own sockets), the proxy on every new upstream
//! connection (the socket that accepted it must belong to the instance's uid). A co-tenant
//! that binds another tenant's port in the moment it is free is then found, not trusted.
//!
//! Unprivileged processes may ask sock_diag about every socket of their network namespace, so
//! this works in the proxy, which holds no capability.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// A socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    /// Its local address.
    pub local: SocketAddr,
    /// The uid that created it (an accepted socket inherits its listener's).
    pub uid: u32,
    /// Its inode: `socket:[inode]` in `/proc/PID/fd` of every process holding it.
    pub inode: u32,
    /// For a listener, its backlog: the accept queue holds this many connections, and a SYN
    /// that finds it full is dropped (the client retries after a second).
    pub backlog: u32,
}

/// Every TCP socket listening on `port`, on any address, IPv4 and IPv6.
pub fn tcp_listeners(port: u16) -> io::Result<Vec<SocketOwner>> {
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        // The kernel skips listeners on other ports itself (a dump of listening sockets
        // compares a non-zero source port); the port is still checked below.
        id.source_port = port;
        let request = InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: id,
        };
        for owner in ask(request, NLM_F_REQUEST | NLM_F_DUMP)? {
            if owner.local.port() == port {
                found.push(owner);
            }
        }
    }
    Ok(found)
}

/// The listener a connection to `addr` reaches now: the kernel's own lookup, as for an
/// arriving SYN (a listener on exactly `addr` or on a wildcard address; an IPv4 `addr` reaches
/// a dual-stack IPv6 listener; one of a SO_REUSEPORT group). `None` when nothing listens there.
/// One lookup in the kernel's hash, where [`tcp_listeners`] walks every listening bucket of
/// the host.
pub fn tcp_listener_for(addr: SocketAddr) -> io::Result<Option<SocketOwner>> {
    let nowhere = match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    // No connection has 0.0.0.0:0 at its far end, so only a listener can match.
    tcp_peer(nowhere, addr)
}

/// The owner of the socket at `remote` that is connected to our `local` socket: for a
/// connection we opened, the socket the server accepted it on. `None` when the kernel knows
/// no such socket (it closed meanwhile).
pub fn tcp_peer(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<SocketOwner>> {
    let family = match remote.ip() {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            // Seen from the far socket: its own address is the source.
            source_port: remote.port(),
            destination_port: local.port(),
            source_address: remote.ip(),
            destination_address: local.ip(),
            interface_id: 0,
            // INET_DIAG_NOCOOKIE: find the socket by its addresses alone.
            cookie: [0xff; 8],
        },
    };
    match ask(request, NLM_F_REQUEST) {
        Ok(mut owners) => Ok(owners.pop()),
        // ENOENT: no such socket.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

thread_local! {
    /// This thread's sock_diag socket and answer buffer, kept between queries: a query is then
    /// a send and a receive, where a socket of its own also cost a socket, a bind, a connect,
    /// a close and a 64 KiB buffer to zero (readiness asks every 200 µs per starting instance;
    /// the proxy asks once per new upstream connection).
    static CHANNEL: RefCell<Option<Channel>> = const { RefCell::new(None) };
}

struct Channel {
    socket: Socket,
    buffer: Vec<u8>,
    /// The sequence number of the last request: an answer to another is skipped.
    sequence: u32,
}

impl Channel {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        Ok(Self {
            socket,
            buffer: vec![0; 64 * 1024],
            sequence: 0,
        })
    }
}

/// Sends one request and collects the sockets in the answer (one, or a dump), on this thread's
/// kept socket. A query that fails for any reason but the kernel's own answer (an error
/// message, read whole) drops the socket, with whatever it may have left unread.
fn ask(request: InetRequest, flags: u16) -> io::Result<Vec<SocketOwner>> {
    CHANNEL.with(|cell| {
        let mut slot = cell.borrow_mut();
        let mut channel = match slot.take() {
            Some(channel) => channel,
            None => Channel::open()?,
        };
        let (result, clean) = exchange(&mut channel, request, flags);
        if clean {
            *slot = Some(channel);
        }
        result
    })
}

/// One request and its answer on `channel`; the second value says whether the answer was read
/// to its end (the socket can serve the next query).
fn exchange(
    channel: &mut Channel,
    request: InetRequest,
    flags: u16,
) -> (io::Result<Vec<SocketOwner>>, bool) {
    channel.sequence = channel.sequence.wrapping_add(1);
    let sequence = channel.sequence;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out[..]);
    if let Err(e) = channel.socket.send(&out[..], 0) {
        return (Err(e), false);
    }

    let mut owners = Vec::new();
    loop {
        let size = match channel.socket.recv(&mut &mut channel.buffer[..], 0) {
            Ok(size) => size,
            Err(e) => return (Err(e), false),
        };
        let mut offset = 0;
        while offset < size {
            let message =
                match NetlinkMessage::<SockDiagMessage>::deserialize(&channel.buffer[offset..size])
                {
                    Ok(message) => message,
                    Err(e) => {
                        return (
                            Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
                            false,
                        )
                    }
                };
            let length = message.header.length as usize;
            if message.header.sequence_number == sequence {
                match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let id = &response.header.socket_id;
                        owners.push(SocketOwner {
                            local: SocketAddr::new(id.source_address, id.source_port),
                            uid: response.header.uid,
                            inode: response.header.inode,
                            backlog: response.header.send_queue,
                        });
                        if flags & NLM_F_DUMP == 0 {
                            return (Ok(owners), true);
                        }
                    }
                    NetlinkPayload::Done(_) => return (Ok(owners), true),
                    NetlinkPayload::Error(error) => {
                        let code = error.code.map_or(0, |c| -c.get());
                        if code == 0 {
                            return (Ok(owners), true);
                        }
                        return (Err(io::Error::from_raw_os_error(code)), true);
                    }
                    _ => {}
                }
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn my_uid() -> u32 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2))
                    .and_then(|u| u.parse().ok())
            })
            .expect("/proc/self/status has an effective uid")
    }

    #[test]
    fn the_listener_a_connect_reaches_is_found_by_one_lookup() {
        let exact = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = exact.local_addr().expect("addr");
        let found = tcp_listener_for(addr)
            .expect("sock_diag")
            .expect("the listener");
        assert_eq!((found.local, found.uid), (addr, my_uid()));
        assert!(found.backlog > 0, "{found:?}");
        // A dual-stack IPv6 wildcard takes IPv4 connections: it is what a connect reaches.
        let wildcard = TcpListener::bind("[::]:0").expect("bind");
        let port = wildcard.local_addr().expect("addr").port();
        let found = tcp_listener_for(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("sock_diag")
            .expect("the wildcard listener");
        assert_eq!(found.local.port(), port);
        assert!(found.local.ip().is_unspecified(), "{found:?}");
        // Nothing listening: nothing found (and no connection counts as a listener).
        drop(exact);
        let client_side = TcpListener::bind("127.0.0.1:0").expect("bind");
        let to = client_side.local_addr().expect("addr");
        let _connected = TcpStream::connect(to).expect("connect");
        drop(client_side);
        assert_eq!(tcp_listener_for(addr).expect("sock_diag"), None);
        assert_eq!(tcp_listener_for(to).expect("sock_diag"), None);
    }

    /// Queries on one thread share one kept socket: a thousand leave at most that one
    /// descriptor behind, and a failed exact query (no such socket) spoils nothing after it.
    #[test]
    fn queries_reuse_one_socket_per_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fds = || std::fs::read_dir("/proc/self/fd").expect("fds").count();
        // A port nothing listens on (nor is connected from).
        let closed = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        std::thread::spawn(move || {
            let before = fds();
            for i in 0..1000 {
                let found = tcp_listeners(addr.port()).expect("sock_diag");
                assert_eq!(found.len(), 1, "query {i}: {found:?}");
                if i % 100 == 0 {
                    // No socket at `closed`: the kernel answers ENOENT.
                    let nobody: SocketAddr = "127.0.0.1:9".parse().expect("addr");
                    assert_eq!(tcp_peer(nobody, closed).expect("sock_diag"), None);
                }
            }
            // Other tests' threads open descriptors meanwhile: a leak of one per query would
            // still stand out.
            assert!(
                fds() <= before + 50,
                "{before} descriptors before, {} after",
                fds()
            );
        })
        .join()
        .expect("the querying thread");
    }

    #[test]
    fn a_listener_and_an_accepted_socket_are_found_with_their_owner() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let listeners = tcp_listeners(addr.port()).expect("sock_diag");
        assert_eq!(listeners.len(), 1, "{listeners:?}");
        assert_eq!(listeners[0].local, addr);
        assert_eq!(listeners[0].uid, my_uid());
        // std listens with a backlog of 128 (capped by net.core.somaxconn).
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("somaxconn")
            .trim()
            .parse()
            .expect("a number");
        assert_eq!(listeners[0].backlog, 128.min(somaxconn));
        let inode = listeners[0].inode;
        let fd_link = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|target| target.to_string_lossy() == format!("socket:[{inode}]"));
        assert!(fd_link, "the listener's inode {inode} is one of our fds");

        let client = TcpStream::connect(addr).expect("connect");
        let peer = tcp_peer(client.local_addr().expect("local"), addr)
            .expect("sock_diag")
            .expect("the accepted socket exists before accept()");
        assert_eq!(peer.local, addr);
        assert_eq!(peer.uid, my_uid());
    }

    #[test]
    fn nothing_is_found_where_nothing_listens() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        assert_eq!(tcp_listeners(port).expect("sock_diag"), Vec::new());
        let gone = tcp_peer(
            "127.0.0.1:1".parse().expect("addr"),
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .expect("sock_diag");
        assert_eq!(gone, None);
    }
}
