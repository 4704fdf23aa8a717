//! Readiness and health probes: a listener seen through sock_diag(7), a connect, an HTTP GET
//! with real status-line parsing, and the `READY=1` datagram of the sd_notify protocol
//! (sd_notify(3)).
//!
//! Probes never sleep a fixed time to decide anything: readiness is polled at millisecond
//! granularity until it passes or the caller's deadline (the registry's startup timeout)
//! cancels it. Each probe is its own task, so a slow instance never delays another's checks.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::sys::FineSleep;

use tenement_proto::rpc::Address;
use tenement_proto::sockdiag::{self, SocketOwner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram, UnixStream};

/// Either kind of stream to an instance.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

pub async fn connect(address: &Address) -> std::io::Result<Conn> {
    match address {
        Address::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Conn::Tcp(stream))
        }
        Address::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).await?)),
    }
}

/// How often readiness is polled: finely while a fast (native) app may be about to listen,
/// then at tokio's millisecond granularity. Each try is a system call or three (a sock_diag
/// query, or a socket, a connect and a close): fine polling through an interpreter's 50 ms
/// start cost the supervisor ~6 ms of CPU per wake, which on a small machine slowed the very
/// start it was waiting for.
fn poll_pause(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_millis(10) {
        Duration::from_micros(200)
    } else {
        Duration::from_millis(1)
    }
}

/// Sleeps `pause`, finely when `fine` is available.
async fn pause(fine: Option<&FineSleep>, pause: Duration) {
    match fine {
        Some(fine) if pause < Duration::from_millis(1) => fine.sleep(pause).await,
        _ => tokio::time::sleep(pause).await,
    }
}

/// Polls until `address` accepts a connection (never returns otherwise; the caller bounds it).
pub async fn wait_accepting(address: &Address) {
    let started = std::time::Instant::now();
    let fine = FineSleep::new();
    loop {
        if connect(address).await.is_ok() {
            return;
        }
        pause(fine.as_ref(), poll_pause(started.elapsed())).await;
    }
}

/// Polls sock_diag(7) until a connect to `addr` would reach a listener, and returns that
/// listener. The kernel's own lookup (as for an arriving SYN) sees the app's listener the
/// moment it calls listen(2) and leaves no probe connection for the app to accept and drop;
/// the listener it reports carries the accept queue the proxy's herd limit needs. An error
/// means sock_diag cannot be asked here; the caller then polls with connects.
pub async fn wait_listening(addr: SocketAddr) -> std::io::Result<SocketOwner> {
    let started = std::time::Instant::now();
    let fine = FineSleep::new();
    loop {
        if let Some(listener) = sockdiag::tcp_listener_for(addr)? {
            return Ok(listener);
        }
        pause(fine.as_ref(), poll_pause(started.elapsed())).await;
    }
}

/// Polls until `GET path` answers 2xx.
pub async fn wait_healthy(address: &Address, path: &str, per_try: Duration) {
    let started = std::time::Instant::now();
    let fine = FineSleep::new();
    loop {
        if let Ok(Ok(status)) = tokio::time::timeout(per_try, http_get_status(address, path)).await
        {
            if (200..300).contains(&status) {
                return;
            }
        }
        pause(fine.as_ref(), poll_pause(started.elapsed())).await;
    }
}

/// Waits for `READY=1` on the instance's notify socket.
pub async fn wait_notify(socket: &UnixDatagram) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok(n) = socket.recv(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        if notify_says_ready(&buf[..n]) {
            return;
        }
    }
}

/// Whether an sd_notify datagram (newline-separated assignments) contains `READY=1`.
pub fn notify_says_ready(datagram: &[u8]) -> bool {
    datagram
        .split(|&b| b == b'\n')
        .any(|line| line == b"READY=1")
}

