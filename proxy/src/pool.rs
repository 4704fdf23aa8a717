//! Keep-alive HTTP/1.1 connections to instances, over loopback TCP or Unix sockets.
//!
//! Connections are keyed by address and process generation, so a connection to a process that
//! has since been replaced is never reused. A connection is taken out for one request and put
//! back when the response body has been read to its end (HTTP/1.1 cannot pipeline).
//!
//! An instance may answer before it has read the whole request body (a 413 or a 401 on an
//! upload) and close. Writing the rest of the body then fails with EPIPE or ECONNRESET, which
//! hyper would report as a connection error, losing the answer that is already in the socket.
//! [`WriteGuarded`] turns those two errors into a flag on the connection and swallows what is
//! still written, so hyper goes on to read the answer; such a connection is never reused, and
//! [`Connection::abandon`] ends it once its answer has been relayed.
//!
//! A herd of first requests to a just-woken instance (or a burst to a running one) must not
//! overflow its accept queue: a SYN the kernel drops is retried by the client a whole second
//! later. So new connections to a TCP instance that have not been answered yet are at most as
//! many as its listener's backlog (read with sock_diag once per process), and the requests
//! beyond wait here, as they would for a wake, for an answer or a connection coming back.
//! Answered connections are kept alive and reused without that limit.
//!
//! Why not hyper-util's pooled client: the proxy must connect *before* it gives the request
//! body away (a refused connect means "wake the instance and retry", which needs the request
//! intact), and it routes to Unix sockets by instance; hyper's `conn` API gives both directly.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tenement_proto::rpc::Address;
use tenement_proto::InstanceId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::respond::ProxyBody;

/// One upstream connection: hyper's handle to send a request on it, and what the proxy knows
/// about its socket.
pub struct Connection {
    pub send: http1::SendRequest<ProxyBody>,
    state: Arc<ConnectionState>,
    /// A new connection's place among those not answered yet (see the module's herd rule),
    /// given back by [`Connection::answered`] or when it ends.
    unanswered: Option<OwnedSemaphorePermit>,
    /// The worker whose runtime drives the connection (`workers::current` when it was made):
    /// it goes back to that worker's idle list.
    worker: usize,
}

#[derive(Default)]
struct ConnectionState {
    /// The instance stopped reading (EPIPE/ECONNRESET on a write): nothing more can go out.
    write_broken: AtomicBool,
    /// Ends the connection's task (and drops the request body it was still sending).
    abandon: CancellationToken,
}

impl Connection {
    /// Whether a write on this connection failed because the instance closed it.
    pub fn write_broken(&self) -> bool {
        self.state.write_broken.load(Ordering::Acquire)
    }

    fn reusable(&self) -> bool {
        !self.send.is_closed() && !self.write_broken()
    }

    /// The instance answered on this connection: it was accepted, and no longer counts against
    /// the listener's accept queue.
    pub fn answered(&mut self) {
        self.unanswered = None;
    }

    /// Ends the connection now, whatever it was still doing (an early answer has been relayed
    /// and the rest of the request body is not going to the instance).
    pub fn abandon(self) {
        self.state.abandon.cancel();
    }
}

/// Idle connections kept per upstream.
const MAX_IDLE_PER_UPSTREAM: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub address: Address,
    pub generation: u64,
    /// The uid whose socket must accept a new connection (see [`Pool::connect`]).
    pub owner_uid: Option<u32>,
    /// Whose connections these are: `max_upstream_connections` counts per instance (an
    /// address can pass from one instance to another).
    pub instance: InstanceId,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Idle>,
    /// Per upstream address: how many connections may be open to it at once, and a wake-up
    /// for requests waiting because all of them are in use (an idle one came back).
    slots: Mutex<HashMap<InstanceId, Slots>>,
    /// Per instance, for its current process: how many new connections may wait unanswered.
    gates: Mutex<HashMap<InstanceId, Gate>>,
}

/// The new connections of one process that may be unanswered at once: as many as its
/// listener's accept queue holds. `permits` is `None` when the listener was not found (it is
/// then not limited).
struct Gate {
    generation: u64,
    address: Address,
    permits: Option<Arc<Semaphore>>,
}

