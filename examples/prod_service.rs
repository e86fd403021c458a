//! ProdService instance that registers itself in the registry as `prod`.
//!
//! ```text
//! cargo run --example prod_service -- --port 50051 --registry http://127.0.0.1:7411
//! ```
//!
//! Serves `GetProductStock` on the given (or a free) port, registers
//! `prod` with its address and a `version` label, keeps the registration
//! alive in the background, and on Ctrl-C / SIGTERM marks itself draining,
//! waits `--drain-grace` (2 s) for callers to move off, deregisters and
//! only then stops serving (`registry_client::Shutdown`), so no call is
//! lost during a rolling restart.
//!
//! It also serves `grpc.health.v1.Health`, which answers NOT_SERVING while
//! the file given with `--unhealthy-file` exists (`touch` it to make the
//! instance fail its health check, `rm` it to recover). With
//! `--check-interval 2s` it registers with a gRPC health check the
//! registry runs against that endpoint, so a failing instance leaves
//! callers' balancers within a few intervals.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://127.0.0.1:4317`),
//! each call it serves is a server span exported over OTLP, the child of
//! the caller's span (`registry_client::trace::ServerLayer`).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use registry_api::prod::{
    ProductRequest, ProductResponse,
    prod_service_server::{ProdService, ProdServiceServer},
};
use registry_client::{
    HealthCheck, Instance, RegistryClient, Shutdown, shutdown_signal,
    trace::{OtlpExport, ServerLayer},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Parser)]
#[command(about = "ProdService example: registers itself in the registry as `prod`")]
struct Args {
    /// Port to serve on (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Interface to bind; also the host registered (use a routable one
    /// outside loopback demos).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Registry address(es), comma-separated.
    #[arg(long, env = "REGISTRY_ADDR", default_value = "http://127.0.0.1:7411")]
    registry: String,
    /// Instance id (default: hostname-pid-random).
    #[arg(long)]
    id: Option<String>,
    /// Value of the `version` metadata label.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// Lease TTL, e.g. `5s` or `500ms`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    ttl: Duration,
    /// Register with a gRPC health check the registry runs this often
    /// against our grpc.health.v1 endpoint (e.g. `2s`); no check without.
    #[arg(long, value_parser = parse_duration)]
    check_interval: Option<Duration>,
    /// Failed checks in a row before the registry stops sending callers.
    #[arg(long)]
    failures_before_critical: Option<u32>,
    /// Passing checks in a row before callers are sent again.
    #[arg(long)]
    successes_before_passing: Option<u32>,
    /// Our health endpoint answers NOT_SERVING while this file exists.
    #[arg(long)]
    unhealthy_file: Option<std::path::PathBuf>,
    /// On SIGTERM, how long to stay up marked draining before
    /// deregistering, so callers move off first.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    drain_grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

#[derive(Debug)]
struct Stock {
    instance_id: String,
}

#[tonic::async_trait]
impl ProdService for Stock {
    async fn get_product_stock(
        &self,
        request: tonic::Request<ProductRequest>,
    ) -> Result<tonic::Response<ProductResponse>, tonic::Status> {
        let prod_id = request.into_inner().prod_id;
        if prod_id <= 0 {
            return Err(tonic::Status::invalid_argument(format!(
                "prod_id must be positive, got {prod_id}"
            )));
        }
        // A stand-in for a stock lookup: deterministic per product.
        let prod_stock = prod_id.wrapping_mul(7) % 1000;
        Ok(tonic::Response::new(ProductResponse {
            prod_stock,
            instance_id: self.instance_id.clone(),
        }))
    }
}

/// grpc.health.v1 for the whole server and for `prod.v1.ProdService`:
/// SERVING unless the unhealthy file exists. Read at every check, so the
/// registry's checks see a change at once.
#[derive(Debug)]
struct FileHealth {
    unhealthy_file: Option<std::path::PathBuf>,
}

impl FileHealth {
    fn status(&self) -> ServingStatus {
        match &self.unhealthy_file {
            Some(path) if path.exists() => ServingStatus::NotServing,
            _ => ServingStatus::Serving,
        }
    }
}

#[tonic::async_trait]
impl Health for FileHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = request.into_inner().service;
        if !(service.is_empty() || service == "prod.v1.ProdService") {
            return Err(tonic::Status::not_found(format!(
                "unknown service {service:?}"
            )));
        }
        Ok(tonic::Response::new(HealthCheckResponse {
            status: self.status() as i32,
        }))
    }

    type WatchStream = tokio_stream::Once<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "Watch is not served; poll Check",
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Logs on stderr; spans to a collector too when OTEL_EXPORTER_OTLP_ENDPOINT
    // names one (the log filter does not apply to them).
    let export = OtlpExport::from_env("prod_service")?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())),
        )
        .with(export.as_ref().map(|e| e.layer()))
        .init();

    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr: SocketAddr = listener.local_addr()?;
    let mut instance =
        Instance::new("prod", addr.to_string()).with_metadata("version", &args.version);
    if let Some(id) = args.id {
        instance = instance.with_id(id);
    }
    if let Some(interval) = args.check_interval {
        let mut check = HealthCheck::grpc("prod.v1.ProdService").interval(interval);
        if let Some(n) = args.failures_before_critical {
            check = check.failures_before_critical(n);
        }
        if let Some(n) = args.successes_before_passing {
            check = check.successes_before_passing(n);
        }
        instance = instance.with_check(check);
    }
    let instance_id = instance.id.clone();

    // Leave the registry first, then stop serving: callers move off while
    // we are draining, before our port closes (registry_client::Shutdown).
    let shutdown = Shutdown::new().grace(args.drain_grace);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            // A server span per call, in the caller's trace (inert unless
            // spans are exported).
            .layer(ServerLayer::new())
            .add_service(HealthServer::new(FileHealth {
                unhealthy_file: args.unhealthy_file.clone(),
            }))
            .add_service(ProdServiceServer::new(Stock {
                instance_id: instance_id.clone(),
            }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.serving_stopped(),
            ),
    );

    // Serving before registering: nobody is sent here before we can answer.
    let client = RegistryClient::connect(&args.registry).await?;
    let registration = client.register(instance).ttl(args.ttl).await?;
    // Machine-readable line for scripts and tests.
    println!("prod_service id={instance_id} addr={addr}");

    let mut state = registration.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            tracing::info!(state = ?*state.borrow_and_update(), "registration state");
        }
    });

    // Ctrl-C / SIGTERM: drain, wait, deregister, then stop serving.
    let signal = async {
        shutdown_signal().await;
        println!("prod_service id={instance_id} draining");
    };
    for outcome in shutdown.run(signal, [registration]).await {
        match outcome {
            Ok(_) => println!("prod_service id={instance_id} deregistered"),
            Err(e) => eprintln!("deregister failed ({e}); the lease will expire"),
        }
    }
    server.await??;
    if let Some(export) = export {
        export.shutdown().await;
    }
    Ok(())
}
