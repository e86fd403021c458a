//! Incremental (delta) xDS end to end: `DeltaAggregatedResources`, as Envoy
//! speaks it with `api_type: DELTA_GRPC`, from envoy-types' generated client
//! against a real registry. Only what changed is pushed, each resource with
//! its own version; what goes away, or never existed, is named in
//! `removed_resources`; a reconnecting client that says what it has is not
//! sent it again.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    TestServer,
    api::{self, Client, InstanceExt, deregister_instance, instance},
};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
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
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

const EXPECT: Duration = Duration::from_secs(3);
const SILENCE: Duration = Duration::from_millis(300);

/// One delta ADS stream, driven by hand.
struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(url: &str) -> Self {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(16);
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("open delta ADS stream")
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.expect("request stream open");
    }

    /// Subscribes to `subscribe` and unsubscribes from `unsubscribe`.
    async fn subscribe(&self, type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "delta-test".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).into()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "test rejects this on purpose".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    /// The next response, which must be of `type_url`; ACKed.
    async fn recv(&mut self, type_url: &str) -> DeltaDiscoveryResponse {
        let resp = tokio::time::timeout(EXPECT, self.rx.message())
            .await
            .expect("no delta response in time")
            .expect("delta stream failed")
            .expect("delta stream ended");
        assert_eq!(resp.type_url, type_url, "{resp:?}");
        assert!(!resp.nonce.is_empty());
        resp
    }

    async fn expect_silence(&mut self) {
        if let Ok(got) = tokio::time::timeout(SILENCE, self.rx.message()).await {
            panic!("expected no response, got {got:?}");
        }
    }
}

/// Resource names and versions of a response, sorted.
fn named(resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    let mut v: Vec<_> = resp
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    v.sort();
    v
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    named(resp).into_iter().map(|(n, _)| n).collect()
}

