//! Per-RPC telemetry and log set-up.
//!
//! [`RpcLayer`] is a tower layer on the tonic server, outermost, so it sees
//! every call the way the client does (including ones the limits layer
//! answers itself). Per call it finds the method's index once from the
//! request path, times the call until its response is ready (for streaming
//! methods: until the stream is open), and counts the final `grpc-status`,
//! read from the response headers (errors are trailers-only responses) or
//! from the trailers at the end of the body (successes and streams). A body
//! dropped before its trailers is a call the client abandoned: `CANCELLED`.
//!
//! Each call also gets a `rpc` tracing span with `method`, `service` (the
//! handlers record the service name where the request has one) and `code`.
//! The span is at DEBUG, as tower-http's are: at the default INFO level it
//! is disabled and costs one cached interest check, so heartbeats stay
//! cheap. Nothing from the request's metadata is recorded: no tokens, no
//! authorization headers.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::{Span, debug, field::Empty};

use crate::{
    core::Registry,
    metrics::{CODE_CANCELLED, CODE_UNKNOWN, Metrics, RpcMetrics},
};

/// Tower layer recording per-RPC latency, status codes and a tracing span.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    /// The layer feeding a registry's metrics.
    pub fn new(registry: &Registry) -> Self {
        Self {
            metrics: registry.metrics().clone(),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLayer`] produces.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let method = RpcMetrics::method_index(path);
        let span = tracing::debug_span!("rpc", method = path, service = Empty, code = Empty);
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        RpcFuture {
            inner,
            finish: Some(Finish {
                metrics: self.metrics.clone(),
                method,
                span,
                start: Instant::now(),
                done: false,
            }),
        }
    }
}

/// Records the outcome of one call exactly once: with the code it ended
/// with, or `CANCELLED` if it is dropped first.
struct Finish {
    metrics: Arc<Metrics>,
    method: usize,
    span: Span,
    start: Instant,
    done: bool,
}

impl fmt::Debug for Finish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finish")
            .field("method", &RpcMetrics::labels(self.method))
            .field("done", &self.done)
            .finish()
    }
}

impl Finish {
    fn record(&mut self, code: u16) {
        if self.done {
            return;
        }
        self.done = true;
        self.metrics.rpc().count_code(self.method, code);
        let name = RpcMetrics::code_name(code);
        self.span.record("code", name);
        debug!(
            parent: &self.span,
            code = name,
            elapsed_us = self.start.elapsed().as_micros() as u64,
            "rpc finished"
        );
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.record(CODE_CANCELLED);
    }
}

/// `grpc-status` of a header map, if present.
fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    let v = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(CODE_UNKNOWN),
    )
}

pin_project_lite::pin_project! {
    /// Future of [`RpcService`]: the inner call, run inside the call's span.
    #[derive(Debug)]
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        finish: Option<Finish>,
    }
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<RpcBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let finish = this.finish.as_ref().expect("polled after completion");
            let _entered = finish.span.enter();
            ready!(this.inner.poll(cx))
        };
        let mut finish = this.finish.take().expect("polled after completion");
        finish
            .metrics
            .rpc()
            .observe_latency(finish.method, finish.start.elapsed());
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(code) = grpc_status(response.headers()) {
                    finish.record(code);
                }
                Ok(response.map(|inner| RpcBody { inner, finish }))
            }
            Err(e) => {
                finish.record(CODE_UNKNOWN);
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// Response body of [`RpcService`]: passes frames through and records
    /// the status from the trailers.
    #[derive(Debug)]
    pub struct RpcBody<B> {
        #[pin]
        inner: B,
        finish: Finish,
    }
}

impl<B> Body for RpcBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(grpc_status) {
                    this.finish.record(code);
                }
            }
            Some(Err(_)) => this.finish.record(CODE_UNKNOWN),
            // Ended without a status: not a well-formed gRPC response.
            None => this.finish.record(CODE_UNKNOWN),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records the service name of the current RPC on its span (a no-op when
/// the span is disabled).
pub fn record_service(service: &str) {
    Span::current().record("service", service);
}

/// Log output format of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours on a terminal).
    Text,
    /// One JSON object per line with the current span's fields, for log
    /// shippers.
    Json,
}

/// Installs the global tracing subscriber: `RUST_LOG` filter (default
/// `info`), written to stderr in the given format.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
