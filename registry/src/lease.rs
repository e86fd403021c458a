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
//! The table owns each lease's list of attached instance keys, as etcd's
//! `Lessor` owns its items: [`LeaseTable::attach`], [`LeaseTable::detach`]
//! and [`LeaseTable::revoke`] are the only ways to change it. It knows
//! nothing about instances beyond those keys; deleting them is the store's
//! job, and callers change attachments while holding the catalog's write
//! transaction, so a lease's keys and the catalog never disagree.
//!
//! Lease ids are never reused by a later life of a registry restored from
//! the same data directory: with a data directory, ids are
//! `life << 32 | n`, where `life` is a counter the data directory persists
//! and increments at every start (see `crate::persist`); without one, the
//! first id is random, and nothing survives a restart anyway.

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

/// Lease identifier, never granted twice by the lives of one data directory
/// (and unique across restarts with overwhelming probability without one),
/// so a client's stale id never renews someone else's lease.
pub type LeaseId = u64;

/// Ids granted per life before the table refuses to grant more: the low 32
/// bits of a life-scoped id. Four billion grants is decades of churn at a
/// thousand registrations a second; a restart starts a new life.
pub const IDS_PER_LIFE: u64 = 1 << 32;

/// Largest life counter: ids stay below 2^53, exact in JSON doubles.
pub const MAX_LIFE: u64 = (1 << 21) - 1;

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
    /// Instances attached. Only changed through the table's methods, under
    /// the catalog's write lock, so this mutex is never contended; it exists
    /// for interior mutability. Inline storage for one key: most leases
    /// carry one instance, and a heap allocation per lease is measurable at
    /// a million leases.
    keys: Mutex<LeaseKeys>,
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
        self.keys.lock().len()
    }

    /// The keys of the instances attached (a copy).
    pub fn keys(&self) -> LeaseKeys {
        self.keys.lock().clone()
    }
}

/// The instance keys of one lease.
pub type LeaseKeys = SmallVec<[InstanceKey; 1]>;

/// All live leases plus the queue the expiry task pops from.
#[derive(Debug)]
pub struct LeaseTable {
    leases: DashMap<LeaseId, Arc<Lease>>,
    queue: Mutex<BinaryHeap<Reverse<(u64, LeaseId)>>>,
    /// Woken when a lease is granted with a deadline earlier than the queue's
    /// head, so the expiry task's sleep is shortened.
    wake: Notify,
    next_id: AtomicU64,
    /// First id this life may not grant (`u64::MAX` without a life).
    id_limit: u64,
    clock: Clock,
}

impl LeaseTable {
    /// An empty table on the given clock, granting ids from a random start
    /// in [2^32, 2^52) (exact in JSON doubles, distinct across restarts with
    /// overwhelming probability).
    pub fn new(clock: Clock) -> Self {
        let start = (rand::random::<u64>() >> 12) | (1 << 32);
        Self::starting_at(clock, start, u64::MAX)
    }

    /// An empty table granting ids of life `life` (`life << 32 | n`, n from
    /// 1): a life counter the data directory persists makes every life's ids
    /// disjoint from every other's.
    pub fn for_life(clock: Clock, life: u64) -> Self {
        assert!((1..=MAX_LIFE).contains(&life), "life {life} out of range");
        Self::starting_at(clock, (life << 32) | 1, (life + 1) << 32)
    }

    fn starting_at(clock: Clock, start: u64, id_limit: u64) -> Self {
        Self {
            leases: DashMap::new(),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Notify::new(),
            next_id: AtomicU64::new(start),
            id_limit,
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
            .expect("a fresh table has ids to grant")
    }

    /// Creates a lease owned by an identity; `None` once this life has
    /// granted [`IDS_PER_LIFE`] ids (a restart begins a new life).
    pub fn grant_owned(&self, ttl: Duration, owner: Option<Arc<str>>) -> Option<Arc<Lease>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (id < self.id_limit).then(|| self.insert(id, ttl, owner))
    }

    fn insert(&self, id: LeaseId, ttl: Duration, owner: Option<Arc<str>>) -> Arc<Lease> {
        let ttl_ms = ttl.as_millis() as u64;
        let deadline = self.clock.now_ms() + ttl_ms;
        let lease = Arc::new(Lease {
            id,
            ttl_ms,
            deadline_ms: AtomicU64::new(deadline),
            owner,
            keys: Mutex::new(SmallVec::new()),
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

    /// Attaches an instance key to a lease (idempotent).
    pub fn attach(&self, lease: &Lease, key: InstanceKey) {
        let mut keys = lease.keys.lock();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// Detaches an instance key from a lease, if both exist; true if it was
    /// attached.
    pub fn detach(&self, lease_id: LeaseId, key: &InstanceKey) -> bool {
        let Some(lease) = self.get(lease_id) else {
            return false;
        };
        let mut keys = lease.keys.lock();
        let before = keys.len();
        keys.retain(|k| k != key);
        keys.len() != before
    }

    /// Removes a lease from the table (revocation or expiry) and takes its
    /// keys: the instances the caller must now delete. Its queue entry is
    /// left behind and skipped when popped.
    pub fn revoke(&self, id: LeaseId) -> Option<(Arc<Lease>, LeaseKeys)> {
        let (_, lease) = self.leases.remove(&id)?;
        let keys = std::mem::take(&mut *lease.keys.lock());
        Some((lease, keys))
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

    fn key(id: &str) -> InstanceKey {
        InstanceKey {
            service: "svc".into(),
            id: id.into(),
        }
    }

    #[test]
    fn life_scoped_ids_are_disjoint_across_lives_and_bounded() {
        let first = LeaseTable::for_life(Clock::new(), 1);
        let second = LeaseTable::for_life(Clock::new(), 2);
        let a: Vec<_> = (0..3)
            .map(|_| first.grant(Duration::from_secs(1)).id)
            .collect();
        let b: Vec<_> = (0..3)
            .map(|_| second.grant(Duration::from_secs(1)).id)
            .collect();
        assert_eq!(a, [(1 << 32) + 1, (1 << 32) + 2, (1 << 32) + 3]);
        assert!(b.iter().all(|id| *id > a[2] && *id >> 32 == 2));
        let last = LeaseTable::for_life(Clock::new(), MAX_LIFE);
        assert!(last.grant(Duration::from_secs(1)).id < 1 << 53);
        last.next_id
            .store(((MAX_LIFE + 1) << 32) - 1, Ordering::Relaxed);
        assert!(last.grant_owned(Duration::from_secs(1), None).is_some());
        assert!(
            last.grant_owned(Duration::from_secs(1), None).is_none(),
            "this life's ids are used up"
        );
    }

    #[test]
    fn the_table_owns_attachments() {
        let table = LeaseTable::new(Clock::new());
        let lease = table.grant(Duration::from_secs(5));
        table.attach(&lease, key("a"));
        table.attach(&lease, key("a"));
        table.attach(&lease, key("b"));
        assert_eq!(lease.instance_count(), 2, "attach is idempotent");
        assert!(table.detach(lease.id, &key("a")));
        assert!(!table.detach(lease.id, &key("a")));
        assert!(!table.detach(lease.id + 1, &key("b")), "no such lease");
        let (revoked, keys) = table.revoke(lease.id).unwrap();
        assert_eq!(revoked.id, lease.id);
        assert_eq!(keys.as_slice(), [key("b")]);
        assert!(table.revoke(lease.id).is_none());
        assert_eq!(lease.instance_count(), 0);
    }

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
        table.revoke(lease.id);
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
