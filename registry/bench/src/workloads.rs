//! One function per workload of issue 7. Each returns the row(s) it measured;
//! setup phases (registering the instances a workload needs) are timed
//! separately and never mixed into its figures.

use std::{collections::HashMap, sync::Arc, time::Duration};

use registry_api::{
    bench::{EchoRequest, echo_client::EchoClient},
    v1::{
        DeleteReason, EventType, HeartbeatRequest, Instance, RegisterRequest, ResolveRequest,
        StatusRequest, WatchRequest, registry_client::RegistryClient, watch_response::Kind,
    },
};
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout, timeout_at},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

use super::{
    BenchError, Options,
    echo::EchoService,
    load::{Outcome, Plan, drive, histogram},
    report::{Latency, Row},
    target::{self, Target},
};

/// Bytes echoed by the ceiling service: about a small registry request.
const ECHO_PAYLOAD: usize = 32;
/// TTL of every instance registered as load or filler: longer than any run,
/// so no workload is disturbed by another one's leases expiring.
const LONG_TTL_MS: u64 = 3_600_000;
/// TTL of the heartbeat workload's leases: renewed far more often than this.
const HEARTBEAT_TTL_MS: u64 = 30_000;
/// Services the register workload spreads over (one Register is one new
/// instance; spreading keeps every service below its instance cap).
const REGISTER_SERVICES: u64 = 64;
/// Services the filler instances of resolve-held and memory spread over:
/// 1,000 instances per service at 1M, like a large real deployment.
const FILLER_SERVICES: u64 = 1000;
/// Instances of the resolved service (workloads 3 and 4).
const RESOLVE_INSTANCES: u64 = 10;
/// Upper bound on any setup phase (registering up to 1M instances).
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long watchers may take to connect, and deliveries to trail the last
/// change, before they are counted missing.
const WATCH_GRACE: Duration = Duration::from_secs(30);

/// What the workloads share: the options, the registry, its connections.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    options: &'a Options,
    target: &'a Target,
    channels: Vec<Channel>,
    /// Prefix making this run's service names and ids unique, so reruns
    /// against the same registry never collide.
    run: Arc<str>,
    registered: u64,
    resolve_ready: bool,
}

impl<'a> Ctx<'a> {
    /// Connects `options.connections` channels to the target.
    pub(crate) async fn new(options: &'a Options, target: &'a Target) -> Result<Self, BenchError> {
        let channels = target.connect(options.connections).await?;
        let run = format!("{:08x}", rand::random::<u32>());
        Ok(Self {
            options,
            target,
            channels,
            run: run.into(),
            registered: 0,
            resolve_ready: false,
        })
    }

    /// Instances registered through this context so far.
    pub(crate) fn registered(&self) -> u64 {
        self.registered
    }

    fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::new(self.channels[0].clone())
    }

    async fn status_instances(&self) -> Result<u64, BenchError> {
        let status = self
            .client()
            .status(StatusRequest {})
            .await
            .map_err(|status| BenchError::Rpc {
                what: "Status".into(),
                status,
            })?;
        Ok(status.into_inner().instances)
    }

    /// Registers `n` instances (one new lease each) named by `name(seq)` with
    /// seq from `first`, `concurrency` at a time. Returns the outcome and,
    /// when `collect`, each call's (seq, send time, lease id).
    async fn register_many(
        &mut self,
        n: u64,
        first: u64,
        ttl_ms: u64,
        name: fn(&str, u64) -> (String, String),
        collect: bool,
    ) -> Result<(Outcome, Vec<(u64, Instant, u64)>), BenchError> {
        let run = self.run.clone();
        let labels = self.options.labels;
        let (outcome, collected) = drive(
            &self.channels,
            self.options.concurrency,
            Plan::count(n, SETUP_TIMEOUT),
            move |_, channel, mut rec| {
                let run = run.clone();
                async move {
                    let mut client = RegistryClient::new(channel);
                    let mut out = Vec::new();
                    while let Some((t0, i)) = rec.next() {
                        let seq = first + i;
                        let (service, id) = name(&run, seq);
                        let req = RegisterRequest {
                            instance: Some(instance(service, id, seq, labels)),
                            ttl_ms,
                            lease_id: 0,
                        };
                        match client.register(req).await {
                            Ok(resp) => {
                                rec.ok(t0, 1);
                                if collect {
                                    out.push((seq, t0, resp.into_inner().lease_id));
                                }
                            }
                            Err(e) => rec.failed(t0, e),
                        }
                    }
                    (rec, out)
                }
            },
        )
        .await;
        self.registered += outcome.ops;
        if outcome.ops < n {
            return Err(BenchError::Setup(format!(
                "registered only {} of {n} instances in setup: {}",
                outcome.ops,
                outcome.first_error.as_deref().unwrap_or("timed out")
            )));
        }
        Ok((outcome, collected.into_iter().flatten().collect()))
    }

    fn cpu(&self) -> CpuMeter {
        CpuMeter {
            at: Instant::now(),
            server: self.target.cpu_time(),
            client: target::cpu_time("self"),
        }
    }
}

