//! The catalog: instances by service, the revision counter, the event history
//! and the set of watchers that changes fan out to.
//!
//! Every answer the catalog gives reflects one whole revision of what it
//! covers. The design, and why each part is there:
//! - **Writes** (register, deregister, expiry, restore, an etcd revision)
//!   are serialised by one mutex, the [`Txn`]. A transaction stages puts and
//!   deletes and commits them as one revision. The commit applies all of a
//!   service's staged changes under that service's lock in one go, so a
//!   reader of one service sees a transaction entirely or not at all, even
//!   when the transaction spans several services (a lease with instances in
//!   many). Then the [`RevisionBatch`] goes to the history and, with a
//!   non-blocking `try_send`, to each interested watcher; then the service
//!   [`Listing`] and finally the revision are published.
//! - **Resolve** never takes the write lock. Each service keeps a snapshot
//!   (its encoded instances, ordered by id) that a commit invalidates and the
//!   first reader afterwards rebuilds under the service's own lock. A burst
//!   of registrations into one service therefore costs O(log n) each, not a
//!   snapshot copy each, and steady-state Resolve is lock-free. A snapshot
//!   taken after reading the global revision `G` holds every change to its
//!   service up to `G`, and nothing newer than its own revision, so the
//!   answer is exact at `max(G, snapshot.revision)`.
//! - **ListServices and Status** read the [`Listing`]: names and counts as a
//!   persistent map (`imbl`), rebuilt by path copying per commit and
//!   published whole, so a listing is one revision without any reader
//!   walking live state.
//! - **Watch snapshots** are built off the write lock from the same
//!   per-service snapshots Resolve shares (see [`view`]): walk the services,
//!   then take the lock only to note the revision, copy the few history
//!   batches committed during the walk, and register (or drain) the
//!   watcher's queue. The batches patch the services that changed meanwhile,
//!   which turns the walk into a snapshot at exactly that revision.
//! - Instances rest encoded (one shared allocation each); they are decoded
//!   only for events, filtered reads and xDS, and lazily per snapshot.
//! - **Served sets** (issue 17, see [`crate::serving`]): each service counts
//!   its active and serving instances, so a commit knows whether it moved
//!   the service in or out of panic mode. It marks every event with whether
//!   its instance was served before and after the revision, and a commit
//!   that flips panic mode lists the untouched critical instances whose
//!   membership flipped with it ([`PanicFlip`]). A serving-only watcher's
//!   events are derived from exactly that, so its state equals the default
//!   Resolve at every revision. Snapshots compute their served set lazily.

mod view;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use registry_api::v1::{DeleteReason, Instance, ResetReason};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    error::{Error, Result},
    serving::{self, Class, Counts, PanicThresholds, Served, Threshold},
};

pub use view::{CatalogView, ViewService};

/// Identifies an instance: service name plus id, both shared strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    /// Service name.
    pub service: Arc<str>,
    /// Instance id within the service.
    pub id: Arc<str>,
}

impl InstanceKey {
    /// Key of an instance.
    pub fn of(instance: &Instance) -> Self {
        Self {
            service: instance.service.as_str().into(),
            id: instance.id.as_str().into(),
        }
    }
}

/// What happened to one instance in a revision.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// New or replaced instance.
    Put {
        /// The instance it replaced, if any (watchers with a selector need it
        /// to turn a no-longer-matching replacement into a DELETE).
        prev: Option<Arc<Instance>>,
    },
    /// Instance removed, and why.
    Delete(DeleteReason),
}

/// One change to one instance.
#[derive(Debug, Clone)]
pub struct CatalogEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// For a put the new instance, for a delete the removed one.
    pub instance: Arc<Instance>,
    /// Whether the instance this event replaces or removes (a put's `prev`,
    /// a delete's instance) was in its service's served set just before
    /// this revision (false for a put without `prev`).
    pub served_before: bool,
    /// Whether a put's instance is in the served set at this revision
    /// (false for a delete).
    pub served_after: bool,
}

impl CatalogEvent {
    /// An event outside any catalog (tests, benches): every instance
    /// involved is served.
    #[doc(hidden)]
    pub fn all_served(kind: EventKind, instance: Arc<Instance>) -> Self {
        let served_before = match &kind {
            EventKind::Put { prev } => prev.is_some(),
            EventKind::Delete(_) => true,
        };
        let served_after = matches!(kind, EventKind::Put { .. });
        Self {
            kind,
            instance,
            served_before,
            served_after,
        }
    }
}

/// A revision that moved a service in or out of panic mode: its critical
/// instances that this revision did not otherwise touch entered (or left)
/// the served set with it. Serving-only watchers see them as PUTs (or
/// DELETEs with reason `NOT_SERVING`).
#[derive(Debug, Clone)]
pub struct PanicFlip {
    /// The service.
    pub service: Arc<str>,
    /// Whether the service is in panic mode after the revision.
    pub panicked: bool,
    /// Its critical instances not changed by the revision, ordered by id.
    pub instances: Vec<Arc<Instance>>,
}

/// All the events of one revision, shared by the history and every watcher.
#[derive(Debug)]
pub struct RevisionBatch {
    /// The revision these events created.
    pub revision: u64,
    /// Events in the order they were applied (grouped by service).
    pub events: Vec<CatalogEvent>,
    /// Services this revision moved in or out of panic mode (usually none).
    pub panic_flips: Vec<PanicFlip>,
    /// Whether every event belongs to one service (the common case):
    /// watchers of that service without a selector see the whole batch. A
    /// flag rather than the name, so a history entry costs no string.
    single: bool,
    /// The whole batch encoded once as a `WatchResponse`, shared by every
    /// watcher that sees all of it (see `watch`).
    pub(crate) encoded: OnceLock<Bytes>,
    /// The same for serving-only watchers without a selector (`None`: they
    /// see nothing of it), with its event count.
    pub(crate) encoded_served: OnceLock<Option<(Bytes, usize)>>,
    at: Instant,
}

