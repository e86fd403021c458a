//! Transport-level resource limits: what a hostile or broken peer can cost
//! the daemon before the registry's own caps (leases, instances, watchers)
//! even see a request.
//!
//! - [`limit_incoming`] wraps the accept loop: at most
//!   [`Config::max_connections`] connections are open at once (a semaphore
//!   permit travels with each connection's [`LimitedIo`]); beyond that a new
//!   connection is closed at once. [`LimitedIo`] also reaps connections that
//!   stall: one that has not sent [`HANDSHAKE_BYTES`] within
//!   [`Config::handshake_timeout`] (silent sockets, truncated HTTP/2
//!   prefaces), or that sends nothing for [`Config::idle_timeout`].
//! - [`LimitsLayer`] sits on the tonic server: it bounds how long a call may
//!   take to produce its response ([`Config::request_timeout`]) and rewrites
//!   the codes tonic gives to bad input into gRPC's conventional ones: an
//!   oversize message becomes `RESOURCE_EXHAUSTED` naming
//!   `max_message_size` (tonic says `OUT_OF_RANGE`), an undecodable one
//!   `INVALID_ARGUMENT` (tonic says `INTERNAL`, which would blame us).
//!
//! HTTP/2-level limits (concurrent streams per connection, keepalive pings)
//! are plain settings of the tonic server; see [`crate::server`].

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_stream::StreamExt as _;
use tonic::{
    Code, Status,
    transport::server::{Connected, TcpConnectInfo, TcpIncoming},
};
use tower::{Layer, Service};
use tracing::{debug, warn};

use crate::config::Config;

/// Bytes a new connection must send within the handshake timeout: the
/// length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
/// Under TLS the ClientHello alone is longer, so the same rule holds.
pub const HANDSHAKE_BYTES: u64 = 24;

/// Shortest interval between two "connection refused: over the cap" warnings:
/// a flood must not turn into a log flood; the count is in the next warning.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What tonic's decoder says when a message's length prefix exceeds the
/// decoding limit (tonic 0.14 `codec/decode.rs`); the status is `OUT_OF_RANGE`.
const TONIC_TOO_LARGE: &str = "decoded message length too large: found ";
/// What tonic-prost says when bytes are not the expected message; the status
/// is `INTERNAL`.
const PROST_DECODE_FAILED: &str = "failed to decode Protobuf message";
/// tonic's prefix for a malformed gRPC frame (bad compression flag); the
/// status is `INTERNAL`.
const TONIC_PROTOCOL_ERROR: &str = "protocol error:";

/// Counters of connections the limits turned away or reaped, for operators
/// and tests. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    rejected: AtomicU64,
    timed_out: AtomicU64,
    last_reject_log_ms: AtomicU64,
}

impl ConnectionStats {
    /// Connections closed on accept because `max_connections` were open.
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Connections closed by the handshake or idle timeout.
    pub fn timed_out(&self) -> u64 {
        self.inner.timed_out.load(Ordering::Relaxed)
    }
}

/// The accept loop with the connection cap and per-connection timeouts
/// applied; hand it to `serve_with_incoming_shutdown`. Over the cap, a new
/// connection is dropped (closed) as soon as it is accepted: nothing is read
/// from it and nothing queues behind the cap.
pub fn limit_incoming(
    listener: TcpListener,
    config: &Config,
    stats: ConnectionStats,
) -> impl Stream<Item = io::Result<LimitedIo>> + Send + 'static {
    let max = config.max_connections;
    let permits = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    let timeouts = Timeouts {
        handshake: config.handshake_timeout,
        idle: config.idle_timeout,
    };
    let started = Instant::now();
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .filter_map(move |accepted| {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => return Some(Err(e)),
            };
            match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(Ok(LimitedIo::new(
                    stream,
                    permit,
                    timeouts,
                    stats.clone(),
                ))),
                Err(_) => {
                    let n = stats.inner.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                    let now_ms = started.elapsed().as_millis() as u64;
                    let last = stats.inner.last_reject_log_ms.load(Ordering::Relaxed);
                    if (n == 1 || now_ms.saturating_sub(last) >= REJECT_LOG_INTERVAL.as_millis() as u64)
                        && stats
                            .inner
                            .last_reject_log_ms
                            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        warn!(
                            peer = ?stream.peer_addr().ok(),
                            rejected_total = n,
                            "closed a new connection: {max} open, the limit is {max} (max_connections)"
                        );
                    }
                    drop(stream);
                    None
                }
            }
        })
}

