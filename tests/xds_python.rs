//! Interop: a stock gRPC implementation that is not ours (Python's grpcio,
//! from PyPI) discovers ProdService through the registry's xDS server alone.
//!
//! The interpreter, the stubs and the bootstrap come from `common::python`
//! (under CI a missing interpreter fails the test; elsewhere it is skipped).

mod common;

use std::{collections::HashMap, path::Path, sync::atomic::Ordering, time::Duration};

use common::{TestServer, prod::ProdInstance, python};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, ChildStdout},
    time::Instant,
};

const TTL: Duration = Duration::from_secs(5);
/// The bound: after an instance deregisters, the Python client must
/// stop reaching it within this.
const STOP_WITHIN: Duration = Duration::from_secs(1);

/// The Python client's output, line by line, with a deadline per line.
struct Calls {
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Calls {
    /// The next call outcome, or `None` if none came by `deadline`.
    async fn next_by(&mut self, deadline: Instant) -> Option<String> {
        match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Some(line),
            Ok(Ok(None)) => panic!("python client exited early"),
            Ok(Err(e)) => panic!("reading python client output: {e}"),
            Err(_) => None,
        }
    }
}

async fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut err)).await;
    }
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_client_balances_and_drops_a_deregistered_instance() {
    let Some(python) = python::python("xds_python").await else {
        return;
    };
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("xds-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut instances = Vec::new();
    for id in ["prod-a", "prod-b", "prod-c"] {
        instances.push(ProdInstance::start(&server.url, id, TTL).await);
    }
    let mut child = python::xds_client(&python, &dir, server.addr, "xds:///prod", 30).await;
    let mut calls = Calls {
        lines: BufReader::new(child.stdout.take().unwrap()).lines(),
    };

    // Phase 1: the client resolves xds:///prod and spreads calls over all
    // three instances.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut warmup_lines = Vec::new();
    while ["prod-a", "prod-b", "prod-c"]
        .iter()
        .any(|id| seen.get(*id).copied().unwrap_or(0) < 2)
    {
        let Some(line) = calls.next_by(deadline).await else {
            let err = stderr_of(&mut child).await;
            panic!(
                "python client did not reach all three instances within 20s; seen {seen:?}; \
                 last lines {:?}; stderr:\n{err}",
                warmup_lines.iter().rev().take(5).collect::<Vec<_>>()
            );
        };
        if let Some(id) = line.strip_prefix("ok ") {
            *seen.entry(id.to_owned()).or_default() += 1;
        }
        warmup_lines.push(line);
    }
    let mut spread: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..60 {
        let line = calls.next_by(deadline).await.expect("calls keep flowing");
        let id = line
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("failed call: {line}"));
        *spread.entry(id.to_owned()).or_default() += 1;
    }
    for id in ["prod-a", "prod-b", "prod-c"] {
        let n = spread.get(id).copied().unwrap_or(0);
        assert!(
            n >= 10,
            "round robin over 3 should give each ~20 of 60: {spread:?}"
        );
    }

    // Phase 2: prod-b deregisters (and keeps serving, so only the registry
    // can tell the client to stop).
    let b_calls = instances[1].calls.clone();
    instances[1].deregister().await;
    let deregistered = Instant::now();
    tokio::time::sleep_until(deregistered + STOP_WITHIN).await;
    let b_at_bound = b_calls.load(Ordering::SeqCst);
    // Drain what was printed meanwhile and watch a little longer.
    let mut after: HashMap<String, usize> = HashMap::new();
    let watch_until = Instant::now() + Duration::from_millis(700);
    while let Some(line) = calls.next_by(watch_until).await {
        if let Some(id) = line.strip_prefix("ok ") {
            *after.entry(id.to_owned()).or_default() += 1;
        } else {
            *after.entry(line).or_default() += 1;
        }
    }
    let b_later = b_calls.load(Ordering::SeqCst);
    assert_eq!(
        b_at_bound, b_later,
        "prod-b still received calls more than {STOP_WITHIN:?} after deregistering"
    );
    // The client kept working on the others: the tail of its output is all
    // prod-a / prod-c, with no failed calls.
    let mut tail: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tail.len() < 30 {
        tail.push(calls.next_by(deadline).await.expect("calls keep flowing"));
    }
    assert!(
        tail.iter().all(|l| l == "ok prod-a" || l == "ok prod-c"),
        "after removal only prod-a and prod-c answer: {tail:?}"
    );
    assert!(tail.iter().any(|l| l == "ok prod-a") && tail.iter().any(|l| l == "ok prod-c"));
    assert!(
        after.keys().all(|k| !k.starts_with("err")),
        "calls failed during the removal: {after:?}"
    );

    eprintln!(
        "xds_python: spread over 60 calls {spread:?}; prod-b got {b_later} calls in total, \
         none after {STOP_WITHIN:?}; outcomes around the removal {after:?}"
    );
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    drop(instances);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
