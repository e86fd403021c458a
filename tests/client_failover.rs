//! registry-client end to end: the balanced channel follows the registry.
//! A deregistered or crashed instance stops receiving calls within a second
//! (driven by Watch, not by call failures), and a new one starts receiving.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    prod::{ProdInstance, call_many},
};
use registry_client::{BalancedChannel, RegistryClient, balanced_channel};
use tokio::time::Instant;

/// Calls in batches until `done` holds for one whole batch; panics after
/// `limit`. Returns how long it took.
async fn calls_until(
    channel: &BalancedChannel,
    limit: Duration,
    what: &str,
    done: impl Fn(&HashMap<String, usize>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let seen = call_many(channel, 10).await;
        if done(&seen) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; last batch {seen:?}"
        );
    }
}

fn only(ids: &'static [&'static str]) -> impl Fn(&HashMap<String, usize>) -> bool {
    move |seen| seen.keys().all(|k| ids.contains(&k.as_str()))
}

async fn two_instances(
    server: &TestServer,
    ttl: Duration,
) -> (ProdInstance, ProdInstance, BalancedChannel) {
    let a = ProdInstance::start(&server.url, "prod-a", ttl).await;
    let b = ProdInstance::start(&server.url, "prod-b", ttl).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let channel = balanced_channel(&client, "prod");
    calls_until(&channel, Duration::from_secs(5), "both answer", |seen| {
        seen.contains_key("prod-a") && seen.contains_key("prod-b")
    })
    .await;
    (a, b, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_instance_stops_receiving_calls_and_a_new_one_starts() {
    let server = TestServer::start().await;
    let (mut a, _b, channel) = two_instances(&server, Duration::from_secs(2)).await;

    a.deregister().await;
    let took = calls_until(
        &channel,
        Duration::from_secs(1),
        "prod-a drained",
        only(&["prod-b"]),
    )
    .await;
    // Not a fluke of one batch: it stays that way.
    let seen = call_many(&channel, 30).await;
    assert_eq!(
        seen.get("prod-b"),
        Some(&30),
        "{seen:?} (drained after {took:?})"
    );

    let _c = ProdInstance::start(&server.url, "prod-c", Duration::from_secs(2)).await;
    calls_until(
        &channel,
        Duration::from_secs(2),
        "prod-c receives calls",
        |seen| seen.contains_key("prod-c"),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_stops_receiving_calls_within_a_second() {
    let server = TestServer::start().await;
    // Short TTL: a crashed instance's lease expires in 300 ms and the
    // resulting DELETE reaches the balancer through Watch.
    let (a, _b, channel) = two_instances(&server, Duration::from_millis(300)).await;
    // A resolver of our own shows when the DELETE has gone out: until then
    // the balancer may still route to prod-a's dead address, so a clean
    // batch before it would prove nothing.
    let watcher = RegistryClient::connect(&server.url).await.unwrap();
    let resolver = watcher.resolver("prod");
    let mut views = resolver.subscribe();
    tokio::time::timeout(
        Duration::from_secs(2),
        views.wait_for(|s| s.instances.len() == 2),
    )
    .await
    .expect("resolver sees both")
    .unwrap();

    a.kill();
    tokio::time::timeout(
        Duration::from_secs(1),
        views.wait_for(|s| !s.instances.iter().any(|i| i.id == "prod-a")),
    )
    .await
    .expect("prod-a's lease expires and its DELETE is pushed within 1 s")
    .unwrap();
    calls_until(
        &channel,
        Duration::from_secs(1),
        "killed prod-a dropped from the balancer",
        only(&["prod-b"]),
    )
    .await;
    let seen = call_many(&channel, 30).await;
    assert_eq!(seen.get("prod-b"), Some(&30), "{seen:?}");

    let _c = ProdInstance::start(&server.url, "prod-c", Duration::from_millis(300)).await;
    calls_until(
        &channel,
        Duration::from_secs(2),
        "prod-c receives calls",
        |seen| seen.contains_key("prod-c") && !seen.contains_key("<error>"),
    )
    .await;
    server.stop().await;
}
