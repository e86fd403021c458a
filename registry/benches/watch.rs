//! Micro-benchmarks of watch fan-out: a commit handing its revision to 100
//! and 1,000 watchers of the service (one `try_send` each, never blocking),
//! the batch's one shared encoding and the per-watcher path (a cache hit on
//! that encoding, or a translation for a watcher with a selector).

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use registry::{
    catalog::{Catalog, CatalogConfig, CatalogEvent, EventKind, RevisionBatch, WatchFilter},
    pb::v1::Instance,
    watch::{batch_bytes, translate},
};

fn instance(id: u64) -> Instance {
    Instance {
        service: "svc".into(),
        id: format!("c{}", id % 1000),
        address: "10.0.0.1:8080".into(),
        weight: 1,
        ..Default::default()
    }
}

fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::new(CatalogConfig {
        history_events: 10_000,
        history_age: Duration::from_secs(300),
        max_watchers: 100_000,
        max_watchers_per_connection: 100_000,
        watch_buffer: 16,
        max_services: 1000,
        panic: Default::default(),
    }))
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("watch/commit fan-out");
    for watchers in [100usize, 1000] {
        group.throughput(Throughput::Elements(watchers as u64));
        group.bench_with_input(BenchmarkId::from_parameter(watchers), &watchers, |b, &n| {
            let catalog = catalog();
            let filter = WatchFilter {
                service: Some("svc".into()),
                ..WatchFilter::default()
            };
            let mut handles: Vec<_> = (0..n)
                .map(|_| catalog.watch(filter.clone(), 0, true, None).unwrap().0)
                .collect();
            let mut k = 0;
            // Only the commit is timed; draining the watchers (their stream
            // tasks' job) happens between iterations.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    k += 1;
                    let start = std::time::Instant::now();
                    let mut txn = catalog.txn();
                    txn.put(instance(k));
                    black_box(txn.commit());
                    total += start.elapsed();
                    for h in &mut handles {
                        while h.try_recv().is_some() {}
                        assert!(!h.overflowed());
                    }
                }
                total
            })
        });
    }
    group.finish();
}

fn translate_batch(c: &mut Criterion) {
    let catalog = catalog();
    let filter = WatchFilter {
        service: Some("svc".into()),
        ..WatchFilter::default()
    };
    let (mut handle, _) = catalog.watch(filter.clone(), 0, true, None).unwrap();
    let mut txn = catalog.txn();
    txn.put(instance(1));
    txn.commit();
    let batch = handle.try_recv().unwrap();
    c.bench_function("watch/translate one event for one watcher", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(1);
            translate(&filter, &batch, &mut out);
            black_box(out)
        })
    });
    c.bench_function("watch/batch_bytes shared encoding, cache hit", |b| {
        b.iter(|| black_box(batch_bytes(&filter, &batch)))
    });
    let instance = Arc::new(instance(1));
    c.bench_function("watch/batch_bytes first encoding of a batch", |b| {
        b.iter_batched(
            || {
                RevisionBatch::for_test(
                    1,
                    vec![CatalogEvent::all_served(
                        EventKind::Put { prev: None },
                        instance.clone(),
                    )],
                )
            },
            |batch| black_box(batch_bytes(&filter, &batch)),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, fan_out, translate_batch);
criterion_main!(benches);
