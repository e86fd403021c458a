//! Hostile watchers: 10,000 watch calls from one client, and watchers that
//! never read. The caps answer the excess with RESOURCE_EXHAUSTED, writers
//! never wait on readers, a reader that stalls is later sent a reset
//! snapshot, the server keeps serving others, and RSS stays bounded.

mod common;

use std::time::Duration;

use common::{
    TestServer,
    api::{InstanceExt, instance, register, try_register},
    hostile::{RssBudget, assert_serving, hostile_config, serial},
    wait_until,
};
use futures::{StreamExt, stream};
use registry::Config;
use registry_api::v1::{
    EventType, ResetReason, StatusRequest, WatchRequest, WatchResponse,
    registry_client::RegistryClient, watch_response::Kind,
};
use tonic::{Code, Status, Streaming, transport::Channel};

type Client = RegistryClient<Channel>;

/// Opens `n` watches on one client's connection, `in_flight` at a time;
/// returns the accepted streams and the refusals.
async fn open_watches(
    c: &Client,
    n: usize,
    in_flight: usize,
) -> (Vec<Streaming<WatchResponse>>, Vec<Status>) {
    let results: Vec<_> = stream::iter(0..n)
        .map(|_| {
            let mut c = c.clone();
            async move {
                c.watch(WatchRequest {
                    service: "watched".into(),
                    progress_interval_ms: 3_600_000,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => refused.push(e),
        }
    }
    (ok, refused)
}

async fn watcher_gauge(c: &Client) -> u64 {
    c.clone()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .watchers
}

#[tokio::test]
async fn ten_thousand_watchers_from_one_client_are_capped() {
    let _serial = serial().await;
    let rss = RssBudget::start();
    let server = TestServer::start_with(Config {
        max_watchers: 800,
        max_watchers_per_connection: 500,
        ..hostile_config()
    })
    .await;
    let c = server.client().await;
    let (accepted, refused) = open_watches(&c, 10_000, 256).await;
    assert_eq!(accepted.len(), 500, "the per-connection cap admits 500");
    assert_eq!(refused.len(), 9_500);
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(
            e.message()
                .contains("the limit is 500 (max_watchers_per_connection)"),
            "{}",
            e.message()
        );
    }
    // A second connection reaches the total cap instead.
    let c2 = server.client().await;
    let (accepted2, refused2) = open_watches(&c2, 1_000, 256).await;
    assert_eq!(accepted2.len(), 300, "the total cap admits 800 in all");
    assert!(refused2.iter().all(|e| e.code() == Code::ResourceExhausted
        && e.message().contains("the limit is 800 (max_watchers)")));
    assert_eq!(watcher_gauge(&c).await, 800);

    // The server keeps serving, and the admitted watchers work.
    assert_serving(&server, "with 800 watchers open").await;
    let mut w = accepted.into_iter().next().unwrap();
    let mut rest = accepted2;
    assert!(matches!(
        w.message().await.unwrap().unwrap().kind,
        Some(Kind::Snapshot(_))
    ));
    let watched = instance("watched", "a").at("127.0.0.1:9");
    register(&mut c.clone(), watched, 30_000, 0).await;
    let event = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event.kind, Some(Kind::Events(_))), "{event:?}");

    // Closing streams frees their slots.
    rest.truncate(100);
    wait_until(Duration::from_secs(5), "watchers released", || async {
        watcher_gauge(&c).await == 1 + 100
    })
    .await;
    drop(rest);
    drop(w);
    // Per admitted watcher: an HTTP/2 stream on each side, a queue and a
    // task, a few KiB; 800 of them plus 10,500 refused calls' transient
    // state are tens of MiB at most.
    rss.check(96, "10,000 watchers from one client");
    server.stop().await;
}

#[tokio::test]
async fn watchers_that_never_read_do_not_hold_back_writers_or_memory() {
    let _serial = serial().await;
    let rss = RssBudget::start();
    let server = TestServer::start_with(Config {
        watch_buffer: 8,
        ..hostile_config()
    })
    .await;
    // 20 watch-all streams over 4 connections, never read, not even the
    // snapshot.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let c = server.client().await;
        for _ in 0..5 {
            let w = c
                .clone()
                .watch(WatchRequest::default())
                .await
                .unwrap()
                .into_inner();
            stalled.push(w);
        }
    }
    // One more on a connection of its own: it reads later. (Unread streams
    // pin their connection's client-side flow-control window, so a stream
    // sharing a connection with stalled ones could not catch up.)
    let mut w = server
        .client()
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    // 5,000 instances with 1 KiB of metadata each: ~5.5 MB of events per
    // watcher, more than an HTTP/2 connection window, so the server must
    // stop sending to them.
    let writer = server.client().await;
    let start = tokio::time::Instant::now();
    let results: Vec<_> = stream::iter(0..5_000)
        .map(|i| {
            let mut c = writer.clone();
            async move {
                let flood = instance(&format!("flood-{}", i % 10), &format!("i{i}"))
                    .at("127.0.0.1:9")
                    .meta("pad", &"p".repeat(1000));
                try_register(&mut c, flood, 60_000, 0).await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    eprintln!(
        "5,000 registrations beside 20 stalled watchers took {:?}",
        start.elapsed()
    );
    assert_serving(&server, "beside stalled watchers").await;
    let status = writer
        .clone()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.instances, 5_000 + 1);
    assert_eq!(status.watchers, 21);

    // A stalled watcher that finally reads is told it fell behind (a reset
    // snapshot instead of the events the server dropped for it), and what it
    // then holds is exactly the catalog.
    let mut state = std::collections::HashSet::new();
    let mut resets = 0;
    let mut in_snapshot = false;
    tokio::time::timeout(Duration::from_secs(20), async {
        while !(resets > 0 && !in_snapshot && state.len() == 5_000 + 1) {
            let msg = w.message().await.unwrap().expect("stream open");
            match msg.kind {
                Some(Kind::Snapshot(s)) => {
                    if !in_snapshot {
                        state.clear();
                    }
                    if s.reset {
                        assert_eq!(s.reason(), ResetReason::SlowConsumer);
                        resets += 1;
                    }
                    in_snapshot = s.more;
                    state.extend(s.instances.into_iter().map(|i| (i.service, i.id)));
                }
                Some(Kind::Events(batch)) => {
                    for e in batch.events {
                        let kind = e.r#type();
                        let i = e.instance.unwrap();
                        match kind {
                            EventType::Put => state.insert((i.service, i.id)),
                            _ => state.remove(&(i.service, i.id)),
                        };
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "stalled watcher did not converge within 20s: {resets} resets, {} instances",
            state.len()
        )
    });
    drop(stalled);
    // The catalog itself is ~10 MiB (5,000 instances of 1 KiB, events in
    // the history, the shared encoded frames); the client-side HTTP/2
    // buffers hold at most a 5 MiB connection window per connection (4).
    // If the server queued every event per watcher as its own copy, 20 ×
    // 5.5 MB would blow this budget.
    rss.check(128, "20 watchers that never read");
    server.stop().await;
}
