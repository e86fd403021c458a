//! The sync task: the node's etcd session. Keeps the node's etcd lease
//! alive, loads the prefix into the catalog, applies etcd's watch events to
//! it revision by revision, and resynchronises after any break.
//!
//! A session: (1) make sure the node has a live etcd lease (a new one if it
//! was lost); (2) list the prefix at one revision R and commit the diff
//! against the catalog at R as a resync point; (3) reconcile what the node
//! owns (put everything back after a lost lease, forget instances others
//! removed or took over, delete our keys whose client lease expired while
//! etcd was away); (4) watch from R + 1 and apply every revision, while
//! renewing the lease. Any error ends the session: the node turns stale and
//! a new session starts after a backoff.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prost::Message;
use registry_api::{
    etcd::{
        etcdserverpb::{
            LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, RangeRequest,
            WatchCreateRequest, WatchRequest, lease_client::LeaseClient, watch_client::WatchClient,
            watch_request::RequestUnion,
        },
        mvccpb::{Event, KeyValue, event::EventType},
    },
    v1::{DeleteReason, Instance},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{ETCD_CALL_TIMEOUT, EtcdStore, Guard, MAX_ETCD_MESSAGE, Op};
use crate::catalog::InstanceKey;
use crate::change::Undo;

/// First wait before a new session after a failed one; doubles up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between sessions: a returning etcd is noticed within it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// `{prefix}/i/`: where instances live.
pub(super) fn instance_prefix(prefix: &str) -> Vec<u8> {
    format!("{}/i/", prefix.trim_end_matches('/')).into_bytes()
}

/// `{prefix}/r/`: where delete reasons live for one revision.
fn reason_prefix(prefix: &str) -> Vec<u8> {
    format!("{}/r/", prefix.trim_end_matches('/')).into_bytes()
}

/// `{prefix}/epoch`: the cluster's epoch, a random number every node
/// reports as `ServerInfo.epoch`. Created by the first node; replaced when a
/// node finds etcd's revisions went back (etcd restored from an older
/// backup), so no client resumes a watch across two histories.
pub(super) fn epoch_key(prefix: &str) -> Vec<u8> {
    format!("{}/epoch", prefix.trim_end_matches('/')).into_bytes()
}

/// A new random epoch: in [1, 2^53), exact in JSON doubles.
fn new_epoch() -> u64 {
    (rand::random::<u64>() >> 11).max(1)
}

fn epoch_value(kv: &KeyValue) -> Option<u64> {
    <[u8; 8]>::try_from(kv.value.as_slice())
        .ok()
        .map(u64::from_be_bytes)
}

/// `{prefix}/`: everything the node watches.
fn root_prefix(prefix: &str) -> Vec<u8> {
    format!("{}/", prefix.trim_end_matches('/')).into_bytes()
}

/// The etcd key of an instance. Service names never contain `/`, so the
/// first `/` after the prefix ends the service even if the id has some.
pub(super) fn instance_key(prefix: &str, key: &InstanceKey) -> Vec<u8> {
    let mut k = instance_prefix(prefix);
    k.extend_from_slice(key.service.as_bytes());
    k.push(b'/');
    k.extend_from_slice(key.id.as_bytes());
    k
}

/// The reason key of an instance.
pub(super) fn reason_key(prefix: &str, key: &InstanceKey) -> Vec<u8> {
    let mut k = reason_prefix(prefix);
    k.extend_from_slice(key.service.as_bytes());
    k.push(b'/');
    k.extend_from_slice(key.id.as_bytes());
    k
}

/// The range end covering every key that starts with `prefix`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `service/id` after a prefix, as an instance key.
fn parse_key(rest: &[u8]) -> Option<InstanceKey> {
    let s = std::str::from_utf8(rest).ok()?;
    let (service, id) = s.split_once('/')?;
    Some(InstanceKey {
        service: service.into(),
        id: id.into(),
    })
}

/// Runs sessions until the registry shuts down, then revokes the node's
/// lease so its instances leave the cluster at once.
pub(super) async fn run(store: Arc<EtcdStore>) {
    let shutdown = store.shutdown.clone();
    let mut backoff = MIN_BACKOFF;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            r = session(&store) => r,
        };
        store.stale.store(true, Ordering::Release);
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e.message(), retry_in = ?backoff,
                    "etcd session ended; serving the last catalog as stale");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if !store.is_stale() {
            backoff = MIN_BACKOFF;
        }
    }
    let lease = store.node_lease();
    if lease != 0 {
        let mut client = LeaseClient::new(store.channel.clone());
        let revoke = client.lease_revoke(LeaseRevokeRequest { id: lease });
        match tokio::time::timeout(ETCD_CALL_TIMEOUT, revoke).await {
            Ok(Ok(_)) => tracing::info!(lease, "etcd lease revoked on shutdown"),
            _ => tracing::warn!(
                lease,
                "could not revoke the etcd lease; it expires on its own"
            ),
        }
    }
    store.finished.cancel();
}