/// One health check: the status code, or why there is none.
pub async fn check_health(address: &Address, path: &str, timeout: Duration) -> Result<u16, String> {
    match tokio::time::timeout(timeout, http_get_status(address, path)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => Ok(status),
        Ok(Ok(status)) => Err(format!("GET {path} answered {status}")),
        Ok(Err(e)) => Err(format!("GET {path}: {e}")),
        Err(_) => Err(format!(
            "GET {path}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// Sends `GET path` and parses the response's status line and headers.
pub async fn http_get_status(address: &Address, path: &str) -> std::io::Result<u16> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tenement-health\r\nConnection: close\r\n\r\n"
    );
    match connect(address).await? {
        Conn::Tcp(mut s) => exchange(&mut s, request.as_bytes()).await,
        Conn::Unix(mut s) => exchange(&mut s, request.as_bytes()).await,
    }
}

async fn exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a complete status line and headers",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(status) = parse_status(&buf)? {
            return Ok(status);
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response headers over 64 KiB",
            ));
        }
    }
}

/// `Ok(None)` while the head is incomplete.
pub fn parse_status(buf: &[u8]) -> std::io::Result<Option<u16>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Ok(response.code),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP response: {e}"),
        )),
    }
}

/// Binds a notify socket at `path` (replacing a stale one).
pub fn bind_notify(path: &Path) -> std::io::Result<UnixDatagram> {
    let _ = std::fs::remove_file(path);
    UnixDatagram::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed_not_guessed() {
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\r\n\r\n").ok(),
            Some(Some(204))
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Busy\r\nX: y\r\n\r\n").ok(),
            Some(Some(503))
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 200 OK\r\nContent-").ok(),
            Some(None)
        );
        assert!(parse_status(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        // "200" appearing in a body-like garbage line is not a status.
        assert!(parse_status(b"hello 200 OK\r\n\r\n").is_err());
    }

    /// What can be proven without timing the machine: each sleep lasts at least what it was
    /// asked for (a lower bound on the real clock), and the sleeps are served by the timerfd,
    /// not by tokio's timer wheel (1 ms granularity). The second is checked against tokio's
    /// clock, paused here: a tokio sleep, such as the 1 ms fallback, would advance it, the
    /// timerfd (CLOCK_MONOTONIC, armed with the exact 100 µs) does not. How fine the kernel
    /// actually is depends on the machine's load: that figure belongs in bench/, not here.
    #[tokio::test(start_paused = true)]
    async fn fine_sleep_is_finer_than_a_millisecond() {
        let fine = FineSleep::new().expect("timerfd");
        let started = std::time::Instant::now();
        let tokio_started = tokio::time::Instant::now();
        for _ in 0..10 {
            fine.sleep(Duration::from_micros(100)).await;
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_micros(1000), "{took:?}");
        assert_eq!(
            tokio_started.elapsed(),
            Duration::ZERO,
            "the fine sleeps fell back to tokio's millisecond timer"
        );
    }

    #[test]
    fn notify_datagrams() {
        assert!(notify_says_ready(b"READY=1"));
        assert!(notify_says_ready(b"STATUS=up\nREADY=1\n"));
        assert!(!notify_says_ready(b"READY=0"));
        assert!(!notify_says_ready(b"NOTREADY=1"));
    }

    #[tokio::test]
    async fn health_check_reports_status_and_timeouts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = Address::Tcp(listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply: &[u8] = if n == 1 {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else if n == 2 {
                    b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
                } else {
                    // Never answer.
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    b""
                };
                let _ = s.write_all(reply).await;
            }
        });
        // The answers come at once, but on a loaded machine "at once" can take a while: their
        // checks get a generous timeout; the silent server's a short one.
        let generous = Duration::from_secs(20);
        assert_eq!(check_health(&addr, "/health", generous).await, Ok(200));
        let err = check_health(&addr, "/health", generous)
            .await
            .expect_err("500");
        assert!(err.contains("answered 500"), "{err}");
        let err = check_health(&addr, "/health", Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert!(err.contains("no answer within 300 ms"), "{err}");
    }
}
