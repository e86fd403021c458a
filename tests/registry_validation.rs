//! End-to-end: every validation rule and resource cap answers with its exact
//! status code and a message naming the field and the limit, and a rejected
//! request changes nothing.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    api::{
        Client, InstanceExt, instance, register_request, resolve, resolve_request, try_register,
    },
};
use registry::Config;
use registry_api::v1::{
    HeartbeatRequest, Instance, RegisterRequest, ResolveRequest, StatusRequest, WatchRequest,
};
use tonic::Code;

/// Register on a new lease that must fail with `code`, its message naming
/// `needle`.
async fn expect_code(c: &mut Client, inst: Instance, ttl_ms: u64, code: Code, needle: &str) {
    let what = format!("{}/{}/{}", inst.service, inst.id, inst.address);
    let err = try_register(c, inst, ttl_ms, 0)
        .await
        .expect_err(&format!("{what} should be rejected"));
    assert_eq!(err.code(), code, "{what}: {}", err.message());
    assert!(
        err.message().contains(needle),
        "{what}: message {:?} should mention {needle:?}",
        err.message()
    );
}

async fn assert_nothing_registered(c: &mut Client) {
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (st.instances, st.leases, st.revision),
        (0, 0, 0),
        "nothing partially applied"
    );
}

#[tokio::test]
async fn service_names() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let long = "a".repeat(254);
    for (name, needle) in [
        ("", "instance.service is required"),
        ("Prod", "uppercase"),
        ("my service", "' '"),
        ("a/b", "'/'"),
        ("-prod", "must start"),
        (".prod", "must start"),
        ("prød", "'ø'"),
        (long.as_str(), "253"),
    ] {
        expect_code(
            &mut c,
            instance(name, "i"),
            10_000,
            Code::InvalidArgument,
            needle,
        )
        .await;
    }
    assert_nothing_registered(&mut c).await;
    let ok = "a".repeat(253);
    try_register(&mut c, instance(&ok, "i"), 10_000, 0)
        .await
        .unwrap();
    try_register(&mut c, instance("payments.v2_x-y", "i"), 10_000, 0)
        .await
        .unwrap();
}

#[tokio::test]
async fn instance_ids() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for (id, needle) in [
        (String::new(), "instance.id is required"),
        ("a b".to_string(), "printable ASCII"),
        ("tab\t".to_string(), "printable ASCII"),
        ("é".to_string(), "printable ASCII"),
        ("x".repeat(129), "128"),
    ] {
        expect_code(
            &mut c,
            instance("prod", &id),
            10_000,
            Code::InvalidArgument,
            needle,
        )
        .await;
    }
    assert_nothing_registered(&mut c).await;
    try_register(&mut c, instance("prod", &"x".repeat(128)), 10_000, 0)
        .await
        .unwrap();
}

#[tokio::test]
async fn addresses() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for (addr, needle) in [
        ("", "instance.address is required"),
        ("10.0.0.1", "no port"),
        ("10.0.0.1:0", "1..=65535"),
        ("10.0.0.1:65536", "1..=65535"),
        ("10.0.0.1:http", "port"),
        ("::1:80", "without brackets"),
        ("[::1:80", "unterminated"),
        ("[not-v6]:80", "IPv6"),
        ("300.1.1.1:80", "IPv4"),
        ("bad_host:80", "DNS"),
        ("-x.example:80", "DNS"),
        (":80", "empty host"),
        (
            "http://127.0.0.1:80",
            "has a URL scheme (http://); send host:port only, e.g. \"127.0.0.1:80\"",
        ),
        ("https://prod.example:443/", "send host:port only"),
        (
            "0.0.0.0:9",
            "unspecified host 0.0.0.0, which callers cannot dial",
        ),
        ("[::]:9", "unspecified host [::]"),
    ] {
        expect_code(
            &mut c,
            instance("prod", "i").at(addr),
            10_000,
            Code::InvalidArgument,
            needle,
        )
        .await;
    }
    assert_nothing_registered(&mut c).await;
    for ok in [
        "10.0.0.1:1",
        "[::1]:65535",
        "[2001:db8::7]:80",
        "prod-1.svc.cluster.local:8002",
    ] {
        try_register(&mut c, instance("prod", ok).at(ok), 10_000, 0)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn metadata_limits() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let cases: Vec<(HashMap<String, String>, &str)> = vec![
        (
            (0..65)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            "limit is 64",
        ),
        ([("k".repeat(129), "v".to_string())].into(), "limit is 128"),
        ([(String::new(), "v".to_string())].into(), "empty key"),
        ([("a=b".to_string(), "v".to_string())].into(), "'='"),
        (
            [("k".to_string(), "v".repeat(1025))].into(),
            "limit is 1024",
        ),
    ];
    for (metadata, needle) in cases {
        let mut inst = instance("prod", "i");
        inst.metadata = metadata;
        expect_code(&mut c, inst, 10_000, Code::InvalidArgument, needle).await;
    }
    assert_nothing_registered(&mut c).await;
    let mut inst = instance("prod", "i");
    inst.metadata = (0..64)
        .map(|i| (format!("k{i}"), "v".repeat(1024)))
        .collect();
    try_register(&mut c, inst, 10_000, 0).await.unwrap();
}

