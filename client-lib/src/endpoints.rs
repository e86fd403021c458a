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

/// How a client connects and authenticates to the registry: a bearer token
/// (with `--auth-file` on the server) and TLS, with an optional client
/// certificate (mTLS).
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// TLS settings; `None` is plaintext.
    pub tls: Option<ClientTlsConfig>,
}

impl ClientOptions {
    /// Options from `REGISTRY_TOKEN`, `REGISTRY_CACERT`, `REGISTRY_CERT`,
    /// `REGISTRY_KEY` and `REGISTRY_TLS_DOMAIN`, so deployments configure
    /// credentials without code changes.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = var(REGISTRY_TOKEN_ENV);
        let tls = match var(REGISTRY_CACERT_ENV) {
            None => None,
            Some(ca) => Some(tls_from_files(
                &ca,
                var(REGISTRY_CERT_ENV).as_deref(),
                var(REGISTRY_KEY_ENV).as_deref(),
                var(REGISTRY_TLS_DOMAIN_ENV).as_deref(),
            )?),
        };
        Ok(Self { token, tls })
    }

    /// Sets the bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets TLS.
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
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
        std::fs::read(path).map_err(|e| Error::InvalidAddress {
            address: path.to_owned(),
            reason: format!("cannot read TLS file: {e}"),
        })
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(Error::InvalidAddress {
                address: cert.or(key).unwrap_or_default().to_owned(),
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
/// token). Public so other tools on raw generated clients (regctl) send the
/// token exactly as this crate does.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    header: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// Credentials for an optional bearer token; the token must be
    /// printable ASCII.
    pub fn bearer(token: Option<&str>) -> Result<Self, Error> {
        let header = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::InvalidAddress {
                        address: "(token)".into(),
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
    credentials: Credentials,
    tls: Option<ClientTlsConfig>,
}

impl Endpoints {
    /// Parses a comma-separated list of `host:port` or `http(s)://host:port`
    /// and prepares a lazy channel to each; no I/O happens here.
    #[cfg(test)]
    pub(crate) fn parse(addrs: &str) -> Result<Self, Error> {
        Self::parse_with(addrs, &ClientOptions::default())
    }

    /// [`Endpoints::parse`] with credentials and TLS.
    pub(crate) fn parse_with(addrs: &str, options: &ClientOptions) -> Result<Self, Error> {
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
                options.tls.as_ref(),
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
            tls: options.tls.clone(),
        })
    }

    /// Connects eagerly, trying each node in order, and makes the first that
    /// answers the current one.
    pub(crate) async fn connect_first(&mut self) -> Result<(), Error> {
        let mut last = None;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let endpoint = configure(
                Endpoint::from_shared(node.uri.clone()).expect("uri was validated by parse"),
                self.tls.as_ref(),
            )?;
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
    pub(crate) fn current(&self) -> (usize, Transport) {
        let i = self.current.load(Ordering::Relaxed) % self.nodes.len();
        (
            i,
            InterceptedService::new(self.nodes[i].channel.clone(), self.credentials.clone()),
        )
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

fn configure(endpoint: Endpoint, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, Error> {
    let uri = endpoint.uri().to_string();
    let endpoint = match tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidAddress {
                address: uri,
                reason: format!("TLS configuration: {e}"),
            })?,
        None => endpoint,
    };
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
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
