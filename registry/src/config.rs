//! Daemon configuration: TTL bounds, resource caps, watch history and
//! timing. Every field has a default suited to a single loopback daemon;
//! the `registry` binary maps each one to a flag.

use std::{path::PathBuf, time::Duration};

use crate::limits;

/// Shortest lease TTL granted by default: below a second, heartbeat traffic
/// dominates and a single GC pause in a client expires it.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease TTL by default: a dead instance may stay resolvable this
/// long, so an hour is the most a caller should ever tolerate.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// Default stall threshold: well above any scheduling hiccup of a healthy
/// process (the expiry task wakes at least every 250 ms), well below the
/// shortest sensible TTL's heartbeat slack.
pub const DEFAULT_STALL_THRESHOLD: Duration = Duration::from_secs(2);

/// Requests per second per identity by default: far above what a
/// well-behaved service needs (a keepalive stream is one request), low enough
/// that one runaway client cannot take a core from everybody else.
pub const DEFAULT_RATE_LIMIT: u32 = 10_000;

/// Events of history kept for watch resumption by default. Each holds a
/// decoded instance (~600 bytes), so this bounds history memory at ~6 MB; at
/// a thousand changes a second it is ten seconds of reconnect window, and a
/// watcher that misses more gets a reset snapshot, never a gap.
pub const DEFAULT_HISTORY_EVENTS: usize = 10_000;

/// Snapshot interval by default: what a crash can lose is at most this much
/// of registration churn, and those services re-register within one
/// heartbeat anyway; writing a 100k-instance catalog takes ~20 ms, so once
/// every few seconds costs nothing measurable.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);

// --- HTTP API and DNS (issue 18) ---
/// TTL of DNS answers by default: short, so a deregistered instance leaves
/// resolvers' caches within seconds, as Consul's default of 0 s does, without
/// making every lookup reach the registry.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);

/// DNS domain served by default: `<service>.service.registry.`.
pub const DEFAULT_DNS_DOMAIN: &str = "registry.";
// --- end HTTP API and DNS ---

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
    /// Cap on live instances across all services.
    pub max_instances: usize,
    /// Largest request message decoded, in bytes; larger ones are refused
    /// with `RESOURCE_EXHAUSTED` before they are buffered.
    pub max_message_size: usize,
    /// Cap on open client connections; beyond it a new connection is closed
    /// on accept.
    pub max_connections: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls in flight on one
    /// connection (each open watch or keepalive stream is one).
    pub max_concurrent_streams: u32,
    /// HTTP/2 ping interval on a quiet connection (zero: no pings).
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection (half-open peers).
    pub keepalive_timeout: Duration,
    /// A connection that sends nothing at all for this long is closed (zero:
    /// never). Must exceed keepalive interval + timeout, since healthy
    /// clients answer pings.
    pub idle_timeout: Duration,
    /// A new connection must send its first bytes (the HTTP/2 preface) within
    /// this time (zero: no limit).
    pub handshake_timeout: Duration,
    /// Longest time a call may take to produce its response; streams, once
    /// open, are not limited (zero: no limit).
    pub request_timeout: Duration,
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
    /// Serve xDS (ADS) on the gRPC port, so gRPC clients in any language and
    /// Envoy can discover services (see `xds`). On by default: it costs
    /// nothing until a client subscribes, and reads are subject to auth.
    pub xds: bool,
    /// The expiry task not being scheduled for longer than this means the
    /// daemon was stalled (SIGSTOP, VM freeze, CPU starvation): every lease
    /// is extended by the stall before anything expires.
    pub stall_threshold: Duration,
    /// Expiry storm: more than this fraction of all leases expiring within
    /// one second. Expiry is then throttled to `storm_rate`.
    pub storm_fraction: f64,
    /// The storm guard applies only with at least this many leases: in a
    /// small registry, half the leases expiring together is normal.
    pub storm_min_leases: usize,
    /// Leases expired per second while a storm is throttled (at least 1, so
    /// expiry is never frozen).
    pub storm_rate: u32,
    /// Server certificate and key (PEM files): serve TLS instead of
    /// plaintext.
    pub tls: Option<TlsFiles>,
    /// CA (PEM) that client certificates must chain to: requires mTLS.
    pub tls_client_ca: Option<PathBuf>,
    /// Auth file (TOML): tokens and certificate names mapped to roles. Off
    /// when `None`: every caller may do everything.
    pub auth_file: Option<PathBuf>,
    /// Requests per second allowed per identity (token or certificate name;
    /// client IP when auth is off); 0 disables the limit.
    pub rate_limit: u32,
    /// Burst allowance on top of `rate_limit`.
    pub rate_burst: u32,
    /// Directory of the catalog snapshot (see `crate::persist`): written
    /// every `snapshot_interval` and at shutdown, loaded at start, so a
    /// restarted registry answers with the previous catalog at once instead
    /// of waiting for services to re-register. `None`: memory only.
    pub data_dir: Option<PathBuf>,
    /// How often the snapshot is rewritten (only when the catalog or the
    /// lease set changed since the last one).
    pub snapshot_interval: Duration,
    // --- HTTP API and DNS (issue 18) ---
    /// Address of the HTTP/JSON API, Server-Sent Events watch, Prometheus
    /// service discovery and dashboard (see `crate::http`). `None`: off.
    /// The binary defaults it to `127.0.0.1:7412`; the library keeps it off
    /// so embedding a registry never binds a port nobody asked for.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Address (UDP and TCP) of the DNS interface (see `crate::dns`).
    /// `None`: off.
    pub dns_listen: Option<std::net::SocketAddr>,
    /// Domain the DNS interface answers for (`<service>.service.<domain>`).
    pub dns_domain: String,
    /// TTL of DNS answers.
    pub dns_ttl: Duration,
    // --- end HTTP API and DNS ---
}

/// Certificate and private key of the server, PEM encoded.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            max_leases: 1_000_000,
            max_instances_per_service: 100_000,
            max_instances_per_lease: 10_000,
            max_instances: limits::DEFAULT_MAX_INSTANCES,
            max_message_size: limits::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: limits::DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: limits::DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: limits::DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: limits::DEFAULT_IDLE_TIMEOUT,
            handshake_timeout: limits::DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: limits::DEFAULT_REQUEST_TIMEOUT,
            max_services: 100_000,
            max_heartbeat_batch: 10_000,
            history_events: DEFAULT_HISTORY_EVENTS,
            history_age: Duration::from_secs(300),
            max_watchers: 100_000,
            max_watchers_per_connection: 10_000,
            watch_buffer: 256,
            watch_progress_interval: Duration::from_secs(10),
            warmup: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            xds: true,
            stall_threshold: DEFAULT_STALL_THRESHOLD,
            storm_fraction: 0.5,
            storm_min_leases: 100,
            storm_rate: 100,
            tls: None,
            tls_client_ca: None,
            auth_file: None,
            rate_limit: DEFAULT_RATE_LIMIT,
            rate_burst: DEFAULT_RATE_LIMIT * 2,
            data_dir: None,
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            http_listen: None,
            dns_listen: None,
            dns_domain: DEFAULT_DNS_DOMAIN.to_string(),
            dns_ttl: DEFAULT_DNS_TTL,
        }
    }
}
