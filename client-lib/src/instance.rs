//! The client's own view of instances and server info, decoupled from the
//! generated protobuf types so the public API does not change with codegen.

use std::collections::BTreeMap;

use registry_api::v1 as pb;
use std::time::Duration;

/// Metadata label holding an instance's zone (as Kubernetes'
/// `topology.kubernetes.io/zone`, shortened): balanced channels prefer
/// instances whose zone is the caller's, and the xDS server makes one
/// locality per value.
pub const ZONE_LABEL: &str = "zone";

/// One addressable copy of a service: what a service registers about itself
/// and what resolvers hand to callers.
///
/// Build one with [`Instance::new`] and the `with_*` methods; the id defaults
/// to a value unique to this process (`hostname-pid-random`), so two copies of
/// a service on one host never replace each other by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Service name, e.g. `prod`.
    pub service: String,
    /// Unique within the service; registering the same id again replaces it.
    pub id: String,
    /// `host:port` callers dial.
    pub address: String,
    /// Free-form labels (version, zone...) that selectors match.
    pub metadata: BTreeMap<String, String>,
    /// Relative load-balancing weight (0 is stored as 1 by the registry).
    pub weight: u32,
    /// Output only: the lease the instance lives under (0 before registering).
    pub lease_id: u64,
    /// Output only: the catalog revision at which it was last put.
    pub revision: u64,
    /// Output only: time left on its lease, when asked for
    /// ([`crate::ResolveBuilder::with_lease_ttl`]).
    pub lease_remaining: Option<Duration>,
    /// Output only: its health from the registry's checks (`Passing`
    /// without a check).
    pub health: HealthState,
    /// Output only: the last check result the registry recorded.
    pub last_check: Option<CheckResult>,
    /// `Active`, `Draining` or `Disabled` (maintenance); see
    /// [`crate::Registration::drain`]. Registering with `Draining` or
    /// `Disabled` registers the instance out of rotation.
    pub admin_state: AdminState,
    /// Why it is draining or disabled.
    pub admin_reason: String,
    /// The health check the registry runs against it, if any
    /// ([`Instance::with_check`]).
    pub check: Option<HealthCheck>,
}

/// An instance's health, from the checks the registry runs (see
/// [`HealthCheck`]). `Passing` and `Warning` instances are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HealthState {
    /// The last checks passed, or the instance has no check.
    #[default]
    Passing,
    /// Serving, with a warning (an HTTP check answered 429).
    Warning,
    /// Failing its checks: callers are not sent to it (unless its service
    /// is in panic mode).
    Critical,
}

impl HealthState {
    /// Lower-case name, as regctl prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthState::Passing => "passing",
            HealthState::Warning => "warning",
            HealthState::Critical => "critical",
        }
    }

    fn from_pb(v: i32) -> Self {
        match pb::HealthState::try_from(v) {
            Ok(pb::HealthState::Warning) => HealthState::Warning,
            Ok(pb::HealthState::Critical) => HealthState::Critical,
            _ => HealthState::Passing,
        }
    }

    fn to_pb(self) -> pb::HealthState {
        match self {
            HealthState::Passing => pb::HealthState::Passing,
            HealthState::Warning => pb::HealthState::Warning,
            HealthState::Critical => pb::HealthState::Critical,
        }
    }
}

/// What the instance's owner or an operator wants for it, whatever its
/// health: only `Active` instances are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AdminState {
    /// In rotation (if healthy).
    #[default]
    Active,
    /// Going away: callers move off (graceful shutdown, [`crate::Shutdown`]).
    Draining,
    /// Maintenance: out of rotation until set active again.
    Disabled,
}

impl AdminState {
    /// Lower-case name, as regctl prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    pub(crate) fn from_pb(v: i32) -> Self {
        match pb::AdminState::try_from(v) {
            Ok(pb::AdminState::Draining) => AdminState::Draining,
            Ok(pb::AdminState::Disabled) => AdminState::Disabled,
            _ => AdminState::Active,
        }
    }

    pub(crate) fn to_pb(self) -> pb::AdminState {
        match self {
            AdminState::Active => pb::AdminState::Active,
            AdminState::Draining => pb::AdminState::Draining,
            AdminState::Disabled => pb::AdminState::Disabled,
        }
    }
}

/// A check result the registry recorded on an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// When it ran.
    pub at: std::time::SystemTime,
    /// What it said.
    pub output: String,
}

/// The kind of a [`HealthCheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckKind {
    /// grpc.health.v1 `Check` of this service name (`""`: the whole
    /// server); SERVING passes.
    Grpc {
        /// The service name asked about.
        service: String,
    },
    /// HTTP/1.1 GET of this path: 2xx passes, 429 warns, anything else
    /// fails (redirects are not followed).
    Http {
        /// Path and query, starting with `/`.
        path: String,
    },
    /// A TCP connect.
    Tcp,
}

