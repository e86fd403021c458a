//! Tracing across calls with OpenTelemetry (feature `otel`): a caller's
//! trace follows its calls into the services it calls and into the
//! registry.
//!
//! - **Callers.** With the feature on, every [`BalancedChannel`] call gets a
//!   client span (`prod.v1.ProdService/GetProductStock`, kind client) that
//!   names the instance the call went to (`registry.instance_id`,
//!   `registry.instance_address`, `server.address`, `server.port`; after a
//!   retry, the instance that answered, with `registry.attempts`), and the
//!   request carries the span's context as a W3C `traceparent` header. The
//!   registry calls of a [`RegistryClient`] made inside a trace (resolve,
//!   list, status, deregister) get a client span and the header too; outside
//!   a trace they are left alone, so background keepalives never start
//!   traces of their own.
//! - **Servers.** [`ServerLayer`] is a tower layer for tonic servers
//!   (`Server::builder().layer(ServerLayer::new())`): a server span per call,
//!   the child of the caller's span when the request has a `traceparent`.
//! - **Export.** [`OtlpExport::from_env`] sets up a batching OTLP/gRPC
//!   exporter from the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//!   `OTEL_SERVICE_NAME` variables, and [`OtlpExport::layer`] is the
//!   `tracing` layer that feeds it.
//!
//! The spans are `tracing` spans (target `registry_client::trace`, level
//! INFO) handed to OpenTelemetry by `tracing-opentelemetry`: without such a
//! layer in the subscriber nothing is exported and no header is sent. Span
//! fields follow OpenTelemetry's semantic conventions for gRPC
//! (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`); a
//! client span is an error for any non-OK code, a server span only for codes
//! that mean the server failed (`UNKNOWN`, `DEADLINE_EXCEEDED`,
//! `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`). Nothing from
//! request metadata is recorded: no tokens.
//!
//! [`BalancedChannel`]: crate::BalancedChannel
//! [`RegistryClient`]: crate::RegistryClient

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::{propagation::TextMapPropagator, trace::TraceContextExt};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, Level, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Target of the spans of this module, for `RUST_LOG`-style filters.
pub const TARGET: &str = "registry_client::trace";

/// Longest wait at shutdown for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// `("prod.v1.ProdService", "GetProductStock")` of
/// `/prod.v1.ProdService/GetProductStock`.
fn rpc_parts(path: &str) -> (&str, &str) {
    let name = path.strip_prefix('/').unwrap_or(path);
    name.split_once('/').unwrap_or((name, ""))
}

/// Which side of a call a span is, and so which codes make it an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn is_error(self, code: u16) -> bool {
        match self {
            Side::Client => code != 0,
            Side::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
        }
    }
}

fn record_code(span: &Span, side: Side, code: u16) {
    span.record("rpc.grpc.status_code", code);
    if side.is_error(code) {
        span.record("otel.status_code", "ERROR");
    }
}

/// `grpc-status` of a header map (or trailers), if present.
fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    )
}

/// Writes the context of `span` into `headers` as `traceparent` (and
/// `tracestate`); nothing when the span is not part of an exported trace.
fn inject(span: &Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new()
            .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
    }
}

/// A client span for a call to `path`.
fn client_span(path: &str, service: Option<&str>) -> Span {
    tracing::info_span!(
        target: TARGET,
        "rpc",
        otel.name = path.strip_prefix('/').unwrap_or(path),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        rpc.system = "grpc",
        rpc.service = rpc_parts(path).0,
        rpc.method = rpc_parts(path).1,
        rpc.grpc.status_code = Empty,
        registry.service = service,
        registry.instance_id = Empty,
        registry.instance_address = Empty,
        registry.attempts = Empty,
        server.address = Empty,
        server.port = Empty,
    )
}

/// Records a failed call (no response) on its client span.
fn record_failure(span: &Span, error: &BoxError) {
    let status = match error.downcast_ref::<tonic::Status>() {
        Some(status) => status.clone(),
        None => tonic::Status::unavailable(error.to_string()),
    };
    record_code(span, Side::Client, status.code() as u16);
    span.record("otel.status_description", status.message());
}

/// The response of a traced call: its body keeps the span open until the
/// trailers (and their status) arrive.
fn traced_response(span: Span, side: Side, response: http::Response<Body>) -> http::Response<Body> {
    if let Some(code) = grpc_status(response.headers()) {
        record_code(&span, side, code);
    }
    response.map(|inner| {
        Body::new(SpanBody {
            inner,
            span: Some(span),
            side,
        })
    })
}

// --- Hooks of the balanced channel ---

/// Opens the client span of one balanced-channel call to `service` and puts
/// its context into the request.
pub(crate) fn start_call(service: &str, request: &mut http::Request<Body>) -> Span {
    let span = client_span(request.uri().path(), Some(service));
    if !span.is_disabled() {
        inject(&span, request.headers_mut());
    }
    span
}

