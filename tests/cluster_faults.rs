//! Fault injection on a three-node cluster, with real processes: one etcd,
//! three `registry --store etcd` nodes (each reaching etcd through its own
//! TCP proxy), services registered with client-lib (short TTL, each with
//! its own node order), and callers calling them through
//! `balanced_channel`. Faults, one at a time, each healed:
//!
//! - `freeze-node`: SIGSTOP a node past its etcd lease TTL, then SIGCONT;
//! - `kill-node`: `kill -9` a node, restart it later on the same port;
//! - `freeze-etcd`: SIGSTOP etcd, then SIGCONT;
//! - `cut-node`: cut one node's etcd link (its clients still reach it);
//! - `restart-etcd`: `kill -9` etcd and start it again on the same data.
//!
//! During each fault one service is killed (`kill -9`-like: its runtime
//! vanishes) and one is deregistered; after it two new ones register. The
//! checks, printed as a table per fault:
//!
//! - live instances are never missing on a healthy node for more than
//!   TTL + 1 s during the fault, and are on every node within TTL + 1 s of
//!   the heal;
//! - the killed and the deregistered instance are gone from every node
//!   TTL + 1 s after they died (or after the heal, if etcd was away);
//! - each node's Watch stream (one long-lived watcher per node, resuming
//!   across breaks) replays to exactly what that node's Resolve answers;
//! - new registrations after the heal reach every node within TTL + 1 s;
//! - callers' calls that failed for lack of an address (no instance to
//!   send to within the call's 1 s deadline): goal 0.
//!
//! `FAULTS_LOG=registry_client=info` (an env filter) prints the test's
//! clients' own logs (keepers, resolvers, balanced channels) to stderr.
//!
//! `cargo test` runs the short form (6 services, 3 callers, 6 s outages,
//! 2 s etcd leases; about a minute). The full run of the issue (20 services, 5
//! callers, 20 s outages, 10 s etcd leases) is
//!
//! ```sh
//! cargo test --test cluster_faults -- --full
//! ```
//!
//! and every knob has a flag (`-- --help`). This is a `harness = false`
//! test: it prints its tables on stdout and exits non-zero if a check
//! failed.

// Signals (SIGSTOP, kill -9) and the `kill` command: Unix only. A
// harness = false test needs a `main` everywhere, so the suite lives in a
// Unix-only module and other systems get an empty one.
#[cfg(not(unix))]
fn main() {}

#[cfg(unix)]
mod common;
#[cfg(unix)]
use faults::main;

#[cfg(unix)]
mod faults {
    use super::common;

