//! Seeded random clients, resuming watchers and the recorder.
//!
//! Each client has its own connection and its own `StdRng` (seeded from
//! the run's seed and its index) and loops: register with a new lease
//! (mostly long TTLs, some short enough to expire during the run), attach
//! to a recently granted lease, replace (the id pools are small, so a
//! register often replaces), deregister by id or by lease, heartbeat,
//! Resolve, ListServices, Status. Watchers watch one service or all, read
//! for a while, disconnect and resume from their last revision + 1 (on the
//! same connection or a new one). The recorder is a watch-all stream opened
//! before any client: it sees every revision, expiries included.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use registry_api::v1::{
    DeregisterRequest, HeartbeatRequest, Instance, InstanceKey, ListServicesRequest,
    RegisterRequest, ResolveRequest, StatusRequest, WatchRequest, WatchResponse,
    deregister_request::Target, registry_client::RegistryClient, watch_response::Kind,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::transport::Channel;

use super::{Answer, Call, Failure, History, Op, WatchLog, WatchSession};

/// Shape of a run.
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    /// Server life (crash test), recorded in the history.
    pub life: usize,
    pub clients: usize,
    /// Watchers besides the recorder; watcher 0 watches every service.
    pub watchers: usize,
    /// Services `h0`..: few, so clients collide on them.
    pub services: usize,
    /// Instance ids per service `i00`..: few, so registers often replace.
    pub ids: usize,
    /// TTL of most leases: longer than a run, so they end by deregister.
    pub long_ttl_ms: u64,
    /// TTL range of the short leases, which expire during the run unless
    /// a heartbeat happens to renew them.
    pub short_ttl_ms: (u64, u64),
}

impl Config {
    /// The default mix: 4 clients, 3 watchers, 4 services of 12 ids.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            life: 0,
            clients: 4,
            watchers: 3,
            services: 4,
            ids: 12,
            long_ttl_ms: 60_000,
            short_ttl_ms: (300, 900),
        }
    }
}

/// Leases recently granted by any client: the targets of attach,
/// heartbeat and deregister-by-lease.
const LEASE_POOL: usize = 24;
/// Per-call deadline: a call outliving it is recorded as indeterminate.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A run in progress.
#[derive(Debug)]
pub struct Running {
    seed: u64,
    life: usize,
    stop: watch::Sender<bool>,
    stop_recorder: watch::Sender<bool>,
    clients: Vec<JoinHandle<Vec<Op>>>,
    watchers: Vec<JoinHandle<WatchLog>>,
    recorder: JoinHandle<WatchLog>,
    /// Last revision the recorder has fully received.
    recorded: watch::Receiver<u64>,
}

/// Opens the recorder (and waits for its snapshot), then starts the
/// clients and watchers against `url`.
pub async fn start(url: &str, cfg: &Config) -> Running {
    let base = Instant::now();
    let (stop, stop_rx) = watch::channel(false);
    let (stop_recorder, stop_recorder_rx) = watch::channel(false);
    let (recorded_tx, mut recorded) = watch::channel(0u64);
    let recorder = tokio::spawn(record(connect(url), stop_recorder_rx, recorded_tx));
    tokio::time::timeout(Duration::from_secs(10), recorded.wait_for(|r| *r > 0))
        .await
        .expect("the recorder's snapshot arrives within 10 s")
        .ok();
    let pool = Arc::new(Mutex::new(VecDeque::new()));
    let clients = (0..cfg.clients)
        .map(|c| {
            let (url, cfg, pool, stop) =
                (url.to_owned(), cfg.clone(), pool.clone(), stop_rx.clone());
            tokio::spawn(async move { client(c, &url, &cfg, pool, stop, base).await })
        })
        .collect();
    let watchers = (0..cfg.watchers)
        .map(|w| {
            let (url, cfg, stop) = (url.to_owned(), cfg.clone(), stop_rx.clone());
            tokio::spawn(async move { watcher(w, &url, &cfg, stop).await })
        })
        .collect();
    Running {
        seed: cfg.seed,
        life: cfg.life,
        stop,
        stop_recorder,
        clients,
        watchers,
        recorder,
        recorded,
    }
}

impl Running {
    /// Last revision the recorder has received.
    pub fn recorded(&self) -> u64 {
        *self.recorded.borrow()
    }

    /// Stops clients and watchers and collects the history. With
    /// `drain_to`, first waits until the recorder has seen that revision
    /// (the server's revision once the clients stopped), so the history
    /// holds every revision.
    pub async fn finish(self, server: Option<&mut RegistryClient<Channel>>) -> History {
        let _ = self.stop.send(true);
        let mut ops = Vec::new();
        for c in self.clients {
            ops.extend(c.await.expect("client task"));
        }
        let mut watches = Vec::new();
        for w in self.watchers {
            watches.push(w.await.expect("watcher task"));
        }
        let mut final_revision = None;
        if let Some(server) = server {
            let revision = server
                .status(StatusRequest {})
                .await
                .expect("Status after the run")
                .into_inner()
                .revision;
            let mut recorded = self.recorded.clone();
            let reached = tokio::time::timeout(
                Duration::from_secs(10),
                recorded.wait_for(|r| *r >= revision),
            )
            .await
            .is_ok();
            assert!(
                reached,
                "the recorder did not reach revision {revision} within 10 s (it has {})",
                *self.recorded.borrow()
            );
            final_revision = Some(revision);
        }
        let _ = self.stop_recorder.send(true);
        let recorder = self.recorder.await.expect("recorder task");
        ops.sort_by_key(|o| o.invoke);
        for (i, op) in ops.iter_mut().enumerate() {
            op.seq = i;
        }
        History {
            seed: self.seed,
            life: self.life,
            final_revision,
            ops,
            watches,
            recorder,
        }
    }
}

