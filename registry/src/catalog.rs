//! The catalog: instances by service, the revision counter, the event history
//! and the set of watchers that changes fan out to.
//!
//! Concurrency design:
//! - **Writes** (register, deregister, expiry) are serialised by one mutex,
//!   the [`Txn`]. A transaction stages puts and deletes and commits them as
//!   one revision: the services are updated, the [`RevisionBatch`] is
//!   appended to the history and handed to each interested watcher with a
//!   non-blocking `try_send`, and only then is the revision published. A
//!   watcher whose buffer is full is flagged for a reset snapshot instead of
//!   slowing the writer down.
//! - **Reads** never take that mutex. Each service keeps an `ArcSwap`ped
//!   snapshot (a sorted `Vec<Arc<Instance>>`) that writers invalidate and the
//!   first reader after a change rebuilds under the service's own lock, so a
//!   burst of registrations into one service costs O(1) each rather than a
//!   snapshot copy each, and steady-state Resolve is lock-free.
//! - Instances are `Arc`s shared by the service map, snapshots and history.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use registry_api::v1::{DeleteReason, Instance, ResetReason};
use tokio::{sync::mpsc, time::Instant};

use crate::error::{Error, Result};

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
}

/// All the events of one revision, shared by the history and every watcher.
#[derive(Debug)]
pub struct RevisionBatch {
    /// The revision these events created.
    pub revision: u64,
    /// Events in the order they were applied.
    pub events: Vec<CatalogEvent>,
    /// Whether every event belongs to one service (the common case):
    /// watchers of that service without a selector see the whole batch. A
    /// flag rather than the name, so a history entry costs no string.
    single: bool,
    /// The whole batch encoded once as a `WatchResponse`, shared by every
    /// watcher that sees all of it (see `watch`).
    pub(crate) encoded: OnceLock<Bytes>,
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

    /// A batch outside any catalog, for unit tests of the watch encoding.
    #[doc(hidden)]
    pub fn for_test(revision: u64, events: Vec<CatalogEvent>) -> Self {
        let single = events
            .iter()
            .all(|e| e.instance.service == events[0].instance.service);
        Self {
            revision,
            events,
            single,
            encoded: OnceLock::new(),
            at: Instant::now(),
        }
    }
}

/// The instances of one service at one revision.
#[derive(Debug)]
pub struct ServiceSnapshot {
    /// Revision of the service's last change.
    pub revision: u64,
    /// Instances ordered by id.
    pub instances: Vec<Arc<Instance>>,
    /// The instances encoded once as `ResolveResponse.instances` records,
    /// shared by every unfiltered Resolve until the service changes.
    encoded: OnceLock<Bytes>,
}

impl ServiceSnapshot {
    /// The instances as encoded Resolve records, built on first use.
    pub fn encoded_instances(&self) -> Bytes {
        self.encoded
            .get_or_init(|| crate::frame::encode_instances(self.instances.iter().map(|i| &**i)))
            .clone()
    }
}

#[derive(Debug, Default)]
struct ServiceState {
    instances: BTreeMap<Arc<str>, Stored>,
    revision: u64,
}

/// An instance as the catalog keeps it at rest: its protobuf encoding, in
/// one exact-size allocation. A decoded `Instance` with one metadata label is
/// ~560 bytes over six allocations; this is ~60-100 bytes over one, which is
/// what keeps a million instances within the memory budget (issue 7).
/// Readers get decoded `Arc<Instance>`s from snapshots and events; the
/// decoding happens once per service change (snapshot rebuild), per replaced
/// or removed instance (events), and per watch snapshot.
/// The lease id is kept beside the bytes: register and deregister need only
/// it, and should not decode a whole instance to get it.
#[derive(Debug)]
struct Stored {
    lease_id: u64,
    encoded: Box<[u8]>,
}

impl Stored {
    fn encode(instance: &Instance) -> Self {
        use prost::Message;
        Stored {
            lease_id: instance.lease_id,
            encoded: instance.encode_to_vec().into_boxed_slice(),
        }
    }

    fn decode(&self) -> Arc<Instance> {
        use prost::Message;
        Arc::new(
            Instance::decode(&*self.encoded).expect("the catalog only stores encodings it made"),
        )
    }
}

