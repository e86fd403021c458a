//! The `registry` daemon: parses flags, sets up logging, binds the listener
//! and hands over to [`registry::server::run`].

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;

/// mimalloc instead of the system allocator: after a million instances the
/// glibc heap is fragmented enough to slow every request's small
/// allocations (resolve with 1M held ran 15% slower than with 10), and
/// mimalloc keeps per-instance memory lower too (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use registry::Config;
use registry::{Registry, telemetry::LogFormat};
use tokio_util::sync::CancellationToken;

/// Service registry and discovery daemon.
///
/// Services register under a name with a TTL lease and keep it alive with
/// heartbeats; callers resolve or watch names. Logging follows RUST_LOG
/// (default `info`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on. Loopback by default: expose it deliberately.
    #[arg(long, default_value = "127.0.0.1:7411", env = "REGISTRY_LISTEN")]
    listen: SocketAddr,
    /// Server certificate (PEM): serve TLS. Needs --tls-key.
    #[arg(long, requires = "tls_key", env = "REGISTRY_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// Server private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert", env = "REGISTRY_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) client certificates must chain to: require mTLS.
    #[arg(long, requires = "tls_cert", env = "REGISTRY_TLS_CLIENT_CA")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Auth file (TOML) mapping token hashes and certificate names to roles;
    /// reloaded on SIGHUP. Without it every caller may do everything.
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    auth_file: Option<std::path::PathBuf>,
    /// Requests per second per identity (token or certificate name; client
    /// IP without auth). 0 disables the limit.
    #[arg(long, default_value_t = Config::default().rate_limit)]
    rate_limit: u32,
    /// Burst allowed above --rate-limit (default: twice the rate).
    #[arg(long)]
    rate_burst: Option<u32>,
    /// Shortest lease TTL accepted (e.g. 500ms, 1s).
    #[arg(long, default_value_t = Config::default().min_ttl.into())]
    min_ttl: humantime::Duration,
    /// Longest lease TTL accepted (e.g. 30s, 1h).
    #[arg(long, default_value_t = Config::default().max_ttl.into())]
    max_ttl: humantime::Duration,
    /// Cap on live leases.
    #[arg(long, default_value_t = Config::default().max_leases)]
    max_leases: usize,
    /// Cap on instances in one service.
    #[arg(long, default_value_t = Config::default().max_instances_per_service)]
    max_instances_per_service: usize,
    /// Cap on instances attached to one lease.
    #[arg(long, default_value_t = Config::default().max_instances_per_lease)]
    max_instances_per_lease: usize,
    /// Cap on known services.
    #[arg(long, default_value_t = Config::default().max_services)]
    max_services: usize,
    /// Cap on live instances across all services.
    #[arg(long, default_value_t = Config::default().max_instances)]
    max_instances: usize,
    /// Largest request message decoded, in bytes; larger is RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Config::default().max_message_size)]
    max_message_size: usize,
    /// Cap on open client connections; a new one beyond it is closed at once.
    /// Keep `ulimit -n` above it.
    #[arg(long, default_value_t = Config::default().max_connections)]
    max_connections: usize,
    /// HTTP/2 streams (calls, watches) in flight per connection.
    #[arg(long, default_value_t = Config::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// HTTP/2 ping interval on quiet connections (0s: no pings).
    #[arg(long, default_value_t = Config::default().keepalive_interval.into())]
    keepalive_interval: humantime::Duration,
    /// Close a connection whose ping is unanswered this long.
    #[arg(long, default_value_t = Config::default().keepalive_timeout.into())]
    keepalive_timeout: humantime::Duration,
    /// Close a connection that sends nothing for this long (0s: never); must
    /// exceed keepalive interval + timeout.
    #[arg(long, default_value_t = Config::default().idle_timeout.into())]
    idle_timeout: humantime::Duration,
    /// Close a new connection that has not sent its HTTP/2 preface within
    /// this time (0s: no limit).
    #[arg(long, default_value_t = Config::default().handshake_timeout.into())]
    handshake_timeout: humantime::Duration,
    /// Longest time a call may take to produce its response; open streams
    /// are not limited (0s: no limit).
    #[arg(long, default_value_t = Config::default().request_timeout.into())]
    request_timeout: humantime::Duration,
    /// Lease ids accepted in one Heartbeat or KeepAlive message.
    #[arg(long, default_value_t = Config::default().max_heartbeat_batch)]
    max_heartbeat_batch: usize,
    /// Watch history kept for resuming, in events.
    #[arg(long, default_value_t = Config::default().history_events)]
    history_events: usize,
    /// Watch history kept for resuming, in age.
    #[arg(long, default_value_t = Config::default().history_age.into())]
    history_age: humantime::Duration,
    /// Cap on live watchers.
    #[arg(long, default_value_t = Config::default().max_watchers)]
    max_watchers: usize,
    /// Cap on live watchers per client connection.
    #[arg(long, default_value_t = Config::default().max_watchers_per_connection)]
    max_watchers_per_connection: usize,
    /// Revisions buffered per watcher before it gets a reset snapshot instead.
    #[arg(long, default_value_t = Config::default().watch_buffer)]
    watch_buffer: usize,
    /// Progress message interval on idle watch streams.
    #[arg(long, default_value_t = Config::default().watch_progress_interval.into())]
    watch_progress_interval: humantime::Duration,
    /// Window after start in which answers say "warming up": services are
    /// still re-registering, so clients keep their last known good lists.
    #[arg(long, default_value_t = Config::default().warmup.into())]
    warmup: humantime::Duration,
    /// How long shutdown waits for in-flight calls.
    #[arg(long, default_value_t = Config::default().shutdown_grace.into())]
    shutdown_grace: humantime::Duration,
    /// Do not serve xDS (the Aggregated Discovery Service gRPC clients and
    /// Envoy use to discover services) on the gRPC port.
    #[arg(long, env = "REGISTRY_NO_XDS")]
    no_xds: bool,
    /// Serve Prometheus metrics (/metrics) and health probes (/healthz,
    /// /readyz) over HTTP on this address, e.g. 127.0.0.1:7413. Off unless
    /// given: exposing it is a deliberate choice, like --listen.
    #[arg(long, env = "REGISTRY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: `text`, or `json` (one object per line) for log
    /// shippers.
    #[arg(long, value_enum, default_value = "text", env = "REGISTRY_LOG_FORMAT")]
    log_format: LogFormat,
    /// If the expiry task was not scheduled for longer than this (the process
    /// was paused or starved), every lease is extended by the stall first.
    #[arg(long, default_value_t = Config::default().stall_threshold.into())]
    stall_threshold: humantime::Duration,
    /// Expiry storm: more than this fraction of all leases expiring within
    /// one second; they are then expired gradually (1 disables the guard).
    #[arg(long, default_value_t = Config::default().storm_fraction)]
    storm_fraction: f64,
    /// The storm guard applies only with at least this many leases.
    #[arg(long, default_value_t = Config::default().storm_min_leases)]
    storm_min_leases: usize,
    /// Leases expired per second during a storm (at least 1).
    #[arg(long, default_value_t = Config::default().storm_rate)]
    storm_rate: u32,
    /// Where the catalog lives: `memory` (this process alone, the default)
    /// or `etcd` (one node of a cluster: several registries over one etcd
    /// cluster, each serving reads from memory; see --etcd-endpoints).
    #[arg(long, value_enum, default_value = "memory", env = "REGISTRY_STORE")]
    store: StoreKind,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        env = "REGISTRY_ETCD_ENDPOINTS"
    )]
    etcd_endpoints: String,
    /// Key prefix of this registry cluster in etcd (with --store etcd).
    #[arg(long, default_value = "/registry", env = "REGISTRY_ETCD_PREFIX")]
    etcd_prefix: String,
    /// TTL of this node's own etcd lease: how long the instances registered
    /// through it outlive the node if it dies (with --store etcd).
    #[arg(long, default_value_t = registry::config::DEFAULT_ETCD_LEASE_TTL.into())]
    etcd_lease_ttl: humantime::Duration,
    /// Keep the catalog and leases in this directory (created if missing):
    /// every change is written there before it is acknowledged, and a
    /// restarted registry (even after a crash) loads it before it serves,
    /// leases renewed for one TTL, instead of waiting for services to
    /// re-register. In-memory store only.
    #[arg(long, env = "REGISTRY_DATA_DIR")]
    data_dir: Option<std::path::PathBuf>,
    // --- HTTP API and DNS (issue 18) ---
    /// Serve the HTTP/JSON API, the Server-Sent Events watch, Prometheus
    /// service discovery (/v1/prometheus/sd) and the web dashboard (/) on
    /// this address; `off` disables it. Loopback by default, like --listen.
    #[arg(long, default_value = "127.0.0.1:7412", value_parser = parse_listen, env = "REGISTRY_HTTP_LISTEN")]
    http_listen: Listen,
    /// Answer DNS queries (UDP and TCP) for `<service>.service.<domain>` on
    /// this address, e.g. 127.0.0.1:8600. Off unless given.
    #[arg(long, value_parser = parse_listen, env = "REGISTRY_DNS_LISTEN")]
    dns_listen: Option<Listen>,
    /// Domain of the DNS interface.
    #[arg(long, default_value = registry::config::DEFAULT_DNS_DOMAIN, env = "REGISTRY_DNS_DOMAIN")]
    dns_domain: String,
    /// TTL of DNS answers.
    #[arg(long, default_value_t = Config::default().dns_ttl.into())]
    dns_ttl: humantime::Duration,
    // --- end HTTP API and DNS ---
    // --- health checks, panic mode, slow start (issue 17) ---
    /// Panic threshold, in percent of a service's active instances: below
    /// this share serving, every active instance is served, critical ones
    /// included (0 never panics).
    #[arg(long, default_value_t = registry::serving::DEFAULT_PANIC_THRESHOLD, value_parser = parse_percent)]
    panic_threshold: f64,
    /// Panic threshold of one service, `SERVICE=PERCENT` (repeatable).
    #[arg(long, value_parser = parse_service_threshold)]
    service_panic_threshold: Vec<(String, f64)>,
    /// Shortest health check interval accepted.
    #[arg(long, default_value_t = Config::default().min_check_interval.into())]
    min_check_interval: humantime::Duration,
    /// Cap on health checks in flight at once; further due checks wait.
    #[arg(long, default_value_t = Config::default().max_checks_in_flight)]
    max_checks_in_flight: usize,
    /// Write an unchanged check result (its time and output) at most this
    /// often; state changes are written at once (0s: only those).
    #[arg(long, default_value_t = Config::default().check_refresh.into())]
    check_refresh: humantime::Duration,
    /// xDS clusters ramp a new endpoint's weight up over this window
    /// (Envoy's slow_start_config); 0s: off.
    #[arg(long, default_value_t = Config::default().slow_start_window.into())]
    slow_start_window: humantime::Duration,
    // --- end health checks ---
    /// Export a span per RPC over OTLP/gRPC to this collector (Jaeger,
    /// Tempo, an OpenTelemetry Collector), e.g. http://127.0.0.1:4317; calls
    /// carrying a W3C `traceparent` join the caller's trace. Default: the
    /// standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
    /// OTEL_EXPORTER_OTLP_ENDPOINT; off if none is set (or
    /// OTEL_SDK_DISABLED=true). The service name is OTEL_SERVICE_NAME
    /// (default `registry`).
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

