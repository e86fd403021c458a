//! Runs the compiled `prod_service` and `prod_client` examples as real
//! processes against an in-process registry: two services register, the
//! client's calls reach both, one service gets SIGTERM, drains, deregisters,
//! and the client carries on with the other.
//!
//! The examples are located with `common::artifacts::example`, which asks
//! cargo to build them and report their paths.

#![cfg(unix)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{
    TestServer,
    api::resolve,
    artifacts::{ExampleProcess, example},
};
use tokio::time::{Instant, timeout};

fn instance_of(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_register_serve_fail_over_and_deregister() {
    // Build first: on a cold target directory this is the slow part.
    let (service, client) = (example("prod_service").await, example("prod_client").await);

    let server = TestServer::start().await;
    let registry = server.url.clone();
    let mut a = ExampleProcess::spawn(
        &service,
        &["--registry", &registry, "--id", "ex-a", "--ttl", "1s"],
    );
    let mut b = ExampleProcess::spawn(
        &service,
        &["--registry", &registry, "--id", "ex-b", "--ttl", "1s"],
    );
    for (p, id) in [(&mut a, "ex-a"), (&mut b, "ex-b")] {
        let line = p.line(Duration::from_secs(20)).await;
        assert!(
            line.starts_with(&format!("prod_service id={id} addr=127.0.0.1:")),
            "{line}"
        );
    }

    // One call, one answer.
    let mut once = ExampleProcess::spawn(&client, &["--registry", &registry]);
    let line = once.line(Duration::from_secs(10)).await;
    assert!(
        line.starts_with("prod_id=233 prod_stock=631 instance=ex-"),
        "{line}"
    );
    assert!(once.child.wait().await.unwrap().success());

    // A loop reaches both instances.
    let mut looping = ExampleProcess::spawn(
        &client,
        &["--registry", &registry, "--loop", "--interval-ms", "20"],
    );
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "client never reached both: {seen:?}"
        );
        let line = looping.line(Duration::from_secs(5)).await;
        let who = instance_of(&line).unwrap_or_else(|| panic!("unexpected line {line}"));
        seen.insert(who.to_owned());
    }

    // SIGTERM: ex-a drains, deregisters, then exits cleanly.
    a.terminate();
    let line = a.line(Duration::from_secs(5)).await;
    assert_eq!(line, "prod_service id=ex-a draining");
    let line = a.line(Duration::from_secs(5)).await;
    assert_eq!(line, "prod_service id=ex-a deregistered");
    let status = timeout(Duration::from_secs(5), a.child.wait())
        .await
        .expect("ex-a exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The client carries on with ex-b: within a second, every answer is
    // from ex-b, and none fails.
    let switched = Instant::now() + Duration::from_secs(1);
    loop {
        let line = looping.line(Duration::from_secs(5)).await;
        if instance_of(&line) == Some("ex-b") {
            break;
        }
        assert!(Instant::now() < switched, "still not only ex-b: {line}");
    }
    for _ in 0..20 {
        let line = looping.line(Duration::from_secs(5)).await;
        assert_eq!(instance_of(&line), Some("ex-b"), "{line}");
    }

    looping.child.kill().await.unwrap();
    b.terminate();
    assert_eq!(
        b.line(Duration::from_secs(5)).await,
        "prod_service id=ex-b draining"
    );
    assert_eq!(
        b.line(Duration::from_secs(5)).await,
        "prod_service id=ex-b deregistered"
    );
    assert!(b.child.wait().await.unwrap().success());
    let left = resolve(&mut server.client().await, "prod").await;
    assert!(left.instances.is_empty(), "{left:?}");
    server.stop().await;
}