impl RevisionBatch {
    /// The one service all events belong to, if there is one.
    pub fn single_service(&self) -> Option<&str> {
        match self.events.first() {
            Some(e) if self.single => Some(e.instance.service.as_str()),
            _ => None,
        }
    }

    /// Whether a serving-only watcher sees exactly what a watcher of all
    /// instances sees: every put's instance is served, every deleted one
    /// was, and no service flipped panic mode. A put of an instance that
    /// was not served before is a PUT for both.
    pub fn serves_all(&self) -> bool {
        self.panic_flips.is_empty()
            && self.events.iter().all(|e| match e.kind {
                EventKind::Put { .. } => e.served_after,
                EventKind::Delete(_) => e.served_before,
            })
    }

    /// History weight: events plus the instances of panic flips.
    fn weight(&self) -> usize {
        self.events.len()
            + self
                .panic_flips
                .iter()
                .map(|f| f.instances.len())
                .sum::<usize>()
    }

    /// A batch outside any catalog, for unit tests of the watch encoding.
    #[doc(hidden)]
    pub fn for_test(revision: u64, events: Vec<CatalogEvent>) -> Self {
        let single = events
            .iter()
            .all(|e| e.instance.service == events[0].instance.service);
        Self {
            revision,
            events,
            panic_flips: Vec::new(),
            single,
            encoded: OnceLock::new(),
            encoded_served: OnceLock::new(),
            at: Instant::now(),
        }
    }
}

/// An instance as the catalog keeps it at rest: its protobuf encoding, in
/// one exact-size shared allocation. A decoded `Instance` with one metadata
/// label is ~560 bytes over six allocations; this is ~60-100 bytes over one,
/// which is what keeps a million instances within the memory budget. Shared
/// (`Arc`) so that snapshots, watch views and Resolve frames reference the
/// bytes instead of copying or decoding them. The lease id is kept beside
/// the bytes: register and deregister need only it.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    lease_id: u64,
    encoded: Arc<[u8]>,
}

impl Stored {
    fn encode(instance: &Instance) -> Self {
        use prost::Message;
        Stored {
            lease_id: instance.lease_id,
            encoded: instance.encode_to_vec().into(),
        }
    }

    fn decode(&self) -> Arc<Instance> {
        Arc::new(decode(&self.encoded))
    }
}

/// Decodes an instance encoding the catalog made itself (a stored
/// instance, a snapshot or view entry).
pub(crate) fn decode_instance(bytes: &[u8]) -> Instance {
    decode(bytes)
}

fn decode(bytes: &[u8]) -> Instance {
    use prost::Message;
    Instance::decode(bytes).expect("the catalog only stores encodings it made")
}

/// The instances of one service at one revision, shared by every reader
/// until the service changes.
#[derive(Debug)]
pub struct ServiceSnapshot {
    /// Revision of the service's last change.
    pub revision: u64,
    /// `(id, encoded Instance)` ordered by id.
    entries: Vec<(Arc<str>, Arc<[u8]>)>,
    /// Decoded on first use (filtered Resolve, xDS, in-process readers).
    decoded: OnceLock<Vec<Arc<Instance>>>,
    /// `ResolveResponse.instances` records, built on first use.
    resolve_records: OnceLock<Bytes>,
    /// The service's panic threshold and its counts at this revision.
    threshold: Threshold,
    counts: Counts,
    /// The served set, computed on first use.
    served: OnceLock<Served>,
    /// The served instances as Resolve records, built on first use.
    served_records: OnceLock<Bytes>,
}

impl ServiceSnapshot {
    fn new(
        revision: u64,
        entries: Vec<(Arc<str>, Arc<[u8]>)>,
        threshold: Threshold,
        counts: Counts,
    ) -> Self {
        Self {
            revision,
            entries,
            decoded: OnceLock::new(),
            resolve_records: OnceLock::new(),
            threshold,
            counts,
            served: OnceLock::new(),
            served_records: OnceLock::new(),
        }
    }

    /// Which instances are served by default, and whether the service is
    /// in panic mode (see [`crate::serving`]). When every instance is
    /// serving (the common case) nothing is scanned.
    pub fn served(&self) -> &Served {
        self.served.get_or_init(|| {
            if self.counts.serving == self.entries.len() {
                Served::all()
            } else {
                Served::of_encoded(self.entries.iter().map(|(_, b)| &**b), self.threshold)
            }
        })
    }

    /// The panic threshold of the service.
    pub fn threshold(&self) -> Threshold {
        self.threshold
    }

    /// The served instances as encoded Resolve records (the same buffer as
    /// [`ServiceSnapshot::encoded_instances`] when all are served).
    pub fn encoded_served(&self) -> Bytes {
        let served = self.served();
        if served.is_all() {
            return self.encoded_instances();
        }
        self.served_records
            .get_or_init(|| {
                crate::frame::records(
                    1,
                    self.entries
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| served.includes(*i))
                        .map(|(_, (_, b))| &**b),
                )
            })
            .clone()
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the service has no instance at this revision.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The instances, ordered by id (decoded once per snapshot).
    pub fn instances(&self) -> &[Arc<Instance>] {
        self.decoded.get_or_init(|| {
            self.entries
                .iter()
                .map(|(_, bytes)| Arc::new(decode(bytes)))
                .collect()
        })
    }

    /// The instances as encoded Resolve records, built on first use
    /// straight from the stored encodings (nothing decoded).
    pub fn encoded_instances(&self) -> Bytes {
        self.resolve_records
            .get_or_init(|| crate::frame::records(1, self.entries.iter().map(|(_, b)| &**b)))
            .clone()
    }

