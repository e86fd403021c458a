//! Every answer is one whole revision. 2,000 instances of `torn` live on
//! one lease; `Deregister{lease_id}` removes them all in one revision D
//! while other connections loop Resolve, ListServices, Status and Watch
//! snapshots of `torn`. Each answer must hold all 2,000 (labelled with a
//! revision before D) or none (labelled D or later): an answer with k
//! instances at revision r must be the state at r. Several rounds.

mod common;

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{
    TestServer,
    api::{InstanceExt, instance, register},
};
use futures::{StreamExt, stream};
use registry_api::v1::{
    DeregisterRequest, ListServicesRequest, ResolveRequest, StatusRequest, WatchRequest,
    deregister_request::Target, registry_client::RegistryClient, watch_response::Kind,
};
use tokio::time::Instant;
use tonic::transport::Channel;

const SERVICE: &str = "torn";
const INSTANCES: usize = 2_000;
const ROUNDS: usize = 5;
/// Resolve loops: two as in the reproduction, plus one, since a
/// debug build's revoke of 2,000 takes 40-110 ms and only a Resolve that
/// rebuilds the service's snapshot inside it can see it half done.
const RESOLVERS: usize = 3;

/// One answer a reader got.
#[derive(Debug, Clone)]
struct Seen {
    reader: &'static str,
    count: usize,
    revision: u64,
    /// For Resolve: what differs from the 2,000 registered (ids, lease).
    mismatch: Option<String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn id(i: usize) -> String {
    format!("t{i:04}")
}

/// Registers the 2,000 on one lease: the first Register grants it, the
/// rest attach. Returns the lease and the revision of the last put.
async fn fill(client: &RegistryClient<Channel>, round: usize) -> (u64, u64) {
    let register = |i: usize, lease_id: u64| {
        let mut c = client.clone();
        async move {
            let torn =
                instance(SERVICE, &id(i)).at(format!("10.{round}.{}.{}:80", i / 256, i % 256));
            register(&mut c, torn, 60_000, lease_id).await
        }
    };
    let first = register(0, 0).await;
    let lease = first.lease_id;
    let last = stream::iter(1..INSTANCES)
        .map(|i| register(i, lease))
        .buffer_unordered(16)
        .fold(first.revision, |max, r| async move {
            assert_eq!(r.lease_id, lease, "attach keeps the lease");
            max.max(r.revision)
        })
        .await;
    (lease, last)
}

async fn resolve_reader(
    mut c: RegistryClient<Channel>,
    lease: u64,
    log: Log,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let r = c
            .resolve(ResolveRequest {
                service: SERVICE.into(),
                ..Default::default()
            })
            .await
            .expect("Resolve")
            .into_inner();
        let mismatch = (r.instances.len() == INSTANCES)
            .then(|| {
                let bad: Vec<String> = r
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(i, inst)| inst.id != id(*i) || inst.lease_id != lease)
                    .take(3)
                    .map(|(i, inst)| {
                        format!(
                            "#{i} is {}/{} lease {}",
                            inst.service, inst.id, inst.lease_id
                        )
                    })
                    .collect();
                (!bad.is_empty()).then(|| bad.join(", "))
            })
            .flatten();
        log.lock().unwrap().push(Seen {
            reader: "Resolve",
            count: r.instances.len(),
            revision: r.revision,
            mismatch,
        });
    }
}

async fn counts_reader(mut c: RegistryClient<Channel>, log: Log, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let l = c
            .list_services(ListServicesRequest {})
            .await
            .expect("ListServices")
            .into_inner();
        let count = l
            .services
            .iter()
            .find(|s| s.name == SERVICE)
            .map_or(0, |s| s.instance_count as usize);
        let s = c
            .status(StatusRequest {})
            .await
            .expect("Status")
            .into_inner();
        let mut log = log.lock().unwrap();
        log.push(Seen {
            reader: "ListServices",
            count,
            revision: l.revision,
            mismatch: None,
        });
        // Only `torn` ever has instances in this test.
        log.push(Seen {
            reader: "Status",
            count: s.instances as usize,
            revision: s.revision,
            mismatch: None,
        });
    }
}