async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(ETCD_CALL_TIMEOUT, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::unavailable(format!(
            "etcd did not answer within {ETCD_CALL_TIMEOUT:?}"
        ))),
    }
}

/// Grants the node a new etcd lease.
async fn grant(
    leases: &mut LeaseClient<tonic::transport::Channel>,
    ttl_s: i64,
) -> Result<i64, Status> {
    let granted = call(leases.lease_grant(LeaseGrantRequest { ttl: ttl_s, id: 0 })).await?;
    if !granted.error.is_empty() {
        return Err(Status::unavailable(granted.error));
    }
    tracing::info!(
        lease = granted.id,
        ttl_s = granted.ttl,
        "etcd lease granted"
    );
    Ok(granted.id)
}

/// One session; returns why it ended.
async fn session(store: &Arc<EtcdStore>) -> Result<(), Status> {
    let options = &store.options;
    let ttl_s = options.lease_ttl.as_secs().max(1) as i64;
    let mut leases = LeaseClient::new(store.channel.clone());

    // (1) The node's lease: still alive, or a new one. etcd answers a
    // stream's headers only with its first message, so each stream is
    // opened with its first request already queued.
    let mut lease = store.node_lease();
    let mut lease_lost = lease == 0;
    if lease_lost {
        lease = grant(&mut leases, ttl_s).await?;
    }
    let (ka_tx, ka_rx) = mpsc::channel::<LeaseKeepAliveRequest>(4);
    ka_tx
        .try_send(LeaseKeepAliveRequest { id: lease })
        .expect("fresh channel has room");
    let mut keepalive = call(leases.lease_keep_alive(ReceiverStream::new(ka_rx))).await?;
    let first = tokio::time::timeout(ETCD_CALL_TIMEOUT, keepalive.message())
        .await
        .map_err(|_| Status::unavailable("no keepalive answer"))??
        .ok_or_else(|| Status::unavailable("keepalive stream ended"))?;
    if first.ttl <= 0 {
        tracing::warn!(
            lease,
            "our etcd lease expired; granting a new one and re-putting our instances"
        );
        lease_lost = true;
        // etcd deletes an expired lease's keys lazily (its lessor revokes
        // expired leases in batches, e.g. only once a paused etcd runs
        // again). Revoke it now, so the listing below no longer shows our
        // instances under the old lease (where they would look like another
        // node's and be forgotten) and no late revocation deletes what we
        // are about to put back. NotFound: etcd already revoked it.
        match call(leases.lease_revoke(LeaseRevokeRequest { id: lease })).await {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) if status.message().contains("lease not found") => {}
            Err(status) => return Err(status),
        }
        lease = grant(&mut leases, ttl_s).await?;
    }
    store.node_lease.store(lease, Ordering::Release);
    let renew_every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(300));

    // A resync asked for by a write that failed while we were stale has
    // been served by this very session: forget it, or it would end the
    // session as soon as it is up.
    let _ = futures::FutureExt::now_or_never(store.resync.notified());

    // (2) The epoch and the instances, at one revision.
    let (revision, epoch, listed) = list(store).await?;
    let ipfx = instance_prefix(&options.prefix);
    let known = store.epoch.load(Ordering::Acquire);
    let current = store.catalog.revision();
    let rewound = known != 0 && epoch != known;
    if rewound {
        // Another history (etcd restored and a node noticed, or wiped and
        // recreated): start over from it, resetting every watcher.
        tracing::warn!(
            old_epoch = known,
            epoch,
            revision,
            "etcd's history changed; the catalog restarts from it under a new epoch"
        );
        reset_to_listing(store, &listed, revision as u64);
    } else {
        let diff = diff_listing(store, &listed);
        if (revision as u64) < current || (revision as u64 == current && !diff.is_empty()) {
            // etcd went back in time under the same epoch: a new epoch for
            // every node, then relist.
            rewind_epoch(store, known, epoch).await?;
            return Err(Status::unavailable(format!(
                "etcd's revision {revision} is behind this node's {current}: etcd was restored; \
                 starting a new epoch"
            )));
        }
        apply_listing(store, diff, revision as u64);
    }
    store.epoch.store(epoch, Ordering::Release);

    // (3) Reconcile what we own with what etcd has.
    reconcile(store, &listed, lease, lease_lost, rewound, revision);

    // (4) Watch from R + 1, renewing the lease.
    let root = root_prefix(&options.prefix);
    let (w_tx, w_rx) = mpsc::channel::<WatchRequest>(1);
    w_tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: root.clone(),
            range_end: prefix_end(&root),
            start_revision: revision + 1,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        })),
    })
    .await
    .map_err(|_| Status::unavailable("watch stream closed"))?;
    let mut watch = call(
        WatchClient::new(store.channel.clone())
            .max_decoding_message_size(MAX_ETCD_MESSAGE)
            .watch(ReceiverStream::new(w_rx)),
    )
    .await?;
    // Fresh first, then the notification: whoever wakes on `applied` (the
    // first-sync wait at start) must see the node fresh, or on a quiet
    // cluster it would wait for an event that never comes.
    store.stale.store(false, Ordering::Release);
    store.applied.send_replace(revision as u64);
    let mut pending_renewal: Option<tokio::time::Instant> = None;
    tracing::info!(revision, lease, "etcd session up");

    let mut tick = tokio::time::interval(renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_answer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A paused etcd answers nothing but keeps the socket open: a
                // renewal unanswered for a call timeout ends the session, so
                // the node turns stale (and its clients move) before its
                // etcd lease can run out unnoticed.
                if pending_renewal.is_some_and(|at| at.elapsed() > ETCD_CALL_TIMEOUT)
                    || last_answer.elapsed() > renew_every * 2 + ETCD_CALL_TIMEOUT
                {
                    return Err(Status::unavailable("etcd stopped answering lease renewals"));
                }
                if ka_tx.try_send(LeaseKeepAliveRequest { id: lease }).is_err() {
                    return Err(Status::unavailable("keepalive stream stuck"));
                }
                pending_renewal.get_or_insert_with(tokio::time::Instant::now);
            }
            msg = keepalive.message() => {
                let resp = msg?.ok_or_else(|| Status::unavailable("keepalive stream ended"))?;
                if resp.ttl <= 0 {
                    store.node_lease.store(0, Ordering::Release);
                    return Err(Status::unavailable("our etcd lease expired"));
                }
                last_answer = tokio::time::Instant::now();
                pending_renewal = None;
            }
            msg = watch.message() => {
                let resp = msg?.ok_or_else(|| Status::unavailable("watch stream ended"))?;
                if resp.compact_revision > 0 {
                    return Err(Status::unavailable(format!(
                        "watch start compacted at {}; re-listing", resp.compact_revision
                    )));
                }
                if resp.canceled {
                    return Err(Status::unavailable(format!("watch canceled: {}", resp.cancel_reason)));
                }
                if apply_events(store, &resp.events, &ipfx) {
                    return Err(Status::unavailable("the cluster's epoch changed; re-listing"));
                }
                // What is applied: the events' revisions, and a progress
                // notification's header (sent only to a watch that has
                // caught up). Not the header of other responses: during
                // catch-up it is etcd's current revision, ahead of the
                // events delivered so far.
                let up_to = match resp.events.last() {
                    Some(ev) => ev.kv.as_ref().map_or(0, |kv| kv.mod_revision),
                    None if !resp.created => resp.header.map_or(0, |h| h.revision),
                    None => 0,
                };
                store.applied.send_if_modified(|a| {
                    let newer = up_to as u64 > *a;
                    if newer {
                        *a = up_to as u64;
                    }
                    newer
                });
            }
            _ = store.resync.notified() => {
                return Err(Status::unavailable("resync requested after a failed write"));
            }
        }
    }
}