    /// `(id, encoded instance)` pairs, ordered by id.
    pub(crate) fn entries(&self) -> &[(Arc<str>, Arc<[u8]>)] {
        &self.entries
    }
}

#[derive(Debug, Default)]
struct ServiceState {
    instances: BTreeMap<Arc<str>, Stored>,
    /// Revision of the last change; 0 while the entry is new and its
    /// creating transaction has not committed (the service is not known yet).
    revision: u64,
    /// Active and serving instances, for panic mode.
    counts: Counts,
}

#[derive(Debug)]
struct ServiceEntry {
    state: Mutex<ServiceState>,
    /// `None` after a change until the next reader rebuilds it.
    snapshot: ArcSwapOption<ServiceSnapshot>,
    /// The service's panic threshold (fixed for the registry's life).
    threshold: Threshold,
}

impl ServiceEntry {
    fn new(threshold: Threshold) -> Self {
        Self {
            state: Mutex::new(ServiceState::default()),
            snapshot: ArcSwapOption::empty(),
            threshold,
        }
    }

    fn snapshot(&self) -> Arc<ServiceSnapshot> {
        if let Some(snap) = self.snapshot.load_full() {
            return snap;
        }
        // Rebuild and publish under the state lock, so a writer cannot slip
        // a change in between and have its invalidation overwritten. A
        // rebuild copies pointers only: O(n) reference bumps, no decoding.
        let state = self.state.lock();
        if let Some(snap) = self.snapshot.load_full() {
            return snap;
        }
        let snap = Arc::new(ServiceSnapshot::new(
            state.revision,
            state
                .instances
                .iter()
                .map(|(id, s)| (id.clone(), s.encoded.clone()))
                .collect(),
            self.threshold,
            state.counts,
        ));
        self.snapshot.store(Some(snap.clone()));
        snap
    }
}

/// Every known service with its instance count, at one revision. Published
/// whole by each commit; a reader holds it as long as it likes.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The revision this listing is exact at.
    pub revision: u64,
    /// Live instances across all services.
    pub instances: usize,
    /// Instance count per known service (including empty ones), by name.
    pub services: imbl::OrdMap<Arc<str>, usize>,
}

/// Limits and sizes of the catalog's history and watchers.
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// Events kept for watch resumption.
    pub history_events: usize,
    /// Age after which history is dropped.
    pub history_age: Duration,
    /// Cap on live watchers.
    pub max_watchers: usize,
    /// Cap on live watchers per connection.
    pub max_watchers_per_connection: usize,
    /// Batches buffered per watcher.
    pub watch_buffer: usize,
    /// Cap on known services.
    pub max_services: usize,
    /// Panic thresholds of the services (see [`crate::serving`]).
    pub panic: PanicThresholds,
}

/// A watcher's mailbox as the writer sees it.
#[derive(Debug)]
struct WatcherSlot {
    tx: mpsc::Sender<Arc<RevisionBatch>>,
    overflowed: Arc<AtomicU8>,
    service: Option<Arc<str>>,
    conn: Option<SocketAddr>,
    /// Counted in `stats.watchers` and the caps: false for the registry's
    /// own watchers (the health checker), which are not clients' streams.
    counted: bool,
}

#[derive(Debug, Default)]
struct Watchers {
    by_service: HashMap<Arc<str>, HashMap<u64, WatcherSlot>>,
    all: HashMap<u64, WatcherSlot>,
    per_conn: HashMap<SocketAddr, usize>,
    next_id: u64,
}

#[derive(Debug)]
struct Writer {
    history: VecDeque<Arc<RevisionBatch>>,
    history_len: usize,
    /// Highest revision dropped from the history: resuming at or below it
    /// is impossible.
    compacted: u64,
    watchers: Watchers,
    /// The writer's working copy of the listing; published on commit.
    listing: Listing,
}

/// Counters the catalog keeps for status and metrics.
#[derive(Debug, Default)]
pub struct CatalogStats {
    /// Live watchers.
    pub watchers: AtomicUsize,
    /// Reset snapshots sent to slow watchers.
    pub watcher_resets: AtomicU64,
}

/// The instance catalog. See the module docs for its locking design.
#[derive(Debug)]
pub struct Catalog {
    services: DashMap<Arc<str>, Arc<ServiceEntry>>,
    writer: Mutex<Writer>,
    revision: AtomicU64,
    listing: ArcSwap<Listing>,
    config: CatalogConfig,
    /// Counters for status and metrics.
    pub stats: CatalogStats,
}

/// How a new watcher starts.
#[derive(Debug)]
pub enum WatchStart {
    /// Send this view as a snapshot first.
    Snapshot {
        /// The watcher's view at one revision.
        view: CatalogView,
        /// Set when the watcher asked to resume but could not.
        reset: Option<ResetReason>,
    },
    /// Replay these batches (all revisions >= the requested start), then live.
    Replay(Vec<Arc<RevisionBatch>>),
}

/// What a watcher wants: one service or all, filtered by a selector.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    /// `None` watches every service.
    pub service: Option<Arc<str>>,
    /// `key=value` pairs an instance's metadata must all contain.
    pub selector: Vec<(String, String)>,
    /// With auth on, a watch-all by an identity that may not read every
    /// service: only the services it may read are in its view.
    pub reader: Option<Arc<crate::auth::Identity>>,
    /// Also instances that are not served (critical, draining, disabled);
    /// by default a watcher follows the served set (see `crate::watch`).
    pub include_not_serving: bool,
}

impl WatchFilter {
    /// Whether the service is in this watcher's view at all.
    pub fn covers(&self, service: &str) -> bool {
        if let Some(s) = &self.service
            && **s != *service
        {
            return false;
        }
        self.reader
            .as_ref()
            .is_none_or(|r| r.may(crate::auth::Action::Read, service))
    }

