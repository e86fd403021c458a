//! Health checks the registry runs against instances (issue 17).
//!
//! A heartbeat proves a process is alive, not that it can serve. An
//! instance registered with a [`HealthCheck`] is probed by the registry
//! node it registered through — grpc.health.v1 `Check`, an HTTP GET, or a
//! TCP connect — every `interval`, and its health state
//! (`PASSING`/`WARNING`/`CRITICAL`) follows the results with flap damping:
//! a serving instance turns `CRITICAL` only after
//! `failures_before_critical` failures in a row, a critical one `PASSING`
//! only after `successes_before_passing` passes in a row. A change of state
//! is written through the ordinary write path ([`Registry::record_check`]):
//! a PUT at a new revision, durable with `--data-dir`, replicated in a
//! cluster, seen by watchers and xDS at once. Unchanged results are written
//! at most every `--check-refresh` (the time and output of the last check).
//!
//! **Who checks what.** One task per registry ([`spawn`]) follows the
//! catalog through an ordinary watcher and checks the instances whose lease
//! lives in this node's lease table: every instance in a single registry,
//! and in a cluster exactly the ones registered through this node (leases
//! are node-local), so each instance is checked once.
//!
//! **Bounded cost.** A semaphore caps the checks in flight
//! (`--max-checks-in-flight`); due checks wait for a slot (the wait is the
//! `registry_health_check_lag_seconds` histogram). Checks are spread: a new
//! instance's first check comes within `min(interval, 1 s)` (so it is
//! served soon), a restored one's within one interval, and every later one
//! an interval ±10% after the previous, so phases drift apart instead of
//! firing in lockstep. Every check is bounded by its timeout, connecting
//! included; an HTTP answer is read up to [`MAX_OUTPUT`] bytes of body and
//! 16 KiB of head and never followed through a redirect; a gRPC answer is
//! limited to 4 KiB. So a port that never answers, a slowloris server, an
//! endless body or a redirect loop cost one slot for one timeout, and a
//! few kilobytes.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use rand::Rng;
use registry_api::v1::{HealthCheck, HealthState, Instance, health_check::Kind};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    catalog::{EventKind, InstanceKey, RevisionBatch, WatchFilter, WatcherHandle},
    core::{CheckRecord, Registry},
    metrics::HealthMetrics,
};

/// Most bytes of a check's output kept on the instance (and of an HTTP
/// body read for it).
pub const MAX_OUTPUT: usize = 256;
/// Largest HTTP response head a check reads (hyper's minimum buffer).
const MAX_HTTP_HEAD: usize = 16 << 10;
/// Largest gRPC health answer decoded: a `HealthCheckResponse` is a few
/// bytes.
const MAX_GRPC_ANSWER: usize = 4 << 10;
/// A never-checked instance is checked within this (or its interval, if
/// shorter): it may be waiting to be served.
const FIRST_CHECK_SPREAD: Duration = Duration::from_secs(1);
/// Later checks come an interval ± this share of it after the previous.
const JITTER: f64 = 0.1;

/// What one check said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `PASSING`, `WARNING` or `CRITICAL` for this one result.
    pub state: HealthState,
    /// Human-readable detail (status, or why it failed), at most
    /// [`MAX_OUTPUT`] bytes.
    pub output: String,
}

impl Outcome {
    fn new(state: HealthState, output: impl Into<String>) -> Self {
        let output = output.into();
        Self {
            state,
            output: crate::validate::truncate(&output, MAX_OUTPUT).to_owned(),
        }
    }

    fn critical(output: impl Into<String>) -> Self {
        Self::new(HealthState::Critical, output)
    }
}

/// What to check: an address and a (validated, defaults filled) check.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `host:port` the check connects to.
    pub address: String,
    /// The check.
    pub check: HealthCheck,
}

impl Target {
    /// The target of `instance`'s check (its own address unless the check
    /// names another), or `None` without a check.
    pub fn of(instance: &Instance) -> Option<Self> {
        let check = HealthCheck::clone(instance.check.as_deref()?);
        let named = match &check.kind {
            Some(Kind::Grpc(g)) => &g.address,
            Some(Kind::Http(h)) => &h.address,
            Some(Kind::Tcp(t)) => &t.address,
            None => return None,
        };
        let address = if named.is_empty() {
            instance.address.clone()
        } else {
            named.clone()
        };
        Some(Self { address, check })
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.check.interval_ms.max(1))
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.check.timeout_ms.max(1))
    }
}

