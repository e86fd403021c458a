//! Serving: wires the registry service, gRPC health and reflection onto a
//! bound listener, and shuts down gracefully.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::{
    auth::{Auth, AuthLayer, RateLimit},
    config::Config,
    core::Registry,
    error::Result,
    frontends::{Frontends, Listeners},
    limits::{self, ConnectionStats, LimitsLayer},
    service::{RegistryService, wire::registry_server::RegistryServer},
    telemetry::RpcLayer,
    xds::XdsService,
};

/// Serves a registry on `listener` (fresh, or restored from
/// `config.data_dir`; see [`Registry::open`]) until `shutdown` resolves, then
/// drains: health turns NOT_SERVING, watch and keepalive streams end with
/// UNAVAILABLE, in-flight unary calls finish, for at most
/// `config.shutdown_grace`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let registry = Registry::open(config).await?;
    serve(listener, registry, shutdown).await
}

/// Like [`run`], for a registry the caller built (and can inspect).
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // HTTP API and DNS (issue 18): bound from the config here, so
    // `serve_with` can take listeners a test bound on ephemeral ports.
    let frontends = Listeners::bind(registry.config()).await?;
    serve_with(listener, registry, frontends, shutdown).await
}

/// Like [`serve`], with the HTTP API and DNS front ends on sockets the
/// caller bound (the config's `http_listen` and `dns_listen` are ignored).
pub async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    frontends: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr()?;
    registry.config().validate()?;
    let tls = tls_config(registry.config())?;
    let auth = match &registry.config().auth_file {
        Some(path) => Some(Arc::new(Auth::load(path)?)),
        None => None,
    };
    let rate =
        RateLimit::new(registry.config().rate_limit, registry.config().rate_burst).map(Arc::new);
    if !addr.ip().is_loopback() && (tls.is_none() || auth.is_none()) {
        warn!(
            %addr,
            tls = tls.is_some(),
            auth = auth.is_some(),
            "SECURITY WARNING: listening beyond loopback without TLS and auth; anyone who can reach \
             this port can register instances and redirect traffic. Use --tls-cert/--tls-key and --auth-file."
        );
    }
    let background = spawn_auth_maintenance(registry.clone(), auth.clone(), rate.clone());
    let frontends = Frontends::spawn(&registry, frontends, auth.clone(), rate.clone())?;
    let expiry = registry.spawn_expiry();
    // Health checks of the instances registered through this node.
    let checker = crate::health::spawn(registry.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(registry_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(registry_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let service = RegistryServer::new(RegistryService::new(registry.clone()))
        .max_decoding_message_size(registry.config().max_message_size);
    let conn_stats = ConnectionStats::default();
    let incoming = limits::limit_incoming(listener, registry.config(), conn_stats.clone());

    info!(%addr, epoch = registry.epoch(), "registry listening");
    registry.metrics().set_serving(true);

    let grace = registry.config().shutdown_grace;
    let token = registry.shutdown_token().clone();
    let signal = {
        let registry = registry.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            info!("shutting down: draining streams and in-flight calls");
            registry.metrics().set_serving(false);
            health
                .set_not_serving::<RegistryServer<RegistryService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            registry.shutdown();
        }
    };
    let config = registry.config();
    let keepalive = (!config.keepalive_interval.is_zero()).then_some(config.keepalive_interval);
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .layer(RpcLayer::new(&registry))
        .layer(LimitsLayer::new(config))
        .layer(AuthLayer::new(auth, rate))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_optional_service(config.xds.then(|| XdsService::server(registry.clone())))
        .serve_with_incoming_shutdown(incoming, signal);
    let result = tokio::select! {
        res = server => res.map_err(Into::into),
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
            info!(?grace, "shutdown grace elapsed; closing remaining connections");
            Ok(())
        }
    };
    registry.metrics().set_serving(false);
    registry.shutdown();
    // Their streams and long-polls ended with the shutdown token.
    let _ = tokio::time::timeout(grace, frontends.stopped()).await;
    let _ = expiry.await;
    let _ = checker.await;
    registry.close().await;
    background.abort();
    info!(
        connections_rejected = conn_stats.rejected(),
        connections_timed_out = conn_stats.timed_out(),
        "registry stopped"
    );
    result
}

/// How often idle rate-limit buckets are forgotten.
const RATE_LIMIT_SHRINK_INTERVAL: Duration = Duration::from_secs(60);

/// rustls server config from the configured PEM files, or `None` for
/// plaintext. With a client CA, every client must present a certificate
/// that chains to it (mTLS).
fn tls_config(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    use crate::error::Error;
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("cannot read {what} {}: {e}", path.display()))
        })
    };
    let Some(files) = &config.tls else {
        if config.tls_client_ca.is_some() {
            return Err(Error::InvalidArgument(
                "--tls-client-ca needs --tls-cert and --tls-key".into(),
            ));
        }
        return Ok(None);
    };
    let identity = Identity::from_pem(
        read(&files.cert, "TLS certificate")?,
        read(&files.key, "TLS key")?,
    );
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(Some(tls))
}

/// Reloads the auth file on SIGHUP (without touching connections) and
/// periodically forgets idle rate-limit buckets.
fn spawn_auth_maintenance(
    registry: Registry,
    auth: Option<Arc<Auth>>,
    rate: Option<Arc<RateLimit>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let token = registry.shutdown_token().clone();
        #[cfg(unix)]
        let mut hup = auth.as_ref().and_then(|_| {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
        });
        let mut shrink = tokio::time::interval(RATE_LIMIT_SHRINK_INTERVAL);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                _ = token.cancelled() => return,
                _ = shrink.tick() => {
                    if let Some(rate) = &rate {
                        rate.shrink();
                    }
                }
                _ = hangup => {
                    if let Some(auth) = &auth {
                        match auth.reload() {
                            Ok(()) => {
                                let (tokens, certs) = auth.sizes();
                                info!(tokens, certs, "auth file reloaded");
                            }
                            Err(e) => warn!(error = %e, "auth file reload failed; keeping the previous policy"),
                        }
                    }
                }
            }
        }
    })
}
