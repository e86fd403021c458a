//! [`RegistryClient`]: the cheap-clone handle every other part hangs off,
//! its [`ClientBuilder`], and the one-shot calls (resolve, list, status,
//! deregister).

use std::{
    future::{Future, IntoFuture},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use registry_api::v1::{self as pb, registry_client::RegistryClient as Grpc};
use tonic::transport::ClientTlsConfig;

use crate::{
    AdminState, Error, Instance, Query, Registration, Resolution, Resolver, ServerInfo, Watch,
    WatchOptions,
    balance::ChannelBuilder,
    endpoints::{
        DEFAULT_REGISTRY_ADDR, Endpoints, REGISTRY_CACERT_ENV, REGISTRY_CERT_ENV, REGISTRY_KEY_ENV,
        REGISTRY_TLS_DOMAIN_ENV, REGISTRY_TOKEN_ENV, Settings, Transport, tls_from_files,
    },
    keeper::{self, KeeperHandle},
    resolver,
    watch::Session,
};

/// Environment variable naming the registry (a comma-separated list of
/// nodes is accepted).
pub const REGISTRY_ADDR_ENV: &str = "REGISTRY_ADDR";

/// Environment variable naming the caller's zone (matched against the
/// `zone` metadata label of instances by balanced channels).
pub const REGISTRY_ZONE_ENV: &str = "REGISTRY_ZONE";

/// Lease TTL used when [`RegisterBuilder::ttl`] is not called: ten seconds
/// means renewals every ~3 s, and a crashed instance disappears within 10 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Largest message accepted from the registry. Watch snapshots come in
/// 1 MiB chunks, but a Resolve of a large service, or the events of a lease
/// revoked with thousands of instances, can exceed tonic's 4 MiB default.
const MAX_DECODE: usize = 64 << 20;

/// A generated client on `channel` with this crate's decoding limit.
pub(crate) fn grpc(channel: Transport) -> Grpc<Transport> {
    Grpc::new(channel).max_decoding_message_size(MAX_DECODE)
}

/// The channel of the one-shot calls ([`call`]): with feature `otel`, a call
/// made inside a trace carries it to the registry.
#[cfg(feature = "otel")]
pub(crate) type OneShot = crate::trace::Traced<Transport>;
/// The channel of the one-shot calls ([`call`]).
#[cfg(not(feature = "otel"))]
pub(crate) type OneShot = Transport;

fn one_shot(channel: Transport) -> Grpc<OneShot> {
    #[cfg(feature = "otel")]
    let channel = crate::trace::Traced::new(channel);
    Grpc::new(channel).max_decoding_message_size(MAX_DECODE)
}

/// How to reach the registry: addresses, credentials, TLS, timeouts, and
/// the caller's zone. Finish with [`ClientBuilder::connect`] (fails now if
/// no node answers) or [`ClientBuilder::build`] (no I/O: the service may
/// start before its registry).
///
/// ```no_run
/// # async fn f() -> Result<(), registry_client::Error> {
/// use std::time::Duration;
/// let client = registry_client::RegistryClient::builder()
///     .address("http://10.0.0.1:7411,http://10.0.0.2:7411")
///     .token("s3cret")
///     .request_timeout(Duration::from_secs(2))
///     .zone("eu-1a")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect().await` or `build()`"]
pub struct ClientBuilder {
    addresses: String,
    settings: Settings,
    zone: Option<String>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            addresses: DEFAULT_REGISTRY_ADDR.to_owned(),
            settings: Settings::default(),
            zone: None,
        }
    }
}

