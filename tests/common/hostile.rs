//! Helpers for the hostile-input suites (`tests/hostile_*.rs`): a config
//! with short transport timeouts, raw protobuf bytes over gRPC, raw TCP
//! peers, the "server still serves" probe, and an RSS budget.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prost::bytes::{Buf, BufMut, Bytes};
use registry::Config;
use registry_api::v1::{Instance, RegisterRequest, ResolveRequest};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Mutex, MutexGuard},
    time::Instant,
};
use tonic::{
    Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

use super::TestServer;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Handshake timeout of [`hostile_config`]: short so reaping tests take a
/// second, long enough that a loaded CI machine's real clients make it.
pub const HANDSHAKE: Duration = Duration::from_millis(1000);
/// Keepalive ping interval and ack timeout of [`hostile_config`].
pub const KEEPALIVE: Duration = Duration::from_millis(300);
/// Idle timeout of [`hostile_config`]: above 2 × [`KEEPALIVE`], as the
/// server requires.
pub const IDLE: Duration = Duration::from_millis(1500);
/// Per-call timeout of [`hostile_config`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long past a timeout we wait for the server to act: scheduling slack
/// on a 2-core machine shared with other builds.
pub const SLACK: Duration = Duration::from_secs(3);

/// The test config with every transport timeout shortened, so reaping is
/// observable in about a second.
pub fn hostile_config() -> Config {
    Config {
        handshake_timeout: HANDSHAKE,
        keepalive_interval: KEEPALIVE,
        keepalive_timeout: KEEPALIVE,
        idle_timeout: IDLE,
        request_timeout: REQUEST_TIMEOUT,
        ..TestServer::test_config()
    }
}

/// Serialises the tests of one binary: they share the process, so RSS
/// measured around one scenario must not include another's.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Takes the per-binary lock; hold it for the whole test.
pub async fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Resident set size of this process (client and in-process server), bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value in kB");
    kib * 1024
}

/// RSS at the start of a scenario; [`RssBudget::check`] fails the test if
/// the process grew by more than the budget since.
#[derive(Debug)]
pub struct RssBudget {
    before: u64,
}

impl RssBudget {
    /// Records the current RSS.
    pub fn start() -> Self {
        Self {
            before: rss_bytes(),
        }
    }

    /// Asserts growth below `mib` MiB and returns the growth in MiB.
    pub fn check(&self, mib: u64, what: &str) -> u64 {
        let after = rss_bytes();
        let grown = after.saturating_sub(self.before) >> 20;
        eprintln!(
            "{what}: RSS {} MiB -> {} MiB (+{grown} MiB, budget {mib} MiB)",
            self.before >> 20,
            after >> 20
        );
        assert!(
            grown < mib,
            "{what}: RSS grew by {grown} MiB, the budget is {mib} MiB"
        );
        grown
    }
}

/// Proof the server still serves others: a fresh client registers a unique
/// instance and resolves it, within a deadline.
pub async fn assert_serving(server: &TestServer, what: &str) {
    static N: AtomicU64 = AtomicU64::new(0);
    let id = format!("probe-{}", N.fetch_add(1, Ordering::Relaxed));
    let probe = async {
        let mut c = server.client().await;
        c.register(RegisterRequest {
            instance: Some(Instance {
                service: "probe".into(),
                id: id.clone(),
                address: "127.0.0.1:9".into(),
                ..Default::default()
            }),
            ttl_ms: 30_000,
            lease_id: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: register failed: {e}"));
        let res = c
            .resolve(ResolveRequest {
                service: "probe".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: resolve failed: {e}"))
            .into_inner();
        assert!(
            res.instances.iter().any(|i| i.id == id),
            "{what}: probe instance not resolved"
        );
    };
    tokio::time::timeout(Duration::from_secs(10), probe)
        .await
        .unwrap_or_else(|_| panic!("{what}: server did not answer a normal client within 10s"));
}

/// A codec that sends and receives message bytes as they are, so a test can
/// put anything (invalid UTF-8, truncated fields) on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Sends `body` as the request message of a unary method (`path` like
/// `/registry.v1.Registry/Register`).
pub async fn raw_unary(channel: Channel, path: &'static str, body: Bytes) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Opens a server-streaming method with `body` as its request; returns the
/// first message, or the call's status.
pub async fn raw_server_streaming(
    channel: Channel,
    path: &'static str,
    body: Bytes,
) -> Result<Option<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut stream = grpc
        .server_streaming(
            Request::new(body),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    stream.message().await
}

/// Protobuf hand-encoding: a length-delimited field (strings, bytes,
/// messages, map entries).
pub fn pb_bytes(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 12);
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

/// Protobuf hand-encoding: a varint field.
pub fn pb_varint(tag: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    prost::encoding::encode_key(tag, prost::encoding::WireType::Varint, &mut out);
    prost::encoding::encode_varint(value, &mut out);
    out
}

/// Connects a raw TCP peer to the server (no HTTP/2 unless the test sends it).
pub async fn raw_tcp(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.addr)
        .await
        .expect("tcp connect to test registry")
}

/// How a raw peer's connection ended, as seen by reading until EOF.
#[derive(Debug)]
pub struct Closed {
    /// Time from the call until EOF or reset.
    pub after: Duration,
    /// Bytes the server sent before closing (e.g. its SETTINGS and GOAWAY).
    pub received: Vec<u8>,
}

/// Reads (and discards nothing: returns) whatever the server sends until it
/// closes the connection; panics if it is still open after `limit`.
pub async fn read_until_closed(stream: &mut TcpStream, limit: Duration, what: &str) -> Closed {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("{what}: connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Closed {
                    after: start.elapsed(),
                    received,
                };
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes bytes, ignoring a reset: the server may close before reading all.
pub async fn write_lossy(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
}

/// An empty HTTP/2 SETTINGS frame: with [`H2_PREFACE`] before it, a complete
/// client handshake.
pub const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];