/// CPU used by the registry and by this process over a stretch of time:
/// on 2 shared cores, the split tells whether the server or the load
/// generator is the bottleneck.
#[derive(Debug)]
struct CpuMeter {
    at: Instant,
    server: Option<Duration>,
    client: Option<Duration>,
}

impl CpuMeter {
    fn note(&self, target: &Target) -> Option<String> {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let pct = |now: Option<Duration>, then: Option<Duration>| {
            Some(100.0 * (now? - then?).as_secs_f64() / wall)
        };
        let server = pct(target.cpu_time(), self.server);
        let client = pct(target::cpu_time("self"), self.client);
        match (server, client) {
            (Some(s), Some(c)) => Some(format!("cpu: registry {s:.0}%, bench {c:.0}% of one core")),
            (None, Some(c)) => Some(format!("cpu: bench {c:.0}% of one core")),
            _ => None,
        }
    }
}

/// An instance like a real one: an IPv4 address and `labels` labels.
fn instance(service: String, id: String, seq: u64, labels: usize) -> Instance {
    let address = format!(
        "10.{}.{}.{}:8080",
        (seq >> 16) & 255,
        (seq >> 8) & 255,
        seq & 255
    );
    let metadata = (0..labels)
        .map(|l| match l {
            0 => ("zone".to_string(), format!("zone-{}", seq % 3)),
            1 => ("version".to_string(), "1.4.2".to_string()),
            l => (format!("label{l}"), "x".to_string()),
        })
        .collect();
    Instance {
        service,
        id,
        address,
        metadata,
        weight: 1,
        ..Default::default()
    }
}

fn row(name: impl Into<String>, outcome: &Outcome, unit: &'static str) -> Row {
    let mut notes = Vec::new();
    if let Some(e) = &outcome.first_error {
        notes.push(format!("first error: {e}"));
    }
    Row {
        name: name.into(),
        ops: outcome.ops,
        rate: Some(outcome.units_per_sec()),
        unit,
        latency: Latency::of(&outcome.hist),
        errors: outcome.errors,
        notes,
        ..Default::default()
    }
}

/// Workload 0: the echo ceiling, same client, connections and concurrency.
pub(crate) async fn ceiling(options: &Options) -> Result<Row, BenchError> {
    let echo = EchoService::start()?;
    let channels = target::connect(&echo.url, options.connections).await?;
    let client_cpu = target::cpu_time("self");
    let at = Instant::now();
    let (outcome, _) = drive(
        &channels,
        options.concurrency,
        Plan::timed(options.warmup, options.duration),
        |_, channel, mut rec| async move {
            let mut client = EchoClient::new(channel);
            let payload = vec![7u8; ECHO_PAYLOAD];
            while let Some((t0, _)) = rec.next() {
                let req = EchoRequest {
                    payload: payload.clone(),
                };
                match client.echo(req).await {
                    Ok(_) => rec.ok(t0, 1),
                    Err(e) => rec.failed(t0, e),
                }
            }
            (rec, ())
        },
    )
    .await;
    let mut row = row("ceiling (echo)", &outcome, "calls");
    if let (Some(then), Some(now)) = (client_cpu, target::cpu_time("self")) {
        let pct = 100.0 * (now - then).as_secs_f64() / at.elapsed().as_secs_f64();
        row.notes
            .push(format!("cpu: echo server + bench {pct:.0}% of one core"));
    }
    drop(channels);
    drop(echo);
    Ok(row)
}

