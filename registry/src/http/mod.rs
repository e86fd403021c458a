//! The HTTP front end (`--http-listen`, `127.0.0.1:7412` in the binary):
//! the registry for scripts, browsers, Prometheus and languages without
//! gRPC. A thin adapter over the same [`Registry`] handle the gRPC service
//! uses, so validation, errors, permissions and watch semantics are the
//! same by construction.
//!
//! | Route | What |
//! | --- | --- |
//! | `GET /v1/services` | `ListServicesResponse`; ETag, long-poll |
//! | `GET /v1/services/{name}` | `ResolveResponse`; selector and health filter as query parameters; ETag, long-poll |
//! | `GET /v1/status` | `StatusResponse`; ETag |
//! | `GET /v1/watch`, `GET /v1/watch/{name}` | Server-Sent Events of the Watch stream, resumable with `Last-Event-ID` ([`sse`]) |
//! | `POST /v1/register`, `/v1/heartbeat`, `/v1/deregister` | the write RPCs, JSON bodies ([`api`]) |
//! | `GET /v1/prometheus/sd` | Prometheus `http_sd` targets ([`sd`]) |
//! | `GET /` | the dashboard ([`dashboard`]) |
//! | `GET /metrics`, `/healthz`, `/readyz` | as on `--metrics-listen` (see [`crate::ops`]) |
//!
//! Bodies are the proto3 JSON mapping of the `registry.v1` messages
//! (lowerCamelCase names, 64-bit integers as strings, enums by name, every
//! field present), as grpc-gateway writes them. Errors are
//! `{"code": <gRPC code number>, "status": "<gRPC code name>", "message": ...}`
//! with the HTTP status grpc-gateway maps that code to.
//!
//! Auth: with `--auth-file`, every `/v1` route and `/metrics` need
//! `Authorization: Bearer <token>` (the same tokens, roles and lease
//! ownership as gRPC) and share the identity's gRPC rate limit; the dashboard
//! page itself, `/healthz` and `/readyz` are open. Bound to a loopback
//! address, the server answers only requests addressed to a loopback name
//! (`Host: localhost`, `127.0.0.1`, `[::1]`), so a web page cannot reach it
//! through DNS rebinding; writes need `Content-Type: application/json`, so a
//! cross-site form cannot post one.

pub mod api;
pub mod dashboard;
pub mod longpoll;
pub mod sd;
pub mod sse;

use std::{
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Extension, Router,
    body::Body,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{Code, Status};
use tracing::info;

use crate::{
    auth::{Auth, Identity, RateLimit},
    core::Registry,
    error::{Error, Result},
};

/// Shared state of the HTTP front end.
#[derive(Debug, Clone)]
pub struct HttpApi {
    registry: Registry,
    auth: Option<Arc<Auth>>,
    rate: Option<Arc<RateLimit>>,
    waiters: Arc<longpoll::Waiters>,
    /// The listener is on a loopback address: only loopback `Host`s answer.
    loopback: bool,
}

impl HttpApi {
    /// The front end of `registry`, authenticating with `auth` and limiting
    /// with `rate` (the gRPC server's, so budgets are shared).
    pub fn new(
        registry: Registry,
        auth: Option<Arc<Auth>>,
        rate: Option<Arc<RateLimit>>,
        local: SocketAddr,
    ) -> Self {
        Self {
            waiters: longpoll::Waiters::new(registry.clone()),
            registry,
            auth,
            rate,
            loopback: local.ip().is_loopback(),
        }
    }

    /// The registry served.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every route (see the module docs).
    pub fn router(self) -> Router {
        let max_body = self.registry.config().max_message_size;
        let authenticated = Router::new()
            .route("/v1/services", get(api::list_services))
            .route("/v1/services/{name}", get(api::resolve))
            .route("/v1/status", get(api::status))
            .route("/v1/watch", get(sse::watch_all))
            .route("/v1/watch/{name}", get(sse::watch_service))
            .route("/v1/register", post(api::register))
            .route("/v1/heartbeat", post(api::heartbeat))
            .route("/v1/deregister", post(api::deregister))
            .route("/v1/prometheus/sd", get(sd::targets))
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(self.clone(), authenticate));
        Router::new()
            .merge(authenticated)
            .merge(dashboard::router())
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(max_body))
            .layer(middleware::from_fn_with_state(self.clone(), check_host))
            .with_state(self)
    }
}

