//! Per-RPC telemetry, log set-up and trace export.
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
//! Each call also gets an `rpc` tracing span named after the method the
//! OpenTelemetry way (`registry.v1.Registry/Register`, kind server, with
//! `rpc.system`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code`);
//! the handlers record `registry.service`, `registry.instance_id`,
//! `registry.lease_id` and `registry.revision` where the request has them
//! ([`record_service`] and friends). The span is at DEBUG, as tower-http's
//! are: at the default INFO level, with no trace export, it is disabled and
//! costs one cached interest check, so heartbeats stay cheap, and the
//! recording helpers stop at one global level check. Nothing from the
//! request's metadata is recorded: no tokens, no authorization headers.
//!
//! **Trace export** (issue 19): [`init_logging`] with an OTLP endpoint adds
//! a `tracing-opentelemetry` layer that sends the `rpc` spans (whatever
//! `RUST_LOG` says) in batches over OTLP/gRPC to a collector (Jaeger, Tempo,
//! an OpenTelemetry Collector), and makes [`RpcLayer`] honour an incoming
//! W3C `traceparent`: a Register or Resolve made inside a traced request
//! joins that trace. Without an endpoint none of this is installed: no
//! exporter, no header parsing. [`Telemetry::shutdown`] flushes what is
//! queued before the process exits.
use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tower::{Layer, Service};
use tracing::{Level, Span, debug, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    core::Registry,
    error::{Error, Result},
    metrics::{CODE_CANCELLED, CODE_UNKNOWN, Metrics, RpcMetrics},
};

/// Service name reported to the trace backend unless `OTEL_SERVICE_NAME`
/// says otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "registry";

/// Longest wait at shutdown for the last spans to reach the collector: a
/// collector that is down must not hold up a restart.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether [`RpcLayer`] takes each call's parent from its `traceparent`
/// header. Set when a trace exporter is installed, so a daemon without one
/// never looks at the header.
static TRACE_CONTEXT: AtomicBool = AtomicBool::new(false);

/// Makes the RPC spans of servers started from now on join the trace of an
/// incoming W3C `traceparent` header. [`init_logging`] calls it when it
/// installs a trace exporter; call it yourself when embedding the registry
/// under a `tracing-opentelemetry` layer of your own.
pub fn enable_trace_context() {
    TRACE_CONTEXT.store(true, Ordering::Relaxed);
}

/// Tower layer recording per-RPC latency, status codes and a tracing span.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
    trace_context: bool,
}

impl RpcLayer {
    /// The layer feeding a registry's metrics (and joining incoming traces
    /// if [`enable_trace_context`] was called before).
    pub fn new(registry: &Registry) -> Self {
        Self {
            metrics: registry.metrics().clone(),
            trace_context: TRACE_CONTEXT.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
            trace_context: self.trace_context,
        }
    }
}

/// The service [`RpcLayer`] produces.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
    trace_context: bool,
}

/// The `rpc` span of one call to `path` (`/package.Service/Method`).
/// Field values are only computed when the span is enabled.
fn rpc_span(path: &str) -> Span {
    tracing::debug_span!(
        "rpc",
        otel.name = path.strip_prefix('/').unwrap_or(path),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = rpc_parts(path).0,
        rpc.method = rpc_parts(path).1,
        rpc.grpc.status_code = Empty,
        registry.service = Empty,
        registry.instance_id = Empty,
        registry.lease_id = Empty,
        registry.revision = Empty,
    )
}

/// `("registry.v1.Registry", "Register")` of `/registry.v1.Registry/Register`.
fn rpc_parts(path: &str) -> (&str, &str) {
    let name = path.strip_prefix('/').unwrap_or(path);
    name.split_once('/').unwrap_or((name, ""))
}