    use std::{
        collections::BTreeMap,
        sync::{
            Arc, Mutex,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use common::{
        cluster::{Answer, Cluster, NodeOptions, Sample, Sampler, Samples, ids, resolve_on},
        poll_until,
        prod::StockService,
    };
    use registry_api::{
        prod::{
            ProductRequest, prod_service_client::ProdServiceClient,
            prod_service_server::ProdServiceServer,
        },
        v1::{EventType, Instance, WatchRequest, watch_response::Kind},
    };
    use registry_client::{Registration, RegistryClient, Resolver};
    use tokio::{net::TcpListener, runtime::Runtime, time::Instant};
    use tokio_stream::wrappers::TcpListenerStream;

    const SERVICE: &str = "prod";
    /// How often the suite polls the nodes while it waits for a state.
    const POLL: Duration = Duration::from_millis(100);

    /// What to run.
    #[derive(Debug, Clone)]
    struct Settings {
        services: usize,
        callers: usize,
        /// How long each fault lasts before it is healed.
        outage: Duration,
        /// How long etcd stays down in `restart-etcd`.
        etcd_down: Duration,
        /// Client lease TTL of the services.
        ttl: Duration,
        /// The nodes' `--etcd-lease-ttl`.
        etcd_lease_ttl: Duration,
        faults: Vec<Fault>,
    }

    impl Settings {
        fn short() -> Self {
            Self {
                services: 6,
                callers: 3,
                // Past the 2 s node lease by more than TTL + 1 s, so a fault
                // that leaves instances missing until the heal shows.
                outage: Duration::from_secs(6),
                etcd_down: Duration::from_secs(2),
                ttl: Duration::from_secs(2),
                etcd_lease_ttl: Duration::from_secs(2),
                faults: Fault::all(),
            }
        }

        fn full() -> Self {
            Self {
                services: 20,
                callers: 5,
                outage: Duration::from_secs(20),
                etcd_down: Duration::from_secs(5),
                ttl: Duration::from_secs(2),
                etcd_lease_ttl: Duration::from_secs(10),
                faults: Fault::all(),
            }
        }

        /// TTL + 1 s: how long a live instance may be missing, and a dead one
        /// may linger.
        fn bound(&self) -> Duration {
            self.ttl + Duration::from_secs(1)
        }
    }

    const HELP: &str = "\
cluster_faults: fault injection on a 3-node registry cluster over etcd

USAGE: cargo test --test cluster_faults -- [OPTIONS]

  --full                 the issue's full run: 20 services, 5 callers,
                         20 s outages, 10 s node etcd leases
  --faults LIST          comma-separated subset, in order, of
                         freeze-node,kill-node,freeze-etcd,cut-node,restart-etcd
  --services N           services registered (default 6, --full 20)
  --callers N            callers (default 3, --full 5)
  --outage DURATION      length of each fault (default 6s, --full 20s)
  --etcd-down DURATION   etcd down time in restart-etcd (default 2s, --full 5s)
  --ttl DURATION         services' lease TTL (default 2s)
  --etcd-lease-ttl DURATION  nodes' --etcd-lease-ttl (default 2s, --full 10s)

Durations: 500ms, 4s, 1m. REGISTRY_FAULTS=full has the effect of --full.
Node logs of a failed run are kept (path printed); REGISTRY_TEST_KEEP_LOGS=1
keeps them always.";

    fn parse_duration(s: &str) -> Result<Duration, String> {
        let (num, unit) = s
            .find(|c: char| !c.is_ascii_digit())
            .map_or((s, "s"), |i| s.split_at(i));
        let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => Ok(Duration::from_secs(n)),
            "m" => Ok(Duration::from_secs(n * 60)),
            _ => Err(format!("bad duration unit in {s:?} (ms, s or m)")),
        }
    }

    /// `None`: nothing to run (a libtest filter that is not us, `--list`).
    fn settings_from_args() -> Result<Option<Settings>, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let full = args.iter().any(|a| a == "--full")
            || std::env::var("REGISTRY_FAULTS").is_ok_and(|v| v == "full");
        let mut s = if full {
            Settings::full()
        } else {
            Settings::short()
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or(format!("{flag} needs a value"))
            };
            match flag {
                "--help" | "-h" => {
                    println!("{HELP}");
                    return Ok(None);
                }
                "--list" => {
                    println!("cluster_faults: test");
                    return Ok(None);
                }
                "--full" => {}
                "--faults" => {
                    s.faults = value()?
                        .split(',')
                        .map(Fault::parse)
                        .collect::<Result<_, _>>()?
                }
                "--services" => s.services = value()?.parse().map_err(|e| format!("{e}"))?,
                "--callers" => s.callers = value()?.parse().map_err(|e| format!("{e}"))?,
                "--outage" => s.outage = parse_duration(&value()?)?,
                "--etcd-down" => s.etcd_down = parse_duration(&value()?)?,
                "--ttl" => s.ttl = parse_duration(&value()?)?,
                "--etcd-lease-ttl" => s.etcd_lease_ttl = parse_duration(&value()?)?,
                // What cargo test passes on to every test binary.
                "--nocapture" | "--quiet" | "-q" | "--exact" | "--show-output"
                | "--include-ignored" => {}
                "--test-threads" | "--color" | "--format" | "--skip" | "-Z" => {
                    if inline.is_none() {
                        it.next();
                    }
                }
                "--ignored" | "--bench" => return Ok(None),
                f if f.starts_with('-') => return Err(format!("unknown flag {f} (see --help)")),
                // A libtest name filter: run only if it names us.
                filter => {
                    if !"cluster_faults".contains(filter) {
                        return Ok(None);
                    }
                }
            }
        }
        if s.services < 4 || s.callers == 0 {
            return Err("at least 4 services and 1 caller".into());
        }
        Ok(Some(s))
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fault {
        FreezeNode(usize),
        KillNode(usize),
        FreezeEtcd,
        CutNode(usize),
        RestartEtcd,
    }

    impl Fault {
        fn all() -> Vec<Self> {
            vec![
                Fault::FreezeNode(0),
                Fault::KillNode(1),
                Fault::FreezeEtcd,
                Fault::CutNode(2),
                Fault::RestartEtcd,
            ]
        }

