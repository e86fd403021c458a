//! Prometheus metrics: the counters the registry bumps as it works, the
//! per-RPC latency and status-code tables fed by [`crate::telemetry`], and
//! the exposition rendered at `/metrics` (see [`crate::ops`]).
//!
//! The hot paths (heartbeats, resolves) must stay as cheap as they are
//! without metrics, so every counter is a plain atomic bumped with a relaxed
//! `fetch_add`: no lock, no allocation, no label lookup. RPC tables are
//! fixed arrays indexed by a method index found once per call from the
//! request path, so they need no map either. Gauges (instances, leases,
//! services, watchers) are not maintained at all: they are read from the
//! registry's own counts at scrape time, by [`render`]. `prometheus-client`
//! does the text encoding (names, `# HELP`/`# TYPE`, escaping, `_total`).

use std::{
    fmt,
    sync::Arc,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
};

use registry_api::v1::StatusResponse;

/// Upper bounds (seconds) of the RPC latency histogram buckets: 100 µs to
/// 10 s, roughly ×2.5 apart. Registry calls take tens of microseconds when
/// healthy, so the low end is fine-grained; anything past 10 s is an outage
/// and only needs counting (`+Inf`).
pub const RPC_LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// gRPC methods given their own series, as `(grpc_service, grpc_method)`.
/// Any other path (a service added later, a bad request) is counted under
/// [`OTHER_METHOD`], so the tables stay fixed-size and lock-free. A new
/// gRPC service served by the daemon should add its methods here.
pub const RPC_METHODS: [(&str, &str); 13] = [
    ("registry.v1.Registry", "Register"),
    ("registry.v1.Registry", "Heartbeat"),
    ("registry.v1.Registry", "KeepAlive"),
    ("registry.v1.Registry", "Deregister"),
    ("registry.v1.Registry", "Resolve"),
    ("registry.v1.Registry", "ListServices"),
    ("registry.v1.Registry", "Watch"),
    ("registry.v1.Registry", "Status"),
    ("registry.v1.Registry", "SetInstanceState"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

/// Labels of calls whose path is not in [`RPC_METHODS`].
pub const OTHER_METHOD: (&str, &str) = ("other", "other");

/// gRPC status codes 0..=16 (`OK` .. `UNAUTHENTICATED`); anything else is
/// counted as `UNKNOWN`, as gRPC itself does.
const GRPC_CODES: usize = 17;
const CODE_NAMES: [&str; GRPC_CODES] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
/// Status code `UNKNOWN`.
pub(crate) const CODE_UNKNOWN: u16 = 2;
/// Status code `CANCELLED`: a call whose response was dropped before its
/// status was sent (the client went away).
pub(crate) const CODE_CANCELLED: u16 = 1;

const METHODS: usize = RPC_METHODS.len() + 1;
const BUCKETS: usize = RPC_LATENCY_BUCKETS.len() + 1;

/// Latency histogram of one method: one atomic per bucket.
#[derive(Debug)]
struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = RPC_LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `(sum seconds, count, per-bucket counts)` as the encoder wants them
    /// (non-cumulative; the last bound `f64::MAX` is written as `+Inf`).
    fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = b.load(Ordering::Relaxed);
                count += n;
                (RPC_LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX), n)
            })
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// Per-method latency histograms and per-(method, code) call counts.
#[derive(Debug)]
pub struct RpcMetrics {
    latency: [AtomicHistogram; METHODS],
    codes: [[AtomicU64; GRPC_CODES]; METHODS],
}

