//! The registry handle: validates, authorises and plans every operation,
//! and hands writes to the [`Store`].
//!
//! A write goes one way: validate the request, authorise the caller, open
//! the catalog's write transaction, check the caps and the lease table
//! against the current state, change the lease table (grant, attach,
//! detach, revoke: its own methods), build the change [`Batch`] and submit
//! it with the transaction to the store, which answers with the revision.
//! The planning is synchronous and under the transaction, so checks and
//! changes cannot interleave with another write; only waiting for the store
//! (a disk flush, an etcd round trip) is async, and nothing is left to undo
//! by a caller that stops waiting.
//!
//! Heartbeats touch only the lease table, and Resolve only the catalog's
//! snapshots: neither takes the write lock. [`Registry`] is a cheap-clone
//! handle used by the gRPC adapter, the tests and anything else that needs
//! the registry in-process.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use registry_api::v1::{
    AdminState, DeleteReason, HealthState, Instance, LeaseStatus, ListServicesResponse,
    RegisterRequest, RegisterResponse, ResolveResponse, ServerInfo, ServiceSummary, StatusResponse,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    auth::{Action, Identity},
    catalog::{Catalog, CatalogConfig, InstanceKey, WatchFilter, WatchStart, WatcherHandle},
    change::{Batch, Change, LeaseChange, Undo},
    config::{Config, EtcdOptions},
    error::{Error, Result},
    expiry::Expirer,
    frame::ResolveFrame,
    lease::{Clock, Lease, LeaseId, LeaseTable},
    metrics::{self, Metrics},
    persist::DataDir,
    store::{MemoryStore, Pending, Store},
    validate,
};

/// Cheap-clone handle to one registry's state.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    leases: Arc<LeaseTable>,
    catalog: Arc<Catalog>,
    store: Store,
    epoch: u64,
    /// The life lease ids belong to: `epoch`, or the first life's when
    /// leases come from a data directory (see `crate::persist`).
    lease_epoch: u64,
    started: Instant,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// Milliseconds since the Unix epoch, at least 1: a new epoch.
fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

fn catalog_config(config: &Config) -> CatalogConfig {
    CatalogConfig {
        history_events: config.history_events,
        history_age: config.history_age,
        max_watchers: config.max_watchers,
        max_watchers_per_connection: config.max_watchers_per_connection,
        watch_buffer: config.watch_buffer,
        max_services: config.max_services,
        panic: config.panic.clone(),
    }
}

