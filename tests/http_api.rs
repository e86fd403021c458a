//! The HTTP/JSON API end to end: the proto3 JSON mapping of the answers,
//! ETags and 304s, long-poll that wakes only for its own service, writes
//! with the gRPC validation and exact errors, auth with the same roles and
//! ownership, and the loopback `Host` check.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{
    api::{self, InstanceExt, deregister_instance, instance, register, register_request},
    http::{HttpServer, get, post_json, request},
};
use registry::Config;
use registry_api::v1::{Instance, RegisterRequest};
use serde_json::Value;

/// Register on a new 10 s lease over gRPC; the lease.
async fn grpc_register(server: &HttpServer, i: Instance) -> u64 {
    register(&mut server.client().await, i, 10_000, 0)
        .await
        .lease_id
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test]
async fn resolve_list_and_status_follow_the_proto_json_mapping() {
    let server = HttpServer::start().await;
    let lease = grpc_register(
        &server,
        instance("prod", "prod-1")
            .at("10.0.0.1:8002")
            .metas(&[("version", "1.4.2"), ("zone", "eu-1")]),
    )
    .await;
    grpc_register(
        &server,
        instance("prod", "prod-2")
            .at("10.0.0.2:8002")
            .metas(&[("version", "2.0")]),
    )
    .await;

    let a = get(server.http, "/v1/services/prod").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type"), Some("application/json"));
    let j = a.json();
    assert_eq!(j["serviceKnown"], true);
    let revision = s(&j["revision"]).parse::<u64>().unwrap();
    assert_eq!(
        a.header("x-registry-revision"),
        Some(revision.to_string().as_str())
    );
    let first = &j["instances"][0];
    assert_eq!(first["service"], "prod");
    assert_eq!(first["id"], "prod-1");
    assert_eq!(first["address"], "10.0.0.1:8002");
    assert_eq!(first["weight"], 1, "32-bit integers are numbers");
    assert_eq!(
        s(&first["leaseId"]),
        lease.to_string(),
        "64-bit integers are strings"
    );
    assert_eq!(first["metadata"]["version"], "1.4.2");
    assert_eq!(s(&first["leaseRemainingMs"]), "0", "every field is present");
    assert!(j["server"]["epoch"].is_string() && j["server"]["warmingUp"] == false);

    // Selector as query parameters, lease TTLs on request, health filter.
    let j = get(
        server.http,
        "/v1/services/prod?version=2.0&include_lease_ttl=true",
    )
    .await
    .json();
    let ids: Vec<_> = j["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| s(&i["id"]))
        .collect();
    assert_eq!(ids, ["prod-2"]);
    let left: u64 = s(&j["instances"][0]["leaseRemainingMs"]).parse().unwrap();
    assert!(left > 0 && left <= 10_000, "{left}");
    let j = get(server.http, "/v1/services/prod?health=critical")
        .await
        .json();
    assert_eq!(
        j["instances"].as_array().unwrap().len(),
        0,
        "nothing listed is critical"
    );
    let j = get(server.http, "/v1/services/prod?health=serving")
        .await
        .json();
    assert_eq!(j["instances"].as_array().unwrap().len(), 2);

    // Unknown service: known false, as gRPC Resolve answers.
    let j = get(server.http, "/v1/services/nobody").await.json();
    assert_eq!(j["serviceKnown"], false);
    assert_eq!(j["instances"].as_array().unwrap().len(), 0);

    let j = get(server.http, "/v1/services").await.json();
    assert_eq!(j["services"][0]["name"], "prod");
    assert_eq!(j["services"][0]["instanceCount"], 2);
    let st = get(server.http, "/v1/status").await;
    assert!(st.header("etag").is_some());
    let j = st.json();
    assert_eq!(s(&j["instances"]), "2");
    assert_eq!(s(&j["leases"]), "2");
    assert!(j["uptimeMs"].is_string() && j["version"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn etags_change_only_with_the_answer() {
    let server = HttpServer::start().await;
    grpc_register(&server, instance("prod", "prod-1").at("10.0.0.1:8002")).await;
    let a = get(server.http, "/v1/services/prod").await;
    let tag = a.header("etag").expect("ETag").to_string();
    assert!(tag.starts_with("W/\""), "{tag}");
    let cond = |tag: String| async move {
        request(
            server.http,
            "GET",
            "/v1/services/prod",
            &[("if-none-match", &tag)],
            None,
        )
        .await
    };
    let b = cond(tag.clone()).await;
    assert_eq!(b.status, 304);
    assert!(b.body.is_empty());
    assert_eq!(b.header("etag"), Some(tag.as_str()));

    // Another service changes: the catalog revision moves, prod's answer
    // does not, so pollers keep getting 304s.
    grpc_register(&server, instance("web", "web-1").at("10.0.0.9:80")).await;
    assert_eq!(cond(tag.clone()).await.status, 304);

    // prod changes: a fresh answer with a new tag.
    grpc_register(&server, instance("prod", "prod-2").at("10.0.0.2:8002")).await;
    let c = cond(tag.clone()).await;
    assert_eq!(c.status, 200);
    assert_ne!(c.header("etag"), Some(tag.as_str()));
    assert_eq!(c.json()["instances"].as_array().unwrap().len(), 2);

    // The list's tag follows the counts.
    let l = get(server.http, "/v1/services").await;
    let ltag = l.header("etag").unwrap().to_string();
    let same = request(
        server.http,
        "GET",
        "/v1/services",
        &[("if-none-match", &ltag)],
        None,
    )
    .await;
    assert_eq!(same.status, 304);
    server.stop().await;
}

#[tokio::test]
async fn long_poll_wakes_only_for_its_own_service() {
    let server = HttpServer::start().await;
    grpc_register(&server, instance("prod", "prod-1").at("10.0.0.1:8002")).await;
    let rev = get(server.http, "/v1/services/prod")
        .await
        .header("x-registry-revision")
        .unwrap()
        .to_string();
    let path = format!("/v1/services/prod?wait=20s&after_revision={rev}");
    let addr = server.http;
    let mut poll = tokio::spawn(async move { get(addr, &path).await });

    // A change of another service does not answer the poll...
    grpc_register(&server, instance("web", "web-1").at("10.0.0.9:80")).await;
    let early = tokio::time::timeout(Duration::from_millis(500), &mut poll).await;
    assert!(early.is_err(), "a change of web answered a poll of prod");

    // ...a change of its own does, at once.
    let started = tokio::time::Instant::now();
    grpc_register(&server, instance("prod", "prod-2").at("10.0.0.2:8002")).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the poll answered after prod changed")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(answer.status, 200);
    let j = answer.json();
    assert_eq!(j["instances"].as_array().unwrap().len(), 2);
    assert!(s(&j["revision"]).parse::<u64>().unwrap() > rev.parse::<u64>().unwrap());

    // Nothing changes: the poll answers the same content after `wait`.
    let now = s(&j["revision"]).to_string();
    let t = tokio::time::Instant::now();
    let same = get(
        server.http,
        &format!("/v1/services/prod?wait=300ms&after_revision={now}"),
    )
    .await;
    assert_eq!(same.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(same.json()["instances"].as_array().unwrap().len(), 2);

    // A revision from the future (another server life) answers at once.
    let t = tokio::time::Instant::now();
    let future = get(
        server.http,
        "/v1/services/prod?wait=20s&after_revision=999999",
    )
    .await;
    assert_eq!(future.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2));

    // The list long-polls on any change.
    let lrev = get(server.http, "/v1/services")
        .await
        .header("x-registry-revision")
        .unwrap()
        .to_string();
    let path = format!("/v1/services?wait=20s&after_revision={lrev}");
    let list = tokio::spawn(async move { get(addr, &path).await });
    grpc_register(&server, instance("db", "db-1").at("10.0.0.5:5432")).await;
    let list = tokio::time::timeout(Duration::from_secs(5), list)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(list.json()["services"].as_array().unwrap().len(), 3);

    let bad = get(server.http, "/v1/services/prod?wait=30s").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("wait needs after_revision")
    );
    server.stop().await;
}

#[tokio::test]
async fn writes_validate_and_fail_exactly_as_grpc() {
    let server = HttpServer::start().await;
    let body = r#"{"instance": {"service": "prod", "id": "prod-1", "address": "10.0.0.1:8002",
                   "metadata": {"version": "1.4.2"}, "weight": 3}, "ttlMs": "5000"}"#;
    let a = post_json(server.http, "/v1/register", body, &[]).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let j = a.json();
    let lease = s(&j["leaseId"]).to_string();
    assert_eq!(s(&j["ttlMs"]), "5000");
    assert!(s(&j["revision"]).parse::<u64>().unwrap() > 0);

    // Proto field names and numbers for 64-bit fields are accepted too.
    let attach = format!(
        r#"{{"instance": {{"service": "prod-admin", "id": "prod-1", "address": "10.0.0.1:9002"}}, "lease_id": {lease}}}"#
    );
    let b = post_json(server.http, "/v1/register", &attach, &[]).await;
    assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
    assert_eq!(s(&b.json()["leaseId"]), lease);

    let resolved = get(server.http, "/v1/services/prod").await.json();
    assert_eq!(resolved["instances"][0]["weight"], 3);

    let hb = post_json(
        server.http,
        "/v1/heartbeat",
        &format!(r#"{{"leaseIds": ["{lease}"]}}"#),
        &[],
    )
    .await;
    assert_eq!(hb.status, 200);
    let j = hb.json();
    assert_eq!(j["leases"][0]["found"], true);
    assert_eq!(s(&j["leases"][0]["ttlMs"]), "5000");

    // The same bad request over both APIs: same code, same message.
    let mut grpc = server.client().await;
    let cases: Vec<(String, RegisterRequest, u16)> = vec![
        (
            r#"{"instance": {"service": "Prod", "id": "x", "address": "10.0.0.1:1"}, "ttlMs": "5000"}"#.into(),
            register_request(instance("Prod", "x").at("10.0.0.1:1"), 5000, 0),
            400,
        ),
        (
            r#"{"instance": {"service": "prod", "id": "x", "address": "10.0.0.1:1"}, "ttlMs": "0"}"#.into(),
            register_request(instance("prod", "x").at("10.0.0.1:1"), 0, 0),
            400,
        ),
        (
            r#"{"instance": {"service": "prod", "id": "x", "address": "10.0.0.1:1"}, "ttlMs": "99999999"}"#.into(),
            register_request(instance("prod", "x").at("10.0.0.1:1"), 99_999_999, 0),
            400,
        ),
        (
            r#"{"instance": {"service": "prod", "id": "x", "address": "10.0.0.1:1"}, "leaseId": "12345"}"#.into(),
            register_request(instance("prod", "x").at("10.0.0.1:1"), 0, 12345),
            404,
        ),
    ];
    for (json, req, http_status) in cases {
        let status = grpc.register(req).await.unwrap_err();
        let a = post_json(server.http, "/v1/register", &json, &[]).await;
        assert_eq!(a.status, http_status, "{json}");
        let j = a.json();
        assert_eq!(j["code"], status.code() as i32, "{json}");
        assert_eq!(j["message"], status.message(), "{json}");
        assert!(
            j["status"]
                .as_str()
                .unwrap()
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
        );
    }

    // Body problems are named.
    let no_type = request(server.http, "POST", "/v1/register", &[], Some(body)).await;
    assert_eq!(no_type.status, 415);
    assert!(s(&no_type.json()["message"]).contains("Content-Type: application/json"));
    let typo = post_json(
        server.http,
        "/v1/register",
        r#"{"instance": {}, "ttl": "5000"}"#,
        &[],
    )
    .await;
    assert_eq!(typo.status, 400);
    assert!(
        s(&typo.json()["message"]).contains("unknown field `ttl`"),
        "{}",
        typo.json()
    );
    let empty_hb = post_json(server.http, "/v1/heartbeat", r#"{"leaseIds": []}"#, &[]).await;
    assert_eq!(empty_hb.status, 400);
    assert!(s(&empty_hb.json()["message"]).contains("lease_ids is empty"));
    let gone = post_json(
        server.http,
        "/v1/heartbeat",
        r#"{"leaseIds": ["777"]}"#,
        &[],
    )
    .await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["status"], "NOT_FOUND");
    let no_target = post_json(server.http, "/v1/deregister", "{}", &[]).await;
    assert_eq!(no_target.status, 400);

    // Deregister one instance, then the lease with the rest.
    let d = post_json(
        server.http,
        "/v1/deregister",
        r#"{"instance": {"service": "prod-admin", "id": "prod-1"}}"#,
        &[],
    )
    .await;
    assert_eq!(d.status, 200);
    assert_eq!(d.json()["removed"], 1);
    let d = post_json(
        server.http,
        "/v1/deregister",
        &format!(r#"{{"leaseId": "{lease}"}}"#),
        &[],
    )
    .await;
    assert_eq!(d.status, 200);
    assert_eq!(d.json()["removed"], 1);
    let again = post_json(
        server.http,
        "/v1/deregister",
        &format!(r#"{{"leaseId": "{lease}"}}"#),
        &[],
    )
    .await;
    assert_eq!(again.status, 404);
    assert_eq!(
        get(server.http, "/v1/services/prod").await.json()["instances"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let nowhere = get(server.http, "/v2/nothing").await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["status"], "NOT_FOUND");
    server.stop().await;
}

const PROD: &str = "prod-secret";
const OTHER: &str = "other-prod-secret";
const READER: &str = "payments-reader-secret";

fn auth_file() -> PathBuf {
    let roles = r#"
[roles.prod]
register = ["prod"]
read = ["prod"]

[roles.payments-reader]
read = ["payments.*"]
"#;
    api::auth_file(
        roles,
        &[
            ("prod-deployer", PROD, &["prod"]),
            ("prod-other", OTHER, &["prod"]),
            ("payments-reader", READER, &["payments-reader"]),
        ],
    )
}

#[tokio::test]
async fn auth_uses_the_same_tokens_roles_and_ownership() {
    let path = auth_file();
    let server = HttpServer::start_with(Config {
        auth_file: Some(path.clone()),
        ..common::TestServer::no_warmup_config()
    })
    .await;
    let bearer = |t: &str| format!("Bearer {t}");
    let (prod, other, reader) = (bearer(PROD), bearer(OTHER), bearer(READER));

    let none = get(server.http, "/v1/services").await;
    assert_eq!(none.status, 401);
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"registry\"")
    );
    assert_eq!(none.json()["status"], "UNAUTHENTICATED");
    let wrong = request(
        server.http,
        "GET",
        "/v1/status",
        &[("authorization", "Bearer nope")],
        None,
    )
    .await;
    assert_eq!(wrong.status, 401);

    let body = r#"{"instance": {"service": "prod", "id": "prod-1", "address": "10.0.0.1:8002"}, "ttlMs": "10000"}"#;
    let a = post_json(
        server.http,
        "/v1/register",
        body,
        &[("authorization", &prod)],
    )
    .await;
    assert_eq!(a.status, 200);
    let lease = s(&a.json()["leaseId"]).to_string();

    // Not its service: 403 with the gRPC message naming the grants.
    let web = r#"{"instance": {"service": "web", "id": "w", "address": "10.0.0.1:80"}, "ttlMs": "10000"}"#;
    let denied = post_json(
        server.http,
        "/v1/register",
        web,
        &[("authorization", &prod)],
    )
    .await;
    assert_eq!(denied.status, 403);
    assert!(
        s(&denied.json()["message"]).contains("\"prod-deployer\" may not register service \"web\"")
    );

    // Another identity may not renew, revoke or replace what is not its own.
    let hb = post_json(
        server.http,
        "/v1/heartbeat",
        &format!(r#"{{"leaseIds": ["{lease}"]}}"#),
        &[("authorization", &other)],
    )
    .await;
    assert_eq!(hb.status, 403);
    let rv = post_json(
        server.http,
        "/v1/deregister",
        &format!(r#"{{"leaseId": "{lease}"}}"#),
        &[("authorization", &other)],
    )
    .await;
    assert_eq!(rv.status, 403);
    let rp = post_json(
        server.http,
        "/v1/register",
        body,
        &[("authorization", &other)],
    )
    .await;
    assert_eq!(rp.status, 403);
    // The gRPC API agrees.
    let mut grpc = server.client().await;
    let mut req = tonic::Request::new(deregister_instance("prod", "prod-1"));
    req.metadata_mut()
        .insert("authorization", other.parse().unwrap());
    assert_eq!(
        grpc.deregister(req).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    // Reads: read grants apply, lists are filtered.
    let r = request(
        server.http,
        "GET",
        "/v1/services/prod",
        &[("authorization", &reader)],
        None,
    )
    .await;
    assert_eq!(r.status, 403);
    let l = request(
        server.http,
        "GET",
        "/v1/services",
        &[("authorization", &reader)],
        None,
    )
    .await;
    assert_eq!(l.status, 200);
    assert_eq!(l.json()["services"].as_array().unwrap().len(), 0);
    let l = request(
        server.http,
        "GET",
        "/v1/services",
        &[("authorization", &prod)],
        None,
    )
    .await;
    assert_eq!(l.json()["services"].as_array().unwrap().len(), 1);

    // Open without a token: the dashboard page and the probes.
    assert_eq!(get(server.http, "/").await.status, 200);
    assert_eq!(get(server.http, "/healthz").await.status, 200);
    assert_eq!(get(server.http, "/metrics").await.status, 401);

    let own = post_json(
        server.http,
        "/v1/deregister",
        &format!(r#"{{"leaseId": "{lease}"}}"#),
        &[("authorization", &prod)],
    )
    .await;
    assert_eq!(own.status, 200);
    server.stop().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn loopback_listener_answers_only_loopback_host_names() {
    let server = HttpServer::start().await;
    let evil = request(
        server.http,
        "GET",
        "/v1/services",
        &[("host", "evil.example:7412")],
        None,
    )
    .await;
    assert_eq!(evil.status, 403, "{}", String::from_utf8_lossy(&evil.body));
    assert!(s(&evil.json()["message"]).contains("DNS rebinding"));
    let ok = request(
        server.http,
        "GET",
        "/v1/services",
        &[("host", "localhost:7412")],
        None,
    )
    .await;
    assert_eq!(ok.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = HttpServer::start_with(Config {
        max_connections: 2,
        ..common::TestServer::no_warmup_config()
    })
    .await;
    // Two watch streams hold the two connections.
    let mut a = common::http::Sse::open(server.http, "/v1/watch", &[]).await;
    let mut b = common::http::Sse::open(server.http, "/v1/watch", &[]).await;
    a.next_change(Duration::from_secs(5)).await.unwrap();
    b.next_change(Duration::from_secs(5)).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(server.http).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed at once, not left hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a third connection was served: {read:?}"
    );
    // A freed slot serves again.
    drop(a);
    common::wait_until(Duration::from_secs(5), "a slot to free", || async {
        let s = tokio::net::TcpStream::connect(server.http).await;
        let Ok(mut s) = s else { return false };
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        out.starts_with(b"HTTP/1.1 200")
    })
    .await;
    drop(b);
    server.stop().await;
}
