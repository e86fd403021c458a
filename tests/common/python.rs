//! The stock Python grpcio client of the xDS interop tests: finding the
//! interpreter, generating the ProdService stubs, the xDS bootstrap.
//!
//! The interpreter comes from `REGISTRY_TEST_PYTHON` (which `.ci/run`
//! exports for the virtualenv it creates), else `.ci-venv/bin/python` in
//! the workspace. Under CI (`CI` set) a missing or incomplete interpreter
//! fails the test; elsewhere the test is skipped with a message saying how
//! to get one.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::process::Command;

/// The interpreter to use, or `None` (after explaining) to skip `test`.
pub async fn python(test: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidate = std::env::var_os("REGISTRY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci-venv/bin/python"));
    let usable = Command::new(&candidate)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if usable {
        return Some(candidate);
    }
    let why = format!(
        "no Python with grpcio and grpcio-tools at {} (set REGISTRY_TEST_PYTHON, or run \
         `python3 -m venv .ci-venv && .ci-venv/bin/pip install -r tests/python/requirements.txt`)",
        candidate.display()
    );
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{why}; .ci/run must create it");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Generates prod_pb2 / prod_pb2_grpc into `dir` with grpcio-tools.
pub async fn generate_stubs(python: &Path, dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg("-m")
        .arg("grpc_tools.protoc")
        .arg(format!("-I{}", root.join("proto/examples").display()))
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(root.join("proto/examples/prod.proto"))
        .output()
        .await
        .expect("run grpc_tools.protoc");
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The gRPC xDS bootstrap pointing at the registry at `addr`.
pub fn bootstrap(addr: std::net::SocketAddr, node_id: &str) -> String {
    format!(
        r#"{{
  "xds_servers": [{{
    "server_uri": "{addr}",
    "channel_creds": [{{"type": "insecure"}}],
    "server_features": ["xds_v3"]
  }}],
  "node": {{"id": "{node_id}", "locality": {{"zone": "test"}}}}
}}"#
    )
}

/// Starts `tests/python/xds_client.py` against `target` (its stdin piped:
/// closing it stops the client), with stubs and bootstrap in `dir`.
pub async fn xds_client(
    python: &Path,
    dir: &Path,
    registry: std::net::SocketAddr,
    target: &str,
    seconds: u32,
) -> tokio::process::Child {
    generate_stubs(python, dir).await;
    let bootstrap_path = dir.join("bootstrap.json");
    std::fs::write(&bootstrap_path, bootstrap(registry, "xds-python-test")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/xds_client.py");
    Command::new(python)
        .arg(&script)
        .args([target, &seconds.to_string(), "0.01"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap_path)
        .env("PYTHONPATH", dir)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python client")
}