impl RpcMetrics {
    fn new() -> Self {
        Self {
            latency: std::array::from_fn(|_| AtomicHistogram::new()),
            codes: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// Index of a request path (`/pkg.Service/Method`) in the tables; paths
    /// not in [`RPC_METHODS`] share the last slot. No allocation.
    pub fn method_index(path: &str) -> usize {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return METHODS - 1;
        };
        RPC_METHODS
            .iter()
            .position(|(s, m)| *m == method && *s == service)
            .unwrap_or(METHODS - 1)
    }

    /// The `(grpc_service, grpc_method)` labels of a method index.
    pub fn labels(index: usize) -> (&'static str, &'static str) {
        RPC_METHODS.get(index).copied().unwrap_or(OTHER_METHOD)
    }

    /// Records how long a call took to produce its response (for streaming
    /// methods: to open the stream).
    pub fn observe_latency(&self, method: usize, d: Duration) {
        self.latency[method.min(METHODS - 1)].observe(d);
    }

    /// Counts a finished call by its final `grpc-status`.
    pub fn count_code(&self, method: usize, code: u16) {
        let code = if (code as usize) < GRPC_CODES {
            code as usize
        } else {
            CODE_UNKNOWN as usize
        };
        self.codes[method.min(METHODS - 1)][code].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls of a method that ended with `code`, for tests and `regctl`.
    pub fn calls(&self, method: usize, code: u16) -> u64 {
        self.codes[method.min(METHODS - 1)][(code as usize).min(GRPC_CODES - 1)]
            .load(Ordering::Relaxed)
    }

    /// The name of a status code (`OK`, `NOT_FOUND`...).
    pub fn code_name(code: u16) -> &'static str {
        CODE_NAMES
            .get(code as usize)
            .copied()
            .unwrap_or(CODE_NAMES[CODE_UNKNOWN as usize])
    }
}

/// Every counter of one registry. Lives in the registry's shared state; the
/// handle, the expiry task, watch streams and the RPC layer bump it.
#[derive(Debug)]
pub struct Metrics {
    /// Successful Register calls (new instances and replacements).
    pub(crate) registrations: AtomicU64,
    /// Successful Deregister calls.
    pub(crate) deregistrations: AtomicU64,
    /// Leases expired by the expiry task.
    pub(crate) lease_expirations: AtomicU64,
    /// Instances removed because their lease expired.
    pub(crate) expired_instances: AtomicU64,
    /// Lease renewals that found their lease live.
    pub(crate) heartbeats: AtomicU64,
    /// Lease renewals for an unknown or expired lease.
    pub(crate) heartbeat_misses: AtomicU64,
    /// Events written to watch streams (per watcher).
    pub(crate) watch_events_sent: AtomicU64,
    /// Times the expiry task found it had not been scheduled for longer
    /// than the stall threshold and extended every lease.
    pub(crate) stall_extensions: AtomicU64,
    /// Total time (ms) given back to leases by stall extensions.
    pub(crate) stall_ms: AtomicU64,
    /// Expiry storms detected.
    pub(crate) storms: AtomicU64,
    /// Leases whose expiry was deferred by the storm guard.
    pub(crate) storm_throttled: AtomicU64,
    /// Whether the storm guard is throttling expiry now.
    pub(crate) storm_active: AtomicBool,
    /// Due leases waiting for the storm guard's rate.
    pub(crate) storm_backlog: AtomicUsize,
    /// True between the gRPC server starting and its shutdown signal.
    pub(crate) serving: AtomicBool,
    /// Group commits (one flush each) of the data directory.
    pub(crate) data_dir_commits: AtomicU64,
    /// Write records made durable by those commits.
    pub(crate) data_dir_records: AtomicU64,
    /// Total time spent writing and flushing, in microseconds.
    pub(crate) data_dir_flush_us: AtomicU64,
    /// Whether the data directory failed (writes refused since).
    pub(crate) data_dir_failed: AtomicBool,
    /// Instances restored from the data directory at start.
    pub(crate) restored_instances: AtomicU64,
    /// Leases restored from the snapshot at start.
    pub(crate) restored_leases: AtomicU64,
    /// Per-RPC latency and status codes.
    pub(crate) rpc: RpcMetrics,
    /// Admin-state changes (drain, maintenance, back to active).
    pub(crate) admin_state_changes: AtomicU64,
    /// The health checker's counters (see [`crate::health`]).
    pub(crate) health: HealthMetrics,
}

/// Result labels of health checks and states, indexed by
/// `HealthState as usize`.
const HEALTH_LABELS: [&str; 3] = ["passing", "warning", "critical"];

/// What the health checker does: checks by result, state changes, check
/// latency and how late checks start (its loop's latency), checks in
/// flight and instances checked.
#[derive(Debug)]
pub struct HealthMetrics {
    checks: [AtomicU64; 3],
    transitions: [AtomicU64; 3],
    latency: AtomicHistogram,
    lag: AtomicHistogram,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) checked: AtomicUsize,
    pub(crate) dropped: AtomicU64,
}