fn decode(kv: &KeyValue, key: &InstanceKey) -> Option<Instance> {
    let mut instance = Instance::decode(kv.value.as_slice())
        .inspect_err(|e| tracing::warn!(service = %key.service, id = %key.id, error = %e, "undecodable instance in etcd ignored"))
        .ok()?;
    // The key is the truth about identity.
    instance.service = key.service.to_string();
    instance.id = key.id.to_string();
    Some(instance)
}

/// The epoch and every instance, read at one revision (one etcd
/// transaction); the epoch key is created first if the cluster has none.
async fn list(store: &EtcdStore) -> Result<(i64, u64, HashMap<InstanceKey, KeyValue>), Status> {
    use registry_api::etcd::etcdserverpb::{
        Compare, PutRequest, RequestOp, TxnRequest,
        compare::{CompareResult, CompareTarget, TargetUnion},
        request_op::Request,
        response_op::Response,
    };
    let prefix = &store.options.prefix;
    let ekey = epoch_key(prefix);
    let ipfx = instance_prefix(prefix);
    let mut kv = super::kv(&store.channel);
    call(kv.txn(TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: ekey.clone(),
            target_union: Some(TargetUnion::Version(0)),
            range_end: Vec::new(),
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: ekey.clone(),
                value: new_epoch().to_be_bytes().to_vec(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    }))
    .await?;
    let range = |key: Vec<u8>, range_end: Vec<u8>| RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key,
            range_end,
            ..Default::default()
        })),
    };
    let resp = call(kv.txn(TxnRequest {
        compare: Vec::new(),
        success: vec![
            range(ekey.clone(), Vec::new()),
            range(ipfx.clone(), prefix_end(&ipfx)),
        ],
        failure: Vec::new(),
    }))
    .await?;
    let revision = resp.header.as_ref().map_or(0, |h| h.revision);
    let mut ranges = resp.responses.into_iter().map(|r| match r.response {
        Some(Response::ResponseRange(range)) => range.kvs,
        _ => Vec::new(),
    });
    let epoch = ranges
        .next()
        .unwrap_or_default()
        .first()
        .and_then(epoch_value)
        .ok_or_else(|| Status::unavailable("the cluster's epoch key is missing or malformed"))?;
    let mut listed = HashMap::new();
    for kv in ranges.next().unwrap_or_default() {
        if let Some(key) = parse_key(&kv.key[ipfx.len()..]) {
            listed.insert(key, kv);
        }
    }
    Ok((revision, epoch, listed))
}

