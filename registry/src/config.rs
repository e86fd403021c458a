//! Daemon configuration: TTL bounds, resource caps, watch history and
//! timing. Every field has a default suited to a single loopback daemon;
//! the `registry` binary maps each one to a flag.

use std::{path::PathBuf, time::Duration};

use crate::error::{Error, Result};

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

/// Default cap on live instances: ~1 KiB each with metadata and indexes,
/// so about a gigabyte at the cap; the same as the lease cap.
pub const DEFAULT_MAX_INSTANCES: usize = 1_000_000;
/// Default largest request: registry requests are small (an instance is at
/// most ~80 KiB of metadata), so 4 MiB (gRPC's usual default) is generous
/// and anything bigger is hostile.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 << 20;
/// Default connection cap: one per client process is the norm, so this is a
/// fleet of ten thousand; each costs a file descriptor (raise `ulimit -n`
/// above it) and tens of KiB of HTTP/2 state.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default HTTP/2 stream cap per connection: just above the default
/// per-connection watcher cap (10,000), so that cap, which answers
/// `RESOURCE_EXHAUSTED`, trips first (the stream cap makes clients queue
/// silently), with room left for unary calls beside a full set of watchers.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 10_240;
/// Default ping interval: a half-open connection (peer gone without a FIN)
/// is found within interval + timeout, about a minute and a half.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default time to answer a ping: generous for a loaded client across a
/// WAN, short enough that dead peers do not pile up.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default idle timeout: a backstop for peers that send nothing and are not
/// caught by pings (keepalive disabled); well above the 80 s a healthy
/// client can be silent between pings.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default handshake timeout: a real client sends its preface in the first
/// round trip; ten seconds covers a slow TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default per-call timeout: every registry call is in-memory work that
/// takes microseconds; only a peer trickling its request body takes longer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Smallest accepted `max_message_size`: a register request with a full
/// metadata map is ~80 KiB, so anything under 64 KiB would refuse valid
/// requests rather than hostile ones.
pub const MIN_MESSAGE_SIZE: usize = 64 << 10;

// --- HTTP API and DNS (issue 18) ---
/// TTL of DNS answers by default: short, so a deregistered instance leaves
/// resolvers' caches within seconds, as Consul's default of 0 s does, without
/// making every lookup reach the registry.
pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(5);

/// DNS domain served by default: `<service>.service.registry.`.
pub const DEFAULT_DNS_DOMAIN: &str = "registry.";
// --- end HTTP API and DNS ---

// --- health checks (issue 17) ---
/// Shortest check interval accepted by default: Consul's minimum. Faster
/// checks cost the instance more than they tell its callers.
pub const DEFAULT_MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Checks in flight at once by default. Each holds a socket and a small
/// task; at the default interval (10 s) and a typical few milliseconds per
/// check this is far above steady state, and it bounds what hanging targets
/// (each held until its timeout) can take: file descriptors, memory, and
/// the delay they add to everyone else's checks.
pub const DEFAULT_MAX_CHECKS_IN_FLIGHT: usize = 512;
/// How often an unchanged check result (time and output) is written to the
/// catalog by default: Consul's `check_update_interval`. State changes are
/// written at once; rewriting every result would turn every check into a
/// revision for every watcher.
pub const DEFAULT_CHECK_REFRESH: Duration = Duration::from_secs(300);
// --- end health checks ---

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
    /// Data directory (see `crate::persist`): every change is written there
    /// before it is acknowledged, and a restarted registry loads it before
    /// it serves, so it answers with the previous catalog and leases at once
    /// instead of waiting for services to re-register. `None`: memory only.
    pub data_dir: Option<PathBuf>,
    /// Run as a node of a cluster over etcd (`--store etcd`; see
    /// `crate::etcd`) instead of the in-memory store.
    pub etcd: Option<EtcdOptions>,
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
    /// Panic thresholds (see `crate::serving`): the default and per-service
    /// overrides.
    pub panic: crate::serving::PanicThresholds,
    /// Health checks asking for a shorter interval are refused.
    pub min_check_interval: Duration,
    /// Cap on health checks in flight at once (see `crate::health`).
    pub max_checks_in_flight: usize,
    /// An unchanged check result is written to the catalog at most this
    /// often (zero: only state changes are written).
    pub check_refresh: Duration,
    /// xDS clusters ramp a new endpoint's weight up over this window
    /// (Envoy's `slow_start_config`); zero: off.
    pub slow_start_window: Duration,
    /// OTLP/gRPC collector the RPC spans are exported to
    /// (`http://host:4317`; Jaeger, Tempo and the OpenTelemetry Collector
    /// all accept it). `None`: no export, no trace propagation. The binary
    /// hands it to `telemetry::init_logging`, which owns the global
    /// subscriber; a library user installs a subscriber of its own.
    pub otlp_endpoint: Option<String>,
}

