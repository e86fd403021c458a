//! End-to-end: Watch against a real server — snapshot then ordered events,
//! resume, reset snapshots, slow watchers, cleanup, caps, watch-all.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    TestServer,
    api::{
        Client, deregister, deregister_instance, events, instance, next, register, snapshot, watch,
    },
    wait_until,
};
use registry::Config;
use registry_api::v1::{
    DeleteReason, DeregisterRequest, Event, EventType, Instance, ResetReason, ResolveRequest,
    StatusRequest, WatchRequest, deregister_request::Target, registry_client::RegistryClient,
    watch_response::Kind,
};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

fn summary(events: &[Event]) -> Vec<(EventType, String, u64, DeleteReason)> {
    events
        .iter()
        .map(|e| {
            (
                e.r#type(),
                e.instance.as_ref().unwrap().id.clone(),
                e.revision,
                e.reason(),
            )
        })
        .collect()
}

#[tokio::test]
async fn snapshot_then_put_and_delete_events_with_reasons() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    register(&mut c, instance("prod", "a"), 10_000, 0).await;
    register(&mut c, instance("other", "x"), 10_000, 0).await;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    let snap = snapshot(&mut w).await;
    assert!(!snap.reset);
    assert_eq!(snap.revision, 2);
    assert_eq!(snap.instances.len(), 1);
    assert_eq!(snap.instances[0].id, "a");
    assert!(snap.server.unwrap().epoch > 0);

    let b = register(&mut c, instance("prod", "b"), 200, 0).await;
    register(&mut c, instance("other", "y"), 10_000, 0).await; // not ours
    let dereg = deregister(&mut c, deregister_instance("prod", "a"))
        .await
        .revision;
    let got = events(&mut w, 3).await; // PUT b, DELETE a, then b expires
    use DeleteReason as R;
    use EventType as T;
    let s = summary(&got);
    assert_eq!(s[0], (T::Put, "b".into(), b.revision, R::Unspecified));
    assert_eq!(s[1], (T::Delete, "a".into(), dereg, R::Deregistered));
    assert_eq!(
        (s[2].0, s[2].1.as_str(), s[2].3),
        (T::Delete, "b", R::Expired)
    );
    assert!(s[2].2 > dereg);
    assert_eq!(
        got[0].instance.as_ref().unwrap().address,
        "10.0.0.1:80",
        "PUT carries the full instance"
    );
}

#[tokio::test]
async fn events_are_ordered_gapless_and_grouped_by_revision() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut w = watch(&mut c, WatchRequest::default()).await;
    let snap = snapshot(&mut w).await;
    assert_eq!(snap.revision, 0);

    // Concurrent writers from several connections.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                register(
                    &mut c,
                    instance(&format!("svc{t}"), &i.to_string()),
                    10_000,
                    0,
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A lease with three instances: revoking it is one revision.
    let lease = register(&mut c, instance("multi", "1"), 10_000, 0).await;
    register(&mut c, instance("multi", "2"), 0, lease.lease_id).await;
    register(&mut c, instance("multi2", "3"), 0, lease.lease_id).await;
    let out = c
        .deregister(DeregisterRequest {
            target: Some(Target::LeaseId(lease.lease_id)),
        })
        .await
        .unwrap()
        .into_inner();

    let mut got = Vec::new();
    let mut grouped = true;
    while got.len() < 206 {
        match next(&mut w).await {
            Kind::Events(batch) => {
                // A revision never straddles two messages.
                if let (Some(prev), Some(first)) = (got.last(), batch.events.first()) {
                    let (prev, first): (&Event, &Event) = (prev, first);
                    grouped &= prev.revision != first.revision;
                }
                got.extend(batch.events);
            }
            Kind::Progress(_) => {}
            Kind::Snapshot(s) => panic!("unexpected snapshot {s:?}"),
        }
    }
    assert!(grouped, "events of one revision split across messages");
    let revs: Vec<u64> = got.iter().map(|e| e.revision).collect();
    // 203 puts with revisions 1..=203, then three deletes sharing revision 204.
    let expected: Vec<u64> = (1..=203).chain([204, 204, 204]).collect();
    assert_eq!(revs, expected, "in order, no duplicates, no gaps");
    assert_eq!(out.revision, 204);
    assert!(got[203..].iter().all(|e| e.r#type() == EventType::Delete));
}

#[tokio::test]
async fn resume_from_last_revision_plus_one_sees_exactly_what_was_missed() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    let snap = snapshot(&mut w).await;
    let epoch = snap.server.unwrap().epoch;
    register(&mut c, instance("prod", "a"), 10_000, 0).await;
    let seen = events(&mut w, 1).await;
    let last = seen[0].revision;
    drop(w);

    // Missed while disconnected.
    register(&mut c, instance("prod", "b"), 10_000, 0).await;
    register(&mut c, instance("elsewhere", "z"), 10_000, 0).await;
    let d = deregister(&mut c, deregister_instance("prod", "a"))
        .await
        .revision;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            start_revision: last + 1,
            epoch,
            ..Default::default()
        },
    )
    .await;
    let got = summary(&events(&mut w, 2).await);
    assert_eq!(got[0].0, EventType::Put);
    assert_eq!(got[0].1, "b");
    assert_eq!(
        (got[1].0, got[1].1.as_str(), got[1].2),
        (EventType::Delete, "a", d)
    );
    // And then live.
    register(&mut c, instance("prod", "c"), 10_000, 0).await;
    let live = events(&mut w, 1).await;
    assert_eq!(live[0].instance.as_ref().unwrap().id, "c");
}

