//! The fuzz campaign's findings in tenement-proto (docs/FUZZING.md, findings 1 to 4), each
//! replayed from its minimized input in `fuzz/regressions/<target>/`. The inputs are copied here
//! as byte strings, so this suite covers them without the fuzz workspace; the fuzz harness's
//! mode byte (the first byte of a `frame` input) is left off.

use std::path::Path;

use tenement_proto::config::{Config, ConfigError, Environment, Template};
use tenement_proto::frame::{decode, read_frame, FrameError};
use tenement_proto::rpc::{InstanceState, Response};

const PATH: &str = "/etc/tenement/tenement.toml";

/// What the fuzz target validates with: a non-root user on a default Linux kernel.
fn environment() -> Environment {
    Environment {
        is_root: false,
        xdg_runtime_dir: Some("/run/user/1000".into()),
        ephemeral_ports: Some(32768..=60999),
    }
}

fn refused(text: &[u8]) -> ConfigError {
    let text = std::str::from_utf8(text).expect("the inputs are UTF-8");
    match Config::parse(text, Path::new(PATH), &environment()) {
        Ok(_) => panic!("accepted {text:?}"),
        Err(e) => e,
    }
}

/// Every diagnostic is one printable line with a message, and the error displays as exactly
/// one line per diagnostic.
fn assert_one_printable_line_each(text: &[u8], error: &ConfigError) {
    for d in &error.diagnostics {
        assert!(
            !d.message.trim().is_empty(),
            "no message for {:?}: {d:?}",
            String::from_utf8_lossy(text)
        );
        assert!(
            !d.message
                .contains(|c: char| c.is_control() || c == '\u{202e}'),
            "unprintable text in the diagnostic for {:?}: {d:?}",
            String::from_utf8_lossy(text)
        );
    }
    assert_eq!(
        error.to_string().lines().count(),
        error.diagnostics.len(),
        "not one line per diagnostic: {error}"
    );
}

fn messages(error: &ConfigError) -> Vec<(usize, usize, &str)> {
    error
        .diagnostics
        .iter()
        .map(|d| (d.line, d.column, d.message.as_str()))
        .collect()
}

const KNOWN_PLACEHOLDERS: &str =
    "known: {data_dir}, {id}, {service}, {instance}, {port}, {socket_path}";

// Finding 1, config-diagnostic-embeds-raw-text.

#[test]
fn an_unknown_key_written_with_a_newline_escape_is_quoted_on_one_line() {
    // fuzz/regressions/config/unknown_key_with_newline.toml
    let input = b"\"a\\nb\" = 1\n";
    let error = refused(input);
    assert_one_printable_line_each(input, &error);
    assert_eq!(
        messages(&error),
        [(
            1,
            1,
            "unknown key `a\\nb` in the top level; expected one of: settings, service, instances, fleet"
        )]
    );
    assert_eq!(
        error.to_string(),
        "/etc/tenement/tenement.toml:1:1: unknown key `a\\nb` in the top level; expected one of: settings, service, instances, fleet"
    );
}

#[test]
fn an_unknown_placeholder_written_with_a_newline_escape_is_quoted_on_one_line() {
    // fuzz/regressions/config/placeholder_with_newline.toml
    let input = b"[service.notes]\nargs = [\"{a\\nb}\"]\n";
    let error = refused(input);
    assert_one_printable_line_each(input, &error);
    let expected =
        format!("args: unknown placeholder {{a\\nb}} in \"{{a\\nb}}\"; {KNOWN_PLACEHOLDERS}");
    assert_eq!(messages(&error), [(2, 9, expected.as_str())]);
}

#[test]
fn a_template_with_a_newline_in_an_unknown_placeholder_is_refused_on_one_line() {
    // fuzz/regressions/template/unknown_placeholder_with_newline
    let source = std::str::from_utf8(b"{a\nb}").expect("UTF-8");
    let error = Template::parse(source).expect_err("unknown placeholder");
    assert_eq!(
        error,
        format!("unknown placeholder {{a\\nb}} in \"{{a\\nb}}\"; {KNOWN_PLACEHOLDERS}")
    );
    // A plain name prints as it always did.
    let error = Template::parse("{home}").expect_err("unknown placeholder");
    assert_eq!(
        error,
        format!("unknown placeholder {{home}} in \"{{home}}\"; {KNOWN_PLACEHOLDERS}")
    );
}

/// Each message that echoes a key, a name or a path from the file, fed a name holding an
/// escape sequence, a right-to-left override and a newline (all written as TOML escapes).
#[test]
fn every_message_that_echoes_file_text_escapes_it() {
    const NAME: &str = r"a\u001b[31m\u202e\nb";
    let long_dir = r"/\u202e".repeat(40);
    let cases: Vec<(&str, String)> = vec![
        ("unknown top-level key", format!("\"{NAME}\" = 1\n")),
        (
            "unknown key in [settings]",
            format!("[settings]\n\"{NAME}\" = 1\n"),
        ),
        (
            "unknown key in a service",
            format!("[service.a]\ncommand = \"x\"\n\"{NAME}\" = 1\n"),
        ),
        (
            "service that is not a table",
            format!("[service]\n\"{NAME}\" = 1\n"),
        ),
        (
            "service without a command",
            format!("[service.\"{NAME}\"]\n"),
        ),
        (
            "instances of an unknown service",
            format!("[instances]\n\"{NAME}\" = [\"x\"]\n"),
        ),
        (
            "duplicate instance of an unknown service",
            format!("[instances]\n\"{NAME}\" = [\"x\", \"x\"]\n"),
        ),
        (
            "env value not a string",
            format!("[service.a]\ncommand = \"x\"\n[service.a.env]\n\"{NAME}\" = 1\n"),
        ),
        (
            "env value with an unknown placeholder",
            format!("[service.a]\ncommand = \"x\"\n[service.a.env]\n\"{NAME}\" = \"{{x}}\"\n"),
        ),
        (
            "unknown placeholder in args",
            format!("[service.a]\nargs = [\"{{{NAME}}}\"]\n"),
        ),
        (
            "overlapping directories",
            format!("[settings]\ndata_dir = \"/{NAME}\"\nstate_dir = \"/{NAME}/s\"\n"),
        ),
        (
            "runtime_dir too long",
            format!("[settings]\nruntime_dir = \"{long_dir}\"\n"),
        ),
    ];
    for (what, text) in cases {
        let error = refused(text.as_bytes());
        assert_one_printable_line_each(text.as_bytes(), &error);
        assert!(
            error
                .diagnostics
                .iter()
                .any(|d| d.message.contains(r"\u{202e}")),
            "{what}: the file text is not quoted: {error}"
        );
    }
}

