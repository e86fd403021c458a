//! Shared by the end-to-end tests: start a real registry on an ephemeral
//! loopback port, connect raw clients, stop it.

#![allow(dead_code, unreachable_pub)]

pub mod binary;
pub mod etcd;
pub mod history;
pub mod hostile;
pub mod http;
pub mod otlp;
pub mod prod;
pub mod python;

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use registry::Config;
use registry_api::v1::registry_client::RegistryClient;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A registry running in this process, stopped on `stop()` or drop. It runs
/// on a runtime of its own, so `kill()` takes down every task and socket of
/// it at once, connections included, the way a crash would.
pub struct TestServer {
    /// Bound address (127.0.0.1:port).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`, what clients dial.
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// Default config, but TTLs down to 100 ms so expiry tests stay short.
    pub fn test_config() -> Config {
        Config {
            min_ttl: Duration::from_millis(100),
            // Every test client shares 127.0.0.1: the per-identity rate limit
            // would be per test, not per client. Tests of it set it themselves.
            rate_limit: 0,
            ..Config::default()
        }
    }

    /// Starts with [`TestServer::test_config`].
    pub async fn start() -> Self {
        Self::start_with(Self::test_config()).await
    }

    /// Starts with the given config on a free port.
    pub async fn start_with(config: Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    /// Starts on a given address (used to restart on the same port).
    pub async fn start_on(addr: SocketAddr, config: Config) -> Self {
        let listener = bind_retrying(addr).await.into_std().unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            registry::server::run(listener, config, async {
                let _ = rx.await;
            })
            .await
            .expect("registry server failed");
        });
        Self {
            addr,
            url: format!("http://{addr}"),
            shutdown: Some(tx),
            handle: Some(handle),
            runtime: Some(runtime),
        }
    }

    /// A raw generated client connected to this server.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(self.url.clone())
            .await
            .expect("connect to test registry")
    }

    /// Graceful stop; returns once the server task has finished.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("registry did not shut down within 10s")
                .expect("registry task panicked");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Stops abruptly, as a crash would: the server's runtime is shut down,
    /// so its tasks and connections vanish without a goodbye.
    pub async fn kill(mut self) {
        self.shutdown.take();
        self.handle.take();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // Give the OS a moment to close the sockets before a restart binds.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Binding the same port right after a stop can race the old socket's close.
async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot bind {addr}: {last:?}");
}

/// Waits for `cond` to become true, polling every 10 ms, failing after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// Real-process clusters and a TCP proxy for the fault tests (issue 15).
pub mod cluster;
pub mod proxy;
/// Builds (if needed) and returns the path of a binary or example of the
/// workspace that is not part of the test's own package, e.g.
/// `built_artifact("registry", "bin", "registry")`.
///
/// `env!("CARGO_BIN_EXE_*")` exists only for the `[[bin]]` targets of the
/// test's own package, and `cargo test --test x` does not build examples at
/// all. So this asks cargo itself: `cargo build --message-format=json`
/// (the same cargo, via `env!("CARGO")`, and the same target directory, so
/// it is a no-op when the artifact is fresh) and takes the path from the
/// `executable` field cargo reports. That is exact whatever
/// `CARGO_TARGET_DIR`, profile or target triple is in use, unlike guessing
/// paths from the test binary's location. Blocking: call it from
/// `spawn_blocking` in async tests.
pub fn built_artifact(package: &str, kind: &str, name: &str) -> PathBuf {
    let target = match kind {
        "example" => "--examples".to_owned(),
        "bin" => format!("--bin={name}"),
        other => panic!("unsupported artifact kind {other}"),
    };
    let mut cargo = std::process::Command::new(env!("CARGO"));
    // The variables cargo set for this test (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...) must not reach the nested cargo: build
    // scripts such as ring's declare `rerun-if-env-changed` on them, so
    // inheriting them would rebuild half the dependency tree here and again
    // in the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_CRATE_")
            || name.starts_with("CARGO_BIN_")
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR"
            || name == "OUT_DIR"
        {
            cargo.env_remove(&*name);
        }
    }
    let output = cargo
        .args(["build", "--quiet", "--package", package, &target])
        .arg("--message-format=json")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build {package} {target} failed"
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let name_field = format!("\"name\":\"{name}\"");
    let kind_field = format!("\"kind\":[\"{kind}\"]");
    for line in stdout.lines() {
        if line.contains("\"reason\":\"compiler-artifact\"")
            && line.contains(&kind_field)
            && line.contains(&name_field)
            && let Some(start) = line.find("\"executable\":\"")
        {
            let rest = &line[start + "\"executable\":\"".len()..];
            let path = PathBuf::from(&rest[..rest.find('"').unwrap()]);
            assert!(path.exists(), "{path:?}");
            return path;
        }
    }
    panic!("cargo reported no executable for {kind} {name} of {package}");
}
