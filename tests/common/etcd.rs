//! A real etcd for the cluster tests, and registry nodes over it.
//!
//! [`EtcdServer::start`] runs `etcd` (Debian package `etcd-server`, which
//! `.ci/run` installs) on free loopback ports with a throwaway data dir on
//! tmpfs where there is one; it is killed when dropped. Under `CI=true` a
//! missing or failing etcd fails the test; elsewhere the test is skipped
//! with a loud message.
//!
//! [`ClusterNode`] is a registry node (`--store etcd`) serving on its own
//! runtime, so `kill()` is a crash: no lease revocation, no goodbye.

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use registry::{Config, etcd::EtcdOptions};
use tokio::{
    net::TcpListener,
    process::{Child, Command},
    sync::oneshot,
};

use super::TestServer;

/// A running etcd, killed on drop.
pub struct EtcdServer {
    /// `http://127.0.0.1:port`.
    pub url: String,
    child: Child,
    dir: PathBuf,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn etcd_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn unavailable(why: &str) -> Option<EtcdServer> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("etcd is required in CI and could not be started: {why}");
    }
    eprintln!(
        "\n********************************************************************\n\
         SKIPPING cluster test: {why}\n\
         install etcd (Debian: apt-get install etcd-server) to run it\n\
         ********************************************************************\n"
    );
    None
}

impl EtcdServer {
    /// Starts etcd and waits until it answers; `None` (outside CI only)
    /// when it cannot run here.
    pub async fn start() -> Option<Self> {
        let Some(bin) = etcd_binary() else {
            return unavailable("no etcd binary on PATH");
        };
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        for _attempt in 0..3 {
            let (client, peer) = (free_port(), free_port());
            let dir = base.join(format!(
                "registry-etcd-test-{}-{client}-{}",
                std::process::id(),
                rand_suffix()
            ));
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&bin)
                .args(["--name", "test", "--data-dir"])
                .arg(&dir)
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("test={peer_url}")])
                // Fast elections keep start-up short, and lower etcd's
                // minimum lease TTL (1.5 election timeouts) to one second.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => return unavailable(&format!("cannot run {}: {e}", bin.display())),
            };
            let mut server = Self { url, child, dir };
            if server.wait_ready().await {
                return Some(server);
            }
            // Most likely a port taken between probing and binding: retry.
            let _ = server.child.start_kill();
        }
        unavailable("etcd did not become ready in 10 s (three attempts)")
    }

    async fn wait_ready(&mut self) -> bool {
        use registry_api::etcd::etcdserverpb::{RangeRequest, kv_client::KvClient};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut kv) = KvClient::connect(self.url.clone()).await
                && kv
                    .range(RangeRequest {
                        key: b"probe".to_vec(),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("etcd running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Freezes etcd (SIGSTOP): sockets stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL (kill_on_drop).
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() as u32
}

/// One registry node over etcd, serving on its own runtime.
pub struct ClusterNode {
    pub addr: SocketAddr,
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ClusterNode {
    /// The node's etcd options in tests: a 2 s node lease, so a crashed
    /// node's instances go within seconds.
    pub fn options(etcd: &EtcdServer) -> EtcdOptions {
        let mut o = EtcdOptions::new([etcd.url.clone()]);
        o.lease_ttl = Duration::from_secs(2);
        o.prefix = "/registry-test".into();
        o
    }

    /// Starts a node with the test config (short TTLs allowed, no warm-up).
    pub async fn start(etcd: &EtcdServer) -> Self {
        let config = Config {
            warmup: Duration::ZERO,
            ..TestServer::test_config()
        };
        Self::start_with(config, Self::options(etcd)).await
    }

    /// Starts a node; returns once it has synced with etcd and listens.
    pub async fn start_with(config: Config, options: EtcdOptions) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        runtime.spawn(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let registry = registry::Registry::connect_cluster(config, options)
                .await
                .expect("node syncs with etcd");
            let _ = ready_tx.send(addr);
            registry::server::serve(listener, registry, async {
                let _ = rx.await;
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
            shutdown: Some(tx),
            runtime: Some(runtime),
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
        self.shutdown.take();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
