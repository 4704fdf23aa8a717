//! Instance output through `logs`: a flood is drained (the app never blocks on its pipe) and
//! kept bounded with the newest lines, and `logs --follow` streams new lines.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;
use tenement_proto::frame;
use tenement_proto::rpc::{LogStream, Request, Response};

#[test]
fn a_log_flood_is_drained_and_only_a_bounded_newest_tail_is_kept() {
    let sb = Sandbox::new(
        r#"
[service.noisy]
command = "python3 @FIXTURES@/noisy.py"
startup_timeout = "20s"
[service.noisy.env]
NOISY_LINES = "100000"

[service.quiet]
command = "@TINY@"
"#,
    );
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    expect_woken(c.spawn("quiet:q"));
    let (route, _) = expect_woken(c.spawn("noisy:n"));
    assert_eq!(http_get(tcp_addr(&route), "/health").0, 200);
    let mut lines = Vec::new();
    let done = wait_until(EVENT_DEADLINE, || {
        lines = c.logs("noisy:n");
        lines
            .iter()
            .any(|l| l.line.starts_with("noisy listening on"))
    });
    assert!(done, "the last lines never arrived: {:?}", lines.last());
    assert!(lines.len() <= 2000, "{} lines kept", lines.len());
    let flood: Vec<&str> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Stdout && l.line.starts_with("noisy 0"))
        .map(|l| l.line.as_str())
        .collect();
    assert!(!flood.is_empty());
    assert!(
        flood.last().unwrap().starts_with("noisy 000099999 "),
        "the newest line is kept: {:?}",
        flood.last()
    );
    assert!(
        !flood.iter().any(|l| l.starts_with("noisy 000000000 ")),
        "the oldest lines are dropped"
    );
    // Another instance's buffer is untouched by the flood.
    let quiet = c.logs("quiet:q");
    assert!(quiet
        .iter()
        .any(|l| l.line.starts_with("tiny-http listening on")));
    assert!(quiet.iter().all(|l| !l.line.starts_with("noisy")));
    let tail = match c.call(Request::Logs {
        instance: iid("noisy:n"),
        lines: Some(3),
        follow: false,
    }) {
        Response::Logs { lines } => lines,
        other => panic!("{other:?}"),
    };
    assert_eq!(tail.len(), 3);
}

#[test]
fn logs_follow_streams_new_lines_until_the_client_leaves() {
    let sb = Sandbox::new("[service.web]\ncommand = \"@TINY@\"\n");
    let _sup = sb.start();
    let mut c = Client::admin(&sb);
    expect_woken(c.spawn("web:f"));
    let mut follower = Client::admin(&sb);
    let first = follower.call(Request::Logs {
        instance: iid("web:f"),
        lines: Some(10),
        follow: true,
    });
    assert!(matches!(first, Response::Logs { .. }), "{first:?}");
    expect_ok(c.stop("web:f"));
    let mut seen = Vec::new();
    let got_stop = wait_until(EVENT_DEADLINE, || {
        match follower.read() {
            Ok(Response::Logs { lines }) => seen.extend(lines.into_iter().map(|l| l.line)),
            other => panic!("follow stream gave {other:?}"),
        }
        seen.iter()
            .any(|l| l.contains("stopped") || l.contains("exited"))
    });
    assert!(got_stop, "the stop never reached the follower: {seen:?}");
    // Any input ends the stream; the supervisor closes the connection.
    frame::write_message(
        follower.stream(),
        &Request::List {
            query: Default::default(),
        },
    )
    .unwrap();
    expect_closed(follower.stream());
    assert_eq!(c.ps().len(), 1);
}
