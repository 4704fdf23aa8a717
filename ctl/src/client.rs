//! The supervisor client: connect, say hello, send a request, read its answer or a stream of
//! answers. On the admin socket here; through the management API with `--remote`
//! (`remote.rs`), behind the same [`Client`].
//!
//! Blocking std I/O on a `UnixStream` with read and write deadlines; no async runtime. Every
//! failure becomes one line that says what failed and how to fix it: socket missing,
//! permission, a supervisor of another protocol version, or a typed [`RemoteError`] whose
//! [`ErrorCode`] picks tenctl's exit status. This module prints nothing.

use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;
use tenement_proto::frame::{self, FrameError};
use tenement_proto::rpc::{ErrorCode, Request, Response, PROTOCOL_VERSION};

/// The supervisor answered with `Response::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {}

/// One connection to the supervisor: its admin socket, past the hello, or the management
/// API of a remote tenement (`--remote`).
pub struct Client {
    inner: Inner,
}

enum Inner {
    Local(Local),
    Remote(Box<crate::remote::RemoteClient>),
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Local(local) => write!(f, "Client({})", local.socket.display()),
            Inner::Remote(_) => f.write_str("Client(remote)"),
        }
    }
}

impl Client {
    /// Connects to `socket` and exchanges hellos. `timeout` bounds every later read and write
    /// (`None`: wait forever, for `logs --follow`).
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> anyhow::Result<Client> {
        Ok(Client {
            inner: Inner::Local(Local::connect(socket, timeout)?),
        })
    }

    /// The management API of `remote`; `timeout` bounds each call (`None`: a stream).
    pub fn remote(
        remote: &crate::remote::Remote,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Client> {
        Ok(Client {
            inner: Inner::Remote(Box::new(crate::remote::RemoteClient::new(remote, timeout)?)),
        })
    }

    /// Sends one request and reads its one answer; `Response::Error` becomes a [`RemoteError`].
    pub fn call(&mut self, request: &Request) -> anyhow::Result<Response> {
        match &mut self.inner {
            Inner::Local(local) => local.call(request),
            Inner::Remote(remote) => remote.call(request),
        }
    }

    /// The next message of a stream (the rest of a `list`, `logs --follow`), `None` when the
    /// supervisor ends it. `Response::Error` becomes a [`RemoteError`].
    pub fn next_streamed(&mut self) -> anyhow::Result<Option<Response>> {
        match &mut self.inner {
            Inner::Local(local) => local.next_streamed(),
            Inner::Remote(remote) => remote.next_streamed(),
        }
    }
}

/// The admin socket.
struct Local {
    stream: UnixStream,
    socket: PathBuf,
    timeout: Option<Duration>,
}

/// An OS error's text without Rust's ` (os error N)` suffix, as the brief's messages read.
fn os_error_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_owned(),
        None => e.to_string(),
    }
}

impl Local {
    fn connect(socket: &Path, timeout: Option<Duration>) -> anyhow::Result<Local> {
        let stream = match UnixStream::connect(socket) {
            Ok(stream) => stream,
            Err(e) => return Err(connect_error(socket, &e)),
        };
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .with_context(|| format!("cannot set a deadline on {}", socket.display()))?;
        let mut client = Local {
            stream,
            socket: socket.to_path_buf(),
            timeout,
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client: format!("tenctl {}", env!("CARGO_PKG_VERSION")),
        };
        client.send(&hello)?;
        match client.receive()? {
            Some(Response::Hello { .. }) => Ok(client),
            Some(Response::Error {
                code: ErrorCode::PermissionDenied,
                message,
            }) => Err(anyhow!(
                "permission denied on {}: {message}",
                socket.display()
            )),
            Some(Response::Error { code, message }) => Err(RemoteError { code, message }.into()),
            Some(other) => bail!(
                "the supervisor at {} answered hello with {}",
                socket.display(),
                other.name()
            ),
            None => bail!(
                "the supervisor at {} closed the connection before answering hello",
                socket.display()
            ),
        }
    }

    fn call(&mut self, request: &Request) -> anyhow::Result<Response> {
        self.send(request)?;
        match self.receive()? {
            Some(Response::Error { code, message }) => Err(RemoteError { code, message }.into()),
            Some(response) => Ok(response),
            None => bail!(
                "the supervisor at {} closed the connection without answering {}",
                self.socket.display(),
                request.name()
            ),
        }
    }

