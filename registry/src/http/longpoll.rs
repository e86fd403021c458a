//! Long-poll waiters (`?wait=30s&after_revision=N`): a request held until
//! its service changes at a revision above N.
//!
//! One *hub* per polled service: a catalog watcher of that service (opened
//! through the catalog's watch and read with [`crate::watch::stream`], so
//! it has the gRPC Watch's guarantees) that publishes the highest revision
//! at which the service changed in a `tokio::sync::watch` channel. Every
//! waiter of the service subscribes to that channel. The catalog fans a
//! change out only to the watchers of its own service, so a change wakes
//! exactly the waiters of that service: no scan over waiters, no wake-up of
//! anyone else. Watching all services (`/v1/services`) is one more hub.
//!
//! A hub is opened at `after_revision + 1` of the waiter that needs it, so
//! it replays from the catalog history whatever changed since that waiter's
//! answer. It then serves every waiter whose `after_revision` is at least
//! its start; one holding an older revision gets a private hub from its own
//! revision (the same code, not shared), so no waiter can miss a change. A
//! history that no longer reaches back that far answers with a reset
//! snapshot, which counts as a change: the waiter is answered at once. A
//! shared hub outlives its last waiter by [`LINGER`], so the usual client
//! loop (answer, poll again) finds it open.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use parking_lot::Mutex;
use registry_api::v1::watch_response::Kind;
use tokio::{sync::watch, time::Instant};

use crate::{catalog::WatchFilter, core::Registry, error::Result, watch::WatchFrame};

/// Longest `wait` accepted: as Consul's blocking queries, long enough that a
/// poller costs a request every few minutes, short enough that a lost client
/// frees its request in bounded time.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// How long a shared hub outlives its last waiter: a client re-polls within
/// milliseconds of an answer, and a hub reopened from history costs a replay.
pub const LINGER: Duration = Duration::from_secs(30);

/// Hubs need no progress messages: a quiet service simply wakes nobody.
const HUB_PROGRESS: Duration = Duration::from_secs(24 * 3600);

/// The long-poll hubs of one registry.
#[derive(Debug)]
pub struct Waiters {
    registry: Registry,
    hubs: Mutex<HashMap<Option<Arc<str>>, Arc<Hub>>>,
}

/// One watcher of a view (a service, or `None` for all) and the highest
/// revision it has seen a change at.
#[derive(Debug)]
struct Hub {
    changed: watch::Sender<u64>,
    /// Every change at a revision `>= from` reaches this hub.
    from: u64,
}

impl Waiters {
    /// No hubs yet.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            registry,
            hubs: Mutex::new(HashMap::new()),
        })
    }

    /// Waits until `service` (all services with `None`) changes at a
    /// revision above `after`, for at most `wait` or until the registry
    /// shuts down. Returns whether it changed. The caller has checked the
    /// name and the caller's permission.
    pub async fn wait(
        self: &Arc<Self>,
        service: Option<Arc<str>>,
        after: u64,
        wait: Duration,
    ) -> Result<bool> {
        let mut rx = self.subscribe(service, after)?;
        let shutdown = self.registry.shutdown_token().clone();
        tokio::select! {
            r = tokio::time::timeout(wait, rx.wait_for(|&rev| rev > after)) => {
                Ok(matches!(r, Ok(Ok(_))))
            }
            _ = shutdown.cancelled() => Ok(false),
        }
    }

    /// Live hubs (shared ones), for tests and status.
    pub fn hubs(&self) -> usize {
        self.hubs.lock().len()
    }

    fn subscribe(
        self: &Arc<Self>,
        service: Option<Arc<str>>,
        after: u64,
    ) -> Result<watch::Receiver<u64>> {
        let from = after.saturating_add(1);
        // Held while a hub opens, so two first waiters of a service share
        // one hub; opening takes the catalog's writer lock briefly, and
        // nothing that holds that lock calls back in here.
        let mut hubs = self.hubs.lock();
        if let Some(hub) = hubs.get(&service)
            && hub.from <= from
        {
            return Ok(hub.changed.subscribe());
        }
        let shared = !hubs.contains_key(&service);
        // Every change of the service wakes its waiters, served or not (a
        // `health=any` read sees changes of critical instances too).
        let filter = WatchFilter {
            service: service.clone(),
            include_not_serving: true,
            ..WatchFilter::default()
        };
        let (handle, start) = self.registry.catalog().watch(filter, from, true, None)?;
        let stream = crate::watch::stream(self.registry.clone(), handle, start, HUB_PROGRESS);
        let (tx, rx) = watch::channel(0);
        let hub = Arc::new(Hub { changed: tx, from });
        if shared {
            hubs.insert(service.clone(), hub.clone());
        }
        drop(hubs);
        tokio::spawn(self.clone().run_hub(service, hub, shared, stream));
        Ok(rx)
    }

    /// Feeds a hub from its watch stream until the registry shuts down or
    /// the hub has had no waiter for [`LINGER`] (private hubs: at once).
    async fn run_hub(
        self: Arc<Self>,
        key: Option<Arc<str>>,
        hub: Arc<Hub>,
        shared: bool,
        stream: impl futures::Stream<Item = Result<WatchFrame, tonic::Status>> + Send,
    ) {
        let mut stream = std::pin::pin!(stream);
        let mut idle_until: Option<Instant> = None;
        loop {
            let idle = hub.changed.receiver_count() == 0;
            if !idle {
                idle_until = None;
            } else if idle_until.is_none() {
                if !shared {
                    break;
                }
                idle_until = Some(Instant::now() + LINGER);
            }
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(frame)) => {
                        if let Some(rev) = change_revision(&frame) {
                            hub.changed.send_if_modified(|cur| {
                                let newer = rev > *cur;
                                if newer {
                                    *cur = rev;
                                }
                                newer
                            });
                        }
                    }
                    // Shutdown (UNAVAILABLE) or the catalog let go.
                    _ => break,
                },
                _ = hub.changed.closed(), if !idle => {}
                _ = tokio::time::sleep_until(idle_until.unwrap_or_else(Instant::now)), if idle => {
                    // Subscriptions happen under the map lock: none can slip
                    // in between this check and the removal.
                    let mut hubs = self.hubs.lock();
                    if hub.changed.receiver_count() == 0 {
                        if hubs.get(&key).is_some_and(|h| Arc::ptr_eq(h, &hub)) {
                            hubs.remove(&key);
                        }
                        return;
                    }
                }
            }
        }
        if shared {
            let mut hubs = self.hubs.lock();
            if hubs.get(&key).is_some_and(|h| Arc::ptr_eq(h, &hub)) {
                hubs.remove(&key);
            }
        }
    }
}

