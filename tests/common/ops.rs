//! The operations endpoint (`/metrics`, `/healthz`, `/readyz`): a registry
//! served in this process with one, and reading one (also the real
//! binary's `--metrics-listen`).

use std::{net::SocketAddr, time::Duration};

use registry::{Config, Registry};
use registry_api::v1::registry_client::RegistryClient;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A registry served on the test's runtime with its operations endpoint.
/// The endpoint outlives the gRPC server (it ends with the test's
/// runtime), so a test can watch readiness through a drain.
pub struct OpsServer {
    /// The registry, for what only its handle shows.
    pub registry: Registry,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// Operations endpoint address.
    pub ops: SocketAddr,
    /// Sending (or dropping) it starts the gRPC server's drain.
    pub stop: Option<oneshot::Sender<()>>,
    /// The gRPC server task; it ends when the drain is complete.
    pub server: JoinHandle<()>,
}

impl OpsServer {
    /// Starts on free loopback ports.
    pub async fn start(config: Config) -> Self {
        let registry = Registry::new(config);
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap();
        let ops = ops_listener.local_addr().unwrap();
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
        Self {
            registry,
            grpc,
            ops,
            stop: Some(tx),
            server,
        }
    }

    /// A raw gRPC client.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }
}

/// `GET path` on an operations endpoint: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let answer = super::http::get(addr, path).await;
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// The `/metrics` exposition.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// Value of one exact series (name with labels) in an exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The `registry_rpc_requests_total` series of a method and status code.
pub fn rpc(method: &str, code: &str) -> String {
    format!(
        "registry_rpc_requests_total{{grpc_service=\"registry.v1.Registry\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

/// Scrapes until `series` has the value `want` (at most 5 s); the last
/// exposition.
pub async fn wait_for_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(addr).await;
        if metric(&text, series) == Some(want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
