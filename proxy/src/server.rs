//! How the proxy speaks HTTP to clients: the hyper connection builder with the proxy's limits
//! (header read timeout, largest head, HTTP/2 keep-alive pings) and the HTTP/1-vs-2 sniff.
//!
//! One place, so the binary, the tests and the fuzz targets serve connections the same way.

use std::time::Duration;

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

/// Waits until the client has sent enough to tell HTTP/1 from the HTTP/2 preface (one byte
/// that cannot start it, or the whole 24-byte preface). False when the client closed.
pub async fn first_bytes(stream: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
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