/// Runs a balanced-channel call inside its span and records the outcome.
pub(crate) async fn finish_call(
    span: Span,
    call: impl Future<Output = Result<http::Response<Body>, BoxError>>,
) -> Result<http::Response<Body>, BoxError> {
    if span.is_disabled() {
        return call.await;
    }
    match call.instrument(span.clone()).await {
        Ok(response) => Ok(traced_response(span, Side::Client, response)),
        Err(error) => {
            record_failure(&span, &error);
            Err(error)
        }
    }
}

/// Records the instance an attempt goes to on the current call's span (the
/// last attempt's instance is the one that answered).
pub(crate) fn attempt(id: &str, address: &str, attempt: usize) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    span.record("registry.instance_id", id);
    span.record("registry.instance_address", address);
    span.record("registry.attempts", attempt as u64);
    if let Some((host, port)) = address.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        span.record("server.address", host);
        if let Ok(port) = port.parse::<u16>() {
            span.record("server.port", u64::from(port));
        }
    }
}

// --- Registry calls ---

/// The channel of a [`crate::RegistryClient`]'s one-shot calls: inside a
/// trace, each call gets a client span and a `traceparent`; outside one it
/// is passed through as it is.
#[derive(Debug, Clone)]
pub(crate) struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, ResBody> Service<http::Request<Body>> for Traced<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: Send + 'static,
{
    type Response = http::Response<SpanBody<ResBody>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let current = Span::current();
        let in_trace = !current.is_disabled() && current.context().span().span_context().is_valid();
        let span = in_trace.then(|| {
            let span = client_span(request.uri().path(), None);
            inject(&span, request.headers_mut());
            span
        });
        let call = {
            let _entered = span.as_ref().map(Span::enter);
            self.inner.call(request)
        };
        Box::pin(async move {
            let result = match &span {
                Some(s) => call.instrument(s.clone()).await,
                None => call.await,
            };
            match result {
                Ok(response) => {
                    if let (Some(span), Some(code)) = (&span, grpc_status(response.headers())) {
                        record_code(span, Side::Client, code);
                    }
                    Ok(response.map(|inner| SpanBody {
                        inner,
                        span,
                        side: Side::Client,
                    }))
                }
                Err(error) => {
                    let error = error.into();
                    if let Some(span) = &span {
                        record_failure(span, &error);
                    }
                    Err(error)
                }
            }
        })
    }
}

// --- Server side ---

/// Tower layer for tonic servers: a server span per call, joined to the
/// caller's trace through the request's `traceparent`. Add it with
/// `tonic::transport::Server::builder().layer(ServerLayer::new())`; the
/// handlers then run inside the span, so their own spans and events nest
/// under it.
#[derive(Debug, Clone, Default)]
pub struct ServerLayer {
    _private: (),
}

impl ServerLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerService { inner }
    }
}

/// The service [`ServerLayer`] produces.
#[derive(Debug, Clone)]
pub struct ServerService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ServerService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<SpanBody<ResBody>>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let span = tracing::info_span!(
            target: TARGET,
            "rpc",
            otel.name = path.strip_prefix('/').unwrap_or(path),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = rpc_parts(path).0,
            rpc.method = rpc_parts(path).1,
            rpc.grpc.status_code = Empty,
        );
        if !span.is_disabled() && request.headers().contains_key("traceparent") {
            let parent = TraceContextPropagator::new()
                .extract(&opentelemetry_http::HeaderExtractor(request.headers()));
            // Fails only when the span is not exported: nothing to join.
            let _ = span.set_parent(parent);
        }
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ServerFuture {
            inner,
            span: Some(span),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`ServerService`]: the handler, run inside the call's span.
    #[derive(Debug)]
    pub struct ServerFuture<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
    }
}

impl<F, B, E> Future for ServerFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<SpanBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let span = this.span.as_ref().expect("polled after completion");
            let _entered = span.enter();
            ready!(this.inner.poll(cx))
        };
        let span = this.span.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(code) = grpc_status(response.headers()) {
                    record_code(&span, Side::Server, code);
                }
                Ok(response.map(|inner| SpanBody {
                    inner,
                    span: Some(span),
                    side: Side::Server,
                }))
            }
            Err(e) => {
                record_code(&span, Side::Server, 2);
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call's span open until the body ends,
    /// and records the `grpc-status` of its trailers on it.
    #[derive(Debug)]
    pub struct SpanBody<B> {
        #[pin]
        inner: B,
        span: Option<Span>,
        side: Side,
    }
}