/// Workload 1: Register, a new lease and instance per call.
pub(crate) async fn register(ctx: &mut Ctx<'_>) -> Result<Row, BenchError> {
    let run = ctx.run.clone();
    let labels = ctx.options.labels;
    let cpu = ctx.cpu();
    let (outcome, _) = drive(
        &ctx.channels,
        ctx.options.concurrency,
        Plan::timed(ctx.options.warmup, ctx.options.duration),
        move |_, channel, mut rec| {
            let run = run.clone();
            async move {
                let mut client = RegistryClient::new(channel);
                while let Some((t0, seq)) = rec.next() {
                    let service = format!("bench-reg-{run}-{}", seq % REGISTER_SERVICES);
                    let req = RegisterRequest {
                        instance: Some(instance(service, format!("i{seq}"), seq, labels)),
                        ttl_ms: LONG_TTL_MS,
                        lease_id: 0,
                    };
                    match client.register(req).await {
                        Ok(_) => rec.ok(t0, 1),
                        Err(e) => rec.failed(t0, e),
                    }
                }
                (rec, ())
            }
        },
    )
    .await;
    ctx.registered += outcome.ops;
    let mut row = row("register", &outcome, "calls");
    row.notes.extend(cpu.note(ctx.target));
    Ok(row)
}

/// Workload 2: `--leases` leases renewed over one KeepAlive stream per
/// in-flight slot, each message renewing that stream's share of the leases.
pub(crate) async fn heartbeat(ctx: &mut Ctx<'_>) -> Result<Row, BenchError> {
    let n = ctx.options.leases.max(1) as u64;
    let (_, registered) = ctx
        .register_many(
            n,
            0,
            HEARTBEAT_TTL_MS,
            |run, seq| (format!("bench-hb-{run}-{}", seq % 16), format!("h{seq}")),
            true,
        )
        .await?;
    let ids: Vec<u64> = registered.iter().map(|(_, _, lease)| *lease).collect();
    let streams = ctx.options.concurrency.min(ids.len());
    let shares: Arc<Vec<Vec<u64>>> = Arc::new(
        (0..streams)
            .map(|i| ids[i * ids.len() / streams..(i + 1) * ids.len() / streams].to_vec())
            .collect(),
    );
    let cpu = ctx.cpu();
    let (outcome, _) = drive(
        &ctx.channels,
        streams,
        Plan::timed(ctx.options.warmup, ctx.options.duration),
        move |i, channel, mut rec| {
            let lease_ids = shares[i].clone();
            async move {
                let (tx, rx) = mpsc::channel::<HeartbeatRequest>(1);
                let mut client = RegistryClient::new(channel);
                let mut responses = match client.keep_alive(ReceiverStream::new(rx)).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        rec.failed(Instant::now(), e);
                        return (rec, ());
                    }
                };
                let req = HeartbeatRequest { lease_ids };
                while let Some((t0, _)) = rec.next() {
                    if tx.send(req.clone()).await.is_err() {
                        rec.failed(t0, "keepalive request stream closed");
                        break;
                    }
                    match responses.message().await {
                        Ok(Some(resp)) => {
                            let lost = resp.leases.iter().filter(|l| !l.found).count();
                            if lost > 0 {
                                rec.failed(t0, format!("{lost} leases not found"));
                            } else {
                                rec.ok(t0, resp.leases.len() as u64);
                            }
                        }
                        Ok(None) => {
                            rec.failed(t0, "keepalive stream ended");
                            break;
                        }
                        Err(e) => {
                            rec.failed(t0, e);
                            break;
                        }
                    }
                }
                (rec, ())
            }
        },
    )
    .await;
    let mut row = row("heartbeat", &outcome, "renewals");
    row.notes
        .insert(0, format!("calls/s {:.0}", outcome.ops_per_sec()));
    row.notes.insert(
        1,
        format!(
            "{} leases over {streams} KeepAlive streams, ~{} per message",
            ids.len(),
            ids.len() / streams
        ),
    );
    row.notes.extend(cpu.note(ctx.target));
    Ok(row)
}

