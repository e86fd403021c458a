//! The catalog as a model: instances keyed by (service, id), which lease
//! holds which, and an order-independent hash per service so a watcher's
//! state can be compared with the model's at every revision cheaply.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
};

use registry_api::v1::{DeleteReason, Event, EventType, Instance};

/// (service, id).
pub type Key = (String, String);

/// An instance as a client can compare it: every field the server returns
/// except `lease_remaining_ms` (never requested here).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inst {
    pub service: String,
    pub id: String,
    pub address: String,
    pub metadata: BTreeMap<String, String>,
    pub weight: u32,
    pub lease_id: u64,
    pub revision: u64,
}

impl Inst {
    /// From the wire; `weight` 0 is stored as 1 by the server.
    pub fn from_pb(i: &Instance) -> Self {
        Self {
            service: i.service.clone(),
            id: i.id.clone(),
            address: i.address.clone(),
            metadata: i
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            weight: i.weight.max(1),
            lease_id: i.lease_id,
            revision: i.revision,
        }
    }

    pub fn key(&self) -> Key {
        (self.service.clone(), self.id.clone())
    }

    /// Stable within one process (SipHash with fixed keys).
    pub fn hash64(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

impl fmt::Display for Inst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {} lease={} rev={} weight={} meta={:?}",
            self.service,
            self.id,
            self.address,
            self.lease_id,
            self.revision,
            self.weight,
            self.metadata
        )
    }
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EvKind {
    Put,
    Delete(DeleteReason),
}

/// An event as a client can compare it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ev {
    pub kind: EvKind,
    pub inst: Inst,
}

impl Ev {
    pub fn from_pb(e: &Event) -> Self {
        let inst = Inst::from_pb(e.instance.as_ref().unwrap_or(&Instance::default()));
        let kind = match e.r#type() {
            EventType::Put => EvKind::Put,
            _ => EvKind::Delete(e.reason()),
        };
        Self { kind, inst }
    }

    /// Sort key inside one revision (events of one revision have no order
    /// a client may rely on beyond "together").
    pub fn sort_key(&self) -> (Key, EvKind) {
        (self.inst.key(), self.kind)
    }
}

impl fmt::Display for Ev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EvKind::Put => write!(f, "PUT {}", self.inst),
            EvKind::Delete(r) => write!(f, "DELETE({}) {}", r.as_str_name(), self.inst),
        }
    }
}

/// A set of instances with its order-independent hash (XOR of the
/// instances' hashes): what a watcher holds, or one filter of the model.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub map: BTreeMap<Key, Inst>,
    pub hash: u64,
}

impl View {
    pub fn put(&mut self, inst: Inst) {
        self.hash ^= inst.hash64();
        if let Some(prev) = self.map.insert(inst.key(), inst) {
            self.hash ^= prev.hash64();
        }
    }

    pub fn delete(&mut self, key: &Key) -> Option<Inst> {
        let prev = self.map.remove(key)?;
        self.hash ^= prev.hash64();
        Some(prev)
    }

    pub fn from_instances(instances: impl IntoIterator<Item = Inst>) -> Self {
        let mut v = Self::default();
        for i in instances {
            v.put(i);
        }
        v
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// The catalog at [`Model::revision`].
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub revision: u64,
    all: View,
    services: HashMap<String, View>,
    leases: HashMap<u64, BTreeSet<Key>>,
}

impl Model {
    /// The state a snapshot at `revision` showed.
    pub fn new(revision: u64, instances: impl IntoIterator<Item = Inst>) -> Self {
        let mut m = Self {
            revision,
            ..Self::default()
        };
        for i in instances {
            m.put(i);
        }
        m
    }

    fn put(&mut self, inst: Inst) {
        if let Some(prev) = self.all.map.get(&inst.key()) {
            let prev_lease = prev.lease_id;
            if let Some(set) = self.leases.get_mut(&prev_lease) {
                set.remove(&inst.key());
                if set.is_empty() {
                    self.leases.remove(&prev_lease);
                }
            }
        }
        self.leases
            .entry(inst.lease_id)
            .or_default()
            .insert(inst.key());
        self.services
            .entry(inst.service.clone())
            .or_default()
            .put(inst.clone());
        self.all.put(inst);
    }

