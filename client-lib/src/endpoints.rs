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

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::Error;

/// Environment variable holding the bearer token sent to the registry.
pub const REGISTRY_TOKEN_ENV: &str = "REGISTRY_TOKEN";
/// Environment variable naming the CA (PEM file) the registry's certificate
/// must chain to; setting it switches the connection to TLS.
pub const REGISTRY_CACERT_ENV: &str = "REGISTRY_CACERT";
/// Environment variable naming this client's certificate (PEM file), for mTLS.
pub const REGISTRY_CERT_ENV: &str = "REGISTRY_CERT";
/// Environment variable naming this client's private key (PEM file), for mTLS.
pub const REGISTRY_KEY_ENV: &str = "REGISTRY_KEY";
/// Environment variable overriding the name checked against the registry's
/// certificate (default: the host of the address).
pub const REGISTRY_TLS_DOMAIN_ENV: &str = "REGISTRY_TLS_DOMAIN";

/// How the client reaches the registry, as set on
/// [`crate::ClientBuilder`]: credentials, TLS and timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub(crate) token: Option<String>,
    /// TLS settings; `None` is plaintext.
    pub(crate) tls: Option<ClientTlsConfig>,
    /// Bound on establishing one connection.
    pub(crate) connect_timeout: Duration,
    /// Bound on one unary call.
    pub(crate) request_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            token: None,
            tls: None,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// Client TLS from PEM files: the CA the registry's certificate chains to,
/// and optionally this client's certificate and key (mTLS) and the name to
/// expect on the registry's certificate.
pub fn tls_from_files(
    ca: &str,
    cert: Option<&str>,
    key: Option<&str>,
    domain: Option<&str>,
) -> Result<ClientTlsConfig, Error> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| Error::InvalidConfig {
            what: format!("TLS file {path}"),
            reason: format!("cannot read it: {e}"),
        })
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(Error::InvalidConfig {
                what: format!("TLS file {}", cert.or(key).unwrap_or_default()),
                reason: "a client certificate needs its key and vice versa".into(),
            });
        }
    }
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    Ok(tls)
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a
/// token).
#[derive(Debug, Clone, Default)]
pub(crate) struct Credentials {
    header: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// Credentials for an optional bearer token; the token must be
    /// printable ASCII.
    pub(crate) fn bearer(token: Option<&str>) -> Result<Self, Error> {
        let header = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::InvalidConfig {
                        what: "token".into(),
                        reason: "the token must be printable ASCII".into(),
                    })?,
            ),
        };
        Ok(Self { header })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// What every registry RPC of this crate goes through.
pub(crate) type Transport = InterceptedService<Channel, Credentials>;

/// Address used when neither an argument nor `REGISTRY_ADDR` names one.
pub const DEFAULT_REGISTRY_ADDR: &str = "http://127.0.0.1:7411";

/// Refusing to connect is instant on a live host; a second covers a host
/// that drops packets without stalling a keepalive past a short TTL.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one unary call, so a registry that accepts connections but never
/// answers cannot stall the keepalive task or a caller forever.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
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
    credentials: Credentials,
    settings: Settings,
}

impl Endpoints {
    /// Parses a comma-separated list of `host:port` or `http(s)://host:port`
    /// and prepares a lazy channel to each; no I/O happens here.
    #[cfg(test)]
    pub(crate) fn parse(addrs: &str) -> Result<Self, Error> {
        Self::parse_with(addrs, &Settings::default())
    }

    /// [`Endpoints::parse`] with credentials, TLS and timeouts.
    pub(crate) fn parse_with(addrs: &str, options: &Settings) -> Result<Self, Error> {
        let credentials = Credentials::bearer(options.token.as_deref())?;
        let mut nodes = Vec::new();
        for raw in addrs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let uri = if raw.contains("://") {
                raw.to_owned()
            } else if options.tls.is_some() {
                format!("https://{raw}")
            } else {
                format!("http://{raw}")
            };
            let endpoint = configure(
                Endpoint::from_shared(uri.clone()).map_err(|e| Error::InvalidAddress {
                    address: raw.to_owned(),
                    reason: e.to_string(),
                })?,
                options,
            )?;
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
            credentials,
            settings: options.clone(),
        })
    }

    /// Connects eagerly, trying each node in order, and makes the first that
    /// answers the current one.
    pub(crate) async fn connect_first(&mut self) -> Result<(), Error> {
        let mut last = None;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let endpoint = configure(
                Endpoint::from_shared(node.uri.clone()).expect("uri was validated by parse"),
                &self.settings,
            )?;
            match endpoint.connect().await {
                Ok(channel) => {
                    node.channel = channel;
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(node = %node.uri, error = %e, "registry node unreachable");
                    last = Some(Error::Connect {
                        address: node.uri.clone(),
                        source: e,
                    });
                }
            }
        }
        Err(last.expect("parse keeps at least one node"))
    }

    /// The node to use now: its index (to pass back to [`Endpoints::failed`])
    /// and a clone of its channel.
    pub(crate) fn current(&self) -> (usize, Transport) {
        let i = self.current.load(Ordering::Relaxed) % self.nodes.len();
        (
            i,
            InterceptedService::new(self.nodes[i].channel.clone(), self.credentials.clone()),
        )
    }

    /// Node `index`'s channel.
    pub(crate) fn node(&self, index: usize) -> Transport {
        InterceptedService::new(
            self.nodes[index % self.nodes.len()].channel.clone(),
            self.credentials.clone(),
        )
    }

    /// Makes node `index` the current one (a better node was found).
    pub(crate) fn set_current(&self, index: usize) {
        self.current
            .store(index % self.nodes.len(), Ordering::Relaxed);
    }

    /// The URI of node `index`, for errors and logs.
    pub(crate) fn uri(&self, index: usize) -> &str {
        &self.nodes[index % self.nodes.len()].uri
    }

    /// The configured timeouts and credentials.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every node's URI, comma-separated, as given.
    pub(crate) fn describe(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.uri.as_str())
            .collect::<Vec<_>>()
            .join(",")
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

fn configure(endpoint: Endpoint, settings: &Settings) -> Result<Endpoint, Error> {
    let uri = endpoint.uri().to_string();
    let endpoint = match &settings.tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidAddress {
                address: uri,
                reason: format!("TLS configuration: {e}"),
            })?,
        None => endpoint,
    };
    Ok(endpoint
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
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
