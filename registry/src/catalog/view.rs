//! Watch snapshots at one revision, built off the write lock.
//!
//! A watcher's snapshot (at open, or after it fell behind) used to be
//! copied under the writer mutex: O(catalog) work that stalled every
//! Register, Deregister and expiry, and a copy of the view per watcher. Now:
//!
//! 1. Read the revision `r0`, then walk the watcher's services, taking each
//!    service's shared snapshot (the one Resolve uses; rebuilt at most once
//!    per change, pointers only). Each holds every change to its service up
//!    to `r0` and possibly some later whole transactions.
//! 2. Take the write lock for O(1) + O(batches committed during the walk):
//!    note the revision `r1`, copy the history batches after `r0`, and
//!    register or drain the watcher's queue, so everything after `r1`
//!    reaches it exactly once.
//! 3. Off the lock, patch each service whose snapshot is older than a
//!    copied batch touching it. The result is the view at exactly `r1`.
//!
//! A service changed during the walk gets a private patched copy of its
//! instance pointers; every other service is the shared snapshot itself, so
//! many watchers of a large catalog cost pointers, not copies. If the
//! history was compacted past `r0` during the walk (a burst of more than
//! the history's events), the walk is retried, and as a last resort done
//! under the lock.

use std::{collections::BTreeMap, sync::Arc};

use registry_api::v1::Instance;

use super::{Catalog, RevisionBatch, ServiceSnapshot, Stored, WatchFilter, WatcherHandle};
use crate::{
    catalog::EventKind,
    serving::{PanicThresholds, Served},
};

/// Walks retried before the last one is made under the write lock.
const LOCK_FREE_ATTEMPTS: usize = 3;

/// A watcher's view of the catalog at one revision: the services it covers,
/// in name order, each as its instances' encodings ordered by id.
#[derive(Debug, Clone, Default)]
pub struct CatalogView {
    revision: u64,
    services: Vec<ViewService>,
}

/// One service of a [`CatalogView`].
#[derive(Debug, Clone)]
pub enum ViewService {
    /// The service's shared snapshot, exact at the view's revision.
    Shared(Arc<ServiceSnapshot>),
    /// A private copy patched with changes made during the walk, and its
    /// served set (computed with the copy: this path is rare).
    Patched(Arc<Vec<Arc<[u8]>>>, Arc<Served>),
}

impl ViewService {
    /// The encoded instances, ordered by id.
    pub fn encoded(&self) -> Box<dyn Iterator<Item = &[u8]> + '_> {
        match self {
            ViewService::Shared(s) => Box::new(s.entries().iter().map(|(_, b)| &**b)),
            ViewService::Patched(v, _) => Box::new(v.iter().map(|b| &**b)),
        }
    }

    /// The encoding of the `i`th instance.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        match self {
            ViewService::Shared(s) => s.entries().get(i).map(|(_, b)| &**b),
            ViewService::Patched(v, _) => v.get(i).map(|b| &**b),
        }
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        match self {
            ViewService::Shared(s) => s.len(),
            ViewService::Patched(v, _) => v.len(),
        }
    }

    /// Which instances are served by default (see [`crate::serving`]).
    pub fn served(&self) -> &Served {
        match self {
            ViewService::Shared(s) => s.served(),
            ViewService::Patched(_, served) => served,
        }
    }

    /// Whether the service has no instances in this view.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CatalogView {
    /// The revision the view is exact at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The services of the view (with instances or not), in name order.
    pub fn services(&self) -> &[ViewService] {
        &self.services
    }

    /// Every instance, decoded (for in-process readers and tests; the watch
    /// stream sends the encodings as they are).
    pub fn instances(&self) -> Vec<Instance> {
        self.services
            .iter()
            .flat_map(|s| s.encoded().map(super::decode).collect::<Vec<_>>())
            .collect()
    }

    /// Number of instances in the view (before any selector).
    pub fn len(&self) -> usize {
        self.services.iter().map(ViewService::len).sum()
    }

    /// Whether the view holds no instance.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Catalog {
    /// The view of a registered watcher's filter at one revision, with its
    /// queue drained so that its next batch is the first one after the
    /// view (see the module docs). Never holds the write lock for work
    /// proportional to the catalog, except as the last of
    /// [`LOCK_FREE_ATTEMPTS`] + 1 tries.
    pub(super) fn view_for(&self, handle: &mut WatcherHandle) -> CatalogView {
        let filter = handle.filter.clone();
        for _ in 0..LOCK_FREE_ATTEMPTS {
            let r0 = self.revision();
            let walked = self.walk(&filter);
            let writer = self.writer.lock();
            if writer.compacted > r0 {
                // Batches the walk may depend on are gone; walk again.
                continue;
            }
            let r1 = self.revision();
            let from = writer.history.partition_point(|b| b.revision <= r0);
            let batches: Vec<Arc<RevisionBatch>> = writer.history.range(from..).cloned().collect();
            drain(handle);
            drop(writer);
            return patch(&filter, r1, walked, &batches, &self.config.panic);
        }
        let writer = self.writer.lock();
        let walked = self.walk(&filter);
        let r1 = self.revision();
        drain(handle);
        drop(writer);
        patch(&filter, r1, walked, &[], &self.config.panic)
    }

    /// The shared snapshots of the services the filter covers, by name.
    fn walk(&self, filter: &WatchFilter) -> BTreeMap<Arc<str>, Option<Arc<ServiceSnapshot>>> {
        let mut out = BTreeMap::new();
        match &filter.service {
            Some(s) => {
                if filter.covers(s) {
                    out.insert(s.clone(), self.service_snapshot(s));
                }
            }
            None => {
                // The published listing (at or after the revision read by
                // the caller) names every service that existed then.
                let listing = self.listing();
                for name in listing.services.keys() {
                    if filter.covers(name) {
                        out.insert(name.clone(), self.service_snapshot(name));
                    }
                }
            }
        }
        out
    }
}

