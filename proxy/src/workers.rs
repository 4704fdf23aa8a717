//! The threads that serve clients: one per CPU by default, each with a single-threaded tokio
//! runtime of its own. The workers take turns accepting from every public listener, and each
//! serves what it accepted to the end (the client connection, the TLS handshake, the relay
//! to the instance). The pool hands a worker its own idle upstream connections first, so a
//! request and the connection it is forwarded on usually share a thread; another worker's
//! idle connection is used rather than a new one (an instance that serves one connection at
//! a time would leave a second one unanswered).
//!
//! Why not one work-stealing runtime: a proxied request wakes two tasks (the client's and the
//! upstream connection's) for every read, and with work stealing they often run on different
//! threads, so each hand-off is a cross-thread wake-up, and idle threads spin looking for
//! work. Measured side by side (`bench/proxy_ab.py`, docs/BENCHMARKS.md section 3), the
//! workers spent 0.68-0.74x the CPU per request at 4 and 32 connections.
//!
//! What is shared between workers is shared state, not tasks: the route table, the metrics,
//! the pool's caps. Tasks that are not about one client (the route watch, ACME renewals, the
//! metrics listener, signals) run on the main thread's runtime.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker this thread is (0 on any other thread).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How often a worker shows it is alive (see [`Liveness::all_alive`]).
pub const BEAT: Duration = Duration::from_millis(500);

pub struct Workers {
    handles: Vec<Handle>,
    liveness: Arc<Liveness>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How many workers when none is asked for: the CPUs this process may run on.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Workers {
    /// Starts `count` worker threads (at least one), each running its runtime until
    /// [`Workers::stop`].
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let (mut handles, mut beats, mut threads) = (Vec::new(), Vec::new(), Vec::new());
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let beat = Arc::new(AtomicU64::new(0));
            handles.push(runtime.handle().clone());
            beats.push(beat.clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async {
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(BEAT) => {
                                    beat.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            liveness: Arc::new(Liveness {
                beats,
                seen: Default::default(),
            }),
            stop,
            threads,
        })
    }

    /// The runtimes to spawn client-facing tasks on, one per worker.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// What tells whether the workers still run.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.liveness.clone()
    }

    /// Ends every worker's runtime (what still runs there is dropped) and waits for the
    /// threads.
    pub fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Each worker's count of beats.
pub struct Liveness {
    beats: Vec<Arc<AtomicU64>>,
    /// The beats seen at the last [`Liveness::all_alive`].
    seen: std::sync::Mutex<Vec<u64>>,
}

impl Liveness {
    /// Whether every worker has run since the last call (for the systemd watchdog: a stalled
    /// worker stops the pings). Meant to be called less often than every [`BEAT`].
    pub fn all_alive(&self) -> bool {
        let now: Vec<u64> = self
            .beats
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let mut seen = crate::lock(&self.seen);
        let alive = seen.is_empty() || now.iter().zip(seen.iter()).all(|(a, b)| a != b);
        *seen = now;
        alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_and_every_worker_beats() {
        let workers = Workers::start(2).expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, handle) in workers.handles().iter().enumerate() {
            let tx = tx.clone();
            handle.spawn(async move {
                tx.send((
                    i,
                    current(),
                    std::thread::current().name().map(str::to_owned),
                ))
                .expect("send");
            });
        }
        let mut got: Vec<_> = (0..2).map(|_| rx.recv().expect("recv")).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0, 0, Some("worker-0".to_owned())),
                (1, 1, Some("worker-1".to_owned()))
            ]
        );
        let liveness = workers.liveness();
        assert!(
            liveness.all_alive(),
            "the first call has nothing to compare"
        );
        std::thread::sleep(BEAT * 3);
        assert!(liveness.all_alive(), "both workers beat meanwhile");

        // A worker whose runtime is stuck (a blocking call on it) does not beat.
        let (started, blocked) = std::sync::mpsc::channel();
        workers.handles()[1].spawn(async move {
            started.send(()).expect("send");
            std::thread::sleep(BEAT * 6);
        });
        blocked.recv().expect("recv");
        liveness.all_alive();
        std::thread::sleep(BEAT * 3);
        assert!(!liveness.all_alive(), "worker 1 is stuck");
        workers.stop();
    }
}