impl HealthMetrics {
    fn new() -> Self {
        Self {
            checks: std::array::from_fn(|_| AtomicU64::new(0)),
            transitions: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: AtomicHistogram::new(),
            lag: AtomicHistogram::new(),
            in_flight: AtomicUsize::new(0),
            checked: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Counts a finished check with its result (a `HealthState` value) and
    /// how long it took.
    pub fn check_done(&self, result: usize, took: Duration) {
        self.checks[result.min(2)].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
    }

    /// Counts a change of an instance's health to `state`.
    pub fn transition(&self, state: usize) {
        self.transitions[state.min(2)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long after its due time a check started.
    pub fn lag(&self, late: Duration) {
        self.lag.observe(late);
    }

    /// Checks run so far, by result (`passing`, `warning`, `critical`).
    pub fn checks(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.checks[i].load(Ordering::Relaxed))
    }

    /// State changes so far, by new state.
    pub fn transitions(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.transitions[i].load(Ordering::Relaxed))
    }

    /// Checks in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Instances this node checks now.
    pub fn checked(&self) -> usize {
        self.checked.load(Ordering::Relaxed)
    }

    /// The largest check start lag observed so far, as the upper bound of
    /// its histogram bucket (`None` before any check; `f64::MAX` past the
    /// last bucket).
    pub fn max_lag_bound(&self) -> Option<f64> {
        let (_, count, buckets) = self.lag.get();
        (count > 0).then(|| {
            buckets
                .iter()
                .rev()
                .find(|(_, n)| *n > 0)
                .map_or(0.0, |(le, _)| *le)
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            registrations: AtomicU64::new(0),
            deregistrations: AtomicU64::new(0),
            lease_expirations: AtomicU64::new(0),
            expired_instances: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            heartbeat_misses: AtomicU64::new(0),
            watch_events_sent: AtomicU64::new(0),
            stall_extensions: AtomicU64::new(0),
            stall_ms: AtomicU64::new(0),
            storms: AtomicU64::new(0),
            storm_throttled: AtomicU64::new(0),
            storm_active: AtomicBool::new(false),
            storm_backlog: AtomicUsize::new(0),
            serving: AtomicBool::new(false),
            data_dir_commits: AtomicU64::new(0),
            data_dir_records: AtomicU64::new(0),
            data_dir_flush_us: AtomicU64::new(0),
            data_dir_failed: AtomicBool::new(false),
            restored_instances: AtomicU64::new(0),
            restored_leases: AtomicU64::new(0),
            rpc: RpcMetrics::new(),
            admin_state_changes: AtomicU64::new(0),
            health: HealthMetrics::new(),
        }
    }
}

/// Relaxed increment: counters need atomicity, not ordering.
pub(crate) fn inc(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Per-RPC tables, for the RPC layer.
    pub fn rpc(&self) -> &RpcMetrics {
        &self.rpc
    }

    /// Marks the gRPC server as serving (or draining): `/readyz` reads it.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Whether the gRPC server is serving and not draining.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Stall extensions so far (see [`crate::expiry`]).
    pub fn stall_extensions(&self) -> u64 {
        self.stall_extensions.load(Ordering::Relaxed)
    }

    /// Whether the storm guard is throttling expiry now.
    pub fn storm_active(&self) -> bool {
        self.storm_active.load(Ordering::Relaxed)
    }

    /// Leases whose expiry the storm guard has deferred so far.
    pub fn storm_throttled(&self) -> u64 {
        self.storm_throttled.load(Ordering::Relaxed)
    }

    /// The health checker's counters.
    pub fn health(&self) -> &HealthMetrics {
        &self.health
    }
}

/// Content type of [`render`]'s output (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `/metrics` exposition: the counters, and the sizes of a status
/// snapshot the caller took (so this module needs nothing of the registry
/// handle).
pub fn render(metrics: &Arc<Metrics>, status: StatusResponse) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register(
        "registry_build",
        "Build of the registry daemon (value is always 1)",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    reg.register_collector(Box::new(Scrape {
        metrics: metrics.clone(),
        status,
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .expect("writing to a String cannot fail");
    out
}

/// What one scrape renders.
struct Scrape {
    metrics: Arc<Metrics>,
    status: StatusResponse,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter_f64(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.metrics;
        let st = &self.status;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let info = st.server.unwrap_or_default();

        gauge(
            &mut e,
            "registry_instances",
            "Live instances",
            st.instances as i64,
        )?;
        gauge(&mut e, "registry_leases", "Live leases", st.leases as i64)?;
        gauge(
            &mut e,
            "registry_services",
            "Known services",
            st.services as i64,
        )?;
        gauge(
            &mut e,
            "registry_watchers",
            "Open watch streams",
            st.watchers as i64,
        )?;
        gauge(
            &mut e,
            "registry_revision",
            "Current catalog revision",
            st.revision as i64,
        )?;
        gauge(
            &mut e,
            "registry_start_time_seconds",
            "Start of this server life, Unix seconds (the epoch)",
            (info.epoch / 1000) as i64,
        )?;
        gauge(
            &mut e,
            "registry_warming_up",
            "1 during the warm-up window after a start, while services re-register",
            info.warming_up as i64,
        )?;
        gauge(
            &mut e,
            "registry_ready",
            "1 when serving and past warm-up (what /readyz answers)",
            (m.serving() && !info.warming_up) as i64,
        )?;
        gauge(
            &mut e,
            "registry_expiry_storm",
            "1 while the storm guard is throttling lease expiry",
            m.storm_active() as i64,
        )?;
        gauge(
            &mut e,
            "registry_expiry_backlog",
            "Due leases waiting for the storm guard's rate",
            m.storm_backlog.load(Ordering::Relaxed) as i64,
        )?;

        counter(
            &mut e,
            "registry_registrations",
            "Successful Register calls",
            load(&m.registrations),
        )?;
        counter(
            &mut e,
            "registry_deregistrations",
            "Successful Deregister calls",
            load(&m.deregistrations),
        )?;
        counter(
            &mut e,
            "registry_lease_expirations",
            "Leases expired",
            load(&m.lease_expirations),
        )?;
        counter(
            &mut e,
            "registry_expired_instances",
            "Instances removed because their lease expired",
            load(&m.expired_instances),
        )?;
        {
            let c = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "registry_heartbeats",
                "Lease renewals (Heartbeat, KeepAlive, Register with a lease) by result",
                None,
                c.metric_type(),
            )?;
            for (result, v) in [
                ("renewed", load(&m.heartbeats)),
                ("not_found", load(&m.heartbeat_misses)),
            ] {
                ConstCounter::new(v).encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        counter(
            &mut e,
            "registry_watch_events_sent",
            "Watch events written to streams, counted per watcher",
            load(&m.watch_events_sent),
        )?;
        counter(
            &mut e,
            "registry_watcher_resets",
            "Reset snapshots sent to watchers that fell behind",
            st.watcher_resets,
        )?;
        counter(
            &mut e,
            "registry_stall_extensions",
            "Times the expiry task was not scheduled for longer than the stall threshold and extended every lease",
            load(&m.stall_extensions),
        )?;
        counter(
            &mut e,
            "registry_stall_seconds",
            "Time given back to every lease by stall extensions",
            load(&m.stall_ms) / 1000,
        )?;
        counter(
            &mut e,
            "registry_expiry_storms",
            "Expiry storms detected",
            load(&m.storms),
        )?;
        counter(
            &mut e,
            "registry_expiry_throttled",
            "Due leases whose expiry the storm guard deferred",
            load(&m.storm_throttled),
        )?;

        counter(
            &mut e,
            "registry_data_dir_commits",
            "Group commits of the data directory (--data-dir), one flush each",
            load(&m.data_dir_commits),
        )?;
        counter(
            &mut e,
            "registry_data_dir_records",
            "Writes made durable in the data directory",
            load(&m.data_dir_records),
        )?;
        counter_f64(
            &mut e,
            "registry_data_dir_flush_seconds",
            "Time spent writing and flushing the data directory",
            load(&m.data_dir_flush_us) as f64 / 1e6,
        )?;
        gauge(
            &mut e,
            "registry_data_dir_failed",
            "1 once a data directory write failed: writes are refused until a restart",
            m.data_dir_failed.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "registry_restored_instances",
            "Instances restored from the data directory at start",
            load(&m.restored_instances) as i64,
        )?;
        gauge(
            &mut e,
            "registry_restored_leases",
            "Leases restored (with a fresh TTL) from the data directory at start",
            load(&m.restored_leases) as i64,
        )?;

        counter(
            &mut e,
            "registry_admin_state_changes",
            "Instances set draining, disabled or active again",
            load(&m.admin_state_changes),
        )?;
        let h = &m.health;
        {
            let c = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "registry_health_checks",
                "Health checks run by this node, by result",
                None,
                c.metric_type(),
            )?;
            for (i, result) in HEALTH_LABELS.iter().enumerate() {
                ConstCounter::new(load(&h.checks[i]))
                    .encode(family.encode_family(&[("result", *result)])?)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "registry_health_transitions",
                "Changes of an instance's health state, by new state",
                None,
                c.metric_type(),
            )?;
            for (i, state) in HEALTH_LABELS.iter().enumerate() {
                ConstCounter::new(load(&h.transitions[i]))
                    .encode(family.encode_family(&[("state", *state)])?)?;
            }
        }
        for (name, help, hist) in [
            (
                "registry_health_check_duration_seconds",
                "Time one health check took (connect, request, answer)",
                &h.latency,
            ),
            (
                "registry_health_check_lag_seconds",
                "How late health checks started after their due time (the check loop's latency; grows when --max-checks-in-flight is saturated)",
                &h.lag,
            ),
        ] {
            let (sum, count, buckets) = hist.get();
            e.encode_descriptor(name, help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        gauge(
            &mut e,
            "registry_health_checks_in_flight",
            "Health checks in flight now",
            h.in_flight() as i64,
        )?;
        gauge(
            &mut e,
            "registry_health_checked_instances",
            "Instances with a health check run by this node",
            h.checked() as i64,
        )?;
        counter(
            &mut e,
            "registry_health_results_dropped",
            "Check results that could not be written (store unavailable); retried at the next check",
            load(&h.dropped),
        )?;

        let rpc = &m.rpc;
        {
            let mut family = e.encode_descriptor(
                "registry_rpc_duration_seconds",
                "Time to answer a gRPC call (streaming calls: to open the stream)",
                None,
                MetricType::Histogram,
            )?;
            for (i, h) in rpc.latency.iter().enumerate() {
                let (sum, count, buckets) = h.get();
                if count == 0 && i == METHODS - 1 {
                    continue;
                }
                let (service, method) = RpcMetrics::labels(i);
                family
                    .encode_family(&[("grpc_service", service), ("grpc_method", method)])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut family = e.encode_descriptor(
                "registry_rpc_requests",
                "Finished gRPC calls by final status code",
                None,
                c.metric_type(),
            )?;
            for (i, codes) in rpc.codes.iter().enumerate() {
                let (service, method) = RpcMetrics::labels(i);
                for (code, n) in codes.iter().enumerate() {
                    let n = n.load(Ordering::Relaxed);
                    // OK is always present so rate() has a starting point;
                    // other codes appear once they happen.
                    if n == 0 && (code != 0 || i == METHODS - 1) {
                        continue;
                    }
                    ConstCounter::new(n).encode(family.encode_family(&[
                        ("grpc_service", service),
                        ("grpc_method", method),
                        ("grpc_code", CODE_NAMES[code]),
                    ])?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_index_maps_known_paths_and_folds_the_rest() {
        let i = RpcMetrics::method_index("/registry.v1.Registry/Resolve");
        assert_eq!(RpcMetrics::labels(i), ("registry.v1.Registry", "Resolve"));
        let w = RpcMetrics::method_index("/grpc.health.v1.Health/Watch");
        assert_eq!(RpcMetrics::labels(w), ("grpc.health.v1.Health", "Watch"));
        for odd in [
            "/x.Y/Z",
            "",
            "/",
            "/registry.v1.Registry",
            "/registry.v1.Registry/Nope",
        ] {
            assert_eq!(
                RpcMetrics::labels(RpcMetrics::method_index(odd)),
                OTHER_METHOD,
                "{odd}"
            );
        }
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = AtomicHistogram::new();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.get();
        assert_eq!(count, 4);
        assert!((sum - 60.00315).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.0001, 2), "le is inclusive");
        assert_eq!(buckets[5], (0.005, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::MAX, 1));
    }

    #[tokio::test]
    async fn render_reads_counts_and_rpc_tables() {
        let r = crate::Registry::new(crate::Config::default());
        let m = r.metrics();
        inc(&m.registrations, 3);
        let resolve = RpcMetrics::method_index("/registry.v1.Registry/Resolve");
        m.rpc.observe_latency(resolve, Duration::from_millis(2));
        m.rpc.count_code(resolve, 5);
        m.rpc.count_code(resolve, 99);
        let text = render(r.metrics(), r.status());
        for line in [
            "registry_registrations_total 3",
            "registry_instances 0",
            "registry_heartbeats_total{result=\"not_found\"} 0",
            "registry_rpc_requests_total{grpc_service=\"registry.v1.Registry\",grpc_method=\"Resolve\",grpc_code=\"NOT_FOUND\"} 1",
            "registry_rpc_requests_total{grpc_service=\"registry.v1.Registry\",grpc_method=\"Resolve\",grpc_code=\"UNKNOWN\"} 1",
            "registry_rpc_duration_seconds_bucket{le=\"0.0025\",grpc_service=\"registry.v1.Registry\",grpc_method=\"Resolve\"} 1",
            "registry_rpc_duration_seconds_count{grpc_service=\"registry.v1.Registry\",grpc_method=\"Register\"} 0",
            "registry_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
