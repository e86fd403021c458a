//! The web dashboard at `/`: plain HTML, CSS and JavaScript compiled into
//! the binary (`include_str!`), so it needs no build toolchain and no files
//! beside the daemon. It reads the JSON API like any client: services from
//! `/v1/services`, a service's instances from `/v1/services/{name}` (with
//! lease time left), and the live event log from the SSE stream
//! `/v1/watch`, read with `fetch` so it can carry the bearer token (which
//! `EventSource` cannot); with auth on it asks for a token and keeps it in
//! the tab's `sessionStorage`.
//!
//! The assets are sent with a strict Content-Security-Policy (scripts and
//! connections to this origin only), `X-Frame-Options: DENY` and an ETag.

use axum::{
    Router,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{HttpApi, etag};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const FAVICON_SVG: &str = include_str!("dashboard/favicon.svg");

/// The dashboard's routes (open: the page asks for a token itself).
pub fn router() -> Router<HttpApi> {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { asset(&h, INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|h: HeaderMap| async move { asset(&h, APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|h: HeaderMap| async move { asset(&h, APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/favicon.svg",
            get(|h: HeaderMap| async move { asset(&h, FAVICON_SVG, "image/svg+xml") }),
        )
}

fn asset(request: &HeaderMap, body: &'static str, content_type: &'static str) -> Response {
    let tag = etag((env!("CARGO_PKG_VERSION"), body));
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == tag);
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