#[derive(Debug)]
struct ServiceEntry {
    state: Mutex<ServiceState>,
    /// `None` after a change until the next reader rebuilds it.
    snapshot: ArcSwapOption<ServiceSnapshot>,
    count: AtomicUsize,
}

impl ServiceEntry {
    fn new() -> Self {
        Self {
            state: Mutex::new(ServiceState::default()),
            snapshot: ArcSwapOption::empty(),
            count: AtomicUsize::new(0),
        }
    }

    fn snapshot(&self) -> Arc<ServiceSnapshot> {
        if let Some(snap) = self.snapshot.load_full() {
            return snap;
        }
        // Rebuild and publish under the state lock, so a writer cannot slip
        // a change in between and have its invalidation overwritten.
        let state = self.state.lock();
        if let Some(snap) = self.snapshot.load_full() {
            return snap;
        }
        let snap = Arc::new(ServiceSnapshot {
            revision: state.revision,
            instances: state.instances.values().map(Stored::decode).collect(),
            encoded: OnceLock::new(),
        });
        self.snapshot.store(Some(snap.clone()));
        snap
    }
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
}

/// A watcher's mailbox as the writer sees it.
#[derive(Debug)]
struct WatcherSlot {
    tx: mpsc::Sender<Arc<RevisionBatch>>,
    overflowed: Arc<AtomicBool>,
    service: Option<Arc<str>>,
    conn: Option<SocketAddr>,
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
}

/// Counters the catalog keeps for status and metrics.
#[derive(Debug, Default)]
pub struct CatalogStats {
    /// Live watchers.
    pub watchers: AtomicUsize,
    /// Reset snapshots sent to slow watchers.
    pub watcher_resets: AtomicU64,
    /// Total live instances.
    pub instances: AtomicUsize,
}

/// The instance catalog. See the module docs for its locking design.
#[derive(Debug)]
pub struct Catalog {
    services: DashMap<Arc<str>, Arc<ServiceEntry>>,
    writer: Mutex<Writer>,
    revision: AtomicU64,
    config: CatalogConfig,
    /// Counters for status and metrics.
    pub stats: CatalogStats,
}

/// How a new watcher starts.
#[derive(Debug)]
pub enum WatchStart {
    /// Send these instances as a snapshot at `revision` first.
    Snapshot {
        /// Revision the snapshot reflects.
        revision: u64,
        /// Matching instances.
        instances: Vec<Arc<Instance>>,
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
}

impl WatchFilter {
    /// Whether the instance is in this watcher's view.
    pub fn matches(&self, instance: &Instance) -> bool {
        if let Some(service) = &self.service
            && **service != *instance.service
        {
            return false;
        }
        if let Some(reader) = &self.reader
            && !reader.may(crate::auth::Action::Read, &instance.service)
        {
            return false;
        }
        selector_matches(&self.selector, instance)
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
    overflowed: Arc<AtomicBool>,
    filter: WatchFilter,
}

impl WatcherHandle {
    /// The filter this watcher was opened with.
    pub fn filter(&self) -> &WatchFilter {
        &self.filter
    }

