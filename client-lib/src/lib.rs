//! Client of the registry: a service registers itself in two lines, and a
//! caller dials a service by name.
//!
//! ```no_run
//! # async fn f() -> Result<(), registry_client::Error> {
//! use std::time::Duration;
//! use registry_client::{Instance, RegistryClient};
//!
//! let client = RegistryClient::from_env().await?;
//! // A service announces itself; a background task keeps it registered.
//! let registration = client
//!     .register(Instance::new("prod", "10.0.0.7:5000").with_metadata("version", "1.2"))
//!     .ttl(Duration::from_secs(10))
//!     .await?;
//! // A caller gets a channel that follows the live instances of `prod`.
//! let channel = registry_client::balanced_channel(&client, "prod");
//! # drop(channel);
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! Map of the modules:
//! - [`RegistryClient`] (`client`): the cheap-clone handle and its
//!   [`ClientBuilder`] (addresses, TLS, token, timeouts, zone); connection
//!   to one or several registry nodes (`endpoints`, with failover);
//!   one-shot [`RegistryClient::resolve`], [`RegistryClient::list_services`],
//!   [`RegistryClient::status`], [`RegistryClient::deregister`].
//! - [`Watch`] (`watch`): a service's changes as a typed stream (snapshot,
//!   put, delete) that resumes by itself across outages and restarts; the
//!   resolver and the keepalive task run on the same session.
//! - [`Registration`] (`keeper`): self-registration. One background task per
//!   client renews every lease over one KeepAlive stream, re-registers after
//!   the registry forgets, backs off while it is unreachable (`backoff`),
//!   and notices when another process takes over an instance id
//!   ([`RegistrationState::Replaced`]). State is observable as a watch.
//! - [`Resolver`] (`resolver`): a watch-fed cache of a service's instances
//!   that survives outages and registry restarts without emptying itself.
//! - [`BalancedChannel`] (`balance`): a tonic-compatible channel over a
//!   resolver's instances: weighted, zone-aware, with outlier ejection and
//!   retries.
//! - [`Shutdown`] (`shutdown`): mark draining, wait, deregister, then stop
//!   serving.
//! - [`Error`] (`error`): the crate's one error type, printed on one line.
//! - `trace` (feature `otel`, off by default): OpenTelemetry tracing across
//!   calls. Balanced channels and registry calls send the caller's trace
//!   context (W3C `traceparent`) and record a client span naming the
//!   instance called; `trace::ServerLayer` joins it on the serving side;
//!   `trace::OtlpExport` exports over OTLP/gRPC.
//!
//! The `regctl` command line is a binary of this crate (feature `cli`, on
//! by default), built on this public API only; services that link the
//! library alone can drop its dependencies with `default-features = false`.

mod backoff;
mod balance;
mod client;
mod endpoints;
mod error;
mod instance;
mod keeper;
mod resolver;
mod shutdown;
#[cfg(feature = "otel")]
pub mod trace;
mod watch;

pub use balance::{
    BalancedChannel, ChannelBuilder, ChannelStats, EndpointStats, OutlierDetection, RetryPolicy,
    balanced_channel,
};
pub use client::{
    ClientBuilder, DEFAULT_TTL, DeregisterTarget, Deregistered, Health, InstanceState,
    REGISTRY_ADDR_ENV, REGISTRY_ZONE_ENV, RegisterBuilder, RegistryClient, RegistryStatus,
    ResolveBuilder, ServiceList, ServiceSummary,
};
pub use endpoints::{
    DEFAULT_REGISTRY_ADDR, REGISTRY_CACERT_ENV, REGISTRY_CERT_ENV, REGISTRY_KEY_ENV,
    REGISTRY_TLS_DOMAIN_ENV, REGISTRY_TOKEN_ENV, tls_from_files,
};
pub use error::Error;
pub use instance::{
    AdminState, CheckKind, CheckResult, HealthCheck, HealthState, Instance, Resolution, ServerInfo,
    ZONE_LABEL,
};
pub use keeper::{Registration, RegistrationState};
pub use resolver::{Resolver, ResolverState, ServiceStatus};
pub use shutdown::{DEFAULT_DRAIN, DEFAULT_GRACE, Shutdown, shutdown_signal};
/// TLS settings for [`ClientBuilder::tls`], re-exported from tonic.
pub use tonic::transport::ClientTlsConfig;
pub use watch::{DeleteReason, Query, ResetReason, Snapshot, Watch, WatchEvent, WatchOptions};
