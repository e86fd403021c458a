//! One incremental (delta) ADS stream: `DeltaAggregatedResources`, which
//! Envoy speaks with `api_type: DELTA_GRPC`. Same resources, watchers,
//! warm-up and permission rules as the state-of-the-world stream; what
//! differs is the bookkeeping. The client subscribes and unsubscribes names
//! one by one, the server sends only the resources that changed, each with
//! its own version, and names what went away in `removed_resources`. The
//! stream remembers, per type, which version of each resource the client
//! has, so a push carries exactly the services that changed.
//!
//! Versions: a load assignment's is `epoch.revision` of its service (unique
//! across registry restarts, so a client reconnecting with
//! `initial_resource_versions` is not sent what it has, and is never told it
//! has something current that another life built); a Listener,
//! RouteConfiguration or Cluster depends only on its name, so its version
//! is the registry's build.
//!
//! A name subscribed that does not exist (unknown service, no live
//! instance, or not readable by the subscriber) is answered in
//! `removed_resources`, which is how the incremental protocol says "does
//! not exist"; the stream stays open.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::ControlPlane,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
    },
    google::protobuf::Any,
};
use futures::Stream;
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, warn};

use super::{
    CONTROL_PLANE_ID, LoadAssignmentCache, MAX_RESOURCE_NAMES, ReadCheck, ResourceType,
    driver::{self, Protocol, StreamState},
    resources,
    view::Ctx,
};
use crate::core::Registry;

/// Version of the resources whose content depends only on their name.
const NAME_ONLY_VERSION: &str = concat!("registry-", env!("CARGO_PKG_VERSION"));

/// The client's subscription to one resource type.
#[derive(Debug, Default)]
struct Subscription {
    /// The client asked for this type on this stream.
    active: bool,
    /// Subscribed to everything (`*`, or a first request naming nothing for
    /// Listener and Cluster). Only Cluster and load-assignment wildcards
    /// add resources: API listeners are for proxyless clients, which name
    /// them (as in the state-of-the-world stream).
    wildcard: bool,
    /// Names subscribed to.
    names: BTreeSet<Arc<str>>,
    /// What the client has: name -> version.
    have: HashMap<Arc<str>, String>,
    /// Newly subscribed names: answered even if the client has them.
    fresh: BTreeSet<Arc<str>>,
    /// Everything is to be looked at (first request, wildcard opened).
    owed: bool,
    /// Something was withheld during warm-up.
    held: bool,
}

impl Subscription {
    /// Whether resources of `ty` named `name` are tracked.
    fn covers(&self, ty: ResourceType, name: &str) -> bool {
        self.active && (self.adds_everything(ty) || self.names.contains(name))
    }

    fn adds_everything(&self, ty: ResourceType) -> bool {
        self.wildcard && ty != ResourceType::Listener && ty != ResourceType::Route
    }

    /// Applies a request's subscription changes.
    fn update(&mut self, ty: ResourceType, req: &mut DeltaDiscoveryRequest) -> Result<(), Status> {
        let first = !self.active;
        self.active = true;
        if first {
            self.owed = true;
            self.wildcard = req.resource_names_subscribe.is_empty() && ty.full_state();
            self.have = std::mem::take(&mut req.initial_resource_versions)
                .into_iter()
                .map(|(name, version)| (Arc::from(name), version))
                .collect();
        }
        for name in req.resource_names_unsubscribe.drain(..) {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(name.as_str());
                self.fresh.remove(name.as_str());
                // The client forgets it; a later subscribe is answered anew.
                self.have.remove(name.as_str());
            }
        }
        for name in req.resource_names_subscribe.drain(..) {
            if name == "*" {
                self.owed |= !self.wildcard;
                self.wildcard = true;
            } else {
                let name: Arc<str> = name.into();
                self.names.insert(name.clone());
                self.fresh.insert(name);
            }
        }
        if self.names.len() > MAX_RESOURCE_NAMES {
            return Err(Status::resource_exhausted(format!(
                "{} resource names subscribed, the limit is {MAX_RESOURCE_NAMES} per type per stream",
                self.names.len()
            )));
        }
        if !self.adds_everything(ty) {
            // Resources the wildcard brought are dropped by the client with it.
            let names = &self.names;
            self.have.retain(|n, _| names.contains(n));
        }
        Ok(())
    }
}