/// Serves the HTTP front end on `listener` until `shutdown` resolves; open
/// watch streams and long-polls end when the registry shuts down.
pub async fn serve(
    listener: TcpListener,
    api: HttpApi,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "HTTP API and dashboard listening");
    if !addr.ip().is_loopback() && api.auth.is_none() {
        tracing::warn!(
            %addr,
            "SECURITY WARNING: HTTP API beyond loopback without --auth-file; anyone who can reach \
             this port can register instances and redirect traffic"
        );
    }
    let max = api.registry.config().max_connections;
    let listener = CappedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
        max,
        rejected: 0,
    };
    axum::serve(
        listener,
        api.router().into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    Ok(())
}

/// The accept loop with the `max_connections` cap (the gRPC port has its
/// own): over it, a new connection is closed on accept, so a flood of
/// connections cannot exhaust file descriptors or memory. Long-polls and
/// SSE streams each hold a connection, so the cap bounds them too.
struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    rejected: u64,
}

impl std::fmt::Debug for CappedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedListener")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// An accepted connection holding one permit of the cap.
#[derive(Debug)]
pub struct CappedIo {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off, retry.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        CappedIo {
                            stream,
                            _permit: permit,
                        },
                        peer,
                    );
                }
                Err(_) => {
                    self.rejected += 1;
                    if self.rejected.is_power_of_two() {
                        tracing::warn!(
                            %peer,
                            rejected_total = self.rejected,
                            "closed a new HTTP connection: {} open, the limit is {} (max_connections)",
                            self.max,
                            self.max
                        );
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for CappedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The peer address of a request (axum's `ConnectInfo` for our listener).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CappedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, CappedListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Who is calling: `None` when auth is off. Put in the request extensions
/// by the auth middleware.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Arc<Identity>>);

impl Caller {
    /// The identity, for the registry's `*_as` methods.
    pub fn identity(&self) -> Option<&Identity> {
        self.0.as_deref()
    }
}

/// Authenticates (when auth is on) and rate-limits, like the gRPC
/// [`crate::auth::AuthLayer`].
async fn authenticate(
    State(api): State<HttpApi>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match &api.auth {
        Some(auth) => match auth.authenticate(req.headers(), None) {
            Ok(identity) => Some(identity),
            Err(status) => return ApiError::from(status).into_response(),
        },
        None => None,
    };
    if let Some(rate) = &api.rate {
        let key = caller
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| Arc::from(peer.ip().to_string()));
        if let Err(status) = rate.check(&key) {
            return ApiError::from(status).into_response();
        }
    }
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

/// On a loopback listener, refuses requests addressed to any other name:
/// a page from the web that rebinds its own name to 127.0.0.1 would
/// otherwise be same-origin with the registry.
async fn check_host(State(api): State<HttpApi>, req: Request, next: Next) -> Response {
    if api.loopback
        && let Some(host) = req.headers().get(header::HOST)
        && !is_loopback_host(host)
    {
        return ApiError::new(
            Code::PermissionDenied,
            format!(
                "Host {:?} is not a loopback name: the HTTP API listens on loopback and answers \
                 only requests addressed to localhost, 127.0.0.1 or [::1] (DNS rebinding \
                 protection); listen on another address to serve other names",
                String::from_utf8_lossy(host.as_bytes())
            ),
        )
        .into_response();
    }
    next.run(req).await
}

fn is_loopback_host(value: &HeaderValue) -> bool {
    let Ok(host) = value.to_str() else {
        return false;
    };
    // Strip the port: `[v6]:port`, `name:port`, `v4:port`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        Code::NotFound,
        format!(
            "no route {} {}: see /v1/services, /v1/services/{{name}}, /v1/status, /v1/watch, \
             /v1/register, /v1/heartbeat, /v1/deregister, /v1/prometheus/sd",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn metrics(State(api): State<HttpApi>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(api.registry.metrics(), api.registry.status()),
    )
}

async fn readyz(State(api): State<HttpApi>) -> impl IntoResponse {
    match crate::ops::not_ready_reason(&api.registry) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why + "\n"),
    }
}

/// An error answer: the gRPC code and message the same request would get
/// over gRPC, as JSON, under the HTTP status grpc-gateway maps it to.
#[derive(Debug)]
pub struct ApiError {
    code: Code,
    message: String,
    /// Overrides the status mapped from `code` (415 for a wrong content
    /// type, which has no gRPC code of its own).
    http: Option<StatusCode>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: i32,
    status: &'static str,
    message: &'a str,
}

impl ApiError {
    /// An error with this code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            http: None,
        }
    }

    /// `INVALID_ARGUMENT`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `INVALID_ARGUMENT` answered as `415 Unsupported Media Type`.
    pub fn media_type(message: impl Into<String>) -> Self {
        Self {
            http: Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ..Self::invalid(message)
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.code
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self::new(status.code(), status.message())
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        // One mapping (and internal errors logged, not leaked) for both APIs.
        Status::from(err).into()
    }
}

/// The HTTP status grpc-gateway answers a gRPC code with.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The name of a gRPC code as the protos spell it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The JSON error body of a code and message (also an SSE `error` event).
pub fn error_json(code: Code, message: &str) -> String {
    serde_json::to_string(&ErrorBody {
        code: code as i32,
        status: code_name(code),
        message,
    })
    .expect("an error body serializes")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http.unwrap_or_else(|| http_status(self.code));
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            error_json(self.code, &self.message),
        )
            .into_response();
        if self.code == Code::Unauthenticated {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"registry\""),
            );
        }
        resp
    }
}

