//! The load generator keeps working: every workload of `registry-bench` runs
//! in `--smoke --duration 1s` mode against an in-process registry and must
//! produce figures (non-zero operations, latencies, no errors). The real
//! benchmarks are not part of CI; see BENCHMARKS.md.

mod common;

use std::time::Duration;

use common::TestServer;
use registry_bench::{Options, Workload, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_in_smoke_mode() {
    let server = TestServer::start().await;
    let mut options = Options::for_url(server.url.clone());
    options.smoke = true;
    options.duration = Duration::from_secs(1);
    options.workload = vec![Workload::All];
    // The registry runs in this process, so its RSS is ours.
    options.registry_pid = Some(std::process::id());

    let report = tokio::time::timeout(Duration::from_secs(60), run(options))
        .await
        .expect("smoke run finishes within a minute")
        .expect("smoke run succeeds");
    let printed = report.to_string();
    println!("{printed}");

    for name in [
        "ceiling (echo)",
        "register",
        "heartbeat",
        "resolve",
        "resolve held 2000",
        "watch 10",
        "watch 50",
        "expiry lateness",
        "memory 2000",
        "memory 5000",
    ] {
        let row = report
            .row(name)
            .unwrap_or_else(|| panic!("no row {name:?} in\n{printed}"));
        assert!(row.ops > 0, "{name}: no operations\n{printed}");
        assert_eq!(row.errors, 0, "{name}: errors\n{printed}");
        let latency = row
            .latency
            .unwrap_or_else(|| panic!("{name}: no latency\n{printed}"));
        assert!(latency.p50_us <= latency.p99_us && latency.p99_us <= latency.max_us);
        assert!(
            printed.contains(&format!("| {name} |")),
            "{name} missing from the table"
        );
    }
    for name in ["register", "resolve", "heartbeat"] {
        let row = report.row(name).unwrap();
        assert!(row.rate.unwrap() > 0.0, "{name}: zero rate");
        assert!(
            row.pct_of_ceiling.unwrap() > 0.0,
            "{name}: no share of the ceiling"
        );
    }
    assert_eq!(
        report.row("watch 50").unwrap().ops,
        50 * 20,
        "every watcher saw every change"
    );
    assert_eq!(
        report.row("expiry lateness").unwrap().ops,
        20,
        "every lease expired"
    );
    let memory = report.row("memory 5000").unwrap();
    assert!(
        memory.notes.iter().any(|n| n.ends_with("bytes/instance")),
        "memory row reads RSS: {:?}",
        memory.notes
    );
    server.stop().await;
}