/// Workloads 3 and 4: Resolve of a 10-instance service, after topping the
/// catalog up to `held` other instances (0: whatever is there).
/// `registry.v1.ResolveResponse` with each instance left as raw bytes: the
/// cheap client view of [`super::ResolveDecode::Envelope`]. Same field
/// numbers as the proto, so it decodes the registry's real answers.
#[derive(Clone, PartialEq, prost::Message)]
struct ResolveEnvelope {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    instances: Vec<bytes::Bytes>,
    #[prost(uint64, tag = "2")]
    revision: u64,
    #[prost(bool, tag = "3")]
    service_known: bool,
}

async fn resolve_envelope(
    grpc: &mut tonic::client::Grpc<Channel>,
    req: ResolveRequest,
) -> Result<ResolveEnvelope, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/registry.v1.Registry/Resolve");
    let codec = tonic_prost::ProstCodec::<ResolveRequest, ResolveEnvelope>::default();
    grpc.unary(tonic::Request::new(req), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) async fn resolve(ctx: &mut Ctx<'_>, held: usize) -> Result<Row, BenchError> {
    if !ctx.resolve_ready {
        ctx.register_many(
            RESOLVE_INSTANCES,
            0,
            LONG_TTL_MS,
            |run, seq| (format!("bench-resolve-{run}"), format!("r{seq}")),
            false,
        )
        .await?;
        ctx.resolve_ready = true;
    }
    let mut setup_note = None;
    let have = ctx
        .status_instances()
        .await?
        .saturating_sub(RESOLVE_INSTANCES);
    if (held as u64) > have {
        let need = held as u64 - have;
        let first = ctx.registered;
        let (setup, _) = ctx
            .register_many(
                need,
                first,
                LONG_TTL_MS,
                |run, seq| {
                    (
                        format!("bench-fill-{run}-{}", seq % FILLER_SERVICES),
                        format!("f{seq}"),
                    )
                },
                false,
            )
            .await?;
        setup_note = Some(format!(
            "setup registered {need} in {:.1} s",
            setup.elapsed.as_secs_f64()
        ));
    }
    let holding = ctx.status_instances().await?;
    let service = format!("bench-resolve-{}", ctx.run);
    let cpu = ctx.cpu();
    let decode = ctx.options.resolve_decode;
    let (outcome, _) = drive(
        &ctx.channels,
        ctx.options.concurrency,
        Plan::timed(ctx.options.warmup, ctx.options.duration),
        move |_, channel, mut rec| {
            let service = service.clone();
            async move {
                let mut client = RegistryClient::new(channel.clone());
                let mut raw = tonic::client::Grpc::new(channel);
                while let Some((t0, _)) = rec.next() {
                    let req = ResolveRequest {
                        service: service.clone(),
                        ..Default::default()
                    };
                    let got = match decode {
                        super::ResolveDecode::Full => client
                            .resolve(req)
                            .await
                            .map(|r| r.get_ref().instances.len()),
                        super::ResolveDecode::Envelope => resolve_envelope(&mut raw, req)
                            .await
                            .map(|r| r.instances.len()),
                    };
                    match got {
                        Ok(n) if n as u64 == RESOLVE_INSTANCES => rec.ok(t0, 1),
                        Ok(n) => rec.failed(t0, format!("resolve returned {n} instances")),
                        Err(e) => rec.failed(t0, e),
                    }
                }
                (rec, ())
            }
        },
    )
    .await;
    let name = if held == 0 {
        "resolve".to_string()
    } else {
        format!("resolve held {held}")
    };
    let mut row = row(name, &outcome, "calls");
    row.notes
        .insert(0, format!("catalog holds {holding} instances"));
    if decode == super::ResolveDecode::Envelope {
        row.notes
            .push("client decodes the envelope only (--resolve-decode envelope)".into());
    }
    row.notes.extend(setup_note);
    row.notes.extend(cpu.note(ctx.target));
    Ok(row)
}

