//! [`Resolver`]: a live cache of one service's instances, fed by Watch.
//!
//! The task behind it lists once (Resolve, which also says whether the name
//! is known), then watches from the next revision. When the stream breaks it
//! resumes with `start_revision = last seen + 1` and the epoch it belongs to,
//! so a short outage costs no snapshot; when the registry cannot replay (it
//! restarted, or compacted its history) it sends a reset snapshot and the
//! cache is replaced rather than merged.
//!
//! Two rules protect callers from a misbehaving or restarting registry:
//!
//! - **Last known good during outages.** While the registry is unreachable
//!   the cache keeps serving what it last knew; it never empties itself.
//! - **No wipe during warm-up.** A registry that just restarted is empty
//!   until services re-register, and says so (`ServerInfo.warming_up`). When
//!   a snapshot taken during warm-up lacks instances we had, we keep them
//!   (beside whatever the registry already reports) until warm-up ends or the
//!   registry explicitly deletes them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use registry_api::v1::{self as pb, registry_client::RegistryClient as Grpc};
use tokio::{sync::watch, time::Instant};
use tokio_stream::wrappers::WatchStream;

use crate::{
    Error, Instance, ServerInfo, backoff::Backoff, client::RPC_TIMEOUT, endpoints::Endpoints,
};

/// Progress interval we ask for on idle watch streams.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// A stream silent for this long (several missed Progress messages, or the
/// server default of 10 s twice over) is treated as dead and reopened.
const IDLE_TIMEOUT: Duration = Duration::from_secs(25);

/// What the registry has said about the name so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceStatus {
    /// No answer from the registry yet.
    Pending,
    /// The registry has never had an instance of this name since it started:
    /// probably a typo or a service that was never deployed.
    Unknown,
    /// The name is known; it may currently have zero instances.
    Known,
}

/// A consistent view of one service, as published by a [`Resolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverState {
    /// Current instances ordered by id; cheap to clone and hand out.
    pub instances: Arc<[Instance]>,
    /// Unknown name vs. known name (with possibly zero instances).
    pub status: ServiceStatus,
    /// False while the registry is unreachable: `instances` is then the last
    /// known good list.
    pub connected: bool,
    /// True while `instances` includes entries kept from before a registry
    /// restart that have not re-registered yet (see the module docs).
    pub holding_stale: bool,
    /// Catalog revision of this view (within `epoch`).
    pub revision: u64,
    /// Registry life the revision belongs to.
    pub epoch: u64,
}

impl ResolverState {
    fn pending() -> Self {
        Self {
            instances: Arc::from(Vec::new()),
            status: ServiceStatus::Pending,
            connected: false,
            holding_stale: false,
            revision: 0,
            epoch: 0,
        }
    }
}

/// A live cache of one service's instances, kept current by a background
/// Watch. Cloning is cheap; clones share the task.
///
/// The task runs while any clone of this resolver, or any receiver obtained
/// from [`Resolver::subscribe`] / [`Resolver::updates`], is alive, and stops
/// when the last one is dropped.
#[derive(Debug, Clone)]
pub struct Resolver {
    service: Arc<str>,
    rx: watch::Receiver<ResolverState>,
}

impl Resolver {
    /// The watched service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Current instances (the last known good list during an outage).
    pub fn instances(&self) -> Arc<[Instance]> {
        self.rx.borrow().instances.clone()
    }

    /// The whole current view.
    pub fn state(&self) -> ResolverState {
        self.rx.borrow().clone()
    }

    /// A receiver that is notified on every change of the view (instances,
    /// status, connectivity), e.g. to drive a load balancer.
    pub fn subscribe(&self) -> watch::Receiver<ResolverState> {
        self.rx.clone()
    }

    /// The same as a `Stream`: the current view first, then each change.
    pub fn updates(&self) -> WatchStream<ResolverState> {
        WatchStream::new(self.rx.clone())
    }

    /// Waits for the next change and returns the new view.
    pub async fn changed(&mut self) -> Result<ResolverState, Error> {
        self.rx.changed().await.map_err(|_| Error::Closed)?;
        Ok(self.rx.borrow_and_update().clone())
    }

