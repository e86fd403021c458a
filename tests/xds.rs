//! xDS end to end, from the client side of the ADS stream: envoy-types'
//! generated client against a real registry, checking what gRPC's
//! proxyless `xds:///` flow and Envoy rely on: subscribe, receive, ACK,
//! NACK, unknown and removed resources, pushes on change, many subscribers,
//! a client that stops reading, and warm-up.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    api::{self, Client, InstanceExt, deregister_instance, instance},
};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType},
            },
            core::v3::{Node, address, socket_address::PortSpecifier},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint::HostIdentifier},
            listener::v3::Listener,
            route::v3::{RouteConfiguration, route::Action, route_action::ClusterSpecifier},
        },
        extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_connection_manager::RouteSpecifier,
        },
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use prost::Message;
use registry::Config;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// How long a test waits for a response it expects.
const EXPECT: Duration = Duration::from_secs(3);
/// How long a test listens to conclude that nothing is coming.
const SILENCE: Duration = Duration::from_millis(300);

/// One ADS stream, driven by hand.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    /// Last response per type URL, for ACKs.
    last: HashMap<String, DiscoveryResponse>,
}

impl Ads {
    async fn open(url: &str, node: &str) -> Self {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        Self::open_on(channel, node).await
    }

    async fn open_on(channel: Channel, node: &str) -> Self {
        let (tx, rx) = mpsc::channel(16);
        // The node goes in the first request, as clients do.
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: node.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open ADS stream")
            .into_inner();
        Self {
            tx,
            rx,
            last: HashMap::new(),
        }
    }

    /// Subscribes (or changes the subscription) to `names` of a type,
    /// ACKing the last response of that type if there was one.
    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        let (version, nonce) = self
            .last
            .get(type_url)
            .map(|r| (r.version_info.clone(), r.nonce.clone()))
            .unwrap_or_default();
        self.send(DiscoveryRequest {
            version_info: version,
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: type_url.to_owned(),
            response_nonce: nonce,
            ..Default::default()
        })
        .await;
    }

    /// ACKs a response, keeping the names.
    async fn ack(&self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: response.version_info.clone(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// NACKs a response: the version stays the last accepted one.
    async fn nack(&self, response: &DiscoveryResponse, accepted: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: accepted.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "test rejects this on purpose".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.expect("ADS request stream open");
    }

    /// The next response, failing after [`EXPECT`].
    async fn recv(&mut self) -> DiscoveryResponse {
        let resp = tokio::time::timeout(EXPECT, self.rx.message())
            .await
            .expect("no xDS response in time")
            .expect("ADS stream failed")
            .expect("ADS stream ended");
        self.last.insert(resp.type_url.clone(), resp.clone());
        resp
    }

    /// The next response, which must be of `type_url`.
    async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        let resp = self.recv().await;
        assert_eq!(resp.type_url, type_url, "{resp:?}");
        resp
    }

    /// Asserts nothing arrives for [`SILENCE`].
    async fn expect_silence(&mut self) {
        if let Ok(got) = tokio::time::timeout(SILENCE, self.rx.message()).await {
            panic!("expected no response, got {got:?}");
        }
    }
}

fn decode_all<T: Message + Default>(resp: &DiscoveryResponse) -> Vec<T> {
    resp.resources
        .iter()
        .map(|a| T::decode(a.value.as_slice()).expect("decode resource"))
        .collect()
}

/// (zone, locality weight, sorted "ip:port/weight") of an assignment.
fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, u32, Vec<String>)> {
    cla.endpoints
        .iter()
        .map(|l| {
            let mut eps: Vec<String> = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                        panic!("endpoint without address: {e:?}");
                    };
                    let Some(address::Address::SocketAddress(sa)) =
                        &ep.address.as_ref().unwrap().address
                    else {
                        panic!("not a socket address");
                    };
                    let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                        panic!("no port");
                    };
                    let w = e.load_balancing_weight.map_or(0, |w| w.value);
                    format!("{}:{port}/{w}", sa.address)
                })
                .collect();
            eps.sort();
            (
                l.locality.clone().unwrap_or_default().zone,
                l.load_balancing_weight.map_or(0, |w| w.value),
                eps,
            )
        })
        .collect()
}