/// The handles a registry is built from.
struct Parts {
    leases: Arc<LeaseTable>,
    catalog: Arc<Catalog>,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Registry {
    fn build(config: Config, parts: Parts, epoch: u64, lease_epoch: u64) -> Self {
        let Parts {
            leases,
            catalog,
            store,
            metrics,
            shutdown,
        } = parts;
        Self {
            shared: Arc::new(Shared {
                config,
                leases,
                catalog,
                store,
                epoch,
                lease_epoch,
                started: Instant::now(),
                shutdown,
                metrics,
            }),
        }
    }

    /// A new, empty in-memory registry (the data directory of `config` is
    /// not opened; see [`Registry::open`]). Call [`Registry::spawn_expiry`]
    /// to have leases expire on their own (the server does).
    pub fn new(config: Config) -> Self {
        let epoch = now_epoch();
        let catalog = Arc::new(Catalog::new(catalog_config(&config)));
        Self::build(
            config,
            Parts {
                leases: Arc::new(LeaseTable::new(Clock::new())),
                catalog,
                store: Store::memory(),
                metrics: Arc::new(Metrics::default()),
                shutdown: CancellationToken::new(),
            },
            epoch,
            epoch,
        )
    }

    /// The registry `config` asks for: a cluster node when `config.etcd` is
    /// set (see [`Registry::connect_cluster`]); otherwise in memory, empty,
    /// or, with `config.data_dir`, loaded from the data directory (leases
    /// under their ids with a fresh TTL, the catalog at its last logged
    /// revision), which then records every change before it is
    /// acknowledged (see `crate::persist`).
    pub async fn open(config: Config) -> Result<Self> {
        config.validate()?;
        if let Some(options) = config.etcd.clone() {
            return Self::connect_cluster(config, options).await;
        }
        Self::open_memory(config)
    }

    /// [`Registry::open`] for the in-memory store (with or without a data
    /// directory); synchronous.
    pub fn open_memory(config: Config) -> Result<Self> {
        let Some(dir) = config.data_dir.clone() else {
            return Ok(Self::new(config));
        };
        let epoch = now_epoch();
        let metrics = Arc::new(Metrics::default());
        let (data, loaded) = DataDir::open(&dir, epoch, metrics.clone())?;
        let catalog = Arc::new(Catalog::new(catalog_config(&config)));
        let leases = Arc::new(LeaseTable::for_life(Clock::new(), loaded.life));
        let memory = Arc::new(MemoryStore::new(Some(data)));
        let registry = Self::build(
            config,
            Parts {
                leases,
                catalog,
                store: Store::Memory(memory.clone()),
                metrics,
                shutdown: CancellationToken::new(),
            },
            epoch,
            loaded.lease_epoch,
        );
        registry.restore(&memory, loaded)?;
        Ok(registry)
    }

    /// A node of a cluster over etcd (see `crate::etcd`): connects, loads
    /// the catalog from etcd and starts the node's sessions. `epoch` comes
    /// from the etcd cluster, so revisions, which are etcd's, mean the same
    /// on every node. Fails if etcd cannot be reached within
    /// `options.connect_timeout`.
    pub async fn connect_cluster(config: Config, options: EtcdOptions) -> Result<Self> {
        let catalog = Arc::new(Catalog::new(catalog_config(&config)));
        let leases = Arc::new(LeaseTable::new(Clock::new()));
        let shutdown = CancellationToken::new();
        let (store, epoch) = crate::etcd::EtcdStore::start(
            options,
            catalog.clone(),
            leases.clone(),
            shutdown.clone(),
        )
        .await?;
        Ok(Self::build(
            config,
            Parts {
                leases,
                catalog,
                store: Store::Etcd(store),
                metrics: Arc::new(Metrics::default()),
                shutdown,
            },
            epoch,
            epoch,
        ))
    }

    /// Puts what a data directory held into this (empty) registry, within
    /// the configured caps. What does not fit, or no longer validates, is
    /// deleted from the data directory too, through the ordinary write path.
    fn restore(&self, memory: &MemoryStore, loaded: crate::persist::Loaded) -> Result<()> {
        let config = &self.shared.config;
        let table = &self.shared.leases;
        let mut dropped = Batch::default();
        let mut restored: HashMap<LeaseId, (Arc<Lease>, usize)> = HashMap::new();
        for (id, ttl_ms, owner) in loaded.leases {
            // A TTL outside the bounds configured now is brought within them.
            let ttl =
                std::time::Duration::from_millis(ttl_ms).clamp(config.min_ttl, config.max_ttl);
            match (restored.len() < config.max_leases)
                .then(|| table.restore(id, ttl, owner))
                .flatten()
            {
                Some(lease) => {
                    restored.insert(id, (lease, 0));
                }
                None => dropped.leases.push(LeaseChange::Revoke(id)),
            }
        }
        let mut batch = Batch::default();
        let mut per_service: HashMap<String, usize> = HashMap::new();
        for instance in loaded.instances {
            let key = InstanceKey::of(&instance);
            let valid = validate::service_name("service", &instance.service).is_ok()
                && validate::instance_id("id", &instance.id).is_ok()
                && validate::address("address", &instance.address).is_ok();
            let services = per_service.len();
            let fits = batch.changes.len() < config.max_instances
                && match per_service.get(&instance.service) {
                    Some(n) => *n < config.max_instances_per_service,
                    None => services < config.max_services,
                };
            match restored.get_mut(&instance.lease_id) {
                Some((lease, on_lease))
                    if valid && fits && *on_lease < config.max_instances_per_lease =>
                {
                    *on_lease += 1;
                    *per_service.entry(instance.service.clone()).or_default() += 1;
                    table.attach(lease, key.clone());
                    batch.changes.push(Change::Put { key, instance });
                }
                _ => dropped.changes.push(Change::Delete {
                    key,
                    reason: DeleteReason::Expired,
                    lease: None,
                }),
            }
        }
        let instances = batch.changes.len();
        if loaded.revision > 0 || instances > 0 {
            memory.restore(&self.shared.catalog, batch, loaded.revision.max(1));
        }
        let m = &self.shared.metrics;
        m.restored_instances
            .store(instances as u64, std::sync::atomic::Ordering::Relaxed);
        m.restored_leases
            .store(restored.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if !dropped.is_empty() {
            warn!(
                instances = dropped.changes.len(),
                leases = dropped.leases.len(),
                "records of the data directory over the configured caps or no longer valid were dropped"
            );
            let txn = self.shared.catalog.txn();
            // Not waited for: the next write's flush carries it at worst.
            let _ = self.shared.store.submit(txn, dropped, Undo::default());
        }
        info!(
            life = loaded.life,
            revision = self.shared.catalog.revision(),
            instances,
            leases = restored.len(),
            "catalog restored from the data directory; leases renewed for one TTL"
        );
        Ok(())
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
    pub fn leases(&self) -> &Arc<LeaseTable> {
        &self.shared.leases
    }

    /// Where writes go.
    pub fn store(&self) -> &Store {
        &self.shared.store
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
            epoch: self.epoch(),
            lease_epoch: self.shared.lease_epoch,
            warming_up: !remaining.is_zero(),
            warmup_remaining_ms: remaining.as_millis() as u64,
            stale: self.shared.store.is_stale(),
        }
    }

    /// The epoch revisions belong to: this server life's, or a cluster's
    /// (the same on every node).
    pub fn epoch(&self) -> u64 {
        self.shared.store.epoch().unwrap_or(self.shared.epoch)
    }

    /// The server life this registry's lease ids belong to (see
    /// `ServerInfo.lease_epoch`).
    pub fn lease_epoch(&self) -> u64 {
        self.shared.lease_epoch
    }

    /// Adds or replaces an instance under a new or existing lease. With
    /// auth on, the caller needs `register` on the service, may only attach
    /// to its own leases, and may only replace instances registered under
    /// its own leases (admins excepted); a new lease belongs to the caller.
    pub async fn register(
        &self,
        req: RegisterRequest,
        caller: Option<&Identity>,
    ) -> Result<RegisterResponse> {
        let (lease, pending) = self.plan_register(req, caller)?;
        let revision = pending.wait().await?;
        Ok(RegisterResponse {
            lease_id: lease.id,
            ttl_ms: lease.ttl_ms,
            revision,
            server: Some(self.server_info()),
        })
    }

    fn plan_register(
        &self,
        req: RegisterRequest,
        caller: Option<&Identity>,
    ) -> Result<(Arc<Lease>, Pending)> {
        let config = &self.shared.config;
        let Some(mut instance) = req.instance else {
            return Err(Error::InvalidArgument("instance is required".into()));
        };
        validate::service_name("instance.service", &instance.service)?;
        validate::instance_id("instance.id", &instance.id)?;
        validate::address("instance.address", &instance.address)?;
        validate::metadata("instance.metadata", &instance.metadata)?;
        if let Some(check) = instance.check.as_mut() {
            validate::health_check("instance.check", check, config.min_check_interval)?;
        }
        validate::admin_state(
            "instance.admin_state",
            instance.admin_state,
            &instance.admin_reason,
        )?;
        let ttl = if req.lease_id == 0 {
            Some(validate::ttl(req.ttl_ms, config.min_ttl, config.max_ttl)?)
        } else {
            None
        };
        if let Some(c) = caller {
            c.check(Action::Register, &instance.service)?;
        }
        self.shared.store.check_writable()?;
        if instance.weight == 0 {
            instance.weight = 1;
        }
        instance.lease_remaining_ms = 0;
        instance.revision = 0;

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
            // Exact under the transaction: only writers change the counts.
            let n = txn.instance_count();
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

        // The health and admin state the replaced instance had (issue 17).
        let previous = existing.and_then(|_| txn.get(&instance.service, &instance.id));

        // Apply to the lease table, then hand the batch to the store.
        let mut undo = Undo::default();
        let mut batch = Batch::default();
        let lease = match attach_to {
            Some(lease) => {
                leases.renew(lease.id);
                lease
            }
            None => {
                let owner = caller.map(|c| c.name.clone());
                let ttl = ttl.expect("ttl validated for a new lease");
                let lease = leases.grant_owned(ttl, owner.clone()).ok_or_else(|| {
                    Error::ResourceExhausted(
                        "this life of the registry has granted every lease id it may; restart it to begin a new one"
                            .into(),
                    )
                })?;
                undo.granted = Some(lease.id);
                batch.leases.push(LeaseChange::Grant {
                    id: lease.id,
                    ttl_ms: lease.ttl_ms,
                    owner,
                });
                lease
            }
        };
        let key = txn.key_for(&instance);
        if let Some(old) = existing.filter(|old| *old != lease.id)
            && leases.detach(old, &key)
        {
            undo.detached.push((old, key.clone()));
        }
        if existing != Some(lease.id) {
            leases.attach(&lease, key.clone());
            undo.attached.push((lease.id, key.clone()));
        }
        instance.lease_id = lease.id;
        carry_states(
            &mut instance,
            previous.as_deref(),
            existing == Some(lease.id),
        );
        batch.changes.push(Change::Put { key, instance });
        let pending = self.shared.store.submit(txn, batch, undo);
        metrics::inc(&self.shared.metrics.registrations, 1);
        Ok((lease, pending))
    }

    /// Renews each lease; unknown or expired ones come back `found: false`.
    /// With auth on, a caller may only renew its own leases.
    pub fn heartbeat(
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
    /// Returns the revision and the number of instances removed. With auth
    /// on: the caller's own lease, or one whose instances it administers.
    pub async fn deregister_lease(
        &self,
        lease_id: LeaseId,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        let (removed, pending) = self.plan_deregister_lease(lease_id, caller)?;
        let revision = pending.wait().await?;
        Ok((revision, removed))
    }

    fn plan_deregister_lease(
        &self,
        lease_id: LeaseId,
        caller: Option<&Identity>,
    ) -> Result<(u32, Pending)> {
        self.shared.store.check_writable()?;
        let txn = self.shared.catalog.txn();
        let leases = &self.shared.leases;
        if let Some(c) = caller
            && let Some(lease) = leases.get(lease_id)
            && lease.owner.as_deref() != Some(&*c.name)
        {
            let keys = lease.keys();
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
        let (_, keys) = leases
            .revoke(lease_id)
            .ok_or_else(|| Error::NotFound(format!("lease {lease_id} not found")))?;
        let removed = keys.len() as u32;
        let batch = Batch {
            changes: keys
                .into_iter()
                .map(|key| Change::Delete {
                    key,
                    reason: DeleteReason::Deregistered,
                    lease: Some(lease_id),
                })
                .collect(),
            leases: vec![LeaseChange::Revoke(lease_id)],
        };
        let pending = self.shared.store.submit(txn, batch, Undo::default());
        metrics::inc(&self.shared.metrics.deregistrations, 1);
        Ok((removed, pending))
    }

    /// Removes one instance; its lease stays. With auth on: an instance
    /// under the caller's own lease in a service it may register, or any
    /// instance of a service it administers.
    pub async fn deregister_instance(
        &self,
        service: &str,
        id: &str,
        caller: Option<&Identity>,
    ) -> Result<(u64, u32)> {
        let pending = self.plan_deregister_instance(service, id, caller)?;
        let revision = pending.wait().await?;
        Ok((revision, 1))
    }

    fn plan_deregister_instance(
        &self,
        service: &str,
        id: &str,
        caller: Option<&Identity>,
    ) -> Result<Pending> {
        validate::service_name("instance.service", service)?;
        validate::instance_id("instance.id", id)?;
        if let Some(c) = caller {
            c.check(Action::Register, service)?;
        }
        self.shared.store.check_writable()?;
        let txn = self.shared.catalog.txn();
        let lease_id = txn.lease_of(service, id).ok_or_else(|| {
            Error::NotFound(format!("instance {id:?} of service {service:?} not found"))
        })?;
        let lease = self.shared.leases.get(lease_id);
        owner_or_admin(caller, lease.as_deref(), service, id, "remove it")?;
        let key = InstanceKey {
            service: service.into(),
            id: id.into(),
        };
        let mut undo = Undo::default();
        if self.shared.leases.detach(lease_id, &key) {
            undo.detached.push((lease_id, key.clone()));
        }
        let batch = Batch {
            changes: vec![Change::Delete {
                key,
                reason: DeleteReason::Deregistered,
                lease: None,
            }],
            leases: Vec::new(),
        };
        let pending = self.shared.store.submit(txn, batch, undo);
        metrics::inc(&self.shared.metrics.deregistrations, 1);
        Ok(pending)
    }

    /// Sets an instance `DRAINING`, `DISABLED` (maintenance) or `ACTIVE`
    /// again, with a reason, as a PUT at a new revision; its lease stays.
    /// Returns the revision and the instance as it now is; a state it
    /// already has changes nothing (the current revision). With auth on:
    /// the owner of its lease with `register` on the service, or an admin
    /// of the service. In a cluster only the node the instance registered
    /// through may change it (`FAILED_PRECONDITION` elsewhere: that node
    /// owns its etcd key).
    pub async fn set_instance_state(
        &self,
        service: &str,
        id: &str,
        state: AdminState,
        reason: &str,
        caller: Option<&Identity>,
    ) -> Result<(u64, Instance)> {
        let (revision, mut instance, pending) =
            self.plan_set_instance_state(service, id, state, reason, caller)?;
        match pending {
            Some(pending) => {
                let revision = pending.wait().await?;
                instance.revision = revision;
                Ok((revision, instance))
            }
            None => Ok((revision, instance)),
        }
    }

    fn plan_set_instance_state(
        &self,
        service: &str,
        id: &str,
        state: AdminState,
        reason: &str,
        caller: Option<&Identity>,
    ) -> Result<(u64, Instance, Option<Pending>)> {
        validate::service_name("instance.service", service)?;
        validate::instance_id("instance.id", id)?;
        validate::admin_state("state", state as i32, reason)?;
        if let Some(c) = caller {
            c.check(Action::Register, service)?;
        }
        self.shared.store.check_writable()?;
        let txn = self.shared.catalog.txn();
        let current = txn.get(service, id).ok_or_else(|| {
            Error::NotFound(format!("instance {id:?} of service {service:?} not found"))
        })?;
        let lease = self.shared.leases.get(current.lease_id);
        owner_or_admin(caller, lease.as_deref(), service, id, "change its state")?;
        if self.shared.store.etcd().is_some() && lease.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "instance {id:?} of service {service:?} is registered through another registry node; change its state on that node"
            )));
        }
        let reason = if state == AdminState::Active {
            ""
        } else {
            reason
        };
        if current.admin_state == state as i32 && current.admin_reason == reason {
            let revision = txn.current_revision();
            return Ok((revision, Instance::clone(&current), None));
        }
        let mut instance = Instance::clone(&current);
        instance.admin_state = state as i32;
        instance.admin_reason = reason.to_owned();
        instance.revision = 0;
        instance.lease_remaining_ms = 0;
        let key = txn.key_for(&instance);
        let batch = Batch {
            changes: vec![Change::Put {
                key,
                instance: instance.clone(),
            }],
            leases: Vec::new(),
        };
        let pending = self.shared.store.submit(txn, batch, Undo::default());
        metrics::inc(&self.shared.metrics.admin_state_changes, 1);
        Ok((0, instance, Some(pending)))
    }

