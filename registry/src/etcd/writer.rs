//! The writer task: turns queued writes into etcd transactions.
//!
//! Concurrent registrations queue their puts here; the task takes everything
//! queued (up to [`MAX_TXN_OPS`] operations, and never two writes to one
//! key, which etcd refuses in one transaction) and sends it as one `Txn`.
//! One transaction is in flight at a time: writes to one key stay in order,
//! and under load each round trip carries up to 128 registrations, so
//! throughput is not one round trip per instance.
//!
//! Every queued operation is one nested transaction of the batch, so each
//! carries its own condition and answer:
//! - a put lands only if its [`Guard`] holds (see there): a registration
//!   delayed behind another node's newer one fails with `ABORTED` instead
//!   of overwriting it, and its planning is undone;
//! - a delete that must only remove our own key (expiry, lease revocation:
//!   the instance may have re-registered on another node meanwhile)
//!   compares the key's lease with the node's;
//! - a deregistration also puts the reason key in the same nested
//!   transaction, so in the same revision; once that is committed the
//!   reason keys are deleted in a follow-up transaction.
//!
//! A failed write is answered with the error and undone here, by the task,
//! whether or not its caller still waits.

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

use super::{ETCD_CALL_TIMEOUT, EtcdStore, Guard, MAX_TXN_OPS, Op, Write, sync};
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
        let mut cost = batch[0].ops.len();
        let mut keys: HashSet<InstanceKey> =
            batch[0].ops.iter().map(|op| op.key().clone()).collect();
        while cost < MAX_TXN_OPS {
            let Ok(next) = rx.try_recv() else { break };
            let conflict = next.ops.iter().any(|op| keys.contains(op.key()));
            if conflict || cost + next.ops.len() > MAX_TXN_OPS {
                carry = Some(next);
                break;
            }
            cost += next.ops.len();
            keys.extend(next.ops.iter().map(|op| op.key().clone()));
            batch.push(next);
        }
        commit(&store, &mut kv, batch).await;
    }
}

/// What one operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It changed a key.
    Changed,
    /// Its condition did not hold (a delete of a key no longer ours: fine).
    Skipped,
    /// A put whose guard failed: another node holds the key now.
    Refused,
}

/// Sends one batch as one transaction (splitting a single oversized write
/// into several) and answers every writer.
async fn commit(store: &EtcdStore, kv: &mut KvClient<Channel>, batch: Vec<Write>) {
    let lease = store.node_lease();
    let prefix = &store.options.prefix;
    let mut ops = Vec::new();
    let mut reasons = Vec::new();
    for write in &batch {
        for op in &write.ops {
            ops.push(request(op, lease, prefix, &mut reasons));
        }
    }
    let mut chunks: Vec<Vec<RequestOp>> = Vec::new();
    // Only a single write larger than the limit (a lease with many
    // instances) gets here with more than MAX_TXN_OPS operations.
    while ops.len() > MAX_TXN_OPS {
        let rest = ops.split_off(MAX_TXN_OPS);
        chunks.push(std::mem::replace(&mut ops, rest));
    }
    chunks.push(ops);
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
            fail(
                store,
                write,
                Error::Unavailable(format!("etcd write failed: {why}; try again")),
            );
        }
        return;
    }
    // Answer in order: one response per operation.
    let mut responses = responses.into_iter();
    for write in batch {
        let outcomes: Vec<Outcome> = write
            .ops
            .iter()
            .map(|op| outcome(op, responses.next()))
            .collect();
        if let Some(refused) = write
            .ops
            .iter()
            .zip(&outcomes)
            .find(|(_, o)| **o == Outcome::Refused)
            .map(|(op, _)| op.key().clone())
        {
            tracing::info!(
                service = %refused.service,
                id = %refused.id,
                "put refused: another node registered the instance since this one planned it"
            );
            let why = Error::Aborted(format!(
                "instance {:?} of service {:?} was registered through another registry node meanwhile; \
                 retry to take it over",
                refused.id, refused.service
            ));
            fail(store, write, why);
            continue;
        }
        for op in &write.ops {
            if let Op::Put { key, seq, .. } = op
                && let Some(o) = store.owned.lock().get_mut(key)
                && o.seq == *seq
            {
                o.revision = revision;
            }
        }
        let changed = outcomes.contains(&Outcome::Changed);
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

/// Answers a failed write and undoes it: the lease table as planned, and
/// our record of owning what it meant to put (unless a newer put of the
/// same key took over since).
fn fail(store: &EtcdStore, write: Write, error: Error) {
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
        let _ = reply.send(Err(error));
    }
}

