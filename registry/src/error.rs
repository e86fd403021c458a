//! The daemon's domain errors and their single mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything a registry operation can refuse or fail with. Each variant maps
/// to the most specific gRPC code; messages name the field and the limit so a
/// caller can fix the request without reading server logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed request field, or a TTL below the minimum.
    #[error("{0}")]
    InvalidArgument(String),
    /// A value above its configured maximum (TTL above max).
    #[error("{0}")]
    OutOfRange(String),
    /// Unknown or expired lease, or unknown instance.
    #[error("{0}")]
    NotFound(String),
    /// A configured cap (leases, instances, watchers...) is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// No or unknown credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials valid, but not for this service or lease.
    #[error("{0}")]
    PermissionDenied(String),
    /// The registry cannot serve the request right now (shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// A concurrent change to the same instance won (another cluster node
    /// registered it meanwhile); retrying decides afresh.
    #[error("{0}")]
    Aborted(String),
    /// The request cannot be served by this node as things stand (an
    /// instance registered through another cluster node, whose state only
    /// that node may change).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Binding or serving the listener failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Socket-level failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The data directory (`--data-dir`) cannot be used: unreadable,
    /// unwritable, or a restore into a registry that already has state.
    #[error("data dir: {0}")]
    DataDir(String),
    /// Reflection descriptors failed to load (a build defect).
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Shorthand used throughout the daemon.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::NotFound(_) => Code::NotFound,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Transport(_) | Error::Io(_) | Error::DataDir(_) | Error::Reflection(_) => {
                // Internal causes are logged here, not leaked to callers.
                tracing::error!(error = %err, "internal error");
                return Status::internal("internal error");
            }
        };
        Status::new(code, err.to_string())
    }
}
