//! A raw HTTP/1.1 client over std `TcpStream`: the tests need to send what a browser would
//! not (bad Host headers, 100 KB headers, partial heads, upgrades), so requests are written
//! as text and responses parsed by hand, bodies streamed (Content-Length, chunked or to EOF).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a test waits for any answer: longer than a cold wake of a Python app.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A status line and headers.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

/// Connects with the test timeouts set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends a WebSocket handshake for `/upgrade` at `host` (the mirror fixture echoes what follows
/// a 101); returns the stream to write on, a reader of what comes back, and the answer's head.
pub fn open_websocket(
    addr: SocketAddr,
    host: &str,
) -> io::Result<(TcpStream, BufReader<TcpStream>, Head)> {
    let mut stream = connect(addr)?;
    write!(
        stream,
        "GET /upgrade HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let head = read_head(&mut reader)?;
    Ok((stream, reader, head))
}

/// Reads a status line and headers.
pub fn read_head<R: BufRead>(reader: &mut R) -> io::Result<Head> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("status {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the response head",
            ));
        }
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("header {trimmed:?}"))
        })?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok(Head { status, headers })
}

/// The body of a response with `head`, as a reader that ends where the body ends.
pub fn body_reader<'a, R: BufRead + 'a>(reader: R, head: &Head) -> Box<dyn Read + 'a> {
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return Box::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        });
    }
    match head
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(len) => Box::new(reader.take(len)),
        None if head.status == 204 || head.status == 304 => Box::new(io::empty()),
        None => Box::new(reader),
    }
}

/// A `Transfer-Encoding: chunked` decoder.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
            if self.left == 0 {
                // Trailers end with an empty line.
                loop {
                    line.clear();
                    if self.inner.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// Reads one whole response from `stream`.
pub fn read_reply(stream: &TcpStream) -> io::Result<Reply> {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?;
    let mut body = Vec::new();
    body_reader(&mut reader, &head).read_to_end(&mut body)?;
    Ok(Reply { head, body })
}

/// Sends `request` (a whole request, head and body) on a new connection; the response.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Reply> {
    let mut stream = connect(addr)?;
    stream.write_all(request)?;
    read_reply(&stream)
}

/// `GET path` with `Host: host` and `Connection: close`.
pub fn try_get(addr: SocketAddr, host: &str, path: &str) -> io::Result<Reply> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    exchange(addr, request.as_bytes())
}

/// [`try_get`], panicking on an I/O error.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    try_get(addr, host, path).unwrap_or_else(|e| panic!("GET http://{host}{path} via {addr}: {e}"))
}

/// `GET path` that must answer 200; the body, trimmed.
pub fn get_ok(addr: SocketAddr, host: &str, path: &str) -> String {
    let reply = get(addr, host, path);
    assert_eq!(
        reply.status(),
        200,
        "GET http://{host}{path}: {}",
        reply.text()
    );
    reply.text().trim().to_owned()
}

/// Reads from `stream` until the peer closes it (true) or `within` passes (false). Data the
/// peer sends meanwhile (an error response) is discarded.
pub fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("set a read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(e) => panic!("reading from the proxy: {e}"),
        }
    }
}
