//! The expiry task: removes leases past their deadline, and refuses to be
//! the reason healthy services vanish.
//!
//! One task, one ordered structure (the lease table's deadline heap). It
//! sleeps until the earliest deadline, but never longer than
//! [`STALL_CHECK_INTERVAL`], so it always knows when it meant to wake up.
//! Two guards run before anything expires:
//!
//! - **Pause safety.** If the task wakes more than `stall_threshold` after
//!   it meant to, the daemon was not running (SIGSTOP, a VM freeze, CPU
//!   starvation), and neither was anything that could have received a
//!   heartbeat. Every lease is extended by the whole delay before expiry
//!   runs, so leases do not pay for time the registry was not serving
//!   (counted in `registry_stall_extensions_total`, logged at WARN). Time is
//!   tokio's monotonic clock, so wall-clock jumps never look like a stall.
//! - **Storm guard.** If, within one second, the leases already expired plus
//!   those due now exceed `storm_fraction` of all leases (with at least
//!   `storm_min_leases`), something other than instance deaths is going on
//!   (a network partition, a clock problem). The due leases go into a
//!   backlog that is expired at `storm_rate` per second, oldest deadline
//!   first, while `registry_expiry_storm` is 1. Expiry slows down but never
//!   stops — the failure Eureka's self-preservation is known for — and the
//!   storm ends when the backlog is empty. Throttled leases cannot be
//!   renewed (they are past their deadline), but their instances stay
//!   resolvable while they wait, and a client that comes back re-registers,
//!   which replaces its instance instead of deleting it.

use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering, time::Duration};

use registry_api::v1::DeleteReason;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    catalog::Catalog,
    change::{Batch, Change, LeaseChange, Undo},
    config::Config,
    lease::{Lease, LeaseTable},
    metrics::{self, Metrics},
    store::Store,
};

/// Most leases expired in one pass of the expiry task before it yields, so
/// an expiry storm cannot starve request handling.
pub const EXPIRY_BATCH: usize = 256;

/// Longest the task sleeps without looking at the clock. A stall that
/// starts just after the task went to sleep is under-measured by at most
/// this much, so leases lose at most this much of a pause; waking four
/// times a second costs nothing measurable.
pub const STALL_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The span over which expirations are compared with the lease count to
/// detect a storm ("more than a fraction of all leases within one second").
pub const STORM_WINDOW: Duration = Duration::from_secs(1);

/// How often a throttled backlog is worked on: ten slices a second keep the
/// rate smooth without waking the task more than needed.
pub const STORM_TICK: Duration = Duration::from_millis(100);

/// The tunables of expiry, from the registry's configuration.
#[derive(Debug, Clone)]
struct Tunables {
    stall_threshold: Duration,
    storm_fraction: f64,
    storm_min_leases: usize,
    storm_rate: u32,
}

/// What expiring a lease needs: the lease table it is revoked from, the
/// catalog transaction its deletes are planned under, the store they go to,
/// and the counters. Handed over at start, so this module needs nothing of
/// the registry handle.
#[derive(Debug, Clone)]
pub struct Expirer {
    leases: Arc<LeaseTable>,
    catalog: Arc<Catalog>,
    store: Store,
    metrics: Arc<Metrics>,
    tunables: Tunables,
}

impl Expirer {
    /// An expirer over these handles.
    pub fn new(
        leases: Arc<LeaseTable>,
        catalog: Arc<Catalog>,
        store: Store,
        metrics: Arc<Metrics>,
        config: &Config,
    ) -> Self {
        Self {
            leases,
            catalog,
            store,
            metrics,
            tunables: Tunables {
                stall_threshold: config.stall_threshold,
                storm_fraction: config.storm_fraction,
                storm_min_leases: config.storm_min_leases,
                storm_rate: config.storm_rate,
            },
        }
    }

    /// Expires up to `limit` leases that are past their deadline.
    pub fn expire_due(&self, limit: usize) -> usize {
        let due = self.leases.pop_expired(self.leases.clock().now_ms(), limit);
        self.expire_leases(due)
    }

