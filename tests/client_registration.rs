//! registry-client end to end: registration lifecycle — shared leases,
//! renewal, graceful deregistration, drop, re-registration after the
//! registry forgets, and the observable state.

mod common;

use std::time::Duration;

use common::{TestServer, wait_until};
use registry_api::v1::{DeregisterRequest, ResolveRequest, deregister_request::Target};
use registry_client::{Error, Instance, RegistrationState, RegistryClient};
use tokio::time::{Instant, timeout};

async fn resolve_ids(client: &RegistryClient, service: &str) -> Vec<String> {
    let resolved = client.resolve(service).await.expect("resolve");
    resolved.instances.into_iter().map(|i| i.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_deregister_is_visible_in_resolve_immediately() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let registration = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("a"))
        .ttl(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(registration.current_state(), RegistrationState::Registered);
    assert_eq!(registration.instance().id, "a");
    assert_eq!(resolve_ids(&client, "prod").await, ["a"]);

    registration.deregister().await.unwrap();
    // No waiting: the answer right after deregister() must not list it.
    let resolved = client.resolve("prod").await.unwrap();
    assert!(resolved.instances.is_empty(), "{resolved:?}");
    assert!(
        resolved.service_known,
        "the name stays known with zero instances"
    );
    wait_until(Duration::from_secs(1), "keepalive task to end", || async {
        !client.keepalive_running()
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_registration_stops_the_background_task() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    assert!(
        !client.keepalive_running(),
        "no task before the first registration"
    );
    let a = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("a"))
        .ttl(Duration::from_millis(300))
        .await
        .unwrap();
    let b = client
        .register(Instance::new("prod", "127.0.0.1:5002").with_id("b"))
        .ttl(Duration::from_millis(300))
        .await
        .unwrap();
    assert!(client.keepalive_running());

    drop(a);
    wait_until(Duration::from_secs(1), "a deregistered on drop", || async {
        resolve_ids(&client, "prod").await == ["b"]
    })
    .await;
    assert!(client.keepalive_running(), "b still needs the task");
    // b keeps being renewed after a's removal: several TTLs later it is there.
    let until = Instant::now() + Duration::from_millis(900);
    while Instant::now() < until {
        assert_eq!(resolve_ids(&client, "prod").await, ["b"]);
        assert_eq!(b.current_state(), RegistrationState::Registered);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut state = b.state();
    drop(b);
    wait_until(
        Duration::from_secs(1),
        "task to end after the last drop",
        || async { !client.keepalive_running() },
    )
    .await;
    // The task deregistered b before ending (no waiting for expiry)...
    assert!(resolve_ids(&client, "prod").await.is_empty());
    // ...and dropped b's state sender.
    timeout(Duration::from_secs(1), async {
        while state.changed().await.is_ok() {}
    })
    .await
    .expect("state sender dropped with the registration");

    // A new registration starts a new task.
    let c = client
        .register(Instance::new("prod", "127.0.0.1:5003").with_id("c"))
        .await
        .unwrap();
    assert!(client.keepalive_running());
    drop(c);
    wait_until(Duration::from_secs(1), "second task to end", || async {
        !client.keepalive_running()
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_with_one_ttl_share_a_lease_and_outlive_it() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let ttl = Duration::from_millis(300);
    let mut regs = Vec::new();
    for (id, ttl) in [("a", ttl), ("b", ttl), ("c", ttl * 2)] {
        regs.push(
            client
                .register(Instance::new("prod", "127.0.0.1:5000").with_id(id))
                .ttl(ttl)
                .await
                .unwrap(),
        );
    }
    let leases = |r: &registry_client::Resolution| -> Vec<u64> {
        r.instances.iter().map(|i| i.lease_id).collect()
    };
    let first = client.resolve("prod").await.unwrap();
    let l = leases(&first);
    assert_eq!(l.len(), 3);
    assert_eq!(l[0], l[1], "same TTL, same lease");
    assert_ne!(l[0], l[2], "other TTL, other lease");

    // Renewed about every ttl/3: five TTLs later nothing expired or moved.
    let until = Instant::now() + ttl * 5;
    while Instant::now() < until {
        let now = client.resolve("prod").await.unwrap();
        assert_eq!(leases(&now), l, "leases stayed the same");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in &regs {
        assert_eq!(r.current_state(), RegistrationState::Registered);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregisters_when_the_registry_forgets_the_lease() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let ttl = Duration::from_millis(600);
    let registration = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("a"))
        .ttl(ttl)
        .await
        .unwrap();
    let old_lease = client.resolve("prod").await.unwrap().instances[0].lease_id;

    // Record every state transition from here on.
    let mut state = registration.state();
    assert_eq!(*state.borrow_and_update(), RegistrationState::Registered);
    let transitions = tokio::spawn(async move {
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

    // Someone revokes the lease behind the client's back.
    let mut raw = server.client().await;
    raw.deregister(DeregisterRequest {
        target: Some(Target::LeaseId(old_lease)),
    })
    .await
    .unwrap();
    let gone = raw
        .resolve(ResolveRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The client may already have registered again (its renewal runs every
    // ttl/3), but never under the revoked lease.
    assert!(
        gone.instances.iter().all(|i| i.lease_id != old_lease),
        "{gone:?}"
    );

    // The next renewal (within ~ttl/3) learns the lease is unknown and
    // registers again, without any action from the service.
    let seen = timeout(ttl, transitions)
        .await
        .expect("re-registered within one TTL")
        .unwrap();
    assert_eq!(
        seen,
        [
            RegistrationState::Reregistering,
            RegistrationState::Registered
        ]
    );
    let back = client.resolve("prod").await.unwrap();
    assert_eq!(back.instances.len(), 1);
    assert_ne!(back.instances[0].lease_id, old_lease, "a fresh lease");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_errors_are_returned_and_leave_nothing_running() {
    let server = TestServer::start().await;
    let client = RegistryClient::connect(&server.url).await.unwrap();
    let err = client
        .register(Instance::new("Not A Valid Name!", "127.0.0.1:5001"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(ref s) if s.code() == tonic::Code::InvalidArgument),
        "{err:?}"
    );
    wait_until(Duration::from_secs(1), "task to end", || async {
        !client.keepalive_running()
    })
    .await;
    server.stop().await;

    // Nothing listens on port 1: an eager connect fails with a one-line
    // error naming the address...
    let err = RegistryClient::connect("127.0.0.1:1").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot reach registry at http://127.0.0.1:1: connection refused"
    );
    // ...while a registration on a lazy client is accepted and waits in the
    // background, saying so (tests/client_start_order.rs shows it complete).
    let nowhere = RegistryClient::builder()
        .address("127.0.0.1:1")
        .build()
        .unwrap();
    let pending = nowhere
        .register(Instance::new("prod", "127.0.0.1:5001"))
        .await
        .expect("accepted while the registry is unreachable");
    assert_eq!(pending.current_state(), RegistrationState::Unreachable);
    assert!(nowhere.keepalive_running());
    drop(pending);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_outlives_the_client_handle_and_fails_over() {
    let server = TestServer::start().await;
    // The first node is dead: every call and the keepalive stream move on to
    // the second.
    let client = RegistryClient::connect(format!("127.0.0.1:1,{}", server.url))
        .await
        .unwrap();
    let registration = client
        .register(Instance::new("prod", "127.0.0.1:5001").with_id("a"))
        .ttl(Duration::from_millis(300))
        .await
        .unwrap();
    let observer = RegistryClient::connect(&server.url).await.unwrap();
    drop(client);
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        assert_eq!(resolve_ids(&observer, "prod").await, ["a"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(registration.current_state(), RegistrationState::Registered);
    registration.deregister().await.unwrap();
    assert!(resolve_ids(&observer, "prod").await.is_empty());
    server.stop().await;
}
