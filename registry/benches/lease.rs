//! Micro-benchmarks of the lease table: renewal (the heartbeat hot path:
//! one shard read lock and one atomic), grant, and the expiry task's pop.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::{hint::black_box, time::Duration};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use registry::lease::{Clock, LeaseTable};

/// Leases in the table while renewing: the heartbeat workload's scale x100,
/// so shard lookups miss cache like in a busy daemon.
const TABLE_LEASES: usize = 100_000;
/// Leases popped per bench iteration, in batches like the expiry task's.
const EXPIRING: usize = 10_000;

fn renew(c: &mut Criterion) {
    let table = LeaseTable::new(Clock::new());
    let ids: Vec<u64> = (0..TABLE_LEASES)
        .map(|_| table.grant(Duration::from_secs(3600)).id)
        .collect();
    let mut i = 0;
    c.bench_function("lease/renew (100k leases)", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            black_box(table.renew(ids[i]))
        })
    });
    c.bench_function("lease/renew unknown", |b| {
        b.iter(|| black_box(table.renew(black_box(1))))
    });
}

fn grant(c: &mut Criterion) {
    c.bench_function("lease/grant (batches of 10k)", |b| {
        b.iter_batched_ref(
            || LeaseTable::new(Clock::new()),
            |table| {
                for _ in 0..EXPIRING {
                    black_box(table.grant(Duration::from_secs(60)));
                }
            },
            BatchSize::PerIteration,
        )
    });
}

fn pop_expired(c: &mut Criterion) {
    let mut group = c.benchmark_group("lease/pop_expired");
    group.throughput(Throughput::Elements(EXPIRING as u64));
    group.bench_function("10k due, batches of 256", |b| {
        b.iter_batched_ref(
            || {
                let table = LeaseTable::new(Clock::new());
                for _ in 0..EXPIRING {
                    table.grant(Duration::ZERO);
                }
                table
            },
            |table| {
                let mut n = 0;
                loop {
                    let popped = table.pop_expired(u64::MAX, registry::expiry::EXPIRY_BATCH);
                    if popped.is_empty() {
                        break;
                    }
                    n += popped.len();
                }
                assert_eq!(n, EXPIRING);
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("10k renewed since queued (requeue path)", |b| {
        b.iter_batched_ref(
            || {
                let table = LeaseTable::new(Clock::new());
                for _ in 0..EXPIRING {
                    table.grant(Duration::ZERO);
                }
                // Renewed far into the future: popping finds each one alive
                // and pushes it back at its real deadline.
                table.extend_all(Duration::from_secs(3600));
                table
            },
            |table| {
                let now = table.clock().now_ms() + 1;
                let popped = table.pop_expired(now, usize::MAX);
                assert!(popped.is_empty());
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, renew, grant, pop_expired);
criterion_main!(benches);
