//! The workspace's own executables, for the tests that run them as
//! processes: the `registry` daemon, `regctl` and the examples.
//!
//! `env!("CARGO_BIN_EXE_*")` exists only for the `[[bin]]` targets of a
//! test's own package (the daemon is the `registry` package's, these tests
//! are `registry-api`'s), and `cargo test --test x` builds no examples. So
//! the first call in a test process runs one nested cargo that builds the
//! daemon and every example of this package, and takes their paths from the
//! `executable` fields cargo reports: exact whatever `CARGO_TARGET_DIR`,
//! profile or target triple is in use. It is the same cargo (`$CARGO`) on
//! the same target directory, so when they are fresh (always after the
//! `cargo test --workspace` of CI, which builds the examples) it is a
//! no-op of about a second.
//!
//! It must not rebuild what the test build compiled:
//! - Features: resolver 2 activates dev-dependencies' features only when a
//!   target that needs them is built. Building this package's examples
//!   does, and from this package every workspace member is reachable
//!   through dev-dependencies, so the features are those of
//!   `cargo test --workspace` and `cargo test --test x`. A plain
//!   `cargo build -p registry --bin registry` would resolve without them
//!   (tokio without `test-util`...) and build tokio, tonic and the daemon a
//!   second time.
//! - Environment: the variables cargo sets for a running test are not
//!   passed on. Some build scripts (ring's) rerun when `CARGO_MANIFEST_DIR`
//!   or a `CARGO_PKG_*` variable appears or changes, and every crate above
//!   them would then be rebuilt by each cargo in turn.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout},
};

/// The `registry` daemon binary. `REGISTRY_BIN` overrides it (e.g. a
/// release build for a long fault-injection run).
pub async fn registry_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REGISTRY_BIN") {
        return path.into();
    }
    artifact("bin", "registry").await
}

/// The `regctl` command line (a binary of `registry-client`).
pub async fn regctl_binary() -> PathBuf {
    artifact("bin", "regctl").await
}

/// An example of this package (`examples/<name>.rs`).
pub async fn example(name: &str) -> PathBuf {
    artifact("example", name).await
}

/// The executable of a target of kind `kind` ("bin", "example") named
/// `name`, from the one nested build of this test process. The first call
/// may build for minutes, so callers ask before they start anything
/// time-bound; it runs on tokio's blocking pool.
async fn artifact(kind: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<HashMap<(String, String), PathBuf>> = OnceLock::new();
    let key = (kind.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let built = BUILT.get_or_init(build);
        built
            .get(&key)
            .unwrap_or_else(|| panic!("cargo built no {key:?}; it built {built:?}"))
            .clone()
    })
    .await
    .expect("build the workspace's executables")
}

/// Builds the daemon and this package's examples; their executables by
/// (kind, name).
fn build() -> HashMap<(String, String), PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.arg("build");
    // The same profile as this test (`cargo test --release` soaks).
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    cargo
        .args(["--quiet", "--message-format=json-render-diagnostics"])
        .args(["--package", "registry", "--bin", "registry"])
        .args(["--package", "registry-client", "--bin", "regctl"])
        .args(["--package", env!("CARGO_PKG_NAME"), "--examples"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if set_by_cargo_for_tests(&key) {
            cargo.env_remove(&*key);
        }
    }
    let output = cargo.output().expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build of the registry binary and the examples failed (its errors are above)"
    );
    let stdout = String::from_utf8(output.stdout).expect("cargo's JSON is UTF-8");
    let mut built = HashMap::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(executable), Some(name), Some(kinds)) = (
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
            message["target"]["kind"].as_array(),
        ) else {
            continue;
        };
        assert!(Path::new(executable).exists(), "{executable}");
        for kind in kinds.iter().filter_map(|k| k.as_str()) {
            built.insert((kind.to_owned(), name.to_owned()), executable.into());
        }
    }
    built
}

/// Variables cargo sets for a test process (and for build scripts), which
/// a nested cargo must not inherit: see the module documentation.
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

/// An example run as a process, its stdout read line by line (what the
/// examples print is their interface: address, answers, deregistration).
/// Killed on drop.
pub struct ExampleProcess {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ExampleProcess {
    /// Spawns the executable at `path` (from [`example`]) with `args`.
    pub fn spawn(path: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(path, args, &[])
    }

    /// [`ExampleProcess::spawn`] with these environment variables. No
    /// `OTEL_*` variable of the test's own environment is passed on: an
    /// example exports spans only to a collector the test names.
    pub fn spawn_with_env(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = tokio::process::Command::new(path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", path.display()));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// The next stdout line, failing after `limit`.
    pub async fn line(&mut self, limit: Duration) -> String {
        tokio::time::timeout(limit, self.lines.next_line())
            .await
            .expect("example printed nothing in time")
            .expect("read example stdout")
            .expect("example closed stdout")
    }

    /// SIGTERM: the examples deregister, then exit.
    pub fn terminate(&self) {
        super::binary::send_signal(self.child.id().expect("running"), "-TERM");
    }

    /// Waits at most `limit` for the process to exit, and asserts it
    /// exited with success.
    pub async fn exits_cleanly(&mut self, limit: Duration) {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("example did not exit in time")
            .expect("wait for the example");
        assert!(status.success(), "example exited with {status:?}");
    }
}
