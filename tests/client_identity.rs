//! Identity conflicts are visible and heal themselves. Two processes
//! register the same service and instance id: the registry keeps the later
//! one; the displaced process reports `Replaced` (naming the other lease),
//! does not fight for the key while the other holds it, and registers it
//! again as soon as the other deregisters, within one TTL, so one of the two
//! always serves.

#![cfg(unix)]

mod common;

use std::time::Duration;

use common::{
    TestServer,
    artifacts::{ExampleProcess, example},
    prod::ProdInstance,
};
use registry_client::{RegistrationState, RegistryClient};
use tokio::time::{Instant, timeout};

const TTL: Duration = Duration::from_secs(2);

/// (address, lease) of `prod/cart-3` now.
async fn holder(observer: &RegistryClient) -> Option<(String, u64)> {
    let resolved = observer.resolve("prod").await.unwrap();
    assert!(resolved.instances.len() <= 1, "{resolved:?}");
    resolved
        .instances
        .into_iter()
        .find(|i| i.id == "cart-3")
        .map(|i| (i.address, i.lease_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn displaced_process_reports_replaced_and_takes_over_when_the_other_leaves() {
    let binary = example("prod_service").await;
    let server = TestServer::start().await;
    let observer = RegistryClient::connect(&server.url).await.unwrap();

    // Process A: in this test process, with its own client and lease.
    let a = ProdInstance::start(&server.url, "cart-3", TTL).await;
    let a_addr = a.addr.to_string();
    assert_eq!(holder(&observer).await.unwrap().0, a_addr);

    // Process B: the example service, same id.
    let mut b = ExampleProcess::spawn(
        &binary,
        &["--registry", &server.url, "--id", "cart-3", "--ttl", "2s"],
    );
    let line = b.line(Duration::from_secs(20)).await;
    let b_addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("B prints its address")
        .to_owned();
    let (holder_addr, b_lease) = holder(&observer).await.unwrap();
    assert_eq!(holder_addr, b_addr, "the later registration wins");

    // A learns it: Replaced, naming B's lease.
    let mut state = a.registration().state();
    let replaced = timeout(
        Duration::from_secs(2),
        state.wait_for(|s| matches!(s, RegistrationState::Replaced { .. })),
    )
    .await
    .expect("A reports Replaced")
    .unwrap()
    .to_owned();
    assert_eq!(replaced, RegistrationState::Replaced { lease_id: b_lease });

    // ...and does not fight: for more than a TTL, B keeps the key.
    let until = Instant::now() + TTL + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(holder(&observer).await, Some((b_addr.clone(), b_lease)));
        assert_eq!(
            a.registration().current_state(),
            RegistrationState::Replaced { lease_id: b_lease }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B stops (SIGTERM: it deregisters). A takes the key back within a TTL.
    b.terminate();
    let line = b.line(Duration::from_secs(5)).await;
    assert_eq!(line, "prod_service id=cart-3 draining");
    let line = b.line(Duration::from_secs(5)).await;
    assert_eq!(line, "prod_service id=cart-3 deregistered");
    let gone = Instant::now();
    loop {
        if holder(&observer)
            .await
            .is_some_and(|(addr, _)| addr == a_addr)
        {
            break;
        }
        assert!(
            gone.elapsed() < TTL,
            "prod/cart-3 not served again within one TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "A took prod/cart-3 back {:?} after B deregistered",
        gone.elapsed()
    );
    timeout(
        Duration::from_secs(1),
        state.wait_for(|s| *s == RegistrationState::Registered),
    )
    .await
    .expect("A reports Registered again")
    .unwrap();
    assert!(b.child.wait().await.unwrap().success());
    drop(a);
    server.stop().await;
}
