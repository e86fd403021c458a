//! `registry-bench`: the load generator of issue 7. Parses flags, sets up
//! logging and hands over to [`registry_bench::run`]; prints the table of
//! figures on stdout (progress goes to stderr).

use std::process::ExitCode;

use clap::Parser;
use registry_bench::{Options, run};
use tracing_subscriber::EnvFilter;

/// Load generator for the registry: drives it over real gRPC on loopback
/// and reports ops/s and p50/p99/max latency per workload, each also as a
/// share of a no-op echo ceiling measured in the same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    options: Options,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(args.options).await {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("registry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