/// Registers an instance on a fresh 30 s lease; returns (lease, revision).
/// What xDS turns into an endpoint: address, weight, zone (locality).
async fn register(
    client: &mut Client,
    service: &str,
    id: &str,
    address: &str,
    weight: u32,
    zone: Option<&str>,
) -> (u64, u64) {
    let mut instance = instance(service, id).at(address).weight(weight);
    if let Some(zone) = zone {
        instance = instance.meta("zone", zone);
    }
    let resp = api::register(client, instance, 30_000, 0).await;
    (resp.lease_id, resp.revision)
}

/// Deregisters one instance; the revision.
async fn deregister(client: &mut Client, service: &str, id: &str) -> u64 {
    let request = deregister_instance(service, id);
    api::deregister(client, request).await.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_flow_listener_route_cluster_assignment() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 3, Some("z1")).await;
    register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, Some("z2")).await;
    let (_, revision) = register(&mut reg, "prod", "c", "127.0.0.1:7003", 2, Some("z1")).await;
    let mut ads = Ads::open(&server.url, "flow").await;

    // LDS: an API listener whose HttpConnectionManager takes RDS over ADS.
    ads.subscribe(LDS, &["prod"]).await;
    let lds = ads.recv_type(LDS).await;
    assert_eq!(lds.version_info, revision.to_string());
    assert!(!lds.nonce.is_empty());
    let listeners: Vec<Listener> = decode_all(&lds);
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].name, "prod");
    let api = listeners[0]
        .api_listener
        .clone()
        .unwrap()
        .api_listener
        .unwrap();
    let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
    let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
        panic!("listener does not use RDS: {hcm:?}");
    };
    assert_eq!(rds.route_config_name, "prod");
    assert_eq!(
        hcm.http_filters.last().map(|f| f.name.as_str()),
        Some("envoy.filters.http.router")
    );

    // RDS (ACKing LDS in the same breath, as gRPC does).
    ads.ack(&lds, &["prod"]).await;
    ads.subscribe(RDS, &["prod"]).await;
    let rds_resp = ads.recv_type(RDS).await;
    let routes: Vec<RouteConfiguration> = decode_all(&rds_resp);
    assert_eq!(routes.len(), 1);
    let vhost = &routes[0].virtual_hosts[0];
    assert!(vhost.domains.iter().any(|d| d == "prod"), "{vhost:?}");
    let Some(Action::Route(action)) = &vhost.routes[0].action else {
        panic!("not a route action");
    };
    assert_eq!(
        action.cluster_specifier,
        Some(ClusterSpecifier::Cluster("prod".into()))
    );

    // CDS: EDS cluster.
    ads.subscribe(CDS, &["prod"]).await;
    let cds = ads.recv_type(CDS).await;
    let clusters: Vec<Cluster> = decode_all(&cds);
    assert_eq!(clusters.len(), 1);
    assert_eq!(
        clusters[0].cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
    );

    // EDS: live instances, zone -> locality, weight -> lb weight.
    ads.subscribe(EDS, &["prod"]).await;
    let eds = ads.recv_type(EDS).await;
    let cla: Vec<ClusterLoadAssignment> = decode_all(&eds);
    assert_eq!(cla.len(), 1);
    assert_eq!(cla[0].cluster_name, "prod");
    assert_eq!(
        endpoints(&cla[0]),
        vec![
            (
                "z1".to_owned(),
                5,
                vec!["127.0.0.1:7001/3".to_owned(), "127.0.0.1:7003/2".to_owned()]
            ),
            ("z2".to_owned(), 1, vec!["127.0.0.1:7002/1".to_owned()]),
        ]
    );

    // ACKs of everything: nothing more is sent while nothing changes.
    for resp in [&rds_resp, &cds, &eds] {
        ads.ack(resp, &["prod"]).await;
    }
    ads.expect_silence().await;
    let nonces: std::collections::HashSet<_> = [&lds, &rds_resp, &cds, &eds]
        .iter()
        .map(|r| r.nonce.clone())
        .collect();
    assert_eq!(nonces.len(), 4, "every response has its own nonce");
    server.stop().await;
}

