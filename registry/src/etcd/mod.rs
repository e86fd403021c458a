//! `--store etcd`: several registry nodes over one etcd cluster.
//!
//! We do not write consensus: etcd holds the catalog, every node keeps a
//! local copy of it, and liveness stays local to each node.
//!
//! - **Liveness is local.** Client leases and heartbeats live only in the
//!   node the client talks to ([`crate::lease`]); heartbeats never touch
//!   etcd. Each node holds ONE etcd lease of its own, kept alive by
//!   [`sync`], and writes every instance it owns as the key
//!   `{prefix}/i/{service}/{id}` under that lease (value: the `Instance`,
//!   protobuf-encoded, `lease_id` being the client lease on the owning
//!   node). A node that dies takes its instances with it when its etcd lease
//!   expires; its clients see their KeepAlive stream break, fail over to
//!   another node (client-lib's endpoint list) and register there.
//! - **Reads are local.** Every node watches the prefix and applies each
//!   etcd revision to its [`crate::catalog::Catalog`] as one catalog
//!   revision numbered with etcd's revision ([`crate::catalog::Txn::commit_at`]),
//!   so Resolve and Watch are served from memory and a Watch may resume on
//!   any node: every node reports the same epoch, derived from etcd's
//!   cluster id.
//! - **Read your writes.** Register and Deregister answer with the etcd
//!   revision of their write, after this node's catalog has applied it (at
//!   most [`APPLY_WAIT`]), so a client that registers and then resolves on
//!   the same node sees its instance.
//! - **Delete reasons** cross nodes as a reason key `{prefix}/r/{service}/{id}`
//!   (one byte, the `DeleteReason`) written in the same etcd transaction, so
//!   in the same revision, as a deregistration's delete. A delete without a
//!   reason key in its revision is `EXPIRED`: a client lease expiring on its
//!   node, or a dead node's etcd lease taking its keys. Reason keys are
//!   deleted again by the writer right after (and live under the node's etcd
//!   lease in case it dies first), so they do not accumulate.
//! - **Batching.** Writes from concurrent requests are queued to one writer
//!   task ([`writer`]) that sends them as etcd transactions of at most
//!   [`MAX_TXN_OPS`] operations, one transaction in flight at a time (which
//!   keeps writes to one key in order).
//! - **Losing etcd.** While the node cannot reach etcd it is *stale*:
//!   Register and Deregister fail with `UNAVAILABLE`, Resolve and Watch keep
//!   answering from the last catalog with `ServerInfo.stale` set. When etcd
//!   is back, [`sync`] re-lists the prefix at one revision, diffs it against
//!   the catalog (one catalog commit that resets resuming watchers, see
//!   [`crate::catalog::Txn::mark_discontinuity`]), puts its own instances
//!   back if its etcd lease was lost, deletes the ones whose client lease
//!   expired meanwhile, and resumes watching.
//!
//! Deliberately not the `etcd-client` crate: its build script needs a
//! system `protoc`, and this workspace builds with protox alone. The client
//! here is tonic's, generated from etcd's own `rpc.proto` (the KV, Watch and
//! Lease subset, in `proto/etcd/`), and the wrapper is the few calls below.

