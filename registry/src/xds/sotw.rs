//! One state-of-the-world ADS stream: the client's subscriptions per type,
//! nonces and ACK/NACK, the catalog watchers that wake it, and what to send.
//!
//! The stream is an `async_stream` polled by the connection's HTTP/2 task,
//! so while the client does not read, nothing here runs: its catalog
//! watchers fill up and are flagged (the writer never waits), and on the
//! next read the stream recomputes from current snapshots. Nothing is
//! queued per response beyond the one being sent.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::ControlPlane,
        service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
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

/// The client's subscription to one resource type.
#[derive(Debug, Default)]
struct Subscription {
    /// The client asked for this type on this stream.
    active: bool,
    /// Legacy wildcard: the first request named nothing. Lasts until the
    /// client names something.
    legacy_wildcard: bool,
    /// Explicit (`*`) or legacy wildcard.
    wildcard: bool,
    /// Names subscribed to (besides the wildcard).
    names: BTreeSet<Arc<str>>,
    /// Nonce of the last response sent; requests carrying another are stale.
    nonce: Option<String>,
    /// Last version the client accepted.
    acked: Option<String>,
    /// What the client was last sent: resource name -> the service revision
    /// it reflects (0 for resources that depend only on the name).
    sent: HashMap<Arc<str>, u64>,
    /// A response is due whatever changed (initial request, new names).
    owed: bool,
    /// A response was withheld during warm-up.
    held: bool,
}

impl Subscription {
    /// Applies the names of a request; returns whether the set changed.
    /// Only Listener and Cluster know the legacy wildcard (a first request
    /// naming nothing).
    fn set_names(&mut self, ty: ResourceType, requested: Vec<String>) -> Result<bool, Status> {
        if requested.len() > MAX_RESOURCE_NAMES {
            return Err(Status::resource_exhausted(format!(
                "resource_names has {} entries, the limit is {MAX_RESOURCE_NAMES} per type per stream",
                requested.len()
            )));
        }
        let first = !self.active;
        self.active = true;
        if first && requested.is_empty() && ty.full_state() {
            self.legacy_wildcard = true;
        } else if !requested.is_empty() {
            self.legacy_wildcard = false;
        }
        let explicit = requested.iter().any(|n| n == "*");
        let wildcard = explicit || self.legacy_wildcard;
        let names: BTreeSet<Arc<str>> = requested
            .into_iter()
            .filter(|n| n != "*")
            .map(Arc::from)
            .collect();
        let changed = first || wildcard != self.wildcard || names != self.names;
        self.wildcard = wildcard;
        self.names = names;
        if !self.wildcard {
            let names = &self.names;
            self.sent.retain(|n, _| names.contains(n));
        }
        Ok(changed)
    }

    /// Whether this subscription covers `name`.
    fn covers(&self, name: &str) -> bool {
        self.active && (self.wildcard || self.names.contains(name))
    }
}

/// The protocol machine of one stream.
struct Ads {
    registry: Registry,
    cache: Arc<LoadAssignmentCache>,
    may_read: ReadCheck,
    subs: [Subscription; 4],
    next_nonce: u64,
    st: StreamState,
}

impl Ads {
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

    /// Opens and closes catalog watchers to match the subscriptions: one
    /// watch-all watcher while any CDS/EDS subscription is a wildcard,
    /// otherwise one per subscribed (valid, readable) service name.
    fn sync_watchers(&mut self) -> Result<(), Status> {
        let want_all = [ResourceType::Cluster, ResourceType::LoadAssignment]
            .iter()
            .any(|t| self.subs[*t as usize].active && self.subs[*t as usize].wildcard);
        let names = self
            .subs
            .iter()
            .filter(|s| s.active)
            .flat_map(|s| s.names.iter().cloned());
        self.st.watch(want_all, names, &self.may_read)
    }
}

