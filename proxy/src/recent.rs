//! The wakes of the last hour, kept for the dashboard's overview (percentiles and the latest
//! ones): at most [`MAX_KEPT`], the oldest dropped first. A wake is rare next to a request,
//! so one lock per wake costs nothing on the request path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tenement_proto::InstanceId;

/// How far back the overview looks.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Wakes kept at most, whatever the window holds.
pub const MAX_KEPT: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct WakeRecord {
    /// Milliseconds since the Unix epoch, when the wake ended.
    pub at_ms: u64,
    pub instance: InstanceId,
    pub ok: bool,
    /// From the first request held to the instance ready.
    pub elapsed: Duration,
}

#[derive(Debug, Default)]
pub struct RecentWakes {
    wakes: Mutex<VecDeque<WakeRecord>>,
}

pub use tenement_proto::now_ms;

impl RecentWakes {
    pub fn record(&self, instance: &InstanceId, ok: bool, elapsed: Duration) {
        let record = WakeRecord {
            at_ms: now_ms(),
            instance: instance.clone(),
            ok,
            elapsed,
        };
        let mut wakes = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
        if wakes.len() >= MAX_KEPT {
            wakes.pop_front();
        }
        wakes.push_back(record);
    }

    /// The wakes of the last [`WINDOW`] that `keep` accepts, oldest first.
    pub fn within_window(&self, keep: impl Fn(&InstanceId) -> bool) -> Vec<WakeRecord> {
        let since = now_ms().saturating_sub(WINDOW.as_millis() as u64);
        let wakes = self.wakes.lock().unwrap_or_else(|e| e.into_inner());
        wakes
            .iter()
            .filter(|w| w.at_ms >= since && keep(&w.instance))
            .cloned()
            .collect()
    }
}

/// The `q`-quantile (0..=1) of `sorted` durations, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&ms, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&ms, 0.9), Some(Duration::from_millis(90)));
        assert_eq!(quantile(&ms, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&ms[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_oldest_go_first_and_scope_filters() {
        let wakes = RecentWakes::default();
        let alice = InstanceId::parse("notes:alice").expect("valid");
        let bob = InstanceId::parse("notes:bob").expect("valid");
        for _ in 0..MAX_KEPT {
            wakes.record(&alice, true, Duration::from_millis(1));
        }
        wakes.record(&bob, false, Duration::from_millis(2));
        let all = wakes.within_window(|_| true);
        assert_eq!(all.len(), MAX_KEPT);
        assert_eq!(all.last().map(|w| w.instance.clone()), Some(bob.clone()));
        assert_eq!(wakes.within_window(|i| *i == bob).len(), 1);
    }
}
