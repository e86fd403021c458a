//! End-to-end: the core API against a real server on 127.0.0.1 — register,
//! resolve, heartbeat, expiry, deregister, list, revisions, health.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    api::{
        InstanceExt, deregister, deregister_instance, deregister_lease, ids, instance, register,
        register_request, resolve,
    },
    wait_until,
};
use registry_api::v1::{
    DeregisterRequest, HeartbeatRequest, InstanceKey, ListServicesRequest, ResolveRequest,
    StatusRequest, deregister_request::Target,
};
use tonic::{Code, transport::Channel};

#[tokio::test]
async fn register_then_resolve_round_trip() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut inst = instance("prod", "prod-1").at("127.0.0.1:8002");
    inst.metadata.insert("version".into(), "1.4.2".into());
    let reg = register(&mut c, inst, 10_000, 0).await;
    assert_ne!(reg.lease_id, 0);
    assert_eq!(reg.ttl_ms, 10_000);
    assert!(reg.revision > 0);

    let res = resolve(&mut c, "prod").await;
    assert!(res.service_known);
    assert_eq!(res.revision, reg.revision);
    assert_eq!(res.instances.len(), 1);
    let got = &res.instances[0];
    assert_eq!(got.address, "127.0.0.1:8002");
    assert_eq!(got.metadata["version"], "1.4.2");
    assert_eq!(got.weight, 1, "weight 0 is stored as 1");
    assert_eq!(got.lease_id, reg.lease_id);
    assert_eq!(got.revision, reg.revision);
    let server_info = res.server.expect("server info");
    assert_ne!(server_info.epoch, 0);
}

#[tokio::test]
async fn selector_filters_by_metadata() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for (id, zone, version) in [("a", "z1", "1"), ("b", "z2", "1"), ("c", "z1", "2")] {
        let mut inst = instance("prod", id);
        inst.metadata.insert("zone".into(), zone.into());
        inst.metadata.insert("version".into(), version.into());
        register(&mut c, inst, 10_000, 0).await;
    }
    let mut selector = HashMap::new();
    selector.insert("zone".to_string(), "z1".to_string());
    let res = c
        .resolve(ResolveRequest {
            service: "prod".into(),
            selector: selector.clone(),
            include_lease_ttl: true,
            include_not_serving: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&res), ["a", "c"]);
    assert!(res.instances.iter().all(|i| i.lease_remaining_ms > 9_000));
    selector.insert("version".into(), "2".into());
    let res = c
        .resolve(ResolveRequest {
            service: "prod".into(),
            selector,
            include_lease_ttl: false,
            include_not_serving: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&res), ["c"]);
}

#[tokio::test]
async fn reregister_replaces_the_old_entry() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let first = register(&mut c, instance("prod", "p1"), 10_000, 0).await;
    let mut updated = instance("prod", "p1").at("10.0.0.2:81");
    updated.metadata.insert("version".into(), "2".into());
    updated.weight = 5;
    let second = register(&mut c, updated, 10_000, 0).await;
    assert!(second.revision > first.revision);
    assert_ne!(second.lease_id, first.lease_id);

    let res = resolve(&mut c, "prod").await;
    assert_eq!(res.instances.len(), 1, "no duplicate after re-register");
    let got = &res.instances[0];
    assert_eq!(got.address, "10.0.0.2:81");
    assert_eq!(got.weight, 5);
    assert_eq!(got.metadata["version"], "2");
    assert_eq!(got.lease_id, second.lease_id, "moved to the new lease");

    // Revoking the old lease must not take the moved instance with it.
    let out = deregister(&mut c, deregister_lease(first.lease_id)).await;
    assert_eq!(out.removed, 0);
    assert_eq!(resolve(&mut c, "prod").await.instances.len(), 1);
}

#[tokio::test]
async fn many_instances_share_one_lease() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let lease = register(&mut c, instance("api", "a1"), 1_000, 0).await;
    for (svc, id) in [("api", "a2"), ("web", "w1"), ("web", "w2")] {
        let reg = register(
            &mut c,
            instance(svc, id).at("10.0.0.1:81"),
            0,
            lease.lease_id,
        )
        .await;
        assert_eq!(reg.lease_id, lease.lease_id);
        assert_eq!(reg.ttl_ms, 1_000, "attaching keeps the lease's TTL");
    }
    assert_eq!(resolve(&mut c, "api").await.instances.len(), 2);
    assert_eq!(resolve(&mut c, "web").await.instances.len(), 2);

    // One heartbeat keeps all four alive past several TTLs.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.heartbeat(HeartbeatRequest {
            lease_ids: vec![lease.lease_id],
        })
        .await
        .unwrap();
    }
    assert_eq!(resolve(&mut c, "web").await.instances.len(), 2);

    // Revoking the lease removes all of them in one revision.
    let before = resolve(&mut c, "api").await.revision;
    let out = deregister(&mut c, deregister_lease(lease.lease_id)).await;
    assert_eq!(out.removed, 4);
    assert_eq!(out.revision, before + 1);
    assert!(resolve(&mut c, "api").await.instances.is_empty());
    assert!(resolve(&mut c, "web").await.instances.is_empty());
}

