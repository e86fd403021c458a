//! registry-client end to end: one-shot resolve and the Watch-fed resolver
//! cache — unknown vs. empty services, live updates, selectors, and tasks
//! that end with their handles.

mod common;

use std::time::Duration;

use common::{TestServer, wait_until};
use futures::StreamExt;
use registry_api::v1::StatusRequest;
use registry_client::{
    Instance, Query, RegistryClient, ResolverState, ServiceStatus, balanced_channel,
};
use tokio::{sync::watch, time::timeout};

async fn wait_view(
    rx: &mut watch::Receiver<ResolverState>,
    what: &str,
    ids: &[&str],
) -> ResolverState {
    let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.instances.iter().map(|i| i.id.clone()).collect::<Vec<_>>() == want),
    )
    .await
    .unwrap_or_else(|_| panic!("resolver never showed {what}: {ids:?}"))
    .unwrap()
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_differs_from_known_with_zero_instances() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();

    let nope = client.resolve("nope").await.unwrap();
    assert!(!nope.service_known);
    assert!(nope.instances.is_empty());
    let state = timeout(Duration::from_secs(2), client.resolver("nope").ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, ServiceStatus::Unknown);
    assert!(state.connected);

    let reg = client
        .register(Instance::new("gone", "127.0.0.1:5001"))
        .await
        .unwrap();
    reg.deregister().await.unwrap();
    let gone = client.resolve("gone").await.unwrap();
    assert!(gone.service_known);
    assert!(gone.instances.is_empty());
    let state = timeout(Duration::from_secs(2), client.resolver("gone").ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.status, ServiceStatus::Known);
    assert!(state.instances.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_follows_registrations_and_notifies_changes() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let resolver = client.resolver("prod");
    let mut rx = resolver.subscribe();
    let mut updates = resolver.updates();
    let first = resolver.ready().await.unwrap();
    assert_eq!(first.status, ServiceStatus::Unknown);

    let a = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("a"))
        .await
        .unwrap();
    let view = wait_view(&mut rx, "a", &["a"]).await;
    assert_eq!(
        view.status,
        ServiceStatus::Known,
        "a PUT makes the name known"
    );
    assert_eq!(view.instances[0].address, "127.0.0.1:5001");
    let b = client
        .register(
            Instance::new("prod", "127.0.0.1:5002")
                .with_id("b")
                .with_metadata("version", "2"),
        )
        .await
        .unwrap();
    wait_view(&mut rx, "a and b", &["a", "b"]).await;
    // Same id, new address: replaced in place.
    let a2 = client
        .register(Instance::new("prod", "127.0.0.1:6001").with_id("a"))
        .await
        .unwrap();
    drop(a); // an older handle for the same id must not remove its successor
    let view = timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.instances.iter().any(|i| i.address == "127.0.0.1:6001")),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(view.instances.len(), 2);
    a2.deregister().await.unwrap();
    wait_view(&mut rx, "only b", &["b"]).await;
    assert_eq!(resolver.instances().len(), 1);

    // The stream view saw the same story, ending with only b.
    let streamed = timeout(Duration::from_secs(2), async {
        loop {
            let s = updates.next().await.unwrap();
            if s.instances.len() == 1 && s.instances[0].id == "b" {
                return s;
            }
        }
    })
    .await
    .expect("updates stream reaches the final view");
    assert_eq!(streamed.status, ServiceStatus::Known);

    // A selector only sees matching instances.
    let v2 = client.resolver(Query::new("prod").with_selector("version", "2"));
    let s = v2.ready().await.unwrap();
    assert_eq!(s.instances.len(), 1);
    assert_eq!(s.instances[0].id, "b");
    let resolved = client
        .resolve(Query::new("prod").with_selector("version", "3"))
        .await
        .unwrap();
    assert!(resolved.instances.is_empty());
    drop(b);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_tasks_end_with_their_resolver_and_channel() {
    let server = TestServer::start().await;
    let raw = server.client().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let watchers = || {
        let mut raw = raw.clone();
        async move {
            raw.status(StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .watchers
        }
    };

    let resolver = client.resolver("prod");
    resolver.ready().await.unwrap();
    let copy = resolver.clone();
    wait_until(Duration::from_secs(2), "one watcher", || async {
        watchers().await == 1
    })
    .await;
    drop(resolver);
    // A clone keeps the watch alive.
    assert!(copy.ready().await.is_ok());
    assert_eq!(watchers().await, 1);
    drop(copy);
    wait_until(Duration::from_secs(2), "resolver's watch gone", || async {
        watchers().await == 0
    })
    .await;

    let channel = balanced_channel(&client, "prod");
    wait_until(Duration::from_secs(2), "channel's watcher", || async {
        watchers().await == 1
    })
    .await;
    let clone = channel.clone();
    drop(channel);
    drop(clone);
    wait_until(Duration::from_secs(2), "channel's watch gone", || async {
        watchers().await == 0
    })
    .await;
    server.stop().await;
}
