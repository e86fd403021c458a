//! `GET /v1/prometheus/sd` is Prometheus `http_sd`: a JSON list of target
//! groups (`targets`: host:port strings, `labels`: valid label names to
//! strings), and it follows registrations, deregistrations and expiries.

mod common;

use std::time::Duration;

use common::{
    api::{InstanceExt, deregister, deregister_lease, instance, register},
    http::{HttpServer, get, request},
};
use serde_json::Value;

/// Checks the http_sd schema strictly and returns (target, labels) pairs.
fn parse_http_sd(body: &Value) -> Vec<(String, serde_json::Map<String, Value>)> {
    let groups = body.as_array().expect("http_sd: a JSON array");
    let mut out = Vec::new();
    for g in groups {
        let obj = g.as_object().expect("a target group is an object");
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["labels", "targets"], "{g}");
        let labels = obj["labels"].as_object().expect("labels: an object");
        for (k, v) in labels {
            let mut c = k.chars();
            assert!(
                c.next()
                    .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                    && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
                "label name {k:?} is not [a-zA-Z_][a-zA-Z0-9_]*"
            );
            assert!(v.is_string(), "label {k} value {v} is not a string");
        }
        let targets = obj["targets"].as_array().expect("targets: an array");
        assert!(!targets.is_empty());
        for t in targets {
            let t = t.as_str().expect("a target is a string");
            let (_, port) = t.rsplit_once(':').expect("host:port");
            port.parse::<u16>().expect("numeric port");
            out.push((t.to_string(), labels.clone()));
        }
    }
    out
}

#[tokio::test]
async fn http_sd_schema_labels_and_following_the_catalog() {
    let server = HttpServer::start().await;
    assert_eq!(
        parse_http_sd(&get(server.http, "/v1/prometheus/sd").await.json()).len(),
        0
    );

    let mut grpc = server.client().await;
    let prod = instance("prod", "prod-1")
        .at("10.0.0.1:9100")
        .metas(&[("zone", "eu-1"), ("app.kubernetes.io/version", "1.4.2")]);
    let lease = register(&mut grpc, prod, 10_000, 0).await.lease_id;
    let web = instance("web", "web-1").at("[2001:db8::5]:9100");
    register(&mut grpc, web, 10_000, 0).await;
    // Expires on its own.
    let batch = instance("batch", "batch-1").at("batch.internal:9100");
    register(&mut grpc, batch, 300, 0).await;

    let a = get(server.http, "/v1/prometheus/sd").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let groups = parse_http_sd(&a.json());
    let targets: Vec<_> = groups.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        targets,
        ["batch.internal:9100", "10.0.0.1:9100", "[2001:db8::5]:9100"]
    );
    let prod = &groups[1].1;
    assert_eq!(prod["__meta_registry_service"], "prod");
    assert_eq!(prod["__meta_registry_instance_id"], "prod-1");
    assert_eq!(prod["__meta_registry_zone"], "eu-1");
    assert_eq!(prod["__meta_registry_health"], "passing");
    assert_eq!(prod["__meta_registry_lease_id"], lease.to_string());
    assert_eq!(
        prod["__meta_registry_metadata_app_kubernetes_io_version"],
        "1.4.2"
    );
    assert_eq!(groups[2].1["__meta_registry_zone"], "", "no zone metadata");

    // Filter and grouping.
    let only = parse_http_sd(
        &get(server.http, "/v1/prometheus/sd?service=web")
            .await
            .json(),
    );
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].1["__meta_registry_service"], "web");
    let by_service = get(server.http, "/v1/prometheus/sd?group_by=service")
        .await
        .json();
    parse_http_sd(&by_service);
    assert_eq!(by_service.as_array().unwrap().len(), 3);
    assert_eq!(
        by_service[1]["labels"].as_object().unwrap().len(),
        1,
        "a service group carries only what all its targets share"
    );
    let bad = get(server.http, "/v1/prometheus/sd?service=Web").await;
    assert_eq!(bad.status, 400);

    // Cheap to poll: unchanged answer, 304.
    let tag = a.header("etag").unwrap().to_string();
    let same = request(
        server.http,
        "GET",
        "/v1/prometheus/sd",
        &[("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(same.status, 304);

    // Follows the catalog: deregister and expiry take targets away.
    deregister(&mut grpc, deregister_lease(lease)).await;
    common::wait_until(
        Duration::from_secs(5),
        "batch-1 to expire and prod-1 to go",
        || async {
            let t: Vec<String> = parse_http_sd(&get(server.http, "/v1/prometheus/sd").await.json())
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            t == ["[2001:db8::5]:9100"]
        },
    )
    .await;
    let changed = request(
        server.http,
        "GET",
        "/v1/prometheus/sd",
        &[("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(changed.status, 200);
    server.stop().await;
}