/// `SERVICE=PERCENT`.
fn parse_service_threshold(s: &str) -> Result<(String, f64), String> {
    let (service, pct) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SERVICE=PERCENT, e.g. prod=30"))?;
    registry::validate::service_name("service", service).map_err(|e| e.to_string())?;
    Ok((service.to_owned(), parse_percent(pct)?))
}

/// A percentage, 0..=100 (a trailing `%` is allowed).
fn parse_percent(s: &str) -> Result<f64, String> {
    let pct: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (0..=100)"))?;
    if !(0.0..=100.0).contains(&pct) {
        return Err(format!("{pct} is not a percentage (0..=100)"));
    }
    Ok(pct)
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy)]
struct Listen(Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{e}: expected host:port (e.g. 127.0.0.1:7412) or `off`"))
}

/// Where the catalog lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// In this process only.
    Memory,
    /// In etcd, shared by every registry node on the same prefix.
    Etcd,
}

impl Args {
    fn config(&self) -> Config {
        Config {
            min_ttl: self.min_ttl.into(),
            max_ttl: self.max_ttl.into(),
            max_leases: self.max_leases,
            max_instances_per_service: self.max_instances_per_service,
            max_instances_per_lease: self.max_instances_per_lease,
            max_services: self.max_services,
            max_instances: self.max_instances,
            max_message_size: self.max_message_size,
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval: self.keepalive_interval.into(),
            keepalive_timeout: self.keepalive_timeout.into(),
            idle_timeout: self.idle_timeout.into(),
            handshake_timeout: self.handshake_timeout.into(),
            request_timeout: self.request_timeout.into(),
            max_heartbeat_batch: self.max_heartbeat_batch,
            history_events: self.history_events,
            history_age: self.history_age.into(),
            max_watchers: self.max_watchers,
            max_watchers_per_connection: self.max_watchers_per_connection,
            watch_buffer: self.watch_buffer,
            watch_progress_interval: self.watch_progress_interval.into(),
            warmup: self.warmup.into(),
            shutdown_grace: self.shutdown_grace.into(),
            xds: !self.no_xds,
            stall_threshold: self.stall_threshold.into(),
            storm_fraction: self.storm_fraction,
            storm_min_leases: self.storm_min_leases,
            storm_rate: self.storm_rate,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(registry::config::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            tls_client_ca: self.tls_client_ca.clone(),
            auth_file: self.auth_file.clone(),
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst.unwrap_or(self.rate_limit.saturating_mul(2)),
            data_dir: self.data_dir.clone(),
            etcd: (self.store == StoreKind::Etcd).then(|| {
                let mut options = registry::config::EtcdOptions::new(
                    registry::config::EtcdOptions::parse_endpoints(&self.etcd_endpoints),
                );
                options.prefix = self.etcd_prefix.clone();
                options.lease_ttl = self.etcd_lease_ttl.into();
                options
            }),
            http_listen: self.http_listen.0,
            dns_listen: self.dns_listen.and_then(|l| l.0),
            dns_domain: self.dns_domain.clone(),
            dns_ttl: self.dns_ttl.into(),
            panic: self.service_panic_threshold.iter().fold(
                registry::serving::PanicThresholds::new(self.panic_threshold),
                |t, (service, pct)| t.with_service(service.clone(), *pct),
            ),
            min_check_interval: self.min_check_interval.into(),
            max_checks_in_flight: self.max_checks_in_flight,
            check_refresh: self.check_refresh.into(),
            slow_start_window: self.slow_start_window.into(),
            otlp_endpoint: otlp_endpoint(self.otlp_endpoint.as_deref(), |name| {
                std::env::var(name).ok()
            }),
        }
    }
}

/// The OTLP endpoint: the flag, else the OpenTelemetry variables in their
/// precedence order (an empty variable counts as unset, as the
/// specification says); none when `OTEL_SDK_DISABLED=true` and no flag.
fn otlp_endpoint(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(flag) = flag {
        return Some(flag.to_owned());
    }
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = args.config();
    if let Err(e) = config.validate() {
        eprintln!("registry: {e}");
        return ExitCode::from(2);
    }
    let telemetry =
        match registry::telemetry::init_logging(args.log_format, config.otlp_endpoint.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("registry: {e}");
                return ExitCode::from(2);
            }
        };
    let code = run(&args, config).await;
    // After the server has drained: the last calls' spans are queued.
    telemetry.shutdown().await;
    code
}

