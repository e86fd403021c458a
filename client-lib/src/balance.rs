//! [`BalancedChannel`]: a tonic-compatible channel to a service name,
//! spreading calls over the live instances a [`Resolver`] reports.
//!
//! How an instance is chosen for a call, in order:
//!
//! 1. **Outlier ejection.** After `consecutive_failures` (default 3) failed
//!    attempts in a row on one instance — connection refused or reset, or a
//!    gRPC `UNAVAILABLE` answer — it is ejected: no call goes to it. When
//!    its ejection time is up, the channel does not gamble a real call on
//!    it: it probes the address (a TCP connect) in the background, and only
//!    an address that answers comes back into rotation. A failed probe, and
//!    every new ejection of the same instance, doubles the ejection time
//!    (`base_ejection` up to `max_ejection`), so a flapping instance is
//!    tried ever more rarely. At most `max_ejected_share` of the instances
//!    (and always at least one) are ejected at once; if every candidate is
//!    ejected anyway, the channel routes over all of them (**panic mode**,
//!    as Envoy does: a mass failure is more likely the caller's own network
//!    than every backend at once). Ejections are logged at WARN and counted
//!    in [`BalancedChannel::stats`].
//! 2. **Zone-aware routing.** With a caller zone (`REGISTRY_ZONE`,
//!    [`crate::ClientBuilder::zone`] or [`ChannelBuilder::zone`]), calls go
//!    to instances whose `zone` label matches, as long as at least
//!    `zone_failover_share` (default 0.5) of the local zone's weight is
//!    ready (not ejected). Below that, the local survivors would be
//!    overloaded, so calls spread by weight over every zone's ready
//!    instances, the local ones included (never all onto one other zone),
//!    as Envoy's zone-aware routing spills over.
//! 3. **Weights.** Among the chosen instances, two are drawn at random in
//!    proportion to their `weight`, and the one with fewer calls in flight
//!    per unit of weight is used (weighted power of two choices; a tie goes
//!    to the first draw). Sequential calls therefore split exactly by
//!    weight, and concurrent ones also steer away from a slow instance.
//!    Weights, zones and addresses follow re-registrations live.
//!    With [`ChannelBuilder::slow_start`], an instance that joins after the
//!    channel first heard from the registry (a new or restarted instance,
//!    or one serving again after a failed health check) starts at 10% of
//!    its weight and ramps up linearly over the window, as Envoy's
//!    `slow_start_config` does, so a cold instance (empty caches, JIT,
//!    connection pools) is not handed its full share at once.
//!
//! **Health and drain.** The channel follows the registry's served set:
//! its watch leaves out critical instances (unless the service is in
//! panic mode, when the registry serves every active one) and draining or
//! disabled ones, and removes an instance the moment it stops serving; a
//! draining instance is never chosen, even if a stale answer lists it.
//!
//! tower's `Balance` fits neither weights nor ejection (its two choices are
//! uniform and its readiness is tonic's buffer, which is always ready even
//! for a dead host), so the choice is made here; tower supplies the retry
//! budget ([`tower::retry::budget::TpsBudget`]) and `oneshot`.
//!
//! **Retries.** A call whose request never left this process (the
//! connection to the instance could not be made) is sent again to another
//! instance, as gRPC's transparent retry does; with
//! [`RetryPolicy::idempotent_methods`], failed idempotent calls are too. Both
//! draw on one budget (by default retries may add 20% to the calls, plus 10
//! per second), so a failing fleet is not hammered. Only requests whose body
//! is complete when the call starts (unary and server-streaming calls) can
//! be sent again; streaming requests are sent once.
//!
//! **Fast answers.** A call to a name the registry says it has never seen
//! fails at once with `UNAVAILABLE` naming the service (unless the registry
//! is warming up after a start, when it waits); a known service with no
//! live instance fails at once too (unless
//! [`ChannelBuilder::wait_for_instances`]). A transport failure names the
//! instance and its address.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::{Body as _, Frame};
use rand::Rng;
use tokio::{
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tonic::{
    Code, Status,
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{
    Service, ServiceExt,
    retry::budget::{Budget, TpsBudget},
};

use crate::{
    AdminState, Query, RegistryClient, Resolver, ResolverState, ServiceStatus,
    error::{flat, root_cause},
};

/// Share of its weight a slow-starting instance begins with (Envoy's
/// default `min_weight_percent`): enough calls to warm it up, never none.
const SLOW_START_MIN_SHARE: f64 = 0.1;

/// Dialing an instance that just died fails fast; one that drops packets
/// should not hold a call (or a probe) for long either.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request body kept for sending again: unary requests are small;
/// a bigger one is sent once rather than copied.
const MAX_REPLAY_BYTES: usize = 1 << 20;
/// How long retry-budget deposits count (tower's default window).
const BUDGET_TTL: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Balancer key: a re-registration of the same id at a new address is a
/// different endpoint (new connection); the same id and address with a new
/// weight or zone is updated in place.
type Key = (String, String);

/// A channel that spreads calls over the live instances of `service`, with
/// the default options (the client's zone, outlier ejection, transparent
/// retries). Callers never see an address:
///
/// ```no_run
/// # async fn f(client: registry_client::RegistryClient) {
/// use registry_api::prod::prod_service_client::ProdServiceClient;
/// let channel = registry_client::balanced_channel(&client, "prod");
/// let mut prod = ProdServiceClient::new(channel);
/// # }
/// ```
///
/// Shorthand for `client.channel(query).build()`; see [`ChannelBuilder`]
/// for the options and the module docs for the rules. Must be called inside
/// a tokio runtime.
pub fn balanced_channel(client: &RegistryClient, query: impl Into<Query>) -> BalancedChannel {
    client.channel(query).build()
}

/// Outlier ejection settings (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// Failed attempts in a row that eject an instance; 0 disables ejection.
    pub consecutive_failures: u32,
    /// First ejection time; doubled for every failed probe and every
    /// repeated ejection.
    pub base_ejection: Duration,
    /// Longest ejection time.
    pub max_ejection: Duration,
    /// Largest share of the instances ejected at once (at least one is
    /// always allowed).
    pub max_ejected_share: f64,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            max_ejected_share: 0.5,
        }
    }
}