/// Replaces the cluster's epoch `old` (unless another node already did).
async fn rewind_epoch(store: &EtcdStore, old: u64, read: u64) -> Result<(), Status> {
    use registry_api::etcd::etcdserverpb::{
        Compare, PutRequest, RequestOp, TxnRequest,
        compare::{CompareResult, CompareTarget, TargetUnion},
        request_op::Request,
    };
    if read != old {
        return Ok(());
    }
    let ekey = epoch_key(&store.options.prefix);
    let epoch = new_epoch();
    tracing::warn!(
        old_epoch = old,
        epoch,
        "etcd's revisions went back; replacing the cluster's epoch"
    );
    call(super::kv(&store.channel).txn(TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: ekey.clone(),
            target_union: Some(TargetUnion::Value(old.to_be_bytes().to_vec())),
            range_end: Vec::new(),
        }],
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: ekey,
                value: epoch.to_be_bytes().to_vec(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    }))
    .await?;
    Ok(())
}

/// What must change in the catalog to hold exactly a listing.
#[derive(Debug, Default)]
struct Diff {
    deletes: Vec<InstanceKey>,
    puts: Vec<Instance>,
}

impl Diff {
    fn is_empty(&self) -> bool {
        self.deletes.is_empty() && self.puts.is_empty()
    }
}

