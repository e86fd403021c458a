//! Restart without an outage, with the real daemon: 20 ProdService
//! instances registered through registry-client and 5 callers calling
//! ProdService through balanced channels; the registry process is killed
//! with SIGKILL and restarted on the same port. No call may fail, all 20
//! instances must be back in Resolve within one TTL, and no instance may
//! appear twice, in Resolve or in any list a caller's resolver publishes.
//! Also exercises `--log-format json` and `--metrics-listen`. Then the same
//! crash with `--data-dir`: the restarted registry answers with all 20 at
//! once, and no service has to register again.

mod common;

use std::{
    collections::{BTreeSet, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{
    api::resolve_request,
    artifacts::registry_binary,
    binary::BinaryServer,
    ops::{metric, scrape},
    prod::ProdInstance,
};
use registry_api::{
    prod::{ProductRequest, prod_service_client::ProdServiceClient},
    v1::registry_client::RegistryClient as RawClient,
};
use registry_client::RegistryClient;
use tokio::time::Instant;

/// Lease TTL of the instances: heartbeats every TTL/3, so they are back
/// within one TTL of the restart.
const TTL: Duration = Duration::from_secs(2);
const INSTANCES: usize = 20;
const CALLERS: usize = 5;

/// The daemon with JSON logs and its operations endpoint; a warm-up of
/// one TTL, long enough for every instance to re-register after a restart.
async fn start(extra: &[&str]) -> BinaryServer {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0", "--log-format", "json"];
    args.extend([
        "--min-ttl",
        "100ms",
        "--warmup",
        "2s",
        "--shutdown-grace",
        "1s",
    ]);
    args.extend(extra);
    let daemon = BinaryServer::start(&args).await;
    assert_json_log(&daemon);
    daemon
}

/// `--log-format json` writes nothing but JSON lines.
fn assert_json_log(daemon: &BinaryServer) {
    for line in daemon.log_lines() {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&line) {
            panic!("--log-format json wrote a non-JSON line {line:?}: {e}");
        }
    }
}

/// The operations endpoint of this start.
fn ops(daemon: &BinaryServer) -> std::net::SocketAddr {
    daemon.ops.expect("--metrics-listen logged its address")
}

async fn resolve_ids(raw: &mut RawClient<tonic::transport::Channel>) -> Vec<String> {
    match raw.resolve(resolve_request("prod")).await {
        Ok(r) => r.into_inner().instances.into_iter().map(|i| i.id).collect(),
        Err(_) => Vec::new(),
    }
}

/// What the callers saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Resolver views (per caller) with a repeated id or address.
    duplicate_views: Mutex<Vec<Vec<String>>>,
    /// Smallest list any resolver published after it first had all 20.
    min_view: Mutex<usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_under_load_loses_no_call() {
    let mut daemon = start(&[]).await;
    let url = daemon.url.clone();

    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        instances.push(ProdInstance::start(&url, &format!("prod-{i:02}"), TTL).await);
    }
    let expected: BTreeSet<String> = instances.iter().map(|i| i.id.clone()).collect();

    let tally = Arc::new(Tally {
        min_view: Mutex::new(usize::MAX),
        ..Default::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let client = RegistryClient::connect(&url).await.unwrap();
        let resolver = client.resolver("prod");
        let mut views = resolver.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            views.wait_for(|s| s.instances.len() == INSTANCES),
        )
        .await
        .expect("resolver sees all instances")
        .unwrap();
        let channel = resolver.channel().build();
        // Every list the resolver publishes from now on.
        callers.push(tokio::spawn({
            let tally = tally.clone();
            async move {
                while views.changed().await.is_ok() {
                    let state = views.borrow_and_update().clone();
                    let ids: Vec<String> = state.instances.iter().map(|i| i.id.clone()).collect();
                    let addrs: HashSet<&str> =
                        state.instances.iter().map(|i| i.address.as_str()).collect();
                    let unique: HashSet<&String> = ids.iter().collect();
                    if unique.len() != ids.len() || addrs.len() != ids.len() {
                        tally.duplicate_views.lock().unwrap().push(ids.clone());
                    }
                    let mut min = tally.min_view.lock().unwrap();
                    *min = (*min).min(ids.len());
                }
                drop(client);
            }
        }));
        callers.push(tokio::spawn({
            let (tally, stop) = (tally.clone(), stop.clone());
            async move {
                let mut prod = ProdServiceClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let call = prod.get_product_stock(ProductRequest { prod_id: 233 });
                    match tokio::time::timeout(Duration::from_secs(2), call).await {
                        Ok(Ok(_)) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(status)) => tally.failures.lock().unwrap().push(status.to_string()),
                        Err(_) => tally.failures.lock().unwrap().push("timed out".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                drop(resolver);
            }
        }));
    }
    let metrics = scrape(ops(&daemon)).await;
    assert!(metrics.contains("registry_instances 20"), "{metrics}");

    // Steady load, then the crash.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = tally.ok.load(Ordering::Relaxed);
    daemon.kill9().await;
    // An outage long enough for every caller to notice.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restarted = Instant::now();
    daemon.start_again().await;
    assert_json_log(&daemon);
    let mut raw = daemon.client().await;
    let back = loop {
        let ids = resolve_ids(&mut raw).await;
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "duplicate instance in Resolve: {ids:?}"
        );
        if unique == expected {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < TTL + Duration::from_secs(3),
            "only {} of {INSTANCES} back after {:?}",
            unique.len(),
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "all {INSTANCES} instances back in Resolve {back:?} after the restart (process start included)"
    );
    // One more heartbeat round: still exactly the 20, no duplicates.
    tokio::time::sleep(TTL / 2).await;
    let ids = resolve_ids(&mut raw).await;
    assert_eq!(ids.len(), INSTANCES, "{ids:?}");
    let during = tally.ok.load(Ordering::Relaxed) - before_kill;

    stop.store(true, Ordering::Relaxed);
    for c in callers.iter_mut().skip(1).step_by(2) {
        tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .unwrap()
            .unwrap();
    }
    for c in callers.iter().step_by(2) {
        c.abort();
    }
    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed calls: {failures:?}",
        failures.len()
    );
    assert!(
        during > 100,
        "callers kept calling through the outage: {during} calls"
    );
    let duplicates = tally.duplicate_views.lock().unwrap().clone();
    assert!(
        duplicates.is_empty(),
        "resolver published duplicates: {duplicates:?}"
    );
    // Partial lists while services re-register are allowed (no call fails
    // on them); an empty one would be an outage.
    let min_view = *tally.min_view.lock().unwrap();
    println!("smallest list a resolver published: {min_view}");
    assert!(min_view > 0, "a resolver published an empty list");
    assert!(
        back <= TTL,
        "all instances must be back within one TTL ({TTL:?}); took {back:?}"
    );
    let metrics = scrape(ops(&daemon)).await;
    assert!(metrics.contains("registry_instances 20"), "{metrics}");
    let registrations =
        metric(&metrics, "registry_registrations_total").expect("registrations counter");
    assert!(registrations >= INSTANCES as f64, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_data_dir_serves_the_previous_catalog_at_once() {
    let dir = std::env::temp_dir().join(format!("registry-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap().to_owned();
    let args = ["--data-dir", &dir_arg];
    let mut daemon = start(&args).await;
    let url = daemon.url.clone();
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        instances.push(ProdInstance::start(&url, &format!("prod-{i:02}"), TTL).await);
    }
    let expected: BTreeSet<String> = instances.iter().map(|i| i.id.clone()).collect();
    // Every Register was acknowledged, so it is on disk: kill at once, no
    // waiting for anything to be written.
    daemon.kill9().await;
    let restarted = Instant::now();
    daemon.start_again().await;
    assert_json_log(&daemon);
    let mut raw = daemon.client().await;
    let ids = resolve_ids(&mut raw).await;
    println!(
        "with --data-dir: {} of {INSTANCES} instances in the first Resolve, {:?} after the restart (process start included)",
        ids.len(),
        restarted.elapsed()
    );
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the first answer after the restart is the whole catalog"
    );
    assert_eq!(ids.len(), INSTANCES, "{ids:?}");

    // Past one TTL: every instance renewed its restored lease (none
    // expired) and none had to register again.
    tokio::time::sleep(TTL + TTL / 2).await;
    let ids = resolve_ids(&mut raw).await;
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let scrape = scrape(ops(&daemon)).await;
    assert_eq!(
        metric(&scrape, "registry_restored_instances"),
        Some(INSTANCES as f64),
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "registry_lease_expirations_total"),
        Some(0.0),
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "registry_registrations_total"),
        Some(0.0),
        "{scrape}"
    );
    let renewed = metric(&scrape, "registry_heartbeats_total{result=\"renewed\"}");
    assert!(renewed.is_some_and(|n| n > 0.0), "{scrape}");
    drop(instances);
    let _ = std::fs::remove_dir_all(&dir);
}

/// registry-bench's restart workload (issue 9's measurement) keeps working:
/// both runs complete, and with `--data-dir` the first answer after the
/// crash already holds every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_workload_measures_both_modes() {
    use registry_bench::{Options, Workload, run};
    let mut options = Options::for_url("http://127.0.0.1:1");
    options.registry = None;
    options.spawn_registry = Some(registry_binary().await);
    options.smoke = true;
    options.duration = Duration::from_millis(300);
    options.workload = vec![Workload::Restart];
    let report = tokio::time::timeout(Duration::from_secs(60), run(options))
        .await
        .expect("restart workload finishes within a minute")
        .expect("restart workload succeeds");
    println!("{report}");
    let rows: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.name.starts_with("restart"))
        .collect();
    assert_eq!(rows.len(), 2, "{report}");
    for row in &rows {
        assert_eq!(row.errors, 0, "{report}");
        assert!(
            row.notes.iter().any(|n| n.starts_with("complete catalog")),
            "{report}"
        );
    }
    let total = rows[1].ops;
    assert!(rows[1].name.ends_with("--data-dir"), "{report}");
    assert!(
        rows[1]
            .notes
            .contains(&format!("{total} of {total} in the first answer")),
        "{report}"
    );
}