        fn parse(s: &str) -> Result<Self, String> {
            Ok(match s.trim() {
                "freeze-node" => Fault::FreezeNode(0),
                "kill-node" => Fault::KillNode(1),
                "freeze-etcd" => Fault::FreezeEtcd,
                "cut-node" => Fault::CutNode(2),
                "restart-etcd" => Fault::RestartEtcd,
                other => return Err(format!("unknown fault {other:?} (see --help)")),
            })
        }

        /// The node the fault is about, which is not "healthy" during it.
        fn node(self) -> Option<usize> {
            match self {
                Fault::FreezeNode(n) | Fault::KillNode(n) | Fault::CutNode(n) => Some(n),
                Fault::FreezeEtcd | Fault::RestartEtcd => None,
            }
        }

        fn describe(self, s: &Settings, outage: Duration) -> String {
            let name = |n: usize| common::cluster::NAMES[n];
            match self {
                Fault::FreezeNode(n) => format!(
                    "freeze-node: SIGSTOP node {} for {outage:?} (its etcd lease: {:?}), then SIGCONT",
                    name(n),
                    s.etcd_lease_ttl
                ),
                Fault::KillNode(n) => format!(
                    "kill-node: kill -9 node {}, restart it {outage:?} later on the same port",
                    name(n)
                ),
                Fault::FreezeEtcd => {
                    format!("freeze-etcd: SIGSTOP etcd for {outage:?}, then SIGCONT")
                }
                Fault::CutNode(n) => format!(
                    "cut-node: cut node {}'s etcd link (clients unaffected) for {outage:?}",
                    name(n)
                ),
                Fault::RestartEtcd => {
                    format!(
                        "restart-etcd: kill -9 etcd, start it again {outage:?} later (same data)"
                    )
                }
            }
        }
    }

    pub(crate) fn main() {
        if std::env::var_os("FAULTS_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_env("FAULTS_LOG"))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let settings = match settings_from_args() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                eprintln!("cluster_faults: {e}");
                std::process::exit(2);
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // A failed check panics inside (so the node logs are kept); every
        // child process is killed by its guard either way.
        runtime.block_on(run(settings));
        runtime.shutdown_background();
    }

    /// One service instance: ProdService on its own runtime, registered with
    /// client-lib through its own node list.
    struct Service {
        id: String,
        registration: Option<Registration>,
        runtime: Option<Runtime>,
    }

    impl Service {
        async fn start(urls: String, id: &str, ttl: Duration) -> Result<Self, String> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("service runtime");
            let service = StockService {
                instance_id: id.to_owned(),
                calls: Arc::default(),
            };
            let id_owned = id.to_owned();
            let registration = runtime
                .spawn(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(ProdServiceServer::new(service))
                            .serve_with_incoming(TcpListenerStream::new(listener)),
                    );
                    let client = RegistryClient::connect(&urls)
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .register(
                            registry_client::Instance::new(SERVICE, addr.to_string())
                                .with_id(id_owned),
                        )
                        .ttl(ttl)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await
                .expect("service start task");
            match registration {
                Ok(r) => Ok(Self {
                    id: id.to_owned(),
                    registration: Some(r),
                    runtime: Some(runtime),
                }),
                Err(e) => {
                    runtime.shutdown_background();
                    Err(e)
                }
            }
        }

        /// Crash: server, connections and keepalive vanish, nobody deregisters.
        fn kill(mut self) {
            if let Some(rt) = self.runtime.take() {
                rt.shutdown_background();
            }
            drop(self.registration.take());
        }
    }

    impl Drop for Service {
        fn drop(&mut self) {
            drop(self.registration.take());
            if let Some(rt) = self.runtime.take() {
                rt.shutdown_background();
            }
        }
    }

    /// What the callers saw, cumulative.
    #[derive(Debug, Default)]
    struct Tally {
        ok: AtomicU64,
        /// No answer within the call's deadline: the balancer had no instance
        /// it could send to.
        no_address: AtomicU64,
        /// The call reached something and failed (e.g. the killed instance).
        errors: AtomicU64,
    }

    impl Tally {
        fn read(&self) -> [u64; 3] {
            [
                self.ok.load(Ordering::Relaxed),
                self.no_address.load(Ordering::Relaxed),
                self.errors.load(Ordering::Relaxed),
            ]
        }
    }

