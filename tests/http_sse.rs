//! The watch as Server-Sent Events: snapshot then events with revision ids,
//! resume with `Last-Event-ID` (replay, or a reset snapshot when the history
//! is gone or the epoch differs), selectors, progress, and the end of the
//! stream at shutdown.

mod common;

use std::time::Duration;

use common::{
    api::{self, InstanceExt, deregister_instance, instance},
    http::{HttpServer, Sse, get},
};
use registry::Config;

const T: Duration = Duration::from_secs(5);

/// Registers `prod/id` on a new 10 s lease; the revision.
async fn register(server: &HttpServer, id: &str, meta: &[(&str, &str)]) -> u64 {
    let instance = instance("prod", id).at("10.0.0.1:8002").metas(meta);
    api::register(&mut server.client().await, instance, 10_000, 0)
        .await
        .revision
}

/// Deregisters `prod/id`; the revision.
async fn deregister(server: &HttpServer, id: &str) -> u64 {
    let request = deregister_instance("prod", id);
    api::deregister(&mut server.client().await, request)
        .await
        .revision
}

fn rev(v: &serde_json::Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn snapshot_then_events_then_resume_from_last_event_id() {
    let server = HttpServer::start().await;
    let r1 = register(&server, "prod-1", &[]).await;
    let mut sse = Sse::open(server.http, "/v1/watch/prod", &[]).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );

    let snap = sse.next_change(T).await.unwrap();
    assert_eq!(snap.event, "snapshot");
    assert_eq!(snap.id.as_deref(), Some(r1.to_string().as_str()));
    let j = snap.json();
    assert_eq!(rev(&j["revision"]), r1);
    assert_eq!(j["reset"], false);
    assert_eq!(j["instances"][0]["id"], "prod-1");

    let r2 = register(&server, "prod-2", &[]).await;
    let put = sse.next_change(T).await.unwrap();
    assert_eq!(put.event, "events");
    assert_eq!(put.id.as_deref(), Some(r2.to_string().as_str()));
    let e = &put.json()["events"][0];
    assert_eq!(e["type"], "EVENT_TYPE_PUT");
    assert_eq!(e["instance"]["id"], "prod-2");
    assert_eq!(rev(&e["revision"]), r2);

    let r3 = deregister(&server, "prod-1").await;
    let del = sse.next_change(T).await.unwrap();
    let e = &del.json()["events"][0];
    assert_eq!(e["type"], "EVENT_TYPE_DELETE");
    assert_eq!(e["reason"], "DELETE_REASON_DEREGISTERED");
    assert_eq!(del.id.as_deref(), Some(r3.to_string().as_str()));
    drop(sse);

    // Missed while disconnected: replayed in order, no snapshot.
    let r4 = register(&server, "prod-3", &[]).await;
    let r5 = deregister(&server, "prod-2").await;
    let last = r3.to_string();
    let mut resumed = Sse::open(server.http, "/v1/watch/prod", &[("last-event-id", &last)]).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let ev = resumed.next_change(T).await.unwrap();
        assert_eq!(ev.event, "events", "a resume replays: {ev:?}");
        for e in ev.json()["events"].as_array().unwrap() {
            seen.push((rev(&e["revision"]), e["type"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(
        seen,
        [
            (r4, "EVENT_TYPE_PUT".to_string()),
            (r5, "EVENT_TYPE_DELETE".to_string())
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn resets_when_history_is_gone_or_the_epoch_differs() {
    let server = HttpServer::start_with(Config {
        history_events: 2,
        ..common::TestServer::no_warmup_config()
    })
    .await;
    let first = register(&server, "prod-1", &[]).await;
    for i in 2..6 {
        register(&server, &format!("prod-{i}"), &[]).await;
    }
    let last = first.to_string();
    let mut sse = Sse::open(server.http, "/v1/watch/prod", &[("last-event-id", &last)]).await;
    let ev = sse.next_change(T).await.unwrap();
    assert_eq!(ev.event, "snapshot");
    let j = ev.json();
    assert_eq!(j["reset"], true);
    assert_eq!(j["reason"], "RESET_REASON_COMPACTED");
    assert_eq!(j["instances"].as_array().unwrap().len(), 5);

    // A revision of another server life.
    let epoch = get(server.http, "/v1/status").await.json()["server"]["epoch"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    let path = format!("/v1/watch/prod?start_revision=2&epoch={}", epoch + 1);
    let mut other = Sse::open(server.http, &path, &[]).await;
    let j = other.next_change(T).await.unwrap().json();
    assert_eq!(j["reset"], true);
    assert_eq!(j["reason"], "RESET_REASON_EPOCH_CHANGED");
    server.stop().await;
}

#[tokio::test]
async fn selectors_progress_errors_and_shutdown() {
    let server = HttpServer::start().await;
    register(&server, "prod-1", &[("zone", "eu-1")]).await;
    register(&server, "prod-2", &[("zone", "us-1")]).await;
    let mut sse = Sse::open(
        server.http,
        "/v1/watch/prod?zone=eu-1&progress_interval_ms=200",
        &[],
    )
    .await;
    let snap = sse.next_change(T).await.unwrap().json();
    let ids: Vec<_> = snap["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["prod-1"]);
    let progress = sse.next(T).await.unwrap();
    assert_eq!(progress.event, "progress");
    assert_eq!(
        progress.id.as_deref(),
        progress.json()["revision"].as_str(),
        "progress ids are resume points"
    );
    // A us-1 change is outside the view; an eu-1 one is in it.
    register(&server, "prod-3", &[("zone", "us-1")]).await;
    let r = register(&server, "prod-4", &[("zone", "eu-1")]).await;
    let ev = sse.next_change(T).await.unwrap();
    assert_eq!(ev.json()["events"][0]["instance"]["id"], "prod-4");
    assert_eq!(ev.id.as_deref(), Some(r.to_string().as_str()));

    // Watch-all starts with every instance.
    let mut all = Sse::open(server.http, "/v1/watch", &[]).await;
    let snap = all.next_change(T).await.unwrap().json();
    assert_eq!(snap["instances"].as_array().unwrap().len(), 4);

    let bad = get(server.http, "/v1/watch/Prod").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["status"], "INVALID_ARGUMENT");
    let bad = common::http::request(
        server.http,
        "GET",
        "/v1/watch/prod",
        &[("last-event-id", "abc")],
        None,
    )
    .await;
    assert_eq!(bad.status, 400);

    // Shutdown: an `error` message (UNAVAILABLE, as gRPC), then the end.
    let stopping = tokio::spawn(server.stop());
    let mut last = None;
    while let Some(ev) = sse.next(T).await {
        last = Some(ev);
    }
    let last = last.expect("an error message before the end");
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["status"], "UNAVAILABLE");
    stopping.await.unwrap();
}
