//! [`Watch`]: one service's changes as a typed stream that survives
//! registry restarts, outages and failover on its own.
//!
//! A watch starts with a [`Snapshot`] (the full matching state at a
//! revision), then yields [`WatchEvent::Put`] / [`WatchEvent::Delete`] in
//! revision order. When the stream breaks it yields
//! [`WatchEvent::Interrupted`], waits with backoff, and reopens the watch
//! with `start_revision = last seen + 1` and the epoch that revision belongs
//! to, so a short outage costs no snapshot and loses no event. When the
//! registry cannot replay (it restarted, compacted its history, or the
//! watcher read too slowly) it answers with a snapshot whose
//! [`Snapshot::reset`] is set: replace your state, do not merge.
//!
//! [`crate::Resolver`] and the keepalive task's conflict detection run on
//! this same session type, batch by batch (`Session::next_batch`), so every
//! consumer resumes the same way.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use registry_api::v1 as pb;

use crate::{
    Error, Instance, ServerInfo,
    backoff::Backoff,
    client::{call, grpc},
    endpoints::Endpoints,
};

/// Progress interval asked for on idle streams: often enough that a dead
/// stream is noticed (see [`IDLE_FACTOR`]), rare enough to cost nothing.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// A stream silent for this many progress intervals (several missed
/// Progress messages) is treated as dead and reopened.
const IDLE_FACTOR: u32 = 5;

/// What to look at: a service name, optionally narrowed by a metadata
/// selector. Every method that addresses a service takes
/// `impl Into<Query>`, so a plain name works everywhere:
///
/// ```no_run
/// # async fn f(client: registry_client::RegistryClient) -> Result<(), registry_client::Error> {
/// use registry_client::Query;
/// let all = client.resolve("prod").await?;
/// let v2 = client.resolve(Query::new("prod").with_selector("version", "2")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Query {
    /// Service name; empty means every service (watch only).
    pub service: String,
    /// Only instances whose metadata contains every `key=value` here. With a
    /// watch, an instance replaced by one that no longer matches arrives as
    /// a [`DeleteReason::Replaced`] delete.
    pub selector: BTreeMap<String, String>,
}

impl Query {
    /// Every instance of `service`.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            selector: BTreeMap::new(),
        }
    }

    /// Also requires the metadata label `key=value` (repeat for several;
    /// all must match).
    pub fn with_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    pub(crate) fn selector_map(&self) -> HashMap<String, String> {
        self.selector
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl From<&str> for Query {
    fn from(service: &str) -> Self {
        Query::new(service)
    }
}

impl From<String> for Query {
    fn from(service: String) -> Self {
        Query::new(service)
    }
}

impl From<&String> for Query {
    fn from(service: &String) -> Self {
        Query::new(service.as_str())
    }
}

impl From<&Query> for Query {
    fn from(query: &Query) -> Self {
        query.clone()
    }
}

/// Options of [`crate::RegistryClient::watch`]: where to start and how
/// often an idle stream proves it is alive.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    resume: Option<(u64, u64)>,
    progress_interval: Duration,
    include_not_serving: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            resume: None,
            progress_interval: PROGRESS_INTERVAL,
            include_not_serving: false,
        }
    }
}

impl WatchOptions {
    /// Starts after `revision` of registry life `epoch` (both from an
    /// earlier watch) instead of with a snapshot: the registry replays what
    /// was missed, or answers with a reset snapshot when it cannot.
    pub fn resume_after(mut self, epoch: u64, revision: u64) -> Self {
        self.resume = Some((epoch, revision));
        self
    }

    /// How often an idle stream receives [`WatchEvent::Progress`] (default
    /// 5 s). A stream silent for five intervals is reopened.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Also watch instances callers are not sent to (critical, draining,
    /// disabled). By default a watch follows the served set: an instance
    /// that stops serving arrives as a [`DeleteReason::NotServing`] delete
    /// and one that serves again as a put, so the watched state always
    /// equals a default resolve.
    pub fn include_not_serving(mut self, include: bool) -> Self {
        self.include_not_serving = include;
        self
    }
}

/// Why a snapshot replaces what the watcher had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetReason {
    /// The registry no longer holds the history to replay from.
    Compacted,
    /// The watcher read too slowly and its queued events were dropped.
    SlowConsumer,
    /// The registry restarted: revisions of the old life mean nothing.
    EpochChanged,
    /// A reason this client does not know.
    Other,
}

