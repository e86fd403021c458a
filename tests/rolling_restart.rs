//! A lossless rolling restart (issue 17): three `prod_service` processes
//! are restarted one after another (SIGTERM: mark draining, wait the grace,
//! deregister, stop; then start again) while five callers loop through
//! `balanced_channel` and a stock Python grpcio client loops through
//! `xds:///prod`. Not one call may fail.
//!
//! The Python part follows `tests/xds_python.rs`: skipped (with a message)
//! outside CI when no interpreter with grpcio is found.

#![cfg(unix)]

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{TestServer, wait_until};
use registry_api::prod::{ProductRequest, prod_service_client::ProdServiceClient};
use registry_client::{RegistryClient, balanced_channel};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
    time::timeout,
};

const IDS: [&str; 3] = ["roll-a", "roll-b", "roll-c"];

struct Service {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    addr: String,
}

impl Service {
    /// Starts `prod_service` as `id` and waits for it to be registered.
    async fn start(path: &Path, registry: &str, id: &str) -> Self {
        let mut child = Command::new(path)
            .args(["--registry", registry, "--id", id, "--ttl", "3s"])
            .args(["--drain-grace", "1s"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start prod_service");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = next_line(&mut lines).await;
        let addr = first
            .strip_prefix(&format!("prod_service id={id} addr="))
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        Self { child, lines, addr }
    }

    /// SIGTERM, then the graceful sequence: draining, deregistered, exit 0.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
        let draining = next_line(&mut self.lines).await;
        assert!(draining.ends_with(" draining"), "{draining}");
        let gone = next_line(&mut self.lines).await;
        assert!(gone.ends_with(" deregistered"), "{gone}");
        let exit = timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("prod_service exits after SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit:?}");
    }
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("prod_service printed nothing in time")
        .expect("read prod_service stdout")
        .expect("prod_service closed stdout")
}

/// What the callers saw: answers per instance id, failures with their
/// error.
#[derive(Default)]
struct Tally {
    ok: Mutex<HashMap<String, usize>>,
    failed: Mutex<Vec<String>>,
    total: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_no_call() {
    let prod_service = common::artifacts::example("prod_service").await;
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut services: Vec<Option<Service>> = Vec::new();
    for id in IDS {
        services.push(Some(Service::start(&prod_service, &server.url, id).await));
    }
    let client = RegistryClient::connect(&server.url).await.unwrap();
    wait_until(Duration::from_secs(10), "three instances", || async {
        client.resolve("prod").await.unwrap().instances.len() == 3
    })
    .await;

    // Five callers through balanced channels of their own.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut callers = Vec::new();
    for _ in 0..5 {
        let channel = balanced_channel(&client, "prod");
        let (stop, tally) = (stop.clone(), tally.clone());
        callers.push(tokio::spawn(async move {
            let mut grpc = ProdServiceClient::new(channel);
            while !stop.load(Ordering::SeqCst) {
                let call = grpc.get_product_stock(ProductRequest { prod_id: 233 });
                match timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(resp)) => {
                        let who = resp.into_inner().instance_id;
                        *tally.ok.lock().unwrap().entry(who).or_default() += 1;
                    }
                    Ok(Err(status)) => tally.failed.lock().unwrap().push(status.to_string()),
                    Err(_) => tally.failed.lock().unwrap().push("no answer in 2s".into()),
                }
                tally.total.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // The Python xDS client, if there is an interpreter.
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("rolling-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python_outcomes: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut python_child = None;
    let mut python_reader = None;
    if let Some(python) = common::python::python("rolling_restart (Python part)").await {
        let mut child =
            common::python::xds_client(&python, &dir, server.addr, "xds:///prod", 120).await;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let outcomes = python_outcomes.clone();
        python_reader = Some(tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                *outcomes.lock().unwrap().entry(line).or_default() += 1;
            }
        }));
        python_child = Some(child);
    }
    let python_reached = |id: &str| {
        python_child.is_none()
            || python_outcomes
                .lock()
                .unwrap()
                .get(&format!("ok {id}"))
                .is_some_and(|n| *n >= 2)
    };
    let callers_reached = |id: &str| tally.ok.lock().unwrap().get(id).is_some_and(|n| *n >= 2);

    // Everyone is calling all three before the rollout starts.
    wait_until(
        Duration::from_secs(30),
        "all callers reach all three",
        || {
            let done = IDS
                .iter()
                .all(|id| callers_reached(id) && python_reached(id));
            async move { done }
        },
    )
    .await;

    // The rollout: one instance at a time.
    for (k, id) in IDS.iter().enumerate() {
        let old = services[k].take().unwrap();
        let old_addr = old.addr.clone();
        old.stop().await;
        let new = Service::start(&prod_service, &server.url, id).await;
        assert_ne!(new.addr, old_addr, "restarted on a new port");
        let new_addr = new.addr.clone();
        services[k] = Some(new);
        wait_until(
            Duration::from_secs(10),
            "the new instance listed",
            || async {
                let r = client.resolve("prod").await.unwrap();
                r.instances.len() == 3 && r.instances.iter().any(|i| i.address == new_addr)
            },
        )
        .await;
        // Callers use the new one before the next goes down.
        let before = tally.ok.lock().unwrap().get(*id).copied().unwrap_or(0);
        let python_before = python_outcomes
            .lock()
            .unwrap()
            .get(&format!("ok {id}"))
            .copied()
            .unwrap_or(0);
        wait_until(
            Duration::from_secs(20),
            "calls reach the new instance",
            || {
                let now = tally.ok.lock().unwrap().get(*id).copied().unwrap_or(0);
                let python_now = python_outcomes
                    .lock()
                    .unwrap()
                    .get(&format!("ok {id}"))
                    .copied()
                    .unwrap_or(0);
                let done = now >= before + 5
                    && (python_child.is_none() || python_now >= python_before + 2);
                async move { done }
            },
        )
        .await;
    }

    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    if let Some(mut child) = python_child.take() {
        drop(child.stdin.take());
        let _ = timeout(Duration::from_secs(5), child.wait()).await;
    }
    if let Some(reader) = python_reader {
        let _ = timeout(Duration::from_secs(5), reader).await;
    }
    let failed = tally.failed.lock().unwrap().clone();
    let ok = tally.ok.lock().unwrap().clone();
    let python = python_outcomes.lock().unwrap().clone();
    eprintln!(
        "rolling restart: balanced callers {} calls {ok:?}, failed {}; python {python:?}",
        tally.total.load(Ordering::SeqCst),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "balanced_channel calls failed: {failed:?}"
    );
    let python_failed: Vec<_> = python.keys().filter(|k| !k.starts_with("ok ")).collect();
    assert!(
        python_failed.is_empty(),
        "Python xDS calls failed: {python:?}"
    );
    for s in services.into_iter().flatten() {
        s.stop().await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