fn compare(
    key: &[u8],
    target: CompareTarget,
    union: TargetUnion,
    result: CompareResult,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.to_vec(),
        target_union: Some(union),
        range_end: Vec::new(),
    }
}

/// `ops` if `conditions[0]`, else if `conditions[1]`, ...: each condition
/// one level of nested transactions (etcd's compares are conjunctions).
fn first_of(conditions: &[Compare], ops: Vec<RequestOp>) -> RequestOp {
    let (first, rest) = conditions.split_first().expect("at least one condition");
    let failure = if rest.is_empty() {
        Vec::new()
    } else {
        vec![first_of(rest, ops.clone())]
    };
    RequestOp {
        request: Some(Request::RequestTxn(TxnRequest {
            compare: vec![first.clone()],
            success: ops,
            failure,
        })),
    }
}

/// The one nested transaction of a queued operation.
fn request(op: &Op, lease: i64, prefix: &str, reasons: &mut Vec<Vec<u8>>) -> RequestOp {
    match op {
        Op::Put {
            key, value, guard, ..
        } => {
            let ikey = sync::instance_key(prefix, key);
            let put = RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: ikey.clone(),
                    value: value.to_vec(),
                    lease,
                    ..Default::default()
                })),
            };
            let absent = compare(
                &ikey,
                CompareTarget::Version,
                TargetUnion::Version(0),
                CompareResult::Equal,
            );
            let ours = compare(
                &ikey,
                CompareTarget::Lease,
                TargetUnion::Lease(lease),
                CompareResult::Equal,
            );
            let conditions = match guard {
                Guard::Since(revision) => vec![
                    compare(
                        &ikey,
                        CompareTarget::Mod,
                        TargetUnion::ModRevision(revision + 1),
                        CompareResult::Less,
                    ),
                    absent,
                    ours,
                ],
                Guard::AbsentOrOurs => vec![absent, ours],
            };
            first_of(&conditions, vec![put])
        }
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
            let condition = if *only_ours {
                vec![compare(
                    &ikey,
                    CompareTarget::Lease,
                    TargetUnion::Lease(lease),
                    CompareResult::Equal,
                )]
            } else {
                Vec::new()
            };
            RequestOp {
                request: Some(Request::RequestTxn(TxnRequest {
                    compare: condition,
                    success: ops,
                    failure: Vec::new(),
                })),
            }
        }
    }
}

/// What an operation's (nested) response says it did.
fn outcome(op: &Op, resp: Option<ResponseOp>) -> Outcome {
    let Some(Response::ResponseTxn(mut txn)) = resp.and_then(|r| r.response) else {
        return Outcome::Skipped;
    };
    match op {
        Op::Put { .. } => loop {
            if txn.succeeded {
                return Outcome::Changed;
            }
            match txn.responses.pop().and_then(|r| r.response) {
                Some(Response::ResponseTxn(inner)) => txn = inner,
                _ => return Outcome::Refused,
            }
        },
        Op::Delete { .. } => {
            let deleted = txn.succeeded
                && txn.responses.into_iter().any(
                    |r| matches!(r.response, Some(Response::ResponseDeleteRange(d)) if d.deleted > 0),
                );
            if deleted {
                Outcome::Changed
            } else {
                Outcome::Skipped
            }
        }
    }
}
