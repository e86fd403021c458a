//! Start order does not matter: a service whose registry is not up yet
//! registers anyway. The registration is accepted at once in state
//! `Unreachable`, retried in the background, and `Registered` within one
//! second of the registry starting, however long it was down.

mod common;

use std::time::Duration;

use common::TestServer;
use registry_client::{Instance, RegistrationState, RegistryClient};
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_made_before_the_registry_starts_completes_within_a_second() {
    // A free port nothing listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = RegistryClient::builder()
        .address(format!("http://{addr}"))
        .build()
        .expect("a lazy client needs no registry");
    let started = Instant::now();
    let registration = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("early"))
        .ttl(Duration::from_secs(2))
        .await
        .expect("accepted while the registry is down");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );
    assert_eq!(registration.current_state(), RegistrationState::Unreachable);

    // Down long enough for the retries to back off to their longest.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(registration.current_state(), RegistrationState::Unreachable);

    let server = TestServer::start_on(addr, TestServer::test_config()).await;
    let up = Instant::now();
    let mut state = registration.state();
    timeout(
        Duration::from_secs(1),
        state.wait_for(|s| *s == RegistrationState::Registered),
    )
    .await
    .unwrap_or_else(|_| panic!("not Registered 1 s after the registry started"))
    .unwrap();
    let took = up.elapsed();
    println!("registered {took:?} after the registry started");
    let observer = RegistryClient::connect(&server.url).await.unwrap();
    let ids: Vec<String> = observer
        .resolve("prod")
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["early"]);
    registration.deregister().await.unwrap();
    server.stop().await;
}