/// Reads a watch stream up to the end of its initial snapshot.
async fn await_snapshot(
    stream: &mut Streaming<registry_api::v1::WatchResponse>,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        match timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(msg))) => {
                if let Some(Kind::Snapshot(s)) = msg.kind
                    && !s.more
                {
                    return Ok(());
                }
            }
            Ok(Ok(None)) => return Err("watch ended before its snapshot".into()),
            Ok(Err(e)) => return Err(format!("watch failed: {e}")),
            Err(_) => return Err("no snapshot before the deadline".into()),
        }
    }
}

/// What one watcher saw: (revision, receipt time) per PUT, and how many
/// reset snapshots interrupted it.
type Seen = Result<(Vec<(u64, Instant)>, u64), String>;

/// Workload 5: `n` watchers on one service, `--changes` registrations into
/// it every `--change-interval`; latency from each change's acknowledgement
/// (the Register response) to its receipt by each watcher.
pub(crate) async fn watch(ctx: &mut Ctx<'_>, n: usize) -> Result<Row, BenchError> {
    let changes = ctx.options.changes;
    let interval = ctx.options.change_interval;
    let service = format!("bench-watch-{}-{n}", ctx.run);
    let deadline = Instant::now() + WATCH_GRACE + interval * changes as u32 + WATCH_GRACE;
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(n.max(1));
    let mut watchers: JoinSet<Seen> = JoinSet::new();
    let mut watch_channels = Vec::new();
    for url in &ctx.options.watch_registry {
        watch_channels.extend(super::target::connect(url, ctx.options.connections).await?);
    }
    if watch_channels.is_empty() {
        watch_channels = ctx.channels.clone();
    }
    for i in 0..n {
        let mut client = RegistryClient::new(watch_channels[i % watch_channels.len()].clone());
        let service = service.clone();
        let ready = ready_tx.clone();
        watchers.spawn(async move {
            let req = WatchRequest {
                service,
                ..Default::default()
            };
            let opened = match timeout_at(deadline, client.watch(req)).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(e)) => Err(format!("watch refused: {e}")),
                Err(_) => Err("watch not answered before the deadline".into()),
            };
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(e.clone())).await;
                    return Err(e);
                }
            };
            if let Err(e) = await_snapshot(&mut stream, deadline).await {
                let _ = ready.send(Err(e.clone())).await;
                return Err(e);
            }
            let _ = ready.send(Ok(())).await;
            drop(ready);
            let mut seen = Vec::with_capacity(changes);
            let mut resets = 0;
            while seen.len() < changes {
                match timeout_at(deadline, stream.message()).await {
                    Ok(Ok(Some(msg))) => {
                        let at = Instant::now();
                        match msg.kind {
                            Some(Kind::Events(batch)) => seen.extend(
                                batch
                                    .events
                                    .iter()
                                    .filter(|e| e.r#type == EventType::Put as i32)
                                    .map(|e| (e.revision, at)),
                            ),
                            Some(Kind::Snapshot(_)) => resets += 1,
                            _ => {}
                        }
                    }
                    _ => break,
                }
            }
            Ok((seen, resets))
        });
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < n {
        match timeout(WATCH_GRACE, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(e))) => return Err(BenchError::Setup(format!("watcher: {e}"))),
            Ok(None) | Err(_) => {
                return Err(BenchError::Setup(format!(
                    "only {ready} of {n} watchers were ready within {WATCH_GRACE:?}"
                )));
            }
        }
    }

    let cpu = ctx.cpu();
    let mut client = ctx.client();
    // revision -> (send time, ack time) of each change.
    let mut acks: HashMap<u64, (Instant, Instant)> = HashMap::with_capacity(changes);
    let mut writer_errors = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for k in 0..changes as u64 {
        tick.tick().await;
        let req = RegisterRequest {
            instance: Some(instance(
                service.clone(),
                format!("c{k}"),
                k,
                ctx.options.labels,
            )),
            ttl_ms: LONG_TTL_MS,
            lease_id: 0,
        };
        let sent = Instant::now();
        match client.register(req).await {
            Ok(resp) => {
                acks.insert(resp.into_inner().revision, (sent, Instant::now()));
            }
            Err(e) => {
                writer_errors += 1;
                tracing::warn!("watch workload change {k} failed: {e}");
            }
        }
    }
    ctx.registered += acks.len() as u64;

    let mut hist = histogram();
    let mut from_send = histogram();
    let (mut delivered, mut early, mut resets, mut failed) = (0u64, 0u64, 0u64, 0u64);
    while let Some(joined) = watchers.join_next().await {
        match joined {
            Ok(Ok((seen, r))) => {
                resets += r;
                for (revision, at) in seen {
                    let Some((sent, ack)) = acks.get(&revision) else {
                        continue;
                    };
                    delivered += 1;
                    if at < *ack {
                        early += 1;
                    }
                    let us = at.saturating_duration_since(*ack).as_micros() as u64;
                    hist.saturating_record(us.max(1));
                    let us = at.saturating_duration_since(*sent).as_micros() as u64;
                    from_send.saturating_record(us.max(1));
                }
            }
            Ok(Err(_)) | Err(_) => failed += 1,
        }
    }
    let expected = (n * acks.len()) as u64;
    let missing = expected.saturating_sub(delivered);
    let mut notes = vec![
        format!("{n} watchers, {} changes every {interval:?}", acks.len()),
        format!("{early} deliveries arrived before the writer's ack (counted as 0)"),
    ];
    if let Some(l) = Latency::of(&from_send) {
        notes.push(format!(
            "from the change's send: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0
        ));
    }
    if missing > 0 || resets > 0 || failed > 0 || writer_errors > 0 {
        notes.push(format!(
            "missing {missing}, resets {resets}, failed watchers {failed}, failed changes {writer_errors}"
        ));
    }
    notes.extend(cpu.note(ctx.target));
    Ok(Row {
        name: format!("watch {n}"),
        ops: delivered,
        unit: "deliveries",
        latency: Latency::of(&hist),
        errors: missing + writer_errors,
        notes,
        ..Default::default()
    })
}

