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
        Answer, Call, History,
        checker::{LeaseBook, check},
        workload::{self, Config},
    },
};
use registry_api::v1::watch_response::Kind;

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
        let mut value =
            |name: &str| -> String { it.next().unwrap_or_else(|| panic!("{name} needs a value")) };
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
        if segment == 0 {
            checker_catches_corruption(&history);
        }
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

/// Corrupts one answer of a history; returns what the report must name.
type Corrupt = fn(&mut History) -> Option<String>;

/// The checker has teeth: a passing history with one answer corrupted must
/// fail, naming that answer. Panics (failing the test) otherwise.
fn checker_catches_corruption(history: &History) {
    let mutations: [(&str, Corrupt); 4] = [
        ("a Resolve answer missing one instance", |h| {
            let op = h
                .ops
                .iter_mut()
                .find(|o| matches!(&o.outcome, Ok(Answer::Resolve(r)) if r.instances.len() >= 2))?;
            let Ok(Answer::Resolve(r)) = &mut op.outcome else {
                unreachable!()
            };
            r.instances.pop();
            Some(format!("op #{}", op.seq))
        }),
        ("a ListServices count off by one", |h| {
            let op = h.ops.iter_mut().find(
                |o| matches!(&o.outcome, Ok(Answer::ListServices(r)) if !r.services.is_empty()),
            )?;
            let Ok(Answer::ListServices(r)) = &mut op.outcome else {
                unreachable!()
            };
            r.services[0].instance_count += 1;
            Some(format!("op #{}", op.seq))
        }),
        ("a watcher missing one event", |h| {
            let w = h.watches.iter_mut().find(|w| {
                w.sessions.iter().any(|s| {
                    s.messages
                        .iter()
                        .any(|m| matches!(&m.kind, Some(Kind::Events(_))))
                })
            })?;
            let name = w.name.clone();
            let m = w
                .sessions
                .iter_mut()
                .flat_map(|s| s.messages.iter_mut())
                .find(|m| matches!(&m.kind, Some(Kind::Events(_))))?;
            let Some(Kind::Events(b)) = &mut m.kind else {
                unreachable!()
            };
            b.events.pop();
            Some(name)
        }),
        ("one lease id granted twice", |h| {
            let mut grants = h.ops.iter_mut().filter(|o| {
                matches!(
                    (&o.call, &o.outcome),
                    (Call::Register { lease_id: 0, .. }, Ok(_))
                )
            });
            let Ok(Answer::Register(first)) = &grants.next()?.outcome else {
                unreachable!()
            };
            let id = first.lease_id;
            let Ok(Answer::Register(second)) = &mut grants.next()?.outcome else {
                unreachable!()
            };
            second.lease_id = id;
            Some(format!("lease id {id} granted twice"))
        }),
    ];
    for (what, mutate) in mutations {
        let mut h = history.clone();
        let Some(needle) = mutate(&mut h) else {
            panic!("checker self-test: the run had nothing to corrupt for {what}");
        };
        let report = check(&h, &mut LeaseBook::default());
        assert!(
            report.violations.iter().any(|v| v.what.contains(&needle)),
            "checker self-test: {what} ({needle}) went unnoticed; it reported:\n{}",
            report.render(h.seed, h.life, 5)
        );
    }
    println!("history: the checker catches each of 4 corruptions of this run's history");
}
