use super::*;
use std::time::Duration;

fn req(service: &str, id: &str, ttl_ms: u64, lease_id: u64) -> RegisterRequest {
    RegisterRequest {
        instance: Some(Instance {
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1:80".into(),
            ..Default::default()
        }),
        ttl_ms,
        lease_id,
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_task_removes_instances_of_dead_leases_only() {
    let r = Registry::new(Config::default());
    let _task = r.spawn_expiry();
    let dying = r.register(req("svc", "a", 1000, 0), None).await.unwrap();
    let kept = r.register(req("svc", "b", 1000, 0), None).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        r.heartbeat(&[kept.lease_id], None).unwrap();
    }
    let res = r.resolve("svc", &HashMap::new(), false, None).unwrap();
    let ids: Vec<_> = res.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["b"]);
    assert!(r.leases().get(dying.lease_id).is_none());
    assert_eq!(res.revision, 3, "two registers and one expiry");
}

#[tokio::test(start_paused = true)]
async fn expiry_is_on_time_under_paused_clock() {
    let r = Registry::new(Config::default());
    let _task = r.spawn_expiry();
    r.register(req("svc", "a", 2000, 0), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1990)).await;
    assert_eq!(r.status().instances, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(r.status().instances, 0);
    assert_eq!(r.status().leases, 0);
}

#[tokio::test(start_paused = true)]
async fn reregister_moves_instance_between_leases() {
    let r = Registry::new(Config::default());
    let first = r.register(req("svc", "a", 1000, 0), None).await.unwrap();
    let second = r.register(req("svc", "a", 5000, 0), None).await.unwrap();
    assert_eq!(r.leases().get(first.lease_id).unwrap().instance_count(), 0);
    assert_eq!(r.leases().get(second.lease_id).unwrap().instance_count(), 1);
    r.expire_due(10);
    tokio::time::advance(Duration::from_millis(1500)).await;
    r.expire_due(10);
    let res = r.resolve("svc", &HashMap::new(), false, None).unwrap();
    assert_eq!(
        res.instances.len(),
        1,
        "old lease's expiry must not delete the moved instance"
    );
    assert_eq!(res.instances[0].lease_id, second.lease_id);
}