/// The cluster tells gRPC clients in other languages and Envoy to treat a
/// dead instance the way registry-client's balanced channels do: eject
/// after the same number of failures, for the same times, at most the same
/// share, and weigh zones by their instances' weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_carries_the_clients_outlier_and_locality_rules() {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier;
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, Some("z1")).await;
    let mut ads = Ads::open(&server.url, "outlier").await;
    ads.subscribe(CDS, &["prod"]).await;
    let cds = ads.recv_type(CDS).await;
    let clusters: Vec<Cluster> = decode_all(&cds);
    let cluster = &clusters[0];

    let client = registry_client::OutlierDetection::default();
    let od = cluster
        .outlier_detection
        .as_ref()
        .expect("outlier detection");
    let value = |v: Option<envoy_types::pb::google::protobuf::UInt32Value>| v.map(|v| v.value);
    let secs = |d: Option<envoy_types::pb::google::protobuf::Duration>| {
        d.map(|d| Duration::new(d.seconds as u64, d.nanos as u32))
    };
    // Envoy: N consecutive failures (5xx, or gateway: refused connections
    // and gRPC UNAVAILABLE), enforced.
    assert_eq!(value(od.consecutive_5xx), Some(client.consecutive_failures));
    assert_eq!(
        value(od.consecutive_gateway_failure),
        Some(client.consecutive_failures)
    );
    assert_eq!(value(od.enforcing_consecutive_5xx), Some(100));
    assert_eq!(value(od.enforcing_consecutive_gateway_failure), Some(100));
    assert_eq!(secs(od.base_ejection_time), Some(client.base_ejection));
    assert_eq!(secs(od.max_ejection_time), Some(client.max_ejection));
    assert_eq!(
        value(od.max_ejection_percent),
        Some((client.max_ejected_share * 100.0).round() as u32)
    );
    // gRPC (gRFC A50): failure-percentage ejection over as many calls, and
    // no success-rate statistics (enforcing 0 = off).
    assert_eq!(value(od.enforcing_failure_percentage), Some(100));
    assert_eq!(
        value(od.failure_percentage_request_volume),
        Some(client.consecutive_failures)
    );
    assert_eq!(value(od.enforcing_success_rate), Some(0));

    let lb = cluster.common_lb_config.as_ref().expect("common lb config");
    assert!(matches!(
        lb.locality_config_specifier,
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    ));
    assert_eq!(lb.healthy_panic_threshold.map(|p| p.value), Some(50.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_pushes_a_new_assignment_at_the_new_revision() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    let mut ads = Ads::open(&server.url, "push").await;
    ads.subscribe(EDS, &["prod"]).await;
    let first = ads.recv_type(EDS).await;
    ads.ack(&first, &["prod"]).await;

    let started = tokio::time::Instant::now();
    let (_, revision) = register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, None).await;
    let pushed = ads.recv_type(EDS).await;
    let latency = started.elapsed();
    assert_eq!(pushed.version_info, revision.to_string());
    assert_ne!(pushed.nonce, first.nonce);
    let cla: Vec<ClusterLoadAssignment> = decode_all(&pushed);
    assert_eq!(endpoints(&cla[0])[0].2.len(), 2, "{cla:?}");
    assert!(latency < Duration::from_secs(1), "push took {latency:?}");

    // A change to another service is not pushed to this subscriber.
    register(&mut reg, "other", "x", "127.0.0.1:7009", 1, None).await;
    ads.ack(&pushed, &["prod"]).await;
    ads.expect_silence().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_survived_and_the_next_change_still_arrives() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    let mut ads = Ads::open(&server.url, "nack").await;
    ads.subscribe(EDS, &["prod"]).await;
    let good = ads.recv_type(EDS).await;
    ads.ack(&good, &["prod"]).await;

    register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, None).await;
    let rejected = ads.recv_type(EDS).await;
    ads.nack(&rejected, &good.version_info, &["prod"]).await;
    // The rejected content is not sent again; the stream stays open.
    ads.expect_silence().await;

    // A request with a stale nonce (from before `rejected`) is ignored,
    // even though it asks for something else.
    ads.send(DiscoveryRequest {
        version_info: good.version_info.clone(),
        resource_names: vec!["prod".into(), "other".into()],
        type_url: EDS.into(),
        response_nonce: good.nonce.clone(),
        ..Default::default()
    })
    .await;
    ads.expect_silence().await;

    let (_, revision) = register(&mut reg, "prod", "c", "127.0.0.1:7003", 1, None).await;
    let next = ads.recv_type(EDS).await;
    assert_eq!(next.version_info, revision.to_string());
    let cla: Vec<ClusterLoadAssignment> = decode_all(&next);
    assert_eq!(endpoints(&cla[0])[0].2.len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_answered_as_absent_without_ending_the_stream() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    let mut ads = Ads::open(&server.url, "unknown").await;

    // Listener and Cluster responses list every resource that exists: an
    // empty one says "does not exist" at once.
    ads.subscribe(LDS, &["nope"]).await;
    let lds = ads.recv_type(LDS).await;
    assert!(lds.resources.is_empty(), "{lds:?}");
    ads.subscribe(CDS, &["nope"]).await;
    let cds = ads.recv_type(CDS).await;
    assert!(cds.resources.is_empty(), "{cds:?}");
    // Route and assignment for an unknown name: nothing (the client's
    // does-not-exist timer decides), and no error either.
    ads.subscribe(EDS, &["nope"]).await;
    ads.subscribe(RDS, &["nope"]).await;
    ads.expect_silence().await;

    // The service appears: the same stream gets it.
    register(&mut reg, "nope", "a", "127.0.0.1:7001", 1, None).await;
    let mut types = Vec::new();
    for _ in 0..4 {
        let r = ads.recv().await;
        assert_eq!(r.resources.len(), 1, "{r:?}");
        types.push(r.type_url);
    }
    assert_eq!(
        types,
        [CDS, EDS, LDS, RDS],
        "clusters before assignments, listeners before routes"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_instance_leaving_removes_listener_and_cluster_and_empties_assignment() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, None).await;
    let mut ads = Ads::open(&server.url, "removal").await;
    for ty in [LDS, CDS, EDS] {
        ads.subscribe(ty, &["prod"]).await;
        let r = ads.recv_type(ty).await;
        assert_eq!(r.resources.len(), 1);
        ads.ack(&r, &["prod"]).await;
    }

    // One instance leaves: only the assignment changes.
    deregister(&mut reg, "prod", "a").await;
    let eds = ads.recv_type(EDS).await;
    let cla: Vec<ClusterLoadAssignment> = decode_all(&eds);
    assert_eq!(endpoints(&cla[0])[0].2, ["127.0.0.1:7002/1"]);
    ads.ack(&eds, &["prod"]).await;
    ads.expect_silence().await;

    // The last one leaves: Cluster and Listener responses no longer list
    // it (deleted), and the assignment is empty.
    let revision = deregister(&mut reg, "prod", "b").await;
    let mut got = HashMap::new();
    for _ in 0..3 {
        let r = ads.recv().await;
        assert_eq!(r.version_info, revision.to_string());
        got.insert(r.type_url.clone(), r);
    }
    assert!(got[CDS].resources.is_empty());
    assert!(got[LDS].resources.is_empty());
    let cla: Vec<ClusterLoadAssignment> = decode_all(&got[EDS]);
    assert_eq!(cla.len(), 1);
    assert!(cla[0].endpoints.is_empty(), "{cla:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscribers_each_get_every_push() {
    const STREAMS: usize = 60;
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    // Several streams per connection, as one gRPC process with many
    // channels multiplexes them.
    let mut streams = Vec::new();
    for conn in 0..6 {
        let channel = Channel::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        for i in 0..STREAMS / 6 {
            let mut ads = Ads::open_on(channel.clone(), &format!("sub-{conn}-{i}")).await;
            ads.subscribe(EDS, &["prod"]).await;
            let first = ads.recv_type(EDS).await;
            ads.ack(&first, &["prod"]).await;
            streams.push(ads);
        }
    }

    let (_, revision) = register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, None).await;
    let waits = streams.into_iter().map(|mut ads| {
        tokio::spawn(async move {
            let r = ads.recv_type(EDS).await;
            let cla: Vec<ClusterLoadAssignment> = decode_all(&r);
            (r.version_info, endpoints(&cla[0])[0].2.len())
        })
    });
    let results = futures::future::join_all(waits).await;
    assert_eq!(results.len(), STREAMS);
    for r in results {
        assert_eq!(r.unwrap(), (revision.to_string(), 2));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_clusters_follow_services_coming_and_going() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "alpha", "a", "127.0.0.1:7001", 1, None).await;
    let mut ads = Ads::open(&server.url, "envoy").await;
    // Envoy: CDS wildcard (no names), then EDS for each cluster.
    ads.subscribe(CDS, &[]).await;
    let cds = ads.recv_type(CDS).await;
    let names = |r: &DiscoveryResponse| {
        let mut n: Vec<String> = decode_all::<Cluster>(r)
            .into_iter()
            .map(|c| c.name)
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&cds), ["alpha"]);
    ads.ack(&cds, &[]).await;
    ads.subscribe(EDS, &["alpha"]).await;
    let eds = ads.recv_type(EDS).await;
    ads.ack(&eds, &["alpha"]).await;

    register(&mut reg, "beta", "b", "127.0.0.1:7002", 1, None).await;
    let cds = ads.recv_type(CDS).await;
    assert_eq!(names(&cds), ["alpha", "beta"]);
    ads.ack(&cds, &[]).await;
    ads.expect_silence().await;

    deregister(&mut reg, "alpha", "a").await;
    // alpha's assignment empties and alpha leaves the cluster list.
    let mut got = HashMap::new();
    for _ in 0..2 {
        let r = ads.recv().await;
        got.insert(r.type_url.clone(), r);
    }
    assert_eq!(names(&got[CDS]), ["beta"]);
    assert!(
        decode_all::<ClusterLoadAssignment>(&got[EDS])[0]
            .endpoints
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_block_registration() {
    let server = TestServer::start_with(Config {
        watch_buffer: 4,
        ..TestServer::no_warmup_config()
    })
    .await;
    let mut reg = server.client().await;
    // Big assignments, so unread responses fill the HTTP/2 windows.
    for i in 0..200 {
        register(
            &mut reg,
            "prod",
            &format!("i{i:03}"),
            &format!("127.0.0.1:{}", 10_000 + i),
            1,
            None,
        )
        .await;
    }
    let mut ads = Ads::open(&server.url, "slow").await;
    ads.subscribe(EDS, &["prod"]).await;
    let first = ads.recv_type(EDS).await;
    ads.ack(&first, &["prod"]).await;

    // The client reads nothing while 300 changes are made.
    let started = tokio::time::Instant::now();
    let mut last = 0;
    for i in 0..300 {
        let (_, revision) = register(
            &mut reg,
            "prod",
            &format!("i{:03}", i % 200),
            "127.0.0.1:9999",
            2,
            None,
        )
        .await;
        last = revision;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "registrations stalled: {took:?}"
    );

    // Reading again, the client catches up to the latest state.
    loop {
        let r = ads.recv_type(EDS).await;
        if r.version_info == last.to_string() {
            let cla: Vec<ClusterLoadAssignment> = decode_all(&r);
            let eps = &endpoints(&cla[0])[0].2;
            assert_eq!(eps.len(), 200);
            assert!(eps.iter().all(|e| e == "127.0.0.1:9999/2"));
            break;
        }
    }
    // Whether the stream's watcher overflowed (and was reset) or its
    // consumer coalesced the changes first depends on scheduling; either
    // way the writer was never held up and the client ends on the latest
    // state, which is what the assertions above check.
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_withholds_absence_until_the_window_closes() {
    let server = TestServer::start_with(Config {
        warmup: Duration::from_millis(800),
        ..TestServer::no_warmup_config()
    })
    .await;
    let opened = tokio::time::Instant::now();
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    let mut ads = Ads::open(&server.url, "warmup").await;
    // A live service is answered during warm-up...
    ads.subscribe(LDS, &["prod"]).await;
    let lds = ads.recv_type(LDS).await;
    assert_eq!(lds.resources.len(), 1);
    // ...but not an absence, which could be a service not back yet.
    ads.subscribe(LDS, &["prod", "later"]).await;
    ads.expect_silence().await;
    let absent = ads.recv_type(LDS).await;
    assert!(
        opened.elapsed() >= Duration::from_millis(700),
        "absence answered during warm-up"
    );
    assert_eq!(decode_all::<Listener>(&absent).len(), 1, "only prod exists");
    server.stop().await;
}

/// Drain (issue 17): a draining instance is pushed at once with EDS
/// `health_status` DRAINING (xDS clients stop picking it while its lease
/// stays), and set active again it is pushed back as HEALTHY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_instance_is_pushed_as_draining_and_back_as_healthy() {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    use registry_api::v1::{AdminState, InstanceKey, SetInstanceStateRequest};
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a", "127.0.0.1:7001", 1, None).await;
    register(&mut reg, "prod", "b", "127.0.0.1:7002", 1, None).await;
    let mut ads = Ads::open(&server.url, "drain").await;
    ads.subscribe(EDS, &["prod"]).await;
    let first = ads.recv_type(EDS).await;
    ads.ack(&first, &["prod"]).await;
    let statuses = |resp: &DiscoveryResponse| {
        let cla: Vec<ClusterLoadAssignment> = decode_all(resp);
        let mut s: Vec<(u32, i32)> = cla[0]
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("endpoint without address");
                };
                let Some(address::Address::SocketAddress(sa)) =
                    &ep.address.as_ref().unwrap().address
                else {
                    panic!("not a socket address");
                };
                let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    panic!("no port");
                };
                (port, e.health_status)
            })
            .collect();
        s.sort();
        s
    };
    let healthy = HealthStatus::Healthy as i32;
    assert_eq!(statuses(&first), [(7001, healthy), (7002, healthy)]);

    let set = |state: AdminState| SetInstanceStateRequest {
        instance: Some(InstanceKey {
            service: "prod".into(),
            id: "a".into(),
        }),
        state: state as i32,
        reason: "deploy".into(),
    };
    let revision = reg
        .set_instance_state(set(AdminState::Draining))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let pushed = ads.recv_type(EDS).await;
    assert_eq!(pushed.version_info, revision.to_string());
    assert_eq!(
        statuses(&pushed),
        [(7001, HealthStatus::Draining as i32), (7002, healthy)]
    );
    ads.ack(&pushed, &["prod"]).await;

    reg.set_instance_state(set(AdminState::Active))
        .await
        .unwrap();
    let back = ads.recv_type(EDS).await;
    assert_eq!(statuses(&back), [(7001, healthy), (7002, healthy)]);
    server.stop().await;
}
