//! Histories, in the spirit of etcd's robustness tests: seeded random
//! clients run against a registry while every request and answer is
//! recorded (with its revision, and invocation and return times); a
//! recorder watcher sees every revision, including the expiries no client
//! asked for. The checker then replays the recorder's revisions into a
//! model and verifies every answer against it.
//!
//! - [`workload`]: the clients, the watchers and the recorder.
//! - [`model`]: the catalog at one revision (instances, lease membership,
//!   per-filter hashes), built by applying revisions.
//! - [`checker`]: the verification; it returns violations sorted so the
//!   first one printed is the first divergence.
//!
//! The seed fixes every client's choices (operation, names, TTLs); the
//! interleaving of concurrent clients is the scheduler's, so a failing seed
//! makes the same failure likely, not certain.

pub mod checker;
pub mod model;
pub mod workload;

use std::time::Duration;

use registry_api::v1::{
    DeregisterResponse, HeartbeatResponse, Instance, ListServicesResponse, RegisterResponse,
    ResolveResponse, StatusResponse, WatchResponse,
};

/// One request a client sent.
#[derive(Debug, Clone)]
pub enum Call {
    /// Register `instance` with a new lease (`lease_id` 0, `ttl_ms`) or
    /// attached to `lease_id`.
    Register {
        instance: Instance,
        ttl_ms: u64,
        lease_id: u64,
    },
    /// Deregister one instance.
    DeregisterInstance { service: String, id: String },
    /// Revoke a lease with its instances.
    DeregisterLease { lease_id: u64 },
    /// Renew leases.
    Heartbeat { lease_ids: Vec<u64> },
    /// Resolve a service.
    Resolve { service: String },
    /// List services with counts.
    ListServices,
    /// Status counts.
    Status,
}

impl Call {
    /// True for calls that change the catalog when they succeed.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Call::Register { .. } | Call::DeregisterInstance { .. } | Call::DeregisterLease { .. }
        )
    }
}

/// The answer to a [`Call`].
#[derive(Debug, Clone)]
pub enum Answer {
    Register(RegisterResponse),
    Deregister(DeregisterResponse),
    Heartbeat(HeartbeatResponse),
    Resolve(ResolveResponse),
    ListServices(ListServicesResponse),
    Status(StatusResponse),
}

impl Answer {
    /// The revision the answer carries, if it carries one.
    pub fn revision(&self) -> Option<u64> {
        match self {
            Answer::Register(r) => Some(r.revision),
            Answer::Deregister(r) => Some(r.revision),
            Answer::Heartbeat(_) => None,
            Answer::Resolve(r) => Some(r.revision),
            Answer::ListServices(r) => Some(r.revision),
            Answer::Status(r) => Some(r.revision),
        }
    }
}

/// A failed call: its gRPC code and message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: tonic::Code,
    pub message: String,
}

impl Failure {
    /// True when the call may or may not have taken effect (the connection
    /// broke, the server went away): the model must allow both.
    pub fn indeterminate(&self) -> bool {
        !matches!(
            self.code,
            tonic::Code::NotFound
                | tonic::Code::InvalidArgument
                | tonic::Code::OutOfRange
                | tonic::Code::ResourceExhausted
                | tonic::Code::PermissionDenied
                | tonic::Code::FailedPrecondition
                | tonic::Code::AlreadyExists
        )
    }
}

/// One recorded operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Which client sent it.
    pub client: usize,
    /// Sequence number within the history (stable order for reports).
    pub seq: usize,
    /// Time of sending and of receiving the answer, since the history began.
    pub invoke: Duration,
    pub ret: Duration,
    pub call: Call,
    pub outcome: Result<Answer, Failure>,
}

/// One Watch call: what was asked and every message received.
#[derive(Debug, Clone)]
pub struct WatchSession {
    /// `start_revision` of the request (0: snapshot first).
    pub start_revision: u64,
    /// `epoch` of the request.
    pub epoch: u64,
    pub messages: Vec<WatchResponse>,
    /// How the stream ended when the server ended it (the client ending it
    /// on purpose records `None`).
    pub end: Option<Failure>,
}

/// Every Watch call of one watcher, in order: the later ones resume the
/// earlier ones (`start_revision` = last revision seen + 1).
#[derive(Debug, Clone)]
pub struct WatchLog {
    /// Name for reports (`watcher 2`, `recorder`).
    pub name: String,
    /// Watched service; empty watches every service.
    pub service: String,
    pub sessions: Vec<WatchSession>,
}

/// Everything one run recorded.
#[derive(Debug, Clone)]
pub struct History {
    pub seed: u64,
    /// Which server life this is (crash test: 0, 1, ... one per restart).
    pub life: usize,
    /// Status.revision once every client had stopped, with the recorder
    /// drained up to it: every revision up to here was seen. `None` when
    /// the server died under the run (crash test).
    pub final_revision: Option<u64>,
    pub ops: Vec<Op>,
    pub watches: Vec<WatchLog>,
    /// The watch-all stream opened before any client: the model is built
    /// from it.
    pub recorder: WatchLog,
}
