//! Lease ids are never granted twice, across `kill -9` restarts of the real
//! binary on one `--data-dir`. Each life
//! registers `a` (a new lease), waits until the data directory has been
//! written since, registers `b` and `c` (new leases) and is killed. The
//! next life registers `x`, `y`, `z` with new leases: none may get an id any
//! earlier life granted. Then `b`'s keeper heartbeats `b`'s old lease: it
//! may renew a lease that still holds exactly `b`, or answer NOT_FOUND
//! (register again), never renew a stranger's lease. Six restarts.

mod common;

use std::{collections::HashMap, fmt::Write as _, path::Path, time::Duration};

use common::{
    api::{Client, InstanceExt, instance, register, resolve},
    binary::{BinaryServer, wait_ready},
};
use registry_api::v1::HeartbeatRequest;

const RESTARTS: usize = 6;
const SERVICE: &str = "ids";

/// Names, sizes and modification times of the files in the data dir.
fn fingerprint(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    // Recursive: the data directory keeps its store in a subdirectory.
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(e.path());
            } else if let Ok(modified) = meta.modified() {
                files.push((e.path().display().to_string(), meta.len(), modified));
            }
        }
    }
    files.sort();
    files
}

/// Registers `name` of this life under a new lease; returns the lease id.
async fn register_in_life(client: &mut Client, name: &str, life: usize) -> u64 {
    let instance = instance(SERVICE, &format!("{name}-{life}")).at(format!("10.0.{life}.1:80"));
    register(client, instance, 60_000, 0).await.lease_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_life_grants_a_lease_id_an_earlier_life_granted() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::start(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--rate-limit",
        "0",
    ])
    .await;
    // lease id -> "name-life" it was granted for.
    let mut granted: HashMap<u64, String> = HashMap::new();
    let mut problems = String::new();
    let (mut new_grants, mut reused) = (0, 0);
    let mut b_lease = 0;
    for life in 0..=RESTARTS {
        let mut client = wait_ready(&server).await;
        if life > 0 {
            for name in ["x", "y", "z"] {
                let lease = register_in_life(&mut client, name, life).await;
                new_grants += 1;
                if let Some(owner) = granted.get(&lease) {
                    reused += 1;
                    let _ = writeln!(
                        problems,
                        "life {life} granted lease id {lease} to {name}-{life}; an earlier life had granted it to {owner}"
                    );
                }
                granted
                    .entry(lease)
                    .or_insert_with(|| format!("{name}-{life}"));
            }
            // A single lease id: unknown is NOT_FOUND (register again).
            let found = match client
                .heartbeat(HeartbeatRequest {
                    lease_ids: vec![b_lease],
                })
                .await
            {
                Ok(r) => r.into_inner().leases[0].found,
                Err(e) if e.code() == tonic::Code::NotFound => false,
                Err(e) => panic!("Heartbeat of b's old lease: {e}"),
            };
            if found {
                let holds: Vec<String> = resolve(&mut client, SERVICE)
                    .await
                    .instances
                    .into_iter()
                    .filter(|i| i.lease_id == b_lease)
                    .map(|i| i.id)
                    .collect();
                let b = format!("b-{}", life - 1);
                if holds != [b.clone()] {
                    let _ = writeln!(
                        problems,
                        "life {life}: the heartbeat of {b}'s lease {b_lease} answered found:true, but that lease holds {holds:?}, not exactly [{b:?}] (it must answer NOT_FOUND so {b} registers again)"
                    );
                }
            }
        }
        if life == RESTARTS {
            break;
        }
        let before = fingerprint(dir.path());
        let a = register_in_life(&mut client, "a", life).await;
        granted.insert(a, format!("a-{life}"));
        common::wait_until(
            Duration::from_secs(5),
            "the data dir to be written after a's registration",
            || {
                let changed = fingerprint(dir.path()) != before;
                async move { changed }
            },
        )
        .await;
        b_lease = register_in_life(&mut client, "b", life).await;
        granted.insert(b_lease, format!("b-{life}"));
        let c = register_in_life(&mut client, "c", life).await;
        granted.insert(c, format!("c-{life}"));
        server.restart().await;
    }
    assert!(
        problems.is_empty(),
        "{reused} of {new_grants} lease grants after a restart reused an id an earlier life had granted:\n{problems}"
    );
}