/// Makes `span` a child of the remote span named by the request's W3C
/// `traceparent` (and `tracestate`) headers, if there is one.
fn join_remote_trace(span: &Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Only fails when the span is not exported (no OpenTelemetry layer, or
    // filtered out): then there is no trace to join.
    let _ = span.set_parent(parent);
}

/// gRPC codes that mean the server failed (OpenTelemetry's semantic
/// conventions for gRPC server spans); a client's mistake is not an error
/// of this span.
fn is_server_error(code: u16) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
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
        let span = rpc_span(path);
        if self.trace_context && !span.is_disabled() {
            join_remote_trace(&span, req.headers());
        }
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
        self.span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
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
        let frame = {
            // Entered so the exported span ends with the body, not the
            // headers.
            let _entered = this.finish.span.enter();
            ready!(this.inner.poll_frame(cx))
        };
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

/// Runs `f` on the current RPC's span when spans can be enabled at all:
/// at the default INFO level without trace export this is one global level
/// check, and nothing is looked up.
fn with_rpc_span(f: impl FnOnce(&Span)) {
    if tracing::level_enabled!(Level::DEBUG) {
        f(&Span::current());
    }
}

/// Records the service name of the current RPC on its span (a no-op when
/// the span is disabled).
pub fn record_service(service: &str) {
    with_rpc_span(|span| {
        span.record("registry.service", service);
    });
}

/// Records the service and instance id the current RPC is about.
pub fn record_instance(service: &str, id: &str) {
    with_rpc_span(|span| {
        span.record("registry.service", service);
        span.record("registry.instance_id", id);
    });
}

/// Records the lease the current RPC used or granted.
pub fn record_lease(lease_id: u64) {
    with_rpc_span(|span| {
        span.record("registry.lease_id", lease_id);
    });
}

/// Records the catalog revision the current RPC wrote or read at.
pub fn record_revision(revision: u64) {
    with_rpc_span(|span| {
        span.record("registry.revision", revision);
    });
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

/// What [`init_logging`] installed: hold it until the end of `main` and
/// call [`Telemetry::shutdown`], or spans still queued are lost.
#[derive(Debug)]
#[must_use = "dropping it without `shutdown` loses the spans still queued"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued and stops the exporter, waiting at most
    /// a few seconds for the collector.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks this thread until the batch processor's
        // own thread has exported, over a tonic channel driven by this
        // runtime: off the async workers, so they can drive it.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export: flush at shutdown failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export: flush at shutdown failed"),
            Err(_) => tracing::warn!(?FLUSH_TIMEOUT, "trace export: flush at shutdown timed out"),
        }
    }
}

/// Installs the global tracing subscriber: `RUST_LOG` filter (default
/// `info`), written to stderr in the given format; with `otlp_endpoint`
/// (`http://host:4317`, or `https://` verified against the system's roots)
/// also a batching OTLP/gRPC exporter of the RPC spans, named
/// `OTEL_SERVICE_NAME` (default [`DEFAULT_SERVICE_NAME`]). The exporter's
/// standard variables apply (`OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_SCHEDULE_DELAY`,
/// `OTEL_RESOURCE_ATTRIBUTES`...). Must be called inside a tokio runtime,
/// which must outlive the returned [`Telemetry`].
pub fn init_logging(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry> {
    use std::io::IsTerminal;
    use tracing_subscriber::{
        EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let Some(endpoint) = otlp_endpoint else {
        // No export: exactly the subscriber of a daemon without tracing
        // support, one global filter, so disabled spans cost nothing.
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
        return Ok(Telemetry { provider: None });
    };
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let provider = otlp_provider(endpoint, &service_name)?;
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "registry");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Source lines and thread names of the span sites say nothing
        // about a call.
        .with_location(false)
        .with_threads(false)
        .with_filter(export_filter());
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| Error::InvalidArgument(format!("cannot install the log subscriber: {e}")))?;
    enable_trace_context();
    tracing::info!(endpoint, service_name, "exporting RPC spans over OTLP/gRPC");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// What goes to the trace backend, whatever `RUST_LOG` says: the daemon's
/// spans (the `rpc` span of every call is at DEBUG), and warnings and
/// errors as events of the span they happen in. Decided from the callsite
/// alone, so tracing caches it per callsite.
fn export_filter() -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool>
{
    tracing_subscriber::filter::filter_fn(|meta| {
        if meta.is_span() {
            meta.target().starts_with("registry") && *meta.level() <= Level::DEBUG
        } else {
            *meta.level() <= Level::WARN
        }
    })
}

/// A tracer provider exporting to `endpoint` in batches.
fn otlp_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
    }
    let exporter = exporter
        .build()
        .map_err(|e| Error::InvalidArgument(format!("otlp_endpoint {endpoint:?}: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_split_the_opentelemetry_way() {
        assert_eq!(
            rpc_parts("/registry.v1.Registry/Register"),
            ("registry.v1.Registry", "Register")
        );
        assert_eq!(rpc_parts("/odd"), ("odd", ""));
    }

    #[test]
    fn only_server_failures_mark_a_span_as_an_error() {
        // NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED: the caller's doing.
        for code in [0, 3, 5, 7, 16] {
            assert!(!is_server_error(code), "{code}");
        }
        for code in [2, 4, 12, 13, 14, 15] {
            assert!(is_server_error(code), "{code}");
        }
    }
}
