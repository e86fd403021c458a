//! The dashboard in a real browser: headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs) driven by Playwright for Python
//! (`tests/python/dashboard.py`, from the `.ci-venv` that `.ci/run`
//! creates). With auth on, the page asks for a token, lists a registered
//! service, is keyboard-navigable, shows a service registered over gRPC
//! without a reload and drops it when it is deregistered, and fits a phone
//! screen; screenshots land in `target/tmp/dashboard/`.
//!
//! The interpreter comes from `REGISTRY_TEST_PYTHON` (else
//! `.ci-venv/bin/python`) and the browser from `REGISTRY_TEST_CHROMIUM`
//! (else `chromium` on PATH). Under CI a missing one fails the test;
//! elsewhere the test is skipped with a message saying how to get it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::{
    api::{self, InstanceExt, deregister_instance, instance, register_request},
    http::HttpServer,
};
use registry::Config;
use registry_api::v1::RegisterRequest;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::Command,
};

const VIEWER: &str = "dashboard-viewer-token";
const OPS: &str = "dashboard-ops-token";

fn skip_or_fail(why: &str) -> Option<(PathBuf, PathBuf)> {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{why}; .ci/run must provide it");
    }
    eprintln!(
        "\n********************************************************************\n\
         SKIPPED dashboard: {why}\n\
         (apt-get install chromium; python3 -m venv .ci-venv && \
         .ci-venv/bin/pip install -r tests/python/requirements.txt)\n\
         ********************************************************************\n"
    );
    None
}

/// (python, chromium), or `None` after explaining (outside CI only).
async fn tools() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("REGISTRY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci-venv/bin/python"));
    let usable = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !usable {
        return skip_or_fail(&format!(
            "no Python with playwright at {}",
            python.display()
        ));
    }
    let chromium = std::env::var_os("REGISTRY_TEST_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .chain([PathBuf::from("/usr/bin")])
                .map(|d| d.join("chromium"))
                .find(|p| p.is_file())
        });
    match chromium {
        Some(c) => Some((python, c)),
        None => skip_or_fail("no chromium on PATH"),
    }
}

fn auth_file() -> PathBuf {
    let roles = r#"
[roles.viewer]
read = ["*"]

[roles.ops]
admin = ["*"]
"#;
    api::auth_file(
        roles,
        &[("viewer", VIEWER, &["viewer"]), ("ops", OPS, &["ops"])],
    )
}

fn with_token<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {OPS}").parse().unwrap());
    req
}

fn register(service: &str, id: &str, addr: &str) -> tonic::Request<RegisterRequest> {
    let instance = instance(service, id).at(addr).meta("version", "1.4.2");
    with_token(register_request(instance, 30_000, 0))
}

#[tokio::test]
async fn dashboard_in_headless_chromium() {
    let Some((python, chromium)) = tools().await else {
        return;
    };
    let auth = auth_file();
    let server = HttpServer::start_with(Config {
        auth_file: Some(auth.clone()),
        ..common::TestServer::no_warmup_config()
    })
    .await;
    let mut grpc = server.client().await;
    grpc.register(register("prod", "prod-1", "10.0.0.1:8002"))
        .await
        .unwrap();

    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dashboard.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--url", &format!("http://{}/", server.http)])
        .args(["--token", VIEWER])
        .arg("--chromium")
        .arg(&chromium)
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run dashboard.py");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> String {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the browser script answered within 60 s")
            .unwrap()
            .expect("the browser script ended early (see its stderr above)")
    };

    assert_eq!(next().await, "SEEN prod");
    grpc.register(register("web", "web-1", "10.0.0.2:8002"))
        .await
        .unwrap();
    stdin.write_all(b"registered web\n").await.unwrap();
    let seen = next().await;
    let ms: u64 = seen
        .strip_prefix("SEEN web ")
        .expect(&seen)
        .parse()
        .unwrap();
    assert!(
        ms < 1000,
        "the new service showed after {ms} ms; the issue asks for within a second"
    );

    grpc.deregister(with_token(deregister_instance("web", "web-1")))
        .await
        .unwrap();
    stdin.write_all(b"deregistered web\n").await.unwrap();
    let gone = next().await;
    let ms: u64 = gone
        .strip_prefix("GONE web ")
        .expect(&gone)
        .parse()
        .unwrap();
    assert!(ms < 1000, "the deregistered service went after {ms} ms");
    assert_eq!(next().await, "OK");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    for shot in ["dashboard-desktop.png", "dashboard-phone.png"] {
        let bytes = std::fs::read(out.join(shot)).expect("screenshot written");
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{shot}"
        );
        eprintln!("screenshot: {}", out.join(shot).display());
    }
    server.stop().await;
    let _ = std::fs::remove_file(auth);
}
