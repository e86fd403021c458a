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
        }
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
            .with_weight(3);
        let back = Instance::from(a.to_pb());
        assert_eq!(a, back);
    }
}
