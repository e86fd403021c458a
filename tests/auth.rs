//! End-to-end auth matrix: for every RPC, no token / wrong token / a token
//! without permission for that service / another identity's lease get the
//! exact status code; health stays open; ListServices and watch-all are
//! filtered to what the caller may read; rate limits per identity; and the
//! same over TLS with client certificates (mTLS).

mod common;

use std::{path::PathBuf, time::Duration};

use common::{
    TestServer,
    api::{AuthClient, Bearer, instance, register_request, with_token},
};
use registry::{Config, auth::hash_token};
use registry_api::v1::{
    DeregisterRequest, HeartbeatRequest, InstanceKey, ListServicesRequest, RegisterRequest,
    ResolveRequest, StatusRequest, WatchRequest, deregister_request::Target,
    registry_client::RegistryClient, watch_response::Kind,
};
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

const PROD: &str = "prod-secret";
const OTHER: &str = "other-prod-secret";
const READER: &str = "reader-secret";
const ADMIN: &str = "admin-secret";
const PAYMENTS: &str = "payments-secret";

fn auth_file(extra: &str) -> PathBuf {
    let text = format!(
        r#"
[roles.prod]
register = ["prod"]
read = ["prod"]

[roles.payments]
register = ["payments.*"]
read = ["payments.*"]

[roles.reader]
read = ["*"]

[roles.ops]
admin = ["*"]

[[tokens]]
name = "prod-deployer"
sha256 = "{}"
roles = ["prod"]

[[tokens]]
name = "prod-other"
sha256 = "{}"
roles = ["prod"]

[[tokens]]
name = "dashboard"
sha256 = "{}"
roles = ["reader"]

[[tokens]]
name = "oncall"
sha256 = "{}"
roles = ["ops"]

[[tokens]]
name = "payments-team"
sha256 = "{}"
roles = ["payments"]
{extra}
"#,
        hash_token(PROD),
        hash_token(OTHER),
        hash_token(READER),
        hash_token(ADMIN),
        hash_token(PAYMENTS),
    );
    let path = std::env::temp_dir().join(format!(
        "registry-auth-test-{}-{}.toml",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn auth_server() -> TestServer {
    TestServer::start_with(Config {
        auth_file: Some(auth_file("")),
        ..TestServer::test_config()
    })
    .await
}

async fn client(url: &str, token: Option<&str>) -> AuthClient {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    with_token(channel, token)
}

/// On a new 10 s lease, or on `lease_id`.
fn register_req(service: &str, id: &str, lease_id: u64) -> RegisterRequest {
    let ttl_ms = if lease_id == 0 { 10_000 } else { 0 };
    register_request(instance(service, id), ttl_ms, lease_id)
}

/// Every RPC with the given client, returning each call's status code.
async fn every_rpc(c: &mut AuthClient, service: &str, lease: u64) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut out = Vec::new();
    out.push((
        "Register",
        code(c.register(register_req(service, "x", 0)).await.map(drop)),
    ));
    out.push((
        "Heartbeat",
        code(
            c.heartbeat(HeartbeatRequest {
                lease_ids: vec![lease],
            })
            .await
            .map(drop),
        ),
    ));
    let ka = async {
        let mut s = c
            .keep_alive(tokio_stream::iter([HeartbeatRequest {
                lease_ids: vec![lease],
            }]))
            .await?
            .into_inner();
        s.message().await?;
        Ok(())
    };
    out.push(("KeepAlive", code(ka.await)));
    out.push((
        "Deregister(lease)",
        code(
            c.deregister(DeregisterRequest {
                target: Some(Target::LeaseId(lease)),
            })
            .await
            .map(drop),
        ),
    ));
    out.push((
        "Deregister(instance)",
        code(
            c.deregister(DeregisterRequest {
                target: Some(Target::Instance(InstanceKey {
                    service: service.into(),
                    id: "owned".into(),
                })),
            })
            .await
            .map(drop),
        ),
    ));
    out.push((
        "Resolve",
        code(
            c.resolve(ResolveRequest {
                service: service.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
    ));
    out.push((
        "ListServices",
        code(c.list_services(ListServicesRequest {}).await.map(drop)),
    ));
    let w = async {
        let mut s = c
            .watch(WatchRequest {
                service: service.into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        s.message().await?;
        Ok(())
    };
    out.push(("Watch", code(w.await)));
    out.push(("Status", code(c.status(StatusRequest {}).await.map(drop))));
    out
}

#[tokio::test]
async fn no_token_and_wrong_token_are_unauthenticated_on_every_rpc() {
    let server = auth_server().await;
    let mut owner = client(&server.url, Some(PROD)).await;
    let lease = owner
        .register(register_req("prod", "owned", 0))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    for token in [None, Some("wrong"), Some("")] {
        let mut c = client(&server.url, token).await;
        for (rpc, code) in every_rpc(&mut c, "prod", lease).await {
            assert_eq!(code, Code::Unauthenticated, "{rpc} with token {token:?}");
        }
    }
    // A malformed header is no way around it either.
    let channel = Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut basic = RegistryClient::new(InterceptedService::new(
        channel,
        Bearer(Some("Basic cHJvZC1zZWNyZXQ=".parse().unwrap())),
    ));
    let err = basic.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Nothing was changed by any of it.
    let res = owner
        .resolve(ResolveRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.instances.len(), 1);
}

#[tokio::test]
async fn health_is_open_and_reflection_is_not() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let server = auth_server().await;
    let channel = Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let resp = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no credentials")
        .into_inner();
    assert_eq!(resp.status, 1);
    let req = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let err = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([req()]))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(err, Some(Code::Unauthenticated));
    let mut with_token =
        ServerReflectionClient::new(InterceptedService::new(channel, Bearer::new(Some(READER))));
    let mut stream = with_token
        .server_reflection_info(tokio_stream::iter([req()]))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}

#[tokio::test]
async fn tokens_without_permission_for_the_service_are_denied() {
    let server = auth_server().await;
    let mut admin = client(&server.url, Some(ADMIN)).await;
    let lease = admin
        .register(register_req("payments.eu", "owned", 0))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    let mut prod = client(&server.url, Some(PROD)).await;
    let got = every_rpc(&mut prod, "payments.eu", lease).await;
    let expected = [
        ("Register", Code::PermissionDenied),
        ("Heartbeat", Code::PermissionDenied), // admin's lease, not ours
        ("KeepAlive", Code::PermissionDenied),
        ("Deregister(lease)", Code::PermissionDenied),
        ("Deregister(instance)", Code::PermissionDenied),
        ("Resolve", Code::PermissionDenied),
        ("ListServices", Code::Ok), // filtered, see below
        ("Watch", Code::PermissionDenied),
        ("Status", Code::Ok),
    ];
    assert_eq!(got, expected);
    let err = prod
        .register(register_req("payments.eu", "x", 0))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("\"prod-deployer\"") && err.message().contains("payments.eu"),
        "{}",
        err.message()
    );

    // A reader may read anything but register nothing.
    let mut reader = client(&server.url, Some(READER)).await;
    let got = every_rpc(&mut reader, "payments.eu", lease).await;
    let codes: Vec<Code> = got.iter().map(|(_, c)| *c).collect();
    assert_eq!(
        codes,
        [
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::Ok,
            Code::Ok,
            Code::Ok,
            Code::Ok
        ],
        "{got:?}"
    );
    // The prefix pattern: payments.* covers payments.eu, not payments.
    let mut pay = client(&server.url, Some(PAYMENTS)).await;
    pay.register(register_req("payments.us", "p1", 0))
        .await
        .unwrap();
    let err = pay
        .register(register_req("payments", "p1", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn leases_belong_to_the_identity_that_created_them() {
    let server = auth_server().await;
    let mut a = client(&server.url, Some(PROD)).await;
    let mut b = client(&server.url, Some(OTHER)).await; // same role, other identity
    let lease = a
        .register(register_req("prod", "a1", 0))
        .await
        .unwrap()
        .into_inner()
        .lease_id;

    let denied = |r: Result<(), Status>, what: &str| {
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied, "{what}");
    };
    denied(
        b.heartbeat(HeartbeatRequest {
            lease_ids: vec![lease],
        })
        .await
        .map(drop),
        "renew another identity's lease",
    );
    let mut ka = b
        .keep_alive(tokio_stream::iter([HeartbeatRequest {
            lease_ids: vec![lease],
        }]))
        .await
        .unwrap()
        .into_inner();
    denied(
        ka.message().await.map(drop),
        "keepalive another identity's lease",
    );
    denied(
        b.deregister(DeregisterRequest {
            target: Some(Target::LeaseId(lease)),
        })
        .await
        .map(drop),
        "revoke another identity's lease",
    );
    denied(
        b.register(register_req("prod", "b1", lease))
            .await
            .map(drop),
        "attach to another identity's lease",
    );
    denied(
        b.register(register_req("prod", "a1", 0)).await.map(drop),
        "replace another identity's instance",
    );
    denied(
        b.deregister(DeregisterRequest {
            target: Some(Target::Instance(InstanceKey {
                service: "prod".into(),
                id: "a1".into(),
            })),
        })
        .await
        .map(drop),
        "remove another identity's instance",
    );

    // The owner can do all of that; an admin can revoke anything.
    a.heartbeat(HeartbeatRequest {
        lease_ids: vec![lease],
    })
    .await
    .unwrap();
    a.register(register_req("prod", "a2", lease)).await.unwrap();
    a.register(register_req("prod", "a1", 0)).await.unwrap(); // moves a1 to a new lease of a's
    let mut admin = client(&server.url, Some(ADMIN)).await;
    let out = admin
        .deregister(DeregisterRequest {
            target: Some(Target::LeaseId(lease)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.removed, 1, "a2 was on it");
}

#[tokio::test]
async fn list_and_watch_all_are_filtered_to_readable_services() {
    let server = auth_server().await;
    let mut admin = client(&server.url, Some(ADMIN)).await;
    for s in ["prod", "payments.eu", "secret"] {
        admin.register(register_req(s, "1", 0)).await.unwrap();
    }
    let mut prod = client(&server.url, Some(PROD)).await;
    let names: Vec<String> = prod
        .list_services(ListServicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["prod"]);

    let mut w = prod
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let Some(Kind::Snapshot(snap)) = w.message().await.unwrap().unwrap().kind else {
        panic!("snapshot first");
    };
    let services: Vec<_> = snap.instances.iter().map(|i| i.service.as_str()).collect();
    assert_eq!(services, ["prod"]);
    admin
        .register(register_req("secret", "2", 0))
        .await
        .unwrap();
    admin.register(register_req("prod", "2", 0)).await.unwrap();
    let Some(Kind::Events(ev)) = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .kind
    else {
        panic!("events");
    };
    let seen: Vec<_> = ev
        .events
        .iter()
        .map(|e| e.instance.as_ref().unwrap().service.as_str())
        .collect();
    assert_eq!(
        seen,
        ["prod"],
        "the secret change never reaches this watcher"
    );
}

#[tokio::test]
async fn rate_limit_applies_per_identity() {
    let server = TestServer::start_with(Config {
        auth_file: Some(auth_file("")),
        rate_limit: 5,
        rate_burst: 5,
        ..TestServer::test_config()
    })
    .await;
    let mut a = client(&server.url, Some(PROD)).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(
            a.status(StatusRequest {})
                .await
                .err()
                .map_or(Code::Ok, |s| s.code()),
        );
    }
    assert_eq!(&codes[..5], &[Code::Ok; 5]);
    assert!(codes[5..].contains(&Code::ResourceExhausted), "{codes:?}");
    let err = a.status(StatusRequest {}).await.unwrap_err();
    assert!(err.message().contains("rate_limit"), "{}", err.message());
    // Another identity has its own bucket.
    let mut b = client(&server.url, Some(READER)).await;
    b.status(StatusRequest {}).await.unwrap();
}

// ---- TLS and mTLS ----

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "registry test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, sans: Vec<String>, issuer: &rcgen::Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        "localhost",
        vec!["localhost".into(), "127.0.0.1".into()],
        &issuer,
    );
    let (client_cert, client_key) = leaf("prod-1.internal", vec![], &issuer);

    // Same name, but signed by a CA the server does not trust.
    let rogue_ca_key = KeyPair::generate().unwrap();
    let mut rogue_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let rogue_issuer = rcgen::Issuer::new(rogue_params, rogue_ca_key);
    let (rogue_cert, rogue_key) = leaf("prod-1.internal", vec![], &rogue_issuer);

    Pki {
        ca_pem: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}

fn write_tmp(name: &str, content: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "registry-tls-{}-{}-{name}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::write(&path, content).unwrap();
    path
}

async fn tls_server(pki: &Pki, mtls: bool, auth: bool) -> TestServer {
    let extra = "\n[[certs]]\ncommon_name = \"prod-1.internal\"\nroles = [\"prod\"]\n";
    TestServer::start_with(Config {
        tls: Some(registry::config::TlsFiles {
            cert: write_tmp("server.pem", &pki.server_cert),
            key: write_tmp("server.key", &pki.server_key),
        }),
        tls_client_ca: mtls.then(|| write_tmp("ca.pem", &pki.ca_pem)),
        auth_file: auth.then(|| auth_file(extra)),
        ..TestServer::test_config()
    })
    .await
}

async fn tls_client(
    server: &TestServer,
    ca: &str,
    identity: Option<(&str, &str)>,
    token: Option<&str>,
) -> Result<AuthClient, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await?;
    Ok(with_token(channel, token))
}

#[tokio::test]
async fn tls_serves_encrypted_and_refuses_plaintext() {
    let pki = pki();
    let server = tls_server(&pki, false, false).await;
    let mut c = tls_client(&server, &pki.ca_pem, None, None).await.unwrap();
    c.register(register_req("prod", "1", 0)).await.unwrap();
    // A plaintext client gets nowhere.
    let plain = Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let err = RegistryClient::new(channel)
            .status(StatusRequest {})
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            ),
            "{err:?}"
        );
    }
    // Nor does a client that does not trust the server's CA.
    let other = pki_other_ca();
    let res = tls_client(&server, &other, None, None).await;
    match res {
        Err(_) => {}
        Ok(mut c) => assert_eq!(
            c.status(StatusRequest {}).await.unwrap_err().code(),
            Code::Unavailable
        ),
    }
}

fn pki_other_ca() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn mtls_requires_a_trusted_client_certificate() {
    let pki = pki();
    let server = tls_server(&pki, true, true).await;

    // No certificate, or one from an untrusted CA: the handshake fails.
    for identity in [
        None,
        Some((pki.rogue_cert.as_str(), pki.rogue_key.as_str())),
    ] {
        let untrusted = identity.is_some();
        match tls_client(&server, &pki.ca_pem, identity, Some(ADMIN)).await {
            Err(_) => {}
            Ok(mut c) => {
                // With TLS 1.3 the client finishes its side of the handshake
                // before the server checks the certificate, so the refusal
                // arrives as the connection closing under the first call.
                let err = c.status(StatusRequest {}).await.unwrap_err();
                assert!(
                    matches!(
                        err.code(),
                        Code::Unavailable | Code::Cancelled | Code::Unknown
                    ),
                    "untrusted={untrusted}: {err:?}"
                );
            }
        }
    }

    // A trusted certificate whose name maps to the prod role: it is the
    // identity, no token needed, and the role's limits apply.
    let mut c = tls_client(
        &server,
        &pki.ca_pem,
        Some((&pki.client_cert, &pki.client_key)),
        None,
    )
    .await
    .unwrap();
    c.register(register_req("prod", "cert-1", 0)).await.unwrap();
    let err = c
        .register(register_req("web", "cert-1", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("prod-1.internal"),
        "{}",
        err.message()
    );

    // A token on top of a certificate names the identity.
    let mut both = tls_client(
        &server,
        &pki.ca_pem,
        Some((&pki.client_cert, &pki.client_key)),
        Some(ADMIN),
    )
    .await
    .unwrap();
    both.register(register_req("web", "x", 0)).await.unwrap();
}

#[tokio::test]
async fn client_lib_authenticates_with_token_and_tls() {
    use registry_client::{Instance as ClientInstance, RegistryClient as Rc};
    let pki = pki();
    let server = tls_server(&pki, true, true).await;
    let ca = write_tmp("ca.pem", &pki.ca_pem);
    let cert = write_tmp("client.pem", &pki.client_cert);
    let key = write_tmp("client.key", &pki.client_key);
    let tls = registry_client::tls_from_files(
        ca.to_str().unwrap(),
        Some(cert.to_str().unwrap()),
        Some(key.to_str().unwrap()),
        Some("localhost"),
    )
    .unwrap();
    // Certificate identity (prod role) plus an admin token: the token wins.
    let client = Rc::builder()
        .address(server.addr.to_string())
        .tls(tls.clone())
        .token(ADMIN)
        .connect()
        .await
        .unwrap();
    let reg = client
        .register(ClientInstance::new("web", "10.0.0.9:80").with_id("w1"))
        .ttl(Duration::from_secs(5))
        .await
        .expect("admin token may register web");
    let resolved = client.resolve("web").await.unwrap();
    assert_eq!(resolved.instances.len(), 1);
    reg.deregister().await.unwrap();

    // The certificate alone: the prod role, which may not register web.
    let cert_only = Rc::builder()
        .address(server.addr.to_string())
        .tls(tls)
        .connect()
        .await
        .unwrap();
    let err = cert_only
        .register(ClientInstance::new("web", "10.0.0.9:80"))
        .await
        .unwrap_err();
    assert_eq!(
        err.status().map(|s| s.code()),
        Some(Code::PermissionDenied),
        "{err}"
    );
    let ok = cert_only
        .register(ClientInstance::new("prod", "10.0.0.9:80"))
        .ttl(Duration::from_secs(5))
        .await
        .expect("prod role may register prod");
    drop(ok);
}

#[tokio::test]
async fn client_lib_without_token_is_rejected() {
    use registry_client::{Instance as ClientInstance, RegistryClient as Rc};
    let server = auth_server().await;
    let anon = Rc::connect(&server.url).await.unwrap();
    let err = anon
        .register(ClientInstance::new("prod", "10.0.0.9:80"))
        .await
        .unwrap_err();
    assert_eq!(
        err.status().map(|s| s.code()),
        Some(Code::Unauthenticated),
        "{err}"
    );
    let with = Rc::builder()
        .address(&server.url)
        .token(PROD)
        .connect()
        .await
        .unwrap();
    let reg = with
        .register(ClientInstance::new("prod", "10.0.0.9:80"))
        .ttl(Duration::from_secs(5))
        .await
        .unwrap();
    // Its keepalive renews under the same identity, and its resolver reads.
    let resolver = with.resolver("prod");
    let state = tokio::time::timeout(Duration::from_secs(5), resolver.ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.instances.len(), 1);
    reg.deregister().await.unwrap();
}

#[tokio::test]
async fn xds_subscriptions_need_credentials_and_see_only_readable_services() {
    use envoy_types::pb::envoy::{
        config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment},
        service::discovery::v3::{
            DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    };
    use prost::Message;
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    let server = auth_server().await;
    let mut admin = client(&server.url, Some(ADMIN)).await;
    admin.register(register_req("prod", "p1", 0)).await.unwrap();
    admin
        .register(register_req("payments.eu", "e1", 0))
        .await
        .unwrap();

    let channel = Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = |names: &[&str]| DiscoveryRequest {
        node: Some(Node {
            id: "test".into(),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };

    // No token: the stream is refused like any other RPC.
    let mut anon = AggregatedDiscoveryServiceClient::new(channel.clone());
    let res = anon
        .stream_aggregated_resources(tokio_stream::iter([request(&["prod"])]))
        .await;
    let code = match res {
        Err(s) => s.code(),
        Ok(r) => r.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, Code::Unauthenticated);

    // The prod token sees prod's endpoints and nothing of payments.eu.
    let mut ads = AggregatedDiscoveryServiceClient::new(InterceptedService::new(
        channel,
        Bearer::new(Some(PROD)),
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(&["prod", "payments.eu"])).await.unwrap();
    let mut stream = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<String> = resp
        .resources
        .iter()
        .map(|any| {
            ClusterLoadAssignment::decode(any.value.as_slice())
                .unwrap()
                .cluster_name
        })
        .collect();
    assert_eq!(names, ["prod"], "payments.eu is answered as absent");
    drop(tx);
}