fn diff_listing(store: &EtcdStore, listed: &HashMap<InstanceKey, KeyValue>) -> Diff {
    let catalog = &store.catalog;
    let mut diff = Diff::default();
    let (services, _) = catalog.list_services();
    for (service, _) in services {
        let Some(snap) = catalog.resolve(&service).0 else {
            continue;
        };
        for inst in snap.instances() {
            let key = InstanceKey::of(inst);
            if !listed.contains_key(&key) {
                diff.deletes.push(key);
            }
        }
    }
    for (key, kv) in listed {
        let Some(instance) = decode(kv, key) else {
            continue;
        };
        // Compared without the revision, which the catalog sets on commit.
        let unchanged = catalog
            .resolve(&key.service)
            .0
            .and_then(|snap| snap.instances().iter().find(|i| *i.id == *key.id).cloned())
            .is_some_and(|i| {
                let mut current = Instance::clone(&i);
                current.revision = 0;
                current == instance
            });
        if !unchanged {
            diff.puts.push(instance);
        }
    }
    diff
}

/// Commits a listing's difference at `revision` (above the catalog's) as
/// one resync point: live watchers get the diff as an ordinary batch,
/// resuming ones at or below it a reset. Nothing at all when the listing is
/// at the catalog's revision already (nothing was missed).
fn apply_listing(store: &EtcdStore, diff: Diff, revision: u64) {
    let catalog = &store.catalog;
    if revision <= catalog.revision() {
        return;
    }
    let mut txn = catalog.txn();
    for key in diff.deletes {
        // Gone while we were not watching: why is unknown, and a lease
        // expiring is by far the likeliest.
        txn.delete(key, DeleteReason::Expired);
    }
    for instance in diff.puts {
        txn.put(instance);
    }
    txn.mark_discontinuity();
    txn.commit_at(revision);
}

/// Replaces the whole catalog with a listing of another history.
fn reset_to_listing(store: &EtcdStore, listed: &HashMap<InstanceKey, KeyValue>, revision: u64) {
    let mut txn = store.catalog.txn();
    for (key, kv) in listed {
        if let Some(mut instance) = decode(kv, key) {
            instance.revision = kv.mod_revision as u64;
            txn.put(instance);
        }
    }
    txn.commit_reset(revision);
}

/// After a listing: make etcd hold exactly what this node owns.
///
/// - After losing our etcd lease, every owned instance is put back, but
///   only onto a key that is absent or still ours: one another node holds
///   now was registered there after we lost it (the client failed over),
///   and the writer refuses the put and forgets the instance here.
/// - An owned instance now held by another node, or removed, since our put
///   is forgotten (and detached from its client lease).
/// - An owned instance whose put is newer than the listing (etcd was
///   restored from an older copy) is put back, under the same guard.
/// - A key under our etcd lease that we no longer own (its client lease
///   expired or it was deregistered while etcd was away) is deleted.
fn reconcile(
    store: &EtcdStore,
    listed: &HashMap<InstanceKey, KeyValue>,
    lease: i64,
    lease_lost: bool,
    rewound: bool,
    revision: i64,
) {
    let mut writes: Vec<(Op, Undo)> = Vec::new();
    {
        let _txn = store.catalog.txn();
        let mut owned = store.owned.lock();
        let mut gone = Vec::new();
        for (key, o) in owned.iter() {
            let held_by_other = listed.get(key).is_some_and(|kv| kv.lease != lease);
            // Our put is not in this history: etcd was restored from a copy
            // older than it (after a new epoch, no revision of ours is
            // comparable with etcd's any more). Put it back.
            let lost_in_rewind = rewound || o.revision > revision;
            let put_back = match listed.get(key) {
                Some(kv) if kv.lease == lease && !lease_lost => {
                    lost_in_rewind && kv.value.as_slice() != o.value.as_ref()
                }
                // Taken over by another node since our put.
                _ if held_by_other && o.revision != 0 && o.revision < revision => {
                    gone.push(key.clone());
                    false
                }
                _ if lease_lost => true,
                None if lost_in_rewind => true,
                // Removed since our put (deregistered through another node).
                None if o.revision != 0 && o.revision < revision => {
                    gone.push(key.clone());
                    false
                }
                _ => false,
            };
            if put_back {
                writes.push((
                    Op::Put {
                        key: key.clone(),
                        value: o.value.clone(),
                        seq: o.seq,
                        guard: Guard::AbsentOrOurs,
                    },
                    Undo {
                        attached: vec![(o.client_lease, key.clone())],
                        ..Undo::default()
                    },
                ));
            }
        }
        for key in gone {
            if let Some(o) = owned.remove(&key) {
                store.leases.detach(o.client_lease, &key);
            }
        }
        for (key, kv) in listed {
            if kv.lease == lease && !owned.contains_key(key) {
                writes.push((
                    Op::Delete {
                        key: key.clone(),
                        reason: None,
                        only_ours: true,
                    },
                    Undo::default(),
                ));
            }
        }
    }
    if !writes.is_empty() {
        tracing::info!(
            writes = writes.len(),
            lease_lost,
            "reconciling our instances with etcd"
        );
        // One op per write, so the writer can batch them at will.
        for (op, undo) in writes {
            store.send(vec![op], None, undo);
        }
    }
}

