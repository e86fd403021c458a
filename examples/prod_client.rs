//! Calls ProdService by name: resolves `prod` through the registry and
//! calls `GetProductStock(233)` over a load-balanced channel, printing which
//! instance answered.
//!
//! ```text
//! cargo run --example prod_client -- --loop
//! ```
//!
//! With `--loop` it keeps calling (every `--interval-ms`) until Ctrl-C, so
//! you can stop an instance and watch the calls move to the others.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://127.0.0.1:4317`),
//! each call is a trace exported over OTLP: a `prod_client` span, the
//! balanced channel's client span naming the instance that answered, and
//! under it ProdService's server span; the first call also asks the
//! registry for `prod` (a Resolve that joins the trace), so one trace shows
//! caller, registry and service.

use std::time::Duration;

use clap::Parser;
use registry_api::prod::{ProductRequest, prod_service_client::ProdServiceClient};
use registry_client::{RegistryClient, trace::OtlpExport};
use tracing::Instrument;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Parser)]
#[command(about = "Calls ProdService.GetProductStock through the registry")]
struct Args {
    /// Registry address(es), comma-separated.
    #[arg(long, env = "REGISTRY_ADDR", default_value = "http://127.0.0.1:7411")]
    registry: String,
    /// Product to ask about.
    #[arg(long, default_value_t = 233)]
    prod_id: i32,
    /// Keep calling until interrupted (or until --count calls).
    #[arg(long = "loop")]
    keep_going: bool,
    /// Pause between calls with --loop.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Stop after this many calls with --loop (0 = never).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Deadline of one call. A call to a service the registry does not know
    /// (or that has no live instance) fails at once instead, naming it.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Logs on stderr; spans to a collector too when OTEL_EXPORTER_OTLP_ENDPOINT
    // names one (the log filter does not apply to them).
    let export = OtlpExport::from_env("prod_client")?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into())),
        )
        .with(export.as_ref().map(|e| e.layer()))
        .init();

    let client = RegistryClient::connect(&args.registry).await?;
    let channel = registry_client::balanced_channel(&client, "prod");
    let mut prod = ProdServiceClient::new(channel);
    let timeout = Duration::from_millis(args.timeout_ms);

    let mut calls = 0u64;
    let mut failures = 0u64;
    // Ctrl-C / SIGTERM ends the loop between two calls.
    let stop = registry_client::shutdown_signal();
    tokio::pin!(stop);
    loop {
        calls += 1;
        let mut request = tonic::Request::new(ProductRequest {
            prod_id: args.prod_id,
        });
        request.set_timeout(timeout);
        // The root span of this call's trace.
        let span = tracing::info_span!("prod_client", prod_id = args.prod_id);
        if calls == 1 && export.is_some() {
            // The registry's view of `prod` in the first trace.
            let resolve = std::future::IntoFuture::into_future(client.resolve("prod"));
            match resolve.instrument(span.clone()).await {
                Ok(r) => tracing::info!(parent: &span, instances = r.instances.len(),
                    revision = r.revision, "the registry resolves prod"),
                Err(e) => tracing::warn!(parent: &span, error = %e, "resolving prod failed"),
            }
        }
        let call = tokio::time::timeout(timeout, prod.get_product_stock(request));
        match call.instrument(span).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                println!(
                    "prod_id={} prod_stock={} instance={}",
                    args.prod_id, resp.prod_stock, resp.instance_id
                );
            }
            Ok(Err(status)) => {
                failures += 1;
                println!("error: {} {}", status.code(), status.message());
            }
            Err(_) => {
                failures += 1;
                println!("error: no answer within {timeout:?} (is any `prod` registered?)");
            }
        }
        if !args.keep_going {
            break;
        }
        if args.count != 0 && calls >= args.count {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(args.interval_ms)) => {}
            () = &mut stop => break,
        }
    }
    if let Some(export) = export {
        export.shutdown().await;
    }
    if !args.keep_going && failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
