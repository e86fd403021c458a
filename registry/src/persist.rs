//! `--data-dir`: every change durable before it is acknowledged, so a
//! restarted registry (even after `kill -9`) comes back with exactly the
//! catalog and leases of its last acknowledged revision or later.
//!
//! The design is etcd's: a write is applied in memory under the catalog's
//! write lock, queued to the log in revision order while the lock is still
//! held, and answered only once the log has it on disk. One writer thread
//! takes everything queued since its last round and commits it as one
//! atomic batch with one `fdatasync` (group commit), so under concurrent
//! load one disk flush acknowledges many writes.
//!
//! The log is [`fjall`], a maintained LSM-tree store with a write-ahead
//! journal; no file format of our own. It holds the state, not a history:
//! - `instances`: `service \0 id` -> the encoded `Instance` (its lease id
//!   and revision included);
//! - `leases`: the big-endian lease id -> [`LeaseRecord`] (TTL, owner);
//!   renewals are never written, a restored lease gets a fresh TTL;
//! - `meta`: the last logged `revision`, the `lease_epoch` of the data
//!   directory, and `life`, a counter incremented (durably) at every start.
//!
//! What a restart guarantees (README, "Restarts"): the restored catalog is
//! the state at one revision R of the previous life, with R at or after the
//! revision of every write that was acknowledged; every restored lease
//! existed at R and holds exactly its instances at R. Lease ids carry the
//! life (see [`crate::lease::LeaseTable::for_life`]), so a new life never
//! grants an id any earlier life granted, acknowledged or not. Revisions go
//! on from R under a new epoch: changes that were visible but not yet
//! durable at the crash may be gone, so a watcher of the old life is reset
//! rather than replayed across them.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Condvar, Mutex};
use prost::Message;
use registry_api::v1::Instance;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    change::LeaseChange,
    error::{Error, Result},
    lease::{LeaseId, MAX_LIFE},
    metrics::{self, Metrics},
};

/// Subdirectory of the data directory holding the store.
pub const STORE_DIR: &str = "store";

/// Meta keys.
const META_REVISION: &[u8] = b"revision";
const META_LEASE_EPOCH: &[u8] = b"lease_epoch";
const META_LIFE: &[u8] = b"life";

/// One lease of the data directory.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    /// Granted TTL.
    #[prost(uint64, tag = "1")]
    pub ttl_ms: u64,
    /// Identity that created it (auth on), so only it may renew it still.
    #[prost(string, optional, tag = "2")]
    pub owner: Option<String>,
}

/// What a start found in the data directory.
#[derive(Debug, Default)]
pub struct Loaded {
    /// This start's life (ids are granted under it).
    pub life: u64,
    /// The lease epoch of the directory: the epoch of its first life.
    pub lease_epoch: u64,
    /// The last logged revision.
    pub revision: u64,
    /// Every lease: id, TTL, owner.
    pub leases: Vec<(LeaseId, u64, Option<Arc<str>>)>,
    /// Every instance, as stored (lease id and revision included).
    pub instances: Vec<Instance>,
    /// Records that could not be decoded (skipped, logged).
    pub undecodable: usize,
}

/// One write's record, queued under the catalog's write lock.
#[derive(Debug)]
pub struct Record {
    /// Its revision (the current one for a write that changed only leases).
    pub revision: u64,
    /// Instances put: key and encoding (revision set).
    pub puts: Vec<crate::catalog::PutRecord>,
    /// Instances deleted.
    pub deletes: Vec<(Arc<str>, Arc<str>)>,
    /// Lease grants and revocations.
    pub leases: Vec<LeaseChange>,
}

#[derive(Debug, Default)]
struct Queue {
    records: Vec<(u64, Record)>,
    stop: bool,
}

/// An open data directory and its writer thread.
pub struct DataDir {
    path: PathBuf,
    db: Database,
    instances: Keyspace,
    leases: Keyspace,
    meta: Keyspace,
    queue: Mutex<Queue>,
    wake: Condvar,
    next_seq: AtomicU64,
    /// The highest sequence number on disk.
    durable: watch::Sender<u64>,
    /// Why the writer stopped, once it failed: the registry refuses writes
    /// from then on (as etcd stops on a failed WAL write).
    failed: Mutex<Option<String>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("path", &self.path)
            .field("durable", &*self.durable.borrow())
            .field("failed", &*self.failed.lock())
            .finish_non_exhaustive()
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::DataDir(format!("{}: {e}", path.display()))
}