impl OutlierDetection {
    /// No ejection: every instance the registry lists gets calls.
    pub fn disabled() -> Self {
        Self {
            consecutive_failures: 0,
            ..Self::default()
        }
    }

    fn enabled(&self) -> bool {
        self.consecutive_failures > 0
    }

    fn ejection_time(&self, ejections: u32) -> Duration {
        let factor = 1u32 << ejections.saturating_sub(1).min(16);
        self.base_ejection
            .saturating_mul(factor)
            .min(self.max_ejection)
            .max(Duration::from_millis(1))
    }
}

/// Which calls may be sent again, and how often (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    idempotent: Idempotent,
    max_attempts: u32,
    budget_ratio: f32,
    min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum Idempotent {
    None,
    All,
    Methods(Vec<String>),
}

impl Default for RetryPolicy {
    /// Transparent retries only (requests that never left), at most 3
    /// attempts per call, budget 20% + 10/s.
    fn default() -> Self {
        Self {
            idempotent: Idempotent::None,
            max_attempts: 3,
            budget_ratio: 0.2,
            min_per_second: 10,
        }
    }
}

impl RetryPolicy {
    /// No retries at all, not even of requests that never left.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// These methods are safe to run twice, so a failed call (a broken
    /// connection, `UNAVAILABLE`) is retried on another instance. Full gRPC
    /// paths (`/prod.v1.ProdService/GetProductStock`) or whole services
    /// (`/prod.v1.ProdService/`).
    pub fn idempotent_methods<S: Into<String>>(
        mut self,
        methods: impl IntoIterator<Item = S>,
    ) -> Self {
        let methods: Vec<String> = methods.into_iter().map(Into::into).collect();
        self.idempotent = Idempotent::Methods(methods);
        self
    }

    /// Every method is safe to run twice.
    pub fn all_idempotent(mut self) -> Self {
        self.idempotent = Idempotent::All;
        self
    }

    /// Attempts per call, the first included (default 3).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Retries may add `ratio` of the calls (over 10 s), plus
    /// `min_per_second` regardless (default 0.2 and 10).
    pub fn budget(mut self, ratio: f32, min_per_second: u32) -> Self {
        self.budget_ratio = ratio.clamp(0.0, 1000.0);
        self.min_per_second = min_per_second;
        self
    }

    fn is_idempotent(&self, path: &str) -> bool {
        match &self.idempotent {
            Idempotent::None => false,
            Idempotent::All => true,
            Idempotent::Methods(methods) => methods.iter().any(|m| {
                let m = m.strip_prefix('/').unwrap_or(m);
                let path = path.strip_prefix('/').unwrap_or(path);
                if m.ends_with('/') {
                    path.starts_with(m)
                } else {
                    path == m
                }
            }),
        }
    }
}

/// Options of a [`BalancedChannel`]; from [`RegistryClient::channel`] or
/// [`Resolver::channel`], finished with [`ChannelBuilder::build`].
#[must_use = "a channel builder does nothing until `build()`"]
pub struct ChannelBuilder {
    resolver: Resolver,
    options: Options,
    configure: Option<Configure>,
}

type Configure = Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>;

#[derive(Debug, Clone)]
struct Options {
    zone: Option<String>,
    zone_failover_share: f64,
    outlier: OutlierDetection,
    retry: RetryPolicy,
    wait_for_instances: bool,
    /// Ramp-up window of joining instances (`None`: off).
    slow_start: Option<Duration>,
}

