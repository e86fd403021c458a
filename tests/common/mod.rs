//! Shared by the end-to-end tests: start a real registry on an ephemeral
//! loopback port (in this process, or the real binary), connect raw
//! clients, build and send requests ([`api`]), read the operations
//! endpoint ([`ops`]), stop it.

#![allow(dead_code, unreachable_pub)]

pub mod api;
pub mod artifacts;
pub mod binary;
// Real-process clusters and a TCP proxy for the fault tests (issue 15).
pub mod cluster;
pub mod etcd;
pub mod history;
pub mod hostile;
pub mod http;
pub mod ops;
pub mod otlp;
pub mod prod;
pub mod proxy;
pub mod python;

use std::{net::SocketAddr, time::Duration};

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
    served: OwnRuntime,
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

    /// [`TestServer::test_config`] without warm-up: absence is answered at
    /// once, and readiness does not wait.
    pub fn no_warmup_config() -> Config {
        Config {
            warmup: Duration::ZERO,
            ..Self::test_config()
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
        let served = OwnRuntime::spawn(|stop| async move {
            let listener = TcpListener::from_std(listener).unwrap();
            registry::server::run(listener, config, async {
                let _ = stop.await;
            })
            .await
            .expect("registry server failed");
        });
        Self {
            addr,
            url: format!("http://{addr}"),
            served,
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
        self.served.stop().await;
    }

    /// Stops abruptly, as a crash would: the server's runtime is shut down,
    /// so its tasks and connections vanish without a goodbye.
    pub async fn kill(mut self) {
        self.served.kill();
        // Give the OS a moment to close the sockets before a restart binds.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server task on a tokio runtime of its own (two workers): stopping the
/// runtime ends every task and socket of the server at once. Shut down
/// when dropped.
pub struct OwnRuntime {
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OwnRuntime {
    /// Runs `serve(stop)` on a new runtime; `stop` resolves when
    /// [`OwnRuntime::stop`] asks for a graceful stop.
    pub fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = runtime.spawn(serve(rx));
        Self {
            shutdown: Some(tx),
            handle: Some(handle),
            runtime: Some(runtime),
        }
    }

    /// Graceful stop; returns once the server task has finished.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("registry did not shut down within 10s")
                .expect("registry task panicked");
        }
        self.kill();
    }

    /// Shuts the runtime down at once: a crash.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.handle.take();
        self.shutdown.take();
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        self.kill();
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

/// Polls `cond` every `every` until it is true: how long that took, or
/// `None` once `limit` has passed.
pub async fn poll_until<F, Fut>(limit: Duration, every: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if cond().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits for `cond` to become true, polling every 10 ms, failing after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if poll_until(limit, Duration::from_millis(10), cond)
        .await
        .is_none()
    {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}
