//! What passes through the proxy: upgraded connections (kept counted as in flight until they
//! close), large bodies streamed both ways, and headers (end-to-end ones kept, hop-by-hop ones
//! dropped, forwarding ones replaced).

use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tenement_proto::rpc::InstanceState;

use crate::support::*;

const MIRROR: &str = r#"
[service.mirror]
command = "python3 @FIXTURES@/mirror.py"
idle_timeout = "1s"

[instances]
mirror = ["a"]
"#;

#[test]
fn idle_stop_waits_for_an_open_websocket() {
    let sandbox = Sandbox::new(MIRROR);
    let (_supervisor, _proxy) = sandbox.start();
    let mut admin = sandbox.admin();

    let (mut stream, mut reader, head) =
        open_websocket(sandbox.proxy_addr, "a.mirror.localhost").expect("the handshake");
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head:?}"
    );
    assert!(
        head.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{head:?}"
    );

    // Three idle timeouts with the connection open and bytes going both ways, but no request.
    let opened = Instant::now();
    let mut round = 0;
    while opened.elapsed() < Duration::from_secs(3) {
        let message = format!("ping {round}\n");
        stream.write_all(message.as_bytes()).expect("write");
        let mut echo = vec![0u8; message.len()];
        reader.read_exact(&mut echo).expect("read the echo");
        assert_eq!(String::from_utf8_lossy(&echo), message);
        assert_eq!(
            admin.state("mirror:a"),
            InstanceState::Running,
            "stopped {:?} into an open upgraded connection",
            opened.elapsed()
        );
        round += 1;
        std::thread::sleep(Duration::from_millis(200));
    }

    stream.shutdown(Shutdown::Both).expect("close");
    drop(reader);
    drop(stream);
    let closed = Instant::now();
    // idle_timeout = 1s: a deadline for a hang, not a measure of the idle clock.
    let stopped = wait_until(Duration::from_secs(30), || {
        admin.state("mirror:a") == InstanceState::Stopped
    });
    assert!(
        stopped,
        "still {:?} {:?} after the websocket closed",
        admin.state("mirror:a"),
        closed.elapsed()
    );
    eprintln!("stopped {:?} after the close", closed.elapsed());
}

const FILES: &str = r#"
[service.files]
command = "python3 @FIXTURES@/mirror.py"

[instances]
files = ["a"]
"#;

/// 50 MiB.
const BIG: usize = 50 << 20;
const CHUNK: usize = 64 << 10;

/// Deterministic, incompressible-looking upload data (xorshift).
fn upload_chunks() -> impl Iterator<Item = Vec<u8>> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..BIG / CHUNK).map(move |_| {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.extend_from_slice(&state.to_le_bytes());
        }
        chunk
    })
}

/// Uploads [`BIG`] bytes to `/upload`, chunked or with a Content-Length; the fixture's
/// "BYTES SHA256" and ours.
fn upload(sandbox: &Sandbox, chunked: bool) -> (String, String) {
    let mut stream = connect(sandbox.proxy_addr).expect("connect");
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {BIG}")
    };
    write!(
        stream,
        "POST /upload HTTP/1.1\r\nHost: a.files.localhost\r\nConnection: close\r\n{framing}\r\n\r\n"
    )
    .expect("send the head");
    let mut hash = Sha256::new();
    for chunk in upload_chunks() {
        hash.update(&chunk);
        if chunked {
            write!(stream, "{:x}\r\n", chunk.len()).expect("chunk size");
            stream.write_all(&chunk).expect("chunk");
            stream.write_all(b"\r\n").expect("chunk end");
        } else {
            stream.write_all(&chunk).expect("body");
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").expect("last chunk");
    }
    let reply = read_reply(&stream).expect("the upload answer");
    assert_eq!(reply.status(), 200, "{}", reply.text());
    let ours = format!("{BIG} {:x}", hash.finalize());
    (reply.text().trim().to_owned(), ours)
}

#[test]
fn large_upload_and_download_stream_in_constant_memory() {
    let sandbox = Sandbox::new(FILES);
    let (_supervisor, proxy) = sandbox.start();
    get_ok(sandbox.proxy_addr, "a.files.localhost", "/health");
    let before = peak_rss_kib(proxy.pid());

    let (theirs, ours) = upload(&sandbox, false);
    assert_eq!(theirs, ours, "Content-Length upload");
    let (theirs, ours) = upload(&sandbox, true);
    assert_eq!(theirs, ours, "chunked upload");

    let stream = connect(sandbox.proxy_addr).expect("connect");
    (&stream)
        .write_all(
            format!(
                "GET /download?bytes={BIG} HTTP/1.1\r\nHost: a.files.localhost\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
    let mut reader = BufReader::with_capacity(CHUNK, &stream);
    let head = read_head(&mut reader).expect("download head");
    assert_eq!(head.status, 200, "{head:?}");
    let expected = head.header("x-sha256").expect("X-Sha256").to_owned();
    let mut body = body_reader(&mut reader, &head);
    let mut hash = Sha256::new();
    let mut received = 0usize;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = body.read(&mut buf).expect("download body");
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n;
    }
    assert_eq!(received, BIG, "download length");
    assert_eq!(
        format!("{:x}", hash.finalize()),
        expected,
        "download digest"
    );

    let after = peak_rss_kib(proxy.pid());
    eprintln!("proxy VmHWM {before} KiB before, {after} KiB after 3 x 50 MiB");
    assert!(
        after < before + 20 * 1024,
        "the proxy's peak RSS grew from {before} KiB to {after} KiB: bodies are buffered"
    );
    assert!(after < 40 * 1024, "the proxy's peak RSS is {after} KiB");
}

#[test]
fn headers_pass_through_and_forwarded_headers_are_replaced() {
    let sandbox = Sandbox::new(FILES);
    let (_supervisor, _proxy) = sandbox.start();
    let reply = exchange(
        sandbox.proxy_addr,
        b"GET /headers HTTP/1.1\r\nHost: a.files.localhost\r\n\
          Authorization: Bearer secret-token\r\nX-Custom: kept as is\r\n\
          X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\
          X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6;proto=https\r\n\
          Connection: keep-alive, X-Hop\r\nX-Hop: named by Connection\r\n\
          Keep-Alive: timeout=5\r\nProxy-Authorization: Basic c2VjcmV0\r\n\
          Proxy-Connection: keep-alive\r\nTE: trailers\r\n\r\n",
    )
    .expect("GET /headers");
    assert_eq!(reply.status(), 200, "{}", reply.text());
    let pairs: Vec<(String, String)> =
        serde_json::from_slice(&reply.body).expect("the fixture's JSON");
    let all = |name: &str| -> Vec<&str> {
        pairs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let seen = format!("{pairs:?}");
    assert_eq!(all("authorization"), ["Bearer secret-token"], "{seen}");
    assert_eq!(all("x-custom"), ["kept as is"], "{seen}");
    assert_eq!(all("host"), ["a.files.localhost"], "{seen}");
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"], "{seen}");
    assert_eq!(all("x-forwarded-proto"), ["http"], "{seen}");
    assert_eq!(all("x-forwarded-host"), ["a.files.localhost"], "{seen}");
    let forwarded = all("forwarded");
    assert_eq!(forwarded.len(), 1, "{seen}");
    assert!(
        forwarded[0].contains("for=127.0.0.1") && !forwarded[0].contains("6.6.6.6"),
        "{seen}"
    );
    for hop in [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "x-hop",
    ] {
        assert!(all(hop).is_empty(), "{hop} was forwarded: {seen}");
    }
}
