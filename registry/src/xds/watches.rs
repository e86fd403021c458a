//! The catalog watchers behind one ADS stream (state-of-the-world or
//! delta): one per subscribed service, or one watch-all watcher while the
//! stream has a wildcard CDS/EDS subscription, turned into "these services
//! changed" signals for the stream's protocol machine.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
};

use futures::{FutureExt, Stream, StreamExt, stream::SelectAll};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    catalog::{WatchFilter, WatcherHandle},
    core::Registry,
};

/// What the watchers report.
pub(super) enum Change {
    /// These services changed.
    Services(Vec<Arc<str>>),
    /// A watcher fell behind and was reset: anything may have changed.
    Everything,
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;
type ServiceStream = Pin<Box<dyn Stream<Item = Arc<str>> + Send>>;

/// Turns a watcher into a stream of "something changed" signals, several
/// queued revisions coalescing into one. An overflowed watcher is reset
/// (its queue is useless: the stream re-reads snapshots anyway).
fn changes(registry: Registry, mut handle: WatcherHandle) -> ChangeStream {
    Box::pin(async_stream::stream! {
        loop {
            if handle.overflowed() {
                registry.catalog().resubscribe(&mut handle);
                yield Change::Everything;
                continue;
            }
            let Some(batch) = handle.recv().await else { break };
            let mut services: Vec<Arc<str>> = Vec::new();
            let mut add = |batch: &crate::catalog::RevisionBatch| {
                for ev in &batch.events {
                    let s = ev.instance.service.as_str();
                    if !services.iter().any(|have| &**have == s) {
                        services.push(s.into());
                    }
                }
            };
            add(&batch);
            while let Some(more) = handle.try_recv() {
                add(&more);
            }
            yield Change::Services(services);
        }
    })
}

/// A per-service watcher's signals, tagged with the service and ending when
/// the subscription is cancelled.
fn service_changes(
    registry: Registry,
    handle: WatcherHandle,
    service: Arc<str>,
    cancel: CancellationToken,
) -> ServiceStream {
    Box::pin(
        changes(registry, handle)
            .map(move |_| service.clone())
            .take_until(cancel.cancelled_owned()),
    )
}

/// What a [`Watches::sync`] opened: the stream must read these services (or
/// everything) once, since a change before the watcher existed was missed.
pub(super) enum Opened {
    /// Newly watched services.
    Services(Vec<Arc<str>>),
    /// The watch-all watcher was opened.
    Everything,
}

/// The watchers of one stream.
pub(super) struct Watches {
    registry: Registry,
    conn: Option<SocketAddr>,
    /// Per-service watchers, each with its cancel token.
    watched: HashMap<Arc<str>, CancellationToken>,
    watchers: SelectAll<ServiceStream>,
    /// The watch-all watcher, while a wildcard CDS/EDS subscription exists.
    wildcard: Option<ChangeStream>,
}

impl Watches {
    pub(super) fn new(registry: Registry, conn: Option<SocketAddr>) -> Self {
        Self {
            registry,
            conn,
            watched: HashMap::new(),
            watchers: SelectAll::new(),
            wildcard: None,
        }
    }

    /// Opens and closes watchers to match: one watch-all watcher when
    /// `want_all`, otherwise one per name in `wanted` (already validated and
    /// checked for read permission by the caller).
    pub(super) fn sync(
        &mut self,
        want_all: bool,
        wanted: HashSet<Arc<str>>,
    ) -> Result<Opened, Status> {
        if want_all {
            for (_, cancel) in self.watched.drain() {
                cancel.cancel();
            }
            if self.wildcard.is_none() {
                let handle = self.watch(WatchFilter::default())?;
                self.wildcard = Some(changes(self.registry.clone(), handle));
                return Ok(Opened::Everything);
            }
            return Ok(Opened::Services(Vec::new()));
        }
        self.wildcard = None;
        self.watched.retain(|name, cancel| {
            let keep = wanted.contains(name);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        let mut opened = Vec::new();
        for name in wanted {
            if self.watched.contains_key(&name) {
                continue;
            }
            // Any change may change the load assignment (an endpoint's
            // health status), served or not.
            let handle = self.watch(WatchFilter {
                service: Some(name.clone()),
                include_not_serving: true,
                ..WatchFilter::default()
            })?;
            let cancel = CancellationToken::new();
            self.watchers.push(service_changes(
                self.registry.clone(),
                handle,
                name.clone(),
                cancel.clone(),
            ));
            self.watched.insert(name.clone(), cancel);
            opened.push(name);
        }
        Ok(Opened::Services(opened))
    }

    fn watch(&self, filter: WatchFilter) -> Result<WatcherHandle, Status> {
        // No initial snapshot: the stream reads the service's snapshot
        // itself when computing a response.
        Ok(self.registry.catalog().subscribe(filter, self.conn)?)
    }

    /// The next change, with whatever else is ready coalesced into it.
    /// Pending forever while nothing is watched; `None` when the watch-all
    /// watcher ended (the registry is shutting down). Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Change> {
        let Self {
            watchers, wildcard, ..
        } = self;
        tokio::select! {
            Some(service) = watchers.next(), if !watchers.is_empty() => {
                let mut services = vec![service];
                while let Some(Some(more)) = watchers.next().now_or_never() {
                    services.push(more);
                }
                Some(Change::Services(services))
            }
            change = async {
                match wildcard {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => change,
        }
    }
}
