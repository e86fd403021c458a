//! [`Resolver`]: a live cache of one service's instances, fed by a
//! [`crate::Watch`] session.
//!
//! The task behind it consumes the same watch session as
//! [`crate::RegistryClient::watch`]: a snapshot first, then events, resumed
//! with `start_revision = last seen + 1` after a break so a short outage
//! costs no snapshot; when the registry cannot replay (it restarted, or
//! compacted its history) it sends a reset snapshot and the cache is
//! replaced rather than merged.
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

use std::{collections::BTreeMap, sync::Arc};

use tokio::{sync::watch, time::Instant};
use tokio_stream::wrappers::WatchStream;

use crate::{
    Error, Instance, Query, RegistryClient, ServerInfo, WatchEvent, WatchOptions,
    balance::ChannelBuilder, watch::Session,
};

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
    /// True while the registry that answered last is still warming up after
    /// a start: an empty or unknown answer may not be final yet.
    pub warming_up: bool,
    /// True while `instances` includes entries kept from before a registry
    /// restart that have not re-registered yet (see the module docs).
    pub holding_stale: bool,
    /// Why the watch is not connected (last failure), or why it stopped for
    /// good (a refused name or permission).
    pub error: Option<String>,
    /// True when the registry refused the watch itself (invalid name, no
    /// permission): it will not be retried.
    pub failed: bool,
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
            warming_up: false,
            holding_stale: false,
            error: None,
            failed: false,
            revision: 0,
            epoch: 0,
        }
    }
}

/// A live cache of one service's instances, kept current by a background
/// watch. Cloning is cheap; clones share the task.
///
/// The task runs while any clone of this resolver, or any receiver obtained
/// from [`Resolver::subscribe`] / [`Resolver::updates`], is alive, and stops
/// when the last one is dropped.
#[derive(Debug, Clone)]
pub struct Resolver {
    query: Arc<Query>,
    zone: Option<String>,
    rx: watch::Receiver<ResolverState>,
}

impl Resolver {
    /// The watched service name.
    pub fn service(&self) -> &str {
        &self.query.service
    }

    /// The watched service and selector.
    pub fn query(&self) -> &Query {
        &self.query
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
            .wait_for(|s| s.status != ServiceStatus::Pending || s.failed)
            .await
            .map_err(|_| Error::Closed)?;
        Ok(state.clone())
    }

    /// A balanced channel over this resolver's instances (shared with its
    /// other users), with the zone of the client that made it. See
    /// [`ChannelBuilder`].
    pub fn channel(&self) -> ChannelBuilder {
        ChannelBuilder::new(self.clone(), self.zone.clone())
    }
}

/// Starts the watch task of a new resolver.
pub(crate) fn spawn(client: RegistryClient, query: Query) -> Resolver {
    let (tx, rx) = watch::channel(ResolverState::pending());
    let session = Session::new(
        client.endpoints().clone(),
        query.clone(),
        WatchOptions::default(),
    );
    let service = query.service.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tx.closed() => {}
            () = run(session, &service, &tx) => {}
        }
        tracing::debug!(%service, "resolver dropped, watch task finished");
    });
    Resolver {
        query: Arc::new(query),
        zone: client.zone().map(str::to_owned),
        rx,
    }
}

