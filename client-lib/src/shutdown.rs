//! Graceful shutdown of a service: leave the registry first, then stop
//! serving, so callers drop the instance before its port closes and no call
//! is lost. Every service needs it; this is the one copy.
//!
//! ```no_run
//! # async fn f(client: registry_client::RegistryClient, listener: tokio::net::TcpListener,
//! #            service: registry_api::prod::prod_service_server::ProdServiceServer<impl registry_api::prod::prod_service_server::ProdService>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use registry_client::{Instance, Shutdown, shutdown_signal};
//! let addr = listener.local_addr()?;
//! let shutdown = Shutdown::new();
//! // Serve first, so nobody is sent here before we can answer...
//! let server = tokio::spawn(
//!     tonic::transport::Server::builder()
//!         .add_service(service)
//!         .serve_with_incoming_shutdown(
//!             tokio_stream::wrappers::TcpListenerStream::new(listener),
//!             shutdown.serving_stopped(),
//!         ),
//! );
//! // ...then register...
//! let registration = client.register(Instance::new("prod", addr.to_string())).await?;
//! // ...and on Ctrl-C / SIGTERM: deregister, wait for callers to notice,
//! // then let the server finish its in-flight calls and stop.
//! shutdown.run(shutdown_signal(), [registration]).await;
//! server.await??;
//! # Ok(()) }
//! ```

use std::{future::Future, time::Duration};

use tokio::sync::watch;

use crate::{Deregistered, Error, Registration};

/// Time between deregistering and stopping the server. Callers' balanced
/// channels drop the instance as soon as the Watch DELETE reaches them
/// (milliseconds); the rest covers calls they had already routed here.
pub const DEFAULT_DRAIN: Duration = Duration::from_millis(500);

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM (what process managers
/// and Kubernetes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Orders a service's shutdown: on a signal, deregister, wait
/// [`Shutdown::drain`], then stop serving (see the module example).
#[derive(Debug)]
pub struct Shutdown {
    drain: Duration,
    stopped: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown with the [`DEFAULT_DRAIN`].
    pub fn new() -> Self {
        Self {
            drain: DEFAULT_DRAIN,
            stopped: watch::channel(false).0,
        }
    }

    /// Time between deregistering and stopping the server.
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// A future for tonic's `serve_with_shutdown` /
    /// `serve_with_incoming_shutdown`: resolves once [`Shutdown::run`] has
    /// deregistered and drained (never, if `run` is never called).
    pub fn serving_stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.subscribe();
        async move {
            if rx.wait_for(|stopped| *stopped).await.is_err() {
                // The Shutdown was dropped without running: never stop.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for `signal` (e.g. [`shutdown_signal`]), deregisters every
    /// registration (a failure is logged: the instance then expires after
    /// its TTL), waits the drain time, then releases
    /// [`Shutdown::serving_stopped`]. Returns each deregistration's outcome.
    pub async fn run(
        self,
        signal: impl Future<Output = ()>,
        registrations: impl IntoIterator<Item = Registration>,
    ) -> Vec<Result<Deregistered, Error>> {
        let registrations: Vec<Registration> = registrations.into_iter().collect();
        signal.await;
        tracing::info!(registrations = registrations.len(), drain = ?self.drain,
            "shutting down: deregistering, then stopping the server");
        let mut outcomes = Vec::with_capacity(registrations.len());
        for registration in registrations {
            let (service, id) = (
                registration.instance().service.clone(),
                registration.instance().id.clone(),
            );
            let outcome = registration.deregister().await;
            match &outcome {
                Ok(d) => tracing::info!(%service, %id, revision = d.revision, "deregistered"),
                Err(e) => tracing::warn!(%service, %id, error = %e,
                    "deregistration failed; the instance expires after its TTL"),
            }
            outcomes.push(outcome);
        }
        tokio::time::sleep(self.drain).await;
        self.stopped.send_replace(true);
        outcomes
    }
}
