//! Figures of the HTTP API and DNS front ends (BENCHMARKS.md), against a
//! registry in this process on loopback:
//!
//! - resolve: HTTP `GET /v1/services/{name}` and gRPC `Resolve`, same
//!   service (10 instances), same concurrency, keep-alive connections;
//!   calls per second and latency percentiles;
//! - long-poll: 1,000 waiters on one service, a registration, the time
//!   until each waiter has its answer (p50/p99/max over several rounds);
//! - SSE: 1,000 `/v1/watch/{name}` streams, the same measure;
//! - DNS: UDP `A` queries per second from concurrent sockets.
//!
//! `cargo bench -p registry --bench frontends` (release build; about a
//! minute). `FRONTENDS_SECONDS` sets each throughput run (default 5),
//! `FRONTENDS_CONCURRENCY` the resolve clients (default 32),
//! `FRONTENDS_WAITERS` the long-poll and SSE clients (default 1000).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use registry::{Config, Registry, frontends::Listeners};
use registry_api::v1::{
    Instance, RegisterRequest, ResolveRequest, registry_client::RegistryClient,
};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Barrier,
};

const SERVICE: &str = "bench";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    let seconds = Duration::from_secs(env("FRONTENDS_SECONDS", 5));
    let concurrency = env("FRONTENDS_CONCURRENCY", 32) as usize;
    let waiters = env("FRONTENDS_WAITERS", 1000) as usize;

    // The registry on a runtime of its own (2 workers, as on a 2-core box).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (registry, grpc, http, dns) = server_rt.block_on(async {
        let config = Config {
            rate_limit: 0,
            warmup: Duration::ZERO,
            max_watchers_per_connection: 100_000,
            ..Config::default()
        };
        let registry = Registry::new(config);
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            grpc.local_addr().unwrap(),
            http.local_addr().unwrap(),
            udp.local_addr().unwrap(),
        );
        let listeners = Listeners {
            http: Some(http),
            dns_udp: Some(udp),
            dns_tcp: None,
        };
        let r = registry.clone();
        tokio::spawn(async move {
            registry::server::serve_with(grpc, r, listeners, std::future::pending())
                .await
                .unwrap()
        });
        (registry, addrs.0, addrs.1, addrs.2)
    });
    for i in 0..10 {
        futures::executor::block_on(
            registry.register(
                RegisterRequest {
                    instance: Some(Instance {
                        service: SERVICE.into(),
                        id: format!("{SERVICE}-{i}"),
                        address: format!("10.0.0.{i}:8080"),
                        metadata: [
                            ("version".to_string(), "1.4.2".to_string()),
                            ("zone".to_string(), "eu-1".to_string()),
                        ]
                        .into(),
                        ..Default::default()
                    }),
                    ttl_ms: 3_600_000,
                    lease_id: 0,
                },
                None,
            ),
        )
        .unwrap();
    }

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    client_rt.block_on(async {
        // Let the servers start accepting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("registry frontends benchmark: {concurrency} resolve clients, {seconds:?} per run, {waiters} waiters\n");
        let (n, h) = http_resolve(http, concurrency, seconds).await;
        report("HTTP GET /v1/services/bench", n, seconds, &h);
        let (n, h) = grpc_resolve(grpc, concurrency, seconds).await;
        report("gRPC Resolve bench", n, seconds, &h);
        let (n, h) = dns_queries(dns, concurrency, seconds).await;
        report("DNS A bench.service.registry.", n, seconds, &h);
        let h = long_poll(http, &registry, waiters, 5).await;
        latency(&format!("long-poll, {waiters} waiters: register -> answer"), &h);
        let h = sse(http, &registry, waiters, 5).await;
        latency(&format!("SSE, {waiters} watchers: register -> event"), &h);
    });
    drop(client_rt);
    registry.shutdown();
    server_rt.shutdown_timeout(Duration::from_secs(2));
}

