//! The registry daemon as a library: everything the `registry` and `regctl`
//! binaries do lives here, so tests run it in-process.
//!
//! Map of the modules:
//! - [`lease`]: liveness. The lease table (TTL, deadline, attached
//!   instance keys) and the deadline heap the expiry task pops from.
//! - [`catalog`]: the instances by service, the monotonic revision, the
//!   bounded event history, and the watcher set that each committed revision
//!   fans out to.
//! - [`core`]: [`Registry`], the handle joining the two: register,
//!   heartbeat, deregister, resolve, list, watch, and the expiry task.
//! - [`watch`]: turns a watcher's queue into the Watch response stream
//!   (snapshot chunks, filtered events, reset snapshots, progress).
//! - [`service`]: the gRPC adapter for `registry.v1.Registry`.
//! - [`server`]: [`server::run`] serves the registry, health and reflection
//!   on a bound listener until a shutdown future resolves.
//! - [`ctl`]: `regctl`, the command line, built on `registry-client`.
//! - [`validate`], [`error`], [`config`]: request rules, the error enum and
//!   its status codes, and the tunables.

pub mod bench;
pub mod catalog;
pub mod config;
pub mod core;
pub mod ctl;
pub mod error;
pub mod lease;
pub mod server;
pub mod service;
pub mod validate;
pub mod watch;

pub use crate::{config::Config, core::Registry, error::Error};

/// Generated protobuf types, re-exported so users of this crate need not
/// depend on `registry-api` directly.
pub use registry_api as pb;