impl ResetReason {
    /// Lower-case name, as regctl prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResetReason::Compacted => "compacted",
            ResetReason::SlowConsumer => "slow_consumer",
            ResetReason::EpochChanged => "epoch_changed",
            ResetReason::Other => "unspecified",
        }
    }

    fn from_pb(reason: pb::ResetReason) -> Self {
        match reason {
            pb::ResetReason::Compacted => ResetReason::Compacted,
            pb::ResetReason::SlowConsumer => ResetReason::SlowConsumer,
            pb::ResetReason::EpochChanged => ResetReason::EpochChanged,
            pb::ResetReason::Unspecified => ResetReason::Other,
        }
    }
}

/// Why an instance went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeleteReason {
    /// Deregistered (by its process, or an operator).
    Deregistered,
    /// Its lease expired: the process stopped renewing.
    Expired,
    /// Replaced by an instance that no longer matches the watch's selector.
    Replaced,
    /// Still registered, but no longer served: it turned critical, was set
    /// draining or disabled, or its service left panic mode (watches
    /// without [`WatchOptions::include_not_serving`] only).
    NotServing,
    /// A reason this client does not know.
    Other,
}

impl DeleteReason {
    /// Lower-case name, as regctl prints it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeleteReason::Deregistered => "deregistered",
            DeleteReason::Expired => "expired",
            DeleteReason::Replaced => "replaced",
            DeleteReason::NotServing => "not_serving",
            DeleteReason::Other => "unspecified",
        }
    }

    fn from_pb(reason: pb::DeleteReason) -> Self {
        match reason {
            pb::DeleteReason::Deregistered => DeleteReason::Deregistered,
            pb::DeleteReason::Expired => DeleteReason::Expired,
            pb::DeleteReason::Replaced => DeleteReason::Replaced,
            pb::DeleteReason::NotServing => DeleteReason::NotServing,
            pb::DeleteReason::Unspecified => DeleteReason::Other,
        }
    }
}

/// The full matching state at one revision (chunks already joined).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Revision the state is at.
    pub revision: u64,
    /// Every matching instance at that revision.
    pub instances: Vec<Instance>,
    /// `Some` when this replaces state built from earlier events (the
    /// watcher missed changes): replace, do not merge.
    pub reset: Option<ResetReason>,
    /// False when the registry has never had an instance of this name since
    /// it started (only checked for an empty snapshot of one service).
    pub service_known: bool,
    /// Which registry life answered, and whether it is warming up.
    pub server: ServerInfo,
}

/// One item of a [`Watch`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WatchEvent {
    /// The full state: first on a new watch, and after a reset.
    Snapshot(Snapshot),
    /// A new instance, or a new version of one (same service and id).
    Put {
        /// Revision of the change.
        revision: u64,
        /// The instance as it now is.
        instance: Instance,
    },
    /// An instance went away.
    Delete {
        /// Revision of the change.
        revision: u64,
        /// The instance as it was last seen.
        instance: Instance,
        /// Why.
        reason: DeleteReason,
    },
    /// Nothing matching changed up to `revision`: the stream is alive.
    Progress {
        /// The registry's current revision.
        revision: u64,
        /// Which registry life answered.
        server: ServerInfo,
    },
    /// The stream broke (registry restarting, network, failover). The watch
    /// reconnects by itself after `retry_in` and resumes where it stopped.
    Interrupted {
        /// What broke it.
        error: Error,
        /// When the next attempt is made.
        retry_in: Duration,
    },
}