/// A connection of its own (the server counts watchers per connection,
/// and a crash breaks every connection).
/// Lazy, so a client or watcher started (or reconnecting) while the server
/// is down records failed calls instead of panicking.
fn connect(url: &str) -> RegistryClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    RegistryClient::new(channel)
}

/// The revision a watch message brings the receiver up to (snapshots: once
/// complete).
fn covered(msg: &WatchResponse) -> Option<u64> {
    match msg.kind.as_ref()? {
        Kind::Snapshot(s) => (!s.more).then_some(s.revision),
        Kind::Events(b) => b.events.iter().map(|e| e.revision).max(),
        Kind::Progress(p) => Some(p.revision),
    }
}

async fn record(
    mut client: RegistryClient<Channel>,
    mut stop: watch::Receiver<bool>,
    recorded: watch::Sender<u64>,
) -> WatchLog {
    let mut session = WatchSession {
        start_revision: 0,
        epoch: 0,
        messages: Vec::new(),
        end: None,
    };
    let request = WatchRequest {
        progress_interval_ms: 100,
        ..Default::default()
    };
    match client.watch(request).await {
        Err(e) => session.end = Some(failure(e)),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    msg = stream.message() => match msg {
                        Ok(Some(msg)) => {
                            if let Some(r) = covered(&msg) {
                                // Snapshot revision 0 (empty catalog) still
                                // means "the snapshot arrived".
                                recorded.send_replace(r.max(1));
                            }
                            session.messages.push(msg);
                        }
                        Ok(None) => {
                            session.end = Some(Failure { code: tonic::Code::Ok, message: "stream ended".into() });
                            break;
                        }
                        Err(e) => {
                            session.end = Some(failure(e));
                            break;
                        }
                    }
                }
            }
        }
    }
    WatchLog {
        name: "recorder".into(),
        service: String::new(),
        sessions: vec![session],
    }
}

fn failure(s: tonic::Status) -> Failure {
    Failure {
        code: s.code(),
        message: s.message().to_owned(),
    }
}

fn rng_for(seed: u64, role: u64, index: usize) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ role.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

fn pick_lease(rng: &mut StdRng, pool: &Mutex<VecDeque<u64>>) -> u64 {
    let pool = pool.lock().unwrap();
    if pool.is_empty() {
        // Never granted: the server must answer NOT_FOUND.
        return rng.random_range(1..1_000);
    }
    pool[rng.random_range(0..pool.len())]
}

fn instance(rng: &mut StdRng, cfg: &Config, client: usize) -> Instance {
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("v".to_owned(), rng.random_range(0..4).to_string());
    if rng.random_bool(0.25) {
        metadata.insert(
            "zone".to_owned(),
            ["a", "b"][rng.random_range(0..2)].to_owned(),
        );
    }
    Instance {
        service: format!("h{}", rng.random_range(0..cfg.services)),
        id: format!("i{:02}", rng.random_range(0..cfg.ids)),
        address: format!(
            "10.{client}.{}.{}:{}",
            rng.random_range(0..256),
            rng.random_range(0..256),
            rng.random_range(1000..2000)
        ),
        metadata,
        weight: rng.random_range(0..4),
        ..Default::default()
    }
}

/// Draws the next call.
fn next_call(rng: &mut StdRng, cfg: &Config, client: usize, pool: &Mutex<VecDeque<u64>>) -> Call {
    let service = |rng: &mut StdRng| format!("h{}", rng.random_range(0..cfg.services));
    match rng.random_range(0..100) {
        0..14 => Call::Register {
            instance: instance(rng, cfg, client),
            ttl_ms: cfg.long_ttl_ms,
            lease_id: 0,
        },
        14..19 => Call::Register {
            instance: instance(rng, cfg, client),
            ttl_ms: rng.random_range(cfg.short_ttl_ms.0..=cfg.short_ttl_ms.1),
            lease_id: 0,
        },
        19..35 => Call::Register {
            instance: instance(rng, cfg, client),
            ttl_ms: 0,
            lease_id: pick_lease(rng, pool),
        },
        35..43 => Call::DeregisterInstance {
            service: service(rng),
            id: format!("i{:02}", rng.random_range(0..cfg.ids)),
        },
        43..48 => Call::DeregisterLease {
            lease_id: pick_lease(rng, pool),
        },
        48..58 => Call::Heartbeat {
            lease_ids: (0..rng.random_range(1..=3))
                .map(|_| pick_lease(rng, pool))
                .collect(),
        },
        58..88 => Call::Resolve {
            service: service(rng),
        },
        88..96 => Call::ListServices,
        _ => Call::Status,
    }
}

