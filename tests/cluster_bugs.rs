//! The cluster bugs of issue 15, one test each, against real processes: an
//! etcd, and `registry --store etcd` nodes reaching it through TCP proxies
//! the tests cut, black-hole or slow down (`tests/common/cluster.rs`,
//! `tests/common/proxy.rs`).
//!
//! Each test states the user-visible property the bug breaks and checks it
//! black-box (Resolve, Watch, Heartbeat on the nodes), reporting every
//! broken check at once with a timeline. Node logs of a failing test are
//! kept (the path is printed).

#![cfg(unix)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    api::{InstanceExt, deregister_instance, instance, register_request},
    cluster::{Answer, Checks, Cluster, Node, NodeOptions, Renewer, Sampler, ids, resolve_on},
    poll_until,
};
use registry_api::v1::{
    EventType, RegisterResponse, WatchRequest, registry_client::RegistryClient as Raw,
    watch_response::Kind,
};
use registry_client::RegistryClient;
use tokio::time::Instant;
use tonic::{Code, Status, transport::Channel};

/// Client lease TTL used throughout, as in the reproduction.
const TTL: Duration = Duration::from_secs(2);
/// How long a live instance may be missing somewhere: one TTL (the client
/// notices and moves) plus a second.
const MAX_GAP: Duration = Duration::from_secs(3);

/// Raw Register of `prod/id`, with an optional client deadline.
async fn register(
    node: &Node,
    id: &str,
    ttl: Duration,
    lease_id: u64,
    deadline: Option<Duration>,
) -> Result<RegisterResponse, Status> {
    let mut request = tonic::Request::new(register_request(
        instance("prod", id).at("127.0.0.1:9"),
        ttl.as_millis() as u64,
        lease_id,
    ));
    if let Some(d) = deadline {
        request.set_timeout(d);
    }
    let mut client = node.client();
    let call = client.register(request);
    match tokio::time::timeout(deadline.unwrap_or(Duration::from_secs(10)) * 2, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("client-side timeout")),
    }
}

async fn resolve(node: &Node) -> Option<Answer> {
    resolve_on(&node.client(), "prod").await.map(|r| Answer {
        revision: r.revision,
        stale: r.server.is_some_and(|s| s.stale),
        instances: r.instances,
    })
}

/// Polls `cond` every 50 ms for at most `limit`; whether it came true.
async fn eventually<F, Fut>(limit: Duration, cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(limit, Duration::from_millis(50), cond)
        .await
        .is_some()
}

async fn has(node: &Node, id: &str) -> bool {
    resolve(node).await.is_some_and(|a| a.get(id).is_some())
}

async fn is_stale(node: &Node) -> Option<bool> {
    resolve(node).await.map(|a| a.stale)
}

/// Describes a node's view for failure messages.
async fn view(node: &Node) -> String {
    match resolve(node).await {
        Some(a) => format!(
            "{} resolves {:?} at revision {}{}",
            node.name,
            ids(&a.instances),
            a.revision,
            if a.stale { " (stale)" } else { "" }
        ),
        None => format!("{} does not answer", node.name),
    }
}

/// Cuts node `i`'s etcd link until the node says it is stale, then heals
/// it and waits until it is fresh again: one etcd session restart, nothing
/// else changed. Returns false if the node never showed it.
async fn restart_session(cluster: &Cluster, i: usize) -> bool {
    let node = &cluster.nodes[i];
    cluster.proxies[i].cut();
    let saw_stale = eventually(Duration::from_secs(5), || async {
        is_stale(node).await == Some(true)
    })
    .await;
    cluster.proxies[i].heal();
    let fresh = eventually(Duration::from_secs(10), || async {
        is_stale(node).await == Some(false)
    })
    .await;
    saw_stale && fresh
}

// ---------------------------------------------------------------------------
// Bug 1: a resync at an unchanged revision drops the next real change.
// ---------------------------------------------------------------------------