/// A live watch of one service (or of all, for an empty name): a
/// `Stream` of [`WatchEvent`]s, see the module docs. It ends only with a
/// non-transient error (an invalid name, a refused permission), yielded
/// as `Err`. Dropping it closes the stream.
pub struct Watch {
    batches: Pin<Box<dyn Stream<Item = Result<Vec<WatchEvent>, Error>> + Send>>,
    buffered: VecDeque<WatchEvent>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("buffered", &self.buffered.len())
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(crate) fn new(session: Session) -> Self {
        Self {
            batches: Box::pin(session.into_stream()),
            buffered: VecDeque::new(),
        }
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(event) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            match self.batches.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(batch))) => self.buffered.extend(batch),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The watch state machine behind [`Watch`], the resolver and the keeper:
/// one server message in, one batch of typed events out.
pub(crate) struct Session {
    endpoints: Arc<Endpoints>,
    service: String,
    selector: HashMap<String, String>,
    progress_interval: Duration,
    include_not_serving: bool,
    /// Last revision seen (0: none yet, start with a snapshot).
    revision: u64,
    /// Registry life `revision` belongs to.
    epoch: u64,
    stream: Option<(usize, tonic::Streaming<pb::WatchResponse>)>,
    /// Set after an interruption: wait this long before reopening.
    wait: Option<Duration>,
    backoff: Backoff,
    chunks: Vec<pb::Instance>,
    done: bool,
}

impl Session {
    pub(crate) fn new(endpoints: Arc<Endpoints>, query: Query, options: WatchOptions) -> Self {
        let (epoch, revision) = options.resume.unwrap_or((0, 0));
        Self {
            endpoints,
            selector: query.selector_map(),
            service: query.service,
            progress_interval: options.progress_interval,
            include_not_serving: options.include_not_serving,
            revision,
            epoch,
            stream: None,
            wait: None,
            backoff: Backoff::default(),
            chunks: Vec::new(),
            done: false,
        }
    }

    /// The session as a stream of batches, ending after a fatal error.
    pub(crate) fn into_stream(self) -> impl Stream<Item = Result<Vec<WatchEvent>, Error>> + Send {
        futures::stream::unfold(self, |mut session| async move {
            session.next_batch().await.map(|batch| (batch, session))
        })
    }