#[tokio::test]
async fn too_old_revision_or_other_epoch_gets_a_reset_snapshot() {
    let server = TestServer::start_with(Config {
        history_events: 5,
        ..TestServer::test_config()
    })
    .await;
    let mut c = server.client().await;
    for i in 0..20 {
        register(&mut c, instance("prod", &i.to_string()), 10_000, 0).await;
    }
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            start_revision: 2,
            ..Default::default()
        },
    )
    .await;
    let snap = snapshot(&mut w).await;
    assert!(snap.reset);
    assert_eq!(snap.reason(), ResetReason::Compacted);
    assert_eq!(snap.revision, 20);
    assert_eq!(snap.instances.len(), 20);

    // Recent enough: replayed, no reset.
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            start_revision: 18,
            ..Default::default()
        },
    )
    .await;
    let replay = events(&mut w, 3).await;
    assert_eq!(
        replay.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [18, 19, 20]
    );

    // Another server life (epoch) or a revision from the future: reset.
    for (start_revision, epoch) in [(3, 12345), (500, 0)] {
        let mut w = watch(
            &mut c,
            WatchRequest {
                service: "prod".into(),
                start_revision,
                epoch,
                ..Default::default()
            },
        )
        .await;
        let snap = snapshot(&mut w).await;
        assert!(snap.reset);
        assert_eq!(snap.reason(), ResetReason::EpochChanged);
    }
}

