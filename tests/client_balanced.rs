//! registry-client end to end: register, resolve, and call ProdService by
//! name through the balanced channel.

mod common;

use std::time::Duration;

use common::{
    TestServer,
    prod::{ProdInstance, call_many},
};
use registry_client::{RegistryClient, balanced_channel};

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_resolve_and_call_by_name() {
    let server = TestServer::start().await;
    let instance = ProdInstance::start(&server.url, "prod-a", TTL).await;

    let client = RegistryClient::connect(&server.url).await.unwrap();
    let resolved = client.resolve("prod").await.unwrap();
    assert!(resolved.service_known);
    assert_eq!(resolved.instances.len(), 1, "{resolved:?}");
    let found = &resolved.instances[0];
    assert_eq!(found.id, "prod-a");
    assert_eq!(found.address, instance.addr.to_string());
    assert_eq!(
        found.metadata.get("version").map(String::as_str),
        Some("test")
    );
    assert_ne!(found.lease_id, 0);

    let channel = balanced_channel(&client, "prod");
    let seen = call_many(&channel, 5).await;
    assert_eq!(seen.get("prod-a"), Some(&5), "{seen:?}");
    assert_eq!(instance.calls.load(std::sync::atomic::Ordering::Relaxed), 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_all_receive_calls() {
    let server = TestServer::start().await;
    let mut instances = Vec::new();
    for id in ["prod-a", "prod-b", "prod-c"] {
        instances.push(ProdInstance::start(&server.url, id, TTL).await);
    }
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let channel = balanced_channel(&client, "prod");

    let mut total = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !["prod-a", "prod-b", "prod-c"]
        .iter()
        .all(|id| total.contains_key(*id))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all instances answered within 5s: {total:?}"
        );
        for (who, n) in call_many(&channel, 30).await {
            *total.entry(who).or_insert(0) += n;
        }
    }
    assert!(!total.contains_key("<error>"), "{total:?}");
    for instance in &instances {
        assert!(
            instance.calls.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{} got no calls",
            instance.id
        );
    }
    server.stop().await;
}
