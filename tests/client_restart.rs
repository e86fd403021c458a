//! registry-client end to end: the registry restarts on the same port.
//! Registrations come back within one TTL with no action by the services,
//! and a resolver keeps serving its last known good list the whole time.

mod common;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{TestServer, prod::ProdInstance, wait_until};
use registry::Config;
use registry_api::v1::ResolveRequest;
use registry_client::{RegistrationState, RegistryClient, ServiceStatus};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

/// Not the shared test config: this test needs a warm-up of one TTL and a
/// short drain.
fn config() -> Config {
    Config {
        // One max heartbeat interval and then some: the window in which
        // an empty registry is not proof that nothing is alive.
        warmup: TTL,
        shutdown_grace: Duration::from_millis(200),
        ..TestServer::test_config()
    }
}

/// The registry that will go away: gracefully, or by crashing.
enum First {
    Graceful(TestServer),
    /// On its own runtime, so that a crash takes its connections down too
    /// (`TestServer::kill` aborts the accept loop only; tonic's per-connection
    /// tasks would keep serving the old state over existing connections).
    Crashable(tokio::runtime::Runtime),
}

async fn start_first(crash: bool) -> (First, std::net::SocketAddr) {
    if !crash {
        let server = TestServer::start_with(config()).await;
        let addr = server.addr;
        return (First::Graceful(server), addr);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        registry::server::run(listener, config(), std::future::pending())
            .await
            .unwrap();
    });
    (First::Crashable(rt), addr)
}

async fn restart(crash: bool) {
    let (first, addr) = start_first(crash).await;
    let url = format!("http://{addr}");
    let ids = ["prod-a", "prod-b", "prod-c"];
    let mut instances = Vec::new();
    for id in ids {
        instances.push(ProdInstance::start(&url, id, TTL).await);
    }
    let expected: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();

    let client = RegistryClient::connect(&url).await.unwrap();
    let resolver = client.resolver("prod");
    let mut rx = resolver.subscribe();
    tokio::time::timeout(
        Duration::from_secs(2),
        rx.wait_for(|s| s.instances.len() == 3),
    )
    .await
    .expect("resolver sees all three")
    .unwrap();
    let first_epoch = resolver.state().epoch;

    // Record every view the resolver publishes from now on, and every state
    // of one registration.
    let views = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::spawn({
        let views = views.clone();
        let mut rx = rx.clone();
        async move {
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                views.lock().unwrap().push(s);
            }
        }
    });
    let mut state = instances[0].registration().state();
    state.borrow_and_update();
    let states = tokio::spawn(async move {
        let mut seen = Vec::new();
        while state.changed().await.is_ok() {
            let s = *state.borrow_and_update();
            seen.push(s);
            if s == RegistrationState::Registered {
                break;
            }
        }
        seen
    });

    match first {
        First::Graceful(server) => server.stop().await,
        First::Crashable(rt) => rt.shutdown_background(),
    }
    // The resolver notices the outage and keeps its list; the registration
    // reports the registry unreachable at its next renewal (within ttl/3).
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| !s.connected))
        .await
        .expect("resolver notices the outage")
        .unwrap();
    assert_eq!(resolver.instances().len(), 3);
    let mut unreachable = instances[0].registration().state();
    tokio::time::timeout(
        TTL,
        unreachable.wait_for(|s| *s == RegistrationState::Unreachable),
    )
    .await
    .expect("registration reports the outage")
    .unwrap();

    let server = TestServer::start_on(addr, config()).await;
    let restarted = Instant::now();
    let raw = server.client().await;
    wait_until(TTL, "all three re-registered on the new registry", || {
        let mut raw = raw.clone();
        let expected = expected.clone();
        async move {
            let got: BTreeSet<String> = raw
                .resolve(ResolveRequest {
                    service: "prod".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .instances
                .into_iter()
                .map(|i| i.id)
                .collect();
            got == expected
        }
    })
    .await;
    let back_after = restarted.elapsed();

    // The resolver follows the new registry life...
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.connected && s.epoch != first_epoch && !s.holding_stale),
    )
    .await
    .expect("resolver resumes on the new registry")
    .unwrap();
    let registration_states = tokio::time::timeout(Duration::from_secs(1), states)
        .await
        .expect("registration back to Registered")
        .unwrap();
    // A watch channel keeps only the latest value: `Reregistering` may be
    // replaced by `Registered` before the recorder looks.
    assert!(
        registration_states
            == [
                RegistrationState::Unreachable,
                RegistrationState::Registered
            ]
            || registration_states
                == [
                    RegistrationState::Unreachable,
                    RegistrationState::Reregistering,
                    RegistrationState::Registered
                ],
        "{registration_states:?}"
    );
    for instance in &instances {
        assert_eq!(
            instance.registration().current_state(),
            RegistrationState::Registered
        );
    }

    // ...and never published anything but the three instances.
    recorder.abort();
    let views = std::mem::take(&mut *views.lock().unwrap());
    assert!(!views.is_empty());
    for view in views.iter() {
        let got: BTreeSet<String> = view.instances.iter().map(|i| i.id.clone()).collect();
        assert_eq!(
            got, expected,
            "resolver lost its last known good list: {view:?}"
        );
        assert_eq!(view.status, ServiceStatus::Known);
    }
    eprintln!(
        "registrations back {back_after:?} after restart; {} resolver views",
        views.len()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_on_the_same_port() {
    restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restart_on_the_same_port() {
    restart(true).await;
}