    /// Waits until the registry has answered once (status no longer
    /// [`ServiceStatus::Pending`]) and returns that view.
    pub async fn ready(&self) -> Result<ResolverState, Error> {
        let mut rx = self.rx.clone();
        let state = rx
            .wait_for(|s| s.status != ServiceStatus::Pending)
            .await
            .map_err(|_| Error::Closed)?;
        Ok(state.clone())
    }
}

/// Starts the watch task of a new resolver.
pub(crate) fn spawn(
    endpoints: Arc<Endpoints>,
    service: &str,
    selector: HashMap<String, String>,
) -> Resolver {
    let (tx, rx) = watch::channel(ResolverState::pending());
    let mut task = WatchTask {
        endpoints,
        service: service.to_owned(),
        selector,
        cache: Cache::default(),
        backoff: Backoff::default(),
    };
    tokio::spawn(async move {
        tokio::select! {
            () = tx.closed() => {}
            () = task.run(&tx) => {}
        }
        tracing::debug!(service = %task.service, "resolver dropped, watch task finished");
    });
    Resolver {
        service: Arc::from(service),
        rx,
    }
}

/// The resolver's model of the service.
#[derive(Debug, Default)]
struct Cache {
    /// A full view has been loaded once; from then on we resume.
    synced: bool,
    /// The registry's view, by id.
    live: BTreeMap<String, Instance>,
    /// Last-known-good entries kept through a warm-up, by id.
    held: BTreeMap<String, Instance>,
    hold_until: Option<Instant>,
    known: Option<bool>,
    revision: u64,
    epoch: u64,
    connected: bool,
}

