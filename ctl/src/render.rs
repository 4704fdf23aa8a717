//! How tenctl shows things to a person: tables, durations, timestamps, status blocks and log
//! lines.
//!
//! Everything here is a pure function from data to text, so the exact output is unit-tested.
//! It does no I/O and knows nothing about sockets. Text that came from an instance (log lines,
//! exit reasons) is passed through [`sanitize`] so a tenant cannot send escape sequences to an
//! operator's terminal.

use std::fmt::Write as _;

use tenement_proto::display::{days_to_civil, human_duration};
use tenement_proto::rpc::{InstanceInfo, LogLine, LogStream};

/// [`human_duration`], or `-` when there is nothing to measure.
pub fn optional_duration(secs: Option<u64>) -> String {
    secs.map_or_else(|| "-".to_owned(), human_duration)
}

/// A wake or start time given in microseconds: `43.2 ms` below ten seconds, `12.3 s` above.
pub fn elapsed(us: u64) -> String {
    if us < 10_000_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} s", us as f64 / 1_000_000.0)
    }
}

/// Milliseconds since the Unix epoch as an ISO 8601 UTC time: `2023-11-14T22:13:20.123Z`.
pub fn iso_utc(ts_ms: u64) -> String {
    const MS_PER_DAY: u64 = 86_400_000;
    // u64::MAX / MS_PER_DAY is about 2.1e11, far inside i64.
    let days = i64::try_from(ts_ms / MS_PER_DAY).unwrap_or(i64::MAX);
    let ms_of_day = ts_ms % MS_PER_DAY;
    let (year, month, day) = days_to_civil(days);
    let (hour, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (minute, rest) = (rest / 60_000, rest % 60_000);
    let (second, milli) = (rest / 1000, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// Replaces control characters (other than tab) and the invisible characters that change how
/// a line reads with visible escapes, so text from an instance cannot move the cursor,
/// retitle the terminal, break a line, reverse the rest of it (U+202E) or hide in it (U+200B).
pub fn sanitize(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// C0 and C1 controls but tab; bidirectional embeddings, overrides, isolates and marks;
/// zero-width spaces and joiners, word joiner, invisible operators, the BOM; the line and
/// paragraph separators.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(
            c,
            '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Left-aligned columns separated by two spaces; the last column is not padded, so no line
/// ends in spaces. Widths count characters.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                let pad = width.saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.extend(std::iter::repeat(' ').take(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        sanitize(text)
    }
}

/// The `tenctl ps` table.
pub fn instance_table(instances: &[InstanceInfo]) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            vec![
                i.instance.to_string(),
                i.state.as_str().to_owned(),
                i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                or_dash(&i.address),
                optional_duration(i.uptime_s),
                optional_duration(i.idle_s),
                i.restarts.to_string(),
                or_dash(&i.health),
                i.weight.to_string(),
                release_label(i),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "STATE", "PID", "ADDRESS", "UPTIME", "IDLE", "RESTARTS", "HEALTH",
            "WEIGHT", "RELEASE",
        ],
        &rows,
    )
}

/// The release column of `ps`: the release it runs, `3>4` while it runs 3 and should run 4,
/// and ` pin` when pinned.
pub fn release_label(info: &InstanceInfo) -> String {
    let base = match (info.release, info.target_release) {
        (Some(runs), Some(should)) if runs != should && info.pid.is_some() => {
            format!("{runs}>{should}")
        }
        (_, Some(should)) => should.to_string(),
        (Some(runs), None) => runs.to_string(),
        (None, None) => "-".to_owned(),
    };
    match info.pinned {
        Some(_) => format!("{base} pin"),
        None => base,
    }
}

/// The release line of `status`, in words.
fn release_words(info: &InstanceInfo) -> String {
    let mut text = match (info.release, info.target_release) {
        (Some(runs), Some(should)) if runs != should && info.pid.is_some() => {
            format!("{runs}, moving to {should}")
        }
        (_, Some(should)) => should.to_string(),
        (Some(runs), None) => runs.to_string(),
        (None, None) => "-".to_owned(),
    };
    if let Some(pin) = info.pinned {
        text.push_str(&format!(" (pinned to {pin})"));
    }
    text
}