/// Idle connections per upstream process, one list per worker (`workers::current`): a
/// connection is driven by a task on the worker that opened it, so a request served on the
/// same worker hands off to it without waking another thread.
#[derive(Default)]
struct Idle {
    lists: HashMap<PoolKey, Vec<Vec<Connection>>>,
    /// How many lists were left after the last sweep: the next one comes when there are
    /// twice as many, so the dead connections of stopped processes are dropped at the pace
    /// instances wake, whatever their number.
    after_sweep: usize,
}

/// The connections allowed to one instance (the cap they were made for, the semaphore), and
/// the wake-up of requests waiting for one (an idle connection came back to the pool).
type Slots = (u32, Arc<Semaphore>, Arc<Notify>);

impl Pool {
    /// An idle connection that is still open, if any: this worker's, else another worker's
    /// (driven from that worker's thread; it goes back to that worker's list).
    fn take(&self, key: &PoolKey) -> Option<Connection> {
        let mut idle = lock(&self.idle);
        let lists = idle.lists.get_mut(key)?;
        let own = crate::workers::current();
        let others = (0..lists.len()).filter(|&index| index != own);
        for index in std::iter::once(own).chain(others) {
            let Some(list) = lists.get_mut(index) else {
                continue;
            };
            while let Some(connection) = list.pop() {
                if connection.reusable() && connection.send.is_ready() {
                    return Some(connection);
                }
            }
        }
        None
    }

