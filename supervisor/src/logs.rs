//! Per-instance output buffers: every line an instance writes, bounded per instance so one
//! noisy tenant can never evict another's lines, plus a broadcast for `tenctl logs -f`.
//!
//! Each buffer is shared between the tasks reading that instance's pipes and the registry; the
//! lock is a plain mutex held only to push or copy lines, never across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tenement_proto::rpc::{LogLine, LogStream};
use tenement_proto::InstanceId;

use crate::journal::{self, JournalTarget};
use tokio::sync::broadcast;

/// Lines kept per instance.
pub const MAX_LINES: usize = 2000;
/// Bytes kept per instance (line text).
pub const MAX_BYTES: usize = 512 * 1024;
/// Longer lines are cut here (and marked).
pub const MAX_LINE_LEN: usize = 8 * 1024;

/// Lines a `tenctl logs -f` reader may fall behind by before it is told it missed some.
const FOLLOW_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Inner {
    lines: VecDeque<LogLine>,
    bytes: usize,
    /// Made by the first follower: a broadcast channel allocates all its slots up front
    /// (~64 KiB at this capacity), which 10,000 registered instances must not pay for.
    follow: Option<broadcast::Sender<LogLine>>,
}

/// One instance's buffer. Cloning shares it.
#[derive(Debug, Clone)]
pub struct LogBuffer {
    inner: Arc<Mutex<Inner>>,
    /// Where lines also go when the supervisor logs to the journal.
    journal: Option<Arc<JournalTarget>>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBuffer {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                follow: None,
            })),
            journal: None,
        }
    }

    /// The buffer of `id`, also writing to the journal when the supervisor runs under
    /// systemd.
    pub fn for_instance(id: &InstanceId) -> Self {
        Self {
            journal: journal::enabled().then(|| Arc::new(JournalTarget::new(id))),
            ..Self::new()
        }
    }

    /// The app's pid, for the journal's OBJECT_PID.
    pub fn set_pid(&self, pid: u32) {
        if let Some(journal) = &self.journal {
            journal.set_pid(pid);
        }
    }

    pub fn push(&self, stream: LogStream, mut line: String) {
        if line.len() > MAX_LINE_LEN {
            let mut end = MAX_LINE_LEN;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push_str(" [truncated]");
        }
        if let Some(journal) = &self.journal {
            journal.send(stream, &line);
        }
        let entry = LogLine {
            ts_ms: now_ms(),
            stream,
            line,
        };
        let mut inner = self.lock();
        if let Some(follow) = &inner.follow {
            // Nobody following any more is not an error.
            let _ = follow.send(entry.clone());
        }
        inner.bytes += entry.line.len();
        inner.lines.push_back(entry);
        while inner.lines.len() > MAX_LINES || inner.bytes > MAX_BYTES {
            match inner.lines.pop_front() {
                Some(old) => inner.bytes -= old.line.len(),
                None => break,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The last `n` lines (all when `None`).
    pub fn tail(&self, n: Option<usize>) -> Vec<LogLine> {
        self.tail_and_follow(n, false).0
    }

    /// The last `n` lines of app output as one string, for start-failure errors.
    pub fn tail_text(&self, n: usize) -> String {
        let lines: Vec<String> = self
            .tail(None)
            .into_iter()
            .filter(|l| l.stream != LogStream::Event)
            .map(|l| l.line)
            .collect();
        let skip = lines.len().saturating_sub(n);
        lines[skip..].join(" | ")
    }

    /// The last `n` lines and, when `follow`, a receiver of every later line: taken under one
    /// lock, so no line falls between the two.
    pub fn tail_and_follow(
        &self,
        n: Option<usize>,
        follow: bool,
    ) -> (Vec<LogLine>, Option<broadcast::Receiver<LogLine>>) {
        let mut inner = self.lock();
        let skip = n.map_or(0, |n| inner.lines.len().saturating_sub(n));
        let lines = inner.lines.iter().skip(skip).cloned().collect();
        let receiver = follow.then(|| {
            inner
                .follow
                .get_or_insert_with(|| broadcast::channel(FOLLOW_CAPACITY).0)
                .subscribe()
        });
        (lines, receiver)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_the_newest_lines_within_bounds() {
        let buf = LogBuffer::new();
        for i in 0..(MAX_LINES + 10) {
            buf.push(LogStream::Stdout, format!("line {i}"));
        }
        let lines = buf.tail(None);
        assert_eq!(lines.len(), MAX_LINES);
        assert_eq!(lines[0].line, "line 10");
        assert_eq!(buf.tail(Some(2)).len(), 2);
        assert_eq!(buf.tail(Some(1))[0].line, format!("line {}", MAX_LINES + 9));
    }

    #[test]
    fn long_lines_are_cut_and_bytes_bounded() {
        let buf = LogBuffer::new();
        for _ in 0..200 {
            buf.push(LogStream::Stderr, "x".repeat(MAX_LINE_LEN * 2));
        }
        let lines = buf.tail(None);
        assert!(lines[0].line.ends_with("[truncated]"));
        let total: usize = lines.iter().map(|l| l.line.len()).sum();
        assert!(total <= MAX_BYTES);
    }

    #[test]
    fn one_buffer_per_instance_means_noise_stays_home() {
        let quiet = LogBuffer::new();
        let noisy = LogBuffer::new();
        quiet.push(LogStream::Stdout, "important".to_owned());
        for i in 0..100_000 {
            noisy.push(LogStream::Stdout, format!("spam {i}"));
        }
        assert_eq!(quiet.tail(None).len(), 1);
        assert_eq!(quiet.tail_text(5), "important");
    }
}