fn decode<T: Message + Default>(resp: &DeltaDiscoveryResponse, i: usize) -> T {
    T::decode(
        resp.resources[i]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap()
}

fn endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

/// Registers an instance on a fresh 30 s lease, its port derived from its
/// id (so endpoints differ); the revision.
async fn register(client: &mut Client, service: &str, id: &str) -> u64 {
    let instance = instance(service, id).at(format!("127.0.0.1:{}", 9000 + id.len()));
    api::register(client, instance, 30_000, 0).await.revision
}

async fn deregister(client: &mut Client, service: &str, id: &str) {
    api::deregister(client, deregister_instance(service, id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_only_what_changed_and_names_what_went_away() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a").await;
    let rev = register(&mut reg, "prod", "bb").await;
    let epoch = reg
        .status(registry_api::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .server
        .unwrap()
        .epoch;

    let mut ads = Delta::open(&server.url).await;
    // Envoy: a first CDS request naming nothing is a wildcard.
    ads.subscribe(CDS, &[], &[]).await;
    let cds = ads.recv(CDS).await;
    assert_eq!(names(&cds), ["prod"]);
    assert_eq!(decode::<Cluster>(&cds, 0).name, "prod");
    ads.ack(&cds).await;

    ads.subscribe(EDS, &["prod"], &[]).await;
    let eds = ads.recv(EDS).await;
    assert_eq!(named(&eds), [("prod".into(), format!("{epoch}.{rev}"))]);
    assert_eq!(endpoint_count(&decode(&eds, 0)), 2);
    ads.ack(&eds).await;
    ads.expect_silence().await;

    // A new instance: one assignment at the new version, nothing else.
    let rev = register(&mut reg, "prod", "ccc").await;
    let eds = ads.recv(EDS).await;
    assert_eq!(named(&eds), [("prod".into(), format!("{epoch}.{rev}"))]);
    assert_eq!(endpoint_count(&decode(&eds, 0)), 3);
    assert!(eds.removed_resources.is_empty());
    ads.ack(&eds).await;

    // A new service: the wildcard CDS gets that one cluster only.
    register(&mut reg, "cart", "x").await;
    let cds = ads.recv(CDS).await;
    assert_eq!(names(&cds), ["cart"]);
    ads.ack(&cds).await;
    ads.expect_silence().await;

    // Its last instance leaves: the cluster is removed by name.
    deregister(&mut reg, "cart", "x").await;
    let cds = ads.recv(CDS).await;
    assert!(cds.resources.is_empty(), "{cds:?}");
    assert_eq!(cds.removed_resources, ["cart"]);
    ads.ack(&cds).await;
    ads.expect_silence().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_removed_and_a_nack_does_not_end_the_stream() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    let mut ads = Delta::open(&server.url).await;

    ads.subscribe(LDS, &["later"], &[]).await;
    let lds = ads.recv(LDS).await;
    assert!(lds.resources.is_empty());
    assert_eq!(lds.removed_resources, ["later"], "does not exist");
    ads.ack(&lds).await;

    register(&mut reg, "later", "1").await;
    let lds = ads.recv(LDS).await;
    assert_eq!(names(&lds), ["later"]);
    assert_eq!(decode::<Listener>(&lds, 0).name, "later");
    ads.nack(&lds).await;

    ads.subscribe(EDS, &["later"], &[]).await;
    let eds = ads.recv(EDS).await;
    assert_eq!(names(&eds), ["later"]);
    ads.ack(&eds).await;
    register(&mut reg, "later", "2").await;
    let eds = ads.recv(EDS).await;
    assert_eq!(endpoint_count(&decode(&eds, 0)), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribed_names_are_no_longer_pushed() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a").await;
    register(&mut reg, "cart", "a").await;
    let mut ads = Delta::open(&server.url).await;
    ads.subscribe(EDS, &["prod", "cart"], &[]).await;
    let eds = ads.recv(EDS).await;
    assert_eq!(names(&eds), ["cart", "prod"]);
    ads.ack(&eds).await;

    // The unsubscribe rides with a subscription to an unknown name, whose
    // "does not exist" answer shows the request was processed (delta has no
    // ACK for subscription changes) before cart changes.
    ads.subscribe(EDS, &["sync"], &["cart"]).await;
    let eds = ads.recv(EDS).await;
    assert_eq!(eds.removed_resources, ["sync"]);
    register(&mut reg, "cart", "b").await;
    ads.expect_silence().await;
    register(&mut reg, "prod", "b").await;
    let eds = ads.recv(EDS).await;
    assert_eq!(names(&eds), ["prod"]);

    // Subscribing again is answered even though nothing changed since.
    ads.subscribe(EDS, &["cart"], &[]).await;
    let eds = ads.recv(EDS).await;
    assert_eq!(names(&eds), ["cart"]);
    assert_eq!(endpoint_count(&decode(&eds, 0)), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_only_what_it_lacks() {
    let server = TestServer::start_with(TestServer::no_warmup_config()).await;
    let mut reg = server.client().await;
    register(&mut reg, "prod", "a").await;
    register(&mut reg, "cart", "a").await;

    let mut first = Delta::open(&server.url).await;
    first.subscribe(CDS, &["*"], &[]).await;
    let cds = first.recv(CDS).await;
    let have: HashMap<String, String> = named(&cds).into_iter().collect();
    assert_eq!(have.len(), 2);
    drop(first);

    // While it was away: cart went, search came.
    deregister(&mut reg, "cart", "a").await;
    register(&mut reg, "search", "a").await;

    let mut again = Delta::open(&server.url).await;
    again
        .send(DeltaDiscoveryRequest {
            type_url: CDS.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: have,
            ..Default::default()
        })
        .await;
    let cds = again.recv(CDS).await;
    assert_eq!(names(&cds), ["search"], "prod is current, not sent again");
    assert_eq!(cds.removed_resources, ["cart"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_withholds_absence_until_the_window_closes() {
    let server = TestServer::start_with(Config {
        warmup: Duration::from_millis(700),
        ..TestServer::test_config()
    })
    .await;
    let mut ads = Delta::open(&server.url).await;
    ads.subscribe(EDS, &["prod"], &[]).await;
    // Services may still be re-registering: no "does not exist" yet.
    ads.expect_silence().await;
    let eds = ads.recv(EDS).await;
    assert!(eds.resources.is_empty());
    assert_eq!(eds.removed_resources, ["prod"]);
    server.stop().await;
}
