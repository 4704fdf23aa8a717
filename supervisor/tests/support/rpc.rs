//! The blocking RPC side of the harness: a [`Client`] that has said hello, raw frames for
//! tests of what the supervisor refuses, and the proxy's watch stream.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tenement_proto::frame::{self, FrameError};
use tenement_proto::rpc::{
    Address, ErrorCode, InstanceInfo, InstanceState, LogLine, LogStream, Request, Response, Route,
    PROTOCOL_VERSION,
};
use tenement_proto::InstanceId;

use super::{Sandbox, EVENT_DEADLINE};

/// The read timeout of RPC clients: longer than any wake a test makes.
const RPC_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses `"service:id"`.
pub fn iid(text: &str) -> InstanceId {
    InstanceId::parse(text).unwrap_or_else(|e| panic!("bad instance id in a test: {e}"))
}

/// A blocking RPC client that has said hello.
pub struct Client {
    stream: UnixStream,
    pub role: tenement_proto::rpc::Role,
}

impl Client {
    pub fn admin(sandbox: &Sandbox) -> Client {
        Client::connect(&sandbox.admin_socket())
    }

    pub fn proxy(sandbox: &Sandbox) -> Client {
        Client::connect(&sandbox.proxy_socket())
    }

    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(RPC_READ_TIMEOUT))
            .expect("set a read timeout");
        let mut client = Client {
            stream,
            role: tenement_proto::rpc::Role::Admin,
        };
        match client.call(Request::Hello {
            version: PROTOCOL_VERSION,
            client: "supervisor-e2e".to_owned(),
        }) {
            Response::Hello { role, .. } => client.role = role,
            other => panic!("hello was answered with {other:?}"),
        }
        client
    }

    /// Makes `call` and `read` give up after `timeout` instead of the default 30 s.
    pub fn with_timeout(self, timeout: Duration) -> Client {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("set a read timeout");
        self
    }

    /// Sends one request and reads one response.
    pub fn call(&mut self, request: Request) -> Response {
        let name = request.name();
        frame::write_message(&mut self.stream, &request)
            .unwrap_or_else(|e| panic!("send {name}: {e}"));
        match self.read() {
            Ok(response) => response,
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let timeout = self.stream.read_timeout().ok().flatten();
                panic!("no answer to {name} within {timeout:?}")
            }
            Err(e) => panic!("no answer to {name}: {e}"),
        }
    }

    /// Reads one response.
    pub fn read(&mut self) -> Result<Response, FrameError> {
        frame::read_message(&mut self.stream)
    }

    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    pub fn wake(&mut self, instance: &str) -> Response {
        self.call(Request::Wake {
            instance: iid(instance),
            timeout_ms: None,
        })
    }

    pub fn spawn(&mut self, instance: &str) -> Response {
        self.call(Request::Spawn {
            instance: iid(instance),
        })
    }

    pub fn stop(&mut self, instance: &str) -> Response {
        self.call(Request::Stop {
            instance: iid(instance),
        })
    }

    pub fn restart(&mut self, instance: &str) -> Response {
        self.call(Request::Restart {
            instance: iid(instance),
        })
    }

    pub fn remove(&mut self, instance: &str, purge: bool) -> Response {
        self.call(Request::Remove {
            instance: iid(instance),
            purge,
        })
    }

    pub fn add(&mut self, instances: &[&str]) -> Response {
        self.call(Request::Add {
            instances: instances.iter().map(|i| iid(i)).collect(),
        })
    }

    /// Every registered instance: `list` is answered in several messages.
    pub fn ps(&mut self) -> Vec<InstanceInfo> {
        let mut all = Vec::new();
        let mut reply = self.call(Request::List {
            query: Default::default(),
        });
        loop {
            match reply {
                Response::Instances {
                    instances, more, ..
                } => {
                    all.extend(instances);
                    if !more {
                        return all;
                    }
                }
                other => panic!("list was answered with {other:?}"),
            }
            reply = frame::read_message(&mut self.stream)
                .unwrap_or_else(|e| panic!("the rest of the list: {e}"));
        }
    }

    pub fn try_status(&mut self, instance: &str) -> Response {
        self.call(Request::Status {
            instance: iid(instance),
        })
    }

    pub fn status(&mut self, instance: &str) -> InstanceInfo {
        match self.try_status(instance) {
            Response::Status { status } => *status,
            other => panic!("status {instance} was answered with {other:?}"),
        }
    }

    pub fn state(&mut self, instance: &str) -> InstanceState {
        self.status(instance).state
    }

    pub fn logs(&mut self, instance: &str) -> Vec<LogLine> {
        match self.call(Request::Logs {
            instance: iid(instance),
            lines: None,
            follow: false,
        }) {
            Response::Logs { lines } => lines,
            other => panic!("logs {instance} was answered with {other:?}"),
        }
    }

    /// The supervisor's own lifecycle lines about `instance`.
    pub fn events(&mut self, instance: &str) -> Vec<String> {
        self.logs(instance)
            .into_iter()
            .filter(|l| l.stream == LogStream::Event)
            .map(|l| l.line)
            .collect()
    }
}