impl fmt::Debug for ChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBuilder")
            .field("service", &self.resolver.service())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ChannelBuilder {
    pub(crate) fn new(resolver: Resolver, zone: Option<String>) -> Self {
        Self {
            resolver,
            options: Options {
                zone,
                zone_failover_share: 0.5,
                outlier: OutlierDetection::default(),
                retry: RetryPolicy::default(),
                wait_for_instances: false,
                slow_start: None,
            },
            configure: None,
        }
    }

    /// The caller's zone (overrides the client's); instances whose `zone`
    /// label matches get the calls while enough of them are ready.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.options.zone = Some(zone.into());
        self
    }

    /// No zone preference, whatever the client's zone.
    pub fn any_zone(mut self) -> Self {
        self.options.zone = None;
        self
    }

    /// Share of the local zone's weight that must be ready (not ejected)
    /// for calls to stay in the zone (default 0.5).
    pub fn zone_failover_share(mut self, share: f64) -> Self {
        self.options.zone_failover_share = share.clamp(0.0, 1.0);
        self
    }

    /// Outlier ejection settings.
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.options.outlier = outlier;
        self
    }

    /// Retry settings.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.options.retry = retry;
        self
    }

    /// Slow start: an instance that joins once the channel is running
    /// starts at 10% of its weight and ramps up linearly to all of it over
    /// `window` (see the module docs). Off by default; zero turns it off.
    pub fn slow_start(mut self, window: Duration) -> Self {
        self.options.slow_start = (!window.is_zero()).then_some(window);
        self
    }

    /// Calls to a known service with no live instance wait for one to
    /// appear (bounded only by the call's own deadline) instead of failing
    /// at once.
    pub fn wait_for_instances(mut self, wait: bool) -> Self {
        self.options.wait_for_instances = wait;
        self
    }

    /// Adjusts every instance's [`Endpoint`] (TLS, timeouts, window
    /// sizes...) before it is dialed. Addresses are dialed as
    /// `http://{address}`; give TLS here with `Endpoint::tls_config`.
    pub fn endpoint(
        mut self,
        configure: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(configure));
        self
    }

    /// The channel. Its background task (feeding it from the resolver and
    /// probing ejected instances) stops when every clone of the channel is
    /// dropped, and then drops its resolver (whose watch stops too unless
    /// shared). Must be called inside a tokio runtime.
    pub fn build(self) -> BalancedChannel {
        let service = describe(self.resolver.query());
        let (alive_tx, alive_rx) = watch::channel(());
        let (version, _) = watch::channel(0u64);
        let wake = Arc::new(Notify::new());
        let retry = &self.options.retry;
        let shared = Arc::new(Shared {
            service,
            budget: TpsBudget::new(BUDGET_TTL, retry.min_per_second, retry.budget_ratio),
            options: self.options,
            table: Mutex::new(Table::default()),
            version,
            wake: wake.clone(),
            counters: Counters::default(),
            _alive: alive_tx,
        });
        let rx = self.resolver.subscribe();
        let configure = self.configure;
        tokio::spawn(drive(
            Arc::downgrade(&shared),
            rx,
            alive_rx,
            wake,
            configure,
        ));
        drop(self.resolver);
        BalancedChannel { shared }
    }
}

fn describe(query: &Query) -> String {
    if query.selector.is_empty() {
        return query.service.clone();
    }
    let labels: Vec<String> = query
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{}{{{}}}", query.service, labels.join(","))
}

/// A channel to one service name, usable wherever a tonic `Channel` is
/// (`ProdServiceClient::new(channel)`). Cheap to clone; clones share the
/// instances, their connections and the statistics. See the module docs.
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
}

impl fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.shared.service)
            .finish_non_exhaustive()
    }
}

/// What a [`BalancedChannel`] has done so far, and its instances now.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    /// The service (and selector) the channel serves.
    pub service: String,
    /// Calls made through the channel.
    pub calls: u64,
    /// Attempts that failed on an instance (a retried call may count
    /// several, a call that succeeded on retry counts its failures too).
    pub failed_attempts: u64,
    /// Attempts made again on another instance.
    pub retries: u64,
    /// Ejections so far (every instance, every time).
    pub ejections: u64,
    /// True while every candidate is ejected and calls go to all of them.
    pub panic_mode: bool,
    /// The instances the channel knows now.
    pub endpoints: Vec<EndpointStats>,
}

impl ChannelStats {
    /// Instances ejected right now.
    pub fn ejected(&self) -> usize {
        self.endpoints.iter().filter(|e| e.ejected).count()
    }
}

/// One instance of [`ChannelStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    /// Instance id.
    pub id: String,
    /// Address dialed.
    pub address: String,
    /// Its `zone` label.
    pub zone: Option<String>,
    /// Its weight (0 counted as 1).
    pub weight: u32,
    /// Share of that weight it gets now, in percent: below 100 while it
    /// ramps up under [`ChannelBuilder::slow_start`].
    pub weight_percent: u32,
    /// Calls in flight on it now.
    pub in_flight: usize,
    /// Attempts sent to it.
    pub calls: u64,
    /// Of those, failed.
    pub failures: u64,
    /// Times it was ejected.
    pub ejections: u64,
    /// Ejected now.
    pub ejected: bool,
}

impl BalancedChannel {
    /// The service (and selector) this channel calls.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// Counters and the current instances, e.g. for a metrics endpoint.
    pub fn stats(&self) -> ChannelStats {
        let table = self.shared.table.lock().expect("balancer table poisoned");
        let c = &self.shared.counters;
        let now = Instant::now();
        let options = &self.shared.options;
        ChannelStats {
            service: self.shared.service.clone(),
            calls: c.calls.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            ejections: c.ejections.load(Ordering::Relaxed),
            panic_mode: table.panic,
            endpoints: table
                .endpoints
                .iter()
                .map(|e| EndpointStats {
                    id: e.id.clone(),
                    address: e.address.clone(),
                    zone: e.zone.clone(),
                    weight: e.weight,
                    weight_percent: (100.0 * effective_weight(e, options, now)
                        / f64::from(e.weight.max(1)))
                    .round() as u32,
                    in_flight: e.in_flight,
                    calls: e.calls,
                    failures: e.failures,
                    ejections: e.total_ejections,
                    ejected: e.ejected_until.is_some(),
                })
                .collect(),
        }
    }
}

impl Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    /// Always ready: the choice of instance (and any wait for one) happens
    /// per call, and each instance's own channel applies backpressure.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Feature `otel`: a client span per call, its context sent along;
        // `send` names the instance of each attempt on it.
        #[cfg(feature = "otel")]
        let (request, span) = {
            let mut request = request;
            let span = crate::trace::start_call(&self.shared.service, &mut request);
            (request, span)
        };
        let call = self.shared.clone().send(request);
        #[cfg(feature = "otel")]
        let call = crate::trace::finish_call(span, call);
        Box::pin(call)
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    failed_attempts: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
}

