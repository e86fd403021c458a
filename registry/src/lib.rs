//! The registry daemon as a library: everything the `registry` binary does
//! lives here, so tests run it in-process. The command line (`regctl`) and
//! the load generator (`registry-bench`) are clients and live in
//! `registry-client` and `registry-bench`; this crate depends on neither.
//!
//! Map of the modules:
//! - [`lease`]: liveness. The lease table (TTL, deadline, attached
//!   instance keys) and the deadline heap the expiry task pops from.
//! - [`catalog`]: the instances by service, the monotonic revision, the
//!   bounded event history, and the watcher set that each committed revision
//!   fans out to.
//! - [`core`]: [`Registry`], the handle: validates, authorises and plans
//!   every operation; a write becomes a [`change::Batch`] handed to the
//!   store.
//! - [`change`]: the change batch (instance puts and deletes, lease grants
//!   and revocations) every write, expiry and restore is expressed as.
//! - [`store`]: the seam writes go through: the in-memory catalog (with a
//!   data directory, durable before acknowledged), or etcd.
//! - [`watch`]: turns a watcher's queue into the Watch response stream
//!   (snapshot chunks, filtered events, reset snapshots, progress).
//! - [`serving`]: which instances callers are sent to: serving (active and
//!   passing or warning) ones, or every active one while a service is in
//!   panic mode.
//! - [`health`]: the health checks the registry runs (grpc, http, tcp) on
//!   the instances registered through it, flap-damped, capped and spread;
//!   state changes are written through the store like any write.
//! - [`auth`]: who is calling (bearer tokens, mTLS names), what each role
//!   may do, the tower layer enforcing it on every RPC, per-identity rate
//!   limits.
//! - [`limits`]: transport limits against hostile peers: the connection
//!   cap, handshake/idle timeouts, the per-call timeout, and gRPC codes for
//!   oversize or undecodable messages.
//! - [`frame`]: Resolve answers whose instance list is encoded once per
//!   service revision and shared by every caller.
//! - [`persist`]: `--data-dir`, the log every change is written to
//!   (group-committed) before it is acknowledged, loaded at start.
//! - [`etcd`]: `--store etcd`, several nodes over one etcd cluster: the
//!   node's etcd lease, batched writes, the watch that feeds the local
//!   catalog, and resync after losing etcd.
//! - [`service`]: the gRPC adapter for `registry.v1.Registry`.
//! - [`xds`]: the xDS management server (ADS): Listener, Route, Cluster and
//!   ClusterLoadAssignment per service, pushed from catalog watchers over
//!   state-of-the-world or incremental (delta) ADS, so any gRPC client
//!   (`xds:///name`) or Envoy discovers services through us.
//! - [`http`], [`dns`], [`frontends`]: the registry beyond gRPC. The
//!   HTTP/JSON API (reads with ETags and long-poll, writes, the watch as
//!   Server-Sent Events, Prometheus `http_sd`, the embedded dashboard) and
//!   DNS (`<service>.service.<domain>` A/AAAA/SRV), both thin adapters over
//!   [`Registry`], started beside the gRPC server.
//! - [`server`]: [`server::run`] serves the registry, health and reflection
//!   on a bound listener until a shutdown future resolves.
//! - [`expiry`]: the expiry task and the expiry of a lease through the
//!   store, with pause-safety (leases get back time the daemon was
//!   stalled) and the expiry-storm guard.
//! - [`metrics`], [`telemetry`], [`ops`]: operations. Counters and the
//!   Prometheus exposition, the per-RPC tower layer (metrics and tracing
//!   spans) and log set-up, and the `/metrics`, `/healthz`, `/readyz`
//!   HTTP endpoints.
//! - [`validate`], [`error`], [`config`]: request rules, the error enum and
//!   its status codes, and the tunables.

pub mod auth;
pub mod catalog;
pub mod change;
pub mod config;
pub mod core;
pub mod dns;
pub mod error;
pub mod etcd;
pub mod expiry;
pub mod frame;
pub mod frontends;
pub mod health;
pub mod http;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod persist;
pub mod server;
pub mod service;
pub mod serving;
pub mod store;
pub mod telemetry;
pub mod validate;
pub mod watch;
pub mod xds;

pub use crate::{config::Config, core::Registry, error::Error};

/// Generated protobuf types, re-exported so users of this crate need not
/// depend on `registry-api` directly.
pub use registry_api as pb;
