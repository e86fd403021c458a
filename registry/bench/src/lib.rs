//! `registry-bench`, the load generator: it drives a running registry over
//! real gRPC on loopback and reports throughput and latency per workload.
//!
//! Every figure is also given relative to a *ceiling*: a no-op tonic echo
//! service the generator serves itself and drives with the same client,
//! connections and concurrency, in the same run. Absolute numbers on a shared
//! 2-core machine drift from run to run; the share of the ceiling does not.
//!
//! Map of the module:
//! - `load`: the closed-loop driver (N requests in flight over M connections,
//!   warm-up excluded, bounded in time and count) and its histograms.
//! - `target`: the registry under test — an address, or a `registry` binary
//!   this process spawns on a free port and kills at the end — and its
//!   `/proc` figures (RSS, CPU time).
//! - `echo`: the ceiling service.
//! - `workloads`: one function per workload of issue 7.
//! - `restart`: restart to complete catalog, with and without `--data-dir`
//!   (issue 9); it starts and kills registry processes of its own.
//! - `report`: the rows and the table printed at the end.

mod echo;
mod load;
mod report;
mod restart;
mod target;
mod workloads;

use std::{path::PathBuf, time::Duration};

pub use report::{Latency, Report, Row};

/// The workloads of issue 7, selectable with `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    /// 0: no-op echo service: the ceiling every other figure is compared to.
    Ceiling,
    /// 1: Register with a new lease and one instance per call.
    Register,
    /// 2: lease renewals over KeepAlive streams, batched per message.
    Heartbeat,
    /// 3: Resolve of one service with 10 instances.
    Resolve,
    /// 4: the same Resolve with `--held` other instances registered.
    ResolveHeld,
    /// 5: watch fan-out: change acknowledgement to receipt per watcher.
    Watch,
    /// 6: how late the DELETE of an expired lease arrives.
    Expiry,
    /// 7: registry RSS per instance, and the time to register them.
    Memory,
    /// 8: restart to complete catalog, without and with `--data-dir`. Starts
    /// and SIGKILLs `registry` processes of its own (`--spawn-registry` or
    /// the binary next to this one), so `all` does not include it.
    Restart,
    /// Workloads 0-7, in order.
    All,
}

/// Everything a run is configured with. The `registry-bench` binary parses
/// these from its flags; tests build them directly.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Workloads to run, comma-separated (the ceiling always runs first).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub workload: Vec<Workload>,
    /// Registry to drive, e.g. http://127.0.0.1:7411. Without it (and
    /// without --spawn-registry) the `registry` binary next to this one is
    /// spawned.
    #[arg(long, conflicts_with = "spawn_registry")]
    pub registry: Option<String>,
    /// A `registry` binary to start on a free loopback port for this run
    /// and kill at its end.
    #[arg(long)]
    pub spawn_registry: Option<PathBuf>,
    /// PID of the registry given by --registry, so the memory workload can
    /// read its RSS (a spawned registry's PID is known).
    #[arg(long)]
    pub registry_pid: Option<u32>,
    /// Measured time of each throughput workload.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Time run before measuring starts (connections warm, caches filled).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Requests in flight (closed loop: each sends its next when answered).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Scaled-down counts and a short warm-up, so CI can run every workload
    /// in seconds. Combine with --duration 1s.
    #[arg(long)]
    pub smoke: bool,
    /// Leases renewed by the heartbeat workload, split over the streams.
    #[arg(long, default_value_t = 1000)]
    pub leases: usize,
    /// Other instances registered before resolve-held (comma-separated:
    /// one run each, the catalog growing between them).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    pub held: Vec<usize>,
    /// Watcher counts of the watch workload (comma-separated, one run each).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub watchers: Vec<usize>,
    /// Registry nodes the watch workload's watchers connect to (comma-
    /// separated, watchers spread over them), while its changes still go to
    /// --registry: watch fan-out across the nodes of a cluster
    /// (`--store etcd`, where every node numbers revisions alike). Default:
    /// --registry itself.
    #[arg(long, value_delimiter = ',')]
    pub watch_registry: Vec<String>,
    /// Changes made while the watchers listen.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Interval between those changes.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub change_interval: Duration,
    /// Leases left to expire in the expiry workload.
    #[arg(long, default_value_t = 200)]
    pub expiry_leases: usize,
    /// Their TTL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub expiry_ttl: Duration,
    /// Instance counts at which the memory workload reads RSS
    /// (comma-separated, registered cumulatively).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub instances: Vec<usize>,
    /// Metadata labels on every registered instance (a realistic instance
    /// carries at least a zone or version label).
    #[arg(long, default_value_t = 1)]
    pub labels: usize,
    /// How far the resolve workloads decode each answer. `full` builds every
    /// instance (strings, label map) as a real caller would; `envelope`
    /// checks the revision and the instance count and keeps each instance
    /// as raw bytes, so that on a shared 2-core machine the load
    /// generator's own decoding (~20 allocations per instance) does not
    /// take the cores the registry is being measured on.
    #[arg(long, value_enum, default_value = "full")]
    pub resolve_decode: ResolveDecode,
    /// Clients (each its own connection and keepalive stream, like a
    /// service process) of the restart workload.
    #[arg(long, default_value_t = 1000)]
    pub restart_clients: usize,
    /// Instances each restart client registers.
    #[arg(long, default_value_t = 10)]
    pub restart_instances_per_client: usize,
    /// TTL of the restart workload's instances (they renew every TTL/3).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub restart_ttl: Duration,
}