/// On a quiet cluster, A's etcd session restarts (its link cut briefly) and
/// re-lists at the revision it already has; a Register on B afterwards must
/// still reach A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_at_unchanged_revision_then_a_change_elsewhere_reaches_the_node() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    let first = register(b, "x1", Duration::from_secs(60), 0, None)
        .await
        .expect("register x1 on B");
    assert!(eventually(Duration::from_secs(5), || has(a, "x1")).await);
    // Quiet: A's catalog is at etcd's revision (the last write was x1).
    let etcd_rev = cluster.etcd.revision().await;
    let on_a = resolve(a).await.unwrap();
    eprintln!(
        "x1 at revision {}, etcd at {etcd_rev}, A at {}",
        first.revision, on_a.revision
    );

    assert!(
        restart_session(&cluster, 0).await,
        "A's etcd session did not restart"
    );
    let second = register(b, "x2", Duration::from_secs(60), 0, None)
        .await
        .expect("register x2 on B");
    let seen = eventually(Duration::from_secs(3), || has(a, "x2")).await;
    checks.check(
        seen,
        format!(
            "after A's session restarted at an unchanged revision, x2 registered on B \
             (revision {}) reaches A within 3 s; now {}",
            second.revision,
            view(a).await
        ),
    );
    // And the change after that one.
    let third = register(b, "x3", Duration::from_secs(60), 0, None)
        .await
        .expect("register x3 on B");
    let seen = eventually(Duration::from_secs(3), || has(a, "x3")).await;
    checks.check(
        seen,
        format!(
            "x3 registered on B next (revision {}) reaches A; now {}",
            third.revision,
            view(a).await
        ),
    );
    checks.finish();
}

/// Same restart; then a Register on A itself: it answers OK, so A's own
/// Resolve must have the instance (read-your-writes), and B too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_at_unchanged_revision_then_a_register_on_the_node_reads_its_write() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    register(b, "x1", Duration::from_secs(60), 0, None)
        .await
        .expect("register x1 on B");
    assert!(eventually(Duration::from_secs(5), || has(a, "x1")).await);
    assert!(
        restart_session(&cluster, 0).await,
        "A's etcd session did not restart"
    );
    let reg = register(a, "x2", Duration::from_secs(60), 0, None).await;
    checks.check(reg.is_ok(), format!("Register x2 on A answers OK: {reg:?}"));
    let on_a = resolve(a).await;
    checks.check(
        on_a.as_ref().is_some_and(|v| v.get("x2").is_some()),
        format!(
            "Resolve on A right after A answered Register x2 (revision {:?}) has x2; \
             A resolves {:?} at revision {:?}",
            reg.as_ref().map(|r| r.revision).ok(),
            on_a.as_ref().map(|v| ids(&v.instances)),
            on_a.as_ref().map(|v| v.revision)
        ),
    );
    let later = eventually(Duration::from_secs(3), || has(a, "x2")).await;
    checks.check(later, format!("A has x2 3 s later; {}", view(a).await));
    let on_b = eventually(Duration::from_secs(3), || has(b, "x2")).await;
    checks.check(on_b, format!("B has x2; {}", view(b).await));
    checks.finish();
}