    struct Callers {
        tally: Arc<Tally>,
        resolvers: Vec<Resolver>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Callers {
        async fn start(cluster: &Cluster, n: usize) -> Self {
            let tally = Arc::new(Tally::default());
            let (mut resolvers, mut tasks) = (Vec::new(), Vec::new());
            for c in 0..n {
                let order: Vec<usize> = (0..3).map(|k| (c + k) % 3).collect();
                let client = RegistryClient::connect(cluster.urls(&order))
                    .await
                    .expect("caller connects");
                let resolver = client.resolver(SERVICE);
                let channel = resolver.channel().build();
                resolvers.push(resolver);
                let tally = tally.clone();
                tasks.push(tokio::spawn(async move {
                    let mut prod = ProdServiceClient::new(channel);
                    loop {
                        let call = prod.get_product_stock(ProductRequest { prod_id: 233 });
                        match tokio::time::timeout(Duration::from_secs(1), call).await {
                            Ok(Ok(_)) => tally.ok.fetch_add(1, Ordering::Relaxed),
                            Ok(Err(_)) => tally.errors.fetch_add(1, Ordering::Relaxed),
                            Err(_) => tally.no_address.fetch_add(1, Ordering::Relaxed),
                        };
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }));
            }
            Self {
                tally,
                resolvers,
                tasks,
            }
        }
    }

    impl Drop for Callers {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    /// Polls every caller's resolver view, recorded like node answers (node
    /// index = caller index), so gaps are computed the same way.
    fn sample_caller_views(
        resolvers: Vec<Resolver>,
        every: Duration,
    ) -> (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<Samples>,
    ) {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
                let at = Instant::now();
                for (node, r) in resolvers.iter().enumerate() {
                    let instances = r
                        .instances()
                        .iter()
                        .map(|i| Instance {
                            service: SERVICE.into(),
                            id: i.id.clone(),
                            ..Default::default()
                        })
                        .collect();
                    samples.push(Sample {
                        at,
                        node,
                        answer: Some(Answer {
                            revision: 0,
                            stale: false,
                            instances,
                        }),
                    });
                }
            }
            Samples { samples }
        });
        (stop, task)
    }

    /// A node's view as rebuilt from its Watch stream alone.
    #[derive(Debug, Default, Clone)]
    struct WatchView {
        revision: u64,
        epoch: u64,
        instances: BTreeMap<String, Instance>,
        resets: u32,
        reconnects: u32,
    }

