//! Watch streams: turn a watcher's queue of revision batches into
//! `WatchResponse` messages, filtered to the watcher's view.
//!
//! The stream is polled by the connection's HTTP/2 task only when the client
//! has flow-control window, so a client that stops reading stops draining its
//! queue; the catalog then flags it (never blocking the writer) and the
//! stream answers with a reset snapshot once the client reads again.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use registry_api::v1::{
    DeleteReason, Event, EventBatch, EventType, Instance, Progress, ResetReason, Snapshot,
    WatchResponse, watch_response::Kind,
};
use tonic::Status;

use crate::{
    catalog::{EventKind, RevisionBatch, WatchFilter, WatchStart, WatcherHandle},
    core::Registry,
};

/// Largest snapshot chunk, in encoded bytes: well under gRPC's default 4 MiB
/// message limit, so clients in any language can take it.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Most events coalesced into one message when several revisions are queued:
/// fewer, larger writes when a watcher is behind, without unbounded messages.
pub const MAX_EVENTS_PER_MESSAGE: usize = 1024;

/// Shortest progress interval a client may ask for.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Translates one batch into the events this filter sees: a replacement that
/// leaves the view becomes a DELETE (REPLACED), one that enters it a PUT.
pub fn translate(filter: &WatchFilter, batch: &RevisionBatch, out: &mut Vec<Event>) {
    for ev in &batch.events {
        if let Some(service) = &filter.service
            && **service != *ev.instance.service
        {
            continue;
        }
        match &ev.kind {
            EventKind::Put { prev } => {
                if filter.matches(&ev.instance) {
                    out.push(event(EventType::Put, batch.revision, &ev.instance, None));
                } else if let Some(prev) = prev.as_ref().filter(|p| filter.matches(p)) {
                    out.push(event(
                        EventType::Delete,
                        batch.revision,
                        prev,
                        Some(DeleteReason::Replaced),
                    ));
                }
            }
            EventKind::Delete(reason) => {
                if filter.matches(&ev.instance) {
                    out.push(event(
                        EventType::Delete,
                        batch.revision,
                        &ev.instance,
                        Some(*reason),
                    ));
                }
            }
        }
    }
}

fn event(kind: EventType, revision: u64, instance: &Instance, reason: Option<DeleteReason>) -> Event {
    Event {
        r#type: kind as i32,
        revision,
        instance: Some(instance.clone()),
        reason: reason.unwrap_or(DeleteReason::Unspecified) as i32,
    }
}

fn events_message(events: Vec<Event>) -> WatchResponse {
    WatchResponse {
        kind: Some(Kind::Events(EventBatch { events })),
    }
}

/// Splits a snapshot into messages of at most [`SNAPSHOT_CHUNK_BYTES`]; the
/// last one has `more == false`. An empty snapshot is one empty message.
pub fn snapshot_messages(
    registry: &Registry,
    revision: u64,
    instances: &[Arc<Instance>],
    reset: Option<ResetReason>,
) -> Vec<WatchResponse> {
    use prost::Message;
    let mut chunks: Vec<Vec<Instance>> = vec![Vec::new()];
    let mut size = 0;
    for inst in instances {
        let len = inst.encoded_len() + 4;
        let current = chunks.last_mut().expect("never empty");
        if size + len > SNAPSHOT_CHUNK_BYTES && !current.is_empty() {
            chunks.push(Vec::new());
            size = 0;
        }
        size += len;
        chunks
            .last_mut()
            .expect("never empty")
            .push(Instance::clone(inst));
    }
    let n = chunks.len();
    let server = registry.server_info();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, instances)| WatchResponse {
            kind: Some(Kind::Snapshot(Snapshot {
                revision,
                instances,
                reset: reset.is_some(),
                reason: reset.unwrap_or(ResetReason::Unspecified) as i32,
                server: Some(server),
                more: i + 1 < n,
            })),
        })
        .collect()
}

/// The response stream of one Watch call. Ends with `UNAVAILABLE` when the
/// registry shuts down; dropping it (client gone) unregisters the watcher.
pub fn stream(
    registry: Registry,
    mut handle: WatcherHandle,
    start: WatchStart,
    progress_interval: Duration,
) -> impl Stream<Item = Result<WatchResponse, Status>> + Send + 'static {
    async_stream::stream! {
        let shutdown = registry.shutdown_token().clone();
        match start {
            WatchStart::Snapshot { revision, instances, reset } => {
                for msg in snapshot_messages(&registry, revision, &instances, reset) {
                    yield Ok(msg);
                }
            }
            WatchStart::Replay(batches) => {
                let filter = handle.filter().clone();
                let mut events = Vec::new();
                for batch in &batches {
                    translate(&filter, batch, &mut events);
                    if events.len() >= MAX_EVENTS_PER_MESSAGE {
                        yield Ok(events_message(std::mem::take(&mut events)));
                    }
                }
                if !events.is_empty() {
                    yield Ok(events_message(events));
                }
            }
        }
        loop {
            if handle.overflowed() {
                let (revision, instances) = registry.catalog().resnapshot(&mut handle);
                tracing::debug!(revision, "slow watcher sent a reset snapshot");
                for msg in snapshot_messages(
                    &registry,
                    revision,
                    &instances,
                    Some(ResetReason::SlowConsumer),
                ) {
                    yield Ok(msg);
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    yield Err(Status::unavailable("registry is shutting down; reconnect and resume from your last revision"));
                    break;
                }
                batch = handle.recv() => {
                    let Some(batch) = batch else { break };
                    let filter = handle.filter().clone();
                    let mut events = Vec::new();
                    translate(&filter, &batch, &mut events);
                    // Coalesce whatever else is already queued (whole revisions).
                    while events.len() < MAX_EVENTS_PER_MESSAGE && !handle.overflowed() {
                        let Some(next) = handle.try_recv() else { break };
                        translate(&filter, &next, &mut events);
                    }
                    if !events.is_empty() {
                        yield Ok(events_message(events));
                    }
                }
                _ = tokio::time::sleep(progress_interval) => {
                    // Writers queue a batch before publishing its revision,
                    // so an empty queue after reading the revision means
                    // everything up to it has been delivered.
                    let revision = registry.catalog().revision();
                    if handle.is_empty() && !handle.overflowed() {
                        yield Ok(WatchResponse {
                            kind: Some(Kind::Progress(Progress {
                                revision,
                                server: Some(registry.server_info()),
                            })),
                        });
                    }
                }
            }
        }
    }
}