/// Handshake and idle timeouts of one connection; zero disables either.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    idle: Duration,
}

/// An accepted TCP connection under the limits: holds one of the
/// `max_connections` permits until hyper drops it, and fails a read that has
/// waited past the handshake or idle deadline, which makes hyper close the
/// connection. Everything else delegates to the [`TcpStream`].
#[derive(Debug)]
pub struct LimitedIo {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    timeouts: Timeouts,
    stats: ConnectionStats,
    accepted: Instant,
    last_read: Instant,
    /// Bytes read so far, counted up to [`HANDSHAKE_BYTES`].
    seen: u64,
    /// Wakes a pending read at the deadline; re-armed lazily (only when it
    /// fires early), so a busy connection does not touch the timer wheel on
    /// every read.
    timer: Option<Pin<Box<Sleep>>>,
}

impl LimitedIo {
    fn new(
        io: TcpStream,
        permit: OwnedSemaphorePermit,
        timeouts: Timeouts,
        stats: ConnectionStats,
    ) -> Self {
        let now = Instant::now();
        Self {
            io,
            _permit: permit,
            timeouts,
            stats,
            accepted: now,
            last_read: now,
            seen: 0,
            timer: None,
        }
    }

    /// The moment a read with no data fails, and which limit that is.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let handshake = (!self.timeouts.handshake.is_zero() && self.seen < HANDSHAKE_BYTES)
            .then(|| (self.accepted + self.timeouts.handshake, "handshake_timeout"));
        let idle = (!self.timeouts.idle.is_zero())
            .then(|| (self.last_read + self.timeouts.idle, "idle_timeout"));
        match (handshake, idle) {
            (Some(h), Some(i)) => Some(if h.0 <= i.0 { h } else { i }),
            (h, i) => h.or(i),
        }
    }

    /// Called when a read is pending: `Ready` with an error once the
    /// deadline has passed, otherwise arms the timer to wake this read then.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some((deadline, limit)) = self.deadline() else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.deadline() < deadline {
                // Data arrived since the timer was armed: move it later.
                timer.as_mut().reset(deadline);
            }
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                break;
            }
        }
        self.stats.inner.timed_out.fetch_add(1, Ordering::Relaxed);
        let after = match limit {
            "handshake_timeout" => self.timeouts.handshake,
            _ => self.timeouts.idle,
        };
        debug!(
            peer = ?self.io.peer_addr().ok(),
            "closing connection: nothing received for {} ({limit})",
            humantime::format_duration(after)
        );
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "nothing received for {}, the limit is {} ({limit})",
                humantime::format_duration(after),
                humantime::format_duration(after)
            ),
        ))
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    this.seen = (this.seen + n).min(HANDSHAKE_BYTES);
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx).map(Err),
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for LimitedIo {
    // The same info as a bare TcpStream, so `Request::remote_addr` (and the
    // per-connection watcher cap keyed on it) keeps working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Tower layer for the tonic server: per-request timeout and the status
/// rewrites for oversize and undecodable messages (see the module docs).
#[derive(Debug, Clone)]
pub struct LimitsLayer {
    max_message_size: usize,
    request_timeout: Option<Duration>,
}

impl LimitsLayer {
    /// The layer for a config's `max_message_size` and `request_timeout`.
    pub fn new(config: &Config) -> Self {
        Self {
            max_message_size: config.max_message_size,
            request_timeout: (!config.request_timeout.is_zero()).then_some(config.request_timeout),
        }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`LimitsLayer`] produces.
#[derive(Debug, Clone)]
pub struct Limits<S> {
    inner: S,
    layer: LimitsLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Limits<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Unpin,
{
    type Response = http::Response<LimitsBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let max = self.layer.max_message_size;
        let timeout = self.layer.request_timeout;
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = match timeout {
                None => call.await?,
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(response) => response?,
                    Err(_) => {
                        let d = humantime::format_duration(limit);
                        let status = Status::deadline_exceeded(format!(
                            "request did not complete within {d}, the limit is {d} (request_timeout)"
                        ));
                        return Ok(status.into_http::<()>().map(|()| LimitsBody::Empty));
                    }
                },
            };
            let (mut parts, body) = response.into_parts();
            rewrite_status(&mut parts.headers, max);
            Ok(http::Response::from_parts(
                parts,
                LimitsBody::Inner { body, max },
            ))
        })
    }
}