struct Shared {
    service: String,
    options: Options,
    /// A sync mutex: held for a pick or a report, never across an await.
    table: Mutex<Table>,
    /// Bumped whenever the table changes, to wake calls waiting for an
    /// instance.
    version: watch::Sender<u64>,
    /// Wakes the driver after a new ejection, to schedule its probe.
    wake: Arc<Notify>,
    budget: TpsBudget,
    counters: Counters,
    /// Dropped with the last channel clone: tells the driver to stop.
    _alive: watch::Sender<()>,
}

/// The instances and what the resolver last said.
#[derive(Debug, Default)]
struct Table {
    endpoints: Vec<Ep>,
    status: Option<ServiceStatus>,
    connected: bool,
    warming_up: bool,
    error: Option<String>,
    failed: bool,
    /// Every candidate ejected: routing over all of them.
    panic: bool,
    /// The registry has answered once: instances joining from now on
    /// slow-start.
    seeded: bool,
}

struct Ep {
    key: Key,
    id: String,
    address: String,
    zone: Option<String>,
    weight: u32,
    channel: Channel,
    /// When it joined, if it slow-starts.
    joined: Option<Instant>,
    in_flight: usize,
    consecutive_failures: u32,
    /// Set while ejected: when the next probe is due.
    ejected_until: Option<Instant>,
    probing: bool,
    /// Ejections in a row (grows the ejection time); reset after a quiet
    /// `max_ejection`.
    streak: u32,
    last_ejection: Option<Instant>,
    calls: u64,
    failures: u64,
    total_ejections: u64,
}

impl fmt::Debug for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ep")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("weight", &self.weight)
            .field("ejected_until", &self.ejected_until)
            .finish_non_exhaustive()
    }
}

/// The outcome of choosing an instance for an attempt.
enum Choice {
    Use {
        key: Key,
        id: String,
        address: String,
        channel: Channel,
    },
    Fail(Status),
    Wait,
}

impl Table {
    /// Chooses an instance for an attempt, skipping `tried`.
    fn choose(&mut self, options: &Options, service: &str, tried: &[Key]) -> Choice {
        if let Some(i) = pick(
            &self.endpoints,
            options,
            tried,
            &mut self.panic,
            service,
            &mut rand::rng(),
        ) {
            let ep = &mut self.endpoints[i];
            return Choice::Use {
                key: ep.key.clone(),
                id: ep.id.clone(),
                address: ep.address.clone(),
                channel: ep.channel.clone(),
            };
        }
        if !tried.is_empty() {
            return Choice::Fail(Status::unavailable(format!(
                "no other instance of service {service:?} to try"
            )));
        }
        if self.failed {
            return Choice::Fail(Status::unavailable(format!(
                "cannot resolve service {service:?}: {}",
                self.error.as_deref().unwrap_or("watch refused")
            )));
        }
        if self.warming_up {
            // A restarted registry is still being refilled: wait.
            return Choice::Wait;
        }
        match self.status {
            Some(ServiceStatus::Unknown) => Choice::Fail(Status::unavailable(format!(
                "service {service:?} is unknown to the registry: no instance has registered under this name since it started (a typo, or not deployed yet?)"
            ))),
            _ if !self.connected && self.error.is_some() => {
                Choice::Fail(Status::unavailable(format!(
                    "no live instance of service {service:?} known: {}",
                    self.error.as_deref().unwrap_or_default()
                )))
            }
            Some(ServiceStatus::Known) if !options.wait_for_instances => Choice::Fail(
                Status::unavailable(format!("service {service:?} has no live instances")),
            ),
            _ => Choice::Wait,
        }
    }

    fn find(&mut self, key: &Key) -> Option<&mut Ep> {
        self.endpoints.iter_mut().find(|e| &e.key == key)
    }
}

/// The selection rules of the module docs, over `endpoints` minus `tried`.
fn pick(
    endpoints: &[Ep],
    options: &Options,
    tried: &[Key],
    panic: &mut bool,
    service: &str,
    rng: &mut impl Rng,
) -> Option<usize> {
    let live: Vec<usize> = (0..endpoints.len())
        .filter(|&i| !tried.contains(&endpoints[i].key))
        .collect();
    if live.is_empty() {
        return None;
    }
    let mut ready: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| endpoints[i].ejected_until.is_none())
        .collect();
    let in_panic = ready.is_empty();
    // Only a first attempt says whether the whole set is ejected; a retry
    // looks at what is left after the instances it already tried.
    if tried.is_empty() && in_panic != *panic {
        *panic = in_panic;
        if in_panic {
            tracing::warn!(%service, instances = live.len(),
                "every instance is ejected; routing over all of them (panic mode)");
        } else {
            tracing::info!(%service, "instances ready again; panic mode over");
        }
    }
    if in_panic {
        ready = live;
    }
    // A retry goes wherever is ready: when the local zone is what is
    // failing, staying in it would spend the attempt on the same fault.
    let zone = options.zone.as_ref().filter(|_| tried.is_empty());
    let candidates = match zone {
        Some(zone) => {
            let weight = |e: &Ep| u64::from(e.weight.max(1));
            let local_total: u64 = endpoints
                .iter()
                .filter(|e| e.zone.as_deref() == Some(zone.as_str()))
                .map(weight)
                .sum();
            let local_ready: Vec<usize> = ready
                .iter()
                .copied()
                .filter(|&i| endpoints[i].zone.as_deref() == Some(zone.as_str()))
                .collect();
            let local_ready_weight: u64 = endpoints
                .iter()
                .filter(|e| e.zone.as_deref() == Some(zone.as_str()) && e.ejected_until.is_none())
                .map(weight)
                .sum();
            let enough = local_total > 0
                && (local_ready_weight as f64) >= options.zone_failover_share * local_total as f64;
            if enough && !local_ready.is_empty() {
                local_ready
            } else {
                ready
            }
        }
        None => ready,
    };
    Some(weighted_p2c(endpoints, &candidates, options, rng))
}

