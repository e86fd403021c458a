//! Hostile peers at the connection level: garbage bytes, HTTP/1, truncated
//! HTTP/2 prefaces, silent sockets, peers that never answer pings, 1,000
//! idle connections, more connections than the cap. Each is closed (at once,
//! or by the handshake / keepalive / idle timeout), the server keeps serving
//! others, and its RSS stays bounded; a healthy idle client is never cut.

mod common;

use std::time::Duration;

use common::{
    TestServer,
    api::{InstanceExt, instance, register},
    hostile::{
        H2_EMPTY_SETTINGS, H2_PREFACE, HANDSHAKE, IDLE, RssBudget, SLACK, assert_serving,
        hostile_config, raw_tcp, read_until_closed, serial, write_lossy,
    },
};
use futures::{StreamExt, future::join_all};
use registry::Config;
use registry_api::v1::{WatchRequest, watch_response::Kind};

/// HTTP/2 frame types in the bytes a server sent (9-byte frame headers).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}
const FRAME_PING: u8 = 0x6;
const FRAME_GOAWAY: u8 = 0x7;

#[tokio::test]
async fn garbage_bytes_and_http1_are_closed_at_once() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    let mut noise = vec![0u8; 4096];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let http1 = b"GET / HTTP/1.1\r\nHost: registry\r\n\r\n".to_vec();
    let bad_after_preface = [H2_PREFACE, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"].concat();
    for (what, bytes) in [
        ("garbage", noise),
        ("HTTP/1.1 request", http1),
        ("garbage after the preface", bad_after_preface),
    ] {
        let mut tcp = raw_tcp(&server).await;
        write_lossy(&mut tcp, &bytes).await;
        let closed = read_until_closed(&mut tcp, HANDSHAKE + SLACK, what).await;
        // Closed by the protocol check, not left to a timeout.
        assert!(
            closed.after < HANDSHAKE,
            "{what}: closed only after {:?}",
            closed.after
        );
    }
    assert_serving(&server, "after garbage").await;
    server.stop().await;
}

#[tokio::test]
async fn truncated_preface_and_silent_socket_are_reaped_by_the_handshake_timeout() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    for (what, bytes) in [
        ("silent socket", &b""[..]),
        ("truncated preface", &H2_PREFACE[..16]),
        // One byte short: the preface is complete only at 24 bytes.
        ("preface minus one byte", &H2_PREFACE[..23]),
    ] {
        let mut tcp = raw_tcp(&server).await;
        write_lossy(&mut tcp, bytes).await;
        let closed = read_until_closed(&mut tcp, HANDSHAKE + SLACK, what).await;
        assert!(
            closed.after >= HANDSHAKE.mul_f32(0.8),
            "{what}: closed after {:?}, before the handshake timeout",
            closed.after
        );
    }
    assert_serving(&server, "after truncated prefaces").await;
    server.stop().await;
}

#[tokio::test]
async fn peer_that_never_answers_pings_is_reaped() {
    let _serial = serial().await;
    let server = TestServer::start_with(hostile_config()).await;
    // A complete HTTP/2 handshake, then silence: a half-open peer.
    let mut tcp = raw_tcp(&server).await;
    write_lossy(&mut tcp, &[H2_PREFACE, H2_EMPTY_SETTINGS].concat()).await;
    let closed = read_until_closed(&mut tcp, IDLE + SLACK, "silent h2 peer").await;
    let types = frame_types(&closed.received);
    assert!(
        types.contains(&FRAME_PING),
        "the server should have pinged the peer; frames {types:?}"
    );
    assert!(
        types.contains(&FRAME_GOAWAY),
        "the keepalive timeout closes with GOAWAY; frames {types:?}"
    );
    // The preface alone (no SETTINGS): hyper waits for SETTINGS forever; the
    // idle timeout does not.
    let mut tcp = raw_tcp(&server).await;
    write_lossy(&mut tcp, H2_PREFACE).await;
    read_until_closed(&mut tcp, IDLE + SLACK, "preface without settings").await;
    assert_serving(&server, "after silent h2 peers").await;
    server.stop().await;
}