/// etcd restored from an older copy of its data (same cluster, revision
/// back in time): every node must resync to what etcd holds and then apply
/// every later change, not drop the ones whose revision it already passed;
/// live instances whose clients keep their leases must be back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restored_from_an_older_copy_resyncs_and_drops_no_later_change() {
    let Some(mut cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let mut checks = Checks::default();
    let long = Duration::from_secs(60);
    register(&cluster.nodes[0], "old", long, 0, None)
        .await
        .expect("register old");
    // A crash-consistent copy (etcd frozen for the copy, nodes unaware).
    let backup = cluster.etcd.backup().await;
    let before = cluster.etcd.revision().await;
    for id in ["new1", "new2", "new3"] {
        register(&cluster.nodes[0], id, long, 0, None)
            .await
            .expect("register newN on A");
    }
    let b = &cluster.nodes[1];
    assert!(eventually(Duration::from_secs(5), || has(b, "new3")).await);
    let ahead = cluster.etcd.revision().await;
    cluster.etcd.restore(&backup).await;
    let restored = cluster.etcd.revision().await;
    eprintln!("backup at revision {before}, went on to {ahead}, restored to {restored}");
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    for node in [a, b] {
        let fresh = eventually(Duration::from_secs(10), || async {
            is_stale(node).await == Some(false)
        })
        .await;
        checks.check(
            fresh,
            format!("{} back in sync after the restore", node.name),
        );
    }
    // A change after the restore, at a revision the nodes already passed.
    let after = register(b, "after", long, 0, None).await;
    checks.check(
        after.is_ok(),
        format!("Register on B after the restore: {after:?}"),
    );
    let rev = after.as_ref().map(|r| r.revision).unwrap_or(0);
    let on_b = resolve(b).await;
    checks.check(
        on_b.as_ref().is_some_and(|v| v.get("after").is_some()),
        format!(
            "B's Resolve right after its Register (revision {rev}) has the instance; \
             B resolves {:?} at revision {:?}",
            on_b.as_ref().map(|v| ids(&v.instances)),
            on_b.as_ref().map(|v| v.revision)
        ),
    );
    let on_a = eventually(Duration::from_secs(3), || has(a, "after")).await;
    checks.check(
        on_a,
        format!(
            "A sees the Register made on B after the restore; {}",
            view(a).await
        ),
    );
    // Instances A registered after the backup: their client leases on A are
    // alive (60 s), so the restored etcd must get them back.
    let back = eventually(Duration::from_secs(MAX_GAP.as_secs()), || async {
        let (Some(va), Some(vb)) = (resolve(a).await, resolve(b).await) else {
            return false;
        };
        ["old", "new1", "new2", "new3"]
            .iter()
            .all(|id| va.get(id).is_some() && vb.get(id).is_some())
    })
    .await;
    checks.check(
        back,
        format!(
            "the live instances registered after the backup (new1..3, leases alive on A) \
             are on both nodes within {MAX_GAP:?}; {}; {}",
            view(a).await,
            view(b).await
        ),
    );
    checks.finish();
}

/// etcd wiped (a new, empty cluster on the same address): every node puts
/// back the instances of its live leases, and the nodes see each other's
/// instances and later changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_nodes_put_their_instances_back_and_see_each_other() {
    let Some(mut cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let mut checks = Checks::default();
    let long = Duration::from_secs(60);
    register(&cluster.nodes[0], "a1", long, 0, None)
        .await
        .expect("register a1 on A");
    register(&cluster.nodes[1], "b1", long, 0, None)
        .await
        .expect("register b1 on B");
    let b = &cluster.nodes[1];
    assert!(eventually(Duration::from_secs(5), || has(b, "a1")).await);
    cluster.etcd.wipe().await;
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let etcd = &cluster.etcd;
    let put_back = eventually(Duration::from_secs(8), || async {
        etcd.instance_ids("prod").await == ["a1", "b1"]
    })
    .await;
    checks.check(
        put_back,
        format!(
            "the owners put a1 and b1 back into the wiped etcd within 8 s: etcd has {:?}",
            etcd.instance_ids("prod").await
        ),
    );
    let both = eventually(Duration::from_secs(3), || async {
        let (Some(va), Some(vb)) = (resolve(a).await, resolve(b).await) else {
            return false;
        };
        ["a1", "b1"]
            .iter()
            .all(|id| va.get(id).is_some() && vb.get(id).is_some())
    })
    .await;
    checks.check(
        both,
        format!(
            "then both nodes resolve a1 and b1 within 3 s; {}; {}; etcd at revision {}",
            view(a).await,
            view(b).await,
            cluster.etcd.revision().await
        ),
    );
    let c1 = register(a, "c1", long, 0, None).await;
    checks.check(
        c1.is_ok(),
        format!("Register c1 on A after the wipe: {c1:?}"),
    );
    let seen = eventually(Duration::from_secs(3), || has(b, "c1")).await;
    checks.check(
        seen,
        format!(
            "c1 registered on A (revision {:?}) reaches B; {}",
            c1.as_ref().map(|r| r.revision).ok(),
            view(b).await
        ),
    );
    checks.finish();
}