    /// The events of the next server message (one snapshot, one batch of
    /// events of whole revisions, or a progress), or an `Interrupted`, or an
    /// empty batch when a stream was (re)opened; `Err` once for a fatal
    /// error, then `None`.
    pub(crate) async fn next_batch(&mut self) -> Option<Result<Vec<WatchEvent>, Error>> {
        if self.done {
            return None;
        }
        loop {
            if self.stream.is_none() {
                if let Some(wait) = self.wait.take() {
                    tokio::time::sleep(wait).await;
                }
                match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        // An empty batch says "connected" to the resolver
                        // at once; a resumed stream may otherwise stay
                        // quiet until the next change or progress.
                        return Some(Ok(Vec::new()));
                    }
                    Err(e) => return Some(self.interrupted(e)),
                }
            }
            let (node, stream) = self.stream.as_mut().expect("opened above");
            let node = *node;
            let idle = self.progress_interval * IDLE_FACTOR;
            let message = match tokio::time::timeout(idle, stream.message()).await {
                Err(_) => {
                    return Some(self.interrupted(Error::Unavailable {
                        registry: self.endpoints.uri(node).to_owned(),
                        status: tonic::Status::deadline_exceeded(format!(
                            "watch stream silent for {idle:?}"
                        )),
                    }));
                }
                Ok(Err(status)) => {
                    let e = Error::from_status(self.endpoints.uri(node), status);
                    return Some(self.interrupted(e));
                }
                Ok(Ok(None)) => {
                    return Some(self.interrupted(Error::Unavailable {
                        registry: self.endpoints.uri(node).to_owned(),
                        status: tonic::Status::unavailable("watch stream ended"),
                    }));
                }
                Ok(Ok(Some(message))) => message,
            };
            self.backoff.reset();
            match message.kind {
                Some(pb::watch_response::Kind::Snapshot(mut s)) => {
                    self.chunks.append(&mut s.instances);
                    if s.more {
                        continue;
                    }
                    let server = ServerInfo::from(s.server);
                    let instances: Vec<Instance> = std::mem::take(&mut self.chunks)
                        .into_iter()
                        .map(Instance::from)
                        .collect();
                    self.revision = s.revision;
                    if server.epoch != 0 {
                        self.epoch = server.epoch;
                    }
                    let reset = s.reset.then(|| ResetReason::from_pb(s.reason()));
                    let service_known = instances.is_empty() && !self.service.is_empty();
                    let service_known = if service_known {
                        self.service_known().await
                    } else {
                        true
                    };
                    return Some(Ok(vec![WatchEvent::Snapshot(Snapshot {
                        revision: s.revision,
                        instances,
                        reset,
                        service_known,
                        server,
                    })]));
                }
                Some(pb::watch_response::Kind::Events(batch)) => {
                    let mut events = Vec::with_capacity(batch.events.len());
                    for event in batch.events {
                        self.revision = self.revision.max(event.revision);
                        let Some(instance) = event.instance else {
                            continue;
                        };
                        let instance = Instance::from(instance);
                        match pb::EventType::try_from(event.r#type) {
                            Ok(pb::EventType::Put) => events.push(WatchEvent::Put {
                                revision: event.revision,
                                instance,
                            }),
                            Ok(pb::EventType::Delete) => events.push(WatchEvent::Delete {
                                revision: event.revision,
                                instance,
                                reason: DeleteReason::from_pb(
                                    pb::DeleteReason::try_from(event.reason)
                                        .unwrap_or(pb::DeleteReason::Unspecified),
                                ),
                            }),
                            _ => tracing::warn!(
                                r#type = event.r#type,
                                "unknown watch event type ignored"
                            ),
                        }
                    }
                    return Some(Ok(events));
                }
                Some(pb::watch_response::Kind::Progress(p)) => {
                    self.revision = self.revision.max(p.revision);
                    let server = ServerInfo::from(p.server);
                    if server.epoch != 0 {
                        self.epoch = server.epoch;
                    }
                    return Some(Ok(vec![WatchEvent::Progress {
                        revision: p.revision,
                        server,
                    }]));
                }
                None => continue,
            }
        }
    }

    /// Opens the watch on the current node, resuming after what was seen.
    async fn open(&mut self) -> Result<(usize, tonic::Streaming<pb::WatchResponse>), Error> {
        let (node, channel) = self.endpoints.current();
        let request = pb::WatchRequest {
            service: self.service.clone(),
            start_revision: if self.revision == 0 {
                0
            } else {
                self.revision + 1
            },
            selector: self.selector.clone(),
            epoch: self.epoch,
            progress_interval_ms: u64::try_from(self.progress_interval.as_millis())
                .unwrap_or(u64::MAX),
            include_not_serving: self.include_not_serving,
        };
        // Chunks of a snapshot in progress belong to the stream that broke.
        self.chunks.clear();
        let timeout = self.endpoints.settings().request_timeout;
        match tokio::time::timeout(timeout, grpc(channel).watch(request)).await {
            Ok(Ok(response)) => Ok((node, response.into_inner())),
            Ok(Err(status)) => Err(Error::from_status(self.endpoints.uri(node), status)),
            Err(_) => Err(Error::Unavailable {
                registry: self.endpoints.uri(node).to_owned(),
                status: tonic::Status::deadline_exceeded(format!(
                    "no answer to Watch within {timeout:?}"
                )),
            }),
        }
    }

    /// Turns a failure into an `Interrupted` batch (transient) or the final
    /// error.
    fn interrupted(&mut self, error: Error) -> Result<Vec<WatchEvent>, Error> {
        if let Some((node, _)) = self.stream.take()
            && error.is_unavailable()
        {
            self.endpoints.failed(node);
        } else if error.is_unavailable() {
            // Opening failed: the current node is the one that failed.
            let (node, _) = self.endpoints.current();
            self.endpoints.failed(node);
        }
        if !error.is_unavailable() {
            self.done = true;
            return Err(error);
        }
        let retry_in = self.backoff.next_delay();
        self.wait = Some(retry_in);
        tracing::debug!(service = %self.service, error = %error, ?retry_in, "watch interrupted");
        Ok(vec![WatchEvent::Interrupted { error, retry_in }])
    }

    /// Whether the registry knows the name, for an empty snapshot (an
    /// unknown name and a known service with zero instances are different
    /// answers). A failure counts as known: never claim a typo on a guess.
    async fn service_known(&self) -> bool {
        let request = pb::ResolveRequest {
            service: self.service.clone(),
            selector: self.selector.clone(),
            include_lease_ttl: false,
            include_not_serving: true,
        };
        match call(&self.endpoints, move |mut grpc| {
            let request = request.clone();
            async move { grpc.resolve(request).await }
        })
        .await
        {
            Ok(resp) => resp.service_known || !resp.instances.is_empty(),
            Err(_) => true,
        }
    }
}
