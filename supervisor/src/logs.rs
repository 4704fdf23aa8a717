//! Per-instance output buffers: every line an instance writes, bounded per instance so one
//! noisy tenant can never evict another's lines, plus a broadcast for `tenctl logs -f`.
//!
//! A running instance keeps up to [`RUNNING_BYTES`]; once its process has exited, the buffer
//! shrinks to its newest [`STOPPED_BYTES`] (enough to see why it stopped; the journal has
//! everything). Memory then follows the instances running, not the ones ever registered:
//! 10,000 mostly idle tenants hold at most 160 MiB of output between them, not 5 GiB.
//!
//! Each buffer is shared between the tasks reading that instance's pipes and the registry; the
//! lock is a plain mutex held only to push or copy lines, never across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tenement_proto::rpc::{LogLine, LogStream};
use tenement_proto::InstanceId;

use crate::journal::{self, JournalTarget};
use tokio::sync::broadcast;

/// Lines kept per instance.
pub const MAX_LINES: usize = 2000;
/// Bytes kept per running instance, each line counted with [`LINE_OVERHEAD`].
pub const RUNNING_BYTES: usize = 512 * 1024;
/// Bytes kept per instance whose process has exited.
pub const STOPPED_BYTES: usize = 16 * 1024;
/// What a kept line costs beyond its text: the `LogLine` and the allocation of its string.
const LINE_OVERHEAD: usize = std::mem::size_of::<LogLine>() + 32;
/// Longer lines are cut here (and marked).
pub const MAX_LINE_LEN: usize = 8 * 1024;

/// Lines a `tenctl logs -f` reader may fall behind by before it is told it missed some.
const FOLLOW_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Inner {
    lines: VecDeque<LogLine>,
    /// What the lines cost, with [`LINE_OVERHEAD`] each.
    bytes: usize,
    /// [`RUNNING_BYTES`] or [`STOPPED_BYTES`].
    cap: usize,
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
                cap: STOPPED_BYTES,
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
        inner.bytes += entry.line.len() + LINE_OVERHEAD;
        inner.lines.push_back(entry);
        inner.trim();
    }

    /// A process of this instance starts (`true`: the buffer may grow to [`RUNNING_BYTES`]) or
    /// has exited (`false`: it keeps its newest [`STOPPED_BYTES`]).
    pub fn set_running(&self, running: bool) {
        let mut inner = self.lock();
        inner.cap = if running {
            RUNNING_BYTES
        } else {
            STOPPED_BYTES
        };
        inner.trim();
        if !running {
            inner.lines.shrink_to_fit();
        }
    }

    /// What the kept lines cost in memory, about.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
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

impl Inner {
    /// Drops the oldest lines until both bounds hold; the newest line always stays.
    fn trim(&mut self) {
        while self.lines.len() > 1 && (self.lines.len() > MAX_LINES || self.bytes > self.cap) {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.line.len() + LINE_OVERHEAD,
                None => break,
            }
        }
    }
}

pub use tenement_proto::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_the_newest_lines_within_bounds() {
        let buf = LogBuffer::new();
        buf.set_running(true);
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
        buf.set_running(true);
        for _ in 0..200 {
            buf.push(LogStream::Stderr, "x".repeat(MAX_LINE_LEN * 2));
        }
        let lines = buf.tail(None);
        assert!(lines[0].line.ends_with("[truncated]"));
        let total: usize = lines.iter().map(|l| l.line.len()).sum();
        assert!(total <= RUNNING_BYTES);
        assert!(buf.bytes() <= RUNNING_BYTES);
    }

    #[test]
    fn an_exited_instance_keeps_only_its_newest_lines() {
        let buf = LogBuffer::new();
        buf.set_running(true);
        for i in 0..MAX_LINES {
            buf.push(
                LogStream::Stdout,
                format!("request {i} {}", "x".repeat(100)),
            );
        }
        buf.push(LogStream::Event, "exited (exit status: 3)".to_owned());
        assert!(buf.bytes() > 200 * 1024, "{} bytes", buf.bytes());
        buf.set_running(false);
        let kept = buf.tail(None);
        assert!(buf.bytes() <= STOPPED_BYTES, "{} bytes", buf.bytes());
        assert!(kept.len() > 50, "only {} lines", kept.len());
        assert_eq!(kept.last().expect("a line").line, "exited (exit status: 3)");
        // The next run may fill it again.
        buf.set_running(true);
        for i in 0..1000 {
            buf.push(LogStream::Stdout, format!("again {i}"));
        }
        assert!(buf.tail(None).len() >= 1000);
    }

    #[test]
    fn a_line_longer_than_the_cap_is_still_kept() {
        let buf = LogBuffer::new();
        buf.push(LogStream::Stderr, "y".repeat(MAX_LINE_LEN * 4));
        assert_eq!(buf.tail(None).len(), 1);
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
