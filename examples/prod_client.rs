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

use std::time::Duration;

use clap::Parser;
use registry_api::prod::{ProductRequest, prod_service_client::ProdServiceClient};
use registry_client::RegistryClient;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

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
        match tokio::time::timeout(timeout, prod.get_product_stock(request)).await {
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
    if !args.keep_going && failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
