//! An in-process ProdService for the client tests: each instance serves on
//! its own loopback port and its own small tokio runtime, so `kill()` can
//! emulate a crash (every task and socket of the instance, including its
//! keepalive, vanishes at once, with no goodbye to the registry).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use registry_api::prod::{
    ProductRequest, ProductResponse,
    prod_service_client::ProdServiceClient,
    prod_service_server::{ProdService, ProdServiceServer},
};
use registry_client::{Instance, Registration, RegistryClient};
use tokio::{net::TcpListener, runtime::Runtime};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;

/// Answers GetProductStock with a stock figure derived from the id, plus
/// who answered.
#[derive(Debug, Clone)]
pub struct StockService {
    pub instance_id: String,
    pub calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl ProdService for StockService {
    async fn get_product_stock(
        &self,
        request: tonic::Request<ProductRequest>,
    ) -> Result<tonic::Response<ProductResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let id = request.into_inner().prod_id;
        Ok(tonic::Response::new(ProductResponse {
            prod_stock: id.wrapping_mul(7) % 1000,
            instance_id: self.instance_id.clone(),
        }))
    }
}

/// One running ProdService instance, registered in the registry.
pub struct ProdInstance {
    pub id: String,
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    registration: Option<Registration>,
    runtime: Option<Runtime>,
}

impl ProdInstance {
    /// Serves ProdService on a free port and registers it as `prod` with
    /// the given id and TTL, through its own `RegistryClient` living in the
    /// instance's runtime.
    pub async fn start(registry_url: &str, id: &str, ttl: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("instance runtime");
        let calls = Arc::new(AtomicUsize::new(0));
        let service = StockService {
            instance_id: id.to_owned(),
            calls: calls.clone(),
        };
        let (url, id_owned) = (registry_url.to_owned(), id.to_owned());
        let (addr, registration) = runtime
            .spawn(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(ProdServiceServer::new(service))
                        .serve_with_incoming(TcpListenerStream::new(listener)),
                );
                let client = RegistryClient::connect(&url)
                    .await
                    .expect("connect registry");
                let registration = client
                    .register(
                        Instance::new("prod", addr.to_string())
                            .with_id(id_owned)
                            .with_metadata("version", "test"),
                    )
                    .ttl(ttl)
                    .await
                    .expect("register prod instance");
                (addr, registration)
            })
            .await
            .expect("instance start task");
        Self {
            id: id.to_owned(),
            addr,
            calls,
            registration: Some(registration),
            runtime: Some(runtime),
        }
    }

    /// The live registration (state, instance).
    pub fn registration(&self) -> &Registration {
        self.registration.as_ref().expect("still registered")
    }

    /// Graceful deregistration; the server keeps serving.
    pub async fn deregister(&mut self) {
        self.registration
            .take()
            .expect("registered")
            .deregister()
            .await
            .expect("deregister");
    }

    /// Crash: the runtime and everything on it (server, connections,
    /// keepalive task) stop at once; nothing tells the registry.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // Its keepalive task is gone, so this cannot deregister any more.
        drop(self.registration.take());
    }
}

impl Drop for ProdInstance {
    fn drop(&mut self) {
        drop(self.registration.take());
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime blocks, which is not allowed inside the
            // test's own runtime.
            rt.shutdown_background();
        }
    }
}

/// Makes `n` GetProductStock(233) calls (one second deadline each) and
/// counts the answers per instance id; failed calls count under `"<error>"`.
pub async fn call_many(channel: &Channel, n: usize) -> HashMap<String, usize> {
    let mut client = ProdServiceClient::new(channel.clone());
    let mut seen = HashMap::new();
    for _ in 0..n {
        let call = client.get_product_stock(ProductRequest { prod_id: 233 });
        let who = match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                assert_eq!(resp.prod_stock, 233 * 7 % 1000);
                resp.instance_id
            }
            _ => "<error>".to_owned(),
        };
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}