    /// Records a health check result on an instance (the checker of
    /// [`crate::health`] calls it), as a PUT at a new revision. The result
    /// is dropped (`Ok(None)`) if the instance is gone or was registered
    /// again with another address or check since the check started.
    pub async fn record_check(&self, result: CheckRecord) -> Result<Option<u64>> {
        let Some(pending) = self.plan_record_check(result)? else {
            return Ok(None);
        };
        pending.wait().await.map(Some)
    }

    /// [`Registry::record_check`] up to handing the write to the store,
    /// synchronously: the checker plans its writes in order.
    pub(crate) fn plan_record_check(&self, result: CheckRecord) -> Result<Option<Pending>> {
        self.shared.store.check_writable()?;
        let txn = self.shared.catalog.txn();
        let Some(current) = txn.get(&result.service, &result.id) else {
            return Ok(None);
        };
        if crate::health::Target::of(&current).as_ref() != Some(&result.target) {
            return Ok(None);
        }
        let mut instance = Instance::clone(&current);
        instance.health = result.health as i32;
        instance.last_check = Some(Box::new(registry_api::v1::CheckResult {
            unix_ms: result.at_unix_ms,
            output: validate::truncate(&result.output, validate::MAX_REASON).to_owned(),
        }));
        instance.revision = 0;
        instance.lease_remaining_ms = 0;
        let key = txn.key_for(&instance);
        let batch = Batch {
            changes: vec![Change::Put { key, instance }],
            leases: Vec::new(),
        };
        Ok(Some(self.shared.store.submit(txn, batch, Undo::default())))
    }

