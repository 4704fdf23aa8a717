//! Target `template`: placeholders in `command`, `args` and `env` values,
//! [`Template::parse`] and [`Template::render`] with fixed values.
//!
//! The input is the template source (lossily made UTF-8: config values are strings).
//! Invariants:
//! - nothing panics;
//! - a source without braces parses and renders to itself, and [`Template::literal`] of any
//!   text renders to that text, and its source parses back to a template rendering the same;
//! - a parsed template's source is the input and renders exactly as an independent reading of
//!   the grammar (`{{` and `}}` are braces, `{name}` a placeholder, anything else with a brace
//!   an error) does: so the output holds no unexpanded `{var}` of a known variable except where
//!   the source wrote `{{var}}`;
//! - a refused template's message is one line.

use tenement_proto::config::{Template, TemplateVars};

use crate::known;

/// The values every placeholder renders to; none holds a brace, so any brace in the output
/// came from the source.
pub fn vars() -> TemplateVars<'static> {
    TemplateVars {
        data_dir: "/var/lib/tenement/data/notes",
        id: "alice",
        service: "notes",
        instance: "notes:alice",
        port: "20001",
        socket_path: "/run/tenement/sockets/notes/alice.sock",
    }
}

const KNOWN: &[&str] = &[
    "data_dir",
    "id",
    "service",
    "instance",
    "port",
    "socket_path",
];

pub fn check(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    let vars = vars();

    let literal = Template::literal(&source);
    assert_eq!(
        literal.render(&vars),
        source,
        "Template::literal changed its text"
    );
    match Template::parse(literal.source()) {
        Ok(back) => assert_eq!(
            back.render(&vars),
            source,
            "a literal's escaped source renders differently"
        ),
        Err(e) => panic!(
            "a literal's escaped source {:?} does not parse: {e}",
            literal.source()
        ),
    }

    let parsed = Template::parse(&source);
    if !source.contains(['{', '}']) {
        match &parsed {
            Ok(t) => assert_eq!(t.render(&vars), source, "a brace-free template changed"),
            Err(e) => panic!("a brace-free template was refused: {e}"),
        }
    }
    match (&parsed, reference_render(&source)) {
        (Ok(template), Some(expected)) => {
            assert_eq!(template.source(), source, "the template forgot its source");
            let output = template.render(&vars);
            assert_eq!(output, expected, "rendering differs from the grammar");
            for name in KNOWN {
                let escaped = format!("{{{{{name}}}}}");
                assert!(
                    !output.contains(&format!("{{{name}}}")) || source.contains(&escaped),
                    "{{{name}}} is left unexpanded in {output:?}"
                );
            }
        }
        (Err(e), None) => assert!(
            !e.contains('\n') || known::skipped("config-diagnostic-embeds-raw-text"),
            "error is not one line: {e:?}"
        ),
        (Ok(t), None) => panic!("accepted {source:?}, which the grammar refuses: {t:?}"),
        (Err(e), Some(_)) => panic!("refused {source:?}, which the grammar accepts: {e}"),
    }
}

/// The template grammar read independently of the parser: `None` when `source` is invalid.
fn reference_render(source: &str) -> Option<String> {
    let vars = vars();
    let mut out = String::new();
    let mut rest = source;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if tail.starts_with('}') {
            return None;
        } else {
            let end = tail.find('}')?;
            out.push_str(match &tail[1..end] {
                "data_dir" => vars.data_dir,
                "id" => vars.id,
                "service" => vars.service,
                "instance" => vars.instance,
                "port" => vars.port,
                "socket_path" => vars.socket_path,
                _ => return None,
            });
            rest = &tail[end + 1..];
        }
    }
    out.push_str(rest);
    Some(out)
}
