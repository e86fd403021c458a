//! Real processes for the cluster fault tests: an etcd that can be paused,
//! killed, restarted, restored from an older copy or wiped, and registry
//! nodes run as the real `registry` binary (`--store etcd`), each reaching
//! etcd through its own [`Proxy`], so SIGSTOP, `kill -9` and a cut etcd link
//! are the real thing.
//!
//! Every child process is killed when its guard drops, panics included
//! (`kill_on_drop`; SIGKILL also ends a stopped process). Node logs go to a
//! temporary directory that is removed after a passing test and kept (its
//! path printed) after a failing one, or always with
//! `REGISTRY_TEST_KEEP_LOGS=1`.
//!
//! The `registry` binary comes from [`registry_binary`] (`REGISTRY_BIN`
//! overrides it).

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use registry_api::v1::{
    Instance, ResolveRequest, ResolveResponse, registry_client::RegistryClient,
};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use super::{artifacts::registry_binary, binary::send_signal, proxy::Proxy};

/// Key prefix the test nodes use in etcd.
pub const PREFIX: &str = "/registry-faults";

/// A free loopback port (free when asked; a start retries if it is taken
/// meanwhile).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A suffix for scratch names: this process and a random number.
fn unique_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{}-{:08x}", std::process::id(), h.finish() as u32)
}

/// A scratch directory (etcd data, node logs), removed on drop; logs are
/// kept when the test failed or with `REGISTRY_TEST_KEEP_LOGS=1`.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
    keep_on_failure: bool,
}

