//! Three registry nodes over a real etcd (`--store etcd`): reads on any
//! node, Watch resumed on another node, a crashed node's clients moving to
//! the others without callers losing calls, and etcd going away and coming
//! back. Each test starts its own etcd on free loopback ports.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    api::{
        deregister, deregister_instance, deregister_lease, events, ids, instance, next, register,
        resolve, try_register,
    },
    cluster::Etcd,
    etcd::ClusterNode,
    prod::{ProdInstance, call_many},
    wait_until,
};
use registry_api::v1::{DeleteReason, EventType, WatchRequest, watch_response::Kind};
use registry_client::{RegistrationState, balanced_channel};
use tokio::time::Instant;
use tonic::Code;

async fn cluster() -> Option<(Etcd, [ClusterNode; 3])> {
    let etcd = Etcd::start().await?;
    let a = ClusterNode::start(&etcd).await;
    let b = ClusterNode::start(&etcd).await;
    let c = ClusterNode::start(&etcd).await;
    Some((etcd, [a, b, c]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_on_one_node_resolve_and_watch_on_the_others() {
    let Some((_etcd, [a, b, c])) = cluster().await else {
        return;
    };
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);

    // Watch on B and C from a snapshot before anything exists.
    let mut wb = cb
        .watch(WatchRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Kind::Snapshot(snap) = next(&mut wb).await else {
        panic!("watch starts with a snapshot")
    };
    assert!(snap.instances.is_empty());
    let epoch = snap.server.unwrap().epoch;

    let reg = register(&mut ca, instance("prod", "p1"), 60_000, 0).await;
    assert_eq!(
        reg.server.unwrap().epoch,
        epoch,
        "one epoch per etcd cluster"
    );
    // Read-your-writes on the node that took the write.
    let on_a = resolve(&mut ca, "prod").await;
    assert_eq!(ids(&on_a), ["p1"]);
    assert!(on_a.revision >= reg.revision);
    assert!(!on_a.server.unwrap().stale);

    // B's watch sees the PUT at the same (etcd) revision.
    let ev = events(&mut wb, 1).await;
    assert_eq!(ev[0].r#type, EventType::Put as i32);
    assert_eq!(ev[0].revision, reg.revision);
    assert_eq!(ev[0].instance.as_ref().unwrap().lease_id, reg.lease_id);
    // C resolves it too, at a revision at least that of the write.
    wait_until(Duration::from_secs(5), "C resolves p1", || {
        let mut cc = cc.clone();
        async move { ids(&resolve(&mut cc, "prod").await) == ["p1"] }
    })
    .await;
    let on_c = resolve(&mut cc, "prod").await;
    assert_eq!(on_c.instances[0].revision, reg.revision);
    assert_eq!(on_c.server.unwrap().epoch, epoch);

    // Deregistered on A: DEREGISTERED on B.
    let dereg = deregister(&mut ca, deregister_instance("prod", "p1")).await;
    let ev = events(&mut wb, 1).await;
    assert_eq!(ev[0].r#type, EventType::Delete as i32);
    assert_eq!(ev[0].reason, DeleteReason::Deregistered as i32);
    assert_eq!(ev[0].revision, dereg.revision);
    assert!(
        ids(&resolve(&mut ca, "prod").await).is_empty(),
        "read-your-deregister"
    );

    // A client lease on A expiring (no heartbeats): EXPIRED on B.
    let short = register(&mut ca, instance("prod", "p2"), 300, 0).await;
    let ev = events(&mut wb, 2).await;
    assert_eq!(ev[0].r#type, EventType::Put as i32);
    assert_eq!(ev[0].revision, short.revision);
    assert_eq!(ev[1].r#type, EventType::Delete as i32);
    assert_eq!(ev[1].reason, DeleteReason::Expired as i32);

    // Lease revocation through A reaches B as DEREGISTERED too.
    let long = register(&mut ca, instance("prod", "p3"), 60_000, 0).await;
    deregister(&mut ca, deregister_lease(long.lease_id)).await;
    let ev = events(&mut wb, 2).await;
    assert_eq!(ev[1].reason, DeleteReason::Deregistered as i32);
    wait_until(Duration::from_secs(5), "C sees nothing left", || {
        let mut cc = cc.clone();
        async move { resolve(&mut cc, "prod").await.instances.is_empty() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_on_another_node_from_its_revision() {
    let Some((_etcd, [a, b, c])) = cluster().await else {
        return;
    };
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    let first = register(&mut ca, instance("prod", "r1"), 60_000, 0).await;

    // Watch on B, read up to r1, then go away.
    let mut wb = cb
        .watch(WatchRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (seen, epoch) = loop {
        let Kind::Snapshot(s) = next(&mut wb).await else {
            continue;
        };
        if s.instances.iter().any(|i| i.id == "r1") {
            break (s.revision, s.server.unwrap().epoch);
        }
    };
    assert!(seen >= first.revision);
    drop(wb);

    // Changes while the watcher is away, made through A.
    let r2 = register(&mut ca, instance("prod", "r2"), 60_000, 0).await;
    let r3 = register(&mut ca, instance("prod", "r3"), 60_000, 0).await;

    // Resume on C: a replay of exactly what was missed, no snapshot.
    let mut wc = cc
        .watch(WatchRequest {
            service: "prod".into(),
            start_revision: seen + 1,
            epoch,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ev = events(&mut wc, 2).await;
    let got: Vec<(u64, &str)> = ev
        .iter()
        .map(|e| (e.revision, e.instance.as_ref().unwrap().id.as_str()))
        .collect();
    assert_eq!(got, [(r2.revision, "r2"), (r3.revision, "r3")]);
    // And it goes live from there.
    let r4 = register(&mut ca, instance("prod", "r4"), 60_000, 0).await;
    let ev = events(&mut wc, 1).await;
    assert_eq!(ev[0].revision, r4.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_reregister_elsewhere_and_callers_lose_no_calls() {
    let Some((_etcd, [a, b, c])) = cluster().await else {
        return;
    };
    let ttl = Duration::from_secs(2);
    // Services list A first, so they register through A.
    let all = format!("{},{},{}", a.url, b.url, c.url);
    let p1 = ProdInstance::start(&all, "prod-1", ttl).await;
    let p2 = ProdInstance::start(&all, "prod-2", ttl).await;
    let mut ca = a.client().await;
    let before: HashMap<String, u64> = resolve(&mut ca, "prod")
        .await
        .instances
        .into_iter()
        .map(|i| (i.id, i.lease_id))
        .collect();
    assert_eq!(before.len(), 2, "both registered through A");

    // A caller that talks to B and C only, with a balanced channel.
    let caller = registry_client::RegistryClient::connect(format!("{},{}", b.url, c.url))
        .await
        .unwrap();
    let channel = balanced_channel(&caller, "prod");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = call_many(&channel, 10).await;
        if seen.contains_key("prod-1") && seen.contains_key("prod-2") {
            break;
        }
        assert!(Instant::now() < deadline, "both instances answer: {seen:?}");
    }

    // A resolver that watches through A first: it must move to B and keep
    // both instances the whole time.
    let watcher = registry_client::RegistryClient::connect(format!("{},{}", a.url, b.url))
        .await
        .unwrap();
    let resolver = watcher.resolver("prod");
    let mut updates = resolver.subscribe();
    wait_until(
        Duration::from_secs(5),
        "resolver through A has both",
        || {
            let r = resolver.clone();
            async move { r.instances().len() == 2 && r.state().connected }
        },
    )
    .await;
    let revision_before = resolver.state().revision;
    // Every view the resolver publishes, from now on: the smallest count.
    let smallest = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let recorder = {
        let smallest = smallest.clone();
        updates.borrow_and_update();
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let n = updates.borrow_and_update().instances.len();
                smallest.fetch_min(n, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };

    let killed_at = Instant::now();
    a.kill();

    // Within one TTL both are registered again, under leases of B or C.
    let mut cb = b.client().await;
    wait_until(ttl, "both re-registered on B or C", || {
        let mut cb = cb.clone();
        let before = before.clone();
        async move {
            let now = resolve(&mut cb, "prod").await;
            now.instances.len() == 2
                && now
                    .instances
                    .iter()
                    .all(|i| before.get(&i.id).is_some_and(|old| *old != i.lease_id))
        }
    })
    .await;
    let moved_after = killed_at.elapsed();
    assert_eq!(
        p1.registration().current_state(),
        RegistrationState::Registered
    );
    assert_eq!(
        p2.registration().current_state(),
        RegistrationState::Registered
    );

    // Past A's etcd lease expiry (2 s) and then some: not one call failed.
    let mut total: HashMap<String, usize> = HashMap::new();
    while killed_at.elapsed() < Duration::from_secs(4) {
        for (k, v) in call_many(&channel, 20).await {
            *total.entry(k).or_default() += v;
        }
    }
    assert!(
        !total.contains_key("<error>"),
        "calls lost after the node crash: {total:?}"
    );
    // The resolver failed over to B, resumed (same epoch, later revision)
    // and never published fewer than two instances.
    wait_until(
        Duration::from_secs(5),
        "resolver reconnected through B",
        || {
            let r = resolver.clone();
            async move { r.state().connected }
        },
    )
    .await;
    assert!(resolver.state().revision > revision_before);
    assert_eq!(resolver.instances().len(), 2);
    recorder.abort();
    let smallest = smallest.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        smallest == usize::MAX || smallest == 2,
        "resolver dropped instances: {smallest}"
    );
    assert!(
        total.contains_key("prod-1") && total.contains_key("prod-2"),
        "{total:?}"
    );
    let after = resolve(&mut cb, "prod").await;
    assert_eq!(
        ids(&after),
        ["prod-1", "prod-2"],
        "A's expired etcd lease took nothing"
    );
    eprintln!("re-registered {moved_after:?} after the crash; calls {total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_refuses_writes_serves_stale_reads_and_recovers() {
    let Some((etcd, [a, b, c])) = cluster().await else {
        return;
    };
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);
    register(&mut ca, instance("prod", "x"), 60_000, 0).await;
    wait_until(Duration::from_secs(5), "C resolves x", || {
        let mut cc = cc.clone();
        async move { ids(&resolve(&mut cc, "prod").await) == ["x"] }
    })
    .await;

    etcd.pause();
    // Every node notices within a couple of lease renewals.
    for client in [&ca, &cb, &cc] {
        wait_until(Duration::from_secs(8), "node marks its reads stale", || {
            let mut c = client.clone();
            async move { resolve(&mut c, "prod").await.server.unwrap().stale }
        })
        .await;
    }
    let err = try_register(&mut cb, instance("prod", "y"), 60_000, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let stale = resolve(&mut cc, "prod").await;
    assert_eq!(ids(&stale), ["x"], "reads keep serving the last catalog");

    etcd.resume();
    for client in [&ca, &cb, &cc] {
        wait_until(Duration::from_secs(10), "node fresh again", || {
            let mut c = client.clone();
            async move { !resolve(&mut c, "prod").await.server.unwrap().stale }
        })
        .await;
    }
    // Writes work again, and x is there (put back by A if its etcd lease
    // expired during the pause).
    wait_until(Duration::from_secs(10), "register accepted again", || {
        let mut cb = cb.clone();
        async move {
            try_register(&mut cb, instance("prod", "y"), 60_000, 0)
                .await
                .is_ok()
        }
    })
    .await;
    wait_until(Duration::from_secs(10), "C resolves x and y", || {
        let mut cc = cc.clone();
        async move { ids(&resolve(&mut cc, "prod").await) == ["x", "y"] }
    })
    .await;
    assert_eq!(ids(&resolve(&mut ca, "prod").await), ["x", "y"]);
}
