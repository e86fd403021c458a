//! Launches the real `registry` binary, talks to it over gRPC, and stops it
//! with SIGTERM: flags, the start-up log line, graceful exit code.

use std::{process::Stdio, time::Duration};

use registry_api::v1::{
    Instance, RegisterRequest, ResolveRequest, registry_client::RegistryClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Starts the daemon on a free port; returns it and the address it logged.
async fn start(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry"))
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn registry binary");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("registry listening")
                && let Some(rest) = line.split("addr=").nth(1)
            {
                return rest.split_whitespace().next().unwrap().to_string();
            }
        }
        panic!("registry exited without logging its address");
    })
    .await
    .expect("registry logs its address at start");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let (mut child, addr) = start(&["--min-ttl", "100ms", "--max-ttl", "30s"]).await;
    let mut client = RegistryClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let reg = client
        .register(RegisterRequest {
            instance: Some(Instance {
                service: "prod".into(),
                id: "p1".into(),
                address: "127.0.0.1:8002".into(),
                ..Default::default()
            }),
            ttl_ms: 200,
            lease_id: 0,
        })
        .await
        .expect("--min-ttl 100ms allows a 200 ms lease")
        .into_inner();
    assert_ne!(reg.lease_id, 0);
    let err = client
        .register(RegisterRequest {
            instance: Some(Instance {
                service: "prod".into(),
                id: "p2".into(),
                address: "127.0.0.1:8003".into(),
                ..Default::default()
            }),
            ttl_ms: 31_000,
            lease_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "--max-ttl 30s applies");
    let res = client
        .resolve(ResolveRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.instances.len(), 1);

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn bad_flags_are_usage_errors() {
    for args in [
        &["--min-ttl", "soon"][..],
        &["--listen", "not-an-address"][..],
        &["--min-ttl", "10s", "--max-ttl", "1s"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_registry"))
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} explains itself");
    }
}
