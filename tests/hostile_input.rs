//! Hostile requests: oversize messages, huge maps, 10k-character names,
//! invalid UTF-8 and malformed protobuf, slow request bodies, the instance
//! cap. Each is refused with its exact code and a message naming the limit,
//! the server keeps serving others, and the process RSS stays bounded.
//!
//! RSS budgets: the server runs in this process, so RSS counts both sides.
//! Each budget is a few times the bytes the test itself must allocate (the
//! client builds and encodes the request; the server buffers at most one
//! HTTP/2 window or one decoded message), far below what an unbounded path
//! (buffering every oversize message whole, keeping rejected state) would
//! reach; the growth is printed (`--nocapture`) for comparison.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    api::{deregister, deregister_lease, instance, register, try_register},
    hostile::{
        RssBudget, assert_serving, hostile_config, pb_bytes, pb_varint, raw_server_streaming,
        raw_unary, serial,
    },
};
use futures::StreamExt;
use prost::bytes::Bytes;
use registry::Config;
use registry_api::v1::{
    DeregisterRequest, HeartbeatRequest, Instance, InstanceKey, ResolveRequest, WatchRequest,
    deregister_request::Target,
};
use tonic::{Code, Status, transport::Channel};

const REGISTER: &str = "/registry.v1.Registry/Register";
const RESOLVE: &str = "/registry.v1.Registry/Resolve";
const WATCH: &str = "/registry.v1.Registry/Watch";

fn assert_status(result: Result<impl std::fmt::Debug, Status>, code: Code, needles: &[&str]) {
    let err = result.expect_err("request should be refused");
    assert_eq!(err.code(), code, "message: {}", err.message());
    for needle in needles {
        assert!(
            err.message().contains(needle),
            "message {:?} should mention {needle:?}",
            err.message()
        );
    }
}

#[tokio::test]
async fn five_mib_metadata_value_is_resource_exhausted_naming_max_message_size() {
    let _serial = serial().await;
    let rss = RssBudget::start();
    let server = TestServer::start_with(hostile_config()).await;
    let mut c = server.client().await;
    let mut inst = instance("big", "a");
    inst.metadata.insert("blob".into(), "x".repeat(5 << 20));
    for _ in 0..3 {
        assert_status(
            try_register(&mut c, inst.clone(), 30_000, 0).await,
            Code::ResourceExhausted,
            &[
                "the limit is 4194304 (max_message_size)",
                "request message is 52",
            ],
        );
    }
    // The same connection keeps working after the refusals.
    register(&mut c, instance("big", "small"), 30_000, 0).await;
    assert_serving(&server, "after 5 MiB values").await;
    // Client: the 5 MiB string, its clone and the encoded request, ~3 times
    // over (retained by the allocator); server: at most a window of it.
    rss.check(96, "5 MiB metadata value");
    server.stop().await;
}

#[tokio::test]
async fn message_size_limit_is_configurable_and_validation_still_applies() {
    let _serial = serial().await;
    let server = TestServer::start_with(Config {
        max_message_size: 8 << 20,
        ..hostile_config()
    })
    .await;
    let mut c = server.client().await;
    let mut inst = instance("big", "a");
    inst.metadata.insert("blob".into(), "x".repeat(5 << 20));
    // Under the raised limit the message decodes, and validation refuses it.
    assert_status(
        try_register(&mut c, inst, 30_000, 0).await,
        Code::InvalidArgument,
        &["value of key \"blob\" is 5242880 bytes, the limit is 1024"],
    );
    let mut inst = instance("big", "b");
    inst.metadata.insert("blob".into(), "x".repeat(9 << 20));
    assert_status(
        try_register(&mut c, inst, 30_000, 0).await,
        Code::ResourceExhausted,
        &["the limit is 8388608 (max_message_size)"],
    );
    server.stop().await;
}

