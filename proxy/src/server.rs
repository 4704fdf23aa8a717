//! How the proxy speaks HTTP to clients: the hyper connection builder with the proxy's limits
//! (header read timeout, largest head, HTTP/2 keep-alive pings) and the HTTP/1-vs-2 sniff.
//!
//! One place, so the binary, the tests and the fuzz targets serve connections the same way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

#[cfg(test)]
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// Client header read timeout; also how long an idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head accepted (larger: 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The builder every client connection is served with.
pub fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // Dead HTTP/2 peers are found by pings rather than held forever.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the client has sent enough to tell HTTP/1 from the HTTP/2 preface (one byte
/// that cannot start it, or the whole 24-byte preface). False when the client closed.
pub async fn first_bytes(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        if stream.readable().await.is_err() {
            return false;
        }
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE.len() || buf[..n] != PREFACE[..n] => return true,
            // A prefix of the preface, arriving in pieces: peek again shortly (peek does not
            // consume, so readiness alone would spin).
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// [`first_bytes`] for a stream that cannot be peeked (TLS): reads them, and gives them back
/// first through [`Rewind`]. `None` when the client closed or failed first.
pub async fn read_first_bytes<S: AsyncRead + Unpin>(mut stream: S) -> Option<Rewind<S>> {
    let mut head = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let want = PREFACE.len() - head.len();
        match stream.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() >= PREFACE.len() || head[..] != PREFACE[..head.len()] {
            return Some(Rewind {
                head,
                pos: 0,
                inner: stream,
            });
        }
    }
}

/// A stream whose first bytes were read ahead, given back before the rest.
pub struct Rewind<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.head[pos..pos + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn first_bytes_are_given_back_whole_and_a_preface_prefix_waits_for_more() {
        // HTTP/1: one byte that cannot start the preface is enough.
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let mut rewound = read_first_bytes(server).await.expect("bytes");
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"GET / HTTP/1.1\r\n");

        // A prefix of the preface is not enough; the whole preface is.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"PRI * HT").await.expect("write");
        let reading = tokio::spawn(read_first_bytes(server));
        tokio::task::yield_now().await;
        assert!(!reading.is_finished());
        client.write_all(&PREFACE[8..]).await.expect("write");
        let mut rewound = reading.await.expect("join").expect("bytes");
        client.write_all(b"rest").await.expect("write");
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.expect("read");
        assert_eq!(&all[..24], PREFACE);
        assert_eq!(&all[24..], b"rest");

        // A client that closes first gives nothing.
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(read_first_bytes(server).await.is_none());
    }
}
