//! Self-registration: [`Registration`] handles and the one background task
//! per client that keeps them alive.
//!
//! The task owns all registration state; handles talk to it over an
//! unbounded command channel (unbounded so that `Drop` can enqueue a
//! deregistration without a runtime or an await). Its loop:
//!
//! - groups instances by requested TTL; each group shares one lease, the
//!   first member gets it with `lease_id = 0` and the others attach to it;
//! - renews every group's lease about every `ttl / 3` (with jitter) over a
//!   single KeepAlive stream, matching responses to requests in order;
//! - when a lease is reported unknown, or the registry's lease epoch changes
//!   (it restarted, so every lease id of the old life is meaningless and may
//!   even belong to someone else now), re-registers the affected instances.
//!   A registry that restored its leases from disk keeps its lease epoch, and
//!   the leases go on being renewed as if nothing happened;
//! - when the registry is unreachable, retries with exponential backoff and
//!   jitter, forever, failing over between nodes if several are configured.
//!   A registration made while the registry is unreachable (or before it
//!   has started) is accepted at once in state `Unreachable` and completed
//!   by the same retries: start order does not matter;
//! - watches each service it registers instances of (one Watch per
//!   service, the session of [`crate::Watch`]) to learn when another lease
//!   takes over one of its keys — another process registering the same
//!   service and id — see "Identity conflicts" below;
//! - ends when the last handle is gone, after deregistering it.
//!
//! **Identity conflicts.** The registry lets the last registration of a
//! `service` + `id` win. When the watch shows our key under another lease
//! (a PUT newer than our own registration), the entry goes to
//! [`RegistrationState::Replaced`], a WARN names the other lease and
//! address, and the keeper stands back: it never re-registers the key while
//! the other lease holds it (two processes fighting over one id would flap
//! callers between them). When the key is free again — the other
//! deregistered, or its lease expired — the watch shows the DELETE and the
//! keeper registers the key again at once. So one of two processes sharing
//! an id always serves, and the displaced one takes over within a watch
//! round trip when the other goes away. The same rule heals a key removed
//! behind a live registration's back (an operator's `regctl deregister`):
//! while its `Registration` lives, the process keeps its key registered;
//! stop the process (or deregister the `Registration`) to remove it.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use std::pin::Pin;

use futures::{Stream, StreamExt};
use registry_api::v1 as pb;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::{StreamMap, wrappers::ReceiverStream};
use tonic::Code;

use crate::{
    AdminState, Deregistered, Error, Instance, Query, ServerInfo, WatchEvent, WatchOptions,
    backoff::{Backoff, jitter},
    client::{call, grpc},
    endpoints::Endpoints,
    watch::Session,
};

/// A registration dropped sooner than this after it was made is most
/// likely an accident (`let _ = client.register(..)`): say so at WARN.
const EARLY_DROP: Duration = Duration::from_secs(1);

/// One ownership watch's batches.
type OwnWatch = Pin<Box<dyn Stream<Item = Result<Vec<WatchEvent>, Error>> + Send>>;

/// Heartbeats queued towards the stream; a handful is plenty since one
/// request carries every due lease, and a full queue means the registry stopped
/// reading, which the reply timeout catches.
const STREAM_BUFFER: usize = 8;
/// Shortest wait for a heartbeat reply before the stream is declared dead.
const MIN_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for a heartbeat reply: beyond this, long-TTL leases would
/// still be fine, but a stuck connection should be replaced anyway.
const MAX_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Renewals never come closer than this, even for absurdly short TTLs.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(10);
/// How far the task sleeps when it has nothing scheduled.
const IDLE_WAKE: Duration = Duration::from_secs(3600);
/// How long a probe of another node for a non-stale one may take: short,
/// since the keeper waits for it, and a node that cannot answer this fast
/// is no better a home than the stale one.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Least time between two searches for a node that is not stale, so a
/// cluster whose nodes are all cut off from etcd is not probed per beat.
const STALE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Health of one registration, as seen by the keepalive task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationState {
    /// The registry has the instance and its lease is being renewed.
    Registered,
    /// The registry lost the instance (lease expired, registry restarted)
    /// and the task is registering it again.
    Reregistering,
    /// The registry cannot be reached; the task keeps retrying with backoff.
    /// The instance may still be registered if the outage is shorter than
    /// its TTL; a registration made before the registry could be reached
    /// starts here and becomes `Registered` once it answers.
    Unreachable,
    /// Another lease holds this instance's service and id: another process
    /// registered the same id. This registration stands back (it does not
    /// re-register while the other holds the key) and takes the key back
    /// as soon as it is free. See the module docs of the keeper for the
    /// rule; a WARN log names the other lease and address.
    Replaced {
        /// The lease that holds the key now.
        lease_id: u64,
    },
}

