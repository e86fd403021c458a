//! Watch streams: turn a watcher's queue of revision batches into
//! `WatchResponse` messages, filtered to the watcher's view.
//!
//! The stream is polled by the connection's HTTP/2 task only when the client
//! has flow-control window, so a client that stops reading stops draining its
//! queue; the catalog then flags it (never blocking the writer) and the
//! stream answers with a reset snapshot once the client reads again.
//!
//! Encoding once: a revision batch that a watcher sees whole (no selector,
//! and either watch-all or the batch's only service) is encoded into a
//! `WatchResponse` once, cached in the batch, and every such watcher sends
//! the same bytes ([`WatchFrame`]). Several queued revisions are coalesced by
//! concatenating their encodings: protobuf merges repeated occurrences of
//! the same message field, so the client decodes one `EventBatch` holding
//! all their events, in order.

use std::{sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};
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

/// Bytes of queued revisions coalesced into one message: fewer, larger
/// writes when a watcher is behind, without unbounded messages.
pub const MAX_COALESCED_BYTES: usize = 256 << 10;

/// One message of a Watch stream: on the wire exactly a `WatchResponse`,
/// either built per watcher or shared pre-encoded bytes.
#[derive(Debug, Clone)]
pub struct WatchFrame(Frame);

#[derive(Debug, Clone)]
enum Frame {
    Message(WatchResponse),
    Encoded(Bytes),
}

impl WatchFrame {
    /// A frame holding a message to encode as usual.
    pub fn message(msg: WatchResponse) -> Self {
        Self(Frame::Message(msg))
    }

    /// The `WatchResponse` this frame encodes (decodes shared bytes), for
    /// in-process consumers and tests.
    pub fn to_response(&self) -> Result<WatchResponse, DecodeError> {
        match &self.0 {
            Frame::Message(m) => Ok(m.clone()),
            Frame::Encoded(b) => WatchResponse::decode(b.clone()),
        }
    }
}

impl Default for WatchFrame {
    fn default() -> Self {
        Self::message(WatchResponse::default())
    }
}

impl Message for WatchFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Frame::Message(m) => m.encode_raw(buf),
            Frame::Encoded(b) => buf.put_slice(b),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if let Frame::Encoded(b) = &self.0 {
            self.0 = Frame::Message(WatchResponse::decode(b.clone())?);
        }
        match &mut self.0 {
            Frame::Message(m) => m.merge_field(tag, wire_type, buf, ctx),
            Frame::Encoded(_) => unreachable!("converted above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.0 {
            Frame::Message(m) => m.encoded_len(),
            Frame::Encoded(b) => b.len(),
        }
    }

    fn clear(&mut self) {
        self.0 = Frame::Message(WatchResponse::default());
    }
}

/// The encoded `WatchResponse` of a batch as a watcher with this filter sees
/// it, or `None` when none of it is visible. Uses the batch's shared
/// encoding when the watcher sees the whole batch.
pub fn batch_bytes(filter: &WatchFilter, batch: &RevisionBatch) -> Option<Bytes> {
    batch_events(filter, batch).map(|(bytes, _)| bytes)
}

/// [`batch_bytes`] with the number of events the watcher sees in it (for
/// `registry_watch_events_sent_total`).
pub fn batch_events(filter: &WatchFilter, batch: &RevisionBatch) -> Option<(Bytes, usize)> {
    let sees_all = filter.selector.is_empty()
        && filter.reader.is_none()
        && match &filter.service {
            None => true,
            Some(s) => batch.single_service() == Some(&**s),
        };
    if sees_all {
        return Some((
            batch
                .encoded
                .get_or_init(|| {
                    let events = batch.events.iter().map(|ev| match &ev.kind {
                        EventKind::Put { .. } => {
                            event(EventType::Put, batch.revision, &ev.instance, None)
                        }
                        EventKind::Delete(reason) => event(
                            EventType::Delete,
                            batch.revision,
                            &ev.instance,
                            Some(*reason),
                        ),
                    });
                    events_message(events.collect()).encode_to_vec().into()
                })
                .clone(),
            batch.events.len(),
        ));
    }
    let mut events = Vec::new();
    translate(filter, batch, &mut events);
    let n = events.len();
    (n > 0).then(|| (events_message(events).encode_to_vec().into(), n))
}

/// Counts the events of a batch about to be sent; passes its bytes on.
fn count_sent(registry: &Registry, seen: Option<(Bytes, usize)>) -> Option<Bytes> {
    let (bytes, n) = seen?;
    crate::metrics::inc(&registry.metrics().watch_events_sent, n as u64);
    Some(bytes)
}

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