fn report(what: &str, n: u64, d: Duration, h: &Histogram<u64>) {
    println!(
        "{what:<34} {:>9.0} /s   p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
        n as f64 / d.as_secs_f64(),
        ms(h, 0.50),
        ms(h, 0.99),
        h.max() as f64 / 1000.0
    );
}

fn latency(what: &str, h: &Histogram<u64>) {
    println!(
        "{what:<48} p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} samples)",
        ms(h, 0.50),
        ms(h, 0.99),
        h.max() as f64 / 1000.0,
        h.len()
    );
}

/// Recorded latencies in microseconds: exact quantiles from the sorted
/// samples (a few hundred thousand at most), so the daemon crate needs no
/// histogram dependency.
#[derive(Debug, Clone, Default)]
struct Histogram<T = u64>(Vec<T>);

impl Histogram<u64> {
    fn record(&mut self, v: u64) -> Result<(), std::convert::Infallible> {
        self.0.push(v);
        Ok(())
    }

    fn add(&mut self, other: Histogram<u64>) -> Result<(), std::convert::Infallible> {
        self.0.extend(other.0);
        Ok(())
    }

    fn value_at_quantile(&self, q: f64) -> u64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0)
    }

    fn max(&self) -> u64 {
        self.0.iter().copied().max().unwrap_or(0)
    }

    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::default()
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut Sender, addr: SocketAddr, path: &str) -> hyper::Response<Incoming> {
    sender.ready().await.unwrap();
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// One call of a closed loop.
type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// Makes calls on one client's connection.
type Call = Box<dyn FnMut() -> BoxFut + Send>;

/// Runs `clients` loops of the call `make` builds (one connection each) for
/// `d`; returns calls made and their latencies.
async fn closed_loop<F, Fut>(clients: usize, d: Duration, make: F) -> (u64, Histogram<u64>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Call>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut call = make().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                call().await;
                h.record(t.elapsed().as_micros() as u64).unwrap();
                n += 1;
            }
            (n, h)
        }));
    }
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut all = histogram();
    for t in tasks {
        let (n, h) = t.await.unwrap();
        total += n;
        all.add(h).unwrap();
    }
    (total, all)
}

async fn http_resolve(addr: SocketAddr, clients: usize, d: Duration) -> (u64, Histogram<u64>) {
    closed_loop(clients, d, || async move {
        let sender = Arc::new(tokio::sync::Mutex::new(connect(addr).await));
        Box::new(move || {
            let sender = sender.clone();
            Box::pin(async move {
                let mut s = sender.lock().await;
                let resp = get(&mut s, addr, "/v1/services/bench").await;
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert!(body.len() > 100);
            }) as BoxFut
        }) as Call
    })
    .await
}

async fn grpc_resolve(addr: SocketAddr, clients: usize, d: Duration) -> (u64, Histogram<u64>) {
    closed_loop(clients, d, || async move {
        // One connection per client, like the HTTP side.
        let client = RegistryClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Box::new(move || {
            let mut client = client.clone();
            Box::pin(async move {
                let r = client
                    .resolve(ResolveRequest {
                        service: SERVICE.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(r.into_inner().instances.len(), 10);
            }) as BoxFut
        }) as Call
    })
    .await
}

async fn dns_queries(addr: SocketAddr, clients: usize, d: Duration) -> (u64, Histogram<u64>) {
    use hickory_server::proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RecordType},
    };
    let mut q = Message::new(7, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("bench.service.registry.").unwrap(),
        RecordType::A,
    ));
    let query = Arc::new(q.to_vec().unwrap());
    closed_loop(clients, d, || {
        let query = query.clone();
        async move {
            let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            sock.connect(addr).await.unwrap();
            Box::new(move || {
                let (sock, query) = (sock.clone(), query.clone());
                Box::pin(async move {
                    sock.send(&query).await.unwrap();
                    let mut buf = [0u8; 1500];
                    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
                        .await
                        .expect("DNS answer")
                        .unwrap();
                    assert!(n > 100, "10 A records");
                }) as BoxFut
            }) as Call
        }
    })
    .await
}

