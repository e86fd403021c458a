//! The operations endpoint end to end: `/metrics` counters and RPC tables
//! move with real gRPC calls, `/readyz` follows warm-up and drain, and a
//! draining registry ends watch streams with UNAVAILABLE.

mod common;

use std::time::Duration;

use common::{
    TestServer,
    api::{deregister, deregister_lease, instance, register, resolve, resolve_request},
    ops::{OpsServer, http_get, metric, rpc, wait_for_metric},
};
use registry::Config;
use registry_api::v1::{HeartbeatRequest, WatchRequest, watch_response::Kind};

/// No warm-up (readiness is tested with one of its own), and a short drain.
fn config() -> Config {
    Config {
        shutdown_grace: Duration::from_millis(500),
        ..TestServer::no_warmup_config()
    }
}

#[tokio::test]
async fn counters_and_rpc_tables_move_with_real_calls() {
    let r = OpsServer::start(config()).await;
    let mut c = r.client().await;

    let mut watch = c
        .watch(WatchRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))));

    let a = register(&mut c, instance("prod", "a"), 30_000, 0).await;
    register(&mut c, instance("prod", "b"), 30_000, 0).await;
    register(&mut c, instance("prod", "short"), 200, 0).await;
    c.heartbeat(HeartbeatRequest {
        lease_ids: vec![a.lease_id],
    })
    .await
    .unwrap();
    let missing = c
        .heartbeat(HeartbeatRequest {
            lease_ids: vec![42],
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    for _ in 0..3 {
        resolve(&mut c, "prod").await;
    }
    let bad = c.resolve(resolve_request("Bad Name")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    deregister(&mut c, deregister_lease(a.lease_id)).await;
    // Three puts and one delete reached the watcher.
    let mut events = 0;
    while events < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("watch events arrive")
            .unwrap()
            .unwrap();
        if let Some(Kind::Events(batch)) = msg.kind {
            events += batch.events.len();
        }
    }

    // The 200 ms lease expires on its own.
    let text = wait_for_metric(r.ops, "registry_lease_expirations_total", 1.0).await;
    for (series, want) in [
        ("registry_registrations_total", 3.0),
        ("registry_deregistrations_total", 1.0),
        ("registry_expired_instances_total", 1.0),
        ("registry_heartbeats_total{result=\"renewed\"}", 1.0),
        ("registry_heartbeats_total{result=\"not_found\"}", 1.0),
        ("registry_instances", 1.0),
        ("registry_leases", 1.0),
        ("registry_services", 1.0),
        ("registry_watchers", 1.0),
        ("registry_ready", 1.0),
        ("registry_expiry_storm", 0.0),
        (&rpc("Register", "OK"), 3.0),
        (&rpc("Heartbeat", "OK"), 1.0),
        (&rpc("Heartbeat", "NOT_FOUND"), 1.0),
        (&rpc("Resolve", "OK"), 3.0),
        (&rpc("Resolve", "INVALID_ARGUMENT"), 1.0),
        (&rpc("Deregister", "OK"), 1.0),
        (
            "registry_rpc_duration_seconds_count{grpc_service=\"registry.v1.Registry\",grpc_method=\"Resolve\"}",
            4.0,
        ),
    ] {
        assert_eq!(metric(&text, series), Some(want), "{series} in\n{text}");
    }
    let sent = metric(&text, "registry_watch_events_sent_total").unwrap();
    assert!(sent >= 5.0, "4 events, then the expiry's delete: {sent}");
    assert!(text.contains("registry_build_info{version=\""), "{text}");
    assert!(text.contains("# TYPE registry_rpc_duration_seconds histogram"));

    // The watch stream, still open, counts once it ends.
    drop(watch);
    let (status, body) = http_get(r.ops, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    wait_for_metric(r.ops, &rpc("Watch", "CANCELLED"), 1.0).await;
}

#[tokio::test]
async fn readiness_follows_warmup_and_drain() {
    let mut r = OpsServer::start(Config {
        warmup: Duration::from_millis(400),
        ..config()
    })
    .await;
    let (status, body) = http_get(r.ops, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("warming up"), "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http_get(r.ops, "/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut c = r.client().await;
    let mut watch = c.watch(WatchRequest::default()).await.unwrap().into_inner();
    watch.message().await.unwrap().unwrap();

    r.stop.take().unwrap().send(()).unwrap();
    // Watchers are told the registry is going away...
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("watch ends on drain");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
    // ...and readiness is off from the moment the drain starts.
    let (status, body) = http_get(r.ops, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("not serving"), "{body}");
    assert!(!r.registry.metrics().serving());
    tokio::time::timeout(Duration::from_secs(5), r.server)
        .await
        .expect("drain completes")
        .unwrap();
    let (_, text) = http_get(r.ops, "/metrics").await;
    assert_eq!(
        metric(&text, &rpc("Watch", "UNAVAILABLE")),
        Some(1.0),
        "{text}"
    );
}
