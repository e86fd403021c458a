//! Runs the real `regctl` binary against a real registry: every command in
//! table and json form, exit codes 0/1/2/3, the unreachable-registry message,
//! `register` holding an instance past its TTL until SIGINT, and `watch -o
//! json` emitting parseable PUT and DELETE lines.

use std::{process::Stdio, time::Duration};

use registry::Config;
use registry_api::v1::{
    Instance, RegisterRequest, RegisterResponse, ResolveRequest, registry_client::RegistryClient,
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::Command,
    sync::oneshot,
};
use tonic::transport::Channel;

struct Server {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let config = Config {
        min_ttl: Duration::from_millis(100),
        ..Config::default()
    };
    tokio::spawn(registry::server::run(listener, config, async {
        let _ = rx.await;
    }));
    Server { url, _stop: tx }
}

async fn client(s: &Server) -> RegistryClient<Channel> {
    RegistryClient::connect(s.url.clone()).await.unwrap()
}

async fn register(
    c: &mut RegistryClient<Channel>,
    service: &str,
    id: &str,
    meta: &[(&str, &str)],
) -> RegisterResponse {
    c.register(RegisterRequest {
        instance: Some(Instance {
            service: service.into(),
            id: id.into(),
            address: format!("10.0.0.1:{}", 8000 + id.len()),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        ttl_ms: 30_000,
        lease_id: 0,
    })
    .await
    .unwrap()
    .into_inner()
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn regctl(s: &Server, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .arg("--registry")
        .arg(&s.url)
        .args(args)
        .env_remove("REGISTRY_ADDR")
        .output()
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn sigint(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn resolve_table_json_and_exit_codes() {
    let s = server().await;
    let mut c = client(&s).await;
    register(
        &mut c,
        "prod",
        "prod-1",
        &[("version", "1.4.2"), ("zone", "eu-1")],
    )
    .await;
    register(&mut c, "prod", "prod-22", &[("version", "2.0")]).await;

    let out = regctl(&s, &["resolve", "prod"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(lines[0].starts_with("ID"));
    for h in ["ADDRESS", "WEIGHT", "TTL", "METADATA"] {
        assert!(lines[0].contains(h));
    }
    // Columns line up: every row's address starts where the header's does.
    let col = lines[0].find("ADDRESS").unwrap();
    assert_eq!(&lines[1][col..col + 9], "10.0.0.1:");
    assert_eq!(&lines[2][col..col + 9], "10.0.0.1:");
    assert!(lines[1].contains("version=1.4.2,zone=eu-1"));
    assert!(
        lines.iter().all(|l| l.len() <= 80),
        "fits 80 columns:\n{}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "nothing on stderr: {}", out.stderr);

    let out = regctl(
        &s,
        &["resolve", "prod", "--selector", "version=2.0", "-o", "json"],
    )
    .await;
    assert_eq!(out.code, 0);
    let v = &json_lines(&out.stdout)[0];
    assert_eq!(v["service"], "prod");
    assert_eq!(v["known"], true);
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
    assert_eq!(v["instances"][0]["id"], "prod-22");
    assert_eq!(v["instances"][0]["metadata"]["version"], "2.0");
    assert!(v["instances"][0]["lease_ttl_ms"].as_u64().unwrap() > 29_000);

    // Unknown service: exit 3, for scripts.
    let out = regctl(&s, &["resolve", "nosuch"]).await;
    assert_eq!(out.code, 3);
    assert!(out.stdout.is_empty());
    assert_eq!(out.stderr.trim(), "regctl: unknown service \"nosuch\"");
    let out = regctl(&s, &["resolve", "nosuch", "-o", "json"]).await;
    assert_eq!(out.code, 3);
    assert_eq!(json_lines(&out.stdout)[0]["known"], false);

    // Known but empty: an empty table and exit 0.
    let reg = register(&mut c, "empty", "e", &[]).await;
    c.deregister(registry_api::v1::DeregisterRequest {
        target: Some(registry_api::v1::deregister_request::Target::LeaseId(
            reg.lease_id,
        )),
    })
    .await
    .unwrap();
    let out = regctl(&s, &["resolve", "empty"]).await;
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.lines().count(), 1, "header only: {}", out.stdout);

    // The server's refusal passes through, one line, exit 1.
    let out = regctl(&s, &["resolve", "Prod"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with("regctl: invalid service name \"Prod\": "),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1);
}

#[tokio::test]
async fn list_status_and_deregister() {
    let s = server().await;
    let mut c = client(&s).await;
    register(&mut c, "web", "w1", &[]).await;
    let api = register(&mut c, "api", "a1", &[]).await;
    register(&mut c, "api", "a2", &[]).await;

    let out = regctl(&s, &["list"]).await;
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, "SERVICE  INSTANCES\napi      2\nweb      1\n");
    let out = regctl(&s, &["list", "-o", "json"]).await;
    let v = json_lines(&out.stdout);
    assert_eq!(v.len(), 2);
    assert_eq!(
        (v[0]["service"].as_str(), v[0]["instances"].as_u64()),
        (Some("api"), Some(2))
    );

    let out = regctl(&s, &["status"]).await;
    assert_eq!(out.code, 0);
    for needle in [
        "registry",
        "SERVING",
        "version",
        "uptime",
        "services   2",
        "instances  3",
        "leases     3",
        "watchers   0",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in\n{}", out.stdout);
    }
    let out = regctl(&s, &["status", "-o", "json"]).await;
    let v = &json_lines(&out.stdout)[0];
    assert_eq!(v["health"], "SERVING");
    assert_eq!(v["instances"], 3);
    assert_eq!(v["services"], 2);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    let out = regctl(&s, &["deregister", "api", "a2"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("deregistered api/a2"));
    let lease = api.lease_id.to_string();
    let out = regctl(&s, &["deregister", "--lease", &lease, "-o", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(json_lines(&out.stdout)[0]["removed"], 1);
    let out = regctl(&s, &["deregister", "--lease", &lease]).await;
    assert_eq!(out.code, 1, "unknown lease is an error");
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let out = regctl(&s, &["list"]).await;
    assert_eq!(out.stdout, "SERVICE  INSTANCES\napi      0\nweb      1\n");
}

#[tokio::test]
async fn usage_errors_exit_2_and_unreachable_registry_exits_1() {
    let s = server().await;
    for args in [
        &["frobnicate"][..],
        &["deregister"][..],
        &["register", "web"][..],
        &["resolve", "x", "--selector", "novalue"][..],
        &["-o", "yaml", "list"][..],
    ] {
        let out = regctl(&s, args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    }
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let out = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--registry", &addr, "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("regctl: cannot reach registry at {addr}: connection refused")
    );
}

#[tokio::test]
async fn registry_addr_comes_from_the_environment() {
    let s = server().await;
    let out = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["list", "-o", "json"])
        .env("REGISTRY_ADDR", &s.url)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn register_holds_the_instance_past_its_ttl_until_sigint() {
    let s = server().await;
    let mut c = client(&s).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args([
            "--registry",
            &s.url,
            "register",
            "web",
            "10.0.0.5:80",
            "--id",
            "w1",
            "--ttl",
            "300ms",
            "--meta",
            "zone=z1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("register prints a line")
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with("registered web/w1 at 10.0.0.5:80"),
        "{first}"
    );

    let resolve = |mut c: RegistryClient<Channel>| async move {
        c.resolve(ResolveRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances
    };
    // Alive for more than three TTLs.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = resolve(c.clone()).await;
        assert_eq!(got.len(), 1, "still registered");
        assert_eq!(got[0].metadata["zone"], "z1");
    }
    sigint(child.id().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let rest = lines.next_line().await.unwrap().unwrap_or_default();
    assert_eq!(rest, "deregistered web/w1");
    // Gone immediately, not after a TTL.
    assert!(resolve(c.clone()).await.is_empty());
    let _ = &mut c;
}

#[tokio::test]
async fn watch_json_emits_parseable_put_and_delete_lines() {
    let s = server().await;
    let mut c = client(&s).await;
    register(&mut c, "prod", "p1", &[]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--registry", &s.url, "watch", "prod", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a watch line within 10 s")
            .unwrap()
            .expect("watch output ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    };
    let snap = next().await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["instances"][0]["id"], "p1");
    register(&mut c, "prod", "p2", &[]).await;
    register(&mut c, "other", "x", &[]).await;
    c.deregister(registry_api::v1::DeregisterRequest {
        target: Some(registry_api::v1::deregister_request::Target::Instance(
            registry_api::v1::InstanceKey {
                service: "prod".into(),
                id: "p1".into(),
            },
        )),
    })
    .await
    .unwrap();
    let put = next().await;
    assert_eq!(put["type"], "put");
    assert_eq!(put["instance"]["id"], "p2");
    let del = next().await;
    assert_eq!(del["type"], "delete");
    assert_eq!(del["reason"], "deregistered");
    assert_eq!(del["instance"]["id"], "p1");
    assert!(del["revision"].as_u64().unwrap() > put["revision"].as_u64().unwrap());
    sigint(child.id().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn watch_table_prints_snapshot_then_events() {
    let s = server().await;
    let mut c = client(&s).await;
    register(&mut c, "prod", "p1", &[("v", "1")]).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--registry", &s.url, "watch", "prod"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut read = Vec::new();
    while read.len() < 3 {
        if read.len() == 2 {
            // The snapshot is out; now a change.
            register(&mut c, "prod", "p2", &[]).await;
        }
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        read.push(line);
    }
    assert!(
        read[0].starts_with("SNAPSHOT rev 1 1 instance(s)"),
        "{read:?}"
    );
    assert!(
        read[1].contains("prod/p1") && read[1].contains("v=1"),
        "{read:?}"
    );
    assert!(read[2].starts_with("PUT    rev 2 prod/p2"), "{read:?}");
    sigint(child.id().unwrap());
    let _ = child.wait().await;
}

#[tokio::test]
async fn completions_for_each_shell() {
    let s = server().await;
    for shell in ["bash", "zsh", "fish"] {
        let out = regctl(&s, &["completions", shell]).await;
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("regctl"), "{shell}");
        assert!(out.stdout.contains("resolve"), "{shell}");
    }
}

#[tokio::test]
async fn token_flag_and_env_authenticate() {
    let path = std::env::temp_dir().join(format!("regctl-auth-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "[roles.ops]\nadmin = [\"*\"]\n[[tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nroles = [\"ops\"]\n",
            registry::auth::hash_token("s3cret")
        ),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, rx) = oneshot::channel::<()>();
    tokio::spawn(registry::server::run(
        listener,
        Config {
            auth_file: Some(path.clone()),
            ..Config::default()
        },
        async {
            let _ = rx.await;
        },
    ));
    let s = Server { url, _stop };
    let out = regctl(&s, &["list"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with("regctl: missing credentials"),
        "{}",
        out.stderr
    );
    let out = regctl(&s, &["--token", "nope", "list"]).await;
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.trim(), "regctl: unknown token");
    let out = regctl(&s, &["--token", "s3cret", "status", "-o", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let env = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--registry", &s.url, "list"])
        .env("REGISTRY_TOKEN", "s3cret")
        .output()
        .await
        .unwrap();
    assert_eq!(env.status.code(), Some(0));
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn register_json_reports_the_real_deregistration_when_stopped() {
    let s = server().await;
    let mut c = client(&s).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args([
            "--registry",
            &s.url,
            "register",
            "web",
            "10.0.0.5:80",
            "--id",
            "w1",
            "--ttl",
            "5s",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("output ended");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    };
    let registered = next().await;
    assert_eq!(registered["registered"], true);
    assert_eq!(registered["id"], "w1");
    // Other changes move the revision on, so the deregistration's own
    // revision is distinguishable from any constant.
    register(&mut c, "other", "o1", &[]).await;
    let before = c
        .resolve(ResolveRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.instances.len(), 1);

    sigint(child.id().unwrap());
    let stopped = next().await;
    assert_eq!(stopped["deregistered"], "web/w1");
    assert_eq!(stopped["removed"], 1, "{stopped}");
    let revision = stopped["revision"].as_u64().unwrap();
    assert!(
        revision > before.revision,
        "{stopped} after {}",
        before.revision
    );
    let after = c
        .resolve(ResolveRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(after.instances.is_empty());
    assert_eq!(after.revision, revision, "the removal is the latest change");
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
}

/// `register --check` registers the check (defaults filled by the
/// registry); the check flags need `--check`.
#[tokio::test]
async fn register_with_a_check() {
    let s = server().await;
    let c = client(&s).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--registry", &s.url, "register", "chk", &addr, "--id", "c1"])
        .args(["--check", "tcp", "--check-interval", "2s"])
        .args(["--failures-before-critical", "2", "--initially-passing"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("register prints a line")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("registered chk/c1"), "{first}");
    let got = c
        .clone()
        .resolve(ResolveRequest {
            service: "chk".into(),
            include_not_serving: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(got.len(), 1);
    let check = got[0].check.as_deref().expect("registered with its check");
    assert!(matches!(
        check.kind,
        Some(registry_api::v1::health_check::Kind::Tcp(_))
    ));
    assert_eq!(check.interval_ms, 2_000);
    assert_eq!(check.timeout_ms, 2_000, "default: the interval, at most 5s");
    assert_eq!(check.failures_before_critical, 2);
    assert_eq!(check.successes_before_passing, 1);
    assert_eq!(
        got[0].health,
        registry_api::v1::HealthState::Passing as i32,
        "--initially-passing"
    );
    sigint(child.id().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let out = regctl(&s, &["register", "chk", &addr, "--check-interval", "2s"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--check"), "{}", out.stderr);
    let out = regctl(&s, &["register", "chk", &addr, "--check", "udp"]).await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("expected grpc, grpc:SERVICE, http:/PATH or tcp"),
        "{}",
        out.stderr
    );
    drop(listener);
}
