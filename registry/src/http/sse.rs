//! `GET /v1/watch[/{name}]`: the Watch stream as Server-Sent Events.
//!
//! The stream is the gRPC Watch's ([`crate::watch::stream`]), message for
//! message, so it has the same guarantees (snapshot first, then events in
//! revision order without gaps or duplicates, a reset snapshot when resuming
//! is impossible or the reader fell behind, progress on idle streams). Each
//! `WatchResponse` becomes one SSE message whose `event` names its kind and
//! whose `data` is the JSON of that kind's message:
//!
//! | `event:` | `data:` | `id:` |
//! | --- | --- | --- |
//! | `snapshot` | `Snapshot` (`reset`, `reason`, `more` as in gRPC) | its revision, on the last chunk only |
//! | `events` | `EventBatch` | the revision of its last event |
//! | `progress` | `Progress` | its revision |
//! | `error` | `{"code", "status", "message"}`; the stream then ends | — |
//!
//! Resuming: the `id` is the revision everything up to which has been
//! delivered, so a reconnect with `Last-Event-ID: R` (what browsers'
//! `EventSource` sends by itself) replays from R + 1, or starts with a reset
//! snapshot when the history no longer reaches back. `?start_revision=N`
//! does the same for a first connection (N = last revision + 1), and
//! `?epoch=E` names the server life the revision belongs to (another life:
//! reset snapshot). `?progress_interval_ms=` as in `WatchRequest`, and every
//! other parameter is a selector pair as in `/v1/services/{name}`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{ConnectInfo, Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt};
use registry_api::v1::watch_response::Kind;
use serde::Serialize;

use super::{
    ApiError, CallerExt, HttpApi,
    api::{parse_u64, query_pairs},
    error_json,
};
use crate::{
    catalog::WatchFilter,
    validate,
    watch::{self, MIN_PROGRESS_INTERVAL, WatchFrame},
};

/// How long a browser waits before reconnecting a dropped stream: short,
/// since resuming is cheap and a dashboard should be live again at once.
const RETRY: Duration = Duration::from_secs(1);

/// SSE comment lines on a stream with nothing to say, so proxies with idle
/// timeouts keep it open between progress messages.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/watch`: every service the caller may read.
pub async fn watch_all(
    State(api): State<HttpApi>,
    caller: CallerExt,
    ConnectInfo(super::Peer(peer)): ConnectInfo<super::Peer>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    open(api, caller, peer, None, &headers, query_pairs(query)?).await
}

/// `GET /v1/watch/{name}`: one service.
pub async fn watch_service(
    State(api): State<HttpApi>,
    caller: CallerExt,
    ConnectInfo(super::Peer(peer)): ConnectInfo<super::Peer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    validate::service_name("service", &name)?;
    open(api, caller, peer, Some(name), &headers, query_pairs(query)?).await
}

async fn open(
    api: HttpApi,
    caller: CallerExt,
    peer: SocketAddr,
    service: Option<String>,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let registry = api.registry().clone();
    let mut start_revision = 0;
    let mut epoch = 0;
    let mut progress = registry.config().watch_progress_interval;
    let mut selector = std::collections::HashMap::new();
    let mut include_not_serving = false;
    for (k, v) in pairs {
        match k.as_str() {
            "include_not_serving" | "includeNotServing" => {
                include_not_serving = super::api::parse_bool("include_not_serving", &v)?
            }
            "start_revision" | "startRevision" => start_revision = parse_u64("start_revision", &v)?,
            "epoch" => epoch = parse_u64("epoch", &v)?,
            "progress_interval_ms" | "progressIntervalMs" => {
                progress = match parse_u64("progress_interval_ms", &v)? {
                    0 => registry.config().watch_progress_interval,
                    ms => Duration::from_millis(ms).max(MIN_PROGRESS_INTERVAL),
                }
            }
            _ => {
                let key = k.strip_prefix("selector.").unwrap_or(&k).to_string();
                if selector.insert(key, v).is_some() {
                    return Err(ApiError::invalid(format!(
                        "selector key {k:?} is given more than once"
                    )));
                }
            }
        }
    }
    if let Some(last) = headers.get("last-event-id") {
        let text = last.to_str().unwrap_or("");
        start_revision = parse_u64("Last-Event-ID", text.trim())?.saturating_add(1);
    }
    validate::metadata("selector", &selector)?;
    let mut selector: Vec<_> = selector.into_iter().collect();
    selector.sort();
    let filter = WatchFilter {
        service: service.as_deref().map(Arc::from),
        selector,
        reader: None,
        include_not_serving,
    };
    // As the gRPC Watch (a resume from a cluster node a little ahead waits
    // for this one to catch up rather than reset).
    let (handle, start) = registry
        .watch(
            filter,
            start_revision,
            epoch,
            Some(peer),
            caller.0.0.as_ref(),
        )
        .await?;
    let frames = watch::stream(registry, handle, start, progress);
    let mut resp = Sse::new(sse_events(frames))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // nginx and similar buffer responses unless told not to.
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// The SSE messages of a watch stream; ends after an `error` message.
fn sse_events(
    frames: impl Stream<Item = Result<WatchFrame, tonic::Status>> + Send + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    async_stream::stream! {
        yield Ok(Event::default().retry(RETRY).comment("registry watch"));
        let mut frames = std::pin::pin!(frames);
        while let Some(item) = frames.next().await {
            match item {
                Ok(frame) => match to_event(&frame) {
                    Ok(Some(event)) => yield Ok(event),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "watch message does not convert to JSON");
                        yield Ok(Event::default().event("error").data(error_json(tonic::Code::Internal, "internal error")));
                        break;
                    }
                },
                Err(status) => {
                    yield Ok(Event::default().event("error").data(error_json(status.code(), status.message())));
                    break;
                }
            }
        }
    }
}

/// One watch message as an SSE message (see the module table).
pub fn to_event(frame: &WatchFrame) -> Result<Option<Event>, String> {
    fn data<T: Serialize>(v: &T) -> Result<String, String> {
        serde_json::to_string(v).map_err(|e| e.to_string())
    }
    let msg = frame.to_response().map_err(|e| e.to_string())?;
    Ok(match msg.kind {
        None => None,
        Some(Kind::Snapshot(s)) => {
            let mut ev = Event::default().event("snapshot");
            if !s.more {
                ev = ev.id(s.revision.to_string());
            }
            Some(ev.data(data(&s)?))
        }
        Some(Kind::Events(batch)) => {
            let last = batch.events.iter().map(|e| e.revision).max().unwrap_or(0);
            Some(
                Event::default()
                    .event("events")
                    .id(last.to_string())
                    .data(data(&batch)?),
            )
        }
        Some(Kind::Progress(p)) => Some(
            Event::default()
                .event("progress")
                .id(p.revision.to_string())
                .data(data(&p)?),
        ),
    })
}
