//! The store seam: where a write's change batch goes, and how its revision
//! comes back.
//!
//! `core` validates, authorises, checks caps and builds a [`Batch`] under
//! the catalog's write transaction; expiry and restore build theirs the
//! same way. [`Store::submit`] takes the transaction and the batch and
//! returns a [`Pending`] that resolves to the revision once the store has
//! the batch:
//! - [`Store::Memory`]: this process is the truth. The batch is committed to
//!   the catalog at once (readers see it), then, with a data directory,
//!   queued to the log in revision order; the revision is answered once the
//!   log has it on disk (see [`crate::persist`]).
//! - [`Store::Etcd`]: a node of a cluster. The batch becomes one etcd
//!   transaction; the revision is etcd's, answered once this node's catalog
//!   has applied it (see [`crate::etcd`]).
//!
//! Everything above the seam is the same for both, so there is no store
//! branch in `core`, `server` or `service`.

use std::sync::Arc;

use crate::{
    catalog::{Catalog, Txn},
    change::{Batch, Change, Undo},
    error::{Error, Result},
    etcd::{EtcdStore, EtcdWrite},
    persist::{DataDir, Record},
};

/// Where writes go. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    /// The in-memory catalog, optionally made durable by a data directory.
    Memory(Arc<MemoryStore>),
    /// A node of a cluster over etcd.
    Etcd(Arc<EtcdStore>),
}

/// The in-memory store: the catalog is the truth.
#[derive(Debug)]
pub struct MemoryStore {
    data: Option<Arc<DataDir>>,
}

impl MemoryStore {
    /// A store without (`None`) or with a data directory.
    pub fn new(data: Option<Arc<DataDir>>) -> Self {
        Self { data }
    }

    /// The data directory, if any.
    pub fn data_dir(&self) -> Option<&Arc<DataDir>> {
        self.data.as_ref()
    }

    /// Loads a data directory's content into the (empty) catalog as one
    /// commit at `revision`, keeping each instance's own revision and
    /// writing nothing back (it is on disk already).
    pub fn restore(&self, catalog: &Catalog, batch: Batch, revision: u64) -> u64 {
        let mut txn = catalog.txn();
        txn.mark_restore();
        stage(&mut txn, batch.changes);
        txn.commit_at(revision)
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        if let Some(data) = &self.data {
            data.close();
        }
    }
}

/// A submitted batch on its way into the store: resolves to the revision it
/// was committed at (the current revision when it changed no instance).
/// Dropping it does not undo or stop the write.
#[derive(Debug)]
#[must_use = "a write is acknowledged only once its Pending resolves"]
pub enum Pending {
    /// Committed, nothing left to wait for.
    Done(u64),
    /// Committed in memory; acknowledged once the data directory has it.
    Durable {
        /// Its revision.
        revision: u64,
        /// Its record in the log.
        seq: u64,
        /// The log.
        data: Arc<DataDir>,
    },
    /// Sent to etcd.
    Etcd(EtcdWrite),
    /// Refused before anything changed.
    Failed(Error),
}

impl Pending {
    /// Waits until the store has the batch.
    pub async fn wait(self) -> Result<u64> {
        match self {
            Pending::Done(revision) => Ok(revision),
            Pending::Durable {
                revision,
                seq,
                data,
            } => {
                data.durable(seq).await?;
                Ok(revision)
            }
            Pending::Etcd(write) => write.wait().await,
            Pending::Failed(e) => Err(e),
        }
    }
}

impl Store {
    /// A memory store without a data directory.
    pub fn memory() -> Self {
        Store::Memory(Arc::new(MemoryStore::new(None)))
    }

    /// Whether the store takes writes right now; checked before planning,
    /// so a refused write changes nothing (a failed data directory, a
    /// cluster node cut off from etcd).
    pub fn check_writable(&self) -> Result<()> {
        match self {
            Store::Memory(m) => m.data.as_ref().map_or(Ok(()), |d| d.check()),
            Store::Etcd(e) => e.check_writable(),
        }
    }

    /// Whether this node's answers may be missing changes made elsewhere
    /// (a cluster node without its etcd session).
    pub fn is_stale(&self) -> bool {
        match self {
            Store::Memory(_) => false,
            Store::Etcd(e) => e.is_stale(),
        }
    }

    /// The epoch revisions belong to when the store decides it (a cluster
    /// node: the cluster's, which changes if etcd's history does).
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Store::Memory(_) => None,
            Store::Etcd(e) => Some(e.epoch()),
        }
    }

    /// Waits (briefly) until the catalog has applied `revision`: a cluster
    /// node may be a little behind a revision a client saw on another node.
    /// Nothing to wait for in memory.
    pub async fn catch_up(&self, revision: u64) {
        if let Store::Etcd(e) = self {
            e.catch_up(revision).await;
        }
    }

    /// After shutdown: writes what the data directory has queued, or waits
    /// (briefly) until a cluster node has revoked its etcd lease.
    pub async fn close(&self) {
        match self {
            Store::Memory(m) => {
                if let Some(data) = m.data.clone() {
                    let _ = tokio::task::spawn_blocking(move || data.close()).await;
                }
            }
            Store::Etcd(e) => e.stopped().await,
        }
    }

    /// The etcd store of a cluster node.
    pub fn etcd(&self) -> Option<&Arc<EtcdStore>> {
        match self {
            Store::Memory(_) => None,
            Store::Etcd(e) => Some(e),
        }
    }

    /// Applies `batch`, planned under `txn`, as one revision. `undo` takes
    /// back the planning's lease-table changes should the store fail to
    /// apply the batch; the store runs it itself.
    pub fn submit(&self, mut txn: Txn<'_>, batch: Batch, undo: Undo) -> Pending {
        match self {
            Store::Memory(m) => {
                let Some(data) = &m.data else {
                    stage(&mut txn, batch.changes);
                    return Pending::Done(txn.commit());
                };
                let deletes = batch
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::Delete { key, .. } => Some((key.service.clone(), key.id.clone())),
                        Change::Put { .. } => None,
                    })
                    .collect();
                stage(&mut txn, batch.changes);
                let leases = batch.leases;
                let (revision, seq) = txn.commit_with(|revision, puts| {
                    data.append(Record {
                        revision,
                        puts,
                        deletes,
                        leases,
                    })
                });
                Pending::Durable {
                    revision,
                    seq,
                    data: data.clone(),
                }
            }
            Store::Etcd(e) => {
                let current = txn.current_revision();
                drop(txn);
                Pending::Etcd(e.submit(batch, undo, current))
            }
        }
    }
}

/// Stages a batch's instance changes in a catalog transaction.
fn stage(txn: &mut Txn<'_>, changes: Vec<Change>) {
    for change in changes {
        match change {
            Change::Put { key, instance } => txn.put_keyed(instance, key.id),
            Change::Delete { key, reason, .. } => txn.delete(key, reason),
        }
    }
}