/// The protocol machine of one delta stream.
struct Delta {
    registry: Registry,
    cache: Arc<LoadAssignmentCache>,
    may_read: ReadCheck,
    subs: [Subscription; 4],
    next_nonce: u64,
    st: StreamState,
}

impl Delta {
    fn new(
        registry: Registry,
        cache: Arc<LoadAssignmentCache>,
        conn: Option<SocketAddr>,
        may_read: ReadCheck,
    ) -> Self {
        Self {
            st: StreamState::new(registry.clone(), conn),
            registry,
            cache,
            may_read,
            subs: Default::default(),
            next_nonce: 0,
        }
    }

    /// Same rule as the state-of-the-world stream: one watch-all watcher
    /// while a CDS/EDS wildcard exists, else one per subscribed service.
    fn sync_watchers(&mut self) -> Result<(), Status> {
        let want_all = [ResourceType::Cluster, ResourceType::LoadAssignment]
            .iter()
            .any(|t| self.subs[*t as usize].adds_everything(*t));
        let names = self.subs.iter().flat_map(|s| s.names.iter().cloned());
        self.st.watch(want_all, names, &self.may_read)
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    /// Handles one request: ACK, NACK, (un)subscriptions.
    fn on_request(&mut self, mut req: DeltaDiscoveryRequest) -> Result<(), Status> {
        self.st.saw_node(req.node.as_ref(), "delta");
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            debug!(node = %self.st.node, type_url = %req.type_url, "xds: ignoring delta request for an unserved type");
            return Ok(());
        };
        if !req.response_nonce.is_empty() {
            match &req.error_detail {
                Some(err) => warn!(
                    node = %self.st.node,
                    ?ty,
                    nonce = %req.response_nonce,
                    code = err.code,
                    error = %err.message,
                    "xds: client rejected (NACK) a delta response; it keeps its previous resources"
                ),
                None => {
                    debug!(node = %self.st.node, ?ty, nonce = %req.response_nonce, "xds: delta ACK")
                }
            }
        }
        let sub = &mut self.subs[ty as usize];
        let changed = !sub.active
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty();
        sub.update(ty, &mut req)?;
        if changed {
            self.sync_watchers()?;
        }
        Ok(())
    }