impl Protocol for Ads {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    /// Handles one request: ACK, NACK, stale, or (re)subscription.
    fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        self.st.saw_node(req.node.as_ref(), "state of the world");
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            debug!(node = %self.st.node, type_url = %req.type_url, "xds: ignoring request for an unserved type");
            return Ok(());
        };
        let sub = &mut self.subs[ty as usize];
        if !req.response_nonce.is_empty() {
            if sub
                .nonce
                .as_deref()
                .is_some_and(|n| n != req.response_nonce)
            {
                // A newer response is on its way; the client will answer
                // that one with its current subscription.
                debug!(node = %self.st.node, ?ty, nonce = %req.response_nonce, "xds: stale nonce ignored");
                return Ok(());
            }
            match &req.error_detail {
                Some(err) => warn!(
                    node = %self.st.node,
                    ?ty,
                    rejected_version = %req.version_info,
                    kept_version = sub.acked.as_deref().unwrap_or(""),
                    code = err.code,
                    error = %err.message,
                    "xds: client rejected (NACK) a response; it keeps its last accepted version"
                ),
                None => {
                    debug!(node = %self.st.node, ?ty, version = %req.version_info, "xds: ACK");
                    sub.acked = Some(req.version_info.clone());
                }
            }
        }
        let initial = req.response_nonce.is_empty();
        let changed = sub.set_names(ty, req.resource_names)?;
        if changed || initial {
            sub.owed = true;
        }
        if changed {
            self.sync_watchers()?;
        }
        Ok(())
    }

    /// The responses now due, in push order. Clears the dirty set.
    fn responses(&mut self) -> Vec<DiscoveryResponse> {
        let info = self.registry.server_info();
        let mut ctx = Ctx::new(&self.registry, &self.cache, &self.may_read, info.warming_up);
        let mut out = Vec::new();
        for ty in ResourceType::ALL {
            let sub = &mut self.subs[ty as usize];
            if !sub.active {
                continue;
            }
            let touched = self.st.all_dirty
                || sub.owed
                || sub.held
                || self.st.dirty.iter().any(|d| sub.covers(d))
                // A wildcard CDS sees services come and go.
                || (sub.wildcard && !self.st.dirty.is_empty());
            if !touched {
                continue;
            }
            let everything = self.st.all_dirty || sub.owed || sub.held;
            let dirty = (!everything).then_some(&self.st.dirty);
            let resources = match ty {
                ResourceType::Listener | ResourceType::Cluster => ctx.full_state(ty, sub, dirty),
                ResourceType::Route => ctx.routes(sub, dirty),
                ResourceType::LoadAssignment => ctx.load_assignments(sub, dirty),
            };
            sub.owed = false;
            if let Some(resources) = resources {
                self.next_nonce += 1;
                let nonce = self.next_nonce.to_string();
                sub.nonce = Some(nonce.clone());
                debug!(node = %self.st.node, ?ty, n = resources.len(), version = ctx.revision, "xds: push");
                out.push(DiscoveryResponse {
                    version_info: ctx.revision.to_string(),
                    resources,
                    type_url: ty.type_url().to_owned(),
                    nonce,
                    control_plane: Some(ControlPlane {
                        identifier: CONTROL_PLANE_ID.to_owned(),
                    }),
                    ..Default::default()
                });
            }
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
    /// Listener or Cluster: the full set, sent when it differs from what
    /// the client has (or is owed). `None` when nothing is to be sent.
    fn full_state(
        &mut self,
        ty: ResourceType,
        sub: &mut Subscription,
        dirty: Option<&HashSet<Arc<str>>>,
    ) -> Option<Vec<Any>> {
        // A wildcard LDS gets only named listeners: API listeners are for
        // proxyless clients, which always name them; Envoy would reject them.
        let wildcard = sub.wildcard && ty == ResourceType::Cluster;
        if let Some(dirty) = dirty {
            // The content depends only on the name: what matters is whether
            // a changed service started or stopped having instances.
            let flipped = dirty
                .iter()
                .filter(|d| wildcard || sub.names.contains(*d))
                .any(|d| self.live(d) != sub.sent.contains_key(d));
            if !flipped {
                return None;
            }
        }
        let mut present: BTreeSet<Arc<str>> = BTreeSet::new();
        let mut missing = false;
        for name in &sub.names {
            if self.live(name) {
                present.insert(name.clone());
            } else {
                missing = true;
            }
        }
        if wildcard {
            present.extend(self.live_services());
        }
        if self.warming && (missing || wildcard) {
            sub.held = true;
            self.held = true;
            return None;
        }
        let must = std::mem::take(&mut sub.held) | sub.owed;
        let same =
            present.len() == sub.sent.len() && present.iter().all(|n| sub.sent.contains_key(n));
        if same && !must {
            return None;
        }
        sub.sent = present.iter().map(|n| (n.clone(), 0)).collect();
        Some(
            present
                .iter()
                .map(|n| match ty {
                    ResourceType::Listener => resources::any(resources::listener(n)),
                    _ => resources::any(resources::cluster(n, self.registry.config())),
                })
                .collect(),
        )
    }

    /// Route configurations: each live subscribed service the client does
    /// not have yet (their content depends only on the name). `dirty`
    /// limits the names looked at; `None` means all.
    fn routes(
        &mut self,
        sub: &mut Subscription,
        dirty: Option<&HashSet<Arc<str>>>,
    ) -> Option<Vec<Any>> {
        sub.held = false;
        let names: Vec<Arc<str>> = candidates(sub, dirty);
        let mut out = Vec::new();
        for name in names {
            if self.live(&name) {
                if sub.sent.insert(name.clone(), 0).is_none() {
                    out.push(resources::any(resources::route_configuration(&name)));
                }
            } else {
                sub.sent.remove(&name);
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Load assignments whose service changed since the client's copy.
    /// Unknown services are left out (the protocol's "does not exist");
    /// a known service without instances gets an empty assignment, except
    /// during warm-up.
    fn load_assignments(
        &mut self,
        sub: &mut Subscription,
        dirty: Option<&HashSet<Arc<str>>>,
    ) -> Option<Vec<Any>> {
        sub.held = false;
        let mut names = candidates(sub, dirty);
        if sub.wildcard && dirty.is_none() {
            names.extend(self.live_services());
        } else if sub.wildcard
            && let Some(dirty) = dirty
        {
            names.extend(dirty.iter().cloned());
        }
        names.sort_unstable();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            let Some(snap) = self.snapshot(&name) else {
                continue;
            };
            if sub.sent.get(&name) == Some(&snap.revision) {
                continue;
            }
            if self.warming && snap.is_empty() {
                sub.held = true;
                self.held = true;
                continue;
            }
            let cap = self.registry.config().max_services;
            out.push(self.cache.get_or_build(&name, snap.revision, cap, || {
                resources::any(resources::load_assignment(
                    &name,
                    snap.instances(),
                    snap.served(),
                ))
            }));
            sub.sent.insert(name, snap.revision);
        }
        (!out.is_empty()).then_some(out)
    }
}

/// The subscribed names worth looking at: all of them, or those changed.
fn candidates(sub: &Subscription, dirty: Option<&HashSet<Arc<str>>>) -> Vec<Arc<str>> {
    match dirty {
        None => sub.names.iter().cloned().collect(),
        Some(dirty) => dirty
            .iter()
            .filter(|d| sub.names.contains(*d))
            .cloned()
            .collect(),
    }
}

/// The response stream of one StreamAggregatedResources call (see
/// [`driver::drive`]).
pub(super) fn stream<R>(
    registry: Registry,
    cache: Arc<LoadAssignmentCache>,
    conn: Option<SocketAddr>,
    may_read: ReadCheck,
    requests: R,
) -> impl Stream<Item = Result<DiscoveryResponse, Status>> + Send + 'static
where
    R: Stream<Item = Result<DiscoveryRequest, Status>> + Send + Unpin + 'static,
{
    let shutdown = registry.shutdown_token().clone();
    driver::drive(
        Ads::new(registry, cache, conn, may_read),
        shutdown,
        requests,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use futures::StreamExt;
    use prost::Message;
    use registry_api::v1::{Instance, RegisterRequest};
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    fn registry() -> Registry {
        Registry::new(Config {
            warmup: Duration::ZERO,
            ..Config::default()
        })
    }

    /// Memory-mode writes complete without waiting: block on them in place.
    fn register(r: &Registry, service: &str) {
        futures::executor::block_on(r.register(
            RegisterRequest {
                instance: Some(Instance {
                    service: service.into(),
                    id: "1".into(),
                    address: "127.0.0.1:80".into(),
                    ..Default::default()
                }),
                ttl_ms: 60_000,
                lease_id: 0,
            },
            None,
        ))
        .unwrap();
    }

    fn request(ty: ResourceType, names: &[&str]) -> Result<DiscoveryRequest, Status> {
        Ok(DiscoveryRequest {
            type_url: ty.type_url().into(),
            resource_names: names.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        })
    }

    async fn next(
        s: &mut (impl Stream<Item = Result<DiscoveryResponse, Status>> + Unpin),
    ) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(2), s.next())
            .await
            .expect("a response in time")
            .expect("stream open")
            .expect("no error")
    }

    #[tokio::test]
    async fn unreadable_services_are_answered_as_absent() {
        let r = registry();
        register(&r, "prod");
        register(&r, "secret");
        let (tx, rx) = mpsc::channel(8);
        let may_read: ReadCheck = Arc::new(|s: &str| s != "secret");
        let mut s = Box::pin(stream(
            r.clone(),
            Arc::default(),
            None,
            may_read,
            ReceiverStream::new(rx),
        ));
        // Wildcard CDS: only the readable service.
        tx.send(request(ResourceType::Cluster, &[])).await.unwrap();
        let cds = next(&mut s).await;
        let names: Vec<String> = cds
            .resources
            .iter()
            .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
            .collect();
        assert_eq!(names, ["prod"]);
        // Named LDS: the unreadable one does not exist.
        tx.send(request(ResourceType::Listener, &["secret"]))
            .await
            .unwrap();
        let lds = next(&mut s).await;
        assert!(lds.resources.is_empty());
        // A change to it is not pushed either.
        register(&r, "secret");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.next())
                .await
                .is_err()
        );
    }

    #[test]
    fn wildcard_rules_follow_the_protocol() {
        let mut sub = Subscription::default();
        // First request naming nothing: legacy wildcard, for LDS/CDS only.
        assert!(sub.set_names(ResourceType::Cluster, vec![]).unwrap());
        assert!(sub.wildcard);
        assert!(!sub.set_names(ResourceType::Cluster, vec![]).unwrap());
        assert!(sub.wildcard, "an ACK naming nothing keeps the wildcard");
        assert!(
            sub.set_names(ResourceType::Cluster, vec!["a".into()])
                .unwrap()
        );
        assert!(!sub.wildcard, "naming something ends the legacy wildcard");
        assert!(sub.set_names(ResourceType::Cluster, vec![]).unwrap());
        assert!(!sub.wildcard && sub.names.is_empty(), "now it unsubscribes");
        assert!(
            sub.set_names(ResourceType::Cluster, vec!["*".into(), "b".into()])
                .unwrap()
        );
        assert!(sub.wildcard && sub.covers("anything") && sub.names.len() == 1);

        let mut eds = Subscription::default();
        eds.set_names(ResourceType::LoadAssignment, vec![]).unwrap();
        assert!(!eds.wildcard, "no legacy wildcard for assignments");

        let too_many = (0..=MAX_RESOURCE_NAMES).map(|i| i.to_string()).collect();
        let err = Subscription::default()
            .set_names(ResourceType::LoadAssignment, too_many)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