/// Sends one call.
pub async fn send(client: &mut RegistryClient<Channel>, call: &Call) -> Result<Answer, Failure> {
    let fut = async {
        match call.clone() {
            Call::Register {
                instance,
                ttl_ms,
                lease_id,
            } => client
                .register(RegisterRequest {
                    instance: Some(instance),
                    ttl_ms,
                    lease_id,
                })
                .await
                .map(|r| Answer::Register(r.into_inner())),
            Call::DeregisterInstance { service, id } => client
                .deregister(DeregisterRequest {
                    target: Some(Target::Instance(InstanceKey { service, id })),
                })
                .await
                .map(|r| Answer::Deregister(r.into_inner())),
            Call::DeregisterLease { lease_id } => client
                .deregister(DeregisterRequest {
                    target: Some(Target::LeaseId(lease_id)),
                })
                .await
                .map(|r| Answer::Deregister(r.into_inner())),
            Call::Heartbeat { lease_ids } => client
                .heartbeat(HeartbeatRequest { lease_ids })
                .await
                .map(|r| Answer::Heartbeat(r.into_inner())),
            Call::Resolve { service } => client
                .resolve(ResolveRequest {
                    service,
                    ..Default::default()
                })
                .await
                .map(|r| Answer::Resolve(r.into_inner())),
            Call::ListServices => client
                .list_services(ListServicesRequest {})
                .await
                .map(|r| Answer::ListServices(r.into_inner())),
            Call::Status => client
                .status(StatusRequest {})
                .await
                .map(|r| Answer::Status(r.into_inner())),
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(failure),
        Err(_) => Err(Failure {
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

async fn client(
    index: usize,
    url: &str,
    cfg: &Config,
    pool: Arc<Mutex<VecDeque<u64>>>,
    stop: watch::Receiver<bool>,
    base: Instant,
) -> Vec<Op> {
    let mut rng = rng_for(cfg.seed, 1, index);
    let mut conn = connect(url);
    let mut ops = Vec::new();
    while !*stop.borrow() {
        let call = next_call(&mut rng, cfg, index, &pool);
        let invoke = base.elapsed();
        let outcome = send(&mut conn, &call).await;
        let ret = base.elapsed();
        if let (Call::Register { lease_id: 0, .. }, Ok(Answer::Register(r))) = (&call, &outcome) {
            let mut pool = pool.lock().unwrap();
            if pool.len() == LEASE_POOL {
                pool.pop_front();
            }
            pool.push_back(r.lease_id);
        }
        let broken = matches!(&outcome, Err(f) if f.indeterminate());
        ops.push(Op {
            client: index,
            seq: 0,
            invoke,
            ret,
            call,
            outcome,
        });
        if broken {
            // The server is gone (crash test): don't spin until told to stop.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ops
}

async fn watcher(
    index: usize,
    url: &str,
    cfg: &Config,
    mut stop: watch::Receiver<bool>,
) -> WatchLog {
    let mut rng = rng_for(cfg.seed, 2, index);
    let service = if index == 0 {
        String::new()
    } else {
        format!("h{}", rng.random_range(0..cfg.services))
    };
    let mut log = WatchLog {
        name: format!("watcher {index}"),
        service: service.clone(),
        sessions: Vec::new(),
    };
    let mut conn = connect(url);
    let (mut last, mut epoch) = (0u64, 0u64);
    while !*stop.borrow() {
        let start_revision = if last == 0 { 0 } else { last + 1 };
        let mut session = WatchSession {
            start_revision,
            epoch,
            messages: Vec::new(),
            end: None,
        };
        let request = WatchRequest {
            service: service.clone(),
            start_revision,
            epoch,
            progress_interval_ms: 150,
            ..Default::default()
        };
        let until = Instant::now() + Duration::from_millis(rng.random_range(50..600));
        match conn.watch(request).await {
            Err(e) => {
                session.end = Some(failure(e));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep_until(until) => break,
                        msg = stream.message() => match msg {
                            Ok(Some(msg)) => {
                                if let Some(Kind::Snapshot(s)) = &msg.kind
                                    && let Some(server) = &s.server
                                {
                                    epoch = server.epoch;
                                }
                                if let Some(r) = covered(&msg) {
                                    last = last.max(r);
                                }
                                session.messages.push(msg);
                            }
                            Ok(None) => {
                                session.end = Some(Failure { code: tonic::Code::Ok, message: "stream ended".into() });
                                break;
                            }
                            Err(e) => {
                                session.end = Some(failure(e));
                                break;
                            }
                        }
                    }
                }
            }
        }
        // A snapshot cut short (more: true with the rest unread) leaves
        // `last` where it was: resuming from it is still exact.
        log.sessions.push(session);
        if rng.random_bool(0.3) {
            conn = connect(url);
        }
    }
    log
}
