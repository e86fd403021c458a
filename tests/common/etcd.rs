//! Registry nodes over a real etcd ([`Etcd`]), in this process:
//! [`ClusterNode`] is a registry node (`--store etcd`) serving on its own
//! runtime, so `kill()` is a crash: no lease revocation, no goodbye.

use std::{net::SocketAddr, time::Duration};

use registry::{Config, etcd::EtcdOptions};
use tokio::{net::TcpListener, sync::oneshot};

use super::{OwnRuntime, TestServer, cluster::Etcd};

/// One registry node over etcd, serving on its own runtime.
pub struct ClusterNode {
    pub addr: SocketAddr,
    pub url: String,
    served: OwnRuntime,
}

impl ClusterNode {
    /// The node's etcd options in tests: a 2 s node lease, so a crashed
    /// node's instances go within seconds.
    pub fn options(etcd: &Etcd) -> EtcdOptions {
        let mut o = EtcdOptions::new([etcd.url.clone()]);
        o.lease_ttl = Duration::from_secs(2);
        o.prefix = "/registry-test".into();
        o
    }

    /// Starts a node with the test config (short TTLs allowed, no warm-up).
    pub async fn start(etcd: &Etcd) -> Self {
        Self::start_with(TestServer::no_warmup_config(), Self::options(etcd)).await
    }

    /// Starts a node; returns once it has synced with etcd and listens.
    pub async fn start_with(config: Config, options: EtcdOptions) -> Self {
        let (ready_tx, ready_rx) = oneshot::channel();
        let served = OwnRuntime::spawn(|stop| async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let registry = registry::Registry::connect_cluster(config, options)
                .await
                .expect("node syncs with etcd");
            let _ = ready_tx.send(addr);
            registry::server::serve(listener, registry, async {
                let _ = stop.await;
            })
            .await
            .expect("registry node failed");
        });
        let addr = tokio::time::timeout(Duration::from_secs(15), ready_rx)
            .await
            .expect("node started within 15 s")
            .expect("node start task");
        Self {
            addr,
            url: format!("http://{addr}"),
            served,
        }
    }

    /// A raw generated client.
    pub async fn client(
        &self,
    ) -> registry_api::v1::registry_client::RegistryClient<tonic::transport::Channel> {
        registry_api::v1::registry_client::RegistryClient::connect(self.url.clone())
            .await
            .expect("connect to node")
    }

    /// Crash: the node's runtime stops with every task and socket; its etcd
    /// lease is not revoked and expires on its own.
    pub fn kill(mut self) {
        self.served.kill();
    }
}