/// See [`Options::resolve_decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResolveDecode {
    /// Decode every instance into `registry.v1.Instance`.
    Full,
    /// Decode the response envelope only.
    Envelope,
}

impl Options {
    /// The defaults of issue 7 against the given registry address.
    pub fn for_url(url: impl Into<String>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            options: Options,
        }
        let mut options = Wrapper::parse_from(["registry-bench"]).options;
        options.registry = Some(url.into());
        options
    }

    /// Applies `--smoke`: counts small enough for a debug build in CI.
    fn scaled(mut self) -> Self {
        if self.smoke {
            self.warmup = self.warmup.min(Duration::from_millis(200));
            self.leases = self.leases.min(100);
            self.held = vec![2_000];
            self.watchers = vec![10, 50];
            self.changes = self.changes.min(20);
            self.expiry_leases = self.expiry_leases.min(20);
            self.expiry_ttl = self.expiry_ttl.min(Duration::from_millis(500));
            self.instances = vec![2_000, 5_000];
            self.restart_clients = self.restart_clients.min(20);
            self.restart_instances_per_client = self.restart_instances_per_client.min(5);
            self.restart_ttl = self.restart_ttl.min(Duration::from_secs(2));
        }
        self.concurrency = self.concurrency.max(1);
        self.connections = self.connections.clamp(1, self.concurrency);
        self.instances.sort_unstable();
        self.held.sort_unstable();
        self
    }

    fn wants(&self, w: Workload) -> bool {
        self.workload.contains(&w)
            || (w != Workload::Restart && self.workload.contains(&Workload::All))
    }
}

/// Why a run could not produce figures (a workload's own RPC failures are
/// counted in its row instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Connecting to the registry or the echo service failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// Address dialled.
        url: String,
        /// Transport cause.
        source: tonic::transport::Error,
    },
    /// A setup call (not a measured one) failed.
    #[error("{what}: {status}")]
    Rpc {
        /// What the call was for.
        what: String,
        /// The status returned.
        status: tonic::Status,
    },
    /// Spawning, reading /proc or binding failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Anything else that makes the run meaningless (e.g. no registry).
    #[error("{0}")]
    Setup(String),
}

/// Runs the selected workloads and returns their rows, ceiling first.
pub async fn run(options: Options) -> Result<Report, BenchError> {
    let options = options.scaled();
    let mut report = Report::default();

    let ceiling = workloads::ceiling(&options).await?;
    report.set_ceiling(&ceiling);
    report.push(ceiling);

    let needs_no_target = |w: &Workload| *w == Workload::Ceiling || *w == Workload::Restart;
    if options.workload.iter().all(needs_no_target) {
        if options.wants(Workload::Restart) {
            report.extend(restart::restart(&options).await?);
        }
        return Ok(report);
    }
    let target = target::Target::open(&options).await?;
    let mut ctx = workloads::Ctx::new(&options, &target).await?;
    if options.wants(Workload::Register) {
        report.push(workloads::register(&mut ctx).await?);
    }
    if options.wants(Workload::Heartbeat) {
        report.push(workloads::heartbeat(&mut ctx).await?);
    }
    if options.wants(Workload::Resolve) || options.wants(Workload::ResolveHeld) {
        report.push(workloads::resolve(&mut ctx, 0).await?);
    }
    if options.wants(Workload::ResolveHeld) {
        for &held in &options.held {
            report.push(workloads::resolve(&mut ctx, held).await?);
        }
    }
    if options.wants(Workload::Watch) {
        for &n in &options.watchers {
            report.push(workloads::watch(&mut ctx, n).await?);
        }
    }
    if options.wants(Workload::Expiry) {
        report.push(workloads::expiry(&mut ctx).await?);
    }
    if options.wants(Workload::Memory) {
        // RSS per instance only means something in a registry holding
        // nothing else, so memory gets a fresh spawned registry when it can.
        let fresh = if target.is_spawned() && ctx.registered() > 0 {
            Some(target::Target::open(&options).await?)
        } else {
            None
        };
        let target = fresh.as_ref().unwrap_or(&target);
        let mut ctx = workloads::Ctx::new(&options, target).await?;
        report.extend(workloads::memory(&mut ctx).await?);
    }
    if options.wants(Workload::Restart) {
        report.extend(restart::restart(&options).await?);
    }
    Ok(report)
}