#[tokio::test]
async fn hundred_thousand_metadata_entries_are_invalid_argument() {
    let _serial = serial().await;
    let rss = RssBudget::start();
    let server = TestServer::start_with(hostile_config()).await;
    let mut c = server.client().await;
    let entries: HashMap<String, String> = (0..100_000)
        .map(|i| (format!("k{i}"), "v".into()))
        .collect();
    let mut inst = instance("wide", "a");
    inst.metadata = entries.clone();
    assert_status(
        try_register(&mut c, inst, 30_000, 0).await,
        Code::InvalidArgument,
        &["instance.metadata has 100000 entries, the limit is 64"],
    );
    // The same map as a selector, on both read paths.
    assert_status(
        c.resolve(ResolveRequest {
            service: "wide".into(),
            selector: entries.clone(),
            include_lease_ttl: false,
            include_not_serving: false,
        })
        .await,
        Code::InvalidArgument,
        &["selector has 100000 entries, the limit is 64"],
    );
    assert_status(
        c.watch(WatchRequest {
            service: "wide".into(),
            selector: entries,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["selector has 100000 entries, the limit is 64"],
    );
    assert_serving(&server, "after 100k metadata entries").await;
    // Three 100k-entry maps decoded one at a time on the server (~10 MiB
    // each, freed after validation) plus the client's copies.
    rss.check(128, "100k metadata entries");
    server.stop().await;
}

#[tokio::test]
async fn ten_thousand_character_names_are_invalid_argument_with_short_messages() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    let mut c = server.client().await;
    let long = "a".repeat(10_000);
    let cases = [
        (
            instance(&long, "a"),
            "instance.service is 10000 characters, the limit is 253",
        ),
        (
            instance("svc", &long),
            "instance.id is 10000 bytes, the limit is 128",
        ),
        (
            Instance {
                address: format!("{long}:80"),
                ..instance("svc", "a")
            },
            "is 10003 bytes, the limit is 259",
        ),
        (
            Instance {
                metadata: [(long.clone(), "v".to_string())].into(),
                ..instance("svc", "a")
            },
            "is 10000 bytes, the limit is 128",
        ),
    ];
    for (inst, needle) in cases {
        let err = try_register(&mut c, inst, 30_000, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(needle), "{}", err.message());
        // The rejected value is quoted as an excerpt, not echoed whole.
        assert!(err.message().len() < 400, "{} bytes", err.message().len());
    }
    assert_status(
        c.resolve(ResolveRequest {
            service: long.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["service is 10000 characters, the limit is 253"],
    );
    assert_status(
        c.watch(WatchRequest {
            service: long.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["the limit is 253"],
    );
    assert_status(
        c.deregister(DeregisterRequest {
            target: Some(Target::Instance(InstanceKey {
                service: "svc".into(),
                id: long,
            })),
        })
        .await,
        Code::InvalidArgument,
        &["the limit is 128"],
    );
    assert_serving(&server, "after 10k-char names").await;
    server.stop().await;
}

/// A RegisterRequest with one string field of Instance replaced by raw bytes.
fn register_with(instance_fields: &[Vec<u8>]) -> Bytes {
    let inst: Vec<u8> = instance_fields.concat();
    [pb_bytes(1, &inst), pb_varint(2, 30_000)].concat().into()
}

#[tokio::test]
async fn invalid_utf8_and_malformed_protobuf_are_invalid_argument() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bad: &[u8] = b"ok\xff\xfe";
    let service = pb_bytes(1, b"svc");
    let id = pb_bytes(2, b"a");
    let address = pb_bytes(3, b"10.0.0.1:80");
    let entry = |k: &[u8], v: &[u8]| pb_bytes(4, &[pb_bytes(1, k), pb_bytes(2, v)].concat());

    // Control: the hand encoding is right, so failures below are the bad bytes.
    raw_unary(
        channel.clone(),
        REGISTER,
        register_with(&[
            service.clone(),
            id.clone(),
            address.clone(),
            entry(b"k", b"v"),
        ]),
    )
    .await
    .expect("well-formed hand-encoded register");

    let cases: Vec<(&str, Bytes)> = vec![
        (
            "service",
            register_with(&[pb_bytes(1, bad), id.clone(), address.clone()]),
        ),
        (
            "id",
            register_with(&[service.clone(), pb_bytes(2, bad), address.clone()]),
        ),
        (
            "address",
            register_with(&[service.clone(), id.clone(), pb_bytes(3, bad)]),
        ),
        (
            "metadata key",
            register_with(&[
                service.clone(),
                id.clone(),
                address.clone(),
                entry(bad, b"v"),
            ]),
        ),
        (
            "metadata value",
            register_with(&[
                service.clone(),
                id.clone(),
                address.clone(),
                entry(b"k", bad),
            ]),
        ),
    ];
    for (field, body) in cases {
        let err = raw_unary(channel.clone(), REGISTER, body)
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains("malformed request message") && err.message().contains("UTF-8"),
            "{field}: {}",
            err.message()
        );
    }
    // Read paths: a unary and a server-streaming call.
    let err = raw_unary(channel.clone(), RESOLVE, pb_bytes(1, bad).into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = raw_server_streaming(channel.clone(), WATCH, pb_bytes(1, bad).into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Not protobuf at all: a truncated varint, a length past the end, an
    // invalid wire type, and random bytes.
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    for (what, body) in [
        ("truncated varint", vec![0x10, 0xff]),
        ("length past the end", vec![0x0a, 0x7f, 0x0a]),
        ("wire type 7", vec![0x0f]),
        ("noise", noise),
    ] {
        let err = raw_unary(channel.clone(), REGISTER, body.into())
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    assert_serving(&server, "after invalid UTF-8").await;
    server.stop().await;
}

#[tokio::test]
async fn oversize_message_inside_a_stream_is_resource_exhausted() {
    let _serial = serial().await;
    let server = TestServer::start_with(Config {
        max_message_size: 64 << 10,
        ..hostile_config()
    })
    .await;
    let mut c = server.client().await;
    let lease = register(&mut c, instance("ka", "a"), 30_000, 0)
        .await
        .lease_id;
    // First a good message, then one of ~100 KB: the refusal arrives in the
    // stream's trailers, not the response headers.
    let big = HeartbeatRequest {
        lease_ids: vec![u64::MAX; 10_000],
    };
    let requests = futures::stream::iter([
        HeartbeatRequest {
            lease_ids: vec![lease],
        },
        big,
    ]);
    let mut responses = c.keep_alive(requests).await.unwrap().into_inner();
    let first = responses.next().await.unwrap().unwrap();
    assert!(first.leases[0].found);
    let err = loop {
        match responses.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("stream ended without refusing the oversize message"),
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message()
            .contains("the limit is 65536 (max_message_size)"),
        "{}",
        err.message()
    );
    assert_serving(&server, "after an oversize stream message").await;
    server.stop().await;
}

#[tokio::test]
async fn request_body_that_never_ends_hits_the_request_timeout() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // A unary method whose request body never arrives: the server's decoder
    // waits on it until the per-call timeout answers.
    let started = tokio::time::Instant::now();
    let call = grpc.streaming(
        tonic::Request::new(futures::stream::pending::<Bytes>()),
        tonic::codegen::http::uri::PathAndQuery::from_static(REGISTER),
        common::hostile::RawCodec,
    );
    let err = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("server answered within 10s")
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(
        err.message().contains("the limit is 1s (request_timeout)"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_serving(&server, "after a never-ending request body").await;
    server.stop().await;
}

#[tokio::test]
async fn total_instances_are_capped_by_max_instances() {
    let _serial = serial().await;
    let server = TestServer::start_with(Config {
        max_instances: 3,
        ..hostile_config()
    })
    .await;
    let mut c = server.client().await;
    let mut leases = Vec::new();
    for (svc, id) in [("a", "1"), ("b", "1"), ("c", "1")] {
        leases.push(
            register(&mut c, instance(svc, id), 30_000, 0)
                .await
                .lease_id,
        );
    }
    assert_status(
        try_register(&mut c, instance("d", "1"), 30_000, 0).await,
        Code::ResourceExhausted,
        &["instances: 3 live, the limit is 3 (max_instances)"],
    );
    // Replacing an existing instance adds none, so it is allowed at the cap.
    register(&mut c, instance("a", "1"), 30_000, 0).await;
    // Making room lets a new one in.
    deregister(&mut c, deregister_lease(leases[1])).await;
    register(&mut c, instance("d", "1"), 30_000, 0).await;
    server.stop().await;
}