impl ClientBuilder {
    /// Everything from the environment, so deployments configure services
    /// without code changes: `REGISTRY_ADDR` (else [`DEFAULT_REGISTRY_ADDR`]),
    /// `REGISTRY_TOKEN`, `REGISTRY_CACERT` (switches to TLS),
    /// `REGISTRY_CERT` + `REGISTRY_KEY` (mTLS), `REGISTRY_TLS_DOMAIN`, and
    /// `REGISTRY_ZONE`.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut builder = Self::default().address(RegistryClient::env_addr());
        if let Some(token) = var(REGISTRY_TOKEN_ENV) {
            builder = builder.token(token);
        }
        if let Some(ca) = var(REGISTRY_CACERT_ENV) {
            builder = builder.tls(tls_from_files(
                &ca,
                var(REGISTRY_CERT_ENV).as_deref(),
                var(REGISTRY_KEY_ENV).as_deref(),
                var(REGISTRY_TLS_DOMAIN_ENV).as_deref(),
            )?);
        }
        Ok(builder)
    }

    /// The registry: `host:port` or `http(s)://host:port`, or several of
    /// those separated by commas (the client then fails over between them).
    pub fn address(mut self, addresses: impl Into<String>) -> Self {
        self.addresses = addresses.into();
        self
    }

    /// Bearer token, for a registry started with `--auth-file`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.settings.token = Some(token.into());
        self
    }

    /// TLS (see [`crate::tls_from_files`]); addresses without a scheme are
    /// then dialed as `https://`.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.settings.tls = Some(tls);
        self
    }

    /// Bound on establishing a connection to a registry node (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Bound on one call to the registry (default 3 s), so a node that
    /// accepts connections but never answers stalls nothing for long.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// The caller's zone, preferred by balanced channels (instances carry
    /// theirs as the `zone` metadata label). Default: `REGISTRY_ZONE`.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Connects now, trying each node in order; fails with
    /// [`Error::Connect`] if none answers.
    pub async fn connect(self) -> Result<RegistryClient, Error> {
        let zone = self.zone_or_env();
        let mut endpoints = Endpoints::parse_with(&self.addresses, &self.settings)?;
        endpoints.connect_first().await?;
        Ok(RegistryClient::with_endpoints(endpoints, zone))
    }

    /// A client without any I/O: connections are made on first use, and
    /// registrations made while the registry is unreachable are accepted
    /// and completed in the background once it answers. Fails only on an
    /// unusable address or setting.
    pub fn build(self) -> Result<RegistryClient, Error> {
        let zone = self.zone_or_env();
        let endpoints = Endpoints::parse_with(&self.addresses, &self.settings)?;
        Ok(RegistryClient::with_endpoints(endpoints, zone))
    }

    fn zone_or_env(&self) -> Option<String> {
        self.zone.clone().or_else(|| {
            std::env::var(REGISTRY_ZONE_ENV)
                .ok()
                .map(|z| z.trim().to_owned())
                .filter(|z| !z.is_empty())
        })
    }
}

/// Handle to the registry: registers instances, resolves, lists and
/// watches names, and makes balanced channels.
///
/// Cloning is cheap and clones share everything: the connections, and the
/// single background task that keeps every registration of this client
/// alive over one KeepAlive stream. That task exists only while at least one
/// [`Registration`] does.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Arc<Endpoints>,
    zone: Option<String>,
    /// The running keepalive task's command side. Weak so that the task ends
    /// when the last `Registration` (which holds the strong side) is gone; a
    /// sync mutex because it is only held to upgrade or replace the pointer.
    keeper: Mutex<Weak<KeeperHandle>>,
    /// Held strongly by the keepalive task itself, so it is alive exactly as
    /// long as that task has not finished.
    keeper_alive: Mutex<Weak<()>>,
}

impl RegistryClient {
    /// The full set of connection options; see [`ClientBuilder`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to the registry at `addrs` (`host:port` or
    /// `http://host:port`, or several separated by commas) with default
    /// options. Shorthand for `builder().address(addrs).connect()`.
    pub async fn connect(addrs: impl AsRef<str>) -> Result<Self, Error> {
        Self::builder().address(addrs.as_ref()).connect().await
    }

    /// Connects with everything taken from the environment
    /// ([`ClientBuilder::from_env`]): `REGISTRY_ADDR`, `REGISTRY_TOKEN`,
    /// `REGISTRY_CACERT`, ..., `REGISTRY_ZONE`.
    pub async fn from_env() -> Result<Self, Error> {
        ClientBuilder::from_env()?.connect().await
    }

