//! Prometheus metrics of the proxy, served on its own listener (`--metrics-listen`, the
//! `metrics_listen` setting, or a systemd socket named `metrics`), never on the public ones.
//!
//! The request path touches only handles made once per service and cached with the route
//! ([`crate::table::Entry::metrics`]): counters and histograms are atomics behind an `Arc`,
//! so a request builds no label set and takes no lock. What is a snapshot rather than a
//! count (instances by state, certificates, the process itself) is read at scrape time by
//! collectors. Written in the Prometheus text format (0.0.4) by prometheus-client, which
//! escapes label values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tenement_proto::rpc::{InstanceState, InstanceUsage, RestartReason};
use tenement_proto::ServiceName;

use crate::link::SupervisorReport;
use crate::table::Table;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The content type of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Request durations: from a millisecond (a warm answer) to a minute (a slow upstream).
const REQUEST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Wake durations: a native app is ready in milliseconds, a JVM in tens of seconds.
const WAKE_BUCKETS: [f64; 14] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceClass {
    service: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceKind {
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceOutcome {
    service: String,
    outcome: &'static str,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a request got no answer from its instance (`tenement_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// Connection refused or reset, a malformed answer.
    Broken,
    /// No response head within the response timeout.
    Timeout,
    /// Every connection to the instance stayed busy until the deadline.
    Busy,
    /// The instance could not be woken.
    WakeFailed,
    /// The instance is `failed`.
    Failed,
}

impl UpstreamKind {
    const ALL: [UpstreamKind; 5] = [
        UpstreamKind::Broken,
        UpstreamKind::Timeout,
        UpstreamKind::Busy,
        UpstreamKind::WakeFailed,
        UpstreamKind::Failed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Broken => "broken",
            UpstreamKind::Timeout => "timeout",
            UpstreamKind::Busy => "busy",
            UpstreamKind::WakeFailed => "wake_failed",
            UpstreamKind::Failed => "instance_failed",
        }
    }
}

/// The handles one service's requests touch, made once and shared.
#[derive(Debug)]
pub struct ServiceHandles {
    /// False when no metrics listener is configured: nothing reads them, nothing is recorded.
    enabled: bool,
    requests: [Counter; 5],
    duration: Histogram,
    upstream: [Counter; 5],
    wakes_ok: Counter,
    wakes_failed: Counter,
    wake_duration: Histogram,
    received: Counter,
    sent: Counter,
}

impl ServiceHandles {
    /// A request answered with `status` after `elapsed` (until its response head).
    pub fn request(&self, status: u16, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.requests[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn upstream_error(&self, kind: UpstreamKind) {
        if !self.enabled {
            return;
        }
        if let Some(i) = UpstreamKind::ALL.iter().position(|k| *k == kind) {
            self.upstream[i].inc();
        }
    }

    /// Body bytes received from a client for the service's instances.
    pub fn received(&self, bytes: u64) {
        if self.enabled {
            self.received.inc_by(bytes);
        }
    }

    /// Body bytes sent to clients from the service's instances.
    pub fn sent(&self, bytes: u64) {
        if self.enabled {
            self.sent.inc_by(bytes);
        }
    }

    /// A wake through the supervisor ended, `ok` or not, after `elapsed`.
    pub fn wake(&self, ok: bool, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        if ok {
            self.wakes_ok.inc();
            self.wake_duration.observe(elapsed.as_secs_f64());
        } else {
            self.wakes_failed.inc();
        }
    }
}

/// Every metric of the proxy.
pub struct Metrics {
    registry: Registry,
    requests: Family<ServiceClass, Counter>,
    duration: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    upstream: Family<ServiceKind, Counter>,
    wakes: Family<ServiceOutcome, Counter>,
    wake_duration: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    received: Family<ServiceLabel, Counter>,
    sent: Family<ServiceLabel, Counter>,
    services: RwLock<HashMap<String, Arc<ServiceHandles>>>,
    enabled: bool,
    /// The supervisor's numbers for the scrape being encoded (see [`Metrics::encode`]).
    supervisor: Arc<Mutex<Option<SupervisorReport>>>,
    /// One encoding at a time, so each reads the supervisor's numbers it was given.
    encoding: Mutex<()>,
    /// Client connections open now.
    pub connections: Gauge,
    /// Requests waiting for a wake now.
    pub waiting_for_wake: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

fn wake_histogram() -> Histogram {
    Histogram::new(WAKE_BUCKETS)
}

impl Metrics {
    /// The registry with its collectors: `snapshot` supplies what is read at scrape time.
    /// `enabled`: whether anything will ever be scraped (a metrics listener exists); if not,
    /// requests record nothing.
    pub fn new(snapshot: Arc<dyn Snapshot>, enabled: bool) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<ServiceClass, Counter>::default();
        let duration = Family::<ServiceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            request_histogram,
        );
        let upstream = Family::<ServiceKind, Counter>::default();
        let wakes = Family::<ServiceOutcome, Counter>::default();
        let wake_duration =
            Family::<ServiceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                wake_histogram,
            );
        let received = Family::<ServiceLabel, Counter>::default();
        let sent = Family::<ServiceLabel, Counter>::default();
        let connections = Gauge::default();
        let waiting_for_wake = Gauge::default();
        registry.register(
            "tenement_http_requests",
            "Requests answered, by service (empty: not routed to one) and status class",
            requests.clone(),
        );
        registry.register(
            "tenement_http_request_duration_seconds",
            "Time from a request's arrival to its response head, by service",
            duration.clone(),
        );
        registry.register(
            "tenement_upstream_errors",
            "Requests the instance did not answer, by service and kind",
            upstream.clone(),
        );
        registry.register(
            "tenement_wakes",
            "Wakes the proxy asked the supervisor for, by service and outcome",
            wakes.clone(),
        );
        registry.register(
            "tenement_wake_duration_seconds",
            "Time a request was held for a successful wake (first byte held), by service",
            wake_duration.clone(),
        );
        registry.register(
            "tenement_http_received_bytes",
            "Request body bytes received from clients, by service (upgraded connections: when they close)",
            received.clone(),
        );
        registry.register(
            "tenement_http_sent_bytes",
            "Response body bytes sent to clients, by service (upgraded connections: when they close)",
            sent.clone(),
        );
        registry.register(
            "tenement_connections_open",
            "Client connections open",
            connections.clone(),
        );
        registry.register(
            "tenement_requests_waiting_for_wake",
            "Requests held now while their instance wakes",
            waiting_for_wake.clone(),
        );
        let supervisor: Arc<Mutex<Option<SupervisorReport>>> = Arc::default();
        registry.register_collector(Box::new(Scraped {
            snapshot,
            supervisor: supervisor.clone(),
        }));
        Metrics {
            registry,
            requests,
            duration,
            upstream,
            wakes,
            wake_duration,
            received,
            sent,
            services: RwLock::default(),
            enabled,
            supervisor,
            encoding: Mutex::new(()),
            connections,
            waiting_for_wake,
        }
    }

    /// The handles of `service` (`None`: requests routed to no service), made on first use.
    pub fn service(&self, service: Option<&ServiceName>) -> Arc<ServiceHandles> {
        let name = service.map_or("", |s| s.as_str());
        if let Some(found) = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return found.clone();
        }
        let service = name.to_owned();
        let label = ServiceLabel {
            service: service.clone(),
        };
        let handles = Arc::new(ServiceHandles {
            enabled: self.enabled,
            received: self.received.get_or_create_owned(&label),
            sent: self.sent.get_or_create_owned(&label),
            requests: CLASSES.map(|class| {
                self.requests.get_or_create_owned(&ServiceClass {
                    service: service.clone(),
                    class,
                })
            }),
            duration: self.duration.get_or_create_owned(&label),
            upstream: UpstreamKind::ALL.map(|kind| {
                self.upstream.get_or_create_owned(&ServiceKind {
                    service: service.clone(),
                    kind: kind.as_str(),
                })
            }),
            wakes_ok: self.wakes.get_or_create_owned(&ServiceOutcome {
                service: service.clone(),
                outcome: "ok",
            }),
            wakes_failed: self.wakes.get_or_create_owned(&ServiceOutcome {
                service: service.clone(),
                outcome: "failed",
            }),
            wake_duration: self.wake_duration.get_or_create_owned(&label),
        });
        self.services
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service)
            .or_insert(handles)
            .clone()
    }

    /// The whole exposition, in the Prometheus text format, with the supervisor's numbers
    /// of this scrape (`None`: it is away or did not answer in time).
    pub fn encode(&self, supervisor: Option<SupervisorReport>) -> String {
        let _one_at_a_time = lock(&self.encoding);
        *lock(&self.supervisor) = supervisor;
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!("cannot encode the metrics: {e}");
        }
        *lock(&self.supervisor) = None;
        out
    }
}

