//! The registry handle: ties liveness (the [`LeaseTable`]) to the
//! [`Catalog`], and runs the expiry task.
//!
//! Every operation that touches both (register, deregister, expiry) runs
//! inside one catalog transaction, so a lease and its instances change
//! together and each change is one revision. Heartbeats touch only the lease
//! table and Resolve only the catalog's snapshots: neither takes the write
//! lock. [`Registry`] is a cheap-clone handle used by the gRPC adapter, the
//! tests and anything else that needs the registry in-process.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use registry_api::v1::{
    DeleteReason, Instance, LeaseStatus, ListServicesResponse, RegisterRequest, RegisterResponse,
    ResolveResponse, ServerInfo, ServiceSummary, StatusResponse,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::frame::ResolveFrame;
use crate::{
    auth::{Action, Identity},
    catalog::{Catalog, CatalogConfig, InstanceKey, Txn, WatchFilter, WatchStart, WatcherHandle},
    config::Config,
    error::{Error, Result},
    etcd::EtcdStore,
    lease::{Clock, Lease, LeaseId, LeaseTable},
    metrics::{self, Metrics},
    validate,
};

/// Most leases expired in one pass of the expiry task before it yields, so
/// an expiry storm cannot starve request handling.
pub const EXPIRY_BATCH: usize = 256;

/// Cheap-clone handle to one registry's state.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    leases: LeaseTable,
    catalog: Arc<Catalog>,
    epoch: u64,
    /// The life lease ids belong to: `epoch`, or the previous life's when
    /// its leases were restored from a snapshot (see `crate::persist`).
    lease_epoch: u64,
    started: Instant,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    /// `None`: the in-memory store (the default), where the catalog is the
    /// truth. `Some`: a node of a cluster over etcd, where writes go to etcd
    /// and the catalog is fed back from etcd's watch (see `crate::etcd`).
    /// Chosen once at start-up; memory mode never takes an etcd branch on
    /// its hot paths beyond this `None` check.
    store: Option<Arc<EtcdStore>>,
}

/// What a register changed in the lease table before its instance was
/// written, so a failed etcd write can be undone.
#[derive(Debug)]
pub(crate) struct RegisterUndo {
    /// The instance registered.
    pub(crate) key: InstanceKey,
    /// Its lease.
    pub(crate) lease: Arc<Lease>,
    /// The lease was granted by this register.
    pub(crate) new_lease: bool,
    /// The key was added to the lease's instance list by this register.
    pub(crate) added_key: bool,
}

/// The instance keys taken from a revoked lease.
pub(crate) type LeaseKeys = smallvec::SmallVec<[InstanceKey; 1]>;

impl Registry {
    /// A new, empty registry. Call [`Registry::spawn_expiry`] to have leases
    /// expire on their own (the server does).
    pub fn new(config: Config) -> Self {
        let catalog = Catalog::new(CatalogConfig {
            history_events: config.history_events,
            history_age: config.history_age,
            max_watchers: config.max_watchers,
            max_watchers_per_connection: config.max_watchers_per_connection,
            watch_buffer: config.watch_buffer,
            max_services: config.max_services,
        });
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
        Self {
            shared: Arc::new(Shared {
                leases: LeaseTable::new(Clock::new()),
                catalog: Arc::new(catalog),
                epoch,
                lease_epoch: epoch,
                started: Instant::now(),
                shutdown: CancellationToken::new(),
                metrics: Arc::new(Metrics::default()),
                config,
                store: None,
            }),
        }
    }

    /// A registry node over etcd (see `crate::etcd`): `epoch` is the same
    /// on every node of the cluster (derived from etcd's cluster id), so
    /// revisions, which are etcd's, mean the same on all of them.
    pub(crate) fn with_store(config: Config, store: Arc<EtcdStore>, epoch: u64) -> Self {
        let mut registry = Self::new(config);
        let shared = Arc::get_mut(&mut registry.shared).expect("a fresh registry is not shared");
        shared.store = Some(store);
        shared.epoch = epoch;
        shared.lease_epoch = epoch;
        registry
    }