/// A health check the registry runs against an instance, every
/// `interval`: build one with [`HealthCheck::grpc`], [`HealthCheck::http`]
/// or [`HealthCheck::tcp`] and give it to [`Instance::with_check`]. Unset
/// settings take the registry's defaults (interval 10 s, timeout the
/// interval up to 5 s, 3 failures before critical, 1 success before
/// passing, initially critical); the registry stores the check with them
/// filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What to check.
    pub kind: CheckKind,
    /// `host:port` to check instead of the instance's own address.
    pub address: Option<String>,
    /// Time between checks.
    pub interval: Option<Duration>,
    /// Time one check may take.
    pub timeout: Option<Duration>,
    /// Failed checks in a row before a serving instance turns critical.
    pub failures_before_critical: Option<u32>,
    /// Passing checks in a row before a critical instance serves again.
    pub successes_before_passing: Option<u32>,
    /// State before the first result.
    pub initial_state: Option<HealthState>,
}

impl HealthCheck {
    fn new(kind: CheckKind) -> Self {
        Self {
            kind,
            address: None,
            interval: None,
            timeout: None,
            failures_before_critical: None,
            successes_before_passing: None,
            initial_state: None,
        }
    }

    /// A grpc.health.v1 check of `service` (`""` for the whole server),
    /// what a tonic server with `tonic-health` answers.
    pub fn grpc(service: impl Into<String>) -> Self {
        Self::new(CheckKind::Grpc {
            service: service.into(),
        })
    }

    /// An HTTP GET of `path`.
    pub fn http(path: impl Into<String>) -> Self {
        Self::new(CheckKind::Http { path: path.into() })
    }

    /// A TCP connect.
    pub fn tcp() -> Self {
        Self::new(CheckKind::Tcp)
    }

    /// Checks `host:port` instead of the instance's address.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Time between checks.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Time one check may take, connecting included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Failed checks in a row before a serving instance turns critical.
    pub fn failures_before_critical(mut self, n: u32) -> Self {
        self.failures_before_critical = Some(n);
        self
    }

    /// Passing checks in a row before a critical instance serves again.
    pub fn successes_before_passing(mut self, n: u32) -> Self {
        self.successes_before_passing = Some(n);
        self
    }

    /// State before the first result (default critical).
    pub fn initial_state(mut self, state: HealthState) -> Self {
        self.initial_state = Some(state);
        self
    }

    pub(crate) fn to_pb(&self) -> pb::HealthCheck {
        use pb::health_check::Kind;
        let address = self.address.clone().unwrap_or_default();
        let ms =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        pb::HealthCheck {
            kind: Some(match &self.kind {
                CheckKind::Grpc { service } => Kind::Grpc(pb::GrpcCheck {
                    service: service.clone(),
                    address,
                }),
                CheckKind::Http { path } => Kind::Http(pb::HttpCheck {
                    path: path.clone(),
                    address,
                }),
                CheckKind::Tcp => Kind::Tcp(pb::TcpCheck { address }),
            }),
            interval_ms: ms(self.interval),
            timeout_ms: ms(self.timeout),
            failures_before_critical: self.failures_before_critical.unwrap_or(0),
            successes_before_passing: self.successes_before_passing.unwrap_or(0),
            initial_state: self.initial_state.map(|s| s.to_pb() as i32),
        }
    }

    fn from_pb(p: pb::HealthCheck) -> Option<Self> {
        use pb::health_check::Kind;
        let (kind, address) = match p.kind? {
            Kind::Grpc(g) => (CheckKind::Grpc { service: g.service }, g.address),
            Kind::Http(h) => (CheckKind::Http { path: h.path }, h.address),
            Kind::Tcp(t) => (CheckKind::Tcp, t.address),
        };
        let nonzero = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Some(Self {
            kind,
            address: (!address.is_empty()).then_some(address),
            interval: nonzero(p.interval_ms),
            timeout: nonzero(p.timeout_ms),
            failures_before_critical: (p.failures_before_critical > 0)
                .then_some(p.failures_before_critical),
            successes_before_passing: (p.successes_before_passing > 0)
                .then_some(p.successes_before_passing),
            initial_state: p.initial_state.map(HealthState::from_pb),
        })
    }
}

impl Instance {
    /// An instance of `service` reachable at `address` (`host:port`), with a
    /// generated unique id, no metadata and weight 1.
    pub fn new(service: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            id: generate_id(),
            address: address.into(),
            metadata: BTreeMap::new(),
            weight: 1,
            lease_id: 0,
            revision: 0,
            lease_remaining: None,
            health: HealthState::Passing,
            last_check: None,
            admin_state: AdminState::Active,
            admin_reason: String::new(),
            check: None,
        }
    }

    /// Has the registry check this instance (see [`HealthCheck`]): it is
    /// served only while the check passes, so a process that is alive but
    /// cannot serve leaves callers' balancers within a few intervals.
    pub fn with_check(mut self, check: HealthCheck) -> Self {
        self.check = Some(check);
        self
    }

    /// Whether the registry sends callers to it: active, and passing or
    /// warning (its service's panic mode aside).
    pub fn serving(&self) -> bool {
        self.admin_state == AdminState::Active && self.health != HealthState::Critical
    }

    /// Uses `id` instead of the generated one, e.g. a stable pod name.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Adds one metadata label.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the load-balancing weight: an instance of weight 3 gets three
    /// times the calls of one of weight 1 from balanced channels (0 is
    /// stored as 1). Registering again with another weight changes it live.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the `zone` label, which balanced channels match against the
    /// caller's zone and the xDS server turns into a locality.
    pub fn with_zone(self, zone: impl Into<String>) -> Self {
        self.with_metadata(ZONE_LABEL, zone)
    }

    /// The `zone` label, if any.
    pub fn zone(&self) -> Option<&str> {
        self.metadata.get(ZONE_LABEL).map(String::as_str)
    }

    pub(crate) fn to_pb(&self) -> pb::Instance {
        pb::Instance {
            service: self.service.clone(),
            id: self.id.clone(),
            address: self.address.clone(),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            weight: self.weight,
            lease_id: 0,
            revision: 0,
            lease_remaining_ms: 0,
            health: 0,
            last_check: None,
            admin_state: self.admin_state.to_pb() as i32,
            admin_reason: self.admin_reason.clone(),
            check: self.check.as_ref().map(|c| Box::new(c.to_pb())),
        }
    }
}

