//! Keep-alive HTTP/1.1 connections to instances, over loopback TCP or Unix sockets.
//!
//! Connections are keyed by address and process generation, so a connection to a process that
//! has since been replaced is never reused. A connection is taken out for one request and put
//! back when the response body has been read to its end (HTTP/1.1 cannot pipeline).
//!
//! Why not hyper-util's pooled client: the proxy must connect *before* it gives the request
//! body away (a refused connect means "wake the instance and retry", which needs the request
//! intact), and it routes to Unix sockets by instance; hyper's `conn` API gives both directly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tenement_proto::rpc::Address;
use tokio::net::{TcpStream, UnixStream};

use crate::respond::ProxyBody;

pub type Sender = http1::SendRequest<ProxyBody>;

/// Idle connections kept per upstream.
const MAX_IDLE_PER_UPSTREAM: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub address: Address,
    pub generation: u64,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Sender>>>,
}

impl Pool {
    /// An idle connection that is still open, if any.
    pub fn take(&self, key: &PoolKey) -> Option<Sender> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub fn put(&self, key: PoolKey, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() > 1024 {
            // Forget upstreams whose connections all closed (old generations).
            idle.retain(|_, list| {
                list.retain(|s| !s.is_closed());
                !list.is_empty()
            });
        }
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(sender);
        }
    }

    /// Opens a new connection within `timeout`.
    pub async fn connect(&self, key: &PoolKey, timeout: Duration) -> std::io::Result<Sender> {
        let connect = async {
            match &key.address {
                Address::Tcp(addr) => {
                    let stream = TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    handshake(stream).await
                }
                Address::Unix(path) => handshake(UnixStream::connect(path).await?).await,
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "upstream connect timed out",
            )),
        }
    }
}

async fn handshake<S>(stream: S) -> std::io::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
