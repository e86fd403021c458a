//! The change batch: what a write hands to the store.
//!
//! Every write (Register, Deregister, lease expiry, a restore) is turned by
//! `core` or `expiry` into one [`Batch`], the way TiKV's storage turns every
//! command into a list of `Modify`: instance puts and deletes, plus the
//! lease-table changes a durable store must record with them. The store
//! applies the batch as one revision and answers with it (see
//! [`crate::store`]). These types live on their own so that the stores, the
//! data directory and the planners share them without importing each other.

use std::sync::Arc;

use registry_api::v1::{DeleteReason, Instance};

use crate::{catalog::InstanceKey, lease::LeaseId};

/// One change to one instance.
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace an instance (its `lease_id` set).
    Put {
        /// The instance's key, service name interned by the catalog.
        key: InstanceKey,
        /// The instance as it will be stored (revision set on commit).
        instance: Instance,
    },
    /// Remove an instance, and why.
    Delete {
        /// The instance's key.
        key: InstanceKey,
        /// Deregistered or expired.
        reason: DeleteReason,
        /// Only while the instance is still under this lease (a lease's
        /// revocation or expiry: the instance may have moved to another
        /// lease, or another cluster node, since). `None`: wherever it is
        /// (deregistration of the instance itself).
        lease: Option<LeaseId>,
    },
}

/// A change to the lease table that outlives the process with a data
/// directory: grants and revocations. Renewals are never recorded; a
/// restored lease starts a fresh TTL.
#[derive(Debug, Clone)]
pub enum LeaseChange {
    /// A new lease.
    Grant {
        /// Its id.
        id: LeaseId,
        /// Its TTL.
        ttl_ms: u64,
        /// The identity that created it (auth on).
        owner: Option<Arc<str>>,
    },
    /// A lease revoked or expired.
    Revoke(LeaseId),
}

/// The changes of one write, applied as one revision.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Instance changes, in order.
    pub changes: Vec<Change>,
    /// Lease changes recorded with them.
    pub leases: Vec<LeaseChange>,
}

impl Batch {
    /// Whether the batch changes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.leases.is_empty()
    }
}

/// How to take back what a write's planning did to the lease table, should
/// the store fail to apply the batch (a cluster node whose etcd write
/// failed). The store runs it itself, so a request cancelled while waiting
/// cannot skip it.
#[derive(Debug, Clone, Default)]
pub struct Undo {
    /// A lease the write granted: revoke it.
    pub granted: Option<LeaseId>,
    /// Keys the write attached to a lease: detach them.
    pub attached: Vec<(LeaseId, InstanceKey)>,
    /// Keys the write detached from a lease: attach them again.
    pub detached: Vec<(LeaseId, InstanceKey)>,
}