/// Opens the registry, binds, serves until SIGINT/SIGTERM.
async fn run(args: &Args, config: Config) -> ExitCode {
    let registry = match Registry::open(config).await {
        Ok(r) => r,
        Err(e) => {
            let what = match args.store {
                StoreKind::Memory => "--data-dir",
                StoreKind::Etcd => "--store etcd",
            };
            eprintln!("registry: {what}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Bound after the registry is loaded: a client never waits on a port
    // whose catalog is still being restored.
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("registry: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let stop_ops = CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        let ops_listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("registry: cannot listen on {addr} (--metrics-listen): {e}");
                return ExitCode::FAILURE;
            }
        };
        let (registry, stop) = (registry.clone(), stop_ops.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = registry::ops::serve(ops_listener, registry, stop).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    let result = registry::server::serve(listener, registry, shutdown_signal()).await;
    stop_ops.cancel();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::otlp_endpoint;

    #[test]
    fn trace_export_is_off_unless_an_endpoint_is_named() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(otlp_endpoint(None, env(&[])), None);
        assert_eq!(
            otlp_endpoint(None, env(&[("OTEL_SERVICE_NAME", "r")])),
            None
        );
        assert_eq!(
            otlp_endpoint(None, env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            None
        );
        let both = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://all:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]);
        assert_eq!(
            otlp_endpoint(None, both).as_deref(),
            Some("http://traces:4317")
        );
        assert_eq!(
            otlp_endpoint(Some("http://flag:4317"), both).as_deref(),
            Some("http://flag:4317")
        );
        let disabled = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://all:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]);
        assert_eq!(otlp_endpoint(None, disabled), None);
        assert_eq!(
            otlp_endpoint(Some("http://flag:4317"), disabled).as_deref(),
            Some("http://flag:4317")
        );
    }
}
