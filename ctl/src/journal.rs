//! `tenctl logs` from the systemd journal: when the supervisor runs under systemd, every line
//! of an instance (and its lifecycle events) is there with TENEMENT_INSTANCE, across restarts
//! of the supervisor. Read through `journalctl -o json`, so tenctl needs no journal library.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::Context;
use regex::Regex;
use tenement_proto::rpc::{LogLine, LogStream};
use tenement_proto::InstanceId;

use crate::commands::{last_matching, write_log_line, LogsOptions};

/// Whether the journal holds lines of `instance` (and journalctl can read them).
pub fn has_entries(instance: &InstanceId) -> bool {
    if !std::path::Path::new("/run/systemd/journal/socket").exists() {
        return false;
    }
    Command::new("journalctl")
        .args(["-q", "--no-pager", "-o", "cat", "-n", "1"])
        .arg(format!("TENEMENT_INSTANCE={instance}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.status.success() && !out.stdout.is_empty())
}

/// One journal entry as a log line.
fn parse_entry(json: &str) -> Option<LogLine> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str());
    let line = text("MESSAGE")?.to_owned();
    let ts_ms = text("__REALTIME_TIMESTAMP")?.parse::<u64>().ok()? / 1000;
    let stream = match text("TENEMENT_STREAM") {
        Some("stderr") => LogStream::Stderr,
        Some("event") => LogStream::Event,
        _ => LogStream::Stdout,
    };
    Some(LogLine {
        ts_ms,
        stream,
        line,
    })
}

pub fn logs(
    instance: &InstanceId,
    grep: Option<&Regex>,
    options: &LogsOptions,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut command = Command::new("journalctl");
    command
        .args(["-q", "--no-pager", "-o", "json"])
        .arg(format!("TENEMENT_INSTANCE={instance}"));
    if let Some(since) = options.since {
        command.arg(format!("--since=-{}s", since.as_secs().max(1)));
    }
    // With --grep, -n counts matching lines, filtered here.
    match (options.lines, grep) {
        (Some(n), None) => {
            command.arg(format!("--lines={n}"));
        }
        _ if options.follow => {
            command.arg("--lines=all");
        }
        _ => {}
    }
    if options.follow {
        command.arg("--follow");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run journalctl")?;
    let stdout = child.stdout.take().context("journalctl has no output")?;
    let reader = BufReader::new(stdout);
    if options.follow {
        for line in reader.lines() {
            let Some(entry) = parse_entry(&line?) else {
                continue;
            };
            if grep.map_or(true, |re| re.is_match(&entry.line)) {
                write_log_line(out, &entry, options.json)?;
                out.flush()?;
            }
        }
    } else {
        let entries: Vec<LogLine> = reader
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| parse_entry(&l))
            .collect();
        for entry in last_matching(&entries, grep, options.lines) {
            write_log_line(out, entry, options.json)?;
        }
    }
    let _ = child.wait();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_entries_become_log_lines() {
        let json = r#"{"__REALTIME_TIMESTAMP":"1700000000123456","MESSAGE":"hello","TENEMENT_STREAM":"stderr","PRIORITY":"3"}"#;
        let line = parse_entry(json).expect("parses");
        assert_eq!(line.ts_ms, 1_700_000_000_123);
        assert_eq!(line.stream, LogStream::Stderr);
        assert_eq!(line.line, "hello");
        assert!(
            parse_entry(r#"{"MESSAGE":[104,105]}"#).is_none(),
            "binary messages are skipped"
        );
        assert!(parse_entry("not json").is_none());
    }
}
