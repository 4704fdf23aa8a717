//! Instance output and lifecycle events in the systemd journal, with the fields that make
//! `journalctl TENEMENT_INSTANCE=notes:bob` work: SYSLOG_IDENTIFIER (the service),
//! TENEMENT_SERVICE, TENEMENT_ID, TENEMENT_INSTANCE, OBJECT_PID (the app), and PRIORITY 6 for
//! stdout and 3 for stderr unless the line starts with a syslog `<N>` prefix.
//!
//! journald rate-limits per unit, and every instance shares the supervisor's unit, so one noisy
//! tenant could silence all the others: each instance has its own budget here, and what it
//! drops is counted in a notice. Used only when the supervisor was started by systemd with its
//! output on the journal (JOURNAL_STREAM); otherwise the in-memory buffers are the only log.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libsystemd::logging::{journal_send, Priority};
use tenement_proto::rpc::LogStream;
use tenement_proto::InstanceId;

/// Lines an instance may send per window before the rest are dropped (and counted).
pub const RATE_BURST: u32 = 1000;
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Whether instance lines go to the journal: the supervisor's own stderr is the journal.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var_os("JOURNAL_STREAM").is_some()
            && std::path::Path::new("/run/systemd/journal/socket").exists()
    })
}

/// The journal side of one instance.
#[derive(Debug)]
pub struct JournalTarget {
    service: String,
    id: String,
    instance: String,
    pid: AtomicU32,
    budget: Mutex<Budget>,
}

#[derive(Debug)]
struct Budget {
    window_start: Instant,
    sent: u32,
    dropped: u64,
}

impl Budget {
    /// Whether one more line may go out at `now`; a finished window reports what it dropped.
    fn take(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut report = None;
        if now.duration_since(self.window_start) >= RATE_WINDOW {
            if self.dropped > 0 {
                report = Some(self.dropped);
            }
            self.window_start = now;
            self.sent = 0;
            self.dropped = 0;
        }
        if self.sent < RATE_BURST {
            self.sent += 1;
            (true, report)
        } else {
            self.dropped += 1;
            (false, report)
        }
    }
}

/// The most urgent priority a tenant may log at: err (3). Above it are crit, alert and
/// emerg, which journald may broadcast to every terminal (wall); an app that says `<0>` gets 3.
pub const TENANT_MAX_PRIORITY: u8 = 3;

/// The journal priority of a line and its text without a syslog `<N>` prefix, never more
/// urgent than [`TENANT_MAX_PRIORITY`].
pub fn priority_of(stream: LogStream, line: &str) -> (u8, &str) {
    let bytes = line.as_bytes();
    if bytes.len() >= 3 && bytes[0] == b'<' && bytes[2] == b'>' && (b'0'..=b'7').contains(&bytes[1])
    {
        return ((bytes[1] - b'0').max(TENANT_MAX_PRIORITY), &line[3..]);
    }
    let default = match stream {
        LogStream::Stdout => 6,
        LogStream::Stderr => 3,
        LogStream::Event => 5,
    };
    (default, line)
}

fn priority(level: u8) -> Priority {
    match level {
        0 => Priority::Emergency,
        1 => Priority::Alert,
        2 => Priority::Critical,
        3 => Priority::Error,
        4 => Priority::Warning,
        5 => Priority::Notice,
        6 => Priority::Info,
        _ => Priority::Debug,
    }
}

impl JournalTarget {
    pub fn new(id: &InstanceId) -> Self {
        Self {
            service: id.service.to_string(),
            id: id.id.to_string(),
            instance: id.to_string(),
            pid: AtomicU32::new(0),
            budget: Mutex::new(Budget {
                window_start: Instant::now(),
                sent: 0,
                dropped: 0,
            }),
        }
    }

    /// The process whose lines follow (OBJECT_PID).
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    pub fn send(&self, stream: LogStream, line: &str) {
        if stream != LogStream::Event {
            let (allowed, dropped) = match self.budget.lock() {
                Ok(mut budget) => budget.take(Instant::now()),
                Err(poisoned) => poisoned.into_inner().take(Instant::now()),
            };
            if let Some(n) = dropped {
                let notice = format!(
                    "{n} lines dropped: over {RATE_BURST} lines in {} s",
                    RATE_WINDOW.as_secs()
                );
                self.write(4, &notice, LogStream::Event);
            }
            if !allowed {
                return;
            }
        }
        let (level, text) = priority_of(stream, line);
        self.write(level, text, stream);
    }

    fn write(&self, level: u8, text: &str, stream: LogStream) {
        let pid = self.pid.load(Ordering::Relaxed);
        let pid_text = pid.to_string();
        let stream = match stream {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Event => "event",
        };
        let mut fields: Vec<(&str, &str)> = vec![
            ("TENEMENT_STREAM", stream),
            ("SYSLOG_IDENTIFIER", &self.service),
            ("TENEMENT_SERVICE", &self.service),
            ("TENEMENT_ID", &self.id),
            ("TENEMENT_INSTANCE", &self.instance),
        ];
        if pid != 0 {
            fields.push(("OBJECT_PID", &pid_text));
        }
        // The journal being away must not take the instance down with it.
        let _ = journal_send(priority(level), text, fields.into_iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_the_stream_unless_the_line_says() {
        assert_eq!(priority_of(LogStream::Stdout, "hello"), (6, "hello"));
        assert_eq!(priority_of(LogStream::Stderr, "oops"), (3, "oops"));
        assert_eq!(priority_of(LogStream::Stdout, "<4>careful"), (4, "careful"));
        // A tenant cannot page the host: emerg, alert and crit become err.
        assert_eq!(priority_of(LogStream::Stdout, "<0>wall"), (3, "wall"));
        assert_eq!(priority_of(LogStream::Stderr, "<2>crit"), (3, "crit"));
        assert_eq!(priority_of(LogStream::Stderr, "<7>debug"), (7, "debug"));
        assert_eq!(
            priority_of(LogStream::Stdout, "<9>not syslog"),
            (6, "<9>not syslog")
        );
        assert_eq!(priority_of(LogStream::Stdout, "<"), (6, "<"));
    }

    #[test]
    fn the_budget_drops_past_the_burst_and_reports_the_count_once() {
        let start = Instant::now();
        let mut budget = Budget {
            window_start: start,
            sent: 0,
            dropped: 0,
        };
        for _ in 0..RATE_BURST {
            assert_eq!(budget.take(start), (true, None));
        }
        assert_eq!(budget.take(start), (false, None));
        assert_eq!(budget.take(start), (false, None));
        let later = start + RATE_WINDOW;
        assert_eq!(budget.take(later), (true, Some(2)));
        assert_eq!(budget.take(later), (true, None));
    }
}