    /// Served instances of a service matching a selector (see
    /// [`crate::serving`]: the serving ones, or every active one while the
    /// service panics). With auth on, the caller needs `read` on the
    /// service.
    pub fn resolve(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
        caller: Option<&Identity>,
    ) -> Result<ResolveResponse> {
        self.resolve_with(service, selector, include_lease_ttl, false, caller)
    }

    /// [`Registry::resolve`], or with `include_not_serving` every live
    /// instance whatever its health and admin state.
    pub fn resolve_with(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
        include_not_serving: bool,
        caller: Option<&Identity>,
    ) -> Result<ResolveResponse> {
        Self::check_resolve(service, selector, caller)?;
        let (snap, revision) = self.shared.catalog.resolve(service);
        let served = snap
            .as_ref()
            .filter(|_| !include_not_serving)
            .map(|s| s.served());
        let instances = match &snap {
            None => Vec::new(),
            Some(snap) => snap
                .instances()
                .iter()
                .enumerate()
                .filter(|(n, _)| served.is_none_or(|s| s.includes(*n)))
                .map(|(_, i)| i)
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
            panicked: served.is_some_and(|s| s.panicked()),
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

    /// [`Registry::resolve`] as a wire frame: an unfiltered answer without
    /// lease TTLs (the common case) reuses the service snapshot's encoded
    /// instance list instead of cloning and encoding every instance per call.
    pub fn resolve_frame(
        &self,
        service: &str,
        selector: &HashMap<String, String>,
        include_lease_ttl: bool,
        include_not_serving: bool,
        caller: Option<&Identity>,
    ) -> Result<ResolveFrame> {
        if !selector.is_empty() || include_lease_ttl {
            return self
                .resolve_with(
                    service,
                    selector,
                    include_lease_ttl,
                    include_not_serving,
                    caller,
                )
                .map(ResolveFrame::message);
        }
        Self::check_resolve(service, selector, caller)?;
        let (snap, revision) = self.shared.catalog.resolve(service);
        let mut rest = ResolveResponse {
            instances: Vec::new(),
            revision,
            service_known: snap.is_some(),
            server: Some(self.server_info()),
            panicked: false,
        };
        Ok(match snap {
            Some(snap) if include_not_serving => {
                ResolveFrame::shared(snap.encoded_instances(), rest)
            }
            Some(snap) => {
                rest.panicked = snap.served().panicked();
                ResolveFrame::shared(snap.encoded_served(), rest)
            }
            None => ResolveFrame::message(rest),
        })
    }

    /// Every known service with its instance count, at one revision,
    /// filtered to what the caller may read.
    pub fn list_services(&self, caller: Option<&Identity>) -> ListServicesResponse {
        let listing = self.shared.catalog.listing();
        ListServicesResponse {
            services: listing
                .services
                .iter()
                .filter(|(name, _)| caller.is_none_or(|c| c.may(Action::Read, name)))
                .map(|(name, n)| ServiceSummary {
                    name: name.to_string(),
                    instance_count: *n as u32,
                })
                .collect(),
            revision: listing.revision,
            server: Some(self.server_info()),
        }
    }

    /// Sizes and identity, for operators; the catalog's counts are those of
    /// one revision.
    pub fn status(&self) -> StatusResponse {
        let catalog = &self.shared.catalog;
        let listing = catalog.listing();
        let stats = &catalog.stats;
        StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            revision: listing.revision,
            services: listing.services.len() as u64,
            instances: listing.instances as u64,
            leases: self.shared.leases.len() as u64,
            watchers: stats.watchers.load(std::sync::atomic::Ordering::Relaxed) as u64,
            watcher_resets: stats
                .watcher_resets
                .load(std::sync::atomic::Ordering::Relaxed),
            server: Some(self.server_info()),
        }
    }

    /// Opens a watcher (see [`Catalog::watch`]); `epoch` 0 skips the check.
    /// With auth on, watching one service needs `read` on it; watching all
    /// of them shows only the services the caller may read. A watch resumed
    /// from a revision this node has not applied yet (seen on another node
    /// of a cluster) waits a moment for it rather than being reset.
    pub async fn watch(
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
        let epoch_matches = epoch == 0 || epoch == self.epoch();
        if epoch_matches {
            self.shared
                .store
                .catch_up(start_revision.saturating_sub(1))
                .await;
        }
        self.shared
            .catalog
            .watch(filter, start_revision, epoch_matches, conn)
    }

    /// What the expiry task works with (see [`crate::expiry`]).
    pub fn expirer(&self) -> Expirer {
        Expirer::new(
            self.shared.leases.clone(),
            self.shared.catalog.clone(),
            self.shared.store.clone(),
            self.shared.metrics.clone(),
            &self.shared.config,
        )
    }

    /// Expires up to `limit` leases that are past their deadline, each with
    /// its instances in one revision. Returns how many expired.
    pub fn expire_due(&self, limit: usize) -> usize {
        self.expirer().expire_due(limit)
    }

    /// Spawns the expiry task (see [`crate::expiry`]): sleeps until the
    /// earliest deadline (or until an earlier one is granted), expires what
    /// is due, repeats; gives leases back the time the daemon was stalled,
    /// throttles expiry storms, and stops when the registry shuts down.
    pub fn spawn_expiry(&self) -> JoinHandle<()> {
        tokio::spawn(crate::expiry::run(
            self.expirer(),
            self.shared.shutdown.clone(),
        ))
    }

    /// Signals every background task and long-lived stream to stop.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// After [`Registry::shutdown`] and the drain: flushes the data
    /// directory, or lets a cluster node revoke its etcd lease (its
    /// instances leave the cluster now rather than after the lease TTL).
    pub async fn close(&self) {
        self.shared.store.close().await;
    }
}

/// A health check result to record on an instance (see
/// [`Registry::record_check`]): what was checked, and what it said.
#[derive(Debug, Clone)]
pub struct CheckRecord {
    /// The instance's service.
    pub service: String,
    /// The instance's id.
    pub id: String,
    /// What was checked (the instance's check and the address it used).
    pub target: crate::health::Target,
    /// The instance's health from now on.
    pub health: HealthState,
    /// What the check said.
    pub output: String,
    /// When, Unix time in ms.
    pub at_unix_ms: u64,
}

/// The health and admin state a registration gets (issue 17). Health: kept
/// from the instance it replaces when the address and check are the same
/// (a re-registration must not reset a checked state), otherwise the
/// check's initial state (PASSING without a check). Admin state: what the
/// request asks for; an `ACTIVE` request under the lease the replaced
/// instance lived under keeps that one's state, so a process
/// re-registering itself does not undo a drain or a maintenance.
fn carry_states(instance: &mut Instance, previous: Option<&Instance>, same_lease: bool) {
    match previous.filter(|p| p.address == instance.address && p.check == instance.check) {
        Some(p) => {
            instance.health = p.health;
            instance.last_check = p.last_check.clone();
        }
        None => {
            instance.health = instance
                .check
                .as_ref()
                .and_then(|c| c.initial_state)
                .unwrap_or(HealthState::Passing as i32);
            instance.last_check = None;
        }
    }
    if instance.admin_state == AdminState::Active as i32 {
        instance.admin_reason.clear();
        if let Some(p) = previous.filter(|_| same_lease) {
            instance.admin_state = p.admin_state;
            instance.admin_reason = p.admin_reason.clone();
        }
    }
}

/// With auth on, only the identity that registered an instance (the owner
/// of its lease) or an admin of its service may act on it (`what`: the
/// action, for the message).
fn owner_or_admin(
    caller: Option<&Identity>,
    lease: Option<&Lease>,
    service: &str,
    id: &str,
    what: &str,
) -> Result<()> {
    let Some(c) = caller else { return Ok(()) };
    let owner = lease.and_then(|l| l.owner.as_deref());
    if owner != Some(&*c.name) && !c.may(Action::Admin, service) {
        return Err(Error::PermissionDenied(format!(
            "instance {id:?} of service {service:?} is registered by another identity; only it or an admin may {what}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
