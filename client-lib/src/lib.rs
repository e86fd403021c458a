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
//! - [`RegistryClient`] (`client`): the cheap-clone handle; connection to one
//!   or several registry nodes (`endpoints`, with failover), one-shot
//!   [`RegistryClient::resolve`], and the entry points below.
//! - [`Registration`] (`keeper`): self-registration. One background task per
//!   client renews every lease over one KeepAlive stream, re-registers after
//!   the registry forgets, and backs off while it is unreachable
//!   (`backoff`). State is observable as a [`RegistrationState`] watch.
//! - [`Resolver`] (`resolver`): a Watch-fed cache of a service's instances
//!   that survives outages and registry restarts without emptying itself.
//! - [`balanced_channel`] (`balance`): a tonic `Channel` balanced over a
//!   resolver's instances.
//! - [`Error`] (`error`): the crate's one error type.

mod backoff;
mod balance;
mod client;
mod endpoints;
mod error;
mod instance;
mod keeper;
mod resolver;

pub use balance::{balanced_channel, balanced_channel_from, balanced_channel_with};
pub use client::{DEFAULT_TTL, REGISTRY_ADDR_ENV, RegisterBuilder, RegistryClient};
pub use endpoints::{
    ClientOptions, Credentials, DEFAULT_REGISTRY_ADDR, REGISTRY_CACERT_ENV, REGISTRY_CERT_ENV,
    REGISTRY_KEY_ENV, REGISTRY_TLS_DOMAIN_ENV, REGISTRY_TOKEN_ENV, tls_from_files,
};
pub use error::Error;
pub use instance::{Instance, Resolution, ServerInfo};
pub use keeper::{Registration, RegistrationState};
pub use resolver::{Resolver, ResolverState, ServiceStatus};
/// TLS settings for [`ClientOptions::tls`], re-exported from tonic.
pub use tonic::transport::ClientTlsConfig;
