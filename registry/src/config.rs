//! Daemon configuration: TTL bounds, resource caps, watch history and
//! timing. Every field has a default suited to a single loopback daemon;
//! the `registry` binary maps each one to a flag.

use std::time::Duration;

/// Shortest lease TTL granted by default: below a second, heartbeat traffic
/// dominates and a single GC pause in a client expires it.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease TTL by default: a dead instance may stay resolvable this
/// long, so an hour is the most a caller should ever tolerate.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// Tunables of one registry daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// Leases shorter than this are refused with `INVALID_ARGUMENT`.
    pub min_ttl: Duration,
    /// Leases longer than this are refused with `OUT_OF_RANGE`.
    pub max_ttl: Duration,
    /// Cap on live leases; beyond it Register is `RESOURCE_EXHAUSTED`.
    pub max_leases: usize,
    /// Cap on instances in one service.
    pub max_instances_per_service: usize,
    /// Cap on instances attached to one lease.
    pub max_instances_per_lease: usize,
    /// Cap on known services (empty services are forgotten first).
    pub max_services: usize,
    /// Lease ids accepted in one Heartbeat / KeepAlive message.
    pub max_heartbeat_batch: usize,
    /// Watch history kept for resumption, in events.
    pub history_events: usize,
    /// Watch history kept for resumption, in age.
    pub history_age: Duration,
    /// Cap on live watchers across all connections.
    pub max_watchers: usize,
    /// Cap on live watchers opened over one connection.
    pub max_watchers_per_connection: usize,
    /// Revision batches buffered per watcher before it is declared slow and
    /// later sent a reset snapshot instead.
    pub watch_buffer: usize,
    /// Default interval of Progress messages on idle watch streams.
    pub watch_progress_interval: Duration,
    /// After a start, the window during which an empty catalog is not proof
    /// that nothing is alive: clients are still re-registering.
    pub warmup: Duration,
    /// How long shutdown waits for in-flight calls before giving up.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            max_leases: 1_000_000,
            max_instances_per_service: 100_000,
            max_instances_per_lease: 10_000,
            max_services: 100_000,
            max_heartbeat_batch: 10_000,
            history_events: 100_000,
            history_age: Duration::from_secs(300),
            max_watchers: 100_000,
            max_watchers_per_connection: 10_000,
            watch_buffer: 256,
            watch_progress_interval: Duration::from_secs(10),
            warmup: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}
