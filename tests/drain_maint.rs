//! Drain and maintenance (issue 17) through the real `regctl` binary and
//! through client-lib, with auth on: the instance's owner and an admin may
//! drain it or put it in maintenance, another identity with the same role
//! and a read-only one may not; a drained or disabled instance leaves
//! Resolve and the Watch at once while its lease stays, and `maint off`
//! brings it back.

#![cfg(unix)]

mod common;

use std::{path::PathBuf, time::Duration};

use common::{TestServer, api};
use futures::StreamExt;
use registry::Config;
use registry_client::{
    AdminState, DeleteReason, Instance, RegistryClient, WatchEvent, WatchOptions,
};
use serde_json::Value;
use tokio::{process::Command, time::timeout};

const PROD: &str = "prod-secret";
const OTHER: &str = "other-prod-secret";
const READER: &str = "reader-secret";
const ADMIN: &str = "admin-secret";

fn auth_file() -> PathBuf {
    let roles = r#"
[roles.prod]
register = ["prod"]
read = ["prod"]

[roles.reader]
read = ["*"]

[roles.ops]
admin = ["*"]
"#;
    api::auth_file(
        roles,
        &[
            ("prod-deployer", PROD, &["prod"]),
            ("prod-other", OTHER, &["prod"]),
            ("dashboard", READER, &["reader"]),
            ("oncall", ADMIN, &["ops"]),
        ],
    )
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn regctl(bin: &PathBuf, url: &str, token: &str, args: &[&str]) -> Out {
    let out = timeout(
        Duration::from_secs(20),
        Command::new(bin)
            .args(["--registry", url, "--token", token])
            .args(args)
            .env_remove("REGISTRY_ADDR")
            .env_remove("REGISTRY_TOKEN")
            .output(),
    )
    .await
    .expect("regctl finished in time")
    .expect("run regctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn connect(url: &str, token: &str) -> RegistryClient {
    RegistryClient::builder()
        .address(url)
        .token(token)
        .connect()
        .await
        .unwrap()
}

/// Ids a default Resolve serves.
async fn served(client: &RegistryClient) -> Vec<String> {
    let mut ids: Vec<String> = client
        .resolve("prod")
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_maintenance_through_regctl_follow_auth() {
    let regctl_bin = common::artifacts::regctl_binary().await;
    let auth = auth_file();
    let server = TestServer::start_with(Config {
        auth_file: Some(auth.clone()),
        // Two instances of three out of rotation must not trip panic mode.
        panic: registry::serving::PanicThresholds::new(0.0),
        ..TestServer::no_warmup_config()
    })
    .await;
    let url = server.url.clone();
    let owner = connect(&url, PROD).await;
    let mut regs = Vec::new();
    for id in ["d-1", "d-2", "d-3"] {
        regs.push(
            owner
                .register(Instance::new("prod", "127.0.0.1:7001").with_id(id))
                .ttl(Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    assert_eq!(served(&owner).await, ["d-1", "d-2", "d-3"]);
    let mut watch = owner.watch("prod", WatchOptions::default());
    let first = timeout(Duration::from_secs(5), watch.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(WatchEvent::Snapshot(_)))));

    // Another identity with the same role, and a reader: denied, nothing
    // changes.
    for (token, what) in [(OTHER, "another identity"), (READER, "a reader")] {
        let out = regctl(&regctl_bin, &url, token, &["drain", "prod", "d-1"]).await;
        assert_eq!(out.code, 1, "{what} may not drain: {}", out.stdout);
        assert!(
            out.stderr.contains("registered by another identity")
                || out.stderr.contains("may not register service \"prod\""),
            "{what}: {}",
            out.stderr
        );
        let out = regctl(&regctl_bin, &url, token, &["maint", "on", "prod", "d-1"]).await;
        assert_eq!(out.code, 1, "{what} may not disable: {}", out.stdout);
    }
    assert_eq!(served(&owner).await, ["d-1", "d-2", "d-3"]);

    // The owner drains d-1: it leaves Resolve and the watch at once, and
    // stays registered, draining, with the reason.
    let out = regctl(
        &regctl_bin,
        &url,
        PROD,
        &["drain", "prod", "d-1", "--reason", "deploy 42"],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("prod/d-1 is draining at revision"),
        "{}",
        out.stdout
    );
    assert_eq!(served(&owner).await, ["d-2", "d-3"]);
    let ev = timeout(Duration::from_secs(5), async {
        loop {
            match watch.next().await {
                Some(Ok(WatchEvent::Progress { .. })) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch hears of the drain at once");
    match ev {
        Some(Ok(WatchEvent::Delete {
            instance, reason, ..
        })) => {
            assert_eq!(instance.id, "d-1");
            assert_eq!(reason, DeleteReason::NotServing);
        }
        other => panic!("expected a NotServing delete, got {other:?}"),
    }
    let out = regctl(
        &regctl_bin,
        &url,
        READER,
        &["-o", "json", "resolve", "prod", "--all"],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let d1 = json["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "d-1")
        .expect("still registered");
    assert_eq!(d1["admin_state"], "draining");
    assert_eq!(d1["admin_reason"], "deploy 42");

    // An admin puts d-2 in maintenance, then takes it out.
    let out = regctl(
        &regctl_bin,
        &url,
        ADMIN,
        &["maint", "on", "prod", "d-2", "--reason", "disk swap"],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(served(&owner).await, ["d-3"]);
    let all = owner.resolve("prod").include_not_serving().await.unwrap();
    let d2 = all.instances.iter().find(|i| i.id == "d-2").unwrap();
    assert_eq!(
        (d2.admin_state, d2.admin_reason.as_str()),
        (AdminState::Disabled, "disk swap")
    );
    let out = regctl(&regctl_bin, &url, ADMIN, &["maint", "off", "prod", "d-2"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(served(&owner).await, ["d-2", "d-3"]);
    // The other identity cannot take the owner's instance out of
    // maintenance either.
    let out = regctl(&regctl_bin, &url, OTHER, &["maint", "off", "prod", "d-1"]).await;
    assert_eq!(out.code, 1);
    // The owner can, with regctl or with client-lib.
    let out = regctl(&regctl_bin, &url, PROD, &["maint", "off", "prod", "d-1"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(served(&owner).await, ["d-1", "d-2", "d-3"]);

    // client-lib: Registration::drain, and back.
    regs[2].drain("shutting down").await.unwrap();
    assert_eq!(served(&owner).await, ["d-1", "d-2"]);
    regs[2].set_state(AdminState::Active, "").await.unwrap();
    assert_eq!(served(&owner).await, ["d-1", "d-2", "d-3"]);
    // A non-owner through client-lib is denied with PermissionDenied.
    let other = connect(&url, OTHER).await;
    let err = other
        .set_instance_state("prod", "d-3", AdminState::Draining, "no")
        .await
        .unwrap_err();
    assert_eq!(
        err.status().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied),
        "{err}"
    );

    drop(regs);
    server.stop().await;
    let _ = std::fs::remove_file(auth);
}