impl Cache {
    fn view(&self) -> BTreeMap<String, Instance> {
        let mut all = self.held.clone();
        all.extend(self.live.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Replaces the view with a full answer (Resolve or a snapshot).
    fn replace(&mut self, instances: Vec<pb::Instance>, server: ServerInfo) {
        let previous = self.view();
        self.live = instances
            .into_iter()
            .map(|i| (i.id.clone(), Instance::from(i)))
            .collect();
        self.held.clear();
        self.hold_until = None;
        if server.warming_up {
            // The registry is still being repopulated: an absent instance may
            // just not have re-registered yet. Keep it until warm-up ends.
            self.held = previous
                .into_iter()
                .filter(|(id, _)| !self.live.contains_key(id))
                .collect();
            if !self.held.is_empty() {
                self.hold_until = Some(Instant::now() + server.warmup_remaining);
            }
        }
        if !self.live.is_empty() {
            self.known = Some(true);
        }
        if server.epoch != 0 {
            self.epoch = server.epoch;
        }
    }

    fn apply(&mut self, event: pb::Event) {
        self.revision = self.revision.max(event.revision);
        let Some(instance) = event.instance else {
            return;
        };
        // Whatever happens to an id in the new life supersedes the old copy.
        self.held.remove(&instance.id);
        match pb::EventType::try_from(event.r#type) {
            Ok(pb::EventType::Put) => {
                self.known = Some(true);
                self.live
                    .insert(instance.id.clone(), Instance::from(instance));
            }
            Ok(pb::EventType::Delete) => {
                self.live.remove(&instance.id);
            }
            _ => tracing::warn!(r#type = event.r#type, "unknown watch event type ignored"),
        }
    }

    fn end_hold(&mut self) {
        self.held.clear();
        self.hold_until = None;
    }

    /// Publishes the view; watchers are woken only when something they can
    /// act on changed (not for a bare revision bump from Progress).
    fn publish(&self, tx: &watch::Sender<ResolverState>) {
        let instances: Arc<[Instance]> = self.view().into_values().collect();
        let status = match self.known {
            None => ServiceStatus::Pending,
            Some(false) => ServiceStatus::Unknown,
            Some(true) => ServiceStatus::Known,
        };
        tx.send_if_modified(|state| {
            let changed = state.instances != instances
                || state.status != status
                || state.connected != self.connected
                || state.holding_stale == self.held.is_empty();
            state.revision = self.revision;
            state.epoch = self.epoch;
            if changed {
                state.instances = instances;
                state.status = status;
                state.connected = self.connected;
                state.holding_stale = !self.held.is_empty();
            }
            changed
        });
    }
}

struct WatchTask {
    endpoints: Arc<Endpoints>,
    service: String,
    selector: HashMap<String, String>,
    cache: Cache,
    backoff: Backoff,
}

impl WatchTask {
    async fn run(&mut self, tx: &watch::Sender<ResolverState>) {
        loop {
            let (node, channel) = self.endpoints.current();
            let err = self.session(Grpc::new(channel), tx).await;
            if err.is_unavailable() {
                self.endpoints.failed(node);
            }
            self.cache.connected = false;
            self.cache.publish(tx);
            let delay = self.backoff.next_delay();
            tracing::warn!(service = %self.service, error = %err, retry_in = ?delay,
                "watch interrupted; serving last known instances");
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection's worth of watching; returns why it ended.
    async fn session(
        &mut self,
        mut grpc: Grpc<crate::endpoints::Transport>,
        tx: &watch::Sender<ResolverState>,
    ) -> Error {
        if !self.cache.synced {
            let request = pb::ResolveRequest {
                service: self.service.clone(),
                selector: self.selector.clone(),
                include_lease_ttl: false,
            };
            let resp = match with_timeout(grpc.resolve(request)).await {
                Ok(resp) => resp.into_inner(),
                Err(e) => return e,
            };
            self.cache
                .replace(resp.instances, ServerInfo::from(resp.server));
            self.cache.known = Some(resp.service_known || !self.cache.live.is_empty());
            self.cache.revision = resp.revision;
            self.cache.synced = true;
        }
        let request = pb::WatchRequest {
            service: self.service.clone(),
            start_revision: self.cache.revision + 1,
            selector: self.selector.clone(),
            epoch: self.cache.epoch,
            progress_interval_ms: PROGRESS_INTERVAL.as_millis() as u64,
        };
        let mut stream = match with_timeout(grpc.watch(request)).await {
            Ok(resp) => resp.into_inner(),
            Err(e) => return e,
        };
        self.cache.connected = true;
        self.cache.publish(tx);
        let mut snapshot: Vec<pb::Instance> = Vec::new();
        loop {
            let hold_until = self.cache.hold_until;
            let msg = tokio::select! {
                msg = tokio::time::timeout(IDLE_TIMEOUT, stream.message()) => msg,
                () = sleep_until_opt(hold_until) => {
                    tracing::info!(service = %self.service, "registry warm-up over; dropping instances that did not come back");
                    self.cache.end_hold();
                    self.cache.publish(tx);
                    continue;
                }
            };
            let msg = match msg {
                Err(_) => {
                    return Error::Unavailable(tonic::Status::deadline_exceeded(
                        "watch stream silent for too long",
                    ));
                }
                Ok(Err(status)) => return Error::from(status),
                Ok(Ok(None)) => {
                    return Error::Unavailable(tonic::Status::unavailable("watch stream ended"));
                }
                Ok(Ok(Some(msg))) => msg,
            };
            self.backoff.reset();
            match msg.kind {
                Some(pb::watch_response::Kind::Snapshot(mut s)) => {
                    snapshot.append(&mut s.instances);
                    if s.more {
                        continue;
                    }
                    if s.reset {
                        tracing::info!(service = %self.service, reason = ?s.reason(), "watch reset; replacing cache");
                    }
                    self.cache
                        .replace(std::mem::take(&mut snapshot), ServerInfo::from(s.server));
                    self.cache.revision = s.revision;
                }
                Some(pb::watch_response::Kind::Events(batch)) => {
                    for event in batch.events {
                        self.cache.apply(event);
                    }
                }
                Some(pb::watch_response::Kind::Progress(p)) => {
                    self.cache.revision = self.cache.revision.max(p.revision);
                    let server = ServerInfo::from(p.server);
                    if !server.warming_up && !self.cache.held.is_empty() {
                        self.cache.end_hold();
                    }
                }
                None => {}
            }
            self.cache.publish(tx);
        }
    }
}

async fn with_timeout<T>(fut: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, Error> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::Unavailable(tonic::Status::deadline_exceeded(
            "no answer from the registry in time",
        ))),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> pb::Instance {
        pb::Instance {
            service: "prod".into(),
            id: id.into(),
            address: format!("127.0.0.1:{}", 1000 + id.len()),
            ..Default::default()
        }
    }

    fn put(id: &str, revision: u64) -> pb::Event {
        pb::Event {
            r#type: pb::EventType::Put as i32,
            revision,
            instance: Some(inst(id)),
            reason: 0,
        }
    }

    fn delete(id: &str, revision: u64) -> pb::Event {
        pb::Event {
            r#type: pb::EventType::Delete as i32,
            revision,
            instance: Some(inst(id)),
            reason: pb::DeleteReason::Deregistered as i32,
        }
    }

    fn ids(cache: &Cache) -> Vec<String> {
        cache.view().into_keys().collect()
    }

    fn warm(epoch: u64) -> ServerInfo {
        ServerInfo {
            epoch,
            lease_epoch: epoch,
            warming_up: true,
            warmup_remaining: Duration::from_secs(2),
            stale: false,
        }
    }

    fn cold(epoch: u64) -> ServerInfo {
        ServerInfo {
            epoch,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_put_replace_and_delete() {
        let mut c = Cache::default();
        c.replace(vec![inst("a")], cold(1));
        c.apply(put("b", 2));
        c.apply(put("a", 3));
        assert_eq!(ids(&c), ["a", "b"]);
        c.apply(delete("a", 4));
        assert_eq!(ids(&c), ["b"]);
        assert_eq!(c.revision, 4);
        assert_eq!(c.known, Some(true));
    }

    #[tokio::test]
    async fn empty_snapshot_during_warmup_keeps_last_known_good() {
        let mut c = Cache::default();
        c.replace(vec![inst("a"), inst("b")], cold(1));
        // Registry restarted: reset snapshot of the new epoch is empty.
        c.replace(vec![], warm(2));
        assert_eq!(ids(&c), ["a", "b"]);
        assert!(c.hold_until.is_some());
        assert_eq!(c.epoch, 2);
        // One comes back under the new epoch, one is explicitly deleted.
        c.apply(put("a", 1));
        assert_eq!(ids(&c), ["a", "b"]);
        c.apply(delete("b", 2));
        assert_eq!(ids(&c), ["a"]);
        assert!(c.held.is_empty());
    }

    #[tokio::test]
    async fn held_entries_go_when_warmup_ends() {
        let mut c = Cache::default();
        c.replace(vec![inst("a"), inst("b")], cold(1));
        c.replace(vec![inst("a")], warm(2));
        assert_eq!(ids(&c), ["a", "b"]);
        c.end_hold();
        assert_eq!(ids(&c), ["a"]);
    }

    #[tokio::test]
    async fn empty_snapshot_after_warmup_empties_the_cache() {
        let mut c = Cache::default();
        c.replace(vec![inst("a")], cold(1));
        c.replace(vec![], cold(2));
        assert!(ids(&c).is_empty());
        // Still known: the name had instances.
        assert_eq!(c.known, Some(true));
    }

    #[tokio::test]
    async fn publish_wakes_only_on_meaningful_changes() {
        let (tx, mut rx) = watch::channel(ResolverState::pending());
        let mut c = Cache {
            known: Some(false),
            connected: true,
            ..Default::default()
        };
        c.publish(&tx);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().status, ServiceStatus::Unknown);
        c.revision = 7;
        c.publish(&tx);
        assert!(!rx.has_changed().unwrap(), "a bare revision bump is silent");
        assert_eq!(rx.borrow().revision, 7);
        c.apply(put("a", 8));
        c.publish(&tx);
        assert!(rx.has_changed().unwrap());
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.status, ServiceStatus::Known);
        assert_eq!(s.instances.len(), 1);
    }
}