    /// Expires leases popped from the queue as due, each with its instances
    /// in one revision, through the store like any write (the deletes only
    /// where the instance is still under the lease); any found renewed (or
    /// extended after a stall) since goes back in the queue. Returns how
    /// many expired.
    pub fn expire_leases(&self, due: impl IntoIterator<Item = Arc<Lease>>) -> usize {
        let leases = &self.leases;
        let now = leases.clock().now_ms();
        let mut expired = 0;
        for lease in due {
            let txn = self.catalog.txn();
            // Re-check under the lock: a register may have renewed it since.
            if lease.is_live(leases.clock().now_ms()) {
                leases.requeue(&lease);
                continue;
            }
            let Some((_, keys)) = leases.revoke(lease.id) else {
                continue;
            };
            let n = keys.len();
            let batch = Batch {
                changes: keys
                    .into_iter()
                    .map(|key| Change::Delete {
                        key,
                        reason: DeleteReason::Expired,
                        lease: Some(lease.id),
                    })
                    .collect(),
                leases: vec![LeaseChange::Revoke(lease.id)],
            };
            // Nobody waits for an expiry to be durable: a crash before the
            // flush restores the lease, which then expires again.
            let _ = self.store.submit(txn, batch, Undo::default());
            expired += 1;
            metrics::inc(&self.metrics.lease_expirations, 1);
            metrics::inc(&self.metrics.expired_instances, n as u64);
            debug!(
                lease_id = lease.id,
                instances = n,
                late_ms = now.saturating_sub(lease.deadline_ms()),
                "lease expired"
            );
        }
        expired
    }
}

/// Runs the expiry task until `shutdown` is cancelled.
pub(crate) async fn run(expirer: Expirer, shutdown: CancellationToken) {
    let leases = expirer.leases.clone();
    let clock = leases.clock();
    let mut task = Expiry::new(expirer);
    loop {
        let now = Instant::now();
        let mut wake_at = now + STALL_CHECK_INTERVAL;
        if let Some(ms) = leases.next_deadline_ms() {
            wake_at = wake_at.min(clock.instant_at(ms));
        }
        if task.storm.is_some() {
            wake_at = wake_at.min(now + STORM_TICK);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = leases.earlier_deadline() => {}
        }
        task.check_stall(wake_at);
        task.expire().await;
    }
}

/// State of the expiry task between passes.
struct Expiry {
    expirer: Expirer,
    window: Window,
    storm: Option<Storm>,
}

/// Expirations in the current storm-detection window.
struct Window {
    start: Instant,
    /// Leases at the window's start: the "all leases" of the fraction.
    population: usize,
    expired: usize,
}

/// A throttled backlog of due leases.
struct Storm {
    backlog: VecDeque<Arc<Lease>>,
    /// Expiry allowance in thousandths of a lease (integer, so a rate of 10
    /// per second is exactly one lease per 100 ms tick).
    tokens_milli: u64,
    last_refill: Instant,
}

impl Expiry {
    fn new(expirer: Expirer) -> Self {
        let population = expirer.leases.len();
        Self {
            expirer,
            window: Window {
                start: Instant::now(),
                population,
                expired: 0,
            },
            storm: None,
        }
    }

    /// Extends every lease by how late this wake-up is, if that is more
    /// than the stall threshold.
    fn check_stall(&mut self, meant_to_wake: Instant) {
        let late = Instant::now().saturating_duration_since(meant_to_wake);
        if late <= self.expirer.tunables.stall_threshold {
            return;
        }
        let leases = &self.expirer.leases;
        leases.extend_all(late);
        let m = &self.expirer.metrics;
        metrics::inc(&m.stall_extensions, 1);
        metrics::inc(&m.stall_ms, late.as_millis() as u64);
        warn!(
            stall_ms = late.as_millis() as u64,
            leases = leases.len(),
            "the registry was not running for longer than the stall threshold; every lease extended by the stall before expiring anything"
        );
        // Backlogged leases were extended too: live ones go back in the queue.
        if let Some(storm) = &mut self.storm {
            let now = leases.clock().now_ms();
            storm.backlog.retain(|l| {
                let live = l.is_live(now);
                if live {
                    leases.requeue(l);
                }
                !live
            });
        }
        // The window's time was not real time either.
        self.window.start = Instant::now();
        self.window.expired = 0;
    }

