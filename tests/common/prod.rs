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
use registry_client::{BalancedChannel, Instance, Registration, RegistryClient};
use tokio::{net::TcpListener, runtime::Runtime};
use tokio_stream::wrappers::TcpListenerStream;

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

/// How to start a [`ProdInstance`].
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: String,
    pub ttl: Duration,
    pub zone: Option<String>,
    pub weight: u32,
    /// Serve on this address (e.g. where a killed instance was).
    pub addr: Option<SocketAddr>,
}

impl Spec {
    pub fn new(id: &str, ttl: Duration) -> Self {
        Self {
            id: id.to_owned(),
            ttl,
            zone: None,
            weight: 1,
            addr: None,
        }
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_owned());
        self
    }

    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
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
        Self::start_with(registry_url, Spec::new(id, ttl)).await
    }

    /// [`ProdInstance::start`] with a zone, a weight or a fixed address.
    pub async fn start_with(registry_url: &str, spec: Spec) -> Self {
        let runtime = instance_runtime();
        let calls = Arc::new(AtomicUsize::new(0));
        let service = StockService {
            instance_id: spec.id.clone(),
            calls: calls.clone(),
        };
        let url = registry_url.to_owned();
        let id = spec.id.clone();
        let (addr, registration) = runtime
            .spawn(async move {
                let addr = serve(service, spec.addr).await;
                let client = RegistryClient::connect(&url)
                    .await
                    .expect("connect registry");
                let mut instance = Instance::new("prod", addr.to_string())
                    .with_id(spec.id)
                    .with_metadata("version", "test")
                    .with_weight(spec.weight);
                if let Some(zone) = spec.zone {
                    instance = instance.with_zone(zone);
                }
                let registration = client
                    .register(instance)
                    .ttl(spec.ttl)
                    .await
                    .expect("register prod instance");
                (addr, registration)
            })
            .await
            .expect("instance start task");
        Self {
            id,
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

fn instance_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("instance runtime")
}

/// Serves `service` on `addr` (or a free port); returns the address.
async fn serve(service: StockService, addr: Option<SocketAddr>) -> SocketAddr {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    let mut tries = 0;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            // The port of a just-killed instance may take a moment.
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    };
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProdServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// A ProdService answering as `id` on `addr`, not registered anywhere:
/// "the address answers again" after a crash, while the registry still
/// holds the old instance under its unexpired lease.
pub struct BareServer {
    pub calls: Arc<AtomicUsize>,
    runtime: Option<Runtime>,
}

impl BareServer {
    pub async fn start(addr: SocketAddr, id: &str) -> Self {
        let runtime = instance_runtime();
        let calls = Arc::new(AtomicUsize::new(0));
        let service = StockService {
            instance_id: id.to_owned(),
            calls: calls.clone(),
        };
        runtime
            .spawn(async move { serve(service, Some(addr)).await })
            .await
            .expect("bare server start");
        Self {
            calls,
            runtime: Some(runtime),
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Makes `n` GetProductStock(233) calls (one second deadline each) and
/// counts the answers per instance id; failed calls count under `"<error>"`.
pub async fn call_many(channel: &BalancedChannel, n: usize) -> HashMap<String, usize> {
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