/// Empties a watcher's queue and clears its overflow flag; the caller holds
/// the write lock, so nothing is in flight.
pub(super) fn drain(handle: &mut WatcherHandle) {
    while handle.rx.try_recv().is_ok() {}
    handle
        .overflowed
        .store(super::RESET_NONE, std::sync::atomic::Ordering::Release);
}

/// A service's instances being patched: id -> encoding.
type Patch = BTreeMap<Arc<str>, Arc<[u8]>>;

/// Brings walked snapshots to revision `r1` with the batches committed
/// since the walk began.
fn patch(
    filter: &WatchFilter,
    r1: u64,
    mut walked: BTreeMap<Arc<str>, Option<Arc<ServiceSnapshot>>>,
    batches: &[Arc<RevisionBatch>],
    panic: &PanicThresholds,
) -> CatalogView {
    let mut patched: BTreeMap<Arc<str>, Patch> = BTreeMap::new();
    for batch in batches.iter().filter(|b| b.revision <= r1) {
        for ev in &batch.events {
            let service = ev.instance.service.as_str();
            if !filter.covers(service) {
                continue;
            }
            let base = walked.get(service).cloned().flatten();
            if base.as_ref().is_some_and(|s| s.revision >= batch.revision) {
                continue; // already in the snapshot
            }
            let name: Arc<str> = walked
                .get_key_value(service)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| service.into());
            let map = patched.entry(name.clone()).or_insert_with(|| {
                base.iter()
                    .flat_map(|s| s.entries().iter().cloned())
                    .collect()
            });
            walked.entry(name).or_insert(None);
            match &ev.kind {
                EventKind::Put { .. } => {
                    map.insert(
                        ev.instance.id.as_str().into(),
                        Stored::encode(&ev.instance).encoded,
                    );
                }
                EventKind::Delete(_) => {
                    map.remove(ev.instance.id.as_str());
                }
            }
        }
    }
    let services = walked
        .into_iter()
        .filter_map(|(name, snap)| match patched.remove(&name) {
            Some(map) => {
                let entries: Vec<Arc<[u8]>> = map.into_values().collect();
                let served =
                    Served::of_encoded(entries.iter().map(|b| &**b), panic.for_service(&name));
                Some(ViewService::Patched(Arc::new(entries), Arc::new(served)))
            }
            None => snap.map(ViewService::Shared),
        })
        .collect();
    CatalogView {
        revision: r1,
        services,
    }
}
