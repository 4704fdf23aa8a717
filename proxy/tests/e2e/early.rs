//! An instance that answers before it has read the request body (413 on an upload that is too
//! big, 401 without credentials) and closes the connection: the client gets the instance's
//! answer, never a 502, over HTTP/1.1 and HTTP/2, whatever the body size.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::support::*;

const EARLY: &str = r#"
[service.early]
command = "@TINY@"
max_body_size = "1g"

[instances]
early = ["a"]
"#;

const HOST: &str = "a.early.localhost";
const ROUNDS: usize = 100;
const SIZES: [usize; 3] = [64 * 1024 + 1, 1 << 20, 50 << 20];
const CHUNK: usize = 64 * 1024;

/// What the app says when it refuses (`tiny-http`'s `/early`): not what the proxy would.
fn expected(authorized: bool) -> (u16, &'static str) {
    if authorized {
        (413, "413 Content Too Large\n")
    } else {
        (401, "401 Unauthorized\n")
    }
}

/// One HTTP/1.1 upload on a new connection. `send_all`: the client writes the whole body
/// before it reads anything (as simple clients do); otherwise it reads while it writes and
/// stops writing once the answer is in (as curl does).
fn http1_upload(addr: SocketAddr, size: usize, authorized: bool, send_all: bool) -> (u16, String) {
    let stream = connect(addr).expect("connect to the proxy");
    let auth = if authorized {
        "Authorization: Bearer t\r\n"
    } else {
        ""
    };
    let head =
        format!("POST /early HTTP/1.1\r\nHost: {HOST}\r\n{auth}Content-Length: {size}\r\n\r\n");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = stream.try_clone().expect("dup");
    let writer_stop = stop.clone();
    let mut write = move || {
        writer.write_all(head.as_bytes())?;
        let chunk = vec![b'x'; CHUNK];
        let mut left = size;
        while left > 0 && !writer_stop.load(Ordering::Relaxed) {
            let n = left.min(CHUNK);
            writer.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok::<(), std::io::Error>(())
    };
    let (status, body) = if send_all {
        write().unwrap_or_else(|e| panic!("sending {size} bytes before reading: {e}"));
        read_answer(&stream, size)
    } else {
        let writing = thread::spawn(write);
        let answer = read_answer(&stream, size);
        stop.store(true, Ordering::Relaxed);
        // The proxy may close once the answer is out: a write error here is expected.
        let _ = writing.join().expect("writer thread");
        answer
    };
    let _ = stream.shutdown(Shutdown::Both);
    (status, body)
}

fn read_answer(stream: &std::net::TcpStream, size: usize) -> (u16, String) {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader).expect("an answer head");
    let mut body = Vec::new();
    body_reader(&mut reader, &head)
        .read_to_end(&mut body)
        .expect("the answer body");
    // 50 MiB cannot all have gone out before an app that reads none of it answered (socket
    // buffers hold a few MiB at most): the proxy says it ends this connection. Smaller bodies
    // may have been handed over whole, and then the connection may stay.
    if size >= 50 << 20 {
        assert!(
            head.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "an early answer over HTTP/1.1 ends the connection: {head:?}"
        );
    }
    (head.status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn an_early_answer_reaches_an_http1_client() {
    let sandbox = Sandbox::new(EARLY);
    let (_supervisor, _proxy) = sandbox.start();
    for size in SIZES {
        for authorized in [true, false] {
            let want = expected(authorized);
            for round in 0..ROUNDS {
                // One round in ten, the client sends everything before it reads.
                let send_all = round % 10 == 0;
                let got = http1_upload(sandbox.proxy_addr, size, authorized, send_all);
                assert_eq!(
                    (got.0, got.1.as_str()),
                    want,
                    "HTTP/1.1 upload of {size} bytes, round {round}, send_all {send_all}\n{}",
                    sandbox.proxy_log()
                );
            }
        }
    }
    assert!(
        !sandbox.proxy_log().contains("upstream error"),
        "an early answer was logged as an upstream error:\n{}",
        sandbox.proxy_log()
    );
}

/// A body of `size` bytes made on demand, with its exact length (so a Content-Length).
struct Zeros {
    left: usize,
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![0u8; n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left as u64)
    }
}

#[test]
fn an_early_answer_reaches_an_http2_client() {
    let sandbox = Sandbox::new(EARLY);
    let (_supervisor, _proxy) = sandbox.start();
    runtime().block_on(async {
        let mut sender = h2_connect(sandbox.proxy_addr).await;
        for size in SIZES {
            for authorized in [true, false] {
                let want = expected(authorized);
                for round in 0..ROUNDS {
                    let mut request = http::Request::post(format!("http://{HOST}/early"))
                        .body(Zeros { left: size })
                        .expect("a request");
                    if authorized {
                        request.headers_mut().insert(
                            http::header::AUTHORIZATION,
                            http::HeaderValue::from_static("Bearer t"),
                        );
                    }
                    sender
                        .ready()
                        .await
                        .expect("the connection takes a request");
                    let response = sender.send_request(request).await.unwrap_or_else(|e| {
                        panic!("HTTP/2 upload of {size} bytes, round {round}: {e}")
                    });
                    let status = response.status().as_u16();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .unwrap_or_else(|e| {
                            panic!("the answer body, {size} bytes, round {round}: {e}")
                        })
                        .to_bytes();
                    assert_eq!(
                        (status, String::from_utf8_lossy(&body).as_ref()),
                        want,
                        "HTTP/2 upload of {size} bytes, round {round}\n{}",
                        sandbox.proxy_log()
                    );
                }
            }
        }
    });
    assert!(
        !sandbox.proxy_log().contains("upstream error"),
        "an early answer was logged as an upstream error:\n{}",
        sandbox.proxy_log()
    );
}