/// Workload 6: `--expiry-leases` leases with `--expiry-ttl`, never renewed;
/// how late each DELETE reaches a watcher after its deadline. The deadline
/// is taken as the Register's send time + TTL, which is at or before the
/// server's own, so the lateness is an upper bound.
pub(crate) async fn expiry(ctx: &mut Ctx<'_>) -> Result<Row, BenchError> {
    let n = ctx.options.expiry_leases.max(1);
    let ttl = ctx.options.expiry_ttl;
    let service = format!("bench-expiry-{}", ctx.run);
    let deadline = Instant::now() + ttl + WATCH_GRACE + WATCH_GRACE;
    let mut client = ctx.client();
    let mut stream = client
        .watch(WatchRequest {
            service: service.clone(),
            ..Default::default()
        })
        .await
        .map_err(|status| BenchError::Rpc {
            what: "Watch for expiry".into(),
            status,
        })?
        .into_inner();
    await_snapshot(&mut stream, deadline)
        .await
        .map_err(BenchError::Setup)?;
    let watcher = tokio::spawn(async move {
        let mut deleted: HashMap<String, Instant> = HashMap::with_capacity(n);
        while deleted.len() < n {
            match timeout_at(deadline, stream.message()).await {
                Ok(Ok(Some(msg))) => {
                    let at = Instant::now();
                    if let Some(Kind::Events(batch)) = msg.kind {
                        for e in batch.events {
                            if e.r#type == EventType::Delete as i32
                                && e.reason == DeleteReason::Expired as i32
                                && let Some(i) = e.instance
                            {
                                deleted.insert(i.id, at);
                            }
                        }
                    }
                }
                _ => break,
            }
        }
        deleted
    });
    let cpu = ctx.cpu();
    let ttl_ms = ttl.as_millis() as u64;
    let (_, sent) = ctx
        .register_many(
            n as u64,
            0,
            ttl_ms,
            |run, seq| (format!("bench-expiry-{run}"), format!("e{seq}")),
            true,
        )
        .await?;
    let deleted = watcher
        .await
        .map_err(|e| BenchError::Setup(format!("expiry watcher failed: {e}")))?;
    let mut hist = histogram();
    let mut early = 0;
    for (seq, sent_at, _) in &sent {
        if let Some(at) = deleted.get(&format!("e{seq}")) {
            let due = *sent_at + ttl;
            if *at < due {
                early += 1;
            }
            hist.saturating_record((at.saturating_duration_since(due).as_micros() as u64).max(1));
        }
    }
    let missing = (n as u64).saturating_sub(hist.len());
    let mut notes = vec![format!(
        "{n} leases, ttl {ttl:?}; lateness = DELETE receipt - (send + ttl)"
    )];
    if early > 0 {
        notes.push(format!("{early} expired before send + ttl (counted as 0)"));
    }
    notes.extend(cpu.note(ctx.target));
    Ok(Row {
        name: "expiry lateness".into(),
        ops: hist.len(),
        unit: "deletes",
        latency: Latency::of(&hist),
        errors: missing,
        notes,
        ..Default::default()
    })
}