    /// One long-lived watcher on one node: resumes from its revision after any
    /// break, replaces its view on a (reset) snapshot.
    fn watch_node(url: String) -> (Arc<Mutex<WatchView>>, tokio::task::JoinHandle<()>) {
        let view = Arc::new(Mutex::new(WatchView::default()));
        let shared = view.clone();
        let task = tokio::spawn(async move {
            let mut first = true;
            loop {
                if !first {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    shared.lock().unwrap().reconnects += 1;
                }
                first = false;
                let Ok(mut client) =
                    registry_api::v1::registry_client::RegistryClient::connect(url.clone()).await
                else {
                    continue;
                };
                let (start, epoch) = {
                    let v = shared.lock().unwrap();
                    (if v.epoch == 0 { 0 } else { v.revision + 1 }, v.epoch)
                };
                let request = WatchRequest {
                    service: SERVICE.into(),
                    start_revision: start,
                    epoch,
                    progress_interval_ms: 100,
                    ..Default::default()
                };
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(2), client.watch(request)).await
                else {
                    continue;
                };
                let mut stream = stream.into_inner();
                let mut snapshot: Vec<Instance> = Vec::new();
                // A frozen node answers nothing: treat 3 s of silence (progress
                // is asked every 100 ms) as a broken stream.
                while let Ok(Ok(Some(msg))) =
                    tokio::time::timeout(Duration::from_secs(3), stream.message()).await
                {
                    let mut v = shared.lock().unwrap();
                    match msg.kind {
                        Some(Kind::Snapshot(mut s)) => {
                            snapshot.append(&mut s.instances);
                            if s.more {
                                continue;
                            }
                            if s.reset {
                                v.resets += 1;
                            }
                            v.instances = std::mem::take(&mut snapshot)
                                .into_iter()
                                .map(|i| (i.id.clone(), i))
                                .collect();
                            v.revision = s.revision;
                            if let Some(server) = s.server {
                                v.epoch = server.epoch;
                            }
                        }
                        Some(Kind::Events(batch)) => {
                            for e in batch.events {
                                v.revision = v.revision.max(e.revision);
                                let Some(i) = e.instance else { continue };
                                if e.r#type == EventType::Put as i32 {
                                    v.instances.insert(i.id.clone(), i);
                                } else {
                                    v.instances.remove(&i.id);
                                }
                            }
                        }
                        Some(Kind::Progress(p)) => v.revision = v.revision.max(p.revision),
                        None => {}
                    }
                }
            }
        });
        (view, task)
    }

    /// One line of a fault's table.
    struct Row {
        check: String,
        bound: String,
        measured: String,
        ok: bool,
    }

    fn secs(d: Duration) -> String {
        format!("{:.1}s", d.as_secs_f64())
    }

    struct Suite {
        settings: Settings,
        cluster: Cluster,
        services: Vec<Service>,
        callers: Callers,
        watchers: Vec<(Arc<Mutex<WatchView>>, tokio::task::JoinHandle<()>)>,
        next_id: usize,
    }

    async fn run(settings: Settings) -> Option<bool> {
        let options = NodeOptions {
            etcd_lease_ttl: settings.etcd_lease_ttl,
        };
        let started = Instant::now();
        let cluster = Cluster::start(3, options).await?;
        println!(
            "cluster_faults: etcd {} and nodes {} (logs in {})",
            cluster.etcd.url,
            cluster.urls(&[0, 1, 2]),
            cluster.logs().display()
        );
        println!(
            "  {} services (TTL {:?}), {} callers, node etcd lease {:?}, outages {:?}",
            settings.services,
            settings.ttl,
            settings.callers,
            settings.etcd_lease_ttl,
            settings.outage
        );
        let callers = Callers::start(&cluster, settings.callers).await;
        let watchers = (0..3)
            .map(|n| watch_node(cluster.nodes[n].url.clone()))
            .collect();
        let mut suite = Suite {
            settings,
            cluster,
            services: Vec::new(),
            callers,
            watchers,
            next_id: 0,
        };
        for _ in 0..suite.settings.services {
            let id = suite.new_id();
            let order = suite.order_for(&id);
            let urls = suite.cluster.urls(&order);
            let service = Service::start(urls, &id, suite.settings.ttl)
                .await
                .unwrap_or_else(|e| panic!("{id} registers before any fault: {e}"));
            suite.services.push(service);
        }
        let all = suite.ids();
        let ready = poll_until(Duration::from_secs(10), POLL, || suite.everywhere(&all)).await;
        assert!(
            ready.is_some(),
            "every service on every node before the faults"
        );

        let mut summary = Vec::new();
        let faults = suite.settings.faults.clone();
        for (i, fault) in faults.iter().enumerate() {
            let rows = suite.run_fault(*fault, i + 1, faults.len()).await;
            let failed = rows.iter().filter(|r| !r.ok).count();
            summary.push((*fault, rows.len(), failed));
        }
        println!("\nsummary ({:.0?} in all)", started.elapsed());
        let mut all_ok = true;
        for (fault, checks, failed) in &summary {
            let outage = suite.outage_of(*fault);
            println!(
                "  {:<70} {}",
                fault.describe(&suite.settings, outage),
                if *failed == 0 {
                    format!("ok ({checks} checks)")
                } else {
                    all_ok = false;
                    format!("FAILED {failed} of {checks} checks")
                }
            );
        }
        // Failing by panic while the cluster is still alive keeps its node logs.
        assert!(all_ok, "cluster_faults: some checks failed (tables above)");
        Some(true)
    }

    impl Suite {
        fn new_id(&mut self) -> String {
            let id = format!("prod-{:02}", self.next_id);
            self.next_id += 1;
            id
        }

        /// Node order of a service: rotated by its number, so registrations
        /// start on every node.
        fn order_for(&self, id: &str) -> Vec<usize> {
            let n: usize = id.trim_start_matches("prod-").parse().unwrap_or(0);
            (0..3).map(|k| (n + k) % 3).collect()
        }

        fn ids(&self) -> Vec<String> {
            self.services.iter().map(|s| s.id.clone()).collect()
        }

        async fn everywhere(&self, wanted: &[String]) -> bool {
            for node in &self.cluster.nodes {
                let Some(r) = resolve_on(&node.client(), SERVICE).await else {
                    return false;
                };
                if !wanted
                    .iter()
                    .all(|id| r.instances.iter().any(|i| &i.id == id))
                {
                    return false;
                }
            }
            true
        }

        fn outage_of(&self, fault: Fault) -> Duration {
            match fault {
                // Past the node's etcd lease, whatever --outage says.
                Fault::FreezeNode(_) => self
                    .settings
                    .outage
                    .max(self.settings.etcd_lease_ttl + Duration::from_secs(2)),
                Fault::RestartEtcd => self.settings.etcd_down,
                _ => self.settings.outage,
            }
        }

        async fn inject(&mut self, fault: Fault) {
            match fault {
                Fault::FreezeNode(n) => self.cluster.nodes[n].freeze(),
                Fault::KillNode(n) => self.cluster.nodes[n].kill9().await,
                Fault::FreezeEtcd => self.cluster.etcd.pause(),
                Fault::CutNode(n) => self.cluster.proxies[n].cut(),
                Fault::RestartEtcd => self.cluster.etcd.kill().await,
            }
        }

        async fn heal(&mut self, fault: Fault) {
            match fault {
                Fault::FreezeNode(n) => self.cluster.nodes[n].thaw(),
                Fault::KillNode(n) => self.cluster.nodes[n].restart().await,
                Fault::FreezeEtcd => self.cluster.etcd.resume(),
                Fault::CutNode(n) => self.cluster.proxies[n].heal(),
                Fault::RestartEtcd => self.cluster.etcd.start_again().await,
            }
        }

        async fn run_fault(&mut self, fault: Fault, index: usize, of: usize) -> Vec<Row> {
            let bound = self.settings.bound();
            let outage = self.outage_of(fault);
            println!(
                "\nfault {index}/{of}: {}",
                fault.describe(&self.settings, outage)
            );
            let urls: Vec<String> = self.cluster.nodes.iter().map(|n| n.url.clone()).collect();
            let sampler = Sampler::start(urls, SERVICE, Duration::from_millis(100));
            let (stop_views, views) =
                sample_caller_views(self.callers.resolvers.clone(), Duration::from_millis(100));
            let calls_before = self.callers.tally.read();

            // The victims: a service whose list starts on the faulted node (its
            // lease is likely there) dies; another one deregisters.
            let on_node = |s: &Service| fault.node().is_none_or(|n| self.order_for(&s.id)[0] == n);
            let dead_at = self.services.iter().position(on_node).unwrap_or(0);
            let dead = self.services.remove(dead_at);
            let gone_at = self
                .services
                .iter()
                .position(|s| fault.node().is_none_or(|n| self.order_for(&s.id)[0] != n))
                .unwrap_or(0);
            let mut gone = self.services.remove(gone_at);
            let live = self.ids();
            let (dead_id, gone_id) = (dead.id.clone(), gone.id.clone());

            let t0 = Instant::now();
            self.inject(fault).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let churn_at = Instant::now();
            dead.kill();
            let registration = gone.registration.take().expect("registered");
            let deregister = tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(15), registration.deregister()).await
            });
            tokio::time::sleep_until(t0 + outage).await;
            self.heal(fault).await;
            let healed_at = Instant::now();
            // Up to the bound, and a second more to see that it holds.
            tokio::time::sleep(bound + Duration::from_secs(1)).await;
            let samples = sampler.stop().await;
            let _ = stop_views.send(true);
            let views = views.await.expect("caller view sampler");
            let end = Instant::now();
            let deregistered = match deregister.await {
                Ok(Ok(Ok(_))) => "ok".to_owned(),
                Ok(Ok(Err(e))) => match e.status() {
                    Some(s) => format!("{:?}", s.code()),
                    None => e.to_string(),
                },
                Ok(Err(_)) => "no answer in 15 s".to_owned(),
                Err(e) => format!("task: {e}"),
            };
            drop(gone);

            let mut rows = Vec::new();
            let healthy: Vec<usize> = (0..3).filter(|n| Some(*n) != fault.node()).collect();
            let name = |n: usize| common::cluster::NAMES[n];

            // Live instances during the fault, on healthy nodes.
            let mut worst: Option<(Duration, String, usize, Duration)> = None;
            for &n in &healthy {
                for id in &live {
                    if let Some(g) = samples.longest_gap(n, id, t0, healed_at)
                        && worst.as_ref().is_none_or(|w| g.len > w.0)
                    {
                        worst = Some((g.len, id.clone(), n, g.from - t0));
                    }
                }
            }
            rows.push(Row {
                check: format!(
                    "live instances missing on healthy nodes ({}) during the fault, longest",
                    healthy
                        .iter()
                        .map(|n| name(*n))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                bound: format!("<= {}", secs(bound)),
                measured: match &worst {
                    None => "never missing".into(),
                    Some((len, id, n, from)) => {
                        format!(
                            "{} ({id} on {} from +{})",
                            secs(*len),
                            name(*n),
                            secs(*from)
                        )
                    }
                },
                ok: worst.as_ref().is_none_or(|w| w.0 <= bound),
            });

            // Live instances after the heal, on every node.
            let mut last_missing: Option<(Duration, String, usize)> = None;
            for n in 0..3 {
                for id in &live {
                    let missing_at = samples
                        .answers(n, healed_at, end)
                        .filter(|(_, a)| a.get(id).is_none())
                        .map(|(at, _)| at)
                        .last();
                    if let Some(at) = missing_at
                        && last_missing.as_ref().is_none_or(|m| at - healed_at > m.0)
                    {
                        last_missing = Some((at - healed_at, id.clone(), n));
                    }
                }
            }
            let answered_at_end = (0..3).all(|n| {
                samples
                    .answers(n, end - Duration::from_secs(1), end)
                    .next()
                    .is_some()
            });
            rows.push(Row {
                check: "every live instance on every node after the heal".into(),
                bound: format!("<= +{}", secs(bound)),
                measured: match &last_missing {
                    None if answered_at_end => "at once".into(),
                    None => "a node stopped answering".into(),
                    Some((at, id, n)) => {
                        format!("last missing at +{} ({id} on {})", secs(*at), name(*n))
                    }
                },
                ok: answered_at_end && last_missing.as_ref().is_none_or(|m| m.0 <= bound),
            });

            // The killed and the deregistered instance.
            for (what, id, since) in [
                ("killed", &dead_id, churn_at),
                ("deregistered", &gone_id, churn_at),
            ] {
                let reference = since.max(healed_at);
                let last = (0..3)
                    .filter_map(|n| samples.last_seen(n, id, since, end).map(|at| (at, n)))
                    .max();
                let still = (0..3).any(|n| {
                    samples
                        .answers(n, end - Duration::from_millis(500), end)
                        .any(|(_, a)| a.get(id).is_some())
                });
                let late = last.map(|(at, _)| at.saturating_duration_since(reference));
                let note = if what == "deregistered" {
                    format!(" (its Deregister: {deregistered})")
                } else {
                    String::new()
                };
                rows.push(Row {
                    check: format!("{what} instance gone from every node"),
                    bound: format!("<= +{}", secs(bound)),
                    measured: match last {
                        None => format!("{id} not seen after{note}"),
                        Some((_, n)) if still => format!("{id} still on {}{note}", name(n)),
                        Some((_, n)) => format!(
                            "{id} last seen +{} after {} on {}{note}",
                            secs(late.unwrap_or_default()),
                            if reference == healed_at {
                                "the heal"
                            } else {
                                "it went"
                            },
                            name(n)
                        ),
                    },
                    ok: !still && late.is_none_or(|l| l <= bound),
                });
            }

            // Watch replays to Resolve, per node.
            let mut replay = Vec::new();
            let mut replay_ok = true;
            for n in 0..3 {
                let (ok, what) = self.compare_watch(n).await;
                replay_ok &= ok;
                replay.push(format!("{}: {what}", name(n)));
            }
            rows.push(Row {
                check: "each node's Watch stream replays to its Resolve".into(),
                bound: "equal".into(),
                measured: replay.join("; "),
                ok: replay_ok,
            });

            // Two new services register after the heal.
            let mut new_ids = Vec::new();
            let mut start_errors = Vec::new();
            for _ in 0..2 {
                let id = self.new_id();
                let urls = self.cluster.urls(&self.order_for(&id));
                match Service::start(urls, &id, self.settings.ttl).await {
                    Ok(s) => {
                        new_ids.push(id);
                        self.services.push(s);
                    }
                    Err(e) => start_errors.push(format!("{id}: {e}")),
                }
            }
            let reached = poll_until(bound, POLL, || self.everywhere(&new_ids)).await;
            let mut missing_new = Vec::new();
            if reached.is_none() {
                for node in &self.cluster.nodes {
                    let have = resolve_on(&node.client(), SERVICE).await;
                    for id in &new_ids {
                        if !have
                            .as_ref()
                            .is_some_and(|r| r.instances.iter().any(|i| &i.id == id))
                        {
                            missing_new.push(format!("{id} not on {}", node.name));
                        }
                    }
                }
            }
            rows.push(Row {
                check: "new registrations after the heal on every node".into(),
                bound: format!("<= {}", secs(bound)),
                measured: match reached {
                    Some(d) if start_errors.is_empty() => {
                        format!("{} ({})", secs(d), new_ids.join(", "))
                    }
                    _ => format!(
                        "{}{}",
                        start_errors.join("; "),
                        if missing_new.is_empty() {
                            String::new()
                        } else {
                            format!(" missing: {}", missing_new.join(", "))
                        }
                    ),
                },
                ok: start_errors.is_empty() && reached.is_some(),
            });

            // Callers.
            let calls_after = self.callers.tally.read();
            let [ok, no_address, errors] = [0, 1, 2].map(|i| calls_after[i] - calls_before[i]);
            rows.push(Row {
                check: "callers: calls failed for lack of an address".into(),
                bound: "0".into(),
                measured: format!(
                    "{no_address} of {} (failed otherwise, e.g. on the killed instance: {errors})",
                    ok + no_address + errors
                ),
                ok: no_address == 0,
            });
            let mut view_gap: Option<(Duration, String, usize)> = None;
            for c in 0..self.callers.resolvers.len() {
                for id in &live {
                    if let Some(g) = views.longest_gap(c, id, t0, end)
                        && view_gap.as_ref().is_none_or(|w| g.len > w.0)
                    {
                        view_gap = Some((g.len, id.clone(), c));
                    }
                }
            }
            rows.push(Row {
                check: "callers: live instance missing from a caller's view, longest".into(),
                bound: format!("<= {}", secs(bound)),
                measured: match &view_gap {
                    None => "never".into(),
                    Some((len, id, c)) => format!("{} ({id}, caller {c})", secs(*len)),
                },
                ok: view_gap.as_ref().is_none_or(|g| g.0 <= bound),
            });

            print_table(&rows);
            rows
        }

        /// Waits (at most 3 s) for node `n`'s watcher to reach the revision of
        /// the node's Resolve, then compares the two views.
        async fn compare_watch(&self, n: usize) -> (bool, String) {
            let client = self.cluster.nodes[n].client();
            let view = &self.watchers[n].0;
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let Some(resolved) = resolve_on(&client, SERVICE).await else {
                    if Instant::now() > deadline {
                        return (false, "node does not answer".into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let watched = view.lock().unwrap().clone();
                if watched.revision == resolved.revision {
                    let want: BTreeMap<String, Instance> = resolved
                        .instances
                        .iter()
                        .map(|i| (i.id.clone(), i.clone()))
                        .collect();
                    if want == watched.instances {
                        return (
                            true,
                            format!(
                                "equal at rev {} ({} resets, {} reconnects)",
                                watched.revision, watched.resets, watched.reconnects
                            ),
                        );
                    }
                    let w: Vec<&String> = watched.instances.keys().collect();
                    let differ: Vec<&String> = want
                        .iter()
                        .filter(|(k, v)| watched.instances.get(*k) != Some(*v))
                        .map(|(k, _)| k)
                        .chain(watched.instances.keys().filter(|k| !want.contains_key(*k)))
                        .collect();
                    return (
                        false,
                        format!(
                            "at rev {} Watch has {:?}, Resolve {:?}; differing: {differ:?}",
                            watched.revision,
                            w,
                            ids(&resolved.instances)
                        ),
                    );
                }
                if Instant::now() > deadline {
                    return (
                        false,
                        format!(
                            "Watch at rev {}, Resolve at rev {}",
                            watched.revision, resolved.revision
                        ),
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn print_table(rows: &[Row]) {
        let w0 = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.bound.len()).max().unwrap_or(0).max(5);
        println!(
            "  {:<w0$}  {:<w1$}  {:<6} measured",
            "check", "bound", "result"
        );
        for r in rows {
            println!(
                "  {:<w0$}  {:<w1$}  {:<6} {}",
                r.check,
                r.bound,
                if r.ok { "ok" } else { "FAIL" },
                r.measured
            );
        }
    }
}