impl From<pb::Instance> for Instance {
    fn from(p: pb::Instance) -> Self {
        Self {
            service: p.service,
            id: p.id,
            address: p.address,
            metadata: p.metadata.into_iter().collect(),
            weight: p.weight,
            lease_id: p.lease_id,
            revision: p.revision,
            lease_remaining: (p.lease_remaining_ms > 0)
                .then(|| Duration::from_millis(p.lease_remaining_ms)),
            health: HealthState::from_pb(p.health),
            last_check: p.last_check.map(|c| CheckResult {
                at: std::time::UNIX_EPOCH + Duration::from_millis(c.unix_ms),
                output: c.output,
            }),
            admin_state: AdminState::from_pb(p.admin_state),
            admin_reason: p.admin_reason,
            check: p.check.and_then(|c| HealthCheck::from_pb(*c)),
        }
    }
}

/// Who answered: lets callers notice a restarted (still empty) registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerInfo {
    /// Changes every time the registry starts; revisions restart with it.
    pub epoch: u64,
    /// The server life lease ids belong to: `epoch`, unless the registry
    /// restored its leases from disk after a restart (`--data-dir`), in which
    /// case the leases of the previous life are still valid.
    pub lease_epoch: u64,
    /// True while services are still re-registering after a start: an empty
    /// answer then is not proof that nothing is alive.
    pub warming_up: bool,
    /// Time left in that warm-up window.
    pub warmup_remaining: Duration,
    /// True when the answering node of a registry cluster has lost etcd:
    /// the answer is its last known catalog and may miss recent changes.
    pub stale: bool,
}

impl From<Option<pb::ServerInfo>> for ServerInfo {
    fn from(p: Option<pb::ServerInfo>) -> Self {
        p.map(|p| Self {
            epoch: p.epoch,
            lease_epoch: if p.lease_epoch == 0 {
                p.epoch
            } else {
                p.lease_epoch
            },
            warming_up: p.warming_up,
            warmup_remaining: Duration::from_millis(p.warmup_remaining_ms),
            stale: p.stale,
        })
        .unwrap_or_default()
    }
}

/// The answer to a one-shot [`crate::RegistryClient::resolve`].
#[derive(Debug, Clone)]
pub struct Resolution {
    /// Live instances, ordered by id.
    pub instances: Vec<Instance>,
    /// False when the name never had an instance since the registry started
    /// ("unknown service"), as opposed to "known, zero live instances".
    pub service_known: bool,
    /// Catalog revision the answer reflects.
    pub revision: u64,
    /// Which registry life answered, and whether it is still warming up.
    pub server: ServerInfo,
    /// The service is in panic mode: fewer than its panic threshold of its
    /// active instances are serving, so every active one was answered,
    /// critical ones included (see [`crate::ResolveBuilder`]).
    pub panicked: bool,
}

/// `hostname-pid-random`: readable in logs, unique across restarts and
/// across several copies in one process.
fn generate_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    // Ids are printable ASCII: keep the hostname to that alphabet.
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_printable() {
        let a = Instance::new("prod", "127.0.0.1:1");
        let b = Instance::new("prod", "127.0.0.1:1");
        assert_ne!(a.id, b.id);
        assert!(a.id.chars().all(|c| c.is_ascii_graphic()), "{}", a.id);
        assert!(a.id.contains(&std::process::id().to_string()));
    }

    #[test]
    fn round_trips_through_protobuf() {
        let a = Instance::new("prod", "127.0.0.1:1")
            .with_id("x")
            .with_metadata("version", "1")
            .with_weight(3)
            .with_check(
                HealthCheck::http("/healthz")
                    .interval(Duration::from_secs(2))
                    .failures_before_critical(2)
                    .initial_state(HealthState::Passing),
            );
        let back = Instance::from(a.to_pb());
        assert_eq!(a, back);
        let mut drained = a.clone();
        drained.admin_state = AdminState::Draining;
        drained.admin_reason = "deploy".into();
        assert_eq!(Instance::from(drained.to_pb()), drained);
        assert!(!drained.serving() && a.serving());
    }
}
