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