// ---------------------------------------------------------------------------
// Bug 2: a node that lost its etcd lease puts back what another node took.
// ---------------------------------------------------------------------------

/// The client's side done by hand (so only the server is under test): x is
/// registered on A; A freezes; the client moves to B, registers x there and
/// keeps renewing on B. A thaws long after its etcd lease expired: it must
/// not put its stale copy back, and x must stay on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_does_not_put_back_an_instance_another_node_took_over() {
    let Some(cluster) = Cluster::start(3, NodeOptions::default()).await else {
        return;
    };
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let mut checks = Checks::default();
    let on_a = register(a, "x", TTL, 0, None).await.expect("register on A");
    let renew_a = Renewer::start(a.client(), on_a.lease_id, TTL / 3);
    assert!(eventually(Duration::from_secs(5), || has(c, "x")).await);

    a.freeze();
    let frozen_at = Instant::now();
    drop(renew_a);
    // A's connection to etcd does not survive the freeze (reset while it
    // was stopped), so on waking it learns nothing of what happened
    // meanwhile from buffered watch events: it starts a new session. (With
    // the connection kept, whether A first reads B's put or first re-puts
    // its copy is a race; this makes the re-put path certain.)
    cluster.proxies[0].cut();
    // The client notices (no answer) and registers on B.
    let on_b = register(b, "x", TTL, 0, None).await.expect("register on B");
    let _renew_b = Renewer::start(b.client(), on_b.lease_id, TTL / 3);
    // Past A's etcd lease TTL (2 s) and then some.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(frozen_at.elapsed())).await;
    let sampler = Sampler::start(
        vec![a.url.clone(), b.url.clone(), c.url.clone()],
        "prod",
        Duration::from_millis(100),
    );
    cluster.proxies[0].heal();
    let thawed_at = Instant::now();
    a.thaw();
    // A's client lease of x is not renewed by anyone: it expires within a
    // TTL (plus the stall extension). Watch for three TTLs.
    tokio::time::sleep(TTL * 3 + Duration::from_secs(1)).await;
    let samples = sampler.stop().await;
    let end = Instant::now();
    for (i, node) in [(1, b), (2, c)] {
        let gap = samples.longest_gap(i, "x", thawed_at, end);
        checks.check(
            gap.is_none(),
            format!(
                "x (renewed on B, lease {}) never missing on {} after A thawed; missing for {:?} \
                 from +{:?}",
                on_b.lease_id,
                node.name,
                gap.map(|g| g.len),
                gap.map(|g| g.from - thawed_at)
            ),
        );
    }
    let foreign = samples
        .answers(2, thawed_at, end)
        .filter_map(|(at, a)| a.get("x").map(|i| (at, i.lease_id)))
        .find(|(_, lease)| *lease != on_b.lease_id);
    checks.check(
        foreign.is_none(),
        format!(
            "C never shows A's stale copy of x (lease {} on A) once B owns it (lease {}); \
             seen at +{:?} with lease {:?}",
            on_a.lease_id,
            on_b.lease_id,
            foreign.map(|(at, _)| at - thawed_at),
            foreign.map(|(_, l)| l)
        ),
    );
    checks.finish();
}

