//! Liveness: the lease table and its expiry queue.
//!
//! A lease is a TTL and a deadline. Heartbeats are the hottest path in the
//! daemon, so renewing is one map lookup (a dashmap shard read lock) and one
//! atomic store: the expiry queue is *not* touched. The queue is a min-heap of
//! `(deadline, lease)` entries, at most one per lease, popped lazily: when an
//! entry comes due the lease's real deadline is read, and a renewed lease is
//! simply pushed back with its new deadline (the pattern of etcd's
//! `lease_queue.go`). So each live lease costs one O(log n) heap operation per
//! TTL period however often it is renewed, and the expiry task never scans.
//!
//! This module knows nothing about instances beyond the keys attached to a
//! lease; deleting them is the catalog's job (see `core`).

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::{sync::Notify, time::Instant};

use crate::catalog::InstanceKey;

/// Lease identifier, unique across restarts with overwhelming probability
/// (random start) so a client's stale id never renews someone else's lease.
pub type LeaseId = u64;

/// Monotonic millisecond clock anchored at the table's creation. Uses tokio's
/// `Instant`, so tests drive it with a paused clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// Anchors the clock now.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// Milliseconds since the anchor.
    pub fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// The instant `ms` after the anchor, for sleeping until a deadline.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One lease: a TTL, a deadline, and the instance keys living under it.
#[derive(Debug)]
pub struct Lease {
    /// The lease's id.
    pub id: LeaseId,
    /// Granted TTL in milliseconds; every renewal moves the deadline to now + ttl.
    pub ttl_ms: u64,
    /// Milliseconds on the table's clock after which the lease is dead.
    deadline_ms: AtomicU64,
    /// Identity that created the lease (with auth on): only it may renew or
    /// revoke it.
    pub owner: Option<Arc<str>>,
    /// Instances attached. Only changed under the catalog's write lock, so
    /// this mutex is never contended; it exists for interior mutability.
    /// Inline storage for one key: most leases carry one instance, and a
    /// heap allocation per lease is measurable at a million leases.
    pub(crate) instances: Mutex<SmallVec<[InstanceKey; 1]>>,
}

impl Lease {
    /// Deadline on the table's clock, in ms.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(Ordering::Acquire)
    }

    /// Whether the lease is still alive at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.deadline_ms() > now_ms
    }

    /// Number of instances attached.
    pub fn instance_count(&self) -> usize {
        self.instances.lock().len()
    }
}

/// All live leases plus the queue the expiry task pops from.
#[derive(Debug)]
pub struct LeaseTable {
    leases: DashMap<LeaseId, Arc<Lease>>,
    queue: Mutex<BinaryHeap<Reverse<(u64, LeaseId)>>>,
    /// Woken when a lease is granted with a deadline earlier than the queue's
    /// head, so the expiry task's sleep is shortened.
    wake: Notify,
    next_id: AtomicU64,
    clock: Clock,
}

impl LeaseTable {
    /// An empty table on the given clock.
    pub fn new(clock: Clock) -> Self {
        // Random start in [2^32, 2^52): ids stay exact in JSON doubles and
        // don't repeat across restarts.
        let start = (rand::random::<u64>() >> 12) | (1 << 32);
        Self {
            leases: DashMap::new(),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Notify::new(),
            next_id: AtomicU64::new(start),
            clock,
        }
    }

    /// The clock deadlines are measured on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Live lease count (including ones past their deadline that the expiry
    /// task has not reaped yet).
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no lease exists.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Creates a lease expiring `ttl` from now.
    pub fn grant(&self, ttl: Duration) -> Arc<Lease> {
        self.grant_owned(ttl, None)
    }

