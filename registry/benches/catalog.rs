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
        panic: Default::default(),
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
    let rt = runtime();
    for i in 0..RESOLVED {
        rt.block_on(registry.register(
            RegisterRequest {
                instance: Some(instance("svc", &format!("r{i}"))),
                ttl_ms: 3_600_000,
                lease_id: 0,
            },
            None,
        ))
        .unwrap();
    }
    let none = HashMap::new();
    c.bench_function("registry/resolve 10 instances (to protobuf)", |b| {
        b.iter(|| black_box(registry.resolve("svc", &none, false, None).unwrap()))
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
                let rt = runtime();
                let start = std::time::Instant::now();
                for req in requests {
                    black_box(rt.block_on(registry.register(req, None)).unwrap());
                }
                total += start.elapsed();
                done += batch;
            }
            total
        })
    });
}

/// A runtime to drive the registry's async writes (memory-mode writes
/// complete without yielding, so this measures the registry, not tokio).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A data directory on tmpfs when the machine has one (what the 80%-of-
/// memory-mode goal is about), else under the temp dir.
fn data_dir(name: &str) -> std::path::PathBuf {
    let base = std::path::Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("registry-bench-{name}-{}", std::process::id()))
}

/// `--data-dir`: registers group-committed (256 in flight, as under
/// concurrent load), and restoring 100k instances at start.
fn data_dir_benches(c: &mut Criterion) {
    let dir = data_dir("datadir");
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config {
        data_dir: Some(dir.clone()),
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("data_dir");
    group.sample_size(10);
    {
        let registry = Registry::open_memory(config.clone()).unwrap();
        let mut n = 0u64;
        group.bench_function("register 256 in flight", |b| {
            b.iter(|| {
                let calls: Vec<_> = (0..256)
                    .map(|_| {
                        n += 1;
                        registry.register(
                            RegisterRequest {
                                instance: Some(instance(&format!("s{}", n % 64), &format!("i{n}"))),
                                ttl_ms: 3_600_000,
                                lease_id: 0,
                            },
                            None,
                        )
                    })
                    .collect();
                rt.block_on(async {
                    for call in calls {
                        black_box(call.await.unwrap());
                    }
                })
            })
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    {
        let registry = Registry::open_memory(config.clone()).unwrap();
        for i in 0..HELD {
            rt.block_on(registry.register(
                RegisterRequest {
                    instance: Some(instance(&format!("fill-{}", i % 1000), &format!("f{i}"))),
                    ttl_ms: 3_600_000,
                    lease_id: 0,
                },
                None,
            ))
            .unwrap();
        }
    }
    group.bench_function("restore 100k instances", |b| {
        b.iter(|| black_box(Registry::open_memory(config.clone()).unwrap()))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, resolve, commit, data_dir_benches);
criterion_main!(benches);