/// An instance's weight now: its registered weight (0 counted as 1),
/// scaled down while it slow-starts (see [`ChannelBuilder::slow_start`]).
fn effective_weight(ep: &Ep, options: &Options, now: Instant) -> f64 {
    let weight = f64::from(ep.weight.max(1));
    match (options.slow_start, ep.joined) {
        (Some(window), Some(joined)) => {
            let share = now.saturating_duration_since(joined).as_secs_f64() / window.as_secs_f64();
            weight * share.clamp(SLOW_START_MIN_SHARE, 1.0)
        }
        _ => weight,
    }
}

/// Weighted power of two choices over `candidates` (non-empty), by
/// effective weight.
fn weighted_p2c(
    endpoints: &[Ep],
    candidates: &[usize],
    options: &Options,
    rng: &mut impl Rng,
) -> usize {
    if candidates.len() == 1 {
        return candidates[0];
    }
    let now = Instant::now();
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&i| effective_weight(&endpoints[i], options, now))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut draw = || {
        let mut at = rng.random_range(0.0..total);
        for (&i, &w) in candidates.iter().zip(&weights) {
            if at < w {
                return i;
            }
            at -= w;
        }
        *candidates.last().expect("non-empty")
    };
    let (a, b) = (draw(), draw());
    let load =
        |i: usize| endpoints[i].in_flight as f64 / effective_weight(&endpoints[i], options, now);
    if load(b) < load(a) { b } else { a }
}

