//! The writer task: turns queued writes into etcd transactions.
//!
//! Concurrent registrations queue their puts here; the task takes everything
//! queued (up to [`MAX_TXN_OPS`] operations, and never two writes to one
//! key, which etcd refuses in one transaction) and sends it as one `Txn`.
//! One transaction is in flight at a time: writes to one key stay in order,
//! and under load each round trip carries up to 128 registrations, so
//! throughput is not one round trip per instance.
//!
//! Deletes that must only remove our own key (expiry, lease revocation: the
//! instance may have re-registered on another node meanwhile) are nested
//! transactions comparing the key's lease with the node's. A deregistration
//! also puts the reason key in the same (nested) transaction; once that is
//! committed the reason keys are deleted in a follow-up transaction.

use std::{collections::HashSet, sync::Arc};

use registry_api::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RequestOp, ResponseOp, TxnRequest,
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    request_op::Request,
    response_op::Response,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{ETCD_CALL_TIMEOUT, EtcdStore, MAX_TXN_OPS, Op, Write, sync};
use crate::{catalog::InstanceKey, error::Error};

/// Runs until the registry shuts down or every sender is gone.
pub(super) async fn run(
    store: Arc<EtcdStore>,
    mut rx: mpsc::UnboundedReceiver<Write>,
    shutdown: CancellationToken,
) {
    let mut kv = super::kv(&store.channel);
    let mut carry: Option<Write> = None;
    loop {
        let first = match carry.take() {
            Some(w) => w,
            None => tokio::select! {
                _ = shutdown.cancelled() => return,
                w = rx.recv() => match w {
                    Some(w) => w,
                    None => return,
                },
            },
        };
        let mut batch = vec![first];
        let mut cost: usize = batch[0].ops.iter().map(Op::cost).sum();
        let mut keys: HashSet<InstanceKey> =
            batch[0].ops.iter().map(|op| op.key().clone()).collect();
        while cost < MAX_TXN_OPS {
            let Ok(next) = rx.try_recv() else { break };
            let next_cost: usize = next.ops.iter().map(Op::cost).sum();
            let conflict = next.ops.iter().any(|op| keys.contains(op.key()));
            if conflict || cost + next_cost > MAX_TXN_OPS {
                carry = Some(next);
                break;
            }
            cost += next_cost;
            keys.extend(next.ops.iter().map(|op| op.key().clone()));
            batch.push(next);
        }
        commit(&store, &mut kv, batch).await;
    }
}

