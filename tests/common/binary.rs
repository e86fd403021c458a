//! The real `registry` binary as a child process, for tests that need what
//! only a process gives: `kill -9` (nothing runs after it, no destructor,
//! no final snapshot), a restart on the same port and data directory, and
//! the daemon's own RSS, signals and exit codes.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use registry_api::v1::registry_client::RegistryClient;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};
use tonic::transport::Channel;

use super::artifacts::registry_binary;

/// Log lines kept for a failure message.
const LOG_TAIL: usize = 40;

/// One `registry` process, restartable on the same address with the same
/// flags (and so the same `--data-dir`).
pub struct BinaryServer {
    /// Bound address (127.0.0.1:port); the same across restarts.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`, what clients dial.
    pub url: String,
    /// The operations endpoint (`/metrics`, `/healthz`), when the flags
    /// name `--metrics-listen`; learned from the log at each start.
    pub ops: Option<SocketAddr>,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl BinaryServer {
    /// Starts the binary on a free loopback port with these extra flags.
    /// The HTTP API is off unless they name `--http-listen` (its default
    /// is a fixed port, and tests bind none).
    pub async fn start(args: &[&str]) -> Self {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.iter().any(|a| a == "--http-listen") {
            args.extend(["--http-listen".to_owned(), "off".to_owned()]);
        }
        let binary = registry_binary().await;
        let mut server = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            url: String::new(),
            ops: None,
            binary,
            args,
            child: None,
            log: Arc::default(),
        };
        server.spawn().await;
        server
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("registry process is running")
    }

    /// The daemon's resident set size (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line");
        kib * 1024
    }

    /// The last lines the daemon logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// A raw generated client on a connection of its own.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channel().await)
    }

    /// A new connection to the daemon.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to registry at {}: {e}", self.url))
    }

    /// `kill -9`: the process gets no chance to run anything. Returns once
    /// it has been reaped.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // tokio's kill() is SIGKILL on unix.
            child.kill().await.expect("SIGKILL the registry");
        }
    }

    /// Sends `signal` (`-TERM`, `-HUP`, ...).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// Waits at most `limit` for the process to exit on its own.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("registry process is running");
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status.expect("wait for the registry process"),
            Err(_) => {
                self.child = Some(child);
                panic!(
                    "registry did not exit within {limit:?}; its log:\n{}",
                    self.log_tail()
                )
            }
        }
    }

    /// `kill -9`, then a start with the same flags on the same address.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.start_again().await;
    }

    /// After [`BinaryServer::kill9`] or an exit: a new process with the
    /// same flags on the same address (and data directory, if any).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the registry process still runs");
        self.spawn().await;
    }

    /// Every line the daemon logged that is still kept (the last
    /// [`LOG_TAIL`]).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().cloned().collect()
    }

    /// Starts the process on `self.addr`, retrying while the port is still
    /// held by the previous process (the new one then exits at once).
    async fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((child, addr, ops)) = self.try_spawn().await {
                self.child = Some(child);
                self.addr = addr;
                self.url = format!("http://{addr}");
                self.ops = ops;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start on {} within 20 s; its log:\n{}",
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One process: its gRPC address and operations endpoint as logged,
    /// or `None` if it exited before it logged them (port still taken).
    async fn try_spawn(&self) -> Option<(Child, SocketAddr, Option<SocketAddr>)> {
        let mut child = Command::new(&self.binary)
            .args(["--listen", &self.addr.to_string()])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn registry binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = self.log.clone();
        let push = move |line: String| {
            let mut log = log.lock().unwrap();
            if log.len() == LOG_TAIL {
                log.pop_front();
            }
            log.push_back(line);
        };
        let want_ops = self.args.iter().any(|a| a == "--metrics-listen");
        let addrs = tokio::time::timeout(Duration::from_secs(20), async {
            let (mut grpc, mut ops) = (None, None);
            while let Ok(Some(line)) = lines.next_line().await {
                grpc = grpc.or_else(|| logged_addr(&line, "registry listening"));
                ops = ops.or_else(|| logged_addr(&line, "metrics and health endpoint listening"));
                push(line);
                if let Some(grpc) = grpc
                    && (ops.is_some() || !want_ops)
                {
                    return Some((grpc, ops));
                }
            }
            None
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "registry logged no address within 20 s:\n{}",
                self.log_tail()
            )
        });
        let (grpc, ops) = addrs?;
        // Keep draining stderr so the daemon never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                push(line);
            }
        });
        Some((child, grpc, ops))
    }
}

/// The `addr` of a log line whose message is `message`, in either log
/// format (`--log-format json` or text: `... message addr=host:port`).
fn logged_addr(line: &str, message: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &v["fields"];
        if fields["message"].as_str() != Some(message) {
            return None;
        }
        return fields["addr"].as_str()?.parse().ok();
    }
    if !line.contains(message) {
        return None;
    }
    line.split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// `kill <signal> <pid>`; panics if it fails.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Waits until the daemon answers Status (a restarted process logs its
/// address once it serves, so this is normally immediate).
pub async fn wait_ready(server: &BinaryServer) -> RegistryClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
        {
            let mut client = RegistryClient::new(channel);
            if client
                .status(registry_api::v1::StatusRequest {})
                .await
                .is_ok()
            {
                return client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "registry at {} does not answer Status; its log:\n{}",
            server.url,
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