impl Scratch {
    fn new(what: &str, keep_on_failure: bool) -> Self {
        // tmpfs where there is one: etcd fsyncs on every write.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("registry-{what}-{}", unique_suffix()));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self {
            path,
            keep_on_failure,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::thread::panicking()
            || std::env::var_os("REGISTRY_TEST_KEEP_LOGS").is_some_and(|v| v != "0");
        if self.keep_on_failure && keep {
            eprintln!("logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
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

/// Outside CI a missing etcd skips the test loudly; under `CI=true` it fails.
fn etcd_unavailable<T>(why: &str) -> Option<T> {
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

/// One etcd member on fixed loopback ports, so it can be restarted in place
/// (same ports, same, older or no data). Killed on drop.
#[derive(Debug)]
pub struct Etcd {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// Its client address, what proxies forward to.
    pub addr: SocketAddr,
    peer_url: String,
    bin: PathBuf,
    data: PathBuf,
    child: Option<Child>,
    scratch: Scratch,
}

impl Etcd {
    /// Starts etcd on free ports with an empty data dir; `None` outside CI
    /// when there is no etcd here.
    pub async fn start() -> Option<Self> {
        let Some(bin) = etcd_binary() else {
            return etcd_unavailable("no etcd binary on PATH");
        };
        for _attempt in 0..3 {
            let (client, peer) = (free_port(), free_port());
            let scratch = Scratch::new("etcd", false);
            let mut etcd = Self {
                url: format!("http://127.0.0.1:{client}"),
                addr: SocketAddr::from(([127, 0, 0, 1], client)),
                peer_url: format!("http://127.0.0.1:{peer}"),
                bin: bin.clone(),
                data: scratch.path.join("data"),
                child: None,
                scratch,
            };
            if etcd.spawn().await {
                return Some(etcd);
            }
            // Most likely a port taken between probing and binding.
            etcd.kill().await;
        }
        etcd_unavailable("etcd did not become ready in 10 s (three attempts)")
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new(&self.bin)
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
            ])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            // Fast elections keep start-up short, and lower etcd's minimum
            // lease TTL (1.5 election timeouts) to one second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(c) => self.child = Some(c),
            Err(e) => panic!("cannot run {}: {e}", self.bin.display()),
        }
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> bool {
        use registry_api::etcd::etcdserverpb::{RangeRequest, kv_client::KvClient};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            if let Ok(Ok(mut kv)) =
                tokio::time::timeout(Duration::from_secs(1), KvClient::connect(self.url.clone()))
                    .await
            {
                let probe = kv.range(RangeRequest {
                    key: b"probe".to_vec(),
                    ..Default::default()
                });
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("etcd running")
    }

    /// Freezes etcd (SIGSTOP): sockets stay open, nothing answers.
    pub fn pause(&self) {
        send_signal(self.pid(), "-STOP");
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) {
        send_signal(self.pid(), "-CONT");
    }

    /// `kill -9`, and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same ports with whatever is in its data dir.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd still running");
        for _ in 0..3 {
            if self.spawn().await {
                return;
            }
            self.kill().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("etcd did not come back on {}", self.url);
    }

    /// `kill -9` and start again with the same data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start_again().await;
    }

    /// A copy of the data dir as it is now, to restore later. etcd is
    /// frozen (SIGSTOP) for the copy, which makes it what a crash at that
    /// moment would leave (etcd recovers from that); the pause is far
    /// shorter than anything a node notices.
    pub async fn backup(&mut self) -> PathBuf {
        let copy = self
            .scratch
            .path
            .join(format!("backup-{}", unique_suffix()));
        self.pause();
        copy_dir(&self.data, &copy);
        self.resume();
        copy
    }

    /// Ids of `service` stored in etcd under the test prefix right now.
    pub async fn instance_ids(&self, service: &str) -> Vec<String> {
        use registry_api::etcd::etcdserverpb::{RangeRequest, kv_client::KvClient};
        let prefix = format!("{PREFIX}/i/{service}/").into_bytes();
        let mut end = prefix.clone();
        *end.last_mut().unwrap() += 1;
        let Ok(mut kv) = KvClient::connect(self.url.clone()).await else {
            return Vec::new();
        };
        let Ok(resp) = kv
            .range(RangeRequest {
                key: prefix.clone(),
                range_end: end,
                keys_only: true,
                ..Default::default()
            })
            .await
        else {
            return Vec::new();
        };
        let mut ids: Vec<String> = resp
            .into_inner()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Stops etcd, replaces its data with `backup` and starts it again: the
    /// same cluster, back in time.
    pub async fn restore(&mut self, backup: &Path) {
        self.kill().await;
        std::fs::remove_dir_all(&self.data).expect("remove etcd data");
        copy_dir(backup, &self.data);
        self.start_again().await;
    }

    /// Stops etcd, deletes its data and starts a new empty cluster on the
    /// same ports (new cluster id, revisions from 1).
    pub async fn wipe(&mut self) {
        self.kill().await;
        std::fs::remove_dir_all(&self.data).expect("remove etcd data");
        self.start_again().await;
    }

    /// The current etcd revision.
    pub async fn revision(&self) -> i64 {
        use registry_api::etcd::etcdserverpb::{RangeRequest, kv_client::KvClient};
        let mut kv = KvClient::connect(self.url.clone()).await.expect("etcd");
        kv.range(RangeRequest {
            key: b"probe".to_vec(),
            ..Default::default()
        })
        .await
        .expect("etcd range")
        .into_inner()
        .header
        .map_or(0, |h| h.revision)
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// How a test node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--etcd-lease-ttl`: how long a dead or cut-off node's instances stay.
    pub etcd_lease_ttl: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            etcd_lease_ttl: Duration::from_secs(2),
        }
    }
}

/// A `registry --store etcd` process on a fixed port (kept across
/// restarts, so clients' endpoint lists stay valid). Killed on drop.
#[derive(Debug)]
pub struct Node {
    /// Short name for tables and logs (`A`, `B`, ...).
    pub name: String,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`.
    pub url: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Starts a node over `etcd_url` and waits until it serves.
    pub async fn start(name: &str, etcd_url: &str, options: &NodeOptions, logs: &Path) -> Self {
        for _attempt in 0..5 {
            let port = free_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let ttl = format!("{}ms", options.etcd_lease_ttl.as_millis());
            let args: Vec<String> = [
                "--listen",
                &addr.to_string(),
                "--store",
                "etcd",
                "--etcd-endpoints",
                etcd_url,
                "--etcd-prefix",
                PREFIX,
                "--etcd-lease-ttl",
                &ttl,
                "--min-ttl",
                "100ms",
                // A cluster node loads its catalog from etcd: no warm-up.
                "--warmup",
                "0s",
                "--rate-limit",
                "0",
                "--shutdown-grace",
                "1s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut node = Self {
                name: name.to_owned(),
                addr,
                url: format!("http://{addr}"),
                args,
                log: logs.join(format!("node-{name}.log")),
                child: None,
            };
            if node.spawn().await {
                return node;
            }
            node.kill9().await;
        }
        panic!("registry node {name} did not start (see its log in {logs:?})");
    }

    /// Spawns the process and waits (at most 20 s) until Resolve answers;
    /// false if it exited first (port taken).
    async fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let child = Command::new(registry_binary().await)
            .args(["--http-listen", "off"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn registry binary");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if resolve(&self.url, "prod").await.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The process id (for logs).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("node running")
    }

    /// SIGSTOP: the process stops dead, sockets open, timers frozen.
    pub fn freeze(&self) {
        send_signal(self.pid(), "-STOP");
    }

    /// SIGCONT after [`Node::freeze`].
    pub fn thaw(&self) {
        send_signal(self.pid(), "-CONT");
    }

    /// `kill -9`: no lease revoked, no goodbye. Waits until it is gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the node again on its port (retrying while the old socket
    /// lingers), and waits until it serves.
    pub async fn restart(&mut self) {
        self.kill9().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("node {} did not restart on {}", self.name, self.addr);
    }

    /// A raw generated client, connected lazily (works while the node is
    /// down; calls fail until it is back).
    pub fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(
            Channel::from_shared(self.url.clone())
                .unwrap()
                .connect_timeout(Duration::from_millis(500))
                .connect_lazy(),
        )
    }

    /// The node's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Resolve `service` on the node at `url`, one second at most; `None` when
/// it does not answer (down, frozen).
pub async fn resolve(url: &str, service: &str) -> Option<ResolveResponse> {
    let call = async {
        let mut client = RegistryClient::connect(url.to_owned()).await.ok()?;
        client
            .resolve(ResolveRequest {
                service: service.into(),
                ..Default::default()
            })
            .await
            .ok()
            .map(tonic::Response::into_inner)
    };
    tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .ok()
        .flatten()
}

/// Resolve on an existing client, one second at most.
pub async fn resolve_on(
    client: &RegistryClient<Channel>,
    service: &str,
) -> Option<ResolveResponse> {
    let mut client = client.clone();
    let call = client.resolve(ResolveRequest {
        service: service.into(),
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// Ids of a Resolve answer, sorted.
pub fn ids(instances: &[Instance]) -> Vec<String> {
    let mut ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    ids.sort();
    ids
}

/// etcd, and `n` registry nodes each reaching it through its own proxy
/// (open unless a test cuts it). Dropped nodes first, then etcd.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub proxies: Vec<Proxy>,
    pub etcd: Etcd,
    pub options: NodeOptions,
    logs: Scratch,
}

/// Node names, in order.
pub const NAMES: [&str; 5] = ["A", "B", "C", "D", "E"];

impl Cluster {
    /// Starts etcd and `n` nodes (named A, B, C...); `None` when etcd is not
    /// available outside CI.
    pub async fn start(n: usize, options: NodeOptions) -> Option<Self> {
        let etcd = Etcd::start().await?;
        let logs = Scratch::new("cluster-logs", true);
        let mut proxies = Vec::new();
        let mut nodes = Vec::new();
        for name in &NAMES[..n] {
            let proxy = Proxy::start(etcd.addr).await;
            nodes.push(Node::start(name, &proxy.url, &options, &logs.path).await);
            proxies.push(proxy);
        }
        Some(Self {
            nodes,
            proxies,
            etcd,
            options,
            logs,
        })
    }

    /// Comma-separated URLs of the nodes at `order` (a client's endpoint
    /// list, tried in that order).
    pub fn urls(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&i| self.nodes[i].url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where the node logs are.
    pub fn logs(&self) -> &Path {
        &self.logs.path
    }
}

/// One poll of one node.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: tokio::time::Instant,
    pub node: usize,
    /// `None`: the node did not answer within half a second.
    pub answer: Option<Answer>,
}

/// What a node answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub revision: u64,
    pub stale: bool,
    pub instances: Vec<Instance>,
}

impl Answer {
    /// The instance `id`, if the node has it.
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }
}

/// Polls Resolve on every node of a list at a fixed pace, recording what
/// each answered, so a test can say afterwards how long an instance was
/// missing where.
#[derive(Debug)]
pub struct Sampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Starts polling `urls` (node index = position) for `service` every
    /// `every`.
    pub fn start(urls: Vec<String>, service: &str, every: Duration) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let service = service.to_owned();
        let clients: Vec<RegistryClient<Channel>> = urls
            .iter()
            .map(|u| {
                RegistryClient::new(
                    Channel::from_shared(u.clone())
                        .unwrap()
                        .connect_timeout(Duration::from_millis(300))
                        .connect_lazy(),
                )
            })
            .collect();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let polls = clients.iter().enumerate().map(|(node, c)| {
                    let (mut c, service) = (c.clone(), service.clone());
                    async move {
                        let call = c.resolve(ResolveRequest {
                            service,
                            ..Default::default()
                        });
                        let answer =
                            match tokio::time::timeout(Duration::from_millis(500), call).await {
                                Ok(Ok(r)) => {
                                    let r = r.into_inner();
                                    Some(Answer {
                                        revision: r.revision,
                                        stale: r.server.is_some_and(|s| s.stale),
                                        instances: r.instances,
                                    })
                                }
                                _ => None,
                            };
                        Sample {
                            at: tokio::time::Instant::now(),
                            node,
                            answer,
                        }
                    }
                });
                samples.extend(futures::future::join_all(polls).await);
            }
            samples
        });
        Self { stop, task }
    }

    /// Stops polling and hands over what was recorded.
    pub async fn stop(self) -> Samples {
        let _ = self.stop.send(true);
        Samples {
            samples: self.task.await.expect("sampler task"),
        }
    }
}

/// A recorded history of Resolve answers.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub samples: Vec<Sample>,
}

/// A stretch of time during which an instance was missing on a node.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    pub from: tokio::time::Instant,
    pub len: Duration,
}

impl Samples {
    /// Answers of `node` within `[from, to]`, in order (unanswered polls
    /// left out).
    pub fn answers(
        &self,
        node: usize,
        from: tokio::time::Instant,
        to: tokio::time::Instant,
    ) -> impl Iterator<Item = (tokio::time::Instant, &Answer)> {
        self.samples.iter().filter_map(move |s| {
            (s.node == node && s.at >= from && s.at <= to)
                .then_some(())
                .and(s.answer.as_ref().map(|a| (s.at, a)))
        })
    }

    /// The longest stretch within `[from, to]` during which `node` answered
    /// without `id`: from the first answer lacking it to the next answer
    /// having it (or `to`). Unanswered polls neither start nor end a gap.
    pub fn longest_gap(
        &self,
        node: usize,
        id: &str,
        from: tokio::time::Instant,
        to: tokio::time::Instant,
    ) -> Option<Gap> {
        let mut longest: Option<Gap> = None;
        let mut open: Option<tokio::time::Instant> = None;
        let mut close = |start: tokio::time::Instant, end: tokio::time::Instant| {
            let len = end.saturating_duration_since(start);
            if longest.is_none_or(|g| len > g.len) {
                longest = Some(Gap { from: start, len });
            }
        };
        for (at, answer) in self.answers(node, from, to) {
            match (answer.get(id).is_some(), open) {
                (false, None) => open = Some(at),
                (true, Some(start)) => {
                    close(start, at);
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(start) = open {
            close(start, to);
        }
        longest
    }

    /// The last time within `[from, to]` `node` answered with `id`.
    pub fn last_seen(
        &self,
        node: usize,
        id: &str,
        from: tokio::time::Instant,
        to: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        self.answers(node, from, to)
            .filter(|(_, a)| a.get(id).is_some())
            .map(|(at, _)| at)
            .last()
    }

    /// The first time within `[from, to]` `node` answered with `id`.
    pub fn first_seen(
        &self,
        node: usize,
        id: &str,
        from: tokio::time::Instant,
        to: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        self.answers(node, from, to)
            .find(|(_, a)| a.get(id).is_some())
            .map(|(at, _)| at)
    }
}

/// Collects failed checks so a test reports every broken property at once
/// (and prints the passing ones too), then fails with all of them.
#[derive(Debug, Default)]
pub struct Checks {
    failed: Vec<String>,
}

impl Checks {
    /// Records one property.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            eprintln!("  ok    {what}");
        } else {
            eprintln!("  FAIL  {what}");
            self.failed.push(what);
        }
    }

    /// True while nothing failed.
    pub fn all_passed(&self) -> bool {
        self.failed.is_empty()
    }

    /// Fails the test with every failed check.
    pub fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{} check(s) failed:\n  - {}",
            self.failed.len(),
            self.failed.join("\n  - ")
        );
    }
}

/// Renews `lease_id` on the node at `url` every `every` with unary
/// Heartbeats until dropped, as a client that keeps its lease would;
/// records each answer's `found`.
#[derive(Debug)]
pub struct Renewer {
    task: tokio::task::JoinHandle<()>,
    answers: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
}

impl Renewer {
    /// Starts renewing.
    pub fn start(client: RegistryClient<Channel>, lease_id: u64, every: Duration) -> Self {
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = answers.clone();
        let task = tokio::spawn(async move {
            loop {
                let mut c = client.clone();
                let call = c.heartbeat(registry_api::v1::HeartbeatRequest {
                    lease_ids: vec![lease_id],
                });
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), call).await {
                    let found = r.into_inner().leases.first().is_some_and(|l| l.found);
                    seen.lock().unwrap().push(found);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { task, answers }
    }

    /// How many renewals were answered, and how many of them found the lease.
    pub fn tally(&self) -> (usize, usize) {
        let a = self.answers.lock().unwrap();
        (a.len(), a.iter().filter(|f| **f).count())
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