impl Config {
    /// Checks the whole configuration for values that cannot work, in one
    /// place, so the binary, the server and in-process users refuse the
    /// same things with the same messages (each names the setting and the
    /// limit): zero caps, TTL bounds the wrong way round, an idle timeout
    /// that would cut healthy clients (those answer keepalive pings, so they
    /// are silent at most interval + timeout), storm settings out of range,
    /// a data directory with the etcd store.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.min_ttl.is_zero() || self.min_ttl > self.max_ttl {
            return bad(format!(
                "min_ttl ({}) must be above 0 and at most max_ttl ({})",
                humantime::format_duration(self.min_ttl),
                humantime::format_duration(self.max_ttl)
            ));
        }
        for (name, v) in [
            ("max_leases", self.max_leases),
            ("max_instances", self.max_instances),
            ("max_instances_per_service", self.max_instances_per_service),
            ("max_instances_per_lease", self.max_instances_per_lease),
            ("max_services", self.max_services),
            ("max_heartbeat_batch", self.max_heartbeat_batch),
            ("max_connections", self.max_connections),
            ("max_watchers", self.max_watchers),
            (
                "max_watchers_per_connection",
                self.max_watchers_per_connection,
            ),
            ("watch_buffer", self.watch_buffer),
            ("max_checks_in_flight", self.max_checks_in_flight),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.min_check_interval.is_zero() {
            return bad("min_check_interval must be above 0".into());
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams must be at least 1".into());
        }
        if self.max_message_size < MIN_MESSAGE_SIZE {
            return bad(format!(
                "max_message_size {} is below the minimum {MIN_MESSAGE_SIZE}",
                self.max_message_size
            ));
        }
        if !self.keepalive_interval.is_zero() && self.keepalive_timeout.is_zero() {
            return bad("keepalive_timeout must be above 0 when keepalive_interval is set".into());
        }
        let silent = self.keepalive_interval + self.keepalive_timeout;
        if !self.idle_timeout.is_zero()
            && !self.keepalive_interval.is_zero()
            && self.idle_timeout <= silent
        {
            return bad(format!(
                "idle_timeout {} must exceed keepalive_interval + keepalive_timeout ({}), or healthy idle clients are cut",
                humantime::format_duration(self.idle_timeout),
                humantime::format_duration(silent)
            ));
        }
        if !(self.storm_fraction > 0.0 && self.storm_fraction <= 1.0) {
            return bad(format!(
                "storm_fraction ({}) must be in (0, 1]",
                self.storm_fraction
            ));
        }
        if self.storm_rate == 0 {
            return bad("storm_rate must be at least 1 lease per second".into());
        }
        if self.etcd.is_some() && self.data_dir.is_some() {
            return bad(
                "data_dir is for the in-memory store; with the etcd store the catalog lives in etcd"
                    .into(),
            );
        }
        if let Some(etcd) = &self.etcd
            && etcd.endpoints.is_empty()
        {
            return bad("etcd endpoints are empty; give at least one http://host:port".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri = endpoint.parse::<http::Uri>().ok();
            let usable = uri.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            if !usable {
                return bad(format!(
                    "otlp_endpoint {endpoint:?} is not an OTLP/gRPC collector URL: expected http://host:port or https://host:port, e.g. http://127.0.0.1:4317"
                ));
            }
        }
        Ok(())
    }
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
            max_instances: DEFAULT_MAX_INSTANCES,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
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
            etcd: None,
            http_listen: None,
            dns_listen: None,
            dns_domain: DEFAULT_DNS_DOMAIN.to_string(),
            dns_ttl: DEFAULT_DNS_TTL,
            panic: crate::serving::PanicThresholds::default(),
            min_check_interval: DEFAULT_MIN_CHECK_INTERVAL,
            max_checks_in_flight: DEFAULT_MAX_CHECKS_IN_FLIGHT,
            check_refresh: DEFAULT_CHECK_REFRESH,
            slow_start_window: Duration::ZERO,
            otlp_endpoint: None,
        }
    }
}

