//! The operations HTTP endpoint (`--metrics-listen`): Prometheus metrics and
//! health probes for orchestrators, on a port of its own so it can be
//! exposed to a scraper without exposing the gRPC API.
//!
//! - `GET /metrics`: the exposition of [`crate::metrics::render`].
//! - `GET /healthz`: liveness, `200 ok` while the process answers HTTP.
//! - `GET /readyz`: readiness, `200 ready` once the gRPC server is serving
//!   and the warm-up window is over; `503` with the reason before that and
//!   from the moment shutdown starts draining.
//!
//! Plain HTTP/1.1 (axum, already in the dependency tree through tonic).

use std::future::Future;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tracing::info;

use crate::{core::Registry, error::Result, metrics};

/// The router of the operations endpoint, for a registry.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(registry)
}

/// Serves the operations endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    info!(addr = %listener.local_addr()?, "metrics and health endpoint listening");
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn metrics_handler(State(registry): State<Registry>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(registry.metrics(), registry.status()),
    )
}

/// Why the registry is not ready, or `None` when it is.
pub fn not_ready_reason(registry: &Registry) -> Option<String> {
    if !registry.metrics().serving() {
        return Some("not serving: starting or shutting down".into());
    }
    let info = registry.server_info();
    info.warming_up.then(|| {
        format!(
            "warming up: services are re-registering, {} ms left",
            info.warmup_remaining_ms
        )
    })
}

async fn readyz(State(registry): State<Registry>) -> impl IntoResponse {
    match not_ready_reason(&registry) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
    }
}