impl<B> HttpBody for SpanBody<B>
where
    B: HttpBody<Data = Bytes>,
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
            let _entered = this.span.as_ref().map(Span::enter);
            ready!(this.inner.poll_frame(cx))
        };
        match &frame {
            Some(Ok(f)) => {
                if let (Some(code), Some(span)) =
                    (f.trailers_ref().and_then(grpc_status), this.span.as_ref())
                {
                    record_code(span, *this.side, code);
                }
            }
            // The stream broke: the call did not complete.
            Some(Err(_)) => {
                if let Some(span) = this.span.as_ref() {
                    record_code(span, *this.side, 14);
                }
            }
            None => {}
        }
        if frame.is_none() {
            // The call is over: close the span now rather than whenever
            // the body is dropped.
            this.span.take();
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

// --- Export ---

/// A batching OTLP/gRPC span exporter, set up from the standard
/// OpenTelemetry variables. Keep it until the end of `main` and call
/// [`OtlpExport::shutdown`], or the spans still queued are lost.
///
/// ```no_run
/// # async fn f() -> Result<(), registry_client::Error> {
/// use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};
/// let export = registry_client::trace::OtlpExport::from_env("prod_client")?;
/// tracing_subscriber::registry()
///     .with(tracing_subscriber::fmt::layer())
///     .with(export.as_ref().map(|e| e.layer()))
///     .init();
/// // ... run ...
/// if let Some(export) = export {
///     export.shutdown().await;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping it without `shutdown` loses the spans still queued"]
pub struct OtlpExport {
    provider: SdkTracerProvider,
    endpoint: String,
    service_name: String,
}

impl OtlpExport {
    /// An exporter to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (an OTLP/gRPC collector such as
    /// `http://127.0.0.1:4317`), as service `OTEL_SERVICE_NAME` (else
    /// `default_service_name`); `None` when no endpoint is set or
    /// `OTEL_SDK_DISABLED=true`. The exporter's own variables apply too
    /// (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`,
    /// `OTEL_RESOURCE_ATTRIBUTES`...). Must be called inside a tokio
    /// runtime, which must outlive the exporter.
    pub fn from_env(default_service_name: &str) -> Result<Option<Self>, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(None);
        };
        let service_name =
            var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service_name.to_owned());
        Self::new(&endpoint, &service_name).map(Some)
    }

    /// An exporter to the collector at `endpoint` (`http://host:port`, or
    /// `https://` verified against the system's roots), as service
    /// `service_name`.
    pub fn new(endpoint: &str, service_name: &str) -> Result<Self, Error> {
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        let invalid = |reason: String| Error::InvalidConfig {
            what: "OTLP endpoint".into(),
            reason,
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| invalid(format!("{endpoint:?} is not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(invalid(format!(
                    "{endpoint:?}: expected http://host:port or https://host:port (OTLP/gRPC, e.g. http://127.0.0.1:4317)"
                )));
            }
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        if https {
            exporter = exporter
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
        }
        let exporter = exporter
            .build()
            .map_err(|e| invalid(format!("{endpoint:?}: {e}")))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        // For other instrumentation in the process (HTTP clients...).
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Self {
            provider,
            endpoint: endpoint.to_owned(),
            service_name: service_name.to_owned(),
        })
    }

    /// The collector spans go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The service name spans are reported under.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The `tracing` layer that exports spans: every span at INFO or above
    /// (those of this crate included, whatever the log filter says), and
    /// warnings and errors as events of their span.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer as _;
        let tracer = self.provider.tracer("registry-client");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                if meta.is_span() {
                    *meta.level() <= Level::INFO
                } else {
                    *meta.level() <= Level::WARN
                }
            }))
    }

    /// Sends the spans still queued and stops the exporter, waiting at most
    /// a few seconds for the collector.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The SDK blocks until its export thread is done, over a tonic
        // channel this runtime drives: off the async workers.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_secs(1), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export: flush failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export: flush failed"),
            Err(_) => tracing::warn!("trace export: flush timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_any_failure_server_errors_only_its_own() {
        assert!(!Side::Client.is_error(0));
        assert!(Side::Client.is_error(5), "NOT_FOUND fails the caller");
        assert!(!Side::Server.is_error(5), "NOT_FOUND is the caller's doing");
        assert!(Side::Server.is_error(14));
    }

    #[test]
    fn method_names_split_the_opentelemetry_way() {
        assert_eq!(
            rpc_parts("/prod.v1.ProdService/GetProductStock"),
            ("prod.v1.ProdService", "GetProductStock")
        );
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        let msg = |e: &str| OtlpExport::new(e, "x").unwrap_err().to_string();
        assert!(msg("127.0.0.1:4317").contains("expected http://host:port"));
        assert!(msg("grpc://c:4317").contains("expected http://host:port"));
    }
}