    /// One pass: expires what is due, or feeds the storm backlog.
    async fn expire(&mut self) {
        let leases = &self.expirer.leases;
        let now = Instant::now();
        let now_ms = leases.clock().now_ms();
        if self.storm.is_some() {
            self.throttled_pass(now, now_ms);
            return;
        }
        if now.duration_since(self.window.start) >= STORM_WINDOW {
            self.window = Window {
                start: now,
                population: leases.len(),
                expired: 0,
            };
        }
        let config = &self.expirer.tunables;
        let allowance =
            if self.window.population >= config.storm_min_leases && config.storm_fraction < 1.0 {
                ((config.storm_fraction * self.window.population as f64) as usize)
                    .saturating_sub(self.window.expired)
            } else {
                usize::MAX
            };
        let due = leases.pop_expired(now_ms, allowance.saturating_add(1));
        if due.len() > allowance {
            self.start_storm(due, now, now_ms);
            return;
        }
        self.window.expired += due.len();
        let mut due = due.into_iter();
        while due.len() > 0 {
            self.expirer.expire_leases(due.by_ref().take(EXPIRY_BATCH));
            if due.len() > 0 {
                // Cap the work of one slice so requests are not starved.
                tokio::task::yield_now().await;
            }
        }
    }

    fn start_storm(&mut self, due: Vec<Arc<Lease>>, now: Instant, now_ms: u64) {
        let leases = &self.expirer.leases;
        let mut backlog = VecDeque::from(due);
        backlog.extend(leases.pop_expired(now_ms, usize::MAX));
        let m = &self.expirer.metrics;
        metrics::inc(&m.storms, 1);
        metrics::inc(&m.storm_throttled, backlog.len() as u64);
        m.storm_active.store(true, Ordering::Relaxed);
        m.storm_backlog.store(backlog.len(), Ordering::Relaxed);
        let config = &self.expirer.tunables;
        warn!(
            due = backlog.len(),
            expired_this_second = self.window.expired,
            leases = self.window.population,
            fraction = config.storm_fraction,
            rate_per_s = config.storm_rate,
            "expiry storm: too many leases expiring at once; expiring them gradually"
        );
        self.storm = Some(Storm {
            backlog,
            tokens_milli: 0,
            last_refill: now,
        });
    }