impl Shared {
    /// One call: choose, send, and on failure retry elsewhere when allowed.
    async fn send(
        self: Arc<Self>,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.budget.deposit();
        let (parts, body) = request.into_parts();
        let retry = &self.options.retry;
        let idempotent = retry.is_idempotent(parts.uri.path());
        let (replay, mut once) = if retry.max_attempts > 1 {
            match buffer(body) {
                Buffered::Complete(bytes) => (Some(bytes), None),
                Buffered::Streaming(body) => (None, Some(body)),
            }
        } else {
            (None, Some(body))
        };
        let mut tried: Vec<Key> = Vec::new();
        let mut version = self.version.subscribe();
        loop {
            let choice = self.table.lock().expect("balancer table poisoned").choose(
                &self.options,
                &self.service,
                &tried,
            );
            let (key, id, address, channel) = match choice {
                Choice::Use {
                    key,
                    id,
                    address,
                    channel,
                } => (key, id, address, channel),
                Choice::Fail(status) => return Err(Box::new(status)),
                Choice::Wait => {
                    if version.changed().await.is_err() {
                        return Err(Box::new(Status::unavailable(format!(
                            "balanced channel to {:?} closed",
                            self.service
                        ))));
                    }
                    continue;
                }
            };
            let body = match (&replay, once.take()) {
                (Some(bytes), _) => Body::new(http_body_util::Full::new(bytes.clone())),
                (None, Some(body)) => body,
                (None, None) => unreachable!("a streaming body is sent once"),
            };
            let attempt = rebuild(&parts, body);
            #[cfg(feature = "otel")]
            crate::trace::attempt(&id, &address, tried.len() + 1);
            self.started(&key);
            let result = channel.oneshot(attempt).await;
            let can_retry = |shared: &Shared, tried: &[Key]| {
                replay.is_some()
                    && tried.len() + 1 < retry.max_attempts as usize
                    && shared.has_other(tried)
            };
            match result {
                Ok(response) => {
                    let unavailable = grpc_status(&response) == Some(Code::Unavailable);
                    self.finished(&key, !unavailable);
                    if unavailable {
                        tried.push(key);
                        if idempotent && can_retry(&self, &tried) && self.budget.withdraw() {
                            self.counters.retries.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    return Ok(response);
                }
                Err(error) => {
                    self.finished(&key, false);
                    let never_sent = is_connect_error(&error);
                    tried.push(key);
                    if (never_sent || idempotent)
                        && can_retry(&self, &tried)
                        && self.budget.withdraw()
                    {
                        self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(service = %self.service, %id, %address,
                            error = %root_cause(&error), "attempt failed; retrying on another instance");
                        continue;
                    }
                    let status = Status::from_error(Box::new(error));
                    // A broken connection is "unavailable" whatever tonic
                    // calls it (a reset stream comes out as UNKNOWN), as
                    // gRPC's transports report it.
                    let code = match status.code() {
                        Code::Unknown => Code::Unavailable,
                        code => code,
                    };
                    return Err(Box::new(Status::new(
                        code,
                        format!(
                            "service {:?}, instance {id} at {address}: {}",
                            self.service,
                            flat(&status)
                        ),
                    )));
                }
            }
        }
    }

    fn has_other(&self, tried: &[Key]) -> bool {
        self.table
            .lock()
            .expect("balancer table poisoned")
            .endpoints
            .iter()
            .any(|e| !tried.contains(&e.key))
    }

    fn started(&self, key: &Key) {
        let mut table = self.table.lock().expect("balancer table poisoned");
        if let Some(ep) = table.find(key) {
            ep.in_flight += 1;
            ep.calls += 1;
        }
    }

    /// Records an attempt's outcome; ejects the instance after too many
    /// failures in a row.
    fn finished(&self, key: &Key, ok: bool) {
        if !ok {
            self.counters
                .failed_attempts
                .fetch_add(1, Ordering::Relaxed);
        }
        let outlier = &self.options.outlier;
        let now = Instant::now();
        let mut table = self.table.lock().expect("balancer table poisoned");
        let total = table.endpoints.len();
        let ejected_now = table
            .endpoints
            .iter()
            .filter(|e| e.ejected_until.is_some())
            .count();
        let Some(ep) = table.find(key) else { return };
        ep.in_flight = ep.in_flight.saturating_sub(1);
        if ok {
            ep.consecutive_failures = 0;
            if ep
                .last_ejection
                .is_some_and(|at| now.duration_since(at) > outlier.max_ejection)
            {
                ep.streak = 0;
            }
            return;
        }
        ep.failures += 1;
        ep.consecutive_failures += 1;
        if !outlier.enabled()
            || ep.ejected_until.is_some()
            || ep.consecutive_failures < outlier.consecutive_failures
        {
            return;
        }
        let cap = ((outlier.max_ejected_share * total as f64).floor() as usize).max(1);
        if ejected_now + 1 > cap {
            tracing::debug!(service = %self.service, id = %ep.id, address = %ep.address,
                ejected = ejected_now, cap, "instance failing but not ejected: too many already are");
            return;
        }
        ep.streak += 1;
        ep.total_ejections += 1;
        ep.last_ejection = Some(now);
        let time = outlier.ejection_time(ep.streak);
        ep.ejected_until = Some(now + time);
        tracing::warn!(service = %self.service, id = %ep.id, address = %ep.address,
            failures = ep.consecutive_failures, ejected_for = ?time,
            "instance ejected after consecutive failures; probing its address before sending calls again");
        drop(table);
        self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// A probe's verdict, from the probing task to the driver.
struct Probe {
    key: Key,
    answered: bool,
}

/// Mirrors the resolver into the table, and probes ejected instances, until
/// the channel is gone.
async fn drive(
    shared: Weak<Shared>,
    mut resolver: watch::Receiver<ResolverState>,
    mut alive: watch::Receiver<()>,
    wake: Arc<Notify>,
    configure: Option<Configure>,
) {
    let (probe_tx, mut probe_rx) = mpsc::channel::<Probe>(64);
    let mut dirty = true;
    loop {
        let next_probe = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if dirty {
                dirty = false;
                let state = resolver.borrow_and_update().clone();
                sync(&shared, &state, configure.as_ref());
            }
            start_probes(&shared, &probe_tx)
        };
        tokio::select! {
            changed = resolver.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
            }
            changed = alive.changed() => if changed.is_err() {
                tracing::debug!("balanced channel dropped; driver finished");
                return;
            },
            () = wake.notified() => {}
            Some(probe) = probe_rx.recv() => {
                let Some(shared) = shared.upgrade() else { return };
                probed(&shared, probe);
            }
            () = sleep_until_opt(next_probe) => {}
        }
    }
}

/// Starts a probe of every ejected instance whose time is up; returns when
/// the next one is due.
fn start_probes(shared: &Shared, probe_tx: &mpsc::Sender<Probe>) -> Option<Instant> {
    let now = Instant::now();
    let mut table = shared.table.lock().expect("balancer table poisoned");
    let mut next: Option<Instant> = None;
    for ep in &mut table.endpoints {
        let Some(until) = ep.ejected_until else {
            continue;
        };
        if ep.probing {
            continue;
        }
        if until > now {
            next = Some(next.map_or(until, |n| n.min(until)));
            continue;
        }
        ep.probing = true;
        let (key, address, tx) = (ep.key.clone(), ep.address.clone(), probe_tx.clone());
        tokio::spawn(async move {
            let answered = matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address))
                    .await,
                Ok(Ok(_))
            );
            let _ = tx.send(Probe { key, answered }).await;
        });
    }
    next
}

fn probed(shared: &Shared, probe: Probe) {
    let outlier = &shared.options.outlier;
    let mut table = shared.table.lock().expect("balancer table poisoned");
    let Some(ep) = table.find(&probe.key) else {
        return;
    };
    ep.probing = false;
    if ep.ejected_until.is_none() {
        return;
    }
    if probe.answered {
        ep.ejected_until = None;
        ep.consecutive_failures = 0;
        tracing::info!(service = %shared.service, id = %ep.id, address = %ep.address,
            "ejected instance answers again; back in rotation");
        drop(table);
        shared.version.send_modify(|v| *v += 1);
    } else {
        ep.streak += 1;
        let time = outlier.ejection_time(ep.streak);
        ep.ejected_until = Some(Instant::now() + time);
        tracing::debug!(service = %shared.service, id = %ep.id, address = %ep.address,
            next_probe_in = ?time, "ejected instance still does not answer");
    }
}