    fn next_streamed(&mut self) -> anyhow::Result<Option<Response>> {
        match self.receive()? {
            Some(Response::Error { code, message }) => Err(RemoteError { code, message }.into()),
            other => Ok(other),
        }
    }

    fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        frame::write_message(&mut self.stream, request).map_err(|e| self.io_error(e, "send to"))
    }

    /// Reads one message; `None` on a clean end of stream between frames.
    fn receive(&mut self) -> anyhow::Result<Option<Response>> {
        let body = match frame::read_frame(&mut self.stream) {
            Ok(body) => body,
            Err(FrameError::Closed) => return Ok(None),
            Err(e) => return Err(self.io_error(e, "read from")),
        };
        match frame::decode::<Response>(&body) {
            Ok(response) => Ok(Some(response)),
            Err(e) => match lenient_error(&body) {
                Some(remote) => Err(remote.into()),
                None => Err(anyhow!(
                    "cannot understand the supervisor at {} ({e}); are tenctl and tenement-supervisor the same release?",
                    self.socket.display()
                )),
            },
        }
    }

    fn io_error(&self, e: FrameError, verb: &str) -> anyhow::Error {
        let socket = self.socket.display();
        match e {
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let secs = self.timeout.map_or(0, |t| t.as_secs());
                anyhow!("no answer from the supervisor at {socket} within {secs} s")
            }
            FrameError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                anyhow!(
                    "the supervisor at {socket} closed the connection in the middle of a message"
                )
            }
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                anyhow!("the supervisor at {socket} closed the connection (see its log)")
            }
            FrameError::Io(io) => anyhow!(
                "cannot {verb} the supervisor at {socket}: {}",
                os_error_text(&io)
            ),
            other => anyhow!("cannot {verb} the supervisor at {socket}: {other}"),
        }
    }
}

/// The one-line error for a failed `connect(2)`.
fn connect_error(socket: &Path, e: &io::Error) -> anyhow::Error {
    let path = socket.display();
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow!(
            "cannot reach the supervisor at {path}: {} (is tenement-supervisor running with this config?)",
            os_error_text(e)
        ),
        io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {path}; run as root or as a member of the admin group"
        ),
        _ => anyhow!(
            "cannot connect to the supervisor at {path}: {}",
            os_error_text(e)
        ),
    }
}

/// An error frame this build cannot decode strictly, typically a newer supervisor's new error
/// code. Compatibility rule 3: an unknown code is treated as `internal`.
fn lenient_error(body: &[u8]) -> Option<RemoteError> {
    #[derive(Deserialize)]
    struct AnyError {
        #[serde(rename = "type")]
        kind: String,
        code: serde_json::Value,
        message: String,
    }
    let raw: AnyError = serde_json::from_slice(body).ok()?;
    if raw.kind != "error" {
        return None;
    }
    let code = serde_json::from_value(raw.code).unwrap_or(ErrorCode::Internal);
    Some(RemoteError {
        code,
        message: raw.message,
    })
}

/// The error for an answer of the wrong type.
pub fn unexpected(request: &str, response: &Response) -> anyhow::Error {
    anyhow!(
        "unexpected answer from the supervisor to {request}: {}",
        response.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_error_codes_are_read_as_internal() {
        let body = br#"{"type":"error","code":"brand_new_code","message":"something new"}"#;
        assert_eq!(
            lenient_error(body),
            Some(RemoteError {
                code: ErrorCode::Internal,
                message: "something new".into()
            })
        );
        let known = br#"{"type":"error","code":"unknown_instance","message":"m","extra":1}"#;
        assert_eq!(
            lenient_error(known).map(|e| e.code),
            Some(ErrorCode::UnknownInstance)
        );
        assert_eq!(lenient_error(br#"{"type":"ok"}"#), None);
        assert_eq!(lenient_error(b"not json"), None);
    }

    #[test]
    fn a_missing_socket_says_how_to_fix_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("admin.sock");
        let err = Client::connect(&socket, Some(Duration::from_secs(1))).expect_err("no socket");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the supervisor at {}: No such file or directory (is tenement-supervisor running with this config?)",
                socket.display()
            )
        );
    }
}