/// One more on a gauge while it lives (a connection open, a request waiting), one less when
/// it is dropped, however the holder ends.
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: Gauge) -> Held {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What collectors read at scrape time.
pub trait Snapshot: Send + Sync + 'static {
    /// The route table (instances by service and state).
    fn table(&self) -> &Table;
    /// Whether the proxy holds the supervisor's route table now.
    fn supervisor_up(&self) -> bool;
    /// Certificates served: (name, source, not_after as unix seconds).
    fn certificates(&self) -> Vec<(String, &'static str, u64)>;
    /// ACME names with consecutive failed orders.
    fn acme_failures(&self) -> Vec<(String, u32)>;
}

struct Scraped {
    snapshot: Arc<dyn Snapshot>,
    supervisor: Arc<Mutex<Option<SupervisorReport>>>,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceState {
    service: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabel {
    service: String,
    /// Not `instance`: Prometheus names the scrape target so.
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    name: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DaemonLabel {
    daemon: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    daemon: &'static str,
    version: String,
}

const STATES: [InstanceState; 6] = [
    InstanceState::Stopped,
    InstanceState::Starting,
    InstanceState::Running,
    InstanceState::Stopping,
    InstanceState::Unhealthy,
    InstanceState::Failed,
];

/// One gauge family from `(labels, value)` pairs.
fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = &self.snapshot;
        let report = lock(&self.supervisor).take();
        let up = snapshot.supervisor_up();
        gauges(
            &mut encoder,
            "tenement_supervisor_up",
            "1 while the proxy holds the supervisor's route table, 0 while it is away",
            [(
                DaemonLabel {
                    daemon: "supervisor",
                },
                i64::from(up),
            )],
        )?;
        let table = snapshot.table();
        let mut counts: HashMap<(String, &'static str), i64> = HashMap::new();
        let mut failed = Vec::new();
        for (id, state) in table.states() {
            *counts
                .entry((id.service.as_str().to_owned(), state.as_str()))
                .or_default() += 1;
            if state == InstanceState::Failed {
                failed.push(InstanceLabel {
                    service: id.service.as_str().to_owned(),
                    tenant: id.to_string(),
                });
            }
        }
        let services: std::collections::BTreeSet<String> =
            counts.keys().map(|(s, _)| s.clone()).collect();
        let mut rows = Vec::new();
        for service in services {
            for state in STATES {
                let n = counts
                    .get(&(service.clone(), state.as_str()))
                    .copied()
                    .unwrap_or(0);
                rows.push((
                    ServiceState {
                        service: service.clone(),
                        state: state.as_str(),
                    },
                    n,
                ));
            }
        }
        gauges(
            &mut encoder,
            "tenement_instances",
            "Registered instances by service and state",
            rows,
        )?;
        let parks = encoder.encode_descriptor(
            "tenement_idle_parks",
            "Idle stops the proxy agreed to (nothing in flight)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(table.parks()).encode(parks)?;
        gauges(
            &mut encoder,
            "tenement_instance_failed",
            "1 for each instance in the failed state (it waits for an operator)",
            failed.into_iter().map(|l| (l, 1)),
        )?;
        gauges(
            &mut encoder,
            "tenement_tls_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (unix time), by name and source (file, acme, self_signed)",
            snapshot
                .certificates()
                .into_iter()
                .map(|(name, source, at)| (CertLabel { name, source }, i64::try_from(at).unwrap_or(i64::MAX))),
        )?;
        gauges(
            &mut encoder,
            "tenement_acme_consecutive_failures",
            "Failed ACME orders in a row for a name (0 once it has a certificate)",
            snapshot
                .acme_failures()
                .into_iter()
                .map(|(name, n)| (NameLabel { name }, i64::from(n))),
        )?;
        if let Some(report) = &report {
            supervisor_families(&mut encoder, report, table)?;
        }
        let own = tenement_proto::usage::own();
        let supervisor = report.as_ref().and_then(|r| r.supervisor.as_ref());
        let daemons = || {
            std::iter::once(("proxy", own.rss_bytes, own.open_fds, own.cpu_seconds))
                .chain(supervisor.map(|s| ("supervisor", s.rss_bytes, s.open_fds, s.cpu_seconds)))
        };
        gauges(
            &mut encoder,
            "tenement_process_resident_memory_bytes",
            "Resident memory of a tenement daemon",
            daemons().map(|(daemon, rss, _, _)| (DaemonLabel { daemon }, saturating_i64(rss))),
        )?;
        gauges(
            &mut encoder,
            "tenement_process_open_fds",
            "Open file descriptors of a tenement daemon",
            daemons().map(|(daemon, _, fds, _)| (DaemonLabel { daemon }, saturating_i64(fds))),
        )?;
        counters(
            &mut encoder,
            "tenement_process_cpu_seconds",
            "CPU time (user and system) used by a tenement daemon",
            daemons().map(|(daemon, _, _, cpu)| (DaemonLabel { daemon }, cpu)),
        )?;
        let versions = std::iter::once(("proxy", env!("CARGO_PKG_VERSION").to_owned()))
            .chain(supervisor.map(|s| ("supervisor", s.version.clone())));
        gauges(
            &mut encoder,
            "tenement_build_info",
            "1, labelled with the version of each daemon",
            versions.map(|(daemon, version)| (BuildLabel { daemon, version }, 1)),
        )?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceStatus {
    service: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceReason {
    service: String,
    reason: &'static str,
}

/// The families made of the supervisor's `stats` answer.
fn supervisor_families(
    encoder: &mut DescriptorEncoder,
    report: &SupervisorReport,
    table: &Table,
) -> Result<(), std::fmt::Error> {
    // Every reason of every service, zeros included: a rate() over a series that appears only
    // with its first restart misses that restart.
    counters(
        encoder,
        "tenement_restarts",
        "Restarts of instances by service and reason (crash, start_failed, health, operator, reload, rollout), since the supervisor started",
        report.services.iter().flat_map(|s| {
            RestartReason::ALL.iter().map(|reason| {
                (
                    ServiceReason {
                        service: s.service.as_str().to_owned(),
                        reason: reason.as_str(),
                    },
                    s.restarts.get(reason.as_str()).copied().unwrap_or(0),
                )
            })
        }),
    )?;
    counters(
        encoder,
        "tenement_oom_kills",
        "Runs of instances ended by the kernel's OOM killer (memory_max reached), by service",
        report.services.iter().map(|s| {
            (
                ServiceLabel {
                    service: s.service.as_str().to_owned(),
                },
                s.oom_kills,
            )
        }),
    )?;
    let service_label = |s: &tenement_proto::rpc::ServiceStats| ServiceLabel {
        service: s.service.as_str().to_owned(),
    };
    gauges(
        encoder,
        "tenement_release_current",
        "The release of each service that unpinned tenants run once a rollout has reached them",
        report
            .services
            .iter()
            .filter(|s| s.release > 0)
            .map(|s| (service_label(s), i64::from(s.release))),
    )?;
    gauges(
        encoder,
        "tenement_rollout_release",
        "The release a running or paused rollout is moving tenants to, by service",
        report
            .services
            .iter()
            .filter_map(|s| Some((service_label(s), i64::from(s.rollout.as_ref()?.release)))),
    )?;
    gauges(
        encoder,
        "tenement_rollout_paused",
        "1 while a service's rollout is paused (a canary step done, an operator, or a tenant that failed)",
        report
            .services
            .iter()
            .filter_map(|s| Some((service_label(s), i64::from(s.rollout.as_ref()?.paused)))),
    )?;
    gauges(
        encoder,
        "tenement_rollout_tenants",
        "Tenants of a running or paused rollout by status: moved, pending (in the current step, still to move), switching (switching or baking), failed",
        report.services.iter().flat_map(|s| {
            let progress = s.rollout.clone();
            let service = s.service.as_str().to_owned();
            progress.into_iter().flat_map(move |p| {
                let service = service.clone();
                [
                    ("moved", p.moved),
                    ("pending", p.pending),
                    ("switching", p.switching),
                    ("failed", p.failed),
                ]
                .into_iter()
                .map(move |(status, n)| {
                    (
                        ServiceStatus {
                            service: service.clone(),
                            status,
                        },
                        i64::from(n),
                    )
                })
            })
        }),
    )?;
    let label = |usage: &InstanceUsage| InstanceLabel {
        service: usage.instance.service.as_str().to_owned(),
        tenant: usage.instance.to_string(),
    };
    gauges(
        encoder,
        "tenement_instance_memory_bytes",
        "Memory of a running instance (its cgroup's memory.current, else its processes' resident memory); metrics_per_instance",
        report.instances.iter().filter_map(|u| {
            Some((label(u), saturating_i64(u.memory_bytes?)))
        }),
    )?;
    counters(
        encoder,
        "tenement_instance_cpu_seconds",
        "CPU time of a running instance's current processes; metrics_per_instance",
        report
            .instances
            .iter()
            .filter_map(|u| Some((label(u), u.cpu_seconds?))),
    )?;
    counters(
        encoder,
        "tenement_instance_requests",
        "Requests to a running instance since the proxy started; metrics_per_instance",
        report.instances.iter().map(|u| {
            let requests = table.get(&u.instance).map_or(0, |e| e.requests());
            (label(u), requests)
        }),
    )?;
    Ok(())
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One counter family from `(labels, value)` pairs.
fn counters<L: EncodeLabelSet, N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, N)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Empty(Table);

    impl Snapshot for Empty {
        fn table(&self) -> &Table {
            &self.0
        }
        fn supervisor_up(&self) -> bool {
            false
        }
        fn certificates(&self) -> Vec<(String, &'static str, u64)> {
            vec![("a\"b\\c\nd".to_owned(), "file", 7)]
        }
        fn acme_failures(&self) -> Vec<(String, u32)> {
            Vec::new()
        }
    }

    #[test]
    fn requests_land_in_their_class_and_bucket_and_label_values_are_escaped() {
        let metrics = Metrics::new(Arc::new(Empty::default()), true);
        let notes = ServiceName::new("notes").expect("valid");
        let handles = metrics.service(Some(&notes));
        for _ in 0..3 {
            handles.request(200, Duration::from_millis(3));
        }
        handles.request(502, Duration::from_millis(40));
        handles.upstream_error(UpstreamKind::Broken);
        handles.wake(true, Duration::from_millis(7));
        // The same handles come back: made once per service.
        assert!(Arc::ptr_eq(&handles, &metrics.service(Some(&notes))));
        let text = metrics.encode(None);
        for line in [
            "tenement_http_requests_total{service=\"notes\",class=\"2xx\"} 3",
            "tenement_http_requests_total{service=\"notes\",class=\"5xx\"} 1",
            "tenement_http_request_duration_seconds_bucket{service=\"notes\",le=\"0.005\"} 3",
            "tenement_http_request_duration_seconds_bucket{service=\"notes\",le=\"0.05\"} 4",
            "tenement_upstream_errors_total{service=\"notes\",kind=\"broken\"} 1",
            "tenement_wakes_total{service=\"notes\",outcome=\"ok\"} 1",
            "tenement_wake_duration_seconds_bucket{service=\"notes\",le=\"0.01\"} 1",
            "tenement_wake_duration_seconds_bucket{service=\"notes\",le=\"0.005\"} 0",
            "tenement_supervisor_up{daemon=\"supervisor\"} 0",
            "tenement_tls_certificate_expiry_timestamp_seconds{name=\"a\\\"b\\\\c\\nd\",source=\"file\"} 7",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
