//! Graceful shutdown of a service: leave the registry first, then stop
//! serving, so callers drop the instance before its port closes and no call
//! is lost. Every service needs it; this is the one copy.
//!
//! On the signal: mark every registration **draining** (callers' balanced
//! channels, xDS clients and DNS stop sending new calls at once, while the
//! instance keeps serving the calls already on their way), wait the
//! **grace** (default 2 s) for callers to move off, **deregister**, wait
//! the short **drain** (default 500 ms) for anyone who only follows
//! registrations, then release the server, which finishes its in-flight
//! calls and stops.
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

/// Time between marking the instances draining and deregistering them:
/// callers' balanced channels and xDS clients move off within
/// milliseconds of the change; the rest covers callers that re-resolve
/// periodically (DNS with its TTL, Prometheus SD) and calls already routed
/// here.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);

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

/// Orders a service's shutdown: on a signal, mark draining, wait
/// [`Shutdown::grace`], deregister, wait [`Shutdown::drain`], then stop
/// serving (see the module docs and example).
#[derive(Debug)]
pub struct Shutdown {
    grace: Duration,
    drain: Duration,
    stopped: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown with the [`DEFAULT_GRACE`] and [`DEFAULT_DRAIN`].
    pub fn new() -> Self {
        Self {
            grace: DEFAULT_GRACE,
            drain: DEFAULT_DRAIN,
            stopped: watch::channel(false).0,
        }
    }

    /// Time between marking the instances draining and deregistering them
    /// (zero: deregister at once, without draining).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
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

    /// Waits for `signal` (e.g. [`shutdown_signal`]), marks every
    /// registration draining and waits the grace (a failure is logged: the
    /// instance is then only deregistered), deregisters every registration
    /// (a failure is logged: the instance then expires after its TTL),
    /// waits the drain time, then releases [`Shutdown::serving_stopped`].
    /// Returns each deregistration's outcome.
    pub async fn run(
        self,
        signal: impl Future<Output = ()>,
        registrations: impl IntoIterator<Item = Registration>,
    ) -> Vec<Result<Deregistered, Error>> {
        let registrations: Vec<Registration> = registrations.into_iter().collect();
        signal.await;
        tracing::info!(registrations = registrations.len(), grace = ?self.grace, drain = ?self.drain,
            "shutting down: draining, deregistering, then stopping the server");
        if !self.grace.is_zero() {
            let drains = registrations.iter().map(|r| async move {
                if let Err(e) = r.drain("shutting down").await {
                    tracing::warn!(service = %r.instance().service, id = %r.instance().id,
                        error = %e, "could not mark the instance draining; deregistering after the grace");
                }
            });
            futures::future::join_all(drains).await;
            tokio::time::sleep(self.grace).await;
        }
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