/// The same freeze with the real client library (endpoints `A,B`): the
/// client must move to B while A is frozen, x must not go missing on B and
/// C for more than TTL + 1 s, and must stay everywhere after A thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_client_moves_and_its_instance_stays() {
    let Some(cluster) = Cluster::start(3, NodeOptions::default()).await else {
        return;
    };
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let mut checks = Checks::default();
    let client = RegistryClient::connect(cluster.urls(&[0, 1]))
        .await
        .unwrap();
    let registration = client
        .register(registry_client::Instance::new("prod", "127.0.0.1:9").with_id("x"))
        .ttl(TTL)
        .await
        .expect("register through A,B");
    assert!(eventually(Duration::from_secs(5), || has(c, "x")).await);
    let sampler = Sampler::start(
        vec![a.url.clone(), b.url.clone(), c.url.clone()],
        "prod",
        Duration::from_millis(100),
    );
    let frozen_at = Instant::now();
    a.freeze();
    // Well past A's etcd lease (2 s).
    let freeze = Duration::from_secs(6);
    tokio::time::sleep(freeze).await;
    let thawed_at = Instant::now();
    a.thaw();
    tokio::time::sleep(TTL * 3 + Duration::from_secs(1)).await;
    let samples = sampler.stop().await;
    let end = Instant::now();
    for (i, node) in [(1, b), (2, c)] {
        let gap = samples.longest_gap(i, "x", frozen_at, thawed_at);
        checks.check(
            gap.is_none_or(|g| g.len <= MAX_GAP),
            format!(
                "while A was frozen for {freeze:?}, x missing on {} at most {MAX_GAP:?}: \
                 longest gap {:?} from +{:?}",
                node.name,
                gap.map(|g| g.len),
                gap.map(|g| g.from - frozen_at)
            ),
        );
        let gap = samples.longest_gap(i, "x", thawed_at + MAX_GAP, end);
        checks.check(
            gap.is_none(),
            format!(
                "from {MAX_GAP:?} after A thawed, x never missing on {}: gap {:?} from +{:?} \
                 after the thaw",
                node.name,
                gap.map(|g| g.len),
                gap.map(|g| g.from - thawed_at)
            ),
        );
    }
    checks.check(
        registration.current_state() == registry_client::RegistrationState::Registered,
        format!(
            "the client says Registered: {:?}",
            registration.current_state()
        ),
    );
    checks.finish();
}

// ---------------------------------------------------------------------------
// Bug 3: a node cut off from etcd but not from its clients.
// ---------------------------------------------------------------------------

/// Client registered through `A,B` with a 2 s TTL; A's etcd link is cut
/// (clients still reach A). The live instance must not be missing on B for
/// more than TTL + 1 s: heartbeats on a stale node must make the client
/// move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_from_etcd_makes_its_clients_move() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    let client = RegistryClient::connect(cluster.urls(&[0, 1]))
        .await
        .unwrap();
    let _registration = client
        .register(registry_client::Instance::new("prod", "127.0.0.1:9").with_id("x"))
        .ttl(TTL)
        .await
        .expect("register through A,B");
    assert!(eventually(Duration::from_secs(5), || has(b, "x")).await);
    let on_a = resolve(a).await.unwrap();
    assert!(on_a.get("x").is_some(), "registered through A");

    let sampler = Sampler::start(
        vec![a.url.clone(), b.url.clone()],
        "prod",
        Duration::from_millis(100),
    );
    let cut = Duration::from_secs(8);
    let cut_at = Instant::now();
    cluster.proxies[0].cut();
    tokio::time::sleep(cut).await;
    let healed_at = Instant::now();
    cluster.proxies[0].heal();
    tokio::time::sleep(MAX_GAP).await;
    let samples = sampler.stop().await;
    let end = Instant::now();

    let gap = samples.longest_gap(1, "x", cut_at, healed_at);
    let missing: usize = samples
        .answers(1, cut_at, healed_at)
        .filter(|(_, a)| a.get("x").is_none())
        .count();
    let polled = samples.answers(1, cut_at, healed_at).count();
    checks.check(
        gap.is_none_or(|g| g.len <= MAX_GAP),
        format!(
            "during an {cut:?} cut of A's etcd link, x missing on B at most {MAX_GAP:?}: \
             longest gap {:?} from +{:?}; missing in {missing} of {polled} polls (100 ms)",
            gap.map(|g| g.len),
            gap.map(|g| g.from - cut_at)
        ),
    );
    let after = samples.longest_gap(1, "x", healed_at + MAX_GAP / 2, end);
    checks.check(
        after.is_none(),
        format!(
            "after the heal x stays on B: gap {:?}",
            after.map(|g| g.len)
        ),
    );
    checks.finish();
}