#[tokio::test]
async fn selector_watch_turns_leaving_replacements_into_deletes() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let with = |id: &str, zone: &str| {
        let mut i = instance("prod", id);
        i.metadata.insert("zone".into(), zone.into());
        i
    };
    register(&mut c, with("a", "z1"), 10_000, 0).await;
    register(&mut c, with("b", "z2"), 10_000, 0).await;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "prod".into(),
            selector: [("zone".to_string(), "z1".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    let snap = snapshot(&mut w).await;
    assert_eq!(
        snap.instances
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    register(&mut c, with("a", "z2"), 10_000, 0).await; // leaves the view
    register(&mut c, with("b", "z1"), 10_000, 0).await; // enters it
    register(&mut c, with("c", "z3"), 10_000, 0).await; // never in it
    let got = summary(&events(&mut w, 2).await);
    assert_eq!(
        (got[0].0, got[0].1.as_str(), got[0].3),
        (EventType::Delete, "a", DeleteReason::Replaced)
    );
    assert_eq!((got[1].0, got[1].1.as_str()), (EventType::Put, "b"));
}

#[tokio::test]
async fn watch_all_spans_services() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    register(&mut c, instance("api", "1"), 10_000, 0).await;
    register(&mut c, instance("web", "1"), 10_000, 0).await;
    let mut w = watch(&mut c, WatchRequest::default()).await;
    let snap = snapshot(&mut w).await;
    let names: Vec<_> = snap.instances.iter().map(|i| i.service.as_str()).collect();
    assert_eq!(names, ["api", "web"]);
    register(&mut c, instance("db", "1"), 10_000, 0).await;
    deregister(&mut c, deregister_instance("api", "1")).await;
    let got = events(&mut w, 2).await;
    let services: Vec<_> = got
        .iter()
        .map(|e| e.instance.as_ref().unwrap().service.as_str())
        .collect();
    assert_eq!(services, ["db", "api"]);
}

#[tokio::test]
async fn watching_an_unknown_service_sees_it_appear() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "later".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(snapshot(&mut w).await.instances.is_empty());
    register(&mut c, instance("later", "1"), 10_000, 0).await;
    assert_eq!(events(&mut w, 1).await[0].r#type(), EventType::Put);
}

#[tokio::test]
async fn stalled_watcher_gets_a_reset_instead_of_blocking_writers() {
    let server = TestServer::start_with(Config {
        watch_buffer: 4,
        ..TestServer::test_config()
    })
    .await;
    // A client with tiny HTTP/2 windows that stops reading: the server can
    // only push ~64 KiB to it before its stream stops being polled.
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow_client = RegistryClient::new(channel);
    let mut slow = watch(
        &mut slow_client,
        WatchRequest {
            service: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    snapshot(&mut slow).await;

    // A healthy watcher alongside, on its own connection.
    let mut c = server.client().await;
    let mut healthy = watch(
        &mut server.client().await,
        WatchRequest {
            service: "prod".into(),
            ..Default::default()
        },
    )
    .await;
    snapshot(&mut healthy).await;
    // It reads continuously, as a well-behaved client does.
    let healthy = tokio::spawn(async move {
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < 300 {
            match next(&mut healthy).await {
                Kind::Events(b) => ids.extend(b.events.into_iter().map(|e| e.instance.unwrap().id)),
                Kind::Progress(_) => {}
                Kind::Snapshot(s) => panic!("healthy watcher got a snapshot: reset={}", s.reset),
            }
        }
        ids.len()
    });

    // 300 registrations of ~4 KiB instances: ~1.2 MB of events, far beyond
    // what the slow watcher's window and buffer hold.
    let started = tokio::time::Instant::now();
    for i in 0..300 {
        let mut inst = instance("prod", &format!("i{i}"));
        inst.metadata.insert("blob".into(), "x".repeat(1000));
        inst.metadata.insert("blob2".into(), "y".repeat(1000));
        inst.metadata.insert("blob3".into(), "z".repeat(1000));
        inst.metadata.insert("blob4".into(), "w".repeat(1000));
        tokio::time::timeout(Duration::from_secs(2), register(&mut c, inst, 10_000, 0))
            .await
            .expect("a registration was blocked by a slow watcher");
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // The healthy watcher saw every event, no reset.
    assert_eq!(healthy.await.unwrap(), 300);

    // The slow one now reads: some events, then a reset snapshot with the
    // latest state, never a silent gap.
    let mut state: BTreeMap<String, Instance> = BTreeMap::new();
    let mut got_reset = false;
    while state.len() < 300 {
        match next(&mut slow).await {
            Kind::Events(b) => {
                for e in b.events {
                    let inst = e.instance.unwrap();
                    state.insert(inst.id.clone(), inst);
                }
            }
            Kind::Snapshot(s) => {
                assert!(s.reset);
                assert_eq!(s.reason(), ResetReason::SlowConsumer);
                if !got_reset {
                    state.clear();
                }
                got_reset = true;
                for inst in s.instances {
                    state.insert(inst.id.clone(), inst);
                }
            }
            Kind::Progress(_) => {}
        }
    }
    assert!(got_reset, "slow watcher must be told it missed events");
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.watcher_resets >= 1);
}

#[tokio::test]
async fn watchers_are_removed_when_clients_go_away() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let gauge = |mut c: Client| async move {
        c.status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .watchers
    };
    assert_eq!(gauge(c.clone()).await, 0);
    let mut streams = Vec::new();
    for svc in ["a", "b", ""] {
        let mut w = watch(
            &mut c,
            WatchRequest {
                service: svc.into(),
                ..Default::default()
            },
        )
        .await;
        snapshot(&mut w).await;
        streams.push(w);
    }
    assert_eq!(gauge(c.clone()).await, 3);
    streams.truncate(1);
    wait_until(WAIT, "watcher gauge back to 1", || {
        let c = c.clone();
        async move { gauge(c).await == 1 }
    })
    .await;
    // A whole connection going away removes its watchers too.
    let other = server.client().await;
    let mut other_w = watch(&mut other.clone(), WatchRequest::default()).await;
    snapshot(&mut other_w).await;
    assert_eq!(gauge(c.clone()).await, 2);
    drop(other_w);
    drop(other);
    drop(streams);
    wait_until(WAIT, "watcher gauge back to 0", || {
        let c = c.clone();
        async move { gauge(c).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn watcher_caps_are_resource_exhausted() {
    let server = TestServer::start_with(Config {
        max_watchers: 3,
        max_watchers_per_connection: 2,
        ..TestServer::test_config()
    })
    .await;
    let mut c = server.client().await;
    let _w1 = watch(&mut c, WatchRequest::default()).await;
    let _w2 = watch(&mut c, WatchRequest::default()).await;
    let err = c.watch(WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("max_watchers_per_connection"),
        "{}",
        err.message()
    );
    let mut c2 = server.client().await;
    let _w3 = watch(&mut c2, WatchRequest::default()).await;
    let mut c3 = server.client().await;
    let err = c3.watch(WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_watchers)"), "{}", err.message());
}

#[tokio::test]
async fn idle_streams_get_progress_messages() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    register(&mut c, instance("elsewhere", "1"), 10_000, 0).await;
    let mut w = watch(
        &mut c,
        WatchRequest {
            service: "quiet".into(),
            progress_interval_ms: 100,
            ..Default::default()
        },
    )
    .await;
    snapshot(&mut w).await;
    register(&mut c, instance("elsewhere", "2"), 10_000, 0).await;
    loop {
        match next(&mut w).await {
            Kind::Progress(p) => {
                if p.revision == 2 {
                    break;
                }
            }
            other => panic!("expected progress, got {other:?}"),
        }
    }
    let res = c
        .resolve(ResolveRequest {
            service: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.revision, 2);
}
