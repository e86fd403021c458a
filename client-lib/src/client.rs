//! [`RegistryClient`]: the cheap-clone handle every other part hangs off.

use std::{
    collections::HashMap,
    future::{Future, IntoFuture},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use registry_api::v1::{self as pb, registry_client::RegistryClient as Grpc};

use crate::{
    Error, Instance, Registration, Resolution, Resolver, ServerInfo,
    endpoints::{ClientOptions, DEFAULT_REGISTRY_ADDR, Endpoints, Transport},
    keeper::{self, KeeperHandle},
    resolver,
};

/// Environment variable naming the registry (a comma-separated list of
/// nodes is accepted).
pub const REGISTRY_ADDR_ENV: &str = "REGISTRY_ADDR";

/// Lease TTL used when [`RegisterBuilder::ttl`] is not called: ten seconds
/// means renewals every ~3 s, and a crashed instance disappears within 10 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Bound on one unary call, so a registry that accepts connections but never
/// answers cannot stall the keepalive task or a caller forever.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// Handle to the registry: registers instances, resolves and watches names.
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
    /// The running keepalive task's command side. Weak so that the task ends
    /// when the last `Registration` (which holds the strong side) is gone; a
    /// sync mutex because it is only held to upgrade or replace the pointer.
    keeper: Mutex<Weak<KeeperHandle>>,
    /// Held strongly by the keepalive task itself, so it is alive exactly as
    /// long as that task has not finished.
    keeper_alive: Mutex<Weak<()>>,
}

impl RegistryClient {
    /// Connects to the registry at `addrs`: `host:port` or `http://host:port`,
    /// or several of those separated by commas (the client then fails over
    /// between them). Fails if no node can be reached now; use
    /// [`RegistryClient::connect_lazy`] to start before the registry does.
    pub async fn connect(addrs: impl AsRef<str>) -> Result<Self, Error> {
        Self::connect_with(addrs, ClientOptions::default()).await
    }

    /// [`RegistryClient::connect`] with a token and/or TLS (see
    /// [`ClientOptions`]).
    pub async fn connect_with(
        addrs: impl AsRef<str>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        let mut endpoints = Endpoints::parse_with(addrs.as_ref(), &options)?;
        endpoints.connect_first().await?;
        Ok(Self::with_endpoints(endpoints))
    }

    /// Like [`RegistryClient::connect`] but without any I/O: connections are
    /// made on first use, so a service can start before its registry.
    pub fn connect_lazy(addrs: impl AsRef<str>) -> Result<Self, Error> {
        Self::connect_lazy_with(addrs, ClientOptions::default())
    }

    /// [`RegistryClient::connect_lazy`] with a token and/or TLS.
    pub fn connect_lazy_with(
        addrs: impl AsRef<str>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        Ok(Self::with_endpoints(Endpoints::parse_with(
            addrs.as_ref(),
            &options,
        )?))
    }

    /// Connects to `$REGISTRY_ADDR`, or to [`DEFAULT_REGISTRY_ADDR`] when it
    /// is unset, with the credentials of [`ClientOptions::from_env`]
    /// (`REGISTRY_TOKEN`, `REGISTRY_CACERT`, ...), so deployments configure
    /// services without code changes.
    pub async fn from_env() -> Result<Self, Error> {
        Self::connect_with(Self::env_addr(), ClientOptions::from_env()?).await
    }

    /// The address [`RegistryClient::from_env`] would use.
    pub fn env_addr() -> String {
        std::env::var(REGISTRY_ADDR_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_REGISTRY_ADDR.to_owned())
    }

    fn with_endpoints(endpoints: Endpoints) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoints: Arc::new(endpoints),
                keeper: Mutex::new(Weak::new()),
                keeper_alive: Mutex::new(Weak::new()),
            }),
        }
    }

    /// Starts registering `instance`; finish with `.ttl(..)` (optional) and
    /// `.await`:
    ///
    /// ```no_run
    /// # async fn f(client: registry_client::RegistryClient) -> Result<(), registry_client::Error> {
    /// use std::time::Duration;
    /// use registry_client::Instance;
    /// let reg = client
    ///     .register(Instance::new("prod", "10.0.0.7:5000").with_metadata("version", "1.2"))
    ///     .ttl(Duration::from_secs(5))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// The future resolves once the registry has accepted the instance (the
    /// first attempt's error is returned as is); from then on the client's
    /// background task keeps it registered until the [`Registration`] is
    /// deregistered or dropped.
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

    /// Resolves `service` once: its live instances right now.
    pub async fn resolve(&self, service: &str) -> Result<Resolution, Error> {
        self.resolve_matching(service, HashMap::new()).await
    }

    /// Resolves `service` once, keeping only instances whose metadata
    /// contains every `key=value` pair of `selector`.
    pub async fn resolve_matching(
        &self,
        service: &str,
        selector: HashMap<String, String>,
    ) -> Result<Resolution, Error> {
        let request = pb::ResolveRequest {
            service: service.to_owned(),
            selector,
            include_lease_ttl: false,
        };
        let resp = call(&self.inner.endpoints, move |mut grpc| {
            let request = request.clone();
            async move { grpc.resolve(request).await }
        })
        .await?;
        Ok(Resolution {
            instances: resp.instances.into_iter().map(Instance::from).collect(),
            service_known: resp.service_known,
            revision: resp.revision,
            server: ServerInfo::from(resp.server),
        })
    }

    /// A live, watch-fed cache of `service`'s instances. See [`Resolver`].
    ///
    /// Must be called inside a tokio runtime: it spawns the watch task.
    pub fn resolver(&self, service: &str) -> Resolver {
        resolver::spawn(self.inner.endpoints.clone(), service, HashMap::new())
    }

    /// Like [`RegistryClient::resolver`], restricted to instances whose
    /// metadata contains every pair of `selector` (e.g. `version=2`).
    pub fn resolver_matching(&self, service: &str, selector: HashMap<String, String>) -> Resolver {
        resolver::spawn(self.inner.endpoints.clone(), service, selector)
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

/// Runs one unary call against the current node, moving on to the next node
/// on a transient failure, trying each node at most once.
pub(crate) async fn call<T, F, Fut>(endpoints: &Endpoints, mut f: F) -> Result<T, Error>
where
    F: FnMut(Grpc<Transport>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..endpoints.len() {
        let (index, channel) = endpoints.current();
        let result = match tokio::time::timeout(RPC_TIMEOUT, f(Grpc::new(channel))).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from the registry within {RPC_TIMEOUT:?}"
            ))),
        };
        match result {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(status) => {
                let err = Error::from(status);
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
