//! Health checks one core sustains (BENCHMARKS.md, issue 17): the
//! registry's own probe (`registry::health::probe`, the code the checker
//! runs for every check, timeout and bounded reads included) against live
//! loopback targets, on a current-thread runtime (one core), with 64
//! checks in flight, for each kind:
//!
//! - tcp: connect, close;
//! - http: connect, `GET /health`, read the status and a body snippet;
//! - grpc: connect (HTTP/2 handshake), grpc.health.v1 `Check`, close;
//!
//! The targets run on a second runtime (one worker), so on a 2-core
//! machine the checker has one core and the targets the other; each kind
//! listens on 64 ports (see [`PORTS`]).
//!
//! `cargo bench -p registry --bench health` (release build).
//! `HEALTH_SECONDS` sets each run (default 5), `HEALTH_IN_FLIGHT` the
//! checks in flight (default 64).

use std::{
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use registry::health::{Target, probe};
use registry_api::v1::{
    GrpcCheck, HealthCheck, HealthState, HttpCheck, TcpCheck, health_check::Kind,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinSet,
};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How many ports each kind of target listens on. The checker closes a
/// TCP or gRPC check's connection first, which leaves the connection's
/// 4-tuple in TIME_WAIT on the checker's side for a minute: against one
/// port that caps a loopback benchmark at ~470 connections per second
/// (28k ephemeral ports / 60 s). A real checker reaches many instances,
/// each checked every few seconds, so the targets are spread the same way.
const PORTS: usize = 64;

/// The targets: TCP acceptors, HTTP health endpoints, gRPC health
/// services; returns their addresses.
async fn targets() -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut tcps, mut https, mut grpcs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PORTS {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tcps.push(tcp.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                drop(s);
            }
        });
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        https.push(http.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = http.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        grpcs.push(grpc.local_addr().unwrap().to_string());
        let (_reporter, service) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
        );
    }
    (tcps, https, grpcs)
}

fn targets_of(kind: Kind, addresses: &[String]) -> Vec<Arc<Target>> {
    addresses
        .iter()
        .map(|a| Arc::new(target(kind.clone(), a)))
        .collect()
}

fn target(kind: Kind, address: &str) -> Target {
    Target {
        address: address.to_owned(),
        check: HealthCheck {
            kind: Some(kind),
            interval_ms: 1_000,
            timeout_ms: 1_000,
            failures_before_critical: 3,
            successes_before_passing: 1,
            initial_state: None,
        },
    }
}

fn main() {
    let seconds = Duration::from_secs(env("HEALTH_SECONDS", 5));
    let in_flight = env("HEALTH_IN_FLIGHT", 64) as usize;
    let target_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tcp, http, grpc) = target_rt.block_on(targets());
    let checker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kinds = [
        ("tcp", targets_of(Kind::Tcp(TcpCheck::default()), &tcp)),
        (
            "http",
            targets_of(
                Kind::Http(HttpCheck {
                    path: "/health".into(),
                    address: String::new(),
                }),
                &http,
            ),
        ),
        (
            "grpc",
            targets_of(
                Kind::Grpc(GrpcCheck {
                    service: String::new(),
                    address: String::new(),
                }),
                &grpc,
            ),
        ),
    ];
    println!(
        "health checks, one current-thread runtime, {in_flight} in flight, {}s per kind",
        seconds.as_secs()
    );
    for (name, targets) in kinds {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let latency_us = Arc::new(AtomicU64::new(0));
        let elapsed = checker.block_on(async {
            // Warm-up, not counted.
            for target in &targets {
                probe(target).await;
            }
            let start = Instant::now();
            let end = start + seconds;
            let mut tasks = JoinSet::new();
            for k in 0..in_flight {
                let (target, done, failed, latency_us) = (
                    targets[k % targets.len()].clone(),
                    done.clone(),
                    failed.clone(),
                    latency_us.clone(),
                );
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let t = Instant::now();
                        let outcome = probe(&target).await;
                        latency_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                        if outcome.state != HealthState::Passing {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            start.elapsed()
        });
        let n = done.load(Ordering::Relaxed);
        println!(
            "{name:>5}: {:>8.0} checks/s  (mean {:.2} ms per check with {in_flight} in flight, {} failed of {n})",
            n as f64 / elapsed.as_secs_f64(),
            latency_us.load(Ordering::Relaxed) as f64 / n.max(1) as f64 / 1000.0,
            failed.load(Ordering::Relaxed),
        );
    }
    target_rt.shutdown_background();
}
