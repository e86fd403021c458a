//! The crate's one error type, and how gRPC statuses map onto it.

use tonic::Code;

/// Everything that can go wrong talking to the registry.
///
/// The split that matters to callers is [`Error::Unavailable`] (transient:
/// retry, or rely on the background tasks, which retry on their own) versus
/// [`Error::Rejected`] (the registry understood the request and said no:
/// retrying the same request will not help).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry address list could not be parsed.
    #[error("invalid registry address {address:?}: {reason}")]
    InvalidAddress {
        /// The offending entry of the address list.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// No registry node could be reached, or it did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(tonic::Status),
    /// The registry answered with an error (invalid argument, limits...).
    #[error("registry rejected the request: {0}")]
    Rejected(tonic::Status),
    /// The client's background task is gone (its runtime is shutting down).
    #[error("the registry client's background task has stopped")]
    Closed,
}

impl Error {
    /// True when the failure is transient (unreachable, timed out) rather
    /// than a refusal of the request itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// The gRPC status behind this error, when there is one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Unavailable(s) | Error::Rejected(s) => Some(s),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        if is_transient(&status) {
            Error::Unavailable(status)
        } else {
            Error::Rejected(status)
        }
    }
}

/// Codes that mean "the registry (or the path to it) failed", as opposed to
/// an answer about the request. `Unknown` is what tonic reports for broken
/// connections and h2 resets, so it is treated as transient too.
pub(crate) fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
    )
}