// Finding 2, config-empty-toml-message.

#[test]
fn a_control_character_in_a_comment_gets_a_message() {
    // fuzz/regressions/config/control_character_in_comment.toml
    let input = b"# a\x0f\n";
    let error = refused(input);
    assert_one_printable_line_each(input, &error);
    assert_eq!(
        messages(&error),
        [(
            1,
            4,
            "invalid TOML: control character '\\u{f}' is not allowed here; remove it"
        )]
    );
}

#[test]
fn toml_errors_toml_leaves_unexplained_still_say_something() {
    for input in [&b"a = "[..], b"# \x7f", b"# a\x0f", b"a = 1\n# \x01\n"] {
        let error = refused(input);
        assert_one_printable_line_each(input, &error);
    }
    assert_eq!(
        messages(&refused(b"a = ")),
        [(
            1,
            5,
            "invalid TOML: the file ends too early; complete its last line"
        )]
    );
}

// Finding 3, frame-closed-on-partial-prefix.

#[test]
fn a_stream_ending_inside_a_length_prefix_is_a_truncated_frame_not_a_close() {
    // fuzz/regressions/frame/closed_after_partial_prefix: the stream ends 2 bytes into a
    // prefix; 1 and 3 bytes are the same case.
    for partial in [&[0u8][..], &[0, 0], &[0, 0, 0]] {
        let mut stream = partial;
        match read_frame(&mut stream) {
            Err(FrameError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                assert!(e.to_string().contains("length prefix"), "{e}");
            }
            other => panic!("{} prefix bytes read as {other:?}", partial.len()),
        }
    }
    // After a whole frame: the frame, then the truncation.
    let mut stream: &[u8] = &[0, 0, 0, 2, b'{', b'}', 0, 0];
    assert_eq!(read_frame(&mut stream).expect("a whole frame"), b"{}");
    assert!(matches!(read_frame(&mut stream), Err(FrameError::Io(_))));
    // Where a frame would start, the end of the stream is still a clean close.
    let mut stream: &[u8] = &[0, 0, 0, 2, b'{', b'}'];
    assert_eq!(read_frame(&mut stream).expect("a whole frame"), b"{}");
    assert!(matches!(read_frame(&mut stream), Err(FrameError::Closed)));
}

/// The async reader agrees with the blocking one. A slice never makes it wait, so one poll
/// with a waker that does nothing runs it to the end, without a runtime.
#[cfg(feature = "tokio")]
#[test]
fn the_async_reader_also_reports_a_truncated_prefix() {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use tenement_proto::frame::read_frame_async;

    struct NoWake;
    impl Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }
    fn read_async(mut stream: &[u8]) -> Result<Vec<u8>, FrameError> {
        let waker = Waker::from(Arc::new(NoWake));
        let mut future = std::pin::pin!(read_frame_async(&mut stream));
        match future.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(result) => result,
            Poll::Pending => panic!("reading a slice waited"),
        }
    }

    for partial in [&[0u8][..], &[0, 0], &[0, 0, 0]] {
        match read_async(partial) {
            Err(FrameError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("{} prefix bytes read as {other:?}", partial.len()),
        }
    }
    assert!(matches!(read_async(&[]), Err(FrameError::Closed)));
    assert_eq!(
        read_async(&[0, 0, 0, 1, b'1']).expect("a whole frame"),
        b"1"
    );
}

// Finding 4, frame-instance-info-id-unchecked.

#[test]
fn an_instance_info_with_an_invalid_id_does_not_decode() {
    // fuzz/regressions/frame/instance_info_id_not_validated, without the harness's mode byte.
    let body = br#"{"type":"status","status":{"instance":"notes:alice","service":"notes","id":"../../etc","state":"running","pid":null,"address":"-","uptime_s":null,"idle_s":null,"restarts":0,"health":"-","in_flight":0,"weight":1,"data_dir":"/d","isolation":"process"}}"#;
    match decode::<Response>(body) {
        Err(FrameError::Decode(e)) => assert!(e.to_string().contains("../../etc"), "{e}"),
        other => panic!("decoded an invalid InstanceInfo.id: {other:?}"),
    }
    // The same message with a valid id decodes, with the JSON it always had.
    let text = std::str::from_utf8(body).expect("UTF-8");
    let valid = text.replace(r#""id":"../../etc""#, r#""id":"alice""#);
    match decode::<Response>(valid.as_bytes()) {
        Ok(Response::Status { status }) => {
            assert_eq!(status.id.as_str(), "alice");
            assert_eq!(status.state, InstanceState::Running);
            let json = serde_json::to_string(&Response::Status { status }).expect("encode");
            assert_eq!(json, valid);
        }
        other => panic!("a valid status did not decode: {other:?}"),
    }
}