/// A live registration. While it exists, the client's background task keeps
/// the instance registered, re-registering it whenever the registry forgets
/// it.
///
/// **Keep it alive for as long as the service should be found**, e.g. in a
/// variable of `main` (`let _registration = ...`, not `let _ = ...`, which
/// drops it at once).
///
/// - [`Registration::deregister`] removes the instance now and reports the
///   registry's revision and count (graceful shutdown; see also
///   [`crate::Shutdown`]).
/// - **Dropping** it stops the keepalive and deregisters best-effort in the
///   background, without waiting; if the registry is unreachable at that
///   moment the instance simply expires after its TTL. A drop within a
///   second of registering is logged at WARN, since it is almost always a
///   mistake.
#[derive(Debug)]
#[must_use = "dropping a Registration deregisters the instance: keep it (e.g. `let _registration = ...`) for as long as the service runs"]
pub struct Registration {
    instance: Instance,
    token: u64,
    handle: Option<Arc<KeeperHandle>>,
    state: watch::Receiver<RegistrationState>,
    created: Instant,
}

impl Registration {
    /// The registered instance (with its final id). `lease_id` and
    /// `revision` are not tracked here: the lease changes on re-registration.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// A receiver of this registration's state, for health endpoints and
    /// logs: `changed().await` fires on every transition. It reports an error
    /// once the registration is gone.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// The state right now.
    pub fn current_state(&self) -> RegistrationState {
        *self.state.borrow()
    }

    /// Marks the instance `Draining` (with a reason): callers' balancers,
    /// xDS clients and DNS stop sending it new calls at once, while it stays
    /// registered and its lease renewed. The first step of a graceful
    /// shutdown ([`crate::Shutdown`] does it for you): drain, wait for
    /// callers to move off, then [`Registration::deregister`]. A
    /// re-registration (after a registry restart) keeps it draining.
    pub async fn drain(&self, reason: impl Into<String>) -> Result<(), Error> {
        self.set_state(AdminState::Draining, reason).await
    }

    /// Sets the instance `Draining`, `Disabled` (maintenance) or `Active`
    /// again, with a reason; kept across re-registrations. Returns once the
    /// registry has it (or, while the instance is not registered, at once:
    /// it is registered in that state).
    pub async fn set_state(
        &self,
        state: AdminState,
        reason: impl Into<String>,
    ) -> Result<(), Error> {
        let handle = self.handle.as_ref().ok_or(Error::Closed)?;
        let (reply, answer) = oneshot::channel();
        handle
            .tx
            .send(Command::SetState {
                token: self.token,
                key: key_of(&self.instance),
                state,
                reason: reason.into(),
                reply,
            })
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Removes the instance from the registry now and stops renewing it,
    /// returning the revision of the removal and how many instances it
    /// removed (`removed: 0` when there was nothing left to remove, e.g.
    /// while another lease held the key). Returns the registry's error if it
    /// could not be told (the instance then expires after its TTL, since
    /// nothing renews it any more).
    pub async fn deregister(mut self) -> Result<Deregistered, Error> {
        let handle = self.handle.take().expect("handle present until drop");
        let (reply, answer) = oneshot::channel();
        handle
            .tx
            .send(Command::Remove {
                token: self.token,
                key: key_of(&self.instance),
                reply: Some(reply),
            })
            .map_err(|_| Error::Closed)?;
        // Let go before waiting: if this was the last registration, the task
        // deregisters it and then ends.
        drop(handle);
        answer.await.map_err(|_| Error::Closed)?
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let age = self.created.elapsed();
            if age < EARLY_DROP {
                tracing::warn!(service = %self.instance.service, id = %self.instance.id, ?age,
                    "Registration dropped right after registering, which deregisters the instance; \
                     keep it for as long as the service runs (`let _registration = ...`, not `let _ = ...`)");
            } else {
                tracing::debug!(service = %self.instance.service, id = %self.instance.id,
                    "Registration dropped; deregistering in the background");
            }
            let _ = handle.tx.send(Command::Remove {
                token: self.token,
                key: key_of(&self.instance),
                reply: None,
            });
        }
    }
}

/// The command side of a running keepalive task. Registrations hold it
/// strongly; when the last one is dropped the channel closes and the task
/// ends.
#[derive(Debug)]
pub(crate) struct KeeperHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_token: AtomicU64,
}