    /// The address [`RegistryClient::from_env`] would use.
    pub fn env_addr() -> String {
        std::env::var(REGISTRY_ADDR_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_REGISTRY_ADDR.to_owned())
    }

    fn with_endpoints(endpoints: Endpoints, zone: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoints: Arc::new(endpoints),
                zone,
                keeper: Mutex::new(Weak::new()),
                keeper_alive: Mutex::new(Weak::new()),
            }),
        }
    }

    /// The registry nodes, as normalized URIs, comma-separated.
    pub fn addresses(&self) -> String {
        self.inner.endpoints.describe()
    }

    /// The caller's zone ([`ClientBuilder::zone`] or `REGISTRY_ZONE`).
    pub fn zone(&self) -> Option<&str> {
        self.inner.zone.as_deref()
    }

    pub(crate) fn endpoints(&self) -> &Arc<Endpoints> {
        &self.inner.endpoints
    }

    /// Starts registering `instance`; finish with `.ttl(..)` (optional) and
    /// `.await`:
    ///
    /// ```no_run
    /// # async fn f(client: registry_client::RegistryClient) -> Result<(), registry_client::Error> {
    /// use std::time::Duration;
    /// use registry_client::Instance;
    /// let registration = client
    ///     .register(Instance::new("prod", "10.0.0.7:5000").with_metadata("version", "1.2"))
    ///     .ttl(Duration::from_secs(5))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The future resolves once the registry has accepted the instance, or
    /// at once with a registration in state
    /// [`crate::RegistrationState::Unreachable`] if the registry cannot be
    /// reached (it is then registered in the background as soon as it
    /// answers: start order does not matter). A refusal (invalid name,
    /// permission denied...) is returned as an error. From then on the
    /// client's background task keeps the instance registered until the
    /// [`Registration`] is deregistered or dropped.
    pub fn register(&self, instance: Instance) -> RegisterBuilder<'_> {
        RegisterBuilder {
            client: self,
            instance,
            ttl: DEFAULT_TTL,
        }
    }

    /// True while this client's background keepalive task is running, i.e.
    /// while any of its registrations lives (plus the moment it takes to
    /// deregister the last one). For health endpoints and leak checks.
    pub fn keepalive_running(&self) -> bool {
        self.inner
            .keeper_alive
            .lock()
            .expect("keeper mutex poisoned")
            .strong_count()
            > 0
    }

    /// The running keepalive task, or a freshly spawned one.
    pub(crate) fn keeper(&self) -> Arc<KeeperHandle> {
        let mut slot = self.inner.keeper.lock().expect("keeper mutex poisoned");
        if let Some(handle) = slot.upgrade() {
            return handle;
        }
        let (handle, alive) = keeper::spawn(self.inner.endpoints.clone());
        *slot = Arc::downgrade(&handle);
        *self
            .inner
            .keeper_alive
            .lock()
            .expect("keeper mutex poisoned") = alive;
        handle
    }

    /// Resolves a service once: its live instances right now. A name is
    /// enough; a [`Query`] adds a metadata selector. Add
    /// [`ResolveBuilder::with_lease_ttl`] to learn each lease's time left.
    pub fn resolve(&self, query: impl Into<Query>) -> ResolveBuilder<'_> {
        ResolveBuilder {
            client: self,
            query: query.into(),
            lease_ttl: false,
            include_not_serving: false,
        }
    }

    /// Drains (`Draining`), disables for maintenance (`Disabled`) or
    /// re-activates (`Active`) an instance, whoever registered it (with
    /// auth on, the registry allows its owner or an admin of the service):
    /// it leaves (or rejoins) callers' balancers, xDS and DNS at once while
    /// its registration stays. `regctl drain` and `regctl maint` use this;
    /// a service drains itself with [`Registration::drain`]. In a cluster
    /// the node the instance registered through makes the change; the
    /// client finds it.
    pub async fn set_instance_state(
        &self,
        service: impl Into<String>,
        id: impl Into<String>,
        state: AdminState,
        reason: impl Into<String>,
    ) -> Result<InstanceState, Error> {
        let request = pb::SetInstanceStateRequest {
            instance: Some(pb::InstanceKey {
                service: service.into(),
                id: id.into(),
            }),
            state: state.to_pb() as i32,
            reason: reason.into(),
        };
        set_instance_state(&self.inner.endpoints, None, request).await
    }

    /// Every known service (including those with zero instances) with its
    /// instance count, ordered by name.
    pub async fn list_services(&self) -> Result<ServiceList, Error> {
        let resp = call(&self.inner.endpoints, |mut grpc| async move {
            grpc.list_services(pb::ListServicesRequest {}).await
        })
        .await?;
        Ok(ServiceList {
            services: resp
                .services
                .into_iter()
                .map(|s| ServiceSummary {
                    name: s.name,
                    instances: s.instance_count,
                })
                .collect(),
            revision: resp.revision,
            server: ServerInfo::from(resp.server),
        })
    }

    /// The registry's version, uptime, sizes and health, for operators.
    pub async fn status(&self) -> Result<RegistryStatus, Error> {
        let st = call(&self.inner.endpoints, |mut grpc| async move {
            grpc.status(pb::StatusRequest {}).await
        })
        .await?;
        let health = self.health().await;
        Ok(RegistryStatus {
            version: st.version,
            uptime: Duration::from_millis(st.uptime_ms),
            revision: st.revision,
            services: st.services,
            instances: st.instances,
            leases: st.leases,
            watchers: st.watchers,
            watcher_resets: st.watcher_resets,
            server: ServerInfo::from(st.server),
            health,
        })
    }

    /// The registry's `grpc.health.v1` answer for the whole server.
    async fn health(&self) -> Health {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let (node, channel) = self.inner.endpoints.current();
        let timeout = self.inner.endpoints.settings().request_timeout;
        let mut health = HealthClient::new(channel);
        let check = health.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(resp)) => match resp.into_inner().status() {
                ServingStatus::Serving => Health::Serving,
                ServingStatus::NotServing => Health::NotServing,
                other => Health::Unknown(other.as_str_name().to_owned()),
            },
            Ok(Err(status)) => Health::Unknown(
                Error::from_status(self.inner.endpoints.uri(node), status).to_string(),
            ),
            Err(_) => Health::Unknown(format!("no answer within {timeout:?}")),
        }
    }

    /// Removes one instance, or revokes a lease with every instance on it,
    /// whoever registered it (with auth on, the registry checks that the
    /// caller may). An unknown target is [`Error::Rejected`] with
    /// `NOT_FOUND`. To stop your own registration use
    /// [`Registration::deregister`], which also stops its keepalive.
    pub async fn deregister(&self, target: DeregisterTarget) -> Result<Deregistered, Error> {
        let request = pb::DeregisterRequest {
            target: Some(match target {
                DeregisterTarget::Lease(id) => pb::deregister_request::Target::LeaseId(id),
                DeregisterTarget::Instance { service, id } => {
                    pb::deregister_request::Target::Instance(pb::InstanceKey { service, id })
                }
            }),
        };
        let resp = call(&self.inner.endpoints, move |mut grpc| {
            let request = request.clone();
            async move { grpc.deregister(request).await }
        })
        .await?;
        Ok(Deregistered {
            revision: resp.revision,
            removed: resp.removed,
        })
    }

    /// Watches a service (or every service, for an empty name): a snapshot,
    /// then every change, resuming by itself across outages and restarts.
    /// See [`Watch`]. Must be called inside a tokio runtime.
    pub fn watch(&self, query: impl Into<Query>, options: WatchOptions) -> Watch {
        Watch::new(Session::new(
            self.inner.endpoints.clone(),
            query.into(),
            options,
        ))
    }

    /// A live, watch-fed cache of a service's instances. See [`Resolver`].
    ///
    /// Must be called inside a tokio runtime: it spawns the watch task.
    pub fn resolver(&self, query: impl Into<Query>) -> Resolver {
        resolver::spawn(self.clone(), query.into())
    }

    /// A load-balanced channel to a service, with options (zone, outlier
    /// ejection, retries...); [`crate::balanced_channel`] is the shorthand
    /// with defaults. See [`ChannelBuilder`].
    pub fn channel(&self, query: impl Into<Query>) -> ChannelBuilder {
        ChannelBuilder::new(self.resolver(query), self.inner.zone.clone())
    }
}