/// The `tenctl status` block: one aligned `key: value` line per field.
pub fn status_block(info: &InstanceInfo) -> String {
    let fields: [(&str, String); 22] = [
        ("instance", info.instance.to_string()),
        ("state", info.state.as_str().to_owned()),
        (
            "pid",
            info.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ),
        ("address", or_dash(&info.address)),
        ("uptime", optional_duration(info.uptime_s)),
        ("idle", optional_duration(info.idle_s)),
        ("restarts", info.restarts.to_string()),
        ("health", or_dash(&info.health)),
        ("in flight", info.in_flight.to_string()),
        ("weight", info.weight.to_string()),
        ("release", release_words(info)),
        ("data dir", or_dash(&info.data_dir)),
        ("isolation", or_dash(&info.isolation)),
        (
            "uid",
            info.uid.map_or_else(|| "-".to_owned(), |u| u.to_string()),
        ),
        ("cgroup", or_dash(info.cgroup.as_deref().unwrap_or(""))),
        ("limits", or_dash(info.limits.as_deref().unwrap_or(""))),
        (
            "memory",
            info.memory_bytes.map_or_else(
                || "-".to_owned(),
                |b| format!("{:.1} MiB", b as f64 / 1048576.0),
            ),
        ),
        (
            "cpu",
            info.cpu_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s")),
        ),
        (
            "pids",
            info.pids.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ),
        (
            "disk",
            info.disk_bytes.map_or_else(
                || "-".to_owned(),
                |b| format!("{:.1} MiB (data directory)", b as f64 / 1048576.0),
            ),
        ),
        (
            "last exit",
            or_dash(info.last_exit.as_deref().unwrap_or("")),
        ),
        ("reason", or_dash(info.reason.as_deref().unwrap_or(""))),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out
}

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Event => "event ",
    }
}