    /// Returns a connection whose last exchange ended cleanly (request sent whole, response
    /// read to the end).
    pub fn put(&self, key: PoolKey, connection: Connection) {
        if !connection.reusable() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.lists.len() >= (2 * idle.after_sweep).max(64) {
            // Forget upstreams whose connections all closed (stopped processes, old
            // generations).
            idle.lists.retain(|_, lists| {
                for list in lists.iter_mut() {
                    list.retain(Connection::reusable);
                }
                lists.iter().any(|list| !list.is_empty())
            });
            idle.after_sweep = idle.lists.len();
        }
        let instance = key.instance.clone();
        let own = connection.worker;
        let lists = idle.lists.entry(key).or_default();
        if lists.len() <= own {
            lists.resize_with(own + 1, Vec::new);
        }
        let list = &mut lists[own];
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(connection);
            drop(idle);
            if let Some((_, _, returned)) = lock(&self.slots).get(&instance) {
                returned.notify_one();
            }
        }
    }

    /// A connection to `key`: an idle one (unless `fresh`), else a new one once fewer than
    /// `cap` connections are open to the address and fewer than the listener's accept queue
    /// (`backlog` when the route says it, else asked of sock_diag) are unanswered, waiting
    /// until `queue_until` for either (an error of kind `WouldBlock` then). The second value
    /// says whether it was kept alive.
    #[allow(clippy::too_many_arguments)]
    pub async fn checkout(
        &self,
        key: &PoolKey,
        backlog: Option<u32>,
        cap: u32,
        fresh: bool,
        queue_until: tokio::time::Instant,
        timeout: Duration,
    ) -> io::Result<(Connection, bool)> {
        let (slots, returned) = {
            let mut all = lock(&self.slots);
            let entry = all
                .entry(key.instance.clone())
                .or_insert_with(|| (cap, Arc::new(Semaphore::new(cap as usize)), Arc::default()));
            if entry.0 != cap {
                // A reload changed the cap: new connections count against the new one.
                *entry = (cap, Arc::new(Semaphore::new(cap as usize)), Arc::default());
            }
            (entry.1.clone(), entry.2.clone())
        };
        loop {
            let idle_back = returned.notified();
            tokio::pin!(idle_back);
            // Registered before looking, so an idle connection put back meanwhile is not missed.
            idle_back.as_mut().enable();
            // Any idle connection before a new one, this worker's first: an instance that
            // serves one connection at a time (a single-threaded keep-alive server) blocks on
            // its idle one, and a new connection beside it would wait unanswered.
            if !fresh {
                if let Some(connection) = self.take(key) {
                    return Ok((connection, true));
                }
            }
            let busy = || {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("all {cap} connections to the instance stayed busy"),
                )
            };
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return Err(io::Error::other("connection slots closed")),
                },
                () = &mut idle_back, if !fresh => continue,
                () = tokio::time::sleep_until(queue_until) => return Err(busy()),
            };
            let unanswered = match self.gate(key, backlog) {
                None => None,
                Some(gate) => tokio::select! {
                    permit = gate.acquire_owned() => match permit {
                        Ok(permit) => Some(permit),
                        Err(_) => return Err(io::Error::other("connection gate closed")),
                    },
                    () = &mut idle_back, if !fresh => continue,
                    () = tokio::time::sleep_until(queue_until) => return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "the instance did not answer the connections it had queued",
                    )),
                },
            };
            // Boxed: opening a connection is the rare path, and its future would otherwise
            // make every request's future (held by each client connection, idle or not)
            // that much larger.
            return Box::pin(self.connect(key, slot, unanswered, timeout))
                .await
                .map(|c| (c, false));
        }
    }

    /// The herd limit of `key`'s process: `backlog` from its route (the supervisor saw the
    /// listener as it found the instance ready), else asked of sock_diag the first time it
    /// needs a new connection (the listener a connect to its address reaches, owned by its
    /// uid); then kept until another process serves the instance.
    fn gate(&self, key: &PoolKey, backlog: Option<u32>) -> Option<Arc<Semaphore>> {
        let Address::Tcp(addr) = &key.address else {
            return None;
        };
        let mut gates = lock(&self.gates);
        if let Some(gate) = gates.get(&key.instance) {
            if gate.generation == key.generation && gate.address == key.address {
                return gate.permits.clone();
            }
        }
        let backlog = backlog.map(|n| n.max(1)).or_else(|| {
            tenement_proto::sockdiag::tcp_listener_for(*addr)
                .ok()
                .flatten()
                .filter(|l| key.owner_uid.is_none_or(|uid| uid == l.uid))
                .map(|l| l.backlog.max(1))
        });
        let permits = backlog.map(|n| Arc::new(Semaphore::new(n as usize)));
        tracing::debug!(instance = %key.instance, ?backlog, "new connections unanswered at once");
        gates.insert(
            key.instance.clone(),
            Gate {
                generation: key.generation,
                address: key.address.clone(),
                permits: permits.clone(),
            },
        );
        permits
    }

    /// Opens a new connection on `slot` within `timeout`. Over TCP, the socket that accepted
    /// it must belong to `key.owner_uid`: a co-tenant listening on the instance's port (it took
    /// the port while the instance was not holding it) gets nothing, not even the request
    /// head; that is an error of kind `PermissionDenied` naming the uid.
    async fn connect(
        &self,
        key: &PoolKey,
        slot: OwnedSemaphorePermit,
        unanswered: Option<OwnedSemaphorePermit>,
        timeout: Duration,
    ) -> io::Result<Connection> {
        let connect = async {
            match &key.address {
                Address::Tcp(addr) => {
                    let stream = TcpStream::connect(addr).await?;
                    if let Some(expected) = key.owner_uid {
                        check_owner(&stream, expected)?;
                    }
                    stream.set_nodelay(true)?;
                    handshake(stream, slot, unanswered).await
                }
                Address::Unix(path) => {
                    handshake(UnixStream::connect(path).await?, slot, unanswered).await
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "upstream connect timed out",
            )),
        }
    }
}

/// The socket at the far end of `stream` (the one its listener accepted it on) belongs to
/// `expected` (sock_diag(7); a query on a local socket, not a round trip to anyone).
fn check_owner(stream: &TcpStream, expected: u32) -> io::Result<()> {
    let (local, remote) = (stream.local_addr()?, stream.peer_addr()?);
    match tenement_proto::sockdiag::tcp_peer(local, remote)? {
        Some(owner) if owner.uid == expected => Ok(()),
        Some(owner) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the listener on {remote} belongs to uid {}, not the instance's uid {expected}",
                owner.uid
            ),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("the socket that accepted the connection to {remote} is gone"),
        )),
    }
}

