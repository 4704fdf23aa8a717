//! Probes of what the supervisor did to the machine: processes, ports, HTTP answers, files.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// The parent of `pid`, from `/proc/PID/stat`.
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let i = stat.rfind(')')?;
    stat[i + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// The exec helper above the app `pid` that `status` reports.
pub fn exec_helper_of(app: i32) -> i32 {
    let helper = parent_pid(app).unwrap_or_else(|| panic!("app {app} has no parent"));
    let cmdline = fs::read(format!("/proc/{helper}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("tenement-exec"),
        "the parent {helper} of app {app} is not an exec helper: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    helper
}

/// Every live descendant of `pid` (children, grandchildren, ...).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut table: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|s| s.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                table.push((p, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(parent) = stack.pop() {
        for &(p, pp) in &table {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                stack.push(p);
            }
        }
    }
    found
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether `127.0.0.1:port` can be bound now.
pub fn port_bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok()
}

/// How long a test waits for something that must happen (a process dying, a state change, a
/// line in the logs): generous, because on a shared 2-core machine under load "promptly" can
/// take seconds. The deadline only bounds a hang; it proves nothing about speed. A test that
/// must show something is prompt compares with a configured interval much longer than this
/// instead, and one that must show something is not early keeps its lower bound.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(20);

/// How long an HTTP exchange with an app may take before the probe gives up (an app may be
/// made to start slowly: see `wake_e2e.rs`).
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `condition` every 10 ms until it holds (true) or `within` passed (false).
pub fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn http_exchange<S: Read + Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> io::Result<(u16, String)> {
    let extra: String = extra_headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("incomplete response {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad head {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// `GET path` over TCP; the status and the body.
pub fn try_http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, EVENT_DEADLINE)?;
    stream.set_read_timeout(Some(HTTP_READ_TIMEOUT))?;
    http_exchange(&mut stream, "GET", path, &[], "")
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `METHOD path` with extra headers and a text body over TCP; the status and the body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let result = TcpStream::connect_timeout(&addr, EVENT_DEADLINE).and_then(|mut s| {
        s.set_read_timeout(Some(HTTP_READ_TIMEOUT))?;
        http_exchange(&mut s, method, path, headers, body)
    });
    result.unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// `GET path` over a Unix stream socket.
pub fn http_get_unix(socket: &Path, path: &str) -> (u16, String) {
    let result = UnixStream::connect(socket).and_then(|mut stream| {
        stream.set_read_timeout(Some(HTTP_READ_TIMEOUT))?;
        http_exchange(&mut stream, "GET", path, &[], "")
    });
    result.unwrap_or_else(|e| panic!("GET unix:{}{path}: {e}", socket.display()))
}

/// The pid of the process serving `addr` (tiny-http and the Python fixtures answer `/pid`).
pub fn served_pid(addr: SocketAddr) -> i32 {
    let (status, body) = http_get(addr, "/pid");
    assert_eq!(status, 200, "GET /pid: {body}");
    body.trim().parse().expect("a pid")
}

/// Every file and directory under `dir`, relative, sorted (empty if it does not exist).
pub fn tree_listing(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Reads a whole file that another process writes, waiting until it is non-empty.
pub fn read_when_written(path: &Path, within: Duration) -> String {
    let mut text = String::new();
    let found = wait_until(within, || {
        text = File::open(path)
            .and_then(|mut f| {
                let mut s = String::new();
                f.read_to_string(&mut s)?;
                Ok(s)
            })
            .unwrap_or_default();
        text.ends_with('\n')
    });
    assert!(
        found,
        "{} was not written within {within:?}",
        path.display()
    );
    text
}