#[tokio::test]
async fn thousand_idle_connections_are_reaped_while_others_are_served() {
    let _serial = serial().await;
    let rss = RssBudget::start();
    let server = TestServer::start_with(hostile_config()).await;
    let mut peers = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut tcp = raw_tcp(&server).await;
        // Half silent, half stuck halfway through the preface.
        if i % 2 == 1 {
            write_lossy(&mut tcp, &H2_PREFACE[..10]).await;
        }
        peers.push(tcp);
    }
    assert_serving(&server, "with 1,000 idle connections open").await;
    let closed = join_all(
        peers
            .iter_mut()
            .map(|tcp| read_until_closed(tcp, HANDSHAKE + SLACK, "idle connection")),
    )
    .await;
    assert_eq!(closed.len(), 1000);
    assert_serving(&server, "after reaping 1,000 idle connections").await;
    drop(peers);
    // Per connection the server holds a socket, a task and hyper's buffers
    // (a few KiB); 1,000 of them are a few MiB, plus the runtime's worker
    // stacks. A leak per connection (say, hyper's 400 KiB read buffer kept)
    // would blow the budget.
    rss.check(64, "1,000 idle connections");
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let _serial = serial().await;
    let server = TestServer::start_with(Config {
        max_connections: 20,
        ..hostile_config()
    })
    .await;
    let opened = tokio::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(raw_tcp(&server).await);
    }
    for i in 0..10 {
        let mut tcp = raw_tcp(&server).await;
        let closed = read_until_closed(&mut tcp, HANDSHAKE + SLACK, "over the cap").await;
        assert!(
            closed.after < HANDSHAKE / 2,
            "connection {i} over the cap closed only after {:?}",
            closed.after
        );
    }
    // The held ones are silent: the handshake timeout frees their slots...
    for tcp in held.iter_mut() {
        read_until_closed(tcp, HANDSHAKE + SLACK, "held").await;
    }
    assert!(
        opened.elapsed() >= HANDSHAKE.mul_f32(0.8),
        "held connections closed after {:?}, before the handshake timeout",
        opened.elapsed()
    );
    // ...and normal clients get in again.
    assert_serving(&server, "after the cap freed up").await;
    server.stop().await;
}

async fn open_quiet_watch(
    server: &TestServer,
) -> tonic::Streaming<registry_api::v1::WatchResponse> {
    let mut c = server.client().await;
    let mut stream = c
        .watch(WatchRequest {
            service: "quiet".into(),
            // No progress messages: the server sends nothing on its own.
            progress_interval_ms: 3_600_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))));
    stream
}

async fn put_quiet(server: &TestServer) {
    let instance = instance("quiet", "a").at("127.0.0.1:9");
    register(&mut server.client().await, instance, 30_000, 0).await;
}

#[tokio::test]
async fn healthy_idle_client_is_kept_by_keepalive_and_cut_without_it() {
    let _serial = serial().await;
    // With keepalive: the client answers pings, so it is never idle for the
    // idle timeout, and its watch survives twice that long.
    let server = TestServer::start_with(hostile_config()).await;
    let mut watch = open_quiet_watch(&server).await;
    tokio::time::sleep(IDLE * 2 + Duration::from_millis(300)).await;
    put_quiet(&server).await;
    let next = tokio::time::timeout(SLACK, watch.next())
        .await
        .expect("event within the slack");
    match next {
        Some(Ok(msg)) => assert!(matches!(msg.kind, Some(Kind::Events(_))), "{msg:?}"),
        other => panic!("healthy idle watch was cut: {other:?}"),
    }
    server.stop().await;

    // Without keepalive, the same quiet client is exactly what the idle
    // timeout exists for: its connection is closed.
    let server = TestServer::start_with(Config {
        keepalive_interval: Duration::ZERO,
        ..hostile_config()
    })
    .await;
    let mut watch = open_quiet_watch(&server).await;
    let next = tokio::time::timeout(IDLE + SLACK, watch.next())
        .await
        .expect("idle connection closed within the idle timeout");
    assert!(
        !matches!(next, Some(Ok(_))),
        "expected the stream to end, got {next:?}"
    );
    assert_serving(&server, "after the idle cut").await;
    server.stop().await;
}