// ---------------------------------------------------------------------------
// Bug 4: a Register cancelled halfway.
// ---------------------------------------------------------------------------

/// A's link to etcd is slow (1 s): a client's Register on A gives up after
/// 300 ms, and the client registers on B instead and keeps renewing there.
/// A's late write must not replace B's, and x must stay resolvable while
/// its lease on B is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_register_does_not_overwrite_the_failover_registration() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    cluster.proxies[0].delay(Duration::from_secs(1));
    let started = Instant::now();
    let first = register(a, "x", TTL, 0, Some(Duration::from_millis(300))).await;
    let code = first.as_ref().err().map(Status::code);
    assert!(
        matches!(code, Some(Code::DeadlineExceeded | Code::Cancelled)),
        "the Register on A must run out of time: {first:?}"
    );
    let on_b = register(b, "x", TTL, 0, None).await.expect("register on B");
    let renew_b = Renewer::start(b.client(), on_b.lease_id, TTL / 3);
    eprintln!(
        "A's register gave up at +{:?}; B's answered at +{:?} (revision {}, lease {})",
        Duration::from_millis(300),
        started.elapsed(),
        on_b.revision,
        on_b.lease_id
    );
    let sampler = Sampler::start(
        vec![a.url.clone(), b.url.clone()],
        "prod",
        Duration::from_millis(100),
    );
    let watch_from = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.proxies[0].heal();
    // A's cancelled registration had a 2 s client lease nobody renews.
    tokio::time::sleep(TTL * 2 + Duration::from_secs(2)).await;
    let samples = sampler.stop().await;
    let end = Instant::now();
    for (i, node) in [(0, a), (1, b)] {
        let gap = samples.longest_gap(i, "x", watch_from, end);
        checks.check(
            gap.is_none(),
            format!(
                "x, renewed on B, never missing on {}: gap {:?} from +{:?} after B's register",
                node.name,
                gap.map(|g| g.len),
                gap.map(|g| g.from - watch_from)
            ),
        );
    }
    let overwritten = samples.answers(1, watch_from, end).find_map(|(at, v)| {
        v.get("x")
            .filter(|i| i.lease_id != on_b.lease_id)
            .map(|i| (at, i.lease_id))
    });
    checks.check(
        overwritten.is_none(),
        format!(
            "B keeps its own registration of x (lease {}): replaced by the cancelled one from \
             A at +{:?} (lease {:?})",
            on_b.lease_id,
            overwritten.map(|(at, _)| at - watch_from),
            overwritten.map(|(_, l)| l)
        ),
    );
    let (answered, found) = renew_b.tally();
    checks.check(
        answered > 0 && answered == found,
        format!("B's lease found by every renewal ({found} of {answered})"),
    );
    checks.finish();
}