    fn throttled_pass(&mut self, now: Instant, now_ms: u64) {
        let Some(storm) = &mut self.storm else {
            return;
        };
        let leases = &self.expirer.leases;
        let m = &self.expirer.metrics;
        let more = leases.pop_expired(now_ms, usize::MAX);
        metrics::inc(&m.storm_throttled, more.len() as u64);
        storm.backlog.extend(more);

        let rate = u64::from(self.expirer.tunables.storm_rate.max(1));
        let elapsed_ms = now.duration_since(storm.last_refill).as_millis() as u64;
        storm.last_refill = now;
        // At most one second's worth accumulates, so a gap (or a stall)
        // never turns into a burst.
        storm.tokens_milli = (storm.tokens_milli + elapsed_ms * rate).min(rate * 1000);
        let n = ((storm.tokens_milli / 1000) as usize).min(storm.backlog.len());
        storm.tokens_milli -= n as u64 * 1000;
        let batch: Vec<_> = storm.backlog.drain(..n).collect();
        self.expirer.expire_leases(batch);
        m.storm_backlog
            .store(storm.backlog.len(), Ordering::Relaxed);

        if storm.backlog.is_empty() {
            self.storm = None;
            m.storm_active.store(false, Ordering::Relaxed);
            self.window = Window {
                start: now,
                population: leases.len(),
                expired: 0,
            };
            info!("expiry storm over: backlog drained");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Registry};
    use registry_api::v1::{Instance, RegisterRequest};

    fn req(id: &str, ttl_ms: u64) -> RegisterRequest {
        RegisterRequest {
            instance: Some(Instance {
                service: "svc".into(),
                id: id.into(),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            }),
            ttl_ms,
            lease_id: 0,
        }
    }

    /// Lets the expiry task run at the current (paused) instant.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// Registers a lease, runs for a second, then jumps the clock 10 s with
    /// no task running — what a SIGSTOP/SIGCONT looks like to the daemon.
    async fn freeze_for_ten_seconds(config: Config) -> (Registry, u64) {
        let r = Registry::new(config);
        let _task = r.spawn_expiry();
        let lease = r.register(req("a", 3000), None).await.unwrap().lease_id;
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        (r, lease)
    }

    #[tokio::test(start_paused = true)]
    async fn stall_extends_every_lease_before_expiring() {
        let (r, lease) = freeze_for_ten_seconds(Config::default()).await;
        assert_eq!(r.metrics().stall_extensions(), 1);
        assert_eq!(r.status().instances, 1, "the lease survived the freeze");
        let remaining = r.leases().remaining_ms(lease).unwrap();
        // It had 2 s left when the freeze began; it loses at most one check
        // interval of the freeze.
        let lost = STALL_CHECK_INTERVAL.as_millis() as u64;
        assert!(
            (2000 - lost - 5..=2000).contains(&remaining),
            "{remaining} ms left"
        );
        // Not frozen forever: without heartbeats it still expires.
        tokio::time::sleep(Duration::from_millis(remaining + 5)).await;
        assert_eq!(r.status().instances, 0);
        assert_eq!(r.metrics().stall_extensions(), 1, "no second stall");
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_guard_the_same_freeze_expires_the_lease() {
        let (r, _) = freeze_for_ten_seconds(Config {
            stall_threshold: Duration::from_secs(3600),
            ..Config::default()
        })
        .await;
        assert_eq!(r.metrics().stall_extensions(), 0);
        assert_eq!(r.status().instances, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_working_after_a_stall() {
        let (r, lease) = freeze_for_ten_seconds(Config::default()).await;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(r.heartbeat(&[lease], None).unwrap()[0].ttl_ms, 3000);
        }
        assert_eq!(r.status().instances, 1);
        assert_eq!(r.metrics().stall_extensions(), 1);
    }

    fn storm_config() -> Config {
        Config {
            storm_min_leases: 10,
            storm_fraction: 0.5,
            storm_rate: 10,
            ..Config::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn storm_is_expired_gradually_then_drained() {
        let r = Registry::new(storm_config());
        let _task = r.spawn_expiry();
        for i in 0..30 {
            r.register(req(&format!("dying-{i}"), 2000), None)
                .await
                .unwrap();
        }
        for i in 0..10 {
            r.register(req(&format!("kept-{i}"), 60_000), None)
                .await
                .unwrap();
        }
        // 30 of 40 leases (75% > 50%) come due at the same instant.
        tokio::time::sleep(Duration::from_millis(2050)).await;
        let m = r.metrics();
        assert!(m.storm_active());
        assert_eq!(m.storm_throttled(), 30);
        assert_eq!(r.status().instances, 40, "nothing expired at once");

        // 10 per second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let left = r.status().instances;
        assert!((29..=31).contains(&left), "{left} instances after 1 s");
        assert!(m.storm_active());

        // Never frozen: the whole backlog goes within its time at the rate.
        tokio::time::sleep(Duration::from_secs(2) + STORM_TICK).await;
        assert_eq!(r.status().instances, 10);
        assert!(!m.storm_active(), "storm over once the backlog is drained");
        assert_eq!(m.storms.load(Ordering::Relaxed), 1);
        assert_eq!(m.lease_expirations.load(Ordering::Relaxed), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn ordinary_expiry_below_the_fraction_is_immediate() {
        let r = Registry::new(storm_config());
        let _task = r.spawn_expiry();
        for i in 0..10 {
            r.register(req(&format!("dying-{i}"), 2000), None)
                .await
                .unwrap();
        }
        for i in 0..30 {
            r.register(req(&format!("kept-{i}"), 60_000), None)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2001)).await;
        assert_eq!(r.status().instances, 30);
        let m = r.metrics();
        assert!(!m.storm_active());
        assert_eq!(m.storm_throttled(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn storm_guard_ignores_small_registries() {
        let r = Registry::new(storm_config());
        let _task = r.spawn_expiry();
        for i in 0..9 {
            r.register(req(&format!("dying-{i}"), 2000), None)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2001)).await;
        assert_eq!(r.status().instances, 0, "9 leases < storm_min_leases 10");
        assert_eq!(r.metrics().storm_throttled(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_during_a_storm_spares_live_leases_and_does_not_burst() {
        let r = Registry::new(storm_config());
        let _task = r.spawn_expiry();
        for i in 0..30 {
            r.register(req(&format!("dying-{i}"), 2000), None)
                .await
                .unwrap();
        }
        let mut kept = Vec::new();
        for i in 0..10 {
            let kept_lease = r.register(req(&format!("kept-{i}"), 5000), None).await;
            kept.push(kept_lease.unwrap().lease_id);
        }
        tokio::time::sleep(Duration::from_millis(2050)).await;
        assert!(r.metrics().storm_active());
        // Frozen past the kept leases' deadline (5 s).
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(r.metrics().stall_extensions(), 1);
        assert!(
            r.heartbeat(&kept, None).unwrap().iter().all(|s| s.found),
            "live leases got the stall back"
        );
        // The backlog was already dead before the freeze; it keeps draining
        // at the rate, at most one second's worth after the gap.
        assert!(r.metrics().storm_active());
        assert_eq!(r.status().instances, 30, "10 of 30 backlog, none kept");
    }
}