#[tokio::test(start_paused = true)]
async fn caps_are_checked_before_anything_changes() {
    let r = Registry::new(Config {
        max_instances_per_lease: 1,
        ..Config::default()
    });
    let first = r.register(req("svc", "a", 1000, 0), None).await.unwrap();
    let err = r
        .register(req("svc", "b", 0, first.lease_id), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    let res = r.resolve("svc", &HashMap::new(), false, None).unwrap();
    assert_eq!(res.instances.len(), 1);
    assert_eq!(res.revision, first.revision);
}

// --- health and admin states (issue 17) ---

fn checked(service: &str, id: &str, addr: &str) -> RegisterRequest {
    use registry_api::v1::{HealthCheck, TcpCheck, health_check::Kind};
    RegisterRequest {
        instance: Some(Instance {
            service: service.into(),
            id: id.into(),
            address: addr.into(),
            check: Some(Box::new(HealthCheck {
                kind: Some(Kind::Tcp(TcpCheck::default())),
                ..Default::default()
            })),
            ..Default::default()
        }),
        ttl_ms: 10_000,
        lease_id: 0,
    }
}

fn record(r: &Registry, id: &str, health: HealthState) -> Option<u64> {
    let current = r
        .resolve_with("svc", &HashMap::new(), false, true, None)
        .unwrap()
        .instances
        .into_iter()
        .find(|i| i.id == id)
        .expect("instance");
    r.plan_record_check(CheckRecord {
        service: "svc".into(),
        id: id.into(),
        target: crate::health::Target::of(&current).expect("checked"),
        health,
        output: format!("{health:?}"),
        at_unix_ms: 1,
    })
    .unwrap()
    .map(|p| match p {
        Pending::Done(rev) => rev,
        other => panic!("memory store answers at once: {other:?}"),
    })
}

fn ids(res: &ResolveResponse) -> Vec<&str> {
    res.instances.iter().map(|i| i.id.as_str()).collect()
}

#[tokio::test]
async fn a_checked_instance_starts_critical_and_serves_once_it_passes() {
    let r = Registry::new(Config::default());
    r.register(req("svc", "plain", 10_000, 0), None)
        .await
        .unwrap();
    r.register(checked("svc", "new", "10.0.0.2:80"), None)
        .await
        .unwrap();
    let none = HashMap::new();
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(ids(&res), ["plain"], "critical until its first check");
    assert!(!res.panicked, "1 of 2 serving is not below 50%");
    let all = r.resolve_with("svc", &none, false, true, None).unwrap();
    assert_eq!(ids(&all), ["new", "plain"]);
    let new = &all.instances[0];
    assert_eq!(new.health, HealthState::Critical as i32);
    let check = new.check.as_ref().unwrap();
    assert_eq!(
        (check.interval_ms, check.failures_before_critical),
        (10_000, 3)
    );

    let rev = record(&r, "new", HealthState::Passing).expect("written");
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(ids(&res), ["new", "plain"]);
    assert_eq!(res.revision, rev, "a state change is a new revision");
    assert_eq!(
        res.instances[0].last_check.as_ref().unwrap().output,
        "Passing"
    );

    // Registering the same instance again keeps its checked state.
    r.register(checked("svc", "new", "10.0.0.2:80"), None)
        .await
        .unwrap();
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(res.instances[0].health, HealthState::Passing as i32);
    // Another address starts over; a result for the old one is dropped.
    let stale = r
        .resolve("svc", &none, false, None)
        .unwrap()
        .instances
        .remove(0);
    r.register(checked("svc", "new", "10.0.0.3:80"), None)
        .await
        .unwrap();
    let dropped = r
        .plan_record_check(CheckRecord {
            service: "svc".into(),
            id: "new".into(),
            target: crate::health::Target::of(&stale).unwrap(),
            health: HealthState::Passing,
            output: String::new(),
            at_unix_ms: 2,
        })
        .unwrap();
    assert!(dropped.is_none(), "result of a superseded check is dropped");
    assert_eq!(
        ids(&r.resolve("svc", &none, false, None).unwrap()),
        ["plain"]
    );
}

#[tokio::test]
async fn panic_mode_answers_every_active_instance_and_says_so() {
    let r = Registry::new(Config::default());
    for (n, id) in ["a", "b", "c", "d"].iter().enumerate() {
        r.register(checked("svc", id, &format!("10.0.0.{}:80", n + 1)), None)
            .await
            .unwrap();
        record(&r, id, HealthState::Passing);
    }
    let none = HashMap::new();
    for id in ["b", "c"] {
        record(&r, id, HealthState::Critical);
    }
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(ids(&res), ["a", "d"]);
    assert!(!res.panicked);
    record(&r, "d", HealthState::Critical);
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(
        ids(&res),
        ["a", "b", "c", "d"],
        "3 of 4 critical: all served"
    );
    assert!(res.panicked);
    // The shared frame says the same.
    let frame = r
        .resolve_frame("svc", &none, false, false, None)
        .unwrap()
        .to_response()
        .unwrap();
    assert_eq!(frame, res);
    // Draining ones are never served, even in panic mode.
    r.set_instance_state("svc", "b", AdminState::Draining, "deploy", None)
        .await
        .unwrap();
    let res = r.resolve("svc", &none, false, None).unwrap();
    assert_eq!(ids(&res), ["a", "c", "d"]);
    assert!(res.panicked);
    let all = r
        .resolve_frame("svc", &none, false, true, None)
        .unwrap()
        .to_response()
        .unwrap();
    assert_eq!(ids(&all), ["a", "b", "c", "d"]);
    assert!(!all.panicked, "never set with include_not_serving");
}

#[tokio::test]
async fn admin_states_follow_owners_and_survive_own_reregistration() {
    let r = Registry::new(Config::default());
    let reg = r.register(req("svc", "a", 10_000, 0), None).await.unwrap();
    let none = HashMap::new();
    let (rev, inst) = r
        .set_instance_state("svc", "a", AdminState::Disabled, "disk swap", None)
        .await
        .unwrap();
    assert_eq!(inst.admin_state, AdminState::Disabled as i32);
    assert_eq!(inst.admin_reason, "disk swap");
    assert_eq!(inst.revision, rev);
    assert!(
        r.resolve("svc", &none, false, None)
            .unwrap()
            .instances
            .is_empty()
    );
    // The same state again changes nothing.
    let (again, _) = r
        .set_instance_state("svc", "a", AdminState::Disabled, "disk swap", None)
        .await
        .unwrap();
    assert_eq!(again, rev);
    // Re-registering under the same lease keeps it disabled...
    r.register(req("svc", "a", 0, reg.lease_id), None)
        .await
        .unwrap();
    assert!(
        r.resolve("svc", &none, false, None)
            .unwrap()
            .instances
            .is_empty()
    );
    // ...a new process (a new lease) starts active.
    r.register(req("svc", "a", 10_000, 0), None).await.unwrap();
    assert_eq!(ids(&r.resolve("svc", &none, false, None).unwrap()), ["a"]);
    let err = r
        .set_instance_state("svc", "zz", AdminState::Draining, "", None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = r
        .set_instance_state("svc", "a", AdminState::Draining, &"x".repeat(300), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the limit is 256"), "{err}");
}