/// A client renews lease L on A (instance x1). A Register of x2 on L is cut
/// short by the client while A's etcd link is black-holed, so A's etcd
/// write fails. x2 must not turn up later (here: when A, back from a
/// partition longer than its etcd lease, puts its instances back), while x1
/// does come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_register_leaves_no_orphan() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    let x1 = register(a, "x1", TTL, 0, None).await.expect("register x1");
    let _renew = Renewer::start(a.client(), x1.lease_id, TTL / 3);
    assert!(eventually(Duration::from_secs(5), || has(b, "x1")).await);

    cluster.proxies[0].blackhole();
    let x2 = register(a, "x2", TTL, x1.lease_id, Some(Duration::from_millis(500))).await;
    let code = x2.as_ref().err().map(Status::code);
    assert!(
        matches!(code, Some(Code::DeadlineExceeded | Code::Cancelled)),
        "the Register of x2 must run out of time: {x2:?}"
    );
    // Longer than A's etcd write timeout (2 s) and its etcd lease (2 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sampler = Sampler::start(
        vec![a.url.clone(), b.url.clone()],
        "prod",
        Duration::from_millis(100),
    );
    let healed_at = Instant::now();
    cluster.proxies[0].heal();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let samples = sampler.stop().await;
    let end = Instant::now();
    let x1_back = samples.first_seen(1, "x1", healed_at, end);
    checks.check(
        x1_back.is_some_and(|at| at - healed_at <= MAX_GAP),
        format!(
            "x1 (lease renewed) back on B within {MAX_GAP:?} of the heal: at +{:?}",
            x1_back.map(|at| at - healed_at)
        ),
    );
    for (i, node) in [(0, a), (1, b)] {
        let orphan = samples.first_seen(i, "x2", healed_at, end);
        checks.check(
            orphan.is_none(),
            format!(
                "x2, whose Register ended in {code:?} and whose write never reached etcd, \
                 never shows on {}: seen from +{:?} after the heal",
                node.name,
                orphan.map(|at| at - healed_at)
            ),
        );
    }
    checks.finish();
}

// ---------------------------------------------------------------------------
// Bug 5: `applied` running ahead (read-your-writes under load).
// ---------------------------------------------------------------------------

/// Several writers per node, each: Register on a node, Resolve on the same
/// node at once (must contain it, at a revision at least the write's), then
/// Deregister and Resolve again (must not). Black-box check that a node
/// never answers a write before its catalog has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_on_every_node_under_concurrent_load() {
    let Some(cluster) = Cluster::start(3, NodeOptions::default()).await else {
        return;
    };
    let mut checks = Checks::default();
    let run_for = Duration::from_secs(5);
    let mut tasks = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        for w in 0..3 {
            let client = node.client();
            let service = format!("rw-{n}-{w}");
            tasks.push(tokio::spawn(rw_loop(client, service, run_for)));
        }
    }
    let (mut rounds, mut violations) = (0usize, Vec::new());
    for t in tasks {
        let (r, v) = t.await.unwrap();
        rounds += r;
        violations.extend(v);
    }
    eprintln!("{rounds} register/resolve/deregister rounds on 3 nodes");
    checks.check(rounds > 30, format!("the load ran ({rounds} rounds)"));
    checks.check(
        violations.is_empty(),
        format!(
            "no read-your-writes violation; {} found, first: {:?}",
            violations.len(),
            violations.first()
        ),
    );
    checks.finish();
}