/// The route of a successful wake/spawn/restart, and whether it started a process.
pub fn expect_woken(response: Response) -> (Route, bool) {
    match response {
        Response::Woken { route, started, .. } => (route, started),
        other => panic!("expected woken, got {other:?}"),
    }
}

pub fn expect_ok(response: Response) {
    assert_eq!(response, Response::Ok, "expected ok");
}

/// The message of an error response with `code`.
pub fn expect_error(response: Response, code: ErrorCode) -> String {
    match response {
        Response::Error { code: got, message } if got == code => message,
        other => panic!("expected error {}, got {other:?}", code.as_str()),
    }
}

/// The loopback TCP address of a route.
pub fn tcp_addr(route: &Route) -> SocketAddr {
    match &route.address {
        Address::Tcp(addr) => *addr,
        other => panic!("expected a TCP address, got {other}"),
    }
}

/// `127.0.0.1:PORT` as shown in `InstanceInfo::address`.
pub fn info_port(info: &InstanceInfo) -> u16 {
    let addr: SocketAddr = info
        .address
        .parse()
        .unwrap_or_else(|e| panic!("address {:?} of {}: {e}", info.address, info.instance));
    addr.port()
}

// Raw frames, for tests of what the supervisor refuses.

/// A connection that has said nothing yet.
pub fn raw_connect(path: &Path) -> UnixStream {
    let stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(EVENT_DEADLINE))
        .expect("set a read timeout");
    stream
}

/// Writes `body` with its 4-byte big-endian length prefix.
pub fn send_frame(stream: &mut UnixStream, body: &[u8]) {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("write a frame");
}

/// The next response, `None` when the supervisor closed the connection.
pub fn read_response(stream: &mut UnixStream) -> Option<Response> {
    match frame::read_message::<_, Response>(stream) {
        Ok(response) => Some(response),
        Err(FrameError::Closed) => None,
        Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("reading a response: {e}"),
    }
}

/// Reads until the supervisor closes the connection; panics if it does not within the read
/// timeout.
pub fn expect_closed(stream: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the supervisor kept the connection open: {e}"),
        }
    }
}

pub fn hello_frame(version: u32) -> Vec<u8> {
    serde_json::to_vec(&Request::Hello {
        version,
        client: "raw".to_owned(),
    })
    .expect("encode hello")
}

// The proxy's watch stream.

/// A `subscribe`d proxy connection: responses are read by a thread into a channel.
pub struct Watch {
    writer: UnixStream,
    rx: mpsc::Receiver<Response>,
}

impl Watch {
    /// Subscribes on the proxy socket; returns with the initial snapshot read.
    pub fn subscribe(sandbox: &Sandbox) -> (Watch, Vec<Route>) {
        let mut client = Client::proxy(sandbox);
        frame::write_message(client.stream(), &Request::Subscribe).expect("send subscribe");
        let mut reader = client.stream().try_clone().expect("dup the stream");
        reader.set_read_timeout(None).expect("no read timeout");
        let writer = client.stream().try_clone().expect("dup the stream");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            while let Ok(response) = frame::read_message::<_, Response>(&mut reader) {
                if tx.send(response).is_err() {
                    return;
                }
            }
        });
        let watch = Watch { writer, rx };
        let mut routes = Vec::new();
        loop {
            match watch.recv(EVENT_DEADLINE) {
                Some(Response::Routes {
                    routes: chunk,
                    complete,
                    ..
                }) => {
                    routes.extend(chunk);
                    if complete {
                        break;
                    }
                }
                other => panic!("expected the route snapshot, got {other:?}"),
            }
        }
        (watch, routes)
    }

    pub fn send(&mut self, request: &Request) {
        frame::write_message(&mut self.writer, request).expect("write on the watch stream");
    }

    /// The next message within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Response> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}
