//! Serving: wires the registry service, gRPC health and reflection onto a
//! bound listener, and shuts down gracefully.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tracing::info;

use crate::{
    config::Config,
    core::Registry,
    error::Result,
    service::{RegistryService, wire::registry_server::RegistryServer},
};

/// Largest request the server decodes. Registry requests are small (an
/// instance is at most ~80 KiB of metadata); anything bigger is hostile.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 << 20;

/// Serves a fresh registry on `listener` until `shutdown` resolves, then
/// drains: health turns NOT_SERVING, watch and keepalive streams end with
/// UNAVAILABLE, in-flight unary calls finish, for at most
/// `config.shutdown_grace`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let registry = Registry::new(config);
    serve(listener, registry, shutdown).await
}

/// Like [`run`], for a registry the caller built (and can inspect).
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let expiry = registry.spawn_expiry();

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
        .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    info!(%addr, epoch = registry.epoch(), "registry listening");

    let grace = registry.config().shutdown_grace;
    let token = registry.shutdown_token().clone();
    let signal = {
        let registry = registry.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            info!("shutting down: draining streams and in-flight calls");
            health
                .set_not_serving::<RegistryServer<RegistryService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            registry.shutdown();
        }
    };
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, signal);
    let result = tokio::select! {
        res = server => res.map_err(Into::into),
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
            info!(?grace, "shutdown grace elapsed; closing remaining connections");
            Ok(())
        }
    };
    registry.shutdown();
    let _ = expiry.await;
    info!("registry stopped");
    result
}