mod sync;
mod writer;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use registry_api::{
    etcd::etcdserverpb::{RangeRequest, kv_client::KvClient},
    v1::DeleteReason,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub use crate::config::EtcdOptions;
use crate::{
    catalog::{Catalog, InstanceKey},
    change::{Batch, Change, Undo},
    error::{Error, Result},
    lease::{LeaseId, LeaseTable},
};

/// etcd's default `--max-txn-ops`: the most operations one transaction may
/// carry. A batch never exceeds it.
pub const MAX_TXN_OPS: usize = 128;

/// How long a Register or Deregister waits for this node's catalog to apply
/// its own write before answering anyway (the write is durable in etcd; the
/// wait only gives read-your-writes on the same node).
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// How long a resumed Watch waits for this node to catch up to the revision
/// the client saw elsewhere before being answered with a reset snapshot.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// Bound on one etcd call: a paused or partitioned etcd must turn into
/// `UNAVAILABLE` for our callers well within their own 3 s RPC timeout.
pub const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest etcd response decoded (the initial list of a large catalog comes
/// in one Range): a million instances of ~200 bytes.
const MAX_ETCD_MESSAGE: usize = 256 << 20;

/// What this node has written (or is writing) to etcd for one instance:
/// the record it puts back if its etcd lease is lost.
#[derive(Debug, Clone)]
struct Owned {
    /// The client lease on this node the instance lives under.
    client_lease: LeaseId,
    /// The encoded `Instance`.
    value: Bytes,
    /// etcd revision of our put; 0 while it is in flight.
    revision: i64,
    /// Identifies this registration, so a late completion or rollback of an
    /// older one does not touch a newer one.
    seq: u64,
}

/// When a put may land: never over a registration another node made since
/// this node planned it.
#[derive(Debug, Clone, Copy)]
enum Guard {
    /// A registration planned when this node had applied revision `C`: the
    /// key must be unchanged since `C`, or absent, or already ours (our own
    /// earlier put, maybe still in flight when this one was planned). A put
    /// delayed past another node's newer registration (a cancelled or slow
    /// request, a frozen node) then fails instead of taking the key back.
    Since(i64),
    /// A put-back after this node lost its etcd lease: only onto an absent
    /// key or one still ours; a key another node holds now is theirs.
    AbsentOrOurs,
}

/// One queued change to etcd.
#[derive(Debug)]
enum Op {
    /// Put an instance under the node's lease, if its guard holds.
    Put {
        key: InstanceKey,
        value: Bytes,
        seq: u64,
        guard: Guard,
    },
    /// Delete an instance. `reason` writes the reason key in the same
    /// revision (absent: EXPIRED); `only_ours` deletes only while the key is
    /// still under this node's lease (it may have moved to another node).
    Delete {
        key: InstanceKey,
        reason: Option<DeleteReason>,
        only_ours: bool,
    },
}

impl Op {
    fn key(&self) -> &InstanceKey {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// A request's changes, applied in one etcd transaction; the reply is the
/// etcd revision, or 0 when nothing changed. On failure the writer runs
/// `undo` itself, so a caller that stopped waiting cannot skip it.
#[derive(Debug)]
struct Write {
    ops: Vec<Op>,
    reply: Option<oneshot::Sender<Result<i64>>>,
    undo: Undo,
}

/// One node's connection to etcd and its record of what it owns there.
#[derive(Debug)]
pub struct EtcdStore {
    options: EtcdOptions,
    channel: Channel,
    /// No etcd session right now (or not yet): reads are marked stale and
    /// writes refused.
    stale: AtomicBool,
    /// The node's etcd lease (0: none yet).
    node_lease: AtomicI64,
    /// Instances this node owns in etcd.
    owned: Mutex<HashMap<InstanceKey, Owned>>,
    next_seq: AtomicU64,
    /// Queue to the writer task. Unbounded so the expiry task can enqueue
    /// without awaiting; each request has at most one write queued, so the
    /// queue is bounded by the calls in flight and the expiry batch.
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
    /// The etcd revision the catalog has applied.
    applied: watch::Sender<u64>,
    /// The cluster's epoch (`{prefix}/epoch` in etcd); 0 before the first
    /// session.
    epoch: AtomicU64,
    /// Asks the sync task to start a new session (a write found the node's
    /// lease gone, or failed in a way that may have left strays).
    resync: Notify,
    /// Cancelled when the sync task has finished (lease revoked on a
    /// graceful shutdown).
    finished: CancellationToken,
    /// The catalog this node's watch feeds.
    catalog: Arc<Catalog>,
    /// The node's client leases (liveness is local).
    leases: Arc<LeaseTable>,
    /// The registry's shutdown signal.
    shutdown: CancellationToken,
}

impl EtcdStore {
    fn new(
        options: EtcdOptions,
        channel: Channel,
        catalog: Arc<Catalog>,
        leases: Arc<LeaseTable>,
        shutdown: CancellationToken,
    ) -> Self {
        let (writes, writes_rx) = mpsc::unbounded_channel();
        Self {
            options,
            channel,
            stale: AtomicBool::new(true),
            node_lease: AtomicI64::new(0),
            owned: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            writes,
            writes_rx: Mutex::new(Some(writes_rx)),
            applied: watch::channel(0).0,
            epoch: AtomicU64::new(0),
            resync: Notify::new(),
            finished: CancellationToken::new(),
            catalog,
            leases,
            shutdown,
        }
    }

    /// The options this node runs with.
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// True while the node has no working etcd session: answers come from
    /// the last catalog it had.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// The cluster's epoch: what `ServerInfo.epoch` reports on every node,
    /// so a watch may resume on any of them.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The etcd revision this node's catalog has applied.
    pub fn applied_revision(&self) -> u64 {
        *self.applied.borrow()
    }

    /// This node's etcd lease id (0 before the first session).
    pub fn node_lease(&self) -> i64 {
        self.node_lease.load(Ordering::Acquire)
    }

    /// Number of instances this node owns in etcd.
    pub fn owned_count(&self) -> usize {
        self.owned.lock().len()
    }

    /// Waits (at most [`CATCH_UP_WAIT`]) until the catalog has applied
    /// `revision`.
    pub async fn catch_up(&self, revision: u64) {
        if revision > self.applied_revision() {
            self.wait_applied(revision, CATCH_UP_WAIT).await;
        }
    }

    /// Resolves once the sync task has finished after a shutdown (at most 3
    /// seconds): the node's lease is revoked by then.
    pub async fn stopped(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.finished.cancelled()).await;
    }

    /// Refuses writes while the node has no etcd session.
    pub fn check_writable(&self) -> Result<()> {
        if self.is_stale() {
            return Err(Error::Unavailable(
                "this registry node has lost its connection to etcd; registrations are \
                 refused until it is back (try another node)"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn wait_applied(&self, revision: u64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|a| *a >= revision)).await,
            Ok(Ok(_))
        )
    }

    fn send(&self, ops: Vec<Op>, reply: Option<oneshot::Sender<Result<i64>>>, undo: Undo) {
        if ops.is_empty() {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(0));
            }
            return;
        }
        // A closed queue means the writer stopped (shutdown): the reply
        // sender is dropped with the message and the caller sees an error.
        let _ = self.writes.send(Write { ops, reply, undo });
    }

    /// Turns a planned batch into etcd operations and queues them as one
    /// write. Instances put are recorded as owned by this node (what it puts
    /// back after losing its etcd lease); a lease's deletes apply only where
    /// the key is still ours. `current` is the catalog revision the batch
    /// was planned at, answered when the write changes nothing.
    pub(crate) fn submit(self: &Arc<Self>, batch: Batch, undo: Undo, current: u64) -> EtcdWrite {
        let guard = Guard::Since(current as i64);
        let mut ops = Vec::with_capacity(batch.changes.len());
        for change in batch.changes {
            match change {
                Change::Put { key, mut instance } => {
                    // Output only: each node sets it to the etcd revision.
                    instance.revision = 0;
                    let value = Bytes::from(instance.encode_to_vec());
                    let seq = self.own(key.clone(), instance.lease_id, value.clone());
                    ops.push(Op::Put {
                        key,
                        value,
                        seq,
                        guard,
                    });
                }
                Change::Delete {
                    key,
                    reason,
                    lease: Some(lease),
                } => {
                    if self.disown(&key, Some(lease)) {
                        ops.push(Op::Delete {
                            key,
                            reason: (reason != DeleteReason::Expired).then_some(reason),
                            only_ours: true,
                        });
                    }
                }
                Change::Delete {
                    key,
                    reason,
                    lease: None,
                } => {
                    self.disown(&key, None);
                    ops.push(Op::Delete {
                        key,
                        reason: Some(reason),
                        only_ours: false,
                    });
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        self.send(ops, Some(tx), undo);
        EtcdWrite {
            rx,
            store: self.clone(),
            current,
        }
    }

    /// Takes back a failed write's lease-table changes, under the catalog's
    /// write transaction like every lease-table change.
    fn undo(&self, undo: &Undo) {
        let _txn = self.catalog.txn();
        if let Some(id) = undo.granted {
            self.leases.revoke(id);
        }
        for (id, key) in &undo.attached {
            self.leases.detach(*id, key);
        }
        for (id, key) in &undo.detached {
            if let Some(lease) = self.leases.get(*id) {
                self.leases.attach(&lease, key.clone());
            }
        }
    }

    /// Records that this node now owns `key` with this value; returns the
    /// registration's sequence number.
    fn own(&self, key: InstanceKey, client_lease: LeaseId, value: Bytes) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.owned.lock().insert(
            key,
            Owned {
                client_lease,
                value,
                revision: 0,
                seq,
            },
        );
        seq
    }

    /// Forgets `key` if it is owned under `client_lease` (any lease when
    /// `None`); true if it was.
    fn disown(&self, key: &InstanceKey, client_lease: Option<LeaseId>) -> bool {
        let mut owned = self.owned.lock();
        match owned.get(key) {
            Some(o) if client_lease.is_none_or(|l| l == o.client_lease) => {
                owned.remove(key);
                true
            }
            _ => false,
        }
    }
}

async fn wait_reply(rx: oneshot::Receiver<Result<i64>>) -> Result<i64> {
    // The writer bounds each transaction by ETCD_CALL_TIMEOUT; the extra
    // margin covers the queue ahead of us.
    match tokio::time::timeout(ETCD_CALL_TIMEOUT * 3, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Error::Unavailable(
            "registry node is shutting down; try another node".into(),
        )),
        Err(_) => Err(Error::Unavailable(
            "etcd did not confirm the write in time; try again".into(),
        )),
    }
}

/// A write sent to etcd: its revision once etcd has it and this node's
/// catalog has applied it (read-your-writes on the same node).
#[derive(Debug)]
pub struct EtcdWrite {
    rx: oneshot::Receiver<Result<i64>>,
    store: Arc<EtcdStore>,
    current: u64,
}

impl EtcdWrite {
    /// Waits for etcd's answer, then (at most [`APPLY_WAIT`]) for this
    /// node's catalog to apply it.
    pub async fn wait(self) -> Result<u64> {
        let revision = wait_reply(self.rx).await?;
        if revision <= 0 {
            return Ok(self.current.max(self.store.catalog.revision()));
        }
        if !self.store.wait_applied(revision as u64, APPLY_WAIT).await {
            tracing::warn!(
                revision,
                "etcd write not applied by this node in time; answering anyway"
            );
        }
        Ok(revision as u64)
    }
}

impl EtcdStore {
    /// Connects to etcd, builds a registry node on it, loads the catalog and
    /// starts the node's background tasks (lease keepalive, watch, writer). They
    /// stop when the registry shuts down. Fails if etcd cannot be reached within
    /// `options.connect_timeout`.
    pub async fn start(
        options: EtcdOptions,
        catalog: Arc<Catalog>,
        leases: Arc<LeaseTable>,
        shutdown: CancellationToken,
    ) -> Result<(Arc<EtcdStore>, u64)> {
        if options.endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "--etcd-endpoints is empty; give at least one http://host:port".into(),
            ));
        }
        let mut endpoints = Vec::new();
        for url in &options.endpoints {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::InvalidArgument(format!("etcd endpoint {url:?}: {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        // The first answer proves etcd reachable; the epoch itself is read
        // (or created) by the first sync session.
        loop {
            let probe = RangeRequest {
                key: sync::instance_prefix(&options.prefix),
                range_end: sync::prefix_end(&sync::instance_prefix(&options.prefix)),
                count_only: true,
                ..Default::default()
            };
            let attempt = tokio::time::timeout(ETCD_CALL_TIMEOUT, kv(&channel).range(probe)).await;
            match attempt {
                Ok(Ok(_)) => break,
                Ok(Err(status)) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "cannot reach etcd at {}: {}",
                        options.endpoints.join(","),
                        status.message()
                    )));
                }
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "etcd at {} did not answer within {:?}",
                        options.endpoints.join(","),
                        options.connect_timeout
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let connect_timeout = options.connect_timeout;
        let store = Arc::new(EtcdStore::new(options, channel, catalog, leases, shutdown));
        let rx = store
            .writes_rx
            .lock()
            .take()
            .expect("a fresh store has its queue");
        tokio::spawn(writer::run(store.clone(), rx, store.shutdown.clone()));
        tokio::spawn(sync::run(store.clone()));
        // Serve only once the catalog holds what etcd holds.
        let mut applied = store.applied.subscribe();
        let synced = tokio::time::timeout(connect_timeout, async {
            loop {
                if !store.is_stale() {
                    return;
                }
                // Woken by the session's first `applied`; the short poll is
                // a backstop against a wake-up racing the stale flag.
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
        .await;
        if synced.is_err() || store.is_stale() {
            store.shutdown.cancel();
            return Err(Error::Unavailable(format!(
                "etcd at {} reachable but the first sync did not finish within {connect_timeout:?}",
                store.options.endpoints.join(",")
            )));
        }
        // The `{prefix}/epoch` key the first session read or created.
        let epoch = store.epoch();
        tracing::info!(
            epoch,
            revision = store.applied_revision(),
            lease = store.node_lease(),
            instances = store.catalog.instance_count(),
            "registry node synced with etcd"
        );
        Ok((store, epoch))
    }
}

fn kv(channel: &Channel) -> KvClient<Channel> {
    KvClient::new(channel.clone()).max_decoding_message_size(MAX_ETCD_MESSAGE)
}