fn instance_key(service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(service.len() + 1 + id.len());
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn read_u64(ks: &Keyspace, key: &[u8], path: &Path) -> Result<Option<u64>> {
    match ks.get(key).map_err(|e| io(path, e))? {
        Some(v) if v.len() == 8 => Ok(Some(u64::from_be_bytes((&*v).try_into().expect("8 bytes")))),
        Some(_) => Err(io(path, format!("meta key {key:?} is not a u64"))),
        None => Ok(None),
    }
}

impl DataDir {
    /// Opens (creating if needed) the data directory, starts a new life
    /// (durably, before anything is granted), loads what it holds and starts
    /// the writer thread. `epoch` becomes the lease epoch of a new
    /// directory. Fails when the directory cannot be used: the operator
    /// asked for persistence, so running without it silently would be worse
    /// than not starting.
    pub fn open(dir: &Path, epoch: u64, metrics: Arc<Metrics>) -> Result<(Arc<DataDir>, Loaded)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::DataDir(format!("cannot create {}: {e}", dir.display())))?;
        if dir.join("catalog.snap").exists() {
            warn!(
                dir = %dir.display(),
                "catalog.snap is a snapshot of an older registry version and is ignored"
            );
        }
        let path = dir.join(STORE_DIR);
        let started = Instant::now();
        let db = Database::builder(&path)
            .manual_journal_persist(true)
            .worker_threads(1)
            .open()
            .map_err(|e| io(&path, e))?;
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| io(&path, e))
        };
        let (instances, leases, meta) = (open("instances")?, open("leases")?, open("meta")?);

        let life = read_u64(&meta, META_LIFE, &path)?.unwrap_or(0) + 1;
        if life > MAX_LIFE {
            return Err(Error::DataDir(format!(
                "{}: {life} starts exhaust the lease id space; start with a new data directory",
                path.display()
            )));
        }
        let lease_epoch = read_u64(&meta, META_LEASE_EPOCH, &path)?.unwrap_or(epoch);
        let revision = read_u64(&meta, META_REVISION, &path)?.unwrap_or(0);
        let mut batch = db.batch();
        batch.insert(&meta, META_LIFE, life.to_be_bytes());
        batch.insert(&meta, META_LEASE_EPOCH, lease_epoch.to_be_bytes());
        batch.commit().map_err(|e| io(&path, e))?;
        db.persist(PersistMode::SyncAll).map_err(|e| io(&path, e))?;

        let mut loaded = Loaded {
            life,
            lease_epoch,
            revision,
            ..Loaded::default()
        };
        for item in leases.iter() {
            let (k, v) = item.into_inner().map_err(|e| io(&path, e))?;
            let id = <[u8; 8]>::try_from(&*k).map(u64::from_be_bytes);
            match (id, LeaseRecord::decode(&*v)) {
                (Ok(id), Ok(r)) => loaded.leases.push((id, r.ttl_ms, r.owner.map(Into::into))),
                _ => loaded.undecodable += 1,
            }
        }
        for item in instances.iter() {
            let (_, v) = item.into_inner().map_err(|e| io(&path, e))?;
            match Instance::decode(&*v) {
                Ok(i) => loaded.instances.push(i),
                Err(_) => loaded.undecodable += 1,
            }
        }
        if loaded.undecodable > 0 {
            error!(
                dir = %path.display(),
                records = loaded.undecodable,
                "undecodable records in the data directory were skipped"
            );
        }
        info!(
            dir = %path.display(),
            life,
            revision,
            leases = loaded.leases.len(),
            instances = loaded.instances.len(),
            took = ?started.elapsed(),
            "data directory opened"
        );
        let data = Arc::new(DataDir {
            path,
            db,
            instances,
            leases,
            meta,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            next_seq: AtomicU64::new(1),
            durable: watch::channel(0).0,
            failed: Mutex::new(None),
            thread: Mutex::new(None),
            metrics,
        });
        let writer = data.clone();
        let thread = std::thread::Builder::new()
            .name("registry-data-dir".into())
            .spawn(move || writer.run())
            .map_err(|e| Error::DataDir(format!("cannot start the data directory writer: {e}")))?;
        *data.thread.lock() = Some(thread);
        Ok((data, loaded))
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses writes once the log failed.
    pub fn check(&self) -> Result<()> {
        match &*self.failed.lock() {
            None => Ok(()),
            Some(why) => Err(Error::Unavailable(format!(
                "the data directory cannot be written ({why}); this registry refuses writes until restarted"
            ))),
        }
    }

    /// Queues a record; the caller holds the catalog's write lock, so
    /// records are queued in revision order. Returns its sequence number,
    /// to wait for with [`DataDir::durable`].
    pub fn append(&self, record: Record) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue.lock();
        q.records.push((seq, record));
        drop(q);
        self.wake.notify_one();
        seq
    }

    /// Resolves once record `seq` is on disk, or fails if the log failed.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        let mut rx = self.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            self.check()?;
            if rx.changed().await.is_err() {
                return Err(Error::Unavailable("the data directory was closed".into()));
            }
        }
    }

    /// Writes what is queued and stops the writer thread; later appends are
    /// not written. Blocking: call it off the runtime or at shutdown.
    pub fn close(&self) {
        self.queue.lock().stop = true;
        self.wake.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    fn run(&self) {
        loop {
            let (records, stop) = {
                let mut q = self.queue.lock();
                while q.records.is_empty() && !q.stop {
                    self.wake.wait(&mut q);
                }
                (std::mem::take(&mut q.records), q.stop)
            };
            if let Some(&(last, _)) = records.last() {
                let started = Instant::now();
                match self.write(&records) {
                    Ok(()) => {
                        self.durable.send_replace(last);
                        let m = &self.metrics;
                        metrics::inc(&m.data_dir_commits, 1);
                        metrics::inc(&m.data_dir_records, records.len() as u64);
                        metrics::inc(&m.data_dir_flush_us, started.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        error!(error = %e, "data directory write failed; refusing writes from now on");
                        self.metrics.data_dir_failed.store(true, Ordering::Relaxed);
                        *self.failed.lock() = Some(e.to_string());
                        // Wake the waiters so they see the failure.
                        self.durable.send_modify(|_| {});
                        return;
                    }
                }
            }
            if stop {
                return;
            }
        }
    }

    /// One group commit: every record as one atomic batch, one flush.
    fn write(&self, records: &[(u64, Record)]) -> Result<()> {
        let mut batch = self.db.batch();
        let mut revision = None;
        for (_, r) in records {
            for ((service, id), bytes) in &r.puts {
                batch.insert(&self.instances, instance_key(service, id), &**bytes);
            }
            for (service, id) in &r.deletes {
                batch.remove(&self.instances, instance_key(service, id));
            }
            for change in &r.leases {
                match change {
                    LeaseChange::Grant { id, ttl_ms, owner } => batch.insert(
                        &self.leases,
                        id.to_be_bytes(),
                        LeaseRecord {
                            ttl_ms: *ttl_ms,
                            owner: owner.as_deref().map(str::to_owned),
                        }
                        .encode_to_vec(),
                    ),
                    LeaseChange::Revoke(id) => batch.remove(&self.leases, id.to_be_bytes()),
                }
            }
            revision = Some(revision.unwrap_or(0).max(r.revision));
        }
        if let Some(revision) = revision {
            batch.insert(&self.meta, META_REVISION, revision.to_be_bytes());
        }
        batch.commit().map_err(|e| io(&self.path, e))?;
        self.db
            .persist(PersistMode::SyncData)
            .map_err(|e| io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use registry_api::v1::RegisterRequest;

    use crate::{config::Config, core::Registry};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            Self(std::env::temp_dir().join(format!(
                "registry-persist-{name}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(dir: &TempDir) -> Config {
        Config {
            data_dir: Some(dir.0.clone()),
            ..Config::default()
        }
    }

    async fn register(r: &Registry, service: &str, id: &str, ttl_ms: u64, lease_id: u64) -> u64 {
        r.register(
            RegisterRequest {
                instance: Some(registry_api::v1::Instance {
                    service: service.into(),
                    id: id.into(),
                    address: format!("10.0.0.1:{}", 8000 + id.len()),
                    metadata: HashMap::from([("version".into(), "v2".into())]),
                    ..Default::default()
                }),
                ttl_ms,
                lease_id,
            },
            None,
        )
        .await
        .unwrap()
        .lease_id
    }

    fn ids(r: &Registry, service: &str) -> Vec<(String, String, u64, u64)> {
        r.resolve(service, &HashMap::new(), false, None)
            .unwrap()
            .instances
            .into_iter()
            .map(|i| (i.id, i.address, i.lease_id, i.revision))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_restores_every_acknowledged_change_with_a_fresh_ttl() {
        let dir = TempDir::new("roundtrip");
        let before = Registry::open_memory(config(&dir)).unwrap();
        let shared = register(&before, "prod", "a", 3000, 0).await;
        register(&before, "prod", "bb", 0, shared).await;
        let own = register(&before, "cart", "c", 10_000, 0).await;
        let gone = register(&before, "gone", "g", 1000, 0).await;
        before.deregister_lease(gone, None).await.unwrap();
        before
            .deregister_instance("prod", "bb", None)
            .await
            .unwrap();
        let revision = before.catalog().revision();
        let (prod, cart) = (ids(&before, "prod"), ids(&before, "cart"));
        let lease_epoch = before.lease_epoch();
        drop(before);

        // Time passes while the registry is down: longer than the TTLs.
        tokio::time::advance(Duration::from_secs(60)).await;
        let after = Registry::open_memory(config(&dir)).unwrap();
        assert_eq!(
            ids(&after, "prod"),
            prod,
            "each instance with its lease and revision"
        );
        assert_eq!(ids(&after, "cart"), cart);
        assert!(ids(&after, "gone").is_empty(), "revoked before the restart");
        assert_eq!(after.catalog().revision(), revision, "revisions go on");
        assert_eq!(after.lease_epoch(), lease_epoch, "leases stay valid");
        assert_ne!(after.epoch(), lease_epoch, "revisions start a new epoch");
        assert_eq!(after.status().leases, 2);

        // Each lease got a fresh TTL from the restart: renewable now, and a
        // new register may attach to it.
        let renewed = after.heartbeat(&[shared, own, gone], None).unwrap();
        assert_eq!(
            renewed.iter().map(|s| s.found).collect::<Vec<_>>(),
            [true, true, false]
        );
        register(&after, "prod", "ccc", 0, shared).await;
        let fresh = register(&after, "x", "1", 5000, 0).await;
        assert!(fresh >> 32 > own >> 32, "a new life grants ids of its own");

        // Nobody renews `own`: it expires one TTL after the restart, not
        // before; `shared` is renewed and stays.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(2_020)).await;
            assert!(after.heartbeat(&[shared], None).unwrap()[0].found);
        }
        assert_eq!(after.expire_due(100), 2, "own and x");
        assert!(ids(&after, "cart").is_empty());
        drop(after);
        let third = Registry::open_memory(config(&dir)).unwrap();
        assert!(
            ids(&third, "cart").is_empty(),
            "the expiry was recorded too"
        );
        assert_eq!(ids(&third, "prod").len(), 2);
        assert_eq!(third.status().leases, 1);
    }

    #[tokio::test]
    async fn lease_ids_of_every_life_are_new() {
        let dir = TempDir::new("lives");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let r = Registry::open_memory(config(&dir)).unwrap();
            for i in 0..3 {
                let id = register(&r, "svc", &format!("i{i}"), 5000, 0).await;
                assert!(seen.insert(id), "lease id {id} granted twice");
            }
        }
    }

    #[tokio::test]
    async fn an_old_life_watcher_gets_a_reset_snapshot() {
        let dir = TempDir::new("watch");
        let before = Registry::open_memory(config(&dir)).unwrap();
        register(&before, "prod", "a", 5000, 0).await;
        let revision = before.catalog().revision();
        drop(before);
        let after = Registry::open_memory(config(&dir)).unwrap();
        let (_, start) = after
            .catalog()
            .watch(crate::catalog::WatchFilter::default(), revision, true, None)
            .unwrap();
        match start {
            crate::catalog::WatchStart::Snapshot { view, reset } => {
                assert_eq!(view.len(), 1);
                assert!(reset.is_some(), "history before the restart is gone");
            }
            crate::catalog::WatchStart::Replay(_) => panic!("replayed across a restart"),
        }
    }

    #[tokio::test]
    async fn restore_keeps_within_the_configured_caps_and_forgets_the_rest() {
        let dir = TempDir::new("caps");
        let before = Registry::open_memory(config(&dir)).unwrap();
        let lease = register(&before, "prod", "0", 5000, 0).await;
        for i in 1..5 {
            register(&before, "prod", &i.to_string(), 0, lease).await;
        }
        drop(before);
        let capped = Registry::open_memory(Config {
            max_instances_per_service: 3,
            ..config(&dir)
        })
        .unwrap();
        assert_eq!(ids(&capped, "prod").len(), 3);
        assert_eq!(capped.leases().get(lease).unwrap().instance_count(), 3);
        assert_eq!(capped.status().instances, 3);
        drop(capped);
        let again = Registry::open_memory(config(&dir)).unwrap();
        assert_eq!(ids(&again, "prod").len(), 3, "the dropped ones are gone");
    }

    #[test]
    fn an_unusable_data_dir_refuses_to_start() {
        let dir = TempDir::new("file");
        std::fs::write(&dir.0, b"a file, not a directory").unwrap();
        let err = Registry::open_memory(config(&dir)).unwrap_err();
        assert!(err.to_string().contains("data dir"), "{err}");
        let _ = std::fs::remove_file(&dir.0);
    }
}