    /// Whether the instance is in this watcher's view.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.covers(&instance.service) && selector_matches(&self.selector, instance)
    }
}

/// True when the instance's metadata holds every pair of the selector.
pub fn selector_matches(selector: &[(String, String)], instance: &Instance) -> bool {
    selector
        .iter()
        .all(|(k, v)| instance.metadata.get(k).is_some_and(|m| m == v))
}

/// A live watcher's receiving end. Dropping it unregisters the watcher.
#[derive(Debug)]
pub struct WatcherHandle {
    id: u64,
    catalog: Arc<Catalog>,
    rx: mpsc::Receiver<Arc<RevisionBatch>>,
    /// Why the writer stopped queueing for this watcher ([`RESET_NONE`]
    /// while it queues): it overflowed, or the catalog was reset.
    overflowed: Arc<AtomicU8>,
    filter: WatchFilter,
    /// One of the registry's own (see [`Catalog::subscribe_internal`]).
    internal: bool,
}

/// A watcher's reset state: none.
const RESET_NONE: u8 = 0;
/// Its buffer overflowed: it gets a `SLOW_CONSUMER` reset snapshot.
const RESET_SLOW: u8 = 1;
/// The catalog was reset to another history (a cluster's etcd restored):
/// it gets an `EPOCH_CHANGED` reset snapshot.
const RESET_EPOCH: u8 = 2;

impl WatcherHandle {
    /// The filter this watcher was opened with.
    pub fn filter(&self) -> &WatchFilter {
        &self.filter
    }

    /// Whether the writer had to drop events for this watcher; if so the
    /// caller must [`Catalog::resnapshot`] before reading on.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire) != RESET_NONE
    }

    /// Why the watcher must be sent a reset snapshot, if it must.
    pub fn reset_reason(&self) -> Option<ResetReason> {
        match self.overflowed.load(Ordering::Acquire) {
            RESET_NONE => None,
            RESET_SLOW => Some(ResetReason::SlowConsumer),
            _ => Some(ResetReason::EpochChanged),
        }
    }

    /// Next batch, waiting for one.
    pub async fn recv(&mut self) -> Option<Arc<RevisionBatch>> {
        self.rx.recv().await
    }

    /// Next batch if one is queued.
    pub fn try_recv(&mut self) -> Option<Arc<RevisionBatch>> {
        self.rx.try_recv().ok()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.catalog.remove_watcher(self.id, &self.filter);
    }
}

/// An open write transaction: holds the write lock, stages changes, and
/// commits them as one revision. Dropping it without commit discards them.
#[derive(Debug)]
pub struct Txn<'a> {
    catalog: &'a Catalog,
    writer: MutexGuard<'a, Writer>,
    staged: Vec<Staged>,
    /// Revision to commit as, when given from outside (the etcd store's
    /// revisions); `None` is the next one.
    at: Option<u64>,
    /// Set by a resync: the history before this commit no longer leads to
    /// it, so resuming at or below its revision must reset.
    discontinuity: bool,
    /// A restore: instances keep their own revisions, no events are made
    /// and the history starts after this commit.
    restore: bool,
}

#[derive(Debug)]
enum Staged {
    /// The instance, and the shared id string to key it by (if the caller
    /// already has one, so the lease's key and the map's key are one
    /// allocation).
    Put(Instance, Option<Arc<str>>),
    Delete(InstanceKey, DeleteReason),
    /// Forget an empty service (to make room under `max_services`).
    Forget(Arc<str>),
}

impl Staged {
    fn service(&self) -> &str {
        match self {
            Staged::Put(i, _) => &i.service,
            Staged::Delete(k, _) => &k.service,
            Staged::Forget(s) => s,
        }
    }
}

impl Catalog {
    /// An empty catalog at revision 0.
    pub fn new(config: CatalogConfig) -> Self {
        Self {
            services: DashMap::new(),
            writer: Mutex::new(Writer {
                history: VecDeque::new(),
                history_len: 0,
                compacted: 0,
                watchers: Watchers::default(),
                listing: Listing::default(),
            }),
            revision: AtomicU64::new(0),
            listing: ArcSwap::from_pointee(Listing::default()),
            config,
            stats: CatalogStats::default(),
        }
    }