/// Applies watch events: each etcd revision becomes one catalog commit at
/// that revision.
/// Returns true when the cluster's epoch changed (the session must relist).
fn apply_events(store: &EtcdStore, events: &[Event], ipfx: &[u8]) -> bool {
    let rpfx = reason_prefix(&store.options.prefix);
    let ekey = epoch_key(&store.options.prefix);
    let epoch = store.epoch.load(Ordering::Acquire);
    if events.iter().any(|ev| {
        ev.kv
            .as_ref()
            .is_some_and(|kv| kv.key == ekey && epoch_value(kv) != Some(epoch))
    }) {
        return true;
    }
    let lease = store.node_lease();
    let mut i = 0;
    while i < events.len() {
        let revision = events[i].kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let mut j = i;
        while j < events.len() && events[j].kv.as_ref().map_or(0, |kv| kv.mod_revision) == revision
        {
            j += 1;
        }
        let group = &events[i..j];
        i = j;
        // Reasons written in this revision.
        let mut reasons: HashMap<InstanceKey, DeleteReason> = HashMap::new();
        for ev in group {
            if ev.r#type == EventType::Put as i32
                && let Some(kv) = &ev.kv
                && let Some(rest) = kv.key.strip_prefix(rpfx.as_slice())
                && let Some(key) = parse_key(rest)
            {
                let reason = kv
                    .value
                    .first()
                    .and_then(|b| DeleteReason::try_from(i32::from(*b)).ok())
                    .unwrap_or(DeleteReason::Expired);
                reasons.insert(key, reason);
            }
        }
        let mut txn = store.catalog.txn();
        for ev in group {
            let Some(kv) = &ev.kv else { continue };
            let Some(rest) = kv.key.strip_prefix(ipfx) else {
                continue;
            };
            let Some(key) = parse_key(rest) else { continue };
            if ev.r#type == EventType::Put as i32 {
                if kv.lease != lease {
                    lost_to_other(store, &key, revision);
                }
                if let Some(instance) = decode(kv, &key) {
                    txn.put(instance);
                }
            } else {
                let reason = reasons.get(&key).copied();
                let prev_ours = ev
                    .prev_kv
                    .as_ref()
                    .is_some_and(|p| p.lease == lease && lease != 0);
                if reason.is_some() || !prev_ours {
                    // Deregistered (by any node) or taken from someone else:
                    // not ours to put back.
                    lost_to_other(store, &key, revision);
                }
                // Without a reason key: our etcd lease expiring took it
                // (owned stays, and the keepalive reports the loss), or
                // another node's lease or client lease expired.
                txn.delete(key, reason.unwrap_or(DeleteReason::Expired));
            }
        }
        txn.commit_at(revision as u64);
    }
    false
}

/// Another node (or an admin) changed an instance this node may own:
/// forget it, unless our own newer put is on its way.
fn lost_to_other(store: &EtcdStore, key: &InstanceKey, revision: i64) {
    let mut owned = store.owned.lock();
    let Some(o) = owned.get(key) else { return };
    if o.revision == 0 || o.revision >= revision {
        return;
    }
    let client_lease = o.client_lease;
    owned.remove(key);
    drop(owned);
    store.leases.detach(client_lease, key);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_slashes_in_ids() {
        let key = InstanceKey {
            service: "prod".into(),
            id: "a/b".into(),
        };
        let k = instance_key("/registry", &key);
        assert_eq!(k, b"/registry/i/prod/a/b");
        let ipfx = instance_prefix("/registry/");
        assert_eq!(parse_key(&k[ipfx.len()..]), Some(key.clone()));
        assert_eq!(reason_key("/registry", &key), b"/registry/r/prod/a/b");
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/r/"), b"/r0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