/// A pending [`RegistryClient::register`]: set options, then `.await` it.
#[derive(Debug)]
#[must_use = "a registration only happens when the builder is awaited"]
pub struct RegisterBuilder<'a> {
    client: &'a RegistryClient,
    instance: Instance,
    ttl: Duration,
}

impl RegisterBuilder<'_> {
    /// Lease TTL: the instance disappears this long after its process stops
    /// renewing. It is renewed about every `ttl / 3`. Registrations of one
    /// client that use the same TTL share a single lease.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

impl<'a> IntoFuture for RegisterBuilder<'a> {
    type Output = Result<Registration, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let handle = self.client.keeper();
            keeper::register(handle, self.instance, self.ttl).await
        })
    }
}

/// A pending [`RegistryClient::resolve`]: set options, then `.await` it.
#[derive(Debug)]
#[must_use = "a resolve only happens when the builder is awaited"]
pub struct ResolveBuilder<'a> {
    client: &'a RegistryClient,
    query: Query,
    lease_ttl: bool,
    include_not_serving: bool,
}

impl ResolveBuilder<'_> {
    /// Also report each instance's lease time left
    /// ([`Instance::lease_remaining`]); costs the registry a lease lookup per
    /// instance, so it is off by default.
    pub fn with_lease_ttl(mut self) -> Self {
        self.lease_ttl = true;
        self
    }

    /// Also answer instances callers are not sent to: critical, draining
    /// and disabled ones. By default only serving instances are answered
    /// (or every active one while the service is in panic mode, see
    /// [`Resolution::panicked`]).
    pub fn include_not_serving(mut self) -> Self {
        self.include_not_serving = true;
        self
    }
}

