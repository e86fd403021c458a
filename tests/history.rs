//! History checker (etcd robustness tests at our scale): seeded random
//! clients register, replace, attach, deregister by id and by lease,
//! heartbeat, let short leases expire, Resolve, ListServices, Status and
//! Watch with resume against an in-process registry; every request and
//! answer is recorded and checked against a model replayed from a recorder
//! watcher (see `tests/common/history`). On failure it prints the seed and
//! the first divergent answer.
//!
//! `cargo test --test history` runs 4 s with a random seed. Longer:
//!
//! ```sh
//! cargo test --release --test history -- --seconds 600 --seed 42
//! ```
//!
//! Flags: `--seconds N` (run length; the run is split into segments of at
//! most `--segment N` seconds, 5 by default, each with fresh clients and
//! recorder on the same server, checked as it ends), `--seed N`, `--clients
//! N`, `--watchers N`. Unknown flags (libtest's) are ignored.

mod common;

use std::{process::ExitCode, time::Duration};

use common::{
    TestServer,
    history::{
        checker::{LeaseBook, check},
        workload::{self, Config},
    },
};

#[derive(Debug)]
struct Args {
    seconds: f64,
    segment: f64,
    seed: u64,
    clients: usize,
    watchers: usize,
}

fn parse() -> Option<Args> {
    let mut args = Args {
        seconds: 4.0,
        segment: 5.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1),
        clients: 4,
        watchers: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> String {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--seconds" => args.seconds = value("--seconds").parse().expect("--seconds N"),
            "--segment" => args.segment = value("--segment").parse().expect("--segment N"),
            "--seed" => args.seed = value("--seed").parse().expect("--seed N"),
            "--clients" => args.clients = value("--clients").parse().expect("--clients N"),
            "--watchers" => args.watchers = value("--watchers").parse().expect("--watchers N"),
            // libtest flags: list the one test, skip when only ignored
            // tests are asked for.
            "--list" => {
                println!("history: test");
                return None;
            }
            "--ignored" => return None,
            _ => {}
        }
    }
    Some(args)
}

fn main() -> ExitCode {
    let Some(args) = parse() else {
        return ExitCode::SUCCESS;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    println!(
        "history: seed {} for {} s ({} clients, {} watchers); rerun with: cargo test --test history -- --seed {} --seconds {}",
        args.seed, args.seconds, args.clients, args.watchers, args.seed, args.seconds
    );
    let server = TestServer::start().await;
    let mut status_client = server.client().await;
    let mut book = LeaseBook::default();
    let segments = (args.seconds / args.segment).ceil().max(1.0) as usize;
    let per_segment = Duration::from_secs_f64(args.seconds / segments as f64);
    for segment in 0..segments {
        let mut cfg = Config::new(args.seed.wrapping_add(segment as u64));
        cfg.clients = args.clients;
        cfg.watchers = args.watchers;
        let running = workload::start(&server.url, &cfg).await;
        tokio::time::sleep(per_segment).await;
        let history = running.finish(Some(&mut status_client)).await;
        let report = check(&history, &mut book);
        if !report.violations.is_empty() {
            println!(
                "history: segment {segment} FAILED\n{}",
                report.render(cfg.seed, segment, 15)
            );
            println!(
                "rerun with: cargo test --test history -- --seed {} --seconds {}",
                args.seed, args.seconds
            );
            server.stop().await;
            return ExitCode::FAILURE;
        }
        println!(
            "history: segment {segment} (seed {}) ok: {:?}",
            cfg.seed, report.stats
        );
        for n in &report.timeline.notes {
            println!("note: {n}");
        }
    }
    server.stop().await;
    ExitCode::SUCCESS
}
