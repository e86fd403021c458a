//! The crate's one error type, and how gRPC statuses map onto it.
//!
//! Every variant prints as one flat line that says what failed and why,
//! e.g. `cannot reach registry at http://127.0.0.1:7411: connection refused`
//! or `registry refused the request (invalid argument): invalid service name
//! "Prod": ...`: no nested `code: '...', message: "..."` dumps, so the text
//! can go straight into a log line or a CLI's stderr.

use tonic::Code;

/// Everything that can go wrong talking to the registry.
///
/// The split that matters to callers is [`Error::Unavailable`] /
/// [`Error::Connect`] (transient: retry, or rely on the background tasks,
/// which retry on their own) versus [`Error::Rejected`] (the registry
/// understood the request and said no: retrying it will not help).
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
    /// A client setting is unusable (a TLS file that cannot be read, a token
    /// that is not printable ASCII...).
    #[error("invalid client configuration ({what}): {reason}")]
    InvalidConfig {
        /// The setting.
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// No registry node accepted a connection (eager connect).
    #[error("cannot reach registry at {address}: {}", root_cause(source))]
    Connect {
        /// The last node tried.
        address: String,
        /// The transport error of that attempt.
        source: tonic::transport::Error,
    },
    /// A registry node could not be reached, or did not answer in time.
    #[error("registry{} unavailable: {}", at(registry), flat(status))]
    Unavailable {
        /// The node the call went to (empty when unknown).
        registry: String,
        /// What the transport or the node reported.
        status: tonic::Status,
    },
    /// The registry answered with an error (invalid argument, limits...).
    #[error("registry refused the request ({}): {}", code_name(.0.code()), one_line(.0.message()))]
    Rejected(tonic::Status),
    /// The client's background task is gone (its runtime is shutting down).
    #[error("the registry client's background task has stopped")]
    Closed,
}

impl Error {
    /// True when the failure is transient (unreachable, timed out) rather
    /// than a refusal of the request itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Connect { .. })
    }

    /// The gRPC status behind this error, when there is one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Unavailable { status, .. } | Error::Rejected(status) => Some(status),
            _ => None,
        }
    }

    /// Classifies a status answered by (or on the way to) `registry`.
    pub(crate) fn from_status(registry: &str, status: tonic::Status) -> Self {
        if is_transient(&status) {
            Error::Unavailable {
                registry: registry.to_owned(),
                status,
            }
        } else {
            Error::Rejected(status)
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_status("", status)
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

/// The innermost error of a chain, lower-cased at the start and without
/// "(os error N)": `connection refused` rather than three nested wrappers.
pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let mut msg = one_line(&cur.to_string());
    if let Some(i) = msg.find(" (os error") {
        msg.truncate(i);
    }
    let mut chars = msg.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => msg,
    }
}

/// A status as one line: its message, plus the root cause of its source
/// when that adds something (tonic's `tcp connect error` says little on its
/// own; `connection refused` says what happened).
pub(crate) fn flat(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut message = one_line(status.message());
    if let Some(i) = message.find(" (os error") {
        message.truncate(i);
    }
    let Some(source) = status.source() else {
        return if message.is_empty() {
            code_name(status.code()).to_owned()
        } else {
            message
        };
    };
    let cause = root_cause(source);
    if message.is_empty() {
        cause
    } else if message.to_lowercase().contains(&cause.to_lowercase()) {
        message
    } else {
        format!("{message}: {cause}")
    }
}

/// ` at ADDRESS`, or nothing when the address is unknown.
fn at(registry: &str) -> String {
    if registry.is_empty() {
        String::new()
    } else {
        format!(" at {registry}")
    }
}

/// Lower-case name of a gRPC code, as people say it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Newlines and tabs folded into spaces, so a message stays one log line.
pub(crate) fn one_line(s: &str) -> String {
    if !s.contains(['\n', '\r', '\t']) {
        return s.to_owned();
    }
    s.split(['\n', '\r', '\t'])
        .filter(|p| !p.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_flat_on_one_line() {
        let rejected = Error::from(tonic::Status::invalid_argument(
            "invalid service name \"Prod\": uppercase\nnot allowed",
        ));
        assert_eq!(
            rejected.to_string(),
            "registry refused the request (invalid argument): invalid service name \"Prod\": uppercase not allowed"
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let unavailable = Error::from_status(
            "http://127.0.0.1:1",
            tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(io)))),
        );
        let text = unavailable.to_string();
        assert!(unavailable.is_unavailable());
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.starts_with("registry at http://127.0.0.1:1 unavailable: ")
                && text.to_lowercase().ends_with("connection refused"),
            "{text}"
        );
        assert!(!rejected.is_unavailable());
        assert_eq!(
            Error::from(tonic::Status::deadline_exceeded("")).to_string(),
            "registry unavailable: deadline exceeded"
        );
    }
}