    /// Latest committed revision.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Opens a write transaction (takes the write lock).
    pub fn txn(&self) -> Txn<'_> {
        Txn {
            catalog: self,
            writer: self.writer.lock(),
            staged: Vec::new(),
            at: None,
            discontinuity: false,
            restore: false,
        }
    }

    /// The current instances of a service and the revision they are exact
    /// at, or `None` (with the current revision) for an unknown service.
    /// Lock-free unless the service changed since the last read.
    pub fn resolve(&self, service: &str) -> (Option<Arc<ServiceSnapshot>>, u64) {
        // Read the revision first: every change to this service at or below
        // it is already in its state (writers publish the revision last),
        // and the snapshot holds whole transactions only.
        let global = self.revision();
        let Some(entry) = self.services.get(service).map(|e| e.clone()) else {
            return (None, global);
        };
        let snap = entry.snapshot();
        if snap.revision == 0 {
            // Created by a transaction that has not committed yet.
            return (None, global);
        }
        let revision = global.max(snap.revision);
        (Some(snap), revision)
    }

    /// Every known service with its instance count, at one revision.
    pub fn listing(&self) -> Arc<Listing> {
        self.listing.load_full()
    }

    /// Every known service with its instance count, ordered by name, and the
    /// revision that listing is exact at.
    pub fn list_services(&self) -> (Vec<(Arc<str>, usize)>, u64) {
        let listing = self.listing();
        let out = listing
            .services
            .iter()
            .map(|(name, n)| (name.clone(), *n))
            .collect();
        (out, listing.revision)
    }

    /// Number of known services.
    pub fn service_count(&self) -> usize {
        self.listing.load().services.len()
    }

    /// Live instances across all services (as of the last commit).
    pub fn instance_count(&self) -> usize {
        self.listing.load().instances
    }

    /// Registers a watcher and decides how it starts: every revision after
    /// the start is delivered to it exactly once.
    ///
    /// `start_revision` 0 means "snapshot"; `epoch_matches` false forces a
    /// reset snapshot (the client's revisions come from another server life).
    /// A replay is decided and copied under the write lock (bounded by the
    /// history); a snapshot is built off it (see [`Catalog::view_for`]).
    pub fn watch(
        self: &Arc<Self>,
        filter: WatchFilter,
        start_revision: u64,
        epoch_matches: bool,
        conn: Option<SocketAddr>,
    ) -> Result<(WatcherHandle, WatchStart)> {
        let mut writer = self.writer.lock();
        self.check_watcher_caps(&writer, conn)?;
        let current = self.revision();
        let reset = if start_revision == 0 {
            Some(None)
        } else if !epoch_matches || start_revision > current + 1 {
            Some(Some(ResetReason::EpochChanged))
        } else if start_revision <= writer.compacted {
            Some(Some(ResetReason::Compacted))
        } else {
            None
        };
        let replay = reset.is_none().then(|| {
            let from = writer
                .history
                .partition_point(|b| b.revision < start_revision);
            writer.history.range(from..).cloned().collect::<Vec<_>>()
        });
        let mut handle = self.add_watcher(&mut writer, filter, conn);
        drop(writer);
        let start = match (replay, reset) {
            (Some(batches), _) => WatchStart::Replay(batches),
            (None, reset) => WatchStart::Snapshot {
                view: self.view_for(&mut handle),
                reset: reset.flatten(),
            },
        };
        Ok((handle, start))
    }

    /// Registers a watcher that starts with the next revision, for readers
    /// that read the current state themselves (xDS reads snapshots when it
    /// computes a response): no snapshot is built for it.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: WatchFilter,
        conn: Option<SocketAddr>,
    ) -> Result<WatcherHandle> {
        let mut writer = self.writer.lock();
        self.check_watcher_caps(&writer, conn)?;
        Ok(self.add_watcher(&mut writer, filter, conn))
    }

    /// [`Catalog::subscribe`] for the registry's own use (the health
    /// checker): not a client's stream, so neither counted in `Status` nor
    /// held to the watcher caps.
    pub fn subscribe_internal(self: &Arc<Self>, filter: WatchFilter) -> WatcherHandle {
        let mut writer = self.writer.lock();
        let mut handle = self.add_watcher(&mut writer, filter, None);
        handle.internal = true;
        let slot = match &handle.filter.service {
            Some(s) => writer
                .watchers
                .by_service
                .get_mut(s)
                .and_then(|m| m.get_mut(&handle.id)),
            None => writer.watchers.all.get_mut(&handle.id),
        };
        if let Some(slot) = slot {
            slot.counted = false;
        }
        self.stats.watchers.fetch_sub(1, Ordering::Relaxed);
        handle
    }

    fn check_watcher_caps(&self, writer: &Writer, conn: Option<SocketAddr>) -> Result<()> {
        let live = self.stats.watchers.load(Ordering::Relaxed);
        if live >= self.config.max_watchers {
            return Err(Error::ResourceExhausted(format!(
                "watchers: {live} live, the limit is {} (max_watchers)",
                self.config.max_watchers
            )));
        }
        if let Some(conn) = conn {
            let n = writer.watchers.per_conn.get(&conn).copied().unwrap_or(0);
            if n >= self.config.max_watchers_per_connection {
                return Err(Error::ResourceExhausted(format!(
                    "watchers on this connection: {n} live, the limit is {} (max_watchers_per_connection)",
                    self.config.max_watchers_per_connection
                )));
            }
        }
        Ok(())
    }

    fn add_watcher(
        self: &Arc<Self>,
        writer: &mut Writer,
        filter: WatchFilter,
        conn: Option<SocketAddr>,
    ) -> WatcherHandle {
        let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(1));
        let overflowed = Arc::new(AtomicU8::new(RESET_NONE));
        let watchers = &mut writer.watchers;
        let id = watchers.next_id;
        watchers.next_id += 1;
        let slot = WatcherSlot {
            tx,
            overflowed: overflowed.clone(),
            service: filter.service.clone(),
            conn,
            counted: true,
        };
        match &filter.service {
            Some(s) => {
                watchers
                    .by_service
                    .entry(s.clone())
                    .or_default()
                    .insert(id, slot);
            }
            None => {
                watchers.all.insert(id, slot);
            }
        }
        if let Some(conn) = conn {
            *watchers.per_conn.entry(conn).or_default() += 1;
        }
        self.stats.watchers.fetch_add(1, Ordering::Relaxed);
        WatcherHandle {
            id,
            catalog: self.clone(),
            rx,
            overflowed,
            filter,
            internal: false,
        }
    }

    /// Brings an overflowed watcher back: a fresh view of its filter, with
    /// its queue emptied so that the next queued batch follows the view
    /// exactly. Built off the write lock, like every watch snapshot.
    pub fn resnapshot(&self, handle: &mut WatcherHandle) -> CatalogView {
        self.stats.watcher_resets.fetch_add(1, Ordering::Relaxed);
        self.view_for(handle)
    }

    /// Brings an overflowed [`Catalog::subscribe`]r back without a view:
    /// its queue is emptied (O(1) under the write lock) and it goes on from
    /// the next revision; the caller re-reads whatever it needs.
    pub fn resubscribe(&self, handle: &mut WatcherHandle) {
        if !handle.internal {
            self.stats.watcher_resets.fetch_add(1, Ordering::Relaxed);
        }
        let _writer = self.writer.lock();
        view::drain(handle);
    }

    fn remove_watcher(&self, id: u64, filter: &WatchFilter) {
        let mut writer = self.writer.lock();
        let watchers = &mut writer.watchers;
        let slot = match &filter.service {
            Some(s) => {
                let slot = watchers.by_service.get_mut(s).and_then(|m| m.remove(&id));
                if watchers.by_service.get(s).is_some_and(|m| m.is_empty()) {
                    watchers.by_service.remove(s);
                }
                slot
            }
            None => watchers.all.remove(&id),
        };
        if let Some(slot) = slot {
            debug_assert_eq!(slot.service, filter.service);
            if let Some(conn) = slot.conn
                && let Some(n) = watchers.per_conn.get_mut(&conn)
            {
                *n -= 1;
                if *n == 0 {
                    watchers.per_conn.remove(&conn);
                }
            }
            if slot.counted {
                self.stats.watchers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Oldest revision still resumable (everything after `compacted`).
    pub fn compacted_revision(&self) -> u64 {
        self.writer.lock().compacted
    }

    /// The service's snapshot as a reader would get it, without the
    /// revision (for the view walk).
    fn service_snapshot(&self, service: &str) -> Option<Arc<ServiceSnapshot>> {
        let entry = self.services.get(service).map(|e| e.clone())?;
        Some(entry.snapshot())
    }
}

impl Txn<'_> {
    /// The current instance under a key (ignores staged changes).
    pub fn get(&self, service: &str, id: &str) -> Option<Arc<Instance>> {
        let entry = self.catalog.services.get(service)?;
        let state = entry.state.lock();
        state.instances.get(id).map(Stored::decode)
    }

    /// The lease of the current instance under a key, without decoding it
    /// (ignores staged changes).
    pub fn lease_of(&self, service: &str, id: &str) -> Option<u64> {
        let entry = self.catalog.services.get(service)?;
        let state = entry.state.lock();
        state.instances.get(id).map(|s| s.lease_id)
    }

    /// Instances in a service, or `None` if the service is unknown (ignores
    /// staged changes).
    pub fn service_len(&self, service: &str) -> Option<usize> {
        self.writer.listing.services.get(service).copied()
    }

    /// Live instances across all services (ignores staged changes).
    pub fn instance_count(&self) -> usize {
        self.writer.listing.instances
    }

    /// The latest committed revision.
    pub fn current_revision(&self) -> u64 {
        self.catalog.revision()
    }

    /// Makes room for one more service if `service` is new: forgets an empty
    /// service when at the cap (as part of this transaction), or refuses when
    /// every service has instances.
    pub fn ensure_service_capacity(&mut self, service: &str) -> Result<()> {
        let services = &self.writer.listing.services;
        if services.contains_key(service) || services.len() < self.catalog.config.max_services {
            return Ok(());
        }
        let forgotten: Vec<&str> = self
            .staged
            .iter()
            .filter_map(|s| match s {
                Staged::Forget(name) => Some(&**name),
                _ => None,
            })
            .collect();
        let empty = services
            .iter()
            .find(|(name, n)| **n == 0 && !forgotten.contains(&&***name))
            .map(|(name, _)| name.clone());
        match empty {
            Some(name) => {
                self.staged.push(Staged::Forget(name));
                Ok(())
            }
            None => Err(Error::ResourceExhausted(format!(
                "services: {} known, the limit is {} (max_services)",
                services.len(),
                self.catalog.config.max_services
            ))),
        }
    }

    /// The revision this transaction will commit as.
    pub fn next_revision(&self) -> u64 {
        self.catalog.revision() + 1
    }

    /// Stages a put; the instance's `revision` is set on commit.
    pub fn put(&mut self, instance: Instance) {
        self.staged.push(Staged::Put(instance, None));
    }

    /// [`Txn::put`] keyed by an id string the caller shares (see
    /// [`Txn::key_for`]).
    pub fn put_keyed(&mut self, instance: Instance, id: Arc<str>) {
        debug_assert_eq!(*id, *instance.id);
        self.staged.push(Staged::Put(instance, Some(id)));
    }

    /// The key of an instance, reusing the catalog's interned service name
    /// when the service exists: at a million instances, one string per
    /// service instead of one per instance.
    pub fn key_for(&self, instance: &Instance) -> InstanceKey {
        let service = self
            .catalog
            .services
            .get(instance.service.as_str())
            .map(|e| e.key().clone())
            .unwrap_or_else(|| instance.service.as_str().into());
        InstanceKey {
            service,
            id: instance.id.as_str().into(),
        }
    }

    /// Stages a delete; deleting an absent key is a no-op.
    pub fn delete(&mut self, key: InstanceKey, reason: DeleteReason) {
        self.staged.push(Staged::Delete(key, reason));
    }

    /// Makes this commit a resync point (etcd store): the changes staged are
    /// a diff against an unknown number of missed revisions, so the history
    /// is dropped and a watcher resuming at or below the committed revision
    /// gets a `COMPACTED` reset instead of a replay that would skip them.
    /// Live watchers still get the diff as an ordinary batch, which is exact
    /// for them: it leads from what they have to the new state.
    pub fn mark_discontinuity(&mut self) {
        self.discontinuity = true;
    }

    /// Makes this commit a restore (data directory): the puts keep the
    /// revisions they carry, no events or history are made (nothing watches
    /// yet), and the catalog continues from the committed revision.
    pub fn mark_restore(&mut self) {
        self.restore = true;
        self.discontinuity = true;
    }

    /// Replaces the whole catalog with the staged state at `revision`, which
    /// may be below the current one: a cluster whose etcd was restored from
    /// an older backup continues from there under a new epoch. Nothing is
    /// replayed across it: every service is relabelled at `revision`, the
    /// history starts after it, and every watcher is sent an
    /// `EPOCH_CHANGED` reset snapshot. The staged puts must be the complete
    /// new state; every instance not put is deleted.
    pub fn commit_reset(mut self, revision: u64) {
        let catalog = self.catalog;
        let mut keep: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for op in &self.staged {
            if let Staged::Put(i, _) = op {
                keep.entry(i.service.clone())
                    .or_default()
                    .insert(i.id.clone());
            }
        }
        let services: Vec<(Arc<str>, Arc<ServiceEntry>)> = catalog
            .services
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (name, entry) in &services {
            let state = entry.state.lock();
            for id in state.instances.keys() {
                if !keep.get(&**name).is_some_and(|ids| ids.contains(&**id)) {
                    self.staged.push(Staged::Delete(
                        InstanceKey {
                            service: name.clone(),
                            id: id.clone(),
                        },
                        DeleteReason::Expired,
                    ));
                }
            }
        }
        self.restore = true;
        self.at = Some(revision);
        self.apply(None);
        for (_, entry) in &services {
            entry.state.lock().revision = revision.max(1);
            entry.snapshot.store(None);
        }
        let writer = &mut *self.writer;
        writer.history.clear();
        writer.history_len = 0;
        writer.compacted = revision;
        writer.listing.revision = revision;
        catalog.listing.store(Arc::new(writer.listing.clone()));
        catalog.revision.store(revision, Ordering::Release);
        for slot in writer
            .watchers
            .all
            .values()
            .chain(writer.watchers.by_service.values().flat_map(|m| m.values()))
        {
            slot.overflowed.store(RESET_EPOCH, Ordering::Release);
        }
    }

    /// [`Txn::commit`] at a revision given from outside (the etcd store:
    /// the catalog revision *is* etcd's revision, so clients may resume on
    /// any node). Revisions must increase but need not be contiguous; one
    /// not above the current revision commits nothing and returns the
    /// current one (a change already applied).
    pub fn commit_at(mut self, revision: u64) -> u64 {
        if revision <= self.catalog.revision() {
            return self.catalog.revision();
        }
        self.at = Some(revision);
        self.commit()
    }

    /// Applies everything staged as one revision, records it in the history
    /// and fans it out to watchers. Returns the new revision, or the current
    /// one when nothing changed.
    pub fn commit(mut self) -> u64 {
        self.apply(None)
    }

    /// [`Txn::commit`], then `then` with the revision and the encodings of
    /// the instances put, while the write lock is still held: a durable
    /// store queues its record there, so records queue in revision order.
    pub fn commit_with<R>(mut self, then: impl FnOnce(u64, Vec<PutRecord>) -> R) -> (u64, R) {
        let mut puts = Vec::new();
        let revision = self.apply(Some(&mut puts));
        let out = then(revision, puts);
        (revision, out)
    }

    fn apply(&mut self, mut record: Option<&mut Vec<PutRecord>>) -> u64 {
        let catalog = self.catalog;
        let current = catalog.revision();
        let revision = self.at.unwrap_or(current + 1);
        let mut staged = std::mem::take(&mut self.staged);
        // Group by service (a stable sort keeps each service's own order),
        // so each service is changed under one lock acquisition.
        if staged.len() > 1 {
            staged.sort_by(|a, b| a.service().cmp(b.service()));
        }
        let restore = self.restore;
        let writer = &mut *self.writer;
        let mut events = Vec::with_capacity(if restore { 0 } else { staged.len() });
        let mut flips: Vec<PanicFlip> = Vec::new();
        let mut changed = false;
        let mut ops = staged.into_iter().peekable();
        while let Some(first) = ops.next() {
            if let Staged::Forget(name) = &first {
                if writer.listing.services.get(name) == Some(&0) {
                    catalog.services.remove(name);
                    writer.listing.services.remove(name);
                    changed = true;
                }
                continue;
            }
            let service = first.service().to_owned();
            let mut group = vec![first];
            while ops.peek().is_some_and(|o| o.service() == service) {
                group.push(ops.next().expect("peeked"));
            }
            let has_put = group.iter().any(|o| matches!(o, Staged::Put(..)));
            let existing = catalog.services.get(service.as_str()).map(|e| {
                let name = e.key().clone();
                (name, e.value().clone())
            });
            let (name, entry) = match existing {
                Some(found) => found,
                None if has_put => {
                    let name: Arc<str> = service.as_str().into();
                    let threshold = catalog.config.panic.for_service(&name);
                    let entry = Arc::new(ServiceEntry::new(threshold));
                    catalog.services.insert(name.clone(), entry.clone());
                    (name, entry)
                }
                None => continue,
            };
            let mut state = entry.state.lock();
            let before = state.instances.len();
            let counts_before = state.counts;
            let mut touched = false;
            let mut top = state.revision;
            // This group's events, and the classes of what each replaced or
            // removed (`prev`) and of what it put (`new`), to mark them
            // served or not once the service's panic mode after the whole
            // group is known.
            let first_event = events.len();
            let mut classes: Vec<(Option<Class>, Option<Class>)> = Vec::new();
            for op in group {
                match op {
                    Staged::Put(mut instance, id) => {
                        if restore {
                            top = top.max(instance.revision);
                        } else {
                            instance.revision = revision;
                        }
                        let id = id.unwrap_or_else(|| instance.id.as_str().into());
                        let class = serving::class_of(&instance);
                        let stored = Stored::encode(&instance);
                        if let Some(record) = record.as_deref_mut() {
                            record.push(((name.clone(), id.clone()), stored.encoded.clone()));
                        }
                        let prev = state.instances.insert(id, stored);
                        let prev_class =
                            prev.as_ref().map(|p| serving::class_of_encoded(&p.encoded));
                        if let Some(c) = prev_class {
                            state.counts.remove(c);
                        }
                        state.counts.add(class);
                        touched = true;
                        if !restore {
                            classes.push((prev_class, Some(class)));
                            events.push(CatalogEvent {
                                kind: EventKind::Put {
                                    prev: prev.map(|p| p.decode()),
                                },
                                instance: Arc::new(instance),
                                served_before: false,
                                served_after: false,
                            });
                        }
                    }
                    Staged::Delete(key, reason) => {
                        let Some(prev) = state.instances.remove(&key.id) else {
                            continue;
                        };
                        let prev_class = serving::class_of_encoded(&prev.encoded);
                        state.counts.remove(prev_class);
                        touched = true;
                        if !restore {
                            classes.push((Some(prev_class), None));
                            events.push(CatalogEvent {
                                kind: EventKind::Delete(reason),
                                instance: prev.decode(),
                                served_before: false,
                                served_after: false,
                            });
                        }
                    }
                    Staged::Forget(_) => unreachable!("grouped apart"),
                }
            }
            if !restore && touched {
                // Served before / after, against the panic mode of the
                // service before and after this revision.
                let was = entry.threshold.panicked(counts_before);
                let is = entry.threshold.panicked(state.counts);
                for (ev, (prev, new)) in events[first_event..].iter_mut().zip(&classes) {
                    ev.served_before = prev.is_some_and(|c| c.served(was));
                    ev.served_after = new.is_some_and(|c| c.served(is));
                }
                if was != is {
                    // The critical instances this revision left alone
                    // changed membership too; the rest are in the events.
                    let changed: std::collections::HashSet<&str> = events[first_event..]
                        .iter()
                        .map(|e| e.instance.id.as_str())
                        .collect();
                    let instances = state
                        .instances
                        .iter()
                        .filter(|(id, s)| {
                            !changed.contains(&***id)
                                && serving::class_of_encoded(&s.encoded) == Class::Critical
                        })
                        .map(|(_, s)| s.decode())
                        .collect();
                    flips.push(PanicFlip {
                        service: name.clone(),
                        panicked: is,
                        instances,
                    });
                }
            }
            let after = state.instances.len();
            if touched {
                state.revision = if restore { top.max(1) } else { revision };
                entry.snapshot.store(None);
            }
            drop(state);
            if touched || has_put {
                changed |= touched;
                let listing = &mut writer.listing;
                if listing.services.get(&name) != Some(&after) {
                    listing.services.insert(name, after);
                }
                listing.instances = listing.instances + after - before;
            }
        }
        let moves_on = self.discontinuity && self.at.is_some_and(|at| at > current);
        if !(changed || moves_on) {
            return current;
        }
        let writer = &mut *self.writer;
        if self.discontinuity {
            writer.history.clear();
            writer.history_len = 0;
            writer.compacted = revision;
        }
        let mut batch_out = None;
        if !events.is_empty() {
            let first = &events[0].instance.service;
            let single = events.iter().all(|e| e.instance.service == *first);
            let batch = Arc::new(RevisionBatch {
                revision,
                events,
                panic_flips: flips,
                single,
                encoded: OnceLock::new(),
                encoded_served: OnceLock::new(),
                at: Instant::now(),
            });
            writer.history_len += batch.weight();
            writer.history.push_back(batch.clone());
            let max_age = catalog.config.history_age;
            while let Some(front) = writer.history.front() {
                let too_many = writer.history_len > catalog.config.history_events;
                let too_old = front.at.elapsed() > max_age;
                if !(too_many || too_old) || writer.history.len() == 1 {
                    break;
                }
                writer.history_len -= front.weight();
                writer.compacted = front.revision;
                writer.history.pop_front();
            }
            batch_out = Some(batch);
        }
        writer.listing.revision = revision;
        catalog.listing.store(Arc::new(writer.listing.clone()));
        catalog.revision.store(revision, Ordering::Release);
        // Watchers hear of the revision only once everything a reader may
        // consult for it (the listing, the catalog revision) shows it: an
        // xDS stream woken by this batch builds its wildcard CDS from the
        // listing, and would otherwise see the service set of the revision
        // before and drop the change.
        if let Some(batch) = batch_out {
            fan_out(&writer.watchers, &batch);
        }
        revision
    }
}

/// An instance put by a commit: its key (service, id) and its encoding.
pub type PutRecord = ((Arc<str>, Arc<str>), Arc<[u8]>);

/// Hands a batch to each watcher of the services it touches and to every
/// watch-all watcher. Never blocks: a full buffer flags the watcher for a
/// reset snapshot.
fn fan_out(watchers: &Watchers, batch: &Arc<RevisionBatch>) {
    let send = |slot: &WatcherSlot| {
        if slot.overflowed.load(Ordering::Acquire) != RESET_NONE {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = slot.tx.try_send(batch.clone()) {
            slot.overflowed.store(RESET_SLOW, Ordering::Release);
        }
    };
    if !watchers.by_service.is_empty() {
        if let Some(service) = batch.single_service() {
            if let Some(set) = watchers.by_service.get(service) {
                set.values().for_each(send);
            }
        } else {
            let mut seen: Vec<&str> = Vec::new();
            for e in &batch.events {
                let s = e.instance.service.as_str();
                if seen.contains(&s) {
                    continue;
                }
                seen.push(s);
                if let Some(set) = watchers.by_service.get(s) {
                    set.values().for_each(send);
                }
            }
        }
    }
    watchers.all.values().for_each(send);
}

#[cfg(test)]
mod tests;