fn event(
    kind: EventType,
    revision: u64,
    instance: &Instance,
    reason: Option<DeleteReason>,
) -> Event {
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
) -> impl Stream<Item = Result<WatchFrame, Status>> + Send + 'static {
    async_stream::stream! {
        let shutdown = registry.shutdown_token().clone();
        let filter = handle.filter().clone();
        match start {
            WatchStart::Snapshot { revision, instances, reset } => {
                for msg in snapshot_messages(&registry, revision, &instances, reset) {
                    yield Ok(WatchFrame::message(msg));
                }
            }
            WatchStart::Replay(batches) => {
                let mut parts = Coalescer::default();
                for batch in &batches {
                    if let Some(frame) = parts.push(count_sent(&registry, batch_events(&filter, batch))) {
                        yield Ok(frame);
                    }
                }
                if let Some(frame) = parts.finish() {
                    yield Ok(frame);
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
                    yield Ok(WatchFrame::message(msg));
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
                    let mut parts = Coalescer::default();
                    let mut ready = parts.push(count_sent(&registry, batch_events(&filter, &batch)));
                    // Coalesce whatever else is already queued (whole revisions).
                    while ready.is_none() && !handle.overflowed() {
                        let Some(next) = handle.try_recv() else { break };
                        ready = parts.push(count_sent(&registry, batch_events(&filter, &next)));
                    }
                    if let Some(frame) = ready {
                        yield Ok(frame);
                    }
                    if let Some(frame) = parts.finish() {
                        yield Ok(frame);
                    }
                }
                _ = tokio::time::sleep(progress_interval) => {
                    // Writers queue a batch before publishing its revision,
                    // so an empty queue after reading the revision means
                    // everything up to it has been delivered.
                    let revision = registry.catalog().revision();
                    if handle.is_empty() && !handle.overflowed() {
                        yield Ok(WatchFrame::message(WatchResponse {
                            kind: Some(Kind::Progress(Progress {
                                revision,
                                server: Some(registry.server_info()),
                            })),
                        }));
                    }
                }
            }
        }
    }
}

/// Joins consecutive encoded event messages into one frame of at most
/// [`MAX_COALESCED_BYTES`] (a single larger batch still goes alone).
#[derive(Default)]
struct Coalescer {
    parts: Vec<Bytes>,
    len: usize,
}

impl Coalescer {
    /// Adds a part; returns a full frame when the limit is reached.
    fn push(&mut self, part: Option<Bytes>) -> Option<WatchFrame> {
        let part = part?;
        self.len += part.len();
        self.parts.push(part);
        (self.len >= MAX_COALESCED_BYTES).then(|| self.take())
    }

    /// The frame of whatever is left, if anything.
    fn finish(&mut self) -> Option<WatchFrame> {
        (!self.parts.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> WatchFrame {
        self.len = 0;
        let bytes = if self.parts.len() == 1 {
            self.parts.pop().expect("one part")
        } else {
            let mut buf = BytesMut::with_capacity(self.parts.iter().map(Bytes::len).sum());
            for p in self.parts.drain(..) {
                buf.put_slice(&p);
            }
            buf.freeze()
        };
        WatchFrame(Frame::Encoded(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{CatalogEvent, EventKind};
    use registry_api::v1::DeleteReason;

    fn batch(revision: u64, ids: &[&str], service: &str) -> RevisionBatch {
        let events: Vec<CatalogEvent> = ids
            .iter()
            .map(|id| CatalogEvent {
                kind: EventKind::Put { prev: None },
                instance: Arc::new(Instance {
                    service: service.into(),
                    id: (*id).into(),
                    address: "10.0.0.1:80".into(),
                    ..Default::default()
                }),
            })
            .collect();
        RevisionBatch::for_test(revision, events)
    }

    #[test]
    fn shared_encoding_equals_per_watcher_translation() {
        let b = batch(7, &["a", "b"], "svc");
        let filter = WatchFilter {
            service: Some("svc".into()),
            selector: vec![],
            reader: None,
        };
        let shared = batch_bytes(&filter, &b).unwrap();
        let mut events = Vec::new();
        translate(&filter, &b, &mut events);
        assert_eq!(shared, events_message(events).encode_to_vec());
        // Cached: the second watcher gets the very same buffer.
        assert_eq!(batch_bytes(&filter, &b).unwrap().as_ptr(), shared.as_ptr());
    }

    #[test]
    fn concatenated_frames_decode_as_one_batch_in_order() {
        let filter = WatchFilter::default();
        let mut c = Coalescer::default();
        for (rev, id) in [(1, "a"), (2, "b"), (3, "c")] {
            assert!(
                c.push(batch_bytes(&filter, &batch(rev, &[id], "svc")))
                    .is_none()
            );
        }
        let frame = c.finish().unwrap();
        let Some(Kind::Events(events)) = frame.to_response().unwrap().kind else {
            panic!("not events");
        };
        let revs: Vec<_> = events.events.iter().map(|e| e.revision).collect();
        assert_eq!(revs, [1, 2, 3]);
        let _ = DeleteReason::Expired;
    }
}