/// Runs one check of `target`, bounded by its timeout (connecting
/// included): never longer, and never more memory than a few kilobytes,
/// whatever the other end does.
pub async fn probe(target: &Target) -> Outcome {
    let timeout = target.timeout();
    let work = async {
        match &target.check.kind {
            Some(Kind::Tcp(_)) => tcp(&target.address).await,
            Some(Kind::Http(h)) => http(&target.address, &h.path).await,
            Some(Kind::Grpc(g)) => grpc(&target.address, &g.service, timeout).await,
            None => Outcome::critical("no check kind"),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::critical(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn tcp(address: &str) -> Outcome {
    match TcpStream::connect(address).await {
        Ok(_) => Outcome::new(
            HealthState::Passing,
            format!("TCP connect to {address}: ok"),
        ),
        Err(e) => Outcome::critical(format!("TCP connect to {address}: {e}")),
    }
}

/// Aborts a spawned task when dropped: the HTTP connection driver of a
/// check must not outlive it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn http(address: &str, path: &str) -> Outcome {
    let stream = match TcpStream::connect(address).await {
        Ok(s) => s,
        Err(e) => return Outcome::critical(format!("HTTP GET http://{address}{path}: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let handshake = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HTTP_HEAD)
        .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await;
    let (mut sender, conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => return Outcome::critical(format!("HTTP GET http://{address}{path}: {e}")),
    };
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let request = http::Request::get(path)
        .header(http::header::HOST, address)
        .header(http::header::USER_AGENT, "registry-health-check")
        .header(http::header::ACCEPT, "*/*")
        .body(Empty::new());
    let request = match request {
        Ok(r) => r,
        Err(e) => return Outcome::critical(format!("HTTP GET {path}: {e}")),
    };
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => return Outcome::critical(format!("HTTP GET http://{address}{path}: {e}")),
    };
    let status = response.status();
    // A snippet of the body for the output: at most MAX_OUTPUT bytes are
    // read, however much the server sends; the rest is dropped with the
    // connection.
    let mut body = response.into_body();
    let mut snippet = Vec::new();
    while snippet.len() < MAX_OUTPUT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let take = (MAX_OUTPUT - snippet.len()).min(data.len());
                    snippet.extend_from_slice(&data[..take]);
                }
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&snippet);
    let text = text.trim();
    let line = if text.is_empty() {
        format!("HTTP GET {path}: {status}")
    } else {
        format!("HTTP GET {path}: {status}: {text}")
    };
    let state = if status.is_success() {
        HealthState::Passing
    } else if status == http::StatusCode::TOO_MANY_REQUESTS {
        HealthState::Warning
    } else {
        HealthState::Critical
    };
    if status.is_redirection() {
        return Outcome::critical(format!("{line} (redirects are not followed)"));
    }
    Outcome::new(state, line)
}

async fn grpc(address: &str, service: &str, timeout: Duration) -> Outcome {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(e) => e
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true),
        Err(e) => return Outcome::critical(format!("gRPC health of {address}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            return Outcome::critical(format!("gRPC health of {address}: {}", chain(&e)));
        }
    };
    let mut client = HealthClient::new(channel).max_decoding_message_size(MAX_GRPC_ANSWER);
    let answer = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await;
    let what = if service.is_empty() {
        "server".to_owned()
    } else {
        format!("service {service:?}")
    };
    match answer {
        Ok(resp) => match resp.into_inner().status() {
            ServingStatus::Serving => Outcome::new(
                HealthState::Passing,
                format!("gRPC health of {what}: SERVING"),
            ),
            other => Outcome::critical(format!("gRPC health of {what}: {}", other.as_str_name())),
        },
        Err(status) => Outcome::critical(format!(
            "gRPC health of {what}: {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// An error and its sources on one line (tonic's transport errors say
/// little at the top).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The flap-damped state after one more result: a serving instance turns
/// CRITICAL only after `failures_before_critical` failures in a row, a
/// critical one serves again only after `successes_before_passing` passes
/// in a row (then PASSING or WARNING as the last result says); between two
/// serving states it follows each result at once.
pub fn next_state(
    current: HealthState,
    result: HealthState,
    streak: u32,
    check: &HealthCheck,
) -> HealthState {
    match (current, result) {
        (HealthState::Critical, HealthState::Critical) => HealthState::Critical,
        (HealthState::Critical, ok) if streak >= check.successes_before_passing.max(1) => ok,
        (HealthState::Critical, _) => HealthState::Critical,
        (_, HealthState::Critical) if streak >= check.failures_before_critical.max(1) => {
            HealthState::Critical
        }
        (serving, HealthState::Critical) => serving,
        (_, ok) => ok,
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Spawns the checker (see the module docs); it stops when the registry
/// shuts down, aborting checks in flight.
pub fn spawn(registry: Registry) -> JoinHandle<()> {
    tokio::spawn(run(registry))
}

async fn run(registry: Registry) {
    let shutdown = registry.shutdown_token().clone();
    let catalog = registry.catalog().clone();
    // Subscribe before the first scan, so nothing committed in between is
    // missed (a change seen twice is harmless).
    let mut sub: WatcherHandle = catalog.subscribe_internal(WatchFilter::default());
    let slots = Arc::new(Semaphore::new(registry.config().max_checks_in_flight));
    let mut checker = Checker::new(registry.clone());
    checker.rescan();
    let mut tasks: JoinSet<Msg> = JoinSet::new();
    loop {
        if sub.overflowed() {
            catalog.resubscribe(&mut sub);
            checker.rescan();
        }
        let due = checker.next_due();
        let ready = !checker.ready.is_empty();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(msg) = done {
                    checker.on_message(msg, &mut tasks);
                }
            }
            batch = sub.recv() => match batch {
                Some(batch) => checker.on_batch(&batch),
                None => break,
            },
            permit = slots.clone().acquire_owned(), if ready => {
                if let Ok(permit) = permit {
                    checker.start_next(permit, &mut tasks);
                }
            }
            _ = sleep_until(due), if !ready => checker.collect_due(),
        }
    }
    tasks.abort_all();
    debug!("health checker stopped");
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a finished task reports to the checker loop.
enum Msg {
    Checked {
        key: InstanceKey,
        generation: u64,
        outcome: Outcome,
    },
    Written {
        key: InstanceKey,
        generation: u64,
        ok: bool,
    },
}

/// One checked instance.
struct Tracked {
    target: Target,
    /// Bumped whenever the target changes: results of older checks are
    /// dropped.
    generation: u64,
    /// The health the catalog holds for it (from the last PUT seen).
    recorded: HealthState,
    /// The damped state the results lead to.
    state: HealthState,
    /// Results in a row agreeing with the last one (passes, or failures).
    streak: u32,
    last_result: Option<HealthState>,
    /// When a result was last written; `None` before the first.
    written_at: Option<Instant>,
    /// A write of this state is under way.
    writing: Option<HealthState>,
    /// When its next check is due.
    next_due: Instant,
    running: bool,
}

struct Checker {
    registry: Registry,
    metrics: Arc<crate::metrics::Metrics>,
    tracked: HashMap<InstanceKey, Tracked>,
    /// `(due, generation, key)`; entries whose instance moved on are
    /// skipped when popped.
    due: BinaryHeap<Reverse<(Instant, u64, InstanceKey)>>,
    /// Due checks waiting for a slot, with their due time.
    ready: VecDeque<(InstanceKey, u64, Instant)>,
    next_generation: u64,
}

impl Checker {
    fn new(registry: Registry) -> Self {
        Self {
            metrics: registry.metrics().clone(),
            registry,
            tracked: HashMap::new(),
            due: BinaryHeap::new(),
            ready: VecDeque::new(),
            next_generation: 1,
        }
    }

    fn health_metrics(&self) -> &HealthMetrics {
        self.metrics.health()
    }

    /// Re-reads every service: at start, and after the subscription fell
    /// behind (its queue was dropped).
    fn rescan(&mut self) {
        let catalog = self.registry.catalog().clone();
        let (services, _) = catalog.list_services();
        let mut seen = std::collections::HashSet::new();
        for (name, _) in services {
            let Some(snap) = catalog.resolve(&name).0 else {
                continue;
            };
            for instance in snap.instances() {
                let key = InstanceKey::of(instance);
                self.upsert(&key, instance);
                seen.insert(key);
            }
        }
        self.tracked.retain(|k, _| seen.contains(k));
        self.publish();
    }

    fn on_batch(&mut self, batch: &RevisionBatch) {
        for ev in &batch.events {
            let key = InstanceKey::of(&ev.instance);
            match ev.kind {
                EventKind::Put { .. } => self.upsert(&key, &ev.instance),
                EventKind::Delete(_) => {
                    self.tracked.remove(&key);
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.health_metrics()
            .checked
            .store(self.tracked.len(), Ordering::Relaxed);
    }

    /// An instance as the catalog now has it: start, keep or stop checking.
    fn upsert(&mut self, key: &InstanceKey, instance: &Instance) {
        let local = self.registry.leases().get(instance.lease_id).is_some();
        let target = Target::of(instance).filter(|_| local);
        let Some(target) = target else {
            self.tracked.remove(key);
            return;
        };
        let health = HealthState::try_from(instance.health).unwrap_or(HealthState::Passing);
        if let Some(t) = self.tracked.get_mut(key)
            && t.target == target
        {
            t.recorded = health;
            if t.writing == Some(health) {
                t.writing = None;
            }
            return;
        }
        // New, or registered again with another address or check: start
        // over from the state it was registered with.
        let generation = self.next_generation;
        self.next_generation += 1;
        let interval = target.interval();
        let spread = if instance.last_check.is_none() {
            interval.min(FIRST_CHECK_SPREAD)
        } else {
            interval
        };
        let next_due = Instant::now() + spread.mul_f64(rand::rng().random_range(0.0..1.0));
        self.due.push(Reverse((next_due, generation, key.clone())));
        self.tracked.insert(
            key.clone(),
            Tracked {
                target,
                generation,
                recorded: health,
                state: health,
                streak: 0,
                last_result: None,
                written_at: None,
                writing: None,
                next_due,
                running: false,
            },
        );
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Moves every due check to the ready queue.
    fn collect_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, generation, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let (at, generation) = (*at, *generation);
            let Some(Reverse((_, _, key))) = self.due.pop() else {
                break;
            };
            if self
                .tracked
                .get(&key)
                .is_some_and(|t| t.generation == generation && t.next_due == at)
            {
                self.ready.push_back((key, generation, at));
            }
        }
    }

    /// Starts the next ready check in the slot `permit` holds, and
    /// schedules the one after it.
    fn start_next(&mut self, permit: OwnedSemaphorePermit, tasks: &mut JoinSet<Msg>) {
        let now = Instant::now();
        while let Some((key, generation, due)) = self.ready.pop_front() {
            let Some(t) = self.tracked.get_mut(&key) else {
                continue;
            };
            if t.generation != generation || t.next_due != due {
                continue;
            }
            let interval = t.target.interval();
            let jittered = interval.mul_f64(1.0 + rand::rng().random_range(-JITTER..=JITTER));
            let mut next = due + jittered;
            if next <= now {
                // Fell behind (slots saturated): keep the interval from now
                // rather than firing a backlog.
                next = now + jittered;
            }
            t.next_due = next;
            self.due.push(Reverse((next, generation, key.clone())));
            if t.running {
                // The previous check of it still holds a slot: skip this one.
                continue;
            }
            t.running = true;
            self.metrics
                .health()
                .lag(now.saturating_duration_since(due));
            let target = t.target.clone();
            let metrics = self.metrics.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let health = metrics.health();
                health.in_flight.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let outcome = probe(&target).await;
                health.check_done(outcome.state as usize, started.elapsed());
                health.in_flight.fetch_sub(1, Ordering::Relaxed);
                Msg::Checked {
                    key,
                    generation,
                    outcome,
                }
            });
            return;
        }
    }

    fn on_message(&mut self, msg: Msg, tasks: &mut JoinSet<Msg>) {
        match msg {
            Msg::Checked {
                key,
                generation,
                outcome,
            } => self.on_result(key, generation, outcome, tasks),
            Msg::Written {
                key,
                generation,
                ok,
            } => {
                if !ok
                    && let Some(t) = self.tracked.get_mut(&key)
                    && t.generation == generation
                {
                    // Try again with the next result.
                    t.writing = None;
                    t.written_at = None;
                }
            }
        }
    }

    fn on_result(
        &mut self,
        key: InstanceKey,
        generation: u64,
        outcome: Outcome,
        tasks: &mut JoinSet<Msg>,
    ) {
        let refresh = self.registry.config().check_refresh;
        let Some(t) = self.tracked.get_mut(&key) else {
            return;
        };
        if t.generation != generation {
            return;
        }
        t.running = false;
        let agrees = match (t.last_result, outcome.state) {
            (Some(HealthState::Critical), HealthState::Critical) => true,
            (Some(HealthState::Critical), _) | (_, HealthState::Critical) => false,
            (Some(_), _) => true,
            (None, _) => false,
        };
        t.streak = if agrees { t.streak + 1 } else { 1 };
        t.last_result = Some(outcome.state);
        let state = next_state(t.state, outcome.state, t.streak, &t.target.check);
        if state != t.state {
            self.metrics.health().transition(state as usize);
            info!(service = %key.service, id = %key.id, from = ?t.state, to = ?state,
                output = %outcome.output, "instance health changed");
            t.state = state;
        }
        let now = Instant::now();
        let changed = state != t.recorded && t.writing != Some(state);
        let stale = match t.written_at {
            None => true,
            Some(at) => !refresh.is_zero() && now.duration_since(at) >= refresh,
        };
        if !(changed || (stale && t.writing.is_none())) {
            return;
        }
        let record = CheckRecord {
            service: key.service.to_string(),
            id: key.id.to_string(),
            target: t.target.clone(),
            health: state,
            output: outcome.output,
            at_unix_ms: unix_ms(),
        };
        t.written_at = Some(now);
        t.writing = Some(state);
        match self.registry.plan_record_check(record) {
            Ok(Some(pending)) => {
                tasks.spawn(async move {
                    let ok = match pending.wait().await {
                        Ok(_) => true,
                        Err(e) => {
                            warn!(service = %key.service, id = %key.id, error = %e,
                                "health check result not written; retried with the next result");
                            false
                        }
                    };
                    Msg::Written {
                        key,
                        generation,
                        ok,
                    }
                });
            }
            Ok(None) => {
                // Registered again with another address or check since:
                // the PUT on its way resets it.
                t.writing = None;
            }
            Err(e) => {
                self.metrics
                    .health()
                    .dropped
                    .fetch_add(1, Ordering::Relaxed);
                debug!(service = %key.service, id = %key.id, error = %e,
                    "health check result not written; retried with the next result");
                t.writing = None;
                t.written_at = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(failures: u32, successes: u32) -> HealthCheck {
        HealthCheck {
            failures_before_critical: failures,
            successes_before_passing: successes,
            ..Default::default()
        }
    }

    #[test]
    fn damping_needs_streaks_both_ways() {
        use HealthState::*;
        let c = check(3, 2);
        assert_eq!(next_state(Passing, Critical, 1, &c), Passing);
        assert_eq!(next_state(Passing, Critical, 2, &c), Passing);
        assert_eq!(next_state(Passing, Critical, 3, &c), Critical);
        assert_eq!(next_state(Critical, Passing, 1, &c), Critical);
        assert_eq!(next_state(Critical, Warning, 2, &c), Warning);
        assert_eq!(
            next_state(Passing, Warning, 1, &c),
            Warning,
            "serving to serving follows at once"
        );
        assert_eq!(next_state(Warning, Critical, 2, &c), Warning);
    }

    /// A check alternating pass/fail never changes the state when both
    /// thresholds are above 1.
    #[test]
    fn alternating_results_do_not_flap() {
        let c = check(2, 2);
        for start in [HealthState::Passing, HealthState::Critical] {
            let mut state = start;
            let mut last = None;
            let mut streak = 0;
            for n in 0..100 {
                let result = if n % 2 == 0 {
                    HealthState::Critical
                } else {
                    HealthState::Passing
                };
                streak = if last == Some(result) { streak + 1 } else { 1 };
                last = Some(result);
                state = next_state(state, result, streak, &c);
                assert_eq!(state, start);
            }
        }
    }
}
