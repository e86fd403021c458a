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
        // The HTTP API and DNS on ephemeral ports: bound and stopped with it.
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--dns-listen", "127.0.0.1:0"])
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

/// Bearer-token interceptor for the raw client.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn auth_toml(tokens: &[(&str, &str)]) -> String {
    let mut s = String::from("[roles.all]\nadmin = [\"*\"]\n");
    for (name, token) in tokens {
        s.push_str(&format!(
            "\n[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"all\"]\n",
            registry::auth::hash_token(token)
        ));
    }
    s
}

#[tokio::test]
async fn sighup_reloads_the_auth_file_without_dropping_connections() {
    use registry_api::v1::{StatusRequest, WatchRequest, watch_response::Kind};
    use tonic::service::interceptor::InterceptedService;

    let path = std::env::temp_dir().join(format!("registry-sighup-{}.toml", std::process::id()));
    std::fs::write(&path, auth_toml(&[("alice", "token-a")])).unwrap();
    let (mut child, addr) = start(&["--auth-file", path.to_str().unwrap()]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: &str| {
        RegistryClient::new(InterceptedService::new(
            channel.clone(),
            Bearer(format!("Bearer {token}").parse().unwrap()),
        ))
    };
    let mut alice = with("token-a");
    let mut bob = with("token-b");
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

    std::fs::write(&path, auth_toml(&[("bob", "token-b")])).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
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
    bob.register(RegisterRequest {
        instance: Some(Instance {
            service: "web".into(),
            id: "w1".into(),
            address: "10.0.0.1:80".into(),
            ..Default::default()
        }),
        ttl_ms: 10_000,
        lease_id: 0,
    })
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
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.status(StatusRequest {})
        .await
        .expect("previous policy kept");
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&path);
}
