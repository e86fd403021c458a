//! The operations endpoint end to end: `/metrics` counters and RPC tables
//! move with real gRPC calls, `/readyz` follows warm-up and drain, and a
//! draining registry ends watch streams with UNAVAILABLE.

use std::{net::SocketAddr, time::Duration};

use registry::{Config, Registry};
use registry_api::v1::{
    DeregisterRequest, HeartbeatRequest, Instance, RegisterRequest, ResolveRequest, WatchRequest,
    deregister_request::Target, registry_client::RegistryClient, watch_response::Kind,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::transport::Channel;

/// A registry served in-process with its operations endpoint.
struct Running {
    registry: Registry,
    grpc: SocketAddr,
    ops: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

async fn start(config: Config) -> Running {
    let registry = Registry::new(config);
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = grpc_listener.local_addr().unwrap();
    let ops = ops_listener.local_addr().unwrap();
    // The ops endpoint outlives the gRPC server here, so the test can watch
    // readiness through the drain; it ends with the test's runtime.
    tokio::spawn(registry::ops::serve(
        ops_listener,
        registry.clone(),
        std::future::pending(),
    ));
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let registry = registry.clone();
        async move {
            registry::server::serve(grpc_listener, registry, async {
                let _ = rx.await;
            })
            .await
            .expect("registry server");
        }
    });
    Running {
        registry,
        grpc,
        ops,
        stop: Some(tx),
        server,
    }
}

impl Running {
    async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}

/// `GET path` over plain HTTP/1.1: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
        .await
        .expect("ops endpoint answers within 5 s")
        .unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Value of one exact series (name with labels) in an exposition.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn rpc(method: &str, code: &str) -> String {
    format!(
        "registry_rpc_requests_total{{grpc_service=\"registry.v1.Registry\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

async fn wait_for_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = http_get(addr, "/metrics").await;
        if value(&text, series) == Some(want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn register(id: &str, ttl_ms: u64) -> RegisterRequest {
    RegisterRequest {
        instance: Some(Instance {
            service: "prod".into(),
            id: id.into(),
            address: "127.0.0.1:8002".into(),
            ..Default::default()
        }),
        ttl_ms,
        lease_id: 0,
    }
}

fn config() -> Config {
    Config {
        min_ttl: Duration::from_millis(100),
        warmup: Duration::ZERO,
        shutdown_grace: Duration::from_millis(500),
        ..Config::default()
    }
}

#[tokio::test]
async fn counters_and_rpc_tables_move_with_real_calls() {
    let r = start(config()).await;
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

    let a = c
        .register(register("a", 30_000))
        .await
        .unwrap()
        .into_inner();
    c.register(register("b", 30_000)).await.unwrap();
    c.register(register("short", 200)).await.unwrap();
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
        c.resolve(ResolveRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let bad = c
        .resolve(ResolveRequest {
            service: "Bad Name".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    c.deregister(DeregisterRequest {
        target: Some(Target::LeaseId(a.lease_id)),
    })
    .await
    .unwrap();
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
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    let sent = value(&text, "registry_watch_events_sent_total").unwrap();
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
    let mut r = start(Config {
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
        value(&text, &rpc("Watch", "UNAVAILABLE")),
        Some(1.0),
        "{text}"
    );
}
