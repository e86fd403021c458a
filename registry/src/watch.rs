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
//!
//! Served sets (issue 17): a watcher without `include_not_serving` follows
//! the served set of its services (see [`crate::serving`]) rather than
//! every registered instance. The catalog marks each event with whether
//! its instance was served before and after the revision, and lists the
//! instances a change of panic mode moved in or out; [`translate`] turns a
//! put of an instance leaving the served set into a DELETE
//! (`NOT_SERVING`), one entering it into a PUT, and a panic flip into PUTs
//! or DELETEs of the critical instances it moved. Snapshots leave out what
//! is not served. So the watched state equals the default Resolve at every
//! revision, panic mode included. Serving-only watchers without a selector
//! share one encoding per batch as the others do.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};
use registry_api::v1::{
    DeleteReason, Event, EventBatch, EventType, Instance, Progress, ResetReason, ServerInfo,
    Snapshot, WatchResponse, watch_response::Kind,
};
use tonic::Status;

use crate::{
    catalog::{
        CatalogView, EventKind, RevisionBatch, WatchFilter, WatchStart, WatcherHandle,
        selector_matches,
    },
    core::Registry,
    frame,
};

/// Largest snapshot chunk, in encoded bytes: well under gRPC's default 4 MiB
/// message limit, so clients in any language can take it, and small enough
/// that the one chunk an unread stream holds in its send buffer keeps a few
/// hundred stalled watch-all streams within tens of megabytes.
pub const SNAPSHOT_CHUNK_BYTES: usize = 64 << 10;

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
    if sees_all && !filter.include_not_serving && !batch.serves_all() {
        // The served part of the whole batch, encoded once for every
        // serving-only watcher without a selector.
        return batch
            .encoded_served
            .get_or_init(|| {
                let mut events = Vec::new();
                translate(&WatchFilter::default(), batch, &mut events);
                let n = events.len();
                (n > 0).then(|| (events_message(events).encode_to_vec().into(), n))
            })
            .clone();
    }
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
/// leaves the view becomes a DELETE (REPLACED when it no longer matches the
/// selector, NOT_SERVING when it is no longer served), one that enters it a
/// PUT; a panic flip moves critical instances in (PUT) or out (DELETE,
/// NOT_SERVING) of a serving-only view.
pub fn translate(filter: &WatchFilter, batch: &RevisionBatch, out: &mut Vec<Event>) {
    let all = filter.include_not_serving;
    for ev in &batch.events {
        if let Some(service) = &filter.service
            && **service != *ev.instance.service
        {
            continue;
        }
        match &ev.kind {
            EventKind::Put { prev } => {
                let matches = filter.matches(&ev.instance);
                if matches && (all || ev.served_after) {
                    out.push(event(EventType::Put, batch.revision, &ev.instance, None));
                } else if let Some(prev) = prev
                    .as_ref()
                    .filter(|p| (all || ev.served_before) && filter.matches(p))
                {
                    let reason = if matches {
                        DeleteReason::NotServing
                    } else {
                        DeleteReason::Replaced
                    };
                    out.push(event(EventType::Delete, batch.revision, prev, Some(reason)));
                }
            }
            EventKind::Delete(reason) => {
                if (all || ev.served_before) && filter.matches(&ev.instance) {
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
    if all {
        return;
    }
    for flip in &batch.panic_flips {
        if !filter.covers(&flip.service) {
            continue;
        }
        for instance in flip
            .instances
            .iter()
            .filter(|i| selector_matches(&filter.selector, i))
        {
            out.push(if flip.panicked {
                event(EventType::Put, batch.revision, instance, None)
            } else {
                event(
                    EventType::Delete,
                    batch.revision,
                    instance,
                    Some(DeleteReason::NotServing),
                )
            });
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

/// The Snapshot messages of a view, built one chunk at a time as the
/// stream is polled: a stream whose client does not read holds one chunk,
/// never a copy of the view. Instances go out as the catalog stores them
/// (encoded once, at write time); only a selector makes them be decoded,
/// to be matched. The last message has `more == false`; an empty view is
/// one empty message.
#[derive(Debug)]
pub struct SnapshotChunks {
    view: CatalogView,
    selector: Vec<(String, String)>,
    /// Only the served instances of each service.
    served_only: bool,
    reset: Option<ResetReason>,
    server: ServerInfo,
    service: usize,
    instance: usize,
    done: bool,
}

impl SnapshotChunks {
    /// The chunks of `view` as seen through `filter` (whose service and
    /// read permission the view already applied).
    pub fn new(
        view: CatalogView,
        filter: &WatchFilter,
        reset: Option<ResetReason>,
        server: ServerInfo,
    ) -> Self {
        Self {
            view,
            selector: filter.selector.clone(),
            served_only: !filter.include_not_serving,
            reset,
            server,
            service: 0,
            instance: 0,
            done: false,
        }
    }

    fn frame(&self, records: Vec<u8>, more: bool) -> WatchFrame {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let rest = Snapshot {
            revision: self.view.revision(),
            instances: Vec::new(),
            reset: self.reset.is_some(),
            reason: self.reset.unwrap_or(ResetReason::Unspecified) as i32,
            server: Some(self.server),
            more,
        };
        let body = records.len() + rest.encoded_len();
        let mut buf = Vec::with_capacity(body + 8);
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(body as u64, &mut buf);
        buf.extend_from_slice(&records);
        rest.encode_raw(&mut buf);
        WatchFrame(Frame::Encoded(buf.into()))
    }
}

impl Iterator for SnapshotChunks {
    type Item = WatchFrame;

    fn next(&mut self) -> Option<WatchFrame> {
        if self.done {
            return None;
        }
        let mut records = Vec::new();
        while let Some(service) = self.view.services().get(self.service) {
            while let Some(bytes) = service.get(self.instance) {
                if self.served_only && !service.served().includes(self.instance) {
                    self.instance += 1;
                    continue;
                }
                if !self.selector.is_empty()
                    && !selector_matches(&self.selector, &crate::catalog::decode_instance(bytes))
                {
                    self.instance += 1;
                    continue;
                }
                let len = frame::record_len(2, bytes.len());
                if !records.is_empty() && records.len() + len > SNAPSHOT_CHUNK_BYTES {
                    return Some(self.frame(records, true));
                }
                frame::push_record(2, bytes, &mut records);
                self.instance += 1;
            }
            self.service += 1;
            self.instance = 0;
        }
        self.done = true;
        Some(self.frame(records, false))
    }
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
            WatchStart::Snapshot { view, reset } => {
                for frame in SnapshotChunks::new(view, &filter, reset, registry.server_info()) {
                    yield Ok(frame);
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
            if let Some(reason) = handle.reset_reason() {
                let view = registry.catalog().resnapshot(&mut handle);
                tracing::debug!(revision = view.revision(), ?reason, "watcher sent a reset snapshot");
                let chunks = SnapshotChunks::new(
                    view,
                    &filter,
                    Some(reason),
                    registry.server_info(),
                );
                for frame in chunks {
                    yield Ok(frame);
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
    use std::sync::Arc;

    fn batch(revision: u64, ids: &[&str], service: &str) -> RevisionBatch {
        let events: Vec<CatalogEvent> = ids
            .iter()
            .map(|id| {
                CatalogEvent::all_served(
                    EventKind::Put { prev: None },
                    Arc::new(Instance {
                        service: service.into(),
                        id: (*id).into(),
                        address: "10.0.0.1:80".into(),
                        ..Default::default()
                    }),
                )
            })
            .collect();
        RevisionBatch::for_test(revision, events)
    }

    #[test]
    fn shared_encoding_equals_per_watcher_translation() {
        let b = batch(7, &["a", "b"], "svc");
        let filter = WatchFilter {
            service: Some("svc".into()),
            ..WatchFilter::default()
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