/// One log line as `2026-11-23T03:40:01.123Z stdout | text`, without the newline.
pub fn log_line(line: &LogLine) -> String {
    format!(
        "{} {} | {}",
        iso_utc(line.ts_ms),
        stream_name(line.stream),
        sanitize(&line.line)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenement_proto::rpc::InstanceState;
    use tenement_proto::InstanceId;

    #[test]
    fn optional_durations_show_a_dash_for_nothing() {
        assert_eq!(optional_duration(None), "-");
        assert_eq!(optional_duration(Some(5)), "5s");
    }

    #[test]
    fn elapsed_is_milliseconds_with_one_decimal_then_seconds() {
        assert_eq!(elapsed(43_210), "43.2 ms");
        assert_eq!(elapsed(0), "0.0 ms");
        assert_eq!(elapsed(9_999_000), "9999.0 ms");
        assert_eq!(elapsed(12_345_678), "12.3 s");
    }

    #[test]
    fn timestamps_are_iso_utc_with_milliseconds() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        // Leap day and the last millisecond of a leap year.
        assert_eq!(iso_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso_utc(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(iso_utc(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        // Never panics, even at the far end.
        assert!(iso_utc(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("plain\ttext"), "plain\ttext");
        assert_eq!(sanitize("\x1b[31mred\n"), "\\u{1b}[31mred\\n");
        assert_eq!(sanitize("é ✓"), "é ✓");
        assert_eq!(sanitize("\u{85}next"), "\\u{85}next");
    }

    #[test]
    fn text_that_reorders_or_hides_itself_is_escaped() {
        assert_eq!(sanitize("ok \u{202E}gnp.exe"), "ok \\u{202e}gnp.exe");
        assert_eq!(sanitize("admin\u{200B}"), "admin\\u{200b}");
        assert_eq!(sanitize("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
        assert_eq!(sanitize("\u{FEFF}bom"), "\\u{feff}bom");
        assert_eq!(
            sanitize("שלום عربي"),
            "שלום عربي",
            "right-to-left text itself is fine"
        );
    }

    #[test]
    fn table_columns_are_aligned_and_lines_have_no_trailing_spaces() {
        let text = table(
            &["A", "LONGER", "C"],
            &[
                vec!["wide-cell".into(), "x".into(), "".into()],
                vec!["é".into(), "yy".into(), "last".into()],
            ],
        );
        assert_eq!(
            text,
            "A          LONGER  C\n\
             wide-cell  x\n\
             é          yy      last\n"
        );
    }

    fn info(instance: &str) -> InstanceInfo {
        let instance = InstanceId::parse(instance).expect("valid id");
        InstanceInfo {
            service: instance.service.clone(),
            id: instance.id.clone(),
            instance,
            state: InstanceState::Running,
            pid: Some(4242),
            address: "127.0.0.1:20001".into(),
            uptime_s: Some(312),
            idle_s: Some(3),
            restarts: 0,
            health: "healthy".into(),
            in_flight: 1,
            weight: 1,
            data_dir: "/var/lib/tenement/data/notes/alice".into(),
            isolation: "namespace, cgroup (cpu, memory, pids)".into(),
            uid: Some(61184),
            cgroup: Some(
                "/sys/fs/cgroup/system.slice/tenement-supervisor.service/instances/notes.alice"
                    .into(),
            ),
            limits: Some("memory_max=64MiB pids_max=64".into()),
            memory_bytes: Some(12 << 20),
            pids: Some(3),
            disk_bytes: None,
            cpu_seconds: None,
            last_exit: None,
            reason: None,
            release: Some(3),
            target_release: Some(3),
            pinned: None,
        }
    }

    #[test]
    fn instance_table_aligns_every_column() {
        let mut bob = info("notes:bob");
        bob.state = InstanceState::Stopped;
        bob.pid = None;
        bob.uptime_s = None;
        bob.idle_s = None;
        bob.health = "-".into();
        bob.restarts = 12;
        bob.target_release = Some(4);
        bob.pinned = Some(4);
        let mut carol = info("notes:carol");
        carol.target_release = Some(4);
        let text = instance_table(&[info("notes:alice"), bob, carol]);
        assert_eq!(
            text,
            "INSTANCE     STATE    PID   ADDRESS          UPTIME  IDLE  RESTARTS  HEALTH   WEIGHT  RELEASE\n\
             notes:alice  running  4242  127.0.0.1:20001  5m12s   3s    0         healthy  1       3\n\
             notes:bob    stopped  -     127.0.0.1:20001  -       -     12        -        1       4 pin\n\
             notes:carol  running  4242  127.0.0.1:20001  5m12s   3s    0         healthy  1       3>4\n"
        );
    }

    #[test]
    fn status_block_has_one_aligned_line_per_field() {
        let mut alice = info("notes:alice");
        alice.last_exit = Some("signal 9 (SIGKILL)".into());
        alice.disk_bytes = Some(3 << 20);
        alice.cpu_seconds = Some(1.234);
        let text = status_block(&alice);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 22);
        assert_eq!(lines[0], "instance:  notes:alice");
        assert_eq!(lines[8], "in flight: 1");
        assert_eq!(lines[10], "release:   3");
        assert_eq!(lines[13], "uid:       61184");
        assert_eq!(lines[15], "limits:    memory_max=64MiB pids_max=64");
        assert_eq!(lines[16], "memory:    12.0 MiB");
        assert_eq!(lines[17], "cpu:       1.23 s");
        assert_eq!(lines[18], "pids:      3");
        assert_eq!(lines[19], "disk:      3.0 MiB (data directory)");
        assert_eq!(lines[20], "last exit: signal 9 (SIGKILL)");
        assert_eq!(lines[21], "reason:    -");
        assert!(lines.iter().all(|l| l.as_bytes().get(10) == Some(&b' ')));
    }

    #[test]
    fn log_lines_show_time_stream_and_sanitized_text() {
        let line = LogLine {
            ts_ms: 1_700_000_000_123,
            stream: LogStream::Stdout,
            line: "GET /health 200\x1b]0;pwned\x07".into(),
        };
        assert_eq!(
            log_line(&line),
            "2023-11-14T22:13:20.123Z stdout | GET /health 200\\u{1b}]0;pwned\\u{7}"
        );
        let event = LogLine {
            ts_ms: 0,
            stream: LogStream::Event,
            line: "started".into(),
        };
        assert_eq!(
            log_line(&event),
            "1970-01-01T00:00:00.000Z event  | started"
        );
    }
}