/// Brings the table in line with the resolver's view.
fn sync(shared: &Shared, state: &ResolverState, configure: Option<&Configure>) {
    let mut table = shared.table.lock().expect("balancer table poisoned");
    table.status = Some(state.status).filter(|s| *s != ServiceStatus::Pending);
    table.connected = state.connected;
    table.warming_up = state.warming_up;
    table.error = state.error.clone();
    table.failed = state.failed;
    // Draining and disabled instances are never served (the registry's
    // watch leaves them out already; this guards against a stale answer).
    let wanted: HashMap<Key, &crate::Instance> = state
        .instances
        .iter()
        .filter(|i| i.admin_state == AdminState::Active)
        .map(|i| ((i.id.clone(), i.address.clone()), i))
        .collect();
    let joined = (table.seeded && shared.options.slow_start.is_some()).then(Instant::now);
    table.endpoints.retain(|e| {
        let keep = wanted.contains_key(&e.key);
        if !keep {
            tracing::debug!(service = %shared.service, id = %e.id, address = %e.address, "balancer: remove");
        }
        keep
    });
    for (key, instance) in wanted {
        let zone = instance.zone().map(str::to_owned);
        if let Some(ep) = table.find(&key) {
            ep.weight = instance.weight.max(1);
            ep.zone = zone;
            continue;
        }
        let endpoint = match Endpoint::from_shared(format!("http://{}", instance.address)) {
            Ok(e) => {
                let e = e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
                match configure {
                    Some(f) => f(e),
                    None => e,
                }
            }
            Err(e) => {
                tracing::warn!(service = %shared.service, id = %instance.id, address = %instance.address,
                    error = %e, "balancer: instance address is not dialable; skipped");
                continue;
            }
        };
        tracing::debug!(service = %shared.service, id = %instance.id, address = %instance.address, "balancer: insert");
        table.endpoints.push(Ep {
            key,
            id: instance.id.clone(),
            address: instance.address.clone(),
            zone,
            weight: instance.weight.max(1),
            channel: endpoint.connect_lazy(),
            joined,
            in_flight: 0,
            consecutive_failures: 0,
            ejected_until: None,
            probing: false,
            streak: 0,
            last_ejection: None,
            calls: 0,
            failures: 0,
            total_ejections: 0,
        });
    }
    if table.status.is_some() {
        table.seeded = true;
    }
    drop(table);
    shared.version.send_modify(|v| *v += 1);
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The request again, around a new body.
fn rebuild(parts: &http::request::Parts, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

/// The `grpc-status` of a trailers-only response (an error answered
/// before any message), if any.
fn grpc_status(response: &http::Response<Body>) -> Option<Code> {
    let value = response.headers().get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(code))
}

/// True when the request never left: the connection could not be made.
fn is_connect_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

enum Buffered {
    /// The whole body, which can be sent any number of times.
    Complete(Bytes),
    /// A body still being produced (a client stream): sent once.
    Streaming(Body),
}

/// Takes the frames the body has ready right now. A unary request body is
/// complete at once (tonic encodes the one message when first polled); a
/// client stream is not, and is passed on with what was read put back in
/// front.
fn buffer(mut body: Body) -> Buffered {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut size = 0;
    loop {
        if body.is_end_stream() {
            break;
        }
        if size > MAX_REPLAY_BYTES {
            return Buffered::Streaming(Body::new(Prefixed { frames, rest: body }));
        }
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => break,
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // Request trailers cannot be replayed as bytes.
                    frames.push_back(frame);
                    return Buffered::Streaming(Body::new(Prefixed { frames, rest: body }));
                }
                size += frame.data_ref().map_or(0, Bytes::len);
                frames.push_back(frame);
            }
            Poll::Ready(Some(Err(status))) => {
                return Buffered::Streaming(Body::new(Prefixed {
                    frames,
                    rest: Body::new(Failed(Some(status))),
                }));
            }
            Poll::Pending => {
                return Buffered::Streaming(Body::new(Prefixed { frames, rest: body }));
            }
        }
    }
    let mut bytes = BytesMut::with_capacity(size);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Buffered::Complete(bytes.freeze())
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }
}

