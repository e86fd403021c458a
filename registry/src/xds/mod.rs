//! xDS: the registry as an xDS management server, so that proxyless gRPC
//! clients in any language (`xds:///service`) and Envoy discover services
//! through it without our client library.
//!
//! - [`resources`] builds the Listener, RouteConfiguration, Cluster and
//!   ClusterLoadAssignment of a service from the catalog's view of it.
//! - [`XdsService`] is the gRPC adapter for
//!   `envoy.service.discovery.v3.AggregatedDiscoveryService`; each
//!   state-of-the-world stream runs the protocol machine in `sotw`: the
//!   client's subscriptions per resource type, nonces, ACK/NACK; each
//!   incremental stream (`DeltaAggregatedResources`, Envoy's `DELTA_GRPC`)
//!   runs the one in `delta`, which tracks the version of every resource the
//!   client has and sends only what changed, with removals by name.
//! - `driver` runs either machine's loop (requests, catalog changes,
//!   warm-up, shutdown); `watches` holds a stream's catalog watchers, on exactly the services it
//!   subscribed to; `view` the snapshot reads of one computation.
//!
//! Pushes: every stream holds an ordinary catalog watcher per subscribed
//! service (or one watch-all watcher while it has a wildcard CDS/EDS
//! subscription, as Envoy does). A commit to the catalog wakes the stream,
//! which re-reads the service's snapshot and sends what changed, so a new
//! ClusterLoadAssignment reaches every subscriber within milliseconds. The
//! watchers are the same bounded, never-blocking ones Watch uses: a client
//! that stops reading overflows its watchers, the writer carries on, and the
//! stream recomputes from the current snapshot when the client reads again.
//! Memory per stream is bounded by [`MAX_RESOURCE_NAMES`] per type.
//!
//! Versions are catalog revisions: a response's `version_info` is the
//! revision its content reflects. The load assignment of a service at a
//! revision is encoded once and shared by every stream that sends it.
//!
//! Warm-up: right after a start the catalog is empty until services
//! re-register, and an empty answer would make clients drop everything
//! they know. During [`Config::warmup`](crate::config::Config::warmup)
//! the server therefore withholds answers that would remove a resource
//! (a Listener/Cluster response missing a subscribed name, an empty load
//! assignment) and sends them when the window closes if still true.
//!
//! Permissions: with auth enabled, a subscriber sees only the services its
//! identity may read; any other name is answered as not existing, exactly
//! like an unknown service, so names are not leaked either.

mod delta;
mod driver;
pub mod resources;
mod sotw;
mod view;
mod watches;

use std::{pin::Pin, sync::Arc};

use dashmap::DashMap;
use envoy_types::pb::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    google::protobuf::Any,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::{self, Action},
    core::Registry,
};

/// Most resource names one stream may subscribe to per type. A proxyless
/// gRPC client names a handful; an Envoy names one load assignment per
/// cluster it knows. Each named service costs the stream a catalog watcher,
/// so this also bounds a stream's share of `max_watchers_per_connection`.
pub const MAX_RESOURCE_NAMES: usize = 10_000;

/// Identifies this control plane in responses (`control_plane.identifier`).
pub const CONTROL_PLANE_ID: &str = concat!("registry/", env!("CARGO_PKG_VERSION"));

/// The resource types served, in the order a change is pushed: clusters
/// before their load assignments and listeners before their routes, so a
/// client never sees a reference to something it cannot resolve yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    Cluster = 0,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    LoadAssignment = 1,
    /// `envoy.config.listener.v3.Listener` (LDS).
    Listener = 2,
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    Route = 3,
}

impl ResourceType {
    /// Every type, in push order.
    pub const ALL: [Self; 4] = [
        Self::Cluster,
        Self::LoadAssignment,
        Self::Listener,
        Self::Route,
    ];

    /// The type URL clients subscribe with.
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Self::LoadAssignment => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            Self::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Self::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    /// The type of a type URL, if served.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Listener and Cluster are "state of the world" in full: a response
    /// lists every subscribed resource, and one left out is deleted. Route
    /// and load-assignment responses may carry only what changed.
    pub fn full_state(self) -> bool {
        matches!(self, Self::Listener | Self::Cluster)
    }
}

/// Who may see which service: `true` when the subscriber may read it.
pub type ReadCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Encoded load assignments by service, each tagged with the service
/// revision it reflects: built by the first stream that needs it at that
/// revision and shared by the others. One entry per service.
#[derive(Debug, Default)]
pub(crate) struct LoadAssignmentCache {
    entries: DashMap<Arc<str>, Arc<(u64, Any)>>,
}

impl LoadAssignmentCache {
    /// The packed assignment of `service` at `revision`, building it with
    /// `build` if the cache holds an older one.
    pub(crate) fn get_or_build(
        &self,
        service: &Arc<str>,
        revision: u64,
        cap: usize,
        build: impl FnOnce() -> Any,
    ) -> Any {
        if let Some(hit) = self.entries.get(service)
            && hit.0 == revision
        {
            return hit.1.clone();
        }
        let any = build();
        // Services the catalog forgot leave entries behind; the catalog caps
        // services, so past that many entries start over.
        if self.entries.len() >= cap {
            self.entries.clear();
        }
        // A stream holding an older snapshot must not replace a newer entry.
        let fresh = Arc::new((revision, any.clone()));
        self.entries
            .entry(service.clone())
            .and_modify(|e| {
                if e.0 < revision {
                    *e = fresh.clone();
                }
            })
            .or_insert(fresh);
        any
    }
}

/// What the caller may read: everything with auth off, else its identity's
/// read grants.
fn read_check<T>(request: &Request<T>) -> ReadCheck {
    match auth::caller(request) {
        Some(identity) => Arc::new(move |service: &str| identity.may(Action::Read, service)),
        None => Arc::new(|_: &str| true),
    }
}

/// Boxed response stream, as the generated trait wants.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Aggregated Discovery Service over a [`Registry`]: a thin adapter that
/// starts one protocol machine per stream.
#[derive(Debug, Clone)]
pub struct XdsService {
    registry: Registry,
    cache: Arc<LoadAssignmentCache>,
}

impl XdsService {
    /// Serves xDS for the given registry.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            cache: Arc::default(),
        }
    }

    /// The tonic service to add to a router, with the server's decoding limit.
    pub fn server(registry: Registry) -> AggregatedDiscoveryServiceServer<Self> {
        let limit = registry.config().max_message_size;
        AggregatedDiscoveryServiceServer::new(Self::new(registry)).max_decoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let conn = request.remote_addr();
        let may_read = read_check(&request);
        let stream = sotw::stream(
            self.registry.clone(),
            self.cache.clone(),
            conn,
            may_read,
            request.into_inner(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let conn = request.remote_addr();
        let may_read = read_check(&request);
        let stream = delta::stream(
            self.registry.clone(),
            self.cache.clone(),
            conn,
            may_read,
            request.into_inner(),
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