async fn watch_reader(mut c: RegistryClient<Channel>, log: Log, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut stream = c
            .watch(WatchRequest {
                service: SERVICE.into(),
                ..Default::default()
            })
            .await
            .expect("Watch")
            .into_inner();
        let mut count = 0;
        let revision = loop {
            let msg = stream
                .message()
                .await
                .expect("watch message")
                .expect("the stream stays open");
            match msg.kind {
                Some(Kind::Snapshot(s)) => {
                    count += s.instances.len();
                    if !s.more {
                        break s.revision;
                    }
                }
                other => panic!("a watch from revision 0 began with {other:?}, not a snapshot"),
            }
        };
        log.lock().unwrap().push(Seen {
            reader: "Watch snapshot",
            count,
            revision,
            mismatch: None,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_lease_of_2000_instances_is_all_or_nothing_for_every_reader() {
    let server = TestServer::start().await;
    let writer = server.client().await;
    let mut problems = String::new();
    let mut overlapping = 0;
    for round in 0..ROUNDS {
        let (lease, full_from) = fill(&writer, round).await;
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        // Each reader on a connection of its own.
        let mut readers = vec![
            tokio::spawn(counts_reader(
                server.client().await,
                log.clone(),
                stop.clone(),
            )),
            tokio::spawn(watch_reader(
                server.client().await,
                log.clone(),
                stop.clone(),
            )),
        ];
        for _ in 0..RESOLVERS {
            readers.push(tokio::spawn(resolve_reader(
                server.client().await,
                lease,
                log.clone(),
                stop.clone(),
            )));
        }
        let all_read = |log: &Log, pred: &dyn Fn(&Seen) -> bool| {
            let log = log.lock().unwrap();
            ["Resolve", "ListServices", "Status", "Watch snapshot"]
                .iter()
                .all(|r| log.iter().any(|s| s.reader == *r && pred(s)))
        };
        common::wait_until(Duration::from_secs(10), "every reader answering", || {
            let log = log.clone();
            async move { all_read(&log, &|_| true) }
        })
        .await;
        let sent = log.lock().unwrap().len();
        let dereg = writer
            .clone()
            .deregister(DeregisterRequest {
                target: Some(Target::LeaseId(lease)),
            })
            .await
            .expect("Deregister{lease_id}")
            .into_inner();
        let acked = log.lock().unwrap().len();
        overlapping += acked - sent;
        assert_eq!(
            dereg.removed as usize, INSTANCES,
            "the lease held all 2,000"
        );
        let d = dereg.revision;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_read(&log, &|s| s.revision >= d) {
            assert!(Instant::now() < deadline, "readers never saw revision {d}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.expect("reader task");
        }
        let log = log.lock().unwrap();
        for s in log.iter() {
            let whole = if s.revision < d {
                s.count == INSTANCES && s.revision >= full_from && s.mismatch.is_none()
            } else {
                s.count == 0
            };
            if !whole {
                let _ = writeln!(
                    problems,
                    "round {round}: {} answered {} instance(s) at revision {}{}; the state at that revision holds {} (all 2,000 registered by revision {full_from}, none from the deregister's revision {d} on)",
                    s.reader,
                    s.count,
                    s.revision,
                    s.mismatch
                        .as_ref()
                        .map_or(String::new(), |m| format!(" ({m})")),
                    if s.revision >= d {
                        "0".to_string()
                    } else if s.revision >= full_from {
                        INSTANCES.to_string()
                    } else {
                        "fewer (a stale revision)".to_string()
                    },
                );
            }
        }
    }
    server.stop().await;
    assert!(
        problems.is_empty(),
        "answers that are not one whole revision ({overlapping} answers arrived while a Deregister was in flight):\n{problems}"
    );
}