async fn rw_loop(client: Raw<Channel>, service: String, run_for: Duration) -> (usize, Vec<String>) {
    let end = Instant::now() + run_for;
    let (mut rounds, mut violations) = (0, Vec::new());
    while Instant::now() < end {
        let id = format!("i{rounds}");
        let mut c = client.clone();
        let reg = c
            .register(register_request(
                instance(&service, &id).at("127.0.0.1:9"),
                60_000,
                0,
            ))
            .await;
        let reg = match reg {
            Ok(r) => r.into_inner(),
            Err(e) => {
                violations.push(format!("{service}/{id}: register failed: {e:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match resolve_on(&client, &service).await {
            Some(r) if r.revision >= reg.revision && r.instances.iter().any(|i| i.id == id) => {}
            other => violations.push(format!(
                "{service}/{id}: registered at {} but Resolve answered revision {:?} with {:?}",
                reg.revision,
                other.as_ref().map(|r| r.revision),
                other.as_ref().map(|r| ids(&r.instances))
            )),
        }
        let dereg = c.deregister(deregister_instance(&service, &id)).await;
        let dereg = match dereg {
            Ok(r) => r.into_inner(),
            Err(e) => {
                violations.push(format!("{service}/{id}: deregister failed: {e:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match resolve_on(&client, &service).await {
            Some(r) if r.revision >= dereg.revision && r.instances.iter().all(|i| i.id != id) => {}
            other => violations.push(format!(
                "{service}/{id}: deregistered at {} but Resolve answered revision {:?} with {:?}",
                dereg.revision,
                other.as_ref().map(|r| r.revision),
                other.as_ref().map(|r| ids(&r.instances))
            )),
        }
        rounds += 1;
    }
    (rounds, violations)
}

// ---------------------------------------------------------------------------
// Bug 6: the keeper heartbeats one node and registers on another.
// ---------------------------------------------------------------------------

/// Client on `A,B` with p1 registered (and heartbeating) on A. A loses etcd,
/// so the client's next Register (p2) fails over to B. From then on the
/// heartbeats must go where the lease lives: a watcher on B sees each
/// instance put about once, not again every ttl/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_follows_the_lease_after_a_register_failover() {
    let Some(cluster) = Cluster::start(2, NodeOptions::default()).await else {
        return;
    };
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let mut checks = Checks::default();
    let client = RegistryClient::connect(cluster.urls(&[0, 1]))
        .await
        .unwrap();
    let p1 = client
        .register(registry_client::Instance::new("prod", "127.0.0.1:9").with_id("p1"))
        .ttl(TTL)
        .await
        .expect("register p1");
    // Let the keeper open its KeepAlive stream to A (first renewal ~ttl/3).
    tokio::time::sleep(TTL).await;
    assert!(resolve(a).await.unwrap().get("p1").is_some());

    cluster.proxies[0].cut();
    assert!(
        eventually(Duration::from_secs(5), || async {
            is_stale(a).await == Some(true)
        })
        .await,
        "A notices it lost etcd"
    );
    // Watch on B from now on.
    let mut watch = b
        .client()
        .watch(WatchRequest {
            service: "prod".into(),
            ..Default::default()
        })
        .await
        .expect("watch on B")
        .into_inner();
    let p2 = client
        .register(registry_client::Instance::new("prod", "127.0.0.1:9").with_id("p2"))
        .ttl(TTL)
        .await;
    checks.check(
        p2.is_ok(),
        format!("Register p2 fails over to B: {:?}", p2.as_ref().err()),
    );
    let window = Duration::from_secs(6);
    let end = Instant::now() + window;
    let mut puts: HashMap<String, Vec<u64>> = HashMap::new();
    while let Ok(Ok(Some(msg))) = tokio::time::timeout_at(end, watch.message()).await {
        if let Some(Kind::Events(batch)) = msg.kind {
            for e in batch.events {
                if e.r#type == EventType::Put as i32
                    && let Some(i) = e.instance
                {
                    puts.entry(i.id).or_default().push(i.lease_id);
                }
            }
        }
    }
    cluster.proxies[0].heal();
    eprintln!("PUT events on B over {window:?} (lease ids): {puts:?}");
    for id in ["p1", "p2"] {
        let n = puts.get(id).map_or(0, Vec::len);
        checks.check(
            n <= 2,
            format!(
                "{id} put about once on B over {window:?} (renewals every ~{:?}): {n} PUT events",
                TTL / 3
            ),
        );
    }
    checks.check(
        has(b, "p1").await && has(b, "p2").await,
        format!("B has p1 and p2; {}", view(b).await),
    );
    drop(p1);
    drop(p2);
    checks.finish();
}
