//! Micro-benchmarks of the catalog and the registry handle on top of it:
//! Resolve's lock-free snapshot read (with 100k other instances held), the
//! snapshot rebuild after a change, a write transaction's commit, and the
//! `--data-dir` snapshot's write and restore.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::{collections::HashMap, hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use registry::{
    Config, Registry,
    catalog::{Catalog, CatalogConfig},
    pb::v1::{Instance, RegisterRequest},
};

/// Instances of the resolved service, as in workload 3.
const RESOLVED: usize = 10;
/// Other instances held, as in workload 4.
const HELD: usize = 100_000;
/// Registrations per fresh registry in the register bench, so the lease
/// table stays below its cap however many iterations criterion picks.
const REGISTRY_BATCH: u64 = 10_000;

fn instance(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1:8080".into(),
        metadata: HashMap::from([("zone".to_string(), "zone-1".to_string())]),
        weight: 1,
        ..Default::default()
    }
}

fn catalog_config() -> CatalogConfig {
    CatalogConfig {
        history_events: 100_000,
        history_age: Duration::from_secs(300),
        max_watchers: 100_000,
        max_watchers_per_connection: 10_000,
        watch_buffer: 256,
        max_services: 100_000,
    }
}

fn filled_catalog() -> Catalog {
    let catalog = Catalog::new(catalog_config());
    for i in 0..HELD {
        let mut txn = catalog.txn();
        txn.put(instance(&format!("fill-{}", i % 1000), &format!("f{i}")));
        txn.commit();
    }
    for i in 0..RESOLVED {
        let mut txn = catalog.txn();
        txn.put(instance("svc", &format!("r{i}")));
        txn.commit();
    }
    catalog
}

fn resolve(c: &mut Criterion) {
    let catalog = filled_catalog();
    c.bench_function("catalog/resolve snapshot hit (10 of 100k)", |b| {
        b.iter(|| black_box(catalog.resolve(black_box("svc"))))
    });
    let mut n = 0u64;
    c.bench_function("catalog/commit put + resolve rebuild (10 instances)", |b| {
        b.iter(|| {
            n += 1;
            let mut txn = catalog.txn();
            txn.put(instance("svc", &format!("r{}", n % RESOLVED as u64)));
            txn.commit();
            black_box(catalog.resolve("svc"))
        })
    });

    let registry = Registry::new(Config::default());
    for i in 0..RESOLVED {
        registry
            .register(RegisterRequest {
                instance: Some(instance("svc", &format!("r{i}"))),
                ttl_ms: 3_600_000,
                lease_id: 0,
            })
            .unwrap();
    }
    let none = HashMap::new();
    c.bench_function("registry/resolve 10 instances (to protobuf)", |b| {
        b.iter(|| black_box(registry.resolve("svc", &none, false).unwrap()))
    });
}

fn commit(c: &mut Criterion) {
    let catalog = Catalog::new(catalog_config());
    let mut n = 0u64;
    c.bench_function("catalog/commit one put (replace among 10k)", |b| {
        b.iter(|| {
            n += 1;
            let mut txn = catalog.txn();
            txn.put(instance(
                &format!("s{}", n % 64),
                &format!("i{}", n % 10_000),
            ));
            black_box(txn.commit())
        })
    });

    c.bench_function("registry/register new lease + instance", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let registry = Registry::new(Config::default());
                let batch = (iters - done).min(REGISTRY_BATCH);
                let requests: Vec<_> = (0..batch)
                    .map(|i| RegisterRequest {
                        instance: Some(instance(&format!("s{}", i % 64), &format!("i{i}"))),
                        ttl_ms: 3_600_000,
                        lease_id: 0,
                    })
                    .collect();
                let start = std::time::Instant::now();
                for req in requests {
                    black_box(registry.register(req).unwrap());
                }
                total += start.elapsed();
                done += batch;
            }
            total
        })
    });
}

/// The `--data-dir` snapshot: writing 100k instances (one lease each) to
/// disk while the registry runs, and restoring them at start.
fn snapshot(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("registry-bench-snapshot-{}", std::process::id()));
    let config = Config {
        data_dir: Some(dir.clone()),
        ..Config::default()
    };
    let registry = Registry::open(config.clone()).unwrap();
    for i in 0..HELD {
        registry
            .register(RegisterRequest {
                instance: Some(instance(&format!("fill-{}", i % 1000), &format!("f{i}"))),
                ttl_ms: 3_600_000,
                lease_id: 0,
            })
            .unwrap();
    }
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function("write 100k instances", |b| {
        b.iter(|| black_box(registry::persist::write(&registry, &dir).unwrap()))
    });
    group.bench_function("restore 100k instances", |b| {
        b.iter(|| black_box(Registry::open(config.clone()).unwrap()))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, resolve, commit, snapshot);
criterion_main!(benches);