    fn delete(&mut self, key: &Key) -> Option<Inst> {
        let prev = self.all.delete(key)?;
        if let Some(v) = self.services.get_mut(&key.0) {
            v.delete(key);
        }
        if let Some(set) = self.leases.get_mut(&prev.lease_id) {
            set.remove(key);
            if set.is_empty() {
                self.leases.remove(&prev.lease_id);
            }
        }
        Some(prev)
    }

    /// Applies the events of `revision` (above the current one). An event
    /// that does not fit the state (a PUT labelled with another revision, a
    /// DELETE of an instance that is not there or differs from the one
    /// stored) is an error; the state is still updated as far as possible.
    pub fn apply(&mut self, revision: u64, events: &[Ev]) -> Result<(), String> {
        let mut problems = Vec::new();
        if revision <= self.revision {
            problems.push(format!(
                "revision {revision} is not above the previous one {}",
                self.revision
            ));
        }
        for e in events {
            match e.kind {
                EvKind::Put => {
                    if e.inst.revision != revision {
                        problems.push(format!(
                            "{e} is labelled revision {}, not {revision}",
                            e.inst.revision
                        ));
                    }
                    self.put(e.inst.clone());
                }
                EvKind::Delete(_) => match self.delete(&e.inst.key()) {
                    None => problems.push(format!("{e}: no such instance in the state before")),
                    Some(prev) if prev != e.inst => {
                        problems.push(format!("{e}: the instance before was {prev}"))
                    }
                    Some(_) => {}
                },
            }
        }
        self.revision = revision;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The view of one service, or of all (`""`).
    pub fn view(&self, service: &str) -> Option<&View> {
        if service.is_empty() {
            Some(&self.all)
        } else {
            self.services.get(service)
        }
    }

    /// Hash of [`Model::view`] (0 for an empty view).
    pub fn hash(&self, service: &str) -> u64 {
        self.view(service).map_or(0, |v| v.hash)
    }

    /// Instances of a service (`""`: all).
    pub fn count(&self, service: &str) -> usize {
        self.view(service).map_or(0, View::len)
    }

    /// Services with at least one instance, with their counts.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        self.services
            .iter()
            .filter(|(_, v)| v.len() > 0)
            .map(|(s, v)| (s.as_str(), v.len()))
            .collect()
    }

    /// The instances a lease holds (empty: none, or an unknown lease).
    pub fn lease_members(&self, lease: u64) -> BTreeSet<Key> {
        self.leases.get(&lease).cloned().unwrap_or_default()
    }

    /// Every lease holding at least one instance.
    pub fn leases(&self) -> impl Iterator<Item = u64> + '_ {
        self.leases.keys().copied()
    }

    pub fn get(&self, key: &Key) -> Option<&Inst> {
        self.all.map.get(key)
    }
}

/// A short, precise difference between what the model holds and what an
/// answer held: counts, then the first few missing, extra and changed
/// instances.
pub fn diff(expected: &BTreeMap<Key, Inst>, actual: &[Inst]) -> String {
    let actual_map: BTreeMap<Key, &Inst> = actual.iter().map(|i| (i.key(), i)).collect();
    let missing: Vec<&Inst> = expected
        .iter()
        .filter(|(k, _)| !actual_map.contains_key(*k))
        .map(|(_, v)| v)
        .collect();
    let extra: Vec<&&Inst> = actual_map
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .map(|(_, v)| v)
        .collect();
    let changed: Vec<(&Inst, &&Inst)> = expected
        .iter()
        .filter_map(|(k, e)| actual_map.get(k).filter(|a| **a != e).map(|a| (e, a)))
        .collect();
    let mut out = format!(
        "expected {} instances, got {} ({} missing, {} extra, {} changed{})",
        expected.len(),
        actual.len(),
        missing.len(),
        extra.len(),
        changed.len(),
        if actual_map.len() != actual.len() {
            format!(", {} duplicated", actual.len() - actual_map.len())
        } else {
            String::new()
        }
    );
    const SHOW: usize = 3;
    for m in missing.iter().take(SHOW) {
        out.push_str(&format!("\n      missing: {m}"));
    }
    for x in extra.iter().take(SHOW) {
        out.push_str(&format!("\n      extra:   {x}"));
    }
    for (e, a) in changed.iter().take(SHOW) {
        out.push_str(&format!("\n      expected {e}\n      got      {a}"));
    }
    out
}
