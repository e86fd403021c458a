//! Health checks run by the registry, end to end (issue 17): a real
//! registry on 127.0.0.1:0 probes real endpoints with short intervals.
//!
//! - a `prod_service` whose grpc.health.v1 endpoint starts failing leaves
//!   Resolve and Watch within `interval x failures_before_critical + one
//!   interval`, and comes back only after `successes_before_passing`
//!   passes;
//! - a check alternating pass/fail under both thresholds never flaps;
//! - panic threshold: with 3 of 4 instances critical, Resolve answers all
//!   4 and says it panicked;
//! - hostile targets (a port that never answers, a slowloris HTTP server,
//!   an endless body, a redirect loop) cost bounded memory, and a healthy
//!   instance's checks keep their schedule meanwhile.

#![cfg(unix)]

mod common;

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{TestServer, wait_until};
use futures::StreamExt;
use registry::Config;
use registry_client::{
    DeleteReason, HealthCheck, HealthState, Instance, Registration, RegistryClient, WatchEvent,
    WatchOptions,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    time::{Instant, timeout},
};

/// Test registry: no warm-up hold, checks down to 50 ms.
fn config() -> Config {
    Config {
        min_check_interval: Duration::from_millis(50),
        ..TestServer::no_warmup_config()
    }
}

/// Ids of the instances a default (serving-only) Resolve answers.
async fn served(client: &RegistryClient, service: &str) -> (Vec<String>, bool) {
    let r = client.resolve(service).await.expect("resolve");
    let mut ids: Vec<String> = r.instances.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    (ids, r.panicked)
}

/// The health the registry holds for `service/id` (served or not).
async fn health_of(client: &RegistryClient, service: &str, id: &str) -> Option<HealthState> {
    let r = client
        .resolve(service)
        .include_not_serving()
        .await
        .expect("resolve all");
    r.instances.iter().find(|i| i.id == id).map(|i| i.health)
}

/// A running `prod_service` example process.
struct ProdProcess {
    child: Child,
}