    /// A registry for `config`: empty, or, with `config.data_dir` set,
    /// loaded from the snapshot there (leases under their old ids with a
    /// fresh TTL; see `crate::persist`). The server writes snapshots there
    /// while it runs.
    pub fn open(config: Config) -> Result<Self> {
        let mut registry = Self::new(config);
        if let Some(dir) = registry.config().data_dir.clone()
            && let Some(restored) = crate::persist::restore(&registry, &dir)?
        {
            let shared =
                Arc::get_mut(&mut registry.shared).expect("a fresh registry is not shared");
            shared.lease_epoch = restored.lease_epoch;
        }
        Ok(registry)
    }

    /// The etcd store of a cluster node, `None` in memory mode.
    pub fn etcd(&self) -> Option<&Arc<EtcdStore>> {
        self.shared.store.as_ref()
    }

    /// The configuration this registry runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The catalog, for watchers and in-process readers.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.shared.catalog
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.shared.leases
    }

    /// Counters for `/metrics`, bumped by the handle, the expiry task, watch
    /// streams and the RPC layer.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Cancelled when the registry shuts down; long-lived streams end on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    /// Identifies this server life and says whether it is still warming up.
    pub fn server_info(&self) -> ServerInfo {
        let elapsed = self.shared.started.elapsed();
        let warmup = self.shared.config.warmup;
        let remaining = warmup.saturating_sub(elapsed);
        ServerInfo {
            epoch: self.shared.epoch,
            lease_epoch: self.shared.lease_epoch,
            warming_up: !remaining.is_zero(),
            warmup_remaining_ms: remaining.as_millis() as u64,
            stale: self.shared.store.as_ref().is_some_and(|s| s.is_stale()),
        }
    }

    /// This server life's epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    /// The server life this registry's lease ids belong to (see
    /// `ServerInfo.lease_epoch`).
    pub fn lease_epoch(&self) -> u64 {
        self.shared.lease_epoch
    }

    /// Adds or replaces an instance under a new or existing lease.
    pub fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        self.register_as(req, None)
    }

    /// [`Registry::register`] on behalf of an authenticated caller: it needs
    /// `register` on the service, may only attach to its own leases, and may
    /// only replace instances registered under its own leases (admins
    /// excepted). The new lease belongs to the caller.
    pub fn register_as(
        &self,
        req: RegisterRequest,
        caller: Option<&Identity>,
    ) -> Result<RegisterResponse> {
        if let Some(store) = &self.shared.store {
            return Err(store.sync_only("Register"));
        }
        let (lease, revision) = self.register_with(req, caller, |mut txn, instance, undo| {
            txn.put_keyed(instance, undo.key.id);
            txn.commit()
        })?;
        Ok(RegisterResponse {
            lease_id: lease.id,
            ttl_ms: lease.ttl_ms,
            revision,
            server: Some(self.server_info()),
        })
    }

    /// [`Registry::register_as`] in either mode: in a cluster the instance is
    /// written to etcd, and the answer waits until this node's catalog has
    /// applied that write, so a Resolve on the same node sees it.
    pub async fn register_as_async(
        &self,
        req: RegisterRequest,
        caller: Option<&Identity>,
    ) -> Result<RegisterResponse> {
        match &self.shared.store {
            None => self.register_as(req, caller),
            Some(store) => crate::etcd::register(self, store, req, caller).await,
        }
    }

    /// Checks and applies a register up to the write of the instance, which
    /// `finish` does with the open transaction (memory: put and commit;
    /// etcd: hand it to the store). Returns the lease and what `finish` did.
    pub(crate) fn register_with<R>(
        &self,
        req: RegisterRequest,
        caller: Option<&Identity>,
        finish: impl FnOnce(Txn<'_>, Instance, RegisterUndo) -> R,
    ) -> Result<(Arc<Lease>, R)> {
        let config = &self.shared.config;
        let Some(mut instance) = req.instance else {
            return Err(Error::InvalidArgument("instance is required".into()));
        };
        validate::service_name("instance.service", &instance.service)?;
        validate::instance_id("instance.id", &instance.id)?;
        validate::address("instance.address", &instance.address)?;
        validate::metadata("instance.metadata", &instance.metadata)?;
        let ttl = if req.lease_id == 0 {
            Some(validate::ttl(req.ttl_ms, config.min_ttl, config.max_ttl)?)
        } else {
            None
        };
        if let Some(c) = caller {
            c.check(Action::Register, &instance.service)?;
        }
        if instance.weight == 0 {
            instance.weight = 1;
        }
        instance.lease_remaining_ms = 0;

        let leases = &self.shared.leases;
        let mut txn = self.shared.catalog.txn();
        // The lease the instance lives under now, if it exists already.
        let existing = txn.lease_of(&instance.service, &instance.id);

        // Check everything before changing anything.
        let attach_to: Option<Arc<Lease>> = if req.lease_id != 0 {
            let lease = leases.get_live(req.lease_id).ok_or_else(|| {
                Error::NotFound(format!(
                    "lease {} not found: it expired or was revoked; register without lease_id for a new lease",
                    req.lease_id
                ))
            })?;
            if let Some(c) = caller
                && lease.owner.as_deref() != Some(&*c.name)
            {
                return Err(Error::PermissionDenied(format!(
                    "lease {} belongs to another identity; {:?} may only attach instances to its own leases",
                    lease.id, c.name
                )));
            }
            let moving_in = existing != Some(lease.id);
            let n = lease.instance_count();
            if moving_in && n >= config.max_instances_per_lease {
                return Err(Error::ResourceExhausted(format!(
                    "lease {} has {n} instances, the limit is {} (max_instances_per_lease)",
                    lease.id, config.max_instances_per_lease
                )));
            }
            Some(lease)
        } else {
            let n = leases.len();
            if n >= config.max_leases {
                return Err(Error::ResourceExhausted(format!(
                    "leases: {n} live, the limit is {} (max_leases)",
                    config.max_leases
                )));
            }
            None
        };
        if let (Some(c), Some(old)) = (caller, existing) {
            let owner = leases.get(old).and_then(|l| l.owner.clone());
            if owner.as_deref() != Some(&*c.name) && !c.may(Action::Admin, &instance.service) {
                return Err(Error::PermissionDenied(format!(
                    "instance {:?} of service {:?} is registered by another identity; only it or an admin may replace it",
                    instance.id, instance.service
                )));
            }
        }
        if existing.is_none() {
            // Exact under the transaction: only writers change the count.
            let n = self.shared.catalog.stats.instances.load(Ordering::Relaxed);
            if n >= config.max_instances {
                return Err(Error::ResourceExhausted(format!(
                    "instances: {n} live, the limit is {} (max_instances)",
                    config.max_instances
                )));
            }
            match txn.service_len(&instance.service) {
                Some(n) if n >= config.max_instances_per_service => {
                    return Err(Error::ResourceExhausted(format!(
                        "service {:?} has {n} instances, the limit is {} (max_instances_per_service)",
                        instance.service, config.max_instances_per_service
                    )));
                }
                Some(_) => {}
                None => txn.ensure_service_capacity(&instance.service)?,
            }
        }

        // Apply.
        let lease = match attach_to {
            Some(lease) => {
                leases.renew(lease.id);
                lease
            }
            None => leases.grant_owned(
                ttl.expect("ttl validated for a new lease"),
                caller.map(|c| c.name.clone()),
            ),
        };
        let key = txn.key_for(&instance);
        let moved_from = existing.filter(|old| *old != lease.id);
        if let Some(old) = moved_from.and_then(|id| leases.get(id)) {
            old.instances.lock().retain(|k| *k != key);
        }
        let added_key = existing.is_none() || moved_from.is_some();
        if added_key {
            // Inline for the first key (see `Lease::instances`).
            lease.instances.lock().push(key.clone());
        }
        instance.lease_id = lease.id;
        let undo = RegisterUndo {
            key,
            lease: lease.clone(),
            new_lease: req.lease_id == 0,
            added_key,
        };
        let done = finish(txn, instance, undo);
        metrics::inc(&self.shared.metrics.registrations, 1);
        Ok((lease, done))
    }

    /// Renews each lease; unknown or expired ones come back `found: false`.
    pub fn heartbeat(&self, lease_ids: &[LeaseId]) -> Result<Vec<LeaseStatus>> {
        self.heartbeat_as(lease_ids, None)
    }

    /// [`Registry::heartbeat`] for an authenticated caller, who may only
    /// renew its own leases.
    pub fn heartbeat_as(
        &self,
        lease_ids: &[LeaseId],
        caller: Option<&Identity>,
    ) -> Result<Vec<LeaseStatus>> {
        let max = self.shared.config.max_heartbeat_batch;
        if lease_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "lease_ids is empty; send at least one lease id".into(),
            ));
        }
        if lease_ids.len() > max {
            return Err(Error::InvalidArgument(format!(
                "lease_ids has {} entries, the limit is {max} (max_heartbeat_batch)",
                lease_ids.len()
            )));
        }
        if let Some(c) = caller {
            for &id in lease_ids {
                if let Some(lease) = self.shared.leases.get(id)
                    && lease.owner.as_deref() != Some(&*c.name)
                {
                    return Err(Error::PermissionDenied(format!(
                        "lease {id} belongs to another identity; {:?} may only renew its own leases",
                        c.name
                    )));
                }
            }
        }
        // One counter update per call, not per lease: a batch of thousands
        // of ids must not bounce a shared cache line thousands of times.
        let mut renewed = 0;
        let statuses: Vec<LeaseStatus> = lease_ids
            .iter()
            .map(|&lease_id| match self.shared.leases.renew(lease_id) {
                Some(ttl_ms) => {
                    renewed += 1;
                    LeaseStatus {
                        lease_id,
                        found: true,
                        ttl_ms,
                    }
                }
                None => LeaseStatus {
                    lease_id,
                    found: false,
                    ttl_ms: 0,
                },
            })
            .collect();
        let m = &self.shared.metrics;
        if renewed > 0 {
            metrics::inc(&m.heartbeats, renewed);
        }
        if renewed < statuses.len() as u64 {
            metrics::inc(&m.heartbeat_misses, statuses.len() as u64 - renewed);
        }
        Ok(statuses)
    }

    /// Revokes a lease and removes all its instances in one revision.
    /// Returns the revision and the number of instances removed.
    pub fn deregister_lease(&self, lease_id: LeaseId) -> Result<(u64, u32)> {
        self.deregister_lease_as(lease_id, None)
    }

    /// [`Registry::deregister_lease`] for an authenticated caller: its own
    /// lease, or one whose instances it administers.
    pub fn deregister_lease_as(
        &self,
        lease_id: LeaseId,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        if let Some(store) = &self.shared.store {
            return Err(store.sync_only("Deregister"));
        }
        self.deregister_lease_with(lease_id, caller, |mut txn, keys| {
            let removed = keys.len() as u32;
            for key in keys {
                txn.delete(key, DeleteReason::Deregistered);
            }
            (txn.commit(), removed)
        })
    }

    /// [`Registry::deregister_lease_as`] in either mode (in a cluster the
    /// deletes go through etcd; see [`Registry::register_as_async`]).
    pub async fn deregister_lease_as_async(
        &self,
        lease_id: LeaseId,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        match &self.shared.store {
            None => self.deregister_lease_as(lease_id, caller),
            Some(store) => crate::etcd::deregister_lease(self, store, lease_id, caller).await,
        }
    }

    /// Checks and revokes a lease; `finish` removes its instances (the keys
    /// taken from the lease) with the open transaction.
    pub(crate) fn deregister_lease_with<R>(
        &self,
        lease_id: LeaseId,
        caller: Option<&Identity>,
        finish: impl FnOnce(Txn<'_>, LeaseKeys) -> R,
    ) -> Result<R> {
        let txn = self.shared.catalog.txn();
        if let Some(c) = caller
            && let Some(lease) = self.shared.leases.get(lease_id)
            && lease.owner.as_deref() != Some(&*c.name)
        {
            let keys = lease.instances.lock().clone();
            let administers = if keys.is_empty() {
                c.may(Action::Admin, "*")
            } else {
                keys.iter().all(|k| c.may(Action::Admin, &k.service))
            };
            if !administers {
                return Err(Error::PermissionDenied(format!(
                    "lease {lease_id} belongs to another identity; {:?} may only revoke its own leases",
                    c.name
                )));
            }
        }
        let lease = self
            .shared
            .leases
            .remove(lease_id)
            .ok_or_else(|| Error::NotFound(format!("lease {lease_id} not found")))?;
        let keys = std::mem::take(&mut *lease.instances.lock());
        metrics::inc(&self.shared.metrics.deregistrations, 1);
        Ok(finish(txn, keys))
    }

    /// Removes one instance; its lease stays.
    pub fn deregister_instance(&self, service: &str, id: &str) -> Result<(u64, u32)> {
        self.deregister_instance_as(service, id, None)
    }

    /// [`Registry::deregister_instance`] for an authenticated caller: an
    /// instance under its own lease in a service it may register, or any
    /// instance of a service it administers.
    pub fn deregister_instance_as(
        &self,
        service: &str,
        id: &str,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        if let Some(store) = &self.shared.store {
            return Err(store.sync_only("Deregister"));
        }
        self.deregister_instance_with(service, id, caller, |mut txn, key| {
            txn.delete(key, DeleteReason::Deregistered);
            (txn.commit(), 1)
        })
    }

    /// [`Registry::deregister_instance_as`] in either mode (in a cluster
    /// the delete goes through etcd; see [`Registry::register_as_async`]).
    pub async fn deregister_instance_as_async(
        &self,
        service: &str,
        id: &str,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        match &self.shared.store {
            None => self.deregister_instance_as(service, id, caller),
            Some(store) => crate::etcd::deregister_instance(self, store, service, id, caller).await,
        }
    }

    /// Checks a single-instance deregister and detaches the instance from
    /// its lease; `finish` deletes it with the open transaction.
    pub(crate) fn deregister_instance_with<R>(
        &self,
        service: &str,
        id: &str,
        caller: Option<&Identity>,
        finish: impl FnOnce(Txn<'_>, InstanceKey) -> R,
    ) -> Result<R> {
        validate::service_name("instance.service", service)?;
        validate::instance_id("instance.id", id)?;
        if let Some(c) = caller {
            c.check(Action::Register, service)?;
        }
        let txn = self.shared.catalog.txn();
        let lease_id = txn.lease_of(service, id).ok_or_else(|| {
            Error::NotFound(format!("instance {id:?} of service {service:?} not found"))
        })?;
        if let Some(c) = caller {
            let owner = self
                .shared
                .leases
                .get(lease_id)
                .and_then(|l| l.owner.clone());
            if owner.as_deref() != Some(&*c.name) && !c.may(Action::Admin, service) {
                return Err(Error::PermissionDenied(format!(
                    "instance {id:?} of service {service:?} is registered by another identity; only it or an admin may remove it"
                )));
            }
        }
        let key = InstanceKey {
            service: service.into(),
            id: id.into(),
        };
        if let Some(lease) = self.shared.leases.get(lease_id) {
            lease.instances.lock().retain(|k| *k != key);
        }
        metrics::inc(&self.shared.metrics.deregistrations, 1);
        Ok(finish(txn, key))
    }

    /// Live instances of a service matching a selector.
    pub fn resolve(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
    ) -> Result<ResolveResponse> {
        self.resolve_as(service, selector, include_lease_ttl, None)
    }

    /// [`Registry::resolve`] for a caller who needs `read` on the service.
    pub fn resolve_as(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
        caller: Option<&Identity>,
    ) -> Result<ResolveResponse> {
        Self::check_resolve(service, selector, caller)?;
        let (snap, revision) = self.shared.catalog.resolve(service);
        let instances = match &snap {
            None => Vec::new(),
            Some(snap) => snap
                .instances
                .iter()
                .filter(|i| selector.iter().all(|(k, v)| i.metadata.get(k) == Some(v)))
                .map(|i| {
                    let mut out = Instance::clone(i);
                    if include_lease_ttl {
                        out.lease_remaining_ms =
                            self.shared.leases.remaining_ms(i.lease_id).unwrap_or(0);
                    }
                    out
                })
                .collect(),
        };
        Ok(ResolveResponse {
            instances,
            revision,
            service_known: snap.is_some(),
            server: Some(self.server_info()),
        })
    }

    /// The checks every Resolve makes: the name, the caller's read grant,
    /// the selector.
    fn check_resolve(
        service: &str,
        selector: &HashMap<String, String>,
        caller: Option<&Identity>,
    ) -> Result<()> {
        validate::service_name("service", service)?;
        if let Some(c) = caller {
            c.check(Action::Read, service)?;
        }
        validate::metadata("selector", selector)
    }

    /// [`Registry::resolve_as`] as a wire frame: an unfiltered answer without
    /// lease TTLs (the common case) reuses the service snapshot's encoded
    /// instance list instead of cloning and encoding every instance per call.
    pub fn resolve_frame_as(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
        caller: Option<&Identity>,
    ) -> Result<ResolveFrame> {
        if !selector.is_empty() || include_lease_ttl {
            return self
                .resolve_as(service, selector, include_lease_ttl, caller)
                .map(ResolveFrame::message);
        }
        Self::check_resolve(service, selector, caller)?;
        let (snap, revision) = self.shared.catalog.resolve(service);
        let rest = ResolveResponse {
            instances: Vec::new(),
            revision,
            service_known: snap.is_some(),
            server: Some(self.server_info()),
        };
        Ok(match snap {
            Some(snap) => ResolveFrame::shared(snap.encoded_instances(), rest),
            None => ResolveFrame::message(rest),
        })
    }

    /// Every known service with its instance count.
    pub fn list_services(&self) -> ListServicesResponse {
        self.list_services_as(None)
    }

    /// [`Registry::list_services`] filtered to what the caller may read.
    pub fn list_services_as(&self, caller: Option<&Identity>) -> ListServicesResponse {
        let (mut services, revision) = self.shared.catalog.list_services();
        if let Some(c) = caller {
            services.retain(|(name, _)| c.may(Action::Read, name));
        }
        ListServicesResponse {
            services: services
                .into_iter()
                .map(|(name, n)| ServiceSummary {
                    name: name.to_string(),
                    instance_count: n as u32,
                })
                .collect(),
            revision,
            server: Some(self.server_info()),
        }
    }

    /// Sizes and identity, for operators.
    pub fn status(&self) -> StatusResponse {
        let catalog = &self.shared.catalog;
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            revision: catalog.revision(),
            services: catalog.service_count() as u64,
            instances: catalog.stats.instances.load(Ordering::Relaxed) as u64,
            leases: self.shared.leases.len() as u64,
            watchers: catalog.stats.watchers.load(Ordering::Relaxed) as u64,
            watcher_resets: catalog.stats.watcher_resets.load(Ordering::Relaxed),
            server: Some(self.server_info()),
        }
    }

    /// Opens a watcher (see [`Catalog::watch`]); `epoch` 0 skips the check.
    pub fn watch(
        &self,
        filter: WatchFilter,
        start_revision: u64,
        epoch: u64,
        conn: Option<std::net::SocketAddr>,
    ) -> Result<(WatcherHandle, WatchStart)> {
        self.watch_as(filter, start_revision, epoch, conn, None)
    }

    /// [`Registry::watch`] for a caller: watching one service needs `read`
    /// on it; watching all of them shows only the services it may read.
    pub fn watch_as(
        &self,
        mut filter: WatchFilter,
        start_revision: u64,
        epoch: u64,
        conn: Option<std::net::SocketAddr>,
        caller: Option<&Arc<Identity>>,
    ) -> Result<(WatcherHandle, WatchStart)> {
        if let Some(c) = caller {
            match &filter.service {
                Some(s) => c.check(Action::Read, s)?,
                None if !c.reads_everything() => filter.reader = Some(c.clone()),
                None => {}
            }
        }
        let epoch_matches = epoch == 0 || epoch == self.shared.epoch;
        self.shared
            .catalog
            .watch(filter, start_revision, epoch_matches, conn)
    }

    /// Expires up to `limit` leases that are past their deadline, each with
    /// its instances in one revision. Returns how many expired.
    pub fn expire_due(&self, limit: usize) -> usize {
        let leases = &self.shared.leases;
        let due = leases.pop_expired(leases.clock().now_ms(), limit);
        self.expire_leases(due)
    }

    /// Expires leases popped from the queue as due, each with its instances
    /// in one revision; any found renewed (or extended after a stall) since
    /// goes back in the queue. Returns how many expired.
    pub(crate) fn expire_leases(&self, due: impl IntoIterator<Item = Arc<Lease>>) -> usize {
        let leases = &self.shared.leases;
        let now = leases.clock().now_ms();
        let mut expired = 0;
        for lease in due {
            let mut txn = self.shared.catalog.txn();
            // Re-check under the lock: a register may have renewed it since.
            if lease.is_live(leases.clock().now_ms()) {
                leases.requeue(&lease);
                continue;
            }
            if leases.remove(lease.id).is_none() {
                continue;
            }
            let keys = std::mem::take(&mut *lease.instances.lock());
            let n = keys.len();
            let revision = match &self.shared.store {
                None => {
                    for key in keys {
                        txn.delete(key, DeleteReason::Expired);
                    }
                    txn.commit()
                }
                // The deletes go to etcd; the catalog follows from its watch.
                Some(store) => {
                    drop(txn);
                    store.expire(lease.id, keys);
                    self.shared.catalog.revision()
                }
            };
            expired += 1;
            metrics::inc(&self.shared.metrics.lease_expirations, 1);
            metrics::inc(&self.shared.metrics.expired_instances, n as u64);
            debug!(
                lease_id = lease.id,
                instances = n,
                revision,
                late_ms = now.saturating_sub(lease.deadline_ms()),
                "lease expired"
            );
        }
        expired
    }

    /// Spawns the expiry task (see [`crate::expiry`]): sleeps until the
    /// earliest deadline (or until an earlier one is granted), expires what
    /// is due, repeats; gives leases back the time the daemon was stalled,
    /// throttles expiry storms, and stops when the registry shuts down.
    pub fn spawn_expiry(&self) -> JoinHandle<()> {
        tokio::spawn(crate::expiry::run(self.clone()))
    }

    /// Signals every background task and long-lived stream to stop.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_api::v1::Instance;
    use std::time::Duration;

    fn req(service: &str, id: &str, ttl_ms: u64, lease_id: u64) -> RegisterRequest {
        RegisterRequest {
            instance: Some(Instance {
                service: service.into(),
                id: id.into(),
                address: "10.0.0.1:80".into(),
                ..Default::default()
            }),
            ttl_ms,
            lease_id,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_task_removes_instances_of_dead_leases_only() {
        let r = Registry::new(Config::default());
        let _task = r.spawn_expiry();
        let dying = r.register(req("svc", "a", 1000, 0)).unwrap();
        let kept = r.register(req("svc", "b", 1000, 0)).unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            r.heartbeat(&[kept.lease_id]).unwrap();
        }
        let res = r.resolve("svc", &HashMap::new(), false).unwrap();
        let ids: Vec<_> = res.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        assert!(r.leases().get(dying.lease_id).is_none());
        assert_eq!(res.revision, 3, "two registers and one expiry");
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_is_on_time_under_paused_clock() {
        let r = Registry::new(Config::default());
        let _task = r.spawn_expiry();
        r.register(req("svc", "a", 2000, 0)).unwrap();
        tokio::time::sleep(Duration::from_millis(1990)).await;
        assert_eq!(r.status().instances, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(r.status().instances, 0);
        assert_eq!(r.status().leases, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reregister_moves_instance_between_leases() {
        let r = Registry::new(Config::default());
        let first = r.register(req("svc", "a", 1000, 0)).unwrap();
        let second = r.register(req("svc", "a", 5000, 0)).unwrap();
        assert_eq!(r.leases().get(first.lease_id).unwrap().instance_count(), 0);
        assert_eq!(r.leases().get(second.lease_id).unwrap().instance_count(), 1);
        r.expire_due(10);
        tokio::time::advance(Duration::from_millis(1500)).await;
        r.expire_due(10);
        let res = r.resolve("svc", &HashMap::new(), false).unwrap();
        assert_eq!(
            res.instances.len(),
            1,
            "old lease's expiry must not delete the moved instance"
        );
        assert_eq!(res.instances[0].lease_id, second.lease_id);
    }

    #[tokio::test(start_paused = true)]
    async fn caps_are_checked_before_anything_changes() {
        let r = Registry::new(Config {
            max_instances_per_lease: 1,
            ..Config::default()
        });
        let first = r.register(req("svc", "a", 1000, 0)).unwrap();
        let err = r.register(req("svc", "b", 0, first.lease_id)).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        let res = r.resolve("svc", &HashMap::new(), false).unwrap();
        assert_eq!(res.instances.len(), 1);
        assert_eq!(res.revision, first.revision);
    }
}