#[tokio::test]
async fn ttl_bounds() {
    let server = TestServer::start_with(Config {
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    let mut c = server.client().await;
    let inst = || instance("prod", "i");
    expect_code(
        &mut c,
        inst(),
        0,
        Code::InvalidArgument,
        "below the minimum 1s",
    )
    .await;
    expect_code(&mut c, inst(), 999, Code::InvalidArgument, "ttl_ms 999").await;
    expect_code(
        &mut c,
        inst(),
        60_001,
        Code::OutOfRange,
        "above the maximum 1m",
    )
    .await;
    assert_nothing_registered(&mut c).await;
    try_register(&mut c, inst(), 1_000, 0).await.unwrap();
    try_register(&mut c, inst(), 60_000, 0).await.unwrap();
}

#[tokio::test]
async fn missing_instance_and_bad_selectors() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let err = c
        .register(RegisterRequest {
            instance: None,
            ttl_ms: 10_000,
            lease_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("instance is required"));

    let err = c.resolve(resolve_request("Bad")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\"Bad\""), "{}", err.message());

    let err = c
        .resolve(ResolveRequest {
            service: "prod".into(),
            selector: [("".to_string(), "x".to_string())].into(),
            include_lease_ttl: false,
            include_not_serving: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("selector"), "{}", err.message());

    let err = c
        .watch(WatchRequest {
            service: "No/Slash".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = c
        .heartbeat(HeartbeatRequest { lease_ids: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("lease_ids"), "{}", err.message());
}

#[tokio::test]
async fn caps_are_resource_exhausted_and_change_nothing() {
    let server = TestServer::start_with(Config {
        max_leases: 3,
        max_instances_per_service: 2,
        max_instances_per_lease: 2,
        max_heartbeat_batch: 4,
        ..TestServer::test_config()
    })
    .await;
    let mut c = server.client().await;

    // Per service.
    try_register(&mut c, instance("a", "1"), 10_000, 0)
        .await
        .unwrap();
    try_register(&mut c, instance("a", "2"), 10_000, 0)
        .await
        .unwrap();
    expect_code(
        &mut c,
        instance("a", "3"),
        10_000,
        Code::ResourceExhausted,
        "limit is 2 (max_instances_per_service)",
    )
    .await;
    // Replacing an existing instance is not growth.
    try_register(&mut c, instance("a", "2").at("10.0.0.2:80"), 10_000, 0)
        .await
        .unwrap();

    // Total leases (a/1, a/2's new lease; the old a/2 lease still exists).
    expect_code(
        &mut c,
        instance("b", "1"),
        10_000,
        Code::ResourceExhausted,
        "limit is 3 (max_leases)",
    )
    .await;

    // Per lease.
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    let lease = resolve(&mut c, "a").await.instances[0].lease_id;
    c.register(register_request(instance("c", "1"), 0, lease))
        .await
        .unwrap();
    let err = c
        .register(register_request(instance("c", "2"), 0, lease))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("max_instances_per_lease"),
        "{}",
        err.message()
    );
    let after = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        after.instances,
        st.instances + 1,
        "only the accepted register counted"
    );

    // Heartbeat batch size.
    let err = c
        .heartbeat(HeartbeatRequest {
            lease_ids: vec![1, 2, 3, 4, 5],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 4"), "{}", err.message());
}

#[tokio::test]
async fn huge_names_are_quoted_briefly() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let name = "X".repeat(10_000);
    let err = try_register(&mut c, instance(&name, "i"), 10_000, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().len() < 400,
        "error echoes the whole name: {} bytes",
        err.message().len()
    );
}