/// A body that fails once with the error its source failed with.
struct Failed(Option<Status>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn ep(id: &str, zone: Option<&str>, weight: u32) -> Ep {
        Ep {
            key: (id.to_owned(), format!("{id}:1")),
            id: id.to_owned(),
            address: format!("{id}:1"),
            zone: zone.map(str::to_owned),
            weight,
            channel: Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            joined: None,
            in_flight: 0,
            consecutive_failures: 0,
            ejected_until: None,
            probing: false,
            streak: 0,
            last_ejection: None,
            calls: 0,
            failures: 0,
            total_ejections: 0,
        }
    }

    fn options(zone: Option<&str>) -> Options {
        Options {
            zone: zone.map(str::to_owned),
            zone_failover_share: 0.5,
            outlier: OutlierDetection::default(),
            retry: RetryPolicy::default(),
            wait_for_instances: false,
            slow_start: None,
        }
    }

    fn shares(endpoints: &[Ep], options: &Options, n: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0; endpoints.len()];
        let mut panic = false;
        for _ in 0..n {
            let i = pick(endpoints, options, &[], &mut panic, "s", &mut rng).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[tokio::test]
    async fn sequential_picks_split_by_weight() {
        let eps = vec![ep("a", None, 1), ep("b", None, 3)];
        let c = shares(&eps, &options(None), 10_000);
        let b = c[1] as f64 / 10_000.0;
        assert!((0.73..=0.77).contains(&b), "{c:?}");
    }

    #[tokio::test]
    async fn load_steers_away_from_a_busy_instance() {
        let mut eps = vec![ep("a", None, 1), ep("b", None, 1)];
        eps[0].in_flight = 10;
        let c = shares(&eps, &options(None), 1000);
        // b wins every draw that includes it: 3/4 of the pairs.
        assert!(c[1] > 700, "{c:?}");
    }

    #[tokio::test]
    async fn ejected_instances_get_nothing_until_every_one_is() {
        let mut eps = vec![ep("a", None, 1), ep("b", None, 1), ep("c", None, 1)];
        eps[1].ejected_until = Some(Instant::now());
        let c = shares(&eps, &options(None), 1000);
        assert_eq!(c[1], 0, "{c:?}");
        for e in &mut eps {
            e.ejected_until = Some(Instant::now());
        }
        let mut panic = false;
        let mut rng = StdRng::seed_from_u64(1);
        assert!(pick(&eps, &options(None), &[], &mut panic, "s", &mut rng).is_some());
        assert!(panic, "all ejected: panic mode routes over all");
    }

    #[tokio::test]
    async fn zone_preference_and_failover() {
        let mut eps = vec![
            ep("a1", Some("a"), 1),
            ep("a2", Some("a"), 1),
            ep("b1", Some("b"), 1),
            ep("x", None, 1),
        ];
        let o = options(Some("a"));
        let c = shares(&eps, &o, 1000);
        assert_eq!(c[2] + c[3], 0, "all local while healthy: {c:?}");
        // Half the local weight ready: still local (share 0.5).
        eps[0].ejected_until = Some(Instant::now());
        let c = shares(&eps, &o, 1000);
        assert_eq!(c[1], 1000, "{c:?}");
        // Below the share: spread over every ready instance, by weight.
        eps[1].ejected_until = Some(Instant::now());
        let c = shares(&eps, &o, 1000);
        assert_eq!(c[0] + c[1], 0, "{c:?}");
        assert!(c[2] > 400 && c[3] > 400, "{c:?}");
        // With a third local one, one ejected of three stays local; the
        // survivors share with remote ones once below half.
        eps[1].ejected_until = None;
        eps.push(ep("a3", Some("a"), 1));
        let c = shares(&eps, &o, 1000);
        assert_eq!(c[1] + c[4], 1000, "{c:?}");
    }

    /// A joining instance starts at 10% of its weight and reaches all of
    /// it after the window; the ones present from the start are not slowed.
    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_a_joining_instance_up() {
        let o = Options {
            slow_start: Some(Duration::from_secs(10)),
            ..options(None)
        };
        let mut eps = vec![ep("old", None, 1), ep("new", None, 1)];
        eps[1].joined = Some(Instant::now());
        let share = |eps: &[Ep]| shares(eps, &o, 10_000)[1] as f64 / 10_000.0;
        // Weights 1 : 0.1 -> 1/11 of the draws; p2c on an idle pair keeps
        // the first draw, so the split follows the weights.
        let at_start = share(&eps);
        assert!((0.07..=0.11).contains(&at_start), "{at_start}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let half = share(&eps);
        assert!((0.30..=0.37).contains(&half), "1 : 0.5 -> 1/3: {half}");
        tokio::time::advance(Duration::from_secs(6)).await;
        let full = share(&eps);
        assert!((0.47..=0.53).contains(&full), "{full}");
        let off = shares(&eps, &options(None), 10_000)[1] as f64 / 10_000.0;
        assert!((0.47..=0.53).contains(&off), "without slow start: {off}");
    }

    #[test]
    fn idempotent_method_matching() {
        let r = RetryPolicy::default()
            .idempotent_methods(["/prod.v1.ProdService/GetProductStock", "/other.Svc/"]);
        assert!(r.is_idempotent("/prod.v1.ProdService/GetProductStock"));
        assert!(!r.is_idempotent("/prod.v1.ProdService/SetProductStock"));
        assert!(r.is_idempotent("/other.Svc/Anything"));
        assert!(!RetryPolicy::default().is_idempotent("/other.Svc/Anything"));
        assert!(
            RetryPolicy::default()
                .all_idempotent()
                .is_idempotent("/x.Y/Z")
        );
    }

    #[test]
    fn ejection_time_grows_to_the_cap() {
        let o = OutlierDetection::default();
        assert_eq!(o.ejection_time(1), Duration::from_secs(1));
        assert_eq!(o.ejection_time(2), Duration::from_secs(2));
        assert_eq!(o.ejection_time(3), Duration::from_secs(4));
        assert_eq!(o.ejection_time(40), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn unary_bodies_are_buffered_and_streams_passed_on() {
        let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        match buffer(body) {
            Buffered::Complete(b) => assert_eq!(&b[..], b"hello"),
            Buffered::Streaming(_) => panic!("a full body is complete"),
        }
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let stream =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        match buffer(Body::new(stream)) {
            Buffered::Complete(_) => panic!("an open stream is not complete"),
            Buffered::Streaming(mut body) => {
                use http_body_util::BodyExt;
                let first = body.frame().await.unwrap().unwrap();
                assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"one"));
                tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
                    .await
                    .unwrap();
                drop(tx);
                let second = body.frame().await.unwrap().unwrap();
                assert_eq!(second.into_data().unwrap(), Bytes::from_static(b"two"));
                assert!(body.frame().await.is_none());
            }
        }
    }
}
