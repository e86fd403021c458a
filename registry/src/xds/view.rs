//! What one computation of xDS responses reads: service snapshots, each
//! read once and filtered by the subscriber's read permission, and the
//! highest revision they reflect. Shared by the state-of-the-world and
//! delta protocol machines, which add their own methods.

use std::{collections::HashMap, sync::Arc};

use super::{LoadAssignmentCache, ReadCheck};
use crate::{catalog::ServiceSnapshot, core::Registry};

/// One computation of responses: snapshot reads shared by the types.
pub(super) struct Ctx<'a> {
    pub(super) registry: &'a Registry,
    pub(super) cache: &'a LoadAssignmentCache,
    pub(super) may_read: &'a ReadCheck,
    pub(super) snapshots: HashMap<Arc<str>, Option<Arc<ServiceSnapshot>>>,
    /// Highest revision any read reflects: the response version.
    pub(super) revision: u64,
    pub(super) warming: bool,
    /// Something was withheld for warm-up.
    pub(super) held: bool,
}

impl<'a> Ctx<'a> {
    /// A computation starting at the catalog's current revision.
    pub(super) fn new(
        registry: &'a Registry,
        cache: &'a LoadAssignmentCache,
        may_read: &'a ReadCheck,
        warming: bool,
    ) -> Self {
        Self {
            registry,
            cache,
            may_read,
            snapshots: HashMap::new(),
            revision: registry.catalog().revision(),
            warming,
            held: false,
        }
    }

    /// The service's snapshot if the subscriber may see it.
    pub(super) fn snapshot(&mut self, name: &Arc<str>) -> Option<Arc<ServiceSnapshot>> {
        if let Some(s) = self.snapshots.get(name) {
            return s.clone();
        }
        let snap = if (self.may_read)(name) {
            let (snap, revision) = self.registry.catalog().resolve(name);
            self.revision = self.revision.max(revision);
            snap
        } else {
            None
        };
        self.snapshots.insert(name.clone(), snap.clone());
        snap
    }

    /// Whether the service has live instances the subscriber may see.
    pub(super) fn live(&mut self, name: &Arc<str>) -> bool {
        self.snapshot(name).is_some_and(|s| !s.is_empty())
    }

    /// Every live service, for wildcard subscriptions.
    pub(super) fn live_services(&mut self) -> Vec<Arc<str>> {
        let (services, revision) = self.registry.catalog().list_services();
        self.revision = self.revision.max(revision);
        services
            .into_iter()
            .filter(|(name, n)| *n > 0 && (self.may_read)(name))
            .map(|(name, _)| name)
            .collect()
    }
}