fn register_one(registry: &Registry, round: usize) -> Instant {
    let t = Instant::now();
    futures::executor::block_on(registry.register(
        RegisterRequest {
            instance: Some(Instance {
                service: SERVICE.into(),
                id: format!("round-{round}"),
                address: "10.9.0.1:8080".into(),
                ..Default::default()
            }),
            ttl_ms: 3_600_000,
            lease_id: 0,
        },
        None,
    ))
    .unwrap();
    t
}

/// `waiters` long-polls; each round a registration wakes them all.
async fn long_poll(
    addr: SocketAddr,
    registry: &Registry,
    waiters: usize,
    rounds: usize,
) -> Histogram<u64> {
    let mut h = histogram();
    let mut senders = Vec::new();
    for _ in 0..waiters {
        senders.push(connect(addr).await);
    }
    for round in 0..rounds {
        let revision = registry.catalog().revision();
        let ready = Arc::new(Barrier::new(waiters + 1));
        let mut tasks = Vec::new();
        for mut s in senders.drain(..) {
            let ready = ready.clone();
            tasks.push(tokio::spawn(async move {
                let path = format!("/v1/services/bench?wait=60s&after_revision={revision}");
                let resp = {
                    let fut = get(&mut s, addr, &path);
                    let mut fut = std::pin::pin!(fut);
                    // Poll once so the request is written before the barrier.
                    let early = tokio::select! {
                        biased;
                        r = &mut fut => Some(r),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => None,
                    };
                    ready.wait().await;
                    match early {
                        Some(r) => r,
                        None => fut.await,
                    }
                };
                let _ = resp.into_body().collect().await.unwrap();
                (Instant::now(), s)
            }));
        }
        ready.wait().await;
        // Every request is on the wire; give the server time to park them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = register_one(registry, round);
        for t in tasks {
            let (at, s) = t.await.unwrap();
            h.record(at.saturating_duration_since(t0).as_micros().max(1) as u64)
                .unwrap();
            senders.push(s);
        }
    }
    h
}

/// `watchers` SSE streams; each round a registration reaches them all.
async fn sse(
    addr: SocketAddr,
    registry: &Registry,
    watchers: usize,
    rounds: usize,
) -> Histogram<u64> {
    let mut streams = Vec::new();
    for _ in 0..watchers {
        let mut s = connect(addr).await;
        let resp = get(&mut s, addr, "/v1/watch/bench").await;
        assert_eq!(resp.status(), 200);
        streams.push((s, resp.into_body()));
    }
    // Read each stream's snapshot, then listen for `rounds` events.
    let start = Arc::new(Barrier::new(watchers + 1));
    let mut tasks = Vec::new();
    for (s, mut body) in streams {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = s;
            let mut buf = String::new();
            let mut seen_snapshot = false;
            let mut arrivals = Vec::new();
            let mut waited = false;
            while arrivals.len() < rounds {
                if seen_snapshot && !waited {
                    start.wait().await;
                    waited = true;
                }
                let frame = body.frame().await.unwrap().unwrap();
                if let Ok(data) = frame.into_data() {
                    buf.push_str(&String::from_utf8_lossy(&data));
                }
                while let Some(cut) = buf.find("\n\n") {
                    let block: String = buf.drain(..cut + 2).collect();
                    if block.contains("event: snapshot") {
                        seen_snapshot = true;
                    } else if block.contains("event: events") {
                        arrivals.push(Instant::now());
                    }
                }
            }
            arrivals
        }));
    }
    start.wait().await;
    let mut sent = Vec::new();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sent.push(register_one(registry, 1000 + round));
    }
    let mut h = histogram();
    for t in tasks {
        let arrivals = t.await.unwrap();
        for (at, t0) in arrivals.iter().zip(&sent) {
            h.record(at.saturating_duration_since(*t0).as_micros().max(1) as u64)
                .unwrap();
        }
    }
    h
}