/// Feeds the cache from the watch until the session fails for good (then
/// keeps the last view published until the resolver is dropped).
async fn run(mut session: Session, service: &str, tx: &watch::Sender<ResolverState>) {
    let mut cache = Cache::default();
    loop {
        let timer = match (cache.hold_until, cache.warm_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let batch = tokio::select! {
            batch = session.next_batch() => batch,
            () = sleep_until_opt(timer) => {
                let now = Instant::now();
                if cache.warm_until.is_some_and(|at| at <= now) {
                    // The registry said when its warm-up ends; no need to
                    // wait for its next progress message to believe it.
                    cache.warm_until = None;
                    cache.warming_up = false;
                }
                if cache.hold_until.is_some_and(|at| at <= now) {
                    tracing::info!(%service, "registry warm-up over; dropping instances that did not come back");
                    cache.end_hold();
                }
                cache.publish(tx);
                continue;
            }
        };
        match batch {
            Some(Ok(events)) => {
                cache.connected = true;
                cache.error = None;
                for event in events {
                    cache.apply(event);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(%service, error = %e, "resolver watch refused; not retrying");
                cache.connected = false;
                cache.failed = true;
                cache.error = Some(e.to_string());
                cache.publish(tx);
                return std::future::pending().await;
            }
            None => return std::future::pending().await,
        }
        cache.publish(tx);
    }
}

/// The resolver's model of the service.
#[derive(Debug, Default)]
struct Cache {
    /// The registry's view, by id.
    live: BTreeMap<String, Instance>,
    /// Last-known-good entries kept through a warm-up, by id.
    held: BTreeMap<String, Instance>,
    hold_until: Option<Instant>,
    /// When the registry's warm-up window ends, as it announced.
    warm_until: Option<Instant>,
    known: Option<bool>,
    revision: u64,
    epoch: u64,
    connected: bool,
    warming_up: bool,
    error: Option<String>,
    failed: bool,
}

impl Cache {
    fn view(&self) -> BTreeMap<String, Instance> {
        let mut all = self.held.clone();
        all.extend(self.live.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot(snapshot) => {
                if let Some(reason) = snapshot.reset {
                    tracing::info!(reason = reason.as_str(), "watch reset; replacing cache");
                }
                self.replace(snapshot.instances, snapshot.server);
                self.revision = snapshot.revision;
                self.known = Some(snapshot.service_known || !self.live.is_empty());
            }
            WatchEvent::Put { revision, instance } => {
                self.revision = self.revision.max(revision);
                // Whatever happens to an id in the new life supersedes the
                // old copy.
                self.held.remove(&instance.id);
                self.known = Some(true);
                self.live.insert(instance.id.clone(), instance);
            }
            WatchEvent::Delete {
                revision, instance, ..
            } => {
                self.revision = self.revision.max(revision);
                self.held.remove(&instance.id);
                self.live.remove(&instance.id);
            }
            WatchEvent::Progress { revision, server } => {
                self.revision = self.revision.max(revision);
                self.set_warming(server);
                if !server.warming_up && !self.held.is_empty() {
                    self.end_hold();
                }
            }
            WatchEvent::Interrupted { error, retry_in } => {
                tracing::warn!(error = %error, ?retry_in,
                    "watch interrupted; serving last known instances");
                self.connected = false;
                self.error = Some(error.to_string());
            }
        }
    }

    /// Replaces the view with a full answer (a snapshot).
    fn replace(&mut self, instances: Vec<Instance>, server: ServerInfo) {
        let previous = self.view();
        self.live = instances.into_iter().map(|i| (i.id.clone(), i)).collect();
        self.held.clear();
        self.hold_until = None;
        self.set_warming(server);
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
        if server.epoch != 0 {
            self.epoch = server.epoch;
        }
    }

    fn set_warming(&mut self, server: ServerInfo) {
        self.warming_up = server.warming_up;
        self.warm_until = server
            .warming_up
            .then(|| Instant::now() + server.warmup_remaining);
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
            // A restarted registry that has not heard from the service yet
            // during its warm-up: the instances held meanwhile are the
            // service, so it is still known.
            Some(false) if !self.held.is_empty() => ServiceStatus::Known,
            Some(false) => ServiceStatus::Unknown,
            Some(true) => ServiceStatus::Known,
        };
        tx.send_if_modified(|state| {
            let changed = state.instances != instances
                || state.status != status
                || state.connected != self.connected
                || state.warming_up != self.warming_up
                || state.holding_stale == self.held.is_empty()
                || state.error != self.error
                || state.failed != self.failed;
            state.revision = self.revision;
            state.epoch = self.epoch;
            if changed {
                state.instances = instances;
                state.status = status;
                state.connected = self.connected;
                state.warming_up = self.warming_up;
                state.holding_stale = !self.held.is_empty();
                state.error = self.error.clone();
                state.failed = self.failed;
            }
            changed
        });
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

    use std::time::Duration;

    use crate::DeleteReason;

    fn inst(id: &str) -> Instance {
        Instance::new("prod", format!("127.0.0.1:{}", 1000 + id.len())).with_id(id)
    }

    fn put(id: &str, revision: u64) -> WatchEvent {
        WatchEvent::Put {
            revision,
            instance: inst(id),
        }
    }

    fn delete(id: &str, revision: u64) -> WatchEvent {
        WatchEvent::Delete {
            revision,
            instance: inst(id),
            reason: DeleteReason::Deregistered,
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
        let snapshot = |instances: Vec<Instance>, known: bool, epoch: u64| {
            WatchEvent::Snapshot(crate::Snapshot {
                revision: 1,
                instances,
                reset: None,
                service_known: known,
                server: cold(epoch),
            })
        };
        let mut c = Cache::default();
        c.apply(snapshot(vec![inst("a")], true, 1));
        assert_eq!(c.known, Some(true));
        c.apply(snapshot(vec![], true, 2));
        assert!(ids(&c).is_empty());
        assert_eq!(c.known, Some(true), "known, with zero instances");
        // A registry life that never saw the name says so.
        c.apply(snapshot(vec![], false, 3));
        assert_eq!(c.known, Some(false));
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
