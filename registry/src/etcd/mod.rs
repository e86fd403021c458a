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
    v1::{DeleteReason, RegisterRequest, RegisterResponse},
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{
    auth::Identity,
    catalog::InstanceKey,
    config::Config,
    core::{RegisterUndo, Registry},
    error::{Error, Result},
    lease::LeaseId,
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

/// Default TTL of a node's own etcd lease: how long a dead node's instances
/// stay resolvable elsewhere. Its clients re-register on another node as
/// soon as their KeepAlive stream breaks, which replaces the keys, so this
/// only bounds how long instances of clients that died *with* the node
/// linger.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Where and how a node reaches etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the etcd members, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix under which this registry cluster keeps its keys; several
    /// registry clusters can share one etcd with different prefixes.
    pub prefix: String,
    /// TTL of the node's etcd lease (etcd rounds it up to its minimum, 2 s
    /// with default settings).
    pub lease_ttl: Duration,
    /// How long start-up waits for etcd before giving up.
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    /// Options for the given endpoints with the default prefix and TTLs.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/registry".into(),
            lease_ttl: DEFAULT_LEASE_TTL,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Parses a comma-separated endpoint list (`--etcd-endpoints`).
    pub fn parse_endpoints(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("http://{s}")
                }
            })
            .collect()
    }
}

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