#[derive(Debug)]
enum Command {
    Add {
        /// Identifies the `Registration`, so a stale handle for an id that was
        /// registered again cannot remove its successor.
        token: u64,
        instance: pb::Instance,
        ttl: Duration,
        state: watch::Sender<RegistrationState>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Remove {
        token: u64,
        key: Key,
        /// `None` from `Drop`: best effort, nobody waits.
        reply: Option<oneshot::Sender<Result<Deregistered, Error>>>,
    },
    /// Drain, disable or re-activate (see [`Registration::set_state`]).
    SetState {
        token: u64,
        key: Key,
        state: AdminState,
        reason: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// `(service, id)`.
type Key = (String, String);

fn key_of(instance: &Instance) -> Key {
    (instance.service.clone(), instance.id.clone())
}

/// Starts a keepalive task. Returns its handle and a token that is alive
/// exactly as long as the task runs.
pub(crate) fn spawn(endpoints: Arc<Endpoints>) -> (Arc<KeeperHandle>, Weak<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let alive = Arc::new(());
    let weak = Arc::downgrade(&alive);
    let keeper = Keeper {
        endpoints,
        rx,
        entries: HashMap::new(),
        groups: HashMap::new(),
        watches: StreamMap::new(),
        watch_epochs: HashMap::new(),
        stream: None,
        connected: true,
        retry_at: None,
        reconcile_at: None,
        backoff: Backoff::default(),
        epoch: 0,
        last_stale_probe: None,
        former_leases: std::collections::VecDeque::new(),
    };
    tokio::spawn(async move {
        let _alive = alive;
        keeper.run().await;
    });
    (
        Arc::new(KeeperHandle {
            tx,
            next_token: AtomicU64::new(1),
        }),
        weak,
    )
}

/// Registers `instance` through the task behind `handle` and waits for the
/// registry's first answer.
pub(crate) async fn register(
    handle: Arc<KeeperHandle>,
    instance: Instance,
    ttl: Duration,
) -> Result<Registration, Error> {
    let token = handle.next_token.fetch_add(1, Ordering::Relaxed);
    let (state_tx, state_rx) = watch::channel(RegistrationState::Reregistering);
    let (reply, answer) = oneshot::channel();
    let pb = instance.to_pb();
    // The handle exists before the command is sent: if this future is dropped
    // midway, its Drop still queues the matching removal.
    let registration = Registration {
        instance,
        token,
        handle: Some(handle.clone()),
        state: state_rx,
        created: Instant::now(),
    };
    handle
        .tx
        .send(Command::Add {
            token,
            instance: pb,
            ttl,
            state: state_tx,
            reply,
        })
        .map_err(|_| Error::Closed)?;
    answer.await.map_err(|_| Error::Closed)??;
    Ok(registration)
}

struct Entry {
    token: u64,
    instance: pb::Instance,
    ttl: Duration,
    /// The registry has it under its group's current lease.
    registered: bool,
    /// Revision (and the registry life it belongs to) of our last accepted
    /// registration: what the ownership watch's news is compared against.
    revision: u64,
    epoch: u64,
    /// Another lease holds the key: stand back until it is free.
    replaced_by: Option<u64>,
    state: watch::Sender<RegistrationState>,
}

impl Entry {
    /// Not in the registry under our lease, and not standing back for
    /// another lease: the reconcile loop should register it.
    fn wants_registering(&self) -> bool {
        !self.registered && self.replaced_by.is_none()
    }
}

/// Instances sharing a requested TTL, and the lease they share.
struct Group {
    lease: Option<Lease>,
    members: BTreeSet<Key>,
    next_renew: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: u64,
    /// The registry life that granted it; in another life the id means
    /// nothing (or someone else's lease).
    epoch: u64,
    ttl: Duration,
    /// The node (index in the endpoint list) that granted it: leases are
    /// local to a cluster node, so it is renewed there and nowhere else.
    node: usize,
}

impl Lease {
    fn renew_interval(&self) -> Duration {
        jitter(self.ttl / 3).max(MIN_RENEW_INTERVAL)
    }
}

struct KeepAliveStream {
    node: usize,
    tx: mpsc::Sender<pb::HeartbeatRequest>,
    rx: tonic::Streaming<pb::HeartbeatResponse>,
    /// Deadline of each request still waiting for its reply, in order.
    in_flight: VecDeque<Instant>,
}

struct Keeper {
    endpoints: Arc<Endpoints>,
    rx: mpsc::UnboundedReceiver<Command>,
    entries: HashMap<Key, Entry>,
    groups: HashMap<Duration, Group>,
    /// One watch per service we register instances of, for conflicts.
    watches: StreamMap<String, OwnWatch>,
    /// Registry life each ownership watch is in (from its last snapshot or
    /// progress), to compare event revisions with our registrations'.
    watch_epochs: HashMap<String, u64>,
    stream: Option<KeepAliveStream>,
    /// False between a transport failure and the next answer.
    connected: bool,
    /// Set while unreachable: when to try again. No heartbeats until then.
    retry_at: Option<Instant>,
    /// Set when some re-registration was refused: when to retry those.
    reconcile_at: Option<Instant>,
    backoff: Backoff,
    /// Lease epoch of the registry life we last heard from (0 = none yet).
    epoch: u64,
    /// When the keeper last looked for a node that is not stale.
    last_stale_probe: Option<Instant>,
    /// Leases this keeper held and gave up (most recent last, bounded): a
    /// key still showing one of them is our own earlier registration (e.g.
    /// put back by a cluster node after it lost its etcd lease), not
    /// another process taking the id.
    former_leases: std::collections::VecDeque<u64>,
}

/// How many given-up leases a keeper remembers as its own.
const FORMER_LEASES: usize = 64;

impl Keeper {
    async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                msg = next_message(&mut self.stream) => self.on_message(msg).await,
                Some((service, batch)) = self.watches.next(), if !self.watches.is_empty() => {
                    self.on_watch(service, batch).await;
                }
                () = tokio::time::sleep_until(wake) => self.on_timer().await,
            }
            self.publish();
        }
        tracing::debug!("last registration gone, keepalive task finished");
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + IDLE_WAKE;
        if let Some(at) = self.retry_at {
            return wake.min(at);
        }
        if let Some(at) = self.reconcile_at {
            wake = wake.min(at);
        }
        for group in self.groups.values() {
            if group.lease.is_some() {
                wake = wake.min(group.next_renew);
            }
        }
        if let Some(deadline) = self.stream.as_ref().and_then(|s| s.in_flight.front()) {
            wake = wake.min(*deadline);
        }
        wake
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                token,
                instance,
                ttl,
                state,
                reply,
            } => {
                let key = (instance.service.clone(), instance.id.clone());
                // Same service + id registered again through this client: the
                // new registration takes over (the registry replaces it too).
                self.forget(&key);
                self.entries.insert(
                    key.clone(),
                    Entry {
                        token,
                        instance,
                        ttl,
                        registered: false,
                        revision: 0,
                        epoch: 0,
                        replaced_by: None,
                        state,
                    },
                );
                self.groups
                    .entry(ttl)
                    .or_insert_with(|| Group {
                        lease: None,
                        members: BTreeSet::new(),
                        next_renew: Instant::now(),
                    })
                    .members
                    .insert(key.clone());
                let result = match self.register_entry(&key).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_unavailable() => {
                        // Accepted all the same: registered in the
                        // background as soon as the registry answers.
                        tracing::info!(service = %key.0, id = %key.1, error = %e,
                            "registry unreachable; will register when it answers");
                        self.connection_lost(&e.to_string(), None);
                        Ok(())
                    }
                    Err(e) => {
                        self.forget(&key);
                        Err(e)
                    }
                };
                if result.is_ok() {
                    self.ensure_watch(&key.0);
                }
                self.publish();
                let _ = reply.send(result);
            }
            Command::Remove { token, key, reply } => {
                let result = self.remove(token, &key, reply.is_some()).await;
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::SetState {
                token,
                key,
                state,
                reason,
                reply,
            } => {
                let result = self.set_state(token, &key, state, reason).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Records the admin state on the entry (so re-registrations carry it)
    /// and tells the node its lease lives on.
    async fn set_state(
        &mut self,
        token: u64,
        key: &Key,
        state: AdminState,
        reason: String,
    ) -> Result<(), Error> {
        let lease = self.groups_lease(key);
        let Some(entry) = self.entries.get_mut(key).filter(|e| e.token == token) else {
            return Err(Error::Closed);
        };
        let reason = if state == AdminState::Active {
            String::new()
        } else {
            reason
        };
        entry.instance.admin_state = state.to_pb() as i32;
        entry.instance.admin_reason = reason.clone();
        if !entry.registered || entry.replaced_by.is_some() {
            // Registered in this state when it is registered again.
            return Ok(());
        }
        let request = pb::SetInstanceStateRequest {
            instance: Some(pb::InstanceKey {
                service: key.0.clone(),
                id: key.1.clone(),
            }),
            state: state.to_pb() as i32,
            reason,
        };
        match crate::client::set_instance_state(&self.endpoints, lease.map(|l| l.node), request)
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Rejected(s)) if s.code() == Code::NotFound => {
                // Gone behind our back: registering it again carries the
                // state.
                if let Some(entry) = self.entries.get_mut(key) {
                    entry.registered = false;
                }
                self.reconcile().await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The lease `key`'s group holds, if any.
    fn groups_lease(&self, key: &Key) -> Option<Lease> {
        let ttl = self.entries.get(key)?.ttl;
        self.groups.get(&ttl)?.lease
    }

    /// Starts the ownership watch of `service` unless it runs.
    fn ensure_watch(&mut self, service: &str) {
        if self.watches.contains_key(service) {
            return;
        }
        // Every instance, served or not: a drained or critical instance of
        // ours is still ours, not "removed behind our back".
        let session = Session::new(
            self.endpoints.clone(),
            Query::new(service),
            WatchOptions::default().include_not_serving(true),
        );
        self.watches
            .insert(service.to_owned(), Box::pin(session.into_stream()));
    }

    /// Drops `key` from the local tables, without telling the registry.
    fn forget(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if let Some(group) = self.groups.get_mut(&entry.ttl) {
            group.members.remove(key);
            if group.members.is_empty() {
                self.groups.remove(&entry.ttl);
            }
        }
        if !self.entries.keys().any(|(service, _)| *service == key.0) {
            self.watches.remove(&key.0);
            self.watch_epochs.remove(&key.0);
        }
        Some(entry)
    }

    async fn remove(
        &mut self,
        token: u64,
        key: &Key,
        waited_on: bool,
    ) -> Result<Deregistered, Error> {
        if self.entries.get(key).is_none_or(|e| e.token != token) {
            // Already replaced by a newer registration, or never accepted.
            return Ok(Deregistered::default());
        }
        let ttl = self.entries[key].ttl;
        let replaced = self.entries[key].replaced_by.is_some();
        let lease = self.groups.get(&ttl).and_then(|g| g.lease);
        let last_of_lease = self.groups.get(&ttl).is_some_and(|g| g.members.len() == 1);
        self.forget(key);
        if !self.connected && !waited_on {
            // Best effort only: don't stall the other registrations on a
            // registry we know is down; the lease expires on its own.
            return Ok(Deregistered::default());
        }
        let target = match lease {
            // Revoking the lease removes the instance and frees the lease in
            // one call, instead of leaving an empty lease to expire. It only
            // ever removes what is under our own lease.
            Some(lease) if last_of_lease => pb::deregister_request::Target::LeaseId(lease.id),
            // The key belongs to another lease now: removing it by key
            // would take the other process's instance down.
            _ if replaced => return Ok(Deregistered::default()),
            _ => pb::deregister_request::Target::Instance(pb::InstanceKey {
                service: key.0.clone(),
                id: key.1.clone(),
            }),
        };
        let request = pb::DeregisterRequest {
            target: Some(target),
        };
        match call(&self.endpoints, move |mut grpc| {
            let request = request.clone();
            async move { grpc.deregister(request).await }
        })
        .await
        {
            Ok(resp) => Ok(Deregistered {
                revision: resp.revision,
                removed: resp.removed,
            }),
            Err(Error::Rejected(s)) if s.code() == Code::NotFound => Ok(Deregistered::default()),
            Err(e) => {
                tracing::warn!(service = %key.0, id = %key.1, error = %e, "deregister failed");
                Err(e)
            }
        }
    }

    /// Registers one entry under its group's lease (or a new one), coping
    /// with the lease having vanished or belonging to an older registry life.
    async fn register_entry(&mut self, key: &Key) -> Result<(), Error> {
        for _ in 0..3 {
            let entry = &self.entries[key];
            let ttl = entry.ttl;
            let lease = self.groups[&ttl].lease;
            let request = pb::RegisterRequest {
                instance: Some(entry.instance.clone()),
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                lease_id: lease.map_or(0, |l| l.id),
            };
            let result = call(&self.endpoints, move |mut grpc| {
                let request = request.clone();
                async move { grpc.register(request).await }
            })
            .await;
            match result {
                Ok(resp) => {
                    self.reachable();
                    let server = ServerInfo::from(resp.server);
                    let stale = lease
                        .is_some_and(|l| server.lease_epoch != 0 && l.epoch != server.lease_epoch);
                    // A new epoch invalidates every lease of the old one,
                    // including the one just used if it was from that life.
                    self.observe_epoch(server.lease_epoch);
                    if stale {
                        continue;
                    }
                    // `call` moves on only when a node fails: the node that
                    // answered is the current one.
                    let node = self.endpoints.current().0;
                    let granted = Lease {
                        id: resp.lease_id,
                        epoch: server.lease_epoch,
                        ttl: Duration::from_millis(resp.ttl_ms),
                        node,
                    };
                    self.settle_on(node, ttl);
                    let group = self.groups.get_mut(&ttl).expect("group of a live entry");
                    let replaced = group.lease.filter(|l| l.id != granted.id).map(|l| l.id);
                    if group.lease.is_none_or(|l| l.id != granted.id) {
                        group.next_renew = Instant::now() + granted.renew_interval();
                    }
                    group.lease = Some(granted);
                    if let Some(old) = replaced {
                        self.remember_former(old);
                    }
                    let entry = self.entries.get_mut(key).expect("entry being registered");
                    entry.registered = true;
                    entry.replaced_by = None;
                    entry.revision = resp.revision;
                    entry.epoch = server.epoch;
                    return Ok(());
                }
                Err(Error::Rejected(s))
                    if lease.is_some()
                        && matches!(s.code(), Code::NotFound | Code::FailedPrecondition) =>
                {
                    // The lease expired under us: register afresh.
                    self.lease_lost(lease.expect("checked").id);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            registry: String::new(),
            status: tonic::Status::unavailable(
                "the registry kept invalidating the lease while registering",
            ),
        })
    }

    /// Re-registers every entry the registry does not have.
    async fn reconcile(&mut self) {
        // Show `Reregistering` while the calls are under way.
        self.publish();
        let mut refused = HashSet::new();
        loop {
            let next = self
                .entries
                .iter()
                .filter(|(k, e)| e.wants_registering() && !refused.contains(*k))
                .map(|(k, _)| k.clone())
                .min();
            let Some(key) = next else { break };
            match self.register_entry(&key).await {
                Ok(()) => {
                    tracing::info!(service = %key.0, id = %key.1, "re-registered");
                }
                Err(e) if e.is_unavailable() => {
                    self.connection_lost(&e.to_string(), None);
                    return;
                }
                Err(e) => {
                    tracing::warn!(service = %key.0, id = %key.1, error = %e, "re-registration refused");
                    refused.insert(key);
                }
            }
        }
        if !refused.is_empty() {
            self.reconcile_at = Some(Instant::now() + self.backoff.next_delay());
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(at) = self.retry_at {
            if now >= at {
                self.retry_at = None;
                self.recover().await;
            }
            return;
        }
        if let Some(stream) = &self.stream
            && stream.in_flight.front().is_some_and(|d| *d <= now)
        {
            // A frozen node answers nothing but keeps the connection: count
            // it as failed, so the next attempt goes to another node.
            let node = stream.node;
            self.connection_lost("no keepalive reply in time", Some(node));
            return;
        }
        if self.reconcile_at.is_some_and(|at| at <= now) {
            self.reconcile_at = None;
            self.reconcile().await;
        }
        self.renew(now, false).await;
    }

    /// After an outage: renew every lease (the replies tell which survived),
    /// and register whatever has no lease.
    async fn recover(&mut self) {
        self.renew(Instant::now(), true).await;
        if self.retry_at.is_none() && self.entries.values().any(Entry::wants_registering) {
            self.reconcile().await;
        }
    }

    /// Sends one heartbeat for every lease that is due (or for all).
    async fn renew(&mut self, now: Instant, all: bool) {
        let mut ids = Vec::new();
        let mut shortest = MAX_REPLY_TIMEOUT;
        for group in self.groups.values_mut() {
            if let Some(lease) = group.lease
                && (all || group.next_renew <= now)
            {
                ids.push(lease.id);
                group.next_renew = now + lease.renew_interval();
                shortest = shortest.min(lease.ttl);
            }
        }
        if ids.is_empty() {
            return;
        }
        let deadline = now + shortest.clamp(MIN_REPLY_TIMEOUT, MAX_REPLY_TIMEOUT);
        let request = pb::HeartbeatRequest { lease_ids: ids };
        if let Err(e) = self.send_heartbeat(request, deadline).await {
            let node = self.stream.as_ref().map(|s| s.node);
            self.connection_lost(&e.to_string(), node);
        }
    }

    async fn send_heartbeat(
        &mut self,
        request: pb::HeartbeatRequest,
        deadline: Instant,
    ) -> Result<(), tonic::Status> {
        if let Some(stream) = &mut self.stream {
            stream
                .tx
                .send(request)
                .await
                .map_err(|_| tonic::Status::unavailable("keepalive stream closed"))?;
            stream.in_flight.push_back(deadline);
            return Ok(());
        }
        let (node, channel) = self.endpoints.current();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        // Queue the first request before opening: a server may wait for it
        // before sending response headers.
        tx.try_send(request).expect("fresh channel has room");
        let mut grpc = grpc(channel);
        let timeout = self.endpoints.settings().request_timeout;
        let Ok(opened) =
            tokio::time::timeout(timeout, grpc.keep_alive(ReceiverStream::new(rx))).await
        else {
            self.endpoints.failed(node);
            return Err(tonic::Status::deadline_exceeded(
                "opening the keepalive stream",
            ));
        };
        let opened = match opened {
            Ok(resp) => resp,
            Err(status) => {
                self.endpoints.failed(node);
                return Err(status);
            }
        };
        self.stream = Some(KeepAliveStream {
            node,
            tx,
            rx: opened.into_inner(),
            in_flight: VecDeque::from([deadline]),
        });
        // The registry accepted the stream: it is reachable again, whatever
        // its first reply says about our leases.
        self.reachable();
        Ok(())
    }

    async fn on_message(&mut self, msg: Option<Result<pb::HeartbeatResponse, tonic::Status>>) {
        let resp = match msg {
            Some(Ok(resp)) => resp,
            Some(Err(status)) => {
                let node = self.stream.as_ref().map(|s| s.node);
                return self.connection_lost(&status.to_string(), node);
            }
            None => {
                let node = self.stream.as_ref().map(|s| s.node);
                return self.connection_lost("keepalive stream ended", node);
            }
        };
        let node = self.stream.as_mut().map(|stream| {
            stream.in_flight.pop_front();
            stream.node
        });
        self.reachable();
        let server = ServerInfo::from(resp.server);
        self.observe_epoch(server.lease_epoch);
        if server.stale
            && let Some(node) = node
        {
            self.leave_stale(node).await;
        }
        for status in resp.leases {
            if !status.found {
                tracing::info!(lease = status.lease_id, "registry forgot our lease");
                self.lease_lost(status.lease_id);
            }
        }
        if self.entries.values().any(Entry::wants_registering) {
            self.reconcile().await;
        }
    }

    /// News from the watch of one of our services: is each of our keys
    /// still ours, taken by another lease, or free again?
    async fn on_watch(&mut self, service: String, batch: Result<Vec<WatchEvent>, Error>) {
        let events = match batch {
            Ok(events) => events,
            Err(e) => {
                // E.g. an identity allowed to register but not to read its
                // own service: registration works, conflicts go unseen.
                tracing::warn!(%service, error = %e,
                    "cannot watch own service; identity conflicts will not be detected");
                self.watches.remove(&service);
                return;
            }
        };
        for event in events {
            match event {
                WatchEvent::Snapshot(snapshot) => {
                    let epoch = snapshot.server.epoch;
                    self.watch_epochs.insert(service.clone(), epoch);
                    let present: HashMap<&str, &Instance> = snapshot
                        .instances
                        .iter()
                        .map(|i| (i.id.as_str(), i))
                        .collect();
                    let ours: Vec<Key> = self
                        .entries
                        .keys()
                        .filter(|(s, _)| *s == service)
                        .cloned()
                        .collect();
                    for key in ours {
                        match present.get(key.1.as_str()) {
                            Some(i) => self.seen_put(&key, i, epoch, snapshot.revision, true),
                            None => self.seen_absent(&key, epoch, snapshot.revision, None),
                        }
                    }
                }
                WatchEvent::Put { revision, instance } => {
                    let key = (service.clone(), instance.id.clone());
                    let epoch = self.watch_epochs.get(&service).copied().unwrap_or(0);
                    self.seen_put(&key, &instance, epoch, revision, false);
                }
                WatchEvent::Delete {
                    revision,
                    instance,
                    reason,
                } => {
                    let key = (service.clone(), instance.id.clone());
                    let epoch = self.watch_epochs.get(&service).copied().unwrap_or(0);
                    self.seen_absent(&key, epoch, revision, Some((&instance, reason)));
                }
                WatchEvent::Progress { server, .. } => {
                    self.watch_epochs.insert(service.clone(), server.epoch);
                }
                WatchEvent::Interrupted { .. } => {}
            }
        }
        self.publish();
        if self.connected && self.entries.values().any(Entry::wants_registering) {
            self.reconcile().await;
        }
    }

    /// The lease id our key is (or would be) registered under.
    fn lease_of(&self, key: &Key) -> Option<u64> {
        let ttl = self.entries.get(key)?.ttl;
        self.groups.get(&ttl)?.lease.map(|l| l.id)
    }

    /// The watch shows `key` held by `instance`: by us, or by another lease.
    fn seen_put(
        &mut self,
        key: &Key,
        instance: &Instance,
        epoch: u64,
        revision: u64,
        snapshot: bool,
    ) {
        let ours = self.lease_of(key);
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if ours == Some(instance.lease_id) {
            if entry.replaced_by.take().is_some() {
                entry.registered = true;
            }
            return;
        }
        if self.former_leases.contains(&instance.lease_id) {
            // Our own earlier registration, still (or again) in the catalog:
            // not a conflict; registering again replaces it.
            return;
        }
        // Only news newer than our own registration counts: the watch may
        // still be showing the state just before it.
        let newer = entry.epoch != epoch
            || if snapshot {
                revision >= entry.revision
            } else {
                revision > entry.revision
            };
        if !newer || entry.replaced_by == Some(instance.lease_id) {
            return;
        }
        tracing::warn!(service = %key.0, id = %key.1, other_lease = instance.lease_id,
            other_address = %instance.address, our_lease = ?ours,
            "instance id taken over by another lease (another process registered the same service and id); \
             standing back until that registration is gone");
        entry.replaced_by = Some(instance.lease_id);
        entry.registered = false;
    }

    /// The watch shows `key` absent: free for us if another lease had it,
    /// missing if we had it (then registered again).
    fn seen_absent(
        &mut self,
        key: &Key,
        epoch: u64,
        revision: u64,
        deleted: Option<(&Instance, crate::DeleteReason)>,
    ) {
        let ours = self.lease_of(key);
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if let Some(other) = entry.replaced_by {
            if deleted.is_none_or(|(i, _)| i.lease_id == other) {
                tracing::info!(service = %key.0, id = %key.1, other_lease = other,
                    "instance id free again; registering it");
                entry.replaced_by = None;
                entry.registered = false;
            }
            return;
        }
        if !entry.registered {
            return;
        }
        let newer = entry.epoch != epoch || revision > entry.revision;
        match deleted {
            // Our lease expired: the keepalive learns it too; treat the
            // whole lease as lost so every member registers again.
            Some((i, crate::DeleteReason::Expired)) if Some(i.lease_id) == ours => {
                if let Some(lease) = ours {
                    self.lease_lost(lease);
                }
            }
            Some((i, _)) if Some(i.lease_id) == ours => {
                tracing::warn!(service = %key.0, id = %key.1,
                    "instance removed behind this registration's back; registering it again");
                entry.registered = false;
            }
            Some(_) => {}
            None if newer => {
                tracing::info!(service = %key.0, id = %key.1,
                    "instance missing from the registry; registering it again");
                entry.registered = false;
            }
            None => {}
        }
    }

    fn reachable(&mut self) {
        if !self.connected {
            tracing::info!("registry reachable again");
        }
        self.connected = true;
        self.retry_at = None;
        self.backoff.reset();
    }

    /// The registry is unreachable: drop the stream, try again later.
    /// `node` is the node that failed, when known and not yet reported.
    fn connection_lost(&mut self, reason: &str, node: Option<usize>) {
        self.stream = None;
        if let Some(node) = node {
            self.endpoints.failed(node);
        }
        self.connected = false;
        let delay = self.backoff.next_delay();
        tracing::warn!(reason, retry_in = ?delay, "registry unreachable");
        self.retry_at = Some(Instant::now() + delay);
    }

    /// A lease was just granted by `node` (for the group of `ttl`): leases
    /// live on the node that granted them, so heartbeats go there from now
    /// on, and leases other groups hold on other nodes are given up (their
    /// instances register again on `node`), so that one stream renews them
    /// all. Without this, a registration that failed over left the
    /// keepalive stream on the old node, which answered NOT_FOUND for the
    /// new lease at every beat.
    fn settle_on(&mut self, node: usize, ttl: Duration) {
        if self.stream.as_ref().is_some_and(|s| s.node != node) {
            tracing::info!(
                node = %self.endpoints.uri(node),
                "leases now live on another registry node; moving the keepalive stream there"
            );
            self.stream = None;
        }
        let elsewhere: Vec<u64> = self
            .groups
            .iter()
            .filter(|(t, _)| **t != ttl)
            .filter_map(|(_, g)| g.lease)
            .filter(|l| l.node != node)
            .map(|l| l.id)
            .collect();
        for id in elsewhere {
            self.lease_lost(id);
        }
    }

    /// The node answering our heartbeats has lost its etcd session: what it
    /// says may be missing changes made elsewhere, and what it is asked to
    /// write cannot reach the rest of the cluster, so the instances it keeps
    /// alive vanish elsewhere once its etcd lease runs out. Look (at most
    /// every [`STALE_PROBE_INTERVAL`]) for a node that is not stale; if one
    /// answers, move there and register again. If all are stale (etcd is
    /// down for everyone), stay: renewing locally is the best there is.
    async fn leave_stale(&mut self, stale_node: usize) {
        if self.endpoints.len() < 2
            || self
                .last_stale_probe
                .is_some_and(|at| at.elapsed() < STALE_PROBE_INTERVAL)
        {
            return;
        }
        self.last_stale_probe = Some(Instant::now());
        let probes = (0..self.endpoints.len())
            .filter(|i| *i != stale_node)
            .map(|i| {
                let mut grpc = grpc(self.endpoints.node(i));
                async move {
                    let answer = tokio::time::timeout(
                        STALE_PROBE_TIMEOUT,
                        grpc.status(pb::StatusRequest {}),
                    )
                    .await;
                    match answer {
                        Ok(Ok(resp)) => {
                            let server = ServerInfo::from(resp.into_inner().server);
                            (!server.stale).then_some(i)
                        }
                        _ => None,
                    }
                }
            });
        let healthy = futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .next();
        let Some(node) = healthy else {
            tracing::debug!("every registry node is stale; staying");
            return;
        };
        tracing::warn!(
            from = %self.endpoints.uri(stale_node),
            to = %self.endpoints.uri(node),
            "registry node lost its etcd connection; registering through another node"
        );
        self.endpoints.set_current(node);
        self.stream = None;
        let leases: Vec<u64> = self
            .groups
            .values()
            .filter_map(|g| g.lease)
            .map(|l| l.id)
            .collect();
        for id in leases {
            self.lease_lost(id);
        }
        self.reconcile().await;
    }

    /// Every lease of another registry life is gone.
    fn observe_epoch(&mut self, epoch: u64) {
        if epoch == 0 || epoch == self.epoch {
            return;
        }
        if self.epoch != 0 {
            tracing::info!(
                old = self.epoch,
                new = epoch,
                "registry restarted; re-registering"
            );
        }
        self.epoch = epoch;
        let stale: Vec<u64> = self
            .groups
            .values()
            .filter_map(|g| g.lease)
            .filter(|l| l.epoch != epoch)
            .map(|l| l.id)
            .collect();
        for id in stale {
            self.lease_lost(id);
        }
    }

    fn remember_former(&mut self, lease_id: u64) {
        if self.former_leases.contains(&lease_id) {
            return;
        }
        if self.former_leases.len() == FORMER_LEASES {
            self.former_leases.pop_front();
        }
        self.former_leases.push_back(lease_id);
    }

    fn lease_lost(&mut self, lease_id: u64) {
        self.remember_former(lease_id);
        for group in self.groups.values_mut() {
            if group.lease.is_some_and(|l| l.id == lease_id) {
                group.lease = None;
                for key in &group.members {
                    if let Some(entry) = self.entries.get_mut(key) {
                        entry.registered = false;
                    }
                }
            }
        }
    }

    fn publish(&self) {
        for entry in self.entries.values() {
            let state = if !self.connected {
                RegistrationState::Unreachable
            } else if let Some(lease_id) = entry.replaced_by {
                RegistrationState::Replaced { lease_id }
            } else if entry.registered {
                RegistrationState::Registered
            } else {
                RegistrationState::Reregistering
            };
            entry.state.send_if_modified(|current| {
                let changed = *current != state;
                *current = state;
                changed
            });
        }
    }
}

/// The next keepalive reply, or never when no stream is open.
async fn next_message(
    stream: &mut Option<KeepAliveStream>,
) -> Option<Result<pb::HeartbeatResponse, tonic::Status>> {
    match stream {
        Some(s) => s.rx.message().await.transpose(),
        None => std::future::pending().await,
    }
}