/// Workload 7: registers `--instances` (cumulatively), reading the
/// registry's RSS at each count; the growth over the RSS before the first
/// registration, divided by the count, is the cost per instance.
pub(crate) async fn memory(ctx: &mut Ctx<'_>) -> Result<Vec<Row>, BenchError> {
    let baseline = ctx.target.rss_bytes();
    let mut rows = Vec::new();
    let mut done = 0u64;
    let mut total = Duration::ZERO;
    let checkpoints = ctx.options.instances.clone();
    for checkpoint in checkpoints {
        let checkpoint = checkpoint as u64;
        if checkpoint <= done {
            continue;
        }
        let cpu = ctx.cpu();
        let (outcome, _) = ctx
            .register_many(
                checkpoint - done,
                done,
                LONG_TTL_MS,
                |run, seq| {
                    (
                        format!("bench-mem-{run}-{}", seq % FILLER_SERVICES),
                        format!("m{seq}"),
                    )
                },
                false,
            )
            .await?;
        done = checkpoint;
        total += outcome.elapsed;
        let mut row = row(format!("memory {checkpoint}"), &outcome, "registrations");
        row.notes.push(format!(
            "{checkpoint} registered in {:.1} s",
            total.as_secs_f64()
        ));
        match (baseline, ctx.target.rss_bytes()) {
            (Some(base), Some(rss)) => {
                let per = rss.saturating_sub(base) / checkpoint;
                row.notes.push(format!(
                    "rss {:.1} MiB (baseline {:.1} MiB)",
                    rss as f64 / (1 << 20) as f64,
                    base as f64 / (1 << 20) as f64
                ));
                row.notes.push(format!("{per} bytes/instance"));
            }
            _ => row
                .notes
                .push("rss unknown: pass --registry-pid or --spawn-registry".into()),
        }
        row.notes.extend(cpu.note(ctx.target));
        rows.push(row);
    }
    Ok(rows)
}