#[tokio::test]
async fn heartbeat_keeps_instance_alive_past_several_ttls() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let reg = register(&mut c, instance("prod", "p1"), 300, 0).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hb = c
            .heartbeat(HeartbeatRequest {
                lease_ids: vec![reg.lease_id],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.leases[0].found);
        assert_eq!(hb.leases[0].ttl_ms, 300);
    }
    // 1 s = more than three TTLs later, still there.
    assert_eq!(ids(&resolve(&mut c, "prod").await), ["p1"]);
}

#[tokio::test]
async fn instance_disappears_within_ttl_plus_100ms_after_heartbeats_stop() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let ttl = Duration::from_millis(300);
    register(&mut c, instance("prod", "p1"), 300, 0).await;
    let registered_at = tokio::time::Instant::now();
    let mut seen_gone = None;
    while registered_at.elapsed() < Duration::from_secs(3) {
        if resolve(&mut c, "prod").await.instances.is_empty() {
            seen_gone = Some(registered_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone = seen_gone.expect("instance never expired");
    assert!(
        gone >= ttl - Duration::from_millis(5),
        "expired early: {gone:?}"
    );
    assert!(
        gone <= ttl + Duration::from_millis(100),
        "expired late: {gone:?}"
    );
    // Its lease is gone too: a heartbeat now says NOT_FOUND.
    let status = c
        .heartbeat(HeartbeatRequest { lease_ids: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn heartbeat_of_unknown_lease() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let reg = register(&mut c, instance("prod", "p1"), 10_000, 0).await;
    // Unary with a single unknown lease: NOT_FOUND, so the client re-registers.
    let err = c
        .heartbeat(HeartbeatRequest {
            lease_ids: vec![reg.lease_id + 1_000_000],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("register"), "{}", err.message());
    // A batch reports per lease instead.
    let hb = c
        .heartbeat(HeartbeatRequest {
            lease_ids: vec![reg.lease_id, 42],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.leases.len(), 2);
    assert!(hb.leases[0].found);
    assert!(!hb.leases[1].found);
    assert_eq!(hb.leases[1].lease_id, 42);
}

#[tokio::test]
async fn keepalive_stream_renews_in_batches() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Renewed every 100 ms for 1.2 s, twice the TTL; the TTL leaves 400 ms
    // for a loaded machine between the last renewal and the Resolve.
    let a = register(&mut c, instance("prod", "a"), 500, 0).await;
    let b = register(&mut c, instance("prod", "b").at("10.0.0.1:81"), 500, 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..12 {
        tx.send(HeartbeatRequest {
            lease_ids: vec![a.lease_id, b.lease_id, 7],
        })
        .await
        .unwrap();
        let resp = responses
            .message()
            .await
            .unwrap()
            .expect("one response per request");
        let found: Vec<bool> = resp.leases.iter().map(|l| l.found).collect();
        assert_eq!(found, [true, true, false]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids(&resolve(&mut c, "prod").await), ["a", "b"]);
    drop(tx);
    assert!(
        responses.message().await.unwrap().is_none(),
        "stream ends when the client closes"
    );
}

#[tokio::test]
async fn deregister_by_instance_and_by_lease() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let reg = register(&mut c, instance("prod", "a"), 10_000, 0).await;
    register(
        &mut c,
        instance("prod", "b").at("10.0.0.1:81"),
        0,
        reg.lease_id,
    )
    .await;

    let out = deregister(&mut c, deregister_instance("prod", "a")).await;
    assert_eq!(out.removed, 1);
    assert_eq!(ids(&resolve(&mut c, "prod").await), ["b"]);

    // The lease survives deregistering one of its instances.
    c.heartbeat(HeartbeatRequest {
        lease_ids: vec![reg.lease_id],
    })
    .await
    .unwrap();

    let out = deregister(&mut c, deregister_lease(reg.lease_id)).await;
    assert_eq!(out.removed, 1);
    assert!(resolve(&mut c, "prod").await.instances.is_empty());

    // Unknown targets are NOT_FOUND.
    for target in [
        Target::LeaseId(reg.lease_id),
        Target::Instance(InstanceKey {
            service: "prod".into(),
            id: "a".into(),
        }),
        Target::Instance(InstanceKey {
            service: "nosuch".into(),
            id: "x".into(),
        }),
    ] {
        let err = c
            .deregister(DeregisterRequest {
                target: Some(target.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{target:?}");
    }
    let err = c
        .deregister(DeregisterRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn unknown_service_differs_from_empty_service() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let unknown = resolve(&mut c, "never-registered").await;
    assert!(!unknown.service_known);
    assert!(unknown.instances.is_empty());

    let reg = register(&mut c, instance("prod", "a"), 10_000, 0).await;
    deregister(&mut c, deregister_lease(reg.lease_id)).await;
    let empty = resolve(&mut c, "prod").await;
    assert!(empty.service_known, "known service with zero instances");
    assert!(empty.instances.is_empty());
}

#[tokio::test]
async fn list_services_counts_instances() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert!(
        c.list_services(ListServicesRequest {})
            .await
            .unwrap()
            .into_inner()
            .services
            .is_empty()
    );
    for (svc, id) in [("web", "1"), ("api", "1"), ("api", "2"), ("api", "3")] {
        register(&mut c, instance(svc, id), 10_000, 0).await;
    }
    let gone = register(&mut c, instance("old", "1"), 10_000, 0).await;
    deregister(&mut c, deregister_lease(gone.lease_id)).await;
    let list = c
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, u32)> = list
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.instance_count))
        .collect();
    assert_eq!(got, [("api", 3), ("old", 0), ("web", 1)]);
    assert_eq!(list.revision, 6);
}

#[tokio::test]
async fn revision_increases_on_every_change() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut last = resolve(&mut c, "prod").await.revision;
    fn check(last: &mut u64, rev: u64, what: &str) {
        assert_eq!(rev, *last + 1, "{what} must advance the revision by one");
        *last = rev;
    }
    let a = register(&mut c, instance("prod", "a"), 200, 0).await;
    check(&mut last, a.revision, "register");
    let b = register(&mut c, instance("prod", "b"), 10_000, 0).await;
    check(&mut last, b.revision, "register");
    let replace = register(
        &mut c,
        instance("prod", "b").at("10.0.0.1:99"),
        0,
        b.lease_id,
    )
    .await;
    check(&mut last, replace.revision, "replace");
    assert_eq!(
        resolve(&mut c, "prod").await.revision,
        last,
        "reads change nothing"
    );
    let dereg = deregister(&mut c, deregister_instance("prod", "b")).await;
    check(&mut last, dereg.revision, "deregister");
    // Expiry of lease a is a change too.
    wait_until(Duration::from_secs(2), "expiry of a", || {
        let mut c = c.clone();
        async move { resolve(&mut c, "prod").await.instances.is_empty() }
    })
    .await;
    check(&mut last, resolve(&mut c, "prod").await.revision, "expiry");
}

#[tokio::test]
async fn register_on_unknown_lease_is_not_found_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let err = c
        .register(register_request(instance("prod", "a"), 0, 12345))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let res = resolve(&mut c, "prod").await;
    assert!(!res.service_known);
    assert_eq!(res.revision, 0);
}

#[tokio::test]
async fn status_reports_sizes() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let reg = register(&mut c, instance("prod", "a"), 10_000, 0).await;
    register(&mut c, instance("prod", "b"), 0, reg.lease_id).await;
    register(&mut c, instance("web", "a"), 10_000, 0).await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            st.services,
            st.instances,
            st.leases,
            st.watchers,
            st.revision
        ),
        (2, 3, 2, 0, 3)
    );
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn health_check_answers_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = TestServer::start().await;
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "registry.v1.Registry"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            resp.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn reflection_lists_the_registry_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"registry.v1.Registry"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn graceful_stop_ends_open_streams() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut watch = c
        .watch(registry_api::v1::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("snapshot");
    let stopped = tokio::time::timeout(Duration::from_secs(5), server.stop()).await;
    assert!(
        stopped.is_ok(),
        "shutdown must not wait for open watch streams"
    );
    let end = watch.message().await;
    assert!(
        matches!(&end, Err(s) if s.code() == Code::Unavailable) || matches!(end, Ok(None)),
        "watch ends with UNAVAILABLE: {end:?}"
    );
}