async fn handshake<S>(
    stream: S,
    slot: OwnedSemaphorePermit,
    unanswered: Option<OwnedSemaphorePermit>,
) -> io::Result<Connection>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnectionState::default());
    let io = WriteGuarded {
        inner: stream,
        state: state.clone(),
    };
    let (send, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    let abandon = state.abandon.clone();
    tokio::spawn(async move {
        // Its place among the instance's `max_upstream_connections`, given back when the
        // connection itself ends (a dead one left in the idle list holds nothing).
        let _slot = slot;
        tokio::select! {
            ended = connection.with_upgrades() => {
                if let Err(e) = ended {
                    tracing::debug!("upstream connection ended: {e}");
                }
            }
            () = abandon.cancelled() => tracing::debug!("upstream connection abandoned"),
        }
    });
    Ok(Connection {
        send,
        state,
        unanswered,
        worker: crate::workers::current(),
    })
}

/// An upstream socket whose write side may die before its read side: EPIPE or ECONNRESET on
/// a write (the instance closed the connection, maybe after answering) sets the connection's
/// `write_broken` and every later write is accepted and dropped, so hyper keeps reading the
/// answer instead of failing the exchange. Reads are untouched: an instance that closed
/// without answering still ends in a read error or EOF, which is a 502.
struct WriteGuarded<S> {
    inner: S,
    state: Arc<ConnectionState>,
}

impl<S> WriteGuarded<S> {
    fn broken(&self) -> bool {
        self.state.write_broken.load(Ordering::Acquire)
    }

    /// `Ok(written)` for what went out, `Ok(len)` (dropped) once the peer is gone.
    fn absorb(&self, result: io::Result<usize>, len: usize) -> io::Result<usize> {
        match result {
            Err(e) if peer_gone(&e) => {
                tracing::debug!("the instance stopped reading the request: {e}");
                self.state.write_broken.store(true, Ordering::Release);
                Ok(len)
            }
            other => other,
        }
    }
}

fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteGuarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteGuarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.broken() {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        Poll::Ready(self.absorb(result, buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.broken() {
            return Poll::Ready(Ok(len));
        }
        let result = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        Poll::Ready(self.absorb(result, len))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.broken() {
            return Poll::Ready(Ok(()));
        }
        let result = std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx));
        Poll::Ready(self.absorb(result.map(|()| 0), 0).map(|_| ()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.broken() {
            return Poll::Ready(Ok(()));
        }
        let result = std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
        Poll::Ready(self.absorb(result.map(|()| 0), 0).map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of `instance`'s first process at `address`, with no owner check.
    fn key_of(address: Address, instance: &str) -> PoolKey {
        PoolKey {
            address,
            generation: 1,
            owner_uid: None,
            instance: instance.parse().expect("id"),
        }
    }

    /// A listener with a backlog of 2 that accepts nothing yet: two new connections go out,
    /// the third waits (its SYN would overflow the accept queue) until one is answered.
    #[tokio::test]
    async fn new_connections_wait_while_the_accept_queue_is_full() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(2).expect("listen");
        let address = Address::Tcp(listener.local_addr().expect("address"));
        let pool = Arc::new(Pool::default());
        let key = key_of(address, "app:a");
        let checkout = |pool: Arc<Pool>, key: PoolKey, wait_ms: u64| async move {
            let until = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
            pool.checkout(&key, None, 16, true, until, Duration::from_secs(5))
                .await
        };
        let (mut first, _) = checkout(pool.clone(), key.clone(), 1_000)
            .await
            .expect("the first");
        let (_second, _) = checkout(pool.clone(), key.clone(), 1_000)
            .await
            .expect("the second");
        let third = checkout(pool.clone(), key.clone(), 200).await;
        assert_eq!(
            third.err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock),
            "a third connection went out to a full accept queue"
        );
        // One is answered: a third may go out.
        let waiting = tokio::spawn(checkout(pool.clone(), key.clone(), 5_000));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        first.answered();
        let (_third, _) = waiting
            .await
            .expect("join")
            .expect("the third, once one was answered");
    }

    /// The accept queue the route states is the limit, without asking sock_diag: a listener
    /// with room for two, stated as one, gets one new connection unanswered at a time.
    #[tokio::test]
    async fn the_routes_backlog_is_the_limit_when_it_states_one() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(2).expect("listen");
        let key = key_of(
            Address::Tcp(listener.local_addr().expect("address")),
            "app:b",
        );
        let pool = Pool::default();
        let checkout = |wait_ms| {
            let until = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
            pool.checkout(&key, Some(1), 16, true, until, Duration::from_secs(5))
        };
        let (mut first, _) = checkout(1_000).await.expect("the first");
        let second = checkout(200).await;
        assert_eq!(
            second.err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock),
            "a second connection went out past the stated accept queue of one"
        );
        first.answered();
        checkout(1_000)
            .await
            .expect("the second, once the first was answered");
    }

    /// Many process generations come and go (each wake is a new one); the pool keeps lists
    /// for about as many as are alive, not for every one it has seen.
    #[tokio::test]
    async fn the_lists_of_stopped_processes_are_dropped_as_instances_wake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = Address::Tcp(listener.local_addr().expect("address"));
        let pool = Pool::default();
        let instance: InstanceId = "app:a".parse().expect("id");
        let mut alive = None;
        for generation in 0..1_000u64 {
            let key = PoolKey {
                address: address.clone(),
                generation,
                owner_uid: None,
                instance: instance.clone(),
            };
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            let checkout = pool.checkout(&key, None, 4, false, until, Duration::from_secs(30));
            let (accepted, checked_out) = tokio::join!(listener.accept(), checkout);
            let (connection, _) = checked_out.expect("a connection");
            pool.put(key, connection);
            // The previous process exits: its end of the connection closes.
            alive = Some(accepted.expect("accept").0);
            tokio::task::yield_now().await;
        }
        drop(alive);
        let lists = lock(&pool.idle).lists.len();
        assert!(
            lists <= 128,
            "{lists} lists kept for 1,000 generations, one alive"
        );
    }

    /// Each worker uses its own idle connections first, then another worker's (which go back
    /// to the worker that drives them), and opens a new one only when none is idle.
    #[test]
    fn idle_connections_stay_with_the_worker_that_drives_them() {
        let workers = crate::workers::Workers::start(2).expect("workers");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = Address::Tcp(std_listener.local_addr().expect("address"));
        // Accepted and held open, never answered: the connections only need to exist.
        let held = std::thread::spawn(move || {
            std_listener
                .incoming()
                .take(2)
                .map(|s| s.expect("accept"))
                .collect::<Vec<_>>()
        });
        let pool = Arc::new(Pool::default());
        let key = key_of(address, "app:a");
        // Checks out on worker `on` (two at once with `both`), puts the connections back, and
        // says for each whether it was kept alive and which worker drives it.
        let round = |on: usize, both: bool| {
            let (pool, key) = (pool.clone(), key.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            workers.handles()[on].spawn(async move {
                let until = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut taken = Vec::new();
                for _ in 0..if both { 2 } else { 1 } {
                    let (mut connection, reused) = pool
                        .checkout(&key, None, 4, false, until, Duration::from_secs(5))
                        .await
                        .expect("checkout");
                    // Taken again only once its task has run (hyper's "ready").
                    std::future::poll_fn(|cx| connection.send.poll_ready(cx))
                        .await
                        .expect("ready");
                    connection.answered();
                    taken.push((reused, connection.worker, connection));
                }
                let mut seen = Vec::new();
                for (reused, worker, connection) in taken {
                    pool.put(key.clone(), connection);
                    seen.push((reused, worker));
                }
                tx.send(seen).expect("send");
            });
            rx.recv().expect("recv")
        };
        assert_eq!(round(0, false), [(false, 0)], "worker 0 opens one");
        assert_eq!(round(0, false), [(true, 0)], "and keeps using it");
        assert_eq!(
            round(1, false),
            [(true, 0)],
            "worker 1 uses worker 0's idle one rather than open a second"
        );
        assert_eq!(round(0, false), [(true, 0)], "which went back to worker 0");
        assert_eq!(
            round(1, true),
            [(true, 0), (false, 1)],
            "two at once on worker 1: worker 0's, and a new one of its own"
        );
        assert_eq!(round(1, false), [(true, 1)], "its own first");
        drop(pool);
        workers.stop();
        let _ = held.join();
    }
}