impl<'a> IntoFuture for ResolveBuilder<'a> {
    type Output = Result<Resolution, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let request = pb::ResolveRequest {
                service: self.query.service.clone(),
                selector: self.query.selector_map(),
                include_lease_ttl: self.lease_ttl,
                include_not_serving: self.include_not_serving,
            };
            let resp = call(&self.client.inner.endpoints, move |mut grpc| {
                let request = request.clone();
                async move { grpc.resolve(request).await }
            })
            .await?;
            Ok(Resolution {
                instances: resp.instances.into_iter().map(Instance::from).collect(),
                service_known: resp.service_known,
                revision: resp.revision,
                server: ServerInfo::from(resp.server),
                panicked: resp.panicked,
            })
        })
    }
}

/// The answer to [`RegistryClient::set_instance_state`] and
/// [`Registration::drain`].
#[derive(Debug, Clone)]
pub struct InstanceState {
    /// Revision of the change (the current one when nothing changed).
    pub revision: u64,
    /// The instance as it now is.
    pub instance: Instance,
}

/// Sends a `SetInstanceState`, first to `preferred` (the node a lease
/// lives on, when known), then to the current node and on: in a cluster
/// only the node an instance registered through may change it, and the
/// others answer `FAILED_PRECONDITION`, so that answer moves on to the next
/// node like an unreachable one.
pub(crate) async fn set_instance_state(
    endpoints: &Endpoints,
    preferred: Option<usize>,
    request: pb::SetInstanceStateRequest,
) -> Result<InstanceState, Error> {
    let timeout = endpoints.settings().request_timeout;
    let first = preferred.unwrap_or_else(|| endpoints.current().0);
    let mut last = None;
    for k in 0..endpoints.len() {
        let node = (first + k) % endpoints.len();
        let mut client = grpc(endpoints.node(node));
        let call = client.set_instance_state(request.clone());
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        };
        match result {
            Ok(resp) => {
                let resp = resp.into_inner();
                return Ok(InstanceState {
                    revision: resp.revision,
                    instance: resp.instance.map(Instance::from).ok_or_else(|| {
                        Error::from_status(
                            endpoints.uri(node),
                            tonic::Status::internal("SetInstanceState answered no instance"),
                        )
                    })?,
                });
            }
            Err(status) => {
                let elsewhere = status.code() == tonic::Code::FailedPrecondition;
                let err = Error::from_status(endpoints.uri(node), status);
                if !(err.is_unavailable() || elsewhere) {
                    return Err(err);
                }
                last = Some(err);
            }
        }
    }
    Err(last.expect("at least one node is configured"))
}