/// The revision a watch message says the view changed at: the last event
/// of a batch, or a reset snapshot (whatever happened, it is a change).
fn change_revision(frame: &WatchFrame) -> Option<u64> {
    match frame.to_response().ok()?.kind? {
        Kind::Events(batch) => batch.events.iter().map(|e| e.revision).max(),
        Kind::Snapshot(s) if !s.more => Some(s.revision),
        Kind::Snapshot(_) | Kind::Progress(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use registry_api::v1::{Instance, RegisterRequest};

    /// Memory-mode writes complete without waiting: block on them in place.
    fn register(r: &Registry, service: &str, id: &str) -> u64 {
        let req = RegisterRequest {
            instance: Some(Instance {
                service: service.into(),
                id: id.into(),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            }),
            ttl_ms: 10_000,
            lease_id: 0,
        };
        futures::executor::block_on(r.register(req, None))
            .unwrap()
            .revision
    }

    #[tokio::test]
    async fn waiter_wakes_for_its_own_service_only() {
        let r = Registry::new(Config::default());
        let rev = register(&r, "a", "1");
        let waiters = Waiters::new(r.clone());
        let w = waiters.clone();
        let waiting =
            tokio::spawn(
                async move { w.wait(Some("a".into()), rev, Duration::from_secs(10)).await },
            );
        // Wait until the waiter's hub is open, then change another service.
        while waiters.hubs() == 0 {
            tokio::task::yield_now().await;
        }
        register(&r, "b", "1");
        let other = waiters
            .wait(Some("a".into()), rev, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!other, "a change of b must not wake a waiter of a");
        assert!(!waiting.is_finished());
        register(&r, "a", "2");
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("waiter of a woke")
            .unwrap()
            .unwrap();
        assert!(woke);
    }

    #[tokio::test]
    async fn changes_before_a_hub_opened_are_replayed_exactly() {
        let r = Registry::new(Config::default());
        let rev1 = register(&r, "a", "1");
        let rev2 = register(&r, "a", "2");
        let rev3 = register(&r, "b", "1");
        let waiters = Waiters::new(r.clone());
        // An up-to-date waiter opens the shared hub of a at rev3 + 1.
        let w = waiters.clone();
        let _current = tokio::spawn(async move {
            w.wait(Some("a".into()), rev3, Duration::from_secs(10))
                .await
        });
        while waiters.hubs() == 0 {
            tokio::task::yield_now().await;
        }
        // Older revisions get private hubs replaying from their own: a
        // changed after rev1 (at rev2), but not after rev2 (rev3 is b's).
        let after_rev1 = waiters
            .wait(Some("a".into()), rev1, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(after_rev1, "a changed at {rev2}, after {rev1}");
        let after_rev2 = waiters
            .wait(Some("a".into()), rev2, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!after_rev2, "nothing in a changed after {rev2}");
        assert_eq!(waiters.hubs(), 1, "private hubs are not shared");
    }
}