    /// Creates a lease owned by an identity.
    pub fn grant_owned(&self, ttl: Duration, owner: Option<Arc<str>>) -> Arc<Lease> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.insert(id, ttl, owner)
    }

    fn insert(&self, id: LeaseId, ttl: Duration, owner: Option<Arc<str>>) -> Arc<Lease> {
        let ttl_ms = ttl.as_millis() as u64;
        let deadline = self.clock.now_ms() + ttl_ms;
        let lease = Arc::new(Lease {
            id,
            ttl_ms,
            deadline_ms: AtomicU64::new(deadline),
            owner,
            instances: Mutex::new(SmallVec::new()),
        });
        self.leases.insert(id, lease.clone());
        let earliest = {
            let mut q = self.queue.lock();
            let earliest = q.peek().is_none_or(|Reverse((d, _))| deadline < *d);
            q.push(Reverse((deadline, id)));
            earliest
        };
        if earliest {
            self.wake.notify_one();
        }
        lease
    }

    /// Recreates a lease under the id it had before a restart (see
    /// `crate::persist`), with a fresh TTL from now, as etcd restores leases.
    /// Ids granted afterwards stay above every restored one, so a restored
    /// lease can never be handed to somebody else. `None` when the id is
    /// already in use.
    pub fn restore(
        &self,
        id: LeaseId,
        ttl: Duration,
        owner: Option<Arc<str>>,
    ) -> Option<Arc<Lease>> {
        if id == 0 || self.leases.contains_key(&id) {
            return None;
        }
        self.next_id
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
        Some(self.insert(id, ttl, owner))
    }

    /// Every lease's id, TTL and owner, for a snapshot. Weakly consistent
    /// (DashMap iteration): leases granted or revoked meanwhile may or may
    /// not appear.
    pub fn records(&self) -> Vec<(LeaseId, u64, Option<Arc<str>>)> {
        self.leases
            .iter()
            .map(|l| (l.id, l.ttl_ms, l.owner.clone()))
            .collect()
    }

    /// The lease if it exists and has not passed its deadline.
    pub fn get_live(&self, id: LeaseId) -> Option<Arc<Lease>> {
        let lease = self.leases.get(&id)?;
        lease.is_live(self.clock.now_ms()).then(|| lease.clone())
    }

    /// The lease even if past its deadline (for lookups like TTL display).
    pub fn get(&self, id: LeaseId) -> Option<Arc<Lease>> {
        self.leases.get(&id).map(|l| l.clone())
    }

    /// Renews a live lease: O(1), no queue work. Returns its TTL, or `None`
    /// when the lease is unknown or already past its deadline.
    pub fn renew(&self, id: LeaseId) -> Option<u64> {
        let lease = self.leases.get(&id)?;
        let now = self.clock.now_ms();
        let current = lease.deadline_ms.load(Ordering::Acquire);
        if current <= now {
            return None;
        }
        // fetch_max: a concurrent renewal never moves the deadline backwards.
        lease
            .deadline_ms
            .fetch_max(now + lease.ttl_ms, Ordering::AcqRel);
        Some(lease.ttl_ms)
    }

    /// Milliseconds left before the lease's deadline (0 when past it).
    pub fn remaining_ms(&self, id: LeaseId) -> Option<u64> {
        let lease = self.leases.get(&id)?;
        Some(lease.deadline_ms().saturating_sub(self.clock.now_ms()))
    }

    /// Removes a lease from the table (revocation or expiry). Its queue entry
    /// is left behind and skipped when popped.
    pub fn remove(&self, id: LeaseId) -> Option<Arc<Lease>> {
        self.leases.remove(&id).map(|(_, l)| l)
    }

    /// Pops up to `limit` leases whose deadline is at or before `now_ms`.
    /// Renewed leases met on the way are re-queued at their real deadline;
    /// revoked ones are dropped. Does not remove the leases from the table:
    /// the caller does that under the catalog lock, after re-checking.
    pub fn pop_expired(&self, now_ms: u64, limit: usize) -> Vec<Arc<Lease>> {
        let mut out = Vec::new();
        let mut q = self.queue.lock();
        while out.len() < limit {
            let Some(Reverse((deadline, id))) = q.peek().copied() else {
                break;
            };
            if deadline > now_ms {
                break;
            }
            q.pop();
            let Some(lease) = self.leases.get(&id).map(|l| l.clone()) else {
                continue;
            };
            let real = lease.deadline_ms();
            if real > now_ms {
                q.push(Reverse((real, id)));
            } else {
                out.push(lease);
            }
        }
        out
    }

    /// Puts a lease back in the queue at its current deadline (used when the
    /// expiry pass found it renewed at the last moment).
    pub fn requeue(&self, lease: &Lease) {
        self.queue
            .lock()
            .push(Reverse((lease.deadline_ms(), lease.id)));
    }

    /// Deadline of the queue's head: the earliest the next expiry can happen.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.queue.lock().peek().map(|Reverse((d, _))| *d)
    }

    /// Resolves when a lease is granted with a deadline earlier than all
    /// others; the expiry task races this against its sleep.
    pub async fn earlier_deadline(&self) {
        self.wake.notified().await
    }

    /// Extends every lease's deadline by `by`: used after the daemon itself
    /// was stalled, so leases don't pay for time the registry was not running.
    pub fn extend_all(&self, by: Duration) {
        let by = by.as_millis() as u64;
        for lease in self.leases.iter() {
            lease.deadline_ms.fetch_add(by, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl_not_before() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(table.pop_expired(table.clock().now_ms(), 10).is_empty());
        assert!(table.get_live(lease.id).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        let expired = table.pop_expired(table.clock().now_ms(), 10);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].id, lease.id);
        assert!(table.get_live(lease.id).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_moves_deadline_and_requeues_lazily() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(3));
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(table.renew(lease.id), Some(3000));
        }
        // 5 s in, renewed 1 s ago: the stale heap entry (t=3s) was not
        // rewritten by renewals, but popping it finds the lease alive.
        assert!(table.pop_expired(table.clock().now_ms(), 10).is_empty());
        assert_eq!(table.next_deadline_ms(), Some(8000));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(table.pop_expired(table.clock().now_ms(), 10).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_of_expired_or_unknown_lease_fails() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(1));
        assert_eq!(table.renew(lease.id + 1), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(table.renew(lease.id), None, "past its deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn pops_in_deadline_order_with_a_cap() {
        let table = LeaseTable::new(Clock::new());
        let ids: Vec<_> = [5u64, 1, 3, 2, 4]
            .iter()
            .map(|s| (table.grant(Duration::from_secs(*s)).id, *s))
            .collect();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = table.clock().now_ms();
        let first = table.pop_expired(now, 3);
        let rest = table.pop_expired(now, 10);
        let order: Vec<u64> = first
            .iter()
            .chain(rest.iter())
            .map(|l| ids.iter().find(|(id, _)| *id == l.id).unwrap().1)
            .collect();
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn revoked_lease_is_skipped() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(1));
        table.remove(lease.id);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(table.pop_expired(table.clock().now_ms(), 10).is_empty());
        assert_eq!(table.next_deadline_ms(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn extend_all_postpones_expiry() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(900)).await;
        table.extend_all(Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(table.pop_expired(table.clock().now_ms(), 10).is_empty());
        assert!(table.get_live(lease.id).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn restored_lease_keeps_its_id_with_a_fresh_ttl() {
        let table = LeaseTable::new(Clock::new());
        let high = u64::MAX / 4;
        let lease = table
            .restore(high, Duration::from_secs(2), Some("svc".into()))
            .unwrap();
        assert_eq!(lease.id, high);
        assert_eq!(lease.owner.as_deref(), Some("svc"));
        assert!(
            table.restore(high, Duration::from_secs(2), None).is_none(),
            "id in use"
        );
        assert!(
            table.grant(Duration::from_secs(1)).id > high,
            "new ids stay above restored ones"
        );
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(table.get_live(high).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(table.get_live(high).is_none());
        assert_eq!(table.records().len(), 2);
    }
}
