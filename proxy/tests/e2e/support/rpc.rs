//! A blocking client of the supervisor's admin socket: what a test asks to see what the proxy
//! made the supervisor do (states, pids, lifecycle events).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tenement_proto::frame;
use tenement_proto::rpc::{
    InstanceInfo, InstanceState, LogStream, Request, Response, PROTOCOL_VERSION,
};
use tenement_proto::InstanceId;

/// Parses `"service:id"`.
pub fn iid(text: &str) -> InstanceId {
    InstanceId::parse(text).unwrap_or_else(|e| panic!("bad instance id in a test: {e}"))
}

/// An admin connection that has said hello.
pub struct Admin {
    stream: UnixStream,
}

impl Admin {
    pub fn connect(path: &Path) -> Admin {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set a read timeout");
        let mut admin = Admin { stream };
        match admin.call(Request::Hello {
            version: PROTOCOL_VERSION,
            client: "proxy-e2e".to_owned(),
        }) {
            Response::Hello { .. } => admin,
            other => panic!("hello was answered with {other:?}"),
        }
    }

    /// Sends one request and reads one response.
    pub fn call(&mut self, request: Request) -> Response {
        let name = request.name();
        frame::write_message(&mut self.stream, &request)
            .unwrap_or_else(|e| panic!("send {name}: {e}"));
        frame::read_message(&mut self.stream).unwrap_or_else(|e| panic!("answer to {name}: {e}"))
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

    pub fn status(&mut self, instance: &str) -> InstanceInfo {
        match self.call(Request::Status {
            instance: iid(instance),
        }) {
            Response::Status { status } => *status,
            other => panic!("status {instance} was answered with {other:?}"),
        }
    }

    pub fn state(&mut self, instance: &str) -> InstanceState {
        self.status(instance).state
    }

    pub fn stop(&mut self, instance: &str) -> Response {
        self.call(Request::Stop {
            instance: iid(instance),
        })
    }

    /// The supervisor's own lifecycle lines about `instance` (`started (pid N)`, ...).
    pub fn events(&mut self, instance: &str) -> Vec<String> {
        match self.call(Request::Logs {
            instance: iid(instance),
            lines: None,
            follow: false,
        }) {
            Response::Logs { lines } => lines
                .into_iter()
                .filter(|l| l.stream == LogStream::Event)
                .map(|l| l.line)
                .collect(),
            other => panic!("logs {instance} was answered with {other:?}"),
        }
    }

    /// How many processes the supervisor started for `instance`.
    pub fn starts(&mut self, instance: &str) -> usize {
        self.events(instance)
            .iter()
            .filter(|l| l.starts_with("started"))
            .count()
    }
}
