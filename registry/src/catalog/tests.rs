use super::*;
use std::sync::atomic::AtomicBool;

fn config() -> CatalogConfig {
    CatalogConfig {
        history_events: 100,
        history_age: Duration::from_secs(60),
        max_watchers: 10,
        max_watchers_per_connection: 10,
        watch_buffer: 4,
        max_services: 100,
        panic: Default::default(),
    }
}

fn inst(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "127.0.0.1:1".into(),
        weight: 1,
        ..Default::default()
    }
}

fn put(c: &Catalog, service: &str, id: &str) -> u64 {
    let mut t = c.txn();
    t.put(inst(service, id));
    t.commit()
}

#[test]
fn revisions_advance_once_per_commit_and_resolve_reports_them() {
    let c = Catalog::new(config());
    assert_eq!(c.resolve("a").1, 0);
    assert_eq!(put(&c, "a", "1"), 1);
    assert_eq!(put(&c, "b", "1"), 2);
    let (snap, rev) = c.resolve("a");
    assert_eq!(rev, 2);
    assert_eq!(snap.unwrap().len(), 1);
    let mut t = c.txn();
    t.delete(
        InstanceKey::of(&inst("a", "nope")),
        DeleteReason::Deregistered,
    );
    assert_eq!(t.commit(), 2, "deleting nothing is no change");
}

#[test]
fn snapshot_is_rebuilt_after_change() {
    let c = Catalog::new(config());
    put(&c, "a", "1");
    assert_eq!(c.resolve("a").0.unwrap().len(), 1);
    put(&c, "a", "2");
    let snap = c.resolve("a").0.unwrap();
    let ids: Vec<_> = snap.instances().iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["1", "2"]);
    assert_eq!(snap.revision, 2);
}

#[tokio::test]
async fn slow_watcher_is_flagged_not_blocking() {
    let c = Arc::new(Catalog::new(config()));
    let filter = WatchFilter {
        service: Some("a".into()),
        ..WatchFilter::default()
    };
    let (mut w, _) = c.watch(filter, 0, true, None).unwrap();
    for i in 0..10 {
        put(&c, "a", &i.to_string());
    }
    assert!(w.overflowed());
    let view = c.resnapshot(&mut w);
    assert_eq!((view.revision(), view.len()), (10, 10));
    assert!(!w.overflowed());
    assert!(w.try_recv().is_none());
    put(&c, "a", "x");
    assert_eq!(w.try_recv().unwrap().revision, 11);
    assert_eq!(c.stats.watcher_resets.load(Ordering::Relaxed), 1);
}

#[test]
fn external_revisions_and_resync_points() {
    let c = Arc::new(Catalog::new(config()));
    let mut t = c.txn();
    t.put(inst("a", "1"));
    assert_eq!(t.commit_at(10), 10, "gaps are allowed");
    let mut t = c.txn();
    t.put(inst("a", "2"));
    assert_eq!(t.commit_at(10), 10, "an old revision commits nothing");
    assert_eq!(c.resolve("a").0.unwrap().len(), 1);
    let (_w, start) = c.watch(WatchFilter::default(), 10, true, None).unwrap();
    assert!(matches!(start, WatchStart::Replay(ref b) if b[0].revision == 10));

    // A resync at 20 with an empty diff still moves to 20 and makes
    // resuming at or below it a reset (the missed revisions are gone).
    let mut t = c.txn();
    t.mark_discontinuity();
    assert_eq!(t.commit_at(20), 20);
    assert_eq!(c.revision(), 20);
    assert_eq!(c.compacted_revision(), 20);
    let (_w, start) = c.watch(WatchFilter::default(), 15, true, None).unwrap();
    assert!(matches!(
        start,
        WatchStart::Snapshot {
            reset: Some(ResetReason::Compacted),
            ..
        }
    ));
    let (_w, start) = c.watch(WatchFilter::default(), 21, true, None).unwrap();
    assert!(matches!(start, WatchStart::Replay(ref b) if b.is_empty()));
    let mut t = c.txn();
    t.put(inst("a", "3"));
    assert_eq!(t.commit_at(25), 25);
    assert_eq!(c.resolve("a").0.unwrap().instances()[1].revision, 25);
}