    /// The responses now due, in push order. Clears the dirty set.
    fn responses(&mut self) -> Vec<DeltaDiscoveryResponse> {
        let info = self.registry.server_info();
        let epoch = self.registry.epoch();
        let mut ctx = Ctx::new(&self.registry, &self.cache, &self.may_read, info.warming_up);
        let mut out = Vec::new();
        for ty in ResourceType::ALL {
            let sub = &mut self.subs[ty as usize];
            if !sub.active {
                continue;
            }
            let everything = self.st.all_dirty || sub.owed || sub.held;
            let mut names: BTreeSet<Arc<str>> = sub.fresh.clone();
            if everything {
                names.extend(sub.names.iter().cloned());
                names.extend(sub.have.keys().cloned());
                if sub.adds_everything(ty) {
                    names.extend(ctx.live_services());
                }
            } else {
                names.extend(
                    self.st
                        .dirty
                        .iter()
                        .filter(|d| sub.covers(ty, d) || sub.have.contains_key(*d))
                        .cloned(),
                );
            }
            sub.owed = false;
            sub.held = false;
            if names.is_empty() {
                continue;
            }
            let mut resources = Vec::new();
            let mut removed = Vec::new();
            for name in names {
                let fresh = sub.fresh.remove(&name);
                if !sub.covers(ty, &name) {
                    sub.have.remove(&name);
                    continue;
                }
                let current = ctx.delta_resource(ty, &name, epoch);
                match current {
                    Some((version, any)) => {
                        if !fresh && sub.have.get(&name) == Some(&version) {
                            continue;
                        }
                        if ctx.warming && ty == ResourceType::LoadAssignment && any.is_none() {
                            // An empty assignment during warm-up: withheld.
                            sub.held = true;
                            ctx.held = true;
                            if fresh {
                                sub.fresh.insert(name);
                            }
                            continue;
                        }
                        let resource = any.unwrap_or_else(|| {
                            resources::any(resources::load_assignment(
                                &name,
                                &[],
                                &crate::serving::Served::all(),
                            ))
                        });
                        sub.have.insert(name.clone(), version.clone());
                        resources.push(Resource {
                            name: name.to_string(),
                            version,
                            resource: Some(resource),
                            ..Default::default()
                        });
                    }
                    None if sub.have.contains_key(&name) || fresh => {
                        if ctx.warming {
                            sub.held = true;
                            ctx.held = true;
                            if fresh {
                                sub.fresh.insert(name);
                            }
                            continue;
                        }
                        sub.have.remove(&name);
                        removed.push(name.to_string());
                    }
                    None => {}
                }
            }
            if resources.is_empty() && removed.is_empty() {
                continue;
            }
            self.next_nonce += 1;
            debug!(
                node = %self.st.node,
                ?ty,
                updated = resources.len(),
                removed = removed.len(),
                version = ctx.revision,
                "xds: delta push"
            );
            out.push(DeltaDiscoveryResponse {
                system_version_info: ctx.revision.to_string(),
                resources,
                type_url: ty.type_url().to_owned(),
                removed_resources: removed,
                nonce: self.next_nonce.to_string(),
                control_plane: Some(ControlPlane {
                    identifier: CONTROL_PLANE_ID.to_owned(),
                }),
                ..Default::default()
            });
        }
        self.st.dirty.clear();
        self.st.all_dirty = false;
        self.st.recheck_at = ctx.held.then(|| {
            Instant::now() + std::time::Duration::from_millis(info.warmup_remaining_ms.max(1))
        });
        out
    }

    fn state(&mut self) -> &mut StreamState {
        &mut self.st
    }
}

impl Ctx<'_> {
    /// The current version of a resource and, except for an empty load
    /// assignment, its packed content. `None`: it does not exist.
    fn delta_resource(
        &mut self,
        ty: ResourceType,
        name: &Arc<str>,
        epoch: u64,
    ) -> Option<(String, Option<Any>)> {
        match ty {
            ResourceType::LoadAssignment => {
                let snap = self.snapshot(name)?;
                let version = format!("{epoch}.{}", snap.revision);
                if snap.is_empty() {
                    return Some((version, None));
                }
                let cap = self.registry.config().max_services;
                let any = self.cache.get_or_build(name, snap.revision, cap, || {
                    resources::any(resources::load_assignment(
                        name,
                        snap.instances(),
                        snap.served(),
                    ))
                });
                Some((version, Some(any)))
            }
            _ if !self.live(name) => None,
            ResourceType::Listener => Some((
                NAME_ONLY_VERSION.to_owned(),
                Some(resources::any(resources::listener(name))),
            )),
            ResourceType::Route => Some((
                NAME_ONLY_VERSION.to_owned(),
                Some(resources::any(resources::route_configuration(name))),
            )),
            ResourceType::Cluster => Some((
                NAME_ONLY_VERSION.to_owned(),
                Some(resources::any(resources::cluster(
                    name,
                    self.registry.config(),
                ))),
            )),
        }
    }
}

/// The response stream of one DeltaAggregatedResources call (see
/// [`driver::drive`]).
pub(super) fn stream<R>(
    registry: Registry,
    cache: Arc<LoadAssignmentCache>,
    conn: Option<SocketAddr>,
    may_read: ReadCheck,
    requests: R,
) -> impl Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static
where
    R: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send + Unpin + 'static,
{
    let shutdown = registry.shutdown_token().clone();
    driver::drive(
        Delta::new(registry, cache, conn, may_read),
        shutdown,
        requests,
    )
}