/// One queued change to etcd.
#[derive(Debug)]
enum Op {
    /// Put an instance under the node's lease.
    Put {
        key: InstanceKey,
        value: Bytes,
        seq: u64,
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

    /// Operations it takes in a transaction.
    fn cost(&self) -> usize {
        match self {
            Op::Put { .. } => 1,
            Op::Delete {
                reason, only_ours, ..
            } => {
                if *only_ours {
                    1
                } else {
                    1 + usize::from(reason.is_some())
                }
            }
        }
    }
}

/// A request's changes, applied in one etcd transaction; the reply is the
/// etcd revision, or 0 when nothing changed.
#[derive(Debug)]
struct Write {
    ops: Vec<Op>,
    reply: Option<oneshot::Sender<Result<i64>>>,
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
    /// Asks the sync task to start a new session (a write found the node's
    /// lease gone, or failed in a way that may have left strays).
    resync: Notify,
    /// Cancelled when the sync task has finished (lease revoked on a
    /// graceful shutdown).
    finished: CancellationToken,
}

impl EtcdStore {
    fn new(options: EtcdOptions, channel: Channel) -> Self {
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
            resync: Notify::new(),
            finished: CancellationToken::new(),
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

    pub(crate) fn sync_only(&self, what: &str) -> Error {
        Error::Unavailable(format!(
            "{what} through the synchronous API is not available on a cluster node \
             (--store etcd); use the async variant"
        ))
    }

    fn check_writable(&self) -> Result<()> {
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

    fn send(&self, ops: Vec<Op>, reply: Option<oneshot::Sender<Result<i64>>>) {
        if ops.is_empty() {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(0));
            }
            return;
        }
        // A closed queue means the writer stopped (shutdown): the reply
        // sender is dropped with the message and the caller sees an error.
        let _ = self.writes.send(Write { ops, reply });
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

    /// The expiry task's deletes: a client lease on this node expired.
    /// Fire and forget; a failure leaves the keys under our etcd lease and
    /// the next resync deletes them (they are no longer owned).
    pub(crate) fn expire(&self, lease_id: LeaseId, keys: impl IntoIterator<Item = InstanceKey>) {
        let ops: Vec<Op> = keys
            .into_iter()
            .filter(|k| self.disown(k, Some(lease_id)))
            .map(|key| Op::Delete {
                key,
                reason: None,
                only_ours: true,
            })
            .collect();
        self.send(ops, None);
    }

    /// Sends `ops` and waits for the write and for this node to apply it.
    async fn write_and_apply(&self, ops: Vec<Op>) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.send(ops, Some(tx));
        let revision = wait_reply(rx).await?;
        if revision > 0 && !self.wait_applied(revision as u64, APPLY_WAIT).await {
            tracing::warn!(
                revision,
                "etcd write not applied by this node in time; answering anyway"
            );
        }
        Ok(revision as u64)
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

/// Connects to etcd, builds a registry node on it, loads the catalog and
/// starts the node's background tasks (lease keepalive, watch, writer). They
/// stop when the registry shuts down. Fails if etcd cannot be reached within
/// `options.connect_timeout`.
pub async fn start(config: Config, options: EtcdOptions) -> Result<Registry> {
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
    // Any response header carries the cluster id the epoch derives from.
    let cluster_id = loop {
        let probe = RangeRequest {
            key: sync::instance_prefix(&options.prefix),
            range_end: sync::prefix_end(&sync::instance_prefix(&options.prefix)),
            count_only: true,
            ..Default::default()
        };
        let attempt = tokio::time::timeout(ETCD_CALL_TIMEOUT, kv(&channel).range(probe)).await;
        match attempt {
            Ok(Ok(resp)) => {
                break resp.into_inner().header.map(|h| h.cluster_id).unwrap_or(1);
            }
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
    };
    let connect_timeout = options.connect_timeout;
    let store = Arc::new(EtcdStore::new(options, channel));
    let registry = Registry::with_store(config, store.clone(), cluster_id.max(1));
    let rx = store
        .writes_rx
        .lock()
        .take()
        .expect("a fresh store has its queue");
    tokio::spawn(writer::run(
        store.clone(),
        rx,
        registry.shutdown_token().clone(),
    ));
    tokio::spawn(sync::run(store.clone(), registry.clone()));
    // Serve only once the catalog holds what etcd holds.
    let mut applied = store.applied.subscribe();
    let synced = tokio::time::timeout(connect_timeout, async {
        loop {
            if !store.is_stale() {
                return;
            }
            if applied.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if synced.is_err() || store.is_stale() {
        registry.shutdown();
        return Err(Error::Unavailable(format!(
            "etcd at {} reachable but the first sync did not finish within {connect_timeout:?}",
            store.options.endpoints.join(",")
        )));
    }
    tracing::info!(
        epoch = registry.epoch(),
        revision = store.applied_revision(),
        lease = store.node_lease(),
        instances = registry.catalog().stats.instances.load(Ordering::Relaxed),
        "registry node synced with etcd"
    );
    Ok(registry)
}

fn kv(channel: &Channel) -> KvClient<Channel> {
    KvClient::new(channel.clone()).max_decoding_message_size(MAX_ETCD_MESSAGE)
}

/// Register on a cluster node: checks and lease bookkeeping as in memory
/// mode, then the instance is written to etcd under the node's lease.
pub(crate) async fn register(
    registry: &Registry,
    store: &Arc<EtcdStore>,
    req: RegisterRequest,
    caller: Option<&Identity>,
) -> Result<RegisterResponse> {
    store.check_writable()?;
    let (lease, (rx, undo, seq)) =
        registry.register_with(req, caller, |txn, mut instance, undo| {
            // Output only: each node sets it to the etcd revision of the put.
            instance.revision = 0;
            let value = Bytes::from(instance.encode_to_vec());
            let seq = store.own(undo.key.clone(), instance.lease_id, value.clone());
            drop(txn);
            let (tx, rx) = oneshot::channel();
            let op = Op::Put {
                key: undo.key.clone(),
                value,
                seq,
            };
            store.send(vec![op], Some(tx));
            (rx, undo, seq)
        })?;
    let result = wait_reply(rx).await;
    match result {
        Ok(revision) => {
            if !store.wait_applied(revision as u64, APPLY_WAIT).await {
                tracing::warn!(
                    revision,
                    "own register not applied in time; answering anyway"
                );
            }
            Ok(RegisterResponse {
                lease_id: lease.id,
                ttl_ms: lease.ttl_ms,
                revision: revision as u64,
                server: Some(registry.server_info()),
            })
        }
        Err(e) => {
            rollback(registry, store, undo, seq);
            Err(e)
        }
    }
}

/// Undoes a register whose etcd write failed, unless a newer registration
/// of the same instance has taken over since.
fn rollback(registry: &Registry, store: &EtcdStore, undo: RegisterUndo, seq: u64) {
    let _txn = registry.catalog().txn();
    {
        let mut owned = store.owned.lock();
        if owned.get(&undo.key).is_some_and(|o| o.seq == seq) {
            owned.remove(&undo.key);
        } else {
            return;
        }
    }
    if undo.new_lease {
        registry.leases().remove(undo.lease.id);
    } else if undo.added_key {
        undo.lease.instances.lock().retain(|k| *k != undo.key);
    }
    // The write may have reached etcd after all: the resync lists and
    // removes what is under our lease but not owned.
    store.resync.notify_one();
}

/// Deregister a lease on a cluster node: its instances are deleted from
/// etcd (only where still under this node's lease), with reason
/// DEREGISTERED.
pub(crate) async fn deregister_lease(
    registry: &Registry,
    store: &Arc<EtcdStore>,
    lease_id: LeaseId,
    caller: Option<&Identity>,
) -> Result<(u64, u32)> {
    store.check_writable()?;
    let (ops, removed) = registry.deregister_lease_with(lease_id, caller, |txn, keys| {
        drop(txn);
        let removed = keys.len() as u32;
        let ops: Vec<Op> = keys
            .into_iter()
            .filter(|k| store.disown(k, Some(lease_id)))
            .map(|key| Op::Delete {
                key,
                reason: Some(DeleteReason::Deregistered),
                only_ours: true,
            })
            .collect();
        (ops, removed)
    })?;
    let revision = store.write_and_apply(ops).await?;
    Ok((revision.max(registry.catalog().revision()), removed))
}

/// Deregister one instance on a cluster node: deleted from etcd wherever it
/// lives (an admin may remove another node's instance), reason DEREGISTERED.
pub(crate) async fn deregister_instance(
    registry: &Registry,
    store: &Arc<EtcdStore>,
    service: &str,
    id: &str,
    caller: Option<&Identity>,
) -> Result<(u64, u32)> {
    store.check_writable()?;
    let ops = registry.deregister_instance_with(service, id, caller, |txn, key| {
        drop(txn);
        store.disown(&key, None);
        vec![Op::Delete {
            key,
            reason: Some(DeleteReason::Deregistered),
            only_ours: false,
        }]
    })?;
    let revision = store.write_and_apply(ops).await?;
    Ok((revision.max(registry.catalog().revision()), 1))
}
