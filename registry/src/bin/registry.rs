//! The `registry` daemon: parses flags, sets up logging, binds the listener
//! and hands over to [`registry::server::run`].

use std::{io::IsTerminal, net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use registry::Config;
use tracing_subscriber::EnvFilter;

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
    /// Shortest lease TTL accepted (e.g. 500ms, 1s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_ttl: Duration,
    /// Longest lease TTL accepted (e.g. 30s, 1h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
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
    /// Lease ids accepted in one Heartbeat or KeepAlive message.
    #[arg(long, default_value_t = Config::default().max_heartbeat_batch)]
    max_heartbeat_batch: usize,
    /// Watch history kept for resuming, in events.
    #[arg(long, default_value_t = Config::default().history_events)]
    history_events: usize,
    /// Watch history kept for resuming, in age.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    history_age: Duration,
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
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    watch_progress_interval: Duration,
    /// Window after start in which answers say "warming up": services are
    /// still re-registering, so clients keep their last known good lists.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// How long shutdown waits for in-flight calls.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

impl Args {
    fn config(&self) -> Config {
        Config {
            min_ttl: self.min_ttl,
            max_ttl: self.max_ttl,
            max_leases: self.max_leases,
            max_instances_per_service: self.max_instances_per_service,
            max_instances_per_lease: self.max_instances_per_lease,
            max_services: self.max_services,
            max_heartbeat_batch: self.max_heartbeat_batch,
            history_events: self.history_events,
            history_age: self.history_age,
            max_watchers: self.max_watchers,
            max_watchers_per_connection: self.max_watchers_per_connection,
            watch_buffer: self.watch_buffer,
            watch_progress_interval: self.watch_progress_interval,
            warmup: self.warmup,
            shutdown_grace: self.shutdown_grace,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if args.min_ttl.is_zero() || args.min_ttl > args.max_ttl {
        eprintln!(
            "registry: --min-ttl ({}) must be above 0 and at most --max-ttl ({})",
            humantime::format_duration(args.min_ttl),
            humantime::format_duration(args.max_ttl)
        );
        return ExitCode::from(2);
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("registry: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    match registry::server::run(listener, args.config(), shutdown_signal()).await {
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
