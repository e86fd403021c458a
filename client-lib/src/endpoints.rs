//! The registry nodes a client may talk to, and which one it uses now.
//!
//! Every node gets one lazily connected tonic [`Channel`]; all RPCs go to the
//! *current* node, and a transient failure moves the client to the next one
//! ([`Endpoints::failed`]). With a single node that is a no-op, and with
//! several it is plain failover: keepalive streams and watches reopen on the
//! next node and resume from there.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// Address used when neither an argument nor `REGISTRY_ADDR` names one.
pub const DEFAULT_REGISTRY_ADDR: &str = "http://127.0.0.1:7411";

/// Refusing to connect is instant on a live host; a second covers a host
/// that drops packets without stalling a keepalive past a short TTL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings detect a registry that vanished without closing the socket
/// (power loss, partition) even while a Watch stream is idle.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is declared dead.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One registry node.
#[derive(Debug)]
pub(crate) struct Node {
    /// The normalized URI, for logs and errors.
    pub(crate) uri: String,
    pub(crate) channel: Channel,
}

/// The registry nodes of one client, and the index of the one in use.
#[derive(Debug)]
pub(crate) struct Endpoints {
    nodes: Vec<Node>,
    current: AtomicUsize,
}

impl Endpoints {
    /// Parses a comma-separated list of `host:port` or `http(s)://host:port`
    /// and prepares a lazy channel to each; no I/O happens here.
    pub(crate) fn parse(addrs: &str) -> Result<Self, Error> {
        let mut nodes = Vec::new();
        for raw in addrs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let uri = if raw.contains("://") {
                raw.to_owned()
            } else {
                format!("http://{raw}")
            };
            let endpoint = configure(Endpoint::from_shared(uri.clone()).map_err(|e| {
                Error::InvalidAddress {
                    address: raw.to_owned(),
                    reason: e.to_string(),
                }
            })?);
            nodes.push(Node {
                uri,
                channel: endpoint.connect_lazy(),
            });
        }
        if nodes.is_empty() {
            return Err(Error::InvalidAddress {
                address: addrs.to_owned(),
                reason: "no registry address given".into(),
            });
        }
        Ok(Self {
            nodes,
            current: AtomicUsize::new(0),
        })
    }

    /// Connects eagerly, trying each node in order, and makes the first that
    /// answers the current one.
    pub(crate) async fn connect_first(&mut self) -> Result<(), Error> {
        let mut last = None;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let endpoint = configure(
                Endpoint::from_shared(node.uri.clone()).expect("uri was validated by parse"),
            );
            match endpoint.connect().await {
                Ok(channel) => {
                    node.channel = channel;
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(node = %node.uri, error = %e, "registry node unreachable");
                    last = Some(format!("{}: {e}", node.uri));
                }
            }
        }
        Err(Error::Unavailable(tonic::Status::unavailable(format!(
            "no registry node reachable ({})",
            last.unwrap_or_default()
        ))))
    }

    /// The node to use now: its index (to pass back to [`Endpoints::failed`])
    /// and a clone of its channel.
    pub(crate) fn current(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.nodes.len();
        (i, self.nodes[i].channel.clone())
    }

    /// Number of configured nodes.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Reports that node `index` failed: move on to the next node, unless
    /// another task already did.
    pub(crate) fn failed(&self, index: usize) {
        if self.nodes.len() > 1 {
            let next = (index + 1) % self.nodes.len();
            if self
                .current
                .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::info!(from = %self.nodes[index].uri, to = %self.nodes[next].uri, "registry failover");
            }
        }
    }
}

fn configure(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_lists_and_adds_scheme() {
        let e = Endpoints::parse("127.0.0.1:1, http://127.0.0.1:2 ,").unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e.nodes[0].uri, "http://127.0.0.1:1");
        assert_eq!(e.nodes[1].uri, "http://127.0.0.1:2");
        assert_eq!(e.current().0, 0);
        e.failed(0);
        assert_eq!(e.current().0, 1);
        // A stale report about node 0 does not move the client again.
        e.failed(0);
        assert_eq!(e.current().0, 1);
        e.failed(1);
        assert_eq!(e.current().0, 0);
    }

    #[tokio::test]
    async fn rejects_empty_and_garbage() {
        assert!(matches!(
            Endpoints::parse(" , "),
            Err(Error::InvalidAddress { .. })
        ));
        assert!(matches!(
            Endpoints::parse("http://exa mple:1"),
            Err(Error::InvalidAddress { .. })
        ));
    }

    #[tokio::test]
    async fn connect_first_reports_unreachable() {
        // Port 1 on loopback is closed on any sane test machine.
        let mut e = Endpoints::parse("127.0.0.1:1").unwrap();
        let err = e.connect_first().await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
    }
}