#[test]
fn history_is_bounded_and_compaction_forces_reset() {
    let c = Arc::new(Catalog::new(config()));
    for i in 0..150 {
        put(&c, "a", &i.to_string());
    }
    assert_eq!(c.compacted_revision(), 50);
    let (_w, start) = c.watch(WatchFilter::default(), 10, true, None).unwrap();
    assert!(matches!(
        start,
        WatchStart::Snapshot {
            reset: Some(ResetReason::Compacted),
            ..
        }
    ));
    let (_w2, start) = c.watch(WatchFilter::default(), 140, true, None).unwrap();
    match start {
        WatchStart::Replay(b) => {
            assert_eq!(b.first().unwrap().revision, 140);
            assert_eq!(b.len(), 11);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn watcher_caps_and_cleanup() {
    let c = Arc::new(Catalog::new(CatalogConfig {
        max_watchers_per_connection: 2,
        ..config()
    }));
    let conn: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let a = c
        .watch(WatchFilter::default(), 0, true, Some(conn))
        .unwrap();
    let _b = c
        .watch(WatchFilter::default(), 0, true, Some(conn))
        .unwrap();
    let err = c
        .watch(WatchFilter::default(), 0, true, Some(conn))
        .unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
    drop(a);
    assert_eq!(c.stats.watchers.load(Ordering::Relaxed), 1);
    c.watch(WatchFilter::default(), 0, true, Some(conn))
        .unwrap();
}

/// Readers racing a transaction that puts many instances into one service
/// and then one that deletes them all see all or none, never part, and each
/// answer's label is a revision where that state held.
#[test]
fn a_transaction_is_never_seen_half_applied() {
    let c = Arc::new(Catalog::new(config()));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (snap, rev) = c.resolve("torn");
                    let n = snap.map_or(0, |s| s.len());
                    let listed = c.listing().services.get("torn").copied().unwrap_or(0);
                    seen.push((rev, n, listed));
                }
                seen
            })
        })
        .collect();
    let mut expected = vec![(0u64, 0usize)];
    for round in 0..20 {
        let mut t = c.txn();
        for i in 0..200 {
            t.put(inst("torn", &format!("{round}-{i}")));
        }
        // Another service in the same transaction, as one lease across two.
        t.put(inst("other", &round.to_string()));
        expected.push((t.commit(), 200));
        let mut t = c.txn();
        for i in 0..200 {
            t.delete(
                InstanceKey {
                    service: "torn".into(),
                    id: format!("{round}-{i}").into(),
                },
                DeleteReason::Deregistered,
            );
        }
        expected.push((t.commit(), 0));
    }
    stop.store(true, Ordering::Relaxed);
    let state_at = |rev: u64| {
        expected
            .iter()
            .rev()
            .find(|(r, _)| *r <= rev)
            .map_or(0, |(_, n)| *n)
    };
    for r in readers {
        for (rev, n, _) in r.join().unwrap() {
            assert!(n == 0 || n == 200, "a torn answer: {n} instances");
            assert_eq!(n, state_at(rev), "answer at revision {rev} is wrong");
        }
    }
}

#[test]
fn listing_is_one_revision_and_forgets_empty_services_at_the_cap() {
    let c = Catalog::new(CatalogConfig {
        max_services: 2,
        ..config()
    });
    put(&c, "a", "1");
    let mut t = c.txn();
    t.put(inst("b", "1"));
    t.put(inst("b", "2"));
    assert_eq!(t.commit(), 2);
    let listing = c.listing();
    assert_eq!(listing.revision, 2);
    assert_eq!(listing.instances, 3);
    let names: Vec<_> = listing.services.iter().map(|(k, v)| (&**k, *v)).collect();
    assert_eq!(names, [("a", 1), ("b", 2)]);

    let mut t = c.txn();
    t.delete(InstanceKey::of(&inst("a", "1")), DeleteReason::Expired);
    t.commit();
    assert_eq!(c.listing().services.get("a"), Some(&0), "known, empty");
    let mut t = c.txn();
    t.ensure_service_capacity("c").unwrap();
    t.put(inst("c", "1"));
    t.commit();
    let names: Vec<_> = c
        .listing()
        .services
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    assert_eq!(names, [("b".to_string(), 2), ("c".to_string(), 1)]);
    assert!(
        c.resolve("a").0.is_none(),
        "the empty service was forgotten"
    );
    let mut t = c.txn();
    let err = t.ensure_service_capacity("d").unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
}

/// A watch snapshot taken while writers run is exact at its revision and
/// the watcher's queue continues right after it.
#[test]
fn watch_views_are_exact_and_continue_from_their_revision() {
    let c = Arc::new(Catalog::new(CatalogConfig {
        watch_buffer: 10_000,
        history_events: 100_000,
        max_watchers: 100,
        ..config()
    }));
    for i in 0..50 {
        put(&c, &format!("s{}", i % 5), &i.to_string());
    }
    let writer = {
        let c = c.clone();
        std::thread::spawn(move || {
            for i in 50..2050 {
                let mut t = c.txn();
                t.put(inst(&format!("s{}", i % 5), &i.to_string()));
                if i % 3 == 0 {
                    t.delete(
                        InstanceKey {
                            service: format!("s{}", (i + 1) % 5).into(),
                            id: (i - 40).to_string().into(),
                        },
                        DeleteReason::Deregistered,
                    );
                }
                t.commit();
            }
        })
    };
    let mut watchers = Vec::new();
    for _ in 0..20 {
        let (w, start) = c.watch(WatchFilter::default(), 0, true, None).unwrap();
        let WatchStart::Snapshot { view, .. } = start else {
            panic!("not a snapshot")
        };
        watchers.push((w, view));
    }
    writer.join().unwrap();
    let final_ids: std::collections::BTreeSet<(String, String)> = (0..5)
        .flat_map(|s| {
            c.resolve(&format!("s{s}"))
                .0
                .unwrap()
                .instances()
                .iter()
                .map(|i| (i.service.clone(), i.id.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for (mut w, view) in watchers {
        let mut state: std::collections::BTreeSet<(String, String)> = view
            .instances()
            .into_iter()
            .map(|i| (i.service, i.id))
            .collect();
        let mut last = view.revision();
        while let Some(batch) = w.try_recv() {
            assert_eq!(batch.revision, last + 1, "gap or repeat after the view");
            last = batch.revision;
            for ev in &batch.events {
                let key = (ev.instance.service.clone(), ev.instance.id.clone());
                match ev.kind {
                    EventKind::Put { .. } => {
                        state.insert(key);
                    }
                    EventKind::Delete(_) => {
                        assert!(state.remove(&key), "delete of {key:?} not in the view");
                    }
                }
            }
        }
        assert!(!w.overflowed());
        assert_eq!(last, c.revision());
        assert_eq!(state, final_ids);
    }
}