    /// Whether the writer had to drop events for this watcher; if so the
    /// caller must [`Catalog::resnapshot`] before reading on.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
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
}

#[derive(Debug)]
enum Staged {
    /// The instance, and the shared id string to key it by (if the caller
    /// already has one, so the lease's key and the map's key are one
    /// allocation).
    Put(Instance, Option<Arc<str>>),
    Delete(InstanceKey, DeleteReason),
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
            }),
            revision: AtomicU64::new(0),
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
        }
    }

    /// The current instances of a service and the revision they reflect, or
    /// `None` (with the current revision) for an unknown service. Lock-free
    /// unless the service changed since the last read.
    pub fn resolve(&self, service: &str) -> (Option<Arc<ServiceSnapshot>>, u64) {
        // Read the revision first: any change to this service at or below it
        // is already visible in its snapshot (writers publish the revision
        // last), so the answer is exact at max(revision, snapshot.revision).
        let global = self.revision();
        let Some(entry) = self.services.get(service).map(|e| e.clone()) else {
            return (None, global);
        };
        let snap = entry.snapshot();
        let revision = global.max(snap.revision);
        (Some(snap), revision)
    }

    /// Every known service with its instance count, ordered by name, and the
    /// revision read before listing.
    pub fn list_services(&self) -> (Vec<(Arc<str>, usize)>, u64) {
        let revision = self.revision();
        let mut out: Vec<_> = self
            .services
            .iter()
            .map(|e| (e.key().clone(), e.value().count.load(Ordering::Relaxed)))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        (out, revision)
    }

    /// Number of known services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Registers a watcher and decides how it starts, atomically with
    /// respect to writers: every revision after the start is delivered to it
    /// exactly once.
    ///
    /// `start_revision` 0 means "snapshot"; `epoch_matches` false forces a
    /// reset snapshot (the client's revisions come from another server life).
    pub fn watch(
        self: &Arc<Self>,
        filter: WatchFilter,
        start_revision: u64,
        epoch_matches: bool,
        conn: Option<SocketAddr>,
    ) -> Result<(WatcherHandle, WatchStart)> {
        let mut writer = self.writer.lock();
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
        let current = self.revision();
        let start = if start_revision == 0 {
            self.snapshot_locked(&filter, None)
        } else if !epoch_matches || start_revision > current + 1 {
            self.snapshot_locked(&filter, Some(ResetReason::EpochChanged))
        } else if start_revision <= writer.compacted {
            self.snapshot_locked(&filter, Some(ResetReason::Compacted))
        } else {
            let from = writer
                .history
                .partition_point(|b| b.revision < start_revision);
            WatchStart::Replay(writer.history.range(from..).cloned().collect())
        };

        let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let watchers = &mut writer.watchers;
        let id = watchers.next_id;
        watchers.next_id += 1;
        let slot = WatcherSlot {
            tx,
            overflowed: overflowed.clone(),
            service: filter.service.clone(),
            conn,
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
        let handle = WatcherHandle {
            id,
            catalog: self.clone(),
            rx,
            overflowed,
            filter,
        };
        Ok((handle, start))
    }

    /// Brings an overflowed watcher back: discards what it has queued and
    /// returns a fresh snapshot of its view, atomically with respect to
    /// writers so that the next queued batch follows the snapshot exactly.
    pub fn resnapshot(&self, handle: &mut WatcherHandle) -> (u64, Vec<Arc<Instance>>) {
        let _writer = self.writer.lock();
        while handle.rx.try_recv().is_ok() {}
        handle.overflowed.store(false, Ordering::Release);
        self.stats.watcher_resets.fetch_add(1, Ordering::Relaxed);
        match self.snapshot_locked(&handle.filter, None) {
            WatchStart::Snapshot {
                revision,
                instances,
                ..
            } => (revision, instances),
            WatchStart::Replay(_) => unreachable!("snapshot_locked returns a snapshot"),
        }
    }

    /// Snapshot of a filter's view; the caller holds the write lock.
    fn snapshot_locked(&self, filter: &WatchFilter, reset: Option<ResetReason>) -> WatchStart {
        let revision = self.revision();
        let mut instances = Vec::new();
        let mut collect = |entry: &ServiceEntry| {
            let state = entry.state.lock();
            instances.extend(
                state
                    .instances
                    .values()
                    .map(Stored::decode)
                    .filter(|i| filter.matches(i)),
            );
        };
        match &filter.service {
            Some(s) => {
                if let Some(entry) = self.services.get(s) {
                    collect(&entry);
                }
            }
            None => {
                let mut entries: Vec<_> = self
                    .services
                    .iter()
                    .map(|e| (e.key().clone(), e.value().clone()))
                    .collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                for (_, entry) in entries {
                    collect(&entry);
                }
            }
        }
        WatchStart::Snapshot {
            revision,
            instances,
            reset,
        }
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
            self.stats.watchers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Oldest revision still resumable (everything after `compacted`).
    pub fn compacted_revision(&self) -> u64 {
        self.writer.lock().compacted
    }

    /// Appends every instance, as stored, to `out` as the length-delimited
    /// protobuf field `tag` (a `repeated Instance` field of the snapshot
    /// file: the stored bytes are already the encoding, so nothing is
    /// decoded or re-encoded). Takes one service lock at a time, never the
    /// write lock: writers and readers carry on meanwhile. Returns the
    /// number of instances written and the revision the snapshot reflects
    /// at least: the catalog's revision read first, or a later service
    /// revision met in the walk (changes made during the walk may or may
    /// not be in it).
    pub fn encode_all(&self, tag: u32, out: &mut Vec<u8>) -> (usize, u64) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let mut revision = self.revision();
        let mut n = 0;
        let entries: Vec<Arc<ServiceEntry>> = self.services.iter().map(|e| e.clone()).collect();
        for entry in entries {
            let state = entry.state.lock();
            revision = revision.max(state.revision);
            for stored in state.instances.values() {
                encode_key(tag, WireType::LengthDelimited, out);
                encode_varint(stored.encoded.len() as u64, out);
                out.extend_from_slice(&stored.encoded);
                n += 1;
            }
        }
        (n, revision)
    }

    /// Loads instances from a snapshot into an empty catalog, at `revision`
    /// (or the highest instance revision, if above), without events or
    /// history: nothing watches yet, and a watcher resuming from before the
    /// snapshot gets a `COMPACTED` reset. Each instance keeps the revision
    /// it had. `on_put` gets each instance's key (service name interned) and
    /// lease, for the lease table. Refused when the catalog is not empty.
    pub fn restore(
        &self,
        revision: u64,
        instances: impl IntoIterator<Item = Instance>,
        mut on_put: impl FnMut(InstanceKey, u64),
    ) -> Result<usize> {
        let mut writer = self.writer.lock();
        if self.revision() != 0 || !self.services.is_empty() {
            return Err(Error::DataDir(
                "a snapshot can only be restored into an empty catalog".into(),
            ));
        }
        let mut top = revision;
        let mut n = 0;
        for instance in instances {
            top = top.max(instance.revision);
            let entry = self
                .services
                .entry(instance.service.as_str().into())
                .or_insert_with(|| Arc::new(ServiceEntry::new()));
            let service = entry.key().clone();
            let id: Arc<str> = instance.id.as_str().into();
            let mut state = entry.state.lock();
            let added = state
                .instances
                .insert(id.clone(), Stored::encode(&instance))
                .is_none();
            state.revision = state.revision.max(instance.revision);
            entry.count.store(state.instances.len(), Ordering::Relaxed);
            drop(state);
            if added {
                n += 1;
                on_put(InstanceKey { service, id }, instance.lease_id);
            }
        }
        self.stats.instances.fetch_add(n, Ordering::Relaxed);
        writer.compacted = top;
        self.revision.store(top, Ordering::Release);
        Ok(n)
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

    /// Instances in a service, or `None` if the service is unknown.
    pub fn service_len(&self, service: &str) -> Option<usize> {
        self.catalog
            .services
            .get(service)
            .map(|e| e.count.load(Ordering::Relaxed))
    }

    /// Makes room for one more service if `service` is new: forgets an empty
    /// service when at the cap, or refuses when every service has instances.
    pub fn ensure_service_capacity(&mut self, service: &str) -> Result<()> {
        let services = &self.catalog.services;
        if services.contains_key(service) || services.len() < self.catalog.config.max_services {
            return Ok(());
        }
        let empty = services
            .iter()
            .find(|e| e.value().count.load(Ordering::Relaxed) == 0)
            .map(|e| e.key().clone());
        match empty {
            Some(name) => {
                services.remove(&name);
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
        let catalog = self.catalog;
        let current = catalog.revision();
        if self.staged.is_empty() {
            return self.empty_commit(current);
        }
        let revision = self.at.unwrap_or(current + 1);
        let mut events = Vec::with_capacity(self.staged.len());
        for op in std::mem::take(&mut self.staged) {
            match op {
                Staged::Put(mut instance, id) => {
                    instance.revision = revision;
                    let instance = Arc::new(instance);
                    // Look up first: the entry API would allocate a key even
                    // when the service exists.
                    let existing = catalog
                        .services
                        .get(instance.service.as_str())
                        .map(|e| e.value().clone());
                    let entry = existing.unwrap_or_else(|| {
                        catalog
                            .services
                            .entry(instance.service.as_str().into())
                            .or_insert_with(|| Arc::new(ServiceEntry::new()))
                            .clone()
                    });
                    let id = id.unwrap_or_else(|| instance.id.as_str().into());
                    let mut state = entry.state.lock();
                    let prev = state
                        .instances
                        .insert(id, Stored::encode(&instance))
                        .map(|p| p.decode());
                    state.revision = revision;
                    entry.snapshot.store(None);
                    entry.count.store(state.instances.len(), Ordering::Relaxed);
                    if prev.is_none() {
                        catalog.stats.instances.fetch_add(1, Ordering::Relaxed);
                    }
                    events.push(CatalogEvent {
                        kind: EventKind::Put { prev },
                        instance,
                    });
                }
                Staged::Delete(key, reason) => {
                    let Some(entry) = catalog.services.get(&key.service).map(|e| e.clone()) else {
                        continue;
                    };
                    let mut state = entry.state.lock();
                    let Some(prev) = state.instances.remove(&key.id).map(|p| p.decode()) else {
                        continue;
                    };
                    state.revision = revision;
                    entry.snapshot.store(None);
                    entry.count.store(state.instances.len(), Ordering::Relaxed);
                    catalog.stats.instances.fetch_sub(1, Ordering::Relaxed);
                    events.push(CatalogEvent {
                        kind: EventKind::Delete(reason),
                        instance: prev,
                    });
                }
            }
        }
        if events.is_empty() {
            return self.empty_commit(current);
        }
        let first = &events[0].instance.service;
        let single = events.iter().all(|e| e.instance.service == *first);
        let batch = Arc::new(RevisionBatch {
            revision,
            events,
            single,
            encoded: OnceLock::new(),
            at: Instant::now(),
        });
        let writer = &mut *self.writer;
        if self.discontinuity {
            writer.history.clear();
            writer.history_len = 0;
            writer.compacted = revision;
        }
        writer.history_len += batch.events.len();
        writer.history.push_back(batch.clone());
        let max_age = catalog.config.history_age;
        while let Some(front) = writer.history.front() {
            let too_many = writer.history_len > catalog.config.history_events;
            let too_old = front.at.elapsed() > max_age;
            if !(too_many || too_old) || writer.history.len() == 1 {
                break;
            }
            writer.history_len -= front.events.len();
            writer.compacted = front.revision;
            writer.history.pop_front();
        }
        fan_out(&writer.watchers, &batch);
        catalog.revision.store(revision, Ordering::Release);
        revision
    }
}

impl Txn<'_> {
    /// A commit that changed nothing: the current revision, except at a
    /// resync point with an external revision, where the catalog still moves
    /// to it and forgets its history (see [`Txn::mark_discontinuity`]).
    fn empty_commit(&mut self, current: u64) -> u64 {
        match self.at {
            Some(at) if self.discontinuity && at > current => {
                let writer = &mut *self.writer;
                writer.history.clear();
                writer.history_len = 0;
                writer.compacted = at;
                self.catalog.revision.store(at, Ordering::Release);
                at
            }
            _ => current,
        }
    }
}

/// Hands a batch to each watcher of the services it touches and to every
/// watch-all watcher. Never blocks: a full buffer flags the watcher for a
/// reset snapshot.
fn fan_out(watchers: &Watchers, batch: &Arc<RevisionBatch>) {
    let send = |slot: &WatcherSlot| {
        if slot.overflowed.load(Ordering::Acquire) {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = slot.tx.try_send(batch.clone()) {
            slot.overflowed.store(true, Ordering::Release);
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
mod tests {
    use super::*;

    fn config() -> CatalogConfig {
        CatalogConfig {
            history_events: 100,
            history_age: Duration::from_secs(60),
            max_watchers: 10,
            max_watchers_per_connection: 10,
            watch_buffer: 4,
            max_services: 100,
        }
    }

    fn inst(service: &str, id: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1:1".into(),
            weight: 1,
            ..Default::default()
        }
    }

    fn put(c: &Catalog, service: &str, id: &str) -> u64 {
        let mut t = c.txn();
        t.put(inst(service, id));
        t.commit()
    }

    #[test]
    fn revisions_advance_once_per_commit_and_resolve_reports_them() {
        let c = Catalog::new(config());
        assert_eq!(c.resolve("a").1, 0);
        assert_eq!(put(&c, "a", "1"), 1);
        assert_eq!(put(&c, "b", "1"), 2);
        let (snap, rev) = c.resolve("a");
        assert_eq!(rev, 2);
        assert_eq!(snap.unwrap().instances.len(), 1);
        let mut t = c.txn();
        t.delete(
            InstanceKey::of(&inst("a", "nope")),
            DeleteReason::Deregistered,
        );
        assert_eq!(t.commit(), 2, "deleting nothing is no change");
    }

    #[test]
    fn snapshot_is_rebuilt_after_change() {
        let c = Catalog::new(config());
        put(&c, "a", "1");
        assert_eq!(c.resolve("a").0.unwrap().instances.len(), 1);
        put(&c, "a", "2");
        let snap = c.resolve("a").0.unwrap();
        let ids: Vec<_> = snap.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
        assert_eq!(snap.revision, 2);
    }

    #[tokio::test]
    async fn slow_watcher_is_flagged_not_blocking() {
        let c = Arc::new(Catalog::new(config()));
        let filter = WatchFilter {
            service: Some("a".into()),
            selector: vec![],
            reader: None,
        };
        let (mut w, _) = c.watch(filter, 0, true, None).unwrap();
        for i in 0..10 {
            put(&c, "a", &i.to_string());
        }
        assert!(w.overflowed());
        let (rev, instances) = c.resnapshot(&mut w);
        assert_eq!((rev, instances.len()), (10, 10));
        assert!(!w.overflowed());
        assert!(w.try_recv().is_none());
        put(&c, "a", "x");
        assert_eq!(w.try_recv().unwrap().revision, 11);
        assert_eq!(c.stats.watcher_resets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn external_revisions_and_resync_points() {
        let c = Arc::new(Catalog::new(config()));
        let mut t = c.txn();
        t.put(inst("a", "1"));
        assert_eq!(t.commit_at(10), 10, "gaps are allowed");
        let mut t = c.txn();
        t.put(inst("a", "2"));
        assert_eq!(t.commit_at(10), 10, "an old revision commits nothing");
        assert_eq!(c.resolve("a").0.unwrap().instances.len(), 1);
        let (_w, start) = c.watch(WatchFilter::default(), 10, true, None).unwrap();
        assert!(matches!(start, WatchStart::Replay(ref b) if b[0].revision == 10));

        // A resync at 20 with an empty diff still moves to 20 and makes
        // resuming at or below it a reset (the missed revisions are gone).
        let mut t = c.txn();
        t.mark_discontinuity();
        assert_eq!(t.commit_at(20), 20);
        assert_eq!(c.revision(), 20);
        assert_eq!(c.compacted_revision(), 20);
        let (_w, start) = c.watch(WatchFilter::default(), 15, true, None).unwrap();
        assert!(matches!(
            start,
            WatchStart::Snapshot {
                reset: Some(ResetReason::Compacted),
                ..
            }
        ));
        let (_w, start) = c.watch(WatchFilter::default(), 21, true, None).unwrap();
        assert!(matches!(start, WatchStart::Replay(ref b) if b.is_empty()));
        let mut t = c.txn();
        t.put(inst("a", "3"));
        assert_eq!(t.commit_at(25), 25);
        assert_eq!(c.resolve("a").0.unwrap().instances[1].revision, 25);
    }

    #[test]
    fn history_is_bounded_and_compaction_forces_reset() {
        let c = Arc::new(Catalog::new(config()));
        for i in 0..150 {
            put(&c, "a", &i.to_string());
        }
        assert_eq!(c.compacted_revision(), 50);
        let (_w, start) = c.watch(WatchFilter::default(), 10, true, None).unwrap();
        assert!(matches!(
            start,
            WatchStart::Snapshot {
                reset: Some(ResetReason::Compacted),
                ..
            }
        ));
        let (_w2, start) = c.watch(WatchFilter::default(), 140, true, None).unwrap();
        match start {
            WatchStart::Replay(b) => {
                assert_eq!(b.first().unwrap().revision, 140);
                assert_eq!(b.len(), 11);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn watcher_caps_and_cleanup() {
        let c = Arc::new(Catalog::new(CatalogConfig {
            max_watchers_per_connection: 2,
            ..config()
        }));
        let conn: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = c
            .watch(WatchFilter::default(), 0, true, Some(conn))
            .unwrap();
        let _b = c
            .watch(WatchFilter::default(), 0, true, Some(conn))
            .unwrap();
        let err = c
            .watch(WatchFilter::default(), 0, true, Some(conn))
            .unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        drop(a);
        assert_eq!(c.stats.watchers.load(Ordering::Relaxed), 1);
        c.watch(WatchFilter::default(), 0, true, Some(conn))
            .unwrap();
    }
}
