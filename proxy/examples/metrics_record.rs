//! What the proxy's metrics cost a request, measured in-process: the calls the request path
//! makes for one proxied request (its status and duration, the response body bytes sent),
//! timed on as many threads as the proxy has workers, all on one service's handles (the
//! contended case: every worker counts into the same series), with metrics on and off
//! (off: the handles are built disabled and record nothing, as in a proxy without a metrics
//! listener). Rounds alternate which side goes first; medians of per-round figures.
//!
//! Run by `bench/metrics_cost.py` (part 3); alone:
//!
//! ```sh
//! cargo run --release -p tenement-proxy --example metrics_record -- [THREADS] [REQUESTS] [ROUNDS]
//! ```

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tenement_proto::ServiceName;
use tenement_proxy::metrics::{Metrics, Snapshot};
use tenement_proxy::table::Table;

#[derive(Default)]
struct NoRoutes(Table);

impl Snapshot for NoRoutes {
    fn table(&self) -> &Table {
        &self.0
    }
    fn supervisor_up(&self) -> bool {
        true
    }
    fn certificates(&self) -> Vec<(String, &'static str, u64)> {
        Vec::new()
    }
    fn acme_failures(&self) -> Vec<(String, u32)> {
        Vec::new()
    }
}

/// Request durations spread over the histogram's buckets, as real traffic would.
const DURATIONS_US: [u64; 8] = [80, 150, 400, 900, 2_500, 7_000, 30_000, 120_000];

/// Nanoseconds per request over `threads` threads doing `requests` each at once: the slowest
/// thread's time over its requests (they run in parallel, as the workers do).
fn run(enabled: bool, threads: usize, requests: u64) -> f64 {
    let metrics = Arc::new(Metrics::new(Arc::new(NoRoutes::default()), enabled));
    let service = ServiceName::new("notes").expect("a valid service name");
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (metrics, start, service) = (metrics.clone(), start.clone(), service.clone());
            std::thread::spawn(move || {
                // What a request looks up once per route and keeps (the entry's handles).
                let handles = metrics.service(Some(&service));
                start.wait();
                let began = Instant::now();
                for i in 0..requests {
                    let elapsed = Duration::from_micros(DURATIONS_US[(i % 8) as usize]);
                    handles.sent(black_box(1_024));
                    handles.request(black_box(200), black_box(elapsed));
                }
                began.elapsed()
            })
        })
        .collect();
    let slowest = workers
        .into_iter()
        .map(|w| w.join().expect("a worker thread"))
        .max()
        .unwrap_or_default();
    slowest.as_nanos() as f64 / requests as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let threads = arg(1, 2).max(1) as usize;
    let requests = arg(2, 2_000_000).max(1);
    let rounds = arg(3, 11).max(1);
    run(true, threads, requests / 10); // warm-up
    let (mut on, mut off, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            let a = run(true, threads, requests);
            (a, run(false, threads, requests))
        } else {
            let b = run(false, threads, requests);
            (run(true, threads, requests), b)
        };
        on.push(a);
        off.push(b);
        added.push(a - b);
    }
    let spread = |xs: &[f64]| {
        let (lo, hi) = xs
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        format!("[{lo:.1}..{hi:.1}]")
    };
    println!(
        "threads={threads} requests={requests} rounds={rounds} on_ns={:.1} off_ns={:.1} added_ns={:.1} added_spread={}",
        median(on.clone()),
        median(off.clone()),
        median(added.clone()),
        spread(&added),
    );
}
