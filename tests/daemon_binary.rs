//! Launches the real `registry` binary, talks to it over gRPC, and stops it
//! with SIGTERM: flags, the start-up log line, graceful exit code.

mod common;

use std::time::Duration;

use common::{
    api::{InstanceExt, auth_toml, instance, register_request, resolve_request, with_token},
    artifacts::registry_binary,
    binary::BinaryServer,
};
use registry_api::v1::registry_client::RegistryClient;
use tokio::process::Command;

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let mut server = BinaryServer::start(&[
        "--min-ttl",
        "100ms",
        "--max-ttl",
        "30s",
        // The HTTP API and DNS on ephemeral ports: bound and stopped with it.
        "--http-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
    ])
    .await;
    let mut client = RegistryClient::connect(server.url.clone()).await.unwrap();
    let reg = client
        .register(register_request(
            instance("prod", "p1").at("127.0.0.1:8002"),
            200,
            0,
        ))
        .await
        .expect("--min-ttl 100ms allows a 200 ms lease")
        .into_inner();
    assert_ne!(reg.lease_id, 0);
    let err = client
        .register(register_request(
            instance("prod", "p2").at("127.0.0.1:8003"),
            31_000,
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "--max-ttl 30s applies");
    let res = client
        .resolve(resolve_request("prod"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.instances.len(), 1);

    server.signal("-TERM");
    let exit = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn bad_flags_are_usage_errors() {
    for args in [
        &["--min-ttl", "soon"][..],
        &["--listen", "not-an-address"][..],
        &["--min-ttl", "10s", "--max-ttl", "1s"][..],
    ] {
        let out = Command::new(registry_binary().await)
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} explains itself");
    }
}

/// One role that may do everything.
const ALL: &str = "[roles.all]\nadmin = [\"*\"]\n";

#[tokio::test]
async fn sighup_reloads_the_auth_file_without_dropping_connections() {
    use registry_api::v1::{StatusRequest, WatchRequest, watch_response::Kind};

    let path = std::env::temp_dir().join(format!("registry-sighup-{}.toml", std::process::id()));
    std::fs::write(&path, auth_toml(ALL, &[("alice", "token-a", &["all"])])).unwrap();
    let mut server = BinaryServer::start(&[
        "--auth-file",
        path.to_str().unwrap(),
        "--http-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
    ])
    .await;
    let channel = server.channel().await;
    let mut alice = with_token(channel.clone(), Some("token-a"));
    let mut bob = with_token(channel, Some("token-b"));
    alice
        .status(StatusRequest {})
        .await
        .expect("alice is known");
    assert_eq!(
        bob.status(StatusRequest {}).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // A stream opened before the reload...
    let mut watch = alice
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        watch.message().await.unwrap().unwrap().kind,
        Some(Kind::Snapshot(_))
    ));

    std::fs::write(&path, auth_toml(ALL, &[("bob", "token-b", &["all"])])).unwrap();
    server.signal("-HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bob.status(StatusRequest {}).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reload never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        alice.status(StatusRequest {}).await.unwrap_err().code(),
        tonic::Code::Unauthenticated,
        "alice's token was removed"
    );
    // ...is still open and still delivering, over the same connection.
    bob.register(register_request(instance("web", "w1"), 10_000, 0))
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the old stream still delivers")
        .unwrap()
        .unwrap();
    assert!(matches!(msg.kind, Some(Kind::Events(_))));

    // A broken file keeps the previous policy.
    std::fs::write(&path, "this is not toml [").unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.status(StatusRequest {})
        .await
        .expect("previous policy kept");
    server.kill9().await;
    let _ = std::fs::remove_file(&path);
}