/// What [`RegistryClient::deregister`] removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeregisterTarget {
    /// One instance; its lease (and the lease's other instances) stay.
    Instance {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
    /// A lease and every instance attached to it, in one revision.
    Lease(u64),
}

impl DeregisterTarget {
    /// One instance of `service`.
    pub fn instance(service: impl Into<String>, id: impl Into<String>) -> Self {
        DeregisterTarget::Instance {
            service: service.into(),
            id: id.into(),
        }
    }
}

/// The registry's answer to a deregistration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Deregistered {
    /// Catalog revision of the removal (0 when nothing was removed).
    pub revision: u64,
    /// Instances removed.
    pub removed: u32,
}

/// One service of [`RegistryClient::list_services`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    /// Service name.
    pub name: String,
    /// Live instances.
    pub instances: u32,
}

/// The answer to [`RegistryClient::list_services`].
#[derive(Debug, Clone)]
pub struct ServiceList {
    /// Every known service, ordered by name, including empty ones.
    pub services: Vec<ServiceSummary>,
    /// Catalog revision of the answer.
    pub revision: u64,
    /// Which registry life answered.
    pub server: ServerInfo,
}

/// The registry's `grpc.health.v1` status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Serving.
    Serving,
    /// Up but not serving (draining for shutdown).
    NotServing,
    /// Anything else, or no answer (why).
    Unknown(String),
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Serving => f.write_str("SERVING"),
            Health::NotServing => f.write_str("NOT_SERVING"),
            Health::Unknown(why) => write!(f, "UNKNOWN ({why})"),
        }
    }
}

/// The answer to [`RegistryClient::status`].
#[derive(Debug, Clone)]
pub struct RegistryStatus {
    /// Registry version.
    pub version: String,
    /// Time since this registry process started.
    pub uptime: Duration,
    /// Current catalog revision.
    pub revision: u64,
    /// Known services.
    pub services: u64,
    /// Live instances.
    pub instances: u64,
    /// Live leases.
    pub leases: u64,
    /// Open watchers.
    pub watchers: u64,
    /// Reset snapshots sent to watchers that read too slowly.
    pub watcher_resets: u64,
    /// Which registry life answered, and whether it is warming up.
    pub server: ServerInfo,
    /// Its health-check answer.
    pub health: Health,
}

/// Runs one unary call against the current node, moving on to the next node
/// on a transient failure, trying each node at most once.
pub(crate) async fn call<T, F, Fut>(endpoints: &Endpoints, mut f: F) -> Result<T, Error>
where
    F: FnMut(Grpc<OneShot>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let timeout = endpoints.settings().request_timeout;
    let mut last = None;
    for _ in 0..endpoints.len() {
        let (index, channel) = endpoints.current();
        let result = match tokio::time::timeout(timeout, f(one_shot(channel))).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        };
        match result {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status) => {
                let err = Error::from_status(endpoints.uri(index), status);
                if !err.is_unavailable() {
                    return Err(err);
                }
                endpoints.failed(index);
                last = Some(err);
            }
        }
    }
    Err(last.expect("at least one node is configured"))
}
