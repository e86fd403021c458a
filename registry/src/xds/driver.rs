//! The loop every ADS stream runs, state-of-the-world or delta: compute
//! and send what is due, then wait for the next request, catalog change,
//! end of warm-up or shutdown. The protocol machines plug in through
//! [`Protocol`]; what they share (node, dirty services, watchers, recheck
//! time) is [`StreamState`].

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use envoy_types::pb::envoy::config::core::v3::Node;
use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::{
    ReadCheck,
    watches::{Change, Opened, Watches},
};
use crate::{core::Registry, validate};

/// What every ADS stream keeps besides its protocol's own bookkeeping.
pub(super) struct StreamState {
    /// The client's node id, for logs (`""` until a request names it).
    pub(super) node: String,
    /// Services changed since the last computation.
    pub(super) dirty: HashSet<Arc<str>>,
    /// Anything may have changed (a watcher was reset, warm-up ended).
    pub(super) all_dirty: bool,
    /// The catalog watchers matching the subscriptions.
    pub(super) watches: Watches,
    /// When a withheld answer is to be reconsidered (end of warm-up).
    pub(super) recheck_at: Option<Instant>,
    conn: Option<SocketAddr>,
}

impl StreamState {
    pub(super) fn new(registry: Registry, conn: Option<SocketAddr>) -> Self {
        Self {
            node: String::new(),
            dirty: HashSet::new(),
            all_dirty: false,
            watches: Watches::new(registry, conn),
            recheck_at: None,
            conn,
        }
    }

    /// Points the watchers at what the subscriptions cover: everything when
    /// `want_all` (a CDS/EDS wildcard), else each of `names` that is a valid
    /// service name the subscriber may read. A service newly watched is
    /// marked dirty, read after its watcher exists so that no change falls
    /// in between.
    pub(super) fn watch(
        &mut self,
        want_all: bool,
        names: impl Iterator<Item = Arc<str>>,
        may_read: &ReadCheck,
    ) -> Result<(), Status> {
        let wanted: HashSet<Arc<str>> = if want_all {
            HashSet::new()
        } else {
            names
                .filter(|n| validate::service_name("resource_names", n).is_ok() && may_read(n))
                .collect()
        };
        match self.watches.sync(want_all, wanted)? {
            Opened::Everything => self.all_dirty = true,
            Opened::Services(opened) => self.dirty.extend(opened),
        }
        Ok(())
    }

    /// Takes the node id from the first request that carries a node.
    pub(super) fn saw_node(&mut self, node: Option<&Node>, kind: &str) {
        if !self.node.is_empty() {
            return;
        }
        if let Some(node) = node {
            self.node = if node.id.is_empty() {
                "<no id>".to_owned()
            } else {
                node.id.clone()
            };
            info!(node = %self.node, conn = ?self.conn, kind, "xds: ADS stream opened");
        }
    }
}

/// A protocol machine the driver runs.
pub(super) trait Protocol: Send + 'static {
    /// Requests from the client.
    type Request: Send + 'static;
    /// Responses to it.
    type Response: Send + 'static;
    /// Handles one request; an error ends the stream with it.
    fn on_request(&mut self, req: Self::Request) -> Result<(), Status>;
    /// The responses now due, in push order; clears the dirty set.
    fn responses(&mut self) -> Vec<Self::Response>;
    /// The shared part of the stream's state.
    fn state(&mut self) -> &mut StreamState;
}

/// The response stream of one ADS call. Ends with `UNAVAILABLE` when the
/// registry shuts down; dropping it (client gone) drops its watchers.
pub(super) fn drive<P, R>(
    mut machine: P,
    shutdown: CancellationToken,
    mut requests: R,
) -> impl Stream<Item = Result<P::Response, Status>> + Send + 'static
where
    P: Protocol,
    R: Stream<Item = Result<P::Request, Status>> + Send + Unpin + 'static,
{
    async_stream::stream! {
        loop {
            for response in machine.responses() {
                yield Ok(response);
            }
            let st = machine.state();
            let recheck = st.recheck_at;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    yield Err(Status::unavailable("registry is shutting down; reconnect"));
                    break;
                }
                req = requests.next() => match req {
                    Some(Ok(req)) => {
                        if let Err(status) = machine.on_request(req) {
                            warn!(node = %machine.state().node, %status, "xds: closing ADS stream");
                            yield Err(status);
                            break;
                        }
                    }
                    Some(Err(status)) => {
                        debug!(node = %st.node, %status, "xds: ADS stream ended by the client");
                        break;
                    }
                    None => break,
                },
                change = st.watches.next() => match change {
                    Some(Change::Services(services)) => st.dirty.extend(services),
                    Some(Change::Everything) => st.all_dirty = true,
                    None => break,
                },
                _ = tokio::time::sleep_until(recheck.unwrap_or_else(Instant::now)), if recheck.is_some() => {
                    st.recheck_at = None;
                }
            }
        }
        debug!(node = %machine.state().node, "xds: ADS stream closed");
    }
}