/// Response body of [`Limits`]: the inner body with its trailers rewritten
/// (a streaming call's decode error arrives there), or empty for a call
/// answered by the layer itself.
#[derive(Debug)]
pub enum LimitsBody<B> {
    /// The service's body.
    Inner {
        /// The body.
        body: B,
        /// `max_message_size`, quoted in rewritten messages.
        max: usize,
    },
    /// No body: a trailers-only response.
    Empty,
}

impl<B> Body for LimitsBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            LimitsBody::Empty => Poll::Ready(None),
            LimitsBody::Inner { body, max } => {
                let frame = ready!(Pin::new(body).poll_frame(cx));
                Poll::Ready(frame.map(|frame| {
                    frame.map(|frame| match frame.into_trailers() {
                        Ok(mut trailers) => {
                            rewrite_status(&mut trailers, *max);
                            Frame::trailers(trailers)
                        }
                        Err(frame) => frame,
                    })
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            LimitsBody::Empty => true,
            LimitsBody::Inner { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            LimitsBody::Empty => SizeHint::with_exact(0),
            LimitsBody::Inner { body, .. } => body.size_hint(),
        }
    }
}

/// Rewrites tonic's status for an oversize or undecodable request message
/// in `headers` (response headers of a trailers-only response, or trailers).
/// Every other status, including our own `OUT_OF_RANGE` and `INTERNAL`
/// answers, passes untouched: only tonic's exact wording is matched.
fn rewrite_status(headers: &mut HeaderMap, max_message_size: usize) {
    let Some(code) = headers.get(Status::GRPC_STATUS) else {
        return;
    };
    // Cheap byte check first: the success path must not parse anything.
    let code = code.as_bytes();
    if code != b"11" && code != b"13" {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let message = status.message();
    let replacement = match status.code() {
        Code::OutOfRange => message.find(TONIC_TOO_LARGE).map(|at| {
            let found: String = message[at + TONIC_TOO_LARGE.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Status::resource_exhausted(format!(
                "request message is {found} bytes, the limit is {max_message_size} (max_message_size)"
            ))
        }),
        Code::Internal
            if message.starts_with(PROST_DECODE_FAILED)
                || message.starts_with(TONIC_PROTOCOL_ERROR) =>
        {
            Some(Status::invalid_argument(format!(
                "malformed request message: {message}"
            )))
        }
        _ => None,
    };
    if let Some(replacement) = replacement {
        // Only grpc-status and grpc-message are replaced (insert overwrites).
        if replacement.add_header(headers).is_err() {
            warn!("could not rewrite a grpc-status header");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(status: &Status) -> HeaderMap {
        let mut h = HeaderMap::new();
        status.add_header(&mut h).unwrap();
        h
    }

    #[test]
    fn oversize_becomes_resource_exhausted_naming_the_limit() {
        let mut h = headers_of(&Status::out_of_range(
            "Error, decoded message length too large: found 5242900 bytes, the limit is: 4194304 bytes",
        ));
        rewrite_status(&mut h, 4194304);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request message is 5242900 bytes, the limit is 4194304 (max_message_size)"
        );
    }

    #[test]
    fn decode_failure_becomes_invalid_argument() {
        let mut h = headers_of(&Status::internal(
            "failed to decode Protobuf message: Instance.service: invalid string value: data is not UTF-8 encoded",
        ));
        rewrite_status(&mut h, 1);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("not UTF-8"), "{}", s.message());
    }

    #[test]
    fn other_statuses_are_untouched() {
        for status in [
            Status::out_of_range("ttl_ms 5000000 (1h 23m 20s) is above the maximum 1h"),
            Status::internal("internal error"),
            Status::ok(""),
            Status::not_found("lease 1 not found"),
        ] {
            let before = headers_of(&status);
            let mut after = before.clone();
            rewrite_status(&mut after, 1);
            assert_eq!(before, after, "{status:?}");
        }
    }
}
