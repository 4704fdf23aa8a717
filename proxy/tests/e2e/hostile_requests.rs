//! Requests a hostile client crafts to reach one instance while naming another, or to make an
//! app believe a lie about the client (security findings F3 and F13, and the smaller ones on
//! CONNECT and malformed bodies). Each answer is checked, and what reached the app is read
//! back from `mirror.py`'s `/headers`.

use tenement_proto::rpc::InstanceState;

use crate::support::*;

const MIRROR: &str = r#"
[service.notes]
command = "python3 @FIXTURES@/mirror.py"

[instances]
notes = ["alice", "bob"]
"#;

/// The headers `mirror.py` received, as (lower-case name, value).
fn received(reply: &Reply) -> Vec<(String, String)> {
    assert_eq!(reply.status(), 200, "{}", reply.text());
    let pairs: Vec<(String, String)> =
        serde_json::from_slice(&reply.body).expect("mirror.py answers /headers with JSON");
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect()
}

fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn the_app_gets_exactly_one_host_and_it_is_the_routed_one() {
    let sandbox = Sandbox::new(MIRROR);
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;

    // Absolute-form target naming bob, Host naming something else: refused, nothing reaches
    // either app.
    let reply = exchange(
        addr,
        b"GET http://bob.notes.localhost/headers HTTP/1.1\r\nHost: evil.example<script>\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(reply.status(), 400, "{}", reply.text());
    let reply = exchange(
        addr,
        b"GET http://bob.notes.localhost/headers HTTP/1.1\r\nHost: alice.notes.localhost\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(reply.status(), 400, "{}", reply.text());

    // Two Host headers: refused whichever comes first.
    for request in [
        "GET /headers HTTP/1.1\r\nHost: bob.notes.localhost\r\nHost: alice.notes.localhost\r\nConnection: close\r\n\r\n",
        "GET /headers HTTP/1.1\r\nHost: bob.notes.localhost\r\nHost: bob.notes.localhost\r\nConnection: close\r\n\r\n",
    ] {
        let reply = exchange(addr, request.as_bytes()).expect("an answer");
        assert_eq!(reply.status(), 400, "{request:?}: {}", reply.text());
    }

    // Nothing of the refused requests reached bob: he was never woken.
    let mut admin = sandbox.admin();
    assert_eq!(admin.state("notes:bob"), InstanceState::Stopped);

    // Absolute-form agreeing with Host (any case, a trailing dot): the app gets one Host,
    // the target's authority.
    let reply = exchange(
        addr,
        b"GET http://bob.notes.localhost/headers HTTP/1.1\r\nHost: BOB.notes.localhost.\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    let headers = received(&reply);
    assert_eq!(
        values(&headers, "host"),
        ["bob.notes.localhost"],
        "{headers:?}"
    );

    // Plain origin-form: one Host, as routed.
    let headers = received(&get(addr, "alice.notes.localhost", "/headers"));
    assert_eq!(
        values(&headers, "host"),
        ["alice.notes.localhost"],
        "{headers:?}"
    );
}

#[test]
fn an_http2_authority_and_host_that_disagree_are_refused() {
    let sandbox = Sandbox::new(MIRROR);
    let (_supervisor, _proxy) = sandbox.start();
    runtime().block_on(async {
        let mut sender = h2_connect(sandbox.proxy_addr).await;
        let request = |host: Option<&'static str>| {
            let mut builder = http::Request::get("http://bob.notes.localhost/headers");
            if let Some(host) = host {
                builder = builder.header(http::header::HOST, host);
            }
            builder
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let answer = sender
            .send_request(request(Some("alice.notes.localhost")))
            .await
            .expect("an answer");
        assert_eq!(answer.status(), 400);
        let answer = sender.send_request(request(None)).await.expect("an answer");
        assert_eq!(answer.status(), 200);
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .expect("body")
            .to_bytes();
        let pairs: Vec<(String, String)> = serde_json::from_slice(&body).expect("JSON");
        let hosts: Vec<_> = pairs
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(hosts, ["bob.notes.localhost"]);
    });
}

#[test]
fn client_address_claims_do_not_reach_the_app() {
    let sandbox = Sandbox::new(MIRROR);
    let (_supervisor, _proxy) = sandbox.start();
    let claims = [
        "X-Real-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Client-IP",
        "X-Forwarded-Port",
        "X-Forwarded-Server",
        "X-Forwarded-Ssl",
        "X-Forwarded-Scheme",
        "X-Url-Scheme",
        "Front-End-Https",
        "X-Forwarded-For",
        "Forwarded",
    ];
    let mut request =
        "GET /headers HTTP/1.1\r\nHost: alice.notes.localhost\r\nConnection: close\r\n".to_owned();
    for name in claims {
        request.push_str(&format!("{name}: 6.6.6.6\r\n"));
    }
    request.push_str("\r\n");
    let reply = exchange(sandbox.proxy_addr, request.as_bytes()).expect("an answer");
    let headers = received(&reply);
    for (name, value) in &headers {
        assert!(
            !value.contains("6.6.6.6"),
            "{name}: {value} reached the app"
        );
    }
    assert_eq!(values(&headers, "x-real-ip"), ["127.0.0.1"], "{headers:?}");
    assert_eq!(
        values(&headers, "x-forwarded-for"),
        ["127.0.0.1"],
        "{headers:?}"
    );
}

#[test]
fn connect_is_405_and_a_broken_chunked_body_is_the_clients_400() {
    let sandbox = Sandbox::new(MIRROR);
    let (_supervisor, _proxy) = sandbox.start();
    let addr = sandbox.proxy_addr;
    let reply = exchange(
        addr,
        b"CONNECT bob.notes.localhost:443 HTTP/1.1\r\nHost: bob.notes.localhost:443\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(reply.status(), 405, "{}", reply.text());
    assert!(reply.header("allow").is_some(), "{:?}", reply.head);

    // Wake alice first so the broken body meets a running app.
    get_ok(addr, "alice.notes.localhost", "/health");
    let reply = exchange(
        addr,
        b"POST /upload HTTP/1.1\r\nHost: alice.notes.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nZZ\r\nnot a chunk\r\n",
    )
    .expect("an answer");
    assert_eq!(reply.status(), 400, "{}", reply.text());
    // The proxy logs an answer's cause before it sends the answer.
    let log = sandbox.proxy_log();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("notes:alice")),
        "a client's broken body was blamed on the instance:\n{log}"
    );
}