/// Default TTL of a cluster node's own etcd lease: how long a dead node's
/// instances stay resolvable elsewhere. Its clients re-register on another
/// node as soon as their KeepAlive stream breaks, which replaces the keys,
/// so this only bounds how long instances of clients that died *with* the
/// node linger.
pub const DEFAULT_ETCD_LEASE_TTL: Duration = Duration::from_secs(10);

/// Where and how a cluster node reaches etcd (`--store etcd`).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the etcd members, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix under which this registry cluster keeps its keys; several
    /// registry clusters can share one etcd with different prefixes.
    pub prefix: String,
    /// TTL of the node's etcd lease (etcd rounds it up to its minimum, 2 s
    /// with default settings).
    pub lease_ttl: Duration,
    /// How long start-up waits for etcd before giving up.
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    /// Options for the given endpoints with the default prefix and TTLs.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/registry".into(),
            lease_ttl: DEFAULT_ETCD_LEASE_TTL,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Parses a comma-separated endpoint list (`--etcd-endpoints`).
    pub fn parse_endpoints(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("http://{s}")
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_must_exceed_keepalive() {
        let ok = Config::default();
        ok.validate().unwrap();
        let cut = Config {
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(80),
            ..Config::default()
        };
        let msg = cut.validate().unwrap_err().to_string();
        assert!(msg.contains("idle_timeout 1m 20s"), "{msg}");
        let no_keepalive = Config {
            keepalive_interval: Duration::ZERO,
            idle_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        no_keepalive.validate().unwrap();
        let zero = Config {
            max_connections: 0,
            ..Config::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn one_place_refuses_what_cannot_work() {
        let msg = |c: Config| c.validate().unwrap_err().to_string();
        let backwards = Config {
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(5),
            ..Config::default()
        };
        assert!(msg(backwards).contains("min_ttl (10s)"));
        assert!(
            msg(Config {
                storm_fraction: 1.5,
                ..Config::default()
            })
            .contains("storm_fraction (1.5)")
        );
        assert!(
            msg(Config {
                watch_buffer: 0,
                ..Config::default()
            })
            .contains("watch_buffer must be at least 1")
        );
        let both = Config {
            data_dir: Some("d".into()),
            etcd: Some(EtcdOptions::new(["http://127.0.0.1:2379"])),
            ..Config::default()
        };
        assert!(msg(both).contains("data_dir is for the in-memory store"));
        for bad in [
            "127.0.0.1:4317",
            "grpc://collector:4317",
            "http://",
            "not a url",
        ] {
            let m = msg(Config {
                otlp_endpoint: Some(bad.into()),
                ..Config::default()
            });
            assert!(
                m.contains("otlp_endpoint") && m.contains("http://host:port"),
                "{bad}: {m}"
            );
        }
        for good in ["http://127.0.0.1:4317", "https://tempo.example.com"] {
            Config {
                otlp_endpoint: Some(good.into()),
                ..Config::default()
            }
            .validate()
            .unwrap();
        }
    }
}