impl ProdProcess {
    fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

/// The next event of `watch` within `limit`, or `None`.
async fn next_event(
    watch: &mut (impl futures::Stream<Item = Result<WatchEvent, registry_client::Error>> + Unpin),
    limit: Duration,
) -> Option<WatchEvent> {
    match timeout(limit, watch.next()).await {
        Ok(Some(Ok(ev))) => Some(ev),
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_leaves_within_bound_and_returns_after_successes() {
    const INTERVAL: Duration = Duration::from_millis(400);
    const FAILURES: u32 = 3;
    const SUCCESSES: u32 = 2;
    let prod_service = common::artifacts::example("prod_service").await;
    // One instance: the default panic threshold would keep serving it
    // when it fails (a service is never emptied by its checks); this test
    // is about the check, so panic mode is off.
    let server = TestServer::start_with(Config {
        panic: registry::serving::PanicThresholds::new(0.0),
        ..config()
    })
    .await;
    let unhealthy: PathBuf =
        std::env::temp_dir().join(format!("registry-health-{}-unhealthy", std::process::id()));
    let _ = std::fs::remove_file(&unhealthy);
    let mut child = Command::new(&prod_service)
        .args(["--registry", &server.url, "--id", "hc-a", "--ttl", "5s"])
        .args(["--check-interval", &format!("{}ms", INTERVAL.as_millis())])
        .args(["--failures-before-critical", &FAILURES.to_string()])
        .args(["--successes-before-passing", &SUCCESSES.to_string()])
        .arg("--unhealthy-file")
        .arg(&unhealthy)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start prod_service");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("prod_service started in time")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("prod_service id=hc-a addr="), "{first}");
    let proc = ProdProcess { child };

    let client = RegistryClient::connect(&server.url).await.unwrap();
    // A checked instance starts critical and is served once its first
    // checks pass.
    wait_until(Duration::from_secs(10), "hc-a served", || async {
        served(&client, "prod").await == (vec!["hc-a".to_owned()], false)
    })
    .await;
    let all = client.resolve("prod").include_not_serving().await.unwrap();
    let inst = &all.instances[0];
    assert_eq!(inst.health, HealthState::Passing);
    let check = inst.check.as_ref().expect("the check is on the instance");
    assert_eq!(check.interval, Some(INTERVAL));
    assert!(
        inst.last_check
            .as_ref()
            .is_some_and(|c| c.output.contains("SERVING")),
        "{:?}",
        inst.last_check
    );

    let mut watch = client.watch("prod", WatchOptions::default());
    let Some(WatchEvent::Snapshot(snap)) = next_event(&mut watch, Duration::from_secs(5)).await
    else {
        panic!("watch starts with a snapshot");
    };
    assert_eq!(snap.instances.len(), 1);

    // The health endpoint starts failing.
    std::fs::write(&unhealthy, b"").unwrap();
    let failed_at = Instant::now();
    let bound = INTERVAL * FAILURES + INTERVAL;
    let removed = loop {
        match next_event(&mut watch, bound + Duration::from_secs(2)).await {
            Some(WatchEvent::Delete {
                instance, reason, ..
            }) => {
                assert_eq!(instance.id, "hc-a");
                assert_eq!(reason, DeleteReason::NotServing);
                break failed_at.elapsed();
            }
            Some(WatchEvent::Progress { .. }) => continue,
            other => panic!("expected the NotServing delete, got {other:?}"),
        }
    };
    assert!(
        removed <= bound,
        "removed after {removed:?}, bound interval x failures + interval = {bound:?}"
    );
    // Not before the failures were counted: at least failures-1 intervals
    // (less jitter) between the first failing check and the last.
    assert!(
        removed >= INTERVAL.mul_f64(0.9) * (FAILURES - 1),
        "removed after only {removed:?}: flap damping ignored"
    );
    assert_eq!(served(&client, "prod").await.0, Vec::<String>::new());
    let all = client.resolve("prod").include_not_serving().await.unwrap();
    assert_eq!(all.instances[0].health, HealthState::Critical);
    assert!(
        all.instances[0]
            .last_check
            .as_ref()
            .is_some_and(|c| c.output.contains("NOT_SERVING")),
        "{:?}",
        all.instances[0].last_check
    );

    // It recovers: served again after SUCCESSES passes in a row.
    std::fs::remove_file(&unhealthy).unwrap();
    let healed_at = Instant::now();
    let back = loop {
        match next_event(&mut watch, bound + Duration::from_secs(2)).await {
            Some(WatchEvent::Put { instance, .. }) => {
                assert_eq!(instance.id, "hc-a");
                assert_eq!(instance.health, HealthState::Passing);
                break healed_at.elapsed();
            }
            Some(WatchEvent::Progress { .. }) => continue,
            other => panic!("expected hc-a back, got {other:?}"),
        }
    };
    let up_bound = INTERVAL * SUCCESSES + INTERVAL;
    assert!(back <= up_bound, "back after {back:?} > {up_bound:?}");
    assert!(
        back >= INTERVAL.mul_f64(0.9) * (SUCCESSES - 1),
        "back after only {back:?}: one pass was enough"
    );
    assert_eq!(served(&client, "prod").await.0, ["hc-a"]);
    eprintln!("removed after {removed:?} (bound {bound:?}), back after {back:?}");

    proc.terminate();
    let mut child = proc.child;
    timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("prod_service exits after SIGTERM")
        .unwrap();
    server.stop().await;
}

/// An HTTP server answering 200 and 500 in turn (one request per
/// connection), counting requests.
async fn alternating_http() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let k = n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                read_head(&mut s).await;
                let status = if k.is_multiple_of(2) {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (addr, count)
}

/// Reads an HTTP request head (up to the blank line, at most 16 KiB).
async fn read_head(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 << 10 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_check_under_the_thresholds_does_not_flap() {
    let server = TestServer::start_with(config()).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let (up_addr, up_count) = alternating_http().await;
    let (down_addr, down_count) = alternating_http().await;
    let check = |addr: &str, initial| {
        HealthCheck::http("/health")
            .address(addr)
            .interval(Duration::from_millis(100))
            .failures_before_critical(2)
            .successes_before_passing(2)
            .initial_state(initial)
    };
    let _up = client
        .register(
            Instance::new("flap", "127.0.0.1:1")
                .with_id("up")
                .with_check(check(&up_addr, HealthState::Passing)),
        )
        .await
        .unwrap();
    let _down = client
        .register(
            Instance::new("flap", "127.0.0.1:2")
                .with_id("down")
                .with_check(check(&down_addr, HealthState::Critical)),
        )
        .await
        .unwrap();
    let mut watch = client.watch("flap", WatchOptions::default().include_not_serving(true));
    let Some(WatchEvent::Snapshot(snap)) = next_event(&mut watch, Duration::from_secs(5)).await
    else {
        panic!("snapshot first");
    };
    assert_eq!(snap.instances.len(), 2);
    let mut changes = Vec::new();
    // 16 alternating results each: any flap would show as a state change.
    wait_until(Duration::from_secs(10), "16 checks of each", || {
        let done = up_count.load(Ordering::SeqCst) >= 16 && down_count.load(Ordering::SeqCst) >= 16;
        async move { done }
    })
    .await;
    while let Some(ev) = next_event(&mut watch, Duration::from_millis(50)).await {
        if !matches!(ev, WatchEvent::Progress { .. }) {
            changes.push(ev);
        }
    }
    // Results may be refreshed on the instance, but never a change of its
    // health.
    for ev in &changes {
        if let WatchEvent::Put { instance, .. } = ev {
            let expected = if instance.id == "up" {
                HealthState::Passing
            } else {
                HealthState::Critical
            };
            assert_eq!(instance.health, expected, "flapped: {ev:?}");
        } else {
            panic!("unexpected event {ev:?}");
        }
    }
    assert_eq!(
        health_of(&client, "flap", "up").await,
        Some(HealthState::Passing)
    );
    assert_eq!(
        health_of(&client, "flap", "down").await,
        Some(HealthState::Critical)
    );
    assert_eq!(
        served(&client, "flap").await,
        (vec!["up".to_owned()], false)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_serves_all_when_too_few_are_healthy() {
    let server = TestServer::start_with(config()).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    // Four instances, each checked by a TCP connect to its own listener;
    // closing a listener makes its instance critical.
    let mut listeners = Vec::new();
    let mut registrations: Vec<Registration> = Vec::new();
    for k in 0..4 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        listeners.push(Some(l));
        let check = HealthCheck::tcp()
            .interval(Duration::from_millis(100))
            .failures_before_critical(1)
            .initial_state(HealthState::Passing);
        registrations.push(
            client
                .register(
                    Instance::new("pan", addr)
                        .with_id(format!("p{k}"))
                        .with_check(check),
                )
                .await
                .unwrap(),
        );
    }
    let all4: Vec<String> = (0..4).map(|k| format!("p{k}")).collect();
    assert_eq!(served(&client, "pan").await, (all4.clone(), false));

    let critical = |n: usize| {
        let client = client.clone();
        async move {
            let r = client.resolve("pan").include_not_serving().await.unwrap();
            r.instances
                .iter()
                .filter(|i| i.health == HealthState::Critical)
                .count()
                == n
        }
    };
    // One of four critical: 75% serving, above the 50% threshold.
    listeners[0] = None;
    wait_until(Duration::from_secs(5), "p0 critical", || critical(1)).await;
    assert_eq!(
        served(&client, "pan").await,
        (vec!["p1".into(), "p2".into(), "p3".into()], false)
    );
    // Three of four critical: 25% serving, below it: all four are
    // answered, and the answer says so.
    listeners[1] = None;
    listeners[2] = None;
    wait_until(Duration::from_secs(5), "three critical", || critical(3)).await;
    let r = client.resolve("pan").await.unwrap();
    assert!(r.panicked, "the answer says it panicked");
    let mut ids: Vec<String> = r.instances.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, all4);
    let critical_answered = r
        .instances
        .iter()
        .filter(|i| i.health == HealthState::Critical)
        .count();
    assert_eq!(critical_answered, 3, "health is still reported as it is");
    // A drained instance is not served even in panic mode.
    registrations[3].drain("test").await.unwrap();
    let r = client.resolve("pan").await.unwrap();
    assert!(r.panicked);
    assert_eq!(r.instances.len(), 3, "{:?}", r.instances);
    assert!(r.instances.iter().all(|i| i.id != "p3"));
    drop(listeners);
    server.stop().await;
}

/// Resident set size of this process (the in-process registry included).
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// A hostile server: `behave` runs on every accepted connection.
async fn hostile<F, Fut>(behave: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(behave(s));
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_check_targets_cost_bounded_time_and_memory() {
    const INTERVAL: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_millis(150);
    const PER_KIND: usize = 10;
    let server = TestServer::start_with(config()).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();

    // Accepts and never says a word (gRPC and HTTP checks wait for an
    // answer that never comes).
    let silent = hostile(|s| async move {
        let _hold = s;
        std::future::pending::<()>().await;
    })
    .await;
    // Slowloris: a status line, then one header byte every 20 ms, forever.
    let slowloris = hostile(|mut s| async move {
        read_head(&mut s).await;
        if s.write_all(b"HTTP/1.1 200 OK\r\nX-Slow: ").await.is_err() {
            return;
        }
        while s.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // An endless body: a terabyte announced, sent as fast as it is read.
    let endless = hostile(|mut s| async move {
        read_head(&mut s).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 << 10];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    // A redirect to itself.
    let redirect = hostile(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
    })
    .await;
    // The healthy control, whose check times are recorded.
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen_by_server = seen.clone();
    let healthy = hostile(move |mut s| {
        let seen = seen_by_server.clone();
        async move {
            read_head(&mut s).await;
            seen.lock().unwrap().push(Instant::now());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;

    let check = |c: HealthCheck, addr: &str| {
        c.address(addr)
            .interval(INTERVAL)
            .timeout(TIMEOUT)
            .failures_before_critical(1)
            .initial_state(HealthState::Passing)
    };
    let mut regs = Vec::new();
    let kinds: [(&str, HealthCheck, &str); 5] = [
        ("silent-http", HealthCheck::http("/"), &silent),
        ("silent-grpc", HealthCheck::grpc(""), &silent),
        ("slowloris", HealthCheck::http("/"), &slowloris),
        ("endless", HealthCheck::http("/"), &endless),
        ("redirect", HealthCheck::http("/loop"), &redirect),
    ];
    for (name, c, addr) in &kinds {
        for k in 0..PER_KIND {
            regs.push(
                client
                    .register(
                        Instance::new("hostile", "127.0.0.1:9")
                            .with_id(format!("{name}-{k}"))
                            .with_check(check(c.clone(), addr)),
                    )
                    .await
                    .unwrap(),
            );
        }
    }
    regs.push(
        client
            .register(
                Instance::new("hostile", "127.0.0.1:9")
                    .with_id("healthy")
                    .with_check(check(HealthCheck::http("/"), &healthy)),
            )
            .await
            .unwrap(),
    );
    let rss_before = rss_bytes();
    let started = Instant::now();

    // Run ~25 rounds of checks of all 51 targets.
    wait_until(
        Duration::from_secs(15),
        "25 checks of the healthy one",
        || {
            let n = seen.lock().unwrap().len();
            async move { n >= 25 }
        },
    )
    .await;
    let ran = started.elapsed();
    let rss_after = rss_bytes();

    let all = client
        .resolve("hostile")
        .include_not_serving()
        .await
        .unwrap();
    assert_eq!(all.instances.len(), 5 * PER_KIND + 1);
    for i in &all.instances {
        let out = i
            .last_check
            .as_ref()
            .map(|c| c.output.as_str())
            .unwrap_or("");
        assert!(out.len() <= 256, "output bounded: {} bytes", out.len());
        let expect = if i.id == "healthy" {
            HealthState::Passing
        } else if i.id.starts_with("endless") {
            // 200 with a body that never ends: the status is what counts,
            // and only a snippet of the body is read.
            HealthState::Passing
        } else {
            HealthState::Critical
        };
        assert_eq!(i.health, expect, "{} said {out:?}", i.id);
        if i.id.starts_with("silent") || i.id.starts_with("slowloris") {
            // The check's own timeout, or tonic's (set to the same) for gRPC.
            assert!(
                out.contains("timed out after 150ms") || out.contains("Timeout expired"),
                "{}: {out}",
                i.id
            );
        }
        if i.id.starts_with("redirect") {
            assert!(out.contains("redirects are not followed"), "{out}");
        }
    }
    // The healthy instance's checks kept their schedule: no gap between two
    // of them much above an interval (+10% jitter), although 40 of the 50
    // others hold their slot for a whole timeout every round.
    let times = seen.lock().unwrap().clone();
    let max_gap = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap();
    assert!(
        max_gap <= INTERVAL * 2,
        "healthy check delayed: longest gap {max_gap:?} (interval {INTERVAL:?})"
    );
    // Memory: 25 rounds against an endless body (10 at a time) would be
    // gigabytes if bodies were read whole; bounded reads keep it flat.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 48 << 20,
        "RSS grew {} MiB over {ran:?} of hostile checks",
        grown >> 20
    );
    eprintln!(
        "hostile: {} healthy checks in {ran:?}, longest gap {max_gap:?}, RSS {} -> {} MiB",
        times.len(),
        rss_before >> 20,
        rss_after >> 20
    );
    drop(regs);
    server.stop().await;
}
