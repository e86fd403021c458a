//! The real `registry` binary as a child process, for tests that need what
//! only a process gives: `kill -9` (nothing runs after it, no destructor,
//! no final snapshot), a restart on the same port and data directory, and
//! the daemon's own RSS.
//!
//! Locating the binary: `env!("CARGO_BIN_EXE_registry")` exists only in the
//! `registry` package's tests, and these tests belong to `registry-api`. So,
//! as `tests/examples_run.rs` does for the examples, the binary is built by
//! the same cargo (`env!("CARGO")`, same target directory: a no-op when it
//! is fresh) and its path taken from the `executable` cargo reports. The
//! build also names one example of this package: that makes cargo resolve
//! features with this package's dev-dependencies (tokio's `test-util`...)
//! as `cargo test --test <name>` does, so the registry library it links is
//! the one the test build already compiled instead of a second variant.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use registry_api::v1::registry_client::RegistryClient;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};
use tonic::transport::Channel;

/// Builds the `registry` binary (if needed) once per test process and
/// returns its path.
pub fn registry_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // The same profile as this test (`cargo test --release` soaks).
        let profile: &[&str] = if cfg!(debug_assertions) {
            &[]
        } else {
            &["--release"]
        };
        let output = std::process::Command::new(env!("CARGO"))
            .args(profile)
            .args([
                "build",
                "--quiet",
                "--package",
                "registry",
                "--bin",
                "registry",
                "--package",
                env!("CARGO_PKG_NAME"),
                "--example",
                "prod_service",
                "--message-format=json",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| !set_by_cargo_for_tests(k)))
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build --bin registry");
        assert!(output.status.success(), "cargo build --bin registry failed");
        let stdout = String::from_utf8(output.stdout).unwrap();
        for line in stdout.lines() {
            if line.contains("\"reason\":\"compiler-artifact\"")
                && line.contains("\"kind\":[\"bin\"]")
                && line.contains("\"name\":\"registry\"")
                && let Some(start) = line.find("\"executable\":\"")
            {
                let rest = &line[start + "\"executable\":\"".len()..];
                let path = PathBuf::from(&rest[..rest.find('"').unwrap()]);
                assert!(path.exists(), "{path:?}");
                return path;
            }
        }
        panic!("cargo reported no executable for the registry binary");
    })
}

/// Variables cargo sets for a test process. Passed on to the nested cargo
/// they would invalidate build scripts that watch them (`ring` reruns on a
/// change of `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME`), and every crate
/// above `ring` would be rebuilt by each cargo in turn.
fn set_by_cargo_for_tests(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Log lines kept for a failure message.
const LOG_TAIL: usize = 40;

/// One `registry` process, restartable on the same address with the same
/// flags (and so the same `--data-dir`).
pub struct BinaryServer {
    /// Bound address (127.0.0.1:port); the same across restarts.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`, what clients dial.
    pub url: String,
    args: Vec<String>,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl BinaryServer {
    /// Starts the binary on a free loopback port with these extra flags.
    pub async fn start(args: &[&str]) -> Self {
        let mut server = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            url: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
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

    /// `kill -9`, then a start with the same flags on the same address.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }

    /// Starts the process on `self.addr`, retrying while the port is still
    /// held by the previous process (the new one then exits at once).
    async fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((child, addr)) = self.try_spawn().await {
                self.child = Some(child);
                self.addr = addr;
                self.url = format!("http://{addr}");
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

    async fn try_spawn(&self) -> Option<(Child, SocketAddr)> {
        let mut child = Command::new(registry_binary())
            .args(["--listen", &self.addr.to_string()])
            .args(["--http-listen", "off"])
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
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let addr = line
                    .contains("registry listening")
                    .then(|| line.split("addr=").nth(1))
                    .flatten()
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                push(line);
                if addr.is_some() {
                    return addr;
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
        let addr = addr?;
        // Keep draining stderr so the daemon never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                push(line);
            }
        });
        Some((child, addr))
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
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
