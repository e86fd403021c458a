//! registry-client end to end: how a balanced channel spreads calls.
//! Weights split sequential calls in proportion; a caller in a zone stays
//! in it while it is healthy and leaves it within a second when its
//! instances die; an instance that stops answering is ejected after at most
//! three failed calls and gets none until its address answers again.

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{
    TestServer,
    prod::{BareServer, ProdInstance, Spec, call_many},
};
use registry_api::prod::{ProductRequest, prod_service_client::ProdServiceClient};
use registry_client::{BalancedChannel, OutlierDetection, RegistryClient, RetryPolicy};
use tokio::time::Instant;

/// Waits until the channel's view holds `n` instances (the balancer has
/// them all), so call counts measure the choice, not the discovery.
async fn wait_for_endpoints(channel: &BalancedChannel, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while channel.stats().endpoints.len() < n {
        assert!(Instant::now() < deadline, "{:?}", channel.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn share(seen: &HashMap<String, usize>, ids: &[&str]) -> f64 {
    let total: usize = seen.values().sum();
    let hit: usize = ids.iter().filter_map(|id| seen.get(*id)).sum();
    hit as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_one_to_three_split_two_thousand_calls() {
    let server = TestServer::start().await;
    let ttl = Duration::from_secs(5);
    let _light = ProdInstance::start_with(&server.url, Spec::new("light", ttl).weight(1)).await;
    let _heavy = ProdInstance::start_with(&server.url, Spec::new("heavy", ttl).weight(3)).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let channel = registry_client::balanced_channel(&client, "prod");
    wait_for_endpoints(&channel, 2).await;

    let seen = call_many(&channel, 2000).await;
    assert_eq!(seen.get("<error>"), None, "{seen:?}");
    let heavy = share(&seen, &["heavy"]);
    assert!(
        (0.71..=0.79).contains(&heavy),
        "weight 3 of 4 got {:.1}% of 2000 calls: {seen:?}",
        heavy * 100.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_apply_live() {
    let server = TestServer::start().await;
    let ttl = Duration::from_secs(5);
    let _a = ProdInstance::start_with(&server.url, Spec::new("a", ttl)).await;
    let b = ProdInstance::start_with(&server.url, Spec::new("b", ttl)).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let channel = registry_client::balanced_channel(&client, "prod");
    wait_for_endpoints(&channel, 2).await;
    let even = share(&call_many(&channel, 400).await, &["b"]);
    assert!((0.4..=0.6).contains(&even), "{even}");

    // b registers again (same id and address) with weight 9.
    let operator = RegistryClient::connect(&server.url).await.unwrap();
    let reweighted = operator
        .register(
            registry_client::Instance::new("prod", b.addr.to_string())
                .with_id("b")
                .with_weight(9),
        )
        .ttl(ttl)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !channel
        .stats()
        .endpoints
        .iter()
        .any(|e| e.id == "b" && e.weight == 9)
    {
        assert!(Instant::now() < deadline, "{:?}", channel.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let heavy = share(&call_many(&channel, 400).await, &["b"]);
    assert!((0.85..=0.95).contains(&heavy), "weight 9 of 10: {heavy}");
    drop(reweighted);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_a_caller_stays_in_zone_a_and_fails_over_to_b_within_a_second() {
    let server = TestServer::start().await;
    // Leases outlive the test: only the balancer can move the calls.
    let ttl = Duration::from_secs(10);
    let a1 = ProdInstance::start_with(&server.url, Spec::new("a1", ttl).zone("a")).await;
    let a2 = ProdInstance::start_with(&server.url, Spec::new("a2", ttl).zone("a")).await;
    let _b1 = ProdInstance::start_with(&server.url, Spec::new("b1", ttl).zone("b")).await;
    let _b2 = ProdInstance::start_with(&server.url, Spec::new("b2", ttl).zone("b")).await;
    let client = RegistryClient::builder()
        .address(&server.url)
        .zone("a")
        .connect()
        .await
        .unwrap();
    let channel = registry_client::balanced_channel(&client, "prod");
    wait_for_endpoints(&channel, 4).await;

    let seen = call_many(&channel, 400).await;
    let local = share(&seen, &["a1", "a2"]);
    assert!(local >= 0.95, "zone a got {:.1}%: {seen:?}", local * 100.0);
    assert!(
        seen.contains_key("a1") && seen.contains_key("a2"),
        "{seen:?}"
    );

    a1.kill();
    a2.kill();
    let killed = Instant::now();
    let mut prod = ProdServiceClient::new(channel.clone());
    let mut in_b = 0;
    let mut failed = 0;
    while in_b < 50 {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "still not in zone b 1 s after zone a died: {:?}",
            channel.stats()
        );
        match prod
            .get_product_stock(ProductRequest { prod_id: 233 })
            .await
        {
            Ok(r) if r.get_ref().instance_id.starts_with('b') => in_b += 1,
            Ok(r) => panic!("answered by dead zone a? {r:?}"),
            Err(e) => {
                failed += 1;
                in_b = 0;
                eprintln!("call failed during failover: {e}");
            }
        }
    }
    let stats = channel.stats();
    println!(
        "failover to zone b after {:?}: {failed} failed calls, stats {stats:?}",
        killed.elapsed()
    );
    assert!(failed <= 3, "{failed} calls failed");
    assert_eq!(stats.ejected(), 2, "{stats:?}");
    server.stop().await;
}

/// One of three instances crashes while its lease lives on: after at most
/// three failed calls it gets none, until its address answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_ejected_after_three_failures_until_its_address_answers() {
    let server = TestServer::start().await;
    let ttl = Duration::from_secs(10);
    let _a = ProdInstance::start(&server.url, "a", ttl).await;
    let _b = ProdInstance::start(&server.url, "b", ttl).await;
    let c = ProdInstance::start(&server.url, "c", ttl).await;
    let c_addr: SocketAddr = c.addr;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    // No retries: every failed attempt is a failed call the test can count.
    let channel = client
        .channel("prod")
        .retry(RetryPolicy::none())
        .outlier_detection(OutlierDetection {
            base_ejection: Duration::from_millis(200),
            max_ejection: Duration::from_millis(400),
            ..OutlierDetection::default()
        })
        .build();
    wait_for_endpoints(&channel, 3).await;
    let seen = call_many(&channel, 60).await;
    assert_eq!(seen.len(), 3, "all three answer: {seen:?}");

    c.kill();
    // Two seconds of calls: several probe rounds of the dead address.
    let mut prod = ProdServiceClient::new(channel.clone());
    let until = Instant::now() + Duration::from_secs(2);
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < until {
        match prod
            .get_product_stock(ProductRequest { prod_id: 233 })
            .await
        {
            Ok(r) => {
                assert_ne!(r.get_ref().instance_id, "c", "the dead one answered?");
                ok += 1;
            }
            Err(e) => {
                failed += 1;
                let msg = e.message().to_string();
                assert!(
                    msg.contains("instance c at") && msg.contains(&c_addr.to_string()),
                    "a transport error names the instance and address: {msg}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = channel.stats();
    println!("after the crash: {ok} ok, {failed} failed; {stats:?}");
    assert!(
        (1..=3).contains(&failed),
        "{failed} failed calls (3 allowed)"
    );
    assert_eq!(stats.failed_attempts, failed as u64);
    let dead = stats.endpoints.iter().find(|e| e.id == "c").unwrap();
    assert!(dead.ejected, "{stats:?}");
    assert_eq!(dead.ejections, 1, "ejected once, kept out by probes");
    assert!(dead.failures <= 3, "{dead:?}");
    assert!(ok > 50, "the others kept answering: {ok}");

    // Its address answers again (a restart on the same port, the lease
    // still alive): it is probed back into rotation.
    let back = BareServer::start(c_addr, "c").await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let seen = call_many(&channel, 30).await;
        if seen.contains_key("c") {
            assert_eq!(seen.get("<error>"), None, "{seen:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c never came back: {:?}",
            channel.stats()
        );
    }
    assert!(!channel.stats().endpoints.iter().any(|e| e.ejected));
    drop(back);
    server.stop().await;
}

/// A typo fails at once with a status naming the service, except during
/// the registry's warm-up, when the name may just not have re-registered
/// yet: then the call waits for the warm-up to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_fails_at_once_naming_it_unless_warming_up() {
    let call = |channel: BalancedChannel| async move {
        let started = Instant::now();
        let err = ProdServiceClient::new(channel)
            .get_product_stock(ProductRequest { prod_id: 233 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().contains("\"prdo\"") && err.message().contains("unknown"),
            "{}",
            err.message()
        );
        started.elapsed()
    };
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let took = call(registry_client::balanced_channel(&client, "prdo")).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    server.stop().await;

    let warmup = Duration::from_millis(800);
    let server = TestServer::start_with(registry::Config {
        warmup,
        ..TestServer::test_config()
    })
    .await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let took = call(registry_client::balanced_channel(&client, "prdo")).await;
    assert!(
        took >= warmup / 2 && took < warmup + Duration::from_secs(1),
        "waited for the warm-up to end: {took:?}"
    );
    server.stop().await;
}