/// A JSON answer with its validator: `200` with the body, or `304 Not
/// Modified` when the client's `If-None-Match` already names this `etag`.
/// Both carry `ETag` and `X-Registry-Revision`.
pub(crate) fn json_answer<T: Serialize>(
    request: &HeaderMap,
    etag: &str,
    revision: u64,
    epoch: u64,
    body: &T,
) -> Response {
    let not_modified = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == "*" || t == etag.trim_start_matches("W/"))
        });
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match serde_json::to_vec(body) {
            Ok(bytes) => (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(bytes),
            )
                .into_response(),
            Err(e) => {
                return ApiError::from(Error::InvalidArgument(format!(
                    "answer does not serialize: {e}"
                )))
                .into_response();
            }
        }
    };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-registry-revision", HeaderValue::from(revision));
    headers.insert("x-registry-epoch", HeaderValue::from(epoch));
    resp
}

/// A weak entity tag from a hash of what an answer's content depends on.
/// Weak: two answers with the same tag list the same things but may differ
/// in their revision and server fields.
pub(crate) fn etag(content: impl Hash) -> String {
    let mut h = DefaultHasher::new();
    content.hash(&mut h);
    format!("W/\"{:016x}\"", h.finish())
}

/// The caller, as handlers extract it.
pub(crate) type CallerExt = Extension<Caller>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:7412",
            "127.0.0.1:7412",
            "127.9.9.9",
            "[::1]:7412",
            "app.localhost:80",
            "LOCALHOST.",
        ] {
            assert!(is_loopback_host(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in ["evil.example:7412", "10.0.0.1:7412", "[2001:db8::1]:80", ""] {
            assert!(!is_loopback_host(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn codes_map_like_grpc_gateway() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(
            error_json(Code::NotFound, "lease 7 not found"),
            r#"{"code":5,"status":"NOT_FOUND","message":"lease 7 not found"}"#
        );
    }
}
