//! The registry under test: an address given with `--registry`, or a
//! `registry` binary spawned on a free loopback port and killed on drop; plus
//! the `/proc` figures the memory workload and CPU notes read.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use registry_api::v1::{StatusRequest, registry_client::RegistryClient};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::{BenchError, Options};

/// How long a spawned registry may take to answer Status.
const SPAWN_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Linux reports process CPU time in clock ticks of 1/100 s on every
/// architecture we run on (`getconf CLK_TCK`).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Flags a spawned registry gets so no workload hits a cap meant for
/// production: 3M leases and 1M instances per service cover workload 7 at
/// 1,000,000 instances on top of everything else in an `all` run, and a
/// 100 ms minimum TTL lets `--smoke` expire leases quickly. The per-identity
/// rate limit is off: every workload comes from one loopback address.
const SPAWN_FLAGS: &[&str] = &[
    "--http-listen",
    "off",
    "--rate-limit",
    "0",
    "--max-instances",
    "3000000",
    "--min-ttl",
    "100ms",
    "--max-leases",
    "3000000",
    "--max-instances-per-service",
    "1000000",
    "--warmup",
    "0s",
];

/// The registry being driven.
#[derive(Debug)]
pub(crate) struct Target {
    /// `http://127.0.0.1:port`.
    pub(crate) url: String,
    /// Its process, when known (spawned, or `--registry-pid`).
    pub(crate) pid: Option<u32>,
    child: Option<Child>,
}

impl Target {
    /// The registry named by the options: `--registry`, else `--spawn-registry`,
    /// else the `registry` binary next to the running executable.
    pub(crate) async fn open(options: &Options) -> Result<Self, BenchError> {
        if let Some(url) = &options.registry {
            return Ok(Self {
                url: url.clone(),
                pid: options.registry_pid,
                child: None,
            });
        }
        let path = match &options.spawn_registry {
            Some(p) => p.clone(),
            None => sibling_registry()?,
        };
        Self::spawn(&path).await
    }

    /// The `registry` binary the options name (`--spawn-registry`, else the
    /// one next to this executable), for workloads that start their own.
    pub(crate) fn binary(options: &Options) -> Result<PathBuf, BenchError> {
        match &options.spawn_registry {
            Some(p) => Ok(p.clone()),
            None => sibling_registry(),
        }
    }

    /// A free loopback `host:port` (bound, then released).
    pub(crate) fn free_listen() -> Result<String, BenchError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|source| BenchError::Io {
                what: "finding a free loopback port".into(),
                source,
            })?
            .port();
        Ok(format!("127.0.0.1:{port}"))
    }

    /// SIGKILL, as a crash: nothing is flushed or drained.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether this process started the registry (and so may restart it).
    pub(crate) fn is_spawned(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn(path: &Path) -> Result<Self, BenchError> {
        // Bind port 0 to learn a free port, release it, hand it over. The
        // race with another process grabbing it in between is harmless here:
        // the registry then fails to bind and we report it.
        Self::spawn_at(path, &Self::free_listen()?, &[]).await
    }

    /// Spawns `path` on `listen` with extra flags, and waits until it
    /// answers Status.
    pub(crate) async fn spawn_at(
        path: &Path,
        listen: &str,
        extra: &[String],
    ) -> Result<Self, BenchError> {
        let mut child = Command::new(path)
            .arg("--listen")
            .arg(listen)
            .args(SPAWN_FLAGS)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("spawning {}", path.display()),
                source,
            })?;
        let pid = child.id();
        let url = format!("http://{listen}");
        let deadline = Instant::now() + SPAWN_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::Setup(format!(
                    "{} exited before serving: {status}",
                    path.display()
                )));
            }
            if let Ok(mut client) = RegistryClient::connect(url.clone()).await
                && client.status(StatusRequest {}).await.is_ok()
            {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Setup(format!(
                    "{} did not answer on {listen} within {SPAWN_READY_TIMEOUT:?}",
                    path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(%url, pid, "spawned {}", path.display());
        Ok(Self {
            url,
            pid: Some(pid),
            child: Some(child),
        })
    }

    /// `n` separate HTTP/2 connections to the registry.
    pub(crate) async fn connect(&self, n: usize) -> Result<Vec<Channel>, BenchError> {
        connect(&self.url, n).await
    }

    /// Resident set size of the registry process, if its PID is known.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        self.pid.and_then(|pid| rss_bytes(pid).ok())
    }

    /// CPU time (user + system) the registry process has used so far, when
    /// it is another process (in-process, it cannot be told from ours).
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        self.pid
            .filter(|pid| *pid != std::process::id())
            .and_then(|pid| cpu_time(&pid.to_string()))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sibling_registry() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(|source| BenchError::Io {
        what: "locating registry-bench".into(),
        source,
    })?;
    let path = exe.with_file_name("registry");
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Setup(format!(
            "no --registry or --spawn-registry given, and no registry binary at {}",
            path.display()
        )))
    }
}

/// `n` separate HTTP/2 connections to `url` (each `Endpoint::connect` dials
/// its own), Nagle off like the server side.
pub(crate) async fn connect(url: &str, n: usize) -> Result<Vec<Channel>, BenchError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| BenchError::Connect {
            url: url.to_string(),
            source,
        })?
        .tcp_nodelay(true);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            endpoint
                .connect()
                .await
                .map_err(|source| BenchError::Connect {
                    url: url.to_string(),
                    source,
                })?,
        );
    }
    Ok(out)
}

/// VmRSS of a process from `/proc/PID/status`, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// User + system CPU time of a process (`self` or a PID) from `/proc/*/stat`.
pub(crate) fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after its ')'
    // start at field 3, so utime and stime (14 and 15) are at 11 and 12.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_SEC))
}