/// Sends one batch as one transaction (splitting a single oversized write
/// into several) and answers every writer.
async fn commit(store: &EtcdStore, kv: &mut KvClient<Channel>, batch: Vec<Write>) {
    let lease = store.node_lease();
    let prefix = &store.options.prefix;
    let mut success = Vec::new();
    let mut reasons = Vec::new();
    for write in &batch {
        for op in &write.ops {
            push_op(op, lease, prefix, &mut success, &mut reasons);
        }
    }
    let mut chunks: Vec<Vec<RequestOp>> = Vec::new();
    // Only a single write larger than the limit (a lease with many
    // instances) gets here with more than MAX_TXN_OPS operations.
    while success.len() > MAX_TXN_OPS {
        let rest = success.split_off(MAX_TXN_OPS);
        chunks.push(std::mem::replace(&mut success, rest));
    }
    chunks.push(success);
    let mut responses: Vec<ResponseOp> = Vec::new();
    let mut revision = 0;
    let mut failure = None;
    for chunk in chunks {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: chunk,
            failure: Vec::new(),
        };
        match tokio::time::timeout(ETCD_CALL_TIMEOUT, kv.txn(txn)).await {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                revision = resp.header.map_or(revision, |h| h.revision);
                responses.extend(resp.responses);
            }
            Ok(Err(status)) => {
                failure = Some(status.message().to_owned());
                break;
            }
            Err(_) => {
                failure = Some(format!("no answer within {ETCD_CALL_TIMEOUT:?}"));
                break;
            }
        }
    }
    if let Some(why) = failure {
        tracing::warn!(error = %why, writes = batch.len(), "etcd write failed");
        if why.contains("lease not found") {
            // Our etcd lease is gone: a new session grants another one and
            // puts every owned instance back.
            store
                .node_lease
                .store(0, std::sync::atomic::Ordering::Release);
        }
        store.resync.notify_one();
        for write in batch {
            // Undo what planning did: the lease table, and our record of
            // owning what we meant to put (unless a newer put took over).
            store.undo(&write.undo);
            {
                let mut owned = store.owned.lock();
                for op in &write.ops {
                    if let Op::Put { key, seq, .. } = op
                        && owned.get(key).is_some_and(|o| o.seq == *seq)
                    {
                        owned.remove(key);
                    }
                }
            }
            if let Some(reply) = write.reply {
                let _ = reply.send(Err(Error::Unavailable(format!(
                    "etcd write failed: {why}; try again"
                ))));
            }
        }
        return;
    }
    // Answer in order, matching responses to operations.
    let mut responses = responses.into_iter();
    for write in batch {
        let mut changed = false;
        for op in &write.ops {
            let resp = responses.next();
            match op {
                Op::Put { key, seq, .. } => {
                    changed = true;
                    if let Some(o) = store.owned.lock().get_mut(key)
                        && o.seq == *seq
                    {
                        o.revision = revision;
                    }
                }
                Op::Delete {
                    reason, only_ours, ..
                } => {
                    if !*only_ours && reason.is_some() {
                        // The reason key's put has its own response.
                        responses.next();
                    }
                    changed |= deleted_something(resp);
                }
            }
        }
        if let Some(reply) = write.reply {
            let _ = reply.send(Ok(if changed { revision } else { 0 }));
        }
    }
    if !reasons.is_empty() {
        // Reason keys only need to live for their revision.
        let deletes = reasons
            .into_iter()
            .map(|key| RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key,
                    ..Default::default()
                })),
            })
            .collect::<Vec<_>>();
        for chunk in deletes.chunks(MAX_TXN_OPS) {
            let txn = TxnRequest {
                success: chunk.to_vec(),
                ..Default::default()
            };
            if let Ok(Err(e)) = tokio::time::timeout(ETCD_CALL_TIMEOUT, kv.txn(txn)).await {
                // They are under the node's lease: they go with it at worst.
                tracing::debug!(error = %e, "reason key cleanup failed");
            }
        }
    }
}

/// Appends the etcd operations of one queued op.
fn push_op(
    op: &Op,
    lease: i64,
    prefix: &str,
    out: &mut Vec<RequestOp>,
    reasons: &mut Vec<Vec<u8>>,
) {
    match op {
        Op::Put { key, value, .. } => out.push(RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: sync::instance_key(prefix, key),
                value: value.to_vec(),
                lease,
                ..Default::default()
            })),
        }),
        Op::Delete {
            key,
            reason,
            only_ours,
        } => {
            let ikey = sync::instance_key(prefix, key);
            let mut ops = vec![RequestOp {
                request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                    key: ikey.clone(),
                    ..Default::default()
                })),
            }];
            if let Some(reason) = reason {
                let rkey = sync::reason_key(prefix, key);
                reasons.push(rkey.clone());
                ops.push(RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: rkey,
                        value: vec![*reason as u8],
                        lease,
                        ..Default::default()
                    })),
                });
            }
            if *only_ours {
                out.push(RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        compare: vec![Compare {
                            result: CompareResult::Equal as i32,
                            target: CompareTarget::Lease as i32,
                            key: ikey,
                            target_union: Some(TargetUnion::Lease(lease)),
                            range_end: Vec::new(),
                        }],
                        success: ops,
                        failure: Vec::new(),
                    })),
                });
            } else {
                out.extend(ops);
            }
        }
    }
}

/// Whether a delete (plain or nested in a compare) removed a key.
fn deleted_something(resp: Option<ResponseOp>) -> bool {
    match resp.and_then(|r| r.response) {
        Some(Response::ResponseDeleteRange(d)) => d.deleted > 0,
        Some(Response::ResponseTxn(t)) => t.succeeded
            && t.responses.into_iter().any(
                |r| matches!(r.response, Some(Response::ResponseDeleteRange(d)) if d.deleted > 0),
            ),
        _ => false,
    }
}
